//! Health, metrics, the OpenAPI document and the cached computation, black box.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::future::join_all;
use rediskit_testkit::RedisServer;
use serde_json::Value;
use support::{PASSWORD, Service, assert_redis_health};

/// `GET /health` is 200 `{"status":"ok"}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_ok() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;

    // Act
    let reply = service.get("/health").await;

    // Assert
    reply.assert_status(200);
    assert_eq!(reply.json()["status"], "ok", "{}", reply.text);
}

/// `GET /health/redis` with Redis up is 200 with every field of the contract: healthy,
/// connected, backend `redis`, a numeric latency, integer pool figures, an RFC 3339 timestamp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_health_reports_every_field() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;

    // Act
    let reply = service.get("/health/redis").await;

    // Assert
    let body = assert_redis_health(&reply, 200, "redis");
    assert_eq!(body["redis_connected"], true, "{body}");
    assert!(body["latency_ms"].as_f64().unwrap() >= 0.0, "{body}");
    assert!(body["pool"]["max"].as_u64().unwrap() >= 1, "{body}");
}

/// `GET /metrics` is Prometheus text with `# TYPE` lines once the service has handled traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_prometheus_text() {
    // Arrange: some traffic of each kind.
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("alice", PASSWORD).await;
    let pair = service.login("alice", PASSWORD).await;
    service.me(&pair.access_token).await.assert_status(200);
    service
        .get("/api/business-metrics/1d")
        .await
        .assert_status(200);

    // Act
    let reply = service.get("/metrics").await;

    // Assert
    reply.assert_status(200);
    let content_type = reply.header("content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/plain"), "{content_type:?}");
    assert!(
        reply.text.lines().any(|line| line.starts_with("# TYPE ")),
        "no `# TYPE` line in:\n{}",
        reply.text
    );
    // Auto-pipelining's figures are there (batches happen under concurrent load only).
    let batches = metric(&service, "redis_pipelined_batches_total").await;
    let commands = metric(&service, "redis_pipelined_commands_total").await;
    assert!(
        commands >= batches,
        "{commands} commands in {batches} batches"
    );
    // So are the coalesced session scripts' (several logins or refreshes at once only).
    let calls = metric(&service, "sessions_coalesced_calls_total").await;
    let operations = metric(&service, "sessions_coalesced_operations_total").await;
    assert!(
        operations >= 2.0 * calls,
        "{operations} operations in {calls} coalesced calls"
    );
    // And each rate limiter's coalesced decisions.
    for limiter in ["login", "auth"] {
        let calls = metric(
            &service,
            &format!("ratelimit_coalesced_calls_total{{limiter=\"{limiter}\"}}"),
        )
        .await;
        let decisions = metric(
            &service,
            &format!("ratelimit_coalesced_decisions_total{{limiter=\"{limiter}\"}}"),
        )
        .await;
        assert!(
            decisions >= 2.0 * calls,
            "{limiter}: {decisions} decisions in {calls} coalesced calls"
        );
    }
}

/// `GET /openapi.json` is an OpenAPI 3 document listing the API's paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_document_lists_the_api() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;

    // Act
    let reply = service.get("/openapi.json").await;

    // Assert
    reply.assert_status(200);
    let document = reply.json();
    assert!(
        document["openapi"]
            .as_str()
            .is_some_and(|version| version.starts_with('3')),
        "openapi: {}",
        document["openapi"]
    );
    let paths = document["paths"].as_object().expect("a `paths` object");
    for path in [
        "/auth/register",
        "/auth/login",
        "/auth/refresh",
        "/auth/logout",
        "/auth/logout-all",
        "/auth/sessions",
        "/auth/sessions/{session_id}",
        "/me",
        "/api/business-metrics/{timeframe}",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from {:?}",
            paths.keys().collect::<Vec<_>>()
        );
    }
    // Every /auth/ operation is rate limited, and those with a JSON body refuse bad bodies: the
    // document lists those answers.
    for (path, operation) in paths.iter().filter(|(path, _)| path.starts_with("/auth/")) {
        for (method, spec) in operation.as_object().unwrap() {
            let responses = spec["responses"].as_object().unwrap();
            let mut expected = vec!["429", "503"];
            if spec.get("requestBody").is_some() {
                expected.extend(["400", "413", "415", "422"]);
            }
            for status in expected {
                assert!(
                    responses.contains_key(status),
                    "{method} {path} does not list {status}"
                );
            }
        }
    }
    // The timeframes the handler takes are the ones the document admits, so that a generated
    // client (or a fuzzer) sends only those.
    let timeframe = &paths["/api/business-metrics/{timeframe}"]["get"]["parameters"][0];
    assert_eq!(timeframe["name"], "timeframe");
    assert_eq!(timeframe["schema"]["pattern"], "^(1d|7d|30d|90d)$");
    for accepted in ["1d", "7d", "30d", "90d"] {
        service
            .get(&format!("/api/business-metrics/{accepted}"))
            .await
            .assert_status(200);
    }
}

/// The first request for a timeframe computes (`X-Cache: MISS`), the next is served the same
/// result from the cache (`HIT`), and each timeframe is cached on its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_metrics_miss_then_hit() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;

    // Act
    let first = service.get("/api/business-metrics/7d").await;
    let second = service.get("/api/business-metrics/7d").await;
    let other = service.get("/api/business-metrics/1d").await;

    // Assert
    first.assert_status(200);
    second.assert_status(200);
    other.assert_status(200);
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(first.json(), second.json());
    assert_eq!(other.header("x-cache"), Some("MISS"));
}

/// 200 concurrent requests for a cold timeframe run the computation once: all 200, exactly one
/// `X-Cache: MISS`, every other one `HIT`, and all bodies equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_requests_compute_once() {
    // Arrange: a computation slow enough for the requests to overlap.
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("DEMO_COMPUTE_MS", "300")
        .start()
        .await;

    // Act
    let replies = join_all((0..200).map(|_| service.get("/api/business-metrics/90d"))).await;

    // Assert
    for reply in &replies {
        reply.assert_status(200);
    }
    let mut tally = BTreeMap::new();
    for reply in &replies {
        *tally.entry(reply.header("x-cache")).or_insert(0) += 1;
    }
    assert_eq!(
        tally,
        BTreeMap::from([(Some("HIT"), 199), (Some("MISS"), 1)]),
        "X-Cache values and how many of each"
    );
    let bodies: Vec<Value> = replies.iter().map(|r| r.json()).collect();
    assert!(
        bodies.iter().all(|body| *body == bodies[0]),
        "every request got the one computed result"
    );
}

/// Made-up HTTP methods are counted under one `method="OTHER"` label: a series per method name
/// would let any client grow `/metrics`, and the service's memory, without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_share_one_metric_label() {
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    for i in 0..20 {
        let method = reqwest::Method::from_bytes(format!("M{i}X").as_bytes()).unwrap();
        service
            .send(service.request(method, "/nowhere"))
            .await
            .assert_status(404);
    }

    let reply = service.get("/metrics").await;
    reply.assert_status(200);
    assert!(!reply.text.contains("M3X"), "{}", reply.text);
    let other = reply
        .text
        .lines()
        .find(|line| {
            line.starts_with("http_requests_total{")
                && line.contains(r#"method="OTHER""#)
                && line.contains(r#"status="404""#)
        })
        .unwrap_or_else(|| panic!("no OTHER series in:\n{}", reply.text));
    assert!(other.ends_with(" 20"), "{other}");
}

/// The value of an unlabelled series in `/metrics`.
async fn metric(service: &Service, name: &str) -> f64 {
    let reply = service.get("/metrics").await;
    reply.assert_status(200);
    reply
        .text
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{}", reply.text))
        .trim()
        .parse()
        .unwrap()
}

/// Requests `path` until the background refresh has stored a new result (`X-Cache: HIT` with a
/// body other than `stale`) and returns that body; every answer before it must be `STALE` with
/// the `stale` body.
async fn await_refreshed(service: &Service, path: &str, stale: &Value) -> Value {
    for _ in 0..500 {
        let reply = service.get(path).await;
        reply.assert_status(200);
        match reply.header("x-cache") {
            Some("HIT") if reply.json() != *stale => return reply.json(),
            Some("STALE") => assert_eq!(reply.json(), *stale, "STALE serves the old result"),
            other => panic!("X-Cache {other:?} while the refresh runs: {}", reply.text),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the background refresh never stored a new result");
}

/// Past `DEMO_CACHE_TTL_SECS`, within `DEMO_STALE_SECS`: the first request is answered at once
/// with the old result and `X-Cache: STALE` while the computation reruns in the background;
/// then the fresh result is a `HIT`. Two computations in all, and `/metrics` counts the stale
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn business_metrics_serves_stale_while_refreshing() {
    // Arrange: results fresh for 1 s, then served stale for a minute.
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("DEMO_CACHE_TTL_SECS", "1")
        .env("DEMO_STALE_SECS", "60")
        .start()
        .await;
    let path = "/api/business-metrics/30d";
    let first = service.get(path).await;
    let second = service.get(path).await;
    assert_eq!(first.header("x-cache"), Some("MISS"));
    assert_eq!(second.header("x-cache"), Some("HIT"));
    assert_eq!(first.json(), second.json());

    // Act: past the TTL.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let stale = service.get(path).await;
    let fresh = await_refreshed(&service, path, &first.json()).await;

    // Assert
    stale.assert_status(200);
    assert_eq!(stale.header("x-cache"), Some("STALE"));
    assert_eq!(stale.json(), first.json(), "the old result, served at once");
    assert!(
        fresh["computed_at_ms"].as_u64() > first.json()["computed_at_ms"].as_u64(),
        "recomputed: {fresh} after {}",
        first.text
    );
    assert_eq!(metric(&service, "demo_computations_total").await, 2.0);
    assert!(metric(&service, "cache_stale_hits_total").await >= 1.0);
}

/// 100 concurrent requests for a stale result all get it at once (`STALE`), or the new one if
/// the refresh already finished (`HIT`), and the computation reruns once for all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_stale_requests_compute_once() {
    // Arrange: a slow computation, results fresh for 3 s (long enough for the refreshed result to
    // stay fresh until the test has counted).
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("DEMO_CACHE_TTL_SECS", "3")
        .env("DEMO_STALE_SECS", "60")
        .env("DEMO_COMPUTE_MS", "300")
        .start()
        .await;
    let path = "/api/business-metrics/90d";
    let cold = service.get(path).await;
    assert_eq!(cold.header("x-cache"), Some("MISS"));
    tokio::time::sleep(Duration::from_millis(3300)).await;

    // Act
    let replies = join_all((0..100).map(|_| service.get(path))).await;
    let fresh = await_refreshed(&service, path, &cold.json()).await;

    // Assert
    for reply in &replies {
        reply.assert_status(200);
        match reply.header("x-cache") {
            Some("STALE") => assert_eq!(reply.json(), cold.json()),
            Some("HIT") => assert_eq!(reply.json(), fresh),
            other => panic!("X-Cache {other:?} for a stale result: {}", reply.text),
        }
    }
    assert!(
        replies
            .iter()
            .any(|reply| reply.header("x-cache") == Some("STALE")),
        "the first of them found the result stale"
    );
    assert_eq!(
        metric(&service, "demo_computations_total").await,
        2.0,
        "the cold computation and one refresh"
    );
}
