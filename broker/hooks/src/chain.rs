//! Running several hooks in order with explicit combining rules, a per-hook timeout and a failure policy.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tollgate_protocol::{QoS, ReasonCode};

use crate::decision::*;
use crate::types::*;
use crate::{Authenticator, Authorizer, BridgeRouter, HookError, SessionObserver, Transformer};

/// Makes a timer future. The runtime supplies it (tokio's `sleep` in the broker), which keeps this crate free of
/// any runtime dependency and lets tests drive time.
pub type Sleeper = Arc<dyn Fn(Duration) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// Called for every hook failure so the runtime can log and count it.
pub type FailureObserver = Arc<dyn Fn(&HookError) + Send + Sync>;

/// What a failed or timed-out hook means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// Treat the failure as a denial (the default for authentication and authorization).
    #[default]
    FailClosed,
    /// Treat the failure as an abstention: the message or connection proceeds as if the hook were absent (the
    /// default for transforms).
    PassThrough,
}

/// One hook in a chain with its limits.
pub struct HookSlot<H: ?Sized> {
    pub hook: Arc<H>,
    /// `None` for trusted native hooks: no timer is armed at all.
    pub timeout: Option<Duration>,
    pub on_failure: FailurePolicy,
}

impl<H: ?Sized> Clone for HookSlot<H> {
    fn clone(&self) -> Self {
        Self { hook: self.hook.clone(), timeout: self.timeout, on_failure: self.on_failure }
    }
}

impl<H: ?Sized> HookSlot<H> {
    pub fn new(hook: Arc<H>, timeout: Option<Duration>, on_failure: FailurePolicy) -> Self {
        Self { hook, timeout, on_failure }
    }
}

/// The result of the whole authentication chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AuthOutcome {
    Allow { attributes: std::collections::BTreeMap<String, String> },
    Deny { reason: ReasonCode, message: Option<String> },
    Continue { data: Option<bytes::Bytes> },
}

/// All hooks of a broker, in configuration order. Immutable once built: a reload builds a new chain with a
/// higher generation, which also invalidates every connection's ACL cache. Cloning copies the slot lists (the
/// hooks themselves are shared).
#[derive(Clone)]
pub struct HookChain {
    pub authenticators: Vec<HookSlot<dyn Authenticator>>,
    pub authorizers: Vec<HookSlot<dyn Authorizer>>,
    pub transformers: Vec<HookSlot<dyn Transformer>>,
    pub routers: Vec<HookSlot<dyn BridgeRouter>>,
    pub observers: Vec<HookSlot<dyn SessionObserver>>,
    /// Decision when every authenticator abstains (or there are none).
    pub auth_fallback: AuthFallback,
    pub generation: u64,
    sleeper: Option<Sleeper>,
    observer: Option<FailureObserver>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum AuthFallback {
    #[default]
    Allow,
    Deny,
}

impl Default for HookChain {
    fn default() -> Self {
        Self {
            authenticators: Vec::new(),
            authorizers: Vec::new(),
            transformers: Vec::new(),
            routers: Vec::new(),
            observers: Vec::new(),
            auth_fallback: AuthFallback::Allow,
            generation: 0,
            sleeper: None,
            observer: None,
        }
    }
}

enum Attempt<T> {
    Done(T),
    Failed(HookError),
}

impl HookChain {
    pub fn with_sleeper(mut self, sleeper: Sleeper) -> Self {
        self.sleeper = Some(sleeper);
        self
    }

    pub fn with_failure_observer(mut self, observer: FailureObserver) -> Self {
        self.observer = Some(observer);
        self
    }

    /// True when ACL decisions may be cached per connection.
    pub fn acl_cacheable(&self) -> bool {
        self.authorizers.iter().all(|slot| slot.hook.cacheable())
    }

    /// Whether any authorizer decides reads; when none does, deliveries need no ACL check at all.
    pub fn checks_reads(&self) -> bool {
        self.authorizers.iter().any(|slot| slot.hook.checks_reads())
    }

    pub fn has_outbound_transform(&self) -> bool {
        self.transformers.iter().any(|slot| slot.hook.transforms_outbound())
    }

    /// Polls `call` once before arming a timer, so hooks that answer synchronously (all native ones) never pay
    /// for one.
    async fn attempt<T>(
        &self,
        name: &str,
        timeout: Option<Duration>,
        call: impl Future<Output = Result<T, HookError>>,
    ) -> Attempt<T> {
        let mut call = pin!(call);
        let mut timer: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
        let result = poll_fn(|context| {
            if let Poll::Ready(result) = call.as_mut().poll(context) {
                return Poll::Ready(result);
            }
            let (Some(limit), Some(sleeper)) = (timeout, self.sleeper.as_ref()) else {
                return Poll::Pending;
            };
            let timer = timer.get_or_insert_with(|| sleeper(limit));
            if timer.as_mut().poll(context).is_ready() {
                return Poll::Ready(Err(HookError::Timeout {
                    hook: name.to_owned(),
                    millis: u64::try_from(limit.as_millis()).unwrap_or(u64::MAX),
                }));
            }
            Poll::Pending
        })
        .await;
        match result {
            Ok(value) => Attempt::Done(value),
            Err(error) => {
                if let Some(observer) = &self.observer {
                    observer(&error);
                }
                Attempt::Failed(error)
            }
        }
    }

    pub async fn authenticate(&self, request: &ConnectRequest) -> AuthOutcome {
        self.run_auth(request, None).await
    }

    pub async fn continue_auth(&self, request: &ConnectRequest, step: &AuthStep) -> AuthOutcome {
        self.run_auth(request, Some(step)).await
    }

    async fn run_auth(&self, request: &ConnectRequest, step: Option<&AuthStep>) -> AuthOutcome {
        for slot in &self.authenticators {
            let name = slot.hook.name();
            let attempt = match step {
                None => self.attempt(name, slot.timeout, slot.hook.authenticate(request)).await,
                Some(step) => self.attempt(name, slot.timeout, slot.hook.continue_auth(request, step)).await,
            };
            let decision = match attempt {
                Attempt::Done(decision) => decision,
                Attempt::Failed(error) => match slot.on_failure {
                    FailurePolicy::FailClosed => {
                        return AuthOutcome::Deny {
                            reason: ReasonCode::UNSPECIFIED_ERROR,
                            message: Some(error.to_string()),
                        };
                    }
                    FailurePolicy::PassThrough => AuthDecision::Abstain,
                },
            };
            match decision {
                AuthDecision::Abstain => continue,
                AuthDecision::Allow { attributes } => return AuthOutcome::Allow { attributes },
                AuthDecision::Deny { reason, message } => {
                    return AuthOutcome::Deny { reason, message };
                }
                AuthDecision::Continue { data } => return AuthOutcome::Continue { data },
            }
        }
        match (self.auth_fallback, step) {
            (AuthFallback::Allow, None) => AuthOutcome::Allow { attributes: Default::default() },
            // An AUTH exchange nobody understands cannot succeed by default.
            (_, Some(_)) => AuthOutcome::Deny { reason: ReasonCode::BAD_AUTHENTICATION_METHOD, message: None },
            (AuthFallback::Deny, None) => AuthOutcome::Deny { reason: ReasonCode::NOT_AUTHORIZED, message: None },
        }
    }

    /// Every authorizer is asked; the first denial wins, QoS caps combine to the lowest, and a request nobody
    /// decides is allowed.
    pub async fn authorize(&self, client: &ClientInfo, action: &Action<'_>) -> AclOutcome {
        self.run_authorize(client, action, true).await
    }

    /// The same question asked again of access already granted (a recheck after a reload): only an explicit
    /// denial takes it away. A hook that fails here keeps what it granted, whatever its failure policy, so a
    /// broken or disabled plugin cannot disconnect every client at once.
    pub async fn recheck(&self, client: &ClientInfo, action: &Action<'_>) -> AclOutcome {
        self.run_authorize(client, action, false).await
    }

    async fn run_authorize(&self, client: &ClientInfo, action: &Action<'_>, failures_apply: bool) -> AclOutcome {
        let mut outcome = AclOutcome::Allow { max_qos: QoS::ExactlyOnce };
        let read = action.is_read();
        for slot in &self.authorizers {
            if read && !slot.hook.checks_reads() {
                continue;
            }
            let attempt = self.attempt(slot.hook.name(), slot.timeout, slot.hook.authorize(client, action)).await;
            let decision = match attempt {
                Attempt::Done(decision) => decision,
                Attempt::Failed(_) => failed_authorization(slot, failures_apply),
            };
            combine_authorization(&mut outcome, decision);
            if !outcome.is_allowed() {
                break;
            }
        }
        outcome
    }

    /// Whether [`HookChain::authorize_batch`] saves calls: some authorizer takes batches.
    pub fn batches_authorization(&self) -> bool {
        self.authorizers.iter().any(|slot| slot.hook.authorizes_in_batches())
    }

    /// [`HookChain::authorize`] for the actions of one client's burst, in arrival order, under the same combining
    /// rules: `outcomes` gets one outcome per action. Each hook is asked about the actions no earlier hook denied: a
    /// hook that takes batches once for all of them (its timeout scaled by their number; a failure applies its
    /// policy to each), the others once per action.
    pub async fn authorize_batch(&self, client: &ClientInfo, actions: &[Action<'_>], outcomes: &mut Vec<AclOutcome>) {
        outcomes.clear();
        outcomes.resize(actions.len(), AclOutcome::Allow { max_qos: QoS::ExactlyOnce });
        let mut asked: Vec<usize> = Vec::with_capacity(actions.len());
        let mut batch: Vec<Action<'_>> = Vec::with_capacity(actions.len());
        for slot in &self.authorizers {
            asked.clear();
            asked.extend((0..actions.len()).filter(|&index| {
                outcomes[index].is_allowed() && (!actions[index].is_read() || slot.hook.checks_reads())
            }));
            if asked.len() > 1 && slot.hook.authorizes_in_batches() {
                batch.clear();
                batch.extend(asked.iter().map(|&index| actions[index]));
                let count = u32::try_from(batch.len()).unwrap_or(u32::MAX);
                let timeout = slot.timeout.map(|limit| limit.saturating_mul(count));
                let name = slot.hook.name();
                let decisions = match self.attempt(name, timeout, slot.hook.authorize_batch(client, &batch)).await {
                    Attempt::Done(decisions) if decisions.len() == batch.len() => decisions,
                    Attempt::Done(decisions) => {
                        if let Some(observer) = &self.observer {
                            let reason = format!("{} decisions for {} actions", decisions.len(), batch.len());
                            observer(&HookError::Failed { hook: name.to_owned(), reason });
                        }
                        vec![failed_authorization(slot, true); batch.len()]
                    }
                    Attempt::Failed(_) => vec![failed_authorization(slot, true); batch.len()],
                };
                for (&index, decision) in asked.iter().zip(decisions) {
                    combine_authorization(&mut outcomes[index], decision);
                }
            } else {
                for &index in &asked {
                    let action = &actions[index];
                    let decision =
                        match self.attempt(slot.hook.name(), slot.timeout, slot.hook.authorize(client, action)).await {
                            Attempt::Done(decision) => decision,
                            Attempt::Failed(_) => failed_authorization(slot, true),
                        };
                    combine_authorization(&mut outcomes[index], decision);
                }
            }
        }
    }

    /// Transforms compose in order; the first drop stops the chain.
    pub async fn transform_inbound(&self, client: &ClientInfo, message: &mut Message) -> TransformOutcome {
        self.run_transform(client, message, false).await
    }

    /// Whether [`HookChain::transform_inbound_batch`] saves calls: the chain has one transformer, and it takes
    /// batches. With several, each message goes through the chain on its own, so that a hook that refuses a message
    /// stops the later hooks from seeing it (and the messages after it, when the refusal disconnects).
    pub fn batches_inbound(&self) -> bool {
        matches!(&self.transformers[..], [slot] if slot.hook.transforms_in_batches())
    }

    /// [`HookChain::transform_inbound`] for a burst of one client's messages, in arrival order: `outcomes` gets one
    /// outcome per message, or fewer when the last is a [`TransformOutcome::Reject`] that disconnects. When the
    /// single batching hook fails, its failure policy applies to every message of the batch.
    pub async fn transform_inbound_batch(
        &self,
        client: &ClientInfo,
        messages: &mut [Message],
        outcomes: &mut Vec<TransformOutcome>,
    ) {
        outcomes.clear();
        if !self.batches_inbound() {
            for message in messages.iter_mut() {
                let outcome = self.transform_inbound(client, message).await;
                let stop = matches!(outcome, TransformOutcome::Reject { disconnect: true, .. });
                outcomes.push(outcome);
                if stop {
                    return;
                }
            }
            return;
        }
        let slot = &self.transformers[0];
        let name = slot.hook.name();
        let count = u32::try_from(messages.len()).unwrap_or(u32::MAX);
        let timeout = slot.timeout.map(|limit| limit.saturating_mul(count));
        match self.attempt(name, timeout, slot.hook.transform_inbound_batch(client, messages)).await {
            Attempt::Done(decisions) => outcomes.extend(decisions.into_iter().map(|decision| match decision {
                TransformDecision::Keep | TransformDecision::Modified => TransformOutcome::Deliver,
                TransformDecision::Drop { reason } => TransformOutcome::Drop { hook: name.to_owned(), reason },
                TransformDecision::Reject { reason, message, disconnect } => {
                    TransformOutcome::Reject { hook: name.to_owned(), reason, message, disconnect }
                }
            })),
            Attempt::Failed(error) => outcomes.extend(messages.iter().map(|_| match slot.on_failure {
                FailurePolicy::FailClosed => {
                    TransformOutcome::Drop { hook: name.to_owned(), reason: error.to_string() }
                }
                FailurePolicy::PassThrough => TransformOutcome::Deliver,
            })),
        }
    }

    pub async fn transform_outbound(&self, subscriber: &ClientInfo, message: &mut Message) -> TransformOutcome {
        self.run_transform(subscriber, message, true).await
    }

    async fn run_transform(&self, client: &ClientInfo, message: &mut Message, outbound: bool) -> TransformOutcome {
        for slot in &self.transformers {
            if outbound && !slot.hook.transforms_outbound() {
                continue;
            }
            let name = slot.hook.name();
            // A hook that fails half-way must not leave a half-modified message behind.
            let before = message.clone();
            let attempt = if outbound {
                self.attempt(name, slot.timeout, slot.hook.transform_outbound(client, message)).await
            } else {
                self.attempt(name, slot.timeout, slot.hook.transform_inbound(client, message)).await
            };
            match attempt {
                Attempt::Done(TransformDecision::Keep | TransformDecision::Modified) => {}
                Attempt::Done(TransformDecision::Drop { reason }) => {
                    return TransformOutcome::Drop { hook: name.to_owned(), reason };
                }
                Attempt::Done(TransformDecision::Reject { reason, message: text, disconnect }) => {
                    *message = before;
                    return TransformOutcome::Reject { hook: name.to_owned(), reason, message: text, disconnect };
                }
                Attempt::Failed(error) => {
                    *message = before;
                    if slot.on_failure == FailurePolicy::FailClosed {
                        return TransformOutcome::Drop { hook: name.to_owned(), reason: error.to_string() };
                    }
                }
            }
        }
        TransformOutcome::Deliver
    }

    /// Whether any hook wants to hear of connections starting and ending.
    pub fn observes_sessions(&self) -> bool {
        !self.observers.is_empty()
    }

    /// Tells every session observer, in order, that `client` was accepted, and returns their names for
    /// [`HookChain::session_disconnected`]. A failure is the observer's own (reported to the failure observer like
    /// any other) and stops nothing.
    pub async fn session_connected(&self, client: &ClientInfo) -> Vec<String> {
        let mut told = Vec::with_capacity(self.observers.len());
        for slot in &self.observers {
            let _ = self.attempt(slot.hook.name(), slot.timeout, slot.hook.connected(client)).await;
            told.push(slot.hook.name().to_owned());
        }
        told
    }

    /// Tells the session observers that were told of the connection (`told`, by name) that it ended and why. The
    /// chain may have been reloaded since: an observer added by the reload hears nothing of a connection it never
    /// saw start, and a new version of a plugin hears the end of what its predecessor saw start.
    pub async fn session_disconnected(&self, client: &ClientInfo, cause: DisconnectCause, told: &[String]) {
        for slot in self.observers.iter().filter(|slot| told.iter().any(|name| name == slot.hook.name())) {
            let _ = self.attempt(slot.hook.name(), slot.timeout, slot.hook.disconnected(client, cause)).await;
        }
    }

    /// The first hook that does not abstain decides; with none, the message is forwarded unchanged.
    pub async fn route(&self, direction: RouteDirection, bridge: &str, message: &Message) -> RouteDecision {
        for slot in &self.routers {
            let attempt =
                self.attempt(slot.hook.name(), slot.timeout, slot.hook.route(direction, bridge, message)).await;
            let decision = match attempt {
                Attempt::Done(decision) => decision,
                Attempt::Failed(_) => match slot.on_failure {
                    FailurePolicy::FailClosed => RouteDecision::Drop,
                    FailurePolicy::PassThrough => RouteDecision::Abstain,
                },
            };
            if decision != RouteDecision::Abstain {
                return decision;
            }
        }
        RouteDecision::Forward
    }
}

/// What a failed authorizer decides: its failure policy, except that a recheck (`failures_apply` false) never takes
/// away access already granted.
fn failed_authorization(slot: &HookSlot<dyn Authorizer>, failures_apply: bool) -> AclDecision {
    match slot.on_failure {
        FailurePolicy::FailClosed if failures_apply => AclDecision::Deny(ReasonCode::NOT_AUTHORIZED),
        FailurePolicy::FailClosed | FailurePolicy::PassThrough => AclDecision::Abstain,
    }
}

/// The combining rule of the authorization chain: the first denial wins and QoS caps combine to the lowest.
fn combine_authorization(outcome: &mut AclOutcome, decision: AclDecision) {
    match (outcome, decision) {
        (AclOutcome::Deny(_), _) => {}
        (outcome, AclDecision::Deny(reason)) => *outcome = AclOutcome::Deny(reason),
        (AclOutcome::Allow { max_qos }, AclDecision::AllowMaxQos(cap)) => *max_qos = (*max_qos).min(cap),
        (AclOutcome::Allow { .. }, AclDecision::Allow | AclDecision::Abstain) => {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::task::{Context, Waker};

    use tollgate_protocol::ProtocolVersion;

    use super::*;

    /// Native hooks answer without awaiting anything: one poll finishes the chain.
    fn now<F: Future>(future: F) -> F::Output {
        match pin!(future).as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(value) => value,
            Poll::Pending => panic!("a native hook chain should not wait"),
        }
    }

    struct Broken;

    #[async_trait::async_trait]
    impl Authorizer for Broken {
        fn name(&self) -> &str {
            "broken"
        }

        async fn authorize(&self, _client: &ClientInfo, _action: &Action<'_>) -> Result<AclDecision, HookError> {
            Err(HookError::Failed { hook: "broken".into(), reason: "trapped".into() })
        }
    }

    struct Revoker;

    #[async_trait::async_trait]
    impl Authorizer for Revoker {
        fn name(&self) -> &str {
            "revoker"
        }

        async fn authorize(&self, _client: &ClientInfo, action: &Action<'_>) -> Result<AclDecision, HookError> {
            Ok(match action {
                Action::Session => AclDecision::Deny(ReasonCode::BANNED),
                _ => AclDecision::Allow,
            })
        }
    }

    fn client() -> ClientInfo {
        ClientInfo {
            client_id: "c".into(),
            username: None,
            protocol: ProtocolVersion::V5,
            remote_addr: None,
            listener: "tcp".into(),
            peer: None,
            attributes: Arc::new(BTreeMap::new()),
        }
    }

    fn chain(hook: Arc<dyn Authorizer>) -> HookChain {
        let mut chain = HookChain::default();
        chain.authorizers.push(HookSlot::new(hook, None, FailurePolicy::FailClosed));
        chain
    }

    #[test]
    fn a_failing_hook_denies_new_access_but_never_revokes_granted_access() {
        let broken = chain(Arc::new(Broken));
        let publish = Action::Publish { topic: "t", qos: QoS::AtMostOnce, retain: false };
        assert_eq!(now(broken.authorize(&client(), &publish)), AclOutcome::Deny(ReasonCode::NOT_AUTHORIZED));
        assert!(now(broken.recheck(&client(), &Action::Session)).is_allowed());
        let subscribe = Action::Subscribe { filter: "t", qos: QoS::AtMostOnce, share_group: None };
        assert!(now(broken.recheck(&client(), &subscribe)).is_allowed());
        // An explicit denial does revoke.
        let revoker = chain(Arc::new(Revoker));
        assert_eq!(now(revoker.recheck(&client(), &Action::Session)), AclOutcome::Deny(ReasonCode::BANNED));
        assert!(now(revoker.recheck(&client(), &subscribe)).is_allowed());
    }

    /// Writes what it is told into a shared log; `fails` makes every call an error after logging it.
    struct Watcher {
        name: &'static str,
        fails: bool,
        log: Arc<std::sync::Mutex<Vec<String>>>,
    }

    #[async_trait::async_trait]
    impl SessionObserver for Watcher {
        fn name(&self) -> &str {
            self.name
        }

        async fn connected(&self, client: &ClientInfo) -> Result<(), HookError> {
            self.note(format!("{} connected {}", self.name, client.client_id))
        }

        async fn disconnected(&self, client: &ClientInfo, cause: DisconnectCause) -> Result<(), HookError> {
            self.note(format!("{} disconnected {} {}", self.name, client.client_id, cause.as_str()))
        }
    }

    impl Watcher {
        fn note(&self, line: String) -> Result<(), HookError> {
            self.log.lock().expect("log").push(line);
            if self.fails {
                Err(HookError::Failed { hook: self.name.into(), reason: "trapped".into() })
            } else {
                Ok(())
            }
        }
    }

    #[test]
    fn every_session_observer_is_told_in_order_and_a_failing_one_stops_nothing() {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = failures.clone();
        let mut chain = HookChain::default().with_failure_observer(Arc::new(move |_: &HookError| {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }));
        assert!(!chain.observes_sessions());
        for (name, fails) in [("first", true), ("second", false)] {
            let watcher = Arc::new(Watcher { name, fails, log: log.clone() });
            chain.observers.push(HookSlot::new(watcher, None, FailurePolicy::PassThrough));
        }
        assert!(chain.observes_sessions());
        let told = now(chain.session_connected(&client()));
        assert_eq!(told, ["first", "second"]);
        // An observer added since the connection started hears nothing of its end.
        let late = Arc::new(Watcher { name: "late", fails: false, log: log.clone() });
        chain.observers.push(HookSlot::new(late, None, FailurePolicy::PassThrough));
        now(chain.session_disconnected(&client(), DisconnectCause::KeepAliveTimeout, &told));
        assert_eq!(
            *log.lock().expect("log"),
            [
                "first connected c",
                "second connected c",
                "first disconnected c keep-alive-timeout",
                "second disconnected c keep-alive-timeout"
            ]
        );
        assert_eq!(failures.load(std::sync::atomic::Ordering::Relaxed), 2, "each failure reaches the failure observer");
    }

    /// Denies everything it is asked, and says it never decides reads.
    struct DeniesButNotReads;

    #[async_trait::async_trait]
    impl Authorizer for DeniesButNotReads {
        fn name(&self) -> &str {
            "denies-but-not-reads"
        }

        async fn authorize(&self, _client: &ClientInfo, _action: &Action<'_>) -> Result<AclDecision, HookError> {
            Ok(AclDecision::Deny(ReasonCode::NOT_AUTHORIZED))
        }

        fn checks_reads(&self) -> bool {
            false
        }
    }

    /// Upper-cases payloads; refuses `refuse/` topics (disconnecting on `cut/`); fails the whole call on any
    /// `trap/` topic. With `batches`, it asks for bursts, and counts the calls either way.
    struct Shouter {
        batches: bool,
        calls: std::sync::atomic::AtomicUsize,
    }

    impl Shouter {
        fn new(batches: bool) -> Arc<Self> {
            Arc::new(Shouter { batches, calls: std::sync::atomic::AtomicUsize::new(0) })
        }

        fn calls(&self) -> usize {
            self.calls.load(std::sync::atomic::Ordering::Relaxed)
        }

        fn decide(message: &mut Message) -> TransformDecision {
            if message.topic.starts_with("refuse/") || message.topic.starts_with("cut/") {
                return TransformDecision::Reject {
                    reason: ReasonCode::NOT_AUTHORIZED,
                    message: "no".into(),
                    disconnect: message.topic.starts_with("cut/"),
                };
            }
            message.payload = message.payload.to_ascii_uppercase().into();
            TransformDecision::Modified
        }
    }

    #[async_trait::async_trait]
    impl Transformer for Shouter {
        fn name(&self) -> &str {
            "shouter"
        }

        async fn transform_inbound(
            &self,
            _client: &ClientInfo,
            message: &mut Message,
        ) -> Result<TransformDecision, HookError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if message.topic.starts_with("trap/") {
                return Err(HookError::Failed { hook: "shouter".into(), reason: "trapped".into() });
            }
            Ok(Self::decide(message))
        }

        fn transforms_in_batches(&self) -> bool {
            self.batches
        }

        async fn transform_inbound_batch(
            &self,
            _client: &ClientInfo,
            messages: &mut [Message],
        ) -> Result<Vec<TransformDecision>, HookError> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if messages.iter().any(|message| message.topic.starts_with("trap/")) {
                return Err(HookError::Failed { hook: "shouter".into(), reason: "trapped".into() });
            }
            let mut decisions = Vec::new();
            for message in messages.iter_mut() {
                let decision = Self::decide(message);
                let stop = matches!(decision, TransformDecision::Reject { disconnect: true, .. });
                decisions.push(decision);
                if stop {
                    break;
                }
            }
            Ok(decisions)
        }
    }

    fn messages(topics: &[&str]) -> Vec<Message> {
        topics
            .iter()
            .map(|topic| Message { topic: (*topic).into(), payload: "x".into(), ..Message::default() })
            .collect()
    }

    fn transform_chain(hooks: &[(Arc<Shouter>, FailurePolicy)]) -> HookChain {
        let mut chain = HookChain::default();
        for (hook, policy) in hooks {
            chain.transformers.push(HookSlot::new(hook.clone() as Arc<dyn Transformer>, None, *policy));
        }
        chain
    }

    #[test]
    fn a_single_batching_transform_gets_the_burst_in_one_call() {
        let shouter = Shouter::new(true);
        let chain = transform_chain(&[(shouter.clone(), FailurePolicy::PassThrough)]);
        assert!(chain.batches_inbound());
        let mut burst = messages(&["a", "refuse/b", "c", "cut/d", "e"]);
        let mut outcomes = Vec::new();
        now(chain.transform_inbound_batch(&client(), &mut burst, &mut outcomes));
        assert_eq!(shouter.calls(), 1);
        let refused = |disconnect| TransformOutcome::Reject {
            hook: "shouter".into(),
            reason: ReasonCode::NOT_AUTHORIZED,
            message: "no".into(),
            disconnect,
        };
        // Stopped at the refusal that disconnects: `e` gets no outcome.
        assert_eq!(outcomes, [TransformOutcome::Deliver, refused(false), TransformOutcome::Deliver, refused(true)]);
        assert_eq!(
            (&burst[0].payload[..], &burst[2].payload[..], &burst[4].payload[..]),
            (&b"X"[..], &b"X"[..], &b"x"[..])
        );
    }

    #[test]
    fn a_failed_batch_applies_the_failure_policy_to_every_message() {
        for (policy, expected) in [
            (FailurePolicy::PassThrough, TransformOutcome::Deliver),
            (
                FailurePolicy::FailClosed,
                TransformOutcome::Drop { hook: "shouter".into(), reason: "hook shouter failed: trapped".into() },
            ),
        ] {
            let chain = transform_chain(&[(Shouter::new(true), policy)]);
            let mut burst = messages(&["a", "trap/b", "c"]);
            let mut outcomes = Vec::new();
            now(chain.transform_inbound_batch(&client(), &mut burst, &mut outcomes));
            assert_eq!(outcomes, vec![expected; 3], "{policy:?}");
            assert!(burst.iter().all(|message| &message.payload[..] == b"x"), "unchanged after a failure");
        }
    }

    #[test]
    fn several_transforms_take_a_burst_one_message_at_a_time() {
        let (first, second) = (Shouter::new(true), Shouter::new(true));
        let chain = transform_chain(&[
            (first.clone(), FailurePolicy::PassThrough),
            (second.clone(), FailurePolicy::PassThrough),
        ]);
        assert!(!chain.batches_inbound(), "a refusal by one hook must keep the message from the next");
        let mut burst = messages(&["a", "cut/b", "c"]);
        let mut outcomes = Vec::new();
        now(chain.transform_inbound_batch(&client(), &mut burst, &mut outcomes));
        assert_eq!(outcomes.len(), 2, "stopped at the refusal that disconnects: {outcomes:?}");
        // `a` through both hooks, `cut/b` refused by the first: the second never saw it, and nobody saw `c`.
        assert_eq!((first.calls(), second.calls()), (2, 1));
        assert_eq!(&burst[0].payload[..], b"X");
        assert!(!transform_chain(&[(Shouter::new(false), FailurePolicy::PassThrough)]).batches_inbound());
    }

    /// Only `transform_inbound`: the trait's own batch loop.
    struct OneByOne(Arc<Shouter>);

    #[async_trait::async_trait]
    impl Transformer for OneByOne {
        fn name(&self) -> &str {
            "one-by-one"
        }

        async fn transform_inbound(
            &self,
            client: &ClientInfo,
            message: &mut Message,
        ) -> Result<TransformDecision, HookError> {
            self.0.transform_inbound(client, message).await
        }
    }

    #[test]
    fn the_default_batch_is_one_call_per_message_and_changes_nothing_on_failure() {
        let hook = OneByOne(Shouter::new(false));
        let mut burst = messages(&["a", "refuse/b", "cut/c", "d"]);
        let decisions = now(hook.transform_inbound_batch(&client(), &mut burst)).expect("no failure");
        assert_eq!(decisions.len(), 3, "stops after the refusal that disconnects");
        assert_eq!(hook.0.calls(), 3);
        assert_eq!(&burst[0].payload[..], b"X");
        let mut burst = messages(&["a", "trap/b"]);
        assert!(now(hook.transform_inbound_batch(&client(), &mut burst)).is_err());
        assert!(burst.iter().all(|message| &message.payload[..] == b"x"), "the first message was put back");
    }

    #[test]
    fn reads_skip_hooks_that_do_not_check_reads() {
        let mut chain = chain(Arc::new(DeniesButNotReads));
        assert!(!chain.checks_reads());
        let receive = Action::Receive { topic: "t" };
        assert!(now(chain.authorize(&client(), &receive)).is_allowed());
        assert!(now(chain.authorize(&client(), &Action::ReceiveRetained { topic: "t" })).is_allowed());
        let publish = Action::Publish { topic: "t", qos: QoS::AtMostOnce, retain: false };
        assert!(!now(chain.authorize(&client(), &publish)).is_allowed());
        // A hook that does check reads still decides them, whatever else is in the chain.
        chain.authorizers.push(HookSlot::new(Arc::new(Broken), None, FailurePolicy::FailClosed));
        assert!(chain.checks_reads());
        assert_eq!(now(chain.authorize(&client(), &receive)), AclOutcome::Deny(ReasonCode::NOT_AUTHORIZED));
    }

    /// Decides by topic prefix: `deny/` denied, `cap/` capped at QoS 0, `fail/` fails the whole call, anything else
    /// abstains. With `batches`, it takes bursts; it records what each call was asked.
    struct Prefixes {
        batches: bool,
        calls: std::sync::Mutex<Vec<Vec<String>>>,
    }

    impl Prefixes {
        fn new(batches: bool) -> Arc<Self> {
            Arc::new(Prefixes { batches, calls: std::sync::Mutex::new(Vec::new()) })
        }

        fn calls(&self) -> Vec<Vec<String>> {
            self.calls.lock().map(|calls| calls.clone()).unwrap_or_default()
        }

        fn decide(action: &Action<'_>) -> Result<AclDecision, HookError> {
            let Action::Publish { topic, .. } = action else { return Ok(AclDecision::Abstain) };
            Ok(match topic.split('/').next() {
                Some("deny") => AclDecision::Deny(ReasonCode::NOT_AUTHORIZED),
                Some("cap") => AclDecision::AllowMaxQos(QoS::AtMostOnce),
                Some("fail") => return Err(HookError::Failed { hook: "prefixes".into(), reason: "trapped".into() }),
                _ => AclDecision::Abstain,
            })
        }

        fn record(&self, actions: &[Action<'_>]) {
            let topics = actions
                .iter()
                .map(|action| match action {
                    Action::Publish { topic, .. } => (*topic).to_owned(),
                    other => format!("{other:?}"),
                })
                .collect();
            if let Ok(mut calls) = self.calls.lock() {
                calls.push(topics);
            }
        }
    }

    #[async_trait::async_trait]
    impl Authorizer for Prefixes {
        fn name(&self) -> &str {
            "prefixes"
        }

        async fn authorize(&self, _client: &ClientInfo, action: &Action<'_>) -> Result<AclDecision, HookError> {
            self.record(std::slice::from_ref(action));
            Self::decide(action)
        }

        fn authorizes_in_batches(&self) -> bool {
            self.batches
        }

        async fn authorize_batch(
            &self,
            _client: &ClientInfo,
            actions: &[Action<'_>],
        ) -> Result<Vec<AclDecision>, HookError> {
            self.record(actions);
            actions.iter().map(Self::decide).collect()
        }
    }

    fn publishes<'a>(topics: &[&'a str]) -> Vec<Action<'a>> {
        topics.iter().map(|&topic| Action::Publish { topic, qos: QoS::ExactlyOnce, retain: false }).collect()
    }

    fn batch_outcomes(chain: &HookChain, actions: &[Action<'_>]) -> Vec<AclOutcome> {
        let mut outcomes = Vec::new();
        now(chain.authorize_batch(&client(), actions, &mut outcomes));
        outcomes
    }

    #[test]
    fn a_batch_is_decided_as_each_action_alone_would_be() {
        let (first, second) = (Prefixes::new(true), Prefixes::new(false));
        let mut three = chain(first.clone());
        three.authorizers.push(HookSlot::new(second.clone(), None, FailurePolicy::FailClosed));
        three.authorizers.push(HookSlot::new(Arc::new(DeniesButNotReads), None, FailurePolicy::FailClosed));
        assert!(three.batches_authorization());
        let actions = publishes(&["a/1", "deny/2", "cap/3"]);
        let batched = batch_outcomes(&three, &actions);
        let alone: Vec<AclOutcome> = actions.iter().map(|action| now(three.authorize(&client(), action))).collect();
        assert_eq!(batched, alone);
        // The last hook denies everything that reaches it.
        assert_eq!(batched, vec![AclOutcome::Deny(ReasonCode::NOT_AUTHORIZED); 3]);

        // Without the denying hook: caps combine, and a later hook never sees what an earlier one denied.
        let (first, second) = (Prefixes::new(true), Prefixes::new(false));
        let mut two = chain(first.clone());
        two.authorizers.push(HookSlot::new(second.clone(), None, FailurePolicy::FailClosed));
        let outcomes = batch_outcomes(&two, &publishes(&["a/1", "deny/2", "cap/3"]));
        assert_eq!(
            outcomes,
            vec![
                AclOutcome::Allow { max_qos: QoS::ExactlyOnce },
                AclOutcome::Deny(ReasonCode::NOT_AUTHORIZED),
                AclOutcome::Allow { max_qos: QoS::AtMostOnce },
            ]
        );
        assert_eq!(first.calls(), vec![vec!["a/1", "deny/2", "cap/3"]], "one call for the burst");
        assert_eq!(second.calls(), vec![vec!["a/1"], vec!["cap/3"]], "one call per action it is asked about");
    }

    #[test]
    fn a_failed_batch_applies_the_failure_policy_to_every_action() {
        let actions = publishes(&["a/1", "fail/2", "cap/3"]);
        let closed = chain(Prefixes::new(true));
        assert_eq!(batch_outcomes(&closed, &actions), vec![AclOutcome::Deny(ReasonCode::NOT_AUTHORIZED); 3]);
        let mut open = HookChain::default();
        open.authorizers.push(HookSlot::new(Prefixes::new(true), None, FailurePolicy::PassThrough));
        assert_eq!(batch_outcomes(&open, &actions), vec![AclOutcome::Allow { max_qos: QoS::ExactlyOnce }; 3]);
        // One at a time, only the failing action is affected.
        let single = chain(Prefixes::new(false));
        assert_eq!(
            batch_outcomes(&single, &actions),
            vec![
                AclOutcome::Allow { max_qos: QoS::ExactlyOnce },
                AclOutcome::Deny(ReasonCode::NOT_AUTHORIZED),
                AclOutcome::Allow { max_qos: QoS::AtMostOnce },
            ]
        );
    }

    /// Answers one decision too few: a broken batch contract.
    struct ShortAnswer;

    #[async_trait::async_trait]
    impl Authorizer for ShortAnswer {
        fn name(&self) -> &str {
            "short"
        }

        async fn authorize(&self, _client: &ClientInfo, _action: &Action<'_>) -> Result<AclDecision, HookError> {
            Ok(AclDecision::Allow)
        }

        fn authorizes_in_batches(&self) -> bool {
            true
        }

        async fn authorize_batch(
            &self,
            _client: &ClientInfo,
            actions: &[Action<'_>],
        ) -> Result<Vec<AclDecision>, HookError> {
            Ok(vec![AclDecision::Allow; actions.len() - 1])
        }
    }

    #[test]
    fn a_batch_answered_with_the_wrong_number_of_decisions_counts_as_a_failure() {
        let actions = publishes(&["a/1", "a/2"]);
        assert_eq!(
            batch_outcomes(&chain(Arc::new(ShortAnswer)), &actions),
            vec![AclOutcome::Deny(ReasonCode::NOT_AUTHORIZED); 2]
        );
        // A single action is asked alone, not as a batch of one.
        assert!(batch_outcomes(&chain(Arc::new(ShortAnswer)), &actions[..1])[0].is_allowed());
    }
}
