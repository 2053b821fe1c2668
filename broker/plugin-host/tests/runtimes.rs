//! Both runtimes through the same adapter: every hook, every limit obeyed and exceeded, containment, load errors
//! and reload. No broker: the hook contract is called directly.

#[path = "../../../tests/support/wasm_build.rs"]
mod wasm_build;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tollgate_hooks::{
    AclDecision, Action, AuthDecision, Authenticator, Authorizer, BridgeRouter, ClientInfo, ConnectRequest, HookError,
    Message, ProtocolVersion, QoS, ReasonCode, RouteDecision, RouteDirection, TransformDecision, Transformer,
};
use tollgate_plugin_host::{HookKind, LoadedPlugin, PluginHook, PluginHost, PluginKind, PluginSpec};

fn testkit(kind: PluginKind) -> PluginSpec {
    let path = match kind {
        PluginKind::Wasm => wasm_build::wasm_plugin("testkit-wasm"),
        PluginKind::Lua => wasm_build::workspace_root().join("tests/plugins/testkit.lua"),
    };
    let mut spec = PluginSpec::new(format!("testkit-{kind:?}"), kind, path);
    spec.secrets.insert("k1".into(), b"secret".to_vec());
    spec.limits.cpu_time = Duration::from_millis(30);
    spec.limits.memory_bytes = 16 << 20;
    spec.limits.call_timeout = Duration::from_secs(2);
    spec
}

async fn load(spec: PluginSpec) -> (LoadedPlugin, Arc<PluginHook>) {
    let plugin = LoadedPlugin::load(spec, None).await.expect("plugin loads");
    let hook = plugin.hook();
    (plugin, hook)
}

fn client() -> ClientInfo {
    ClientInfo {
        client_id: "car-1".into(),
        username: Some("alice".into()),
        protocol: ProtocolVersion::V5,
        remote_addr: None,
        listener: "tcp".into(),
        peer: None,
        attributes: Arc::new(BTreeMap::new()),
    }
}

fn message(topic: &str, payload: &str) -> Message {
    Message { topic: topic.into(), payload: Bytes::copy_from_slice(payload.as_bytes()), ..Default::default() }
}

async fn publish(hook: &PluginHook, topic: &str) -> Result<AclDecision, HookError> {
    hook.authorize(&client(), &Action::Publish { topic, qos: QoS::AtLeastOnce, retain: false }).await
}

fn connect(username: &str) -> ConnectRequest {
    ConnectRequest {
        client_id: "c".into(),
        username: Some(username.into()),
        username_from_certificate: false,
        password: None,
        protocol: ProtocolVersion::V311,
        remote_addr: None,
        listener: "tcp".into(),
        peer: None,
        authentication_method: None,
        authentication_data: None,
    }
}

const KINDS: [PluginKind; 2] = [PluginKind::Wasm, PluginKind::Lua];

#[tokio::test]
async fn every_hook_answers_in_both_runtimes() {
    for kind in KINDS {
        let (plugin, hook) = load(testkit(kind)).await;
        assert_eq!(plugin.hooks, HookKind::ALL.to_vec(), "{kind:?}");
        // Authentication.
        assert_eq!(
            hook.authenticate(&connect("blocked")).await,
            Ok(AuthDecision::deny(ReasonCode::NOT_AUTHORIZED)),
            "{kind:?}"
        );
        assert_eq!(hook.authenticate(&connect("alice")).await, Ok(AuthDecision::Abstain), "{kind:?}");
        // Authorization.
        assert_eq!(publish(&hook, "deny/x").await, Ok(AclDecision::Deny(ReasonCode::NOT_AUTHORIZED)), "{kind:?}");
        assert_eq!(publish(&hook, "quota/x").await, Ok(AclDecision::Deny(ReasonCode::QUOTA_EXCEEDED)), "{kind:?}");
        assert_eq!(publish(&hook, "ok/x").await, Ok(AclDecision::Abstain), "{kind:?}");
        let capped = Action::Subscribe { filter: "capped/#", qos: QoS::ExactlyOnce, share_group: None };
        assert_eq!(hook.authorize(&client(), &capped).await, Ok(AclDecision::AllowMaxQos(QoS::AtMostOnce)));
        // Transform.
        let mut upper = message("upper/a", "hello");
        assert_eq!(hook.transform_inbound(&client(), &mut upper).await, Ok(TransformDecision::Modified));
        assert_eq!(upper.payload, Bytes::from_static(b"HELLO"), "{kind:?}");
        let mut rewrite = message("rewrite/b/c", "x");
        hook.transform_inbound(&client(), &mut rewrite).await.expect("rewrite");
        assert_eq!(&*rewrite.topic, "rewritten/b/c", "{kind:?}");
        let mut dropped = message("drop/a", "x");
        assert!(matches!(hook.transform_inbound(&client(), &mut dropped).await, Ok(TransformDecision::Drop { .. })));
        let mut plain = message("plain/a", "x");
        assert_eq!(hook.transform_inbound(&client(), &mut plain).await, Ok(TransformDecision::Keep));
        assert_eq!(plain, message("plain/a", "x"));
        // Host HMAC with a key that lives only in the host.
        let mut signed = message("sign/a", "payload");
        hook.transform_inbound(&client(), &mut signed).await.expect("sign");
        let expected = {
            use hmac::Mac;
            let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"secret").expect("key");
            mac.update(b"payload");
            hex::encode(mac.finalize().into_bytes())
        };
        assert_eq!(signed.user_properties.len(), 1, "{kind:?}");
        assert_eq!((signed.user_properties[0].key.as_str(), &signed.user_properties[0].value), ("sig", &expected));
        // Deliver: each subscriber's copy.
        let mut copy = message("per/a", "x");
        assert_eq!(hook.transform_outbound(&client(), &mut copy).await, Ok(TransformDecision::Modified));
        assert_eq!(
            copy.user_properties,
            vec![tollgate_protocol::UserProperty { key: "to".into(), value: "car-1".into() }],
            "{kind:?}"
        );
        let blind = ClientInfo { client_id: "blind-2".into(), ..client() };
        assert!(matches!(
            hook.transform_outbound(&blind, &mut message("per/a", "x")).await,
            Ok(TransformDecision::Drop { .. })
        ));
        assert_eq!(hook.transform_outbound(&blind, &mut message("upper/a", "x")).await, Ok(TransformDecision::Keep));
        // Route.
        let route = |topic: &'static str| {
            let hook = hook.clone();
            async move { hook.route(RouteDirection::Egress, "cloud", &message(topic, "x")).await }
        };
        assert_eq!(route("local/a").await, Ok(RouteDecision::Drop), "{kind:?}");
        assert_eq!(route("bridge/a/b").await, Ok(RouteDecision::Rewrite { topic: "remote/a/b".into() }));
        assert_eq!(route("other").await, Ok(RouteDecision::Abstain), "{kind:?}");
    }
}

/// The reason of a failed call, whatever it would have answered.
fn failure_of<T: std::fmt::Debug>(result: Result<T, HookError>) -> String {
    match result {
        Err(HookError::Failed { reason, .. }) => reason,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test]
async fn cpu_budget_obeyed_and_exceeded() {
    for kind in KINDS {
        // The budget counts time on the CPU as the guest sees it, so a busy test machine eats into it: leave room.
        let mut spec = testkit(kind);
        spec.limits.cpu_time = Duration::from_millis(100);
        let (plugin, hook) = load(spec).await;
        // 5 ms of work fits a 100 ms budget.
        assert_eq!(publish(&hook, "slow/5").await, Ok(AclDecision::Abstain), "{kind:?}");
        // 1 s does not, and neither does a loop; both stop near the budget, well before the 2 s call timeout.
        for topic in ["slow/1000", "loop/x"] {
            let started = Instant::now();
            let reason = failure_of(publish(&hook, topic).await);
            assert!(reason.contains("CPU time budget"), "{kind:?} {topic}: {reason}");
            assert!(started.elapsed() < Duration::from_millis(900), "{kind:?} {topic}: {:?}", started.elapsed());
        }
        // The instance that looped was replaced: the next call works.
        assert_eq!(publish(&hook, "ok/x").await, Ok(AclDecision::Abstain), "{kind:?}");
        assert_eq!(plugin.shared().metrics.cpu_limit.load(Ordering::Relaxed), 2, "{kind:?}");
    }
}

fn burst(topics: &[&str]) -> Vec<Message> {
    topics.iter().map(|topic| message(topic, "x")).collect()
}

fn untouched(messages: &[Message]) -> bool {
    messages.iter().all(|message| &message.payload[..] == b"x")
}

/// A burst transformed in one call, in both runtimes (`transform-batch` for WASM; for Lua the host loops over the
/// burst inside the VM): it gets each message's CPU budget and counts each message as a call; nothing follows a
/// refusal that disconnects; a loop or a trap fails the whole call and leaves every message as it was, and the next
/// burst works.
#[tokio::test]
async fn a_transform_burst_has_a_budget_per_message_and_fails_as_a_whole() {
    for kind in KINDS {
        let mut spec = testkit(kind);
        spec.limits.cpu_time = Duration::from_millis(100);
        let (plugin, hook) = load(spec).await;
        assert!(hook.transforms_in_batches(), "{kind:?}");
        let metrics = &plugin.shared().metrics;
        let entries_before = metrics.invocations.load();
        let mut cut = burst(&["upper/a", "cut/b", "upper/c"]);
        let decisions = hook.transform_inbound_batch(&client(), &mut cut).await.expect("a burst cut short");
        assert_eq!(decisions.len(), 2, "{kind:?}: nothing after the refusal that disconnects: {decisions:?}");
        assert_eq!((&cut[0].payload[..], &cut[2].payload[..]), (&b"X"[..], &b"x"[..]), "{kind:?}");
        assert_eq!(metrics.invocations.load() - entries_before, 1, "{kind:?}: one call for the whole burst");
        // Three times 60 ms is more than one message's 100 ms, and within three.
        let mut slow = burst(&["slow/60/a", "slow/60/b", "slow/60/c"]);
        let decisions = hook.transform_inbound_batch(&client(), &mut slow).await;
        assert_eq!(decisions, Ok(vec![TransformDecision::Keep; 3]), "{kind:?}");
        // A loop stops at the burst's budget, 300 ms, well before the call timeout (3 × 2 s).
        let started = Instant::now();
        let mut looping = burst(&["upper/a", "loop/b", "upper/c"]);
        let reason = failure_of(hook.transform_inbound_batch(&client(), &mut looping).await);
        assert!(reason.contains("CPU time budget"), "{kind:?}: {reason}");
        assert!(started.elapsed() < Duration::from_millis(1500), "{kind:?}: {:?}", started.elapsed());
        assert!(untouched(&looping), "{kind:?}");
        let mut trapping = burst(&["upper/a", "trap/b"]);
        let reason = failure_of(hook.transform_inbound_batch(&client(), &mut trapping).await);
        assert!(reason.contains("trap") || reason.contains("testkit asked to fail"), "{kind:?}: {reason}");
        assert!(untouched(&trapping), "{kind:?}");
        let mut again = burst(&["upper/a"]);
        let decisions = hook.transform_inbound_batch(&client(), &mut again).await;
        assert_eq!(decisions, Ok(vec![TransformDecision::Modified]), "{kind:?}: the next burst works");
        assert_eq!(metrics.calls.load(), 3 + 3 + 3 + 2 + 1, "{kind:?}");
        assert_eq!(metrics.cpu_limit.load(Ordering::Relaxed), 1, "{kind:?}");
    }
}

/// `host.gauge-set` from both runtimes: the last value set wins, negative values included, and a name that is not a
/// topic is ignored.
#[tokio::test]
async fn gauges_hold_the_last_value_set() {
    for kind in KINDS {
        let (plugin, hook) = load(testkit(kind)).await;
        for topic in ["gauge/clock_trusted/1", "gauge/clock_trusted/0", "gauge/offset_ms/-250", "gauge/a+b/1"] {
            let decision = hook.transform_inbound(&client(), &mut message(topic, "x")).await;
            assert_eq!(decision, Ok(TransformDecision::Keep), "{kind:?}");
        }
        let expected = BTreeMap::from([("clock_trusted".to_owned(), 0), ("offset_ms".to_owned(), -250)]);
        assert_eq!(plugin.shared().gauges(), expected, "{kind:?}");
    }
}

/// `transform-batch` (WASM): the plugin sees the whole burst (the testkit writes its size into the message), and an
/// answer of the wrong length fails the call like a trap.
#[tokio::test]
async fn a_wasm_transform_burst_is_seen_whole_and_a_short_answer_fails_it() {
    let (plugin, hook) = load(testkit(PluginKind::Wasm)).await;
    let mut short = burst(&["upper/a", "short/b"]);
    let reason = failure_of(hook.transform_inbound_batch(&client(), &mut short).await);
    assert!(reason.contains("0 results for 2 messages"), "{reason}");
    assert!(untouched(&short));
    let mut good = burst(&["batch/a", "upper/b", "cut/c", "upper/d"]);
    let decisions = hook.transform_inbound_batch(&client(), &mut good).await.expect("a good batch");
    assert_eq!(decisions.len(), 3, "nothing after the refusal that disconnects: {decisions:?}");
    assert_eq!(good[0].user_properties[0].value, "4");
    assert_eq!((&good[1].payload[..], &good[3].payload[..]), (&b"X"[..], &b"x"[..]));
    assert_eq!(plugin.shared().metrics.traps.load(Ordering::Relaxed), 1, "the broken answer");
}

/// A Lua burst goes through `on_publish` in one call into the VM (the host's loop builds each message table there
/// and packs the answers): each message gets the answer it would get alone, including one carrying properties the
/// loop's strings do not.
#[tokio::test]
async fn a_lua_transform_burst_gives_each_message_its_own_answer() {
    use tollgate_protocol::UserProperty;
    let (_plugin, hook) = load(testkit(PluginKind::Lua)).await;
    let mut good = burst(&["batch/a", "upper/b", "drop/c", "rewrite/d", "refuse/e", "other/f", "sign/g"]);
    good[6].user_properties.push(UserProperty { key: "from".into(), value: "car".into() });
    good[6].content_type = Some("text/plain".into());
    good[6].qos = QoS::AtLeastOnce;
    good[6].retain = true;
    let decisions = hook.transform_inbound_batch(&client(), &mut good).await.expect("a good burst");
    let refused = TransformDecision::Reject {
        reason: ReasonCode::NOT_AUTHORIZED,
        message: "testkit refuses".into(),
        disconnect: false,
    };
    assert_eq!(
        decisions,
        vec![
            TransformDecision::Modified,
            TransformDecision::Modified,
            TransformDecision::Drop { reason: "testkit drops drop/ topics".into() },
            TransformDecision::Modified,
            refused,
            TransformDecision::Keep,
            TransformDecision::Modified,
        ]
    );
    assert_eq!(good[0].user_properties, vec![UserProperty { key: "batch".into(), value: "1".into() }]);
    assert_eq!(&good[1].payload[..], b"X");
    assert_eq!(&*good[3].topic, "rewritten/d");
    assert_eq!((&*good[5].topic, &good[5].payload[..]), ("other/f", &b"x"[..]));
    let signed = &good[6];
    assert_eq!(signed.user_properties.len(), 2, "{:?}", signed.user_properties);
    assert_eq!(signed.user_properties[0], UserProperty { key: "from".into(), value: "car".into() });
    assert_eq!(signed.user_properties[1].key, "sig");
    assert_eq!(signed.content_type.as_deref(), Some("text/plain"));
    assert_eq!((signed.qos, signed.retain), (QoS::AtLeastOnce, true));
}

/// A burst of PUBLISHes authorized in one call, in both runtimes (`authz-batch` for WASM; for Lua the host loops
/// over the burst inside the VM): each request gets the decision it would get alone, the batch gets each request's
/// CPU budget and counts each as a call; a loop or an error fails the whole call, and the next batch works.
#[tokio::test]
async fn an_authorization_batch_has_a_budget_per_request_and_fails_as_a_whole() {
    for kind in KINDS {
        let mut spec = testkit(kind);
        spec.limits.cpu_time = Duration::from_millis(100);
        let (plugin, hook) = load(spec).await;
        assert!(hook.authorizes_in_batches(), "{kind:?}");
        let publishes = |topics: &[&'static str]| {
            topics
                .iter()
                .map(|&topic| Action::Publish { topic, qos: QoS::AtLeastOnce, retain: false })
                .collect::<Vec<_>>()
        };
        let decisions = hook.authorize_batch(&client(), &publishes(&["ok/a", "deny/b", "quota/c", "ok/d"])).await;
        let expected = vec![
            AclDecision::Abstain,
            AclDecision::Deny(ReasonCode::NOT_AUTHORIZED),
            AclDecision::Deny(ReasonCode::QUOTA_EXCEEDED),
            AclDecision::Abstain,
        ];
        assert_eq!(decisions, Ok(expected), "{kind:?}");
        // Three times 60 ms is more than one request's 100 ms, and within three.
        let slow = publishes(&["slow/60/a", "slow/60/b", "slow/60/c"]);
        assert_eq!(hook.authorize_batch(&client(), &slow).await, Ok(vec![AclDecision::Abstain; 3]), "{kind:?}");
        // A loop stops at the batch's budget, 300 ms, well before the call timeout (3 × 2 s).
        let started = Instant::now();
        let reason = failure_of(hook.authorize_batch(&client(), &publishes(&["ok/a", "loop/b", "ok/c"])).await);
        assert!(reason.contains("CPU time budget"), "{kind:?}: {reason}");
        assert!(started.elapsed() < Duration::from_millis(1500), "{kind:?}: {:?}", started.elapsed());
        let reason = failure_of(hook.authorize_batch(&client(), &publishes(&["ok/a", "trap/b"])).await);
        assert!(reason.contains("trap") || reason.contains("testkit asked to fail"), "{kind:?}: {reason}");
        assert_eq!(
            hook.authorize_batch(&client(), &publishes(&["deny/a", "ok/b"])).await,
            Ok(vec![AclDecision::Deny(ReasonCode::NOT_AUTHORIZED), AclDecision::Abstain]),
            "{kind:?}: the next batch works"
        );
        let metrics = &plugin.shared().metrics;
        assert_eq!(metrics.calls.load(), 4 + 3 + 3 + 2 + 2, "{kind:?}");
        assert_eq!(metrics.cpu_limit.load(Ordering::Relaxed), 1, "{kind:?}");
        if kind == PluginKind::Wasm {
            let reason = failure_of(hook.authorize_batch(&client(), &publishes(&["ok/a", "undecided/b"])).await);
            assert!(reason.contains("0 decisions for 2 requests"), "{reason}");
        }
    }
}

#[tokio::test]
async fn memory_cap_obeyed_and_exceeded() {
    for kind in KINDS {
        // A CPU budget that allocation under load cannot exhaust first: this test is about memory.
        let mut spec = testkit(kind);
        spec.limits.cpu_time = Duration::from_secs(5);
        let (plugin, hook) = load(spec).await;
        let mut big = message("upper/a", &"x".repeat(1 << 20));
        assert_eq!(hook.transform_inbound(&client(), &mut big).await, Ok(TransformDecision::Modified), "{kind:?}");
        let reason = failure_of(publish(&hook, "oom/x").await);
        assert!(reason.contains("memory limit"), "{kind:?}: {reason}");
        assert_eq!(publish(&hook, "ok/x").await, Ok(AclDecision::Abstain), "{kind:?}");
        assert_eq!(plugin.shared().metrics.out_of_memory.load(Ordering::Relaxed), 1, "{kind:?}");
    }
}

#[tokio::test]
async fn traps_and_script_errors_are_contained() {
    for kind in KINDS {
        let (plugin, hook) = load(testkit(kind)).await;
        let reason = failure_of(publish(&hook, "trap/x").await);
        assert!(reason.contains("trap") || reason.contains("script error"), "{kind:?}: {reason}");
        assert_eq!(publish(&hook, "deny/x").await, Ok(AclDecision::Deny(ReasonCode::NOT_AUTHORIZED)));
        assert_eq!(plugin.shared().metrics.traps.load(Ordering::Relaxed), 1, "{kind:?}");
        // The deliver hook is contained the same way, and the instance it broke is replaced.
        let outcome = hook.transform_outbound(&client(), &mut message("per/trap/x", "x")).await;
        assert!(matches!(outcome, Err(HookError::Failed { .. })), "{kind:?}: {outcome:?}");
        assert_eq!(plugin.shared().metrics.traps.load(Ordering::Relaxed), 2, "{kind:?}");
        let mut copy = message("per/a", "x");
        assert_eq!(hook.transform_outbound(&client(), &mut copy).await, Ok(TransformDecision::Modified));
    }
}

#[tokio::test]
async fn wall_clock_timeout_obeyed_and_exceeded() {
    for kind in KINDS {
        let mut spec = testkit(kind);
        spec.limits.cpu_time = Duration::from_secs(1);
        spec.limits.call_timeout = Duration::from_millis(40);
        let (plugin, hook) = load(spec).await;
        assert_eq!(publish(&hook, "slow/2").await, Ok(AclDecision::Abstain), "{kind:?}");
        let reason = failure_of(publish(&hook, "slow/300").await);
        assert!(reason.contains("took longer than 40 ms"), "{kind:?}: {reason}");
        assert_eq!(plugin.shared().metrics.timeouts.load(Ordering::Relaxed), 1, "{kind:?}");
        assert_eq!(publish(&hook, "ok/x").await, Ok(AclDecision::Abstain), "{kind:?}");
    }
}

#[tokio::test]
async fn a_crash_looping_plugin_is_disabled() {
    for kind in KINDS {
        let (plugin, hook) = load(testkit(kind)).await;
        for _ in 0..tollgate_plugin_host::shared::CRASH_LOOP_FAILURES {
            failure_of(publish(&hook, "trap/x").await);
        }
        // Disabled: even a harmless call now gets the failure policy, without running the guest.
        let reason = failure_of(publish(&hook, "ok/x").await);
        assert!(reason.contains("disabled"), "{kind:?}: {reason}");
        assert_eq!(plugin.shared().metrics.disabled.load(Ordering::Relaxed), 1, "{kind:?}");
    }
}

/// The worker thread keeps serving while a plugin loops: on a single-threaded runtime, another task keeps
/// ticking during the guest's whole CPU budget.
#[tokio::test(flavor = "current_thread")]
async fn a_looping_plugin_does_not_block_its_worker() {
    for kind in KINDS {
        let mut spec = testkit(kind);
        spec.limits.cpu_time = Duration::from_millis(150);
        let (_plugin, hook) = load(spec).await;
        let ticks = Arc::new(AtomicU64::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    ticks.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        let reason = failure_of(publish(&hook, "loop/x").await);
        ticker.abort();
        assert!(reason.contains("CPU time budget"), "{kind:?}: {reason}");
        let ticks = ticks.load(Ordering::Relaxed);
        // One tick per yield of the guest (every millisecond of its 150): far more than the 0 a blocking call gives.
        assert!(ticks >= 50, "{kind:?}: the other task ran only {ticks} times during the loop");
    }
}

#[tokio::test]
async fn load_errors_name_the_plugin_and_the_reason() {
    let root = wasm_build::workspace_root();
    let dir = std::env::temp_dir().join(format!("tollgate-plugin-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let not_wasm = dir.join("garbage.wasm");
    std::fs::write(&not_wasm, b"not a component").expect("write");
    let bad_lua = dir.join("bad.lua");
    std::fs::write(&bad_lua, "function on_publish(client, msg\n  return nil\nend\n").expect("write");
    let no_hooks = dir.join("none.lua");
    std::fs::write(&no_hooks, "local x = 1\n").expect("write");
    let cases: Vec<(PluginSpec, &str)> = vec![
        (PluginSpec::new("missing", PluginKind::Wasm, dir.join("nope.wasm")), "cannot read"),
        (PluginSpec::new("garbage", PluginKind::Wasm, not_wasm), "not a valid component"),
        (PluginSpec::new("syntax", PluginKind::Lua, bad_lua), "bad.lua"),
        (PluginSpec::new("empty", PluginKind::Lua, no_hooks), "defines none of"),
        (
            {
                let mut spec = testkit(PluginKind::Wasm);
                spec.name = "refuses".into();
                spec.config.insert("fail_init".into(), true.into());
                spec
            },
            "init refused: asked to fail",
        ),
        (
            {
                let mut spec = testkit(PluginKind::Lua);
                spec.name = "refuses-lua".into();
                spec.config.insert("fail_init".into(), true.into());
                spec
            },
            "asked to fail",
        ),
        (
            {
                let mut spec =
                    PluginSpec::new("wrong-hooks", PluginKind::Lua, root.join("tests/plugins/sandbox-probe.lua"));
                spec.hooks = Some(vec![HookKind::Transform]);
                spec
            },
            "hooks includes transform, which the plugin does not implement (it implements: authorize)",
        ),
    ];
    for (spec, expected) in cases {
        let name = spec.name.clone();
        let error = LoadedPlugin::load(spec, None).await.expect_err("must not load");
        assert_eq!(error.plugin, name);
        assert!(error.to_string().contains(expected), "{name}: {error}");
        assert!(error.to_string().contains(&format!("{name:?}")), "{error}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn lua_sandbox_hides_the_dangerous_globals() {
    let spec =
        PluginSpec::new("probe", PluginKind::Lua, wasm_build::workspace_root().join("tests/plugins/sandbox-probe.lua"));
    let (_plugin, hook) = load(spec).await;
    assert_eq!(publish(&hook, "probe").await, Ok(AclDecision::Allow));
}

#[tokio::test]
async fn compiled_components_are_cached_between_starts() {
    let cache = std::env::temp_dir().join(format!("tollgate-cwasm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    LoadedPlugin::load(testkit(PluginKind::Wasm), Some(cache.clone())).await.expect("first load");
    let cached: Vec<PathBuf> =
        std::fs::read_dir(&cache).expect("cache dir").map(|entry| entry.expect("entry").path()).collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(cached[0].extension().is_some_and(|extension| extension == "cwasm"));
    // The second load reads the cached file; it still has to work.
    let (_plugin, hook) = {
        let plugin = LoadedPlugin::load(testkit(PluginKind::Wasm), Some(cache.clone())).await.expect("second load");
        let hook = plugin.hook();
        (plugin, hook)
    };
    assert_eq!(publish(&hook, "deny/x").await, Ok(AclDecision::Deny(ReasonCode::NOT_AUTHORIZED)));
    let _ = std::fs::remove_dir_all(cache);
}

/// The host's loop over a Lua burst uses Luau's own `string` and `table` whatever globals the script defines, and
/// reads every kind of answer back: codes for the common ones, the table beside them for the rest.
#[tokio::test]
async fn a_lua_burst_does_not_depend_on_the_scripts_globals() {
    let dir = std::env::temp_dir().join(format!("tollgate-plugin-globals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("policy.lua");
    std::fs::write(
        &script,
        "string = 'not the library'\ntable = nil\n\
         local answers = { a = 'allow', d = 'deny', n = nil, t = true, f = false, q = { max_qos = 0 },\n\
                           r = { deny = 'quota_exceeded' }, i = 'ignore' }\n\
         function authorize_publish(client, request) return answers[request.topic] end\n",
    )
    .expect("write");
    let (_plugin, hook) = load(PluginSpec::new("globals", PluginKind::Lua, &script)).await;
    let topics = ["a", "d", "n", "t", "f", "q", "r", "i"];
    let actions: Vec<Action<'_>> =
        topics.iter().map(|&topic| Action::Publish { topic, qos: QoS::AtLeastOnce, retain: false }).collect();
    let denied = AclDecision::Deny(ReasonCode::NOT_AUTHORIZED);
    assert_eq!(
        hook.authorize_batch(&client(), &actions).await,
        Ok(vec![
            AclDecision::Allow,
            denied,
            AclDecision::Abstain,
            AclDecision::Allow,
            denied,
            AclDecision::AllowMaxQos(QoS::AtMostOnce),
            AclDecision::Deny(ReasonCode::QUOTA_EXCEEDED),
            AclDecision::Abstain,
        ])
    );
    // The transform loop too: `type` is gone as well, and the script's own `on_publish` still runs per message.
    std::fs::write(
        &script,
        "string = 'not the library'\ntable = nil\ntype = nil\n\
         function on_publish(client, msg) if msg.topic == 'd' then return 'drop' end msg.payload = msg.topic return msg end\n",
    )
    .expect("write");
    let (_plugin, hook) = load(PluginSpec::new("globals", PluginKind::Lua, &script)).await;
    let mut messages = vec![message("a", "x"), message("d", "x"), message("b", "x")];
    let decisions = hook.transform_inbound_batch(&client(), &mut messages).await.expect("a burst");
    assert_eq!(
        decisions,
        vec![
            TransformDecision::Modified,
            TransformDecision::Drop { reason: "dropped by plugin".into() },
            TransformDecision::Modified,
        ]
    );
    assert_eq!((&messages[0].payload[..], &messages[2].payload[..]), (&b"a"[..], &b"b"[..]));
    // Every field comes back as the script left it; a field it cannot have fails the burst, with the single call's
    // words.
    std::fs::write(
        &script,
        "function on_publish(client, msg)\n\
           if msg.topic == 'qos' then msg.qos = 5 end\n\
           if msg.topic == 'wild' then msg.topic = 'a/+' end\n\
           if msg.topic == 'full' then\n\
             msg.response_topic = 'reply/' .. msg.topic; msg.correlation_data = 'c\\0d'; msg.message_expiry = 60\n\
             msg.content_type = 'text/plain'; msg.payload_is_utf8 = true; msg.retain = true; msg.qos = 2\n\
             table.insert(msg.user_properties, { 'k', 'v' })\n\
           end\n\
           return msg\n\
         end\n",
    )
    .expect("write");
    let (_plugin, hook) = load(PluginSpec::new("globals", PluginKind::Lua, &script)).await;
    let mut full = vec![message("full", "x")];
    assert_eq!(hook.transform_inbound_batch(&client(), &mut full).await, Ok(vec![TransformDecision::Modified]));
    let full = &full[0];
    assert_eq!(full.response_topic.as_deref(), Some("reply/full"));
    assert_eq!(full.correlation_data.as_deref(), Some(&b"c\0d"[..]));
    assert_eq!((full.message_expiry_interval, full.content_type.as_deref()), (Some(60), Some("text/plain")));
    assert_eq!((full.payload_format_indicator, full.retain, full.qos), (Some(1), true, QoS::ExactlyOnce));
    assert_eq!(full.user_properties.len(), 1);
    for (topic, words) in [("qos", "message.qos: 5 is not 0, 1 or 2"), ("wild", "contains a wildcard")] {
        let mut burst = vec![message("ok", "x"), message(topic, "x")];
        let reason = failure_of(hook.transform_inbound_batch(&client(), &mut burst).await);
        assert!(reason.contains(words), "{topic}: {reason}");
        assert_eq!(&*burst[0].topic, "ok", "nothing applied");
        let reason = failure_of(hook.transform_inbound(&client(), &mut message(topic, "x")).await);
        assert!(reason.contains(words), "{topic}, alone: {reason}");
    }
    // An answer the single call refuses fails the batch the same way.
    std::fs::write(&script, "function authorize_publish(client, request) return 42 end\n").expect("write");
    let (_plugin, hook) = load(PluginSpec::new("globals", PluginKind::Lua, &script)).await;
    let reason = failure_of(hook.authorize_batch(&client(), &actions[..2]).await);
    assert!(reason.contains("authorize_publish returned a value of type integer"), "{reason}");
    assert!(failure_of(publish(&hook, "a").await).contains("authorize_publish returned a value of type integer"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn reload_keeps_unchanged_plugins_and_the_previous_version_of_a_broken_one() {
    let dir = std::env::temp_dir().join(format!("tollgate-plugin-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("policy.lua");
    std::fs::write(&script, "function authorize_publish(c, r) return 'deny' end\n").expect("write");
    let host = PluginHost::new(None);
    let specs = vec![PluginSpec::new("policy", PluginKind::Lua, &script)];
    let first = host.load(&specs).await.expect("load");
    let again = host.load(&specs).await.expect("reload");
    assert!(Arc::ptr_eq(&first.plugins[0], &again.plugins[0]), "an unchanged plugin is reused");
    // A broken edit keeps the running version and says why.
    std::thread::sleep(Duration::from_millis(20));
    std::fs::write(&script, "function authorize_publish(c, r) return 'allow' \n").expect("write");
    let broken = host.load(&specs).await.expect("reload with a broken plugin");
    assert_eq!(broken.kept_previous.len(), 1);
    assert!(broken.kept_previous[0].to_string().contains("policy"));
    assert!(Arc::ptr_eq(&first.plugins[0], &broken.plugins[0]));
    // A good edit replaces it.
    std::fs::write(&script, "function authorize_publish(c, r) return 'allow' end -- v2\n").expect("write");
    let fixed = host.load(&specs).await.expect("reload");
    assert!(fixed.kept_previous.is_empty());
    let hook = fixed.plugins[0].hook();
    assert_eq!(publish(&hook, "a").await, Ok(AclDecision::Allow));
    // A new plugin that does not load fails the reload as a whole.
    let mut more = specs.clone();
    more.push(PluginSpec::new("ghost", PluginKind::Lua, dir.join("ghost.lua")));
    let errors = host.load(&more).await.err().expect("a new plugin that fails to load fails the reload");
    assert_eq!(errors[0].plugin, "ghost");
    let _ = std::fs::remove_dir_all(dir);
}

/// Contract 0.2.0 from Lua: refusing a message with a reason code, ending a session, durable and atomic kv
/// (back after a restart), derived-key HMAC and constant-time verification, and files read by the broker.
#[tokio::test]
async fn lua_rejects_rechecks_and_keeps_durable_state() {
    let dir = std::env::temp_dir().join(format!("tollgate-plugin-durable-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("contract.lua");
    std::fs::write(
        &script,
        r#"
local banned = {}
function init(config)
  for name in string.gmatch(config.files.banned, "%S+") do banned[name] = true end
end
function authorize_session(client)
  if banned[client.username] then return {deny = "banned"} end
  return nil
end
function on_publish(client, msg)
  if msg.topic == "forged" then
    return {reject = "payload_format_invalid", reason = "bad header", disconnect = true}
  end
  local info = "vin:" .. client.client_id
  local tag = tollgate.hmac_sha256_derived("k1", info, msg.payload)
  if not tollgate.verify_hmac_sha256("k1", info, msg.payload, string.sub(tag, 1, 16))
     or tollgate.verify_hmac_sha256("k1", nil, msg.payload, tag) then
    return {reject = "not_authorized", reason = "crypto mismatch"}
  end
  local n = tollgate.kv_add("seen", 1, true)
  tollgate.kv_set_durable("last", msg.payload)
  local marks = tollgate.kv_get("marks")
  if tollgate.kv_compare_and_set("marks", "not what it holds", "x", true) then
    return {reject = "not_authorized", reason = "compare-and-set ignored what the key held"}
  end
  assert(tollgate.kv_compare_and_set("marks", marks, (marks or "") .. "c", true))
  msg.topic = "signed/" .. n .. "/" .. (tollgate.kv_get("last") or "") .. "/" .. tollgate.kv_get("marks")
  return msg
end
"#,
    )
    .expect("write");
    let banned = dir.join("banned.txt");
    std::fs::write(&banned, "mallory\n").expect("write");
    let spec = || {
        let mut spec = PluginSpec::new("contract", PluginKind::Lua, &script);
        spec.secrets.insert("k1".into(), b"secret".to_vec());
        spec.files.insert("banned".into(), banned.clone());
        spec.state_file = Some(dir.join("state").join("contract.kv"));
        spec
    };
    let (_plugin, hook) = load(spec()).await;
    let mut signed = message("in", "p1");
    assert_eq!(hook.transform_inbound(&client(), &mut signed).await, Ok(TransformDecision::Modified));
    assert_eq!(&*signed.topic, "signed/1/p1/c");
    let mut forged = message("forged", "x");
    assert_eq!(
        hook.transform_inbound(&client(), &mut forged).await,
        Ok(TransformDecision::Reject {
            reason: ReasonCode::PAYLOAD_FORMAT_INVALID,
            message: "bad header".into(),
            disconnect: true
        })
    );
    assert_eq!(hook.authorize(&client(), &Action::Session).await, Ok(AclDecision::Abstain));
    let mallory = ClientInfo { username: Some("mallory".into()), ..client() };
    assert_eq!(hook.authorize(&mallory, &Action::Session).await, Ok(AclDecision::Deny(ReasonCode::BANNED)));

    // A restart: the durable counter and value come back.
    let (_plugin, restarted) = load(spec()).await;
    let mut again = message("in", "p2");
    assert_eq!(restarted.transform_inbound(&client(), &mut again).await, Ok(TransformDecision::Modified));
    assert_eq!(&*again.topic, "signed/2/p2/cc");

    // Without a state directory, durable writes fail: the call fails and its failure policy applies.
    let mut volatile = spec();
    volatile.state_file = None;
    let (_plugin, volatile) = load(volatile).await;
    let error = volatile.transform_inbound(&client(), &mut message("in", "p3")).await.expect_err("no state dir");
    assert!(error.to_string().contains("state_dir"), "{error}");
    // A file the plugin asked for that is missing refuses the load, naming it.
    let mut missing = spec();
    missing.files.insert("gone".into(), dir.join("gone.txt"));
    let error = LoadedPlugin::load(missing, None).await.expect_err("missing file");
    assert!(error.to_string().contains("files.gone"), "{error}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Contract 0.4.0 from Lua: AES-128-CMAC beside HMAC through one `mac`/`verify_mac` pair, expiring claims shared
/// by the plugin's instances, and the clock's synchronization state.
#[tokio::test]
async fn lua_macs_with_cmac_and_claims_once() {
    let dir = std::env::temp_dir().join(format!("tollgate-plugin-cmac-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("cmac.lua");
    std::fs::write(
        &script,
        r#"
function on_publish(client, msg)
  if msg.topic == "bad-alg" then return tollgate.mac("md5", "aes", msg.payload) end
  local tag = tollgate.mac("cmac-aes128", "aes", msg.payload)
  local hmac = tollgate.mac("hmac-sha256", "aes", msg.payload)
  if not tollgate.verify_mac("cmac-aes128", "aes", msg.payload, tag)
     or tollgate.verify_mac("cmac-aes128", "aes", msg.payload .. "x", tag)
     or hmac ~= tollgate.hmac_sha256("aes", msg.payload)
     or #tollgate.mac("cmac-aes128", "aes", msg.payload, "derived:" .. client.client_id) ~= 16 then
    return {reject = "not_authorized", reason = "mac mismatch"}
  end
  if not tollgate.kv_claim("seen/" .. tollgate.hex(msg.payload), 60000) then return "drop" end
  local synced = tollgate.clock_synchronized()
  msg.topic = "cmac/" .. tollgate.hex(tag) .. "/" .. (synced == nil and "unknown" or tostring(synced))
  return msg
end
"#,
    )
    .expect("write");
    let mut spec = PluginSpec::new("cmac", PluginKind::Lua, &script);
    // RFC 4493's example key; the message is its one-block example.
    spec.secrets.insert("aes".into(), hex::decode("2b7e151628aed2a6abf7158809cf4f3c").expect("hex"));
    let (_plugin, hook) = load(spec).await;
    let block = hex::decode("6bc1bee22e409f96e93d7e117393172a").expect("hex");
    let mut first = Message { payload: block.clone().into(), ..message("in", "") };
    assert_eq!(hook.transform_inbound(&client(), &mut first).await, Ok(TransformDecision::Modified));
    let topic = first.topic.to_string();
    assert!(topic.starts_with("cmac/070a16b46b4d4144f79bdd9dd04a287c/"), "{topic}");
    assert!(topic.ends_with("/true") || topic.ends_with("/false"), "Linux always answers: {topic}");
    // The claim is taken: the same payload again is dropped.
    let mut again = Message { payload: block.into(), ..message("in", "") };
    assert!(matches!(hook.transform_inbound(&client(), &mut again).await, Ok(TransformDecision::Drop { .. })));
    let error = hook.transform_inbound(&client(), &mut message("bad-alg", "x")).await.expect_err("unknown alg");
    assert!(error.to_string().contains("unknown MAC algorithm"), "{error}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A changed plugin's new version keeps the key-value table, counters and gauges of the old one (connections still
/// on the old version write to the same ones), while an unrelated plugin does not see them.
#[tokio::test]
async fn a_reloaded_plugin_keeps_its_key_value_table() {
    let dir = std::env::temp_dir().join(format!("tollgate-plugin-kv-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let script = dir.join("counter.lua");
    let source = |version: u32| {
        format!(
            "-- version {version}\nfunction on_publish(c, m)\n  tollgate.kv_set('n', (tollgate.kv_get('n') or '') .. 'x')\n  tollgate.counter_add('seen', 1)\n  tollgate.gauge_add('live', 1)\n  m.topic = tollgate.kv_get('n')\n  return m\nend\n"
        )
    };
    std::fs::write(&script, source(1)).expect("write");
    let host = PluginHost::new(None);
    let specs = vec![PluginSpec::new("counter", PluginKind::Lua, &script)];
    let first = host.load(&specs).await.expect("load").plugins[0].clone();
    let count = |plugin: Arc<LoadedPlugin>| async move {
        let mut message = message("t", "p");
        plugin.hook().transform_inbound(&client(), &mut message).await.expect("transform");
        message.topic.len()
    };
    assert_eq!(count(first.clone()).await, 1);
    assert_eq!(count(first.clone()).await, 2);
    std::fs::write(&script, source(2)).expect("write");
    let second = host.load(&specs).await.expect("reload").plugins[0].clone();
    assert!(!Arc::ptr_eq(&first, &second), "the changed plugin was reloaded");
    assert_eq!(count(second.clone()).await, 3, "the new version continues the old table");
    assert_eq!(count(first).await, 4, "the old version, still serving, writes to the same table");
    assert_eq!(second.shared().counters()["seen"], 4);
    assert_eq!(second.shared().gauges()["live"], 4);
    let other =
        Arc::new(LoadedPlugin::load(PluginSpec::new("other", PluginKind::Lua, &script), None).await.expect("load"));
    assert_eq!(count(other.clone()).await, 1, "another plugin has its own table");
    assert_eq!((other.shared().counters()["seen"], other.shared().gauges()["live"]), (1, 1));
    let _ = std::fs::remove_dir_all(dir);
}
