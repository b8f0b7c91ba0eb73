//! A circuit breaker in front of Redis: after a run of failures, calls fail fast for a cool-down
//! instead of each waiting for its own timeout; then one call probes, and its outcome closes the
//! circuit or opens it again.
//!
//! Lock-free (atomics only), because it sits on every command.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls go through.
    #[default]
    Closed,
    /// Calls fail fast until the cool-down ends.
    Open,
    /// One probe call is in flight; others fail fast until it answers.
    HalfOpen,
}

impl BreakerState {
    /// `"closed"`, `"open"` or `"half_open"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

#[derive(Debug)]
pub(crate) struct Breaker {
    /// Consecutive unavailability failures that open the circuit; 0 disables the breaker.
    threshold: u32,
    cooldown: Duration,
    epoch: Instant,
    state: AtomicU8,
    failures: AtomicU32,
    /// Milliseconds since `epoch` at which an open circuit lets a probe through.
    open_until_ms: AtomicU64,
    probing: AtomicBool,
    /// Moves on at every probe admitted and every close: a probe whose number is no longer the
    /// current one (the circuit closed while it ran, and maybe a new probe started) must leave
    /// the state and the probe slot to what came after it.
    probe_epoch: AtomicU64,
    trips: AtomicU64,
    rejected: AtomicU64,
}

/// Permission to run one call; report its outcome with [`Admission::finish`]. Dropped without
/// a report (the caller was cancelled), a probe hands the probe back so the next call can probe.
pub(crate) struct Admission<'a> {
    breaker: &'a Breaker,
    probe: bool,
    /// The breaker's `probe_epoch` when this probe was admitted.
    epoch: u64,
    finished: bool,
}

impl Admission<'_> {
    /// Records whether the call found Redis available; true if this opened the circuit.
    pub(crate) fn finish(mut self, available: bool) -> bool {
        self.finished = true;
        // A probe outlived by a close counts as an ordinary call.
        self.breaker.record(available, self.is_current_probe())
    }

    fn is_current_probe(&self) -> bool {
        self.probe && self.breaker.probe_epoch.load(Ordering::Acquire) == self.epoch
    }
}

impl Drop for Admission<'_> {
    fn drop(&mut self) {
        if !self.finished && self.is_current_probe() {
            // Open again, so that the next call probes at once (the cool-down is over), unless
            // the circuit closed meanwhile (the health check's `PING` was answered): a cancelled
            // call says nothing about Redis. The state first: released first, the flag could let
            // a new probe in whose half-open state this would then overwrite.
            let _ = self.breaker.state.compare_exchange(
                HALF_OPEN,
                OPEN,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            self.breaker.probing.store(false, Ordering::Release);
        }
    }
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold,
            cooldown,
            epoch: Instant::now(),
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            open_until_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            probe_epoch: AtomicU64::new(0),
            trips: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(crate) fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Times the circuit opened.
    pub(crate) fn trips(&self) -> u64 {
        self.trips.load(Ordering::Relaxed)
    }

    /// Calls failed fast while open.
    pub(crate) fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Lets a call through, or refuses it (fail fast) with the time left of the cool-down.
    pub(crate) fn admit(&self) -> Result<Admission<'_>, Duration> {
        if self.threshold == 0 {
            return Ok(self.admission());
        }
        match self.state.load(Ordering::Acquire) {
            CLOSED => Ok(self.admission()),
            _ => {
                let now = self.now_ms();
                let until = self.open_until_ms.load(Ordering::Acquire);
                if now >= until
                    && self
                        .probing
                        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
                {
                    let epoch = self.probe_epoch.fetch_add(1, Ordering::AcqRel) + 1;
                    self.state.store(HALF_OPEN, Ordering::Release);
                    return Ok(Admission {
                        breaker: self,
                        probe: true,
                        epoch,
                        finished: false,
                    });
                }
                self.rejected.fetch_add(1, Ordering::Relaxed);
                Err(Duration::from_millis(until.saturating_sub(now)))
            }
        }
    }

    /// Permission for an ordinary call (not a probe).
    fn admission(&self) -> Admission<'_> {
        Admission {
            breaker: self,
            probe: false,
            epoch: 0,
            finished: false,
        }
    }

    /// Closes the circuit (Redis answered); idempotent.
    pub(crate) fn close(&self) {
        // Any probe under way is outlived: its outcome no longer decides.
        self.probe_epoch.fetch_add(1, Ordering::AcqRel);
        self.failures.store(0, Ordering::Relaxed);
        if self.state.swap(CLOSED, Ordering::AcqRel) != CLOSED {
            tracing::info!("redis circuit breaker closed: Redis answers again");
        }
        self.probing.store(false, Ordering::Release);
    }

    fn record(&self, available: bool, probe: bool) -> bool {
        if self.threshold == 0 {
            return false;
        }
        if available {
            if probe || self.state.load(Ordering::Acquire) != CLOSED {
                self.close();
            } else if self.failures.load(Ordering::Relaxed) != 0 {
                // Only when there is something to reset: a store on every call would take the
                // line from every other core's cache each time.
                self.failures.store(0, Ordering::Relaxed);
            }
            return false;
        }
        if probe {
            self.open();
            self.probing.store(false, Ordering::Release);
            return false;
        }
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures >= self.threshold
            && self
                .state
                .compare_exchange(CLOSED, OPEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.open_until_ms.store(
                self.now_ms() + self.cooldown.as_millis() as u64,
                Ordering::Release,
            );
            self.trips.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                failures,
                cooldown_ms = self.cooldown.as_millis() as u64,
                "redis circuit breaker opened: failing fast"
            );
            return true;
        }
        false
    }

    fn open(&self) {
        self.open_until_ms.store(
            self.now_ms() + self.cooldown.as_millis() as u64,
            Ordering::Release,
        );
        self.state.store(OPEN, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Closed → open after the threshold; fail fast while open; one probe after the cool-down;
    /// a good probe closes, a bad one reopens.
    #[test]
    fn lifecycle() {
        let breaker = Breaker::new(3, Duration::from_millis(30));
        for _ in 0..2 {
            breaker.admit().unwrap().finish(false);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(
            breaker.admit().unwrap().finish(false),
            "the third failure trips it"
        );
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.admit().is_err());
        assert_eq!((breaker.trips(), breaker.rejected()), (1, 1));

        std::thread::sleep(Duration::from_millis(40));
        let probe = breaker.admit().unwrap();
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.admit().is_err(), "one probe at a time");
        assert!(
            !probe.finish(false),
            "a failed probe reopens; it is not a new trip"
        );
        assert_eq!(breaker.state(), BreakerState::Open);

        std::thread::sleep(Duration::from_millis(40));
        breaker.admit().unwrap().finish(true);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(breaker.admit().is_ok());
    }

    /// A success resets the count: only consecutive failures open the circuit.
    #[test]
    fn successes_reset_the_count() {
        let breaker = Breaker::new(2, Duration::from_secs(60));
        breaker.admit().unwrap().finish(false);
        breaker.admit().unwrap().finish(true);
        breaker.admit().unwrap().finish(false);
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    /// A cancelled probe hands the probe back instead of wedging the breaker half-open.
    #[test]
    fn cancelled_probe_is_released() {
        let breaker = Breaker::new(1, Duration::ZERO);
        breaker.admit().unwrap().finish(false);
        drop(breaker.admit().unwrap());
        assert!(breaker.admit().is_ok(), "a new probe is allowed");
    }

    /// A probe cancelled after the circuit closed by other means (the health check's `PING`
    /// answered) leaves it closed: calls go through, none fails fast.
    #[test]
    fn a_cancelled_probe_leaves_a_closed_circuit_closed() {
        let breaker = Breaker::new(1, Duration::ZERO);
        breaker.admit().unwrap().finish(false);
        let probe = breaker.admit().unwrap();
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        breaker.close();
        drop(probe);
        assert_eq!(breaker.state(), BreakerState::Closed);
        let (first, second) = (breaker.admit(), breaker.admit());
        assert!(first.is_ok() && second.is_ok(), "no call fails fast");
        assert_eq!(breaker.rejected(), 0);
    }

    /// A probe that outlived a close, a new opening and a new probe neither reopens over the
    /// new probe nor frees its slot: one probe at a time still.
    #[test]
    fn an_outlived_probe_leaves_the_next_one_alone() {
        let breaker = Breaker::new(1, Duration::ZERO);
        breaker.admit().unwrap().finish(false);
        let old = breaker.admit().unwrap();
        breaker.close();
        breaker.admit().unwrap().finish(false);
        let new = breaker.admit().unwrap();
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        drop(old);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.admit().is_err(), "one probe at a time");
        assert!(!new.finish(true));
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    /// Threshold 0 disables the breaker.
    #[test]
    fn disabled() {
        let breaker = Breaker::new(0, Duration::from_secs(60));
        for _ in 0..10 {
            breaker.admit().unwrap().finish(false);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }
}
