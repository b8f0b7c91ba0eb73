//! The soak run: the service at load for minutes while Redis is killed (SIGKILL) and restarted
//! again and again, with `appendonly yes` and `appendfsync always`. Not part of the default test
//! command; run it with
//!
//! ```text
//! SOAK_SECS=180 cargo test --release -p rediskit-server --test soak -- --ignored --nocapture
//! ```
//!
//! It checks: no 5xx other than 503, no panic in the service's log, the service's memory stays
//! flat, and no session acknowledged before a fault is lost after it.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rediskit_testkit::RedisServer;
use support::{PASSWORD, Service, TokenPair};
use tokio::sync::Mutex;

const WORKERS: usize = 16;

/// A session a worker was told exists (login or refresh answered 200).
struct Acknowledged {
    pair: TokenPair,
    /// A refresh whose answer was lost (503) may or may not have rotated the token; such a
    /// session is checked through its access token only, never refreshed again.
    ambiguous: bool,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Minutes of load through repeated Redis crashes: nothing acknowledged is lost, nothing but
/// 503 fails, nothing panics, memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a soak run of minutes; run it explicitly (see the file's docs)"]
async fn soak_through_redis_crashes() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let redis = Arc::new(Mutex::new(RedisServer::start_with(&[
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
    ])));
    let service = {
        let redis = redis.lock().await;
        Service::builder()
            .redis(&redis)
            .env("REDIS_COMMAND_TIMEOUT_MS", "500")
            .env("REDIS_CONNECT_TIMEOUT_MS", "500")
            .env("ACCESS_TOKEN_TTL_SECS", "3600")
            .env("DEMO_COMPUTE_MS", "5")
            .env("RUST_LOG", "warn")
            .start()
            .await
    };
    let service = Arc::new(service);
    let stop = Arc::new(AtomicBool::new(false));
    let statuses = Arc::new(std::sync::Mutex::new(HashMap::<u16, u64>::new()));
    let lost = Arc::new(AtomicU64::new(0));
    let acknowledged: Arc<Mutex<Vec<Acknowledged>>> = Arc::new(Mutex::new(Vec::new()));

    // Warm up, then take the memory baseline.
    for i in 0..WORKERS {
        service.register(&format!("soak{i}"), PASSWORD).await;
    }
    for _ in 0..200 {
        service.get("/api/business-metrics/7d").await;
    }
    let rss_start = rss_kib(service.pid());

    let workers: Vec<_> = (0..WORKERS)
        .map(|i| {
            let (service, stop, statuses, lost, acknowledged) = (
                service.clone(),
                stop.clone(),
                statuses.clone(),
                lost.clone(),
                acknowledged.clone(),
            );
            tokio::spawn(async move {
                let name = format!("soak{i}");
                let count = |status: u16| *statuses.lock().unwrap().entry(status).or_default() += 1;
                // The newest sessions stay for the final check; older ones are logged out, so the
                // user stays under the per-user cap (which would evict them, legitimately).
                let mut kept: Vec<Acknowledged> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let login = service.try_login(&name, PASSWORD).await;
                    count(login.status.as_u16());
                    if login.status != 200 {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    let mut session = Acknowledged {
                        pair: TokenPair::from_reply(&login),
                        ambiguous: false,
                    };
                    for _ in 0..20 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let me = service.me(&session.pair.access_token).await;
                        count(me.status.as_u16());
                        let metrics = service.get("/api/business-metrics/30d").await;
                        count(metrics.status.as_u16());
                        let refreshed = service.refresh(&session.pair.refresh_token).await;
                        count(refreshed.status.as_u16());
                        match refreshed.status.as_u16() {
                            200 => session.pair = TokenPair::from_reply(&refreshed),
                            503 => {
                                session.ambiguous = true;
                                break;
                            }
                            401 => {
                                // The last refresh was acknowledged: its token must still work.
                                lost.fetch_add(1, Ordering::Relaxed);
                                eprintln!("LOST: an acknowledged refresh token was refused");
                                break;
                            }
                            other => panic!("unexpected {other}: {}", refreshed.text),
                        }
                    }
                    kept.push(session);
                    if kept.len() > 40 {
                        let old = kept.remove(0);
                        let reply = service
                            .auth_post("/auth/logout", &old.pair.access_token)
                            .await;
                        count(reply.status.as_u16());
                    }
                }
                acknowledged.lock().await.extend(kept);
            })
        })
        .collect();

    // The faults: SIGKILL and restart Redis every few seconds.
    let started = Instant::now();
    let mut crashes = 0;
    while started.elapsed() < Duration::from_secs(secs) {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let mut server = redis.lock().await;
        server.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.restart();
        crashes += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }

    // Every acknowledged session still exists: its latest access token passes `/me`.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let sessions = acknowledged.lock().await;
    let mut checked = 0;
    for session in sessions.iter() {
        let me = service.me(&session.pair.access_token).await;
        if me.status == 401 && !session.ambiguous {
            lost.fetch_add(1, Ordering::Relaxed);
        }
        checked += 1;
    }
    let rss_end = rss_kib(service.pid());
    let statuses = statuses.lock().unwrap().clone();
    let log = service.log();
    eprintln!(
        "soak: {secs} s, {crashes} Redis crashes, {checked} sessions checked, statuses {statuses:?}, \
         RSS {rss_start} KiB -> {rss_end} KiB"
    );
    assert_eq!(
        lost.load(Ordering::Relaxed),
        0,
        "acknowledged sessions were lost"
    );
    for status in statuses.keys() {
        assert!(*status < 500 || *status == 503, "a {status} was answered");
    }
    assert!(!log.contains("panicked"), "the service panicked:\n{log}");
    assert!(
        rss_end < rss_start * 2 + 16 * 1024,
        "memory grew: {rss_start} -> {rss_end} KiB"
    );
}
