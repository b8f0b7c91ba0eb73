//! Accounts and sessions over HTTP, black box: the `rediskit` binary on its own redis-server,
//! driven through the contract in HTTP_API.md (register, login, refresh with rotation and reuse
//! detection, sessions per device, logout, logout everywhere, access tokens).

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::future::join_all;
use rediskit_testkit::RedisServer;
use serde_json::json;
use support::{PASSWORD, SECRET, Service, assert_problem, is_timestamp, jwt_assemble, jwt_parts};

/// The contract lets a revocation take up to a second to reach `/me`; this adds room for the
/// requests themselves.
const REVOCATION_BOUND: Duration = Duration::from_secs(2);

/// Register, log in, `/me`, refresh (the presented token then fails), and `expires_in` /
/// `refresh_expires_in` follow the configured lifetimes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_me_refresh() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("ACCESS_TOKEN_TTL_SECS", "600")
        .env("REFRESH_TOKEN_TTL_SECS", "7200")
        .start()
        .await;

    // Act: register and log in.
    let user_id = service.register("alice", PASSWORD).await;
    let first = service.login_on("alice", PASSWORD, "laptop").await;

    // Assert: the pair and /me.
    assert_eq!(first.expires_in, 600);
    assert!(
        (7200 - 5..=7200).contains(&first.refresh_expires_in),
        "a new session's refresh token lives REFRESH_TOKEN_TTL_SECS: {}",
        first.refresh_expires_in
    );
    let me = service.me(&first.access_token).await;
    me.assert_status(200);
    assert_eq!(
        me.json(),
        json!({"user_id": user_id, "username": "alice", "session_id": first.session_id})
    );

    // Act: refresh.
    let second = support::TokenPair::from_reply(&service.refresh(&first.refresh_token).await);

    // Assert: a new pair for the same session that works.
    assert_eq!(
        second.session_id, first.session_id,
        "rotation keeps the session"
    );
    assert_ne!(second.refresh_token, first.refresh_token);
    assert_ne!(second.access_token, first.access_token);
    assert_eq!(second.expires_in, 600);
    assert!((1..=7200).contains(&second.refresh_expires_in));
    let me = service.me(&second.access_token).await;
    me.assert_status(200);
    assert_eq!(me.json()["session_id"], first.session_id.as_str());

    // Assert: the presented refresh token stopped working.
    assert_problem(&service.refresh(&first.refresh_token).await, 401);
}

/// Sessions per device: listing marks the current one and names devices from the body or the
/// `User-Agent`; deleting another session ends it; logout ends the current one; logout-all
/// counts and ends every remaining one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_devices_logout_and_logout_all() {
    // Arrange: one session named in the body, one named by its User-Agent.
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("bob", PASSWORD).await;
    let laptop = service.login_on("bob", PASSWORD, "laptop").await;
    let phone_reply = service
        .send(
            service
                .request(reqwest::Method::POST, "/auth/login")
                .header("user-agent", "PhoneApp/1.0 (test)")
                .json(&json!({"username": "bob", "password": PASSWORD})),
        )
        .await;
    let phone = support::TokenPair::from_reply(&phone_reply);
    assert_ne!(laptop.session_id, phone.session_id);

    // Act: list from the laptop.
    let listed = service
        .auth_get("/auth/sessions", &laptop.access_token)
        .await;

    // Assert
    listed.assert_status(200);
    let body = listed.json();
    let sessions = body["sessions"].as_array().expect("a `sessions` array");
    assert_eq!(sessions.len(), 2, "{body}");
    for session in sessions {
        for field in ["created_at", "last_used_at", "expires_at"] {
            assert!(
                is_timestamp(&session[field]),
                "`{field}` is a time: {session}"
            );
        }
        let id = session["session_id"].as_str().expect("a session_id");
        let (device, current) = if id == laptop.session_id {
            ("laptop", true)
        } else {
            assert_eq!(id, phone.session_id, "{body}");
            ("PhoneApp/1.0 (test)", false)
        };
        assert_eq!(session["device"], device, "{session}");
        assert_eq!(session["current"], current, "{session}");
    }

    // Act: end the phone's session from the laptop.
    let path = format!("/auth/sessions/{}", phone.session_id);
    let deleted = service.auth_delete(&path, &laptop.access_token).await;

    // Assert: it is gone, the laptop is not.
    deleted.assert_status(204);
    service
        .assert_me_refused_within(&phone.access_token, REVOCATION_BOUND)
        .await;
    assert_problem(&service.refresh(&phone.refresh_token).await, 401);
    service.me(&laptop.access_token).await.assert_status(200);
    let listed = service
        .auth_get("/auth/sessions", &laptop.access_token)
        .await;
    listed.assert_status(200);
    let ids: Vec<_> = listed.json()["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, vec![laptop.session_id.clone()]);

    // Act: log out of the laptop.
    let logout = service
        .auth_post("/auth/logout", &laptop.access_token)
        .await;

    // Assert: both of its tokens stop working at once.
    logout.assert_status(204);
    assert_problem(&service.me(&laptop.access_token).await, 401);
    assert_problem(&service.refresh(&laptop.refresh_token).await, 401);

    // Arrange: two new sessions.
    let desk = service.login_on("bob", PASSWORD, "desk").await;
    let tablet = service.login_on("bob", PASSWORD, "tablet").await;

    // Act: log out everywhere from the desk.
    let all = service
        .auth_post("/auth/logout-all", &desk.access_token)
        .await;

    // Assert: both counted, both ended.
    all.assert_status(200);
    assert_eq!(all.json(), json!({"revoked": 2}));
    for pair in [&desk, &tablet] {
        service
            .assert_me_refused_within(&pair.access_token, REVOCATION_BOUND)
            .await;
        assert_problem(&service.refresh(&pair.refresh_token).await, 401);
    }
}

/// A refresh token presented after it was rotated is refused, and that revokes the whole
/// family: its successor and the session's access tokens stop working too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_refresh_token_revokes_the_family() {
    // Arrange: A rotated into B.
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("carol", PASSWORD).await;
    let a = service.login("carol", PASSWORD).await;
    let b = support::TokenPair::from_reply(&service.refresh(&a.refresh_token).await);
    service.me(&b.access_token).await.assert_status(200);

    // Act: A again (a stolen copy, say).
    let reuse = service.refresh(&a.refresh_token).await;

    // Assert
    assert_problem(&reuse, 401);
    assert_problem(&service.refresh(&b.refresh_token).await, 401);
    service
        .assert_me_refused_within(&b.access_token, REVOCATION_BOUND)
        .await;
    service
        .assert_me_refused_within(&a.access_token, REVOCATION_BOUND)
        .await;
}

/// After logout, `/me` refuses the session's access token on the very next request (no delay).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_is_seen_by_me_at_once() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("dave", PASSWORD).await;
    let pair = service.login("dave", PASSWORD).await;
    service.me(&pair.access_token).await.assert_status(200);

    // Act
    service
        .auth_post("/auth/logout", &pair.access_token)
        .await
        .assert_status(204);
    let me = service.me(&pair.access_token).await;

    // Assert
    assert_problem(&me, 401);
}

/// A logout on one instance reaches another instance on the same Redis within a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_reaches_every_instance() {
    // Arrange: two instances, one Redis, one secret; the token works on both.
    let redis = RedisServer::start();
    let first = Service::start(&redis).await;
    let second = Service::start(&redis).await;
    first.register("erin", PASSWORD).await;
    let pair = first.login("erin", PASSWORD).await;
    second.me(&pair.access_token).await.assert_status(200);

    // Act
    first
        .auth_post("/auth/logout", &pair.access_token)
        .await
        .assert_status(204);

    // Assert
    second
        .assert_me_refused_within(&pair.access_token, REVOCATION_BOUND)
        .await;
}

/// 20 concurrent refreshes of one token: exactly one gets a new pair, the others 401; the
/// losers presented a rotated token, so the family ends with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_refreshes_have_one_winner() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("frank", PASSWORD).await;
    let pair = service.login("frank", PASSWORD).await;

    // Act
    let replies = join_all((0..20).map(|_| service.refresh(&pair.refresh_token))).await;

    // Assert
    let winners: Vec<_> = replies.iter().filter(|r| r.status == 200).collect();
    assert_eq!(
        winners.len(),
        1,
        "statuses: {:?}",
        replies
            .iter()
            .map(|r| r.status.as_u16())
            .collect::<Vec<_>>()
    );
    for reply in replies.iter().filter(|r| r.status != 200) {
        assert_problem(reply, 401);
    }
    let winner = support::TokenPair::from_reply(winners[0]);
    assert_problem(&service.refresh(&winner.refresh_token).await, 401);
    service
        .assert_me_refused_within(&winner.access_token, REVOCATION_BOUND)
        .await;
}

/// Access tokens are HS256 JWTs whose claims carry `sub`, `sid` (the session), `iat`, `exp`
/// (`iat` + ACCESS_TOKEN_TTL_SECS) and a `jti` unique to each token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_tokens_are_hs256_jwts_with_the_contract_claims() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("ACCESS_TOKEN_TTL_SECS", "900")
        .start()
        .await;
    service.register("grace", PASSWORD).await;

    // Act
    let one = service.login("grace", PASSWORD).await;
    let two = service.login("grace", PASSWORD).await;

    // Assert
    let (header, claims, _) = jwt_parts(&one.access_token);
    assert_eq!(header["alg"], "HS256", "{header}");
    assert_eq!(claims["sid"], one.session_id.as_str(), "{claims}");
    assert!(
        claims["sub"].is_string() || claims["sub"].is_u64(),
        "{claims}"
    );
    let iat = claims["iat"].as_u64().expect("numeric iat");
    let exp = claims["exp"].as_u64().expect("numeric exp");
    assert_eq!(exp - iat, 900, "{claims}");
    let (_, other, _) = jwt_parts(&two.access_token);
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    assert_ne!(claims["jti"], other["jti"], "every token has its own jti");
    assert_eq!(claims["sub"], other["sub"]);
}

/// Forged access tokens are refused on `/me`: signed with another secret, `alg: none`, a
/// payload changed under the original signature, and garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_access_tokens_are_refused() {
    // Arrange: two instances on one Redis, with different secrets. The other instance's token
    // is a well-formed HS256 JWT for a live session, signed with the wrong key.
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    let impostor = Service::builder()
        .redis(&redis)
        .env(
            "JWT_SECRET",
            "another-secret-of-at-least-32-bytes-for-the-impostor",
        )
        .start()
        .await;
    assert_ne!(
        SECRET,
        "another-secret-of-at-least-32-bytes-for-the-impostor"
    );
    service.register("heidi", PASSWORD).await;
    let mallory_id = service.register("mallory", PASSWORD).await;
    let genuine = service.login("heidi", PASSWORD).await;
    let foreign = impostor.login("heidi", PASSWORD).await;
    impostor.me(&foreign.access_token).await.assert_status(200);
    let (header, claims, signature) = jwt_parts(&genuine.access_token);

    let mut none_header = header.clone();
    none_header["alg"] = json!("none");
    let mut other_user = claims.clone();
    other_user["sub"] = mallory_id;
    let mut longer = claims.clone();
    longer["exp"] = json!(claims["exp"].as_u64().unwrap() + 86_400);
    let forgeries = [
        ("signed with another secret", foreign.access_token.clone()),
        (
            "alg none, no signature",
            jwt_assemble(&none_header, &claims, ""),
        ),
        (
            "alg none, original signature",
            jwt_assemble(&none_header, &claims, &signature),
        ),
        (
            "sub changed",
            jwt_assemble(&header, &other_user, &signature),
        ),
        ("exp extended", jwt_assemble(&header, &longer, &signature)),
        ("signature removed", jwt_assemble(&header, &claims, "")),
        ("not a JWT", "not-a-token".to_owned()),
        ("empty parts", "..".to_owned()),
    ];

    for (what, token) in &forgeries {
        // Act
        let reply = service.me(token).await;

        // Assert
        assert_eq!(reply.status, 401, "{what}: {}", reply.text);
        assert_problem(&reply, 401);
    }
    // The genuine token still works, so the refusals were about the forgeries.
    service.me(&genuine.access_token).await.assert_status(200);
}

/// An expired access token is refused (after any clock-skew leeway), while its session's
/// refresh token still works: the refusal is about expiry, not the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_access_token_is_refused() {
    // Arrange: access tokens that live one second.
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("ACCESS_TOKEN_TTL_SECS", "1")
        .start()
        .await;
    service.register("ivan", PASSWORD).await;
    let pair = service.login("ivan", PASSWORD).await;
    assert_eq!(pair.expires_in, 1);

    // Act / Assert: a verifier may allow up to 60 s of clock skew, so wait past that at most.
    service
        .assert_me_refused_within(&pair.access_token, Duration::from_secs(90))
        .await;

    // Assert: the session lives on.
    let next = service.refresh(&pair.refresh_token).await;
    support::TokenPair::from_reply(&next);
}

/// A refresh token past REFRESH_TOKEN_TTL_SECS is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_refresh_token_is_refused() {
    // Arrange: sessions that live one second.
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("REFRESH_TOKEN_TTL_SECS", "1")
        .start()
        .await;
    service.register("ivy", PASSWORD).await;
    let pair = service.login("ivy", PASSWORD).await;

    // Act: wait it out (Redis expiry has one-second granularity, hence the margin).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reply = service.refresh(&pair.refresh_token).await;

    // Assert
    assert_problem(&reply, 401);
}

/// Sessions of different users don't mix: each user's list holds only their own sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_lists_are_per_user() {
    // Arrange
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("judy", PASSWORD).await;
    service.register("ken", PASSWORD).await;
    let judy: Vec<_> = vec![
        service.login("judy", PASSWORD).await,
        service.login("judy", PASSWORD).await,
    ];
    let ken = service.login("ken", PASSWORD).await;

    // Act
    let listed = service
        .auth_get("/auth/sessions", &judy[0].access_token)
        .await;

    // Assert
    listed.assert_status(200);
    let ids: HashSet<_> = listed.json()["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["session_id"].as_str().unwrap().to_owned())
        .collect();
    let expected: HashSet<_> = judy.iter().map(|p| p.session_id.clone()).collect();
    assert_eq!(ids, expected);
    assert!(!ids.contains(&ken.session_id));
}

/// The harness's own base64url and RFC 3339 helpers.
#[test]
fn harness_helpers() {
    for input in [
        &b""[..],
        b"f",
        b"fo",
        b"foo",
        b"foob",
        b"fooba",
        b"foobar",
        &[0xff, 0xfe],
    ] {
        assert_eq!(
            support::b64url_decode(&support::b64url_encode(input)).unwrap(),
            input
        );
    }
    assert_eq!(support::b64url_encode(b"foobar"), "Zm9vYmFy");
    assert_eq!(support::b64url_encode(&[0xfb, 0xff]), "-_8");
    assert!(support::is_rfc3339("2025-01-31T12:00:00Z"));
    assert!(support::is_rfc3339("2025-01-31T12:00:00.123456+02:00"));
    assert!(!support::is_rfc3339("2025-01-31 12:00:00"));
    assert!(!support::is_rfc3339("1738324800"));
}
