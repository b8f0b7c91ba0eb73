//! The typed cache: values of your own types with TTL tiers, misses, batches, and `get_or_set`
//! where twenty concurrent callers of one cold key run the computation once.
//!
//! Run: `cargo run -p rediskit --example cache` (in-process `memory://` backend), or against a
//! Redis: `REDIS_URL=redis://localhost:6379/0 cargo run -p rediskit --example cache`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rediskit::{Cache, Client, Config, ttl};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Product {
    id: u32,
    name: String,
    price_cents: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Report {
    timeframe: String,
    revenue_cents: u64,
}

/// `REDIS_URL` (and the other variables of the README) when it is set, else `memory://`.
async fn connect() -> rediskit::Result<Client> {
    let config = match std::env::var("REDIS_URL") {
        Ok(_) => Config::from_env()?,
        Err(_) => Config::builder().url("memory://").build()?,
    };
    Client::connect(config).await
}

/// The expensive thing worth caching.
async fn compute_report(timeframe: &str, runs: &AtomicU32) -> Report {
    runs.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(100)).await;
    Report {
        timeframe: timeframe.to_owned(),
        revenue_cents: 420_000,
    }
}

#[tokio::main]
async fn main() -> rediskit::Result<()> {
    let client = connect().await?;
    println!("backend: {}", client.backend().as_str());
    // Keys live under `{REDIS_KEY_PREFIX}cache:examples:`; values are JSON with a small header.
    let cache = Cache::builder(&client).namespace("examples").build()?;

    // Typed set and get, with a TTL tier (SHORT 5 min, MEDIUM 1 h, LONG 1 day).
    let lamp = Product {
        id: 1,
        name: "desk lamp".into(),
        price_cents: 3_999,
    };
    cache.set_with_ttl("product:1", &lamp, ttl::SHORT).await?;
    let read: Option<Product> = cache.get("product:1").await?;
    println!("get product:1   -> {read:?}");
    println!("ttl product:1   -> {:?}", cache.ttl("product:1").await?);
    let missing: Option<Product> = cache.get("product:404").await?;
    println!("get product:404 -> {missing:?}");

    // Batches: one round trip each way.
    let more = [
        (
            "product:2",
            Product {
                id: 2,
                name: "chair".into(),
                price_cents: 12_900,
            },
        ),
        (
            "product:3",
            Product {
                id: 3,
                name: "mug".into(),
                price_cents: 850,
            },
        ),
    ];
    cache.set_many(&more, ttl::MEDIUM).await?;
    let many: Vec<Option<Product>> = cache
        .get_many(&["product:2", "product:3", "product:9"])
        .await?;
    let names: Vec<_> = many
        .iter()
        .map(|p| p.as_ref().map(|p| p.name.as_str()))
        .collect();
    println!("get_many        -> {names:?}");

    // Cache-aside with stampede protection: 20 callers at once, one computation.
    let runs = Arc::new(AtomicU32::new(0));
    let callers = (0..20).map(|_| {
        let (cache, runs) = (cache.clone(), runs.clone());
        async move {
            cache
                .get_or_set("report:7d", ttl::MEDIUM, || async move {
                    compute_report("7d", &runs).await
                })
                .await
        }
    });
    let reports = futures_util::future::join_all(callers).await;
    let ok = reports
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.timeframe == "7d"))
        .count();
    println!(
        "get_or_set      -> {ok} callers got the report, computed {} time(s)",
        runs.load(Ordering::SeqCst)
    );

    println!("delete product:1 -> {}", cache.delete("product:1").await?);
    for key in ["product:1", "product:2", "product:3", "report:7d"] {
        cache.delete(key).await?;
    }
    println!("stats           -> {:?}", cache.stats());
    client.close().await;
    Ok(())
}
