//! What the broker configuration says about one plugin, already validated and resolved (secrets read).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use tollgate_hooks::FailurePolicy;

/// The runtime a plugin needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PluginKind {
    Wasm,
    Lua,
}

impl PluginKind {
    /// As the configuration names it.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Wasm => "wasm",
            PluginKind::Lua => "lua",
        }
    }
}

impl FromStr for PluginKind {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        match value {
            "wasm" => Ok(PluginKind::Wasm),
            "lua" => Ok(PluginKind::Lua),
            other => Err(format!("unknown plugin kind {other:?} (expected \"wasm\" or \"lua\")")),
        }
    }
}

/// The hook points of the hook contract, as plugins and configuration name them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HookKind {
    Authenticate,
    Authorize,
    Transform,
    /// Each subscriber's copy of a message (the outbound transform).
    Deliver,
    Route,
    /// A connection accepted and its end (told, not asked).
    Session,
}

impl HookKind {
    pub const ALL: [HookKind; 6] = [
        HookKind::Authenticate,
        HookKind::Authorize,
        HookKind::Transform,
        HookKind::Deliver,
        HookKind::Route,
        HookKind::Session,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HookKind::Authenticate => "authenticate",
            HookKind::Authorize => "authorize",
            HookKind::Transform => "transform",
            HookKind::Route => "route",
            HookKind::Deliver => "deliver",
            HookKind::Session => "session",
        }
    }

    /// Authentication and authorization fail closed: a broken policy must not open the door. A broken transform
    /// or route lets the message through unchanged. A session hook decides nothing, so its policy changes nothing.
    pub fn default_failure_policy(self) -> FailurePolicy {
        match self {
            HookKind::Authenticate | HookKind::Authorize => FailurePolicy::FailClosed,
            HookKind::Transform | HookKind::Route | HookKind::Deliver | HookKind::Session => FailurePolicy::PassThrough,
        }
    }
}

impl fmt::Display for HookKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HookKind {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        HookKind::ALL.into_iter().find(|hook| hook.as_str() == value).ok_or_else(|| {
            format!("unknown hook {value:?} (expected authenticate, authorize, transform, deliver, route or session)")
        })
    }
}

/// Resource limits of one plugin. Each call gets the CPU budget; the memory cap applies to each instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Guest execution time per call. The guest yields to the broker at least every millisecond, so a long call
    /// delays other clients by at most that much; past the budget it is stopped.
    pub cpu_time: Duration,
    /// Linear memory (WASM) or heap (Lua) per instance.
    pub memory_bytes: usize,
    /// Wall-clock time per call, including waiting for a free instance.
    pub call_timeout: Duration,
    /// Instances (WASM stores or Lua states) alive at once. Normally one per worker thread is in use; more are
    /// created only while a call is suspended.
    pub max_instances: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            cpu_time: Duration::from_millis(20),
            memory_bytes: 32 << 20,
            call_timeout: Duration::from_millis(500),
            max_instances: 16,
        }
    }
}

/// One `[[plugins]]` entry. Its `Debug` output names the secrets' key ids, never their bytes.
#[derive(Clone)]
pub struct PluginSpec {
    pub name: String,
    pub kind: PluginKind,
    pub path: PathBuf,
    /// The hooks to attach. `None`: every hook the plugin provides.
    pub hooks: Option<Vec<HookKind>>,
    pub limits: Limits,
    pub on_failure: BTreeMap<HookKind, FailurePolicy>,
    /// The plugin's own configuration, given to its `init`.
    pub config: serde_json::Map<String, serde_json::Value>,
    /// Key id → secret bytes for host-side HMAC. Never handed to the guest.
    pub secrets: BTreeMap<String, Vec<u8>>,
    /// Whether the broker may cache this plugin's ACL decisions per connection (until the next reload).
    pub cache_decisions: bool,
    /// Files the broker reads for the plugin (which cannot open files itself): name → path. Each file's text
    /// reaches `init` as the configuration key `files.<name>`, and a changed file counts as a changed plugin on
    /// reload (revocation lists, rule files).
    pub files: BTreeMap<String, PathBuf>,
    /// Where the plugin's durable key-value entries live (`kv-set-durable`); `None` means nothing is durable.
    pub state_file: Option<PathBuf>,
    /// How often what reached the state file is also made to survive a power cut (fsync); zero leaves it to the
    /// operating system's writeback. A durable `kv-add` is synced before its call returns whatever this is.
    pub state_sync: std::time::Duration,
}

/// The default of [`PluginSpec::state_sync`]: a power cut loses at most the last five seconds of replay-window
/// moves, and a flash device sees at most one small write per changed shard file in that time.
pub const DEFAULT_STATE_SYNC: std::time::Duration = std::time::Duration::from_secs(5);

/// The largest file a plugin may have the broker read for it.
pub const MAX_PLUGIN_FILE_BYTES: u64 = 4 << 20;

impl fmt::Debug for PluginSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PluginSpec")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("path", &self.path)
            .field("hooks", &self.hooks)
            .field("limits", &self.limits)
            .field("on_failure", &self.on_failure)
            .field("config", &self.config)
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .field("cache_decisions", &self.cache_decisions)
            .field("files", &self.files)
            .field("state_file", &self.state_file)
            .field("state_sync", &self.state_sync)
            .finish()
    }
}

impl PluginSpec {
    pub fn new(name: impl Into<String>, kind: PluginKind, path: impl Into<PathBuf>) -> Self {
        Self {
            name: name.into(),
            kind,
            path: path.into(),
            hooks: None,
            limits: Limits::default(),
            on_failure: BTreeMap::new(),
            config: serde_json::Map::new(),
            secrets: BTreeMap::new(),
            cache_decisions: false,
            files: BTreeMap::new(),
            state_file: None,
            state_sync: DEFAULT_STATE_SYNC,
        }
    }

    /// The plugin's configuration with the files it asked for read in under `files.<name>`.
    pub fn config_with_files(&self) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        let mut config = self.config.clone();
        if self.files.is_empty() {
            return Ok(config);
        }
        let mut files = serde_json::Map::new();
        for (name, path) in &self.files {
            let size =
                std::fs::metadata(path).map_err(|error| format!("files.{name}: {}: {error}", path.display()))?.len();
            if size > MAX_PLUGIN_FILE_BYTES {
                return Err(format!(
                    "files.{name}: {} is {size} bytes, over the {MAX_PLUGIN_FILE_BYTES}-byte limit",
                    path.display()
                ));
            }
            let text =
                std::fs::read_to_string(path).map_err(|error| format!("files.{name}: {}: {error}", path.display()))?;
            files.insert(name.clone(), serde_json::Value::String(text));
        }
        config.insert("files".to_owned(), serde_json::Value::Object(files));
        Ok(config)
    }

    pub fn failure_policy(&self, hook: HookKind) -> FailurePolicy {
        self.on_failure.get(&hook).copied().unwrap_or_else(|| hook.default_failure_policy())
    }
}

/// Turns a configuration table into the dotted `key = value` pairs a WASM plugin's `init` receives. Arrays use
/// their index as a key segment; strings are passed as they are, other scalars in their TOML/JSON spelling.
pub fn flatten_config(config: &serde_json::Map<String, serde_json::Value>) -> Vec<(String, String)> {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match value {
            serde_json::Value::Object(map) => {
                for (key, value) in map {
                    walk(&join(prefix, key), value, out);
                }
            }
            serde_json::Value::Array(items) => {
                for (index, value) in items.iter().enumerate() {
                    walk(&join(prefix, &index.to_string()), value, out);
                }
            }
            serde_json::Value::String(text) => out.push((prefix.to_owned(), text.clone())),
            serde_json::Value::Null => {}
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    fn join(prefix: &str, key: &str) -> String {
        if prefix.is_empty() { key.to_owned() } else { format!("{prefix}.{key}") }
    }
    let mut out = Vec::new();
    for (key, value) in config {
        walk(key, value, &mut out);
    }
    out
}

/// Reads a secret as configuration spells it: `hex:<digits>`, `env:<VARIABLE>` (the variable's bytes) or
/// `file:<path>` (the file's bytes, a trailing newline dropped). Secrets never appear in the configuration as text.
pub fn resolve_secret(spelling: &str) -> Result<Vec<u8>, String> {
    if let Some(digits) = spelling.strip_prefix("hex:") {
        hex::decode(digits.trim()).map_err(|error| format!("not hexadecimal: {error}"))
    } else if let Some(variable) = spelling.strip_prefix("env:") {
        std::env::var(variable)
            .map(String::into_bytes)
            .map_err(|_| format!("environment variable {variable} is not set"))
    } else if let Some(path) = spelling.strip_prefix("file:") {
        let mut bytes = std::fs::read(path).map_err(|error| format!("cannot read {path}: {error}"))?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        Ok(bytes)
    } else {
        Err("a secret is written hex:<digits>, env:<VARIABLE> or file:<path>".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_flattens_to_dotted_keys() {
        let config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
            r#"{"keys": {"alice": "k1", "bob": "k2"}, "limit": 3, "on": true, "list": ["a", "b"], "none": null}"#,
        )
        .expect("json");
        let mut flat = flatten_config(&config);
        flat.sort();
        assert_eq!(
            flat,
            vec![
                ("keys.alice".into(), "k1".into()),
                ("keys.bob".into(), "k2".into()),
                ("limit".into(), "3".into()),
                ("list.0".into(), "a".into()),
                ("list.1".into(), "b".into()),
                ("on".into(), "true".into()),
            ]
        );
    }

    #[test]
    fn secrets_resolve_from_hex_env_and_file() {
        assert_eq!(resolve_secret("hex:00ff10"), Ok(vec![0, 255, 16]));
        assert!(resolve_secret("hex:zz").is_err());
        assert!(resolve_secret("plain").is_err());
        assert!(resolve_secret("env:TOLLGATE_TEST_SURELY_UNSET_VARIABLE").is_err());
        let path = std::env::temp_dir().join(format!("tollgate-secret-{}", std::process::id()));
        std::fs::write(&path, b"s3cret\n").expect("write");
        assert_eq!(resolve_secret(&format!("file:{}", path.display())), Ok(b"s3cret".to_vec()));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn debug_output_hides_secret_bytes() {
        let mut spec = PluginSpec::new("p", PluginKind::Wasm, "p.wasm");
        spec.secrets.insert("k1".into(), b"hunter2".to_vec());
        let shown = format!("{spec:?}");
        assert!(shown.contains("k1") && !shown.contains("104, 117") && !shown.contains("hunter2"), "{shown}");
    }

    #[test]
    fn defaults_fail_closed_for_access_and_open_for_messages() {
        let spec = PluginSpec::new("p", PluginKind::Lua, "p.lua");
        assert_eq!(spec.failure_policy(HookKind::Authenticate), FailurePolicy::FailClosed);
        assert_eq!(spec.failure_policy(HookKind::Authorize), FailurePolicy::FailClosed);
        assert_eq!(spec.failure_policy(HookKind::Transform), FailurePolicy::PassThrough);
        assert_eq!(spec.failure_policy(HookKind::Route), FailurePolicy::PassThrough);
    }
}
