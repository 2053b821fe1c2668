//! Subscription trie (topic levels as edges, `+` and `#` as ordinary edge labels matched specially) with
//! shared-subscription groups, and the fan-out of one message to its subscribers.

use std::collections::HashMap;
use std::sync::RwLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tollgate_protocol::SubscriptionOptions;

use crate::message::SessionId;
use crate::session::SessionRef;

#[derive(Clone, Debug)]
pub struct Subscriber {
    pub session: SessionRef,
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

#[derive(Debug, Default)]
struct SharedGroup {
    members: Vec<Subscriber>,
    next: AtomicUsize,
}

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    subscribers: HashMap<SessionId, Subscriber>,
    shared: HashMap<Box<str>, SharedGroup>,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty() && self.shared.is_empty()
    }

    fn collect(&self, levels: &[&str], index: usize, dollar: bool, out: &mut Vec<Subscriber>) {
        // Wildcards at the first level never match `$` topics [MQTT-4.7.2-1].
        let wildcards_allowed = !(index == 0 && dollar);
        if wildcards_allowed && let Some(multi) = self.children.get("#") {
            multi.emit(out);
        }
        let Some(level) = levels.get(index) else {
            self.emit(out);
            return;
        };
        if wildcards_allowed && let Some(single) = self.children.get("+") {
            single.collect(levels, index + 1, dollar, out);
        }
        if let Some(exact) = self.children.get(*level) {
            exact.collect(levels, index + 1, dollar, out);
        }
    }

    fn emit(&self, out: &mut Vec<Subscriber>) {
        out.extend(self.subscribers.values().cloned());
        for group in self.shared.values() {
            if let Some(member) = group.pick() {
                out.push(member.clone());
            }
        }
    }
}

impl SharedGroup {
    /// Round-robin over members, preferring connected ones so a message is not parked on an offline session
    /// while others could take it.
    fn pick(&self) -> Option<&Subscriber> {
        let count = self.members.len();
        if count == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..count)
            .map(|offset| &self.members[(start + offset) % count])
            .find(|member| member.session.is_connected())
            .or_else(|| self.members.get(start % count))
    }
}

/// The subscription index. Readers (publishes) share the lock; subscribe and unsubscribe take it exclusively.
#[derive(Debug, Default)]
pub struct Router {
    root: RwLock<Node>,
    count: AtomicUsize,
}

impl Router {
    /// Adds or replaces a subscription. Returns true if the session already had this exact subscription.
    pub fn subscribe(&self, filter: &str, share_group: Option<&str>, subscriber: Subscriber) -> bool {
        let mut root = self.root.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut node = &mut *root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let session_id = subscriber.session.id;
        let existed = match share_group {
            None => node.subscribers.insert(session_id, subscriber).is_some(),
            Some(group) => {
                let group = node.shared.entry(group.into()).or_default();
                match group.members.iter_mut().find(|member| member.session.id == session_id) {
                    Some(member) => {
                        *member = subscriber;
                        true
                    }
                    None => {
                        group.members.push(subscriber);
                        false
                    }
                }
            }
        };
        if !existed {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        existed
    }

    /// Removes a subscription. Returns true if it existed.
    pub fn unsubscribe(&self, filter: &str, share_group: Option<&str>, session: SessionId) -> bool {
        let mut root = self.root.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        let levels: Vec<&str> = filter.split('/').collect();
        let removed = Self::remove(&mut root, &levels, share_group, session);
        if removed {
            self.count.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    fn remove(node: &mut Node, levels: &[&str], share_group: Option<&str>, session: SessionId) -> bool {
        let Some((first, rest)) = levels.split_first() else {
            return match share_group {
                None => node.subscribers.remove(&session).is_some(),
                Some(group_name) => {
                    let Some(group) = node.shared.get_mut(group_name) else {
                        return false;
                    };
                    let before = group.members.len();
                    group.members.retain(|member| member.session.id != session);
                    let removed = group.members.len() != before;
                    if group.members.is_empty() {
                        node.shared.remove(group_name);
                    }
                    removed
                }
            };
        };
        let Some(child) = node.children.get_mut(*first) else {
            return false;
        };
        let removed = Self::remove(child, rest, share_group, session);
        if child.is_empty() {
            node.children.remove(*first);
        }
        removed
    }

    /// Every subscriber whose filter matches `topic`, with one member picked per shared group. A session with
    /// several matching subscriptions appears several times; the caller merges them.
    pub fn matches(&self, topic: &str) -> Vec<Subscriber> {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut out = Vec::new();
        let root = self.root.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        root.collect(&levels, 0, topic.starts_with('$'), &mut out);
        out
    }

    pub fn subscription_count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::ClientId;
    use crate::session::Session;
    use std::sync::Arc;
    use tollgate_protocol::QoS;

    fn subscriber(id: u64) -> Subscriber {
        Subscriber {
            session: Arc::new(Session::new(SessionId(id), ClientId(format!("c{id}").into()), 0)),
            options: SubscriptionOptions { qos: QoS::AtLeastOnce, ..Default::default() },
            identifier: None,
        }
    }

    fn ids(router: &Router, topic: &str) -> Vec<u64> {
        let mut found: Vec<u64> = router.matches(topic).iter().map(|s| s.session.id.0).collect();
        found.sort_unstable();
        found
    }

    #[test]
    fn wildcards_match_and_dollar_topics_are_protected() {
        let router = Router::default();
        router.subscribe("a/+/c", None, subscriber(1));
        router.subscribe("a/#", None, subscriber(2));
        router.subscribe("#", None, subscriber(3));
        router.subscribe("$SYS/#", None, subscriber(4));
        router.subscribe("a/b/c", None, subscriber(5));
        assert_eq!(ids(&router, "a/b/c"), vec![1, 2, 3, 5]);
        assert_eq!(ids(&router, "a"), vec![2, 3]);
        assert_eq!(ids(&router, "$SYS/broker/uptime"), vec![4]);
        assert_eq!(router.subscription_count(), 5);
    }

    #[test]
    fn unsubscribe_prunes_and_reports() {
        let router = Router::default();
        let sub = subscriber(1);
        assert!(!router.subscribe("x/y", None, sub.clone()));
        assert!(router.subscribe("x/y", None, sub));
        assert!(router.unsubscribe("x/y", None, SessionId(1)));
        assert!(!router.unsubscribe("x/y", None, SessionId(1)));
        assert!(ids(&router, "x/y").is_empty());
        assert_eq!(router.subscription_count(), 0);
    }

    #[test]
    fn shared_groups_round_robin() {
        let router = Router::default();
        for id in 1..=3 {
            router.subscribe("jobs/#", Some("workers"), subscriber(id));
        }
        let mut seen: Vec<u64> = (0..6).flat_map(|_| ids(&router, "jobs/1")).collect();
        seen.sort_unstable();
        assert_eq!(seen, vec![1, 1, 2, 2, 3, 3]);
    }
}
