//! Bytes to packets. [`decode_packet`] takes what the socket has delivered so far and returns `Ok(None)` until
//! a whole packet is there; it checks the declared size against the limit before the body has arrived, so an
//! oversized packet is refused without being buffered.

use bytes::{Buf, Bytes, BytesMut};

use crate::error::DecodeError;
use crate::packet::*;
use crate::properties::{Properties, PropertyContext};
use crate::reason::ReasonCode;
use crate::topic;

/// Largest single allocation made on behalf of a packet that has not arrived yet.
const RESERVE_STEP: usize = 64 * 1024;

/// Per-connection decoding settings.
#[derive(Clone, Copy, Debug)]
pub struct Decoder {
    /// Until CONNECT has been read this is a guess; CONNECT carries its own level and ignores it.
    pub version: ProtocolVersion,
    /// Largest whole packet (fixed header included) accepted.
    pub max_packet_size: usize,
}

impl Decoder {
    pub fn new(version: ProtocolVersion, max_packet_size: usize) -> Self {
        Self { version, max_packet_size }
    }

    pub fn decode(&self, buffer: &mut BytesMut) -> Result<Option<Packet>, DecodeError> {
        decode_packet(buffer, self.version, self.max_packet_size)
    }
}

/// The fixed header of the packet at the start of `buffer`: (first byte, header length, remaining length), or
/// `None` if the header itself is still incomplete.
pub fn parse_fixed_header(buffer: &[u8]) -> Result<Option<(u8, usize, usize)>, DecodeError> {
    let Some(&first) = buffer.first() else {
        return Ok(None);
    };
    let mut remaining: usize = 0;
    for index in 0..4 {
        let Some(&byte) = buffer.get(1 + index) else {
            return Ok(None);
        };
        remaining |= ((byte & 0x7F) as usize) << (7 * index);
        if byte & 0x80 == 0 {
            // A non-minimal encoding such as 0x80 0x00 is still a valid length; the spec only bounds it at four
            // bytes, so it is accepted as Mosquitto does.
            return Ok(Some((first, 2 + index, remaining)));
        }
    }
    Err(DecodeError::MalformedRemainingLength)
}

/// Decodes one packet from the front of `buffer`, removing its bytes; `Ok(None)` means more bytes are needed.
pub fn decode_packet(
    buffer: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: usize,
) -> Result<Option<Packet>, DecodeError> {
    let Some((first, header_len, remaining)) = parse_fixed_header(buffer)? else {
        return Ok(None);
    };
    let total = header_len + remaining;
    if total > max_packet_size {
        return Err(DecodeError::PacketTooLarge { size: total, limit: max_packet_size });
    }
    if buffer.len() < total {
        // Grow towards the declared size in bounded steps: a peer that announces a large packet and then trickles
        // (or never sends) it must not make us allocate the whole maximum up front.
        buffer.reserve((total - buffer.len()).min(RESERVE_STEP));
        return Ok(None);
    }
    let mut frame = buffer.split_to(total).freeze();
    frame.advance(header_len);
    decode_body(first, frame, version).map(Some)
}

fn decode_body(first: u8, body: Bytes, version: ProtocolVersion) -> Result<Packet, DecodeError> {
    let packet_type = first >> 4;
    let flags = first & 0x0F;
    let mut reader = Reader::new(body);
    let expect_flags = |kind: &'static str, wanted: u8| {
        if flags == wanted { Ok(()) } else { Err(DecodeError::InvalidHeaderFlags { kind, flags }) }
    };
    let packet = match packet_type {
        1 => {
            expect_flags("CONNECT", 0)?;
            Packet::Connect(Box::new(decode_connect(&mut reader)?))
        }
        2 => {
            expect_flags("CONNACK", 0)?;
            Packet::ConnAck(decode_connack(&mut reader, version)?)
        }
        3 => Packet::Publish(decode_publish(&mut reader, flags, version)?),
        4 => {
            expect_flags("PUBACK", 0)?;
            Packet::PubAck(decode_ack(&mut reader, version, PUBACK_CODES)?)
        }
        5 => {
            expect_flags("PUBREC", 0)?;
            Packet::PubRec(decode_ack(&mut reader, version, PUBACK_CODES)?)
        }
        6 => {
            expect_flags("PUBREL", 0b0010)?;
            Packet::PubRel(decode_ack(&mut reader, version, PUBREL_CODES)?)
        }
        7 => {
            expect_flags("PUBCOMP", 0)?;
            Packet::PubComp(decode_ack(&mut reader, version, PUBREL_CODES)?)
        }
        8 => {
            expect_flags("SUBSCRIBE", 0b0010)?;
            Packet::Subscribe(decode_subscribe(&mut reader, version)?)
        }
        9 => {
            expect_flags("SUBACK", 0)?;
            let packet_id = reader.packet_id()?;
            let properties = v5_properties(&mut reader, version, PropertyContext::SubAck)?;
            let codes = reader.rest();
            // MQTT 3.1.1 allows only these four return codes [MQTT-3.9.3-2]; the encoder sends every v5 error
            // code as 0x80, so anything else could not survive a round trip either.
            if let Some(&bad) =
                codes.iter().find(|&&code| !version.is_v5() && !matches!(code, 0x00 | 0x01 | 0x02 | 0x80))
            {
                return Err(DecodeError::InvalidReasonCode(bad));
            }
            let reason_codes = codes.iter().map(|code| ReasonCode(*code)).collect();
            Packet::SubAck(SubAck { packet_id, reason_codes, properties })
        }
        10 => {
            expect_flags("UNSUBSCRIBE", 0b0010)?;
            Packet::Unsubscribe(decode_unsubscribe(&mut reader, version)?)
        }
        11 => {
            expect_flags("UNSUBACK", 0)?;
            let packet_id = reader.packet_id()?;
            let properties = v5_properties(&mut reader, version, PropertyContext::UnsubAck)?;
            let reason_codes =
                if version.is_v5() { reader.rest().iter().map(|code| ReasonCode(*code)).collect() } else { Vec::new() };
            Packet::UnsubAck(UnsubAck { packet_id, reason_codes, properties })
        }
        12 => {
            expect_flags("PINGREQ", 0)?;
            Packet::PingReq
        }
        13 => {
            expect_flags("PINGRESP", 0)?;
            Packet::PingResp
        }
        14 => {
            expect_flags("DISCONNECT", 0)?;
            let mut disconnect = Disconnect::default();
            if version.is_v5() && reader.remaining() > 0 {
                disconnect.reason_code = ReasonCode(reader.u8()?);
                if reader.remaining() > 0 {
                    disconnect.properties = Properties::decode(&mut reader, PropertyContext::Disconnect)?;
                }
            }
            Packet::Disconnect(disconnect)
        }
        15 if version.is_v5() => {
            expect_flags("AUTH", 0)?;
            let mut auth = Auth::default();
            if reader.remaining() > 0 {
                let code = reader.u8()?;
                if !matches!(code, 0x00 | 0x18 | 0x19) {
                    return Err(DecodeError::InvalidReasonCode(code));
                }
                auth.reason_code = ReasonCode(code);
                auth.properties = Properties::decode(&mut reader, PropertyContext::Auth)?;
            }
            Packet::Auth(auth)
        }
        other => return Err(DecodeError::ReservedPacketType(other)),
    };
    reader.finish()?;
    Ok(packet)
}

const PUBACK_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const PUBREL_CODES: &[u8] = &[0x00, 0x92];

fn v5_properties(
    reader: &mut Reader,
    version: ProtocolVersion,
    context: PropertyContext,
) -> Result<Properties, DecodeError> {
    if version.is_v5() { Properties::decode(reader, context) } else { Ok(Properties::default()) }
}

fn decode_connect(reader: &mut Reader) -> Result<Connect, DecodeError> {
    let name = reader.string()?;
    let level_byte = reader.u8()?;
    let (level, bridge) = (level_byte & 0x7F, level_byte & 0x80 != 0);
    let protocol = match (name.as_str(), level) {
        ("MQTT", 4) => ProtocolVersion::V311,
        ("MQTT", 5) => ProtocolVersion::V5,
        ("MQIsdp", 3) => ProtocolVersion::V31,
        ("MQTT", other) | ("MQIsdp", other) => {
            return Err(DecodeError::UnsupportedProtocolLevel(other));
        }
        _ => return Err(DecodeError::InvalidProtocolName("other")),
    };
    let flags = reader.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::ReservedConnectFlag);
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = QoS::from_u8((flags >> 3) & 0x03).ok_or(DecodeError::InvalidQoS)?;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(DecodeError::WillFlagsWithoutWill);
    }
    if password_flag && !username_flag && !protocol.is_v5() {
        return Err(DecodeError::PasswordWithoutUsername);
    }
    let keep_alive = reader.u16()?;
    let properties = v5_properties(reader, protocol, PropertyContext::Connect)?;
    let client_id = reader.string()?;
    let will = if will_flag {
        let will_properties = v5_properties(reader, protocol, PropertyContext::Will)?;
        let topic = reader.string()?;
        topic::validate_topic_name(&topic).map_err(|_| DecodeError::WildcardInTopicName)?;
        let payload = reader.binary()?;
        Some(LastWill { topic, payload, qos: will_qos, retain: will_retain, properties: will_properties })
    } else {
        None
    };
    let username = if username_flag { Some(reader.string()?) } else { None };
    let password = if password_flag { Some(reader.binary()?) } else { None };
    Ok(Connect { protocol, clean_start, keep_alive, client_id, username, password, will, properties, bridge })
}

fn decode_connack(reader: &mut Reader, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let flags = reader.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::InvalidHeaderFlags { kind: "CONNACK", flags });
    }
    let code = reader.u8()?;
    // `ConnAck::reason_code` always holds a v5 reason code: a 3.1.1 return code is mapped to its v5
    // counterpart, the inverse of what the encoder does with `to_v3_connack`.
    let reason_code = if version.is_v5() {
        ReasonCode(code)
    } else {
        ReasonCode::from_v3_connack(code).ok_or(DecodeError::InvalidReasonCode(code))?
    };
    let properties = v5_properties(reader, version, PropertyContext::ConnAck)?;
    Ok(ConnAck { session_present: flags & 0x01 != 0, reason_code, properties })
}

fn decode_publish(reader: &mut Reader, flags: u8, version: ProtocolVersion) -> Result<Publish, DecodeError> {
    let qos = QoS::from_u8((flags >> 1) & 0x03).ok_or(DecodeError::InvalidQoS)?;
    let dup = flags & 0x08 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::InvalidHeaderFlags { kind: "PUBLISH", flags });
    }
    let topic: std::sync::Arc<str> = reader.utf8(|text| std::sync::Arc::<str>::from(text))?;
    if topic.contains(['+', '#']) {
        return Err(DecodeError::WildcardInTopicName);
    }
    let packet_id = if qos == QoS::AtMostOnce { None } else { Some(reader.packet_id()?) };
    let properties = v5_properties(reader, version, PropertyContext::Publish)?;
    if topic.is_empty() && properties.topic_alias.is_none() {
        return Err(DecodeError::EmptyTopicName);
    }
    let payload = reader.take_rest();
    Ok(Publish { dup, qos, retain: flags & 0x01 != 0, topic, packet_id, properties, payload })
}

fn decode_ack(reader: &mut Reader, version: ProtocolVersion, valid_codes: &[u8]) -> Result<Ack, DecodeError> {
    let packet_id = reader.packet_id()?;
    let mut ack = Ack::new(packet_id, ReasonCode::SUCCESS);
    if version.is_v5() && reader.remaining() > 0 {
        let code = reader.u8()?;
        if !valid_codes.contains(&code) {
            return Err(DecodeError::InvalidReasonCode(code));
        }
        ack.reason_code = ReasonCode(code);
        if reader.remaining() > 0 {
            ack.properties = Properties::decode(reader, PropertyContext::Ack)?;
        }
    }
    Ok(ack)
}

fn decode_subscribe(reader: &mut Reader, version: ProtocolVersion) -> Result<Subscribe, DecodeError> {
    let packet_id = reader.packet_id()?;
    let properties = v5_properties(reader, version, PropertyContext::Subscribe)?;
    let mut subscriptions = Vec::new();
    while reader.remaining() > 0 {
        let filter = reader.string()?;
        let byte = reader.u8()?;
        let reserved_mask = if version.is_v5() { 0xC0 } else { 0xFC };
        if byte & reserved_mask != 0 {
            return Err(DecodeError::InvalidSubscriptionOptions);
        }
        let qos = QoS::from_u8(byte & 0x03).ok_or(DecodeError::InvalidQoS)?;
        let retain_handling = (byte >> 4) & 0x03;
        if retain_handling == 3 {
            return Err(DecodeError::InvalidSubscriptionOptions);
        }
        let options = SubscriptionOptions {
            qos,
            no_local: byte & 0x04 != 0,
            retain_as_published: byte & 0x08 != 0,
            retain_handling,
        };
        subscriptions.push(Subscription { filter, options });
    }
    if subscriptions.is_empty() {
        return Err(DecodeError::NoTopicFilters);
    }
    Ok(Subscribe { packet_id, subscriptions, properties })
}

fn decode_unsubscribe(reader: &mut Reader, version: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
    let packet_id = reader.packet_id()?;
    let properties = v5_properties(reader, version, PropertyContext::Unsubscribe)?;
    let mut filters = Vec::new();
    while reader.remaining() > 0 {
        filters.push(reader.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters);
    }
    Ok(Unsubscribe { packet_id, filters, properties })
}

/// A cursor over one packet body. Every read is bounds-checked and reports [`DecodeError::Truncated`] rather
/// than panicking.
pub(crate) struct Reader {
    data: Bytes,
}

impl Reader {
    pub(crate) fn new(data: Bytes) -> Self {
        Self { data }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.data.len()
    }

    fn need(&self, count: usize) -> Result<(), DecodeError> {
        if self.data.len() < count { Err(DecodeError::Truncated) } else { Ok(()) }
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.data.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.need(2)?;
        Ok(self.data.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.data.get_u32())
    }

    pub(crate) fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        match self.u16()? {
            0 => Err(DecodeError::ZeroPacketId),
            id => Ok(id),
        }
    }

    /// A variable byte integer (section 1.5.5), at most four bytes.
    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        let mut value: u32 = 0;
        for index in 0..4 {
            let byte = self.u8()?;
            value |= u32::from(byte & 0x7F) << (7 * index);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::MalformedRemainingLength)
    }

    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let length = self.u16()? as usize;
        self.need(length)?;
        Ok(self.data.split_to(length))
    }

    /// Reads a UTF-8 string and hands it to `convert` while it is still borrowed from the packet, so the caller
    /// chooses the owned form (`String`, `Arc<str>`) with a single copy.
    pub(crate) fn utf8<T>(&mut self, convert: impl FnOnce(&str) -> T) -> Result<T, DecodeError> {
        let length = self.u16()? as usize;
        self.need(length)?;
        let raw = self.data.split_to(length);
        let text = std::str::from_utf8(&raw).map_err(|_| DecodeError::InvalidUtf8)?;
        if text.contains('\0') {
            return Err(DecodeError::InvalidUtf8);
        }
        Ok(convert(text))
    }

    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        self.utf8(str::to_owned)
    }

    pub(crate) fn sub_reader(&mut self, length: usize) -> Result<Reader, DecodeError> {
        self.need(length)?;
        Ok(Reader { data: self.data.split_to(length) })
    }

    pub(crate) fn rest(&mut self) -> Bytes {
        self.take_rest()
    }

    pub(crate) fn take_rest(&mut self) -> Bytes {
        std::mem::take(&mut self.data)
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.data.is_empty() { Ok(()) } else { Err(DecodeError::TrailingBytes(self.data.len())) }
    }
}
