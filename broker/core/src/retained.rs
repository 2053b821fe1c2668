//! Retained messages behind a store interface, so a durable store can replace the in-memory one without the
//! session or router logic changing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tollgate_protocol::topic;

use crate::message::{ClientId, Message};

pub trait RetainedStore: Send + Sync {
    /// Stores `message` as the retained message of its topic, or deletes it when the payload is empty
    /// [MQTT-3.3.1-6, MQTT-3.3.1-7]. `publisher` is the client that set it (none for the broker's own).
    fn store(&self, message: Arc<Message>, publisher: Option<&ClientId>);
    /// Live retained messages whose topics match `filter`.
    fn matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>>;
    /// Removes every retained message `publisher` set and nobody replaced since; returns how many. For a revoked
    /// client: what it retained must not outlive its access (the CVE-2018-12546 class).
    fn purge_publisher(&self, publisher: &ClientId) -> usize;
    /// Every live retained message with the client that set it, for a state snapshot.
    fn all(&self, now: Instant) -> Vec<(Arc<Message>, Option<ClientId>)>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Retained {
    message: Arc<Message>,
    publisher: Option<ClientId>,
}

#[derive(Default)]
pub struct MemoryRetainedStore {
    messages: Mutex<HashMap<Arc<str>, Retained>>,
}

impl MemoryRetainedStore {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Retained>> {
        self.messages.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl RetainedStore for MemoryRetainedStore {
    fn store(&self, message: Arc<Message>, publisher: Option<&ClientId>) {
        let mut messages = self.lock();
        if message.payload.is_empty() {
            messages.remove(&message.topic);
        } else {
            messages.insert(message.topic.clone(), Retained { message, publisher: publisher.cloned() });
        }
    }

    fn matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        let mut messages = self.lock();
        messages.retain(|_, retained| !retained.message.is_expired(now));
        messages
            .values()
            .filter(|retained| topic::matches(filter, &retained.message.topic))
            .map(|retained| retained.message.clone())
            .collect()
    }

    fn purge_publisher(&self, publisher: &ClientId) -> usize {
        let mut messages = self.lock();
        let before = messages.len();
        messages.retain(|_, retained| retained.publisher.as_ref() != Some(publisher));
        before - messages.len()
    }

    fn all(&self, now: Instant) -> Vec<(Arc<Message>, Option<ClientId>)> {
        let messages = self.lock();
        messages
            .values()
            .filter(|retained| !retained.message.is_expired(now))
            .map(|retained| (retained.message.clone(), retained.publisher.clone()))
            .collect()
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retained(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(payload),
            qos: tollgate_protocol::QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            expires_at: None,
            origin: None,
        })
    }

    #[test]
    fn a_purge_removes_what_the_client_retained_and_nobody_replaced() {
        let store = MemoryRetainedStore::default();
        let car = ClientId("car".into());
        let backend = ClientId("backend".into());
        store.store(retained("car/status", b"online"), Some(&car));
        store.store(retained("car/position", b"here"), Some(&car));
        store.store(retained("car/cmd", b"unlock"), Some(&backend));
        // The backend replaced one of the car's messages: it is the backend's now.
        store.store(retained("car/position", b"towed"), Some(&backend));
        store.store(retained("$SYS/broker/version", b"1"), None);
        assert_eq!(store.purge_publisher(&car), 1);
        let now = Instant::now();
        let left: Vec<String> = {
            let mut topics: Vec<String> = store.matching("#", now).iter().map(|m| m.topic.to_string()).collect();
            topics.sort();
            topics
        };
        assert_eq!(left, ["car/cmd", "car/position"]);
        assert_eq!(store.purge_publisher(&car), 0);
        assert_eq!(store.len(), 3);
    }
}
