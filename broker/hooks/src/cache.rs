//! Per-connection memo of authorization decisions.

use std::collections::HashMap;
use std::hash::BuildHasher;

use tollgate_protocol::QoS;

use crate::decision::AclOutcome;
use crate::types::Action;

/// Bounded: when full it is cleared rather than evicting piecemeal, which keeps it cheap and a client that
/// publishes to ever-new topics cannot grow it. A lookup allocates nothing: entries are found by a hash of the
/// action and confirmed against the stored action, so a hash collision is a miss, never a wrong answer.
#[derive(Debug, Default)]
pub struct AclCache {
    generation: u64,
    /// Keyed by the action's hash under the map's own (randomly seeded) hasher state. foldhash rather than SipHash:
    /// a lookup on every publish and delivery was a visible share of a publish with SipHash, and flooding gains
    /// nothing here (the table holds one entry per hash and is cleared when full).
    entries: HashMap<u64, Entry, foldhash::fast::RandomState>,
}

#[derive(Debug)]
struct Entry {
    kind: u8,
    /// The topic, or for a subscription the share group, NUL, and the filter.
    text: Box<str>,
    qos: QoS,
    retain: bool,
    outcome: AclOutcome,
}

/// An action reduced to what identifies it, borrowed.
struct Key<'a> {
    kind: u8,
    group: Option<&'a str>,
    text: &'a str,
    qos: QoS,
    retain: bool,
}

impl<'a> Key<'a> {
    fn of(action: &Action<'a>) -> Self {
        let (kind, group, text, qos, retain) = match *action {
            Action::Publish { topic, qos, retain } => (0, None, topic, qos, retain),
            Action::Subscribe { filter, qos, share_group } => (1, Some(share_group.unwrap_or("")), filter, qos, false),
            Action::Will { topic, qos, retain } => (2, None, topic, qos, retain),
            Action::ReceiveRetained { topic } => (3, None, topic, QoS::AtMostOnce, false),
            Action::Receive { topic } => (4, None, topic, QoS::AtMostOnce, false),
            Action::Session => (5, None, "", QoS::AtMostOnce, false),
        };
        Key { kind, group, text, qos, retain }
    }

    fn hash(&self, state: &impl BuildHasher) -> u64 {
        state.hash_one((self.kind, self.group, self.text, self.qos as u8, self.retain))
    }

    fn stored_text(&self) -> Box<str> {
        match self.group {
            Some(group) => format!("{group}\u{0}{}", self.text).into(),
            None => self.text.into(),
        }
    }

    fn matches(&self, entry: &Entry) -> bool {
        if entry.kind != self.kind || entry.qos != self.qos || entry.retain != self.retain {
            return false;
        }
        match self.group {
            None => &*entry.text == self.text,
            Some(group) => entry
                .text
                .strip_prefix(group)
                .and_then(|rest| rest.strip_prefix('\u{0}'))
                .is_some_and(|filter| filter == self.text),
        }
    }
}

impl AclCache {
    pub const CAPACITY: usize = 256;

    pub fn get(&mut self, generation: u64, action: &Action<'_>) -> Option<AclOutcome> {
        if generation != self.generation {
            self.entries.clear();
            self.generation = generation;
            return None;
        }
        let key = Key::of(action);
        let entry = self.entries.get(&key.hash(self.entries.hasher()))?;
        key.matches(entry).then_some(entry.outcome)
    }

    pub fn insert(&mut self, generation: u64, action: &Action<'_>, outcome: AclOutcome) {
        if generation != self.generation || self.entries.len() >= Self::CAPACITY {
            self.entries.clear();
            self.generation = generation;
        }
        let key = Key::of(action);
        let entry = Entry { kind: key.kind, text: key.stored_text(), qos: key.qos, retain: key.retain, outcome };
        let hash = key.hash(self.entries.hasher());
        self.entries.insert(hash, entry);
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use tollgate_protocol::ReasonCode;

    use super::*;

    #[test]
    fn decisions_are_kept_per_action_and_generation() {
        let mut cache = AclCache::default();
        let allow = AclOutcome::Allow { max_qos: QoS::ExactlyOnce };
        let deny = AclOutcome::Deny(ReasonCode::NOT_AUTHORIZED);
        let publish = Action::Publish { topic: "a/b", qos: QoS::AtLeastOnce, retain: false };
        let shared = Action::Subscribe { filter: "a/b", qos: QoS::AtLeastOnce, share_group: Some("g") };
        let plain = Action::Subscribe { filter: "a/b", qos: QoS::AtLeastOnce, share_group: None };
        assert_eq!(cache.get(1, &publish), None);
        cache.insert(1, &publish, allow);
        cache.insert(1, &shared, deny);
        assert_eq!(cache.get(1, &publish), Some(allow));
        assert_eq!(cache.get(1, &shared), Some(deny));
        // Same filter without the group, same topic as a will, another QoS or retain flag: other actions.
        assert_eq!(cache.get(1, &plain), None);
        assert_eq!(cache.get(1, &Action::Will { topic: "a/b", qos: QoS::AtLeastOnce, retain: false }), None);
        assert_eq!(cache.get(1, &Action::Publish { topic: "a/b", qos: QoS::AtLeastOnce, retain: true }), None);
        assert_eq!(cache.get(1, &Action::Publish { topic: "a/b", qos: QoS::AtMostOnce, retain: false }), None);
        // A new generation forgets everything.
        assert_eq!(cache.get(2, &publish), None);
        assert!(cache.is_empty());
    }

    #[test]
    fn the_cache_is_bounded() {
        let mut cache = AclCache::default();
        let allow = AclOutcome::Allow { max_qos: QoS::ExactlyOnce };
        for index in 0..(AclCache::CAPACITY * 3) {
            let topic = format!("t/{index}");
            cache.insert(1, &Action::Publish { topic: &topic, qos: QoS::AtMostOnce, retain: false }, allow);
            assert!(cache.len() <= AclCache::CAPACITY);
        }
    }
}
