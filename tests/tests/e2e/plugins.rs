//! Plugins end to end: a real broker with WebAssembly and Lua plugins attached through `[[plugins]]`, driven by
//! rumqttc (3.1.1 and 5) and the Mosquitto command-line clients. The behaviour table of the test plugins is in
//! `tests/plugins/testkit-wasm/src/lib.rs`; both runtimes get the same assertions.

#![allow(clippy::unwrap_used)]

use crate::wasm_build;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode, PubAckReason, SubscribeReasonCode};
use tollgate::config::{PluginConfig, PluginLimitsConfig};
use tollgate_integration_tests::external::{self, describe, require_tool, run};
use tollgate_integration_tests::v5::{self, Acked, connect, connect_to, options, topic};
use tollgate_integration_tests::{QUIET, TestBroker, v4, within};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Wasm,
    Lua,
}

const KINDS: [Kind; 2] = [Kind::Wasm, Kind::Lua];

fn testkit_path(kind: Kind) -> PathBuf {
    match kind {
        Kind::Wasm => wasm_build::wasm_plugin("testkit-wasm"),
        Kind::Lua => wasm_build::workspace_root().join("tests/plugins/testkit.lua"),
    }
}

fn plugin_entry(name: &str, kind: Kind, path: PathBuf) -> PluginConfig {
    PluginConfig {
        name: name.into(),
        kind: match kind {
            Kind::Wasm => "wasm".into(),
            Kind::Lua => "lua".into(),
        },
        path,
        hooks: None,
        limits: PluginLimitsConfig { cpu_ms: 30, ..Default::default() },
        on_failure: Default::default(),
        cache_decisions: false,
        secrets: [("k1".to_owned(), "hex:736563726574".to_owned())].into(), // "secret"
        config: Default::default(),
        files: Default::default(),
    }
}

async fn broker_with(plugins: Vec<PluginConfig>) -> TestBroker {
    TestBroker::builder()
        .configure(|config| {
            config.plugins = plugins;
            config.runtime.plugin_cache_dir = Some(PathBuf::new());
        })
        .start()
        .await
}

async fn testkit_broker(kind: Kind) -> TestBroker {
    broker_with(vec![plugin_entry("testkit", kind, testkit_path(kind))]).await
}

#[tokio::test]
async fn a_plugin_refuses_a_connect_in_both_protocol_versions() {
    for kind in KINDS {
        let broker = testkit_broker(kind).await;
        let mut blocked = options(&broker, "blocked-5");
        blocked.set_credentials("blocked", "x");
        assert_eq!(v5::refused_code(blocked).await, ConnectReturnCode::NotAuthorized, "{kind:?}");
        let mut blocked = v4::options(&broker, "blocked-4");
        blocked.set_credentials("blocked", "x");
        assert_eq!(
            v4::refused_code(blocked).await,
            rumqttc::ConnectReturnCode::NotAuthorized,
            "{kind:?}: 3.1.1 gets return code 5"
        );
        let mut alice = options(&broker, "alice");
        alice.set_credentials("alice", "x");
        connect(alice).await.0.disconnect().await;
        assert!(broker.stop().await);
    }
}

#[tokio::test]
async fn a_plugin_denies_publishes_with_reason_codes_and_caps_subscriptions() {
    for kind in KINDS {
        let broker = testkit_broker(kind).await;
        let mut subscriber = connect_to(&broker, "sub").await;
        // `deny/...` filters are refused by the plugin; `+/a` is not, and matches the denied topics below.
        subscriber.subscribe_ok("+/a", QoS::AtLeastOnce).await;
        // The plugin caps this subscription at QoS 0, which the SUBACK says.
        assert_eq!(
            subscriber.subscribe("capped/#", QoS::ExactlyOnce).await,
            SubscribeReasonCode::Success(QoS::AtMostOnce),
            "{kind:?}"
        );
        assert_eq!(subscriber.subscribe("deny/secret/#", QoS::AtLeastOnce).await, SubscribeReasonCode::NotAuthorized);
        let mut publisher = connect_to(&broker, "pub").await;
        let denied = publisher.publish_with("deny/a", QoS::AtLeastOnce, false, b"x", None).await;
        assert_eq!(denied, Acked::PubAck(PubAckReason::NotAuthorized), "{kind:?}: 0x87");
        let quota = publisher.publish_with("quota/a", QoS::AtLeastOnce, false, b"x", None).await;
        assert_eq!(quota, Acked::PubAck(PubAckReason::QuotaExceeded), "{kind:?}: 0x97");
        subscriber.expect_no_publish(QUIET).await;
        // A capped subscription receives a QoS 2 publish at QoS 0.
        publisher.publish("capped/b", QoS::ExactlyOnce, false, b"low").await;
        let received = subscriber.next_publish().await;
        assert_eq!((topic(&received), received.qos), ("capped/b".to_owned(), QoS::AtMostOnce), "{kind:?}");

        // MQTT 3.1.1 has no negative PUBACK: the publish is acknowledged and dropped, the client stays connected.
        let mut old = v4::connect_to(&broker, "old").await;
        old.publish("deny/old", rumqttc::QoS::AtLeastOnce, false, b"x").await;
        subscriber.expect_no_publish(QUIET).await;
        old.publish("capped/old", rumqttc::QoS::AtLeastOnce, false, b"still connected").await;
        assert_eq!(topic(&subscriber.next_publish().await), "capped/old", "{kind:?}");
        assert!(broker.stop().await);
    }
}

#[tokio::test]
async fn a_plugin_modifies_drops_rewrites_and_signs_messages() {
    for kind in KINDS {
        let broker = testkit_broker(kind).await;
        let mut subscriber = connect_to(&broker, "sub").await;
        for filter in ["upper/#", "drop/#", "rewritten/#", "sign/#"] {
            subscriber.subscribe_ok(filter, QoS::AtLeastOnce).await;
        }
        let mut publisher = connect_to(&broker, "pub").await;
        publisher.publish("upper/a", QoS::AtLeastOnce, false, b"hello").await;
        assert_eq!(&subscriber.next_publish().await.payload[..], b"HELLO", "{kind:?}");
        publisher.publish("drop/a", QoS::AtLeastOnce, false, b"gone").await;
        subscriber.expect_no_publish(QUIET).await;
        publisher.publish("rewrite/b/c", QoS::AtLeastOnce, false, b"moved").await;
        let moved = subscriber.next_publish().await;
        assert_eq!((topic(&moved), &moved.payload[..]), ("rewritten/b/c".to_owned(), &b"moved"[..]), "{kind:?}");
        publisher.publish("sign/a", QoS::AtLeastOnce, false, b"payload").await;
        let signed = subscriber.next_publish().await;
        let properties = v5::properties(&signed).user_properties;
        // HMAC-SHA256("secret", "payload"), computed by the host with a key the plugin never sees.
        assert_eq!(
            properties,
            vec![("sig".to_owned(), "b82fcb791acec57859b989b430a826488ce2e479fdf92326bd0a2e8375a42ba4".to_owned())],
            "{kind:?}"
        );
        assert!(broker.stop().await);
    }
}

/// Encodes PUBLISHes (QoS 1 gets packet id = position + 1) for one write, so the broker reads them together.
fn publish_burst(version: tollgate_protocol::ProtocolVersion, messages: &[(&str, tollgate_protocol::QoS)]) -> Vec<u8> {
    use tollgate_integration_tests::raw::{encode, publish_packet};
    let mut bytes = Vec::new();
    for (index, (topic, qos)) in messages.iter().enumerate() {
        let packet_id = (*qos != tollgate_protocol::QoS::AtMostOnce).then(|| u16::try_from(index + 1).unwrap());
        let publish = publish_packet(topic, *qos, packet_id, topic.as_bytes());
        bytes.extend(encode(&tollgate_protocol::Packet::Publish(publish), version));
    }
    bytes
}

/// The next `count` packets, which must be PUBACKs: their packet ids and reason codes, in order.
async fn pubacks(
    client: &mut tollgate_integration_tests::raw::RawClient<tokio::net::TcpStream>,
    count: usize,
) -> Vec<(u16, tollgate_protocol::ReasonCode)> {
    let mut acks = Vec::new();
    for _ in 0..count {
        match client.expect_packet().await {
            tollgate_protocol::Packet::PubAck(ack) => acks.push((ack.packet_id, ack.reason_code)),
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    acks
}

/// PUBLISHes that arrive together (one write, so one read on the broker) are authorized together, and those the ACL
/// admits reach a WebAssembly transform in one `transform-batch` call (its answers say how many it got); a Lua
/// script's `on_publish` runs for each inside one call into the VM (it sees one message at a time). Either way each
/// message is transformed, delivered and acknowledged in the order it was sent: a publish the ACL denies and one the
/// transform refuses are answered 0x87 in their place, and a refusal that disconnects (MQTT 3.1.1) ends the burst
/// there, so the messages after it are neither delivered nor acknowledged.
#[tokio::test]
async fn a_burst_of_publishes_is_transformed_together_and_answered_in_order() {
    use tollgate_integration_tests::raw;
    use tollgate_protocol::{ProtocolVersion, QoS as RawQoS, ReasonCode};

    for kind in KINDS {
        let broker = testkit_broker(kind).await;
        let mut subscriber = connect_to(&broker, "sub").await;
        subscriber.subscribe_ok("#", QoS::AtLeastOnce).await;

        let mut client = raw::tcp(broker.addr, ProtocolVersion::V5).await;
        client.connect_ok(ProtocolVersion::V5, "burst").await;
        let one = RawQoS::AtLeastOnce;
        let sent = [
            ("batch/1", one),
            ("batch/2", one),
            ("batch/3", one),
            ("deny/4", one),
            ("batch/5", one),
            ("refuse/6", one),
            ("batch/7", RawQoS::AtMostOnce),
            ("upper/8", one),
            ("batch/9", one),
        ];
        client.send_bytes(&publish_burst(ProtocolVersion::V5, &sent)).await;
        let acks = pubacks(&mut client, 8).await;
        let ok = ReasonCode::SUCCESS;
        let refused = ReasonCode::NOT_AUTHORIZED;
        assert_eq!(
            acks,
            [(1, ok), (2, ok), (3, ok), (4, refused), (5, ok), (6, refused), (8, ok), (9, ok)],
            "{kind:?}"
        );
        let mut sizes = Vec::new();
        for expected in ["batch/1", "batch/2", "batch/3", "batch/5", "batch/7", "upper/8", "batch/9"] {
            let received = subscriber.next_publish().await;
            assert_eq!(topic(&received), expected, "{kind:?}: delivered in order");
            if expected == "upper/8" {
                assert_eq!(&received.payload[..], b"UPPER/8", "{kind:?}");
                continue;
            }
            let properties = v5::properties(&received).user_properties;
            let size = properties.iter().find(|(key, _)| key == "batch").map(|(_, value)| value.clone());
            sizes.push(size.unwrap_or_else(|| panic!("{kind:?}: {expected} not transformed: {properties:?}")));
        }
        subscriber.expect_no_publish(QUIET).await;
        match kind {
            // The eight the ACL admits go in one call; the denied one is left out.
            Kind::Wasm => assert!(sizes.iter().all(|size| size == "8"), "{kind:?}: {sizes:?}"),
            // The script sees each message on its own; that the burst was one call is runtimes.rs's to check.
            Kind::Lua => assert!(sizes.iter().all(|size| size == "1"), "{kind:?}: {sizes:?}"),
        }
        client.disconnect().await;

        let mut old = raw::tcp(broker.addr, ProtocolVersion::V311).await;
        old.connect_ok(ProtocolVersion::V311, "burst-old").await;
        let sent = [("batch/a", one), ("batch/b", one), ("cut/c", one), ("batch/d", one), ("batch/e", one)];
        old.send_bytes(&publish_burst(ProtocolVersion::V311, &sent)).await;
        let ids: Vec<u16> = pubacks(&mut old, 2).await.into_iter().map(|(packet_id, _)| packet_id).collect();
        assert_eq!(ids, [1, 2], "{kind:?}");
        old.expect_closed().await;
        for expected in ["batch/a", "batch/b"] {
            assert_eq!(topic(&subscriber.next_publish().await), expected, "{kind:?}");
        }
        subscriber.expect_no_publish(QUIET).await;
        assert!(broker.stop().await);
    }
}

/// PUBLISHes read together are authorized in one call: a WebAssembly plugin's `authz-batch` gets the whole burst
/// (its counters say one call of seven requests), a Lua script's `authorize_publish` runs for each inside one call
/// into the VM. The decisions are each message's own: denials (0x87, 0x97) are answered in their place, the rest
/// are delivered in order. MQTT 3.1.1 under `on_publish_denied = "disconnect"` loses the connection at the first
/// denial, after the messages before it were delivered and acknowledged. A WebAssembly batch answered with the
/// wrong number of decisions fails, and the failure policy (fail_closed) refuses every message in it.
#[tokio::test]
async fn a_burst_of_publishes_is_authorized_in_one_call() {
    use tollgate_integration_tests::raw;
    use tollgate_protocol::{ProtocolVersion, QoS as RawQoS, ReasonCode};

    for kind in KINDS {
        let broker = TestBroker::builder()
            .configure(|config| {
                config.plugins = vec![plugin_entry("testkit", kind, testkit_path(kind))];
                config.runtime.plugin_cache_dir = Some(PathBuf::new());
                config.auth.on_publish_denied = Some("disconnect".into());
                config.sys.interval = 1;
            })
            .start()
            .await;
        let mut subscriber = connect_to(&broker, "sub").await;
        subscriber.subscribe_ok("ok/#", QoS::AtLeastOnce).await;

        let mut client = raw::tcp(broker.addr, ProtocolVersion::V5).await;
        client.connect_ok(ProtocolVersion::V5, "burst").await;
        let (one, zero) = (RawQoS::AtLeastOnce, RawQoS::AtMostOnce);
        let sent = [
            ("ok/1", one),
            ("deny/2", one),
            ("quota/3", one),
            ("ok/4", zero),
            ("ok/5", one),
            ("deny/6", zero),
            ("ok/7", one),
        ];
        client.send_bytes(&publish_burst(ProtocolVersion::V5, &sent)).await;
        let ok = ReasonCode::SUCCESS;
        assert_eq!(
            pubacks(&mut client, 5).await,
            [(1, ok), (2, ReasonCode::NOT_AUTHORIZED), (3, ReasonCode::QUOTA_EXCEEDED), (5, ok), (7, ok)],
            "{kind:?}"
        );
        for expected in ["ok/1", "ok/4", "ok/5", "ok/7"] {
            assert_eq!(topic(&subscriber.next_publish().await), expected, "{kind:?}: delivered in order");
        }
        subscriber.expect_no_publish(QUIET).await;
        client.disconnect().await;

        // 3.1.1, disconnecting on a denial: what came before it is delivered, what came after it is discarded.
        let mut old = raw::tcp(broker.addr, ProtocolVersion::V311).await;
        old.connect_ok(ProtocolVersion::V311, "burst-old").await;
        let sent = [("ok/a", one), ("ok/b", zero), ("deny/c", one), ("ok/d", one)];
        old.send_bytes(&publish_burst(ProtocolVersion::V311, &sent)).await;
        assert_eq!(pubacks(&mut old, 1).await, [(1, ok)], "{kind:?}");
        old.expect_closed().await;
        for expected in ["ok/a", "ok/b"] {
            assert_eq!(topic(&subscriber.next_publish().await), expected, "{kind:?}");
        }
        subscriber.expect_no_publish(QUIET).await;

        if kind == Kind::Wasm {
            // A broken batch answer: every message in that call is refused (fail_closed), and nothing is delivered.
            let mut client = raw::tcp(broker.addr, ProtocolVersion::V5).await;
            client.connect_ok(ProtocolVersion::V5, "broken").await;
            let sent = [("ok/x", one), ("undecided/y", one), ("ok/z", one)];
            client.send_bytes(&publish_burst(ProtocolVersion::V5, &sent)).await;
            let refused = ReasonCode::NOT_AUTHORIZED;
            assert_eq!(pubacks(&mut client, 3).await, [(1, refused), (2, refused), (3, refused)]);
            subscriber.expect_no_publish(QUIET).await;
            client.disconnect().await;

            // The plugin's own counters: the v5 burst went in one call of seven, the 3.1.1 one in one of four, the
            // broken one in one of three.
            let mut watcher = connect_to(&broker, "watcher").await;
            watcher.subscribe_ok("$SYS/broker/plugins/testkit/counters/#", QoS::AtMostOnce).await;
            // Each counter is its own message, published every second: wait until both show the three bursts.
            let mut seen = std::collections::BTreeMap::new();
            let expected = [("acl_batch_calls", "3"), ("acl_batch_requests", "14")];
            within("counters/acl_batch_calls = 3 and counters/acl_batch_requests = 14 in $SYS", async {
                while expected.iter().any(|(name, value)| seen.get(*name).map(String::as_str) != Some(*value)) {
                    let publish = watcher.next_publish().await;
                    let name = topic(&publish).trim_start_matches("$SYS/broker/plugins/testkit/counters/").to_owned();
                    seen.insert(name, String::from_utf8_lossy(&publish.payload).into_owned());
                }
            })
            .await;
        }
        assert!(broker.stop().await);
    }
}

/// A broker running the testkit with `$SYS` published every second.
async fn testkit_broker_with_sys(kind: Kind) -> TestBroker {
    TestBroker::builder()
        .configure(|config| {
            config.plugins = vec![plugin_entry("testkit", kind, testkit_path(kind))];
            config.runtime.plugin_cache_dir = Some(PathBuf::new());
            config.sys.interval = 1;
        })
        .start()
        .await
}

/// Waits until `$SYS/broker/plugins/testkit/<name>` holds each wanted value (a later tick replaces an earlier one).
async fn await_testkit_sys(broker: &TestBroker, what: &str, wanted: &[(&str, &str)]) {
    let mut watcher = connect_to(broker, "watcher").await;
    watcher.subscribe_ok("$SYS/broker/plugins/testkit/#", QoS::AtMostOnce).await;
    let mut seen = std::collections::BTreeMap::new();
    let settled = |seen: &std::collections::BTreeMap<String, String>| {
        wanted.iter().all(|(name, value)| seen.get(*name).is_some_and(|seen| seen == value))
    };
    let waited = tokio::time::timeout(Duration::from_secs(5), async {
        while !settled(&seen) {
            let publish = watcher.next_publish().await;
            let name = topic(&publish).trim_start_matches("$SYS/broker/plugins/testkit/").to_owned();
            seen.insert(name, String::from_utf8_lossy(&publish.payload).into_owned());
        }
    })
    .await;
    assert!(waited.is_ok(), "{what}: wanted {wanted:?}, last seen {seen:?}");
    watcher.disconnect().await;
}

/// A plugin's gauges (`host.gauge-set` in WebAssembly, `tollgate.gauge_set` in Lua) appear under
/// `$SYS/broker/plugins/<name>/gauges/` with the last value set, negative ones included; the size of its key-value
/// table under `kv/` (live claims, claims evicted early, entries).
#[tokio::test]
async fn plugin_gauges_and_table_sizes_are_published_in_sys() {
    for kind in KINDS {
        let broker = testkit_broker_with_sys(kind).await;
        let mut client = connect_to(&broker, "gauges").await;
        client.subscribe_ok("once/#", QoS::AtLeastOnce).await;
        client.publish("gauge/depth/5", QoS::AtLeastOnce, false, b"x").await;
        client.publish("gauge/depth/-7", QoS::AtLeastOnce, false, b"x").await;
        // Two claims held (a de-duplicating transform: the second `once/a` is dropped).
        for once in ["once/a", "once/a", "once/b"] {
            client.publish(once, QoS::AtLeastOnce, false, b"x").await;
        }
        for once in ["once/a", "once/b"] {
            assert_eq!(topic(&client.next_publish().await), once, "{kind:?}");
        }
        client.expect_no_publish(QUIET).await;
        let wanted = [("gauges/depth", "-7"), ("kv/claims", "2"), ("kv/claims_evicted", "0"), ("kv/entries", "0")];
        await_testkit_sys(&broker, &format!("{kind:?}"), &wanted).await;
        assert!(broker.stop().await, "{kind:?}");
    }
}

/// The session hook through both runtimes: each accepted connection is told once when it starts and once when it
/// ends, with why it ended (`host.gauge-add` / `tollgate.gauge_add` keeps the count of who is online); a session
/// hook that fails changes nothing for its client.
#[tokio::test]
async fn session_hooks_hear_each_connection_start_and_end_with_its_cause() {
    use tollgate_integration_tests::raw;
    use tollgate_protocol::{Packet, ProtocolVersion as Version, ReasonCode};
    for kind in KINDS {
        let broker = testkit_broker_with_sys(kind).await;
        // client-disconnect
        connect_to(&broker, "seen-normal").await.disconnect().await;
        // connection-lost: the socket goes without DISCONNECT.
        let mut lost = raw::tcp(broker.addr, Version::V5).await;
        lost.connect_ok(Version::V5, "seen-lost").await;
        drop(lost);
        // taken-over: the second connection stays.
        let mut old = raw::tcp(broker.addr, Version::V5).await;
        old.connect_ok(Version::V5, "seen-twice").await;
        let mut new = raw::tcp(broker.addr, Version::V5).await;
        new.connect_ok(Version::V5, "seen-twice").await;
        old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
        // protocol-error: a packet of reserved type 0.
        let mut broken = raw::tcp(broker.addr, Version::V5).await;
        broken.connect_ok(Version::V5, "seen-broken").await;
        broken.send_bytes(&[0x00, 0x00]).await;
        broken.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
        // policy: the testkit's transform refuses `cut/` and disconnects.
        let mut cut = raw::tcp(broker.addr, Version::V5).await;
        cut.connect_ok(Version::V5, "seen-cut").await;
        cut.send(&Packet::Publish(raw::publish_packet("cut/x", tollgate_protocol::QoS::AtLeastOnce, Some(1), b"x")))
            .await;
        assert!(
            matches!(cut.expect_packet().await, Packet::PubAck(ack) if ack.reason_code == ReasonCode::NOT_AUTHORIZED)
        );
        cut.expect_disconnect(ReasonCode::NOT_AUTHORIZED).await;
        // keep-alive-timeout: 1 s of keep-alive, and silence.
        let mut silent = raw::tcp(broker.addr, Version::V5).await;
        let mut connect = raw::connect_packet(Version::V5, "seen-silent");
        connect.keep_alive = 1;
        assert_eq!(silent.connect(connect).await.reason_code, ReasonCode::SUCCESS);
        silent.expect_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT).await;
        // A session hook that traps on connect: the client is served as if nothing happened.
        let mut trapped = connect_to(&broker, "seen-trap").await;
        trapped.subscribe_ok("upper/#", QoS::AtLeastOnce).await;
        trapped.publish("upper/t", QoS::AtLeastOnce, false, b"still served").await;
        assert_eq!(&trapped.next_publish().await.payload[..], b"STILL SERVED", "{kind:?}");
        let wanted = [
            ("counters/connected", "8"),
            ("counters/disconnected/client-disconnect", "1"),
            ("counters/disconnected/connection-lost", "1"),
            ("counters/disconnected/taken-over", "1"),
            ("counters/disconnected/protocol-error", "1"),
            ("counters/disconnected/policy", "1"),
            ("counters/disconnected/keep-alive-timeout", "1"),
            // The second `seen-twice` and `seen-trap` are still connected.
            ("gauges/online", "2"),
            ("failures", "1"),
        ];
        await_testkit_sys(&broker, &format!("{kind:?}"), &wanted).await;
        // The trapping hook's disconnect call fails too, and is counted once more.
        trapped.disconnect().await;
        drop(new);
        let wanted = [
            ("counters/disconnected/client-disconnect", "2"),
            ("counters/disconnected/connection-lost", "2"),
            ("gauges/online", "0"),
            ("failures", "2"),
        ];
        await_testkit_sys(&broker, &format!("{kind:?}, after the last two left"), &wanted).await;
        // revoked: a reload into strict mode, whose recheck ends this client's session. The changed plugin's new
        // version goes on with the old version's counters and gauges.
        let mut revoked = raw::tcp(broker.addr, Version::V5).await;
        revoked.connect_ok(Version::V5, "seen-revoked").await;
        let mut strict = broker.config.clone();
        strict.plugins[0].config.insert("mode".into(), "strict".into());
        broker.server.reload(&strict).await.expect("reload");
        revoked.expect_disconnect(ReasonCode::NOT_AUTHORIZED).await;
        // server-shutdown: the broker says goodbye to the last client, and the hook hears it before it stops.
        let _last = connect_to(&broker, "seen-last").await;
        assert!(within("shutdown", broker.server.shutdown()).await, "{kind:?}");
        let status = broker.server.status();
        let testkit = &status["plugins"][0];
        assert_eq!(testkit["counters"]["disconnected/server-shutdown"], 1, "{kind:?}: {testkit}");
        assert_eq!(testkit["counters"]["disconnected/revoked"], 1, "{kind:?}: {testkit}");
        assert_eq!(testkit["counters"]["connected"], 10, "{kind:?}: {testkit}");
        assert_eq!(testkit["gauges"]["online"], 0, "{kind:?}: {testkit}");
    }
}

#[tokio::test]
async fn each_subscriber_gets_its_own_copy_through_the_deliver_hook() {
    for kind in KINDS {
        let broker = testkit_broker(kind).await;
        let mut seer = connect_to(&broker, "seer").await;
        let mut blind = connect_to(&broker, "blind-1").await;
        for subscriber in [&mut seer, &mut blind] {
            subscriber.subscribe_ok("per/#", QoS::AtLeastOnce).await;
            subscriber.subscribe_ok("plain/#", QoS::AtLeastOnce).await;
        }
        let mut publisher = connect_to(&broker, "pub").await;
        publisher.publish("per/a", QoS::AtLeastOnce, false, b"one").await;
        let copy = seer.next_publish().await;
        assert_eq!(v5::properties(&copy).user_properties, vec![("to".to_owned(), "seer".to_owned())], "{kind:?}");
        blind.expect_no_publish(QUIET).await;
        // A deliver hook that fails passes the copy through as it was (transform's default policy).
        publisher.publish("per/trap/x", QoS::AtLeastOnce, false, b"as is").await;
        let copy = seer.next_publish().await;
        assert_eq!((topic(&copy), v5::properties(&copy).user_properties), ("per/trap/x".to_owned(), vec![]));
        let copy = blind.next_publish().await;
        assert_eq!(topic(&copy), "per/trap/x", "{kind:?}");
        // The dropped QoS 1 copy was settled: the blind subscriber's session goes on receiving.
        publisher.publish("plain/b", QoS::AtLeastOnce, false, b"two").await;
        for subscriber in [&mut seer, &mut blind] {
            let copy = subscriber.next_publish().await;
            assert_eq!((topic(&copy), v5::properties(&copy).user_properties), ("plain/b".to_owned(), vec![]));
        }
        assert!(broker.stop().await);
    }
}

#[tokio::test]
async fn mosquitto_clients_see_the_transform_in_both_versions() {
    let (Some(publish), Some(subscribe)) = (
        require_tool("mosquitto_pub", "apt-get install mosquitto-clients"),
        require_tool("mosquitto_sub", "apt-get install mosquitto-clients"),
    ) else {
        return;
    };
    for kind in KINDS {
        let broker = testkit_broker(kind).await;
        for version in ["mqttv311", "mqttv5"] {
            let port = broker.port().to_string();
            let mut sub = external::spawn(tokio::process::Command::new(&subscribe).args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-t",
                "upper/#",
                "-C",
                "1",
                "-W",
                "10",
            ]));
            broker.wait_for_subscriptions(1).await;
            let output = run(
                tokio::process::Command::new(&publish).args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    version,
                    "-t",
                    "upper/m",
                    "-q",
                    "1",
                    "-m",
                    "shout",
                ]),
                Duration::from_secs(10),
            )
            .await;
            assert!(output.status.success(), "{}", describe(&output));
            assert_eq!(sub.stdout_line(Duration::from_secs(10)).await.as_deref(), Some("SHOUT"), "{kind:?} {version}");
            sub.wait(Duration::from_secs(10)).await;
            tollgate_integration_tests::wait_until("mosquitto_sub to leave", || broker.subscription_count() == 0).await;
            // A refused CONNECT is reported by the client.
            let refused = run(
                tokio::process::Command::new(&publish).args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-V",
                    version,
                    "-u",
                    "blocked",
                    "-P",
                    "x",
                    "-t",
                    "a",
                    "-m",
                    "x",
                ]),
                Duration::from_secs(10),
            )
            .await;
            assert!(!refused.status.success(), "{kind:?} {version}: blocked user connected");
            assert!(describe(&refused).to_lowercase().contains("not authori"), "{}", describe(&refused));
        }
        assert!(broker.stop().await);
    }
}

/// A plugin looping, eating memory and trapping on every message of one client: that client's messages fall back
/// to the transform's pass-through policy, the plugin is disabled with backoff, and another client's flow on the
/// same broker never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_plugin_is_contained_while_others_keep_flowing() {
    for kind in KINDS {
        // Only the transform is attached: its failures pass messages through (authorization would fail closed,
        // and once the plugin is disabled, refuse everyone's publishes: see `authorization_failures_fail_closed`).
        let mut entry = plugin_entry("testkit", kind, testkit_path(kind));
        entry.hooks = Some(vec!["transform".into()]);
        let broker = broker_with(vec![entry]).await;
        let stop = Arc::new(AtomicBool::new(false));
        let attacker = {
            let mut attacker = connect_to(&broker, "attacker").await;
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut sent = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    for topic in ["loop/x", "oom/x", "trap/x", "slow/200"] {
                        // Transform failures pass the message through unchanged, so each publish is acknowledged.
                        attacker.publish(topic, QoS::AtLeastOnce, false, b"evil").await;
                        sent += 1;
                    }
                }
                sent
            })
        };
        let mut subscriber = connect_to(&broker, "sub").await;
        subscriber.subscribe_ok("flow/#", QoS::AtLeastOnce).await;
        let mut publisher = connect_to(&broker, "pub").await;
        for index in 0..60u32 {
            let payload = index.to_string();
            publisher.publish(&format!("flow/{index}"), QoS::AtLeastOnce, false, payload.as_bytes()).await;
            let received = within("a flow message during the attack", subscriber.next_publish()).await;
            assert_eq!(received.payload, payload.as_bytes(), "{kind:?}");
        }
        stop.store(true, Ordering::Relaxed);
        let sent = within("the attacker to stop", attacker).await.unwrap();
        assert!(sent >= 4, "{kind:?}: the attacker published {sent} messages");
        assert!(broker.stop().await);
    }
}

#[tokio::test]
async fn authorization_failures_fail_closed() {
    for kind in KINDS {
        let broker = testkit_broker(kind).await;
        let mut publisher = connect_to(&broker, "pub").await;
        for topic in ["loop/a", "trap/a", "oom/a"] {
            let acked = publisher.publish_with(topic, QoS::AtLeastOnce, false, b"x", None).await;
            assert_eq!(acked, Acked::PubAck(PubAckReason::NotAuthorized), "{kind:?} {topic}");
        }
        assert!(broker.stop().await);
    }
}

fn write_script(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("policy.lua");
    std::fs::write(&path, body).unwrap();
    path
}

/// With `purge_retained_on_revoke`, a client a reload revokes loses the retained messages it set, so they do not
/// outlive its access; what others retained stays.
#[tokio::test]
async fn a_revoked_clients_retained_messages_are_purged() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "function authorize_session(client) return nil end\n");
    let entry = plugin_entry("policy", Kind::Lua, script.clone());
    let broker = TestBroker::builder()
        .configure(|config| {
            config.plugins = vec![entry];
            config.auth.purge_retained_on_revoke = true;
        })
        .start()
        .await;
    let mut car = connect_to(&broker, "car").await;
    car.publish("cars/car/status", QoS::AtLeastOnce, true, b"online").await;
    car.publish("cars/car/position", QoS::AtLeastOnce, true, b"here").await;
    let mut other = connect_to(&broker, "other").await;
    other.publish("cars/other/status", QoS::AtLeastOnce, true, b"online").await;

    write_script(
        dir.path(),
        "function authorize_session(client)\n  if client.client_id == 'car' then return 'deny' end\n  return nil\nend\n",
    );
    let summary = broker.server.reload(&broker.config).await.unwrap();
    assert_eq!((summary.revoked, summary.retained_purged), (1, 2), "{summary}");
    car.expect_disconnected().await;
    let mut watcher = connect_to(&broker, "watcher").await;
    watcher.subscribe_ok("cars/#", QoS::AtLeastOnce).await;
    assert_eq!(topic(&watcher.next_publish().await), "cars/other/status");
    watcher.expect_no_publish(QUIET).await;
    assert!(broker.stop().await);
}

/// SIGHUP's reload path under traffic: connections stay up and the new decisions apply right after.
#[tokio::test]
async fn reload_under_traffic_keeps_connections_and_applies_new_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let script = write_script(dir.path(), "function authorize_publish(client, request) return nil end\n");
    let broker = broker_with(vec![plugin_entry("policy", Kind::Lua, script.clone())]).await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_ok("r/#", QoS::AtLeastOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("r/before", QoS::AtLeastOnce, false, b"1").await;
    assert_eq!(topic(&subscriber.next_publish().await), "r/before");

    // A broken edit: the reload reports it and the running version stays.
    std::fs::write(&script, "function authorize_publish(client, request) return 'deny'\n").unwrap();
    let error = broker.server.reload(&broker.config).await.expect_err("a broken plugin is reported");
    assert!(error.to_string().contains("policy") && error.to_string().contains("previous version kept"), "{error}");
    publisher.publish("r/still", QoS::AtLeastOnce, false, b"2").await;
    assert_eq!(topic(&subscriber.next_publish().await), "r/still");

    // A good edit takes effect for the next publish on the same connection.
    std::fs::write(&script, "function authorize_publish(client, request)\n  return 'deny'\nend\n").unwrap();
    broker.server.reload(&broker.config).await.unwrap();
    let denied = publisher.publish_with("r/after", QoS::AtLeastOnce, false, b"3", None).await;
    assert_eq!(denied, Acked::PubAck(PubAckReason::NotAuthorized));
    subscriber.expect_no_publish(QUIET).await;
    // Nobody was disconnected.
    assert_eq!(broker.broker().metrics().clients_connected.load(Ordering::Relaxed), 2);
    assert!(broker.stop().await);
}

/// The auth-wasm example with one key: sensor-1 / "123456".
fn api_keys_entry() -> PluginConfig {
    let mut entry = plugin_entry("api-keys", Kind::Wasm, wasm_build::wasm_plugin("auth-wasm"));
    entry.config = serde_json::json!({ "keys": { "sensor-1": SENSOR_KEY_SHA256 } }).as_object().unwrap().clone();
    entry
}

const SENSOR_KEY_SHA256: &str = "8d969eef6ecad3c29a3a629280e686cf0c3f5d5a86aff3ca12020c923adc6c92"; // "123456"

/// The acl-lua example's connection limit over real sockets: two connections per tenant, a third refused with
/// 0x97, a reconnect under a connected client id let in (a takeover), and room again once a client has left.
#[tokio::test]
async fn the_acl_lua_example_limits_connections_per_tenant() {
    let mut entry =
        plugin_entry("tenants", Kind::Lua, wasm_build::workspace_root().join("examples/acl-lua/tenants.lua"));
    entry.config = serde_json::json!({ "max_connections": 2 }).as_object().unwrap().clone();
    let broker = broker_with(vec![entry]).await;
    let tenant = |client_id: &str| {
        let mut options = options(&broker, client_id);
        options.set_credentials("acme", "");
        options
    };
    let (first, _) = connect(tenant("m1")).await;
    let (second, _) = connect(tenant("m2")).await;
    assert_eq!(v5::refused_code(tenant("m3")).await, ConnectReturnCode::QuotaExceeded);
    // Another tenant has its own count.
    let mut other = options(&broker, "g1");
    other.set_credentials("globex", "");
    connect(other).await.0.disconnect().await;
    // m2 comes back while its old connection is still open: the takeover does not count twice.
    let (second_again, _) = connect(tenant("m2")).await;
    drop(second);
    assert_eq!(v5::refused_code(tenant("m3")).await, ConnectReturnCode::QuotaExceeded);
    first.disconnect().await;
    let (third, _) = within("room for m3 after m1 left", async {
        loop {
            if let Ok(connected) = v5::try_connect(tenant("m3")).await {
                return connected;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    third.disconnect().await;
    second_again.disconnect().await;
    assert!(broker.stop().await);
}

#[tokio::test]
async fn the_auth_wasm_example_checks_api_keys() {
    let entry = api_keys_entry();
    let broker = broker_with(vec![entry]).await;
    let mut good = options(&broker, "s1");
    good.set_credentials("sensor-1", "123456");
    connect(good).await.0.disconnect().await;
    let mut wrong = options(&broker, "s2");
    wrong.set_credentials("sensor-1", "654321");
    assert_eq!(v5::refused_code(wrong).await, ConnectReturnCode::BadUserNamePassword);
    let mut stranger = v4::options(&broker, "s3");
    stranger.set_credentials("intruder", "123456");
    assert_eq!(v4::refused_code(stranger).await, rumqttc::ConnectReturnCode::BadUserNamePassword);
    assert!(broker.stop().await);
}

/// Plugin calls, failures, the plugin's own counters and its call latency appear under
/// `$SYS/broker/plugins/<name>/`.
#[tokio::test]
async fn plugin_metrics_are_published_in_sys() {
    let entry = api_keys_entry();
    let broker = TestBroker::builder()
        .configure(|config| {
            config.plugins = vec![entry];
            config.runtime.plugin_cache_dir = Some(PathBuf::new());
            config.sys.interval = 1;
        })
        .start()
        .await;
    let mut wrong = options(&broker, "s2");
    wrong.set_credentials("sensor-1", "654321");
    assert_eq!(v5::refused_code(wrong).await, ConnectReturnCode::BadUserNamePassword);
    let mut watcher = connect_to(&broker, "watcher").await;
    watcher.subscribe_ok("$SYS/broker/plugins/api-keys/#", QoS::AtMostOnce).await;
    let mut seen = std::collections::BTreeMap::new();
    within("plugin metrics in $SYS", async {
        let wanted = [
            "calls",
            "invocations",
            "failures",
            "counters/refused",
            "latency/authenticate/count",
            "latency/authenticate/p99_us",
            "latency/authenticate/max_us",
        ];
        // One $SYS tick is not one snapshot: a tick that began before the refused CONNECT can
        // publish `calls` as 0 and the counters after it. Such stale zeros are replaced by the next tick.
        let stale = |seen: &std::collections::BTreeMap<String, String>| {
            ["calls", "invocations", "latency/authenticate/count"].iter().any(|name| seen[*name] == "0")
        };
        while !wanted.iter().all(|name| seen.contains_key(*name)) || stale(&seen) {
            let publish = watcher.next_publish().await;
            let name = topic(&publish).trim_start_matches("$SYS/broker/plugins/api-keys/").to_owned();
            seen.insert(name, String::from_utf8_lossy(&publish.payload).into_owned());
        }
    })
    .await;
    // Retained values from the last tick: at least the refused CONNECT was counted.
    assert!(seen["calls"].parse::<u64>().unwrap() >= 1, "{seen:?}");
    // No hook of this plugin takes bursts: every call entered it once.
    assert_eq!(seen["invocations"], seen["calls"], "{seen:?}");
    assert_eq!(seen["failures"], "0", "{seen:?}");
    assert_eq!(seen["counters/refused"], "1", "{seen:?}");
    let timed: u64 = seen["latency/authenticate/count"].parse().unwrap();
    assert!(timed >= 1 && timed <= seen["calls"].parse::<u64>().unwrap(), "{seen:?}");
    let p99: f64 = seen["latency/authenticate/p99_us"].parse().unwrap();
    let max: f64 = seen["latency/authenticate/max_us"].parse().unwrap();
    // A plugin call takes more than nothing and less than its timeout.
    assert!(p99 > 0.0 && p99 <= max && max < 1_000_000.0, "{seen:?}");
    assert!(!seen.contains_key("latency/transform/count"), "a hook never called has no latency: {seen:?}");
    assert!(broker.stop().await);
}

/// Eclipse Paho for Python against both runtimes: CONNECT refused (not authorized), a subscription
/// capped at QoS 0, a denied publish acknowledged with 0x87 (3.1.1: plain acknowledgement, message dropped) and a
/// payload transformed on the way.
#[tokio::test]
async fn paho_clients_meet_the_plugin_decisions() {
    let Some(python) = external::require_paho() else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("paho_client.py");
    for kind in KINDS {
        let broker = testkit_broker(kind).await;
        // paho-mqtt reports 3.1.1's CONNACK return code 5 as reason 0x87 too (rumqttc sees the raw 5 above).
        for (version, refused, denied) in [("5", 0x87, 0x87), ("311", 0x87, 0)] {
            let output = run(
                tokio::process::Command::new(&python).arg(&script).args([
                    "plugin",
                    "--port",
                    &broker.port().to_string(),
                    "--version",
                    version,
                ]),
                Duration::from_secs(30),
            )
            .await;
            assert!(output.status.success(), "{kind:?} {version}: {}", describe(&output));
            let stdout = String::from_utf8_lossy(&output.stdout);
            let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
            assert_eq!(result["blocked_reason"], refused, "{kind:?} {version}: {result}");
            assert_eq!(result["capped_granted"], serde_json::json!([0]), "{kind:?} {version}: {result}");
            assert_eq!(result["deny_reason"], denied, "{kind:?} {version}: {result}");
            assert_eq!((&result["topic"], &result["payload"]), (&"upper/paho".into(), &"SHOUT".into()), "{result}");
        }
        assert!(broker.stop().await);
    }
}
