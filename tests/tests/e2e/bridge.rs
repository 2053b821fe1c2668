//! Bridges end to end: a site broker with a `[[bridges]]` link to a remote broker (another Tollgate, or a real
//! Mosquitto), real clients on both sides. Route decisions through both plugin runtimes, loop safety of a
//! two-way mapping, and no loss across a remote outage.

#![allow(clippy::unwrap_used)]

use crate::wasm_build;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use tollgate::bridge_config::{BridgeConfig, BridgeTopicConfig};
use tollgate::config::{PluginConfig, PluginLimitsConfig};
use tollgate_bridge::BridgeStats;
use tollgate_integration_tests::external::{self, require_tool};
use tollgate_integration_tests::v5::{self, connect_to, topic};
use tollgate_integration_tests::{QUIET, TestBroker, bridge_config, bridge_topic, v4, wait_until, within};

fn mapping(pattern: &str, direction: &str, qos: u8, local_prefix: &str, remote_prefix: &str) -> BridgeTopicConfig {
    bridge_topic(pattern, direction, qos, local_prefix, remote_prefix)
}

/// A `[bridges.queue]` in `dir`: 64 MiB in 1 MiB segments.
fn disk_queue(dir: std::path::PathBuf, fsync: &str, ack: &str) -> tollgate::bridge_config::BridgeQueueConfig {
    tollgate::bridge_config::BridgeQueueConfig {
        dir,
        max_mb: 64,
        segment_mb: 1,
        fsync: fsync.into(),
        fsync_interval_ms: 200,
        ack: ack.into(),
    }
}

fn bridge_to(port: u16, topics: Vec<BridgeTopicConfig>) -> BridgeConfig {
    BridgeConfig { client_id: Some("site-1".into()), ..bridge_config(&format!("127.0.0.1:{port}"), topics) }
}

async fn site_with(bridge: BridgeConfig, plugins: Vec<PluginConfig>) -> TestBroker {
    TestBroker::builder()
        .configure(|config| {
            config.bridges = vec![bridge];
            config.plugins = plugins;
            config.runtime.plugin_cache_dir = Some(PathBuf::new());
        })
        .start()
        .await
}

fn stats(site: &TestBroker) -> Arc<BridgeStats> {
    site.server.bridges()[0].stats.clone()
}

fn count(counter: &std::sync::atomic::AtomicU64) -> u64 {
    BridgeStats::get(counter)
}

async fn wait_connected(site: &TestBroker) {
    wait_until("the bridge to connect", || stats(site).connected.load(Ordering::Relaxed)).await;
}

/// Publishes `probe` on the remote until it arrives at the site: the bridge's remote subscription is in place.
/// Then lets both clients go quiet, so no late probe (or the remote's own copies) reaches what a test reads next.
async fn wait_until_ingress_flows(remote: &mut v5::Client, site_subscriber: &mut v5::Client, probe: (&str, &str)) {
    within("the bridge's remote subscription", async {
        loop {
            remote.publish(probe.0, QoS::AtLeastOnce, false, b"probe").await;
            if let Some(publish) = site_subscriber.publish_within(Duration::from_millis(200)).await {
                assert_eq!(topic(&publish), probe.1);
                return;
            }
        }
    })
    .await;
    while site_subscriber.publish_within(QUIET).await.is_some() {}
    while remote.publish_within(Duration::ZERO).await.is_some() {}
}

/// Topics (and payloads) received until `last` arrives.
async fn topics_until(client: &mut v5::Client, last: &str) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    loop {
        let publish = client.next_publish().await;
        let entry = (topic(&publish), String::from_utf8_lossy(&publish.payload).into_owned());
        let done = entry.0 == last;
        seen.push(entry);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn route_decisions_cross_a_bridge_both_ways_through_both_runtimes() {
    let kinds = [
        ("wasm", wasm_build::wasm_plugin("testkit-wasm")),
        ("lua", wasm_build::workspace_root().join("tests/plugins/testkit.lua")),
    ];
    for (kind, path) in kinds {
        let remote = TestBroker::start().await;
        let router = PluginConfig {
            name: "router".into(),
            kind: kind.into(),
            path,
            hooks: Some(vec!["route".into()]),
            limits: PluginLimitsConfig::default(),
            on_failure: Default::default(),
            cache_decisions: false,
            secrets: Default::default(),
            config: Default::default(),
            files: Default::default(),
        };
        // Out: the site's `site/...` goes to the remote without the prefix. In: the remote's `cloud/...` comes
        // in without it. The route hook sees the topic the message will have on arrival.
        let site = site_with(
            bridge_to(remote.port(), vec![mapping("#", "out", 2, "site/", ""), mapping("#", "in", 2, "", "cloud/")]),
            vec![router],
        )
        .await;
        wait_connected(&site).await;
        let mut remote_client = connect_to(&remote, "cloud-app").await;
        remote_client.subscribe_ok("#", QoS::ExactlyOnce).await;
        let mut site_client = connect_to(&site, "site-app").await;
        site_client.subscribe_ok("#", QoS::ExactlyOnce).await;
        wait_until_ingress_flows(&mut remote_client, &mut site_client, ("cloud/plain/probe", "plain/probe")).await;

        // Egress: dropped, rewritten, forwarded (the ingress-only rule does not apply going out).
        for (topic, payload) in
            [("site/local/x", "never"), ("site/bridge/x", "rewritten"), ("site/outbound-only/o", "out")]
        {
            site_client.publish(topic, QoS::AtLeastOnce, false, payload.as_bytes()).await;
        }
        site_client.publish("site/plain/end", QoS::ExactlyOnce, false, b"end").await;
        let egress: Vec<(String, String)> = topics_until(&mut remote_client, "plain/end")
            .await
            .into_iter()
            .filter(|(topic, _)| !topic.starts_with("cloud/"))
            .collect();
        let expected_egress = [("remote/x", "rewritten"), ("outbound-only/o", "out"), ("plain/end", "end")]
            .map(|(topic, payload)| (topic.to_owned(), payload.to_owned()));
        assert_eq!(egress, expected_egress, "{kind}: what reached the remote");

        // Ingress: dropped, rewritten, dropped because it is coming in, forwarded at QoS 2.
        for (topic, payload) in
            [("cloud/local/y", "never"), ("cloud/bridge/y", "rewritten"), ("cloud/outbound-only/i", "never")]
        {
            remote_client.publish(topic, QoS::AtLeastOnce, false, payload.as_bytes()).await;
        }
        remote_client.publish("cloud/plain/end", QoS::ExactlyOnce, false, b"end").await;
        let ingress: Vec<(String, String)> = topics_until(&mut site_client, "plain/end")
            .await
            .into_iter()
            .filter(|(topic, _)| !topic.starts_with("site/"))
            .collect();
        let expected_ingress = [("remote/y", "rewritten"), ("plain/end", "end")]
            .map(|(topic, payload)| (topic.to_owned(), payload.to_owned()));
        assert_eq!(ingress, expected_ingress, "{kind}: what reached the site");

        let stats = stats(&site);
        // The QoS 2 exchange out finished (PUBREC, PUBREL, PUBCOMP): nothing left in flight.
        wait_until("the bridge's in-flight window to empty", || count(&stats.inflight) == 0).await;
        assert_eq!(count(&stats.dropped_by_policy), 3, "{kind}: local/x out, local/y and outbound-only/i in");
        assert_eq!(count(&stats.sent), 3, "{kind}");
        assert!(count(&stats.received) >= 3, "{kind}: probes, remote/y and plain/end");
        let status = site.server.status();
        assert_eq!(status["bridges"][0]["name"], "cloud");
        assert_eq!(status["bridges"][0]["connected"], true);
        site.stop().await;
        remote.stop().await;
    }
}

#[tokio::test]
async fn a_two_way_mapping_does_not_loop() {
    let remote = TestBroker::start().await;
    let site = site_with(bridge_to(remote.port(), vec![mapping("chat/#", "both", 1, "", "")]), Vec::new()).await;
    wait_connected(&site).await;
    let mut remote_client = connect_to(&remote, "remote-chat").await;
    remote_client.subscribe_ok("chat/#", QoS::AtLeastOnce).await;
    let mut site_client = connect_to(&site, "site-chat").await;
    site_client.subscribe_ok("chat/#", QoS::AtLeastOnce).await;
    // The bridge's subscription on the remote arrives after its CONNACK; wait for it.
    wait_until_ingress_flows(&mut remote_client, &mut site_client, ("chat/probe", "chat/probe")).await;

    site_client.publish("chat/from-site", QoS::AtLeastOnce, false, b"1").await;
    remote_client.publish("chat/from-remote", QoS::AtLeastOnce, false, b"2").await;
    let mut at_site = vec![topic(&site_client.next_publish().await), topic(&site_client.next_publish().await)];
    let mut at_remote = vec![topic(&remote_client.next_publish().await), topic(&remote_client.next_publish().await)];
    at_site.sort();
    at_remote.sort();
    assert_eq!(at_site, ["chat/from-remote", "chat/from-site"]);
    assert_eq!(at_remote, ["chat/from-remote", "chat/from-site"]);
    // Nothing comes back around.
    site_client.expect_no_publish(QUIET).await;
    remote_client.expect_no_publish(Duration::ZERO).await;
    assert_eq!(count(&stats(&site).sent), 1, "only chat/from-site went out");
    site.stop().await;
    remote.stop().await;
}

/// A Mosquitto broker on a fixed loopback port, stopped when dropped.
struct Mosquitto {
    _process: external::Background,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start_mosquitto(binary: &std::path::Path, dir: &std::path::Path, port: u16, extra: &str) -> Mosquitto {
    let config = dir.join("mosquitto.conf");
    std::fs::write(&config, format!("listener {port} 127.0.0.1\nallow_anonymous true\n{extra}")).unwrap();
    let process = external::spawn(tokio::process::Command::new(binary).arg("-c").arg(&config));
    within("mosquitto to listen", async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    Mosquitto { _process: process }
}

fn mosquitto_binary() -> Option<PathBuf> {
    // Debian installs the broker in /usr/sbin, which is not on every user's PATH.
    let sbin = PathBuf::from("/usr/sbin/mosquitto");
    if sbin.is_file() && !external::skip_external() {
        return Some(sbin);
    }
    require_tool("mosquitto", "apt-get install mosquitto")
}

/// A TCP relay standing for the site's uplink: it can be cut (live connections dropped, new ones closed at once)
/// and restored, while the brokers on both sides keep running.
struct Uplink {
    port: u16,
    up: Arc<AtomicBool>,
    pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Uplink {
    async fn to(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(AtomicBool::new(true));
        let pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, pipes) = (up.clone(), pipes.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue;
                    }
                    pipes.lock().unwrap().push(tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    }));
                }
            }
        });
        Self { port, up, pipes, accept }
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for pipe in self.pipes.lock().unwrap().drain(..) {
            pipe.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Uplink {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test]
async fn a_bridge_to_mosquitto_loses_nothing_across_an_uplink_outage() {
    let Some(mosquitto) = mosquitto_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _remote = start_mosquitto(&mosquitto, dir.path(), port, "").await;
    let uplink = Uplink::to(port).await;
    // The cloud watches the site's bridge state: `online` retained, `offline` as the bridge's will.
    let mut watcher_options = rumqttc::v5::MqttOptions::new("cloud-watcher", "127.0.0.1", port);
    watcher_options.set_keep_alive(Duration::from_secs(30));
    let (mut watcher, _) = v5::connect(watcher_options).await;
    watcher.subscribe_ok("sites/1/bridge/state", QoS::AtLeastOnce).await;
    let site = site_with(
        BridgeConfig {
            remote_status_topic: Some("sites/1/bridge/state".into()),
            ..bridge_to(
                uplink.port,
                vec![mapping("telemetry/#", "out", 1, "", "sites/1/"), mapping("cmd/#", "in", 1, "", "sites/1/")],
            )
        },
        Vec::new(),
    )
    .await;
    wait_connected(&site).await;
    assert_eq!(&watcher.next_publish().await.payload[..], b"online");
    let mut site_client = connect_to(&site, "car-gateway").await;
    site_client.subscribe_ok("cmd/#", QoS::AtLeastOnce).await;

    // Mosquitto is a real remote: commands come in, telemetry goes out.
    let mut options = rumqttc::v5::MqttOptions::new("cloud-backend", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (mut cloud, _) = v5::connect(options).await;
    cloud.subscribe_ok("sites/1/telemetry/#", QoS::AtLeastOnce).await;
    within("a command through the bridge", async {
        loop {
            cloud.publish("sites/1/cmd/probe", QoS::AtLeastOnce, false, b"probe").await;
            if let Some(publish) = site_client.publish_within(Duration::from_millis(200)).await {
                assert_eq!(topic(&publish), "cmd/probe");
                return;
            }
        }
    })
    .await;
    site_client.publish("telemetry/speed", QoS::AtLeastOnce, false, b"0").await;
    assert_eq!(topic(&cloud.next_publish().await), "sites/1/telemetry/speed");
    // Cut only once Mosquitto's PUBACK is in: otherwise the message is rightly sent again after the outage.
    wait_until("the telemetry to be acknowledged", || count(&stats(&site).inflight) == 0).await;
    while site_client.publish_within(QUIET).await.is_some() {} // late probes

    // The uplink goes down. The site keeps taking telemetry (the bridge's queue), the cloud keeps sending
    // commands (Mosquitto keeps them in the bridge's persistent session).
    uplink.cut();
    wait_until("the bridge to notice the outage", || !stats(&site).connected.load(Ordering::Relaxed)).await;
    assert_eq!(&watcher.next_publish().await.payload[..], b"offline", "Mosquitto published the bridge's will");
    for index in 0..20 {
        site_client.publish(&format!("telemetry/seq/{index}"), QoS::AtLeastOnce, false, b"x").await;
    }
    for index in 0..5 {
        cloud.publish(&format!("sites/1/cmd/seq/{index}"), QoS::AtLeastOnce, false, b"y").await;
    }
    cloud.expect_no_publish(QUIET).await;
    uplink.restore();

    let received: Vec<String> = within("the backlog after the outage", async {
        let mut received = Vec::new();
        while received.len() < 20 {
            received.push(topic(&cloud.next_publish().await));
        }
        received
    })
    .await;
    let expected: Vec<String> = (0..20).map(|index| format!("sites/1/telemetry/seq/{index}")).collect();
    assert_eq!(received, expected, "every message, in order, once");
    let commands: Vec<String> = within("the commands sent during the outage", async {
        let mut commands = Vec::new();
        while commands.len() < 5 {
            commands.push(topic(&site_client.next_publish().await));
        }
        commands
    })
    .await;
    let expected: Vec<String> = (0..5).map(|index| format!("cmd/seq/{index}")).collect();
    assert_eq!(commands, expected, "commands queued by Mosquitto for the bridge's session");
    assert_eq!(&watcher.next_publish().await.payload[..], b"online", "back online");
    cloud.expect_no_publish(QUIET).await;
    assert!(count(&stats(&site).connects) >= 2);
    site.stop().await;
    // A clean DISCONNECT discards the will, so the bridge says it itself.
    assert_eq!(&watcher.next_publish().await.payload[..], b"offline", "said on a clean stop");
}

#[tokio::test]
async fn a_bridge_over_mutual_tls_reaches_a_remote_that_requires_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    tollgate::certs::init(&certs, &["localhost".into(), "127.0.0.1".into()], 30, false).expect("certs init");
    let subject =
        tollgate::certs::ClientSubject { common_name: "site-gw-1".into(), san_uris: Vec::new(), subject_serial: None };
    tollgate::certs::client(&certs, &subject, "site-gw-1", 30, false).expect("client certificate");
    let remote = TestBroker::builder()
        .configure(|config| {
            let listener = &mut config.listeners[0];
            listener.protocol = "tls".into();
            listener.cert = Some(certs.join("server.pem"));
            listener.key = Some(certs.join("server.key"));
            listener.client_ca = Some(certs.join("ca.pem"));
            listener.require_client_cert = true;
        })
        .start()
        .await;
    let tls = |client_certificate: bool| tollgate::bridge_config::BridgeTlsConfig {
        ca_file: certs.join("ca.pem"),
        cert: client_certificate.then(|| certs.join("site-gw-1.pem")),
        key: client_certificate.then(|| certs.join("site-gw-1.key")),
        server_name: Some("localhost".into()),
        alpn: Vec::new(),
    };

    // Without a client certificate the remote refuses the handshake: the bridge keeps trying, never connected.
    let mut refused = bridge_to(remote.port(), vec![mapping("up/#", "out", 1, "", "")]);
    refused.tls = Some(tls(false));
    let refused_site = site_with(refused, Vec::new()).await;

    let mut bridge = bridge_to(remote.port(), vec![mapping("up/#", "out", 1, "", "")]);
    bridge.tls = Some(tls(true));
    let site = site_with(bridge, Vec::new()).await;
    wait_connected(&site).await;
    let mut cloud =
        v5::connect(tollgate_integration_tests::tls::tls_options(remote.addr, "cloud-app", &certs, Some("site-gw-1")))
            .await
            .0;
    cloud.subscribe_ok("up/#", QoS::AtLeastOnce).await;
    let mut site_client = connect_to(&site, "sensor").await;
    site_client.publish("up/temperature", QoS::AtLeastOnce, false, b"21").await;
    let publish = cloud.next_publish().await;
    assert_eq!((topic(&publish), &publish.payload[..]), ("up/temperature".to_owned(), &b"21"[..]));

    // The state is kept retained in `$SYS` on each site.
    for (broker, expected) in [(&site, "connected"), (&refused_site, "disconnected")] {
        let mut watcher = connect_to(broker, "watcher").await;
        watcher.subscribe_ok("$SYS/broker/bridges/cloud/state", QoS::AtMostOnce).await;
        let state = watcher.next_publish().await;
        assert!(state.retain);
        assert_eq!(&state.payload[..], expected.as_bytes());
    }
    assert!(!stats(&refused_site).connected.load(Ordering::Relaxed));
    assert_eq!(count(&stats(&refused_site).connects), 0, "no link without a client certificate");
    refused_site.stop().await;
    site.stop().await;
    remote.stop().await;
}

#[tokio::test]
async fn a_message_the_remote_refuses_is_counted_and_the_rest_keep_flowing() {
    let remote = TestBroker::builder().acl("topic readwrite allowed/#\n").start().await;
    let site = site_with(bridge_to(remote.port(), vec![mapping("#", "out", 1, "", "")]), Vec::new()).await;
    wait_connected(&site).await;
    let mut cloud = connect_to(&remote, "cloud-app").await;
    cloud.subscribe_ok("allowed/#", QoS::AtLeastOnce).await;
    let mut site_client = connect_to(&site, "sensor").await;
    // The remote answers PUBACK 0x87 to the first: the bridge does not send it again and moves on.
    site_client.publish("forbidden/a", QoS::AtLeastOnce, false, b"x").await;
    site_client.publish("allowed/b", QoS::AtLeastOnce, false, b"y").await;
    assert_eq!(topic(&cloud.next_publish().await), "allowed/b");
    wait_until("the refusal to be counted", || count(&stats(&site).refused_by_remote) == 1).await;
    cloud.expect_no_publish(QUIET).await;
    assert_eq!(count(&stats(&site).refused_by_remote), 1, "refused once, not retried");
    site.stop().await;
    remote.stop().await;
}

/// A remote over its quota answers PUBACK 0x97 (here Tollgate's `max_publish_bytes_rate`, four 1 KiB messages per
/// second per connection): the bridge backs off and sends again instead of dropping, from memory and from disk.
/// Every message arrives, first arrivals in order; resends of what was in flight may come twice.
#[tokio::test]
async fn a_busy_remote_is_given_time_and_loses_nothing() {
    let remote = TestBroker::builder()
        .configure(|config| {
            config.limits.max_publish_bytes_rate = 4_096;
        })
        .start()
        .await;
    let mut cloud = connect_to(&remote, "cloud-app").await;
    cloud.subscribe_ok("up/#", QoS::AtLeastOnce).await;
    let queue_dir = tempfile::tempdir().unwrap();
    for disk in [false, true] {
        let mut bridge = bridge_to(remote.port(), vec![mapping("up/#", "out", 1, "", "")]);
        if disk {
            bridge.queue = Some(disk_queue(queue_dir.path().join("cloud"), "never", "after_durable"));
        }
        let site = site_with(bridge, Vec::new()).await;
        wait_connected(&site).await;
        let mut sensor = connect_to(&site, "sensor").await;
        let payload = [b'x'; 1024];
        for index in 0..10 {
            sensor.publish(&format!("up/{disk}/{index}"), QoS::AtLeastOnce, false, &payload).await;
        }
        let expected: Vec<String> = (0..10).map(|index| format!("up/{disk}/{index}")).collect();
        let mut first_arrivals: Vec<String> = Vec::new();
        within("all ten at the remote", async {
            while first_arrivals.len() < expected.len() {
                let arrived = topic(&cloud.next_publish().await);
                if !first_arrivals.contains(&arrived) {
                    first_arrivals.push(arrived);
                }
            }
        })
        .await;
        assert_eq!(first_arrivals, expected, "disk queue: {disk}");
        assert!(count(&stats(&site).remote_busy) >= 2, "ten 1 KiB messages at four a second per link");
        assert_eq!(count(&stats(&site).refused_by_remote), 0, "busy is not a refusal");
        site.stop().await;
        while cloud.publish_within(QUIET).await.is_some() {}
    }
    remote.stop().await;
}

/// `message_id_property`: every forwarded message carries an id in a user property, and a resend carries the
/// same one, so the cloud can drop a duplicate; from the memory queue and from the disk queue. The remote here is
/// scripted on a raw socket: it takes the first message, hangs up without acknowledging it, then acknowledges
/// everything on the next link.
#[tokio::test]
async fn a_resent_message_carries_the_id_it_was_first_sent_with() {
    use tollgate_integration_tests::raw::RawClient;
    use tollgate_protocol::{Ack, ConnAck, Packet, ProtocolVersion, ReasonCode};

    let queue_dir = tempfile::tempdir().unwrap();
    for disk in [false, true] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(String, bool, String)>();
        let remote = tokio::spawn(async move {
            for link in 0..2 {
                let (socket, _) = listener.accept().await.unwrap();
                let mut remote = RawClient::new(socket, ProtocolVersion::V5, "scripted remote");
                assert!(matches!(remote.expect_packet().await, Packet::Connect(_)));
                let connack = ConnAck {
                    session_present: link > 0,
                    reason_code: ReasonCode::SUCCESS,
                    properties: Default::default(),
                };
                remote.send(&Packet::ConnAck(connack)).await;
                loop {
                    let Packet::Publish(publish) = remote.expect_packet().await else { continue };
                    let id = publish
                        .properties
                        .user_properties
                        .iter()
                        .find(|property| property.key == "x-bridge-id")
                        .map(|property| property.value.clone())
                        .unwrap_or_default();
                    seen_tx.send((publish.topic.to_string(), publish.dup, id)).unwrap();
                    if link == 0 {
                        break; // hang up without PUBACK
                    }
                    remote.send(&Packet::PubAck(Ack::new(publish.packet_id.unwrap(), ReasonCode::SUCCESS))).await;
                }
            }
        });
        let mut bridge = bridge_to(port, vec![mapping("up/#", "out", 1, "", "")]);
        bridge.message_id_property = Some("x-bridge-id".into());
        if disk {
            bridge.queue = Some(disk_queue(queue_dir.path().join("cloud"), "never", "after_durable"));
        }
        let site = site_with(bridge, Vec::new()).await;
        let mut sensor = connect_to(&site, "sensor").await;
        sensor.publish("up/1", QoS::AtLeastOnce, false, b"x").await;
        let (topic_1, dup_1, first) = within("the first send", seen.recv()).await.unwrap();
        let (topic_2, dup_2, again) = within("the resend", seen.recv()).await.unwrap();
        assert_eq!((topic_1.as_str(), dup_1, topic_2.as_str(), dup_2), ("up/1", false, "up/1", true), "disk: {disk}");
        assert!(!first.is_empty(), "an id on the first send");
        assert_eq!(first, again, "the resend carries the same id (disk: {disk})");
        sensor.publish("up/2", QoS::AtLeastOnce, false, b"y").await;
        let (topic_3, _, other) = within("the next message", seen.recv()).await.unwrap();
        assert_eq!(topic_3, "up/2");
        assert_ne!(other, first, "a new message, a new id");
        let instance = |id: &str| id.rsplit_once('-').map(|(instance, _)| instance.to_owned());
        assert_eq!(instance(&other), instance(&first), "one bridge, one instance part");
        site.stop().await;
        remote.abort();
    }
}

/// `max_send_rate`: a backlog leaves at the configured pace (a cloud's per-connection limit), from memory and
/// from disk, still all of it and in order. 30 messages at 20 a second with a burst of 2 take at least 1.4 s.
#[tokio::test]
async fn a_paced_bridge_sends_no_faster_than_its_rate() {
    let cloud = TestBroker::start().await;
    let mut backend = connect_to(&cloud, "backend").await;
    backend.subscribe_ok("up/#", QoS::AtLeastOnce).await;
    let uplink = Uplink::to(cloud.port()).await;
    let queue_dir = tempfile::tempdir().unwrap();
    for disk in [false, true] {
        uplink.cut();
        let mut bridge = bridge_to(uplink.port, vec![mapping("up/#", "out", 1, "", "")]);
        bridge.max_send_rate = 20;
        if disk {
            bridge.queue = Some(disk_queue(queue_dir.path().join("cloud"), "never", "after_durable"));
        }
        let site = site_with(bridge, Vec::new()).await;
        let mut sensor = connect_to(&site, "sensor").await;
        for index in 0..30 {
            sensor.publish(&format!("up/{disk}/{index}"), QoS::AtLeastOnce, false, b"x").await;
        }
        uplink.restore();
        let (first_at, received) = within("the paced backlog", async {
            let first = topic(&backend.next_publish().await);
            let first_at = std::time::Instant::now();
            let mut received = vec![first];
            while received.len() < 30 {
                received.push(topic(&backend.next_publish().await));
            }
            (first_at, received)
        })
        .await;
        let took = first_at.elapsed();
        let expected: Vec<String> = (0..30).map(|index| format!("up/{disk}/{index}")).collect();
        assert_eq!(received, expected);
        assert!(took >= Duration::from_millis(1300), "30 messages at 20/s arrived within {took:?} (disk: {disk})");
        site.stop().await;
    }
    cloud.stop().await;
}

/// The bridge's counters reach `$SYS/broker/bridges/<name>/…` (retained, on the `$SYS` interval), so a site can
/// be watched over MQTT: what was sent, what waits, what was refused.
#[tokio::test]
async fn bridge_counters_are_published_under_sys() {
    let remote = TestBroker::builder().acl("topic readwrite allowed/#\n").start().await;
    let bridge = bridge_to(remote.port(), vec![mapping("#", "out", 1, "", "")]);
    let site = TestBroker::builder()
        .configure(|config| {
            config.bridges = vec![bridge];
            config.sys.interval = 1;
        })
        .start()
        .await;
    wait_connected(&site).await;
    let mut sensor = connect_to(&site, "sensor").await;
    for index in 0..3 {
        sensor.publish(&format!("allowed/{index}"), QoS::AtLeastOnce, false, b"x").await;
    }
    sensor.publish("forbidden/x", QoS::AtLeastOnce, false, b"x").await;
    wait_until("the refusal to be counted", || count(&stats(&site).refused_by_remote) == 1).await;
    let mut watcher = connect_to(&site, "watcher").await;
    watcher.subscribe_ok("$SYS/broker/bridges/cloud/#", QoS::AtMostOnce).await;
    let mut seen = std::collections::HashMap::new();
    within("the counters as the bridge counted them", async {
        while seen.get("sent").map(String::as_str) != Some("4")
            || seen.get("refused_by_remote").map(String::as_str) != Some("1")
            || !seen.contains_key("queued")
            || !seen.contains_key("state")
        {
            let publish = watcher.next_publish().await;
            let name = topic(&publish).rsplit('/').next().unwrap().to_owned();
            seen.insert(name, String::from_utf8_lossy(&publish.payload).into_owned());
        }
    })
    .await;
    assert_eq!(seen["state"], "connected");
    site.stop().await;
    remote.stop().await;
}

/// `proxy`: the link goes through an HTTP proxy's CONNECT tunnel, with Basic credentials; a proxy that refuses
/// (407 here) leaves the bridge unconnected, retrying. The proxy is a small one in the test.
#[tokio::test]
async fn a_bridge_reaches_its_remote_through_an_http_proxy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let remote = TestBroker::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::<String>::new()));
    let proxy = tokio::spawn({
        let requests = requests.clone();
        async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let requests = requests.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    while !head.ends_with(b"\r\n\r\n") {
                        match client.read_u8().await {
                            Ok(byte) => head.push(byte),
                            Err(_) => return,
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    requests.lock().unwrap().push(head.clone());
                    // "site:secret"
                    if !head.contains("Proxy-Authorization: Basic c2l0ZTpzZWNyZXQ=\r\n") {
                        let _ = client.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n").await;
                        return;
                    }
                    let target = head.split_whitespace().nth(1).unwrap_or_default().to_owned();
                    let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await else { return };
                    let _ = client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                });
            }
        }
    });
    let mut refused = bridge_to(remote.port(), vec![mapping("up/#", "out", 1, "", "")]);
    refused.proxy = Some(format!("http://site:wrong@127.0.0.1:{proxy_port}"));
    let refused_site = site_with(refused, Vec::new()).await;

    let mut bridge = bridge_to(remote.port(), vec![mapping("up/#", "out", 1, "", "")]);
    bridge.proxy = Some(format!("http://site:secret@127.0.0.1:{proxy_port}/"));
    let site = site_with(bridge, Vec::new()).await;
    wait_connected(&site).await;
    let mut backend = connect_to(&remote, "backend").await;
    backend.subscribe_ok("up/#", QoS::AtLeastOnce).await;
    let mut sensor = connect_to(&site, "sensor").await;
    sensor.publish("up/through-the-proxy", QoS::AtLeastOnce, false, b"x").await;
    assert_eq!(topic(&backend.next_publish().await), "up/through-the-proxy");
    let expected = format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n", remote.port());
    assert!(requests.lock().unwrap().iter().all(|head| head.starts_with(&expected)), "{:?}", requests.lock().unwrap());
    wait_until("the refused bridge to try twice", || requests.lock().unwrap().len() >= 3).await;
    assert_eq!(count(&stats(&refused_site).connects), 0, "no link through a proxy that refuses");
    refused_site.stop().await;
    site.stop().await;
    proxy.abort();
    remote.stop().await;
}

/// `tls.alpn`: the bridge offers the configured protocols in its TLS handshake. The remote here is a TLS front in
/// the test that, like AWS IoT Core on port 443, serves MQTT only to a client that negotiated `x-amzn-mqtt-ca`,
/// and relays it to a plain broker.
#[tokio::test]
async fn a_bridge_offers_its_alpn_protocol_to_a_remote_that_requires_it() {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    tollgate::certs::init(&certs, &["localhost".into()], 30, false).expect("certs init");
    let remote = TestBroker::start().await;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(certs.join("server.pem")).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(certs.join("server.key")).unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    server.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let front_port = listener.local_addr().unwrap().port();
    let negotiated = Arc::new(Mutex::new(Vec::<Option<Vec<u8>>>::new()));
    let front = tokio::spawn({
        let (negotiated, remote_port) = (negotiated.clone(), remote.port());
        async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, negotiated) = (acceptor.clone(), negotiated.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                    let protocol = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
                    let served = protocol.as_deref() == Some(&b"x-amzn-mqtt-ca"[..]);
                    negotiated.lock().unwrap().push(protocol);
                    if served && let Ok(mut upstream) = tokio::net::TcpStream::connect(("127.0.0.1", remote_port)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                    }
                });
            }
        }
    });
    let tls = |alpn: Vec<String>| tollgate::bridge_config::BridgeTlsConfig {
        ca_file: certs.join("ca.pem"),
        cert: None,
        key: None,
        server_name: Some("localhost".into()),
        alpn,
    };
    let mut without = bridge_to(front_port, vec![mapping("up/#", "out", 1, "", "")]);
    without.tls = Some(tls(Vec::new()));
    let without_site = site_with(without, Vec::new()).await;
    let mut bridge = bridge_to(front_port, vec![mapping("up/#", "out", 1, "", "")]);
    bridge.tls = Some(tls(vec!["x-amzn-mqtt-ca".into()]));
    let site = site_with(bridge, Vec::new()).await;
    wait_connected(&site).await;
    let mut backend = connect_to(&remote, "backend").await;
    backend.subscribe_ok("up/#", QoS::AtLeastOnce).await;
    let mut sensor = connect_to(&site, "sensor").await;
    sensor.publish("up/alpn", QoS::AtLeastOnce, false, b"x").await;
    assert_eq!(topic(&backend.next_publish().await), "up/alpn");
    wait_until("the bridge without ALPN to be turned away twice", || {
        negotiated.lock().unwrap().iter().filter(|protocol| protocol.is_none()).count() >= 2
    })
    .await;
    assert_eq!(count(&stats(&without_site).connects), 0);
    without_site.stop().await;
    site.stop().await;
    front.abort();
    remote.stop().await;
}

/// `priority = "high"`: with a disk queue, what a high-priority mapping takes waits in its own lane, which drains
/// first after an outage (crash events before the telemetry queued ahead of them), and which the other lane's
/// size budget never touches; both lanes survive a restart.
#[tokio::test]
async fn high_priority_messages_leave_first_after_an_outage() {
    let cloud = TestBroker::start().await;
    let mut backend = connect_to(&cloud, "backend").await;
    backend.subscribe_ok("#", QoS::AtLeastOnce).await;
    let uplink = Uplink::to(cloud.port()).await;
    uplink.cut();
    let queue_dir = tempfile::tempdir().unwrap();
    let configured = || {
        let mut events = mapping("events/#", "out", 1, "", "");
        events.priority = Some("high".into());
        let mut bridge = bridge_to(uplink.port, vec![mapping("telemetry/#", "out", 1, "", ""), events]);
        bridge.queue = Some(disk_queue(queue_dir.path().join("cloud"), "never", "after_durable"));
        bridge
    };
    let site = site_with(configured(), Vec::new()).await;
    let mut sensor = connect_to(&site, "sensor").await;
    for index in 0..10 {
        sensor.publish(&format!("telemetry/{index}"), QoS::AtLeastOnce, false, b"x").await;
    }
    for index in 0..3 {
        sensor.publish(&format!("events/crash/{index}"), QoS::AtLeastOnce, false, b"!").await;
    }
    drop(sensor);
    // A restart in between: both lanes are on disk.
    site.stop().await;
    assert!(queue_dir.path().join("cloud").join("high").is_dir(), "the high lane has its own journal");
    let site = site_with(configured(), Vec::new()).await;
    uplink.restore();
    let received: Vec<String> = within("the backlog", async {
        let mut received = Vec::new();
        while received.len() < 13 {
            received.push(topic(&backend.next_publish().await));
        }
        received
    })
    .await;
    let mut expected: Vec<String> = (0..3).map(|index| format!("events/crash/{index}")).collect();
    expected.extend((0..10).map(|index| format!("telemetry/{index}")));
    assert_eq!(received, expected);
    backend.expect_no_publish(QUIET).await;
    site.stop().await;
    cloud.stop().await;
}

/// A Mosquitto bridge with its defaults (`try_private`: CONNECT's protocol level with 0x80 set) is accepted at
/// its first attempt, and a two-way mapping does not echo: what comes in over it is not sent back to it.
#[tokio::test]
async fn a_mosquitto_bridge_announcing_itself_is_accepted_and_not_echoed() {
    let Some(binary) = mosquitto_binary() else { return };
    let cloud = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let bridge = format!(
        "connection tollgate\naddress 127.0.0.1:{}\ntopic up/# both 1\nbridge_protocol_version mqttv311\n\
         restart_timeout 30\n",
        cloud.port()
    );
    let _mosquitto = start_mosquitto(&binary, dir.path(), port, &bridge).await;
    // Subscribed on Tollgate at the first attempt: after a refusal Mosquitto would wait 30 s to try again.
    cloud.wait_for_subscriptions(1).await;
    let mosquitto_client = |id: &str| {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options
    };
    let (mut site_app, _) = v4::connect(mosquitto_client("site-app")).await;
    site_app.subscribe_ok("up/#", rumqttc::QoS::AtLeastOnce).await;
    let mut cloud_app = connect_to(&cloud, "cloud-app").await;
    cloud_app.subscribe_ok("up/#", QoS::AtLeastOnce).await;

    let (mut site_sensor, _) = v4::connect(mosquitto_client("site-sensor")).await;
    site_sensor.publish("up/from-site", rumqttc::QoS::AtLeastOnce, false, b"x").await;
    assert_eq!(topic(&cloud_app.next_publish().await), "up/from-site");
    assert_eq!(v4::topic(&site_app.next_publish().await), "up/from-site");
    site_app.expect_no_publish(QUIET).await;

    let mut cloud_sensor = connect_to(&cloud, "cloud-sensor").await;
    cloud_sensor.publish("up/from-cloud", QoS::AtLeastOnce, false, b"y").await;
    assert_eq!(v4::topic(&site_app.next_publish().await), "up/from-cloud");
    assert_eq!(topic(&cloud_app.next_publish().await), "up/from-cloud");
    cloud_app.expect_no_publish(QUIET).await;
    site_app.expect_no_publish(QUIET).await;
    cloud.stop().await;
}

/// `try_private = true`: a 3.1.1 bridge announces itself, so a Mosquitto remote sends nothing back over it and a
/// two-way mapping, refused on 3.1.1 without it, does not loop.
#[tokio::test]
async fn a_v311_bridge_with_try_private_maps_both_ways_to_mosquitto_without_a_loop() {
    let Some(binary) = mosquitto_binary() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _mosquitto = start_mosquitto(&binary, dir.path(), port, "").await;
    let mut bridge = bridge_to(port, vec![mapping("up/#", "both", 1, "", "")]);
    bridge.protocol = "v311".into();
    bridge.try_private = true;
    let site = site_with(bridge, Vec::new()).await;
    wait_connected(&site).await;
    let mosquitto_client = |id: &str| {
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options
    };
    let (mut remote_app, _) = v4::connect(mosquitto_client("remote-app")).await;
    remote_app.subscribe_ok("up/#", rumqttc::QoS::AtLeastOnce).await;
    let mut site_app = connect_to(&site, "site-app").await;
    site_app.subscribe_ok("up/#", QoS::AtLeastOnce).await;
    wait_until_ingress_flows_v4(&mut remote_app, &mut site_app, port).await;

    let mut sensor = connect_to(&site, "sensor").await;
    sensor.publish("up/from-site", QoS::AtLeastOnce, false, b"x").await;
    assert_eq!(v4::topic(&remote_app.next_publish().await), "up/from-site");
    assert_eq!(topic(&site_app.next_publish().await), "up/from-site");
    site_app.expect_no_publish(QUIET).await;
    let (mut remote_sensor, _) = v4::connect(mosquitto_client("remote-sensor")).await;
    remote_sensor.publish("up/from-remote", rumqttc::QoS::AtLeastOnce, false, b"y").await;
    assert_eq!(topic(&site_app.next_publish().await), "up/from-remote");
    assert_eq!(v4::topic(&remote_app.next_publish().await), "up/from-remote");
    remote_app.expect_no_publish(QUIET).await;
    site_app.expect_no_publish(QUIET).await;
    site.stop().await;
}

/// Probes from the remote until the site sees one: the bridge's subscription on the remote is in place. The
/// probes' copies are taken off both subscribers.
async fn wait_until_ingress_flows_v4(remote_app: &mut v4::Client, site_app: &mut v5::Client, port: u16) {
    let mut options = rumqttc::MqttOptions::new("probe", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    let (mut probe, _) = v4::connect(options).await;
    within("the remote's messages to reach the site", async {
        loop {
            probe.publish("up/probe", rumqttc::QoS::AtMostOnce, false, b"?").await;
            if site_app.publish_within(Duration::from_millis(200)).await.is_some() {
                return;
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    while site_app.publish_within(Duration::from_millis(50)).await.is_some() {}
    while remote_app.publish_within(Duration::from_millis(50)).await.is_some() {}
}

/// A remote's CONNACK limits are obeyed: with Maximum QoS 1 (AWS IoT Core's) a QoS 2 message crosses at QoS 1,
/// with Maximum QoS 0 at QoS 0 (and the local window is not held by it), and with Retain Available 0 nothing is
/// sent retained; either would otherwise be a protocol error the remote disconnects for. The remote is scripted.
#[tokio::test]
async fn a_remote_s_maximum_qos_and_retain_available_are_obeyed() {
    use tollgate_integration_tests::raw::RawClient;
    use tollgate_protocol::{Ack, ConnAck, Packet, ProtocolVersion, ReasonCode};

    for (max_qos, queue) in [(1u8, false), (1, true), (0, false)] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<(String, u8, bool)>();
        let remote = tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut remote = RawClient::new(socket, ProtocolVersion::V5, "scripted remote");
            assert!(matches!(remote.expect_packet().await, Packet::Connect(_)));
            let mut connack =
                ConnAck { session_present: false, reason_code: ReasonCode::SUCCESS, properties: Default::default() };
            connack.properties.maximum_qos = Some(max_qos);
            connack.properties.retain_available = Some(0);
            remote.send(&Packet::ConnAck(connack)).await;
            loop {
                let Packet::Publish(publish) = remote.expect_packet().await else { continue };
                seen_tx.send((publish.topic.to_string(), publish.qos as u8, publish.retain)).unwrap();
                if let Some(packet_id) = publish.packet_id {
                    remote.send(&Packet::PubAck(Ack::new(packet_id, ReasonCode::SUCCESS))).await;
                }
            }
        });
        let queue_dir = tempfile::tempdir().unwrap();
        let mut bridge = bridge_to(port, vec![mapping("up/#", "out", 2, "", "")]);
        bridge.max_inflight = 2;
        if queue {
            bridge.queue = Some(disk_queue(queue_dir.path().join("cloud"), "never", "after_durable"));
        }
        let site = site_with(bridge, Vec::new()).await;
        wait_connected(&site).await;
        let mut sensor = connect_to(&site, "sensor").await;
        // More messages than the window: a copy held for an acknowledgement that never comes would stall them.
        for index in 0..4 {
            sensor.publish(&format!("up/{index}"), QoS::ExactlyOnce, true, b"x").await;
        }
        for index in 0..4 {
            let (topic, qos, retain) = within("the next message at the remote", seen.recv()).await.unwrap();
            assert_eq!(topic, format!("up/{index}"));
            assert!(qos <= max_qos, "QoS {qos} sent to a remote that takes {max_qos} at most (disk: {queue})");
            assert!(!retain, "sent retained to a remote without retained messages");
        }
        site.stop().await;
        remote.abort();
    }
}

#[tokio::test]
async fn a_remote_that_stops_answering_pings_is_left_and_dialled_again() {
    // A remote that accepts the connection and then goes silent (a dead cellular link looks like this).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let silent = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buffer = [0u8; 1024];
                    if socket.read(&mut buffer).await.unwrap_or(0) == 0 {
                        return;
                    }
                    // CONNACK (MQTT 5): session not present, success, no properties. Nothing after it.
                    let _ = socket.write_all(&[0x20, 0x03, 0x00, 0x00, 0x00]).await;
                    while socket.read(&mut buffer).await.unwrap_or(0) > 0 {}
                });
            }
        }
    });
    let mut bridge = bridge_to(port, vec![mapping("a/#", "out", 1, "", "")]);
    bridge.keepalive = 1;
    let site = site_with(bridge, Vec::new()).await;
    wait_connected(&site).await;
    let started = std::time::Instant::now();
    // No PINGRESP within the keep-alive after a PINGREQ: the link is dropped and dialled again.
    wait_until("a second link", || count(&stats(&site).connects) >= 2).await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(1500), "left too early: {elapsed:?}");
    assert!(accepted.load(Ordering::SeqCst) >= 2);
    silent.abort();
    site.stop().await;
}

/// `examples/bridge` as shipped: its `site.toml` (ports moved to free ones) with its route policy, against a
/// plain broker standing for the cloud, driven by the Mosquitto command-line clients as its README shows.
#[tokio::test]
async fn the_bridge_example_keeps_diagnostics_on_site_and_lets_in_only_allowed_commands() {
    let Some(mosquitto_pub) = require_tool("mosquitto_pub", "apt-get install mosquitto-clients") else { return };
    let root = wasm_build::workspace_root();
    let cloud = TestBroker::start().await;
    let dir = tempfile::tempdir().unwrap();
    let site_toml = std::fs::read_to_string(root.join("examples/bridge/site.toml"))
        .unwrap()
        .replace("127.0.0.1:1885", &cloud.addr.to_string())
        .replace("127.0.0.1:1884", "127.0.0.1:0")
        .replace("examples/bridge/route.lua", &root.join("examples/bridge/route.lua").to_string_lossy())
        .replace("target/example-bridge-queue/cloud", &dir.path().join("queue").to_string_lossy());
    let path = dir.path().join("site.toml");
    std::fs::write(&path, site_toml).unwrap();
    let example = tollgate::config::load(Some(&path)).unwrap_or_else(|problems| panic!("{problems:?}"));
    let site = TestBroker::builder()
        .configure(|config| {
            config.bridges = example.bridges;
            config.plugins = example.plugins;
            config.runtime.plugin_cache_dir = Some(PathBuf::new());
        })
        .start()
        .await;
    wait_connected(&site).await;
    let mut cloud_watch = connect_to(&cloud, "cloud-watch").await;
    cloud_watch.subscribe_ok("sites/#", QoS::AtLeastOnce).await;
    // The site's state on the cloud (`remote_status_topic`) comes first: the bridge sends it before anything else.
    let status = cloud_watch.next_publish().await;
    assert_eq!((topic(&status), &status.payload[..]), ("sites/dealer-42/bridge/state".to_owned(), &b"online"[..]));
    let mut site_watch = connect_to(&site, "site-watch").await;
    site_watch.subscribe_ok("cmd/#", QoS::AtLeastOnce).await;
    // The bridge's own subscription on the cloud: wait until it is there (the cloud watcher is the other one).
    cloud.wait_for_subscriptions(2).await;

    let publish = |port: u16, topic: &str, payload: &str| {
        let mut command = tokio::process::Command::new(&mosquitto_pub);
        command.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic, "-m", payload]);
        command
    };
    const VIN: &str = "1J9RP1A36A1644345";
    for (port, topic, payload) in [
        (site.port(), format!("telemetry/{VIN}/debug/can"), "raw frames"),
        (site.port(), format!("telemetry/{VIN}/speed"), "0"),
        (cloud.port(), format!("sites/dealer-42/cmd/{VIN}/open-hood"), "now"),
        (cloud.port(), format!("sites/dealer-42/cmd/{VIN}/unlock"), "now"),
    ] {
        let output = external::run(&mut publish(port, &topic, payload), Duration::from_secs(10)).await;
        assert!(output.status.success(), "{}", external::describe(&output));
    }
    // The cloud watcher also sees the commands published on the cloud itself, in whatever order they overtake the
    // bridged telemetry.
    let up = within("telemetry at the cloud", async {
        loop {
            let publish = cloud_watch.next_publish().await;
            if !topic(&publish).starts_with("sites/dealer-42/cmd/") {
                return publish;
            }
        }
    })
    .await;
    assert_eq!(topic(&up), format!("sites/dealer-42/telemetry/{VIN}/speed"), "the debug message stayed on site");
    let down = site_watch.next_publish().await;
    assert_eq!(topic(&down), format!("cmd/{VIN}/unlock"), "open-hood was refused");
    site_watch.expect_no_publish(QUIET).await;
    assert_eq!(count(&stats(&site).dropped_by_policy), 2);
    assert!(dir.path().join("queue").is_dir(), "the example's disk queue is in use");
    site.stop().await;
    cloud.stop().await;
}

/// With `[bridges.queue]`, what waits for the remote is on disk: it outlives an outage and a restart of the site
/// broker, and reaches the cloud in order once the uplink is back.
#[tokio::test]
async fn a_bridge_with_a_disk_queue_loses_nothing_across_an_outage_and_a_restart() {
    let cloud = TestBroker::start().await;
    let uplink = Uplink::to(cloud.port()).await;
    let queue_dir = tempfile::tempdir().unwrap();
    let durable = || {
        let mut bridge = bridge_to(uplink.port, vec![mapping("up/#", "out", 1, "", "")]);
        // Acknowledged on routing: a clean stop still spools what the local queue holds (the killed-broker test
        // below covers `after_durable`).
        bridge.queue = Some(disk_queue(queue_dir.path().join("cloud"), "always", "immediate"));
        bridge
    };
    let site = site_with(durable(), Vec::new()).await;
    wait_connected(&site).await;
    let mut backend = connect_to(&cloud, "backend").await;
    backend.subscribe_ok("up/#", QoS::AtLeastOnce).await;
    let mut sensor = connect_to(&site, "sensor").await;
    sensor.publish("up/first", QoS::AtLeastOnce, false, b"0").await;
    assert_eq!(topic(&backend.next_publish().await), "up/first");
    // Cut only once the cloud's PUBACK is in: otherwise up/first is rightly sent again after the outage.
    wait_until("up/first to be acknowledged", || count(&stats(&site).inflight) == 0).await;

    uplink.cut();
    wait_until("the bridge to notice the outage", || !stats(&site).connected.load(Ordering::Relaxed)).await;
    for index in 0..30 {
        sensor.publish(&format!("up/seq/{index}"), QoS::AtLeastOnce, false, format!("{index}").as_bytes()).await;
    }
    sensor.disconnect().await;
    // The site broker restarts while the uplink is still down.
    assert!(site.stop().await);
    let site = site_with(durable(), Vec::new()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stats(&site).connected.load(Ordering::Relaxed), "the uplink is still down");
    uplink.restore();
    let received: Vec<(String, String)> = within("the backlog after the restart", async {
        let mut received = Vec::new();
        while received.len() < 30 {
            let publish = backend.next_publish().await;
            received.push((topic(&publish), String::from_utf8_lossy(&publish.payload).into_owned()));
        }
        received
    })
    .await;
    let expected: Vec<(String, String)> = (0..30).map(|index| (format!("up/seq/{index}"), index.to_string())).collect();
    assert_eq!(received, expected, "every message, in order, once");
    backend.expect_no_publish(QUIET).await;
    wait_until("the journal to empty", || count(&stats(&site).queued) == 0 && count(&stats(&site).inflight) == 0).await;
    site.stop().await;
    cloud.stop().await;
}

/// What `ack = "after_durable"` rests on: a publisher's PUBACK (3.1.1 and 5) and PUBREC wait until a durable local
/// client (a disk queue's) has let go of its copy; a message it does not take is answered at once.
#[tokio::test]
async fn an_acknowledgement_waits_for_a_durable_subscriber_to_let_go_of_its_copy() {
    use tollgate_integration_tests::raw;
    use tollgate_protocol::{Packet, ProtocolVersion, QoS as Level, ReasonCode, SubscriptionOptions};

    let site = TestBroker::start().await;
    let durable = site.broker().durable_local_client("$bridge/disk");
    let options =
        SubscriptionOptions { qos: Level::ExactlyOnce, no_local: true, retain_as_published: true, retain_handling: 0 };
    durable.subscribe("up/#", options).unwrap();
    let address = std::net::SocketAddr::from(([127, 0, 0, 1], site.port()));
    for version in [ProtocolVersion::V5, ProtocolVersion::V311] {
        let mut publisher = raw::tcp(address, version).await;
        publisher.connect_ok(version, "sensor").await;
        for (qos, packet_id) in [(Level::AtLeastOnce, 1), (Level::ExactlyOnce, 2)] {
            publisher.send(&Packet::Publish(raw::publish_packet("up/1", qos, Some(packet_id), b"x"))).await;
            assert!(
                publisher.recv_within(QUIET).await.is_none(),
                "{version:?} {qos:?}: answered before the copy was let go of"
            );
            let batch = durable.try_batch(8, 8);
            assert_eq!(batch.len(), 1);
            let taken = batch[0].1.unwrap();
            drop(batch);
            assert!(publisher.recv_within(QUIET).await.is_none(), "the copy is still in flight");
            assert!(durable.complete(taken));
            match (qos, publisher.expect_packet().await) {
                (Level::AtLeastOnce, Packet::PubAck(ack)) | (Level::ExactlyOnce, Packet::PubRec(ack)) => {
                    assert_eq!((ack.packet_id, ack.reason_code), (packet_id, ReasonCode::SUCCESS));
                }
                (_, other) => panic!("{version:?} {qos:?}: expected its acknowledgement, got {other:?}"),
            }
            if qos == Level::ExactlyOnce {
                publisher.send(&Packet::PubRel(tollgate_protocol::Ack::new(packet_id, ReasonCode::SUCCESS))).await;
                assert!(matches!(publisher.expect_packet().await, Packet::PubComp(_)));
            }
        }
        let unmatched = publisher.publish_qos1(raw::publish_packet("other/1", Level::AtLeastOnce, Some(3), b"x")).await;
        let expected =
            if version == ProtocolVersion::V5 { ReasonCode::NO_MATCHING_SUBSCRIBERS } else { ReasonCode::SUCCESS };
        assert_eq!(unmatched, expected);
        publisher.disconnect().await;
    }
    drop(durable);
    site.stop().await;
}

/// The `tollgate` binary with a disk queue, killed with SIGKILL (no shutdown, no final sync) right after its last
/// PUBACK while the uplink is down, then started again: everything it had acknowledged to publishers reaches the
/// cloud.
#[tokio::test]
async fn a_disk_queue_outlives_a_killed_broker() {
    let cloud = TestBroker::start().await;
    let uplink = Uplink::to(cloud.port()).await;
    uplink.cut();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("site.toml");
    std::fs::write(
        &config,
        format!(
            "[[listeners]]\nbind = \"127.0.0.1:{port}\"\n\n[runtime]\nadmin_socket = \"{}\"\n\n\
             [[bridges]]\nname = \"cloud\"\naddress = \"127.0.0.1:{}\"\n\
             reconnect_min_ms = 50\nreconnect_max_ms = 200\n\
             topics = [{{ pattern = \"up/#\", direction = \"out\", qos = 1 }}]\n\
             queue = {{ dir = \"{}\", fsync = \"always\" }}\n",
            dir.path().join("admin.sock").display(),
            uplink.port,
            dir.path().join("queue").display()
        ),
    )
    .unwrap();
    let mut site = external::run_broker(&config, port).await;
    let options = |id: &str| {
        let mut options = rumqttc::v5::MqttOptions::new(id, "127.0.0.1", port);
        options.set_keep_alive(Duration::from_secs(30));
        options
    };
    let (mut sensor, _) = v5::connect(options("sensor")).await;
    for index in 0..25 {
        sensor.publish(&format!("up/seq/{index}"), QoS::AtLeastOnce, false, b"x").await;
    }
    // No waiting for the spooler: with `ack = "after_durable"` (the default) each PUBACK came after the message's
    // fsync, so the plug is pulled the moment the last one arrives.
    site.signal("KILL");
    site.wait(Duration::from_secs(10)).await;
    drop(sensor);

    let mut backend = connect_to(&cloud, "backend").await;
    backend.subscribe_ok("up/#", QoS::AtLeastOnce).await;
    let _site = external::run_broker(&config, port).await;
    uplink.restore();
    let received: Vec<String> = within("the backlog after the crash", async {
        let mut received = Vec::new();
        while received.len() < 25 {
            received.push(topic(&backend.next_publish().await));
        }
        received
    })
    .await;
    let expected: Vec<String> = (0..25).map(|index| format!("up/seq/{index}")).collect();
    assert_eq!(received, expected);
    backend.expect_no_publish(QUIET).await;
    cloud.stop().await;
}

#[tokio::test]
async fn a_reload_restarts_changed_bridges_starts_new_ones_and_leaves_the_rest() {
    let remote = TestBroker::start().await;
    let named = |name: &str, topics| BridgeConfig {
        name: name.into(),
        client_id: Some(format!("site-{name}")),
        ..bridge_to(remote.port(), topics)
    };
    let site = TestBroker::builder()
        .configure(|config| {
            config.bridges = vec![
                named("cloud", vec![mapping("a/#", "out", 1, "", "")]),
                named("steady", vec![mapping("s/#", "out", 1, "", "")]),
                named("retired", vec![mapping("r/#", "out", 1, "", "")]),
            ];
        })
        .start()
        .await;
    let handles = site.server.bridges();
    for handle in &handles {
        wait_until(&format!("{} to connect", handle.name), || handle.stats.connected.load(Ordering::Relaxed)).await;
    }
    // The same configuration changes nothing.
    let summary = site.server.reload(&site.config).await.unwrap();
    assert_eq!(summary.bridges_changed, 0);

    let mut changed = site.config.clone();
    changed.bridges[0].topics.push(mapping("b/#", "out", 1, "", ""));
    changed.bridges.remove(2);
    changed.bridges.push(named("added", vec![mapping("n/#", "out", 1, "", "")]));
    let summary = site.server.reload(&changed).await.unwrap();
    assert_eq!(summary.bridges_changed, 4, "cloud stopped and started, retired stopped, added started");
    let names: Vec<String> = site.server.bridges().iter().map(|handle| handle.name.clone()).collect();
    assert_eq!(names, ["cloud", "steady", "added"]);
    assert!(!handles[2].stats.connected.load(Ordering::Relaxed), "the removed bridge is gone");
    assert!(handles[1].stats.connected.load(Ordering::Relaxed), "the unchanged bridge kept its link");
    assert_eq!(count(&handles[1].stats.connects), 1);

    // The changed bridge carries its new mapping, the added one its own.
    for handle in site.server.bridges() {
        wait_until(&format!("{} to connect", handle.name), || handle.stats.connected.load(Ordering::Relaxed)).await;
    }
    let mut cloud = connect_to(&remote, "cloud-app").await;
    cloud.subscribe_ok("#", QoS::AtLeastOnce).await;
    let mut sensor = connect_to(&site, "sensor").await;
    for topic in ["b/1", "n/1", "r/1", "s/1"] {
        sensor.publish(topic, QoS::AtLeastOnce, false, b"x").await;
    }
    let mut received = vec![
        topic(&cloud.next_publish().await),
        topic(&cloud.next_publish().await),
        topic(&cloud.next_publish().await),
    ];
    received.sort();
    assert_eq!(received, ["b/1", "n/1", "s/1"], "r/ went with its bridge");
    cloud.expect_no_publish(QUIET).await;
    site.stop().await;
    remote.stop().await;
}

#[tokio::test]
async fn a_bridge_falls_back_to_its_next_address_when_the_primary_does_not_answer() {
    let remote = TestBroker::start().await;
    let silent_primary = free_port();
    let site = site_with(
        BridgeConfig {
            fallback_addresses: vec![format!("127.0.0.1:{}", remote.port())],
            primary_retry_s: 1,
            ..bridge_to(silent_primary, vec![mapping("up/#", "out", 1, "", "")])
        },
        Vec::new(),
    )
    .await;
    wait_connected(&site).await;
    let mut cloud = connect_to(&remote, "cloud-app").await;
    cloud.subscribe_ok("up/#", QoS::AtLeastOnce).await;
    let mut sensor = connect_to(&site, "sensor").await;
    sensor.publish("up/via-fallback", QoS::AtLeastOnce, false, b"x").await;
    assert_eq!(topic(&cloud.next_publish().await), "up/via-fallback");

    // The primary comes up: probed every second (`primary_retry_s`), it is taken back.
    let primary = TestBroker::builder()
        .configure(|config| config.listeners[0].bind = format!("127.0.0.1:{silent_primary}"))
        .start()
        .await;
    let mut primary_app = connect_to(&primary, "primary-app").await;
    primary_app.subscribe_ok("up/#", QoS::AtLeastOnce).await;
    wait_until("the bridge to go back to the primary", || {
        count(&stats(&site).connects) >= 2 && stats(&site).connected.load(Ordering::Relaxed)
    })
    .await;
    sensor.publish("up/via-primary", QoS::AtLeastOnce, false, b"y").await;
    assert_eq!(topic(&primary_app.next_publish().await), "up/via-primary");
    cloud.expect_no_publish(QUIET).await;
    site.stop().await;
    primary.stop().await;
    remote.stop().await;
}
