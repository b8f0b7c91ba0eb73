//! The service's configuration: the Redis variables of the library plus the service's own.

use std::net::SocketAddr;
use std::time::Duration;

use rand::RngCore;
use rediskit::{Config, Secret};

/// Default listen address.
pub const DEFAULT_LISTEN_ADDR: &str = "127.0.0.1:8080";
/// Default access-token lifetime.
pub const DEFAULT_ACCESS_TOKEN_TTL_SECS: u64 = 900;
/// Default refresh-token lifetime (30 days).
pub const DEFAULT_REFRESH_TOKEN_TTL_SECS: u64 = 2_592_000;
/// Default cost of the demo computation.
pub const DEFAULT_DEMO_COMPUTE_MS: u64 = 50;
/// Default time the demo computation's result is fresh (HTTP_API.md: 600 s).
pub const DEFAULT_DEMO_CACHE_TTL_SECS: u64 = 600;
/// Default stale-while-revalidate window of the demo computation's result.
pub const DEFAULT_DEMO_STALE_SECS: u64 = 60;
/// Default login attempts per minute per username and address.
pub const DEFAULT_RATE_LIMIT_LOGIN_PER_MIN: u32 = 10;
/// Default requests per minute per address on the other `/auth/*` routes.
pub const DEFAULT_RATE_LIMIT_AUTH_PER_MIN: u32 = 100;
/// Default of `SESSION_REVOKE_WAIT_MS`.
pub const DEFAULT_REVOKE_WAIT_MS: u64 = 100;
/// Shortest accepted `JWT_SECRET`, in bytes.
pub const MIN_JWT_SECRET_LEN: usize = 32;

/// Everything `rediskit serve` needs.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// Redis.
    pub redis: Config,
    /// True when a Redis was configured (`REDIS_URL`, or production): then the service never
    /// falls back to the embedded backend.
    pub redis_configured: bool,
    /// `LISTEN_ADDR`. Default: 127.0.0.1:8080.
    pub listen: SocketAddr,
    /// `JWT_SECRET`: signs access tokens and keys refresh-token MACs.
    pub jwt_secret: Secret,
    /// True when `JWT_SECRET` was missing and a random one was generated (development only).
    pub jwt_secret_generated: bool,
    /// `ACCESS_TOKEN_TTL_SECS`. Default: 900.
    pub access_ttl: Duration,
    /// `REFRESH_TOKEN_TTL_SECS`. Default: 2592000.
    pub refresh_ttl: Duration,
    /// `DEMO_COMPUTE_MS`. Default: 50.
    pub demo_compute: Duration,
    /// `DEMO_CACHE_TTL_SECS`: how long the demo computation's result is fresh. Default: 600.
    pub demo_cache_ttl: Duration,
    /// `DEMO_STALE_SECS`: how long past that the result is still served (`X-Cache: STALE`)
    /// while it is recomputed in the background; 0 turns stale serving off. Default: 60.
    pub demo_stale: Duration,
    /// `RATE_LIMIT_LOGIN_PER_MIN`. Default: 10.
    pub login_per_min: u32,
    /// `RATE_LIMIT_AUTH_PER_MIN`. Default: 100.
    pub auth_per_min: u32,
    /// `TRUST_FORWARDED_FOR`. Default: false.
    pub trust_forwarded_for: bool,
    /// Replicas that must acknowledge a logout before it answers (`WAIT`); 0 = do not wait.
    pub revoke_wait_replicas: u32,
    /// How long a logout waits for them.
    pub revoke_wait: Duration,
    /// `NEAR_CACHE_SESSIONS`: keep the per-request session check in process memory, invalidated
    /// by Redis (client-side caching). Default: true.
    pub near_cache_sessions: bool,
}

/// A configuration error: the message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ServiceConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads configuration through `lookup`; empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let redis =
            Config::from_lookup(&lookup).map_err(|err| ConfigError(err.message().into()))?;
        let production = redis.environment.is_production();
        // Named explicitly: no falling back to the embedded store when it cannot be reached.
        let redis_configured = production
            || get("REDIS_URL").is_some()
            || !redis.cluster_nodes.is_empty()
            || !redis.sentinel_nodes.is_empty();

        let listen_text = get("LISTEN_ADDR").unwrap_or_else(|| DEFAULT_LISTEN_ADDR.to_owned());
        let listen = listen_text.trim().parse().map_err(|_| {
            ConfigError(format!(
                "LISTEN_ADDR: expected an address like 127.0.0.1:8080, got `{listen_text}`"
            ))
        })?;

        let (jwt_secret, jwt_secret_generated) = match get("JWT_SECRET") {
            Some(secret) if secret.len() >= MIN_JWT_SECRET_LEN => (Secret::new(secret), false),
            Some(secret) => {
                return Err(ConfigError(format!(
                    "JWT_SECRET: must be at least {MIN_JWT_SECRET_LEN} bytes, got {}",
                    secret.len()
                )));
            }
            None if production => {
                return Err(ConfigError(format!(
                    "JWT_SECRET: required in production (at least {MIN_JWT_SECRET_LEN} random \
                     bytes, e.g. `openssl rand -base64 48`)"
                )));
            }
            None => {
                let mut bytes = [0u8; 32];
                rand::rng().fill_bytes(&mut bytes);
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                (Secret::new(hex), true)
            }
        };

        let secs = |name: &str, default: u64, min: u64, max: u64| -> Result<u64, ConfigError> {
            number(&get, name, default, min, max)
        };
        let access_ttl = Duration::from_secs(secs(
            "ACCESS_TOKEN_TTL_SECS",
            DEFAULT_ACCESS_TOKEN_TTL_SECS,
            1,
            86_400,
        )?);
        let refresh_ttl = Duration::from_secs(secs(
            "REFRESH_TOKEN_TTL_SECS",
            DEFAULT_REFRESH_TOKEN_TTL_SECS,
            1,
            10 * 365 * 86_400,
        )?);
        let demo_compute =
            Duration::from_millis(secs("DEMO_COMPUTE_MS", DEFAULT_DEMO_COMPUTE_MS, 0, 60_000)?);
        let demo_cache_ttl = Duration::from_secs(secs(
            "DEMO_CACHE_TTL_SECS",
            DEFAULT_DEMO_CACHE_TTL_SECS,
            1,
            86_400,
        )?);
        let demo_stale =
            Duration::from_secs(secs("DEMO_STALE_SECS", DEFAULT_DEMO_STALE_SECS, 0, 86_400)?);
        let login_per_min = secs(
            "RATE_LIMIT_LOGIN_PER_MIN",
            u64::from(DEFAULT_RATE_LIMIT_LOGIN_PER_MIN),
            1,
            1_000_000,
        )? as u32;
        let auth_per_min = secs(
            "RATE_LIMIT_AUTH_PER_MIN",
            u64::from(DEFAULT_RATE_LIMIT_AUTH_PER_MIN),
            1,
            1_000_000,
        )? as u32;
        let revoke_wait_replicas = secs("SESSION_REVOKE_WAIT_REPLICAS", 0, 0, 100)? as u32;
        let revoke_wait = Duration::from_millis(secs(
            "SESSION_REVOKE_WAIT_MS",
            DEFAULT_REVOKE_WAIT_MS,
            1,
            60_000,
        )?);
        if revoke_wait_replicas > 0 && revoke_wait >= redis.command_timeout {
            return Err(ConfigError(format!(
                "SESSION_REVOKE_WAIT_MS: must be shorter than REDIS_COMMAND_TIMEOUT_MS ({} ms), \
                 got {} ms",
                redis.command_timeout.as_millis(),
                revoke_wait.as_millis()
            )));
        }
        let trust_forwarded_for = flag(&get, "TRUST_FORWARDED_FOR", false)?;
        let near_cache_sessions = flag(&get, "NEAR_CACHE_SESSIONS", true)?;
        Ok(Self {
            redis,
            redis_configured,
            listen,
            jwt_secret,
            jwt_secret_generated,
            access_ttl,
            refresh_ttl,
            demo_compute,
            demo_cache_ttl,
            demo_stale,
            login_per_min,
            auth_per_min,
            trust_forwarded_for,
            revoke_wait_replicas,
            revoke_wait,
            near_cache_sessions,
        })
    }
}

fn flag(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: bool,
) -> Result<bool, ConfigError> {
    match get(name).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if matches!(v.as_str(), "true" | "1" | "yes") => Ok(true),
        Some(v) if matches!(v.as_str(), "false" | "0" | "no") => Ok(false),
        Some(v) => Err(ConfigError(format!(
            "{name}: expected true or false, got `{v}`"
        ))),
    }
}

fn number(
    get: &impl Fn(&str) -> Option<String>,
    name: &str,
    default: u64,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    let Some(text) = get(name) else {
        return Ok(default);
    };
    match text.trim().parse::<u64>() {
        Ok(value) if (min..=max).contains(&value) => Ok(value),
        _ => Err(ConfigError(format!(
            "{name}: expected a whole number between {min} and {max}, got `{}`",
            text.trim()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<ServiceConfig, ConfigError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        ServiceConfig::from_lookup(|name| map.get(name).cloned())
    }

    /// The defaults of HTTP_API.md, and a generated secret in development.
    #[test]
    fn defaults() {
        let config = from(&[]).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(config.access_ttl, Duration::from_secs(900));
        assert_eq!(config.refresh_ttl, Duration::from_secs(2_592_000));
        assert_eq!(config.demo_compute, Duration::from_millis(50));
        assert_eq!(config.demo_cache_ttl, Duration::from_secs(600));
        assert_eq!(config.demo_stale, Duration::from_secs(60));
        assert_eq!((config.login_per_min, config.auth_per_min), (10, 100));
        assert!(!config.trust_forwarded_for);
        assert!(config.near_cache_sessions);
        assert!(config.jwt_secret_generated);
        assert!(config.jwt_secret.expose().len() >= 32);
        assert!(!config.redis_configured);
    }

    /// Production needs a real secret; a short one is refused anywhere.
    #[test]
    fn secrets() {
        let err = from(&[("ENVIRONMENT", "production")]).unwrap_err();
        assert!(err.0.starts_with("JWT_SECRET"), "{err}");
        let err = from(&[("JWT_SECRET", "short")]).unwrap_err();
        assert!(err.0.starts_with("JWT_SECRET"), "{err}");
        let config = from(&[
            ("ENVIRONMENT", "production"),
            ("JWT_SECRET", &"k".repeat(32)),
        ])
        .unwrap();
        assert!(config.redis_configured);
        assert!(!config.jwt_secret_generated);
    }

    /// A cluster or sentinels named in development are used or fail; never the memory fallback.
    /// A logout WAIT must fit in the command deadline.
    #[test]
    fn topology_and_revocation_wait() {
        assert!(
            from(&[("REDIS_CLUSTER_NODES", "a:7000")])
                .unwrap()
                .redis_configured
        );
        let config = from(&[
            ("REDIS_SENTINEL_NODES", "s:26379"),
            ("REDIS_SENTINEL_MASTER", "m"),
            ("SESSION_REVOKE_WAIT_REPLICAS", "1"),
        ])
        .unwrap();
        assert!(config.redis_configured);
        assert_eq!(config.revoke_wait_replicas, 1);
        assert_eq!(config.revoke_wait, Duration::from_millis(100));
        let err = from(&[
            ("SESSION_REVOKE_WAIT_REPLICAS", "1"),
            ("SESSION_REVOKE_WAIT_MS", "900"),
        ])
        .unwrap_err();
        assert!(err.0.starts_with("SESSION_REVOKE_WAIT_MS"), "{err}");
    }

    /// The demo cache's TTL and stale window are read; a zero window is allowed (off).
    #[test]
    fn demo_cache_settings() {
        let config = from(&[("DEMO_CACHE_TTL_SECS", "2"), ("DEMO_STALE_SECS", "0")]).unwrap();
        assert_eq!(config.demo_cache_ttl, Duration::from_secs(2));
        assert_eq!(config.demo_stale, Duration::ZERO);
    }

    /// The session near-cache can be turned off.
    #[test]
    fn near_cache_switch() {
        assert!(
            !from(&[("NEAR_CACHE_SESSIONS", "false")])
                .unwrap()
                .near_cache_sessions
        );
        assert!(
            from(&[("NEAR_CACHE_SESSIONS", "1")])
                .unwrap()
                .near_cache_sessions
        );
    }

    /// A bad value names its variable.
    #[test]
    fn bad_values() {
        for (name, value) in [
            ("LISTEN_ADDR", "nowhere"),
            ("ACCESS_TOKEN_TTL_SECS", "0"),
            ("REFRESH_TOKEN_TTL_SECS", "x"),
            ("DEMO_COMPUTE_MS", "-1"),
            ("DEMO_CACHE_TTL_SECS", "0"),
            ("DEMO_CACHE_TTL_SECS", "ten"),
            ("DEMO_STALE_SECS", "-5"),
            ("DEMO_STALE_SECS", "86401"),
            ("RATE_LIMIT_LOGIN_PER_MIN", "0"),
            ("RATE_LIMIT_AUTH_PER_MIN", "lots"),
            ("TRUST_FORWARDED_FOR", "maybe"),
            ("NEAR_CACHE_SESSIONS", "sometimes"),
            ("REDIS_COMMAND_TIMEOUT_MS", "0"),
            ("SESSION_REVOKE_WAIT_REPLICAS", "-1"),
            ("SESSION_REVOKE_WAIT_MS", "0"),
        ] {
            let err = from(&[(name, value)]).unwrap_err();
            assert!(err.0.contains(name), "{name}: {err}");
        }
    }
}
