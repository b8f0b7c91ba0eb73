//! Rate limiting with GCRA (the generic cell rate algorithm) in one atomic script.
//!
//! The original did `get`, compare, `set` — three steps that concurrent requests interleave, so
//! it let through as many requests as raced it. Here each decision is one script operation:
//! read the caller's theoretical arrival time, decide, write it back, on Redis's clock. Under
//! load, concurrent decisions of one limiter leave as one script call that makes each in turn
//! (`coalesce.rs`), so redis-server pays a call's fixed cost once for all of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::client::Client;
use crate::coalesce::Coalescer;
use crate::error::{Error, ErrorKind, Result};
use crate::keys;

/// How many requests, per how long, with how much extra burst.
///
/// From idle, `limit + burst` requests pass at once; after that one more every
/// `period / limit`. So `Quota::per_minute(10)` lets 10 through, then one every 6 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Quota {
    /// Requests per period, sustained.
    pub limit: u32,
    /// The period.
    pub period: Duration,
    /// Requests allowed above `limit` in a burst from idle. Default: 0.
    pub burst: u32,
}

impl Quota {
    /// `limit` requests per `period`, no extra burst.
    pub fn new(limit: u32, period: Duration) -> Self {
        Self {
            limit,
            period,
            burst: 0,
        }
    }

    /// `limit` requests per second.
    pub fn per_second(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(1))
    }

    /// `limit` requests per minute.
    pub fn per_minute(limit: u32) -> Self {
        Self::new(limit, Duration::from_secs(60))
    }

    /// The same quota with `burst` extra requests allowed at once.
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// Requests that pass at once from idle: `limit + burst`.
    pub fn capacity(&self) -> u32 {
        self.limit.saturating_add(self.burst)
    }

    fn validate(&self) -> Result<()> {
        if self.limit == 0 {
            return Err(Error::invalid("quota limit must be at least 1"));
        }
        if self.period < Duration::from_millis(1) || self.period > Duration::from_secs(366 * 86_400)
        {
            return Err(Error::invalid(format!(
                "quota period must be between 1 ms and a year, got {:?}",
                self.period
            )));
        }
        if self.capacity() > 1_000_000 {
            return Err(Error::invalid(
                "quota limit + burst must be at most 1000000",
            ));
        }
        // The window a full burst spans: the script's exact arithmetic needs it (added to the
        // clock in µs) under 2^53, and no sane quota comes near.
        let window = self.period.as_micros() * u128::from(self.capacity()) / u128::from(self.limit);
        if window > MAX_WINDOW.as_micros() {
            return Err(Error::invalid(format!(
                "quota period * (limit + burst) / limit must be at most 100 years, got {} days",
                window / 86_400_000_000
            )));
        }
        Ok(())
    }
}

/// The longest a quota's full burst may span (`period * (limit + burst) / limit`): 100 years.
const MAX_WINDOW: Duration = Duration::from_secs(100 * 365 * 86_400);

/// What to answer when Redis cannot be asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailurePolicy {
    /// Let the request through (availability first). Default.
    #[default]
    Open,
    /// Refuse the request (protection first).
    Closed,
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Requests that pass at once from idle (`limit + burst`), for `RateLimit-Limit`.
    pub limit: u32,
    /// Requests that would still pass right now, for `RateLimit-Remaining`.
    pub remaining: u32,
    /// Time until the caller is back to full capacity, for `RateLimit-Reset`.
    pub reset_after: Duration,
    /// When refused: time until the same request would pass, for `Retry-After`.
    pub retry_after: Option<Duration>,
    /// True when the [`FailurePolicy`] decided, Redis being unavailable or failing the check.
    pub degraded: bool,
}

/// Counters since the limiter was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct RateLimitStats {
    /// Requests allowed (degraded ones included).
    pub allowed: u64,
    /// Requests refused (degraded ones included).
    pub rejected: u64,
    /// Decisions made by the failure policy: Redis unavailable, or
    /// [`RateLimiter::policy_decision`] asked for.
    pub degraded: u64,
    /// Script calls that carried several decisions at once: concurrent callers' decisions leave
    /// as one `EVALSHA` when calls of this limiter are already in flight (as sessions' do).
    pub coalesced_calls: u64,
    /// The decisions those calls carried.
    pub coalesced_decisions: u64,
}

/// A named rate limiter; each caller key (an address, a user name) has its own budget.
/// Cloning is cheap (an [`Arc`]).
///
/// # Behavior
///
/// Each decision is one script operation on one key (`{prefix}rl:{name}:{escaped key}`), atomic
/// under any concurrency and across service instances, timed by Redis's clock. Under load,
/// concurrent decisions of one limiter leave as one script call that makes each in turn
/// ([`RateLimitStats::coalesced_calls`]), except on a Redis Cluster. The key expires when the
/// caller is back to full capacity. When Redis is unavailable, the [`FailurePolicy`] answers, the
/// decision says `degraded`, and [`RateLimitStats::degraded`] counts it. When Redis answers an
/// error instead (`NOPERM`, `MISCONF`, a key holding another type) the check is an `Err` of kind
/// `Backend`, so that a misconfiguration shows; [`RateLimiter::policy_decision`] is the answer
/// for a caller that must decide anyway.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client,
    name: String,
    prefix: String,
    quota: Quota,
    /// The quota's period in µs as `gcra.lua` takes it (decimal text), made once.
    period_text: String,
    policy: FailurePolicy,
    allowed: AtomicU64,
    rejected: AtomicU64,
    degraded: AtomicU64,
    /// The `gcra.lua` calls, coalesced under load: concurrent decisions leave as one call.
    decisions: Arc<Coalescer>,
}

impl RateLimiter {
    /// A limiter named `name` (`A-Z a-z 0-9 _ - .`, distinct per purpose, e.g. `login`) with
    /// the default [`FailurePolicy::Open`].
    pub fn new(client: &Client, name: &str, quota: Quota) -> Result<Self> {
        Self::with_policy(client, name, quota, FailurePolicy::default())
    }

    /// A limiter with an explicit failure policy.
    pub fn with_policy(
        client: &Client,
        name: &str,
        quota: Quota,
        policy: FailurePolicy,
    ) -> Result<Self> {
        keys::check_namespace(name).map_err(|why| Error::invalid(format!("rate limiter {why}")))?;
        quota.validate()?;
        Ok(Self {
            inner: Arc::new(Inner {
                prefix: format!("{}rl:{name}:", client.key_prefix()),
                client: client.clone(),
                name: name.to_owned(),
                period_text: quota.period.as_micros().to_string(),
                quota,
                policy,
                allowed: AtomicU64::new(0),
                rejected: AtomicU64::new(0),
                degraded: AtomicU64::new(0),
                decisions: Coalescer::new(client.clone(), &crate::scripts::GCRA, "EVALSHA gcra"),
            }),
        })
    }

    /// The quota.
    pub fn quota(&self) -> Quota {
        self.inner.quota
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Counters since the limiter was built.
    pub fn stats(&self) -> RateLimitStats {
        let coalesced = self.inner.decisions.stats();
        RateLimitStats {
            allowed: self.inner.allowed.load(Ordering::Relaxed),
            rejected: self.inner.rejected.load(Ordering::Relaxed),
            degraded: self.inner.degraded.load(Ordering::Relaxed),
            coalesced_calls: coalesced.batches,
            coalesced_decisions: coalesced.operations,
        }
    }

    fn redis_key(&self, key: &str) -> Result<String> {
        if key.is_empty() || key.len() > keys::MAX_KEY_LEN {
            return Err(Error::invalid(format!(
                "rate-limit key must be 1 to {} bytes, got {}",
                keys::MAX_KEY_LEN,
                key.len()
            )));
        }
        Ok(keys::with_component(&[&self.inner.prefix], key, ""))
    }

    /// Decides one request of `key`.
    pub async fn check(&self, key: &str) -> Result<Decision> {
        self.check_n(key, 1).await
    }

    /// Decides a request costing `cost` units (1 to `limit + burst`). `Err` for invalid input
    /// (an empty or overlong key, a cost out of range) and for an error Redis answered (see
    /// [`RateLimiter`]'s behaviour); unavailability is decided by the policy.
    pub async fn check_n(&self, key: &str, cost: u32) -> Result<Decision> {
        let redis_key = self.redis_key(key)?;
        let quota = self.inner.quota;
        if cost == 0 || cost > quota.capacity() {
            return Err(Error::invalid(format!(
                "cost must be between 1 and {} (limit + burst), got {cost}",
                quota.capacity()
            )));
        }
        let period_us = quota.period.as_micros() as u64;
        let outcome = match self.inner.client.memory() {
            Err(err) => Err(err),
            Ok(Some(memory)) => Ok(memory.update_bytes(&redis_key, |stored| {
                let tat = stored.and_then(parse_tat);
                gcra(tat, now_micros(), period_us, quota, cost)
            })),
            Ok(None) => {
                let mut packed = [0u8; 12];
                packed[..4].copy_from_slice(&quota.limit.to_be_bytes());
                packed[4..8].copy_from_slice(&quota.capacity().to_be_bytes());
                packed[8..].copy_from_slice(&cost.to_be_bytes());
                let reply = self
                    .inner
                    .decisions
                    .run(redis_key, &self.inner.period_text, packed.to_vec())
                    .await;
                reply.and_then(|value| {
                    <GcraOutcome as redis::FromRedisValue>::from_redis_value(value)
                        .map_err(|_| Error::new(ErrorKind::Backend, "unexpected reply from gcra"))
                })
            }
        };
        let decision = match outcome {
            Ok((allowed, remaining, reset_us, retry_us)) => Decision {
                allowed: allowed == 1,
                limit: quota.capacity(),
                remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                reset_after: Duration::from_micros(reset_us),
                retry_after: (allowed != 1).then(|| Duration::from_micros(retry_us)),
                degraded: false,
            },
            Err(err) if err.is_unavailable() => {
                tracing::debug!(limiter = %self.inner.name, error = %err,
                    "rate limiter degraded: redis unavailable");
                return Ok(self.policy_decision());
            }
            Err(err) => return Err(err),
        };
        self.count(&decision);
        Ok(decision)
    }

    /// What the [`FailurePolicy`] answers, marked `degraded` and counted as such: the decision
    /// when Redis is unavailable, and the one to use when a check failed otherwise (Redis
    /// answered an error, such as `NOPERM` or a key holding another type) and the request must
    /// be decided anyway, as the axum `RateLimitLayer` does.
    pub fn policy_decision(&self) -> Decision {
        self.inner.degraded.fetch_add(1, Ordering::Relaxed);
        let quota = self.inner.quota;
        let allowed = self.inner.policy == FailurePolicy::Open;
        let decision = Decision {
            allowed,
            limit: quota.capacity(),
            remaining: 0,
            reset_after: quota.period,
            retry_after: (!allowed).then_some(Duration::from_secs(1)),
            degraded: true,
        };
        self.count(&decision);
        decision
    }

    fn count(&self, decision: &Decision) {
        let counter = if decision.allowed {
            &self.inner.allowed
        } else {
            &self.inner.rejected
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets `key`'s usage, giving it full capacity again.
    pub async fn reset(&self, key: &str) -> Result<()> {
        let redis_key = self.redis_key(key)?;
        self.inner.client.del(&[redis_key]).await.map(|_| ())
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

type GcraOutcome = (u8, u64, u64, u64);

/// A stored TAT, as `gcra.lua` writes it: whole µs, then `:n` for n/limit of a µs when not 0.
fn parse_tat(bytes: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(bytes).ok()?;
    match text.split_once(':') {
        Some((whole, n)) => Some((whole.parse().ok()?, n.parse().ok()?)),
        None => Some((text.parse().ok()?, 0)),
    }
}

/// `gcra.lua` in Rust, for the memory backend: the decision and what to store (the new TAT as
/// `gcra.lua` writes it, and its time to live). Exact, as the script is: times are counted in
/// 1/limit µs, in which one interval is `period_us`.
fn gcra(
    tat: Option<(u64, u64)>,
    now: u64,
    period_us: u64,
    quota: Quota,
    cost: u32,
) -> (GcraOutcome, Option<(Vec<u8>, Duration)>) {
    let unit = u128::from(quota.limit);
    let ceil_us = |scaled: u128| u64::try_from(scaled.div_ceil(unit)).unwrap_or(u64::MAX);
    let now_scaled = u128::from(now) * unit;
    let tat = tat
        .map(|(whole, n)| u128::from(whole) * unit + u128::from(n))
        .unwrap_or(now_scaled)
        .max(now_scaled);
    let interval = u128::from(period_us);
    let new_tat = tat + interval * u128::from(cost);
    let window = interval * u128::from(quota.capacity());
    let ahead = new_tat - now_scaled;
    if ahead > window {
        let outcome = (0, 0, ceil_us(tat - now_scaled), ceil_us(ahead - window));
        return (outcome, None);
    }
    let reset = ceil_us(ahead);
    let remaining = u64::try_from((window - ahead) / interval).unwrap_or(u64::MAX);
    let (whole, n) = (new_tat / unit, new_tat % unit);
    let stored = if n > 0 {
        format!("{whole}:{n}")
    } else {
        format!("{whole}")
    };
    let ttl = Duration::from_millis(reset.div_ceil(1000).max(1));
    ((1, remaining, reset, 0), Some((stored.into_bytes(), ttl)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(quota: Quota, times: &[u64]) -> Vec<GcraOutcome> {
        let mut tat = None;
        let period_us = quota.period.as_micros() as u64;
        times
            .iter()
            .map(|&now| {
                let (outcome, write) = gcra(tat, now, period_us, quota, 1);
                if let Some((bytes, _)) = write {
                    tat = parse_tat(&bytes);
                }
                outcome
            })
            .collect()
    }

    /// `limit` requests pass at once; the next is refused with retry-after of one interval.
    #[test]
    fn limit_then_refuse() {
        let quota = Quota::per_minute(3);
        let out = run(quota, &[0, 0, 0, 0]);
        assert_eq!(out[0], (1, 2, 20_000_000, 0));
        assert_eq!(out[1], (1, 1, 40_000_000, 0));
        assert_eq!(out[2], (1, 0, 60_000_000, 0));
        assert_eq!(out[3], (0, 0, 60_000_000, 20_000_000));
    }

    /// After one interval, one more request passes.
    #[test]
    fn refills_one_interval_at_a_time() {
        let quota = Quota::per_second(2);
        let out = run(quota, &[0, 0, 0, 500_000, 500_000]);
        assert_eq!(
            out.iter().map(|o| o.0).collect::<Vec<_>>(),
            vec![1, 1, 0, 1, 0]
        );
    }

    /// Burst adds capacity from idle but not sustained rate.
    #[test]
    fn burst() {
        let quota = Quota::per_minute(2).with_burst(3);
        let out = run(quota, &[0; 6]);
        assert_eq!(out.iter().filter(|o| o.0 == 1).count(), 5);
        assert_eq!(quota.capacity(), 5);
    }

    /// Bad quotas are refused.
    #[test]
    fn validation() {
        assert!(Quota::per_minute(0).validate().is_err());
        assert!(Quota::new(1, Duration::ZERO).validate().is_err());
        assert!(Quota::per_second(10).validate().is_ok());
        // A burst spanning more than a century (the exact arithmetic's bound).
        let year = Duration::from_secs(366 * 86_400);
        assert!(Quota::new(1, year).with_burst(999_999).validate().is_err());
        assert!(Quota::new(1, year).with_burst(50).validate().is_ok());
        assert!(Quota::new(1_000_000, year).validate().is_ok());
    }

    /// A clock reading of today's size, in µs: doubles there are coarser than a µs.
    const T: u64 = 1_795_000_000_000_000;

    /// Quotas whose interval is not a whole number of µs (and one whose is), down to intervals
    /// of under a µs.
    fn odd_quotas() -> Vec<Quota> {
        vec![
            Quota::per_minute(3),
            Quota::per_second(3),
            Quota::per_second(6),
            Quota::per_minute(7),
            Quota::per_minute(9).with_burst(2),
            Quota::per_second(29),
            Quota::per_second(43),
            Quota::new(43, Duration::from_secs(60)),
            Quota::new(1500, Duration::from_millis(1)),
            // Intervals of 2.4 days in 1/149 µs pass 2^52: the script's other way to count.
            Quota::new(149, Duration::from_secs(366 * 86_400)),
        ]
    }

    /// At one instant exactly `limit + burst` requests pass, `remaining` counts down from
    /// `limit + burst - 1` to 0, and the next is refused; a request costing the whole capacity
    /// passes from idle. (Rounding each stored time up to a µs refused the last of them, and
    /// doubles at today's clock read `remaining` one low.)
    #[test]
    fn exact_at_one_instant() {
        for quota in odd_quotas() {
            let capacity = u64::from(quota.capacity());
            let out = run(quota, &vec![T; capacity as usize + 1]);
            let remaining: Vec<u64> = out.iter().map(|o| o.1).collect();
            let expected: Vec<u64> = (0..capacity).rev().chain([0]).collect();
            assert_eq!(remaining, expected, "{quota:?}");
            assert!(
                out[..capacity as usize].iter().all(|o| o.0 == 1),
                "{quota:?}"
            );
            assert_eq!(out[capacity as usize].0, 0, "{quota:?}");
            let period_us = quota.period.as_micros() as u64;
            let (whole, _) = gcra(None, T, period_us, quota, quota.capacity());
            assert_eq!(whole.0, 1, "{quota:?}: the whole capacity at once");
        }
    }

    /// `gcra.lua` gives the same answers as the memory backend's `gcra`, at one instant (the
    /// decisions of one script call share Redis's clock reading), for every odd quota: the
    /// remaining counts, the resets and the retry-afters in µs.
    #[test]
    fn the_script_agrees_with_the_engine() {
        let server = rediskit_testkit::RedisServer::start();
        let mut conn = server.admin();
        for (i, quota) in odd_quotas().into_iter().enumerate() {
            let calls = quota.capacity() as usize + 2;
            let key = format!("rl:{i}");
            let mut packed = Vec::new();
            for value in [quota.limit, quota.capacity(), 1] {
                packed.extend_from_slice(&value.to_be_bytes());
            }
            let script = crate::scripts::GCRA.redis();
            let mut call = script.prepare_invoke();
            for _ in 0..calls {
                call.key(&key)
                    .arg(quota.period.as_micros().to_string())
                    .arg(&packed[..]);
            }
            let answers: Vec<GcraOutcome> = call.invoke(&mut conn).unwrap();
            assert_eq!(answers, run(quota, &vec![T; calls]), "{quota:?}");
        }
    }
}
