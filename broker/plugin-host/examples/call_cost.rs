//! Per-call cost of the plugin adapters, without a broker: `cargo run --release -p tollgate-plugin-host --example
//! call_cost -- <plugin.wasm|plugin.lua> [authorize|authorize-batch:<n>|transform|transform-batch:<n>] [calls] [pause µs
//! between calls]`.
//!
//! `transform-batch:<n>` and `authorize-batch:<n>` hand the plugin `n` messages per call (`transform-batch`,
//! `authz-batch`) and report the cost per message.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tollgate_hooks::{Action, Authorizer, ClientInfo, Message, ProtocolVersion, QoS, Transformer};
use tollgate_plugin_host::{LoadedPlugin, PluginKind, PluginSpec};

/// The broker's allocator, so that costs match what the broker pays.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).expect("plugin path");
    let hook = args.get(2).map_or("authorize", String::as_str);
    let calls: u32 = args.get(3).and_then(|n| n.parse().ok()).unwrap_or(200_000);
    let kind = if path.ends_with(".wasm") { PluginKind::Wasm } else { PluginKind::Lua };
    let mut spec = PluginSpec::new("bench", kind, path);
    spec.secrets.insert("k1".into(), vec![7; 16]);
    let plugin = LoadedPlugin::load(spec, None).await.expect("load");
    let adapter = plugin.hook();
    let client = ClientInfo {
        client_id: "client-1".into(),
        username: Some("user".into()),
        protocol: ProtocolVersion::V311,
        remote_addr: None,
        listener: "tcp".into(),
        peer: None,
        attributes: Arc::new(BTreeMap::new()),
    };
    let message = Message { topic: "bench/pair/1".into(), payload: Bytes::from(vec![b'x'; 64]), ..Default::default() };
    let pause: u64 = args.get(4).and_then(|n| n.parse().ok()).unwrap_or(0);
    let batch: usize = hook
        .strip_prefix("transform-batch:")
        .or_else(|| hook.strip_prefix("authorize-batch:"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let publishes = vec![Action::Publish { topic: "bench/pair/1", qos: QoS::AtLeastOnce, retain: false }; batch];
    let calls = if batch > 1 { calls / u32::try_from(batch).expect("batch size") } else { calls };
    for round in 0..3 {
        let mut busy = std::time::Duration::ZERO;
        for _ in 0..calls {
            if pause > 0 {
                tokio::time::sleep(std::time::Duration::from_micros(pause)).await;
            }
            let started = Instant::now();
            match hook {
                "transform" => {
                    let mut copy = message.clone();
                    adapter.transform_inbound(&client, &mut copy).await.expect("transform");
                }
                _ if batch > 1 && hook.starts_with("authorize-batch:") => {
                    let decisions = adapter.authorize_batch(&client, &publishes).await.expect("batch");
                    assert_eq!(decisions.len(), batch);
                }
                _ if batch > 1 => {
                    let mut copies = vec![message.clone(); batch];
                    let decisions = adapter.transform_inbound_batch(&client, &mut copies).await.expect("batch");
                    assert_eq!(decisions.len(), batch);
                }
                _ => {
                    adapter
                        .authorize(
                            &client,
                            &Action::Publish { topic: "bench/pair/1", qos: QoS::AtLeastOnce, retain: false },
                        )
                        .await
                        .expect("authorize");
                }
            }
            busy += started.elapsed();
        }
        let per_message = busy.as_nanos() as f64 / f64::from(calls) / batch as f64;
        println!("round {round}: {per_message:.0} ns per message ({hook})");
    }
}
