//! A hand-written corpus of malformed packets, each with the error the decoder must report and the MQTT 5 reason
//! code that error maps to; then valid but unusual packets that it must accept; then the never-panics property
//! over arbitrary bytes.
//!
//! Bodies are written out byte by byte; [`frame`] only prepends the fixed header with the body's length, so that
//! a case is about what it names rather than about a miscounted remaining length.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use tollgate_protocol::{
    Ack, Auth, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, SubAck, Subscribe, Subscription, SubscriptionOptions, UserProperty, decode_packet,
};

const V3: ProtocolVersion = ProtocolVersion::V311;
const V5: ProtocolVersion = ProtocolVersion::V5;
const BIG: usize = 1 << 20;

/// Fixed header (`first` byte, minimal remaining length) followed by `body`.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = bytes::BytesMut::from(&[first][..]);
    tollgate_protocol::encode::put_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out.to_vec()
}

/// Protocol name "MQTT" and level 4.
const MQTT4: &[u8] = &[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04];
/// Protocol name "MQTT" and level 5.
const MQTT5: &[u8] = &[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05];
/// Protocol name "MQIsdp" and level 3.
const MQISDP3: &[u8] = &[0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x03];

/// CONNECT body: protocol name and level, connect flags, keep alive 60, then `rest` (v5 properties and the
/// payload) verbatim.
fn connect(protocol: &[u8], flags: u8, rest: &[u8]) -> Vec<u8> {
    frame(0x10, &[protocol, &[flags, 0x00, 0x3C], rest].concat())
}

struct Bad {
    name: &'static str,
    version: ProtocolVersion,
    bytes: Vec<u8>,
    max: usize,
    error: DecodeError,
    reason: u8,
}

fn bad(name: &'static str, version: ProtocolVersion, bytes: Vec<u8>, error: DecodeError, reason: u8) -> Bad {
    Bad { name, version, bytes, max: BIG, error, reason }
}

fn flags(kind: &'static str, flags: u8) -> DecodeError {
    DecodeError::InvalidHeaderFlags { kind, flags }
}

fn malformed_corpus() -> Vec<Bad> {
    use DecodeError::*;
    vec![
        // --- Fixed header.
        bad(
            "remaining length with five bytes",
            V3,
            vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
            MalformedRemainingLength,
            0x81,
        ),
        bad(
            "remaining length whose fourth byte continues",
            V5,
            vec![0xC0, 0x80, 0x80, 0x80, 0x80],
            MalformedRemainingLength,
            0x81,
        ),
        bad("reserved packet type 0 (3.1.1)", V3, vec![0x00, 0x00], ReservedPacketType(0), 0x81),
        bad("reserved packet type 0 (5)", V5, vec![0x00, 0x00], ReservedPacketType(0), 0x81),
        bad("packet type 15 (AUTH) in 3.1.1", V3, vec![0xF0, 0x00], ReservedPacketType(15), 0x81),
        // --- Fixed-header flags [MQTT-2.1.3-1].
        bad(
            "CONNECT with flags 0x2",
            V3,
            frame(0x12, &[MQTT4, &[0x02, 0x00, 0x3C, 0x00, 0x01, b'c']].concat()),
            flags("CONNECT", 0x2),
            0x81,
        ),
        bad("CONNACK with flags 0x1", V3, vec![0x21, 0x02, 0x00, 0x00], flags("CONNACK", 0x1), 0x81),
        bad("PUBACK with flags 0x2", V3, vec![0x42, 0x02, 0x00, 0x01], flags("PUBACK", 0x2), 0x81),
        bad("PUBREC with flags 0x8", V5, vec![0x58, 0x02, 0x00, 0x01], flags("PUBREC", 0x8), 0x81),
        bad("PUBREL with flags 0x0", V3, vec![0x60, 0x02, 0x00, 0x01], flags("PUBREL", 0x0), 0x81),
        bad("PUBREL with flags 0x3", V5, vec![0x63, 0x02, 0x00, 0x01], flags("PUBREL", 0x3), 0x81),
        bad("PUBCOMP with flags 0x2", V3, vec![0x72, 0x02, 0x00, 0x01], flags("PUBCOMP", 0x2), 0x81),
        bad(
            "SUBSCRIBE with flags 0x0",
            V3,
            frame(0x80, &[0x00, 0x01, 0x00, 0x01, b'a', 0x00]),
            flags("SUBSCRIBE", 0x0),
            0x81,
        ),
        bad(
            "SUBSCRIBE with flags 0x3",
            V5,
            frame(0x83, &[0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x00]),
            flags("SUBSCRIBE", 0x3),
            0x81,
        ),
        bad("SUBACK with flags 0x2", V3, vec![0x92, 0x03, 0x00, 0x01, 0x00], flags("SUBACK", 0x2), 0x81),
        bad(
            "UNSUBSCRIBE with flags 0x0",
            V3,
            frame(0xA0, &[0x00, 0x01, 0x00, 0x01, b'a']),
            flags("UNSUBSCRIBE", 0x0),
            0x81,
        ),
        bad("UNSUBACK with flags 0x4", V3, vec![0xB4, 0x02, 0x00, 0x01], flags("UNSUBACK", 0x4), 0x81),
        bad("PINGREQ with flags 0x1", V3, vec![0xC1, 0x00], flags("PINGREQ", 0x1), 0x81),
        bad("PINGRESP with flags 0x8", V5, vec![0xD8, 0x00], flags("PINGRESP", 0x8), 0x81),
        bad("DISCONNECT with flags 0x2", V3, vec![0xE2, 0x00], flags("DISCONNECT", 0x2), 0x81),
        bad("AUTH with flags 0x1", V5, vec![0xF1, 0x00], flags("AUTH", 0x1), 0x81),
        bad("PUBLISH with QoS 3", V3, frame(0x36, &[0x00, 0x01, b'a', 0x00, 0x01]), InvalidQoS, 0x81),
        bad("PUBLISH with QoS 3 and DUP (5)", V5, frame(0x3E, &[0x00, 0x01, b'a', 0x00, 0x01, 0x00]), InvalidQoS, 0x81),
        bad("PUBLISH with DUP and QoS 0", V3, frame(0x38, &[0x00, 0x01, b'a']), flags("PUBLISH", 0x8), 0x81),
        bad(
            "PUBLISH with DUP, retain and QoS 0 (5)",
            V5,
            frame(0x39, &[0x00, 0x01, b'a', 0x00]),
            flags("PUBLISH", 0x9),
            0x81,
        ),
        // --- Bodies that end before their fields do.
        bad("PUBLISH topic length points past the end", V3, frame(0x30, &[0x00, 0x05, b'a', b'b']), Truncated, 0x81),
        bad("PUBLISH QoS 1 without packet identifier", V3, frame(0x32, &[0x00, 0x01, b'a']), Truncated, 0x81),
        bad("PUBLISH QoS 2 with half a packet identifier", V3, frame(0x34, &[0x00, 0x01, b'a', 0x00]), Truncated, 0x81),
        bad("PUBLISH (5) without property length", V5, frame(0x30, &[0x00, 0x01, b'a']), Truncated, 0x81),
        bad("PUBACK without packet identifier", V3, vec![0x40, 0x00], Truncated, 0x81),
        bad("PUBREL with one byte of packet identifier", V5, vec![0x62, 0x01, 0x00], Truncated, 0x81),
        bad(
            "PUBACK (5) property length points past the end",
            V5,
            vec![0x40, 0x04, 0x00, 0x01, 0x00, 0x05],
            Truncated,
            0x81,
        ),
        bad(
            "PUBACK (5) property length is a malformed variable byte integer",
            V5,
            vec![0x40, 0x07, 0x00, 0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF],
            MalformedRemainingLength,
            0x81,
        ),
        bad(
            "PUBLISH (5) property value cut by the property length",
            V5,
            frame(0x30, &[0x00, 0x01, b'a', 0x02, 0x02, 0x00, 0x00, 0x00, 0x00]),
            Truncated,
            0x81,
        ),
        bad("SUBSCRIBE without options byte", V3, frame(0x82, &[0x00, 0x01, 0x00, 0x01, b'a']), Truncated, 0x81),
        bad(
            "UNSUBSCRIBE filter length points past the end",
            V3,
            frame(0xA2, &[0x00, 0x01, 0x00, 0x09, b'a']),
            Truncated,
            0x81,
        ),
        bad("SUBACK without packet identifier", V3, vec![0x90, 0x01, 0x00], Truncated, 0x81),
        bad("CONNACK with only the flags byte", V3, vec![0x20, 0x01, 0x00], Truncated, 0x81),
        bad("CONNACK (5) without property length", V5, vec![0x20, 0x02, 0x00, 0x00], Truncated, 0x81),
        bad(
            "CONNECT ending after the protocol name",
            V3,
            frame(0x10, &[0x00, 0x04, b'M', b'Q', b'T', b'T']),
            Truncated,
            0x81,
        ),
        bad("CONNECT without client identifier", V3, connect(MQTT4, 0x02, &[]), Truncated, 0x81),
        bad("CONNECT with the will flag but no will", V3, connect(MQTT4, 0x06, &[0x00, 0x01, b'c']), Truncated, 0x81),
        bad(
            "CONNECT with the user name flag but no user name",
            V3,
            connect(MQTT4, 0x82, &[0x00, 0x01, b'c']),
            Truncated,
            0x81,
        ),
        bad("CONNECT (5) without property length", V5, connect(MQTT5, 0x02, &[]), Truncated, 0x81),
        bad("DISCONNECT (5) property length points past the end", V5, vec![0xE0, 0x02, 0x00, 0x03], Truncated, 0x81),
        // --- Strings [MQTT-1.5.4-1, MQTT-1.5.4-2].
        bad("topic with invalid UTF-8 C3 28", V3, frame(0x30, &[0x00, 0x02, 0xC3, 0x28]), InvalidUtf8, 0x81),
        bad(
            "topic with the encoded surrogate ED A0 80",
            V5,
            frame(0x30, &[0x00, 0x03, 0xED, 0xA0, 0x80, 0x00]),
            InvalidUtf8,
            0x81,
        ),
        bad("topic with the overlong encoding C0 AF", V3, frame(0x30, &[0x00, 0x02, 0xC0, 0xAF]), InvalidUtf8, 0x81),
        bad(
            "topic with a code point above U+10FFFF",
            V3,
            frame(0x30, &[0x00, 0x04, 0xF4, 0x90, 0x80, 0x80]),
            InvalidUtf8,
            0x81,
        ),
        bad(
            "topic cut inside a multi-byte character",
            V3,
            frame(0x30, &[0x00, 0x02, b'a', 0xE2, 0x82]),
            InvalidUtf8,
            0x81,
        ),
        bad("topic with U+0000", V3, frame(0x30, &[0x00, 0x03, b'a', 0x00, b'b']), InvalidUtf8, 0x81),
        bad(
            "client identifier with invalid UTF-8",
            V3,
            connect(MQTT4, 0x02, &[0x00, 0x02, 0xC3, 0x28]),
            InvalidUtf8,
            0x81,
        ),
        bad(
            "user name with U+0000",
            V5,
            connect(MQTT5, 0x82, &[0x00, 0x00, 0x01, b'c', 0x00, 0x02, b'u', 0x00]),
            InvalidUtf8,
            0x81,
        ),
        bad(
            "protocol name with invalid UTF-8",
            V3,
            frame(0x10, &[0x00, 0x04, b'M', 0xFF, b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x00]),
            InvalidUtf8,
            0x81,
        ),
        bad(
            "will topic with the surrogate ED B0 80",
            V3,
            connect(MQTT4, 0x06, &[0x00, 0x01, b'c', 0x00, 0x03, 0xED, 0xB0, 0x80, 0x00, 0x00]),
            InvalidUtf8,
            0x81,
        ),
        bad(
            "SUBSCRIBE filter with invalid UTF-8",
            V3,
            frame(0x82, &[0x00, 0x01, 0x00, 0x02, 0xC3, 0x28, 0x00]),
            InvalidUtf8,
            0x81,
        ),
        bad(
            "UNSUBSCRIBE filter with U+0000",
            V5,
            frame(0xA2, &[0x00, 0x01, 0x00, 0x00, 0x01, 0x00]),
            InvalidUtf8,
            0x81,
        ),
        bad(
            "user property key with invalid UTF-8",
            V5,
            vec![0x40, 0x0C, 0x00, 0x01, 0x00, 0x08, 0x26, 0x00, 0x02, 0xC3, 0x28, 0x00, 0x01, b'v'],
            InvalidUtf8,
            0x81,
        ),
        bad("reason string with U+0000", V5, vec![0xE0, 0x06, 0x80, 0x04, 0x1F, 0x00, 0x01, 0x00], InvalidUtf8, 0x81),
        // --- Topic names.
        bad("PUBLISH topic with +", V3, frame(0x30, &[0x00, 0x03, b'a', b'/', b'+']), WildcardInTopicName, 0x90),
        bad("PUBLISH topic with #", V5, frame(0x30, &[0x00, 0x03, b'a', b'/', b'#', 0x00]), WildcardInTopicName, 0x90),
        bad(
            "PUBLISH topic with + inside a level",
            V3,
            frame(0x32, &[0x00, 0x03, b'a', b'+', b'b', 0x00, 0x01]),
            WildcardInTopicName,
            0x90,
        ),
        bad(
            "will topic with #",
            V3,
            connect(MQTT4, 0x06, &[0x00, 0x01, b'c', 0x00, 0x01, b'#', 0x00, 0x00]),
            WildcardInTopicName,
            0x90,
        ),
        bad("PUBLISH with empty topic (3.1.1)", V3, frame(0x30, &[0x00, 0x00, b'x']), EmptyTopicName, 0x82),
        bad(
            "PUBLISH with empty topic and no topic alias (5)",
            V5,
            frame(0x30, &[0x00, 0x00, 0x00, b'x']),
            EmptyTopicName,
            0x82,
        ),
        bad(
            "response topic with a wildcard",
            V5,
            frame(0x30, &[0x00, 0x01, b'a', 0x05, 0x08, 0x00, 0x02, b'r', b'+']),
            InvalidPropertyValue(0x08),
            0x82,
        ),
        // --- CONNECT.
        bad("CONNECT reserved flag", V3, connect(MQTT4, 0x03, &[0x00, 0x01, b'c']), ReservedConnectFlag, 0x81),
        bad(
            "CONNECT (5) reserved flag",
            V5,
            connect(MQTT5, 0x01, &[0x00, 0x00, 0x01, b'c']),
            ReservedConnectFlag,
            0x81,
        ),
        bad(
            "will QoS without the will flag",
            V3,
            connect(MQTT4, 0x0A, &[0x00, 0x01, b'c']),
            WillFlagsWithoutWill,
            0x81,
        ),
        bad(
            "will retain without the will flag",
            V5,
            connect(MQTT5, 0x22, &[0x00, 0x00, 0x01, b'c']),
            WillFlagsWithoutWill,
            0x81,
        ),
        bad(
            "will QoS 3",
            V3,
            connect(MQTT4, 0x1E, &[0x00, 0x01, b'c', 0x00, 0x01, b't', 0x00, 0x00]),
            InvalidQoS,
            0x81,
        ),
        bad(
            "password without user name (3.1.1)",
            V3,
            connect(MQTT4, 0x42, &[0x00, 0x01, b'c', 0x00, 0x02, b'p', b'w']),
            PasswordWithoutUsername,
            0x81,
        ),
        bad(
            "password without user name (3.1)",
            V3,
            connect(MQISDP3, 0x42, &[0x00, 0x01, b'c', 0x00, 0x02, b'p', b'w']),
            PasswordWithoutUsername,
            0x81,
        ),
        bad(
            "protocol level 6",
            V3,
            connect(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x06], 0x02, &[0x00, 0x01, b'c']),
            UnsupportedProtocolLevel(6),
            0x84,
        ),
        bad(
            "protocol name MQTT with level 3",
            V5,
            connect(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x03], 0x02, &[0x00, 0x01, b'c']),
            UnsupportedProtocolLevel(3),
            0x84,
        ),
        bad(
            "protocol name MQIsdp with level 4",
            V3,
            connect(&[0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', 0x04], 0x02, &[0x00, 0x01, b'c']),
            UnsupportedProtocolLevel(4),
            0x84,
        ),
        bad(
            "protocol name MQTX",
            V3,
            connect(&[0x00, 0x04, b'M', b'Q', b'T', b'X', 0x04], 0x02, &[0x00, 0x01, b'c']),
            InvalidProtocolName("other"),
            0x84,
        ),
        bad(
            "protocol name in lower case",
            V3,
            connect(&[0x00, 0x04, b'm', b'q', b't', b't', 0x04], 0x02, &[0x00, 0x01, b'c']),
            InvalidProtocolName("other"),
            0x84,
        ),
        bad(
            "CONNECT with bytes after the payload",
            V3,
            connect(MQTT4, 0x02, &[0x00, 0x01, b'c', 0xAA, 0xBB]),
            TrailingBytes(2),
            0x81,
        ),
        // --- Packet identifier 0 [MQTT-2.2.1-3].
        bad("PUBACK with packet identifier 0", V3, vec![0x40, 0x02, 0x00, 0x00], ZeroPacketId, 0x81),
        bad("PUBREC with packet identifier 0", V5, vec![0x50, 0x02, 0x00, 0x00], ZeroPacketId, 0x81),
        bad("PUBREL with packet identifier 0", V3, vec![0x62, 0x02, 0x00, 0x00], ZeroPacketId, 0x81),
        bad("PUBCOMP with packet identifier 0", V5, vec![0x70, 0x03, 0x00, 0x00, 0x00], ZeroPacketId, 0x81),
        bad(
            "PUBLISH QoS 1 with packet identifier 0",
            V3,
            frame(0x32, &[0x00, 0x01, b'a', 0x00, 0x00]),
            ZeroPacketId,
            0x81,
        ),
        bad(
            "SUBSCRIBE with packet identifier 0",
            V3,
            frame(0x82, &[0x00, 0x00, 0x00, 0x01, b'a', 0x00]),
            ZeroPacketId,
            0x81,
        ),
        bad(
            "UNSUBSCRIBE with packet identifier 0",
            V5,
            frame(0xA2, &[0x00, 0x00, 0x00, 0x00, 0x01, b'a']),
            ZeroPacketId,
            0x81,
        ),
        bad("SUBACK with packet identifier 0", V3, vec![0x90, 0x03, 0x00, 0x00, 0x00], ZeroPacketId, 0x81),
        bad("UNSUBACK with packet identifier 0", V3, vec![0xB0, 0x02, 0x00, 0x00], ZeroPacketId, 0x81),
        // --- Properties: duplicates (Protocol Error).
        bad(
            "duplicate payload format indicator",
            V5,
            frame(0x30, &[0x00, 0x01, b'a', 0x04, 0x01, 0x00, 0x01, 0x01]),
            DuplicateProperty(0x01),
            0x82,
        ),
        bad(
            "duplicate topic alias",
            V5,
            frame(0x30, &[0x00, 0x01, b'a', 0x06, 0x23, 0x00, 0x01, 0x23, 0x00, 0x01]),
            DuplicateProperty(0x23),
            0x82,
        ),
        bad(
            "duplicate session expiry interval in CONNECT",
            V5,
            connect(MQTT5, 0x02, &[0x0A, 0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2, 0x00, 0x01, b'c']),
            DuplicateProperty(0x11),
            0x82,
        ),
        bad(
            "duplicate reason string in PUBACK",
            V5,
            vec![0x40, 0x0C, 0x00, 0x01, 0x80, 0x08, 0x1F, 0x00, 0x01, b'x', 0x1F, 0x00, 0x01, b'y'],
            DuplicateProperty(0x1F),
            0x82,
        ),
        bad(
            "two subscription identifiers in SUBSCRIBE",
            V5,
            frame(0x82, &[0x00, 0x01, 0x04, 0x0B, 0x01, 0x0B, 0x02, 0x00, 0x01, b'a', 0x00]),
            DuplicateProperty(0x0B),
            0x82,
        ),
        bad(
            "duplicate will delay interval",
            V5,
            connect(
                MQTT5,
                0x06,
                &[0x00, 0x00, 0x01, b'c', 0x0A, 0x18, 0, 0, 0, 1, 0x18, 0, 0, 0, 1, 0x00, 0x01, b't', 0x00, 0x00],
            ),
            DuplicateProperty(0x18),
            0x82,
        ),
        // --- Properties not allowed in the packet (table 2-4) or unknown.
        bad(
            "session expiry interval in PUBLISH",
            V5,
            frame(0x30, &[0x00, 0x01, b'a', 0x05, 0x11, 0, 0, 0, 0]),
            InvalidProperty(0x11),
            0x81,
        ),
        bad(
            "reason string in PUBLISH",
            V5,
            frame(0x30, &[0x00, 0x01, b'a', 0x04, 0x1F, 0x00, 0x01, b'x']),
            InvalidProperty(0x1F),
            0x81,
        ),
        bad(
            "topic alias in CONNECT",
            V5,
            connect(MQTT5, 0x02, &[0x03, 0x23, 0x00, 0x01, 0x00, 0x01, b'c']),
            InvalidProperty(0x23),
            0x81,
        ),
        bad(
            "will delay interval in CONNECT properties",
            V5,
            connect(MQTT5, 0x02, &[0x05, 0x18, 0, 0, 0, 1, 0x00, 0x01, b'c']),
            InvalidProperty(0x18),
            0x81,
        ),
        bad(
            "session expiry interval in will properties",
            V5,
            connect(MQTT5, 0x06, &[0x00, 0x00, 0x01, b'c', 0x05, 0x11, 0, 0, 0, 1, 0x00, 0x01, b't', 0x00, 0x00]),
            InvalidProperty(0x11),
            0x81,
        ),
        bad(
            "subscription identifier in UNSUBSCRIBE",
            V5,
            frame(0xA2, &[0x00, 0x01, 0x02, 0x0B, 0x01, 0x00, 0x01, b'a']),
            InvalidProperty(0x0B),
            0x81,
        ),
        bad("maximum QoS in DISCONNECT", V5, vec![0xE0, 0x04, 0x00, 0x02, 0x24, 0x00], InvalidProperty(0x24), 0x81),
        bad(
            "server keep alive in AUTH",
            V5,
            vec![0xF0, 0x05, 0x18, 0x03, 0x13, 0x00, 0x0A],
            InvalidProperty(0x13),
            0x81,
        ),
        bad(
            "unknown property 0x05",
            V5,
            vec![0x40, 0x06, 0x00, 0x01, 0x00, 0x02, 0x05, 0x00],
            InvalidProperty(0x05),
            0x81,
        ),
        bad("unknown property 0x00", V5, vec![0xE0, 0x03, 0x00, 0x01, 0x00], InvalidProperty(0x00), 0x81),
        // --- Property values out of range (Protocol Error).
        bad(
            "receive maximum 0",
            V5,
            connect(MQTT5, 0x02, &[0x03, 0x21, 0x00, 0x00, 0x00, 0x01, b'c']),
            InvalidPropertyValue(0x21),
            0x82,
        ),
        bad(
            "topic alias 0",
            V5,
            frame(0x30, &[0x00, 0x01, b'a', 0x03, 0x23, 0x00, 0x00]),
            InvalidPropertyValue(0x23),
            0x82,
        ),
        bad(
            "payload format indicator 2",
            V5,
            frame(0x30, &[0x00, 0x01, b'a', 0x02, 0x01, 0x02]),
            InvalidPropertyValue(0x01),
            0x82,
        ),
        bad(
            "payload format indicator 2 in will properties",
            V5,
            connect(MQTT5, 0x06, &[0x00, 0x00, 0x01, b'c', 0x02, 0x01, 0x02, 0x00, 0x01, b't', 0x00, 0x00]),
            InvalidPropertyValue(0x01),
            0x82,
        ),
        bad(
            "maximum packet size 0",
            V5,
            connect(MQTT5, 0x02, &[0x05, 0x27, 0, 0, 0, 0, 0x00, 0x01, b'c']),
            InvalidPropertyValue(0x27),
            0x82,
        ),
        bad(
            "subscription identifier 0",
            V5,
            frame(0x82, &[0x00, 0x01, 0x02, 0x0B, 0x00, 0x00, 0x01, b'a', 0x00]),
            InvalidPropertyValue(0x0B),
            0x82,
        ),
        bad(
            "subscription identifier 0 in PUBLISH",
            V5,
            frame(0x30, &[0x00, 0x01, b'a', 0x02, 0x0B, 0x00]),
            InvalidPropertyValue(0x0B),
            0x82,
        ),
        bad(
            "request problem information 2",
            V5,
            connect(MQTT5, 0x02, &[0x02, 0x17, 0x02, 0x00, 0x01, b'c']),
            InvalidPropertyValue(0x17),
            0x82,
        ),
        bad(
            "request response information 2",
            V5,
            connect(MQTT5, 0x02, &[0x02, 0x19, 0x02, 0x00, 0x01, b'c']),
            InvalidPropertyValue(0x19),
            0x82,
        ),
        bad(
            "maximum QoS 2 in CONNACK",
            V5,
            vec![0x20, 0x05, 0x00, 0x00, 0x02, 0x24, 0x02],
            InvalidPropertyValue(0x24),
            0x82,
        ),
        // --- SUBSCRIBE and UNSUBSCRIBE payloads.
        bad("SUBSCRIBE without topic filters (3.1.1)", V3, vec![0x82, 0x02, 0x00, 0x01], NoTopicFilters, 0x82),
        bad("SUBSCRIBE without topic filters (5)", V5, vec![0x82, 0x03, 0x00, 0x01, 0x00], NoTopicFilters, 0x82),
        bad("UNSUBSCRIBE without topic filters (3.1.1)", V3, vec![0xA2, 0x02, 0x00, 0x01], NoTopicFilters, 0x82),
        bad("UNSUBSCRIBE without topic filters (5)", V5, vec![0xA2, 0x03, 0x00, 0x01, 0x00], NoTopicFilters, 0x82),
        bad(
            "subscription options bit 6 set (5)",
            V5,
            frame(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x40]),
            InvalidSubscriptionOptions,
            0x81,
        ),
        bad(
            "subscription options bit 7 set (5)",
            V5,
            frame(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x81]),
            InvalidSubscriptionOptions,
            0x81,
        ),
        bad(
            "retain handling 3",
            V5,
            frame(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x30]),
            InvalidSubscriptionOptions,
            0x81,
        ),
        bad(
            "no-local bit in 3.1.1, where it is reserved",
            V3,
            frame(0x82, &[0x00, 0x01, 0x00, 0x01, b'a', 0x04]),
            InvalidSubscriptionOptions,
            0x81,
        ),
        bad(
            "retain handling bits in 3.1.1",
            V3,
            frame(0x82, &[0x00, 0x01, 0x00, 0x01, b'a', 0x10]),
            InvalidSubscriptionOptions,
            0x81,
        ),
        bad("subscription QoS 3", V3, frame(0x82, &[0x00, 0x01, 0x00, 0x01, b'a', 0x03]), InvalidQoS, 0x81),
        bad(
            "second subscription invalid",
            V5,
            frame(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x01, 0x00, 0x01, b'b', 0x31]),
            InvalidSubscriptionOptions,
            0x81,
        ),
        // --- Bytes after the last field.
        bad("PINGREQ with a body", V3, vec![0xC0, 0x01, 0x00], TrailingBytes(1), 0x81),
        bad("PINGREQ (5) with a body", V5, vec![0xC0, 0x02, 0x00, 0x00], TrailingBytes(2), 0x81),
        bad("PINGRESP with a body", V3, vec![0xD0, 0x01, 0x00], TrailingBytes(1), 0x81),
        bad("DISCONNECT (3.1.1) with a body", V3, vec![0xE0, 0x01, 0x00], TrailingBytes(1), 0x81),
        bad("PUBACK (3.1.1) with a reason code", V3, vec![0x40, 0x03, 0x00, 0x01, 0x00], TrailingBytes(1), 0x81),
        bad("UNSUBACK (3.1.1) with reason codes", V3, vec![0xB0, 0x04, 0x00, 0x01, 0x00, 0x00], TrailingBytes(2), 0x81),
        bad("CONNACK (3.1.1) with a property length", V3, vec![0x20, 0x03, 0x00, 0x00, 0x00], TrailingBytes(1), 0x81),
        bad(
            "PUBACK (5) with bytes after its properties",
            V5,
            vec![0x40, 0x05, 0x00, 0x01, 0x00, 0x00, 0xAA],
            TrailingBytes(1),
            0x81,
        ),
        bad(
            "DISCONNECT (5) with bytes after its properties",
            V5,
            vec![0xE0, 0x03, 0x00, 0x00, 0xAA],
            TrailingBytes(1),
            0x81,
        ),
        bad("AUTH with bytes after its properties", V5, vec![0xF0, 0x03, 0x18, 0x00, 0xAA], TrailingBytes(1), 0x81),
        // --- Reason codes.
        bad("PUBACK (5) with reason code 0x05", V5, vec![0x40, 0x03, 0x00, 0x01, 0x05], InvalidReasonCode(0x05), 0x81),
        bad("PUBREC (5) with reason code 0x92", V5, vec![0x50, 0x03, 0x00, 0x01, 0x92], InvalidReasonCode(0x92), 0x81),
        bad("PUBREL (5) with reason code 0x10", V5, vec![0x62, 0x03, 0x00, 0x01, 0x10], InvalidReasonCode(0x10), 0x81),
        bad("PUBCOMP (5) with reason code 0x80", V5, vec![0x70, 0x03, 0x00, 0x01, 0x80], InvalidReasonCode(0x80), 0x81),
        bad("AUTH with reason code 0x01", V5, vec![0xF0, 0x02, 0x01, 0x00], InvalidReasonCode(0x01), 0x81),
        bad(
            "CONNACK (3.1.1) with reserved return code 6",
            V3,
            vec![0x20, 0x02, 0x00, 0x06],
            InvalidReasonCode(0x06),
            0x81,
        ),
        bad("CONNACK (3.1.1) with a v5 reason code", V3, vec![0x20, 0x02, 0x00, 0x87], InvalidReasonCode(0x87), 0x81),
        bad(
            "SUBACK (3.1.1) with return code 0x03",
            V3,
            vec![0x90, 0x04, 0x00, 0x01, 0x00, 0x03],
            InvalidReasonCode(0x03),
            0x81,
        ),
        bad(
            "SUBACK (3.1.1) with the v5 code 0x87",
            V3,
            vec![0x90, 0x03, 0x00, 0x01, 0x87],
            InvalidReasonCode(0x87),
            0x81,
        ),
        bad(
            "CONNACK with reserved acknowledge flags",
            V5,
            vec![0x20, 0x03, 0x02, 0x00, 0x00],
            flags("CONNACK", 0x02),
            0x81,
        ),
        // --- Size limit.
        Bad {
            name: "PUBLISH over the limit, only the fixed header received",
            version: V3,
            bytes: vec![0x30, 0xFF, 0x7F],
            max: 1024,
            error: PacketTooLarge { size: 3 + 16_383, limit: 1024 },
            reason: 0x95,
        },
        Bad {
            name: "largest remaining length, only the fixed header received",
            version: V5,
            bytes: vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F],
            max: BIG,
            error: PacketTooLarge { size: 5 + 268_435_455, limit: BIG },
            reason: 0x95,
        },
        Bad {
            name: "complete PINGREQ one byte over the limit",
            version: V3,
            bytes: vec![0xC0, 0x00],
            max: 1,
            error: PacketTooLarge { size: 2, limit: 1 },
            reason: 0x95,
        },
        Bad {
            name: "CONNECT over the limit",
            version: V3,
            bytes: connect(MQTT4, 0x02, &[0x00, 0x01, b'c']),
            max: 10,
            error: PacketTooLarge { size: 15, limit: 10 },
            reason: 0x95,
        },
    ]
}

#[test]
fn malformed_packets_are_rejected_with_the_right_error_and_reason_code() {
    let corpus = malformed_corpus();
    let mut failures = Vec::new();
    for case in &corpus {
        let mut buffer = BytesMut::from(&case.bytes[..]);
        let result = decode_packet(&mut buffer, case.version, case.max);
        if result != Err(case.error) {
            failures.push(format!("{}: expected {:?}, got {:?}", case.name, case.error, result));
            continue;
        }
        if case.error.reason_code() != ReasonCode(case.reason) {
            failures.push(format!(
                "{}: {:?} maps to {}, expected 0x{:02X}",
                case.name,
                case.error,
                case.error.reason_code(),
                case.reason
            ));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), corpus.len(), failures.join("\n"));
}

#[test]
fn no_strict_prefix_of_a_malformed_packet_is_an_error_except_at_the_header() {
    // Body errors only surface once the whole declared body is there; before that the decoder waits. Errors
    // decided by the fixed header alone (remaining length, size limit) may surface as soon as it is complete.
    for case in malformed_corpus() {
        let header_decides =
            matches!(case.error, DecodeError::MalformedRemainingLength | DecodeError::PacketTooLarge { .. });
        for cut in 0..case.bytes.len() {
            let mut buffer = BytesMut::from(&case.bytes[..cut]);
            let result = decode_packet(&mut buffer, case.version, case.max);
            match result {
                Ok(None) => assert_eq!(buffer.len(), cut, "{}: consumed bytes", case.name),
                Err(error) if header_decides && error == case.error => {}
                other => panic!("{} cut at {cut}: {other:?}", case.name),
            }
        }
    }
}

#[test]
fn a_packet_refused_as_too_large_is_not_consumed() {
    let mut buffer = BytesMut::from(&[0x30u8, 0xFF, 0x7F][..]);
    assert_eq!(decode_packet(&mut buffer, V3, 1024), Err(DecodeError::PacketTooLarge { size: 16_386, limit: 1024 }));
    assert_eq!(buffer.len(), 3);
}

#[test]
fn every_error_has_a_reason_code_that_is_an_error() {
    for case in malformed_corpus() {
        assert!(case.error.reason_code().is_error(), "{}", case.name);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Valid but unusual packets: must be accepted.

fn publish(topic: &str, qos: QoS, packet_id: Option<u16>, payload: &[u8]) -> Publish {
    Publish { qos, topic: Arc::from(topic), packet_id, payload: Bytes::copy_from_slice(payload), ..Publish::default() }
}

fn connect_packet(protocol: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol,
        clean_start: true,
        keep_alive: 60,
        client_id: client_id.to_owned(),
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
        bridge: false,
    }
}

fn accepted_corpus() -> Vec<(&'static str, ProtocolVersion, Vec<u8>, Packet)> {
    vec![
        ("PINGREQ with a two-byte remaining length of 0", V3, vec![0xC0, 0x80, 0x00], Packet::PingReq),
        ("PINGREQ with a four-byte remaining length of 0", V5, vec![0xC0, 0x80, 0x80, 0x80, 0x00], Packet::PingReq),
        (
            "PUBACK with a two-byte remaining length of 2",
            V3,
            vec![0x40, 0x82, 0x00, 0x00, 0x01],
            Packet::PubAck(Ack::new(1, ReasonCode::SUCCESS)),
        ),
        (
            "PUBLISH with an empty payload",
            V3,
            vec![0x30, 0x03, 0x00, 0x01, b'a'],
            Packet::Publish(publish("a", QoS::AtMostOnce, None, b"")),
        ),
        (
            "PUBLISH (5) with an empty payload",
            V5,
            vec![0x32, 0x06, 0x00, 0x01, b'a', 0xFF, 0xFF, 0x00],
            Packet::Publish(publish("a", QoS::AtLeastOnce, Some(0xFFFF), b"")),
        ),
        (
            "PUBLISH QoS 2 with DUP and retain",
            V3,
            vec![0x3D, 0x06, 0x00, 0x01, b'a', 0x00, 0x07, b'x'],
            Packet::Publish(Publish { dup: true, retain: true, ..publish("a", QoS::ExactlyOnce, Some(7), b"x") }),
        ),
        (
            "PUBLISH topic with multi-byte characters and a BOM",
            V3,
            frame(0x30, &[0x00, 0x0D, 0xEF, 0xBB, 0xBF, 0xC3, 0xBC, b'/', 0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80]),
            Packet::Publish(publish("\u{FEFF}ü/€😀", QoS::AtMostOnce, None, b"")),
        ),
        (
            "PUBLISH topic that is only a slash and a $",
            V3,
            vec![0x30, 0x04, 0x00, 0x02, b'$', b'/'],
            Packet::Publish(publish("$/", QoS::AtMostOnce, None, b"")),
        ),
        (
            "PUBLISH (5) with an empty topic and a topic alias",
            V5,
            vec![0x30, 0x07, 0x00, 0x00, 0x03, 0x23, 0x00, 0x01, b'p'],
            Packet::Publish(Publish {
                properties: Properties { topic_alias: Some(1), ..Properties::default() },
                ..publish("", QoS::AtMostOnce, None, b"p")
            }),
        ),
        (
            "PUBLISH (5) with several subscription identifiers",
            V5,
            frame(0x30, &[0x00, 0x01, b'a', 0x06, 0x0B, 0x01, 0x0B, 0xFF, 0xFF, 0x7F]),
            Packet::Publish(Publish {
                properties: Properties { subscription_identifiers: vec![1, 2_097_151], ..Properties::default() },
                ..publish("a", QoS::AtMostOnce, None, b"")
            }),
        ),
        (
            "PUBLISH (5) with repeated and empty user properties",
            V5,
            frame(
                0x30,
                &[0x00, 0x01, b'a', 0x0C, 0x26, 0x00, 0x00, 0x00, 0x00, 0x26, 0x00, 0x00, 0x00, 0x00, 0x01, 0x01],
            ),
            Packet::Publish(Publish {
                properties: Properties {
                    payload_format_indicator: Some(1),
                    user_properties: vec![UserProperty { key: String::new(), value: String::new() }; 2],
                    ..Properties::default()
                },
                ..publish("a", QoS::AtMostOnce, None, b"")
            }),
        ),
        (
            "CONNECT MQIsdp level 3",
            V3,
            connect(MQISDP3, 0x02, &[0x00, 0x01, b'c']),
            Packet::Connect(Box::new(connect_packet(ProtocolVersion::V31, "c"))),
        ),
        (
            "CONNECT with a zero-length client identifier (3.1.1)",
            V3,
            connect(MQTT4, 0x02, &[0x00, 0x00]),
            Packet::Connect(Box::new(connect_packet(ProtocolVersion::V311, ""))),
        ),
        (
            "CONNECT with a zero-length client identifier (5)",
            V5,
            connect(MQTT5, 0x02, &[0x00, 0x00, 0x00]),
            Packet::Connect(Box::new(connect_packet(ProtocolVersion::V5, ""))),
        ),
        (
            "CONNECT (5) decoded with a 3.1.1 decoder, which CONNECT overrides",
            V3,
            connect(MQTT5, 0x02, &[0x00, 0x00, 0x00]),
            Packet::Connect(Box::new(connect_packet(ProtocolVersion::V5, ""))),
        ),
        (
            "CONNECT (5) with a password and no user name",
            V5,
            connect(MQTT5, 0x42, &[0x00, 0x00, 0x01, b'c', 0x00, 0x02, b'p', b'w']),
            Packet::Connect(Box::new(Connect {
                password: Some(Bytes::from_static(b"pw")),
                ..connect_packet(ProtocolVersion::V5, "c")
            })),
        ),
        (
            "CONNECT from a bridge (level 0x84: Mosquitto's try_private)",
            V3,
            connect(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x84], 0x02, &[0x00, 0x01, b'c']),
            Packet::Connect(Box::new(Connect { bridge: true, ..connect_packet(ProtocolVersion::V311, "c") })),
        ),
        (
            "CONNECT with an empty will payload and empty password",
            V3,
            connect(MQTT4, 0xF6, &[0x00, 0x01, b'c', 0x00, 0x01, b't', 0x00, 0x00, 0x00, 0x01, b'u', 0x00, 0x00]),
            Packet::Connect(Box::new(Connect {
                will: Some(tollgate_protocol::LastWill {
                    topic: "t".to_owned(),
                    payload: Bytes::new(),
                    qos: QoS::ExactlyOnce,
                    retain: true,
                    properties: Properties::default(),
                }),
                username: Some("u".to_owned()),
                password: Some(Bytes::new()),
                ..connect_packet(ProtocolVersion::V311, "c")
            })),
        ),
        (
            "CONNACK (3.1.1) with return code 5",
            V3,
            vec![0x20, 0x02, 0x00, 0x05],
            Packet::ConnAck(ConnAck { reason_code: ReasonCode::NOT_AUTHORIZED, ..ConnAck::default() }),
        ),
        (
            "SUBSCRIBE (5) with every option bit that may be set",
            V5,
            frame(0x82, &[0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x2E]),
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions: vec![Subscription {
                    filter: "a".to_owned(),
                    options: SubscriptionOptions {
                        qos: QoS::ExactlyOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: 2,
                    },
                }],
                properties: Properties::default(),
            }),
        ),
        (
            "SUBACK (3.1.1) with every return code",
            V3,
            vec![0x90, 0x06, 0x00, 0x01, 0x00, 0x01, 0x02, 0x80],
            Packet::SubAck(SubAck {
                packet_id: 1,
                reason_codes: [0x00, 0x01, 0x02, 0x80].map(ReasonCode).to_vec(),
                properties: Properties::default(),
            }),
        ),
        (
            "PUBACK (5) with a reason code and no property length",
            V5,
            vec![0x40, 0x03, 0x00, 0x01, 0x10],
            Packet::PubAck(Ack::new(1, ReasonCode::NO_MATCHING_SUBSCRIBERS)),
        ),
        (
            "PUBACK (5) with success and an empty property block",
            V5,
            vec![0x40, 0x04, 0x00, 0x01, 0x00, 0x00],
            Packet::PubAck(Ack::new(1, ReasonCode::SUCCESS)),
        ),
        (
            "DISCONNECT (5) with a reason code only",
            V5,
            vec![0xE0, 0x01, 0x04],
            Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::DISCONNECT_WITH_WILL,
                properties: Properties::default(),
            }),
        ),
        (
            "DISCONNECT (5) with an empty property block",
            V5,
            vec![0xE0, 0x02, 0x00, 0x00],
            Packet::Disconnect(Disconnect::default()),
        ),
        ("AUTH with remaining length 0", V5, vec![0xF0, 0x00], Packet::Auth(Auth::default())),
    ]
}

#[test]
fn unusual_but_valid_packets_are_accepted() {
    let mut failures = Vec::new();
    for (name, version, bytes, want) in accepted_corpus() {
        let mut buffer = BytesMut::from(&bytes[..]);
        // The limit is inclusive: every case is decoded with a limit of exactly its own size.
        match decode_packet(&mut buffer, version, bytes.len()) {
            Ok(Some(packet)) if packet == want && buffer.is_empty() => {}
            other => {
                failures.push(format!("{name}: got {other:?} with {} bytes left, expected {want:?}", buffer.len()))
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn incomplete_packets_wait_without_consuming() {
    let whole = [0x32u8, 0x06, 0x00, 0x01, b'a', 0x00, 0x01, b'x'];
    for cut in 0..whole.len() {
        let mut buffer = BytesMut::from(&whole[..cut]);
        assert_eq!(decode_packet(&mut buffer, V3, BIG), Ok(None), "cut at {cut}");
        assert_eq!(buffer.len(), cut);
    }
}

#[test]
fn back_to_back_packets_are_split_correctly() {
    let mut buffer = BytesMut::from(&[0xC0u8, 0x00, 0x40, 0x02, 0x00, 0x05, 0xD0][..]);
    assert_eq!(decode_packet(&mut buffer, V3, BIG), Ok(Some(Packet::PingReq)));
    assert_eq!(decode_packet(&mut buffer, V3, BIG), Ok(Some(Packet::PubAck(Ack::new(5, ReasonCode::SUCCESS)))));
    assert_eq!(decode_packet(&mut buffer, V3, BIG), Ok(None));
    assert_eq!(&buffer[..], &[0xD0]);
}

// ---------------------------------------------------------------------------------------------------------------
// Arbitrary bytes.

fn any_version() -> impl Strategy<Value = ProtocolVersion> {
    prop_oneof![Just(ProtocolVersion::V31), Just(ProtocolVersion::V311), Just(ProtocolVersion::V5)]
}

fn max_size() -> impl Strategy<Value = usize> {
    prop_oneof![0..64usize, 64..4096usize, Just(BIG), any::<usize>()]
}

/// Bytes that look somewhat like packets: a plausible first byte and a remaining length that often matches.
fn packet_like() -> impl Strategy<Value = Vec<u8>> {
    (any::<u8>(), proptest::collection::vec(any::<u8>(), 0..200), any::<bool>()).prop_map(|(first, body, honest)| {
        if honest {
            frame(first, &body)
        } else {
            let mut bytes = vec![first];
            bytes.extend(body);
            bytes
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]

    #[test]
    fn decoding_arbitrary_bytes_never_panics(
        bytes in prop_oneof![proptest::collection::vec(any::<u8>(), 0..300), packet_like()],
        version in any_version(),
        max in max_size(),
    ) {
        let mut buffer = BytesMut::from(&bytes[..]);
        // Decode packets until the decoder wants more bytes or fails; every packet returned must consume bytes.
        for _ in 0..=bytes.len() {
            let before = buffer.len();
            match decode_packet(&mut buffer, version, max) {
                Ok(Some(_)) => prop_assert!(buffer.len() < before, "a packet was decoded from nothing"),
                Ok(None) => {
                    prop_assert_eq!(buffer.len(), before);
                    break;
                }
                Err(error) => {
                    prop_assert!(error.reason_code().is_error());
                    break;
                }
            }
        }
    }
}
