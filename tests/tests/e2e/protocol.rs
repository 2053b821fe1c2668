//! Packet-level behaviour checked with the raw codec client over TCP, where client libraries hide the details:
//! client identifiers, exactly-once under retransmission, redelivery on resume, flow control, topic-alias and
//! packet-size limits announced by the client, `$SYS` isolation, unsubscribe, queue limits.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use tokio::net::TcpStream;
use tollgate_integration_tests::raw::{self, RawClient, Received, connect_packet, publish_packet};
use tollgate_integration_tests::{QUIET, TestBroker};
use tollgate_protocol::{Ack, Packet, ProtocolVersion, Publish, QoS, ReasonCode, Unsubscribe};

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V311;

async fn client(addr: SocketAddr, version: ProtocolVersion, id: &str) -> RawClient<TcpStream> {
    let mut client = raw::tcp(addr, version).await;
    client.name = id.into();
    client.connect_ok(version, id).await;
    client
}

async fn expect_silence(client: &mut RawClient<TcpStream>) {
    if let Some(received) = client.recv_within(QUIET).await {
        panic!("{}: expected nothing, got {received:?}", client.name);
    }
}

fn expect_publish_packet(packet: Packet) -> Publish {
    match packet {
        Packet::Publish(publish) => publish,
        other => panic!("expected PUBLISH, got {other:?}"),
    }
}

#[tokio::test]
async fn empty_client_id_rules() {
    let broker = TestBroker::start().await;
    // 3.1.1: empty id with clean session = 0 is refused with return code 2 [MQTT-3.1.3-8].
    let mut refused = raw::tcp(broker.addr, V311).await;
    let mut connect = connect_packet(V311, "");
    connect.clean_start = false;
    let bytes = {
        refused.send(&Packet::Connect(Box::new(connect))).await;
        refused.read_until_closed().await
    };
    assert_eq!(bytes, vec![0x20, 0x02, 0x00, 0x02], "CONNACK identifier rejected, then close");

    // 3.1.1 with clean session: accepted.
    let mut accepted = raw::tcp(broker.addr, V311).await;
    assert_eq!(accepted.connect(connect_packet(V311, "")).await.reason_code, ReasonCode::SUCCESS);

    // v5: an identifier is assigned and reported.
    let mut assigned = raw::tcp(broker.addr, V5).await;
    let connack = assigned.connect(connect_packet(V5, "")).await;
    assert_eq!(connack.reason_code, ReasonCode::SUCCESS);
    let id = connack.properties.assigned_client_identifier.expect("Assigned Client Identifier");
    assert!(!id.is_empty());
    let mut other = raw::tcp(broker.addr, V5).await;
    let other_id = other.connect(connect_packet(V5, "")).await.properties.assigned_client_identifier.unwrap();
    assert_ne!(id, other_id, "assigned identifiers are unique");
}

#[tokio::test]
async fn qos2_retransmitted_publish_is_delivered_once() {
    let broker = TestBroker::start().await;
    let mut subscriber = client(broker.addr, V5, "sub").await;
    assert_eq!(subscriber.subscribe(1, "eo/#", QoS::ExactlyOnce).await, vec![ReasonCode::GRANTED_QOS_2]);
    let mut publisher = client(broker.addr, V5, "pub").await;

    let publish = publish_packet("eo/t", QoS::ExactlyOnce, Some(9), b"exactly once");
    publisher.send(&Packet::Publish(publish.clone())).await;
    assert!(matches!(publisher.expect_packet().await, Packet::PubRec(ack) if ack.packet_id == 9));
    // The PUBREC "got lost": the client retransmits with DUP before sending PUBREL.
    publisher.send(&Packet::Publish(Publish { dup: true, ..publish })).await;
    assert!(matches!(publisher.expect_packet().await, Packet::PubRec(ack) if ack.packet_id == 9));
    publisher.send(&Packet::PubRel(Ack::new(9, ReasonCode::SUCCESS))).await;
    match publisher.expect_packet().await {
        Packet::PubComp(ack) => assert_eq!((ack.packet_id, ack.reason_code), (9, ReasonCode::SUCCESS)),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }

    let delivered = subscriber.expect_publish().await;
    assert_eq!(&delivered.payload[..], b"exactly once");
    expect_silence(&mut subscriber).await;

    // The id is free again after PUBCOMP: reusing it publishes a new message.
    let again = publish_packet("eo/t", QoS::ExactlyOnce, Some(9), b"second message");
    publisher.send(&Packet::Publish(again)).await;
    assert!(matches!(publisher.expect_packet().await, Packet::PubRec(_)));
    publisher.send(&Packet::PubRel(Ack::new(9, ReasonCode::SUCCESS))).await;
    assert!(matches!(publisher.expect_packet().await, Packet::PubComp(_)));
    assert_eq!(&subscriber.expect_publish().await.payload[..], b"second message");
}

#[tokio::test]
async fn pubrel_for_an_unknown_id_gets_0x92() {
    let broker = TestBroker::start().await;
    let mut publisher = client(broker.addr, V5, "pub").await;
    publisher.send(&Packet::PubRel(Ack::new(77, ReasonCode::SUCCESS))).await;
    match publisher.expect_packet().await {
        Packet::PubComp(ack) => {
            assert_eq!((ack.packet_id, ack.reason_code), (77, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND))
        }
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
}

async fn unacked_redelivered_on_resume(version: ProtocolVersion) {
    let broker = TestBroker::start().await;
    let mut connect = connect_packet(version, "forgetful");
    connect.clean_start = false;
    if version.is_v5() {
        connect.properties.session_expiry_interval = Some(60);
    }
    let mut subscriber = raw::tcp(broker.addr, version).await;
    subscriber.connect(connect.clone()).await;
    assert_eq!(subscriber.subscribe(1, "re/#", QoS::AtLeastOnce).await, vec![ReasonCode::GRANTED_QOS_1]);

    let mut publisher = client(broker.addr, version, "pub").await;
    publisher.publish_qos1(publish_packet("re/1", QoS::AtLeastOnce, Some(1), b"one")).await;
    publisher.publish_qos1(publish_packet("re/2", QoS::AtLeastOnce, Some(2), b"two")).await;

    // Received but never acknowledged.
    let first = expect_publish_packet(subscriber.expect_packet().await);
    let second = expect_publish_packet(subscriber.expect_packet().await);
    assert!(!first.dup && !second.dup);
    drop(subscriber);

    let mut subscriber = raw::tcp(broker.addr, version).await;
    let connack = subscriber.connect(connect).await;
    assert!(connack.session_present);
    for original in [&first, &second] {
        let again = expect_publish_packet(subscriber.expect_packet().await);
        assert!(again.dup, "redelivery sets DUP [MQTT-3.3.1-1]");
        assert_eq!(again.packet_id, original.packet_id, "same packet identifier");
        assert_eq!(again.payload, original.payload, "in the original order");
        subscriber.send(&Packet::PubAck(Ack::new(again.packet_id.unwrap(), ReasonCode::SUCCESS))).await;
    }
    expect_silence(&mut subscriber).await;
}

#[tokio::test]
async fn unacknowledged_qos1_is_redelivered_with_dup_on_resume_v311() {
    unacked_redelivered_on_resume(V311).await;
}

#[tokio::test]
async fn unacknowledged_qos1_is_redelivered_with_dup_on_resume_v5() {
    unacked_redelivered_on_resume(V5).await;
}

#[tokio::test]
async fn receive_maximum_limits_messages_in_flight() {
    let broker = TestBroker::start().await;
    let mut subscriber = raw::tcp(broker.addr, V5).await;
    let mut connect = connect_packet(V5, "slow");
    connect.properties.receive_maximum = Some(1);
    subscriber.connect(connect).await;
    subscriber.subscribe(1, "flow/#", QoS::AtLeastOnce).await;

    let mut publisher = client(broker.addr, V5, "pub").await;
    for index in 1..=3u16 {
        publisher.publish_qos1(publish_packet("flow/t", QoS::AtLeastOnce, Some(index), &[index as u8])).await;
    }
    for index in 1..=3u8 {
        let publish = expect_publish_packet(subscriber.expect_packet().await);
        assert_eq!(&publish.payload[..], &[index]);
        // Nothing more until this one is acknowledged.
        expect_silence(&mut subscriber).await;
        subscriber.send(&Packet::PubAck(Ack::new(publish.packet_id.unwrap(), ReasonCode::SUCCESS))).await;
    }
    expect_silence(&mut subscriber).await;
}

#[tokio::test]
async fn client_maximum_packet_size_is_respected() {
    let broker = TestBroker::start().await;
    let mut subscriber = raw::tcp(broker.addr, V5).await;
    let mut connect = connect_packet(V5, "small");
    connect.properties.maximum_packet_size = Some(64);
    subscriber.connect(connect).await;
    subscriber.subscribe(1, "size/#", QoS::AtLeastOnce).await;

    let mut publisher = client(broker.addr, V5, "pub").await;
    publisher.publish_qos1(publish_packet("size/big", QoS::AtLeastOnce, Some(1), &[b'x'; 200])).await;
    publisher.publish_qos1(publish_packet("size/small", QoS::AtLeastOnce, Some(2), b"fits")).await;
    // The big one is discarded for this client [MQTT-3.1.2-25]; the small one still arrives.
    let publish = subscriber.expect_publish().await;
    assert_eq!(&*publish.topic, "size/small");
    expect_silence(&mut subscriber).await;
}

#[tokio::test]
async fn outbound_topic_aliases_when_the_client_allows_them() {
    let broker = TestBroker::start().await;
    let mut subscriber = raw::tcp(broker.addr, V5).await;
    let mut connect = connect_packet(V5, "aliased");
    connect.properties.topic_alias_maximum = Some(2);
    subscriber.connect(connect).await;
    subscriber.subscribe(1, "al/#", QoS::AtMostOnce).await;

    let mut publisher = client(broker.addr, V5, "pub").await;
    for topic in ["al/one", "al/one", "al/two", "al/three", "al/three"] {
        publisher.publish_qos1(publish_packet(topic, QoS::AtLeastOnce, Some(1), topic.as_bytes())).await;
    }
    let mut aliases = std::collections::HashMap::new();
    let mut alias_only = 0;
    for expected in ["al/one", "al/one", "al/two", "al/three", "al/three"] {
        let publish = expect_publish_packet(subscriber.expect_packet().await);
        let topic = match (publish.topic.is_empty(), publish.properties.topic_alias) {
            (false, Some(alias)) => {
                aliases.insert(alias, publish.topic.to_string());
                publish.topic.to_string()
            }
            (false, None) => publish.topic.to_string(),
            (true, Some(alias)) => {
                alias_only += 1;
                aliases.get(&alias).cloned().expect("an alias the broker set up before")
            }
            (true, None) => panic!("empty topic without an alias"),
        };
        assert_eq!(topic, expected);
        assert_eq!(&publish.payload[..], expected.as_bytes());
        assert!(publish.properties.topic_alias.is_none_or(|alias| (1..=2).contains(&alias)), "within the maximum");
    }
    assert!(aliases.len() <= 2);
    assert!(alias_only >= 1, "a repeated topic is sent as its alias alone");
}

/// Pipelined QoS 1 publishing of many messages: every one arrives, in order, intact.
#[tokio::test]
async fn bulk_qos1_delivery_keeps_order_and_content() {
    let broker = TestBroker::start().await;
    let mut subscriber = client(broker.addr, V5, "sub").await;
    subscriber.subscribe(1, "bulk/#", QoS::AtLeastOnce).await;
    let mut publisher = client(broker.addr, V5, "pub").await;

    const COUNT: u16 = 300;
    // The index in the first two bytes, then a pattern derived from it.
    let payload = |index: u16| -> Vec<u8> {
        let mut bytes = index.to_be_bytes().to_vec();
        bytes.extend((0..4094u32).map(|byte| (byte as u16 ^ index) as u8));
        bytes
    };
    let mut bytes = Vec::new();
    for index in 1..=COUNT {
        let publish = publish_packet("bulk/t", QoS::AtLeastOnce, Some(index), &payload(index));
        bytes.extend(raw::encode(&Packet::Publish(publish), V5));
    }
    // Everything in one write, without waiting for acknowledgements.
    publisher.send_bytes(&bytes).await;
    // Acknowledgements are read in their own task: the raw client's receive-and-acknowledge is not cancel-safe,
    // so it must not sit in a `select!`.
    let acks = tokio::spawn(async move {
        for expected in 1..=COUNT {
            match publisher.expect_packet().await {
                Packet::PubAck(ack) => assert_eq!(ack.packet_id, expected, "PUBACKs in order"),
                other => panic!("expected PUBACK, got {other:?}"),
            }
        }
    });
    for expected in 1..=COUNT {
        let publish = subscriber.expect_publish().await;
        let index = u16::from_be_bytes([publish.payload[0], publish.payload[1]]);
        assert_eq!(index, expected, "messages arrive in order");
        assert!(publish.payload.to_vec() == payload(expected), "message {expected} arrives intact");
    }
    acks.await.unwrap();
    expect_silence(&mut subscriber).await;
}

/// A burst far larger than the broker's write buffer reaches a subscriber that reads slowly.
#[tokio::test]
async fn large_burst_to_a_slow_reader_is_delivered_in_full() {
    let broker = TestBroker::start().await;
    let mut subscriber = client(broker.addr, V5, "sub").await;
    subscriber.subscribe(1, "burst/#", QoS::AtMostOnce).await;
    let mut publisher = client(broker.addr, V5, "pub").await;

    const COUNT: usize = 200;
    let mut bytes = Vec::new();
    for index in 0..COUNT {
        let payload = vec![(index % 251) as u8; 16 * 1024];
        bytes.extend(raw::encode(&Packet::Publish(publish_packet("burst/t", QoS::AtMostOnce, None, &payload)), V5));
    }
    let marker = publish_packet("burst/end", QoS::AtLeastOnce, Some(1), b"end");
    publisher.send_bytes(&bytes).await;
    assert_eq!(publisher.publish_qos1(marker).await, ReasonCode::SUCCESS);
    // 3.2 MB are now queued for the subscriber, which has not read anything yet.
    for index in 0..COUNT {
        let publish = subscriber.expect_publish().await;
        assert_eq!(publish.payload.len(), 16 * 1024);
        assert!(publish.payload.iter().all(|byte| *byte == (index % 251) as u8), "message {index}");
    }
    assert_eq!(&*subscriber.expect_publish().await.topic, "burst/end");
}

#[tokio::test]
async fn no_topic_aliases_without_the_clients_consent() {
    let broker = TestBroker::start().await;
    let mut subscriber = client(broker.addr, V5, "plain").await;
    subscriber.subscribe(1, "al/#", QoS::AtMostOnce).await;
    let mut publisher = client(broker.addr, V5, "pub").await;
    for _ in 0..2 {
        publisher.publish_qos1(publish_packet("al/x", QoS::AtLeastOnce, Some(1), b"x")).await;
        let publish = expect_publish_packet(subscriber.expect_packet().await);
        assert_eq!(&*publish.topic, "al/x");
        assert_eq!(publish.properties.topic_alias, None);
    }
}

#[tokio::test]
async fn wildcards_do_not_match_sys_topics() {
    let broker = TestBroker::builder().configure(|config| config.sys.interval = 1).start().await;
    let mut everything = client(broker.addr, V5, "everything").await;
    everything.subscribe(1, "#", QoS::AtMostOnce).await;
    let mut plus = client(broker.addr, V5, "plus").await;
    plus.subscribe(1, "+/broker/#", QoS::AtMostOnce).await;
    let mut sys = client(broker.addr, V5, "sys").await;
    sys.subscribe(1, "$SYS/#", QoS::AtMostOnce).await;

    // Retained $SYS topics arrive at once for the explicit subscription...
    let publish = sys.expect_publish().await;
    assert!(publish.topic.starts_with("$SYS/broker/"), "{}", publish.topic);
    // ...and never for wildcards at the first level [MQTT-4.7.2-1].
    expect_silence(&mut everything).await;
    expect_silence(&mut plus).await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery_and_reports_reason_codes() {
    let broker = TestBroker::start().await;
    let mut subscriber = client(broker.addr, V5, "sub").await;
    subscriber.subscribe(1, "un/#", QoS::AtLeastOnce).await;
    let unsubscribe = Unsubscribe {
        packet_id: 2,
        filters: vec!["un/#".into(), "never/subscribed".into()],
        properties: Default::default(),
    };
    subscriber.send(&Packet::Unsubscribe(unsubscribe)).await;
    match subscriber.expect_packet().await {
        Packet::UnsubAck(unsuback) => {
            assert_eq!(unsuback.packet_id, 2);
            assert_eq!(unsuback.reason_codes, vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED]);
        }
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    let mut publisher = client(broker.addr, V5, "pub").await;
    let reason = publisher.publish_qos1(publish_packet("un/x", QoS::AtLeastOnce, Some(1), b"x")).await;
    assert_eq!(reason, ReasonCode::NO_MATCHING_SUBSCRIBERS);
    expect_silence(&mut subscriber).await;
}

#[tokio::test]
async fn invalid_filter_is_refused_per_version() {
    let broker = TestBroker::start().await;
    // v5: a SUBACK failure for that filter only.
    let mut v5_client = client(broker.addr, V5, "v5").await;
    let subscribe = tollgate_protocol::Subscribe {
        packet_id: 3,
        subscriptions: vec![
            tollgate_protocol::Subscription { filter: "a/#/b".into(), options: Default::default() },
            tollgate_protocol::Subscription { filter: "a/+".into(), options: Default::default() },
        ],
        properties: Default::default(),
    };
    v5_client.send(&Packet::Subscribe(subscribe)).await;
    match v5_client.expect_packet().await {
        Packet::SubAck(suback) => {
            assert_eq!(suback.reason_codes, vec![ReasonCode::TOPIC_FILTER_INVALID, ReasonCode::GRANTED_QOS_0])
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // 3.1.1: the connection is closed.
    let mut v311_client = client(broker.addr, V311, "v311").await;
    v311_client.send(&Packet::Subscribe(raw::subscribe_packet(1, "a/#/b", QoS::AtMostOnce))).await;
    match v311_client.recv().await {
        Received::Closed => {}
        Received::Packet(packet) => panic!("expected a close, got {packet:?}"),
    }
}

/// Five QoS 1 messages for an offline session whose queue holds three; `kept` are the payloads it gets on return.
async fn offline_queue_keeps(policy: &str, kept: std::ops::RangeInclusive<u8>) {
    let broker = TestBroker::builder()
        .configure(|config| {
            config.limits.max_queued_messages = 3;
            config.limits.overflow_policy = policy.into();
        })
        .start()
        .await;
    let mut connect = connect_packet(V5, "offline");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(60);
    let mut subscriber = raw::tcp(broker.addr, V5).await;
    subscriber.connect(connect.clone()).await;
    subscriber.subscribe(1, "q/#", QoS::AtLeastOnce).await;
    subscriber.disconnect().await;

    let mut publisher = client(broker.addr, V5, "pub").await;
    for index in 1..=5u16 {
        publisher.publish_qos1(publish_packet("q/t", QoS::AtLeastOnce, Some(index), &[index as u8])).await;
    }
    let mut subscriber = raw::tcp(broker.addr, V5).await;
    assert!(subscriber.connect(connect).await.session_present);
    for index in kept {
        assert_eq!(&subscriber.expect_publish().await.payload[..], &[index]);
    }
    expect_silence(&mut subscriber).await;
}

#[tokio::test]
async fn offline_queue_is_bounded_dropping_the_newest() {
    offline_queue_keeps("drop_newest", 1..=3).await;
}

#[tokio::test]
async fn offline_queue_can_drop_the_oldest() {
    offline_queue_keeps("drop_oldest", 3..=5).await;
}

/// An incoming QoS 2 exchange survives a reconnect: the PUBREL on the new connection completes it, and the message
/// is delivered exactly once.
#[tokio::test]
async fn incoming_qos2_pubrel_after_resume() {
    let broker = TestBroker::start().await;
    let mut subscriber = client(broker.addr, V5, "sub").await;
    subscriber.subscribe(1, "in2/#", QoS::ExactlyOnce).await;

    let mut connect = connect_packet(V5, "resumer");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(60);
    let mut publisher = raw::tcp(broker.addr, V5).await;
    publisher.connect(connect.clone()).await;
    publisher.send(&Packet::Publish(publish_packet("in2/t", QoS::ExactlyOnce, Some(5), b"once"))).await;
    assert!(matches!(publisher.expect_packet().await, Packet::PubRec(ack) if ack.packet_id == 5));
    drop(publisher);

    let mut publisher = raw::tcp(broker.addr, V5).await;
    assert!(publisher.connect(connect).await.session_present);
    // The client resends the PUBLISH with DUP (it cannot know the PUBREC arrived) and then PUBREL.
    let duplicate = Publish { dup: true, ..publish_packet("in2/t", QoS::ExactlyOnce, Some(5), b"once") };
    publisher.send(&Packet::Publish(duplicate)).await;
    assert!(matches!(publisher.expect_packet().await, Packet::PubRec(ack) if ack.packet_id == 5));
    publisher.send(&Packet::PubRel(Ack::new(5, ReasonCode::SUCCESS))).await;
    match publisher.expect_packet().await {
        Packet::PubComp(ack) => assert_eq!((ack.packet_id, ack.reason_code), (5, ReasonCode::SUCCESS)),
        other => panic!("expected PUBCOMP, got {other:?}"),
    }
    assert_eq!(&subscriber.expect_publish().await.payload[..], b"once");
    expect_silence(&mut subscriber).await;
}

/// An outgoing QoS 2 exchange interrupted after PUBREC resumes with PUBREL, not with the PUBLISH again.
#[tokio::test]
async fn outgoing_qos2_resumes_with_pubrel() {
    let broker = TestBroker::start().await;
    let mut connect = connect_packet(V5, "receiver");
    connect.clean_start = false;
    connect.properties.session_expiry_interval = Some(60);
    let mut receiver = raw::tcp(broker.addr, V5).await;
    receiver.connect(connect.clone()).await;
    receiver.subscribe(1, "out2/#", QoS::ExactlyOnce).await;

    let mut publisher = client(broker.addr, V5, "pub").await;
    publisher.send(&Packet::Publish(publish_packet("out2/t", QoS::ExactlyOnce, Some(1), b"two-phase"))).await;
    let publish = expect_publish_packet(receiver.expect_packet().await);
    let packet_id = publish.packet_id.unwrap();
    receiver.send(&Packet::PubRec(Ack::new(packet_id, ReasonCode::SUCCESS))).await;
    assert!(matches!(receiver.expect_packet().await, Packet::PubRel(ack) if ack.packet_id == packet_id));
    drop(receiver); // PUBCOMP never sent

    let mut receiver = raw::tcp(broker.addr, V5).await;
    assert!(receiver.connect(connect).await.session_present);
    match receiver.expect_packet().await {
        Packet::PubRel(ack) => assert_eq!(ack.packet_id, packet_id),
        other => panic!("expected the PUBREL to be resent, got {other:?}"),
    }
    receiver.send(&Packet::PubComp(Ack::new(packet_id, ReasonCode::SUCCESS))).await;
    expect_silence(&mut receiver).await;
}

#[tokio::test]
async fn too_many_incoming_qos2_in_flight_is_0x93() {
    let broker = TestBroker::builder().configure(|config| config.limits.max_inflight = 2).start().await;
    let mut publisher = raw::tcp(broker.addr, V5).await;
    let connack = publisher.connect(connect_packet(V5, "flood")).await;
    assert_eq!(connack.properties.receive_maximum, Some(2), "the broker announces its Receive Maximum");
    for id in 1..=2u16 {
        publisher.send(&Packet::Publish(publish_packet("flood", QoS::ExactlyOnce, Some(id), b"x"))).await;
        assert!(matches!(publisher.expect_packet().await, Packet::PubRec(_)));
    }
    publisher.send(&Packet::Publish(publish_packet("flood", QoS::ExactlyOnce, Some(3), b"x"))).await;
    publisher.expect_disconnect(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED).await;
}

#[tokio::test]
async fn subscription_identifier_from_a_client_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let mut client = client(broker.addr, V5, "bad").await;
    let mut publish = publish_packet("t", QoS::AtMostOnce, None, b"x");
    publish.properties.subscription_identifiers = vec![1];
    client.send(&Packet::Publish(publish)).await;
    client.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
}

#[tokio::test]
async fn session_expiry_on_disconnect_after_zero_at_connect_is_a_protocol_error() {
    let broker = TestBroker::start().await;
    let mut client = client(broker.addr, V5, "zero").await;
    let disconnect = tollgate_protocol::Disconnect {
        reason_code: ReasonCode::NORMAL_DISCONNECTION,
        properties: tollgate_protocol::Properties { session_expiry_interval: Some(30), ..Default::default() },
    };
    client.send(&Packet::Disconnect(disconnect)).await;
    client.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
}
