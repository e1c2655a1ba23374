//! The vault's clock, and what it does when the wall clock misbehaves.
//!
//! Expiry and retention compare timestamps with "now", and the wall clock can step: NTP
//! corrections, a VM restored from a snapshot, an operator's typo. The rules:
//!
//! - **Vault time never runs backwards.** [`VaultTime`] is the maximum of the clock and every
//!   time this vault has already seen, starting from the newest time recorded in its audit
//!   trail. A clock stepping back therefore never revives a token that had expired.
//! - **Expiry is enforced at once, destruction waits.** A clock stepping forward makes tokens
//!   look expired (NOT_FOUND) at once, but `purge --expired` removes only tokens expired longer
//!   ago than a grace period ([`EXPIRED_PURGE_GRACE`] unless the operator names another with
//!   `--older-than`), so a correction within the grace period brings them back.
//! - **Purge refuses to run while the clock is behind the newest recorded time** (the clock is
//!   wrong now, or it was when the records were written); see `Vault::purge`.
//!
//! Tests replace the clock with [`Clock::stepped`], the system clock plus a step they set.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::Micros;

/// How long after its expiry an expired token is kept by `purge --expired` unless the operator
/// passes `--older-than`: a forward clock step shorter than this destroys nothing.
pub const EXPIRED_PURGE_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Microseconds since the Unix epoch by the system clock; negative before 1970, saturating.
pub fn system_micros() -> Micros {
    crate::model::now_micros()
}

/// Where a vault reads the time. Cheap to clone; clones share a step.
#[derive(Clone, Default)]
pub struct Clock {
    step: Option<Arc<AtomicI64>>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.step {
            None => f.write_str("Clock::system"),
            Some(s) => write!(f, "Clock::stepped({} us)", s.load(Ordering::Relaxed)),
        }
    }
}

impl Clock {
    /// The system clock.
    pub fn system() -> Clock {
        Clock { step: None }
    }

    /// The system clock plus a step (initially 0) that [`Clock::set_step`] changes, for tests
    /// that step the clock forwards or backwards.
    pub fn stepped() -> Clock {
        Clock {
            step: Some(Arc::new(AtomicI64::new(0))),
        }
    }

    /// Shifts a [`Clock::stepped`] clock by `micros` from the system clock (no-op otherwise).
    pub fn set_step(&self, micros: i64) {
        if let Some(s) = &self.step {
            s.store(micros, Ordering::Relaxed);
        }
    }

    pub fn now(&self) -> Micros {
        let step = self.step.as_ref().map_or(0, |s| s.load(Ordering::Relaxed));
        system_micros().saturating_add(step)
    }
}

/// Monotonic vault time: the clock, never less than any time already seen.
#[derive(Debug)]
pub struct VaultTime {
    clock: Clock,
    floor: AtomicI64,
}

impl VaultTime {
    /// `newest_recorded`: the newest time the vault's records hold, if any.
    pub fn new(clock: Clock, newest_recorded: Option<Micros>) -> VaultTime {
        VaultTime {
            clock,
            floor: AtomicI64::new(newest_recorded.unwrap_or(i64::MIN)),
        }
    }

    /// The clock, or the newest time seen when the clock is behind it.
    pub fn now(&self) -> Micros {
        let now = self.clock.now();
        let prev = self.floor.fetch_max(now, Ordering::Relaxed);
        prev.max(now)
    }

    /// The clock as it is, for checks that must notice it being behind.
    pub fn clock_now(&self) -> Micros {
        self.clock.now()
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vault_time_never_runs_backwards() {
        let clock = Clock::stepped();
        let t = VaultTime::new(clock.clone(), None);
        let a = t.now();
        clock.set_step(-3_600_000_000);
        let b = t.now();
        assert!(b >= a, "{b} < {a}");
        assert!(t.clock_now() < a);
        let future = system_micros() + 86_400_000_000;
        let t = VaultTime::new(Clock::system(), Some(future));
        assert!(t.now() >= future);
    }

    #[test]
    fn system_micros_is_signed() {
        assert!(system_micros() > 1_700_000_000_000_000);
    }
}
