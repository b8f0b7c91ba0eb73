//! The service under each Redis fault, black box, with a fault proxy between it and Redis:
//! black hole, replies slower than the command deadline, out of memory, read-only replica.
//!
//! Auth fails closed (503 problem documents with `Retry-After`, never a 500, never a 200 for a
//! session nobody could check), the cached computation keeps answering, `/health/redis` tells
//! what it can see, and the same service process recovers by itself when the fault ends — the
//! time from the end of the fault to the first successful login is printed (`[recovery] ...`,
//! visible with `cargo test -p rediskit-server --test http_fault_matrix -- --nocapture`).
//! Kill-and-restart is covered in `http_faults.rs`.

#![allow(clippy::unwrap_used)]

mod support;

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use rediskit_testkit::RedisServer;
use rediskit_testkit::proxy::FaultProxy;
use support::{PASSWORD, Reply, Service, TokenPair, assert_unavailable};

const USER: &str = "alice";
/// The service's Redis command deadline in these tests, in milliseconds.
const COMMAND_TIMEOUT_MS: u64 = 300;
/// Longest any request may take while Redis misbehaves: a few command deadlines plus password
/// hashing. A bound on hanging, not a speed target.
const REQUEST_BOUND: Duration = Duration::from_secs(3);
/// How long the service may take to work again once a fault ends.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);

/// The service on `proxy`, with a user who has a live session.
async fn arrange(proxy: &FaultProxy) -> (Service, TokenPair) {
    let timeout = COMMAND_TIMEOUT_MS.to_string();
    let service = Service::builder()
        .env("REDIS_URL", proxy.url())
        .env("REDIS_COMMAND_TIMEOUT_MS", &timeout)
        .env("REDIS_CONNECT_TIMEOUT_MS", &timeout)
        .start()
        .await;
    service.register(USER, PASSWORD).await;
    let pair = service.login(USER, PASSWORD).await;
    service.me(&pair.access_token).await.assert_status(200);
    (service, pair)
}

/// Sends one request, asserting it is answered within [`REQUEST_BOUND`] and is not a 500.
async fn timed(what: &str, request: impl Future<Output = Reply>) -> Reply {
    let started = Instant::now();
    let reply = request.await;
    let took = started.elapsed();
    assert!(
        took < REQUEST_BOUND,
        "{what} took {took:?} (answered {} {})",
        reply.status,
        reply.text
    );
    assert!(
        !reply.status.is_server_error() || reply.status == 503,
        "{what}: {} {}",
        reply.status,
        reply.text
    );
    reply
}

/// Redis does not answer in time: login, refresh, register and `/me` answer 503 with
/// `Retry-After`; the cached computation answers 200; `/health/redis` answers 503.
async fn assert_unreachable(service: &Service, pair: &TokenPair) {
    assert_unavailable(&timed("login", service.try_login(USER, PASSWORD)).await);
    assert_unavailable(&timed("refresh", service.refresh(&pair.refresh_token)).await);
    assert_unavailable(&timed("/me", service.me(&pair.access_token)).await);
    assert_unavailable(&timed("register", service.try_register("bob", PASSWORD)).await);
    let metrics = timed("metrics", service.get("/api/business-metrics/7d")).await;
    metrics.assert_status(200).json();
    let health = timed("/health/redis", service.get("/health/redis")).await;
    let body = support::assert_redis_health(&health, 503, "redis");
    assert_eq!(body["redis_connected"], false, "{body}");
}

/// Redis answers but refuses writes (`OOM`, `READONLY`). `/me` answers 200 before any write was
/// tried: the session can still be read and checked. A login (of a user with or without
/// sessions), a refresh and a registration answer 503 with `Retry-After`: nothing is stored past
/// `maxmemory` or on a replica. The cached computation answers 200, and
/// `/health/redis` 200 because `PING` is answered. Returns the answer of `/me` asked after the
/// refused writes, for the caller to check once the fault is over.
async fn assert_refuses_writes(service: &Service, pair: &TokenPair, fresh_user: &str) -> Reply {
    let me = timed("/me", service.me(&pair.access_token)).await;
    me.assert_status(200);
    assert_eq!(me.json()["session_id"], pair.session_id.as_str());

    assert_unavailable(&timed("login", service.try_login(fresh_user, PASSWORD)).await);
    assert_unavailable(&timed("login", service.try_login(USER, PASSWORD)).await);
    assert_unavailable(&timed("refresh", service.refresh(&pair.refresh_token)).await);
    assert_unavailable(&timed("register", service.try_register("bob", PASSWORD)).await);

    let metrics = timed("metrics", service.get("/api/business-metrics/7d")).await;
    metrics.assert_status(200).json();
    let health = timed("/health/redis", service.get("/health/redis")).await;
    let body = support::assert_redis_health(&health, 200, "redis");
    assert_eq!(body["redis_connected"], true, "{body}");
    eprintln!(
        "[refused writes] /health/redis breaker: {}",
        body["breaker"]
    );
    timed("/me", service.me(&pair.access_token)).await
}

/// After refused writes, `/me` still answered 200: refused writes from a server that answers
/// do not take the session checks down with them.
#[track_caller]
fn assert_reads_survived(me: &Reply) {
    assert_eq!(
        me.status.as_u16(),
        200,
        "/me after a few writes refused by a live Redis: {} {}",
        me.status,
        me.text
    );
}

/// Polls login until it succeeds, timing from `since` (the end of the fault), prints the time,
/// then checks health, `/me` and refresh on the fresh pair.
async fn assert_recovers(service: &Service, what: &str, since: Instant) -> TokenPair {
    let mut attempts = 0;
    let pair = loop {
        attempts += 1;
        let reply = service.try_login(USER, PASSWORD).await;
        if reply.status == 200 {
            break TokenPair::from_reply(&reply);
        }
        assert_unavailable(&reply);
        assert!(
            since.elapsed() < RECOVERY_BOUND,
            "{what}: login still 503 {:?} after the fault ended",
            since.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = since.elapsed();
    eprintln!(
        "[recovery] service, {what}: first login {took:?} after the fault ended ({attempts} tries)"
    );
    let health = service.get("/health/redis").await;
    support::assert_redis_health(&health, 200, "redis");
    service.me(&pair.access_token).await.assert_status(200);
    TokenPair::from_reply(&service.refresh(&pair.refresh_token).await)
}

/// The value of an unlabelled series in `/metrics`.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// A raw RESP connection to a test server, for arranging faults (these tests have no Redis
/// client of their own).
struct Admin {
    connection: BufReader<TcpStream>,
}

impl Admin {
    fn new(server: &RedisServer) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", server.port())).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        Self {
            connection: BufReader::new(stream),
        }
    }

    /// Sends one command: the reply as text, or the server's error line.
    fn command(&mut self, args: &[&str]) -> Result<String, String> {
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        self.connection
            .get_mut()
            .write_all(request.as_bytes())
            .unwrap();
        let mut line = String::new();
        self.connection.read_line(&mut line).unwrap();
        let line = line.trim_end();
        match line.split_at(1) {
            ("+" | ":", rest) => Ok(rest.to_owned()),
            ("-", rest) => Err(rest.to_owned()),
            ("$", "-1") => Ok(String::new()),
            ("$", len) => {
                let len: usize = len.parse().unwrap();
                let mut body = vec![0; len + 2];
                self.connection.read_exact(&mut body).unwrap();
                body.truncate(len);
                Ok(String::from_utf8(body).unwrap())
            }
            _ => panic!("unexpected reply {line:?}"),
        }
    }

    fn ok(&mut self, args: &[&str]) -> String {
        self.command(args)
            .unwrap_or_else(|err| panic!("{args:?}: {err}"))
    }

    /// Waits until this server, a replica, has synchronised with its master.
    async fn wait_for_link(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let info = self.ok(&["INFO", "replication"]);
            if info.contains("master_link_status:up") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "replication never came up: {info}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A black hole between the service and Redis: auth fails closed, the breaker trips (and
/// `/metrics` says so), and after the partition heals the same process recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole() {
    // Arrange
    let redis = RedisServer::start();
    let proxy = FaultProxy::for_server(&redis);
    let (service, pair) = arrange(&proxy).await;

    // Act
    proxy.black_hole();

    // Assert
    assert_unreachable(&service, &pair).await;
    let metrics = service.get("/metrics").await;
    metrics.assert_status(200);
    assert!(
        metric(&metrics.text, "redis_breaker_trips_total") >= 1.0,
        "{}",
        metrics.text
    );
    assert!(metric(&metrics.text, "redis_command_timeouts_total") >= 1.0);
    let health = service.get("/health/redis").await.json();
    eprintln!("[black hole] /health/redis breaker: {}", health["breaker"]);

    proxy.pass();
    assert_recovers(&service, "black hole healed", Instant::now()).await;
}

/// Redis replies slower (500 ms) than the service's 300 ms deadline: the same as unreachable,
/// within bounded time; recovery once it is fast again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slower_than_the_deadline() {
    // Arrange
    let redis = RedisServer::start();
    let proxy = FaultProxy::for_server(&redis);
    let (service, pair) = arrange(&proxy).await;

    // Act
    proxy.latency(Duration::from_millis(500));

    // Assert
    assert_unreachable(&service, &pair).await;

    proxy.pass();
    assert_recovers(&service, "slow replies ended", Instant::now()).await;
}

/// Redis out of memory (`maxmemory`, `noeviction`): what needs a write answers 503, what only
/// reads keeps working, and a refresh refused by Redis did not use up the refresh token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory() {
    // Arrange
    let redis =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let proxy = FaultProxy::for_server(&redis);
    let (service, pair) = arrange(&proxy).await;
    service.register("carol", PASSWORD).await;
    let mut admin = Admin::new(&redis);

    // Act: fill until writes are refused, then hold the limit a little under the usage reached
    // so the server's own buffer churn can't let a write slip through.
    let filler = "x".repeat(8 * 1024);
    let refused = (0..100_000).find_map(|i| {
        admin
            .command(&["SET", &format!("filler:{i}"), &filler])
            .err()
    });
    let refused = refused.expect("maxmemory never reached");
    assert!(refused.starts_with("OOM"), "{refused}");
    let info = admin.ok(&["INFO", "memory"]);
    let used: u64 = info
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    admin.ok(&[
        "CONFIG",
        "SET",
        "maxmemory",
        &(used - 256 * 1024).to_string(),
    ]);

    // Assert
    let me = assert_refuses_writes(&service, &pair, "carol").await;

    // The operator raises the limit.
    admin.ok(&["CONFIG", "SET", "maxmemory", "0"]);
    assert_recovers(&service, "OOM ended", Instant::now()).await;
    let refreshed = service.refresh(&pair.refresh_token).await;
    TokenPair::from_reply(&refreshed);
    assert_reads_survived(&me);
}

/// The Redis the service talks to is demoted to a read-only replica (a fail-over it did not
/// follow): writes answer 503, reads keep working, a refused refresh used nothing up; after
/// `REPLICAOF NO ONE` the same process recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_replica() {
    // Arrange
    let replication = ["--repl-diskless-sync-delay", "0"];
    let primary = RedisServer::start_with(&replication);
    let other = RedisServer::start_with(&replication);
    let proxy = FaultProxy::for_server(&primary);
    let (service, pair) = arrange(&proxy).await;
    service.register("carol", PASSWORD).await;
    let (mut primary_admin, mut other_admin) = (Admin::new(&primary), Admin::new(&other));

    // Act: `other` copies `primary` and is promoted; `primary` becomes its replica, data intact.
    let (primary_port, other_port) = (primary.port().to_string(), other.port().to_string());
    other_admin.ok(&["REPLICAOF", "127.0.0.1", &primary_port]);
    other_admin.wait_for_link().await;
    other_admin.ok(&["REPLICAOF", "NO", "ONE"]);
    primary_admin.ok(&["REPLICAOF", "127.0.0.1", &other_port]);
    primary_admin.wait_for_link().await;

    // Assert
    let me = assert_refuses_writes(&service, &pair, "carol").await;

    primary_admin.ok(&["REPLICAOF", "NO", "ONE"]);
    assert_recovers(&service, "READONLY ended", Instant::now()).await;
    let refreshed = service.refresh(&pair.refresh_token).await;
    TokenPair::from_reply(&refreshed);
    assert_reads_survived(&me);
}
