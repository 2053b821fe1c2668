//! Per-connection memo of authorization decisions.

use std::collections::HashMap;

use tollgate_protocol::QoS;

use crate::decision::AclOutcome;
use crate::types::Action;

/// Bounded: when full it is cleared rather than evicting piecemeal, which keeps it cheap and a client that
/// publishes to ever-new topics cannot grow it.
#[derive(Debug, Default)]
pub struct AclCache {
    generation: u64,
    entries: HashMap<(u8, String, QoS, bool), AclOutcome>,
}

impl AclCache {
    pub const CAPACITY: usize = 256;

    fn key(action: &Action<'_>) -> (u8, String, QoS, bool) {
        match *action {
            Action::Publish { topic, qos, retain } => (0, topic.to_owned(), qos, retain),
            Action::Subscribe { filter, qos, share_group } => {
                (1, format!("{}\u{0}{}", share_group.unwrap_or(""), filter), qos, false)
            }
            Action::Will { topic, qos, retain } => (2, topic.to_owned(), qos, retain),
            Action::ReceiveRetained { topic } => (3, topic.to_owned(), QoS::AtMostOnce, false),
            Action::Receive { topic } => (4, topic.to_owned(), QoS::AtMostOnce, false),
            Action::Session => (5, String::new(), QoS::AtMostOnce, false),
        }
    }

    pub fn get(&mut self, generation: u64, action: &Action<'_>) -> Option<AclOutcome> {
        if generation != self.generation {
            self.entries.clear();
            self.generation = generation;
            return None;
        }
        self.entries.get(&Self::key(action)).copied()
    }

    pub fn insert(&mut self, generation: u64, action: &Action<'_>, outcome: AclOutcome) {
        if generation != self.generation || self.entries.len() >= Self::CAPACITY {
            self.entries.clear();
            self.generation = generation;
        }
        self.entries.insert(Self::key(action), outcome);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}
