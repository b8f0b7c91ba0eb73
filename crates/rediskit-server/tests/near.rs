//! The near-cache across processes: what one process changes in Redis, another process's
//! near-cache stops serving within 100 ms.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use rediskit::{Cache, Client, Config, NearCacheConfig};
use rediskit_testkit::RedisServer;
use support::{PASSWORD, Service};

/// How soon a change made by one process must reach another's near-cache.
const BOUND: Duration = Duration::from_millis(100);

/// The value of the Prometheus sample `name{labels}` in `text`, 0 when absent.
fn sample(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Two service processes on one Redis: after `/me` on B has cached the session (B's metrics
/// show near-cache hits), a logout on A makes `/me` on B answer 401 within 100 ms of the
/// logout's response.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_on_one_instance_reaches_anothers_near_cache_within_100ms() {
    let redis = RedisServer::start();
    let a = Service::start(&redis).await;
    let b = Service::start(&redis).await;
    a.register("alice", PASSWORD).await;
    let pair = a.login("alice", PASSWORD).await;
    let hits = r#"near_cache_hits_total{cache="sessions"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for _ in 0..5 {
            b.me(&pair.access_token).await.assert_status(200);
        }
        let metrics = b.get("/metrics").await.text;
        if sample(&metrics, hits) >= 1.0 {
            let serving = r#"near_cache_serving{cache="sessions"}"#;
            assert_eq!(sample(&metrics, serving), 1.0, "{metrics}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "B never served /me from its near-cache:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    a.auth_post("/auth/logout", &pair.access_token)
        .await
        .assert_status(204);
    let logged_out = Instant::now();

    loop {
        let reply = b.me(&pair.access_token).await;
        if reply.status.as_u16() == 401 {
            break;
        }
        reply.assert_status(200);
        assert!(
            logged_out.elapsed() < BOUND,
            "B still accepts the token {:?} after the logout",
            logged_out.elapsed()
        );
    }
    eprintln!(
        "B refused the token {:?} after the logout",
        logged_out.elapsed()
    );
    let metrics = b.get("/metrics").await.text;
    assert!(
        sample(
            &metrics,
            r#"near_cache_invalidations_total{cache="sessions"}"#
        ) >= 1.0,
        "{metrics}"
    );
}

/// With `NEAR_CACHE_SESSIONS=false` the service checks every request against Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_near_cache_can_be_turned_off() {
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("NEAR_CACHE_SESSIONS", "false")
        .start()
        .await;
    service.register("bob", PASSWORD).await;
    let pair = service.login("bob", PASSWORD).await;
    for _ in 0..20 {
        service.me(&pair.access_token).await.assert_status(200);
    }
    let metrics = service.get("/metrics").await.text;
    assert_eq!(
        sample(&metrics, r#"near_cache_hits_total{cache="sessions"}"#),
        0.0,
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"near_cache_serving{cache="sessions"} 0"#),
        "{metrics}"
    );
}

/// A `rediskit cache del` process deletes a key that this process's near-cache holds; within
/// 100 ms of the process exiting, the near-cache no longer serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cli_delete_reaches_a_library_near_cache_within_100ms() {
    let redis = RedisServer::start();
    let config = Config::builder().url(redis.url()).build().unwrap();
    let client = Client::connect(config).await.unwrap();
    let cache = Cache::builder(&client)
        .namespace("api")
        .near_cache(NearCacheConfig::default())
        .build()
        .unwrap();
    cache.set("report:7d", "computed").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while cache.stats().near.hits == 0 {
        assert!(Instant::now() < deadline, "the near-cache never served");
        assert!(cache.get::<String>("report:7d").await.unwrap().is_some());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let output = tokio::task::spawn_blocking({
        let url = redis.url();
        move || {
            Command::new(env!("CARGO_BIN_EXE_rediskit"))
                .args(["cache", "del", "report:7d"])
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("REDIS_URL", url)
                .env("RUST_LOG", "error")
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let exited = Instant::now();
    assert!(output.status.success(), "{output:?}");

    while cache.get::<String>("report:7d").await.unwrap().is_some() {
        assert!(
            exited.elapsed() < BOUND,
            "still served {:?} after the delete",
            exited.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(cache.stats().near.invalidations >= 1);
}
