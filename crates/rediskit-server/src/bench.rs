//! `rediskit bench`: throughput and latency of the library's operations against a real Redis,
//! beside the bare `redis` crate as the baseline.
//!
//! Each workload is prepared (keys preloaded, sessions created), then `--ops` operations run over
//! `--concurrency` tokio tasks, each awaiting one operation at a time; every operation is timed.
//! Failed operations are counted (`errors`) and left out of the throughput and the latencies.
//! `--url` may point at a shared server, so the run writes only under a key prefix of its own
//! (`bench:<random>:`), gives everything it writes an expiry, and deletes its keys with `SCAN` +
//! `DEL` after each workload (never `KEYS` or `FLUSHALL`), and when stopped by SIGINT or
//! SIGTERM.
//!
//! ## Layout
//!
//! - `workload` — the workloads: what each prepares and what one operation is.
//! - `report` — `--report`: the machine, `benchmarks.md` and the SVG chart.

mod report;
mod workload;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use redis::aio::MultiplexedConnection;
use rediskit::{Client, Config, redact_url};
use tokio::task::JoinSet;

#[doc(inline)]
pub use workload::Workload;
use workload::{Ctx, Task};

/// The concurrencies `--report` sweeps.
pub const SWEEP: [usize; 4] = [1, 8, 64, 256];
/// Keys deleted per `DEL` (and asked for per `SCAN` page) while cleaning up.
const CLEANUP_BATCH: usize = 1000;

/// `rediskit bench`: measure rediskit's operations against a Redis server.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Redis to measure against. Only keys under a prefix unique to the run are written, and they
    /// are deleted at the end (SCAN + DEL), so a shared server is safe.
    #[arg(long, default_value = "redis://127.0.0.1:6379/0")]
    pub url: String,
    /// Tasks issuing operations at once, each awaiting one at a time.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Operations per workload (per concurrency with --report).
    #[arg(long, default_value_t = 200_000)]
    pub ops: u64,
    /// Bytes per cached value.
    #[arg(long, default_value_t = 100)]
    pub value_size: usize,
    /// Comma-separated workloads to run (default: all).
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub workloads: Vec<Workload>,
    /// Print one JSON object on stdout: workload → {ops_per_sec, p50_us, p99_us, errors}.
    #[arg(long)]
    pub json: bool,
    /// Also sweep concurrency 1, 8, 64 and 256 and write DIR/benchmarks.md and
    /// DIR/throughput.svg.
    #[arg(long, value_name = "DIR")]
    pub report: Option<PathBuf>,
    /// Connections of the client's pool (REDIS_MAX_CONNECTIONS). The pool shares the traffic
    /// of as many of them as the runtime has worker threads first; the raw_* baseline deals that
    /// many bare connections round robin.
    #[arg(long, default_value_t = rediskit::defaults::DEFAULT_MAX_CONNECTIONS)]
    pub connections: usize,
}

/// What one run (one workload at one concurrency) measured.
#[derive(Debug, Clone, Copy)]
struct Stats {
    ops: u64,
    errors: u64,
    elapsed: Duration,
    p50_us: f64,
    p99_us: f64,
    /// CPU time of this process per operation, when `/proc` tells it.
    client_cpu_us: Option<f64>,
    /// CPU time of redis-server per operation (`INFO cpu`), when it tells it.
    server_cpu_us: Option<f64>,
    /// Commands per batch that auto-pipelining sent during the run, when it sent any; for
    /// `session_create`, `session_rotate` and `ratelimit`, operations per script call (coalesced or
    /// alone).
    commands_per_batch: Option<f64>,
}

impl Stats {
    /// Operations that succeeded, per second: a failed one is no work done.
    fn ops_per_sec(&self) -> f64 {
        self.ops.saturating_sub(self.errors) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One run's result.
#[derive(Debug, Clone, Copy)]
struct Measured {
    workload: Workload,
    concurrency: usize,
    stats: Stats,
}

/// Runs the benchmark as `args` says and prints the results; see the module docs.
///
/// Fails when Redis cannot be reached, when a workload cannot be prepared, or — after printing
/// the results — when any operation failed.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    check(&args)?;
    let selected = if args.workloads.is_empty() {
        Workload::ALL.to_vec()
    } else {
        Workload::ALL
            .into_iter()
            .filter(|w| args.workloads.contains(w))
            .collect()
    };
    let mut workloads = Vec::new();
    let mut skipped = Vec::new();
    for workload in selected {
        match workload.unavailable() {
            Some(why) => {
                eprintln!("rediskit bench: skipping {}: {why}", workload.name());
                skipped.push((workload, why));
            }
            None => workloads.push(workload),
        }
    }
    if cfg!(debug_assertions) {
        eprintln!("rediskit bench: this is a debug build; its numbers say little (use --release)");
    }
    let mut concurrencies = vec![args.concurrency];
    if args.report.is_some() {
        concurrencies.extend(SWEEP);
        concurrencies.sort_unstable();
        concurrencies.dedup();
    }

    let prefix = format!("bench:{:016x}:", rand::random::<u64>());
    let config = Config::builder()
        .url(&args.url)
        .key_prefix(&prefix)
        .max_connections(args.connections)
        .build()
        .map_err(|err| format!("--url/--connections: {err}"))?;
    let client = Client::connect(config)
        .await
        .map_err(|err| err.to_string())?;
    let raw = match raw_connections(&args.url, raw_count(args.connections, workers())).await {
        Ok(raw) => raw,
        Err(err) => {
            client.close().await;
            return Err(err);
        }
    };
    let ctx = match prepare_client(&client)
        .await
        .and_then(|()| Ctx::new(&client, raw, args.value_size))
    {
        Ok(ctx) => Arc::new(ctx),
        Err(err) => {
            client.close().await;
            return Err(err);
        }
    };
    let mut admin = ctx.raw[0].clone();
    let machine = report::Machine::probe(&mut admin).await;

    let measured = tokio::select! {
        measured = measure_all(&ctx, &workloads, &concurrencies, args.ops) => measured,
        () = interrupted() => Err("interrupted".to_owned()),
    };
    // Tasks of an interrupted run are aborted with the future above; any of their commands
    // still on the wire land before the clean-up's on the same server, or expire.
    let cleaned = cleanup(&mut admin, &prefix).await;
    client.close().await;
    let measured = measured?;
    cleaned.map_err(|err| format!("cleaning up `{prefix}*`: {err}"))?;

    let main: Vec<&Measured> = measured
        .iter()
        .filter(|m| m.concurrency == args.concurrency)
        .collect();
    if args.json {
        println!("{}", json(&main));
    } else {
        print_table(&args, &main, &skipped);
    }
    if let Some(dir) = &args.report {
        let machine = machine.finish();
        report::write(dir, &args, &machine, &workloads, &skipped, &measured)?;
        eprintln!(
            "rediskit bench: wrote {} and {}",
            dir.join("benchmarks.md").display(),
            dir.join("throughput.svg").display()
        );
    }
    let errors: u64 = measured.iter().map(|m| m.stats.errors).sum();
    if errors > 0 {
        return Err(format!("{errors} operations failed (see above)"));
    }
    Ok(())
}

fn check(args: &BenchArgs) -> Result<(), String> {
    if !(1..=100_000).contains(&args.concurrency) {
        return Err(format!(
            "--concurrency: expected 1 to 100000, got {}",
            args.concurrency
        ));
    }
    // Every latency is kept (8 bytes each) to take exact percentiles.
    if !(1..=100_000_000).contains(&args.ops) {
        return Err(format!("--ops: expected 1 to 100000000, got {}", args.ops));
    }
    if !(1..=rediskit::defaults::MAX_CONNECTIONS_LIMIT).contains(&args.connections) {
        return Err(format!(
            "--connections: expected 1 to {}, got {}",
            rediskit::defaults::MAX_CONNECTIONS_LIMIT,
            args.connections
        ));
    }
    if args.value_size > workload::MAX_VALUE_SIZE {
        return Err(format!(
            "--value-size: at most {} bytes (the cache workloads preload {} values)",
            workload::MAX_VALUE_SIZE,
            workload::KEY_SPACE
        ));
    }
    if args.url.starts_with("memory:") {
        return Err("--url: the benchmark needs a real Redis (redis:// or rediss://)".into());
    }
    Ok(())
}

/// Resolves on SIGINT or SIGTERM, so a stopped run still deletes its keys.
async fn interrupted() {
    crate::stop_signal().await;
    eprintln!("rediskit bench: interrupted; deleting the run's keys");
}

/// Loads the scripts so the first timed calls do not pay for `NOSCRIPT` and a retry.
async fn prepare_client(client: &Client) -> Result<(), String> {
    client
        .load_scripts()
        .await
        .map_err(|err| format!("loading scripts: {err}"))
}

/// The bare connections of the raw_* baseline: as many as the library's pool spreads its calls
/// over (one per worker thread, at most `--connections`), so that the two compare like for like.
fn raw_count(connections: usize, workers: usize) -> usize {
    connections.min(workers).max(1)
}

/// Worker threads of the runtime the benchmark runs on.
fn workers() -> usize {
    tokio::runtime::Handle::current().metrics().num_workers()
}

async fn raw_connections(url: &str, count: usize) -> Result<Vec<MultiplexedConnection>, String> {
    let client = redis::Client::open(url).map_err(|err| format!("--url: {err}"))?;
    let mut connections = Vec::with_capacity(count);
    for _ in 0..count {
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|err| format!("cannot reach Redis at {}: {err}", redact_url(url)))?;
        connections.push(connection);
    }
    Ok(connections)
}

async fn measure_all(
    ctx: &Arc<Ctx>,
    workloads: &[Workload],
    concurrencies: &[usize],
    ops: u64,
) -> Result<Vec<Measured>, String> {
    let progress = std::io::stderr().is_terminal();
    let mut measured = Vec::new();
    for &workload in workloads {
        for &concurrency in concurrencies {
            let stats = measure(ctx, workload, concurrency, ops, progress).await?;
            measured.push(Measured {
                workload,
                concurrency,
                stats,
            });
        }
    }
    Ok(measured)
}

/// One run: prepare, time `ops` operations over `concurrency` tasks, clean up.
async fn measure(
    ctx: &Arc<Ctx>,
    workload: Workload,
    concurrency: usize,
    ops: u64,
    progress: bool,
) -> Result<Stats, String> {
    let name = workload.name();
    let mut prepared = workload::prepare(ctx, workload, concurrency, ops)
        .await
        .map_err(|err| format!("{name}: {err}"))?;
    let mut admin = ctx.raw[0].clone();
    let server_cpu_before = server_cpu(&mut admin).await;
    let client_cpu_before = process_cpu();
    let pipelined_before = ctx.client.stats();
    let sessions_before = ctx.sessions.stats();
    let limiter_before = ctx.limiter.stats();
    let near_hits_before = prepared.near_hits();

    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let tasks_count = concurrency as u64;
    for index in 0..concurrency {
        let count = ops / tasks_count + u64::from((index as u64) < ops % tasks_count);
        if count == 0 {
            continue;
        }
        let task = Task::new(index, concurrency, &mut prepared);
        let ctx = ctx.clone();
        let done = done.clone();
        tasks.spawn(async move { task.run(&ctx, workload, count, &done).await });
    }

    let mut latencies = Vec::with_capacity(ops as usize);
    let mut errors = 0;
    let mut first_error = None;
    let mut finished = started;
    let mut ticker = tokio::time::interval(Duration::from_millis(200));
    let label = format!("{name} ×{concurrency}");
    loop {
        tokio::select! {
            joined = tasks.join_next() => match joined {
                None => break,
                Some(Ok(outcome)) => {
                    latencies.extend(outcome.latencies);
                    errors += outcome.errors;
                    finished = finished.max(outcome.finished);
                    if first_error.is_none() {
                        first_error = outcome.first_error;
                    }
                }
                Some(Err(err)) => return Err(format!("{name}: a task failed: {err}")),
            },
            _ = ticker.tick(), if progress => draw_progress(&label, done.load(Ordering::Relaxed), ops),
        }
    }
    let elapsed = finished - started;
    // `near_get` measures the near-cache: a read that went to Redis instead (the near-cache
    // flushed when its tracking connection stalled, an entry evicted) is not what the workload
    // times. Said, so that a reader knows the figures mix both; not an error, as the read did
    // answer.
    if let (Some(before), Some(after)) = (near_hits_before, prepared.near_hits()) {
        let missed = (ops - errors).saturating_sub(after - before);
        if missed > 0 {
            eprintln!(
                "rediskit bench: {name} ×{concurrency}: {missed} of {ops} reads went to Redis, \
                 not the near-cache; its figures mix both"
            );
        }
    }
    let client_cpu = process_cpu()
        .zip(client_cpu_before)
        .map(|(after, before)| (after - before) * 1e6 / ops as f64);
    let server_cpu = server_cpu(&mut admin)
        .await
        .zip(server_cpu_before)
        .map(|(after, before)| (after - before) * 1e6 / ops as f64);
    let pipelined = ctx.client.stats();
    let batches = pipelined.pipelined_batches - pipelined_before.pipelined_batches;
    // Operations per script call, from the calls that carried several and the operations they
    // carried: a call that carried one operation is not counted as coalesced.
    let per_call = |coalesced_calls: u64, coalesced_operations: u64| {
        let calls = coalesced_calls + ops.saturating_sub(coalesced_operations);
        (calls > 0).then(|| ops as f64 / calls as f64)
    };
    let commands_per_batch = match workload {
        Workload::SessionCreate | Workload::SessionRotate => {
            let sessions = ctx.sessions.stats();
            per_call(
                sessions.coalesced_calls - sessions_before.coalesced_calls,
                sessions.coalesced_operations - sessions_before.coalesced_operations,
            )
        }
        Workload::Ratelimit => {
            let limiter = ctx.limiter.stats();
            per_call(
                limiter.coalesced_calls - limiter_before.coalesced_calls,
                limiter.coalesced_decisions - limiter_before.coalesced_decisions,
            )
        }
        _ => (batches > 0).then(|| {
            (pipelined.pipelined_commands - pipelined_before.pipelined_commands) as f64
                / batches as f64
        }),
    };
    if progress {
        eprint!("\r\x1b[2K");
    }
    prepared.finish().await;
    if let Some(err) = first_error {
        eprintln!("rediskit bench: {name} ×{concurrency}: {errors} errors; the first: {err}");
    }
    // The results stand whatever the clean-up meets: a page that times out (a busy shared
    // server) is tried again, and what is left is said, not a reason to throw the run away.
    let mut attempt = 1;
    while let Err(err) = cleanup(&mut admin, ctx.prefix()).await {
        if attempt == CLEANUP_ATTEMPTS {
            eprintln!(
                "rediskit bench: {name}: cleaning up: {err}; keys under `{}` may be left (they \
                 expire)",
                ctx.prefix()
            );
            break;
        }
        attempt += 1;
    }

    latencies.sort_unstable();
    Ok(Stats {
        ops,
        errors,
        elapsed,
        p50_us: percentile(&latencies, 0.50),
        p99_us: percentile(&latencies, 0.99),
        client_cpu_us: client_cpu,
        server_cpu_us: server_cpu,
        commands_per_batch,
    })
}

/// The `p` quantile of sorted nanoseconds (nearest rank), in microseconds.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1000.0
}

fn draw_progress(label: &str, done: u64, total: u64) {
    const WIDTH: u64 = 30;
    let filled = (done * WIDTH / total.max(1)).min(WIDTH) as usize;
    let mut stderr = std::io::stderr().lock();
    let _ = write!(
        stderr,
        "\r\x1b[2K{label:<26} [{}{}] {:>3}% {done}/{total}",
        "#".repeat(filled),
        " ".repeat(WIDTH as usize - filled),
        done * 100 / total.max(1),
    );
    let _ = stderr.flush();
}

/// Deletes every key under `prefix` with `SCAN` + `DEL`, page by page.
/// Times a workload's clean-up is tried before the run goes on without it.
const CLEANUP_ATTEMPTS: u32 = 3;

async fn cleanup(connection: &mut MultiplexedConnection, prefix: &str) -> redis::RedisResult<()> {
    // The prefix is `bench:<hex>:`: nothing in it is a glob character.
    let pattern = format!("{prefix}*");
    let mut cursor = 0u64;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(CLEANUP_BATCH)
            .query_async(connection)
            .await?;
        for chunk in keys.chunks(CLEANUP_BATCH) {
            redis::cmd("DEL")
                .arg(chunk)
                .query_async::<()>(connection)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// This process's CPU time (user + system) in seconds, from `/proc/self/stat`.
fn process_cpu() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name (which may hold spaces) start at field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux this runs on; std offers no sysconf.
    Some((utime + stime) / 100.0)
}

/// redis-server's CPU time (user + system of its main process) in seconds, from `INFO cpu`.
async fn server_cpu(connection: &mut MultiplexedConnection) -> Option<f64> {
    let info: String = redis::cmd("INFO")
        .arg("cpu")
        .query_async(connection)
        .await
        .ok()?;
    let field = |name: &str| -> Option<f64> {
        info.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|value| value.trim().parse().ok())
    };
    Some(field("used_cpu_user")? + field("used_cpu_sys")?)
}

fn json(measured: &[&Measured]) -> serde_json::Value {
    let mut object = serde_json::Map::new();
    for m in measured {
        object.insert(
            m.workload.name().to_owned(),
            serde_json::json!({
                "ops_per_sec": m.stats.ops_per_sec().round() as u64,
                "p50_us": round1(m.stats.p50_us),
                "p99_us": round1(m.stats.p99_us),
                "errors": m.stats.errors,
            }),
        );
    }
    serde_json::Value::Object(object)
}

fn round1(value: f64) -> f64 {
    (value * 10.0).round() / 10.0
}

fn print_table(args: &BenchArgs, measured: &[&Measured], skipped: &[(Workload, &str)]) {
    println!(
        "rediskit bench: {} ops per workload, {} tasks, {}-byte values, {} connections \
         (raw_*: {}), {}",
        args.ops,
        args.concurrency,
        args.value_size,
        args.connections,
        raw_count(args.connections, workers()),
        redact_url(&args.url)
    );
    println!(
        "{:<20} {:>10} {:>9} {:>9} {:>7} {:>13} {:>12} {:>11}",
        "workload",
        "ops/s",
        "p50 µs",
        "p99 µs",
        "errors",
        "client µs/op",
        "redis µs/op",
        "cmds/batch"
    );
    let figure = |value: Option<f64>| value.map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"));
    for m in measured {
        println!(
            "{:<20} {:>10} {:>9.1} {:>9.1} {:>7} {:>13} {:>12} {:>11}",
            m.workload.name(),
            thousands(m.stats.ops_per_sec()),
            m.stats.p50_us,
            m.stats.p99_us,
            m.stats.errors,
            figure(m.stats.client_cpu_us),
            figure(m.stats.server_cpu_us),
            figure(m.stats.commands_per_batch),
        );
    }
    for (workload, why) in skipped {
        println!("{:<20} not measured: {why}", workload.name());
    }
}

/// `1234567.8` → `1,234,568`.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Throughput counts the operations that succeeded: half failing fast must not read as
    /// more work done.
    #[test]
    fn failed_operations_are_no_throughput() {
        let stats = Stats {
            ops: 1_000,
            errors: 400,
            elapsed: Duration::from_secs(2),
            p50_us: 0.0,
            p99_us: 0.0,
            client_cpu_us: None,
            server_cpu_us: None,
            commands_per_batch: None,
        };
        assert_eq!(stats.ops_per_sec(), 300.0);
    }

    /// Percentiles use the nearest rank and report microseconds.
    #[test]
    fn percentiles_by_nearest_rank() {
        let sorted: Vec<u64> = (1..=100).map(|us| us * 1000).collect();
        assert_eq!(percentile(&sorted, 0.50), 50.0);
        assert_eq!(percentile(&sorted, 0.99), 99.0);
        assert_eq!(percentile(&[7000], 0.99), 7.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }

    /// Throughput is printed with thousands separators.
    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1234.0), "1,234");
        assert_eq!(thousands(1_234_567.8), "1,234,568");
    }
}
