//! Several service instances on one Redis: they share the computation of cold keys and the rate
//! limits. (Revocation across instances: `http_auth.rs::logout_reaches_every_instance`.)

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;

use rediskit_testkit::RedisServer;
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
