//! Logs (tracing) and metrics (Prometheus text at `/metrics`).

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rediskit::web::InternalError;

use crate::AppState;

/// Structured logs to stderr, filtered by `RUST_LOG` (default `info`); JSON when
/// `LOG_FORMAT=json`.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("LOG_FORMAT").is_ok_and(|v| v == "json") {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// The process's metrics recorder, installed once.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ])
                .expect("static, non-empty buckets")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            handle
        })
        .clone()
}

/// Counts and times every request by route and status, and logs the internal cause of error
/// responses — once, here, never in the response body.
pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let response = next.run(request).await;
    let status = response.status();
    let elapsed = started.elapsed();
    metrics::counter!("http_requests_total",
        "method" => method, "route" => route.clone(), "status" => status.as_u16().to_string())
    .increment(1);
    metrics::histogram!("http_request_duration_seconds",
        "method" => method, "route" => route.clone())
    .record(elapsed.as_secs_f64());
    if let Some(InternalError(cause)) = response.extensions().get::<InternalError>() {
        if status.is_server_error() {
            tracing::warn!(%method, %route, status = status.as_u16(), cause, "request failed");
        } else {
            tracing::debug!(%method, %route, status = status.as_u16(), cause, "request refused");
        }
    }
    response
}

/// The method as a metric label: the standard ones by name, any other as `OTHER`. A series per
/// made-up method would let any client grow `/metrics` (and memory) without bound.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// `GET /metrics`: the recorder's series plus the library's counters, Prometheus text format.
pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    let client = state.client.stats();
    let cache = state.cache.stats();
    let sessions = state.auth.sessions.stats();
    let absolute = |name: &'static str, value: u64| metrics::counter!(name).absolute(value);
    absolute("cache_hits_total", cache.hits);
    absolute("cache_misses_total", cache.misses);
    absolute("cache_errors_total", cache.errors);
    absolute("cache_corrupt_total", cache.corrupt);
    absolute("cache_computations_total", cache.computations);
    absolute("cache_stale_hits_total", cache.stale_hits);
    absolute("sessions_created_total", sessions.created);
    absolute("sessions_rotated_total", sessions.rotated);
    absolute("sessions_revoked_total", sessions.revoked);
    absolute("sessions_reuse_detected_total", sessions.reuse_detected);
    absolute("sessions_coalesced_calls_total", sessions.coalesced_calls);
    absolute(
        "sessions_coalesced_operations_total",
        sessions.coalesced_operations,
    );
    absolute("redis_commands_total", client.commands);
    absolute("redis_command_errors_total", client.errors);
    absolute("redis_command_timeouts_total", client.timeouts);
    absolute("redis_breaker_trips_total", client.breaker_trips);
    absolute("redis_breaker_rejected_total", client.breaker_rejected);
    absolute("redis_pipelined_batches_total", client.pipelined_batches);
    absolute("redis_pipelined_commands_total", client.pipelined_commands);
    // Only the session check has a near-cache (unless NEAR_CACHE_SESSIONS=false); the label
    // leaves room for cache namespaces that opt in.
    let near = sessions.near;
    let labelled = |name: &'static str, value: u64| {
        metrics::counter!(name, "cache" => "sessions").absolute(value);
    };
    labelled("near_cache_hits_total", near.hits);
    labelled("near_cache_misses_total", near.misses);
    labelled("near_cache_invalidations_total", near.invalidations);
    labelled("near_cache_flushes_total", near.flushes);
    labelled("near_cache_races_total", near.races);
    labelled("near_cache_evictions_total", near.evictions);
    metrics::gauge!("near_cache_entries", "cache" => "sessions").set(near.entries as f64);
    metrics::gauge!("near_cache_serving", "cache" => "sessions")
        .set(f64::from(u8::from(near.serving)));
    metrics::gauge!("redis_breaker_open").set(f64::from(u8::from(
        client.breaker != rediskit::BreakerState::Closed,
    )));
    metrics::gauge!("redis_pool_connections").set(client.pool.max as f64);
    metrics::gauge!("redis_pool_in_use").set(client.pool.in_use as f64);
    metrics::gauge!("redis_commands_in_flight").set(client.in_flight as f64);
    for limiter in [&state.login_limiter, &state.auth_limiter] {
        let stats = limiter.stats();
        let name = limiter.name().to_owned();
        metrics::counter!("ratelimit_allowed_total", "limiter" => name.clone())
            .absolute(stats.allowed);
        metrics::counter!("ratelimit_rejected_total", "limiter" => name.clone())
            .absolute(stats.rejected);
        metrics::counter!("ratelimit_degraded_total", "limiter" => name.clone())
            .absolute(stats.degraded);
        metrics::counter!("ratelimit_coalesced_calls_total", "limiter" => name.clone())
            .absolute(stats.coalesced_calls);
        metrics::counter!("ratelimit_coalesced_decisions_total", "limiter" => name)
            .absolute(stats.coalesced_decisions);
    }
    let mut text = state.metrics.render();
    // The client's latency histogram is already bucketed; write it out directly.
    text.push_str("# HELP redis_command_duration_seconds Redis command round trips.\n");
    text.push_str("# TYPE redis_command_duration_seconds histogram\n");
    for (le, count) in rediskit::LATENCY_BUCKETS_US
        .iter()
        .zip(client.latency.buckets)
    {
        text.push_str(&format!(
            "redis_command_duration_seconds_bucket{{le=\"{}\"}} {count}\n",
            *le as f64 / 1e6
        ));
    }
    text.push_str(&format!(
        "redis_command_duration_seconds_bucket{{le=\"+Inf\"}} {}\nredis_command_duration_seconds_sum {}\nredis_command_duration_seconds_count {}\n",
        client.latency.count,
        client.latency.sum.as_secs_f64(),
        client.latency.count
    ));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
}
