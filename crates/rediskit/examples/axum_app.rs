//! An axum app on rediskit, each piece in a few lines: a cached endpoint (`Cache::get_or_set`), a
//! login that opens a session and issues an access token, a route behind `Authenticated` (a valid
//! token whose session is still live), a logout that ends access at once, the health router, and
//! a per-address `RateLimitLayer` that adds the `RateLimit-*` headers.
//!
//! Run: `cargo run -p rediskit --features axum --example axum_app` — it serves
//! http://127.0.0.1:3000 (`LISTEN_ADDR` to change) on the in-process `memory://` backend, or on a
//! Redis with `REDIS_URL=redis://localhost:6379/0`. Then:
//!
//! ```sh
//! curl -s 127.0.0.1:3000/health/redis
//! curl -si 127.0.0.1:3000/report/7d                  # slow the first time, then cached
//! T=$(curl -s -X POST 127.0.0.1:3000/login/alice | sed 's/.*"access_token":"\([^"]*\)".*/\1/')
//! curl -s 127.0.0.1:3000/me -H "authorization: Bearer $T"
//! curl -s -X POST 127.0.0.1:3000/logout -H "authorization: Bearer $T"
//! curl -si 127.0.0.1:3000/me -H "authorization: Bearer $T"   # 401: the session has ended
//! ```
//!
//! The login takes no password: this example is about the Redis side. The service in
//! `crates/rediskit-server` shows the whole thing (argon2id accounts, refresh, sessions).

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{FromRef, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use rediskit::web::{AccessTokens, Auth, Authenticated, Problem, RateLimitLayer, health_router};
use rediskit::{Cache, Client, Config, Quota, RateLimiter, Sessions, ttl};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The app's state: cheap handles, cloned into every request.
#[derive(Clone)]
struct AppState {
    client: Client,
    auth: Auth,
    cache: Cache,
}

// What `health_router` and `Authenticated` take from the state.
impl FromRef<AppState> for Client {
    fn from_ref(state: &AppState) -> Self {
        state.client.clone()
    }
}
impl FromRef<AppState> for Auth {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}

/// A library error as a problem document: 503 when Redis is down, else the caller's fault.
fn problem(err: rediskit::Error) -> Problem {
    if err.is_unavailable() {
        Problem::unavailable(&err)
    } else {
        Problem::new(StatusCode::BAD_REQUEST, "that request cannot be served").with_internal(err)
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct Report {
    timeframe: String,
    visitors: u64,
}

/// Cached for 5 minutes; concurrent requests for a cold timeframe compute it once.
async fn report(
    State(state): State<AppState>,
    Path(timeframe): Path<String>,
) -> Result<Json<Report>, Problem> {
    let key = format!("report:{timeframe}");
    let report = state
        .cache
        .get_or_set(&key, ttl::SHORT, || async {
            tokio::time::sleep(Duration::from_millis(300)).await; // the expensive part
            Report {
                visitors: 42 * timeframe.len() as u64,
                timeframe,
            }
        })
        .await
        .map_err(problem)?;
    Ok(Json(report))
}

/// Opens a session for `user` and returns an access token bound to it (and the refresh token).
async fn login(
    State(state): State<AppState>,
    Path(user): Path<String>,
) -> Result<Json<Value>, Problem> {
    let issued = state
        .auth
        .sessions
        .create(&user, "axum example", None, None)
        .await
        .map_err(problem)?;
    let access_token = state
        .auth
        .tokens
        .issue(&issued.session, &user)
        .map_err(problem)?;
    Ok(Json(
        json!({ "access_token": access_token, "refresh_token": issued.token.expose() }),
    ))
}

/// Only with a valid access token whose session is live.
async fn me(user: Authenticated) -> Json<Value> {
    Json(json!({ "user": user.claims.sub, "session": user.claims.sid }))
}

/// Ends the token's session: the same token gets 401 from now on.
async fn logout(State(state): State<AppState>, user: Authenticated) -> Result<StatusCode, Problem> {
    state
        .auth
        .sessions
        .revoke(&user.claims.sub, &user.claims.sid)
        .await
        .map_err(problem)?;
    Ok(StatusCode::NO_CONTENT)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let config = match std::env::var("REDIS_URL") {
        Ok(_) => Config::from_env()?,
        Err(_) => Config::builder().url("memory://").build()?,
    };
    let client = Client::connect(config).await?;
    // From your secret store in real life; at least 32 bytes.
    let secret = std::env::var("JWT_SECRET")
        .unwrap_or_else(|_| "example-secret-of-at-least-thirty-two-bytes".into());
    let auth = Auth::new(
        AccessTokens::new(&secret)?,
        Sessions::new(&client, secret.as_str())?,
    );
    let cache = Cache::builder(&client).namespace("axum-example").build()?;
    // 10 requests a second per client address, 20 at once from idle.
    let limiter = RateLimiter::new(
        &client,
        "axum-example",
        Quota::per_second(10).with_burst(10),
    )?;

    let app = Router::new()
        .route("/report/{timeframe}", get(report))
        .route("/login/{user}", post(login))
        .route("/me", get(me))
        .route("/logout", post(logout))
        .merge(health_router())
        .layer(RateLimitLayer::new(limiter, false))
        .with_state(AppState {
            client: client.clone(),
            auth,
            cache,
        });

    let addr = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!(
        "listening on http://{addr} ({} backend); Ctrl-C to stop",
        client.backend().as_str()
    );
    // With connect info, so the rate limit sees each client's address.
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await?;
    client.close().await;
    Ok(())
}
