//! The rediskit service: the HTTP API of `HTTP_API.md` over the rediskit library.
//!
//! [`app`] builds the router from an [`AppState`] (so tests can serve it), [`serve`] runs it with
//! graceful shutdown. The binary's `main` is thin: configuration → telemetry → [`serve`].
//!
//! ## Layout
//!
//! - `config` — [`ServiceConfig`]: the service's environment variables.
//! - `users` — accounts with argon2id password hashes, in Redis.
//! - `api` — the route handlers and their OpenAPI annotations.
//! - `error` — problem documents and the JSON extractor whose rejections are problem documents.
//! - `telemetry` — logs, Prometheus metrics, the request-tracking middleware.
//! - `openapi` — the generated OpenAPI 3 document.
//! - `bench` — `rediskit bench`: throughput and latency of the library against a real Redis.

pub mod api;
pub mod bench;
pub mod config;
pub mod error;
pub mod openapi;
pub mod telemetry;
pub mod users;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{Request, StatusCode};
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::{any, delete, get, post};
use metrics_exporter_prometheus::PrometheusHandle;
use rediskit::web::{AccessTokens, Auth, Problem, RateLimitLayer};
use rediskit::{Cache, Client, FailurePolicy, NearCacheConfig, Quota, RateLimiter, Sessions};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

pub use config::ServiceConfig;
pub use users::Users;

/// Largest request body accepted: 64 KiB.
pub const BODY_LIMIT: usize = 64 * 1024;
/// Namespace of the service's cache.
pub const CACHE_NAMESPACE: &str = "api";

/// Everything a handler may need. Every field is a cheap handle; cloning the state is cheap.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The Redis handle.
    pub client: Client,
    /// Access tokens and sessions.
    pub auth: Auth,
    /// Accounts.
    pub users: Users,
    /// The cache of computed results.
    pub cache: Cache,
    /// Login attempts per user name and address.
    pub login_limiter: RateLimiter,
    /// Other `/auth/*` requests per address.
    pub auth_limiter: RateLimiter,
    /// The configuration.
    pub config: std::sync::Arc<ServiceConfig>,
    /// The metrics recorder's handle.
    pub metrics: PrometheusHandle,
}

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

impl AppState {
    /// Builds the handles over `client`.
    pub fn new(client: Client, config: &ServiceConfig) -> rediskit::Result<Self> {
        let secret = config.jwt_secret.expose();
        let mut sessions = Sessions::builder(&client, secret).default_ttl(config.refresh_ttl);
        if config.revoke_wait_replicas > 0 {
            sessions = sessions.wait_for_replicas(config.revoke_wait_replicas, config.revoke_wait);
        }
        if config.near_cache_sessions {
            // The check every authenticated request makes; invalidated by Redis on any write to
            // the user's sessions, from any instance.
            sessions = sessions.near_cache(NearCacheConfig::default());
        }
        let sessions = sessions.build()?;
        let tokens = AccessTokens::with_ttl(secret, config.access_ttl)?;
        let minute = Duration::from_secs(60);
        Ok(Self {
            auth: Auth::new(tokens, sessions),
            users: Users::new(&client),
            cache: Cache::builder(&client)
                .namespace(CACHE_NAMESPACE)
                .stale_while_revalidate(config.demo_stale)
                .build()?,
            // Fail open: every limited route needs Redis anyway and answers 503 without it.
            login_limiter: RateLimiter::with_policy(
                &client,
                "login",
                Quota::new(config.login_per_min, minute),
                FailurePolicy::Open,
            )?,
            auth_limiter: RateLimiter::with_policy(
                &client,
                "auth",
                Quota::new(config.auth_per_min, minute),
                FailurePolicy::Open,
            )?,
            config: std::sync::Arc::new(config.clone()),
            metrics: telemetry::metrics_handle(),
            client,
        })
    }
}

/// `GET /health`: liveness, no Redis call.
#[utoipa::path(get, path = "/health", tag = "operations",
    responses((status = 200, description = "the process serves", body = serde_json::Value, example = json!({"status": "ok"}))))]
pub async fn health_doc() -> impl IntoResponse {
    rediskit::web::health().await
}

/// `GET /health/redis`: whether Redis answers, with latency and pool figures.
#[utoipa::path(get, path = "/health/redis", tag = "operations",
    responses(
        (status = 200, description = "Redis answers", body = serde_json::Value),
        (status = 503, description = "Redis does not answer", body = serde_json::Value),
    ))]
pub async fn redis_health_doc(state: State<Client>) -> impl IntoResponse {
    rediskit::web::redis_health(state).await
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text", body = String, content_type = "text/plain")))]
pub async fn metrics_doc(state: State<AppState>) -> impl IntoResponse {
    telemetry::render(state).await
}

async fn not_found() -> Problem {
    Problem::new(StatusCode::NOT_FOUND, "no such route; see /openapi.json")
}

pub(crate) async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "this route does not take that method; see /openapi.json",
    )
}

/// The whole HTTP API over `state`. Serve it with
/// `into_make_service_with_connect_info::<SocketAddr>()` so rate limits see client addresses.
pub fn app(state: AppState) -> Router {
    let limited = Router::new()
        .route("/auth/register", post(api::register))
        .route("/auth/refresh", post(api::refresh))
        .route("/auth/logout", post(api::logout))
        .route("/auth/logout-all", post(api::logout_all))
        .route("/auth/sessions", get(api::sessions))
        .route("/auth/sessions/{session_id}", delete(api::delete_session))
        // Any other path under /auth/ is a 404 of the limited routes, with their headers (the
        // fallback of the merged router lies outside the rate limit).
        .route("/auth/", any(not_found))
        .route("/auth/{*rest}", any(not_found))
        // Before the layer, so that a 405 passes through it too and carries the RateLimit-*
        // headers (set after it, on the merged router, it would replace the layered fallback).
        .method_not_allowed_fallback(method_not_allowed)
        // Inside the rate limit, so that its 413 carries the RateLimit-* headers too.
        .layer(middleware::from_fn(error::refuse_oversized))
        .layer(RateLimitLayer::new(
            state.auth_limiter.clone(),
            state.config.trust_forwarded_for,
        ));
    let open = Router::new()
        .route("/me", get(api::me))
        .route(
            "/api/business-metrics/{timeframe}",
            get(api::business_metrics),
        )
        .route("/health", get(health_doc))
        .route("/health/redis", get(redis_health_doc))
        .route("/metrics", get(metrics_doc))
        .route("/openapi.json", get(openapi::document))
        .layer(middleware::from_fn(error::refuse_oversized));
    Router::new()
        .merge(limited)
        .merge(open)
        // Login is limited inside its handler: the key includes the user name from the body.
        .route(
            "/auth/login",
            post(api::login).fallback(api::login_method_not_allowed),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(middleware::from_fn(telemetry::track))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let id = request
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                tracing::info_span!("request", method = %request.method(), uri = %request.uri().path(), request_id = %id)
            }),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

/// Connects as configured. In development without `REDIS_URL`, when the development server
/// does not answer, falls back to the embedded `memory://` backend and says so loudly; with a
/// configured Redis (or in production) it never falls back, and starts even while Redis is
/// down (answering 503 where Redis is needed until it returns).
pub async fn connect(config: &ServiceConfig) -> rediskit::Result<Client> {
    if !config.redis_configured {
        match Client::connect(config.redis.clone()).await {
            Ok(client) => return Ok(client),
            Err(err) if err.is_unavailable() => {
                tracing::warn!(
                    error = %err,
                    "NO REDIS: nothing answers at the development address and REDIS_URL is not \
                     set, so rediskit runs on the embedded memory:// backend. Data is kept in this \
                     process only and lost on restart; do not use this in production."
                );
                let mut memory = config.redis.clone();
                memory.url = "memory://".to_owned();
                return Client::connect(memory).await;
            }
            Err(err) => return Err(err),
        }
    }
    let client = Client::connect_lazy(config.redis.clone())?;
    let health = client.health().await;
    if !health.ok {
        tracing::warn!(
            url = %rediskit::redact_url(&config.redis.url),
            error = health.error.as_deref().unwrap_or_default(),
            "Redis does not answer yet; serving anyway (auth answers 503 until it does)"
        );
    }
    Ok(client)
}

/// Runs the service until SIGINT or SIGTERM, then stops accepting, lets requests in flight
/// finish, and closes Redis.
pub async fn serve(config: ServiceConfig) -> Result<(), String> {
    if config.jwt_secret_generated {
        tracing::warn!(
            "JWT_SECRET is not set: using a random one for this process (development only); \
             tokens will not survive a restart"
        );
    }
    let client = connect(&config).await.map_err(|err| err.to_string())?;
    match client.load_scripts().await {
        Ok(()) => {}
        Err(err) if err.is_unavailable() => {}
        Err(err) => tracing::warn!(error = %err, "could not preload scripts"),
    }
    let state = AppState::new(client.clone(), &config).map_err(|err| err.to_string())?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|err| format!("LISTEN_ADDR: cannot listen on {}: {err}", config.listen))?;
    tracing::info!(
        address = %config.listen,
        backend = client.backend().as_str(),
        environment = %config.redis.environment,
        "rediskit listening"
    );
    axum::serve(
        listener,
        app(state).into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .map_err(|err| format!("server error: {err}"))?;
    tracing::info!("shutting down: closing Redis");
    client.close().await;
    Ok(())
}

async fn shutdown_signal() {
    stop_signal().await;
    tracing::info!("signal received: finishing requests in flight");
}

/// Resolves on SIGINT or SIGTERM.
pub(crate) async fn stop_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
}
