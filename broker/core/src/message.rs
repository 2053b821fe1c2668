//! The broker's own form of an application message: built once on publish, shared by every subscriber.

use std::sync::Arc;

use bytes::Bytes;
use tokio::time::Instant;
use tollgate_protocol::{Properties, QoS, UserProperty};

/// Identifies a session for the router's lifetime; never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u64);

/// A client identifier. Shared because every queued delivery and log line refers to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub Arc<str>);

impl ClientId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An accepted PUBLISH (or will, or `$SYS` update) after hooks have run.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// The v5 properties that travel with the message (format, content type, response topic, correlation
    /// data, user properties); `None` when it has none, the common case. Boxed because the full set is 344
    /// bytes: inline, it made every queued or retained message a 448-byte allocation whatever it carried. Read
    /// them through [`Message::properties`]. Expiry is tracked through `expires_at` instead.
    pub properties: Option<Box<Properties>>,
    pub expires_at: Option<Instant>,
    /// The session that published it, for no-local subscriptions.
    pub origin: Option<SessionId>,
}

impl Message {
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|deadline| deadline <= now)
    }

    /// Remaining lifetime in whole seconds, rounded up, for the Message Expiry Interval sent onwards.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|deadline| {
            let remaining = deadline.saturating_duration_since(now);
            let seconds = remaining.as_secs() + u64::from(remaining.subsec_nanos() > 0);
            u32::try_from(seconds).unwrap_or(u32::MAX)
        })
    }

    /// The properties the message carries (empty ones when it has none).
    pub fn properties(&self) -> &Properties {
        static NONE: std::sync::LazyLock<Properties> = std::sync::LazyLock::new(Properties::default);
        self.properties.as_deref().unwrap_or(&NONE)
    }

    /// What a message keeps of a PUBLISH's (or will's) properties: those forwarded to subscribers, boxed, or
    /// `None` when there are none.
    pub fn carried_properties(incoming: &Properties) -> Option<Box<Properties>> {
        Self::carries_any(incoming).then(|| Box::new(Self::forwarded_properties(incoming)))
    }

    /// Whether any of the forwarded properties is set: checked field by field, as this runs for every PUBLISH.
    fn carries_any(properties: &Properties) -> bool {
        properties.payload_format_indicator.is_some()
            || properties.content_type.is_some()
            || properties.response_topic.is_some()
            || properties.correlation_data.is_some()
            || !properties.user_properties.is_empty()
    }

    /// Copies only the properties that are forwarded to subscribers [MQTT-3.3.2-*].
    pub fn forwarded_properties(incoming: &Properties) -> Properties {
        Properties {
            payload_format_indicator: incoming.payload_format_indicator,
            content_type: incoming.content_type.clone(),
            response_topic: incoming.response_topic.clone(),
            correlation_data: incoming.correlation_data.clone(),
            user_properties: incoming.user_properties.clone(),
            ..Properties::default()
        }
    }

    /// The message as hooks see it, with `expiry` as its remaining Message Expiry Interval.
    pub fn hook_view(&self, expiry: Option<u32>) -> tollgate_hooks::Message {
        tollgate_hooks::Message {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            user_properties: self.properties().user_properties.clone(),
            content_type: self.properties().content_type.clone(),
            payload_format_indicator: self.properties().payload_format_indicator,
            response_topic: self.properties().response_topic.clone(),
            correlation_data: self.properties().correlation_data.clone(),
            message_expiry_interval: expiry,
        }
    }

    /// Takes over what a hook changed in its view (an invalid topic is ignored; expiry restarts from `now`).
    pub fn apply_hook_view(&mut self, draft: tollgate_hooks::Message, now: Instant) {
        if tollgate_protocol::topic::validate_topic_name(&draft.topic).is_ok() {
            self.topic = draft.topic;
        }
        self.payload = draft.payload;
        self.qos = draft.qos;
        self.retain = draft.retain;
        let properties = Properties {
            user_properties: draft.user_properties,
            content_type: draft.content_type,
            payload_format_indicator: draft.payload_format_indicator,
            response_topic: draft.response_topic,
            correlation_data: draft.correlation_data,
            ..Properties::default()
        };
        self.properties = Self::carries_any(&properties).then(|| Box::new(properties));
        self.expires_at =
            draft.message_expiry_interval.map(|seconds| now + std::time::Duration::from_secs(u64::from(seconds)));
    }

    pub fn user_properties(&self) -> &[UserProperty] {
        &self.properties().user_properties
    }
}

/// A message read back from its stored form ([`Message::encode_stored`]).
#[derive(Debug)]
pub struct StoredMessage {
    pub message: Message,
    /// Its expiry passed while it was stored.
    pub expired: bool,
    pub subscription_ids: Vec<u32>,
}

/// Wall-clock milliseconds since the Unix epoch: what outlives the process where an `Instant` cannot.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as u64)
}

impl Message {
    /// Appends the form a message is kept in across restarts (the bridge's journal, the broker's state file): its
    /// expiry as wall-clock milliseconds (0: none), then the message as an MQTT 5 PUBLISH in our own codec, so
    /// every forwarded property survives, with `subscription_ids` as its Subscription Identifiers.
    pub fn encode_stored(
        &self,
        now: Instant,
        subscription_ids: &[u32],
        out: &mut bytes::BytesMut,
    ) -> Result<(), String> {
        let expires_at_ms = match self.remaining_expiry(now) {
            Some(seconds) => unix_ms() + u64::from(seconds) * 1000,
            None => 0,
        };
        let mut properties = Message::forwarded_properties(self.properties());
        properties.subscription_identifiers = subscription_ids.to_vec();
        let publish = tollgate_protocol::Publish {
            dup: false,
            qos: self.qos,
            retain: self.retain,
            topic: self.topic.clone(),
            packet_id: (self.qos != QoS::AtMostOnce).then_some(1),
            properties,
            payload: self.payload.clone(),
        };
        out.extend_from_slice(&expires_at_ms.to_be_bytes());
        tollgate_protocol::encode_packet(
            &tollgate_protocol::Packet::Publish(publish),
            tollgate_protocol::ProtocolVersion::V5,
            out,
        )
        .map(drop)
        .map_err(|error| error.to_string())
    }

    /// The message in a stored form, its expiry an `Instant` again; `None` if the bytes are not one.
    pub fn decode_stored(body: &[u8], now: Instant) -> Option<StoredMessage> {
        let (expiry, packet) = body.split_at_checked(8)?;
        let expires_at_ms = u64::from_be_bytes(expiry.try_into().ok()?);
        let mut buffer = bytes::BytesMut::from(packet);
        let Ok(Some(tollgate_protocol::Packet::Publish(publish))) =
            tollgate_protocol::decode_packet(&mut buffer, tollgate_protocol::ProtocolVersion::V5, usize::MAX)
        else {
            return None;
        };
        if !buffer.is_empty() {
            return None;
        }
        let (expires_at, expired) = if expires_at_ms == 0 {
            (None, false)
        } else {
            let now_ms = unix_ms();
            let left = std::time::Duration::from_millis(expires_at_ms.saturating_sub(now_ms));
            (Some(now + left), expires_at_ms <= now_ms)
        };
        let message = Message {
            topic: publish.topic,
            // Its own allocation: the decoded payload shares the buffer the whole record was copied into, which
            // a restored queue would otherwise keep per message.
            payload: Bytes::copy_from_slice(&publish.payload),
            qos: publish.qos,
            retain: publish.retain,
            properties: Message::carried_properties(&publish.properties),
            expires_at,
            origin: None,
        };
        Some(StoredMessage { message, expired, subscription_ids: publish.properties.subscription_identifiers })
    }
}

/// One message on its way to one subscriber.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub message: Arc<Message>,
    /// The QoS it is delivered at: the lower of publish QoS and granted QoS.
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    /// Set on copies for a session that acknowledges durably: the publisher's acknowledgement waits until every
    /// copy carrying it has been let go of.
    pub receipt: Option<DurableReceipt>,
}

impl Delivery {
    pub fn new(message: Arc<Message>, qos: QoS, retain: bool, subscription_ids: Vec<u32>) -> Self {
        Self { message, qos, retain, subscription_ids, receipt: None }
    }
}

/// What the copies of one publisher's messages hold while a durable subscriber (a bridge's disk queue) has not
/// yet made them durable. The publisher keeps the [`DurableAcks`] and acknowledges once no copy holds a receipt:
/// the holder appended and synced it, or it was dropped (queue bound, session end), which is the same answer the
/// publisher would have had without a durable subscriber.
#[derive(Debug)]
pub struct DurableReceipt(Arc<ReceiptShared>);

#[derive(Debug, Default)]
struct ReceiptShared {
    holders: std::sync::atomic::AtomicUsize,
    released: tokio::sync::Notify,
}

impl Clone for DurableReceipt {
    fn clone(&self) -> Self {
        self.0.holders.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(self.0.clone())
    }
}

impl Drop for DurableReceipt {
    fn drop(&mut self) {
        // AcqRel: the holder's work on the copy (the journal write) happens before the publisher sees zero.
        if self.0.holders.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.0.released.notify_one();
        }
    }
}

/// The publisher's side of [`DurableReceipt`]: hands out receipts while messages are routed, then waits for them.
/// Empty (no allocation) until a message meets a durable subscriber.
#[derive(Debug, Default)]
pub struct DurableAcks(Option<Arc<ReceiptShared>>);

impl DurableAcks {
    pub(crate) fn receipt(&mut self) -> DurableReceipt {
        let shared = self.0.get_or_insert_with(Arc::default);
        shared.holders.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        DurableReceipt(shared.clone())
    }

    /// Whether a receipt was handed out since the last wait.
    pub fn is_pending(&self) -> bool {
        self.0.is_some()
    }

    /// Waits until no copy holds a receipt handed out so far, and starts afresh.
    pub async fn wait(&mut self) {
        let Some(shared) = self.0.take() else { return };
        loop {
            let released = shared.released.notified();
            if shared.holders.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            released.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every queued, retained and in-flight message is one `Arc<Message>`: with its properties inline it was a
    /// 448-byte allocation whatever it carried.
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_message_without_properties_is_a_small_allocation() {
        assert!(std::mem::size_of::<Message>() + 2 * std::mem::size_of::<usize>() <= 112);
    }

    #[test]
    fn only_forwarded_properties_are_carried_and_none_costs_nothing() {
        assert!(Message::carried_properties(&Properties::default()).is_none());
        let incoming = Properties {
            topic_alias: Some(3),
            message_expiry_interval: Some(60),
            subscription_identifiers: vec![7],
            ..Properties::default()
        };
        assert!(Message::carried_properties(&incoming).is_none(), "not forwarded: nothing to carry");
        let incoming = Properties { content_type: Some("json".into()), topic_alias: Some(3), ..Properties::default() };
        let carried = Message::carried_properties(&incoming).expect("a content type is carried");
        assert_eq!((carried.content_type.as_deref(), carried.topic_alias), (Some("json"), None));
    }
}
