//! External programs: MQTT client tools (mosquitto_pub/sub, python3 with paho-mqtt) and the `tollgate` binary.
//!
//! A test that needs an external tool FAILS when the tool is missing, naming what to install, because CI installs
//! them. Setting `TOLLGATE_SKIP_EXTERNAL=1` skips those tests explicitly instead.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

use crate::within_for;

pub const SKIP_VARIABLE: &str = "TOLLGATE_SKIP_EXTERNAL";

/// True when the environment asks to skip tests that need external tools.
pub fn skip_external() -> bool {
    std::env::var(SKIP_VARIABLE).is_ok_and(|value| !value.is_empty() && value != "0")
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|dir| dir.join(tool)).find(|candidate| is_executable(candidate))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(path: &Path) -> bool {
    path.is_file()
}

/// The path of `tool`. `None` means the caller must return early because `TOLLGATE_SKIP_EXTERNAL` is set; a
/// missing tool otherwise fails the test with `install` as the remedy.
pub fn require_tool(tool: &str, install: &str) -> Option<PathBuf> {
    if skip_external() {
        eprintln!("skipping: {SKIP_VARIABLE} is set (test needs {tool})");
        return None;
    }
    match find_in_path(tool) {
        Some(path) => Some(path),
        None => panic!(
            "`{tool}` is not on PATH; install it ({install}), or set {SKIP_VARIABLE}=1 to skip tests that need it"
        ),
    }
}

/// `python3` with paho-mqtt importable, or `None` when skipping.
pub fn require_paho() -> Option<PathBuf> {
    let python = require_tool("python3", "apt-get install python3")?;
    static CHECK: OnceLock<Result<String, String>> = OnceLock::new();
    let check = CHECK.get_or_init(|| {
        let output = std::process::Command::new(&python)
            .args(["-c", "import paho.mqtt; print(paho.mqtt.__version__)"])
            .output()
            .map_err(|error| error.to_string())?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            Err(stderr.trim().lines().last().unwrap_or_default().to_owned())
        }
    });
    match check {
        Ok(version) if version.starts_with('1') => panic!(
            "paho-mqtt {version} is too old; these tests need 2.x (pip install 'paho-mqtt>=2'), or set {SKIP_VARIABLE}=1"
        ),
        Ok(_) => Some(python),
        Err(error) => panic!(
            "python3 cannot import paho.mqtt ({error}); install it (pip install 'paho-mqtt>=2' or apt-get install python3-paho-mqtt), or set {SKIP_VARIABLE}=1"
        ),
    }
}

/// Runs a command to completion within `limit` (killing it otherwise) and returns its output.
pub async fn run(command: &mut Command, limit: Duration) -> Output {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let description = format!("{command:?}");
    within_for(limit, &format!("{description} to finish"), command.output())
        .await
        .unwrap_or_else(|error| panic!("cannot run {description}: {error}"))
}

/// Formats an output for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A child process killed when dropped, with line access to its output.
pub struct Background {
    pub child: Child,
    pub stdout: Option<Lines<BufReader<ChildStdout>>>,
    pub stderr: Option<Lines<BufReader<ChildStderr>>>,
    pub description: String,
}

/// Spawns `command` with piped stdout and stderr.
pub fn spawn(command: &mut Command) -> Background {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let description = format!("{command:?}");
    let mut child = command.spawn().unwrap_or_else(|error| panic!("cannot start {description}: {error}"));
    let stdout = child.stdout.take().map(|out| BufReader::new(out).lines());
    let stderr = child.stderr.take().map(|err| BufReader::new(err).lines());
    Background { child, stdout, stderr, description }
}

impl Background {
    /// The next stdout line within `limit`; `None` at end of output.
    pub async fn stdout_line(&mut self, limit: Duration) -> Option<String> {
        let lines = self.stdout.as_mut().expect("stdout is piped");
        within_for(limit, &format!("a line from {}", self.description), lines.next_line()).await.unwrap()
    }

    /// Reads stderr lines until one satisfies `pick`, within `limit`; the lines read are returned on failure.
    pub async fn stderr_until<T>(
        &mut self,
        limit: Duration,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> Result<T, Vec<String>> {
        let lines = self.stderr.as_mut().expect("stderr is piped");
        let mut seen = Vec::new();
        let search = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(found) = pick(&line) {
                    return Some(found);
                }
                seen.push(line);
            }
            None
        };
        match tokio::time::timeout(limit, search).await {
            Ok(Some(found)) => Ok(found),
            _ => Err(seen),
        }
    }

    /// Waits for the process to exit within `limit`.
    pub async fn wait(&mut self, limit: Duration) -> std::process::ExitStatus {
        within_for(limit, &format!("{} to exit", self.description), self.child.wait()).await.unwrap()
    }

    /// Sends a signal by number with `kill(1)`.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("the process is still running");
        let status = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .expect("kill(1) runs");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }
}

/// Removes every `TOLLGATE_*` variable from a child's environment: the broker reads them as configuration
/// overrides (`TOLLGATE_LIMITS__MAX_INFLIGHT`), and test switches such as `TOLLGATE_SKIP_EXTERNAL` would be
/// refused there as unknown keys.
/// `tollgate run --config <config>`, once it accepts connections on `port` (its listener in the file).
pub async fn run_broker(config: &std::path::Path, port: u16) -> Background {
    let mut command = Command::new(tollgate_bin());
    clean_env(&mut command).arg("run").arg("--config").arg(config);
    let broker = spawn(&mut command);
    crate::within("the broker to listen", async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    broker
}

pub fn clean_env(command: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("TOLLGATE_") {
            command.env_remove(key);
        }
    }
    command.env_remove("RUST_LOG")
}

/// The `tollgate` binary of this build.
///
/// `cargo test --workspace` builds it next to the test binaries (`target/<profile>/tollgate`); `cargo test -p
/// tollgate-integration-tests` does not. So when that file is missing or older than any source file of the broker,
/// the first call runs `cargo build -p tollgate --bin tollgate` into this test binary's target directory and
/// profile, which keeps a stale binary from being tested. (It does not run cargo when the binary is newer than the
/// sources: `cargo build -p tollgate` resolves features without the workspace's dev-dependencies and would relink a
/// binary `cargo test --workspace` had just built.) `TOLLGATE_BIN` points at a prebuilt binary instead.
pub fn tollgate_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(locate_or_build).clone().unwrap_or_else(|error| panic!("{error}"))
}

fn locate_or_build() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("TOLLGATE_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() { Ok(path) } else { Err(format!("TOLLGATE_BIN={} does not exist", path.display())) };
    }
    // target/<profile>/deps/<this test binary>
    let exe = std::env::current_exe().map_err(|error| error.to_string())?;
    let profile_dir =
        exe.parent().and_then(Path::parent).ok_or("cannot find the target directory from the test binary's path")?;
    let binary = profile_dir.join(format!("tollgate{}", std::env::consts::EXE_SUFFIX));
    let target_dir = profile_dir.parent().ok_or("cannot find the target directory")?;
    let profile =
        profile_dir.file_name().and_then(|name| name.to_str()).ok_or("cannot read the profile directory name")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no workspace root")?;
    let manifest = workspace.join("Cargo.toml");
    if is_fresh(&binary, workspace) {
        return Ok(binary);
    }
    let mut command = std::process::Command::new(env!("CARGO"));
    command
        .args(["build", "--quiet", "-p", "tollgate", "--bin", "tollgate"])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir);
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    let status = command.status().map_err(|error| format!("cannot run cargo to build the tollgate binary: {error}"))?;
    if !status.success() {
        return Err(format!(
            "`cargo build -p tollgate --bin tollgate` failed ({status}); build it first or set TOLLGATE_BIN"
        ));
    }
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!("the tollgate binary is not at {} after building it; set TOLLGATE_BIN", binary.display()))
    }
}

/// True when `binary` exists and is newer than every `.rs`/`.toml` file of the broker and the workspace lock file.
fn is_fresh(binary: &Path, workspace: &Path) -> bool {
    let Ok(built) = binary.metadata().and_then(|meta| meta.modified()) else {
        return false;
    };
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for file in [workspace.join("Cargo.toml"), workspace.join("Cargo.lock")] {
        if let Ok(modified) = file.metadata().and_then(|meta| meta.modified()) {
            newest = newest.max(modified);
        }
    }
    let mut pending = vec![workspace.join("broker")];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            if path.is_dir() {
                if name != "target" && !name.to_string_lossy().starts_with('.') {
                    pending.push(path);
                }
            } else if path.extension().is_some_and(|ext| ext == "rs" || ext == "toml")
                && let Ok(modified) = entry.metadata().and_then(|meta| meta.modified())
            {
                newest = newest.max(modified);
            }
        }
    }
    built >= newest
}
