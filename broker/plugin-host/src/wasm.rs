//! WebAssembly component plugins on wasmtime: one process-wide engine, a compiled component and pre-linked
//! instance per plugin, and a pool of instances (stores) that calls borrow one at a time.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use tollgate_hooks::{
    AclDecision, AuthDecision, ClientInfo, ConnectRequest, DisconnectCause, Message, RouteDecision, RouteDirection,
    TransformDecision,
};
use tollgate_protocol::{ProtocolVersion, QoS, ReasonCode, UserProperty};
use wasmtime::component::{Component, HasSelf, InstancePre, Linker, ResourceTable};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::shared::{CallClient, Failure, MacAlgorithm, PluginShared, Pool};
use crate::spec::{HookKind, Limits, PluginSpec, flatten_config};
use crate::{AclRequest, LoadError, PublishRequest, Runtime};

wasmtime::component::bindgen!({
    path: "../../sdk/wit",
    world: "plugin",
    exports: { default: async },
});

use exports::tollgate::plugin::{
    authn, authz, authz_batch, bridge, deliver, lifecycle, session, transform, transform_batch,
};
use tollgate::plugin::types as wit;

static ENGINE: OnceLock<Result<Engine, String>> = OnceLock::new();

/// The one engine of the process. Its epoch advances with the plugin ticker: a running guest yields to the
/// worker's other tasks at every tick, and the CPU budget is counted in ticks.
pub fn engine() -> Result<&'static Engine, String> {
    ENGINE
        .get_or_init(|| {
            let mut config = wasmtime::Config::new();
            config.epoch_interruption(true);
            config.wasm_component_model(true);
            config.cranelift_opt_level(wasmtime::OptLevel::Speed);
            // Guest stack overflow traps cleanly instead of touching the host stack.
            config.max_wasm_stack(1 << 20);
            config.async_stack_size(2 << 20);
            // Lets `perf` attribute samples to guest functions (it reads /tmp/perf-<pid>.map): without it a
            // profile shows the guest as anonymous JIT code. A stripped plugin shows function indices.
            if std::env::var_os("TOLLGATE_WASM_PERFMAP").is_some() {
                config.profiler(wasmtime::ProfilingStrategy::PerfMap);
            }
            let engine = Engine::new(&config).map_err(|error| error.to_string())?;
            crate::ticker::start()?;
            Ok(engine)
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Called by the ticker thread at every tick.
pub(crate) fn advance_epoch() {
    if let Some(Ok(engine)) = ENGINE.get() {
        engine.increment_epoch();
    }
}

/// Marker errors raised from host callbacks, recognised when classifying a failed call.
#[derive(Debug, thiserror::Error)]
#[error("CPU time budget exhausted")]
struct CpuBudgetExhausted;

#[derive(Debug, thiserror::Error)]
#[error("memory limit reached")]
struct MemoryLimitReached;

pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    shared: Arc<PluginShared>,
    client: CallClient,
    memory_cap: usize,
    ticks: u64,
    cpu_ticks: u64,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl wasmtime::ResourceLimiter for HostState {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory_cap {
            return Err(wasmtime::Error::new(MemoryLimitReached));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1 << 20)
    }
}

impl wit::Host for HostState {}

impl tollgate::plugin::host::Host for HostState {
    fn log(&mut self, level: tollgate::plugin::host::LogLevel, message: String) {
        use tollgate::plugin::host::LogLevel;
        let plugin = &*self.shared.name;
        match level {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }

    fn now_ms(&mut self) -> u64 {
        crate::now_ms()
    }

    fn client_attribute(&mut self, key: String) -> Option<String> {
        self.client.attribute(&key)
    }

    fn kv_get(&mut self, key: String) -> Option<Vec<u8>> {
        self.shared.kv_get(&key)
    }

    fn kv_set(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        self.shared.kv_set(key, value)
    }

    fn kv_delete(&mut self, key: String) {
        self.shared.kv_delete(&key)
    }

    fn kv_set_durable(&mut self, key: String, value: Vec<u8>) -> Result<(), String> {
        self.shared.kv_set_durable(key, value)
    }

    fn kv_add(&mut self, key: String, delta: u64, durable: bool) -> Result<u64, String> {
        self.shared.kv_add(&key, delta, durable)
    }

    fn kv_compare_and_set(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        durable: bool,
    ) -> Result<bool, String> {
        self.shared.kv_compare_and_set(&key, expected.as_deref(), value, durable)
    }

    fn kv_claim(&mut self, key: String, ttl_ms: u64) -> bool {
        self.shared.kv_claim(&key, ttl_ms)
    }

    fn clock_synchronized(&mut self) -> Option<bool> {
        crate::clock::synchronized()
    }

    fn gauge_set(&mut self, name: String, value: i64) {
        self.shared.gauge_set(&name, value)
    }

    fn gauge_add(&mut self, name: String, delta: i64) {
        self.shared.gauge_add(&name, delta)
    }

    fn counter_add(&mut self, name: String, delta: u64) {
        self.shared.counter_add(&name, delta)
    }
}

fn host_algorithm(alg: tollgate::plugin::crypto::MacAlgorithm) -> MacAlgorithm {
    match alg {
        tollgate::plugin::crypto::MacAlgorithm::HmacSha256 => MacAlgorithm::HmacSha256,
        tollgate::plugin::crypto::MacAlgorithm::CmacAes128 => MacAlgorithm::CmacAes128,
    }
}

impl tollgate::plugin::crypto::Host for HostState {
    fn hmac_sha256(&mut self, key_id: String, data: Vec<u8>) -> Result<Vec<u8>, String> {
        self.shared.hmac_sha256(&key_id, &data)
    }

    fn sha256(&mut self, data: Vec<u8>) -> Vec<u8> {
        PluginShared::sha256(&data)
    }

    fn hmac_sha256_derived(&mut self, key_id: String, info: Vec<u8>, data: Vec<u8>) -> Result<Vec<u8>, String> {
        self.shared.hmac_sha256_derived(&key_id, &info, &data)
    }

    fn verify_hmac_sha256(
        &mut self,
        key_id: String,
        derive_info: Option<Vec<u8>>,
        data: Vec<u8>,
        tag: Vec<u8>,
    ) -> Result<bool, String> {
        self.shared.verify_hmac_sha256(&key_id, derive_info.as_deref(), &data, &tag)
    }

    fn mac(
        &mut self,
        alg: tollgate::plugin::crypto::MacAlgorithm,
        key_id: String,
        derive_info: Option<Vec<u8>>,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, String> {
        self.shared.mac_tag(host_algorithm(alg), &key_id, derive_info.as_deref(), &data)
    }

    fn verify_mac(
        &mut self,
        alg: tollgate::plugin::crypto::MacAlgorithm,
        key_id: String,
        derive_info: Option<Vec<u8>>,
        data: Vec<u8>,
        tag: Vec<u8>,
    ) -> Result<bool, String> {
        self.shared.verify_mac(host_algorithm(alg), &key_id, derive_info.as_deref(), &data, &tag)
    }
}

struct Exports {
    lifecycle: lifecycle::GuestIndices,
    authn: Option<authn::GuestIndices>,
    authz: Option<authz::GuestIndices>,
    authz_batch: Option<authz_batch::GuestIndices>,
    transform: Option<transform::GuestIndices>,
    transform_batch: Option<transform_batch::GuestIndices>,
    deliver: Option<deliver::GuestIndices>,
    bridge: Option<bridge::GuestIndices>,
    session: Option<session::GuestIndices>,
}

/// Boxed: the bindings of four interfaces make it a few hundred bytes, moved into and out of every call.
type Instance = Box<InstanceState>;

struct InstanceState {
    store: Store<HostState>,
    authn: Option<authn::Guest>,
    authz: Option<authz::Guest>,
    authz_batch: Option<authz_batch::Guest>,
    transform: Option<transform::Guest>,
    transform_batch: Option<transform_batch::Guest>,
    deliver: Option<deliver::Guest>,
    bridge: Option<bridge::Guest>,
    session: Option<session::Guest>,
}

/// One loaded WASM plugin.
pub struct WasmPlugin {
    shared: Arc<PluginShared>,
    pre: InstancePre<HostState>,
    exports: Exports,
    limits: Limits,
    config: Vec<(String, String)>,
    pool: Pool<Instance>,
    hooks: Vec<HookKind>,
    /// The CPU budget of one call (one message), in ticker ticks.
    cpu_ticks: u64,
}

fn compile(engine: &Engine, path: &Path, cache_dir: Option<&Path>) -> Result<Component, String> {
    let bytes = std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let Some(cache_dir) = cache_dir else {
        return Component::new(engine, &bytes).map_err(|error| format!("not a valid component: {error:#}"));
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    let cached =
        cache_dir.join(format!("{}-{:016x}.cwasm", hex::encode(PluginShared::sha256(&bytes)), hasher.finish()));
    if cached.is_file() {
        // SAFETY: deserializing runs native code from the file, so only files this process wrote are read: the
        // cache directory is created owner-only (0700) and each file is named by the SHA-256 of the component it
        // was compiled from together with the engine's compatibility hash, so a stale or foreign build is never
        // picked up by name. A file that fails wasmtime's own header checks is recompiled.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(engine, &cached) };
        match loaded {
            Ok(component) => return Ok(component),
            Err(error) => tracing::warn!(file = %cached.display(), %error, "ignoring an unusable compiled plugin"),
        }
    }
    let component = Component::new(engine, &bytes).map_err(|error| format!("not a valid component: {error:#}"))?;
    if let Err(error) = store_compiled(&component, cache_dir, &cached) {
        tracing::warn!(dir = %cache_dir.display(), %error, "compiled plugin not cached; the next start recompiles it");
    }
    Ok(component)
}

fn store_compiled(component: &Component, dir: &Path, file: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)?;
    let bytes = component.serialize().map_err(|error| std::io::Error::other(error.to_string()))?;
    let partial = file.with_extension(format!("partial-{}", std::process::id()));
    std::fs::write(&partial, bytes)?;
    std::fs::rename(partial, file)
}

impl WasmPlugin {
    pub(crate) async fn load(
        spec: &PluginSpec,
        cache_dir: Option<PathBuf>,
        previous: Option<&PluginShared>,
    ) -> Result<Self, LoadError> {
        let fail = |reason: String| LoadError { plugin: spec.name.clone(), reason };
        let engine = engine().map_err(|error| fail(format!("the WebAssembly engine did not start: {error}")))?;
        let path = spec.path.clone();
        let component = {
            let engine = engine.clone();
            let cache_dir = cache_dir.clone();
            // Compiling takes tens to hundreds of milliseconds: keep it off the async threads.
            tokio::task::spawn_blocking(move || compile(&engine, &path, cache_dir.as_deref()))
                .await
                .map_err(|error| fail(error.to_string()))?
                .map_err(fail)?
        };
        let mut linker = Linker::<HostState>::new(engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|error| fail(error.to_string()))?;
        Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |state| state)
            .map_err(|error| fail(error.to_string()))?;
        let pre = linker.instantiate_pre(&component).map_err(|error| {
            fail(format!("imports something Tollgate does not offer (only tollgate:plugin host and crypto, and WASI with no capabilities): {error:#}"))
        })?;
        let exports = Exports {
            lifecycle: lifecycle::GuestIndices::new(&pre).map_err(|error| fail(wrong_contract(&component, error)))?,
            authn: authn::GuestIndices::new(&pre).ok(),
            authz: authz::GuestIndices::new(&pre).ok(),
            authz_batch: authz_batch::GuestIndices::new(&pre).ok(),
            transform: transform::GuestIndices::new(&pre).ok(),
            transform_batch: transform_batch::GuestIndices::new(&pre).ok(),
            deliver: deliver::GuestIndices::new(&pre).ok(),
            bridge: bridge::GuestIndices::new(&pre).ok(),
            session: session::GuestIndices::new(&pre).ok(),
        };
        let shared = PluginShared::for_spec(spec, previous).map_err(fail)?;
        let mut plugin = WasmPlugin {
            shared,
            pre,
            exports,
            limits: spec.limits,
            config: flatten_config(&spec.config_with_files().map_err(fail)?),
            pool: Pool::new(spec.limits.max_instances),
            hooks: Vec::new(),
            cpu_ticks: crate::ticker::budget_ticks(spec.limits.cpu_time),
        };
        // The first instance proves the plugin starts, and tells which hooks it implements.
        let (instance, info) = plugin.instantiate().await.map_err(|failure| fail(failure.to_string()))?;
        let exported = |hook: HookKind| match hook {
            HookKind::Authenticate => plugin.exports.authn.is_some(),
            HookKind::Authorize => plugin.exports.authz.is_some(),
            HookKind::Transform => plugin.exports.transform.is_some(),
            HookKind::Deliver => plugin.exports.deliver.is_some(),
            HookKind::Route => plugin.exports.bridge.is_some(),
            HookKind::Session => plugin.exports.session.is_some(),
        };
        let mut provided = Vec::new();
        for hook in info.hooks {
            let hook = match hook {
                wit::Hook::Authenticate => HookKind::Authenticate,
                wit::Hook::Authorize => HookKind::Authorize,
                wit::Hook::Transform => HookKind::Transform,
                wit::Hook::Route => HookKind::Route,
                wit::Hook::Deliver => HookKind::Deliver,
                wit::Hook::Session => HookKind::Session,
            };
            if !exported(hook) {
                return Err(fail(format!("declares the {hook} hook but does not export its interface")));
            }
            provided.push(hook);
        }
        plugin.hooks = provided;
        tracing::info!(plugin = %spec.name, name = %info.name, version = %info.version, "WebAssembly plugin loaded");
        plugin.pool.put(instance);
        Ok(plugin)
    }

    async fn instantiate(&self) -> Result<(Instance, wit::PluginInfo), Failure> {
        self.shared.metrics.instances_created.fetch_add(1, Ordering::Relaxed);
        let engine = self.pre.engine();
        let state = HostState {
            // Deny-all WASI: no preopened directories, no environment, no arguments, no network, stdio closed.
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
            shared: self.shared.clone(),
            client: CallClient::default(),
            memory_cap: self.limits.memory_bytes,
            ticks: 0,
            cpu_ticks: self.cpu_ticks,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|state| state);
        store.epoch_deadline_callback(|mut context| {
            let state = context.data_mut();
            state.ticks += 1;
            if state.ticks > state.cpu_ticks {
                return Err(wasmtime::Error::new(CpuBudgetExhausted));
            }
            Ok(UpdateDeadline::Yield(1))
        });
        store.set_epoch_deadline(1);
        let instance = self.pre.instantiate_async(&mut store).await.map_err(|error| self.classify(error))?;
        let exports = &self.exports;
        let lifecycle = exports.lifecycle.load(&mut store, &instance).map_err(|error| self.classify(error))?;
        // The hook interfaces the component exports, found once at load.
        let (authn, authz, authz_batch, transform, transform_batch, deliver, bridge, session) = (|| {
            Ok::<_, wasmtime::Error>((
                exports.authn.as_ref().map(|indices| indices.load(&mut store, &instance)).transpose()?,
                exports.authz.as_ref().map(|indices| indices.load(&mut store, &instance)).transpose()?,
                exports.authz_batch.as_ref().map(|indices| indices.load(&mut store, &instance)).transpose()?,
                exports.transform.as_ref().map(|indices| indices.load(&mut store, &instance)).transpose()?,
                exports.transform_batch.as_ref().map(|indices| indices.load(&mut store, &instance)).transpose()?,
                exports.deliver.as_ref().map(|indices| indices.load(&mut store, &instance)).transpose()?,
                exports.bridge.as_ref().map(|indices| indices.load(&mut store, &instance)).transpose()?,
                exports.session.as_ref().map(|indices| indices.load(&mut store, &instance)).transpose()?,
            ))
        })()
        .map_err(|error| self.classify(error))?;
        let info = lifecycle
            .call_init(&mut store, &self.config)
            .await
            .map_err(|error| self.classify(error))?
            .map_err(|message| Failure::Instantiate(format!("init refused: {message}")))?;
        store.data_mut().ticks = 0;
        let state =
            InstanceState { store, authn, authz, authz_batch, transform, transform_batch, deliver, bridge, session };
        Ok((Box::new(state), info))
    }

    fn classify(&self, error: wasmtime::Error) -> Failure {
        if error.downcast_ref::<CpuBudgetExhausted>().is_some() {
            Failure::CpuLimit(u64::try_from(self.limits.cpu_time.as_millis()).unwrap_or(u64::MAX))
        } else if error.downcast_ref::<MemoryLimitReached>().is_some() {
            Failure::OutOfMemory(self.limits.memory_bytes)
        } else {
            Failure::Trap(format!("{error:#}"))
        }
    }

    /// `on-publish` (inbound) or `on-deliver` (a subscriber's copy): the same message in, the same result out.
    async fn run_transform(
        &self,
        client: &ClientInfo,
        message: &mut Message,
        outbound: bool,
    ) -> Result<TransformDecision, Failure> {
        let wit_client = wit_client(client);
        let draft = wit_message(message);
        let result = self
            .with_instance(CallClient::of(client), 1, |mut instance| async move {
                let result = match (outbound, &instance.transform, &instance.deliver) {
                    (false, Some(guest), _) => guest.call_on_publish(&mut instance.store, &wit_client, &draft).await,
                    (true, _, Some(guest)) => guest.call_on_deliver(&mut instance.store, &wit_client, &draft).await,
                    _ => Ok(wit::TransformResult::Unchanged),
                };
                (instance, result)
            })
            .await?;
        transform_decision(message, result)
    }

    /// `on-publish-batch`: one call for a burst of one client's messages. Every result is checked before any is
    /// applied, so a bad answer leaves all the messages as they were.
    pub(crate) async fn transform_batch(
        &self,
        client: &ClientInfo,
        messages: &mut [Message],
    ) -> Result<Vec<TransformDecision>, Failure> {
        let wit_client = wit_client(client);
        let drafts: Vec<wit::Message> = messages.iter().map(wit_message).collect();
        let results = self
            .with_instance(CallClient::of(client), messages.len(), |mut instance| async move {
                let result = match &instance.transform_batch {
                    Some(guest) => guest.call_on_publish_batch(&mut instance.store, &wit_client, &drafts).await,
                    None => Err(wasmtime::Error::msg("the plugin does not export transform-batch")),
                };
                (instance, result)
            })
            .await?;
        let stopped_early = matches!(
            results.last(),
            Some(wit::TransformResult::Reject(rejection)) if rejection.disconnect
        );
        if results.len() > messages.len() || (results.len() < messages.len() && !stopped_early) {
            return Err(Failure::BadAnswer(format!(
                "on-publish-batch answered {} results for {} messages",
                results.len(),
                messages.len()
            )));
        }
        results.iter().try_for_each(check_transform_result)?;
        Ok(results
            .into_iter()
            .zip(messages.iter_mut())
            .map(|(result, message)| apply_transform_result(message, result))
            .collect())
    }

    pub(crate) fn batches_inbound(&self) -> bool {
        self.exports.transform_batch.is_some()
    }

    pub(crate) fn batches_authorization(&self) -> bool {
        self.exports.authz.is_some() && self.exports.authz_batch.is_some()
    }

    /// Borrows an instance, runs `call` on it and returns it to the pool. An instance whose call failed is
    /// dropped, since a trapped store may be left inconsistent; the next call builds a fresh one.
    async fn with_instance<R, F, Fut>(&self, client: CallClient, messages: usize, call: F) -> Result<R, Failure>
    where
        F: FnOnce(Instance) -> Fut,
        Fut: Future<Output = (Instance, wasmtime::Result<R>)>,
    {
        let mut lease = self.pool.lease().await;
        let mut instance = match lease.take_idle() {
            Some(instance) => instance,
            // Boxed: building an instance is rare and its future is kilobytes, which every call's future would
            // otherwise carry (and copy) inline.
            None => Box::pin(self.instantiate()).await?.0,
        };
        {
            let state = instance.store.data_mut();
            state.client = client;
            state.ticks = 0;
            // A batch gets the budget of each of its messages.
            state.cpu_ticks = self.cpu_ticks.saturating_mul(u64::try_from(messages.max(1)).unwrap_or(u64::MAX));
        }
        instance.store.set_epoch_deadline(1);
        let (mut instance, result) = call(instance).await;
        match result {
            Ok(value) => {
                instance.store.data_mut().client = CallClient::default();
                lease.put_back(instance);
                Ok(value)
            }
            Err(error) => Err(self.classify(error)),
        }
    }
}

/// The package version this broker speaks, as the WIT names it.
const CONTRACT: &str = "tollgate:plugin@0.9.0";

/// Explains a component that lacks this contract's lifecycle export: usually one built against another version.
fn wrong_contract(component: &Component, error: wasmtime::Error) -> String {
    let engine = component.engine();
    let built_against: Vec<String> = component
        .component_type()
        .exports(engine)
        .filter_map(|(name, _)| name.strip_prefix("tollgate:plugin/").map(str::to_owned))
        .filter_map(|name| name.split_once('@').map(|(_, version)| format!("tollgate:plugin@{version}")))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    if built_against.is_empty() {
        format!("does not export {CONTRACT} lifecycle (not a Tollgate plugin?): {error:#}")
    } else {
        format!(
            "was built against {}, this broker speaks {CONTRACT}: rebuild it with the matching tollgate-sdk",
            built_against.join(", ")
        )
    }
}

fn wit_protocol(protocol: ProtocolVersion) -> wit::ProtocolVersion {
    match protocol {
        ProtocolVersion::V31 => wit::ProtocolVersion::V31,
        ProtocolVersion::V311 => wit::ProtocolVersion::V311,
        ProtocolVersion::V5 => wit::ProtocolVersion::V5,
    }
}

fn wit_qos(qos: QoS) -> wit::Qos {
    match qos {
        QoS::AtMostOnce => wit::Qos::AtMostOnce,
        QoS::AtLeastOnce => wit::Qos::AtLeastOnce,
        QoS::ExactlyOnce => wit::Qos::ExactlyOnce,
    }
}

fn host_qos(qos: wit::Qos) -> QoS {
    match qos {
        wit::Qos::AtMostOnce => QoS::AtMostOnce,
        wit::Qos::AtLeastOnce => QoS::AtLeastOnce,
        wit::Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn reason(deny: wit::DenyReason) -> ReasonCode {
    match deny {
        wit::DenyReason::BadCredentials => ReasonCode::BAD_USER_NAME_OR_PASSWORD,
        wit::DenyReason::NotAuthorized => ReasonCode::NOT_AUTHORIZED,
        wit::DenyReason::Banned => ReasonCode::BANNED,
        wit::DenyReason::ServerBusy => ReasonCode::SERVER_BUSY,
        wit::DenyReason::BadAuthMethod => ReasonCode::BAD_AUTHENTICATION_METHOD,
        wit::DenyReason::QuotaExceeded => ReasonCode::QUOTA_EXCEEDED,
        wit::DenyReason::PayloadFormatInvalid => ReasonCode::PAYLOAD_FORMAT_INVALID,
        wit::DenyReason::TopicNameInvalid => ReasonCode::TOPIC_NAME_INVALID,
        wit::DenyReason::ClientIdentifierNotValid => ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
    }
}

fn transform_decision(message: &mut Message, result: wit::TransformResult) -> Result<TransformDecision, Failure> {
    check_transform_result(&result)?;
    Ok(apply_transform_result(message, result))
}

/// A transform's answer the broker can apply: a rewritten topic must be a topic name.
fn check_transform_result(result: &wit::TransformResult) -> Result<(), Failure> {
    match result {
        wit::TransformResult::Modified(modified) => crate::check_topic(&modified.topic).map_err(Failure::BadAnswer),
        _ => Ok(()),
    }
}

/// Applies an answer [`check_transform_result`] accepted.
fn apply_transform_result(message: &mut Message, result: wit::TransformResult) -> TransformDecision {
    match result {
        wit::TransformResult::Unchanged => TransformDecision::Keep,
        wit::TransformResult::Modified(modified) => {
            apply_message(message, modified);
            TransformDecision::Modified
        }
        wit::TransformResult::Drop(reason) => TransformDecision::Drop { reason },
        wit::TransformResult::Reject(rejection) => TransformDecision::Reject {
            reason: reason(rejection.reason),
            message: rejection.message,
            disconnect: rejection.disconnect,
        },
    }
}

fn acl_decision(decision: wit::AclDecision) -> AclDecision {
    match decision {
        wit::AclDecision::Allow => AclDecision::Allow,
        wit::AclDecision::AllowMaxQos(qos) => AclDecision::AllowMaxQos(host_qos(qos)),
        wit::AclDecision::Deny(deny) => AclDecision::Deny(reason(deny)),
        wit::AclDecision::Ignore => AclDecision::Abstain,
    }
}

fn wit_client(client: &ClientInfo) -> wit::Client {
    wit::Client {
        client_id: client.client_id.to_string(),
        username: client.username.as_deref().map(str::to_owned),
        protocol: wit_protocol(client.protocol),
        listener: client.listener.to_string(),
    }
}

fn wit_message(message: &Message) -> wit::Message {
    wit::Message {
        topic: message.topic.to_string(),
        payload: message.payload.to_vec(),
        qos: wit_qos(message.qos),
        retain: message.retain,
        user_properties: message
            .user_properties
            .iter()
            .map(|property| wit::UserProperty { key: property.key.clone(), value: property.value.clone() })
            .collect(),
        content_type: message.content_type.clone(),
        payload_is_utf8: message.payload_format_indicator == Some(1),
        response_topic: message.response_topic.clone(),
        correlation_data: message.correlation_data.as_ref().map(|data| data.to_vec()),
        message_expiry_secs: message.message_expiry_interval,
    }
}

/// A field the plugin handed back unchanged keeps its buffer: most transforms add a property or rewrite one field,
/// and a fresh copy of the rest would cost an allocation per message here and keep two copies alive downstream.
fn apply_message(target: &mut Message, modified: wit::Message) {
    if *target.topic != *modified.topic {
        target.topic = modified.topic.into();
    }
    if target.payload != modified.payload {
        target.payload = modified.payload.into();
    }
    target.qos = host_qos(modified.qos);
    target.retain = modified.retain;
    target.user_properties = modified
        .user_properties
        .into_iter()
        .map(|property| UserProperty { key: property.key, value: property.value })
        .collect();
    target.content_type = modified.content_type;
    target.payload_format_indicator = modified.payload_is_utf8.then_some(1);
    target.response_topic = modified.response_topic;
    target.correlation_data = modified.correlation_data.map(Into::into);
    target.message_expiry_interval = modified.message_expiry_secs;
}

impl Runtime for WasmPlugin {
    fn shared(&self) -> &Arc<PluginShared> {
        &self.shared
    }

    fn provided_hooks(&self) -> Vec<HookKind> {
        self.hooks.clone()
    }

    async fn authenticate(&self, request: &ConnectRequest) -> Result<AuthDecision, Failure> {
        let info = wit::ConnectInfo {
            client_id: request.client_id.to_string(),
            username: request.username.as_deref().map(str::to_owned),
            username_from_certificate: request.username_from_certificate,
            password: request.password.as_ref().map(|password| password.to_vec()),
            protocol: wit_protocol(request.protocol),
            remote_addr: request.remote_addr.map(|address| address.to_string()),
            listener: request.listener.to_string(),
            peer: request.peer.as_deref().map(|peer| wit::PeerCertificate {
                subject: peer.subject.clone(),
                common_name: peer.common_name.clone(),
                subject_serial_number: peer.subject_serial_number.clone(),
                organizational_units: peer.organizational_units.clone(),
                san_uris: peer.san_uri.clone(),
                san_dns: peer.san_dns.clone(),
                serial: peer.serial.clone(),
                fingerprint_sha256: peer.fingerprint_sha256.clone(),
            }),
            auth_method: request.authentication_method.clone(),
            auth_data: request.authentication_data.as_ref().map(|data| data.to_vec()),
        };
        let client = CallClient { attributes: Default::default(), peer: request.peer.clone() };
        let decision = self
            .with_instance(client, 1, |mut instance| async move {
                let result = match &instance.authn {
                    Some(guest) => guest.call_on_connect(&mut instance.store, &info).await,
                    None => Ok(wit::ConnectDecision::Ignore),
                };
                (instance, result)
            })
            .await?;
        Ok(match decision {
            wit::ConnectDecision::Allow(attributes) => {
                AuthDecision::Allow { attributes: attributes.into_iter().collect() }
            }
            wit::ConnectDecision::Deny(deny) => AuthDecision::deny(reason(deny)),
            wit::ConnectDecision::Challenge(data) => AuthDecision::Continue { data: data.map(Into::into) },
            wit::ConnectDecision::Ignore => AuthDecision::Abstain,
        })
    }

    async fn authorize(&self, client: &ClientInfo, request: AclRequest<'_>) -> Result<AclDecision, Failure> {
        let wit_client = wit_client(client);
        let decision = self
            .with_instance(CallClient::of(client), 1, |mut instance| async move {
                let result = match (&instance.authz, request) {
                    (Some(guest), AclRequest::Publish { topic, qos, retain, will }) => {
                        let kind = if will { wit::PublishKind::Will } else { wit::PublishKind::Publish };
                        let (store, qos) = (&mut instance.store, wit_qos(qos));
                        guest.call_authorize_publish(store, &wit_client, topic, qos, retain, kind).await
                    }
                    (Some(guest), AclRequest::Subscribe { filter, qos, share_group }) => {
                        let (store, qos) = (&mut instance.store, wit_qos(qos));
                        guest.call_authorize_subscribe(store, &wit_client, filter, qos, share_group).await
                    }
                    (Some(guest), AclRequest::Session) => {
                        guest.call_authorize_session(&mut instance.store, &wit_client).await
                    }
                    (None, _) => Ok(wit::AclDecision::Ignore),
                };
                (instance, result)
            })
            .await?;
        Ok(acl_decision(decision))
    }

    async fn authorize_publish_batch(
        &self,
        client: &ClientInfo,
        requests: &[PublishRequest<'_>],
    ) -> Result<Vec<AclDecision>, Failure> {
        let wit_client = wit_client(client);
        let wit_requests: Vec<wit::PublishRequest> = requests
            .iter()
            .map(|request| wit::PublishRequest {
                topic: request.topic.to_owned(),
                qos: wit_qos(request.qos),
                retain: request.retain,
            })
            .collect();
        let decisions = self
            .with_instance(CallClient::of(client), requests.len(), |mut instance| async move {
                let result = match &instance.authz_batch {
                    Some(guest) => {
                        guest.call_authorize_publish_batch(&mut instance.store, &wit_client, &wit_requests).await
                    }
                    None => Err(wasmtime::Error::msg("the plugin does not export authz-batch")),
                };
                (instance, result)
            })
            .await?;
        if decisions.len() != requests.len() {
            return Err(Failure::BadAnswer(format!(
                "authorize-publish-batch answered {} decisions for {} requests",
                decisions.len(),
                requests.len()
            )));
        }
        Ok(decisions.into_iter().map(acl_decision).collect())
    }

    async fn transform(&self, client: &ClientInfo, message: &mut Message) -> Result<TransformDecision, Failure> {
        self.run_transform(client, message, false).await
    }

    async fn deliver(&self, subscriber: &ClientInfo, message: &mut Message) -> Result<TransformDecision, Failure> {
        self.run_transform(subscriber, message, true).await
    }

    async fn session_event(&self, client: &ClientInfo, cause: Option<DisconnectCause>) -> Result<(), Failure> {
        let guest_client = wit_client(client);
        self.with_instance(CallClient::of(client), 1, |mut instance| async move {
            let result = match (&instance.session, cause) {
                (None, _) => Ok(()),
                (Some(guest), None) => guest.call_on_connected(&mut instance.store, &guest_client).await,
                (Some(guest), Some(cause)) => {
                    let cause = match cause {
                        DisconnectCause::ClientDisconnect => wit::DisconnectCause::ClientDisconnect,
                        DisconnectCause::ConnectionLost => wit::DisconnectCause::ConnectionLost,
                        DisconnectCause::KeepAliveTimeout => wit::DisconnectCause::KeepAliveTimeout,
                        DisconnectCause::TakenOver => wit::DisconnectCause::TakenOver,
                        DisconnectCause::ProtocolError => wit::DisconnectCause::ProtocolError,
                        DisconnectCause::Policy => wit::DisconnectCause::Policy,
                        DisconnectCause::Revoked => wit::DisconnectCause::Revoked,
                        DisconnectCause::ServerShutdown => wit::DisconnectCause::ServerShutdown,
                    };
                    guest.call_on_disconnected(&mut instance.store, &guest_client, cause).await
                }
            };
            (instance, result)
        })
        .await
    }

    async fn route(
        &self,
        direction: RouteDirection,
        bridge_name: &str,
        message: &Message,
    ) -> Result<RouteDecision, Failure> {
        let direction = match direction {
            RouteDirection::Egress => wit::RouteDirection::Egress,
            RouteDirection::Ingress => wit::RouteDirection::Ingress,
        };
        let draft = wit_message(message);
        let bridge_name = bridge_name.to_owned();
        let decision = self
            .with_instance(CallClient::default(), 1, |mut instance| async move {
                let result = match &instance.bridge {
                    Some(guest) => guest.call_route(&mut instance.store, direction, &bridge_name, &draft).await,
                    None => Ok(wit::RouteDecision::Ignore),
                };
                (instance, result)
            })
            .await?;
        Ok(match decision {
            wit::RouteDecision::Forward => RouteDecision::Forward,
            wit::RouteDecision::Rewrite(topic) => {
                crate::check_topic(&topic).map_err(Failure::BadAnswer)?;
                RouteDecision::Rewrite { topic }
            }
            wit::RouteDecision::Drop => RouteDecision::Drop,
            wit::RouteDecision::Ignore => RouteDecision::Abstain,
        })
    }
}
