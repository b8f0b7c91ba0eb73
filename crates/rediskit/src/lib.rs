//! # rediskit
//!
//! The Redis layer every web back end otherwise writes by hand: one managed connection, a typed
//! cache, health and figures — correct under concurrency, fast, and honest when Redis is down.
//!
//! ## Quick start
//!
//! ```no_run
//! use rediskit::{Cache, Client, Config, ttl};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct Metrics { visitors: u64 }
//!
//! # async fn run() -> rediskit::Result<()> {
//! // REDIS_URL, or REDIS_HOST/PORT/DB in production, DEV_REDIS_* in development.
//! let client = Client::connect(Config::from_env()?).await?;
//! let cache = Cache::new(&client);
//!
//! cache.set_with_ttl("metrics:7d", &Metrics { visitors: 42 }, ttl::SHORT).await?;
//! let hit: Option<Metrics> = cache.get("metrics:7d").await?;
//!
//! // Cache-aside: concurrent callers of a cold key compute it once.
//! let metrics = cache
//!     .get_or_set("metrics:30d", ttl::MEDIUM, || async { Metrics { visitors: 1234 } })
//!     .await?;
//!
//! println!("{}", client.health().await.ok);
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! Without a Redis at hand, `memory://` gives the same API in-process:
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use rediskit::{Cache, Client, Config};
//!
//! let client = Client::connect(Config::builder().url("memory://").build()?).await?;
//! let cache = Cache::new(&client);
//! cache.set("greeting", "hello").await?;
//! assert_eq!(cache.get::<String>("greeting").await?.as_deref(), Some("hello"));
//! # Ok::<(), rediskit::Error>(()) }).unwrap();
//! ```
//!
//! ## Layout
//!
//! - `config` — [`Config`]: from the environment or a builder, validated.
//! - `error` — [`Error`] with a matchable [`ErrorKind`].
//! - `client` — [`Client`]: the connection handle (connect, deadlines, reconnect, health, close).
//! - `breaker` — the circuit breaker in front of Redis ([`BreakerState`]).
//! - `codec` — the stored value format: header, JSON, lz4 over a threshold.
//! - `keys` — key rules and escaping (SCAN patterns, hash tags).
//! - `cache` — [`Cache`]: typed get/set, batches, SCAN listing, `get_or_set` with single flight
//!   and an optional stale-while-revalidate window.
//! - `tokens` — [`Sessions`]: refresh-token sessions with rotation, reuse detection, revocation.
//! - `ratelimit` — [`RateLimiter`]: GCRA in one atomic script, with a failure policy.
//! - `near` — the near-cache (L1): values in process memory, invalidated by Redis (RESP3
//!   client-side caching); opt-in per cache namespace ([`NearCacheConfig`]) and for sessions.
//! - `memory` — the embedded `memory://` backend.
//! - `scripts` — server-side Lua, run by SHA.
//! - `web` (feature `axum`) — access tokens, the authenticated-session extractor, health router,
//!   rate-limit layer, problem documents.

mod batch;
mod breaker;
mod cache;
mod client;
mod coalesce;
mod codec;
mod config;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod keys;
mod memory;
mod near;
#[cfg(test)]
mod proptests;
mod ratelimit;
mod scripts;
mod tokens;
#[cfg(feature = "axum")]
pub mod web;

#[doc(inline)]
pub use breaker::BreakerState;
#[doc(inline)]
pub use cache::{
    Cache, CacheBuilder, CacheStats, CacheStatus, DEFAULT_LEASE_TTL, DEFAULT_NAMESPACE, Lookup,
    MAX_LEASE_TTL, ttl,
};
#[doc(inline)]
pub use client::{
    BackendKind, Client, ClientStats, Health, LATENCY_BUCKETS_US, LatencyHistogram, PoolStats,
};
#[doc(inline)]
pub use codec::{DEFAULT_COMPRESSION_THRESHOLD, DEFAULT_MAX_VALUE_SIZE, DecodeError};
#[doc(inline)]
pub use config::{Config, ConfigBuilder, Environment, Secret, redact_url};
#[doc(inline)]
pub use error::{Error, ErrorKind, Result};
#[doc(inline)]
pub use keys::{MAX_KEY_LEN, MAX_NAME_LEN};
#[doc(inline)]
pub use near::{
    DEFAULT_NEAR_CAPACITY, DEFAULT_NEAR_MAX_AGE, DEFAULT_NEAR_MAX_BYTES, NearCacheConfig,
    NearStats, PING_INTERVAL, TRACKING_CONNECTION_NAME, TRACKING_LEASE,
};
#[doc(inline)]
pub use ratelimit::{Decision, FailurePolicy, Quota, RateLimitStats, RateLimiter};
#[doc(inline)]
pub use tokens::{
    DEFAULT_MAX_SESSIONS, DEFAULT_REFRESH_TTL, Issued, MAX_DEVICE_LEN, MAX_METADATA_LEN,
    MAX_USER_ID_LEN, MIN_SECRET_LEN, RefreshToken, Session, SessionStats, Sessions,
    SessionsBuilder,
};

/// Defaults of [`Config`], as constants.
pub mod defaults {
    pub use crate::config::{
        DEFAULT_BREAKER_COOLDOWN, DEFAULT_BREAKER_THRESHOLD, DEFAULT_COMMAND_TIMEOUT,
        DEFAULT_CONNECT_TIMEOUT, DEFAULT_DEV_HOST, DEFAULT_DEV_URL, DEFAULT_HEALTH_CHECK_INTERVAL,
        DEFAULT_KEY_PREFIX, DEFAULT_MAX_CONNECTIONS, DEFAULT_PORT, DEFAULT_PRODUCTION_HOST,
        MAX_CONNECTIONS_LIMIT, MAX_TIMEOUT,
    };
}

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
