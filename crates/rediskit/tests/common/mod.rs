//! Backends for the shared suites: a real redis-server per test, or the embedded store.

#![allow(dead_code)]

use std::time::Duration;

use rediskit::{Client, Config};
use rediskit_testkit::RedisServer;

/// A client and whatever keeps its backend alive.
pub struct Backend {
    pub client: Client,
    pub server: Option<RedisServer>,
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
        }
    }

    /// A fresh embedded store.
    pub async fn memory() -> Self {
        let client = Client::connect(config("memory://")).await.expect("connect");
        Self {
            client,
            server: None,
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
