//! Fault injection: what the library does when Redis is black-holed, slow, cut off, paused, out
//! of memory, read-only or has forgotten its scripts — and how fast the same `Client` recovers by
//! itself once the fault ends.
//!
//! Every test prints its measured recovery (`[recovery] ...`); see them with
//! `cargo test -p rediskit --test faults -- --nocapture`. The bounds asserted are bounds on
//! hanging, not speed targets. Kill-and-restart is covered in `tests/redis.rs`.
//!
//! `default_pool_recovers_from_a_restart_in_bounded_time` and `refused_writes_leave_reads_working`
//! found two breaker bugs, fixed since (`docs/reliability.md`, "Problems these tests found").

#![allow(clippy::unwrap_used)]

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use rediskit::{
    BreakerState, Cache, Client, Config, ErrorKind, Quota, RateLimiter, Result, Sessions, ttl,
};
use rediskit_testkit::RedisServer;
use rediskit_testkit::proxy::FaultProxy;

const SECRET: &str = "0123456789abcdef0123456789abcdef-fault-secret";
const USER: &str = "alice";
/// The default command deadline.
const DEFAULT_DEADLINE: Duration = rediskit::defaults::DEFAULT_COMMAND_TIMEOUT;
/// Slack over a call's deadline before it counts as hanging.
const SLACK: Duration = Duration::from_secs(1);
/// How long the same client may take to work again once a fault ends.
const RECOVERY_BOUND: Duration = Duration::from_secs(10);
/// How long [`recovery`] keeps measuring before it declares that nothing recovers.
const GIVE_UP: Duration = Duration::from_secs(60);
/// The breaker of these tests: opens after 3 unavailable calls in a row, probes after 500 ms.
const BREAKER_THRESHOLD: u32 = 3;
const BREAKER_COOLDOWN: Duration = Duration::from_millis(500);

fn config(url: &str, deadline: Duration) -> Config {
    Config::builder()
        .url(url)
        .max_connections(2)
        .command_timeout(deadline)
        .connect_timeout(Duration::from_millis(500))
        .breaker(BREAKER_THRESHOLD, BREAKER_COOLDOWN)
        .build()
        .unwrap()
}

/// Awaits `call`, asserting it returns within `limit` plus [`SLACK`].
async fn bounded<T>(limit: Duration, what: &str, call: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let Ok(out) = tokio::time::timeout(limit + SLACK * 5, call).await else {
        panic!(
            "{what} hung: no answer {:?} after a {limit:?} deadline",
            limit + SLACK * 5
        );
    };
    let took = started.elapsed();
    assert!(
        took < limit + SLACK,
        "{what} took {took:?}, past its {limit:?} deadline + {SLACK:?}"
    );
    out
}

/// The call failed, and as unavailable: never a success, never "not found".
#[track_caller]
fn expect_unavailable<T: Debug>(what: &str, result: Result<T>) -> rediskit::Error {
    match result {
        Ok(value) => panic!("{what} succeeded while Redis could not serve it: {value:?}"),
        Err(err) => {
            assert!(err.is_unavailable(), "{what}: {err} ({:?})", err.kind());
            err
        }
    }
}

/// Calls `probe` until it succeeds, timing from `since` (the end of the fault); prints the time
/// and asserts it is under [`RECOVERY_BOUND`]. Keeps polling up to [`GIVE_UP`], so that a slow
/// recovery is measured, not just reported late.
async fn recovery<T, F, Fut>(what: &str, since: Instant, mut probe: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempts = 0;
    loop {
        attempts += 1;
        match probe().await {
            Ok(_) => break,
            Err(err) => {
                assert!(
                    err.is_unavailable(),
                    "{what}: only unavailability while recovering: {err}"
                );
                assert!(
                    since.elapsed() < GIVE_UP,
                    "{what}: no recovery {:?} after the fault ended: {err}",
                    since.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    let took = since.elapsed();
    eprintln!("[recovery] {what}: first success {took:?} after the fault ended ({attempts} calls)");
    assert!(
        took < RECOVERY_BOUND,
        "{what}: the first success came {took:?} after the fault ended, over {RECOVERY_BOUND:?}"
    );
    took
}

/// A client with everything built on it, a cached value and a live session to test with.
struct Fixture {
    client: Client,
    cache: Cache,
    store: Sessions,
    limiter: RateLimiter,
    token: String,
    session_id: String,
    deadline: Duration,
}

impl Fixture {
    async fn new(url: &str, deadline: Duration) -> Self {
        let client = Client::connect(config(url, deadline)).await.unwrap();
        // As the service does at start: the first call of a script then needs no extra round
        // trip (EVALSHA answered NOSCRIPT, then SCRIPT LOAD and EVALSHA) under one deadline.
        client.load_scripts().await.unwrap();
        let cache = Cache::new(&client);
        let store = Sessions::new(&client, SECRET).unwrap();
        let limiter = RateLimiter::new(&client, "faults", Quota::per_second(1000)).unwrap();
        cache.set("present", &1).await.unwrap();
        let issued = store.create(USER, "phone", None, None).await.unwrap();
        assert!(!limiter.check("caller").await.unwrap().degraded);
        Self {
            token: issued.token.expose().to_owned(),
            session_id: issued.session.session_id.clone(),
            client,
            cache,
            store,
            limiter,
            deadline,
        }
    }

    /// Redis does not answer (black-holed, too slow, paused): every call returns within its
    /// deadline; cache reads are misses and `get_or_set` computes; every session operation is an
    /// unavailable error; the limiter's policy decides; health says so.
    async fn assert_unreachable(&self) {
        let d = self.deadline;
        let computed = self.cache.stats().computations;
        let hit = bounded(d, "cache get", self.cache.get::<i32>("present")).await;
        assert_eq!(hit.unwrap(), None, "an unreachable cache is a miss");
        expect_unavailable(
            "cache try_get",
            bounded(d, "cache try_get", self.cache.try_get::<i32>("present")).await,
        );
        // get_or_set is up to three commands: read, read again as leader, write.
        let value = bounded(
            d * 3,
            "get_or_set",
            self.cache.get_or_set("cold", ttl::SHORT, || async { 42 }),
        )
        .await;
        assert_eq!(value.unwrap(), 42);
        assert_eq!(self.cache.stats().computations, computed + 1);
        expect_unavailable(
            "cache set",
            bounded(d, "cache set", self.cache.set("k", &1)).await,
        );
        self.assert_sessions_fail_closed().await;
        let decision = bounded(d, "rate limit", self.limiter.check("caller")).await;
        let decision = decision.unwrap();
        assert!(decision.degraded && decision.allowed, "{decision:?}");
        let health = bounded(d, "health", self.client.health()).await;
        assert!(!health.ok, "{health:?}");
    }

    /// Every session operation is unavailable: never `NotFound`, never a session, never a token.
    async fn assert_sessions_fail_closed(&self) {
        let (d, store) = (self.deadline, &self.store);
        let create = store.create(USER, "laptop", None, None);
        expect_unavailable("create", bounded(d, "create", create).await);
        let lookup = store.lookup(&self.token);
        expect_unavailable("lookup", bounded(d, "lookup", lookup).await);
        let check = store.session(USER, &self.session_id);
        expect_unavailable("session check", bounded(d, "session check", check).await);
        let rotate = store.rotate(&self.token, None);
        expect_unavailable("rotate", bounded(d, "rotate", rotate).await);
        let list = store.sessions(USER);
        expect_unavailable("list", bounded(d, "list", list).await);
    }

    /// Redis answers but refuses writes (`OOM`, `READONLY`): reads still work; every write is an
    /// `Unavailable` error carrying the server's reason; a refused write changed nothing.
    async fn assert_refuses_writes(&self, code: &str) {
        let d = self.deadline;
        // The session of `add_ending_session` has ended (listing is a read).
        let ended_by = Instant::now() + Duration::from_secs(5);
        while self.store.sessions(USER).await.unwrap().len() > 1 {
            assert!(Instant::now() < ended_by, "the short session never ended");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let hit = bounded(d, "cache get", self.cache.get::<i32>("present")).await;
        assert_eq!(hit.unwrap(), Some(1), "reads still work");
        let err = expect_unavailable(
            "cache set",
            bounded(d, "cache set", self.cache.set("k", &1)).await,
        );
        assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");
        assert!(has_code(&err, code), "{err}");
        let value = bounded(
            d * 3,
            "get_or_set",
            self.cache.get_or_set("cold", ttl::SHORT, || async { 42 }),
        )
        .await;
        assert_eq!(value.unwrap(), 42);
        assert_eq!(self.cache.try_get::<i32>("cold").await.unwrap(), None);

        let store = &self.store;
        // A user without sessions: the script's first write is refused, so nothing is written.
        let create = bounded(d, "create", store.create("bob", "laptop", None, None)).await;
        let err = expect_unavailable("create", create);
        assert!(has_code(&err, code), "{err}");
        assert!(
            store.sessions("bob").await.unwrap().is_empty(),
            "nothing half-created"
        );
        let rotate = bounded(d, "rotate", store.rotate(&self.token, None)).await;
        expect_unavailable("rotate", rotate);
        // The refused rotation changed nothing: the presented token is still the live one.
        let session = bounded(d, "lookup", store.lookup(&self.token))
            .await
            .unwrap();
        assert_eq!(session.session_id, self.session_id);
        let check = bounded(d, "session check", store.session(USER, &self.session_id)).await;
        assert!(check.unwrap().is_some());
        assert_eq!(store.sessions(USER).await.unwrap().len(), 1);
        // A user with sessions, one of them ended: refused too. The new record is the script's
        // first write, so Redis refuses the script before it swept anything (had the sweep's
        // deletion come first, Redis would have let the script finish past `maxmemory`).
        let create = bounded(d, "create", store.create(USER, "laptop", None, None)).await;
        let err = expect_unavailable("create", create);
        assert!(has_code(&err, code), "{err}");
        assert_eq!(store.sessions(USER).await.unwrap().len(), 1);

        let decision = bounded(d, "rate limit", self.limiter.check("caller")).await;
        let decision = decision.unwrap();
        assert!(decision.degraded && decision.allowed, "{decision:?}");
        // PING is not a write: health reports the server as up.
        let health = bounded(d, "health", self.client.health()).await;
        assert!(health.ok, "{health:?}");
    }

    /// Gives the user a second session, ending within a second: by the time writes are refused
    /// it is an ended session that creating one more would sweep.
    async fn add_ending_session(&self) {
        let short = Some(Duration::from_secs(1));
        self.store.create(USER, "short", short, None).await.unwrap();
    }

    /// Everything works again on the same handle, breaker closed.
    async fn assert_works(&self) {
        self.cache.set("after", &2).await.unwrap();
        assert_eq!(self.cache.get::<i32>("after").await.unwrap(), Some(2));
        let issued = self.store.create(USER, "tablet", None, None).await.unwrap();
        let rotated = self
            .store
            .rotate(issued.token.expose(), None)
            .await
            .unwrap();
        self.store.lookup(rotated.token.expose()).await.unwrap();
        assert!(!self.limiter.check("caller").await.unwrap().degraded);
        let health = self.client.health().await;
        assert!(health.ok, "{health:?}");
        assert_eq!(self.client.stats().breaker, BreakerState::Closed);
    }

    /// The recovery probe: a cache write.
    async fn probe(&self) -> Result<()> {
        self.cache.set("probe", &1).await
    }
}

/// Whether the error carries the server's error code (the redis crate spells some in
/// camel case: `ReadOnly`).
fn has_code(err: &rediskit::Error, code: &str) -> bool {
    err.message()
        .to_ascii_uppercase()
        .contains(&code.to_ascii_uppercase())
}

fn admin<T: redis::FromRedisValue>(server: &RedisServer, args: &[&str]) -> T {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query(&mut server.admin()).unwrap()
}

/// (a) A black hole (the network swallows everything, nothing is refused): every call ends at
/// its deadline or fails fast on the open breaker, auth fails closed, the cache degrades; after
/// the partition heals the same client recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_then_heal() {
    // Arrange
    let server = RedisServer::start();
    let proxy = FaultProxy::for_server(&server);
    let fixture = Fixture::new(&proxy.url(), Duration::from_millis(300)).await;

    // Act
    proxy.black_hole();

    // Assert
    fixture.assert_unreachable().await;
    let stats = fixture.client.stats();
    assert!(stats.timeouts >= 1, "{stats:?}");
    assert!(stats.breaker_trips >= 1, "{stats:?}");

    proxy.pass();
    let healed = Instant::now();
    recovery("black hole healed", healed, || fixture.probe()).await;
    fixture.assert_works().await;
}

/// (a') A partition long enough that the connections died with it: cut, then pass. The client
/// reconnects by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_outliving_the_connections() {
    // Arrange
    let server = RedisServer::start();
    let proxy = FaultProxy::for_server(&server);
    let fixture = Fixture::new(&proxy.url(), Duration::from_millis(300)).await;
    let accepted = proxy.accepted();

    // Act
    proxy.black_hole();
    fixture.assert_sessions_fail_closed().await;
    proxy.cut();
    proxy.pass();
    let healed = Instant::now();

    // Assert
    recovery("black hole, connections lost", healed, || fixture.probe()).await;
    fixture.assert_works().await;
    assert!(proxy.accepted() > accepted, "the client reconnected");
}

/// (b) Slow Redis (200 ms per reply): with a 500 ms deadline calls succeed, slower; with a 100 ms
/// deadline they time out at the deadline, the breaker opens and fails fast, and once the latency
/// ends the same client recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_replies() {
    // Arrange: both clients connect before the latency starts.
    let server = RedisServer::start();
    let proxy = FaultProxy::for_server(&server);
    let patient = Fixture::new(&proxy.url(), Duration::from_millis(500)).await;
    let hasty = Fixture::new(&proxy.url(), Duration::from_millis(100)).await;
    let latency = Duration::from_millis(200);

    // Act
    proxy.latency(latency);

    // Assert: within the deadline, slower.
    let d = patient.deadline;
    let started = Instant::now();
    bounded(d, "set", patient.cache.set("slow", &7))
        .await
        .unwrap();
    assert!(started.elapsed() >= latency, "{:?}", started.elapsed());
    let got = bounded(d, "get", patient.cache.try_get::<i32>("slow")).await;
    assert_eq!(got.unwrap(), Some(7));
    let started = Instant::now();
    let session = bounded(d, "lookup", patient.store.lookup(&patient.token)).await;
    assert_eq!(session.unwrap().session_id, patient.session_id);
    assert!(started.elapsed() >= latency);
    let rotated = bounded(d, "rotate", patient.store.rotate(&patient.token, None)).await;
    rotated.unwrap();
    assert!(!patient.limiter.check("caller").await.unwrap().degraded);
    assert_eq!(patient.client.stats().timeouts, 0);

    // Assert: past the deadline, timeouts open the breaker, which then fails fast.
    for _ in 0..BREAKER_THRESHOLD {
        let read = bounded(hasty.deadline, "get", hasty.cache.try_get::<i32>("slow")).await;
        let err = expect_unavailable("get past the deadline", read);
        assert!(err.is_timeout(), "{err}");
    }
    let stats = hasty.client.stats();
    assert_eq!(
        (stats.breaker, stats.breaker_trips),
        (BreakerState::Open, 1)
    );
    let started = Instant::now();
    let err = expect_unavailable(
        "get, circuit open",
        hasty.cache.try_get::<i32>("slow").await,
    );
    assert!(err.message().contains("circuit open"), "{err}");
    assert!(
        started.elapsed() < hasty.deadline,
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        hasty.client.stats().commands,
        stats.commands,
        "nothing sent"
    );
    hasty.assert_unreachable().await;

    proxy.pass();
    let ended = Instant::now();
    recovery("slow replies ended (100 ms deadline)", ended, || {
        hasty.probe()
    })
    .await;
    hasty.assert_works().await;
    patient.assert_works().await;
}

/// (b2) Slow Redis (500 ms per reply) that forgot the scripts (`SCRIPT FLUSH`, as a restart
/// does): the first script call reloads its script and runs within one 1.3 s deadline. That is
/// two round trips (`EVALSHA` answered `NOSCRIPT`, then `SCRIPT LOAD` and `EVALSHA` together);
/// loading first and running after took three, 1.5 s here, and timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_script_reloads_in_two_round_trips() {
    // Arrange: the client loaded the scripts at start (as the service does); Redis forgets them.
    let server = RedisServer::start();
    let proxy = FaultProxy::for_server(&server);
    let fixture = Fixture::new(&proxy.url(), Duration::from_millis(1300)).await;
    let _: () = admin(&server, &["SCRIPT", "FLUSH"]);
    let _: () = admin(&server, &["CONFIG", "RESETSTAT"]);

    // Act
    proxy.latency(Duration::from_millis(500));
    let d = fixture.deadline;
    let rotated = bounded(d, "rotate", fixture.store.rotate(&fixture.token, None)).await;

    // Assert: rotated (the script ran, once), and loaded once.
    let rotated = rotated.unwrap();
    proxy.pass();
    assert_eq!(rotated.session.session_id, fixture.session_id);
    fixture.store.lookup(rotated.token.expose()).await.unwrap();
    let stats: String = admin(&server, &["INFO", "commandstats"]);
    let calls = |command: &str| {
        stats
            .lines()
            .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(calls("script|load"), 1, "{stats}");
    assert_eq!(calls("hset"), 1, "the rotation wrote once: {stats}");
}

/// (c) Every connection cut, several times, under the load of 50 tasks: no panic, every call
/// ends within its deadline, every error is an unavailable kind, every reported success was
/// really stored, and the client recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_under_load() {
    // Arrange: the default breaker, as a service would run.
    let server = RedisServer::start();
    let proxy = FaultProxy::for_server(&server);
    let deadline = Duration::from_millis(500);
    let client = Client::connect(
        Config::builder()
            .url(proxy.url())
            .max_connections(4)
            .command_timeout(deadline)
            .connect_timeout(deadline)
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let cache = Cache::new(&client);
    let store = Sessions::new(&client, SECRET).unwrap();
    let load_ends = Instant::now() + Duration::from_millis(1200);

    // Act: 50 tasks write, read back and log in while the proxy cuts every connection.
    let tasks: Vec<_> = (0..50)
        .map(|task| {
            let (cache, store) = (cache.clone(), store.clone());
            tokio::spawn(async move {
                let mut stored = Vec::new();
                let mut tokens = Vec::new();
                let mut errors = 0u32;
                let mut n = 0u32;
                while Instant::now() < load_ends {
                    n += 1;
                    let key = format!("load:{task}:{n}");
                    let wrote = bounded(deadline, "set", cache.set(&key, &n)).await;
                    let wrote = match wrote {
                        Ok(()) => {
                            stored.push((key.clone(), n));
                            true
                        }
                        Err(err) => {
                            assert!(err.is_unavailable(), "set: {err}");
                            errors += 1;
                            false
                        }
                    };
                    match bounded(deadline, "get", cache.try_get::<u32>(&key)).await {
                        Ok(Some(value)) => assert_eq!(value, n, "{key}: another value"),
                        // A failed write may or may not have landed; a reported one must have.
                        Ok(None) => assert!(!wrote, "{key}: a reported write is missing"),
                        Err(err) => {
                            assert!(err.is_unavailable(), "get: {err}");
                            errors += 1;
                        }
                    }
                    // From the first round on, so a loaded machine still logs in before the cuts.
                    if n % 10 == 1 {
                        let user = format!("user{task}");
                        match bounded(deadline, "create", store.create(&user, "d", None, None))
                            .await
                        {
                            Ok(issued) => tokens.push(issued.token.expose().to_owned()),
                            Err(err) => {
                                assert!(err.is_unavailable(), "create: {err}");
                                errors += 1;
                            }
                        }
                    }
                }
                (stored, tokens, errors)
            })
        })
        .collect();
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        proxy.cut();
    }
    let last_cut = Instant::now();
    recovery("connections cut under load", last_cut, || {
        cache.set("probe", &1)
    })
    .await;

    // Assert
    let (mut stored, mut tokens, mut errors) = (Vec::new(), Vec::new(), 0);
    for task in tasks {
        let (s, t, e) = task.await.expect("no task panicked");
        stored.extend(s);
        tokens.extend(t);
        errors += e;
    }
    eprintln!(
        "[cut] {} writes and {} logins reported stored, {errors} unavailable errors, {} connections accepted",
        stored.len(),
        tokens.len(),
        proxy.accepted()
    );
    assert!(errors > 0, "the cuts were felt");
    assert!(!stored.is_empty() && !tokens.is_empty());
    for chunk in stored.chunks(500) {
        let keys: Vec<&str> = chunk.iter().map(|(key, _)| key.as_str()).collect();
        let values = cache.get_many::<u32>(&keys).await.unwrap();
        for ((key, n), value) in chunk.iter().zip(values) {
            assert_eq!(value, Some(*n), "{key} was reported stored");
        }
    }
    for token in &tokens {
        store.lookup(token).await.unwrap();
    }
    assert!(client.health().await.ok);
}

/// (d) A server paused for 5 s (SIGSTOP, then SIGCONT): calls end at their deadline or fail fast
/// the whole time, then the same client recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_for_five_seconds() {
    // Arrange
    let server = RedisServer::start();
    let fixture = Fixture::new(&server.url(), Duration::from_millis(300)).await;

    // Act
    server.signal("STOP");
    let paused = Instant::now();

    // Assert: the degraded behaviour, then calls stay bounded for the whole pause.
    fixture.assert_unreachable().await;
    let mut calls = 0;
    while paused.elapsed() < Duration::from_secs(5) {
        let get = bounded(fixture.deadline, "get", fixture.cache.get::<i32>("present")).await;
        assert_eq!(get.unwrap(), None);
        calls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.signal("CONT");
    let resumed = Instant::now();
    let stats = fixture.client.stats();
    eprintln!(
        "[pause] {calls} reads during the pause; {} timeouts, {} breaker trips, {} failed fast",
        stats.timeouts, stats.breaker_trips, stats.breaker_rejected
    );
    assert!(stats.breaker_rejected > 0, "the breaker failed calls fast");

    recovery("SIGSTOP 5 s, then SIGCONT", resumed, || fixture.probe()).await;
    fixture.assert_works().await;
}

/// Writes filler through an admin connection until Redis refuses them with `OOM`, then lowers
/// `maxmemory` a little under the usage reached, so that the server's own buffer churn cannot let
/// a write slip through while the test runs.
fn fill_until_oom(server: &RedisServer) {
    let mut admin = server.admin();
    let filler = vec![b'x'; 8 * 1024];
    let mut refused = false;
    for i in 0..100_000 {
        let written: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(&filler)
            .query(&mut admin);
        if let Err(err) = written {
            assert_eq!(err.code(), Some("OOM"), "{err}");
            refused = true;
            break;
        }
    }
    assert!(refused, "maxmemory never reached");
    let info: String = redis::cmd("INFO").arg("memory").query(&mut admin).unwrap();
    let used: u64 = info
        .lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used - 256 * 1024)
        .query(&mut admin)
        .unwrap();
}

/// (e) Out of memory (`maxmemory` with `noeviction`): writes fail as unavailable with the
/// server's `OOM`, session creation fails closed, reads still work, a refused rotation changes
/// nothing; after `FLUSHALL`, writes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory() {
    // Arrange
    let server =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let fixture = Fixture::new(&server.url(), Duration::from_millis(500)).await;
    fixture.add_ending_session().await;

    // Act
    fill_until_oom(&server);

    // Assert
    fixture.assert_refuses_writes("OOM").await;

    let _: () = admin(&server, &["FLUSHALL"]);
    let freed = Instant::now();
    recovery("OOM ended by FLUSHALL", freed, || fixture.probe()).await;
    fixture.assert_works().await;
}

/// Waits until `server`, a replica, has synchronised with its master.
async fn wait_for_link(server: &RedisServer) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let info: String = admin(server, &["INFO", "replication"]);
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

/// (f) The server the client talks to is demoted to a replica (a fail-over it did not follow):
/// writes fail as unavailable with `READONLY` and never report a false success, reads still
/// work; after `REPLICAOF NO ONE`, writes work again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_replica() {
    // Arrange: `primary` is what the client talks to; `other` takes over from it.
    let replication = ["--repl-diskless-sync-delay", "0"];
    let primary = RedisServer::start_with(&replication);
    let other = RedisServer::start_with(&replication);
    let fixture = Fixture::new(&primary.url(), Duration::from_millis(500)).await;
    fixture.add_ending_session().await;

    // Act: `other` copies `primary` and is promoted; `primary` becomes its replica, data intact.
    let primary_port = primary.port().to_string();
    let other_port = other.port().to_string();
    let _: () = admin(&other, &["REPLICAOF", "127.0.0.1", &primary_port]);
    wait_for_link(&other).await;
    let _: () = admin(&other, &["REPLICAOF", "NO", "ONE"]);
    let _: () = admin(&primary, &["REPLICAOF", "127.0.0.1", &other_port]);
    wait_for_link(&primary).await;

    // Assert
    fixture.assert_refuses_writes("READONLY").await;

    let _: () = admin(&primary, &["REPLICAOF", "NO", "ONE"]);
    let promoted = Instant::now();
    recovery("READONLY ended by REPLICAOF NO ONE", promoted, || {
        fixture.probe()
    })
    .await;
    fixture.assert_works().await;
}

/// (g) Scripts forgotten by `SCRIPT FLUSH` and by a restart are reloaded transparently: the rate
/// limiter decides without degrading, the cache's delete-if-equal still removes a corrupt value,
/// and sessions rotate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_reload_after_noscript() {
    // Arrange
    let mut server = RedisServer::start();
    let fixture = Fixture::new(&server.url(), Duration::from_millis(500)).await;
    fixture.client.load_scripts().await.unwrap();
    let corrupt_key = fixture.cache.redis_key("corrupt").unwrap();
    let check_scripts = async |server: &RedisServer, fixture: &Fixture| {
        let decision = fixture.limiter.check("caller").await.unwrap();
        assert!(!decision.degraded, "{decision:?}");
        let _: () = admin(server, &["SET", &corrupt_key, "not our format"]);
        assert_eq!(fixture.cache.get::<i32>("corrupt").await.unwrap(), None);
        let exists: u32 = admin(server, &["EXISTS", &corrupt_key]);
        assert_eq!(exists, 0, "del_if_equals ran and deleted the corrupt value");
        let issued = fixture.store.create(USER, "d", None, None).await.unwrap();
        let rotated = fixture.store.rotate(issued.token.expose(), None).await;
        fixture
            .store
            .lookup(rotated.unwrap().token.expose())
            .await
            .unwrap();
    };

    // Act / Assert: SCRIPT FLUSH.
    let _: () = admin(&server, &["SCRIPT", "FLUSH"]);
    check_scripts(&server, &fixture).await;
    assert_eq!(fixture.cache.stats().corrupt, 1);

    // Act / Assert: a restart (empty, no scripts).
    server.restart();
    let restarted = Instant::now();
    recovery("restart (scripts forgotten)", restarted, || fixture.probe()).await;
    let gcra = redis::Script::new(include_str!("../src/scripts/gcra.lua"));
    let loaded: Vec<bool> = admin(&server, &["SCRIPT", "EXISTS", gcra.get_hash()]);
    assert_eq!(loaded, [false], "the restart forgot the scripts");
    check_scripts(&server, &fixture).await;
    assert_eq!(fixture.cache.stats().corrupt, 2);
    assert_eq!(fixture.limiter.stats().degraded, 0);
}

/// With the default configuration (20 connections, breaker 5 / 1 s), a restart while the breaker
/// is open is recovered within the bound. Each half-open probe can discover only one dead
/// connection (and reopens the circuit when it does), so the time to the first success must not
/// grow with the number of connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_pool_recovers_from_a_restart_in_bounded_time() {
    // Arrange
    let mut server = RedisServer::start();
    let config = Config::builder().url(server.url()).build().unwrap();
    let (threshold, connections) = (config.breaker_threshold, config.max_connections);
    let client = Client::connect(config).await.unwrap();
    let cache = Cache::new(&client);

    // Act: callers keep coming while Redis is down, so the breaker opens; then Redis is back.
    server.kill();
    for _ in 0..=threshold {
        let read = bounded(DEFAULT_DEADLINE, "get", cache.try_get::<i32>("k")).await;
        expect_unavailable("get while down", read);
    }
    assert_eq!(client.stats().breaker, BreakerState::Open);
    server.restart();
    let restarted = Instant::now();

    // Assert
    let what = format!("restart, default pool of {connections} connections");
    recovery(&what, restarted, || cache.set("k", &1)).await;
}

/// Writes refused by a server that is up (`OOM` here; `READONLY`, `LOADING`, `BUSY` take the same
/// path) do not open the breaker: the reads that server still serves — session checks among them
/// — keep working through a burst of refused writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_writes_leave_reads_working() {
    // Arrange
    let server =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"]);
    let fixture = Fixture::new(&server.url(), Duration::from_millis(500)).await;
    fill_until_oom(&server);

    // Act: more refused writes in a row than the breaker's threshold.
    for _ in 0..BREAKER_THRESHOLD + 2 {
        expect_unavailable("cache set", fixture.cache.set("k", &1).await);
    }

    // Assert
    let read = fixture.cache.try_get::<i32>("present").await;
    assert_eq!(read.unwrap(), Some(1), "a read the server would serve");
    fixture.store.lookup(&fixture.token).await.unwrap();
    assert_eq!(fixture.client.stats().breaker, BreakerState::Closed);
}
