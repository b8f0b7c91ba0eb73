//! Redis over TLS (`rediss://` with a private CA, and mutual TLS) and under the least-privilege
//! ACL user of `docs/redis-acl.md`: every library operation works with exactly those
//! permissions, each permission is needed, and nothing beyond them is allowed.
//!
//! Run with `cargo test -p rediskit --test tls_acl`.

#![cfg(feature = "tls")]
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use rediskit::{
    Cache, Client, Config, ConfigBuilder, Error, ErrorKind, Quota, RateLimiter, Sessions, ttl,
};
use rediskit_testkit::tls::{Certificates, TlsRedisServer};
use sha2::{Digest, Sha256};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";
const PASSWORD: &str = "correct-horse-battery-staple";

/// The permissions of rediskit's ACL user, exactly as `docs/redis-acl.md` gives them.
const PERMISSIONS: &str = "~rk:* resetchannels -@all +ping +get +set +mget +del +exists +pttl \
                           +scan +evalsha +script|load +time +hget +hgetall +hset \
                           +hdel +hlen +expireat";

const ACL_DOC: &str = include_str!("../../../docs/redis-acl.md");

/// A configuration for `server` trusting its CA: short deadlines so failures show quickly, with
/// room for TLS handshakes in a debug build.
fn tls_builder(server: &TlsRedisServer) -> ConfigBuilder {
    Config::builder()
        .url(server.url())
        .tls_ca_file(server.ca_file())
        .max_connections(2)
        .connect_timeout(Duration::from_secs(2))
        .command_timeout(Duration::from_secs(1))
}

/// A configuration read from environment variables (given as a map, not the process's).
fn from_vars(vars: &[(&str, String)]) -> rediskit::Result<Config> {
    let vars: HashMap<&str, String> = vars.iter().cloned().collect();
    Config::from_lookup(|name| vars.get(name).cloned())
}

/// The variables that reach `server` as ACL user `user`, trusting the server's CA.
fn acl_vars(server: &TlsRedisServer, user: &str) -> Vec<(&'static str, String)> {
    vec![
        ("REDIS_URL", server.url()),
        ("REDIS_TLS_CA_FILE", server.ca_file().display().to_string()),
        ("REDIS_USERNAME", user.to_owned()),
        ("REDIS_PASSWORD", PASSWORD.to_owned()),
        ("REDIS_MAX_CONNECTIONS", "2".to_owned()),
        ("REDIS_CONNECT_TIMEOUT_MS", "2000".to_owned()),
        ("REDIS_COMMAND_TIMEOUT_MS", "1000".to_owned()),
    ]
}

/// `ACL SETUSER {user} reset on >PASSWORD {permissions}` through the admin (default) user.
fn set_user(server: &TlsRedisServer, user: &str, permissions: &str) {
    let password = format!(">{PASSWORD}");
    let mut args = vec!["ACL", "SETUSER", user, "reset", "on", &password];
    args.extend(permissions.split_whitespace());
    assert_eq!(server.cli(&args), "OK", "ACL SETUSER {user} {permissions}");
}

/// Connects and fails the test if that takes long: a refused connection must not hang.
async fn connect_within(config: Config, limit: Duration) -> rediskit::Result<Client> {
    let started = Instant::now();
    let result = Client::connect(config).await;
    assert!(
        started.elapsed() < limit,
        "connecting took {:?}",
        started.elapsed()
    );
    result
}

/// A raw connection as ACL user `user`, outside the library, to try what it never sends.
fn raw_connection(server: &TlsRedisServer, user: &str) -> redis::Connection {
    let url = format!("rediss://{user}:{PASSWORD}@127.0.0.1:{}/0", server.port());
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(server.ca_file()).unwrap()),
    };
    redis::Client::build_with_tls(url, certificates)
        .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
        .unwrap()
}

fn check(ok: bool, what: &str) -> rediskit::Result<()> {
    if ok {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::InvalidInput,
            format!("unexpected result: {what}"),
        ))
    }
}

/// Every operation of the library (and of the service's account store) once, with the server's
/// admin connection used only to arrange state. Returns the first error.
async fn every_operation(client: &Client, server: &TlsRedisServer) -> rediskit::Result<()> {
    // Client: health and scripts.
    let health = client.health().await;
    check(health.ok, &format!("health: {:?}", health.error))?;
    client.load_scripts().await?;

    // Cache.
    let cache = Cache::new(client);
    cache.set("a", &1).await?;
    cache.set_with_ttl("b", &2, ttl::SHORT).await?;
    check(cache.try_get::<i32>("a").await? == Some(1), "try_get a")?;
    check(cache.get::<i32>("b").await? == Some(2), "get b")?;
    cache.set_many(&[("c", 3), ("d", 4)], ttl::SHORT).await?;
    let many: Vec<Option<i32>> = cache.get_many(&["a", "b", "c", "d", "e"]).await?;
    check(
        many == [Some(1), Some(2), Some(3), Some(4), None],
        "get_many",
    )?;
    check(cache.exists("c").await?, "exists c")?;
    check(
        cache.ttl("c").await?.is_some_and(|left| left <= ttl::SHORT),
        "ttl c",
    )?;
    let mut keys: Vec<String> = cache.keys("").try_collect().await?;
    keys.sort();
    check(keys == ["a", "b", "c", "d"], &format!("keys: {keys:?}"))?;
    let matching: Vec<String> = cache.keys_matching("[cd]").try_collect().await?;
    check(matching.len() == 2, "keys_matching")?;
    check(cache.delete("d").await?, "delete d")?;
    check(!cache.exists("d").await?, "d deleted")?;
    let computed = cache
        .get_or_set("computed", ttl::SHORT, || async { 42 })
        .await?;
    check(computed == 42, "get_or_set")?;
    check(
        cache.try_get::<i32>("computed").await? == Some(42),
        "get_or_set stored",
    )?;
    // With a stale window, `get_or_set` reads value and age with `get_with_pttl.lua`.
    let windowed = Cache::builder(client)
        .namespace("swr")
        .stale_while_revalidate(Duration::from_secs(60))
        .build()?;
    for _ in 0..2 {
        let lookup = windowed
            .try_get_or_set("computed", ttl::SHORT, || async { Ok::<_, Error>(43) })
            .await?;
        check(lookup.value == 43, "get_or_set with a stale window")?;
    }
    // Sessions, with a cap of 2 so that the third creation evicts one of the first two (which
    // one is not defined within one second).
    let sessions = Sessions::builder(client, SECRET).max_sessions(2).build()?;
    let phone = sessions.create("alice", "phone", None, None).await?;
    let laptop = sessions.create("alice", "laptop", None, None).await?;
    let tablet = sessions.create("alice", "tablet", None, None).await?;
    check(tablet.evicted == 1, "eviction past the cap")?;
    let found = sessions.lookup(tablet.token.expose()).await?;
    check(found.session_id == tablet.session.session_id, "lookup")?;
    let rotated = sessions.rotate(tablet.token.expose(), None).await?;
    check(rotated.session.generation == 1, "rotate")?;
    let listed = sessions.sessions("alice").await?;
    check(listed.len() == 2, "sessions")?;
    let survivor = listed
        .iter()
        .find(|session| session.session_id != tablet.session.session_id)
        .map(|session| session.session_id.clone())
        .unwrap_or_default();
    check(
        sessions.session("alice", &survivor).await?.is_some(),
        "session",
    )?;
    check(sessions.revoke("alice", &survivor).await?, "revoke")?;
    check(sessions.revoke_all("alice").await? == 1, "revoke_all")?;
    for token in [&phone.token, &laptop.token, &rotated.token] {
        match sessions.lookup(token.expose()).await {
            Err(err) if err.is_not_found() => {}
            Err(err) => return Err(err),
            Ok(_) => check(false, "a revoked session is gone")?,
        }
    }

    // Rate limiter.
    let limiter = RateLimiter::new(client, "login", Quota::per_minute(2))?;
    check(limiter.check("alice").await?.allowed, "first request")?;
    check(limiter.check("alice").await?.allowed, "second request")?;
    check(!limiter.check("alice").await?.allowed, "third is limited")?;
    limiter.reset("alice").await?;
    check(limiter.check("alice").await?.allowed, "allowed after reset")?;
    // After Redis forgets its scripts (a restart, `SCRIPT FLUSH`) they load again by themselves:
    // EVALSHA → NOSCRIPT, then SCRIPT LOAD and EVALSHA in one pipeline.
    assert_eq!(server.cli(&["SCRIPT", "FLUSH"]), "OK");
    check(limiter.check("bob").await?.allowed, "after SCRIPT FLUSH")?;

    // Foreign bytes in the cache are a miss, dropped by the `del_if_equals` script (last: a
    // failure to drop them is only logged).
    assert_eq!(
        server.cli(&["SET", "rk:cache:default:bad", "not rediskit's"]),
        "OK"
    );
    check(cache.get::<i32>("bad").await?.is_none(), "undecodable")?;
    check(!cache.exists("bad").await?, "undecodable value dropped")?;

    // The service's account store (`rediskit-server`'s users.rs): SET NX and GET on rk:user:*.
    check(
        client.set_bytes_if_absent("rk:user:alice", b"{}").await?,
        "first registration",
    )?;
    check(
        !client.set_bytes_if_absent("rk:user:alice", b"[]").await?,
        "second registration",
    )?;
    check(
        client.get_bytes("rk:user:alice").await? == Some(b"{}".to_vec()),
        "account read",
    )?;
    Ok(())
}

/// With `REDIS_TLS_CA_FILE` naming the private CA, `Client::connect` reaches the TLS-only server,
/// and the cache, sessions and rate limiter work over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_sessions_and_rate_limiter_work_over_tls() {
    let server = TlsRedisServer::start();
    let config = tls_builder(&server).build().unwrap();

    let client = Client::connect(config).await.unwrap();
    let cache = Cache::new(&client);
    cache.set("greeting", &"hello").await.unwrap();
    let sessions = Sessions::new(&client, SECRET).unwrap();
    let issued = sessions
        .create("alice", "laptop", None, None)
        .await
        .unwrap();
    let rotated = sessions.rotate(issued.token.expose(), None).await.unwrap();
    let limiter = RateLimiter::new(&client, "login", Quota::per_minute(1)).unwrap();

    assert_eq!(
        cache.get::<String>("greeting").await.unwrap().as_deref(),
        Some("hello")
    );
    let session = sessions.lookup(rotated.token.expose()).await.unwrap();
    assert_eq!((session.user_id.as_str(), session.generation), ("alice", 1));
    assert!(limiter.check("alice").await.unwrap().allowed);
    assert!(!limiter.check("alice").await.unwrap().allowed);
    let health = client.health().await;
    assert!(health.ok, "{health:?}");
    // The server holds what went through TLS, and it has no plaintext port to go through instead.
    assert_eq!(server.cli(&["EXISTS", "rk:cache:default:greeting"]), "1");
    let plain = format!("redis://127.0.0.1:{}/0", server.port());
    let plain = Config::builder().url(plain).max_connections(1).build();
    let err = connect_within(plain.unwrap(), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(err.is_unavailable(), "{err}");
}

/// Without the private CA (the system's roots only), or trusting an unrelated CA, the server's
/// certificate is refused quickly with an error that says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_server_certificate_is_refused() {
    let server = TlsRedisServer::start();
    let stranger = Certificates::generate();
    let default_roots = Config::builder()
        .url(server.url())
        .max_connections(1)
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let other_ca = tls_builder(&server)
        .tls_ca_file(stranger.ca_file())
        .build()
        .unwrap();

    for config in [default_roots, other_ca] {
        let err = connect_within(config, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            err.message().contains("invalid peer certificate"),
            "the error should say the certificate is not trusted: {err}"
        );
    }
}

/// With `--tls-auth-clients yes`, a client presenting a certificate signed by the server's CA
/// connects and works; one without a certificate is refused, quickly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_the_client_certificate() {
    let server = TlsRedisServer::start_with(&["--tls-auth-clients", "yes"]);
    let with_cert = tls_builder(&server)
        .tls_client_cert(server.client_cert_file(), server.client_key_file())
        .build()
        .unwrap();
    let without_cert = tls_builder(&server).build().unwrap();

    let client = connect_within(with_cert, Duration::from_secs(5))
        .await
        .unwrap();
    let cache = Cache::new(&client);
    cache.set("k", &7).await.unwrap();
    assert_eq!(cache.try_get::<i32>("k").await.unwrap(), Some(7));
    let err = connect_within(without_cert, Duration::from_secs(5))
        .await
        .unwrap_err();
    // rustls names the server's alert: "received fatal alert: CertificateRequired".
    assert!(err.message().contains("Certificate"), "{err}");
}

/// `Config::from_lookup` with `REDIS_URL=rediss://…`, `REDIS_TLS_CA_FILE`, `REDIS_TLS_CERT_FILE`
/// and `REDIS_TLS_KEY_FILE` builds a configuration that reaches a mutual-TLS server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_from_environment_reaches_a_mutual_tls_server() {
    let server = TlsRedisServer::start_with(&["--tls-auth-clients", "yes"]);
    let path = |path: std::path::PathBuf| path.display().to_string();
    let config = from_vars(&[
        ("REDIS_URL", server.url()),
        ("REDIS_TLS_CA_FILE", path(server.ca_file())),
        ("REDIS_TLS_CERT_FILE", path(server.client_cert_file())),
        ("REDIS_TLS_KEY_FILE", path(server.client_key_file())),
        ("REDIS_MAX_CONNECTIONS", "2".to_owned()),
        ("REDIS_CONNECT_TIMEOUT_MS", "2000".to_owned()),
    ])
    .unwrap();
    assert_eq!(config.tls_ca_file, Some(server.ca_file()));

    let client = Client::connect(config).await.unwrap();
    let health = client.health().await;
    let cache = Cache::new(&client);
    cache.set("from-env", &true).await.unwrap();

    assert!(health.ok, "{health:?}");
    assert_eq!(cache.try_get::<bool>("from-env").await.unwrap(), Some(true));
}

/// An ACL user with exactly the documented rule, its credentials in `REDIS_USERNAME` and
/// `REDIS_PASSWORD`, runs every operation of the library and of the service's account store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_with_the_documented_rule_runs_every_operation() {
    assert!(
        ACL_DOC.contains(PERMISSIONS),
        "docs/redis-acl.md must give exactly the rule tested here: {PERMISSIONS}"
    );
    let server = TlsRedisServer::start();
    set_user(&server, "rediskit", PERMISSIONS);
    let config = from_vars(&acl_vars(&server, "rediskit")).unwrap();

    let client = Client::connect(config).await.unwrap();
    let result = every_operation(&client, &server).await;

    result.unwrap();
}

/// Each permission of the rule is needed: without any one of them, some library operation fails,
/// and it fails as `ErrorKind::Backend` naming the permission problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_permission_in_the_rule_is_needed() {
    let server = TlsRedisServer::start();
    let commands: Vec<&str> = PERMISSIONS
        .split_whitespace()
        .filter(|rule| rule.starts_with('+'))
        .collect();
    let mut failures = Vec::new();

    for (index, dropped) in commands.iter().enumerate() {
        assert_eq!(server.cli(&["FLUSHALL"]), "OK");
        let user = format!("without{index}");
        let permissions: Vec<&str> = PERMISSIONS
            .split_whitespace()
            .filter(|rule| rule != dropped)
            .collect();
        set_user(&server, &user, &permissions.join(" "));
        let config = from_vars(&acl_vars(&server, &user)).unwrap();

        let result = match Client::connect(config).await {
            Ok(client) => every_operation(&client, &server).await,
            Err(err) => Err(err),
        };

        let Err(err) = result else {
            failures.push(format!("everything worked without {dropped}"));
            continue;
        };
        let name = dropped.trim_start_matches('+');
        if err.kind() != ErrorKind::Backend || !is_permission_error(&err, Some(name)) {
            failures.push(format!(
                "without {dropped}: not a Backend permission error naming it: {err}"
            ));
        }
    }

    assert!(failures.is_empty(), "{failures:#?}");
}

/// Redis's refusals: `NOPERM … 'command'` for a command sent directly (naming `command`, if
/// given); inside a script, "The user executing the script can't run this command" (or "access
/// … keys"), which names no command.
fn is_permission_error(err: &Error, command: Option<&str>) -> bool {
    let message = err.message().to_lowercase();
    let names = |command: &str| message.contains(&format!("'{command}'"));
    (message.contains("noperm") && command.is_none_or(names))
        || message.contains("the user executing the script can't")
}

/// The ACL user cannot touch keys outside `rk:*` (directly, through a script, or with another key
/// prefix in the library) nor run FLUSHALL, KEYS, CONFIG or EVAL; the library reports each
/// refusal as `ErrorKind::Backend`: not unavailable (which would fail open or answer 503), not
/// not-found (which would pass for "no such session").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_is_confined_to_its_keys_and_commands() {
    let server = TlsRedisServer::start();
    set_user(&server, "rediskit", PERMISSIONS);
    assert_eq!(server.cli(&["SET", "other:secret", "x"]), "OK");
    let sha = server.cli(&["SCRIPT", "LOAD", "return redis.call('GET', KEYS[1])"]);
    let reads_other = server.cli(&["SCRIPT", "LOAD", "return redis.call('GET', 'other:secret')"]);
    let config = from_vars(&acl_vars(&server, "rediskit")).unwrap();
    let client = Client::connect(config.clone()).await.unwrap();
    let token = Sessions::new(&client, SECRET)
        .unwrap()
        .create("alice", "phone", None, None)
        .await
        .unwrap()
        .token;
    let mut elsewhere = config;
    elsewhere.key_prefix = "app:".to_owned();
    let elsewhere = Client::connect(elsewhere).await.unwrap();
    let cache = Cache::new(&elsewhere);
    let sessions = Sessions::new(&elsewhere, SECRET).unwrap();
    let limiter = RateLimiter::new(&elsewhere, "login", Quota::per_minute(5)).unwrap();

    let refusals = [
        (
            "get_bytes other:secret",
            client.get_bytes("other:secret").await.err(),
        ),
        ("set", cache.set("k", &1).await.err()),
        ("get", cache.get::<i32>("k").await.err()),
        ("try_get", cache.try_get::<i32>("k").await.err()),
        ("lookup", sessions.lookup(token.expose()).await.err()),
        (
            "create",
            sessions.create("bob", "x", None, None).await.err(),
        ),
        ("rate limit", limiter.check("bob").await.err()),
    ];
    let mut connection = raw_connection(&server, "rediskit");
    let raw_refusals = [
        redis::cmd("GET")
            .arg("other:secret")
            .query::<()>(&mut connection),
        redis::cmd("SET")
            .arg("other:new")
            .arg(1)
            .query(&mut connection),
        redis::cmd("FLUSHALL").query(&mut connection),
        redis::cmd("KEYS").arg("*").query(&mut connection),
        redis::cmd("CONFIG")
            .arg("GET")
            .arg("*")
            .query(&mut connection),
        redis::cmd("EVAL")
            .arg("return 1")
            .arg(0)
            .query(&mut connection),
        redis::cmd("EVALSHA")
            .arg(&sha)
            .arg(1)
            .arg("other:secret")
            .query(&mut connection),
        redis::cmd("EVALSHA")
            .arg(&reads_other)
            .arg(0)
            .query(&mut connection),
    ];

    for (what, err) in refusals {
        let err = err.unwrap_or_else(|| panic!("{what} was allowed"));
        assert_eq!(err.kind(), ErrorKind::Backend, "{what}: {err}");
        assert!(
            !err.is_unavailable() && !err.is_not_found(),
            "{what}: {err}"
        );
        assert!(is_permission_error(&err, None), "{what}: {err}");
    }
    for (index, result) in raw_refusals.into_iter().enumerate() {
        let err = result.expect_err(&format!("raw command #{index} was allowed"));
        let rediskit_err = Error::from(err);
        assert_eq!(
            rediskit_err.kind(),
            ErrorKind::Backend,
            "#{index}: {rediskit_err}"
        );
        assert!(
            is_permission_error(&rediskit_err, None),
            "#{index}: {rediskit_err}"
        );
    }
    let allowed: Option<String> = redis::cmd("EVALSHA")
        .arg(&sha)
        .arg(1)
        .arg("rk:cache:default:missing")
        .query(&mut connection)
        .unwrap();
    assert_eq!(allowed, None, "a script may read the user's own keys");
    assert_eq!(server.cli(&["GET", "other:secret"]), "x");
}

/// The `users.acl` line of the docs, password as its SHA-256, is accepted by `--aclfile` and
/// gives a user that works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_acl_file_line_is_accepted() {
    let hash = Sha256::digest(PASSWORD.as_bytes());
    let hex: String = hash.iter().map(|byte| format!("{byte:02x}")).collect();
    let line = format!("user rediskit on #{hex} {PERMISSIONS}");
    assert!(
        ACL_DOC.contains(&format!(
            "user rediskit on #<sha256 of the password> {PERMISSIONS}"
        )),
        "docs/redis-acl.md must give the users.acl line tested here"
    );
    let dir = tempfile::tempdir().unwrap();
    let acl_file = dir.path().join("users.acl");
    std::fs::write(
        &acl_file,
        format!("user default on nopass ~* &* +@all\n{line}\n"),
    )
    .unwrap();
    let acl_file = acl_file.display().to_string();
    let server = TlsRedisServer::start_with(&["--aclfile", &acl_file]);
    let config = from_vars(&acl_vars(&server, "rediskit")).unwrap();

    let client = Client::connect(config).await.unwrap();
    let cache = Cache::new(&client);
    cache.set("k", &1).await.unwrap();

    assert_eq!(cache.try_get::<i32>("k").await.unwrap(), Some(1));
    client.load_scripts().await.unwrap();
}

/// The near-cache's tracking connection goes over TLS as the ACL user too: with the documented
/// optional `+client|tracking` it serves from memory and another client's write reaches it
/// within 100 ms; with the plain rule it stays off and every read goes to Redis, still correct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_cache_over_tls_needs_only_the_optional_tracking_grant() {
    assert!(
        ACL_DOC.contains("`+client|tracking`"),
        "the optional grant is documented"
    );
    let server = TlsRedisServer::start();
    set_user(
        &server,
        "rediskit",
        &format!("{PERMISSIONS} +client|tracking"),
    );
    set_user(&server, "plain", PERMISSIONS);
    let near = rediskit::NearCacheConfig::default();

    let client = Client::connect(from_vars(&acl_vars(&server, "rediskit")).unwrap())
        .await
        .unwrap();
    let writer = Client::connect(from_vars(&acl_vars(&server, "rediskit")).unwrap())
        .await
        .unwrap();
    let held = Cache::builder(&client)
        .namespace("tls")
        .near_cache(near)
        .build()
        .unwrap();
    let other = Cache::builder(&writer).namespace("tls").build().unwrap();
    other.set("k", "v1").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while held.stats().near.hits < 2 {
        assert!(
            Instant::now() < deadline,
            "the near-cache never served over TLS"
        );
        assert_eq!(
            held.get::<String>("k").await.unwrap().as_deref(),
            Some("v1")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    other.set("k", "v2").await.unwrap();
    let written = Instant::now();
    while held.get::<String>("k").await.unwrap().as_deref() != Some("v2") {
        assert!(
            written.elapsed() < Duration::from_millis(100),
            "stale over TLS"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    let plain = Client::connect(from_vars(&acl_vars(&server, "plain")).unwrap())
        .await
        .unwrap();
    let refused = Cache::builder(&plain)
        .namespace("tls")
        .near_cache(near)
        .build()
        .unwrap();
    for _ in 0..20 {
        assert_eq!(
            refused.get::<String>("k").await.unwrap().as_deref(),
            Some("v2")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refused.stats().near.hits, 0);
}
