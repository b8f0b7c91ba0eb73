//! Beyond one server: Redis Cluster (listing over every primary, batches across slots, failover
//! under load), Sentinel (failover), and `WAIT` after revocations. The conformance suites run on
//! a cluster too (`cluster_backend` in conformance.rs, sessions.rs, ratelimit.rs).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rediskit::{BackendKind, Cache, Client, Config, ErrorKind, Sessions, ttl};
use rediskit_testkit::RedisServer;
use rediskit_testkit::cluster::RedisCluster;
use rediskit_testkit::proxy::FaultProxy;
use rediskit_testkit::sentinel::SentinelSetup;

const SECRET: &str = "a test secret that is long enough for sessions";

async fn cluster_client(cluster: &RedisCluster) -> Client {
    let mut config = common::config("redis://127.0.0.1:1/0");
    config.cluster_nodes = cluster.seeds();
    Client::connect(config).await.unwrap()
}

/// Keys spread over every primary are all listed (SCAN runs on each primary), batches across
/// slots work without CROSSSLOT, and health says "cluster".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_lists_every_primary_and_batches_across_slots() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with(5000))
        .await
        .unwrap();
    let client = cluster_client(&cluster).await;
    assert_eq!(client.health().await.backend, BackendKind::Cluster);
    let cache = Cache::new(&client);
    let items: Vec<(String, u32)> = (0..300).map(|i| (format!("item:{i}"), i)).collect();
    cache.set_many(&items, ttl::MEDIUM).await.unwrap();
    let primaries = cluster.primaries();
    assert_eq!(primaries.len(), 3);
    for port in &primaries {
        let keys: u64 = redis::cmd("DBSIZE")
            .query(&mut cluster.admin(*port))
            .unwrap();
        assert!(keys > 0, "primary {port} holds some of the keys");
    }
    let listed: HashSet<String> = cache.keys("item:").try_collect().await.unwrap();
    assert_eq!(listed.len(), 300, "every primary was scanned");
    let wanted: Vec<String> = items.iter().map(|(key, _)| key.clone()).collect();
    let values: Vec<Option<u32>> = cache.get_many(&wanted).await.unwrap();
    assert_eq!(values, (0..300).map(Some).collect::<Vec<_>>());
    for key in &wanted {
        assert!(cache.delete(key).await.unwrap());
    }
    assert_eq!(cluster.dbsize_total(), 0);
}

/// On a Cluster a cold key's value and its lease live on different nodes, so nothing orders a
/// holder's store and release against another process's look and bid. Two clients (two
/// "processes") race on many cold keys at once: each key must still be computed exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_cold_keys_are_computed_once_across_clients() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with(5000))
        .await
        .unwrap();
    let caches = [
        Cache::new(&cluster_client(&cluster).await),
        Cache::new(&cluster_client(&cluster).await),
    ];
    const KEYS: u64 = 300;
    let computed: Arc<Vec<AtomicU64>> = Arc::new((0..KEYS).map(|_| AtomicU64::new(0)).collect());
    let calls = (0..KEYS).flat_map(|key| {
        caches.iter().map({
            let computed = computed.clone();
            move |cache| {
                let computed = computed.clone();
                async move {
                    cache
                        .get_or_set(&format!("cold:{key}"), ttl::MEDIUM, || async move {
                            computed[key as usize].fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(2)).await;
                            key
                        })
                        .await
                        .unwrap()
                }
            }
        })
    });
    let values = futures_util::future::join_all(calls).await;
    assert!(values.iter().enumerate().all(|(i, &v)| v == i as u64 / 2));
    let twice: Vec<u64> = (0..KEYS)
        .filter(|&key| computed[key as usize].load(Ordering::SeqCst) != 1)
        .collect();
    assert!(twice.is_empty(), "computed more than once: keys {twice:?}");
}

/// On a Cluster, a lease bid (`SET … NX`) whose reply is lost with its connection is sent
/// again by the cluster client and finds the lease taken, by the first run of itself. The
/// caller recognises its own bid and computes at once, rather than waiting the lease out (30 s
/// here) as if another process held it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_bid_sent_again_is_the_callers_own_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with(5000))
        .await
        .unwrap();
    let primary = cluster.primary_for_key("rk:lease:default:cold");
    let proxy = FaultProxy::start(std::net::SocketAddr::from(([127, 0, 0, 1], primary)));
    tokio::task::block_in_place(|| cluster.announce_port(primary, proxy.port()));
    let mut config = common::config("redis://127.0.0.1:1/0");
    config.cluster_nodes = cluster.seeds();
    // Room for noticing the drop, reconnecting and sending again on a loaded machine.
    config.command_timeout = Duration::from_secs(3);
    let cache = Cache::builder(&Client::connect(config).await.unwrap())
        .lease_ttl(Duration::from_secs(30))
        .build()
        .unwrap();
    let computed = AtomicU64::new(0);

    proxy.lose_reply_to(b"\r\nNX\r\n");
    let value = tokio::time::timeout(
        Duration::from_secs(10),
        cache.get_or_set("cold", ttl::MEDIUM, || async {
            computed.fetch_add(1, Ordering::SeqCst);
            7u32
        }),
    )
    .await
    .expect("the caller waited out its own lease")
    .unwrap();
    assert_eq!(
        proxy.mode(),
        rediskit_testkit::proxy::Mode::Pass,
        "no reply was lost"
    );
    assert_eq!((value, computed.load(Ordering::SeqCst)), (7, 1));
}

/// Counts what a load loop saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    unavailable: AtomicU64,
    wrong: AtomicU64,
    /// Microseconds since the start of the last success, to find the gap.
    last_ok_us: AtomicU64,
}

/// Session checks and cache writes, round and round, until `stop`. A failure must be
/// "unavailable" (503 in the service), never "no such session", which the service would turn
/// into 401 and a logged-out user.
async fn load(
    client: Client,
    sessions: Sessions,
    tokens: Vec<String>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    started: Instant,
) {
    let cache = Cache::new(&client);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let token = &tokens[(i as usize) % tokens.len()];
        let results = [
            sessions.lookup(token).await.map(|_| ()),
            cache.set(&format!("load:{}", i % 64), &i).await,
        ];
        for result in results {
            match result {
                Ok(()) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    tally
                        .last_ok_us
                        .fetch_max(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                Err(err) if err.is_unavailable() => {
                    tally.unavailable.fetch_add(1, Ordering::Relaxed);
                }
                Err(err) => {
                    eprintln!("wrong error under failover: {err}");
                    tally.wrong.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Runs `load` on `client` while `fail` kills the primary and waits for the failover; returns
/// the longest run without a success after the kill, and checks that nothing failed with
/// anything but "unavailable" and that the sessions all survived.
async fn failover_under_load(
    client: Client,
    pairs: Vec<(u16, u16)>,
    fail: impl FnOnce() + Send + 'static,
    what: &str,
) -> Duration {
    let sessions = Sessions::new(&client, SECRET).unwrap();
    let mut tokens = Vec::new();
    for user in 0..20 {
        let issued = sessions
            .create(&format!("user-{user}"), "test", None, None)
            .await
            .unwrap();
        tokens.push(issued.token.expose().to_owned());
    }
    // Let the replicas catch up with the sessions before the primary dies: this test is about
    // the gap, not about what asynchronous replication can lose (see docs/reliability.md).
    tokio::task::spawn_blocking(move || wait_replicated(&pairs))
        .await
        .unwrap();
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(load(
                client.clone(),
                sessions.clone(),
                tokens.clone(),
                tally.clone(),
                stop.clone(),
                started,
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = started.elapsed();
    tokio::task::spawn_blocking(fail).await.unwrap();
    // Resumed: successes again, well after the failover settled.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut resumed_at = None;
    while Instant::now() < deadline {
        let before = tally.ok.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let unavailable_before = tally.unavailable.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(300)).await;
        if tally.ok.load(Ordering::Relaxed) > before
            && tally.unavailable.load(Ordering::Relaxed) == unavailable_before
        {
            resumed_at = Some(started.elapsed());
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let resumed_at = resumed_at.unwrap_or_else(|| panic!("{what}: operations did not resume"));
    assert_eq!(
        tally.wrong.load(Ordering::Relaxed),
        0,
        "{what}: only 'unavailable' errors"
    );
    for token in &tokens {
        sessions.lookup(token).await.unwrap();
    }
    let gap = resumed_at.saturating_sub(killed_at);
    eprintln!(
        "{what}: {} ok, {} unavailable; operations back to steady success at most {gap:?} after \
         the kill",
        tally.ok.load(Ordering::Relaxed),
        tally.unavailable.load(Ordering::Relaxed),
    );
    gap
}

/// Waits until every replica of the `(primary port, replica port)` pairs has processed the
/// replication stream as far as its primary had written when called (`master_repl_offset`).
fn wait_replicated(pairs: &[(u16, u16)]) {
    let offset = |port: u16| -> u64 {
        let mut connection = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .unwrap()
            .get_connection_with_timeout(Duration::from_secs(1))
            .unwrap();
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut connection)
            .unwrap();
        info.lines()
            .find_map(|line| line.strip_prefix("master_repl_offset:"))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    };
    for &(primary, replica) in pairs {
        let target = offset(primary);
        let deadline = Instant::now() + Duration::from_secs(10);
        while offset(replica) < target {
            assert!(
                Instant::now() < deadline,
                "replica {replica} never caught up with primary {primary} (offset {target})"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A primary of the cluster dies under load: a replica is promoted, operations resume, and no
/// caller ever saw anything but "unavailable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_failover_under_load() {
    let cluster = tokio::task::spawn_blocking(RedisCluster::start)
        .await
        .unwrap();
    let client = cluster_client(&cluster).await;
    let pairs = cluster
        .replicas()
        .into_iter()
        .map(|replica| (primary_of(&cluster, replica), replica))
        .collect();
    let cluster = Arc::new(std::sync::Mutex::new(cluster));
    let victim_owner = cluster.clone();
    failover_under_load(
        client,
        pairs,
        move || {
            let mut cluster = victim_owner.lock().unwrap();
            // The primary of one of the sessions' users.
            let victim = cluster.primary_for_key("rk:s:{user-3}");
            cluster.kill(victim);
            cluster.wait_for_failover(victim, Duration::from_secs(30));
        },
        "cluster failover",
    )
    .await;
}

/// The port of the primary `replica` replicates from (its `INFO replication`).
fn primary_of(cluster: &RedisCluster, replica: u16) -> u16 {
    let info: String = redis::cmd("INFO")
        .arg("replication")
        .query(&mut cluster.admin(replica))
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("master_port:"))
        .and_then(|port| port.trim().parse().ok())
        .expect("a replica names its primary")
}

/// The Sentinel-managed primary dies under load: the sentinels promote the replica, the handle
/// follows them there, and no caller saw anything but "unavailable".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_under_load() {
    let setup = tokio::task::spawn_blocking(SentinelSetup::start)
        .await
        .unwrap();
    let config = Config::builder()
        .url("redis://127.0.0.1:1/0")
        .max_connections(4)
        .command_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .sentinel(setup.sentinel_addrs(), setup.master_name())
        .build()
        .unwrap();
    let client = Client::connect(config).await.unwrap();
    let health = client.health().await;
    assert!(health.ok, "{health:?}");
    assert_eq!(health.backend, BackendKind::Sentinel);
    let replica = setup.replica_port();
    let pairs = vec![(setup.primary_port(), replica)];
    let setup = Arc::new(std::sync::Mutex::new(setup));
    let killer = setup.clone();
    failover_under_load(
        client.clone(),
        pairs,
        move || {
            let mut setup = killer.lock().unwrap();
            setup.kill_primary();
            let promoted = setup.wait_for_failover(Duration::from_secs(30));
            assert_eq!(promoted, replica);
        },
        "sentinel failover",
    )
    .await;
    // Writes land on the promoted replica.
    Cache::new(&client).set("after", &1).await.unwrap();
    let stored: bool = redis::cmd("EXISTS")
        .arg("rk:cache:default:after")
        .query(&mut setup.lock().unwrap().admin(replica))
        .unwrap();
    assert!(stored, "written to the new primary");
}

/// Sentinels that do not know the primary's name, or are not there: a clear "unavailable" error
/// that names the problem, within the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_errors_are_clear() {
    let setup = tokio::task::spawn_blocking(SentinelSetup::start)
        .await
        .unwrap();
    let config = Config::builder()
        .connect_timeout(Duration::from_millis(500))
        .sentinel(setup.sentinel_addrs(), "no-such-primary")
        .build()
        .unwrap();
    let err = Client::connect(config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    assert!(err.message().contains("no-such-primary"), "{err}");

    let port = rediskit_testkit::free_port();
    let config = Config::builder()
        .connect_timeout(Duration::from_millis(500))
        .sentinel([format!("127.0.0.1:{port}")], "m")
        .build()
        .unwrap();
    let lazy = Client::connect_lazy(config).unwrap();
    // Callers queued behind one failed lookup share its error, which names the sentinel.
    let cache = Cache::new(&lazy);
    let calls = (0..5).map(|_| cache.try_get::<u32>("k"));
    for result in futures_util::future::join_all(calls).await {
        let err = result.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        assert!(
            err.message().contains(&format!("127.0.0.1:{port}")),
            "{err}"
        );
    }
}

/// The first call behind sentinels that accept connections and answer nothing (a partition)
/// fails at its command deadline, not after the lookup's questions (each up to the connect
/// timeout) have all timed out. The lookup goes on meanwhile: once the sentinels answer, calls
/// reach the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_lookup_through_silent_sentinels_keeps_the_command_deadline() {
    let setup = tokio::task::spawn_blocking(SentinelSetup::start)
        .await
        .unwrap();
    let proxies: Vec<FaultProxy> = setup
        .sentinel_addrs()
        .iter()
        .map(|addr| FaultProxy::start(addr.parse().unwrap()))
        .collect();
    for proxy in &proxies {
        proxy.black_hole();
    }
    let config = Config::builder()
        .connect_timeout(Duration::from_secs(2))
        .command_timeout(Duration::from_millis(300))
        .sentinel(
            proxies.iter().map(|proxy| proxy.addr().to_string()),
            setup.master_name(),
        )
        .build()
        .unwrap();
    let cache = Cache::new(&Client::connect_lazy(config).unwrap());
    // Asking the three silent sentinels takes 3 × 2 s; the call must not wait for that.
    let err = tokio::time::timeout(Duration::from_secs(4), cache.try_get::<u32>("k"))
        .await
        .expect("the call waited for the whole lookup")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");

    for proxy in &proxies {
        proxy.pass();
    }
    let started = Instant::now();
    loop {
        match cache.set("k", &1u32).await {
            Ok(()) => break,
            Err(err) if started.elapsed() < Duration::from_secs(20) => {
                assert!(err.is_unavailable(), "{err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("the primary was never found: {err}"),
        }
    }
    assert_eq!(cache.try_get::<u32>("k").await.unwrap(), Some(1));
}

/// Sentinels that require a password are asked with the sentinels' own credentials (never the
/// data ones); without them the error says the sentinels refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_that_require_a_password() {
    let setup = tokio::task::spawn_blocking(|| {
        SentinelSetup::start_with_sentinel_password("sentinel-secret")
    })
    .await
    .unwrap();
    let config = |password: Option<&str>| {
        let mut builder = Config::builder()
            .url("redis://127.0.0.1:1/0")
            .connect_timeout(Duration::from_millis(500))
            .command_timeout(Duration::from_millis(500))
            .sentinel(setup.sentinel_addrs(), setup.master_name());
        if let Some(password) = password {
            builder = builder.sentinel_credentials(None, password);
        }
        builder.build().unwrap()
    };
    let client = Client::connect(config(Some("sentinel-secret")))
        .await
        .unwrap();
    let cache = Cache::new(&client);
    cache.set("k", &1).await.unwrap();
    assert_eq!(cache.try_get::<i32>("k").await.unwrap(), Some(1));

    for password in [None, Some("wrong")] {
        let err = Client::connect(config(password)).await.unwrap_err();
        assert!(err.is_unavailable(), "{err}");
        let message = err.message().to_lowercase();
        assert!(
            message.contains("auth") || message.contains("password"),
            "{err}"
        );
    }
}

/// Sentinels that take clients over TLS: with `sentinel_tls` and the CA, the client finds the
/// primary through them and works; without it (plaintext to a TLS port), or without the CA (an
/// untrusted certificate), it cannot ask them and says so, as unavailable.
#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinels_over_tls() {
    let setup = tokio::task::spawn_blocking(SentinelSetup::start_with_tls)
        .await
        .unwrap();
    let config = |tls: bool, ca: bool| {
        let mut config = Config::builder()
            .url("redis://127.0.0.1:1/0")
            .connect_timeout(Duration::from_millis(500))
            .command_timeout(Duration::from_millis(500))
            .sentinel(setup.tls_sentinel_addrs(), setup.master_name())
            .sentinel_tls(tls)
            .build()
            .unwrap();
        if ca {
            config.tls_ca_file = Some(setup.ca_file());
        }
        config.validate().unwrap();
        config
    };
    let client = Client::connect(config(true, true)).await.unwrap();
    assert_eq!(client.health().await.backend, BackendKind::Sentinel);
    let cache = Cache::new(&client);
    cache.set("k", &1).await.unwrap();
    assert_eq!(cache.try_get::<i32>("k").await.unwrap(), Some(1));

    for (tls, ca) in [(false, false), (true, false)] {
        let err = Client::connect(config(tls, ca)).await.unwrap_err();
        assert!(err.is_unavailable(), "tls {tls}, ca {ca}: {err}");
        assert!(
            err.message().contains("sentinel"),
            "tls {tls}, ca {ca}: {err}"
        );
    }
}

/// A revocation waiting for a replica that does not answer holds no other caller: its `WAIT`
/// blocks its connection until the timeout, and runs on a connection of its own. Reads started
/// while it waits all finish before it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_revocation_holds_no_other_call() {
    let primary = RedisServer::start();
    let port = primary.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let mut config = common::config(&primary.url());
    config.command_timeout = Duration::from_secs(3);
    let client = Client::connect(config).await.unwrap();
    let sessions = Sessions::builder(&client, SECRET)
        .wait_for_replicas(1, Duration::from_millis(1500))
        .build()
        .unwrap();
    let cache = Cache::new(&client);
    cache.set_with_ttl("k", &1u32, ttl::MEDIUM).await.unwrap();
    let issued = sessions.create("alice", "a", None, None).await.unwrap();

    replica.signal("STOP");
    let revoke = sessions.revoke("alice", &issued.session.session_id);
    let reads = async {
        // Let the revocation reach Redis and block first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Enough reads to use every connection the pool deals calls to.
        for _ in 0..20 {
            assert_eq!(cache.try_get::<u32>("k").await.unwrap(), Some(1));
        }
    };
    tokio::pin!(revoke);
    let revoked_first = tokio::select! {
        biased;
        () = reads => false,
        _ = &mut revoke => true,
    };
    let outcome = revoke.await;
    replica.signal("CONT");
    assert!(!revoked_first, "the reads waited for the revocation's WAIT");
    let err = outcome.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
}

/// On a Cluster a revocation and its `WAIT` go to the user's node, as one pipeline: every
/// user's revocation, whichever primary holds it, is acknowledged by that primary's replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_revocations_wait_for_their_nodes_replica() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with(5000))
        .await
        .unwrap();
    let client = cluster_client(&cluster).await;
    let sessions = Sessions::builder(&client, SECRET)
        .wait_for_replicas(1, Duration::from_millis(400))
        .build()
        .unwrap();
    let users: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    let mut nodes = HashSet::new();
    for user in &users {
        nodes.insert(cluster.primary_for_key(&format!("rk:s:{{{user}}}")));
        let issued = sessions.create(user, "d", None, None).await.unwrap();
        sessions.create(user, "e", None, None).await.unwrap();
        assert!(
            sessions
                .revoke(user, &issued.session.session_id)
                .await
                .unwrap()
        );
        assert_eq!(sessions.revoke_all(user).await.unwrap(), 1);
    }
    assert_eq!(nodes.len(), 3, "the users' keys are on every primary");
}

/// A primary and its replica, once the replica's link is up (before that nothing can be
/// measured about replication).
fn primary_and_linked_replica() -> (RedisServer, RedisServer) {
    let primary = RedisServer::start();
    let port = primary.port().to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &port]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut replica.admin())
            .unwrap();
        if info.contains("master_link_status:up") {
            return (primary, replica);
        }
        assert!(Instant::now() < deadline, "replica never linked: {info}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Concurrent revocations that wait for a replica each wait on a blocking connection of their
/// own: with the replica stopped, four at once each answer that the replica did not
/// acknowledge (none times out behind another's `WAIT`), and eight at once — more than the
/// blocking connections — never trip the breaker, whose three failures in a row would have
/// failed every other call of a healthy primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_waiting_revocations_neither_queue_nor_trip_the_breaker() {
    // Arrange
    let (primary, replica) = primary_and_linked_replica();
    let mut config = common::config(&primary.url());
    config.breaker_threshold = 3;
    let client = Client::connect(config).await.unwrap();
    let sessions = Sessions::builder(&client, SECRET)
        .wait_for_replicas(1, Duration::from_millis(200))
        .build()
        .unwrap();
    let users: Vec<String> = (0..12).map(|i| format!("user{i}")).collect();
    let mut issued = Vec::new();
    for user in &users {
        issued.push(sessions.create(user, "d", None, None).await.unwrap());
    }
    let acknowledged: u32 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut primary.admin())
        .unwrap();
    assert_eq!(acknowledged, 1);
    replica.signal("STOP");
    let revoke = |range: std::ops::Range<usize>| {
        futures_util::future::join_all(
            range.map(|i| sessions.revoke(&users[i], &issued[i].session.session_id)),
        )
    };

    // Act
    let four = revoke(0..4).await;
    let eight = revoke(4..12).await;
    replica.signal("CONT");

    // Assert
    for result in &four {
        let err = result.as_ref().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(err.message().contains("replicas acknowledged"), "{err}");
    }
    assert!(eight.iter().all(Result::is_err), "{eight:?}");
    assert_eq!(client.stats().breaker_trips, 0);
    assert!(client.health().await.ok);
}

/// With `wait_for_replicas`, a revocation returns once a replica has it; with the replica
/// stopped it fails as "unavailable" (the revocation stands on the primary; a retry is safe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_can_wait_for_a_replica() {
    let (primary, replica) = primary_and_linked_replica();
    let client = Client::connect(common::config(&primary.url()))
        .await
        .unwrap();
    let sessions = Sessions::builder(&client, SECRET)
        .wait_for_replicas(1, Duration::from_millis(200))
        .build()
        .unwrap();
    let first = sessions.create("alice", "a", None, None).await.unwrap();
    let second = sessions.create("alice", "b", None, None).await.unwrap();
    assert!(
        sessions
            .revoke("alice", &first.session.session_id)
            .await
            .unwrap()
    );
    let on_replica: bool = redis::cmd("HEXISTS")
        .arg("rk:s:{alice}")
        .arg(&first.session.session_id)
        .query(&mut replica.admin())
        .unwrap();
    assert!(
        !on_replica,
        "the replica had the revocation when revoke returned"
    );

    let more: Vec<_> = futures_util::future::join_all(
        ["d0", "d1", "d2"].map(|device| sessions.create("bob", device, None, None)),
    )
    .await;
    // Every write so far acknowledged: one more, and a `WAIT` for it, on another connection.
    let mut admin = primary.admin();
    let () = redis::cmd("SET")
        .arg("marker")
        .arg(1)
        .query(&mut admin)
        .unwrap();
    let acknowledged: u32 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query(&mut admin)
        .unwrap();
    assert_eq!(acknowledged, 1);

    replica.signal("STOP");
    // Each revocation's `WAIT` must count its own write: on any other connection of the pool
    // it would vouch for that connection's older writes, all acknowledged, and succeed.
    for issued in &more {
        let err = sessions
            .revoke("bob", &issued.as_ref().unwrap().session.session_id)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    }
    let err = sessions.revoke_all("alice").await.unwrap_err();
    replica.signal("CONT");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
    assert!(err.message().contains("replicas acknowledged"), "{err}");
    let err = sessions.lookup(second.token.expose()).await.unwrap_err();
    assert_eq!(
        err.kind(),
        ErrorKind::NotFound,
        "revoked on the primary all the same"
    );

    assert!(
        Sessions::builder(&client, SECRET)
            .wait_for_replicas(1, Duration::from_secs(5))
            .build()
            .is_err(),
        "a WAIT longer than the command deadline is refused"
    );
}
