//! Round-trip property tests: every packet the codec can legally produce for a protocol version decodes back to
//! itself, whole, whether it arrives at once, byte by byte or packed with others into one stream.
//!
//! The strategies follow each version's rules: no properties in 3.1.1, only the properties table 2-4 of the
//! MQTT 5 specification allows in each packet (with valid values), non-zero packet identifiers, topic names
//! without wildcards, strings without U+0000, reason codes valid for their packet, AUTH only in v5.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use proptest::collection::vec;
use proptest::option::weighted;
use proptest::prelude::*;
use tollgate_protocol::decode::parse_fixed_header;
use tollgate_protocol::encode::{PublishFlags, encode_publish_v311, encoded_len};
use tollgate_protocol::{
    Ack, Auth, ConnAck, Connect, DecodeError, Disconnect, LastWill, Packet, PacketId, Properties, ProtocolVersion,
    Publish, QoS, ReasonCode, SubAck, Subscribe, Subscription, SubscriptionOptions, UnsubAck, Unsubscribe,
    UserProperty, decode_packet, encode_packet,
};

// ---------------------------------------------------------------------------------------------------------------
// Reason codes valid in each packet (MQTT 5 section 3.x.2.1 tables).

const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99, 0x9A, 0x9B,
    0x9C, 0x9D, 0x9F,
];
const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];
const SUBACK_CODES: &[u8] = &[0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2];
const SUBACK_V3_CODES: &[u8] = &[0x00, 0x01, 0x02, 0x80];
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

fn code(valid: &'static [u8]) -> impl Strategy<Value = ReasonCode> {
    prop::sample::select(valid).prop_map(ReasonCode)
}

// ---------------------------------------------------------------------------------------------------------------
// Scalars and strings.

/// Any character but U+0000, which MQTT forbids in strings [MQTT-1.5.4-2]. `any::<char>()` favours awkward
/// characters (multi-byte, control, BOM), which is what the codec should be exercised with.
fn mqtt_char() -> impl Strategy<Value = char> {
    any::<char>().prop_filter("U+0000", |c| *c != '\0')
}

fn mqtt_string() -> impl Strategy<Value = String> {
    prop_oneof!["[a-zA-Z0-9/_ -]{0,12}", vec(mqtt_char(), 0..12).prop_map(|chars| chars.into_iter().collect()),]
}

/// A non-empty topic name without wildcards [MQTT-4.7.0-1, MQTT-4.7.3-1].
fn topic_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9$]{1,6}(/[a-z0-9 ]{0,6}){0,4}",
        vec(mqtt_char().prop_filter("wildcard", |c| *c != '+' && *c != '#'), 1..12)
            .prop_map(|chars| chars.into_iter().collect()),
    ]
}

/// A topic filter, plain or shared. The codec does not validate filters (the broker does), so arbitrary strings
/// are included too.
fn topic_filter() -> impl Strategy<Value = String> {
    let level = prop_oneof![Just("+".to_owned()), "[a-z0-9]{0,5}"];
    let plain = (vec(level, 1..5), any::<bool>()).prop_map(|(levels, multi)| {
        let mut filter = levels.join("/");
        if multi {
            filter.push_str("/#");
        }
        filter
    });
    prop_oneof![
        4 => plain.clone(),
        1 => Just("#".to_owned()),
        1 => ("[a-z]{1,5}", plain).prop_map(|(group, filter)| format!("$share/{group}/{filter}")),
        1 => mqtt_string(),
    ]
}

fn binary() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn payload() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        4 => vec(any::<u8>(), 0..64).prop_map(Bytes::from),
        1 => vec(any::<u8>(), 64..600).prop_map(Bytes::from),
    ]
}

fn packet_id() -> impl Strategy<Value = PacketId> {
    1..=u16::MAX
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![Just(QoS::AtMostOnce), Just(QoS::AtLeastOnce), Just(QoS::ExactlyOnce)]
}

fn flag() -> impl Strategy<Value = u8> {
    0..=1u8
}

/// A subscription identifier: 1 to 268,435,455 (section 3.8.2.1.2).
fn subscription_identifier() -> impl Strategy<Value = u32> {
    prop_oneof![1..=127u32, 128..=16_383u32, 1..=268_435_455u32, Just(268_435_455u32)]
}

// ---------------------------------------------------------------------------------------------------------------
// Properties.

// Where a property block sits decides which properties it may hold (MQTT 5 table 2-4). The codec's context type
// is reused; the table of what each context allows (`restrict`) stays independent of the codec's.
use tollgate_protocol::properties::PropertyContext as Ctx;

/// Properties with every kind possibly set to a valid value; [`restrict`] then keeps what a packet allows.
fn any_properties() -> impl Strategy<Value = Properties> {
    const P: f64 = 0.25;
    let message = (
        weighted(P, flag()),
        weighted(P, any::<u32>()),
        weighted(P, mqtt_string()),
        weighted(P, topic_name()),
        weighted(P, binary()),
        prop_oneof![3 => Just(Vec::new()), 1 => vec(subscription_identifier(), 1..4)],
        weighted(P, 1..=u16::MAX),
    );
    let session = (
        weighted(P, any::<u32>()),
        weighted(P, mqtt_string()),
        weighted(P, any::<u16>()),
        weighted(P, mqtt_string()),
        weighted(P, binary()),
        weighted(P, flag()),
        weighted(P, any::<u32>()),
        weighted(P, flag()),
        weighted(P, mqtt_string()),
        weighted(P, mqtt_string()),
    );
    let limits = (
        weighted(P, mqtt_string()),
        weighted(P, 1..=u16::MAX),
        weighted(P, any::<u16>()),
        weighted(P, flag()),
        weighted(P, flag()),
        weighted(P, 1..=u32::MAX),
        weighted(P, flag()),
        weighted(P, flag()),
        weighted(P, flag()),
        vec((mqtt_string(), mqtt_string()).prop_map(|(key, value)| UserProperty { key, value }), 0..3),
    );
    (message, session, limits).prop_map(|(message, session, limits)| Properties {
        payload_format_indicator: message.0,
        message_expiry_interval: message.1,
        content_type: message.2,
        response_topic: message.3,
        correlation_data: message.4,
        subscription_identifiers: message.5,
        topic_alias: message.6,
        session_expiry_interval: session.0,
        assigned_client_identifier: session.1,
        server_keep_alive: session.2,
        authentication_method: session.3,
        authentication_data: session.4,
        request_problem_information: session.5,
        will_delay_interval: session.6,
        request_response_information: session.7,
        response_information: session.8,
        server_reference: session.9,
        reason_string: limits.0,
        receive_maximum: limits.1,
        topic_alias_maximum: limits.2,
        maximum_qos: limits.3,
        retain_available: limits.4,
        maximum_packet_size: limits.5,
        wildcard_subscription_available: limits.6,
        subscription_identifier_available: limits.7,
        shared_subscription_available: limits.8,
        user_properties: limits.9,
    })
}

/// Keeps only the properties MQTT 5 table 2-4 allows in `ctx`, written out independently of the codec's own
/// table so that the two check each other.
fn restrict(all: Properties, ctx: Ctx) -> Properties {
    use Ctx::*;
    let mut kept = Properties { user_properties: all.user_properties, ..Properties::default() };
    if matches!(ctx, Publish | Will) {
        kept.payload_format_indicator = all.payload_format_indicator;
        kept.message_expiry_interval = all.message_expiry_interval;
        kept.content_type = all.content_type;
        kept.response_topic = all.response_topic;
        kept.correlation_data = all.correlation_data;
    }
    if ctx == Publish {
        kept.subscription_identifiers = all.subscription_identifiers.clone();
        kept.topic_alias = all.topic_alias;
    }
    if ctx == Subscribe {
        // At most one in a SUBSCRIBE (section 3.8.2.1.2).
        kept.subscription_identifiers = all.subscription_identifiers.iter().copied().take(1).collect();
    }
    if ctx == Will {
        kept.will_delay_interval = all.will_delay_interval;
    }
    if matches!(ctx, Connect | ConnAck | Disconnect) {
        kept.session_expiry_interval = all.session_expiry_interval;
    }
    if matches!(ctx, Connect | ConnAck | Auth) {
        kept.authentication_method = all.authentication_method;
        kept.authentication_data = all.authentication_data;
    }
    if ctx == Connect {
        kept.request_problem_information = all.request_problem_information;
        kept.request_response_information = all.request_response_information;
    }
    if matches!(ctx, Connect | ConnAck) {
        kept.receive_maximum = all.receive_maximum;
        kept.topic_alias_maximum = all.topic_alias_maximum;
        kept.maximum_packet_size = all.maximum_packet_size;
    }
    if ctx == ConnAck {
        kept.assigned_client_identifier = all.assigned_client_identifier;
        kept.server_keep_alive = all.server_keep_alive;
        kept.response_information = all.response_information;
        kept.maximum_qos = all.maximum_qos;
        kept.retain_available = all.retain_available;
        kept.wildcard_subscription_available = all.wildcard_subscription_available;
        kept.subscription_identifier_available = all.subscription_identifier_available;
        kept.shared_subscription_available = all.shared_subscription_available;
    }
    if matches!(ctx, ConnAck | Disconnect) {
        kept.server_reference = all.server_reference;
    }
    if matches!(ctx, ConnAck | Ack | SubAck | UnsubAck | Disconnect | Auth) {
        kept.reason_string = all.reason_string;
    }
    // Unsubscribe allows only user properties.
    kept
}

/// Properties for `ctx`: none at all in 3.1.1, often none in v5 either.
fn properties(ctx: Ctx, v5: bool) -> BoxedStrategy<Properties> {
    if v5 {
        prop_oneof![
            1 => Just(Properties::default()),
            3 => any_properties().prop_map(move |all| restrict(all, ctx)),
        ]
        .boxed()
    } else {
        Just(Properties::default()).boxed()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Packets.

fn will(v5: bool) -> impl Strategy<Value = LastWill> {
    (topic_name(), binary(), qos(), any::<bool>(), properties(Ctx::Will, v5))
        .prop_map(|(topic, payload, qos, retain, properties)| LastWill { topic, payload, qos, retain, properties })
}

fn connect(v5: bool) -> impl Strategy<Value = Packet> {
    let protocol = if v5 {
        Just(ProtocolVersion::V5).boxed()
    } else {
        prop_oneof![Just(ProtocolVersion::V311), Just(ProtocolVersion::V31)].boxed()
    };
    (
        protocol,
        any::<bool>(),
        any::<u16>(),
        prop_oneof![1 => Just(String::new()), 4 => mqtt_string()],
        weighted(0.5, mqtt_string()),
        weighted(0.5, binary()),
        weighted(0.4, will(v5)),
        (properties(Ctx::Connect, v5), any::<bool>()),
    )
        .prop_map(
            move |(protocol, clean_start, keep_alive, client_id, username, password, will, (properties, bridge))| {
                // 3.1.1 forbids a password without a user name [MQTT-3.1.2-22]; v5 allows it.
                let password = if !v5 && username.is_none() { None } else { password };
                Packet::Connect(Box::new(Connect {
                    protocol,
                    clean_start,
                    keep_alive,
                    client_id,
                    username,
                    password,
                    will,
                    properties,
                    bridge,
                }))
            },
        )
}

fn connack(v5: bool) -> impl Strategy<Value = Packet> {
    // Any v5 CONNACK code, for 3.1.1 too: the encoder maps it down and `expected` maps the result back up.
    (any::<bool>(), code(CONNACK_CODES), properties(Ctx::ConnAck, v5)).prop_map(
        |(session_present, reason_code, properties)| {
            Packet::ConnAck(ConnAck {
                // Session Present is 0 with any failure code [MQTT-3.2.2-6].
                session_present: session_present && !reason_code.is_error(),
                reason_code,
                properties,
            })
        },
    )
}

fn publish(v5: bool) -> impl Strategy<Value = Packet> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        packet_id(),
        properties(Ctx::Publish, v5),
        payload(),
        any::<bool>(),
    )
        .prop_map(|(qos, dup, retain, topic, id, properties, payload, use_alias_only)| {
            let at_most_once = qos == QoS::AtMostOnce;
            // With a topic alias a v5 PUBLISH may leave the topic name empty.
            let topic = if use_alias_only && properties.topic_alias.is_some() { String::new() } else { topic };
            Packet::Publish(Publish {
                // DUP is 0 for QoS 0 [MQTT-3.3.1-2].
                dup: dup && !at_most_once,
                qos,
                retain,
                topic: Arc::from(topic),
                packet_id: (!at_most_once).then_some(id),
                properties,
                payload,
            })
        })
}

fn ack(v5: bool, valid: &'static [u8]) -> impl Strategy<Value = Ack> {
    let reason = if v5 { code(valid).boxed() } else { Just(ReasonCode::SUCCESS).boxed() };
    (packet_id(), reason, properties(Ctx::Ack, v5)).prop_map(|(packet_id, reason_code, properties)| Ack {
        packet_id,
        reason_code,
        properties,
    })
}

fn subscribe(v5: bool) -> impl Strategy<Value = Packet> {
    let options = (qos(), any::<bool>(), any::<bool>(), 0..=2u8).prop_map(
        move |(qos, no_local, retain_as_published, retain_handling)| {
            if v5 {
                SubscriptionOptions { qos, no_local, retain_as_published, retain_handling }
            } else {
                // 3.1.1 has only the QoS bits.
                SubscriptionOptions { qos, ..SubscriptionOptions::default() }
            }
        },
    );
    let subscription = (topic_filter(), options).prop_map(|(filter, options)| Subscription { filter, options });
    (packet_id(), vec(subscription, 1..5), properties(Ctx::Subscribe, v5)).prop_map(
        |(packet_id, subscriptions, properties)| Packet::Subscribe(Subscribe { packet_id, subscriptions, properties }),
    )
}

fn suback(v5: bool) -> impl Strategy<Value = Packet> {
    let codes = if v5 { SUBACK_CODES } else { SUBACK_V3_CODES };
    (packet_id(), vec(code(codes), 0..6), properties(Ctx::SubAck, v5)).prop_map(
        |(packet_id, reason_codes, properties)| Packet::SubAck(SubAck { packet_id, reason_codes, properties }),
    )
}

fn unsubscribe(v5: bool) -> impl Strategy<Value = Packet> {
    (packet_id(), vec(topic_filter(), 1..5), properties(Ctx::Unsubscribe, v5)).prop_map(
        |(packet_id, filters, properties)| Packet::Unsubscribe(Unsubscribe { packet_id, filters, properties }),
    )
}

fn unsuback(v5: bool) -> impl Strategy<Value = Packet> {
    // A 3.1.1 UNSUBACK has neither reason codes nor properties.
    let codes = if v5 { vec(code(UNSUBACK_CODES), 0..6).boxed() } else { Just(Vec::new()).boxed() };
    (packet_id(), codes, properties(Ctx::UnsubAck, v5)).prop_map(|(packet_id, reason_codes, properties)| {
        Packet::UnsubAck(UnsubAck { packet_id, reason_codes, properties })
    })
}

fn disconnect(v5: bool) -> BoxedStrategy<Packet> {
    if v5 {
        (code(DISCONNECT_CODES), properties(Ctx::Disconnect, true))
            .prop_map(|(reason_code, properties)| Packet::Disconnect(Disconnect { reason_code, properties }))
            .boxed()
    } else {
        Just(Packet::Disconnect(Disconnect::default())).boxed()
    }
}

fn auth() -> impl Strategy<Value = Packet> {
    (code(AUTH_CODES), properties(Ctx::Auth, true))
        .prop_map(|(reason_code, properties)| Packet::Auth(Auth { reason_code, properties }))
}

/// Every packet type valid in `version`.
fn packet(version: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let common = prop_oneof![
        connect(v5),
        connack(v5),
        publish(v5),
        ack(v5, PUBACK_CODES).prop_map(Packet::PubAck),
        ack(v5, PUBACK_CODES).prop_map(Packet::PubRec),
        ack(v5, PUBREL_CODES).prop_map(Packet::PubRel),
        ack(v5, PUBREL_CODES).prop_map(Packet::PubComp),
        subscribe(v5),
        suback(v5),
        unsubscribe(v5),
        unsuback(v5),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        disconnect(v5),
    ];
    if v5 { prop_oneof![14 => common, 1 => auth()].boxed() } else { common.boxed() }
}

fn version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(ProtocolVersion::V311), Just(ProtocolVersion::V5)]
}

fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
    version().prop_flat_map(|version| (Just(version), packet(version)))
}

/// What decoding the encoded `packet` must give. Only a 3.1.1 CONNACK differs: its v5 reason code goes out as the
/// nearest 3.1.1 return code and comes back as that code's v5 counterpart.
fn expected(packet: &Packet, version: ProtocolVersion) -> Packet {
    match packet {
        Packet::ConnAck(connack) if !version.is_v5() => {
            let v3 = connack.reason_code.to_v3_connack();
            Packet::ConnAck(ConnAck { reason_code: ReasonCode::from_v3_connack(v3).unwrap(), ..connack.clone() })
        }
        other => other.clone(),
    }
}

fn encode(packet: &Packet, version: ProtocolVersion) -> BytesMut {
    let mut out = BytesMut::new();
    encode_packet(packet, version, &mut out).unwrap();
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Properties.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn decode_inverts_encode((version, packet) in versioned_packet()) {
        let mut out = BytesMut::new();
        let written = encode_packet(&packet, version, &mut out).unwrap();
        prop_assert_eq!(written, out.len());
        prop_assert_eq!(encoded_len(&packet, version).unwrap(), written);

        let want = expected(&packet, version);
        let mut input = out.clone();
        let decoded = decode_packet(&mut input, version, usize::MAX);
        prop_assert_eq!(decoded, Ok(Some(want.clone())));
        prop_assert!(input.is_empty(), "{} bytes left over", input.len());

        // Re-encoding what was decoded gives the same bytes: the encoder's output is canonical.
        prop_assert_eq!(encode(&want, version), out);
    }

    #[test]
    fn borrowed_publish_encoding_matches_the_packet_encoder((_, packet) in versioned_packet()) {
        if let Packet::Publish(publish) = &packet {
            let flags = PublishFlags { dup: publish.dup, qos: publish.qos, retain: publish.retain };
            let mut borrowed = BytesMut::new();
            let written = encode_publish_v311(&mut borrowed, flags, &publish.topic, publish.packet_id, &publish.payload);
            prop_assert_eq!(written, Ok(borrowed.len()));
            prop_assert_eq!(borrowed, encode(&packet, ProtocolVersion::V311));
        }
    }

    #[test]
    fn byte_by_byte_yields_none_until_the_last_byte((version, packet) in versioned_packet()) {
        let out = encode(&packet, version);
        let want = expected(&packet, version);
        let mut input = BytesMut::new();
        for (index, byte) in out.iter().enumerate() {
            input.extend_from_slice(&[*byte]);
            let result = decode_packet(&mut input, version, out.len());
            if index + 1 < out.len() {
                prop_assert_eq!(result, Ok(None), "after {} of {} bytes", index + 1, out.len());
                prop_assert_eq!(input.len(), index + 1, "bytes consumed before the packet was whole");
            } else {
                prop_assert_eq!(result, Ok(Some(want.clone())));
                prop_assert!(input.is_empty());
            }
        }
    }

    #[test]
    fn max_packet_size_is_inclusive((version, packet) in versioned_packet()) {
        let out = encode(&packet, version);
        let size = out.len();
        let mut input = out.clone();
        prop_assert_eq!(decode_packet(&mut input, version, size), Ok(Some(expected(&packet, version))));
        let mut input = out.clone();
        prop_assert_eq!(
            decode_packet(&mut input, version, size - 1),
            Err(DecodeError::PacketTooLarge { size, limit: size - 1 })
        );
        // The refusal comes from the fixed header alone, before the body is there.
        let (_, header_len, _) = parse_fixed_header(&out).unwrap().unwrap();
        let mut header = BytesMut::from(&out[..header_len]);
        prop_assert_eq!(
            decode_packet(&mut header, version, size - 1),
            Err(DecodeError::PacketTooLarge { size, limit: size - 1 })
        );
    }

    #[test]
    fn streams_split_anywhere_decode_in_order(
        (version, packets) in version().prop_flat_map(|version| (Just(version), vec(packet(version), 1..6))),
        cuts in vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut stream = BytesMut::new();
        for packet in &packets {
            encode_packet(packet, version, &mut stream).unwrap();
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|cut| cut.index(stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();

        let mut input = BytesMut::new();
        let mut decoded = Vec::new();
        let mut fed = 0;
        for cut in cuts {
            input.extend_from_slice(&stream[fed..cut]);
            fed = cut;
            while let Some(packet) = decode_packet(&mut input, version, usize::MAX).unwrap() {
                decoded.push(packet);
            }
        }
        let want: Vec<Packet> = packets.iter().map(|packet| expected(packet, version)).collect();
        prop_assert_eq!(decoded, want);
        prop_assert!(input.is_empty());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A few fixed examples, so that a regression in a common packet reads plainly in the test output.

#[test]
fn v3_connack_return_codes_map_to_v5_reason_codes() {
    let cases = [
        (ReasonCode::SUCCESS, 0x00, ReasonCode::SUCCESS),
        (ReasonCode::UNSUPPORTED_PROTOCOL_VERSION, 0x01, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
        (ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, 0x02, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID),
        (ReasonCode::SERVER_BUSY, 0x03, ReasonCode::SERVER_UNAVAILABLE),
        (ReasonCode::BAD_AUTHENTICATION_METHOD, 0x04, ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        (ReasonCode::BANNED, 0x05, ReasonCode::NOT_AUTHORIZED),
        (ReasonCode::NOT_AUTHORIZED, 0x05, ReasonCode::NOT_AUTHORIZED),
    ];
    for (sent, wire, received) in cases {
        let packet = Packet::ConnAck(ConnAck { reason_code: sent, ..ConnAck::default() });
        let mut out = encode(&packet, ProtocolVersion::V311);
        assert_eq!(&out[..], &[0x20, 0x02, 0x00, wire], "{sent}");
        let decoded = decode_packet(&mut out, ProtocolVersion::V311, 16).unwrap();
        assert_eq!(decoded, Some(Packet::ConnAck(ConnAck { reason_code: received, ..ConnAck::default() })), "{sent}");
    }
}

#[test]
fn v3_suback_error_codes_are_sent_as_0x80() {
    let packet = Packet::SubAck(SubAck {
        packet_id: 7,
        reason_codes: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED, ReasonCode::QUOTA_EXCEEDED],
        properties: Properties::default(),
    });
    let out = encode(&packet, ProtocolVersion::V311);
    assert_eq!(&out[..], &[0x90, 0x05, 0x00, 0x07, 0x01, 0x80, 0x80]);
}

#[test]
fn v3_drops_what_3_1_1_cannot_carry() {
    // The broker hands the encoder v5-shaped packets whatever the peer speaks; for a 3.1.1 peer the extra
    // fields must simply not be written.
    let properties = Properties { reason_string: Some("why".to_owned()), ..Properties::default() };
    let ack = Packet::PubAck(Ack {
        packet_id: 1,
        reason_code: ReasonCode::NO_MATCHING_SUBSCRIBERS,
        properties: properties.clone(),
    });
    assert_eq!(&encode(&ack, ProtocolVersion::V311)[..], &[0x40, 0x02, 0x00, 0x01]);
    let unsuback = Packet::UnsubAck(UnsubAck {
        packet_id: 2,
        reason_codes: vec![ReasonCode::SUCCESS],
        properties: properties.clone(),
    });
    assert_eq!(&encode(&unsuback, ProtocolVersion::V311)[..], &[0xB0, 0x02, 0x00, 0x02]);
    let disconnect = Packet::Disconnect(Disconnect { reason_code: ReasonCode::SERVER_SHUTTING_DOWN, properties });
    assert_eq!(&encode(&disconnect, ProtocolVersion::V311)[..], &[0xE0, 0x00]);
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: 3,
        subscriptions: vec![Subscription {
            filter: "a".to_owned(),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                no_local: true,
                retain_as_published: true,
                retain_handling: 2,
            },
        }],
        properties: Properties::default(),
    });
    assert_eq!(&encode(&subscribe, ProtocolVersion::V311)[..], &[0x82, 0x06, 0x00, 0x03, 0x00, 0x01, b'a', 0x01]);
}

#[test]
fn auth_does_not_exist_in_3_1_1() {
    let mut out = BytesMut::new();
    assert_eq!(
        encode_packet(&Packet::Auth(Auth::default()), ProtocolVersion::V311, &mut out),
        Err(tollgate_protocol::EncodeError::NotInVersion("AUTH"))
    );
    assert!(out.is_empty());
}

#[test]
fn v5_short_forms_are_used_when_allowed() {
    let v5 = ProtocolVersion::V5;
    let ack = Packet::PubAck(Ack::new(9, ReasonCode::SUCCESS));
    assert_eq!(&encode(&ack, v5)[..], &[0x40, 0x02, 0x00, 0x09]);
    let ack = Packet::PubRec(Ack::new(9, ReasonCode::NO_MATCHING_SUBSCRIBERS));
    assert_eq!(&encode(&ack, v5)[..], &[0x50, 0x03, 0x00, 0x09, 0x10]);
    let disconnect = Packet::Disconnect(Disconnect::default());
    assert_eq!(&encode(&disconnect, v5)[..], &[0xE0, 0x00]);
    let disconnect = Packet::Disconnect(Disconnect {
        reason_code: ReasonCode::DISCONNECT_WITH_WILL,
        properties: Properties::default(),
    });
    // With a reason code the empty property length is written too: legal, and rumqttc 0.25 requires it.
    assert_eq!(&encode(&disconnect, v5)[..], &[0xE0, 0x02, 0x04, 0x00]);
    assert_eq!(&encode(&Packet::Auth(Auth::default()), v5)[..], &[0xF0, 0x00]);
}

#[test]
fn large_remaining_lengths_use_multi_byte_headers() {
    for size in [127usize, 128, 16_383, 16_384, 70_000] {
        let packet = Packet::Publish(Publish {
            topic: Arc::from("t"),
            payload: Bytes::from(vec![0xAB; size]),
            ..Publish::default()
        });
        for version in [ProtocolVersion::V311, ProtocolVersion::V5] {
            let mut out = encode(&packet, version);
            assert_eq!(encoded_len(&packet, version).unwrap(), out.len());
            let decoded = decode_packet(&mut out, version, usize::MAX).unwrap();
            assert_eq!(decoded, Some(packet.clone()));
            assert!(out.is_empty());
        }
    }
}
