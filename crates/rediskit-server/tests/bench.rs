//! `rediskit bench`, run as a process against a real redis-server: it works, reports every
//! workload, and leaves no key behind. Nothing here is about speed.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rediskit_server::bench::Workload;
use rediskit_testkit::RedisServer;

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rediskit"))
        .arg("bench")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

fn available() -> Vec<&'static str> {
    Workload::ALL
        .into_iter()
        .filter(|w| w.unavailable().is_none())
        .map(Workload::name)
        .collect()
}

fn dbsize(server: &RedisServer) -> u64 {
    redis::cmd("DBSIZE").query(&mut server.admin()).unwrap()
}

/// A directory of its own under the system's temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "rediskit-{name}-{}-{}",
            std::process::id(),
            rediskit_testkit::free_port()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Checks that `xml` is well formed: tags nest and close, attributes are quoted, and `&` only
/// starts an entity. Enough to know a browser will parse the chart.
fn assert_well_formed(xml: &str) {
    let mut open: Vec<&str> = Vec::new();
    let mut rest = xml.trim();
    assert!(rest.starts_with("<svg"), "does not start with <svg: {xml}");
    while let Some(start) = rest.find('<') {
        check_text(&rest[..start]);
        let end = rest[start..].find('>').expect("an unclosed tag") + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(open.pop(), Some(name.trim()), "mismatched </{name}>");
            continue;
        }
        let name = tag.split_whitespace().next().unwrap().trim_end_matches('/');
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in <{tag}>"
        );
        if !tag.ends_with('/') {
            open.push(name);
        }
    }
    check_text(rest);
    assert!(open.is_empty(), "unclosed elements: {open:?}");
}

fn check_text(text: &str) {
    for (i, _) in text.match_indices('&') {
        let entity = &text[i..];
        assert!(
            ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                .iter()
                .any(|e| entity.starts_with(e)),
            "a bare & in {text:?}"
        );
    }
}

/// `--json` prints one object with every available workload, none failed, and the run deletes
/// every key it wrote.
#[test]
fn json_reports_every_workload_and_cleans_up() {
    let server = RedisServer::start();

    let output = bench(&[
        "--url",
        &server.url(),
        "--ops",
        "2000",
        "--concurrency",
        "8",
        "--json",
    ]);

    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).unwrap();
    let report: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|err| panic!("stdout is not one JSON object ({err}): {stdout}"));
    let report = report.as_object().unwrap();
    for name in available() {
        let entry = report
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing: {stdout}"));
        assert!(
            entry["ops_per_sec"].as_f64().unwrap() > 0.0,
            "{name}: {entry}"
        );
        assert!(entry["p50_us"].as_f64().unwrap() > 0.0, "{name}: {entry}");
        assert!(
            entry["p99_us"].as_f64().unwrap() >= entry["p50_us"].as_f64().unwrap(),
            "{name}: {entry}"
        );
        assert_eq!(entry["errors"], 0, "{name}: {entry}");
    }
    assert_eq!(report.len(), available().len(), "{stdout}");
    assert!(
        report.contains_key("near_get"),
        "near-cache hits are measured: {stdout}"
    );
    assert!(!String::from_utf8_lossy(&output.stderr).contains("skipping"));
    assert_eq!(dbsize(&server), 0, "the run left keys behind");
}

/// `--report DIR` sweeps the concurrencies and writes the tables and a well-formed SVG chart with
/// one line per workload.
#[test]
fn report_writes_tables_and_chart() {
    let server = RedisServer::start();
    let dir = TempDir::new("bench-report");
    let report_dir = dir.0.join("out");

    let output = bench(&[
        "--url",
        &server.url(),
        "--ops",
        "500",
        "--report",
        report_dir.to_str().unwrap(),
    ]);

    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("cache_get"), "no table on stdout: {stdout}");
    let markdown = read(&report_dir.join("benchmarks.md"));
    assert!(
        markdown.contains("| workload | 1 | 8 | 64 | 256 |"),
        "{markdown}"
    );
    for name in available() {
        assert!(
            markdown.contains(&format!("| `{name}` |")),
            "{name}: {markdown}"
        );
    }
    assert!(markdown.contains("`near_get`"), "{markdown}");
    assert!(markdown.contains("CPU model"), "{markdown}");
    assert!(
        markdown.contains("## Auto-pipelining: commands per batch"),
        "{markdown}"
    );
    assert!(markdown.contains("| client runtime | "), "{markdown}");
    assert!(markdown.contains("| redis-server | "), "{markdown}");
    assert!(!markdown.contains("| redis-server | unknown"), "{markdown}");
    let svg = read(&report_dir.join("throughput.svg"));
    assert_well_formed(&svg);
    assert_eq!(svg.matches("<polyline").count(), available().len(), "{svg}");
    assert_eq!(dbsize(&server), 0, "the sweep left keys behind");
}

/// Only the selected workloads run; a bad name is refused by the argument parser.
#[test]
fn selected_workloads_only() {
    let server = RedisServer::start();

    let output = bench(&[
        "--url",
        &server.url(),
        "--ops",
        "200",
        "--workloads",
        "cache_get,raw_get",
        "--connections",
        "1",
        "--json",
    ]);
    let refused = bench(&["--url", &server.url(), "--workloads", "cache_gets"]);
    // Past what the preload of 10,000 values can hold: said before anything runs.
    let too_large = bench(&["--url", &server.url(), "--value-size", "200000"]);

    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let names: Vec<&String> = report.as_object().unwrap().keys().collect();
    assert_eq!(names, ["cache_get", "raw_get"]);
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert_eq!(too_large.status.code(), Some(2), "{too_large:?}");
    let said = String::from_utf8_lossy(&too_large.stderr);
    assert!(said.contains("--value-size"), "{said}");
    assert_eq!(dbsize(&server), 0);
}

/// Calls of `command` (as `INFO commandstats` names it: `evalsha`, `client|tracking`) the
/// server has served.
fn command_calls(server: &RedisServer, command: &str) -> u64 {
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut server.admin())
        .unwrap();
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .map_or(0, |rest| rest.split(',').next().unwrap().parse().unwrap())
}

/// Only `near_get` runs with a tracking connection: with one open, redis-server checks every
/// key any client writes against the tracked prefixes, a cost the other workloads must not
/// carry.
#[test]
fn only_near_get_turns_tracking_on() {
    let server = RedisServer::start();
    let run = |workloads: &str| {
        let output = bench(&[
            "--url",
            &server.url(),
            "--ops",
            "200",
            "--concurrency",
            "8",
            "--workloads",
            workloads,
            "--json",
        ]);
        assert!(output.status.success(), "{workloads}: {output:?}");
    };

    run("cache_set,session_rotate");
    assert_eq!(command_calls(&server, "client|tracking"), 0);
    run("near_get");
    assert!(command_calls(&server, "client|tracking") > 0);
    assert_eq!(dbsize(&server), 0);
}

/// For the coalesced scripts (sessions, the rate limiter) the last column is operations per
/// script call: the operations run over the `EVALSHA`s redis-server served.
#[test]
fn script_rows_show_operations_per_script_call() {
    for workload in ["session_create", "ratelimit"] {
        let server = RedisServer::start();
        let ops = 400;

        let output = bench(&[
            "--url",
            &server.url(),
            "--ops",
            &ops.to_string(),
            "--concurrency",
            "16",
            "--workloads",
            workload,
        ]);

        assert!(output.status.success(), "{output:?}");
        let text = String::from_utf8(output.stdout).unwrap();
        let row = text
            .lines()
            .find(|line| line.starts_with(&format!("{workload} ")))
            .unwrap_or_else(|| panic!("no {workload} row in {text}"));
        let per_call: f64 = row.split_whitespace().last().unwrap().parse().unwrap();
        let served = ops as f64 / command_calls(&server, "evalsha") as f64;
        assert!(
            (per_call - served).abs() <= 0.05,
            "{workload}: {per_call} operations per call printed, {served} served"
        );
    }
}

/// `cache_get_or_set` misses a tenth of the run however few operations each task has (here
/// fewer than one): each miss computes and stores its value, a `SET` beyond the preload's
/// 10,000.
#[test]
fn get_or_set_misses_a_tenth_even_with_more_tasks_than_operations() {
    let server = RedisServer::start();
    let ops = 200;

    let output = bench(&[
        "--url",
        &server.url(),
        "--ops",
        &ops.to_string(),
        "--concurrency",
        "256",
        "--workloads",
        "cache_get_or_set",
        "--json",
    ]);

    assert!(output.status.success(), "{output:?}");
    let stores = command_calls(&server, "set") - 10_000;
    assert!(stores >= ops / 10, "{stores} SETs after the preload");
    assert_eq!(dbsize(&server), 0);
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}
