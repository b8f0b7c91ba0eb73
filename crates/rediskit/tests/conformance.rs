//! The backend contract: every case runs against a real redis-server and against `memory://`.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::TryStreamExt;
use rediskit::{BackendKind, Cache, CacheStatus, Client, ErrorKind, Lookup, NearCacheConfig, ttl};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};

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
    a_failed_lease_holder_hands_over_to_one_waiter,
    a_cancelled_computation_releases_its_lease,
    a_panicking_computation_releases_its_lease,
    stale_value_is_served_while_one_caller_refreshes,
    background_refresh_serves_every_caller_stale,
    stale_refresh_runs_once_across_processes,
    a_failed_refresh_keeps_serving_stale,
    past_the_stale_window_is_an_ordinary_miss,
    zero_stale_window_changes_nothing,
    burst_of_500_tasks_all_succeed,
    closed_client_refuses_calls,
    health_reports_the_backend,
    near_cache_namespace_keeps_the_contract,
    write_if_absent_first_one_wins,
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

/// `set_bytes_if_absent`: the first write wins and others see the key taken; the same bytes
/// again (the same command, sent again by a cluster connection after a lost reply) count as
/// the caller's own write; a key of another type is taken, not an error.
async fn write_if_absent_first_one_wins(client: &Client) {
    assert!(
        client
            .set_bytes_if_absent("rk:claim", b"mine")
            .await
            .unwrap()
    );
    assert!(
        !client
            .set_bytes_if_absent("rk:claim", b"theirs")
            .await
            .unwrap()
    );
    assert!(
        client
            .set_bytes_if_absent("rk:claim", b"mine")
            .await
            .unwrap()
    );
    assert_eq!(
        client.get_bytes("rk:claim").await.unwrap(),
        Some(b"mine".to_vec())
    );
    // A hash, as a session key holds.
    let sessions = rediskit::Sessions::new(client, "0123456789abcdef0123456789abcdef-x").unwrap();
    sessions.create("u", "d", None, None).await.unwrap();
    let hash_key = format!("{}s:{{u}}", client.key_prefix());
    assert!(!client.set_bytes_if_absent(&hash_key, b"x").await.unwrap());
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
    for lease in [
        rediskit::MAX_LEASE_TTL + Duration::from_secs(1),
        Duration::MAX,
    ] {
        let err = Cache::builder(client).lease_ttl(lease).build().unwrap_err();
        assert!(err.message().contains("lease_ttl"), "{err}");
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
    } else if !client.config().cluster_nodes.is_empty() {
        rediskit::BackendKind::Cluster
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

/// When the process holding the lease fails, the processes waiting for it bid again, and one of
/// them computes while the others wait for its value: once in the fleet, not once per waiter.
async fn a_failed_lease_holder_hands_over_to_one_waiter(client: &Client) {
    let process = || {
        Cache::builder(client)
            .lease_ttl(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let failing = process();
    let failing = tokio::spawn(async move {
        failing
            .try_get_or_set("handover-one", ttl::SHORT, || async {
                tokio::time::sleep(Duration::from_millis(150)).await;
                Err::<i32, rediskit::Error>(rediskit::Error::new(ErrorKind::Backend, "boom"))
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let (cache, runs) = (process(), runs.clone());
            tokio::spawn(async move {
                cache
                    .get_or_set("handover-one", ttl::SHORT, || async {
                        runs.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        12
                    })
                    .await
                    .unwrap()
            })
        })
        .collect();
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap(), 12);
    }
    assert!(failing.await.unwrap().is_err());
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one waiter took over");
}

/// A computation whose caller is cancelled (an HTTP client gone, say) releases its lease: a
/// caller waiting for the key, here or in another process, computes at once instead of waiting
/// out the lease.
async fn a_cancelled_computation_releases_its_lease(client: &Client) {
    a_lease_holder_that_never_returns_releases(client, "cancelled", |holder| holder.abort()).await;
}

/// A computation that panics releases its lease too.
async fn a_panicking_computation_releases_its_lease(client: &Client) {
    a_lease_holder_that_never_returns_releases(client, "panicking", |_| {}).await;
}

/// A process computes `key` and never returns: `end` aborts its task, or (doing nothing) lets it
/// panic. A caller in this process and one in another get the key long before the 30 s lease
/// would have expired, and no lease is left.
async fn a_lease_holder_that_never_returns_releases(
    client: &Client,
    key: &'static str,
    end: impl FnOnce(&tokio::task::JoinHandle<i32>),
) {
    let process = || {
        Cache::builder(client)
            .lease_ttl(Duration::from_secs(30))
            .build()
            .unwrap()
    };
    let (holder_process, other_process) = (process(), process());
    let panics = key == "panicking";
    let holding = holder_process.clone();
    let holder = tokio::spawn(async move {
        holding
            .get_or_set(key, ttl::SHORT, || async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                assert!(!panics, "the computation panics");
                tokio::time::sleep(Duration::from_secs(60)).await;
                1
            })
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let here = {
        let cache = holder_process.clone();
        tokio::spawn(async move {
            cache
                .get_or_set(key, ttl::SHORT, || async { 2 })
                .await
                .unwrap()
        })
    };
    let elsewhere = tokio::spawn(async move {
        other_process
            .get_or_set(key, ttl::SHORT, || async { 3 })
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    end(&holder);

    // Far below the 30 s lease, far above any machine's slowness.
    let bound = Duration::from_secs(10);
    let here = tokio::time::timeout(bound, here).await;
    let elsewhere = tokio::time::timeout(bound, elsewhere).await;
    let (here, elsewhere) = (here.unwrap().unwrap(), elsewhere.unwrap().unwrap());
    assert!(
        [(2, 2), (3, 3)].contains(&(here, elsewhere)),
        "one of them computed, the other got its value: {here}, {elsewhere}"
    );
    assert!(holder.await.is_err(), "the holder never returned");
    let leases: Vec<String> = Cache::new(client).keys("").try_collect().await.unwrap();
    assert_eq!(leases, vec![key.to_owned()], "only the value is left");
}

/// TTL of the stale-while-revalidate cases: short, so that a test can sleep past it.
const SWR_TTL: Duration = Duration::from_millis(500);
/// Their stale window: far longer than any case needs, so nothing falls out of it by accident.
const SWR_WINDOW: Duration = Duration::from_secs(30);

/// A cache with a stale window; every cache built by this function on one backend shares the
/// namespace (a second one stands for a second process).
fn swr_cache(client: &Client) -> Cache {
    Cache::builder(client)
        .namespace("swr")
        .stale_while_revalidate(SWR_WINDOW)
        .build()
        .unwrap()
}

/// Sleeps until a value written just before is past its TTL (and well inside the window).
async fn pass_the_ttl() {
    tokio::time::sleep(SWR_TTL + Duration::from_millis(200)).await;
}

/// A computation that counts its runs and finishes only once `gate` gives it a permit, so a test
/// decides when a refresh ends instead of guessing with sleeps.
async fn gated(
    runs: Arc<AtomicUsize>,
    gate: Arc<Semaphore>,
    value: Profile,
) -> Result<Profile, rediskit::Error> {
    runs.fetch_add(1, Ordering::SeqCst);
    gate.acquire().await.unwrap().forget();
    Ok(value)
}

/// The next answer of the gated callers. A regression where two callers refresh would leave
/// both waiting at the gate and the test hanging; this turns that into a failure.
async fn next_answer<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("no answer: is more than one caller refreshing (and waiting at the gate)?")
        .expect("a caller panicked")
}

/// Stores `profile(1)` under `key` through `get_or_set` (a cold miss).
async fn store_first(cache: &Cache, key: &str) {
    let first = cache
        .try_get_or_set(key, SWR_TTL, || async {
            Ok::<_, rediskit::Error>(profile(1))
        })
        .await
        .unwrap();
    assert_eq!((first.value, first.status), (profile(1), CacheStatus::Miss));
}

/// Within the stale window, 20 concurrent `try_get_or_set` calls get the stale value at once,
/// except the one that refreshes it inline (exactly one computation, `Miss`); then the new
/// value is a `Hit`. A fresh value is a plain `Hit`, and plain `get` returns a stale value.
async fn stale_value_is_served_while_one_caller_refreshes(client: &Client) {
    // Arrange: a value, fresh, then stale.
    let cache = swr_cache(client);
    store_first(&cache, "report").await;
    let fresh = cache
        .try_get_or_set("report", SWR_TTL, || async {
            Ok::<_, rediskit::Error>(profile(0))
        })
        .await
        .unwrap();
    assert_eq!((fresh.value, fresh.status), (profile(1), CacheStatus::Hit));
    pass_the_ttl().await;
    assert_eq!(
        cache.get::<Profile>("report").await.unwrap(),
        Some(profile(1)),
        "plain get returns a stale value"
    );

    // Act: 20 callers at once; the refresh ends only when the test opens the gate.
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Lookup<Profile>>();
    for _ in 0..20 {
        let (cache, runs, gate, tx) = (cache.clone(), runs.clone(), gate.clone(), tx.clone());
        tokio::spawn(async move {
            let lookup = cache
                .try_get_or_set("report", SWR_TTL, move || gated(runs, gate, profile(2)))
                .await
                .unwrap();
            tx.send(lookup).unwrap();
        });
    }

    // Assert: 19 stale answers arrive while the refresh is still held at the gate.
    for _ in 0..19 {
        let lookup = next_answer(&mut rx).await;
        assert_eq!(
            (lookup.value, lookup.status),
            (profile(1), CacheStatus::Stale)
        );
    }
    gate.add_permits(1);
    let refreshed = next_answer(&mut rx).await;
    assert_eq!(
        (refreshed.value, refreshed.status),
        (profile(2), CacheStatus::Miss)
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one refresh");
    let after = cache
        .try_get_or_set("report", SWR_TTL, || async {
            Ok::<_, rediskit::Error>(profile(3))
        })
        .await
        .unwrap();
    assert_eq!((after.value, after.status), (profile(2), CacheStatus::Hit));
    let stats = cache.stats();
    assert_eq!((stats.computations, stats.stale_hits), (2, 19));
}

/// With the background variant every caller gets the stale value at once; one spawned task
/// computes the new value, and once it is stored callers get it as a `Hit`.
async fn background_refresh_serves_every_caller_stale(client: &Client) {
    // Arrange
    let cache = swr_cache(client);
    store_first(&cache, "report").await;
    pass_the_ttl().await;

    // Act: 20 callers at once, the refresh held at the gate.
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Lookup<Profile>>();
    for _ in 0..20 {
        let (cache, runs, gate, tx) = (cache.clone(), runs.clone(), gate.clone(), tx.clone());
        tokio::spawn(async move {
            let lookup = cache
                .try_get_or_set_background("report", SWR_TTL, move || gated(runs, gate, profile(2)))
                .await
                .unwrap();
            tx.send(lookup).unwrap();
        });
    }

    // Assert: all 20 answered stale before the refresh could end.
    for _ in 0..20 {
        let lookup = next_answer(&mut rx).await;
        assert_eq!(
            (lookup.value, lookup.status),
            (profile(1), CacheStatus::Stale)
        );
    }
    gate.add_permits(1);
    let refreshed = await_background_refresh(&cache, "report", &runs).await;
    assert_eq!(refreshed, profile(2));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one refresh");
    assert_eq!(cache.stats().computations, 2);
}

/// Calls `try_get_or_set_background` on `key` until the background refresh has stored its value,
/// and returns that value; every answer before it must be the stale `profile(1)`, and none of
/// these calls may compute (their computation would count in `runs`).
async fn await_background_refresh(cache: &Cache, key: &str, runs: &Arc<AtomicUsize>) -> Profile {
    for _ in 0..1000 {
        let runs = runs.clone();
        let lookup = cache
            .try_get_or_set_background(key, SWR_TTL, move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, rediskit::Error>(profile(99))
            })
            .await
            .unwrap();
        match lookup.status {
            CacheStatus::Hit => return lookup.value,
            CacheStatus::Stale => assert_eq!(lookup.value, profile(1)),
            other => panic!("{other:?} while waiting for the background refresh"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the background refresh never stored its value");
}

/// Two caches over one backend stand for two processes: 2 × 10 concurrent callers of a stale key
/// run one refresh in all (the Redis lease, taken without waiting); the 19 others get the
/// stale value.
async fn stale_refresh_runs_once_across_processes(client: &Client) {
    // Arrange
    let processes = [swr_cache(client), swr_cache(client)];
    store_first(&processes[0], "fleet").await;
    pass_the_ttl().await;

    // Act
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Lookup<Profile>>();
    for cache in &processes {
        for _ in 0..10 {
            let (cache, runs, gate, tx) = (cache.clone(), runs.clone(), gate.clone(), tx.clone());
            tokio::spawn(async move {
                let lookup = cache
                    .try_get_or_set("fleet", SWR_TTL, move || gated(runs, gate, profile(2)))
                    .await
                    .unwrap();
                tx.send(lookup).unwrap();
            });
        }
    }

    // Assert
    for _ in 0..19 {
        let lookup = next_answer(&mut rx).await;
        assert_eq!(
            (lookup.value, lookup.status),
            (profile(1), CacheStatus::Stale)
        );
    }
    gate.add_permits(1);
    let refreshed = next_answer(&mut rx).await;
    assert_eq!(
        (refreshed.value, refreshed.status),
        (profile(2), CacheStatus::Miss)
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "refreshed once across both processes"
    );
    for cache in &processes {
        assert_eq!(
            cache.get::<Profile>("fleet").await.unwrap(),
            Some(profile(2))
        );
    }
}

/// A refresh that fails leaves the stale value in place: callers meanwhile get it, the caller
/// that ran the inline refresh gets the error, and a later call refreshes. A failed background
/// refresh (logged) likewise leaves the stale value, and a later call's refresh succeeds.
async fn a_failed_refresh_keeps_serving_stale(client: &Client) {
    // Arrange: two stale values, one for each variant.
    let cache = swr_cache(client);
    store_first(&cache, "inline").await;
    store_first(&cache, "background").await;
    pass_the_ttl().await;

    // Act (inline): a failing refresh held at the gate while 5 others call.
    let started = Arc::new(Semaphore::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let failing = {
        let (cache, started, gate) = (cache.clone(), started.clone(), gate.clone());
        tokio::spawn(async move {
            cache
                .try_get_or_set("inline", SWR_TTL, move || async move {
                    started.add_permits(1);
                    gate.acquire().await.unwrap().forget();
                    Err::<Profile, _>(rediskit::Error::new(ErrorKind::Backend, "boom"))
                })
                .await
        })
    };
    // Once its computation runs, the failing call is the refresher: the others are served stale.
    tokio::time::timeout(Duration::from_secs(20), started.acquire())
        .await
        .expect("the failing refresh never started")
        .unwrap()
        .forget();
    for _ in 0..5 {
        let lookup = cache
            .try_get_or_set("inline", SWR_TTL, || async {
                Ok::<_, rediskit::Error>(profile(7))
            })
            .await
            .unwrap();
        assert_eq!(
            (lookup.value, lookup.status),
            (profile(1), CacheStatus::Stale)
        );
    }
    gate.add_permits(1);

    // Assert (inline)
    let err = failing.await.unwrap().unwrap_err();
    assert_eq!(err.message(), "boom");
    assert_eq!(
        cache.get::<Profile>("inline").await.unwrap(),
        Some(profile(1)),
        "the stale value survives the failed refresh"
    );
    let next = cache
        .try_get_or_set("inline", SWR_TTL, || async {
            Ok::<_, rediskit::Error>(profile(2))
        })
        .await
        .unwrap();
    assert_eq!((next.value, next.status), (profile(2), CacheStatus::Miss));

    // Act (background): the spawned refresh fails.
    let stale = cache
        .try_get_or_set_background("background", SWR_TTL, || async {
            Err::<Profile, _>(rediskit::Error::new(ErrorKind::Backend, "boom"))
        })
        .await
        .unwrap();

    // Assert (background): stale meanwhile, and the next refresh stores the new value.
    assert_eq!(
        (stale.value, stale.status),
        (profile(1), CacheStatus::Stale)
    );
    let runs = Arc::new(AtomicUsize::new(0));
    let mut refreshed = None;
    for _ in 0..1000 {
        let runs = runs.clone();
        let lookup = cache
            .try_get_or_set_background("background", SWR_TTL, move || async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, rediskit::Error>(profile(2))
            })
            .await
            .unwrap();
        match lookup.status {
            CacheStatus::Hit => {
                refreshed = Some(lookup.value);
                break;
            }
            CacheStatus::Stale => assert_eq!(lookup.value, profile(1)),
            other => panic!("{other:?} while the stale value should be served"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(refreshed, Some(profile(2)));
    assert_eq!(runs.load(Ordering::SeqCst), 1, "one successful refresh");
}

/// Past TTL + window the value is gone: plain `get` finds nothing and `get_or_set` is an
/// ordinary `Miss`.
async fn past_the_stale_window_is_an_ordinary_miss(client: &Client) {
    // Arrange: a short window this time.
    let cache = Cache::builder(client)
        .stale_while_revalidate(Duration::from_millis(300))
        .build()
        .unwrap();
    store_first(&cache, "brief").await;

    // Act
    tokio::time::sleep(SWR_TTL + Duration::from_millis(300) + Duration::from_millis(300)).await;

    // Assert
    assert_eq!(cache.get::<Profile>("brief").await.unwrap(), None);
    let lookup = cache
        .try_get_or_set("brief", SWR_TTL, || async {
            Ok::<_, rediskit::Error>(profile(2))
        })
        .await
        .unwrap();
    assert_eq!(
        (lookup.value, lookup.status),
        (profile(2), CacheStatus::Miss)
    );
    assert_eq!(cache.stats().stale_hits, 0);
}

/// Without a window (the default) values live exactly their TTL and are never stale: past the
/// TTL `get_or_set` is a `Miss`. With a window, every write (`set` too) is stored TTL + window.
async fn zero_stale_window_changes_nothing(client: &Client) {
    // Arrange
    let plain = Cache::new(client);
    let windowed = swr_cache(client);
    store_first(&plain, "k").await;
    windowed
        .set_with_ttl("k", &profile(1), SWR_TTL)
        .await
        .unwrap();

    // Act
    let plain_left = plain.ttl("k").await.unwrap().unwrap();
    let windowed_left = windowed.ttl("k").await.unwrap().unwrap();
    pass_the_ttl().await;

    // Assert
    assert!(plain_left <= SWR_TTL, "{plain_left:?}");
    assert!(windowed_left > SWR_WINDOW, "{windowed_left:?}");
    assert_eq!(plain.get::<Profile>("k").await.unwrap(), None);
    let lookup = plain
        .try_get_or_set("k", SWR_TTL, || async {
            Ok::<_, rediskit::Error>(profile(2))
        })
        .await
        .unwrap();
    assert_eq!(
        (lookup.value, lookup.status),
        (profile(2), CacheStatus::Miss)
    );
    assert_eq!(plain.stats().stale_hits, 0);
    assert_eq!(
        windowed.get::<Profile>("k").await.unwrap(),
        Some(profile(1)),
        "a value written by `set` is kept for the window too"
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
