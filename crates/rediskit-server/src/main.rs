//! `rediskit`: the operator CLI (and, in a later version, the HTTP service).
//!
//! Thin by design: configuration from the environment → telemetry → the command.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rediskit::{Client, Config};

/// rediskit — the Redis layer of a web back end.
///
/// Configuration comes from the environment: REDIS_URL, or REDIS_HOST/REDIS_PORT/REDIS_DB with
/// ENVIRONMENT=production, or DEV_REDIS_HOST/DEV_REDIS_PORT/DEV_REDIS_DB in development (the
/// default, which targets redis://localhost:6379/0). See the README's configuration table.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Check that Redis answers: prints a JSON report on stdout and exits 0 when healthy, 1 when
    /// not (usable as a container health check). This is also what runs without a subcommand.
    Health,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("rediskit: {err}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Health) {
        Command::Health => health(config).await,
    }
}

async fn health(config: Config) -> ExitCode {
    let client = match Client::connect_lazy(config) {
        Ok(client) => client,
        Err(err) => {
            eprintln!("rediskit: {err}");
            return ExitCode::from(2);
        }
    };
    let health = client.health().await;
    let report = serde_json::json!({
        "status": if health.ok { "healthy" } else { "unhealthy" },
        "redis_connected": health.ok,
        "backend": health.backend.as_str(),
        "latency_ms": health.latency.map(|latency| latency.as_secs_f64() * 1000.0),
        "pool": {
            "max": health.pool.max,
            "in_use": health.pool.in_use,
            "idle": health.pool.idle,
        },
        "error": health.error,
    });
    println!("{report}");
    client.close().await;
    if health.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
