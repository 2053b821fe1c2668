//! One client connection: CONNECT handshake (authentication, will authorization, session open or takeover), then
//! a single task that reads packets, applies them, and writes what the session has queued, until the client
//! leaves, breaks a rule, times out, is taken over, or the broker shuts down.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::{Instant, Sleep};
use tollgate_hooks::chain::AuthOutcome;
use tollgate_hooks::{
    AclCache, AclOutcome, Action, AuthStep, ClientInfo, ConnectRequest, DisconnectCause, HookChain, PeerIdentity,
    TransformOutcome,
};
use tollgate_protocol::{
    Ack, Auth, ConnAck, Connect, DecodeError, Decoder, Disconnect, Packet, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, SubAck, Subscribe, UnsubAck, Unsubscribe, decode::parse_fixed_header, encode, topic,
};
use tracing::{debug, info, warn};

use crate::Broker;
use crate::config::DeniedPublish;
use crate::message::{ClientId, Delivery, DurableAcks, Message};
use crate::metrics::Metrics;
use crate::router::Subscriber;
use crate::session::{Inflight, Session, SessionRef, SessionSubscription};

/// Where a connection came from, as the transport knows it.
#[derive(Clone, Debug)]
pub struct ConnectionContext {
    pub listener: Arc<str>,
    pub remote_addr: Option<SocketAddr>,
    pub peer: Option<Arc<PeerIdentity>>,
    /// Set by a listener with `use_identity_as_username`: replaces the CONNECT user name, and the client counts
    /// as authenticated by its certificate.
    pub identity_username: Option<Arc<str>>,
    /// The listener's `mount_point` template (see [`check_mount_point`]).
    pub mount_point: Option<Arc<str>>,
}

/// Checks a listener's `mount_point` (Mosquitto's option, with EMQX-style placeholders): a topic prefix every
/// topic of the listener's clients lives under. `%c` is the client id and `%u` the user name, each filled in as
/// one literal topic level. No wildcards, no NUL, no other `%` sequence.
pub fn check_mount_point(template: &str) -> Result<(), String> {
    if template.is_empty() {
        return Err("must not be empty (leave it out for no mount point)".into());
    }
    if template.contains(['+', '#', '\0']) {
        return Err(format!("{template:?} contains a wildcard or NUL"));
    }
    let mut rest = template;
    while let Some(index) = rest.find('%') {
        match rest[index + 1..].chars().next() {
            Some('c' | 'u') => rest = &rest[index + 2..],
            _ => return Err(format!("{template:?}: only %c (client id) and %u (user name) can be filled in")),
        }
    }
    Ok(())
}

/// The mount point of one client: `template` with `%c` and `%u` filled in. A value that could not stand as one
/// literal topic level (empty, or with `/`, `+`, `#` or NUL) refuses the client rather than mount it elsewhere.
fn mount_for(template: &str, client_id: &str, username: Option<&str>) -> Result<String, ReasonCode> {
    let literal = |value: &str| !value.is_empty() && !value.contains(['/', '+', '#', '\0']);
    if template.contains("%c") && !literal(client_id) {
        return Err(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    }
    let username = username.unwrap_or("");
    if template.contains("%u") && !literal(username) {
        return Err(ReasonCode::NOT_AUTHORIZED);
    }
    Ok(template.replace("%c", client_id).replace("%u", username))
}

/// A filter under a mount point; a shared subscription keeps its `$share/<group>/` in front.
fn mounted_filter(mount: &str, filter: &str) -> String {
    match filter.strip_prefix("$share/").map(|rest| rest.split_once('/')) {
        Some(Some((group, inner))) => format!("$share/{group}/{mount}{inner}"),
        // `$share/<group>` without a filter stays as it is, and invalid.
        Some(None) => filter.to_owned(),
        None => format!("{mount}{filter}"),
    }
}

/// The topic a mounted client sees: without its mount point.
fn unmounted<'a>(mount: Option<&str>, topic: &'a str) -> &'a str {
    mount.and_then(|mount| topic.strip_prefix(mount)).unwrap_or(topic)
}

/// Stop filling the write buffer from the session queue beyond this; the socket is the backpressure.
const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Deliveries taken from the session per lock acquisition.
const FILL_BATCH: usize = 64;
/// How long a goodbye (DISCONNECT, final acks) may take to flush before the socket is dropped anyway.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a connection the broker closed keeps draining the client's input (see `finish`).
const LINGER: Duration = Duration::from_secs(2);

/// Why the connection loop ended.
#[derive(Debug)]
enum Exit {
    /// DISCONNECT from the client; the will is published only for v5 reason 0x04.
    ClientDisconnect {
        publish_will: bool,
    },
    /// The socket closed or failed without DISCONNECT.
    Closed,
    /// The client broke the protocol; v5 clients get this reason code.
    Violation {
        reason: ReasonCode,
        detail: String,
    },
    KeepAliveTimeout,
    TakenOver,
    /// A policy hook refused something and asked for the client to go (a transform's reject with disconnect).
    Refused {
        reason: ReasonCode,
        detail: String,
    },
    /// A recheck after a policy change found the client no longer allowed; its session is gone.
    Revoked {
        reason: ReasonCode,
    },
    Shutdown,
}

impl Exit {
    fn cause(&self) -> DisconnectCause {
        match self {
            Exit::ClientDisconnect { .. } => DisconnectCause::ClientDisconnect,
            Exit::Closed => DisconnectCause::ConnectionLost,
            Exit::Violation { .. } => DisconnectCause::ProtocolError,
            Exit::KeepAliveTimeout => DisconnectCause::KeepAliveTimeout,
            Exit::TakenOver => DisconnectCause::TakenOver,
            Exit::Refused { .. } => DisconnectCause::Policy,
            Exit::Revoked { .. } => DisconnectCause::Revoked,
            Exit::Shutdown => DisconnectCause::ServerShutdown,
        }
    }
}

fn violation(reason: ReasonCode, detail: impl Into<String>) -> Exit {
    Exit::Violation { reason, detail: detail.into() }
}

impl From<DecodeError> for Exit {
    fn from(error: DecodeError) -> Self {
        violation(error.reason_code(), error.to_string())
    }
}

struct Will {
    message: Arc<Message>,
    /// The Will Delay Interval in seconds, as sent: a `Duration` here took the connection past a 320-byte
    /// allocation class.
    delay_seconds: u32,
}

/// Serves one client over any byte stream (TCP, TLS, WebSocket adapter, in-memory duplex for tests).
///
/// Not an `async fn`: an async function keeps its arguments in its future for the whole connection, even after
/// they have been moved on (about 110 bytes here: broker, stream, context), so the handshake future is made
/// (and boxed) first and the returned future holds only that box, then the connection's.
pub fn serve<S>(broker: Broker, stream: S, context: ConnectionContext) -> impl Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    // The handshake's state is large (authentication hooks, session takeover) and needed once; boxing it keeps
    // it out of the future that lives as long as the connection, which is most of the memory of an idle client.
    // For the same reason the connection lives in its own box rather than inline in this future, and the
    // once-only goodbye is boxed when it runs.
    let handshake = Box::pin(handshake(broker, stream, context));
    async move {
        let Some(mut connection) = handshake.await else { return };
        // Session observers hear of the connection before its first packet is handled (its CONNACK is written
        // out with the first write); the names of those told are kept so that the same ones hear of its end.
        let hooks = connection.broker.hooks();
        let told =
            if hooks.observes_sessions() { Some(hooks.session_connected(&connection.client).await) } else { None };
        drop(hooks);
        let exit = connection.serve_loop().await;
        Box::pin(connection.finish(exit, told)).await;
    }
}

async fn handshake<S>(broker: Broker, stream: S, context: ConnectionContext) -> Option<Box<Connection<S>>>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut handshake = Handshake {
        broker,
        reader,
        writer,
        read_buf: BytesMut::with_capacity(256),
        write_buf: BytesMut::new(),
        context,
    };
    let deadline = Instant::now() + handshake.broker.config().connect_timeout;
    let connect = match handshake.read_connect(deadline).await {
        Ok(connect) => connect,
        Err(reason) => {
            debug!(remote = ?handshake.context.remote_addr, %reason, "connection closed before CONNECT completed");
            handshake.flush_and_close().await;
            return None;
        }
    };
    handshake.accept(connect, deadline).await
}

/// Reads straight into `buffer` when it has room (a packet being assembled), and otherwise through a buffer on
/// the stack, copying only what arrived: a connection waiting for its next packet then holds no heap buffer,
/// which is most of what an idle client would cost.
fn poll_read_into<R: AsyncRead>(
    reader: Pin<&mut R>,
    buffer: &mut BytesMut,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<std::io::Result<usize>> {
    const STACK_READ: usize = 8 * 1024;
    if buffer.capacity() - buffer.len() >= STACK_READ {
        return tokio_util::io::poll_read_buf(reader, cx, buffer);
    }
    let mut scratch = [0u8; STACK_READ];
    let mut read = tokio::io::ReadBuf::new(&mut scratch);
    match reader.poll_read(cx, &mut read) {
        std::task::Poll::Ready(Ok(())) => {
            buffer.extend_from_slice(read.filled());
            std::task::Poll::Ready(Ok(read.filled().len()))
        }
        std::task::Poll::Ready(Err(error)) => std::task::Poll::Ready(Err(error)),
        std::task::Poll::Pending => std::task::Poll::Pending,
    }
}

type Reader<S> = ReadHalf<S>;
type Writer<S> = WriteHalf<S>;

struct Handshake<S> {
    broker: Broker,
    reader: Reader<S>,
    writer: Writer<S>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    context: ConnectionContext,
}

/// The protocol level of a CONNECT whose body failed to decode, read straight from its bytes so the refusal
/// can be a v5 CONNACK when the client speaks v5.
fn peek_connect_level(buffer: &[u8]) -> Option<u8> {
    let (_, header_len, _) = parse_fixed_header(buffer).ok().flatten()?;
    let name_len = usize::from(u16::from_be_bytes([*buffer.get(header_len)?, *buffer.get(header_len + 1)?]));
    // Without a bridge's 0x80 (Mosquitto's try_private).
    buffer.get(header_len + 2 + name_len).map(|level| level & 0x7F)
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Handshake<S> {
    async fn read_connect(&mut self, deadline: Instant) -> Result<Box<Connect>, String> {
        let max = self.broker.config().max_packet_size as usize;
        loop {
            // Read before decoding: a failed decode has already consumed the frame.
            let level = peek_connect_level(&self.read_buf);
            match tollgate_protocol::decode_packet(&mut self.read_buf, ProtocolVersion::V311, max) {
                Ok(Some(Packet::Connect(connect))) => return Ok(connect),
                Ok(Some(other)) => {
                    return Err(format!("first packet was {} [MQTT-3.1.0-1]", other.kind()));
                }
                Ok(None) => {}
                Err(error) => {
                    self.refuse_malformed_connect(error, level);
                    return Err(error.to_string());
                }
            }
            match tokio::time::timeout_at(deadline, self.reader.read_buf(&mut self.read_buf)).await {
                Err(_) => return Err("no CONNECT before the deadline".into()),
                Ok(Ok(0)) => return Err("closed by peer".into()),
                Ok(Ok(count)) => Metrics::add(&self.broker.metrics().bytes_received, count as u64),
                Ok(Err(error)) => return Err(error.to_string()),
            }
        }
    }

    /// A v5 client gets a CONNACK with the reason code; a 3.1.1 client gets CONNACK 0x01 for an unsupported
    /// level [MQTT-3.1.2-2] and is otherwise just disconnected [MQTT-4.8.0-1].
    fn refuse_malformed_connect(&mut self, error: DecodeError, level: Option<u8>) {
        Metrics::add(&self.broker.metrics().protocol_errors, 1);
        let (version, reason) = match (level, error) {
            (Some(5), _) => (ProtocolVersion::V5, error.reason_code()),
            (_, DecodeError::UnsupportedProtocolLevel(_)) => {
                (ProtocolVersion::V311, ReasonCode::UNSUPPORTED_PROTOCOL_VERSION)
            }
            _ => return,
        };
        let connack = ConnAck { session_present: false, reason_code: reason, properties: Properties::default() };
        let _ = tollgate_protocol::encode_packet(&Packet::ConnAck(connack), version, &mut self.write_buf);
    }

    async fn flush_and_close(&mut self) {
        if !self.write_buf.is_empty() {
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, self.writer.write_all(&self.write_buf)).await;
            self.write_buf.clear();
        }
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, self.writer.shutdown()).await;
    }

    fn refuse(&mut self, version: ProtocolVersion, reason: ReasonCode, reason_string: Option<String>) {
        let mut properties = Properties::default();
        if version.is_v5() {
            properties.reason_string = reason_string;
        }
        let connack = ConnAck { session_present: false, reason_code: reason, properties };
        let _ = tollgate_protocol::encode_packet(&Packet::ConnAck(connack), version, &mut self.write_buf);
    }

    /// Reads the client's next AUTH packet during enhanced authentication.
    async fn read_auth(&mut self, deadline: Instant) -> Result<Auth, String> {
        let max = self.broker.config().max_packet_size as usize;
        loop {
            match tollgate_protocol::decode_packet(&mut self.read_buf, ProtocolVersion::V5, max) {
                Ok(Some(Packet::Auth(auth))) => return Ok(auth),
                Ok(Some(other)) => return Err(format!("{} during authentication", other.kind())),
                Ok(None) => {}
                Err(error) => return Err(error.to_string()),
            }
            match tokio::time::timeout_at(deadline, self.reader.read_buf(&mut self.read_buf)).await {
                Ok(Ok(count)) if count > 0 => {}
                _ => return Err("connection lost during authentication".into()),
            }
        }
    }

    async fn accept(mut self, mut connect: Box<Connect>, deadline: Instant) -> Option<Box<Connection<S>>> {
        let broker = self.broker.clone();
        let config = broker.config().clone();
        let version = connect.protocol;
        Metrics::add(&broker.metrics().messages_received, 1);

        // Client identifier rules [MQTT-3.1.3-6..9].
        let mut assigned = None;
        let client_id = if connect.client_id.is_empty() {
            if version.is_v5() || (version == ProtocolVersion::V311 && connect.clean_start) {
                let id = broker.assign_client_id();
                assigned = Some(id.clone());
                id
            } else {
                self.refuse(version, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, None);
                self.flush_and_close().await;
                return None;
            }
        } else {
            ClientId(connect.client_id.as_str().into())
        };

        let mut request = ConnectRequest {
            client_id: client_id.0.clone(),
            username: match &self.context.identity_username {
                Some(identity) => Some(identity.clone()),
                None => connect.username.as_deref().map(Arc::from),
            },
            username_from_certificate: self.context.identity_username.is_some(),
            password: connect.password.clone(),
            protocol: version,
            remote_addr: self.context.remote_addr,
            listener: self.context.listener.clone(),
            peer: self.context.peer.clone(),
            authentication_method: connect.properties.authentication_method.clone(),
            authentication_data: connect.properties.authentication_data.clone(),
        };
        let hooks = broker.hooks();
        let mut outcome = hooks.authenticate(&request).await;
        let mut auth_rounds = 0;
        let attributes = loop {
            match outcome {
                AuthOutcome::Allow { attributes } => break attributes,
                AuthOutcome::Deny { reason, message } => {
                    Metrics::add(&broker.metrics().auth_failures, 1);
                    info!(client_id = %client_id, remote = ?self.context.remote_addr, %reason, message = message.as_deref().unwrap_or(""), "connection refused by authentication");
                    self.refuse(version, reason, message);
                    self.flush_and_close().await;
                    return None;
                }
                AuthOutcome::Continue { data } => {
                    let Some(method) = request.authentication_method.clone().filter(|_| version.is_v5()) else {
                        self.refuse(version, ReasonCode::BAD_AUTHENTICATION_METHOD, None);
                        self.flush_and_close().await;
                        return None;
                    };
                    auth_rounds += 1;
                    if auth_rounds > 16 {
                        self.refuse(version, ReasonCode::NOT_AUTHORIZED, Some("too many authentication rounds".into()));
                        self.flush_and_close().await;
                        return None;
                    }
                    let properties = Properties {
                        authentication_method: Some(method.clone()),
                        authentication_data: data,
                        ..Properties::default()
                    };
                    let auth = Auth { reason_code: ReasonCode::CONTINUE_AUTHENTICATION, properties };
                    let _ = tollgate_protocol::encode_packet(&Packet::Auth(auth), version, &mut self.write_buf);
                    if self.writer.write_all(&self.write_buf).await.is_err() {
                        return None;
                    }
                    self.write_buf.clear();
                    let reply = match self.read_auth(deadline).await {
                        Ok(reply) => reply,
                        Err(detail) => {
                            debug!(client_id = %client_id, %detail, "enhanced authentication failed");
                            self.refuse(version, ReasonCode::PROTOCOL_ERROR, None);
                            self.flush_and_close().await;
                            return None;
                        }
                    };
                    if reply.properties.authentication_method.as_deref() != Some(method.as_str()) {
                        self.refuse(version, ReasonCode::BAD_AUTHENTICATION_METHOD, None);
                        self.flush_and_close().await;
                        return None;
                    }
                    request.authentication_data = reply.properties.authentication_data.clone();
                    let step = AuthStep { method, data: reply.properties.authentication_data };
                    outcome = hooks.continue_auth(&request, &step).await;
                }
            }
        };

        let client = Arc::new(ClientInfo {
            client_id: client_id.0.clone(),
            username: request.username.clone(),
            protocol: version,
            remote_addr: self.context.remote_addr,
            listener: self.context.listener.clone(),
            peer: self.context.peer.clone(),
            attributes: Arc::new(attributes),
        });

        let mount = match self.context.mount_point.as_deref() {
            None => None,
            Some(template) => match mount_for(template, &client_id.0, request.username.as_deref()) {
                Ok(mount) => Some(Arc::new(mount)),
                Err(reason) => {
                    info!(client_id = %client_id, %reason, "connection refused: no usable mount point for this client");
                    self.refuse(version, reason, Some("client id or user name cannot fill the mount point".into()));
                    self.flush_and_close().await;
                    return None;
                }
            },
        };
        if let (Some(mount), Some(will)) = (&mount, connect.will.as_mut()) {
            will.topic = format!("{mount}{}", will.topic);
        }

        // The will is authorized now, so a client cannot plant a message it could not publish itself.
        let acl_cache = AclCache::default();
        if let Some(will) = &connect.will {
            let action = Action::Will { topic: &will.topic, qos: will.qos, retain: will.retain };
            if let AclOutcome::Deny(reason) = hooks.authorize(&client, &action).await {
                Metrics::add(&broker.metrics().acl_denials, 1);
                info!(client_id = %client_id, topic = %will.topic, "connection refused: will not authorized");
                self.refuse(version, reason, Some("will topic not authorized".into()));
                self.flush_and_close().await;
                return None;
            }
        }

        // Keepalive: v5 clients are told the server's cap; older clients cannot be, so theirs stands.
        let mut server_keep_alive = None;
        let mut keep_alive = connect.keep_alive;
        if version.is_v5() && config.max_keepalive > 0 && (keep_alive == 0 || keep_alive > config.max_keepalive) {
            keep_alive = config.max_keepalive;
            server_keep_alive = Some(keep_alive);
        }

        let expiry = if version.is_v5() {
            connect.properties.session_expiry_interval.unwrap_or(0)
        } else if connect.clean_start {
            0
        } else {
            config
                .persistent_session_expiry
                .map_or(u32::MAX, |limit| u32::try_from(limit.as_secs()).unwrap_or(u32::MAX))
        };

        let mut create = || broker.new_session(client_id.clone(), expiry);
        let opened = broker.sessions().open(&client_id, connect.clean_start, &mut create);
        if let Some(discarded) = &opened.discarded {
            discarded.kick();
            broker.end_session(discarded);
        }
        let session = opened.session;
        let generation = session.attach(client.clone());
        session.lock().expiry_interval = expiry;

        let will = connect.will.as_ref().map(|will| {
            let now = Instant::now();
            let message = Message {
                topic: will.topic.as_str().into(),
                payload: will.payload.clone(),
                qos: will.qos,
                retain: will.retain,
                properties: Message::carried_properties(&will.properties),
                expires_at: will
                    .properties
                    .message_expiry_interval
                    .map(|seconds| now + Duration::from_secs(u64::from(seconds))),
                origin: Some(session.id),
            };
            Will { message: Arc::new(message), delay_seconds: will.properties.will_delay_interval.unwrap_or(0) }
        });

        let client_receive_maximum = connect.properties.receive_maximum.unwrap_or(u16::MAX);
        let mut properties = Properties::default();
        if version.is_v5() {
            properties.assigned_client_identifier = assigned.map(|id| id.0.to_string());
            properties.server_keep_alive = server_keep_alive;
            properties.receive_maximum = Some(config.max_inflight);
            properties.maximum_packet_size = Some(config.max_packet_size);
            properties.topic_alias_maximum = Some(config.topic_alias_maximum);
            if !config.retain_available {
                properties.retain_available = Some(0);
            }
        }
        let connack = ConnAck {
            session_present: opened.resumed && !connect.clean_start,
            reason_code: ReasonCode::SUCCESS,
            properties,
        };
        let _ = tollgate_protocol::encode_packet(&Packet::ConnAck(connack), version, &mut self.write_buf);
        broker.metrics().client_connected();
        debug!(client_id = %client_id, ?version, keep_alive, resumed = opened.resumed, "client connected");

        let keep_alive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let mut connection = Box::new(Connection {
            decoder: Decoder::new(version, config.max_packet_size as usize),
            broker,
            session,
            generation,
            client,
            version,
            reader: self.reader,
            writer: self.writer,
            // The handshake's 256-byte buffer, kept only if the client already sent more than its CONNECT: an
            // idle client then holds no read buffer (heaptrack found it in every idle connection).
            read_buf: if self.read_buf.is_empty() { BytesMut::new() } else { self.read_buf },
            write_buf: self.write_buf,
            keep_alive,
            last_seen: Instant::now(),
            keepalive_timer: None,
            aliases: None,
            client_alias_maximum: connect.properties.topic_alias_maximum.unwrap_or(0),
            client_max_packet: connect.properties.maximum_packet_size.map_or(usize::MAX, |size| size as usize),
            send_window: usize::from(client_receive_maximum.min(config.max_inflight.max(1))),
            will,
            acl_cache,
            // Only an enhanced-authentication client can re-authenticate; other connections need not keep their
            // CONNECT (password included) for their whole life.
            reauth_request: request.authentication_method.is_some().then(|| Box::new(request)),
            problem_information: connect.properties.request_problem_information != Some(0),
            expiry_was_zero: expiry == 0,
            fill_pending: false,
            handed_off: false,
            bridge_client: connect.bridge,
            durable_acks: DurableAcks::default(),
            publish_window: PublishWindow::default(),
            mount,
        });
        connection.resend_inflight();
        Some(connection)
    }
}

struct Connection<S> {
    broker: Broker,
    session: SessionRef,
    generation: u64,
    client: Arc<ClientInfo>,
    version: ProtocolVersion,
    reader: Reader<S>,
    writer: Writer<S>,
    read_buf: BytesMut,
    write_buf: BytesMut,
    decoder: Decoder,
    /// 1.5 × the negotiated keepalive [MQTT-3.1.2-24], or `None` when the client turned it off.
    keep_alive: Option<Duration>,
    last_seen: Instant,
    /// Armed lazily and re-armed only when it fires, so busy connections do not reset a timer per packet.
    keepalive_timer: Option<Pin<Box<Sleep>>>,
    /// Made at the first alias in either direction: most clients never use one, and the two maps inline were
    /// 96 of an idle connection's bytes.
    aliases: Option<Box<TopicAliases>>,
    client_alias_maximum: u16,
    client_max_packet: usize,
    send_window: usize,
    will: Option<Will>,
    acl_cache: AclCache,
    reauth_request: Option<Box<ConnectRequest>>,
    /// The client's Request Problem Information: when false, no reason strings outside CONNACK/DISCONNECT
    /// [MQTT-3.1.2-29].
    problem_information: bool,
    expiry_was_zero: bool,
    /// The last fill stopped at the write high-water mark with deliveries left in the queue.
    fill_pending: bool,
    /// The input just handled delivered to other sessions: their tasks run before this one writes its acks.
    handed_off: bool,
    /// Another broker's bridge (CONNECT's protocol level with 0x80, Mosquitto's `try_private`): every subscription
    /// it makes is no-local and retain-as-published, so nothing it publishes comes back to it and retained
    /// messages keep their flag across the bridge (what Mosquitto does for such clients).
    bridge_client: bool,
    /// Receipts of this input's messages held by durable subscribers; its acknowledgements wait for them.
    durable_acks: DurableAcks,
    publish_window: PublishWindow,
    /// The listener's mount point for this client: prefixed to what it publishes and subscribes to, removed from
    /// what it receives. A thin pointer: with a fat one the connection outgrew mimalloc's 320-byte class and an
    /// idle connection cost 64 bytes more.
    mount: Option<Arc<String>>,
}

/// At most this many PUBLISHes of one read are authorized or transformed in one call of a batching hook: a bound on
/// what one call holds, far above the bursts where the per-call cost matters.
const MAX_BURST: usize = 32;

/// A PUBLISH that passed every check before the transform, authorization included.
struct Admitted {
    /// Made shared here, where routing would make it so anyway, so that moving an `Admitted` moves a pointer.
    message: Arc<Message>,
    /// The Message Expiry Interval as the client sent it, for the transform's view of the message.
    expiry_interval: Option<u32>,
    /// The topic as published and authorized, for logs (a transform may rewrite the message's).
    topic: Arc<str>,
    /// As received: what the acknowledgement answers.
    qos: QoS,
    packet_id: Option<u16>,
    /// What the ACL granted: a transform may lower the QoS, never raise it past this.
    max_qos: QoS,
    now: Instant,
}

enum Admission {
    Admitted(Admitted),
    Answered(Answer),
}

/// A PUBLISH refused (or, for a QoS 2 duplicate, already routed): only the acknowledgement is left.
struct Answer {
    qos: QoS,
    packet_id: Option<u16>,
    reason: ReasonCode,
}

/// Topic aliases of one connection [MQTT-3.3.2.3.4], each direction numbered by its receiver's maximum.
#[derive(Default)]
struct TopicAliases {
    inbound: HashMap<u16, Arc<str>>,
    outbound: HashMap<Arc<str>, u16>,
}

/// Why a connection's wait on its session ended.
enum Signal {
    Shutdown,
    /// Taken over, revoked or kicked: `Session::revocation` says which.
    Kicked,
    /// Deliveries were queued or in-flight slots opened.
    Woken,
}

/// Waits for the session's one signal. The `notified()` future is made before the flags are read, so a kick or
/// shutdown that raises its flag after the read still wakes it (`notify_waiters` reaches futures made before the
/// call, polled or not). Replacing two `CancellationToken`s (kick, shutdown) by this saved their 72-byte waits in
/// every idle connection's future and the kick token's 112-byte allocation.
async fn next_signal(session: &Session, broker: &Broker, generation: u64) -> Signal {
    let woken = session.wakeup.notified();
    let check = || {
        if broker.is_shutting_down() {
            Some(Signal::Shutdown)
        } else if session.is_kicked(generation) {
            Some(Signal::Kicked)
        } else {
            None
        }
    };
    if let Some(signal) = check() {
        return signal;
    }
    woken.await;
    check().unwrap_or(Signal::Woken)
}

/// PUBLISH count and payload bytes in the current one-second window, for the per-client publish limits.
#[derive(Default)]
struct PublishWindow {
    started: Option<Instant>,
    messages: u32,
    bytes: u64,
}

enum PublishBudget {
    Within,
    /// The payload-bytes quota for this second is spent.
    BytesExceeded,
}

impl PublishWindow {
    fn charge(&mut self, now: Instant, payload: usize, config: &crate::BrokerConfig) -> Result<PublishBudget, Exit> {
        if config.max_publish_rate == 0 && config.max_publish_bytes_rate == 0 {
            return Ok(PublishBudget::Within);
        }
        if self.started.is_none_or(|started| now.duration_since(started) >= Duration::from_secs(1)) {
            *self = PublishWindow { started: Some(now), messages: 0, bytes: 0 };
        }
        self.messages = self.messages.saturating_add(1);
        if config.max_publish_rate != 0 && self.messages > config.max_publish_rate {
            return Err(violation(
                ReasonCode::MESSAGE_RATE_TOO_HIGH,
                format!("more than max_publish_rate = {} PUBLISH packets in one second", config.max_publish_rate),
            ));
        }
        if config.max_publish_bytes_rate != 0 {
            if self.bytes + payload as u64 > u64::from(config.max_publish_bytes_rate) {
                return Ok(PublishBudget::BytesExceeded);
            }
            self.bytes += payload as u64;
        }
        Ok(PublishBudget::Within)
    }
}

impl<S: AsyncRead + AsyncWrite + Send + 'static> Connection<S> {
    async fn serve_loop(&mut self) -> Exit {
        Box::pin(self.fill()).await;
        loop {
            if let Some(period) = self.keep_alive
                && self.keepalive_timer.is_none()
            {
                self.keepalive_timer = Some(Box::pin(tokio::time::sleep_until(self.last_seen + period)));
            }
            let can_fill = self.write_buf.len() < WRITE_HIGH_WATER;
            let keepalive_fired = async {
                match self.keepalive_timer.as_mut() {
                    Some(timer) => timer.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            let signal = next_signal(&self.session, &self.broker, self.generation);
            tokio::select! {
                biased;
                signal = signal => match signal {
                    Signal::Shutdown => return Exit::Shutdown,
                    Signal::Kicked => {
                        return match self.session.revocation() {
                            Some(reason) => Exit::Revoked { reason },
                            None => Exit::TakenOver,
                        };
                    }
                    Signal::Woken if can_fill => Box::pin(self.fill()).await,
                    // The write buffer is full: fill once it drains.
                    Signal::Woken => self.fill_pending = true,
                },
                result = self.writer.write_buf(&mut self.write_buf), if !self.write_buf.is_empty() => {
                    match result {
                        Ok(0) | Err(_) => return Exit::Closed,
                        Ok(count) => {
                            Metrics::add(&self.broker.metrics().bytes_sent, count as u64);
                            if self.write_buf.is_empty() {
                                if self.writer.flush().await.is_err() {
                                    return Exit::Closed;
                                }
                                // Keep idle connections small: give back a buffer a burst inflated.
                                if self.write_buf.capacity() > 4 * WRITE_HIGH_WATER {
                                    self.write_buf = BytesMut::new();
                                }
                            }
                            if self.fill_pending && self.write_buf.len() < WRITE_HIGH_WATER {
                                Box::pin(self.fill()).await;
                            }
                        }
                    }
                }
                result = std::future::poll_fn(|cx| poll_read_into(Pin::new(&mut self.reader), &mut self.read_buf, cx)) => {
                    match result {
                        Ok(0) | Err(_) => return Exit::Closed,
                        Ok(count) => {
                            Metrics::add(&self.broker.metrics().bytes_received, count as u64);
                            self.last_seen = Instant::now();
                            if let Err(exit) = Box::pin(self.process_input()).await {
                                return exit;
                            }
                            Box::pin(self.fill()).await;
                            // A subscriber woken on this worker writes its copy before this task writes the
                            // publisher's PUBACK: the ack's syscall is off the delivery's critical path.
                            if std::mem::take(&mut self.handed_off) && !self.write_buf.is_empty() {
                                tokio::task::yield_now().await;
                            }
                        }
                    }
                }
                _ = keepalive_fired => {
                    let period = self.keep_alive.unwrap_or(Duration::MAX);
                    if self.last_seen + period <= Instant::now() {
                        return Exit::KeepAliveTimeout;
                    }
                    self.keepalive_timer = None;
                }
            }
        }
    }

    async fn process_input(&mut self) -> Result<(), Exit> {
        let handled = self.handle_input().await;
        // The acknowledgements written for this input go out only once durable subscribers hold their copies
        // safely: nothing is written before this returns.
        if self.durable_acks.is_pending() {
            self.durable_acks.wait().await;
        }
        handled
    }

    async fn handle_input(&mut self) -> Result<(), Exit> {
        while let Some(packet) = self.decoder.decode(&mut self.read_buf)? {
            Metrics::add(&self.broker.metrics().messages_received, 1);
            self.handle(packet).await?;
        }
        // An idle connection keeps no read buffer at all; `poll_read_into` reads through a stack buffer.
        if self.read_buf.is_empty() {
            self.read_buf = BytesMut::new();
        }
        Ok(())
    }

    fn send(&mut self, packet: &Packet) {
        match tollgate_protocol::encode_packet(packet, self.version, &mut self.write_buf) {
            Ok(_) => Metrics::add(&self.broker.metrics().messages_sent, 1),
            Err(error) => {
                warn!(client_id = %self.client.client_id, %error, kind = packet.kind(), "could not encode packet")
            }
        }
    }

    async fn handle(&mut self, packet: Packet) -> Result<(), Exit> {
        match packet {
            Packet::Publish(publish) => self.handle_publish(publish).await,
            Packet::PubAck(ack) => {
                self.session.lock().complete(ack.packet_id);
                Ok(())
            }
            Packet::PubRec(ack) => {
                let known = {
                    let mut state = self.session.lock();
                    if ack.reason_code.is_error() {
                        // An error PUBREC ends the exchange [MQTT-4.3.3].
                        state.complete(ack.packet_id);
                        return Ok(());
                    }
                    state.received(ack.packet_id)
                };
                let reason = if known { ReasonCode::SUCCESS } else { ReasonCode::PACKET_IDENTIFIER_NOT_FOUND };
                self.send(&Packet::PubRel(Ack::new(ack.packet_id, reason)));
                Ok(())
            }
            Packet::PubComp(ack) => {
                self.session.lock().complete(ack.packet_id);
                Ok(())
            }
            Packet::PubRel(ack) => {
                let known = self.session.lock().incoming_qos2.remove(&ack.packet_id);
                let reason = if known { ReasonCode::SUCCESS } else { ReasonCode::PACKET_IDENTIFIER_NOT_FOUND };
                self.send(&Packet::PubComp(Ack::new(ack.packet_id, reason)));
                Ok(())
            }
            Packet::Subscribe(subscribe) => self.handle_subscribe(subscribe).await,
            Packet::Unsubscribe(unsubscribe) => {
                self.handle_unsubscribe(unsubscribe);
                Ok(())
            }
            Packet::PingReq => {
                self.send(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(disconnect) => self.handle_disconnect(disconnect),
            Packet::Auth(auth) => self.handle_reauth(auth).await,
            Packet::Connect(_) => Err(violation(ReasonCode::PROTOCOL_ERROR, "second CONNECT [MQTT-3.1.0-2]")),
            other => Err(violation(ReasonCode::PROTOCOL_ERROR, format!("{} is not sent by clients", other.kind()))),
        }
    }

    async fn authorize(&mut self, action: Action<'_>) -> AclOutcome {
        let hooks = self.broker.hooks();
        if hooks.authorizers.is_empty() || (action.is_read() && !hooks.checks_reads()) {
            return AclOutcome::Allow { max_qos: QoS::ExactlyOnce };
        }
        let cacheable = hooks.acl_cacheable();
        let generation = self.acl_generation(&hooks);
        if cacheable && let Some(outcome) = self.acl_cache.get(generation, &action) {
            return outcome;
        }
        let outcome = hooks.authorize(&self.client, &action).await;
        self.record_decision(cacheable, generation, &action, outcome);
        outcome
    }

    /// [`Connection::authorize`] for the PUBLISHes of a burst, in order: cached decisions are reused, and the rest
    /// go to the chain in one [`HookChain::authorize_batch`].
    async fn authorize_burst(&mut self, actions: &[Action<'_>]) -> Vec<AclOutcome> {
        let hooks = self.broker.hooks();
        if hooks.authorizers.is_empty() {
            return vec![AclOutcome::Allow { max_qos: QoS::ExactlyOnce }; actions.len()];
        }
        let cacheable = hooks.acl_cacheable();
        let generation = self.acl_generation(&hooks);
        let cached: Vec<Option<AclOutcome>> = actions
            .iter()
            .map(|action| if cacheable { self.acl_cache.get(generation, action) } else { None })
            .collect();
        let asked: Vec<Action<'_>> =
            actions.iter().zip(&cached).filter(|(_, cached)| cached.is_none()).map(|(action, _)| *action).collect();
        let mut fresh = Vec::with_capacity(asked.len());
        hooks.authorize_batch(&self.client, &asked, &mut fresh).await;
        for (action, outcome) in asked.iter().zip(&fresh) {
            self.record_decision(cacheable, generation, action, *outcome);
        }
        let mut fresh = fresh.into_iter();
        cached
            .into_iter()
            .map(|cached| {
                cached.or_else(|| fresh.next()).unwrap_or(AclOutcome::Deny(ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR))
            })
            .collect()
    }

    /// The ACL cache's generation. Both parts only grow, so their sum changes whenever either does: a reload or a
    /// recheck empties the cache.
    fn acl_generation(&self, hooks: &HookChain) -> u64 {
        hooks.generation + self.broker.acl_epoch()
    }

    /// Caches a decision the chain just made (when decisions may be cached) and counts a denial.
    fn record_decision(&mut self, cacheable: bool, generation: u64, action: &Action<'_>, outcome: AclOutcome) {
        if cacheable {
            self.acl_cache.insert(generation, action, outcome);
        }
        if let AclOutcome::Deny(reason) = outcome {
            Metrics::add(&self.broker.metrics().acl_denials, 1);
            debug!(client_id = %self.client.client_id, ?action, %reason, "denied by authorization");
        }
    }

    fn ack_publish(&mut self, qos: QoS, packet_id: Option<u16>, reason: ReasonCode) {
        self.ack_publish_saying(qos, packet_id, reason, "");
    }

    /// [`Connection::ack_publish`] with a reason string, sent when the client accepts reason strings (the
    /// encoder leaves it out for 3.1.1).
    fn ack_publish_saying(&mut self, qos: QoS, packet_id: Option<u16>, reason: ReasonCode, message: &str) {
        let Some(packet_id) = packet_id else { return };
        let mut ack = Ack::new(packet_id, reason);
        if self.problem_information && !message.is_empty() {
            ack.properties.reason_string = Some(message.to_owned());
        }
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(&Packet::PubAck(ack)),
            QoS::ExactlyOnce => {
                if !reason.is_error() {
                    self.session.lock().incoming_qos2.insert(packet_id);
                }
                self.send(&Packet::PubRec(ack));
            }
        }
    }

    /// The rest of the input, starting with a checked PUBLISH, when the chain takes batches (of authorization or
    /// of transforms): consecutive QoS 0 and 1 PUBLISHes are checked (aliases, mount point, quotas) one by one, then
    /// authorized together, transformed together, and routed and acknowledged in arrival order. Anything else (an
    /// answer before authorization, another packet, the batch limit, the end of the input) first finishes the
    /// messages gathered so far, so acknowledgements keep the order of the PUBLISHes [MQTT-4.6.0-2]. QoS 2 goes one
    /// by one: its duplicate check needs the earlier messages acknowledged.
    async fn process_burst(&mut self, first: Publish) -> Result<(), Exit> {
        let mut burst: Vec<Publish> = Vec::with_capacity(MAX_BURST);
        burst.push(first);
        loop {
            let packet = match self.decoder.decode(&mut self.read_buf) {
                Ok(Some(packet)) => {
                    Metrics::add(&self.broker.metrics().messages_received, 1);
                    packet
                }
                Ok(None) => break,
                Err(error) => {
                    self.finish_burst(&mut burst).await?;
                    return Err(error.into());
                }
            };
            match packet {
                Packet::Publish(mut publish) if publish.qos != QoS::ExactlyOnce => {
                    match self.check_publish(&mut publish) {
                        Ok(None) => {
                            burst.push(publish);
                            if burst.len() >= MAX_BURST {
                                self.finish_burst(&mut burst).await?;
                            }
                        }
                        Ok(Some(Answer { qos, packet_id, reason })) => {
                            self.finish_burst(&mut burst).await?;
                            self.ack_publish(qos, packet_id, reason);
                        }
                        Err(exit) => {
                            self.finish_burst(&mut burst).await?;
                            return Err(exit);
                        }
                    }
                }
                packet => {
                    self.finish_burst(&mut burst).await?;
                    self.handle(packet).await?;
                }
            }
        }
        self.finish_burst(&mut burst).await
    }

    /// Authorizes the gathered messages in one call of the chain and transforms the admitted ones in another, then
    /// routes and acknowledges each in order. A refusal that disconnects (a denial under 3.1.1's `disconnect`
    /// policy, or a transform's) ends it there: the later messages are discarded, as if they had not been sent.
    async fn finish_burst(&mut self, burst: &mut Vec<Publish>) -> Result<(), Exit> {
        if burst.len() <= 1 {
            return match burst.pop() {
                Some(publish) => self.publish_checked(publish, &self.broker.hooks()).await,
                None => Ok(()),
            };
        }
        let actions: Vec<Action<'_>> = burst.iter().map(publish_action).collect();
        let outcomes = self.authorize_burst(&actions).await;
        drop(actions);
        let mut admissions = Vec::with_capacity(burst.len());
        let mut refused = None;
        for (publish, outcome) in burst.drain(..).zip(outcomes) {
            match self.admit_authorized(publish, outcome) {
                Ok(admission) => admissions.push(admission),
                Err(exit) => {
                    refused = Some(exit);
                    break;
                }
            }
        }
        let hooks = self.broker.hooks();
        if hooks.transformers.is_empty() {
            for admission in admissions {
                match admission {
                    Admission::Admitted(admitted) => self.route_publish(admitted),
                    Admission::Answered(answer) => self.answer(answer),
                }
            }
        } else {
            let mut drafts: Vec<tollgate_hooks::Message> = admissions
                .iter()
                .filter_map(|admission| match admission {
                    Admission::Admitted(admitted) => {
                        Some(Message::hook_view(&admitted.message, admitted.expiry_interval))
                    }
                    Admission::Answered(_) => None,
                })
                .collect();
            let mut outcomes = Vec::with_capacity(drafts.len());
            hooks.transform_inbound_batch(&self.client, &mut drafts, &mut outcomes).await;
            let mut transformed = drafts.into_iter().zip(outcomes);
            for admission in admissions {
                match admission {
                    Admission::Admitted(admitted) => {
                        // None: a refusal that disconnects ended the batch, and this connection with it.
                        let Some((draft, outcome)) = transformed.next() else { break };
                        self.finish_publish(admitted, draft, outcome)?;
                    }
                    Admission::Answered(answer) => self.answer(answer),
                }
            }
        }
        refused.map_or(Ok(()), Err)
    }

    async fn handle_publish(&mut self, mut publish: Publish) -> Result<(), Exit> {
        if let Some(answer) = self.check_publish(&mut publish)? {
            self.answer(answer);
            return Ok(());
        }
        let hooks = self.broker.hooks();
        // More input follows and the chain takes batches: gather the burst and hand it over in one call.
        if publish.qos != QoS::ExactlyOnce
            && !self.read_buf.is_empty()
            && (hooks.batches_authorization() || hooks.batches_inbound())
        {
            drop(hooks);
            // Boxed: the burst's state stays out of the future every connection keeps.
            return Box::pin(self.process_burst(publish)).await;
        }
        self.publish_checked(publish, &hooks).await
    }

    /// Authorizes, transforms, routes and acknowledges one checked PUBLISH.
    async fn publish_checked(&mut self, publish: Publish, hooks: &HookChain) -> Result<(), Exit> {
        let outcome = self.authorize(publish_action(&publish)).await;
        match self.admit_authorized(publish, outcome)? {
            Admission::Admitted(admitted) => {
                if hooks.transformers.is_empty() {
                    self.route_publish(admitted);
                    return Ok(());
                }
                let mut draft = Message::hook_view(&admitted.message, admitted.expiry_interval);
                let outcome = hooks.transform_inbound(&self.client, &mut draft).await;
                self.finish_publish(admitted, draft, outcome)
            }
            Admission::Answered(answer) => {
                self.answer(answer);
                Ok(())
            }
        }
    }

    fn answer(&mut self, Answer { qos, packet_id, reason }: Answer) {
        self.ack_publish(qos, packet_id, reason);
    }

    /// Everything before authorization: protocol checks, topic alias, mount point, quotas and the QoS 2 duplicate
    /// check. The topic is resolved in place. A message refused here is answered by the caller, which keeps answers
    /// in order.
    fn check_publish(&mut self, publish: &mut Publish) -> Result<Option<Answer>, Exit> {
        let config = self.broker.config();
        Metrics::add(&self.broker.metrics().publish_received, 1);
        if self.version.is_v5() {
            if !publish.properties.subscription_identifiers.is_empty() {
                return Err(violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "PUBLISH from a client carries a subscription identifier [MQTT-3.3.4-6]",
                ));
            }
            if let Some(alias) = publish.properties.topic_alias {
                if alias > config.topic_alias_maximum {
                    return Err(violation(
                        ReasonCode::TOPIC_ALIAS_INVALID,
                        format!("topic alias {alias} exceeds the maximum {}", config.topic_alias_maximum),
                    ));
                }
                if publish.topic.is_empty() {
                    match self.aliases.as_ref().and_then(|aliases| aliases.inbound.get(&alias)) {
                        Some(topic) => publish.topic = topic.clone(),
                        None => {
                            return Err(violation(ReasonCode::PROTOCOL_ERROR, format!("unknown topic alias {alias}")));
                        }
                    }
                } else {
                    self.aliases.get_or_insert_default().inbound.insert(alias, publish.topic.clone());
                }
            }
        }
        if let Some(mount) = &self.mount {
            publish.topic = format!("{mount}{}", publish.topic).into();
        }
        if let PublishBudget::BytesExceeded =
            self.publish_window.charge(Instant::now(), publish.payload.len(), config)?
        {
            if !self.version.is_v5() {
                return Err(violation(
                    ReasonCode::QUOTA_EXCEEDED,
                    format!(
                        "more than max_publish_bytes_rate = {} payload bytes in one second",
                        config.max_publish_bytes_rate
                    ),
                ));
            }
            // Dropped and, where the protocol has an answer, told so; the connection stays.
            return Ok(Some(Answer {
                qos: publish.qos,
                packet_id: publish.packet_id,
                reason: ReasonCode::QUOTA_EXCEEDED,
            }));
        }
        if publish.retain && !config.retain_available {
            return Err(violation(ReasonCode::RETAIN_NOT_SUPPORTED, "retain is not available [MQTT-3.3.1-8]"));
        }
        if publish.qos == QoS::ExactlyOnce {
            let packet_id = publish.packet_id.unwrap_or(0);
            let (duplicate, pending) = {
                let state = self.session.lock();
                (state.incoming_qos2.contains(&packet_id), state.incoming_qos2.len())
            };
            if duplicate {
                // Already routed: exactly once means acknowledging again without delivering again.
                return Ok(Some(Answer {
                    qos: QoS::ExactlyOnce,
                    packet_id: Some(packet_id),
                    reason: ReasonCode::SUCCESS,
                }));
            }
            if pending >= usize::from(config.max_inflight) {
                return Err(violation(
                    ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
                    "more QoS 2 publications in flight than the Receive Maximum [MQTT-3.3.4-9]",
                ));
            }
        }
        Ok(None)
    }

    /// A checked PUBLISH with its authorization outcome: admitted, answered (denied), or for 3.1.1 under the
    /// `disconnect` policy, the end of the connection.
    fn admit_authorized(&mut self, publish: Publish, outcome: AclOutcome) -> Result<Admission, Exit> {
        let qos = publish.qos;
        let packet_id = publish.packet_id;
        let max_qos = match outcome {
            AclOutcome::Deny(reason) => {
                // 3.1.1 has no negative acknowledgement: the message is acknowledged and dropped, as Mosquitto does,
                // or the client is disconnected if so configured.
                if !self.version.is_v5() && self.broker.config().publish_denied_v311 == DeniedPublish::Disconnect {
                    return Err(Exit::Refused {
                        reason,
                        detail: format!("publish to {} not authorized", publish.topic),
                    });
                }
                let reason = if self.version.is_v5() { reason } else { ReasonCode::SUCCESS };
                return Ok(Admission::Answered(Answer { qos, packet_id, reason }));
            }
            AclOutcome::Allow { max_qos } => max_qos,
        };

        let now = Instant::now();
        let topic = publish.topic.clone();
        let message = Message {
            expires_at: publish
                .properties
                .message_expiry_interval
                .map(|seconds| now + Duration::from_secs(u64::from(seconds))),
            properties: Message::carried_properties(&publish.properties),
            topic: publish.topic,
            payload: publish.payload,
            qos: qos.min(max_qos),
            retain: publish.retain,
            origin: Some(self.session.id),
        };
        Ok(Admission::Admitted(Admitted {
            message: Arc::new(message),
            expiry_interval: publish.properties.message_expiry_interval,
            topic,
            qos,
            packet_id,
            max_qos,
            now,
        }))
    }

    /// Acts on the transform chain's outcome for one admitted message.
    fn finish_publish(
        &mut self,
        mut admitted: Admitted,
        draft: tollgate_hooks::Message,
        outcome: TransformOutcome,
    ) -> Result<(), Exit> {
        let Admitted { qos, packet_id, .. } = admitted;
        match outcome {
            TransformOutcome::Deliver => {
                // Not shared yet: `make_mut` does not copy.
                let message = Arc::make_mut(&mut admitted.message);
                message.apply_hook_view(draft, admitted.now);
                // A transform may lower the QoS, never raise it past what the ACL granted.
                message.qos = message.qos.min(admitted.max_qos);
                self.route_publish(admitted);
                Ok(())
            }
            TransformOutcome::Drop { hook, reason } => {
                debug!(client_id = %self.client.client_id, %hook, %reason, "message dropped by transform");
                self.ack_publish(qos, packet_id, ReasonCode::SUCCESS);
                Ok(())
            }
            TransformOutcome::Reject { hook, reason, message, disconnect } => {
                info!(client_id = %self.client.client_id, %hook, %reason, %message, disconnect, topic = %admitted.topic, "message refused by transform");
                Metrics::add(&self.broker.metrics().publish_dropped, 1);
                if self.version.is_v5() {
                    self.ack_publish_saying(qos, packet_id, reason, &message);
                } else if !disconnect {
                    // 3.1.1 has no negative acknowledgement: acknowledged and dropped.
                    self.ack_publish(qos, packet_id, ReasonCode::SUCCESS);
                }
                if disconnect {
                    return Err(Exit::Refused { reason, detail: message });
                }
                Ok(())
            }
        }
    }

    fn route_publish(&mut self, admitted: Admitted) {
        let Admitted { message, topic, qos, packet_id, .. } = admitted;
        let matched = if qos == QoS::AtMostOnce {
            self.broker.publish_from(message, Some(&self.session.client_id))
        } else {
            self.broker.publish_acked(message, Some(&self.session.client_id), &mut self.durable_acks)
        };
        self.handed_off |= matched > 0;
        tracing::trace!(client_id = %self.client.client_id, %topic, matched, "published");
        let reason = if matched == 0 && self.version.is_v5() {
            ReasonCode::NO_MATCHING_SUBSCRIBERS
        } else {
            ReasonCode::SUCCESS
        };
        self.ack_publish(qos, packet_id, reason);
    }

    async fn handle_subscribe(&mut self, mut subscribe: Subscribe) -> Result<(), Exit> {
        if self.bridge_client {
            // A shared subscription may not be no-local [MQTT-3.8.3-4]; a bridge has no use for one anyway.
            for subscription in subscribe.subscriptions.iter_mut().filter(|s| !s.filter.starts_with("$share/")) {
                subscription.options.no_local = true;
                subscription.options.retain_as_published = true;
            }
        }
        if let Some(mount) = &self.mount {
            for subscription in &mut subscribe.subscriptions {
                subscription.filter = mounted_filter(mount, &subscription.filter);
            }
        }
        let identifier = subscribe.properties.subscription_identifiers.first().copied();
        let mut reason_codes = Vec::with_capacity(subscribe.subscriptions.len());
        let mut replays = Vec::new();
        for subscription in &subscribe.subscriptions {
            let parsed = match topic::parse_subscription_filter(&subscription.filter) {
                Ok(parsed) => parsed,
                Err(error) => {
                    if !self.version.is_v5() {
                        return Err(violation(ReasonCode::TOPIC_FILTER_INVALID, error.to_string()));
                    }
                    reason_codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                    continue;
                }
            };
            if parsed.share_group.is_some() && subscription.options.no_local {
                return Err(violation(ReasonCode::PROTOCOL_ERROR, "no-local on a shared subscription [MQTT-3.8.3-4]"));
            }
            let requested = subscription.options.qos;
            let action = Action::Subscribe { filter: parsed.filter, qos: requested, share_group: parsed.share_group };
            let granted = match self.authorize(action).await {
                AclOutcome::Deny(reason) => {
                    reason_codes.push(reason);
                    continue;
                }
                AclOutcome::Allow { max_qos } => requested.min(max_qos),
            };
            let mut options = subscription.options;
            options.qos = granted;
            let subscriber = Subscriber { session: self.session.clone(), options, identifier };
            let existed = self.broker.router().subscribe(parsed.filter, parsed.share_group, subscriber);
            self.session
                .lock()
                .subscriptions
                .insert(subscription.filter.clone(), SessionSubscription { options, identifier });
            reason_codes.push(ReasonCode(granted as u8));
            debug!(client_id = %self.client.client_id, filter = %subscription.filter, ?granted, existed, "subscribed");
            let replay = match options.retain_handling {
                0 => true,
                1 => !existed,
                _ => false,
            };
            // Shared subscriptions never receive retained messages [MQTT-4.8.2].
            if replay && parsed.share_group.is_none() {
                replays.push((parsed.filter.to_owned(), granted));
            }
        }
        self.send(&Packet::SubAck(SubAck {
            packet_id: subscribe.packet_id,
            reason_codes,
            properties: Properties::default(),
        }));
        let now = Instant::now();
        for (filter, granted) in replays {
            for message in self.broker.retained().matching(&filter, now) {
                if !self.authorize(Action::ReceiveRetained { topic: &message.topic }).await.is_allowed() {
                    continue;
                }
                let qos = message.qos.min(granted);
                let delivery = Delivery::new(message, qos, true, identifier.into_iter().collect());
                self.broker.deliver(&self.session, delivery);
            }
        }
        Ok(())
    }

    fn handle_unsubscribe(&mut self, mut unsubscribe: Unsubscribe) {
        if let Some(mount) = &self.mount {
            for filter in &mut unsubscribe.filters {
                *filter = mounted_filter(mount, filter);
            }
        }
        let mut reason_codes = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            let Ok(parsed) = topic::parse_subscription_filter(filter) else {
                reason_codes.push(ReasonCode::TOPIC_FILTER_INVALID);
                continue;
            };
            let removed = self.broker.router().unsubscribe(parsed.filter, parsed.share_group, self.session.id);
            self.session.lock().subscriptions.remove(filter);
            reason_codes.push(if removed { ReasonCode::SUCCESS } else { ReasonCode::NO_SUBSCRIPTION_EXISTED });
        }
        self.send(&Packet::UnsubAck(UnsubAck {
            packet_id: unsubscribe.packet_id,
            reason_codes,
            properties: Properties::default(),
        }));
    }

    fn handle_disconnect(&mut self, disconnect: Disconnect) -> Result<(), Exit> {
        if let Some(expiry) = disconnect.properties.session_expiry_interval {
            if self.expiry_was_zero && expiry != 0 {
                return Err(violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "session expiry set on DISCONNECT after 0 at CONNECT [MQTT-3.14.2-2]",
                ));
            }
            self.session.lock().expiry_interval = expiry;
        }
        Err(Exit::ClientDisconnect { publish_will: disconnect.reason_code == ReasonCode::DISCONNECT_WITH_WILL })
    }

    /// Re-authentication (MQTT 5 section 4.12.1) on an established connection.
    async fn handle_reauth(&mut self, auth: Auth) -> Result<(), Exit> {
        let Some(request) = self.reauth_request.as_deref() else {
            return Err(violation(
                ReasonCode::PROTOCOL_ERROR,
                "AUTH without an authentication method at CONNECT [MQTT-4.12.0-7]",
            ));
        };
        let method = request.authentication_method.clone().unwrap_or_default();
        if auth.properties.authentication_method.as_deref() != Some(method.as_str()) {
            return Err(violation(ReasonCode::PROTOCOL_ERROR, "AUTH with a different authentication method"));
        }
        let step = AuthStep { method: method.clone(), data: auth.properties.authentication_data };
        let hooks = self.broker.hooks();
        let outcome = hooks.continue_auth(request, &step).await;
        drop(hooks);
        match outcome {
            AuthOutcome::Allow { .. } => {
                let properties = Properties { authentication_method: Some(method), ..Properties::default() };
                self.send(&Packet::Auth(Auth { reason_code: ReasonCode::SUCCESS, properties }));
                Ok(())
            }
            AuthOutcome::Continue { data } => {
                let properties = Properties {
                    authentication_method: Some(method),
                    authentication_data: data,
                    ..Properties::default()
                };
                self.send(&Packet::Auth(Auth { reason_code: ReasonCode::CONTINUE_AUTHENTICATION, properties }));
                Ok(())
            }
            AuthOutcome::Deny { reason, .. } => Err(violation(reason, "re-authentication failed")),
        }
    }

    /// On session resume, unacknowledged messages go out again in their original order with DUP set, and
    /// pending PUBRELs are repeated [MQTT-4.4.0-1].
    fn resend_inflight(&mut self) {
        let entries = self.session.lock().inflight_in_order();
        for (packet_id, entry) in entries {
            match entry {
                Inflight::Publish(delivery) => self.send_publish(delivery, Some(packet_id), true),
                Inflight::Release => self.send(&Packet::PubRel(Ack::new(packet_id, ReasonCode::SUCCESS))),
            }
        }
    }

    async fn fill(&mut self) {
        self.fill_pending = false;
        let hooks = self.broker.hooks();
        let outbound_transform = hooks.has_outbound_transform();
        let check_read = hooks.checks_reads();
        drop(hooks);
        loop {
            if self.write_buf.len() >= WRITE_HIGH_WATER {
                self.fill_pending = true;
                return;
            }
            // A connection that was taken over leaves the queue to its successor.
            if self.session.is_kicked(self.generation) {
                return;
            }
            let batch = self.session.lock().take_sendable(self.send_window, FILL_BATCH, Instant::now());
            if batch.is_empty() {
                return;
            }
            for (delivery, packet_id) in batch {
                // Read permission is checked per delivered message, as Mosquitto does: a subscription to `#` must
                // not carry messages from topics the subscriber may not read. Decisions are cached per connection.
                if check_read && !self.authorize(Action::Receive { topic: &delivery.message.topic }).await.is_allowed()
                {
                    if let Some(packet_id) = packet_id {
                        self.session.lock().complete(packet_id);
                    }
                    continue;
                }
                if outbound_transform {
                    match self.transform_outbound(delivery).await {
                        Some(delivery) => self.send_publish(delivery, packet_id, false),
                        None => {
                            if let Some(packet_id) = packet_id {
                                self.session.lock().complete(packet_id);
                            }
                        }
                    }
                } else {
                    self.send_publish(delivery, packet_id, false);
                }
            }
        }
    }

    async fn transform_outbound(&mut self, delivery: Delivery) -> Option<Delivery> {
        let hooks = self.broker.hooks();
        let now = Instant::now();
        let mut draft = Message::hook_view(&delivery.message, delivery.message.remaining_expiry(now));
        match hooks.transform_outbound(&self.client, &mut draft).await {
            TransformOutcome::Deliver => {
                let mut message = Message {
                    topic: delivery.message.topic.clone(),
                    payload: delivery.message.payload.clone(),
                    qos: delivery.message.qos,
                    retain: delivery.message.retain,
                    properties: delivery.message.properties.clone(),
                    expires_at: delivery.message.expires_at,
                    origin: delivery.message.origin,
                };
                message.apply_hook_view(draft, now);
                Some(Delivery { message: Arc::new(message), ..delivery })
            }
            TransformOutcome::Drop { hook, reason } | TransformOutcome::Reject { hook, message: reason, .. } => {
                debug!(client_id = %self.client.client_id, %hook, %reason, "outbound copy dropped by transform");
                None
            }
        }
    }

    fn mount(&self) -> Option<&str> {
        self.mount.as_deref().map(String::as_str)
    }

    fn send_publish(&mut self, delivery: Delivery, packet_id: Option<u16>, dup: bool) {
        let message = &delivery.message;
        if !self.version.is_v5() {
            // 3.1.1 has no properties, topic aliases or client packet-size limit: each copy is encoded straight
            // from the shared message, without cloning its topic and payload into a packet first (a tenth of the
            // broker's time in the 1->100 fan-out profile went to building, encoding and dropping those packets).
            let flags = encode::PublishFlags { dup, qos: delivery.qos, retain: delivery.retain };
            let topic = unmounted(self.mount(), &message.topic);
            match encode::encode_publish_v311(&mut self.write_buf, flags, topic, packet_id, &message.payload) {
                Ok(_) => {
                    let metrics = self.broker.metrics();
                    Metrics::add(&metrics.publish_sent, 1);
                    Metrics::add(&metrics.messages_sent, 1);
                }
                Err(error) => {
                    warn!(client_id = %self.client.client_id, %error, "could not encode a PUBLISH; dropped");
                    if let Some(packet_id) = packet_id {
                        self.session.lock().complete(packet_id);
                    }
                }
            }
            return;
        }
        let mut properties = message.properties().clone();
        properties.subscription_identifiers = delivery.subscription_ids.clone();
        // Read the clock only for a message that expires: this runs once per copy delivered, and a fan-out to a
        // hundred subscribers spent 4.5% of the broker's time in clock_gettime here.
        properties.message_expiry_interval =
            if message.expires_at.is_some() { message.remaining_expiry(Instant::now()) } else { None };
        let topic = match self.mount() {
            Some(mount) => Arc::from(unmounted(Some(mount), &message.topic)),
            None => message.topic.clone(),
        };
        let mut publish = Publish {
            dup,
            qos: delivery.qos,
            retain: delivery.retain,
            topic,
            packet_id,
            properties,
            payload: message.payload.clone(),
        };
        // Outbound topic aliases: a known topic goes out as its alias alone; a new one gets an alias while the
        // client's maximum allows.
        let mut new_alias = None;
        if self.client_alias_maximum > 0 {
            let outbound = &self.aliases.get_or_insert_default().outbound;
            if let Some(alias) = outbound.get(&message.topic) {
                publish.properties.topic_alias = Some(*alias);
                publish.topic = Arc::from("");
            } else if outbound.len() < usize::from(self.client_alias_maximum) {
                let alias = outbound.len() as u16 + 1;
                publish.properties.topic_alias = Some(alias);
                new_alias = Some(alias);
            }
        }
        let packet = Packet::Publish(publish);
        let fits = encode::encoded_len(&packet, self.version).is_ok_and(|length| length <= self.client_max_packet);
        if !fits {
            // The client's Maximum Packet Size forbids sending it; it is discarded as if delivered [MQTT-3.1.2-25].
            Metrics::add(&self.broker.metrics().publish_dropped, 1);
            if let Some(packet_id) = packet_id {
                self.session.lock().complete(packet_id);
            }
            return;
        }
        if let Some(alias) = new_alias {
            self.aliases.get_or_insert_default().outbound.insert(message.topic.clone(), alias);
        }
        Metrics::add(&self.broker.metrics().publish_sent, 1);
        self.send(&packet);
    }

    /// The goodbye: `told` names the session observers that heard of this connection's start.
    async fn finish(mut self: Box<Self>, exit: Exit, told: Option<Vec<String>>) {
        let cause = exit.cause();
        let client_id = self.client.client_id.clone();
        let (goodbye, publish_will) = match &exit {
            Exit::ClientDisconnect { publish_will } => (None, *publish_will),
            Exit::Closed => (None, true),
            Exit::Violation { reason, detail } => {
                Metrics::add(&self.broker.metrics().protocol_errors, 1);
                info!(client_id = %client_id, %reason, %detail, "disconnecting client for a protocol violation");
                (Some((*reason, Some(detail.clone()))), true)
            }
            Exit::KeepAliveTimeout => {
                info!(client_id = %client_id, "keepalive expired");
                (Some((ReasonCode::KEEP_ALIVE_TIMEOUT, None)), true)
            }
            Exit::TakenOver => {
                debug!(client_id = %client_id, "session taken over by a new connection");
                (Some((ReasonCode::SESSION_TAKEN_OVER, None)), true)
            }
            Exit::Refused { reason, detail } => {
                info!(client_id = %client_id, %reason, %detail, "disconnecting client at a policy hook's request");
                (Some((*reason, Some(detail.clone()))), true)
            }
            // A revoked identity's will is not published: it would speak for a client no longer trusted.
            Exit::Revoked { reason } => {
                info!(client_id = %client_id, %reason, "disconnecting client: access revoked");
                (Some((*reason, None)), false)
            }
            // A broker going away publishes no wills: the subscribers are going away too.
            Exit::Shutdown => (Some((ReasonCode::SERVER_SHUTTING_DOWN, None)), false),
        };
        let said_goodbye = goodbye.is_some();
        if let Some((reason, detail)) = goodbye
            && self.version.is_v5()
        {
            let properties = Properties { reason_string: detail, ..Properties::default() };
            self.send(&Packet::Disconnect(Disconnect { reason_code: reason, properties }));
        }
        if !self.write_buf.is_empty() && !matches!(exit, Exit::Closed) {
            let _ = tokio::time::timeout(FAREWELL_TIMEOUT, self.writer.write_all(&self.write_buf)).await;
        }
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, self.writer.shutdown()).await;
        self.broker.metrics().client_disconnected();

        let still_current = self.session.detach(self.generation);
        if !still_current {
            // This connection may have taken a wake-up meant for its successor, which shares the signal.
            self.session.wakeup.notify_one();
        }
        let expiry = self.session.lock().expiry_interval;
        if publish_will && let Some(will) = self.will.take() {
            let delay = Duration::from_secs(u64::from(will.delay_seconds.min(expiry)));
            self.broker.schedule_will(self.session.clone(), self.generation, will.message, delay);
        }
        if still_current {
            if expiry == 0 {
                self.broker.end_session(&self.session);
            } else {
                self.broker.schedule_expiry(self.session.clone(), self.generation, expiry);
            }
        }
        if let Some(told) = told {
            self.broker.hooks().session_disconnected(&self.client, cause, &told).await;
        }
        // Lingering close: a client still sending when the broker said goodbye would otherwise hit a reset and
        // may never read the DISCONNECT that explains why. Our side is already shut for writing; drain and discard
        // what the client sends until it closes, for a bounded time.
        if said_goodbye {
            let deadline = Instant::now() + LINGER;
            let mut scratch = BytesMut::with_capacity(4096);
            while let Ok(Ok(count)) = tokio::time::timeout_at(deadline, self.reader.read_buf(&mut scratch)).await {
                if count == 0 {
                    break;
                }
                scratch.clear();
            }
        }
        debug!(client_id = %client_id, ?exit, "connection closed");
    }
}

/// What authorization is asked about a checked PUBLISH.
fn publish_action(publish: &Publish) -> Action<'_> {
    Action::Publish { topic: &publish.topic, qos: publish.qos, retain: publish.retain }
}

#[cfg(test)]
mod mount_tests {
    use tollgate_protocol::ReasonCode;

    use super::{check_mount_point, mount_for, mounted_filter, unmounted};

    /// Every idle connection holds one boxed `Connection` and one `Arc<Session>`: mimalloc serves 257 to 320 bytes
    /// from one class, so a field that takes either past 320 costs 64 bytes per connection (it happened twice).
    #[test]
    #[cfg(target_pointer_width = "64")]
    fn a_connection_and_its_session_stay_within_their_allocation_class() {
        assert!(std::mem::size_of::<super::Connection<tokio::net::TcpStream>>() <= 320);
        let arc_counts = 2 * std::mem::size_of::<usize>();
        assert!(std::mem::size_of::<super::Session>() + arc_counts <= 320);
    }

    #[test]
    fn templates_take_only_client_id_and_user_name() {
        assert!(check_mount_point("v1/vehicles/%c/").is_ok());
        assert!(check_mount_point("tenants/%u/%c/").is_ok());
        assert!(check_mount_point("plain/").is_ok());
        for bad in ["", "a/+/", "a/#", "a/%x/", "a/%", "a/\0/"] {
            assert!(check_mount_point(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values_fill_one_literal_level_or_refuse_the_client() {
        assert_eq!(mount_for("v/%c/", "1M8GDM9AXKP042788", None), Ok("v/1M8GDM9AXKP042788/".into()));
        assert_eq!(mount_for("t/%u/%c/", "c", Some("acme")), Ok("t/acme/c/".into()));
        for id in ["a/b", "+", "#", "", "a\0"] {
            assert_eq!(mount_for("v/%c/", id, None), Err(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID), "{id:?}");
        }
        assert_eq!(mount_for("t/%u/", "c", None), Err(ReasonCode::NOT_AUTHORIZED));
        assert_eq!(mount_for("t/%u/", "c", Some("x/y")), Err(ReasonCode::NOT_AUTHORIZED));
        assert_eq!(mount_for("fixed/", "a/b", None), Ok("fixed/".into()), "no placeholder, nothing to check");
    }

    #[test]
    fn filters_mount_inside_a_share_group_and_topics_unmount() {
        assert_eq!(mounted_filter("m/", "cmd/#"), "m/cmd/#");
        assert_eq!(mounted_filter("m/", "$share/g/jobs/+"), "$share/g/m/jobs/+");
        assert_eq!(mounted_filter("m/", "$share/g"), "$share/g", "left invalid");
        assert_eq!(unmounted(Some("m/"), "m/cmd/x"), "cmd/x");
        assert_eq!(unmounted(Some("m/"), "other/x"), "other/x");
        assert_eq!(unmounted(None, "m/cmd/x"), "m/cmd/x");
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::sync::Arc;
    use std::task::{Context, Poll, Waker};

    use tollgate_hooks::{ClientInfo, HookChain};
    use tollgate_protocol::ProtocolVersion;

    use super::{Signal, next_signal};
    use crate::message::ClientId;
    use crate::{Broker, BrokerConfig};

    fn client() -> Arc<ClientInfo> {
        Arc::new(ClientInfo {
            client_id: "c".into(),
            username: None,
            protocol: ProtocolVersion::V5,
            remote_addr: None,
            listener: "test".into(),
            peer: None,
            attributes: Arc::default(),
        })
    }

    fn poll<F: Future<Output = Signal>>(future: std::pin::Pin<&mut F>) -> Option<Signal> {
        match future.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(signal) => Some(signal),
            Poll::Pending => None,
        }
    }

    fn broker_with_session() -> (Broker, crate::session::SessionRef) {
        let broker = Broker::new(BrokerConfig::default(), HookChain::default());
        let id = ClientId("c".into());
        let opened = broker.sessions().open(&id, true, &mut || broker.new_session(id.clone(), 0));
        (broker, opened.session)
    }

    #[test]
    fn a_takeover_reaches_a_waiting_connection_and_one_that_has_not_waited_yet() {
        let (broker, session) = broker_with_session();
        let first = session.attach(client());
        let mut waiting = pin!(next_signal(&session, &broker, first));
        assert!(poll(waiting.as_mut()).is_none(), "nothing happened yet");
        let second = session.attach(client());
        assert!(matches!(poll(waiting.as_mut()), Some(Signal::Kicked)));
        // A connection that had not started waiting when it was taken over sees it on its first wait.
        assert!(matches!(poll(pin!(next_signal(&session, &broker, first))), Some(Signal::Kicked)));
        // The new connection is not affected, and deliveries still wake it.
        let mut current = pin!(next_signal(&session, &broker, second));
        assert!(poll(current.as_mut()).is_none());
        session.wakeup.notify_one();
        assert!(matches!(poll(current.as_mut()), Some(Signal::Woken)));
    }

    #[test]
    fn a_revocation_and_a_shutdown_wake_the_connection() {
        let (broker, session) = broker_with_session();
        let generation = session.attach(client());
        let mut waiting = pin!(next_signal(&session, &broker, generation));
        assert!(poll(waiting.as_mut()).is_none());
        session.revoke(tollgate_protocol::ReasonCode::NOT_AUTHORIZED);
        assert!(matches!(poll(waiting.as_mut()), Some(Signal::Kicked)));

        let (broker, session) = broker_with_session();
        let generation = session.attach(client());
        let mut waiting = pin!(next_signal(&session, &broker, generation));
        assert!(poll(waiting.as_mut()).is_none());
        broker.shutdown();
        assert!(matches!(poll(waiting.as_mut()), Some(Signal::Shutdown)));
        assert!(matches!(poll(pin!(next_signal(&session, &broker, generation))), Some(Signal::Shutdown)));
    }
}
