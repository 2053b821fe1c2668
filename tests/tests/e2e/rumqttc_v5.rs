//! MQTT 5 end to end with rumqttc: each test starts its own broker on 127.0.0.1:0.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode, Filter, LastWillProperties, PubAckReason, PubRecReason, PublishProperties, RetainForwardRule,
    SubscribeReasonCode,
};
use tollgate_integration_tests::v5::{self, Acked, connect, connect_to, options, options_with_will, properties, topic};
use tollgate_integration_tests::{QUIET, TestBroker};

#[tokio::test]
async fn qos_0_1_2_round_trips() {
    let broker = TestBroker::start().await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_ok("rt/#", QoS::ExactlyOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;

    for (qos, name, payload) in [
        (QoS::AtMostOnce, "rt/zero", b"payload zero".as_slice()),
        (QoS::AtLeastOnce, "rt/one", b"payload one"),
        (QoS::ExactlyOnce, "rt/two", b"payload two \x00\xFF binary"),
    ] {
        publisher.publish(name, qos, false, payload).await;
        let received = subscriber.next_publish().await;
        assert_eq!(topic(&received), name);
        assert_eq!(&received.payload[..], payload);
        assert_eq!(received.qos, qos);
        assert!(!received.retain);
    }
    subscriber.expect_no_publish(QUIET).await;

    // v5 acknowledges a publish nobody receives with 0x10.
    let acked = publisher.publish_with("nobody/listens", QoS::AtLeastOnce, false, b"x", None).await;
    assert_eq!(acked, Acked::PubAck(PubAckReason::NoMatchingSubscribers));

    publisher.disconnect().await;
    subscriber.disconnect().await;
    assert!(broker.stop().await);
}

#[tokio::test]
async fn retained_set_replace_delete_and_replay() {
    let broker = TestBroker::start().await;
    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("ret/a", QoS::AtLeastOnce, true, b"first").await;
    publisher.publish("ret/a", QoS::AtLeastOnce, true, b"second").await;

    let mut late = connect_to(&broker, "late").await;
    late.subscribe_ok("ret/#", QoS::AtLeastOnce).await;
    let replayed = late.next_publish().await;
    assert_eq!(topic(&replayed), "ret/a");
    assert_eq!(&replayed.payload[..], b"second");
    assert!(replayed.retain, "a replayed retained message is flagged retained");
    late.expect_no_publish(QUIET).await;

    publisher.publish("ret/a", QoS::AtLeastOnce, true, b"").await;
    let deletion = late.next_publish().await;
    assert!(deletion.payload.is_empty());

    let mut later = connect_to(&broker, "later").await;
    later.subscribe_ok("ret/#", QoS::AtLeastOnce).await;
    later.expect_no_publish(QUIET).await;
}

#[tokio::test]
async fn retain_handling_options() {
    let broker = TestBroker::start().await;
    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("rh/t", QoS::AtLeastOnce, true, b"kept").await;

    let mut client = connect_to(&broker, "sub").await;
    // 2: never send retained messages on subscribe.
    let never = Filter { retain_forward_rule: RetainForwardRule::Never, ..Filter::new("rh/#", QoS::AtLeastOnce) };
    assert_eq!(client.subscribe_with(vec![never], None).await, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    client.expect_no_publish(QUIET).await;

    // 1: only when the subscription is new. "rh/t" is new, so it is sent; repeating it sends nothing.
    let on_new =
        || Filter { retain_forward_rule: RetainForwardRule::OnNewSubscribe, ..Filter::new("rh/t", QoS::AtLeastOnce) };
    client.subscribe_with(vec![on_new()], None).await;
    assert_eq!(&client.next_publish().await.payload[..], b"kept");
    client.subscribe_with(vec![on_new()], None).await;
    client.expect_no_publish(QUIET).await;

    // 0 (default): every subscribe.
    client.subscribe_ok("rh/t", QoS::AtLeastOnce).await;
    assert_eq!(&client.next_publish().await.payload[..], b"kept");
}

#[tokio::test]
async fn will_is_published_on_abrupt_close_with_properties() {
    let broker = TestBroker::start().await;
    let mut watcher = connect_to(&broker, "watcher").await;
    watcher.subscribe_ok("wills/#", QoS::AtLeastOnce).await;

    let will_properties = LastWillProperties {
        delay_interval: None,
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: Some("text/plain".into()),
        response_topic: None,
        correlation_data: None,
        user_properties: vec![("why".into(), "crash".into())],
    };
    let (doomed, _) =
        connect(options_with_will(&broker, "doomed", "wills/doomed", "gone", QoS::AtLeastOnce, Some(will_properties)))
            .await;
    doomed.kill().await;

    let will = watcher.next_publish().await;
    assert_eq!(topic(&will), "wills/doomed");
    assert_eq!(&will.payload[..], b"gone");
    assert_eq!(will.qos, QoS::AtLeastOnce);
    let props = properties(&will);
    assert_eq!(props.content_type.as_deref(), Some("text/plain"));
    assert_eq!(props.user_properties, vec![("why".to_string(), "crash".to_string())]);
}

#[tokio::test]
async fn will_is_not_published_on_clean_disconnect() {
    let broker = TestBroker::start().await;
    let mut watcher = connect_to(&broker, "watcher").await;
    watcher.subscribe_ok("wills/#", QoS::AtLeastOnce).await;
    let (polite, _) =
        connect(options_with_will(&broker, "polite", "wills/polite", "never", QoS::AtLeastOnce, None)).await;
    polite.disconnect().await;
    watcher.expect_no_publish(QUIET).await;

    let mut other = connect_to(&broker, "other").await;
    other.publish("wills/control", QoS::AtLeastOnce, false, b"c").await;
    assert_eq!(topic(&watcher.next_publish().await), "wills/control");
}

#[tokio::test]
async fn persistent_session_queues_qos1_while_offline() {
    let broker = TestBroker::start().await;
    let mut persistent = options(&broker, "durable");
    persistent.set_clean_start(false);
    persistent.set_session_expiry_interval(Some(300));

    let (mut client, connack) = connect(persistent.clone()).await;
    assert!(!connack.session_present);
    client.subscribe_ok("queue/#", QoS::AtLeastOnce).await;
    client.disconnect().await;

    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("queue/0", QoS::AtMostOnce, false, b"not queued").await;
    publisher.publish("queue/1", QoS::AtLeastOnce, false, b"queued").await;

    let (mut client, connack) = connect(persistent.clone()).await;
    assert!(connack.session_present);
    let queued = client.next_publish().await;
    assert_eq!(topic(&queued), "queue/1");
    assert_eq!(&queued.payload[..], b"queued");
    assert_eq!(queued.qos, QoS::AtLeastOnce);
    client.expect_no_publish(QUIET).await;
    client.disconnect().await;

    // Session expiry 0 (the default) ends the session at disconnect.
    let (client, _) = connect(options(&broker, "ephemeral")).await;
    client.disconnect().await;
    let mut resume = options(&broker, "ephemeral");
    resume.set_clean_start(false);
    let (client, connack) = connect(resume).await;
    assert!(!connack.session_present, "expiry 0 keeps nothing");
    client.disconnect().await;
}

#[tokio::test]
async fn session_takeover_disconnects_the_first_client() {
    let broker = TestBroker::start().await;
    let mut first = connect_to(&broker, "same-id").await;
    first.subscribe_ok("takeover/#", QoS::AtLeastOnce).await;

    let mut second = connect_to(&broker, "same-id").await;
    // The broker sends DISCONNECT 0x8E as `E0 01 8E` (property length omitted, which MQTT 5 section 3.14.2.2.1
    // allows). rumqttc 0.25 cannot parse that form and reports the connection as aborted instead, so the reason
    // code is asserted with a raw client in `session_takeover_reason_code_is_0x8e`.
    let ended = first.expect_disconnected().await;
    assert!(
        matches!(
            ended,
            rumqttc::v5::ConnectionError::MqttState(
                rumqttc::v5::StateError::ConnectionAborted | rumqttc::v5::StateError::ServerDisconnect { .. }
            )
        ),
        "{ended:?}"
    );

    second.subscribe_ok("takeover/#", QoS::AtLeastOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("takeover/x", QoS::AtLeastOnce, false, b"new owner").await;
    assert_eq!(&second.next_publish().await.payload[..], b"new owner");
    second.expect_no_publish(QUIET).await;
}

#[tokio::test]
async fn session_takeover_resumes_the_session() {
    let broker = TestBroker::start().await;
    let mut persistent = options(&broker, "same-id");
    persistent.set_clean_start(false);
    persistent.set_session_expiry_interval(Some(60));
    let (mut first, _) = connect(persistent.clone()).await;
    first.subscribe_ok("resume/#", QoS::AtLeastOnce).await;

    let (mut second, connack) = connect(persistent).await;
    assert!(connack.session_present, "takeover without clean start keeps the session");
    first.expect_disconnected().await;

    // The subscription made on the first connection delivers to the second.
    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("resume/x", QoS::AtLeastOnce, false, b"carried over").await;
    assert_eq!(&second.next_publish().await.payload[..], b"carried over");
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_highest_qos_with_every_identifier() {
    let broker = TestBroker::start().await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_with_id("over/#", QoS::AtMostOnce, 1).await;
    subscriber.subscribe_with_id("over/+/x", QoS::ExactlyOnce, 2).await;
    subscriber.subscribe_with_id("over/b/#", QoS::AtLeastOnce, 3).await;
    let mut publisher = connect_to(&broker, "pub").await;

    publisher.publish("over/a/x", QoS::ExactlyOnce, false, b"once").await;
    let received = subscriber.next_publish().await;
    assert_eq!(topic(&received), "over/a/x");
    assert_eq!(received.qos, QoS::ExactlyOnce);
    let mut ids = properties(&received).subscription_identifiers;
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2], "one delivery carrying both matching identifiers");
    subscriber.expect_no_publish(QUIET).await;

    // Only the matching subscription's identifier.
    publisher.publish("over/c", QoS::AtLeastOnce, false, b"one id").await;
    let received = subscriber.next_publish().await;
    assert_eq!(properties(&received).subscription_identifiers, vec![1]);
    assert_eq!(received.qos, QoS::AtMostOnce);
}

#[tokio::test]
async fn subscription_identifiers_on_retained_replay() {
    let broker = TestBroker::start().await;
    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("sid/r", QoS::AtLeastOnce, true, b"r").await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_with_id("sid/#", QoS::AtLeastOnce, 42).await;
    let replay = subscriber.next_publish().await;
    assert!(replay.retain);
    assert_eq!(properties(&replay).subscription_identifiers, vec![42]);
}

#[tokio::test]
async fn shared_subscription_round_robins_between_two_subscribers() {
    let broker = TestBroker::start().await;
    let mut alpha = connect_to(&broker, "alpha").await;
    let mut beta = connect_to(&broker, "beta").await;
    alpha.subscribe_ok("$share/g/jobs/#", QoS::AtLeastOnce).await;
    beta.subscribe_ok("$share/g/jobs/#", QoS::AtLeastOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;

    for index in 0..6 {
        publisher.publish(&format!("jobs/{index}"), QoS::AtLeastOnce, false, format!("job {index}").as_bytes()).await;
    }
    let mut alpha_got = Vec::new();
    let mut beta_got = Vec::new();
    for _ in 0..3 {
        alpha_got.push(topic(&alpha.next_publish().await));
        beta_got.push(topic(&beta.next_publish().await));
    }
    alpha.expect_no_publish(QUIET).await;
    beta.expect_no_publish(Duration::from_millis(50)).await;
    let mut all: Vec<String> = alpha_got.iter().chain(&beta_got).cloned().collect();
    all.sort();
    assert_eq!(all, (0..6).map(|index| format!("jobs/{index}")).collect::<Vec<_>>(), "each job exactly once");
    // Strict alternation: the members split the jobs evenly, one taking the odd ones and one the even ones.
    let parities: Vec<bool> = alpha_got.iter().map(|t| t.ends_with(['1', '3', '5'])).collect();
    assert!(parities.iter().all(|p| *p == parities[0]), "alpha got {alpha_got:?}, beta got {beta_got:?}");
}

#[tokio::test]
async fn shared_subscription_and_normal_subscription_both_receive() {
    let broker = TestBroker::start().await;
    let mut shared = connect_to(&broker, "shared").await;
    shared.subscribe_ok("$share/g/t", QoS::AtLeastOnce).await;
    let mut normal = connect_to(&broker, "normal").await;
    normal.subscribe_ok("t", QoS::AtLeastOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("t", QoS::AtLeastOnce, false, b"both").await;
    assert_eq!(&shared.next_publish().await.payload[..], b"both");
    assert_eq!(&normal.next_publish().await.payload[..], b"both");
}

#[tokio::test]
async fn properties_pass_through() {
    let broker = TestBroker::start().await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_ok("props/#", QoS::AtLeastOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;

    let sent = PublishProperties {
        payload_format_indicator: Some(1),
        content_type: Some("application/json".into()),
        response_topic: Some("props/replies/42".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        user_properties: vec![
            ("k1".into(), "v1".into()),
            ("k1".into(), "duplicate keys are kept".into()),
            ("ключ".into(), "значение".into()),
        ],
        ..PublishProperties::default()
    };
    let acked = publisher.publish_with("props/x", QoS::AtLeastOnce, false, br#"{"a":1}"#, Some(sent.clone())).await;
    assert_eq!(acked, Acked::PubAck(PubAckReason::Success));

    let received = subscriber.next_publish().await;
    assert_eq!(&received.payload[..], br#"{"a":1}"#);
    let got = properties(&received);
    assert_eq!(got.payload_format_indicator, Some(1));
    assert_eq!(got.content_type, sent.content_type);
    assert_eq!(got.response_topic, sent.response_topic);
    assert_eq!(got.correlation_data, sent.correlation_data);
    assert_eq!(got.user_properties, sent.user_properties, "order and duplicates preserved");
    assert_eq!(got.message_expiry_interval, None);
}

#[tokio::test]
async fn no_local_suppresses_own_messages() {
    let broker = TestBroker::start().await;
    let mut client = connect_to(&broker, "talker").await;
    let no_local = Filter { nolocal: true, ..Filter::new("chat/#", QoS::AtLeastOnce) };
    assert_eq!(client.subscribe_with(vec![no_local], None).await, vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
    let mut echo = connect_to(&broker, "echo").await;
    echo.subscribe_ok("chat/#", QoS::AtLeastOnce).await;

    client.publish("chat/room", QoS::AtLeastOnce, false, b"mine").await;
    assert_eq!(&echo.next_publish().await.payload[..], b"mine", "others still receive it");
    client.expect_no_publish(QUIET).await;

    echo.publish("chat/room", QoS::AtLeastOnce, false, b"theirs").await;
    assert_eq!(&client.next_publish().await.payload[..], b"theirs");
}

#[tokio::test]
async fn retain_as_published_keeps_the_flag_on_live_delivery() {
    let broker = TestBroker::start().await;
    let mut keeps = connect_to(&broker, "keeps").await;
    let rap = Filter { preserve_retain: true, ..Filter::new("rap/#", QoS::AtLeastOnce) };
    keeps.subscribe_with(vec![rap], None).await;
    let mut clears = connect_to(&broker, "clears").await;
    clears.subscribe_ok("rap/#", QoS::AtLeastOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;

    publisher.publish("rap/x", QoS::AtLeastOnce, true, b"flagged").await;
    let kept = keeps.next_publish().await;
    assert_eq!(&kept.payload[..], b"flagged");
    assert!(kept.retain, "retain as published");
    let cleared = clears.next_publish().await;
    assert!(!cleared.retain, "without the option, live deliveries have retain cleared");

    publisher.publish("rap/y", QoS::AtLeastOnce, false, b"plain").await;
    assert!(!keeps.next_publish().await.retain);
}

#[tokio::test]
async fn expired_message_is_not_delivered_to_a_reconnecting_session() {
    let broker = TestBroker::start().await;
    let mut persistent = options(&broker, "sleeper");
    persistent.set_clean_start(false);
    persistent.set_session_expiry_interval(Some(300));
    let (mut client, _) = connect(persistent.clone()).await;
    client.subscribe_ok("exp/#", QoS::AtLeastOnce).await;
    client.disconnect().await;

    let mut publisher = connect_to(&broker, "pub").await;
    let short = PublishProperties { message_expiry_interval: Some(1), ..PublishProperties::default() };
    let long = PublishProperties { message_expiry_interval: Some(120), ..PublishProperties::default() };
    publisher.publish_with("exp/short", QoS::AtLeastOnce, false, b"stale", Some(short)).await;
    publisher.publish_with("exp/long", QoS::AtLeastOnce, false, b"fresh", Some(long)).await;

    // Let the 1 s expiry pass while the session is offline (nothing to await: this is the passage of time).
    tokio::time::sleep(Duration::from_millis(1300)).await;

    let (mut client, connack) = connect(persistent).await;
    assert!(connack.session_present);
    // Queued in order: receiving the later message first proves the earlier one was discarded.
    let first = client.next_publish().await;
    assert_eq!(topic(&first), "exp/long");
    assert_eq!(&first.payload[..], b"fresh");
    let remaining = properties(&first).message_expiry_interval.expect("expiry is forwarded");
    assert!((117..=120).contains(&remaining), "remaining lifetime is forwarded, got {remaining}");
    client.expect_no_publish(QUIET).await;
}

#[tokio::test]
async fn topic_alias_from_client() {
    let broker = TestBroker::start().await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_ok("alias/#", QoS::AtLeastOnce).await;
    let (mut publisher, connack) = connect(options(&broker, "pub")).await;
    let maximum = connack.properties.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0);
    assert!(maximum >= 1, "the broker accepts topic aliases (topic_alias_max {maximum})");

    let with_alias = |alias| PublishProperties { topic_alias: Some(alias), ..PublishProperties::default() };
    publisher.publish_with("alias/long/topic/name", QoS::AtLeastOnce, false, b"first", Some(with_alias(1))).await;
    // Empty topic: the alias stands in for it.
    let acked = publisher.publish_with("", QoS::AtLeastOnce, false, b"second", Some(with_alias(1))).await;
    assert_eq!(acked, Acked::PubAck(PubAckReason::Success));
    // Re-mapping the alias to another topic.
    publisher.publish_with("alias/other", QoS::AtLeastOnce, false, b"third", Some(with_alias(1))).await;
    publisher.publish_with("", QoS::AtLeastOnce, false, b"fourth", Some(with_alias(1))).await;

    let mut got = Vec::new();
    for _ in 0..4 {
        let publish = subscriber.next_publish().await;
        got.push((topic(&publish), String::from_utf8(publish.payload.to_vec()).unwrap()));
    }
    let expected = [
        ("alias/long/topic/name", "first"),
        ("alias/long/topic/name", "second"),
        ("alias/other", "third"),
        ("alias/other", "fourth"),
    ];
    assert_eq!(got, expected.map(|(t, p)| (t.to_string(), p.to_string())));
}

#[tokio::test]
async fn topic_alias_above_maximum_is_a_protocol_violation() {
    let broker = TestBroker::builder().configure(|config| config.limits.topic_alias_maximum = 2).start().await;
    let (mut publisher, connack) = connect(options(&broker, "pub")).await;
    assert_eq!(connack.properties.as_ref().and_then(|p| p.topic_alias_max), Some(2));
    // rumqttc itself refuses an alias above the broker's maximum, so send it with a raw client.
    let mut raw = tollgate_integration_tests::raw::tcp(broker.addr, tollgate_protocol::ProtocolVersion::V5).await;
    raw.connect_ok(tollgate_protocol::ProtocolVersion::V5, "raw").await;
    let mut publish =
        tollgate_integration_tests::raw::publish_packet("a", tollgate_protocol::QoS::AtMostOnce, None, b"x");
    publish.properties.topic_alias = Some(3);
    raw.send(&tollgate_protocol::Packet::Publish(publish)).await;
    raw.expect_disconnect(tollgate_protocol::ReasonCode::TOPIC_ALIAS_INVALID).await;
    publisher.publish("still/fine", QoS::AtLeastOnce, false, b"ok").await;
}

fn acl_broker() -> tollgate_integration_tests::BrokerBuilder {
    TestBroker::builder().acl("pattern write allowed/#\npattern read #\ntopic deny secret/#\n")
}

#[tokio::test]
async fn denied_publish_gets_0x87() {
    let broker = acl_broker().start().await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_ok("#", QoS::AtLeastOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;

    let acked = publisher.publish_with("forbidden/x", QoS::AtLeastOnce, false, b"no", None).await;
    assert_eq!(acked, Acked::PubAck(PubAckReason::NotAuthorized));
    let acked = publisher.publish_with("forbidden/y", QoS::ExactlyOnce, false, b"no", None).await;
    assert_eq!(acked, Acked::PubRec(PubRecReason::NotAuthorized));
    subscriber.expect_no_publish(QUIET).await;

    // The publisher stays connected and may publish where allowed.
    publisher.publish("allowed/x", QoS::AtLeastOnce, false, b"yes").await;
    let received = subscriber.next_publish().await;
    assert_eq!(topic(&received), "allowed/x");
}

#[tokio::test]
async fn denied_subscribe_gets_0x80() {
    let broker = acl_broker().start().await;
    let mut client = connect_to(&broker, "sub").await;
    let codes = client
        .subscribe_with(
            vec![Filter::new("secret/#", QoS::AtLeastOnce), Filter::new("public/#", QoS::AtLeastOnce)],
            None,
        )
        .await;
    // The ACL file answers a refused subscription with 0x80 (Unspecified error) on purpose, also in v5: see
    // `AclFileAuthorizer::authorize` in broker/builtins/src/lib.rs. Refused publishes get 0x87.
    assert_eq!(codes, vec![SubscribeReasonCode::Unspecified, SubscribeReasonCode::Success(QoS::AtLeastOnce)]);
}

#[tokio::test]
async fn password_file_accepts_good_and_refuses_bad_password() {
    let broker = TestBroker::builder().users(&[("alice", "wonderland")]).start().await;
    let mut good = options(&broker, "alice-client");
    good.set_credentials("alice", "wonderland");
    connect(good).await.0.disconnect().await;

    let mut bad = options(&broker, "alice-bad");
    bad.set_credentials("alice", "nope");
    assert_eq!(v5::refused_code(bad).await, ConnectReturnCode::BadUserNamePassword, "CONNACK 0x86");
}

#[tokio::test]
async fn anonymous_refused_when_not_allowed() {
    let broker = TestBroker::builder().allow_anonymous(false).users(&[("alice", "wonderland")]).start().await;
    assert_eq!(v5::refused_code(options(&broker, "anon")).await, ConnectReturnCode::NotAuthorized, "CONNACK 0x87");
}

#[tokio::test]
async fn server_keep_alive_is_announced_when_the_client_asks_for_more() {
    let broker = TestBroker::builder().configure(|config| config.limits.max_keepalive = 20).start().await;
    let mut asking = options(&broker, "greedy");
    asking.set_keep_alive(Duration::from_secs(600));
    let (client, connack) = connect(asking).await;
    assert_eq!(connack.properties.and_then(|p| p.server_keep_alive), Some(20));
    client.disconnect().await;
}

#[tokio::test]
async fn session_takeover_reason_code_is_0x8e() {
    use tollgate_integration_tests::raw;
    use tollgate_protocol::{ProtocolVersion, ReasonCode};
    let broker = TestBroker::start().await;
    let mut first = raw::tcp(broker.addr, ProtocolVersion::V5).await;
    first.connect_ok(ProtocolVersion::V5, "same-id").await;
    let (second, _) = connect(options(&broker, "same-id")).await;
    first.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;
    second.disconnect().await;
}

#[tokio::test]
async fn shared_subscriptions_get_no_retained_messages() {
    let broker = TestBroker::start().await;
    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("sr/t", QoS::AtLeastOnce, true, b"retained").await;
    let mut shared = connect_to(&broker, "shared").await;
    shared.subscribe_ok("$share/g/sr/#", QoS::AtLeastOnce).await;
    shared.expect_no_publish(QUIET).await;
    publisher.publish("sr/t", QoS::AtLeastOnce, false, b"live").await;
    assert_eq!(&shared.next_publish().await.payload[..], b"live");
}

#[tokio::test]
async fn shared_subscription_prefers_connected_members() {
    let broker = TestBroker::start().await;
    let mut sleepy_options = options(&broker, "sleepy");
    sleepy_options.set_clean_start(false);
    sleepy_options.set_session_expiry_interval(Some(60));
    let (mut sleepy, _) = connect(sleepy_options.clone()).await;
    sleepy.subscribe_ok("$share/g/work", QoS::AtLeastOnce).await;
    let mut awake = connect_to(&broker, "awake").await;
    awake.subscribe_ok("$share/g/work", QoS::AtLeastOnce).await;
    sleepy.disconnect().await;

    let mut publisher = connect_to(&broker, "pub").await;
    for index in 0..4 {
        publisher.publish("work", QoS::AtLeastOnce, false, format!("job {index}").as_bytes()).await;
    }
    for index in 0..4 {
        assert_eq!(awake.next_publish().await.payload, format!("job {index}").into_bytes());
    }
    let (mut sleepy, connack) = connect(sleepy_options).await;
    assert!(connack.session_present);
    sleepy.expect_no_publish(QUIET).await;
}
