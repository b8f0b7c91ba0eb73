//! The axum integration: extractor, health router, rate-limit layer, access-token checks.

#![cfg(feature = "axum")]
#![allow(clippy::unwrap_used)]

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Body;
use axum::extract::FromRef;
use axum::http::{Request, StatusCode};
use axum::response::Response;
use axum::routing::get;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rediskit::web::{
    AccessTokens, Auth, Authenticated, NOT_BEFORE_SKEW, RateLimitLayer, health_router,
};
use rediskit::{Client, Config, FailurePolicy, Quota, RateLimiter, Sessions};
use tower::ServiceExt;

const SECRET: &str = "web-test-secret-of-at-least-32-bytes!";

#[derive(Clone)]
struct AppState {
    client: Client,
    auth: Auth,
}

impl FromRef<AppState> for Client {
    fn from_ref(state: &AppState) -> Client {
        state.client.clone()
    }
}

impl FromRef<AppState> for Auth {
    fn from_ref(state: &AppState) -> Auth {
        state.auth.clone()
    }
}

async fn me(user: Authenticated) -> String {
    user.claims.sub
}

async fn setup() -> (Router, AppState) {
    setup_on("memory://").await
}

/// [`setup`] on the store at `url`.
async fn setup_on(url: &str) -> (Router, AppState) {
    let client = Client::connect(Config::builder().url(url).build().unwrap())
        .await
        .unwrap();
    let auth = Auth::new(
        AccessTokens::new(SECRET).unwrap(),
        Sessions::new(&client, SECRET).unwrap(),
    );
    let state = AppState { client, auth };
    let app = Router::new()
        .route("/me", get(me))
        .merge(health_router())
        .with_state(state.clone());
    (app, state)
}

async fn call(app: &Router, path: &str, token: Option<&str>) -> Response {
    let mut request = Request::get(path);
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    app.clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap()
}

async fn json(response: Response) -> serde_json::Value {
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

async fn assert_problem(response: Response, status: StatusCode) -> serde_json::Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body = json(response).await;
    assert_eq!(body["status"], status.as_u16());
    assert!(body["type"].is_string() && body["title"].is_string());
    assert!(!body["detail"].as_str().unwrap().is_empty());
    body
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A live session of "user-1".
async fn live_session(state: &AppState) -> rediskit::Issued {
    state
        .auth
        .sessions
        .create("user-1", "d", None, None)
        .await
        .unwrap()
}

/// A valid token of a live session passes; after the session is revoked the same token is
/// refused at once.
#[tokio::test]
async fn extractor_checks_the_session_is_live() {
    let (app, state) = setup().await;
    let issued = live_session(&state).await;
    let token = state.auth.tokens.issue(&issued.session, "alice").unwrap();
    let response = call(&app, "/me", Some(&token)).await;
    assert_eq!(response.status(), StatusCode::OK);
    state
        .auth
        .sessions
        .revoke("user-1", &issued.session.session_id)
        .await
        .unwrap();
    let response = call(&app, "/me", Some(&token)).await;
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_problem(response, StatusCode::UNAUTHORIZED).await;
}

/// A request without the header is told what is missing.
#[tokio::test]
async fn missing_header_says_what_to_send() {
    let (app, _) = setup().await;
    let body = assert_problem(call(&app, "/me", None).await, StatusCode::UNAUTHORIZED).await;
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer"),
        "{body}"
    );
}

/// `alg: none`, another algorithm, another key, a tampered payload, an expired or not-yet-valid
/// token, and one without `sid` are all 401.
#[tokio::test]
async fn forged_and_stale_tokens_are_refused() {
    let (app, state) = setup().await;
    let issued = live_session(&state).await;
    let sid = issued.session.session_id.clone();
    let claims = |iat: u64, nbf: u64, exp: u64, sid: &str| serde_json::json!({"sub": "user-1", "sid": sid, "name": "a", "iat": iat, "nbf": nbf, "exp": exp, "jti": "x"});
    let good = claims(now(), now(), now() + 600, &sid);
    let sign = |alg: Algorithm, key: &str, claims: &serde_json::Value| {
        jsonwebtoken::encode(
            &Header::new(alg),
            claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    // Sanity: a well-made token passes.
    assert_eq!(
        call(&app, "/me", Some(&sign(Algorithm::HS256, SECRET, &good)))
            .await
            .status(),
        StatusCode::OK
    );

    let none = format!(
        "{}.{}.",
        B64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        B64.encode(good.to_string())
    );
    let valid = sign(Algorithm::HS256, SECRET, &good);
    let mut parts: Vec<&str> = valid.split('.').collect();
    let tampered_payload = B64.encode(good.to_string().replace("user-1", "user-2"));
    parts[1] = &tampered_payload;
    let tampered = parts.join(".");
    let cases = [
        ("alg none", none),
        ("HS384", sign(Algorithm::HS384, SECRET, &good)),
        (
            "wrong key",
            sign(
                Algorithm::HS256,
                "another-secret-of-at-least-32-bytes",
                &good,
            ),
        ),
        ("tampered", tampered),
        (
            "expired",
            sign(
                Algorithm::HS256,
                SECRET,
                &claims(now() - 700, now() - 700, now() - 100, &sid),
            ),
        ),
        (
            "not yet valid",
            sign(
                Algorithm::HS256,
                SECRET,
                &claims(now(), now() + 300, now() + 600, &sid),
            ),
        ),
        (
            "no sid",
            sign(
                Algorithm::HS256,
                SECRET,
                &claims(now(), now(), now() + 600, ""),
            ),
        ),
        ("garbage", "not.a.jwt".to_owned()),
    ];
    for (name, token) in cases {
        let response = call(&app, "/me", Some(&token)).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{name}");
    }
}

/// When Redis can't confirm the session the answer is 503 with `Retry-After`, never 200.
#[tokio::test]
async fn unavailable_store_is_503() {
    let (app, state) = setup().await;
    let issued = live_session(&state).await;
    let token = state.auth.tokens.issue(&issued.session, "alice").unwrap();
    state.client.close().await;
    let response = call(&app, "/me", Some(&token)).await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
}

/// Redis answering an error to the session check (here `WRONGTYPE`; after an ACL change,
/// `NOPERM`) is the store failing, not the token: 503, never a 401 that tells the client to
/// throw its tokens away.
#[tokio::test]
async fn a_redis_error_in_the_session_check_is_503_not_401() {
    let server = rediskit_testkit::RedisServer::start();
    let (app, state) = setup_on(&server.url()).await;
    let issued = live_session(&state).await;
    let token = state.auth.tokens.issue(&issued.session, "alice").unwrap();
    assert_eq!(
        call(&app, "/me", Some(&token)).await.status(),
        StatusCode::OK
    );

    let _: () = redis::cmd("SET")
        .arg("rk:s:{user-1}")
        .arg("not a hash")
        .query(&mut server.admin())
        .unwrap();
    let response = call(&app, "/me", Some(&token)).await;
    assert_eq!(response.headers()["retry-after"], "1");
    assert_problem(response, StatusCode::SERVICE_UNAVAILABLE).await;
}

/// The health router: liveness always, Redis health with the contract's fields, 503 when down.
#[tokio::test]
async fn health_router_reports() {
    let (app, state) = setup().await;
    let response = call(&app, "/health", None).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(json(response).await, serde_json::json!({"status": "ok"}));
    let body = json(call(&app, "/health/redis", None).await).await;
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["redis_connected"], true);
    assert_eq!(body["backend"], "memory");
    assert!(body["latency_ms"].is_number());
    assert!(
        body["pool"]["max"].is_u64()
            && body["pool"]["in_use"].is_u64()
            && body["pool"]["idle"].is_u64()
    );
    assert!(humantime::parse_rfc3339(body["timestamp"].as_str().unwrap()).is_ok());
    state.client.close().await;
    let response = call(&app, "/health/redis", None).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(response).await["status"], "unhealthy");
}

/// A token issued by an instance whose clock runs a few seconds ahead is accepted at once: an
/// access token is valid from `NOT_BEFORE_SKEW` seconds before its issue.
#[tokio::test]
async fn a_token_from_an_instance_a_little_ahead_is_accepted() {
    let (app, state) = setup().await;
    let issued = live_session(&state).await;
    let token = state.auth.tokens.issue(&issued.session, "a").unwrap();
    let claims = state.auth.tokens.verify(&token).unwrap();
    assert_eq!(claims.nbf + NOT_BEFORE_SKEW, claims.iat);

    // As such an instance issues it, three seconds ahead of this one.
    let ahead = now() + 3;
    let claims = serde_json::json!({"sub": "user-1", "sid": issued.session.session_id,
        "name": "a", "iat": ahead, "nbf": ahead - NOT_BEFORE_SKEW, "exp": ahead + 600, "jti": "x"});
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        call(&app, "/me", Some(&token)).await.status(),
        StatusCode::OK
    );
}

/// The rate-limit layer adds the `RateLimit-*` headers to every response it passes and answers
/// 429 with `Retry-After` past the limit.
#[tokio::test]
async fn rate_limit_layer() {
    let (_, state) = setup().await;
    let limiter = RateLimiter::new(&state.client, "web", Quota::per_minute(2)).unwrap();
    let app: Router = Router::new()
        .route("/x", get(|| async { StatusCode::NOT_FOUND }))
        .layer(RateLimitLayer::new(limiter, true));
    let request = || {
        Request::get("/x")
            .header("x-forwarded-for", "203.0.113.5, 10.0.0.1")
            .body(Body::empty())
            .unwrap()
    };
    for remaining in ["1", "0"] {
        let response = app.clone().oneshot(request()).await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::NOT_FOUND,
            "whatever the status"
        );
        assert_eq!(response.headers()["ratelimit-limit"], "2");
        assert_eq!(response.headers()["ratelimit-remaining"], remaining);
        assert!(response.headers().contains_key("ratelimit-reset"));
    }
    let response = app.clone().oneshot(request()).await.unwrap();
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=30).contains(&retry), "{retry}");
    assert_eq!(response.headers()["ratelimit-remaining"], "0");
    assert_problem(response, StatusCode::TOO_MANY_REQUESTS).await;
    // Another address has its own budget.
    let other = Request::get("/x")
        .header("x-forwarded-for", "198.51.100.1")
        .body(Body::empty())
        .unwrap();
    assert_eq!(
        app.clone().oneshot(other).await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

/// When Redis answers the limiter's check with an error (here the caller's key holds a hash),
/// the layer lets the limiter's failure policy decide, with the `RateLimit-*` headers: a closed
/// limiter refuses, an open one lets through. (It let every request through, unlimited and
/// without headers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_applies_the_policy_when_redis_answers_an_error() {
    let server = rediskit_testkit::RedisServer::start();
    let client = Client::connect(Config::builder().url(server.url()).build().unwrap())
        .await
        .unwrap();
    for (name, policy, status) in [
        ("open", FailurePolicy::Open, StatusCode::OK),
        (
            "closed",
            FailurePolicy::Closed,
            StatusCode::TOO_MANY_REQUESTS,
        ),
    ] {
        let limiter =
            RateLimiter::with_policy(&client, name, Quota::per_minute(5), policy).unwrap();
        limiter.check("203.0.113.9").await.unwrap();
        let mut admin = server.admin();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("*rl:{name}:*"))
            .query(&mut admin)
            .unwrap();
        let _: u64 = redis::cmd("DEL").arg(&keys[0]).query(&mut admin).unwrap();
        let _: u64 = redis::cmd("HSET")
            .arg(&keys[0])
            .arg("f")
            .arg("v")
            .query(&mut admin)
            .unwrap();
        let app: Router = Router::new()
            .route("/x", get(|| async { StatusCode::OK }))
            .layer(RateLimitLayer::new(limiter.clone(), true));
        let request = Request::get("/x")
            .header("x-forwarded-for", "203.0.113.9")
            .body(Body::empty())
            .unwrap();

        let response = app.oneshot(request).await.unwrap();

        assert_eq!(response.status(), status, "{name}");
        assert!(response.headers().contains_key("ratelimit-limit"), "{name}");
        assert_eq!(limiter.stats().degraded, 1, "{name}");
    }
}

/// The client address behind a trusted proxy is the last `X-Forwarded-For` entry, the one the
/// proxy appended: what a client writes before it (or in an earlier header) buys no budget.
#[tokio::test]
async fn forwarded_for_is_the_entry_the_proxy_appended() {
    let (_, state) = setup().await;
    let limiter = RateLimiter::new(&state.client, "xff", Quota::per_minute(1)).unwrap();
    let app: Router = Router::new()
        .route("/x", get(|| async { StatusCode::OK }))
        .layer(RateLimitLayer::new(limiter, true));
    let request = |headers: &[&str]| {
        let mut request = Request::get("/x");
        for header in headers {
            request = request.header("x-forwarded-for", *header);
        }
        request.body(Body::empty()).unwrap()
    };
    let status = |headers: &'static [&'static str]| {
        let app = app.clone();
        async move { app.oneshot(request(headers)).await.unwrap().status() }
    };

    assert_eq!(status(&["203.0.113.5, 10.0.0.1"]).await, StatusCode::OK);
    // The same proxy-seen address, whatever the client put before it.
    assert_eq!(
        status(&["198.51.100.7, 10.0.0.1"]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        status(&["198.51.100.8", "10.0.0.1"]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another address seen by the proxy has its own budget.
    assert_eq!(status(&["203.0.113.5, 10.0.0.2"]).await, StatusCode::OK);
    // With the port some load balancers append, the address is the client's still: not the
    // proxy's own, which every such request would share.
    assert_eq!(status(&["10.0.0.3:41234"]).await, StatusCode::OK);
    assert_eq!(
        status(&["10.0.0.3:50000"]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(status(&["[2001:db8::1]:41234"]).await, StatusCode::OK);
    assert_eq!(
        status(&["[2001:db8::1]"]).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(status(&["10.0.0.4:1"]).await, StatusCode::OK);
}
