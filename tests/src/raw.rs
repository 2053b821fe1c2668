//! A client that speaks MQTT through the broker's own sans-IO codec, over any byte stream: TCP for hand-built and
//! malformed traffic, `tokio::io::duplex` for tests that run the broker core on paused time.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tollgate_core::Broker;
use tollgate_core::connection::{ConnectionContext, serve};
use tollgate_protocol::{
    ConnAck, Connect, Packet, Properties, ProtocolVersion, Publish, QoS, ReasonCode, Subscribe, Subscription,
    SubscriptionOptions,
};

use crate::TIMEOUT;

pub use tollgate_protocol;

/// What a read produced.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // short-lived, and boxing would clutter every match in the tests
pub enum Received {
    Packet(Packet),
    /// The peer closed the connection (EOF or reset).
    Closed,
}

pub struct RawClient<S> {
    stream: S,
    buffer: BytesMut,
    pub version: ProtocolVersion,
    pub name: String,
}

/// Opens a TCP connection to `addr`.
pub async fn tcp(addr: std::net::SocketAddr, version: ProtocolVersion) -> RawClient<TcpStream> {
    let stream = crate::within("TCP connect", TcpStream::connect(addr)).await.unwrap();
    stream.set_nodelay(true).unwrap();
    RawClient::new(stream, version, &format!("raw client {}", addr))
}

/// Serves one in-memory connection with the broker core and returns the client end.
pub fn duplex(broker: &Broker, version: ProtocolVersion, name: &str) -> RawClient<DuplexStream> {
    let (client, server) = tokio::io::duplex(256 * 1024);
    let context = ConnectionContext {
        listener: Arc::from("duplex"),
        remote_addr: None,
        peer: None,
        identity_username: None,
        mount_point: None,
    };
    broker.spawn(serve(broker.clone(), server, context));
    RawClient::new(client, version, name)
}

/// A CONNECT with clean start, no keepalive and no credentials.
pub fn connect_packet(version: ProtocolVersion, client_id: &str) -> Connect {
    Connect {
        protocol: version,
        clean_start: true,
        keep_alive: 0,
        client_id: client_id.into(),
        username: None,
        password: None,
        will: None,
        properties: Properties::default(),
        bridge: false,
    }
}

pub fn publish_packet(topic: &str, qos: QoS, packet_id: Option<u16>, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: Arc::from(topic),
        packet_id,
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

pub fn subscribe_packet(packet_id: u16, filter: &str, qos: QoS) -> Subscribe {
    Subscribe {
        packet_id,
        subscriptions: vec![Subscription {
            filter: filter.into(),
            options: SubscriptionOptions { qos, ..SubscriptionOptions::default() },
        }],
        properties: Properties::default(),
    }
}

/// Encodes `packet` as `version` speaks it.
pub fn encode(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    tollgate_protocol::encode_packet(packet, version, &mut out).unwrap();
    out.to_vec()
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    pub fn new(stream: S, version: ProtocolVersion, name: &str) -> Self {
        Self { stream, buffer: BytesMut::new(), version, name: name.into() }
    }

    pub async fn send(&mut self, packet: &Packet) {
        let bytes = encode(packet, self.version);
        self.send_bytes(&bytes).await;
    }

    /// Writes raw bytes; a write error (the peer already closed) is ignored: the next read reports it.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// The next packet or close, if one comes within `limit`.
    pub async fn recv_within(&mut self, limit: Duration) -> Option<Received> {
        tokio::time::timeout(limit, self.recv_inner()).await.ok()
    }

    async fn recv_inner(&mut self) -> Received {
        loop {
            match tollgate_protocol::decode_packet(&mut self.buffer, self.version, usize::MAX) {
                Ok(Some(packet)) => return Received::Packet(packet),
                Ok(None) => {}
                Err(error) => panic!(
                    "{}: the broker sent bytes the codec cannot decode: {error} ({:02X?})",
                    self.name,
                    &self.buffer[..]
                ),
            }
            match self.stream.read_buf(&mut self.buffer).await {
                Ok(0) | Err(_) => {
                    // Close our side too, as a real client does when the broker hangs up.
                    let _ = self.stream.shutdown().await;
                    assert!(
                        self.buffer.is_empty(),
                        "{}: connection closed in the middle of a packet: {:02X?}",
                        self.name,
                        &self.buffer[..]
                    );
                    return Received::Closed;
                }
                Ok(_) => {}
            }
        }
    }

    /// The next packet or close, within [`TIMEOUT`].
    pub async fn recv(&mut self) -> Received {
        let limit = TIMEOUT;
        match self.recv_within(limit).await {
            Some(received) => received,
            None => panic!("{}: nothing received within {limit:?}", self.name),
        }
    }

    /// The next packet; panics if the connection closes instead.
    pub async fn expect_packet(&mut self) -> Packet {
        match self.recv().await {
            Received::Packet(packet) => packet,
            Received::Closed => panic!("{}: connection closed, expected a packet", self.name),
        }
    }

    /// Asserts the broker closes the connection without sending anything more.
    pub async fn expect_closed(&mut self) {
        match self.recv().await {
            Received::Closed => {}
            Received::Packet(packet) => panic!("{}: expected the connection to close, got {packet:?}", self.name),
        }
    }

    /// Asserts the next packet is a v5 DISCONNECT with `reason`, followed by the close.
    pub async fn expect_disconnect(&mut self, reason: ReasonCode) {
        match self.expect_packet().await {
            Packet::Disconnect(disconnect) => assert_eq!(
                disconnect.reason_code, reason,
                "{}: DISCONNECT reason (reason string: {:?})",
                self.name, disconnect.properties.reason_string
            ),
            other => panic!("{}: expected DISCONNECT {reason}, got {other:?}", self.name),
        }
        self.expect_closed().await;
    }

    /// Every byte until the broker closes the connection (EOF or reset), within [`TIMEOUT`].
    pub async fn read_until_closed(&mut self) -> Vec<u8> {
        let name = self.name.clone();
        crate::within(&format!("{name} to be closed"), async {
            loop {
                match self.stream.read_buf(&mut self.buffer).await {
                    Ok(0) | Err(_) => {
                        let _ = self.stream.shutdown().await;
                        return self.buffer.split().to_vec();
                    }
                    Ok(_) => {}
                }
            }
        })
        .await
    }

    /// Sends CONNECT and returns the CONNACK.
    pub async fn connect(&mut self, connect: Connect) -> ConnAck {
        self.version = connect.protocol;
        self.send(&Packet::Connect(Box::new(connect))).await;
        match self.expect_packet().await {
            Packet::ConnAck(connack) => connack,
            other => panic!("{}: expected CONNACK, got {other:?}", self.name),
        }
    }

    /// Connects with a clean start and asserts success.
    pub async fn connect_ok(&mut self, version: ProtocolVersion, client_id: &str) -> ConnAck {
        let connack = self.connect(connect_packet(version, client_id)).await;
        assert_eq!(connack.reason_code, ReasonCode::SUCCESS, "{}: CONNACK", self.name);
        connack
    }

    /// Subscribes and returns the SUBACK reason codes.
    pub async fn subscribe(&mut self, packet_id: u16, filter: &str, qos: QoS) -> Vec<ReasonCode> {
        self.send(&Packet::Subscribe(subscribe_packet(packet_id, filter, qos))).await;
        match self.expect_packet().await {
            Packet::SubAck(suback) => {
                assert_eq!(suback.packet_id, packet_id);
                suback.reason_codes
            }
            other => panic!("{}: expected SUBACK, got {other:?}", self.name),
        }
    }

    /// The next PUBLISH, acknowledging QoS 1 (PUBACK) and QoS 2 (PUBREC, then PUBREL/PUBCOMP) as a client does.
    /// Not cancel-safe (the message is taken before the acknowledgement is written): do not race it in `select!`.
    pub async fn expect_publish(&mut self) -> Publish {
        let publish = match self.expect_packet().await {
            Packet::Publish(publish) => publish,
            other => panic!("{}: expected PUBLISH, got {other:?}", self.name),
        };
        if let Some(packet_id) = publish.packet_id {
            let ack = tollgate_protocol::Ack::new(packet_id, ReasonCode::SUCCESS);
            match publish.qos {
                QoS::AtLeastOnce => self.send(&Packet::PubAck(ack)).await,
                QoS::ExactlyOnce => {
                    self.send(&Packet::PubRec(ack)).await;
                    match self.expect_packet().await {
                        Packet::PubRel(rel) => assert_eq!(rel.packet_id, packet_id),
                        other => panic!("{}: expected PUBREL, got {other:?}", self.name),
                    }
                    let complete = tollgate_protocol::Ack::new(packet_id, ReasonCode::SUCCESS);
                    self.send(&Packet::PubComp(complete)).await;
                }
                QoS::AtMostOnce => {}
            }
        }
        publish
    }

    /// Publishes at QoS 1 and waits for the PUBACK; returns its reason code.
    pub async fn publish_qos1(&mut self, publish: Publish) -> ReasonCode {
        let packet_id = publish.packet_id.expect("QoS 1 needs a packet id");
        self.send(&Packet::Publish(publish)).await;
        match self.expect_packet().await {
            Packet::PubAck(ack) => {
                assert_eq!(ack.packet_id, packet_id);
                ack.reason_code
            }
            other => panic!("{}: expected PUBACK, got {other:?}", self.name),
        }
    }

    /// Sends DISCONNECT (normal) and waits for the broker to close.
    pub async fn disconnect(mut self) {
        self.send(&Packet::Disconnect(Default::default())).await;
        let _ = self.read_until_closed().await;
    }

    pub fn into_inner(self) -> S {
        self.stream
    }
}
