//! The connection handle (the original module's `RedisManager`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::Stream;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::breaker::{Breaker, BreakerState};
use crate::config::{Config, Scheme, redact_url};
use crate::error::{Error, ErrorKind, Result};
use crate::memory::MemoryStore;

/// Which kind of server a [`Client`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BackendKind {
    /// A standalone Redis server (or anything speaking its protocol).
    Redis,
    /// The embedded in-process store of `memory://`: for development and single-process use only;
    /// nothing is shared between processes and nothing survives a restart.
    Memory,
}

impl BackendKind {
    /// The name used in health reports: `"redis"` or `"memory"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Redis => "redis",
            BackendKind::Memory => "memory",
        }
    }
}

/// Connection figures, as reported by [`Client::health`] and [`Client::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PoolStats {
    /// Connections kept open ([`Config::max_connections`]).
    pub max: usize,
    /// Connections with at least one command in flight.
    pub in_use: usize,
    /// Connections with none.
    pub idle: usize,
}

/// Counters since the handle was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct ClientStats {
    /// Connection figures now.
    pub pool: PoolStats,
    /// Commands sent (each script or transaction counts once).
    pub commands: u64,
    /// Commands that failed, timeouts included.
    pub errors: u64,
    /// Commands that passed their deadline.
    pub timeouts: u64,
    /// Commands in flight now.
    pub in_flight: usize,
    /// How long commands took, failures included.
    pub latency: LatencyHistogram,
    /// The circuit breaker now.
    pub breaker: BreakerState,
    /// Times the circuit opened.
    pub breaker_trips: u64,
    /// Calls failed fast by the open circuit (not counted in `commands`).
    pub breaker_rejected: u64,
}

/// The answer of [`Client::health`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Health {
    /// Every connection answered `PING` in time.
    pub ok: bool,
    /// What kind of server this is.
    pub backend: BackendKind,
    /// The slowest `PING` round trip, when all answered.
    pub latency: Option<Duration>,
    /// Connection figures.
    pub pool: PoolStats,
    /// Why it is not ok, for people.
    pub error: Option<String>,
    /// The circuit breaker (health pings bypass it: they report what Redis does now).
    pub breaker: BreakerState,
}

/// A cheap-to-clone handle to Redis (or to the embedded `memory://` store).
///
/// Cloning copies an [`Arc`]: hold one in your application state and clone it into every task.
/// There is no global instance.
///
/// # Behavior
///
/// - **Multiplexed.** The handle keeps [`Config::max_connections`] connections; each carries any
///   number of concurrent commands, pipelined on the wire. A burst of callers queues on them: it
///   never fails with "too many connections".
/// - **Deadlines.** Every command is bounded by [`Config::command_timeout`]; a late answer is an
///   [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) error, never a hang.
/// - **Reconnects by itself.** A connection that fails with an I/O error reconnects in the
///   background (exponential back-off, bounded by the connect timeout); calls made meanwhile
///   fail fast with an [`Unavailable`](crate::ErrorKind::Unavailable) error and later calls succeed
///   without recreating the handle. A background `PING` every
///   [`Config::health_check_interval`] finds dead idle connections before a caller does.
/// - **Closing.** [`Client::close`] stops new calls, waits for those in flight, and drops the
///   connections.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("backend", &self.inner.kind)
            .field("url", &redact_url(&self.inner.config.url))
            .finish_non_exhaustive()
    }
}

struct Inner {
    config: Config,
    kind: BackendKind,
    redis: ArcSwapOption<Pool>,
    memory: Option<MemoryStore>,
    closed: AtomicBool,
    commands: AtomicU64,
    errors: AtomicU64,
    timeouts: AtomicU64,
    in_flight: AtomicUsize,
    latency: Latency,
    breaker: Breaker,
    /// A recovery task is pinging the pool while the circuit is open.
    recovering: AtomicBool,
    health_task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// The near-cache's tracking (see `near`), started by the first near-cache built on this
    /// handle; `Some(None)` where there can be none (the embedded backend).
    near: std::sync::OnceLock<Option<Arc<crate::near::Tracker>>>,
}

/// Upper bounds of the command-latency histogram buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A lock-free latency histogram: one atomic add per bucket hit, so it can sit on every command.
#[derive(Debug, Default)]
struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Latency {
    fn record(&self, elapsed: Duration) {
        let us = elapsed.as_micros() as u64;
        if let Some(bucket) = LATENCY_BUCKETS_US.iter().position(|&le| us <= le) {
            self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn snapshot(&self) -> LatencyHistogram {
        let mut cumulative = 0;
        let mut buckets = [0; LATENCY_BUCKETS_US.len()];
        for (out, bucket) in buckets.iter_mut().zip(&self.buckets) {
            cumulative += bucket.load(Ordering::Relaxed);
            *out = cumulative;
        }
        LatencyHistogram {
            buckets,
            count: self.count.load(Ordering::Relaxed),
            sum: Duration::from_micros(self.sum_us.load(Ordering::Relaxed)),
        }
    }
}

/// Command latencies since the handle was created, Prometheus-style (cumulative buckets).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct LatencyHistogram {
    /// `buckets[i]`: commands that took at most [`LATENCY_BUCKETS_US`]`[i]` µs.
    pub buckets: [u64; LATENCY_BUCKETS_US.len()],
    /// All commands measured.
    pub count: u64,
    /// Their total time.
    pub sum: Duration,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut task) = self.health_task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
    }
}

/// The Redis connections. Each slot counts its in-flight commands for the pool figures.
struct Pool {
    connections: Box<[Slot]>,
    next: AtomicUsize,
}

struct Slot {
    connection: ConnectionManager,
    in_flight: AtomicUsize,
}

/// Decrements the in-flight counters when a command ends, however it ends (cancellation too).
struct InFlight<'a> {
    slot: &'a Slot,
    total: &'a AtomicUsize,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.slot.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.total.fetch_sub(1, Ordering::Release);
    }
}

impl Client {
    /// Connects as `config` says and checks that the server answers.
    ///
    /// Fails with [`Unavailable`](crate::ErrorKind::Unavailable) or
    /// [`Timeout`](crate::ErrorKind::Timeout) when Redis cannot be reached within the connect
    /// timeout, and with [`Config`](crate::ErrorKind::Config) when the configuration is invalid.
    /// Use [`Client::connect_lazy`] to start while Redis is down.
    pub async fn connect(config: Config) -> Result<Self> {
        let client = Self::connect_lazy(config)?;
        if let Some(pool) = client.inner.redis.load_full() {
            let deadline = client.inner.config.connect_timeout;
            let pings = pool.connections.iter().map(|slot| {
                let mut connection = slot.connection.clone();
                async move {
                    tokio::time::timeout(deadline, async {
                        redis::cmd("PING")
                            .query_async::<()>(&mut connection)
                            .await
                            .map_err(Error::from)
                    })
                    .await
                    .map_err(|_| Error::timeout("connecting to Redis", deadline))?
                }
            });
            for result in futures_util::future::join_all(pings).await {
                if let Err(err) = result {
                    let url = redact_url(&client.inner.config.url);
                    return Err(Error::new(
                        err.kind(),
                        format!("cannot reach Redis at {url}: {}", err.message()),
                    )
                    .with_source(err));
                }
            }
        }
        Ok(client)
    }

    /// Builds the handle without waiting for Redis: connections are made on first use and
    /// retried on every call until Redis answers. Fails only on an invalid configuration.
    ///
    /// Must be called within a Tokio runtime.
    pub fn connect_lazy(config: Config) -> Result<Self> {
        config.validate()?;
        let (kind, redis, memory) = match config.scheme() {
            Scheme::Memory => (BackendKind::Memory, None, Some(MemoryStore::new())),
            Scheme::Redis => (
                BackendKind::Redis,
                Some(Arc::new(Pool::new(&config)?)),
                None,
            ),
        };
        let inner = Arc::new(Inner {
            kind,
            redis: ArcSwapOption::new(redis),
            memory,
            closed: AtomicBool::new(false),
            commands: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            latency: Latency::default(),
            breaker: Breaker::new(config.breaker_threshold, config.breaker_cooldown),
            recovering: AtomicBool::new(false),
            health_task: std::sync::Mutex::new(None),
            near: std::sync::OnceLock::new(),
            config,
        });
        if kind == BackendKind::Memory {
            tracing::warn!(
                "rediskit is using the embedded memory:// backend: data lives in this process only, \
                 is not shared with other instances and is lost on restart"
            );
        }
        let interval = inner.config.health_check_interval;
        if kind == BackendKind::Redis && !interval.is_zero() {
            let task = tokio::spawn(health_loop(Arc::downgrade(&inner), interval));
            if let Ok(mut slot) = inner.health_task.lock() {
                *slot = Some(task);
            }
        }
        Ok(Self { inner })
    }

    /// The configuration this handle was built from.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// What kind of server this handle talks to.
    pub fn backend(&self) -> BackendKind {
        self.inner.kind
    }

    /// Sends `PING` on every connection (each bounded by the command timeout) and reports.
    /// Never fails: an unreachable Redis is `ok: false` with the reason.
    pub async fn health(&self) -> Health {
        let (ok, latency, error) = match self.ping_all().await {
            Ok(latency) => (true, Some(latency), None),
            Err(err) => (false, None, Some(err.to_string())),
        };
        Health {
            ok,
            backend: self.inner.kind,
            latency,
            pool: self.pool_stats(),
            error,
            breaker: self.inner.breaker.state(),
        }
    }

    /// Counters and connection figures, without touching Redis.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            pool: self.pool_stats(),
            commands: self.inner.commands.load(Ordering::Relaxed),
            errors: self.inner.errors.load(Ordering::Relaxed),
            timeouts: self.inner.timeouts.load(Ordering::Relaxed),
            in_flight: self.inner.in_flight.load(Ordering::Relaxed),
            latency: self.inner.latency.snapshot(),
            breaker: self.inner.breaker.state(),
            breaker_trips: self.inner.breaker.trips(),
            breaker_rejected: self.inner.breaker.rejected(),
        }
    }

    /// Stops new calls (they fail with [`Closed`](crate::ErrorKind::Closed)), waits up to the
    /// command timeout for calls in flight, then drops the connections. Idempotent.
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(mut task) = self.inner.health_task.lock()
            && let Some(task) = task.take()
        {
            task.abort();
        }
        if let Some(Some(tracker)) = self.inner.near.get() {
            tracker.stop();
        }
        let deadline = Instant::now() + self.inner.config.command_timeout;
        while self.inner.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        self.inner.redis.store(None);
        tracing::debug!("rediskit client closed");
    }

    /// The slot of the near-cache tracker, which `near` fills on first use.
    pub(crate) fn near_tracker(&self) -> &std::sync::OnceLock<Option<Arc<crate::near::Tracker>>> {
        &self.inner.near
    }

    /// True once [`Client::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    fn pool_stats(&self) -> PoolStats {
        match self.inner.redis.load().as_deref() {
            Some(pool) => {
                let in_use = pool
                    .connections
                    .iter()
                    .filter(|slot| slot.in_flight.load(Ordering::Relaxed) > 0)
                    .count();
                PoolStats {
                    max: pool.connections.len(),
                    in_use,
                    idle: pool.connections.len() - in_use,
                }
            }
            None if self.inner.kind == BackendKind::Memory && !self.is_closed() => PoolStats {
                max: 1,
                in_use: 0,
                idle: 1,
            },
            None => PoolStats::default(),
        }
    }

    async fn ping_all(&self) -> Result<Duration> {
        if self.inner.kind == BackendKind::Memory {
            return if self.is_closed() {
                Err(Error::closed())
            } else {
                Ok(Duration::ZERO)
            };
        }
        let Some(pool) = self.inner.redis.load_full() else {
            return Err(Error::closed());
        };
        let pings = (0..pool.connections.len()).map(|index| {
            let pool = pool.clone();
            async move {
                let started = Instant::now();
                self.run_on(&pool, index, "PING", |mut c| async move {
                    redis::cmd("PING").query_async::<()>(&mut c).await
                })
                .await
                .map(|()| started.elapsed())
            }
        });
        let mut slowest = Duration::ZERO;
        for result in futures_util::future::join_all(pings).await {
            slowest = slowest.max(result?);
        }
        Ok(slowest)
    }

    /// Runs one Redis command (or script, or transaction) on the next connection, under the
    /// command deadline, counting it. The memory backend never gets here.
    pub(crate) async fn run<T, F, Fut>(&self, what: &'static str, call: F) -> Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let Some(pool) = self.inner.redis.load_full() else {
            return Err(Error::closed());
        };
        let admission = self.inner.breaker.admit().map_err(|left| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "circuit open: Redis failed repeatedly; failing fast for another {} ms",
                    left.as_millis()
                ),
            )
        })?;
        let index = pool.next.fetch_add(1, Ordering::Relaxed) % pool.connections.len();
        let result = self.run_on(&pool, index, what, call).await;
        // Only a failing connection counts: Redis answering OOM or READONLY is alive, and its
        // reads still work.
        let failed = result.as_ref().is_err_and(Error::is_connection_failure);
        if admission.finish(!failed) {
            self.spawn_recovery();
        }
        result
    }

    /// After the circuit opens: PING every connection until all answer, then close it. A pooled
    /// connection only reconnects when a call fails on it, and an open circuit sends no calls;
    /// without this, recovery would wait for probes to walk the pool one cool-down at a time.
    fn spawn_recovery(&self) {
        if self.inner.recovering.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let pause = (self.inner.config.breaker_cooldown / 4).max(Duration::from_millis(50));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(pause).await;
                let Some(inner) = inner.upgrade() else { return };
                let client = Client { inner };
                if client.is_closed() || client.inner.breaker.state() == BreakerState::Closed {
                    client.inner.recovering.store(false, Ordering::Release);
                    return;
                }
                if client.ping_all().await.is_ok() {
                    client.inner.breaker.close();
                    client.inner.recovering.store(false, Ordering::Release);
                    return;
                }
            }
        });
    }

    async fn run_on<T, F, Fut>(
        &self,
        pool: &Pool,
        index: usize,
        what: &'static str,
        call: F,
    ) -> Result<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.is_closed() {
            return Err(Error::closed());
        }
        let inner = &*self.inner;
        let slot = &pool.connections[index];
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let _guard = InFlight {
            slot,
            total: &inner.in_flight,
        };
        inner.commands.fetch_add(1, Ordering::Relaxed);
        let deadline = inner.config.command_timeout;
        let started = Instant::now();
        let result = tokio::time::timeout(deadline, call(slot.connection.clone())).await;
        inner.latency.record(started.elapsed());
        let outcome = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => Error::from(err),
            Err(_) => Error::timeout(what, deadline),
        };
        inner.errors.fetch_add(1, Ordering::Relaxed);
        if outcome.is_timeout() {
            inner.timeouts.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(command = what, error = %outcome, "redis command failed");
        Err(outcome)
    }

    /// The embedded store, when this is a `memory://` handle.
    pub(crate) fn memory(&self) -> Result<Option<&MemoryStore>> {
        if self.is_closed() {
            return Err(Error::closed());
        }
        Ok(self.inner.memory.as_ref())
    }

    /// Sends every rediskit script to Redis now (`SCRIPT LOAD`), so the first calls after start-up
    /// need no retry. Optional: scripts also load on first use and after `NOSCRIPT`.
    pub async fn load_scripts(&self) -> Result<()> {
        if self.memory()?.is_some() {
            return Ok(());
        }
        for script in crate::scripts::all() {
            self.run("SCRIPT LOAD", |mut c| async move {
                script.prepare_invoke().load_async(&mut c).await.map(|_| ())
            })
            .await?;
        }
        Ok(())
    }

    /// Low level: the bytes at `key` exactly as given (no prefix added), for data rediskit does
    /// not model. Bounded by the command deadline like every call.
    pub async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.get(key).await
    }

    /// Low level: writes `value` at `key` (as given, no prefix added, no expiry) only if the key
    /// does not exist (`SET NX`); true if written. The atomic "first one wins" of registrations.
    pub async fn set_bytes_if_absent(&self, key: &str, value: &[u8]) -> Result<bool> {
        self.set_if_absent(key, value, None).await
    }

    /// `SET key value NX [PX ttl]`: true if written.
    pub(crate) async fn set_if_absent(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool> {
        if let Some(memory) = self.memory()? {
            return Ok(memory.set_if_absent(key, value.to_vec(), ttl));
        }
        self.run("SET NX", |mut c| async move {
            let mut command = redis::cmd("SET");
            command.arg(key).arg(value).arg("NX");
            if let Some(ttl) = ttl {
                command.arg("PX").arg(ttl_millis(ttl));
            }
            command
                .query_async::<Option<String>>(&mut c)
                .await
                .map(|reply| reply.is_some())
        })
        .await
    }

    /// The configured key prefix, for callers building their own keys beside rediskit's.
    pub fn key_prefix(&self) -> &str {
        &self.inner.config.key_prefix
    }

    // ---- the primitive operations the cache (and later layers) are built on ----

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        if let Some(memory) = self.memory()? {
            return Ok(memory.get(key));
        }
        self.run("GET", |mut c| async move {
            redis::cmd("GET").arg(key).query_async(&mut c).await
        })
        .await
    }

    /// `SET key value PX ttl`: value and expiry in one command.
    pub(crate) async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        let ttl_ms = ttl_millis(ttl);
        if let Some(memory) = self.memory()? {
            memory.set(key, value.to_vec(), ttl);
            return Ok(());
        }
        self.run("SET", |mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ttl_ms)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    pub(crate) async fn mget(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(memory) = self.memory()? {
            return Ok(keys.iter().map(|key| memory.get(key)).collect());
        }
        self.run("MGET", |mut c| async move {
            redis::cmd("MGET").arg(keys).query_async(&mut c).await
        })
        .await
    }

    /// Writes every pair with the same TTL, atomically (`MULTI`/`EXEC`).
    pub(crate) async fn mset(&self, items: &[(String, Vec<u8>)], ttl: Duration) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let ttl_ms = ttl_millis(ttl);
        if let Some(memory) = self.memory()? {
            memory.set_many(items, ttl);
            return Ok(());
        }
        self.run("MULTI SET", |mut c| async move {
            let mut pipe = redis::pipe();
            pipe.atomic();
            for (key, value) in items {
                pipe.cmd("SET")
                    .arg(key)
                    .arg(value)
                    .arg("PX")
                    .arg(ttl_ms)
                    .ignore();
            }
            pipe.query_async::<()>(&mut c).await
        })
        .await
    }

    pub(crate) async fn del(&self, keys: &[String]) -> Result<u64> {
        if keys.is_empty() {
            return Ok(0);
        }
        if let Some(memory) = self.memory()? {
            return Ok(memory.del(keys));
        }
        self.run("DEL", |mut c| async move {
            redis::cmd("DEL").arg(keys).query_async(&mut c).await
        })
        .await
    }

    pub(crate) async fn exists(&self, key: &str) -> Result<bool> {
        if let Some(memory) = self.memory()? {
            return Ok(memory.get(key).is_some());
        }
        self.run("EXISTS", |mut c| async move {
            redis::cmd("EXISTS")
                .arg(key)
                .query_async::<u64>(&mut c)
                .await
                .map(|n| n > 0)
        })
        .await
    }

    /// Remaining time to live; `None` for a missing key or one without expiry.
    pub(crate) async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        if let Some(memory) = self.memory()? {
            return Ok(memory.ttl(key));
        }
        let ms: i64 = self
            .run("PTTL", |mut c| async move {
                redis::cmd("PTTL").arg(key).query_async(&mut c).await
            })
            .await?;
        Ok((ms >= 0).then(|| Duration::from_millis(ms as u64)))
    }

    /// Deletes `key` only if it still holds `expected`, so a value some other caller just
    /// wrote is never removed in its place.
    pub(crate) async fn del_if_equals(&self, key: &str, expected: &[u8]) -> Result<bool> {
        if let Some(memory) = self.memory()? {
            return Ok(memory.del_if_equals(key, expected));
        }
        self.run("EVALSHA del_if_equals", |mut c| async move {
            crate::scripts::DEL_IF_EQUALS
                .key(key)
                .arg(expected)
                .invoke_async::<u64>(&mut c)
                .await
                .map(|n| n > 0)
        })
        .await
    }

    /// Streams the keys matching the glob `pattern`, page by page with `SCAN` (never `KEYS`);
    /// each page is one command under the deadline. A key may appear twice if the keyspace is
    /// resized while scanning, as `SCAN` guarantees no better.
    pub(crate) fn scan(
        &self,
        pattern: String,
    ) -> impl Stream<Item = Result<String>> + Send + 'static {
        const PAGE: usize = 500;
        enum State {
            Start,
            Cursor(u64),
            Done,
        }
        let client = self.clone();
        let pages = futures_util::stream::try_unfold(State::Start, move |state| {
            let client = client.clone();
            let pattern = pattern.clone();
            async move {
                let cursor = match state {
                    State::Done => return Ok::<_, Error>(None),
                    State::Start => 0,
                    State::Cursor(cursor) => cursor,
                };
                if let Some(memory) = client.memory()? {
                    return Ok(Some((memory.keys_matching(&pattern), State::Done)));
                }
                let (next, keys): (u64, Vec<String>) = client
                    .run("SCAN", |mut c| async move {
                        redis::cmd("SCAN")
                            .arg(cursor)
                            .arg("MATCH")
                            .arg(&pattern)
                            .arg("COUNT")
                            .arg(PAGE)
                            .query_async(&mut c)
                            .await
                    })
                    .await?;
                let state = if next == 0 {
                    State::Done
                } else {
                    State::Cursor(next)
                };
                Ok(Some((keys, state)))
            }
        });
        use futures_util::TryStreamExt;
        pages
            .map_ok(|keys| futures_util::stream::iter(keys.into_iter().map(Ok::<_, Error>)))
            .try_flatten()
    }
}

fn ttl_millis(ttl: Duration) -> u64 {
    // Redis rejects PX 0; the cache refuses zero TTLs before getting here.
    (ttl.as_millis() as u64).max(1)
}

impl Pool {
    fn new(config: &Config) -> Result<Self> {
        #[cfg(feature = "tls")]
        {
            // rediskit enables rustls with `ring`; install it unless the application chose one.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let info = config.connection_info()?;
        #[cfg(feature = "tls")]
        let client = match config.tls_certificates()? {
            // A private CA and/or a client certificate (mutual TLS), read from their PEM files.
            Some(certificates) => redis::Client::build_with_tls(info, certificates),
            None => redis::Client::open(info),
        };
        #[cfg(not(feature = "tls"))]
        let client = redis::Client::open(info);
        let client = client.map_err(|err| {
            Error::config(format!("url `{}`: {err}", redact_url(&config.url))).with_source(err)
        })?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            // No second timer: `run_on` bounds every call with the command deadline already, and a
            // reply that comes after it is discarded by the multiplexed connection.
            .set_response_timeout(None)
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(config.connect_timeout);
        let connections = (0..config.max_connections)
            .map(|_| {
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                    .map(|connection| Slot {
                        connection,
                        in_flight: AtomicUsize::new(0),
                    })
                    .map_err(Error::from)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            connections: connections.into_boxed_slice(),
            next: AtomicUsize::new(0),
        })
    }
}

/// Pings every connection each `interval` while the handle lives, so a dead connection is
/// found (and reconnected) by this task rather than by a caller, and logs changes of state.
async fn health_loop(inner: std::sync::Weak<Inner>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    let mut was_ok = true;
    loop {
        ticker.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let client = Client { inner };
        if client.is_closed() {
            return;
        }
        let health = client.health().await;
        match (was_ok, health.ok) {
            (true, false) => tracing::warn!(
                error = health.error.as_deref().unwrap_or_default(),
                "redis health check failed"
            ),
            (false, true) => tracing::info!("redis health check passed again"),
            _ => {}
        }
        was_ok = health.ok;
    }
}
