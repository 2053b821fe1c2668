//! Tollgate's transports. Each listener accepts TCP and, by its kind, serves MQTT over it directly, over TLS
//! (optionally with client certificates), over WebSockets or over WebSockets in TLS. Connection limits apply before
//! any handshake work is done, and every handshake is bounded by the CONNECT deadline.
//!
//! The core knows nothing of TLS or WebSockets: it serves any byte stream and receives the client's certificate
//! identity, already verified, in its `ConnectionContext`.

pub mod identity;
pub mod limits;
pub mod tls;
pub mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use futures_util::future::Either;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tollgate_core::Broker;
use tollgate_core::connection::{ConnectionContext, serve};
use tollgate_protocol::{ConnAck, Packet, ProtocolVersion, ReasonCode};
use tracing::{debug, info, warn};

pub use identity::{IdentitySource, peer_identity};
pub use limits::{Admission, ConnectionLimits};
pub use tls::{ReloadableTls, TlsSettings};

/// The transport layer's errors: all of them are configuration problems found at start or reload.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("{}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    #[error("TLS: {0}")]
    Tls(rustls::Error),
    #[error("{0}")]
    Config(String),
}

/// How bytes reach the MQTT codec on one listener.
#[derive(Clone)]
pub enum Transport {
    Tcp,
    Tls(Arc<ReloadableTls>),
    Ws { path: Arc<str> },
    Wss { tls: Arc<ReloadableTls>, path: Arc<str> },
}

impl Transport {
    pub fn tls(&self) -> Option<&Arc<ReloadableTls>> {
        match self {
            Self::Tls(tls) | Self::Wss { tls, .. } => Some(tls),
            Self::Tcp | Self::Ws { .. } => None,
        }
    }
}

/// One configured listener, shared by the workers that accept on it.
pub struct ListenerSpec {
    pub name: Arc<str>,
    pub transport: Transport,
    pub identity_from: IdentitySource,
    /// Mosquitto's `use_identity_as_username`: the certificate identity replaces the CONNECT user name and
    /// authenticates the client.
    pub use_identity_as_username: bool,
    /// `mount_point`: the topic prefix of this listener's clients (`%c`, `%u` filled in per client).
    pub mount_point: Option<Arc<str>>,
    pub limits: Arc<ConnectionLimits>,
    /// This listener's own connection cap (0 = none); the total cap lives in `limits`.
    pub max_connections: usize,
    pub open_connections: Arc<std::sync::atomic::AtomicUsize>,
    /// The connection runtimes, indexed like the `worker` argument of [`serve_listener`].
    pub workers: Arc<[tokio::runtime::Handle]>,
}

/// Accepts until shutdown and serves each connection on the runtime this runs on. Failed accepts (usually
/// descriptor exhaustion) back off exponentially instead of spinning.
///
/// The server runs one of these per listener on every connection runtime, all accepting from the same socket, so
/// a connection is served by the thread that accepted it (see `ARCHITECTURE.md`, "Runtimes").
pub async fn serve_listener(broker: Broker, listener: TcpListener, spec: Arc<ListenerSpec>, worker: usize) {
    let shutdown = broker.shutdown_token();
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((stream, remote_addr)) => {
                backoff = Duration::from_millis(5);
                // Hand the connection to its address's home worker or a less loaded one (see
                // `ConnectionLimits::placement`); a tokio socket belongs to the runtime that registered it, so it
                // crosses as a std socket.
                let target =
                    spec.limits.placement(worker, remote_addr.ip()).filter(|&target| target < spec.workers.len());
                let serving = target.unwrap_or(worker);
                let admission =
                    match spec.limits.admit(remote_addr.ip(), &spec.open_connections, spec.max_connections, serving) {
                        Ok(admission) => admission,
                        Err(refusal) => {
                            debug!(listener = %spec.name, remote = %remote_addr, %refusal, "connection refused");
                            // A plain TCP client is told why (CONNACK 0x97 or 0x9F, 3.1.1: 0x03) while few are
                            // being told; otherwise, and on TLS and WebSocket listeners where an answer would
                            // need a handshake first, the socket is closed before any work.
                            if matches!(spec.transport, Transport::Tcp)
                                && let Some(slot) = spec.limits.answer_refusal()
                            {
                                broker.spawn(answer_refusal(stream, refusal.reason_code(), slot));
                            }
                            continue;
                        }
                    };
                let _ = stream.set_nodelay(true);
                match target {
                    Some(target) => {
                        let runtime = &spec.workers[target];
                        let Ok(std_stream) = stream.into_std() else { continue };
                        // Registered with the target's reactor from here, so the task spawned there is the same
                        // (small) one as for a connection served where it was accepted.
                        let registered = {
                            let _target_context = runtime.enter();
                            TcpStream::from_std(std_stream)
                        };
                        let Ok(stream) = registered else { continue };
                        let connection = serve_connection(broker.clone(), stream, remote_addr, spec.clone(), admission);
                        broker.spawn_on(runtime, connection);
                    }
                    None => {
                        broker.spawn(serve_connection(broker.clone(), stream, remote_addr, spec.clone(), admission));
                    }
                }
            }
            Err(error) => {
                warn!(listener = %spec.name, %error, ?backoff, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// How long a refused client has to send its CONNECT before it is closed unanswered.
const REFUSAL_CONNECT_WAIT: Duration = Duration::from_millis(500);
/// The largest CONNECT a refused client may send to get its answer.
const REFUSAL_MAX_CONNECT: usize = 4096;

/// Reads the refused client's CONNECT (to learn its protocol version) and answers with a CONNACK carrying
/// `reason` (MQTT 5) or 0x03 Server unavailable (3.1.1), then closes.
async fn answer_refusal(mut stream: TcpStream, reason: ReasonCode, _slot: limits::RefusalSlot) {
    let mut buffer = BytesMut::with_capacity(512);
    let read_connect = async {
        loop {
            match tollgate_protocol::decode_packet(&mut buffer, ProtocolVersion::V311, REFUSAL_MAX_CONNECT) {
                Ok(Some(Packet::Connect(connect))) => return Some(connect.protocol),
                Ok(Some(_)) | Err(_) => return None,
                Ok(None) => {}
            }
            match stream.read_buf(&mut buffer).await {
                Ok(read) if read > 0 => {}
                _ => return None,
            }
        }
    };
    let Ok(Some(version)) = tokio::time::timeout(REFUSAL_CONNECT_WAIT, read_connect).await else {
        return;
    };
    let reason_code = if version.is_v5() { reason } else { ReasonCode::SERVER_UNAVAILABLE };
    let connack = Packet::ConnAck(ConnAck { session_present: false, reason_code, properties: Default::default() });
    let mut out = BytesMut::new();
    if tollgate_protocol::encode_packet(&connack, version, &mut out).is_err() {
        return;
    }
    // Closing with unread input would reset the connection and could discard the CONNACK before the client reads
    // it: send it, end our side, and drain what the client still sends until it closes too (briefly).
    let _ = tokio::time::timeout(REFUSAL_CONNECT_WAIT, async {
        stream.write_all(&out).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 512];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

/// The task of one accepted connection. Not an `async fn`, whose future would keep its arguments for the
/// connection's whole life: a plain TCP connection's task is `serve`'s future plus the admission, nothing else.
/// The other transports are boxed: inline, every connection's task would be as large as the largest of them (TLS
/// session plus WebSocket state), which would triple the memory of an idle plain TCP client.
fn serve_connection(
    broker: Broker,
    stream: TcpStream,
    remote_addr: SocketAddr,
    spec: Arc<ListenerSpec>,
    admission: Admission,
) -> impl Future<Output = ()> + Send + 'static {
    let context = ConnectionContext {
        listener: spec.name.clone(),
        remote_addr: Some(remote_addr),
        peer: None,
        identity_username: None,
        mount_point: spec.mount_point.clone(),
    };
    // The TLS and WebSocket handshakes count against the CONNECT deadline: a client that stalls in them is a
    // slowloris like any other.
    let deadline = tokio::time::Instant::now() + broker.config().connect_timeout;
    let max_packet = broker.config().max_packet_size as usize;
    // The admission is held until the connection ends: it is what the connection caps count.
    let boxed: Pin<Box<dyn Future<Output = ()> + Send>> = match spec.transport.clone() {
        Transport::Tcp => return Either::Left(serve(broker, stream, context).map(move |()| drop(admission))),
        Transport::Ws { path } => Box::pin(async move {
            let _admission = admission;
            let Some(stream) = upgrade(stream, &path, max_packet, deadline, &spec, remote_addr).await else {
                return;
            };
            serve(broker, stream, context).await;
        }),
        Transport::Tls(tls) => Box::pin(async move {
            let _admission = admission;
            let Some((stream, context)) = tls_handshake(stream, &tls, context, deadline, &spec).await else {
                return;
            };
            serve(broker, stream, context).await;
        }),
        Transport::Wss { tls, path } => Box::pin(async move {
            let _admission = admission;
            let Some((stream, context)) = tls_handshake(stream, &tls, context, deadline, &spec).await else {
                return;
            };
            let Some(stream) = upgrade(stream, &path, max_packet, deadline, &spec, remote_addr).await else {
                return;
            };
            serve(broker, stream, context).await;
        }),
    };
    Either::Right(boxed)
}

async fn upgrade<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    path: &str,
    max_packet: usize,
    deadline: tokio::time::Instant,
    spec: &ListenerSpec,
    remote_addr: SocketAddr,
) -> Option<ws::WsStream<S>> {
    // A frame can hold a whole packet plus its header; leave room for both.
    match tokio::time::timeout_at(deadline, ws::accept(stream, path, max_packet.saturating_add(16))).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(reason)) => {
            info!(listener = %spec.name, remote = %remote_addr, %reason, "WebSocket connection refused");
            None
        }
        Err(_) => {
            info!(listener = %spec.name, remote = %remote_addr, "WebSocket upgrade not completed before the CONNECT deadline");
            None
        }
    }
}

async fn tls_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    tls: &ReloadableTls,
    mut context: ConnectionContext,
    deadline: tokio::time::Instant,
    spec: &ListenerSpec,
) -> Option<(tokio_rustls::server::TlsStream<S>, ConnectionContext)> {
    let remote = context.remote_addr;
    let stream = match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            // rustls names the cause: unknown issuer, expired, revoked, unsupported protocol version, ...
            info!(listener = %spec.name, remote = ?remote, reason = %error, "TLS handshake refused");
            return None;
        }
        Err(_) => {
            info!(listener = %spec.name, remote = ?remote, "TLS handshake not completed before the CONNECT deadline");
            return None;
        }
    };
    let certificate = stream.get_ref().1.peer_certificates().and_then(|chain| chain.first());
    if let Some(certificate) = certificate {
        match peer_identity(certificate.as_ref()) {
            Some(peer) => {
                let identity = spec.identity_from.select(&peer);
                debug!(listener = %spec.name, remote = ?remote, subject = %peer.subject, identity = ?identity, "client certificate verified");
                if spec.use_identity_as_username {
                    context.identity_username = identity.map(Into::into);
                }
                context.peer = Some(Arc::new(peer));
            }
            None => warn!(listener = %spec.name, remote = ?remote, "verified client certificate could not be parsed"),
        }
    }
    if spec.use_identity_as_username && context.identity_username.is_none() {
        info!(
            listener = %spec.name,
            remote = ?remote,
            identity_from = %spec.identity_from,
            "connection refused: use_identity_as_username is set and the client certificate carries no such identity"
        );
        return None;
    }
    Some((stream, context))
}
