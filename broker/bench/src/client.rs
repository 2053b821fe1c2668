//! A lean MQTT 3.1.1 client on top of the sans-IO codec: one `TcpStream`, one read and one write buffer.
//!
//! CONNECT, SUBSCRIBE and the like go through [`tollgate_protocol::encode_packet`] and
//! [`tollgate_protocol::decode_packet`]. The two packets that make up nearly all of the traffic, PUBLISH and
//! PUBACK, take a hand-rolled path instead: PUBLISH is written straight into the write buffer (the payload is
//! generated in place, no per-message allocation) and incoming PUBLISH/PUBACK frames are looked at in place
//! in the read buffer, so the load generator stays cheap next to the broker under test. The unit tests check
//! the fast path against the codec byte for byte.
//!
//! The same client speaks TLS (rustls) for the TLS scenarios; a [`Dialer`] knows which.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;
use tollgate_protocol::decode::parse_fixed_header;
use tollgate_protocol::{
    Connect, Disconnect, Packet, ProtocolVersion, QoS, Subscribe, Subscription, SubscriptionOptions, decode_packet,
    encode_packet,
};

pub const VERSION: ProtocolVersion = ProtocolVersion::V311;
/// Largest packet the client accepts from a broker.
pub const MAX_PACKET: usize = 1 << 20;
/// Bytes at the front of every payload: publisher id (u32), sequence number (u64), send time (u64 ns).
pub const PAYLOAD_HEADER: usize = 20;
/// Keepalive sent in every CONNECT. rumqttd refuses 0, and nothing here runs long enough to need a PINGREQ.
pub const KEEP_ALIVE: u16 = 600;

/// Nanoseconds since a process-wide origin; publishers stamp payloads with it and subscribers subtract.
pub fn now_ns() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// A plain TCP connection or a TLS session over one.
pub type Stream = Either<TcpStream, TlsStream<TcpStream>>;
pub type ReadHalf = Either<tokio::net::tcp::OwnedReadHalf, tokio::io::ReadHalf<TlsStream<TcpStream>>>;
pub type WriteHalf = Either<tokio::net::tcp::OwnedWriteHalf, tokio::io::WriteHalf<TlsStream<TcpStream>>>;

/// Reader and writer that can live in different tasks. Plain TCP keeps its lock-free owned halves; a TLS session
/// has one state machine for both directions, so its halves share it behind tokio's lock.
pub fn split(stream: Stream) -> (ReadHalf, WriteHalf) {
    match stream {
        Either::Left(tcp) => {
            let (read, write) = tcp.into_split();
            (Either::Left(read), Either::Left(write))
        }
        Either::Right(tls) => {
            let (read, write) = tokio::io::split(tls);
            (Either::Right(read), Either::Right(write))
        }
    }
}

/// Reads what has already arrived without waiting: `Ok(0)` means closed, `WouldBlock` means nothing yet.
pub async fn try_read_now(read: &mut ReadHalf, buf: &mut BytesMut) -> std::io::Result<usize> {
    match read {
        Either::Left(tcp) => tcp.try_read_buf(buf),
        // A TLS half has no try_read: poll it once, and take "pending" as "nothing yet".
        Either::Right(tls) => {
            std::future::poll_fn(|cx| match tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *tls), cx, buf) {
                std::task::Poll::Pending => std::task::Poll::Ready(Err(std::io::ErrorKind::WouldBlock.into())),
                ready => ready,
            })
            .await
        }
    }
}

/// Where and how to connect: the broker's address and, for TLS, one client configuration per client identity
/// (the `index` given to [`Dialer::open`] picks one, round robin).
#[derive(Clone)]
pub struct Dialer {
    pub addr: SocketAddr,
    tls: Option<Arc<[TlsConnector]>>,
}

impl Dialer {
    pub fn tcp(addr: SocketAddr) -> Dialer {
        Dialer { addr, tls: None }
    }

    pub fn tls(addr: SocketAddr, configs: Vec<Arc<rustls::ClientConfig>>) -> Dialer {
        Dialer { addr, tls: Some(configs.into_iter().map(TlsConnector::from).collect()) }
    }

    pub async fn open(&self, index: usize) -> Result<Stream> {
        let tcp = TcpStream::connect(self.addr).await.with_context(|| format!("connect to {}", self.addr))?;
        tcp.set_nodelay(true)?;
        let Some(connectors) = self.tls.as_ref().filter(|list| !list.is_empty()) else {
            return Ok(Either::Left(tcp));
        };
        let connector = &connectors[index % connectors.len()];
        let name = rustls_pki_types::ServerName::IpAddress(self.addr.ip().into());
        let tls = connector.connect(name, tcp).await.context("TLS handshake")?;
        Ok(Either::Right(tls))
    }
}

pub struct Conn {
    pub stream: Stream,
    pub rbuf: BytesMut,
    pub wbuf: BytesMut,
}

impl Conn {
    /// Connect (TCP or TLS, identity `index` of the dialer), CONNECT (clean session, user name `bench` without a
    /// password: anonymous access on every broker, and the role the vin-acl variant grants) and wait for a
    /// successful CONNACK. `buffer` is the initial capacity of each of the two buffers (small for connections
    /// that will stay idle).
    pub async fn connect(dialer: &Dialer, index: usize, client_id: &str, buffer: usize) -> Result<Conn> {
        Self::connect_as(dialer, index, client_id, Some("bench"), buffer).await
    }

    /// [`Conn::connect`] with another user name, or none (a car whose identity is its certificate).
    pub async fn connect_as(
        dialer: &Dialer,
        index: usize,
        client_id: &str,
        username: Option<&str>,
        buffer: usize,
    ) -> Result<Conn> {
        Ok(Self::connect_session(dialer, index, client_id, username, true, buffer).await?.0)
    }

    /// [`Conn::connect_as`] choosing clean session; also returns CONNACK's session present flag.
    pub async fn connect_session(
        dialer: &Dialer,
        index: usize,
        client_id: &str,
        username: Option<&str>,
        clean_start: bool,
        buffer: usize,
    ) -> Result<(Conn, bool)> {
        let stream = dialer.open(index).await?;
        let mut conn = Conn { stream, rbuf: BytesMut::with_capacity(buffer), wbuf: BytesMut::with_capacity(buffer) };
        let connect = Packet::Connect(Box::new(Connect {
            protocol: VERSION,
            clean_start,
            keep_alive: KEEP_ALIVE,
            client_id: client_id.into(),
            username: username.map(Into::into),
            password: None,
            will: None,
            properties: Default::default(),
            bridge: false,
        }));
        conn.send(&connect).await?;
        match conn.next_packet().await? {
            Packet::ConnAck(ack) if !ack.reason_code.is_error() => Ok((conn, ack.session_present)),
            Packet::ConnAck(ack) => bail!("CONNACK refused: {:?}", ack.reason_code),
            other => bail!("expected CONNACK, got {}", other.kind()),
        }
    }

    pub async fn send(&mut self, packet: &Packet) -> Result<()> {
        encode_packet(packet, VERSION, &mut self.wbuf)?;
        self.flush().await
    }

    pub async fn flush(&mut self) -> Result<()> {
        self.stream.write_all(&self.wbuf).await?;
        self.wbuf.clear();
        Ok(())
    }

    /// The next whole packet, decoded by the codec (for the handshake packets, not the hot path).
    pub async fn next_packet(&mut self) -> Result<Packet> {
        loop {
            if let Some(packet) = decode_packet(&mut self.rbuf, VERSION, MAX_PACKET)? {
                return Ok(packet);
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                bail!("connection closed by broker");
            }
        }
    }

    /// SUBSCRIBE to one filter and wait for a granting SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) -> Result<()> {
        let subscribe = Packet::Subscribe(Subscribe {
            packet_id: 1,
            subscriptions: vec![Subscription {
                filter: filter.into(),
                options: SubscriptionOptions { qos, ..Default::default() },
            }],
            properties: Default::default(),
        });
        self.send(&subscribe).await?;
        loop {
            match self.next_packet().await? {
                Packet::SubAck(ack) if ack.packet_id == 1 => {
                    return match ack.reason_codes.first() {
                        Some(code) if !code.is_error() => Ok(()),
                        other => Err(anyhow!("SUBACK refused {filter}: {other:?}")),
                    };
                }
                Packet::Publish(_) | Packet::PingResp => continue,
                other => bail!("expected SUBACK, got {}", other.kind()),
            }
        }
    }

    /// DISCONNECT, then wait (briefly) for the broker to close, so that TIME_WAIT lands on the broker's side.
    pub async fn disconnect(mut self, wait: Duration) -> Result<()> {
        self.send(&Packet::Disconnect(Disconnect::default())).await?;
        let _ = tokio::time::timeout(wait, async {
            loop {
                self.rbuf.clear();
                match self.stream.read_buf(&mut self.rbuf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        Ok(())
    }
}

/// Sends `count` QoS 1 PUBLISHes with at most `window` unacknowledged, `put(buffer, n, packet_id)` writing the
/// n-th; returns once every PUBACK is in.
pub async fn publish_windowed(
    conn: &mut Conn,
    count: u64,
    window: usize,
    mut put: impl FnMut(&mut BytesMut, u64, u16),
) -> Result<()> {
    let (mut sent, mut acked, mut inflight) = (0u64, 0u64, 0usize);
    let mut packet_id: u16 = 0;
    while acked < count {
        while sent < count && inflight < window {
            packet_id = packet_id.checked_add(1).unwrap_or(1);
            put(&mut conn.wbuf, sent, packet_id);
            sent += 1;
            inflight += 1;
        }
        conn.flush().await?;
        if conn.stream.read_buf(&mut conn.rbuf).await? == 0 {
            bail!("the broker closed the publisher's connection");
        }
        drain_frames(&mut conn.rbuf, |frame| {
            if let Frame::PubAck(_) = frame {
                acked += 1;
                inflight = inflight.saturating_sub(1);
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// One frame found in a read buffer.
pub enum Frame<'a> {
    Publish { qos: u8, packet_id: u16, topic: &'a [u8], payload: &'a [u8] },
    PubAck(u16),
    Other(Box<Packet>),
}

/// Hands every complete frame at the front of `rbuf` to `handle` and removes it; a partial frame stays.
pub fn drain_frames(rbuf: &mut BytesMut, mut handle: impl FnMut(Frame<'_>) -> Result<()>) -> Result<()> {
    loop {
        let Some((first, header_len, remaining)) = parse_fixed_header(rbuf)? else {
            return Ok(());
        };
        let total = header_len + remaining;
        if total > MAX_PACKET {
            bail!("packet of {total} bytes from broker");
        }
        if rbuf.len() < total {
            rbuf.reserve(total - rbuf.len());
            return Ok(());
        }
        match first >> 4 {
            3 => {
                let body = rbuf.get(header_len..total).unwrap_or_default();
                handle(parse_publish(first, body)?)?;
                rbuf.advance(total);
            }
            4 => {
                let id = match rbuf.get(header_len..header_len + 2) {
                    Some(&[high, low]) => u16::from_be_bytes([high, low]),
                    _ => bail!("short PUBACK"),
                };
                handle(Frame::PubAck(id))?;
                rbuf.advance(total);
            }
            _ => {
                let packet = decode_packet(rbuf, VERSION, MAX_PACKET)?
                    .ok_or_else(|| anyhow!("incomplete frame after length check"))?;
                handle(Frame::Other(Box::new(packet)))?;
            }
        }
    }
}

fn parse_publish(first: u8, body: &[u8]) -> Result<Frame<'_>> {
    let qos = (first >> 1) & 3;
    let topic_len = match body.get(..2) {
        Some(&[high, low]) => u16::from_be_bytes([high, low]) as usize,
        _ => bail!("short PUBLISH"),
    };
    let topic = body.get(2..2 + topic_len).ok_or_else(|| anyhow!("PUBLISH topic past end"))?;
    let mut pos = 2 + topic_len;
    let mut packet_id = 0;
    if qos > 0 {
        packet_id = match body.get(pos..pos + 2) {
            Some(&[high, low]) => u16::from_be_bytes([high, low]),
            _ => bail!("PUBLISH packet id past end"),
        };
        pos += 2;
    }
    Ok(Frame::Publish { qos, packet_id, topic, payload: body.get(pos..).unwrap_or_default() })
}

/// The filler byte for every payload position past the header: a function of publisher and sequence so
/// that a payload delivered to the wrong place or corrupted in the middle is caught.
pub fn fill_byte(publisher: u32, seq: u64) -> u8 {
    (seq as u8).wrapping_mul(31).wrapping_add(publisher as u8) ^ 0x5A
}

/// Appends one PUBLISH (MQTT 3.1.1) whose payload is the benchmark header plus filler, `payload_len` bytes. With a
/// signer, that payload is signed and wrapped in the msg-auth envelope.
#[allow(clippy::too_many_arguments)]
pub fn put_publish(
    out: &mut BytesMut,
    topic: &[u8],
    qos: u8,
    packet_id: u16,
    publisher: u32,
    seq: u64,
    payload_len: usize,
    signer: Option<&mut Signer>,
) {
    let payload_len = payload_len.max(PAYLOAD_HEADER);
    match signer {
        None => {
            put_publish_header(out, topic, qos, packet_id, payload_len);
            put_payload(out, publisher, seq, payload_len);
        }
        Some(signer) => {
            let header = signer.sign(topic, publisher, seq, payload_len);
            let body = tollgate_sig::ENVELOPE_PREFIX.len() + header.len() + 1 + payload_len;
            put_publish_header(out, topic, qos, packet_id, body);
            out.put_slice(tollgate_sig::ENVELOPE_PREFIX);
            out.put_slice(header.as_bytes());
            out.put_u8(b'\n');
            out.put_slice(&signer.scratch);
        }
    }
}

/// The benchmark payload, `payload_len` (at least [`PAYLOAD_HEADER`]) bytes: publisher, sequence number, send
/// time, filler.
fn put_payload(out: &mut impl BufMut, publisher: u32, seq: u64, payload_len: usize) {
    out.put_u32_le(publisher);
    out.put_u64_le(seq);
    out.put_u64_le(now_ns());
    out.put_bytes(fill_byte(publisher, seq), payload_len - PAYLOAD_HEADER);
}

/// A 3.1.1 PUBLISH up to its payload, which the caller writes next (`payload_len` bytes); room for it is reserved.
fn put_publish_header(out: &mut BytesMut, topic: &[u8], qos: u8, packet_id: u16, payload_len: usize) {
    let remaining = 2 + topic.len() + if qos > 0 { 2 } else { 0 } + payload_len;
    out.reserve(5 + remaining);
    out.put_u8(0x30 | (qos << 1));
    tollgate_protocol::encode::put_varint(out, remaining);
    out.put_u16(topic.len() as u16);
    out.put_slice(topic);
    if qos > 0 {
        out.put_u16(packet_id);
    }
}

/// Signs PUBLISHes the way a msg-auth `verify` rule checks them: the payload travels in the MQTT 3.1.1 envelope
/// (`x-sig:<header>\n<payload>`), signed with HMAC-SHA256 for this publisher's identity (`sub`) with its
/// sequence number + 1 as the counter, so every message is fresh and none is a replay.
pub struct Signer {
    key: Vec<u8>,
    kid: String,
    sub: String,
    scratch: Vec<u8>,
}

/// The key the msg-auth variant is configured with (`[plugins.secrets]`), and its id.
pub const SIGNING_KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
pub const SIGNING_KID: &str = "bench-k1";

impl Signer {
    pub fn new(sub: String) -> Signer {
        Signer { key: SIGNING_KEY.to_vec(), kid: SIGNING_KID.into(), sub, scratch: Vec::new() }
    }

    /// Writes the benchmark payload into `scratch` and returns the signature header for it on `topic`.
    fn sign(&mut self, topic: &[u8], publisher: u32, seq: u64, payload_len: usize) -> String {
        self.scratch.clear();
        put_payload(&mut self.scratch, publisher, seq, payload_len);
        let mut signature = tollgate_sig::Signature {
            kid: self.kid.clone(),
            sub: self.sub.clone(),
            ts: unix_ms(),
            ctr: seq + 1,
            present: tollgate_sig::Present { sub: true, ts: true, ctr: true, ..Default::default() },
            ..Default::default()
        };
        let covered = tollgate_sig::Covered {
            topic: std::str::from_utf8(topic).unwrap_or_default(),
            payload: &self.scratch,
            ..Default::default()
        };
        tollgate_sig::keys::sign(&self.key, &mut signature, &covered, 32).expect("an HMAC key of any length");
        signature.header()
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX))
}

/// The payload inside a signature envelope, or `None` if `payload` is not one.
pub fn strip_envelope(payload: &[u8]) -> Option<&[u8]> {
    let rest = payload.strip_prefix(tollgate_sig::ENVELOPE_PREFIX)?;
    let end = rest.iter().position(|&b| b == b'\n')?;
    rest.get(end + 1..)
}

pub fn put_puback(out: &mut BytesMut, packet_id: u16) {
    out.put_slice(&[0x40, 2]);
    out.put_u16(packet_id);
}

/// A checked payload: (publisher, sequence, send time).
pub fn parse_payload(payload: &[u8], expected_len: usize) -> Option<(u32, u64, u64)> {
    if payload.len() != expected_len.max(PAYLOAD_HEADER) {
        return None;
    }
    let (header, rest) = payload.split_at(PAYLOAD_HEADER);
    let publisher = u32::from_le_bytes(header.get(0..4)?.try_into().ok()?);
    let seq = u64::from_le_bytes(header.get(4..12)?.try_into().ok()?);
    let sent = u64::from_le_bytes(header.get(12..20)?.try_into().ok()?);
    let fill = fill_byte(publisher, seq);
    if rest.iter().all(|&b| b == fill) { Some((publisher, seq, sent)) } else { None }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use tollgate_protocol::{Ack, Publish, ReasonCode};

    use super::*;

    fn codec_publish(qos: QoS, packet_id: Option<u16>, payload: &[u8]) -> BytesMut {
        let publish = Packet::Publish(Publish {
            qos,
            topic: Arc::from("bench/pair/3"),
            packet_id,
            payload: Bytes::copy_from_slice(payload),
            ..Default::default()
        });
        let mut out = BytesMut::new();
        encode_packet(&publish, VERSION, &mut out).expect("encode");
        out
    }

    #[test]
    fn signed_publish_verifies_with_the_plugins_format() {
        let mut signer = Signer::new("bench-pub-3".into());
        let mut out = BytesMut::new();
        put_publish(&mut out, b"bench/pair/3", 1, 5, 3, 41, 64, Some(&mut signer));
        let Some(Packet::Publish(publish)) = decode_packet(&mut out, VERSION, MAX_PACKET).expect("decode") else {
            panic!("not a PUBLISH");
        };
        let Some(Ok((signature, inner))) = tollgate_sig::split_envelope(&publish.payload) else {
            panic!("no envelope");
        };
        assert_eq!((signature.kid.as_str(), signature.sub.as_str(), signature.ctr), (SIGNING_KID, "bench-pub-3", 42));
        let covered = tollgate_sig::Covered { topic: "bench/pair/3", payload: inner, ..Default::default() };
        assert!(tollgate_sig::keys::verify(&SIGNING_KEY, &signature, &covered));
        assert_eq!(strip_envelope(&publish.payload), Some(inner));
        assert_eq!(parse_payload(inner, 64).map(|(publisher, seq, _)| (publisher, seq)), Some((3, 41)));
        assert_eq!(strip_envelope(inner), None);
    }

    #[test]
    fn fast_publish_matches_codec() {
        for (qos, packet_id) in [(0u8, None), (1u8, Some(77u16))] {
            for len in [64usize, 1024, 200_000] {
                let mut fast = BytesMut::new();
                put_publish(&mut fast, b"bench/pair/3", qos, packet_id.unwrap_or(0), 3, 9, len, None);
                // The timestamp differs between calls; compare with the codec on the same payload bytes.
                let mut copy = fast.clone();
                let (_, header_len, _) = parse_fixed_header(&copy).expect("ok").expect("some");
                let payload_start = header_len + 2 + 12 + if qos > 0 { 2 } else { 0 };
                let payload = copy.split_off(payload_start);
                let expected = codec_publish(QoS::from_u8(qos).expect("qos"), packet_id, &payload);
                assert_eq!(fast, expected, "qos {qos} len {len}");
                assert_eq!(parse_payload(&payload, len).map(|p| (p.0, p.1)), Some((3, 9)));
            }
        }
    }

    #[test]
    fn drain_frames_reads_codec_output() {
        let mut buf = codec_publish(QoS::AtLeastOnce, Some(5), b"hello");
        encode_packet(&Packet::PubAck(Ack::new(9, ReasonCode::SUCCESS)), VERSION, &mut buf).expect("encode");
        encode_packet(&Packet::PingResp, VERSION, &mut buf).expect("encode");
        let mut puback = BytesMut::new();
        put_puback(&mut puback, 9);
        let mut codec_puback = BytesMut::new();
        encode_packet(&Packet::PubAck(Ack::new(9, ReasonCode::SUCCESS)), VERSION, &mut codec_puback).expect("encode");
        assert_eq!(puback, codec_puback);
        // A trailing partial frame must stay in the buffer.
        buf.extend_from_slice(&[0x30, 10, 0]);
        let mut seen = Vec::new();
        drain_frames(&mut buf, |frame| {
            seen.push(match frame {
                Frame::Publish { qos, packet_id, topic, payload } => format!(
                    "pub {qos} {packet_id} {} {}",
                    String::from_utf8_lossy(topic),
                    String::from_utf8_lossy(payload)
                ),
                Frame::PubAck(id) => format!("ack {id}"),
                Frame::Other(packet) => packet.kind().to_string(),
            });
            Ok(())
        })
        .expect("drain");
        assert_eq!(seen, ["pub 1 5 bench/pair/3 hello", "ack 9", "PINGRESP"]);
        assert_eq!(&buf[..], &[0x30, 10, 0]);
    }

    #[test]
    fn corrupted_payload_is_rejected() {
        let mut out = BytesMut::new();
        put_publish(&mut out, b"t", 0, 0, 1, 2, 64, None);
        let payload_start = out.len() - 64;
        let mut payload = out.split_off(payload_start);
        assert!(parse_payload(&payload, 64).is_some());
        assert!(parse_payload(&payload, 65).is_none());
        payload[40] ^= 1;
        assert!(parse_payload(&payload, 64).is_none());
    }
}
