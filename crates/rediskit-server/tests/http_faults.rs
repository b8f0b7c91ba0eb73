//! The service when Redis fails, black box: auth fails closed with 503 and `Retry-After`, the
//! cached computation keeps answering, health says so, and everything comes back when Redis
//! does — without restarting the service. Plus the development fallback to `memory://` and its
//! absence in production.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use rediskit_testkit::{RedisServer, free_port};
use support::{PASSWORD, Service, assert_problem, assert_unavailable};

/// How long the service may take to notice that Redis is back.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);

/// Redis killed mid-run: login, refresh, register and `/me` answer 503 problems with
/// `Retry-After` (never 500, never 200 for `/me`); the cached computation still answers 200;
/// `/health/redis` is 503 unhealthy. After Redis restarts (empty), health and the account
/// flows come back within a bounded time, in the same service process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted() {
    // Arrange: a user with a live session, then Redis dies.
    let mut redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("REDIS_COMMAND_TIMEOUT_MS", "300")
        .env("REDIS_CONNECT_TIMEOUT_MS", "300")
        .start()
        .await;
    service.register("alice", PASSWORD).await;
    let pair = service.login("alice", PASSWORD).await;
    service.me(&pair.access_token).await.assert_status(200);
    redis.kill();

    // Act / Assert: auth fails closed.
    assert_unavailable(&service.try_login("alice", PASSWORD).await);
    assert_unavailable(&service.refresh(&pair.refresh_token).await);
    assert_unavailable(&service.me(&pair.access_token).await);
    assert_unavailable(&service.try_register("bob", PASSWORD).await);
    assert_unavailable(&service.auth_get("/auth/sessions", &pair.access_token).await);

    // Act / Assert: the cache degrades to computing; liveness is unaffected; health tells.
    let metrics = service.get("/api/business-metrics/30d").await;
    metrics.assert_status(200);
    metrics.json();
    service.get("/health").await.assert_status(200);
    let health = support::assert_redis_health(&service.get("/health/redis").await, 503, "redis");
    assert_eq!(health["redis_connected"], false, "{health}");

    // Act: Redis comes back, empty, on the same port.
    redis.restart();

    // Assert: health recovers, then the account flows work again.
    let deadline = Instant::now() + RECOVERY_BOUND;
    loop {
        let reply = service.get("/health/redis").await;
        if reply.status == 200 {
            let health = support::assert_redis_health(&reply, 200, "redis");
            assert_eq!(health["redis_connected"], true, "{health}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "/health/redis still {} {} {RECOVERY_BOUND:?} after the restart",
            reply.status,
            reply.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    loop {
        let reply = service.try_register("carol", PASSWORD).await;
        if reply.status == 201 {
            break;
        }
        assert_unavailable(&reply);
        assert!(
            Instant::now() < deadline,
            "register still 503 {RECOVERY_BOUND:?} after the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fresh = service.login("carol", PASSWORD).await;
    service.me(&fresh.access_token).await.assert_status(200);
    support::TokenPair::from_reply(&service.refresh(&fresh.refresh_token).await);
}

/// In development, with no REDIS_URL and nothing answering at DEV_REDIS_HOST:DEV_REDIS_PORT,
/// the service runs on the embedded store: health says `memory`, and accounts work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_falls_back_to_memory() {
    // Arrange: a port where nothing listens.
    let service = Service::builder()
        .env("ENVIRONMENT", "development")
        .env("DEV_REDIS_HOST", "127.0.0.1")
        .env("DEV_REDIS_PORT", free_port().to_string())
        .env("REDIS_CONNECT_TIMEOUT_MS", "300")
        .env("REDIS_COMMAND_TIMEOUT_MS", "300")
        .start()
        .await;

    // Act
    let health = service.get("/health/redis").await;

    // Assert
    support::assert_redis_health(&health, 200, "memory");
    service.register("alice", PASSWORD).await;
    let pair = service.login("alice", PASSWORD).await;
    service.me(&pair.access_token).await.assert_status(200);
    let metrics = service.get("/api/business-metrics/7d").await;
    metrics.assert_status(200);
}

/// In production an unreachable Redis is reported, never replaced: the service starts,
/// `/health/redis` is 503 with backend `redis`, and auth answers 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_never_falls_back() {
    // Arrange: the production variables point where nothing listens.
    let service = Service::builder()
        .env("ENVIRONMENT", "production")
        .env("REDIS_HOST", "127.0.0.1")
        .env("REDIS_PORT", free_port().to_string())
        .env("REDIS_CONNECT_TIMEOUT_MS", "300")
        .env("REDIS_COMMAND_TIMEOUT_MS", "300")
        .start()
        .await;

    // Act
    let health = service.get("/health/redis").await;

    // Assert
    let body = support::assert_redis_health(&health, 503, "redis");
    assert_eq!(body["redis_connected"], false, "{body}");
    assert_unavailable(&service.try_register("alice", PASSWORD).await);
    assert_unavailable(&service.try_login("alice", PASSWORD).await);
    service
        .get("/api/business-metrics/7d")
        .await
        .assert_status(200);
}

/// In development an explicit REDIS_URL is honoured even when it doesn't answer: no fallback,
/// 503s instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_redis_url_never_falls_back() {
    // Arrange
    let service = Service::builder()
        .env("ENVIRONMENT", "development")
        .env("REDIS_URL", format!("redis://127.0.0.1:{}/0", free_port()))
        .env("REDIS_CONNECT_TIMEOUT_MS", "300")
        .env("REDIS_COMMAND_TIMEOUT_MS", "300")
        .start()
        .await;

    // Act
    let health = service.get("/health/redis").await;

    // Assert
    let body = support::assert_redis_health(&health, 503, "redis");
    assert_eq!(body["redis_connected"], false, "{body}");
    let login = service.try_login("alice", PASSWORD).await;
    assert_problem(&login, 503);
}
