//! The operator CLI, run as a process against a real redis-server.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use rediskit_testkit::RedisServer;

const SECRET: &str = "cli-test-secret-0123456789abcdef0123";

fn rediskit(redis_url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rediskit"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("REDIS_URL", redis_url)
        .env("JWT_SECRET", SECRET)
        .env("REDIS_CONNECT_TIMEOUT_MS", "300")
        .env("REDIS_COMMAND_TIMEOUT_MS", "300")
        .env("RUST_LOG", "error")
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `rediskit health` prints the health JSON and exits 0 when Redis answers, 1 when it does not.
#[test]
fn health_exit_codes() {
    let server = RedisServer::start();
    let output = rediskit(&server.url(), &["health"]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(report["status"], "healthy");
    assert_eq!(report["backend"], "redis");

    let dead = format!("redis://127.0.0.1:{}/0", rediskit_testkit::free_port());
    let output = rediskit(&dead, &["health"]);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let report: serde_json::Value = serde_json::from_str(&stdout(&output)).unwrap();
    assert_eq!(report["redis_connected"], false);
}

/// A bad variable stops the binary with a message naming it and exit code 2.
#[test]
fn bad_configuration_names_the_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_rediskit"))
        .arg("health")
        .env_clear()
        .env("REDIS_MAX_CONNECTIONS", "zero")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("REDIS_MAX_CONNECTIONS"));
}

/// `sessions list` and `sessions revoke` act on the sessions the service created, by user name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_list_and_revoke() {
    let server = RedisServer::start();
    let url = server.url();
    // Create an account and two sessions the way the service does.
    let config = rediskit::Config::builder().url(&url).build().unwrap();
    let client = rediskit::Client::connect(config).await.unwrap();
    let users = rediskit_server::Users::new(&client);
    let user_id = users.register("alice", "correct horse").await.unwrap();
    let sessions = rediskit::Sessions::new(&client, SECRET).unwrap();
    let first = sessions
        .create(&user_id, "laptop", None, None)
        .await
        .unwrap();
    sessions
        .create(&user_id, "phone", None, None)
        .await
        .unwrap();

    let url2 = url.clone();
    let listed =
        tokio::task::spawn_blocking(move || rediskit(&url2, &["sessions", "list", "ALICE"]))
            .await
            .unwrap();
    assert!(listed.status.success(), "{listed:?}");
    let lines: Vec<serde_json::Value> = stdout(&listed)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut devices: Vec<&str> = lines
        .iter()
        .map(|l| l["device"].as_str().unwrap())
        .collect();
    devices.sort();
    assert_eq!(devices, vec!["laptop", "phone"]);

    let id = first.session.session_id.clone();
    let url2 = url.clone();
    let revoked = tokio::task::spawn_blocking(move || {
        rediskit(&url2, &["sessions", "revoke", "alice", "--session", &id])
    })
    .await
    .unwrap();
    assert!(revoked.status.success(), "{revoked:?}");
    assert!(sessions.lookup(first.token.expose()).await.is_err());

    let url2 = url.clone();
    let all = tokio::task::spawn_blocking(move || {
        rediskit(&url2, &["sessions", "revoke", "alice", "--all"])
    })
    .await
    .unwrap();
    assert_eq!(stdout(&all).trim(), r#"{"revoked":1}"#);

    let url2 = url.clone();
    let unknown =
        tokio::task::spawn_blocking(move || rediskit(&url2, &["sessions", "list", "nobody"]))
            .await
            .unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    let url2 = url.clone();
    let neither =
        tokio::task::spawn_blocking(move || rediskit(&url2, &["sessions", "revoke", "alice"]))
            .await
            .unwrap();
    assert_eq!(
        neither.status.code(),
        Some(2),
        "clap requires --session or --all"
    );
}

/// `cache get`, `cache scan` and `cache del` work on the service's cache namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_get_scan_del() {
    let server = RedisServer::start();
    let url = server.url();
    let config = rediskit::Config::builder().url(&url).build().unwrap();
    let client = rediskit::Client::connect(config).await.unwrap();
    let cache = rediskit::Cache::builder(&client)
        .namespace("api")
        .build()
        .unwrap();
    cache
        .set("business_metrics:7d", &serde_json::json!({"revenue": 1}))
        .await
        .unwrap();
    cache
        .set("business_metrics:30d", &serde_json::json!({"revenue": 2}))
        .await
        .unwrap();
    cache.set("other", &1).await.unwrap();

    let run = |args: Vec<&'static str>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || rediskit(&url, &args))
    };
    let got = run(vec!["cache", "get", "business_metrics:7d"])
        .await
        .unwrap();
    assert_eq!(stdout(&got).trim(), r#"{"revenue":1}"#);
    let scanned = run(vec!["cache", "scan", "business_metrics:"])
        .await
        .unwrap();
    let mut keys: Vec<String> = stdout(&scanned).lines().map(str::to_owned).collect();
    keys.sort();
    assert_eq!(keys, vec!["business_metrics:30d", "business_metrics:7d"]);
    let deleted = run(vec!["cache", "del", "business_metrics:7d"])
        .await
        .unwrap();
    assert!(deleted.status.success());
    let missing = run(vec!["cache", "get", "business_metrics:7d"])
        .await
        .unwrap();
    assert_eq!(missing.status.code(), Some(1));
}

/// `--help` explains the commands.
#[test]
fn help_is_useful() {
    let output = Command::new(env!("CARGO_BIN_EXE_rediskit"))
        .arg("--help")
        .output()
        .unwrap();
    let text = stdout(&output);
    for word in [
        "serve",
        "health",
        "sessions",
        "cache",
        "REDIS_URL",
        "JWT_SECRET",
    ] {
        assert!(text.contains(word), "--help lacks {word}: {text}");
    }
}
