//! Eclipse Paho for Python (paho-mqtt 2.x) against the broker, through `tests/fixtures/paho_client.py`. These tests
//! fail if python3 or paho-mqtt is missing (CI installs them); `TOLLGATE_SKIP_EXTERNAL=1` skips them.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use serde_json::{Value, json};
use tokio::process::Command;
use tollgate_integration_tests::external::{self, describe, require_paho, run};
use tollgate_integration_tests::{QUIET, TestBroker, v5};

const LIMIT: Duration = Duration::from_secs(20);

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join("paho_client.py")
}

fn paho(python: &Path, broker: &TestBroker, mode: &str, version: &str) -> Command {
    let mut command = Command::new(python);
    command.arg(script()).arg(mode).args(["--port", &broker.port().to_string(), "--version", version]);
    command
}

/// Runs the script to completion and returns its one JSON line.
async fn run_json(command: &mut Command) -> Value {
    let output = run(command, LIMIT).await;
    assert!(output.status.success(), "paho script failed: {}", describe(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| panic!("no output: {}", describe(&output)));
    serde_json::from_str(line).unwrap_or_else(|error| panic!("bad JSON {line:?}: {error}"))
}

async fn qos2_round_trip(version: &str) {
    let Some(python) = require_paho() else { return };
    let broker = TestBroker::start().await;
    let result = run_json(paho(&python, &broker, "pubsub", version).args(["--qos", "2"])).await;
    assert_eq!(result["granted"], json!([2]), "{result}");
    assert_eq!(result["topic"], json!(format!("paho/{version}/2")));
    assert_eq!(result["payload"], json!("payload from paho"));
    assert_eq!(result["qos"], json!(2));
    assert_eq!(result["retain"], json!(false));
}

#[tokio::test]
async fn qos2_publish_subscribe_v311() {
    qos2_round_trip("311").await;
}

#[tokio::test]
async fn qos2_publish_subscribe_v5() {
    qos2_round_trip("5").await;
}

#[tokio::test]
async fn v5_user_properties_arrive_intact() {
    let Some(python) = require_paho() else { return };
    let broker = TestBroker::start().await;
    // A Rust subscriber sees the same properties the paho subscriber does.
    let mut observer = v5::connect_to(&broker, "observer").await;
    observer.subscribe_ok("paho/#", QoS::AtLeastOnce).await;

    let result = run_json(&mut paho(&python, &broker, "props", "5")).await;
    let expected_properties = json!([["origin", "paho"], ["unicode", "h\u{e9}llo \u{2713}"], ["origin", "again"]]);
    assert_eq!(result["user_properties"], expected_properties, "{result}");
    assert_eq!(result["content_type"], json!("text/plain"));
    assert_eq!(result["response_topic"], json!("paho/replies"));
    assert_eq!(result["correlation_data"], json!("corr-7"));
    assert_eq!(result["qos"], json!(2));

    let seen = observer.next_publish().await;
    let properties = v5::properties(&seen);
    assert_eq!(
        properties.user_properties,
        vec![
            ("origin".to_string(), "paho".to_string()),
            ("unicode".to_string(), "h\u{e9}llo \u{2713}".to_string()),
            ("origin".to_string(), "again".to_string()),
        ]
    );
    assert_eq!(properties.correlation_data.as_deref(), Some(&b"corr-7"[..]));
}

async fn will_on_kill(version: &str) {
    let Some(python) = require_paho() else { return };
    let broker = TestBroker::start().await;
    let mut watcher = v5::connect_to(&broker, "watcher").await;
    watcher.subscribe_ok("paho/wills/#", QoS::AtLeastOnce).await;

    let mut child = external::spawn(&mut paho(&python, &broker, "will", version));
    let line = child.stdout_line(LIMIT).await.unwrap_or_default();
    assert_eq!(line, r#"{"connected": true}"#, "the paho client connected");
    watcher.expect_no_publish(QUIET).await;

    // SIGKILL: the process dies without DISCONNECT and the kernel closes its socket.
    child.child.start_kill().unwrap();
    child.wait(LIMIT).await;

    let will = watcher.next_publish().await;
    assert_eq!(v5::topic(&will), format!("paho/wills/{version}"));
    assert_eq!(&will.payload[..], b"paho died");
    assert_eq!(will.qos, QoS::AtLeastOnce);
    let user_properties = v5::properties(&will).user_properties;
    if version == "5" {
        assert_eq!(user_properties, vec![("kind".to_string(), "will".to_string())]);
    } else {
        assert!(user_properties.is_empty());
    }
}

#[tokio::test]
async fn will_published_when_paho_v311_client_dies() {
    will_on_kill("311").await;
}

#[tokio::test]
async fn will_published_when_paho_v5_client_dies() {
    will_on_kill("5").await;
}

#[tokio::test]
async fn no_will_when_paho_disconnects_cleanly() {
    let Some(python) = require_paho() else { return };
    let broker = TestBroker::start().await;
    let mut watcher = v5::connect_to(&broker, "watcher").await;
    watcher.subscribe_ok("paho/wills/#", QoS::AtLeastOnce).await;
    for version in ["311", "5"] {
        let result = run_json(&mut paho(&python, &broker, "clean", version)).await;
        assert_eq!(result, json!({"disconnected": true}));
    }
    watcher.expect_no_publish(QUIET).await;
}
