//! Session state (MQTT section 4.1): subscriptions, the outgoing queue, messages in flight in both directions.
//! It outlives connections; a connection attaches to it, and detaches when it ends.
//!
//! The state sits behind a short-lived `std` mutex: the router appends deliveries from publishers' tasks and the
//! owning connection drains them. No lock is ever held across an `.await`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tollgate_hooks::ClientInfo;
use tollgate_protocol::{PacketId, QoS, ReasonCode, SubscriptionOptions};

use crate::config::OverflowPolicy;
use crate::message::{ClientId, Delivery, SessionId};

/// A subscription as the session remembers it, so it can be removed from the router later.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSubscription {
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
}

/// A message sent to the client and not yet fully acknowledged.
#[derive(Clone, Debug)]
pub enum Inflight {
    /// QoS 1 sent, waiting for PUBACK; or QoS 2 sent, waiting for PUBREC.
    Publish(Delivery),
    /// QoS 2: PUBREL sent, waiting for PUBCOMP.
    Release,
}

/// What [`Session::enqueue`] did with a delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnqueueResult {
    Queued,
    /// The queue was full and the arriving message was discarded.
    DroppedNewest,
    /// The queue was full and its oldest message was discarded to make room.
    DroppedOldest,
    /// QoS 0 to an offline session, not queued by configuration.
    SkippedOffline,
}

/// Who holds the session right now.
#[derive(Debug)]
struct Attachment {
    generation: u64,
}

/// Hashes packet ids with FxHash, not SipHash with random keys: the ids are at most 65,535, the broker assigns the
/// outgoing ones and a client's own are bounded by its receive maximum, so there is nothing to flood. SipHash on
/// the in-flight map's insert and remove was 7% of a QoS 1 fan-out's broker samples. The hasher state takes no
/// room, against 16 bytes for `RandomState` (every session carries two maps): with foldhash's fixed state (8
/// bytes) two runs measured 2.04 and 2.06 KiB per idle connection against 1.62–1.87 without, likely the session's
/// allocation moving up an allocator size class.
pub type PacketIdHasher = std::hash::BuildHasherDefault<rustc_hash::FxHasher>;

#[derive(Debug, Default)]
pub struct SessionState {
    pub queue: VecDeque<Delivery>,
    /// Keyed by packet id; the `u64` orders redelivery as originally sent.
    pub inflight: HashMap<PacketId, (u64, Inflight), PacketIdHasher>,
    inflight_sequence: u64,
    next_packet_id: PacketId,
    /// QoS 2 packet ids received and acknowledged with PUBREC, waiting for PUBREL [MQTT-4.3.3].
    pub incoming_qos2: HashSet<PacketId, PacketIdHasher>,
    pub subscriptions: HashMap<String, SessionSubscription>,
    /// Seconds; `u32::MAX` means never. Updated by CONNECT and DISCONNECT.
    pub expiry_interval: u32,
    attachment: Option<Attachment>,
    /// Incremented on every attach, so late work from an old connection can tell it is stale.
    generation: u64,
    /// When the last connection left, in wall-clock seconds since the Unix epoch (kept for a restart, so a
    /// restored session expires when it would have; see [`SessionState::offline_since`]).
    offline_since_unix_s: u32,
    /// Who the session belongs to, as the latest connection authenticated it: what a recheck asks policy about.
    pub client: Option<Arc<ClientInfo>>,
    /// Set when a recheck revoked the client, so the kicked connection says why.
    revoked: Option<ReasonCode>,
}

#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    pub client_id: ClientId,
    state: Mutex<SessionState>,
    /// Woken when deliveries are queued or in-flight slots open, and when the connection must leave (kick,
    /// shutdown): the connection waits on this one signal and then looks at what changed.
    pub wakeup: Notify,
    /// Connections of this generation or older must leave: a newer one took over, or the client was revoked
    /// or kicked. Read by the connection on every wake-up, so it lives outside the state's mutex.
    kicked_through: AtomicU64,
    /// Set when the session ends (expiry, clean start, or disconnect with expiry 0): a delayed will waits for the
    /// delay or for this, whichever comes first [MQTT-3.1.3-9].
    pub ended: SessionEnd,
    /// Publishers are acknowledged only once this session's holder has let go of its copy (see
    /// [`crate::message::DurableReceipt`]). Only local clients set it.
    pub durable_acks: bool,
}

/// Whether a session has ended, and a way to wait for it. The token to wait on is made only when something
/// waits (a delayed will): most sessions never need one, and each `CancellationToken` is a 112-byte allocation
/// that every idle connection's session used to carry.
#[derive(Debug, Default)]
pub struct SessionEnd {
    state: Mutex<(bool, Option<CancellationToken>)>,
}

impl SessionEnd {
    fn state(&self) -> MutexGuard<'_, (bool, Option<CancellationToken>)> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn end(&self) {
        let mut state = self.state();
        state.0 = true;
        if let Some(token) = &state.1 {
            token.cancel();
        }
    }

    pub fn has_ended(&self) -> bool {
        self.state().0
    }

    /// A token cancelled when the session ends (already cancelled if it has).
    pub fn waiter(&self) -> CancellationToken {
        let mut state = self.state();
        let token = state.1.get_or_insert_with(CancellationToken::new).clone();
        if state.0 {
            token.cancel();
        }
        token
    }
}

impl Session {
    pub fn new(id: SessionId, client_id: ClientId, expiry_interval: u32) -> Self {
        Self {
            id,
            client_id,
            state: Mutex::new(SessionState {
                expiry_interval,
                next_packet_id: 1,
                offline_since_unix_s: unix_now_s(),
                ..SessionState::default()
            }),
            wakeup: Notify::new(),
            kicked_through: AtomicU64::new(0),
            ended: SessionEnd::default(),
            durable_acks: false,
        }
    }

    /// A poisoned lock means a panic elsewhere mid-update; the state is plain data, so keep serving with it
    /// rather than take the whole broker down.
    pub fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Attaches a new connection, kicking any previous one, and returns the new generation.
    pub fn attach(&self, client: Arc<ClientInfo>) -> u64 {
        let mut state = self.lock();
        if let Some(previous) = state.attachment.take() {
            self.kick_through(previous.generation);
        }
        state.client = Some(client);
        state.revoked = None;
        state.generation += 1;
        let generation = state.generation;
        state.attachment = Some(Attachment { generation });
        generation
    }

    /// Tells the connections of `generation` and older to leave. `notify_waiters` reaches a connection that
    /// made its `notified()` future before this call even if it has not polled it yet, and one that makes it
    /// later sees the raised mark first (see `Connection::next_signal`): a kick is never lost.
    fn kick_through(&self, generation: u64) {
        self.kicked_through.fetch_max(generation, Ordering::SeqCst);
        self.wakeup.notify_waiters();
    }

    /// Whether the connection of `generation` has been told to leave.
    pub fn is_kicked(&self, generation: u64) -> bool {
        self.kicked_through.load(Ordering::SeqCst) >= generation
    }

    /// Detaches if `generation` is still the current connection; false means another connection has taken over.
    pub fn detach(&self, generation: u64) -> bool {
        let mut state = self.lock();
        match &state.attachment {
            Some(attachment) if attachment.generation == generation => {
                state.attachment = None;
                state.offline_since_unix_s = unix_now_s();
                true
            }
            _ => false,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.lock().attachment.is_some()
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Kicks the attached connection with a reason (a recheck found the client no longer allowed).
    pub fn revoke(&self, reason: ReasonCode) {
        let mut state = self.lock();
        state.revoked = Some(reason);
        if let Some(attachment) = &state.attachment {
            self.kick_through(attachment.generation);
        }
    }

    /// Why the connection was kicked, if it was a revocation.
    pub fn revocation(&self) -> Option<ReasonCode> {
        self.lock().revoked
    }

    /// Kicks the attached connection, if any (session takeover, administrative action).
    pub fn kick(&self) {
        if let Some(attachment) = &self.lock().attachment {
            self.kick_through(attachment.generation);
        }
    }

    /// Appends a delivery, applying the queue bound and its overflow policy.
    pub fn enqueue(
        &self,
        delivery: Delivery,
        limit: usize,
        policy: OverflowPolicy,
        queue_qos0_offline: bool,
    ) -> EnqueueResult {
        let result = {
            let mut state = self.lock();
            if state.attachment.is_none() && delivery.qos == QoS::AtMostOnce && !queue_qos0_offline {
                return EnqueueResult::SkippedOffline;
            }
            if state.queue.len() >= limit {
                match policy {
                    OverflowPolicy::DropNewest => return EnqueueResult::DroppedNewest,
                    OverflowPolicy::DropOldest => {
                        state.queue.pop_front();
                        state.queue.push_back(delivery);
                        EnqueueResult::DroppedOldest
                    }
                }
            } else {
                state.queue.push_back(delivery);
                EnqueueResult::Queued
            }
        };
        self.wakeup.notify_one();
        result
    }
}

impl SessionState {
    /// Takes queued deliveries for sending while the in-flight window allows, assigning packet ids to QoS 1/2.
    /// Expired messages are discarded on the way [MQTT-3.3.2-5].
    pub fn take_sendable(
        &mut self,
        window: usize,
        max_batch: usize,
        now: Instant,
    ) -> Vec<(Delivery, Option<PacketId>)> {
        let mut batch = Vec::new();
        while batch.len() < max_batch {
            let Some(front) = self.queue.front() else {
                break;
            };
            if front.message.is_expired(now) {
                self.queue.pop_front();
                continue;
            }
            if front.qos != QoS::AtMostOnce && self.inflight.len() >= window {
                break;
            }
            let Some(delivery) = self.queue.pop_front() else {
                break;
            };
            if delivery.qos == QoS::AtMostOnce {
                batch.push((delivery, None));
                continue;
            }
            let Some(packet_id) = self.allocate_packet_id() else {
                self.queue.push_front(delivery);
                break;
            };
            self.inflight_sequence += 1;
            self.inflight.insert(packet_id, (self.inflight_sequence, Inflight::Publish(delivery.clone())));
            batch.push((delivery, Some(packet_id)));
        }
        batch
    }

    fn allocate_packet_id(&mut self) -> Option<PacketId> {
        for _ in 0..u16::MAX {
            let candidate = self.next_packet_id;
            self.next_packet_id = self.next_packet_id.checked_add(1).unwrap_or(1);
            if !self.inflight.contains_key(&candidate) {
                return Some(candidate);
            }
        }
        None
    }

    /// In-flight entries in the order they were first sent, for redelivery on session resume [MQTT-4.4.0-1].
    pub fn inflight_in_order(&self) -> Vec<(PacketId, Inflight)> {
        let mut entries: Vec<_> =
            self.inflight.iter().map(|(packet_id, (sequence, entry))| (*sequence, *packet_id, entry.clone())).collect();
        entries.sort_by_key(|(sequence, _, _)| *sequence);
        entries.into_iter().map(|(_, packet_id, entry)| (packet_id, entry)).collect()
    }

    /// PUBACK (QoS 1) or PUBCOMP (QoS 2) completes an exchange. Returns whether the id was known.
    pub fn complete(&mut self, packet_id: PacketId) -> bool {
        self.inflight.remove(&packet_id).is_some()
    }

    /// PUBREC: the message is now the client's; only PUBREL/PUBCOMP remain. Returns whether the id was known.
    pub fn received(&mut self, packet_id: PacketId) -> bool {
        match self.inflight.get_mut(&packet_id) {
            Some((_, entry)) => {
                *entry = Inflight::Release;
                true
            }
            None => false,
        }
    }

    /// Since when (Unix seconds) the session has had no connection: `now` while one is attached.
    pub(crate) fn offline_since(&self, now: u32) -> u32 {
        if self.attachment.is_some() { now } else { self.offline_since_unix_s }
    }

    /// A restored session has been offline since `since` (Unix seconds), as saved.
    pub(crate) fn restore_offline_since(&mut self, since: u32) {
        self.offline_since_unix_s = since;
    }

    /// Puts back an exchange that was in flight before a restart; called in the order first sent.
    pub(crate) fn restore_inflight(&mut self, packet_id: PacketId, entry: Inflight) {
        self.inflight_sequence += 1;
        self.inflight.insert(packet_id, (self.inflight_sequence, entry));
        self.next_packet_id = packet_id.checked_add(1).unwrap_or(1);
    }

    /// Drops all queued and in-flight state (clean start, or the session ended).
    pub fn clear_messages(&mut self) {
        self.queue.clear();
        self.inflight.clear();
        self.incoming_qos2.clear();
    }
}

/// Wall-clock seconds since the Unix epoch (fits a `u32` until 2106).
pub(crate) fn unix_now_s() -> u32 {
    u32::try_from(crate::message::unix_ms() / 1000).unwrap_or(u32::MAX)
}

/// Shared handle used by the router and the registry.
pub type SessionRef = Arc<Session>;

#[cfg(test)]
mod tests {
    use super::SessionEnd;

    #[test]
    fn a_session_end_reaches_waiters_made_before_and_after_it() {
        let end = SessionEnd::default();
        let early = end.waiter();
        assert!(!end.has_ended() && !early.is_cancelled());
        end.end();
        assert!(end.has_ended() && early.is_cancelled());
        assert!(end.waiter().is_cancelled(), "a waiter made after the end must not wait forever");
    }
}
