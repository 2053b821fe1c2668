//! The `tollgate` binary: `check-config`, `run` (startup, refusal of a bad configuration, SIGTERM) and `passwd`.
//! The binary is located (and built if needed) by `external::tollgate_bin`.

#![allow(clippy::unwrap_used)]

use crate::wasm_build;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use rumqttc::ConnectReturnCode;
use tokio::process::Command;
use tollgate_integration_tests::external::{self, clean_env, describe, run, tollgate_bin};
use tollgate_integration_tests::raw;
use tollgate_integration_tests::{TestBroker, v4};
use tollgate_protocol::{ProtocolVersion, ReasonCode};

const LIMIT: Duration = Duration::from_secs(30);

fn tollgate() -> Command {
    let mut command = Command::new(tollgate_bin());
    clean_env(&mut command);
    command
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn check_config_lists_every_problem_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let missing_acl = dir.path().join("no-such-dir").join("acl");
    let config = write(
        dir.path(),
        "bad.toml",
        &format!(
            r#"
[limits]
bogus = 1
max_inflight = "x"

[[listeners]]
bind = "not-an-address"

[auth]
acl_file = "{}"
"#,
            missing_acl.display()
        ),
    );
    let output = run(tollgate().arg("check-config").arg(&config), LIMIT).await;
    assert!(!output.status.success(), "a bad file is refused: {}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let missing: Vec<&str> = ["limits.bogus", "limits.max_inflight", "listeners[0].bind", "auth.acl_file"]
        .into_iter()
        .filter(|key| !stderr.contains(key))
        .collect();
    assert!(missing.is_empty(), "problems not reported: {missing:?}\n{}", describe(&output));
}

#[tokio::test]
async fn check_config_names_each_bad_transport_key() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    tollgate::certs::init(&certs, &["localhost".into()], 30, false).unwrap();
    let config = write(
        dir.path(),
        "transports.toml",
        &format!(
            r#"
[[listeners]]
bind = "127.0.0.1:0"
protocol = "tls"
cert = "{certs}/missing.pem"
key = "{certs}/server.key"
require_client_cert = true
identity_from = "sanuri"

[[listeners]]
bind = "127.0.0.1:0"
protocol = "ws"
ws_path = "mqtt"
cert = "{certs}/server.pem"
mount_point = "site/%x/"

[[listeners]]
bind = "127.0.0.1:0"
protocol = "quic"

[[listeners]]
bind = "127.0.0.1:0"
protocol = "wss"
cert = "{certs}/server.pem"
key = "{certs}/ca.key"
"#,
            certs = certs.display()
        ),
    );
    let output = run(tollgate().arg("check-config").arg(&config), LIMIT).await;
    assert!(!output.status.success(), "a bad file is refused: {}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let missing: Vec<&str> = [
        "listeners[0].cert: cannot read",
        "listeners[0].require_client_cert: needs client_ca",
        "listeners[0].identity_from",
        "listeners[1].ws_path",
        "listeners[1].mount_point: \"site/%x/\": only %c",
        "listeners[1].cert: only applies to tls and wss",
        "listeners[2].protocol",
        "listeners[3].key",
    ]
    .into_iter()
    .filter(|key| !stderr.contains(key))
    .collect();
    assert!(missing.is_empty(), "problems not reported: {missing:?}\n{}", describe(&output));
    // `run` refuses the same file.
    let output = run(tollgate().args(["run", "--config"]).arg(&config), LIMIT).await;
    assert!(!output.status.success(), "run started on a bad file: {}", describe(&output));
}

#[tokio::test]
async fn check_config_reports_semantic_problems_together() {
    let dir = tempfile::tempdir().unwrap();
    let missing_acl = dir.path().join("missing-acl");
    let config = write(
        dir.path(),
        "semantic.toml",
        &format!(
            "[[listeners]]\nbind = \"not-an-address\"\n\n[auth]\nacl_file = \"{}\"\n\n[limits]\nmax_inflight = 0\n",
            missing_acl.display()
        ),
    );
    let output = run(tollgate().arg("check-config").arg(&config), LIMIT).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in ["listeners[0].bind", "auth.acl_file", "limits.max_inflight"] {
        assert!(stderr.contains(key), "{key} not reported\n{}", describe(&output));
    }
}

#[tokio::test]
async fn check_config_names_persistence_problems() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "persistence.toml",
        "[persistence]\nenabled = \"yes\"\nautosave = 10\nautosave_interval = -1\n",
    );
    let output = run(tollgate().arg("check-config").arg(&config), LIMIT).await;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    for key in ["persistence.enabled", "persistence.autosave: unknown key", "persistence.autosave_interval"] {
        assert!(stderr.contains(key), "{key} not reported\n{}", describe(&output));
    }
    // On, with nowhere to keep the state.
    let config = write(dir.path(), "nowhere.toml", "[persistence]\nenabled = true\n\n[runtime]\nstate_dir = \"\"\n");
    let output = run(tollgate().arg("check-config").arg(&config), LIMIT).await;
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("persistence.file: no state file"),
        "{}",
        describe(&output)
    );
}

#[tokio::test]
async fn check_config_accepts_a_good_file() {
    let dir = tempfile::tempdir().unwrap();
    let acl = write(dir.path(), "acl", "pattern readwrite #\n");
    let config = write(
        dir.path(),
        "good.toml",
        &format!(
            "[[listeners]]\nbind = \"127.0.0.1:0\"\n\n[auth]\nacl_file = \"{}\"\n\n[limits]\nmax_inflight = 64\n",
            acl.display()
        ),
    );
    let output = run(tollgate().arg("check-config").arg(&config), LIMIT).await;
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("ok"), "{}", describe(&output));
}

#[tokio::test]
async fn run_with_a_bad_config_exits_non_zero_without_listening() {
    let dir = tempfile::tempdir().unwrap();
    // A port that is free now; the broker must not get as far as binding it.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config =
        write(dir.path(), "bad.toml", &format!("[[listeners]]\nbind = \"127.0.0.1:{port}\"\n\n[limits]\nbogus = 1\n"));
    let output = run(tollgate().arg("run").arg("--config").arg(&config), LIMIT).await;
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("limits.bogus"), "{}", describe(&output));
    assert!(!stderr.contains("listener ready"), "it must not start listening: {}", describe(&output));
}

#[tokio::test]
async fn run_with_a_missing_config_file_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let output = run(tollgate().arg("run").arg("--config").arg(dir.path().join("absent.toml")), LIMIT).await;
    assert!(!output.status.success(), "{}", describe(&output));
}

/// Starts `tollgate run` with JSON logs and returns it with the address its listener reported.
async fn start_binary(args: &[&str]) -> (external::Background, SocketAddr) {
    start_command(tollgate(), args).await
}

async fn start_command(mut command: Command, args: &[&str]) -> (external::Background, SocketAddr) {
    let mut child = external::spawn(command.arg("run").args(args).args(["--log-format", "json"]));
    let address = child
        .stderr_until(LIMIT, |line| {
            let value: serde_json::Value = serde_json::from_str(line).ok()?;
            let fields = value.get("fields")?;
            if fields.get("message")?.as_str()? != "listener ready" {
                return None;
            }
            fields.get("address")?.as_str()?.parse::<SocketAddr>().ok()
        })
        .await
        .unwrap_or_else(|lines| panic!("the broker never reported a listener; its stderr:\n{}", lines.join("\n")));
    (child, address)
}

#[tokio::test]
async fn run_listens_and_exits_0_on_sigterm_saying_goodbye_to_v5_clients() {
    let (mut child, address) = start_binary(&["--listen", "127.0.0.1:0"]).await;
    assert!(address.ip().is_loopback());
    assert_ne!(address.port(), 0);

    let mut v5_client = raw::tcp(address, ProtocolVersion::V5).await;
    v5_client.connect_ok(ProtocolVersion::V5, "v5-client").await;
    let mut v311_client = raw::tcp(address, ProtocolVersion::V311).await;
    v311_client.connect_ok(ProtocolVersion::V311, "v311-client").await;

    child.signal("TERM");
    v5_client.expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN).await;
    v311_client.expect_closed().await;
    let status = child.wait(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

#[tokio::test]
async fn a_second_broker_on_a_busy_port_is_refused() {
    // The workers' listening sockets share the port through SO_REUSEPORT; another broker must still not join.
    let (mut first, address) = start_binary(&["--listen", "127.0.0.1:0"]).await;
    let output = run(tollgate().arg("run").arg("--listen").arg(address.to_string()), LIMIT).await;
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("in use"), "{}", describe(&output));
    first.signal("TERM");
    assert!(first.wait(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn sigint_also_shuts_down_cleanly() {
    let (mut child, address) = start_binary(&["--listen", "127.0.0.1:0"]).await;
    let mut client = raw::tcp(address, ProtocolVersion::V5).await;
    client.connect_ok(ProtocolVersion::V5, "v5-client").await;
    child.signal("INT");
    client.expect_disconnect(ReasonCode::SERVER_SHUTTING_DOWN).await;
    assert!(child.wait(Duration::from_secs(10)).await.success());
}

#[cfg(unix)]
#[tokio::test]
async fn passwd_creates_a_private_file_the_broker_accepts() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwords");
    let output = run(tollgate().arg("passwd").arg("-c").arg(&file).args(["alice", "s3cret"]), LIMIT).await;
    assert!(output.status.success(), "{}", describe(&output));
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "password file mode is {mode:o}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("alice:"), "{text}");
    assert!(!text.contains("s3cret"), "the password is stored hashed");

    // Add a second user (password from standard input, as an interactive prompt would read it).
    let mut add = tollgate();
    add.arg("passwd").arg(&file).arg("bob").stdin(std::process::Stdio::piped());
    add.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).kill_on_drop(true);
    let mut child = add.spawn().unwrap();
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"builder\n").await.unwrap();
    }
    let output = tokio::time::timeout(LIMIT, child.wait_with_output()).await.unwrap().unwrap();
    assert!(output.status.success(), "{}", describe(&output));

    let broker = TestBroker::builder().password_file(file.clone()).allow_anonymous(false).start().await;
    let mut alice = v4::options(&broker, "alice");
    alice.set_credentials("alice", "s3cret");
    v4::connect(alice).await.0.disconnect().await;
    let mut bob = v4::options(&broker, "bob");
    bob.set_credentials("bob", "builder");
    v4::connect(bob).await.0.disconnect().await;
    let mut wrong = v4::options(&broker, "wrong");
    wrong.set_credentials("alice", "builder");
    assert_eq!(v4::refused_code(wrong).await, ConnectReturnCode::BadUserNamePassword);

    // -D removes a user.
    let output = run(tollgate().arg("passwd").arg("-D").arg(&file).arg("bob"), LIMIT).await;
    assert!(output.status.success(), "{}", describe(&output));
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("alice:") && !text.contains("bob:"), "{text}");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "still private after rewriting");
}

#[tokio::test]
async fn passwd_without_create_on_a_missing_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("absent");
    let output = run(tollgate().arg("passwd").arg(&file).args(["alice", "pw"]), LIMIT).await;
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(!file.exists());
}

#[tokio::test]
async fn sighup_reloads_the_password_file() {
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords");
    let set_password = |password: &'static str, create: bool| {
        let mut command = tollgate();
        command.arg("passwd").args(["--scheme", "pbkdf2"]);
        if create {
            command.arg("-c");
        }
        command.arg(&passwords).args(["alice", password]);
        command
    };
    let output = run(&mut set_password("first", true), LIMIT).await;
    assert!(output.status.success(), "{}", describe(&output));
    let config = write(
        dir.path(),
        "broker.toml",
        &format!(
            "[[listeners]]\nbind = \"127.0.0.1:0\"\n\n[auth]\nallow_anonymous = false\npassword_file = \"{}\"\n",
            passwords.display()
        ),
    );
    let config = config.to_str().unwrap().to_owned();
    let (mut child, address) = start_binary(&["--config", &config]).await;
    let broker_options = |password: &str| {
        let mut options = rumqttc::MqttOptions::new("alice", "127.0.0.1", address.port());
        options.set_credentials("alice", password);
        options
    };
    v4::connect(broker_options("first")).await.0.disconnect().await;
    assert_eq!(v4::refused_code(broker_options("second")).await, ConnectReturnCode::BadUserNamePassword);

    let output = run(&mut set_password("second", false), LIMIT).await;
    assert!(output.status.success(), "{}", describe(&output));
    child.signal("HUP");
    child
        .stderr_until(LIMIT, |line| line.contains("hooks reloaded").then_some(()))
        .await
        .unwrap_or_else(|lines| panic!("no reload was logged:\n{}", lines.join("\n")));

    v4::connect(broker_options("second")).await.0.disconnect().await;
    assert_eq!(v4::refused_code(broker_options("first")).await, ConnectReturnCode::BadUserNamePassword);

    child.signal("TERM");
    assert!(child.wait(Duration::from_secs(10)).await.success());
}

#[tokio::test]
async fn environment_overrides_the_configuration() {
    let mut command = tollgate();
    command.env("TOLLGATE_LIMITS__MAX_INFLIGHT", "7").env("TOLLGATE_LIMITS__MAX_KEEPALIVE", "42");
    let (mut child, address) = start_command(command, &["--listen", "127.0.0.1:0"]).await;
    let mut client = raw::tcp(address, ProtocolVersion::V5).await;
    let connack = client.connect_ok(ProtocolVersion::V5, "env").await;
    assert_eq!(connack.properties.receive_maximum, Some(7), "TOLLGATE_LIMITS__MAX_INFLIGHT");
    assert_eq!(connack.properties.server_keep_alive, Some(42), "TOLLGATE_LIMITS__MAX_KEEPALIVE");
    client.disconnect().await;
    child.signal("TERM");
    assert!(child.wait(Duration::from_secs(10)).await.success());
}

/// Runs `check-config` on `config`, which must be refused, and asserts each expected fragment is reported.
async fn assert_refused_with(config: &Path, expected: &[&str]) {
    let output = run(tollgate().arg("check-config").arg(config), LIMIT).await;
    assert!(!output.status.success(), "a bad file is refused: {}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let missing: Vec<&&str> = expected.iter().filter(|key| !stderr.contains(*key)).collect();
    assert!(missing.is_empty(), "problems not reported: {missing:?}\n{}", describe(&output));
}

#[tokio::test]
async fn check_config_names_each_bad_plugin_key_and_load_error() {
    let dir = tempfile::tempdir().unwrap();
    let script = write(dir.path(), "policy.lua", "function authorize_publish(c, r) return nil end\n");
    let refusing =
        write(dir.path(), "refuses.lua", "function init(config) error('needs a tenant') end\nfunction route() end\n");
    let plugins = |first_entry_extra: &str| {
        format!(
            "[[plugins]]\nname = \"a\"\nkind = \"python\"\npath = \"{dir}/missing.py\"\nhooks = [\"authorize\", \"teleport\"]\n\
             on_failure = {{ authorize = \"shrug\" }}\nsecrets = {{ k1 = \"plain-text\" }}\n{first_entry_extra}\n\
             [[plugins]]\nname = \"a\"\nkind = \"lua\"\npath = \"{script}\"\n",
            dir = dir.path().display(),
            script = script.display()
        )
    };
    // Unknown keys, at the top of an entry and inside its limits, are named first.
    let config =
        write(dir.path(), "plugins.toml", &plugins("colour = \"blue\"\nlimits = { cpu_ms = 0, memory_gb = 1 }"));
    assert_refused_with(&config, &["plugins[0].colour: unknown key", "plugins[0].limits.memory_gb: unknown key"]).await;
    // Without them, every remaining problem, each with its key.
    let config = write(dir.path(), "plugins2.toml", &plugins("limits = { cpu_ms = 0 }"));
    assert_refused_with(
        &config,
        &[
            "plugins[0].kind: unknown plugin kind \"python\"",
            "plugins[0].path: cannot read",
            "plugins[0].hooks: unknown hook \"teleport\"",
            "plugins[0].on_failure.authorize",
            "plugins[0].secrets.k1",
            "plugins[0].limits.cpu_ms",
            "plugins[1].name: \"a\" is used twice",
        ],
    )
    .await;

    // A well-formed entry whose plugin refuses to start: named, with the plugin's own reason.
    let config = write(
        dir.path(),
        "refusing.toml",
        &format!("[[plugins]]\nname = \"tenants\"\nkind = \"lua\"\npath = \"{}\"\n", refusing.display()),
    );
    assert_refused_with(&config, &["plugins[0]", "plugin \"tenants\"", "needs a tenant"]).await;
    // `run` refuses to start with it, saying the same.
    let output = run(tollgate().args(["run", "--config"]).arg(&config), LIMIT).await;
    assert!(!output.status.success(), "run started with a plugin that does not load: {}", describe(&output));
    assert!(describe(&output).contains("needs a tenant"), "{}", describe(&output));
}

#[tokio::test]
async fn plugin_test_replays_events_and_prints_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let script = write(
        dir.path(),
        "tenants.lua",
        concat!(
            "function authorize_publish(client, request)\n  if string.sub(request.topic, 1, 8 + #client.username) == 'tenants/' .. client.username then return 'allow' end\n  return 'deny'\nend\n",
            "function on_deliver(subscriber, msg)\n  if subscriber.client_id == 'blind' then return 'drop' end\n  msg.topic = 'to/' .. subscriber.client_id\n  return msg\nend\n",
            "function on_disconnected(client, cause)\n  if cause == 'protocol-error' then error('bad client ' .. client.client_id) end\nend\n",
        ),
    );
    let events = write(
        dir.path(),
        "events.jsonl",
        concat!(
            "# a comment\n",
            "{\"hook\":\"authorize_publish\",\"username\":\"acme\",\"topic\":\"tenants/acme/t\"}\n",
            "{\"hook\":\"authorize_publish\",\"username\":\"acme\",\"topic\":\"tenants/other/t\"}\n",
            "{\"hook\":\"deliver\",\"client_id\":\"seer\",\"topic\":\"news\"}\n",
            "{\"hook\":\"deliver\",\"client_id\":\"blind\",\"topic\":\"news\"}\n",
            "{\"hook\":\"connected\",\"client_id\":\"car\"}\n",
            "{\"hook\":\"disconnected\",\"client_id\":\"car\",\"cause\":\"taken-over\"}\n",
            "{\"hook\":\"disconnected\",\"client_id\":\"car\",\"cause\":\"protocol-error\"}\n",
        ),
    );
    let output = run(tollgate().args(["plugin", "test"]).arg(&script).arg("--events").arg(&events), LIMIT).await;
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert_eq!(lines.len(), 7, "{}", describe(&output));
    assert_eq!((lines[0]["line"].as_u64(), lines[0]["decision"].as_str()), (Some(2), Some("allow")));
    assert_eq!((lines[1]["decision"].as_str(), lines[1]["reason_code"].as_u64()), (Some("deny"), Some(0x87)));
    // Each subscriber's copy (the deliver hook).
    assert_eq!(
        (lines[2]["decision"].as_str(), lines[2]["message"]["topic"].as_str()),
        (Some("modified"), Some("to/seer"))
    );
    assert_eq!(lines[3]["decision"].as_str(), Some("drop"));
    // The session hook is told, not asked; a failure in it is reported like any other, and fails the command.
    assert_eq!((lines[4]["hook"].as_str(), lines[4]["decision"].as_str()), (Some("connected"), Some("told")));
    assert_eq!(lines[5]["decision"].as_str(), Some("told"));
    assert_eq!(lines[6]["decision"].as_str(), Some("failed"));
    assert!(lines[6]["error"].as_str().is_some_and(|error| error.contains("bad client car")), "{}", describe(&output));
    assert!(!output.status.success(), "a failed call fails the command: {}", describe(&output));
    // A bad event line makes the command fail, after printing what it could.
    let bad =
        write(dir.path(), "bad.jsonl", "{\"hook\":\"teleport\"}\n{\"hook\":\"disconnected\",\"cause\":\"boredom\"}\n");
    let output = run(tollgate().args(["plugin", "test"]).arg(&script).arg("--events").arg(&bad), LIMIT).await;
    assert!(!output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(printed.matches("invalid event").count(), 2, "{}", describe(&output));
    assert!(printed.contains("\\\"boredom\\\" is not one of client-disconnect,"), "{}", describe(&output));
}

/// SIGHUP reloads a changed Lua plugin in the running binary: the connected client stays connected and its next
/// CONNECT-time decision follows the new script; a broken edit keeps the previous version and is logged.
#[tokio::test]
async fn sighup_reloads_a_changed_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let script = write(dir.path(), "gate.lua", "function on_connect(info) return nil end\n");
    let config = write(
        dir.path(),
        "broker.toml",
        &format!(
            "[[listeners]]\nbind = \"127.0.0.1:0\"\n\n[[plugins]]\nname = \"gate\"\nkind = \"lua\"\npath = \"{}\"\n",
            script.display()
        ),
    );
    let config = config.to_str().unwrap().to_owned();
    let (mut child, address) = start_binary(&["--config", &config]).await;
    let options = |id: &str| rumqttc::MqttOptions::new(id, "127.0.0.1", address.port());
    let (mut resident, _) = v4::connect(options("resident")).await;

    // A broken edit: logged, the previous version keeps deciding.
    std::fs::write(&script, "function on_connect(info) return 'deny'\n").unwrap();
    child.signal("HUP");
    child
        .stderr_until(LIMIT, |line| line.contains("previous version").then_some(()))
        .await
        .unwrap_or_else(|lines| panic!("the broken plugin was not reported:\n{}", lines.join("\n")));
    v4::connect(options("still-open")).await.0.disconnect().await;

    // A good edit: new connections are refused, the resident client is untouched.
    std::fs::write(&script, "function on_connect(info)\n  return 'deny'\nend\n").unwrap();
    child.signal("HUP");
    // The first reload also logged "hooks reloaded" (everything but the broken plugin was reloaded), so wait for
    // the new script's load first, then for the chain swap that follows it.
    for expected in ["Lua plugin loaded", "hooks reloaded"] {
        child
            .stderr_until(LIMIT, |line| line.contains(expected).then_some(()))
            .await
            .unwrap_or_else(|lines| panic!("{expected:?} was not logged:\n{}", lines.join("\n")));
    }
    assert_eq!(v4::refused_code(options("newcomer")).await, ConnectReturnCode::NotAuthorized);
    resident.publish("still/here", rumqttc::QoS::AtLeastOnce, false, b"yes").await;
    resident.disconnect().await;

    child.signal("TERM");
    assert!(child.wait(Duration::from_secs(10)).await.success());
}

/// `tollgate reload` asks the running broker through its admin socket and prints what happened: success, or the
/// plugin that kept its previous version, with a non-zero exit.
#[tokio::test]
async fn tollgate_reload_answers_through_the_admin_socket() {
    let dir = tempfile::tempdir().unwrap();
    let script = write(dir.path(), "gate.lua", "function on_connect(info) return nil end\n");
    let socket = dir.path().join("admin.sock");
    let config = write(
        dir.path(),
        "broker.toml",
        &format!(
            "[[listeners]]\nbind = \"127.0.0.1:0\"\n\n[runtime]\nadmin_socket = \"{}\"\n\n[[plugins]]\nname = \"gate\"\nkind = \"lua\"\npath = \"{}\"\n",
            socket.display(),
            script.display()
        ),
    );
    let (mut child, address) = start_binary(&["--config", config.to_str().unwrap()]).await;
    let options = |id: &str| rumqttc::MqttOptions::new(id, "127.0.0.1", address.port());
    let reload = || {
        let mut command = tollgate();
        command.arg("reload").arg("--config").arg(&config);
        command
    };

    let output = run(&mut reload(), LIMIT).await;
    assert!(output.status.success(), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stdout).contains("reloaded (generation"), "{}", describe(&output));

    // A broken edit: the command fails and names the plugin; the previous version keeps deciding.
    std::fs::write(&script, "function on_connect(info) return 'deny'\n").unwrap();
    let output = run(&mut reload(), LIMIT).await;
    assert!(!output.status.success(), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("\"gate\"") && stderr.contains("previous version kept"), "{}", describe(&output));
    v4::connect(options("still-open")).await.0.disconnect().await;

    // A good edit applies to the next CONNECT as soon as the command returns.
    std::fs::write(&script, "function on_connect(info)\n  return 'deny'\nend\n").unwrap();
    let output = run(tollgate().arg("reload").arg("--socket").arg(&socket), LIMIT).await;
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(v4::refused_code(options("newcomer")).await, ConnectReturnCode::NotAuthorized);

    // `tollgate status` over the same socket: one JSON object.
    let output = run(tollgate().arg("status").arg("--socket").arg(&socket), LIMIT).await;
    assert!(output.status.success(), "{}", describe(&output));
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["plugins"][0]["name"], "gate", "{status}");
    assert_eq!(status["plugins"][0]["hooks"], serde_json::json!(["authenticate"]), "{status}");
    // The newcomer's CONNECT, answered by the reloaded version (a new version counts afresh).
    assert_eq!(status["plugins"][0]["metrics"]["calls"], 1, "{status}");
    assert!(status["policy_generation"].as_u64() >= Some(2), "{status}");
    assert_eq!(status["clients_connected"], 0, "{status}");

    child.signal("TERM");
    assert!(child.wait(Duration::from_secs(10)).await.success());
    assert!(!socket.exists(), "the socket file is removed at exit");
    let output = run(tollgate().arg("reload").arg("--socket").arg(&socket), LIMIT).await;
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("cannot reach"));
    // Without an admin socket in the configuration the command says what to do instead.
    let plain = write(dir.path(), "plain.toml", "[[listeners]]\nbind = \"127.0.0.1:0\"\n");
    let output = run(tollgate().arg("reload").arg("--config").arg(&plain), LIMIT).await;
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("SIGHUP"));
}

/// Every example's recorded events replay cleanly against its plugin as its own broker.toml configures it, so the
/// examples' READMEs keep working.
#[tokio::test]
async fn the_examples_replay_their_recorded_events() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    // The auth-wasm example's configuration points at the release build of its component.
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2", "-p", "auth-wasm"])
        .status()
        .unwrap();
    assert!(status.success(), "building examples/auth-wasm failed");
    for (example, plugin) in [("acl-lua", "tenants"), ("transform-lua", "transform"), ("auth-wasm", "api-keys")] {
        let dir = root.join("examples").join(example);
        let output = run(
            tollgate()
                .current_dir(&root)
                .args(["plugin", "test", plugin, "--config"])
                .arg(dir.join("broker.toml"))
                .arg("--events")
                .arg(dir.join("events.jsonl")),
            LIMIT,
        )
        .await;
        assert!(output.status.success(), "{example}: {}", describe(&output));
        let decisions = String::from_utf8_lossy(&output.stdout).lines().count();
        assert!(decisions >= 3, "{example}: only {decisions} decisions: {}", describe(&output));
    }
}

/// The OTA fleet example runs end to end as its README says (`examples/ota-fleet/run.sh`), against this build of
/// the broker, on free loopback ports: paho-mqtt cars on mutual TLS, vin-acl and msg-auth in the broker.
#[tokio::test]
async fn the_ota_fleet_example_runs() {
    let Some(_python) = external::require_paho() else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let status = std::process::Command::new(env!("CARGO"))
        .current_dir(&root)
        .args(["build", "--quiet", "--release", "--target", "wasm32-wasip2", "-p", "vin-acl", "-p", "msg-auth"])
        .status()
        .unwrap();
    assert!(status.success(), "building the plugins failed");
    // Two ports nobody holds right now; the script's broker binds them a moment later.
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (tls_port, tcp_port) = (free_port(), free_port());
    let mut command = Command::new(root.join("examples/ota-fleet/run.sh"));
    command
        .current_dir(&root)
        .env("OTA_SKIP_BUILD", "1")
        .env("TOLLGATE_BIN", tollgate_bin())
        .env("OTA_TLS_PORT", tls_port.to_string())
        .env("OTA_TCP_PORT", tcp_port.to_string());
    let output = run(&mut command, Duration::from_secs(120)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains("all steps as expected"), "{}", describe(&output));
    assert!(!stdout.contains("FAIL"), "{stdout}");
}

/// `tollgate grant`: a dealer tool reaches a car's diagnostics only while it holds a grant; add and remove go
/// through the grants file (kept, audited) and the admin socket (applied at once), and a removed grant takes the
/// subscription it allowed with it at the next recheck.
#[tokio::test]
async fn grants_are_added_and_removed_at_runtime_through_the_admin_socket() {
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
    use tollgate_integration_tests::v5;

    const VIN: &str = "1M8GDM9AXKP042788";
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("admin.sock");
    let grants = write(dir.path(), "grants.txt", "# work orders: <who> <VIN> <until>\n");
    let config = write(
        dir.path(),
        "broker.toml",
        &format!(
            r#"
[[listeners]]
bind = "127.0.0.1:0"

[runtime]
admin_socket = "{socket}"
plugin_cache_dir = ""

[session]
recheck_interval_ms = 200

[[plugins]]
name = "vin-acl"
kind = "wasm"
path = "{plugin}"

[plugins.files]
grants = "{grants}"

[[plugins.config.rules]]
id = "dealer-diagnostics"
who = "role:dealer"
allow = ["publish", "subscribe"]
topics = ["vehicle/${{vin}}/diag/#"]
scope = "granted"

[[plugins.config.roles]]
name = "dealer"
match = "username=dealer-7"
"#,
            socket = socket.display(),
            plugin = wasm_build::wasm_plugin("vin-acl").display(),
            grants = grants.display(),
        ),
    );
    let (mut child, address) = start_binary(&["--config", config.to_str().unwrap()]).await;
    let mut options = rumqttc::v5::MqttOptions::new("dealer-7", "127.0.0.1", address.port());
    options.set_credentials("dealer-7", "");
    let (mut dealer, _) = v5::connect(options).await;
    let diagnostics = format!("vehicle/{VIN}/diag/#");
    assert_eq!(dealer.subscribe(&diagnostics, QoS::AtLeastOnce).await, SubscribeReasonCode::NotAuthorized);

    let grant = |words: &[&str]| {
        let mut command = tollgate();
        command.arg("grant").args(words).arg("--config").arg(&config);
        command
    };
    let output =
        run(&mut grant(&["add", "dealer-7", &VIN.to_lowercase(), "--until", "+1h", "--reason", "WO-1"]), LIMIT).await;
    assert!(output.status.success(), "{}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("added: dealer-7 1M8GDM9AXKP042788") && stdout.contains("reloaded"), "{stdout}");
    assert!(std::fs::read_to_string(&grants).unwrap().contains("dealer-7 1M8GDM9AXKP042788 "));
    assert_eq!(dealer.subscribe(&diagnostics, QoS::AtLeastOnce).await, SubscribeReasonCode::Success(QoS::AtLeastOnce));
    dealer.publish(&format!("vehicle/{VIN}/diag/dtc"), QoS::AtLeastOnce, false, b"P0420").await;
    assert_eq!(dealer.next_publish().await.payload.as_ref(), b"P0420");
    let output = run(tollgate().arg("status").arg("--socket").arg(&socket), LIMIT).await;
    let status: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(status["subscriptions"], 1, "{status}");

    let output = run(&mut grant(&["list"]), LIMIT).await;
    assert!(String::from_utf8_lossy(&output.stdout).contains("WO-1"), "{}", describe(&output));
    // Garbage is refused before anything is written.
    let output = run(&mut grant(&["add", "dealer-7", "NOT-A-VIN", "--until", "+1h"]), LIMIT).await;
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("not a VIN"));

    let output = run(&mut grant(&["remove", "dealer-7", VIN]), LIMIT).await;
    assert!(output.status.success(), "{}", describe(&output));
    // The subscription the grant allowed goes at the next recheck (200 ms here).
    let subscriptions = || async {
        let output = run(tollgate().arg("status").arg("--socket").arg(&socket), LIMIT).await;
        serde_json::from_slice::<serde_json::Value>(&output.stdout).unwrap()["subscriptions"].as_u64()
    };
    let removed_at = std::time::Instant::now();
    while subscriptions().await != Some(0) {
        assert!(removed_at.elapsed() < Duration::from_secs(3), "the granted subscription outlived its grant");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dealer.subscribe(&diagnostics, QoS::AtLeastOnce).await, SubscribeReasonCode::NotAuthorized);
    let output = run(&mut grant(&["remove", "dealer-7", VIN]), LIMIT).await;
    assert!(!output.status.success() && String::from_utf8_lossy(&output.stderr).contains("no grant"));

    let audit = std::fs::read_to_string(dir.path().join("grants.txt.audit.log")).unwrap();
    let actions: Vec<String> = audit
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap()["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(actions, ["add", "remove"]);
    child.signal("TERM");
    assert!(child.wait(Duration::from_secs(10)).await.success());
}

/// `tollgate sig` as a backend replica uses it: AES-128-CMAC with a random nonce and no counter, then checked by
/// `tollgate sig verify` (exit 0 valid, 1 tampered, 2 a key that cannot be an AES key).
#[tokio::test]
async fn sig_signs_cmac_with_a_random_nonce_and_verifies_it() {
    let secret = "hex:000102030405060708090a0b0c0d0e0f";
    let common = ["--topic", "v1/vehicles/1J9RP1A36A1644345/cmd/lock/req", "--secret", secret];
    let signed = tokio::time::timeout(
        LIMIT,
        tollgate()
            .args(["sig", "sign", "--alg", "cmac-aes128", "--nonce", "random", "--kid", "cloud-cmac"])
            .args(["--sub", "1J9RP1A36A1644345", "--payload", "lock"])
            .args(common)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(signed.status.success(), "{}", describe(&signed));
    let header = String::from_utf8(signed.stdout).unwrap().trim().to_owned();
    assert!(header.starts_with("v1;alg=cmac-aes128;kid=cloud-cmac;sub=1J9RP1A36A1644345;ts="), "{header}");
    assert!(!header.contains(";ctr="), "no counter was given: {header}");
    let nonce = header.split(";nonce=").nth(1).and_then(|rest| rest.split(';').next()).unwrap();
    assert!(nonce.len() == 32 && nonce.bytes().all(|b| b.is_ascii_hexdigit()), "{nonce}");

    let verify = |payload: &'static str, secret: &'static str| {
        let header = header.clone();
        async move {
            tokio::time::timeout(
                LIMIT,
                tollgate()
                    .args(["sig", "verify", "--header", &header, "--payload", payload])
                    .args(["--topic", "v1/vehicles/1J9RP1A36A1644345/cmd/lock/req", "--secret", secret])
                    .output(),
            )
            .await
            .unwrap()
            .unwrap()
        }
    };
    let valid = verify("lock", secret).await;
    assert_eq!(valid.status.code(), Some(0), "{}", describe(&valid));
    let report: serde_json::Value = serde_json::from_slice(&valid.stdout).unwrap();
    assert_eq!(report["signature"]["alg"], "cmac-aes128");
    assert_eq!(report["signature"]["nonce"], nonce);
    assert_eq!(verify("unlock", secret).await.status.code(), Some(1));
    let other_key = verify("lock", "hex:0f0e0d0c0b0a09080706050403020100").await;
    assert_eq!(other_key.status.code(), Some(1), "{}", describe(&other_key));

    let short_key = tokio::time::timeout(
        LIMIT,
        tollgate()
            .args(["sig", "sign", "--alg", "cmac-aes128", "--kid", "k", "--ctr", "1", "--payload", "x"])
            .args(["--topic", "t", "--secret", "hex:0001"])
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(short_key.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&short_key.stderr).contains("16-byte"), "{}", describe(&short_key));
}

#[tokio::test]
async fn check_config_names_each_bad_bridge_key_and_keeps_checking_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "bridges.toml",
        "[[bridges]]\nname = \"cloud\"\naddress = \"nowhere\"\ncolour = \"blue\"\n\
         tls = { ca_file = \"/no/such/ca.pem\", pin = \"x\" }\n\
         [[bridges.topics]]\npattern = \"a/#/b\"\nweight = 3\n\n\
         [[bridges]]\nname = \"cloud\"\naddress = \"127.0.0.1:1883\"\nprotocol = \"v311\"\n\
         topics = [{ pattern = \"x/#\", direction = \"both\", qos = 7 }]\n\n\
         [[bridges]]\nname = \"empty\"\naddress = \"127.0.0.1:1883\"\n",
    );
    assert_refused_with(
        &config,
        &[
            "bridges[0].colour: unknown key",
            "bridges[0].tls.pin: unknown key",
            "bridges[0].topics[0].weight: unknown key",
            "bridges[0].address: \"nowhere\" is not host:port",
            "bridges[0].tls.ca_file: cannot read /no/such/ca.pem",
            "bridges[0].topics[0].pattern",
            "bridges[1].name: \"cloud\" is used twice",
            "bridges[1].topics[0].qos: 7 is not a QoS",
            "bridges[1].topics[0].direction: \"both\" on a v311 bridge would loop",
            "bridges[2].topics: a bridge needs at least one",
        ],
    )
    .await;
    let output = run(tollgate().args(["run", "--config"]).arg(&config), LIMIT).await;
    assert!(!output.status.success(), "run started with bad bridges: {}", describe(&output));
}
