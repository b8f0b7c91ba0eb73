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
