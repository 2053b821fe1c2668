//! `$SYS/broker/...` topics in Mosquitto's style, published retained at a fixed interval.

use tollgate_protocol::QoS;

use crate::Broker;
use crate::metrics::Metrics;

/// Publishes the `$SYS` tree until shutdown. Does nothing if the interval is zero.
pub async fn run(broker: Broker) {
    if broker.config().sys_interval.is_zero() {
        return;
    }
    publish_static(&broker);
    every_interval(&broker, publish_stats).await;
}

/// Calls `tick` every `$SYS` interval (the first time at once) until shutdown, for anything else that publishes
/// under `$SYS`; returns at once if the interval is zero.
pub async fn every_interval(broker: &Broker, mut tick: impl FnMut(&Broker)) {
    let interval = broker.config().sys_interval;
    if interval.is_zero() {
        return;
    }
    let shutdown = broker.shutdown_token();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => tick(broker),
            _ = shutdown.cancelled() => return,
        }
    }
}

fn publish_static(broker: &Broker) {
    let version = format!("tollgate version {}", env!("CARGO_PKG_VERSION"));
    broker.publish_local("$SYS/broker/version", version, QoS::AtMostOnce, true);
}

/// The broker-wide figures `$SYS` publishes (and `tollgate status` prints), read at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub uptime_secs: u64,
    pub clients_connected: u64,
    pub clients_maximum: u64,
    /// Live and persisted sessions.
    pub sessions: u64,
    pub subscriptions: u64,
    pub retained: u64,
    /// Packets of any kind.
    pub messages_received: u64,
    pub messages_sent: u64,
    pub publish_received: u64,
    pub publish_sent: u64,
    pub publish_dropped: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

impl Stats {
    pub fn of(broker: &Broker) -> Self {
        let metrics = broker.metrics();
        let count = |len: usize| u64::try_from(len).unwrap_or(u64::MAX);
        Self {
            uptime_secs: broker.uptime().as_secs(),
            clients_connected: Metrics::get(&metrics.clients_connected),
            clients_maximum: Metrics::get(&metrics.clients_maximum),
            sessions: count(broker.sessions().len()),
            subscriptions: count(broker.router().subscription_count()),
            retained: count(broker.retained().len()),
            messages_received: Metrics::get(&metrics.messages_received),
            messages_sent: Metrics::get(&metrics.messages_sent),
            publish_received: Metrics::get(&metrics.publish_received),
            publish_sent: Metrics::get(&metrics.publish_sent),
            publish_dropped: Metrics::get(&metrics.publish_dropped),
            bytes_received: Metrics::get(&metrics.bytes_received),
            bytes_sent: Metrics::get(&metrics.bytes_sent),
        }
    }
}

fn publish_stats(broker: &Broker) {
    let stats = Stats::of(broker);
    let entries = [
        ("uptime", format!("{} seconds", stats.uptime_secs)),
        ("clients/connected", stats.clients_connected.to_string()),
        ("clients/active", stats.clients_connected.to_string()),
        ("clients/disconnected", stats.sessions.saturating_sub(stats.clients_connected).to_string()),
        ("clients/total", stats.sessions.to_string()),
        ("clients/maximum", stats.clients_maximum.to_string()),
        ("messages/received", stats.messages_received.to_string()),
        ("messages/sent", stats.messages_sent.to_string()),
        ("publish/messages/received", stats.publish_received.to_string()),
        ("publish/messages/sent", stats.publish_sent.to_string()),
        ("publish/messages/dropped", stats.publish_dropped.to_string()),
        ("bytes/received", stats.bytes_received.to_string()),
        ("bytes/sent", stats.bytes_sent.to_string()),
        ("subscriptions/count", stats.subscriptions.to_string()),
        ("retained messages/count", stats.retained.to_string()),
    ];
    for (name, value) in entries {
        broker.publish_local(&format!("$SYS/broker/{name}"), value, QoS::AtMostOnce, true);
    }
}
