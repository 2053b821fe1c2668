//! Packets to bytes. Each packet's length is computed first and then written straight into the output buffer,
//! so encoding a PUBLISH copies its payload once and allocates nothing else.

use bytes::{BufMut, BytesMut};

use crate::MAX_REMAINING_LENGTH;
use crate::packet::*;
use crate::properties::Properties;
use crate::reason::ReasonCode;

#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("remaining length {0} exceeds the protocol maximum")]
    PacketTooLarge(usize),
    #[error("a string or binary field is longer than 65535 bytes")]
    FieldTooLong,
    #[error("{0} does not exist in this protocol version")]
    NotInVersion(&'static str),
}

pub(crate) fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Appends a variable byte integer (MQTT 1.5.5). Public for tools that frame packets by hand (the bench).
pub fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Callers have checked the length with [`field_len`]; the cast cannot truncate.
pub(crate) fn put_string(out: &mut BytesMut, value: &str) {
    put_binary(out, value.as_bytes());
}

pub(crate) fn put_binary(out: &mut BytesMut, value: &[u8]) {
    out.put_u16(value.len() as u16);
    out.put_slice(value);
}

fn field_len(value: &[u8]) -> Result<usize, EncodeError> {
    if value.len() > usize::from(u16::MAX) { Err(EncodeError::FieldTooLong) } else { Ok(2 + value.len()) }
}

fn properties_len(properties: &Properties, version: ProtocolVersion) -> Result<usize, EncodeError> {
    if !version.is_v5() {
        return Ok(0);
    }
    let strings = [
        &properties.content_type,
        &properties.response_topic,
        &properties.assigned_client_identifier,
        &properties.authentication_method,
        &properties.response_information,
        &properties.server_reference,
        &properties.reason_string,
    ];
    for text in strings.into_iter().flatten() {
        field_len(text.as_bytes())?;
    }
    for data in [&properties.correlation_data, &properties.authentication_data].into_iter().flatten() {
        field_len(data)?;
    }
    for pair in &properties.user_properties {
        field_len(pair.key.as_bytes())?;
        field_len(pair.value.as_bytes())?;
    }
    Ok(properties.encoded_len())
}

fn put_properties(out: &mut BytesMut, properties: &Properties, version: ProtocolVersion) {
    if version.is_v5() {
        properties.encode(out);
    }
}

/// The size in bytes of `packet` on the wire, fixed header included.
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    let remaining = remaining_len(packet, version)?;
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge(remaining));
    }
    Ok(1 + varint_len(remaining) + remaining)
}

fn ack_len(ack: &Ack, version: ProtocolVersion) -> Result<usize, EncodeError> {
    if !version.is_v5() || (ack.reason_code == ReasonCode::SUCCESS && ack.properties.is_empty()) {
        Ok(2)
    } else if ack.properties.is_empty() {
        Ok(3)
    } else {
        Ok(3 + properties_len(&ack.properties, version)?)
    }
}

fn remaining_len(packet: &Packet, version: ProtocolVersion) -> Result<usize, EncodeError> {
    Ok(match packet {
        Packet::Connect(connect) => {
            let version = connect.protocol;
            let name_len = if version == ProtocolVersion::V31 { 8 } else { 6 };
            let mut length = name_len + 1 + 1 + 2 + properties_len(&connect.properties, version)?;
            length += field_len(connect.client_id.as_bytes())?;
            if let Some(will) = &connect.will {
                length += properties_len(&will.properties, version)?;
                length += field_len(will.topic.as_bytes())? + field_len(&will.payload)?;
            }
            if let Some(username) = &connect.username {
                length += field_len(username.as_bytes())?;
            }
            if let Some(password) = &connect.password {
                length += field_len(password)?;
            }
            length
        }
        Packet::ConnAck(connack) => 2 + properties_len(&connack.properties, version)?,
        Packet::Publish(publish) => {
            field_len(publish.topic.as_bytes())?
                + if publish.qos == QoS::AtMostOnce { 0 } else { 2 }
                + properties_len(&publish.properties, version)?
                + publish.payload.len()
        }
        Packet::PubAck(ack) | Packet::PubRec(ack) | Packet::PubRel(ack) | Packet::PubComp(ack) => {
            ack_len(ack, version)?
        }
        Packet::Subscribe(subscribe) => {
            let mut length = 2 + properties_len(&subscribe.properties, version)?;
            for subscription in &subscribe.subscriptions {
                length += field_len(subscription.filter.as_bytes())? + 1;
            }
            length
        }
        Packet::SubAck(suback) => 2 + properties_len(&suback.properties, version)? + suback.reason_codes.len(),
        Packet::Unsubscribe(unsubscribe) => {
            let mut length = 2 + properties_len(&unsubscribe.properties, version)?;
            for filter in &unsubscribe.filters {
                length += field_len(filter.as_bytes())?;
            }
            length
        }
        Packet::UnsubAck(unsuback) => {
            if version.is_v5() {
                2 + properties_len(&unsuback.properties, version)? + unsuback.reason_codes.len()
            } else {
                2
            }
        }
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(disconnect) => {
            if !version.is_v5() {
                0
            } else if disconnect.properties.is_empty() {
                // A reason code goes out with an explicit empty property length: legal either way, and some
                // clients (rumqttc 0.25) reject the shorter form.
                if disconnect.reason_code == ReasonCode::SUCCESS { 0 } else { 2 }
            } else {
                1 + properties_len(&disconnect.properties, version)?
            }
        }
        Packet::Auth(auth) => {
            if !version.is_v5() {
                return Err(EncodeError::NotInVersion("AUTH"));
            }
            if auth.reason_code == ReasonCode::SUCCESS && auth.properties.is_empty() {
                0
            } else {
                1 + properties_len(&auth.properties, version)?
            }
        }
    })
}

fn first_byte(packet: &Packet) -> u8 {
    match packet {
        Packet::Connect(_) => 0x10,
        Packet::ConnAck(_) => 0x20,
        Packet::Publish(publish) => {
            0x30 | (u8::from(publish.dup) << 3) | ((publish.qos as u8) << 1) | u8::from(publish.retain)
        }
        Packet::PubAck(_) => 0x40,
        Packet::PubRec(_) => 0x50,
        Packet::PubRel(_) => 0x62,
        Packet::PubComp(_) => 0x70,
        Packet::Subscribe(_) => 0x82,
        Packet::SubAck(_) => 0x90,
        Packet::Unsubscribe(_) => 0xA2,
        Packet::UnsubAck(_) => 0xB0,
        Packet::PingReq => 0xC0,
        Packet::PingResp => 0xD0,
        Packet::Disconnect(_) => 0xE0,
        Packet::Auth(_) => 0xF0,
    }
}

/// Appends `packet` to `out` and returns the number of bytes written.
/// A PUBLISH without properties (every MQTT 3.1.1 PUBLISH) from borrowed parts: the same bytes as
/// [`encode_packet`] gives for the equivalent [`Publish`], without building one. The broker's delivery path uses it
/// for each copy it sends, where cloning the shared topic and payload into a packet only to encode it cost more
/// than the encoding. Returns the bytes written.
pub fn encode_publish_v311(
    out: &mut BytesMut,
    flags: PublishFlags,
    topic: &str,
    packet_id: Option<PacketId>,
    payload: &[u8],
) -> Result<usize, EncodeError> {
    let remaining = field_len(topic.as_bytes())? + if flags.qos == QoS::AtMostOnce { 0 } else { 2 } + payload.len();
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge(remaining));
    }
    let total = 1 + varint_len(remaining) + remaining;
    out.reserve(total);
    out.put_u8(0x30 | (u8::from(flags.dup) << 3) | ((flags.qos as u8) << 1) | u8::from(flags.retain));
    put_varint(out, remaining);
    put_string(out, topic);
    if flags.qos != QoS::AtMostOnce {
        out.put_u16(packet_id.unwrap_or(0));
    }
    out.put_slice(payload);
    Ok(total)
}

/// The fixed-header flags of a PUBLISH.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PublishFlags {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
}

pub fn encode_packet(packet: &Packet, version: ProtocolVersion, out: &mut BytesMut) -> Result<usize, EncodeError> {
    let version = match packet {
        Packet::Connect(connect) => connect.protocol,
        _ => version,
    };
    let remaining = remaining_len(packet, version)?;
    if remaining > MAX_REMAINING_LENGTH {
        return Err(EncodeError::PacketTooLarge(remaining));
    }
    let total = 1 + varint_len(remaining) + remaining;
    out.reserve(total);
    out.put_u8(first_byte(packet));
    put_varint(out, remaining);
    match packet {
        Packet::Connect(connect) => encode_connect(connect, out),
        Packet::ConnAck(connack) => {
            out.put_u8(u8::from(connack.session_present));
            let code = if version.is_v5() { connack.reason_code.0 } else { connack.reason_code.to_v3_connack() };
            out.put_u8(code);
            put_properties(out, &connack.properties, version);
        }
        Packet::Publish(publish) => {
            put_string(out, &publish.topic);
            if publish.qos != QoS::AtMostOnce {
                out.put_u16(publish.packet_id.unwrap_or(0));
            }
            put_properties(out, &publish.properties, version);
            out.put_slice(&publish.payload);
        }
        Packet::PubAck(ack) | Packet::PubRec(ack) | Packet::PubRel(ack) | Packet::PubComp(ack) => {
            out.put_u16(ack.packet_id);
            let length = ack_len(ack, version).unwrap_or(2);
            if length >= 3 {
                out.put_u8(ack.reason_code.0);
            }
            if length > 3 {
                put_properties(out, &ack.properties, version);
            }
        }
        Packet::Subscribe(subscribe) => {
            out.put_u16(subscribe.packet_id);
            put_properties(out, &subscribe.properties, version);
            for subscription in &subscribe.subscriptions {
                put_string(out, &subscription.filter);
                let options = &subscription.options;
                let mut byte = options.qos as u8;
                if version.is_v5() {
                    byte |= u8::from(options.no_local) << 2
                        | u8::from(options.retain_as_published) << 3
                        | (options.retain_handling & 0x03) << 4;
                }
                out.put_u8(byte);
            }
        }
        Packet::SubAck(suback) => {
            out.put_u16(suback.packet_id);
            put_properties(out, &suback.properties, version);
            for code in &suback.reason_codes {
                let byte = if !version.is_v5() && code.is_error() { 0x80 } else { code.0 };
                out.put_u8(byte);
            }
        }
        Packet::Unsubscribe(unsubscribe) => {
            out.put_u16(unsubscribe.packet_id);
            put_properties(out, &unsubscribe.properties, version);
            for filter in &unsubscribe.filters {
                put_string(out, filter);
            }
        }
        Packet::UnsubAck(unsuback) => {
            out.put_u16(unsuback.packet_id);
            if version.is_v5() {
                put_properties(out, &unsuback.properties, version);
                for code in &unsuback.reason_codes {
                    out.put_u8(code.0);
                }
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(disconnect) => {
            if remaining > 0 {
                out.put_u8(disconnect.reason_code.0);
            }
            if remaining > 1 {
                put_properties(out, &disconnect.properties, version);
            }
        }
        Packet::Auth(auth) => {
            if remaining > 0 {
                out.put_u8(auth.reason_code.0);
                put_properties(out, &auth.properties, version);
            }
        }
    }
    Ok(total)
}

fn encode_connect(connect: &Connect, out: &mut BytesMut) {
    let version = connect.protocol;
    if version == ProtocolVersion::V31 {
        put_string(out, "MQIsdp");
    } else {
        put_string(out, "MQTT");
    }
    out.put_u8(version.level() | if connect.bridge { 0x80 } else { 0 });
    let mut flags = 0u8;
    if connect.clean_start {
        flags |= 0x02;
    }
    if let Some(will) = &connect.will {
        flags |= 0x04 | ((will.qos as u8) << 3) | (u8::from(will.retain) << 5);
    }
    if connect.password.is_some() {
        flags |= 0x40;
    }
    if connect.username.is_some() {
        flags |= 0x80;
    }
    out.put_u8(flags);
    out.put_u16(connect.keep_alive);
    put_properties(out, &connect.properties, version);
    put_string(out, &connect.client_id);
    if let Some(will) = &connect.will {
        put_properties(out, &will.properties, version);
        put_string(out, &will.topic);
        put_binary(out, &will.payload);
    }
    if let Some(username) = &connect.username {
        put_string(out, username);
    }
    if let Some(password) = &connect.password {
        put_binary(out, password);
    }
}
