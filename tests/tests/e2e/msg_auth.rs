//! The shipped `msg-auth` plugin end to end: a backend's signed commands reach subscribers with their signature;
//! unsigned, tampered and replayed ones are refused with PUBACK 0x87 (0x99 when malformed), across a broker
//! restart too; an MQTT 3.1.1 publisher of a bad command is disconnected when configured so.

#![allow(clippy::unwrap_used)]

use crate::wasm_build;

use std::path::Path;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{PubAckReason, PublishProperties};
use tollgate::config::{Config, PluginConfig};
use tollgate_integration_tests::v5::{self, Acked};
use tollgate_integration_tests::{QUIET, TestBroker, v4};
use tollgate_sig::{Algorithm, Covered, PREVIOUS_PROPERTY, PROPERTY, Present, Signature, derive_info, keys};

const VIN: &str = "1M8GDM9AXKP042788";
const CLOUD_KEY: &[u8] = b"cloud key of at least 32 bytes!!";
const SITE_MASTER: &[u8] = b"site master key, 32 bytes long!!";

fn msg_auth() -> PluginConfig {
    let config = serde_json::json!({
        "site_id": "site-0042",
        "on_fail_v3": "disconnect",
        "keys": [ { "kid": "cloud-2026", "secret": "cloud" } ],
        "rules": [ {
            "id": "commands", "mode": "verify", "topics": ["v1/vehicles/+/cmd/#"],
            "accept_kids": ["cloud-*"], "require": ["ts", "ctr", "sub"], "sub_level": 2
        } ]
    });
    PluginConfig {
        name: "msg-auth".into(),
        kind: "wasm".into(),
        path: wasm_build::wasm_plugin("msg-auth"),
        hooks: None,
        limits: Default::default(),
        on_failure: Default::default(),
        cache_decisions: false,
        secrets: [("cloud".to_owned(), format!("hex:{}", hex(CLOUD_KEY)))].into(),
        config: config.as_object().unwrap().clone(),
        files: Default::default(),
    }
}

/// msg-auth with the site's per-car key `vin-1` as well: HKDF of the site master for each VIN, the key a car holds.
fn msg_auth_with_car_keys() -> PluginConfig {
    let mut plugin = msg_auth();
    plugin.secrets.insert("site-master".into(), format!("hex:{}", hex(SITE_MASTER)));
    let keys = plugin.config["keys"].as_array_mut().unwrap();
    keys.push(serde_json::json!({ "kid": "vin-1", "secret": "site-master", "derive": "vin-mac-v1:${sub}" }));
    plugin
}

/// A car subscribed to its commands, and a backend.
async fn car_and_backend(broker: &TestBroker) -> (v5::Client, v5::Client) {
    let mut car = v5::connect_to(broker, "car").await;
    car.subscribe_ok("v1/vehicles/+/cmd/#", QoS::AtLeastOnce).await;
    (car, v5::connect_to(broker, "backend").await)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn broker(state: &Path) -> TestBroker {
    broker_with(state, msg_auth()).await
}

async fn broker_with(state: &Path, plugin: PluginConfig) -> TestBroker {
    let state = state.to_path_buf();
    TestBroker::builder()
        .configure(move |config: &mut Config| {
            config.plugins = vec![plugin];
            config.runtime.plugin_cache_dir = Some(std::path::PathBuf::new());
            config.runtime.state_dir = Some(state);
        })
        .start()
        .await
}

fn command_topic() -> String {
    format!("v1/vehicles/{VIN}/cmd/unlock/req")
}

/// What a backend does: sign with the key it shares with the broker, send the header as a user property.
fn signed(topic: &str, payload: &[u8], ctr: u64) -> PublishProperties {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut signature = Signature {
        kid: "cloud-2026".into(),
        sub: VIN.into(),
        iss: "cloud".into(),
        ts: now,
        ctr,
        present: Present { sub: true, iss: true, ts: true, ctr: true, nonce: false, exp: false },
        ..Signature::default()
    };
    keys::sign(CLOUD_KEY, &mut signature, &Covered { topic, payload, ..Covered::default() }, 32).expect("signed");
    PublishProperties { user_properties: vec![(PROPERTY.into(), signature.header())], ..Default::default() }
}

#[tokio::test]
async fn signed_commands_pass_and_forged_or_replayed_ones_are_refused_across_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let broker = broker(state.path()).await;
    let (mut car, mut backend) = car_and_backend(&broker).await;
    let topic = command_topic();

    let good = signed(&topic, b"unlock", 1);
    let acked = backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(good.clone())).await;
    assert_eq!(acked, Acked::PubAck(PubAckReason::Success));
    let delivered = car.next_publish().await;
    let header = delivered.properties.as_ref().map(|p| p.user_properties.clone()).unwrap_or_default();
    assert_eq!(header, good.user_properties, "the signature travels on to the subscriber");

    let refused = Acked::PubAck(PubAckReason::NotAuthorized);
    // Replayed, tampered payload, unsigned, and signed for another topic.
    assert_eq!(backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(good.clone())).await, refused);
    let fresh = signed(&topic, b"unlock", 2);
    assert_eq!(backend.publish_with(&topic, QoS::AtLeastOnce, false, b"UNLOCK", Some(fresh.clone())).await, refused);
    assert_eq!(backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", None).await, refused);
    let lock_topic = format!("v1/vehicles/{VIN}/cmd/lock/req");
    assert_eq!(
        backend.publish_with(&lock_topic, QoS::AtLeastOnce, false, b"unlock", Some(fresh.clone())).await,
        refused
    );
    let garbled =
        PublishProperties { user_properties: vec![(PROPERTY.into(), "v1;alg=hs256".into())], ..Default::default() };
    assert_eq!(
        backend.publish_with(&topic, QoS::AtLeastOnce, false, b"x", Some(garbled)).await,
        Acked::PubAck(PubAckReason::PayloadFormatInvalid)
    );
    car.expect_no_publish(QUIET).await;
    // The untouched message with counter 2 still passes: refusals never moved the replay window.
    assert_eq!(
        backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(fresh.clone())).await,
        Acked::PubAck(PubAckReason::Success)
    );
    car.next_publish().await;
    backend.disconnect().await;
    car.disconnect().await;
    assert!(broker.stop().await);

    // After a restart with the same state directory the replay window is where it was.
    let broker = self::broker(state.path()).await;
    let mut backend = v5::connect_to(&broker, "backend").await;
    assert_eq!(
        backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(fresh)).await,
        Acked::PubAck(PubAckReason::NotAuthorized)
    );
    let next = signed(&topic, b"unlock", 3);
    assert!(matches!(
        backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(next)).await,
        Acked::PubAck(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
    ));
    backend.disconnect().await;

    // MQTT 3.1.1 has no negative PUBACK: an unsigned command disconnects its publisher (on_fail_v3).
    let mut old = v4::connect_to(&broker, "legacy").await;
    old.client.publish(command_topic(), rumqttc::QoS::AtLeastOnce, false, b"unlock".to_vec()).await.unwrap();
    old.expect_disconnected().await;
    assert!(broker.stop().await);
}

#[tokio::test]
async fn the_broker_refuses_to_start_msg_auth_without_durable_state() {
    let mut config = Config::default();
    config.listeners[0].bind = "127.0.0.1:0".into();
    config.runtime.state_dir = Some(std::path::PathBuf::new());
    config.runtime.plugin_cache_dir = Some(std::path::PathBuf::new());
    config.plugins = vec![msg_auth()];
    let error = tollgate::Server::start(&config).await.err().expect("refused");
    let text = format!("{error:#}");
    assert!(text.contains("msg-auth") && text.contains("state_dir"), "{text}");
}

#[tokio::test]
async fn a_verified_command_reaches_the_car_signed_with_its_own_key() {
    let mut plugin = msg_auth_with_car_keys();
    let rule = plugin.config["rules"][0].as_object_mut().unwrap();
    rule.insert("resign".into(), "vin-1".into());
    rule.insert("resign_chain".into(), true.into());
    let state = tempfile::tempdir().unwrap();
    let broker = broker_with(state.path(), plugin).await;
    let (mut car, mut backend) = car_and_backend(&broker).await;
    let topic = command_topic();

    let sent = signed(&topic, b"unlock", 1);
    let acked = backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(sent.clone())).await;
    assert_eq!(acked, Acked::PubAck(PubAckReason::Success));
    let delivered = car.next_publish().await;
    let properties = delivered.properties.as_ref().map(|p| p.user_properties.clone()).unwrap_or_default();
    let header = properties.iter().find(|(key, _)| key == PROPERTY).map(|(_, value)| value.clone()).unwrap();
    let signature = Signature::parse(&header).unwrap();
    assert_eq!((signature.kid.as_str(), signature.sub.as_str(), signature.iss.as_str()), ("vin-1", VIN, "site-0042"));
    // What the car holds: the key derived from the site master for its own VIN.
    let car_key = keys::mac_key(Algorithm::Hs256, SITE_MASTER, Some(&derive_info("vin-mac-v1:${sub}", VIN)));
    assert!(keys::verify(
        &car_key,
        &signature,
        &Covered { topic: &topic, payload: &delivered.payload, ..Covered::default() }
    ));
    let previous = properties.iter().find(|(key, _)| key == PREVIOUS_PROPERTY).map(|(_, value)| value.clone());
    assert_eq!(previous, Some(sent.user_properties[0].1.clone()), "the cloud's signature is kept in the chain");

    // A replay of the cloud's message is still refused before any re-signing.
    assert_eq!(
        backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(sent)).await,
        Acked::PubAck(PubAckReason::NotAuthorized)
    );
    car.expect_no_publish(QUIET).await;
    backend.disconnect().await;
    car.disconnect().await;
    assert!(broker.stop().await);
}

/// A cloud bridge that was offline gets what queued meanwhile signed when it is sent, so the cloud's freshness
/// check passes after an uplink outage; a local dashboard's copy is not signed.
#[tokio::test]
async fn copies_queued_for_an_offline_cloud_bridge_are_signed_when_sent() {
    let mut plugin = msg_auth_with_car_keys();
    plugin.config["rules"].as_array_mut().unwrap().push(serde_json::json!({
        "id": "to-cloud", "mode": "sign", "topics": ["v1/vehicles/+/telemetry/#"], "key": "vin-1",
        "sub_level": 2, "subscribers": ["cloud-*"]
    }));
    let state = tempfile::tempdir().unwrap();
    let broker = broker_with(state.path(), plugin).await;
    let mut bridge_options = v5::options(&broker, "cloud-bridge");
    bridge_options.set_clean_start(false);
    bridge_options.set_session_expiry_interval(Some(300));
    let (mut bridge, _) = v5::connect(bridge_options.clone()).await;
    bridge.subscribe_ok("v1/vehicles/+/telemetry/#", QoS::AtLeastOnce).await;
    bridge.disconnect().await;
    let mut dashboard = v5::connect_to(&broker, "dashboard").await;
    dashboard.subscribe_ok("v1/vehicles/+/telemetry/#", QoS::AtLeastOnce).await;

    let topic = format!("v1/vehicles/{VIN}/telemetry/speed");
    let mut car = v5::connect_to(&broker, "car").await;
    car.publish(&topic, QoS::AtLeastOnce, false, b"88").await;
    let local = dashboard.next_publish().await;
    assert!(v5::properties(&local).user_properties.is_empty(), "a local subscriber's copy is not signed");

    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let reconnected_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let (mut bridge, connack) = v5::connect(bridge_options).await;
    assert!(connack.session_present);
    let queued = bridge.next_publish().await;
    let properties = v5::properties(&queued).user_properties;
    assert_eq!(properties.len(), 1, "{properties:?}");
    let signature = Signature::parse(&properties[0].1).unwrap();
    assert_eq!((signature.kid.as_str(), signature.sub.as_str()), ("vin-1", VIN));
    assert!(
        signature.ts >= reconnected_at,
        "signed when sent ({}), not when queued (before {reconnected_at})",
        signature.ts
    );
    let key = keys::mac_key(Algorithm::Hs256, SITE_MASTER, Some(&derive_info("vin-mac-v1:${sub}", VIN)));
    assert!(keys::verify(&key, &signature, &Covered { topic: &topic, payload: &queued.payload, ..Covered::default() }));
    bridge.disconnect().await;
    dashboard.disconnect().await;
    car.disconnect().await;
    assert!(broker.stop().await);
}

#[tokio::test]
async fn a_quarantine_rule_moves_refused_commands_aside_where_an_operator_can_read_them() {
    let state = tempfile::tempdir().unwrap();
    let mut plugin = msg_auth();
    plugin.config["rules"][0]["on_fail"] = "quarantine:$quarantine/msg-auth".into();
    let broker = broker_with(state.path(), plugin).await;
    let (mut car, mut backend) = car_and_backend(&broker).await;
    let mut operator = v5::connect_to(&broker, "operator").await;
    operator.subscribe_ok("$quarantine/msg-auth/#", QoS::AtLeastOnce).await;
    let topic = command_topic();

    // Tampered and retained: the car sees nothing, nothing is retained on either topic, the operator gets it.
    let tampered = signed(&topic, b"unlock", 1);
    let acked = backend.publish_with(&topic, QoS::AtLeastOnce, true, b"UNLOCK", Some(tampered)).await;
    assert!(matches!(acked, Acked::PubAck(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)));
    car.expect_no_publish(QUIET).await;
    let quarantined = operator.next_publish().await;
    assert_eq!(quarantined.topic, format!("$quarantine/msg-auth/{topic}").as_bytes());
    assert_eq!(&quarantined.payload[..], b"UNLOCK");
    assert!(!quarantined.retain);
    let properties = quarantined.properties.map(|p| p.user_properties).unwrap_or_default();
    assert!(properties.contains(&("x-sig-status".to_owned(), "invalid:bad_mac".to_owned())), "{properties:?}");
    let mut late = v5::connect_to(&broker, "late").await;
    late.subscribe_ok("$quarantine/msg-auth/#", QoS::AtLeastOnce).await;
    late.subscribe_ok("v1/vehicles/+/cmd/#", QoS::AtLeastOnce).await;
    late.expect_no_publish(QUIET).await;

    // A good command still reaches the car, and only the car.
    let good = signed(&topic, b"unlock", 2);
    assert_eq!(
        backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(good)).await,
        Acked::PubAck(PubAckReason::Success)
    );
    assert_eq!(car.next_publish().await.payload.as_ref(), b"unlock");
    operator.expect_no_publish(QUIET).await;
    assert!(broker.stop().await);
}

/// A command signed by one replica of a backend that keeps no counter: AES-128-CMAC (what a SecOC/SHE key slot
/// computes) and a random nonce instead.
fn cmac_signed_with_nonce(topic: &str, payload: &[u8], nonce: &str) -> PublishProperties {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let mut signature = Signature {
        alg: Algorithm::CmacAes128,
        kid: "cloud-cmac".into(),
        sub: VIN.into(),
        ts: now,
        nonce: nonce.into(),
        present: Present { sub: true, ts: true, nonce: true, ..Present::default() },
        ..Signature::default()
    };
    keys::sign(TCU_KEY, &mut signature, &Covered { topic, payload, ..Covered::default() }, 32).expect("signed");
    PublishProperties { user_properties: vec![(PROPERTY.into(), signature.header())], ..Default::default() }
}

const TCU_KEY: &[u8] = b"16-byte AES key!";

#[tokio::test]
async fn cmac_commands_with_nonces_from_two_replicas_pass_once_each() {
    let mut plugin = msg_auth();
    plugin.secrets.insert("cmac".into(), format!("hex:{}", hex(TCU_KEY)));
    plugin.config["keys"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({ "kid": "cloud-cmac", "alg": "cmac-aes128", "secret": "cmac" }));
    plugin.config["rules"][0]["require"] = serde_json::json!(["ts", "nonce", "sub"]);
    // Asks the host on every message whether the clock is synchronized; these messages are fresh either way.
    plugin.config.insert("clock_trust".into(), "synchronized".into());
    let state = tempfile::tempdir().unwrap();
    let broker = broker_with(state.path(), plugin).await;
    let (mut car, mut replica_a) = car_and_backend(&broker).await;
    let mut replica_b = v5::connect_to(&broker, "backend-b").await;
    let topic = command_topic();
    let ok = Acked::PubAck(PubAckReason::Success);
    let refused = Acked::PubAck(PubAckReason::NotAuthorized);

    // Broker start set the floor of its nonce records; what the replicas sign from now on is after it.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let from_a = cmac_signed_with_nonce(&topic, b"unlock", "a-7f3e9c01");
    let from_b = cmac_signed_with_nonce(&topic, b"unlock", "b-0c4d2e88");
    assert_eq!(replica_a.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(from_a.clone())).await, ok);
    assert_eq!(replica_b.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(from_b.clone())).await, ok);
    for _ in 0..2 {
        let delivered = car.next_publish().await;
        let header = delivered.properties.as_ref().map(|p| p.user_properties.clone()).unwrap_or_default();
        let signature = Signature::parse(&header[0].1).unwrap();
        assert_eq!((signature.alg, signature.mac.len()), (Algorithm::CmacAes128, 16));
    }
    // Each replayed, through either connection; a tampered payload; an HMAC tag under the CMAC key id.
    assert_eq!(replica_b.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(from_a)).await, refused);
    assert_eq!(replica_a.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(from_b)).await, refused);
    let fresh = cmac_signed_with_nonce(&topic, b"unlock", "a-11aa22bb");
    assert_eq!(replica_a.publish_with(&topic, QoS::AtLeastOnce, false, b"UNLOCK", Some(fresh.clone())).await, refused);
    let hmac_header = fresh.user_properties[0].1.replace("alg=cmac-aes128", "alg=hs256");
    let relabelled = PublishProperties { user_properties: vec![(PROPERTY.into(), hmac_header)], ..Default::default() };
    assert_eq!(replica_a.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(relabelled)).await, refused);
    car.expect_no_publish(QUIET).await;
    // The untouched message with that nonce was never accepted, so it still passes.
    assert_eq!(replica_a.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(fresh)).await, ok);
    car.next_publish().await;
    assert!(broker.stop().await);
}

/// The built-in bridge is the subscriber of what it forwards: a `sign` rule naming it (`$bridge/<name>`) signs
/// each copy when the bridge sends it, after the topic mapping, so the cloud verifies the topic it receives.
#[tokio::test]
async fn a_copy_sent_over_the_built_in_bridge_is_signed_over_the_topic_the_cloud_receives() {
    let cloud = TestBroker::start().await;
    let mut plugin = msg_auth_with_car_keys();
    plugin.config["rules"].as_array_mut().unwrap().push(serde_json::json!({
        "id": "to-cloud", "mode": "sign", "topics": ["sites/42/v1/vehicles/+/telemetry/#"], "key": "vin-1",
        "sub_level": 4, "subscribers": ["$bridge/cloud"]
    }));
    let state = tempfile::tempdir().unwrap();
    let site = TestBroker::builder()
        .configure(|config: &mut Config| {
            config.plugins = vec![plugin];
            config.runtime.plugin_cache_dir = Some(std::path::PathBuf::new());
            config.runtime.state_dir = Some(state.path().to_path_buf());
            config.bridges = vec![tollgate_integration_tests::bridge_config(
                &cloud.addr.to_string(),
                vec![tollgate_integration_tests::bridge_topic("v1/vehicles/+/telemetry/#", "out", 1, "", "sites/42/")],
            )];
        })
        .start()
        .await;
    tollgate_integration_tests::wait_until("the bridge to connect", || {
        site.server.bridges()[0].stats.connected.load(std::sync::atomic::Ordering::Relaxed)
    })
    .await;
    let mut backend = v5::connect_to(&cloud, "backend").await;
    backend.subscribe_ok("sites/42/#", QoS::AtLeastOnce).await;
    let mut dashboard = v5::connect_to(&site, "dashboard").await;
    dashboard.subscribe_ok("v1/vehicles/+/telemetry/#", QoS::AtLeastOnce).await;

    let mut car = v5::connect_to(&site, "car").await;
    car.publish(&format!("v1/vehicles/{VIN}/telemetry/speed"), QoS::AtLeastOnce, false, b"88").await;
    let local = dashboard.next_publish().await;
    assert!(v5::properties(&local).user_properties.is_empty(), "a local subscriber's copy is not signed");
    let bridged = backend.next_publish().await;
    let topic = format!("sites/42/v1/vehicles/{VIN}/telemetry/speed");
    assert_eq!(v5::topic(&bridged), topic);
    let properties = v5::properties(&bridged).user_properties;
    assert_eq!(properties.len(), 1, "{properties:?}");
    assert_eq!(properties[0].0, PROPERTY);
    let signature = Signature::parse(&properties[0].1).unwrap();
    assert_eq!((signature.kid.as_str(), signature.sub.as_str()), ("vin-1", VIN));
    let key = keys::mac_key(Algorithm::Hs256, SITE_MASTER, Some(&derive_info("vin-mac-v1:${sub}", VIN)));
    assert!(keys::verify(
        &key,
        &signature,
        &Covered { topic: &topic, payload: &bridged.payload, ..Covered::default() }
    ));
    let local_topic = format!("v1/vehicles/{VIN}/telemetry/speed");
    assert!(
        !keys::verify(
            &key,
            &signature,
            &Covered { topic: &local_topic, payload: &bridged.payload, ..Covered::default() }
        ),
        "the signature covers the cloud's topic, not the site's"
    );
    car.disconnect().await;
    dashboard.disconnect().await;
    assert!(site.stop().await);
    cloud.stop().await;
}

/// Commands that come down the built-in bridge go through msg-auth's `verify` like commands a backend sends to the
/// site directly: signed ones reach the car, tampered and replayed ones do not.
#[tokio::test]
async fn commands_arriving_over_the_built_in_bridge_are_verified() {
    let cloud = TestBroker::start().await;
    let state = tempfile::tempdir().unwrap();
    let site = TestBroker::builder()
        .configure(|config: &mut Config| {
            config.plugins = vec![msg_auth()];
            config.runtime.plugin_cache_dir = Some(std::path::PathBuf::new());
            config.runtime.state_dir = Some(state.path().to_path_buf());
            config.bridges = vec![tollgate_integration_tests::bridge_config(
                &cloud.addr.to_string(),
                vec![tollgate_integration_tests::bridge_topic("v1/vehicles/+/cmd/#", "in", 1, "", "")],
            )];
        })
        .start()
        .await;
    tollgate_integration_tests::wait_until("the bridge's subscription on the cloud", || {
        cloud.subscription_count() >= 1
    })
    .await;
    let mut car = v5::connect_to(&site, "car").await;
    car.subscribe_ok("v1/vehicles/+/cmd/#", QoS::AtLeastOnce).await;
    let mut backend = v5::connect_to(&cloud, "backend").await;
    let topic = command_topic();

    let good = signed(&topic, b"unlock", 1);
    backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(good.clone())).await;
    let delivered = car.next_publish().await;
    assert_eq!(&delivered.payload[..], b"unlock");
    // Tampered, replayed, unsigned: the cloud broker takes them (it verifies nothing), the site does not pass them on.
    let fresh = signed(&topic, b"unlock", 2);
    backend.publish_with(&topic, QoS::AtLeastOnce, false, b"UNLOCK", Some(fresh.clone())).await;
    backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(good)).await;
    backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", None).await;
    car.expect_no_publish(QUIET).await;
    let stats = site.server.bridges()[0].stats.clone();
    tollgate_integration_tests::wait_until("three refusals counted", || {
        tollgate_bridge::BridgeStats::get(&stats.dropped_by_policy) == 3
    })
    .await;
    // The untouched counter-2 command still passes.
    backend.publish_with(&topic, QoS::AtLeastOnce, false, b"unlock", Some(fresh)).await;
    assert_eq!(&car.next_publish().await.payload[..], b"unlock");
    car.disconnect().await;
    assert!(site.stop().await);
    cloud.stop().await;
}
