//! `tollgate-bench`: runs the same MQTT workloads against Tollgate, Mosquitto and rumqttd, each started as its
//! own process on a free loopback port, and prints a markdown table with the ratios. See README.md.

mod bridge;
mod brokers;
mod client;
mod pki;
mod report;
mod restart;
mod scenarios;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

use crate::brokers::{BrokerKind, BrokerSpec, Limits, Program, RunningBroker, Setup};
use crate::report::{Entry, Machine, Meta};
use crate::scenarios::{Outcome, Settings, Transport, Workload};

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum BrokerChoice {
    /// The three brokers and both plugin variants.
    All,
    Tollgate,
    Mosquitto,
    Rumqttd,
    /// Tollgate with, and without, each benchmark plugin.
    Plugins,
    TollgateWasm,
    TollgateLua,
    TollgateVinAcl,
    TollgateMsgAuth,
}

#[derive(Parser, Debug)]
#[command(name = "tollgate-bench", about = "Side-by-side benchmark of Tollgate, Mosquitto and rumqttd on loopback")]
struct Cli {
    /// Which brokers to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    broker: Vec<BrokerChoice>,
    /// Short durations and fewer idle connections, for a smoke run.
    #[arg(long)]
    quick: bool,
    /// Measured seconds per scenario and broker (default 5, 1 with --quick).
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds before measuring (default 0.5, 0.2 with --quick).
    #[arg(long)]
    warmup: Option<f64>,
    /// Only scenarios whose name contains one of these (comma-separated), e.g. `pairs,latency`. `--list`
    /// shows the names.
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Instead of the scenarios: a site broker bridged to a cloud broker, Tollgate (queue in memory and on
    /// disk) against Mosquitto; live throughput, backlog drain rate and the site's memory with the backlog.
    #[arg(long)]
    bridge: bool,
    /// Messages per bridge measurement (live, then the same number as backlog).
    #[arg(long, default_value_t = 50_000)]
    bridge_messages: u64,
    /// Instead of the scenarios: restart Tollgate (`[persistence]`) and Mosquitto (`persistence true`) holding
    /// offline sessions with queued messages; save, restore and recovery times, state size and memory.
    #[arg(long)]
    restart: bool,
    /// Offline persistent sessions in the restart benchmark.
    #[arg(long, default_value_t = 2_000)]
    restart_sessions: usize,
    /// QoS 1 messages queued for each of them.
    #[arg(long, default_value_t = 20)]
    restart_messages: u64,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the markdown report to this file.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Publisher/subscriber pairs in the pairs scenarios.
    #[arg(long, default_value_t = 8)]
    pairs: usize,
    /// Connections opened by the idle-memory scenario (default 10000, 1000 with --quick).
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Cars (each with its own client certificate) in the mutual-TLS connect scenario.
    #[arg(long, default_value_t = 1000)]
    car_connects: usize,
    /// Turn `$SYS` on (every second) for the plugin variants and report, per flow, the plugin's calls on its
    /// publish hook and how many messages one call carried (bursts are authorized and transformed in one call).
    #[arg(long)]
    plugin_calls: bool,
    /// Concurrent connect loops in the connection-rate scenarios (the idle scenario uses 8× as many).
    #[arg(long, default_value_t = 16)]
    connect_workers: usize,
    /// Repeat a scenario when other processes used more than this much CPU (percent of one core) during it.
    #[arg(long, default_value_t = 30.0)]
    max_interference: f64,
    /// How often a disturbed scenario is repeated at most; the least disturbed attempt is reported.
    #[arg(long, default_value_t = 2)]
    retries: u32,
    /// Measure every scenario this many times, the brokers taking turns within each round, and report the median
    /// round of each broker (all rounds' figures are in the notes). Ratios near 1 need this: on a shared VM one
    /// broker's figure moves by ±10% between runs minutes apart.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Worker threads of the load generator's runtime.
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// max_inflight given to every broker.
    #[arg(long, default_value_t = 100)]
    max_inflight: u16,
    /// max_queued_messages given to every broker.
    #[arg(long, default_value_t = 100_000)]
    max_queued: u32,
    #[arg(long)]
    tollgate_bin: Option<PathBuf>,
    #[arg(long)]
    mosquitto_bin: Option<PathBuf>,
    #[arg(long)]
    rumqttd_bin: Option<PathBuf>,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(cli.client_threads.max(1)).enable_all().build()?;
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    if cli.bridge {
        return run_bridge(&cli).await;
    }
    if cli.restart {
        return run_restart(&cli).await;
    }
    let all_scenarios = scenarios::all(cli.pairs.max(1), cli.car_connects.max(1));
    if cli.list {
        for scenario in &all_scenarios {
            println!("{:<12} {}", scenario.name, scenario.title);
        }
        return Ok(());
    }
    let selected: Vec<_> = all_scenarios
        .into_iter()
        .filter(|s| cli.scenarios.is_empty() || cli.scenarios.iter().any(|f| s.name.contains(f.as_str())))
        .collect();
    if selected.is_empty() {
        bail!("no scenario matches {:?} (see --list)", cli.scenarios);
    }

    let nofile = raise_fd_limit();
    let mut idle_connections = cli.idle_connections.unwrap_or(if cli.quick { 1000 } else { 10_000 });
    // Our process holds one fd per connection and so does the broker, which inherits this limit.
    let room = nofile.saturating_sub(200) as usize;
    if idle_connections > room {
        eprintln!("fd limit {nofile}: idle connections reduced from {idle_connections} to {room}");
        idle_connections = room;
    }
    let pki = if selected.iter().any(|s| s.transport != Transport::Tcp) {
        let dir = std::env::temp_dir().join(format!("tollgate-bench-{}-pki", std::process::id()));
        eprintln!("generating a CA, a server certificate and {} car certificates", cli.car_connects);
        Some(std::sync::Arc::new(pki::Pki::generate(&dir, cli.car_connects.max(1))?))
    } else {
        None
    };
    let settings = Settings {
        duration: Duration::from_secs_f64(cli.duration.unwrap_or(if cli.quick { 1.0 } else { 5.0 })),
        warmup: Duration::from_secs_f64(cli.warmup.unwrap_or(if cli.quick { 0.2 } else { 0.5 })),
        idle_connections,
        connect_workers: cli.connect_workers.max(1),
        pki,
        plugin_calls: cli.plugin_calls,
    };
    let limits =
        Limits { max_inflight: cli.max_inflight, max_queued: cli.max_queued, max_connections: idle_connections + 1000 };

    let workspace = workspace_dir();
    let mut kinds: Vec<BrokerKind> = Vec::new();
    for choice in &cli.broker {
        let add: &[BrokerKind] = match choice {
            BrokerChoice::All => &BrokerKind::ALL,
            BrokerChoice::Tollgate => &[BrokerKind::Tollgate],
            BrokerChoice::Mosquitto => &[BrokerKind::Mosquitto],
            BrokerChoice::Rumqttd => &[BrokerKind::Rumqttd],
            BrokerChoice::Plugins => &[
                BrokerKind::Tollgate,
                BrokerKind::TollgateWasm,
                BrokerKind::TollgateLua,
                BrokerKind::TollgateLuaCached,
                BrokerKind::TollgateVinAcl,
                BrokerKind::TollgateVinAclCached,
                BrokerKind::TollgateMsgAuth,
            ],
            BrokerChoice::TollgateWasm => &[BrokerKind::TollgateWasm],
            BrokerChoice::TollgateLua => &[BrokerKind::TollgateLua],
            BrokerChoice::TollgateVinAcl => &[BrokerKind::TollgateVinAcl, BrokerKind::TollgateVinAclCached],
            BrokerChoice::TollgateMsgAuth => &[BrokerKind::TollgateMsgAuth],
        };
        for kind in add {
            if !kinds.contains(kind) {
                kinds.push(*kind);
            }
        }
    }
    let mut specs: Vec<BrokerSpec> = Vec::new();
    let mut missing = Vec::new();
    for kind in kinds {
        let explicit = match kind.program() {
            Program::Tollgate => cli.tollgate_bin.as_deref(),
            Program::Mosquitto => cli.mosquitto_bin.as_deref(),
            Program::Rumqttd => cli.rumqttd_bin.as_deref(),
        };
        match brokers::locate(kind, explicit, &workspace) {
            Ok(spec) => specs.push(spec),
            Err(error) => {
                eprintln!("skipping {kind}: {error:#}");
                missing.push((kind, format!("{error:#}")));
            }
        }
    }
    if specs.is_empty() {
        bail!("no broker to benchmark");
    }

    let mut meta = Meta {
        date: date(),
        machine: machine(),
        versions: specs.iter().map(|s| (s.kind, s.version.clone())).collect(),
        missing,
        duration_s: settings.duration.as_secs_f64(),
        warmup_s: settings.warmup.as_secs_f64(),
        idle_connections: settings.idle_connections,
        connect_workers: settings.connect_workers,
        client_threads: cli.client_threads.max(1),
        limits,
        nofile_limit: nofile,
        max_interference_pct: cli.max_interference,
        retries: cli.retries,
        rounds: cli.rounds.max(1),
    };

    // Scenario by scenario, the brokers back to back (and taking turns when there are several rounds): a ratio
    // compares figures taken seconds apart, not one broker's whole run against another's minutes later.
    let rounds = cli.rounds.max(1);
    let mut entries = Vec::new();
    for (n, scenario) in selected.iter().enumerate() {
        let runnable: Vec<&BrokerSpec> = specs.iter().filter(|spec| spec.kind.supports(scenario.transport)).collect();
        let mut measured: Vec<Vec<Outcome>> = vec![Vec::new(); runnable.len()];
        for round in 1..=rounds {
            for (index, spec) in runnable.iter().enumerate() {
                let round_label = if rounds > 1 { format!(" round {round}/{rounds}") } else { String::new() };
                eprint!("   {:<16} {:<32} ", scenario.name, format!("{}{round_label}", spec.kind.title()));
                let outcome = measure(spec, scenario, &settings, limits, n, &cli).await;
                eprintln!("{}", summary(&outcome));
                measured[index].push(outcome);
            }
        }
        for (spec, outcomes) in runnable.iter().zip(measured) {
            entries.push(Entry {
                broker: spec.kind,
                scenario: scenario.name,
                title: scenario.title.clone(),
                outcome: median_round(scenario.name, outcomes),
            });
        }
    }
    meta.date = format!("{} (finished)", date());

    let markdown = report::markdown(&meta, &entries);
    println!("{markdown}");
    if let Some(path) = &cli.markdown {
        std::fs::write(path, &markdown).with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &cli.json {
        let document = report::Document { meta: &meta, results: &entries };
        std::fs::write(path, serde_json::to_string_pretty(&document)?)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// One measurement of a scenario; when other processes were busy during it, measured again (at most
/// `--retries` times) and the least disturbed attempt kept.
async fn measure(
    spec: &BrokerSpec,
    scenario: &scenarios::Scenario,
    settings: &Settings,
    limits: Limits,
    n: usize,
    cli: &Cli,
) -> Outcome {
    let mut best: Option<Outcome> = None;
    for attempt in 1..=cli.retries + 1 {
        let mut outcome = match run_one(spec, scenario, settings, limits, n).await {
            Ok(outcome) => outcome,
            Err(error) => Outcome { errors: vec![format!("{error:#}")], ..Default::default() },
        };
        outcome.attempts = attempt;
        let interference = outcome.other_cpu_pct.unwrap_or(0.0);
        let disturbed = interference > cli.max_interference;
        if disturbed && attempt <= cli.retries {
            eprint!("[other CPU {interference:.0}%, again] ");
        }
        let better = best.as_ref().is_none_or(|b| interference < b.other_cpu_pct.unwrap_or(0.0));
        if better {
            best = Some(outcome);
        } else if let Some(b) = best.as_mut() {
            b.attempts = attempt;
        }
        if !disturbed {
            break;
        }
    }
    best.unwrap_or_default()
}

/// The round whose headline (see [`report::headline`]) is the median of the rounds, carrying every round's
/// headline. A failed round counts as the worst.
fn median_round(scenario: &str, mut outcomes: Vec<Outcome>) -> Outcome {
    if outcomes.len() < 2 {
        return outcomes.pop().unwrap_or_default();
    }
    let headlines: Vec<Option<f64>> = outcomes.iter().map(|outcome| report::headline(scenario, outcome).0).collect();
    let higher_is_better = outcomes.first().is_none_or(|outcome| report::headline(scenario, outcome).1);
    let mut order: Vec<usize> = (0..outcomes.len()).collect();
    order.sort_by(|&a, &b| {
        // Ascending goodness: the worst first.
        let goodness = |index: usize| match headlines[index] {
            Some(value) if higher_is_better => value,
            Some(value) => -value,
            None => f64::NEG_INFINITY,
        };
        goodness(a).total_cmp(&goodness(b))
    });
    let median = order[(order.len() - 1) / 2];
    let mut chosen = outcomes.swap_remove(median);
    chosen.rounds = headlines;
    chosen
}

async fn run_one(
    spec: &BrokerSpec,
    scenario: &scenarios::Scenario,
    settings: &Settings,
    limits: Limits,
    n: usize,
) -> Result<Outcome> {
    // The car-connect scenario (and the flows with --plugin-calls) read a plugin's latency from $SYS; everywhere
    // else $SYS stays off.
    let reads_sys = match scenario.workload {
        Workload::CarConnects { .. } => spec.kind.connect_plugin().is_some(),
        Workload::Flow(_) => settings.plugin_calls && spec.kind.flow_hook().is_some(),
        _ => false,
    };
    let setup = Setup {
        transport: scenario.transport,
        pki: settings.pki.as_deref(),
        sys_interval: u32::from(reads_sys),
        extra: "",
    };
    let mut broker = RunningBroker::start(spec, limits, setup, &format!("{n}-{}", scenario.name))?;
    let outcome = scenarios::run(scenario, &mut broker, settings).await;
    let tail = broker.log_tail();
    broker.stop()?;
    let mut outcome = outcome?;
    if !outcome.errors.is_empty() && !tail.is_empty() {
        outcome.errors.push(format!("broker log: {tail}"));
    }
    Ok(outcome)
}

fn summary(o: &Outcome) -> String {
    let mut text = match (o.value, &o.latency) {
        (Some(v), Some(l)) if o.unit == "conn/s" => {
            format!("{} {}, connect p50 {:.0} µs, p99 {:.0} µs", report::format_number(v), o.unit, l.p50_us, l.p99_us)
        }
        (_, Some(l)) => format!("p50 {:.0} µs, p99 {:.0} µs", l.p50_us, l.p99_us),
        (Some(v), None) => format!("{} {}", report::format_number(v), o.unit),
        (None, None) => "failed".into(),
    };
    if o.lost + o.duplicates + o.reordered + o.invalid > 0 {
        text.push_str(&format!(
            " [lost {} dup {} reordered {} invalid {}]",
            o.lost, o.duplicates, o.reordered, o.invalid
        ));
    }
    if let Some(cpu) = o.broker_cpu_pct {
        text.push_str(&format!(" (broker CPU {cpu:.0}%)"));
    }
    if let Some(p) = &o.plugin_latency {
        text.push_str(&format!(
            " [plugin {} {}: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs over {} calls, {} instances",
            p.plugin, p.hook, p.p50_us, p.p99_us, p.max_us, p.count, p.instances
        ));
        if let Some(mean) = p.messages_per_call() {
            text.push_str(&format!(", {mean:.1} messages per call"));
        }
        text.push(']');
    }
    for detail in &o.loss_detail {
        text.push_str(&format!("\n      {detail}"));
    }
    for error in &o.errors {
        text.push_str(&format!("\n      error: {error}"));
    }
    text
}

/// Raises the soft open-files limit to the hard one (brokers started from here inherit it).
fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(error) => {
            eprintln!("could not raise the open-files limit: {error}");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(1024)
        }
    }
}

fn workspace_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_else(|| manifest.to_path_buf())
}

fn date() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, name)| name.trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default();
    let mem_total_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    Machine { nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1), cpu, kernel, mem_total_kib }
}

/// `--restart`: Mosquitto and Tollgate taking turns, the median round by recovery time.
async fn run_restart(cli: &Cli) -> Result<()> {
    use crate::restart::RestartOutcome;
    let workspace = workspace_dir();
    let sessions = cli.restart_sessions.max(1);
    let limits =
        Limits { max_inflight: cli.max_inflight, max_queued: cli.max_queued, max_connections: sessions + 1000 };
    let tollgate = brokers::locate(BrokerKind::Tollgate, cli.tollgate_bin.as_deref(), &workspace)?;
    let mosquitto = brokers::locate(BrokerKind::Mosquitto, cli.mosquitto_bin.as_deref(), &workspace)?;
    let rounds = cli.rounds.max(1);
    let mut table = format!(
        "Restart benchmark, {} (Tollgate {}, Mosquitto {}): {sessions} offline MQTT 3.1.1 sessions (clean session \
         off) with {} QoS 1 messages of 64 B queued each, saved at shutdown, restored at start, then every client \
         back; median of {rounds} round(s) by recovery time.\n\n\
         | broker | stop (state saved) | state on disk | start (state read) to listening | RSS after start | \
         sessions resumed | all queued messages delivered in |\n|---|---|---|---|---|---|---|\n",
        date(),
        tollgate.version,
        mosquitto.version,
        cli.restart_messages,
    );
    let brokers = [("Mosquitto", &mosquitto), ("Tollgate", &tollgate)];
    let mut results: Vec<Vec<RestartOutcome>> = vec![Vec::new(); brokers.len()];
    for round in 1..=rounds {
        for (index, (name, spec)) in brokers.iter().enumerate() {
            eprint!("   restart  {name:<10} round {round}/{rounds} ");
            let outcome =
                restart::measure(spec, limits, sessions, cli.restart_messages, &format!("restart-{index}-{round}"))
                    .await;
            match &outcome.error {
                Some(error) => eprintln!("failed: {error}"),
                None => eprintln!(
                    "stop {:.0} ms, {} KiB, start {:.0} ms, RSS {} → {} KiB, resumed {}, {} messages in {:.0} ms",
                    outcome.stop.as_secs_f64() * 1e3,
                    outcome.state_bytes / 1024,
                    outcome.start.as_secs_f64() * 1e3,
                    outcome.rss_before_kib,
                    outcome.rss_after_kib,
                    outcome.resumed,
                    outcome.delivered,
                    outcome.recover.as_secs_f64() * 1e3,
                ),
            }
            results[index].push(outcome);
        }
    }
    for ((name, _), mut outcomes) in brokers.iter().zip(results) {
        if let Some(error) = outcomes.iter().find_map(|outcome| outcome.error.clone()) {
            table.push_str(&format!("| {name} | failed: {error} | | | | | |\n"));
            continue;
        }
        outcomes.sort_by_key(|outcome| outcome.recover);
        let median = &outcomes[outcomes.len() / 2];
        table.push_str(&format!(
            "| {name} | {:.0} ms | {:.1} MiB | {:.0} ms | {:.1} MiB (before: {:.1}) | {} of {sessions} | {:.0} ms ({} messages) |\n",
            median.stop.as_secs_f64() * 1e3,
            median.state_bytes as f64 / (1024.0 * 1024.0),
            median.start.as_secs_f64() * 1e3,
            median.rss_after_kib as f64 / 1024.0,
            median.rss_before_kib as f64 / 1024.0,
            median.resumed,
            median.recover.as_secs_f64() * 1e3,
            median.delivered,
        ));
    }
    println!("{table}");
    if let Some(path) = &cli.markdown {
        std::fs::write(path, &table).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// `--bridge`: each variant bridged to its own kind, sizes 64 B and 1 KiB, rounds taking turns; the median round.
async fn run_bridge(cli: &Cli) -> Result<()> {
    use crate::bridge::{BridgeOutcome, Variant};
    let workspace = workspace_dir();
    let limits = Limits { max_inflight: cli.max_inflight, max_queued: cli.max_queued, max_connections: 1000 };
    let tollgate = brokers::locate(BrokerKind::Tollgate, cli.tollgate_bin.as_deref(), &workspace)?;
    let mosquitto = brokers::locate(BrokerKind::Mosquitto, cli.mosquitto_bin.as_deref(), &workspace)?;
    let variants = [Variant::Mosquitto, Variant::TollgateMemory, Variant::TollgateDisk];
    let rounds = cli.rounds.max(1);
    let mut table = format!(
        "Bridge benchmark, {} (Tollgate {}, Mosquitto {}): {} QoS 1 messages per measurement, publisher window 100, \
         bridge window {}, median of {rounds} round(s).\n\n\
         | payload | site → cloud | live msg/s | backlog drain msg/s | site RSS idle → with backlog |\n\
         |---|---|---|---|---|\n",
        date(),
        tollgate.version,
        mosquitto.version,
        cli.bridge_messages,
        cli.max_inflight,
    );
    for payload in [64usize, 1024] {
        let mut results: Vec<Vec<BridgeOutcome>> = vec![Vec::new(); variants.len()];
        for round in 1..=rounds {
            for (index, variant) in variants.iter().enumerate() {
                let spec = if *variant == Variant::Mosquitto { &mosquitto } else { &tollgate };
                eprint!("   bridge {payload:>5} B  {:<40} round {round}/{rounds} ", variant.title());
                let outcome = bridge::measure(
                    *variant,
                    spec,
                    spec,
                    limits,
                    cli.bridge_messages,
                    payload,
                    &format!("{payload}-{index}-{round}"),
                )
                .await;
                match &outcome.error {
                    Some(error) => eprintln!("failed: {error}"),
                    None => eprintln!(
                        "live {:.0}/s, drain {:.0}/s, RSS {} → {} KiB",
                        outcome.live_msgs_per_s,
                        outcome.backlog_drain_msgs_per_s,
                        outcome.site_rss_idle_kib,
                        outcome.site_rss_backlog_kib
                    ),
                }
                results[index].push(outcome);
            }
        }
        for (variant, mut outcomes) in variants.iter().zip(results) {
            outcomes.sort_by(|a, b| a.live_msgs_per_s.total_cmp(&b.live_msgs_per_s));
            let failed = outcomes.iter().find_map(|outcome| outcome.error.clone());
            let median = &outcomes[outcomes.len() / 2];
            match failed {
                Some(error) => {
                    table.push_str(&format!("| {payload} B | {} | failed: {error} | | |\n", variant.title()))
                }
                None => table.push_str(&format!(
                    "| {payload} B | {} | {:.0} | {:.0} | {:.1} → {:.1} MiB |\n",
                    variant.title(),
                    median.live_msgs_per_s,
                    median.backlog_drain_msgs_per_s,
                    median.site_rss_idle_kib as f64 / 1024.0,
                    median.site_rss_backlog_kib as f64 / 1024.0,
                )),
            }
        }
    }
    println!("{table}");
    if let Some(path) = &cli.markdown {
        std::fs::write(path, &table).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}
