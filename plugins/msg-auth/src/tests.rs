use tollgate_sdk::testing;
use tollgate_sig::{Present, keys};

use super::*;

const VIN: &str = "1M8GDM9AXKP042788";
const CLOUD: &[u8] = b"cloud-secret-0123456789abcdef0123";
const CLOUD_NEXT: &[u8] = b"cloud-secret-next-0123456789abcdef";
const SITE: &[u8] = b"site-secret-0123456789abcdef012345";
const NOW: u64 = 1_800_000_000_000;

fn config(extra: &[(&str, &str)]) -> Config {
    let base = [
        ("site_id", "site-0042"),
        ("keys.0.kid", "cloud-2026-01"),
        ("keys.0.secret", "cloud-old"),
        ("keys.0.state", "verify-only"),
        ("keys.1.kid", "cloud-2026-07"),
        ("keys.1.secret", "cloud-new"),
        ("keys.2.kid", "site-1"),
        ("keys.2.secret", "site"),
        ("keys.2.derive", "vin-mac-v1:${sub}"),
        ("rules.0.id", "commands"),
        ("rules.0.mode", "verify"),
        ("rules.0.topics.0", "v1/vehicles/+/cmd/#"),
        ("rules.0.accept_kids.0", "cloud-*"),
        ("rules.0.require.0", "ts"),
        ("rules.0.require.1", "ctr"),
        ("rules.0.require.2", "sub"),
        ("rules.0.sub_level", "2"),
        ("rules.0.deny_retained", "true"),
        ("rules.1.id", "uplink"),
        ("rules.1.mode", "attest"),
        ("rules.1.key", "site-1"),
        ("rules.1.topics.0", "v1/vehicles/+/telemetry/#"),
    ];
    base.iter().chain(extra).map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn setup() -> MsgAuth {
    testing::set_secret("cloud-old", CLOUD);
    testing::set_secret("cloud-new", CLOUD_NEXT);
    testing::set_secret("site", SITE);
    testing::set_now_ms(Some(NOW));
    MsgAuth::init(config(&[])).expect("init")
}

fn command_topic() -> String {
    format!("v1/vehicles/{VIN}/cmd/unlock/req")
}

fn signed(kid: &str, secret: &[u8], topic: &str, payload: &[u8], ctr: u64) -> Message {
    let mut signature = Signature {
        kid: kid.into(),
        sub: VIN.into(),
        iss: "cloud".into(),
        ts: NOW - 1000,
        ctr,
        ..Signature::default()
    };
    signature.present = tollgate_sig::Present { sub: true, iss: true, ts: true, ctr: true, nonce: false, exp: false };
    let covered = Covered { topic, payload, ..Covered::default() };
    keys::sign(secret, &mut signature, &covered, 32).expect("signed");
    let mut message = Message::new(topic, payload.to_vec());
    message.user_properties.push(UserProperty { key: PROPERTY.into(), value: signature.header() });
    message
}

fn backend() -> Client {
    Client::new("backend", Some("backend"))
}

fn rejected(result: &TransformResult) -> Option<(DenyReason, String)> {
    match result {
        TransformResult::Reject(rejection) => Some((rejection.reason, rejection.message.clone())),
        _ => None,
    }
}

#[test]
fn a_signed_command_passes_and_its_replay_fails() {
    let plugin = setup();
    let message = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"go", 1);
    assert_eq!(plugin.on_publish(&backend(), message.clone()), TransformResult::Unchanged);
    assert_eq!(
        rejected(&plugin.on_publish(&backend(), message.clone())),
        Some((DenyReason::NotAuthorized, "msg-auth: replay".into()))
    );
    // One second or an hour later, and after a broker restart: still a replay.
    testing::set_now_ms(Some(NOW + 1000));
    assert!(rejected(&plugin.on_publish(&backend(), message.clone())).is_some());
    testing::restart();
    let restarted = MsgAuth::init(config(&[])).expect("init again");
    assert!(rejected(&restarted.on_publish(&backend(), message)).is_some(), "a restart reopened the window");
    assert_eq!(testing::counter("verify/replay"), 3);
}

#[test]
fn a_burst_is_verified_as_its_messages_one_by_one_and_counted_once_at_its_end() {
    let plugin = setup();
    let topic = command_topic();
    let first = signed("cloud-2026-07", CLOUD_NEXT, &topic, b"a", 1);
    let second = signed("cloud-2026-07", CLOUD_NEXT, &topic, b"b", 2);
    let burst = vec![first, second.clone(), second.clone(), signed("cloud-2026-07", CLOUD_NEXT, &topic, b"c", 3)];
    let results = plugin.on_publish_batch(&backend(), burst);
    assert_eq!(results.len(), 4);
    assert_eq!(results[0], TransformResult::Unchanged);
    assert_eq!(results[1], TransformResult::Unchanged);
    assert_eq!(rejected(&results[2]), Some((DenyReason::NotAuthorized, "msg-auth: replay".into())));
    assert_eq!(results[3], TransformResult::Unchanged);
    assert_eq!(testing::counter("verify/ok"), 3, "the burst's successes, added when it ended");
    assert_eq!(testing::counter("verify/replay"), 1);
    // Outside a burst, a message is counted at once and sees the clock as it is now.
    testing::set_now_ms(Some(NOW + 3_600_000));
    assert!(rejected(&plugin.on_publish(&backend(), signed("cloud-2026-07", CLOUD_NEXT, &topic, b"d", 4))).is_some());
    assert_eq!(testing::counter("verify/stale"), 1, "a later clock reading, not the burst's");
    assert_eq!(testing::counter("verify/ok"), 3);
}

#[test]
fn a_copy_verified_at_the_same_instant_as_its_original_is_a_replay() {
    let plugin = setup();
    let message = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"go", 7);
    // The other worker's instance verifies a copy of this very message between this instance's read of the
    // window and its write: the copy gets through first, and this one, reading the window again, is the replay.
    let copy = message.clone();
    let other_passed = std::rc::Rc::new(std::cell::Cell::new(false));
    let passed = other_passed.clone();
    testing::before_next_compare_and_set(move || {
        let other = MsgAuth::init(config(&[])).expect("the other worker's instance");
        passed.set(other.on_publish(&backend(), copy) == TransformResult::Unchanged);
    });
    assert_eq!(
        rejected(&plugin.on_publish(&backend(), message.clone())),
        Some((DenyReason::NotAuthorized, "msg-auth: replay".into()))
    );
    assert!(other_passed.get(), "exactly one of the two copies passes");
    assert!(rejected(&plugin.on_publish(&backend(), message)).is_some());
}

#[test]
fn two_counters_of_one_sender_verified_at_once_both_stay_in_the_window() {
    let plugin = setup();
    let seventh = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"a", 7);
    let eighth = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"b", 8);
    // The sender on two connections: counter 8 moves the window while counter 7 is being checked. Written by
    // read-then-set, counter 7's write would drop 8 from the window (or 8's would drop 7), and the dropped one
    // could be replayed.
    let other = eighth.clone();
    testing::before_next_compare_and_set(move || {
        let instance = MsgAuth::init(config(&[])).expect("the other worker's instance");
        assert_eq!(instance.on_publish(&backend(), other), TransformResult::Unchanged);
    });
    assert_eq!(plugin.on_publish(&backend(), seventh.clone()), TransformResult::Unchanged);
    assert!(rejected(&plugin.on_publish(&backend(), seventh)).is_some(), "counter 7 replayed");
    assert!(rejected(&plugin.on_publish(&backend(), eighth)).is_some(), "counter 8 replayed");
    assert_eq!(testing::counter("verify/ok"), 2);
}

#[test]
fn tampering_with_any_covered_field_fails() {
    let plugin = setup();
    let good = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"go", 10);
    let mut topic = good.clone();
    topic.topic = format!("v1/vehicles/{VIN}/cmd/lock/req");
    let mut payload = good.clone();
    payload.payload = b"GO".to_vec();
    let header = &good.user_properties[0].value;
    let retimed = header.replace(&format!("ts={}", NOW - 1000), &format!("ts={}", NOW - 999));
    let rekeyed = header.replace("kid=cloud-2026-07", "kid=cloud-2026-01");
    let mut retained = good.clone();
    retained.retain = true;
    for (name, message) in [
        ("topic", topic),
        ("payload", payload),
        ("timestamp", with_header(&good, &retimed)),
        ("key id", with_header(&good, &rekeyed)),
    ] {
        assert_eq!(
            rejected(&plugin.on_publish(&backend(), message)).map(|(reason, _)| reason),
            Some(DenyReason::NotAuthorized),
            "{name} tampering passed"
        );
    }
    assert_eq!(
        rejected(&plugin.on_publish(&backend(), retained)).map(|(_, why)| why),
        Some("msg-auth: retained".into())
    );
    // Nothing above moved the replay window: the untouched message still passes once.
    assert_eq!(plugin.on_publish(&backend(), good), TransformResult::Unchanged);
}

fn with_header(message: &Message, header: &str) -> Message {
    let mut message = message.clone();
    message.user_properties[0].value = header.to_owned();
    message
}

#[test]
fn missing_malformed_and_unknown_signatures_fail_with_their_reason() {
    let plugin = setup();
    let unsigned = Message::new(command_topic(), b"go".to_vec());
    assert_eq!(
        rejected(&plugin.on_publish(&backend(), unsigned)).map(|(_, why)| why),
        Some("msg-auth: missing".into())
    );
    let malformed = with_header(&signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"go", 1), "v1;alg=hs256");
    assert_eq!(
        rejected(&plugin.on_publish(&backend(), malformed)).map(|(reason, _)| reason),
        Some(DenyReason::PayloadFormatInvalid)
    );
    // The site key is in the ring but not accepted for commands; a stranger's key is not in the ring.
    for (kid, secret) in [("site-1", SITE), ("cloud-9999", CLOUD)] {
        let message = signed(kid, secret, &command_topic(), b"go", 1);
        assert_eq!(
            rejected(&plugin.on_publish(&backend(), message)).map(|(_, why)| why),
            Some("msg-auth: unknown_kid".into())
        );
    }
    // Signed for another car than the topic names.
    let other = signed("cloud-2026-07", CLOUD_NEXT, "v1/vehicles/1J9RP1A36A1644345/cmd/x/req", b"go", 1);
    assert_eq!(
        rejected(&plugin.on_publish(&backend(), other)).map(|(_, why)| why),
        Some("msg-auth: sub_mismatch".into())
    );
    // Topics without a rule pass untouched.
    assert_eq!(plugin.on_publish(&backend(), Message::new("other/topic", b"x".to_vec())), TransformResult::Unchanged);
}

#[test]
fn stale_and_future_messages_fail() {
    let plugin = setup();
    let message = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"go", 1);
    testing::set_now_ms(Some(NOW + 3_600_000));
    assert_eq!(
        rejected(&plugin.on_publish(&backend(), message.clone())).map(|(_, why)| why),
        Some("msg-auth: stale".into())
    );
    testing::set_now_ms(Some(NOW - 120_000));
    assert_eq!(rejected(&plugin.on_publish(&backend(), message)).map(|(_, why)| why), Some("msg-auth: future".into()));
}

#[test]
fn rotation_with_overlap_loses_nothing_and_retiring_stops_a_key() {
    let plugin = setup();
    let old = signed("cloud-2026-01", CLOUD, &command_topic(), b"a", 1);
    let new = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"b", 1);
    assert_eq!(plugin.on_publish(&backend(), old.clone()), TransformResult::Unchanged, "verify-only keys still verify");
    assert_eq!(plugin.on_publish(&backend(), new), TransformResult::Unchanged);
    let retired = MsgAuth::init(config(&[("keys.0.state", "retired")])).expect("init");
    let old_again = signed("cloud-2026-01", CLOUD, &command_topic(), b"a", 2);
    assert!(rejected(&retired.on_publish(&backend(), old_again)).is_some());
    drop(old);
}

#[test]
fn counters_slightly_out_of_order_pass_once() {
    let plugin = setup();
    for ctr in [5, 3, 4, 9] {
        let message = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"x", ctr);
        assert_eq!(plugin.on_publish(&backend(), message), TransformResult::Unchanged, "ctr {ctr}");
    }
    for ctr in [3, 5, 9] {
        let message = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"x", ctr);
        assert!(rejected(&plugin.on_publish(&backend(), message)).is_some(), "ctr {ctr} replayed");
    }
    assert_eq!(advance_window(100, 0, 30), None, "far behind the window");
    assert_eq!(advance_window(1, 0, 200), Some((200, 0)));
    assert_eq!(advance_window(0, 0, 0), None);
}

#[test]
fn attestation_signs_with_the_brokers_view_of_the_identity() {
    let plugin = setup();
    testing::set_attribute("vin", VIN);
    let topic = format!("v1/vehicles/{VIN}/telemetry/speed");
    let mut sent = Message::new(topic.clone(), b"88".to_vec());
    // A forged signature and status from the car are replaced.
    sent.user_properties.push(UserProperty { key: PROPERTY.into(), value: "v1;forged".into() });
    sent.user_properties.push(UserProperty { key: STATUS_PROPERTY.into(), value: "ok".into() });
    let TransformResult::Modified(out) = plugin.on_publish(&Client::new(VIN, None), sent) else {
        panic!("attest must modify the message")
    };
    assert_eq!(out.user_properties.len(), 1);
    let signature = Signature::parse(&out.user_properties[0].value).expect("header");
    assert_eq!((signature.sub.as_str(), signature.iss.as_str(), signature.ts), (VIN, "site-0042", NOW));
    let key = keys::mac_key(Algorithm::Hs256, SITE, Some(&derive_info("vin-mac-v1:${sub}", VIN)));
    assert!(keys::verify(&key, &signature, &Covered { topic: &topic, payload: b"88", ..Covered::default() }));
    // Counters never repeat, across a restart too.
    let TransformResult::Modified(second) =
        plugin.on_publish(&Client::new(VIN, None), Message::new(topic.clone(), b"89".to_vec()))
    else {
        panic!("modified")
    };
    let second = Signature::parse(&second.user_properties[0].value).expect("header");
    testing::restart();
    testing::set_attribute("vin", VIN);
    let restarted = MsgAuth::init(config(&[])).expect("init");
    let TransformResult::Modified(third) =
        restarted.on_publish(&Client::new(VIN, None), Message::new(topic, b"90".to_vec()))
    else {
        panic!("modified")
    };
    let third = Signature::parse(&third.user_properties[0].value).expect("header");
    assert!(signature.ctr < second.ctr && second.ctr < third.ctr, "{} {} {}", signature.ctr, second.ctr, third.ctr);
}

#[test]
fn attestation_needs_an_identity_and_envelopes_work_for_old_clients() {
    setup();
    let plugin = MsgAuth::init(config(&[("rules.1.carrier", "envelope")])).expect("init");
    let topic = format!("v1/vehicles/{VIN}/telemetry/speed");
    let anonymous = plugin.on_publish(&Client::new("x", None), Message::new(topic.clone(), b"1".to_vec()));
    assert_eq!(rejected(&anonymous).map(|(_, why)| why), Some("msg-auth: no_identity".into()));
    testing::set_attribute("vin", VIN);
    let TransformResult::Modified(out) =
        plugin.on_publish(&Client::new(VIN, None), Message::new(topic.clone(), b"1".to_vec()))
    else {
        panic!("modified")
    };
    let (signature, payload) = tollgate_sig::split_envelope(&out.payload).expect("envelope").expect("valid");
    assert_eq!(payload, b"1");
    let key = keys::mac_key(Algorithm::Hs256, SITE, Some(&derive_info("vin-mac-v1:${sub}", VIN)));
    assert!(keys::verify(&key, &signature, &Covered { topic: &topic, payload, ..Covered::default() }));
}

#[test]
fn shadow_and_tag_modes_deliver() {
    setup();
    let shadow = MsgAuth::init(config(&[("enforce", "false")])).expect("init");
    let unsigned = Message::new(command_topic(), b"go".to_vec());
    assert_eq!(shadow.on_publish(&backend(), unsigned.clone()), TransformResult::Unchanged);
    let tagging = MsgAuth::init(config(&[("rules.0.on_fail", "tag")])).expect("init");
    let TransformResult::Modified(out) = tagging.on_publish(&backend(), unsigned) else { panic!("tagged") };
    assert_eq!(
        out.user_properties,
        vec![UserProperty { key: STATUS_PROPERTY.into(), value: "invalid:missing".into() }]
    );
}

#[test]
fn configuration_errors_are_named() {
    setup();
    let cases: [(&[(&str, &str)], &str); 13] = [
        (&[("rules.1.key", "cloud-2026-01")], "not an active key"),
        (&[("rules.0.resign", "cloud-2026-01")], "rules.0.resign = \"cloud-2026-01\" is not an active key"),
        (&[("rules.1.resign", "site-1")], "only a verify rule re-signs"),
        (&[("rules.2.mode", "sign"), ("rules.2.topics.0", "up/#")], "rules.2.key: an sign rule names the key"),
        (
            &[("rules.2.mode", "sign"), ("rules.2.topics.0", "up/#"), ("rules.2.key", "site-1")],
            "derived per sub, so the rule needs sub_level",
        ),
        // The rule of `config` requires sub; one that does not cannot derive a per-sub key.
        (
            &[("rules.2.mode", "verify"), ("rules.2.topics.0", "other/#"), ("rules.2.resign", "site-1")],
            "must require \"sub\"",
        ),
        (&[("rules.1.key", "nope")], "not in keys"),
        (&[("rules.0.require.3", "salt")], "require"),
        (&[("keys.3.kid", "tcu"), ("keys.3.alg", "md5")], "keys.3.alg = \"md5\" is not hs256 or cmac-aes128"),
        // An AES-128 key is 16 bytes; the cloud secret is longer.
        (&[("keys.3.kid", "tcu"), ("keys.3.alg", "cmac-aes128"), ("keys.3.secret", "cloud-new")], "not 16 bytes"),
        (&[("clock_trust", "sometimes")], "clock_trust"),
        (&[("keys.3.kid", "x"), ("keys.3.secret", "absent")], "keys.3.secret"),
        (&[("mac_len", "8")], "mac_len"),
    ];
    for (extra, expected) in cases {
        let error = MsgAuth::init(config(extra)).err().unwrap_or_default();
        assert!(error.contains(expected), "{extra:?}: {error}");
    }
    assert!(MsgAuth::init(Config::default()).err().is_some_and(|error| error.contains("no keys")));
}

fn disconnects(result: &TransformResult) -> bool {
    matches!(result, TransformResult::Reject(rejection) if rejection.disconnect)
}

#[test]
fn an_expired_key_neither_verifies_nor_signs() {
    testing::set_secret("cloud-old", CLOUD);
    testing::set_secret("cloud-new", CLOUD_NEXT);
    testing::set_secret("site", SITE);
    testing::set_now_ms(Some(NOW));
    // NOW is 2027-01-15T08:00:00Z.
    let plugin = MsgAuth::init(config(&[
        ("keys.1.not_after", "2027-01-15T08:00:01Z"),
        ("keys.2.not_after", "2027-01-15T08:00:01Z"),
    ]))
    .expect("init");
    // Each deadline is a gauge in Unix seconds, for a dashboard to count down from.
    assert_eq!(testing::gauge("keys/cloud-2026-07/not_after_s"), Some(NOW as i64 / 1000 + 1));
    assert_eq!(testing::gauge("keys/cloud-2026-01/not_after_s"), None, "a key without a deadline has none");
    let message = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"go", 1);
    let mut car = Message::new(format!("v1/vehicles/{VIN}/telemetry/speed"), b"88".to_vec());
    car.qos = Qos::AtLeastOnce;
    testing::set_attribute("vin", VIN);
    assert!(matches!(plugin.on_publish(&Client::new(VIN, None), car.clone()), TransformResult::Modified(_)));
    assert_eq!(plugin.on_publish(&backend(), message.clone()), TransformResult::Unchanged, "valid until then");

    testing::set_now_ms(Some(NOW + 1000));
    let late = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"go", 2);
    assert_eq!(
        rejected(&plugin.on_publish(&backend(), late)),
        Some((DenyReason::NotAuthorized, "msg-auth: expired_kid".into()))
    );
    assert_eq!(
        rejected(&plugin.on_publish(&Client::new(VIN, None), car)),
        Some((DenyReason::NotAuthorized, "msg-auth: expired_kid".into())),
        "an attest rule stops signing with it too"
    );
    assert!(MsgAuth::init(config(&[("keys.1.not_after", "next tuesday")])).is_err());
    testing::set_now_ms(None);
}

#[test]
fn a_client_sending_bad_tags_is_disconnected_at_the_limit() {
    let plugin = setup();
    let forged = |ctr: u64| {
        let mut message = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"go", ctr);
        message.payload = b"GO".to_vec();
        message
    };
    // The default limit is five bad MACs per client and minute; the first four are only refused.
    for ctr in 1..=4 {
        let result = plugin.on_publish(&backend(), forged(ctr));
        assert!(rejected(&result).is_some() && !disconnects(&result), "bad tag {ctr}");
    }
    assert!(disconnects(&plugin.on_publish(&backend(), forged(5))));
    // Another client is not affected, and a new minute starts over.
    assert!(!disconnects(&plugin.on_publish(&Client::new("other", Some("backend")), forged(6))));
    testing::set_now_ms(Some(NOW + 60_000));
    assert!(!disconnects(&plugin.on_publish(&backend(), forged(7))));
    assert!(MsgAuth::init(config(&[("bad_mac_disconnect", "many")])).is_err());
    let patient = MsgAuth::init(config(&[("bad_mac_disconnect", "0")])).expect("init");
    for ctr in 8..20 {
        assert!(!disconnects(&patient.on_publish(&backend(), forged(ctr))), "0 turns it off");
    }
}

fn resigned_header(result: TransformResult) -> (Message, Signature) {
    let TransformResult::Modified(out) = result else { panic!("a re-signed message is modified: {result:?}") };
    let headers: Vec<_> = out.user_properties.iter().filter(|property| property.key == PROPERTY).collect();
    assert_eq!(headers.len(), 1, "one signature: {:?}", out.user_properties);
    let signature = Signature::parse(&headers[0].value).expect("header");
    (out, signature)
}

#[test]
fn a_verified_command_is_resigned_with_the_cars_own_key() {
    setup();
    let plugin =
        MsgAuth::init(config(&[("rules.0.resign", "site-1"), ("rules.0.resign_chain", "true")])).expect("init");
    let topic = command_topic();
    let mut sent = signed("cloud-2026-07", CLOUD_NEXT, &topic, b"unlock", 7);
    // A client cannot plant a chain of its own.
    sent.user_properties.push(UserProperty { key: PREVIOUS_PROPERTY.into(), value: "v1;forged".into() });
    let original = sent.user_properties[0].value.clone();
    let (out, signature) = resigned_header(plugin.on_publish(&backend(), sent.clone()));
    assert_eq!(out.payload, b"unlock");
    assert_eq!(
        (signature.kid.as_str(), signature.sub.as_str(), signature.iss.as_str(), signature.ts),
        ("site-1", VIN, "site-0042", NOW)
    );
    // The car checks it with the key derived for its VIN; the cloud's key does not verify it.
    let car_key = keys::mac_key(Algorithm::Hs256, SITE, Some(&derive_info("vin-mac-v1:${sub}", VIN)));
    let covered = Covered { topic: &topic, payload: b"unlock", ..Covered::default() };
    assert!(keys::verify(&car_key, &signature, &covered));
    assert!(!keys::verify(&keys::mac_key(Algorithm::Hs256, CLOUD_NEXT, None), &signature, &covered));
    let chained: Vec<_> = out.user_properties.iter().filter(|property| property.key == PREVIOUS_PROPERTY).collect();
    assert_eq!(chained.len(), 1);
    assert_eq!(
        Signature::parse(&chained[0].value).expect("previous").header(),
        Signature::parse(&original).expect("original").header()
    );
    // Verification still guards the gate: the same command again is a replay, and the broker's counter moves.
    assert_eq!(rejected(&plugin.on_publish(&backend(), sent)).map(|(_, why)| why), Some("msg-auth: replay".into()));
    let (_, next) =
        resigned_header(plugin.on_publish(&backend(), signed("cloud-2026-07", CLOUD_NEXT, &topic, b"lock", 8)));
    assert!(next.ctr > signature.ctr);
}

#[test]
fn resigning_keeps_the_expiry_and_unwraps_an_envelope() {
    setup();
    let plugin = MsgAuth::init(config(&[("rules.0.resign", "site-1")])).expect("init");
    let topic = command_topic();
    let mut signature = Signature {
        kid: "cloud-2026-07".into(),
        sub: VIN.into(),
        ts: NOW - 1000,
        ctr: 3,
        exp: NOW + 60_000,
        ..Signature::default()
    };
    signature.present = tollgate_sig::Present { sub: true, iss: false, ts: true, ctr: true, nonce: false, exp: true };
    keys::sign(CLOUD_NEXT, &mut signature, &Covered { topic: &topic, payload: b"go", ..Covered::default() }, 32)
        .expect("signed");
    let enveloped = Message::new(topic.clone(), tollgate_sig::envelope(&signature, b"go"));
    let (out, resigned) = resigned_header(plugin.on_publish(&backend(), enveloped));
    assert_eq!(out.payload, b"go", "the cloud's envelope is replaced by the property carrier");
    assert_eq!(resigned.exp, NOW + 60_000);
    let car_key = keys::mac_key(Algorithm::Hs256, SITE, Some(&derive_info("vin-mac-v1:${sub}", VIN)));
    assert!(keys::verify(&car_key, &resigned, &Covered { topic: &topic, payload: b"go", ..Covered::default() }));
}

const SIGN_RULE: [(&str, &str); 7] = [
    ("rules.2.id", "to-cloud"),
    ("rules.2.mode", "sign"),
    ("rules.2.topics.0", "v1/vehicles/+/telemetry/#"),
    ("rules.2.key", "site-1"),
    ("rules.2.sub_level", "2"),
    ("rules.2.subscribers.0", "cloud-*"),
    ("rules.2.chain", "true"),
];

#[test]
fn copies_for_the_cloud_leave_signed_at_send_time_and_others_untouched() {
    setup();
    let plugin = MsgAuth::init(config(&SIGN_RULE)).expect("init");
    assert_eq!(plugin.hooks(), vec![Hook::Transform, Hook::Deliver]);
    testing::set_attribute("vin", VIN);
    let topic = format!("v1/vehicles/{VIN}/telemetry/speed");
    // What the car's publish became at ingress: attested by the broker.
    let TransformResult::Modified(attested) =
        plugin.on_publish(&Client::new(VIN, None), Message::new(topic.clone(), b"88".to_vec()))
    else {
        panic!("attested")
    };
    testing::clear_attributes();
    let ingress_header = attested.user_properties[0].value.clone();
    // What this broker found at ingress travels on: signing must not launder it.
    let mut attested = attested;
    attested.user_properties.push(UserProperty { key: STATUS_PROPERTY.into(), value: "invalid:stale".into() });
    // An hour later (an uplink outage), the bridge's copy is sent.
    testing::set_now_ms(Some(NOW + 3_600_000));
    assert_eq!(plugin.on_deliver(&Client::new("dashboard", None), attested.clone()), TransformResult::Unchanged);
    let TransformResult::Modified(sent) = plugin.on_deliver(&Client::new("cloud-bridge", None), attested) else {
        panic!("the cloud's copy is signed")
    };
    let header = |key: &str| -> Vec<String> {
        sent.user_properties
            .iter()
            .filter(|property| property.key == key)
            .map(|property| property.value.clone())
            .collect()
    };
    assert_eq!(header(PREVIOUS_PROPERTY), vec![ingress_header]);
    assert_eq!(header(STATUS_PROPERTY), vec!["invalid:stale".to_owned()]);
    let signature = Signature::parse(&header(PROPERTY)[0]).expect("header");
    assert_eq!((signature.sub.as_str(), signature.iss.as_str(), signature.ts), (VIN, "site-0042", NOW + 3_600_000));
    let key = keys::mac_key(Algorithm::Hs256, SITE, Some(&derive_info("vin-mac-v1:${sub}", VIN)));
    assert!(keys::verify(&key, &signature, &Covered { topic: &topic, payload: b"88", ..Covered::default() }));
    assert_eq!(testing::counter("sign/ok"), 1);
}

#[test]
fn a_copy_that_cannot_be_signed_is_not_sent_and_deliver_is_attached_only_when_needed() {
    setup();
    let only_sign: Config = [
        ("site_id", "site-0042"),
        ("keys.0.kid", "site-1"),
        ("keys.0.secret", "site"),
        ("keys.0.derive", "vin-mac-v1:${sub}"),
        ("rules.0.mode", "sign"),
        ("rules.0.topics.0", "v1/vehicles/+/telemetry/#"),
        ("rules.0.key", "site-1"),
        ("rules.0.sub_level", "2"),
    ]
    .into_iter()
    .collect();
    let plugin = MsgAuth::init(only_sign).expect("init");
    assert_eq!(plugin.hooks(), vec![Hook::Transform, Hook::Deliver]);
    assert_eq!(setup().hooks(), vec![Hook::Transform]);
    // At ingress on a sign rule's topic, a client's own signature statuses are stripped, nothing else happens.
    let topic = format!("v1/vehicles/{VIN}/telemetry/x");
    let mut claimed = Message::new(topic.clone(), b"x".to_vec());
    claimed.user_properties.push(UserProperty { key: STATUS_PROPERTY.into(), value: "ok".into() });
    assert_eq!(
        plugin.on_publish(&Client::new("car", None), claimed),
        TransformResult::Modified(Message::new(topic, b"x".to_vec()))
    );
    let cloud = Client::new("cloud-1", None);
    let copy = |topic: &str| Message::new(topic, b"x".to_vec());
    assert!(matches!(
        plugin.on_deliver(&cloud, copy(&format!("v1/vehicles/{VIN}/telemetry/x"))),
        TransformResult::Modified(_)
    ));
    // No VIN at the sub level to sign for: the copy is refused, which for a subscriber means not sent.
    let refused = plugin.on_deliver(&cloud, copy("v1/vehicles/a b/telemetry/x"));
    assert_eq!(rejected(&refused).map(|(_, why)| why), Some("msg-auth: no_identity".into()));
    assert_eq!(plugin.on_deliver(&cloud, copy("v1/other")), TransformResult::Unchanged);
}

#[test]
fn quarantine_moves_a_refused_message_under_its_prefix() {
    setup();
    let quarantine = MsgAuth::init(config(&[("rules.0.on_fail", "quarantine:$quarantine/msg-auth")])).expect("init");
    let mut unsigned = Message::new(command_topic(), b"go".to_vec());
    unsigned.retain = true;
    let TransformResult::Modified(out) = quarantine.on_publish(&backend(), unsigned.clone()) else {
        panic!("quarantined")
    };
    assert_eq!(out.topic, format!("$quarantine/msg-auth/{}", command_topic()));
    assert!(!out.retain, "a quarantined message is never retained");
    assert_eq!(out.payload, b"go");
    // The rule denies retained commands: that is the first failure found.
    assert_eq!(
        out.user_properties,
        vec![UserProperty { key: STATUS_PROPERTY.into(), value: "invalid:retained".into() }]
    );
    // Shadow mode only logs, whatever the rule says.
    let shadow = MsgAuth::init(config(&[("rules.0.on_fail", "quarantine:q"), ("enforce", "false")])).expect("init");
    assert_eq!(shadow.on_publish(&backend(), unsigned), TransformResult::Unchanged);
}

#[test]
fn quarantine_prefixes_are_checked() {
    setup();
    for bad in ["quarantine:", "quarantine:q/+", "quarantine:q/#", "quarantine:q/", "quarantine"] {
        let error = MsgAuth::init(config(&[("rules.0.on_fail", bad)])).err().expect(bad);
        assert!(error.contains("rules.0.on_fail"), "{bad}: {error}");
    }
    let sign = [
        ("rules.2.id", "up"),
        ("rules.2.mode", "sign"),
        ("rules.2.topics.0", "up/#"),
        ("rules.2.key", "cloud-2026-07"),
        ("rules.2.on_fail", "quarantine:q"),
    ];
    let error = MsgAuth::init(config(&sign)).err().expect("sign rules cannot quarantine");
    assert!(error.contains("cannot quarantine"), "{error}");
}

#[test]
fn signing_counters_are_reserved_durably_and_resume_above_the_reservation() {
    setup();
    testing::set_attribute("vin", VIN);
    let topic = format!("v1/vehicles/{VIN}/telemetry/speed");
    let attest = |plugin: &MsgAuth| {
        let TransformResult::Modified(out) =
            plugin.on_publish(&Client::new(VIN, None), Message::new(topic.clone(), b"1".to_vec()))
        else {
            panic!("attested")
        };
        Signature::parse(&out.user_properties[0].value).expect("header").ctr
    };
    let plugin = MsgAuth::init(config(&[("counter_reserve", "10")])).expect("init");
    let issued: Vec<u64> = (0..12).map(|_| attest(&plugin)).collect();
    assert_eq!(issued, (1..=12).collect::<Vec<_>>(), "one after the other while running");
    // A crash loses what was not durable; the reservation (written before counter 1, then before 12) was.
    testing::restart();
    testing::set_attribute("vin", VIN);
    let restarted = MsgAuth::init(config(&[("counter_reserve", "10")])).expect("init");
    let resumed = attest(&restarted);
    assert!(resumed > 12, "a counter never repeats after a restart: {resumed}");
    assert!(resumed <= 12 + 10 + 1, "and skips at most one reservation: {resumed}");
    assert!(MsgAuth::init(config(&[("counter_reserve", "0")])).err().expect("refused").contains("counter_reserve"));
}

#[test]
fn keys_near_or_past_not_after_are_reported_once_a_day() {
    setup();
    let day = 86_400_000;
    let expiring_soon = [("keys.1.not_after", "2027-01-18T08:00:00Z")]; // NOW + 3 days
    let warnings = || testing::logs().iter().filter(|line| line.contains("\"key_expiring\"")).count();
    let before = warnings();
    let plugin = MsgAuth::init(config(&expiring_soon)).expect("init");
    assert_eq!(warnings(), before + 1, "{:?}", testing::logs());
    let line = testing::logs().into_iter().rev().find(|line| line.contains("key_expiring")).expect("event");
    assert!(line.contains("cloud-2026-07") && line.contains("\"hours_left\":\"72\""), "{line}");
    // Another instance, and this one an hour later: still once that day.
    MsgAuth::init(config(&expiring_soon)).expect("init");
    testing::set_now_ms(Some(NOW + 3_600_000));
    let message = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"1", 50);
    let _ = plugin.on_publish(&backend(), message);
    assert_eq!(warnings(), before + 1);
    // The next day it is said again; past the date it is an expiry.
    testing::set_now_ms(Some(NOW + day + 2 * 3_600_000));
    let _ = plugin.on_publish(&backend(), signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"1", 51));
    assert_eq!(warnings(), before + 2);
    testing::set_now_ms(Some(NOW + 4 * day));
    MsgAuth::init(config(&expiring_soon)).expect("init");
    assert!(testing::logs().iter().any(|line| line.contains("\"key_expired\"")));
    // Off with 0, and far-off dates say nothing (after a restart, so no claim of today's warning is left).
    testing::restart();
    testing::set_now_ms(Some(NOW));
    let quiet_before = testing::logs().len();
    MsgAuth::init(config(&[("keys.1.not_after", "2027-01-18T08:00:00Z"), ("key_expiry_warning_days", "0")]))
        .expect("init");
    MsgAuth::init(config(&[("keys.1.not_after", "2030-01-01T00:00:00Z")])).expect("init");
    assert_eq!(testing::logs().len(), quiet_before);
}

const TCU_KEY: &[u8] = b"0123456789abcdef";

/// A command signed with `alg`, with a nonce and no counter unless `ctr` is given.
fn signed_with(alg: Algorithm, kid: &str, key: &[u8], nonce: &str, ctr: Option<u64>, ts: u64) -> Message {
    let topic = command_topic();
    let mut signature = Signature {
        alg,
        kid: kid.into(),
        sub: VIN.into(),
        ts,
        ctr: ctr.unwrap_or(0),
        nonce: nonce.into(),
        present: Present { sub: true, ts: true, ctr: ctr.is_some(), nonce: !nonce.is_empty(), ..Present::default() },
        ..Signature::default()
    };
    keys::sign(key, &mut signature, &Covered { topic: &topic, payload: b"go", ..Covered::default() }, 32)
        .expect("signed");
    let mut message = Message::new(topic, b"go".to_vec());
    message.user_properties.push(UserProperty { key: PROPERTY.into(), value: signature.header() });
    message
}

fn why(result: &TransformResult) -> Option<String> {
    rejected(result).map(|(_, why)| why)
}

#[test]
fn cmac_keys_verify_16_byte_tags_and_refuse_other_algorithms() {
    setup();
    testing::set_secret("tcu", TCU_KEY);
    let plugin =
        MsgAuth::init(config(&[("keys.3.kid", "cloud-tcu"), ("keys.3.alg", "cmac-aes128"), ("keys.3.secret", "tcu")]))
            .expect("init");
    let good = signed_with(Algorithm::CmacAes128, "cloud-tcu", TCU_KEY, "", Some(1), NOW - 1000);
    assert_eq!(plugin.on_publish(&backend(), good.clone()), TransformResult::Unchanged);
    assert_eq!(why(&plugin.on_publish(&backend(), good)), Some("msg-auth: replay".into()));
    // The same key id with HMAC: the key makes CMAC only.
    let relabelled = signed_with(Algorithm::Hs256, "cloud-tcu", TCU_KEY, "", Some(2), NOW - 1000);
    assert_eq!(why(&plugin.on_publish(&backend(), relabelled)), Some("msg-auth: unknown_kid".into()));
    // A tampered CMAC tag, and a CMAC tag under another key.
    let mut tampered = signed_with(Algorithm::CmacAes128, "cloud-tcu", TCU_KEY, "", Some(3), NOW - 1000);
    tampered.payload = b"GO".to_vec();
    assert_eq!(why(&plugin.on_publish(&backend(), tampered)), Some("msg-auth: bad_mac".into()));
    let foreign = signed_with(Algorithm::CmacAes128, "cloud-tcu", b"fedcba9876543210", "", Some(4), NOW - 1000);
    assert_eq!(why(&plugin.on_publish(&backend(), foreign)), Some("msg-auth: bad_mac".into()));
}

#[test]
fn an_attest_rule_with_a_cmac_key_signs_cmac() {
    setup();
    testing::set_secret("tcu", TCU_KEY);
    let plugin = MsgAuth::init(config(&[
        ("keys.3.kid", "site-cmac"),
        ("keys.3.alg", "cmac-aes128"),
        ("keys.3.secret", "tcu"),
        ("rules.1.key", "site-cmac"),
    ]))
    .expect("init");
    testing::set_attribute("vin", VIN);
    let topic = format!("v1/vehicles/{VIN}/telemetry/speed");
    let TransformResult::Modified(attested) =
        plugin.on_publish(&backend(), Message::new(topic.as_str(), b"88".to_vec()))
    else {
        panic!("not attested")
    };
    let header = attested.user_properties.iter().find(|property| property.key == PROPERTY).expect("x-sig");
    let signature = Signature::parse(&header.value).expect("readable");
    assert_eq!((signature.alg, signature.mac.len()), (Algorithm::CmacAes128, 16));
    assert!(keys::verify(TCU_KEY, &signature, &Covered { topic: &topic, payload: b"88", ..Covered::default() }));
}

#[test]
fn nonces_refuse_replays_without_counters_and_across_a_restart() {
    setup();
    let nonce_rule = [("rules.0.require.0", "ts"), ("rules.0.require.1", "nonce"), ("rules.0.require.2", "sub")];
    // The broker started ten seconds ago (its first instance set the floor of its nonce records then).
    testing::restart();
    testing::set_now_ms(Some(NOW - 10_000));
    MsgAuth::init(config(&nonce_rule)).expect("init");
    testing::set_now_ms(Some(NOW));
    let plugin = MsgAuth::init(config(&nonce_rule)).expect("init");
    let first = signed_with(Algorithm::Hs256, "cloud-2026-07", CLOUD_NEXT, "n-1", None, NOW - 1000);
    assert_eq!(plugin.on_publish(&backend(), first.clone()), TransformResult::Unchanged);
    assert_eq!(why(&plugin.on_publish(&backend(), first.clone())), Some("msg-auth: replay".into()));
    // Another nonce from another replica of the signer, at the same instant: no counter to share, both pass.
    let second = signed_with(Algorithm::Hs256, "cloud-2026-07", CLOUD_NEXT, "n-2", None, NOW - 1000);
    assert_eq!(plugin.on_publish(&backend(), second), TransformResult::Unchanged);
    // A minute later the nonce is still remembered; once the timestamp is stale, the window refuses it instead.
    testing::set_now_ms(Some(NOW + 60_000));
    assert_eq!(why(&plugin.on_publish(&backend(), first.clone())), Some("msg-auth: replay".into()));
    testing::set_now_ms(Some(NOW + 200_000));
    assert_eq!(why(&plugin.on_publish(&backend(), first.clone())), Some("msg-auth: stale".into()));

    // A nonce without a timestamp cannot be bounded; a rule requiring a nonce refuses a message without one.
    testing::set_now_ms(Some(NOW));
    let mut untimed = signed_with(Algorithm::Hs256, "cloud-2026-07", CLOUD_NEXT, "n-3", None, NOW - 1000);
    let mut signature = Signature::parse(&untimed.user_properties[0].value).expect("readable");
    signature.ts = 0;
    signature.present.ts = false;
    let topic = command_topic();
    keys::sign(CLOUD_NEXT, &mut signature, &Covered { topic: &topic, payload: b"go", ..Covered::default() }, 32)
        .expect("signed");
    untimed.user_properties[0].value = signature.header();
    let lenient = MsgAuth::init(config(&[("rules.0.require.0", "sub")])).expect("init");
    assert_eq!(why(&lenient.on_publish(&backend(), untimed)), Some("msg-auth: missing_field".into()));
    let no_nonce = signed_with(Algorithm::Hs256, "cloud-2026-07", CLOUD_NEXT, "", Some(9), NOW - 1000);
    assert_eq!(why(&plugin.on_publish(&backend(), no_nonce)), Some("msg-auth: missing_field".into()));

    // A restart forgets nonces: what was signed before it and relies on a nonce alone is refused, what is
    // signed after it passes.
    let before_restart = signed_with(Algorithm::Hs256, "cloud-2026-07", CLOUD_NEXT, "n-4", None, NOW - 1000);
    testing::restart();
    testing::set_now_ms(Some(NOW + 5_000));
    let restarted = MsgAuth::init(config(&nonce_rule)).expect("init again");
    assert_eq!(why(&restarted.on_publish(&backend(), first)), Some("msg-auth: replay".into()));
    assert_eq!(why(&restarted.on_publish(&backend(), before_restart)), Some("msg-auth: replay".into()));
    let after = signed_with(Algorithm::Hs256, "cloud-2026-07", CLOUD_NEXT, "n-5", None, NOW + 5_000);
    assert_eq!(restarted.on_publish(&backend(), after), TransformResult::Unchanged);
}

#[test]
fn with_clock_trust_synchronized_an_unsynchronized_clock_does_not_refuse_by_time() {
    setup();
    let plugin = MsgAuth::init(config(&[("clock_trust", "synchronized")])).expect("init");
    let old = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"go", 1);
    testing::set_now_ms(Some(NOW + 3_600_000));
    testing::set_clock_synchronized(Some(true));
    assert_eq!(why(&plugin.on_publish(&backend(), old.clone())), Some("msg-auth: stale".into()));
    assert_eq!(testing::gauge("clock_trusted"), Some(1));
    // Booted offline: the wall clock says nothing, the counter still refuses replays.
    testing::set_clock_synchronized(Some(false));
    assert_eq!(plugin.on_publish(&backend(), old.clone()), TransformResult::Unchanged);
    assert_eq!(why(&plugin.on_publish(&backend(), old)), Some("msg-auth: replay".into()));
    assert_eq!(testing::counter("verify/clock_untrusted"), 2);
    assert_eq!(testing::gauge("clock_trusted"), Some(0), "the gauge follows the clock");
    // Where the broker cannot tell, the clock is trusted.
    testing::set_clock_synchronized(None);
    let older = signed("cloud-2026-07", CLOUD_NEXT, &command_topic(), b"go", 2);
    assert_eq!(why(&plugin.on_publish(&backend(), older)), Some("msg-auth: stale".into()));
}
