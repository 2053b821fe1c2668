//! MQTT 3.1.1 end to end with rumqttc: each test starts its own broker on 127.0.0.1:0.

#![allow(clippy::unwrap_used)]

use rumqttc::{ConnectReturnCode, QoS, SubscribeReasonCode};
use tollgate_integration_tests::v4::{self, connect, connect_to, options, options_with_will};
use tollgate_integration_tests::{QUIET, TestBroker};

#[tokio::test]
async fn qos_0_1_2_round_trips() {
    let broker = TestBroker::start().await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_ok("rt/#", QoS::ExactlyOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;

    for (qos, topic, payload) in [
        (QoS::AtMostOnce, "rt/zero", b"payload zero".as_slice()),
        (QoS::AtLeastOnce, "rt/one", b"payload one"),
        (QoS::ExactlyOnce, "rt/two", b"payload two \x00\xFF binary"),
    ] {
        publisher.publish(topic, qos, false, payload).await;
        let received = subscriber.next_publish().await;
        assert_eq!(received.topic, topic);
        assert_eq!(&received.payload[..], payload);
        assert_eq!(received.qos, qos, "delivered at the publish QoS");
        assert!(!received.retain);
        assert!(!received.dup);
    }
    subscriber.expect_no_publish(QUIET).await;
    publisher.disconnect().await;
    subscriber.disconnect().await;
    assert!(broker.stop().await);
}

#[tokio::test]
async fn delivery_qos_is_the_lower_of_publish_and_granted() {
    let broker = TestBroker::start().await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_ok("down/q1", QoS::AtLeastOnce).await;
    subscriber.subscribe_ok("down/q0", QoS::AtMostOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;

    publisher.publish("down/q1", QoS::ExactlyOnce, false, b"a").await;
    let received = subscriber.next_publish().await;
    assert_eq!((received.topic.as_str(), received.qos), ("down/q1", QoS::AtLeastOnce));

    publisher.publish("down/q0", QoS::ExactlyOnce, false, b"b").await;
    let received = subscriber.next_publish().await;
    assert_eq!((received.topic.as_str(), received.qos), ("down/q0", QoS::AtMostOnce));
}

#[tokio::test]
async fn retained_set_replace_delete_and_replay() {
    let broker = TestBroker::start().await;
    let mut publisher = connect_to(&broker, "pub").await;

    // QoS 0 first: the PUBACKs after it prove the broker has processed it (one connection is handled in order).
    publisher.publish("ret/b", QoS::AtMostOnce, true, b"bee").await;
    publisher.publish("ret/a", QoS::AtLeastOnce, true, b"first").await;
    publisher.publish("ret/a", QoS::AtLeastOnce, true, b"second").await;

    // A new subscriber gets the latest retained message per topic, flagged retained.
    let mut late = connect_to(&broker, "late").await;
    late.subscribe_ok("ret/+", QoS::AtLeastOnce).await;
    let mut replayed = [late.next_publish().await, late.next_publish().await];
    replayed.sort_by(|a, b| a.topic.cmp(&b.topic));
    assert_eq!(replayed[0].topic, "ret/a");
    assert_eq!(&replayed[0].payload[..], b"second", "replaced, not appended");
    assert!(replayed[0].retain);
    assert_eq!(replayed[0].qos, QoS::AtLeastOnce);
    assert_eq!(replayed[1].topic, "ret/b");
    assert_eq!(&replayed[1].payload[..], b"bee");
    assert!(replayed[1].retain);
    assert_eq!(replayed[1].qos, QoS::AtMostOnce, "min(stored QoS 0, granted 1)");
    late.expect_no_publish(QUIET).await;

    // Live delivery to an existing subscriber carries retain = false [MQTT-3.3.1-9].
    publisher.publish("ret/a", QoS::AtLeastOnce, true, b"third").await;
    let live = late.next_publish().await;
    assert_eq!(&live.payload[..], b"third");
    assert!(!live.retain, "a 3.1.1 live delivery has retain cleared");

    // An empty retained payload deletes the retained message; it is still delivered live.
    publisher.publish("ret/a", QoS::AtLeastOnce, true, b"").await;
    let deletion = late.next_publish().await;
    assert_eq!(deletion.topic, "ret/a");
    assert!(deletion.payload.is_empty());

    let mut later = connect_to(&broker, "later").await;
    later.subscribe_ok("ret/#", QoS::AtLeastOnce).await;
    let only = later.next_publish().await;
    assert_eq!(only.topic, "ret/b", "ret/a was deleted");
    later.expect_no_publish(QUIET).await;
}

#[tokio::test]
async fn will_is_published_on_abrupt_close() {
    let broker = TestBroker::start().await;
    let mut watcher = connect_to(&broker, "watcher").await;
    watcher.subscribe_ok("wills/#", QoS::AtLeastOnce).await;

    let (doomed, _) =
        connect(options_with_will(&broker, "doomed", "wills/doomed", "doomed went away", QoS::AtLeastOnce)).await;
    watcher.expect_no_publish(QUIET).await;
    doomed.kill().await;

    let will = watcher.next_publish().await;
    assert_eq!(will.topic, "wills/doomed");
    assert_eq!(&will.payload[..], b"doomed went away");
    assert_eq!(will.qos, QoS::AtLeastOnce);
}

#[tokio::test]
async fn will_is_not_published_on_clean_disconnect() {
    let broker = TestBroker::start().await;
    let mut watcher = connect_to(&broker, "watcher").await;
    watcher.subscribe_ok("wills/#", QoS::AtLeastOnce).await;

    let (polite, _) =
        connect(options_with_will(&broker, "polite", "wills/polite", "should never be seen", QoS::AtLeastOnce)).await;
    polite.disconnect().await;
    watcher.expect_no_publish(QUIET).await;

    // Control: the watcher does receive on that topic.
    let mut other = connect_to(&broker, "other").await;
    other.publish("wills/control", QoS::AtLeastOnce, false, b"c").await;
    assert_eq!(watcher.next_publish().await.topic, "wills/control");
}

#[tokio::test]
async fn persistent_session_queues_qos1_while_offline() {
    let broker = TestBroker::start().await;
    let mut persistent = options(&broker, "durable");
    persistent.set_clean_session(false);

    let (mut client, connack) = connect(persistent.clone()).await;
    assert!(!connack.session_present, "first connection has no session");
    client.subscribe_ok("queue/#", QoS::AtLeastOnce).await;
    client.disconnect().await;

    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("queue/0", QoS::AtMostOnce, false, b"qos0 is not queued offline").await;
    publisher.publish("queue/1", QoS::AtLeastOnce, false, b"while you were out").await;

    let (mut client, connack) = connect(persistent.clone()).await;
    assert!(connack.session_present, "the session was kept");
    let queued = client.next_publish().await;
    assert_eq!(queued.topic, "queue/1");
    assert_eq!(&queued.payload[..], b"while you were out");
    assert_eq!(queued.qos, QoS::AtLeastOnce);
    client.expect_no_publish(QUIET).await;

    // The subscription itself survived too: live messages still arrive without resubscribing.
    publisher.publish("queue/3", QoS::AtLeastOnce, false, b"live").await;
    assert_eq!(client.next_publish().await.topic, "queue/3");
    client.disconnect().await;

    // A clean session discards it.
    let mut clean = options(&broker, "durable");
    clean.set_clean_session(true);
    let (client, connack) = connect(clean).await;
    assert!(!connack.session_present);
    client.disconnect().await;
    let (client, connack) = connect(persistent).await;
    assert!(!connack.session_present, "clean session ended the old session");
    client.disconnect().await;
}

#[tokio::test]
async fn session_takeover_disconnects_the_first_client() {
    let broker = TestBroker::start().await;
    let mut first = connect_to(&broker, "same-id").await;
    first.subscribe_ok("takeover/#", QoS::AtLeastOnce).await;

    let mut second = connect_to(&broker, "same-id").await;
    let error = first.expect_disconnected().await;
    // 3.1.1 has no DISCONNECT from the server: the socket is simply closed.
    assert!(
        matches!(error, rumqttc::ConnectionError::Io(_) | rumqttc::ConnectionError::MqttState(_)),
        "first client's connection ended with {error:?}"
    );

    // The second connection works.
    second.subscribe_ok("takeover/#", QoS::AtLeastOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("takeover/x", QoS::AtLeastOnce, false, b"to the new owner").await;
    let received = second.next_publish().await;
    assert_eq!(&received.payload[..], b"to the new owner");
    second.expect_no_publish(QUIET).await;
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_highest_qos() {
    let broker = TestBroker::start().await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_ok("over/#", QoS::AtMostOnce).await;
    subscriber.subscribe_ok("over/+/x", QoS::ExactlyOnce).await;
    subscriber.subscribe_ok("over/a/x", QoS::AtLeastOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;

    publisher.publish("over/a/x", QoS::ExactlyOnce, false, b"once").await;
    let received = subscriber.next_publish().await;
    assert_eq!(received.topic, "over/a/x");
    assert_eq!(&received.payload[..], b"once");
    assert_eq!(received.qos, QoS::ExactlyOnce, "highest granted QoS wins");
    subscriber.expect_no_publish(QUIET).await;
}

#[tokio::test]
async fn denied_publish_is_silently_dropped_and_publisher_stays_connected() {
    let broker = TestBroker::builder().acl("pattern write allowed/#\npattern read #\n").start().await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_ok("#", QoS::AtLeastOnce).await;
    let mut publisher = connect_to(&broker, "pub").await;

    // rumqttc completes the QoS 1 and QoS 2 exchanges: 3.1.1 has no negative acknowledgement.
    publisher.publish("forbidden/z", QoS::AtMostOnce, false, b"nope").await;
    publisher.publish("forbidden/x", QoS::AtLeastOnce, false, b"nope").await;
    publisher.publish("forbidden/y", QoS::ExactlyOnce, false, b"nope").await;
    subscriber.expect_no_publish(QUIET).await;

    // Still connected, and allowed topics work.
    publisher.publish("allowed/x", QoS::AtLeastOnce, false, b"yes").await;
    let received = subscriber.next_publish().await;
    assert_eq!(received.topic, "allowed/x");
    assert_eq!(&received.payload[..], b"yes");
}

#[tokio::test]
async fn a_denied_publish_disconnects_when_configured_and_the_will_speaks() {
    let broker = TestBroker::builder()
        .acl("pattern write allowed/#\npattern read #\n")
        .configure(|config| config.auth.on_publish_denied = Some("disconnect".into()))
        .start()
        .await;
    let mut subscriber = connect_to(&broker, "sub").await;
    subscriber.subscribe_ok("#", QoS::AtLeastOnce).await;
    let (mut publisher, _) =
        connect(options_with_will(&broker, "pub", "allowed/will", "publisher gone", QoS::AtLeastOnce)).await;

    publisher.publish("allowed/x", QoS::AtLeastOnce, false, b"yes").await;
    assert_eq!(subscriber.next_publish().await.topic, "allowed/x");
    publisher.client.publish("forbidden/x", QoS::AtLeastOnce, false, b"nope".to_vec()).await.unwrap();
    publisher.expect_disconnected().await;
    // The refused message is not delivered; the will is, since the client did not say goodbye.
    let will = subscriber.next_publish().await;
    assert_eq!((will.topic.as_str(), &will.payload[..]), ("allowed/will", b"publisher gone".as_slice()));
    subscriber.expect_no_publish(QUIET).await;
}

#[tokio::test]
async fn denied_subscribe_gets_failure_0x80() {
    let broker = TestBroker::builder().acl("topic read public/#\ntopic write #\n").start().await;
    let mut client = connect_to(&broker, "sub").await;
    assert_eq!(client.subscribe("secret/#", QoS::AtLeastOnce).await, SubscribeReasonCode::Failure);
    assert_eq!(client.subscribe("public/news", QoS::AtLeastOnce).await, SubscribeReasonCode::Success(QoS::AtLeastOnce));

    // The refused filter delivers nothing; the granted one works.
    let mut publisher = connect_to(&broker, "pub").await;
    publisher.publish("secret/plans", QoS::AtLeastOnce, false, b"s").await;
    publisher.publish("public/news", QoS::AtLeastOnce, false, b"p").await;
    let received = client.next_publish().await;
    assert_eq!(received.topic, "public/news");
    client.expect_no_publish(QUIET).await;
}

#[tokio::test]
async fn password_file_accepts_good_and_refuses_bad_password() {
    let broker = TestBroker::builder().users(&[("alice", "wonderland"), ("bob", "builder")]).start().await;

    let mut good = options(&broker, "alice-client");
    good.set_credentials("alice", "wonderland");
    let (client, connack) = connect(good).await;
    assert_eq!(connack.code, ConnectReturnCode::Success);
    client.disconnect().await;

    let mut bad = options(&broker, "alice-bad");
    bad.set_credentials("alice", "builder");
    assert_eq!(v4::refused_code(bad).await, ConnectReturnCode::BadUserNamePassword, "3.1.1 return code 4");

    let mut unknown = options(&broker, "mallory");
    unknown.set_credentials("mallory", "wonderland");
    assert_eq!(v4::refused_code(unknown).await, ConnectReturnCode::BadUserNamePassword);
}

#[tokio::test]
async fn anonymous_refused_when_not_allowed() {
    let broker = TestBroker::builder().allow_anonymous(false).users(&[("alice", "wonderland")]).start().await;
    assert_eq!(
        v4::refused_code(options(&broker, "anon")).await,
        ConnectReturnCode::NotAuthorized,
        "3.1.1 return code 5"
    );
    let mut named = options(&broker, "named");
    named.set_credentials("alice", "wonderland");
    connect(named).await.0.disconnect().await;
}

#[tokio::test]
async fn anonymous_refused_without_password_file() {
    let broker = TestBroker::builder().allow_anonymous(false).start().await;
    assert_eq!(v4::refused_code(options(&broker, "anon")).await, ConnectReturnCode::NotAuthorized);
    // With no password file, a user name does not get a client in either.
    let mut named = options(&broker, "named");
    named.set_credentials("alice", "anything");
    let code = v4::refused_code(named).await;
    assert!(matches!(code, ConnectReturnCode::NotAuthorized | ConnectReturnCode::BadUserNamePassword), "{code:?}");
    assert!(broker.broker().sessions().is_empty(), "refused clients leave no session");
}

/// A `deny` rule for reading must hold whichever filter the client subscribes with: Mosquitto checks read access
/// for every message it delivers, not only when a subscription is made.
#[tokio::test]
async fn acl_read_deny_applies_to_live_and_retained_delivery() {
    // Anonymous clients may not touch secret/#; the user "boss" may write there.
    let broker = TestBroker::builder()
        .acl("topic readwrite #\ntopic deny secret/#\nuser boss\ntopic readwrite #\n")
        .users(&[("boss", "pw")])
        .start()
        .await;
    let mut boss = options(&broker, "boss");
    boss.set_credentials("boss", "pw");
    let (mut publisher, _) = connect(boss).await;
    publisher.publish("secret/retained", QoS::AtLeastOnce, true, b"retained secret").await;
    publisher.publish("open/retained", QoS::AtLeastOnce, true, b"retained open").await;

    let mut snoop = connect_to(&broker, "snoop").await;
    assert_eq!(snoop.subscribe("secret/#", QoS::AtLeastOnce).await, SubscribeReasonCode::Failure);
    // `#` is not itself denied (it covers more than secret/#), so the subscription is granted...
    assert_eq!(snoop.subscribe("#", QoS::AtLeastOnce).await, SubscribeReasonCode::Success(QoS::AtLeastOnce));
    // ...but the retained replay leaves out what the client may not read...
    let replay = snoop.next_publish().await;
    assert_eq!(replay.topic, "open/retained");
    snoop.expect_no_publish(QUIET).await;

    // ...and so must live delivery.
    publisher.publish("secret/live", QoS::AtLeastOnce, false, b"live secret").await;
    publisher.publish("open/live", QoS::AtLeastOnce, false, b"live open").await;
    let received = snoop.next_publish().await;
    assert_eq!(received.topic, "open/live", "secret/live was delivered despite `topic deny secret/#`");
    snoop.expect_no_publish(QUIET).await;
}
