//! The typed cache (the original module's `CacheManager`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::client::{BackendKind, Client};
use crate::codec::{Codec, DecodeError};
use crate::error::{Error, Result};
use crate::keys;
use crate::near::{self, NearCacheConfig, NearStats, NearStore};

/// Named TTL tiers of the original module.
pub mod ttl {
    use std::time::Duration;

    /// 5 minutes: real-time data.
    pub const SHORT: Duration = Duration::from_secs(300);
    /// 1 hour: business data.
    pub const MEDIUM: Duration = Duration::from_secs(3600);
    /// 24 hours: static content.
    pub const LONG: Duration = Duration::from_secs(86_400);
    /// What [`Cache::set`](crate::Cache::set) uses unless the cache was built with another
    /// default: [`MEDIUM`].
    pub const DEFAULT: Duration = MEDIUM;
    /// Longest TTL accepted: 10 years. Longer is almost certainly a unit mistake.
    pub const MAX: Duration = Duration::from_secs(10 * 365 * 86_400);
}

/// The namespace of [`Cache::new`].
pub const DEFAULT_NAMESPACE: &str = "default";

/// How a [`Cache::try_get_or_set`] call got its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CacheStatus {
    /// Read from the cache.
    Hit,
    /// Computed by another caller in this process while this one waited for it.
    Shared,
    /// Computed by this call.
    Miss,
    /// Read from the cache past its TTL, within the cache's stale-while-revalidate window
    /// ([`CacheBuilder::stale_while_revalidate`]): returned at once while one caller in the
    /// fleet (another call, another process, or a background task) refreshes it.
    Stale,
}

/// A value and how it was obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Lookup<T> {
    /// The value.
    pub value: T,
    /// Where it came from.
    pub status: CacheStatus,
}

/// Counters of one [`Cache`] since it was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CacheStats {
    /// Reads that found a value.
    pub hits: u64,
    /// Reads that found nothing (corrupt values and soft errors included).
    pub misses: u64,
    /// Reads or writes that failed because Redis was unavailable.
    pub errors: u64,
    /// Stored values that did not decode and were deleted.
    pub corrupt: u64,
    /// Values written.
    pub sets: u64,
    /// Computations run by `get_or_set` (stale refreshes included).
    pub computations: u64,
    /// Values `get_or_set` returned stale ([`CacheStatus::Stale`]) while a refresh ran; each
    /// is also one of the `hits`.
    pub stale_hits: u64,
    /// The near-cache's counters (all zero unless built with
    /// [`CacheBuilder::near_cache`]). Its hits are also counted in `hits`.
    pub near: NearStats,
}

/// A typed, namespaced cache of serde values.
///
/// Keys are the caller's text (1 to 1024 bytes, no control characters) stored under
/// `{key_prefix}cache:{namespace}:`. Values are JSON with a small header
/// (see the `codec` module's docs), compressed when over 1 KiB.
///
/// Cloning is cheap (an [`Arc`]); clones share counters and in-flight computations.
///
/// # Behavior
///
/// - **Fail soft.** [`get`](Cache::get), [`get_many`](Cache::get_many) and
///   [`get_or_set`](Cache::get_or_set) treat an unavailable Redis as a miss (counted in
///   [`CacheStats::errors`], logged at most once a second), so a Redis outage slows an application
///   down instead of breaking it. [`try_get`](Cache::try_get) and the writes report the error.
/// - **Bad bytes are a miss.** A value that does not decode (written by another program,
///   damaged, of an older format or another type) is logged, counted and deleted — only if it is
///   still the same bytes, so a fresh value written meanwhile survives.
/// - **One computation per cold key.** Concurrent [`get_or_set`](Cache::get_or_set) calls for
///   one missing key in this process run `compute` once; the others wait and share its result. If
///   the computing call fails or is cancelled, a waiting call takes over. Across processes, the
///   computing one holds a short Redis lease (`{prefix}lease:{namespace}:{key}`, see
///   [`CacheBuilder::lease_ttl`]) and the others wait for its value, so a cold key is computed
///   once in the whole fleet — unless the computation outlives the lease.
/// - **Stale while revalidate** (off unless [`CacheBuilder::stale_while_revalidate`] sets a
///   window W). Every write of this cache keeps the value in Redis for its TTL *plus* W.
///   `get_or_set` calls a value *fresh* while more than W of its life is left and *stale* in the
///   last W, measured with `PTTL` on Redis's clock (one script reads value and age in one round
///   trip, so the cost of a hit does not change). A stale value is returned at once
///   ([`CacheStatus::Stale`]) while exactly one caller in the fleet refreshes it: the in-process
///   single flight picks one caller, and it refreshes only if it also takes the key's lease
///   (without waiting for it). [`try_get_or_set`](Cache::try_get_or_set) refreshes inline: that
///   one caller computes, stores and gets [`CacheStatus::Miss`]; if its computation fails, it
///   gets the error and the stale value stays (still served, and still returned by
///   [`get`](Cache::get)) until it expires or a later call refreshes it.
///   [`try_get_or_set_background`](Cache::try_get_or_set_background) refreshes in a spawned task
///   instead, so every caller gets the stale value at once and a failed refresh is logged. Past
///   TTL + W the key is gone: the next call is an ordinary miss. Plain reads
///   ([`get`](Cache::get), [`get_many`](Cache::get_many), [`exists`](Cache::exists)) know nothing
///   of freshness: they return a value as long as it is stored.
/// - **Near-cache, if asked for.** A cache built with [`CacheBuilder::near_cache`] also keeps
///   the values it reads in this process and serves them without a round trip until Redis says
///   their key changed (any client's write, delete, expiry or `FLUSHALL`), the entry reaches its
///   maximum age or the key's TTL, or the invalidation connection is lost (then everything is
///   dropped and reads go to Redis until it is back). This handle's own writes drop the entry
///   at once. With a stale window it keeps a value only while it is fresh, so `get_or_set`
///   answers fresh hits from memory and still sees the value go stale (and refreshes it); stale
///   values are read from Redis. See the `near` module's docs and
///   `docs/decisions/0004-near-cache.md`.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<CacheInner>,
}

struct CacheInner {
    client: Client,
    namespace: String,
    /// `{key_prefix}cache:{namespace}:`
    prefix: String,
    default_ttl: Duration,
    codec: Codec,
    /// `{key_prefix}lease:{namespace}:` — apart from the values, so listings never see leases.
    lease_prefix: String,
    lease_ttl: Duration,
    /// How long a value stays past its TTL, served stale while one caller refreshes it.
    stale_window: Duration,
    /// Computations in flight, by Redis key: the flight's id and where its outcome will appear.
    flights: Mutex<HashMap<String, (u64, FlightReceiver)>>,
    next_flight: AtomicU64,
    counters: Counters,
    last_warning: AtomicU64,
    /// The near-cache, when opted in and the backend has one.
    near: Option<Arc<NearStore>>,
}

#[derive(Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    errors: AtomicU64,
    corrupt: AtomicU64,
    sets: AtomicU64,
    computations: AtomicU64,
    stale_hits: AtomicU64,
}

type FlightReceiver = watch::Receiver<Option<Flight>>;

/// The outcome a computing caller publishes to those waiting for it.
#[derive(Clone)]
enum Flight {
    /// The encoded value.
    Done(Arc<Vec<u8>>),
    /// The computation failed; a waiter should try itself.
    Failed,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("namespace", &self.inner.namespace)
            .field("default_ttl", &self.inner.default_ttl)
            .field("stale_window", &self.inner.stale_window)
            .field("near_cache", &self.inner.near.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds a [`Cache`]; see [`Cache::builder`].
#[derive(Debug, Clone)]
pub struct CacheBuilder {
    client: Client,
    namespace: String,
    default_ttl: Duration,
    codec: Codec,
    lease_ttl: Duration,
    stale_window: Duration,
    near: Option<NearCacheConfig>,
}

/// How long a process computing a cold key holds its lease: others wait for its value up to this
/// long, then compute themselves.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// The longest lease [`CacheBuilder::lease_ttl`] accepts: a day.
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(86_400);

impl CacheBuilder {
    /// Namespace: 1 to 64 bytes of `A-Z a-z 0-9 _ - .`. Default: [`DEFAULT_NAMESPACE`].
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// TTL of [`Cache::set`] and [`Cache::set_many`]. Default: [`ttl::DEFAULT`] (1 hour).
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// Values whose JSON is larger are compressed (lz4). Default: 1024 bytes.
    pub fn compression_threshold(mut self, bytes: usize) -> Self {
        self.codec.compression_threshold = bytes;
        self
    }

    /// Largest value written or read, as JSON. Default: 64 MiB.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.codec.max_value_size = bytes;
        self
    }

    /// How long a process computing a cold key in [`Cache::get_or_set`] holds a short Redis
    /// lease, so that other processes wait for its value instead of computing it too; zero turns
    /// the cross-process lease off (in-process single flight remains). Default:
    /// [`DEFAULT_LEASE_TTL`].
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl;
        self
    }

    /// Stale-while-revalidate: every value this cache writes stays stored `window` past its TTL,
    /// and in that window [`Cache::get_or_set`] returns it at once as [`CacheStatus::Stale`]
    /// while one caller in the whole fleet computes the new value (see the `Behavior` section of
    /// [`Cache`]). At most [`ttl::MAX`]; zero turns it off: values live exactly their TTL and
    /// `get_or_set` reads with a plain `GET`. Default: zero.
    pub fn stale_while_revalidate(mut self, window: Duration) -> Self {
        self.stale_window = window;
        self
    }

    /// Keeps the values this cache reads in process memory too (a near-cache, or L1), served
    /// without a round trip until Redis reports their key changed; see [`NearCacheConfig`] and
    /// the [`Cache`] docs. Hot keys read far more often than written gain most. Each cache
    /// handle built with it has a near-cache of its own (clones share it). Behind Sentinel it
    /// tracks the primary the pool uses, on a Redis Cluster every primary; on the embedded
    /// `memory://` backend it changes nothing. Default: off.
    pub fn near_cache(mut self, config: NearCacheConfig) -> Self {
        self.near = Some(config);
        self
    }

    /// Validates the settings and builds the cache.
    pub fn build(self) -> Result<Cache> {
        keys::check_namespace(&self.namespace).map_err(Error::invalid)?;
        check_ttl(self.default_ttl)?;
        if self.stale_window > ttl::MAX {
            return Err(Error::invalid(format!(
                "stale_while_revalidate window must be at most {} days, got {:?}",
                ttl::MAX.as_secs() / 86_400,
                self.stale_window
            )));
        }
        // A lease is a short lock; past a day it is a mistake (and `Duration::MAX` overflowed the
        // waiters' deadline).
        if self.lease_ttl > MAX_LEASE_TTL {
            return Err(Error::invalid(format!(
                "lease_ttl must be at most {} s, got {:?}",
                MAX_LEASE_TTL.as_secs(),
                self.lease_ttl
            )));
        }
        if let Some(config) = &self.near {
            config.validate()?;
        }
        let prefix = format!("{}cache:{}:", self.client.key_prefix(), self.namespace);
        let near = self
            .near
            .and_then(|config| near::store_for(&self.client, prefix.clone(), config));
        let lease_prefix = format!("{}lease:{}:", self.client.key_prefix(), self.namespace);
        Ok(Cache {
            inner: Arc::new(CacheInner {
                client: self.client,
                namespace: self.namespace,
                prefix,
                default_ttl: self.default_ttl,
                codec: self.codec,
                lease_prefix,
                lease_ttl: self.lease_ttl,
                stale_window: self.stale_window,
                flights: Mutex::new(HashMap::new()),
                next_flight: AtomicU64::new(0),
                counters: Counters::default(),
                last_warning: AtomicU64::new(0),
                near,
            }),
        })
    }
}

fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < Duration::from_millis(1) || ttl > ttl::MAX {
        return Err(Error::invalid(format!(
            "ttl must be between 1 ms and {} days, got {ttl:?}",
            ttl::MAX.as_secs() / 86_400
        )));
    }
    Ok(())
}

impl Cache {
    /// The cache of namespace [`DEFAULT_NAMESPACE`] with the default settings.
    pub fn new(client: &Client) -> Self {
        Self::builder(client)
            .build()
            .expect("the default cache settings are valid")
    }

    /// A builder for a cache with its own namespace or settings.
    pub fn builder(client: &Client) -> CacheBuilder {
        CacheBuilder {
            client: client.clone(),
            namespace: DEFAULT_NAMESPACE.to_owned(),
            default_ttl: ttl::DEFAULT,
            codec: Codec::default(),
            lease_ttl: DEFAULT_LEASE_TTL,
            stale_window: Duration::ZERO,
            near: None,
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The Redis key under which `key` is stored (to inspect it with `redis-cli`).
    pub fn redis_key(&self, key: &str) -> Result<String> {
        keys::check_key(key).map_err(Error::invalid)?;
        Ok(keys::join(&[&self.inner.prefix, key]))
    }

    /// Counters since this cache was built.
    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            corrupt: c.corrupt.load(Ordering::Relaxed),
            sets: c.sets.load(Ordering::Relaxed),
            computations: c.computations.load(Ordering::Relaxed),
            stale_hits: c.stale_hits.load(Ordering::Relaxed),
            near: near::stats_of(self.inner.near.as_ref()),
        }
    }

    /// The value under `key`, or `None` when it is missing, expired, undecodable — or when Redis
    /// is unavailable (see [`try_get`](Cache::try_get) to tell that apart). Fails only on an
    /// invalid key.
    pub async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let redis_key = self.redis_key(key)?;
        Ok(self.soft(self.read(&redis_key).await)?.flatten())
    }

    /// Like [`get`](Cache::get), but an unavailable Redis is an error rather than a miss.
    pub async fn try_get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        let redis_key = self.redis_key(key)?;
        self.read(&redis_key).await.inspect_err(|err| {
            if err.is_unavailable() {
                self.inner.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
        })
    }

    /// Stores `value` under `key` for the cache's default TTL (value and expiry in one command;
    /// with a stale-while-revalidate window, the value is stored that much longer).
    pub async fn set<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<()> {
        self.set_with_ttl(key, value, self.inner.default_ttl).await
    }

    /// Stores `value` under `key` for `ttl` (value and expiry in one command; with a
    /// stale-while-revalidate window, the value is stored that much longer).
    pub async fn set_with_ttl<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
        ttl: Duration,
    ) -> Result<()> {
        let redis_key = self.redis_key(key)?;
        check_ttl(ttl)?;
        let bytes = self.inner.codec.encode(value)?;
        self.write(&redis_key, &bytes, ttl).await
    }

    /// Deletes `key`; true if it existed.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        let redis_key = self.redis_key(key)?;
        self.forget(&redis_key);
        let deleted = self
            .inner
            .client
            .del(std::slice::from_ref(&redis_key))
            .await;
        self.forget(&redis_key);
        Ok(self.counted(deleted)? > 0)
    }

    /// True if `key` holds a live value (whether or not it decodes).
    pub async fn exists(&self, key: &str) -> Result<bool> {
        let redis_key = self.redis_key(key)?;
        self.counted(self.inner.client.exists(&redis_key).await)
    }

    /// Time left before `key` is gone; `None` when it does not exist. With a
    /// stale-while-revalidate window this includes the window: the value is fresh only while more
    /// than the window is left.
    pub async fn ttl(&self, key: &str) -> Result<Option<Duration>> {
        let redis_key = self.redis_key(key)?;
        self.counted(self.inner.client.ttl(&redis_key).await)
    }

    /// The values of several keys in one round trip, in order; fail-soft like
    /// [`get`](Cache::get).
    pub async fn get_many<T: DeserializeOwned>(
        &self,
        keys: &[impl AsRef<str>],
    ) -> Result<Vec<Option<T>>> {
        let redis_keys = keys
            .iter()
            .map(|key| self.redis_key(key.as_ref()))
            .collect::<Result<Vec<_>>>()?;
        if let Some(near) = &self.inner.near {
            return self.get_many_near(near, redis_keys).await;
        }
        let Some(values) = self.soft(self.inner.client.mget(&redis_keys).await)? else {
            return Ok(keys.iter().map(|_| None).collect());
        };
        let mut out = Vec::with_capacity(values.len());
        for (redis_key, bytes) in redis_keys.iter().zip(values) {
            out.push(self.decode_counted(redis_key, bytes).await);
        }
        Ok(out)
    }

    /// Stores several values with one TTL, atomically (all or none), in one round trip (with a
    /// stale-while-revalidate window, stored that much longer). On Redis Cluster a transaction
    /// cannot span hash slots: the values are written in one transaction per slot, concurrently,
    /// so a failure can leave some slots written and others not.
    pub async fn set_many<T: Serialize>(
        &self,
        items: &[(impl AsRef<str>, T)],
        ttl: Duration,
    ) -> Result<()> {
        check_ttl(ttl)?;
        let encoded = items
            .iter()
            .map(|(key, value)| {
                Ok((
                    self.redis_key(key.as_ref())?,
                    self.inner.codec.encode(value)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        for (redis_key, _) in &encoded {
            self.forget(redis_key);
        }
        let written = self.inner.client.mset(&encoded, self.stored_ttl(ttl)).await;
        for (redis_key, _) in &encoded {
            self.forget(redis_key);
        }
        self.counted(written)?;
        self.inner
            .counters
            .sets
            .fetch_add(encoded.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Streams the keys (without the namespace prefix) that start with the literal text
    /// `prefix`, using `SCAN` (never `KEYS`). Glob characters in `prefix` match themselves.
    /// An empty prefix lists the whole namespace.
    pub fn keys(&self, prefix: &str) -> impl Stream<Item = Result<String>> + Send + 'static {
        let pattern = format!(
            "{}{}*",
            keys::glob_escape(&self.inner.prefix),
            keys::glob_escape(prefix)
        );
        self.scan(pattern)
    }

    /// Streams the keys (without the namespace prefix) matching the Redis glob `pattern`
    /// (`*`, `?`, `[...]`, `\x`), within this namespace only, using `SCAN`.
    pub fn keys_matching(
        &self,
        pattern: &str,
    ) -> impl Stream<Item = Result<String>> + Send + 'static {
        let pattern = format!("{}{pattern}", keys::glob_escape(&self.inner.prefix));
        self.scan(pattern)
    }

    fn scan(&self, pattern: String) -> impl Stream<Item = Result<String>> + Send + 'static {
        let prefix_len = self.inner.prefix.len();
        self.inner.client.scan(pattern).map(move |key| {
            key.map(|mut key| {
                key.drain(..prefix_len.min(key.len()));
                key
            })
        })
    }

    /// The value under `key`, or the result of `compute`, stored for `ttl`.
    ///
    /// Concurrent calls for the same missing key in this process run `compute` once. With Redis
    /// unavailable it still returns the computed value (and does not store it). Fails only on an
    /// invalid key or TTL, or a value that does not serialize. With a stale-while-revalidate
    /// window, a stale value may be returned while another caller refreshes it (see
    /// [`try_get_or_set`](Cache::try_get_or_set) to tell).
    pub async fn get_or_set<T, F, Fut>(&self, key: &str, ttl: Duration, compute: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        self.try_get_or_set(key, ttl, || async { Ok::<T, Error>(compute().await) })
            .await
            .map(|lookup| lookup.value)
    }

    /// [`get_or_set`](Cache::get_or_set) with a fallible `compute`, telling how the value was
    /// obtained. A failed computation is not cached; its error is returned to the caller that
    /// ran it, and one waiting caller (if any) takes over.
    ///
    /// With a stale-while-revalidate window ([`CacheBuilder::stale_while_revalidate`]), a stale
    /// value is refreshed *inline*: of the callers that find it stale, exactly one in the fleet
    /// runs `compute` and gets [`CacheStatus::Miss`] (or [`CacheStatus::Hit`] if it finds that
    /// another process has just refreshed it); the others get the stale value at once with
    /// [`CacheStatus::Stale`]. If that refresh fails, its error goes to the one caller that ran
    /// it and the stale value stays until it expires; a caller that prefers the stale value can
    /// fall back to [`get`](Cache::get), which still returns it. To make no caller wait for a
    /// refresh, see [`try_get_or_set_background`](Cache::try_get_or_set_background).
    pub async fn try_get_or_set<T, E, F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        compute: F,
    ) -> Result<Lookup<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let redis_key = self.redis_key(key)?;
        check_ttl(ttl)?;
        match self.find(&redis_key).await? {
            Found::Fresh(value) => Ok(Lookup {
                value,
                status: CacheStatus::Hit,
            }),
            Found::Stale(stale) => {
                let Joined::Leader(flight) = self.join_flight(&redis_key) else {
                    return Ok(self.serve_stale(stale));
                };
                match self.refresh(key, ttl, flight, compute).await? {
                    Some(lookup) => Ok(lookup),
                    None => Ok(self.serve_stale(stale)),
                }
            }
            Found::Missing => self.compute_cold(key, &redis_key, ttl, compute).await,
        }
    }

    /// [`try_get_or_set`](Cache::try_get_or_set), but a stale value is refreshed in a spawned
    /// Tokio task: every caller that finds it stale gets it at once ([`CacheStatus::Stale`]),
    /// none waits for the refresh — the classic stale-while-revalidate. Exactly one task in the
    /// fleet refreshes a stale key (the in-process single flight and the Redis lease, as inline).
    /// A failed refresh is logged (`warn`, with its error) — no caller is waiting for it — and
    /// the stale value stays until it expires or a later call refreshes it.
    ///
    /// A missing key is computed inline, as by `try_get_or_set`, so its errors are returned.
    /// Without a stale window this is `try_get_or_set`. The price of the spawned refresh is the
    /// `Send + 'static` bounds.
    pub async fn try_get_or_set_background<T, E, F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        compute: F,
    ) -> Result<Lookup<T>, E>
    where
        T: Serialize + DeserializeOwned + Send + 'static,
        E: From<Error> + std::fmt::Display + Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let redis_key = self.redis_key(key)?;
        check_ttl(ttl)?;
        match self.find(&redis_key).await? {
            Found::Fresh(value) => Ok(Lookup {
                value,
                status: CacheStatus::Hit,
            }),
            Found::Stale(stale) => {
                if let Joined::Leader(flight) = self.join_flight(&redis_key) {
                    let cache = self.clone();
                    let key = key.to_owned();
                    tokio::spawn(async move {
                        let refreshed = cache.refresh(&key, ttl, flight, compute).await;
                        if let Err(err) = refreshed {
                            tracing::warn!(key = %key, namespace = %cache.inner.namespace,
                                error = %err,
                                "stale-while-revalidate refresh failed; the stale value is \
                                 served until it expires");
                        }
                    });
                }
                Ok(self.serve_stale(stale))
            }
            Found::Missing => self.compute_cold(key, &redis_key, ttl, compute).await,
        }
    }

    /// The value under `redis_key`, and whether it is fresh. Without a stale window this is a
    /// plain `GET` and every value found is fresh; with one, value and remaining TTL come in one
    /// round trip. Unavailability is a (counted) miss; other errors pass through.
    async fn find<T: DeserializeOwned>(&self, redis_key: &str) -> Result<Found<T>> {
        let window = self.inner.stale_window;
        if window.is_zero() {
            return Ok(match self.soft(self.read(redis_key).await)?.flatten() {
                Some(value) => Found::Fresh(value),
                None => Found::Missing,
            });
        }
        // The near-cache holds values only while they are fresh (see `fresh_for`): a hit is fresh.
        let near = self.inner.near.as_deref();
        if let Some(near) = near
            && let Some(value) = self.soft(self.near_hit(near, redis_key))?.flatten()
        {
            return Ok(Found::Fresh(value));
        }
        // The ticket comes before the read is sent: see `near` on the race it closes.
        let ticket = near.and_then(|near| near.ticket(redis_key));
        let read =
            self.foreign_type_as_none(redis_key, self.inner.client.get_with_ttl(redis_key).await);
        let Some(read) = self.soft(read)? else {
            return Ok(Found::Missing);
        };
        let (bytes, left) = match read {
            Some((bytes, left)) => (Some(bytes), left),
            None => (None, None),
        };
        let kept = ticket.is_some().then(|| bytes.clone()).flatten();
        let Some(value) = self.decode_counted(redis_key, bytes).await else {
            return Ok(Found::Missing);
        };
        // No expiry at all (written by another program) never goes stale.
        Ok(match left {
            Some(left) if left <= window => Found::Stale(value),
            _ => {
                if let (Some(near), Some(ticket), Some(bytes)) = (near, ticket, kept) {
                    near.insert(ticket, redis_key, "", &bytes, self.fresh_for(left));
                }
                Found::Fresh(value)
            }
        })
    }

    /// How long the near-cache may keep a value that Redis holds for `left` more (`None`: no
    /// expiry): until it would enter the stale window, so that a near hit is always fresh and
    /// `get_or_set` still sees a value go stale and refreshes it.
    fn fresh_for(&self, left: Option<Duration>) -> Option<Duration> {
        left.map(|left| left.saturating_sub(self.inner.stale_window))
    }

    fn serve_stale<T>(&self, value: T) -> Lookup<T> {
        self.inner
            .counters
            .stale_hits
            .fetch_add(1, Ordering::Relaxed);
        Lookup {
            value,
            status: CacheStatus::Stale,
        }
    }

    /// The cold path of `get_or_set`: wait for a computation already running (in this process
    /// or another), or run it here.
    async fn compute_cold<T, E, F, Fut>(
        &self,
        key: &str,
        redis_key: &str,
        ttl: Duration,
        compute: F,
    ) -> Result<Lookup<T>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let flight = loop {
            match self.join_flight(redis_key) {
                Joined::Leader(flight) => break flight,
                Joined::Waiter(mut rx) => {
                    let outcome = rx
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|s| s.clone());
                    if let Some(Flight::Done(bytes)) = outcome
                        && let Ok(value) = self.inner.codec.decode(&bytes)
                    {
                        self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(Lookup {
                            value,
                            status: CacheStatus::Shared,
                        });
                    }
                    // The computing caller failed or was cancelled: try again, maybe as leader.
                }
            }
        };
        // Another process (or a caller that finished just before we joined) may have stored it;
        // and among processes, the first to take the lease computes while the others wait for
        // its value.
        let (found, bid) = self.look_and_bid(key, redis_key).await;
        let found = match self.soft(found) {
            Ok(found) => found.flatten(),
            Err(err) => {
                if let TryLease::Taken(lease) = bid {
                    self.release_lease(lease).await;
                }
                return Err(err.into());
            }
        };
        if let Some(value) = found {
            if let TryLease::Taken(lease) = bid {
                self.release_lease(lease).await;
            }
            if let Ok(bytes) = self.inner.codec.encode(&value) {
                flight.publish(Flight::Done(Arc::new(bytes)));
            }
            return Ok(Lookup {
                value,
                status: CacheStatus::Hit,
            });
        }
        let lease = match bid {
            TryLease::Taken(lease) => lease,
            TryLease::Unavailable => None,
            TryLease::Busy(lease_key) => match self.wait_for_holder(key, lease_key).await {
                Lease::Waited(value) => {
                    if let Ok(bytes) = self.inner.codec.encode(&value) {
                        flight.publish(Flight::Done(Arc::new(bytes)));
                    }
                    return Ok(Lookup {
                        value,
                        status: CacheStatus::Shared,
                    });
                }
                Lease::Held(lease) => lease,
            },
        };
        let value = self.compute_and_store(&flight, ttl, lease, compute).await?;
        Ok(Lookup {
            value,
            status: CacheStatus::Miss,
        })
    }

    /// Reads `redis_key` and bids for `key`'s lease. The look and the bid go out together, one
    /// round trip, on one connection: Redis runs them back to back, so no holder's store and
    /// release can fall between them.
    async fn look_and_bid<T: DeserializeOwned>(
        &self,
        key: &str,
        redis_key: &str,
    ) -> (Result<Option<T>>, TryLease) {
        let (mut found, bid) = self
            .inner
            .client
            .in_order(async { tokio::join!(self.read(redis_key), self.try_lease(key)) })
            .await;
        // On a Cluster the value and its lease live on different nodes, so nothing orders the
        // two: a holder's store and release can fall between our look and our bid. A holder
        // there releases only once its store is acknowledged, so a second look after winning
        // the bid sees any value stored before the lease came free (cold path only).
        if self.spans_servers() && matches!(bid, TryLease::Taken(_)) && matches!(found, Ok(None)) {
            found = self.read(redis_key).await;
        }
        (found, bid)
    }

    /// Refreshes a stale key as this process's flight leader. `Ok(None)`: another process holds
    /// the lease (it is refreshing) or Redis failed us — serve the stale value. Otherwise the
    /// refreshed value: [`CacheStatus::Hit`] when it turns out another caller has just refreshed
    /// it, [`CacheStatus::Miss`] when computed here.
    async fn refresh<T, E, F, Fut>(
        &self,
        key: &str,
        ttl: Duration,
        flight: FlightGuard,
        compute: F,
    ) -> Result<Option<Lookup<T>>, E>
    where
        T: Serialize + DeserializeOwned,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        // Never wait for the lease here: a stale value is at hand and is what everyone else gets.
        let lease = match self.try_lease(key).await {
            TryLease::Taken(lease) => lease,
            TryLease::Busy(_) | TryLease::Unavailable => return Ok(None),
        };
        // The previous holder may have stored a fresh value between our read and our lease;
        // without this look, a process that read just before that store would compute again.
        // Errors here only mean: refresh anyway.
        if let Ok(Found::Fresh(value)) = self.find::<T>(&flight.key).await {
            self.release_lease(lease).await;
            if let Ok(bytes) = self.inner.codec.encode(&value) {
                flight.publish(Flight::Done(Arc::new(bytes)));
            }
            return Ok(Some(Lookup {
                value,
                status: CacheStatus::Hit,
            }));
        }
        let value = self.compute_and_store(&flight, ttl, lease, compute).await?;
        Ok(Some(Lookup {
            value,
            status: CacheStatus::Miss,
        }))
    }

    /// Runs `compute` as the holder of `flight` and `lease`, stores the value (a failed store is
    /// only logged by `soft`: the value is good, just not cached), releases the lease and hands
    /// the value to the waiting callers. On failure the lease is released and the flight's drop
    /// tells the waiters to try themselves.
    async fn compute_and_store<T, E, F, Fut>(
        &self,
        flight: &FlightGuard,
        ttl: Duration,
        lease: LeaseHold,
        compute: F,
    ) -> Result<T, E>
    where
        T: Serialize,
        E: From<Error>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.inner
            .counters
            .computations
            .fetch_add(1, Ordering::Relaxed);
        // Until the computation returns, the lease is released if it never does (its caller
        // cancelled, an HTTP client that went away, or a panic): left to expire, it would hold
        // every caller of the key, here and in other processes, for the whole lease TTL.
        let unfinished = LeaseGuard {
            client: self.inner.client.clone(),
            lease,
        };
        let computed = compute().await;
        let lease = unfinished.finished();
        let value = match computed {
            Ok(value) => value,
            Err(err) => {
                self.release_lease(lease).await;
                return Err(err);
            }
        };
        let bytes = match self.inner.codec.encode(&value) {
            Ok(bytes) => bytes,
            Err(err) => {
                self.release_lease(lease).await;
                return Err(err.into());
            }
        };
        // The store, then the release: on one server they go out together on one connection (so
        // Redis runs them in that order), one round trip; on a Cluster, where they go to different
        // nodes, the release waits for the store's reply (see the second look above).
        let written = if self.spans_servers() {
            let written = self.write(&flight.key, &bytes, ttl).await;
            self.release_lease(lease).await;
            written
        } else {
            let (written, ()) = self
                .inner
                .client
                .in_order(async {
                    tokio::join!(
                        self.write(&flight.key, &bytes, ttl),
                        self.release_lease(lease)
                    )
                })
                .await;
            written
        };
        let _ = self.soft(written);
        flight.publish(Flight::Done(Arc::new(bytes)));
        Ok(value)
    }

    /// Whether a value and its lease may be on different servers (a Cluster), where commands
    /// sent together on one connection are not run in order.
    fn spans_servers(&self) -> bool {
        self.inner.client.backend() == BackendKind::Cluster
    }

    /// Tries to take the cross-process lease on `key`, without waiting.
    async fn try_lease(&self, key: &str) -> TryLease {
        if self.inner.lease_ttl.is_zero() {
            return TryLease::Taken(None);
        }
        let lease_key = keys::join(&[&self.inner.lease_prefix, key]);
        let mut token = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut token);
        let token = token.to_vec();
        match self
            .inner
            .client
            .set_if_absent(&lease_key, &token, Some(self.inner.lease_ttl))
            .await
        {
            Ok(true) => TryLease::Taken(Some((lease_key, token))),
            Ok(false) => TryLease::Busy(lease_key),
            Err(_) => TryLease::Unavailable,
        }
    }

    /// Waits for the value of the process holding the lease `lease_key` on `key`. A holder that
    /// gives up without a value hands over: the waiters bid again, and the one that takes the
    /// lease computes while the others wait for it. Any trouble with Redis, or a lease that
    /// expires without a value (its holder outlived it), means: compute here.
    async fn wait_for_holder<T: DeserializeOwned>(
        &self,
        key: &str,
        mut lease_key: String,
    ) -> Lease<T> {
        let redis_key = keys::join(&[&self.inner.prefix, key]);
        let mut deadline = tokio::time::Instant::now() + self.inner.lease_ttl;
        let mut pause = Duration::from_millis(5);
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(50));
            match self.read(&redis_key).await {
                Ok(Some(value)) => return Lease::Waited(value),
                Ok(None) => {}
                Err(_) => return Lease::Held(None),
            }
            match self.inner.client.exists(&lease_key).await {
                Ok(true) => {}
                Ok(false) => {
                    // The lease is gone: either the holder stored its value and released it
                    // since our look (holders release only after storing), or it gave up
                    // without a value. One more look tells which; with it goes a bid, as every
                    // waiter's does, and the one that takes the lease takes over.
                    let (found, bid) = self.look_and_bid(key, &redis_key).await;
                    if let Ok(Some(value)) = found {
                        if let TryLease::Taken(lease) = bid {
                            self.release_lease(lease).await;
                        }
                        return Lease::Waited(value);
                    }
                    match bid {
                        TryLease::Taken(lease) => return Lease::Held(lease),
                        TryLease::Busy(next) => {
                            lease_key = next;
                            deadline = tokio::time::Instant::now() + self.inner.lease_ttl;
                            pause = Duration::from_millis(5);
                        }
                        TryLease::Unavailable => break,
                    }
                }
                Err(_) => break,
            }
        }
        Lease::Held(None)
    }

    /// Drops our lease, only if it is still ours.
    async fn release_lease(&self, lease: LeaseHold) {
        if let Some((lease_key, token)) = lease {
            let _ = self.inner.client.del_if_equals(&lease_key, &token).await;
        }
    }

    fn join_flight(&self, redis_key: &str) -> Joined {
        let mut flights = self
            .inner
            .flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((_, rx)) = flights.get(redis_key) {
            return Joined::Waiter(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        let id = self.inner.next_flight.fetch_add(1, Ordering::Relaxed);
        flights.insert(redis_key.to_owned(), (id, rx));
        Joined::Leader(FlightGuard {
            cache: self.inner.clone(),
            key: redis_key.to_owned(),
            id,
            tx,
        })
    }

    /// GET and decode, counting hits and misses; errors are returned for the caller to soften.
    /// With a near-cache: from memory when held, else from Redis and then kept.
    async fn read<T: DeserializeOwned>(&self, redis_key: &str) -> Result<Option<T>> {
        let Some(near) = &self.inner.near else {
            let bytes =
                self.foreign_type_as_none(redis_key, self.inner.client.get(redis_key).await)?;
            return Ok(self.decode_counted(redis_key, bytes).await);
        };
        if let Some(value) = self.near_hit(near, redis_key)? {
            return Ok(Some(value));
        }
        // The ticket comes before the GET is sent: see `near` on the race it closes.
        let Some(ticket) = near.ticket(redis_key) else {
            let bytes =
                self.foreign_type_as_none(redis_key, self.inner.client.get(redis_key).await)?;
            return Ok(self.decode_counted(redis_key, bytes).await);
        };
        let (bytes, ttl) = self.get_with_ttl(redis_key).await?;
        let value = self.decode_counted(redis_key, bytes.clone()).await;
        if let (Some(_), Some(bytes)) = (&value, &bytes) {
            near.insert(ticket, redis_key, "", bytes, self.fresh_for(ttl));
        }
        Ok(value)
    }

    /// The value held in the near-cache, decoded; a closed client is refused as without one.
    fn near_hit<T: DeserializeOwned>(
        &self,
        near: &NearStore,
        redis_key: &str,
    ) -> Result<Option<T>> {
        if self.inner.client.is_closed() {
            return Err(Error::closed());
        }
        let Some(bytes) = near.get(redis_key, "") else {
            return Ok(None);
        };
        match self.inner.codec.decode(&bytes) {
            Ok(value) => {
                self.inner.counters.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(value))
            }
            // Held bytes always decoded once: this caller asks for another type. Let Redis's
            // copy decide, as without a near-cache.
            Err(_) => {
                near.invalidate(redis_key, false);
                Ok(None)
            }
        }
    }

    /// `GET` and `PTTL` in one round trip: the value, and how long it may be kept.
    async fn get_with_ttl(&self, redis_key: &str) -> Result<(Option<Vec<u8>>, Option<Duration>)> {
        let read = self.inner.client.get_with_ttl(redis_key).await;
        Ok(match self.foreign_type_as_none(redis_key, read)? {
            Some((bytes, ttl)) => (Some(bytes), ttl),
            None => (None, None),
        })
    }

    /// `get_many` with a near-cache: held keys from memory, the rest in one round trip (`MGET`
    /// and their `PTTL`s; on a cluster, whose pipelines may not span slots, each key's `GET` and
    /// `PTTL` concurrently), then kept.
    async fn get_many_near<T: DeserializeOwned>(
        &self,
        near: &NearStore,
        redis_keys: Vec<String>,
    ) -> Result<Vec<Option<T>>> {
        if self.inner.client.is_closed() {
            // Fail soft, as `mget` does on a closed client.
            self.soft::<()>(Err(Error::closed()))?;
            return Ok(redis_keys.iter().map(|_| None).collect());
        }
        let mut out: Vec<Option<T>> = Vec::with_capacity(redis_keys.len());
        let mut missing = Vec::new();
        for (index, redis_key) in redis_keys.iter().enumerate() {
            let held = self.near_hit(near, redis_key)?;
            if held.is_none() {
                missing.push((index, near.ticket(redis_key)));
            }
            out.push(held);
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let fetched: Option<(Vec<Option<Vec<u8>>>, Ttls)> =
            if self.inner.client.backend() == BackendKind::Cluster {
                // A cluster pipeline may not span slots: each key on its own, concurrently.
                let reads = missing.iter().map(|(index, _)| async {
                    let key = &redis_keys[*index];
                    self.foreign_type_as_none(key, self.inner.client.get_with_ttl(key).await)
                });
                self.soft(futures_util::future::try_join_all(reads).await)?
                    .map(|replies| {
                        replies
                            .into_iter()
                            .map(|reply| match reply {
                                Some((bytes, ttl)) => {
                                    (Some(bytes), ttl.map_or(-1, |ttl| ttl.as_millis() as i64))
                                }
                                None => (None, -2),
                            })
                            .unzip()
                    })
            } else {
                self.soft(
                    self.inner
                        .client
                        .run("MGET PTTL", |mut c| {
                            let mut pipe = redis::pipe();
                            pipe.cmd("MGET");
                            for (index, _) in &missing {
                                pipe.arg(&redis_keys[*index]);
                            }
                            for (index, _) in &missing {
                                pipe.cmd("PTTL").arg(&redis_keys[*index]);
                            }
                            async move {
                                let reply: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                                let mut reply = reply.into_iter();
                                let mget = reply.next().unwrap_or(redis::Value::Nil);
                                let values = redis::from_redis_value(mget)?;
                                let ttls = reply
                                    .map(|ttl| {
                                        redis::from_redis_value::<i64>(ttl)
                                            .map_err(redis::RedisError::from)
                                    })
                                    .collect::<redis::RedisResult<Vec<i64>>>()?;
                                Ok((values, ttls))
                            }
                        })
                        .await,
                )?
            };
        let Some((values, ttls)) = fetched else {
            return Ok(out);
        };
        for (((index, ticket), bytes), ms) in missing.into_iter().zip(values).zip(ttls) {
            let redis_key = &redis_keys[index];
            let value = self.decode_counted(redis_key, bytes.clone()).await;
            if let (Some(_), Some(ticket), Some(bytes)) = (&value, ticket, &bytes) {
                let ttl = (ms >= 0).then(|| Duration::from_millis(ms as u64));
                near.insert(ticket, redis_key, "", bytes, self.fresh_for(ttl));
            }
            out[index] = value;
        }
        Ok(out)
    }

    /// Drops `redis_key` from the near-cache (if any): called before a write is sent, so no read
    /// under way keeps the old value, and after its reply, so none that read it in between does.
    fn forget(&self, redis_key: &str) {
        if let Some(near) = &self.inner.near {
            near.invalidate(redis_key, false);
        }
    }

    async fn decode_counted<T: DeserializeOwned>(
        &self,
        redis_key: &str,
        bytes: Option<Vec<u8>>,
    ) -> Option<T> {
        let counters = &self.inner.counters;
        let Some(bytes) = bytes else {
            counters.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        match self.inner.codec.decode(&bytes) {
            Ok(value) => {
                counters.hits.fetch_add(1, Ordering::Relaxed);
                Some(value)
            }
            Err(err) => {
                counters.misses.fetch_add(1, Ordering::Relaxed);
                counters.corrupt.fetch_add(1, Ordering::Relaxed);
                self.discard(redis_key, &bytes, &err).await;
                None
            }
        }
    }

    /// A read's reply, with a key of another Redis type (a hash where the cache keeps strings,
    /// left by another program) as no value, as `MGET` and `memory://` answer: counted as a
    /// corrupt value (the caller counts the miss) and logged, not deleted (it is not ours to
    /// delete; the next write of the key replaces it).
    fn foreign_type_as_none<V>(
        &self,
        redis_key: &str,
        read: Result<Option<V>>,
    ) -> Result<Option<V>> {
        match read {
            Err(err) if err.is_wrong_type() => {
                self.inner.counters.corrupt.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    key = redis_key,
                    "the cache key holds another Redis type; treated as a miss"
                );
                Ok(None)
            }
            read => read,
        }
    }

    async fn discard(&self, redis_key: &str, bytes: &[u8], why: &DecodeError) {
        let deleted = self.inner.client.del_if_equals(redis_key, bytes).await;
        tracing::warn!(
            key = redis_key,
            len = bytes.len(),
            error = %why,
            deleted = deleted.as_ref().is_ok_and(|d| *d),
            "undecodable cache value treated as a miss"
        );
    }

    /// Stores `bytes` for `ttl` plus the stale window.
    async fn write(&self, redis_key: &str, bytes: &[u8], ttl: Duration) -> Result<()> {
        self.forget(redis_key);
        let written = self
            .inner
            .client
            .set(redis_key, bytes, self.stored_ttl(ttl))
            .await;
        self.forget(redis_key);
        self.counted(written)?;
        self.inner.counters.sets.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How long a value written with `ttl` stays in Redis: `ttl` plus the stale window (at most
    /// 2 × [`ttl::MAX`], far from overflowing Redis's milliseconds).
    fn stored_ttl(&self, ttl: Duration) -> Duration {
        ttl + self.inner.stale_window
    }

    /// Counts an unavailability error and passes the result on.
    fn counted<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(err) = &result
            && err.is_unavailable()
        {
            self.inner.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Turns unavailability into `Ok(None)` (counted, logged at most once a second); other errors
    /// pass through.
    fn soft<T>(&self, result: Result<T>) -> Result<Option<T>> {
        match result {
            Ok(value) => Ok(Some(value)),
            Err(err) if err.is_unavailable() => {
                self.inner.counters.errors.fetch_add(1, Ordering::Relaxed);
                self.inner.counters.misses.fetch_add(1, Ordering::Relaxed);
                self.warn_throttled(&err);
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    fn warn_throttled(&self, err: &Error) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let last = self.inner.last_warning.swap(now, Ordering::Relaxed);
        if last != now {
            tracing::warn!(error = %err, namespace = %self.inner.namespace,
                "cache degraded to misses: redis unavailable");
        }
    }
}

/// What [`Cache::find`] found under a key.
enum Found<T> {
    /// A value with more than the stale window left (every value, without a window).
    Fresh(T),
    /// A value in the last stale window of its life: serve it, and have one caller refresh it.
    Stale(T),
    /// Nothing usable: absent, undecodable, or Redis unavailable.
    Missing,
}

/// A lease we hold: its key and our token, to release it only if it is still ours. `None` when
/// leases are off or Redis could not be asked: we compute without one.
type LeaseHold = Option<(String, Vec<u8>)>;

/// A lease held while a computation runs; dropped before [`LeaseGuard::finished`] (the
/// computing future dropped, or a panic), it releases the lease from a task of its own.
struct LeaseGuard {
    client: Client,
    lease: LeaseHold,
}

impl LeaseGuard {
    /// The computation returned: the lease, for the caller to release after storing.
    fn finished(mut self) -> LeaseHold {
        self.lease.take()
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let Some((lease_key, token)) = self.lease.take() else {
            return;
        };
        // Outside a runtime (its shutdown) nothing can be sent: the lease expires by itself.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            runtime.spawn(async move {
                let _ = client.del_if_equals(&lease_key, &token).await;
            });
        }
    }
}

/// The outcome of [`Cache::try_lease`].
enum TryLease {
    /// Ours (or no lease is used).
    Taken(LeaseHold),
    /// Another process holds this lease key.
    Busy(String),
    /// Redis did not answer.
    Unavailable,
}
/// `PTTL` replies, in milliseconds (-1: no expiry, -2: no key).
type Ttls = Vec<i64>;

/// The outcome of [`Cache::wait_for_holder`]: ours to compute (with the lease to release, if one was
/// taken), or the value another process computed while we waited.
enum Lease<T> {
    Held(LeaseHold),
    Waited(T),
}

enum Joined {
    Leader(FlightGuard),
    Waiter(FlightReceiver),
}

/// Held by the caller computing a key. Dropping it — after publishing, or on failure or
/// cancellation — removes the flight, and waiters that got no value retry. It owns a handle on
/// the cache (not a borrow) so that a background refresh can carry it into its task.
struct FlightGuard {
    cache: Arc<CacheInner>,
    /// The Redis key being computed.
    key: String,
    id: u64,
    tx: watch::Sender<Option<Flight>>,
}

impl FlightGuard {
    fn publish(&self, flight: Flight) {
        self.tx.send_replace(Some(flight));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if self.tx.borrow().is_none() {
            self.tx.send_replace(Some(Flight::Failed));
        }
        let mut flights = self
            .cache
            .flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if flights.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            flights.remove(&self.key);
        }
    }
}
