//! `[[bridges]]`: connections to other brokers, each with its topic mappings (`[[bridges.topics]]`).

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tollgate_bridge::journal::{AckPolicy, FsyncPolicy, JournalSettings};
use tollgate_bridge::{BridgeSettings, Direction, Priority, TlsSettings, TopicMapping};
use tollgate_protocol::{ProtocolVersion, QoS};

use crate::config::ConfigProblem;

pub(crate) const BRIDGE_KEYS: &[&str] = &[
    "name",
    "address",
    "fallback_addresses",
    "primary_retry_s",
    "protocol",
    "client_id",
    "username",
    "password",
    "keepalive",
    "clean_start",
    "session_expiry",
    "max_inflight",
    "max_send_rate",
    "connect_timeout",
    "reconnect_min_ms",
    "reconnect_max_ms",
    "tls",
    "topics",
    "queue",
    "remote_status_topic",
    "proxy",
    "try_private",
    "message_id_property",
];
pub(crate) const BRIDGE_TOPIC_KEYS: &[&str] =
    &["pattern", "direction", "qos", "local_prefix", "remote_prefix", "priority"];
pub(crate) const BRIDGE_TLS_KEYS: &[&str] = &["ca_file", "cert", "key", "server_name", "alpn"];
pub(crate) const BRIDGE_QUEUE_KEYS: &[&str] = &["dir", "max_mb", "segment_mb", "fsync", "fsync_interval_ms", "ack"];

/// One `[[bridges]]` entry.
// Unknown keys are reported by the configuration's key check, by name, without stopping the rest of the entry
// from being checked; `deny_unknown_fields` would refuse the whole entry.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BridgeConfig {
    pub name: String,
    /// `host:port` of the remote broker.
    pub address: String,
    /// Tried in order when `address` does not answer (the primary again after a link ends).
    #[serde(default)]
    pub fallback_addresses: Vec<String>,
    /// Linked to a fallback address, seconds between probes of the primary (taken back once it answers); 0: never.
    #[serde(default = "default_primary_retry")]
    pub primary_retry_s: u32,
    /// `v5` (default) or `v311`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Unset: `tollgate-bridge-<name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Seconds.
    #[serde(default = "default_keepalive")]
    pub keepalive: u16,
    #[serde(default)]
    pub clean_start: bool,
    /// Seconds the remote keeps the bridge's session after the link drops (MQTT 5).
    #[serde(default = "default_session_expiry")]
    pub session_expiry: u32,
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    /// Messages per second toward the remote at most; 0: no limit.
    #[serde(default)]
    pub max_send_rate: u32,
    /// Seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: u16,
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u32,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u32,
    #[serde(default)]
    pub tls: Option<BridgeTlsConfig>,
    #[serde(default)]
    pub topics: Vec<BridgeTopicConfig>,
    /// Store-and-forward on disk; unset: messages wait in memory.
    #[serde(default)]
    pub queue: Option<BridgeQueueConfig>,
    /// A topic on the remote for the bridge's retained `online`/`offline` (its will); unset: none.
    #[serde(default)]
    pub remote_status_topic: Option<String>,
    /// An HTTP proxy for the link: `host:port` or `http://[user:password@]host:port`.
    #[serde(default)]
    pub proxy: Option<String>,
    /// Announce the link as a bridge (Mosquitto's `try_private`: CONNECT's protocol level with 0x80), so a remote
    /// that knows the convention (Mosquitto, Tollgate) sends nothing back over it; allows `both` on v311.
    #[serde(default)]
    pub try_private: bool,
    /// A user property naming each forwarded message uniquely (MQTT 5 remotes), the same on every resend, so the
    /// cloud can drop duplicates; unset: none.
    #[serde(default)]
    pub message_id_property: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BridgeQueueConfig {
    /// Where the journal's segment files live (one directory per bridge).
    pub dir: PathBuf,
    /// The journal's size on disk at most, in MiB; beyond, its oldest messages are dropped (and counted).
    #[serde(default = "default_queue_max_mb")]
    pub max_mb: u64,
    #[serde(default = "default_segment_mb")]
    pub segment_mb: u64,
    /// `always` (every message on disk before the next), `interval` (every `fsync_interval_ms`) or `never`.
    #[serde(default = "default_fsync")]
    pub fsync: String,
    #[serde(default = "default_fsync_interval")]
    pub fsync_interval_ms: u32,
    /// When a local publisher of a forwarded QoS 1/2 message is acknowledged: `after_durable` (once the message is
    /// in the journal) or `immediate` (once routed).
    #[serde(default = "default_ack")]
    pub ack: String,
}

fn default_queue_max_mb() -> u64 {
    1024
}
fn default_segment_mb() -> u64 {
    16
}
fn default_fsync() -> String {
    "interval".into()
}
fn default_fsync_interval() -> u32 {
    200
}
fn default_ack() -> String {
    "after_durable".into()
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BridgeTlsConfig {
    pub ca_file: PathBuf,
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    #[serde(default)]
    pub server_name: Option<String>,
    /// Protocols offered by ALPN (`["x-amzn-mqtt-ca"]` for AWS IoT Core on port 443).
    #[serde(default)]
    pub alpn: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BridgeTopicConfig {
    pub pattern: String,
    /// `out`, `in` or `both`.
    #[serde(default = "default_direction")]
    pub direction: String,
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub local_prefix: String,
    #[serde(default)]
    pub remote_prefix: String,
    /// `high` or `normal`: the disk queue's lane for what this mapping sends out.
    #[serde(default)]
    pub priority: Option<String>,
}

fn default_primary_retry() -> u32 {
    60
}
fn default_protocol() -> String {
    "v5".into()
}
fn default_keepalive() -> u16 {
    60
}
fn default_session_expiry() -> u32 {
    86_400
}
fn default_max_inflight() -> u16 {
    32
}
fn default_connect_timeout() -> u16 {
    20
}
fn default_reconnect_min() -> u32 {
    1_000
}
fn default_reconnect_max() -> u32 {
    60_000
}
fn default_direction() -> String {
    "out".into()
}
fn default_qos() -> u8 {
    1
}

impl BridgeConfig {
    /// The bridge's settings, or every problem with its key (`bridges[<index>].<key>`).
    pub fn settings(&self, index: usize) -> Result<BridgeSettings, Vec<ConfigProblem>> {
        let key = |name: &str| format!("bridges[{index}].{name}");
        let mut problems = Vec::new();
        let mut report = |key: String, message: String| problems.push(ConfigProblem { key, message });
        // The name becomes a `$SYS` topic level and a log field.
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            report(key("name"), "must be non-empty letters, digits, '-', '_' or '.'".into());
        }
        let is_host_port = |address: &str| {
            matches!(address.rsplit_once(':'),
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0))
        };
        if !is_host_port(&self.address) {
            report(key("address"), format!("{:?} is not host:port", self.address));
        }
        for (position, address) in self.fallback_addresses.iter().enumerate() {
            if !is_host_port(address) {
                report(key(&format!("fallback_addresses[{position}]")), format!("{address:?} is not host:port"));
            }
        }
        let protocol = match self.protocol.as_str() {
            "v5" => ProtocolVersion::V5,
            "v311" => ProtocolVersion::V311,
            other => {
                report(key("protocol"), format!("{other:?} is not \"v5\" or \"v311\""));
                ProtocolVersion::V5
            }
        };
        let client_id = self.client_id.clone().unwrap_or_else(|| format!("tollgate-bridge-{}", self.name));
        if client_id.is_empty() || client_id.len() > 65_535 {
            report(key("client_id"), "must be 1 to 65535 bytes".into());
        }
        if self.password.is_some() && self.username.is_none() && !protocol.is_v5() {
            report(key("password"), "MQTT 3.1.1 sends a password only with a username".into());
        }
        if self.max_inflight == 0 {
            report(key("max_inflight"), "must be at least 1".into());
        }
        if self.connect_timeout == 0 {
            report(key("connect_timeout"), "must be at least 1 second".into());
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            report(key("reconnect_min_ms"), "must be at least 1 and no more than reconnect_max_ms".into());
        }
        let tls = self.tls.as_ref().map(|tls| {
            for (name, path) in
                [("ca_file", Some(&tls.ca_file)), ("cert", tls.cert.as_ref()), ("key", tls.key.as_ref())]
            {
                if let Some(path) = path
                    && !path.is_file()
                {
                    report(key(&format!("tls.{name}")), format!("cannot read {}", path.display()));
                }
            }
            if tls.cert.is_some() != tls.key.is_some() {
                report(key("tls"), "a client certificate needs both cert and key".into());
            }
            TlsSettings {
                ca_file: tls.ca_file.clone(),
                cert: tls.cert.clone(),
                key: tls.key.clone(),
                server_name: tls.server_name.clone(),
                alpn: tls.alpn.clone(),
            }
        });
        let proxy = self
            .proxy
            .as_deref()
            .and_then(|text| tollgate_bridge::Proxy::parse(text).map_err(|message| report(key("proxy"), message)).ok());
        let queue = self.queue.as_ref().map(|queue| {
            let fsync = match queue.fsync.as_str() {
                "always" => FsyncPolicy::Always,
                "interval" if queue.fsync_interval_ms > 0 => {
                    FsyncPolicy::Interval(Duration::from_millis(u64::from(queue.fsync_interval_ms)))
                }
                "interval" => {
                    report(key("queue.fsync_interval_ms"), "must be at least 1".into());
                    FsyncPolicy::Never
                }
                "never" => FsyncPolicy::Never,
                other => {
                    report(key("queue.fsync"), format!("{other:?} is not \"always\", \"interval\" or \"never\""));
                    FsyncPolicy::Never
                }
            };
            let ack = match queue.ack.as_str() {
                "after_durable" => AckPolicy::AfterDurable,
                "immediate" => AckPolicy::Immediate,
                other => {
                    report(key("queue.ack"), format!("{other:?} is not \"after_durable\" or \"immediate\""));
                    AckPolicy::AfterDurable
                }
            };
            if queue.dir.as_os_str().is_empty() {
                report(key("queue.dir"), "an empty path".into());
            } else if queue.dir.exists() && !queue.dir.is_dir() {
                report(key("queue.dir"), format!("{} is not a directory", queue.dir.display()));
            }
            if queue.segment_mb == 0 || queue.segment_mb > 1024 {
                report(key("queue.segment_mb"), "must be between 1 and 1024".into());
            }
            if queue.max_mb < queue.segment_mb.saturating_mul(2) {
                report(key("queue.max_mb"), "must hold at least two segments (2 × segment_mb)".into());
            }
            JournalSettings {
                dir: queue.dir.clone(),
                max_bytes: queue.max_mb.saturating_mul(1 << 20),
                segment_bytes: queue.segment_mb.saturating_mul(1 << 20),
                fsync,
                ack,
            }
        });
        if let Some(topic) = &self.remote_status_topic
            && let Err(error) = tollgate_protocol::topic::validate_topic_name(topic)
        {
            report(key("remote_status_topic"), format!("{topic:?}: {error}"));
        }
        match &self.message_id_property {
            Some(name) if name.is_empty() || name.contains('\0') => {
                report(key("message_id_property"), "a user property name: not empty, no NUL".into())
            }
            Some(_) if !protocol.is_v5() => {
                report(key("message_id_property"), "user properties need protocol = \"v5\"".into())
            }
            _ => {}
        }
        if self.topics.is_empty() {
            report(key("topics"), "a bridge needs at least one [[bridges.topics]] mapping".into());
        }
        let mut topics = Vec::new();
        for (position, topic) in self.topics.iter().enumerate() {
            let key = |name: &str| format!("bridges[{index}].topics[{position}].{name}");
            let direction = topic.direction.parse::<Direction>().unwrap_or_else(|message| {
                report(key("direction"), message);
                Direction::Out
            });
            let qos = QoS::from_u8(topic.qos).unwrap_or_else(|| {
                report(key("qos"), format!("{} is not a QoS (0, 1 or 2)", topic.qos));
                QoS::AtMostOnce
            });
            let priority = match topic.priority.as_deref().map(str::parse::<Priority>) {
                None => Priority::Normal,
                Some(Ok(priority)) => priority,
                Some(Err(message)) => {
                    report(key("priority"), message);
                    Priority::Normal
                }
            };
            if priority == Priority::High && self.queue.is_none() {
                report(key("priority"), "lanes are the disk queue's: add a [bridges.queue]".into());
            }
            if priority == Priority::High && direction == Direction::In {
                report(key("priority"), "orders what is sent out; this mapping only takes in".into());
            }
            let mapping = TopicMapping {
                pattern: topic.pattern.clone(),
                direction,
                qos,
                local_prefix: topic.local_prefix.clone(),
                remote_prefix: topic.remote_prefix.clone(),
                priority,
            };
            if let Err(message) = mapping.check() {
                report(key("pattern"), message);
            }
            // MQTT 3.1.1 has no No Local: the remote would send back every message the bridge forwards to it,
            // unless it knows the link for a bridge (`try_private`).
            if !protocol.is_v5() && direction == Direction::Both && !self.try_private {
                report(
                    key("direction"),
                    "\"both\" on a v311 bridge would loop (MQTT 3.1.1 has no No Local); use one direction, or \
                     try_private = true toward a remote that honours it (Mosquitto, Tollgate)"
                        .into(),
                );
            }
            topics.push(mapping);
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(BridgeSettings {
            name: self.name.clone(),
            address: self.address.clone(),
            fallback_addresses: self.fallback_addresses.clone(),
            primary_retry: Duration::from_secs(u64::from(self.primary_retry_s)),
            protocol,
            client_id,
            username: self.username.clone(),
            password: self.password.clone(),
            keep_alive: Duration::from_secs(u64::from(self.keepalive)),
            clean_start: self.clean_start,
            session_expiry: Duration::from_secs(u64::from(self.session_expiry)),
            max_inflight: self.max_inflight,
            max_send_rate: self.max_send_rate,
            connect_timeout: Duration::from_secs(u64::from(self.connect_timeout)),
            reconnect_min: Duration::from_millis(u64::from(self.reconnect_min_ms)),
            reconnect_max: Duration::from_millis(u64::from(self.reconnect_max_ms)),
            tls,
            topics,
            queue,
            remote_status_topic: self.remote_status_topic.clone(),
            message_id_property: self.message_id_property.clone(),
            proxy,
            try_private: self.try_private,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge(toml: &str) -> BridgeConfig {
        use figment::providers::Format;
        figment::Figment::from(figment::providers::Toml::string(toml)).extract().expect("a bridge table")
    }

    #[test]
    fn a_minimal_bridge_gets_its_defaults() {
        let settings = bridge(
            r#"
            name = "cloud"
            address = "127.0.0.1:1883"
            topics = [{ pattern = "site/#" }]
            "#,
        )
        .settings(0)
        .expect("valid");
        assert_eq!(settings.client_id, "tollgate-bridge-cloud");
        assert_eq!(settings.protocol, ProtocolVersion::V5);
        assert_eq!(settings.topics[0].direction, Direction::Out);
        assert_eq!(settings.topics[0].qos, QoS::AtLeastOnce);
        assert_eq!(settings.keep_alive, Duration::from_secs(60));
    }

    #[test]
    fn every_problem_is_named_by_its_key() {
        let problems = bridge(
            r#"
            name = "a b"
            address = "nowhere"
            protocol = "v4"
            max_inflight = 0
            fallback_addresses = ["127.0.0.1:1884", "nohost"]
            remote_status_topic = "sites/+/state"
            tls = { ca_file = "/no/such/ca.pem", cert = "/no/such/cert.pem" }
            topics = [
                { pattern = "a/#/b" },
                { pattern = "x", direction = "sideways", qos = 3 },
            ]
            "#,
        )
        .settings(2)
        .expect_err("invalid");
        let keys: Vec<&str> = problems.iter().map(|problem| problem.key.as_str()).collect();
        for expected in [
            "bridges[2].name",
            "bridges[2].address",
            "bridges[2].protocol",
            "bridges[2].max_inflight",
            "bridges[2].fallback_addresses[1]",
            "bridges[2].remote_status_topic",
            "bridges[2].tls.ca_file",
            "bridges[2].tls.cert",
            "bridges[2].tls",
            "bridges[2].topics[0].pattern",
            "bridges[2].topics[1].direction",
            "bridges[2].topics[1].qos",
        ] {
            assert!(keys.contains(&expected), "{expected} missing from {keys:?}");
        }
    }

    #[test]
    fn a_disk_queue_is_checked_and_sized() {
        let settings = bridge(
            r#"
            name = "cloud"
            address = "127.0.0.1:1883"
            topics = [{ pattern = "site/#" }]
            queue = { dir = "/var/lib/tollgate/bridge-cloud", max_mb = 512, fsync = "always" }
            "#,
        )
        .settings(0)
        .expect("valid");
        let queue = settings.queue.expect("a queue");
        assert_eq!(queue.max_bytes, 512 << 20);
        assert_eq!(queue.segment_bytes, 16 << 20);
        assert_eq!(queue.fsync, FsyncPolicy::Always);
        assert_eq!(queue.ack, AckPolicy::AfterDurable, "the default");
        let problems = bridge(
            r#"
            name = "cloud"
            address = "127.0.0.1:1883"
            topics = [{ pattern = "site/#" }]
            queue = { dir = "", max_mb = 8, segment_mb = 16, fsync = "sometimes", ack = "later" }
            "#,
        )
        .settings(1)
        .expect_err("invalid");
        let keys: Vec<&str> = problems.iter().map(|problem| problem.key.as_str()).collect();
        assert_eq!(
            keys,
            ["bridges[1].queue.fsync", "bridges[1].queue.ack", "bridges[1].queue.dir", "bridges[1].queue.max_mb"]
        );
    }

    #[test]
    fn both_directions_on_a_v311_bridge_is_refused_as_a_loop() {
        let problems = bridge(
            r#"
            name = "old"
            address = "127.0.0.1:1883"
            protocol = "v311"
            topics = [{ pattern = "a/#", direction = "both" }]
            "#,
        )
        .settings(0)
        .expect_err("a loop");
        assert_eq!(problems[0].key, "bridges[0].topics[0].direction");
        assert!(problems[0].message.contains("loop"), "{}", problems[0].message);
        let announced = bridge(
            r#"
            name = "old"
            address = "127.0.0.1:1883"
            protocol = "v311"
            try_private = true
            topics = [{ pattern = "a/#", direction = "both" }]
            "#,
        )
        .settings(0)
        .expect("a remote that honours try_private sends nothing back");
        assert!(announced.try_private);
    }

    #[test]
    fn a_high_priority_lane_needs_a_disk_queue_and_an_outgoing_mapping() {
        let settings = bridge(
            r#"
            name = "cloud"
            address = "127.0.0.1:1883"
            queue = { dir = "/var/lib/tollgate/bridge-cloud" }
            topics = [{ pattern = "events/#", priority = "high" }, { pattern = "telemetry/#" }]
            "#,
        )
        .settings(0)
        .expect("valid");
        let priorities: Vec<Priority> = settings.topics.iter().map(|mapping| mapping.priority).collect();
        assert_eq!(priorities, [Priority::High, Priority::Normal]);
        let problems = bridge(
            r#"
            name = "cloud"
            address = "127.0.0.1:1883"
            topics = [
              { pattern = "events/#", priority = "high" },
              { pattern = "cmd/#", direction = "in", priority = "urgent" },
            ]
            "#,
        )
        .settings(0)
        .expect_err("refused");
        let messages: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(messages.len(), 2, "{messages:?}");
        assert!(messages[0].starts_with("bridges[0].topics[0].priority: lanes are the disk queue's"), "{messages:?}");
        assert!(messages[1].starts_with("bridges[0].topics[1].priority: \"urgent\""), "{messages:?}");
    }

    #[test]
    fn a_proxy_is_checked_and_alpn_passed_on() {
        let settings = bridge(
            r#"
            name = "cloud"
            address = "abc-ats.iot.eu-central-1.amazonaws.com:443"
            proxy = "http://proxy.plant.local:3128"
            tls = { ca_file = "Cargo.toml", alpn = ["x-amzn-mqtt-ca"] }
            topics = [{ pattern = "a/#" }]
            "#,
        )
        .settings(0)
        .expect("valid");
        assert_eq!(settings.proxy.map(|proxy| proxy.address), Some("proxy.plant.local:3128".into()));
        assert_eq!(settings.tls.map(|tls| tls.alpn), Some(vec!["x-amzn-mqtt-ca".to_owned()]));
        let problems = bridge(
            "name = \"cloud\"\naddress = \"127.0.0.1:1883\"\nproxy = \"socks5://10.0.0.1:1080\"\n\
             topics = [{ pattern = \"a/#\" }]\n",
        )
        .settings(0)
        .expect_err("refused");
        assert_eq!(problems[0].key, "bridges[0].proxy");
        assert!(problems[0].message.contains("HTTP proxy"), "{}", problems[0].message);
    }

    #[test]
    fn a_message_id_property_needs_an_mqtt_5_remote() {
        let settings = |protocol: &str, name: &str| {
            bridge(&format!(
                "name = \"cloud\"\naddress = \"127.0.0.1:1883\"\nprotocol = \"{protocol}\"\n\
                 message_id_property = \"{name}\"\ntopics = [{{ pattern = \"a/#\" }}]\n"
            ))
            .settings(0)
        };
        assert_eq!(settings("v5", "x-bridge-id").expect("valid").message_id_property.as_deref(), Some("x-bridge-id"));
        for (protocol, name, complaint) in [("v311", "x-bridge-id", "v5"), ("v5", "", "empty")] {
            let problems = settings(protocol, name).expect_err("refused");
            assert_eq!(problems[0].key, "bridges[0].message_id_property");
            assert!(problems[0].message.contains(complaint), "{}", problems[0].message);
        }
    }
}
