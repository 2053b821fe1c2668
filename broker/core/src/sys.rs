//! `$SYS/broker/...` topics in Mosquitto's style, published retained at a fixed interval.

use std::sync::atomic::AtomicU64;

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

fn publish_stats(broker: &Broker) {
    let metrics = broker.metrics();
    let counter = |value: &AtomicU64| Metrics::get(value).to_string();
    let connected = Metrics::get(&metrics.clients_connected);
    let total_sessions = broker.sessions().len() as u64;
    let entries = [
        ("uptime", format!("{} seconds", broker.uptime().as_secs())),
        ("clients/connected", connected.to_string()),
        ("clients/active", connected.to_string()),
        ("clients/disconnected", total_sessions.saturating_sub(connected).to_string()),
        ("clients/total", total_sessions.to_string()),
        ("clients/maximum", counter(&metrics.clients_maximum)),
        ("messages/received", counter(&metrics.messages_received)),
        ("messages/sent", counter(&metrics.messages_sent)),
        ("publish/messages/received", counter(&metrics.publish_received)),
        ("publish/messages/sent", counter(&metrics.publish_sent)),
        ("publish/messages/dropped", counter(&metrics.publish_dropped)),
        ("bytes/received", counter(&metrics.bytes_received)),
        ("bytes/sent", counter(&metrics.bytes_sent)),
        ("subscriptions/count", broker.router().subscription_count().to_string()),
        ("retained messages/count", broker.retained().len().to_string()),
    ];
    for (name, value) in entries {
        broker.publish_local(&format!("$SYS/broker/{name}"), value, QoS::AtMostOnce, true);
    }
}
