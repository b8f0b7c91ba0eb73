//! The near-cache (L1): values kept in this process's memory and dropped as soon as Redis says
//! their keys changed, through RESP3 client-side caching (`CLIENT TRACKING … BCAST`).
//!
//! # Design
//!
//! - **One tracking connection per [`Client`]**, started by the first cache (or session store)
//!   that opts in. It is a RESP3 connection of its own, named [`TRACKING_CONNECTION_NAME`], that
//!   sends `CLIENT TRACKING ON BCAST PREFIX p₁ PREFIX p₂ …` with the key prefix of every opted-in
//!   namespace, and carries nothing else. Broadcasting (rather than the default mode, where Redis
//!   remembers every key each connection read) means the reads keep using the ordinary pooled
//!   connections untracked, and Redis's cost is one prefix per namespace instead of one table
//!   entry per key read per connection (see `docs/decisions/0004-near-cache.md`).
//! - **Invalidations are applied where they are parsed**: the push callback runs on the tracking
//!   connection's own task, so no channel hop sits between the bytes arriving and the entry going.
//! - **The read/invalidation race** (a read that started before a write can get its old reply
//!   *after* the write's invalidation was applied, and must not cache it): every key hashes to
//!   one of [`BUCKETS`] change counters. A read takes a [`Ticket`] (the counter and the tracker's
//!   state) *before* it sends its `GET`, and its reply is inserted only if, under the shard's
//!   lock, neither moved. Invalidations bump the counter under the same lock.
//! - **Lost connection, lost invalidations.** When the tracking connection drops (or a `PING`
//!   every [`PING_INTERVAL`] fails), every store is emptied and refuses inserts — reads go to
//!   Redis — until a background task has reconnected (back-off, every call under the deadlines)
//!   and tracking is on again. A connection that goes silent without dying (a paused server, a
//!   partition) stops the stores from serving within [`TRACKING_LEASE`] of its last `PONG`.
//!   A tracking task that dies with its Tokio runtime (a client kept beyond it) takes the
//!   stores down as it goes, and the next read that finds them down starts it again on its own
//!   runtime.
//!   A `FLUSHALL`/`FLUSHDB` (a null invalidation) empties every store.
//! - **Bounded age.** Every entry expires after [`NearCacheConfig::max_age`], and never later
//!   than the key's own TTL in Redis (read with `PTTL` in the same round trip as the value).
//! - **Sentinel**: the tracking connection goes to the server the client's pool uses, and only
//!   while the pool uses it: it goes up only if the pool did not move while it connected, the
//!   pool takes it down before moving, and on every ping it asks `ROLE`; a server that is no
//!   longer the primary takes it down and sends the pool back to the sentinels.
//! - **Cluster**: one tracking connection per primary serving slots (each broadcasts the
//!   writes made on it), all of one generation: losing any of them takes the near-cache down
//!   until all are back. Every [`TOPOLOGY_INTERVAL`] the client asks the cluster for its
//!   primaries (`CLUSTER NODES`); a different set (a failover, a node given slots) empties the
//!   near-cache and reconnects to the new set. A primary's replicas also send invalidations for
//!   the writes they replicate, so a promoted replica's writes are missed only when the old
//!   primary is cut off from it, and then for at most that interval.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, PushInfo, PushKind, Value};
use tokio::sync::mpsc;

use crate::client::{BackendKind, CLUSTER_SLOTS, Client, WeakClient};
use crate::config::Config;
use crate::error::{Error, ErrorKind, Result};

/// How often a cluster's tracker checks that it tracks every primary (see the module docs).
pub const TOPOLOGY_INTERVAL: Duration = Duration::from_secs(1);

/// Entries a near-cache keeps unless configured otherwise.
pub const DEFAULT_NEAR_CAPACITY: usize = 10_000;
/// Bytes of values a near-cache keeps unless configured otherwise: 64 MiB.
pub const DEFAULT_NEAR_MAX_BYTES: usize = 64 << 20;
/// Longest an entry is served from memory unless configured otherwise: 30 s.
pub const DEFAULT_NEAR_MAX_AGE: Duration = Duration::from_secs(30);
/// The `CLIENT SETNAME` of the tracking connection, to find it in `CLIENT LIST`.
pub const TRACKING_CONNECTION_NAME: &str = "rediskit-near";
/// How often the tracking connection is pinged.
pub const PING_INTERVAL: Duration = Duration::from_millis(100);
/// A near-cache serves only while the tracking connection answered a `PING` this recently: when
/// Redis stops answering (paused, partitioned: no reset tells us), the near-cache stops serving
/// within this time — and reads go to Redis and fail as unavailable — rather than after the
/// `PING`'s deadline.
pub const TRACKING_LEASE: Duration = Duration::from_millis(500);

/// Change counters per store: two reads of keys that share one are serialised against each
/// other's invalidations, so more counters mean fewer inserts refused for nothing.
const BUCKETS: usize = 1024;
/// Shards of a large store (small ones have one, so their capacity is exact).
const SHARDS: usize = 16;
/// A store with at least this capacity is sharded.
const SHARDED_FROM: usize = 1024;
/// Bytes counted per entry beyond its key and value (map slot, ring slot, timestamps).
const ENTRY_OVERHEAD: usize = 96;
/// First pause before reconnecting the tracking connection; doubles up to the connect timeout
/// (at least one second).
const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Pause before trying again when Redis refused tracking (no RESP3, an ACL without
/// `client|tracking`): that rarely changes soon.
const REFUSED_BACKOFF: Duration = Duration::from_secs(30);

/// Opts a cache namespace (or the session store) into the near-cache: see
/// [`CacheBuilder::near_cache`](crate::CacheBuilder::near_cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct NearCacheConfig {
    /// Entries kept at most; when full, a not-recently-used entry makes room (CLOCK).
    /// Default: [`DEFAULT_NEAR_CAPACITY`].
    pub capacity: usize,
    /// Bytes kept at most (values, keys and ~100 bytes of bookkeeping each); a value larger than
    /// this (divided among 16 shards for capacities of 1024 or more) is never kept.
    /// Default: [`DEFAULT_NEAR_MAX_BYTES`].
    pub max_bytes: usize,
    /// Longest an entry is served from memory, however quiet its key; an entry also never
    /// outlives its key's TTL in Redis. Default: [`DEFAULT_NEAR_MAX_AGE`].
    pub max_age: Duration,
}

impl Default for NearCacheConfig {
    fn default() -> Self {
        Self {
            capacity: DEFAULT_NEAR_CAPACITY,
            max_bytes: DEFAULT_NEAR_MAX_BYTES,
            max_age: DEFAULT_NEAR_MAX_AGE,
        }
    }
}

impl NearCacheConfig {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets [`NearCacheConfig::capacity`].
    pub fn capacity(mut self, entries: usize) -> Self {
        self.capacity = entries;
        self
    }

    /// Sets [`NearCacheConfig::max_bytes`].
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// Sets [`NearCacheConfig::max_age`].
    pub fn max_age(mut self, age: Duration) -> Self {
        self.max_age = age;
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !(1..=10_000_000).contains(&self.capacity) {
            return Err(Error::invalid(format!(
                "near-cache capacity must be between 1 and 10000000 entries, got {}",
                self.capacity
            )));
        }
        if self.max_bytes < 1024 {
            return Err(Error::invalid(format!(
                "near-cache max_bytes must be at least 1024, got {}",
                self.max_bytes
            )));
        }
        if self.max_age < Duration::from_millis(1) || self.max_age > Duration::from_secs(86_400) {
            return Err(Error::invalid(format!(
                "near-cache max_age must be between 1 ms and 24 h, got {:?}",
                self.max_age
            )));
        }
        Ok(())
    }
}

/// Counters of one near-cache since it was built; all zero when the near-cache is off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct NearStats {
    /// Reads answered from this process's memory, without Redis.
    pub hits: u64,
    /// Reads that went to Redis (not held, expired, or tracking not live).
    pub misses: u64,
    /// Keys Redis reported changed (whether or not they were held here).
    pub invalidations: u64,
    /// Times the whole near-cache was emptied: `FLUSHALL`/`FLUSHDB`, or the tracking connection
    /// lost.
    pub flushes: u64,
    /// Replies not kept because an invalidation of their key (or a flush) came while they were on
    /// their way: the race of client-side caching, caught.
    pub races: u64,
    /// Entries dropped to stay within the capacity or the byte budget.
    pub evictions: u64,
    /// Entries held now.
    pub entries: u64,
    /// Whether it serves reads now: tracking is up (and answered within the tracking lease) and
    /// this near-cache's prefix is tracked. False while it is off, reconnecting or following a
    /// failover, when every read goes to Redis.
    pub serving: bool,
}

/// Where the tracker stands: `epoch << 1 | live`. A store serves and accepts entries only while
/// live and at the epoch its prefix was tracked in.
const LIVE: u64 = 1;

fn is_live(state: u64) -> bool {
    state & LIVE == LIVE
}

fn epoch(state: u64) -> u64 {
    state >> 1
}

/// What the tracking task is told.
enum Msg {
    /// A store was added: track its prefix.
    Register(Weak<NearStore>),
    /// The connection of this generation was lost (from the push callback).
    Down(u64),
    /// The client's pool is moving to another server (Sentinel): reconnect to follow it.
    Retarget,
    /// The client was closed.
    Stop,
}

/// The tracking side shared by the stores of one [`Client`], its task and its push callback.
pub(crate) struct Shared {
    state: AtomicU64,
    stores: ArcSwap<Vec<Weak<NearStore>>>,
    /// To the tracking task; replaced when the task is started again.
    tx: Mutex<mpsc::UnboundedSender<Msg>>,
    /// Where and how the tracking task connects, to start it again.
    target: Target,
    settings: Settings,
    /// Set while a tracking task exists; cleared however it ends (returned, or dropped with its
    /// runtime), so that a read on another runtime can start it again.
    running: AtomicBool,
    /// Generation of the current tracking connection, so that the death notice of an old one
    /// cannot take down its successor.
    generation: AtomicU64,
    stopped: AtomicBool,
    /// When the tracking connection last answered, in µs since `origin`.
    last_pong: AtomicU64,
    origin: Instant,
}

impl Shared {
    fn new(target: Target, settings: Settings) -> Self {
        // The first task's sender takes this one's place when it starts.
        let (tx, _) = mpsc::unbounded_channel();
        Self {
            state: AtomicU64::new(0),
            stores: ArcSwap::from_pointee(Vec::new()),
            tx: Mutex::new(tx),
            target,
            settings,
            running: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            last_pong: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    fn send(&self, msg: Msg) {
        let tx = self.tx.lock().unwrap_or_else(PoisonError::into_inner);
        // No task to hear it: a registration is read from the store list by the next task,
        // and a stop is kept in `stopped`.
        let _ = tx.send(msg);
    }

    /// Starts the tracking task on the current runtime unless one exists or tracking was
    /// stopped. A task dies with its runtime; the next read on a live runtime starts another,
    /// which reconnects and tracks every store, as after a lost connection. False if none runs.
    fn ensure_running(self: &Arc<Self>) -> bool {
        if self.stopped.load(Ordering::SeqCst) {
            return false;
        }
        // A load first: every read that misses while the near-cache is down comes here.
        if self.running.load(Ordering::SeqCst) || self.running.swap(true, Ordering::SeqCst) {
            return true;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.running.store(false, Ordering::SeqCst);
            return false;
        };
        let (tx, rx) = mpsc::unbounded_channel();
        *self.tx.lock().unwrap_or_else(PoisonError::into_inner) = tx;
        let guard = RunningGuard(Arc::downgrade(self));
        let task = run(Arc::downgrade(self), self.target.clone(), self.settings, rx);
        runtime.spawn(async move {
            let _guard = guard;
            task.await;
        });
        true
    }

    fn micros(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.origin).as_micros() as u64
    }

    /// The tracking connection answered just now.
    fn pong(&self) {
        self.last_pong
            .store(self.micros(Instant::now()), Ordering::SeqCst);
    }

    /// The tracking connection answered within [`TRACKING_LEASE`] of `now`.
    fn fresh(&self, now: Instant) -> bool {
        let last = self.last_pong.load(Ordering::SeqCst);
        self.micros(now).saturating_sub(last) <= TRACKING_LEASE.as_micros() as u64
    }

    fn live_stores(&self) -> Vec<Arc<NearStore>> {
        self.stores
            .load()
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Not live any more: a new epoch, and every store emptied. Returns the new state.
    fn down(&self) -> u64 {
        let mut current = self.state.load(Ordering::SeqCst);
        let next = loop {
            let next = (epoch(current) + 1) << 1;
            match self
                .state
                .compare_exchange(current, next, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => break next,
                Err(actual) => current = actual,
            }
        };
        // The state changed first: an insert that checks it under a shard lock after this point
        // is refused, and one that got in before is cleared below.
        for store in self.live_stores() {
            store.clear(is_live(current));
        }
        next
    }

    /// Live again at the epoch after `base`, with `tracked` stores ready, unless the state moved
    /// since `base` (the connection died meanwhile).
    fn try_up(&self, base: u64, tracked: &[Arc<NearStore>]) -> bool {
        let next = ((epoch(base) + 1) << 1) | LIVE;
        self.pong();
        for store in tracked {
            store.ready_epoch.store(epoch(next), Ordering::SeqCst);
        }
        self.state
            .compare_exchange(base, next, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// An invalidation push: `[keys]`, or null for "everything" (`FLUSHALL`, `FLUSHDB`).
    fn on_invalidate(&self, data: &[Value]) {
        let stores = self.live_stores();
        for value in data {
            match value {
                Value::Array(keys) => {
                    for key in keys {
                        match key {
                            Value::BulkString(bytes) => {
                                // Our keys are UTF-8; a key that is not is none of ours.
                                if let Ok(key) = std::str::from_utf8(bytes) {
                                    for store in &stores {
                                        if key.starts_with(store.prefix.as_str()) {
                                            store.invalidate(key, true);
                                        }
                                    }
                                }
                            }
                            Value::SimpleString(key) => {
                                for store in &stores {
                                    if key.starts_with(store.prefix.as_str()) {
                                        store.invalidate(key, true);
                                    }
                                }
                            }
                            // Anything we cannot read may have named one of our keys.
                            _ => stores.iter().for_each(|store| store.clear(true)),
                        }
                    }
                }
                _ => stores.iter().for_each(|store| store.clear(true)),
            }
        }
    }

    fn on_push(&self, generation: u64, info: PushInfo) {
        match info.kind {
            PushKind::Invalidate => self.on_invalidate(&info.data),
            PushKind::Disconnection if self.generation.load(Ordering::SeqCst) == generation => {
                self.down();
                self.send(Msg::Down(generation));
            }
            _ => {}
        }
    }
}

/// When the tracking task ends, however it ends: the stores stop serving at once (nothing
/// applies invalidations any more: without this they would serve until the lease ran out), and
/// [`Shared::running`] is cleared.
struct RunningGuard(Weak<Shared>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        if let Some(shared) = self.0.upgrade() {
            shared.down();
            shared.running.store(false, Ordering::SeqCst);
        }
    }
}

/// Where the tracking connection goes.
#[derive(Clone)]
pub(crate) enum Target {
    /// One server, always (plain Redis).
    Fixed(Box<redis::Client>),
    /// Wherever the client's pool is (Sentinel). The tracker goes up only while the pool still
    /// uses the server it connected to and that server says it is a primary (`ROLE`), checks
    /// the role again on every ping, and is taken down before the pool moves: a tracker left
    /// on a server the pool no longer reads from (and which may not replicate from the new
    /// primary, say across a partition) would miss the writes made there.
    Primary(WeakClient),
    /// Every primary of the client's cluster, re-read every [`TOPOLOGY_INTERVAL`].
    Cluster(WeakClient),
}

/// The near-cache machinery of one [`Client`]: the tracking task and the stores it feeds.
pub(crate) struct Tracker {
    shared: Arc<Shared>,
}

/// How the tracking task connects and how long it waits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Settings {
    pub(crate) connect_timeout: Duration,
    pub(crate) command_timeout: Duration,
}

impl Settings {
    fn of(config: &Config) -> Self {
        Self {
            connect_timeout: config.connect_timeout,
            command_timeout: config.command_timeout,
        }
    }
}

impl Tracker {
    /// The tracker for `client`'s backend: tracking at the configured address for plain Redis,
    /// none for the embedded backend (already in-process) or when the target cannot be built.
    fn for_client(client: &Client, url: Option<&str>) -> Option<Arc<Self>> {
        match client.backend() {
            BackendKind::Memory => None,
            BackendKind::Cluster => Self::start(
                Target::Cluster(client.downgrade()),
                Settings::of(client.config()),
            ),
            BackendKind::Sentinel => Self::start(
                Target::Primary(client.downgrade()),
                Settings::of(client.config()),
            ),
            BackendKind::Redis => {
                let mut config = client.config().clone();
                if let Some(url) = url {
                    config.url = url.to_owned();
                }
                match target(&config) {
                    Ok(target) => {
                        Self::start(Target::Fixed(Box::new(target)), Settings::of(&config))
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "near-cache disabled: no tracking target");
                        None
                    }
                }
            }
        }
    }

    /// Starts tracking through `target` on the current Tokio runtime.
    pub(crate) fn start(target: Target, settings: Settings) -> Option<Arc<Self>> {
        let shared = Arc::new(Shared::new(target, settings));
        if !shared.ensure_running() {
            tracing::warn!("near-cache disabled: not within a Tokio runtime");
            return None;
        }
        Some(Arc::new(Self { shared }))
    }

    /// A new store for keys starting with `prefix`; it serves once Redis tracks the prefix.
    fn store(&self, prefix: String, config: NearCacheConfig) -> Arc<NearStore> {
        let store = Arc::new(NearStore::new(self.shared.clone(), prefix, config));
        let weak = Arc::downgrade(&store);
        self.shared.stores.rcu(|stores| {
            let mut stores: Vec<_> = stores
                .iter()
                .filter(|store| store.strong_count() > 0)
                .cloned()
                .collect();
            stores.push(weak.clone());
            stores
        });
        self.shared.send(Msg::Register(weak));
        store
    }

    /// The client's pool is about to move to another server: every store is emptied and refuses
    /// entries until tracking is up again where the pool went.
    pub(crate) fn retarget(&self) {
        self.shared.down();
        self.shared.send(Msg::Retarget);
    }

    /// Stops tracking for good (the client was closed): every store is emptied and stays off.
    pub(crate) fn stop(&self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.down();
        self.shared.send(Msg::Stop);
    }
}

/// The RESP3 client of the tracking connection, from `config` (TLS and credentials included).
fn target(config: &Config) -> Result<redis::Client> {
    resp3_client(config, config.connection_info()?)
}

/// A RESP3 client for `info`, with `config`'s TLS settings.
fn resp3_client(config: &Config, info: redis::ConnectionInfo) -> Result<redis::Client> {
    let settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    crate::client::redis_client(config, info.set_redis_settings(settings))
}

/// The near-cache store for keys under `prefix`, or `None` when `client` cannot have one (the
/// embedded backend, no runtime). Starts the client's tracker on first use.
pub(crate) fn store_for(
    client: &Client,
    prefix: String,
    config: NearCacheConfig,
) -> Option<Arc<NearStore>> {
    let tracker = client
        .near_tracker()
        .get_or_init(|| Tracker::for_client(client, None))
        .as_ref()?;
    Some(tracker.store(prefix, config))
}

impl Client {
    /// Test support (not a stable API): track near-cache invalidations through `url` (the same
    /// server, reached another way — e.g. not through a fault proxy that the pool goes through)
    /// instead of the configured URL. Must come before the first near-cache is built; fails
    /// otherwise, and for the embedded backend.
    #[doc(hidden)]
    pub fn set_near_cache_target(&self, url: &str) -> Result<()> {
        let mut installed = false;
        self.near_tracker().get_or_init(|| {
            installed = true;
            Tracker::for_client(self, Some(url))
        });
        if installed && self.near_tracker().get().is_some_and(Option::is_some) {
            Ok(())
        } else {
            Err(Error::invalid(
                "the near-cache tracker has already started, or this backend has none",
            ))
        }
    }
}

/// The tracking task: connect, track, apply, and start over when the connection is lost.
async fn run(
    shared: Weak<Shared>,
    target: Target,
    settings: Settings,
    mut rx: mpsc::UnboundedReceiver<Msg>,
) {
    let max_backoff = settings.connect_timeout.max(Duration::from_secs(1));
    let mut backoff = MIN_BACKOFF;
    let mut failures = 0u32;
    loop {
        let mut pause = backoff;
        let (base, generation) = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            if shared.stopped.load(Ordering::SeqCst) {
                return;
            }
            let base = shared.down();
            (base, shared.generation.fetch_add(1, Ordering::SeqCst) + 1)
        };
        match connect(&shared, &target, settings, generation).await {
            Ok(tracking) => {
                let Some(strong) = shared.upgrade() else {
                    return;
                };
                // Following a Sentinel pool: up only if it did not move while we connected (it
                // takes the tracker down before it moves, so checking first, then going up only
                // if the state did not change, leaves no gap).
                let (follow, cluster) = match &target {
                    Target::Primary(client) => (Some(client), None),
                    Target::Cluster(client) => (None, Some((client, tracking.primaries))),
                    Target::Fixed(_) => (None, None),
                };
                let same_pool = match (follow, tracking.pool) {
                    (Some(client), Some(id)) => client.upgrade().is_some_and(|c| c.pool_is(id)),
                    _ => true,
                };
                if same_pool && strong.try_up(base, &tracking.stores) {
                    if failures > 0 {
                        tracing::info!("near-cache tracking connection is back");
                    }
                    failures = 0;
                    backoff = MIN_BACKOFF;
                    drop(strong);
                    let serving = Serving {
                        generation,
                        settings,
                        follow,
                        cluster,
                    };
                    let (connections, prefixes) = (tracking.connections, tracking.prefixes);
                    let exit = serve(&shared, connections, prefixes, &serving, &mut rx).await;
                    // Down at once, not after the pause below: a silent server or a new cluster
                    // primary gives no other signal that the stores must stop serving.
                    if let Some(shared) = shared.upgrade() {
                        shared.down();
                    }
                    match exit {
                        Exit::Lost => tracing::warn!(
                            "near-cache tracking connection lost: near-caches emptied, reads go \
                             to Redis until it is back"
                        ),
                        Exit::Moved => tracing::info!(
                            "near-cache emptied: Redis's primaries changed; tracking follows them"
                        ),
                        Exit::Stop => return,
                    }
                }
            }
            Err(err) => {
                failures += 1;
                if !err.is_unavailable() {
                    pause = REFUSED_BACKOFF;
                }
                // Loud once, then quiet: a Redis without RESP3 or an ACL without
                // `client|tracking` would otherwise fill the log.
                if failures == 1 {
                    tracing::warn!(
                        error = %err,
                        "near-cache tracking is not available: reads go to Redis; retrying"
                    );
                } else {
                    tracing::debug!(error = %err, "near-cache tracking still not available");
                }
            }
        }
        // Wait before reconnecting, still obeying `Stop`.
        let sleep = tokio::time::sleep(pause);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                msg = rx.recv() => match msg {
                    None | Some(Msg::Stop) => return,
                    // Registrations are picked up from the store list when connecting.
                    Some(_) => {}
                },
            }
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

enum Exit {
    Lost,
    /// The pool moved, or the server stopped being a primary (Sentinel).
    Moved,
    Stop,
}

/// What the serving loop needs to know of its connections.
struct Serving<'a> {
    generation: u64,
    settings: Settings,
    /// The client whose pool the connection follows (Sentinel): the server's role is checked
    /// on every ping.
    follow: Option<&'a WeakClient>,
    /// The client whose cluster is tracked, and the primaries tracked: the cluster's primaries
    /// are compared with them every [`TOPOLOGY_INTERVAL`].
    cluster: Option<(&'a WeakClient, Vec<(String, u16)>)>,
}

/// The tracking connections of one generation (one, except on a cluster: one per primary).
struct Tracking {
    connections: Vec<MultiplexedConnection>,
    stores: Vec<Arc<NearStore>>,
    prefixes: HashSet<String>,
    /// Following a Sentinel pool: the id of the pool whose server was connected to.
    pool: Option<u64>,
    /// On a cluster: the primaries connected to, as the cluster named them.
    primaries: Vec<(String, u16)>,
}

/// Opens the tracking connections and tracks the prefix of every live store on each. Following
/// a Sentinel pool, it connects to the pool's server and makes sure that is a primary; on a
/// cluster, to every primary serving slots.
async fn connect(
    shared: &Weak<Shared>,
    target: &Target,
    settings: Settings,
    generation: u64,
) -> Result<Tracking> {
    let (servers, pool, primaries) = match target {
        Target::Fixed(server) => (vec![server.as_ref().clone()], None, Vec::new()),
        Target::Primary(client) => {
            let client = client.upgrade().ok_or_else(Error::closed)?;
            let (id, (host, port)) = client.current_primary().await?;
            let info = client.config().connection_info_at(host, port)?;
            (
                vec![resp3_client(client.config(), info)?],
                Some(id),
                Vec::new(),
            )
        }
        Target::Cluster(client) => {
            let client = client.upgrade().ok_or_else(Error::closed)?;
            let (primaries, slots) = client.cluster_view().await?;
            // Mid-failover a dead primary's slots are nobody's yet: tracking the others only
            // would miss the writes of whichever replica takes over. Wait until it has.
            if slots < CLUSTER_SLOTS {
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "the cluster's live primaries serve {slots} of {CLUSTER_SLOTS} slots; \
                         waiting for a failover"
                    ),
                ));
            }
            let servers = primaries
                .iter()
                .map(|(host, port)| {
                    let info = client.config().connection_info_at(host.clone(), *port)?;
                    resp3_client(client.config(), info)
                })
                .collect::<Result<Vec<_>>>()?;
            (servers, None, primaries)
        }
    };
    let mut connections = futures_util::future::try_join_all(
        servers
            .iter()
            .map(|server| open(shared, server, settings, generation)),
    )
    .await?;
    if pool.is_some() && !is_primary(&mut connections[0], settings).await? {
        // The pool points at a replica (reads still work there, so it would not notice by
        // itself): have it ask the sentinels again.
        if let Target::Primary(client) = target
            && let Some(client) = client.upgrade()
        {
            client.follow_primary();
        }
        return Err(Error::new(
            ErrorKind::Unavailable,
            "the pool's server is not a primary (any more); waiting for the sentinels",
        ));
    }
    let stores = shared
        .upgrade()
        .map(|shared| shared.live_stores())
        .unwrap_or_default();
    let prefixes: HashSet<String> = stores.iter().map(|store| store.prefix.clone()).collect();
    if !prefixes.is_empty() {
        let mut command = redis::cmd("CLIENT");
        command.arg("TRACKING").arg("ON").arg("BCAST");
        for prefix in &prefixes {
            command.arg("PREFIX").arg(prefix);
        }
        on_each(&connections, &command, settings).await?;
    }
    Ok(Tracking {
        connections,
        stores,
        prefixes,
        pool,
        primaries,
    })
}

/// One RESP3 tracking connection to `server`, its pushes applied to `shared` as `generation`.
async fn open(
    shared: &Weak<Shared>,
    server: &redis::Client,
    settings: Settings,
    generation: u64,
) -> Result<MultiplexedConnection> {
    let weak = shared.clone();
    let callback = move |info: PushInfo| -> std::result::Result<(), std::convert::Infallible> {
        if let Some(shared) = weak.upgrade() {
            shared.on_push(generation, info);
        }
        Ok(())
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(settings.connect_timeout))
        // Each call below has its own deadline: no second timer.
        .set_response_timeout(None)
        .set_push_sender(callback);
    let deadline = settings.connect_timeout + settings.command_timeout;
    let mut connection = tokio::time::timeout(
        deadline,
        server.get_multiplexed_async_connection_with_config(&config),
    )
    .await
    .map_err(|_| Error::timeout("connecting the near-cache tracking connection", deadline))??;
    // Only for people reading `CLIENT LIST`: an ACL that refuses it changes nothing.
    let _ = call(
        &mut connection,
        redis::cmd("CLIENT")
            .arg("SETNAME")
            .arg(TRACKING_CONNECTION_NAME),
        settings,
    )
    .await;
    Ok(connection)
}

/// `command` on every tracking connection at once; the first error if any failed.
async fn on_each(
    connections: &[MultiplexedConnection],
    command: &redis::Cmd,
    settings: Settings,
) -> Result<()> {
    futures_util::future::try_join_all(connections.iter().map(|connection| {
        let mut connection = connection.clone();
        async move { call(&mut connection, command, settings).await }
    }))
    .await
    .map(drop)
}

/// Whether the server says it is a primary (`ROLE`), under the command deadline.
async fn is_primary(connection: &mut MultiplexedConnection, settings: Settings) -> Result<bool> {
    let deadline = settings.command_timeout;
    let role: Vec<Value> =
        tokio::time::timeout(deadline, redis::cmd("ROLE").query_async(connection))
            .await
            .map_err(|_| Error::timeout("near-cache tracking", deadline))?
            .map_err(Error::from)?;
    Ok(crate::client::says_primary(&role))
}

/// One command on the tracking connection, under the command deadline.
async fn call(
    connection: &mut MultiplexedConnection,
    command: &redis::Cmd,
    settings: Settings,
) -> Result<()> {
    let deadline = settings.command_timeout;
    tokio::time::timeout(deadline, command.query_async::<()>(connection))
        .await
        .map_err(|_| Error::timeout("near-cache tracking", deadline))?
        .map_err(Error::from)
}

/// While the connection lives: track new prefixes, ping, and notice its death.
async fn serve(
    shared: &Weak<Shared>,
    connections: Vec<MultiplexedConnection>,
    mut tracked: HashSet<String>,
    serving: &Serving<'_>,
    rx: &mut mpsc::UnboundedReceiver<Msg>,
) -> Exit {
    let Serving {
        generation,
        settings,
        follow,
        ref cluster,
    } = *serving;
    let mut topology_checked = Instant::now();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                None | Some(Msg::Stop) => return Exit::Stop,
                Some(Msg::Down(lost)) if lost == generation => return Exit::Lost,
                Some(Msg::Down(_)) => {}
                Some(Msg::Retarget) => return Exit::Moved,
                Some(Msg::Register(store)) => {
                    let (Some(store), Some(strong)) = (store.upgrade(), shared.upgrade()) else {
                        continue;
                    };
                    // Read before the command: if the connection dies meanwhile, the epoch moves
                    // on and the store is not ready in the new one.
                    let state = strong.state.load(Ordering::SeqCst);
                    drop(strong);
                    if !tracked.contains(&store.prefix) {
                        let mut command = redis::cmd("CLIENT");
                        command
                            .arg("TRACKING")
                            .arg("ON")
                            .arg("BCAST")
                            .arg("PREFIX")
                            .arg(&store.prefix);
                        match on_each(&connections, &command, settings).await {
                            Ok(()) => {
                                tracked.insert(store.prefix.clone());
                            }
                            Err(err) if err.is_unavailable() => return Exit::Lost,
                            Err(err) => {
                                tracing::warn!(
                                    error = %err,
                                    prefix = %store.prefix,
                                    "near-cache disabled for this prefix: Redis refused to track it"
                                );
                                continue;
                            }
                        }
                    }
                    if is_live(state) {
                        store.ready_epoch.store(epoch(state), Ordering::SeqCst);
                    }
                }
            },
            _ = ping.tick() => {
                let answered = match follow {
                    None => on_each(&connections, &redis::cmd("PING"), settings)
                        .await
                        .map(|()| true),
                    Some(_) => is_primary(&mut connections[0].clone(), settings).await,
                };
                match answered {
                    Ok(true) => {}
                    // Demoted with this connection still open: stop serving at once, and move
                    // the pool along without waiting for a write to fail.
                    Ok(false) => {
                        if let Some(client) = follow.and_then(WeakClient::upgrade) {
                            client.follow_primary();
                        }
                        return Exit::Moved;
                    }
                    Err(_) => return Exit::Lost,
                }
                if let Some(shared) = shared.upgrade() {
                    shared.pong();
                }
                if let Some((client, tracked)) = cluster
                    && topology_checked.elapsed() >= TOPOLOGY_INTERVAL
                {
                    topology_checked = Instant::now();
                    let Some(client) = client.upgrade() else {
                        return Exit::Stop;
                    };
                    match client.cluster_view().await {
                        Ok((primaries, slots)) if primaries != *tracked || slots < CLUSTER_SLOTS => {
                            return Exit::Moved;
                        }
                        Ok(_) => {}
                        // The pings above tell whether the tracked primaries are still there.
                        Err(err) => tracing::debug!(
                            error = %err,
                            "near-cache: could not read the cluster's primaries"
                        ),
                    }
                }
            }
        }
    }
}

/// A read's permission to keep its reply: taken before the read is sent, honoured only if no
/// invalidation of its key (and no flush) came in between.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    state: u64,
    hash: u64,
    changes: u64,
    /// When it was taken, before the read was sent: an entry's age counts from here, since the
    /// TTL the read brings back was Redis's then, not when the reply arrives.
    issued: Instant,
}

/// The entries under one prefix (one cache namespace, or the sessions), with their counters.
pub(crate) struct NearStore {
    shared: Arc<Shared>,
    prefix: String,
    config: NearCacheConfig,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
    shard_entries: usize,
    shard_bytes: usize,
    /// The tracker epoch in which Redis tracks this prefix; `u64::MAX` until it does.
    ready_epoch: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
    races: AtomicU64,
    evictions: AtomicU64,
}

#[derive(Default)]
struct Shard {
    map: HashMap<Arc<str>, Slot>,
    /// Keys in insertion order, for CLOCK eviction; an entry whose stamp no longer matches its
    /// slot is a leftover of a removed key.
    ring: VecDeque<(Arc<str>, u64)>,
    next_stamp: u64,
    entries: usize,
    bytes: usize,
    /// The change counters of the buckets this shard holds.
    changes: Vec<u64>,
}

/// Everything held for one Redis key: its value, or for a hash, some of its fields.
struct Slot {
    stamp: u64,
    referenced: bool,
    items: Vec<Item>,
}

struct Item {
    field: Box<str>,
    value: Arc<[u8]>,
    expires: Instant,
}

impl Item {
    fn size(&self, key: &str) -> usize {
        key.len() + self.field.len() + self.value.len() + ENTRY_OVERHEAD
    }
}

impl Shard {
    fn remove(&mut self, key: &str) {
        if let Some(slot) = self.map.remove(key) {
            self.entries -= slot.items.len();
            self.bytes -= slot.items.iter().map(|item| item.size(key)).sum::<usize>();
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.ring.clear();
        self.entries = 0;
        self.bytes = 0;
        for counter in &mut self.changes {
            *counter = counter.wrapping_add(1);
        }
    }

    /// Drops not-recently-used keys until within budget; returns how many entries went.
    fn evict(&mut self, max_entries: usize, max_bytes: usize) -> u64 {
        let mut evicted = 0;
        while self.entries > max_entries || self.bytes > max_bytes {
            let Some((key, stamp)) = self.ring.pop_front() else {
                break;
            };
            let Some(slot) = self.map.get_mut(&*key) else {
                continue;
            };
            if slot.stamp != stamp {
                continue;
            }
            if slot.referenced {
                slot.referenced = false;
                self.ring.push_back((key, stamp));
                continue;
            }
            evicted += slot.items.len() as u64;
            self.remove(&key);
        }
        // Leftovers of removed keys pile up in the ring: sweep them now and then.
        if self.ring.len() > 2 * self.map.len() + 64 {
            let map = &self.map;
            self.ring
                .retain(|(key, stamp)| map.get(&**key).is_some_and(|slot| slot.stamp == *stamp));
        }
        evicted
    }
}

impl std::fmt::Debug for NearStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NearStore")
            .field("prefix", &self.prefix)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl NearStore {
    fn new(shared: Arc<Shared>, prefix: String, config: NearCacheConfig) -> Self {
        let shards = if config.capacity >= SHARDED_FROM {
            SHARDS
        } else {
            1
        };
        Self {
            shared,
            prefix,
            config,
            hasher: RandomState::new(),
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        changes: vec![0; BUCKETS / shards],
                        ..Shard::default()
                    })
                })
                .collect(),
            shard_entries: config.capacity.div_ceil(shards),
            shard_bytes: config.max_bytes / shards,
            ready_epoch: AtomicU64::new(u64::MAX),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            races: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The tracker's state when this store may serve and keep entries.
    fn ready(&self, now: Instant) -> Option<u64> {
        let state = self.shared.state.load(Ordering::SeqCst);
        (is_live(state)
            && self.ready_epoch.load(Ordering::SeqCst) == epoch(state)
            && self.shared.fresh(now))
        .then_some(state)
    }

    fn locate(&self, key: &str) -> (u64, MutexGuard<'_, Shard>, usize) {
        let hash = self.hasher.hash_one(key);
        let shards = self.shards.len();
        let shard = (hash % shards as u64) as usize;
        let bucket = ((hash >> 32) as usize) % (BUCKETS / shards);
        // A panic under this lock cannot leave a shard half-updated in a way that serves a wrong
        // value (counters only move forward, removals are whole), so poison is ignored.
        let guard = self.shards[shard]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        (hash, guard, bucket)
    }

    /// The bytes held for `field` of `key` (`""` for a plain value), if any and still fresh.
    pub(crate) fn get(&self, key: &str, field: &str) -> Option<Arc<[u8]>> {
        let now = Instant::now();
        if self.ready(now).is_none() {
            self.misses.fetch_add(1, Ordering::Relaxed);
            // Not serving: perhaps the tracking task died with the runtime it ran on.
            self.shared.ensure_running();
            return None;
        }
        let (_, mut shard, _) = self.locate(key);
        let found = shard.map.get_mut(key).and_then(|slot| {
            let item = slot.items.iter().find(|item| &*item.field == field)?;
            if item.expires <= now {
                return None;
            }
            slot.referenced = true;
            Some(item.value.clone())
        });
        drop(shard);
        match &found {
            Some(_) => self.hits.fetch_add(1, Ordering::Relaxed),
            None => self.misses.fetch_add(1, Ordering::Relaxed),
        };
        found
    }

    /// A ticket to keep the reply of a read of `key` about to be sent; `None` while this store
    /// is not live (then the reply must not be kept).
    pub(crate) fn ticket(&self, key: &str) -> Option<Ticket> {
        let issued = Instant::now();
        let state = self.ready(issued)?;
        let (hash, shard, bucket) = self.locate(key);
        Some(Ticket {
            state,
            hash,
            changes: shard.changes[bucket],
            issued,
        })
    }

    /// Keeps `value` for `field` of `key` for at most the max age (and `ttl`, the key's time
    /// left in Redis), both counted from when `ticket` was taken, if `ticket` is still good.
    /// True if kept.
    pub(crate) fn insert(
        &self,
        ticket: Ticket,
        key: &str,
        field: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> bool {
        let age = ttl.map_or(self.config.max_age, |ttl| ttl.min(self.config.max_age));
        // Counted from the ticket: a reply that took long to come (a slow link) is kept only
        // for what is left of the key's time in Redis, not the whole of it again.
        let expires = ticket.issued + age;
        if expires <= Instant::now() {
            return false;
        }
        let (hash, mut shard, bucket) = self.locate(key);
        debug_assert_eq!(hash, ticket.hash);
        // Under the shard lock, which invalidations and flushes take too: either they came
        // before (and the counters moved), or they come after and remove what this inserts.
        if self.shared.state.load(Ordering::SeqCst) != ticket.state
            || self.ready_epoch.load(Ordering::SeqCst) != epoch(ticket.state)
            || shard.changes[bucket] != ticket.changes
        {
            drop(shard);
            self.races.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let item = Item {
            field: field.into(),
            value: value.into(),
            expires,
        };
        let size = item.size(key);
        if size > self.shard_bytes {
            return false;
        }
        let shard = &mut *shard;
        match shard.map.get_mut(key) {
            Some(slot) => {
                if let Some(old) = slot.items.iter_mut().find(|old| old.field == item.field) {
                    shard.bytes -= old.size(key);
                    *old = item;
                } else {
                    slot.items.push(item);
                    shard.entries += 1;
                }
                shard.bytes += size;
            }
            None => {
                let key: Arc<str> = key.into();
                let stamp = shard.next_stamp;
                shard.next_stamp += 1;
                shard.ring.push_back((key.clone(), stamp));
                shard.map.insert(
                    key,
                    Slot {
                        stamp,
                        referenced: false,
                        items: vec![item],
                    },
                );
                shard.entries += 1;
                shard.bytes += size;
            }
        }
        let evicted = shard.evict(self.shard_entries, self.shard_bytes);
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Ordering::Relaxed);
        }
        true
    }

    /// Drops whatever is held for `key` and refuses the replies of reads of it already under
    /// way. `from_redis` counts it as an invalidation message (own writes are not counted).
    pub(crate) fn invalidate(&self, key: &str, from_redis: bool) {
        let (_, mut shard, bucket) = self.locate(key);
        shard.changes[bucket] = shard.changes[bucket].wrapping_add(1);
        shard.remove(key);
        drop(shard);
        if from_redis {
            self.invalidations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Empties the store and refuses the replies of every read under way.
    fn clear(&self, count: bool) {
        for shard in self.shards.iter() {
            shard
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clear();
        }
        if count {
            self.flushes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The counters now.
    pub(crate) fn stats(&self) -> NearStats {
        let entries = self
            .shards
            .iter()
            .map(|shard| {
                shard
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .entries as u64
            })
            .sum();
        NearStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            invalidations: self.invalidations.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            races: self.races.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            entries,
            serving: self.ready(Instant::now()).is_some(),
        }
    }
}

/// The counters of an optional store: zeros when there is none.
pub(crate) fn stats_of(store: Option<&Arc<NearStore>>) -> NearStats {
    store.map(|store| store.stats()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A store on a tracker with no connection, made live by hand.
    fn live_store(config: NearCacheConfig) -> (Arc<Shared>, Arc<NearStore>) {
        let target = Target::Fixed(Box::new(
            redis::Client::open("redis://127.0.0.1:1/").unwrap(),
        ));
        let settings = Settings {
            connect_timeout: Duration::from_millis(100),
            command_timeout: Duration::from_millis(100),
        };
        let shared = Arc::new(Shared::new(target, settings));
        // No tracking task: these tests drive the state by hand, and none may start.
        shared.running.store(true, Ordering::SeqCst);
        let store = Arc::new(NearStore::new(shared.clone(), "p:".into(), config));
        shared.stores.store(Arc::new(vec![Arc::downgrade(&store)]));
        let base = shared.down();
        assert!(shared.try_up(base, std::slice::from_ref(&store)));
        (shared, store)
    }

    fn keys(names: &[&str]) -> Vec<Value> {
        vec![Value::Array(
            names
                .iter()
                .map(|name| Value::BulkString(name.as_bytes().to_vec()))
                .collect(),
        )]
    }

    /// A reply inserted with a good ticket is served; an invalidation drops it.
    #[test]
    fn insert_get_invalidate() {
        let (shared, store) = live_store(NearCacheConfig::default());
        let ticket = store.ticket("p:a").unwrap();
        assert!(store.insert(ticket, "p:a", "", b"one", None));
        assert_eq!(store.get("p:a", "").as_deref(), Some(&b"one"[..]));
        shared.on_invalidate(&keys(&["p:a", "other:a"]));
        assert_eq!(store.get("p:a", ""), None);
        let stats = store.stats();
        assert_eq!((stats.hits, stats.misses, stats.invalidations), (1, 1, 1));
    }

    /// The race of client-side caching: an invalidation that arrives between the ticket (taken
    /// before the read is sent) and the insert (after its reply) keeps the old reply out.
    #[test]
    fn invalidation_between_read_and_insert_prevents_the_insert() {
        let (shared, store) = live_store(NearCacheConfig::default());
        let ticket = store.ticket("p:a").unwrap();
        // ... the GET is on its way; another client writes; its invalidation arrives first:
        shared.on_invalidate(&keys(&["p:a"]));
        // ... then the reply, holding the value from before the write:
        assert!(!store.insert(ticket, "p:a", "", b"old", None));
        assert_eq!(store.get("p:a", ""), None);
        assert_eq!(store.stats().races, 1);
        // A read that starts after the invalidation keeps its reply.
        let ticket = store.ticket("p:a").unwrap();
        assert!(store.insert(ticket, "p:a", "", b"new", None));
        assert_eq!(store.get("p:a", "").as_deref(), Some(&b"new"[..]));
    }

    /// A null invalidation (FLUSHALL) empties the store and refuses replies under way.
    #[test]
    fn null_invalidation_flushes() {
        let (shared, store) = live_store(NearCacheConfig::default());
        let ticket = store.ticket("p:a").unwrap();
        assert!(store.insert(ticket, "p:a", "", b"one", None));
        let in_flight = store.ticket("p:b").unwrap();
        shared.on_invalidate(&[Value::Nil]);
        assert_eq!(store.get("p:a", ""), None);
        assert!(!store.insert(in_flight, "p:b", "", b"two", None));
        assert_eq!(store.stats().flushes, 1);
    }

    /// While the tracking connection is down nothing is served or kept, including replies of
    /// reads that started before; once up again, fresh tickets work.
    #[test]
    fn down_flushes_and_refuses_until_up() {
        let (shared, store) = live_store(NearCacheConfig::default());
        let ticket = store.ticket("p:a").unwrap();
        assert!(store.insert(ticket, "p:a", "", b"one", None));
        let in_flight = store.ticket("p:b").unwrap();
        let base = shared.down();
        assert_eq!(store.get("p:a", ""), None);
        assert!(store.ticket("p:a").is_none());
        assert!(!store.insert(in_flight, "p:b", "", b"two", None));
        assert_eq!(store.stats().entries, 0);
        assert!(shared.try_up(base, std::slice::from_ref(&store)));
        let ticket = store.ticket("p:a").unwrap();
        assert!(store.insert(ticket, "p:a", "", b"three", None));
        assert_eq!(store.get("p:a", "").as_deref(), Some(&b"three"[..]));
    }

    /// A tracking connection that stops answering stops the store from serving after the lease,
    /// and an answer renews it.
    #[test]
    fn serves_only_while_the_tracking_connection_answers() {
        let (shared, store) = live_store(NearCacheConfig::default());
        let ticket = store.ticket("p:a").unwrap();
        assert!(store.insert(ticket, "p:a", "", b"one", None));
        std::thread::sleep(TRACKING_LEASE + Duration::from_millis(20));
        assert!(store.get("p:a", "").is_none());
        assert!(store.ticket("p:b").is_none());
        shared.pong();
        assert_eq!(store.get("p:a", "").as_deref(), Some(&b"one"[..]));
    }

    /// A connection that died while tracking was being switched on does not come up.
    #[test]
    fn up_fails_if_the_state_moved() {
        let (shared, store) = live_store(NearCacheConfig::default());
        let base = shared.down();
        shared.down();
        assert!(!shared.try_up(base, std::slice::from_ref(&store)));
        assert!(store.ticket("p:a").is_none());
    }

    /// Entries expire after the max age, and never outlive the key's TTL in Redis.
    #[test]
    fn entries_expire() {
        let config = NearCacheConfig::default().max_age(Duration::from_millis(30));
        let (_shared, store) = live_store(config);
        let ticket = store.ticket("p:a").unwrap();
        assert!(store.insert(ticket, "p:a", "", b"one", None));
        let ticket = store.ticket("p:b").unwrap();
        assert!(store.insert(ticket, "p:b", "", b"two", Some(Duration::from_millis(5))));
        std::thread::sleep(Duration::from_millis(10));
        assert!(store.get("p:a", "").is_some());
        assert!(store.get("p:b", "").is_none());
        std::thread::sleep(Duration::from_millis(25));
        assert!(store.get("p:a", "").is_none());
    }

    /// Fields of one key are held apart and invalidated together with their key.
    #[test]
    fn fields_go_with_their_key() {
        let (shared, store) = live_store(NearCacheConfig::default());
        for field in ["s1", "s2"] {
            let ticket = store.ticket("p:{u}").unwrap();
            assert!(store.insert(ticket, "p:{u}", field, field.as_bytes(), None));
        }
        assert_eq!(store.get("p:{u}", "s2").as_deref(), Some(&b"s2"[..]));
        assert_eq!(store.get("p:{u}", "s3"), None);
        shared.on_invalidate(&keys(&["p:{u}"]));
        assert_eq!(store.get("p:{u}", "s1"), None);
        assert_eq!(store.stats().entries, 0);
    }

    /// The capacity and the byte budget hold; recently read entries survive eviction.
    #[test]
    fn bounded_by_capacity_and_bytes() {
        let config = NearCacheConfig::default().capacity(8).max_bytes(4096);
        let (_shared, store) = live_store(config);
        let ticket = store.ticket("p:hot").unwrap();
        assert!(store.insert(ticket, "p:hot", "", b"hot", None));
        for i in 0..100 {
            assert!(store.get("p:hot", "").is_some(), "hot key evicted at {i}");
            let key = format!("p:{i}");
            let ticket = store.ticket(&key).unwrap();
            assert!(store.insert(ticket, &key, "", b"value", None));
            assert!(store.stats().entries <= 8);
        }
        assert!(store.stats().evictions >= 92);
        let big = vec![0u8; 5000];
        let ticket = store.ticket("p:big").unwrap();
        assert!(!store.insert(ticket, "p:big", "", &big, None));
        let mut total = 0;
        for i in 0..30 {
            let key = format!("p:m{i}");
            let ticket = store.ticket(&key).unwrap();
            assert!(store.insert(ticket, &key, "", &[1u8; 900], None));
            total += 1;
        }
        assert_eq!(total, 30);
        let bytes = store.shards[0].lock().unwrap().bytes;
        assert!(bytes <= 4096, "{bytes}");
    }

    /// Bad settings are refused with a message.
    #[test]
    fn config_is_validated() {
        assert!(NearCacheConfig::default().validate().is_ok());
        assert!(NearCacheConfig::default().capacity(0).validate().is_err());
        assert!(NearCacheConfig::default().max_bytes(10).validate().is_err());
        assert!(
            NearCacheConfig::default()
                .max_age(Duration::ZERO)
                .validate()
                .is_err()
        );
    }
}
