//! The routes of HTTP_API.md.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{FromRequestParts, State};
use axum::http::header::USER_AGENT;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rediskit::web::{
    Authenticated, Problem, client_address_of, rate_limit_headers, too_many_requests,
};
use rediskit::{CacheStatus, ErrorKind, Issued, Session};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::AppState;
use crate::error::{ApiError, ApiJson, ApiPath, store_error};
use crate::users::UserError;

/// `POST /auth/register` body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RegisterBody {
    /// 1–64 characters of `A-Z a-z 0-9 _ . @ -`.
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_.@-]{1,64}$")]
    pub username: String,
    /// 8–256 bytes.
    #[schema(min_length = 8, max_length = 256)]
    pub password: String,
}

/// `POST /auth/login` body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginBody {
    /// The user name.
    pub username: String,
    /// The password.
    pub password: String,
    /// Free text naming the device, at most 128 characters; default: the `User-Agent`.
    #[serde(default)]
    #[schema(max_length = 128)]
    pub device: Option<String>,
}

/// `POST /auth/refresh` body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct RefreshBody {
    /// The refresh token of the last token pair.
    pub refresh_token: String,
}

/// A new user's id.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserIdBody {
    /// The id.
    pub user_id: String,
}

/// An access token and a refresh token.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenPair {
    /// JWT (HS256) for `Authorization: Bearer`.
    pub access_token: String,
    /// Opaque; use once with `/auth/refresh`.
    pub refresh_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds the access token lives.
    pub expires_in: u64,
    /// Seconds the refresh token lives.
    pub refresh_expires_in: u64,
    /// The session both belong to.
    pub session_id: String,
}

/// `GET /me`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MeBody {
    /// The user id.
    pub user_id: String,
    /// The user name.
    pub username: String,
    /// The session of the access token.
    pub session_id: String,
}

/// One session in `GET /auth/sessions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionView {
    /// The id.
    pub session_id: String,
    /// The device named at login.
    pub device: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339: the last refresh.
    pub last_used_at: String,
    /// RFC 3339: when it ends unless refreshed.
    pub expires_at: String,
    /// Whether the request's access token belongs to it.
    pub current: bool,
}

/// `GET /auth/sessions`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionsBody {
    /// Live sessions, oldest first.
    pub sessions: Vec<SessionView>,
}

/// `POST /auth/logout-all`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RevokedBody {
    /// How many sessions ended.
    pub revoked: u64,
}

/// An RFC 9457 problem document (`application/problem+json`).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemDoc {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// Summary of the kind of problem.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What was wrong with this request.
    pub detail: String,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

/// The client address, from the socket or (when trusted) `X-Forwarded-For`.
pub struct ClientIp(pub String);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let ip = client_address_of(
            &parts.headers,
            &parts.extensions,
            state.config.trust_forwarded_for,
        );
        Ok(Self(
            ip.map(|ip| ip.to_string())
                .unwrap_or_else(|| "unknown".into()),
        ))
    }
}

fn pair(state: &AppState, issued: Issued, username: &str) -> Result<TokenPair, ApiError> {
    let access_token = state
        .auth
        .tokens
        .issue(&issued.session, username)
        .map_err(store_error)?;
    let refresh_expires_in = issued
        .session
        .expires_at
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_secs();
    Ok(TokenPair {
        access_token,
        refresh_token: issued.token.into_string(),
        token_type: "Bearer",
        expires_in: state.auth.tokens.ttl().as_secs(),
        refresh_expires_in,
        session_id: issued.session.session_id,
    })
}

/// The user name kept in a session's metadata at login (access tokens carry it for `/me`).
fn username_of(session: &Session) -> String {
    session
        .metadata
        .as_ref()
        .and_then(|m| m.get("u"))
        .and_then(|u| u.as_str())
        .unwrap_or_default()
        .to_owned()
}

fn user_error(err: UserError) -> ApiError {
    match err {
        UserError::Invalid(detail) => Problem::new(StatusCode::UNPROCESSABLE_ENTITY, detail),
        UserError::Taken => Problem::new(StatusCode::CONFLICT, "this username is already taken"),
        UserError::WrongCredentials => Problem::unauthorized("wrong username or password"),
        UserError::Store(err) => store_error(err),
        UserError::Corrupted(why) => store_error(rediskit::Error::new(ErrorKind::Backend, why)),
        UserError::Busy => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many logins at once; try again shortly",
        )
        .with_retry_after(1),
    }
}

/// Register an account.
#[utoipa::path(post, path = "/auth/register", tag = "auth", request_body = RegisterBody,
    responses(
        (status = 201, description = "created", body = UserIdBody),
        (status = 400, description = "malformed JSON", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "body over 64 KiB", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "not JSON (Content-Type)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 409, description = "username taken", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "invalid username or password", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "too many requests", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Redis unavailable", body = ProblemDoc, content_type = "application/problem+json"),
    ))]
pub async fn register(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RegisterBody>,
) -> Result<(StatusCode, ApiJson<UserIdBody>), ApiError> {
    let user_id = state
        .users
        .register(&body.username, &body.password)
        .await
        .map_err(user_error)?;
    tracing::info!(%user_id, "user registered");
    Ok((StatusCode::CREATED, ApiJson(UserIdBody { user_id })))
}

/// Log in: a token pair for a new session.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = LoginBody,
    responses(
        (status = 200, description = "logged in", body = TokenPair),
        (status = 400, description = "malformed JSON", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "body over 64 KiB", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "not JSON (Content-Type)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "wrong username or password", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "a missing field or a wrong type", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "too many attempts", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Redis unavailable", body = ProblemDoc, content_type = "application/problem+json"),
    ))]
pub async fn login(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
    headers: HeaderMap,
    // `ApiJson`: a body over the limit, with or without a declared length, is read off before
    // its 413 (answered here, with the RateLimit-* headers, like every other answer).
    body: Result<ApiJson<LoginBody>, ApiError>,
) -> Response {
    // Limited per user name and address; a body without a name is limited per address. A name
    // no account can have shares one budget per address: it would fail anyway, and it is not
    // written into a key as it came (one over the key limit would have made this a 500).
    let username = match &body {
        Ok(ApiJson(body)) if crate::users::check_username(&body.username).is_ok() => {
            body.username.to_ascii_lowercase()
        }
        Ok(_) => INVALID_USERNAME.to_owned(),
        Err(_) => String::new(),
    };
    let decision = match login_check(&state, &format!("{username}|{ip}")).await {
        Ok(decision) => decision,
        Err(err) => return err.into_response(),
    };
    if !decision.allowed {
        return too_many_requests(&decision).into_response();
    }
    let mut response = match body {
        Ok(ApiJson(body)) => login_inner(&state, body, &headers).await.into_response(),
        Err(problem) => problem.into_response(),
    };
    response.headers_mut().extend(rate_limit_headers(&decision));
    response
}

/// The login limiter's decision for `key`; when Redis answers the check with an error (a
/// permission, `MISCONF`), the limiter's failure policy, as [`rediskit::web::RateLimitLayer`]
/// does for the other routes.
async fn login_check(state: &AppState, key: &str) -> Result<rediskit::Decision, ApiError> {
    match state.login_limiter.check(key).await {
        Ok(decision) => Ok(decision),
        Err(err) if err.is_invalid_input() => Err(store_error(err)),
        Err(err) => {
            tracing::error!(error = %err, "login rate limit check failed; the failure policy decides");
            Ok(state.login_limiter.policy_decision())
        }
    }
}

/// What a login's rate-limit key holds in place of a name no account can have (see
/// [`crate::users::check_username`]); it is not one itself (`~` is not allowed in names).
const INVALID_USERNAME: &str = "~invalid";

/// `/auth/login` with a method other than POST: 405, limited per address like a login whose body
/// names no one, with the `RateLimit-*` headers every response of `/auth/*` carries.
pub async fn login_method_not_allowed(
    State(state): State<AppState>,
    ClientIp(ip): ClientIp,
) -> Response {
    let decision = match login_check(&state, &format!("|{ip}")).await {
        Ok(decision) => decision,
        Err(err) => return err.into_response(),
    };
    if !decision.allowed {
        return too_many_requests(&decision).into_response();
    }
    let mut response = crate::method_not_allowed().await.into_response();
    response.headers_mut().extend(rate_limit_headers(&decision));
    response
}

async fn login_inner(
    state: &AppState,
    body: LoginBody,
    headers: &HeaderMap,
) -> Result<ApiJson<TokenPair>, ApiError> {
    let device = match body.device {
        Some(device) if device.chars().count() > MAX_DEVICE_CHARS => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("device: must be at most {MAX_DEVICE_CHARS} characters"),
            ));
        }
        Some(device) => sanitize_device(&device),
        None => sanitize_device(
            headers
                .get(USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("unknown device"),
        ),
    };
    let user = state
        .users
        .verify(&body.username, &body.password)
        .await
        .map_err(user_error)?;
    let metadata = serde_json::json!({ "u": user.username });
    let issued = state
        .auth
        .sessions
        .create(
            &user.id,
            &device,
            Some(state.config.refresh_ttl),
            Some(&metadata),
        )
        .await
        .map_err(store_error)?;
    tracing::info!(user_id = %user.id, session_id = %issued.session.session_id, "login");
    Ok(ApiJson(pair(state, issued, &user.username)?))
}

/// The contract's limit on a device name. The library's is in bytes
/// ([`rediskit::MAX_DEVICE_LEN`], 512), enough for 128 characters of any kind.
pub const MAX_DEVICE_CHARS: usize = 128;

/// Control characters, bidirectional overrides and zero-width characters removed (a device name
/// is shown back to the user in their session list, where those could disguise it), then cut to
/// [`MAX_DEVICE_CHARS`] (only a `User-Agent` can be longer: a longer `device` is refused).
fn sanitize_device(text: &str) -> String {
    let invisible = |c: char| {
        c.is_control()
            || matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
    };
    text.chars()
        .filter(|&c| !invisible(c))
        .take(MAX_DEVICE_CHARS)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device names lose what could disguise them; 128 characters of any width are kept whole,
    /// and only a longer text (a `User-Agent`) is cut, at 128 characters.
    #[test]
    fn device_names_are_sanitized() {
        assert_eq!(
            sanitize_device("Fire\u{202E}fox\n on\u{200B} Linux"),
            "Firefox on Linux"
        );
        for c in ['é', '山', '🦀'] {
            let whole = c.to_string().repeat(MAX_DEVICE_CHARS);
            assert_eq!(sanitize_device(&whole), whole);
            assert!(whole.len() <= rediskit::MAX_DEVICE_LEN);
            assert_eq!(sanitize_device(&format!("{whole}{c}")), whole);
        }
    }
}

/// Exchange a refresh token for a new pair; the presented token stops working. Presenting an
/// already-rotated token revokes its whole session.
#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body = RefreshBody,
    responses(
        (status = 200, description = "a new token pair", body = TokenPair),
        (status = 400, description = "malformed JSON", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 413, description = "body over 64 KiB", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 415, description = "not JSON (Content-Type)", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 401, description = "unknown, expired, revoked or reused refresh token", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 422, description = "a missing field or a wrong type", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "too many requests", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Redis unavailable", body = ProblemDoc, content_type = "application/problem+json"),
    ))]
pub async fn refresh(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshBody>,
) -> Result<ApiJson<TokenPair>, ApiError> {
    match state
        .auth
        .sessions
        .rotate(&body.refresh_token, Some(state.config.refresh_ttl))
        .await
    {
        Ok(issued) => {
            let username = username_of(&issued.session);
            Ok(ApiJson(pair(&state, issued, &username)?))
        }
        Err(err) if err.is_unavailable() => Err(store_error(err)),
        Err(err) if err.kind() == ErrorKind::Reused => Err(Problem::unauthorized(
            "this refresh token was already used; its session has been revoked",
        )
        .with_internal(err)),
        Err(err) if err.kind() == ErrorKind::Backend => Err(store_error(err)),
        Err(err) => Err(
            Problem::unauthorized("the refresh token is unknown, expired or revoked")
                .with_internal(err),
        ),
    }
}

/// End this session.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 204, description = "logged out"),
        (status = 401, description = "not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "too many requests", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Redis unavailable", body = ProblemDoc, content_type = "application/problem+json"),
    ))]
pub async fn logout(
    State(state): State<AppState>,
    user: Authenticated,
) -> Result<StatusCode, ApiError> {
    state
        .auth
        .sessions
        .revoke(&user.claims.sub, &user.claims.sid)
        .await
        .map_err(store_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// End every session of the user.
#[utoipa::path(post, path = "/auth/logout-all", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "sessions ended", body = RevokedBody),
        (status = 401, description = "not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "too many requests", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Redis unavailable", body = ProblemDoc, content_type = "application/problem+json"),
    ))]
pub async fn logout_all(
    State(state): State<AppState>,
    user: Authenticated,
) -> Result<ApiJson<RevokedBody>, ApiError> {
    let revoked = state
        .auth
        .sessions
        .revoke_all(&user.claims.sub)
        .await
        .map_err(store_error)?;
    Ok(ApiJson(RevokedBody { revoked }))
}

/// The user's live sessions.
#[utoipa::path(get, path = "/auth/sessions", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "live sessions", body = SessionsBody),
        (status = 401, description = "not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "too many requests", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Redis unavailable", body = ProblemDoc, content_type = "application/problem+json"),
    ))]
pub async fn sessions(
    State(state): State<AppState>,
    user: Authenticated,
) -> Result<ApiJson<SessionsBody>, ApiError> {
    let sessions = state
        .auth
        .sessions
        .sessions(&user.claims.sub)
        .await
        .map_err(store_error)?;
    Ok(ApiJson(SessionsBody {
        sessions: sessions
            .into_iter()
            .map(|s| SessionView {
                current: s.session_id == user.claims.sid,
                session_id: s.session_id,
                device: s.device,
                created_at: rfc3339(s.created_at),
                last_used_at: rfc3339(s.last_used_at),
                expires_at: rfc3339(s.expires_at),
            })
            .collect(),
    }))
}

/// End one session of the user.
#[utoipa::path(delete, path = "/auth/sessions/{session_id}", tag = "auth", security(("bearer" = [])),
    params(("session_id" = String, Path, description = "a session id from GET /auth/sessions")),
    responses(
        (status = 204, description = "ended"),
        (status = 401, description = "not authenticated", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 404, description = "no such session of this user", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 429, description = "too many requests", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Redis unavailable", body = ProblemDoc, content_type = "application/problem+json"),
    ))]
pub async fn delete_session(
    State(state): State<AppState>,
    user: Authenticated,
    ApiPath(session_id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let revoked = state
        .auth
        .sessions
        .revoke(&user.claims.sub, &session_id)
        .await
        .map_err(store_error)?;
    if revoked {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(Problem::new(
            StatusCode::NOT_FOUND,
            "you have no live session with this id",
        ))
    }
}

/// Who the access token belongs to.
#[utoipa::path(get, path = "/me", tag = "auth", security(("bearer" = [])),
    responses(
        (status = 200, description = "the user", body = MeBody),
        (status = 401, description = "not authenticated or session ended", body = ProblemDoc, content_type = "application/problem+json"),
        (status = 503, description = "Redis unavailable", body = ProblemDoc, content_type = "application/problem+json"),
    ))]
pub async fn me(user: Authenticated) -> ApiJson<MeBody> {
    ApiJson(MeBody {
        user_id: user.claims.sub,
        username: user.claims.name,
        session_id: user.claims.sid,
    })
}

/// What the demo computation returns.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BusinessMetrics {
    /// The timeframe asked for.
    pub timeframe: String,
    /// When it was computed (unix ms).
    pub computed_at_ms: u64,
    /// Made-up figures.
    pub revenue: u64,
    /// Made-up figures.
    pub orders: u64,
    /// Made-up figures.
    pub active_users: u64,
}

/// Cache lifetime of the business metrics by default (`DEMO_CACHE_TTL_SECS`).
pub const METRICS_TTL: Duration = Duration::from_secs(crate::config::DEFAULT_DEMO_CACHE_TTL_SECS);

/// An expensive computation, cached (cache-aside, one computation per cold key in the fleet).
///
/// Fresh for `DEMO_CACHE_TTL_SECS` (600); for `DEMO_STALE_SECS` (60) after that the stored result
/// is still answered at once, as `X-Cache: STALE`, while one background task in the whole fleet
/// recomputes it (`Cache::try_get_or_set_background`): no request waits for a refresh.
#[utoipa::path(get, path = "/api/business-metrics/{timeframe}", tag = "cache",
    params(("timeframe" = String, Path, description = "one of 1d, 7d, 30d, 90d",
        pattern = "^(1d|7d|30d|90d)$")),
    responses(
        (status = 200, description = "the metrics. Header X-Cache: MISS on the request that ran the computation; HIT when served a stored or shared result; STALE when served a result past its TTL (within the stale window) while it is recomputed in the background", body = BusinessMetrics,
            headers(("X-Cache" = String, description = "MISS, HIT or STALE"))),
        (status = 422, description = "unknown timeframe", body = ProblemDoc, content_type = "application/problem+json"),
    ))]
pub async fn business_metrics(
    State(state): State<AppState>,
    ApiPath(timeframe): ApiPath<String>,
) -> Result<Response, ApiError> {
    let days: u64 = match timeframe.as_str() {
        "1d" => 1,
        "7d" => 7,
        "30d" => 30,
        "90d" => 90,
        _ => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "timeframe: must be one of 1d, 7d, 30d, 90d",
            ));
        }
    };
    let cost = state.config.demo_compute;
    let key = format!("business_metrics:{timeframe}");
    let lookup = state
        .cache
        .try_get_or_set_background(
            &key,
            state.config.demo_cache_ttl,
            // Owns what it uses: a stale result's refresh runs in a task of its own.
            move || async move {
                metrics::counter!("demo_computations_total").increment(1);
                tokio::time::sleep(cost).await;
                let computed_at_ms = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_millis() as u64)
                    .unwrap_or_default();
                Ok::<_, rediskit::Error>(BusinessMetrics {
                    timeframe,
                    computed_at_ms,
                    revenue: 12_345 * days,
                    orders: 321 * days,
                    active_users: 1_000 + 37 * days,
                })
            },
        )
        .await
        .map_err(store_error)?;
    let status = match lookup.status {
        CacheStatus::Miss => "MISS",
        CacheStatus::Stale => "STALE",
        _ => "HIT",
    };
    let mut response = ApiJson(lookup.value).into_response();
    response
        .headers_mut()
        .insert("x-cache", HeaderValue::from_static(status));
    Ok(response)
}
