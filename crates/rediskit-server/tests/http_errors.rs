//! Every failure row of HTTP_API.md, black box: each answer is a problem document with the
//! contract's status, and `/auth/*` answers carry the rate-limit headers whatever their status.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use rediskit_testkit::RedisServer;
use reqwest::Method;
use serde_json::json;
use support::{PASSWORD, Reply, SECRET, Service, assert_problem};

/// 64 KiB, the largest body the service accepts.
const BODY_LIMIT: usize = 64 * 1024;

/// Asserts a 400 or 422 problem whose `detail` names `field` (when there is a field to name).
#[track_caller]
fn assert_bad_body(reply: &Reply, field: Option<&str>, what: &str) {
    let status = reply.status.as_u16();
    assert!(
        status == 400 || status == 422,
        "{what}: expected 400 or 422, got {status} {}",
        reply.text
    );
    let problem = assert_problem(reply, status);
    if let Some(field) = field {
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains(field),
            "{what}: the detail must name `{field}`: {detail:?}"
        );
    }
}

/// Requests without a usable bearer token are 401 problems on every authenticated route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_malformed_bearer_token_is_401() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    let routes = [
        (Method::GET, "/me"),
        (Method::GET, "/auth/sessions"),
        (Method::POST, "/auth/logout"),
        (Method::POST, "/auth/logout-all"),
        (Method::DELETE, "/auth/sessions/some-session"),
    ];
    let authorizations = [
        None,
        Some("Basic YWxpY2U6c2VjcmV0"),
        Some("Bearer"),
        Some("Bearer "),
        Some("Bearer not-a-jwt"),
        Some("Bearer a.b.c"),
        Some("Bearer eyJhbGciOiJIUzI1NiJ9.e30.AAAA"),
    ];

    for (method, path) in &routes {
        for authorization in &authorizations {
            let mut request = service.request(method.clone(), path);
            if let Some(value) = authorization {
                request = request.header("authorization", *value);
            }

            // Act
            let reply = service.send(request).await;

            // Assert
            assert_eq!(
                reply.status, 401,
                "{method} {path} with {authorization:?}: {}",
                reply.text
            );
            assert_problem(&reply, 401);
        }
    }
}

/// A wrong password and an unknown username get the same 401 and the same body: the answer
/// doesn't tell which usernames exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_unknown_user_answer_alike() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("alice", PASSWORD).await;

    // Act
    let wrong_password = service.try_login("alice", "not the password").await;
    let unknown_user = service.try_login("nobody", "not the password").await;

    // Assert
    let wrong = assert_problem(&wrong_password, 401);
    let unknown = assert_problem(&unknown_user, 401);
    assert_eq!(wrong, unknown);
    assert_eq!(
        wrong_password.header("content-type"),
        unknown_user.header("content-type")
    );
}

/// Deleting a session that doesn't exist, or that belongs to another user, is a 404 — and the
/// other user's session is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_unknown_or_foreign_session_is_404() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("alice", PASSWORD).await;
    service.register("bob", PASSWORD).await;
    let alice = service.login("alice", PASSWORD).await;
    let bob = service.login("bob", PASSWORD).await;

    // Act
    let unknown = service
        .auth_delete("/auth/sessions/no-such-session", &alice.access_token)
        .await;
    let foreign = service
        .auth_delete(
            &format!("/auth/sessions/{}", bob.session_id),
            &alice.access_token,
        )
        .await;

    // Assert
    assert_problem(&unknown, 404);
    assert_problem(&foreign, 404);
    service.me(&bob.access_token).await.assert_status(200);
    support::TokenPair::from_reply(&service.refresh(&bob.refresh_token).await);
}

/// Registering a taken username is a 409, and the first account keeps its password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn taken_username_is_409() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("alice", PASSWORD).await;

    // Act
    let again = service.try_register("alice", "another password").await;

    // Assert
    assert_problem(&again, 409);
    service.login("alice", PASSWORD).await;
    assert_problem(&service.try_login("alice", "another password").await, 401);
}

/// A body over 64 KiB is a 413; one of exactly 64 KiB is read (and judged on its content).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_64_kib_is_413() {
    // Arrange: register bodies whose password pads them to an exact size.
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    let body_of = |size: usize| {
        let frame = r#"{"username":"big","password":""}"#.len();
        let body = format!(
            r#"{{"username":"big","password":"{}"}}"#,
            "a".repeat(size - frame)
        );
        assert_eq!(body.len(), size);
        body
    };

    // Act
    let over = service
        .post_raw("/auth/register", body_of(BODY_LIMIT + 1))
        .await;
    let far_over = service
        .post_raw("/auth/register", body_of(4 * BODY_LIMIT))
        .await;
    let at_limit = service
        .post_raw("/auth/register", body_of(BODY_LIMIT))
        .await;

    // Assert
    assert_problem(&over, 413);
    assert_problem(&far_over, 413);
    assert_problem(&at_limit, 422); // read, then refused: the password is over 256 bytes
}

/// Routes that read no body answer 413 to one declared over 64 KiB as well, the limited ones with
/// their `RateLimit-*` headers; the request does nothing (the logout does not happen).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_64_kib_is_413_on_routes_without_a_body() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("alice", PASSWORD).await;
    let pair = service.login("alice", PASSWORD).await;
    let big = "x".repeat(BODY_LIMIT + 1);
    let with_big_body = |method: Method, path: &str| {
        service
            .request(method, path)
            .bearer_auth(&pair.access_token)
            .body(big.clone())
    };

    // Act
    let logout = service
        .send(with_big_body(Method::POST, "/auth/logout"))
        .await;
    let me = service.send(with_big_body(Method::GET, "/me")).await;
    let metrics = service
        .send(with_big_body(Method::GET, "/api/business-metrics/7d"))
        .await;

    // Assert
    assert_problem(&logout, 413);
    logout.integer_header("ratelimit-limit");
    assert_problem(&me, 413);
    assert_problem(&metrics, 413);
    service.me(&pair.access_token).await.assert_status(200);
}

/// A client still sending an oversized body (here 512 KiB, in pieces) gets the 413 instead of a
/// reset: the service reads and discards the rest before answering. Had it answered and closed
/// at once, the later pieces would hit a closed connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_sending_an_oversized_body_reads_the_413() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    let host = service_host(&service);
    let length = 8 * BODY_LIMIT;
    // Login reads its body in its own handler (its limit key holds the user name): the same.
    for path in ["/auth/register", "/auth/login"] {
        let mut stream = tokio::net::TcpStream::connect(&host).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
             Content-Length: {length}\r\n\r\n"
        );

        // Act: the head, then the body in 16 pieces 20 ms apart.
        stream.write_all(head.as_bytes()).await.unwrap();
        let piece = vec![b'x'; length / 16];
        for _ in 0..16 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            stream.write_all(&piece).await.unwrap_or_else(|err| {
                panic!("{path}: the service closed the connection while the body came: {err}")
            });
        }
        // The connection stays open (the body was read, so it can be reused): the status line.
        let mut answer = vec![0u8; 12];
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut answer))
            .await
            .expect("no answer within 10 s")
            .unwrap();

        // Assert
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.starts_with("HTTP/1.1 413"),
            "{path}: expected a 413, got: {answer}"
        );
    }
}

/// `host:port` of the service, for raw connections.
fn service_host(service: &Service) -> String {
    service
        .url("/")
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

/// Sends `POST path` with `body` in chunked transfer encoding (no declared length), 16 KiB a
/// chunk, over a raw connection; returns the whole answer as text.
async fn post_chunked(service: &Service, path: &str, headers: &str, body: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = service_host(service);
    let mut stream = tokio::net::TcpStream::connect(&host).await.unwrap();
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Transfer-Encoding: chunked\r\n\
         Connection: close\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(16 * 1024) {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// A body sent without a declared length (chunked) is held to 64 KiB too: over it, 413 on
/// routes that read no body as on those that do, and the request does nothing (the logout does
/// not happen); within it, the body is read as if its length had been declared.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_64_kib_is_413_too() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("alice", PASSWORD).await;
    let pair = service.login("alice", PASSWORD).await;
    let bearer = format!("Authorization: Bearer {}\r\n", pair.access_token);
    let big = vec![b'x'; BODY_LIMIT + 1];
    let json = "Content-Type: application/json\r\n";
    let small = serde_json::to_vec(&json!({"username": "bob", "password": PASSWORD})).unwrap();

    // Act
    let logout = post_chunked(&service, "/auth/logout", &bearer, &big).await;
    let register = post_chunked(&service, "/auth/register", json, &big).await;
    let login = post_chunked(&service, "/auth/login", json, &big).await;
    let registered = post_chunked(&service, "/auth/register", json, &small).await;

    // Assert
    for (what, answer) in [
        ("logout", &logout),
        ("register", &register),
        ("login", &login),
    ] {
        assert!(answer.starts_with("HTTP/1.1 413"), "{what}: {answer}");
        assert!(answer.contains("ratelimit-limit"), "{what}: {answer}");
    }
    service.me(&pair.access_token).await.assert_status(200);
    assert!(registered.starts_with("HTTP/1.1 201"), "{registered}");
}

/// A path under /auth/ that is no route is a 404 of the limited routes: with their RateLimit-*
/// headers, and counted against the address's budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_auth_paths_are_limited_404s() {
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    for path in ["/auth/x", "/auth/sessions/a/b", "/auth/"] {
        let reply = service.get(path).await;
        assert_problem(&reply, 404);
        reply.integer_header("ratelimit-limit");
    }
    // Known routes keep their own answers.
    assert_problem(&service.get("/auth/login").await, 405);
    assert_problem(&service.post_json("/auth/refresh", &json!({})).await, 422);
}

/// Usernames outside 1–64 characters of `A-Z a-z 0-9 _ . @ -` and passwords outside 8–256
/// bytes are 422; the edges of both ranges are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_usernames_and_passwords_are_422() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    let refused = [
        (String::new(), PASSWORD.to_owned(), "empty username"),
        ("a".repeat(65), PASSWORD.to_owned(), "65-character username"),
        ("has space".to_owned(), PASSWORD.to_owned(), "space"),
        ("a/b".to_owned(), PASSWORD.to_owned(), "slash"),
        ("zoë".to_owned(), PASSWORD.to_owned(), "non-ASCII letter"),
        ("user7".to_owned(), "1234567".to_owned(), "7-byte password"),
        ("user257".to_owned(), "p".repeat(257), "257-byte password"),
        (
            "user258".to_owned(),
            "é".repeat(129),
            "258 bytes in 129 characters",
        ),
    ];
    let accepted = [
        ("a".to_owned(), PASSWORD.to_owned(), "1-character username"),
        ("b".repeat(64), PASSWORD.to_owned(), "64-character username"),
        (
            "Az09_.@-".to_owned(),
            PASSWORD.to_owned(),
            "every kind of allowed character",
        ),
        ("user8".to_owned(), "12345678".to_owned(), "8-byte password"),
        ("user256".to_owned(), "p".repeat(256), "256-byte password"),
        (
            "user8multi".to_owned(),
            "éééé".to_owned(),
            "8 bytes in 4 characters",
        ),
    ];

    for (username, password, what) in &refused {
        // Act
        let reply = service.try_register(username, password).await;

        // Assert
        assert_eq!(reply.status, 422, "{what}: {}", reply.text);
        assert_problem(&reply, 422);
    }
    for (username, password, what) in &accepted {
        // Act
        let reply = service.try_register(username, password).await;

        // Assert
        assert_eq!(reply.status, 201, "{what}: {}", reply.text);
        service.login(username, password).await;
    }
}

/// A timeframe other than 1d, 7d, 30d or 90d is a 422 problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_timeframe_is_422() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;

    for timeframe in ["2d", "365d", "7D", "week", "-1d", "7d7d"] {
        // Act
        let reply = service
            .get(&format!("/api/business-metrics/{timeframe}"))
            .await;

        // Assert
        assert_eq!(reply.status, 422, "{timeframe}: {}", reply.text);
        assert_problem(&reply, 422);
    }
}

/// Malformed JSON, a wrong type and a missing field are 400 or 422 problems; the latter two
/// name the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_bodies_are_400_or_422_naming_the_field() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    let malformed: [(&str, &str); 4] = [
        ("/auth/register", r#"{"username": "x", "password": "#),
        ("/auth/login", "not json at all"),
        ("/auth/refresh", r#"{"refresh_token": "abc""#),
        ("/auth/register", ""),
    ];
    let wrong_type = [
        (
            "/auth/register",
            json!({"username": 5, "password": PASSWORD}),
            "username",
        ),
        (
            "/auth/register",
            json!({"username": "x", "password": ["a", "b"]}),
            "password",
        ),
        (
            "/auth/login",
            json!({"username": "x", "password": true}),
            "password",
        ),
        (
            "/auth/login",
            json!({"username": "x", "password": PASSWORD, "device": 7}),
            "device",
        ),
        (
            "/auth/refresh",
            json!({"refresh_token": 42}),
            "refresh_token",
        ),
    ];
    let missing = [
        ("/auth/register", json!({"username": "x"}), "password"),
        ("/auth/register", json!({"password": PASSWORD}), "username"),
        ("/auth/login", json!({"username": "x"}), "password"),
        ("/auth/login", json!({"password": PASSWORD}), "username"),
        ("/auth/refresh", json!({}), "refresh_token"),
    ];

    for (path, body) in malformed {
        // Act / Assert
        let reply = service.post_raw(path, body).await;
        assert_bad_body(&reply, None, &format!("{path} with {body:?}"));
    }
    for (path, body, field) in &wrong_type {
        let reply = service.post_json(path, body).await;
        assert_bad_body(&reply, Some(field), &format!("{path} with {body}"));
    }
    for (path, body, field) in &missing {
        let reply = service.post_json(path, body).await;
        assert_bad_body(&reply, Some(field), &format!("{path} with {body}"));
    }
}

/// After RATE_LIMIT_LOGIN_PER_MIN attempts for one username from one address, the next —
/// even with the right password — is a 429 with `Retry-After`; another username is not
/// affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn login_attempts_over_the_limit_are_429_with_retry_after() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("RATE_LIMIT_LOGIN_PER_MIN", "3")
        .start()
        .await;
    service.register("alice", PASSWORD).await;
    for attempt in 1..=3 {
        let reply = service.try_login("alice", "wrong password").await;
        assert_eq!(reply.status, 401, "attempt {attempt}: {}", reply.text);
        assert_eq!(reply.integer_header("ratelimit-limit"), 3);
    }

    // Act
    let limited = service.try_login("alice", PASSWORD).await;
    let other_user = service.try_login("nobody", "wrong password").await;

    // Assert
    assert_problem(&limited, 429);
    let retry_after = limited.integer_header("retry-after");
    assert!(
        (1..=60).contains(&retry_after),
        "Retry-After within the minute: {retry_after}"
    );
    assert_eq!(limited.integer_header("ratelimit-remaining"), 0);
    assert_problem(&other_user, 401);
}

/// RATE_LIMIT_AUTH_PER_MIN bounds the other `/auth/*` requests of one address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_requests_over_the_limit_are_429() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("RATE_LIMIT_AUTH_PER_MIN", "5")
        .start()
        .await;
    for attempt in 1..=5 {
        let reply = service.refresh("unknown-refresh-token").await;
        assert_eq!(reply.status, 401, "attempt {attempt}: {}", reply.text);
    }

    // Act
    let limited = service.refresh("unknown-refresh-token").await;

    // Assert
    assert_problem(&limited, 429);
    limited.integer_header("retry-after");
    assert_eq!(limited.integer_header("ratelimit-limit"), 5);
}

/// When Redis answers the login limiter's check with an error (the key holds a hash), the
/// limiter's failure policy decides: a 401 for a wrong password with the `RateLimit-*` headers,
/// not a 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_login_limit_check_is_decided_by_the_policy() {
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("RATE_LIMIT_LOGIN_PER_MIN", "3")
        .start()
        .await;
    attempt(&service, "203.0.113.7").await.assert_status(401);
    let mut admin = redis.admin();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*rl:login:*")
        .query(&mut admin)
        .unwrap();
    let _: u64 = redis::cmd("DEL").arg(&keys).query(&mut admin).unwrap();
    for key in &keys {
        let _: u64 = redis::cmd("HSET")
            .arg(key)
            .arg("f")
            .arg("v")
            .query(&mut admin)
            .unwrap();
    }

    let reply = attempt(&service, "203.0.113.7").await;

    assert_problem(&reply, 401);
    reply.integer_header("ratelimit-limit");
}

/// `X-Forwarded-For` doesn't buy a fresh budget unless TRUST_FORWARDED_FOR=true; then each
/// forwarded address has its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_when_trusted() {
    // Arrange
    let redis = RedisServer::start();
    let untrusting = Service::builder()
        .redis(&redis)
        .env("RATE_LIMIT_LOGIN_PER_MIN", "3")
        .start()
        .await;
    let trusting = Service::builder()
        .redis(&redis)
        .env("RATE_LIMIT_LOGIN_PER_MIN", "3")
        .env("TRUST_FORWARDED_FOR", "true")
        .start()
        .await;

    for service in [&untrusting, &trusting] {
        // Arrange: use up 203.0.113.1's budget.
        for _ in 0..3 {
            attempt(service, "203.0.113.1").await.assert_status(401);
        }
        attempt(service, "203.0.113.1").await.assert_status(429);
    }

    // Act
    let spoofed = attempt(&untrusting, "203.0.113.2").await;
    let forwarded = attempt(&trusting, "203.0.113.2").await;

    // Assert
    assert_problem(&spoofed, 429);
    assert_problem(&forwarded, 401);
}

/// A failed login claiming to come from `client_address`.
async fn attempt(service: &Service, client_address: &str) -> Reply {
    let request = service
        .request(Method::POST, "/auth/login")
        .header("x-forwarded-for", client_address)
        .json(&json!({"username": "alice", "password": "wrong password"}));
    service.send(request).await
}

/// Every answer of an `/auth/*` route carries `RateLimit-Limit`, `RateLimit-Remaining` and
/// `RateLimit-Reset`, successes and errors alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_auth_answer_carries_the_ratelimit_headers() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    let mut replies = Vec::new();

    // Act: one request of each kind, keeping every answer.
    replies.push((
        "register 201",
        service.try_register("alice", PASSWORD).await,
    ));
    replies.push((
        "register 409",
        service.try_register("alice", PASSWORD).await,
    ));
    replies.push(("register 422", service.try_register("a b", PASSWORD).await));
    replies.push((
        "register malformed",
        service.post_raw("/auth/register", "{").await,
    ));
    replies.push((
        "register 413",
        service
            .post_raw("/auth/register", "x".repeat(BODY_LIMIT + 1))
            .await,
    ));
    replies.push(("login 401", service.try_login("alice", "wrong pass").await));
    let login = service.try_login("alice", PASSWORD).await;
    let pair = support::TokenPair::from_reply(&login);
    replies.push(("login 200", login));
    let refreshed = service.refresh(&pair.refresh_token).await;
    let pair = support::TokenPair::from_reply(&refreshed);
    replies.push(("refresh 200", refreshed));
    replies.push(("refresh 401", service.refresh("nope").await));
    replies.push((
        "sessions 200",
        service.auth_get("/auth/sessions", &pair.access_token).await,
    ));
    replies.push(("sessions 401", service.get("/auth/sessions").await));
    replies.push((
        "delete 404",
        service
            .auth_delete("/auth/sessions/unknown", &pair.access_token)
            .await,
    ));
    replies.push((
        "logout 401",
        service.auth_post("/auth/logout", "not-a-token").await,
    ));
    replies.push((
        "logout-all 200",
        service
            .auth_post("/auth/logout-all", &pair.access_token)
            .await,
    ));
    // A known route with a method it does not take.
    for (method, path) in [
        (Method::GET, "/auth/register"),
        (Method::GET, "/auth/logout"),
        (Method::POST, "/auth/sessions"),
        (Method::PUT, "/auth/login"),
        (Method::GET, "/auth/login"),
    ] {
        let reply = service.send(service.request(method.clone(), path)).await;
        assert_problem(&reply, 405);
        replies.push(("405", reply));
    }

    // Assert
    for (what, reply) in &replies {
        for name in ["ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
            assert!(
                reply.header(name).is_some(),
                "{what} ({}) lacks {name}: {:?}",
                reply.status,
                reply.headers
            );
        }
        let limit = reply.integer_header("ratelimit-limit");
        let remaining = reply.integer_header("ratelimit-remaining");
        reply.integer_header("ratelimit-reset");
        assert!(
            limit >= 1 && remaining <= limit,
            "{what}: {remaining}/{limit}"
        );
    }
}

/// An unknown route is a 404 problem document; a known route with the wrong method is a 404 or
/// 405 problem document.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_are_problem_documents() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;

    // Act
    let unknown = service.get("/no/such/route").await;
    let unknown_api = service.get("/api/no-such-thing").await;
    let wrong_method = service.send(service.request(Method::DELETE, "/me")).await;

    // Assert
    assert_problem(&unknown, 404);
    assert_problem(&unknown_api, 404);
    let status = wrong_method.status.as_u16();
    assert!(status == 404 || status == 405, "{status}");
    assert_problem(&wrong_method, status);
}

/// A bad configuration value stops start-up with a non-zero exit and a message naming the
/// variable; production refuses to start without a real JWT secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_stops_start_up_naming_the_variable() {
    // Arrange
    let redis = RedisServer::start();
    let cases = [
        ("DEMO_COMPUTE_MS", Some("abc"), "development"),
        ("DEMO_CACHE_TTL_SECS", Some("0"), "development"),
        ("DEMO_STALE_SECS", Some("a minute"), "development"),
        ("ACCESS_TOKEN_TTL_SECS", Some("ten"), "development"),
        ("REFRESH_TOKEN_TTL_SECS", Some("1.5"), "development"),
        ("RATE_LIMIT_LOGIN_PER_MIN", Some("-1"), "development"),
        ("RATE_LIMIT_AUTH_PER_MIN", Some("many"), "development"),
        ("TRUST_FORWARDED_FOR", Some("perhaps"), "development"),
        ("REDIS_COMMAND_TIMEOUT_MS", Some("soon"), "development"),
        ("JWT_SECRET", Some("too-short"), "production"),
        ("JWT_SECRET", None, "production"),
    ];

    for (name, value, environment) in cases {
        let mut builder = Service::builder()
            .redis(&redis)
            .env("ENVIRONMENT", environment);
        builder = match value {
            Some(value) => builder.env(name, value),
            None => builder.without(name),
        };

        // Act
        let (status, log) = builder.run_to_exit().await;

        // Assert
        assert!(
            !status.success(),
            "{name}={value:?} in {environment}: exit {status}"
        );
        assert!(
            log.contains(name),
            "{name}={value:?} in {environment}: the message must name {name}: {log}"
        );
    }
    assert!(SECRET.len() >= 32);
}
