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
    /// data, user properties). Expiry is tracked through `expires_at` instead.
    pub properties: Properties,
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
            user_properties: self.properties.user_properties.clone(),
            content_type: self.properties.content_type.clone(),
            payload_format_indicator: self.properties.payload_format_indicator,
            response_topic: self.properties.response_topic.clone(),
            correlation_data: self.properties.correlation_data.clone(),
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
        self.properties.user_properties = draft.user_properties;
        self.properties.content_type = draft.content_type;
        self.properties.payload_format_indicator = draft.payload_format_indicator;
        self.properties.response_topic = draft.response_topic;
        self.properties.correlation_data = draft.correlation_data;
        self.expires_at =
            draft.message_expiry_interval.map(|seconds| now + std::time::Duration::from_secs(u64::from(seconds)));
    }

    pub fn user_properties(&self) -> &[UserProperty] {
        &self.properties.user_properties
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
