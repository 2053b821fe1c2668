//! MQTT 5 properties (section 2.2.2). One struct serves every packet type; the decoder rejects a property
//! that the packet type does not allow, so a decoded packet only ever has its own kinds set.

use bytes::{BufMut, Bytes, BytesMut};

use crate::decode::Reader;
use crate::encode::{put_binary, put_string, put_varint, varint_len};
use crate::error::DecodeError;

#[derive(Clone, PartialEq, Eq, Debug)]
pub struct UserProperty {
    pub key: String,
    pub value: String,
}

#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// A SUBSCRIBE carries at most one; a PUBLISH to a client carries one per matching subscription.
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    pub user_properties: Vec<UserProperty>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

/// Which packet a property block belongs to; decides which identifiers are legal (table 2-4 of the spec).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum PropertyContext {
    Connect,
    Will,
    ConnAck,
    Publish,
    Ack,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

pub(crate) mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

fn allowed(context: PropertyContext, identifier: u8) -> bool {
    use PropertyContext as C;
    use id::*;
    match identifier {
        USER_PROPERTY => true,
        PAYLOAD_FORMAT_INDICATOR | MESSAGE_EXPIRY_INTERVAL | CONTENT_TYPE | RESPONSE_TOPIC | CORRELATION_DATA => {
            matches!(context, C::Publish | C::Will)
        }
        SUBSCRIPTION_IDENTIFIER => matches!(context, C::Publish | C::Subscribe),
        SESSION_EXPIRY_INTERVAL => matches!(context, C::Connect | C::ConnAck | C::Disconnect),
        ASSIGNED_CLIENT_IDENTIFIER
        | SERVER_KEEP_ALIVE
        | RESPONSE_INFORMATION
        | MAXIMUM_QOS
        | RETAIN_AVAILABLE
        | WILDCARD_SUBSCRIPTION_AVAILABLE
        | SUBSCRIPTION_IDENTIFIER_AVAILABLE
        | SHARED_SUBSCRIPTION_AVAILABLE => context == C::ConnAck,
        AUTHENTICATION_METHOD | AUTHENTICATION_DATA => {
            matches!(context, C::Connect | C::ConnAck | C::Auth)
        }
        REQUEST_PROBLEM_INFORMATION | REQUEST_RESPONSE_INFORMATION => context == C::Connect,
        WILL_DELAY_INTERVAL => context == C::Will,
        SERVER_REFERENCE => matches!(context, C::ConnAck | C::Disconnect),
        REASON_STRING => matches!(context, C::ConnAck | C::Ack | C::SubAck | C::UnsubAck | C::Disconnect | C::Auth),
        RECEIVE_MAXIMUM | TOPIC_ALIAS_MAXIMUM | MAXIMUM_PACKET_SIZE => {
            matches!(context, C::Connect | C::ConnAck)
        }
        TOPIC_ALIAS => context == C::Publish,
        _ => false,
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, identifier: u8) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::DuplicateProperty(identifier));
    }
    *slot = Some(value);
    Ok(())
}

fn zero_one(value: u8, identifier: u8) -> Result<u8, DecodeError> {
    if value > 1 {
        return Err(DecodeError::InvalidPropertyValue(identifier));
    }
    Ok(value)
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }

    /// Reads a property length and block from `reader`.
    pub(crate) fn decode(reader: &mut Reader, context: PropertyContext) -> Result<Self, DecodeError> {
        let length = reader.varint()? as usize;
        let mut block = reader.sub_reader(length)?;
        let mut properties = Properties::default();
        while block.remaining() > 0 {
            let identifier = block.varint()?;
            let identifier = u8::try_from(identifier).map_err(|_| DecodeError::InvalidProperty(0xFF))?;
            if !allowed(context, identifier) {
                return Err(DecodeError::InvalidProperty(identifier));
            }
            properties.read_one(&mut block, identifier, context)?;
        }
        Ok(properties)
    }

    fn read_one(&mut self, block: &mut Reader, identifier: u8, context: PropertyContext) -> Result<(), DecodeError> {
        use id::*;
        match identifier {
            PAYLOAD_FORMAT_INDICATOR => {
                let value = zero_one(block.u8()?, identifier)?;
                set_once(&mut self.payload_format_indicator, value, identifier)
            }
            MESSAGE_EXPIRY_INTERVAL => set_once(&mut self.message_expiry_interval, block.u32()?, identifier),
            CONTENT_TYPE => set_once(&mut self.content_type, block.string()?, identifier),
            RESPONSE_TOPIC => {
                let topic = block.string()?;
                if crate::topic::validate_topic_name(&topic).is_err() {
                    return Err(DecodeError::InvalidPropertyValue(identifier));
                }
                set_once(&mut self.response_topic, topic, identifier)
            }
            CORRELATION_DATA => set_once(&mut self.correlation_data, block.binary()?, identifier),
            SUBSCRIPTION_IDENTIFIER => {
                let value = block.varint()?;
                if value == 0 {
                    return Err(DecodeError::InvalidPropertyValue(identifier));
                }
                if context == PropertyContext::Subscribe && !self.subscription_identifiers.is_empty() {
                    return Err(DecodeError::DuplicateProperty(identifier));
                }
                self.subscription_identifiers.push(value);
                Ok(())
            }
            SESSION_EXPIRY_INTERVAL => set_once(&mut self.session_expiry_interval, block.u32()?, identifier),
            ASSIGNED_CLIENT_IDENTIFIER => set_once(&mut self.assigned_client_identifier, block.string()?, identifier),
            SERVER_KEEP_ALIVE => set_once(&mut self.server_keep_alive, block.u16()?, identifier),
            AUTHENTICATION_METHOD => set_once(&mut self.authentication_method, block.string()?, identifier),
            AUTHENTICATION_DATA => set_once(&mut self.authentication_data, block.binary()?, identifier),
            REQUEST_PROBLEM_INFORMATION => {
                let value = zero_one(block.u8()?, identifier)?;
                set_once(&mut self.request_problem_information, value, identifier)
            }
            WILL_DELAY_INTERVAL => set_once(&mut self.will_delay_interval, block.u32()?, identifier),
            REQUEST_RESPONSE_INFORMATION => {
                let value = zero_one(block.u8()?, identifier)?;
                set_once(&mut self.request_response_information, value, identifier)
            }
            RESPONSE_INFORMATION => set_once(&mut self.response_information, block.string()?, identifier),
            SERVER_REFERENCE => set_once(&mut self.server_reference, block.string()?, identifier),
            REASON_STRING => set_once(&mut self.reason_string, block.string()?, identifier),
            RECEIVE_MAXIMUM => {
                let value = block.u16()?;
                if value == 0 {
                    return Err(DecodeError::InvalidPropertyValue(identifier));
                }
                set_once(&mut self.receive_maximum, value, identifier)
            }
            TOPIC_ALIAS_MAXIMUM => set_once(&mut self.topic_alias_maximum, block.u16()?, identifier),
            TOPIC_ALIAS => {
                let value = block.u16()?;
                if value == 0 {
                    return Err(DecodeError::InvalidPropertyValue(identifier));
                }
                set_once(&mut self.topic_alias, value, identifier)
            }
            MAXIMUM_QOS => {
                let value = zero_one(block.u8()?, identifier)?;
                set_once(&mut self.maximum_qos, value, identifier)
            }
            RETAIN_AVAILABLE => {
                let value = zero_one(block.u8()?, identifier)?;
                set_once(&mut self.retain_available, value, identifier)
            }
            USER_PROPERTY => {
                let key = block.string()?;
                let value = block.string()?;
                self.user_properties.push(UserProperty { key, value });
                Ok(())
            }
            MAXIMUM_PACKET_SIZE => {
                let value = block.u32()?;
                if value == 0 {
                    return Err(DecodeError::InvalidPropertyValue(identifier));
                }
                set_once(&mut self.maximum_packet_size, value, identifier)
            }
            WILDCARD_SUBSCRIPTION_AVAILABLE => {
                let value = zero_one(block.u8()?, identifier)?;
                set_once(&mut self.wildcard_subscription_available, value, identifier)
            }
            SUBSCRIPTION_IDENTIFIER_AVAILABLE => {
                let value = zero_one(block.u8()?, identifier)?;
                set_once(&mut self.subscription_identifier_available, value, identifier)
            }
            SHARED_SUBSCRIPTION_AVAILABLE => {
                let value = zero_one(block.u8()?, identifier)?;
                set_once(&mut self.shared_subscription_available, value, identifier)
            }
            other => Err(DecodeError::InvalidProperty(other)),
        }
    }

    /// Length of the property block without its own length prefix.
    pub fn body_len(&self) -> usize {
        fn string(value: &Option<String>) -> usize {
            value.as_ref().map_or(0, |text| 3 + text.len())
        }
        fn binary(value: &Option<Bytes>) -> usize {
            value.as_ref().map_or(0, |data| 3 + data.len())
        }
        fn fixed<T>(value: &Option<T>, width: usize) -> usize {
            value.as_ref().map_or(0, |_| 1 + width)
        }
        fixed(&self.payload_format_indicator, 1)
            + fixed(&self.message_expiry_interval, 4)
            + string(&self.content_type)
            + string(&self.response_topic)
            + binary(&self.correlation_data)
            + self.subscription_identifiers.iter().map(|value| 1 + varint_len(*value as usize)).sum::<usize>()
            + fixed(&self.session_expiry_interval, 4)
            + string(&self.assigned_client_identifier)
            + fixed(&self.server_keep_alive, 2)
            + string(&self.authentication_method)
            + binary(&self.authentication_data)
            + fixed(&self.request_problem_information, 1)
            + fixed(&self.will_delay_interval, 4)
            + fixed(&self.request_response_information, 1)
            + string(&self.response_information)
            + string(&self.server_reference)
            + string(&self.reason_string)
            + fixed(&self.receive_maximum, 2)
            + fixed(&self.topic_alias_maximum, 2)
            + fixed(&self.topic_alias, 2)
            + fixed(&self.maximum_qos, 1)
            + fixed(&self.retain_available, 1)
            + self.user_properties.iter().map(|pair| 5 + pair.key.len() + pair.value.len()).sum::<usize>()
            + fixed(&self.maximum_packet_size, 4)
            + fixed(&self.wildcard_subscription_available, 1)
            + fixed(&self.subscription_identifier_available, 1)
            + fixed(&self.shared_subscription_available, 1)
    }

    /// Length including the variable-byte length prefix.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        varint_len(body) + body
    }

    pub(crate) fn encode(&self, out: &mut BytesMut) {
        use id::*;
        put_varint(out, self.body_len());
        let byte = |out: &mut BytesMut, identifier: u8, value: Option<u8>| {
            if let Some(value) = value {
                out.put_u8(identifier);
                out.put_u8(value);
            }
        };
        let short = |out: &mut BytesMut, identifier: u8, value: Option<u16>| {
            if let Some(value) = value {
                out.put_u8(identifier);
                out.put_u16(value);
            }
        };
        let long = |out: &mut BytesMut, identifier: u8, value: Option<u32>| {
            if let Some(value) = value {
                out.put_u8(identifier);
                out.put_u32(value);
            }
        };
        let text = |out: &mut BytesMut, identifier: u8, value: &Option<String>| {
            if let Some(value) = value {
                out.put_u8(identifier);
                put_string(out, value);
            }
        };
        let data = |out: &mut BytesMut, identifier: u8, value: &Option<Bytes>| {
            if let Some(value) = value {
                out.put_u8(identifier);
                put_binary(out, value);
            }
        };
        byte(out, PAYLOAD_FORMAT_INDICATOR, self.payload_format_indicator);
        long(out, MESSAGE_EXPIRY_INTERVAL, self.message_expiry_interval);
        text(out, CONTENT_TYPE, &self.content_type);
        text(out, RESPONSE_TOPIC, &self.response_topic);
        data(out, CORRELATION_DATA, &self.correlation_data);
        for value in &self.subscription_identifiers {
            out.put_u8(SUBSCRIPTION_IDENTIFIER);
            put_varint(out, *value as usize);
        }
        long(out, SESSION_EXPIRY_INTERVAL, self.session_expiry_interval);
        text(out, ASSIGNED_CLIENT_IDENTIFIER, &self.assigned_client_identifier);
        short(out, SERVER_KEEP_ALIVE, self.server_keep_alive);
        text(out, AUTHENTICATION_METHOD, &self.authentication_method);
        data(out, AUTHENTICATION_DATA, &self.authentication_data);
        byte(out, REQUEST_PROBLEM_INFORMATION, self.request_problem_information);
        long(out, WILL_DELAY_INTERVAL, self.will_delay_interval);
        byte(out, REQUEST_RESPONSE_INFORMATION, self.request_response_information);
        text(out, RESPONSE_INFORMATION, &self.response_information);
        text(out, SERVER_REFERENCE, &self.server_reference);
        text(out, REASON_STRING, &self.reason_string);
        short(out, RECEIVE_MAXIMUM, self.receive_maximum);
        short(out, TOPIC_ALIAS_MAXIMUM, self.topic_alias_maximum);
        short(out, TOPIC_ALIAS, self.topic_alias);
        byte(out, MAXIMUM_QOS, self.maximum_qos);
        byte(out, RETAIN_AVAILABLE, self.retain_available);
        for pair in &self.user_properties {
            out.put_u8(USER_PROPERTY);
            put_string(out, &pair.key);
            put_string(out, &pair.value);
        }
        long(out, MAXIMUM_PACKET_SIZE, self.maximum_packet_size);
        byte(out, WILDCARD_SUBSCRIPTION_AVAILABLE, self.wildcard_subscription_available);
        byte(out, SUBSCRIPTION_IDENTIFIER_AVAILABLE, self.subscription_identifier_available);
        byte(out, SHARED_SUBSCRIPTION_AVAILABLE, self.shared_subscription_available);
    }
}
