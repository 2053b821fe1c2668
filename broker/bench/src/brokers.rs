//! Starting, watching and stopping the brokers under test, each as its own process on a free loopback port.

use std::fmt;
use std::fs;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::pki::Pki;
use crate::scenarios::Transport;

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Tollgate,
    Mosquitto,
    Rumqttd,
    /// Tollgate with the WebAssembly transform that HMACs every payload through the host.
    #[serde(rename = "tollgate+wasm")]
    TollgateWasm,
    /// Tollgate with a Lua ACL called on every publish.
    #[serde(rename = "tollgate+lua")]
    TollgateLua,
    /// The same Lua ACL with `cache_decisions = true`: called once per connection and topic.
    #[serde(rename = "tollgate+lua-cached")]
    TollgateLuaCached,
    /// Tollgate with the shipped vin-acl plugin deciding every publish and subscribe (uncached). The benchmark
    /// clients have no certificates, so they get a role by user name and a rule on `bench/#`: the same template
    /// engine a car's `${vin}` rules go through.
    #[serde(rename = "tollgate+vin-acl")]
    TollgateVinAcl,
    /// vin-acl as its README configures it, with `cache_decisions = true`.
    #[serde(rename = "tollgate+vin-acl-cached")]
    TollgateVinAclCached,
    /// Tollgate with the shipped msg-auth plugin verifying every publish (HMAC tag on the host, then the replay
    /// window, written to the plugin's state file before the message is routed). The benchmark's publishers sign
    /// every message.
    #[serde(rename = "tollgate+msg-auth")]
    TollgateMsgAuth,
}

impl BrokerKind {
    pub const ALL: [BrokerKind; 9] = [
        Self::Tollgate,
        Self::Mosquitto,
        Self::Rumqttd,
        Self::TollgateWasm,
        Self::TollgateLua,
        Self::TollgateLuaCached,
        Self::TollgateVinAcl,
        Self::TollgateVinAclCached,
        Self::TollgateMsgAuth,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Tollgate => "tollgate",
            Self::Mosquitto => "mosquitto",
            Self::Rumqttd => "rumqttd",
            Self::TollgateWasm => "tollgate+wasm",
            Self::TollgateLua => "tollgate+lua",
            Self::TollgateLuaCached => "tollgate+lua-cached",
            Self::TollgateVinAcl => "tollgate+vin-acl",
            Self::TollgateVinAclCached => "tollgate+vin-acl-cached",
            Self::TollgateMsgAuth => "tollgate+msg-auth",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Self::Tollgate => "Tollgate",
            Self::Mosquitto => "Mosquitto",
            Self::Rumqttd => "rumqttd",
            Self::TollgateWasm => "Tollgate + WASM HMAC transform",
            Self::TollgateLua => "Tollgate + Lua ACL",
            Self::TollgateLuaCached => "Tollgate + Lua ACL (cached)",
            Self::TollgateVinAcl => "Tollgate + vin-acl (uncached)",
            Self::TollgateVinAclCached => "Tollgate + vin-acl (cached)",
            Self::TollgateMsgAuth => "Tollgate + msg-auth verify",
        }
    }

    /// A Tollgate run with a plugin, compared with plain Tollgate rather than with the other brokers.
    pub fn is_plugin_variant(self) -> bool {
        matches!(
            self,
            Self::TollgateWasm
                | Self::TollgateLua
                | Self::TollgateLuaCached
                | Self::TollgateVinAcl
                | Self::TollgateVinAclCached
                | Self::TollgateMsgAuth
        )
    }

    /// The load generator signs every message for this broker.
    pub fn signs_messages(self) -> bool {
        self == Self::TollgateMsgAuth
    }

    /// The name of the plugin a plugin variant loads (its `$SYS/broker/plugins/<name>/…` prefix).
    pub fn plugin_name(self) -> Option<&'static str> {
        match self {
            Self::TollgateVinAcl | Self::TollgateVinAclCached => Some("vin-acl"),
            Self::TollgateMsgAuth => Some("msg-auth"),
            Self::TollgateWasm | Self::TollgateLua | Self::TollgateLuaCached => Some("bench"),
            Self::Tollgate | Self::Mosquitto | Self::Rumqttd => None,
        }
    }

    /// The hook a plugin variant runs on every publish in the flow scenarios (`$SYS/…/latency/<hook>/…`).
    pub fn flow_hook(self) -> Option<&'static str> {
        match self {
            Self::TollgateWasm | Self::TollgateMsgAuth => Some("transform"),
            Self::TollgateLua | Self::TollgateLuaCached | Self::TollgateVinAcl | Self::TollgateVinAclCached => {
                Some("authorize")
            }
            Self::Tollgate | Self::Mosquitto | Self::Rumqttd => None,
        }
    }

    /// The plugin whose `authenticate` hook a connect runs through, for the car-connect scenario's latency reading.
    pub fn connect_plugin(self) -> Option<&'static str> {
        match self {
            Self::TollgateVinAcl | Self::TollgateVinAclCached => self.plugin_name(),
            _ => None,
        }
    }

    /// Whether the benchmark can run this broker over `transport`. rumqttd's TLS needs a build with its TLS
    /// features and has no counterpart in the issue's comparison (Mosquitto with TLS), so it runs plain TCP only.
    pub fn supports(self, transport: Transport) -> bool {
        transport == Transport::Tcp || self.program() != Program::Rumqttd
    }

    /// The program this kind runs: every plugin variant is the Tollgate binary with another configuration.
    pub fn program(self) -> Program {
        match self {
            Self::Mosquitto => Program::Mosquitto,
            Self::Rumqttd => Program::Rumqttd,
            Self::Tollgate
            | Self::TollgateWasm
            | Self::TollgateLua
            | Self::TollgateLuaCached
            | Self::TollgateVinAcl
            | Self::TollgateVinAclCached
            | Self::TollgateMsgAuth => Program::Tollgate,
        }
    }
}

/// The broker programs the benchmark knows how to find, configure and start.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Program {
    Tollgate,
    Mosquitto,
    Rumqttd,
}

impl fmt::Display for BrokerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Limits written into every broker's configuration, the same for all three.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Limits {
    /// Outgoing QoS 1 messages in flight per client.
    pub max_inflight: u16,
    /// Messages queued per client beyond those in flight.
    pub max_queued: u32,
    /// Connections the broker must accept (rumqttd has a hard cap).
    pub max_connections: usize,
}

pub struct BrokerSpec {
    pub kind: BrokerKind,
    pub binary: PathBuf,
    pub version: String,
    /// The plugin of a plugin variant.
    pub plugin: Option<PathBuf>,
}

/// The plugin file of a plugin variant: the Lua script in the source tree, or the WebAssembly transform, built
/// here with cargo (needs `rustup target add wasm32-wasip2`).
fn plugin_for(kind: BrokerKind, workspace: &Path) -> Result<Option<PathBuf>> {
    match kind {
        BrokerKind::TollgateLua | BrokerKind::TollgateLuaCached => {
            Ok(Some(workspace.join("broker/bench/plugins/acl.lua")))
        }
        BrokerKind::TollgateWasm
        | BrokerKind::TollgateVinAcl
        | BrokerKind::TollgateVinAclCached
        | BrokerKind::TollgateMsgAuth => {
            let (package, file) = match kind {
                BrokerKind::TollgateWasm => ("bench-sign-wasm", "bench_sign_wasm.wasm"),
                BrokerKind::TollgateMsgAuth => ("msg-auth", "msg_auth.wasm"),
                _ => ("vin-acl", "vin_acl.wasm"),
            };
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let output = Command::new(cargo)
                .current_dir(workspace)
                .args(["build", "--release", "--target", "wasm32-wasip2", "-p", package])
                .output()
                .context("running cargo to build the benchmark plugin")?;
            if !output.status.success() {
                bail!(
                    "building the WebAssembly plugin failed (`rustup target add wasm32-wasip2`?): {}",
                    String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or_default()
                );
            }
            Ok(Some(workspace.join("target/wasm32-wasip2/release").join(file)))
        }
        _ => Ok(None),
    }
}

/// Finds the binary and its version, or says why the broker cannot be benchmarked.
pub fn locate(kind: BrokerKind, explicit: Option<&Path>, workspace: &Path) -> Result<BrokerSpec> {
    let candidates: Vec<PathBuf> = match (explicit, kind.program()) {
        (Some(path), _) => vec![path.to_path_buf()],
        (None, Program::Tollgate) => {
            let mut list = Vec::new();
            if let Ok(exe) = std::env::current_exe()
                && let Some(dir) = exe.parent()
            {
                list.push(dir.join("tollgate"));
            }
            list.push(workspace.join("target/release/tollgate"));
            list
        }
        (None, Program::Mosquitto) => {
            let mut list = vec![PathBuf::from("/usr/sbin/mosquitto")];
            list.extend(on_path("mosquitto"));
            list
        }
        (None, Program::Rumqttd) => {
            let mut list = Vec::new();
            if let Some(home) = std::env::var_os("CARGO_HOME") {
                list.push(PathBuf::from(home).join("bin/rumqttd"));
            }
            if let Some(home) = std::env::var_os("HOME") {
                list.push(PathBuf::from(home).join(".cargo/bin/rumqttd"));
            }
            list.extend(on_path("rumqttd"));
            list
        }
    };
    let Some(binary) = candidates.into_iter().find(|path| path.is_file()) else {
        bail!(
            "{kind} binary not found ({})",
            match kind.program() {
                Program::Tollgate => "build it with `cargo build --release -p tollgate` or pass --tollgate-bin",
                Program::Mosquitto => "install the Debian package `mosquitto` or pass --mosquitto-bin",
                Program::Rumqttd => "`cargo install rumqttd --locked` or pass --rumqttd-bin",
            }
        );
    };
    let version = match kind.program() {
        Program::Tollgate => {
            let version = first_line(&binary, &["--version"]);
            format!("{version} (git {})", git_rev(workspace))
        }
        Program::Mosquitto => first_line(&binary, &["-h"]),
        Program::Rumqttd => first_line(&binary, &["--version"]),
    };
    let plugin = plugin_for(kind, workspace)?;
    Ok(BrokerSpec { kind, binary, version, plugin })
}

fn on_path(name: &str) -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join(name)).collect())
        .unwrap_or_default()
}

fn first_line(binary: &Path, args: &[&str]) -> String {
    match Command::new(binary).args(args).output() {
        Ok(output) => {
            let text = if output.stdout.is_empty() { output.stderr } else { output.stdout };
            String::from_utf8_lossy(&text)
                .lines()
                .find(|line| !line.trim().is_empty())
                .unwrap_or("unknown")
                .trim()
                .to_string()
        }
        Err(error) => format!("unknown ({error})"),
    }
}

pub fn git_rev(workspace: &Path) -> String {
    let run = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .output()
            .ok()
            .filter(|output| output.status.success())
            .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let Some(rev) = run(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    // Only the broker's own sources decide whether the measured binary differs from the commit.
    let dirty =
        run(&["status", "--porcelain", "--", "broker", ":!broker/bench"]).is_some_and(|status| !status.is_empty());
    if dirty { format!("{rev}-dirty") } else { rev }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// What a scenario needs from the broker's configuration beyond the common limits.
#[derive(Clone, Copy)]
pub struct Setup<'a> {
    pub transport: Transport,
    /// Certificates for a TLS transport.
    pub pki: Option<&'a Pki>,
    /// `$SYS` interval in seconds (0 = off), for scenarios that read the broker's own metrics.
    pub sys_interval: u32,
    /// Appended to the broker's configuration file as it is (the bridge benchmark's bridge sections).
    pub extra: &'a str,
}

pub struct RunningBroker {
    pub kind: BrokerKind,
    /// The listener under test.
    pub addr: SocketAddr,
    /// A plain-TCP loopback listener (Tollgate only: the one under test, or one beside a TLS listener), for reading
    /// `$SYS` without a certificate.
    pub observer: Option<SocketAddr>,
    pub pid: u32,
    child: Child,
    dir: PathBuf,
}

impl RunningBroker {
    pub fn start(spec: &BrokerSpec, limits: Limits, setup: Setup<'_>, tag: &str) -> Result<RunningBroker> {
        let dir = std::env::temp_dir().join(format!("tollgate-bench-{}-{}-{tag}", std::process::id(), spec.kind));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let tls = match (setup.transport, setup.pki) {
            (Transport::Tcp, _) => None,
            (transport, Some(pki)) => Some((pki, transport == Transport::MutualTls)),
            (_, None) => bail!("a TLS scenario without certificates"),
        };
        let mut observer = None;
        let mut command = Command::new(&spec.binary);
        match spec.kind.program() {
            Program::Tollgate => {
                let config = dir.join("tollgate.toml");
                let listener = tls.map(|(pki, mutual)| tollgate_tls(pki, mutual)).unwrap_or_default();
                let mut text = tollgate_config(port, &listener, limits, setup.sys_interval);
                if tls.is_some() {
                    let side = free_port()?;
                    text.push_str(&format!("\n[[listeners]]\nbind = \"127.0.0.1:{side}\"\n"));
                    observer = Some(format!("127.0.0.1:{side}").parse()?);
                } else {
                    observer = Some(addr);
                }
                if let Some(plugin) = &spec.plugin {
                    text.push_str(&plugin_config(spec.kind, plugin, &dir.join("state")));
                }
                text.push_str(setup.extra);
                fs::write(&config, text)?;
                command.arg("run").arg("--config").arg(config);
            }
            Program::Mosquitto => {
                let config = dir.join("mosquitto.conf");
                let mut text = mosquitto_config(port, limits);
                if let Some((pki, mutual)) = tls {
                    text.push_str(&mosquitto_tls(pki, mutual));
                }
                text.push_str(setup.extra);
                fs::write(&config, text)?;
                command.arg("-c").arg(config);
            }
            Program::Rumqttd => {
                if tls.is_some() {
                    bail!("rumqttd runs plain TCP only here");
                }
                let config = dir.join("rumqttd.toml");
                fs::write(&config, rumqttd_config(port, free_port()?, limits))?;
                command.arg("--quiet").arg("--config").arg(config);
            }
        }
        let log = fs::File::create(dir.join("broker.log"))?;
        let child = command
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {}", spec.binary.display()))?;
        let mut broker = RunningBroker { kind: spec.kind, addr, observer, pid: child.id(), child, dir };
        broker.wait_ready()?;
        Ok(broker)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited during startup ({status}): {}", self.kind, self.log_tail());
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not listen on {} within 10 s: {}", self.kind, self.addr, self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process is still running; if not, why.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} died ({status}): {}", self.kind, self.log_tail());
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid)
    }

    pub fn cpu_ticks(&self) -> Result<u64> {
        cpu_ticks(&format!("/proc/{}/stat", self.pid))
    }

    /// SIGTERM, then the time until the process exits (its shutdown work, a state save included); an error if
    /// it is still running after `limit` (it is then killed).
    pub fn stop_timed(mut self, limit: Duration) -> Result<Duration> {
        let started = Instant::now();
        Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status()?;
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait()? {
                if !status.success() {
                    bail!("{} exited with {status} after SIGTERM: {}", self.kind, self.log_tail());
                }
                return Ok(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        bail!("{} still running {limit:?} after SIGTERM", self.kind)
    }

    /// SIGTERM, a grace period, then SIGKILL.
    pub fn stop(mut self) -> Result<()> {
        self.terminate();
        Ok(())
    }

    fn terminate(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = Command::new("kill").arg("-TERM").arg(self.pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningBroker {
    fn drop(&mut self) {
        self.terminate();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// utime + stime in clock ticks from a `/proc/.../stat` file (threads included).
pub fn cpu_ticks(path: &str) -> Result<u64> {
    let stat = fs::read_to_string(path)?;
    // The command name may contain spaces; fields after it are fixed.
    let rest = stat.rsplit_once(')').map(|(_, rest)| rest).context("bad stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = fields.get(11).context("utime")?.parse()?;
    let stime: u64 = fields.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// `listener` holds further keys of the listener under test (its TLS settings).
pub fn tollgate_config(port: u16, listener: &str, limits: Limits, sys_interval: u32) -> String {
    format!(
        r#"[[listeners]]
bind = "127.0.0.1:{port}"
{listener}
[auth]
allow_anonymous = true

[sys]
interval = {sys_interval}

[limits]
max_inflight = {inflight}
max_queued_messages = {queued}

[log]
level = "warn"
"#,
        inflight = limits.max_inflight,
        queued = limits.max_queued,
    )
}

/// Listener keys that turn the listener under test into TLS (and mutual TLS) with the run's certificates.
fn tollgate_tls(pki: &Pki, mutual: bool) -> String {
    let mut text = format!(
        "protocol = \"tls\"\ncert = \"{}\"\nkey = \"{}\"\n",
        pki.server_cert.display(),
        pki.server_key.display()
    );
    if mutual {
        text.push_str(&format!("client_ca = \"{}\"\nrequire_client_cert = true\n", pki.ca.display()));
    }
    text
}

fn mosquitto_tls(pki: &Pki, mutual: bool) -> String {
    format!(
        "cafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate {mutual}\n",
        pki.ca.display(),
        pki.server_cert.display(),
        pki.server_key.display()
    )
}

fn plugin_config(kind: BrokerKind, plugin: &Path, state_dir: &Path) -> String {
    if kind == BrokerKind::TollgateMsgAuth {
        let key: String = crate::client::SIGNING_KEY.iter().map(|b| format!("{b:02x}")).collect();
        return format!(
            r#"
[runtime]
plugin_cache_dir = ""
state_dir = "{state}"

[[plugins]]
name = "msg-auth"
kind = "wasm"
path = "{path}"

[plugins.secrets]
{kid} = "hex:{key}"

[[plugins.config.keys]]
kid = "{kid}"
state = "active"

[[plugins.config.rules]]
id = "verify-bench"
mode = "verify"
topics = ["bench/#", "fanin/#", "fanout/#"]
require = ["ts", "ctr", "sub"]
"#,
            state = state_dir.display(),
            path = plugin.display(),
            kid = crate::client::SIGNING_KID,
        );
    }
    if matches!(kind, BrokerKind::TollgateVinAcl | BrokerKind::TollgateVinAclCached) {
        return format!(
            r#"
[runtime]
plugin_cache_dir = ""

[[plugins]]
name = "vin-acl"
kind = "wasm"
path = "{path}"
cache_decisions = {cache}

[[plugins.config.rules]]
id = "bench"
who = "role:bench"
allow = ["publish", "subscribe"]
topics = ["bench/#", "fanin/#", "fanout/#"]

[[plugins.config.rules]]
id = "bench-observer"
who = "role:bench"
allow = ["subscribe"]
topics = ["$SYS/broker/plugins/#"]

[[plugins.config.rules]]
id = "car"
who = "vehicle"
allow = ["publish", "subscribe"]
topics = ["vehicle/${{vin}}/#"]

[[plugins.config.roles]]
name = "bench"
match = "username=bench"
"#,
            path = plugin.display(),
            cache = kind == BrokerKind::TollgateVinAclCached,
        );
    }
    let kind_name = if kind == BrokerKind::TollgateWasm { "wasm" } else { "lua" };
    let cache = kind == BrokerKind::TollgateLuaCached;
    format!(
        r#"
[runtime]
plugin_cache_dir = ""

[[plugins]]
name = "bench"
kind = "{kind_name}"
path = "{path}"
cache_decisions = {cache}

[plugins.secrets]
k1 = "hex:000102030405060708090a0b0c0d0e0f"
"#,
        path = plugin.display()
    )
}

pub fn mosquitto_config(port: u16, limits: Limits) -> String {
    format!(
        "listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages {inflight}
max_queued_messages {queued}
max_keepalive 65535
set_tcp_nodelay true
log_dest stderr
log_type error
log_type warning
",
        inflight = limits.max_inflight,
        queued = limits.max_queued,
    )
}

/// rumqttd 0.20 configuration: router, one v4 and one v5 server, no console, metrics or websocket.
/// `next_connection_delay_ms` is 0 (its example config sleeps 1 ms after every accept).
pub fn rumqttd_config(port: u16, v5_port: u16, limits: Limits) -> String {
    format!(
        r#"id = 0

[router]
id = 0
max_connections = {max_connections}
max_outgoing_packet_count = 1000
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = {inflight}
    dynamic_filters = true

[v5.1]
name = "v5-1"
listen = "127.0.0.1:{v5_port}"
next_connection_delay_ms = 0
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = {inflight}
"#,
        max_connections = limits.max_connections,
        inflight = limits.max_inflight,
    )
}
