//! The backend contract: every case runs against a real redis-server and against `memory://`.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::TryStreamExt;
use rediskit::{BackendKind, Cache, CacheStatus, Client, ErrorKind, NearCacheConfig, ttl};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    id: u64,
    name: String,
    tags: Vec<String>,
}

fn profile(id: u64) -> Profile {
    Profile {
        id,
        name: format!("user {id} ✓"),
        tags: vec!["a".into(), "b".into()],
    }
}

conformance!(
    set_then_get_round_trips,
    missing_key_is_none,
    default_ttl_and_tiers,
    values_expire,
    delete_and_exists,
    batches,
    keys_lists_by_literal_prefix,
    keys_matching_uses_globs_within_namespace,
    namespaces_are_isolated,
    large_values_round_trip,
    wrong_type_is_a_counted_miss_and_deleted,
    bad_input_is_refused,
    get_or_set_computes_once_under_concurrency,
    get_or_set_failure_is_not_cached,
    get_or_set_computes_once_across_processes,
    a_failed_lease_holder_hands_over,
    burst_of_500_tasks_all_succeed,
    closed_client_refuses_calls,
    health_reports_the_backend,
    near_cache_namespace_keeps_the_contract,
);

/// A typed value written with `set` reads back equal, for structs, strings and numbers.
async fn set_then_get_round_trips(client: &Client) {
    let cache = Cache::new(client);
    cache.set("user:1", &profile(1)).await.unwrap();
    cache.set("greeting", "hello").await.unwrap();
    cache.set("n", &42u32).await.unwrap();
    assert_eq!(
        cache.get::<Profile>("user:1").await.unwrap(),
        Some(profile(1))
    );
    assert_eq!(
        cache.get::<String>("greeting").await.unwrap().as_deref(),
        Some("hello")
    );
    assert_eq!(cache.get::<u32>("n").await.unwrap(), Some(42));
    let stats = cache.stats();
    assert_eq!((stats.hits, stats.sets), (3, 3));
}

/// A key never written is a miss, not an error.
async fn missing_key_is_none(client: &Client) {
    let cache = Cache::new(client);
    assert_eq!(cache.get::<Profile>("nobody").await.unwrap(), None);
    assert_eq!(cache.try_get::<Profile>("nobody").await.unwrap(), None);
    assert_eq!(cache.stats().misses, 2);
}

/// `set` uses the default TTL (1 hour); the tiers are 5 min / 1 h / 24 h; a builder sets another.
async fn default_ttl_and_tiers(client: &Client) {
    assert_eq!(ttl::SHORT, Duration::from_secs(300));
    assert_eq!(ttl::MEDIUM, Duration::from_secs(3600));
    assert_eq!(ttl::LONG, Duration::from_secs(86_400));
    assert_eq!(ttl::DEFAULT, ttl::MEDIUM);

    let cache = Cache::new(client);
    cache.set("k", &1).await.unwrap();
    let left = cache.ttl("k").await.unwrap().unwrap();
    assert!(
        left > Duration::from_secs(3590) && left <= ttl::MEDIUM,
        "{left:?}"
    );
    cache.set_with_ttl("short", &1, ttl::SHORT).await.unwrap();
    let left = cache.ttl("short").await.unwrap().unwrap();
    assert!(
        left > Duration::from_secs(290) && left <= ttl::SHORT,
        "{left:?}"
    );

    let daily = Cache::builder(client)
        .namespace("daily")
        .default_ttl(ttl::LONG)
        .build()
        .unwrap();
    daily.set("k", &1).await.unwrap();
    assert!(daily.ttl("k").await.unwrap().unwrap() > Duration::from_secs(86_000));
    assert_eq!(cache.ttl("absent").await.unwrap(), None);
}

/// A value with a short TTL is gone after it, and so are batch-written ones.
async fn values_expire(client: &Client) {
    let cache = Cache::new(client);
    cache
        .set_with_ttl("brief", &1, Duration::from_millis(150))
        .await
        .unwrap();
    cache
        .set_many(&[("b1", 1), ("b2", 2)], Duration::from_millis(150))
        .await
        .unwrap();
    cache
        .set_with_ttl("lasting", &2, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get::<i32>("brief").await.unwrap(), Some(1));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(cache.get::<i32>("brief").await.unwrap(), None);
    assert!(!cache.exists("brief").await.unwrap());
    assert_eq!(
        cache.get_many::<i32>(&["b1", "b2"]).await.unwrap(),
        vec![None, None]
    );
    assert_eq!(cache.get::<i32>("lasting").await.unwrap(), Some(2));
    let listed: Vec<String> = cache.keys("").try_collect().await.unwrap();
    assert_eq!(listed, vec!["lasting".to_string()]);
}

/// `delete` reports whether the key existed; `exists` follows writes and deletes.
async fn delete_and_exists(client: &Client) {
    let cache = Cache::new(client);
    assert!(!cache.exists("k").await.unwrap());
    cache.set("k", "v").await.unwrap();
    assert!(cache.exists("k").await.unwrap());
    assert!(cache.delete("k").await.unwrap());
    assert!(!cache.delete("k").await.unwrap());
    assert!(!cache.exists("k").await.unwrap());
}

/// `get_many` answers in order with gaps for missing keys; `set_many` writes all with the TTL.
async fn batches(client: &Client) {
    let cache = Cache::new(client);
    let items: Vec<(String, Profile)> = (1..=3).map(|i| (format!("p:{i}"), profile(i))).collect();
    cache.set_many(&items, ttl::SHORT).await.unwrap();
    let got = cache
        .get_many::<Profile>(&["p:1", "missing", "p:3"])
        .await
        .unwrap();
    assert_eq!(got, vec![Some(profile(1)), None, Some(profile(3))]);
    assert!(cache.ttl("p:2").await.unwrap().unwrap() <= ttl::SHORT);
    assert_eq!(
        cache.get_many::<Profile>(&[] as &[&str]).await.unwrap(),
        vec![]
    );
    cache
        .set_many(&[] as &[(&str, i32)], ttl::SHORT)
        .await
        .unwrap();
}

/// Listing by prefix treats the caller's text literally: `*`, `?` and `[` match only themselves.
async fn keys_lists_by_literal_prefix(client: &Client) {
    let cache = Cache::new(client);
    for key in [
        "user:1", "user:2", "user*x", "user?y", "user[z]", "other", "usera",
    ] {
        cache.set(key, &1).await.unwrap();
    }
    let mut listed: Vec<String> = cache.keys("user:").try_collect().await.unwrap();
    listed.sort();
    assert_eq!(listed, vec!["user:1", "user:2"]);
    let listed: Vec<String> = cache.keys("user*").try_collect().await.unwrap();
    assert_eq!(listed, vec!["user*x"]);
    let listed: Vec<String> = cache.keys("user?").try_collect().await.unwrap();
    assert_eq!(listed, vec!["user?y"]);
    let listed: Vec<String> = cache.keys("user[").try_collect().await.unwrap();
    assert_eq!(listed, vec!["user[z]"]);
    let all: Vec<String> = cache.keys("").try_collect().await.unwrap();
    assert_eq!(all.len(), 7);
}

/// `keys_matching` takes a real glob, but only within the cache's own namespace.
async fn keys_matching_uses_globs_within_namespace(client: &Client) {
    let cache = Cache::new(client);
    let other = Cache::builder(client).namespace("other").build().unwrap();
    for key in ["a1", "a2", "b1"] {
        cache.set(key, &1).await.unwrap();
        other.set(key, &1).await.unwrap();
    }
    let mut listed: Vec<String> = cache.keys_matching("a?").try_collect().await.unwrap();
    listed.sort();
    assert_eq!(listed, vec!["a1", "a2"]);
    let mut listed: Vec<String> = cache.keys_matching("*1").try_collect().await.unwrap();
    listed.sort();
    assert_eq!(listed, vec!["a1", "b1"]);
}

/// The same key in two namespaces holds two values; deleting one leaves the other.
async fn namespaces_are_isolated(client: &Client) {
    let a = Cache::builder(client).namespace("a").build().unwrap();
    let b = Cache::builder(client).namespace("b").build().unwrap();
    a.set("k", "from a").await.unwrap();
    b.set("k", "from b").await.unwrap();
    assert_eq!(
        a.get::<String>("k").await.unwrap().as_deref(),
        Some("from a")
    );
    assert!(b.delete("k").await.unwrap());
    assert_eq!(
        a.get::<String>("k").await.unwrap().as_deref(),
        Some("from a")
    );
    assert_eq!(a.redis_key("k").unwrap(), "rk:cache:a:k");
}

/// Values far over the compression threshold round-trip; values over the size limit are refused.
async fn large_values_round_trip(client: &Client) {
    let cache = Cache::new(client);
    let big: Vec<Profile> = (0..2000).map(profile).collect();
    cache.set("big", &big).await.unwrap();
    assert_eq!(cache.get::<Vec<Profile>>("big").await.unwrap(), Some(big));

    let small = Cache::builder(client)
        .namespace("small")
        .max_value_size(1000)
        .build()
        .unwrap();
    let err = small.set("too-big", &"x".repeat(2000)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(!small.exists("too-big").await.unwrap());
}

/// A stored value that does not decode as the requested type is a miss, counted, and deleted.
async fn wrong_type_is_a_counted_miss_and_deleted(client: &Client) {
    let cache = Cache::new(client);
    cache.set("k", "a string, not a profile").await.unwrap();
    assert_eq!(cache.get::<Profile>("k").await.unwrap(), None);
    assert_eq!(cache.stats().corrupt, 1);
    assert!(
        !cache.exists("k").await.unwrap(),
        "the undecodable value was deleted"
    );
}

/// Empty, oversized and control-character keys, bad namespaces and zero TTLs are refused with
/// `InvalidInput`, and nothing is written.
async fn bad_input_is_refused(client: &Client) {
    let cache = Cache::new(client);
    let long = "k".repeat(rediskit::MAX_KEY_LEN + 1);
    for key in ["", "line\nbreak", "nul\0byte", long.as_str()] {
        let err = cache.set(key, &1).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{key:?}: {err}");
        assert_eq!(
            cache.get::<i32>(key).await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert!(cache.delete(key).await.is_err());
    }
    let err = cache
        .set_with_ttl("k", &1, Duration::ZERO)
        .await
        .unwrap_err();
    assert!(err.message().contains("ttl"), "{err}");
    assert!(!cache.exists("k").await.unwrap());
    for namespace in ["", "has:colon", "sp ace", "{tag}"] {
        let err = Cache::builder(client)
            .namespace(namespace)
            .build()
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{namespace:?}");
    }
    // Keys with glob, hash-tag and separator characters are fine and stored as they are.
    cache.set("a*{b}:[c]?", &1).await.unwrap();
    assert_eq!(cache.get::<i32>("a*{b}:[c]?").await.unwrap(), Some(1));
    let err = cache
        .get_or_set("", ttl::SHORT, || async { 1 })
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
}

/// 100 concurrent `get_or_set` calls of one cold key run the computation once and all get its
/// value; exactly one reports `Miss`.
async fn get_or_set_computes_once_under_concurrency(client: &Client) {
    let cache = Cache::new(client);
    let runs = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            let runs = runs.clone();
            tokio::spawn(async move {
                cache
                    .try_get_or_set("cold", ttl::SHORT, || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<_, rediskit::Error>(profile(9))
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut misses = 0;
    for task in tasks {
        let lookup = task.await.unwrap();
        assert_eq!(lookup.value, profile(9));
        misses += usize::from(lookup.status == CacheStatus::Miss);
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert_eq!(misses, 1);
    assert_eq!(cache.stats().computations, 1);
    // And it was stored.
    let again = cache
        .try_get_or_set("cold", ttl::SHORT, || async {
            Ok::<_, rediskit::Error>(profile(0))
        })
        .await
        .unwrap();
    assert_eq!((again.value, again.status), (profile(9), CacheStatus::Hit));
}

/// A failed computation returns its error, stores nothing, and the next call computes again.
async fn get_or_set_failure_is_not_cached(client: &Client) {
    #[derive(Debug)]
    enum AppError {
        Boom,
        Cache(#[allow(dead_code)] rediskit::Error),
    }
    impl From<rediskit::Error> for AppError {
        fn from(err: rediskit::Error) -> Self {
            AppError::Cache(err)
        }
    }
    let cache = Cache::new(client);
    let failed = cache
        .try_get_or_set("flaky", ttl::SHORT, || async {
            Err::<i32, _>(AppError::Boom)
        })
        .await;
    assert!(matches!(failed, Err(AppError::Boom)));
    assert!(!cache.exists("flaky").await.unwrap());
    let value = cache
        .get_or_set("flaky", ttl::SHORT, || async { 7 })
        .await
        .unwrap();
    assert_eq!(value, 7);
    assert_eq!(cache.get::<i32>("flaky").await.unwrap(), Some(7));
}

/// 500 tasks writing and reading at once all succeed: callers queue on the connections.
async fn burst_of_500_tasks_all_succeed(client: &Client) {
    let cache = Cache::new(client);
    let tasks: Vec<_> = (0..500u64)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move {
                let key = format!("burst:{i}");
                cache.set(&key, &profile(i)).await?;
                cache.try_get::<Profile>(&key).await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap(), Some(profile(i as u64)));
    }
    assert_eq!(client.stats().errors, 0);
}

/// After `close`, calls fail with `Closed` (which counts as unavailable) and health is not ok;
/// closing twice is fine.
async fn closed_client_refuses_calls(client: &Client) {
    let cache = Cache::new(client);
    cache.set("k", &1).await.unwrap();
    client.close().await;
    client.close().await;
    assert!(client.is_closed());
    let err = cache.try_get::<i32>("k").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
    assert!(err.is_unavailable());
    assert_eq!(cache.get::<i32>("k").await.unwrap(), None, "get stays soft");
    assert!(!client.health().await.ok);
}

/// Health answers ok with the backend's kind and pool figures.
async fn health_reports_the_backend(client: &Client) {
    let health = client.health().await;
    assert!(health.ok, "{health:?}");
    assert!(health.latency.is_some());
    assert_eq!(health.pool.in_use + health.pool.idle, health.pool.max);
    let expected = if client.config().url == "memory://" {
        rediskit::BackendKind::Memory
    } else {
        rediskit::BackendKind::Redis
    };
    assert_eq!(health.backend, expected);
}

/// Two caches over one backend stand for two processes (each has its own in-process single
/// flight): 2 × 50 concurrent `get_or_set` calls of one cold key compute it once in all, through
/// the Redis lease, and every caller gets the value.
async fn get_or_set_computes_once_across_processes(client: &Client) {
    let processes = [Cache::new(client), Cache::new(client)];
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for cache in &processes {
        for _ in 0..50 {
            let cache = cache.clone();
            let runs = runs.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .try_get_or_set("fleet-cold", ttl::SHORT, || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok::<_, rediskit::Error>(profile(5))
                    })
                    .await
                    .unwrap()
            }));
        }
    }
    let mut misses = 0;
    for task in tasks {
        let lookup = task.await.unwrap();
        assert_eq!(lookup.value, profile(5));
        misses += usize::from(lookup.status == CacheStatus::Miss);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "computed once across both processes"
    );
    assert_eq!(misses, 1);
    let listed: Vec<String> = processes[0].keys("").try_collect().await.unwrap();
    assert_eq!(
        listed,
        vec!["fleet-cold".to_string()],
        "leases never show in listings"
    );
}

/// When the process holding the lease fails, another one computes: waiting ends as soon as the
/// lease is released, not at its expiry.
async fn a_failed_lease_holder_hands_over(client: &Client) {
    let first = Cache::builder(client)
        .lease_ttl(Duration::from_secs(30))
        .build()
        .unwrap();
    let second = Cache::builder(client)
        .lease_ttl(Duration::from_secs(30))
        .build()
        .unwrap();
    let failing = tokio::spawn(async move {
        first
            .try_get_or_set("handover", ttl::SHORT, || async {
                tokio::time::sleep(Duration::from_millis(150)).await;
                Err::<i32, rediskit::Error>(rediskit::Error::new(ErrorKind::Backend, "boom"))
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let started = std::time::Instant::now();
    let value = second
        .get_or_set("handover", ttl::SHORT, || async { 11 })
        .await
        .unwrap();
    assert_eq!(value, 11);
    assert!(failing.await.unwrap().is_err());
    // A bound on waiting, far below the 30 s lease: the release ended the wait.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

/// A namespace with the near-cache on keeps the whole contract — reads after writes, deletes,
/// batches, expiry, `get_or_set`, wrong types, a closed client — whether its reads come from
/// memory (Redis, once tracking is live) or not (`memory://`, where it changes nothing).
async fn near_cache_namespace_keeps_the_contract(client: &Client) {
    let cache = Cache::builder(client)
        .namespace("near")
        .near_cache(NearCacheConfig::default())
        .build()
        .unwrap();
    cache.set("warm", "w").await.unwrap();
    if client.backend() == BackendKind::Redis {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cache.stats().near.hits == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "near-cache never served"
            );
            cache.get::<String>("warm").await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    cache.set("user:1", &profile(1)).await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            cache.get::<Profile>("user:1").await.unwrap(),
            Some(profile(1))
        );
    }
    cache.set("user:1", &profile(2)).await.unwrap();
    assert_eq!(
        cache.get::<Profile>("user:1").await.unwrap(),
        Some(profile(2))
    );
    assert!(cache.delete("user:1").await.unwrap());
    assert_eq!(cache.get::<Profile>("user:1").await.unwrap(), None);

    cache
        .set_many(&[("a", 1), ("b", 2)], Duration::from_secs(60))
        .await
        .unwrap();
    for _ in 0..2 {
        assert_eq!(
            cache.get_many::<i32>(&["a", "x", "b"]).await.unwrap(),
            vec![Some(1), None, Some(2)]
        );
    }
    cache
        .set_many(&[("a", 10)], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(cache.get::<i32>("a").await.unwrap(), Some(10));

    cache
        .set_with_ttl("brief", &1, Duration::from_millis(150))
        .await
        .unwrap();
    assert_eq!(cache.get::<i32>("brief").await.unwrap(), Some(1));
    assert_eq!(cache.get::<i32>("brief").await.unwrap(), Some(1));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(cache.get::<i32>("brief").await.unwrap(), None);

    let computed = cache
        .get_or_set("gos", ttl::SHORT, || async { 7 })
        .await
        .unwrap();
    assert_eq!(computed, 7);
    let again = cache
        .try_get_or_set::<i32, rediskit::Error, _, _>("gos", ttl::SHORT, || async { Ok(8) })
        .await
        .unwrap();
    assert_eq!((again.value, again.status), (7, CacheStatus::Hit));

    cache.set("typed", "text").await.unwrap();
    assert_eq!(
        cache.get::<String>("typed").await.unwrap().as_deref(),
        Some("text")
    );
    assert_eq!(
        cache.get::<u32>("typed").await.unwrap(),
        None,
        "another type is a miss"
    );
    assert_eq!(
        cache.get::<String>("typed").await.unwrap(),
        None,
        "and was deleted"
    );

    client.close().await;
    assert_eq!(
        cache.try_get::<String>("warm").await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(cache.get::<String>("warm").await.unwrap(), None);
    assert_eq!(
        cache.get_many::<String>(&["warm"]).await.unwrap(),
        vec![None],
        "get_many stays soft"
    );
}
