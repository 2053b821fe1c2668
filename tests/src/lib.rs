//! Support for the end-to-end tests in `tests/tests/e2e/`: an in-process broker on `127.0.0.1:0` with its own
//! temporary directory, bounded waits, rumqttc wrappers ([`v4`], [`v5`]), a raw codec client for hand-built and
//! malformed traffic ([`raw`]) and helpers for external tools and the `tollgate` binary ([`external`]).
//!
//! Every wait here is bounded: a test that does not get what it expects fails with a message naming what it was
//! waiting for, it never hangs.

#![allow(clippy::unwrap_used)]

pub mod external;
pub mod raw;
pub mod tls;
pub mod v4;
pub mod v5;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tollgate_builtins::password_file::{HashScheme, MOSQUITTO_PBKDF2_ITERATIONS, PasswordFile};

pub use tollgate::{Config, Server};

/// Upper bound for anything a test waits for that should happen promptly.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// How long a test watches for something that must NOT happen (a message that must not be delivered). Loopback
/// delivery takes well under a millisecond, so this is generous without slowing the suite much.
pub const QUIET: Duration = Duration::from_millis(400);

/// Awaits `future` for at most [`TIMEOUT`], panicking with `what` if it takes longer.
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    within_for(TIMEOUT, what, future).await
}

/// Awaits `future` for at most `limit`, panicking with `what` if it takes longer.
pub async fn within_for<F: Future>(limit: Duration, what: &str, future: F) -> F::Output {
    match tokio::time::timeout(limit, future).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

/// Polls `condition` every few milliseconds until it holds, for at most [`TIMEOUT`]. For in-process broker state
/// that has no event to await (a subscription made by a child process, a session being dropped).
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

/// Writes a Mosquitto-format password file. PBKDF2 with Mosquitto's iteration count keeps it fast in debug
/// builds (argon2 is deliberately slow).
pub fn write_password_file(path: &Path, users: &[(&str, &str)]) {
    let mut file = PasswordFile::new();
    for (user, password) in users {
        file.set(user, password, HashScheme::Pbkdf2Sha512 { iterations: MOSQUITTO_PBKDF2_ITERATIONS }).unwrap();
    }
    std::fs::write(path, file.to_file_string()).unwrap();
}

/// Builds the configuration of a test broker. Defaults: one listener on `127.0.0.1:0`, `$SYS` off (so it
/// cannot add traffic a test does not expect), a short shutdown grace.
pub struct BrokerBuilder {
    config: Config,
    dir: tempfile::TempDir,
}

impl Default for BrokerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl BrokerBuilder {
    pub fn new() -> Self {
        let mut config = Config::default();
        config.listeners[0].bind = "127.0.0.1:0".into();
        config.sys.interval = 0;
        config.session.shutdown_grace = 2;
        let dir = tempfile::tempdir().unwrap();
        // Plugin state stays with the test, never in the user's home.
        config.runtime.state_dir = Some(dir.path().join("state"));
        Self { config, dir }
    }

    /// The broker's private temporary directory (removed when the broker is dropped).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `text` as the ACL file and enables it.
    pub fn acl(mut self, text: &str) -> Self {
        let path = self.dir.path().join("acl");
        std::fs::write(&path, text).unwrap();
        self.config.auth.acl_file = Some(path);
        self
    }

    /// Writes a password file with these users and enables it.
    pub fn users(mut self, users: &[(&str, &str)]) -> Self {
        let path = self.dir.path().join("passwords");
        write_password_file(&path, users);
        self.config.auth.password_file = Some(path);
        self
    }

    /// Uses an existing password file (for example one written by `tollgate passwd`).
    pub fn password_file(mut self, path: PathBuf) -> Self {
        self.config.auth.password_file = Some(path);
        self
    }

    pub fn allow_anonymous(mut self, allow: bool) -> Self {
        self.config.auth.allow_anonymous = Some(allow);
        self
    }

    /// Any other setting.
    pub fn configure(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(&mut self.config);
        self
    }

    pub async fn start(self) -> TestBroker {
        let server =
            Server::start(&self.config).await.unwrap_or_else(|error| panic!("test broker did not start: {error:#}"));
        let addr = *server.addresses.first().expect("the test broker has a listener");
        assert_eq!(addr.ip().to_string(), "127.0.0.1", "tests use loopback only");
        assert_ne!(addr.port(), 0, "the listener reports its real port");
        TestBroker { server, addr, config: self.config, dir: self.dir }
    }
}

/// A running in-process broker. Dropping it begins shutdown; [`TestBroker::stop`] also waits for the drain.
pub struct TestBroker {
    pub server: Server,
    pub addr: SocketAddr,
    pub config: Config,
    dir: tempfile::TempDir,
}

impl TestBroker {
    /// A broker with the default test configuration.
    pub async fn start() -> TestBroker {
        BrokerBuilder::new().start().await
    }

    pub fn builder() -> BrokerBuilder {
        BrokerBuilder::new()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn broker(&self) -> &tollgate_core::Broker {
        &self.server.broker
    }

    /// Subscriptions currently in the router, for waiting until an external client has subscribed.
    pub fn subscription_count(&self) -> usize {
        self.server.broker.router().subscription_count()
    }

    /// Waits until the router holds at least `count` subscriptions.
    pub async fn wait_for_subscriptions(&self, count: usize) {
        wait_until(&format!("{count} subscription(s) in the router"), || self.subscription_count() >= count).await;
    }

    /// Shuts down and waits for every connection to finish; returns whether that happened within the grace.
    pub async fn stop(self) -> bool {
        within("broker shutdown", self.server.shutdown()).await
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        self.server.broker.shutdown();
    }
}

/// A `[[bridges]]` entry named `cloud` toward `address`, with short reconnect waits for tests and no disk queue.
pub fn bridge_config(
    address: &str,
    topics: Vec<tollgate::bridge_config::BridgeTopicConfig>,
) -> tollgate::bridge_config::BridgeConfig {
    tollgate::bridge_config::BridgeConfig {
        name: "cloud".into(),
        address: address.into(),
        fallback_addresses: Vec::new(),
        primary_retry_s: 60,
        protocol: "v5".into(),
        client_id: None,
        username: None,
        password: None,
        keepalive: 10,
        clean_start: false,
        session_expiry: 3600,
        max_inflight: 8,
        max_send_rate: 0,
        connect_timeout: 5,
        reconnect_min_ms: 50,
        reconnect_max_ms: 200,
        tls: None,
        topics,
        queue: None,
        remote_status_topic: None,
        message_id_property: None,
        proxy: None,
        try_private: false,
    }
}

/// One topic mapping of a bridge.
pub fn bridge_topic(
    pattern: &str,
    direction: &str,
    qos: u8,
    local_prefix: &str,
    remote_prefix: &str,
) -> tollgate::bridge_config::BridgeTopicConfig {
    tollgate::bridge_config::BridgeTopicConfig {
        pattern: pattern.into(),
        direction: direction.into(),
        qos,
        local_prefix: local_prefix.into(),
        remote_prefix: remote_prefix.into(),
        priority: None,
    }
}
