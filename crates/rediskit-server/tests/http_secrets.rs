//! No secret at rest or in the open: after logins, refreshes, reuse, failed logins and logouts
//! with the most verbose logging, neither the logs, nor the error bodies, nor any key or value in
//! Redis contains a password, a refresh token, an access token or the JWT secret.

#![allow(clippy::unwrap_used)]

mod support;

use rediskit_testkit::RedisServer;
use serde_json::json;
use support::{PASSWORD, SECRET, Service};

/// Every byte the service wrote to its log or Redis holds, scanned for every secret it handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_logs_bodies_and_redis() {
    // Arrange: the most verbose logs, including the redis crate's.
    let redis = RedisServer::start();
    let service = Service::builder()
        .redis(&redis)
        .env("RUST_LOG", "trace")
        .start()
        .await;

    // Act: everything that handles a secret, including the failure paths.
    service.register("alice", PASSWORD).await;
    let first = service.login("alice", PASSWORD).await;
    let refreshed = service.refresh(&first.refresh_token).await;
    refreshed.assert_status(200);
    let second: String = refreshed.json()["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let access: String = refreshed.json()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut bodies = Vec::new();
    bodies.push(service.refresh(&first.refresh_token).await.text); // reuse: revokes the family
    bodies.push(service.try_login("alice", "wrong-password-123").await.text);
    bodies.push(service.try_login("nobody", PASSWORD).await.text);
    bodies.push(service.refresh(&second).await.text);
    bodies.push(service.me(&access).await.text);
    bodies.push(
        service
            .post_json(
                "/auth/register",
                &json!({"username": "bad name", "password": PASSWORD}),
            )
            .await
            .text,
    );
    let third = service.login("alice", PASSWORD).await;
    service
        .auth_post("/auth/logout", &third.access_token)
        .await
        .assert_status(204);

    // Assert: the secrets themselves, and the random part of each refresh token.
    let mut secrets: Vec<String> = vec![
        PASSWORD.into(),
        "wrong-password-123".into(),
        SECRET.into(),
        first.refresh_token.clone(),
        second.clone(),
        third.refresh_token.clone(),
        first.access_token.clone(),
        access.clone(),
        third.access_token.clone(),
    ];
    for token in [&first.refresh_token, &second, &third.refresh_token] {
        secrets.push(token.split_once('.').unwrap().1.to_owned());
    }
    for access in [&first.access_token, &access, &third.access_token] {
        // A JWT's signature is what makes it usable.
        secrets.push(access.rsplit_once('.').unwrap().1.to_owned());
    }

    let log = service.log();
    assert!(log.contains("login"), "the log was captured: {log}");
    for secret in &secrets {
        assert!(
            !log.contains(secret.as_str()),
            "a secret is in the log: {secret}"
        );
        for body in &bodies {
            assert!(
                !body.contains(secret.as_str()),
                "a secret is in an error body: {body}"
            );
        }
    }

    let mut admin = redis.admin();
    let keys: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut admin).unwrap();
    let mut stored = String::new();
    for key in &keys {
        stored.push_str(key);
        let kind: String = redis::cmd("TYPE").arg(key).query(&mut admin).unwrap();
        let values: Vec<Vec<u8>> = match kind.as_str() {
            "hash" => redis::cmd("HGETALL").arg(key).query(&mut admin).unwrap(),
            "string" => vec![redis::cmd("GET").arg(key).query(&mut admin).unwrap()],
            // Rate-limit keys expire within a second; one may be gone by now.
            "none" => Vec::new(),
            other => panic!("unexpected {other} at {key}"),
        };
        for value in values {
            stored.push_str(&String::from_utf8_lossy(&value));
        }
    }
    assert!(
        stored.contains("argon2id"),
        "the password is stored as an argon2id hash"
    );
    for secret in &secrets {
        assert!(
            !stored.contains(secret.as_str()),
            "a secret is stored in Redis: {secret}"
        );
    }
}
