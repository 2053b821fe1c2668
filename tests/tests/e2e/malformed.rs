//! Raw TCP clients sending hand-built, malformed or out-of-order packets. Each case checks exactly what the broker
//! answers (DISCONNECT reason, CONNACK bytes, or a silent close), and `well_behaved_client_is_unaffected` runs
//! every case, one by one and then all at once, while a normal client keeps exchanging messages on the same broker.

#![allow(clippy::unwrap_used)]

use rumqttc::v5::mqttbytes::QoS;
use std::net::SocketAddr;
use tokio::net::TcpStream;
use tollgate_integration_tests::raw::{self, RawClient, connect_packet, encode};
use tollgate_integration_tests::{QUIET, TestBroker, v5};
use tollgate_protocol::{Packet, ProtocolVersion, ReasonCode};

/// The packet size limit every broker in this file runs with.
const MAX_PACKET: u32 = 1024;

async fn broker() -> TestBroker {
    TestBroker::builder().configure(|config| config.limits.max_packet_size = MAX_PACKET).start().await
}

/// A packet from its first byte and body, with the remaining length encoded properly.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = bytes::BytesMut::from(&[first][..]);
    tollgate_protocol::encode::put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out.to_vec()
}

/// A v5 PUBLISH QoS 0 body: topic bytes as given (not validated), properties block as given, payload.
fn v5_publish(topic: &[u8], properties: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    body.extend_from_slice(properties);
    body.extend_from_slice(payload);
    frame(0x30, &body)
}

async fn connected(addr: SocketAddr, version: ProtocolVersion, client_id: &str) -> RawClient<TcpStream> {
    let mut client = raw::tcp(addr, version).await;
    client.name = format!("{client_id} ({version:?})");
    client.connect_ok(version, client_id).await;
    client
}

/// Asserts the broker closes the connection without sending a single byte.
async fn expect_silent_close(client: &mut RawClient<TcpStream>) {
    let bytes = client.read_until_closed().await;
    assert!(bytes.is_empty(), "{}: expected a close without any packet, got {bytes:02X?}", client.name);
}

async fn wildcard_topic_v5(addr: SocketAddr) {
    let mut client = connected(addr, ProtocolVersion::V5, "wildcard").await;
    client.send_bytes(&v5_publish(b"a/+", &[0], b"x")).await;
    client.expect_disconnect(ReasonCode::TOPIC_NAME_INVALID).await;
}

async fn bad_utf8_topic_v5(addr: SocketAddr) {
    let mut client = connected(addr, ProtocolVersion::V5, "bad-utf8").await;
    client.send_bytes(&v5_publish(&[b'a', 0xC3, 0x28], &[0], b"x")).await;
    client.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
}

async fn duplicate_property_v5(addr: SocketAddr) {
    let mut client = connected(addr, ProtocolVersion::V5, "dup-prop").await;
    // Payload Format Indicator (0x01) twice.
    client.send_bytes(&v5_publish(b"t", &[4, 0x01, 0x01, 0x01, 0x01], b"x")).await;
    client.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
}

async fn five_byte_remaining_length_before_connect(addr: SocketAddr) {
    let mut client = raw::tcp(addr, ProtocolVersion::V5).await;
    client.name = "5-byte length before CONNECT".into();
    client.send_bytes(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    expect_silent_close(&mut client).await;
}

async fn five_byte_remaining_length_v5(addr: SocketAddr) {
    let mut client = connected(addr, ProtocolVersion::V5, "5-byte-length").await;
    client.send_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    client.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
}

async fn malformed_v311_closes_without_disconnect(addr: SocketAddr) {
    // QoS 3 in a PUBLISH header.
    let mut client = connected(addr, ProtocolVersion::V311, "v311-qos3").await;
    client.send_bytes(&frame(0x36, &[0x00, 0x01, b't', 0x00, 0x01, b'x'])).await;
    expect_silent_close(&mut client).await;

    // Invalid UTF-8 in a topic.
    let mut client = connected(addr, ProtocolVersion::V311, "v311-utf8").await;
    client.send_bytes(&frame(0x30, &[0x00, 0x02, 0xC3, 0x28, b'x'])).await;
    expect_silent_close(&mut client).await;

    // A wildcard in a topic name.
    let mut client = connected(addr, ProtocolVersion::V311, "v311-wildcard").await;
    client.send_bytes(&frame(0x30, &[0x00, 0x01, b'#', b'x'])).await;
    expect_silent_close(&mut client).await;

    // Five-byte remaining length.
    let mut client = connected(addr, ProtocolVersion::V311, "v311-length").await;
    client.send_bytes(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    expect_silent_close(&mut client).await;

    // SUBSCRIBE with the wrong fixed-header flags.
    let mut client = connected(addr, ProtocolVersion::V311, "v311-flags").await;
    client.send_bytes(&frame(0x80, &[0x00, 0x01, 0x00, 0x01, b't', 0x00])).await;
    expect_silent_close(&mut client).await;
}

async fn first_packet_not_connect(addr: SocketAddr) {
    let mut client = raw::tcp(addr, ProtocolVersion::V311).await;
    client.name = "PINGREQ first".into();
    client.send_bytes(&[0xC0, 0x00]).await;
    expect_silent_close(&mut client).await;

    let mut client = raw::tcp(addr, ProtocolVersion::V311).await;
    client.name = "PUBLISH first".into();
    client.send_bytes(&frame(0x30, &[0x00, 0x01, b't', b'x'])).await;
    expect_silent_close(&mut client).await;
}

async fn protocol_level_6(addr: SocketAddr) {
    let mut client = raw::tcp(addr, ProtocolVersion::V311).await;
    client.name = "protocol level 6".into();
    let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 6, 0x02, 0x00, 0x3C];
    body.extend_from_slice(&[0x00, 0x03, b'l', b'v', b'6']);
    client.send_bytes(&frame(0x10, &body)).await;
    let bytes = client.read_until_closed().await;
    assert_eq!(bytes, vec![0x20, 0x02, 0x00, 0x01], "a 3.1.1 CONNACK with return code 1, then close");
}

async fn malformed_v5_connect_gets_v5_connack(addr: SocketAddr) {
    let mut client = raw::tcp(addr, ProtocolVersion::V5).await;
    client.name = "v5 CONNECT with reserved flag".into();
    let connect =
        encode(&Packet::Connect(Box::new(connect_packet(ProtocolVersion::V5, "reserved"))), ProtocolVersion::V5);
    let mut bytes = connect.clone();
    // Connect flags follow the fixed header (2 bytes), protocol name (6) and level (1).
    bytes[9] |= 0x01;
    client.send_bytes(&bytes).await;
    match client.expect_packet().await {
        Packet::ConnAck(connack) => assert_eq!(connack.reason_code, ReasonCode::MALFORMED_PACKET),
        other => panic!("expected CONNACK 0x81, got {other:?}"),
    }
    client.expect_closed().await;
}

async fn packet_too_large_v5(addr: SocketAddr) {
    let mut client = connected(addr, ProtocolVersion::V5, "too-large").await;
    let payload = vec![b'z'; MAX_PACKET as usize + 100];
    let packet = v5_publish(b"big", &[0], &payload);
    // The declared size alone is refused: send the header and a little of the body, as a client streaming it would.
    client.send_bytes(&packet[..16]).await;
    client.expect_disconnect(ReasonCode::PACKET_TOO_LARGE).await;
}

async fn packet_at_the_limit_is_accepted(addr: SocketAddr) {
    let mut client = connected(addr, ProtocolVersion::V5, "at-limit").await;
    // 1 + 2 (remaining length) + 2 + 3 (topic) + 2 (packet id) + 1 (properties) + payload = MAX_PACKET.
    let payload = vec![b'z'; MAX_PACKET as usize - 11];
    let mut publish = raw::publish_packet("big", tollgate_protocol::QoS::AtLeastOnce, Some(7), &payload);
    publish.properties = Default::default();
    assert_eq!(encode(&Packet::Publish(publish.clone()), ProtocolVersion::V5).len(), MAX_PACKET as usize);
    let reason = client.publish_qos1(publish).await;
    assert!(!reason.is_error(), "a packet of exactly max_packet_size is accepted, got {reason}");
    client.disconnect().await;
}

async fn second_connect_v5(addr: SocketAddr) {
    let mut client = connected(addr, ProtocolVersion::V5, "twice").await;
    client.send(&Packet::Connect(Box::new(connect_packet(ProtocolVersion::V5, "twice")))).await;
    client.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
}

async fn second_connect_v311(addr: SocketAddr) {
    let mut client = connected(addr, ProtocolVersion::V311, "twice-311").await;
    client.send(&Packet::Connect(Box::new(connect_packet(ProtocolVersion::V311, "twice-311")))).await;
    expect_silent_close(&mut client).await;
}

async fn run_case(name: &str, addr: SocketAddr) {
    match name {
        "wildcard_topic_v5" => wildcard_topic_v5(addr).await,
        "bad_utf8_topic_v5" => bad_utf8_topic_v5(addr).await,
        "duplicate_property_v5" => duplicate_property_v5(addr).await,
        "five_byte_remaining_length_before_connect" => five_byte_remaining_length_before_connect(addr).await,
        "five_byte_remaining_length_v5" => five_byte_remaining_length_v5(addr).await,
        "malformed_v311_closes_without_disconnect" => malformed_v311_closes_without_disconnect(addr).await,
        "first_packet_not_connect" => first_packet_not_connect(addr).await,
        "protocol_level_6" => protocol_level_6(addr).await,
        "malformed_v5_connect_gets_v5_connack" => malformed_v5_connect_gets_v5_connack(addr).await,
        "packet_too_large_v5" => packet_too_large_v5(addr).await,
        "packet_at_the_limit_is_accepted" => packet_at_the_limit_is_accepted(addr).await,
        "second_connect_v5" => second_connect_v5(addr).await,
        "second_connect_v311" => second_connect_v311(addr).await,
        other => panic!("unknown case {other}"),
    }
}

const CASES: &[&str] = &[
    "wildcard_topic_v5",
    "bad_utf8_topic_v5",
    "duplicate_property_v5",
    "five_byte_remaining_length_before_connect",
    "five_byte_remaining_length_v5",
    "malformed_v311_closes_without_disconnect",
    "first_packet_not_connect",
    "protocol_level_6",
    "malformed_v5_connect_gets_v5_connack",
    "packet_too_large_v5",
    "packet_at_the_limit_is_accepted",
    "second_connect_v5",
    "second_connect_v311",
];

macro_rules! case_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $name() {
                let broker = broker().await;
                run_case(stringify!($name), broker.addr).await;
            }
        )*
    };
}

/// Each case on its own broker, so a failure names the case.
mod each {
    use super::*;

    case_tests!(
        wildcard_topic_v5,
        bad_utf8_topic_v5,
        duplicate_property_v5,
        five_byte_remaining_length_before_connect,
        five_byte_remaining_length_v5,
        malformed_v311_closes_without_disconnect,
        first_packet_not_connect,
        protocol_level_6,
        malformed_v5_connect_gets_v5_connack,
        packet_too_large_v5,
        packet_at_the_limit_is_accepted,
        second_connect_v5,
        second_connect_v311,
    );
}

#[tokio::test]
async fn protocol_violation_publishes_the_will() {
    let broker = broker().await;
    let mut watcher = v5::connect_to(&broker, "watcher").await;
    watcher.subscribe_ok("wills/#", QoS::AtLeastOnce).await;

    let mut offender = raw::tcp(broker.addr, ProtocolVersion::V5).await;
    let mut connect = connect_packet(ProtocolVersion::V5, "offender");
    connect.will = Some(tollgate_protocol::LastWill {
        topic: "wills/offender".into(),
        payload: bytes::Bytes::from_static(b"broke the rules"),
        qos: tollgate_protocol::QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    assert_eq!(offender.connect(connect).await.reason_code, ReasonCode::SUCCESS);
    offender.send_bytes(&v5_publish(b"a/#", &[0], b"x")).await;
    offender.expect_disconnect(ReasonCode::TOPIC_NAME_INVALID).await;

    let will = watcher.next_publish().await;
    assert_eq!(v5::topic(&will), "wills/offender");
    assert_eq!(&will.payload[..], b"broke the rules");
}

#[tokio::test]
async fn well_behaved_client_is_unaffected() {
    let broker = broker().await;
    let mut subscriber = v5::connect_to(&broker, "good-sub").await;
    subscriber.subscribe_ok("good/#", QoS::AtLeastOnce).await;
    let mut publisher = v5::connect_to(&broker, "good-pub").await;

    // The cases' own expectations are checked by the `each::` tests; here only the well-behaved client is
    // asserted, so a case that fails (and panics in its task) does not hide what this test is about.
    // One case at a time, with a message checked after each.
    for (index, case) in CASES.iter().enumerate() {
        let addr = broker.addr;
        let _ = tokio::spawn(async move { run_case(case, addr).await }).await;
        let payload = format!("after {case}");
        publisher.publish(&format!("good/{index}"), QoS::AtLeastOnce, false, payload.as_bytes()).await;
        let received = subscriber.next_publish().await;
        assert_eq!(v5::topic(&received), format!("good/{index}"));
        assert_eq!(String::from_utf8(received.payload.to_vec()).unwrap(), payload);
    }

    // Every case at once, while the good pair keeps talking.
    let mut attacks = tokio::task::JoinSet::new();
    for case in CASES {
        let addr = broker.addr;
        attacks.spawn(async move { run_case(case, addr).await });
    }
    let mut sent = 0;
    while !attacks.is_empty() || sent < 20 {
        let payload = format!("during {sent}");
        publisher.publish("good/during", QoS::AtLeastOnce, false, payload.as_bytes()).await;
        let received = subscriber.next_publish().await;
        assert_eq!(String::from_utf8(received.payload.to_vec()).unwrap(), payload);
        sent += 1;
        while attacks.try_join_next().is_some() {}
        if sent > 10_000 {
            panic!("the malformed clients did not finish");
        }
        tokio::task::yield_now().await;
    }

    // And after all of it.
    publisher.publish("good/after", QoS::ExactlyOnce, false, b"still here").await;
    let received = subscriber.next_publish().await;
    assert_eq!(v5::topic(&received), "good/after");
    assert_eq!(&received.payload[..], b"still here");
    subscriber.expect_no_publish(QUIET).await;
}
