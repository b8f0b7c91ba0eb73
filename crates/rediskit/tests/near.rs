//! The near-cache against real redis-servers: hits come from memory, other clients' writes and
//! deletes reach it within 100 ms, `FLUSHALL` and a lost tracking connection empty it, entries
//! age out, and a reply that races an invalidation is not kept.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use rediskit::{Cache, Client, Config, NearCacheConfig, Sessions, TRACKING_CONNECTION_NAME};
use rediskit_testkit::RedisServer;
use rediskit_testkit::cluster::RedisCluster;
use rediskit_testkit::proxy::FaultProxy;
use rediskit_testkit::sentinel::SentinelSetup;

const SECRET: &str = "near-cache-tests-secret-0123456789abcdef";

/// How soon another client's write must reach the near-cache.
const BOUND: Duration = Duration::from_millis(100);

async fn client(url: &str) -> Client {
    Client::connect(common::config(url)).await.unwrap()
}

fn near(client: &Client, config: NearCacheConfig) -> Cache {
    Cache::builder(client)
        .namespace("hot")
        .near_cache(config)
        .build()
        .unwrap()
}

/// A near-cache whose pool reaches `server` through a fault proxy (its tracking connection
/// goes direct), serving already, and a cache of the same namespace on another client.
async fn held_behind_a_proxy(server: &RedisServer) -> (FaultProxy, Cache, Cache) {
    let proxy = FaultProxy::for_server(server);
    let a = client(&proxy.url()).await;
    a.set_near_cache_target(&server.url()).unwrap();
    let b = client(&server.url()).await;
    let held = near(&a, NearCacheConfig::default());
    let other = Cache::builder(&b).namespace("hot").build().unwrap();
    other.set("warm", "w").await.unwrap();
    until_near_hit(&held, "warm").await;
    (proxy, held, other)
}

/// A server that deletes an expired key only when it is read (`DEBUG SET-ACTIVE-EXPIRE 0`), so
/// that no invalidation comes when a key's time is up.
fn server_without_active_expiry() -> RedisServer {
    let server = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let _: () = redis::cmd("DEBUG")
        .arg("SET-ACTIVE-EXPIRE")
        .arg(0)
        .query(&mut server.admin())
        .unwrap();
    server
}

/// Reads `key` until reads are served from memory: the tracking connection is up, the prefix
/// tracked, and the invalidation of the test's own last write (which comes back too) has passed
/// — two reads 20 ms apart are hits. Panics after 5 s.
async fn until_near_hit(cache: &Cache, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut streak = 0;
    while streak < 2 {
        assert!(Instant::now() < deadline, "the near-cache never served");
        let before = cache.stats().near.hits;
        let _ = cache.get::<String>(key).await.unwrap();
        streak = if cache.stats().near.hits > before {
            streak + 1
        } else {
            0
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `cache.get(key)` until it answers `expected`; returns how long that took. Panics after
/// `within`, showing what it still answered.
async fn until_value(
    cache: &Cache,
    key: &str,
    expected: Option<&str>,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let value = cache.get::<String>(key).await.unwrap();
        if value.as_deref() == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "after {within:?} the near-cache still answers {value:?}, not {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Two clients of one deployment: on the first a near-cache of namespace "hot" keeping entries
/// up to a minute, on the second a plain cache writing the same keys.
async fn reader_and_writer(config: Config) -> (Cache, Cache) {
    let reader = Client::connect(config.clone()).await.unwrap();
    let writer = Client::connect(config).await.unwrap();
    let held = near(
        &reader,
        NearCacheConfig::default().max_age(Duration::from_secs(60)),
    );
    let other = Cache::builder(&writer).namespace("hot").build().unwrap();
    (held, other)
}

/// A fresh 3 + 3 Cluster and [`reader_and_writer`] on it.
async fn on_a_cluster() -> (RedisCluster, Cache, Cache) {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let mut config = common::config("redis://127.0.0.1:1/0");
    config.cluster_nodes = cluster.seeds();
    let (held, other) = reader_and_writer(config).await;
    (cluster, held, other)
}

/// Whether the server behind `admin` has a near-cache tracking connection (`CLIENT LIST`).
fn has_tracking_connection(admin: &mut redis::Connection) -> bool {
    let list: String = redis::cmd("CLIENT").arg("LIST").query(admin).unwrap();
    list.contains(&format!(" name={TRACKING_CONNECTION_NAME} "))
}

/// Writes `key` = `value` through `cache` until a write is accepted, within 10 s: after a
/// failover the writer's own connections follow the new primary in their own time.
async fn write_until_accepted(cache: &Cache, key: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(err) = cache.set(key, value).await {
        assert!(
            Instant::now() < deadline,
            "the writer never reached the new primary: {err}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tracking_connection_id(server: &RedisServer) -> u64 {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut server.admin())
        .unwrap();
    let line = list
        .lines()
        .find(|line| line.contains(&format!(" name={TRACKING_CONNECTION_NAME} ")))
        .unwrap_or_else(|| panic!("no tracking connection in CLIENT LIST:\n{list}"));
    assert!(line.contains("flags=t"), "not tracking: {line}");
    line.split(' ')
        .find_map(|field| field.strip_prefix("id="))
        .unwrap()
        .parse()
        .unwrap()
}

/// A value read once is then served from memory: further reads send no command to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_are_served_without_redis() {
    let server = RedisServer::start();
    let a = client(&server.url()).await;
    let cache = near(&a, NearCacheConfig::default());
    cache.set("k", "v1").await.unwrap();
    until_near_hit(&cache, "k").await;

    let commands = a.stats().commands;
    let hits = cache.stats().near.hits;
    for _ in 0..100 {
        assert_eq!(
            cache.get::<String>("k").await.unwrap().as_deref(),
            Some("v1")
        );
    }
    let many: Vec<Option<String>> = cache.get_many(&["k", "k"]).await.unwrap();
    assert_eq!(many, [Some("v1".to_owned()), Some("v1".to_owned())]);

    assert_eq!(a.stats().commands, commands, "a near hit sent a command");
    assert_eq!(cache.stats().near.hits, hits + 102);
    assert_eq!(cache.stats().near.entries, 1);
}

/// Another client's `set` and `delete` of a held key reach the near-cache within 100 ms, and
/// the new value is then held in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_clients_writes_invalidate_within_100ms() {
    let server = RedisServer::start();
    let a = client(&server.url()).await;
    let b = client(&server.url()).await;
    let held = near(&a, NearCacheConfig::default());
    let other = Cache::builder(&b).namespace("hot").build().unwrap();
    other.set("k", "v1").await.unwrap();
    until_near_hit(&held, "k").await;

    other.set("k", "v2").await.unwrap();
    let took = until_value(&held, "k", Some("v2"), BOUND).await;
    eprintln!("write reached the near-cache after {took:?}");
    until_near_hit(&held, "k").await;

    assert!(other.delete("k").await.unwrap());
    until_value(&held, "k", None, BOUND).await;
    assert!(held.stats().near.invalidations >= 2);
}

/// A client kept beyond the runtime its tracking task ran on (one shared by several
/// `#[tokio::test]`s, say): the near-cache stops serving as the task dies with that runtime, the
/// first read on the next runtime starts tracking again, and the near-cache serves — and drops
/// what another client changes — as before.
#[test]
fn the_near_cache_serves_again_on_a_new_runtime() {
    let server = RedisServer::start();
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    };
    let first = runtime();
    let (held, other) = first.block_on(async {
        let (held, other) = reader_and_writer(common::config(&server.url())).await;
        other.set("k", "v1").await.unwrap();
        until_near_hit(&held, "k").await;
        (held, other)
    });
    drop(first);
    runtime().block_on(async {
        // The pooled connections died with the first runtime too: they reconnect as after a
        // Redis restart, and a call may fail meanwhile.
        let read = || async { held.get::<String>("k").await.ok().flatten() };
        let hits = held.stats().near.hits;
        read().await;
        assert_eq!(held.stats().near.hits, hits, "served with no tracking task");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let before = held.stats().near.hits;
            if read().await.as_deref() == Some("v1") && held.stats().near.hits > before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the near-cache never served again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        write_until_accepted(&other, "k", "v2").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while read().await.as_deref() != Some("v2") {
            assert!(
                Instant::now() < deadline,
                "the near-cache kept the old value"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    });
}

/// This handle's own writes and deletes are read back at once, even while the invalidation
/// Redis sends for them is held up on the way (a black-holed tracking connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_writes_are_read_back_at_once() {
    let server = RedisServer::start();
    let proxy = FaultProxy::for_server(&server);
    let a = client(&server.url()).await;
    a.set_near_cache_target(&proxy.url()).unwrap();
    let cache = near(&a, NearCacheConfig::default());
    cache.set("k", "v1").await.unwrap();
    until_near_hit(&cache, "k").await;

    proxy.black_hole();
    cache.set("k", "v2").await.unwrap();
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("v2")
    );
    cache
        .set_many(&[("k", "v3")], Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("v3")
    );
    assert!(cache.delete("k").await.unwrap());
    assert_eq!(cache.get::<String>("k").await.unwrap(), None);
    proxy.pass();
}

/// `FLUSHALL` (a null invalidation) empties the near-cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_empties_the_near_cache() {
    let server = RedisServer::start();
    let a = client(&server.url()).await;
    let cache = near(&a, NearCacheConfig::default());
    cache.set("k", "v1").await.unwrap();
    until_near_hit(&cache, "k").await;

    let _: () = redis::cmd("FLUSHALL").query(&mut server.admin()).unwrap();

    until_value(&cache, "k", None, BOUND).await;
    assert_eq!(cache.stats().near.flushes, 1);
}

/// When the tracking connection is killed the near-cache is emptied, so a write made while it
/// is gone (whose invalidation nobody receives) is never hidden by an old value; tracking comes
/// back by itself and invalidates again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_tracking_connection_flushes_and_recovers() {
    let server = RedisServer::start();
    let a = client(&server.url()).await;
    let b = client(&server.url()).await;
    let held = near(&a, NearCacheConfig::default());
    let other = Cache::builder(&b).namespace("hot").build().unwrap();
    other.set("k", "v1").await.unwrap();
    until_near_hit(&held, "k").await;
    assert!(held.stats().near.serving);

    let id = tracking_connection_id(&server);
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query(&mut server.admin())
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(1);
    while held.stats().near.flushes == 0 {
        assert!(Instant::now() < deadline, "the loss was not noticed");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    other.set("k", "v2").await.unwrap();

    assert_eq!(
        held.get::<String>("k").await.unwrap().as_deref(),
        Some("v2")
    );
    until_near_hit(&held, "k").await;
    assert_ne!(
        tracking_connection_id(&server),
        id,
        "a new connection tracks"
    );
    other.set("k", "v3").await.unwrap();
    until_value(&held, "k", Some("v3"), BOUND).await;
}

/// A Redis that stops answering without closing the connection (paused) stops the near-cache
/// from serving within the tracking lease: reads go to Redis and fail as unavailable, as they
/// would without a near-cache, instead of answering from memory what nobody can invalidate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_redis_stops_the_near_cache_within_the_lease() {
    let server = RedisServer::start();
    let a = client(&server.url()).await;
    let cache = near(&a, NearCacheConfig::default());
    cache.set("k", "v1").await.unwrap();
    until_near_hit(&cache, "k").await;

    assert!(cache.stats().near.serving);
    server.signal("STOP");
    tokio::time::sleep(rediskit::TRACKING_LEASE + Duration::from_millis(100)).await;
    let serving = cache.stats().near.serving;
    let read = cache.try_get::<String>("k").await;
    server.signal("CONT");

    assert!(!serving, "the stats say it still serves");
    let err = read.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    until_near_hit(&cache, "k").await;
    assert!(cache.stats().near.serving);
}

/// An entry is served for at most the max age, however quiet its key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_expire_after_the_max_age() {
    let server = RedisServer::start();
    let a = client(&server.url()).await;
    let config = NearCacheConfig::default().max_age(Duration::from_millis(300));
    let cache = near(&a, config);
    cache.set("k", "v1").await.unwrap();
    until_near_hit(&cache, "k").await;
    let hits = cache.stats().near.hits;

    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("v1")
    );

    assert_eq!(cache.stats().near.hits, hits, "served past its max age");
}

/// An entry never outlives its key's TTL in Redis, even when Redis is slow to delete the key
/// (active expiry off, so no invalidation comes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_never_outlive_the_redis_ttl() {
    let server = server_without_active_expiry();
    let a = client(&server.url()).await;
    let cache = near(&a, NearCacheConfig::default());
    cache.set("warm", "w").await.unwrap();
    until_near_hit(&cache, "warm").await;
    let invalidations = cache.stats().near.invalidations;
    cache
        .set_with_ttl("brief", "v", Duration::from_millis(300))
        .await
        .unwrap();
    // Our own write's invalidation comes back too; once it has, a read is kept.
    while cache.stats().near.invalidations == invalidations {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        cache.get::<String>("brief").await.unwrap().as_deref(),
        Some("v")
    );
    let hits = cache.stats().near.hits;
    assert_eq!(
        cache.get::<String>("brief").await.unwrap().as_deref(),
        Some("v")
    );
    assert_eq!(cache.stats().near.hits, hits + 1, "held");

    tokio::time::sleep(Duration::from_millis(400)).await;

    assert_eq!(cache.get::<String>("brief").await.unwrap(), None);
}

/// An entry's time counts from when its read was sent, not from when the reply came: behind a
/// slow link (a proxy delaying the pool's replies by 250 ms) a key with a second left is not
/// held past its expiry in Redis (active expiry off, so no invalidation comes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reply_is_held_no_longer_than_its_key_lives() {
    // Arrange
    let server = server_without_active_expiry();
    let (proxy, held, other) = held_behind_a_proxy(&server).await;
    let invalidations = held.stats().near.invalidations;
    other
        .set_with_ttl("brief", "v", Duration::from_millis(1000))
        .await
        .unwrap();
    let written = Instant::now();
    while held.stats().near.invalidations == invalidations {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // Act: a read whose reply takes 250 ms, then reads until past the key's expiry.
    proxy.latency(Duration::from_millis(250));
    let read = held.get::<String>("brief").await.unwrap();
    proxy.pass();
    let hits = held.stats().near.hits;
    let served = held.get::<String>("brief").await.unwrap();
    let held_then = held.stats().near.hits > hits;
    tokio::time::sleep(
        (written + Duration::from_millis(1100)).saturating_duration_since(Instant::now()),
    )
    .await;
    let late = held.get::<String>("brief").await.unwrap();

    // Assert
    assert_eq!(read.as_deref(), Some("v"));
    assert_eq!(served.as_deref(), Some("v"));
    assert!(held_then, "the slow reply was kept while the key lived");
    assert_eq!(late, None, "held past the key's expiry in Redis");
}

/// The race of client-side caching, end to end: a `GET` whose reply is slow (a proxy delays the
/// pool's replies by 200 ms) while another client writes the key and the invalidation arrives
/// first (tracking is direct) returns the old value — but does not keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_overtaken_by_its_invalidation_is_not_kept() {
    let server = RedisServer::start();
    let (proxy, held, other) = held_behind_a_proxy(&server).await;
    other.set("k", "v1").await.unwrap();

    // Reads before this one may have raced too (under load, the invalidations of the writes
    // above can arrive after a read's ticket): count only the slow read's.
    let races = held.stats().near.races;
    proxy.latency(Duration::from_millis(200));
    let slow = {
        let held = held.clone();
        tokio::spawn(async move { held.get::<String>("k").await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    other.set("k", "v2").await.unwrap();
    let old = slow.await.unwrap();
    proxy.pass();

    assert_eq!(
        old.as_deref(),
        Some("v1"),
        "the read started before the write"
    );
    assert_eq!(
        held.stats().near.races,
        races + 1,
        "the slow reply was not kept"
    );
    assert_eq!(
        held.get::<String>("k").await.unwrap().as_deref(),
        Some("v2")
    );
}

/// The session check is answered from memory, and any write to the user's sessions from
/// another client — a new session, a rotation, a revocation — reaches it within 100 ms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_checks_are_cached_and_invalidated_by_any_write() {
    let server = RedisServer::start();
    let a = client(&server.url()).await;
    let b = client(&server.url()).await;
    let checks = Sessions::builder(&a, SECRET)
        .near_cache(NearCacheConfig::default())
        .build()
        .unwrap();
    let writer = Sessions::new(&b, SECRET).unwrap();
    let issued = writer.create("alice", "laptop", None, None).await.unwrap();
    let sid = issued.session.session_id.clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut streak = 0;
    while streak < 2 {
        assert!(Instant::now() < deadline, "the near-cache never served");
        let before = checks.stats().near.hits;
        assert!(checks.session("alice", &sid).await.unwrap().is_some());
        streak = if checks.stats().near.hits > before {
            streak + 1
        } else {
            0
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let commands = a.stats().commands;
    for _ in 0..50 {
        assert!(checks.session("alice", &sid).await.unwrap().is_some());
    }
    assert_eq!(a.stats().commands, commands, "a held check sent a command");

    let invalidated = |n: u64| {
        let checks = checks.clone();
        async move {
            let deadline = Instant::now() + BOUND;
            while checks.stats().near.invalidations < n {
                assert!(Instant::now() < deadline, "invalidation {n} never came");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    let base = checks.stats().near.invalidations;
    writer.create("alice", "phone", None, None).await.unwrap();
    invalidated(base + 1).await;
    let rotated = writer.rotate(issued.token.expose(), None).await.unwrap();
    invalidated(base + 2).await;
    let session = checks.session("alice", &sid).await.unwrap().unwrap();
    assert_eq!(session.generation, rotated.session.generation);

    assert!(writer.revoke("alice", &sid).await.unwrap());
    let started = Instant::now();
    while checks.session("alice", &sid).await.unwrap().is_some() {
        assert!(started.elapsed() < BOUND, "revoked session still live");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// With a stale window, the near-cache holds a value only while it is fresh: `get_or_set`
/// answers from memory then, and once the value enters the window it is `Stale` (and
/// refreshed) as without a near-cache, not served as fresh from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_stale_window_only_fresh_values_are_held() {
    use rediskit::CacheStatus;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let server = RedisServer::start();
    let a = client(&server.url()).await;
    let cache = Cache::builder(&a)
        .namespace("hot")
        .near_cache(NearCacheConfig::default())
        .stale_while_revalidate(Duration::from_secs(30))
        .build()
        .unwrap();
    cache.set("warm", "w").await.unwrap();
    until_near_hit(&cache, "warm").await;
    let ttl = Duration::from_secs(2);
    let runs = Arc::new(AtomicUsize::new(0));
    let get_or_set = |value: &'static str| {
        let runs = runs.clone();
        let cache = cache.clone();
        async move {
            cache
                .try_get_or_set("k", ttl, || async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, rediskit::Error>(value.to_owned())
                })
                .await
                .unwrap()
        }
    };
    let first = get_or_set("v1").await;
    assert_eq!(
        (first.value.as_str(), first.status),
        ("v1", CacheStatus::Miss)
    );
    // Fresh: once tracking is up, hits come from memory.
    let deadline = Instant::now() + ttl - Duration::from_millis(300);
    loop {
        let hits = cache.stats().near.hits;
        let fresh = get_or_set("unused").await;
        assert_eq!(
            (fresh.value.as_str(), fresh.status),
            ("v1", CacheStatus::Hit)
        );
        if cache.stats().near.hits > hits {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no near hit while the value was fresh"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Past its TTL (well inside the window): stale, and refreshed inline by this caller.
    tokio::time::sleep(ttl + Duration::from_millis(200)).await;
    let near_hits = cache.stats().near.hits;
    let refreshed = get_or_set("v2").await;
    assert_eq!(
        (refreshed.value.as_str(), refreshed.status),
        ("v2", CacheStatus::Miss),
        "a stale value was served from memory as fresh"
    );
    assert_eq!(cache.stats().near.hits, near_hits);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

/// Behind Sentinel the near-cache tracks the server the pool uses and follows it through a
/// failover: after a manual one (the old primary demoted, which the tracker learns from `ROLE`
/// or from the sentinels closing its connection) it serves again, tracked on the new primary,
/// and that primary's writes reach it within the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_sentinel_it_follows_the_primary_through_a_failover() {
    let setup = std::sync::Arc::new(
        tokio::task::spawn_blocking(SentinelSetup::start)
            .await
            .unwrap(),
    );
    let config = || {
        Config::builder()
            .url("redis://127.0.0.1:1/0")
            .connect_timeout(Duration::from_millis(500))
            .command_timeout(Duration::from_millis(500))
            .sentinel(setup.sentinel_addrs(), setup.master_name())
            .build()
            .unwrap()
    };
    let (held, other) = reader_and_writer(config()).await;
    other.set("k", "v1").await.unwrap();
    until_near_hit(&held, "k").await;
    other.set("k", "v2").await.unwrap();
    until_value(&held, "k", Some("v2"), BOUND).await;
    until_near_hit(&held, "k").await;

    let failing_over = setup.clone();
    let promoted = tokio::task::spawn_blocking(move || {
        failing_over.failover();
        failing_over.wait_for_failover(Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert_eq!(promoted, setup.replica_port());
    // The sentinels turn the old primary into a replica a little later; until then it still
    // takes writes. Wait for that: the case under test is a demoted primary that still answers.
    let demoted = setup.clone();
    tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // While it resyncs from the new primary it may refuse a connection or a command
            // for a moment (seen under a loaded test run): ask again.
            let role: Option<Vec<redis::Value>> = demoted
                .try_admin(demoted.primary_port())
                .and_then(|mut admin| redis::cmd("ROLE").query(&mut admin))
                .ok();
            if matches!(
                role.as_deref().and_then(<[_]>::first),
                Some(redis::Value::BulkString(r)) if r == b"slave"
            ) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the old primary was never demoted: {role:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap();
    // Another instance writes on the new primary once its own pool has followed (its first
    // writes may meet the demoted primary's READONLY). Asynchronous replication may have lost
    // the older values in the failover, so the test goes on from this one.
    write_until_accepted(&other, "k", "v3").await;
    until_value(&held, "k", Some("v3"), Duration::from_secs(2)).await;
    // Tracking is up again, on the new primary: hits, and its invalidations arrive in time.
    until_near_hit(&held, "k").await;
    other.set("k", "v4").await.unwrap();
    until_value(&held, "k", Some("v4"), BOUND).await;
    assert!(
        has_tracking_connection(&mut setup.admin(promoted)),
        "no tracking connection on the new primary"
    );
}

/// On a Cluster every primary is tracked: writes on each reach the near-cache within the bound.
/// Killing a primary empties it; once the replica has taken over, tracking includes the
/// promoted node (its writes arrive within the bound) and the near-cache serves again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_every_primary_is_tracked_through_a_failover() {
    let (cluster, held, other) = on_a_cluster().await;
    // One key on each primary.
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3);
    let mut keys: Vec<(u16, String)> = Vec::new();
    for i in 0.. {
        let key = format!("k{i}");
        let port = cluster.primary_for_key(&held.redis_key(&key).unwrap());
        if !keys.iter().any(|(p, _)| *p == port) {
            keys.push((port, key));
        }
        if keys.len() == primaries.len() {
            break;
        }
    }
    for (_, key) in &keys {
        other.set(key, "v1").await.unwrap();
        until_near_hit(&held, key).await;
        other.set(key, "v2").await.unwrap();
        until_value(&held, key, Some("v2"), BOUND).await;
    }

    let (victim, key) = keys[0].clone();
    let (cluster, promoted) = tokio::task::spawn_blocking(move || {
        let mut cluster = cluster;
        cluster.kill(victim);
        let promoted = cluster.wait_for_failover(victim, Duration::from_secs(30));
        (cluster, promoted)
    })
    .await
    .unwrap();
    write_until_accepted(&other, &key, "v3").await;
    until_value(&held, &key, Some("v3"), Duration::from_secs(5)).await;
    until_near_hit(&held, &key).await;
    other.set(&key, "v4").await.unwrap();
    until_value(&held, &key, Some("v4"), BOUND).await;
    // The other primaries are still tracked too.
    for (_, key) in &keys[1..] {
        until_near_hit(&held, key).await;
        other.set(key, "v5").await.unwrap();
        until_value(&held, key, Some("v5"), BOUND).await;
    }
    assert!(
        has_tracking_connection(&mut cluster.admin(promoted)),
        "no tracking connection on the promoted primary"
    );
    assert!(held.stats().near.flushes >= 1, "the failover emptied it");
}

/// A manual failover on a Cluster (`CLUSTER FAILOVER` on a replica) drops no connection: the old
/// primary turns replica and keeps answering. The tracker notices the new set of primaries at its
/// next topology check, empties the near-cache and tracks the promoted node too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_manual_failover_is_followed() {
    let (cluster, held, other) = on_a_cluster().await;
    other.set("k", "v1").await.unwrap();
    until_near_hit(&held, "k").await;

    let primary = cluster.primary_for_key(&held.redis_key("k").unwrap());
    let replica = cluster
        .replicas()
        .into_iter()
        .find(|&port| {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query(&mut cluster.admin(port))
                .unwrap();
            info.contains(&format!("master_port:{primary}\r\n"))
        })
        .expect("the primary has a replica");
    let flushes = held.stats().near.flushes;
    let _: () = redis::cmd("CLUSTER")
        .arg("FAILOVER")
        .query(&mut cluster.admin(replica))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !has_tracking_connection(&mut cluster.admin(replica)) {
        assert!(
            Instant::now() < deadline,
            "the promoted primary {replica} never got a tracking connection"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held.stats().near.flushes > flushes, "the move emptied it");
    // Written on the promoted primary once the writer follows; seen within the bound.
    write_until_accepted(&other, "k", "v2").await;
    until_value(&held, "k", Some("v2"), Duration::from_secs(2)).await;
    until_near_hit(&held, "k").await;
    other.set("k", "v3").await.unwrap();
    until_value(&held, "k", Some("v3"), BOUND).await;
}

/// Resharding between tracked primaries: the slot of a held key moves to another primary. The
/// old owner deletes the key as it migrates it (an invalidation), and writes on the new owner
/// are invalidations from a primary already tracked: no stale read, before or after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_resharded_key_stays_coherent() {
    let (cluster, held, other) = on_a_cluster().await;
    other.set("k", "v1").await.unwrap();
    until_near_hit(&held, "k").await;

    let key = held.redis_key("k").unwrap();
    let from = cluster.primary_for_key(&key);
    let to = cluster
        .primaries()
        .into_iter()
        .find(|&port| port != from)
        .unwrap();
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.move_slot_of(&key, to);
        cluster
    })
    .await
    .unwrap();
    assert_eq!(cluster.primary_for_key(&held.redis_key("k").unwrap()), to);
    // Moved, not changed: still v1, and held again once read through the new owner.
    assert_eq!(
        held.get::<String>("k").await.unwrap().as_deref(),
        Some("v1")
    );
    until_near_hit(&held, "k").await;
    write_until_accepted(&other, "k", "v2").await;
    until_value(&held, "k", Some("v2"), BOUND).await;
    until_near_hit(&held, "k").await;
    assert!(other.delete("k").await.unwrap());
    until_value(&held, "k", None, BOUND).await;
}
