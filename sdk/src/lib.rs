//! The Tollgate plugin SDK for Rust.
//!
//! A plugin is a plain Rust library crate with `crate-type = ["cdylib", "rlib"]`: implement [`Plugin`], call
//! [`export_plugin!`], and build with `cargo build --release --target wasm32-wasip2`. The `.wasm` file is what
//! the broker's `[[plugins]] path` points at.
//!
//! ```ignore
//! use tollgate_sdk::prelude::*;
//!
//! struct DenyDebug;
//!
//! impl Plugin for DenyDebug {
//!     const NAME: &'static str = "deny-debug";
//!     const VERSION: &'static str = env!("CARGO_PKG_VERSION");
//!     const HOOKS: &'static [Hook] = &[Hook::Authorize];
//!
//!     fn init(_config: Config) -> Result<Self, String> {
//!         Ok(DenyDebug)
//!     }
//!
//!     fn authorize_publish(&self, _client: &Client, topic: &str, _qos: Qos, _retain: bool, _kind: PublishKind) -> AclDecision {
//!         if topic.starts_with("debug/") { AclDecision::Deny(DenyReason::NotAuthorized) } else { AclDecision::Ignore }
//!     }
//! }
//!
//! export_plugin!(DenyDebug);
//! ```
//!
//! The same type can be tested natively (`cargo test`): construct it with `init` and call its methods. Host
//! functions ([`host`], [`crypto`]) then run against the in-process double in [`testing`].

use std::collections::BTreeMap;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_bindings",
        default_bindings_module: "tollgate_sdk::bindings",
        // Decisions compare in plugin tests: `assert_eq!(plugin.on_connect(&info), ConnectDecision::Ignore)`.
        additional_derives: [PartialEq],
    });
}

pub use bindings::tollgate::plugin::types::{
    AclDecision, Client, ConnectDecision, ConnectInfo, DenyReason, DisconnectCause, Hook, Message, PeerCertificate,
    ProtocolVersion, PublishKind, PublishRequest, Qos, Rejection, RouteDecision, RouteDirection, TransformResult,
    UserProperty,
};

impl TransformResult {
    /// Refuses the message: a v5 publisher sees `reason` and `message` in its PUBACK; `disconnect` also closes the
    /// connection (what a 3.1.1 client needs to notice anything).
    pub fn reject(reason: DenyReason, message: impl Into<String>, disconnect: bool) -> Self {
        TransformResult::Reject(Rejection { reason, message: message.into(), disconnect })
    }
}

impl DisconnectCause {
    /// The cause as the WIT contract spells it (and Lua scripts receive it): `client-disconnect`, … .
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectCause::ClientDisconnect => "client-disconnect",
            DisconnectCause::ConnectionLost => "connection-lost",
            DisconnectCause::KeepAliveTimeout => "keep-alive-timeout",
            DisconnectCause::TakenOver => "taken-over",
            DisconnectCause::ProtocolError => "protocol-error",
            DisconnectCause::Policy => "policy",
            DisconnectCause::Revoked => "revoked",
            DisconnectCause::ServerShutdown => "server-shutdown",
        }
    }
}

impl Message {
    /// A QoS 0 message without properties, for tests.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos: Qos::AtMostOnce,
            retain: false,
            user_properties: Vec::new(),
            content_type: None,
            payload_is_utf8: false,
            response_topic: None,
            correlation_data: None,
            message_expiry_secs: None,
        }
    }
}

impl Client {
    /// An MQTT 5 client on listener `tcp`, for tests.
    pub fn new(client_id: impl Into<String>, username: Option<&str>) -> Self {
        Client {
            client_id: client_id.into(),
            username: username.map(str::to_owned),
            protocol: ProtocolVersion::V5,
            listener: "tcp".into(),
        }
    }
}

/// Everything a plugin usually needs.
pub mod prelude {
    pub use crate::{
        AclDecision, Client, Config, ConnectDecision, ConnectInfo, DenyReason, DisconnectCause, Hook, Message,
        PeerCertificate, Plugin, ProtocolVersion, PublishKind, PublishRequest, Qos, Rejection, RouteDecision,
        RouteDirection, TransformResult, UserProperty, crypto, export_plugin, host,
    };
}

/// The plugin's `[plugins.config]` table from the broker configuration, flattened to dotted keys
/// (`keys.alice = "…"` for a nested table, `list.0` for array items).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config(BTreeMap<String, String>);

impl Config {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    /// A required key, with an error message naming it.
    pub fn require(&self, key: &str) -> Result<&str, String> {
        self.get(key).ok_or_else(|| format!("config key {key:?} is required"))
    }

    /// A `true`/`false` key (`default` when absent), with an error message naming it for anything else.
    pub fn bool(&self, key: &str, default: bool) -> Result<bool, String> {
        match self.get(key) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(format!("{key} = {other:?} is not true or false")),
        }
    }

    /// The entries under `prefix.`, with the prefix removed: the children of a table.
    pub fn table<'a>(&'a self, prefix: &str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        let prefix = format!("{prefix}.");
        self.0
            .iter()
            .filter_map(move |(key, value)| key.strip_prefix(prefix.as_str()).map(|rest| (rest, value.as_str())))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(key, value)| (key.as_str(), value.as_str()))
    }

    /// The values of an array (`key.0`, `key.1`, …) in order.
    pub fn list(&self, key: &str) -> Vec<&str> {
        let mut items: Vec<(usize, &str)> =
            self.table(key).filter_map(|(index, value)| Some((index.parse().ok()?, value))).collect();
        items.sort();
        items.into_iter().map(|(_, value)| value).collect()
    }

    /// The indices of an array of tables (`rules.0.id`, `rules.1.id`, … gives 0, 1, …).
    pub fn table_indices(&self, key: &str) -> Vec<usize> {
        let mut indices: Vec<usize> =
            self.table(key).filter_map(|(rest, _)| rest.split('.').next()?.parse().ok()).collect();
        indices.sort();
        indices.dedup();
        indices
    }
}

/// MQTT topic matching, the broker's own: `matches(filter, topic)` (`+` one level, `#` the rest including the
/// parent level; a filter starting with a wildcard does not match `$` topics), and `validate_topic_name` (the
/// check a PUBLISH topic passes: not empty, no wildcard, no NUL, at most 65,535 bytes).
pub mod topic {
    pub use tollgate_protocol::topic::{matches, validate_topic_name};
}

impl<K: Into<String>, V: Into<String>> FromIterator<(K, V)> for Config {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(pairs: I) -> Self {
        Config(pairs.into_iter().map(|(key, value)| (key.into(), value.into())).collect())
    }
}

/// A policy plugin. Implement the hooks you need; the others answer "not my decision" and are never called by
/// the broker, because only the hooks named in [`Plugin::HOOKS`] are attached.
pub trait Plugin: Sized + 'static {
    const NAME: &'static str;
    const VERSION: &'static str;
    /// The hooks this plugin implements.
    const HOOKS: &'static [Hook];

    /// Runs once per instance (the broker runs one instance per worker thread) before any hook.
    fn init(config: Config) -> Result<Self, String>;

    /// The hooks to attach, once configured: [`Plugin::HOOKS`] unless overridden. A plugin whose configuration
    /// needs fewer hooks returns fewer, so the broker does not call it for nothing (a `deliver` hook costs a call
    /// per subscriber copy).
    fn hooks(&self) -> Vec<Hook> {
        Self::HOOKS.to_vec()
    }

    /// CONNECT, and each MQTT 5 AUTH step (`info.auth_data` then holds the client's latest data).
    fn on_connect(&self, _info: &ConnectInfo) -> ConnectDecision {
        ConnectDecision::Ignore
    }

    /// A PUBLISH, or the will of a CONNECT (`kind`), on its resolved topic (after topic aliases).
    fn authorize_publish(
        &self,
        _client: &Client,
        _topic: &str,
        _qos: Qos,
        _retain: bool,
        _kind: PublishKind,
    ) -> AclDecision {
        AclDecision::Ignore
    }

    /// The PUBLISHes one client sent in a burst, in arrival order (the broker's `authz-batch` call). The default
    /// calls [`Plugin::authorize_publish`] for each, as a [`PublishKind::Publish`]; an override must return one
    /// decision per request, each the one `authorize_publish` would give.
    fn authorize_publish_batch(&self, client: &Client, requests: Vec<PublishRequest>) -> Vec<AclDecision> {
        requests
            .iter()
            .map(|request| {
                self.authorize_publish(client, &request.topic, request.qos, request.retain, PublishKind::Publish)
            })
            .collect()
    }

    /// One filter of a SUBSCRIBE, without any `$share/<group>/` prefix.
    fn authorize_subscribe(
        &self,
        _client: &Client,
        _filter: &str,
        _qos: Qos,
        _share_group: Option<&str>,
    ) -> AclDecision {
        AclDecision::Ignore
    }

    /// May this client keep its connection and session? Asked for every session after a reload and at the
    /// broker's recheck interval; [`AclDecision::Deny`] disconnects the client and ends its session. Its
    /// subscriptions are then re-checked with [`Plugin::authorize_subscribe`].
    fn authorize_session(&self, _client: &Client) -> AclDecision {
        AclDecision::Ignore
    }

    /// An inbound PUBLISH after authorization. Return [`TransformResult::Modified`] with the changed message.
    fn on_publish(&self, _client: &Client, _message: Message) -> TransformResult {
        TransformResult::Unchanged
    }

    /// The inbound messages one client sent in a burst, in arrival order (the broker's `transform-batch` call,
    /// used when this plugin is the only transform in the chain). The default calls [`Plugin::on_publish`] for each
    /// and stops after a [`TransformResult::Reject`] that disconnects; an override must keep that rule and return
    /// one result per message otherwise.
    fn on_publish_batch(&self, client: &Client, messages: Vec<Message>) -> Vec<TransformResult> {
        publish_one_by_one(self, client, messages)
    }

    /// One subscriber's copy of a message, as the broker sends it (`subscriber` is the receiving client; its
    /// attributes are what [`host::client_attribute`] reads during the call). [`TransformResult::Reject`] drops the
    /// copy like [`TransformResult::Drop`]: there is no publisher to answer.
    fn on_deliver(&self, _subscriber: &Client, _message: Message) -> TransformResult {
        TransformResult::Unchanged
    }

    /// A message about to cross a bridge.
    fn route(&self, _direction: RouteDirection, _bridge: &str, _message: &Message) -> RouteDecision {
        RouteDecision::Ignore
    }

    /// The `session` hook: the broker accepted `client` (its CONNACK is on its way). Attributes set at CONNECT are
    /// readable with [`host::client_attribute`]. Nothing is decided here; state shared by the plugin's instances
    /// (a count of who is online) belongs in the host (`host::gauge_add`, the key-value table), because the
    /// connection's end may be told to another instance.
    fn on_connected(&self, _client: &Client) {}

    /// The `session` hook: the connection announced by [`Plugin::on_connected`] ended, and why. Called once for
    /// each `on_connected`, after it.
    fn on_disconnected(&self, _client: &Client, _cause: DisconnectCause) {}
}

/// Times as configuration writes them, in the unit [`host::now_ms`] reads the clock in.
pub mod time {
    /// Milliseconds since the Unix epoch of an RFC 3339 UTC time (`2026-11-22T15:00:00Z`); `None` for anything
    /// else, or a time before the epoch.
    pub fn rfc3339_ms(text: &str) -> Option<u64> {
        let since_epoch = humantime::parse_rfc3339(text).ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
        u64::try_from(since_epoch.as_millis()).ok()
    }
}

/// Host functions: logging, clock, per-client attributes, the plugin's shared key-value table, counters.
pub mod host {
    #[cfg(target_arch = "wasm32")]
    use crate::bindings::tollgate::plugin::host as imports;

    pub use crate::bindings::tollgate::plugin::host::LogLevel;

    pub fn log(level: LogLevel, message: &str) {
        #[cfg(target_arch = "wasm32")]
        imports::log(level, message);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::record_log(level, message);
    }

    pub fn info(message: &str) {
        log(LogLevel::Info, message)
    }

    pub fn warn(message: &str) {
        log(LogLevel::Warn, message)
    }

    /// Logs a security event as one JSON object line, `{"event":"…","key":"value",…}`, for log shippers. Never
    /// pass payloads, keys or full tags.
    pub fn security_event(level: LogLevel, event: &str, fields: &[(&str, &str)]) {
        let mut line = format!("{{\"event\":{}", json_string(event));
        for (key, value) in fields {
            line.push_str(&format!(",{}:{}", json_string(key), json_string(value)));
        }
        line.push('}');
        log(level, &line);
    }

    /// A JSON string literal. Client ids are arbitrary UTF-8, so quotes, backslashes and control characters are
    /// escaped the JSON way (Rust's `{:?}` would write `\u{1b}`, which is not JSON).
    pub fn json_string(text: &str) -> String {
        let mut out = String::with_capacity(text.len() + 2);
        out.push('"');
        for c in text.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// Wall-clock milliseconds since the Unix epoch.
    pub fn now_ms() -> u64 {
        #[cfg(target_arch = "wasm32")]
        return imports::now_ms();
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::now_ms();
    }

    /// An attribute the authentication chain attached to the current client, or a certificate field
    /// (`cert.common-name`, `cert.subject-serial-number`, `cert.san-uri`, `cert.serial`, `cert.fingerprint`,
    /// `cert.subject`, `cert.ou`).
    pub fn client_attribute(key: &str) -> Option<String> {
        #[cfg(target_arch = "wasm32")]
        return imports::client_attribute(key);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::client_attribute(key);
    }

    /// The plugin's key-value table, shared by all its instances.
    pub fn kv_get(key: &str) -> Option<Vec<u8>> {
        #[cfg(target_arch = "wasm32")]
        return imports::kv_get(key);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::kv_get(key);
    }

    pub fn kv_set(key: &str, value: &[u8]) -> Result<(), String> {
        #[cfg(target_arch = "wasm32")]
        return imports::kv_set(key, value);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::kv_set(key, value);
    }

    pub fn kv_delete(key: &str) {
        #[cfg(target_arch = "wasm32")]
        imports::kv_delete(key);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::kv_delete(key);
    }

    /// Like [`kv_set`], and written to the plugin's state file so it survives a broker restart.
    pub fn kv_set_durable(key: &str, value: &[u8]) -> Result<(), String> {
        #[cfg(target_arch = "wasm32")]
        return imports::kv_set_durable(key, value);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::kv_set_durable(key, value);
    }

    /// Atomically adds to an 8-byte counter in the table and returns the new value (shared by all instances).
    /// With `durable` the new value reaches the state file in the same step: a counter that never repeats.
    pub fn kv_add(key: &str, delta: u64, durable: bool) -> Result<u64, String> {
        #[cfg(target_arch = "wasm32")]
        return imports::kv_add(key, delta, durable);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::kv_add(key, delta, durable);
    }

    /// Stores `value` under `key` only if the key holds `expected` (`None`: absent), atomically across all
    /// instances: `Ok(true)` when stored, `Ok(false)` when the key held something else (read it again and retry).
    /// With `durable`, written to the state file as [`kv_set_durable`] does.
    pub fn kv_compare_and_set(key: &str, expected: Option<&[u8]>, value: &[u8], durable: bool) -> Result<bool, String> {
        #[cfg(target_arch = "wasm32")]
        return imports::kv_compare_and_set(key, expected, value, durable);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::kv_compare_and_set(key, expected, value, durable);
    }

    /// Records `key` for `ttl_ms` milliseconds across all instances: true when it was not recorded yet (or its
    /// record expired), false when it was. In memory only, bounded by the broker (the record closest to expiry
    /// goes first when full): a nonce cache, or a claim that must not outlive its purpose.
    pub fn kv_claim(key: &str, ttl_ms: u64) -> bool {
        #[cfg(target_arch = "wasm32")]
        return imports::kv_claim(key, ttl_ms);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::kv_claim(key, ttl_ms);
    }

    /// Whether the system clock is synchronized (NTP); `None` where the broker cannot tell.
    pub fn clock_synchronized() -> Option<bool> {
        #[cfg(target_arch = "wasm32")]
        return imports::clock_synchronized();
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::clock_synchronized();
    }

    pub fn counter_add(name: &str, delta: u64) {
        #[cfg(target_arch = "wasm32")]
        imports::counter_add(name, delta);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::counter_add(name, delta);
    }

    /// Sets a named gauge (`$SYS/broker/plugins/<plugin>/gauges/<name>`): a value that goes up and down.
    pub fn gauge_set(name: &str, value: i64) {
        #[cfg(target_arch = "wasm32")]
        imports::gauge_set(name, value);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::gauge_set(name, value);
    }

    /// Adds `delta` (negative to take away) to a named gauge, atomically across the plugin's instances: a count
    /// of what is live, kept up from several threads.
    pub fn gauge_add(name: &str, delta: i64) {
        #[cfg(target_arch = "wasm32")]
        imports::gauge_add(name, delta);
        #[cfg(not(target_arch = "wasm32"))]
        crate::testing::gauge_add(name, delta);
    }
}

/// Host-side cryptography: the secrets live in the broker configuration and never enter the plugin.
pub mod crypto {
    pub use crate::bindings::tollgate::plugin::crypto::MacAlgorithm;

    /// The tag of `data` with `alg` under the secret `key_id`, or its HKDF-SHA256 derivation with `derive_info`
    /// (16 bytes for CMAC, 32 for HMAC). AES-128-CMAC needs a 16-byte secret (or a derivation).
    pub fn mac(alg: MacAlgorithm, key_id: &str, derive_info: Option<&[u8]>, data: &[u8]) -> Result<Vec<u8>, String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::tollgate::plugin::crypto::mac(alg, key_id, derive_info, data);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::mac_tag(alg, key_id, derive_info, data);
    }

    /// Constant-time check of a tag with `alg` (16 to 32 bytes for HMAC, 16 for CMAC; truncated tags keep the
    /// leftmost bytes).
    pub fn verify_mac(
        alg: MacAlgorithm,
        key_id: &str,
        derive_info: Option<&[u8]>,
        data: &[u8],
        tag: &[u8],
    ) -> Result<bool, String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::tollgate::plugin::crypto::verify_mac(alg, key_id, derive_info, data, tag);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::verify_mac(alg, key_id, derive_info, data, tag);
    }

    /// HMAC-SHA256 of `data` with the secret the broker configuration names `key_id`.
    pub fn hmac_sha256(key_id: &str, data: &[u8]) -> Result<Vec<u8>, String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::tollgate::plugin::crypto::hmac_sha256(key_id, data);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::hmac_sha256(key_id, data);
    }

    pub fn sha256(data: &[u8]) -> Vec<u8> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::tollgate::plugin::crypto::sha256(data);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::sha256(data);
    }

    /// HMAC-SHA256 under a key the host derives from the secret `key_id` with HKDF-SHA256 and `info`.
    pub fn hmac_sha256_derived(key_id: &str, info: &[u8], data: &[u8]) -> Result<Vec<u8>, String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::tollgate::plugin::crypto::hmac_sha256_derived(key_id, info, data);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::hmac(key_id, Some(info), data);
    }

    /// Constant-time check of a 16 to 32-byte tag, under the secret or its derivation with `derive_info`.
    pub fn verify_hmac_sha256(
        key_id: &str,
        derive_info: Option<&[u8]>,
        data: &[u8],
        tag: &[u8],
    ) -> Result<bool, String> {
        #[cfg(target_arch = "wasm32")]
        return crate::bindings::tollgate::plugin::crypto::verify_hmac_sha256(key_id, derive_info, data, tag);
        #[cfg(not(target_arch = "wasm32"))]
        return crate::testing::verify(key_id, derive_info, data, tag);
    }
}

/// The host double used when a plugin's logic runs natively (`cargo test`). State is per thread, so tests do not
/// see each other's keys or secrets.
#[cfg(not(target_arch = "wasm32"))]
pub mod testing {
    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use cmac::Cmac;
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};

    use crate::crypto::MacAlgorithm;
    use crate::host::LogLevel;

    #[derive(Default)]
    struct TestHost {
        secrets: BTreeMap<String, Vec<u8>>,
        attributes: BTreeMap<String, String>,
        kv: BTreeMap<String, Vec<u8>>,
        durable: BTreeMap<String, Vec<u8>>,
        counters: BTreeMap<String, u64>,
        gauges: BTreeMap<String, i64>,
        logs: Vec<(LogLevel, String)>,
        now_ms: Option<u64>,
        /// `kv_claim` records and when they expire, on the test clock ([`set_now_ms`]).
        claims: BTreeMap<String, u64>,
        clock_synchronized: Option<bool>,
        /// Runs just before the next `kv_compare_and_set` (see [`before_next_compare_and_set`]).
        interleaved: Option<Box<dyn FnOnce()>>,
    }

    thread_local! {
        static HOST: RefCell<TestHost> = RefCell::new(TestHost::default());
    }

    fn with<R>(f: impl FnOnce(&mut TestHost) -> R) -> R {
        HOST.with(|host| f(&mut host.borrow_mut()))
    }

    /// A secret for `crypto::hmac_sha256`, as the broker's `[plugins.secrets]` would provide.
    pub fn set_secret(key_id: &str, secret: &[u8]) {
        with(|host| host.secrets.insert(key_id.to_owned(), secret.to_vec()));
    }

    /// A client attribute (or `cert.*` field) for `host::client_attribute`.
    pub fn set_attribute(key: &str, value: &str) {
        with(|host| host.attributes.insert(key.to_owned(), value.to_owned()));
    }

    /// Forgets every client attribute set so far (the next call is another client's).
    pub fn clear_attributes() {
        with(|host| host.attributes.clear());
    }

    /// Fixes the clock; `None` goes back to the real one.
    pub fn set_now_ms(now: Option<u64>) {
        with(|host| host.now_ms = now);
    }

    /// Runs `other` just before the plugin's next `host::kv_compare_and_set`, between what it read and what it
    /// writes: another instance (the broker's other worker) acting at the same instant. `other` may call the host
    /// and other plugin instances.
    pub fn before_next_compare_and_set(other: impl FnOnce() + 'static) {
        with(|host| host.interleaved = Some(Box::new(other)));
    }

    /// What `host::clock_synchronized` answers (default `None`: cannot tell).
    pub fn set_clock_synchronized(state: Option<bool>) {
        with(|host| host.clock_synchronized = state);
    }

    pub(crate) fn clock_synchronized() -> Option<bool> {
        with(|host| host.clock_synchronized)
    }

    pub(crate) fn kv_claim(key: &str, ttl_ms: u64) -> bool {
        let now = now_ms();
        with(|host| {
            if host.claims.get(key).is_some_and(|&expiry| expiry > now) {
                return false;
            }
            host.claims.insert(key.to_owned(), now.saturating_add(ttl_ms.max(1)));
            true
        })
    }

    pub fn counter(name: &str) -> u64 {
        with(|host| host.counters.get(name).copied().unwrap_or(0))
    }

    pub fn logs() -> Vec<String> {
        with(|host| host.logs.iter().map(|(_, message)| message.clone()).collect())
    }

    pub(crate) fn record_log(level: LogLevel, message: &str) {
        with(|host| host.logs.push((level, message.to_owned())));
    }

    pub(crate) fn now_ms() -> u64 {
        with(|host| host.now_ms).unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
        })
    }

    pub(crate) fn client_attribute(key: &str) -> Option<String> {
        with(|host| host.attributes.get(key).cloned())
    }

    pub(crate) fn kv_get(key: &str) -> Option<Vec<u8>> {
        with(|host| host.kv.get(key).cloned())
    }

    pub(crate) fn kv_set(key: &str, value: &[u8]) -> Result<(), String> {
        with(|host| host.kv.insert(key.to_owned(), value.to_vec()));
        Ok(())
    }

    pub(crate) fn kv_delete(key: &str) {
        with(|host| {
            host.kv.remove(key);
            host.durable.remove(key);
        });
    }

    pub(crate) fn kv_set_durable(key: &str, value: &[u8]) -> Result<(), String> {
        with(|host| {
            host.kv.insert(key.to_owned(), value.to_vec());
            host.durable.insert(key.to_owned(), value.to_vec());
        });
        Ok(())
    }

    pub(crate) fn kv_compare_and_set(
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        durable: bool,
    ) -> Result<bool, String> {
        if let Some(other) = with(|host| host.interleaved.take()) {
            other();
        }
        with(|host| {
            if host.kv.get(key).map(Vec::as_slice) != expected {
                return Ok(false);
            }
            host.kv.insert(key.to_owned(), value.to_vec());
            if durable {
                host.durable.insert(key.to_owned(), value.to_vec());
            }
            Ok(true)
        })
    }

    pub(crate) fn kv_add(key: &str, delta: u64, durable: bool) -> Result<u64, String> {
        with(|host| {
            let current = match host.kv.get(key) {
                None => 0,
                Some(value) => u64::from_be_bytes(
                    <[u8; 8]>::try_from(value.as_slice()).map_err(|_| format!("{key:?} is not an 8-byte counter"))?,
                ),
            };
            let next = current.wrapping_add(delta);
            host.kv.insert(key.to_owned(), next.to_be_bytes().to_vec());
            if durable {
                host.durable.insert(key.to_owned(), next.to_be_bytes().to_vec());
            }
            Ok(next)
        })
    }

    /// A broker restart as the plugin sees it: the key-value table keeps only what was written durably, and
    /// claims are gone.
    pub fn restart() {
        with(|host| {
            host.kv = host.durable.clone();
            host.claims.clear();
        });
    }

    pub(crate) fn counter_add(name: &str, delta: u64) {
        with(|host| *host.counters.entry(name.to_owned()).or_default() += delta);
    }

    pub(crate) fn gauge_set(name: &str, value: i64) {
        with(|host| {
            host.gauges.insert(name.to_owned(), value);
        });
    }

    pub(crate) fn gauge_add(name: &str, delta: i64) {
        with(|host| {
            let gauge = host.gauges.entry(name.to_owned()).or_default();
            *gauge = gauge.saturating_add(delta);
        });
    }

    /// A gauge's last value, if the plugin set it.
    pub fn gauge(name: &str) -> Option<i64> {
        with(|host| host.gauges.get(name).copied())
    }

    /// The secret `key_id`, or its HKDF-SHA256 derivation (no salt) of `derived_len` bytes with `derive_info`.
    fn key_bytes(key_id: &str, derive_info: Option<&[u8]>, derived_len: usize) -> Result<Vec<u8>, String> {
        let secret =
            with(|host| host.secrets.get(key_id).cloned()).ok_or_else(|| format!("no secret named {key_id:?}"))?;
        match derive_info {
            None => Ok(secret),
            Some(info) => {
                let mut derived = vec![0; derived_len];
                hkdf::Hkdf::<Sha256>::new(None, &secret)
                    .expand(info, &mut derived)
                    .map_err(|error| error.to_string())?;
                Ok(derived)
            }
        }
    }

    fn mac(key_id: &str, derive_info: Option<&[u8]>, data: &[u8]) -> Result<Hmac<Sha256>, String> {
        let key = key_bytes(key_id, derive_info, 32)?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|error| error.to_string())?;
        mac.update(data);
        Ok(mac)
    }

    pub(crate) fn hmac_sha256(key_id: &str, data: &[u8]) -> Result<Vec<u8>, String> {
        hmac(key_id, None, data)
    }

    pub(crate) fn hmac(key_id: &str, derive_info: Option<&[u8]>, data: &[u8]) -> Result<Vec<u8>, String> {
        Ok(mac(key_id, derive_info, data)?.finalize().into_bytes().to_vec())
    }

    pub(crate) fn verify(key_id: &str, derive_info: Option<&[u8]>, data: &[u8], tag: &[u8]) -> Result<bool, String> {
        if !(16..=32).contains(&tag.len()) {
            return Err(format!("a tag is 16 to 32 bytes, not {}", tag.len()));
        }
        Ok(mac(key_id, derive_info, data)?.verify_truncated_left(tag).is_ok())
    }

    pub(crate) fn sha256(data: &[u8]) -> Vec<u8> {
        Sha256::digest(data).to_vec()
    }

    fn cmac_key(key_id: &str, derive_info: Option<&[u8]>) -> Result<Cmac<aes::Aes128>, String> {
        let key = key_bytes(key_id, derive_info, 16)?;
        <Cmac<aes::Aes128> as Mac>::new_from_slice(&key)
            .map_err(|_| format!("secret {key_id:?} is not 16 bytes, so it is not an AES-128 key"))
    }

    pub(crate) fn mac_tag(
        alg: MacAlgorithm,
        key_id: &str,
        derive_info: Option<&[u8]>,
        data: &[u8],
    ) -> Result<Vec<u8>, String> {
        match alg {
            MacAlgorithm::HmacSha256 => hmac(key_id, derive_info, data),
            MacAlgorithm::CmacAes128 => {
                Ok(cmac_key(key_id, derive_info)?.chain_update(data).finalize().into_bytes().to_vec())
            }
        }
    }

    pub(crate) fn verify_mac(
        alg: MacAlgorithm,
        key_id: &str,
        derive_info: Option<&[u8]>,
        data: &[u8],
        tag: &[u8],
    ) -> Result<bool, String> {
        match alg {
            MacAlgorithm::HmacSha256 => verify(key_id, derive_info, data, tag),
            MacAlgorithm::CmacAes128 => {
                if tag.len() != 16 {
                    return Err(format!("a CMAC tag is 16 bytes, not {}", tag.len()));
                }
                Ok(cmac_key(key_id, derive_info)?.chain_update(data).verify_truncated_left(tag).is_ok())
            }
        }
    }
}

/// What [`Plugin::on_publish_batch`] does by default: [`Plugin::on_publish`] for each message, stopping after a
/// [`TransformResult::Reject`] that disconnects. An override that only sets something up around the burst (a clock
/// reading, counters added once) calls it for the messages themselves.
pub fn publish_one_by_one<P: Plugin>(plugin: &P, client: &Client, messages: Vec<Message>) -> Vec<TransformResult> {
    let mut results = Vec::with_capacity(messages.len());
    for message in messages {
        let result = plugin.on_publish(client, message);
        let disconnects = matches!(&result, TransformResult::Reject(rejection) if rejection.disconnect);
        results.push(result);
        if disconnects {
            break;
        }
    }
    results
}

/// Exports a [`Plugin`] implementation as the plugin's WebAssembly component. Use once per crate.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            use $crate::bindings::exports::tollgate::plugin as __exports;
            use $crate::bindings::tollgate::plugin::types as __types;

            // Only the WebAssembly build exports the bindings; natively the type exists for `cargo test`.
            #[allow(dead_code)]
            struct __TollgateExport;

            ::std::thread_local! {
                static __STATE: ::core::cell::RefCell<::core::option::Option<$plugin>> =
                    const { ::core::cell::RefCell::new(::core::option::Option::None) };
            }

            fn __with<R>(call: impl FnOnce(&$plugin) -> R, before_init: R) -> R {
                __STATE.with(|state| match &*state.borrow() {
                    ::core::option::Option::Some(plugin) => call(plugin),
                    ::core::option::Option::None => before_init,
                })
            }

            impl __exports::lifecycle::Guest for __TollgateExport {
                fn init(
                    config: ::std::vec::Vec<(::std::string::String, ::std::string::String)>,
                ) -> ::core::result::Result<__types::PluginInfo, ::std::string::String> {
                    let plugin = <$plugin as $crate::Plugin>::init(config.into_iter().collect())?;
                    let hooks = $crate::Plugin::hooks(&plugin);
                    __STATE.with(|state| *state.borrow_mut() = ::core::option::Option::Some(plugin));
                    ::core::result::Result::Ok(__types::PluginInfo {
                        name: <$plugin as $crate::Plugin>::NAME.into(),
                        version: <$plugin as $crate::Plugin>::VERSION.into(),
                        hooks,
                    })
                }
            }

            impl __exports::authn::Guest for __TollgateExport {
                fn on_connect(info: __types::ConnectInfo) -> __types::ConnectDecision {
                    __with(|plugin| $crate::Plugin::on_connect(plugin, &info), __types::ConnectDecision::Ignore)
                }
            }

            impl __exports::authz::Guest for __TollgateExport {
                fn authorize_publish(
                    client: __types::Client,
                    topic: ::std::string::String,
                    qos: __types::Qos,
                    retain: bool,
                    kind: __types::PublishKind,
                ) -> __types::AclDecision {
                    __with(
                        |plugin| $crate::Plugin::authorize_publish(plugin, &client, &topic, qos, retain, kind),
                        __types::AclDecision::Ignore,
                    )
                }

                fn authorize_subscribe(
                    client: __types::Client,
                    filter: ::std::string::String,
                    qos: __types::Qos,
                    share_group: ::core::option::Option<::std::string::String>,
                ) -> __types::AclDecision {
                    __with(
                        |plugin| {
                            $crate::Plugin::authorize_subscribe(plugin, &client, &filter, qos, share_group.as_deref())
                        },
                        __types::AclDecision::Ignore,
                    )
                }

                fn authorize_session(client: __types::Client) -> __types::AclDecision {
                    __with(|plugin| $crate::Plugin::authorize_session(plugin, &client), __types::AclDecision::Ignore)
                }
            }

            impl __exports::authz_batch::Guest for __TollgateExport {
                fn authorize_publish_batch(
                    client: __types::Client,
                    requests: ::std::vec::Vec<__types::PublishRequest>,
                ) -> ::std::vec::Vec<__types::AclDecision> {
                    __STATE.with(|state| match &*state.borrow() {
                        ::core::option::Option::Some(plugin) => {
                            $crate::Plugin::authorize_publish_batch(plugin, &client, requests)
                        }
                        ::core::option::Option::None => requests.iter().map(|_| __types::AclDecision::Ignore).collect(),
                    })
                }
            }

            impl __exports::transform::Guest for __TollgateExport {
                fn on_publish(client: __types::Client, message: __types::Message) -> __types::TransformResult {
                    __with(
                        |plugin| $crate::Plugin::on_publish(plugin, &client, message),
                        __types::TransformResult::Unchanged,
                    )
                }
            }

            impl __exports::transform_batch::Guest for __TollgateExport {
                fn on_publish_batch(
                    client: __types::Client,
                    messages: ::std::vec::Vec<__types::Message>,
                ) -> ::std::vec::Vec<__types::TransformResult> {
                    __STATE.with(|state| match &*state.borrow() {
                        ::core::option::Option::Some(plugin) => {
                            $crate::Plugin::on_publish_batch(plugin, &client, messages)
                        }
                        ::core::option::Option::None => {
                            messages.iter().map(|_| __types::TransformResult::Unchanged).collect()
                        }
                    })
                }
            }

            impl __exports::deliver::Guest for __TollgateExport {
                fn on_deliver(subscriber: __types::Client, message: __types::Message) -> __types::TransformResult {
                    __with(
                        |plugin| $crate::Plugin::on_deliver(plugin, &subscriber, message),
                        __types::TransformResult::Unchanged,
                    )
                }
            }

            impl __exports::bridge::Guest for __TollgateExport {
                fn route(
                    direction: __types::RouteDirection,
                    bridge: ::std::string::String,
                    message: __types::Message,
                ) -> __types::RouteDecision {
                    __with(
                        |plugin| $crate::Plugin::route(plugin, direction, &bridge, &message),
                        __types::RouteDecision::Ignore,
                    )
                }
            }

            impl __exports::session::Guest for __TollgateExport {
                fn on_connected(client: __types::Client) {
                    __with(|plugin| $crate::Plugin::on_connected(plugin, &client), ())
                }

                fn on_disconnected(client: __types::Client, cause: __types::DisconnectCause) {
                    __with(|plugin| $crate::Plugin::on_disconnected(plugin, &client, cause), ())
                }
            }

            #[cfg(target_arch = "wasm32")]
            $crate::bindings::__export_bindings!(__TollgateExport);
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_keys_and_tables() {
        let config: Config = [("keys.alice", "k1"), ("keys.bob", "k2"), ("mode", "strict")].into_iter().collect();
        assert_eq!(config.get("mode"), Some("strict"));
        assert!(config.require("missing").expect_err("missing").contains("missing"));
        let flags: Config = [("on", "true"), ("off", "false"), ("typo", "yes")].into_iter().collect();
        assert_eq!(
            (flags.bool("on", false), flags.bool("off", true), flags.bool("absent", true)),
            (Ok(true), Ok(false), Ok(true))
        );
        assert!(flags.bool("typo", false).expect_err("typo").contains("typo"));
        let keys: Vec<_> = config.table("keys").collect();
        assert_eq!(keys, vec![("alice", "k1"), ("bob", "k2")]);
    }

    #[test]
    fn topics_match_like_the_broker() {
        use topic::matches;
        assert!(matches("a/+/c", "a/b/c") && matches("a/#", "a") && matches("#", "a/b") && matches("a/b", "a/b"));
        assert!(!matches("a/+", "a/b/c") && !matches("a/b", "a") && !matches("+/x", "$SYS/x") && !matches("#", "$SYS"));
        assert!(matches("$SYS/#", "$SYS/a"));
    }

    #[test]
    fn config_lists_come_in_order() {
        let config: Config =
            [("l.10", "c"), ("l.2", "b"), ("l.0", "a"), ("t.1.x", "1"), ("t.0.y", "2")].into_iter().collect();
        assert_eq!(config.list("l"), vec!["a", "b", "c"]);
        assert_eq!(config.table_indices("t"), vec![0, 1]);
    }

    #[test]
    fn security_events_are_json_whatever_the_text() {
        assert_eq!(host::json_string("a\"b\\c\u{1b}\n"), "\"a\\\"b\\\\c\\u001b\\u000a\"");
        host::security_event(host::LogLevel::Info, "publish_denied", &[("client_id", "x\"y")]);
        assert_eq!(
            testing::logs().last().map(String::as_str),
            Some("{\"event\":\"publish_denied\",\"client_id\":\"x\\\"y\"}")
        );
    }

    #[test]
    fn host_double_answers_natively() {
        testing::set_secret("k1", b"key");
        let tag = crypto::hmac_sha256("k1", b"The quick brown fox jumps over the lazy dog").expect("hmac");
        assert_eq!(tag[..4], [0xf7, 0xbc, 0x83, 0xf4]);
        assert!(crypto::hmac_sha256("k2", b"x").is_err());
        host::kv_set("a", b"1").expect("set");
        assert_eq!(host::kv_get("a"), Some(b"1".to_vec()));
        host::counter_add("n", 2);
        assert_eq!(testing::counter("n"), 2);
        host::gauge_add("online", 2);
        host::gauge_add("online", -3);
        assert_eq!(testing::gauge("online"), Some(-1));
        testing::set_now_ms(Some(42));
        assert_eq!(host::now_ms(), 42);
        host::kv_set_durable("d", b"2").expect("durable");
        assert_eq!(host::kv_add("c", 5, false), Ok(5));
        assert_eq!(host::kv_compare_and_set("w", Some(b"0"), b"1", true), Ok(false), "absent, not \"0\"");
        assert_eq!(host::kv_compare_and_set("w", None, b"1", true), Ok(true));
        assert_eq!(host::kv_compare_and_set("w", None, b"2", true), Ok(false), "no longer absent");
        assert_eq!(host::kv_compare_and_set("w", Some(b"1"), b"2", true), Ok(true));
        testing::restart();
        assert_eq!((host::kv_get("a"), host::kv_get("d"), host::kv_get("c")), (None, Some(b"2".to_vec()), None));
        assert_eq!(host::kv_get("w"), Some(b"2".to_vec()));
        let tag = crypto::hmac_sha256_derived("k1", b"vin", b"m").expect("derived");
        assert_eq!(crypto::verify_hmac_sha256("k1", Some(b"vin"), b"m", &tag), Ok(true));
        assert_eq!(crypto::verify_hmac_sha256("k1", None, b"m", &tag), Ok(false));
    }
}
