//! State one plugin's instances share, whatever the runtime: the key-value table, counters, secrets, health.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use aes::Aes128;
use cmac::Cmac;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use tollgate_hooks::{ClientInfo, PeerIdentity};
use tracing::warn;

use crate::latency::{LatencyHistogram, LatencySummary, StripedCounter};
use crate::spec::{HookKind, PluginSpec};

const NOT_DURABLE: &str = "the broker has no state directory (runtime.state_dir), so nothing is durable";

/// Bounds on the shared key-value table, so a plugin cannot grow the broker's memory without limit.
pub const KV_MAX_ENTRIES: usize = 65_536;
pub const KV_MAX_VALUE_BYTES: usize = 64 << 10;

/// Why a plugin call gave no decision.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("trapped: {0}")]
    Trap(String),
    #[error("used more than its CPU time budget of {0} ms")]
    CpuLimit(u64),
    #[error("exceeded its memory limit of {0} bytes")]
    OutOfMemory(usize),
    #[error("script error: {0}")]
    Script(String),
    #[error("took longer than {0} ms")]
    Timeout(u64),
    #[error("returned an invalid answer: {0}")]
    BadAnswer(String),
    #[error("disabled for {0} ms after repeated failures")]
    Disabled(u64),
    #[error("could not start an instance: {0}")]
    Instantiate(String),
}

/// Counters for one plugin, readable by the broker (`$SYS`, logs) and tests.
#[derive(Debug, Default)]
pub struct PluginMetrics {
    /// Decisions asked for: a burst authorized or transformed in one call counts once per message.
    pub calls: StripedCounter,
    /// Entries into the plugin: a burst counts once, so `calls / invocations` is the mean burst a call carried.
    pub invocations: StripedCounter,
    pub failures: AtomicU64,
    pub cpu_limit: AtomicU64,
    pub out_of_memory: AtomicU64,
    pub traps: AtomicU64,
    pub timeouts: AtomicU64,
    pub disabled: AtomicU64,
    pub instances_created: AtomicU64,
    /// Flushes of staged durable writes the state file refused (see [`PluginShared::flush_durable`]).
    pub state_write_failures: AtomicU64,
    /// Wall time of each call as the broker saw it (waiting for an instance included), per hook kind.
    pub latency: [LatencyHistogram; HookKind::ALL.len()],
}

impl PluginMetrics {
    pub fn snapshot(&self) -> BTreeMap<&'static str, u64> {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        BTreeMap::from([
            ("calls", self.calls.load()),
            ("invocations", self.invocations.load()),
            ("failures", read(&self.failures)),
            ("cpu_limit", read(&self.cpu_limit)),
            ("out_of_memory", read(&self.out_of_memory)),
            ("traps", read(&self.traps)),
            ("timeouts", read(&self.timeouts)),
            ("disabled", read(&self.disabled)),
            ("instances_created", read(&self.instances_created)),
            ("state_write_failures", read(&self.state_write_failures)),
        ])
    }

    pub fn latency_of(&self, hook: HookKind) -> &LatencyHistogram {
        &self.latency[hook as usize]
    }

    /// The hooks that were called at least once, with their latency.
    pub fn latency_summaries(&self) -> Vec<(HookKind, LatencySummary)> {
        HookKind::ALL
            .into_iter()
            .map(|hook| (hook, self.latency_of(hook).summary()))
            .filter(|(_, summary)| summary.count > 0)
            .collect()
    }
}

/// The idle instances of one plugin and the bound on how many exist at once. Both runtimes borrow from it: a call
/// leases a slot (an idle instance, or room to build one) and gives the instance back only if the call succeeded.
///
/// Idle instances sit in per-thread shards: the workers call plugins on every message, and one shared lock and
/// semaphore made two threads fight over the same cache lines on each call (about 5% of the broker's CPU in the
/// WASM transform benchmark). A thread takes from its own shard first and from the others when that is empty.
pub(crate) struct Pool<I> {
    shards: Box<[Mutex<Vec<I>>]>,
    /// Instances in existence, idle or leased, including slots leased to build one.
    live: AtomicUsize,
    max_instances: usize,
    /// Callers waiting because every instance is leased and none may be built.
    waiting: AtomicUsize,
    returned: tokio::sync::Notify,
}

/// One slot of a [`Pool`]: dropping it without [`Lease::put_back`] (a failed or cancelled call) frees the slot,
/// and the instance, if any, goes with it.
pub(crate) struct Lease<'a, I> {
    pool: &'a Pool<I>,
    idle: Option<I>,
    returned: bool,
}

impl<I> Lease<'_, I> {
    /// The idle instance this lease came with; `None` means: build one.
    pub fn take_idle(&mut self) -> Option<I> {
        self.idle.take()
    }

    pub fn put_back(mut self, instance: I) {
        self.returned = true;
        self.pool.push(instance);
    }
}

impl<I> Drop for Lease<'_, I> {
    fn drop(&mut self) {
        if !self.returned {
            self.idle = None;
            self.pool.live.fetch_sub(1, Ordering::SeqCst);
            self.pool.wake_one();
        }
    }
}

thread_local! {
    /// This thread's shard index in every pool (modulo its shard count).
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

impl<I> Pool<I> {
    pub fn new(max_instances: usize) -> Self {
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Self {
            shards: (0..threads * 2).map(|_| Mutex::new(Vec::new())).collect(),
            live: AtomicUsize::new(0),
            max_instances: max_instances.max(1),
            waiting: AtomicUsize::new(0),
            returned: tokio::sync::Notify::new(),
        }
    }

    fn own_shard(&self) -> usize {
        SHARD.with(|shard| *shard) % self.shards.len()
    }

    /// Waits for a slot: an idle instance, or room to build one within `max_instances`.
    pub async fn lease(&self) -> Lease<'_, I> {
        if let Some(lease) = self.try_lease() {
            return lease;
        }
        self.waiting.fetch_add(1, Ordering::SeqCst);
        // Decrements `waiting` however this ends, cancellation included.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let _waiting = Waiting(&self.waiting);
        loop {
            // Made before looking, so a return between the look and the wait still wakes this caller.
            let returned = self.returned.notified();
            if let Some(lease) = self.try_lease() {
                return lease;
            }
            returned.await;
        }
    }

    fn try_lease(&self) -> Option<Lease<'_, I>> {
        let own = self.own_shard();
        let count = self.shards.len();
        for offset in 0..count {
            if let Some(instance) = lock(&self.shards[(own + offset) % count]).pop() {
                return Some(Lease { pool: self, idle: Some(instance), returned: false });
            }
        }
        self.live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |live| (live < self.max_instances).then_some(live + 1))
            .ok()
            .map(|_| Lease { pool: self, idle: None, returned: false })
    }

    /// Adds an instance built outside a lease (the one `init` ran on at load); it counts against the bound.
    pub fn put(&self, instance: I) {
        self.live.fetch_add(1, Ordering::SeqCst);
        self.push(instance);
    }

    fn push(&self, instance: I) {
        lock(&self.shards[self.own_shard()]).push(instance);
        self.wake_one();
    }

    fn wake_one(&self) {
        // Only when someone waits: an unconditional notify would write the shared `Notify` on every call.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.returned.notify_one();
        }
    }
}

/// Crash-loop protection: a plugin failing [`CRASH_LOOP_FAILURES`] times within [`CRASH_LOOP_WINDOW`] is disabled
/// (its hooks answer with their failure policy) for a backoff that doubles on each relapse up to
/// [`MAX_BACKOFF`], and resets after a quiet [`MAX_BACKOFF`].
pub const CRASH_LOOP_FAILURES: u32 = 5;
pub const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(10);
pub const FIRST_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
const LOG_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct Health {
    window_start: Instant,
    failures_in_window: u32,
    disabled_until: Option<Instant>,
    backoff: Duration,
    last_disabled: Option<Instant>,
    last_log: Option<Instant>,
    suppressed_logs: u64,
}

/// Updates the counter or gauge `name` in place under the read lock (every message does this, from every worker),
/// or adds it under the write lock, at most 1024 names. Names become `$SYS` topic levels, so a name that is not a
/// valid topic (empty, wildcards, NUL) is ignored.
type NamedValues<T> = std::sync::RwLock<HashMap<String, T, foldhash::fast::RandomState>>;

fn update_named<T>(slots: &NamedValues<T>, name: &str, update: impl Fn(&T), create: impl FnOnce() -> T) {
    if tollgate_protocol::topic::validate_topic_name(name).is_err() {
        return;
    }
    if let Some(slot) = slots.read().unwrap_or_else(|poisoned| poisoned.into_inner()).get(name) {
        update(slot);
        return;
    }
    let mut slots = slots.write().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(slot) = slots.get(name) {
        update(slot);
    } else if slots.len() < 1024 {
        slots.insert(name.to_owned(), create());
    }
}

/// What the broker knows about the client of the current call, for `client-attribute`.
#[derive(Clone, Debug, Default)]
pub struct CallClient {
    pub attributes: Arc<BTreeMap<String, String>>,
    pub peer: Option<Arc<PeerIdentity>>,
}

impl CallClient {
    pub fn of(client: &ClientInfo) -> Self {
        CallClient { attributes: client.attributes.clone(), peer: client.peer.clone() }
    }

    pub fn attribute(&self, key: &str) -> Option<String> {
        if let Some(field) = key.strip_prefix("cert.") {
            let peer = self.peer.as_deref()?;
            return match field {
                "subject" => Some(peer.subject.clone()),
                "common-name" => peer.common_name.clone(),
                "subject-serial-number" => peer.subject_serial_number.clone(),
                "serial" => Some(peer.serial.clone()),
                "fingerprint" => Some(peer.fingerprint_sha256.clone()),
                "issuer" => Some(peer.issuer.clone()),
                "san-uri" => peer.san_uri.first().cloned(),
                "san-dns" => peer.san_dns.first().cloned(),
                "ou" => peer.organizational_units.first().cloned(),
                _ => None,
            };
        }
        self.attributes.get(key).cloned()
    }
}

/// The append-only file behind `kv-set-durable`: one record per write, `u32` big-endian key length, key, `u32`
/// value length (`u32::MAX` for a deletion), value. Loading replays it and rewrites it compacted; a torn record at
/// the end (a crash mid-write) is ignored.
///
/// Durable writes are staged during a plugin call and reach the file together when the call returns
/// ([`PluginShared::flush_durable`]), before the broker acts on its result: msg-auth moves a sender's replay window
/// on every message, and one `write(2)` per message cost more than the rest of its verification. A key written
/// several times in one call is written once, with its last value.
struct DurableKv {
    path: PathBuf,
    file: std::fs::File,
    /// The file's length after the last complete write: a failed write is cut back to it, so no torn record sits
    /// before the records written later.
    len: u64,
    keys: HashSet<String>,
    records: usize,
    /// Staged writes (`None`: a deletion), not yet in the file.
    staged: HashMap<String, Option<Vec<u8>>>,
}

const TOMBSTONE: u32 = u32::MAX;

fn put_kv_record(out: &mut Vec<u8>, key: &str, value: Option<&[u8]>) {
    out.reserve(8 + key.len() + value.map_or(0, <[u8]>::len));
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    match value {
        Some(value) => {
            out.extend_from_slice(&(value.len() as u32).to_be_bytes());
            out.extend_from_slice(value);
        }
        None => out.extend_from_slice(&TOMBSTONE.to_be_bytes()),
    }
}

fn parse_kv_log(bytes: &[u8]) -> HashMap<String, Vec<u8>> {
    let mut entries = HashMap::new();
    let mut rest = bytes;
    let take_u32 = |rest: &mut &[u8]| -> Option<u32> {
        let (head, tail) = rest.split_first_chunk::<4>()?;
        *rest = tail;
        Some(u32::from_be_bytes(*head))
    };
    while let Some(key_len) = take_u32(&mut rest) {
        let Some((key, tail)) = rest.split_at_checked(key_len as usize) else { break };
        rest = tail;
        let Ok(key) = std::str::from_utf8(key) else { break };
        let Some(value_len) = take_u32(&mut rest) else { break };
        if value_len == TOMBSTONE {
            entries.remove(key);
            continue;
        }
        let Some((value, tail)) = rest.split_at_checked(value_len as usize) else { break };
        rest = tail;
        entries.insert(key.to_owned(), value.to_vec());
    }
    entries
}

impl DurableKv {
    /// Writes `entries` as a fresh, compacted file at `path` and keeps it open for appending.
    fn create<'a>(path: PathBuf, entries: impl Iterator<Item = (&'a str, &'a [u8])> + Clone) -> std::io::Result<Self> {
        let keys: HashSet<String> = entries.clone().map(|(key, _)| key.to_owned()).collect();
        let (file, len) = Self::rewrite(&path, entries)?;
        Ok(DurableKv {
            file,
            len,
            path,
            // The rewrite left one record per live key.
            records: keys.len(),
            keys,
            staged: HashMap::new(),
        })
    }

    fn rewrite<'a>(
        path: &Path,
        entries: impl Iterator<Item = (&'a str, &'a [u8])>,
    ) -> std::io::Result<(std::fs::File, u64)> {
        let mut partial = path.as_os_str().to_owned();
        partial.push(".partial");
        let partial = PathBuf::from(partial);
        let mut bytes = Vec::new();
        for (key, value) in entries {
            put_kv_record(&mut bytes, key, Some(value));
        }
        std::fs::write(&partial, &bytes)?;
        std::fs::File::open(&partial)?.sync_all()?;
        std::fs::rename(&partial, path)?;
        Ok((std::fs::OpenOptions::new().append(true).open(path)?, bytes.len() as u64))
    }

    /// Records a write for the next [`DurableKv::flush`].
    fn stage(&mut self, key: &str, value: Option<&[u8]>) {
        match value {
            Some(_) => self.keys.insert(key.to_owned()),
            None => self.keys.remove(key),
        };
        self.staged.insert(key.to_owned(), value.map(<[u8]>::to_vec));
    }

    /// Writes the staged records in one `write(2)`: they reach the page cache, so they survive the broker process
    /// dying; compaction is the only place that fsyncs. On failure the records stay staged for the next flush.
    fn flush(&mut self) -> std::io::Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::new();
        for (key, value) in &self.staged {
            put_kv_record(&mut bytes, key, value.as_deref());
        }
        if let Err(error) = self.file.write_all(&bytes) {
            // Best effort: if even this fails, loading stops at the torn record, as after a crash mid-write.
            let _ = self.file.set_len(self.len);
            return Err(error);
        }
        self.len += bytes.len() as u64;
        self.records += self.staged.len();
        self.staged.clear();
        Ok(())
    }

    /// Rewrites the file from `table` once it holds mostly superseded records. `table` must already hold every
    /// value written so far, and nothing may be staged: the rewrite replaces the file.
    fn compact_if_due(&mut self, table: &HashMap<String, Vec<u8>>, plugin: &str) {
        if !self.staged.is_empty() || self.records <= 4 * self.keys.len() + COMPACTION_SLACK {
            return;
        }
        let live = self.keys.iter().filter_map(|key| table.get(key).map(|value| (key.as_str(), value.as_slice())));
        match Self::rewrite(&self.path, live) {
            Ok((file, len)) => {
                self.file = file;
                self.len = len;
                self.records = self.keys.len();
            }
            // The uncompacted file is still whole and appended to; compaction is tried again on the next write.
            Err(error) => warn!(plugin, %error, "could not compact the plugin's state file"),
        }
    }
}

impl Drop for DurableKv {
    /// What a cancelled call staged (its connection went away mid-call) is written by the next call; when the
    /// plugin is dropped first, here.
    fn drop(&mut self) {
        // A clean shutdown or reload leaves nothing to a power cut.
        if self.flush().is_ok() {
            let _ = self.file.sync_data();
        }
    }
}

/// Superseded records a state file may hold beyond four per live key before it is compacted. Compaction fsyncs,
/// on the worker that happens to write, so it must stay rare: at one sender's replay window moved per message
/// this is a compaction every few seconds per shard at full speed.
const COMPACTION_SLACK: usize = 16_384;

/// Shared by every instance of one plugin.
pub struct PluginShared {
    pub name: Arc<str>,
    pub metrics: PluginMetrics,
    secrets: BTreeMap<String, KeyedSecret>,
    /// Shared with the plugin's next version on a reload (see [`PluginShared::keeping_state_of`]).
    kv: Arc<KvStore>,
    /// Read-locked to count (an atomic add): plugins count on every message from every worker, and a plain lock
    /// made the workers wait for each other. Shared with the plugin's next version, as `kv` is.
    counters: Arc<NamedValues<AtomicU64>>,
    /// As `counters`, for values the plugin sets rather than adds to. A gauge is often a count of what is live
    /// (connections up in `on-connected`, down in `on-disconnected`), which a new version must go on from.
    gauges: Arc<NamedValues<AtomicI64>>,
    health: Mutex<Health>,
    /// Mirrors `health.disabled_until.is_some()`, so that the check every call makes reads one shared flag
    /// instead of taking a lock the other workers take too.
    disabled: AtomicBool,
}

/// A secret kept only in its keyed forms: HMAC with the ipad/opad blocks already hashed, and HKDF with the
/// extract step done, so that a call pays for its data and not for keying (a third of a 64-byte message's work).
struct KeyedSecret {
    mac: Hmac<Sha256>,
    hkdf: hkdf::Hkdf<Sha256>,
    /// AES-128-CMAC with the key schedule done; only a 16-byte secret can be one.
    cmac: Option<Cmac<Aes128>>,
}

impl KeyedSecret {
    fn new(secret: &[u8]) -> Result<Self, String> {
        Ok(Self {
            mac: Hmac::<Sha256>::new_from_slice(secret).map_err(|error| error.to_string())?,
            hkdf: hkdf::Hkdf::<Sha256>::new(None, secret),
            cmac: <Cmac<Aes128> as Mac>::new_from_slice(secret).ok(),
        })
    }

    /// An `N`-byte key derived from the secret with HKDF-SHA256 and `info`.
    fn derive<const N: usize>(&self, info: &[u8]) -> Result<[u8; N], String> {
        let mut derived = [0u8; N];
        self.hkdf.expand(info, &mut derived).map_err(|error| error.to_string())?;
        Ok(derived)
    }
}

/// The MAC algorithms of `crypto.mac`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MacAlgorithm {
    HmacSha256,
    CmacAes128,
}

impl MacAlgorithm {
    /// The names Lua scripts use.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "hmac-sha256" => Some(Self::HmacSha256),
            "cmac-aes128" => Some(Self::CmacAes128),
            _ => None,
        }
    }
}

/// A keyed MAC of either algorithm, ready for data.
enum Keyed {
    Hmac(Hmac<Sha256>),
    Cmac(Box<Cmac<Aes128>>),
}

impl Keyed {
    fn tag(self, data: &[u8]) -> Vec<u8> {
        match self {
            Self::Hmac(mac) => mac.chain_update(data).finalize().into_bytes().to_vec(),
            Self::Cmac(mac) => mac.chain_update(data).finalize().into_bytes().to_vec(),
        }
    }

    fn verify_truncated(self, data: &[u8], tag: &[u8]) -> bool {
        match self {
            Self::Hmac(mac) => mac.chain_update(data).verify_truncated_left(tag).is_ok(),
            Self::Cmac(mac) => mac.chain_update(data).verify_truncated_left(tag).is_ok(),
        }
    }
}

/// The size of one plugin's key-value table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSizes {
    /// Keys set (`kv-set`, `kv-add`, …), against [`KV_MAX_ENTRIES`].
    pub entries: usize,
    /// Live `kv-claim` records (a replay cache's size), against [`CLAIM_MAX_ENTRIES`].
    pub claims: usize,
    /// Live claims dropped before their expiry because their shard was full: each one a replay window cut short.
    pub claims_evicted: u64,
}

/// Live `kv-claim` records over all shards. A nonce cache at 10,000 messages a second with a 2-minute window
/// needs 1.2 million; this bound is for a site gateway (see msg-auth's README), and a full shard drops the record
/// closest to expiry first.
pub const CLAIM_MAX_ENTRIES: usize = 262_144;
const CLAIMS_PER_SHARD: usize = CLAIM_MAX_ENTRIES / KV_SHARDS;

/// One shard's `kv-claim` records: the live ones by key, and every record by expiry (an entry whose key was
/// claimed again after it expired is stale, and skipped when it comes up).
#[derive(Default)]
struct Claims {
    live: HashMap<String, u64>,
    by_expiry: std::collections::BinaryHeap<std::cmp::Reverse<(u64, String)>>,
}

impl Claims {
    /// Drops records expired at `now`, and when still full the ones closest to expiry; returns how many live
    /// records went before their time (each one a replay window cut short).
    fn make_room(&mut self, now: u64) -> u64 {
        self.drop_expired(now);
        let mut evicted = 0;
        while self.live.len() >= CLAIMS_PER_SHARD {
            let Some(std::cmp::Reverse((expiry, key))) = self.by_expiry.pop() else { break };
            if self.live.get(&key) == Some(&expiry) {
                self.live.remove(&key);
                evicted += 1;
            }
        }
        evicted
    }

    fn drop_expired(&mut self, now: u64) {
        while self.by_expiry.peek().is_some_and(|std::cmp::Reverse((expiry, _))| *expiry <= now) {
            let Some(std::cmp::Reverse((expiry, key))) = self.by_expiry.pop() else { break };
            if self.live.get(&key) == Some(&expiry) {
                self.live.remove(&key);
            }
        }
    }

    /// Whether `key` was free (and is now held for `ttl_ms`), and how many live records had to go for it.
    fn claim(&mut self, key: &str, ttl_ms: u64, now: u64) -> (bool, u64) {
        if self.live.get(key).is_some_and(|&expiry| expiry > now) {
            return (false, 0);
        }
        let evicted = self.make_room(now);
        let expiry = now.saturating_add(ttl_ms.max(1));
        self.live.insert(key.to_owned(), expiry);
        self.by_expiry.push(std::cmp::Reverse((expiry, key.to_owned())));
        (true, evicted)
    }
}

/// Milliseconds of a monotonic clock (claims must not expire early or late when the wall clock is set).
fn monotonic_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// The thread that syncs plugin state files every [`PluginSpec::state_sync`]: an fsync can take milliseconds
/// (seconds on a worn SD card), which no worker may spend.
mod sync_thread {
    use std::sync::{Arc, Mutex, OnceLock, Weak};
    use std::time::Duration;

    use super::{PluginShared, lock};

    /// How often the thread looks; a plugin's own interval decides whether it syncs.
    const LOOK_EVERY: Duration = Duration::from_millis(250);

    static WATCHED: Mutex<Vec<Weak<PluginShared>>> = Mutex::new(Vec::new());
    static STARTED: OnceLock<()> = OnceLock::new();

    /// Syncs `shared`'s state files from now on, while it lives. A new version of a plugin shares its
    /// predecessor's table, and both are watched until the old one goes: the table's own last-sync time keeps
    /// the two from syncing it twice.
    pub(super) fn watch(shared: &Arc<PluginShared>) {
        let mut watched = lock(&WATCHED);
        watched.retain(|other| other.strong_count() > 0);
        watched.push(Arc::downgrade(shared));
        drop(watched);
        STARTED.get_or_init(|| {
            let spawned = std::thread::Builder::new().name("tollgate-state-sync".into()).spawn(|| {
                loop {
                    std::thread::sleep(LOOK_EVERY);
                    let live: Vec<Arc<PluginShared>> = lock(&WATCHED).iter().filter_map(Weak::upgrade).collect();
                    for shared in live.iter().filter(|shared| shared.sync_due()) {
                        shared.sync_durable();
                    }
                }
            });
            if let Err(error) = spawned {
                tracing::warn!(%error, "no state-sync thread: plugin state files are synced only at shutdown");
            }
        });
    }
}

/// Shards of the key-value table and of its state file. msg-auth claims, reads and writes a sender's replay
/// window on every message from both workers; behind one lock, held across the durable `write(2)`, they queued
/// for each other (the broker then used 1.4 of its 2 cores). Keys of different senders now mostly meet different
/// locks and files.
const KV_SHARDS: usize = 16;

/// One shard. Lock order: `file`, then `table`; a durable write holds both, so the file's last record for a key
/// is always the table's value.
#[derive(Default)]
struct KvShard {
    file: Mutex<Option<DurableKv>>,
    table: Mutex<HashMap<String, Vec<u8>>>,
    claims: Mutex<Claims>,
    /// The file has staged writes. Set when staging and cleared once they are written, both under `file`'s lock:
    /// a caller that finds it clear knows every write staged before it looked is in the file.
    staged: AtomicBool,
    /// A staged write must survive a power cut before its call returns (a durable `kv-add`).
    sync_on_flush: AtomicBool,
    /// Written since the last fsync.
    unsynced: AtomicBool,
}

/// The key-value table of one plugin (all its instances and versions), optionally backed by state files.
struct KvStore {
    shards: Box<[KvShard]>,
    /// Keys over all shards, against [`KV_MAX_ENTRIES`].
    entries: AtomicUsize,
    /// The state file the shards were attached to (their files are `<path>.<shard>`).
    path: Mutex<Option<PathBuf>>,
    last_write_warning: Mutex<Option<Instant>>,
    /// [`PluginSpec::state_sync`] in milliseconds (0: never), and when the state files were last synced.
    sync_interval_ms: AtomicU64,
    last_sync: Mutex<Option<Instant>>,
    syncs: AtomicU64,
    /// See [`KvSizes::claims_evicted`].
    claims_evicted: AtomicU64,
    last_eviction_warning: Mutex<Option<Instant>>,
}

impl Default for KvStore {
    fn default() -> Self {
        Self {
            shards: (0..KV_SHARDS).map(|_| KvShard::default()).collect(),
            entries: AtomicUsize::new(0),
            path: Mutex::new(None),
            last_write_warning: Mutex::new(None),
            sync_interval_ms: AtomicU64::new(0),
            last_sync: Mutex::new(None),
            syncs: AtomicU64::new(0),
            claims_evicted: AtomicU64::new(0),
            last_eviction_warning: Mutex::new(None),
        }
    }
}

/// The shard of a key: FNV-1a, not `std`'s hasher, because state files keep their keys across broker upgrades.
fn shard_of(key: &str) -> usize {
    let hash = key
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3));
    (hash % KV_SHARDS as u64) as usize
}

fn shard_path(base: &Path, shard: usize) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(format!(".{shard:02}"));
    PathBuf::from(name)
}

impl KvShard {
    /// The shard's state file, locked (before the table: see [`KvShard`]) when the write is `durable`; an error
    /// when there is none to write to.
    fn lock_file(&self, durable: bool) -> Result<Option<MutexGuard<'_, Option<DurableKv>>>, String> {
        if !durable {
            return Ok(None);
        }
        let file = lock(&self.file);
        if file.is_none() {
            return Err(NOT_DURABLE.to_owned());
        }
        Ok(Some(file))
    }
}

impl KvStore {
    fn shard(&self, key: &str) -> &KvShard {
        &self.shards[shard_of(key)]
    }

    /// Inserts under the shard's locks: counts a new key against the bounds, and stages the write when `file` (the
    /// guard [`KvShard::lock_file`] gave) is held.
    fn put(
        &self,
        shard: &KvShard,
        file: Option<&mut MutexGuard<'_, Option<DurableKv>>>,
        table: &mut HashMap<String, Vec<u8>>,
        key: &str,
        value: Vec<u8>,
    ) -> Result<(), String> {
        self.reserve(table, key, value.len())?;
        if let Some(file) = file.and_then(|guard| guard.as_mut()) {
            file.stage(key, Some(&value));
            shard.staged.store(true, Ordering::Release);
        }
        table.insert(key.to_owned(), value);
        Ok(())
    }

    /// Checks the bounds ([`KV_MAX_VALUE_BYTES`] per value, [`KV_MAX_ENTRIES`] keys) and counts a new key.
    /// A caller that then fails to insert must [`KvStore::release`] it.
    fn reserve(&self, table: &HashMap<String, Vec<u8>>, key: &str, value_len: usize) -> Result<bool, String> {
        if value_len > KV_MAX_VALUE_BYTES {
            return Err(format!("value larger than {KV_MAX_VALUE_BYTES} bytes"));
        }
        if table.contains_key(key) {
            return Ok(false);
        }
        self.entries
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |entries| {
                (entries < KV_MAX_ENTRIES).then_some(entries + 1)
            })
            .map(|_| true)
            .map_err(|_| format!("the table is full ({KV_MAX_ENTRIES} keys)"))
    }

    fn release(&self, new_key: bool) {
        if new_key {
            self.entries.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Attaches the state files at `base` (creating the directory owner-only): their entries join the table and
    /// are rewritten compacted, one file per shard. A state file of the single-file layout (before sharding) at
    /// `base` itself is read first and removed once its entries are in the shard files.
    fn attach(&self, base: &Path) -> std::io::Result<()> {
        if let Some(dir) = base.parent() {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::DirBuilderExt;
                builder.mode(0o700);
            }
            builder.create(dir)?;
        }
        let read = |path: &Path| match std::fs::read(path) {
            Ok(bytes) => Ok(Some(parse_kv_log(&bytes))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        };
        let legacy = read(base)?;
        let mut per_shard: Vec<HashMap<String, Vec<u8>>> = vec![HashMap::new(); KV_SHARDS];
        for (key, value) in legacy.iter().flatten() {
            per_shard[shard_of(key)].insert(key.clone(), value.clone());
        }
        for (shard, entries) in per_shard.iter_mut().enumerate() {
            if let Some(on_disk) = read(&shard_path(base, shard))? {
                entries.extend(on_disk);
            }
        }
        for (shard, entries) in per_shard.into_iter().enumerate() {
            let durable = DurableKv::create(
                shard_path(base, shard),
                entries.iter().map(|(key, value)| (key.as_str(), value.as_slice())),
            )?;
            let target = &self.shards[shard];
            let mut file = lock(&target.file);
            let mut table = lock(&target.table);
            for (key, value) in entries {
                if self.reserve(&table, &key, value.len()).is_ok() {
                    table.insert(key, value);
                }
            }
            *file = Some(durable);
        }
        if legacy.is_some() {
            std::fs::remove_file(base)?;
        }
        Ok(())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data half-updated in a way that matters (plain
    // inserts and counters), so a poisoned lock is used as it is.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl PluginShared {
    pub fn new(name: &str, secrets: BTreeMap<String, Vec<u8>>) -> Self {
        let secrets = secrets
            .into_iter()
            .filter_map(|(id, secret)| match KeyedSecret::new(&secret) {
                Ok(keyed) => Some((id, keyed)),
                // HMAC takes a key of any length, so this cannot happen; a secret it refused would be "no secret".
                Err(error) => {
                    warn!(plugin = name, secret = %id, %error, "secret unusable");
                    None
                }
            })
            .collect();
        Self {
            name: name.into(),
            metrics: PluginMetrics::default(),
            secrets,
            kv: Arc::default(),
            counters: Arc::default(),
            gauges: Arc::default(),
            health: Mutex::new(Health {
                window_start: Instant::now(),
                failures_in_window: 0,
                disabled_until: None,
                backoff: FIRST_BACKOFF,
                last_disabled: None,
                last_log: None,
                suppressed_logs: 0,
            }),
            disabled: AtomicBool::new(false),
        }
    }

    pub fn kv_get(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.kv.shard(key).table).get(key).cloned()
    }

    pub fn kv_set(&self, key: String, value: Vec<u8>) -> Result<(), String> {
        let mut table = lock(&self.kv.shard(&key).table);
        self.kv.reserve(&table, &key, value.len())?;
        table.insert(key, value);
        Ok(())
    }

    pub fn kv_delete(&self, key: &str) {
        let shard = self.kv.shard(key);
        let mut file = lock(&shard.file);
        let mut table = lock(&shard.table);
        if table.remove(key).is_some() {
            self.kv.release(true);
        }
        if let Some(file) = file.as_mut().filter(|file| file.keys.contains(key)) {
            file.stage(key, None);
            shard.staged.store(true, Ordering::Release);
        }
    }

    /// A reloaded plugin keeps its predecessor's key-value table (and state files) rather than starting from the
    /// files, and its counters and gauges: the old version may still be answering calls of connections that have
    /// not switched yet, and what it records (a replay window, a count of live connections) must not be lost to
    /// the new one. The broker's own metrics of the plugin (calls, failures, latency) start again with the version.
    pub fn keeping_state_of(mut self, previous: Option<&PluginShared>) -> Self {
        if let Some(previous) = previous {
            self.kv = previous.kv.clone();
            self.counters = previous.counters.clone();
            self.gauges = previous.gauges.clone();
        }
        self
    }

    /// The shared state of a plugin being loaded from `spec`: a new version of `previous` takes over its table
    /// (see [`PluginShared::keeping_state_of`]), and the spec's state file is attached.
    pub fn for_spec(spec: &PluginSpec, previous: Option<&PluginShared>) -> Result<Arc<Self>, String> {
        let shared = Arc::new(Self::new(&spec.name, spec.secrets.clone()).keeping_state_of(previous));
        if let Some(state_file) = &spec.state_file {
            shared.open_state(state_file.clone())?;
            shared
                .kv
                .sync_interval_ms
                .store(u64::try_from(spec.state_sync.as_millis()).unwrap_or(u64::MAX), Ordering::Relaxed);
            sync_thread::watch(&shared);
        }
        Ok(shared)
    }

    /// Attaches the plugin's state files: their entries join the table, and `kv_set_durable` appends to them. State
    /// already attached (kept across a reload) is left as it is: the table in memory is the newer.
    pub fn open_state(&self, path: PathBuf) -> Result<(), String> {
        let mut attached = lock(&self.kv.path);
        if attached.as_ref() == Some(&path) {
            return Ok(());
        }
        self.kv.attach(&path).map_err(|error| format!("state file {}: {error}", path.display()))?;
        *attached = Some(path);
        Ok(())
    }

    /// `kv-set-durable`: see the WIT contract. The value reaches the state file when the call returns
    /// ([`PluginShared::flush_durable`]).
    pub fn kv_set_durable(&self, key: String, value: Vec<u8>) -> Result<(), String> {
        self.store(&key, None, value, true).map(|_| ())
    }

    /// `kv-add`: see the WIT contract.
    pub fn kv_add(&self, key: &str, delta: u64, durable: bool) -> Result<u64, String> {
        let shard = self.kv.shard(key);
        let mut file = shard.lock_file(durable)?;
        // The table stays locked from read to update: the counter is atomic even against non-durable adds.
        let mut table = lock(&shard.table);
        let current = match table.get(key) {
            None => 0,
            Some(value) => u64::from_be_bytes(
                <[u8; 8]>::try_from(value.as_slice())
                    .map_err(|_| format!("{key:?} holds {} bytes, not an 8-byte counter", value.len()))?,
            ),
        };
        let next = current.wrapping_add(delta);
        self.kv.put(shard, file.as_mut(), &mut table, key, next.to_be_bytes().to_vec())?;
        if durable {
            // A counter that must not repeat must not roll back in a power cut either (msg-auth's signing-counter
            // reservation, once per `counter_reserve` signatures).
            shard.sync_on_flush.store(true, Ordering::Release);
        }
        Ok(next)
    }

    /// `kv-compare-and-set`: stores `value` under `key` if the key holds `expected` (`None`: absent), atomically
    /// across the plugin's instances, and says whether it did.
    pub fn kv_compare_and_set(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Vec<u8>,
        durable: bool,
    ) -> Result<bool, String> {
        self.store(key, Some(expected), value, durable)
    }

    /// Stores `value` under `key`, if `condition` is given only when the key holds it, and says whether it did.
    fn store(
        &self,
        key: &str,
        condition: Option<Option<&[u8]>>,
        value: Vec<u8>,
        durable: bool,
    ) -> Result<bool, String> {
        let shard = self.kv.shard(key);
        let mut file = shard.lock_file(durable)?;
        let mut table = lock(&shard.table);
        if condition.is_some_and(|expected| table.get(key).map(Vec::as_slice) != expected) {
            return Ok(false);
        }
        self.kv.put(shard, file.as_mut(), &mut table, key, value)?;
        Ok(true)
    }

    /// Writes what the plugin's calls staged for its state files (see [`DurableKv`]). Called when a call returns,
    /// before the broker acts on its result. A write that fails stays staged, is retried by the next call, and is
    /// logged at most once a minute; the call's result stands (the plugin was told its write would be made, and
    /// the value is in the table).
    pub fn flush_durable(&self) {
        for shard in &self.kv.shards {
            if !shard.staged.load(Ordering::Acquire) {
                continue;
            }
            let mut file = lock(&shard.file);
            let Some(file) = file.as_mut() else { continue };
            match file.flush() {
                Ok(()) => {
                    shard.staged.store(false, Ordering::Release);
                    shard.unsynced.store(true, Ordering::Release);
                    if shard.sync_on_flush.swap(false, Ordering::AcqRel) {
                        self.sync_shard(shard, &file.file);
                    }
                    file.compact_if_due(&lock(&shard.table), &self.name);
                }
                Err(error) => {
                    self.metrics.state_write_failures.fetch_add(1, Ordering::Relaxed);
                    let mut last = lock(&self.kv.last_write_warning);
                    if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                        *last = Some(Instant::now());
                        warn!(plugin = %self.name, %error, "could not write the plugin's state file; retrying on its next call");
                    }
                }
            }
        }
    }

    pub fn counter_add(&self, name: &str, delta: u64) {
        // Saturating, as a `$SYS` counter should; `fetch_update` only loops while another worker adds.
        let add = |value: &AtomicU64| {
            let _ = value.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_add(delta)));
        };
        update_named(&self.counters, name, add, || AtomicU64::new(delta));
    }

    /// `host.gauge-set`: named as counters are.
    pub fn gauge_set(&self, name: &str, value: i64) {
        update_named(&self.gauges, name, |gauge| gauge.store(value, Ordering::Relaxed), || AtomicI64::new(value));
    }

    /// `host.gauge-add`: atomic across instances, saturating at the ends of `i64`.
    pub fn gauge_add(&self, name: &str, delta: i64) {
        let add = |gauge: &AtomicI64| {
            let _ = gauge.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_add(delta)));
        };
        update_named(&self.gauges, name, add, || AtomicI64::new(delta));
    }

    pub fn gauges(&self) -> BTreeMap<String, i64> {
        let gauges = self.gauges.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        gauges.iter().map(|(name, value)| (name.clone(), value.load(Ordering::Relaxed))).collect()
    }

    pub fn counters(&self) -> BTreeMap<String, u64> {
        let counters = self.counters.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        counters.iter().map(|(name, value)| (name.clone(), value.load(Ordering::Relaxed))).collect()
    }

    /// Makes what reached the state files survive a power cut: an fsync of each shard file written since the last
    /// sync. Called every [`PluginSpec::state_sync`] from the sync thread, never on a worker.
    pub fn sync_durable(&self) {
        for shard in &self.kv.shards {
            if !shard.unsynced.load(Ordering::Acquire) {
                continue;
            }
            // A handle of its own, so writers are not held up by the disk; a file replaced by compaction since
            // was synced by the compaction.
            let handle = lock(&shard.file).as_ref().map(|durable| durable.file.try_clone());
            match handle {
                Some(Ok(handle)) => self.sync_shard(shard, &handle),
                Some(Err(error)) => warn!(plugin = %self.name, %error, "could not sync the plugin's state file"),
                None => {}
            }
        }
        *lock(&self.kv.last_sync) = Some(Instant::now());
    }

    fn sync_shard(&self, shard: &KvShard, file: &std::fs::File) {
        shard.unsynced.store(false, Ordering::Release);
        match file.sync_data() {
            Ok(()) => {
                self.kv.syncs.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                shard.unsynced.store(true, Ordering::Release);
                self.metrics.state_write_failures.fetch_add(1, Ordering::Relaxed);
                warn!(plugin = %self.name, %error, "could not sync the plugin's state file");
            }
        }
    }

    /// Whether the sync thread should sync this plugin's state now.
    fn sync_due(&self) -> bool {
        let interval = self.kv.sync_interval_ms.load(Ordering::Relaxed);
        interval > 0
            && lock(&self.kv.last_sync).is_none_or(|last| last.elapsed() >= Duration::from_millis(interval))
            && self.kv.shards.iter().any(|shard| shard.unsynced.load(Ordering::Acquire))
    }

    /// fsyncs of this plugin's state files so far.
    pub fn state_syncs(&self) -> u64 {
        self.kv.syncs.load(Ordering::Relaxed)
    }

    /// `kv-claim`: see the WIT contract.
    pub fn kv_claim(&self, key: &str, ttl_ms: u64) -> bool {
        self.kv_claim_at(key, ttl_ms, monotonic_ms())
    }

    fn kv_claim_at(&self, key: &str, ttl_ms: u64, now: u64) -> bool {
        let (claimed, evicted) = lock(&self.kv.shard(key).claims).claim(key, ttl_ms, now);
        if evicted > 0 {
            self.kv.claims_evicted.fetch_add(evicted, Ordering::Relaxed);
            let mut last = lock(&self.kv.last_eviction_warning);
            if last.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                *last = Some(Instant::now());
                warn!(
                    plugin = %self.name,
                    limit = CLAIM_MAX_ENTRIES,
                    "the plugin's claim table is full: live records are dropped before they expire (a replay \
                     window cut short); see kv/claims_evicted in $SYS"
                );
            }
        }
        claimed
    }

    /// How full the plugin's key-value table is, for `$SYS/broker/plugins/<name>/kv/…`.
    pub fn kv_sizes(&self) -> KvSizes {
        self.kv_sizes_at(monotonic_ms())
    }

    fn kv_sizes_at(&self, now: u64) -> KvSizes {
        let claims = self
            .kv
            .shards
            .iter()
            .map(|shard| {
                let mut claims = lock(&shard.claims);
                claims.drop_expired(now);
                claims.live.len()
            })
            .sum();
        KvSizes {
            entries: self.kv.entries.load(Ordering::Relaxed),
            claims,
            claims_evicted: self.kv.claims_evicted.load(Ordering::Relaxed),
        }
    }

    /// `crypto.mac`: the full tag.
    pub fn mac_tag(
        &self,
        alg: MacAlgorithm,
        key_id: &str,
        derive_info: Option<&[u8]>,
        data: &[u8],
    ) -> Result<Vec<u8>, String> {
        Ok(self.keyed(alg, key_id, derive_info)?.tag(data))
    }

    /// `crypto.verify-mac`: a constant-time check of a (possibly truncated, at least 16-byte) tag.
    pub fn verify_mac(
        &self,
        alg: MacAlgorithm,
        key_id: &str,
        derive_info: Option<&[u8]>,
        data: &[u8],
        tag: &[u8],
    ) -> Result<bool, String> {
        let longest = if alg == MacAlgorithm::CmacAes128 { 16 } else { 32 };
        if !(16..=longest).contains(&tag.len()) {
            return Err(format!("a tag is 16 to {longest} bytes, not {}", tag.len()));
        }
        Ok(self.keyed(alg, key_id, derive_info)?.verify_truncated(data, tag))
    }

    /// The MAC of `alg` keyed with the secret `key_id`, or with its HKDF-SHA256 derivation (no salt) by
    /// `derive_info`: 32 bytes for HMAC, 16 for CMAC.
    fn keyed(&self, alg: MacAlgorithm, key_id: &str, derive_info: Option<&[u8]>) -> Result<Keyed, String> {
        let secret = self.secrets.get(key_id).ok_or_else(|| format!("no secret named {key_id:?}"))?;
        match (alg, derive_info) {
            (MacAlgorithm::HmacSha256, None) => Ok(Keyed::Hmac(secret.mac.clone())),
            (MacAlgorithm::HmacSha256, Some(info)) => Hmac::<Sha256>::new_from_slice(&secret.derive::<32>(info)?)
                .map(Keyed::Hmac)
                .map_err(|error| error.to_string()),
            (MacAlgorithm::CmacAes128, None) => secret
                .cmac
                .clone()
                .map(|mac| Keyed::Cmac(Box::new(mac)))
                .ok_or_else(|| format!("secret {key_id:?} is not 16 bytes, so it is not an AES-128 key")),
            (MacAlgorithm::CmacAes128, Some(info)) => {
                <Cmac<Aes128> as Mac>::new_from_slice(&secret.derive::<16>(info)?)
                    .map(|mac| Keyed::Cmac(Box::new(mac)))
                    .map_err(|error| error.to_string())
            }
        }
    }

    pub fn hmac_sha256(&self, key_id: &str, data: &[u8]) -> Result<Vec<u8>, String> {
        self.mac_tag(MacAlgorithm::HmacSha256, key_id, None, data)
    }

    pub fn hmac_sha256_derived(&self, key_id: &str, info: &[u8], data: &[u8]) -> Result<Vec<u8>, String> {
        self.mac_tag(MacAlgorithm::HmacSha256, key_id, Some(info), data)
    }

    /// Constant-time comparison of a (possibly truncated, at least 16-byte) tag.
    pub fn verify_hmac_sha256(
        &self,
        key_id: &str,
        derive_info: Option<&[u8]>,
        data: &[u8],
        tag: &[u8],
    ) -> Result<bool, String> {
        self.verify_mac(MacAlgorithm::HmacSha256, key_id, derive_info, data, tag)
    }

    pub fn sha256(data: &[u8]) -> Vec<u8> {
        Sha256::digest(data).to_vec()
    }

    /// `Err` while the plugin is disabled after a crash loop.
    pub fn check_enabled(&self) -> Result<(), Failure> {
        if !self.disabled.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut health = lock(&self.health);
        match health.disabled_until {
            Some(until) if Instant::now() < until => {
                Err(Failure::Disabled(u64::try_from((until - Instant::now()).as_millis()).unwrap_or(u64::MAX)))
            }
            Some(_) => {
                health.disabled_until = None;
                self.disabled.store(false, Ordering::Release);
                health.failures_in_window = 0;
                health.window_start = Instant::now();
                tracing::info!(plugin = %self.name, "plugin enabled again after its backoff");
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Counts a failure, logs it (at most once a second per plugin) and disables the plugin on a crash loop.
    pub fn record_failure(&self, hook: &str, failure: &Failure) {
        let metrics = &self.metrics;
        metrics.failures.fetch_add(1, Ordering::Relaxed);
        match failure {
            Failure::CpuLimit(_) => metrics.cpu_limit.fetch_add(1, Ordering::Relaxed),
            Failure::OutOfMemory(_) => metrics.out_of_memory.fetch_add(1, Ordering::Relaxed),
            Failure::Trap(_) | Failure::Script(_) | Failure::BadAnswer(_) | Failure::Instantiate(_) => {
                metrics.traps.fetch_add(1, Ordering::Relaxed)
            }
            Failure::Timeout(_) => metrics.timeouts.fetch_add(1, Ordering::Relaxed),
            Failure::Disabled(_) => 0,
        };
        let now = Instant::now();
        let mut health = lock(&self.health);
        if !matches!(failure, Failure::Disabled(_)) {
            if now.duration_since(health.window_start) > CRASH_LOOP_WINDOW {
                health.window_start = now;
                health.failures_in_window = 0;
            }
            health.failures_in_window += 1;
            if health.failures_in_window >= CRASH_LOOP_FAILURES && health.disabled_until.is_none() {
                if health.last_disabled.is_some_and(|at| now.duration_since(at) > MAX_BACKOFF + health.backoff) {
                    health.backoff = FIRST_BACKOFF;
                }
                let backoff = health.backoff;
                health.disabled_until = Some(now + backoff);
                self.disabled.store(true, Ordering::Release);
                health.last_disabled = Some(now);
                health.backoff = (backoff * 2).min(MAX_BACKOFF);
                metrics.disabled.fetch_add(1, Ordering::Relaxed);
                warn!(
                    plugin = %self.name,
                    failures = health.failures_in_window,
                    backoff_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                    "plugin disabled after repeated failures; its hooks apply their failure policy meanwhile"
                );
                return;
            }
        }
        if health.last_log.is_some_and(|at| now.duration_since(at) < LOG_INTERVAL) {
            health.suppressed_logs += 1;
            return;
        }
        let suppressed = std::mem::take(&mut health.suppressed_logs);
        health.last_log = Some(now);
        drop(health);
        warn!(plugin = %self.name, hook, error = %failure, suppressed, "plugin call failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crash_loop_disables_then_reenables_with_growing_backoff() {
        let shared = PluginShared::new("p", BTreeMap::new());
        for _ in 0..CRASH_LOOP_FAILURES - 1 {
            shared.record_failure("authorize", &Failure::Trap("x".into()));
            assert_eq!(shared.check_enabled(), Ok(()));
        }
        shared.record_failure("authorize", &Failure::Trap("x".into()));
        assert!(matches!(shared.check_enabled(), Err(Failure::Disabled(_))));
        assert_eq!(shared.metrics.disabled.load(Ordering::Relaxed), 1);
        // Pretend the backoff is over.
        lock(&shared.health).disabled_until = Some(Instant::now() - Duration::from_millis(1));
        assert_eq!(shared.check_enabled(), Ok(()));
        assert_eq!(lock(&shared.health).backoff, FIRST_BACKOFF * 2);
    }

    fn poll_lease<'a>(
        lease: std::pin::Pin<&mut (impl std::future::Future<Output = Lease<'a, u32>> + 'a)>,
    ) -> Option<Lease<'a, u32>> {
        match lease.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
            std::task::Poll::Ready(lease) => Some(lease),
            std::task::Poll::Pending => None,
        }
    }

    #[test]
    fn the_pool_bounds_instances_and_hands_back_returned_and_freed_slots() {
        let pool = Pool::<u32>::new(2);
        pool.put(7);
        let mut first = poll_lease(std::pin::pin!(pool.lease())).expect("an idle instance");
        assert_eq!(first.take_idle(), Some(7));
        let mut second = poll_lease(std::pin::pin!(pool.lease())).expect("room for a second instance");
        assert_eq!(second.take_idle(), None, "nothing idle: build one");

        // Both slots are taken: a third caller waits until one comes back.
        let mut third = std::pin::pin!(pool.lease());
        assert!(poll_lease(third.as_mut()).is_none());
        first.put_back(7);
        let mut third = poll_lease(third.as_mut()).expect("woken by the returned instance");
        assert_eq!(third.take_idle(), Some(7));

        // A failed (or cancelled) call drops its lease: the slot is free again, for a new instance.
        let mut fourth = std::pin::pin!(pool.lease());
        assert!(poll_lease(fourth.as_mut()).is_none());
        drop(second);
        let mut fourth = poll_lease(fourth.as_mut()).expect("woken by the freed slot");
        assert_eq!(fourth.take_idle(), None);
        drop(third);
        drop(fourth);
        assert_eq!(pool.live.load(Ordering::SeqCst), 0);
        assert_eq!(pool.waiting.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn kv_is_bounded() {
        let shared = PluginShared::new("p", BTreeMap::new());
        assert!(shared.kv_set("k".into(), vec![0; KV_MAX_VALUE_BYTES + 1]).is_err());
        shared.kv_set("k".into(), b"v".to_vec()).expect("set");
        assert_eq!(shared.kv_get("k"), Some(b"v".to_vec()));
        shared.kv_delete("k");
        assert_eq!(shared.kv_get("k"), None);
    }

    #[test]
    fn durable_kv_survives_a_restart_and_a_torn_tail() {
        let dir = std::env::temp_dir().join(format!("tollgate-kv-{}-{:?}", std::process::id(), Instant::now()));
        let path = dir.join("p.kv");
        let shared = PluginShared::new("p", BTreeMap::new());
        assert!(shared.kv_set_durable("k".into(), b"v".to_vec()).is_err(), "no state file attached yet");
        shared.open_state(path.clone()).expect("open");
        shared.kv_set_durable("keep".into(), b"1".to_vec()).expect("set");
        shared.kv_set_durable("gone".into(), b"2".to_vec()).expect("set");
        shared.kv_set_durable("keep".into(), b"3".to_vec()).expect("overwrite");
        shared.kv_delete("gone");
        shared.kv_set("volatile".into(), b"4".to_vec()).expect("set");
        assert_eq!(shared.kv_add("ctr", 7, true), Ok(7));
        assert_eq!(shared.kv_add("ctr", 1, false), Ok(8));
        drop(shared);
        // A crash mid-write leaves half a record behind.
        std::fs::OpenOptions::new()
            .append(true)
            .open(shard_path(&path, shard_of("keep")))
            .expect("open")
            .write_all(&[0, 0, 0, 9, b'x'])
            .expect("tear");
        let restarted = PluginShared::new("p", BTreeMap::new());
        restarted.open_state(path.clone()).expect("reopen");
        assert_eq!(restarted.kv_get("keep"), Some(b"3".to_vec()));
        assert_eq!(restarted.kv_get("gone"), None);
        assert_eq!(restarted.kv_get("volatile"), None);
        assert_eq!(restarted.kv_get("ctr"), Some(7u64.to_be_bytes().to_vec()), "only the durable add persisted");
        // Compaction keeps live values only, including the one whose write triggered it.
        let hot_file = shard_path(&path, shard_of("hot"));
        let size = || std::fs::metadata(&hot_file).expect("stat").len();
        let mut compacted_at = None;
        let rounds = COMPACTION_SLACK as u32 + 2000;
        for round in 0..rounds {
            let before = size();
            restarted.kv_set_durable("hot".into(), round.to_be_bytes().to_vec()).expect("set");
            restarted.flush_durable();
            if size() < before && compacted_at.is_none() {
                compacted_at = Some(round);
                // Read without opening (opening rewrites the file under the live writer).
                let on_disk = parse_kv_log(&std::fs::read(&hot_file).expect("read"));
                assert_eq!(on_disk.get("hot"), Some(&round.to_be_bytes().to_vec()), "lost in compaction");
            }
        }
        assert!(compacted_at.is_some() && size() < 20 * COMPACTION_SLACK as u64, "the log was compacted");
        drop(restarted);
        let again = PluginShared::new("p", BTreeMap::new());
        again.open_state(path).expect("reopen");
        assert_eq!(again.kv_get("hot"), Some((rounds - 1).to_be_bytes().to_vec()));
        assert_eq!(again.kv_get("keep"), Some(b"3".to_vec()));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn durable_writes_of_a_call_reach_the_file_together_when_it_returns() {
        let dir = std::env::temp_dir().join(format!("tollgate-kv-flush-{}-{:?}", std::process::id(), Instant::now()));
        let path = dir.join("p.kv");
        let shared = PluginShared::new("p", BTreeMap::new());
        shared.open_state(path.clone()).expect("open");
        let file = shard_path(&path, shard_of("window"));
        let on_disk = || parse_kv_log(&std::fs::read(&file).expect("read"));
        let size = || std::fs::metadata(&file).expect("stat").len();
        for value in [b"1", b"2", b"3"] {
            shared.kv_set_durable("window".into(), value.to_vec()).expect("set");
        }
        assert_eq!(size(), 0, "written before the call returned");
        shared.flush_durable();
        assert_eq!(on_disk().get("window"), Some(&b"3".to_vec()));
        assert_eq!(size(), 4 + 6 + 4 + 1, "one record for three writes of one key");

        // A refused write stays staged, is counted, and goes in with the next call's.
        shared.kv_set_durable("window".into(), b"4".to_vec()).expect("set");
        let shard = shared.kv.shard("window");
        let writable = {
            let mut guard = lock(&shard.file);
            let durable = guard.as_mut().expect("attached");
            std::mem::replace(&mut durable.file, std::fs::File::open(&file).expect("read-only"))
        };
        shared.flush_durable();
        assert_eq!(shared.metrics.state_write_failures.load(Ordering::Relaxed), 1);
        assert_eq!(on_disk().get("window"), Some(&b"3".to_vec()));
        lock(&shard.file).as_mut().expect("attached").file = writable;
        shared.flush_durable();
        assert_eq!(on_disk().get("window"), Some(&b"4".to_vec()), "the refused write was lost");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn counters_are_synced_before_their_call_returns_and_the_rest_every_interval() {
        let dir = std::env::temp_dir().join(format!("tollgate-kv-sync-{}-{:?}", std::process::id(), Instant::now()));
        let mut spec = PluginSpec::new("p", crate::PluginKind::Lua, "p.lua");
        spec.state_file = Some(dir.join("p.kv"));
        spec.state_sync = Duration::ZERO;
        let shared = PluginShared::for_spec(&spec, None).expect("state");
        shared.kv_set_durable("window".into(), b"1".to_vec()).expect("set");
        shared.flush_durable();
        assert_eq!(shared.state_syncs(), 0, "a window move waits for the interval (here: the OS)");
        assert_eq!(shared.kv_add("reservation", 1000, true), Ok(1000));
        shared.flush_durable();
        assert_eq!(shared.state_syncs(), 1, "a durable counter is synced before its call returns");
        shared.sync_durable();
        let synced = shared.state_syncs();
        assert!(shared.kv.shards.iter().all(|shard| !shard.unsynced.load(Ordering::Acquire)));
        shared.sync_durable();
        assert_eq!(shared.state_syncs(), synced, "nothing new, nothing synced");
        drop(shared);

        // With an interval, the sync thread does it (bounded wait: it looks every 250 ms).
        spec.state_sync = Duration::from_millis(50);
        let shared = PluginShared::for_spec(&spec, None).expect("state");
        shared.kv_set_durable("window".into(), b"2".to_vec()).expect("set");
        shared.flush_durable();
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.state_syncs() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(shared.state_syncs(), 1, "the sync thread did not sync the written shard");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn compare_and_set_stores_only_over_the_expected_value() {
        let dir = std::env::temp_dir().join(format!("tollgate-kv-cas-{}-{:?}", std::process::id(), Instant::now()));
        let path = dir.join("p.kv");
        let shared = PluginShared::new("p", BTreeMap::new());
        assert!(shared.kv_compare_and_set("w", None, b"1".to_vec(), true).is_err(), "no state file yet");
        assert_eq!(shared.kv_compare_and_set("w", None, b"1".to_vec(), false), Ok(true));
        assert_eq!(shared.kv_compare_and_set("w", None, b"2".to_vec(), false), Ok(false), "no longer absent");
        assert_eq!(shared.kv_compare_and_set("w", Some(b"9"), b"2".to_vec(), false), Ok(false));
        assert_eq!(shared.kv_get("w"), Some(b"1".to_vec()));
        shared.open_state(path.clone()).expect("open");
        assert_eq!(shared.kv_compare_and_set("w", Some(b"1"), b"2".to_vec(), true), Ok(true));
        assert!(shared.kv_compare_and_set("big", None, vec![0; KV_MAX_VALUE_BYTES + 1], false).is_err());
        shared.flush_durable();
        drop(shared);
        let restarted = PluginShared::new("p", BTreeMap::new());
        restarted.open_state(path).expect("reopen");
        assert_eq!(restarted.kv_get("w"), Some(b"2".to_vec()));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_single_file_state_moves_into_the_shard_files() {
        let dir = std::env::temp_dir().join(format!("tollgate-kv-legacy-{}-{:?}", std::process::id(), Instant::now()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("p.kv");
        let mut legacy = Vec::new();
        for (key, value) in [("rx/k/a", b"old".as_slice()), ("rx/k/b", b"1"), ("rx/k/a", b"new")] {
            put_kv_record(&mut legacy, key, Some(value));
        }
        put_kv_record(&mut legacy, "rx/k/b", None);
        std::fs::write(&path, legacy).expect("write");
        let shared = PluginShared::new("p", BTreeMap::new());
        shared.open_state(path.clone()).expect("open");
        assert_eq!(shared.kv_get("rx/k/a"), Some(b"new".to_vec()));
        assert_eq!(shared.kv_get("rx/k/b"), None);
        assert!(!path.exists(), "the single file is gone once its entries are in the shards");
        drop(shared);
        let again = PluginShared::new("p", BTreeMap::new());
        again.open_state(path).expect("reopen");
        assert_eq!(again.kv_get("rx/k/a"), Some(b"new".to_vec()));
        assert_eq!(again.kv.entries.load(Ordering::Relaxed), 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_key_bound_spans_all_shards() {
        let shared = PluginShared::new("p", BTreeMap::new());
        shared.kv.entries.store(KV_MAX_ENTRIES - 1, Ordering::Relaxed);
        shared.kv_set("last".into(), b"1".to_vec()).expect("room for one more key");
        assert!(shared.kv_set("one-too-many".into(), b"1".to_vec()).is_err());
        assert!(shared.kv_add("counter", 1, false).is_err());
        shared.kv_set("last".into(), b"2".to_vec()).expect("replacing a value needs no room");
        shared.kv_delete("last");
        shared.kv_set("one-too-many".into(), b"1".to_vec()).expect("a deletion frees a key");
    }

    #[test]
    fn kv_add_is_a_counter() {
        let shared = PluginShared::new("p", BTreeMap::new());
        assert_eq!(shared.kv_add("c", 1, false), Ok(1));
        assert_eq!(shared.kv_add("c", 41, false), Ok(42));
        shared.kv_set("text".into(), b"abc".to_vec()).expect("set");
        assert!(shared.kv_add("text", 1, false).is_err());
        assert!(shared.kv_add("c", 1, true).is_err(), "durable needs a state file");
        assert_eq!(shared.kv_add("c", 0, false), Ok(42), "a refused durable add changes nothing");
    }

    #[test]
    fn derived_keys_follow_rfc5869_and_verification_is_truncation_aware() {
        // RFC 5869 test case 3 (no salt, no info): the derived key is the HMAC key used here.
        let ikm = vec![0x0b; 22];
        let shared = PluginShared::new("p", BTreeMap::from([("master".to_owned(), ikm)]));
        let okm = hex::decode("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d").expect("hex");
        let mut expected = Hmac::<Sha256>::new_from_slice(&okm).expect("key");
        expected.update(b"data");
        let expected = expected.finalize().into_bytes().to_vec();
        assert_eq!(shared.hmac_sha256_derived("master", b"", b"data"), Ok(expected.clone()));
        assert_eq!(shared.verify_hmac_sha256("master", Some(b""), b"data", &expected), Ok(true));
        assert_eq!(shared.verify_hmac_sha256("master", Some(b""), b"data", &expected[..16]), Ok(true));
        assert_eq!(shared.verify_hmac_sha256("master", Some(b"other"), b"data", &expected), Ok(false));
        assert_eq!(shared.verify_hmac_sha256("master", None, b"data", &expected), Ok(false));
        assert!(shared.verify_hmac_sha256("master", None, b"data", &expected[..8]).is_err());
        assert!(shared.hmac_sha256_derived("absent", b"", b"data").is_err());
    }

    #[test]
    fn cmac_follows_rfc4493_and_needs_an_aes_key() {
        let key = hex::decode("2b7e151628aed2a6abf7158809cf4f3c").expect("hex");
        let shared = PluginShared::new(
            "p",
            BTreeMap::from([("tcu".to_owned(), key), ("long".to_owned(), b"not sixteen bytes long".to_vec())]),
        );
        let block = hex::decode("6bc1bee22e409f96e93d7e117393172a").expect("hex");
        let cmac = MacAlgorithm::CmacAes128;
        // RFC 4493 section 4: the empty message (example 1) and one block (example 2).
        let empty = hex::decode("bb1d6929e95937287fa37d129b756746").expect("hex");
        assert_eq!(shared.mac_tag(cmac, "tcu", None, b""), Ok(empty));
        let one_block = hex::decode("070a16b46b4d4144f79bdd9dd04a287c").expect("hex");
        assert_eq!(shared.mac_tag(cmac, "tcu", None, &block), Ok(one_block.clone()));
        assert_eq!(shared.verify_mac(cmac, "tcu", None, &block, &one_block), Ok(true));
        let mut flipped = one_block.clone();
        flipped[15] ^= 1;
        assert_eq!(shared.verify_mac(cmac, "tcu", None, &block, &flipped), Ok(false));
        assert!(shared.verify_mac(cmac, "tcu", None, &block, &[one_block.as_slice(), &[0]].concat()).is_err());
        let refused = shared.mac_tag(cmac, "long", None, b"x").expect_err("not an AES key");
        assert!(refused.contains("not 16 bytes"), "{refused}");
        // A derived CMAC key is 16 bytes of HKDF, so any master secret works.
        let derived = shared.mac_tag(cmac, "long", Some(b"vin-mac-v1:1J9RP1A36A1644345"), b"x").expect("derived");
        assert_eq!(derived.len(), 16);
        // The HMAC path of `mac` is the HMAC of `hmac-sha256`.
        assert_eq!(shared.mac_tag(MacAlgorithm::HmacSha256, "long", None, b"x"), shared.hmac_sha256("long", b"x"));
    }

    #[test]
    fn claims_expire_and_stay_bounded() {
        let shared = PluginShared::new("p", BTreeMap::new());
        assert!(shared.kv_claim_at("nonce/a", 100, 1_000));
        assert!(!shared.kv_claim_at("nonce/a", 100, 1_050), "a live record is claimed once");
        assert!(!shared.kv_claim_at("nonce/a", 100, 1_099));
        assert!(shared.kv_claim_at("nonce/a", 100, 1_100), "an expired record can be claimed again");
        assert!(!shared.kv_claim_at("nonce/a", 100, 1_150));
        // Claims are not table entries.
        assert_eq!(shared.kv_get("nonce/a"), None);

        // Fill one shard past its bound: the records closest to expiry go first, the newest stay.
        let keys: Vec<String> =
            (0..).map(|n| format!("n{n}")).filter(|key| shard_of(key) == 0).take(CLAIMS_PER_SHARD + 10).collect();
        for (at, key) in keys.iter().enumerate() {
            assert!(shared.kv_claim_at(key, 1_000_000 + at as u64, 2_000));
        }
        let claims = lock(&shared.kv.shards[0].claims);
        assert_eq!(claims.live.len(), CLAIMS_PER_SHARD);
        assert!(!claims.live.contains_key(&keys[0]) && claims.live.contains_key(&keys[CLAIMS_PER_SHARD + 9]));
        drop(claims);
        assert!(!shared.kv_claim_at(&keys[CLAIMS_PER_SHARD + 9], 10, 2_001));
        assert!(shared.kv_claim_at(&keys[0], 10, 2_001), "an evicted record is gone");
    }

    #[test]
    fn kv_sizes_count_live_claims_and_evictions() {
        let shared = PluginShared::new("p", BTreeMap::new());
        shared.kv_set("window/car-1".into(), vec![1]).expect("set");
        assert!(shared.kv_claim_at("nonce/a", 100, 1_000));
        assert!(shared.kv_claim_at("nonce/b", 500, 1_000));
        let sizes = shared.kv_sizes_at(1_050);
        assert_eq!(sizes, KvSizes { entries: 1, claims: 2, claims_evicted: 0 });
        // An expired claim is not counted, and reading the sizes evicts nothing live.
        assert_eq!(shared.kv_sizes_at(1_100).claims, 1);
        assert_eq!(shared.kv_sizes_at(1_100).claims, 1);

        // A full shard: each claim past the bound pushes out one live record, and says so.
        let keys: Vec<String> =
            (0..).map(|n| format!("m{n}")).filter(|key| shard_of(key) == 3).take(CLAIMS_PER_SHARD + 5).collect();
        for key in &keys {
            assert!(shared.kv_claim_at(key, 1_000_000, 2_000));
        }
        let sizes = shared.kv_sizes_at(2_000);
        assert_eq!(sizes.claims_evicted, 5);
        assert_eq!(sizes.claims, CLAIMS_PER_SHARD, "shard 3 full; the two nonces expired");
        assert_eq!(shared.kv_sizes_at(1_002_001).claims, 0, "everything expires");
    }

    #[test]
    fn counters_need_topic_safe_names() {
        let shared = PluginShared::new("p", BTreeMap::new());
        shared.counter_add("denied", 2);
        shared.counter_add("a+b", 1);
        shared.counter_add("", 1);
        assert_eq!(shared.counters(), BTreeMap::from([("denied".to_owned(), 2)]));
    }

    #[test]
    fn gauges_keep_the_last_value_set_under_topic_safe_names() {
        let shared = PluginShared::new("p", BTreeMap::new());
        shared.gauge_set("keys/k1/not_after_s", 1_800_000_000);
        shared.gauge_set("clock_trusted", 1);
        shared.gauge_set("clock_trusted", 0);
        shared.gauge_set("below", -3);
        shared.gauge_set("a/#", 1);
        shared.gauge_set("", 1);
        // Adding counts up and down from where the gauge is (nothing yet: zero) and saturates.
        shared.gauge_add("online", 2);
        shared.gauge_add("online", -1);
        shared.gauge_add("below", -3);
        shared.gauge_add("a/+", 1);
        shared.gauge_set("edge", i64::MAX);
        shared.gauge_add("edge", 1);
        let expected = [
            ("below", -6),
            ("clock_trusted", 0),
            ("edge", i64::MAX),
            ("keys/k1/not_after_s", 1_800_000_000),
            ("online", 1),
        ];
        assert_eq!(shared.gauges(), expected.into_iter().map(|(name, value)| (name.to_owned(), value)).collect());
    }

    #[test]
    fn hmac_uses_named_secret_only() {
        let shared = PluginShared::new("p", BTreeMap::from([("k1".to_owned(), b"key".to_vec())]));
        // RFC 4231-style check against a known vector: HMAC-SHA256("key", "The quick brown fox jumps over the lazy dog").
        let tag = shared.hmac_sha256("k1", b"The quick brown fox jumps over the lazy dog").expect("hmac");
        assert_eq!(hex::encode(tag), "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8");
        assert!(shared.hmac_sha256("missing", b"x").is_err());
    }

    #[test]
    fn certificate_fields_are_attributes() {
        let client = CallClient {
            attributes: Arc::new(BTreeMap::from([("tenant".to_owned(), "acme".to_owned())])),
            peer: Some(Arc::new(PeerIdentity {
                common_name: Some("car-1".into()),
                san_uri: vec!["urn:vin:1J9RP1A36A1644345".into()],
                ..Default::default()
            })),
        };
        assert_eq!(client.attribute("tenant").as_deref(), Some("acme"));
        assert_eq!(client.attribute("cert.common-name").as_deref(), Some("car-1"));
        assert_eq!(client.attribute("cert.san-uri").as_deref(), Some("urn:vin:1J9RP1A36A1644345"));
        assert_eq!(client.attribute("cert.ou"), None);
        assert_eq!(client.attribute("nothing"), None);
    }
}
