//! The process's coarse clock for plugin CPU budgets: one thread advances a tick counter (and the WebAssembly
//! engine's epoch) every [`TICK`]. A running guest checks its budget often (the Lua interrupt fires at every call
//! and loop edge), and reading a shared counter costs a load where reading the clock cost a `clock_gettime` and a
//! lock; budgets were counted in whole slices of [`TICK`] already.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How often the tick advances. A running guest yields to the worker's other tasks at every tick, and CPU budgets
/// are counted in ticks.
pub const TICK: Duration = Duration::from_millis(1);

static TICKS: AtomicU64 = AtomicU64::new(0);
static STARTED: OnceLock<Result<(), String>> = OnceLock::new();

/// Starts the ticker thread once per process.
pub fn start() -> Result<(), String> {
    STARTED
        .get_or_init(|| {
            std::thread::Builder::new()
                .name("tollgate-plugin-tick".into())
                .spawn(|| {
                    loop {
                        std::thread::sleep(TICK);
                        TICKS.fetch_add(1, Ordering::Relaxed);
                        crate::wasm::advance_epoch();
                    }
                })
                .map(drop)
                .map_err(|error| format!("the plugin ticker thread did not start: {error}"))
        })
        .clone()
}

/// Ticks since the ticker started (it must have been [`start`]ed to advance).
pub fn now() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// A CPU budget in whole ticks, at least one.
pub fn budget_ticks(cpu_time: Duration) -> u64 {
    let tick = TICK.as_micros().max(1);
    u64::try_from(cpu_time.as_micros().div_ceil(tick)).unwrap_or(u64::MAX).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_round_up_to_whole_ticks() {
        assert_eq!(budget_ticks(Duration::ZERO), 1);
        assert_eq!(budget_ticks(Duration::from_micros(1500)), 2);
        assert_eq!(budget_ticks(Duration::from_millis(50)), 50);
    }

    #[test]
    fn ticks_advance_once_started() {
        start().expect("ticker");
        let before = now();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while now() == before && std::time::Instant::now() < deadline {
            std::thread::sleep(TICK);
        }
        assert!(now() > before, "no tick within 5 s");
    }
}
