//! rumqttc MQTT 3.1.1 client wrapper. The event loop runs in its own task and forwards every event to a channel;
//! it stops at the first error, so rumqttc never reconnects behind a test's back. Incoming publishes seen while
//! waiting for something else are kept for [`Client::next_publish`].

#![allow(clippy::unwrap_used)]
// rumqttc's ConnectionError is large; it is what the tests inspect, so it is passed around as is.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnAck, ConnectReturnCode, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing,
    Packet, Publish, QoS, SubscribeReasonCode,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::{TestBroker, within};

pub use rumqttc;

/// Options for `client_id` against `broker`: clean session, keepalive 30 s.
pub fn options(broker: &TestBroker, client_id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", broker.port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

/// Options with a will.
pub fn options_with_will(broker: &TestBroker, client_id: &str, topic: &str, payload: &str, qos: QoS) -> MqttOptions {
    let mut options = options(broker, client_id);
    options.set_last_will(LastWill::new(topic, payload, qos, false));
    options
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
            // Dropping the event loop closes the socket.
            return;
        }
    }
}

/// Connects and returns the client with its CONNACK, or the error the connection attempt ended with.
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

/// Connects, asserting success.
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

/// Connects with a clean session, asserting success.
pub async fn connect_to(broker: &TestBroker, client_id: &str) -> Client {
    connect(options(broker, client_id)).await.0
}

/// The CONNACK return code a refused connection attempt got; panics if it was accepted or failed otherwise.
pub async fn refused_code(options: MqttOptions) -> ConnectReturnCode {
    let id = options.client_id();
    match try_connect(options).await {
        Err(ConnectionError::ConnectionRefused(code)) => code,
        Ok((_, connack)) => panic!("{id} was accepted ({connack:?}) but should have been refused"),
        Err(other) => panic!("{id} failed with {other:?} instead of a CONNACK refusal"),
    }
}

pub fn topic(publish: &Publish) -> &str {
    &publish.topic
}

impl Client {
    /// The next event, or the error that ended the connection.
    pub async fn next_event(&mut self) -> Result<Event, ConnectionError> {
        let what = format!("an event on {}", self.id);
        within(&what, self.events.recv()).await.unwrap_or_else(|| panic!("event loop of {} already ended", self.id))
    }

    /// The next incoming PUBLISH; panics if the connection fails or nothing arrives in time.
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

    /// The next incoming PUBLISH if one comes within `window`.
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

    /// Asserts that no PUBLISH arrives within `window` (and that the connection stays up).
    pub async fn expect_no_publish(&mut self, window: Duration) {
        if let Some(publish) = self.pending.pop_front() {
            panic!("{} received an unexpected {publish:?}", self.id);
        }
        let deadline = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Err(_) => return,
                Ok(None) => panic!("event loop of {} ended", self.id),
                Ok(Some(Ok(Event::Incoming(Packet::Publish(publish))))) => {
                    panic!("{} received an unexpected {publish:?}", self.id)
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(error))) => panic!("{} lost its connection: {error:?}", self.id),
            }
        }
    }

    /// Waits for the next event matching `pick`, keeping publishes seen on the way.
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

    /// Subscribes and returns the SUBACK return code.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> SubscribeReasonCode {
        self.client.subscribe(filter, qos).await.unwrap();
        self.wait_for("SUBACK", |event| match event {
            Event::Incoming(Packet::SubAck(suback)) => Some(suback.return_codes[0]),
            _ => None,
        })
        .await
    }

    /// Subscribes and asserts the granted QoS.
    pub async fn subscribe_ok(&mut self, filter: &str, qos: QoS) {
        let code = self.subscribe(filter, qos).await;
        assert_eq!(code, SubscribeReasonCode::Success(qos), "SUBACK for {filter}");
    }

    /// Publishes and waits until the exchange is complete: written (QoS 0), PUBACK (QoS 1), PUBCOMP (QoS 2).
    pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &[u8]) {
        self.client.publish(topic, qos, retain, payload.to_vec()).await.unwrap();
        self.wait_for("the publish to complete", |event| match (qos, event) {
            (QoS::AtMostOnce, Event::Outgoing(Outgoing::Publish(_)))
            | (QoS::AtLeastOnce, Event::Incoming(Packet::PubAck(_)))
            | (QoS::ExactlyOnce, Event::Incoming(Packet::PubComp(_))) => Some(()),
            _ => None,
        })
        .await
    }

    /// Waits for the connection to end (server closed it) and returns the error rumqttc reported.
    pub async fn expect_disconnected(&mut self) -> ConnectionError {
        loop {
            match self.next_event().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => self.pending.push_back(publish),
                Ok(_) => {}
                Err(error) => return error,
            }
        }
    }

    /// Sends DISCONNECT and waits for the connection to close.
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

    /// Drops the connection without DISCONNECT (as a crashed client or a cut cable would).
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
