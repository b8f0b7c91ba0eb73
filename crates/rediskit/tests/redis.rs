//! Behaviour that only a real server shows: restarts, outages, foreign bytes, the wire format.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rediskit::{Cache, CacheStatus, Client, Config, ErrorKind, Lookup, ttl};
use rediskit_testkit::RedisServer;
use tokio::sync::{Semaphore, mpsc};

fn cmd<T: redis::FromRedisValue>(server: &RedisServer, args: &[&[u8]]) -> T {
    let mut command = redis::cmd(std::str::from_utf8(args[0]).unwrap());
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query(&mut server.admin()).unwrap()
}

/// After redis-server is killed and restarted on the same port, calls succeed again within 2 s
/// without recreating the handle; while it is down they fail fast as unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_after_restart() {
    let mut server = RedisServer::start();
    let client = Client::connect(common::config(&server.url()))
        .await
        .unwrap();
    let cache = Cache::new(&client);
    cache.set("k", &1).await.unwrap();

    server.kill();
    let started = Instant::now();
    let err = cache.try_get::<i32>("k").await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "a call hung for {:?}",
        started.elapsed()
    );

    server.restart();
    let restarted = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        match cache.set("k", &2).await {
            Ok(()) => break,
            Err(err) => {
                assert!(err.is_unavailable(), "{err}");
                assert!(
                    restarted.elapsed() < Duration::from_secs(2),
                    "still failing {:?} after the restart: {err}",
                    restarted.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    eprintln!(
        "recovered {:?} after restart, {attempts} attempts",
        restarted.elapsed()
    );
    assert_eq!(cache.get::<i32>("k").await.unwrap(), Some(2));
    // Every connection of the pool recovers, not just one.
    let health = client.health().await;
    assert!(health.ok, "{health:?}");
}

/// With Redis down, `get` is a miss within the command timeout, `get_or_set` still returns the
/// computed value, writes report `Unavailable`, and health says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degrades_when_redis_is_down() {
    let mut server = RedisServer::start();
    let config = Config::builder()
        .url(server.url())
        .max_connections(2)
        .command_timeout(Duration::from_millis(200))
        .connect_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let client = Client::connect(config).await.unwrap();
    let cache = Cache::new(&client);
    server.kill();

    for _ in 0..3 {
        let started = Instant::now();
        assert_eq!(cache.get::<i32>("k").await.unwrap(), None);
        // A bound on hanging, not a speed target: the deadline is 200 ms.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }
    let value = cache
        .get_or_set("k", ttl::SHORT, || async { 41 + 1 })
        .await
        .unwrap();
    assert_eq!(value, 42);
    let err = cache.set("k", &1).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(cache.stats().errors >= 4);
    let health = client.health().await;
    assert!(!health.ok);
    assert!(health.error.is_some());
}

/// `connect` fails with a clear unavailability error when nothing listens; `connect_lazy`
/// starts anyway and works once the server is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_eager_and_lazy() {
    let port = rediskit_testkit::free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    let err = Client::connect(common::config(&url)).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(
        err.message().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );

    let client = Client::connect_lazy(common::config(&url)).unwrap();
    assert!(
        Cache::new(&client)
            .try_get::<i32>("k")
            .await
            .unwrap_err()
            .is_unavailable()
    );
}

/// Bytes written by another program (plain JSON, garbage, a future format) are a miss that is
/// counted and deleted, and never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_and_corrupted_bytes_are_misses() {
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let cache = Cache::new(&backend.client);
    let cases: [&[u8]; 5] = [
        b"{\"id\": 1}",
        b"\xF5",
        b"\xF5\x09\x01{}",
        b"\xF5\x01\x11\xFF\xFF\xFF\x7F garbage",
        b"\xF5\x01\x01{not json",
    ];
    for (i, bytes) in cases.iter().enumerate() {
        let key = format!("bad:{i}");
        let redis_key = cache.redis_key(&key).unwrap();
        let _: () = cmd(server, &[b"SET", redis_key.as_bytes(), bytes]);
        assert_eq!(
            cache.get::<serde_json::Value>(&key).await.unwrap(),
            None,
            "case {i}"
        );
        let exists: u64 = cmd(server, &[b"EXISTS", redis_key.as_bytes()]);
        assert_eq!(exists, 0, "case {i} was deleted");
    }
    assert_eq!(cache.stats().corrupt, cases.len() as u64);
}

/// A cache key holding another Redis type (a hash, left by another program) is a counted miss,
/// as `MGET` and `memory://` answer, on every read path (`GET`, the stale window's script, the
/// near-cache's); `get_or_set` computes and its write replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_is_a_miss() {
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let caches = [
        Cache::new(&backend.client),
        Cache::builder(&backend.client)
            .namespace("stale")
            .stale_while_revalidate(Duration::from_secs(60))
            .build()
            .unwrap(),
        Cache::builder(&backend.client)
            .namespace("near")
            .near_cache(rediskit::NearCacheConfig::default())
            .build()
            .unwrap(),
    ];
    for cache in &caches {
        let redis_key = cache.redis_key("hashed").unwrap();
        let _: u64 = cmd(server, &[b"HSET", redis_key.as_bytes(), b"f", b"v"]);

        assert_eq!(cache.get::<i32>("hashed").await.unwrap(), None);
        let many = cache.get_many::<i32>(&["hashed"]).await.unwrap();
        assert_eq!(many, vec![None]);
        let computed = cache
            .get_or_set("hashed", ttl::SHORT, || async { 7 })
            .await
            .unwrap();

        assert_eq!(computed, 7);
        assert_eq!(cache.get::<i32>("hashed").await.unwrap(), Some(7));
        assert!(cache.stats().corrupt >= 2, "{:?}", cache.stats());
    }
}

/// `memory://` lists with a glob exactly what Redis's `SCAN MATCH` does, malformed patterns
/// included (a class never closed, a range ending in `]`, a trailing backslash, bytes above 0x7F in a
/// range).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_globs_match_what_redis_matches() {
    let redis = common::Backend::redis().await;
    let memory = common::Backend::memory().await;
    let keys = [
        "a", "ab", "abc", "ac", "a]", "a-", "a\\", "a`", "a[b", "a^", "a*", "aé", "a~", "b", "é",
        "]", "-", "[", "^x", "zz",
    ];
    let patterns = [
        "[abc", "a[b", "a[a-]", "[\\", "a[\\", "a[]", "a[]]", "a[^]", "a[^", "a[a-é]", "a[é-a]",
        "[^a-z]*", "a\\", "a[!b]", "*[", "a[b-", "a[-b]", "a?", "\\a*", "[]a]*", "a[a-c-e]", "*\\",
        "a[\\]]", "[", "*]*", "a[z-a]",
    ];
    let caches = [Cache::new(&redis.client), Cache::new(&memory.client)];
    for cache in &caches {
        for key in keys {
            cache.set(key, &1).await.unwrap();
        }
    }
    for pattern in patterns {
        let mut listed = Vec::new();
        for cache in &caches {
            let mut keys: Vec<String> = cache.keys_matching(pattern).try_collect().await.unwrap();
            keys.sort();
            listed.push(keys);
        }
        assert_eq!(listed[1], listed[0], "memory:// and Redis on {pattern:?}");
    }
}

/// Deleting an undecodable value never removes a good value written in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discarding_spares_a_fresh_value() {
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let cache = Cache::new(&backend.client);
    let redis_key = cache.redis_key("k").unwrap();
    let _: () = cmd(server, &[b"SET", redis_key.as_bytes(), b"garbage"]);
    // The script deletes only the exact bytes it was shown.
    let kept: u64 = redis::Script::new(include_str!("../src/scripts/del_if_equals.lua"))
        .key(&redis_key)
        .arg("other bytes")
        .invoke(&mut server.admin())
        .unwrap();
    assert_eq!(kept, 0);
    assert_eq!(cache.get::<i32>("k").await.unwrap(), None);
}

/// The stored format: a header byte, value and TTL written together, large values compressed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_format() {
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let cache = Cache::new(&backend.client);
    cache.set_with_ttl("small", "hi", ttl::SHORT).await.unwrap();
    let raw: Vec<u8> = cmd(server, &[b"GET", b"rk:cache:default:small"]);
    assert_eq!(raw, b"\xF5\x01\x01\"hi\"");
    let pttl: i64 = cmd(server, &[b"PTTL", b"rk:cache:default:small"]);
    assert!(pttl > 290_000 && pttl <= 300_000, "{pttl}");

    let big: Vec<String> = (0..500).map(|i| format!("item number {i}")).collect();
    cache.set("big", &big).await.unwrap();
    let raw: Vec<u8> = cmd(server, &[b"GET", b"rk:cache:default:big"]);
    let json_len = serde_json::to_vec(&big).unwrap().len();
    assert_eq!(raw[2] >> 4, 1, "lz4");
    assert!(raw.len() < json_len / 2, "{} vs {json_len}", raw.len());
}

/// The next answer of the gated callers. A regression where two callers refresh would leave
/// both waiting at the gate and the test hanging; this turns that into a failure.
async fn next_answer<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("no answer: is more than one caller refreshing (and waiting at the gate)?")
        .expect("a caller panicked")
}

/// Two `Client`s on one redis-server stand for two processes: of 2 × 10 concurrent callers of a
/// stale key, one refreshes it (it takes the lease; the other process's would-be refresher finds
/// the lease taken and serves stale), and the value is stored for TTL + window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_refresh_runs_once_across_clients() {
    // Arrange: two handles, a value past its TTL.
    let server = RedisServer::start();
    let ttl = Duration::from_millis(500);
    let window = Duration::from_secs(30);
    let mut caches = Vec::new();
    for _ in 0..2 {
        let client = Client::connect(common::config(&server.url()))
            .await
            .unwrap();
        let cache = Cache::builder(&client)
            .stale_while_revalidate(window)
            .build()
            .unwrap();
        caches.push(cache);
    }
    let first = caches[0]
        .try_get_or_set("fleet", ttl, || async { Ok::<_, rediskit::Error>(1) })
        .await
        .unwrap();
    assert_eq!((first.value, first.status), (1, CacheStatus::Miss));
    let pttl: i64 = cmd(&server, &[b"PTTL", b"rk:cache:default:fleet"]);
    assert!(
        pttl > 30_000 && pttl <= 30_500,
        "stored for TTL + window: {pttl}"
    );
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;

    // Act: the refresh is held at a gate until the 19 others have answered.
    let runs = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Lookup<i32>>();
    for cache in &caches {
        for _ in 0..10 {
            let (cache, runs, gate, tx) = (cache.clone(), runs.clone(), gate.clone(), tx.clone());
            tokio::spawn(async move {
                let lookup = cache
                    .try_get_or_set("fleet", ttl, move || async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        gate.acquire().await.unwrap().forget();
                        Ok::<_, rediskit::Error>(2)
                    })
                    .await
                    .unwrap();
                tx.send(lookup).unwrap();
            });
        }
    }

    // Assert
    for _ in 0..19 {
        let lookup = next_answer(&mut rx).await;
        assert_eq!((lookup.value, lookup.status), (1, CacheStatus::Stale));
    }
    gate.add_permits(1);
    let refreshed = next_answer(&mut rx).await;
    assert_eq!((refreshed.value, refreshed.status), (2, CacheStatus::Miss));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "one refresh in both processes"
    );
    let lease: u64 = cmd(&server, &[b"EXISTS", b"rk:lease:default:fleet"]);
    assert_eq!(lease, 0, "the lease was released");
}

/// With a window, a hit is still one Redis call (value and age come from one script), as
/// without; a value that another program stored without expiry is never stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_window_reads_in_one_call() {
    // Arrange
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let client = &backend.client;
    let plain = Cache::builder(client).namespace("plain").build().unwrap();
    let windowed = Cache::builder(client)
        .namespace("windowed")
        .stale_while_revalidate(Duration::from_secs(60))
        .build()
        .unwrap();
    let compute = || async { Ok::<_, rediskit::Error>(1) };
    for cache in [&plain, &windowed] {
        cache
            .try_get_or_set("k", ttl::SHORT, compute)
            .await
            .unwrap();
        // The script's first call may have loaded it; count from here.
        cache
            .try_get_or_set("k", ttl::SHORT, compute)
            .await
            .unwrap();
    }

    // Act
    let mut calls = Vec::new();
    for cache in [&plain, &windowed] {
        let before = client.stats().commands;
        let lookup = cache
            .try_get_or_set("k", ttl::SHORT, compute)
            .await
            .unwrap();
        assert_eq!(lookup.status, CacheStatus::Hit);
        calls.push(client.stats().commands - before);
    }

    // Assert
    assert_eq!(calls, vec![1, 1], "Redis calls per hit: plain, windowed");
    let _: () = cmd(
        server,
        &[b"SET", b"rk:cache:windowed:forever", b"\xF5\x01\x017"],
    );
    let lookup = windowed
        .try_get_or_set("forever", ttl::SHORT, || async {
            Ok::<_, rediskit::Error>(0)
        })
        .await
        .unwrap();
    assert_eq!((lookup.value, lookup.status), (7, CacheStatus::Hit));
}

/// Listing keys uses SCAN, never KEYS, and pages through more keys than one SCAN page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_uses_scan_not_keys() {
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let cache = Cache::new(&backend.client);
    let items: Vec<(String, u32)> = (0..1500).map(|i| (format!("item:{i}"), i)).collect();
    cache.set_many(&items, ttl::SHORT).await.unwrap();
    let _: () = cmd(server, &[b"SET", b"unrelated", b"x"]);
    let listed: Vec<String> = cache.keys("item:").try_collect().await.unwrap();
    let unique: std::collections::HashSet<_> = listed.iter().collect();
    assert_eq!(unique.len(), 1500);
    let stats: String = cmd(server, &[b"INFO", b"commandstats"]);
    assert!(stats.contains("cmdstat_scan:"), "{stats}");
    assert!(!stats.contains("cmdstat_keys:"), "{stats}");
}

/// 500 tasks on a handle of only 2 connections all succeed: the burst queues, it never fails
/// with "too many connections", and the server sees at most the configured connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_on_two_connections() {
    let server = RedisServer::start();
    let config = Config::builder()
        .url(server.url())
        .max_connections(2)
        .build()
        .unwrap();
    let client = Client::connect(config).await.unwrap();
    let cache = Cache::new(&client);
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache.set(&format!("k{i}"), &i).await?;
                cache.try_get::<i32>(&format!("k{i}")).await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap(), Some(i as i32));
    }
    let clients: String = cmd(&server, &[b"CLIENT", b"LIST"]);
    // Our 2 plus the admin connection asking.
    assert_eq!(clients.lines().count(), 3, "{clients}");
}

/// Calls take turns on one connection per runtime worker thread (here 3 of the 8), so each
/// worker can drive a connection while the rest stay idle for bursts.
#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn calls_share_one_connection_per_worker() {
    let server = RedisServer::start();
    let mut config = common::config(&server.url());
    config.max_connections = 8;
    let client = Client::connect(config).await.unwrap();
    let cache = Cache::new(&client);
    for i in 0..30 {
        assert_eq!(cache.try_get::<i32>(&format!("k{i}")).await.unwrap(), None);
    }
    let clients: String = cmd(&server, &[b"CLIENT", b"LIST"]);
    let used = clients
        .lines()
        .filter(|line| line.contains(" cmd=get "))
        .count();
    assert_eq!(used, 3, "{clients}");
}

/// A server that stops answering (SIGSTOP) makes calls time out at the deadline instead of
/// hanging; after SIGCONT the same handle works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_server_times_out_then_recovers() {
    let server = RedisServer::start();
    let config = Config::builder()
        .url(server.url())
        .max_connections(1)
        .command_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let client = Client::connect(config).await.unwrap();
    let cache = Cache::new(&client);
    server.signal("STOP");
    let started = Instant::now();
    let err = cache.try_get::<i32>("k").await.unwrap_err();
    let waited = started.elapsed();
    server.signal("CONT");
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.set("k", &1).await.is_err() {
        assert!(Instant::now() < deadline, "no recovery after SIGCONT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(client.stats().timeouts, 1);
}

/// The password given in the configuration authenticates, and a wrong one is an error that does
/// not echo it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_authentication() {
    let server = RedisServer::start_with(&["--requirepass", "correct-horse"]);
    let url = format!("redis://127.0.0.1:{}/0", server.port());
    let config = Config::builder()
        .url(&url)
        .password("correct-horse")
        .build()
        .unwrap();
    let client = Client::connect(config).await.unwrap();
    Cache::new(&client).set("k", &1).await.unwrap();

    let config = Config::builder()
        .url(&url)
        .password("wrong-battery")
        .build()
        .unwrap();
    let err = Client::connect(config).await.unwrap_err();
    assert!(!err.to_string().contains("wrong-battery"), "{err}");
}

/// Closing waits for calls in flight and then drops the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_drops_connections() {
    let server = RedisServer::start();
    let client = Client::connect(common::config(&server.url()))
        .await
        .unwrap();
    let before: String = cmd(&server, &[b"CLIENT", b"LIST"]);
    assert_eq!(before.lines().count(), 5, "4 pooled + admin: {before}");
    client.close().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after: String = cmd(&server, &[b"CLIENT", b"LIST"]);
        if after.lines().count() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "connections still open: {after}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// After a run of failures the circuit opens and calls fail fast without touching the network;
/// after the cool-down one call probes, and once Redis is back the circuit closes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_breaker_fails_fast_then_recovers() {
    let mut server = RedisServer::start();
    let config = Config::builder()
        .url(server.url())
        .max_connections(1)
        .command_timeout(Duration::from_millis(300))
        .breaker(3, Duration::from_millis(500))
        .build()
        .unwrap();
    let client = Client::connect(config).await.unwrap();
    let cache = Cache::new(&client);
    server.kill();
    for _ in 0..3 {
        assert!(
            cache
                .try_get::<i32>("k")
                .await
                .unwrap_err()
                .is_unavailable()
        );
    }
    let stats = client.stats();
    assert_eq!(
        (stats.breaker, stats.breaker_trips),
        (rediskit::BreakerState::Open, 1)
    );
    let commands = stats.commands;
    let err = cache.try_get::<i32>("k").await.unwrap_err();
    assert!(
        err.is_unavailable() && err.message().contains("circuit open"),
        "{err}"
    );
    assert_eq!(
        client.stats().commands,
        commands,
        "failing fast sends nothing"
    );
    assert_eq!(client.stats().breaker_rejected, 1);
    // Health reports the breaker, and its own PING bypasses it.
    let health = client.health().await;
    assert_eq!(health.breaker, rediskit::BreakerState::Open);
    assert!(!health.ok);

    server.restart();
    let restarted = Instant::now();
    while cache.set("k", &1).await.is_err() {
        assert!(restarted.elapsed() < Duration::from_secs(5), "no recovery");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("breaker closed {:?} after the restart", restarted.elapsed());
    assert_eq!(client.stats().breaker, rediskit::BreakerState::Closed);
}
