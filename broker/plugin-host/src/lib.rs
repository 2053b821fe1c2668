//! The plugin host: runs policy plugins — WebAssembly components (wasmtime) and Luau scripts (mlua) — on the hook
//! contract of `tollgate-hooks`. This is the only crate that links a guest runtime.
//!
//! Containment: every call runs with a CPU budget (epoch ticks / the Lua interrupt), a memory cap and a wall-clock
//! timeout. A guest yields to the worker's other connections every millisecond, so a looping plugin slows its own
//! caller only. A failed call drops the instance that ran it, the hook's failure policy decides, and a plugin that
//! keeps failing is disabled with backoff ([`shared::CRASH_LOOP_FAILURES`]).

pub mod clock;
pub mod events;
pub mod latency;
mod lua;
pub mod shared;
pub mod spec;
pub mod ticker;
mod wasm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tollgate_hooks::{
    AclDecision, Action, AuthDecision, AuthStep, Authenticator, Authorizer, BridgeRouter, ClientInfo, ConnectRequest,
    DisconnectCause, HookError, HookSlot, Message, QoS, RouteDecision, RouteDirection, SessionObserver,
    TransformDecision, Transformer,
};

pub use shared::{Failure, PluginMetrics, PluginShared};
pub use spec::{DEFAULT_STATE_SYNC, HookKind, Limits, PluginKind, PluginSpec};

/// A plugin that could not be loaded, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("plugin {plugin:?}: {reason}")]
pub struct LoadError {
    pub plugin: String,
    pub reason: String,
}

/// What a plugin's authorization hook is asked. Delivery checks (`Action::Receive*`) never reach plugins: a
/// plugin decides at SUBSCRIBE.
#[derive(Clone, Copy, Debug)]
pub(crate) enum AclRequest<'a> {
    /// A PUBLISH, or the will of a CONNECT.
    Publish {
        topic: &'a str,
        qos: QoS,
        retain: bool,
        will: bool,
    },
    Subscribe {
        filter: &'a str,
        qos: QoS,
        share_group: Option<&'a str>,
    },
    /// Whether the client keeps its session (a recheck after a policy change).
    Session,
}

impl<'a> AclRequest<'a> {
    fn from_action(action: &Action<'a>) -> Option<Self> {
        match *action {
            Action::Publish { topic, qos, retain } => Some(AclRequest::Publish { topic, qos, retain, will: false }),
            Action::Will { topic, qos, retain } => Some(AclRequest::Publish { topic, qos, retain, will: true }),
            Action::Subscribe { filter, qos, share_group } => Some(AclRequest::Subscribe { filter, qos, share_group }),
            Action::Session => Some(AclRequest::Session),
            Action::Receive { .. } | Action::ReceiveRetained { .. } => None,
        }
    }
}

/// A PUBLISH of a burst, as a batch of authorization asks about it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PublishRequest<'a> {
    topic: &'a str,
    qos: QoS,
    retain: bool,
}

/// What both runtimes offer the adapters below. Statically dispatched (see [`AnyRuntime`]): behind `dyn`, every
/// call would box its future a second time, the guest call's large state copied into a fresh allocation.
pub(crate) trait Runtime: Send + Sync {
    fn shared(&self) -> &Arc<PluginShared>;
    fn provided_hooks(&self) -> Vec<HookKind>;
    async fn authenticate(&self, request: &ConnectRequest) -> Result<AuthDecision, Failure>;
    async fn authorize(&self, client: &ClientInfo, request: AclRequest<'_>) -> Result<AclDecision, Failure>;
    /// `authorize_publish` for a burst of one client's PUBLISHes: one decision per request, in order.
    async fn authorize_publish_batch(
        &self,
        client: &ClientInfo,
        requests: &[PublishRequest<'_>],
    ) -> Result<Vec<AclDecision>, Failure>;
    async fn transform(&self, client: &ClientInfo, message: &mut Message) -> Result<TransformDecision, Failure>;
    async fn deliver(&self, subscriber: &ClientInfo, message: &mut Message) -> Result<TransformDecision, Failure>;
    async fn route(&self, direction: RouteDirection, bridge: &str, message: &Message)
    -> Result<RouteDecision, Failure>;
    /// `on-connected` (`cause` none) or `on-disconnected`.
    async fn session_event(&self, client: &ClientInfo, cause: Option<DisconnectCause>) -> Result<(), Failure>;
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}

/// A topic a plugin hands back must be one the broker could have received.
pub(crate) fn check_topic(topic: &str) -> Result<(), String> {
    if topic.is_empty() {
        return Err("the topic is empty".to_owned());
    }
    if topic.contains(['+', '#', '\0']) {
        return Err(format!("the topic {topic:?} contains a wildcard or NUL"));
    }
    if topic.len() > usize::from(u16::MAX) {
        return Err("the topic is longer than 65535 bytes".to_owned());
    }
    Ok(())
}

/// One of the two runtimes, so hook adapters call them without a boxed future per call.
#[derive(Clone)]
enum AnyRuntime {
    Wasm(Arc<wasm::WasmPlugin>),
    Lua(Arc<lua::LuaPlugin>),
}

/// Runs `$body` with `$plugin` bound to whichever runtime `$runtime` holds.
macro_rules! on_runtime {
    ($runtime:expr, $plugin:ident => $body:expr) => {
        match $runtime {
            AnyRuntime::Wasm($plugin) => $body,
            AnyRuntime::Lua($plugin) => $body,
        }
    };
}

impl AnyRuntime {
    fn shared(&self) -> &Arc<PluginShared> {
        on_runtime!(self, plugin => plugin.shared())
    }

    fn provided_hooks(&self) -> Vec<HookKind> {
        on_runtime!(self, plugin => plugin.provided_hooks())
    }
}

/// A plugin ready to be put into a hook chain.
pub struct LoadedPlugin {
    pub spec: PluginSpec,
    runtime: AnyRuntime,
    /// The hooks attached: the configured ones, or all the plugin provides.
    pub hooks: Vec<HookKind>,
}

impl std::fmt::Debug for LoadedPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPlugin").field("name", &self.spec.name).field("hooks", &self.hooks).finish()
    }
}

/// The hook slots of one plugin, for the chain.
#[derive(Default)]
pub struct PluginSlots {
    pub authenticator: Option<HookSlot<dyn Authenticator>>,
    pub authorizer: Option<HookSlot<dyn Authorizer>>,
    pub transformer: Option<HookSlot<dyn Transformer>>,
    pub router: Option<HookSlot<dyn BridgeRouter>>,
    pub observer: Option<HookSlot<dyn SessionObserver>>,
}

impl LoadedPlugin {
    /// Loads and starts one plugin: compiles (or reads the cached compilation), instantiates once, calls `init`,
    /// and checks that the configured hooks are ones the plugin provides.
    pub async fn load(spec: PluginSpec, cache_dir: Option<PathBuf>) -> Result<LoadedPlugin, LoadError> {
        Self::load_after(spec, cache_dir, None).await
    }

    /// Loads a new version of `previous`, which hands over its key-value table (see
    /// [`PluginShared::keeping_state_of`]).
    pub async fn load_after(
        spec: PluginSpec,
        cache_dir: Option<PathBuf>,
        previous: Option<&LoadedPlugin>,
    ) -> Result<LoadedPlugin, LoadError> {
        let previous = previous.map(|plugin| &**plugin.shared());
        let runtime = match spec.kind {
            PluginKind::Wasm => AnyRuntime::Wasm(Arc::new(wasm::WasmPlugin::load(&spec, cache_dir, previous).await?)),
            PluginKind::Lua => AnyRuntime::Lua(Arc::new(lua::LuaPlugin::load(&spec, previous).await?)),
        };
        // What `init` wrote durably.
        runtime.shared().flush_durable();
        let provided = runtime.provided_hooks();
        let hooks = match &spec.hooks {
            None => provided,
            Some(wanted) => {
                if let Some(missing) = wanted.iter().find(|hook| !provided.contains(hook)) {
                    let offered: Vec<&str> = provided.iter().map(|hook| hook.as_str()).collect();
                    return Err(LoadError {
                        plugin: spec.name.clone(),
                        reason: format!(
                            "hooks includes {missing}, which the plugin does not implement (it implements: {})",
                            if offered.is_empty() { "nothing".to_owned() } else { offered.join(", ") }
                        ),
                    });
                }
                wanted.clone()
            }
        };
        Ok(LoadedPlugin { spec, runtime, hooks })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn shared(&self) -> &Arc<PluginShared> {
        self.runtime.shared()
    }

    /// One adapter per attached hook. The adapters enforce the wall-clock timeout themselves (so a timeout counts
    /// towards crash-loop protection), hence no chain-level timer.
    pub fn slots(&self) -> PluginSlots {
        let adapter = self.adapter(self.spec.cache_decisions, &self.hooks);
        let mut slots = PluginSlots::default();
        for hook in &self.hooks {
            let policy = self.spec.failure_policy(*hook);
            match hook {
                HookKind::Authenticate => slots.authenticator = Some(HookSlot::new(adapter.clone(), None, policy)),
                HookKind::Authorize => slots.authorizer = Some(HookSlot::new(adapter.clone(), None, policy)),
                // One transformer slot for both directions; with both hooks attached, `transform`'s failure
                // policy is the slot's.
                HookKind::Transform => slots.transformer = Some(HookSlot::new(adapter.clone(), None, policy)),
                HookKind::Deliver => {
                    if !self.hooks.contains(&HookKind::Transform) {
                        slots.transformer = Some(HookSlot::new(adapter.clone(), None, policy));
                    }
                }
                HookKind::Route => slots.router = Some(HookSlot::new(adapter.clone(), None, policy)),
                HookKind::Session => slots.observer = Some(HookSlot::new(adapter.clone(), None, policy)),
            }
        }
        slots
    }

    /// Calls straight into the plugin, bypassing chain and policy: for `tollgate plugin test`.
    pub fn hook(&self) -> Arc<PluginHook> {
        self.adapter(false, &HookKind::ALL)
    }

    /// The adapter for the `attached` hooks (which directions its transformer slot serves).
    fn adapter(&self, cacheable: bool, attached: &[HookKind]) -> Arc<PluginHook> {
        Arc::new(PluginHook {
            name: self.spec.name.clone(),
            runtime: self.runtime.clone(),
            timeout: self.spec.limits.call_timeout,
            cacheable,
            inbound: attached.contains(&HookKind::Transform),
            outbound: attached.contains(&HookKind::Deliver),
            batches: on_runtime!(&self.runtime, plugin => plugin.batches_inbound()),
            batches_authorization: on_runtime!(&self.runtime, plugin => plugin.batches_authorization()),
        })
    }
}

pin_project_lite::pin_project! {
    /// One plugin call under its wall-clock limit, counted and timed. A hand-written future rather than an
    /// `async fn`: the guest call's future is kilobytes, and an `async fn` taking it as an argument keeps that
    /// argument and the future it awaits side by side (about three times the size, all copied on every call).
    /// The timer is armed only if the first poll does not finish the call: most calls end in their first poll
    /// (the guest yields only at an epoch tick), and a tokio timer per call (a runtime handle clone, a clock read,
    /// 112 bytes moved) was a measurable part of a call's cost.
    struct Guarded<'a, F> {
        #[pin]
        call: F,
        hook: HookKind,
        adapter: &'a PluginHook,
        // How many messages the call carries: a batch gets each one's time, and counts as that many calls.
        messages: u32,
        started: tokio::time::Instant,
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        // Set when crash-loop protection has disabled the plugin: the answer, without calling it.
        disabled: Option<Failure>,
    }
}

impl<T, F: Future<Output = Result<T, Failure>>> Future for Guarded<'_, F> {
    type Output = Result<T, HookError>;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(failure) = this.disabled.take() {
            return Poll::Ready(Err(this.adapter.failed(*this.hook, failure)));
        }
        let result = match this.call.poll(cx) {
            Poll::Ready(result) => result,
            Poll::Pending => {
                let limit = this.adapter.timeout.saturating_mul(*this.messages);
                let deadline = *this.started + limit;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                Err(Failure::Timeout(u64::try_from(limit.as_millis()).unwrap_or(u64::MAX)))
            }
        };
        let shared = this.adapter.runtime.shared();
        // Before the broker acts on the answer: what the call wrote durably is in the state file by then.
        shared.flush_durable();
        // What one message of a batch cost, counted once for each.
        let messages = (*this.messages).max(1);
        shared.metrics.latency_of(*this.hook).record_many(this.started.elapsed() / messages, u64::from(messages));
        Poll::Ready(result.map_err(|failure| this.adapter.failed(*this.hook, failure)))
    }
}

/// The adapter between the hook contract and a plugin runtime.
pub struct PluginHook {
    name: String,
    runtime: AnyRuntime,
    timeout: Duration,
    cacheable: bool,
    /// The plugin's transformer slot serves `transform` (inbound) and `deliver` (outbound): which are attached.
    inbound: bool,
    outbound: bool,
    /// Bursts of inbound messages are transformed in one call: the WASM plugin exports `transform-batch`, or the Lua
    /// script has `on_publish` (the host loops over the burst inside the VM).
    batches: bool,
    /// PUBLISHes of a burst can be authorized in one call: the WASM plugin exports `authz-batch`, or the Lua script
    /// has `authorize_publish` (the host loops over the burst inside the VM).
    batches_authorization: bool,
}

impl PluginHook {
    /// Calls the plugin through [`Guarded`], or answers at once if crash-loop protection has disabled it.
    fn guarded<T, F: Future<Output = Result<T, Failure>>>(&self, hook: HookKind, call: F) -> Guarded<'_, F> {
        self.guarded_batch(hook, 1, call)
    }

    fn guarded_batch<T, F: Future<Output = Result<T, Failure>>>(
        &self,
        hook: HookKind,
        messages: u32,
        call: F,
    ) -> Guarded<'_, F> {
        let shared = self.runtime.shared();
        shared.metrics.calls.add(u64::from(messages));
        shared.metrics.invocations.add(1);
        Guarded {
            call,
            hook,
            adapter: self,
            messages,
            started: tokio::time::Instant::now(),
            timer: None,
            disabled: shared.check_enabled().err(),
        }
    }

    fn failed(&self, hook: HookKind, failure: Failure) -> HookError {
        self.runtime.shared().record_failure(hook.as_str(), &failure);
        HookError::Failed { hook: format!("{} ({hook})", self.name), reason: failure.to_string() }
    }
}

#[async_trait]
impl Authenticator for PluginHook {
    fn name(&self) -> &str {
        &self.name
    }

    async fn authenticate(&self, request: &ConnectRequest) -> Result<AuthDecision, HookError> {
        on_runtime!(&self.runtime, plugin => self.guarded(HookKind::Authenticate, plugin.authenticate(request)).await)
    }

    async fn continue_auth(&self, request: &ConnectRequest, step: &AuthStep) -> Result<AuthDecision, HookError> {
        let mut request = request.clone();
        request.authentication_method = Some(step.method.clone());
        request.authentication_data = step.data.clone();
        on_runtime!(&self.runtime, plugin => self.guarded(HookKind::Authenticate, plugin.authenticate(&request)).await)
    }
}

#[async_trait]
impl Authorizer for PluginHook {
    fn name(&self) -> &str {
        &self.name
    }

    async fn authorize(&self, client: &ClientInfo, action: &Action<'_>) -> Result<AclDecision, HookError> {
        let Some(request) = AclRequest::from_action(action) else { return Ok(AclDecision::Abstain) };
        on_runtime!(&self.runtime, plugin => self.guarded(HookKind::Authorize, plugin.authorize(client, request)).await)
    }

    fn cacheable(&self) -> bool {
        self.cacheable
    }

    fn authorizes_in_batches(&self) -> bool {
        self.batches_authorization
    }

    async fn authorize_batch(
        &self,
        client: &ClientInfo,
        actions: &[Action<'_>],
    ) -> Result<Vec<AclDecision>, HookError> {
        let requests: Option<Vec<PublishRequest<'_>>> = actions
            .iter()
            .map(|action| match *action {
                Action::Publish { topic, qos, retain } => Some(PublishRequest { topic, qos, retain }),
                _ => None,
            })
            .collect();
        match requests {
            Some(requests) if self.batches_authorization => {
                let count = u32::try_from(requests.len()).unwrap_or(u32::MAX);
                // Each runtime answers one decision per request or fails (a wrong count is a bad answer).
                on_runtime!(&self.runtime, plugin => {
                    self.guarded_batch(HookKind::Authorize, count, plugin.authorize_publish_batch(client, &requests)).await
                })
            }
            _ => tollgate_hooks::authorize_one_by_one(self, client, actions).await,
        }
    }

    /// The plugin contract has no read hook ([`AclRequest::from_action`] abstains on reads).
    fn checks_reads(&self) -> bool {
        false
    }
}

#[async_trait]
impl Transformer for PluginHook {
    fn name(&self) -> &str {
        &self.name
    }

    async fn transform_inbound(
        &self,
        client: &ClientInfo,
        message: &mut Message,
    ) -> Result<TransformDecision, HookError> {
        if !self.inbound {
            return Ok(TransformDecision::Keep);
        }
        on_runtime!(&self.runtime, plugin => self.guarded(HookKind::Transform, plugin.transform(client, message)).await)
    }

    fn transforms_in_batches(&self) -> bool {
        self.inbound && self.batches
    }

    async fn transform_inbound_batch(
        &self,
        client: &ClientInfo,
        messages: &mut [Message],
    ) -> Result<Vec<TransformDecision>, HookError> {
        if !self.transforms_in_batches() {
            return tollgate_hooks::transform_one_by_one(self, client, messages).await;
        }
        let count = u32::try_from(messages.len()).unwrap_or(u32::MAX);
        on_runtime!(&self.runtime, plugin => {
            self.guarded_batch(HookKind::Transform, count, plugin.transform_batch(client, messages)).await
        })
    }

    async fn transform_outbound(
        &self,
        subscriber: &ClientInfo,
        message: &mut Message,
    ) -> Result<TransformDecision, HookError> {
        on_runtime!(&self.runtime, plugin => self.guarded(HookKind::Deliver, plugin.deliver(subscriber, message)).await)
    }

    fn transforms_outbound(&self) -> bool {
        self.outbound
    }
}

#[async_trait]
impl BridgeRouter for PluginHook {
    fn name(&self) -> &str {
        &self.name
    }

    async fn route(
        &self,
        direction: RouteDirection,
        bridge: &str,
        message: &Message,
    ) -> Result<RouteDecision, HookError> {
        on_runtime!(&self.runtime, plugin => self.guarded(HookKind::Route, plugin.route(direction, bridge, message)).await)
    }
}

#[async_trait]
impl SessionObserver for PluginHook {
    fn name(&self) -> &str {
        &self.name
    }

    async fn connected(&self, client: &ClientInfo) -> Result<(), HookError> {
        on_runtime!(&self.runtime, plugin => self.guarded(HookKind::Session, plugin.session_event(client, None)).await)
    }

    async fn disconnected(&self, client: &ClientInfo, cause: DisconnectCause) -> Result<(), HookError> {
        on_runtime!(&self.runtime, plugin => self.guarded(HookKind::Session, plugin.session_event(client, Some(cause))).await)
    }
}

/// What identifies a plugin version: its configuration and its file. A reload reuses a plugin whose fingerprint
/// did not change, with its instances; a changed one gets new instances and keeps its key-value table.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint {
    spec: String,
    /// The plugin file's stamp.
    file: FileStamp,
    /// The stamp of each file the plugin reads through the broker.
    files: Vec<FileStamp>,
    /// Secrets are not in the spec's `Debug` output; a changed secret must still count as a change.
    secrets: Vec<u8>,
}

/// A file's modification time and size, `None` where unreadable.
type FileStamp = (Option<SystemTime>, Option<u64>);

fn stamp(path: &std::path::Path) -> FileStamp {
    let metadata = std::fs::metadata(path).ok();
    (metadata.as_ref().and_then(|metadata| metadata.modified().ok()), metadata.map(|metadata| metadata.len()))
}

impl Fingerprint {
    fn of(spec: &PluginSpec) -> Self {
        let mut secrets = Vec::new();
        for (id, secret) in &spec.secrets {
            secrets.extend_from_slice(id.as_bytes());
            secrets.push(0);
            secrets.extend_from_slice(secret);
            secrets.push(0);
        }
        Fingerprint {
            spec: format!("{spec:?}"),
            file: stamp(&spec.path),
            files: spec.files.values().map(|path| stamp(path)).collect(),
            secrets: PluginShared::sha256(&secrets),
        }
    }
}

/// Keeps the loaded plugins across reloads.
#[derive(Default)]
pub struct PluginHost {
    cache_dir: Option<PathBuf>,
    loaded: Mutex<HashMap<String, (Fingerprint, Arc<LoadedPlugin>)>>,
}

/// The outcome of loading the configured plugins.
pub struct LoadReport {
    /// In configuration order.
    pub plugins: Vec<Arc<LoadedPlugin>>,
    /// Plugins that failed and kept their previous version (reload only).
    pub kept_previous: Vec<LoadError>,
}

impl PluginHost {
    pub fn new(cache_dir: Option<PathBuf>) -> Self {
        Self { cache_dir, loaded: Mutex::new(HashMap::new()) }
    }

    /// The plugins in use since the last successful load, by name.
    pub fn plugins(&self) -> Vec<Arc<LoadedPlugin>> {
        let loaded = self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut plugins: Vec<_> = loaded.values().map(|(_, plugin)| plugin.clone()).collect();
        plugins.sort_by(|a, b| a.name().cmp(b.name()));
        plugins
    }

    /// Loads what changed. A plugin that fails keeps its previous version when it had one; a plugin that fails
    /// without one fails the whole call, so a reload never silently drops a policy.
    pub async fn load(&self, specs: &[PluginSpec]) -> Result<LoadReport, Vec<LoadError>> {
        let previous = self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let mut plugins = Vec::with_capacity(specs.len());
        let mut kept_previous = Vec::new();
        let mut errors = Vec::new();
        let mut next = HashMap::new();
        for spec in specs {
            let fingerprint = Fingerprint::of(spec);
            if let Some((old, plugin)) = previous.get(&spec.name)
                && *old == fingerprint
            {
                plugins.push(plugin.clone());
                next.insert(spec.name.clone(), (fingerprint, plugin.clone()));
                continue;
            }
            let predecessor = previous.get(&spec.name).map(|(_, plugin)| &**plugin);
            match LoadedPlugin::load_after(spec.clone(), self.cache_dir.clone(), predecessor).await {
                Ok(plugin) => {
                    let plugin = Arc::new(plugin);
                    plugins.push(plugin.clone());
                    next.insert(spec.name.clone(), (fingerprint, plugin));
                }
                Err(error) => match previous.get(&spec.name) {
                    Some((old, plugin)) => {
                        tracing::error!(%error, "plugin not reloaded; its previous version stays in use");
                        plugins.push(plugin.clone());
                        next.insert(spec.name.clone(), (old.clone(), plugin.clone()));
                        kept_previous.push(error);
                    }
                    None => errors.push(error),
                },
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        *self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = next;
        Ok(LoadReport { plugins, kept_previous })
    }
}
