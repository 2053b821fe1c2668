//! A broker-to-broker bridge: one MQTT client connection to a remote broker per bridge, forwarding the topics
//! its mappings name in either direction, every message through the route hook (`forward`, `rewrite`, `drop`).
//!
//! The local side is a [`LocalClient`]: the bridge subscribes to the outgoing mappings' local filters like any
//! client, so messages queue in its session (the broker's queue bound and overflow policy) while the remote is
//! unreachable, and what was in flight is sent again, marked duplicate, after a reconnect. With a `queue`
//! configured, a spooler moves them from there into a [`journal`] on disk as they arrive, and the link sends from
//! the journal: an outage lasts as long as the disk budget, and a restart of this broker loses nothing that
//! reached the journal. Incoming messages are published
//! locally as the bridge's own, so its no-local subscriptions never send them back; on MQTT 5 remotes the
//! bridge subscribes with No Local, so the remote never echoes what the bridge sent it.
//!
//! Layout: this file holds the settings and the topic mapping, [`link`] runs the connection.

pub mod journal;
mod link;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tollgate_core::Broker;
use tollgate_protocol::{ProtocolVersion, QoS, topic};

/// Which way a mapping carries messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Local messages to the remote.
    Out,
    /// Remote messages into this broker.
    In,
    Both,
}

/// Which lane of the disk queue a mapping's messages wait in. After an outage the high lane drains first, and
/// each lane has its own size budget, so bulk telemetry filling the queue never evicts a crash event.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Priority {
    High,
    #[default]
    Normal,
}

impl std::str::FromStr for Priority {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "high" => Ok(Priority::High),
            "normal" => Ok(Priority::Normal),
            other => Err(format!("{other:?} is not \"high\" or \"normal\"")),
        }
    }
}

impl std::str::FromStr for Direction {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "out" => Ok(Self::Out),
            "in" => Ok(Self::In),
            "both" => Ok(Self::Both),
            other => Err(format!("{other:?} is not a direction: out, in or both")),
        }
    }
}

/// One topic mapping, as Mosquitto's `topic pattern direction qos local-prefix remote-prefix`: the local filter
/// is `local_prefix + pattern`, the remote one `remote_prefix + pattern`, and a topic crossing the bridge keeps
/// its part after the prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicMapping {
    pub pattern: String,
    pub direction: Direction,
    /// The most a message crosses at (the bridge's subscription QoS on the sending side).
    pub qos: QoS,
    pub local_prefix: String,
    pub remote_prefix: String,
    /// The disk queue's lane for what this mapping sends out.
    pub priority: Priority,
}

impl TopicMapping {
    pub fn local_filter(&self) -> String {
        format!("{}{}", self.local_prefix, self.pattern)
    }

    pub fn remote_filter(&self) -> String {
        format!("{}{}", self.remote_prefix, self.pattern)
    }

    pub fn sends_out(&self) -> bool {
        matches!(self.direction, Direction::Out | Direction::Both)
    }

    pub fn takes_in(&self) -> bool {
        matches!(self.direction, Direction::In | Direction::Both)
    }

    /// The remote topic for a local one this mapping carries out.
    pub fn to_remote(&self, local_topic: &str) -> Option<String> {
        if !self.sends_out() || !topic::matches(&self.local_filter(), local_topic) {
            return None;
        }
        let rest = local_topic.strip_prefix(self.local_prefix.as_str())?;
        Some(format!("{}{rest}", self.remote_prefix))
    }

    /// The local topic for a remote one this mapping carries in.
    pub fn to_local(&self, remote_topic: &str) -> Option<String> {
        if !self.takes_in() || !topic::matches(&self.remote_filter(), remote_topic) {
            return None;
        }
        let rest = remote_topic.strip_prefix(self.remote_prefix.as_str())?;
        Some(format!("{}{rest}", self.local_prefix))
    }

    /// Whether the mapping is usable: a valid filter, prefixes without wildcards.
    pub fn check(&self) -> Result<(), String> {
        if self.pattern.is_empty() {
            return Err("the pattern is empty".into());
        }
        topic::validate_topic_filter(&self.pattern).map_err(|error| format!("pattern {:?}: {error}", self.pattern))?;
        if self.pattern.starts_with("$share/") {
            return Err("a bridge does not take shared subscriptions".into());
        }
        for (name, prefix) in [("local_prefix", &self.local_prefix), ("remote_prefix", &self.remote_prefix)] {
            if prefix.contains(['+', '#', '\0']) {
                return Err(format!("{name} {prefix:?} must not contain wildcards"));
            }
        }
        Ok(())
    }
}

/// TLS toward the remote (`mqtts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// CA certificates the remote's certificate is verified against (PEM).
    pub ca_file: PathBuf,
    /// A client certificate chain and key (PEM), for remotes that ask for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name the remote's certificate must carry; the address's host when unset.
    pub server_name: Option<String>,
    /// Protocols offered in the TLS handshake (ALPN), for remotes that want one: AWS IoT Core takes MQTT with a
    /// client certificate on port 443 when offered `x-amzn-mqtt-ca`.
    pub alpn: Vec<String>,
}

/// One bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BridgeSettings {
    /// Names the bridge in logs, `$SYS` and the route hook's `bridge` argument.
    pub name: String,
    /// `host:port` of the remote broker.
    pub address: String,
    /// Tried in order when `address` does not answer; after a link ends, `address` comes first again.
    pub fallback_addresses: Vec<String>,
    /// Linked to a fallback, the primary is probed this often and taken back once it answers; zero: never.
    pub primary_retry: Duration,
    pub protocol: ProtocolVersion,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub keep_alive: Duration,
    /// Whether the remote session starts afresh on each connect; false keeps what the remote queued for the
    /// bridge while the link was down.
    pub clean_start: bool,
    /// MQTT 5: how long the remote keeps the bridge's session after the link drops.
    pub session_expiry: Duration,
    /// Messages sent to the remote and not yet acknowledged, at most.
    pub max_inflight: u16,
    /// Messages per second sent to the remote at most (a backlog drains at this pace, within a cloud's
    /// per-connection limit); 0: as fast as the window allows.
    pub max_send_rate: u32,
    pub connect_timeout: Duration,
    /// The first wait before reconnecting; it doubles up to `reconnect_max`, and resets once a link has been up
    /// for a minute.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub tls: Option<TlsSettings>,
    pub topics: Vec<TopicMapping>,
    /// Store-and-forward on disk; `None` keeps waiting messages in memory.
    pub queue: Option<journal::JournalSettings>,
    /// A topic on the remote where the bridge keeps its state, retained: `online` once linked, and `offline` as
    /// its will, which the remote publishes when the link dies (Mosquitto's bridge notifications). The cloud sees
    /// which sites are cut off.
    pub remote_status_topic: Option<String>,
    /// An HTTP proxy (`host:port`, or `http://[user:password@]host:port`) the link goes through with `CONNECT`,
    /// for sites whose only way out is a proxy. TLS to the remote runs inside the tunnel, end to end.
    pub proxy: Option<Proxy>,
    /// Announce the link as a bridge (CONNECT's protocol level with 0x80, Mosquitto's `try_private`): a remote
    /// that honours it sends nothing back over the link, which MQTT 3.1.1 cannot otherwise ask for.
    pub try_private: bool,
    /// MQTT 5: a user property carrying each forwarded message's id (`<instance>-<n>`), the same on every resend
    /// of that message, so the remote's consumers can drop duplicates. With a disk queue the instance is the
    /// journal's (kept in its directory) and `n` the record's offset, so ids hold across restarts too.
    pub message_id_property: Option<String>,
}

/// 64 random bits in hex, to tell message ids of different journals and bridge runs apart.
pub(crate) fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    // `RandomState` is seeded from the operating system's randomness; time and process mix in more.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    hasher.write_u128(now.as_nanos());
    hasher.write_u32(std::process::id());
    format!("{:016x}", hasher.finish())
}

/// An HTTP proxy for the link (see [`BridgeSettings::proxy`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port`.
    pub address: String,
    /// `user:password`, sent as Basic `Proxy-Authorization`.
    pub credentials: Option<String>,
}

impl std::fmt::Debug for Proxy {
    // Never print the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("address", &self.address)
            .field("credentials", &self.credentials.is_some())
            .finish()
    }
}

impl Proxy {
    /// `host:port` or `http://[user:password@]host:port[/]`.
    pub fn parse(text: &str) -> Result<Proxy, String> {
        let rest = match text.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => return Err(format!("{scheme}:// proxies are not supported; use an HTTP proxy")),
            None => text,
        };
        let rest = rest.trim_end_matches('/');
        let (credentials, address) = match rest.rsplit_once('@') {
            Some((credentials, address)) => (Some(credentials.to_owned()), address),
            None => (None, rest),
        };
        match address.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Proxy { address: address.to_owned(), credentials })
            }
            _ => Err(format!("{text:?} is not host:port or http://[user:password@]host:port")),
        }
    }
}

impl BridgeSettings {
    /// The primary address, then the fallbacks, in the order they are tried.
    pub fn addresses(&self) -> Vec<&str> {
        std::iter::once(self.address.as_str()).chain(self.fallback_addresses.iter().map(String::as_str)).collect()
    }
}

/// Why a bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("bridge {bridge}: topics[{index}]: {reason}")]
    Mapping { bridge: String, index: usize, reason: String },
    #[error("bridge {bridge}: {path}: {reason}")]
    File { bridge: String, path: PathBuf, reason: String },
    #[error("bridge {bridge}: tls: {reason}")]
    Tls { bridge: String, reason: String },
    #[error("bridge {bridge}: queue {dir}: {reason}")]
    Queue { bridge: String, dir: PathBuf, reason: String },
}

/// What a running bridge has done, for status and tests.
#[derive(Debug, Default)]
pub struct BridgeStats {
    pub connected: AtomicBool,
    /// Links established.
    pub connects: AtomicU64,
    /// Messages sent to the remote (resends not counted again).
    pub sent: AtomicU64,
    /// Messages from the remote published here.
    pub received: AtomicU64,
    /// Messages the route hook dropped (either way), or a `deliver` hook dropped on their way out.
    pub dropped_by_policy: AtomicU64,
    /// Messages the remote refused (an error reason code in its acknowledgement), other than for being busy.
    pub refused_by_remote: AtomicU64,
    /// Acknowledgements saying the remote is busy or over a quota (0x89, 0x97): the link backs off and the
    /// message goes again.
    pub remote_busy: AtomicU64,
    /// Messages waiting in the bridge's queue, and sent but not yet acknowledged by the remote, as last seen.
    pub queued: AtomicU64,
    pub inflight: AtomicU64,
    /// Messages whose Message Expiry passed while they waited in the disk queue: not sent.
    pub expired: AtomicU64,
    /// Messages the disk queue dropped, oldest first, to stay within its size.
    pub dropped_overflow: AtomicU64,
    /// Messages the disk queue could not store (a disk error): lost.
    pub journal_failures: AtomicU64,
}

impl BridgeStats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A started bridge. It runs until the broker shuts down or [`BridgeHandle::stop`] (a reload that changed or
/// removed it).
#[derive(Clone)]
pub struct BridgeHandle {
    pub name: String,
    pub stats: Arc<BridgeStats>,
    stop: tokio_util::sync::CancellationToken,
    task: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl BridgeHandle {
    /// Stops the bridge: DISCONNECT to the remote, what its local queue holds spooled to the disk queue and the
    /// journal synced and closed (in memory, what waits is lost, as with a restart). Waits up to `limit`; false
    /// if the bridge was still running then.
    pub async fn stop(&self, limit: Duration) -> bool {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        match task {
            Some(task) => tokio::time::timeout(limit, task).await.is_ok(),
            None => true,
        }
    }
}

/// The retained `$SYS` topic where a bridge's state (`connected` or `disconnected`) is kept.
pub fn state_topic(name: &str) -> String {
    format!("$SYS/broker/bridges/{name}/state")
}

/// Checks the settings, builds the TLS configuration and starts the bridge as a task of `broker` (the shutdown
/// drain waits for its goodbye to the remote).
pub fn start(broker: &Broker, settings: BridgeSettings) -> Result<BridgeHandle, BridgeError> {
    for (index, mapping) in settings.topics.iter().enumerate() {
        mapping.check().map_err(|reason| BridgeError::Mapping { bridge: settings.name.clone(), index, reason })?;
    }
    let tls = match &settings.tls {
        Some(tls) => Some(link::client_config(&settings.name, &settings.addresses(), tls)?),
        None => None,
    };
    // The disk queue's lanes, drained in this order: `<dir>/high` when a mapping asks for it, then `<dir>`.
    let mut journals = Vec::new();
    if let Some(queue) = &settings.queue {
        let high = settings.topics.iter().any(|mapping| mapping.sends_out() && mapping.priority == Priority::High);
        let mut lanes = Vec::new();
        if high {
            lanes.push(journal::JournalSettings { dir: queue.dir.join("high"), ..queue.clone() });
        }
        lanes.push(queue.clone());
        for lane in lanes {
            let dir = lane.dir.clone();
            let queue_error = |error: std::io::Error| BridgeError::Queue {
                bridge: settings.name.clone(),
                dir: dir.clone(),
                reason: error.to_string(),
            };
            let (journal, recovery) = journal::Journal::open(lane).map_err(queue_error)?;
            tracing::info!(
                bridge = %settings.name,
                dir = %dir.display(),
                messages = recovery.messages,
                bytes = recovery.bytes,
                "bridge queue opened"
            );
            journals.push(journal);
        }
    }
    let stats = Arc::new(BridgeStats::default());
    let stop = broker.shutdown_token().child_token();
    let name = settings.name.clone();
    let task = broker.spawn(link::run(broker.clone(), Arc::new(settings), tls, stats.clone(), journals, stop.clone()));
    Ok(BridgeHandle { name, stats, stop, task: Arc::new(std::sync::Mutex::new(Some(task))) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proxy_is_host_port_or_an_http_url_with_credentials() {
        let plain = Proxy::parse("proxy.plant.local:3128").expect("host:port");
        assert_eq!((plain.address.as_str(), plain.credentials), ("proxy.plant.local:3128", None));
        let url = Proxy::parse("http://site:p@ss@10.0.0.1:8080/").expect("a URL");
        assert_eq!((url.address.as_str(), url.credentials.as_deref()), ("10.0.0.1:8080", Some("site:p@ss")));
        assert!(!format!("{url:?}").contains("p@ss"), "the password stays out of logs");
        for bad in ["socks5://10.0.0.1:1080", "http://10.0.0.1", "nohost:", ":3128", "proxy:99999"] {
            assert!(Proxy::parse(bad).is_err(), "{bad}");
        }
    }

    fn mapping(pattern: &str, direction: Direction, local: &str, remote: &str) -> TopicMapping {
        TopicMapping {
            pattern: pattern.into(),
            direction,
            qos: QoS::AtLeastOnce,
            local_prefix: local.into(),
            remote_prefix: remote.into(),
            priority: Priority::Normal,
        }
    }

    #[test]
    fn prefixes_are_swapped_and_the_rest_kept() {
        let both = mapping("sensors/#", Direction::Both, "site/", "sites/a/");
        assert_eq!(both.local_filter(), "site/sensors/#");
        assert_eq!(both.remote_filter(), "sites/a/sensors/#");
        assert_eq!(both.to_remote("site/sensors/t1").as_deref(), Some("sites/a/sensors/t1"));
        assert_eq!(both.to_local("sites/a/sensors/t1").as_deref(), Some("site/sensors/t1"));
        assert_eq!(both.to_remote("other/sensors/t1"), None);
        assert_eq!(both.to_local("sites/b/sensors/t1"), None);
    }

    #[test]
    fn a_mapping_carries_only_its_direction() {
        let out = mapping("a/+", Direction::Out, "", "");
        assert_eq!(out.to_remote("a/1").as_deref(), Some("a/1"));
        assert_eq!(out.to_local("a/1"), None);
        let into = mapping("a/+", Direction::In, "", "");
        assert_eq!(into.to_local("a/1").as_deref(), Some("a/1"));
        assert_eq!(into.to_remote("a/1"), None);
    }

    #[test]
    fn bad_mappings_are_named() {
        assert!(mapping("a/#/b", Direction::Out, "", "").check().is_err());
        assert!(mapping("", Direction::Out, "", "").check().is_err());
        assert!(
            mapping("a", Direction::Out, "x/+/", "").check().expect_err("a wildcard prefix").contains("local_prefix")
        );
        assert!(mapping("$share/g/a", Direction::In, "", "").check().is_err());
        assert!(mapping("a/#", Direction::Both, "l/", "r/").check().is_ok());
    }

    #[test]
    fn directions_parse() {
        assert_eq!("both".parse::<Direction>(), Ok(Direction::Both));
        assert!("sideways".parse::<Direction>().expect_err("not a direction").contains("sideways"));
    }
}
