//! `[persistence]`: retained messages and persistent sessions outlive a restart of the broker, a clean one and a
//! SIGKILL after an autosave; a damaged state file is kept aside and the broker still starts.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use tollgate_integration_tests::external;
use tollgate_integration_tests::v5::{self, connect, connect_to, options, topic};
use tollgate_integration_tests::{QUIET, TestBroker, v4, within};

async fn broker_saving_to(file: &Path) -> TestBroker {
    let file = file.to_owned();
    TestBroker::builder()
        .configure(move |config| {
            config.persistence.enabled = true;
            config.persistence.file = Some(file);
        })
        .start()
        .await
}

#[tokio::test]
async fn retained_messages_and_persistent_sessions_outlive_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("broker.state");
    let first = broker_saving_to(&file).await;

    let mut sensor = connect_to(&first, "sensor").await;
    sensor.publish("site/door", QoS::AtLeastOnce, true, b"closed").await;
    // An MQTT 5 session (expiry an hour) and a 3.1.1 one (clean session off), each subscribed, both offline.
    let car = |broker: &TestBroker| {
        let mut car = options(broker, "car-1");
        car.set_clean_start(false);
        car.set_session_expiry_interval(Some(3600));
        car
    };
    let (mut client, _) = connect(car(&first)).await;
    client.subscribe_ok("cmd/car-1/#", QoS::ExactlyOnce).await;
    client.disconnect().await;
    let mut old = v4::options(&first, "car-2");
    old.set_clean_session(false);
    let (mut legacy, _) = v4::connect(old).await;
    legacy.subscribe_ok("cmd/car-2/#", rumqttc::QoS::AtLeastOnce).await;
    legacy.disconnect().await;
    for index in 0..3 {
        sensor.publish(&format!("cmd/car-1/{index}"), QoS::ExactlyOnce, false, b"go").await;
        sensor.publish(&format!("cmd/car-2/{index}"), QoS::AtLeastOnce, false, b"go").await;
    }
    sensor.disconnect().await;
    assert!(first.stop().await);
    assert!(file.is_file(), "saved at shutdown");

    let second = broker_saving_to(&file).await;
    let (mut client, connack) = connect(car(&second)).await;
    assert!(connack.session_present, "the MQTT 5 session survived");
    for index in 0..3 {
        let queued = client.next_publish().await;
        assert_eq!((topic(&queued), queued.qos), (format!("cmd/car-1/{index}"), QoS::ExactlyOnce));
    }
    // Still subscribed, without subscribing again.
    let mut backend = connect_to(&second, "backend").await;
    backend.publish("cmd/car-1/3", QoS::AtLeastOnce, false, b"go").await;
    assert_eq!(topic(&client.next_publish().await), "cmd/car-1/3");
    client.expect_no_publish(QUIET).await;

    let mut old = v4::options(&second, "car-2");
    old.set_clean_session(false);
    let (mut legacy, connack) = v4::connect(old).await;
    assert!(connack.session_present, "the 3.1.1 session survived");
    for index in 0..3 {
        let queued = legacy.next_publish().await;
        assert_eq!(v4::topic(&queued), format!("cmd/car-2/{index}"));
    }

    let mut watcher = connect_to(&second, "watcher").await;
    watcher.subscribe_ok("site/#", QoS::AtLeastOnce).await;
    let retained = watcher.next_publish().await;
    assert_eq!((topic(&retained), &retained.payload[..], retained.retain), ("site/door".into(), &b"closed"[..], true));
    second.stop().await;
}

/// A will waiting out its Will Delay Interval when the broker stops is saved with the state: after the restart it
/// is published when the delay ends (the car never came back), not lost.
#[tokio::test]
async fn a_delayed_will_pending_at_shutdown_is_published_after_the_restart() {
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("broker.state");
    let first = broker_saving_to(&file).await;
    let properties = rumqttc::v5::mqttbytes::v5::LastWillProperties {
        delay_interval: Some(2),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    let mut car =
        v5::options_with_will(&first, "car-9", "cars/car-9/status", "offline", QoS::AtLeastOnce, Some(properties));
    car.set_clean_start(false);
    car.set_session_expiry_interval(Some(3600));
    let (client, _) = connect(car).await;
    client.kill().await;
    tollgate_integration_tests::wait_until("the car's connection to be gone", || {
        first.broker().sessions().get(&tollgate_core::ClientId("car-9".into())).is_some_and(|s| !s.is_connected())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(first.stop().await);

    let second = broker_saving_to(&file).await;
    let mut backend = connect_to(&second, "backend").await;
    backend.subscribe_ok("cars/#", QoS::AtLeastOnce).await;
    let will = backend.next_publish().await;
    assert_eq!((topic(&will), &will.payload[..]), ("cars/car-9/status".into(), &b"offline"[..]));
    second.stop().await;
}

/// A configuration for the `tollgate` binary in `dir`: a free loopback port, an admin socket, `[persistence]` with
/// `autosave_interval`. Returns the port, the state file and the configuration file.
fn binary_config(dir: &Path, autosave_interval: u32) -> (u16, std::path::PathBuf, std::path::PathBuf) {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let file = dir.join("broker.state");
    let config = dir.join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "[[listeners]]\nbind = \"127.0.0.1:{port}\"\n\n[runtime]\nadmin_socket = \"{}\"\n\n\
             [persistence]\nenabled = true\nfile = \"{}\"\nautosave_interval = {autosave_interval}\n",
            dir.join("admin.sock").display(),
            file.display()
        ),
    )
    .unwrap();
    (port, file, config)
}

/// The `tollgate` binary with `autosave_interval = 1`, killed with SIGKILL once a save has happened, then started
/// again: the retained message and the offline session's queue were in the last save.
#[tokio::test]
async fn the_last_autosave_outlives_a_killed_broker() {
    let dir = tempfile::tempdir().unwrap();
    let (port, file, config) = binary_config(dir.path(), 1);
    let client_options = |id: &str| {
        let mut options = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options
    };
    let mut broker = external::run_broker(&config, port).await;
    let mut car = client_options("car-1");
    car.set_clean_start(false);
    car.set_session_expiry_interval(Some(3600));
    let (mut client, _) = v5::connect(car.clone()).await;
    client.subscribe_ok("cmd/#", QoS::AtLeastOnce).await;
    client.disconnect().await;
    let (mut sensor, _) = v5::connect(client_options("sensor")).await;
    sensor.publish("site/door", QoS::AtLeastOnce, true, b"open").await;
    sensor.publish("cmd/unlock", QoS::AtLeastOnce, false, b"now").await;
    // The next save after these: the file's modification time moves past the last publish.
    let published = std::time::SystemTime::now();
    within("an autosave after the publishes", async {
        loop {
            let saved = std::fs::metadata(&file).and_then(|meta| meta.modified());
            if saved.is_ok_and(|saved| saved > published) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    broker.signal("KILL");
    broker.wait(Duration::from_secs(10)).await;
    drop(sensor);

    let _broker = external::run_broker(&config, port).await;
    let (mut client, connack) = v5::connect(car).await;
    assert!(connack.session_present);
    assert_eq!(topic(&client.next_publish().await), "cmd/unlock");
    let (mut watcher, _) = v5::connect(client_options("watcher")).await;
    watcher.subscribe_ok("site/#", QoS::AtLeastOnce).await;
    assert_eq!(&watcher.next_publish().await.payload[..], b"open");
}

/// SIGUSR1 writes the state file at once (Mosquitto's signal for it), here with autosave off; `tollgate status`
/// says when it was saved; a SIGKILL after it loses nothing that was in it.
#[tokio::test]
async fn sigusr1_saves_the_state_now() {
    let dir = tempfile::tempdir().unwrap();
    let (port, file, config) = binary_config(dir.path(), 0);
    let mut broker = external::run_broker(&config, port).await;
    let options = rumqttc::v5::MqttOptions::new("sensor", "127.0.0.1", port);
    let (mut sensor, _) = v5::connect(options).await;
    sensor.publish("site/gate", QoS::AtLeastOnce, true, b"shut").await;
    assert!(!file.exists(), "autosave is off");
    broker.signal("USR1");
    within("the state file", async {
        while !file.is_file() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let mut status = tokio::process::Command::new(external::tollgate_bin());
    external::clean_env(&mut status).arg("status").arg("--config").arg(&config);
    let output = external::run(&mut status, Duration::from_secs(10)).await;
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["persistence"]["file"], file.display().to_string());
    assert!(status["persistence"]["saved_unix_s"].as_u64().is_some(), "{status}");
    broker.signal("KILL");
    broker.wait(Duration::from_secs(10)).await;
    drop(sensor);

    let _broker = external::run_broker(&config, port).await;
    let (mut watcher, _) = v5::connect(rumqttc::v5::MqttOptions::new("watcher", "127.0.0.1", port)).await;
    watcher.subscribe_ok("site/#", QoS::AtLeastOnce).await;
    assert_eq!(&watcher.next_publish().await.payload[..], b"shut");
}

#[tokio::test]
async fn a_damaged_state_file_is_kept_aside_and_the_broker_starts_empty() {
    let state = tempfile::tempdir().unwrap();
    let file = state.path().join("broker.state");
    std::fs::write(&file, b"tollgate-state\n\x01 a torn write").unwrap();
    let broker = broker_saving_to(&file).await;
    let aside: Vec<String> = std::fs::read_dir(state.path())
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("broker.state.unreadable-"))
        .collect();
    assert_eq!(aside.len(), 1, "kept for inspection: {aside:?}");
    assert!(!file.exists());
    // Serving, and saving afresh at shutdown.
    let mut client = connect_to(&broker, "first").await;
    client.publish("site/x", QoS::AtLeastOnce, true, b"1").await;
    client.disconnect().await;
    broker.stop().await;
    assert!(file.is_file());
}
