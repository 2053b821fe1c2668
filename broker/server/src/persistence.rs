//! The broker's state file (`[persistence]`): read back at start, written on an interval and at shutdown. The core
//! turns the state into bytes and back ([`Broker::snapshot`], [`Broker::restore`]); this module owns the file.
//!
//! A save writes a temporary file next to the state file (owner-only: it holds messages), syncs it, renames it over
//! the old one and syncs the directory, so a crash or power cut at any moment leaves the previous save or the new
//! one, never a mix. A state file that cannot be restored is moved aside (kept for inspection) and the broker starts
//! empty, rather than a site staying down over it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tollgate_core::{Broker, SnapshotCounts};
use tracing::{debug, error, info, warn};

/// Restores the state file into a broker nobody is connected to yet. A missing file is a first start.
pub fn restore(broker: &Broker, file: &Path) -> anyhow::Result<()> {
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            info!(file = %file.display(), "no saved state yet; starting empty");
            return Ok(());
        }
        // Unreadable (permissions, a directory): saving would fail too, so say it now.
        Err(error) => return Err(error).with_context(|| format!("persistence: reading {}", file.display())),
    };
    let started = std::time::Instant::now();
    match broker.restore(&bytes) {
        Ok(SnapshotCounts { retained, sessions, messages, wills }) => {
            let elapsed_ms = started.elapsed().as_millis() as u64;
            info!(file = %file.display(), retained, sessions, messages, wills, elapsed_ms, "saved state restored");
        }
        Err(problem) => {
            let aside = aside_name(file);
            match std::fs::rename(file, &aside) {
                Ok(()) => error!(
                    file = %file.display(), %problem, kept_as = %aside.display(),
                    "saved state cannot be restored; starting empty, the file is kept aside"
                ),
                Err(error) => {
                    return Err(error).with_context(|| {
                        format!("persistence: {} cannot be restored ({problem}) nor moved aside", file.display())
                    });
                }
            }
        }
    }
    Ok(())
}

fn aside_name(file: &Path) -> PathBuf {
    let stamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs());
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".unreadable-{stamp}"));
    file.with_file_name(name)
}

/// Takes a snapshot and writes it atomically (off the async threads).
pub async fn save(broker: &Broker, file: &Path) -> anyhow::Result<SnapshotCounts> {
    let (broker, file) = (broker.clone(), file.to_owned());
    tokio::task::spawn_blocking(move || {
        let (bytes, counts) = broker.snapshot();
        write_atomically(&file, &bytes).with_context(|| format!("persistence: writing {}", file.display()))?;
        Ok(counts)
    })
    .await
    .context("persistence: the save task failed")?
}

fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match file.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut temporary = file.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut handle = options.open(&temporary)?;
    handle.write_all(bytes)?;
    handle.sync_all()?;
    drop(handle);
    std::fs::rename(&temporary, file)?;
    // The rename itself reaches the disk with the directory.
    std::fs::File::open(dir)?.sync_all()
}

/// Saves every `interval` until the broker shuts down (the shutdown save is [`crate::Server::shutdown`]'s).
pub async fn autosave(broker: Broker, file: PathBuf, interval: Duration) {
    let shutdown = broker.shutdown_token();
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => match save(&broker, &file).await {
                Ok(counts) => debug!(file = %file.display(), ?counts, "state saved"),
                Err(error) => warn!(error = format!("{error:#}"), "state not saved; the previous save stands"),
            },
            () = shutdown.cancelled() => return,
        }
    }
}
