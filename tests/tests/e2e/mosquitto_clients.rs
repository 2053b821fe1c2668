//! The Mosquitto command-line clients (`mosquitto_pub`, `mosquitto_sub`) against the broker, speaking 3.1.1 and 5.
//! These tests fail if the tools are missing (CI installs `mosquitto-clients`); `TOLLGATE_SKIP_EXTERNAL=1` skips
//! them.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;
use tollgate_integration_tests::external::{self, describe, require_tool, run};
use tollgate_integration_tests::{TestBroker, wait_until};

const INSTALL: &str = "apt-get install mosquitto-clients";
const LIMIT: Duration = Duration::from_secs(15);
const FORMAT: &str = "%t|%q|%r|%p";

struct Tools {
    publish: PathBuf,
    subscribe: PathBuf,
}

fn tools() -> Option<Tools> {
    Some(Tools { publish: require_tool("mosquitto_pub", INSTALL)?, subscribe: require_tool("mosquitto_sub", INSTALL)? })
}

fn base(tool: &Path, broker: &TestBroker, version: &str) -> Command {
    let mut command = Command::new(tool);
    command.args(["-h", "127.0.0.1", "-p", &broker.port().to_string(), "-V", version]);
    command
}

/// `mosquitto_sub` printing `topic|qos|retain|payload` per message, exiting after `count` or 10 s.
fn subscriber(tools: &Tools, broker: &TestBroker, version: &str, topic: &str, qos: u8, count: u32) -> Command {
    let mut command = base(&tools.subscribe, broker, version);
    command.args(["-t", topic, "-q", &qos.to_string(), "-C", &count.to_string(), "-W", "10", "-F", FORMAT]);
    command
}

async fn publish(tools: &Tools, broker: &TestBroker, version: &str, args: &[&str]) {
    let mut command = base(&tools.publish, broker, version);
    command.args(args);
    let output = run(&mut command, LIMIT).await;
    assert!(output.status.success(), "mosquitto_pub {args:?} failed: {}", describe(&output));
}

async fn qos_flow(version: &str) {
    let Some(tools) = tools() else { return };
    let broker = TestBroker::start().await;
    for qos in 0..=2u8 {
        let topic = format!("mq/{version}/{qos}");
        let payload = format!("hello at qos {qos} via {version}");
        let mut sub = external::spawn(&mut subscriber(&tools, &broker, version, &topic, qos, 1));
        broker.wait_for_subscriptions(1).await;
        publish(&tools, &broker, version, &["-t", &topic, "-q", &qos.to_string(), "-m", &payload]).await;
        let line = sub.stdout_line(LIMIT).await.unwrap_or_default();
        assert_eq!(line, format!("{topic}|{qos}|0|{payload}"));
        let status = sub.wait(LIMIT).await;
        assert!(status.success(), "mosquitto_sub exited with {status}");
        wait_until("mosquitto_sub's subscription to go", || broker.subscription_count() == 0).await;
    }
}

#[tokio::test]
async fn qos_0_1_2_with_mqtt_v311() {
    qos_flow("mqttv311").await;
}

#[tokio::test]
async fn qos_0_1_2_with_mqtt_v5() {
    qos_flow("mqttv5").await;
}

#[tokio::test]
async fn mixed_versions_and_downgrade() {
    let Some(tools) = tools() else { return };
    let broker = TestBroker::start().await;
    // A v5 subscriber at QoS 1 gets a 3.1.1 QoS 2 publish at QoS 1.
    let mut sub = external::spawn(&mut subscriber(&tools, &broker, "mqttv5", "mix/t", 1, 1));
    broker.wait_for_subscriptions(1).await;
    publish(&tools, &broker, "mqttv311", &["-t", "mix/t", "-q", "2", "-m", "from 3.1.1"]).await;
    assert_eq!(sub.stdout_line(LIMIT).await.unwrap_or_default(), "mix/t|1|0|from 3.1.1");
    assert!(sub.wait(LIMIT).await.success());
}

async fn retained(version: &str) {
    let Some(tools) = tools() else { return };
    let broker = TestBroker::start().await;
    publish(&tools, &broker, version, &["-t", "ret/t", "-q", "1", "-r", "-m", "kept"]).await;

    let output = run(&mut subscriber(&tools, &broker, version, "ret/#", 1, 1), LIMIT).await;
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim_end(), "ret/t|1|1|kept");

    // A null retained message (-n -r) deletes it.
    publish(&tools, &broker, version, &["-t", "ret/t", "-q", "1", "-r", "-n"]).await;
    let mut command = base(&tools.subscribe, &broker, version);
    command.args(["-t", "ret/#", "-C", "1", "-W", "1", "-F", FORMAT]);
    let output = run(&mut command, LIMIT).await;
    assert!(output.stdout.is_empty(), "nothing retained any more: {}", describe(&output));
    assert!(!output.status.success(), "mosquitto_sub timed out waiting: {}", describe(&output));
}

#[tokio::test]
async fn retained_message_with_mqtt_v311() {
    retained("mqttv311").await;
}

#[tokio::test]
async fn retained_message_with_mqtt_v5() {
    retained("mqttv5").await;
}

#[tokio::test]
async fn sys_broker_version_is_published() {
    let Some(tools) = tools() else { return };
    let broker = TestBroker::builder().configure(|config| config.sys.interval = 1).start().await;
    for version in ["mqttv311", "mqttv5"] {
        let mut command = base(&tools.subscribe, &broker, version);
        command.args(["-t", "$SYS/broker/version", "-t", "$SYS/broker/uptime", "-C", "2", "-W", "10", "-F", "%t|%p"]);
        let output = run(&mut command, LIMIT).await;
        assert!(output.status.success(), "{}", describe(&output));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let expected = format!("$SYS/broker/version|tollgate version {}", tollgate_version());
        assert!(stdout.lines().any(|line| line == expected), "no {expected:?} in {stdout:?}");
        assert!(
            stdout.lines().any(|line| line.starts_with("$SYS/broker/uptime|") && line.ends_with(" seconds")),
            "no uptime in {stdout:?}"
        );
    }
}

/// The server crate's version, which `$SYS/broker/version` reports.
fn tollgate_version() -> &'static str {
    // The workspace shares one version, so this package's equals the server's.
    env!("CARGO_PKG_VERSION")
}

#[tokio::test]
async fn username_and_password_from_a_password_file() {
    let Some(tools) = tools() else { return };
    let broker = TestBroker::builder().allow_anonymous(false).users(&[("alice", "wonder land")]).start().await;
    for version in ["mqttv311", "mqttv5"] {
        let topic = format!("auth/{version}");
        let mut sub = subscriber(&tools, &broker, version, &topic, 1, 1);
        sub.args(["-u", "alice", "-P", "wonder land"]);
        let mut sub = external::spawn(&mut sub);
        broker.wait_for_subscriptions(1).await;
        publish(&tools, &broker, version, &["-u", "alice", "-P", "wonder land", "-t", &topic, "-q", "1", "-m", "in"])
            .await;
        assert_eq!(sub.stdout_line(LIMIT).await.unwrap_or_default(), format!("{topic}|1|0|in"));
        assert!(sub.wait(LIMIT).await.success());
        wait_until("the subscription to go", || broker.subscription_count() == 0).await;

        for (label, credentials) in [
            ("wrong password", vec!["-u", "alice", "-P", "wonderland"]),
            ("unknown user", vec!["-u", "mallory", "-P", "wonder land"]),
            ("anonymous", vec![]),
        ] {
            let mut command = base(&tools.publish, &broker, version);
            command.args(&credentials).args(["-t", &topic, "-q", "1", "-m", "refused"]);
            let output = run(&mut command, LIMIT).await;
            assert!(!output.status.success(), "{version} {label} must be refused: {}", describe(&output));
            let stderr = String::from_utf8_lossy(&output.stderr).to_lowercase();
            let expected = if label == "anonymous" { "not authori" } else { "bad user name or password" };
            assert!(stderr.contains(expected), "{version} {label}: expected {expected:?} in {stderr:?}");
        }
    }
}
