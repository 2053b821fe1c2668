//! Decoding errors. Each names the rule broken (with the conformance statement where there is one) and maps to
//! the MQTT 5 reason code a server sends in its DISCONNECT (or CONNACK, for a bad CONNECT).

use crate::reason::ReasonCode;

#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed remaining length [MQTT-1.5.5-1]")]
    MalformedRemainingLength,
    #[error("packet of {size} bytes exceeds the maximum packet size {limit}")]
    PacketTooLarge { size: usize, limit: usize },
    #[error("reserved packet type {0}")]
    ReservedPacketType(u8),
    #[error("invalid fixed-header flags 0x{flags:X} for {kind} [MQTT-2.1.3-1]")]
    InvalidHeaderFlags { kind: &'static str, flags: u8 },
    #[error("packet body ends before its fields do")]
    Truncated,
    #[error("{0} unexpected bytes after the last field")]
    TrailingBytes(usize),
    #[error("string is not well-formed UTF-8 or contains U+0000 [MQTT-1.5.4-1, MQTT-1.5.4-2]")]
    InvalidUtf8,
    #[error("invalid QoS 3 [MQTT-3.3.1-4]")]
    InvalidQoS,
    #[error("topic name contains a wildcard character [MQTT-3.3.2-2]")]
    WildcardInTopicName,
    #[error("topic name is empty and no topic alias is given")]
    EmptyTopicName,
    #[error("invalid topic filter [MQTT-4.7.1]")]
    InvalidTopicFilter,
    #[error("packet identifier 0 [MQTT-2.2.1-3]")]
    ZeroPacketId,
    #[error("protocol name {0:?} is neither MQTT nor MQIsdp [MQTT-3.1.2-1]")]
    InvalidProtocolName(&'static str),
    #[error("unsupported protocol level {0} [MQTT-3.1.2-2]")]
    UnsupportedProtocolLevel(u8),
    #[error("reserved CONNECT flag set [MQTT-3.1.2-3]")]
    ReservedConnectFlag,
    #[error("will QoS or will retain set without the will flag [MQTT-3.1.2-11, MQTT-3.1.2-13]")]
    WillFlagsWithoutWill,
    #[error("password flag set without the user name flag [MQTT-3.1.2-22]")]
    PasswordWithoutUsername,
    #[error("property 0x{0:02X} is unknown or not allowed in this packet")]
    InvalidProperty(u8),
    #[error("property 0x{0:02X} appears more than once")]
    DuplicateProperty(u8),
    #[error("property 0x{0:02X} has an invalid value")]
    InvalidPropertyValue(u8),
    #[error("SUBSCRIBE or UNSUBSCRIBE without any topic filter [MQTT-3.8.3-3, MQTT-3.10.3-2]")]
    NoTopicFilters,
    #[error("reserved bits set in subscription options [MQTT-3.8.3-5]")]
    InvalidSubscriptionOptions,
    #[error("reason code 0x{0:02X} is not valid in this packet")]
    InvalidReasonCode(u8),
    #[error("the server does not accept {0} packets from clients")]
    UnexpectedPacket(&'static str),
}

impl DecodeError {
    /// The reason code for the DISCONNECT (or CONNACK) that answers this error on an MQTT 5 connection.
    pub fn reason_code(self) -> ReasonCode {
        match self {
            DecodeError::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolLevel(_) | DecodeError::InvalidProtocolName(_) => {
                ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
            }
            DecodeError::WildcardInTopicName => ReasonCode::TOPIC_NAME_INVALID,
            DecodeError::DuplicateProperty(_)
            | DecodeError::InvalidPropertyValue(_)
            | DecodeError::NoTopicFilters
            | DecodeError::EmptyTopicName
            | DecodeError::UnexpectedPacket(_) => ReasonCode::PROTOCOL_ERROR,
            _ => ReasonCode::MALFORMED_PACKET,
        }
    }
}
