//! Sessions: the contract on both backends, then what only a real server shows.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod common;

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::{admin_cmd, command_calls, evalsha_calls};
use rediskit::{Client, ErrorKind, Sessions};
use rediskit_testkit::RedisServer;
use rediskit_testkit::cluster::RedisCluster;
use rediskit_testkit::proxy::{FaultProxy, Mode};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

fn sessions(client: &Client) -> Sessions {
    Sessions::new(client, SECRET).unwrap()
}

conformance!(
    create_then_lookup,
    rotate_replaces_the_token,
    rotation_keeps_what_the_session_was_created_with,
    reuse_revokes_the_family,
    concurrent_rotations_have_one_winner,
    concurrent_users_each_get_their_own_answer,
    grace_window_gives_the_same_token,
    revoke_one,
    revoke_all_counts_and_ends_everything,
    cap_evicts_the_oldest,
    sessions_expire,
    inactivity_ends_idle_sessions,
    bad_input_and_forged_tokens,
    users_with_special_characters_are_isolated,
    another_secret_knows_no_token,
);

/// A new session's token looks it up; the session is listed with its device and metadata.
async fn create_then_lookup(client: &Client) {
    let store = sessions(client);
    let metadata = serde_json::json!({"ip": "203.0.113.7"});
    let issued = store
        .create("alice", "Firefox on Linux", None, Some(&metadata))
        .await
        .unwrap();
    let token = issued.token.expose();
    assert!(
        token.len() >= 43,
        "at least 256 bits of randomness: {token}"
    );
    assert!(
        token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    );

    let session = store.lookup(token).await.unwrap();
    assert_eq!(session, issued.session);
    assert_eq!(session.user_id, "alice");
    assert_eq!(session.device, "Firefox on Linux");
    assert_eq!(session.metadata, Some(metadata));
    assert_eq!(session.generation, 0);
    let lifetime = session
        .expires_at
        .duration_since(session.created_at)
        .unwrap();
    assert_eq!(lifetime, rediskit::DEFAULT_REFRESH_TTL);

    let listed = store.sessions("alice").await.unwrap();
    assert_eq!(listed, vec![session.clone()]);
    assert_eq!(
        store.session("alice", &session.session_id).await.unwrap(),
        Some(session)
    );
    assert_eq!(store.sessions("bob").await.unwrap(), vec![]);
    assert_eq!(store.stats().created, 1);
}

/// Rotation returns a new token for the same session; the new one works, generation counts up.
async fn rotate_replaces_the_token(client: &Client) {
    let store = sessions(client);
    let first = store.create("alice", "phone", None, None).await.unwrap();
    let second = store
        .rotate(first.token.expose(), Some(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert_ne!(first.token, second.token);
    assert_eq!(second.session.session_id, first.session.session_id);
    assert_eq!(second.session.generation, 1);
    assert_eq!(second.session.created_at, first.session.created_at);
    assert!(second.session.last_used_at >= first.session.last_used_at);
    let left = second
        .session
        .expires_at
        .duration_since(second.session.last_used_at)
        .unwrap();
    assert_eq!(left, Duration::from_secs(3600));
    assert_eq!(
        store.lookup(second.token.expose()).await.unwrap(),
        second.session
    );
    let third = store.rotate(second.token.expose(), None).await.unwrap();
    assert_eq!(third.session.generation, 2);
    assert_eq!(store.sessions("alice").await.unwrap().len(), 1);
}

/// Sleeps until the clock's second changes (the scripts keep whole seconds), and a little more.
async fn next_second() {
    let into = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    tokio::time::sleep(
        Duration::from_nanos(u64::from(1_000_000_000 - into)) + Duration::from_millis(20),
    )
    .await;
}

/// Rotations a second or more apart keep the session's device, metadata and creation time,
/// and move its last use and expiry: a rotated record is spliced from the stored one, whose
/// creation time sits beside the times that change.
async fn rotation_keeps_what_the_session_was_created_with(client: &Client) {
    let store = sessions(client);
    let metadata = serde_json::json!({"ip": "203.0.113.7", "agent": "curl/8"});
    let first = store
        .create("alice", "Firefox on Linux", None, Some(&metadata))
        .await
        .unwrap();
    let mut token = first.token;
    let mut last = first.session.clone();
    for generation in 1..=2 {
        next_second().await;
        let rotated = store
            .rotate(token.expose(), Some(Duration::from_secs(600)))
            .await
            .unwrap();
        let session = rotated.session;
        assert_eq!(session.generation, generation);
        assert_eq!(session.created_at, first.session.created_at);
        assert_eq!(session.device, "Firefox on Linux");
        assert_eq!(session.metadata.as_ref(), Some(&metadata));
        assert!(session.last_used_at > last.last_used_at, "{session:?}");
        assert_eq!(
            session
                .expires_at
                .duration_since(session.last_used_at)
                .unwrap(),
            Duration::from_secs(600)
        );
        assert_eq!(store.lookup(rotated.token.expose()).await.unwrap(), session);
        token = rotated.token;
        last = session;
    }
    assert_eq!(store.sessions("alice").await.unwrap(), vec![last]);
}

/// Presenting a rotated token again is reuse: `Reused`, and the whole family is revoked, so
/// even the newest token stops working. Other sessions of the user are untouched.
async fn reuse_revokes_the_family(client: &Client) {
    let store = sessions(client);
    let other = store.create("alice", "laptop", None, None).await.unwrap();
    let first = store.create("alice", "phone", None, None).await.unwrap();
    let second = store.rotate(first.token.expose(), None).await.unwrap();
    let third = store.rotate(second.token.expose(), None).await.unwrap();

    // A token two generations old is still recognised.
    let err = store.rotate(first.token.expose(), None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Reused, "{err}");
    let err = store.rotate(third.token.expose(), None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert_eq!(
        store.lookup(third.token.expose()).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        store.sessions("alice").await.unwrap(),
        vec![other.session.clone()]
    );
    assert!(store.lookup(other.token.expose()).await.is_ok());
    let stats = store.stats();
    assert_eq!((stats.reuse_detected, stats.revoked), (1, 1));
}

/// 100 concurrent rotations of one token (grace 0): exactly one succeeds, every other is
/// `Reused` or `NotFound`, and afterwards the family is revoked.
async fn concurrent_rotations_have_one_winner(client: &Client) {
    let store = sessions(client);
    let issued = store.create("alice", "phone", None, None).await.unwrap();
    let token = Arc::new(issued.token.into_string());
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let store = store.clone();
            let token = token.clone();
            tokio::spawn(async move { store.rotate(&token, None).await })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(issued) => winners.push(issued),
            Err(err) => assert!(
                matches!(err.kind(), ErrorKind::Reused | ErrorKind::NotFound),
                "{err}"
            ),
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(
        store
            .lookup(winners[0].token.expose())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound,
        "the losers' reuse revoked the family"
    );
    assert_eq!(store.sessions("alice").await.unwrap(), vec![]);
}

/// 64 users creating and rotating at once (on Redis their scripts are coalesced): each caller
/// gets its own session and token, never another's, and every token chain stays usable.
async fn concurrent_users_each_get_their_own_answer(client: &Client) {
    let store = sessions(client);
    let users: Vec<String> = (0..64).map(|i| format!("user{i}")).collect();
    // Lifetimes differ between callers of one coalesced call (the scripts pack the times once
    // per lifetime and call).
    let ttl = |i: usize| Duration::from_secs(600 + (i % 4) as u64);
    let issued = futures_util::future::join_all(
        users
            .iter()
            .enumerate()
            .map(|(i, user)| store.create(user, user, Some(ttl(i)), None)),
    )
    .await;
    let mut tokens = Vec::new();
    for (i, (user, issued)) in users.iter().zip(issued).enumerate() {
        let issued = issued.unwrap();
        assert_eq!(
            (&issued.session.user_id, &issued.session.device),
            (user, user)
        );
        let lifetime = issued
            .session
            .expires_at
            .duration_since(issued.session.created_at);
        assert_eq!(lifetime.unwrap(), ttl(i));
        tokens.push(issued.token.into_string());
    }
    for round in 1..=3 {
        let rotated = futures_util::future::join_all(
            tokens
                .iter()
                .enumerate()
                .map(|(i, token)| store.rotate(token, Some(ttl(i + round as usize)))),
        )
        .await;
        for (i, ((user, token), rotated)) in users.iter().zip(&mut tokens).zip(rotated).enumerate()
        {
            let rotated = rotated.unwrap();
            assert_eq!(rotated.session.user_id, *user);
            assert_eq!(rotated.session.generation, round);
            let left = rotated
                .session
                .expires_at
                .duration_since(rotated.session.last_used_at);
            assert_eq!(left.unwrap(), ttl(i + round as usize));
            *token = rotated.token.into_string();
        }
    }
    for (user, token) in users.iter().zip(&tokens) {
        let session = store.lookup(token).await.unwrap();
        assert_eq!((&session.user_id, session.generation), (user, 3));
        assert_eq!(store.sessions(user).await.unwrap(), vec![session]);
    }
    let stats = store.stats();
    assert_eq!((stats.created, stats.rotated), (64, 192));
}

/// With a grace window, a second refresh of the same token soon after gets the same new token
/// instead of revoking the family.
async fn grace_window_gives_the_same_token(client: &Client) {
    let store = Sessions::builder(client, SECRET)
        .grace(Duration::from_secs(10))
        .build()
        .unwrap();
    let issued = store.create("alice", "phone", None, None).await.unwrap();
    let a = store.rotate(issued.token.expose(), None).await.unwrap();
    let b = store.rotate(issued.token.expose(), None).await.unwrap();
    assert_eq!(a.token, b.token);
    assert_eq!(a.session, b.session);
    assert!(store.lookup(a.token.expose()).await.is_ok());
    // Two generations back is reuse even within the window.
    let c = store.rotate(a.token.expose(), None).await.unwrap();
    let err = store.rotate(issued.token.expose(), None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Reused);
    assert!(store.lookup(c.token.expose()).await.is_err());
}

/// Revoking one session ends it at once and reports whether it was live.
async fn revoke_one(client: &Client) {
    let store = sessions(client);
    let a = store.create("alice", "a", None, None).await.unwrap();
    let b = store.create("alice", "b", None, None).await.unwrap();
    assert!(store.revoke("alice", &a.session.session_id).await.unwrap());
    assert!(!store.revoke("alice", &a.session.session_id).await.unwrap());
    assert!(
        !store.revoke("bob", &b.session.session_id).await.unwrap(),
        "not bob's"
    );
    assert!(!store.revoke("alice", "not-a-session-id").await.unwrap());
    assert_eq!(
        store.lookup(a.token.expose()).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        store.session("alice", &a.session.session_id).await.unwrap(),
        None
    );
    assert_eq!(
        store.sessions("alice").await.unwrap(),
        vec![b.session.clone()]
    );
    assert!(store.rotate(a.token.expose(), None).await.is_err());
}

/// `revoke_all` ends every session of the user and counts them; other users keep theirs; a
/// session created afterwards works.
async fn revoke_all_counts_and_ends_everything(client: &Client) {
    let store = sessions(client);
    let mut tokens = Vec::new();
    for device in ["a", "b", "c"] {
        tokens.push(
            store
                .create("alice", device, None, None)
                .await
                .unwrap()
                .token,
        );
    }
    let bob = store.create("bob", "x", None, None).await.unwrap();
    assert_eq!(store.revoke_all("alice").await.unwrap(), 3);
    assert_eq!(store.revoke_all("alice").await.unwrap(), 0);
    for token in &tokens {
        assert_eq!(
            store.lookup(token.expose()).await.unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }
    assert_eq!(store.sessions("alice").await.unwrap(), vec![]);
    assert!(store.lookup(bob.token.expose()).await.is_ok());
    let again = store.create("alice", "d", None, None).await.unwrap();
    assert!(store.lookup(again.token.expose()).await.is_ok());
}

/// Past the per-user cap the oldest session is evicted.
async fn cap_evicts_the_oldest(client: &Client) {
    let store = Sessions::builder(client, SECRET)
        .max_sessions(3)
        .build()
        .unwrap();
    let mut issued = Vec::new();
    for device in ["1", "2", "3"] {
        issued.push(store.create("alice", device, None, None).await.unwrap());
        // Distinct creation seconds make "oldest" unambiguous.
        tokio::time::sleep(Duration::from_millis(1050)).await;
    }
    let fourth = store.create("alice", "4", None, None).await.unwrap();
    assert_eq!(fourth.evicted, 1);
    let devices: Vec<String> = store
        .sessions("alice")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.device)
        .collect();
    assert_eq!(devices, vec!["2", "3", "4"]);
    assert!(store.lookup(issued[0].token.expose()).await.is_err());
}

/// A session with a 1 s lifetime disappears from lookup and listing; a longer one stays.
async fn sessions_expire(client: &Client) {
    let store = sessions(client);
    let brief = store
        .create("alice", "brief", Some(Duration::from_secs(1)), None)
        .await
        .unwrap();
    let long = store
        .create("alice", "long", Some(Duration::from_secs(60)), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = store.lookup(brief.token.expose()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Expired, "{err}");
    assert_eq!(
        store
            .rotate(brief.token.expose(), None)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::Expired
    );
    assert_eq!(
        store.sessions("alice").await.unwrap(),
        vec![long.session.clone()]
    );
    assert_eq!(
        store
            .session("alice", &brief.session.session_id)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.revoke_all("alice").await.unwrap(),
        1,
        "only the live one counts"
    );
}

/// With an inactivity timeout, a session not rotated in time ends; rotating keeps it alive.
async fn inactivity_ends_idle_sessions(client: &Client) {
    // Times have one-second resolution: the sleeps keep a full second of margin either way.
    let store = Sessions::builder(client, SECRET)
        .inactivity_timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let idle = store.create("alice", "idle", None, None).await.unwrap();
    let busy = store.create("alice", "busy", None, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let busy = store.rotate(busy.token.expose(), None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(store.lookup(idle.token.expose()).await.is_err());
    assert!(store.lookup(busy.token.expose()).await.is_ok());
    assert_eq!(store.sessions("alice").await.unwrap().len(), 1);
}

/// Bad user ids, devices, metadata and token text are `InvalidInput`; a forged token is
/// `NotFound`; nothing is written.
async fn bad_input_and_forged_tokens(client: &Client) {
    let store = sessions(client);
    let long_user = "u".repeat(rediskit::MAX_USER_ID_LEN + 1);
    for user in ["", "a\nb", "nul\0", long_user.as_str()] {
        let err = store.create(user, "d", None, None).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidInput, "{user:?}");
    }
    let long_device = "d".repeat(rediskit::MAX_DEVICE_LEN + 1);
    assert!(
        store
            .create("alice", &long_device, None, None)
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(
        store
            .create("alice", "a\u{7}", None, None)
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    let big = serde_json::json!({"blob": "x".repeat(2000)});
    assert!(
        store
            .create("alice", "d", None, Some(&big))
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    assert!(
        store
            .create("alice", "d", Some(Duration::ZERO), None)
            .await
            .unwrap_err()
            .is_invalid_input()
    );
    assert_eq!(store.sessions("alice").await.unwrap(), vec![]);

    for junk in ["", "garbage", "a.b", "ünï.cödé", &"x".repeat(10_000)] {
        assert_eq!(
            store.lookup(junk).await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        assert_eq!(
            store.rotate(junk, None).await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
    let issued = store.create("alice", "d", None, None).await.unwrap();
    let (user, bin) = issued.token.expose().split_once('.').unwrap();
    let mut raw = B64.decode(bin).unwrap();
    raw[30] ^= 0x40;
    let forged = format!("{user}.{}", B64.encode(&raw));
    assert_eq!(
        store.lookup(&forged).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        store.rotate(&forged, None).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert!(
        store.lookup(issued.token.expose()).await.is_ok(),
        "the forgery changed nothing"
    );
    assert!(Sessions::new(client, "too short").unwrap_err().kind() == ErrorKind::Config);
}

/// User ids with hash-tag, glob and separator characters get keys of their own: one user's
/// operations never reach another's sessions.
async fn users_with_special_characters_are_isolated(client: &Client) {
    let store = sessions(client);
    let users = ["a{b}", "a%7Bb%7D", "a:b", "a*", "a", "{a}", "ü"];
    for user in users {
        store.create(user, user, None, None).await.unwrap();
    }
    for user in users {
        let listed = store.sessions(user).await.unwrap();
        assert_eq!(listed.len(), 1, "{user}");
        assert_eq!(listed[0].device, user);
    }
    assert_eq!(store.revoke_all("a*").await.unwrap(), 1);
    assert_eq!(store.sessions("a").await.unwrap().len(), 1);
}

/// Tokens issued under one secret are unknown under another.
async fn another_secret_knows_no_token(client: &Client) {
    let store = sessions(client);
    let other = Sessions::new(client, "another-secret-of-at-least-32-bytes!!").unwrap();
    let issued = store.create("alice", "d", None, None).await.unwrap();
    assert_eq!(
        other
            .lookup(issued.token.expose())
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        other
            .rotate(issued.token.expose(), None)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
    assert!(store.lookup(issued.token.expose()).await.is_ok());
}

// ---- Redis only ----

/// `revoke_all` racing 1,000 concurrent `create`s: every create that returned before the revoke
/// began is revoked, and every session is either revoked (counted) or survives (listed and
/// usable) — none is lost or half-revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_all_races_creates() {
    let backend = common::Backend::redis().await;
    let store = Sessions::builder(&backend.client, SECRET)
        .max_sessions(10_000)
        .build()
        .unwrap();
    let started = Instant::now();
    let creates: Vec<_> = (0..1000)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let issued = store
                    .create("alice", &format!("d{i}"), None, None)
                    .await
                    .unwrap();
                (issued, started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let revoke_began = started.elapsed();
    let revoked = store.revoke_all("alice").await.unwrap();
    let mut outcomes = Vec::new();
    for task in creates {
        outcomes.push(task.await.unwrap());
    }
    let listed: HashSet<String> = store
        .sessions("alice")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    let mut survivors = 0;
    for (issued, returned_at) in &outcomes {
        let alive = store.lookup(issued.token.expose()).await.is_ok();
        assert_eq!(
            alive,
            listed.contains(&issued.session.session_id),
            "listing agrees with lookup"
        );
        if alive {
            survivors += 1;
            assert!(
                *returned_at >= revoke_began,
                "a session created before revoke_all survived it"
            );
        }
    }
    assert_eq!(
        revoked + survivors,
        1000,
        "revoked {revoked}, survived {survivors}"
    );
    eprintln!("revoke_all removed {revoked}; {survivors} were created after it");
}

/// No refresh token, nor its random part, is stored anywhere in Redis: every key and value is
/// scanned after logins and rotations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plaintext_token_in_redis() {
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let store = sessions(&backend.client);
    let mut tokens = Vec::new();
    for user in ["alice", "bob"] {
        let issued = store.create(user, "device", None, None).await.unwrap();
        let rotated = store.rotate(issued.token.expose(), None).await.unwrap();
        tokens.push(issued.token.into_string());
        tokens.push(rotated.token.into_string());
    }
    let mut needles: Vec<Vec<u8>> = Vec::new();
    for token in &tokens {
        let (_, bin) = token.split_once('.').unwrap();
        let raw = B64.decode(bin).unwrap();
        needles.push(token.as_bytes().to_vec());
        needles.push(bin.as_bytes().to_vec());
        needles.push(raw[21..53].to_vec()); // the 256 random bits
        needles.push(raw[21..37].to_vec()); // and any half of them
        needles.push(raw[37..53].to_vec());
    }
    let mut admin = server.admin();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut admin).unwrap();
    assert!(!keys.is_empty());
    let mut haystack: Vec<Vec<u8>> = Vec::new();
    for key in &keys {
        haystack.push(key.as_bytes().to_vec());
        let kind: String = redis::cmd("TYPE").arg(key).query(&mut admin).unwrap();
        match kind.as_str() {
            "hash" => {
                let fields: Vec<Vec<u8>> =
                    redis::cmd("HGETALL").arg(key).query(&mut admin).unwrap();
                haystack.extend(fields);
            }
            "string" => haystack.push(redis::cmd("GET").arg(key).query(&mut admin).unwrap()),
            other => panic!("unexpected type {other} at {key}"),
        }
    }
    for needle in &needles {
        for hay in &haystack {
            assert!(
                !hay.windows(needle.len()).any(|w| w == needle.as_slice()),
                "a token secret is stored in Redis"
            );
        }
    }
}

/// One hash per user, hash-tagged on the escaped user id, expiring with its last session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_layout() {
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let store = sessions(&backend.client);
    store
        .create("al{i}ce", "d", Some(Duration::from_secs(100)), None)
        .await
        .unwrap();
    let longest = store
        .create("al{i}ce", "d", Some(Duration::from_secs(500)), None)
        .await
        .unwrap();
    let keys: Vec<String> = admin_cmd(server, &["KEYS", "*"]);
    assert_eq!(keys, vec!["rk:s:{al%7Bi%7Dce}"]);
    // The key lives as long as its longest session, rounded up by at most a sixteenth of that
    // session's life (`key_until` in session_prelude.lua): 500 s in steps of 16 s.
    let ttl = || -> i64 { admin_cmd(server, &["TTL", "rk:s:{al%7Bi%7Dce}"]) };
    assert!((495..=516).contains(&ttl()), "not the longest: {}", ttl());
    // A shorter session created later does not shorten it...
    store
        .create("al{i}ce", "d", Some(Duration::from_secs(50)), None)
        .await
        .unwrap();
    assert!((495..=516).contains(&ttl()), "shortened: {}", ttl());
    // ...and revoking the longest brings it down to the longest remaining one (100 s, in
    // steps of 4 s).
    assert!(
        store
            .revoke("al{i}ce", &longest.session.session_id)
            .await
            .unwrap()
    );
    assert!((95..=104).contains(&ttl()), "not brought down: {}", ttl());
    let encoding: String = admin_cmd(server, &["OBJECT", "ENCODING", "rk:s:{al%7Bi%7Dce}"]);
    assert_eq!(encoding, "listpack");
}

/// A creation reads the user's sessions only when their record count is a multiple of 8 (or at
/// the cap): the others are O(1) and leave ended records for that sweep, which removes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creations_sweep_ended_sessions_every_eighth_record() {
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let store = sessions(&backend.client);
    let hlen = || -> u64 { admin_cmd(server, &["HLEN", "rk:s:{bob}"]) };
    let minute = Some(Duration::from_secs(60));
    let kept = store.create("bob", "kept", minute, None).await.unwrap();
    for _ in 0..6 {
        store
            .create("bob", "brief", Some(Duration::from_secs(1)), None)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Seven records, six of them ended: the eighth creation neither reads nor sweeps them.
    let () = admin_cmd(server, &["CONFIG", "RESETSTAT"]);
    let eighth = store.create("bob", "eighth", minute, None).await.unwrap();
    assert_eq!(command_calls(server, "hgetall"), 0, "a creation at 7 swept");
    assert_eq!(hlen(), 8);
    // At 8 records the next creation sweeps: the six ended records go, the live ones stay.
    let ninth = store.create("bob", "ninth", minute, None).await.unwrap();
    assert_eq!(command_calls(server, "hgetall"), 1);
    assert_eq!(hlen(), 3, "the ended records were not swept");
    let listed = listed_ids(&store, "bob").await;
    let mut live = vec![
        kept.session.session_id,
        eighth.session.session_id,
        ninth.session.session_id,
    ];
    live.sort();
    assert_eq!(listed, live);
}

/// A write moves the user's key expiry only when its session's bound moves past the one the
/// session had (`key_until` in session_prelude.lua): a creation beside a session with the same
/// lifetime, and rotations keeping the lifetime, mostly leave the `EXPIREAT` out, yet the key
/// always outlives every live session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_expiry_moves_only_when_a_bound_does() {
    const DAY: u64 = 86_400;
    // A 30-day session's bound moves in steps of 2^17 s (36 h).
    const STEP: i64 = 1 << 17;
    let (backend, store) = coalescing_store().await;
    let server = backend.server.as_ref().unwrap();
    let month = Some(Duration::from_secs(30 * DAY));
    let ttl = || -> i64 { admin_cmd(server, &["TTL", "rk:s:{alice}"]) };
    let mut first = store.create("alice", "d", month, None).await.unwrap();
    assert_eq!(
        command_calls(server, "expireat"),
        1,
        "a new key gets its expiry"
    );
    let () = admin_cmd(server, &["CONFIG", "RESETSTAT"]);
    store.create("alice", "d", month, None).await.unwrap();
    for _ in 0..10 {
        first = store.rotate(first.token.expose(), month).await.unwrap();
    }
    // Eleven writes within a few seconds cross at most one step boundary: the creation and the
    // first rotation after it may each need one EXPIREAT, the rest none.
    let moved = command_calls(server, "expireat");
    assert!(moved <= 2, "{moved} EXPIREATs for 11 writes");
    let month_secs = 30 * DAY as i64;
    assert!(
        (month_secs - 10..=month_secs + STEP).contains(&ttl()),
        "the key does not cover the sessions: {}",
        ttl()
    );
    // A rotation to a longer lifetime moves the bound: the key follows.
    let two_months = Some(Duration::from_secs(60 * DAY));
    first = store
        .rotate(first.token.expose(), two_months)
        .await
        .unwrap();
    assert!(
        ttl() >= 2 * month_secs - 10,
        "the key ends before the rotated session: {}",
        ttl()
    );
    // Revoking that session brings the key back to the other one's bound.
    assert!(
        store
            .revoke("alice", &first.session.session_id)
            .await
            .unwrap()
    );
    assert!(
        (month_secs - 10..=month_secs + STEP).contains(&ttl()),
        "not brought back: {}",
        ttl()
    );
}

/// Whatever mix of creations, rotations (to longer or shorter lifetimes), evictions and revokes
/// a user goes through, the key never expires before a live session ends: the invariant that
/// lets writes leave the `EXPIREAT` out (`key_until` in session_prelude.lua). Seeded, so a
/// failure replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_outlives_every_live_session_whatever_the_writes() {
    const LIFETIMES: [u64; 5] = [60, 500, 7_200, 86_400, 30 * 86_400];
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    for (seed, idle) in [(1u64, None), (2, Some(3_600u64)), (3, Some(600))] {
        let mut builder = Sessions::builder(&backend.client, SECRET).max_sessions(4);
        if let Some(idle) = idle {
            builder = builder.inactivity_timeout(Duration::from_secs(idle));
        }
        let store = builder.build().unwrap();
        let user = format!("mixed{seed}");
        let key = format!("rk:s:{{{user}}}");
        let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut next = move |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        let mut tokens: Vec<(String, String)> = Vec::new();
        for step in 0..150 {
            let ttl = Some(Duration::from_secs(LIFETIMES[next(LIFETIMES.len())]));
            let what = match next(10) {
                0..=3 => {
                    let issued = store.create(&user, "d", ttl, None).await.unwrap();
                    let token = issued.token.expose().to_owned();
                    tokens.push((issued.session.session_id, token));
                    "create"
                }
                4..=7 if !tokens.is_empty() => {
                    let i = next(tokens.len());
                    // An evicted session's token is refused; it leaves the list.
                    match store.rotate(&tokens[i].1, ttl).await {
                        Ok(issued) => tokens[i].1 = issued.token.expose().to_owned(),
                        Err(_) => drop(tokens.swap_remove(i)),
                    }
                    "rotate"
                }
                _ if !tokens.is_empty() => {
                    let (sid, _) = tokens.swap_remove(next(tokens.len()));
                    store.revoke(&user, &sid).await.unwrap();
                    "revoke"
                }
                _ => continue,
            };
            let live = store.sessions(&user).await.unwrap();
            let Some(last_end) = live
                .iter()
                .map(|session| {
                    let secs = |t: std::time::SystemTime| {
                        t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
                    };
                    let expires = secs(session.expires_at);
                    idle.map_or(expires, |idle| {
                        expires.min(secs(session.last_used_at) + idle)
                    })
                })
                .max()
            else {
                continue;
            };
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let ttl: i64 = admin_cmd(server, &["TTL", &key]);
            // TTL rounds to the nearest second, and the clock may tick between the two reads.
            assert!(
                ttl >= last_end.saturating_sub(now) as i64 - 2,
                "seed {seed}, step {step} ({what}): the key expires in {ttl} s, \
                 a live session ends in {} s",
                last_end.saturating_sub(now)
            );
        }
    }
}

/// Redis forgetting its scripts (`SCRIPT FLUSH`, as after a restart) is invisible to callers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_reload_after_noscript() {
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let store = sessions(&backend.client);
    let issued = store.create("alice", "d", None, None).await.unwrap();
    let _: () = admin_cmd(server, &["SCRIPT", "FLUSH"]);
    let rotated = store.rotate(issued.token.expose(), None).await.unwrap();
    let _: () = admin_cmd(server, &["SCRIPT", "FLUSH"]);
    assert_eq!(store.revoke_all("alice").await.unwrap(), 1);
    assert!(store.lookup(rotated.token.expose()).await.is_err());
}

/// A reload Redis refuses (an ACL user without `script|load`) reports that refusal, not the
/// `NOSCRIPT` that follows from it: the error names what to grant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_script_reload_says_so() {
    let server = RedisServer::start();
    let () = admin_cmd(
        &server,
        &[
            "ACL",
            "SETUSER",
            "app",
            "on",
            ">app-password",
            "~*",
            "+@all",
            "-script|load",
        ],
    );
    let url = format!("redis://app:app-password@127.0.0.1:{}/0", server.port());
    let client = Client::connect(common::config(&url)).await.unwrap();
    let err = sessions(&client)
        .create("alice", "d", None, None)
        .await
        .unwrap_err();
    let message = err.message().to_lowercase();
    assert!(
        message.contains("noperm") && message.contains("script|load"),
        "{err}"
    );
}

/// The same on a Cluster: the reload goes to the node of the user's key, with the call, and
/// the script runs there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_reload_after_noscript_on_a_cluster() {
    let backend = common::Backend::cluster().await;
    let cluster = backend.cluster.as_ref().unwrap();
    let flush = || {
        for port in cluster.primaries() {
            let _: () = redis::cmd("SCRIPT")
                .arg("FLUSH")
                .query(&mut cluster.admin(port))
                .unwrap();
        }
    };
    let store = sessions(&backend.client);
    let issued = store.create("alice", "d", None, None).await.unwrap();
    flush();
    let rotated = store.rotate(issued.token.expose(), None).await.unwrap();
    flush();
    assert_eq!(store.revoke_all("alice").await.unwrap(), 1);
    assert!(store.lookup(rotated.token.expose()).await.is_err());
}

/// On a Cluster, a connection lost after a rotation ran and before its reply arrived makes the
/// cluster client send the rotation again. That is the same rotation, not a second use of the
/// old token: the caller gets its new token and the session lives on (no reuse detected, no
/// revocation). Likewise a creation sent again is one session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_again_after_a_lost_reply_is_not_reuse_on_a_cluster() {
    let cluster = tokio::task::spawn_blocking(|| RedisCluster::start_with(5000))
        .await
        .unwrap();
    let primary = cluster.primary_for_key("rk:s:{alice}");
    let proxy = FaultProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, primary)));
    tokio::task::block_in_place(|| cluster.announce_port(primary, proxy.port()));
    let mut config = common::config("redis://127.0.0.1:1/0");
    config.cluster_nodes = cluster.seeds();
    // Room for noticing the drop, reconnecting and sending again on a loaded machine.
    config.command_timeout = Duration::from_secs(3);
    let client = Client::connect(config).await.unwrap();
    // Loaded first: a lost `NOSCRIPT` reply would be a script that did not run.
    client.load_scripts().await.unwrap();
    let store = sessions(&client);
    // EVALSHA calls run on the node, and those that failed.
    let evalsha = || -> (u64, u64) {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut cluster.admin(primary))
            .unwrap();
        let line = info
            .lines()
            .find(|line| line.starts_with("cmdstat_evalsha:"))
            .unwrap_or("cmdstat_evalsha:calls=0,failed_calls=0");
        let field = |name: &str| -> u64 {
            line.split([':', ','])
                .find_map(|pair| pair.strip_prefix(name)?.strip_prefix('='))
                .map_or(0, |n| n.parse().unwrap())
        };
        (field("calls"), field("failed_calls"))
    };

    proxy.lose_reply_to(b"EVALSHA");
    let issued = store.create("alice", "d", None, None).await.unwrap();
    assert_eq!(
        proxy.mode(),
        Mode::Pass,
        "the creation's reply was not lost"
    );
    assert_eq!(evalsha(), (2, 0), "the creation ran twice");
    assert_eq!(store.sessions("alice").await.unwrap().len(), 1);

    proxy.lose_reply_to(b"EVALSHA");
    let rotated = store.rotate(issued.token.expose(), None).await.unwrap();
    assert_eq!(
        proxy.mode(),
        Mode::Pass,
        "the rotation's reply was not lost"
    );
    assert_eq!(evalsha(), (4, 0), "the rotation ran twice");
    assert_eq!(store.stats().reuse_detected, 0);
    let session = store.lookup(rotated.token.expose()).await.unwrap();
    assert_eq!(session.generation, 1);
    // The old token, presented again by a caller, is still a second use.
    let reused = store.rotate(issued.token.expose(), None).await.unwrap_err();
    assert_eq!(reused.kind(), ErrorKind::Reused);
}

/// With Redis down every session operation is `unavailable` — never "not found", never a
/// session — and works again when Redis returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_closed_when_redis_is_down() {
    let mut backend = common::Backend::redis().await;
    let store = sessions(&backend.client);
    let issued = store.create("alice", "d", None, None).await.unwrap();
    let token = issued.token.expose();
    backend.server.as_mut().unwrap().kill();
    let errors = [
        store.lookup(token).await.unwrap_err(),
        store.rotate(token, None).await.unwrap_err(),
        store.create("alice", "d", None, None).await.unwrap_err(),
        store
            .revoke("alice", &issued.session.session_id)
            .await
            .unwrap_err(),
        store.revoke_all("alice").await.unwrap_err(),
        store.sessions("alice").await.unwrap_err(),
        store
            .session("alice", &issued.session.session_id)
            .await
            .unwrap_err(),
    ];
    for err in errors {
        assert!(err.is_unavailable(), "{err}");
    }
    backend.server.as_mut().unwrap().restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store.create("alice", "d", None, None).await {
            Ok(_) => break,
            Err(err) => {
                assert!(err.is_unavailable() && Instant::now() < deadline, "{err}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The memory target: Redis memory per live session, as the growth of `used_memory` over 1,000
/// logins of 1,000 users, divided by 1,000. Must be at most 400 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_session() {
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let store = sessions(&backend.client);
    let used = || -> i64 {
        let info: String = admin_cmd(server, &["INFO", "memory"]);
        info.lines()
            .find_map(|line| line.strip_prefix("used_memory:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    // Warm up allocator and script cache so they don't count against the sessions.
    store.create("warm-up", "d", None, None).await.unwrap();
    store.revoke_all("warm-up").await.unwrap();
    let before = used();
    for i in 0..1000 {
        let user = format!("user-{i:06}");
        store
            .create(&user, "Firefox 132 on Windows 11", None, None)
            .await
            .unwrap();
    }
    let per_session = (used() - before) / 1000;

    // The original module's layout, for comparison: a JSON string per token plus a set per user.
    let mut admin = server.admin();
    let before = used();
    for i in 0..1000 {
        let hash = format!("{:064x}", i * 7919 + 13);
        let json = format!(
            r#"{{"user_id": "legacy-{i:06}", "created_at": "2026-11-25T17:11:36.123456", "expires_at": "2026-12-25T17:11:36.123456"}}"#
        );
        let _: () = redis::pipe()
            .cmd("SETEX")
            .arg(format!("refresh_token:{hash}"))
            .arg(2_592_000)
            .arg(json)
            .ignore()
            .cmd("SADD")
            .arg(format!("user_tokens:legacy-{i:06}"))
            .arg(&hash)
            .ignore()
            .cmd("EXPIRE")
            .arg(format!("user_tokens:legacy-{i:06}"))
            .arg(2_592_000)
            .ignore()
            .query(&mut admin)
            .unwrap();
    }
    let original = (used() - before) / 1000;
    eprintln!("memory per session: rediskit {per_session} bytes, the original layout {original}");
    assert!(per_session <= 400, "{per_session} bytes per session");
}

/// `revoke_all` racing rotations of many sessions of the user: afterwards no session is left and
/// no token — old or freshly rotated — works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_all_races_rotations() {
    let backend = common::Backend::redis().await;
    let store = sessions(&backend.client);
    let mut tokens = Vec::new();
    for i in 0..50 {
        tokens.push(
            store
                .create("alice", &format!("d{i}"), None, None)
                .await
                .unwrap()
                .token,
        );
    }
    let rotations: Vec<_> = tokens
        .iter()
        .map(|token| {
            let store = store.clone();
            let token = token.expose().to_owned();
            tokio::spawn(async move { store.rotate(&token, None).await })
        })
        .collect();
    let revoked = store.revoke_all("alice").await.unwrap();
    let mut fresh = Vec::new();
    for rotation in rotations {
        match rotation.await.unwrap() {
            Ok(issued) => fresh.push(issued.token),
            Err(err) => assert_eq!(err.kind(), ErrorKind::NotFound, "{err}"),
        }
    }
    assert_eq!(revoked, 50);
    assert_eq!(store.sessions("alice").await.unwrap(), vec![]);
    for token in tokens.iter().chain(&fresh) {
        assert!(store.lookup(token.expose()).await.is_err());
    }
    eprintln!(
        "{} rotations ran before the revoke, {} after",
        fresh.len(),
        50 - fresh.len()
    );
}

/// Logout (revoke) racing a refresh (rotate) of the same session, many times over: whichever
/// runs first, the session ends and a token the refresh handed out never works afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_races_refresh() {
    let backend = common::Backend::redis().await;
    let store = sessions(&backend.client);
    let mut refresh_won = 0;
    for round in 0..100 {
        let issued = store.create("alice", "d", None, None).await.unwrap();
        let sid = issued.session.session_id.clone();
        let token = issued.token.into_string();
        let (rotated, revoked) = tokio::join!(
            {
                let store = store.clone();
                async move { store.rotate(&token, None).await }
            },
            {
                let store = store.clone();
                async move { store.revoke("alice", &sid).await }
            }
        );
        assert!(
            revoked.unwrap(),
            "round {round}: the session was live when revoked"
        );
        if let Ok(issued) = rotated {
            refresh_won += 1;
            assert!(
                store.lookup(issued.token.expose()).await.is_err(),
                "round {round}"
            );
        }
        assert_eq!(
            store.sessions("alice").await.unwrap(),
            vec![],
            "round {round}"
        );
    }
    eprintln!("refresh ran first in {refresh_won} of 100 rounds");
}

/// A store on a fresh redis-server with its scripts loaded and its stats reset.
async fn coalescing_store() -> (common::Backend, Sessions) {
    let backend = common::Backend::redis().await;
    backend.client.load_scripts().await.unwrap();
    let store = sessions(&backend.client);
    let () = admin_cmd(backend.server.as_ref().unwrap(), &["CONFIG", "RESETSTAT"]);
    (backend, store)
}

/// A client of `url` whose commands time out after `timeout`, with its scripts loaded and its
/// breaker never opening (a call failed fast would answer its operations with another error
/// than their timeout), and a store on it.
async fn store_timing_out_after(url: &str, timeout: Duration) -> (Client, Sessions) {
    let mut config = common::config(url);
    config.command_timeout = timeout;
    config.breaker_threshold = 100;
    let client = Client::connect(config).await.unwrap();
    client.load_scripts().await.unwrap();
    let store = sessions(&client);
    (client, store)
}

fn assert_all_timed_out<T: std::fmt::Debug>(results: &[rediskit::Result<T>]) {
    for result in results {
        assert!(
            result.as_ref().is_err_and(rediskit::Error::is_timeout),
            "{result:?}"
        );
    }
}

/// Creations and rotations started together leave as few script calls: on one thread, 64
/// callers at once are 4 calls sent at once (`coalesce::IN_FLIGHT`) and 2 coalesced ones (32
/// and 28 operations), where each caller alone was one call.
#[tokio::test]
async fn concurrent_scripts_are_coalesced() {
    let (backend, store) = coalescing_store().await;
    let server = backend.server.as_ref().unwrap();
    let users: Vec<String> = (0..64).map(|i| format!("u{i}")).collect();
    let created = futures_util::future::join_all(
        users.iter().map(|user| store.create(user, "d", None, None)),
    )
    .await;
    let tokens: Vec<String> = created
        .into_iter()
        .map(|issued| issued.unwrap().token.into_string())
        .collect();
    let rotated =
        futures_util::future::join_all(tokens.iter().map(|token| store.rotate(token, None))).await;
    assert!(rotated.iter().all(Result::is_ok));
    let stats = store.stats();
    let calls = evalsha_calls(server);
    assert_eq!(calls, 12, "128 operations took {calls} EVALSHAs");
    assert_eq!(
        (stats.coalesced_calls, stats.coalesced_operations),
        (4, 120)
    );
}

/// Concurrent revocations of different users leave as coalesced calls too, each answering for
/// itself: a live session is revoked (`true`), an unknown one is not (`false`), and
/// `revoke_all` counts each user's own live sessions. A user whose key holds a string fails
/// alone.
#[tokio::test]
async fn concurrent_revocations_are_coalesced() {
    let (backend, store) = coalescing_store().await;
    let server = backend.server.as_ref().unwrap();
    let users: Vec<String> = (0..16).map(|i| format!("u{i}")).collect();
    let mut first = Vec::new();
    for user in &users {
        first.push(store.create(user, "a", None, None).await.unwrap());
        store.create(user, "b", None, None).await.unwrap();
        store.create(user, "c", None, None).await.unwrap();
    }
    let () = admin_cmd(server, &["SET", "rk:s:{bad}", "not a hash"]);
    let () = admin_cmd(server, &["CONFIG", "RESETSTAT"]);
    let coalesced_before = store.stats().coalesced_calls;

    let revoked = futures_util::future::join_all(
        users
            .iter()
            .zip(&first)
            .map(|(user, issued)| store.revoke(user, &issued.session.session_id)),
    )
    .await;
    assert!(revoked.iter().all(|r| matches!(r, Ok(true))), "{revoked:?}");
    // Unknown ids, and the string key among them.
    let unknown = futures_util::future::join_all(
        users
            .iter()
            .chain(std::iter::once(&"bad".to_owned()))
            .map(|user| store.revoke(user, "AAAAAAAAAAAAAAAA")),
    )
    .await;
    for (i, result) in unknown.iter().enumerate() {
        match result {
            Err(err) if i == users.len() => assert!(err.message().contains("WRONGTYPE"), "{err}"),
            result => assert!(matches!(result, Ok(false)), "{result:?}"),
        }
    }
    let counts =
        futures_util::future::join_all(users.iter().map(|user| store.revoke_all(user))).await;
    assert!(counts.iter().all(|r| matches!(r, Ok(2))), "{counts:?}");

    let calls = evalsha_calls(server);
    assert!(calls < 49, "49 revocations took {calls} EVALSHAs");
    assert!(store.stats().coalesced_calls >= coalesced_before + 3);
    for user in &users {
        let key = format!("rk:s:{{{user}}}");
        assert_eq!(admin_cmd::<u64>(server, &["EXISTS", &key]), 0);
    }
    let value: String = admin_cmd(server, &["GET", "rk:s:{bad}"]);
    assert_eq!(value, "not a hash");
}

/// The creations of one coalesced call may each set a different expiry: every user's key ends
/// with its own sessions, for a new key and for one that is extended, whatever the others wrote.
#[tokio::test]
async fn coalesced_creations_each_set_their_own_expiry() {
    const LIVES: [u64; 4] = [100, 1_000, 10_000, 100_000];
    let (backend, store) = coalescing_store().await;
    let server = backend.server.as_ref().unwrap();
    let users: Vec<String> = (0..64).map(|i| format!("u{i}")).collect();
    let life = |i: usize, round: usize| LIVES[(i + round) % LIVES.len()];
    let ttl = |user: &str| -> i64 { admin_cmd(server, &["TTL", &format!("rk:s:{{{user}}}")]) };
    for round in 0..2 {
        let created = futures_util::future::join_all(users.iter().enumerate().map(|(i, user)| {
            store.create(user, "d", Some(Duration::from_secs(life(i, round))), None)
        }))
        .await;
        assert!(created.iter().all(Result::is_ok));
        assert!(store.stats().coalesced_calls > 0, "nothing was coalesced");
        for (i, user) in users.iter().enumerate() {
            // The longest session of the user so far, rounded up by at most a sixteenth of it.
            let longest = (0..=round).map(|r| life(i, r)).max().unwrap() as i64;
            let ttl = ttl(user);
            assert!(
                (longest - 5..=longest + longest / 16 + 1).contains(&ttl),
                "round {round}: {user}'s key expires in {ttl} s, its longest session in {longest} s"
            );
        }
    }
}

/// In a coalesced call, an operation that fails (its user's key holds a string) fails alone:
/// the others' creations and rotations stand, and the foreign key is untouched.
#[tokio::test]
async fn a_coalesced_operation_fails_alone() {
    let (backend, store) = coalescing_store().await;
    let server = backend.server.as_ref().unwrap();
    let () = admin_cmd(server, &["SET", "rk:s:{bad}", "not a hash"]);
    // The first four go at once; the rest wait and leave together.
    let users = ["a", "b", "c", "d", "bad", "e", "f"];
    let created = futures_util::future::join_all(
        users.iter().map(|user| store.create(user, "d", None, None)),
    )
    .await;
    let mut tokens = Vec::new();
    for (user, result) in users.iter().zip(created) {
        match result {
            Err(err) if *user == "bad" => {
                assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
                assert!(err.message().contains("WRONGTYPE"), "{err}");
            }
            result => tokens.push(
                result
                    .map_err(|err| format!("{user}: {err}"))
                    .unwrap()
                    .token
                    .into_string(),
            ),
        }
    }
    assert_eq!(store.stats().coalesced_calls, 1);
    let value: String = admin_cmd(server, &["GET", "rk:s:{bad}"]);
    assert_eq!(value, "not a hash");

    // The same for rotations: `e`'s hash is replaced by a string after its token was issued.
    let () = admin_cmd(server, &["SET", "rk:s:{e}", "not a hash"]);
    let rotated =
        futures_util::future::join_all(tokens.iter().map(|token| store.rotate(token, None))).await;
    for (user, result) in ["a", "b", "c", "d", "e", "f"].iter().zip(rotated) {
        match result {
            Err(err) if *user == "e" => assert!(err.message().contains("WRONGTYPE"), "{err}"),
            result => {
                let issued = result.unwrap();
                assert_eq!(
                    (issued.session.user_id.as_str(), issued.session.generation),
                    (*user, 1)
                );
                store.lookup(issued.token.expose()).await.unwrap();
            }
        }
    }
    assert_eq!(store.stats().coalesced_calls, 2);
}

/// A write Redis refuses for its own state (out of memory, a read-only replica) fails every
/// operation of a coalesced call as it fails each alone, and writes nothing: the tokens
/// presented still work afterwards, and no session was created.
#[tokio::test]
async fn a_refused_write_fails_every_coalesced_operation() {
    let (backend, store) = coalescing_store().await;
    let server = backend.server.as_ref().unwrap();
    let users = ["a", "b", "c", "d", "e", "f"];
    let mut tokens = Vec::new();
    for user in users {
        tokens.push(
            store
                .create(user, "d", None, None)
                .await
                .unwrap()
                .token
                .into_string(),
        );
    }
    let keys: u64 = admin_cmd(server, &["DBSIZE"]);
    let replica_of = rediskit_testkit::free_port().to_string();
    let cases: [(Vec<&str>, Vec<&str>); 2] = [
        (
            vec!["CONFIG", "SET", "maxmemory", "1"],
            vec!["CONFIG", "SET", "maxmemory", "0"],
        ),
        (
            vec!["REPLICAOF", "127.0.0.1", &replica_of],
            vec!["REPLICAOF", "NO", "ONE"],
        ),
    ];
    for (refuse, allow) in cases {
        let () = admin_cmd(server, &refuse);
        let before = store.stats().coalesced_calls;
        let rotated =
            futures_util::future::join_all(tokens.iter().map(|token| store.rotate(token, None)))
                .await;
        let created = futures_util::future::join_all(
            ["g", "h", "i", "j", "k", "l"]
                .iter()
                .map(|user| store.create(user, "d", None, None)),
        )
        .await;
        for err in rotated.into_iter().chain(created).map(Result::unwrap_err) {
            assert!(err.is_unavailable(), "{refuse:?}: {err}");
        }
        assert_eq!(store.stats().coalesced_calls, before + 2, "{refuse:?}");
        let () = admin_cmd(server, &allow);
        assert_eq!(admin_cmd::<u64>(server, &["DBSIZE"]), keys, "{refuse:?}");
        for token in &tokens {
            assert_eq!(
                store.lookup(token).await.unwrap().generation,
                0,
                "{refuse:?}"
            );
        }
    }
}

/// A creation whose deadline passes while it waits for a coalesced call counts in the client's
/// timeouts, as one whose own call timed out does: an operator sees every timeout a caller saw.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_operation_that_times_out_is_counted() {
    let server = RedisServer::start();
    let (client, store) = store_timing_out_after(&server.url(), Duration::from_millis(200)).await;
    // The server answers nothing for a second: the 4 calls in flight (`coalesce::IN_FLIGHT`)
    // time out as commands, the 4 creations queued behind them while waiting.
    let () = admin_cmd(&server, &["CLIENT", "PAUSE", "1000", "ALL"]);
    let users: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    let results = futures_util::future::join_all(
        users.iter().map(|user| store.create(user, "d", None, None)),
    )
    .await;
    assert_all_timed_out(&results);
    let stats = client.stats();
    // One per caller: a call that took the queued ones just before their deadlines passed
    // answers them then, and is given up without counting again.
    assert_eq!(stats.timeouts, 8, "{stats:?}");
    assert_eq!(stats.errors, stats.timeouts);
}

/// Operations that waited in the queue keep their own deadlines once a call carries them: the
/// call answers each caller when its deadline passes, not at the call's own deadline (one
/// command timeout from when it was sent, later than theirs), even when Redis would answer
/// between the two.
#[tokio::test]
async fn a_carried_operation_ends_at_its_own_deadline() {
    use rediskit_testkit::proxy::FaultProxy;
    let server = RedisServer::start();
    let proxy = FaultProxy::for_server(&server);
    let (client, store) = store_timing_out_after(&proxy.url(), Duration::from_millis(500)).await;
    // Each reply takes 300 ms: the four calls sent at once (`coalesce::IN_FLIGHT`) return at
    // ~300 ms, within their deadline; the four creations queued behind them then leave as one
    // call, whose reply would come at ~600 ms, past the 500 ms their callers have.
    proxy.latency(Duration::from_millis(300));
    let users: Vec<String> = (0..8).map(|i| format!("u{i}")).collect();
    let results = futures_util::future::join_all(
        users.iter().map(|user| store.create(user, "d", None, None)),
    )
    .await;
    for result in &results[..4] {
        assert!(result.is_ok(), "{result:?}");
    }
    assert_all_timed_out(&results[4..]);
    assert_eq!(store.stats().coalesced_calls, 1);
    let stats = client.stats();
    assert_eq!((stats.timeouts, stats.errors), (4, 4), "{stats:?}");
}

/// An operation whose deadline passed while it waited in the queue is not sent: its caller has
/// its timeout, and its session is never created.
#[tokio::test]
async fn an_operation_out_of_time_in_the_queue_is_not_sent() {
    let server = RedisServer::start();
    let (client, store) = store_timing_out_after(&server.url(), Duration::from_millis(200)).await;
    let () = admin_cmd(&server, &["CONFIG", "RESETSTAT"]);
    // Redis answers nothing for 600 ms: the four calls in flight (`coalesce::IN_FLIGHT`) time
    // out at 200 ms, and the fifth creation, queued since the start, is out of time when the
    // queue is next taken.
    let () = admin_cmd(&server, &["CLIENT", "PAUSE", "600", "ALL"]);
    let users = ["a", "b", "c", "d", "late"];
    let results = futures_util::future::join_all(
        users.iter().map(|user| store.create(user, "d", None, None)),
    )
    .await;
    assert_all_timed_out(&results);
    // The four calls sent reach Redis when the pause ends; nothing more does.
    let deadline = Instant::now() + Duration::from_secs(5);
    while evalsha_calls(&server) < 4 {
        assert!(Instant::now() < deadline, "the paused calls never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(evalsha_calls(&server), 4);
    assert_eq!(admin_cmd::<u64>(&server, &["EXISTS", "rk:s:{late}"]), 0);
    assert_eq!(admin_cmd::<u64>(&server, &["EXISTS", "rk:s:{a}"]), 1);
    assert_eq!(client.stats().timeouts, 5);
}

/// A caller that gives up while its operation waits for the next call is left out of it: its
/// session is never created.
#[tokio::test]
async fn an_abandoned_operation_is_not_sent() {
    use futures_util::FutureExt as _;
    let (backend, store) = coalescing_store().await;
    let server = backend.server.as_ref().unwrap();
    // Four calls in flight (`coalesce::IN_FLIGHT`); the fifth waits for one of them to return.
    let mut in_flight: Vec<_> = ["a", "b", "c", "d"]
        .into_iter()
        .map(|user| Box::pin(store.create(user, "d", None, None)))
        .collect();
    let mut gone = Box::pin(store.create("gone", "d", None, None));
    for call in &mut in_flight {
        assert!(call.now_or_never().is_none());
    }
    assert!((&mut gone).now_or_never().is_none());
    drop(gone);
    for call in in_flight {
        call.await.unwrap();
    }
    // Let the flush that the returning calls started run.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(admin_cmd::<u64>(server, &["EXISTS", "rk:s:{gone}"]), 0);
    assert_eq!(evalsha_calls(server), 4);
    assert_eq!(store.stats().coalesced_calls, 0);
}

/// The ids of `user`'s live sessions, sorted.
async fn listed_ids(store: &Sessions, user: &str) -> Vec<String> {
    let mut ids: Vec<String> = store
        .sessions(user)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    ids.sort();
    ids
}

/// A record as the scripts store it (docs/keys.md): generation 0, a zero hash, created, last
/// used and rotated at `created`, ending at `expires`, on device "old".
fn planted_record(created: u32, expires: u32) -> Vec<u8> {
    let mut record = vec![0u8; 4 + 16];
    for time in [created, created, expires, created] {
        record.extend_from_slice(&time.to_be_bytes());
    }
    record.push(3);
    record.extend_from_slice(b"old");
    record
}

fn unix_now() -> u32 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    u32::try_from(now.unwrap().as_secs()).unwrap()
}

/// Writes `records` (id, record) into `key` in one `HSET`, and gives the key an hour to live.
fn plant(server: &RedisServer, key: &str, records: impl IntoIterator<Item = (String, Vec<u8>)>) {
    let mut admin = server.admin();
    let mut hset = redis::cmd("HSET");
    hset.arg(key);
    for (id, record) in records {
        hset.arg(id).arg(record);
    }
    let _: u64 = hset.query(&mut admin).unwrap();
    let _: u64 = redis::cmd("EXPIRE")
        .arg(key)
        .arg(3600)
        .query(&mut admin)
        .unwrap();
}

/// A sweep deletes any number of ended records: 8,000 (more than Lua's `unpack` takes at once),
/// under a cap of 10,000, at a creation and at a revocation; each answers as it should.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_of_thousands_of_ended_sessions_succeeds() {
    // Arrange
    let backend = common::Backend::redis().await;
    let server = backend.server.as_ref().unwrap();
    let store = Sessions::builder(&backend.client, SECRET)
        .max_sessions(10_000)
        .build()
        .unwrap();
    let now = unix_now();
    let ended = || {
        (0..8_000).map(|i| {
            (
                format!("ended{i:011}"),
                planted_record(now - 3600, now - 60),
            )
        })
    };
    plant(server, "rk:s:{bot}", ended());

    // Act: 8,000 records, a multiple of 8: this creation sweeps them all.
    let live = store.create("bot", "live", None, None).await.unwrap();

    // Assert
    assert_eq!(admin_cmd::<u64>(server, &["HLEN", "rk:s:{bot}"]), 1);

    // And a revocation, which sweeps too.
    plant(server, "rk:s:{bot}", ended());
    let revoked = store.revoke("bot", &live.session.session_id).await;
    assert!(revoked.unwrap(), "the live session was revoked");
    assert_eq!(admin_cmd::<u64>(server, &["EXISTS", "rk:s:{bot}"]), 0);
}

/// Among sessions created in the same second, the cap evicts the first id in byte order — the
/// order the listing and the embedded backend use — even on a redis-server whose locale collates
/// otherwise (en_US puts `B` after `a`; Lua compares strings with the C library's `strcoll`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ties_are_evicted_in_byte_order_whatever_the_servers_locale() {
    // Arrange: a redis-server collating as en_US.UTF-8, a locale built for it here.
    let locales = tempfile::tempdir().unwrap();
    let built = std::process::Command::new("localedef")
        .args(["-i", "en_US", "-f", "UTF-8"])
        .arg(locales.path().join("en_US.UTF-8"))
        .status();
    assert!(
        built.as_ref().is_ok_and(|status| status.success()),
        "localedef could not build en_US.UTF-8 ({built:?}); it comes with Debian's libc-bin, \
         and the locale sources with `locales` (`.ci/run` installs it)"
    );
    let locpath = locales.path().to_str().unwrap();
    let server =
        RedisServer::start_with_env(&[("LOCPATH", locpath), ("LC_ALL", "en_US.UTF-8")], &[]);
    let byte_order: i64 = admin_cmd(&server, &["EVAL", "return 'Ba' < 'ab' and 1 or 0", "0"]);
    assert_eq!(
        byte_order, 0,
        "the server should collate as en_US, not by bytes"
    );
    let client = Client::connect(common::config(&server.url()))
        .await
        .unwrap();
    let store = Sessions::builder(&client, SECRET)
        .max_sessions(2)
        .build()
        .unwrap();
    let now = unix_now();
    let (first, second) = ("Baaaaaaaaaaaaaaa", "aaaaaaaaaaaaaaaa");
    plant(
        &server,
        "rk:s:{tie}",
        [first, second].map(|id| (id.to_owned(), planted_record(now, now + 3600))),
    );

    // Act
    let created = store.create("tie", "new", None, None).await.unwrap();

    // Assert
    assert_eq!(created.evicted, 1);
    let listed = listed_ids(&store, "tie").await;
    let mut kept = vec![second.to_owned(), created.session.session_id];
    kept.sort();
    assert_eq!(
        listed, kept,
        "{first} (first in byte order) should have gone"
    );
}
