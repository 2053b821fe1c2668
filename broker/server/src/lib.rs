//! Wiring only: configuration → hook chain → broker → listeners, plus signals and logging for the binary. This is
//! the one crate that reads files, environment variables and signals.

#[cfg(unix)]
pub mod admin;
pub mod bridge_config;
pub mod certs;
pub mod config;
pub mod grants;
pub mod persistence;
pub mod sig;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tollgate_builtins::acl_file::AclFile;
use tollgate_builtins::password_file::PasswordFile;
use tollgate_builtins::{AclFileAuthorizer, AnonymousAccess, CertificateIdentityAuth, PasswordFileAuth};
use tollgate_core::{Broker, SnapshotCounts};
use tollgate_hooks::{AuthFallback, FailurePolicy, HookChain, HookSlot};
use tollgate_plugin_host::{LoadReport, LoadedPlugin, PluginHost};
use tollgate_protocol::QoS;
use tollgate_transport::{ConnectionLimits, ListenerSpec, ReloadableTls, Transport};
use tracing::{error, info};

pub use config::Config;

/// What a complete reload did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReloadSummary {
    /// The hook chain's generation now in force.
    pub generation: u64,
    pub plugins: usize,
    /// Sessions asked again, and of those ended by the new policy.
    pub sessions: usize,
    pub revoked: usize,
    pub subscriptions_removed: usize,
    pub retained_purged: usize,
    /// Bridges started, restarted (their configuration changed) or stopped (removed) by the reload.
    pub bridges_changed: usize,
}

impl std::fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "reloaded (generation {}, {} plugins); {} sessions rechecked, {} ended, {} subscriptions removed, {} \
             retained messages purged",
            self.generation,
            self.plugins,
            self.sessions,
            self.revoked,
            self.subscriptions_removed,
            self.retained_purged
        )?;
        if self.bridges_changed > 0 {
            write!(f, "; {} bridges started, restarted or stopped", self.bridges_changed)?;
        }
        Ok(())
    }
}

/// A running broker with its bound listener addresses.
pub struct Server {
    pub broker: Broker,
    pub addresses: Vec<SocketAddr>,
    generation: AtomicU64,
    worker_threads: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>,
    stop_workers: CancellationToken,
    /// TLS listeners' certificates, re-read on reload.
    tls: Vec<(Arc<str>, Arc<ReloadableTls>)>,
    /// Loaded plugins, kept across reloads so unchanged ones keep their instances and state.
    plugins: Arc<PluginHost>,
    /// Links to other brokers with the configuration each was started with: a reload restarts those whose
    /// configuration changed and leaves the others running.
    bridges: Arc<std::sync::Mutex<Vec<(bridge_config::BridgeConfig, tollgate_bridge::BridgeHandle)>>>,
    /// `[persistence]` on: where the state is saved at shutdown.
    state_file: Option<std::path::PathBuf>,
}

fn load_policy_file<T, E: ToString>(
    path: &std::path::Path,
    parse: impl FnOnce(&str) -> Result<T, Vec<E>>,
) -> anyhow::Result<T> {
    config::read_policy_file(path, parse).map_err(|error| match error {
        config::PolicyFileError::Unreadable(error) => {
            anyhow::Error::new(error).context(format!("reading {}", path.display()))
        }
        config::PolicyFileError::Invalid(errors) => anyhow::anyhow!("{}: {}", path.display(), errors.join("; ")),
    })
}

fn joined(items: &[impl ToString]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Loads (or, on reload, refreshes) the configured plugins. Errors name each plugin and why.
async fn load_plugins(host: &PluginHost, config: &Config) -> anyhow::Result<LoadReport> {
    let specs = config.plugin_specs().map_err(|problems| anyhow::anyhow!("{}", joined(&problems)))?;
    host.load(&specs).await.map_err(|errors| anyhow::anyhow!("{}", joined(&errors)))
}

/// For `check-config`: loads every plugin of a valid configuration (compile, instantiate, init) and reports each
/// one that does not load under its `plugins[<index>]` key.
pub async fn check_plugins(config: &Config) -> Vec<config::ConfigProblem> {
    let specs = match config.plugin_specs() {
        Ok(specs) => specs,
        Err(problems) => return problems,
    };
    match PluginHost::new(config.plugin_cache_dir()).load(&specs).await {
        Ok(_) => Vec::new(),
        Err(errors) => errors
            .into_iter()
            .map(|error| config::ConfigProblem {
                key: specs
                    .iter()
                    .position(|spec| spec.name == error.plugin)
                    .map_or_else(|| "plugins".to_owned(), |index| format!("plugins[{index}]")),
                message: error.to_string(),
            })
            .collect(),
    }
}

/// Builds the hook chain the configuration describes. File formats are validated by [`config::load`]; errors here
/// mean a file changed in between (a reload), and are reported without touching the running chain.
///
/// Order: plugin authenticators first (in configuration order), then the built-ins, so a plugin can refuse a
/// client the built-ins would let in; the built-in ACL file before plugin authorizers (every authorizer is asked,
/// and the first denial wins); then plugin transforms and routes.
pub fn build_hooks(config: &Config, generation: u64, plugins: &[Arc<LoadedPlugin>]) -> anyhow::Result<HookChain> {
    let mut chain = HookChain::default()
        .with_sleeper(Arc::new(|duration| Box::pin(tokio::time::sleep(duration))))
        // Plugin failures are logged (rate-limited) by the plugin host; this catches the rest.
        .with_failure_observer(Arc::new(|error| tracing::debug!(%error, "hook failed")));
    chain.generation = generation;
    let slots: Vec<_> = plugins.iter().map(|plugin| plugin.slots()).collect();
    chain.authenticators.extend(slots.iter().filter_map(|slots| slots.authenticator.clone()));
    // First: a client whose user name is its verified certificate identity needs no password.
    if config.listeners.iter().any(|listener| listener.use_identity_as_username) {
        chain.authenticators.push(HookSlot::new(Arc::new(CertificateIdentityAuth), None, FailurePolicy::FailClosed));
    }
    chain.authenticators.push(HookSlot::new(
        Arc::new(AnonymousAccess { allow: config.allow_anonymous() }),
        None,
        FailurePolicy::FailClosed,
    ));
    if let Some(path) = &config.auth.password_file {
        let file = load_policy_file(path, PasswordFile::parse)?;
        chain.authenticators.push(HookSlot::new(
            Arc::new(PasswordFileAuth::new(file)),
            None,
            FailurePolicy::FailClosed,
        ));
    }
    // Mosquitto semantics: without a password file, a client with a user name is let in exactly when anonymous
    // access is; with one, the file must vouch for it.
    chain.auth_fallback = if config.auth.password_file.is_none() && config.allow_anonymous() {
        AuthFallback::Allow
    } else {
        AuthFallback::Deny
    };
    if let Some(path) = &config.auth.acl_file {
        let file = load_policy_file(path, AclFile::parse)?;
        chain.authorizers.push(HookSlot::new(Arc::new(AclFileAuthorizer::new(file)), None, FailurePolicy::FailClosed));
    }
    chain.authorizers.extend(slots.iter().filter_map(|slots| slots.authorizer.clone()));
    chain.transformers.extend(slots.iter().filter_map(|slots| slots.transformer.clone()));
    chain.routers.extend(slots.iter().filter_map(|slots| slots.router.clone()));
    chain.observers.extend(slots.iter().filter_map(|slots| slots.observer.clone()));
    Ok(chain)
}

impl Server {
    /// Binds every listener and starts serving. Must run inside a tokio runtime.
    pub async fn start(config: &Config) -> anyhow::Result<Server> {
        let plugin_host = Arc::new(PluginHost::new(config.plugin_cache_dir()));
        let plugins = load_plugins(&plugin_host, config).await?.plugins;
        for plugin in &plugins {
            let hooks: Vec<&str> = plugin.hooks.iter().map(|hook| hook.as_str()).collect();
            info!(plugin = plugin.name(), kind = ?plugin.spec.kind, hooks = %hooks.join(","), "plugin attached");
        }
        let hooks = build_hooks(config, 1, &plugins)?;
        let broker = Broker::new(config.broker_config(), hooks);
        // Before any listener or bridge: restored sessions and retained messages are there for the first client.
        let state_file = config.persistence.enabled.then(|| config.persistence_file()).flatten();
        if let Some(file) = &state_file {
            persistence::restore(&broker, file)?;
            if config.persistence.autosave_interval > 0 {
                let interval = Duration::from_secs(u64::from(config.persistence.autosave_interval));
                broker.spawn(persistence::autosave(broker.clone(), file.clone(), interval));
            }
        }
        let (workers, worker_threads, stop_workers) = start_workers(config.runtime.worker_threads)?;
        let limits = Arc::new(ConnectionLimits::new(
            config.limits.max_connections as usize,
            config.limits.max_connection_rate,
            workers.len(),
        ));
        let mut addresses = Vec::new();
        let mut tls_listeners = Vec::new();
        let plugin_auth =
            plugins.iter().any(|plugin| plugin.hooks.contains(&tollgate_plugin_host::HookKind::Authenticate));
        let auth_mode = if plugin_auth {
            "plugins, then built-ins"
        } else if config.auth.password_file.is_some() {
            "password_file"
        } else if config.allow_anonymous() {
            "anonymous"
        } else {
            "deny-all"
        };
        for (index, listener) in config.listeners.iter().enumerate() {
            let address: SocketAddr =
                listener.bind.parse().with_context(|| format!("listeners[{index}].bind = {:?}", listener.bind))?;
            let tls = match listener.tls_settings().filter(|_| listener.uses_tls()) {
                Some(settings) => Some(Arc::new(
                    ReloadableTls::new(settings)
                        .with_context(|| format!("listeners[{index}] ({})", listener.protocol))?,
                )),
                None if listener.uses_tls() => anyhow::bail!("listeners[{index}]: cert and key are required"),
                None => None,
            };
            let ws_path: Arc<str> = listener.ws_path.as_str().into();
            let transport = match (listener.protocol.as_str(), tls) {
                ("tls", Some(tls)) => Transport::Tls(tls),
                ("wss", Some(tls)) => Transport::Wss { tls, path: ws_path },
                ("ws", _) => Transport::Ws { path: ws_path },
                _ => Transport::Tcp,
            };
            let socket = bind_listener(address).with_context(|| format!("binding {address}"))?;
            let local = socket.local_addr()?;
            let name: Arc<str> =
                listener.name.clone().unwrap_or_else(|| format!("{}:{}", listener.protocol, local)).into();
            let client_certificates = match (&listener.client_ca, listener.require_client_cert) {
                (None, _) => "none",
                (Some(_), false) => "optional",
                (Some(_), true) => "required",
            };
            let user_name = if listener.use_identity_as_username {
                format!("certificate {}", listener.identity_from)
            } else {
                "from CONNECT".to_owned()
            };
            info!(
                listener = %name,
                address = %local,
                protocol = %listener.protocol,
                auth = auth_mode,
                client_certificates,
                user_name = %user_name,
                acl = config.auth.acl_file.is_some(),
                "listener ready"
            );
            if let Some(tls) = transport.tls() {
                tls_listeners.push((name.clone(), tls.clone()));
            }
            let spec = Arc::new(ListenerSpec {
                name: name.clone(),
                transport,
                identity_from: listener
                    .identity_from
                    .parse()
                    .map_err(|message| anyhow::anyhow!("listeners[{index}].identity_from: {message}"))?,
                use_identity_as_username: listener.use_identity_as_username,
                mount_point: listener.mount_point.as_deref().map(Arc::from),
                limits: limits.clone(),
                max_connections: listener.max_connections as usize,
                open_connections: Arc::default(),
                workers: workers.clone().into(),
            });
            addresses.push(local);
            // Every worker accepts from its own socket (see `start_workers`); a tokio socket belongs to the runtime
            // that registered it, so each worker registers its own.
            let sockets = worker_listeners(socket, local, workers.len())?;
            for ((worker_index, worker), socket) in workers.iter().enumerate().zip(sockets) {
                let (broker, spec) = (broker.clone(), spec.clone());
                broker.clone().spawn_on(worker, async move {
                    match TcpListener::from_std(socket) {
                        Ok(socket) => tollgate_transport::serve_listener(broker, socket, spec, worker_index).await,
                        Err(error) => error!(listener = %spec.name, %error, "cannot register the listener on a worker"),
                    }
                });
            }
        }
        broker.spawn(tollgate_core::sys::run(broker.clone()));
        broker.spawn(publish_plugin_metrics(broker.clone(), plugin_host.clone()));
        let bridge_settings = config.bridge_settings().map_err(|problems| {
            anyhow::anyhow!(problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        })?;
        let mut bridges = Vec::new();
        for (entry, settings) in config.bridges.iter().zip(bridge_settings) {
            bridges.push((entry.clone(), start_bridge(&broker, settings)?));
        }
        let bridges = Arc::new(std::sync::Mutex::new(bridges));
        broker.spawn(publish_bridge_metrics(broker.clone(), bridges.clone()));
        if config.session.recheck_interval_ms > 0 {
            broker.spawn(recheck_periodically(
                broker.clone(),
                Duration::from_millis(u64::from(config.session.recheck_interval_ms)),
            ));
        }
        Ok(Server {
            broker,
            addresses,
            generation: AtomicU64::new(1),
            worker_threads: std::sync::Mutex::new(worker_threads),
            stop_workers,
            tls: tls_listeners,
            plugins: plugin_host,
            bridges,
            state_file,
        })
    }

    /// Re-reads the password and ACL files and reloads changed plugins; on any error the running chain stays as
    /// it was. A changed plugin that fails to load keeps its previous version (and the reload says so).
    pub async fn reload(&self, config: &Config) -> anyhow::Result<ReloadSummary> {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let report = load_plugins(&self.plugins, config).await?;
        let hooks = build_hooks(config, generation, &report.plugins)?;
        self.broker.replace_hooks(hooks);
        info!(generation, "hooks reloaded");
        // What the new policy refuses goes now, not at the client's next reconnect.
        let recheck = self.broker.recheck_sessions().await;
        info!(
            sessions = recheck.sessions,
            revoked = recheck.revoked,
            subscriptions_removed = recheck.subscriptions_removed,
            retained_purged = recheck.retained_purged,
            "sessions rechecked against the reloaded policy"
        );
        // Certificates: each listener keeps its old ones if the new files do not load; established connections
        // are never touched.
        let mut failed = Vec::new();
        let mut bridges_changed = 0;
        for (name, tls) in &self.tls {
            match tls.reload() {
                Ok(()) => info!(listener = %name, "TLS certificates reloaded"),
                Err(error) => {
                    error!(listener = %name, %error, "TLS certificates not reloaded; the previous ones stay in use");
                    failed.push(format!("{name}: {error}"));
                }
            }
        }
        failed.extend(report.kept_previous.iter().map(|error| format!("{error} (previous version kept)")));
        match self.reload_bridges(config).await {
            Ok(changed) => bridges_changed = changed,
            Err(problems) => failed.extend(problems),
        }
        if !failed.is_empty() {
            anyhow::bail!("reload incomplete: {}", failed.join("; "));
        }
        Ok(ReloadSummary {
            generation,
            plugins: report.plugins.len(),
            sessions: recheck.sessions,
            revoked: recheck.revoked,
            subscriptions_removed: recheck.subscriptions_removed,
            retained_purged: recheck.retained_purged,
            bridges_changed,
        })
    }

    /// Stops the bridges whose `[[bridges]]` entry changed or went, and starts the changed and new ones; an
    /// unchanged bridge keeps running and keeps its link. Returns how many were stopped or started.
    async fn reload_bridges(&self, config: &Config) -> Result<usize, Vec<String>> {
        let wanted = config
            .bridge_settings()
            .map_err(|problems| problems.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        let running = std::mem::take(&mut *self.bridges.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        let grace = self.broker.config().shutdown_grace;
        let mut kept = Vec::new();
        let mut changed = 0;
        for (entry, handle) in running {
            if config.bridges.contains(&entry) {
                kept.push((entry, handle));
                continue;
            }
            info!(bridge = %entry.name, "bridge stopping: its configuration changed or was removed");
            if !handle.stop(grace).await {
                error!(bridge = %entry.name, "bridge did not stop within the shutdown grace");
            }
            changed += 1;
        }
        let mut next = Vec::new();
        let mut problems = Vec::new();
        for (entry, settings) in config.bridges.iter().zip(wanted) {
            if let Some(position) = kept.iter().position(|(running, _)| running == entry) {
                next.push(kept.swap_remove(position));
                continue;
            }
            match start_bridge(&self.broker, settings) {
                Ok(handle) => {
                    next.push((entry.clone(), handle));
                    changed += 1;
                }
                Err(error) => {
                    error!(%error, "bridge not started");
                    problems.push(error.to_string());
                }
            }
        }
        *self.bridges.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        if problems.is_empty() { Ok(changed) } else { Err(problems) }
    }

    /// The running bridges, in configuration order.
    pub fn bridges(&self) -> Vec<tollgate_bridge::BridgeHandle> {
        let bridges = self.bridges.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        bridges.iter().map(|(_, handle)| handle.clone()).collect()
    }

    /// A snapshot for `tollgate status`: what `$SYS` publishes, plus each plugin's hooks, health, counters and
    /// gauges.
    pub fn status(&self) -> serde_json::Value {
        let stats = tollgate_core::sys::Stats::of(&self.broker);
        let plugins: Vec<serde_json::Value> = self
            .plugins
            .plugins()
            .iter()
            .map(|plugin| {
                let shared = plugin.shared();
                serde_json::json!({
                    "name": plugin.name(),
                    "kind": plugin.spec.kind.as_str(),
                    "hooks": plugin.hooks.iter().map(|hook| hook.as_str()).collect::<Vec<_>>(),
                    "metrics": shared.metrics.snapshot(),
                    "counters": shared.counters(),
                    "gauges": shared.gauges(),
                    "enabled": shared.check_enabled().is_ok(),
                })
            })
            .collect();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_secs": stats.uptime_secs,
            "listeners": self.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "clients_connected": stats.clients_connected,
            "sessions": stats.sessions,
            "subscriptions": stats.subscriptions,
            "retained": stats.retained,
            "messages_received": stats.publish_received,
            "messages_sent": stats.publish_sent,
            "messages_dropped": stats.publish_dropped,
            "policy_generation": self.generation.load(Ordering::Relaxed),
            "plugins": plugins,
            "bridges": self.bridges().iter().map(bridge_status).collect::<Vec<_>>(),
            "persistence": self.state_file.as_ref().map(|file| serde_json::json!({
                "file": file.display().to_string(),
                "saved_unix_s": std::fs::metadata(file)
                    .and_then(|meta| meta.modified())
                    .ok()
                    .and_then(|modified| modified.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|since| since.as_secs()),
            })),
        })
    }

    /// With `[persistence]` on, writes the state file now (`why` goes in the log line: shutdown, SIGUSR1).
    pub async fn save_state(&self, why: &str) {
        let Some(file) = &self.state_file else {
            info!(why, "no state saved: [persistence] is off");
            return;
        };
        let started = std::time::Instant::now();
        match persistence::save(&self.broker, file).await {
            Ok(SnapshotCounts { retained, sessions, messages, wills }) => {
                let elapsed_ms = started.elapsed().as_millis() as u64;
                info!(file = %file.display(), why, retained, sessions, messages, wills, elapsed_ms, "state saved")
            }
            Err(error) => error!(why, error = format!("{error:#}"), "state not saved"),
        }
    }

    /// Stops accepting, says goodbye to every client and waits for them up to the grace period, then stops the
    /// connection runtimes.
    pub async fn shutdown(&self) -> bool {
        self.broker.shutdown();
        let drained = self.broker.drained().await;
        // Every connection has left its session by now: what is saved is what a client resumes.
        self.save_state("shutdown").await;
        self.stop_workers.cancel();
        let threads = std::mem::take(&mut *self.worker_threads.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
        // Joining is blocking; the threads exit promptly once told to stop.
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        drained
    }
}

/// Rechecks every session at a fixed interval, for policy that changes with time (grants that expire).
async fn recheck_periodically(broker: Broker, interval: Duration) {
    let shutdown = broker.shutdown_token();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let report = broker.recheck_sessions().await;
        if report.revoked > 0 || report.subscriptions_removed > 0 {
            info!(
                revoked = report.revoked,
                subscriptions_removed = report.subscriptions_removed,
                retained_purged = report.retained_purged,
                "periodic session recheck"
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_workers.cancel();
    }
}

/// `$SYS/broker/plugins/<name>/...`: each plugin's call and failure counts, its own counters and gauges, the size of its
/// key-value table (`kv/entries`, `kv/claims`, `kv/claims_evicted`), the latency of its calls per hook (`latency/<hook>/p50_us|p99_us|max_us|count`, since the plugin was loaded), on the `$SYS`
/// interval.
async fn publish_plugin_metrics(broker: Broker, plugins: Arc<PluginHost>) {
    tollgate_core::sys::every_interval(&broker, |broker| {
        for plugin in plugins.plugins() {
            let prefix = format!("$SYS/broker/plugins/{}", plugin.name());
            let shared = plugin.shared();
            for (metric, value) in shared.metrics.snapshot() {
                broker.publish_local(&format!("{prefix}/{metric}"), value.to_string(), QoS::AtMostOnce, true);
            }
            for (counter, value) in shared.counters() {
                let topic = format!("{prefix}/counters/{counter}");
                broker.publish_local(&topic, value.to_string(), QoS::AtMostOnce, true);
            }
            for (gauge, value) in shared.gauges() {
                let topic = format!("{prefix}/gauges/{gauge}");
                broker.publish_local(&topic, value.to_string(), QoS::AtMostOnce, true);
            }
            let kv = shared.kv_sizes();
            let sizes =
                [("entries", kv.entries as u64), ("claims", kv.claims as u64), ("claims_evicted", kv.claims_evicted)];
            for (size, value) in sizes {
                broker.publish_local(&format!("{prefix}/kv/{size}"), value.to_string(), QoS::AtMostOnce, true);
            }
            for (hook, latency) in shared.metrics.latency_summaries() {
                let readings = [("p50_us", latency.p50), ("p99_us", latency.p99), ("max_us", latency.max)];
                for (reading, value) in readings {
                    let Some(value) = value else { continue };
                    let topic = format!("{prefix}/latency/{hook}/{reading}");
                    broker.publish_local(&topic, format!("{:.1}", value.as_secs_f64() * 1e6), QoS::AtMostOnce, true);
                }
                let topic = format!("{prefix}/latency/{hook}/count");
                broker.publish_local(&topic, latency.count.to_string(), QoS::AtMostOnce, true);
            }
        }
    })
    .await;
}

/// Every bridge's counters as `$SYS/broker/bridges/<name>/<counter>` (retained), on the `$SYS` interval; its
/// link state has its own topic, published as it changes.
async fn publish_bridge_metrics(
    broker: Broker,
    bridges: Arc<std::sync::Mutex<Vec<(bridge_config::BridgeConfig, tollgate_bridge::BridgeHandle)>>>,
) {
    tollgate_core::sys::every_interval(&broker, |broker| {
        let handles: Vec<tollgate_bridge::BridgeHandle> = bridges
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(_, handle)| handle.clone())
            .collect();
        for bridge in &handles {
            let serde_json::Value::Object(fields) = bridge_status(bridge) else { continue };
            for (counter, value) in fields.iter().filter(|(key, _)| !matches!(key.as_str(), "name" | "connected")) {
                let topic = format!("$SYS/broker/bridges/{}/{counter}", bridge.name);
                broker.publish_local(&topic, value.to_string(), QoS::AtMostOnce, true);
            }
        }
    })
    .await;
}

/// Starts one current-thread runtime per worker thread, each accepting and serving its own connections.
///
/// Why not one multi-threaded runtime: its scheduler runs the most recently woken task first (the LIFO slot), so
/// when two clients' packets arrive in the same readiness batch the later one is often applied first. MQTT does not
/// order packets across connections, but clients written against single-threaded brokers (and the Paho
/// conformance suite) expect a SUBSCRIBE that arrived first to be in place for a PUBLISH that arrived after it.
/// Current-thread runtimes run ready tasks in arrival order, and connections never migrate between threads.
fn start_workers(requested: u16) -> anyhow::Result<(Vec<Handle>, Vec<std::thread::JoinHandle<()>>, CancellationToken)> {
    let count = match requested {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        count => usize::from(count),
    };
    let stop = CancellationToken::new();
    let mut handles = Vec::with_capacity(count);
    let mut threads = Vec::with_capacity(count);
    for index in 0..count {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        handles.push(runtime.handle().clone());
        let stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("tollgate-worker-{index}"))
            .spawn(move || runtime.block_on(stop.cancelled()))?;
        threads.push(thread);
    }
    Ok((handles, threads, stop))
}

/// Writes a file only its owner may read (password hashes, private keys). A new file is created with mode 0600;
/// an existing one is truncated and keeps its mode.
pub fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut handle = options.open(path)?;
    handle.write_all(contents.as_bytes())
}

/// Installs the global tracing subscriber for the binary.
pub fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Grace given to a second signal before exiting hard.
pub const SHUTDOWN_NOTICE: Duration = Duration::from_secs(1);

/// The listening socket of one listener. On Linux it is opened with `SO_REUSEPORT`, so that each worker can have a
/// socket of its own on the same address ([`worker_listeners`]). `SO_REUSEPORT` would also let a second broker
/// started on the same port join the group and silently take half the connections, so the address is first
/// bound without it: a port already in use is refused as it would be without the option.
fn bind_listener(address: SocketAddr) -> std::io::Result<TcpListener> {
    if address.port() != 0 {
        drop(std::net::TcpListener::bind(address)?);
    }
    bind_in_group(address)
}

fn bind_in_group(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    #[cfg(target_os = "linux")]
    socket.set_reuseport(true)?;
    socket.bind(address)?;
    socket.listen(LISTEN_BACKLOG)
}

const LISTEN_BACKLOG: u32 = 1024;

/// One listening socket per worker. On Linux each worker gets its own socket in the same `SO_REUSEPORT` group,
/// and the kernel spreads new connections over them: with one shared socket every connection woke every worker
/// and all but one found nothing to accept. Elsewhere the workers share clones of the one socket.
fn worker_listeners(
    first: TcpListener,
    local: SocketAddr,
    workers: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = first.into_std()?;
    let mut sockets = Vec::with_capacity(workers);
    for _ in 1..workers {
        #[cfg(target_os = "linux")]
        sockets.push(bind_in_group(local)?.into_std()?);
        #[cfg(not(target_os = "linux"))]
        sockets.push(first.try_clone()?);
    }
    sockets.insert(0, first);
    Ok(sockets)
}

fn start_bridge(
    broker: &Broker,
    settings: tollgate_bridge::BridgeSettings,
) -> anyhow::Result<tollgate_bridge::BridgeHandle> {
    info!(bridge = %settings.name, address = %settings.address, mappings = settings.topics.len(), "bridge starting");
    Ok(tollgate_bridge::start(broker, settings)?)
}

fn bridge_status(bridge: &tollgate_bridge::BridgeHandle) -> serde_json::Value {
    use tollgate_bridge::BridgeStats;
    let stats = &bridge.stats;
    serde_json::json!({
        "name": bridge.name,
        "connected": stats.connected.load(Ordering::Relaxed),
        "connects": BridgeStats::get(&stats.connects),
        "sent": BridgeStats::get(&stats.sent),
        "received": BridgeStats::get(&stats.received),
        "dropped_by_policy": BridgeStats::get(&stats.dropped_by_policy),
        "refused_by_remote": BridgeStats::get(&stats.refused_by_remote),
        "remote_busy": BridgeStats::get(&stats.remote_busy),
        "queued": BridgeStats::get(&stats.queued),
        "inflight": BridgeStats::get(&stats.inflight),
        "dropped_overflow": BridgeStats::get(&stats.dropped_overflow),
        "expired": BridgeStats::get(&stats.expired),
        "journal_failures": BridgeStats::get(&stats.journal_failures),
    })
}
