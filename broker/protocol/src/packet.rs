//! The fifteen MQTT control packets as plain data.

use std::sync::Arc;

use bytes::Bytes;

use crate::properties::Properties;
use crate::reason::ReasonCode;

/// Protocol level from CONNECT. MQTT 3.1 ("MQIsdp", level 3) is accepted and spoken as 3.1.1, as Mosquitto does.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Hash)]
pub enum ProtocolVersion {
    V31,
    V311,
    V5,
}

impl ProtocolVersion {
    pub fn is_v5(self) -> bool {
        self == Self::V5
    }

    pub fn level(self) -> u8 {
        match self {
            Self::V31 => 3,
            Self::V311 => 4,
            Self::V5 => 5,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug, Hash, Default)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    pub fn from_u8(value: u8) -> Option<Self> {
        match value {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }
}

/// Packet identifier. Zero is never valid on the wire (MQTT-2.2.1-3), which the decoder enforces.
pub type PacketId = u16;

#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(Ack),
    PubRec(Ack),
    PubRel(Ack),
    PubComp(Ack),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    /// The packet type's name, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Packet::Connect(_) => "CONNECT",
            Packet::ConnAck(_) => "CONNACK",
            Packet::Publish(_) => "PUBLISH",
            Packet::PubAck(_) => "PUBACK",
            Packet::PubRec(_) => "PUBREC",
            Packet::PubRel(_) => "PUBREL",
            Packet::PubComp(_) => "PUBCOMP",
            Packet::Subscribe(_) => "SUBSCRIBE",
            Packet::SubAck(_) => "SUBACK",
            Packet::Unsubscribe(_) => "UNSUBSCRIBE",
            Packet::UnsubAck(_) => "UNSUBACK",
            Packet::PingReq => "PINGREQ",
            Packet::PingResp => "PINGRESP",
            Packet::Disconnect(_) => "DISCONNECT",
            Packet::Auth(_) => "AUTH",
        }
    }
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub will: Option<LastWill>,
    pub properties: Properties,
    /// The client says it is another broker's bridge: the protocol level's top bit (0x80) set, as Mosquitto's
    /// bridges do with `try_private` (the default). Such a client is not sent back what it published.
    pub bridge: bool,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct LastWill {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: Properties,
}

#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct ConnAck {
    pub session_present: bool,
    /// A v5 reason code; for 3.1.1 peers the encoder maps it with [`ReasonCode::to_v3_connack`].
    pub reason_code: ReasonCode,
    pub properties: Properties,
}

#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// Shared so that fan-out to many subscribers does not copy the topic. Empty only when a v5 topic alias
    /// stands in for it.
    pub topic: Arc<str>,
    /// Present exactly when `qos` is 1 or 2.
    pub packet_id: Option<PacketId>,
    pub properties: Properties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP share one shape.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Ack {
    pub packet_id: PacketId,
    pub reason_code: ReasonCode,
    pub properties: Properties,
}

impl Ack {
    pub fn new(packet_id: PacketId, reason_code: ReasonCode) -> Self {
        Self { packet_id, reason_code, properties: Properties::default() }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Default, Hash)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    /// 0: send retained on subscribe, 1: only if the subscription is new, 2: never.
    pub retain_handling: u8,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Subscription {
    pub filter: String,
    pub options: SubscriptionOptions,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Subscribe {
    pub packet_id: PacketId,
    pub subscriptions: Vec<Subscription>,
    pub properties: Properties,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct SubAck {
    pub packet_id: PacketId,
    /// v5 reason codes; for 3.1.1 any error code is sent as 0x80.
    pub reason_codes: Vec<ReasonCode>,
    pub properties: Properties,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    pub filters: Vec<String>,
    pub properties: Properties,
}

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct UnsubAck {
    pub packet_id: PacketId,
    /// Not sent to 3.1.1 peers, whose UNSUBACK has no payload.
    pub reason_codes: Vec<ReasonCode>,
    pub properties: Properties,
}

#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Disconnect {
    pub reason_code: ReasonCode,
    pub properties: Properties,
}

#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Auth {
    pub reason_code: ReasonCode,
    pub properties: Properties,
}
