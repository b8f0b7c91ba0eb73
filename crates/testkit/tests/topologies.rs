//! The multi-process harnesses: a Redis Cluster and a Sentinel setup start, route and fail over
//! as their docs promise. Run with `--nocapture` to see how long start-up and failover take.

use std::time::{Duration, Instant};

use rediskit_testkit::cluster::RedisCluster;
use rediskit_testkit::sentinel::SentinelSetup;

/// Generous: a failover takes a few seconds, more on a loaded machine.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// A cluster forms with three primaries and three replicas; a key written through a
/// cluster-aware client lands on `primary_for_key`; killing that primary promotes one of the
/// replicas, which then serves the key's slot and still has the key.
#[test]
fn cluster_routes_keys_and_fails_over() {
    let started = Instant::now();
    let mut cluster = RedisCluster::start();
    eprintln!("cluster: formed in {:?}", started.elapsed());
    assert_eq!(cluster.seeds().len(), 6);
    assert_eq!(cluster.primaries().len(), 3);
    let replicas = cluster.replicas();
    assert_eq!(replicas.len(), 3);

    let seeds = cluster
        .seeds()
        .into_iter()
        .map(|seed| format!("redis://{seed}"));
    let mut client = redis::cluster::ClusterClient::new(seeds)
        .and_then(|client| client.get_connection())
        .expect("a cluster connection");
    redis::cmd("SET")
        .arg("user:1")
        .arg("alice")
        .query::<()>(&mut client)
        .expect("SET through the cluster client");
    let owner = cluster.primary_for_key("user:1");
    let mut primary = cluster.admin(owner);
    // A plain connection to any other node would get MOVED instead of the value.
    let stored: Option<String> = redis::cmd("GET")
        .arg("user:1")
        .query(&mut primary)
        .expect("GET on the key's primary");
    assert_eq!(stored.as_deref(), Some("alice"));
    assert_eq!(cluster.dbsize_total(), 1);
    // Replication is asynchronous, and WAIT only covers the calling connection's own writes:
    // write once here (same slot, thanks to the hash tag), so that the replica acknowledging it
    // has everything before it too.
    redis::cmd("SET")
        .arg("{user:1}:replicated")
        .arg("1")
        .query::<()>(&mut primary)
        .expect("SET on the key's primary");
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(10_000)
        .query(&mut primary)
        .expect("WAIT on the key's primary");
    assert_eq!(acked, 1, "the replica did not acknowledge the writes");

    let killed = Instant::now();
    cluster.kill(owner);
    let new = cluster.wait_for_failover(owner, FAILOVER_TIMEOUT);
    eprintln!("cluster: failed over in {:?}", killed.elapsed());

    assert!(
        replicas.contains(&new),
        "{new} was not a replica: {replicas:?}"
    );
    assert_eq!(cluster.primary_for_key("user:1"), new);
    assert!(cluster.primaries().contains(&new));
    assert!(!cluster.primaries().contains(&owner));
    let stored: Option<String> = redis::cmd("GET")
        .arg("user:1")
        .query(&mut cluster.admin(new))
        .expect("GET on the promoted replica");
    assert_eq!(stored.as_deref(), Some("alice"));
    assert_eq!(cluster.dbsize_total(), 2);
    cluster.flushall();
    assert_eq!(cluster.dbsize_total(), 0);
}

/// Three sentinels report the primary as master; killing it makes them promote the replica,
/// which then takes writes.
#[test]
fn sentinel_fails_over_to_the_replica() {
    let started = Instant::now();
    let mut setup = SentinelSetup::start();
    eprintln!("sentinel: ready in {:?}", started.elapsed());
    assert_eq!(setup.master_name(), "rediskit-test");
    assert_eq!(
        setup.current_master(),
        ("127.0.0.1".to_owned(), setup.primary_port())
    );
    let sentinels = setup.sentinel_addrs();
    assert_eq!(sentinels.len(), 3);
    let last_sentinel: u16 = sentinels[2]
        .rsplit(':')
        .next()
        .and_then(|port| port.parse().ok())
        .expect("a sentinel address ends in its port");
    let asked: (String, u16) = redis::cmd("SENTINEL")
        .arg("GET-MASTER-ADDR-BY-NAME")
        .arg(setup.master_name())
        .query(&mut setup.admin(last_sentinel))
        .expect("ask a sentinel through admin");
    assert_eq!(asked.1, setup.primary_port());

    let killed = Instant::now();
    setup.kill_primary();
    let new = setup.wait_for_failover(FAILOVER_TIMEOUT);
    eprintln!("sentinel: failed over in {:?}", killed.elapsed());

    assert_eq!(new, setup.replica_port());
    assert_eq!(setup.current_master(), ("127.0.0.1".to_owned(), new));
    redis::cmd("SET")
        .arg("after-failover")
        .arg("1")
        .query::<()>(&mut setup.admin(new))
        .expect("the promoted replica takes writes");
}

/// The harnesses can be started on a blocking thread (`spawn_blocking`) and shared by async
/// tests.
#[test]
fn harnesses_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<RedisCluster>();
    check::<SentinelSetup>();
}
