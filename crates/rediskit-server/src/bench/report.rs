//! `--report DIR`: a description of the machine, `DIR/benchmarks.md` (tables) and
//! `DIR/throughput.svg` (throughput against concurrency, one line per workload), hand-written so
//! the tool needs no plotting library.

use std::fmt::Write as _;
use std::path::Path;
use std::time::SystemTime;

use redis::aio::MultiplexedConnection;
use rediskit::redact_url;

use super::workload::{KEY_SPACE, Workload};
use super::{BenchArgs, Measured};

/// Where and when the benchmark ran.
#[derive(Debug, Clone)]
pub(super) struct Machine {
    cpus: usize,
    /// Worker threads of the benchmark's runtime.
    workers: usize,
    cpu_model: Option<String>,
    os: String,
    redis_version: Option<String>,
    date: String,
    load_before: Option<String>,
    load_after: Option<String>,
}

impl Machine {
    /// Describes this machine and the server behind `connection`, and notes the load now.
    pub(super) async fn probe(connection: &mut MultiplexedConnection) -> Self {
        let info: Option<String> = redis::cmd("INFO")
            .arg("server")
            .query_async(connection)
            .await
            .ok();
        let redis_version = info.as_deref().and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("redis_version:"))
                .map(|v| v.trim().to_owned())
        });
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .filter(|line| line.starts_with("model name"))
                    .find_map(|line| line.split_once(':'))
                    .map(|(_, model)| model.trim().to_owned())
            });
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|release| format!(", kernel {}", release.trim()))
            .unwrap_or_default();
        Self {
            cpus: std::thread::available_parallelism().map_or(1, usize::from),
            workers: super::workers(),
            cpu_model,
            os: format!(
                "{} {}{kernel}",
                std::env::consts::OS,
                std::env::consts::ARCH
            ),
            redis_version,
            date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            load_before: load_average(),
            load_after: None,
        }
    }

    /// Notes the load once the measuring is over.
    pub(super) fn finish(mut self) -> Self {
        self.load_after = load_average();
        self
    }

    fn caption(&self) -> String {
        format!(
            "{} CPUs ({}), Redis {}, {}",
            self.cpus,
            self.cpu_model.as_deref().unwrap_or("unknown CPU"),
            self.redis_version.as_deref().unwrap_or("?"),
            self.date
        )
    }
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// Writes `dir/benchmarks.md` and `dir/throughput.svg`.
pub(super) fn write(
    dir: &Path,
    args: &BenchArgs,
    machine: &Machine,
    workloads: &[Workload],
    skipped: &[(Workload, &str)],
    measured: &[Measured],
) -> Result<(), String> {
    let io = |path: &Path, err: std::io::Error| format!("--report: {}: {err}", path.display());
    std::fs::create_dir_all(dir).map_err(|err| io(dir, err))?;
    let markdown_path = dir.join("benchmarks.md");
    std::fs::write(
        &markdown_path,
        markdown(args, machine, workloads, skipped, measured),
    )
    .map_err(|err| io(&markdown_path, err))?;
    let svg_path = dir.join("throughput.svg");
    std::fs::write(&svg_path, svg(workloads, measured, &machine.caption()))
        .map_err(|err| io(&svg_path, err))?;
    Ok(())
}

fn concurrencies(measured: &[Measured]) -> Vec<usize> {
    let mut all: Vec<usize> = measured.iter().map(|m| m.concurrency).collect();
    all.sort_unstable();
    all.dedup();
    all
}

fn find(measured: &[Measured], workload: Workload, concurrency: usize) -> Option<&Measured> {
    measured
        .iter()
        .find(|m| m.workload == workload && m.concurrency == concurrency)
}

fn markdown(
    args: &BenchArgs,
    machine: &Machine,
    workloads: &[Workload],
    skipped: &[(Workload, &str)],
    measured: &[Measured],
) -> String {
    let columns = concurrencies(measured);
    let mut out = String::new();
    let _ = writeln!(out, "# rediskit benchmarks\n");
    let _ = writeln!(
        out,
        "Measured by `rediskit bench --report` on {}.\n",
        machine.date
    );
    let _ = writeln!(out, "## Machine\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| CPUs | {} |", machine.cpus);
    let _ = writeln!(
        out,
        "| CPU model | {} |",
        machine.cpu_model.as_deref().unwrap_or("unknown")
    );
    let _ = writeln!(out, "| OS | {} |", machine.os);
    let _ = writeln!(
        out,
        "| client runtime | {} worker threads |",
        machine.workers
    );
    let _ = writeln!(
        out,
        "| redis-server | {} at `{}` |",
        machine.redis_version.as_deref().unwrap_or("unknown"),
        redact_url(&args.url)
    );
    let _ = writeln!(
        out,
        "| rediskit | {} ({} build) |",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "debug: not representative"
        } else {
            "release"
        }
    );
    let _ = writeln!(
        out,
        "| load average (1, 5, 15 min) | before {}, after {} |",
        machine.load_before.as_deref().unwrap_or("?"),
        machine.load_after.as_deref().unwrap_or("?")
    );
    let _ = writeln!(out, "\n## Settings\n");
    let _ = writeln!(
        out,
        "{} operations per workload and concurrency, {}-byte values, {} keys (and rate-limit \
         callers); the client's pool has {} connections, and calls take turns on {} of them \
         (one per worker thread); the `raw_*` baseline deals as many bare `redis` multiplexed \
         connections round robin. Each task awaits one operation at a time, so concurrency is \
         the number of operations in flight. Redis and the benchmark share the machine's CPUs.\n",
        args.ops,
        args.value_size,
        KEY_SPACE,
        args.connections,
        super::raw_count(args.connections, machine.workers)
    );
    let names: Vec<&str> = workloads.iter().map(|w| w.name()).collect();
    let _ = writeln!(
        out,
        "```\nrediskit bench --url {} --ops {} --value-size {} --connections {} --workloads {} \
         --report DIR\n```",
        redact_url(&args.url),
        args.ops,
        args.value_size,
        args.connections,
        names.join(",")
    );

    let header = |out: &mut String, title: &str| {
        let _ = writeln!(out, "\n## {title}\n");
        let _ = write!(out, "| workload |");
        for c in &columns {
            let _ = write!(out, " {c} |");
        }
        let _ = write!(out, "\n|---|");
        for _ in &columns {
            let _ = write!(out, "---:|");
        }
        out.push('\n');
    };
    type Cell = fn(&Measured) -> String;
    let tables: [(&str, Cell); 5] = [
        ("Throughput (operations per second), by concurrency", |m| {
            super::thousands(m.stats.ops_per_sec())
        }),
        ("p99 latency (µs), by concurrency", |m| {
            format!("{:.0}", m.stats.p99_us)
        }),
        ("p50 latency (µs), by concurrency", |m| {
            format!("{:.0}", m.stats.p50_us)
        }),
        (
            "CPU per operation (µs): this process / redis-server, by concurrency",
            |m| {
                let cpu = |v: Option<f64>| v.map_or_else(|| "?".to_owned(), |v| format!("{v:.1}"));
                format!(
                    "{} / {}",
                    cpu(m.stats.client_cpu_us),
                    cpu(m.stats.server_cpu_us)
                )
            },
        ),
        (
            "Auto-pipelining: commands per batch (– none batched); session and rate-limit scripts: operations per call, by concurrency",
            |m| {
                m.stats
                    .commands_per_batch
                    .map_or_else(|| "–".to_owned(), |v| format!("{v:.1}"))
            },
        ),
    ];
    for (title, cell) in tables {
        header(&mut out, title);
        for &workload in workloads {
            let _ = write!(out, "| `{}` |", workload.name());
            for &c in &columns {
                match find(measured, workload, c) {
                    Some(m) => {
                        let _ = write!(out, " {} |", cell(m));
                    }
                    None => out.push_str(" – |"),
                }
            }
            out.push('\n');
        }
    }
    let failed: Vec<&Measured> = measured.iter().filter(|m| m.stats.errors > 0).collect();
    if !failed.is_empty() {
        let _ = writeln!(out, "\n## Errors\n");
        for m in failed {
            let _ = writeln!(
                out,
                "- `{}` at concurrency {}: {} of {} operations failed",
                m.workload.name(),
                m.concurrency,
                m.stats.errors,
                m.stats.ops
            );
        }
    }
    if !skipped.is_empty() {
        let _ = writeln!(out, "\n## Not measured\n");
        for (workload, why) in skipped {
            let _ = writeln!(out, "- `{}`: {why}", workload.name());
        }
    }
    let _ = writeln!(
        out,
        "\n## Chart\n\n![Throughput against concurrency, one line per workload](throughput.svg)"
    );
    out
}

/// Line colours, by position in [`Workload::ALL`] so a workload keeps its colour across charts.
const COLOURS: [&str; 11] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#bcbd22", "#17becf", "#393b79",
];

fn svg(workloads: &[Workload], measured: &[Measured], caption: &str) -> String {
    const WIDTH: f64 = 820.0;
    const HEIGHT: f64 = 500.0;
    let (left, right, top, bottom) = (90.0, WIDTH - 210.0, 60.0, HEIGHT - 80.0);
    let columns = concurrencies(measured);
    let max_log = columns
        .last()
        .map_or(8.0, |&c| (c as f64).log2().ceil())
        .max(8.0);
    let x = |c: usize| left + (c as f64).log2() / max_log * (right - left);
    let axis = LogAxis::spanning(measured.iter().map(|m| m.stats.ops_per_sec()));
    let y = |v: f64| bottom - axis.fraction(v) * (bottom - top);

    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(
        out,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        out,
        r##"<text x="{left}" y="26" font-size="16" font-weight="bold">rediskit bench: throughput against concurrency</text>"##
    );
    let _ = writeln!(
        out,
        r##"<text x="{left}" y="44" font-size="11" fill="#555555">{}</text>"##,
        escape(caption)
    );
    for value in axis.ticks() {
        let at = y(value);
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{at:.1}" x2="{right}" y2="{at:.1}" stroke="#e0e0e0"/>"##
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left - 8.0,
            at + 4.0,
            si(value)
        );
    }
    for power in 0..=(max_log as u32) {
        let c = 1usize << power;
        let at = x(c);
        let _ = writeln!(
            out,
            r##"<line x1="{at:.1}" y1="{top}" x2="{at:.1}" y2="{bottom}" stroke="#f0f0f0"/>"##
        );
        let _ = writeln!(
            out,
            r##"<line x1="{at:.1}" y1="{bottom}" x2="{at:.1}" y2="{:.1}" stroke="#333333"/>"##,
            bottom + 5.0
        );
        let _ = writeln!(
            out,
            r##"<text x="{at:.1}" y="{:.1}" text-anchor="middle">{c}</text>"##,
            bottom + 19.0
        );
    }
    let _ = writeln!(
        out,
        r##"<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333333"/>"##
    );
    let _ = writeln!(
        out,
        r##"<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333333"/>"##
    );
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle">concurrency (tasks with one operation in flight each; log₂ scale)</text>"##,
        (left + right) / 2.0,
        bottom + 42.0
    );
    let _ = writeln!(
        out,
        r##"<text transform="translate(22 {:.1}) rotate(-90)" text-anchor="middle">throughput (operations per second; log₁₀ scale)</text>"##,
        (top + bottom) / 2.0
    );
    for (row, &workload) in workloads.iter().enumerate() {
        let colour = COLOURS[Workload::ALL
            .iter()
            .position(|&w| w == workload)
            .unwrap_or(row)
            % COLOURS.len()];
        // The bare-client baseline is dashed, so the layer's lines stand out against it.
        let dash = if workload.name().starts_with("raw_") {
            r##" stroke-dasharray="6 4""##
        } else {
            ""
        };
        let points: Vec<(f64, f64)> = columns
            .iter()
            .filter_map(|&c| find(measured, workload, c))
            .map(|m| (x(m.concurrency), y(m.stats.ops_per_sec())))
            .collect();
        let path: Vec<String> = points
            .iter()
            .map(|(px, py)| format!("{px:.1},{py:.1}"))
            .collect();
        let _ = writeln!(
            out,
            r##"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}><title>{}</title></polyline>"##,
            path.join(" "),
            workload.name()
        );
        for (px, py) in &points {
            let _ = writeln!(
                out,
                r##"<circle cx="{px:.1}" cy="{py:.1}" r="3" fill="{colour}"/>"##
            );
        }
        let ly = top + 6.0 + 20.0 * row as f64;
        let _ = writeln!(
            out,
            r##"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/>"##,
            right + 20.0,
            right + 44.0
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}">{}</text>"##,
            right + 50.0,
            ly + 4.0,
            workload.name()
        );
    }
    out.push_str("</svg>\n");
    out
}

/// The chart's y axis: whole powers of ten around every throughput measured, on a log scale. The
/// workloads span three or four of them (a lone `session_rotate` does ~10k operations a second,
/// `near_get` millions), and on a linear axis all but the near-cache would lie flat at the bottom.
struct LogAxis {
    /// log₁₀ of the axis's ends.
    low: f64,
    high: f64,
}

impl LogAxis {
    /// From the power of ten at or below the smallest positive value to the one at or above the
    /// largest (one decade, 1 to 10, with nothing to show).
    fn spanning(values: impl Iterator<Item = f64>) -> Self {
        let (min, max) = values
            .filter(|v| v.is_finite() && *v > 0.0)
            .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
        if max == 0.0 {
            return Self {
                low: 0.0,
                high: 1.0,
            };
        }
        let low = min.log10().floor();
        Self {
            low,
            high: max.log10().ceil().max(low + 1.0),
        }
    }

    /// Where `value` lies between the axis's ends, from 0 (bottom) to 1 (top); a value of 0 (a
    /// run that completed nothing) lies at the bottom.
    fn fraction(&self, value: f64) -> f64 {
        if !(value.is_finite() && value > 0.0) {
            return 0.0;
        }
        ((value.log10() - self.low) / (self.high - self.low)).clamp(0.0, 1.0)
    }

    /// Grid values: 1, 2 and 5 times each power of ten within the axis, and its top.
    fn ticks(&self) -> Vec<f64> {
        let (low, high) = (self.low as i32, self.high as i32);
        let mut ticks: Vec<f64> = (low..high)
            .flat_map(|power| [1.0, 2.0, 5.0].map(|m| m * 10f64.powi(power)))
            .collect();
        ticks.push(10f64.powi(high));
        ticks
    }
}

/// `250000` → `250k`, `1500000` → `1.5M`.
fn si(value: f64) -> String {
    let trim = |text: String| {
        if text.contains('.') {
            text.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            text
        }
    };
    if value >= 1e6 {
        format!("{}M", trim(format!("{:.2}", value / 1e6)))
    } else if value >= 1e3 {
        format!("{}k", trim(format!("{:.1}", value / 1e3)))
    } else {
        format!("{value:.0}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::Stats;
    use super::*;

    /// The y axis runs between the powers of ten around the values, whatever else is measured.
    #[test]
    fn the_y_axis_spans_whole_decades() {
        let axis = LogAxis::spanning([8_000.0, 310_000.0, 2_200_000.0, 0.0, f64::NAN].into_iter());
        assert_eq!((axis.low, axis.high), (3.0, 7.0));
        assert_eq!(
            axis.ticks(),
            vec![
                1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 2e6, 5e6, 1e7
            ]
        );
        let nothing = LogAxis::spanning([0.0].into_iter());
        assert_eq!((nothing.low, nothing.high), (0.0, 1.0));
        let one = LogAxis::spanning([100_000.0].into_iter());
        assert_eq!((one.low, one.high), (5.0, 6.0));
    }

    /// Each tenfold step of throughput is the same height on the chart, so a workload at 10k and
    /// one at 3M both show; a run that did nothing lies on the bottom line.
    #[test]
    fn the_chart_spaces_each_tenfold_step_alike() {
        let stats = |ops: u64| Stats {
            ops,
            errors: 0,
            elapsed: Duration::from_secs(1),
            p50_us: 1.0,
            p99_us: 1.0,
            client_cpu_us: None,
            server_cpu_us: None,
            commands_per_batch: None,
        };
        let measured: Vec<Measured> = [(1, 10_000), (8, 100_000), (64, 1_000_000), (256, 0)]
            .into_iter()
            .map(|(concurrency, ops)| Measured {
                workload: Workload::CacheGet,
                concurrency,
                stats: stats(ops),
            })
            .collect();
        let chart = svg(&[Workload::CacheGet], &measured, "test");
        let heights: Vec<f64> = chart
            .split("<circle ")
            .skip(1)
            .map(|circle| {
                let cy = circle.split("cy=\"").nth(1).unwrap();
                cy[..cy.find('"').unwrap()].parse().unwrap()
            })
            .collect();
        assert_eq!(heights.len(), 4, "{chart}");
        let step = heights[0] - heights[1];
        assert!(step > 50.0, "{heights:?}");
        assert!((heights[1] - heights[2] - step).abs() < 0.2, "{heights:?}");
        // 10k is the bottom of the axis (its decade's floor), as is the run that did nothing.
        assert_eq!(heights[3], heights[0], "{heights:?}");
        assert!(chart.contains("log₁₀ scale"), "{chart}");
    }

    /// Axis labels are short.
    #[test]
    fn si_labels() {
        assert_eq!(si(0.0), "0");
        assert_eq!(si(50_000.0), "50k");
        assert_eq!(si(250_000.0), "250k");
        assert_eq!(si(1_500_000.0), "1.5M");
    }
}
