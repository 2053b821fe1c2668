//! Runtime settings of the broker core, already validated by the server crate.

use std::time::Duration;

/// What happens when a session's queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Keep the queue as it is and discard the arriving message (Mosquitto's behaviour).
    #[default]
    DropNewest,
    /// Discard the oldest queued message to make room, favouring fresh data (telemetry).
    DropOldest,
}

/// What an MQTT 3.1.1 client whose PUBLISH authorization refused gets. 3.1.1 has no negative acknowledgement;
/// MQTT 5 clients always get PUBACK/PUBREC 0x87.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DeniedPublish {
    /// Acknowledge and drop the message (Mosquitto's behaviour): the client cannot tell.
    #[default]
    Drop,
    /// Close the connection, so a device publishing where it may not notices (and its will is published).
    Disconnect,
}

#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Upper bound on the keepalive a client may use; sent as v5 Server Keep Alive. Zero disables the cap.
    pub max_keepalive: u16,
    /// Largest packet accepted from clients, fixed header included.
    pub max_packet_size: u32,
    /// Outgoing QoS 1/2 messages in flight per client (also bounded by the client's Receive Maximum) and the
    /// Receive Maximum the broker announces.
    pub max_inflight: u16,
    /// Messages queued per session beyond those in flight, online or offline.
    pub max_queued_messages: usize,
    pub overflow_policy: OverflowPolicy,
    /// Whether QoS 0 messages are queued for offline persistent sessions (Mosquitto: queue_qos0_messages).
    pub queue_qos0_offline: bool,
    /// Topic aliases the broker accepts from each v5 client.
    pub topic_alias_maximum: u16,
    /// A socket that has not completed CONNECT by then is closed.
    pub connect_timeout: Duration,
    /// How long shutdown waits for connections to say goodbye.
    pub shutdown_grace: Duration,
    /// Interval for `$SYS/broker/...` updates; zero disables them.
    pub sys_interval: Duration,
    pub retain_available: bool,
    /// Session expiry given to MQTT 3.1.1 persistent sessions (they carry none). `None` keeps them forever.
    pub persistent_session_expiry: Option<Duration>,
    /// PUBLISH packets per second one client may send (0 = no limit); beyond it the client is disconnected
    /// (v5: 0x96 Message rate too high).
    pub max_publish_rate: u32,
    /// PUBLISH payload bytes per second one client may send (0 = no limit); beyond it v5 QoS 1/2 messages are
    /// refused with 0x97 Quota exceeded and QoS 0 ones dropped; a 3.1.1 client, which cannot be told, is
    /// disconnected.
    pub max_publish_bytes_rate: u32,
    pub publish_denied_v311: DeniedPublish,
    /// When a recheck ends a client's session (its access was revoked), also remove the retained messages it set.
    pub purge_retained_on_revoke: bool,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        Self {
            max_keepalive: 65_535,
            max_packet_size: 1024 * 1024,
            max_inflight: 32,
            max_queued_messages: 1000,
            overflow_policy: OverflowPolicy::DropNewest,
            queue_qos0_offline: false,
            topic_alias_maximum: 10,
            connect_timeout: Duration::from_secs(10),
            max_publish_rate: 0,
            max_publish_bytes_rate: 0,
            shutdown_grace: Duration::from_secs(5),
            sys_interval: Duration::from_secs(10),
            retain_available: true,
            persistent_session_expiry: None,
            publish_denied_v311: DeniedPublish::Drop,
            purge_retained_on_revoke: false,
        }
    }
}
