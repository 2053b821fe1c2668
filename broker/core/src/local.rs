//! A client inside the process: a session with subscriptions and a bounded queue like any network client's, but
//! drained by the code that holds it instead of a socket. Bridges use it to take the messages they forward.
//!
//! The session is not in the session store: it is not taken over, expired, rechecked or persisted, and ends
//! when the `LocalClient` is dropped. It stays attached for its whole life, so messages queue (within the
//! broker's queue bound and overflow policy) while its holder cannot pass them on.

use std::sync::Arc;

use tokio::time::Instant;
use tollgate_protocol::{PacketId, SubscriptionOptions};

use crate::Broker;
use crate::message::{ClientId, Delivery, Message};
use crate::router::Subscriber;
use crate::session::{Inflight, SessionRef, SessionSubscription};

/// A subscription filter a local client could not use.
#[derive(Debug, thiserror::Error)]
#[error("invalid subscription filter {filter:?}: {reason}")]
pub struct LocalFilterError {
    pub filter: String,
    pub reason: String,
}

/// What a local client must still finish after its holder reconnects elsewhere, in the order first sent.
#[derive(Clone, Debug)]
pub enum Unfinished {
    /// Sent (or about to be) and not acknowledged: send again, marked duplicate.
    Publish(PacketId, Delivery),
    /// QoS 2: the receiver has it; only the release remains.
    Release(PacketId),
}

pub struct LocalClient {
    broker: Broker,
    session: SessionRef,
    client: Arc<tollgate_hooks::ClientInfo>,
}

impl Broker {
    /// A client inside the process, named `client_id` in logs. See [`LocalClient`].
    pub fn local_client(&self, client_id: &str) -> LocalClient {
        self.make_local_client(client_id, false)
    }

    /// A local client whose copies publishers wait for: a network client's PUBACK or PUBREC for a message this
    /// client is queued a copy of goes out only once the holder has let go of the copy ([`LocalClient::complete`]
    /// for QoS 1 and 2, dropping the batch entry for all). A bridge's disk queue uses it to acknowledge after the
    /// journal write. Backpressure: the publisher is answered no faster than the holder keeps up.
    pub fn durable_local_client(&self, client_id: &str) -> LocalClient {
        self.make_local_client(client_id, true)
    }

    fn make_local_client(&self, client_id: &str, durable_acks: bool) -> LocalClient {
        let mut session = self.unshared_session(ClientId(client_id.into()), u32::MAX);
        session.durable_acks = durable_acks;
        let session = Arc::new(session);
        let client = Arc::new(tollgate_hooks::ClientInfo {
            client_id: client_id.into(),
            username: None,
            protocol: tollgate_protocol::ProtocolVersion::V5,
            remote_addr: None,
            listener: "local".into(),
            peer: None,
            attributes: Arc::default(),
        });
        session.attach(client.clone());
        LocalClient { broker: self.clone(), session, client }
    }
}

impl LocalClient {
    /// Who this client is to hooks (a `deliver` hook sees it as the subscriber).
    pub fn client(&self) -> Arc<tollgate_hooks::ClientInfo> {
        self.client.clone()
    }

    /// Subscribes; retained messages matching the filter are queued now, as for a new network subscription.
    pub fn subscribe(&self, filter: &str, options: SubscriptionOptions) -> Result<(), LocalFilterError> {
        let parsed = tollgate_protocol::topic::parse_subscription_filter(filter)
            .map_err(|error| LocalFilterError { filter: filter.into(), reason: error.to_string() })?;
        let subscriber = Subscriber { session: self.session.clone(), options, identifier: None };
        self.broker.router().subscribe(parsed.filter, parsed.share_group, subscriber);
        self.session.lock().subscriptions.insert(filter.into(), SessionSubscription { options, identifier: None });
        if parsed.share_group.is_none() && options.retain_handling != 2 {
            for message in self.broker.retained().matching(parsed.filter, Instant::now()) {
                let qos = message.qos.min(options.qos);
                // A retained message sent because of a new subscription keeps its flag [MQTT-3.3.1-8].
                self.broker.deliver(&self.session, Delivery::new(message, qos, true, Vec::new()));
            }
        }
        Ok(())
    }

    /// Waits until something is queued and takes what the in-flight `window` allows (at most `max_batch`),
    /// with packet ids assigned to QoS 1 and 2. Cancel-safe: nothing is taken until it returns.
    pub async fn next_batch(&self, window: usize, max_batch: usize) -> Vec<(Delivery, Option<PacketId>)> {
        loop {
            let woken = self.session.wakeup.notified();
            let batch = self.session.lock().take_sendable(window, max_batch, Instant::now());
            if !batch.is_empty() {
                return batch;
            }
            woken.await;
        }
    }

    /// What [`LocalClient::next_batch`] would take now, without waiting (empty when nothing is queued).
    pub fn try_batch(&self, window: usize, max_batch: usize) -> Vec<(Delivery, Option<PacketId>)> {
        self.session.lock().take_sendable(window, max_batch, Instant::now())
    }

    /// QoS 1 acknowledged, or QoS 2 completed: the slot opens.
    pub fn complete(&self, packet_id: PacketId) -> bool {
        let known = self.session.lock().complete(packet_id);
        self.session.wakeup.notify_one();
        known
    }

    /// QoS 2 received by the other side: only the release remains.
    pub fn received(&self, packet_id: PacketId) -> bool {
        self.session.lock().received(packet_id)
    }

    /// Everything in flight, for sending again after the holder's link came back [MQTT-4.4.0-1].
    pub fn unfinished(&self) -> Vec<Unfinished> {
        self.session
            .lock()
            .inflight_in_order()
            .into_iter()
            .map(|(packet_id, entry)| match entry {
                Inflight::Publish(delivery) => Unfinished::Publish(packet_id, delivery),
                Inflight::Release => Unfinished::Release(packet_id),
            })
            .collect()
    }

    /// Messages waiting to be taken, and those taken and not yet finished.
    pub fn backlog(&self) -> (usize, usize) {
        let state = self.session.lock();
        (state.queue.len(), state.inflight.len())
    }

    /// Publishes into the broker as this client: its own no-local subscriptions do not get the message back.
    pub fn publish(&self, mut message: Message) -> usize {
        message.origin = Some(self.session.id);
        let client_id = self.session.client_id.clone();
        self.broker.publish_from(Arc::new(message), Some(&client_id))
    }
}

impl Drop for LocalClient {
    fn drop(&mut self) {
        self.broker.end_session(&self.session);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tollgate_hooks::HookChain;
    use tollgate_protocol::QoS;

    use super::*;
    use crate::BrokerConfig;
    use crate::message::DurableAcks;

    fn message(topic: &str, qos: QoS, retain: bool) -> Message {
        Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos,
            retain,
            properties: Default::default(),
            expires_at: None,
            origin: None,
        }
    }

    fn options(qos: QoS) -> SubscriptionOptions {
        SubscriptionOptions { qos, no_local: true, retain_as_published: true, retain_handling: 0 }
    }

    #[tokio::test]
    async fn a_local_client_takes_its_messages_within_a_window_and_finishes_them() {
        let broker = Broker::new(BrokerConfig::default(), HookChain::default());
        broker.publish(Arc::new(message("site/retained", QoS::AtLeastOnce, true)));
        let local = broker.local_client("$bridge/test");
        local.subscribe("site/#", options(QoS::AtLeastOnce)).expect("a valid filter");
        assert!(local.subscribe("site/#/bad", options(QoS::AtLeastOnce)).is_err());
        for index in 0..3 {
            broker.publish(Arc::new(message(&format!("site/{index}"), QoS::AtLeastOnce, false)));
        }
        // The retained message first (flag kept), then the live ones; a window of 2 holds back the rest.
        let batch = tokio::time::timeout(Duration::from_secs(1), local.next_batch(2, 10)).await.expect("queued");
        let topics: Vec<&str> = batch.iter().map(|(delivery, _)| &*delivery.message.topic).collect();
        assert_eq!(topics, ["site/retained", "site/0"]);
        assert!(batch[0].0.retain);
        assert_eq!(local.backlog(), (2, 2));
        assert!(local.try_batch(2, 10).is_empty(), "the window is full");
        let first = batch[0].1.expect("QoS 1 has a packet id");
        assert!(local.complete(first));
        assert!(!local.complete(first), "completed once");
        assert_eq!(local.unfinished().len(), 1, "site/0 is still in flight, for a resend");
        assert_eq!(local.try_batch(2, 10).len(), 1);
    }

    fn is_ready<F: std::future::Future>(future: std::pin::Pin<&mut F>) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        future.poll(&mut cx).is_ready()
    }

    #[tokio::test]
    async fn a_publisher_waits_until_a_durable_local_client_lets_go_of_its_copies() {
        let broker = Broker::new(BrokerConfig::default(), HookChain::default());
        let durable = broker.durable_local_client("$bridge/disk");
        durable.subscribe("site/#", options(QoS::AtLeastOnce)).expect("a valid filter");
        let plain = broker.local_client("$bridge/memory");
        plain.subscribe("other/#", options(QoS::AtLeastOnce)).expect("a valid filter");

        // Only copies for the durable client hold a receipt; a message it does not take needs no wait.
        let mut acks = DurableAcks::default();
        broker.publish_acked(Arc::new(message("other/1", QoS::AtLeastOnce, false)), None, &mut acks);
        assert!(!acks.is_pending());
        assert!(is_ready(std::pin::pin!(acks.wait())));

        // Two messages (one at QoS 0 to the client) share this publisher's receipt.
        broker.publish_acked(Arc::new(message("site/1", QoS::AtLeastOnce, false)), None, &mut acks);
        broker.publish_acked(Arc::new(message("site/2", QoS::AtMostOnce, false)), None, &mut acks);
        assert!(acks.is_pending());
        let mut wait = Box::pin(acks.wait());
        assert!(!is_ready(wait.as_mut()), "nothing taken yet");
        let batch = durable.try_batch(10, 10);
        assert_eq!(batch.len(), 2);
        let packet_id = batch[0].1.expect("QoS 1 has a packet id");
        drop(batch);
        assert!(!is_ready(wait.as_mut()), "the QoS 1 copy is still in flight");
        assert!(durable.complete(packet_id));
        assert!(is_ready(wait.as_mut()), "every copy let go of");
        drop(wait);
        assert!(!acks.is_pending(), "the next input starts afresh");

        // Copies the holder never takes are let go of when it goes: the publisher is not held forever.
        broker.publish_acked(Arc::new(message("site/3", QoS::AtLeastOnce, false)), None, &mut acks);
        let mut wait = Box::pin(acks.wait());
        assert!(!is_ready(wait.as_mut()));
        drop(durable);
        assert!(is_ready(wait.as_mut()));
    }

    #[tokio::test]
    async fn what_a_local_client_publishes_does_not_come_back_to_it_and_dropping_it_unsubscribes() {
        let broker = Broker::new(BrokerConfig::default(), HookChain::default());
        let local = broker.local_client("$bridge/test");
        local.subscribe("a/#", options(QoS::AtMostOnce)).expect("a valid filter");
        assert_eq!(local.publish(message("a/1", QoS::AtMostOnce, false)), 0, "no-local: not to itself");
        assert_eq!(broker.router().subscription_count(), 1);
        drop(local);
        assert_eq!(broker.router().subscription_count(), 0);
    }
}
