//! Black-box harness for the `rediskit` service: the real binary as a child process on a free
//! port, driven over plain HTTP.
//!
//! A [`Service`] is started from a clean environment (none of the machine's `REDIS_*`,
//! `DEV_REDIS_*`, `ENVIRONMENT`, `JWT_SECRET` or service variables leak in), logs to a temporary
//! file that is printed when a test fails, is ready once `GET /health` answers 200, and is killed
//! on drop. Each test pairs it with its own `RedisServer`, so tests run in parallel.

#![allow(dead_code, clippy::unwrap_used)]

use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rediskit_testkit::{RedisServer, free_port};
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};

/// The signing secret the tests give the service (at least 32 bytes).
pub const SECRET: &str = "http-tests-secret-0123456789abcdef-0123456789";

/// A password that satisfies the contract's 8–256 bytes.
pub const PASSWORD: &str = "correct horse battery staple";

/// How long a service gets to answer `GET /health`.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// Deadline of every request a test sends (generous: debug builds hash passwords slowly).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Variables of the service and of rediskit's configuration that the machine must not supply.
const SCRUBBED: &[&str] = &[
    "ENVIRONMENT",
    "JWT_SECRET",
    "LISTEN_ADDR",
    "ACCESS_TOKEN_TTL_SECS",
    "REFRESH_TOKEN_TTL_SECS",
    "DEMO_COMPUTE_MS",
    "DEMO_CACHE_TTL_SECS",
    "DEMO_STALE_SECS",
    "RATE_LIMIT_LOGIN_PER_MIN",
    "RATE_LIMIT_AUTH_PER_MIN",
    "TRUST_FORWARDED_FOR",
    "NEAR_CACHE_SESSIONS",
    "RUST_LOG",
];

/// Distinguishes the log files of services started by one test process.
static NEXT_LOG: AtomicUsize = AtomicUsize::new(0);

/// How to start a [`Service`]: environment variables on top of the test defaults.
pub struct ServiceBuilder {
    env: Vec<(String, String)>,
}

impl ServiceBuilder {
    /// Sets (or overrides) one environment variable of the service.
    pub fn env(mut self, name: &str, value: impl Into<String>) -> Self {
        let value = value.into();
        self.env.retain(|(existing, _)| existing != name);
        self.env.push((name.to_owned(), value));
        self
    }

    /// Removes a variable the defaults would set.
    pub fn without(mut self, name: &str) -> Self {
        self.env.retain(|(existing, _)| existing != name);
        self
    }

    /// Points the service at a test redis-server (`REDIS_URL`).
    pub fn redis(self, server: &RedisServer) -> Self {
        self.env("REDIS_URL", server.url())
    }

    /// Starts the service and waits until `GET /health` answers 200.
    ///
    /// Another process may take the probed port before the service binds it; then it retries on
    /// another port.
    pub async fn start(self) -> Service {
        for _ in 0..5 {
            let mut service = self.spawn(free_port());
            match service.wait_ready().await {
                Ready::Yes => return service,
                Ready::PortTaken => continue,
            }
        }
        panic!("the service could not bind any of 5 free ports");
    }

    /// Runs the service expecting it to refuse to start: returns its exit status and output.
    pub async fn run_to_exit(self) -> (ExitStatus, String) {
        let mut service = self.spawn(free_port());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = service.child.try_wait().expect("poll the service process") {
                return (status, service.log());
            }
            if Instant::now() > deadline {
                panic!(
                    "the service was expected to stop at start-up but still runs after \
                     {READY_TIMEOUT:?} (its log follows)"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn spawn(&self, port: u16) -> Service {
        let log_path = std::env::temp_dir().join(format!(
            "rediskit-http-test-{}-{}-{port}.log",
            std::process::id(),
            NEXT_LOG.fetch_add(1, Ordering::Relaxed)
        ));
        let log = File::create(&log_path).expect("create the service's log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_rediskit"));
        command.arg("serve");
        for name in inherited_to_scrub() {
            command.env_remove(name);
        }
        command
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .envs(self.env.iter().map(|(name, value)| (name, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log file handle"))
            .stderr(log);
        let child = command
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {}: {err}", env!("CARGO_BIN_EXE_rediskit")));
        Service {
            child,
            port,
            base_url: format!("http://127.0.0.1:{port}"),
            log_path,
            http: client(),
        }
    }
}

/// Names of inherited variables that would configure the service behind the test's back.
fn inherited_to_scrub() -> Vec<OsString> {
    let mut names: Vec<OsString> = std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| {
            let name = name.to_string_lossy();
            name.starts_with("REDIS_") || name.starts_with("DEV_REDIS_")
        })
        .collect();
    names.extend(SCRUBBED.iter().map(OsString::from));
    names
}

/// An HTTP client for talking to services on loopback: never through a proxy.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("build the HTTP client")
}

enum Ready {
    Yes,
    PortTaken,
}

/// A running `rediskit serve` child process. Killed on drop; its log is printed if the test
/// is failing at that moment.
pub struct Service {
    child: Child,
    port: u16,
    /// `http://127.0.0.1:{port}`.
    pub base_url: String,
    log_path: PathBuf,
    http: reqwest::Client,
}

impl Service {
    /// The test defaults, in development, without a Redis (set one with
    /// [`ServiceBuilder::redis`]): the test secret, generous rate limits (so that only the
    /// rate-limit tests meet them) and an informative log level.
    pub fn builder() -> ServiceBuilder {
        ServiceBuilder { env: Vec::new() }
            .env("ENVIRONMENT", "development")
            .env("JWT_SECRET", SECRET)
            .env("RATE_LIMIT_LOGIN_PER_MIN", "10000")
            .env("RATE_LIMIT_AUTH_PER_MIN", "100000")
            .env("RUST_LOG", "info")
    }

    /// A service with the test defaults on `server`.
    pub async fn start(server: &RedisServer) -> Service {
        Self::builder().redis(server).start().await
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// What the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// `base_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    async fn wait_ready(&mut self) -> Ready {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the service process") {
                let log = self.log();
                let lower = log.to_lowercase();
                if lower.contains("address already in use") || lower.contains("addrinuse") {
                    return Ready::PortTaken;
                }
                panic!("the service exited with {status} before it was ready (its log follows)");
            }
            let probe = self
                .http
                .get(self.url("/health"))
                .timeout(Duration::from_millis(500))
                .send()
                .await;
            if matches!(&probe, Ok(response) if response.status() == StatusCode::OK) {
                return Ready::Yes;
            }
            if Instant::now() > deadline {
                panic!(
                    "the service did not answer GET /health with 200 within {READY_TIMEOUT:?} \
                     (last answer: {probe:?}; its log follows)"
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    // --- requests -------------------------------------------------------------------------

    /// A request to `path`, for tests that need something the helpers below don't do.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, self.url(path))
    }

    /// Sends a request and reads the whole answer.
    pub async fn send(&self, request: RequestBuilder) -> Reply {
        let response = request
            .send()
            .await
            .unwrap_or_else(|err| panic!("request failed (the service's log follows): {err:?}"));
        Reply::read(response).await
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Reply {
        self.send(self.request(Method::GET, path)).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.send(self.request(Method::POST, path).json(body)).await
    }

    /// `POST path` with raw bytes sent as `application/json`.
    pub async fn post_raw(&self, path: &str, body: impl Into<Vec<u8>>) -> Reply {
        let request = self
            .request(Method::POST, path)
            .header("content-type", "application/json")
            .body(body.into());
        self.send(request).await
    }

    /// `GET path` with `Authorization: Bearer {token}`.
    pub async fn auth_get(&self, path: &str, token: &str) -> Reply {
        self.send(self.request(Method::GET, path).bearer_auth(token))
            .await
    }

    /// `POST path` (no body) with `Authorization: Bearer {token}`.
    pub async fn auth_post(&self, path: &str, token: &str) -> Reply {
        self.send(self.request(Method::POST, path).bearer_auth(token))
            .await
    }

    /// `DELETE path` with `Authorization: Bearer {token}`.
    pub async fn auth_delete(&self, path: &str, token: &str) -> Reply {
        self.send(self.request(Method::DELETE, path).bearer_auth(token))
            .await
    }

    // --- the account flows ----------------------------------------------------------------

    /// `POST /auth/register`, whatever the answer.
    pub async fn try_register(&self, username: &str, password: &str) -> Reply {
        self.post_json(
            "/auth/register",
            &json!({"username": username, "password": password}),
        )
        .await
    }

    /// Registers a user, asserting 201 `{"user_id"}`; returns the user id.
    pub async fn register(&self, username: &str, password: &str) -> Value {
        let reply = self.try_register(username, password).await;
        reply.assert_status(201);
        let user_id = reply.json()["user_id"].clone();
        assert!(
            user_id.as_str().is_some_and(|id| !id.is_empty()) || user_id.is_u64(),
            "register answers a user_id: {}",
            reply.text
        );
        user_id
    }

    /// `POST /auth/login` with `{"username","password"}`, whatever the answer.
    pub async fn try_login(&self, username: &str, password: &str) -> Reply {
        self.post_json(
            "/auth/login",
            &json!({"username": username, "password": password}),
        )
        .await
    }

    /// Logs in, asserting 200 and a well-formed token pair.
    pub async fn login(&self, username: &str, password: &str) -> TokenPair {
        TokenPair::from_reply(&self.try_login(username, password).await)
    }

    /// Logs in naming the device in the body.
    pub async fn login_on(&self, username: &str, password: &str, device: &str) -> TokenPair {
        let reply = self
            .post_json(
                "/auth/login",
                &json!({"username": username, "password": password, "device": device}),
            )
            .await;
        TokenPair::from_reply(&reply)
    }

    /// `POST /auth/refresh` with `{"refresh_token"}`, whatever the answer.
    pub async fn refresh(&self, refresh_token: &str) -> Reply {
        self.post_json("/auth/refresh", &json!({"refresh_token": refresh_token}))
            .await
    }

    /// `GET /me` with the access token, whatever the answer.
    pub async fn me(&self, access_token: &str) -> Reply {
        self.auth_get("/me", access_token).await
    }

    /// Polls `GET /me` until it answers 401 (a problem document), for at most `within`.
    pub async fn assert_me_refused_within(&self, access_token: &str, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let reply = self.me(access_token).await;
            if reply.status == StatusCode::UNAUTHORIZED {
                assert_problem(&reply, 401);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "GET /me still answers {} {} after {within:?}",
                reply.status,
                reply.text
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- log of the service on port {} -----\n{}----- end of log -----",
                self.port,
                self.log()
            );
        }
        let _ = std::fs::remove_file(&self.log_path);
    }
}

/// A whole HTTP answer, read so that assertions can look at it several times.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: StatusCode,
    /// The headers.
    pub headers: HeaderMap,
    /// The body as text.
    pub text: String,
}

impl Reply {
    async fn read(response: reqwest::Response) -> Reply {
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("read the response body");
        Reply {
            status,
            headers,
            text,
        }
    }

    /// The body parsed as JSON (panics, showing the body, if it isn't).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|err| {
            panic!(
                "the {} answer is not JSON ({err}): {:?}",
                self.status, self.text
            )
        })
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value: &HeaderValue| value.to_str().expect("a header in visible ASCII"))
    }

    /// A header that must be present and hold a non-negative integer.
    #[track_caller]
    pub fn integer_header(&self, name: &str) -> u64 {
        let value = self
            .header(name)
            .unwrap_or_else(|| panic!("the {} answer has no {name} header: {self:?}", self.status));
        value
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name} is not a number of seconds or requests: {value:?}"))
    }

    /// Asserts the status, showing the body otherwise.
    #[track_caller]
    pub fn assert_status(&self, status: u16) -> &Self {
        assert_eq!(
            self.status.as_u16(),
            status,
            "expected {status}, got {} with body {:?}",
            self.status,
            self.text
        );
        self
    }
}

/// Asserts that `reply` is an RFC 9457 problem document for `status`: that status,
/// `Content-Type: application/problem+json`, and a JSON object with a string `type`, a string
/// `title`, `status` equal to the HTTP status and a non-empty `detail`. Returns the document.
#[track_caller]
pub fn assert_problem(reply: &Reply, status: u16) -> Value {
    reply.assert_status(status);
    let content_type = reply.header("content-type").unwrap_or_default();
    assert!(
        content_type
            .to_ascii_lowercase()
            .starts_with("application/problem+json"),
        "a {status} must be application/problem+json, got {content_type:?} with body {:?}",
        reply.text
    );
    let problem = reply.json();
    assert!(
        problem["type"].is_string(),
        "problem without a string `type`: {problem}"
    );
    assert!(
        problem["title"].as_str().is_some_and(|t| !t.is_empty()),
        "problem without a `title`: {problem}"
    );
    assert_eq!(
        problem["status"].as_u64(),
        Some(u64::from(status)),
        "the problem's `status` must equal the HTTP status: {problem}"
    );
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| !d.trim().is_empty()),
        "problem without a non-empty `detail`: {problem}"
    );
    problem
}

/// Asserts a 503 problem document with a `Retry-After` of whole seconds.
#[track_caller]
pub fn assert_unavailable(reply: &Reply) {
    assert_problem(reply, 503);
    reply.integer_header("retry-after");
}

/// Asserts a `/health/redis` answer: `status`, `redis_connected` and `backend` as given, and
/// the rest of the contract's fields well-formed. Returns the body.
#[track_caller]
pub fn assert_redis_health(reply: &Reply, status: u16, backend: &str) -> Value {
    reply.assert_status(status);
    let body = reply.json();
    let healthy = status == 200;
    assert_eq!(
        body["status"],
        if healthy { "healthy" } else { "unhealthy" },
        "{body}"
    );
    assert_eq!(body["backend"], backend, "{body}");
    assert!(
        body["latency_ms"].is_number() || body["latency_ms"].is_null(),
        "{body}"
    );
    if healthy && backend == "redis" {
        assert!(
            body["latency_ms"].is_number(),
            "a healthy Redis has a latency: {body}"
        );
    }
    for field in ["max", "in_use", "idle"] {
        assert!(body["pool"][field].is_u64(), "pool.{field}: {body}");
    }
    assert!(body["timestamp"].as_str().is_some_and(is_rfc3339), "{body}");
    body
}

/// The answer of a successful login or refresh.
#[derive(Debug, Clone)]
pub struct TokenPair {
    /// The JWT.
    pub access_token: String,
    /// The opaque refresh token.
    pub refresh_token: String,
    /// Seconds the access token lives.
    pub expires_in: u64,
    /// Seconds the refresh token lives.
    pub refresh_expires_in: u64,
    /// The session (device) the pair belongs to.
    pub session_id: String,
}

impl TokenPair {
    /// Asserts a 200 with the contract's token pair and returns it.
    #[track_caller]
    pub fn from_reply(reply: &Reply) -> TokenPair {
        reply.assert_status(200);
        let body = reply.json();
        let text = |name: &str| -> String {
            body[name]
                .as_str()
                .filter(|value| !value.is_empty())
                .unwrap_or_else(|| panic!("token pair without a non-empty `{name}`: {body}"))
                .to_owned()
        };
        let number = |name: &str| -> u64 {
            body[name]
                .as_u64()
                .unwrap_or_else(|| panic!("token pair without an integer `{name}`: {body}"))
        };
        assert_eq!(body["token_type"], "Bearer", "{body}");
        TokenPair {
            access_token: text("access_token"),
            refresh_token: text("refresh_token"),
            expires_in: number("expires_in"),
            refresh_expires_in: number("refresh_expires_in"),
            session_id: text("session_id"),
        }
    }
}

// --- JWT pieces, by hand (the tests have no JWT or base64 crate) -----------------------------

const B64_ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// base64url without padding, as JWTs use it.
pub fn b64url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(char::from(B64_ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// Decodes base64url with or without padding; `None` on a character outside the alphabet.
pub fn b64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.trim_end_matches('=').bytes() {
        let value = B64_ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = (acc << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// A JWT's three parts: header JSON, claims JSON, signature text (still encoded).
pub fn jwt_parts(token: &str) -> (Value, Value, String) {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(
        parts.len(),
        3,
        "a JWT has three dot-separated parts: {token}"
    );
    let decode = |part: &str| -> Value {
        let bytes = b64url_decode(part).unwrap_or_else(|| panic!("not base64url: {part}"));
        serde_json::from_slice(&bytes).unwrap_or_else(|err| panic!("not JSON ({err}): {part}"))
    };
    (decode(parts[0]), decode(parts[1]), parts[2].to_owned())
}

/// Assembles a JWT from a header, claims and an (encoded) signature.
pub fn jwt_assemble(header: &Value, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        b64url_encode(header.to_string().as_bytes()),
        b64url_encode(claims.to_string().as_bytes())
    )
}

/// Whether `text` is an RFC 3339 date-time (`2025-01-31T12:00:00Z`, fractions and offsets
/// allowed).
pub fn is_rfc3339(text: &str) -> bool {
    let b = text.as_bytes();
    if b.len() < 20 {
        return false;
    }
    let digits = |from: usize, to: usize| b[from..to].iter().all(u8::is_ascii_digit);
    let shape = digits(0, 4)
        && b[4] == b'-'
        && digits(5, 7)
        && b[7] == b'-'
        && digits(8, 10)
        && matches!(b[10], b'T' | b't')
        && digits(11, 13)
        && b[13] == b':'
        && digits(14, 16)
        && b[16] == b':'
        && digits(17, 19);
    if !shape {
        return false;
    }
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return false;
        }
    }
    match &b[i..] {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit()),
        _ => false,
    }
}

/// Whether a session's timestamp field holds a time: an RFC 3339 string or Unix seconds.
pub fn is_timestamp(value: &Value) -> bool {
    value.is_u64() || value.as_str().is_some_and(is_rfc3339)
}

impl Service {
    /// The process id, to watch its memory.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}
