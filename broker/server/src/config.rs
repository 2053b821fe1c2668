//! The configuration file: TOML, merged over embedded defaults and under `TOLLGATE_` environment overrides
//! (`TOLLGATE_LIMITS__MAX_INFLIGHT=64`). Loading collects every problem, each with its key, before refusing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Provider};
use serde::{Deserialize, Serialize};
use tollgate_core::{BrokerConfig, OverflowPolicy};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub sys: SysConfig,
    pub log: LogConfig,
    pub session: SessionConfig,
    pub runtime: RuntimeConfig,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Connection worker threads; 0 means one per available core.
    pub worker_threads: u16,
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
            session: SessionConfig { persistent_expiry: 0, shutdown_grace: 5 },
            runtime: RuntimeConfig { worker_threads: 0 },
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
    ("auth", &["allow_anonymous", "password_file", "acl_file"]),
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
    ("session", &["persistent_expiry", "shutdown_grace"]),
    ("runtime", &["worker_threads"]),
];
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
    if key.starts_with("listeners") {
        data.remove("listeners");
        return;
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

fn error_key(error: &figment::Error) -> String {
    if error.path.is_empty() { "config".into() } else { error.path.join(".") }
}

fn check_key(figment: &Figment, section: &str, key: &str) -> Result<(), String> {
    let path = format!("{section}.{key}");
    let result = match (section, key) {
        ("auth", "allow_anonymous") => figment.extract_inner::<Option<bool>>(&path).map(drop),
        ("auth", _) => figment.extract_inner::<Option<PathBuf>>(&path).map(drop),
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

fn validate(config: &Config, problems: &mut Vec<ConfigProblem>) {
    validate_listeners(config, problems);
    validate_rest(config, problems);
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
}
