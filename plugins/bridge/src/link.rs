//! The bridge's connection to the remote broker: connect (TCP or TLS), CONNECT, subscribe to the incoming
//! mappings, then move messages both ways until the link drops or the broker shuts down; reconnect with backoff.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tollgate_core::{Broker, Delivery, LocalClient, Message, Unfinished};
use tollgate_hooks::{RouteDecision, RouteDirection, TransformOutcome};
use tollgate_protocol::{
    Ack, Connect, Disconnect, LastWill, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS, ReasonCode,
    Subscribe, Subscription, SubscriptionOptions, UserProperty, decode_packet, encode_packet, topic,
};
use tracing::{debug, info, warn};

use crate::journal::{AckPolicy, FsyncPolicy, Journal, SharedJournal};
use crate::{BridgeError, BridgeSettings, BridgeStats, Priority, TlsSettings, TopicMapping, state_topic};

/// A link up this long is healthy: the next reconnect starts again from the shortest wait.
const STABLE: Duration = Duration::from_secs(60);
/// Deliveries taken from the local queue per wake-up.
const BATCH: usize = 64;
/// The spooler's window on the local queue: it completes each message as soon as it is appended.
const SPOOL_WINDOW: usize = 1024;
const SPOOL_BATCH: usize = 256;

pub(crate) struct Tls {
    config: Arc<ClientConfig>,
    /// The configured name; unset, each address's host.
    server_name: Option<ServerName<'static>>,
}

impl Tls {
    fn server_name(&self, address: &str) -> Result<ServerName<'static>, String> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => ServerName::try_from(host_of(address).to_owned())
                .map_err(|error| format!("TLS server name {:?}: {error}", host_of(address))),
        }
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A TCP stream to `address` through an HTTP proxy's `CONNECT` tunnel. The proxy's answer is read a byte at a
/// time up to its blank line, so nothing the remote sends after it is taken from the stream.
async fn through_proxy(proxy: &crate::Proxy, address: &str) -> Result<TcpStream, String> {
    use base64::Engine;
    let mut tcp = TcpStream::connect(&proxy.address)
        .await
        .map_err(|error| format!("proxy {}: connect: {error}", proxy.address))?;
    let mut request = format!("CONNECT {address} HTTP/1.1\r\nHost: {address}\r\n");
    if let Some(credentials) = &proxy.credentials {
        let token = base64::engine::general_purpose::STANDARD.encode(credentials);
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    tcp.write_all(request.as_bytes()).await.map_err(|error| format!("proxy {}: {error}", proxy.address))?;
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() >= 8 * 1024 {
            return Err(format!("proxy {}: an answer of more than 8 KiB", proxy.address));
        }
        let byte = tcp.read_u8().await.map_err(|error| format!("proxy {}: {error}", proxy.address))?;
        answer.push(byte);
    }
    let text = String::from_utf8_lossy(&answer);
    let status = text.lines().next().unwrap_or_default();
    match status.split_whitespace().nth(1) {
        Some(code) if code.starts_with('2') => Ok(tcp),
        _ => Err(format!("proxy {} refused the tunnel to {address}: {status}", proxy.address)),
    }
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

pub(crate) fn client_config(bridge: &str, addresses: &[&str], settings: &TlsSettings) -> Result<Tls, BridgeError> {
    let file_error = |path: &std::path::Path, reason: String| BridgeError::File {
        bridge: bridge.into(),
        path: path.to_owned(),
        reason,
    };
    let tls_error = |reason: String| BridgeError::Tls { bridge: bridge.into(), reason };
    let read_chain = |path: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, BridgeError> {
        let chain = CertificateDer::pem_file_iter(path)
            .map_err(|error| file_error(path, error.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| file_error(path, error.to_string()))?;
        if chain.is_empty() {
            return Err(file_error(path, "no PEM certificate in the file".into()));
        }
        Ok(chain)
    };
    let mut roots = rustls::RootCertStore::empty();
    for certificate in read_chain(&settings.ca_file)? {
        roots.add(certificate).map_err(|error| file_error(&settings.ca_file, error.to_string()))?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|error| tls_error(error.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&settings.cert, &settings.key) {
        (Some(cert), Some(key)) => {
            let chain = read_chain(cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|error| file_error(key, error.to_string()))?;
            builder.with_client_auth_cert(chain, key).map_err(|error| tls_error(error.to_string()))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(tls_error("a client certificate needs both cert and key".into())),
    };
    let server_name = match &settings.server_name {
        Some(host) => Some(
            ServerName::try_from(host.clone()).map_err(|error| tls_error(format!("server name {host:?}: {error}")))?,
        ),
        None => None,
    };
    config.alpn_protocols = settings.alpn.iter().map(|protocol| protocol.as_bytes().to_vec()).collect();
    let tls = Tls { config: Arc::new(config), server_name };
    for address in addresses {
        tls.server_name(address).map_err(tls_error)?;
    }
    Ok(tls)
}

impl BridgeStats {
    fn note_backlog(&self, (queued, inflight): (usize, usize)) -> (usize, usize) {
        self.queued.store(queued as u64, std::sync::atomic::Ordering::Relaxed);
        self.inflight.store(inflight as u64, std::sync::atomic::Ordering::Relaxed);
        (queued, inflight)
    }
}

fn publish_state(broker: &Broker, name: &str, connected: bool) {
    let state = if connected { "connected" } else { "disconnected" };
    broker.publish_local(&state_topic(name), state, QoS::AtMostOnce, true);
}

/// The bridge's retained state on the remote. QoS 0: no packet id to keep apart from the forwarded messages',
/// and the will covers a lost `online` going stale.
fn remote_status(topic: &str, state: &'static [u8], retain: bool) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain,
        topic: topic.into(),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from_static(state),
    })
}

/// A wait of 75–100% of `delay`, so bridges that lost the same remote do not all return at once.
fn jittered(delay: Duration) -> Duration {
    let noise =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.subsec_nanos());
    delay.mul_f64(0.75 + f64::from(noise % 1000) / 4000.0)
}

/// `max_send_rate` as a token bucket over the messages sent, a tenth of a second deep (at least one message), so
/// even a day's backlog leaves at the configured pace rather than in bursts a cloud would throttle.
struct Pace {
    per_second: f64,
    tokens: f64,
    depth: f64,
    refilled: Instant,
}

impl Pace {
    fn new(per_second: u32) -> Option<Pace> {
        (per_second > 0).then(|| {
            let per_second = f64::from(per_second);
            let depth = (per_second / 10.0).max(1.0);
            Pace { per_second, tokens: depth, depth, refilled: Instant::now() }
        })
    }

    /// Messages that may go now.
    fn available(&mut self) -> usize {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + earned).min(self.depth);
        self.refilled = now;
        self.tokens as usize
    }

    fn spend(&mut self, messages: usize) {
        self.tokens -= messages as f64;
    }

    /// When the next whole message is earned.
    fn next_at(&self) -> Instant {
        let missing = (1.0 - self.tokens).max(0.0);
        self.refilled + Duration::from_secs_f64(missing / self.per_second)
    }
}

/// How a link ended.
enum LinkEnd {
    Shutdown,
    Lost(String),
}

/// Where messages for the remote wait, and what is in flight on the link.
enum Egress {
    /// In the local client's own queue, in memory; its packet ids are the link's.
    Memory {
        /// With `message_id_property`: the id each message in flight was first sent with, for its resends.
        ids: HashMap<PacketId, u64>,
        next_id: u64,
        instance: String,
    },
    /// In journals on disk (one per lane, drained in order: high priority first), which the spooler fills from
    /// the local client; link packet ids map to a lane and an offset.
    Disk { lanes: Vec<Lane>, ready: Arc<Notify>, inflight: HashMap<PacketId, (usize, u64)>, next_packet_id: PacketId },
}

/// One journal of the disk queue, as the link reads it.
struct Lane {
    journal: SharedJournal,
    /// Records below this offset were sent on an earlier link: they go again marked DUP (and are not counted as
    /// sent twice).
    resend_below: u64,
    /// The journal's, for message ids (`<instance>-<offset>`).
    instance: String,
}

impl Egress {
    fn backlog(&self, local: &LocalClient) -> (usize, usize) {
        match self {
            Egress::Memory { .. } => local.backlog(),
            Egress::Disk { lanes, inflight, .. } => {
                let waiting: u64 = lanes.iter().map(|lane| lock(&lane.journal).counts().messages).sum();
                ((waiting as usize).saturating_sub(inflight.len()), inflight.len())
            }
        }
    }

    /// The id of a message from the memory queue (`message_id_property`): the one it was first sent with, or a
    /// new one. `None` without the property, or from the disk queue (whose ids are offsets).
    fn memory_id(&mut self, settings: &BridgeSettings, packet_id: Option<PacketId>) -> Option<String> {
        settings.message_id_property.as_ref()?;
        let Egress::Memory { ids, next_id, instance } = self else { return None };
        let mut fresh = || {
            *next_id += 1;
            *next_id - 1
        };
        let number = match packet_id {
            Some(packet_id) => *ids.entry(packet_id).or_insert_with(fresh),
            None => fresh(),
        };
        Some(format!("{instance}-{number}"))
    }

    /// The remote is done with the message sent under `packet_id`.
    fn settle(&mut self, local: &LocalClient, packet_id: PacketId) {
        match self {
            Egress::Memory { ids, .. } => {
                ids.remove(&packet_id);
                local.complete(packet_id);
            }
            Egress::Disk { lanes, inflight, .. } => {
                if let Some((lane, offset)) = inflight.remove(&packet_id)
                    && let Some(lane) = lanes.get(lane)
                    && let Err(error) = lock(&lane.journal).settle(offset)
                {
                    warn!(%error, "bridge journal: cannot record an acknowledgement");
                }
            }
        }
    }
}

fn lock(journal: &SharedJournal) -> std::sync::MutexGuard<'_, Journal> {
    journal.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What every step of a link needs.
struct Context<'a> {
    broker: &'a Broker,
    settings: &'a BridgeSettings,
    local: &'a LocalClient,
    stats: &'a BridgeStats,
}

/// The bridge's task: reconnects until `shutdown` (the broker's shutdown, or this bridge being stopped).
pub(crate) async fn run(
    broker: Broker,
    settings: Arc<BridgeSettings>,
    tls: Option<Tls>,
    stats: Arc<BridgeStats>,
    journals: Vec<Journal>,
    shutdown: CancellationToken,
) {
    let name = settings.name.as_str();
    let client_id = format!("$bridge/{name}");
    let durable = !journals.is_empty();
    let local = Arc::new(match settings.queue.as_ref().map(|queue| queue.ack) {
        Some(AckPolicy::AfterDurable) if durable => broker.durable_local_client(&client_id),
        _ => broker.local_client(&client_id),
    });
    for mapping in settings.topics.iter().filter(|mapping| mapping.sends_out()) {
        let options =
            SubscriptionOptions { qos: mapping.qos, no_local: true, retain_as_published: true, retain_handling: 0 };
        if let Err(error) = local.subscribe(&mapping.local_filter(), options) {
            warn!(bridge = name, %error, "bridge mapping not subscribed");
        }
    }
    publish_state(&broker, name, false);
    let mut spooler = None;
    let mut egress = if journals.is_empty() {
        Egress::Memory { ids: HashMap::new(), next_id: 1, instance: crate::instance_id() }
    } else {
        let journals: Vec<SharedJournal> =
            journals.into_iter().map(|journal| Arc::new(std::sync::Mutex::new(journal))).collect();
        let ready = Arc::new(Notify::new());
        let fsync = settings.queue.as_ref().map_or(FsyncPolicy::Never, |queue| queue.fsync);
        // With two lanes the first is the high one: what a high-priority mapping takes goes there.
        let high_filters: Vec<String> = settings
            .topics
            .iter()
            .filter(|mapping| journals.len() > 1 && mapping.sends_out() && mapping.priority == Priority::High)
            .map(TopicMapping::local_filter)
            .collect();
        spooler = Some(broker.spawn(spool(
            local.clone(),
            journals.clone(),
            high_filters,
            ready.clone(),
            stats.clone(),
            settings.name.clone(),
            fsync,
            shutdown.clone(),
        )));
        let lanes = journals
            .into_iter()
            .map(|journal| {
                let instance = lock(&journal).instance().to_owned();
                Lane { journal, resend_below: 0, instance }
            })
            .collect();
        Egress::Disk { lanes, ready, inflight: HashMap::new(), next_packet_id: 1 }
    };
    // QoS 2 messages from the remote acknowledged with PUBREC and not yet released: kept across links, as the
    // remote keeps its side in the bridge's session.
    let mut incoming_qos2 = HashSet::new();
    let mut delay = settings.reconnect_min;
    let cx = Context { broker: &broker, settings: &settings, local: &local, stats: &stats };
    let addresses = settings.addresses();
    'bridge: loop {
        // The primary first, then each fallback in turn; after a link ends, the primary again.
        let mut linked = None;
        for address in &addresses {
            let attempt = tokio::select! {
                attempt = connect(&broker, &settings, address, tls.as_ref()) => attempt,
                () = shutdown.cancelled() => break 'bridge,
            };
            match attempt {
                Ok(link) => {
                    linked = Some((*address, link));
                    break;
                }
                Err(reason) => warn!(bridge = name, address, %reason, "bridge cannot connect"),
            }
        }
        match linked {
            Some((address, link)) => {
                let up_since = Instant::now();
                if !link.session_present {
                    incoming_qos2.clear();
                }
                stats.connected.store(true, std::sync::atomic::Ordering::Relaxed);
                BridgeStats::bump(&stats.connects);
                publish_state(&broker, name, true);
                info!(bridge = name, address, "bridge connected");
                // On a fallback address, the primary is probed every `primary_retry` and taken back when it answers.
                let primary = (address != settings.address && !settings.primary_retry.is_zero())
                    .then(|| (settings.address.as_str(), settings.primary_retry));
                let end = link.serve(&cx, &mut egress, &shutdown, &mut incoming_qos2, primary).await;
                stats.connected.store(false, std::sync::atomic::Ordering::Relaxed);
                publish_state(&broker, name, false);
                match end {
                    LinkEnd::Shutdown => {
                        info!(bridge = name, "bridge link closed: the bridge is stopping");
                        break 'bridge;
                    }
                    LinkEnd::Lost(reason) => {
                        let (queued, inflight) = stats.note_backlog(egress.backlog(&local));
                        warn!(bridge = name, %reason, queued, inflight, "bridge link lost");
                    }
                }
                if up_since.elapsed() >= STABLE {
                    delay = settings.reconnect_min;
                }
            }
            None => warn!(bridge = name, retry_in = ?delay, "bridge: no remote address answered"),
        }
        tokio::select! {
            () = sleep(jittered(delay)) => {}
            () = shutdown.cancelled() => break 'bridge,
        }
        delay = (delay * 2).min(settings.reconnect_max);
    }
    // The spooler puts what is still in the local queue into the journal first; then the last acknowledgements.
    if let Some(spooler) = spooler {
        let _ = spooler.await;
    }
    if let Egress::Disk { lanes, .. } = &egress {
        sync_all(lanes.iter().map(|lane| &lane.journal), name, "final sync");
    }
}

/// Syncs each journal (and writes its commit offset); a failure is logged, naming `when`, and the rest still go.
fn sync_all<'a>(journals: impl IntoIterator<Item = &'a SharedJournal>, name: &str, when: &str) {
    for journal in journals {
        if let Err(error) = lock(journal).sync() {
            warn!(bridge = name, %error, "bridge journal: {when} failed");
        }
    }
}

/// Takes the bridge's local queue as it fills and appends it to the journals, linked or not, so what waits for
/// the remote is on disk rather than in memory; wakes the link. A message a high-priority mapping takes goes to
/// the first journal (`high_filters` is empty with one). Syncs the journals on the configured interval.
#[allow(clippy::too_many_arguments)]
async fn spool(
    local: Arc<LocalClient>,
    journals: Vec<SharedJournal>,
    high_filters: Vec<String>,
    ready: Arc<Notify>,
    stats: Arc<BridgeStats>,
    name: String,
    fsync: FsyncPolicy,
    shutdown: CancellationToken,
) {
    let mut completed = Vec::with_capacity(SPOOL_BATCH);
    let mut receipts = Vec::with_capacity(SPOOL_BATCH);
    let normal = journals.len() - 1;
    let mut append = |batch: Vec<(Delivery, Option<PacketId>)>| {
        let mut locked: Vec<_> = journals.iter().map(lock).collect();
        for (mut delivery, packet_id) in batch {
            completed.extend(packet_id);
            receipts.extend(delivery.receipt.take());
            let message = Message { qos: delivery.qos, retain: delivery.retain, ..Message::clone(&delivery.message) };
            let high = high_filters.iter().any(|filter| topic::matches(filter, &message.topic));
            let journal = &mut locked[if high { 0 } else { normal }];
            match journal.append(&message) {
                Ok(0) => {}
                Ok(dropped) => warn!(bridge = %name, dropped, "bridge journal full: its oldest messages were dropped"),
                Err(error) => {
                    BridgeStats::bump(&stats.journal_failures);
                    warn!(bridge = %name, %error, topic = %message.topic, "bridge journal: cannot append; message lost");
                }
            }
        }
        for journal in &mut locked {
            if let Err(error) = journal.flush_appends() {
                BridgeStats::bump(&stats.journal_failures);
                warn!(bridge = %name, %error, "bridge journal: fsync failed; the batch may not survive a power cut");
            }
        }
        // Only now is the batch the journal's: the local queue lets go of it, and its publishers are answered
        // (with `ack = after_durable`, their PUBACKs waited for these receipts).
        for packet_id in completed.drain(..) {
            local.complete(packet_id);
        }
        receipts.clear();
        let (mut messages, mut dropped_overflow, mut expired) = (0, 0, 0);
        for journal in &locked {
            let counts = journal.counts();
            (messages, dropped_overflow, expired) =
                (messages + counts.messages, dropped_overflow + counts.dropped_overflow, expired + counts.expired);
        }
        stats.dropped_overflow.store(dropped_overflow, std::sync::atomic::Ordering::Relaxed);
        stats.expired.store(expired, std::sync::atomic::Ordering::Relaxed);
        let inflight = stats.inflight.load(std::sync::atomic::Ordering::Relaxed);
        stats.queued.store(messages.saturating_sub(inflight), std::sync::atomic::Ordering::Relaxed);
        drop(locked);
        ready.notify_one();
    };
    let mut tick = tokio::time::interval(match fsync {
        FsyncPolicy::Interval(every) => every,
        // The commit offset is written on this tick whatever the policy.
        FsyncPolicy::Always | FsyncPolicy::Never => Duration::from_secs(1),
    });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            batch = local.next_batch(SPOOL_WINDOW, SPOOL_BATCH) => append(batch),
            _ = tick.tick() => sync_all(&journals, &name, "sync"),
            () = shutdown.cancelled() => break,
        }
    }
    // Whatever reached the local queue before the shutdown goes to disk too.
    loop {
        let batch = local.try_batch(SPOOL_WINDOW, SPOOL_BATCH);
        if batch.is_empty() {
            break;
        }
        append(batch);
    }
    sync_all(&journals, &name, "sync at shutdown");
}

struct Link {
    stream: Box<dyn Io>,
    read: BytesMut,
    write: BytesMut,
    version: ProtocolVersion,
    max_packet: usize,
    /// The remote's limits from CONNACK.
    remote_max_packet: usize,
    remote_receive_maximum: u16,
    /// CONNACK's Maximum QoS and Retain Available (MQTT 5): sending above either is a protocol error that the
    /// remote answers with a DISCONNECT [MQTT-3.2.2-11, MQTT-3.2.2-14] (AWS IoT Core takes QoS 1 at most).
    remote_max_qos: QoS,
    remote_retain: bool,
    session_present: bool,
}

async fn connect(broker: &Broker, settings: &BridgeSettings, address: &str, tls: Option<&Tls>) -> Result<Link, String> {
    let attempt = async {
        let tcp = match &settings.proxy {
            None => TcpStream::connect(address).await.map_err(|error| format!("connect: {error}"))?,
            Some(proxy) => through_proxy(proxy, address).await?,
        };
        // Small acknowledgements must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let stream: Box<dyn Io> = match tls {
            Some(tls) => Box::new(
                TlsConnector::from(tls.config.clone())
                    .connect(tls.server_name(address)?, tcp)
                    .await
                    .map_err(|error| format!("TLS: {error}"))?,
            ),
            None => Box::new(tcp),
        };
        let max_packet = broker.config().max_packet_size as usize;
        let mut link = Link {
            stream,
            read: BytesMut::with_capacity(8 * 1024),
            write: BytesMut::with_capacity(8 * 1024),
            version: settings.protocol,
            max_packet,
            remote_max_packet: max_packet,
            remote_receive_maximum: u16::MAX,
            remote_max_qos: QoS::ExactlyOnce,
            remote_retain: true,
            session_present: false,
        };
        let v5 = settings.protocol.is_v5();
        let properties = Properties {
            session_expiry_interval: v5
                .then(|| u32::try_from(settings.session_expiry.as_secs()).unwrap_or(u32::MAX))
                .filter(|seconds| *seconds > 0),
            maximum_packet_size: v5.then(|| u32::try_from(max_packet).unwrap_or(u32::MAX)),
            ..Properties::default()
        };
        link.queue(&Packet::Connect(Box::new(Connect {
            protocol: settings.protocol,
            clean_start: settings.clean_start,
            keep_alive: u16::try_from(settings.keep_alive.as_secs()).unwrap_or(u16::MAX),
            client_id: settings.client_id.clone(),
            username: settings.username.clone(),
            password: settings.password.clone().map(Into::into),
            will: settings.remote_status_topic.as_ref().map(|topic| LastWill {
                topic: topic.clone(),
                payload: Bytes::from_static(b"offline"),
                qos: QoS::AtLeastOnce,
                retain: true,
                properties: Properties::default(),
            }),
            properties,
            // Off by default: on MQTT 5 No Local does the job, and a remote that does not know the bit refuses.
            bridge: settings.try_private,
        })))?;
        link.flush().await?;
        let connack = match link.next_packet().await? {
            Packet::ConnAck(connack) => connack,
            other => return Err(format!("expected CONNACK, the remote sent {}", other.kind())),
        };
        if connack.reason_code.is_error() {
            let hint = if settings.try_private && connack.reason_code == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION {
                " (it may not accept try_private: set try_private = false)"
            } else {
                ""
            };
            return Err(format!(
                "the remote refused the connection: reason code 0x{:02X}{hint}",
                connack.reason_code.0
            ));
        }
        link.session_present = connack.session_present;
        if let Some(limit) = connack.properties.maximum_packet_size {
            link.remote_max_packet = link.remote_max_packet.min(limit as usize);
        }
        if let Some(limit) = connack.properties.receive_maximum {
            link.remote_receive_maximum = limit;
        }
        if let Some(qos) = connack.properties.maximum_qos.and_then(QoS::from_u8) {
            link.remote_max_qos = qos;
        }
        link.remote_retain = connack.properties.retain_available != Some(0);
        let subscriptions: Vec<Subscription> = settings
            .topics
            .iter()
            .filter(|mapping| mapping.takes_in())
            .map(|mapping| Subscription {
                filter: mapping.remote_filter(),
                // No Local: the remote must not send back what the bridge published to it. A 3.1.1 remote has no
                // such option; the configuration refuses mappings in both directions for it.
                options: SubscriptionOptions {
                    qos: mapping.qos,
                    no_local: v5,
                    retain_as_published: v5,
                    retain_handling: 0,
                },
            })
            .collect();
        if let Some(topic) = &settings.remote_status_topic {
            link.queue(&remote_status(topic, b"online", link.remote_retain))?;
        }
        if !subscriptions.is_empty() {
            link.queue(&Packet::Subscribe(Subscribe {
                packet_id: 1,
                subscriptions,
                properties: Properties::default(),
            }))?;
        }
        link.flush().await?;
        Ok(link)
    };
    timeout(settings.connect_timeout, attempt).await.map_err(|_| "timed out".to_owned())?
}

impl Link {
    fn queue(&mut self, packet: &Packet) -> Result<(), String> {
        encode_packet(packet, self.version, &mut self.write)
            .map(drop)
            .map_err(|error| format!("cannot encode {}: {error}", packet.kind()))
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.write.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.write).await.map_err(|error| format!("write: {error}"));
        self.write.clear();
        result?;
        self.stream.flush().await.map_err(|error| format!("write: {error}"))
    }

    async fn next_packet(&mut self) -> Result<Packet, String> {
        loop {
            if let Some(packet) = decode_packet(&mut self.read, self.version, self.max_packet)
                .map_err(|error| format!("malformed packet from the remote: {error}"))?
            {
                return Ok(packet);
            }
            if self.stream.read_buf(&mut self.read).await.map_err(|error| format!("read: {error}"))? == 0 {
                return Err("closed by the remote".into());
            }
        }
    }

    async fn serve(
        mut self,
        cx: &Context<'_>,
        egress: &mut Egress,
        shutdown: &CancellationToken,
        incoming_qos2: &mut HashSet<PacketId>,
        primary: Option<(&str, Duration)>,
    ) -> LinkEnd {
        let window = usize::from(cx.settings.max_inflight.min(self.remote_receive_maximum).max(1));
        let mut probe_due = primary.map(|(_, every)| Instant::now() + every);
        // A TCP connect to the primary, in its own task so the link is served meanwhile.
        let mut probe: Option<tokio::task::JoinHandle<bool>> = None;
        match egress {
            Egress::Memory { .. } => {
                // What was in flight when the last link dropped goes first, in its original order [MQTT-4.4.0-1].
                for unfinished in cx.local.unfinished() {
                    match unfinished {
                        Unfinished::Publish(packet_id, delivery) => {
                            self.forward_from_memory(cx, egress, &delivery, Some(packet_id), true).await;
                        }
                        Unfinished::Release(packet_id) => {
                            if let Err(reason) = self.queue(&Packet::PubRel(Ack::new(packet_id, ReasonCode::SUCCESS))) {
                                return LinkEnd::Lost(reason);
                            }
                        }
                    }
                }
            }
            Egress::Disk { lanes, inflight, .. } => {
                // Each journal is read again from its commit: what was unacknowledged goes first, in order.
                for lane in lanes.iter_mut() {
                    let reached = lock(&lane.journal).rewind();
                    lane.resend_below = lane.resend_below.max(reached);
                }
                inflight.clear();
            }
        }
        let keep_alive = cx.settings.keep_alive;
        let far = || Instant::now() + Duration::from_secs(86_400 * 365);
        let mut ping_due = if keep_alive.is_zero() { far() } else { Instant::now() + keep_alive };
        let mut awaiting_pong = false;
        let memory = matches!(egress, Egress::Memory { .. });
        let ready = match egress {
            Egress::Disk { ready, .. } => Some(ready.clone()),
            Egress::Memory { .. } => None,
        };
        let mut pace = Pace::new(cx.settings.max_send_rate);
        loop {
            let budget = pace.as_mut().map_or(usize::MAX, Pace::available);
            if let Egress::Disk { .. } = egress {
                match self.fill_from_journal(cx, egress, window, budget).await {
                    Ok(sent) => {
                        if let Some(pace) = pace.as_mut() {
                            pace.spend(sent);
                        }
                    }
                    Err(reason) => return LinkEnd::Lost(reason),
                }
            }
            let budget = pace.as_mut().map_or(usize::MAX, Pace::available);
            let paced_until = pace.as_ref().filter(|_| budget == 0).map(Pace::next_at);
            if let Err(reason) = self.flush().await {
                return LinkEnd::Lost(reason);
            }
            cx.stats.note_backlog(egress.backlog(cx.local));
            tokio::select! {
                () = shutdown.cancelled() => {
                    // A clean DISCONNECT discards the will: say `offline` first.
                    if let Some(topic) = &cx.settings.remote_status_topic {
                        let _ = self.queue(&remote_status(topic, b"offline", self.remote_retain));
                    }
                    let goodbye = Disconnect { reason_code: ReasonCode::NORMAL_DISCONNECTION, properties: Properties::default() };
                    if self.queue(&Packet::Disconnect(goodbye)).is_ok() {
                        let _ = timeout(Duration::from_secs(1), self.flush()).await;
                    }
                    return LinkEnd::Shutdown;
                }
                read = self.stream.read_buf(&mut self.read) => {
                    match read {
                        Ok(0) => return LinkEnd::Lost("closed by the remote".into()),
                        Ok(_) => {}
                        Err(error) => return LinkEnd::Lost(format!("read: {error}")),
                    }
                    loop {
                        let packet = match decode_packet(&mut self.read, self.version, self.max_packet) {
                            Ok(Some(packet)) => packet,
                            Ok(None) => break,
                            Err(error) => return LinkEnd::Lost(format!("malformed packet from the remote: {error}")),
                        };
                        if matches!(packet, Packet::PingResp) {
                            awaiting_pong = false;
                            continue;
                        }
                        if let Err(reason) = self.handle(cx, egress, packet, incoming_qos2).await {
                            return LinkEnd::Lost(reason);
                        }
                    }
                }
                batch = cx.local.next_batch(window, BATCH.min(budget)), if memory && budget > 0 => {
                    if let Some(pace) = pace.as_mut() {
                        pace.spend(batch.len());
                    }
                    for (delivery, packet_id) in batch {
                        self.forward_from_memory(cx, egress, &delivery, packet_id, false).await;
                    }
                }
                // The spooler appended: the loop's top reads the journal.
                () = async { if let Some(ready) = &ready { ready.notified().await } }, if !memory => {}
                // `max_send_rate` spent: the next message may go then.
                () = async { if let Some(at) = paced_until { sleep_until(at).await } }, if paced_until.is_some() => {}
                () = async { if let Some(at) = probe_due { sleep_until(at).await } }, if probe_due.is_some() && probe.is_none() => {
                    if let Some((address, every)) = primary {
                        let address = address.to_owned();
                        probe = Some(tokio::spawn(async move {
                            matches!(timeout(Duration::from_secs(5), TcpStream::connect(address)).await, Ok(Ok(_)))
                        }));
                        probe_due = Some(Instant::now() + every);
                    }
                }
                answered = async { if let Some(task) = probe.as_mut() { task.await.unwrap_or(false) } else { false } }, if probe.is_some() => {
                    probe = None;
                    if answered {
                        return LinkEnd::Lost("the primary address answers again: going back to it".into());
                    }
                }
                () = sleep_until(ping_due) => {
                    if awaiting_pong {
                        return LinkEnd::Lost("no PINGRESP within the keep-alive".into());
                    }
                    if let Err(reason) = self.queue(&Packet::PingReq) {
                        return LinkEnd::Lost(reason);
                    }
                    awaiting_pong = true;
                    ping_due = Instant::now() + keep_alive;
                }
            }
        }
    }

    /// Sends what the journal holds, while the in-flight window has room. Messages cross at QoS 1 at most: the
    /// journal is the bridge's side of the exchange, so QoS 2's extra round trip would add nothing.
    /// Sends one delivery of the memory queue (first or again), within the remote's Maximum QoS; what will not be
    /// acknowledged (not sent, or sent at QoS 0) is settled at once, so it does not hold a window slot.
    async fn forward_from_memory(
        &mut self,
        cx: &Context<'_>,
        egress: &mut Egress,
        delivery: &Delivery,
        packet_id: Option<PacketId>,
        resend: bool,
    ) {
        let qos = delivery.qos.min(self.remote_max_qos);
        let id = egress.memory_id(cx.settings, packet_id);
        let sent_with = packet_id.filter(|_| qos != QoS::AtMostOnce);
        let sent = self.forward(cx, &delivery.message, qos, delivery.retain, sent_with, resend, id).await;
        if (!sent || sent_with.is_none())
            && let Some(packet_id) = packet_id
        {
            egress.settle(cx.local, packet_id);
        }
    }

    /// Returns how many it took, at most `budget`.
    async fn fill_from_journal(
        &mut self,
        cx: &Context<'_>,
        egress: &mut Egress,
        window: usize,
        budget: usize,
    ) -> Result<usize, String> {
        let Egress::Disk { lanes, inflight, next_packet_id, .. } = egress else {
            return Ok(0);
        };
        let mut taken = 0;
        // Lanes in order: the next lane's messages go only when the ones before are all sent.
        for (index, lane) in lanes.iter_mut().enumerate() {
            let Lane { journal, resend_below, instance } = lane;
            while inflight.len() < window && taken < budget {
                let limit = (window - inflight.len()).min(budget - taken);
                let records = lock(journal).next(limit).map_err(|error| format!("journal: {error}"))?;
                if records.is_empty() {
                    break;
                }
                taken += records.len();
                for (offset, message) in records {
                    let qos = message.qos.min(QoS::AtLeastOnce).min(self.remote_max_qos);
                    let packet_id = (qos != QoS::AtMostOnce).then(|| allocate_packet_id(next_packet_id, inflight));
                    let resend = offset < *resend_below;
                    let id = cx.settings.message_id_property.as_ref().map(|_| format!("{instance}-{offset}"));
                    let sent = self.forward(cx, &message, qos, message.retain, packet_id, resend, id).await;
                    match packet_id {
                        Some(packet_id) if sent => {
                            inflight.insert(packet_id, (index, offset));
                        }
                        _ => lock(journal).settle(offset).map_err(|error| format!("journal: {error}"))?,
                    }
                }
            }
            if inflight.len() >= window || taken >= budget {
                break;
            }
        }
        Ok(taken)
    }

    /// Sends one message to the remote; false if it was not sent (a hook dropped it, or it cannot be encoded for
    /// the remote), so the caller settles it. `id` goes in the `message_id_property`, after the hooks.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &mut self,
        cx: &Context<'_>,
        message: &Message,
        qos: QoS,
        retain: bool,
        packet_id: Option<PacketId>,
        resend: bool,
        id: Option<String>,
    ) -> bool {
        let (broker, settings, stats) = (cx.broker, cx.settings, cx.stats);
        let now = Instant::now();
        let Some(mut remote_topic) = settings.topics.iter().find_map(|mapping| mapping.to_remote(&message.topic))
        else {
            // A mapping's filter took it but its prefix did not fit (cannot happen with valid mappings).
            debug!(bridge = %settings.name, topic = %message.topic, "no outgoing mapping fits; not sent");
            return false;
        };
        let expiry = message.remaining_expiry(now);
        let hooks = broker.hooks();
        let mut properties = Message::forwarded_properties(message.properties());
        properties.message_expiry_interval = expiry;
        let mut payload = message.payload.clone();
        let mut retain = retain;
        if !hooks.routers.is_empty() || hooks.has_outbound_transform() {
            let mut view = message.hook_view(expiry);
            view.topic = remote_topic.as_str().into();
            view.qos = qos;
            view.retain = retain;
            if !hooks.routers.is_empty() {
                match decide(&hooks, RouteDirection::Egress, settings, &view).await {
                    Some(topic) => {
                        view.topic = topic.as_str().into();
                        remote_topic = topic;
                    }
                    None => {
                        BridgeStats::bump(&stats.dropped_by_policy);
                        return false;
                    }
                }
            }
            // The bridge is this copy's subscriber: a `deliver` hook (msg-auth's `sign`) sees it as sent, after
            // the mapping and the route, so a signature covers the topic the remote receives.
            if hooks.has_outbound_transform() {
                match hooks.transform_outbound(&cx.local.client(), &mut view).await {
                    TransformOutcome::Deliver => {
                        if topic::validate_topic_name(&view.topic).is_ok() {
                            remote_topic = view.topic.to_string();
                        }
                        payload = view.payload;
                        retain = view.retain;
                        properties.user_properties = view.user_properties;
                        properties.content_type = view.content_type;
                        properties.payload_format_indicator = view.payload_format_indicator;
                        properties.response_topic = view.response_topic;
                        properties.correlation_data = view.correlation_data;
                        properties.message_expiry_interval = view.message_expiry_interval;
                    }
                    TransformOutcome::Drop { hook, reason }
                    | TransformOutcome::Reject { hook, message: reason, .. } => {
                        debug!(bridge = %settings.name, %hook, %reason, "a deliver hook dropped the copy for the bridge");
                        BridgeStats::bump(&stats.dropped_by_policy);
                        return false;
                    }
                }
            }
        }
        if let (Some(name), Some(id)) = (&settings.message_id_property, id) {
            // One id per link: a message that crossed another bridge before gets this link's.
            properties.user_properties.retain(|property| property.key != *name);
            properties.user_properties.push(UserProperty { key: name.clone(), value: id });
        }
        let publish = Publish {
            dup: resend && qos != QoS::AtMostOnce,
            qos,
            // A remote without retained messages would disconnect for the flag [MQTT-3.2.2-14].
            retain: retain && self.remote_retain,
            topic: remote_topic.into(),
            packet_id,
            properties,
            payload,
        };
        let start = self.write.len();
        let encoded = encode_packet(&Packet::Publish(publish), self.version, &mut self.write);
        let too_large = self.write.len() - start > self.remote_max_packet;
        if encoded.is_err() || too_large {
            self.write.truncate(start);
            warn!(bridge = %settings.name, topic = %message.topic, too_large, "message cannot be sent to the remote; dropped");
            BridgeStats::bump(&stats.refused_by_remote);
            return false;
        }
        if !resend {
            BridgeStats::bump(&stats.sent);
        }
        true
    }

    async fn handle(
        &mut self,
        cx: &Context<'_>,
        egress: &mut Egress,
        packet: Packet,
        incoming_qos2: &mut HashSet<PacketId>,
    ) -> Result<(), String> {
        let (settings, local, stats) = (cx.settings, cx.local, cx.stats);
        match packet {
            Packet::Publish(publish) => match (publish.qos, publish.packet_id) {
                (QoS::AtMostOnce, _) => admit(cx, publish).await,
                (QoS::AtLeastOnce, Some(packet_id)) => {
                    admit(cx, publish).await;
                    self.queue(&Packet::PubAck(Ack::new(packet_id, ReasonCode::SUCCESS)))?;
                }
                (QoS::ExactlyOnce, Some(packet_id)) => {
                    // Published once; a resend before PUBREL is only acknowledged again [MQTT-4.3.3].
                    if incoming_qos2.insert(packet_id) {
                        admit(cx, publish).await;
                    }
                    self.queue(&Packet::PubRec(Ack::new(packet_id, ReasonCode::SUCCESS)))?;
                }
                _ => return Err("a QoS 1 or 2 PUBLISH without a packet id".into()),
            },
            Packet::PubRel(ack) => {
                incoming_qos2.remove(&ack.packet_id);
                self.queue(&Packet::PubComp(Ack::new(ack.packet_id, ReasonCode::SUCCESS)))?;
            }
            Packet::PubAck(ack) => {
                busy(stats, "PUBACK", ack.reason_code)?;
                refused(settings, stats, "PUBACK", ack.reason_code);
                egress.settle(local, ack.packet_id);
            }
            Packet::PubRec(ack) => {
                busy(stats, "PUBREC", ack.reason_code)?;
                if refused(settings, stats, "PUBREC", ack.reason_code) || !matches!(egress, Egress::Memory { .. }) {
                    egress.settle(local, ack.packet_id);
                } else if local.received(ack.packet_id) {
                    self.queue(&Packet::PubRel(Ack::new(ack.packet_id, ReasonCode::SUCCESS)))?;
                } else {
                    self.queue(&Packet::PubRel(Ack::new(ack.packet_id, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND)))?;
                }
            }
            Packet::PubComp(ack) => {
                egress.settle(local, ack.packet_id);
            }
            Packet::SubAck(suback) => {
                let filters = settings.topics.iter().filter(|mapping| mapping.takes_in());
                for (mapping, code) in filters.zip(&suback.reason_codes) {
                    if code.is_error() {
                        warn!(bridge = %settings.name, filter = %mapping.remote_filter(), code = format!("0x{:02X}", code.0), "the remote refused a bridge subscription");
                    }
                }
            }
            Packet::Disconnect(disconnect) => {
                return Err(format!("the remote disconnected: reason code 0x{:02X}", disconnect.reason_code.0));
            }
            other => return Err(format!("unexpected {} from the remote", other.kind())),
        }
        Ok(())
    }
}

/// The next link packet id not in flight.
fn allocate_packet_id<T>(next: &mut PacketId, inflight: &HashMap<PacketId, T>) -> PacketId {
    loop {
        let candidate = *next;
        *next = next.checked_add(1).unwrap_or(1);
        if !inflight.contains_key(&candidate) {
            return candidate;
        }
    }
}

/// An acknowledgement saying the remote cannot take the message now (0x89 Server busy, 0x97 Quota exceeded) ends
/// the link: the message stays unsettled, and the reconnect's backoff is the pause the remote asked for. Sending
/// on over the same link would only meet the same quota, and settling would lose the message.
fn busy(stats: &BridgeStats, kind: &str, code: ReasonCode) -> Result<(), String> {
    if code != ReasonCode::SERVER_BUSY && code != ReasonCode::QUOTA_EXCEEDED {
        return Ok(());
    }
    BridgeStats::bump(&stats.remote_busy);
    Err(format!("the remote is busy ({kind} 0x{:02X}); backing off, the message goes again", code.0))
}

/// Whether an acknowledgement says the remote refused the message (logged and counted; the message is not sent
/// again, as a refusal would only repeat).
fn refused(settings: &BridgeSettings, stats: &BridgeStats, kind: &str, code: ReasonCode) -> bool {
    if !code.is_error() {
        return false;
    }
    BridgeStats::bump(&stats.refused_by_remote);
    warn!(bridge = %settings.name, ack = kind, code = format!("0x{:02X}", code.0), "the remote refused a bridged message");
    true
}

/// The route chain's answer: the topic to use, or `None` to drop.
async fn decide(
    hooks: &tollgate_hooks::HookChain,
    direction: RouteDirection,
    settings: &BridgeSettings,
    view: &tollgate_hooks::Message,
) -> Option<String> {
    match hooks.route(direction, &settings.name, view).await {
        RouteDecision::Forward | RouteDecision::Abstain => Some(view.topic.to_string()),
        RouteDecision::Rewrite { topic: rewritten } => match topic::validate_topic_name(&rewritten) {
            Ok(()) => Some(rewritten),
            Err(error) => {
                warn!(bridge = %settings.name, ?direction, topic = %rewritten, %error, "route rewrote to an invalid topic; dropped");
                None
            }
        },
        RouteDecision::Drop => {
            debug!(bridge = %settings.name, ?direction, topic = %view.topic, "route dropped a message");
            None
        }
    }
}

/// Publishes a message from the remote here, unless the route hook drops it.
async fn admit(cx: &Context<'_>, publish: Publish) {
    let (broker, settings, local, stats) = (cx.broker, cx.settings, cx.local, cx.stats);
    let Some(local_topic) = settings.topics.iter().find_map(|mapping| mapping.to_local(&publish.topic)) else {
        debug!(bridge = %settings.name, topic = %publish.topic, "no incoming mapping takes it; ignored");
        return;
    };
    let now = Instant::now();
    let mut message = Message {
        topic: local_topic.into(),
        payload: publish.payload,
        qos: publish.qos,
        retain: publish.retain,
        properties: Message::carried_properties(&publish.properties),
        expires_at: publish
            .properties
            .message_expiry_interval
            .map(|seconds| now + Duration::from_secs(u64::from(seconds))),
        origin: None,
    };
    let hooks = broker.hooks();
    if !hooks.routers.is_empty() {
        let view = message.hook_view(publish.properties.message_expiry_interval);
        match decide(&hooks, RouteDirection::Ingress, settings, &view).await {
            Some(topic) => message.topic = topic.into(),
            None => {
                BridgeStats::bump(&stats.dropped_by_policy);
                return;
            }
        }
    }
    // Then the inbound transforms, as for a client's publish with the bridge as the publisher: a command that
    // came over the bridge is verified (msg-auth) like one a backend sent here directly.
    if !hooks.transformers.is_empty() {
        let mut draft = message.hook_view(message.remaining_expiry(now));
        match hooks.transform_inbound(&local.client(), &mut draft).await {
            TransformOutcome::Deliver => {
                let received_at = message.qos;
                message.apply_hook_view(draft, now);
                // A transform may lower the QoS, never raise it past what the remote delivered at.
                message.qos = message.qos.min(received_at);
            }
            TransformOutcome::Drop { hook, reason } | TransformOutcome::Reject { hook, message: reason, .. } => {
                debug!(bridge = %settings.name, %hook, %reason, topic = %message.topic, "a transform refused a bridged message");
                BridgeStats::bump(&stats.dropped_by_policy);
                return;
            }
        }
    }
    BridgeStats::bump(&stats.received);
    local.publish(message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_send_pace_is_a_tenth_of_a_second_deep_and_refills_at_the_rate() {
        assert!(Pace::new(0).is_none(), "0: no limit");
        let mut pace = Pace::new(20).expect("paced");
        assert_eq!(pace.available(), 2, "a tenth of a second of 20/s");
        pace.spend(2);
        assert_eq!(pace.available(), 0);
        assert_eq!(pace.next_at() - Instant::now(), Duration::from_millis(50));
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(pace.available(), 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(pace.available(), 2, "idle time does not bank a burst");
        let mut slow = Pace::new(1).expect("paced");
        assert_eq!(slow.available(), 1, "at least one message deep");
    }

    #[test]
    fn the_host_is_what_precedes_the_port() {
        assert_eq!(host_of("cloud.example.com:8883"), "cloud.example.com");
        assert_eq!(host_of("[::1]:1883"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn jitter_stays_within_a_quarter_below() {
        for _ in 0..100 {
            let wait = jittered(Duration::from_secs(4));
            assert!(wait >= Duration::from_secs(3) && wait <= Duration::from_secs(4), "{wait:?}");
        }
    }
}
