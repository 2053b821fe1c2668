//! The configuration file: TOML, merged over embedded defaults and under `TOLLGATE_` environment overrides
//! (`TOLLGATE_LIMITS__MAX_INFLIGHT=64`). Loading collects every problem, each with its key, before refusing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Provider};
use serde::{Deserialize, Serialize};
use tollgate_core::{BrokerConfig, DeniedPublish, OverflowPolicy};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub sys: SysConfig,
    pub log: LogConfig,
    pub session: SessionConfig,
    #[serde(default)]
    pub persistence: PersistenceConfig,
    pub runtime: RuntimeConfig,
    /// Policy plugins, in chain order.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
    /// Links to other brokers.
    #[serde(default)]
    pub bridges: Vec<crate::bridge_config::BridgeConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Connection worker threads; 0 means one per available core.
    pub worker_threads: u16,
    /// Where compiled WebAssembly plugins are cached (`.cwasm`), so a restart does not recompile them. Unset:
    /// `$XDG_CACHE_HOME/tollgate/plugins` or `~/.cache/tollgate/plugins`; an empty string turns caching off.
    #[serde(default)]
    pub plugin_cache_dir: Option<PathBuf>,
    /// Where plugins keep what must survive a restart (`kv-set-durable`: replay counters, for instance), one
    /// file per plugin. Unset: `$XDG_STATE_HOME/tollgate` or `~/.local/state/tollgate`; an empty string keeps
    /// nothing (durable writes then fail).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Milliseconds between fsyncs of the plugins' state files (what reached the operating system then survives a
    /// power cut); 0 leaves it to the operating system's writeback. A durable `kv-add` (a counter that must not
    /// repeat) is synced before its call returns whatever this is.
    pub state_sync_ms: u32,
    /// A Unix-domain socket (created owner-only) where `tollgate reload` asks the running broker to reload and
    /// hears back what happened. Unset: no admin socket (SIGHUP still reloads).
    #[serde(default)]
    pub admin_socket: Option<PathBuf>,
}

/// One `[[plugins]]` entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    pub name: String,
    /// `wasm` or `lua`.
    pub kind: String,
    pub path: PathBuf,
    /// The hooks to attach (`authenticate`, `authorize`, `transform`, `route`); unset: all the plugin implements.
    #[serde(default)]
    pub hooks: Option<Vec<String>>,
    #[serde(default)]
    pub limits: PluginLimitsConfig,
    /// Hook name → `fail_closed` or `pass_through`.
    #[serde(default)]
    pub on_failure: std::collections::BTreeMap<String, String>,
    /// Let connections cache this plugin's ACL decisions until the next reload (only for decisions that depend on
    /// nothing but the client and the topic).
    #[serde(default)]
    pub cache_decisions: bool,
    /// Key id → `hex:…`, `env:VAR` or `file:path`, for the host-side HMAC. The plugin never sees the bytes.
    #[serde(default)]
    pub secrets: std::collections::BTreeMap<String, String>,
    /// Handed to the plugin's `init`.
    #[serde(default)]
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Name → path of a text file the broker reads for the plugin and hands to `init` as `files.<name>`; a
    /// changed file reloads the plugin on SIGHUP (revocation lists, for instance).
    #[serde(default)]
    pub files: std::collections::BTreeMap<String, PathBuf>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PluginLimitsConfig {
    /// Guest CPU time per call, in milliseconds.
    pub cpu_ms: u64,
    /// Memory per instance, in MiB.
    pub memory_mb: u32,
    /// Wall-clock time per call (waiting for an instance included), in milliseconds.
    pub timeout_ms: u64,
    /// Instances alive at once.
    pub max_instances: u32,
}

impl Default for PluginLimitsConfig {
    fn default() -> Self {
        let limits = tollgate_plugin_host::Limits::default();
        Self {
            cpu_ms: limits.cpu_time.as_millis() as u64,
            memory_mb: (limits.memory_bytes >> 20) as u32,
            timeout_ms: limits.call_timeout.as_millis() as u64,
            max_instances: limits.max_instances as u32,
        }
    }
}

impl PluginConfig {
    /// The validated plugin specification, or every problem with its key (`plugins[<index>].<key>`).
    pub fn spec(&self, index: usize) -> Result<tollgate_plugin_host::PluginSpec, Vec<ConfigProblem>> {
        use tollgate_plugin_host::{HookKind, PluginKind, PluginSpec};
        let key = |name: &str| format!("plugins[{index}].{name}");
        let mut problems = Vec::new();
        // The name becomes a `$SYS` topic level and a log field.
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            problems.push(problem(key("name"), "must be non-empty letters, digits, '-', '_' or '.'"));
        }
        let kind = match self.kind.parse::<PluginKind>() {
            Ok(kind) => kind,
            Err(message) => {
                problems.push(problem(key("kind"), message));
                PluginKind::Wasm
            }
        };
        if !self.path.is_file() {
            problems.push(problem(key("path"), format!("cannot read {}", self.path.display())));
        }
        let mut spec = PluginSpec::new(self.name.clone(), kind, self.path.clone());
        if let Some(hooks) = &self.hooks {
            let mut parsed = Vec::new();
            for hook in hooks {
                match hook.parse::<HookKind>() {
                    Ok(hook) if !parsed.contains(&hook) => parsed.push(hook),
                    Ok(hook) => problems.push(problem(key("hooks"), format!("{hook} is listed twice"))),
                    Err(message) => problems.push(problem(key("hooks"), message)),
                }
            }
            if hooks.is_empty() {
                problems.push(problem(key("hooks"), "must name at least one hook (or be left out for all)"));
            }
            spec.hooks = Some(parsed);
        }
        for (hook, policy) in &self.on_failure {
            let hook = match hook.parse::<HookKind>() {
                Ok(hook) => hook,
                Err(message) => {
                    problems.push(problem(key(&format!("on_failure.{hook}")), message));
                    continue;
                }
            };
            let policy = match policy.as_str() {
                "fail_closed" => tollgate_hooks::FailurePolicy::FailClosed,
                "pass_through" => tollgate_hooks::FailurePolicy::PassThrough,
                other => {
                    problems.push(problem(
                        key(&format!("on_failure.{hook}")),
                        format!("{other:?} is not \"fail_closed\" or \"pass_through\""),
                    ));
                    continue;
                }
            };
            spec.on_failure.insert(hook, policy);
        }
        for (id, spelling) in &self.secrets {
            match tollgate_plugin_host::spec::resolve_secret(spelling) {
                Ok(secret) if !secret.is_empty() => {
                    spec.secrets.insert(id.clone(), secret);
                }
                Ok(_) => problems.push(problem(key(&format!("secrets.{id}")), "the secret is empty")),
                Err(message) => problems.push(problem(key(&format!("secrets.{id}")), message)),
            }
        }
        let limits = &self.limits;
        if !(1..=60_000).contains(&limits.cpu_ms) {
            problems.push(problem(key("limits.cpu_ms"), "must be between 1 and 60000"));
        }
        if !(1..=4096).contains(&limits.memory_mb) {
            problems.push(problem(key("limits.memory_mb"), "must be between 1 and 4096"));
        }
        if !(1..=600_000).contains(&limits.timeout_ms) {
            problems.push(problem(key("limits.timeout_ms"), "must be between 1 and 600000"));
        }
        if !(1..=1024).contains(&limits.max_instances) {
            problems.push(problem(key("limits.max_instances"), "must be between 1 and 1024"));
        }
        spec.limits = tollgate_plugin_host::Limits {
            cpu_time: Duration::from_millis(limits.cpu_ms),
            memory_bytes: (limits.memory_mb as usize) << 20,
            call_timeout: Duration::from_millis(limits.timeout_ms),
            max_instances: limits.max_instances as usize,
        };
        spec.cache_decisions = self.cache_decisions;
        spec.config = self.config.clone();
        for (name, path) in &self.files {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')) {
                problems.push(problem(key(&format!("files.{name}")), "a file's name is letters, digits, '-' or '_'"));
            } else if let Err(error) = std::fs::File::open(path) {
                problems
                    .push(problem(key(&format!("files.{name}")), format!("cannot read {}: {error}", path.display())));
            }
        }
        if self.config.contains_key("files") && !self.files.is_empty() {
            problems.push(problem(key("config.files"), "is reserved for the contents of `files`"));
        }
        spec.files = self.files.clone();
        if problems.is_empty() { Ok(spec) } else { Err(problems) }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub bind: String,
    /// `tcp`, `tls`, `ws` or `wss`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Server certificate chain (PEM), for `tls` and `wss`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM: PKCS#8, RSA or EC).
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// CA bundle that client certificates must chain to; without it no client certificate is requested.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    #[serde(default)]
    pub require_client_cert: bool,
    /// Certificate revocation lists (PEM) for client certificates.
    #[serde(default)]
    pub crl: Vec<PathBuf>,
    /// HTTP path of the WebSocket endpoint (`ws`, `wss`).
    #[serde(default = "default_ws_path")]
    pub ws_path: String,
    /// `cn`, `san_uri:<prefix>`, `subject_serial` or `none`.
    #[serde(default = "default_identity_from")]
    pub identity_from: String,
    /// The client certificate's identity becomes the user name and authenticates the client (Mosquitto's option).
    #[serde(default)]
    pub use_identity_as_username: bool,
    /// Connections this listener accepts at once; 0 = no cap of its own.
    #[serde(default)]
    pub max_connections: u32,
    /// A topic prefix every topic of this listener's clients lives under (Mosquitto's `mount_point`): added to
    /// what they publish and subscribe to, removed from what they receive. `%c` and `%u` fill in the client id
    /// and user name as one literal level, e.g. `v1/vehicles/%c/`.
    #[serde(default)]
    pub mount_point: Option<String>,
}

impl ListenerConfig {
    pub fn tcp(bind: impl Into<String>) -> Self {
        Self {
            bind: bind.into(),
            protocol: default_protocol(),
            name: None,
            cert: None,
            key: None,
            client_ca: None,
            require_client_cert: false,
            crl: Vec::new(),
            ws_path: default_ws_path(),
            identity_from: default_identity_from(),
            use_identity_as_username: false,
            max_connections: 0,
            mount_point: None,
        }
    }

    pub fn uses_tls(&self) -> bool {
        matches!(self.protocol.as_str(), "tls" | "wss")
    }

    pub fn tls_settings(&self) -> Option<tollgate_transport::TlsSettings> {
        Some(tollgate_transport::TlsSettings {
            cert: self.cert.clone()?,
            key: self.key.clone()?,
            client_ca: self.client_ca.clone(),
            require_client_cert: self.require_client_cert,
            crl: self.crl.clone(),
        })
    }
}

fn default_ws_path() -> String {
    "/mqtt".into()
}

fn default_identity_from() -> String {
    "cn".into()
}

fn default_protocol() -> String {
    "tcp".into()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// `None` means "not said": allowed only when every listener is on loopback.
    pub allow_anonymous: Option<bool>,
    pub password_file: Option<PathBuf>,
    pub acl_file: Option<PathBuf>,
    /// What an MQTT 3.1.1 client gets for a refused PUBLISH: "drop" (acknowledged and dropped, Mosquitto's
    /// behaviour) or "disconnect". MQTT 5 clients always get PUBACK/PUBREC 0x87.
    pub on_publish_denied: Option<String>,
    /// When a reload or recheck revokes a client (a policy now denies its session), also remove the retained
    /// messages it set, so they do not outlive its access (CVE-2018-12546). Off by default: it deletes data.
    #[serde(default)]
    pub purge_retained_on_revoke: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_keepalive: u16,
    pub max_packet_size: u32,
    pub max_inflight: u16,
    pub max_queued_messages: u32,
    pub overflow_policy: String,
    pub queue_qos0_offline: bool,
    pub topic_alias_maximum: u16,
    /// Seconds a new socket has to complete CONNECT (TLS and WebSocket handshakes included).
    pub connect_timeout: u32,
    /// Connections open at once over all listeners; 0 = no cap.
    pub max_connections: u32,
    /// New connections per second from one source address (also the burst); 0 = no limit.
    pub max_connection_rate: u32,
    /// PUBLISH packets per second one client may send; 0 = no limit.
    pub max_publish_rate: u32,
    /// PUBLISH payload bytes per second one client may send; 0 = no limit.
    pub max_publish_bytes_rate: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SysConfig {
    /// Seconds between `$SYS` updates; 0 turns them off.
    pub interval: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `tollgate_core=debug`; `RUST_LOG` wins when set.
    pub level: String,
    pub format: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Seconds an MQTT 3.1.1 persistent session survives disconnected; 0 keeps it forever.
    pub persistent_expiry: u32,
    /// Seconds shutdown waits for connections to close.
    pub shutdown_grace: u32,
    /// Milliseconds between rechecks of every session against the authorization hooks (revocations, expiring
    /// grants); 0 rechecks only after a reload.
    #[serde(default)]
    pub recheck_interval_ms: u32,
}

/// Retained messages and persistent sessions kept across restarts (Mosquitto's `persistence`): a state file written
/// at shutdown and every `autosave_interval` seconds, read back at start.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PersistenceConfig {
    pub enabled: bool,
    /// The state file; unset: `broker.state` in `runtime.state_dir`.
    pub file: Option<PathBuf>,
    /// Seconds between saves while running (what a crash or power cut can lose); 0 saves only at shutdown.
    pub autosave_interval: u32,
}

impl Default for PersistenceConfig {
    fn default() -> Self {
        Self { enabled: false, file: None, autosave_interval: 60 }
    }
}

impl Default for Config {
    fn default() -> Self {
        let core = BrokerConfig::default();
        Self {
            listeners: vec![ListenerConfig::tcp("127.0.0.1:1883")],
            auth: AuthConfig::default(),
            limits: LimitsConfig {
                max_keepalive: core.max_keepalive,
                max_packet_size: core.max_packet_size,
                max_inflight: core.max_inflight,
                max_queued_messages: core.max_queued_messages as u32,
                overflow_policy: "drop_newest".into(),
                queue_qos0_offline: core.queue_qos0_offline,
                topic_alias_maximum: core.topic_alias_maximum,
                connect_timeout: core.connect_timeout.as_secs() as u32,
                max_connections: 0,
                max_connection_rate: 0,
                max_publish_rate: core.max_publish_rate,
                max_publish_bytes_rate: core.max_publish_bytes_rate,
            },
            sys: SysConfig { interval: 10 },
            log: LogConfig { level: "info".into(), format: "human".into() },
            session: SessionConfig { persistent_expiry: 0, shutdown_grace: 5, recheck_interval_ms: 0 },
            persistence: PersistenceConfig::default(),
            runtime: RuntimeConfig {
                worker_threads: 0,
                plugin_cache_dir: None,
                state_dir: None,
                state_sync_ms: u32::try_from(tollgate_plugin_host::DEFAULT_STATE_SYNC.as_millis()).unwrap_or(u32::MAX),
                admin_socket: None,
            },
            plugins: Vec::new(),
            bridges: Vec::new(),
        }
    }
}

/// One problem in a configuration, named by its key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigProblem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

fn problem(key: impl Into<String>, message: impl Into<String>) -> ConfigProblem {
    ConfigProblem { key: key.into(), message: message.into() }
}

/// Every key the file may contain, for the unknown-key check. `listeners.*` are per array element.
const SECTION_KEYS: &[(&str, &[&str])] = &[
    ("auth", &["allow_anonymous", "password_file", "acl_file", "on_publish_denied", "purge_retained_on_revoke"]),
    (
        "limits",
        &[
            "max_keepalive",
            "max_packet_size",
            "max_inflight",
            "max_queued_messages",
            "overflow_policy",
            "queue_qos0_offline",
            "topic_alias_maximum",
            "connect_timeout",
            "max_connections",
            "max_connection_rate",
            "max_publish_rate",
            "max_publish_bytes_rate",
        ],
    ),
    ("sys", &["interval"]),
    ("log", &["level", "format"]),
    ("session", &["persistent_expiry", "shutdown_grace", "recheck_interval_ms"]),
    ("persistence", &["enabled", "file", "autosave_interval"]),
    ("runtime", &["worker_threads", "plugin_cache_dir", "state_dir", "state_sync_ms", "admin_socket"]),
];
const PLUGIN_KEYS: &[&str] =
    &["name", "kind", "path", "hooks", "limits", "on_failure", "cache_decisions", "secrets", "config", "files"];
const PLUGIN_LIMIT_KEYS: &[&str] = &["cpu_ms", "memory_mb", "timeout_ms", "max_instances"];
const LISTENER_KEYS: &[&str] = &[
    "bind",
    "protocol",
    "name",
    "cert",
    "key",
    "client_ca",
    "require_client_cert",
    "crl",
    "ws_path",
    "identity_from",
    "use_identity_as_username",
    "max_connections",
    "mount_point",
];

/// Builds the figment: defaults, then the file (if any), then the environment.
pub fn figment(file: Option<&Path>) -> Figment {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(file) = file {
        figment = figment.merge(Toml::file_exact(file));
    }
    // Only variables that name a configuration section are configuration; TOLLGATE_SOMETHING_ELSE is left alone.
    figment.merge(Env::prefixed("TOLLGATE_").split("__").filter(|key| {
        // figment may hand the key over before or after `split` maps `__` to `.`; accept both spellings.
        let section = key.as_str().split(['.', '_']).next().unwrap_or_default().to_ascii_lowercase();
        section == "listeners" || SECTION_KEYS.iter().any(|(name, _)| *name == section)
    }))
}

/// Loads and validates. On failure every problem found is returned, never just the first.
pub fn load(file: Option<&Path>) -> Result<Config, Vec<ConfigProblem>> {
    if let Some(file) = file
        && !file.is_file()
    {
        return Err(vec![problem("config", format!("cannot read {}", file.display()))]);
    }
    let figment = figment(file);
    let mut problems = Vec::new();
    let data = match figment.data() {
        Ok(mut data) => data.remove(&figment::Profile::Default).unwrap_or_default(),
        Err(error) => {
            return Err(error.into_iter().map(|error| problem(error_key(&error), error.kind.to_string())).collect());
        }
    };
    check_unknown_keys(&data, &mut problems);
    // Extract key by key so one bad value does not hide the next.
    for (section, keys) in SECTION_KEYS {
        for key in *keys {
            let path = format!("{section}.{key}");
            if let Err(error) = check_key(&figment, section, key) {
                problems.push(problem(path, error));
            }
        }
    }
    if let Err(error) = figment.extract_inner::<Vec<ListenerConfig>>("listeners") {
        for error in error {
            problems.push(problem(error_key(&error), error.kind.to_string()));
        }
    }
    if data.contains_key("plugins")
        && let Err(error) = figment.extract_inner::<Vec<PluginConfig>>("plugins")
    {
        for error in error {
            // Unknown keys are already reported, by name, by `check_unknown_keys`.
            if !matches!(error.kind, figment::error::Kind::UnknownField(..)) {
                problems.push(problem(list_error_key("plugins", &error), error.kind.to_string()));
            }
        }
    }
    check_bridges(&data, &mut problems);
    if !problems.is_empty() {
        // Still check what can be checked: drop the keys already reported, validate the rest on top of the
        // defaults, and add the problems found under keys not yet named.
        let mut cleaned = data.clone();
        for reported in &problems {
            remove_key(&mut cleaned, &reported.key);
        }
        let lenient = Figment::from(Serialized::defaults(Config::default())).merge(Serialized::defaults(cleaned));
        if let Ok(config) = lenient.extract::<Config>() {
            let mut more = Vec::new();
            validate(&config, &mut more);
            for extra in more {
                if !problems.iter().any(|reported| reported.key == extra.key) {
                    problems.push(extra);
                }
            }
        }
        return Err(problems);
    }
    let config: Config = match figment.extract() {
        Ok(config) => config,
        Err(error) => {
            return Err(error.into_iter().map(|error| problem(error_key(&error), error.kind.to_string())).collect());
        }
    };
    validate(&config, &mut problems);
    if problems.is_empty() { Ok(config) } else { Err(problems) }
}

/// Removes `section.key`, a top-level key, or (for any `listeners…` key) the whole listener list.
fn remove_key(data: &mut Dict, key: &str) {
    for list in ["listeners", "plugins", "bridges"] {
        if key.starts_with(list) {
            data.remove(list);
            return;
        }
    }
    match key.split_once('.') {
        None => {
            data.remove(key);
        }
        Some((section, field)) => {
            if let Some(Value::Dict(_, fields)) = data.get_mut(section) {
                fields.remove(field);
            }
        }
    }
}

/// `plugins[0].hooks` for an error figment places at `0.hooks` in the list.
fn list_error_key(list: &str, error: &figment::Error) -> String {
    let parts: Vec<&str> = error.path.iter().map(String::as_str).filter(|part| *part != list).collect();
    match parts.split_first() {
        Some((index, rest)) if index.parse::<usize>().is_ok() => {
            rest.iter().fold(format!("{list}[{index}]"), |key, part| format!("{key}.{part}"))
        }
        _ => list.to_owned(),
    }
}

/// Each `[[bridges]]` entry on its own, so one bad bridge does not hide the problems of the next.
fn check_bridges(data: &Dict, problems: &mut Vec<ConfigProblem>) {
    use crate::bridge_config::BridgeConfig;
    let Some(value) = data.get("bridges") else { return };
    let Value::Array(_, bridges) = value else {
        problems.push(problem("bridges", "must be a list of tables ([[bridges]])"));
        return;
    };
    let mut names: Vec<String> = Vec::new();
    for (index, bridge) in bridges.iter().enumerate() {
        match Figment::from(Serialized::defaults(bridge)).extract::<BridgeConfig>() {
            Ok(bridge) => {
                if names.contains(&bridge.name) {
                    problems
                        .push(problem(format!("bridges[{index}].name"), format!("{:?} is used twice", bridge.name)));
                }
                names.push(bridge.name.clone());
                if let Err(more) = bridge.settings(index) {
                    problems.extend(more);
                }
            }
            Err(errors) => {
                for error in errors {
                    if !matches!(error.kind, figment::error::Kind::UnknownField(..)) {
                        let key = std::iter::once(format!("bridges[{index}]"))
                            .chain(error.path.iter().cloned())
                            .collect::<Vec<_>>()
                            .join(".");
                        problems.push(problem(key, error.kind.to_string()));
                    }
                }
            }
        }
    }
}

fn error_key(error: &figment::Error) -> String {
    if error.path.is_empty() { "config".into() } else { error.path.join(".") }
}

fn check_key(figment: &Figment, section: &str, key: &str) -> Result<(), String> {
    let path = format!("{section}.{key}");
    let result = match (section, key) {
        ("auth", "allow_anonymous" | "purge_retained_on_revoke") => {
            figment.extract_inner::<Option<bool>>(&path).map(drop)
        }
        ("auth", "on_publish_denied") => figment.extract_inner::<Option<String>>(&path).map(drop),
        ("persistence", "enabled") => figment.extract_inner::<bool>(&path).map(drop),
        ("auth", _) | ("runtime", "plugin_cache_dir" | "state_dir" | "admin_socket") | ("persistence", "file") => {
            figment.extract_inner::<Option<PathBuf>>(&path).map(drop)
        }
        ("runtime", "state_sync_ms") => figment.extract_inner::<u32>(&path).map(drop),
        ("limits", "max_keepalive" | "max_inflight" | "topic_alias_maximum") | ("runtime", _) => {
            figment.extract_inner::<u16>(&path).map(drop)
        }
        ("limits", "overflow_policy") | ("log", _) => figment.extract_inner::<String>(&path).map(drop),
        ("limits", "queue_qos0_offline") => figment.extract_inner::<bool>(&path).map(drop),
        _ => figment.extract_inner::<u32>(&path).map(drop),
    };
    match result {
        Ok(()) => Ok(()),
        // A missing optional key is fine; every required key has a default.
        Err(error) if matches!(error.kind, figment::error::Kind::MissingField(_)) => Ok(()),
        Err(error) => Err(error.kind.to_string()),
    }
}

fn check_unknown_keys(data: &Dict, problems: &mut Vec<ConfigProblem>) {
    for (key, value) in data {
        if key == "listeners" {
            if let Value::Array(_, listeners) = value {
                for (index, listener) in listeners.iter().enumerate() {
                    if let Value::Dict(_, fields) = listener {
                        for field in fields.keys().filter(|field| !LISTENER_KEYS.contains(&field.as_str())) {
                            problems.push(problem(format!("listeners[{index}].{field}"), "unknown key"));
                        }
                    }
                }
            }
            continue;
        }
        if key == "plugins" {
            if let Value::Array(_, plugins) = value {
                for (index, plugin) in plugins.iter().enumerate() {
                    let Value::Dict(_, fields) = plugin else { continue };
                    for (field, value) in fields {
                        if !PLUGIN_KEYS.contains(&field.as_str()) {
                            problems.push(problem(format!("plugins[{index}].{field}"), "unknown key"));
                        } else if field == "limits"
                            && let Value::Dict(_, limits) = value
                        {
                            for limit in limits.keys().filter(|limit| !PLUGIN_LIMIT_KEYS.contains(&limit.as_str())) {
                                problems.push(problem(format!("plugins[{index}].limits.{limit}"), "unknown key"));
                            }
                        }
                    }
                }
            }
            continue;
        }
        if key == "bridges" {
            check_bridge_keys(value, problems);
            continue;
        }
        let Some((_, known)) = SECTION_KEYS.iter().find(|(section, _)| section == key) else {
            problems.push(problem(key.clone(), "unknown section or key"));
            continue;
        };
        if let Value::Dict(_, fields) = value {
            for field in fields.keys().filter(|field| !known.contains(&field.as_str())) {
                problems.push(problem(format!("{key}.{field}"), "unknown key"));
            }
        }
    }
}

fn check_bridge_keys(value: &Value, problems: &mut Vec<ConfigProblem>) {
    use crate::bridge_config::{BRIDGE_KEYS, BRIDGE_QUEUE_KEYS, BRIDGE_TLS_KEYS, BRIDGE_TOPIC_KEYS};
    let Value::Array(_, bridges) = value else { return };
    for (index, bridge) in bridges.iter().enumerate() {
        let Value::Dict(_, fields) = bridge else { continue };
        for (field, value) in fields {
            let key = format!("bridges[{index}].{field}");
            match (field.as_str(), value) {
                ("tls", Value::Dict(_, tls)) => {
                    for unknown in tls.keys().filter(|name| !BRIDGE_TLS_KEYS.contains(&name.as_str())) {
                        problems.push(problem(format!("{key}.{unknown}"), "unknown key"));
                    }
                }
                ("queue", Value::Dict(_, queue)) => {
                    for unknown in queue.keys().filter(|name| !BRIDGE_QUEUE_KEYS.contains(&name.as_str())) {
                        problems.push(problem(format!("{key}.{unknown}"), "unknown key"));
                    }
                }
                ("topics", Value::Array(_, topics)) => {
                    for (position, topic) in topics.iter().enumerate() {
                        let Value::Dict(_, topic) = topic else { continue };
                        for unknown in topic.keys().filter(|name| !BRIDGE_TOPIC_KEYS.contains(&name.as_str())) {
                            problems.push(problem(format!("{key}[{position}].{unknown}"), "unknown key"));
                        }
                    }
                }
                (name, _) if !BRIDGE_KEYS.contains(&name) => problems.push(problem(key, "unknown key")),
                _ => {}
            }
        }
    }
}

fn validate(config: &Config, problems: &mut Vec<ConfigProblem>) {
    validate_listeners(config, problems);
    validate_rest(config, problems);
    if let Some(socket) = &config.runtime.admin_socket {
        if socket.as_os_str().is_empty() {
            problems.push(problem("runtime.admin_socket", "an empty path; leave the key out for no admin socket"));
        } else if !cfg!(unix) {
            problems.push(problem("runtime.admin_socket", "admin sockets are Unix-domain sockets: not on this system"));
        }
    }
    if let Err(more) = config.plugin_specs() {
        problems.extend(more);
    }
    if config.persistence.enabled {
        match config.persistence_file() {
            None => problems.push(problem(
                "persistence.file",
                "no state file: set persistence.file, or a runtime.state_dir for the default",
            )),
            Some(file) if file.is_dir() => {
                problems.push(problem("persistence.file", format!("{} is a directory", file.display())))
            }
            Some(_) => {}
        }
    }
}

/// Listener addresses and protocols, and the anonymous-access rule that depends on them.
pub fn validate_listeners(config: &Config, problems: &mut Vec<ConfigProblem>) {
    if config.listeners.is_empty() {
        problems.push(problem("listeners", "at least one listener is required"));
    }
    let mut all_loopback = true;
    for (index, listener) in config.listeners.iter().enumerate() {
        match listener.bind.parse::<SocketAddr>() {
            Ok(address) => all_loopback &= address.ip().is_loopback(),
            Err(_) => problems.push(problem(
                format!("listeners[{index}].bind"),
                format!("{:?} is not an address:port", listener.bind),
            )),
        }
        validate_transport(index, listener, problems);
    }
    if config.auth.allow_anonymous.is_none() && !all_loopback && config.auth.password_file.is_none() {
        problems.push(problem(
            "auth.allow_anonymous",
            "a listener is reachable beyond loopback: set allow_anonymous = true explicitly, or configure a password_file",
        ));
    }
}

fn validate_transport(index: usize, listener: &ListenerConfig, problems: &mut Vec<ConfigProblem>) {
    let key = |name: &str| format!("listeners[{index}].{name}");
    if !matches!(listener.protocol.as_str(), "tcp" | "tls" | "ws" | "wss") {
        problems.push(problem(
            key("protocol"),
            format!("{:?} is not one of \"tcp\", \"tls\", \"ws\", \"wss\"", listener.protocol),
        ));
        return;
    }
    if let Err(message) = listener.identity_from.parse::<tollgate_transport::IdentitySource>() {
        problems.push(problem(key("identity_from"), message));
    }
    if let Some(mount) = &listener.mount_point
        && let Err(message) = tollgate_core::connection::check_mount_point(mount)
    {
        problems.push(problem(key("mount_point"), message));
    }
    if matches!(listener.protocol.as_str(), "ws" | "wss") && !listener.ws_path.starts_with('/') {
        problems.push(problem(key("ws_path"), format!("{:?} must start with /", listener.ws_path)));
    }
    if !listener.uses_tls() {
        for (name, set) in [
            ("cert", listener.cert.is_some()),
            ("key", listener.key.is_some()),
            ("client_ca", listener.client_ca.is_some()),
            ("require_client_cert", listener.require_client_cert),
            ("crl", !listener.crl.is_empty()),
            ("use_identity_as_username", listener.use_identity_as_username),
        ] {
            if set {
                problems.push(problem(
                    key(name),
                    format!("only applies to tls and wss listeners, not {}", listener.protocol),
                ));
            }
        }
        return;
    }
    let mut complete = true;
    for (name, path) in [("cert", &listener.cert), ("key", &listener.key), ("client_ca", &listener.client_ca)] {
        match path {
            None if name != "client_ca" => {
                complete = false;
                problems.push(problem(key(name), format!("a {} listener needs a {name} file", listener.protocol)));
            }
            Some(path) if std::fs::metadata(path).is_err() => {
                complete = false;
                problems.push(problem(key(name), format!("cannot read {}", path.display())));
            }
            _ => {}
        }
    }
    if listener.client_ca.is_none() {
        for (name, set) in [
            ("require_client_cert", listener.require_client_cert),
            ("use_identity_as_username", listener.use_identity_as_username),
            ("crl", !listener.crl.is_empty()),
        ] {
            if set {
                complete = false;
                problems.push(problem(key(name), "needs client_ca (the CA client certificates are verified against)"));
            }
        }
    }
    // Building the rustls configuration reads and checks every file, so each unreadable or mismatched file is
    // reported now, under the key that names it.
    if complete
        && let Some(settings) = listener.tls_settings()
        && let Err(error) = tollgate_transport::tls::server_config(&settings)
    {
        let culprit = match &error {
            tollgate_transport::TransportError::File { path, .. } if Some(path) == listener.cert.as_ref() => "cert",
            tollgate_transport::TransportError::File { path, .. } if Some(path) == listener.client_ca.as_ref() => {
                "client_ca"
            }
            tollgate_transport::TransportError::File { path, .. } if listener.crl.contains(path) => "crl",
            _ => "key",
        };
        problems.push(problem(key(culprit), error.to_string()));
    }
}

/// Why a password or ACL file cannot be used.
#[derive(Debug)]
pub enum PolicyFileError {
    Unreadable(std::io::Error),
    /// Every bad line, described.
    Invalid(Vec<String>),
}

/// Reads a password or ACL file and parses it with `parse`; used both by validation and when the hooks are built.
pub fn read_policy_file<T, E: ToString>(
    path: &Path,
    parse: impl FnOnce(&str) -> Result<T, Vec<E>>,
) -> Result<T, PolicyFileError> {
    let text = std::fs::read_to_string(path).map_err(PolicyFileError::Unreadable)?;
    parse(&text).map_err(|errors| PolicyFileError::Invalid(errors.iter().map(ToString::to_string).collect()))
}

fn report_policy_file(problems: &mut Vec<ConfigProblem>, key: &str, path: &Path, error: Option<PolicyFileError>) {
    match error {
        Some(PolicyFileError::Unreadable(error)) => {
            problems.push(problem(key, format!("cannot read {}: {error}", path.display())));
        }
        Some(PolicyFileError::Invalid(errors)) => {
            for error in errors {
                problems.push(problem(key, format!("{}: {error}", path.display())));
            }
        }
        None => {}
    }
}

fn validate_rest(config: &Config, problems: &mut Vec<ConfigProblem>) {
    if let Some(path) = &config.auth.password_file {
        let outcome = read_policy_file(path, tollgate_builtins::password_file::PasswordFile::parse);
        report_policy_file(problems, "auth.password_file", path, outcome.err());
    }
    if let Some(path) = &config.auth.acl_file {
        let outcome = read_policy_file(path, tollgate_builtins::acl_file::AclFile::parse);
        report_policy_file(problems, "auth.acl_file", path, outcome.err());
    }
    let limits = &config.limits;
    if limits.max_packet_size < 64 || limits.max_packet_size as usize > tollgate_protocol::MAX_REMAINING_LENGTH + 5 {
        problems.push(problem("limits.max_packet_size", "must be between 64 and 268435460 bytes"));
    }
    if limits.max_inflight == 0 {
        problems.push(problem("limits.max_inflight", "must be at least 1"));
    }
    if limits.max_queued_messages == 0 {
        problems.push(problem("limits.max_queued_messages", "must be at least 1"));
    }
    if parse_denied_publish(config.auth.on_publish_denied.as_deref()).is_none() {
        problems.push(problem("auth.on_publish_denied", "must be \"drop\" or \"disconnect\""));
    }
    if parse_overflow(&limits.overflow_policy).is_none() {
        problems.push(problem("limits.overflow_policy", "must be \"drop_newest\" or \"drop_oldest\""));
    }
    if limits.connect_timeout == 0 {
        problems.push(problem("limits.connect_timeout", "must be at least 1 second"));
    }
    if !matches!(config.log.format.as_str(), "human" | "json") {
        problems.push(problem("log.format", "must be \"human\" or \"json\""));
    }
    if tracing_subscriber::EnvFilter::try_new(&config.log.level).is_err() {
        problems.push(problem("log.level", format!("{:?} is not a valid log filter", config.log.level)));
    }
}

fn parse_denied_publish(value: Option<&str>) -> Option<DeniedPublish> {
    match value {
        None | Some("drop") => Some(DeniedPublish::Drop),
        Some("disconnect") => Some(DeniedPublish::Disconnect),
        Some(_) => None,
    }
}

fn parse_overflow(value: &str) -> Option<OverflowPolicy> {
    match value {
        "drop_newest" => Some(OverflowPolicy::DropNewest),
        "drop_oldest" => Some(OverflowPolicy::DropOldest),
        _ => None,
    }
}

impl Config {
    pub fn broker_config(&self) -> BrokerConfig {
        let limits = &self.limits;
        BrokerConfig {
            max_keepalive: limits.max_keepalive,
            max_packet_size: limits.max_packet_size,
            max_inflight: limits.max_inflight,
            max_queued_messages: limits.max_queued_messages as usize,
            overflow_policy: parse_overflow(&limits.overflow_policy).unwrap_or_default(),
            publish_denied_v311: parse_denied_publish(self.auth.on_publish_denied.as_deref()).unwrap_or_default(),
            purge_retained_on_revoke: self.auth.purge_retained_on_revoke,
            queue_qos0_offline: limits.queue_qos0_offline,
            topic_alias_maximum: limits.topic_alias_maximum,
            connect_timeout: Duration::from_secs(u64::from(limits.connect_timeout)),
            shutdown_grace: Duration::from_secs(u64::from(self.session.shutdown_grace)),
            sys_interval: Duration::from_secs(u64::from(self.sys.interval)),
            retain_available: true,
            persistent_session_expiry: (self.session.persistent_expiry > 0)
                .then(|| Duration::from_secs(u64::from(self.session.persistent_expiry))),
            max_publish_rate: limits.max_publish_rate,
            max_publish_bytes_rate: limits.max_publish_bytes_rate,
        }
    }

    pub fn allow_anonymous(&self) -> bool {
        self.auth.allow_anonymous.unwrap_or(true)
    }

    /// Every plugin's specification, or every problem found in any of them (names must also be unique).
    pub fn plugin_specs(&self) -> Result<Vec<tollgate_plugin_host::PluginSpec>, Vec<ConfigProblem>> {
        let mut specs = Vec::new();
        let mut problems = Vec::new();
        for (index, plugin) in self.plugins.iter().enumerate() {
            if self.plugins[..index].iter().any(|earlier| earlier.name == plugin.name) {
                problems.push(problem(format!("plugins[{index}].name"), format!("{:?} is used twice", plugin.name)));
            }
            match plugin.spec(index) {
                Ok(mut spec) => {
                    spec.state_file = self.state_dir().map(|dir| dir.join("plugins").join(format!("{}.kv", spec.name)));
                    spec.state_sync = Duration::from_millis(u64::from(self.runtime.state_sync_ms));
                    specs.push(spec)
                }
                Err(more) => problems.extend(more),
            }
        }
        if problems.is_empty() { Ok(specs) } else { Err(problems) }
    }

    /// The validated bridges, or every problem with its key.
    pub fn bridge_settings(&self) -> Result<Vec<tollgate_bridge::BridgeSettings>, Vec<ConfigProblem>> {
        let mut settings = Vec::new();
        let mut problems = Vec::new();
        for (index, bridge) in self.bridges.iter().enumerate() {
            if self.bridges[..index].iter().any(|earlier| earlier.name == bridge.name) {
                problems.push(problem(format!("bridges[{index}].name"), format!("{:?} is used twice", bridge.name)));
            }
            match bridge.settings(index) {
                Ok(bridge) => settings.push(bridge),
                Err(more) => problems.extend(more),
            }
        }
        if problems.is_empty() { Ok(settings) } else { Err(problems) }
    }

    /// The directory for state that outlives the process, if any.
    /// Where the broker's state is kept (`[persistence]`), whether or not persistence is on.
    pub fn persistence_file(&self) -> Option<PathBuf> {
        match &self.persistence.file {
            Some(file) if !file.as_os_str().is_empty() => Some(file.clone()),
            Some(_) => None,
            None => self.state_dir().map(|dir| dir.join("broker.state")),
        }
    }

    pub fn state_dir(&self) -> Option<PathBuf> {
        user_dir(&self.runtime.state_dir, "XDG_STATE_HOME", &[".local", "state"], &["tollgate"])
    }

    /// The compiled-plugin cache directory, if caching is on.
    pub fn plugin_cache_dir(&self) -> Option<PathBuf> {
        user_dir(&self.runtime.plugin_cache_dir, "XDG_CACHE_HOME", &[".cache"], &["tollgate", "plugins"])
    }
}

/// A directory setting: the configured path, `None` for an empty string (off), and when unset the XDG base
/// directory `xdg_variable` (if absolute) or `$HOME/<home_default>`, followed by `below`.
fn user_dir(setting: &Option<PathBuf>, xdg_variable: &str, home_default: &[&str], below: &[&str]) -> Option<PathBuf> {
    match setting {
        Some(dir) if dir.as_os_str().is_empty() => None,
        Some(dir) => Some(dir.clone()),
        None => std::env::var_os(xdg_variable)
            .map(PathBuf::from)
            .filter(|dir| dir.is_absolute())
            .or_else(|| {
                std::env::var_os("HOME")
                    .map(|home| home_default.iter().fold(PathBuf::from(home), |dir, part| dir.join(part)))
            })
            .map(|dir| below.iter().fold(dir, |dir, part| dir.join(part))),
    }
}
