//! Several service instances on one Redis: they share the computation of cold keys and the rate
//! limits. (Revocation across instances: `http_auth.rs::logout_reaches_every_instance`.) The same
//! three on a Redis Cluster: `two_instances_share_a_cluster`.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use rediskit_testkit::RedisServer;
use rediskit_testkit::cluster::RedisCluster;
use serde_json::json;
use support::{PASSWORD, Service, assert_problem};

/// 200 concurrent cold requests spread over two instances run the computation once: exactly one
/// `X-Cache: MISS`, and every body is that computation's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_key_is_computed_once_across_instances() {
    let redis = RedisServer::start();
    let a = Service::builder()
        .redis(&redis)
        .env("DEMO_COMPUTE_MS", "300")
        .start()
        .await;
    let b = Service::builder()
        .redis(&redis)
        .env("DEMO_COMPUTE_MS", "300")
        .start()
        .await;
    let mut requests = Vec::new();
    for i in 0..200 {
        let service = if i % 2 == 0 { &a } else { &b };
        requests.push(service.get("/api/business-metrics/90d"));
    }
    let replies = futures_util::future::join_all(requests).await;
    let mut misses = 0;
    let mut bodies = HashSet::new();
    for reply in &replies {
        reply.assert_status(200);
        match reply.header("x-cache") {
            Some("MISS") => misses += 1,
            Some("HIT") => {}
            other => panic!("X-Cache {other:?}"),
        }
        bodies.insert(reply.text.clone());
    }
    assert_eq!(misses, 1, "one computation in the fleet");
    assert_eq!(bodies.len(), 1, "every answer is that computation's");
}

/// The login limit holds across instances: 3 attempts a minute per user name and address, spent
/// on either instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_hold_across_instances() {
    let redis = RedisServer::start();
    let start = || {
        Service::builder()
            .redis(&redis)
            .env("RATE_LIMIT_LOGIN_PER_MIN", "3")
            .start()
    };
    let a = start().await;
    let b = start().await;
    a.register("alice", PASSWORD).await;
    let attempt = json!({"username": "alice", "password": "wrong-password"});
    for (i, service) in [&a, &b, &a].into_iter().enumerate() {
        let reply = service.post_json("/auth/login", &attempt).await;
        assert_eq!(reply.status.as_u16(), 401, "attempt {i}");
    }
    let refused = b.post_json("/auth/login", &attempt).await;
    assert_problem(&refused, 429);
    assert!(refused.header("retry-after").is_some());
}

/// Two instances on a Redis Cluster: `/health/redis` says "cluster"; a logout on one is seen by
/// the other within 1 s; 200 cold requests over both compute once; a rate limit holds across
/// both. Every key involved lives on one slot (hash tags), so nothing answers CROSSSLOT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_cluster() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with(5000))
        .await
        .unwrap();
    let start = || {
        Service::builder()
            .env("REDIS_CLUSTER_NODES", cluster.seeds().join(","))
            .env("DEMO_COMPUTE_MS", "300")
            .env("RATE_LIMIT_LOGIN_PER_MIN", "3")
            .start()
    };
    let a = start().await;
    let b = start().await;

    let health = b.get("/health/redis").await;
    health.assert_status(200);
    assert_eq!(health.json()["backend"], "cluster", "{}", health.text);

    a.register("alice", PASSWORD).await;
    let pair = a.login("alice", PASSWORD).await;
    b.me(&pair.access_token).await.assert_status(200);
    a.auth_post("/auth/logout", &pair.access_token)
        .await
        .assert_status(204);
    b.assert_me_refused_within(&pair.access_token, Duration::from_secs(1))
        .await;

    let requests: Vec<_> = (0..200)
        .map(|i| {
            let service = if i % 2 == 0 { &a } else { &b };
            service.get("/api/business-metrics/30d")
        })
        .collect();
    let replies = futures_util::future::join_all(requests).await;
    let misses = replies
        .iter()
        .inspect(|reply| {
            reply.assert_status(200);
        })
        .filter(|reply| reply.header("x-cache") == Some("MISS"))
        .count();
    assert_eq!(misses, 1, "one computation in the fleet");
    let bodies: HashSet<&str> = replies.iter().map(|reply| reply.text.as_str()).collect();
    assert_eq!(bodies.len(), 1);

    // alice logged in once already: two more attempts, then the limit, on either instance.
    let attempt = json!({"username": "alice", "password": "wrong-password"});
    for service in [&b, &a] {
        let reply = service.post_json("/auth/login", &attempt).await;
        assert_eq!(reply.status.as_u16(), 401);
    }
    assert_problem(&b.post_json("/auth/login", &attempt).await, 429);
}
