//! Connection caps (total and per listener) and a connection rate limit per source address.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Why a new connection was closed at accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    TotalConnections(usize),
    ListenerConnections(usize),
    RateFromAddress,
}

impl Refusal {
    /// The MQTT 5 CONNACK reason code for this refusal.
    pub fn reason_code(&self) -> tollgate_protocol::ReasonCode {
        match self {
            Self::TotalConnections(_) | Self::ListenerConnections(_) => tollgate_protocol::ReasonCode::QUOTA_EXCEEDED,
            Self::RateFromAddress => tollgate_protocol::ReasonCode::CONNECTION_RATE_EXCEEDED,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TotalConnections(cap) => write!(formatter, "max_connections ({cap}) reached"),
            Self::ListenerConnections(cap) => write!(formatter, "listener max_connections ({cap}) reached"),
            Self::RateFromAddress => formatter.write_str("max_connection_rate exceeded for this address"),
        }
    }
}

/// Source addresses tracked for the rate limit at most; beyond it, full buckets (addresses quiet for a second or
/// more) are forgotten first, so a scan of many addresses cannot grow the table without bound.
const MAX_TRACKED_ADDRESSES: usize = 16_384;

/// Limits shared by every listener.
pub struct ConnectionLimits {
    /// 0 = no cap.
    pub max_connections: usize,
    /// New connections per second per source address (and the burst allowed); 0 = off.
    pub max_connection_rate: u32,
    open: Arc<AtomicUsize>,
    /// Open connections per worker runtime, to spread connections over the workers (see `placement`).
    per_worker: Arc<[AtomicUsize]>,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    /// Refused connections currently being answered with a CONNACK (see [`ConnectionLimits::answer_refusal`]).
    answering: Arc<AtomicUsize>,
}

/// The worker a source address prefers (see [`ConnectionLimits::placement`]): a multiplicative hash of the
/// address, stable for the process.
fn home_worker(address: IpAddr, workers: usize) -> usize {
    let folded = match address.to_canonical() {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            (bits as u64) ^ ((bits >> 64) as u64)
        }
    };
    let mixed = folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
    (mixed % workers.max(1) as u64) as usize
}

/// Refused connections answered at once, at most; further refusals are closed unanswered, so a flood costs no
/// more than an accept and a close each.
pub const MAX_ANSWERED_REFUSALS: usize = 32;

/// A slot for answering one refused connection; released when dropped.
pub struct RefusalSlot(Arc<AtomicUsize>);

impl Drop for RefusalSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Bucket {
    tokens: f64,
    refilled: Instant,
}

/// A connection counted against the caps until dropped.
pub struct Admission {
    total: Arc<AtomicUsize>,
    listener: Arc<AtomicUsize>,
    per_worker: Arc<[AtomicUsize]>,
    worker: usize,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        self.listener.fetch_sub(1, Ordering::AcqRel);
        if let Some(count) = self.per_worker.get(self.worker) {
            count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl ConnectionLimits {
    pub fn new(max_connections: usize, max_connection_rate: u32, workers: usize) -> Self {
        Self {
            max_connections,
            max_connection_rate,
            open: Arc::default(),
            per_worker: (0..workers.max(1)).map(|_| AtomicUsize::new(0)).collect(),
            buckets: Mutex::default(),
            answering: Arc::default(),
        }
    }

    /// A slot to answer a refused connection with a CONNACK, unless [`MAX_ANSWERED_REFUSALS`] are being answered.
    pub fn answer_refusal(&self) -> Option<RefusalSlot> {
        let taken = self.answering.fetch_add(1, Ordering::AcqRel);
        let slot = RefusalSlot(self.answering.clone());
        (taken < MAX_ANSWERED_REFUSALS).then_some(slot)
    }

    /// Which worker should serve a connection from `remote` accepted by `worker`: `None` to keep it, else the
    /// worker to hand it to.
    ///
    /// Each source address has a home worker. Clients on one host (a gateway application and the devices it
    /// talks to, a bridge, a test harness on loopback) often exchange messages, and on one worker a delivery
    /// needs no cross-thread wake-up of a parked thread, which costs more than the rest of the delivery. So a
    /// connection goes home while home is not clearly ahead of the least loaded worker; otherwise it stays where
    /// it was accepted unless that worker is clearly ahead, in which case it goes to the least loaded one. Every
    /// worker accepts (on Linux from its own socket of a `SO_REUSEPORT` group, elsewhere racing for a shared one),
    /// and without the second rule one worker could end up with every connection. "Clearly ahead" is more than 2 + 1/8 over the least loaded worker,
    /// which bounds the imbalance whatever the addresses.
    pub fn placement(&self, worker: usize, remote: IpAddr) -> Option<usize> {
        let loads = || self.per_worker.iter().map(|count| count.load(Ordering::Acquire));
        let (least_index, least) = loads().enumerate().min_by_key(|&(_, count)| count)?;
        let ahead = |count: usize| count > least + 2 + least / 8;
        let home = home_worker(remote, self.per_worker.len());
        if home != worker && !ahead(self.per_worker[home].load(Ordering::Acquire)) {
            return Some(home);
        }
        ahead(self.per_worker.get(worker)?.load(Ordering::Acquire)).then_some(least_index)
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Admits a connection from `address` on a listener with `listener_open` connections and cap `listener_cap`.
    pub fn admit(
        &self,
        address: IpAddr,
        listener_open: &Arc<AtomicUsize>,
        listener_cap: usize,
        worker: usize,
    ) -> Result<Admission, Refusal> {
        self.take_rate_token(address, Instant::now())?;
        let total = self.open.fetch_add(1, Ordering::AcqRel) + 1;
        let on_listener = listener_open.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(count) = self.per_worker.get(worker) {
            count.fetch_add(1, Ordering::AcqRel);
        }
        let admission = Admission {
            total: self.open.clone(),
            listener: listener_open.clone(),
            per_worker: self.per_worker.clone(),
            worker,
        };
        if self.max_connections != 0 && total > self.max_connections {
            return Err(Refusal::TotalConnections(self.max_connections));
        }
        if listener_cap != 0 && on_listener > listener_cap {
            return Err(Refusal::ListenerConnections(listener_cap));
        }
        Ok(admission)
    }

    fn take_rate_token(&self, address: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.max_connection_rate == 0 {
            return Ok(());
        }
        let rate = f64::from(self.max_connection_rate);
        let mut buckets = self.buckets.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if buckets.len() >= MAX_TRACKED_ADDRESSES && !buckets.contains_key(&address) {
            buckets.retain(|_, bucket| now.duration_since(bucket.refilled).as_secs_f64() < 1.0);
            if buckets.len() >= MAX_TRACKED_ADDRESSES {
                // Every tracked address is active: refuse newcomers rather than forget an active flooder.
                return Err(Refusal::RateFromAddress);
            }
        }
        let bucket = buckets.entry(address).or_insert(Bucket { tokens: rate, refilled: now });
        bucket.tokens = (bucket.tokens + now.duration_since(bucket.refilled).as_secs_f64() * rate).min(rate);
        bucket.refilled = now;
        if bucket.tokens < 1.0 {
            return Err(Refusal::RateFromAddress);
        }
        bucket.tokens -= 1.0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    #[test]
    fn caps_count_open_connections_and_release_on_drop() {
        let limits = ConnectionLimits::new(2, 0, 1);
        let listener = Arc::new(AtomicUsize::new(0));
        let first = limits.admit(A, &listener, 0, 0).expect("first");
        let second = limits.admit(A, &listener, 0, 0).expect("second");
        assert_eq!(limits.admit(A, &listener, 0, 0).err(), Some(Refusal::TotalConnections(2)));
        assert_eq!(limits.open_connections(), 2, "a refusal does not stay counted");
        drop(first);
        let third = limits.admit(A, &listener, 0, 0).expect("room again");
        drop((second, third));
        assert_eq!(limits.open_connections(), 0);
        assert_eq!(listener.load(Ordering::Acquire), 0);
    }

    #[test]
    fn listener_cap_is_separate_from_the_total() {
        let limits = ConnectionLimits::new(0, 0, 1);
        let small = Arc::new(AtomicUsize::new(0));
        let other = Arc::new(AtomicUsize::new(0));
        let _held = limits.admit(A, &small, 1, 0).expect("first on small");
        assert_eq!(limits.admit(A, &small, 1, 0).err(), Some(Refusal::ListenerConnections(1)));
        let _elsewhere = limits.admit(A, &other, 1, 0).expect("other listener unaffected");
    }

    #[test]
    fn connections_go_home_until_home_is_clearly_ahead() {
        let limits = ConnectionLimits::new(0, 0, 2);
        let listener = Arc::new(AtomicUsize::new(0));
        let home = home_worker(A, 2);
        let away = 1 - home;
        let mut held = Vec::new();
        // Accepted by either worker, the first three go home (0, 1 and 2 held there: not more than 2 ahead).
        for accepted_by in [away, home, away] {
            let expected = (accepted_by != home).then_some(home);
            assert_eq!(limits.placement(accepted_by, A), expected, "with {} at home", held.len());
            held.push(limits.admit(A, &listener, 0, home).expect("admitted"));
        }
        // Home is now clearly ahead: a connection accepted away stays there, one accepted at home moves away.
        assert_eq!(limits.placement(away, A), None);
        assert_eq!(limits.placement(home, A), Some(away));
        held.push(limits.admit(A, &listener, 0, away).expect("admitted"));
        assert_eq!(limits.placement(away, A), Some(home), "one away: home is no longer clearly ahead");
        held.truncate(1);
        assert_eq!(limits.placement(home, A), None);
    }

    #[test]
    fn addresses_spread_over_the_workers() {
        let mut per_worker = [0usize; 4];
        for last in 0..=255u8 {
            per_worker[home_worker(IpAddr::from([10, 0, 0, last]), 4)] += 1;
        }
        assert!(per_worker.iter().all(|&count| count > 32), "{per_worker:?}");
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().expect("address");
        assert_eq!(home_worker(mapped, 4), home_worker(IpAddr::from([10, 0, 0, 7]), 4), "one host, one home");
        assert_eq!(home_worker(A, 1), 0);
    }

    #[test]
    fn rate_limit_is_per_address_and_refills() {
        let limits = ConnectionLimits::new(0, 2, 1);
        let start = Instant::now();
        assert!(limits.take_rate_token(A, start).is_ok());
        assert!(limits.take_rate_token(A, start).is_ok());
        assert_eq!(limits.take_rate_token(A, start), Err(Refusal::RateFromAddress));
        assert!(limits.take_rate_token(B, start).is_ok(), "another address has its own bucket");
        assert!(limits.take_rate_token(A, start + Duration::from_millis(500)).is_ok(), "one token back after 0.5 s");
        assert_eq!(limits.take_rate_token(A, start + Duration::from_millis(500)), Err(Refusal::RateFromAddress));
    }
}
