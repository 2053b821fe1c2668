//! `host.clock-synchronized`: whether the wall clock can be trusted, for plugins that judge freshness by time.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

const UNKNOWN: u8 = 0;
const SYNCHRONIZED: u8 = 1;
const UNSYNCHRONIZED: u8 = 2;

/// The answer is asked for per message and changes rarely, so it is read from the kernel at most once a second.
static LAST_STATE: AtomicU8 = AtomicU8::new(UNKNOWN);
static LAST_READ_SECOND: AtomicU64 = AtomicU64::new(u64::MAX);

/// `Some(true)` while the kernel's NTP discipline says the clock is synchronized, `Some(false)` when it says not
/// (`adjtimex` returns `TIME_ERROR`: no time daemon has set it since boot, or it lost its source), `None` where
/// the broker cannot tell.
pub fn synchronized() -> Option<bool> {
    let now = crate::now_ms() / 1000;
    if LAST_READ_SECOND.load(Ordering::Relaxed) != now {
        LAST_STATE.store(read_kernel_state(), Ordering::Relaxed);
        LAST_READ_SECOND.store(now, Ordering::Relaxed);
    }
    match LAST_STATE.load(Ordering::Relaxed) {
        SYNCHRONIZED => Some(true),
        UNSYNCHRONIZED => Some(false),
        _ => None,
    }
}

#[cfg(target_os = "linux")]
fn read_kernel_state() -> u8 {
    // SAFETY: `timex` is a plain C struct of integers, for which all-zero bytes are a valid value. With `modes`
    // zero, adjtimex(2) only reads the kernel's clock state into the struct, which lives on this stack frame for
    // the whole call; it changes nothing and needs no privilege.
    #[allow(unsafe_code)]
    let state = unsafe {
        let mut timex: libc::timex = std::mem::zeroed();
        libc::adjtimex(&mut timex)
    };
    match state {
        libc::TIME_ERROR => UNSYNCHRONIZED,
        state if state >= 0 => SYNCHRONIZED,
        _ => UNKNOWN,
    }
}

#[cfg(not(target_os = "linux"))]
fn read_kernel_state() -> u8 {
    UNKNOWN
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_kernel_answers_on_linux() {
        let state = super::synchronized();
        if cfg!(target_os = "linux") {
            assert!(state.is_some(), "adjtimex answered nothing");
        } else {
            assert_eq!(state, None);
        }
    }
}
