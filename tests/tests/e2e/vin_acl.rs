//! The shipped `vin-acl` plugin end to end: cars with client certificates from `tollgate certs` on a mutual-TLS
//! listener, an OTA backend on TCP, rumqttc as the client. A car reaches its own VIN's topics and nothing else, by
//! any filter, shared subscription, will or retained message.

#![allow(clippy::unwrap_used)]

use crate::wasm_build;

use std::path::{Path, PathBuf};

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, DisconnectReasonCode, PubAckReason, SubscribeReasonCode};
use tollgate::config::{Config, ListenerConfig, PluginConfig};
use tollgate_integration_tests::tls::tls_options;
use tollgate_integration_tests::v5::{self, Acked, topic};
use tollgate_integration_tests::{QUIET, TestBroker};

const VIN: &str = "1J9RP1A36A1644345";
const OTHER_VIN: &str = "1G1BN53E6NW128495";
/// VIN with a wrong North-American check digit (position 17 changed).
const BAD_VIN: &str = "1J9RP1A36A1644346";

fn make_certs(dir: &Path) -> PathBuf {
    let certs = dir.join("certs");
    tollgate::certs::init(&certs, &["localhost".into(), "127.0.0.1".into()], 30, false).unwrap();
    for vin in [VIN, OTHER_VIN, BAD_VIN] {
        let subject = tollgate::certs::ClientSubject {
            common_name: format!("TCU {vin}"),
            san_uris: vec![format!("urn:vin:{vin}")],
            subject_serial: None,
        };
        tollgate::certs::client(&certs, &subject, vin, 30, false).unwrap();
    }
    certs
}

fn vin_acl() -> PluginConfig {
    let config = serde_json::json!({
        "client_id_policy": "equal",
        "check_digit": "regional",
        "rules": [
            { "id": "vehicle-uplink", "allow": ["publish"],
              "topics": ["vehicle/updates/${vin}/progress", "vehicle/updates/${vin}/status"] },
            { "id": "vehicle-downlink", "allow": ["subscribe"], "topics": ["vehicle/updates/${vin}"] },
            { "id": "backend", "who": "role:backend", "allow": ["publish", "subscribe"], "topics": ["vehicle/#"] }
        ],
        "roles": [ { "name": "backend", "match": "username=ota-backend" } ]
    });
    PluginConfig {
        name: "vin-acl".into(),
        kind: "wasm".into(),
        path: wasm_build::wasm_plugin("vin-acl"),
        hooks: None,
        limits: Default::default(),
        on_failure: Default::default(),
        cache_decisions: true,
        secrets: Default::default(),
        config: config.as_object().unwrap().clone(),
        files: Default::default(),
    }
}

async fn broker(certs: &Path) -> TestBroker {
    broker_with(certs, vin_acl()).await
}

async fn broker_with(certs: &Path, plugin: PluginConfig) -> TestBroker {
    broker_configured(certs, plugin, |_| {}).await
}

/// A broker with a mutual-TLS listener (first address) and a TCP one, running `plugin`; `more` adjusts the rest.
async fn broker_configured(certs: &Path, plugin: PluginConfig, more: impl FnOnce(&mut Config)) -> TestBroker {
    TestBroker::builder()
        .configure(|config: &mut Config| {
            let mut tls = ListenerConfig::tcp("127.0.0.1:0");
            tls.protocol = "tls".into();
            tls.cert = Some(certs.join("server.pem"));
            tls.key = Some(certs.join("server.key"));
            tls.client_ca = Some(certs.join("ca.pem"));
            tls.require_client_cert = true;
            config.listeners = vec![tls, ListenerConfig::tcp("127.0.0.1:0")];
            config.plugins = vec![plugin];
            config.runtime.plugin_cache_dir = Some(PathBuf::new());
            more(config);
        })
        .start()
        .await
}

#[tokio::test]
async fn a_car_reaches_only_its_own_vin() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let broker = broker(&certs).await;
    let (tls, tcp) = (broker.server.addresses[0], broker.server.addresses[1]);

    let mut backend_options = rumqttc::v5::MqttOptions::new("backend", "127.0.0.1", tcp.port());
    backend_options.set_credentials("ota-backend", "");
    let (mut backend, _) = v5::connect(backend_options).await;
    backend.subscribe_ok("vehicle/updates/+/+", QoS::AtLeastOnce).await;
    // A retained update for the other car must not reach this one through any filter.
    backend.publish(&format!("vehicle/updates/{OTHER_VIN}"), QoS::AtLeastOnce, true, b"other's firmware").await;

    let (mut car, _) = v5::connect(tls_options(tls, VIN, &certs, Some(VIN))).await;
    car.subscribe_ok(&format!("vehicle/updates/{VIN}"), QoS::AtLeastOnce).await;
    for filter in [
        "vehicle/updates/+".to_owned(),
        "vehicle/updates/#".to_owned(),
        "vehicle/#".to_owned(),
        "#".to_owned(),
        format!("vehicle/updates/{OTHER_VIN}"),
        "$share/fleet/vehicle/updates/+".to_owned(),
    ] {
        assert_eq!(car.subscribe(&filter, QoS::AtLeastOnce).await, SubscribeReasonCode::NotAuthorized, "{filter}");
    }
    car.expect_no_publish(QUIET).await;

    // The OTA flow: the backend sends the car its update, the car reports progress.
    backend.publish(&format!("vehicle/updates/{VIN}"), QoS::AtLeastOnce, false, b"firmware 2.1").await;
    let update = car.next_publish().await;
    assert_eq!((topic(&update), &update.payload[..]), (format!("vehicle/updates/{VIN}"), &b"firmware 2.1"[..]));
    car.publish(&format!("vehicle/updates/{VIN}/progress"), QoS::AtLeastOnce, false, b"42%").await;
    let progress = backend.next_publish().await;
    assert_eq!(topic(&progress), format!("vehicle/updates/{VIN}/progress"));

    // Writing as another car, or outside its topics, is refused with 0x87.
    for topic in [format!("vehicle/updates/{OTHER_VIN}/status"), format!("vehicle/updates/{VIN}")] {
        let acked = car.publish_with(&topic, QoS::AtLeastOnce, false, b"forged", None).await;
        assert_eq!(acked, Acked::PubAck(PubAckReason::NotAuthorized), "{topic}");
    }
    backend.expect_no_publish(QUIET).await;
    car.disconnect().await;
    backend.disconnect().await;
    assert!(broker.stop().await);
}

#[tokio::test]
async fn bad_identities_client_ids_and_foreign_wills_are_refused_at_connect() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let broker = broker(&certs).await;
    let tls = broker.server.addresses[0];
    // A certificate whose VIN has a wrong check digit.
    assert_eq!(
        v5::refused_code(tls_options(tls, BAD_VIN, &certs, Some(BAD_VIN))).await,
        ConnectReturnCode::NotAuthorized
    );
    // A good certificate with a client id that is not its VIN (a session takeover attempt).
    assert_eq!(
        v5::refused_code(tls_options(tls, OTHER_VIN, &certs, Some(VIN))).await,
        ConnectReturnCode::ClientIdentifierNotValid
    );
    let with_will_on = |vin: &str| {
        let mut options = tls_options(tls, VIN, &certs, Some(VIN));
        let topic = format!("vehicle/updates/{vin}/status");
        options.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
            topic,
            "offline",
            QoS::AtLeastOnce,
            false,
            None,
        ));
        options
    };
    // A will on another car's topic is refused; one on its own status topic is fine.
    assert_eq!(v5::refused_code(with_will_on(OTHER_VIN)).await, ConnectReturnCode::NotAuthorized);
    v5::connect(with_will_on(VIN)).await.0.disconnect().await;
    // No certificate, no user name: no identity, no access.
    let mut anonymous = rumqttc::v5::MqttOptions::new("anon", "127.0.0.1", broker.server.addresses[1].port());
    anonymous.set_keep_alive(std::time::Duration::from_secs(30));
    let (mut nobody, _) = v5::connect(anonymous).await;
    assert_eq!(nobody.subscribe("vehicle/#", QoS::AtLeastOnce).await, SubscribeReasonCode::NotAuthorized);
    nobody.disconnect().await;
    assert!(broker.stop().await);
}

#[tokio::test]
async fn revocation_ends_a_live_cars_session_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let revoked = dir.path().join("revoked.txt");
    std::fs::write(&revoked, "# VINs and serial:<hex>, one per line\n").unwrap();
    let mut plugin = vin_acl();
    plugin.files.insert("revoked".into(), revoked.clone());
    let broker = broker_with(&certs, plugin).await;
    let tls = broker.server.addresses[0];
    let (mut car, _) = v5::connect(tls_options(tls, VIN, &certs, Some(VIN))).await;
    car.subscribe_ok(&format!("vehicle/updates/{VIN}"), QoS::AtLeastOnce).await;
    let (mut other, _) = v5::connect(tls_options(tls, OTHER_VIN, &certs, Some(OTHER_VIN))).await;
    other.subscribe_ok(&format!("vehicle/updates/{OTHER_VIN}"), QoS::AtLeastOnce).await;
    assert_eq!(broker.subscription_count(), 2);

    std::fs::write(&revoked, format!("# stolen\n{VIN}\n")).unwrap();
    let started = std::time::Instant::now();
    broker.server.reload(&broker.config).await.unwrap();
    assert_eq!(car.expect_server_disconnect().await, DisconnectReasonCode::NotAuthorized);
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "took {:?}", started.elapsed());
    assert_eq!(broker.subscription_count(), 1, "the revoked car's subscription is gone; the other car's stays");
    assert_eq!(v5::refused_code(tls_options(tls, VIN, &certs, Some(VIN))).await, ConnectReturnCode::NotAuthorized);
    other.expect_no_publish(QUIET).await;
    other.disconnect().await;
    assert!(broker.stop().await);
}

/// `identities_active` (kept by vin-acl's session hook): up when a car connects, down when it leaves, whether it
/// disconnects itself or a revocation throws it out.
#[tokio::test]
async fn identities_active_follows_cars_coming_and_going() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let revoked = dir.path().join("revoked.txt");
    std::fs::write(&revoked, "").unwrap();
    let mut plugin = vin_acl();
    plugin.files.insert("revoked".into(), revoked.clone());
    let rules = plugin.config["rules"].as_array_mut().unwrap();
    rules.push(serde_json::json!({ "id": "ops", "who": "role:backend", "allow": ["subscribe"],
        "topics": ["$SYS/broker/plugins/vin-acl/gauges/#"] }));
    let broker = broker_configured(&certs, plugin, |config| config.sys.interval = 1).await;
    let (tls, tcp) = (broker.server.addresses[0], broker.server.addresses[1]);
    let mut watcher_options = rumqttc::v5::MqttOptions::new("ops", "127.0.0.1", tcp.port());
    watcher_options.set_credentials("ota-backend", "");
    let (mut watcher, _) = v5::connect(watcher_options).await;
    watcher.subscribe_ok("$SYS/broker/plugins/vin-acl/gauges/identities_active", QoS::AtMostOnce).await;
    let mut active = async |wanted: &str| {
        tollgate_integration_tests::within(&format!("identities_active = {wanted}"), async {
            while &watcher.next_publish().await.payload[..] != wanted.as_bytes() {}
        })
        .await;
    };

    let (car, _) = v5::connect(tls_options(tls, VIN, &certs, Some(VIN))).await;
    let (other, _) = v5::connect(tls_options(tls, OTHER_VIN, &certs, Some(OTHER_VIN))).await;
    active("2").await;
    std::fs::write(&revoked, format!("{VIN}\n")).unwrap();
    broker.server.reload(&broker.config).await.unwrap();
    active("1").await;
    other.disconnect().await;
    active("0").await;
    drop(car);
    assert!(broker.stop().await);
}

#[tokio::test]
async fn an_end_of_line_station_reaches_its_namespace_only() {
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    for station in ["EOL-ABC123", "EOL-XYZ789"] {
        let subject =
            tollgate::certs::ClientSubject { common_name: station.into(), san_uris: vec![], subject_serial: None };
        tollgate::certs::client(&certs, &subject, station, 30, false).unwrap();
    }
    let mut plugin = vin_acl();
    plugin.config.insert(
        "non_vin_identities".into(),
        serde_json::json!([{ "pattern": "EOL-[0-9A-Z]{6,12}", "namespace": "preprod" }]),
    );
    let rules = plugin.config.get_mut("rules").and_then(|rules| rules.as_array_mut()).unwrap();
    rules.push(serde_json::json!({ "id": "eol", "who": "preprod", "allow": ["publish", "subscribe"],
                                   "topics": ["eol/${id}/#"] }));
    let broker = broker_with(&certs, plugin).await;
    let tls = broker.server.addresses[0];

    let (mut station, _) = v5::connect(tls_options(tls, "EOL-ABC123", &certs, Some("EOL-ABC123"))).await;
    station.subscribe_ok("eol/EOL-ABC123/config", QoS::AtLeastOnce).await;
    for filter in ["eol/+/config", "eol/EOL-XYZ789/#", &format!("vehicle/updates/{VIN}")] {
        assert_eq!(station.subscribe(filter, QoS::AtLeastOnce).await, SubscribeReasonCode::NotAuthorized, "{filter}");
    }
    station.publish("eol/EOL-ABC123/config", QoS::AtLeastOnce, false, b"flash profile 7").await;
    let own = station.next_publish().await;
    assert_eq!((topic(&own), &own.payload[..]), ("eol/EOL-ABC123/config".to_owned(), &b"flash profile 7"[..]));
    let forged = station.publish_with("eol/EOL-XYZ789/result", QoS::AtLeastOnce, false, b"pass", None).await;
    assert_eq!(forged, Acked::PubAck(PubAckReason::NotAuthorized));

    // A station's certificate cannot pose as another client id, and a car's topics stay closed to it.
    assert_eq!(
        v5::refused_code(tls_options(tls, "EOL-XYZ789", &certs, Some("EOL-ABC123"))).await,
        ConnectReturnCode::ClientIdentifierNotValid
    );
    station.disconnect().await;
    assert!(broker.stop().await);
}
