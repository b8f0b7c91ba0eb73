//! Rate limiting: the contract on both backends, then failure policies against a real server.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rediskit::{Client, FailurePolicy, Quota, RateLimiter};

conformance!(
    limit_then_refuse_with_retry_after,
    concurrent_callers_never_exceed_capacity,
    keys_are_independent_and_reset,
    budget_refills_over_time,
    bad_input_is_refused,
    quotas_of_odd_intervals_count_exactly,
);

/// A quota whose interval is no whole number of µs counts like any other: after the first of
/// `per_second(6)` five remain, and a request costing all of `per_second(29)` passes from idle
/// (doubles at today's clock read one fewer, and refused it forever).
async fn quotas_of_odd_intervals_count_exactly(client: &Client) {
    let six = RateLimiter::new(client, "six", Quota::per_second(6)).unwrap();
    let first = six.check("k").await.unwrap();
    assert!(first.allowed && first.remaining == 5, "{first:?}");
    let whole = RateLimiter::new(client, "whole", Quota::per_second(29)).unwrap();
    let all = whole.check_n("k", 29).await.unwrap();
    assert!(all.allowed && all.remaining == 0, "{all:?}");
}

/// `limit` calls pass; the next within the period is refused with a retry-after of at most one
/// interval (period / limit), and the headers' figures count down.
async fn limit_then_refuse_with_retry_after(client: &Client) {
    let limiter = RateLimiter::new(client, "login", Quota::per_minute(5)).unwrap();
    for expected_remaining in (0..5).rev() {
        let decision = limiter.check("203.0.113.1").await.unwrap();
        assert!(decision.allowed);
        assert_eq!(decision.remaining, expected_remaining);
        assert_eq!(decision.limit, 5);
        assert_eq!(decision.retry_after, None);
        assert!(!decision.degraded);
    }
    let refused = limiter.check("203.0.113.1").await.unwrap();
    assert!(!refused.allowed);
    assert_eq!(refused.remaining, 0);
    let retry = refused.retry_after.unwrap();
    assert!(
        retry > Duration::from_secs(11) && retry <= Duration::from_secs(12),
        "{retry:?}"
    );
    assert!(
        refused.reset_after > Duration::from_secs(59),
        "{:?}",
        refused.reset_after
    );
    let stats = limiter.stats();
    assert_eq!((stats.allowed, stats.rejected), (5, 1));
}

/// 50 concurrent callers against `limit + burst` = 13: exactly 13 pass.
async fn concurrent_callers_never_exceed_capacity(client: &Client) {
    let limiter = RateLimiter::new(client, "api", Quota::per_minute(10).with_burst(3)).unwrap();
    let passed = Arc::new(AtomicU32::new(0));
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let limiter = limiter.clone();
            let passed = passed.clone();
            tokio::spawn(async move {
                if limiter.check("shared").await.unwrap().allowed {
                    passed.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(passed.load(Ordering::SeqCst), 13);
}

/// Each key has its own budget, limiters of different names don't share, and `reset` restores.
async fn keys_are_independent_and_reset(client: &Client) {
    let quota = Quota::per_minute(1);
    let login = RateLimiter::new(client, "login", quota).unwrap();
    let other = RateLimiter::new(client, "other", quota).unwrap();
    assert!(login.check("a").await.unwrap().allowed);
    assert!(!login.check("a").await.unwrap().allowed);
    assert!(login.check("b").await.unwrap().allowed);
    assert!(other.check("a").await.unwrap().allowed);
    // Escaping keeps look-alike keys apart.
    assert!(login.check("a{x}").await.unwrap().allowed);
    assert!(login.check("a%7Bx%7D").await.unwrap().allowed);
    login.reset("a").await.unwrap();
    assert!(login.check("a").await.unwrap().allowed);
}

/// After one interval, one more call passes.
async fn budget_refills_over_time(client: &Client) {
    let limiter = RateLimiter::new(client, "fast", Quota::per_second(4)).unwrap();
    for _ in 0..4 {
        assert!(limiter.check("k").await.unwrap().allowed);
    }
    let refused = limiter.check("k").await.unwrap();
    assert!(!refused.allowed);
    tokio::time::sleep(refused.retry_after.unwrap() + Duration::from_millis(30)).await;
    assert!(limiter.check("k").await.unwrap().allowed);
}

/// Bad names, quotas, keys and costs are refused.
async fn bad_input_is_refused(client: &Client) {
    assert!(RateLimiter::new(client, "bad name", Quota::per_minute(1)).is_err());
    assert!(RateLimiter::new(client, "x", Quota::per_minute(0)).is_err());
    let limiter = RateLimiter::new(client, "x", Quota::per_minute(2)).unwrap();
    assert!(limiter.check("").await.unwrap_err().is_invalid_input());
    assert!(
        limiter
            .check(&"k".repeat(2000))
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(
        limiter
            .check_n("k", 0)
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(
        limiter
            .check_n("k", 3)
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(limiter.check_n("k", 2).await.unwrap().allowed);
}

/// With Redis down, the failure policy decides, the decision says so, and it is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_policy_when_redis_is_down() {
    let mut backend = common::Backend::redis().await;
    let quota = Quota::per_minute(1);
    let open =
        RateLimiter::with_policy(&backend.client, "open", quota, FailurePolicy::Open).unwrap();
    let closed =
        RateLimiter::with_policy(&backend.client, "closed", quota, FailurePolicy::Closed).unwrap();
    backend.server.as_mut().unwrap().kill();
    let decision = open.check("k").await.unwrap();
    assert!(decision.allowed && decision.degraded);
    let decision = closed.check("k").await.unwrap();
    assert!(!decision.allowed && decision.degraded);
    assert!(decision.retry_after.is_some());
    assert_eq!(open.stats().degraded, 1);
    assert_eq!(closed.stats().degraded, 1);
}

/// 200 concurrent callers through 4 connections on a real server: never more than the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_callers() {
    let backend = common::Backend::redis().await;
    let limiter = RateLimiter::new(&backend.client, "burst", Quota::per_minute(25)).unwrap();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.check("one-caller").await.unwrap().allowed })
        })
        .collect();
    let mut passed = 0;
    for task in tasks {
        passed += u32::from(task.await.unwrap());
    }
    assert_eq!(passed, 25);
}

/// A limiter on a fresh redis-server with its scripts loaded and its stats reset.
async fn coalescing_limiter(quota: Quota) -> (common::Backend, RateLimiter) {
    let backend = common::Backend::redis().await;
    backend.client.load_scripts().await.unwrap();
    let limiter = RateLimiter::new(&backend.client, "co", quota).unwrap();
    let () = common::admin_cmd(backend.server.as_ref().unwrap(), &["CONFIG", "RESETSTAT"]);
    (backend, limiter)
}

/// Decisions started together leave as few script calls, each still its own: on one thread, 64
/// callers at once are 4 calls sent at once (`coalesce::IN_FLIGHT`) and 2 coalesced ones (32
/// and 28 decisions). Two callers per key and a limit of one: exactly one of each pair passes,
/// and each refused one is told when to retry.
#[tokio::test]
async fn concurrent_decisions_are_coalesced() {
    let (backend, limiter) = coalescing_limiter(Quota::per_minute(1)).await;
    let keys: Vec<String> = (0..64).map(|i| format!("k{}", i / 2)).collect();
    let decisions = futures_util::future::join_all(keys.iter().map(|key| limiter.check(key))).await;
    let calls = common::evalsha_calls(backend.server.as_ref().unwrap());
    assert_eq!(calls, 6, "64 decisions took {calls} EVALSHAs");
    let stats = limiter.stats();
    assert_eq!((stats.coalesced_calls, stats.coalesced_decisions), (2, 60));
    assert_eq!((stats.allowed, stats.rejected), (32, 32));
    for pair in decisions.chunks(2) {
        let (first, second) = (pair[0].as_ref().unwrap(), pair[1].as_ref().unwrap());
        assert!(first.allowed && !second.allowed, "{pair:?}");
        assert!(!first.degraded && !second.degraded);
        let retry = second.retry_after.unwrap();
        assert!(
            retry > Duration::from_secs(55) && retry <= Duration::from_secs(60),
            "{retry:?}"
        );
    }
}

/// In a coalesced call, a decision that fails (its key holds a hash) fails alone: the others
/// stand, and the foreign key is untouched.
#[tokio::test]
async fn a_coalesced_decision_fails_alone() {
    let (backend, limiter) = coalescing_limiter(Quota::per_minute(5)).await;
    let server = backend.server.as_ref().unwrap();
    limiter.check("bad").await.unwrap();
    let found: Vec<String> = common::admin_cmd(server, &["KEYS", "*bad*"]);
    let [key] = found.as_slice() else {
        panic!("one key for `bad`: {found:?}")
    };
    let () = common::admin_cmd(server, &["DEL", key]);
    let () = common::admin_cmd(server, &["HSET", key, "f", "v"]);
    // The first four go at once; the rest wait and leave together.
    let callers = ["a", "b", "c", "d", "bad", "e", "f"];
    let decisions =
        futures_util::future::join_all(callers.iter().map(|caller| limiter.check(caller))).await;
    for (caller, decision) in callers.iter().zip(decisions) {
        match decision {
            Err(err) if *caller == "bad" => {
                assert_eq!(err.kind(), rediskit::ErrorKind::Backend, "{err}");
                assert!(err.message().contains("WRONGTYPE"), "{err}");
            }
            decision => {
                let decision = decision.map_err(|err| format!("{caller}: {err}")).unwrap();
                assert!(
                    decision.allowed && decision.remaining == 4,
                    "{caller}: {decision:?}"
                );
            }
        }
    }
    assert_eq!(limiter.stats().coalesced_calls, 1);
    let value: String = common::admin_cmd(server, &["HGET", key, "f"]);
    assert_eq!(value, "v");
}
