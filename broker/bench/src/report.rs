//! The markdown table and the JSON document.

use std::fmt::Write as _;

use serde::Serialize;

use crate::brokers::{BrokerKind, Limits};
use crate::scenarios::{Outcome, PluginLatency};

#[derive(Clone, Debug, Serialize)]
pub struct Meta {
    pub date: String,
    pub machine: Machine,
    pub versions: Vec<(BrokerKind, String)>,
    /// Brokers that were asked for but could not be run, with the reason.
    pub missing: Vec<(BrokerKind, String)>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub idle_connections: usize,
    pub connect_workers: usize,
    pub client_threads: usize,
    pub limits: Limits,
    pub nofile_limit: u64,
    pub max_interference_pct: f64,
    pub retries: u32,
    /// Rounds per scenario (`--rounds`); each row shows its broker's median round.
    pub rounds: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    pub nproc: usize,
    pub cpu: String,
    pub kernel: String,
    pub mem_total_kib: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Entry {
    pub broker: BrokerKind,
    pub scenario: &'static str,
    pub title: String,
    pub outcome: Outcome,
}

#[derive(Serialize)]
pub struct Document<'a> {
    pub meta: &'a Meta,
    pub results: &'a [Entry],
}

/// One row of the headline table: which scenario, which number of it, and whether higher is better.
struct Row {
    scenario: &'static str,
    label: String,
    unit: &'static str,
    higher_is_better: bool,
    pick: fn(&Outcome) -> Option<f64>,
}

fn messages_per_call(latency: &PluginLatency) -> String {
    latency.messages_per_call().map_or_else(|| "–".into(), |mean| format!("{mean:.1}"))
}

fn latency_p50(outcome: &Outcome) -> Option<f64> {
    outcome.latency.as_ref().filter(|latency| latency.samples > 0).map(|latency| latency.p50_us)
}

fn latency_p99(outcome: &Outcome) -> Option<f64> {
    outcome.latency.as_ref().filter(|latency| latency.samples > 0).map(|latency| latency.p99_us)
}

/// The figure a scenario's first row shows, and whether higher is better: the p50 of the latency scenario, the
/// broker's CPU per message under the site's fixed load, the headline value elsewhere (lower is better for memory).
pub fn headline(scenario: &str, outcome: &Outcome) -> (Option<f64>, bool) {
    match scenario {
        "latency" => (latency_p50(outcome), false),
        "site-load" => (outcome.cpu_us_per_message, false),
        _ => (outcome.value, outcome.unit != "KiB/conn"),
    }
}

fn rows(entries: &[Entry]) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for entry in entries {
        if rows.iter().any(|row| row.scenario == entry.scenario) {
            continue;
        }
        if entry.scenario == "site-load" {
            rows.push(Row {
                scenario: entry.scenario,
                label: format!("{} — broker CPU per message", entry.title),
                unit: "µs",
                higher_is_better: false,
                pick: |o| o.cpu_us_per_message,
            });
            rows.push(Row {
                scenario: entry.scenario,
                label: format!("{} — delivery p99", entry.title),
                unit: "µs",
                higher_is_better: false,
                pick: latency_p99,
            });
        } else if entry.scenario == "latency" {
            rows.push(Row {
                scenario: entry.scenario,
                label: format!("{} — p50", entry.title),
                unit: "µs",
                higher_is_better: false,
                pick: latency_p50,
            });
            rows.push(Row {
                scenario: entry.scenario,
                label: format!("{} — p99", entry.title),
                unit: "µs",
                higher_is_better: false,
                pick: latency_p99,
            });
        } else {
            rows.push(Row {
                scenario: entry.scenario,
                label: entry.title.clone(),
                unit: entry.outcome.unit,
                higher_is_better: entry.outcome.unit != "KiB/conn",
                pick: |o| o.value,
            });
            if entry.outcome.unit == "conn/s" && entry.outcome.latency.is_some() {
                rows.push(Row {
                    scenario: entry.scenario,
                    label: format!("{} — connect p99 (TCP connect to CONNACK)", entry.title),
                    unit: "µs",
                    higher_is_better: false,
                    pick: latency_p99,
                });
            }
        }
    }
    rows
}

pub fn format_number(value: f64) -> String {
    if value.abs() >= 100.0 {
        let rounded = value.round() as i64;
        let digits = rounded.abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        if rounded < 0 { format!("-{out}") } else { out }
    } else if value.abs() >= 10.0 {
        format!("{value:.1}")
    } else {
        format!("{value:.2}")
    }
}

pub fn format_count(value: u64) -> String {
    format_number(value as f64).split('.').next().unwrap_or_default().to_string()
}

fn find<'a>(entries: &'a [Entry], broker: BrokerKind, scenario: &str) -> Option<&'a Entry> {
    entries.iter().find(|e| e.broker == broker && e.scenario == scenario)
}

pub fn markdown(meta: &Meta, entries: &[Entry]) -> String {
    let mut out = String::new();
    let brokers: Vec<BrokerKind> =
        BrokerKind::ALL.into_iter().filter(|b| entries.iter().any(|e| e.broker == *b)).collect();
    let _ = writeln!(out, "# Tollgate benchmark\n");
    let _ = writeln!(out, "- Date: {}", meta.date);
    let _ = writeln!(
        out,
        "- Machine: {} CPUs (nproc), {}, {} MiB RAM, Linux {}",
        meta.machine.nproc,
        meta.machine.cpu,
        meta.machine.mem_total_kib / 1024,
        meta.machine.kernel
    );
    for (kind, version) in &meta.versions {
        let _ = writeln!(out, "- {}: {}", kind.title(), version);
    }
    for (kind, reason) in &meta.missing {
        let _ = writeln!(out, "- {}: **not run** — {}", kind.title(), reason);
    }
    let _ = writeln!(
        out,
        "- Run: {:.1} s measured per scenario after {:.1} s warm-up, a fresh broker process per scenario; \
         broker limits max_inflight {} / max_queued {}; client: {} tokio threads; fd limit {}; \
         {} idle connections; {} connect workers",
        meta.duration_s,
        meta.warmup_s,
        meta.limits.max_inflight,
        meta.limits.max_queued,
        meta.client_threads,
        meta.nofile_limit,
        meta.idle_connections,
        meta.connect_workers,
    );
    let _ = writeln!(
        out,
        "- A scenario during which other processes used more than {:.0}% of a core is repeated (at most {} \
         times) and the least disturbed attempt is reported.",
        meta.max_interference_pct, meta.retries
    );
    if meta.rounds > 1 {
        let _ = writeln!(
            out,
            "- Every scenario was measured in {} rounds, the brokers taking turns in each; a row shows that \
             broker's median round, and the notes list every round.",
            meta.rounds
        );
    }
    let _ = writeln!(out, "- Brokers and load generator share the same {} cores over loopback.\n", meta.machine.nproc);

    // Headline table.
    let ratio_brokers: Vec<BrokerKind> =
        brokers.iter().copied().filter(|b| *b != BrokerKind::Tollgate && !b.is_plugin_variant()).collect();
    let with_ratios = brokers.contains(&BrokerKind::Tollgate) && !ratio_brokers.is_empty();
    let _ = write!(out, "| Scenario | Unit |");
    for broker in &brokers {
        let _ = write!(out, " {} |", broker.title());
    }
    if with_ratios {
        for broker in &ratio_brokers {
            let _ = write!(out, " Tollgate/{} |", broker.title());
        }
    }
    let _ = writeln!(out);
    let columns = 2 + brokers.len() + if with_ratios { ratio_brokers.len() } else { 0 };
    let _ = writeln!(out, "|{}", "---|".repeat(columns));
    let mut flagged = false;
    for row in rows(entries) {
        let unit = if row.higher_is_better { row.unit.to_string() } else { format!("{} (lower is better)", row.unit) };
        let _ = write!(out, "| {} | {} |", row.label, unit);
        for broker in &brokers {
            let cell = match find(entries, *broker, row.scenario) {
                Some(entry) => {
                    let mut cell = match (row.pick)(&entry.outcome) {
                        Some(v) => format_number(v),
                        None => "failed".to_string(),
                    };
                    if !entry.outcome.integrity_ok() {
                        cell.push_str(" ⚠");
                        flagged = true;
                    }
                    cell
                }
                None => "–".to_string(),
            };
            let _ = write!(out, " {cell} |");
        }
        if with_ratios {
            let ours = find(entries, BrokerKind::Tollgate, row.scenario).and_then(|e| (row.pick)(&e.outcome));
            for broker in &ratio_brokers {
                let theirs = find(entries, *broker, row.scenario).and_then(|e| (row.pick)(&e.outcome));
                let cell = match (ours, theirs) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
                    _ => "–".to_string(),
                };
                let _ = write!(out, " {cell} |");
            }
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Ratios are Tollgate divided by the other broker: above 1 is better for Tollgate on rate rows, \
         below 1 is better on rows marked lower is better."
    );
    if flagged {
        let _ = writeln!(out, "⚠ = loss, duplication, reordering, invalid payloads or errors; see below.");
    }

    // Plugin cost: each plugin variant as a share of plain Tollgate, same run, same scenario.
    let variants: Vec<BrokerKind> = brokers.iter().copied().filter(|b| b.is_plugin_variant()).collect();
    if brokers.contains(&BrokerKind::Tollgate) && !variants.is_empty() {
        let _ = writeln!(out, "\n## Plugin cost\n");
        let _ = write!(out, "| Scenario | Unit |");
        for variant in &variants {
            let _ = write!(out, " {} / Tollgate |", variant.title());
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "|{}", "---|".repeat(2 + variants.len()));
        for row in rows(entries) {
            let plain = find(entries, BrokerKind::Tollgate, row.scenario).and_then(|e| (row.pick)(&e.outcome));
            let _ = write!(out, "| {} | {} |", row.label, row.unit);
            for variant in &variants {
                let with = find(entries, *variant, row.scenario).and_then(|e| (row.pick)(&e.outcome));
                let cell = match (with, plain) {
                    (Some(a), Some(b)) if b > 0.0 => format!("{:.0}%", 100.0 * a / b),
                    _ => "–".to_string(),
                };
                let _ = write!(out, " {cell} |");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(
            out,
            "\nA share of 100% means the plugin costs nothing measurable; on rows where lower is better, above 100% \
             is the plugin's cost. The WASM transform computes HMAC-SHA256 of every payload through the host and adds \
             it as a user property; the Lua ACL decides every publish (no decision cache), and once per connection and topic with `cache_decisions = true` (cached); \
             vin-acl (the shipped plugin, uncached) decides every publish and subscribe through its rule templates, for a role by user name \
             in the flow scenarios, and checks each car's certificate identity (VIN syntax, check digit, client id) in the car-connect scenario."
        );
        let timed: Vec<&Entry> = entries.iter().filter(|e| e.outcome.plugin_latency.is_some()).collect();
        if !timed.is_empty() {
            let _ = writeln!(out, "\n### Plugin call latency, measured inside the broker\n");
            let _ = writeln!(
                out,
                "| Scenario | Broker | Hook | Calls | Messages per call | p50 µs | p99 µs | max µs | Instances |"
            );
            let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
            for entry in timed {
                if let Some(p) = &entry.outcome.plugin_latency {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {} |",
                        entry.scenario,
                        entry.broker.title(),
                        p.hook,
                        p.count,
                        messages_per_call(p),
                        p.p50_us,
                        p.p99_us,
                        p.max_us,
                        p.instances
                    );
                }
            }
            let _ = writeln!(
                out,
                "\nFrom `$SYS/broker/plugins/<name>/latency/<hook>/…`: the wall time of each hook call as the connection \
                 waited for it (instance checkout and, for the first calls, instance creation included), to within 12.5%. \
                 Messages per call: the plugin's decisions over its entries (`calls / invocations` in `$SYS`), \
                 i.e. the mean burst one call decided or transformed."
            );
        }
    }

    // Details.
    let _ = writeln!(out, "\n## Details\n");
    let _ = writeln!(
        out,
        "| Scenario | Broker | Published | Delivered | Lost | Dup | Reordered | Invalid | Stalls | Broker CPU | Client CPU | Other CPU | Broker RSS | Notes |"
    );
    let _ = writeln!(out, "|{}", "---|".repeat(14));
    let mut scenarios: Vec<&'static str> = Vec::new();
    for entry in entries {
        if !scenarios.contains(&entry.scenario) {
            scenarios.push(entry.scenario);
        }
    }
    for scenario in scenarios {
        for broker in &brokers {
            let Some(entry) = find(entries, *broker, scenario) else {
                continue;
            };
            let o = &entry.outcome;
            let pct = |v: Option<f64>| v.map(|v| format!("{v:.0}%")).unwrap_or_else(|| "–".into());
            let mut notes = Vec::new();
            if let Some(l) = &o.latency {
                notes.push(format!(
                    "latency µs: p50 {:.0}, p90 {:.0}, p99 {:.0}, p99.9 {:.0}, max {:.0}, mean {:.0} ({} samples)",
                    l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.mean_us, l.samples
                ));
            }
            if let Some(p) = &o.plugin_latency {
                notes.push(format!(
                    "plugin {} {} µs: p50 {:.1}, p99 {:.1}, max {:.1} ({} calls, {} instances)",
                    p.plugin, p.hook, p.p50_us, p.p99_us, p.max_us, p.count, p.instances
                ));
            }
            if let (Some(before), Some(after), Some(n)) = (o.rss_before_kib, o.broker_rss_kib, o.connections)
                && o.unit == "KiB/conn"
            {
                notes
                    .push(format!("RSS {before} → {after} KiB with {n} connections (opened in {:.1} s)", o.measured_s));
            } else if let Some(n) = o.connections {
                notes.push(format!("{n} connections"));
            }
            if o.unit == "msg/s" && o.max_stream_gap_ms >= 50.0 {
                notes.push(format!(
                    "delivery paused up to {:.0} ms (one publisher's stream) / {:.0} ms (whole subscriber)",
                    o.max_stream_gap_ms, o.max_gap_ms
                ));
            }
            if o.rounds.len() > 1 {
                let figures: Vec<String> =
                    o.rounds.iter().map(|round| round.map(format_number).unwrap_or_else(|| "failed".into())).collect();
                notes.push(format!("rounds: {} (median shown)", figures.join(", ")));
            }
            if o.attempts > 1 {
                notes.push(format!("{} attempts (others busy), least disturbed shown", o.attempts));
            }
            if o.failures > 0 {
                notes.push(format!("{} failed attempts", o.failures));
            }
            if o.unacked > 0 {
                notes.push(format!("{} PUBLISHes never acknowledged", o.unacked));
            }
            if o.bad_acks > 0 {
                notes.push(format!("{} unexpected PUBACKs", o.bad_acks));
            }
            for detail in &o.loss_detail {
                notes.push(detail.clone());
            }
            for error in &o.errors {
                notes.push(format!("error: {}", error.replace('|', "/")));
            }
            let flow = o.unit == "msg/s";
            let num = |v: u64| if flow { format_count(v) } else { "–".into() };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                entry.scenario,
                broker.title(),
                num(o.published),
                num(o.delivered),
                num(o.lost),
                num(o.duplicates),
                num(o.reordered),
                num(o.invalid),
                num(o.stalls),
                pct(o.broker_cpu_pct),
                pct(o.client_cpu_pct),
                pct(o.other_cpu_pct),
                o.broker_rss_kib
                    .map(|k| format!("{} MiB", format_number(k as f64 / 1024.0)))
                    .unwrap_or_else(|| "–".into()),
                notes.join("; "),
            );
        }
    }
    let _ = writeln!(
        out,
        "\nPublished/Delivered count the whole run (warm-up and drain included); the headline rate counts only \
         messages delivered in the measured window. Broker CPU is percent of one core over the measured window \
         (200% = both cores); Other CPU is what the rest of the machine used meanwhile, i.e. interference. Stalls: times a publisher waited {} ms for its subscribers and sent anyway.",
        crate::scenarios::STALL.as_millis()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_grouped() {
        assert_eq!(format_number(1234567.4), "1,234,567");
        assert_eq!(format_number(123.0), "123");
        assert_eq!(format_number(12.345), "12.3");
        assert_eq!(format_number(1.234), "1.23");
    }
}
