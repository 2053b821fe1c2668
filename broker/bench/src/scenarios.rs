//! The workloads. Every delivered message is checked: its payload names the publisher and a sequence number,
//! the topic must be that publisher's, the filler bytes must match, and per (subscriber, publisher) a bitset
//! records which sequence numbers arrived so that loss, duplication and reordering are counted exactly.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use bytes::BytesMut;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout};
use tollgate_protocol::{Packet, QoS};

use crate::brokers::{RunningBroker, cpu_ticks};
use crate::client::{
    Conn, Dialer, Frame, Signer, drain_frames, now_ns, parse_payload, put_puback, put_publish, split, strip_envelope,
    try_read_now,
};
use crate::pki::Pki;

/// A publisher that has waited this long for subscribers to catch up sends a small batch anyway, so that a
/// broker which dropped the messages it was waiting for shows up as loss rather than as a hang.
pub const STALL: Duration = Duration::from_millis(200);
const STALL_BATCH: u64 = 32;
/// How long the end of a run waits for in-flight messages once delivery stops making progress.
const DRAIN_IDLE: Duration = Duration::from_secs(2);
const DRAIN_MAX: Duration = Duration::from_secs(15);
/// Bytes per publisher write, at most.
const WRITE_BATCH_BYTES: usize = 64 * 1024;

#[derive(Clone)]
pub struct Settings {
    pub duration: Duration,
    pub warmup: Duration,
    pub idle_connections: usize,
    pub connect_workers: usize,
    /// Certificates for the TLS scenarios (generated only when one is selected).
    pub pki: Option<Arc<Pki>>,
    /// Read the plugin's call count after each flow, to report how many messages one hook call carried.
    pub plugin_calls: bool,
}

#[derive(Clone, Debug)]
pub enum Workload {
    Flow(FlowSpec),
    IdleMemory,
    ConnectionRate,
    /// A fixed number of connections, each a different car with its own client certificate, each timed from TCP
    /// connect to CONNACK, then closed.
    CarConnects {
        count: usize,
    },
}

/// How the clients reach the broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    Tcp,
    /// TLS with a server certificate only.
    Tls,
    /// TLS with a client certificate per car, required and verified by the broker.
    MutualTls,
}

#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    pub title: String,
    pub transport: Transport,
    pub workload: Workload,
}

impl Scenario {
    fn tcp(name: &'static str, title: String, workload: Workload) -> Scenario {
        Scenario { name, title, transport: Transport::Tcp, workload }
    }
}

/// Publishers, subscribers and who hears whom.
#[derive(Clone, Debug)]
pub struct FlowSpec {
    /// Topic of each publisher.
    pub topics: Vec<String>,
    /// Filter of each subscriber.
    pub filters: Vec<String>,
    /// Publishers each subscriber receives from.
    pub sources: Vec<Vec<usize>>,
    pub qos: u8,
    pub payload: usize,
    /// Messages a publisher may be ahead of its slowest subscriber.
    pub credit: u64,
    /// QoS 1 PUBLISHes a publisher keeps unacknowledged.
    pub window: usize,
    /// Fixed rate per publisher (messages/s) instead of "as fast as flow control allows".
    pub rate: Option<u64>,
    pub latency: bool,
}

/// The site-load scenario: cars (one connection each) and the rate each publishes at, 10,000 msg/s in all.
const SITE_CARS: usize = 500;
const SITE_RATE: u64 = 20;

pub fn all(pairs: usize, car_connects: usize) -> Vec<Scenario> {
    let mut list = Vec::new();
    for (payload, size) in [(64usize, "64"), (1024, "1k")] {
        for qos in [0u8, 1] {
            let name: &'static str = match (qos, size) {
                (0, "64") => "pairs-q0-64",
                (1, "64") => "pairs-q1-64",
                (0, _) => "pairs-q0-1k",
                _ => "pairs-q1-1k",
            };
            let size_title = if payload == 1024 { "1 KiB" } else { "64 B" };
            list.push(Scenario::tcp(
                name,
                format!("pairs {pairs}x, QoS {qos}, {size_title}"),
                Workload::Flow(pairs_spec(pairs, qos, payload)),
            ));
        }
    }
    for qos in [0u8, 1] {
        list.push(Scenario::tcp(
            if qos == 0 { "fanin-q0" } else { "fanin-q1" },
            format!("fan-in 16→1, QoS {qos}, 64 B"),
            Workload::Flow(FlowSpec {
                topics: (0..16).map(|i| format!("fanin/{i}")).collect(),
                filters: vec!["fanin/#".into()],
                sources: vec![(0..16).collect()],
                qos,
                payload: 64,
                credit: 256,
                window: 64,
                rate: None,
                latency: false,
            }),
        ));
    }
    for qos in [0u8, 1] {
        list.push(Scenario::tcp(
            if qos == 0 { "fanout-q0" } else { "fanout-q1" },
            format!("fan-out 1→100, QoS {qos}, 64 B"),
            Workload::Flow(FlowSpec {
                topics: vec!["fanout/t".into()],
                filters: vec!["fanout/t".into(); 100],
                sources: vec![vec![0]; 100],
                qos,
                payload: 64,
                credit: 1000,
                window: 64,
                rate: None,
                latency: false,
            }),
        ));
    }
    // A site gateway's steady load rather than its peak: what a plugin costs shows as CPU per message, and in the
    // delivery latency, while every variant carries the same traffic.
    list.push(Scenario::tcp(
        "site-load",
        format!("site load: {SITE_CARS} cars × {SITE_RATE} msg/s, QoS 1, 256 B, to one backend"),
        Workload::Flow(FlowSpec {
            topics: (0..SITE_CARS).map(|car| format!("fanin/car/{car}")).collect(),
            filters: vec!["fanin/car/#".into()],
            sources: vec![(0..SITE_CARS).collect()],
            qos: 1,
            payload: 256,
            credit: 1000,
            window: 64,
            rate: Some(SITE_RATE),
            latency: true,
        }),
    ));
    list.push(Scenario::tcp(
        "latency",
        "latency, 1 pair, 1000 msg/s, QoS 1, 64 B".into(),
        Workload::Flow(FlowSpec { rate: Some(1000), latency: true, ..pairs_spec(1, 1, 64) }),
    ));
    list.push(Scenario::tcp("idle-mem", "memory per idle connection".into(), Workload::IdleMemory));
    list.push(Scenario::tcp(
        "conn-rate",
        "connection rate (CONNECT→CONNACK→DISCONNECT)".into(),
        Workload::ConnectionRate,
    ));
    for (payload, name) in [(64usize, "tls-pairs-q1-64"), (1024, "tls-pairs-q1-1k")] {
        let size_title = if payload == 1024 { "1 KiB" } else { "64 B" };
        list.push(Scenario {
            name,
            title: format!("TLS: pairs {pairs}x, QoS 1, {size_title}"),
            transport: Transport::Tls,
            workload: Workload::Flow(pairs_spec(pairs, 1, payload)),
        });
    }
    list.push(Scenario {
        name: "tls-conn-rate",
        title: "TLS: connection rate (full handshake, CONNECT→CONNACK→DISCONNECT)".into(),
        transport: Transport::Tls,
        workload: Workload::ConnectionRate,
    });
    list.push(Scenario {
        name: "mtls-car-connects",
        title: format!("mutual TLS: {car_connects} car connects, a certificate each"),
        transport: Transport::MutualTls,
        workload: Workload::CarConnects { count: car_connects },
    });
    list
}

fn pairs_spec(pairs: usize, qos: u8, payload: usize) -> FlowSpec {
    let topics: Vec<String> = (0..pairs).map(|i| format!("bench/pair/{i}")).collect();
    FlowSpec {
        filters: topics.clone(),
        topics,
        sources: (0..pairs).map(|i| vec![i]).collect(),
        qos,
        payload,
        credit: 1000,
        window: 64,
        rate: None,
        latency: false,
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub samples: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

/// What one scenario measured against one broker.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    /// The headline number: messages/s, connections/s or KiB per connection.
    pub value: Option<f64>,
    pub unit: &'static str,
    pub measured_s: f64,
    pub published: u64,
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    pub invalid: u64,
    /// Publisher waits that ended in sending anyway (see `STALL`).
    pub stalls: u64,
    /// Longest pause in deliveries at any subscriber while publishers were running, in ms.
    pub max_gap_ms: f64,
    /// Longest pause in deliveries of one publisher's messages at one subscriber, in ms.
    pub max_stream_gap_ms: f64,
    pub unacked: u64,
    pub bad_acks: u64,
    pub latency: Option<Percentiles>,
    pub broker_cpu_pct: Option<f64>,
    pub client_cpu_pct: Option<f64>,
    /// CPU used by other processes on the machine during the measurement (interference).
    pub other_cpu_pct: Option<f64>,
    pub broker_rss_kib: Option<u64>,
    pub rss_before_kib: Option<u64>,
    pub connections: Option<u64>,
    pub failures: u64,
    /// Where messages went missing: a few (subscriber, publisher) pairs with the gaps.
    pub loss_detail: Vec<String>,
    pub errors: Vec<String>,
    /// Runs made of this scenario (more than one when other processes disturbed it).
    pub attempts: u32,
    /// The plugin's own call latency as the broker measured it (`$SYS/broker/plugins/<name>/latency/<hook>/…`).
    pub plugin_latency: Option<PluginLatency>,
    /// Broker CPU time per message delivered in the measured window, in µs (fixed-rate flows).
    pub cpu_us_per_message: Option<f64>,
    /// With `--rounds`, every round's headline in the order measured (`None`: the round failed).
    pub rounds: Vec<Option<f64>>,
}

/// One hook's call latency read from the broker's `$SYS` tree.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PluginLatency {
    pub plugin: String,
    pub hook: String,
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Plugin instances the broker had created by then (each a fresh WebAssembly store or Lua state).
    pub instances: u64,
    /// Decisions the plugin was asked for (a burst counts once per message) and entries into it (a burst counts
    /// once), over all its hooks.
    pub calls: u64,
    pub invocations: u64,
}

impl PluginLatency {
    /// The mean burst one entry into the plugin carried.
    pub fn messages_per_call(&self) -> Option<f64> {
        (self.invocations > 0).then(|| self.calls as f64 / self.invocations as f64)
    }
}

impl Outcome {
    /// Fills in the measured time and CPU shares between two snapshots, and returns the seconds measured.
    fn record_cpu(&mut self, start: &CpuSnapshot, end: &CpuSnapshot) -> f64 {
        let measured = end.at.duration_since(start.at).as_secs_f64();
        let (broker_cpu, client_cpu) = end.percent_since(start);
        self.measured_s = measured;
        self.broker_cpu_pct = broker_cpu;
        self.client_cpu_pct = client_cpu;
        self.other_cpu_pct = end.others_since(start);
        measured
    }

    pub fn integrity_ok(&self) -> bool {
        self.lost == 0 && self.duplicates == 0 && self.reordered == 0 && self.invalid == 0 && self.errors.is_empty()
    }
}

/// The dialer for a scenario's transport against a started broker.
pub fn dialer(transport: Transport, broker: &RunningBroker, pki: Option<&Pki>) -> Result<Dialer> {
    let pki = || pki.ok_or_else(|| anyhow!("no certificates generated for a TLS scenario"));
    Ok(match transport {
        Transport::Tcp => Dialer::tcp(broker.addr),
        Transport::Tls => Dialer::tls(broker.addr, vec![pki()?.client_config(None)?]),
        Transport::MutualTls => {
            let pki = pki()?;
            let configs = (0..pki.cars.len()).map(|car| pki.client_config(Some(car))).collect::<Result<_>>()?;
            Dialer::tls(broker.addr, configs)
        }
    })
}

pub async fn run(scenario: &Scenario, broker: &mut RunningBroker, settings: &Settings) -> Result<Outcome> {
    let dialer = dialer(scenario.transport, broker, settings.pki.as_deref())?;
    let mut outcome = match &scenario.workload {
        Workload::Flow(spec) => run_flow(broker, &dialer, spec, settings).await?,
        Workload::IdleMemory => run_idle(broker, &dialer, settings).await?,
        Workload::ConnectionRate => run_connection_rate(broker, &dialer, settings).await?,
        Workload::CarConnects { count } => {
            let pki = settings.pki.as_deref().ok_or_else(|| anyhow!("no certificates for the car connects"))?;
            let vins: Vec<String> = pki.cars.iter().take(*count).map(|car| car.vin.clone()).collect();
            run_car_connects(broker, &dialer, &vins, settings).await?
        }
    };
    if let Err(error) = broker.check_alive() {
        outcome.errors.push(error.to_string());
        outcome.value = None;
    }
    Ok(outcome)
}

/// CPU usage between two snapshots.
struct CpuSnapshot {
    at: Instant,
    broker: Option<u64>,
    client: Option<u64>,
    /// Busy clock ticks of the whole machine, all CPUs.
    machine: Option<u64>,
}

/// Busy ticks (everything but idle and iowait) from the first line of `/proc/stat`.
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice]
    let busy = fields.iter().take(8).sum::<u64>() - fields.get(3)? - fields.get(4)?;
    Some(busy)
}

impl CpuSnapshot {
    fn take(broker: &RunningBroker) -> Self {
        Self {
            at: Instant::now(),
            broker: broker.cpu_ticks().ok(),
            client: cpu_ticks("/proc/self/stat").ok(),
            machine: machine_busy_ticks(),
        }
    }

    /// Percent of one core used by everything except the broker and this process (other work on the
    /// machine that competed with the benchmark).
    fn others_since(&self, earlier: &CpuSnapshot) -> Option<f64> {
        let seconds = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        let machine = self.machine?.saturating_sub(earlier.machine?);
        let ours = self.broker?.saturating_sub(earlier.broker?) + self.client?.saturating_sub(earlier.client?);
        Some(machine.saturating_sub(ours) as f64 / 100.0 / seconds * 100.0)
    }

    /// (broker %, client %) of one core; clock ticks are 1/100 s on Linux.
    fn percent_since(&self, earlier: &CpuSnapshot) -> (Option<f64>, Option<f64>) {
        let seconds = self.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
        let pct =
            |now: Option<u64>, then: Option<u64>| Some((now?.saturating_sub(then?)) as f64 / 100.0 / seconds * 100.0);
        (pct(self.broker, earlier.broker), pct(self.client, earlier.client))
    }
}

struct SubShared {
    /// Distinct valid messages received so far.
    unique: AtomicU64,
    /// Per source: highest sequence number seen + 1.
    high_water: Vec<AtomicU64>,
}

struct PubShared {
    notify: Notify,
    /// (subscriber, index of this publisher among its sources)
    sinks: Vec<(usize, usize)>,
}

#[derive(Clone, Default)]
struct Tracker {
    seen: Vec<u64>,
    next: u64,
    unique: u64,
    duplicates: u64,
    reordered: u64,
}

impl Tracker {
    /// Missing sequence numbers below `sent`, as up to three ranges, plus how many there are in all.
    fn gaps(&self, sent: u64) -> (u64, Vec<(u64, u64)>) {
        let mut missing = 0;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for seq in 0..sent {
            let present = self.seen.get((seq / 64) as usize).is_some_and(|word| word & (1 << (seq % 64)) != 0);
            if present {
                continue;
            }
            missing += 1;
            let len = ranges.len();
            match ranges.last_mut() {
                Some(last) if last.1 + 1 == seq => last.1 = seq,
                _ if len < 3 => ranges.push((seq, seq)),
                _ => {}
            }
        }
        (missing, ranges)
    }

    /// Records `seq`; false if it is a duplicate.
    fn record(&mut self, seq: u64) -> bool {
        let word = (seq / 64) as usize;
        let bit = 1u64 << (seq % 64);
        if word >= self.seen.len() {
            self.seen.resize((word + 1).next_power_of_two().max(256), 0);
        }
        let Some(slot) = self.seen.get_mut(word) else {
            return false;
        };
        if *slot & bit != 0 {
            self.duplicates += 1;
            return false;
        }
        *slot |= bit;
        self.unique += 1;
        if seq < self.next {
            self.reordered += 1;
        } else {
            self.next = seq + 1;
        }
        true
    }
}

struct SubResult {
    trackers: Vec<Tracker>,
    invalid: u64,
    latencies_ns: Vec<u64>,
    /// Longest time without any new message at this subscriber while publishers were running.
    max_gap_ns: u64,
    /// Longest time without a new message from one particular publisher while publishers were running.
    max_stream_gap_ns: u64,
    error: Option<String>,
}

#[derive(Default)]
struct PubResult {
    sent: u64,
    acked: u64,
    unacked: u64,
    bad_acks: u64,
    stalls: u64,
    error: Option<String>,
}

/// Sequence numbers beyond this are treated as corrupt rather than allocating a huge bitset.
const MAX_SEQ: u64 = 1 << 32;

struct SubCtx {
    index: usize,
    qos: u8,
    payload: usize,
    topics: Arc<Vec<String>>,
    sources: Vec<usize>,
    /// publisher -> position in `sources`, or usize::MAX
    local_of: Vec<usize>,
    shared: Arc<Vec<SubShared>>,
    pubs: Arc<Vec<PubShared>>,
    /// Latency samples are taken for messages sent at or after this time (ns since origin).
    latency_from: Option<u64>,
    /// Set when the publishers stop; delivery gaps after that are not gaps.
    publishing_stopped: Arc<AtomicBool>,
    /// Payloads arrive in a signature envelope (the msg-auth variant); a bare payload is invalid then.
    signed: bool,
}

async fn subscriber(conn: Conn, ctx: SubCtx, mut stop: watch::Receiver<bool>) -> SubResult {
    let Conn { stream, mut rbuf, mut wbuf } = conn;
    let (mut rd, mut wr) = split(stream);
    let mut trackers = vec![Tracker::default(); ctx.sources.len()];
    let mut invalid = 0u64;
    let mut latencies_ns = Vec::new();
    let mut unique_total = 0u64;
    let mut last_any: Option<u64> = None;
    let mut last_stream: Vec<Option<u64>> = vec![None; ctx.sources.len()];
    let (mut max_gap_ns, mut max_stream_gap_ns) = (0u64, 0u64);
    let me = ctx.shared.get(ctx.index);
    let result: Result<()> = async {
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                read = tokio::io::AsyncReadExt::read_buf(&mut rd, &mut rbuf) => {
                    if read? == 0 {
                        bail!("subscriber {}: connection closed by broker", ctx.index);
                    }
                }
            }
            let before = unique_total;
            drain_frames(&mut rbuf, |frame| {
                match frame {
                    Frame::Publish { qos, packet_id, topic, payload } => {
                        if qos == 1 {
                            put_puback(&mut wbuf, packet_id);
                        }
                        let payload = if ctx.signed { strip_envelope(payload).unwrap_or_default() } else { payload };
                        let checked = parse_payload(payload, ctx.payload).and_then(|(p, seq, sent)| {
                            let local = *ctx.local_of.get(p as usize)?;
                            let expected_topic = ctx.topics.get(p as usize)?;
                            (local != usize::MAX
                                && topic == expected_topic.as_bytes()
                                && qos == ctx.qos
                                && seq < MAX_SEQ)
                                .then_some((local, seq, sent))
                        });
                        match checked {
                            Some((local, seq, sent)) => {
                                if let Some(tracker) = trackers.get_mut(local)
                                    && tracker.record(seq)
                                {
                                    unique_total += 1;
                                    if let Some(from) = ctx.latency_from
                                        && sent >= from
                                    {
                                        latencies_ns.push(now_ns().saturating_sub(sent));
                                    }
                                }
                            }
                            None => invalid += 1,
                        }
                    }
                    Frame::PubAck(_) => {}
                    Frame::Other(packet) if matches!(*packet, Packet::Disconnect(_)) => {
                        bail!("broker sent {packet:?}")
                    }
                    Frame::Other(_) => {}
                }
                Ok(())
            })?;
            if !wbuf.is_empty() {
                wr.write_all(&wbuf).await?;
                wbuf.clear();
            }
            if unique_total != before
                && let Some(me) = me
            {
                let now = now_ns();
                let counting = !ctx.publishing_stopped.load(Relaxed);
                if counting && let Some(last) = last_any {
                    max_gap_ns = max_gap_ns.max(now.saturating_sub(last));
                }
                last_any = Some(now);
                me.unique.store(unique_total, Relaxed);
                for (local, tracker) in trackers.iter().enumerate() {
                    if let Some(hw) = me.high_water.get(local)
                        && hw.load(Relaxed) != tracker.next
                    {
                        hw.store(tracker.next, Relaxed);
                        if let Some(last) = last_stream.get_mut(local) {
                            if counting && let Some(previous) = *last {
                                max_stream_gap_ns = max_stream_gap_ns.max(now.saturating_sub(previous));
                            }
                            *last = Some(now);
                        }
                        if let Some(publisher) = ctx.sources.get(local).and_then(|&p| ctx.pubs.get(p)) {
                            publisher.notify.notify_one();
                        }
                    }
                }
            }
        }
    }
    .await;
    SubResult {
        trackers,
        invalid,
        latencies_ns,
        max_gap_ns,
        max_stream_gap_ns,
        error: result.err().map(|e| e.to_string()),
    }
}

struct PubCtx {
    index: usize,
    topic: Vec<u8>,
    qos: u8,
    payload: usize,
    credit: u64,
    window: usize,
    rate: Option<u64>,
    subs: Arc<Vec<SubShared>>,
    pubs: Arc<Vec<PubShared>>,
    stop: Arc<AtomicBool>,
    start: Instant,
    /// Sign every message (the msg-auth variant verifies them).
    signer: Option<Signer>,
}

async fn publisher(conn: Conn, mut ctx: PubCtx) -> PubResult {
    let Conn { stream, mut rbuf, mut wbuf } = conn;
    let (mut rd, mut wr) = split(stream);
    let mut res = PubResult::default();
    let mut in_flight = vec![false; 65536];
    let mut inflight = 0usize;
    let mut next_id: u16 = 1;
    let mut last_min = 0u64;
    let mut last_progress = Instant::now();
    let mut drain_deadline: Option<Instant> = None;
    let batch_cap = (WRITE_BATCH_BYTES / (ctx.payload + ctx.topic.len() + 8)).clamp(1, 512) as u64;
    let empty = PubShared { notify: Notify::new(), sinks: Vec::new() };
    let me = ctx.pubs.get(ctx.index).unwrap_or(&empty);
    let qos1 = ctx.qos == 1;

    let result: Result<()> = async {
        loop {
            let stopping = ctx.stop.load(Relaxed);
            if stopping {
                if !qos1 || inflight == 0 {
                    break;
                }
                let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(5));
                if Instant::now() > deadline {
                    break;
                }
            }
            // Collect whatever acknowledgements have already arrived without waiting.
            if qos1 && inflight > 0 {
                loop {
                    match try_read_now(&mut rd, &mut rbuf).await {
                        Ok(0) => bail!("publisher {}: connection closed by broker", ctx.index),
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e.into()),
                    }
                }
                take_acks(&mut rbuf, &mut in_flight, &mut inflight, &mut res)?;
            }
            let min_hw = me
                .sinks
                .iter()
                .filter_map(|&(s, l)| ctx.subs.get(s)?.high_water.get(l))
                .map(|hw| hw.load(Relaxed))
                .min()
                .unwrap_or(res.sent);
            if min_hw != last_min {
                last_min = min_hw;
                last_progress = Instant::now();
            }
            let mut credit_avail = ctx.credit.saturating_sub(res.sent.saturating_sub(min_hw));
            if credit_avail == 0 && last_progress.elapsed() > STALL {
                credit_avail = STALL_BATCH;
                res.stalls += 1;
                last_progress = Instant::now();
            }
            let window_avail = if qos1 { ctx.window.saturating_sub(inflight) as u64 } else { u64::MAX };
            let rate_avail = match ctx.rate {
                Some(rate) => {
                    // Nothing is due before this publisher's own start (rate-limited publishers are staggered).
                    let due = Instant::now()
                        .checked_duration_since(ctx.start)
                        .map_or(0, |elapsed| (elapsed.as_nanos() as u64).saturating_mul(rate) / 1_000_000_000 + 1);
                    due.saturating_sub(res.sent)
                }
                None => u64::MAX,
            };
            let n = if stopping { 0 } else { credit_avail.min(window_avail).min(rate_avail).min(batch_cap) };
            if n > 0 {
                for _ in 0..n {
                    let mut packet_id = 0;
                    if qos1 {
                        while in_flight.get(next_id as usize).copied().unwrap_or(false) {
                            next_id = next_id.checked_add(1).unwrap_or(1);
                        }
                        packet_id = next_id;
                        if let Some(slot) = in_flight.get_mut(packet_id as usize) {
                            *slot = true;
                        }
                        inflight += 1;
                        next_id = next_id.checked_add(1).unwrap_or(1);
                    }
                    let (topic, publisher) = (&ctx.topic, ctx.index as u32);
                    let signer = ctx.signer.as_mut();
                    put_publish(&mut wbuf, topic, ctx.qos, packet_id, publisher, res.sent, ctx.payload, signer);
                    res.sent += 1;
                }
                wr.write_all(&wbuf).await?;
                wbuf.clear();
                continue;
            }
            let wait_ack = qos1 && inflight > 0;
            let credit_blocked = credit_avail == 0 && !stopping;
            let next_due = ctx
                .rate
                .map(|rate| ctx.start + Duration::from_nanos(res.sent.saturating_mul(1_000_000_000) / rate.max(1)));
            let rate_blocked = rate_avail == 0 && !stopping;
            tokio::select! {
                read = tokio::io::AsyncReadExt::read_buf(&mut rd, &mut rbuf), if wait_ack => {
                    if read? == 0 {
                        bail!("publisher {}: connection closed by broker", ctx.index);
                    }
                    take_acks(&mut rbuf, &mut in_flight, &mut inflight, &mut res)?;
                }
                _ = me.notify.notified(), if credit_blocked => {}
                _ = sleep_until(next_due.unwrap_or_else(Instant::now).into()), if rate_blocked => {}
                _ = sleep(Duration::from_millis(50)) => {}
            }
        }
        // A polite goodbye; the broker's reaction does not matter any more.
        let _ = wr.write_all(&[0xE0, 0]).await;
        Ok(())
    }
    .await;
    res.unacked = inflight as u64;
    res.error = result.err().map(|e| e.to_string());
    res
}

fn take_acks(rbuf: &mut BytesMut, in_flight: &mut [bool], inflight: &mut usize, res: &mut PubResult) -> Result<()> {
    drain_frames(rbuf, |frame| {
        match frame {
            Frame::PubAck(id) => match in_flight.get_mut(id as usize) {
                Some(slot) if *slot => {
                    *slot = false;
                    *inflight -= 1;
                    res.acked += 1;
                }
                _ => res.bad_acks += 1,
            },
            Frame::Other(packet) if matches!(*packet, Packet::Disconnect(_)) => {
                bail!("broker sent {packet:?}")
            }
            _ => {}
        }
        Ok(())
    })
}

fn sum_unique(shared: &[SubShared]) -> u64 {
    shared.iter().map(|s| s.unique.load(Relaxed)).sum()
}

async fn connect_all(dialer: &Dialer, ids: Vec<String>, filters: Option<(Vec<String>, QoS)>) -> Result<Vec<Conn>> {
    let mut handles: Vec<JoinHandle<Result<Conn>>> = Vec::new();
    for (i, id) in ids.into_iter().enumerate() {
        let filter = filters.as_ref().and_then(|(filters, qos)| Some((filters.get(i)?.clone(), *qos)));
        let dialer = dialer.clone();
        handles.push(tokio::spawn(async move {
            let mut conn = Conn::connect(&dialer, i, &id, 64 * 1024).await?;
            if let Some((filter, qos)) = filter {
                conn.subscribe(&filter, qos).await?;
            }
            Ok(conn)
        }));
    }
    let mut conns = Vec::new();
    for handle in handles {
        conns.push(handle.await??);
    }
    Ok(conns)
}

async fn run_flow(
    broker: &mut RunningBroker,
    dialer: &Dialer,
    spec: &FlowSpec,
    settings: &Settings,
) -> Result<Outcome> {
    let publishers = spec.topics.len();
    let subscribers = spec.filters.len();
    let qos = QoS::from_u8(spec.qos).ok_or_else(|| anyhow!("bad qos"))?;
    let subs_shared: Arc<Vec<SubShared>> = Arc::new(
        spec.sources
            .iter()
            .map(|sources| SubShared {
                unique: AtomicU64::new(0),
                high_water: sources.iter().map(|_| AtomicU64::new(0)).collect(),
            })
            .collect(),
    );
    let pubs_shared: Arc<Vec<PubShared>> = Arc::new(
        (0..publishers)
            .map(|p| PubShared {
                notify: Notify::new(),
                sinks: spec
                    .sources
                    .iter()
                    .enumerate()
                    .filter_map(|(s, sources)| Some((s, sources.iter().position(|&x| x == p)?)))
                    .collect(),
            })
            .collect(),
    );
    let topics = Arc::new(spec.topics.clone());
    let signed = broker.kind.signs_messages();

    let sub_conns = connect_all(
        dialer,
        (0..subscribers).map(|i| format!("bench-sub-{i}")).collect(),
        Some((spec.filters.clone(), qos)),
    )
    .await?;
    let pub_conns = connect_all(dialer, (0..publishers).map(|i| format!("bench-pub-{i}")).collect(), None).await?;
    // Give every broker time to make the subscriptions effective before the first message.
    sleep(Duration::from_millis(200)).await;

    let warmup_end_ns = now_ns() + settings.warmup.as_nanos() as u64;
    let (stop_subs, stop_rx) = watch::channel(false);
    let stop_pubs = Arc::new(AtomicBool::new(false));
    let mut sub_handles = Vec::new();
    for (index, conn) in sub_conns.into_iter().enumerate() {
        let sources = spec.sources.get(index).cloned().unwrap_or_default();
        let mut local_of = vec![usize::MAX; publishers];
        for (local, &p) in sources.iter().enumerate() {
            if let Some(slot) = local_of.get_mut(p) {
                *slot = local;
            }
        }
        let ctx = SubCtx {
            index,
            qos: spec.qos,
            payload: spec.payload,
            topics: topics.clone(),
            sources,
            local_of,
            shared: subs_shared.clone(),
            pubs: pubs_shared.clone(),
            latency_from: spec.latency.then_some(warmup_end_ns),
            publishing_stopped: stop_pubs.clone(),
            signed,
        };
        sub_handles.push(tokio::spawn(subscriber(conn, ctx, stop_rx.clone())));
    }
    let start = Instant::now();
    let spread_over = pub_conns.len().max(1) as u64;
    let mut pub_handles = Vec::new();
    for (index, conn) in pub_conns.into_iter().enumerate() {
        // At a fixed rate, publishers start spread over one period rather than all at once: cars do not publish in
        // lockstep, and a synchronized wave would measure the queue it builds rather than the broker.
        let phase = spec.rate.map_or(Duration::ZERO, |rate| {
            Duration::from_nanos(index as u64 * (1_000_000_000 / rate.max(1)) / spread_over)
        });
        let ctx = PubCtx {
            index,
            topic: spec.topics.get(index).cloned().unwrap_or_default().into_bytes(),
            qos: spec.qos,
            payload: spec.payload,
            credit: spec.credit,
            window: spec.window,
            rate: spec.rate,
            subs: subs_shared.clone(),
            pubs: pubs_shared.clone(),
            stop: stop_pubs.clone(),
            start: start + phase,
            signer: signed.then(|| Signer::new(format!("bench-pub-{index}"))),
        };
        pub_handles.push(tokio::spawn(publisher(conn, ctx)));
    }

    sleep(settings.warmup).await;
    let delivered_start = sum_unique(&subs_shared);
    let cpu_start = CpuSnapshot::take(broker);
    sleep(settings.duration).await;
    let delivered_end = sum_unique(&subs_shared);
    let cpu_end = CpuSnapshot::take(broker);
    let rss = broker.rss_kib().ok();
    stop_pubs.store(true, Relaxed);
    for publisher in pubs_shared.iter() {
        publisher.notify.notify_one();
    }

    let mut outcome = Outcome { unit: "msg/s", broker_rss_kib: rss, ..Default::default() };
    let mut sent = vec![0u64; publishers];
    for (index, handle) in pub_handles.into_iter().enumerate() {
        let res = handle.await?;
        if let Some(slot) = sent.get_mut(index) {
            *slot = res.sent;
        }
        outcome.published += res.sent;
        outcome.unacked += res.unacked;
        outcome.bad_acks += res.bad_acks;
        outcome.stalls += res.stalls;
        if let Some(error) = res.error {
            outcome.errors.push(error);
        }
    }
    let expected: u64 = spec.sources.iter().flatten().map(|&p| sent.get(p).copied().unwrap_or(0)).sum();
    // Drain: wait until everything sent has arrived or delivery stops moving.
    let drain_start = Instant::now();
    let mut last = sum_unique(&subs_shared);
    let mut last_change = Instant::now();
    while last < expected && last_change.elapsed() < DRAIN_IDLE && drain_start.elapsed() < DRAIN_MAX {
        sleep(Duration::from_millis(20)).await;
        let now = sum_unique(&subs_shared);
        if now != last {
            last = now;
            last_change = Instant::now();
        }
    }
    let _ = stop_subs.send(true);
    let mut latencies = Vec::new();
    for (sub, handle) in sub_handles.into_iter().enumerate() {
        let res = handle.await?;
        let sources = spec.sources.get(sub).cloned().unwrap_or_default();
        for (tracker, &p) in res.trackers.iter().zip(&sources) {
            let published = sent.get(p).copied().unwrap_or(0);
            if tracker.unique < published && outcome.loss_detail.len() < 4 {
                let (missing, ranges) = tracker.gaps(published);
                let ranges: Vec<String> = ranges.iter().map(|(a, b)| format!("{a}..={b}")).collect();
                outcome
                    .loss_detail
                    .push(format!("sub {sub} from pub {p}: {missing} of {published} missing ({})", ranges.join(", ")));
            }
            outcome.delivered += tracker.unique;
            outcome.duplicates += tracker.duplicates;
            outcome.reordered += tracker.reordered;
        }
        outcome.invalid += res.invalid;
        latencies.extend(res.latencies_ns);
        outcome.max_gap_ms = outcome.max_gap_ms.max(res.max_gap_ns as f64 / 1e6);
        outcome.max_stream_gap_ms = outcome.max_stream_gap_ms.max(res.max_stream_gap_ns as f64 / 1e6);
        if let Some(error) = res.error {
            outcome.errors.push(error);
        }
    }
    outcome.expected = expected;
    outcome.lost = expected.saturating_sub(outcome.delivered);
    let measured = outcome.record_cpu(&cpu_start, &cpu_end);
    outcome.value = Some((delivered_end - delivered_start) as f64 / measured.max(1e-9));
    if spec.rate.is_some()
        && let (Some(cpu), Some(rate)) = (outcome.broker_cpu_pct, outcome.value)
        && rate > 0.0
    {
        outcome.cpu_us_per_message = Some(cpu / 100.0 / rate * 1e6);
    }
    if spec.latency {
        outcome.latency = Some(percentiles(&mut latencies));
    }
    if settings.plugin_calls
        && let (Some(plugin), Some(hook)) = (broker.kind.plugin_name(), broker.kind.flow_hook())
    {
        match read_plugin_latency(broker, plugin, hook).await {
            Ok(latency) => outcome.plugin_latency = Some(latency),
            Err(error) => outcome.errors.push(format!("plugin calls: {error:#}")),
        }
    }
    Ok(outcome)
}

fn percentiles(samples_ns: &mut [u64]) -> Percentiles {
    if samples_ns.is_empty() {
        return Percentiles::default();
    }
    samples_ns.sort_unstable();
    let at = |q: f64| {
        let index = ((samples_ns.len() as f64 - 1.0) * q).round() as usize;
        samples_ns.get(index).copied().unwrap_or(0) as f64 / 1000.0
    };
    let mean = samples_ns.iter().map(|&v| v as f64).sum::<f64>() / samples_ns.len() as f64 / 1000.0;
    Percentiles {
        samples: samples_ns.len(),
        p50_us: at(0.50),
        p90_us: at(0.90),
        p99_us: at(0.99),
        p999_us: at(0.999),
        max_us: at(1.0),
        mean_us: mean,
    }
}

async fn run_idle(broker: &mut RunningBroker, dialer: &Dialer, settings: &Settings) -> Result<Outcome> {
    let total = settings.idle_connections;
    sleep(Duration::from_millis(300)).await;
    let before = broker.rss_kib()?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..settings.connect_workers.max(1) * 8 {
        let next = next.clone();
        let dialer = dialer.clone();
        workers.push(tokio::spawn(async move {
            let mut streams = Vec::new();
            let mut failures = 0u64;
            let mut first_error = None;
            loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= total {
                    break;
                }
                match Conn::connect(&dialer, i, &format!("idle-{i}"), 256).await {
                    Ok(conn) => streams.push(conn.stream),
                    Err(error) => {
                        failures += 1;
                        first_error.get_or_insert_with(|| format!("{error:#}"));
                    }
                }
            }
            (streams, failures, first_error)
        }));
    }
    let mut outcome = Outcome { unit: "KiB/conn", rss_before_kib: Some(before), ..Default::default() };
    let streams = gather(workers, &mut outcome).await?;
    let open_time = started.elapsed();
    sleep(Duration::from_secs(1)).await;
    let cpu = CpuSnapshot::take(broker);
    sleep(Duration::from_secs(1)).await;
    let (idle_cpu, _) = CpuSnapshot::take(broker).percent_since(&cpu);
    let after = broker.rss_kib()?;
    // A connection the broker has closed meanwhile reads as end-of-file (or an error) instead of blocking.
    let mut probe = [0u8; 64];
    let closed = streams
        .iter()
        .filter(|stream| match stream {
            tokio_util::either::Either::Left(tcp) => match tcp.try_read(&mut probe) {
                Err(error) => error.kind() != std::io::ErrorKind::WouldBlock,
                Ok(_) => true,
            },
            // Idle TLS connections are not a scenario; nothing to probe without a read.
            tokio_util::either::Either::Right(_) => false,
        })
        .count();
    if closed > 0 {
        outcome.failures += closed as u64;
        outcome.errors.push(format!("{closed} idle connections were closed by the broker"));
    }
    let opened = streams.len() as u64;
    outcome.connections = Some(opened);
    outcome.broker_rss_kib = Some(after);
    outcome.broker_cpu_pct = idle_cpu;
    outcome.measured_s = open_time.as_secs_f64();
    if opened > 0 {
        outcome.value = Some(after.saturating_sub(before) as f64 / opened as f64);
    }
    drop(streams);
    Ok(outcome)
}

async fn run_connection_rate(broker: &mut RunningBroker, dialer: &Dialer, settings: &Settings) -> Result<Outcome> {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..settings.connect_workers.max(1) {
        let done = done.clone();
        let stop = stop.clone();
        let dialer = dialer.clone();
        workers.push(tokio::spawn(async move {
            let mut failures = 0u64;
            let mut first_error = None;
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                n += 1;
                let attempt = async {
                    let conn = Conn::connect(&dialer, w, &format!("cr-{w}-{n}"), 256).await?;
                    conn.disconnect(Duration::from_secs(1)).await
                };
                match timeout(Duration::from_secs(5), attempt).await {
                    Ok(Ok(())) => {
                        done.fetch_add(1, Relaxed);
                    }
                    Ok(Err(error)) => {
                        failures += 1;
                        first_error.get_or_insert_with(|| format!("{error:#}"));
                        sleep(Duration::from_millis(10)).await;
                    }
                    Err(_) => {
                        failures += 1;
                        first_error.get_or_insert_with(|| "connect cycle timed out".to_string());
                    }
                }
            }
            (Vec::<()>::new(), failures, first_error)
        }));
    }
    sleep(settings.warmup).await;
    let count_start = done.load(Relaxed);
    let cpu_start = CpuSnapshot::take(broker);
    sleep(settings.duration).await;
    let count_end = done.load(Relaxed);
    let cpu_end = CpuSnapshot::take(broker);
    stop.store(true, Relaxed);
    let mut outcome = Outcome { unit: "conn/s", ..Default::default() };
    gather(workers, &mut outcome).await?;
    let measured = outcome.record_cpu(&cpu_start, &cpu_end);
    outcome.connections = Some(done.load(Relaxed));
    outcome.value = Some((count_end - count_start) as f64 / measured.max(1e-9));
    Ok(outcome)
}

/// What a connect worker gathered, how many of its attempts failed, and its first error.
type WorkerResult<T> = (Vec<T>, u64, Option<String>);

/// Joins connect workers that each return what they gathered, a failure count and their first error; the errors
/// (the first three) and failures go into `outcome`.
async fn gather<T>(workers: Vec<JoinHandle<WorkerResult<T>>>, outcome: &mut Outcome) -> Result<Vec<T>> {
    let mut all = Vec::new();
    for worker in workers {
        let (mut list, failures, first_error) = worker.await?;
        all.append(&mut list);
        outcome.failures += failures;
        outcome.errors.extend(first_error);
    }
    outcome.errors.truncate(3);
    Ok(all)
}

/// Each car connects once, `connect_workers` at a time: TLS handshake with the car's own certificate, CONNECT with
/// its VIN as client id and no user name, CONNACK (the time from TCP connect to here is the sample), DISCONNECT.
/// For a plugin variant the plugin's own `authenticate` latency is read from `$SYS` afterwards.
async fn run_car_connects(
    broker: &mut RunningBroker,
    dialer: &Dialer,
    vins: &[String],
    settings: &Settings,
) -> Result<Outcome> {
    let vins: Arc<Vec<String>> = Arc::new(vins.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_start = CpuSnapshot::take(broker);
    let mut workers = Vec::new();
    for _ in 0..settings.connect_workers.max(1) {
        let (next, vins, dialer) = (next.clone(), vins.clone(), dialer.clone());
        workers.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut failures = 0u64;
            let mut first_error = None;
            loop {
                let car = next.fetch_add(1, Relaxed);
                let Some(vin) = vins.get(car) else { break };
                let started = Instant::now();
                let attempt = async {
                    let conn = Conn::connect_as(&dialer, car, vin, None, 256).await?;
                    let took = started.elapsed();
                    conn.disconnect(Duration::from_secs(1)).await?;
                    anyhow::Ok(took)
                };
                match timeout(Duration::from_secs(10), attempt).await {
                    Ok(Ok(took)) => samples.push(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX)),
                    Ok(Err(error)) => {
                        failures += 1;
                        first_error.get_or_insert_with(|| format!("{vin}: {error:#}"));
                    }
                    Err(_) => {
                        failures += 1;
                        first_error.get_or_insert_with(|| format!("{vin}: connect timed out"));
                    }
                }
            }
            (samples, failures, first_error)
        }));
    }
    let mut outcome = Outcome { unit: "conn/s", ..Default::default() };
    let mut samples = gather(workers, &mut outcome).await?;
    let measured = outcome.record_cpu(&cpu_start, &CpuSnapshot::take(broker));
    outcome.connections = Some(samples.len() as u64);
    outcome.value = Some(samples.len() as f64 / measured.max(1e-9));
    outcome.latency = Some(percentiles(&mut samples));
    if let Some(plugin) = broker.kind.connect_plugin() {
        match read_plugin_latency(broker, plugin, "authenticate").await {
            Ok(latency) => outcome.plugin_latency = Some(latency),
            Err(error) => outcome.errors.push(format!("plugin latency: {error:#}")),
        }
    }
    Ok(outcome)
}

/// A hook's latency from `$SYS/broker/plugins/<plugin>/latency/<hook>/…`, read over the broker's plain listener
/// with the benchmark's user name. The broker publishes `$SYS` every second in this scenario; waiting a little
/// longer than that makes the retained readings cover every connect made before.
async fn read_plugin_latency(broker: &RunningBroker, plugin: &str, hook: &str) -> Result<PluginLatency> {
    let addr = broker.observer.ok_or_else(|| anyhow!("the broker has no plain listener to read $SYS from"))?;
    sleep(Duration::from_millis(1500)).await;
    let mut conn = Conn::connect(&Dialer::tcp(addr), 0, "bench-observer", 4096).await?;
    let plugin_prefix = format!("$SYS/broker/plugins/{plugin}/");
    let prefix = format!("{plugin_prefix}latency/{hook}/");
    conn.subscribe(&format!("{plugin_prefix}#"), QoS::AtMostOnce).await?;
    let mut readings = std::collections::BTreeMap::new();
    let wanted = ["latency/{hook}/count", "latency/{hook}/p50_us", "latency/{hook}/p99_us", "latency/{hook}/max_us"]
        .map(|name| name.replace("{hook}", hook));
    timeout(Duration::from_secs(3), async {
        let totals = ["instances_created", "calls", "invocations"].map(String::from);
        while !wanted.iter().chain(totals.iter()).all(|name| readings.contains_key(name)) {
            if let Packet::Publish(publish) = conn.next_packet().await?
                && let Some(name) = publish.topic.strip_prefix(plugin_prefix.as_str())
            {
                readings.insert(name.to_string(), String::from_utf8_lossy(&publish.payload).into_owned());
            }
        }
        anyhow::Ok(())
    })
    .await
    .map_err(|_| anyhow!("{prefix}… incomplete after 3 s: {readings:?}"))??;
    let number = |name: &str| -> Result<f64> {
        let text = readings.get(name).ok_or_else(|| anyhow!("no {plugin_prefix}{name}"))?;
        text.parse().map_err(|_| anyhow!("{plugin_prefix}{name} = {text:?}"))
    };
    let latency = |reading: &str| number(&format!("latency/{hook}/{reading}"));
    Ok(PluginLatency {
        plugin: plugin.into(),
        hook: hook.into(),
        count: latency("count")? as u64,
        p50_us: latency("p50_us")?,
        p99_us: latency("p99_us")?,
        max_us: latency("max_us")?,
        instances: number("instances_created")? as u64,
        calls: number("calls")? as u64,
        invocations: number("invocations")? as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracker_counts_loss_duplicates_and_reordering() {
        let mut tracker = Tracker::default();
        for seq in [0, 1, 3, 2, 3, 5, 100_000] {
            tracker.record(seq);
        }
        assert_eq!(tracker.unique, 6);
        assert_eq!(tracker.duplicates, 1);
        assert_eq!(tracker.reordered, 1);
        assert_eq!(tracker.next, 100_001);
    }

    #[test]
    fn percentiles_of_known_samples() {
        let mut samples: Vec<u64> = (1..=1000).map(|v| v * 1000).collect();
        let p = percentiles(&mut samples);
        assert_eq!(p.samples, 1000);
        assert!((p.p50_us - 500.0).abs() <= 1.0);
        assert!((p.p99_us - 990.0).abs() <= 1.0);
        assert_eq!(p.max_us, 1000.0);
    }

    #[test]
    fn scenario_names_are_unique() {
        let list = all(8, 1000);
        let mut names: Vec<_> = list.iter().map(|s| s.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), list.len());
    }
}
