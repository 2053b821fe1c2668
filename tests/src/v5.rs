//! rumqttc MQTT 5 client wrapper, shaped like [`crate::v4`]: the event loop runs in its own task, stops at the
//! first error (no silent reconnects), and publishes seen while waiting for something else are kept.

#![allow(clippy::unwrap_used)]
// rumqttc's ConnectionError is large; it is what the tests inspect, so it is passed around as is.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{
    ConnAck, ConnectReturnCode, DisconnectReasonCode, Filter, LastWill, LastWillProperties, Packet, PubAckReason,
    PubRecReason, Publish, PublishProperties, SubscribeProperties, SubscribeReasonCode,
};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{TestBroker, within};

/// Options for `client_id` against `broker`: clean start, session expiry 0, keepalive 30 s.
pub fn options(broker: &TestBroker, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// Options with a will (optionally delayed).
pub fn options_with_will(
    broker: &TestBroker,
    client_id: &str,
    topic: &str,
    payload: &str,
    qos: QoS,
    properties: Option<LastWillProperties>,
) -> MqttOptions {
    let mut options = options(broker, client_id);
    options.set_last_will(LastWill::new(topic, payload, qos, false, properties));
    options
}

/// How a publish exchange ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acked {
    /// QoS 0: written to the socket.
    Sent,
    PubAck(PubAckReason),
    /// QoS 2 refused at PUBREC (an error reason ends the exchange).
    PubRec(PubRecReason),
    /// QoS 2 completed.
    PubComp,
}

pub struct Client {
    pub client: AsyncClient,
    pub id: String,
    events: mpsc::UnboundedReceiver<Result<Event, ConnectionError>>,
    pending: VecDeque<Publish>,
    task: JoinHandle<()>,
}

async fn pump(mut eventloop: EventLoop, events: mpsc::UnboundedSender<Result<Event, ConnectionError>>) {
    loop {
        let event = eventloop.poll().await;
        let failed = event.is_err();
        if events.send(event).is_err() || failed {
            return;
        }
    }
}

pub async fn try_connect(options: MqttOptions) -> Result<(Client, ConnAck), ConnectionError> {
    let id = options.client_id();
    let (client, eventloop) = AsyncClient::new(options, 64);
    let (sender, mut events) = mpsc::unbounded_channel();
    let task = tokio::spawn(pump(eventloop, sender));
    let connack = within(&format!("CONNACK for {id}"), async {
        loop {
            match events.recv().await {
                Some(Ok(Event::Incoming(Packet::ConnAck(connack)))) => return Ok(connack),
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error),
                None => panic!("event loop of {id} ended before CONNACK"),
            }
        }
    })
    .await;
    match connack {
        Ok(connack) => Ok((Client { client, id, events, pending: VecDeque::new(), task }, connack)),
        Err(error) => {
            task.abort();
            Err(error)
        }
    }
}

pub async fn connect(options: MqttOptions) -> (Client, ConnAck) {
    let id = options.client_id();
    match try_connect(options).await {
        Ok((client, connack)) => {
            assert_eq!(connack.code, ConnectReturnCode::Success, "CONNACK of {id}");
            (client, connack)
        }
        Err(error) => panic!("{id} could not connect: {error:?}"),
    }
}

pub async fn connect_to(broker: &TestBroker, client_id: &str) -> Client {
    connect(options(broker, client_id)).await.0
}

/// The CONNACK reason code of a refused connection attempt.
pub async fn refused_code(options: MqttOptions) -> ConnectReturnCode {
    let id = options.client_id();
    match try_connect(options).await {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Ok((_, connack)) => panic!("{id} was accepted ({connack:?}) but should have been refused"),
        Err(other) => panic!("{id} failed with {other:?} instead of a CONNACK refusal"),
    }
}

pub fn topic(publish: &Publish) -> String {
    String::from_utf8(publish.topic.to_vec()).unwrap()
}

pub fn properties(publish: &Publish) -> PublishProperties {
    publish.properties.clone().unwrap_or_default()
}

/// A filter with every v5 option spelled out.
pub fn filter(path: &str, qos: QoS) -> Filter {
    Filter::new(path, qos)
}

impl Client {
    pub async fn next_event(&mut self) -> Result<Event, ConnectionError> {
        let what = format!("an event on {}", self.id);
        within(&what, self.events.recv()).await.unwrap_or_else(|| panic!("event loop of {} already ended", self.id))
    }

    pub async fn next_publish(&mut self) -> Publish {
        if let Some(publish) = self.pending.pop_front() {
            return publish;
        }
        loop {
            match self.next_event().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => return publish,
                Ok(_) => {}
                Err(error) => panic!("{} lost its connection: {error:?}", self.id),
            }
        }
    }

    /// The next PUBLISH if one arrives within `window`.
    pub async fn publish_within(&mut self, window: Duration) -> Option<Publish> {
        if let Some(publish) = self.pending.pop_front() {
            return Some(publish);
        }
        let deadline = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return None,
                Ok(None) => panic!("event loop of {} ended", self.id),
                Ok(Some(Ok(Event::Incoming(Packet::Publish(publish))))) => return Some(publish),
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(error))) => panic!("{} lost its connection: {error:?}", self.id),
            }
        }
    }

    pub async fn expect_no_publish(&mut self, window: Duration) {
        if let Some(publish) = self.publish_within(window).await {
            panic!("{} received an unexpected {publish:?}", self.id);
        }
    }

    async fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
        loop {
            match self.next_event().await {
                Ok(event) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                    if let Event::Incoming(Packet::Publish(publish)) = event {
                        self.pending.push_back(publish);
                    }
                }
                Err(error) => panic!("{} lost its connection waiting for {what}: {error:?}", self.id),
            }
        }
    }

    /// Subscribes with full filter options and optional properties; returns every SUBACK reason code.
    pub async fn subscribe_with(
        &mut self,
        filters: Vec<Filter>,
        properties: Option<SubscribeProperties>,
    ) -> Vec<SubscribeReasonCode> {
        match properties {
            Some(properties) => self.client.subscribe_many_with_properties(filters, properties).await.unwrap(),
            None => self.client.subscribe_many(filters).await.unwrap(),
        }
        self.wait_for("SUBACK", |event| match event {
            Event::Incoming(Packet::SubAck(suback)) => Some(suback.return_codes.clone()),
            _ => None,
        })
        .await
    }

    pub async fn subscribe(&mut self, path: &str, qos: QoS) -> SubscribeReasonCode {
        self.subscribe_with(vec![filter(path, qos)], None).await[0]
    }

    pub async fn subscribe_ok(&mut self, path: &str, qos: QoS) {
        let code = self.subscribe(path, qos).await;
        assert_eq!(code, SubscribeReasonCode::Success(qos), "SUBACK for {path}");
    }

    /// Subscribes with a subscription identifier.
    pub async fn subscribe_with_id(&mut self, path: &str, qos: QoS, id: usize) {
        let properties = SubscribeProperties { id: Some(id), user_properties: Vec::new() };
        let codes = self.subscribe_with(vec![filter(path, qos)], Some(properties)).await;
        assert_eq!(codes, vec![SubscribeReasonCode::Success(qos)], "SUBACK for {path}");
    }

    /// Publishes with properties and waits for the end of the exchange.
    pub async fn publish_with(
        &mut self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: &[u8],
        properties: Option<PublishProperties>,
    ) -> Acked {
        let payload = Bytes::copy_from_slice(payload);
        match properties {
            Some(properties) => {
                self.client.publish_with_properties(topic, qos, retain, payload, properties).await.unwrap()
            }
            None => self.client.publish(topic, qos, retain, payload).await.unwrap(),
        }
        self.wait_for("the publish to complete", |event| match (qos, event) {
            (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_))) => Some(Acked::Sent),
            (QoS::AtLeastOnce, Event::Incoming(Packet::PubAck(ack))) => Some(Acked::PubAck(ack.reason)),
            (QoS::ExactlyOnce, Event::Incoming(Packet::PubRec(rec)))
                if !matches!(rec.reason, PubRecReason::Success | PubRecReason::NoMatchingSubscribers) =>
            {
                Some(Acked::PubRec(rec.reason))
            }
            (QoS::ExactlyOnce, Event::Incoming(Packet::PubComp(_))) => Some(Acked::PubComp),
            _ => None,
        })
        .await
    }

    /// Publishes without properties and asserts the exchange succeeded.
    pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        let acked = self.publish_with(topic, qos, retain, payload, None).await;
        assert!(
            matches!(
                acked,
                Acked::Sent
                    | Acked::PubComp
                    | Acked::PubAck(PubAckReason::Success | PubAckReason::NoMatchingSubscribers)
            ),
            "publish to {topic} by {} ended with {acked:?}",
            self.id
        );
    }

    /// Waits for the connection to end and returns the error.
    pub async fn expect_disconnected(&mut self) -> ConnectionError {
        loop {
            match self.next_event().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => self.pending.push_back(publish),
                Ok(_) => {}
                Err(error) => return error,
            }
        }
    }

    /// Waits for a server DISCONNECT and returns its reason code.
    pub async fn expect_server_disconnect(&mut self) -> DisconnectReasonCode {
        match self.expect_disconnected().await {
            ConnectionError::MqttState(StateError::ServerDisconnect { reason_code, .. }) => reason_code,
            other => panic!("{} expected a DISCONNECT from the server, got {other:?}", self.id),
        }
    }

    pub async fn disconnect(mut self) {
        self.client.disconnect().await.unwrap();
        let what = format!("{} to close after DISCONNECT", self.id);
        within(&what, async {
            loop {
                match self.events.recv().await {
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return,
                }
            }
        })
        .await;
        let _ = within(&what, &mut self.task).await;
    }

    pub async fn kill(mut self) {
        self.task.abort();
        let _ = within("the event loop to stop", &mut self.task).await;
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}
