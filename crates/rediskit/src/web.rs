//! axum integration (feature `axum`): what a web back end needs from rediskit in a few lines.
//!
//! - [`AccessTokens`]: short-lived JWT access tokens (HS256) bound to a session.
//! - [`Authenticated`]: an extractor that verifies the bearer token **and** checks that its
//!   session is still live, so a logout ends access at once. Its state comes from your app state
//!   through [`FromRef`]: implement `FromRef<YourState> for Auth`.
//! - [`health_router`]: `GET /health` (liveness) and `GET /health/redis`.
//! - [`RateLimitLayer`]: a tower layer that limits per client address and adds the
//!   `RateLimit-Limit` / `RateLimit-Remaining` / `RateLimit-Reset` headers to every response.
//! - [`Problem`]: an RFC 9457 problem document, the error body of all of the above.
//!
//! ```no_run
//! use axum::{Router, extract::FromRef, routing::get};
//! use rediskit::web::{AccessTokens, Auth, Authenticated, health_router};
//! use rediskit::{Client, Config, Sessions};
//!
//! #[derive(Clone)]
//! struct AppState { client: Client, auth: Auth }
//! impl FromRef<AppState> for Client { fn from_ref(s: &AppState) -> Client { s.client.clone() } }
//! impl FromRef<AppState> for Auth { fn from_ref(s: &AppState) -> Auth { s.auth.clone() } }
//!
//! async fn me(user: Authenticated) -> String { format!("hello {}", user.claims.sub) }
//!
//! # async fn run() -> rediskit::Result<()> {
//! let client = Client::connect(Config::from_env()?).await?;
//! let secret = "a secret of at least thirty-two bytes!";
//! let auth = Auth::new(AccessTokens::new(secret)?, Sessions::new(&client, secret)?);
//! let app: Router = Router::new()
//!     .route("/me", get(me))
//!     .merge(health_router())
//!     .with_state(AppState { client, auth });
//! # Ok(()) }
//! ```

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::{ConnectInfo, FromRef, FromRequestParts, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName, HeaderValue, RETRY_AFTER};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::client::Client;
use crate::error::{Error, ErrorKind, Result};
use crate::ratelimit::{Decision, RateLimiter};
use crate::tokens::{MIN_SECRET_LEN, Session, Sessions};

/// Lifetime of an access token unless configured otherwise: 15 minutes.
pub const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(15 * 60);

/// An RFC 9457 problem document (`application/problem+json`).
///
/// `detail` is for a person and must say what was wrong; never put internal error text in it.
/// Internal details go in [`Problem::with_internal`], which the response carries as an extension
/// ([`InternalError`]) for logging middleware to log once — they are not serialized.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[non_exhaustive]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short summary of the kind of problem.
    pub title: &'static str,
    /// The HTTP status.
    pub status: u16,
    /// What was wrong with this request.
    pub detail: String,
    /// Seconds to wait before retrying (sent as `Retry-After`), for 429 and 503.
    #[serde(skip)]
    pub retry_after: Option<u64>,
    /// Extra headers (rate-limit figures).
    #[serde(skip)]
    pub headers: Option<Box<HeaderMap>>,
    /// What went wrong inside, for the logs only.
    #[serde(skip)]
    pub internal: Option<Box<str>>,
}

/// The internal cause of an error response, attached as a response extension for logging.
#[derive(Debug, Clone)]
pub struct InternalError(pub String);

impl Problem {
    /// A problem with `status`, a title from the status, and `detail`.
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        let title = status.canonical_reason().unwrap_or("Error");
        let slug = title.to_ascii_lowercase().replace([' ', '\''], "-");
        Self {
            kind: format!("urn:rediskit:problem:{slug}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            retry_after: None,
            headers: None,
            internal: None,
        }
    }

    /// Adds `Retry-After`.
    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds.max(1));
        self
    }

    /// Adds the internal cause, for the logs.
    pub fn with_internal(mut self, internal: impl std::fmt::Display) -> Self {
        self.internal = Some(internal.to_string().into_boxed_str());
        self
    }

    /// Adds headers to the response.
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers.get_or_insert_default().extend(headers);
        self
    }

    /// 401 with `detail`.
    pub fn unauthorized(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, detail)
    }

    /// 503 "Redis is unavailable", with `Retry-After`.
    pub fn unavailable(cause: &Error) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the session store is temporarily unavailable; try again shortly",
        )
        .with_retry_after(1)
        .with_internal(cause)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(&self)).into_response();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(seconds) = self.retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(extra) = self.headers {
            headers.extend(*extra);
        }
        if let Some(internal) = self.internal {
            response
                .extensions_mut()
                .insert(InternalError(internal.into()));
        }
        response
    }
}

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The session id the token belongs to.
    pub sid: String,
    /// The user name, for display.
    #[serde(default)]
    pub name: String,
    /// Issued at (unix seconds).
    pub iat: u64,
    /// Not before (unix seconds).
    pub nbf: u64,
    /// Expires at (unix seconds).
    pub exp: u64,
    /// A unique id of this token.
    pub jti: String,
}

/// Seconds before its issue that an access token is valid from (its `nbf`): another instance
/// whose clock runs up to this much behind the issuer's accepts a token at once, where a `nbf` of
/// the issue second would refuse it for as long as the clocks differ. Expiry keeps no leeway.
pub const NOT_BEFORE_SKEW: u64 = 5;

/// Issues and verifies HS256 access tokens. Cheap to clone.
#[derive(Clone)]
pub struct AccessTokens {
    inner: Arc<AccessInner>,
}

struct AccessInner {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
}

impl std::fmt::Debug for AccessTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessTokens")
            .field("algorithm", &"HS256")
            .field("ttl", &self.inner.ttl)
            .finish_non_exhaustive()
    }
}

impl AccessTokens {
    /// Tokens signed with `secret` (at least 32 bytes), living [`DEFAULT_ACCESS_TTL`].
    pub fn new(secret: &str) -> Result<Self> {
        Self::with_ttl(secret, DEFAULT_ACCESS_TTL)
    }

    /// Tokens signed with `secret` (at least 32 bytes), living `ttl`.
    pub fn with_ttl(secret: &str, ttl: Duration) -> Result<Self> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(Error::config(format!(
                "the access-token secret must be at least {MIN_SECRET_LEN} bytes, got {}",
                secret.len()
            )));
        }
        if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(86_400) {
            return Err(Error::config(format!(
                "access-token lifetime must be between 1 s and 24 h, got {ttl:?}"
            )));
        }
        // Only HS256: a token claiming `none` or any other algorithm is rejected.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "nbf", "sub"]);
        Ok(Self {
            inner: Arc::new(AccessInner {
                encoding: EncodingKey::from_secret(secret.as_bytes()),
                decoding: DecodingKey::from_secret(secret.as_bytes()),
                validation,
                ttl,
            }),
        })
    }

    /// The lifetime of issued tokens.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// A token for `session`, held by user `username`. It is valid from [`NOT_BEFORE_SKEW`]
    /// seconds before it was issued, for instances whose clocks run a little behind this one's.
    pub fn issue(&self, session: &Session, username: &str) -> Result<String> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default();
        let mut jti = [0u8; 12];
        rand::rng().fill_bytes(&mut jti);
        let claims = Claims {
            sub: session.user_id.clone(),
            sid: session.session_id.clone(),
            name: username.to_owned(),
            iat: now,
            nbf: now.saturating_sub(NOT_BEFORE_SKEW),
            exp: now + self.inner.ttl.as_secs(),
            jti: jti.iter().map(|b| format!("{b:02x}")).collect(),
        };
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.inner.encoding,
        )
        .map_err(|err| Error::new(ErrorKind::InvalidInput, format!("cannot sign token: {err}")))
    }

    /// The claims of a valid token: right signature and algorithm, not expired, not early, with
    /// a session id.
    pub fn verify(&self, token: &str) -> Result<Claims> {
        let data =
            jsonwebtoken::decode::<Claims>(token, &self.inner.decoding, &self.inner.validation)
                .map_err(|err| {
                    Error::new(ErrorKind::NotFound, format!("invalid access token: {err}"))
                })?;
        if data.claims.sid.is_empty() {
            return Err(Error::new(
                ErrorKind::NotFound,
                "access token without a session",
            ));
        }
        Ok(data.claims)
    }
}

/// What [`Authenticated`] needs: access-token verification and the session store. Put it in your
/// state and implement `FromRef<YourState> for Auth`. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Auth {
    /// Verifies access tokens.
    pub tokens: AccessTokens,
    /// Checks that their sessions are live.
    pub sessions: Sessions,
}

impl Auth {
    /// Bundles the two.
    pub fn new(tokens: AccessTokens, sessions: Sessions) -> Self {
        Self { tokens, sessions }
    }

    /// Verifies a bearer token and checks that its session is live — the check every protected
    /// request makes. With [`Sessions`] built with
    /// [`near_cache`](crate::SessionsBuilder::near_cache), the liveness answer comes from process
    /// memory until Redis reports a write to the user's sessions (from any instance), so a
    /// logout still ends access at once.
    pub async fn authenticate(&self, token: &str) -> Result<Claims> {
        let claims = self.tokens.verify(token)?;
        match self.sessions.session(&claims.sub, &claims.sid).await? {
            Some(_) => Ok(claims),
            None => Err(Error::new(
                ErrorKind::NotFound,
                "the session of this access token has ended",
            )),
        }
    }
}

/// An authenticated request: a valid access token whose session is live.
///
/// Rejections are problem documents: 401 when the `Authorization: Bearer` header is missing or
/// the token is invalid, expired or its session revoked; 503 when Redis can't say.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// The token's claims.
    pub claims: Claims,
}

/// Why [`Authenticated`] refused a request.
#[derive(Debug)]
#[non_exhaustive]
pub enum AuthRejection {
    /// No `Authorization: Bearer <token>` header.
    Missing,
    /// The token is invalid, expired, or its session has ended.
    Invalid(Error),
    /// Redis could not confirm the session: unavailable, or it answered an error.
    Unavailable(Error),
}

impl IntoResponse for AuthRejection {
    fn into_response(self) -> Response {
        let problem = match self {
            AuthRejection::Missing => Problem::unauthorized(
                "missing `Authorization: Bearer <access token>` header; log in to get a token",
            ),
            AuthRejection::Invalid(err) => Problem::unauthorized(
                "the access token is invalid or expired, or its session has ended",
            )
            .with_internal(err),
            AuthRejection::Unavailable(err) => Problem::unavailable(&err),
        };
        let mut response = problem.into_response();
        response.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        response
    }
}

/// The bearer token of a request, if it has one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

impl<S> FromRequestParts<S> for Authenticated
where
    S: Send + Sync,
    Auth: FromRef<S>,
{
    type Rejection = AuthRejection;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let token = bearer_token(&parts.headers).ok_or(AuthRejection::Missing)?;
        let auth = Auth::from_ref(state);
        match auth.authenticate(token).await {
            Ok(claims) => Ok(Self { claims }),
            // What says the token is no good. Anything else (Redis answering an error such as
            // `NOPERM` after an ACL change) means the session could not be checked: 401 would
            // tell every client to throw its tokens away for a fault of the server's.
            Err(err)
                if matches!(
                    err.kind(),
                    ErrorKind::NotFound
                        | ErrorKind::Expired
                        | ErrorKind::InvalidInput
                        | ErrorKind::Reused
                ) =>
            {
                Err(AuthRejection::Invalid(err))
            }
            Err(err) => Err(AuthRejection::Unavailable(err)),
        }
    }
}

/// The body of `GET /health/redis`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[non_exhaustive]
pub struct RedisHealth {
    /// `healthy` or `unhealthy`.
    pub status: String,
    /// Whether Redis answered.
    pub redis_connected: bool,
    /// `redis` or `memory`.
    pub backend: String,
    /// Round trip of the health `PING`, when it answered.
    pub latency_ms: Option<f64>,
    /// Connection figures.
    pub pool: PoolFigures,
    /// The circuit breaker: `closed`, `open` (failing fast) or `half_open` (probing).
    pub breaker: String,
    /// When this was measured, RFC 3339.
    pub timestamp: String,
}

/// Connection figures of [`RedisHealth`].
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolFigures {
    /// Connections kept.
    pub max: usize,
    /// Connections with commands in flight.
    pub in_use: usize,
    /// Connections without.
    pub idle: usize,
}

impl RedisHealth {
    /// Measures `client`'s health now.
    pub async fn measure(client: &Client) -> Self {
        let health = client.health().await;
        Self {
            status: if health.ok { "healthy" } else { "unhealthy" }.to_owned(),
            redis_connected: health.ok,
            backend: health.backend.as_str().to_owned(),
            latency_ms: health.latency.map(|l| l.as_secs_f64() * 1000.0),
            pool: PoolFigures {
                max: health.pool.max,
                in_use: health.pool.in_use,
                idle: health.pool.idle,
            },
            breaker: health.breaker.as_str().to_owned(),
            timestamp: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        }
    }
}

/// `GET /health`: 200 `{"status":"ok"}` while the process serves; no Redis call.
pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

/// `GET /health/redis`: 200 when Redis answers, 503 when not, with [`RedisHealth`].
pub async fn redis_health(State(client): State<Client>) -> (StatusCode, Json<RedisHealth>) {
    let health = RedisHealth::measure(&client).await;
    let status = if health.redis_connected {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health))
}

/// A router with `GET /health` and `GET /health/redis`, for any state holding a [`Client`].
pub fn health_router<S>() -> axum::Router<S>
where
    S: Clone + Send + Sync + 'static,
    Client: FromRef<S>,
{
    axum::Router::new()
        .route("/health", get(health))
        .route("/health/redis", get(redis_health))
}

/// The `RateLimit-*` headers of a decision (`Retry-After` too when refused).
pub fn rate_limit_headers(decision: &Decision) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let ceil_secs = |d: Duration| d.as_secs() + u64::from(d.subsec_nanos() > 0);
    headers.insert(
        HeaderName::from_static("ratelimit-limit"),
        HeaderValue::from(decision.limit),
    );
    headers.insert(
        HeaderName::from_static("ratelimit-remaining"),
        HeaderValue::from(decision.remaining),
    );
    headers.insert(
        HeaderName::from_static("ratelimit-reset"),
        HeaderValue::from(ceil_secs(decision.reset_after)),
    );
    if let Some(retry) = decision.retry_after {
        headers.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(retry).max(1)));
    }
    headers
}

/// The 429 answer for a refused decision.
pub fn too_many_requests(decision: &Decision) -> Problem {
    let retry = decision
        .retry_after
        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .unwrap_or(1);
    Problem::new(
        StatusCode::TOO_MANY_REQUESTS,
        format!("too many requests; try again in {retry} s"),
    )
    .with_retry_after(retry)
    .with_headers(rate_limit_headers(decision))
}

/// The client address of a request: the socket peer (from axum's `ConnectInfo`), or, when
/// `trust_forwarded_for` (only behind a proxy you control), the last `X-Forwarded-For` entry.
///
/// The last entry is the one your proxy appended: the address it saw. Entries before it are
/// whatever the client sent, so the first one would let every request pick its own address (and
/// its own rate-limit budget). Behind a chain of proxies, the last one must overwrite the header
/// or the budget is per inner proxy.
pub fn client_address<B>(request: &Request<B>, trust_forwarded_for: bool) -> Option<IpAddr> {
    client_address_of(request.headers(), request.extensions(), trust_forwarded_for)
}

/// [`client_address`] from the parts of a request.
pub fn client_address_of(
    headers: &HeaderMap,
    extensions: &axum::http::Extensions,
    trust_forwarded_for: bool,
) -> Option<IpAddr> {
    if trust_forwarded_for
        && let Some(ip) = headers
            .get_all("x-forwarded-for")
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(forwarded_address)
    {
        return Some(ip);
    }
    extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
}

/// The address of an `X-Forwarded-For` entry: `203.0.113.5`, `2001:db8::1`, or with the port
/// some load balancers append, `203.0.113.5:41234` and `[2001:db8::1]:41234`.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|addr| addr.ip()))
        .or_else(|| entry.strip_prefix('[')?.strip_suffix(']')?.parse().ok())
}

/// A tower layer limiting requests per client address with a [`RateLimiter`], adding the
/// `RateLimit-*` headers to every response it passes and answering 429 (problem document,
/// `Retry-After`) to those it refuses.
///
/// Needs the server to be run with `into_make_service_with_connect_info::<SocketAddr>()` unless
/// `trust_forwarded_for` is set; requests with no address share one budget.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    limiter: RateLimiter,
    trust_forwarded_for: bool,
}

impl RateLimitLayer {
    /// Limits with `limiter`, keyed by client address.
    pub fn new(limiter: RateLimiter, trust_forwarded_for: bool) -> Self {
        Self {
            limiter,
            trust_forwarded_for,
        }
    }
}

impl<S> tower::Layer<S> for RateLimitLayer {
    type Service = RateLimitService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimitService {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`RateLimitLayer`].
#[derive(Clone, Debug)]
pub struct RateLimitService<S> {
    inner: S,
    layer: RateLimitLayer,
}

impl<S, B> tower::Service<Request<B>> for RateLimitService<S>
where
    S: tower::Service<Request<B>, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::result::Result<Response, S::Error>> + Send>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        // Take the service that was polled ready; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let key = client_address(&request, layer.trust_forwarded_for)
                .map(|ip| ip.to_string())
                .unwrap_or_else(|| "unknown".to_owned());
            let decision = match layer.limiter.check(&key).await {
                Ok(decision) => decision,
                // Redis answered an error (`NOPERM`, `MISCONF`, a key holding another type):
                // the limiter's failure policy decides, as when Redis is down; letting the
                // request through unlimited and without headers ignored a closed policy. (An
                // address is never invalid input.)
                Err(err) => {
                    tracing::error!(limiter = %layer.limiter.name(), error = %err,
                        "rate limit check failed; the failure policy decides");
                    layer.limiter.policy_decision()
                }
            };
            if !decision.allowed {
                return Ok(too_many_requests(&decision).into_response());
            }
            let mut response = inner.call(request).await?;
            response.headers_mut().extend(rate_limit_headers(&decision));
            Ok(response)
        })
    }
}
