//! Refresh-token sessions (the original module's `TokenManager`, made correct).
//!
//! # Model
//!
//! A *session* is one login on one device. It holds one live refresh token at a time; every
//! [`rotate`](Sessions::rotate) replaces it. All the sessions of a user live in **one Redis hash**
//! (`{prefix}s:{<user>}`, the user id escaped inside a hash tag), one field per session, so that
//! every operation — create, rotate, revoke one, revoke all, list — is one script or one command
//! on one key: atomic, race-free, and runnable unchanged on Redis Cluster. The key expires with
//! the user's last live session (rounded up by at most a sixteenth of that session's life, so
//! most writes need not move it). Ended sessions are swept out in batches: by a creation at
//! every eighth record or at the cap, by a revoke, and by a rotation that ends its session.
//!
//! # Tokens
//!
//! A refresh token is `base64url(user id) "." base64url(v1 | session id | generation | expiry |
//! 256 random bits | MAC)`. The MAC (HMAC-SHA-256 truncated to 128 bits, keyed by a key derived
//! from the configured secret) proves the token was issued by us, so a forged or altered token is
//! rejected before Redis is asked. Redis stores only a keyed hash of the random part — never the
//! token. With a grace window, the secret of the next generation is derived from the current one
//! with the secret key, which is what lets the window hand two concurrent refreshes the same new
//! token without storing it; without one, each rotation draws a fresh secret.
//!
//! # Reuse detection
//!
//! A genuine token (valid MAC) of an older generation than the session's current one has already
//! been rotated: presenting it again means two parties hold the token. The whole session is
//! revoked and the caller gets [`ErrorKind::Reused`](crate::ErrorKind::Reused). Old tokens need
//! no storage of their own for this: the generation counter remembers them until the session
//! ends.
//!
//! One repeat is not reuse: the same rotation *command* arriving twice. A cluster connection
//! that loses its connection with a command in flight sends the command again, and the first
//! may have run. The script tells it apart by the new secret's hash it carries: already stored,
//! it is the same call (a fresh secret per call without a grace window), and it gets the rotated
//! session as the first did. With a grace window, a repeat within the window is answered like
//! any refresh in it, and one after it is reuse, as before. Instances sharing sessions must
//! share the grace setting: a token rotated without a window is not recognised by one with.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::Mac as _;
use rand::RngCore;

use crate::client::Client;
use crate::coalesce::Coalescer;
use crate::config::Secret;
use crate::error::{Error, ErrorKind, Result};
use crate::keys;
use crate::near::{self, NearCacheConfig, NearStats, NearStore};

/// Lifetime of a refresh token unless the caller says otherwise: 30 days.
pub const DEFAULT_REFRESH_TTL: Duration = Duration::from_secs(30 * 86_400);
/// Live sessions kept per user; creating one more evicts the oldest.
pub const DEFAULT_MAX_SESSIONS: usize = 100;
/// Shortest secret accepted for deriving token keys, in bytes.
pub const MIN_SECRET_LEN: usize = 32;
/// Longest user id accepted, in bytes.
pub const MAX_USER_ID_LEN: usize = 128;
/// Longest device description accepted, in bytes: 128 characters of up to 4 bytes each.
pub const MAX_DEVICE_LEN: usize = 512;
/// Longest metadata accepted, as JSON bytes.
pub const MAX_METADATA_LEN: usize = 1024;

const TOKEN_VERSION: u8 = 1;
pub(crate) const SID_LEN: usize = 12;
pub(crate) const RAND_LEN: usize = 32;
const MAC_LEN: usize = 16;
pub(crate) const HASH_LEN: usize = 16;
/// version + sid + generation + expiry + random + MAC
const TOKEN_BIN_LEN: usize = 1 + SID_LEN + 4 + 4 + RAND_LEN + MAC_LEN;
/// Longest token text we even try to parse.
const MAX_TOKEN_TEXT: usize = 512;

/// A refresh token. Its `Debug` does not show it; send it to the client and forget it.
#[derive(Clone, PartialEq, Eq)]
pub struct RefreshToken(String);

impl RefreshToken {
    /// The token text, for the client.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The token text, by value.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Debug for RefreshToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshToken(..)")
    }
}

/// One live session: one login on one device.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Session {
    /// Whose session it is.
    pub user_id: String,
    /// Its id (16 URL-safe characters), stable across rotations.
    pub session_id: String,
    /// Free text given at creation (e.g. from `User-Agent`).
    pub device: String,
    /// When it was created (second resolution).
    pub created_at: SystemTime,
    /// When its token was last rotated (or created).
    pub last_used_at: SystemTime,
    /// When it ends unless rotated (the inactivity limit may end it earlier).
    pub expires_at: SystemTime,
    /// Rotations so far.
    pub generation: u32,
    /// The JSON metadata given at creation, if any.
    pub metadata: Option<serde_json::Value>,
}

/// A new refresh token and the session it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Issued {
    /// The token to hand to the client.
    pub token: RefreshToken,
    /// The session.
    pub session: Session,
    /// How many of the user's oldest sessions were evicted to stay under the cap (create only).
    pub evicted: u32,
}

/// Counters since the store was built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SessionStats {
    /// Sessions created.
    pub created: u64,
    /// Tokens rotated (grace-window repeats included).
    pub rotated: u64,
    /// Sessions revoked by `revoke`, `revoke_all` or reuse.
    pub revoked: u64,
    /// Reused tokens detected (each revoked its session).
    pub reuse_detected: u64,
    /// The near-cache of [`Sessions::session`] (all zero unless built with
    /// [`SessionsBuilder::near_cache`]).
    pub near: NearStats,
    /// Script calls that carried several creations, rotations or revocations at once:
    /// concurrent callers' operations are coalesced into one `EVALSHA` when calls of their kind
    /// are already in flight (not on a Cluster, nor with
    /// [`Config::auto_pipeline`](crate::Config::auto_pipeline) off, nor for revocations that
    /// wait for replicas).
    pub coalesced_calls: u64,
    /// The operations those calls carried.
    pub coalesced_operations: u64,
}

/// Refresh-token sessions over a [`Client`]. Cloning is cheap (an [`Arc`]).
///
/// # Behavior
///
/// - **Fail closed.** When Redis is unavailable every operation returns an error for which
///   [`Error::is_unavailable`] is true — never "not found", never a session.
/// - **Atomic.** Each operation is one script (or one read) on the user's single hash: a
///   `revoke_all` racing `create`s and `rotate`s leaves no session that existed before it
///   returned; 100 concurrent rotations of one token produce exactly one new token (grace 0).
/// - **Coalesced under load.** When calls of their kind are already in flight, concurrent
///   `create`s (or `rotate`s, `revoke`s, `revoke_all`s) of different users leave as one script
///   call that runs each in turn and answers each caller alone
///   ([`SessionStats::coalesced_calls`]): the same results as one call each, for about a third
///   less of redis-server's work per operation.
/// - **No secret at rest.** Redis holds a keyed hash of each token's random part, nothing that
///   lets one rebuild a token.
/// - **Near-cache, if asked for.** Built with [`SessionsBuilder::near_cache`], the answers of
///   [`session`](Sessions::session) — the per-request "is this session live" check — are kept
///   in process memory until Redis reports any write to the user's hash (a create, rotation,
///   revocation or logout-all, from any process), the entry's maximum age, or the session's own
///   end; with the invalidation connection lost, every check goes to Redis until it is back.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    keys: TokenKeys,
    default_ttl: Duration,
    grace: Duration,
    max_sessions: usize,
    inactivity: Option<Duration>,
    /// Replicas that must acknowledge a revocation, and how long to wait for them.
    replicas: Option<(u32, Duration)>,
    created: AtomicU64,
    rotated: AtomicU64,
    revoked: AtomicU64,
    reuse_detected: AtomicU64,
    near: Option<Arc<NearStore>>,
    /// `session_create`, `session_rotate`, `session_revoke` and `session_revoke_all` calls,
    /// coalesced under load (revocations only when they need not wait for replicas).
    creates: Arc<Coalescer>,
    rotations: Arc<Coalescer>,
    revocations: Arc<Coalescer>,
    revocations_all: Arc<Coalescer>,
}

impl fmt::Debug for Sessions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sessions")
            .field("default_ttl", &self.inner.default_ttl)
            .field("grace", &self.inner.grace)
            .field("max_sessions", &self.inner.max_sessions)
            .field("inactivity", &self.inner.inactivity)
            .field("near_cache", &self.inner.near.is_some())
            .finish_non_exhaustive()
    }
}

/// Builds [`Sessions`]; see [`Sessions::builder`].
#[derive(Debug, Clone)]
pub struct SessionsBuilder {
    client: Client,
    secret: Secret,
    default_ttl: Duration,
    grace: Duration,
    max_sessions: usize,
    inactivity: Option<Duration>,
    replicas: Option<(u32, Duration)>,
    near: Option<NearCacheConfig>,
}

impl SessionsBuilder {
    /// Token lifetime when `create`/`rotate` get `None`. Default: [`DEFAULT_REFRESH_TTL`].
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// How long after a rotation the previous token may still be presented and get the same new
    /// token (for clients that refresh twice concurrently). Default: zero — a second use is
    /// always reuse. Whole seconds.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Live sessions per user; creating one more evicts the oldest. Default:
    /// [`DEFAULT_MAX_SESSIONS`].
    pub fn max_sessions(mut self, max: usize) -> Self {
        self.max_sessions = max;
        self
    }

    /// End a session that has not been rotated for this long. Default: off. Whole seconds.
    pub fn inactivity_timeout(mut self, timeout: Duration) -> Self {
        self.inactivity = Some(timeout);
        self
    }

    /// After a revocation (`revoke`, `revoke_all`), wait up to `timeout` until `replicas`
    /// replicas acknowledge it (`WAIT`), and fail with
    /// [`Unavailable`](crate::ErrorKind::Unavailable) if fewer do: the revocation is in effect
    /// on the primary, but a failover now could lose it, so the caller should retry it (it is
    /// idempotent). Redis replicates asynchronously; without this, a primary that dies just after
    /// a logout may be replaced by a replica that never saw it. `timeout` must be shorter than the
    /// client's command timeout. The revocation and its `WAIT` go as one pipeline on a
    /// connection of their own (opened on first use): `WAIT` counts only its own connection's
    /// writes, and holds that connection's other commands until it answers. Default: off.
    pub fn wait_for_replicas(mut self, replicas: u32, timeout: Duration) -> Self {
        self.replicas = Some((replicas, timeout));
        self
    }

    /// Keeps the answers of [`Sessions::session`] in process memory, invalidated by Redis as
    /// soon as anything writes the user's sessions (see [`NearCacheConfig`] and the
    /// [`Sessions`] docs). Behind Sentinel it tracks the primary the pool uses; it does nothing
    /// on the embedded `memory://` backend, nor on a Redis Cluster (for now, with a warning).
    /// Default: off.
    pub fn near_cache(mut self, config: NearCacheConfig) -> Self {
        self.near = Some(config);
        self
    }

    /// Validates and builds.
    pub fn build(self) -> Result<Sessions> {
        if self.secret.expose().len() < MIN_SECRET_LEN {
            return Err(Error::config(format!(
                "the session secret must be at least {MIN_SECRET_LEN} bytes, got {}",
                self.secret.expose().len()
            )));
        }
        check_ttl(self.default_ttl)?;
        if self.grace > Duration::from_secs(300) {
            return Err(Error::invalid("grace must be at most 300 s"));
        }
        if !(1..=10_000).contains(&self.max_sessions) {
            return Err(Error::invalid("max_sessions must be between 1 and 10000"));
        }
        if let Some(idle) = self.inactivity {
            check_ttl(idle)?;
        }
        if let Some((replicas, timeout)) = self.replicas {
            let deadline = self.client.config().command_timeout;
            if replicas == 0 || timeout.is_zero() || timeout >= deadline {
                return Err(Error::invalid(format!(
                    "wait_for_replicas: need at least 1 replica and a timeout between 1 ms and the \
                     command timeout ({deadline:?}), got {replicas} and {timeout:?}"
                )));
            }
        }
        if let Some(config) = &self.near {
            config.validate()?;
        }
        // Every user's hash starts with this, and only theirs: `{prefix}s:{<user>}`.
        let prefix = format!("{}s:{{", self.client.key_prefix());
        let near = self
            .near
            .and_then(|config| near::store_for(&self.client, prefix, config));
        let coalescer = |script, what| Coalescer::new(self.client.clone(), script, what);
        let creates = coalescer(&crate::scripts::SESSION_CREATE, "EVALSHA session_create");
        let rotations = coalescer(&crate::scripts::SESSION_ROTATE, "EVALSHA session_rotate");
        let revocations = coalescer(&crate::scripts::SESSION_REVOKE, "EVALSHA session_revoke");
        let revocations_all = coalescer(
            &crate::scripts::SESSION_REVOKE_ALL,
            "EVALSHA session_revoke_all",
        );
        Ok(Sessions {
            inner: Arc::new(Inner {
                keys: TokenKeys::derive(self.secret.expose().as_bytes()),
                client: self.client,
                default_ttl: self.default_ttl,
                grace: self.grace,
                max_sessions: self.max_sessions,
                inactivity: self.inactivity,
                replicas: self.replicas,
                created: AtomicU64::new(0),
                rotated: AtomicU64::new(0),
                revoked: AtomicU64::new(0),
                reuse_detected: AtomicU64::new(0),
                near,
                creates,
                rotations,
                revocations,
                revocations_all,
            }),
        })
    }
}

fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < Duration::from_secs(1) || ttl > Duration::from_secs(10 * 365 * 86_400) {
        return Err(Error::invalid(format!(
            "session lifetimes must be between 1 s and 10 years, got {ttl:?}"
        )));
    }
    Ok(())
}

/// Whole seconds, rounded up: a session never ends early.
fn secs_ceil(duration: Duration) -> u32 {
    let secs = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

impl Sessions {
    /// Sessions with the default settings; `secret` (at least 32 bytes) keys the token MACs and
    /// hashes. Changing it invalidates every refresh token.
    pub fn new(client: &Client, secret: impl Into<Secret>) -> Result<Self> {
        Self::builder(client, secret).build()
    }

    /// A builder for other settings.
    pub fn builder(client: &Client, secret: impl Into<Secret>) -> SessionsBuilder {
        SessionsBuilder {
            client: client.clone(),
            secret: secret.into(),
            default_ttl: DEFAULT_REFRESH_TTL,
            grace: Duration::ZERO,
            max_sessions: DEFAULT_MAX_SESSIONS,
            inactivity: None,
            replicas: None,
            near: None,
        }
    }

    /// Counters since this store was built.
    pub fn stats(&self) -> SessionStats {
        let i = &self.inner;
        let coalescers = [&i.creates, &i.rotations, &i.revocations, &i.revocations_all];
        let stats = coalescers.map(|coalescer| coalescer.stats());
        SessionStats {
            created: i.created.load(Ordering::Relaxed),
            rotated: i.rotated.load(Ordering::Relaxed),
            revoked: i.revoked.load(Ordering::Relaxed),
            reuse_detected: i.reuse_detected.load(Ordering::Relaxed),
            near: near::stats_of(i.near.as_ref()),
            coalesced_calls: stats.iter().map(|s| s.batches).sum(),
            coalesced_operations: stats.iter().map(|s| s.operations).sum(),
        }
    }

    fn user_key(&self, user: &str) -> Result<String> {
        check_user(user)?;
        Ok(keys::with_component(
            &[self.inner.client.key_prefix(), "s:{"],
            user,
            "}",
        ))
    }

    fn idle_secs(&self) -> u32 {
        self.inner.inactivity.map(secs_ceil).unwrap_or(0)
    }

    /// Starts a session for `user` on `device` and returns its first refresh token.
    ///
    /// `ttl` defaults to the store's (30 days). `metadata` is any JSON (at most 1 KiB) kept with
    /// the session. When the user already has `max_sessions` live sessions, the oldest are
    /// evicted ([`Issued::evicted`]).
    pub async fn create(
        &self,
        user: &str,
        device: &str,
        ttl: Option<Duration>,
        metadata: Option<&serde_json::Value>,
    ) -> Result<Issued> {
        let key = self.user_key(user)?;
        check_device(device)?;
        let ttl = ttl.unwrap_or(self.inner.default_ttl);
        check_ttl(ttl)?;
        let metadata = match metadata {
            Some(value) => {
                let bytes = serde_json::to_vec(value)
                    .map_err(|err| Error::invalid(format!("metadata: {err}")))?;
                if bytes.len() > MAX_METADATA_LEN {
                    return Err(Error::invalid(format!(
                        "metadata must be at most {MAX_METADATA_LEN} bytes of JSON, got {}",
                        bytes.len()
                    )));
                }
                bytes
            }
            None => Vec::new(),
        };
        let mut sid = [0u8; SID_LEN];
        let mut random = [0u8; RAND_LEN];
        rand::rng().fill_bytes(&mut sid);
        rand::rng().fill_bytes(&mut random);
        let sid_text = B64.encode(sid);
        let hash = self.inner.keys.secret_hash(&random);
        let args = CreateArgs {
            sid: &sid_text,
            hash: &hash,
            ttl: secs_ceil(ttl),
            idle: self.idle_secs(),
            max: self.inner.max_sessions as u32,
            device,
            metadata: &metadata,
        };
        let (now, expires, evicted) = match self.inner.client.memory()? {
            Some(memory) => memory.update_hash(&key, |map| engine::create(map, &args, unix_now())),
            None => {
                let _forget = self.forget(&key);
                let raw = self.inner.creates.run(key, args.sid, args.packed()).await?;
                created_reply(raw, args.ttl)?
            }
        };
        self.inner.created.fetch_add(1, Ordering::Relaxed);
        self.inner
            .revoked
            .fetch_add(u64::from(evicted), Ordering::Relaxed);
        let record = Record {
            generation: 0,
            hash,
            created: now,
            last_used: now,
            expires,
            rotated: now,
            device: device.to_owned(),
            metadata,
        };
        let token = self.inner.keys.encode(&TokenParts {
            user: user.to_owned(),
            sid,
            generation: 0,
            expires,
            random,
        });
        Ok(Issued {
            token,
            session: record.into_session(user, &sid_text),
            evicted,
        })
    }

    /// The session `token` belongs to, if the token is its current one.
    ///
    /// Read-only: an older (rotated) token is reported as [`ErrorKind::Reused`] but does not
    /// revoke anything here — [`rotate`](Sessions::rotate) does.
    pub async fn lookup(&self, token: &str) -> Result<Session> {
        let parts = self.inner.keys.decode(token)?;
        check_not_expired(&parts)?;
        let key = self.user_key(&parts.user)?;
        let sid_text = B64.encode(parts.sid);
        let record = self
            .field(&key, &sid_text)
            .await?
            .ok_or_else(unknown_token)?;
        if record.ends(self.idle_secs()) <= unix_now() {
            return Err(Error::new(ErrorKind::Expired, "the session has expired"));
        }
        if parts.generation < record.generation {
            return Err(Error::new(
                ErrorKind::Reused,
                "this refresh token was already rotated",
            ));
        }
        let presented = self.inner.keys.secret_hash(&parts.random);
        if parts.generation != record.generation || !ct_eq(&presented, &record.hash) {
            return Err(unknown_token());
        }
        Ok(record.into_session(&parts.user, &sid_text))
    }

    /// Replaces `token` with a new one for the same session, in one atomic script, and records
    /// the use (`last_used_at`). `ttl` defaults to the store's.
    ///
    /// Errors: [`ErrorKind::Reused`] when `token` was already rotated (the session is then
    /// revoked); [`ErrorKind::NotFound`] for unknown, forged or revoked tokens;
    /// [`ErrorKind::Expired`]; unavailability.
    pub async fn rotate(&self, token: &str, ttl: Option<Duration>) -> Result<Issued> {
        let parts = self.inner.keys.decode(token)?;
        check_not_expired(&parts)?;
        let ttl = ttl.unwrap_or(self.inner.default_ttl);
        check_ttl(ttl)?;
        let key = self.user_key(&parts.user)?;
        let sid_text = B64.encode(parts.sid);
        let presented = self.inner.keys.secret_hash(&parts.random);
        // With a grace window the next secret is a keyed function of this one, so that a
        // concurrent refresh of the same token gets the same new token. Without one, it is fresh
        // randomness: only this call knows it, so finding its hash already stored tells the
        // script this very call was sent again (a cluster connection re-sends a command whose
        // reply was lost with its connection), not that someone else presented the token.
        let next_random = if self.inner.grace.is_zero() {
            let mut random = [0u8; RAND_LEN];
            rand::rng().fill_bytes(&mut random);
            random
        } else {
            self.inner.keys.next_random(&parts)
        };
        let next_hash = self.inner.keys.secret_hash(&next_random);
        let args = RotateArgs {
            sid: &sid_text,
            generation: parts.generation,
            presented: &presented,
            next: &next_hash,
            ttl: secs_ceil(ttl),
            idle: self.idle_secs(),
            grace: secs_ceil(self.inner.grace),
        };
        let reply = match self.inner.client.memory()? {
            Some(memory) => memory.update_hash(&key, |map| engine::rotate(map, &args, unix_now())),
            None => {
                let _forget = self.forget(&key);
                let packed = args.packed().to_vec();
                let raw = self.inner.rotations.run(key, args.sid, packed).await?;
                RotateReply::from_redis(raw)?
            }
        };
        match reply {
            RotateReply::Current(record) => {
                // In the grace window the stored hash must be the one derived from this token.
                if !ct_eq(&record.hash, &next_hash) {
                    return Err(unknown_token());
                }
                self.inner.rotated.fetch_add(1, Ordering::Relaxed);
                let token = self.inner.keys.encode(&TokenParts {
                    user: parts.user.clone(),
                    sid: parts.sid,
                    generation: record.generation,
                    expires: record.expires,
                    random: next_random,
                });
                Ok(Issued {
                    token,
                    session: record.into_session(&parts.user, &sid_text),
                    evicted: 0,
                })
            }
            RotateReply::Unknown => Err(unknown_token()),
            RotateReply::Ended => Err(Error::new(ErrorKind::Expired, "the session has expired")),
            RotateReply::Reused => {
                self.inner.reuse_detected.fetch_add(1, Ordering::Relaxed);
                self.inner.revoked.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    session_id = %sid_text,
                    "refresh token reuse detected: the session was revoked"
                );
                Err(Error::new(
                    ErrorKind::Reused,
                    "this refresh token was already used; its session has been revoked",
                ))
            }
        }
    }

    /// The live session `session_id` of `user`, if any. One read: this is the check a service
    /// makes on every request carrying an access token.
    pub async fn session(&self, user: &str, session_id: &str) -> Result<Option<Session>> {
        let key = self.user_key(user)?;
        if !is_session_id(session_id) {
            return Ok(None);
        }
        let now = unix_now();
        let idle = self.idle_secs();
        let record = match &self.inner.near {
            Some(near) => self.near_field(near, &key, session_id).await?,
            None => self.field(&key, session_id).await?,
        };
        Ok(record
            .filter(|record| record.ends(idle) > now)
            .map(|record| record.into_session(user, session_id)))
    }

    /// [`field`](Self::field) through the near-cache: held records from memory, others read
    /// and kept until the session would end (or the near-cache's max age).
    async fn near_field(&self, near: &NearStore, key: &str, sid: &str) -> Result<Option<Record>> {
        if self.inner.client.is_closed() {
            return Err(Error::closed());
        }
        if let Some(record) = near.get(key, sid).as_deref().and_then(Record::decode) {
            return Ok(Some(record));
        }
        // The ticket comes before the read is sent: see `near` on the race it closes.
        let ticket = near.ticket(key);
        let bytes = self.field_bytes(key, sid).await?;
        let record = bytes.as_deref().and_then(Record::decode);
        if let (Some(ticket), Some(bytes), Some(record)) = (ticket, &bytes, &record) {
            let left = record.ends(self.idle_secs()).saturating_sub(unix_now());
            if left > 0 {
                let ttl = Duration::from_secs(u64::from(left));
                near.insert(ticket, key, sid, bytes, Some(ttl));
            }
        }
        Ok(record)
    }

    /// Drops the user's hash from the near-cache now and again when the returned guard goes
    /// (after the write's reply, or if the write is cancelled), so that no read under way or
    /// in between keeps the state from before the write.
    fn forget(&self, key: &str) -> Forget<'_> {
        let near = self.inner.near.as_deref().map(|near| {
            near.invalidate(key, false);
            (near, key.to_owned())
        });
        Forget(near)
    }

    /// The user's live sessions, oldest first. Ended ones are never listed.
    pub async fn sessions(&self, user: &str) -> Result<Vec<Session>> {
        let key = self.user_key(user)?;
        let all: HashMap<String, Vec<u8>> = match self.inner.client.memory()? {
            Some(memory) => memory.hash(&key),
            None => {
                self.inner
                    .client
                    .run("HGETALL", |mut c| async move {
                        redis::cmd("HGETALL").arg(&key).query_async(&mut c).await
                    })
                    .await?
            }
        };
        let now = unix_now();
        let idle = self.idle_secs();
        let mut sessions: Vec<Session> = all
            .into_iter()
            .filter_map(|(sid, bytes)| Record::decode(&bytes).map(|record| (sid, record)))
            .filter(|(_, record)| record.ends(idle) > now)
            .map(|(sid, record)| record.into_session(user, &sid))
            .collect();
        sessions.sort_by(|a, b| (a.created_at, &a.session_id).cmp(&(b.created_at, &b.session_id)));
        Ok(sessions)
    }

    /// Ends one session of `user`; true if it was live.
    pub async fn revoke(&self, user: &str, session_id: &str) -> Result<bool> {
        let owned_key = self.user_key(user)?;
        let key = owned_key.as_str();
        if !is_session_id(session_id) {
            return Ok(false);
        }
        let idle = self.idle_secs();
        let (revoked, acknowledged) = match self.inner.client.memory()? {
            Some(memory) => {
                let revoked = memory
                    .update_hash(key, |map| engine::revoke(map, session_id, idle, unix_now()));
                (revoked, None)
            }
            None => {
                let _forget = self.forget(key);
                let idle = idle.to_string();
                let (revoked, acknowledged) = self
                    .run_revocation::<u32>(&self.inner.revocations, key, session_id, &idle)
                    .await?;
                (revoked > 0, acknowledged)
            }
        };
        if revoked {
            self.inner.revoked.fetch_add(1, Ordering::Relaxed);
            self.check_acknowledged(acknowledged)?;
        }
        Ok(revoked)
    }

    /// Ends every session of `user` ("log out everywhere"), atomically; returns how many were
    /// live. A session created after this returns is not affected.
    pub async fn revoke_all(&self, user: &str) -> Result<u64> {
        let owned_key = self.user_key(user)?;
        let key = owned_key.as_str();
        let idle = self.idle_secs();
        let (count, acknowledged) = match self.inner.client.memory()? {
            Some(memory) => {
                let count = memory.update_hash(key, |map| {
                    let (live, _) = engine::sweep(map, idle, unix_now());
                    map.clear();
                    (live.len() as u64, None)
                });
                (count, None)
            }
            None => {
                let _forget = self.forget(key);
                let idle = idle.to_string();
                self.run_revocation::<u64>(&self.inner.revocations_all, key, &idle, "")
                    .await?
            }
        };
        self.inner.revoked.fetch_add(count, Ordering::Relaxed);
        if count > 0 {
            self.check_acknowledged(acknowledged)?;
        }
        Ok(count)
    }

    /// Runs a revocation script on `key` with its two arguments: through `coalescer`, or with
    /// [`SessionsBuilder::wait_for_replicas`] alone and with `WAIT` after it in the same write
    /// on the same connection (see `Call::invoke_then_wait`), one that no other traffic shares
    /// (`Client::run_blocking`). Its reply, and how many replicas acknowledged it (`None` when
    /// not asked to wait).
    async fn run_revocation<T: redis::FromRedisValue + Send>(
        &self,
        coalescer: &Arc<Coalescer>,
        key: &str,
        first: &str,
        second: &str,
    ) -> Result<(T, Option<u32>)> {
        let what = coalescer.what();
        match self.inner.replicas {
            None => {
                let value = coalescer
                    .run(key.to_owned(), first, second.as_bytes().to_vec())
                    .await?;
                let reply = redis::from_redis_value(value).map_err(|_| {
                    Error::new(ErrorKind::Backend, format!("unexpected reply from {what}"))
                })?;
                Ok((reply, None))
            }
            Some((replicas, timeout)) => {
                let call = &coalescer.script().key(key).arg(first).arg(second);
                let client = &self.inner.client;
                let timeout_ms = timeout.as_millis().max(1) as u64;
                // On a connection of its own: `WAIT` holds its connection's other commands.
                client
                    .run_blocking(what, |mut c| async move {
                        call.invoke_then_wait::<T>(&mut c, replicas, timeout_ms)
                            .await
                            .map(|(reply, acknowledged)| (reply, Some(acknowledged)))
                    })
                    .await
            }
        }
    }

    /// Fails when fewer replicas acknowledged a revocation than
    /// [`SessionsBuilder::wait_for_replicas`] asks for.
    fn check_acknowledged(&self, acknowledged: Option<u32>) -> Result<()> {
        let (Some((replicas, timeout)), Some(acknowledged)) = (self.inner.replicas, acknowledged)
        else {
            return Ok(());
        };
        if acknowledged < replicas {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the revocation is in effect on the primary, but only {acknowledged} of \
                     {replicas} replicas acknowledged it within {} ms; retry it",
                    timeout.as_millis().max(1)
                ),
            ));
        }
        Ok(())
    }

    async fn field(&self, key: &str, sid: &str) -> Result<Option<Record>> {
        let bytes = self.field_bytes(key, sid).await?;
        Ok(bytes.as_deref().and_then(Record::decode))
    }

    async fn field_bytes(&self, key: &str, sid: &str) -> Result<Option<Vec<u8>>> {
        let bytes: Option<Vec<u8>> = match self.inner.client.memory()? {
            Some(memory) => memory.hash_field(key, sid),
            None => {
                self.inner
                    .client
                    .run("HGET", |mut c| async move {
                        redis::cmd("HGET")
                            .arg(key)
                            .arg(sid)
                            .query_async(&mut c)
                            .await
                    })
                    .await?
            }
        };
        Ok(bytes)
    }
}

/// See [`Sessions::forget`].
struct Forget<'a>(Option<(&'a NearStore, String)>);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Some((near, key)) = &self.0 {
            near.invalidate(key, false);
        }
    }
}

fn unknown_token() -> Error {
    Error::new(
        ErrorKind::NotFound,
        "unknown, revoked or invalid refresh token",
    )
}

fn check_not_expired(parts: &TokenParts) -> Result<()> {
    if parts.expires <= unix_now() {
        return Err(Error::new(
            ErrorKind::Expired,
            "the refresh token has expired",
        ));
    }
    Ok(())
}

fn check_user(user: &str) -> Result<()> {
    if user.is_empty() || user.len() > MAX_USER_ID_LEN {
        return Err(Error::invalid(format!(
            "user id must be 1 to {MAX_USER_ID_LEN} bytes, got {}",
            user.len()
        )));
    }
    if user.chars().any(char::is_control) {
        return Err(Error::invalid(
            "user id must not contain control characters",
        ));
    }
    Ok(())
}

fn check_device(device: &str) -> Result<()> {
    if device.len() > MAX_DEVICE_LEN {
        return Err(Error::invalid(format!(
            "device must be at most {MAX_DEVICE_LEN} bytes, got {}",
            device.len()
        )));
    }
    if device.chars().any(char::is_control) {
        return Err(Error::invalid("device must not contain control characters"));
    }
    Ok(())
}

fn is_session_id(text: &str) -> bool {
    text.len() == 16
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn unix_now() -> u32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
        .unwrap_or(0)
}

fn at(secs: u32) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::from(secs))
}

/// Equality without an early exit, for secrets and their hashes.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Keys derived from the configured secret, one per purpose, each an HMAC-SHA256 key whose two
/// padded blocks are hashed once, here: a use starts from them (two of the four SHA-256 blocks
/// of a short HMAC; five HMACs per rotation).
pub(crate) struct TokenKeys {
    mac: Keyed,
    hash: Keyed,
    rotate: Keyed,
}

/// An HMAC-SHA256 key, by the implementation that is faster on this CPU; both give the same
/// bytes (tests below). Measured per HMAC of a 48-byte message (docs/benchmarks.md, sessions 8
/// and 10):
/// - with the SHA instructions (`sha_ni`; ARMv8's SHA-2): the `hmac` crate over `sha2`, which
///   uses them, 148–166 ns against ring's 295–343 ns; both hash at about the same speed, ring's
///   API copies and finishes more around it. In a rotation the HMACs (with their copying) fell
///   from ~22 % of the client's samples to ~16 %;
/// - without: ring, whose assembly does ~475 ns against ~700 ns for `sha2`'s portable code.
enum Keyed {
    Sha(hmac::Hmac<sha2::Sha256>),
    Ring(ring::hmac::Key),
}

/// Whether this CPU has the SHA-256 instructions that `sha2` uses (it checks again itself).
fn sha_instructions() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("sse2")
            && std::arch::is_x86_feature_detected!("ssse3")
            && std::arch::is_x86_feature_detected!("sse4.1")
    }
    #[cfg(all(target_arch = "aarch64", any(target_os = "linux", target_os = "macos")))]
    {
        std::arch::is_aarch64_feature_detected!("sha2")
    }
    #[cfg(not(any(
        target_arch = "x86",
        target_arch = "x86_64",
        all(target_arch = "aarch64", any(target_os = "linux", target_os = "macos"))
    )))]
    {
        false
    }
}

fn keyed(key: &[u8]) -> Keyed {
    keyed_with(key, sha_instructions())
}

fn keyed_with(key: &[u8], sha: bool) -> Keyed {
    let ring = || Keyed::Ring(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key));
    if !sha {
        return ring();
    }
    // HMAC takes a key of any length: `hmac` refuses none (ring is the fallback all the same).
    <hmac::Hmac<sha2::Sha256> as hmac::Mac>::new_from_slice(key).map_or_else(|_| ring(), Keyed::Sha)
}

fn hmac(keyed: &Keyed, parts: &[&[u8]]) -> [u8; 32] {
    match keyed {
        Keyed::Sha(key) => {
            let mut mac = key.clone();
            for part in parts {
                mac.update(part);
            }
            mac.finalize().into_bytes().into()
        }
        Keyed::Ring(key) => {
            let mut mac = ring::hmac::Context::with_key(key);
            for part in parts {
                mac.update(part);
            }
            let mut out = [0u8; 32];
            out.copy_from_slice(mac.sign().as_ref());
            out
        }
    }
}

pub(crate) struct TokenParts {
    pub(crate) user: String,
    pub(crate) sid: [u8; SID_LEN],
    pub(crate) generation: u32,
    pub(crate) expires: u32,
    pub(crate) random: [u8; RAND_LEN],
}

impl TokenKeys {
    pub(crate) fn derive(secret: &[u8]) -> Self {
        let secret = keyed(secret);
        let derive = |purpose: &[u8]| keyed(&hmac(&secret, &[purpose]));
        Self {
            mac: derive(b"rediskit/v1/refresh-token-mac"),
            hash: derive(b"rediskit/v1/refresh-secret-hash"),
            rotate: derive(b"rediskit/v1/refresh-rotate"),
        }
    }

    /// The keyed hash stored in Redis instead of the secret.
    fn secret_hash(&self, random: &[u8; RAND_LEN]) -> [u8; HASH_LEN] {
        let full = hmac(&self.hash, &[random]);
        let mut out = [0u8; HASH_LEN];
        out.copy_from_slice(&full[..HASH_LEN]);
        out
    }

    /// The random part of the next generation's token: a keyed function of this one's, so a
    /// repeat within the grace window gets the same new token without it being stored.
    fn next_random(&self, parts: &TokenParts) -> [u8; RAND_LEN] {
        hmac(
            &self.rotate,
            &[&parts.sid, &parts.generation.to_be_bytes(), &parts.random],
        )
    }

    fn body(parts: &TokenParts) -> [u8; TOKEN_BIN_LEN - MAC_LEN] {
        let mut body = [0u8; TOKEN_BIN_LEN - MAC_LEN];
        body[0] = TOKEN_VERSION;
        body[1..1 + SID_LEN].copy_from_slice(&parts.sid);
        body[13..17].copy_from_slice(&parts.generation.to_be_bytes());
        body[17..21].copy_from_slice(&parts.expires.to_be_bytes());
        body[21..].copy_from_slice(&parts.random);
        body
    }

    fn mac_of(&self, user: &str, body: &[u8]) -> [u8; MAC_LEN] {
        // The user id is length-prefixed so that no two (user, body) pairs share an input.
        let len = (user.len() as u32).to_be_bytes();
        let full = hmac(&self.mac, &[&len, user.as_bytes(), body]);
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&full[..MAC_LEN]);
        out
    }

    pub(crate) fn encode(&self, parts: &TokenParts) -> RefreshToken {
        let body = Self::body(parts);
        let mac = self.mac_of(&parts.user, &body);
        let mut bin = [0u8; TOKEN_BIN_LEN];
        bin[..body.len()].copy_from_slice(&body);
        bin[body.len()..].copy_from_slice(&mac);
        // One allocation for the text (no `format!`, no intermediate strings).
        let mut text = String::with_capacity((parts.user.len() + TOKEN_BIN_LEN) * 4 / 3 + 4);
        B64.encode_string(parts.user.as_bytes(), &mut text);
        text.push('.');
        B64.encode_string(bin, &mut text);
        RefreshToken(text)
    }

    /// Parses a token and checks its MAC (in constant time). Malformed text is `InvalidInput`;
    /// a well-formed token with a wrong MAC is `NotFound`, like any unknown token.
    pub(crate) fn decode(&self, text: &str) -> Result<TokenParts> {
        let malformed = || Error::invalid("malformed refresh token");
        if text.len() > MAX_TOKEN_TEXT {
            return Err(malformed());
        }
        let (user, bin) = text.split_once('.').ok_or_else(malformed)?;
        let user = B64.decode(user).map_err(|_| malformed())?;
        let user = String::from_utf8(user).map_err(|_| malformed())?;
        check_user(&user).map_err(|_| malformed())?;
        // Decoded on the stack; a longer text does not fit and is malformed.
        let mut buf = [0u8; TOKEN_BIN_LEN + 3];
        let len = B64.decode_slice(bin, &mut buf).map_err(|_| malformed())?;
        let bin = &buf[..len];
        if bin.len() != TOKEN_BIN_LEN || bin[0] != TOKEN_VERSION {
            return Err(malformed());
        }
        let (body, mac) = bin.split_at(TOKEN_BIN_LEN - MAC_LEN);
        if !ct_eq(&self.mac_of(&user, body), mac) {
            return Err(unknown_token());
        }
        let mut parts = TokenParts {
            user,
            sid: [0; SID_LEN],
            generation: 0,
            expires: 0,
            random: [0; RAND_LEN],
        };
        parts.sid.copy_from_slice(&body[1..13]);
        parts.generation = u32::from_be_bytes([body[13], body[14], body[15], body[16]]);
        parts.expires = u32::from_be_bytes([body[17], body[18], body[19], body[20]]);
        parts.random.copy_from_slice(&body[21..]);
        Ok(parts)
    }
}

/// A session as stored: the layout of `session_prelude.lua`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    pub(crate) generation: u32,
    pub(crate) hash: [u8; HASH_LEN],
    pub(crate) created: u32,
    pub(crate) last_used: u32,
    pub(crate) expires: u32,
    pub(crate) rotated: u32,
    pub(crate) device: String,
    pub(crate) metadata: Vec<u8>,
}

const RECORD_HEAD: usize = 4 + HASH_LEN + 4 * 4;

impl Record {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_HEAD + 1 + self.device.len() + self.metadata.len());
        out.extend_from_slice(&self.generation.to_be_bytes());
        out.extend_from_slice(&self.hash);
        for value in [self.created, self.last_used, self.expires, self.rotated] {
            out.extend_from_slice(&value.to_be_bytes());
        }
        push_device(&mut out, &self.device);
        out.extend_from_slice(&self.metadata);
        out
    }

    /// `None` for bytes that are not a record (never a panic).
    pub(crate) fn decode(bytes: &[u8]) -> Option<Self> {
        let (head, rest) = bytes.split_at_checked(RECORD_HEAD)?;
        let word =
            |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let (device_len, rest) = match rest.split_first()? {
            (&LONG_DEVICE, rest) => {
                let (len, rest) = rest.split_first_chunk::<2>()?;
                (usize::from(u16::from_be_bytes(*len)), rest)
            }
            (&len, rest) => (usize::from(len), rest),
        };
        let (device, metadata) = rest.split_at_checked(device_len)?;
        let mut hash = [0u8; HASH_LEN];
        hash.copy_from_slice(&head[4..4 + HASH_LEN]);
        Some(Self {
            generation: word(0),
            hash,
            created: word(20),
            last_used: word(24),
            expires: word(28),
            rotated: word(32),
            device: String::from_utf8(device.to_vec()).ok()?,
            metadata: metadata.to_vec(),
        })
    }

    /// When the session stops being valid, given the inactivity limit (0 = none).
    fn ends(&self, idle: u32) -> u32 {
        if idle > 0 && self.last_used.saturating_add(idle) < self.expires {
            self.last_used + idle
        } else {
            self.expires
        }
    }

    fn into_session(self, user: &str, sid: &str) -> Session {
        Session {
            user_id: user.to_owned(),
            session_id: sid.to_owned(),
            device: self.device,
            created_at: at(self.created),
            last_used_at: at(self.last_used),
            expires_at: at(self.expires),
            generation: self.generation,
            metadata: (!self.metadata.is_empty())
                .then(|| serde_json::from_slice(&self.metadata).ok())
                .flatten(),
        }
    }
}

struct CreateArgs<'a> {
    sid: &'a str,
    hash: &'a [u8; HASH_LEN],
    ttl: u32,
    idle: u32,
    max: u32,
    device: &'a str,
    metadata: &'a [u8],
}

struct RotateArgs<'a> {
    sid: &'a str,
    generation: u32,
    presented: &'a [u8; HASH_LEN],
    next: &'a [u8; HASH_LEN],
    ttl: u32,
    idle: u32,
    grace: u32,
}

/// The device length byte that says a two-byte length follows: devices of 255 bytes and more.
/// Shorter ones (every device before the limit grew from 128 bytes) keep the one-byte length.
const LONG_DEVICE: u8 = 0xFF;

/// A record's device field: its length, one byte under [`LONG_DEVICE`], else that byte and two
/// (devices are at most [`MAX_DEVICE_LEN`] bytes), then its text.
fn push_device(out: &mut Vec<u8>, device: &str) {
    match u8::try_from(device.len()) {
        Ok(len) if len < LONG_DEVICE => out.push(len),
        _ => {
            let len = u16::try_from(device.len()).expect("devices are checked to be short");
            out.push(LONG_DEVICE);
            out.extend_from_slice(&len.to_be_bytes());
        }
    }
    out.extend_from_slice(device.as_bytes());
}

impl CreateArgs<'_> {
    /// `session_create.lua`'s ARGV[2]: ttl, idle and max big-endian, then the new record as
    /// far as it does not depend on the server's clock: its head's generation (0) and hash,
    /// and its tail (device length, device, metadata). The script splices the four times in
    /// between, packed once per call and lifetime.
    fn packed(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(16 + HASH_LEN + 1 + self.device.len() + self.metadata.len());
        for value in [self.ttl, self.idle, self.max, 0] {
            out.extend_from_slice(&value.to_be_bytes());
        }
        out.extend_from_slice(self.hash);
        push_device(&mut out, self.device);
        out.extend_from_slice(self.metadata);
        out
    }
}

impl RotateArgs<'_> {
    /// `session_rotate.lua`'s ARGV[2], big-endian: the presented generation, the presented
    /// hash as four words, ttl, idle and grace; then the rotated record's first 20 bytes (the
    /// next generation and the next hash), which the script splices in as they are.
    fn packed(&self) -> [u8; 36 + HASH_LEN] {
        let mut out = [0u8; 36 + HASH_LEN];
        out[..4].copy_from_slice(&self.generation.to_be_bytes());
        out[4..4 + HASH_LEN].copy_from_slice(self.presented);
        for (at, value) in [self.ttl, self.idle, self.grace].into_iter().enumerate() {
            let at = 4 + HASH_LEN + 4 * at;
            out[at..at + 4].copy_from_slice(&value.to_be_bytes());
        }
        // The script writes it only when the presented generation is the stored one, so the
        // next is this plus one (wrapping as the record's 32 bits would).
        out[32..36].copy_from_slice(&self.generation.wrapping_add(1).to_be_bytes());
        out[36..].copy_from_slice(self.next);
        out
    }
}

/// `session_create.lua` answers `now` alone, or `{now, evicted}` when it evicted: one array
/// fewer for redis-server to build on almost every create. Returns (now, expires, evicted).
fn created_reply(value: redis::Value, ttl: u32) -> Result<(u32, u32, u32)> {
    let bad = || Error::new(ErrorKind::Backend, "unexpected reply from session_create");
    let int = |value: &redis::Value| match value {
        redis::Value::Int(n) => u32::try_from(*n).map_err(|_| bad()),
        _ => Err(bad()),
    };
    let (now, evicted) = match &value {
        redis::Value::Int(_) => (int(&value)?, 0),
        redis::Value::Array(items) if items.len() == 2 => (int(&items[0])?, int(&items[1])?),
        _ => return Err(bad()),
    };
    // The script computes the expiry the same way, from the same two numbers.
    let expires = now.checked_add(ttl).ok_or_else(bad)?;
    Ok((now, expires, evicted))
}

enum RotateReply {
    Unknown,
    /// The session's record at the generation after the presented token's: rotated now, or
    /// earlier within the grace window (the caller handles both alike).
    Current(Record),
    Ended,
    Reused,
}

impl RotateReply {
    /// The script answers the record alone (a bulk string) on success, else a status code:
    /// one array fewer for redis-server to build per rotation.
    fn from_redis(value: redis::Value) -> Result<Self> {
        let bad = || Error::new(ErrorKind::Backend, "unexpected reply from session_rotate");
        Ok(match value {
            redis::Value::BulkString(bytes) => {
                RotateReply::Current(Record::decode(&bytes).ok_or_else(bad)?)
            }
            redis::Value::Int(0) => RotateReply::Unknown,
            redis::Value::Int(2) => RotateReply::Ended,
            redis::Value::Int(4) => RotateReply::Reused,
            _ => return Err(bad()),
        })
    }
}

/// The session scripts, in Rust, for the memory backend: the same steps on the same record
/// layout, so both backends pass one conformance suite. Keep in step with the `.lua` files.
mod engine {
    use super::*;

    type Table = HashMap<String, Vec<u8>>;

    /// `sweep()` of the prelude: drops ended sessions; returns the live ones (sid, created),
    /// oldest first, and the time-to-live of the key (until the last live session ends).
    pub(super) fn sweep(
        map: &mut Table,
        idle: u32,
        now: u32,
    ) -> (Vec<(String, u32)>, Option<Duration>) {
        let mut last_end = 0;
        let mut live = Vec::new();
        map.retain(|sid, bytes| match Record::decode(bytes) {
            Some(record) if record.ends(idle) > now => {
                last_end = last_end.max(record.ends(idle));
                live.push((sid.clone(), record.created));
                true
            }
            _ => false,
        });
        live.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
        (live, ttl_until(last_end, now))
    }

    fn ttl_until(end: u32, now: u32) -> Option<Duration> {
        (end > now).then(|| Duration::from_secs(u64::from(end - now)))
    }

    /// Unlike the script, which sweeps only at every eighth record and at the cap to stay O(1),
    /// this always sweeps: in-process it is cheap, and the outcome is the same (ended sessions
    /// are invisible either way, and eviction happens only at the cap, where both sweep).
    pub(super) fn create(
        map: &mut Table,
        args: &CreateArgs<'_>,
        now: u32,
    ) -> ((u32, u32, u32), Option<Duration>) {
        let (live, ttl) = sweep(map, args.idle, now);
        let mut evicted = 0;
        // A session already there is this very creation, sent again (see session_create.lua):
        // it evicted what it had to then.
        let again = map.contains_key(args.sid);
        while !again && live.len() - evicted >= args.max as usize {
            map.remove(&live[evicted].0);
            evicted += 1;
        }
        let expires = now.saturating_add(args.ttl);
        let record = Record {
            generation: 0,
            hash: *args.hash,
            created: now,
            last_used: now,
            expires,
            rotated: now,
            device: args.device.to_owned(),
            metadata: args.metadata.to_vec(),
        };
        let ends = record.ends(args.idle);
        map.insert(args.sid.to_owned(), record.encode());
        let ttl = ttl.max(ttl_until(ends, now));
        ((now, expires, evicted as u32), ttl)
    }

    pub(super) fn rotate(
        map: &mut Table,
        args: &RotateArgs<'_>,
        now: u32,
    ) -> (RotateReply, Option<Duration>) {
        let Some(record) = map.get(args.sid).and_then(|bytes| Record::decode(bytes)) else {
            let (_, ttl) = sweep(map, args.idle, now);
            return (RotateReply::Unknown, ttl);
        };
        if record.ends(args.idle) <= now {
            map.remove(args.sid);
            let (_, ttl) = sweep(map, args.idle, now);
            return (RotateReply::Ended, ttl);
        }
        if args.generation == record.generation {
            if !ct_eq(&record.hash, args.presented) {
                let (_, ttl) = sweep(map, args.idle, now);
                return (RotateReply::Unknown, ttl);
            }
            let rotated = Record {
                // As the client packs it for the script (`RotateArgs::packed`): after 2^32
                // rotations the count starts again at 0, never a panic.
                generation: record.generation.wrapping_add(1),
                hash: *args.next,
                last_used: now,
                expires: now.saturating_add(args.ttl),
                rotated: now,
                ..record
            };
            map.insert(args.sid.to_owned(), rotated.encode());
            let (_, ttl) = sweep(map, args.idle, now);
            return (RotateReply::Current(rotated), ttl);
        }
        // Compared as the script's Lua numbers do, without wrapping.
        if u64::from(args.generation) + 1 == u64::from(record.generation) {
            let repeat = if args.grace > 0 {
                now.saturating_sub(record.rotated) <= args.grace
            } else {
                // This very rotation, sent again (see the module's docs).
                ct_eq(&record.hash, args.next)
            };
            if repeat {
                let (_, ttl) = sweep(map, args.idle, now);
                return (RotateReply::Current(record), ttl);
            }
        }
        if args.generation < record.generation {
            map.remove(args.sid);
            let (_, ttl) = sweep(map, args.idle, now);
            return (RotateReply::Reused, ttl);
        }
        let (_, ttl) = sweep(map, args.idle, now);
        (RotateReply::Unknown, ttl)
    }

    pub(super) fn revoke(
        map: &mut Table,
        sid: &str,
        idle: u32,
        now: u32,
    ) -> (bool, Option<Duration>) {
        let live = map
            .remove(sid)
            .and_then(|bytes| Record::decode(&bytes))
            .is_some_and(|record| record.ends(idle) > now);
        let (_, ttl) = sweep(map, idle, now);
        (live, ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> TokenKeys {
        TokenKeys::derive(&[7u8; 32])
    }

    fn parts() -> TokenParts {
        TokenParts {
            user: "alice{1}:x".into(),
            sid: [1; SID_LEN],
            generation: 3,
            expires: 2_000_000_000,
            random: [9; RAND_LEN],
        }
    }

    /// RFC 4231, test cases 2 and 6 (a key longer than a block), with the data in parts, by
    /// both implementations: the MAC is HMAC-SHA256, so tokens and stored hashes made by
    /// earlier builds still verify, whichever this CPU uses.
    #[test]
    fn hmac_is_hmac_sha256() {
        let long_key = [0xaa_u8; 131];
        type Case<'a> = (&'a [u8], &'a [&'a [u8]], &'a str);
        let cases: [Case; 2] = [
            (
                b"Jefe",
                &[b"what do ya ", b"want for ", b"nothing?"],
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                &long_key,
                &[
                    b"Test Using Larger Than Block-Size Key - ",
                    b"Hash Key First",
                ],
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
        ];
        for sha in [true, false] {
            for (key, data, expected) in cases {
                let tag = hmac(&keyed_with(key, sha), data);
                let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
                assert_eq!(hex, expected, "sha instructions: {sha}");
            }
        }
    }

    /// The two implementations agree on keys and messages of every length around the block
    /// size, split anywhere.
    #[test]
    fn both_hmacs_agree() {
        let bytes: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for key_len in [0, 1, 31, 32, 63, 64, 65, 128, 200] {
            let key = &bytes[..key_len];
            let (sha, ring) = (keyed_with(key, true), keyed_with(key, false));
            for len in (0..=150).step_by(7).chain([55, 56, 63, 64, 65, 119, 120]) {
                let message = &bytes[100..100 + len];
                let split = len / 3;
                let parts: [&[u8]; 2] = [&message[..split], &message[split..]];
                assert_eq!(
                    hmac(&sha, &parts),
                    hmac(&ring, &parts),
                    "key {key_len}, message {len}"
                );
            }
        }
    }

    /// A token round-trips through its text form, URL-safe and of fixed binary size.
    #[test]
    fn token_round_trip() {
        let keys = keys();
        let token = keys.encode(&parts());
        assert!(
            token
                .expose()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        );
        let back = keys.decode(token.expose()).unwrap();
        assert_eq!(back.user, "alice{1}:x");
        assert_eq!(
            (back.sid, back.generation, back.expires),
            ([1; SID_LEN], 3, 2_000_000_000)
        );
        assert_eq!(back.random, [9; RAND_LEN]);
        assert_eq!(format!("{token:?}"), "RefreshToken(..)");
    }

    /// Any change to a token's bytes, or another key, makes it unknown; junk is malformed.
    #[test]
    fn tampering_is_detected() {
        let keys = keys();
        let text = keys.encode(&parts()).into_string();
        let (user, bin) = text.split_once('.').unwrap();
        let mut raw = B64.decode(bin).unwrap();
        for i in 0..raw.len() {
            raw[i] ^= 1;
            let forged = format!("{user}.{}", B64.encode(&raw));
            let err = keys.decode(&forged).err().unwrap();
            assert!(
                matches!(err.kind(), ErrorKind::NotFound | ErrorKind::InvalidInput),
                "byte {i}"
            );
            raw[i] ^= 1;
        }
        let other_user = format!("{}.{bin}", B64.encode("bob"));
        assert_eq!(
            keys.decode(&other_user).err().unwrap().kind(),
            ErrorKind::NotFound
        );
        let other_key = TokenKeys::derive(&[8u8; 32]);
        assert_eq!(
            other_key.decode(&text).err().unwrap().kind(),
            ErrorKind::NotFound
        );
        for junk in [
            "",
            ".",
            "abc",
            "a.b.c",
            &"x".repeat(600),
            "\u{0}.\u{0}",
            "YQ.####",
        ] {
            assert_eq!(
                keys.decode(junk).err().unwrap().kind(),
                ErrorKind::InvalidInput,
                "{junk:?}"
            );
        }
    }

    /// The record layout round-trips and rejects truncated bytes.
    #[test]
    fn record_round_trip() {
        let record = Record {
            generation: 2,
            hash: [3; HASH_LEN],
            created: 10,
            last_used: 20,
            expires: 30,
            rotated: 20,
            device: "Firefox on Linux".into(),
            metadata: br#"{"ip":"203.0.113.9"}"#.to_vec(),
        };
        let bytes = record.encode();
        assert_eq!(Record::decode(&bytes), Some(record.clone()));
        for len in 0..bytes.len() - record.metadata.len() {
            assert!(Record::decode(&bytes[..len]).is_none(), "{len}");
        }
        assert_eq!(record.ends(0), 30);
        assert_eq!(record.ends(5), 25);
        assert_eq!(record.ends(50), 30);
    }

    /// A device under 255 bytes keeps the one-byte length every stored record has; a longer one
    /// (up to 512 bytes: 128 four-byte characters) has the marker and a two-byte length, and
    /// both round-trip with their metadata, and refuse truncation.
    #[test]
    fn device_lengths_in_one_byte_or_three() {
        for (device, prefix) in [
            ("d".repeat(254), vec![254u8]),
            ("d".repeat(255), vec![LONG_DEVICE, 0, 255]),
            ("🦀".repeat(128), vec![LONG_DEVICE, 2, 0]),
        ] {
            let record = Record {
                generation: 0,
                hash: [1; HASH_LEN],
                created: 1,
                last_used: 2,
                expires: 3,
                rotated: 2,
                device: device.clone(),
                metadata: b"{}".to_vec(),
            };
            let bytes = record.encode();
            assert_eq!(bytes[RECORD_HEAD..RECORD_HEAD + prefix.len()], prefix[..]);
            assert_eq!(Record::decode(&bytes), Some(record.clone()));
            for len in 0..bytes.len() - record.metadata.len() {
                assert!(Record::decode(&bytes[..len]).is_none(), "{len}");
            }
            assert!(check_device(&device).is_ok());
        }
        assert!(check_device(&"d".repeat(MAX_DEVICE_LEN + 1)).is_err());
    }

    /// The memory engine's rotation at the last generation a record can count (2^32 - 1) starts
    /// again at 0, as the client packs it for the script, and neither engine step panics.
    #[test]
    fn the_memory_engine_rotates_past_the_last_generation() {
        let record = Record {
            generation: u32::MAX,
            hash: [1; HASH_LEN],
            created: 10,
            last_used: 10,
            expires: 1_000,
            rotated: 10,
            device: "d".into(),
            metadata: Vec::new(),
        };
        let mut map = HashMap::from([("sid".to_owned(), record.encode())]);
        let args = |generation| RotateArgs {
            sid: "sid",
            generation,
            presented: &[1; HASH_LEN],
            next: &[2; HASH_LEN],
            ttl: 100,
            idle: 0,
            grace: 60,
        };
        let (reply, _) = engine::rotate(&mut map, &args(u32::MAX), 20);
        assert!(matches!(reply, RotateReply::Current(ref r) if r.generation == 0));
        // The token before it is not "the previous generation" of 0, as in the script.
        let (reply, _) = engine::rotate(&mut map, &args(u32::MAX), 21);
        assert!(matches!(reply, RotateReply::Unknown));
    }

    /// Rounding of lifetimes never ends a session early.
    #[test]
    fn seconds_round_up() {
        assert_eq!(secs_ceil(Duration::from_millis(1)), 1);
        assert_eq!(secs_ceil(Duration::from_secs(2)), 2);
        assert_eq!(secs_ceil(Duration::from_millis(2001)), 3);
    }

    /// `session_rotate.lua` compares the presented hash with the stored one in every word: a
    /// hash off in any one word, or off in two words by amounts that cancel in a sum, is refused
    /// and leaves the record as it was; the stored hash rotates it.
    #[test]
    fn rotate_script_refuses_a_hash_off_in_any_word() {
        let server = rediskit_testkit::RedisServer::start();
        let mut conn = server.admin();
        let (key, sid) = ("s:{u}", "sid-1");
        let now = unix_now();
        let hash: [u8; HASH_LEN] = std::array::from_fn(|i| 0x40 + i as u8);
        let stored = Record {
            generation: 7,
            hash,
            created: now,
            last_used: now,
            expires: now + 3600,
            rotated: now,
            device: "d".into(),
            metadata: Vec::new(),
        }
        .encode();
        redis::cmd("HSET")
            .arg(key)
            .arg(sid)
            .arg(&stored)
            .exec(&mut conn)
            .unwrap();
        let next = [1u8; HASH_LEN];
        let rotate = |conn: &mut redis::Connection, presented: &[u8; HASH_LEN]| -> redis::Value {
            let args = RotateArgs {
                sid,
                generation: 7,
                presented,
                next: &next,
                ttl: 3600,
                idle: 0,
                grace: 0,
            };
            crate::scripts::SESSION_ROTATE
                .redis()
                .key(key)
                .arg(sid)
                .arg(&args.packed()[..])
                .invoke(conn)
                .unwrap()
        };

        let mut wrong = Vec::new();
        for word in 0..4 {
            // Its lowest bit, and its highest.
            let mut low = hash;
            low[4 * word + 3] ^= 1;
            let mut high = hash;
            high[4 * word] ^= 0x80;
            wrong.extend([low, high]);
        }
        // The first word one more, the second one less: their differences sum to zero.
        let mut cancelling = hash;
        cancelling[3] += 1;
        cancelling[7] -= 1;
        wrong.push(cancelling);
        for presented in &wrong {
            assert_eq!(
                rotate(&mut conn, presented),
                redis::Value::Int(0),
                "{presented:?}"
            );
        }
        let kept: Vec<u8> = redis::cmd("HGET")
            .arg(key)
            .arg(sid)
            .query(&mut conn)
            .unwrap();
        assert_eq!(kept, stored);

        let redis::Value::BulkString(rotated) = rotate(&mut conn, &hash) else {
            panic!("the stored hash did not rotate the session");
        };
        let rotated = Record::decode(&rotated).unwrap();
        assert_eq!((rotated.generation, rotated.hash), (8, next));
    }

    /// A session record of generation 7 with hash `[3; HASH_LEN]`, created `age` seconds ago
    /// and live for an hour.
    fn planted(age: u32) -> Record {
        let now = unix_now();
        Record {
            generation: 7,
            hash: [3; HASH_LEN],
            created: now - age,
            last_used: now - age,
            expires: now + 3600,
            rotated: now - age,
            device: "d".into(),
            metadata: Vec::new(),
        }
    }

    fn rotate_args(next: &[u8; HASH_LEN]) -> RotateArgs<'_> {
        RotateArgs {
            sid: "sid-1",
            generation: 7,
            presented: &[3; HASH_LEN],
            next,
            ttl: 3600,
            idle: 0,
            grace: 0,
        }
    }

    /// The same rotation command arriving twice (a cluster connection sends a command again
    /// when its connection dropped before the reply, and the first may have run) answers the
    /// rotated record both times and ends nothing; the same token rotated by another call, with
    /// another next secret, is reuse and ends the session. In the script and the memory engine.
    #[test]
    fn a_rotation_sent_twice_is_not_reuse() {
        let (key, sid) = ("s:{u}", "sid-1");
        let (next, other) = ([5u8; HASH_LEN], [6u8; HASH_LEN]);

        let server = rediskit_testkit::RedisServer::start();
        let mut conn = server.admin();
        redis::cmd("HSET")
            .arg(key)
            .arg(sid)
            .arg(planted(0).encode())
            .exec(&mut conn)
            .unwrap();
        let mut rotate = |next: &[u8; HASH_LEN]| -> redis::Value {
            crate::scripts::SESSION_ROTATE
                .redis()
                .key(key)
                .arg(sid)
                .arg(&rotate_args(next).packed()[..])
                .invoke(&mut conn)
                .unwrap()
        };
        let first = rotate(&next);
        let redis::Value::BulkString(record) = &first else {
            panic!("the rotation did not rotate: {first:?}");
        };
        let record = Record::decode(record).unwrap();
        assert_eq!((record.generation, record.hash), (8, next));
        assert_eq!(rotate(&next), first, "the command sent again");
        assert_eq!(rotate(&other), redis::Value::Int(4), "another call: reuse");
        let left: bool = redis::cmd("HEXISTS")
            .arg(key)
            .arg(sid)
            .query(&mut server.admin())
            .unwrap();
        assert!(!left, "reuse ends the session");

        let mut map = HashMap::from([(sid.to_owned(), planted(0).encode())]);
        let now = unix_now();
        let (RotateReply::Current(first), _) = engine::rotate(&mut map, &rotate_args(&next), now)
        else {
            panic!("the memory engine did not rotate");
        };
        assert_eq!((first.generation, first.hash), (8, next));
        let (again, _) = engine::rotate(&mut map, &rotate_args(&next), now);
        assert!(matches!(again, RotateReply::Current(ref r) if *r == first));
        let (other, _) = engine::rotate(&mut map, &rotate_args(&other), now);
        assert!(matches!(other, RotateReply::Reused));
        assert!(map.is_empty());
    }

    /// The same creation command arriving twice at the cap evicts once: the second finds its
    /// session there and leaves the others. In the script and the memory engine.
    #[test]
    fn a_creation_sent_twice_evicts_once() {
        let key = "s:{u}";
        let args = CreateArgs {
            sid: "new",
            hash: &[4; HASH_LEN],
            ttl: 3600,
            idle: 0,
            max: 2,
            device: "d",
            metadata: b"",
        };
        let packed = args.packed();

        let server = rediskit_testkit::RedisServer::start();
        let mut conn = server.admin();
        redis::cmd("HSET")
            .arg(key)
            .arg("oldest")
            .arg(planted(20).encode())
            .arg("older")
            .arg(planted(10).encode())
            .exec(&mut conn)
            .unwrap();
        redis::cmd("EXPIRE")
            .arg(key)
            .arg(7200)
            .exec(&mut conn)
            .unwrap();
        let mut create = || -> redis::Value {
            crate::scripts::SESSION_CREATE
                .redis()
                .key(key)
                .arg(args.sid)
                .arg(&packed[..])
                .invoke(&mut conn)
                .unwrap()
        };
        let first = create();
        assert!(
            matches!(&first, redis::Value::Array(reply) if reply.get(1) == Some(&redis::Value::Int(1))),
            "one evicted: {first:?}"
        );
        // The key's expiry shortened in between, as if the first run's bound were a step lower
        // than the second's: the record the second run writes must still be covered.
        redis::cmd("EXPIRE")
            .arg(key)
            .arg(5)
            .exec(&mut server.admin())
            .unwrap();
        let again = create();
        assert!(
            matches!(again, redis::Value::Int(_)),
            "none evicted: {again:?}"
        );
        let ttl: i64 = redis::cmd("TTL")
            .arg(key)
            .query(&mut server.admin())
            .unwrap();
        // About the session's hour (less what the clock moved since), not the 5 s set.
        assert!(
            ttl > 3500,
            "the key outlives the session sent again: {ttl} s"
        );
        let mut fields: Vec<String> = redis::cmd("HKEYS")
            .arg(key)
            .query(&mut server.admin())
            .unwrap();
        fields.sort();
        assert_eq!(fields, ["new", "older"]);

        let mut map = HashMap::from([
            ("oldest".to_owned(), planted(20).encode()),
            ("older".to_owned(), planted(10).encode()),
        ]);
        let now = unix_now();
        let ((_, _, evicted), _) = engine::create(&mut map, &args, now);
        assert_eq!(evicted, 1);
        let ((_, _, evicted), _) = engine::create(&mut map, &args, now);
        assert_eq!(evicted, 0);
        let mut fields: Vec<_> = map.into_keys().collect();
        fields.sort();
        assert_eq!(fields, ["new", "older"]);
    }
}
