//! Hostile input over HTTP: huge headers, unicode tricks, odd JSON — each a 4xx problem document
//! that names the problem, never a 5xx, never a stored account or session.

#![allow(clippy::unwrap_used)]

mod support;

use rediskit_testkit::RedisServer;
use serde_json::json;
use support::{PASSWORD, Service, assert_problem};

/// User names that only look like ASCII (zero-width, bidi override, full-width, homoglyphs,
/// NUL) are refused with 422 naming the field, and nothing is registered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unicode_tricks_in_user_names() {
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    for name in [
        "ali\u{200B}ce",
        "\u{202E}ecila",
        "ａｌｉｃｅ",
        "аlice", // Cyrillic а
        "alice\u{0}",
        "alice\u{FEFF}",
        "ali ce",
        "",
    ] {
        let reply = service
            .post_json(
                "/auth/register",
                &json!({"username": name, "password": PASSWORD}),
            )
            .await;
        let body = assert_problem(&reply, 422);
        assert!(
            body["detail"].as_str().unwrap().contains("username"),
            "{name:?}: {body}"
        );
    }
    // A unicode password is fine: its length counts in bytes.
    service.register("alice", "pässwörd-ünïcödé").await;
    service.login("alice", "pässwörd-ünïcödé").await;
}

/// The device text is stored without control, bidi-override or zero-width characters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_text_is_sanitized() {
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("alice", PASSWORD).await;
    let reply = service
        .post_json(
            "/auth/login",
            &json!({"username": "alice", "password": PASSWORD, "device": "Fire\u{202E}fox\u{200B} on Linux"}),
        )
        .await;
    reply.assert_status(200);
    let access = reply.json()["access_token"].as_str().unwrap().to_owned();
    let sessions = service.auth_get("/auth/sessions", &access).await;
    assert_eq!(sessions.json()["sessions"][0]["device"], "Firefox on Linux");
    let too_long = service
        .post_json(
            "/auth/login",
            &json!({"username": "alice", "password": PASSWORD, "device": "d".repeat(129)}),
        )
        .await;
    assert!(
        assert_problem(&too_long, 422)["detail"]
            .as_str()
            .unwrap()
            .contains("device")
    );
}

/// A device of 128 characters is stored whole however wide they are (2, 3 or 4 bytes of UTF-8:
/// up to 512 bytes), and listed back as it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_of_128_wide_characters_are_kept_whole() {
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    service.register("alice", PASSWORD).await;
    for c in ['é', '山', '🦀'] {
        let device = c.to_string().repeat(128);
        let pair = service.login_on("alice", PASSWORD, &device).await;
        let sessions = service.auth_get("/auth/sessions", &pair.access_token).await;
        let listed = sessions.json()["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["session_id"] == pair.session_id.as_str())
            .map(|s| s["device"].clone())
            .unwrap();
        assert_eq!(listed, device.as_str(), "{c}");
        // And the session still rotates with its long record.
        service
            .refresh(&pair.refresh_token)
            .await
            .assert_status(200);
    }
}

/// A login naming a user no account can have (too long for any key, or with characters names
/// may not use) is a 401 like any wrong name, limited and with the `RateLimit-*` headers, never
/// a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_user_names_at_login_are_a_401() {
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    for name in ["a".repeat(1100), "a|b".to_owned(), "é".repeat(10)] {
        let reply = service.try_login(&name, PASSWORD).await;
        assert_problem(&reply, 401);
        reply.integer_header("ratelimit-limit");
    }
}

/// A path parameter that is not UTF-8 once decoded is a 400 problem document, not axum's text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_utf8_is_a_problem_document() {
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    let reply = service.get("/api/business-metrics/%FF").await;
    assert_problem(&reply, 400);
    service.register("alice", PASSWORD).await;
    let pair = service.login("alice", PASSWORD).await;
    let reply = service
        .auth_delete("/auth/sessions/%FF", &pair.access_token)
        .await;
    assert_problem(&reply, 400);
    reply.integer_header("ratelimit-limit");
}

/// Odd JSON: duplicate fields, deep nesting, a top-level array, extra fields, numbers for
/// strings, and `null` — each a 4xx problem document; never a 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_json_is_a_client_error() {
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let bodies: Vec<String> = vec![
        r#"{"username":"a","username":"b","password":"12345678"}"#.into(),
        deep,
        r#"[{"username":"a","password":"12345678"}]"#.into(),
        r#"{"username":12,"password":"12345678"}"#.into(),
        r#"{"username":null,"password":"12345678"}"#.into(),
        r#"{"username":"a\ud800","password":"12345678"}"#.into(),
        "\u{FEFF}{}".into(),
        "".into(),
    ];
    for body in bodies {
        let reply = service.post_raw("/auth/register", body.clone()).await;
        let status = reply.status.as_u16();
        assert!((400..500).contains(&status), "{status} for {:.60}", body);
        assert_problem(&reply, status);
    }
}

/// A 32 KiB `Authorization` header or cookie is answered like any bad token: 401 problem
/// documents, and the service keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_headers() {
    let redis = RedisServer::start();
    let service = Service::start(&redis).await;
    let huge = "x".repeat(32 * 1024);
    let reply = service.me(&huge).await;
    assert_problem(&reply, 401);
    let reply = service
        .send(
            service
                .request(reqwest::Method::GET, "/me")
                .header("cookie", format!("session={huge}"))
                .header("x-forwarded-for", huge.clone()),
        )
        .await;
    assert_problem(&reply, 401);
    service.get("/health").await.assert_status(200);
}
