//! `tollgate-bench --restart`: a gateway restarted with offline sessions holding queued messages, Tollgate
//! (`[persistence]`) against Mosquitto (`persistence true`), both saving at shutdown only.
//!
//! Per broker: `sessions` MQTT 3.1.1 clients connect with clean session off, subscribe to their own topic and
//! leave; a publisher sends each of them `per_session` QoS 1 messages (64 B), which queue. Then:
//! - **stop**: SIGTERM to exit, the state file written on the way (and its size);
//! - **start**: spawn to listening, the state read back on the way, and the resident memory after;
//! - **recover**: every client reconnects with clean session off (counted when CONNACK says its session is
//!   present) and takes its queued messages, each checked once and in order; from the first reconnect to the
//!   last message.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::brokers::{BrokerSpec, Limits, Program, RunningBroker, Setup};
use crate::client::{Conn, Dialer, Frame, drain_frames, parse_payload, publish_windowed, put_puback, put_publish};
use crate::scenarios::Transport;
use tollgate_protocol::QoS;

const PAYLOAD: usize = 64;
const WINDOW: usize = 100;
/// Clients connecting at once while sessions are made and resumed.
const CONCURRENCY: usize = 64;

#[derive(Clone, Debug, Default)]
pub struct RestartOutcome {
    pub rss_before_kib: u64,
    pub stop: Duration,
    pub state_bytes: u64,
    pub start: Duration,
    pub rss_after_kib: u64,
    pub resumed: usize,
    pub delivered: u64,
    pub recover: Duration,
    pub error: Option<String>,
}

fn persistence_config(program: Program, dir: &std::path::Path) -> Result<String> {
    Ok(match program {
        Program::Tollgate => format!(
            "\n[persistence]\nenabled = true\nfile = \"{}\"\nautosave_interval = 0\n",
            dir.join("broker.state").display()
        ),
        // Later lines win over the common `persistence false`; autosave 0 saves at exit only, as Tollgate here.
        Program::Mosquitto => {
            format!("\npersistence true\npersistence_location {}/\nautosave_interval 0\n", dir.display())
        }
        Program::Rumqttd => bail!("rumqttd keeps no state across restarts"),
    })
}

fn topic(session: usize) -> String {
    format!("bench/restart/{session}")
}

fn client_id(session: usize) -> String {
    format!("bench-car-{session}")
}

/// Runs `work` for every session, `CONCURRENCY` at a time; the first error wins.
async fn for_each_session<F, Fut, T>(sessions: usize, work: F) -> Result<Vec<T>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let mut results = Vec::with_capacity(sessions);
    let mut running = tokio::task::JoinSet::new();
    for session in 0..sessions {
        if running.len() >= CONCURRENCY
            && let Some(done) = running.join_next().await
        {
            results.push(done??);
        }
        running.spawn(work(session));
    }
    while let Some(done) = running.join_next().await {
        results.push(done??);
    }
    Ok(results)
}

/// Publishes `per_session` QoS 1 messages to every session's topic, round by round, with a window.
async fn publish_all(dialer: &Dialer, sessions: usize, per_session: u64) -> Result<()> {
    let mut conn = Conn::connect(dialer, 0, "bench-restart-pub", 1 << 20).await?;
    publish_windowed(&mut conn, sessions as u64 * per_session, WINDOW, |buffer, n, packet_id| {
        let (round, session) = (n / sessions as u64, (n % sessions as u64) as usize);
        put_publish(buffer, topic(session).as_bytes(), 1, packet_id, session as u32, round, PAYLOAD, None);
    })
    .await?;
    conn.disconnect(Duration::from_millis(200)).await
}

/// Reconnects one session and takes its queued messages; returns whether the session was present and how many
/// messages came.
async fn recover(dialer: Arc<Dialer>, session: usize, per_session: u64) -> Result<(bool, u64)> {
    let (mut conn, present) = Conn::connect_session(&dialer, 0, &client_id(session), None, false, 4096).await?;
    let mut expected = 0u64;
    let mut out = BytesMut::new();
    loop {
        // What came with the CONNACK is already in the buffer: look at it before reading more.
        let mut problem = None;
        drain_frames(&mut conn.rbuf, |frame| {
            if let Frame::Publish { qos, packet_id, payload, .. } = frame {
                if qos == 1 {
                    put_puback(&mut out, packet_id);
                }
                match parse_payload(payload, PAYLOAD) {
                    Some((publisher, seq, _)) if publisher as usize == session && seq == expected => expected += 1,
                    Some((_, seq, _)) if seq < expected => {}
                    other => problem = Some(format!("session {session}: {other:?} while {expected} was due")),
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
        if expected >= per_session {
            break;
        }
        let read = tokio::time::timeout(Duration::from_secs(30), conn.stream.read_buf(&mut conn.rbuf)).await;
        match read {
            Ok(Ok(0)) | Err(_) => {
                bail!("session {session} (present: {present}): {expected} of {per_session} queued messages came")
            }
            Ok(Err(error)) => return Err(error.into()),
            Ok(Ok(_)) => {}
        }
    }
    conn.disconnect(Duration::from_millis(200)).await?;
    Ok((present, expected))
}

pub async fn measure(
    spec: &BrokerSpec,
    limits: Limits,
    sessions: usize,
    per_session: u64,
    tag: &str,
) -> RestartOutcome {
    let measured: Result<RestartOutcome> = async {
        let dir = std::env::temp_dir().join(format!("tollgate-bench-{}-{tag}-state", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        // Mosquitto started as root drops to its `mosquitto` user, which must be able to write its database here.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        }
        let extra = persistence_config(spec.kind.program(), &dir)?;
        let setup = Setup { transport: Transport::Tcp, pki: None, sys_interval: 0, extra: &extra };
        let broker = RunningBroker::start(spec, limits, setup, &format!("{tag}-before"))?;
        let dialer = Arc::new(Dialer::tcp(broker.addr));
        for_each_session(sessions, |session| {
            let dialer = dialer.clone();
            async move {
                let (mut conn, _) = Conn::connect_session(&dialer, 0, &client_id(session), None, false, 4096).await?;
                conn.subscribe(&topic(session), QoS::AtLeastOnce).await?;
                conn.disconnect(Duration::from_millis(200)).await
            }
        })
        .await?;
        publish_all(&dialer, sessions, per_session).await?;
        let mut outcome = RestartOutcome { rss_before_kib: broker.rss_kib()?, ..RestartOutcome::default() };
        outcome.stop = broker.stop_timed(Duration::from_secs(120))?;
        outcome.state_bytes =
            std::fs::read_dir(&dir)?.filter_map(|entry| entry.ok()?.metadata().ok()).map(|meta| meta.len()).sum();

        let started = Instant::now();
        let broker = RunningBroker::start(spec, limits, setup, &format!("{tag}-after"))?;
        outcome.start = started.elapsed();
        outcome.rss_after_kib = broker.rss_kib()?;
        let dialer = Arc::new(Dialer::tcp(broker.addr));
        let started = Instant::now();
        let recovered = for_each_session(sessions, |session| recover(dialer.clone(), session, per_session)).await?;
        outcome.recover = started.elapsed();
        outcome.resumed = recovered.iter().filter(|(present, _)| *present).count();
        outcome.delivered = recovered.iter().map(|(_, delivered)| delivered).sum();
        broker.stop()?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(outcome)
    }
    .await;
    measured.unwrap_or_else(|error| RestartOutcome { error: Some(format!("{error:#}")), ..RestartOutcome::default() })
}
