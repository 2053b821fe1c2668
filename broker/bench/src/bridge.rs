//! `tollgate-bench --bridge`: a site broker bridged to a cloud broker, Tollgate against Mosquitto (each bridged to
//! its own kind), in one run.
//!
//! Two measurements per broker and payload size, every message checked (each sequence number once, in order):
//! - **live**: one publisher on the site sends QoS 1 messages with a window of 100, one subscriber on the cloud
//!   takes them; messages per second from the first send to the last receipt.
//! - **backlog**: the uplink (a relay in this process) is down while the publisher sends the same number of
//!   messages; then it comes up. Messages per second from the first to the last receipt at the cloud (the drain,
//!   without the reconnect wait), and the site broker's resident memory with the whole backlog queued.
//!
//! Tollgate runs twice: with the bridge's queue in memory and on disk (`[bridges.queue]`, fsync every 200 ms).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::brokers::{BrokerSpec, Limits, Program, RunningBroker, Setup};
use crate::client::{Conn, Dialer, Frame, drain_frames, parse_payload, publish_windowed, put_puback, put_publish};
use crate::scenarios::Transport;
use tollgate_protocol::QoS;

const PUBLISH_WINDOW: usize = 100;
const TOPIC: &str = "bench/bridge/t";

/// One site/cloud pairing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    Mosquitto,
    TollgateMemory,
    TollgateDisk,
}

impl Variant {
    pub fn title(self) -> &'static str {
        match self {
            Variant::Mosquitto => "Mosquitto → Mosquitto",
            Variant::TollgateMemory => "Tollgate → Tollgate, queue in memory",
            Variant::TollgateDisk => "Tollgate → Tollgate, queue on disk",
        }
    }

    fn program(self) -> Program {
        match self {
            Variant::Mosquitto => Program::Mosquitto,
            Variant::TollgateMemory | Variant::TollgateDisk => Program::Tollgate,
        }
    }

    /// The bridge section of the site's configuration, toward `port`.
    fn bridge_config(self, port: u16, limits: Limits, queue_dir: &std::path::Path) -> String {
        match self {
            // Mosquitto 2.0: `restart_timeout` 1 s so both reconnect as soon; its bridge window is
            // `max_inflight_messages`, which the common configuration already sets.
            Variant::Mosquitto => format!(
                "\nconnection cloud\naddress 127.0.0.1:{port}\nbridge_protocol_version mqttv50\n\
                 topic bench/# out 1\ncleansession false\nrestart_timeout 1\n"
            ),
            Variant::TollgateMemory | Variant::TollgateDisk => {
                let mut text = format!(
                    "\n[[bridges]]\nname = \"cloud\"\naddress = \"127.0.0.1:{port}\"\nmax_inflight = {inflight}\n\
                     reconnect_min_ms = 1000\nreconnect_max_ms = 1000\n\
                     topics = [{{ pattern = \"bench/#\", direction = \"out\", qos = 1 }}]\n",
                    inflight = limits.max_inflight
                );
                if self == Variant::TollgateDisk {
                    text.push_str(&format!(
                        "queue = {{ dir = \"{}\", max_mb = 4096, fsync = \"interval\" }}\n",
                        queue_dir.display()
                    ));
                }
                text
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct BridgeOutcome {
    pub live_msgs_per_s: f64,
    pub backlog_drain_msgs_per_s: f64,
    /// The site broker's resident memory with the backlog queued, and before it.
    pub site_rss_idle_kib: u64,
    pub site_rss_backlog_kib: u64,
    pub error: Option<String>,
}

/// A TCP relay standing for the site's uplink: cut drops the live connections and closes new ones at once.
struct Relay {
    port: u16,
    up: Arc<AtomicBool>,
    pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn to(target: u16) -> Result<Relay> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let up = Arc::new(AtomicBool::new(true));
        let pipes: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (up, pipes) = (up.clone(), pipes.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue;
                    }
                    let _ = inbound.set_nodelay(true);
                    let pipe = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                            let _ = outbound.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    pipes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(pipe);
                }
            }
        });
        Ok(Relay { port, up, pipes, accept })
    }

    fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        for pipe in self.pipes.lock().unwrap_or_else(std::sync::PoisonError::into_inner).drain(..) {
            pipe.abort();
        }
    }

    fn restore(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// Publishes `count` QoS 1 messages (sequence numbers from `first`) with a window, waiting for every PUBACK.
async fn publish(conn: &mut Conn, first: u64, count: u64, payload: usize) -> Result<()> {
    publish_windowed(conn, count, PUBLISH_WINDOW, |buffer, n, packet_id| {
        put_publish(buffer, TOPIC.as_bytes(), 1, packet_id, 0, first + n, payload, None);
    })
    .await
}

/// Receives until sequence `end - 1`; checks that each arrives once and in order. Returns the time of the first
/// and last receipt.
async fn receive(conn: &mut Conn, first: u64, end: u64, payload: usize, limit: Duration) -> Result<(Instant, Instant)> {
    let mut expected = first;
    let mut first_at = None;
    let deadline = tokio::time::Instant::now() + limit;
    let mut out = BytesMut::new();
    while expected < end {
        let read = tokio::time::timeout_at(deadline, conn.stream.read_buf(&mut conn.rbuf))
            .await
            .with_context(|| format!("only {} of {} messages arrived", expected - first, end - first))??;
        if read == 0 {
            bail!("the cloud closed the subscriber's connection");
        }
        let mut problem = None;
        drain_frames(&mut conn.rbuf, |frame| {
            if let Frame::Publish { qos, packet_id, payload: body, .. } = frame {
                if qos == 1 {
                    put_puback(&mut out, packet_id);
                }
                match parse_payload(body, payload) {
                    Some((_, seq, _)) if seq == expected => {
                        expected += 1;
                        first_at.get_or_insert_with(Instant::now);
                    }
                    // A message sent again after a reconnect (QoS 1 allows it): counted once.
                    Some((_, seq, _)) if seq < expected => {}
                    Some((_, seq, _)) => problem = Some(format!("sequence {seq} arrived while {expected} was due")),
                    None => problem = Some("a corrupt payload".into()),
                }
            }
            Ok(())
        })?;
        if let Some(problem) = problem {
            bail!(problem);
        }
        if !out.is_empty() {
            conn.stream.write_all(&out).await?;
            out.clear();
        }
    }
    let last = Instant::now();
    Ok((first_at.unwrap_or(last), last))
}

/// Waits until the bridge carries messages: probes on the site until the cloud's subscriber sees one.
async fn wait_for_bridge(site: &Dialer, cloud_conn: &mut Conn) -> Result<()> {
    let mut probe = Conn::connect(site, 0, "bench-probe", 4096).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        put_publish(&mut probe.wbuf, b"bench/probe", 0, 0, 9, 0, 32, None);
        probe.flush().await?;
        if let Ok(Ok(read)) =
            tokio::time::timeout(Duration::from_millis(200), cloud_conn.stream.read_buf(&mut cloud_conn.rbuf)).await
            && read > 0
        {
            cloud_conn.rbuf.clear();
            // Late probes still on their way: let them land and drop them.
            tokio::time::sleep(Duration::from_millis(300)).await;
            while let Ok(Ok(read)) =
                tokio::time::timeout(Duration::from_millis(50), cloud_conn.stream.read_buf(&mut cloud_conn.rbuf)).await
            {
                if read == 0 {
                    break;
                }
                cloud_conn.rbuf.clear();
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the bridge carried nothing within 20 s");
        }
    }
}

pub async fn measure(
    variant: Variant,
    site_spec: &BrokerSpec,
    cloud_spec: &BrokerSpec,
    limits: Limits,
    messages: u64,
    payload: usize,
    tag: &str,
) -> BridgeOutcome {
    let measured: Result<BridgeOutcome> = async {
        if site_spec.kind.program() != variant.program() || cloud_spec.kind.program() != variant.program() {
            bail!("{variant:?} needs {:?} brokers", variant.program());
        }
        let plain = |extra| Setup { transport: Transport::Tcp, pki: None, sys_interval: 0, extra };
        let cloud = RunningBroker::start(cloud_spec, limits, plain(""), &format!("{tag}-cloud"))?;
        let relay = Relay::to(cloud.addr.port()).await?;
        let queue_dir = std::env::temp_dir().join(format!("tollgate-bench-{}-{tag}-queue", std::process::id()));
        let _ = std::fs::remove_dir_all(&queue_dir);
        let extra = variant.bridge_config(relay.port, limits, &queue_dir);
        let mut site = RunningBroker::start(site_spec, limits, plain(&extra), &format!("{tag}-site"))?;
        let site_dialer = Dialer::tcp(site.addr);
        let cloud_dialer = Dialer::tcp(cloud.addr);
        let mut subscriber = Conn::connect(&cloud_dialer, 0, "bench-cloud-sub", 1 << 20).await?;
        subscriber.subscribe("bench/#", QoS::AtLeastOnce).await?;
        wait_for_bridge(&site_dialer, &mut subscriber).await?;
        let mut publisher = Conn::connect(&site_dialer, 0, "bench-site-pub", 1 << 20).await?;
        let mut outcome = BridgeOutcome { site_rss_idle_kib: site.rss_kib()?, ..BridgeOutcome::default() };

        // Live.
        let started = Instant::now();
        let (published, received) = tokio::join!(
            publish(&mut publisher, 0, messages, payload),
            receive(&mut subscriber, 0, messages, payload, Duration::from_secs(120))
        );
        published?;
        let (_, last) = received?;
        outcome.live_msgs_per_s = messages as f64 / last.duration_since(started).as_secs_f64();

        // Backlog: the uplink goes down, the publisher sends the same number again, the site queues them all.
        relay.cut();
        tokio::time::sleep(Duration::from_millis(500)).await;
        publish(&mut publisher, messages, messages, payload).await?;
        // With the disk queue each PUBACK came after the journal write; the memory queue has it at once. A moment
        // for the allocator to settle before the reading.
        tokio::time::sleep(Duration::from_millis(500)).await;
        outcome.site_rss_backlog_kib = site.rss_kib()?;
        relay.restore();
        let (first, last) = receive(&mut subscriber, messages, 2 * messages, payload, Duration::from_secs(300)).await?;
        outcome.backlog_drain_msgs_per_s = messages as f64 / last.duration_since(first).as_secs_f64().max(1e-6);
        site.check_alive()?;
        site.stop()?;
        cloud.stop()?;
        drop(relay);
        let _ = std::fs::remove_dir_all(&queue_dir);
        Ok(outcome)
    }
    .await;
    measured.unwrap_or_else(|error| BridgeOutcome { error: Some(format!("{error:#}")), ..BridgeOutcome::default() })
}
