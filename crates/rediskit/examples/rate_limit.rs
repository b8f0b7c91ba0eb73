//! Rate limiting with GCRA: a quota with a burst, the figures for the `RateLimit-*` and
//! `Retry-After` headers, one budget per caller key, and the failure policy when Redis is down.
//!
//! Run: `cargo run -p rediskit --example rate_limit` (in-process `memory://` backend), or against
//! a Redis: `REDIS_URL=redis://localhost:6379/0 cargo run -p rediskit --example rate_limit`.

use std::time::Duration;

use rediskit::{Client, Config, FailurePolicy, Quota, RateLimiter};

/// `REDIS_URL` (and the other variables of the README) when it is set, else `memory://`.
async fn connect() -> rediskit::Result<Client> {
    let config = match std::env::var("REDIS_URL") {
        Ok(_) => Config::from_env()?,
        Err(_) => Config::builder().url("memory://").build()?,
    };
    Client::connect(config).await
}

#[tokio::main]
async fn main() -> rediskit::Result<()> {
    let client = connect().await?;

    // 5 a second sustained, plus 2 at once from idle: 7 pass, then one every 200 ms.
    let limiter = RateLimiter::new(&client, "example-api", Quota::per_second(5).with_burst(2))?;
    let caller = "203.0.113.7";
    limiter.reset(caller).await?;
    for i in 1..=9 {
        let d = limiter.check(caller).await?;
        println!(
            "request {i}: allowed={:<5} RateLimit-Limit={} -Remaining={} -Reset={:?} Retry-After={:?}",
            d.allowed, d.limit, d.remaining, d.reset_after, d.retry_after
        );
    }

    // Another key has its own budget.
    println!(
        "another caller: allowed={}",
        limiter.check("198.51.100.2").await?.allowed
    );

    // Wait as long as Retry-After says, and the next request passes.
    let refused = limiter.check(caller).await?;
    if let Some(wait) = refused.retry_after {
        tokio::time::sleep(wait).await;
    }
    println!(
        "after Retry-After: allowed={}",
        limiter.check(caller).await?.allowed
    );
    for key in [caller, "198.51.100.2"] {
        limiter.reset(key).await?;
    }
    println!("stats: {:?}", limiter.stats());
    client.close().await;

    // Redis down (nothing listens on port 1): the policy decides, and says it did.
    let down = Client::connect_lazy(
        Config::builder()
            .url("redis://127.0.0.1:1")
            .connect_timeout(Duration::from_millis(200))
            .build()?,
    )?;
    let quota = Quota::per_minute(10);
    for policy in [FailurePolicy::Open, FailurePolicy::Closed] {
        let limiter = RateLimiter::with_policy(&down, "example-login", quota, policy)?;
        let d = limiter.check("alice").await?;
        println!(
            "redis down, {policy:?}: allowed={} degraded={}",
            d.allowed, d.degraded
        );
    }
    down.close().await;
    Ok(())
}
