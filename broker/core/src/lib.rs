//! The broker core: listener → connection → session → router → delivery. It calls policy only through the
//! `tollgate-hooks` traits and knows nothing of WASM or Lua. There is no global state: everything hangs off a
//! [`Broker`] handle, and every client-facing queue is bounded.
//!
//! Layout: [`connection`] runs one client, [`session`] holds state that outlives connections, [`router`] is the
//! subscription trie, [`retained`] and [`store`] are the storage interfaces, [`sys`] publishes `$SYS` topics and
//! [`listener`] accepts sockets.

pub mod config;
pub mod connection;
pub mod local;
pub mod message;
pub mod metrics;
pub mod persist;
pub mod retained;
pub mod router;
pub mod session;
pub mod store;
pub mod sys;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tollgate_hooks::HookChain;
use tollgate_protocol::QoS;
use tracing::{debug, info, warn};

pub use config::{BrokerConfig, DeniedPublish, OverflowPolicy};
pub use local::{LocalClient, LocalFilterError, Unfinished};
pub use message::{ClientId, Delivery, DurableAcks, DurableReceipt, Message, SessionId};
use metrics::Metrics;
pub use persist::{SnapshotCounts, SnapshotError};
use retained::{MemoryRetainedStore, RetainedStore};
use router::Router;
use session::{EnqueueResult, Session, SessionRef};
use store::{MemorySessionStore, SessionStore};

/// A cheap, cloneable handle to one running broker.
static NEXT_BROKER_ID: AtomicU64 = AtomicU64::new(0);

/// Brokers per thread whose hook chain is kept (one in the server; tests make many).
const LOCAL_HOOKS_BROKERS: usize = 4;

struct LocalHooks {
    broker: u64,
    version: u64,
    chain: Arc<HookChain>,
}

thread_local! {
    static LOCAL_HOOKS: std::cell::RefCell<Vec<LocalHooks>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[derive(Clone)]
pub struct Broker {
    inner: Arc<BrokerInner>,
}

struct BrokerInner {
    config: BrokerConfig,
    /// Unique per broker in the process, for the per-thread copies of the hook chain.
    id: u64,
    hooks: RwLock<Arc<HookChain>>,
    /// Bumped after every `replace_hooks`.
    hooks_version: AtomicU64,
    router: Router,
    retained: Arc<dyn RetainedStore>,
    sessions: Arc<dyn SessionStore>,
    metrics: Metrics,
    next_session_id: AtomicU64,
    next_assigned_id: AtomicU64,
    shutdown: CancellationToken,
    /// The connections' view of `shutdown`: a plain flag they read on every wake-up (a token's `is_cancelled`
    /// takes a lock that every connection would share).
    shutting_down: AtomicBool,
    tasks: TaskTracker,
    started: Instant,
    /// Distinguishes assigned client identifiers of different broker runs.
    instance_tag: u64,
    /// Bumped by every recheck, so connections drop ACL decisions cached before it.
    acl_epoch: AtomicU64,
    /// Wills waiting out their delay, by session: what a state snapshot saves of them.
    pending_wills: std::sync::Mutex<std::collections::HashMap<SessionId, PendingWill>>,
}

/// A will waiting for its delay to pass (see [`Broker::schedule_will`]).
pub(crate) struct PendingWill {
    pub(crate) session: SessionRef,
    pub(crate) generation: u64,
    pub(crate) will: Arc<Message>,
    pub(crate) due: Instant,
}

/// What a recheck of every session did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RecheckReport {
    pub sessions: usize,
    /// Sessions whose client was refused: disconnected and ended.
    pub revoked: usize,
    pub subscriptions_removed: usize,
    pub queued_dropped: usize,
    /// Retained messages the revoked clients had set, removed (`purge_retained_on_revoke`).
    pub retained_purged: usize,
}

impl Broker {
    pub fn new(config: BrokerConfig, hooks: HookChain) -> Self {
        Self::with_stores(
            config,
            hooks,
            Arc::new(MemoryRetainedStore::default()),
            Arc::new(MemorySessionStore::default()),
        )
    }

    pub fn with_stores(
        config: BrokerConfig,
        hooks: HookChain,
        retained: Arc<dyn RetainedStore>,
        sessions: Arc<dyn SessionStore>,
    ) -> Self {
        let instance_tag = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            inner: Arc::new(BrokerInner {
                config,
                id: NEXT_BROKER_ID.fetch_add(1, Ordering::Relaxed),
                hooks: RwLock::new(Arc::new(hooks)),
                hooks_version: AtomicU64::new(0),
                router: Router::default(),
                retained,
                sessions,
                metrics: Metrics::default(),
                next_session_id: AtomicU64::new(1),
                next_assigned_id: AtomicU64::new(1),
                shutdown: CancellationToken::new(),
                shutting_down: AtomicBool::new(false),
                tasks: TaskTracker::new(),
                started: Instant::now(),
                instance_tag,
                acl_epoch: AtomicU64::new(0),
                pending_wills: std::sync::Mutex::default(),
            }),
        }
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// The current hook chain. Each thread keeps its own copy (its own `Arc`), refreshed when a reload bumps the
    /// version: a shared lock and reference count, touched three times per message by every worker, made the
    /// workers fight over their cache lines.
    pub fn hooks(&self) -> Arc<HookChain> {
        let inner = &*self.inner;
        let version = inner.hooks_version.load(Ordering::Acquire);
        LOCAL_HOOKS.with_borrow_mut(|local| {
            if let Some(entry) = local.iter().find(|entry| entry.broker == inner.id && entry.version == version) {
                return entry.chain.clone();
            }
            let current = inner.hooks.read().unwrap_or_else(|poisoned| poisoned.into_inner());
            let chain = Arc::new(HookChain::clone(&current));
            drop(current);
            local.retain(|entry| entry.broker != inner.id);
            if local.len() >= LOCAL_HOOKS_BROKERS {
                local.remove(0);
            }
            local.push(LocalHooks { broker: inner.id, version, chain: chain.clone() });
            chain
        })
    }

    /// Installs a new hook chain (reload). Connections pick it up at their next hook call and drop cached ACL
    /// decisions (the generation changes).
    pub fn replace_hooks(&self, hooks: HookChain) {
        *self.inner.hooks.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(hooks);
        self.inner.hooks_version.fetch_add(1, Ordering::Release);
    }

    pub fn acl_epoch(&self) -> u64 {
        self.inner.acl_epoch.load(Ordering::Relaxed)
    }

    /// Asks policy again about every session, live or persisted, as its client was last authenticated: a client
    /// now refused (`Action::Session`) is disconnected with the reason and its session ended; each subscription
    /// now refused is removed, with the queued messages only it matched. Runs after a reload, and periodically
    /// when configured, so a revocation reaches access already granted.
    pub async fn recheck_sessions(&self) -> RecheckReport {
        self.inner.acl_epoch.fetch_add(1, Ordering::Relaxed);
        let hooks = self.hooks();
        let mut report = RecheckReport::default();
        if hooks.authorizers.is_empty() {
            return report;
        }
        for session in self.inner.sessions.all() {
            let Some(client) = session.lock().client.clone() else { continue };
            report.sessions += 1;
            if let tollgate_hooks::AclOutcome::Deny(reason) =
                hooks.recheck(&client, &tollgate_hooks::Action::Session).await
            {
                info!(client_id = %session.client_id, %reason, "recheck: client no longer allowed; session ended");
                session.revoke(reason);
                self.end_session(&session);
                report.revoked += 1;
                if self.inner.config.purge_retained_on_revoke {
                    let purged = self.inner.retained.purge_publisher(&session.client_id);
                    if purged > 0 {
                        info!(client_id = %session.client_id, purged, "recheck: the revoked client's retained messages removed");
                    }
                    report.retained_purged += purged;
                }
                continue;
            }
            let subscriptions: Vec<(String, QoS)> = session
                .lock()
                .subscriptions
                .iter()
                .map(|(filter, subscription)| (filter.clone(), subscription.options.qos))
                .collect();
            let mut removed = Vec::new();
            for (filter, qos) in subscriptions {
                let Ok(parsed) = tollgate_protocol::topic::parse_subscription_filter(&filter) else { continue };
                let action =
                    tollgate_hooks::Action::Subscribe { filter: parsed.filter, qos, share_group: parsed.share_group };
                if let tollgate_hooks::AclOutcome::Deny(reason) = hooks.recheck(&client, &action).await {
                    info!(client_id = %session.client_id, %filter, %reason, "recheck: subscription no longer allowed; removed");
                    self.inner.router.unsubscribe(parsed.filter, parsed.share_group, session.id);
                    removed.push(filter);
                }
            }
            if removed.is_empty() {
                continue;
            }
            report.subscriptions_removed += removed.len();
            let mut state = session.lock();
            for filter in &removed {
                state.subscriptions.remove(filter);
            }
            let remaining: Vec<String> = state
                .subscriptions
                .keys()
                .filter_map(|filter| {
                    tollgate_protocol::topic::parse_subscription_filter(filter)
                        .ok()
                        .map(|parsed| parsed.filter.to_owned())
                })
                .collect();
            let before = state.queue.len();
            state.queue.retain(|delivery| {
                remaining.iter().any(|filter| tollgate_protocol::topic::matches(filter, &delivery.message.topic))
            });
            report.queued_dropped += before - state.queue.len();
        }
        report
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    pub fn router(&self) -> &Router {
        &self.inner.router
    }

    pub fn retained(&self) -> &dyn RetainedStore {
        &*self.inner.retained
    }

    pub fn sessions(&self) -> &dyn SessionStore {
        &*self.inner.sessions
    }

    pub fn uptime(&self) -> Duration {
        self.inner.started.elapsed()
    }

    /// Cancelled when the broker begins shutting down.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    /// Spawns a task that the shutdown drain waits for.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.inner.tasks.spawn(future)
    }

    /// Spawns a tracked task on another runtime (a connection worker).
    pub fn spawn_on<F>(&self, handle: &tokio::runtime::Handle, future: F) -> tokio::task::JoinHandle<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        handle.spawn(self.inner.tasks.track_future(future))
    }

    pub(crate) fn new_session(&self, client_id: ClientId, expiry: u32) -> SessionRef {
        Arc::new(self.unshared_session(client_id, expiry))
    }

    pub(crate) fn unshared_session(&self, client_id: ClientId, expiry: u32) -> Session {
        let id = SessionId(self.inner.next_session_id.fetch_add(1, Ordering::Relaxed));
        Session::new(id, client_id, expiry)
    }

    pub(crate) fn assign_client_id(&self) -> ClientId {
        let serial = self.inner.next_assigned_id.fetch_add(1, Ordering::Relaxed);
        ClientId(format!("tollgate-{:x}-{serial}", self.inner.instance_tag & 0xFFFF_FFFF).into())
    }

    /// Routes a message the broker itself publishes (`$SYS`, tests); see [`Broker::publish_from`].
    pub fn publish(&self, message: Arc<Message>) -> usize {
        self.publish_from(message, None)
    }

    /// Routes an accepted message: updates the retained store (remembering `publisher`, the client it came from),
    /// then queues one delivery per subscribed session (merging overlapping subscriptions). Returns how many
    /// sessions it was queued for.
    pub fn publish_from(&self, message: Arc<Message>, publisher: Option<&ClientId>) -> usize {
        self.route(message, publisher, None)
    }

    /// [`Broker::publish_from`] for a message whose publisher waits for an acknowledgement: copies for sessions
    /// that acknowledge durably carry a receipt from `acks`, which the publisher waits on before it answers.
    pub fn publish_acked(&self, message: Arc<Message>, publisher: Option<&ClientId>, acks: &mut DurableAcks) -> usize {
        self.route(message, publisher, Some(acks))
    }

    fn route(&self, message: Arc<Message>, publisher: Option<&ClientId>, mut acks: Option<&mut DurableAcks>) -> usize {
        let inner = &*self.inner;
        if message.retain && inner.config.retain_available {
            inner.retained.store(message.clone(), publisher);
        }
        let mut subscribers = inner.router.matches(&message.topic);
        if subscribers.is_empty() {
            return 0;
        }
        // Sorted by session, a session's overlapping subscriptions are neighbours and merge into one delivery
        // without a map (a hashed map built per message was a visible share of a 1→100 fan-out). Stable, so a
        // session's subscription identifiers keep the router's order.
        subscribers.sort_by_key(|subscriber| subscriber.session.id);
        let mut merged: Vec<(SessionRef, Delivery)> = Vec::with_capacity(subscribers.len());
        for subscriber in subscribers {
            if subscriber.options.no_local && message.origin == Some(subscriber.session.id) {
                continue;
            }
            let qos = message.qos.min(subscriber.options.qos);
            let retain = subscriber.options.retain_as_published && message.retain;
            match merged.last_mut() {
                // Overlapping subscriptions deliver once, at the highest granted QoS, carrying every identifier.
                Some((session, delivery)) if session.id == subscriber.session.id => {
                    delivery.qos = delivery.qos.max(qos);
                    delivery.retain |= retain;
                    delivery.subscription_ids.extend(subscriber.identifier);
                }
                _ => {
                    let subscription_ids = subscriber.identifier.into_iter().collect();
                    let mut delivery = Delivery::new(message.clone(), qos, retain, subscription_ids);
                    if subscriber.session.durable_acks
                        && let Some(acks) = acks.as_deref_mut()
                    {
                        delivery.receipt = Some(acks.receipt());
                    }
                    merged.push((subscriber.session, delivery));
                }
            }
        }
        let delivered = merged.len();
        for (session, delivery) in merged {
            self.deliver(&session, delivery);
        }
        delivered
    }

    pub(crate) fn deliver(&self, session: &Session, delivery: Delivery) {
        let config = &self.inner.config;
        match session.enqueue(delivery, config.max_queued_messages, config.overflow_policy, config.queue_qos0_offline) {
            EnqueueResult::Queued | EnqueueResult::SkippedOffline => {}
            EnqueueResult::DroppedNewest | EnqueueResult::DroppedOldest => {
                Metrics::add(&self.inner.metrics.publish_dropped, 1);
                debug!(client_id = %session.client_id, policy = ?config.overflow_policy, "session queue full, message dropped");
            }
        }
    }

    /// Ends a session: its subscriptions leave the router and its queue is discarded.
    pub(crate) fn end_session(&self, session: &Session) {
        let subscriptions: Vec<String> = {
            let mut state = session.lock();
            state.clear_messages();
            state.subscriptions.drain().map(|(filter, _)| filter).collect()
        };
        for filter in subscriptions {
            if let Ok(parsed) = tollgate_protocol::topic::parse_subscription_filter(&filter) {
                self.inner.router.unsubscribe(parsed.filter, parsed.share_group, session.id);
            }
        }
        self.inner.sessions.remove_if_current(&session.client_id, session.id);
        session.ended.end();
        debug!(client_id = %session.client_id, "session ended");
    }

    /// Arms session expiry after a disconnect [MQTT-3.1.2-23]. `u32::MAX` never expires.
    pub(crate) fn schedule_expiry(&self, session: SessionRef, generation: u64, expiry_seconds: u32) {
        if expiry_seconds == u32::MAX {
            return;
        }
        let broker = self.clone();
        let shutdown = self.shutdown_token();
        self.inner.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(u64::from(expiry_seconds))) => {}
                // Sessions survive a shutdown in a durable store; in memory they go with the process anyway.
                _ = shutdown.cancelled() => return,
            }
            if !session.is_connected() && session.generation() == generation {
                broker.end_session(&session);
            }
        });
    }

    /// Publishes a will now, or after its delay unless the session reconnects first [MQTT-3.1.3-9].
    pub(crate) fn schedule_will(&self, session: SessionRef, generation: u64, will: Arc<Message>, delay: Duration) {
        if delay.is_zero() || session.ended.has_ended() {
            self.publish_from(will, Some(&session.client_id));
            return;
        }
        let broker = self.clone();
        let shutdown = self.shutdown_token();
        let ended = session.ended.waiter();
        let pending =
            PendingWill { session: session.clone(), generation, will: will.clone(), due: Instant::now() + delay };
        self.pending_wills().insert(session.id, pending);
        self.inner.tasks.spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {
                    // A reconnect to the same session within the delay cancels the will.
                    if session.generation() == generation && !session.is_connected() {
                        broker.publish_from(will, Some(&session.client_id));
                    }
                }
                // The session ended first (expiry, or a clean start replaced it): the will goes now, unless the
                // session ended because its client was revoked: a revoked client's will is not published.
                _ = ended.cancelled() => {
                    if session.revocation().is_none() {
                        broker.publish_from(will, Some(&session.client_id));
                    }
                }
                // Still pending at shutdown: the entry stays, for the state saved after the drain.
                _ = shutdown.cancelled() => return,
            }
            let mut pending = broker.pending_wills();
            if pending.get(&session.id).is_some_and(|entry| entry.generation == generation) {
                pending.remove(&session.id);
            }
        });
    }

    pub(crate) fn pending_wills(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<SessionId, PendingWill>> {
        self.inner.pending_wills.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Begins shutdown: listeners stop accepting and connections say goodbye (v5 DISCONNECT 0x8B).
    pub fn shutdown(&self) {
        info!("broker shutting down");
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        self.inner.shutdown.cancel();
        // Connections wait on their session's signal only. One attached after this listing sees the flag when it
        // first waits; see `Session::kick_through` for why none is missed.
        for session in self.inner.sessions.all() {
            session.wakeup.notify_waiters();
        }
    }

    /// Whether [`Broker::shutdown`] has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Waits for every connection and background task to finish, up to the configured grace period. Returns
    /// false if the deadline passed first.
    pub async fn drained(&self) -> bool {
        self.inner.tasks.close();
        let finished = tokio::time::timeout(self.inner.config.shutdown_grace, self.inner.tasks.wait()).await.is_ok();
        if !finished {
            warn!(remaining = self.inner.tasks.len(), "shutdown grace period over with tasks still running");
        }
        finished
    }

    /// Publishes a message from inside the process (bridges, `$SYS`, embedding applications). It bypasses the
    /// client-facing hooks: callers inside the broker are trusted.
    pub fn publish_local(&self, topic: &str, payload: impl Into<bytes::Bytes>, qos: QoS, retain: bool) -> usize {
        self.publish(Arc::new(Message {
            topic: topic.into(),
            payload: payload.into(),
            qos,
            retain,
            properties: Default::default(),
            expires_at: None,
            origin: None,
        }))
    }
}
