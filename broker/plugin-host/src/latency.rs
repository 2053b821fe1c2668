//! How long plugin calls take, as a lock-free histogram per hook, so an operator can read a plugin's p50/p99 from
//! `$SYS` instead of guessing it from throughput.
//!
//! Buckets are log-linear over nanoseconds: eight per power of two, so a reported quantile is the upper bound of
//! its bucket and at most 12.5% above the true value. Recording is a relaxed atomic add (and a max, written only
//! when it grows) in the calling thread's own stripe: calls of similar length from two workers otherwise hit
//! the same bucket, and every call made the two cores trade that cache line. Reading sums the stripes' 512
//! counters, which happens once per `$SYS` interval.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Sub-buckets per power of two, as a bit count (8 sub-buckets: 12.5% resolution).
const SUB_BITS: u32 = 3;
const SUBS: usize = 1 << SUB_BITS;
const BUCKETS: usize = 64 * SUBS;

pub struct LatencyHistogram {
    /// `STRIPES` runs of `BUCKETS` counters, one run per thread stripe.
    counts: Box<[AtomicU64]>,
    max_ns: AtomicU64,
}

/// Stripes per histogram and counter: enough that the few worker threads rarely share one.
const STRIPES: usize = 4;

thread_local! {
    /// This thread's stripe in every [`LatencyHistogram`] and [`StripedCounter`].
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}
static NEXT_STRIPE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn stripe() -> usize {
    STRIPE.with(|stripe| *stripe)
}

/// A counter added to from every worker: each thread adds to its own cache line, readers sum them.
#[derive(Debug, Default)]
pub struct StripedCounter {
    stripes: [Padded; STRIPES],
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Padded(AtomicU64);

impl StripedCounter {
    pub fn add(&self, delta: u64) {
        self.stripes[stripe()].0.fetch_add(delta, Ordering::Relaxed);
    }

    pub fn load(&self) -> u64 {
        self.stripes.iter().map(|stripe| stripe.0.load(Ordering::Relaxed)).sum()
    }
}

/// A reading of one histogram. Quantiles are `None` until something was recorded.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
    pub max: Option<Duration>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: (0..STRIPES * BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            max_ns: AtomicU64::new(0),
        }
    }
}

impl std::fmt::Debug for LatencyHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LatencyHistogram").field(&self.summary()).finish()
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUBS as u64 {
        return ns as usize;
    }
    let exponent = 63 - ns.leading_zeros();
    let sub = (ns >> (exponent - SUB_BITS)) as usize & (SUBS - 1);
    (exponent - SUB_BITS + 1) as usize * SUBS + sub
}

/// The largest value that falls into `bucket`.
fn upper_bound(bucket: usize) -> u64 {
    if bucket < SUBS {
        return bucket as u64;
    }
    let exponent = (bucket / SUBS) as u32 + SUB_BITS - 1;
    let sub = (bucket % SUBS) as u64;
    let width = 1u64 << (exponent - SUB_BITS);
    ((SUBS as u64 + sub) << (exponent - SUB_BITS)).saturating_add(width - 1)
}

impl LatencyHistogram {
    pub fn record(&self, elapsed: Duration) {
        self.record_many(elapsed, 1);
    }

    /// `count` calls that each took `elapsed` (the messages of one batch).
    pub fn record_many(&self, elapsed: Duration, count: u64) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.counts[stripe() * BUCKETS + bucket_of(ns)].fetch_add(count, Ordering::Relaxed);
        // `fetch_max` writes the line even when the maximum stands; the load keeps it shared.
        if ns > self.max_ns.load(Ordering::Relaxed) {
            self.max_ns.fetch_max(ns, Ordering::Relaxed);
        }
    }

    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = (0..BUCKETS)
            .map(|bucket| {
                (0..STRIPES).map(|stripe| self.counts[stripe * BUCKETS + bucket].load(Ordering::Relaxed)).sum()
            })
            .collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return LatencySummary::default();
        }
        let max_ns = self.max_ns.load(Ordering::Relaxed);
        let quantile = |q: f64| {
            // The smallest value with at least q of the samples at or below it (nearest rank).
            let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (bucket, n) in counts.iter().enumerate() {
                seen += n;
                if seen >= rank {
                    return Some(Duration::from_nanos(upper_bound(bucket).min(max_ns)));
                }
            }
            Some(Duration::from_nanos(max_ns))
        };
        LatencySummary { count, p50: quantile(0.50), p99: quantile(0.99), max: Some(Duration::from_nanos(max_ns)) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bucket_that_contains_it() {
        let mut values: Vec<u64> = (0..5000).collect();
        values.extend((0..64).flat_map(|shift| [1u64 << shift, (1u64 << shift).wrapping_sub(1), (3u64 << shift) / 2]));
        values.push(u64::MAX);
        for value in values {
            let bucket = bucket_of(value);
            assert!(bucket < BUCKETS, "{value} -> {bucket}");
            assert!(upper_bound(bucket) >= value, "{value} above its bucket {bucket}");
            if bucket > 0 {
                assert!(upper_bound(bucket - 1) < value, "{value} also fits bucket {}", bucket - 1);
            }
        }
    }

    #[test]
    fn quantiles_are_within_an_eighth_of_the_truth() {
        let histogram = LatencyHistogram::default();
        // 1..=1000 µs, one sample each: p50 = 500 µs, p99 = 990 µs.
        for us in 1..=1000u64 {
            histogram.record(Duration::from_micros(us));
        }
        let summary = histogram.summary();
        assert_eq!(summary.count, 1000);
        let p50 = summary.p50.expect("p50").as_nanos() as f64;
        let p99 = summary.p99.expect("p99").as_nanos() as f64;
        assert!((500_000.0..=500_000.0 * 1.125).contains(&p50), "p50 {p50}");
        assert!((990_000.0..=990_000.0 * 1.125).contains(&p99), "p99 {p99}");
        assert_eq!(summary.max, Some(Duration::from_micros(1000)));
    }

    #[test]
    fn a_slow_tail_shows_in_p99_and_not_in_p50() {
        let histogram = LatencyHistogram::default();
        for _ in 0..980 {
            histogram.record(Duration::from_micros(2));
        }
        for _ in 0..20 {
            histogram.record(Duration::from_millis(40));
        }
        let summary = histogram.summary();
        assert!(summary.p50.expect("p50") < Duration::from_micros(3));
        assert!(summary.p99.expect("p99") >= Duration::from_millis(40));
        assert_eq!(LatencyHistogram::default().summary(), LatencySummary::default());
    }
}
