//! Per-call latency of the shipped plugins through the plugin adapters, without a broker or sockets:
//! `cargo run --release -p tollgate-plugin-host --example shipped_plugins -- <vin_acl.wasm> <msg_auth.wasm> [calls]`
//! (build both with `cargo build --release --target wasm32-wasip2 -p vin-acl -p msg-auth`).
//!
//! Measures vin-acl's CONNECT check (certificate identity, VIN validation), its publish check for a car (one call,
//! and per message in bursts of 16), and msg-auth verifying a 1 KiB message (one call, and per message in bursts of
//! 16) and attesting one, and prints p50/p99/max per call. A fourth argument `volatile` runs msg-auth without a
//! state file (`allow_volatile_state`), to show what the durable writes cost.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tollgate_hooks::{
    Action, Authenticator, Authorizer, ClientInfo, ConnectRequest, Message, PeerIdentity, ProtocolVersion, QoS,
    TransformDecision, Transformer,
};
use tollgate_plugin_host::{LoadedPlugin, PluginKind, PluginSpec};
use tollgate_protocol::UserProperty;
use tollgate_sig::{Covered, PROPERTY, Present, Signature, keys};

/// The broker's allocator, so that costs match what the broker pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const VIN: &str = "1J9RP1A36A1644345";
const OTA_KEY: &[u8] = b"ota key for the benchmark, 32 b!";
const SITE_KEY: &[u8] = b"site master key for the benchmark";

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize].as_nanos() as f64 / 1000.0;
    println!(
        "{what:<44} p50 {:>6.2} µs   p99 {:>6.2} µs   max {:>8.2} µs   ({} calls)",
        at(0.5),
        at(0.99),
        at(1.0),
        samples.len()
    );
}

fn json(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    value.as_object().cloned().unwrap_or_default()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(vin_acl), Some(msg_auth)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: shipped_plugins <vin_acl.wasm> <msg_auth.wasm> [calls]");
        std::process::exit(2);
    };
    let calls: usize = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let state = std::env::temp_dir().join(format!("tollgate-shipped-plugins-{}", std::process::id()));

    let mut spec = PluginSpec::new("vin-acl", PluginKind::Wasm, vin_acl);
    spec.config = json(serde_json::json!({
        "rules": [
            { "id": "uplink", "allow": ["publish"],
              "topics": ["vehicle/updates/${vin}/progress", "vehicle/updates/${vin}/status", "v1/vehicles/${vin}/telemetry/#"] },
            { "id": "downlink", "allow": ["subscribe"], "topics": ["vehicle/updates/${vin}"] }
        ]
    }));
    let acl = LoadedPlugin::load(spec, None).await.expect("load vin-acl");
    let acl = acl.hook();
    let peer = Arc::new(PeerIdentity {
        subject: format!("CN=TCU {VIN}"),
        common_name: Some(format!("TCU {VIN}")),
        san_uri: vec![format!("urn:vin:{VIN}")],
        serial: "1f".into(),
        ..Default::default()
    });
    let request = ConnectRequest {
        client_id: VIN.into(),
        username: None,
        username_from_certificate: false,
        password: None,
        protocol: ProtocolVersion::V5,
        remote_addr: None,
        listener: "tls".into(),
        peer: Some(peer.clone()),
        authentication_method: None,
        authentication_data: None,
    };
    let car = ClientInfo {
        client_id: VIN.into(),
        username: None,
        protocol: ProtocolVersion::V5,
        remote_addr: None,
        listener: "tls".into(),
        peer: Some(peer),
        attributes: Arc::new(BTreeMap::from([("vin".to_owned(), VIN.to_owned())])),
    };
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        acl.authenticate(&request).await.expect("connect check");
        samples.push(started.elapsed());
    }
    report("vin-acl CONNECT (certificate → VIN)", samples);
    let topic = format!("v1/vehicles/{VIN}/telemetry/speed");
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let started = Instant::now();
        acl.authorize(&car, &Action::Publish { topic: &topic, qos: QoS::AtLeastOnce, retain: false })
            .await
            .expect("acl");
        samples.push(started.elapsed());
    }
    report("vin-acl publish check (uncached)", samples);
    // A burst of 16 in one `authz-batch` call, reported per message.
    let burst = vec![Action::Publish { topic: &topic, qos: QoS::AtLeastOnce, retain: false }; 16];
    let mut samples = Vec::with_capacity(calls / 16);
    for _ in 0..calls / 16 {
        let started = Instant::now();
        acl.authorize_batch(&car, &burst).await.expect("acl batch");
        samples.push(started.elapsed() / 16);
    }
    report("vin-acl publish check, bursts of 16 (each)", samples);

    let mut spec = PluginSpec::new("msg-auth", PluginKind::Wasm, msg_auth);
    spec.secrets.insert("ota".into(), OTA_KEY.to_vec());
    spec.secrets.insert("site".into(), SITE_KEY.to_vec());
    let volatile = args.get(4).is_some_and(|mode| mode == "volatile");
    spec.state_file = (!volatile).then(|| state.join("msg-auth.kv"));
    spec.config = json(serde_json::json!({
        "site_id": "bench",
        "allow_volatile_state": volatile,
        "keys": [ { "kid": "ota-1", "secret": "ota" }, { "kid": "vin-1", "secret": "site", "derive": "vin-mac-v1:${sub}" } ],
        "rules": [
            { "id": "verify", "mode": "verify", "topics": ["vehicle/updates/+"], "accept_kids": ["ota-*"],
              "require": ["ts", "ctr", "sub"], "sub_level": 2 },
            { "id": "attest", "mode": "attest", "topics": ["v1/vehicles/+/telemetry/#"], "key": "vin-1" }
        ]
    }));
    let signer = LoadedPlugin::load(spec, None).await.expect("load msg-auth");
    let signer = signer.hook();
    let update_topic = format!("vehicle/updates/{VIN}");
    let payload = vec![b'u'; 1024];
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    // Signed ahead, so the loop times the broker side only: the first half verified one call at a time, the second
    // in bursts of 16.
    let mut messages: Vec<Message> = (1..=2 * calls as u64)
        .map(|ctr| {
            let mut signature = Signature {
                kid: "ota-1".into(),
                sub: VIN.into(),
                iss: "cloud".into(),
                ts: now,
                ctr,
                present: Present { sub: true, iss: true, ts: true, ctr: true, nonce: false, exp: false },
                ..Default::default()
            };
            keys::sign(
                OTA_KEY,
                &mut signature,
                &Covered { topic: &update_topic, payload: &payload, ..Default::default() },
                32,
            )
            .expect("an HMAC key of any length");
            Message {
                topic: update_topic.as_str().into(),
                payload: Bytes::from(payload.clone()),
                qos: QoS::AtLeastOnce,
                user_properties: vec![UserProperty { key: PROPERTY.into(), value: signature.header() }],
                ..Default::default()
            }
        })
        .collect();
    let backend = ClientInfo { client_id: "backend".into(), peer: None, attributes: Arc::default(), ..car.clone() };
    let mut bursts = messages.split_off(calls);
    let mut samples = Vec::with_capacity(calls);
    for mut message in messages {
        let started = Instant::now();
        let decision = signer.transform_inbound(&backend, &mut message).await.expect("verify");
        samples.push(started.elapsed());
        assert_eq!(decision, TransformDecision::Keep, "a valid message must pass");
    }
    let window = if volatile { "volatile window" } else { "durable window" };
    report(&format!("msg-auth verify, 1 KiB ({window})"), samples);
    let mut samples = Vec::with_capacity(calls / 16);
    for burst in bursts.chunks_mut(16) {
        let started = Instant::now();
        let decisions = signer.transform_inbound_batch(&backend, burst).await.expect("verify a burst");
        samples.push(started.elapsed() / burst.len() as u32);
        assert!(decisions.iter().all(|decision| *decision == TransformDecision::Keep), "valid messages must pass");
    }
    report(&format!("msg-auth verify, bursts of 16 ({window}, each)"), samples);
    let telemetry =
        Message { topic: topic.as_str().into(), payload: Bytes::from(payload.clone()), ..Default::default() };
    let mut samples = Vec::with_capacity(calls);
    for _ in 0..calls {
        let mut message = telemetry.clone();
        let started = Instant::now();
        signer.transform_inbound(&car, &mut message).await.expect("attest");
        samples.push(started.elapsed());
    }
    report(
        if volatile { "msg-auth attest, 1 KiB (volatile counter)" } else { "msg-auth attest, 1 KiB (durable counter)" },
        samples,
    );
    let _ = std::fs::remove_dir_all(state);
}
