//! The workloads: what each one prepares before the clock starts, and what one operation is.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use futures_util::{StreamExt, TryStreamExt};
use redis::aio::MultiplexedConnection;
use rediskit::{Cache, CacheStatus, Client, NearCacheConfig, Quota, RateLimiter, Sessions};

/// Keys of the get/set workloads, and callers of `ratelimit`.
pub const KEY_SPACE: usize = 10_000;
/// Expiry of everything the benchmark writes: a run killed before its clean-up leaves nothing
/// behind for long on a shared server.
pub const TTL: Duration = Duration::from_secs(3600);
/// One in this many `cache_get_or_set` operations asks for a key never stored: 90 % hits for the
/// whole run (a missing key that is then stored would turn every later call into a hit).
const MISS_EVERY: u64 = 10;
/// Sessions prepared for `session_lookup`, and shared out among the tasks for `session_rotate`.
const SESSIONS: usize = 10_000;
/// Requests in flight while preparing.
const PREPARE_IN_FLIGHT: usize = 64;
/// Entries per `set_many` (or pipeline, for the `raw_*` keys) while preloading keys, at most.
const PRELOAD_BATCH: usize = 500;
/// Bytes of values per preloading call, at most: larger values go fewer to a call, so that
/// each call stays well within the command deadline.
const PRELOAD_BYTES: usize = 1 << 20;
/// Largest `--value-size`: the cache workloads preload [`KEY_SPACE`] values, 1 GiB at this
/// size (and `near_get` holds them all in memory).
pub const MAX_VALUE_SIZE: usize = 100 * 1024;
/// Keys per preloading call for values of `value_size` bytes.
fn preload_batch(value_size: usize) -> usize {
    (PRELOAD_BYTES / value_size.max(1)).clamp(1, PRELOAD_BATCH)
}

/// Device name of the benchmark's sessions.
const DEVICE: &str = "rediskit-bench";
/// Tasks publish their progress every this many operations, to keep the shared counter cold.
const PROGRESS_EVERY: u64 = 64;

/// One benchmark workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum Workload {
    /// `Cache::try_get` of preloaded keys (all hits).
    CacheGet,
    /// `Cache::set_with_ttl`.
    CacheSet,
    /// `Cache::try_get_or_set` with 90 % hits.
    CacheGetOrSet,
    /// `Cache::try_get` of preloaded keys held in the near-cache (all served from memory).
    NearGet,
    /// `Sessions::create`.
    SessionCreate,
    /// `Sessions::lookup` of live tokens.
    SessionLookup,
    /// `Sessions::rotate`, each task rotating its own sessions.
    SessionRotate,
    /// `Sessions::revoke_all` of users holding one session each.
    SessionRevokeAll,
    /// `RateLimiter::check` with a quota that never denies, over 10,000 callers.
    Ratelimit,
    /// `GET` through the bare `redis` crate: the baseline of `cache_get`.
    RawGet,
    /// `SET … PX` through the bare `redis` crate: the baseline of `cache_set`.
    RawSet,
}

impl Workload {
    /// Every workload, in the order they run and are reported.
    pub const ALL: [Workload; 11] = [
        Workload::CacheGet,
        Workload::CacheSet,
        Workload::CacheGetOrSet,
        Workload::NearGet,
        Workload::SessionCreate,
        Workload::SessionLookup,
        Workload::SessionRotate,
        Workload::SessionRevokeAll,
        Workload::Ratelimit,
        Workload::RawGet,
        Workload::RawSet,
    ];

    /// The name used on the command line, in JSON and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Workload::CacheGet => "cache_get",
            Workload::CacheSet => "cache_set",
            Workload::CacheGetOrSet => "cache_get_or_set",
            Workload::NearGet => "near_get",
            Workload::SessionCreate => "session_create",
            Workload::SessionLookup => "session_lookup",
            Workload::SessionRotate => "session_rotate",
            Workload::SessionRevokeAll => "session_revoke_all",
            Workload::Ratelimit => "ratelimit",
            Workload::RawGet => "raw_get",
            Workload::RawSet => "raw_set",
        }
    }

    /// Why the workload cannot run, when it cannot. Every workload runs today; this stays for
    /// workloads that need something a server or build may lack.
    pub fn unavailable(self) -> Option<&'static str> {
        None
    }
}

/// The handles and data every task of every run shares.
pub(super) struct Ctx {
    /// The run's key prefix: every key the run writes starts with it.
    prefix: String,
    /// The handle every rediskit workload uses (for its figures).
    pub(super) client: Client,
    cache: Cache,
    pub(super) sessions: Sessions,
    pub(super) limiter: RateLimiter,
    /// The bare `redis` connections of the baseline (and of the clean-up); never empty.
    pub(super) raw: Vec<MultiplexedConnection>,
    raw_next: AtomicUsize,
    keys: Vec<String>,
    raw_keys: Vec<String>,
    callers: Vec<String>,
    value: String,
    raw_value: Vec<u8>,
}

impl Ctx {
    /// Builds the handles over `client` (whose key prefix is the run's own).
    pub(super) fn new(
        client: &Client,
        raw: Vec<MultiplexedConnection>,
        value_size: usize,
    ) -> Result<Self, String> {
        let error = |err: rediskit::Error| err.to_string();
        // A fresh secret per run: the benchmark's tokens are worthless anywhere else.
        let secret: String = (0..48).map(|_| random_char(rand::random())).collect();
        // Pseudo-random text: a run of one letter would compress to nothing above the codec's
        // compression threshold and flatter large values.
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let value: String = (0..value_size)
            .map(|_| random_char(xorshift(&mut seed)))
            .collect();
        let raw_prefix = format!("{}raw:", client.key_prefix());
        Ok(Self {
            prefix: client.key_prefix().to_owned(),
            client: client.clone(),
            cache: Cache::builder(client)
                .namespace("bench")
                .default_ttl(TTL)
                .build()
                .map_err(error)?,
            sessions: Sessions::builder(client, secret)
                .default_ttl(TTL)
                .build()
                .map_err(error)?,
            limiter: RateLimiter::new(
                client,
                "bench",
                Quota::new(1_000_000, Duration::from_secs(1)),
            )
            .map_err(error)?,
            raw,
            raw_next: AtomicUsize::new(0),
            keys: (0..KEY_SPACE).map(|i| format!("k{i}")).collect(),
            raw_keys: (0..KEY_SPACE)
                .map(|i| format!("{raw_prefix}k{i}"))
                .collect(),
            callers: (0..KEY_SPACE).map(|i| format!("c{i}")).collect(),
            raw_value: value.clone().into_bytes(),
            value,
        })
    }

    /// The run's key prefix.
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The next bare connection, round robin per command (one per worker thread, like the calls
    /// of the library's pool; with `--connections 1` it is always the same one).
    fn raw_connection(&self) -> MultiplexedConnection {
        let index = self.raw_next.fetch_add(1, Ordering::Relaxed) % self.raw.len();
        self.raw[index].clone()
    }
}

/// What a run needs beyond the handles, made before the clock starts.
#[derive(Default)]
pub(super) struct Prepared {
    lookup: Arc<Vec<String>>,
    per_task: Vec<Vec<String>>,
    /// `near_get`'s cache, on a client of its own (see [`Prepared::near`]).
    near: Option<(Client, Cache)>,
}

impl Prepared {
    /// Reads `near_get`'s near-cache has answered from memory so far, if it has one.
    pub(super) fn near_hits(&self) -> Option<u64> {
        self.near.as_ref().map(|(_, cache)| cache.stats().near.hits)
    }

    /// A client for `near_get` alone, with a namespace that has the near-cache on. Its tracking
    /// connection (`CLIENT TRACKING … BCAST`) makes redis-server check every key written by any
    /// client against the tracked prefixes: ~700 instructions more per `SET` (callgrind, about
    /// 7 %), which the other workloads must not pay. [`Prepared::finish`] closes it.
    async fn near(&mut self, ctx: &Ctx) -> Result<&Cache, String> {
        let client = Client::connect(ctx.client.config().clone())
            .await
            .map_err(|err| format!("connecting the near-cache's client: {err}"))?;
        let config = NearCacheConfig::default();
        // Room for every key the workload reads, whatever the value size.
        let max_bytes = (2 * KEY_SPACE * (ctx.value.len() + 256)).max(config.max_bytes);
        let cache = Cache::builder(&client)
            .namespace("bench_near")
            .default_ttl(TTL)
            .near_cache(config.capacity(2 * KEY_SPACE).max_bytes(max_bytes))
            .build();
        let cache = match cache {
            Ok(cache) => cache,
            Err(err) => {
                client.close().await;
                return Err(err.to_string());
            }
        };
        Ok(&self.near.insert((client, cache)).1)
    }

    /// Closes what the run opened for itself (`near_get`'s client and its tracking connection).
    pub(super) async fn finish(self) {
        if let Some((client, _)) = self.near {
            client.close().await;
        }
    }
}

/// Prepares `workload` for `ops` operations over `concurrency` tasks: preloads the keys the
/// reads expect and creates the sessions the session workloads use.
pub(super) async fn prepare(
    ctx: &Ctx,
    workload: Workload,
    concurrency: usize,
    ops: u64,
) -> Result<Prepared, String> {
    let mut prepared = Prepared::default();
    match workload {
        Workload::CacheGet | Workload::CacheGetOrSet => {
            for chunk in ctx.keys.chunks(preload_batch(ctx.value.len())) {
                let items: Vec<(&str, &str)> = chunk
                    .iter()
                    .map(|key| (key.as_str(), ctx.value.as_str()))
                    .collect();
                ctx.cache
                    .set_many(&items, TTL)
                    .await
                    .map_err(|err| format!("preloading the cache: {err}"))?;
            }
        }
        Workload::NearGet => {
            let near = prepared.near(ctx).await?;
            for chunk in ctx.keys.chunks(preload_batch(ctx.value.len())) {
                let items: Vec<(&str, &str)> = chunk
                    .iter()
                    .map(|key| (key.as_str(), ctx.value.as_str()))
                    .collect();
                near.set_many(&items, TTL)
                    .await
                    .map_err(|err| format!("preloading the near-cache's keys: {err}"))?;
            }
            warm_near_cache(ctx, near).await?;
        }
        Workload::RawGet => {
            let mut connection = ctx.raw_connection();
            for chunk in ctx.raw_keys.chunks(preload_batch(ctx.raw_value.len())) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(&ctx.raw_value[..])
                        .arg("PX")
                        .arg(TTL.as_millis() as u64)
                        .ignore();
                }
                pipe.query_async::<()>(&mut connection)
                    .await
                    .map_err(|err| format!("preloading raw keys: {err}"))?;
            }
        }
        Workload::SessionLookup => {
            let users = (0..SESSIONS).map(|i| format!("l{i}"));
            prepared.lookup = Arc::new(create_sessions(ctx, users).await?);
        }
        Workload::SessionRotate => {
            // Each task rotates only its own sessions, so no token is ever presented twice.
            let per_task = SESSIONS.div_ceil(concurrency).max(1);
            let users = (0..per_task * concurrency).map(|i| format!("r{i}"));
            let tokens = create_sessions(ctx, users).await?;
            prepared.per_task = tokens.chunks(per_task).map(<[String]>::to_vec).collect();
        }
        Workload::SessionRevokeAll => {
            // One user (with one session) per operation: every revoke_all ends a live session.
            create_sessions(ctx, (0..ops).map(|g| format!("u{g}"))).await?;
        }
        Workload::CacheSet | Workload::SessionCreate | Workload::Ratelimit | Workload::RawSet => {}
    }
    Ok(prepared)
}

/// Reads every key until one pass is served entirely from the near-cache (its tracking
/// connection is up and every key held), so that the timed reads are all near hits.
async fn warm_near_cache(ctx: &Ctx, near: &Cache) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    // Passes over every key, at least three however long each takes (large values read slowly).
    let mut passes = 0;
    loop {
        let before = near.stats().near.hits;
        for key in &ctx.keys {
            near.try_get::<String>(key)
                .await
                .map_err(|err| format!("warming the near-cache: {err}"))?
                .ok_or_else(|| format!("near_get: preloaded key `{key}` was missing"))?;
        }
        passes += 1;
        let hits = near.stats().near.hits - before;
        if hits == ctx.keys.len() as u64 {
            return Ok(());
        }
        if passes >= 3 && Instant::now() > deadline {
            return Err(format!(
                "the near-cache did not start serving: {hits} of {} reads were near-cache hits \
                 in the last of {passes} passes over 10 s (does the server speak RESP3 and allow \
                 CLIENT TRACKING?)",
                ctx.keys.len()
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Creates one session for each of `users`; their tokens, in order.
async fn create_sessions(
    ctx: &Ctx,
    users: impl Iterator<Item = String>,
) -> Result<Vec<String>, String> {
    futures_util::stream::iter(users)
        .map(|user| async move {
            ctx.sessions
                .create(&user, DEVICE, None, None)
                .await
                .map(|issued| issued.token.into_string())
        })
        .buffered(PREPARE_IN_FLIGHT)
        .map_err(|err| format!("creating sessions: {err}"))
        .try_collect()
        .await
}

/// What one task measured.
pub(super) struct TaskOutcome {
    /// Each operation's duration, in nanoseconds.
    pub(super) latencies: Vec<u64>,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    pub(super) finished: Instant,
}

/// One of the run's tasks: its share of the operations, one after the other.
pub(super) struct Task {
    index: u64,
    concurrency: u64,
    rng: u64,
    /// Reused for keys built per operation, so the loop allocates nothing of its own.
    buf: String,
    lookup: Arc<Vec<String>>,
    tokens: Vec<String>,
    near: Option<Cache>,
}

impl Task {
    /// Task `index` of `concurrency`, taking its share of `prepared`.
    pub(super) fn new(index: usize, concurrency: usize, prepared: &mut Prepared) -> Self {
        let tokens = prepared
            .per_task
            .get_mut(index)
            .map(std::mem::take)
            .unwrap_or_default();
        Self {
            index: index as u64,
            concurrency: concurrency as u64,
            rng: (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            buf: String::with_capacity(32),
            lookup: prepared.lookup.clone(),
            tokens,
            near: prepared.near.as_ref().map(|(_, cache)| cache.clone()),
        }
    }

    /// Runs `count` operations of `workload`, timing each.
    pub(super) async fn run(
        mut self,
        ctx: &Ctx,
        workload: Workload,
        count: u64,
        done: &AtomicU64,
    ) -> TaskOutcome {
        let mut latencies = Vec::with_capacity(count as usize);
        let mut errors = 0;
        let mut first_error = None;
        for j in 0..count {
            let started = Instant::now();
            let result = self.op(ctx, workload, j).await;
            let took = started.elapsed().as_nanos() as u64;
            // A failed operation is no measure of one: one that fails fast (an open circuit)
            // would make the run look faster.
            match result {
                Ok(()) => latencies.push(took),
                Err(err) => {
                    errors += 1;
                    first_error.get_or_insert(err);
                }
            }
            if j % PROGRESS_EVERY == PROGRESS_EVERY - 1 {
                done.fetch_add(PROGRESS_EVERY, Ordering::Relaxed);
            }
        }
        done.fetch_add(count % PROGRESS_EVERY, Ordering::Relaxed);
        TaskOutcome {
            latencies,
            errors,
            first_error,
            finished: Instant::now(),
        }
    }

    /// A key index in `0..n`, uniformly (xorshift: a few nanoseconds, no shared state).
    fn pick(&mut self, n: usize) -> usize {
        (xorshift(&mut self.rng) % n as u64) as usize
    }

    /// Operation `j` of this task. The run's operations are numbered `index + j * concurrency`
    /// across tasks, so workloads that need one thing per operation cover `0..ops` exactly.
    async fn op(&mut self, ctx: &Ctx, workload: Workload, j: u64) -> Result<(), String> {
        let global = self.index + j * self.concurrency;
        match workload {
            Workload::CacheGet => {
                let key = &ctx.keys[self.pick(KEY_SPACE)];
                match ctx.cache.try_get::<String>(key).await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err(format!("cache_get: preloaded key `{key}` was missing")),
                    Err(err) => Err(err.to_string()),
                }
            }
            Workload::CacheSet => {
                let key = &ctx.keys[self.pick(KEY_SPACE)];
                ctx.cache
                    .set_with_ttl(key, &ctx.value, TTL)
                    .await
                    .map_err(|err| err.to_string())
            }
            Workload::CacheGetOrSet => {
                // Numbered over the whole run, so that a tenth of it misses however few
                // operations each task has.
                let fresh = global % MISS_EVERY == MISS_EVERY - 1;
                let key: &str = if fresh {
                    self.buf.clear();
                    let _ = write!(self.buf, "m{global}");
                    &self.buf
                } else {
                    &ctx.keys[self.pick(KEY_SPACE)]
                };
                let value = &ctx.value;
                let lookup = ctx
                    .cache
                    .try_get_or_set::<String, rediskit::Error, _, _>(key, TTL, || async move {
                        Ok(value.clone())
                    })
                    .await
                    .map_err(|err| err.to_string())?;
                match (fresh, lookup.status) {
                    (true, CacheStatus::Miss) | (false, CacheStatus::Hit) => Ok(()),
                    (_, status) => Err(format!("cache_get_or_set: `{key}` was a {status:?}")),
                }
            }
            Workload::NearGet => {
                let key = &ctx.keys[self.pick(KEY_SPACE)];
                let near = self
                    .near
                    .as_ref()
                    .ok_or("near_get: no near-cache prepared")?;
                match near.try_get::<String>(key).await {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err(format!("near_get: preloaded key `{key}` was missing")),
                    Err(err) => Err(err.to_string()),
                }
            }
            Workload::SessionCreate => {
                // Two sessions per user, as most users' hashes are small: half the creations
                // make a new key, half add to a one-session hash. Neither sweeps (that is at
                // every eighth record: docs/benchmarks.md measures nine per user too).
                self.buf.clear();
                let _ = write!(self.buf, "u{}", global / 2);
                ctx.sessions
                    .create(&self.buf, DEVICE, None, None)
                    .await
                    .map(|_| ())
                    .map_err(|err| err.to_string())
            }
            Workload::SessionLookup => {
                let token = &self.lookup[xorshift(&mut self.rng) as usize % self.lookup.len()];
                ctx.sessions
                    .lookup(token)
                    .await
                    .map(|_| ())
                    .map_err(|err| err.to_string())
            }
            Workload::SessionRotate => {
                let slot = j as usize % self.tokens.len();
                match ctx.sessions.rotate(&self.tokens[slot], None).await {
                    Ok(issued) => {
                        // The rotated token is spent; the next rotation of this session uses
                        // the new one.
                        self.tokens[slot] = issued.token.into_string();
                        Ok(())
                    }
                    Err(err) => {
                        // A rotation that failed on its way (a timeout) may have run: its token
                        // would be reuse from now on, and every later rotation of the slot an
                        // error. The slot starts again with a session of its own, so that one
                        // failure stays one error (this operation's time is not counted).
                        self.buf.clear();
                        let _ = write!(self.buf, "r{}:again{j}", self.index);
                        if let Ok(fresh) = ctx.sessions.create(&self.buf, DEVICE, None, None).await
                        {
                            self.tokens[slot] = fresh.token.into_string();
                        }
                        Err(err.to_string())
                    }
                }
            }
            Workload::SessionRevokeAll => {
                self.buf.clear();
                let _ = write!(self.buf, "u{global}");
                match ctx.sessions.revoke_all(&self.buf).await {
                    Ok(1) => Ok(()),
                    Ok(n) => Err(format!(
                        "session_revoke_all: `{}` had {n} live sessions, expected 1",
                        self.buf
                    )),
                    Err(err) => Err(err.to_string()),
                }
            }
            Workload::Ratelimit => {
                let caller = &ctx.callers[self.pick(KEY_SPACE)];
                match ctx.limiter.check(caller).await {
                    Ok(decision) if decision.degraded => {
                        Err("ratelimit: degraded (Redis unavailable)".to_owned())
                    }
                    Ok(decision) if decision.allowed => Ok(()),
                    Ok(_) => Err(format!("ratelimit: `{caller}` denied by a huge quota")),
                    Err(err) => Err(err.to_string()),
                }
            }
            Workload::RawGet => {
                let key = &ctx.raw_keys[self.pick(KEY_SPACE)];
                let mut connection = ctx.raw_connection();
                match redis::cmd("GET")
                    .arg(key)
                    .query_async::<Option<Vec<u8>>>(&mut connection)
                    .await
                {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err(format!("raw_get: preloaded key `{key}` was missing")),
                    Err(err) => Err(err.to_string()),
                }
            }
            Workload::RawSet => {
                // The same command as `Cache::set_with_ttl` sends, so the difference is the layer.
                let key = &ctx.raw_keys[self.pick(KEY_SPACE)];
                let mut connection = ctx.raw_connection();
                redis::cmd("SET")
                    .arg(key)
                    .arg(&ctx.raw_value[..])
                    .arg("PX")
                    .arg(TTL.as_millis() as u64)
                    .query_async::<()>(&mut connection)
                    .await
                    .map_err(|err| err.to_string())
            }
        }
    }
}

fn xorshift(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

fn random_char(n: u64) -> char {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    char::from(ALPHABET[(n % ALPHABET.len() as u64) as usize])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rotation that fails (here a token no store issued; in a run, one that timed out and
    /// may have run) gives its slot a session of its own: the slot's next rotations succeed,
    /// so one failure stays one error.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_rotation_gives_its_slot_a_new_session() {
        let server = rediskit_testkit::RedisServer::start();
        let config = rediskit::Config::builder()
            .url(server.url())
            .build()
            .unwrap();
        let client = Client::connect(config).await.unwrap();
        let ctx = Ctx::new(&client, Vec::new(), 10).unwrap();
        let mut prepared = Prepared {
            per_task: vec![vec!["not-a-token".to_owned()]],
            ..Prepared::default()
        };
        let mut task = Task::new(0, 1, &mut prepared);

        assert!(task.op(&ctx, Workload::SessionRotate, 0).await.is_err());
        for j in 1..3 {
            task.op(&ctx, Workload::SessionRotate, j).await.unwrap();
        }
    }
}
