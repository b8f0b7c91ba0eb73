//! The connection handle (the original module's `RedisManager`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::Stream;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

use crate::batch::Batcher;
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
    /// A Redis Cluster ([`Config::cluster_nodes`]): commands go to the node owning their key's
    /// slot, and the handle follows resharding and failovers.
    Cluster,
    /// A primary found through Redis Sentinel ([`Config::sentinel_nodes`]): after a failover the
    /// handle follows the sentinels to the promoted replica.
    Sentinel,
}

impl BackendKind {
    /// The name used in health reports: `"redis"`, `"cluster"`, `"sentinel"` or `"memory"`.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Redis => "redis",
            BackendKind::Memory => "memory",
            BackendKind::Cluster => "cluster",
            BackendKind::Sentinel => "sentinel",
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
    /// Commands that failed, timeouts included; and session operations that failed waiting for
    /// a coalesced script call (see `timeouts`).
    pub errors: u64,
    /// Commands that passed their deadline; and session operations (and rate-limit decisions)
    /// that passed theirs waiting for a coalesced script call, queued or carried by one that had
    /// not answered by then (each caller once; such a call is then given up, not counted again).
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
    /// Batches of concurrent callers' commands sent as one write by auto-pipelining (only
    /// while several calls are in flight on a connection; not on a Cluster).
    pub pipelined_batches: u64,
    /// Commands sent in those batches: divided by `pipelined_batches`, the average batch.
    pub pipelined_commands: u64,
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
/// - **Multiplexed, auto-pipelined.** The handle keeps [`Config::max_connections`] connections;
///   each carries any number of concurrent commands, pipelined on the wire. Callers take turns
///   on one connection per runtime worker thread (the others take bursts deeper than 128
///   commands), and once a few calls are in flight on a connection, the commands of concurrent
///   callers queue and leave together, as one write (see `batch.rs`). A burst of callers queues
///   on them: it never fails with "too many connections". On a cluster each pooled connection
///   holds one multiplexed connection per node (not queued: a batch may not span nodes).
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

/// A [`Client`] that does not keep it alive.
#[derive(Clone)]
pub(crate) struct WeakClient(std::sync::Weak<Inner>);

impl WeakClient {
    pub(crate) fn upgrade(&self) -> Option<Client> {
        self.0.upgrade().map(|inner| Client { inner })
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("backend", &self.inner.kind)
            .field("url", &redact_url(&self.inner.config.url))
            .finish_non_exhaustive()
    }
}

/// Clears a client's "task running" flag when the task is done with: see
/// [`Client::spawn_once`].
struct Running {
    inner: std::sync::Weak<Inner>,
    running: fn(&Inner) -> &AtomicBool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.upgrade() {
            (self.running)(&inner).store(false, Ordering::Release);
        }
    }
}

struct Inner {
    config: Config,
    kind: BackendKind,
    /// The connections; `None` once closed, and for Sentinel until the primary is first found.
    redis: ArcSwapOption<Pool>,
    /// A task is looking the primary up through the sentinels for the first time.
    looking_up: AtomicBool,
    /// A task is following the sentinels to a new primary.
    following: AtomicBool,
    /// First lookups finished, so that the callers waiting for one can tell.
    lookups: tokio::sync::watch::Sender<u64>,
    /// Why the last first lookup failed, for the callers that waited for it.
    last_lookup_error: std::sync::Mutex<String>,
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
    /// What auto-pipelining sent, across pools (Sentinel replaces the pool).
    batching: Arc<crate::batch::Counters>,
    /// The background health `PING` is running (see [`Client::ensure_health_loop`]).
    checking: AtomicBool,
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

/// One pooled connection: a managed connection to one server, or a cluster connection that
/// sends each command to the node owning its key's slot. All multiplex.
#[derive(Clone)]
pub(crate) enum Conn {
    /// A managed connection whose concurrent callers' commands leave together (`batch`), and the
    /// deadline of the call using it, which the queue keeps for each command (no deadline: the
    /// command timeout from when each command is sent).
    Single(Arc<Batcher>, Option<tokio::time::Instant>),
    /// A managed connection without the queue: commands leave in the order they are sent. For
    /// [`Client::in_order`] scopes, and when [`Config::auto_pipeline`] is off.
    Direct(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Sends `cmd` and converts its reply, as `Cmd::query_async` does, but moving the command
    /// into the batch instead of copying it.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        &mut self,
        cmd: redis::Cmd,
    ) -> redis::RedisResult<T> {
        let reply = match self {
            Conn::Single(batcher, until) => batcher.send(cmd, batcher.until(*until)).await?,
            other => other.req_packed_command(&cmd).await?,
        };
        Ok(redis::from_redis_value(reply.extract_error()?)?)
    }

    /// This connection for a call that must not be reordered with the caller's other calls.
    fn ordered(&self) -> Conn {
        match self {
            Conn::Single(batcher, _) => Conn::Direct(batcher.connection().clone()),
            other => other.clone(),
        }
    }

    /// This connection for a call that ends at `until`: the queue's commands carry it, and such a
    /// call needs no timer of its own (`bounds_itself`).
    fn with_deadline(&self, until: tokio::time::Instant) -> Conn {
        match self {
            Conn::Single(batcher, _) => Conn::Single(batcher.clone(), Some(until)),
            other => other.clone(),
        }
    }

    /// True when every command sent through this connection ends at the call's deadline.
    fn bounds_itself(&self) -> bool {
        matches!(self, Conn::Single(_, Some(_)))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(batcher, until) => {
                Box::pin(batcher.send(cmd.clone(), batcher.until(*until)))
            }
            Conn::Direct(connection) => connection.req_packed_command(cmd),
            Conn::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            // A transaction's replies are aggregated by the connection itself: it goes as is.
            Conn::Single(batcher, until) if pipeline.is_transaction() => {
                let mut connection = batcher.connection().clone();
                let until = batcher.until(*until);
                Box::pin(async move {
                    let request = connection.req_packed_commands(pipeline, offset, count);
                    crate::batch::within(until, request).await
                })
            }
            Conn::Single(batcher, until) => Box::pin(batcher.send_many(
                pipeline.cmd_iter().cloned().collect(),
                offset,
                count,
                batcher.until(*until),
            )),
            Conn::Direct(connection) => connection.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(batcher, _) => batcher.connection().get_db(),
            Conn::Direct(connection) => connection.get_db(),
            Conn::Cluster(connection) => connection.get_db(),
        }
    }
}

/// The Redis connections. Each slot counts its in-flight commands for the pool figures.
struct Pool {
    /// Tells pools apart (a new pool after a Sentinel failover gets a new id; ids are not reused).
    id: u64,
    connections: Box<[Slot]>,
    /// Connections of their own for commands that block their connection until they answer
    /// (`WAIT`): Redis runs nothing else of a blocked client's until then, so on a shared
    /// connection every other caller's commands would wait too ([`Client::run_blocking`]). One
    /// would make concurrent `WAIT`s wait for each other, each past its deadline: a call takes
    /// the least busy of [`BLOCKING_CONNECTIONS`]. Each connects on first use.
    blocking: Box<[Slot]>,
    /// How many of `connections` share the traffic first ([`spread_for`]).
    spread: usize,
    /// The server this pool talks to, for Sentinel (to notice that the primary moved).
    address: Option<(String, u16)>,
}

/// Connections per pool for blocking commands ([`Client::run_blocking`]): as many `WAIT`s run at
/// once without one waiting for another.
const BLOCKING_CONNECTIONS: usize = 4;

struct Slot {
    connection: Conn,
    /// Calls in flight on this connection (shared with its auto-pipelining queue, which
    /// batches only when several are).
    in_flight: Arc<AtomicUsize>,
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
        if client.inner.kind != BackendKind::Memory {
            let deadline = client.inner.config.connect_timeout;
            // The whole first lookup, however long its questions take: at most one to each
            // sentinel and one to the primary it names, each within the connect timeout.
            let lookup = deadline
                .saturating_mul(2 * client.inner.config.sentinel_nodes.len() as u32 + 1)
                .saturating_add(deadline);
            let pool = client.pool_within(lookup).await.map_err(|err| {
                let url = redact_url(&client.inner.config.url);
                Error::new(
                    err.kind(),
                    format!("cannot reach Redis at {url}: {}", err.message()),
                )
                .with_source(err)
            })?;
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
        let batching = Arc::default();
        let (kind, redis, memory) = match config.scheme() {
            Scheme::Memory => (BackendKind::Memory, None, Some(MemoryStore::new())),
            Scheme::Redis => (
                BackendKind::Redis,
                Some(Arc::new(Pool::standalone(
                    &config,
                    config.connection_info()?,
                    None,
                    &batching,
                )?)),
                None,
            ),
            Scheme::Cluster => (
                BackendKind::Cluster,
                Some(Arc::new(Pool::cluster(&config)?)),
                None,
            ),
            // The primary's address comes from the sentinels, on first use.
            Scheme::Sentinel => (BackendKind::Sentinel, None, None),
        };
        let inner = Arc::new(Inner {
            kind,
            redis: ArcSwapOption::new(redis),
            looking_up: AtomicBool::new(false),
            following: AtomicBool::new(false),
            lookups: tokio::sync::watch::Sender::new(0),
            last_lookup_error: std::sync::Mutex::new(String::new()),
            memory,
            closed: AtomicBool::new(false),
            commands: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            timeouts: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            latency: Latency::default(),
            breaker: Breaker::new(config.breaker_threshold, config.breaker_cooldown),
            recovering: AtomicBool::new(false),
            batching,
            checking: AtomicBool::new(false),
            near: std::sync::OnceLock::new(),
            config,
        });
        if kind == BackendKind::Memory {
            tracing::warn!(
                "rediskit is using the embedded memory:// backend: data lives in this process only, \
                 is not shared with other instances and is lost on restart"
            );
        }
        let client = Self { inner };
        client.ensure_health_loop();
        Ok(client)
    }

    /// Starts the background health `PING` unless it runs, or is off (the embedded backend, a
    /// zero interval, a closed handle). Checked on every call: a client kept beyond the runtime
    /// its loop ran on (the loop dies with it) gets one again on the runtime it is used on.
    fn ensure_health_loop(&self) {
        let inner = &*self.inner;
        if inner.checking.load(Ordering::Relaxed) {
            return;
        }
        let interval = inner.config.health_check_interval;
        if inner.kind == BackendKind::Memory || interval.is_zero() || self.is_closed() {
            return;
        }
        self.spawn_once(
            |inner| &inner.checking,
            move |weak| health_loop(weak, interval),
        );
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
            pipelined_batches: self.inner.batching.batches.load(Ordering::Relaxed),
            pipelined_commands: self.inner.batching.commands.load(Ordering::Relaxed),
        }
    }

    /// Stops new calls (they fail with [`Closed`](crate::ErrorKind::Closed)), waits up to the
    /// command timeout for calls in flight, then drops the connections. Idempotent.
    pub async fn close(&self) {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // The health loop sees `closed` at its next tick and ends without a `PING`.
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

    /// Runs `calls` with every Redis call of theirs on one connection, so that commands sent one
    /// after the other (as `tokio::join!` first polls them) reach Redis in that order and back to
    /// back, as one pipelined batch. The pool otherwise deals consecutive calls to different
    /// connections, whose commands Redis may run in either order, interleaved with others'.
    pub(crate) async fn in_order<F: Future>(&self, calls: F) -> F::Output {
        let index = self.inner.redis.load().as_ref().map(|pool| pool.pick());
        match index {
            Some(index) => PINNED.scope(index, calls).await,
            None => calls.await,
        }
    }

    /// A handle that does not keep the client alive (for its own background tasks).
    pub(crate) fn downgrade(&self) -> WeakClient {
        WeakClient(Arc::downgrade(&self.inner))
    }

    /// For Sentinel: the id and address of the pool's primary now, waiting (at most the command
    /// deadline) for the sentinels to be asked if no primary is known yet.
    pub(crate) async fn current_primary(&self) -> Result<(u64, (String, u16))> {
        let pool = self.pool().await?;
        let address = pool.address.clone().ok_or_else(|| {
            Error::new(ErrorKind::Unavailable, "this pool has no primary address")
        })?;
        Ok((pool.id, address))
    }

    /// Whether the pool is still the one with `id` (no failover moved it since).
    pub(crate) fn pool_is(&self, id: u64) -> bool {
        self.inner
            .redis
            .load()
            .as_ref()
            .is_some_and(|pool| pool.id == id)
    }

    /// Takes the near-cache down before the pool moves to another server: from then on no entry
    /// read through the old pool is served or kept, until tracking is up on the new one.
    fn near_retarget(&self) {
        if let Some(Some(tracker)) = self.inner.near.get() {
            tracker.retarget();
        }
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
        let pool = self.pool().await?;
        let pings = (0..pool.connections.len()).map(|index| {
            let pool = pool.clone();
            async move {
                // An idle connection cut since its last use fails once, and reconnects on that
                // failure: one more try tells a dead server from a stale connection.
                match self.ping_one(&pool, index).await {
                    Err(err) if err.is_connection_failure() && !err.is_timeout() => {
                        self.ping_one(&pool, index).await
                    }
                    other => other,
                }
            }
        });
        let mut slowest = Duration::ZERO;
        for result in futures_util::future::join_all(pings).await {
            slowest = slowest.max(result?);
        }
        Ok(slowest)
    }

    /// `PING` on one pooled connection (on a cluster: on every primary through it).
    async fn ping_one(&self, pool: &Pool, index: usize) -> Result<Duration> {
        let started = Instant::now();
        self.run_on(&pool.connections[index], false, "PING", |c| async move {
            match c {
                // Every primary must answer; a replica that is down is not an outage.
                Conn::Cluster(mut c) => {
                    use redis::cluster_routing::{
                        MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo,
                    };
                    let routing = RoutingInfo::MultiNode((
                        MultipleNodeRoutingInfo::AllMasters,
                        Some(ResponsePolicy::AllSucceeded),
                    ));
                    c.route_command(redis::cmd("PING"), routing)
                        .await
                        .map(|_| ())
                }
                mut c => redis::cmd("PING").query_async::<()>(&mut c).await,
            }
        })
        .await
        .map(|()| started.elapsed())
    }

    /// Runs one Redis command (or script, or transaction) on the next connection, under the
    /// command deadline, counting it. The memory backend never gets here.
    pub(crate) async fn run<T, F, Fut>(&self, what: &'static str, call: F) -> Result<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_in(false, what, call).await
    }

    /// As [`run`](Self::run), for a call that blocks its connection until Redis answers it
    /// (`WAIT`), on a connection of its own: on a shared one, Redis would hold every other
    /// caller's commands behind it (with a replica down, for the `WAIT`'s whole timeout).
    /// Such calls wait for each other instead.
    pub(crate) async fn run_blocking<T, F, Fut>(&self, what: &'static str, call: F) -> Result<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        self.run_in(true, what, call).await
    }

    async fn run_in<T, F, Fut>(&self, blocking: bool, what: &'static str, call: F) -> Result<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let pool = self.pool().await?;
        let admission = self.inner.breaker.admit().map_err(|left| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "circuit open: Redis failed repeatedly; failing fast for another {} ms",
                    left.as_millis()
                ),
            )
        })?;
        // Inside `in_order`, the scope's connection (if this pool has it: Sentinel may have
        // moved to a new pool meanwhile, of the same size).
        let pinned = PINNED
            .try_with(|index| *index)
            .ok()
            .filter(|&index| index < pool.connections.len());
        let result = match pinned {
            _ if blocking => {
                let slot = pool
                    .blocking
                    .iter()
                    .min_by_key(|slot| slot.in_flight.load(Ordering::Relaxed))
                    .unwrap_or(&pool.connections[0]);
                self.run_on(slot, true, what, call).await
            }
            // Sent as the scope sends them, not queued into batches that may leave in either
            // order.
            Some(index) => {
                self.run_on(&pool.connections[index], true, what, call)
                    .await
            }
            None => {
                self.run_on(&pool.connections[pool.pick()], false, what, call)
                    .await
            }
        };
        // Only a failing connection counts: Redis answering OOM or READONLY is alive, and its
        // reads still work. Nor does a blocking call that timed out: a `WAIT` outlasting its
        // deadline (replicas slow, or more `WAIT`s than blocking connections) says nothing
        // of whether Redis answers, and every other call would tell if it did not.
        let failed = result.as_ref().is_err_and(Error::is_connection_failure);
        if blocking && result.as_ref().is_err_and(Error::is_timeout) {
            drop(admission);
        } else if admission.finish(!failed) {
            self.spawn_recovery();
        }
        if self.inner.kind == BackendKind::Sentinel
            && let Err(err) = &result
            && (failed || err.is_read_only())
        {
            self.follow_primary();
        }
        result
    }

    /// The connections; for Sentinel, waiting for the primary's first lookup at most the
    /// command deadline.
    async fn pool(&self) -> Result<Arc<Pool>> {
        self.pool_within(self.inner.config.command_timeout).await
    }

    /// The connections. For Sentinel, until the primary is first found, a lookup through the
    /// sentinels runs in a task of its own (one at a time): a caller waits for it at most
    /// `wait`, and gives up then without stopping it, so the next caller may find the pool
    /// made. A caller whose lookup failed gets its error; the next caller starts another.
    async fn pool_within(&self, wait: Duration) -> Result<Arc<Pool>> {
        if self.is_closed() {
            return Err(Error::closed());
        }
        if let Some(pool) = self.inner.redis.load_full() {
            return Ok(pool);
        }
        if self.inner.kind != BackendKind::Sentinel {
            return Err(Error::closed());
        }
        // Subscribed before looking again, so that a lookup ending from here on is seen.
        let mut finished = self.inner.lookups.subscribe();
        if let Some(pool) = self.inner.redis.load_full() {
            return Ok(pool);
        }
        self.look_up_primary();
        match tokio::time::timeout(wait, finished.changed()).await {
            Err(_) => Err(Error::timeout(
                "looking up the primary through the sentinels",
                wait,
            )),
            // The sender lives in `inner`, which `self` holds: `changed` cannot fail.
            Ok(_) => match self.inner.redis.load_full() {
                Some(pool) => Ok(pool),
                None if self.is_closed() => Err(Error::closed()),
                None => {
                    let why = match self.inner.last_lookup_error.lock() {
                        Ok(why) => why.clone(),
                        Err(_) => String::new(),
                    };
                    Err(Error::new(ErrorKind::Unavailable, why))
                }
            },
        }
    }

    /// Starts the first lookup of the primary through the sentinels, unless one is running:
    /// it makes the pool, or records why it could not, and then tells the waiting callers.
    fn look_up_primary(&self) {
        self.spawn_once(
            |inner| &inner.looking_up,
            |weak| async move {
                let Some(inner) = weak.upgrade() else { return };
                let client = Client { inner };
                if let Err(err) = client.first_pool().await
                    && let Ok(mut why) = client.inner.last_lookup_error.lock()
                {
                    *why = err.message().to_owned();
                }
                // Cleared before the news: a caller that comes after it must be able to start
                // the next lookup, not wait for this one's end, which it would never see.
                client.inner.looking_up.store(false, Ordering::Release);
                client.inner.lookups.send_modify(|count| *count += 1);
            },
        );
    }

    /// Asks the sentinels where the primary is and stores a pool of connections to it.
    async fn first_pool(&self) -> Result<()> {
        let (host, port) = find_primary(&self.inner.config).await?;
        let config = &self.inner.config;
        let info = config.connection_info_at(host.clone(), port)?;
        let pool = Pool::standalone(config, info, Some((host, port)), &self.inner.batching)?;
        // Never over another pool: two lookups can overlap by a moment (see `look_up_primary`).
        self.inner
            .redis
            .compare_and_swap(&None::<Arc<Pool>>, Some(Arc::new(pool)));
        // Closed meanwhile: `close` may have emptied the slot before the store.
        if self.is_closed() {
            self.inner.redis.store(None);
            return Err(Error::closed());
        }
        Ok(())
    }

    /// After a Sentinel-managed primary failed (or answered `READONLY`, having been demoted): ask
    /// the sentinels again until they name a primary that answers, and move the pool there.
    pub(crate) fn follow_primary(&self) {
        self.spawn_once(
            |inner| &inner.following,
            |weak| async move {
                let mut pause = Duration::from_millis(50);
                loop {
                    let Some(inner) = weak.upgrade() else { return };
                    let client = Client { inner };
                    if client.is_closed() || client.follow_once().await {
                        return;
                    }
                    drop(client);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            },
        );
    }

    /// Spawns `task` unless the one `running` stands for is still running. `running` is cleared
    /// when the task ends, however it ends: returning, panicking, or dropped with its runtime
    /// (even before it first ran, as when a client outlives the runtime it was used on). Left
    /// set, it would keep this client from ever starting that task again.
    fn spawn_once<F>(
        &self,
        running: fn(&Inner) -> &AtomicBool,
        task: impl FnOnce(std::sync::Weak<Inner>) -> F,
    ) where
        F: Future<Output = ()> + Send + 'static,
    {
        if running(&self.inner).swap(true, Ordering::AcqRel) {
            return;
        }
        let guard = Running {
            inner: Arc::downgrade(&self.inner),
            running,
        };
        let task = task(Arc::downgrade(&self.inner));
        tokio::spawn(async move {
            let _guard = guard;
            task.await;
        });
    }

    /// One step of [`Client::follow_primary`]: true once the pool talks to a working primary.
    async fn follow_once(&self) -> bool {
        let Ok(primary) = find_primary(&self.inner.config).await else {
            return false;
        };
        let current = self.inner.redis.load_full();
        if current.as_ref().and_then(|pool| pool.address.as_ref()) == Some(&primary) {
            return self.ping_all().await.is_ok();
        }
        let config = &self.inner.config;
        let (host, port) = primary.clone();
        let pool = match config.connection_info_at(host, port).and_then(|info| {
            Pool::standalone(config, info, Some(primary.clone()), &self.inner.batching)
        }) {
            Ok(pool) => Arc::new(pool),
            Err(err) => {
                tracing::warn!(error = %err, "cannot connect to the primary the sentinels named");
                return false;
            }
        };
        self.near_retarget();
        self.inner.redis.store(Some(pool));
        if self.is_closed() {
            self.inner.redis.store(None);
            return true;
        }
        tracing::warn!(
            primary = %format!("{}:{}", primary.0, primary.1),
            "the sentinels promoted a new primary; rediskit now talks to it"
        );
        if self.ping_all().await.is_ok() {
            self.inner.breaker.close();
            true
        } else {
            false
        }
    }

    /// After the circuit opens: PING every connection until all answer, then close it. A pooled
    /// connection only reconnects when a call fails on it, and an open circuit sends no calls;
    /// without this, recovery would wait for probes to walk the pool one cool-down at a time.
    fn spawn_recovery(&self) {
        let pause = (self.inner.config.breaker_cooldown / 4).max(Duration::from_millis(50));
        self.spawn_once(
            |inner| &inner.recovering,
            move |weak| async move {
                loop {
                    tokio::time::sleep(pause).await;
                    let Some(inner) = weak.upgrade() else { return };
                    let client = Client { inner };
                    if client.is_closed() || client.inner.breaker.state() == BreakerState::Closed {
                        return;
                    }
                    if client.ping_all().await.is_ok() {
                        client.inner.breaker.close();
                        return;
                    }
                }
            },
        );
    }

    /// Runs `call` on `slot`'s connection (`ordered`: bypassing its auto-pipelining queue),
    /// under the command deadline, counting it.
    async fn run_on<T, F, Fut>(
        &self,
        slot: &Slot,
        ordered: bool,
        what: &'static str,
        call: F,
    ) -> Result<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if self.is_closed() {
            return Err(Error::closed());
        }
        self.ensure_health_loop();
        let inner = &*self.inner;
        slot.in_flight.fetch_add(1, Ordering::Relaxed);
        inner.in_flight.fetch_add(1, Ordering::AcqRel);
        let _guard = InFlight {
            slot,
            total: &inner.in_flight,
        };
        inner.commands.fetch_add(1, Ordering::Relaxed);
        let deadline = inner.config.command_timeout;
        // One clock read serves the deadline and the latency (`timeout` would read it again).
        let started = tokio::time::Instant::now();
        let until = started + deadline;
        let connection = if ordered {
            slot.connection.ordered()
        } else {
            slot.connection.with_deadline(until)
        };
        let result = if connection.bounds_itself() {
            // The auto-pipelining queue ends each command at `until`: one timer per batch rather
            // than one per call (`batch`).
            Ok(call(connection).await)
        } else {
            tokio::time::timeout_at(until, call(connection)).await
        };
        inner.latency.record(started.elapsed());
        let outcome = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) if crate::batch::is_deadline_passed(&err) => {
                Error::timeout(what, deadline)
            }
            Ok(Err(err)) => Error::from(err),
            Err(_) => Error::timeout(what, deadline),
        };
        self.count_failure(&outcome);
        tracing::debug!(command = what, error = %outcome, "redis command failed");
        Err(outcome)
    }

    /// Counts a failed call in the stats: in [`run`](Self::run), and for an operation that failed
    /// before it joined one (`coalesce.rs`).
    pub(crate) fn count_failure(&self, err: &Error) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
        if err.is_timeout() {
            self.inner.timeouts.fetch_add(1, Ordering::Relaxed);
        }
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
                script.redis().load_async(&mut c).await.map(|_| ())
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
    ///
    /// `value` must be unique to the caller (a random token, a record with a salted hash): on a
    /// Cluster, a command whose connection dropped before its reply is sent again, and the first
    /// may have run, so a key found holding exactly `value` counts as this call's own write (two
    /// callers writing identical bytes would both get true).
    pub async fn set_bytes_if_absent(&self, key: &str, value: &[u8]) -> Result<bool> {
        self.set_if_absent(key, value, None).await
    }

    /// `SET key value NX GET [PX ttl]`: true if written, or if the key already holds exactly
    /// `value` (see [`Client::set_bytes_if_absent`]).
    pub(crate) async fn set_if_absent(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<bool> {
        if let Some(memory) = self.memory()? {
            return Ok(memory.set_if_absent(key, value.to_vec(), ttl));
        }
        self.run("SET NX GET", |mut c| async move {
            let mut command = redis::cmd("SET");
            command.arg(key).arg(value).arg("NX").arg("GET");
            if let Some(ttl) = ttl {
                command.arg("PX").arg(ttl_millis(ttl));
            }
            // The value that was there: none means written now.
            command
                .query_async::<Option<Vec<u8>>>(&mut c)
                .await
                .map(|held| held.is_none_or(|held| held == value))
        })
        .await
        .or_else(|err| {
            // `GET` refuses a key of another type, which plain `SET NX` left alone: not written.
            if err.is_wrong_type() {
                Ok(false)
            } else {
                Err(err)
            }
        })
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
            let mut cmd = command("GET", 1, key.len());
            cmd.arg(key);
            c.query(cmd).await
        })
        .await
    }

    /// The value at `key` and its remaining time to live (`None`: no expiry), read atomically in
    /// one round trip (`get_with_pttl.lua`): the cache's stale-while-revalidate reads.
    pub(crate) async fn get_with_ttl(
        &self,
        key: &str,
    ) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        if let Some(memory) = self.memory()? {
            return Ok(memory.get_with_ttl(key));
        }
        let reply: Option<(Vec<u8>, i64)> = self
            .run("EVALSHA get_with_pttl", |mut c| async move {
                crate::scripts::GET_WITH_PTTL
                    .key(key)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(reply.map(|(bytes, ms)| (bytes, (ms >= 0).then(|| Duration::from_millis(ms as u64)))))
    }

    /// `SET key value PX ttl`: value and expiry in one command.
    pub(crate) async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<()> {
        let ttl_ms = ttl_millis(ttl);
        if let Some(memory) = self.memory()? {
            memory.set(key, value.to_vec(), ttl);
            return Ok(());
        }
        self.run("SET", |mut c| async move {
            let mut cmd = command("SET", 4, key.len() + value.len() + 22);
            cmd.arg(key).arg(value).arg("PX").arg(ttl_ms);
            c.query::<()>(cmd).await
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

    /// Writes every pair with the same TTL, atomically (one `set_many.lua`; one per slot on a
    /// cluster).
    pub(crate) async fn mset(&self, items: &[(String, Vec<u8>)], ttl: Duration) -> Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        let ttl_ms = ttl_millis(ttl);
        if let Some(memory) = self.memory()? {
            memory.set_many(items, ttl);
            return Ok(());
        }
        if self.inner.kind != BackendKind::Cluster {
            return self.mset_atomic(items, ttl_ms).await;
        }
        // A script's keys cannot span slots: one per slot, sent concurrently.
        let mut by_slot: std::collections::BTreeMap<u16, Vec<&(String, Vec<u8>)>> =
            std::collections::BTreeMap::new();
        for item in items {
            by_slot.entry(key_slot(&item.0)).or_default().push(item);
        }
        let groups: Vec<_> = by_slot.into_values().collect();
        let writes = groups.iter().map(|group| self.mset_atomic(group, ttl_ms));
        futures_util::future::try_join_all(writes).await.map(|_| ())
    }

    async fn mset_atomic<I: std::borrow::Borrow<(String, Vec<u8>)>>(
        &self,
        items: &[I],
        ttl_ms: u64,
    ) -> Result<()> {
        let mut call = crate::scripts::SET_MANY
            .keys(items.iter().map(|item| item.borrow().0.as_str()))
            .arg(ttl_ms);
        for item in items {
            call = call.arg(&item.borrow().1[..]);
        }
        self.run("EVALSHA set_many", |mut c| async move {
            call.invoke_async::<()>(&mut c).await
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
    /// each page is one command under the deadline. On a cluster it scans every primary in turn.
    /// A key may appear twice if the keyspace is resized (or a slot migrates) while scanning, as
    /// `SCAN` guarantees no better.
    pub(crate) fn scan(
        &self,
        pattern: String,
    ) -> impl Stream<Item = Result<String>> + Send + 'static {
        const PAGE: usize = 500;
        enum State {
            Start,
            /// Scanning `nodes[node]` (`None`: the one server) from `cursor`.
            Scanning {
                nodes: Arc<[Option<(String, u16)>]>,
                node: usize,
                cursor: u64,
            },
            Done,
        }
        let client = self.clone();
        let pages = futures_util::stream::try_unfold(State::Start, move |state| {
            let client = client.clone();
            let pattern = pattern.clone();
            async move {
                let (nodes, node, cursor) = match state {
                    State::Done => return Ok::<_, Error>(None),
                    State::Start => {
                        if let Some(memory) = client.memory()? {
                            return Ok(Some((memory.keys_matching(&pattern), State::Done)));
                        }
                        let nodes: Arc<[Option<(String, u16)>]> =
                            if client.inner.kind == BackendKind::Cluster {
                                client
                                    .cluster_primaries()
                                    .await?
                                    .into_iter()
                                    .map(Some)
                                    .collect()
                            } else {
                                Arc::new([None])
                            };
                        (nodes, 0, 0)
                    }
                    State::Scanning {
                        nodes,
                        node,
                        cursor,
                    } => (nodes, node, cursor),
                };
                let address = nodes.get(node).cloned().flatten();
                let mut command = redis::cmd("SCAN");
                command
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(PAGE);
                let (next, keys): (u64, Vec<String>) = client
                    .run("SCAN", |c| async move {
                        match (c, address) {
                            (Conn::Cluster(mut c), Some((host, port))) => {
                                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                                let routing =
                                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                                        host,
                                        port,
                                    });
                                let reply = c.route_command(command, routing).await?;
                                Ok(redis::from_redis_value(reply)?)
                            }
                            (mut c, _) => command.query_async(&mut c).await,
                        }
                    })
                    .await?;
                let state = if next != 0 {
                    State::Scanning {
                        nodes,
                        node,
                        cursor: next,
                    }
                } else if node + 1 < nodes.len() {
                    State::Scanning {
                        nodes,
                        node: node + 1,
                        cursor: 0,
                    }
                } else {
                    State::Done
                };
                Ok(Some((keys, state)))
            }
        });
        use futures_util::TryStreamExt;
        pages
            .map_ok(|keys| futures_util::stream::iter(keys.into_iter().map(Ok::<_, Error>)))
            .try_flatten()
    }

    /// The addresses of the cluster's primaries that serve slots, from `CLUSTER NODES`.
    async fn cluster_primaries(&self) -> Result<Vec<(String, u16)>> {
        let (primaries, _) = self.cluster_view().await?;
        Ok(primaries)
    }

    /// The cluster's live primaries that serve slots, and how many slots they serve between
    /// them (all [`CLUSTER_SLOTS`] unless a failed primary's slots are not taken over yet).
    pub(crate) async fn cluster_view(&self) -> Result<(Vec<(String, u16)>, usize)> {
        let text: String = self
            .run("CLUSTER NODES", |mut c| async move {
                redis::cmd("CLUSTER").arg("NODES").query_async(&mut c).await
            })
            .await?;
        let (primaries, slots) = parse_cluster_primaries(&text);
        if primaries.is_empty() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "the cluster reports no primary serving slots",
            ));
        }
        Ok((primaries, slots))
    }
}

/// Hash slots in a Redis Cluster.
pub(crate) const CLUSTER_SLOTS: usize = 16_384;

/// Primaries that serve at least one slot and are not failed, and how many slots they serve,
/// from `CLUSTER NODES` output:
/// `<id> <ip:port@cport[,hostname]> <flags> <primary> <ping> <pong> <epoch> <link> <slot>...`.
fn parse_cluster_primaries(text: &str) -> (Vec<(String, u16)>, usize) {
    let mut primaries = Vec::new();
    let mut slots = 0;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 9 {
            continue; // no slots
        }
        let flags: Vec<&str> = fields[2].split(',').collect();
        if !flags.contains(&"master")
            || flags
                .iter()
                .any(|f| matches!(*f, "fail" | "noaddr" | "handshake"))
        {
            continue;
        }
        // `ip:port@bus-port[,hostname]`: a node announcing a hostname is known by it (Redis 7's
        // `cluster-preferred-endpoint-type hostname`), as the slot map names it.
        let (address, hostname) = match fields[1].split_once(',') {
            Some((address, hostname)) => (address, Some(hostname).filter(|h| !h.is_empty())),
            None => (fields[1], None),
        };
        let address = address.split('@').next().unwrap_or_default();
        if let Ok((host, port)) = crate::config::parse_node(address) {
            primaries.push((hostname.map_or(host, str::to_owned), port));
            // `a-b` or `a`; `[a->-id]` and `[a-<-id]` mark slots being moved, not served.
            for range in &fields[8..] {
                let (first, last) = range.split_once('-').unwrap_or((range, range));
                if let (Ok(first), Ok(last)) = (first.parse::<usize>(), last.parse::<usize>()) {
                    slots += (last + 1).saturating_sub(first);
                }
            }
        }
    }
    primaries.sort();
    primaries.dedup();
    (primaries, slots)
}

/// The cluster hash slot of `key`: CRC16 (XMODEM) of its hash tag (the part between the first
/// `{` and the next `}`, if not empty) or of the whole key, modulo 16384.
pub(crate) fn key_slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let hashed = bytes
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(bytes);
    crc16::State::<crc16::XMODEM>::calculate(hashed) % 16384
}

/// Command `name` with room for `args` more arguments of `bytes` in all: `redis::cmd(..)`
/// grows its buffers argument by argument (a `realloc` each), on the hottest paths.
fn command(name: &str, args: usize, bytes: usize) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(args + 1, name.len() + bytes);
    cmd.arg(name);
    cmd
}

fn ttl_millis(ttl: Duration) -> u64 {
    // Redis rejects PX 0; the cache refuses zero TTLs before getting here.
    (ttl.as_millis() as u64).max(1)
}

/// Commands in flight on a connection before callers move on to the next one.
const PIPELINE_DEPTH: usize = 128;

/// How many connections share the traffic before any is [`PIPELINE_DEPTH`] deep: one per worker
/// thread of the runtime the pool is made in (one outside a runtime), at most `max`. Each
/// connection is driven by one task, which writes, reads and parses for all its commands, so a
/// single connection keeps one thread busy while the others wait for it; more connections than
/// threads only split the batches thinner.
fn spread_for(max: usize) -> usize {
    let workers =
        tokio::runtime::Handle::try_current().map_or(1, |runtime| runtime.metrics().num_workers());
    workers.clamp(1, max.max(1))
}

/// The connection for the next command, of `count`: the callers take turns (`turn` counts them)
/// on the first `spread`, skipping any with [`PIPELINE_DEPTH`] commands in flight; when all of
/// those are that deep, the first other one that is not; `None` when every one is.
///
/// Turns, not the least busy: a connection whose replies are late (its task not yet run) would
/// otherwise lose every new command to the others, and its callers would wait out the others'
/// whole bursts (p99 ×4–8 at 64 tasks, measured; docs/benchmarks.md, session 4).
fn choose(
    count: usize,
    spread: usize,
    turn: usize,
    load: impl Fn(usize) -> usize,
) -> Option<usize> {
    let spread = spread.clamp(1, count.max(1));
    (0..count)
        .map(|offset| {
            if offset < spread {
                (turn + offset) % spread
            } else {
                offset
            }
        })
        .find(|&index| load(index) < PIPELINE_DEPTH)
}

tokio::task_local! {
    /// The connection every call of the current [`Client::in_order`] scope uses.
    static PINNED: usize;
}

fn next_pool_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The calling thread's next turn: each thread deals its own calls in turn, so callers on
/// different threads don't write (and pass between cores) one shared counter.
fn next_turn() -> usize {
    thread_local! {
        static TURN: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }
    TURN.with(|turn| {
        let next = turn.get().wrapping_add(1);
        turn.set(next);
        next
    })
}

impl Pool {
    /// The connection for the next command ([`choose`]): concurrent callers share a few
    /// connections and their writes (one `write` carries many commands, one `read` many
    /// replies) instead of spreading thin over all of them, and those few are driven on as many
    /// threads as the runtime has. When every connection is deep, round robin over all.
    fn pick(&self) -> usize {
        let turn = if self.spread > 1 { next_turn() } else { 0 };
        choose(self.connections.len(), self.spread, turn, |index| {
            self.connections[index].in_flight.load(Ordering::Relaxed)
        })
        .unwrap_or_else(|| next_turn() % self.connections.len())
    }

    /// `max_connections` managed connections to one server (standalone, or the primary the
    /// sentinels named, whose address is `address`).
    fn standalone(
        config: &Config,
        info: redis::ConnectionInfo,
        address: Option<(String, u16)>,
        batching: &Arc<crate::batch::Counters>,
    ) -> Result<Self> {
        let client = redis_client(config, info)?;
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
                let in_flight = Arc::new(AtomicUsize::new(0));
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config.clone())
                    .map(|connection| Slot {
                        connection: if config.auto_pipeline {
                            Conn::Single(
                                Arc::new(Batcher::new(
                                    connection,
                                    config.command_timeout,
                                    batching.clone(),
                                    in_flight.clone(),
                                )),
                                None,
                            )
                        } else {
                            Conn::Direct(connection)
                        },
                        in_flight,
                    })
                    .map_err(Error::from)
            })
            .collect::<Result<Vec<_>>>()?;
        let blocking = (0..BLOCKING_CONNECTIONS)
            .map(|_| {
                Ok(Slot {
                    connection: Conn::Direct(
                        ConnectionManager::new_lazy_with_config(
                            client.clone(),
                            manager_config.clone(),
                        )
                        .map_err(Error::from)?,
                    ),
                    in_flight: Arc::default(),
                })
            })
            .collect::<Result<Vec<_>>>()?
            .into_boxed_slice();
        Ok(Self {
            id: next_pool_id(),
            spread: spread_for(connections.len()),
            connections: connections.into_boxed_slice(),
            blocking,
            address,
        })
    }

    /// `max_connections` cluster connections, each multiplexing one connection per node. They
    /// connect in the background, learn the slot map from the seeds, and follow `MOVED`, `ASK`
    /// and failovers by themselves.
    fn cluster(config: &Config) -> Result<Self> {
        install_crypto_provider();
        let seeds = config
            .cluster_nodes
            .iter()
            .map(|node| config.node_connection_info(node))
            .collect::<Result<Vec<_>>>()?;
        let settings = config.connection_info()?.redis_settings().clone();
        let mut builder = redis::cluster::ClusterClientBuilder::new(seeds)
            .connection_timeout(config.connect_timeout)
            .response_timeout(config.command_timeout)
            .retries(3)
            .min_retry_wait(20)
            .max_retry_wait(config.command_timeout.as_millis().max(1) as u64);
        if let Some(username) = settings.username() {
            builder = builder.username(username);
        }
        if let Some(password) = settings.password() {
            builder = builder.password(password);
        }
        #[cfg(feature = "tls")]
        if config.url.trim().starts_with("rediss://") {
            builder = builder.tls(redis::TlsMode::Secure);
            if let Some(certificates) = config.tls_certificates()? {
                builder = builder.certs(certificates);
            }
        }
        let client = builder
            .build()
            .map_err(|err| Error::config(format!("cluster_nodes: {err}")).with_source(err))?;
        let cluster_config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(config.connect_timeout)
            .set_response_timeout(config.command_timeout);
        let connections = (0..config.max_connections)
            .map(|_| Slot {
                connection: Conn::Cluster(
                    client.get_pending_async_connection_with_config(cluster_config.clone()),
                ),
                in_flight: Arc::default(),
            })
            .collect::<Vec<_>>();
        let blocking = (0..BLOCKING_CONNECTIONS)
            .map(|_| Slot {
                connection: Conn::Cluster(
                    client.get_pending_async_connection_with_config(cluster_config.clone()),
                ),
                in_flight: Arc::default(),
            })
            .collect();
        Ok(Self {
            id: next_pool_id(),
            spread: spread_for(connections.len()),
            connections: connections.into_boxed_slice(),
            blocking,
            address: None,
        })
    }
}

fn install_crypto_provider() {
    #[cfg(feature = "tls")]
    {
        // rediskit enables rustls with `ring`; install it unless the application chose one.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// A redis crate client for `info`, with the configured TLS certificates.
pub(crate) fn redis_client(config: &Config, info: redis::ConnectionInfo) -> Result<redis::Client> {
    install_crypto_provider();
    // A private CA and/or a client certificate (mutual TLS), read from their PEM files, for a
    // TLS address. (With sentinels over TLS, the data connection may still be plaintext.)
    #[cfg(feature = "tls")]
    let certificates = match info.addr() {
        redis::ConnectionAddr::TcpTls { .. } => config.tls_certificates()?,
        _ => None,
    };
    #[cfg(feature = "tls")]
    let client = match certificates {
        Some(certificates) => redis::Client::build_with_tls(info, certificates),
        None => redis::Client::open(info),
    };
    #[cfg(not(feature = "tls"))]
    let client = redis::Client::open(info);
    client.map_err(|err| {
        Error::config(format!("url `{}`: {err}", redact_url(&config.url))).with_source(err)
    })
}

/// Asks the sentinels, in order, where the primary [`Config::sentinel_master`] is, and checks
/// that the server there says it is a primary (during a failover a sentinel may still name the
/// old one). Each step is bounded by the connect timeout.
async fn find_primary(config: &Config) -> Result<(String, u16)> {
    let deadline = config.connect_timeout;
    let name = config.sentinel_master.as_deref().unwrap_or_default();
    let mut last = String::from("no sentinel configured");
    for sentinel in &config.sentinel_nodes {
        let (host, port) = crate::config::parse_node(sentinel)
            .map_err(|why| Error::config(format!("sentinel_nodes: {why}")))?;
        // Sentinels are asked with their own credentials, if any: never the data ones, which
        // they do not share.
        let client = sentinel_client(config, host, port)?;
        let asked = tokio::time::timeout(deadline, async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(name)
                .query_async::<Option<(String, u16)>>(&mut connection)
                .await
        })
        .await;
        let (host, port) = match asked {
            Ok(Ok(Some(address))) => address,
            Ok(Ok(None)) => {
                last = format!("sentinel {sentinel} does not know a primary named `{name}`");
                continue;
            }
            Ok(Err(err)) => {
                last = format!("sentinel {sentinel}: {err}");
                continue;
            }
            Err(_) => {
                last = format!("sentinel {sentinel} did not answer within {deadline:?}");
                continue;
            }
        };
        let client = redis_client(config, config.connection_info_at(host.clone(), port)?)?;
        let role = tokio::time::timeout(deadline, async {
            let mut connection = client.get_multiplexed_async_connection().await?;
            redis::cmd("ROLE")
                .query_async::<Vec<redis::Value>>(&mut connection)
                .await
        })
        .await;
        match role {
            Ok(Ok(reply)) if says_primary(&reply) => return Ok((host, port)),
            Ok(Ok(_)) => {
                last =
                    format!("{host}:{port}, named by sentinel {sentinel}, is not a primary (yet)")
            }
            Ok(Err(err)) => {
                last = format!("primary {host}:{port}, named by sentinel {sentinel}: {err}")
            }
            Err(_) => last = format!("primary {host}:{port} did not answer within {deadline:?}"),
        }
    }
    Err(Error::new(
        ErrorKind::Unavailable,
        format!("no primary `{name}` found through the sentinels: {last}"),
    ))
}

/// A client for the sentinel at `host:port`, with the sentinels' credentials: over TLS with the
/// data connection's CA and client certificate when [`Config::sentinel_tls`] is on, else plain
/// TCP.
fn sentinel_client(config: &Config, host: String, port: u16) -> Result<redis::Client> {
    use redis::IntoConnectionInfo;
    let addr = if config.sentinel_tls {
        redis::ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        redis::ConnectionAddr::Tcp(host, port)
    };
    let info = addr.into_connection_info()?;
    let mut settings = info.redis_settings().clone();
    if let Some(username) = &config.sentinel_username {
        settings = settings.set_username(username);
    }
    if let Some(password) = &config.sentinel_password {
        settings = settings.set_password(password.expose());
    }
    let info = info.set_redis_settings(settings);
    if config.sentinel_tls {
        redis_client(config, info)
    } else {
        Ok(redis::Client::open(info)?)
    }
}

/// Whether a `ROLE` reply is a primary's (`master`, in RESP2 or RESP3).
pub(crate) fn says_primary(role: &[redis::Value]) -> bool {
    match role.first() {
        Some(redis::Value::BulkString(role)) => role == b"master",
        Some(redis::Value::SimpleString(role)) => role == "master",
        _ => false,
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
        if !health.ok && client.inner.kind == BackendKind::Sentinel {
            client.follow_primary();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Callers take turns on the first `spread` connections, skip a deep one, spill past them
    /// only when all are deep, and get `None` when every connection is.
    #[test]
    fn commands_take_turns_on_the_spread() {
        let idle = |_| 0;
        let turns: Vec<_> = (0..6).map(|turn| choose(20, 2, turn, idle)).collect();
        assert_eq!(turns, [0, 1, 0, 1, 0, 1].map(Some));
        // One connection per caller when the spread is 1, whatever the turn.
        assert!((0..5).all(|turn| choose(20, 1, turn, idle) == Some(0)));
        // A deep connection loses its turn to the next of the spread.
        let first_deep = |index| if index == 0 { PIPELINE_DEPTH } else { 0 };
        assert_eq!(choose(20, 3, 0, first_deep), Some(1));
        assert_eq!(choose(20, 3, 2, first_deep), Some(2));
        // The whole spread deep: the first one past it with room.
        let spread_deep = |index| if index < 2 { PIPELINE_DEPTH } else { 0 };
        assert_eq!(choose(20, 2, 1, spread_deep), Some(2));
        let all_deep = |_| PIPELINE_DEPTH;
        assert_eq!(choose(4, 2, 0, all_deep), None);
        // A spread wider than the pool is the pool.
        assert_eq!(choose(2, 8, 3, idle), Some(1));
    }

    /// Inside `in_order` every call uses one connection, though the pool would deal them to three
    /// (one per worker thread): what keeps `get_or_set`'s paired commands in order.
    #[test]
    fn calls_in_order_share_one_connection() {
        let server = rediskit_testkit::RedisServer::start();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(3)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut config = Config::builder().url(server.url()).build().unwrap();
            config.max_connections = 8;
            let client = Client::connect(config).await.unwrap();
            let cache = crate::Cache::new(&client);
            client
                .in_order(async {
                    for i in 0..12 {
                        let key = format!("k{i}");
                        let (a, b) = tokio::join!(cache.try_get::<u8>(&key), cache.exists(&key));
                        assert_eq!(a.unwrap(), None);
                        assert!(!b.unwrap());
                    }
                })
                .await;
            let clients: String = redis::cmd("CLIENT")
                .arg("LIST")
                .query(&mut server.admin())
                .unwrap();
            let used = clients
                .lines()
                .filter(|line| line.contains(" cmd=get ") || line.contains(" cmd=exists "))
                .count();
            assert_eq!(used, 1, "{clients}");
        });
    }

    /// The client's background tasks (following the sentinels, recovering after the circuit
    /// opened) start again after one was lost with its runtime before it ran (a client that
    /// outlives the runtime it was used on): a flag left set would have kept them off for good.
    #[test]
    fn a_background_task_lost_with_its_runtime_can_start_again() {
        let server = rediskit_testkit::RedisServer::start();
        let running = |client: &Client| {
            let flag = |flag: &AtomicBool| flag.load(Ordering::Acquire);
            (
                flag(&client.inner.following),
                flag(&client.inner.recovering),
            )
        };
        let first = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = first.block_on(async {
            let config = Config::builder().url(server.url()).build().unwrap();
            let client = Client::connect(config).await.unwrap();
            // Spawned on this one-thread runtime, which runs neither before it is dropped.
            client.follow_primary();
            client.spawn_recovery();
            assert_eq!(running(&client), (true, true));
            client
        });
        drop(first);
        assert_eq!(running(&client), (false, false));

        // And the next one runs: the circuit is closed, so it ends at its first look.
        let second = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        second.block_on(async {
            client.spawn_recovery();
            assert!(running(&client).1);
            let deadline = Instant::now() + Duration::from_secs(10);
            while running(&client).1 {
                assert!(Instant::now() < deadline, "the recovery task never ended");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }

    /// The background health `PING` dies with the runtime it ran on, and the next call on
    /// another runtime starts it again there: `PING`s reach Redis with no call made.
    #[test]
    fn the_health_loop_starts_again_on_a_new_runtime() {
        let server = rediskit_testkit::RedisServer::start();
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let pings = || -> u64 {
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut server.admin())
                .unwrap();
            info.lines()
                .find_map(|line| line.strip_prefix("cmdstat_ping:calls="))
                .and_then(|rest| rest.split(',').next())
                .map_or(0, |calls| calls.parse().unwrap())
        };
        let first = runtime();
        let client = first.block_on(async {
            let mut config = Config::builder().url(server.url()).build().unwrap();
            config.health_check_interval = Duration::from_millis(100);
            Client::connect(config).await.unwrap()
        });
        assert!(client.inner.checking.load(Ordering::Acquire));
        drop(first);
        assert!(!client.inner.checking.load(Ordering::Acquire));

        runtime().block_on(async {
            // The pool's connections died with the first runtime too; the call may fail.
            let _ = client
                .run("GET", |mut c| async move {
                    redis::cmd("GET")
                        .arg("k")
                        .query_async::<Option<String>>(&mut c)
                        .await
                })
                .await;
            assert!(client.inner.checking.load(Ordering::Acquire));
            let before = pings();
            let deadline = Instant::now() + Duration::from_secs(10);
            while pings() < before + 2 {
                assert!(
                    Instant::now() < deadline,
                    "no health PING on the new runtime"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            // Closed, it stops at its next tick.
            client.close().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let after = pings();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(pings(), after, "health PINGs after close");
            let deadline = Instant::now() + Duration::from_secs(10);
            while client.inner.checking.load(Ordering::Acquire) {
                assert!(Instant::now() < deadline, "the health loop outlived close");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
    }

    #[test]
    fn the_spread_is_one_connection_per_worker_thread() {
        assert_eq!(spread_for(20), 1, "outside a runtime");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(3)
            .build()
            .unwrap();
        runtime.block_on(async {
            assert_eq!(spread_for(20), 3);
            assert_eq!(spread_for(2), 2);
            assert_eq!(spread_for(0), 1);
        });
        let single = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        single.block_on(async { assert_eq!(spread_for(20), 1) });
    }

    /// Slots as Redis computes them (values from `CLUSTER KEYSLOT`), hash tags included.
    #[test]
    fn key_slots_match_redis() {
        assert_eq!(key_slot("foo"), 12182);
        assert_eq!(key_slot("{user1000}.following"), key_slot("user1000"));
        assert_eq!(key_slot("rk:s:{alice}"), key_slot("alice"));
        assert_eq!(key_slot("foo{}{bar}"), key_slot("foo{}{bar}"));
        assert_ne!(
            key_slot("foo{}{bar}"),
            key_slot("bar"),
            "an empty tag hashes the whole key"
        );
        assert_eq!(key_slot("foo{{bar}}zap"), key_slot("{bar"));
    }

    /// Only live primaries with slots are scanned; hostnames win when announced.
    #[test]
    fn cluster_nodes_output_is_parsed() {
        let text = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001 master - 0 0 2 connected 5461-10922
c3 127.0.0.1:7002@17002,node-3 master - 0 0 3 connected 10923-16383
d4 127.0.0.1:7003@17003 slave a1 0 0 1 connected
e5 127.0.0.1:7004@17004 master,fail - 0 0 5 disconnected
f6 :0@0 master,noaddr - 0 0 6 disconnected 1-2
";
        assert_eq!(
            parse_cluster_primaries(text),
            (
                vec![
                    ("127.0.0.1".to_owned(), 7000),
                    ("127.0.0.1".to_owned(), 7001),
                    ("node-3".to_owned(), 7002)
                ],
                CLUSTER_SLOTS
            )
        );
    }

    /// Slots of a failed primary, single slots and slots being moved are counted as they are.
    #[test]
    fn cluster_nodes_slots_are_counted() {
        let text = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460 [5461->-b2]
b2 127.0.0.1:7001@17001 master,fail - 0 0 2 disconnected 5461-10922
c3 127.0.0.1:7002@17002 master - 0 0 3 connected 10923 10924-16383
";
        let (primaries, slots) = parse_cluster_primaries(text);
        assert_eq!(primaries.len(), 2);
        assert_eq!(slots, 5461 + 1 + 5460);
    }
}
