//! Backends for the shared suites: a real redis-server per test, or the embedded store.

#![allow(dead_code)]

use std::time::Duration;

use rediskit::{Client, Config};
use rediskit_testkit::RedisServer;
use rediskit_testkit::cluster::RedisCluster;

/// A client and whatever keeps its backend alive.
pub struct Backend {
    pub client: Client,
    pub server: Option<RedisServer>,
    pub cluster: Option<RedisCluster>,
}

impl Backend {
    /// A fresh redis-server of its own.
    pub async fn redis() -> Self {
        let server = RedisServer::start();
        let client = Client::connect(config(&server.url()))
            .await
            .expect("connect");
        Self {
            client,
            server: Some(server),
            cluster: None,
        }
    }

    /// A fresh Redis Cluster of its own (3 primaries, 3 replicas), reached through its seeds.
    pub async fn cluster() -> Self {
        // A long node timeout: a loaded CI machine must not fail over in the middle of a case.
        let cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with(5000))
            .await
            .expect("start the cluster");
        let mut config = config("redis://127.0.0.1:1/0");
        config.cluster_nodes = cluster.seeds();
        let client = Client::connect(config)
            .await
            .expect("connect to the cluster");
        Self {
            client,
            server: None,
            cluster: Some(cluster),
        }
    }

    /// A fresh embedded store.
    pub async fn memory() -> Self {
        let client = Client::connect(config("memory://")).await.expect("connect");
        Self {
            client,
            server: None,
            cluster: None,
        }
    }
}

/// Test configuration: short deadlines so failures show quickly, few connections.
pub fn config(url: &str) -> Config {
    Config::builder()
        .url(url)
        .max_connections(4)
        .command_timeout(Duration::from_millis(500))
        .connect_timeout(Duration::from_millis(500))
        .build()
        .expect("valid test config")
}

/// Runs each named case (an `async fn(&Client)` in the calling file) against a fresh
/// redis-server, a fresh Redis Cluster and a fresh `memory://` store.
#[allow(unused_macros)]
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod redis_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = crate::common::Backend::redis().await;
                    super::$case(&backend.client).await;
                }
            )*
        }
        mod cluster_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = crate::common::Backend::cluster().await;
                    super::$case(&backend.client).await;
                }
            )*
        }
        mod memory_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = crate::common::Backend::memory().await;
                    super::$case(&backend.client).await;
                }
            )*
        }
    };
}

/// One command on `server`'s admin connection (outside any client under test); panics on error.
pub fn admin_cmd<T: redis::FromRedisValue>(server: &RedisServer, args: &[&str]) -> T {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query(&mut server.admin()).unwrap()
}

/// How many `EVALSHA`s the server ran since its stats were reset.
pub fn evalsha_calls(server: &RedisServer) -> u64 {
    command_calls(server, "evalsha")
}

/// How many times the server ran `command` (lower-case; scripts' calls count too) since its
/// stats were reset.
pub fn command_calls(server: &RedisServer, command: &str) -> u64 {
    let info: String = admin_cmd(server, &["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    info.lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().unwrap())
}
