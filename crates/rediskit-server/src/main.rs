//! `rediskit`: the service and the operator CLI. Thin by design: configuration → telemetry →
//! the command.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use rediskit::web::RedisHealth;
use rediskit::{Cache, Client, Sessions};
use rediskit_server::{CACHE_NAMESPACE, ServiceConfig, Users};

/// mimalloc, not the system allocator: each Redis call allocates a dozen small buffers (key,
/// command, reply, channel), and glibc's malloc/free were a fifth of the caller's instructions
/// (docs/decisions/0005-allocator.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// rediskit — sessions, cache and rate limiting over Redis, as a service.
///
/// Without a subcommand it serves the HTTP API (`serve`). Configuration comes from the
/// environment: REDIS_URL (or REDIS_HOST/PORT/DB with ENVIRONMENT=production, or
/// DEV_REDIS_HOST/PORT/DB in development), JWT_SECRET, LISTEN_ADDR and the others in the README's
/// configuration table. In development with no REDIS_URL and nothing at localhost:6379, the
/// service runs on the embedded memory:// backend and says so.
#[derive(Debug, Parser)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API until SIGINT/SIGTERM (the default).
    Serve {
        /// Address to listen on; overrides LISTEN_ADDR (default 127.0.0.1:8080).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// Check that Redis answers: prints the /health/redis JSON on stdout; exit code 0 when
    /// healthy, 1 when not. Usable as a container health check.
    Health,
    /// Inspect or end a user's sessions.
    #[command(subcommand)]
    Sessions(SessionsCommand),
    /// Read, delete or list the service's cache entries (namespace `api` by default).
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Measure rediskit's throughput and latency against the Redis at --url.
    ///
    /// Runs each workload (cache, sessions, rate limit, and the bare client as the baseline)
    /// over many tasks and prints ops/s, p50 and p99. Writes only under a key prefix of its own
    /// and deletes it afterwards (SCAN + DEL), so a shared server is safe. See docs/benchmarks.md.
    Bench(rediskit_server::bench::BenchArgs),
}

#[derive(Debug, Subcommand)]
enum SessionsCommand {
    /// List the live sessions of USERNAME as JSON lines.
    List {
        /// The user name (as registered; case-insensitive).
        username: String,
    },
    /// End one session (--session ID) or all sessions (--all) of USERNAME.
    Revoke {
        /// The user name.
        username: String,
        /// The session id to end (from `sessions list`).
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        session: Option<String>,
        /// End every session of the user.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Args)]
struct Namespace {
    /// Cache namespace.
    #[arg(long, default_value = CACHE_NAMESPACE)]
    namespace: String,
}

#[derive(Debug, Subcommand)]
enum CacheCommand {
    /// Print the JSON value under KEY (exit code 1 when missing).
    Get {
        /// The cache key (without prefix or namespace).
        key: String,
        #[command(flatten)]
        namespace: Namespace,
    },
    /// Delete KEY (exit code 1 when it did not exist).
    Del {
        /// The cache key.
        key: String,
        #[command(flatten)]
        namespace: Namespace,
    },
    /// List the keys starting with PREFIX (all when omitted), one per line, using SCAN.
    Scan {
        /// Literal prefix; `*` and `?` match only themselves.
        #[arg(default_value = "")]
        prefix: String,
        #[command(flatten)]
        namespace: Namespace,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    rediskit_server::telemetry::init_logs();
    // The benchmark takes its own --url: the service's configuration must not stop it.
    if let Some(Command::Bench(args)) = cli.command {
        return match rediskit_server::bench::run(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => fail(err),
        };
    }
    let mut config = match ServiceConfig::from_env() {
        Ok(config) => config,
        Err(err) => return fail(err),
    };
    match cli.command.unwrap_or(Command::Serve { listen: None }) {
        Command::Serve { listen } => {
            if let Some(listen) = listen {
                match listen.parse() {
                    Ok(addr) => config.listen = addr,
                    Err(_) => {
                        return fail(format!(
                            "--listen: `{listen}` is not an address like 127.0.0.1:8080"
                        ));
                    }
                }
            }
            match rediskit_server::serve(config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => fail(err),
            }
        }
        Command::Health => health(config).await,
        Command::Sessions(command) => match operator_client(&config) {
            Ok(client) => sessions(&client, &config, command).await,
            Err(err) => fail(err),
        },
        Command::Cache(command) => match operator_client(&config) {
            Ok(client) => cache(&client, command).await,
            Err(err) => fail(err),
        },
        Command::Bench(_) => unreachable!("`bench` returned above, before the configuration"),
    }
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("rediskit: {message}");
    ExitCode::from(2)
}

/// Operator commands talk to the configured Redis only; the memory fallback would show an empty,
/// private store and mislead.
fn operator_client(config: &ServiceConfig) -> Result<Client, String> {
    if config.redis.url == "memory://" {
        return Err("operator commands need a real Redis; REDIS_URL is memory://".into());
    }
    Client::connect_lazy(config.redis.clone()).map_err(|err| err.to_string())
}

async fn health(config: ServiceConfig) -> ExitCode {
    let client = match Client::connect_lazy(config.redis) {
        Ok(client) => client,
        Err(err) => return fail(err),
    };
    let report = RedisHealth::measure(&client).await;
    println!(
        "{}",
        serde_json::to_string(&report).unwrap_or_else(|_| "{}".into())
    );
    client.close().await;
    if report.redis_connected {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

async fn sessions(client: &Client, config: &ServiceConfig, command: SessionsCommand) -> ExitCode {
    let users = Users::new(client);
    let username = match &command {
        SessionsCommand::List { username } | SessionsCommand::Revoke { username, .. } => {
            username.clone()
        }
    };
    let user = match users.find(&username).await {
        Ok(Some(user)) => user,
        Ok(None) => {
            eprintln!("rediskit: no user named `{username}`");
            return ExitCode::FAILURE;
        }
        Err(err) => return fail(err),
    };
    let store = match Sessions::new(client, config.jwt_secret.expose()) {
        Ok(store) => store,
        Err(err) => return fail(err),
    };
    match command {
        SessionsCommand::List { .. } => match store.sessions(&user.id).await {
            Ok(sessions) => {
                for s in sessions {
                    let line = serde_json::json!({
                        "session_id": s.session_id,
                        "device": s.device,
                        "created_at": humantime::format_rfc3339_seconds(s.created_at).to_string(),
                        "last_used_at": humantime::format_rfc3339_seconds(s.last_used_at).to_string(),
                        "expires_at": humantime::format_rfc3339_seconds(s.expires_at).to_string(),
                    });
                    println!("{line}");
                }
                ExitCode::SUCCESS
            }
            Err(err) => fail(err),
        },
        SessionsCommand::Revoke {
            session: Some(id), ..
        } => match store.revoke(&user.id, &id).await {
            Ok(true) => {
                println!("{{\"revoked\":1}}");
                ExitCode::SUCCESS
            }
            Ok(false) => {
                eprintln!("rediskit: `{username}` has no live session `{id}`");
                ExitCode::FAILURE
            }
            Err(err) => fail(err),
        },
        SessionsCommand::Revoke { .. } => match store.revoke_all(&user.id).await {
            Ok(count) => {
                println!("{{\"revoked\":{count}}}");
                ExitCode::SUCCESS
            }
            Err(err) => fail(err),
        },
    }
}

async fn cache(client: &Client, command: CacheCommand) -> ExitCode {
    let namespace = match &command {
        CacheCommand::Get { namespace, .. }
        | CacheCommand::Del { namespace, .. }
        | CacheCommand::Scan { namespace, .. } => &namespace.namespace,
    };
    let cache = match Cache::builder(client).namespace(namespace).build() {
        Ok(cache) => cache,
        Err(err) => return fail(err),
    };
    match command {
        CacheCommand::Get { key, .. } => match cache.try_get::<serde_json::Value>(&key).await {
            Ok(Some(value)) => {
                println!("{value}");
                ExitCode::SUCCESS
            }
            Ok(None) => {
                eprintln!("rediskit: no value under `{key}`");
                ExitCode::FAILURE
            }
            Err(err) => fail(err),
        },
        CacheCommand::Del { key, .. } => match cache.delete(&key).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => {
                eprintln!("rediskit: no value under `{key}`");
                ExitCode::FAILURE
            }
            Err(err) => fail(err),
        },
        CacheCommand::Scan { prefix, .. } => {
            let mut keys = std::pin::pin!(cache.keys(&prefix));
            while let Some(key) = keys.next().await {
                match key {
                    Ok(key) => println!("{key}"),
                    Err(err) => return fail(err),
                }
            }
            ExitCode::SUCCESS
        }
    }
}
