//! Configuration: where Redis is, how long to wait for it, how many connections to keep.
//!
//! Build it from the environment with [`Config::from_env`] (the variables of the original
//! module, plus `REDIS_URL`), or in code with [`Config::builder`]. Both validate: a bad value is an
//! [`ErrorKind::Config`](crate::ErrorKind::Config) error whose message names the variable or field
//! and says what is wrong with it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

/// Redis URL used in development when nothing else is configured.
pub const DEFAULT_DEV_URL: &str = "redis://localhost:6379/0";
/// Host used in production when neither `REDIS_URL` nor `REDIS_HOST` is set: the docker-compose
/// service name.
pub const DEFAULT_PRODUCTION_HOST: &str = "redis";
/// Host used in development when `DEV_REDIS_HOST` is not set.
pub const DEFAULT_DEV_HOST: &str = "localhost";
/// Redis port when none is given.
pub const DEFAULT_PORT: u16 = 6379;
/// Number of connections the handle keeps open.
pub const DEFAULT_MAX_CONNECTIONS: usize = 20;
/// Deadline for establishing one connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Deadline for one command, from send to reply.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_millis(500);
/// Interval of the background `PING` that keeps idle connections honest.
pub const DEFAULT_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(30);
/// Prefix of every key rediskit writes, so it can share a database with other users.
pub const DEFAULT_KEY_PREFIX: &str = "rk:";
/// Consecutive unavailability failures that open the circuit breaker.
pub const DEFAULT_BREAKER_THRESHOLD: u32 = 5;
/// How long an open circuit fails calls fast before one probes.
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_secs(1);

/// Upper bound of [`Config::max_connections`].
pub const MAX_CONNECTIONS_LIMIT: usize = 1024;
/// Upper bound of the timeouts, so a typo cannot make a call wait for hours.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Highest database number accepted (a URL's path, `REDIS_DB`): Redis's `databases` is far lower
/// in practice, and a number past this is a typo.
const MAX_DB: u32 = 1 << 20;
/// Shortest background health-check interval accepted (other than 0, off): each check pings
/// every connection.
const MIN_HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// Longest background health-check interval accepted.
const MAX_HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(86_400);

/// Which set of variables [`Config::from_env`] reads, and how strict it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Environment {
    /// Local work: `DEV_REDIS_*` variables, `localhost` by default.
    #[default]
    Development,
    /// Deployed: `REDIS_*` variables, the docker service name `redis` by default, and no
    /// fallback to the embedded backend.
    Production,
}

impl Environment {
    /// `true` for [`Environment::Production`].
    pub fn is_production(self) -> bool {
        self == Environment::Production
    }

    fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "development" | "dev" => Some(Environment::Development),
            "production" | "prod" => Some(Environment::Production),
            _ => None,
        }
    }
}

impl fmt::Display for Environment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Environment::Development => "development",
            Environment::Production => "production",
        })
    }
}

/// A secret string (a password). Its `Debug` and `Display` never show the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself. Keep it out of logs.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(set)")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

/// Everything [`Client::connect`](crate::Client::connect) needs.
///
/// Fields are public to read and to adjust; [`Config::validate`] (called by `connect`) checks them.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Development or production. Default: [`Environment::Development`].
    pub environment: Environment,
    /// Where Redis is: `redis://[user[:password]@]host[:port][/db]`, `rediss://...` for TLS,
    /// `redis+unix:///path`, or `memory://` for the embedded in-process backend.
    /// Default: [`DEFAULT_DEV_URL`].
    pub url: String,
    /// ACL user name, when not in the URL. Default: none.
    pub username: Option<String>,
    /// Password, when not in the URL; takes precedence over one in the URL. Default: none.
    pub password: Option<Secret>,
    /// Connections kept open to Redis. Each is multiplexed: any number of concurrent calls share
    /// them, so a burst queues instead of failing. Calls take turns on one connection per worker
    /// thread of the runtime the client is made in; the others take only bursts of more than 128
    /// calls in flight on each of those. Default: [`DEFAULT_MAX_CONNECTIONS`].
    pub max_connections: usize,
    /// Auto-pipelining: once 4 calls are in flight on a connection, the commands of concurrent
    /// callers queue and leave together, as one write (docs/decisions/0006-auto-pipelining.md).
    /// Off: every command goes to the connection as it is sent. Not used on a Cluster, where a
    /// batch could span nodes. Default: on.
    pub auto_pipeline: bool,
    /// Deadline for establishing a connection. Default: [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// Deadline for every command. Default: [`DEFAULT_COMMAND_TIMEOUT`].
    pub command_timeout: Duration,
    /// Interval of the background health `PING`: zero disables it, otherwise 100 ms to 1 day.
    /// Default: [`DEFAULT_HEALTH_CHECK_INTERVAL`].
    pub health_check_interval: Duration,
    /// Prefix of every key rediskit writes. Default: [`DEFAULT_KEY_PREFIX`].
    pub key_prefix: String,
    /// Consecutive unavailability failures (refused, dropped, timed out) after which calls fail
    /// fast for [`Config::breaker_cooldown`]; 0 disables the breaker.
    /// Default: [`DEFAULT_BREAKER_THRESHOLD`].
    pub breaker_threshold: u32,
    /// How long an open circuit fails fast before letting one probe call through.
    /// Default: [`DEFAULT_BREAKER_COOLDOWN`].
    pub breaker_cooldown: Duration,
    /// PEM file of the certificate authority (or authorities) that signed the server's
    /// certificate, for a `rediss://` server with a private CA. When set, it *replaces* the
    /// system's trust store for this connection. Only with a `rediss://` URL.
    /// Default: none (the system's trusted roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (chain) to present to a server that requires mutual
    /// TLS (`tls-auth-clients yes`). Set together with [`Config::tls_key_file`]; only with a
    /// `rediss://` URL. Default: none (no client certificate).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file of the private key of [`Config::tls_cert_file`]. Its contents are read when the
    /// client is built and never logged. Default: none.
    pub tls_key_file: Option<PathBuf>,
    /// Seed nodes (`host:port`) of a Redis Cluster. When not empty rediskit talks to the cluster:
    /// it learns every node from the seeds, follows `MOVED`/`ASK` redirections and failovers, and
    /// [`Config::url`] only contributes its scheme (`rediss://` for TLS) and credentials; the
    /// database must be 0. Default: empty (not a cluster).
    pub cluster_nodes: Vec<String>,
    /// Sentinels (`host:port`) to ask where the primary named [`Config::sentinel_master`] is.
    /// When not empty rediskit connects to that primary and follows it to whichever replica the
    /// sentinels promote; [`Config::url`] contributes its scheme, credentials and database.
    /// Default: empty (no Sentinel).
    pub sentinel_nodes: Vec<String>,
    /// Name of the primary the sentinels monitor (`sentinel monitor <name> …`); required with
    /// [`Config::sentinel_nodes`]. Default: none.
    pub sentinel_master: Option<String>,
    /// ACL user to authenticate to the sentinels as, when they have ACL users. Default: none.
    pub sentinel_username: Option<String>,
    /// Password the sentinels require (their `requirepass`, or [`Config::sentinel_username`]'s).
    /// The data credentials ([`Config::password`], the URL's) are never sent to the sentinels:
    /// they are a different server with users of their own. Default: none.
    pub sentinel_password: Option<Secret>,
    /// Reach the sentinels over TLS, trusting [`Config::tls_ca_file`] (else the system's roots)
    /// and presenting [`Config::tls_cert_file`] if set, as the data connection does. Off: the
    /// sentinels are asked in plaintext, whatever the URL's scheme. Default: off.
    pub sentinel_tls: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            environment: Environment::Development,
            url: DEFAULT_DEV_URL.to_owned(),
            username: None,
            password: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            auto_pipeline: true,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            health_check_interval: DEFAULT_HEALTH_CHECK_INTERVAL,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            breaker_threshold: DEFAULT_BREAKER_THRESHOLD,
            breaker_cooldown: DEFAULT_BREAKER_COOLDOWN,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            cluster_nodes: Vec::new(),
            sentinel_nodes: Vec::new(),
            sentinel_master: None,
            sentinel_username: None,
            sentinel_password: None,
            sentinel_tls: false,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("environment", &self.environment)
            .field("url", &redact_url(&self.url))
            .field("username", &self.username)
            .field("password", &self.password)
            .field("max_connections", &self.max_connections)
            .field("auto_pipeline", &self.auto_pipeline)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("health_check_interval", &self.health_check_interval)
            .field("key_prefix", &self.key_prefix)
            .field("breaker_threshold", &self.breaker_threshold)
            .field("breaker_cooldown", &self.breaker_cooldown)
            // Paths only: the files' contents (a private key among them) are never shown.
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("cluster_nodes", &self.cluster_nodes)
            .field("sentinel_nodes", &self.sentinel_nodes)
            .field("sentinel_master", &self.sentinel_master)
            .field("sentinel_username", &self.sentinel_username)
            .field("sentinel_password", &self.sentinel_password)
            .field("sentinel_tls", &self.sentinel_tls)
            .finish()
    }
}

/// The URL with any password replaced by `***`, safe to log: the userinfo's password, and the
/// value of a `pass` or `password` query parameter (`redis+unix:///run/redis.sock?pass=…`).
///
/// The userinfo runs to the *last* `@`: in a URL that does not parse, a password may hold `/`,
/// `?` or `#`, and the error message that shows the URL must not show it. (A `@` further on, in a
/// query, then hides a little more than the password; never less: the query's passwords are
/// hidden first, wherever the userinfo ends.) Text without `://` is no URL to take apart, and
/// everything before its last `@` is hidden (`redis:/:pw@host`, a slash short).
pub fn redact_url(url: &str) -> String {
    let url = redact_query_passwords(url);
    let Some(scheme_end) = url.find("://") else {
        return match url.rfind('@') {
            Some(at) => format!("***{}", &url[at..]),
            None => url,
        };
    };
    let rest = &url[scheme_end + 3..];
    let mut out = format!("{}://", &url[..scheme_end]);
    match rest.rfind('@') {
        Some(at) => {
            let userinfo = &rest[..at];
            match userinfo.find(':') {
                Some(colon) => out.push_str(&format!("{}:***@", &userinfo[..colon])),
                None if userinfo.is_empty() => out.push('@'),
                // `redis://secret@host` carries a password without a user name.
                None => out.push_str("***@"),
            }
            out.push_str(&rest[at + 1..]);
        }
        None => out.push_str(rest),
    }
    out
}

/// `text` with the value of every `pass=` or `password=` parameter (one that follows a `?` or
/// an `&`) replaced by `***`, up to the next `&`.
fn redact_query_passwords(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut parameter = false;
    for segment in text.split_inclusive(['?', '&']) {
        let (body, delimiter) = match segment.strip_suffix(['?', '&']) {
            Some(body) => (body, &segment[body.len()..]),
            None => (segment, ""),
        };
        match body.split_once('=') {
            // All of the value, a `#` included: in a URL that does not parse, it may be the
            // password's.
            Some((name, _)) if parameter && matches!(name, "pass" | "password") => {
                out.push_str(name);
                out.push_str("=***");
            }
            _ => out.push_str(body),
        }
        out.push_str(delimiter);
        parameter = !delimiter.is_empty();
    }
    out
}

/// The kind of server a URL points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scheme {
    Redis,
    Memory,
    Cluster,
    Sentinel,
}

impl Config {
    /// A builder starting from the defaults.
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder {
            config: Config::default(),
        }
    }

    /// Reads the process environment. See [`Config::from_lookup`] for the variables. A variable
    /// set to bytes that are not UTF-8 is an error naming it, not a variable left unset.
    pub fn from_env() -> Result<Self> {
        Self::from_os_lookup(|name| std::env::var_os(name))
    }

    /// [`Config::from_lookup`] over raw values, as the environment holds them.
    fn from_os_lookup(lookup: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<Self> {
        let garbled = std::cell::RefCell::new(None);
        let config = Self::from_lookup(|name| {
            let value = lookup(name)?;
            match value.into_string() {
                Ok(text) => Some(text),
                Err(_) => {
                    garbled.borrow_mut().get_or_insert_with(|| name.to_owned());
                    None
                }
            }
        });
        if let Some(name) = garbled.into_inner() {
            return Err(Error::config(format!("{name}: not valid UTF-8")));
        }
        config
    }

    /// Reads configuration through `lookup` (a variable name to its value), so tests and other
    /// sources need not touch the process environment.
    ///
    /// | variable | meaning | default |
    /// |---|---|---|
    /// | `ENVIRONMENT` | `development` or `production` | `development` |
    /// | `REDIS_URL` | full URL; wins over host/port/db | built from the next rows |
    /// | `REDIS_HOST`, `REDIS_PORT`, `REDIS_DB` | production server | `redis`, 6379, 0 |
    /// | `DEV_REDIS_HOST`, `DEV_REDIS_PORT`, `DEV_REDIS_DB` | development server | `localhost`, 6379, 0 |
    /// | `REDIS_USERNAME`, `REDIS_PASSWORD` | ACL credentials | none |
    /// | `REDIS_MAX_CONNECTIONS` | connections kept open | 20 |
    /// | `REDIS_AUTO_PIPELINE` | `false`: send every command as it comes, never batched | `true` |
    /// | `REDIS_CONNECT_TIMEOUT_MS` | connect deadline | 1000 |
    /// | `REDIS_COMMAND_TIMEOUT_MS` | per-command deadline | 500 |
    /// | `REDIS_HEALTH_CHECK_INTERVAL_SECS` | background PING interval, 0 = off | 30 |
    /// | `REDIS_KEY_PREFIX` | prefix of every key | `rk:` |
    /// | `REDIS_BREAKER_THRESHOLD` | consecutive failures that open the circuit, 0 = off | 5 |
    /// | `REDIS_BREAKER_COOLDOWN_MS` | how long an open circuit fails fast | 1000 |
    /// | `REDIS_TLS_CA_FILE` | PEM CA that signed the server's certificate (`rediss://` only) | system roots |
    /// | `REDIS_TLS_CERT_FILE`, `REDIS_TLS_KEY_FILE` | PEM client certificate and key for mutual TLS, both or neither | none |
    /// | `REDIS_CLUSTER_NODES` | comma-separated `host:port` seeds of a Redis Cluster; wins over the URL's host | none |
    /// | `REDIS_SENTINEL_NODES` | comma-separated `host:port` sentinels | none |
    /// | `REDIS_SENTINEL_MASTER` | name of the primary the sentinels monitor | none |
    /// | `REDIS_SENTINEL_USERNAME`, `REDIS_SENTINEL_PASSWORD` | credentials the sentinels require | none |
    /// | `REDIS_SENTINEL_TLS` | `true`: reach the sentinels over TLS (same CA and client certificate as the data) | `false` |
    ///
    /// Empty variables count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| lookup(name).filter(|value| !value.trim().is_empty());
        let mut config = Config::default();

        if let Some(value) = get("ENVIRONMENT") {
            config.environment = Environment::parse(&value).ok_or_else(|| {
                Error::config(format!(
                    "ENVIRONMENT: expected `development` or `production`, got `{value}`"
                ))
            })?;
        }

        let list = |name: &str| -> Result<Vec<String>> {
            let Some(text) = get(name) else {
                return Ok(Vec::new());
            };
            let nodes: Vec<String> = text
                .split(',')
                .map(str::trim)
                .filter(|node| !node.is_empty())
                .map(str::to_owned)
                .collect();
            for node in &nodes {
                parse_node(node).map_err(|why| Error::config(format!("{name}: {why}")))?;
            }
            Ok(nodes)
        };
        config.cluster_nodes = list("REDIS_CLUSTER_NODES")?;
        config.sentinel_nodes = list("REDIS_SENTINEL_NODES")?;
        config.sentinel_master = get("REDIS_SENTINEL_MASTER").map(|name| name.trim().to_owned());
        config.sentinel_username =
            get("REDIS_SENTINEL_USERNAME").map(|name| name.trim().to_owned());
        config.sentinel_password = get("REDIS_SENTINEL_PASSWORD").map(Secret::new);
        // The same words as the service's own switches (NEAR_CACHE_SESSIONS, ...).
        let flag = |name: &str, default: bool| -> Result<bool> {
            let Some(value) = get(name) else {
                return Ok(default);
            };
            match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => Ok(true),
                "false" | "0" | "no" => Ok(false),
                _ => Err(Error::config(format!(
                    "{name}: expected `true` or `false`, got `{value}`"
                ))),
            }
        };
        config.sentinel_tls = flag("REDIS_SENTINEL_TLS", config.sentinel_tls)?;
        config.auto_pipeline = flag("REDIS_AUTO_PIPELINE", config.auto_pipeline)?;

        config.url = match get("REDIS_URL") {
            Some(url) => {
                check_url(&url).map_err(|why| Error::config(format!("REDIS_URL: {why}")))?;
                url.trim().to_owned()
            }
            None => {
                let (prefix, default_host) = if config.environment.is_production() {
                    ("REDIS_", DEFAULT_PRODUCTION_HOST)
                } else {
                    ("DEV_REDIS_", DEFAULT_DEV_HOST)
                };
                let host_var = format!("{prefix}HOST");
                let host = get(&host_var).unwrap_or_else(|| default_host.to_owned());
                let host = check_host(host.trim())
                    .map_err(|why| Error::config(format!("{host_var}: {why}")))?;
                let port_var = format!("{prefix}PORT");
                let port = match get(&port_var) {
                    Some(text) => parse_number::<u16>(&port_var, &text, 1, u16::MAX as u64)?,
                    None => DEFAULT_PORT,
                };
                let db_var = format!("{prefix}DB");
                let db = match get(&db_var) {
                    Some(text) => parse_number::<u32>(&db_var, &text, 0, MAX_DB.into())?,
                    None => 0,
                };
                format!("redis://{host}:{port}/{db}")
            }
        };

        config.username = get("REDIS_USERNAME").map(|name| name.trim().to_owned());
        if let Some(username) = &config.username {
            check_username(username)
                .map_err(|why| Error::config(format!("REDIS_USERNAME: {why}")))?;
        }
        config.password = get("REDIS_PASSWORD").map(Secret::new);
        if let Some(text) = get("REDIS_MAX_CONNECTIONS") {
            config.max_connections = parse_number(
                "REDIS_MAX_CONNECTIONS",
                &text,
                1,
                MAX_CONNECTIONS_LIMIT as u64,
            )?;
        }
        if let Some(text) = get("REDIS_CONNECT_TIMEOUT_MS") {
            config.connect_timeout = Duration::from_millis(parse_number(
                "REDIS_CONNECT_TIMEOUT_MS",
                &text,
                1,
                MAX_TIMEOUT.as_millis() as u64,
            )?);
        }
        if let Some(text) = get("REDIS_COMMAND_TIMEOUT_MS") {
            config.command_timeout = Duration::from_millis(parse_number(
                "REDIS_COMMAND_TIMEOUT_MS",
                &text,
                1,
                MAX_TIMEOUT.as_millis() as u64,
            )?);
        }
        if let Some(text) = get("REDIS_HEALTH_CHECK_INTERVAL_SECS") {
            config.health_check_interval = Duration::from_secs(parse_number(
                "REDIS_HEALTH_CHECK_INTERVAL_SECS",
                &text,
                0,
                86_400,
            )?);
        }
        if let Some(text) = get("REDIS_BREAKER_THRESHOLD") {
            config.breaker_threshold =
                parse_number("REDIS_BREAKER_THRESHOLD", &text, 0, 1_000_000)?;
        }
        if let Some(text) = get("REDIS_BREAKER_COOLDOWN_MS") {
            config.breaker_cooldown = Duration::from_millis(parse_number(
                "REDIS_BREAKER_COOLDOWN_MS",
                &text,
                1,
                MAX_TIMEOUT.as_millis() as u64,
            )?);
        }
        if let Some(prefix) = lookup("REDIS_KEY_PREFIX") {
            crate::keys::check_prefix(&prefix)
                .map_err(|why| Error::config(format!("REDIS_KEY_PREFIX: {why}")))?;
            config.key_prefix = prefix;
        }
        config.tls_ca_file = get("REDIS_TLS_CA_FILE").map(|path| PathBuf::from(path.trim()));
        config.tls_cert_file = get("REDIS_TLS_CERT_FILE").map(|path| PathBuf::from(path.trim()));
        config.tls_key_file = get("REDIS_TLS_KEY_FILE").map(|path| PathBuf::from(path.trim()));
        config.check_tls(TlsNames::VARIABLES)?;
        config
            .check_topology(TopologyNames::VARIABLES)
            .map_err(Error::config)?;
        config.check_credentials(
            "REDIS_USERNAME (or REDIS_URL's user name)",
            "REDIS_SENTINEL_USERNAME",
        )?;

        config
            .validate()
            .map_err(|err| Error::config(format!("{} (from the environment)", err.message())))?;
        Ok(config)
    }

    /// Checks every field; the error names the field and what is wrong with it.
    pub fn validate(&self) -> Result<()> {
        check_url(&self.url).map_err(|why| Error::config(format!("url: {why}")))?;
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&self.max_connections) {
            return Err(Error::config(format!(
                "max_connections: must be between 1 and {MAX_CONNECTIONS_LIMIT}, got {}",
                self.max_connections
            )));
        }
        for (name, value) in [
            ("connect_timeout", self.connect_timeout),
            ("command_timeout", self.command_timeout),
            ("breaker_cooldown", self.breaker_cooldown),
        ] {
            if value.is_zero() || value > MAX_TIMEOUT {
                return Err(Error::config(format!(
                    "{name}: must be between 1 ms and {} s, got {value:?}",
                    MAX_TIMEOUT.as_secs()
                )));
            }
        }
        crate::keys::check_prefix(&self.key_prefix)
            .map_err(|why| Error::config(format!("key_prefix: {why}")))?;
        self.check_topology(TopologyNames::FIELDS)
            .map_err(Error::config)?;
        if let Some(username) = &self.username {
            check_username(username).map_err(|why| Error::config(format!("username: {why}")))?;
        }
        let interval = self.health_check_interval;
        if !interval.is_zero()
            && !(MIN_HEALTH_CHECK_INTERVAL..=MAX_HEALTH_CHECK_INTERVAL).contains(&interval)
        {
            return Err(Error::config(format!(
                "health_check_interval: must be 0 (off) or between {} ms and {} s, got \
                 {interval:?}",
                MIN_HEALTH_CHECK_INTERVAL.as_millis(),
                MAX_HEALTH_CHECK_INTERVAL.as_secs()
            )));
        }
        self.check_credentials("username (or the URL's user name)", "sentinel_username")?;
        self.check_tls(TlsNames::FIELDS)
    }

    /// A user name needs a password: Redis's `AUTH` takes both, and redis-rs sends nothing for
    /// a name alone, so the connection would run as the `default` user without a word. `user`
    /// and `sentinel_user` are the field or variable names the errors mention.
    fn check_credentials(&self, user: &str, sentinel_user: &str) -> Result<()> {
        let alone = "a user name without a password: Redis would not be asked to log in as it, \
                     and the connection would run as the `default` user";
        if self.sentinel_username.is_some() && self.sentinel_password.is_none() {
            return Err(Error::config(format!("{sentinel_user}: {alone}")));
        }
        if self.scheme() == Scheme::Memory {
            return Ok(());
        }
        let info = self.connection_info()?;
        let settings = info.redis_settings();
        if settings.username().is_some() && settings.password().is_none() {
            return Err(Error::config(format!("{user}: {alone}")));
        }
        Ok(())
    }

    /// The TLS files: only with `rediss://`, certificate and key together, each a readable file.
    /// `names` are the field or variable names the errors mention.
    fn check_tls(&self, names: TlsNames) -> Result<()> {
        let files = [
            (names.ca, &self.tls_ca_file),
            (names.cert, &self.tls_cert_file),
            (names.key, &self.tls_key_file),
        ];
        let Some((first, _)) = files.iter().find(|(_, path)| path.is_some()) else {
            return Ok(());
        };
        if !self.url.trim().starts_with("rediss://") && !self.sentinel_tls {
            return Err(Error::config(format!(
                "{first}: TLS settings need a `rediss://` URL (or sentinels over TLS), but the \
                 URL is `{}`",
                redact_url(&self.url)
            )));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(Error::config(format!(
                "{} and {}: a client certificate needs its key; set both or neither",
                names.cert, names.key
            )));
        }
        for (name, path) in files {
            if let Some(path) = path {
                check_readable_file(path).map_err(|why| Error::config(format!("{name}: {why}")))?;
            }
        }
        Ok(())
    }

    /// Cluster or Sentinel settings that contradict each other or the URL. `names` are the
    /// field or variable names the errors mention.
    fn check_topology(&self, names: TopologyNames) -> std::result::Result<(), String> {
        for (name, nodes) in [
            (names.cluster, &self.cluster_nodes),
            (names.sentinels, &self.sentinel_nodes),
        ] {
            for node in nodes {
                parse_node(node).map_err(|why| format!("{name}: {why}"))?;
            }
        }
        let cluster = !self.cluster_nodes.is_empty();
        let sentinel = !self.sentinel_nodes.is_empty();
        if cluster && sentinel {
            return Err(format!(
                "{} and {}: a server is either a cluster or behind sentinels; set one of them",
                names.cluster, names.sentinels
            ));
        }
        if !sentinel && self.sentinel_tls {
            return Err(format!(
                "{}: set, but {} is empty; name the sentinels too",
                names.tls, names.sentinels
            ));
        }
        if self.sentinel_tls && !cfg!(feature = "tls") {
            return Err(format!(
                "{}: TLS needs rediskit's `tls` feature, which this build lacks",
                names.tls
            ));
        }
        if !sentinel && (self.sentinel_username.is_some() || self.sentinel_password.is_some()) {
            return Err(format!(
                "{}: set, but {} is empty; name the sentinels too",
                names.credentials, names.sentinels
            ));
        }
        if let Some(username) = &self.sentinel_username
            && (username.is_empty()
                || username
                    .chars()
                    .any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(format!(
                "{}: `{username}` is not a user name (no spaces or control characters)",
                names.credentials
            ));
        }
        match (&self.sentinel_master, sentinel) {
            (None, true) => {
                return Err(format!(
                    "{}: the sentinels need the name of the primary they monitor; set {}",
                    names.sentinels, names.master
                ));
            }
            (Some(_), false) => {
                return Err(format!(
                    "{}: set, but {} is empty; name the sentinels too",
                    names.master, names.sentinels
                ));
            }
            (Some(master), true)
                if master.is_empty()
                    || master.chars().any(|c| c.is_whitespace() || c.is_control()) =>
            {
                return Err(format!(
                    "{}: `{master}` is not a primary name (no spaces or control characters)",
                    names.master
                ));
            }
            _ => {}
        }
        if cluster || sentinel {
            let what = if cluster {
                names.cluster
            } else {
                names.sentinels
            };
            let url = self.url.trim();
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(format!(
                    "{what}: needs a `redis://` or `rediss://` URL for the scheme and credentials, \
                     but the URL is `{}`",
                    redact_url(url)
                ));
            }
            if cluster
                && let Ok(info) = redis::IntoConnectionInfo::into_connection_info(url)
                && info.redis_settings().db() != 0
            {
                return Err(format!(
                    "{what}: Redis Cluster has only database 0, but the URL selects database {}",
                    info.redis_settings().db()
                ));
            }
        }
        Ok(())
    }

    pub(crate) fn scheme(&self) -> Scheme {
        if self.url.trim().starts_with("memory://") {
            Scheme::Memory
        } else if !self.cluster_nodes.is_empty() {
            Scheme::Cluster
        } else if !self.sentinel_nodes.is_empty() {
            Scheme::Sentinel
        } else {
            Scheme::Redis
        }
    }

    /// The connection details for one node (`host:port`) of a cluster or a sentinel-managed
    /// primary: the URL's scheme, credentials and database, at that address.
    pub(crate) fn node_connection_info(&self, node: &str) -> Result<redis::ConnectionInfo> {
        let (host, port) = parse_node(node).map_err(|why| Error::config(format!("node: {why}")))?;
        self.connection_info_at(host, port)
    }

    /// [`Config::connection_info`] moved to `host:port`.
    pub(crate) fn connection_info_at(
        &self,
        host: String,
        port: u16,
    ) -> Result<redis::ConnectionInfo> {
        let info = self.connection_info()?;
        let addr = match info.addr() {
            redis::ConnectionAddr::TcpTls { insecure, .. } => redis::ConnectionAddr::TcpTls {
                host,
                port,
                insecure: *insecure,
                tls_params: None,
            },
            _ => redis::ConnectionAddr::Tcp(host, port),
        };
        Ok(info.set_addr(addr))
    }

    /// The CA and client certificate for `redis::Client::build_with_tls`, read from their files;
    /// `None` when no TLS file is configured (a `rediss://` URL then trusts the system's roots).
    #[cfg(feature = "tls")]
    pub(crate) fn tls_certificates(&self) -> Result<Option<redis::TlsCertificates>> {
        let read = |name: &str, path: &Path| {
            std::fs::read(path).map_err(|err| {
                Error::config(format!("{name}: cannot read `{}`: {err}", path.display()))
                    .with_source(err)
            })
        };
        let root_cert = match &self.tls_ca_file {
            Some(path) => {
                let pem = read("tls_ca_file", path)?;
                // An empty trust store would reject every server with an obscure handshake error.
                if !contains(&pem, b"-----BEGIN CERTIFICATE-----") {
                    return Err(Error::config(format!(
                        "tls_ca_file: `{}` holds no PEM certificate",
                        path.display()
                    )));
                }
                Some(pem)
            }
            None => None,
        };
        let client_tls = match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                client_cert: read("tls_cert_file", cert)?,
                client_key: read("tls_key_file", key)?,
            }),
            _ => None,
        };
        if root_cert.is_none() && client_tls.is_none() {
            return Ok(None);
        }
        Ok(Some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }))
    }

    /// The connection details for the redis crate, credentials applied.
    pub(crate) fn connection_info(&self) -> Result<redis::ConnectionInfo> {
        use redis::IntoConnectionInfo;
        let info = self.url.trim().into_connection_info().map_err(|err| {
            Error::config(format!("url `{}`: {err}", redact_url(&self.url))).with_source(err)
        })?;
        let mut settings = info.redis_settings().clone();
        if let Some(username) = &self.username {
            settings = settings.set_username(username.clone());
        }
        if let Some(password) = &self.password {
            settings = settings.set_password(password.expose());
        }
        Ok(info.set_redis_settings(settings))
    }
}

fn check_url(url: &str) -> std::result::Result<(), String> {
    let url = url.trim();
    if url == "memory://" || url.starts_with("memory://") {
        return if url == "memory://" {
            Ok(())
        } else {
            Err("`memory://` takes no host or path".to_owned())
        };
    }
    let scheme = url.split("://").next().unwrap_or_default();
    match scheme {
        "redis" | "redis+unix" | "unix" => {}
        "rediss" => {
            if !cfg!(feature = "tls") {
                return Err(
                    "`rediss://` needs rediskit's `tls` feature, which this build lacks".to_owned(),
                );
            }
        }
        _ if !url.contains("://") => {
            return Err(format!(
                "`{}` is not a URL; expected redis://host:port/db, rediss://... or memory://",
                redact_url(url)
            ));
        }
        other => {
            return Err(format!(
                "unsupported scheme `{other}`; expected redis, rediss, redis+unix or memory, in \
                 lower case"
            ));
        }
    }
    use redis::IntoConnectionInfo;
    let info = url
        .into_connection_info()
        .map_err(|err| format!("`{}` is not a valid Redis URL: {err}", redact_url(url)))?;
    let db = info.redis_settings().db();
    if !(0..=i64::from(MAX_DB)).contains(&db) {
        return Err(format!(
            "database {db} of `{}` is not between 0 and {MAX_DB}",
            redact_url(url)
        ));
    }
    Ok(())
}

/// Field and variable names of the Cluster and Sentinel settings, for error messages.
#[derive(Clone, Copy)]
struct TopologyNames {
    cluster: &'static str,
    sentinels: &'static str,
    master: &'static str,
    credentials: &'static str,
    tls: &'static str,
}

impl TopologyNames {
    const FIELDS: Self = Self {
        cluster: "cluster_nodes",
        sentinels: "sentinel_nodes",
        master: "sentinel_master",
        credentials: "sentinel_username/sentinel_password",
        tls: "sentinel_tls",
    };
    const VARIABLES: Self = Self {
        cluster: "REDIS_CLUSTER_NODES",
        sentinels: "REDIS_SENTINEL_NODES",
        master: "REDIS_SENTINEL_MASTER",
        credentials: "REDIS_SENTINEL_USERNAME/REDIS_SENTINEL_PASSWORD",
        tls: "REDIS_SENTINEL_TLS",
    };
}

/// `host:port` (or `[v6]:port`) of a cluster node or a sentinel.
pub(crate) fn parse_node(node: &str) -> std::result::Result<(String, u16), String> {
    let node = node.trim();
    let bad = || format!("`{node}` is not `host:port`");
    let (host, port) = node.rsplit_once(':').ok_or_else(bad)?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty()
        || host.contains(['[', ']'])
        || host.contains(':') && !node.starts_with('[')
        || host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '@' | '?' | '#'))
    {
        return Err(bad());
    }
    let port: u16 = port.parse().map_err(|_| bad())?;
    if port == 0 {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

/// Field and variable names of the TLS settings, for error messages.
#[derive(Clone, Copy)]
struct TlsNames {
    ca: &'static str,
    cert: &'static str,
    key: &'static str,
}

impl TlsNames {
    const FIELDS: Self = Self {
        ca: "tls_ca_file",
        cert: "tls_cert_file",
        key: "tls_key_file",
    };
    const VARIABLES: Self = Self {
        ca: "REDIS_TLS_CA_FILE",
        cert: "REDIS_TLS_CERT_FILE",
        key: "REDIS_TLS_KEY_FILE",
    };
}

fn check_readable_file(path: &Path) -> std::result::Result<(), String> {
    let shown = path.display();
    let metadata =
        std::fs::metadata(path).map_err(|err| format!("cannot read `{shown}`: {err}"))?;
    if !metadata.is_file() {
        return Err(format!("`{shown}` is not a file"));
    }
    std::fs::File::open(path)
        .map(|_| ())
        .map_err(|err| format!("cannot read `{shown}`: {err}"))
}

#[cfg(feature = "tls")]
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

fn check_username(username: &str) -> std::result::Result<(), String> {
    if username.is_empty()
        || username
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("must be non-empty, without spaces or control characters".to_owned());
    }
    Ok(())
}

fn check_host(host: &str) -> std::result::Result<String, String> {
    if host.is_empty() {
        return Err("must not be empty".to_owned());
    }
    // One colon is `host:port` (an IPv6 address has at least two): the port has a variable.
    if host.matches(':').count() == 1 && !host.starts_with('[') {
        return Err(format!(
            "`{host}` holds a port; give the host alone, and the port in its own variable"
        ));
    }
    if host
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '@' | '?' | '#'))
    {
        return Err(format!("`{host}` is not a host name or address"));
    }
    // A bare IPv6 address needs brackets inside a URL.
    if host.contains(':') && !host.starts_with('[') {
        return Ok(format!("[{host}]"));
    }
    Ok(host.to_owned())
}

fn parse_number<T: TryFrom<u64>>(name: &str, text: &str, min: u64, max: u64) -> Result<T> {
    let trimmed = text.trim();
    let bad = || {
        Error::config(format!(
            "{name}: expected a whole number between {min} and {max}, got `{trimmed}`"
        ))
    };
    let value: u64 = trimmed.parse().map_err(|_| bad())?;
    if !(min..=max).contains(&value) {
        return Err(bad());
    }
    T::try_from(value).map_err(|_| bad())
}

/// Builds a [`Config`] in code; [`ConfigBuilder::build`] validates it.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    config: Config,
}

impl ConfigBuilder {
    /// See [`Config::environment`].
    pub fn environment(mut self, environment: Environment) -> Self {
        self.config.environment = environment;
        self
    }

    /// See [`Config::url`].
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.config.url = url.into();
        self
    }

    /// See [`Config::username`].
    pub fn username(mut self, username: impl Into<String>) -> Self {
        self.config.username = Some(username.into());
        self
    }

    /// See [`Config::password`].
    pub fn password(mut self, password: impl Into<Secret>) -> Self {
        self.config.password = Some(password.into());
        self
    }

    /// See [`Config::max_connections`].
    pub fn max_connections(mut self, max_connections: usize) -> Self {
        self.config.max_connections = max_connections;
        self
    }

    /// See [`Config::auto_pipeline`].
    pub fn auto_pipeline(mut self, on: bool) -> Self {
        self.config.auto_pipeline = on;
        self
    }

    /// See [`Config::connect_timeout`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect_timeout = timeout;
        self
    }

    /// See [`Config::command_timeout`].
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.config.command_timeout = timeout;
        self
    }

    /// See [`Config::health_check_interval`].
    pub fn health_check_interval(mut self, interval: Duration) -> Self {
        self.config.health_check_interval = interval;
        self
    }

    /// See [`Config::key_prefix`].
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.key_prefix = prefix.into();
        self
    }

    /// See [`Config::breaker_threshold`] and [`Config::breaker_cooldown`].
    pub fn breaker(mut self, threshold: u32, cooldown: Duration) -> Self {
        self.config.breaker_threshold = threshold;
        self.config.breaker_cooldown = cooldown;
        self
    }

    /// See [`Config::tls_ca_file`].
    pub fn tls_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.tls_ca_file = Some(path.into());
        self
    }

    /// See [`Config::tls_cert_file`] and [`Config::tls_key_file`]: the client certificate and
    /// its private key for mutual TLS.
    pub fn tls_client_cert(
        mut self,
        cert_file: impl Into<PathBuf>,
        key_file: impl Into<PathBuf>,
    ) -> Self {
        self.config.tls_cert_file = Some(cert_file.into());
        self.config.tls_key_file = Some(key_file.into());
        self
    }

    /// A Redis Cluster, found through these seed nodes (`host:port`). See
    /// [`Config::cluster_nodes`].
    pub fn cluster_nodes<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.cluster_nodes = nodes.into_iter().map(Into::into).collect();
        self
    }

    /// A primary managed by Sentinel: the sentinels (`host:port`) and the name they know it by.
    /// See [`Config::sentinel_nodes`].
    pub fn sentinel<I, S>(mut self, sentinels: I, master: impl Into<String>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.config.sentinel_nodes = sentinels.into_iter().map(Into::into).collect();
        self.config.sentinel_master = Some(master.into());
        self
    }

    /// See [`Config::sentinel_username`] and [`Config::sentinel_password`]: the credentials the
    /// sentinels require (`None` for a password-only `requirepass`).
    pub fn sentinel_credentials(
        mut self,
        username: Option<&str>,
        password: impl Into<Secret>,
    ) -> Self {
        self.config.sentinel_username = username.map(str::to_owned);
        self.config.sentinel_password = Some(password.into());
        self
    }

    /// See [`Config::sentinel_tls`]: ask the sentinels over TLS.
    pub fn sentinel_tls(mut self, on: bool) -> Self {
        self.config.sentinel_tls = on;
        self
    }

    /// Validates and returns the configuration.
    pub fn build(self) -> Result<Config> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    /// With nothing set, development talks to localhost with the documented defaults.
    #[test]
    fn defaults_match_the_design() {
        let config = from(&[]).unwrap();
        assert_eq!(config.environment, Environment::Development);
        assert_eq!(config.url, "redis://localhost:6379/0");
        assert_eq!(config.max_connections, 20);
        assert_eq!(config.connect_timeout, Duration::from_secs(1));
        assert_eq!(config.command_timeout, Duration::from_millis(500));
        assert_eq!(config.health_check_interval, Duration::from_secs(30));
        assert_eq!(config, Config::default());
    }

    /// Production reads `REDIS_*` (defaulting to the docker service name); development reads
    /// `DEV_REDIS_*` and ignores the production variables.
    #[test]
    fn environment_selects_the_variable_set() {
        let prod = from(&[("ENVIRONMENT", "production"), ("DEV_REDIS_HOST", "ignored")]).unwrap();
        assert_eq!(prod.url, "redis://redis:6379/0");
        let prod = from(&[
            ("ENVIRONMENT", "Production"),
            ("REDIS_HOST", "cache.internal"),
            ("REDIS_PORT", "6380"),
            ("REDIS_DB", "2"),
        ])
        .unwrap();
        assert_eq!(prod.url, "redis://cache.internal:6380/2");
        let dev = from(&[
            ("REDIS_HOST", "ignored"),
            ("DEV_REDIS_HOST", "::1"),
            ("DEV_REDIS_PORT", "7000"),
            ("DEV_REDIS_DB", "3"),
        ])
        .unwrap();
        assert_eq!(dev.url, "redis://[::1]:7000/3");
    }

    /// `REDIS_URL` wins over host/port/db.
    #[test]
    fn redis_url_wins() {
        let config = from(&[
            ("REDIS_URL", "redis://other:1234/5"),
            ("DEV_REDIS_HOST", "ignored"),
        ])
        .unwrap();
        assert_eq!(config.url, "redis://other:1234/5");
        assert_eq!(
            from(&[("REDIS_URL", "memory://")]).unwrap().url,
            "memory://"
        );
    }

    /// Every bad value names its variable and says what is wrong.
    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("ENVIRONMENT", "staging")], "ENVIRONMENT"),
            (&[("DEV_REDIS_PORT", "70000")], "DEV_REDIS_PORT"),
            (&[("DEV_REDIS_PORT", "abc")], "DEV_REDIS_PORT"),
            (
                &[("ENVIRONMENT", "production"), ("REDIS_PORT", "0")],
                "REDIS_PORT",
            ),
            (&[("DEV_REDIS_DB", "-1")], "DEV_REDIS_DB"),
            (&[("DEV_REDIS_HOST", "a b")], "DEV_REDIS_HOST"),
            (&[("REDIS_MAX_CONNECTIONS", "0")], "REDIS_MAX_CONNECTIONS"),
            (
                &[("REDIS_AUTO_PIPELINE", "sometimes")],
                "REDIS_AUTO_PIPELINE",
            ),
            (
                &[("REDIS_COMMAND_TIMEOUT_MS", "1.5")],
                "REDIS_COMMAND_TIMEOUT_MS",
            ),
            (
                &[("REDIS_CONNECT_TIMEOUT_MS", "0")],
                "REDIS_CONNECT_TIMEOUT_MS",
            ),
            (
                &[("REDIS_HEALTH_CHECK_INTERVAL_SECS", "x")],
                "REDIS_HEALTH_CHECK_INTERVAL_SECS",
            ),
            (&[("REDIS_URL", "http://example.com")], "REDIS_URL"),
            (&[("REDIS_URL", "localhost:6379")], "REDIS_URL"),
            (&[("REDIS_CLUSTER_NODES", "a:1,b")], "REDIS_CLUSTER_NODES"),
            (&[("REDIS_CLUSTER_NODES", "a:0")], "REDIS_CLUSTER_NODES"),
            (
                &[
                    ("REDIS_CLUSTER_NODES", "a:1"),
                    ("REDIS_URL", "redis://a:1/3"),
                ],
                "database 0",
            ),
            (
                &[("REDIS_CLUSTER_NODES", "a:1"), ("REDIS_URL", "memory://")],
                "REDIS_CLUSTER_NODES",
            ),
            (
                &[("REDIS_SENTINEL_NODES", "s:26379")],
                "REDIS_SENTINEL_MASTER",
            ),
            (&[("REDIS_SENTINEL_MASTER", "m")], "REDIS_SENTINEL_NODES"),
            (
                &[("REDIS_SENTINEL_PASSWORD", "pw")],
                "REDIS_SENTINEL_USERNAME/REDIS_SENTINEL_PASSWORD",
            ),
            (
                &[
                    ("REDIS_SENTINEL_NODES", "s:26379"),
                    ("REDIS_SENTINEL_MASTER", "m"),
                    ("REDIS_SENTINEL_USERNAME", "two words"),
                ],
                "REDIS_SENTINEL_USERNAME",
            ),
            (&[("REDIS_SENTINEL_TLS", "true")], "REDIS_SENTINEL_NODES"),
            (
                &[
                    ("REDIS_SENTINEL_NODES", "s:26379"),
                    ("REDIS_SENTINEL_MASTER", "m"),
                    ("REDIS_SENTINEL_TLS", "maybe"),
                ],
                "REDIS_SENTINEL_TLS",
            ),
            (
                &[
                    ("REDIS_SENTINEL_NODES", "s:26379"),
                    ("REDIS_SENTINEL_MASTER", "m"),
                    ("REDIS_CLUSTER_NODES", "a:1"),
                ],
                "REDIS_CLUSTER_NODES",
            ),
            (&[("REDIS_KEY_PREFIX", "has space")], "REDIS_KEY_PREFIX"),
            (&[("REDIS_USERNAME", "two words")], "REDIS_USERNAME"),
            (&[("REDIS_USERNAME", "app")], "REDIS_USERNAME"),
            (
                &[("REDIS_URL", "redis://app@db:6379/0")],
                "REDIS_URL's user name",
            ),
            (
                &[
                    ("REDIS_SENTINEL_NODES", "s:26379"),
                    ("REDIS_SENTINEL_MASTER", "m"),
                    ("REDIS_SENTINEL_USERNAME", "watcher"),
                ],
                "REDIS_SENTINEL_USERNAME",
            ),
            (&[("REDIS_URL", "redis://db:6379/-1")], "REDIS_URL"),
            (&[("REDIS_URL", "redis://db:6379/99999999999")], "REDIS_URL"),
            (&[("REDIS_URL", "REDIS://db:6379/0")], "lower case"),
            (
                &[("REDIS_CLUSTER_NODES", "[host:7000")],
                "REDIS_CLUSTER_NODES",
            ),
            (&[("DEV_REDIS_HOST", "redis:6380")], "DEV_REDIS_HOST"),
            (
                &[("REDIS_BREAKER_THRESHOLD", "-1")],
                "REDIS_BREAKER_THRESHOLD",
            ),
            (
                &[("REDIS_BREAKER_COOLDOWN_MS", "0")],
                "REDIS_BREAKER_COOLDOWN_MS",
            ),
        ];
        for (vars, name) in cases {
            let err = from(vars).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Config);
            assert!(
                err.message().contains(name),
                "error for {vars:?} should name {name}: {err}"
            );
        }
    }

    /// Cluster seeds and sentinels are read as lists; the URL still gives scheme and credentials.
    #[test]
    fn cluster_and_sentinel_variables() {
        let config = from(&[
            ("ENVIRONMENT", "production"),
            ("REDIS_CLUSTER_NODES", " n1:7000, [::1]:7001 ,,n3:7002"),
            ("REDIS_PASSWORD", "pw"),
        ])
        .unwrap();
        assert_eq!(config.cluster_nodes, ["n1:7000", "[::1]:7001", "n3:7002"]);
        assert!(matches!(config.scheme(), Scheme::Cluster));
        let info = config.node_connection_info("[::1]:7001").unwrap();
        assert_eq!(
            info.addr(),
            &redis::ConnectionAddr::Tcp("::1".to_owned(), 7001)
        );
        assert_eq!(info.redis_settings().password(), Some("pw"));

        let config = from(&[
            ("REDIS_SENTINEL_NODES", "s1:26379,s2:26380"),
            ("REDIS_SENTINEL_MASTER", "primary"),
            ("REDIS_URL", "redis://app:secret@ignored:1/2"),
        ])
        .unwrap();
        assert_eq!(config.sentinel_nodes, ["s1:26379", "s2:26380"]);
        assert_eq!(config.sentinel_master.as_deref(), Some("primary"));
        assert!(matches!(config.scheme(), Scheme::Sentinel));
        let info = config
            .connection_info_at("10.0.0.5".to_owned(), 6380)
            .unwrap();
        assert_eq!(info.redis_settings().db(), 2);
        assert_eq!(info.redis_settings().username(), Some("app"));
        assert!(!format!("{config:?}").contains("secret"));
        // The data credentials stay with the data: the sentinels get only their own.
        assert_eq!(config.sentinel_password, None);
        let config = from(&[
            ("REDIS_SENTINEL_NODES", "s1:26379"),
            ("REDIS_SENTINEL_MASTER", "primary"),
            ("REDIS_SENTINEL_USERNAME", "watcher"),
            ("REDIS_SENTINEL_PASSWORD", "sentinel-pw"),
        ])
        .unwrap();
        assert_eq!(config.sentinel_username.as_deref(), Some("watcher"));
        assert_eq!(
            config.sentinel_password.as_ref().map(Secret::expose),
            Some("sentinel-pw")
        );
        assert!(!format!("{config:?}").contains("sentinel-pw"));
        assert!(!config.sentinel_tls, "plaintext unless asked");
        let config = from(&[
            ("REDIS_SENTINEL_NODES", "s1:26379"),
            ("REDIS_SENTINEL_MASTER", "primary"),
            ("REDIS_SENTINEL_TLS", " TRUE "),
        ])
        .unwrap();
        assert!(config.sentinel_tls);
        assert!(config.auto_pipeline, "on unless turned off");
        assert!(
            !from(&[("REDIS_AUTO_PIPELINE", "no")])
                .unwrap()
                .auto_pipeline
        );
        assert!(
            !Config::builder()
                .auto_pipeline(false)
                .build()
                .unwrap()
                .auto_pipeline
        );

        let built = Config::builder()
            .cluster_nodes(["a:1", "b:2"])
            .build()
            .unwrap();
        assert_eq!(built.cluster_nodes.len(), 2);
        assert!(
            Config::builder()
                .sentinel(["s:1"], "bad name")
                .build()
                .unwrap_err()
                .message()
                .contains("sentinel_master")
        );
    }

    /// The password never shows in `Debug`, whether it came from a variable or the URL.
    #[test]
    fn password_is_redacted() {
        let config = from(&[
            ("REDIS_URL", "redis://app:hunter2@db:6379/0"),
            ("REDIS_PASSWORD", "s3cr3t-pw"),
        ])
        .unwrap();
        let shown = format!("{config:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        assert!(shown.contains("redis://app:***@db:6379/0"), "{shown}");
        assert_eq!(redact_url("redis://:pw@h/0"), "redis://:***@h/0");
        assert_eq!(redact_url("redis://pw@h/0"), "redis://***@h/0");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        // A password in the query of a socket URL, which redis-rs reads.
        assert_eq!(
            redact_url("redis+unix:///run/redis.sock?user=app&pass=hunter2&db=1"),
            "redis+unix:///run/redis.sock?user=app&pass=***&db=1"
        );
        assert_eq!(
            redact_url("unix:///s?password=pw"),
            "unix:///s?password=***"
        );
        // URLs that do not parse: the password must not show in their error either.
        assert_eq!(redact_url("redis://app:hun/ter2@db"), "redis://app:***@db");
        assert_eq!(redact_url("redis://:p#ss@db/0"), "redis://:***@db/0");
        assert_eq!(redact_url("redis://:p?ss@db/0"), "redis://:***@db/0");
        // A `@` in the query ends the userinfo there; its password is hidden anyway.
        let shown = redact_url("redis+unix:///run/redis.sock?user=app@corp&pass=hunter2");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert_eq!(
            redact_url("unix:///s?db=1&password=p#ss"),
            "unix:///s?db=1&password=***"
        );
        // Not a URL (a slash short, or none): all before the last `@` is hidden.
        assert_eq!(redact_url("redis:/:hunter2@db:6379/0"), "***@db:6379/0");
        assert_eq!(redact_url("redis//app:hunter2@db"), "***@db");
        assert_eq!(redact_url("localhost:6379"), "localhost:6379");
        for url in [
            "redis://app:hun/ter2@db",
            "redis://:p#ss@db",
            "redis://app:x@@db:zz",
            "redis:/:hunter2@db:6379/0",
        ] {
            let err = from(&[("REDIS_URL", url)]).unwrap_err();
            for secret in ["hun/ter2", "p#ss", "x@", "hunter2"] {
                assert!(!err.message().contains(secret), "{err}");
            }
        }
        let config = from(&[("REDIS_URL", "redis+unix:///run/redis.sock?pass=hunter2")]);
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    /// A variable holding bytes that are not UTF-8 is an error naming it: read as unset, a
    /// garbled `REDIS_URL` would have sent the client to the default server.
    #[test]
    fn a_variable_that_is_not_utf8_is_an_error() {
        use std::os::unix::ffi::OsStringExt as _;
        let err = Config::from_os_lookup(|name| {
            (name == "REDIS_URL").then(|| std::ffi::OsString::from_vec(b"redis://\xff/0".to_vec()))
        })
        .unwrap_err();
        assert!(err.message().contains("REDIS_URL"), "{err}");
        assert!(Config::from_os_lookup(|_| None).is_ok());
    }

    /// Credentials from variables are applied to the connection.
    #[test]
    fn credentials_reach_the_connection() {
        let config = from(&[
            ("REDIS_URL", "redis://db:6379/0"),
            ("REDIS_USERNAME", "app"),
            ("REDIS_PASSWORD", "pw"),
        ])
        .unwrap();
        let info = config.connection_info().unwrap();
        assert_eq!(info.redis_settings().username(), Some("app"));
        assert_eq!(info.redis_settings().password(), Some("pw"));
    }

    /// A temporary directory holding `ca.pem`, `client.pem` and `client.key` with PEM-looking
    /// contents (the validation reads files; it does not parse certificates).
    fn tls_files() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            (
                "ca.pem",
                "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n",
            ),
            (
                "client.pem",
                "-----BEGIN CERTIFICATE-----\nC\n-----END CERTIFICATE-----\n",
            ),
            (
                "client.key",
                "-----BEGIN PRIVATE KEY-----\nsecret-key-bytes\n",
            ),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    /// TLS files from the environment are accepted with a `rediss://` URL, and `Debug` shows
    /// their paths but never their contents.
    #[test]
    fn tls_variables_are_read() {
        let dir = tls_files();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let config = from(&[
            ("REDIS_URL", "rediss://cache.internal:6380/0"),
            ("REDIS_TLS_CA_FILE", &path("ca.pem")),
            ("REDIS_TLS_CERT_FILE", &path("client.pem")),
            ("REDIS_TLS_KEY_FILE", &path("client.key")),
        ])
        .unwrap();
        assert_eq!(config.tls_ca_file, Some(dir.path().join("ca.pem")));
        assert_eq!(config.tls_cert_file, Some(dir.path().join("client.pem")));
        assert_eq!(config.tls_key_file, Some(dir.path().join("client.key")));
        let shown = format!("{config:?}");
        assert!(shown.contains("ca.pem"), "{shown}");
        assert!(!shown.contains("secret-key-bytes"), "{shown}");
        #[cfg(feature = "tls")]
        {
            let certificates = config.tls_certificates().unwrap().unwrap();
            assert!(certificates.root_cert.is_some());
            assert!(certificates.client_tls.is_some());
            assert!(!format!("{certificates:?}").contains("secret-key-bytes"));
        }
        let plain = from(&[("REDIS_URL", "rediss://cache.internal:6380/0")]).unwrap();
        assert_eq!(plain.tls_ca_file, None);
        #[cfg(feature = "tls")]
        assert!(plain.tls_certificates().unwrap().is_none());
    }

    /// Each wrong TLS setting is refused with the variable it came from: TLS without
    /// `rediss://`, a certificate without its key (or the reverse), a missing file, a directory.
    #[test]
    fn bad_tls_settings_name_the_variable() {
        let dir = tls_files();
        let path = |name: &str| dir.path().join(name).display().to_string();
        let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
        let missing = path("missing.pem");
        let folder = dir.path().display().to_string();
        let tls_url = ("REDIS_URL", "rediss://db:6380/0");
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
        let cases: &[Case] = &[
            (
                &[("REDIS_TLS_CA_FILE", &ca)],
                &["REDIS_TLS_CA_FILE", "rediss://"],
            ),
            (
                &[("REDIS_URL", "memory://"), ("REDIS_TLS_CERT_FILE", &cert)],
                &["REDIS_TLS_CERT_FILE", "rediss://"],
            ),
            (
                &[
                    ("REDIS_URL", "redis://db:6379/0"),
                    ("REDIS_TLS_CA_FILE", &ca),
                ],
                &["REDIS_TLS_CA_FILE", "rediss://"],
            ),
            (
                &[tls_url, ("REDIS_TLS_CERT_FILE", &cert)],
                &["REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE", "both"],
            ),
            (
                &[tls_url, ("REDIS_TLS_KEY_FILE", &key)],
                &["REDIS_TLS_CERT_FILE", "REDIS_TLS_KEY_FILE", "both"],
            ),
            (
                &[tls_url, ("REDIS_TLS_CA_FILE", &missing)],
                &["REDIS_TLS_CA_FILE", "missing.pem"],
            ),
            (
                &[
                    tls_url,
                    ("REDIS_TLS_CERT_FILE", &cert),
                    ("REDIS_TLS_KEY_FILE", &missing),
                ],
                &["REDIS_TLS_KEY_FILE", "missing.pem"],
            ),
            (
                &[tls_url, ("REDIS_TLS_CA_FILE", &folder)],
                &["REDIS_TLS_CA_FILE", "not a file"],
            ),
        ];
        for (vars, needles) in cases {
            let err = from(vars).unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::Config);
            for needle in *needles {
                assert!(
                    err.message().contains(needle),
                    "error for {vars:?} should mention {needle}: {err}"
                );
            }
        }
    }

    /// The builder checks the same rules and names the fields.
    #[test]
    fn builder_checks_tls_settings() {
        let dir = tls_files();
        let err = Config::builder()
            .tls_ca_file(dir.path().join("ca.pem"))
            .build()
            .unwrap_err();
        assert!(err.message().contains("tls_ca_file"), "{err}");
        assert!(err.message().contains("rediss://"), "{err}");
        let err = Config::builder()
            .url("rediss://db:6380/0")
            .tls_client_cert(dir.path().join("client.pem"), dir.path().join("nope.key"))
            .build()
            .unwrap_err();
        assert!(err.message().contains("tls_key_file"), "{err}");
        let mut config = Config::builder().url("rediss://db:6380/0").build().unwrap();
        config.tls_cert_file = Some(dir.path().join("client.pem"));
        let err = config.validate().unwrap_err();
        assert!(
            err.message().contains("tls_cert_file and tls_key_file"),
            "{err}"
        );
        let config = Config::builder()
            .url("rediss://db:6380/0")
            .tls_ca_file(dir.path().join("ca.pem"))
            .tls_client_cert(dir.path().join("client.pem"), dir.path().join("client.key"))
            .build()
            .unwrap();
        assert_eq!(config.tls_key_file, Some(dir.path().join("client.key")));
    }

    /// A CA file without any PEM certificate is a configuration error, not an empty trust store
    /// that fails every handshake later.
    #[cfg(feature = "tls")]
    #[test]
    fn ca_file_without_a_certificate_is_refused() {
        let dir = tls_files();
        std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
        let config = Config::builder()
            .url("rediss://db:6380/0")
            .tls_ca_file(dir.path().join("ca.pem"))
            .build()
            .unwrap();
        let err = config.tls_certificates().unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Config);
        assert!(err.message().contains("no PEM certificate"), "{err}");
    }

    /// The builder validates what it builds.
    #[test]
    fn builder_validates() {
        let err = Config::builder()
            .command_timeout(Duration::ZERO)
            .build()
            .unwrap_err();
        assert!(err.message().contains("command_timeout"), "{err}");
        let config = Config::builder()
            .url("memory://")
            .max_connections(4)
            .build()
            .unwrap();
        assert_eq!(config.max_connections, 4);
    }

    /// Values the builder once let through: a health check every nanosecond (each pings every
    /// connection), a user name whose password is nowhere, a database number past any server's.
    #[test]
    fn the_builder_refuses_what_would_misbehave_later() {
        let interval = |every| Config::builder().health_check_interval(every).build();
        assert!(interval(Duration::from_nanos(1)).is_err());
        assert!(interval(Duration::from_secs(86_401)).is_err());
        for fine in [
            Duration::ZERO,
            Duration::from_millis(100),
            Duration::from_secs(86_400),
        ] {
            assert!(interval(fine).is_ok(), "{fine:?}");
        }

        let err = Config::builder().username("app").build().unwrap_err();
        assert!(err.message().contains("without a password"), "{err}");
        assert!(
            Config::builder()
                .username("app")
                .password("pw")
                .build()
                .is_ok()
        );
        // The password may come from the URL.
        let url = Config::builder()
            .url("redis://:pw@db:6379/0")
            .username("app")
            .build();
        assert!(url.is_ok());

        let err = Config::builder().url("redis://db/-3").build().unwrap_err();
        assert!(err.message().contains("database -3"), "{err}");
        assert!(Config::builder().url("redis://db/15").build().is_ok());
    }

    /// `REDIS_USERNAME` is trimmed like the other variables (a secret file's newline).
    #[test]
    fn the_username_variable_is_trimmed() {
        let config = from(&[("REDIS_USERNAME", "app\n"), ("REDIS_PASSWORD", "pw")]).unwrap();
        assert_eq!(config.username.as_deref(), Some("app"));
    }
}
