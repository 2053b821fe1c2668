//! Retained messages behind a store interface, so a durable store can replace the in-memory one without the
//! session or router logic changing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tollgate_protocol::topic;

use crate::message::Message;

pub trait RetainedStore: Send + Sync {
    /// Stores `message` as the retained message of its topic, or deletes it when the payload is empty
    /// [MQTT-3.3.1-6, MQTT-3.3.1-7].
    fn store(&self, message: Arc<Message>);
    /// Live retained messages whose topics match `filter`.
    fn matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Default)]
pub struct MemoryRetainedStore {
    messages: Mutex<HashMap<Arc<str>, Arc<Message>>>,
}

impl RetainedStore for MemoryRetainedStore {
    fn store(&self, message: Arc<Message>) {
        let mut messages = self.messages.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if message.payload.is_empty() {
            messages.remove(&message.topic);
        } else {
            messages.insert(message.topic.clone(), message);
        }
    }

    fn matching(&self, filter: &str, now: Instant) -> Vec<Arc<Message>> {
        let mut messages = self.messages.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        messages.retain(|_, message| !message.is_expired(now));
        messages.values().filter(|message| topic::matches(filter, &message.topic)).cloned().collect()
    }

    fn len(&self) -> usize {
        self.messages.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).len()
    }
}
