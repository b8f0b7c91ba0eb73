//! Refresh-token sessions: one per device, rotated on every use; a rotated token presented again
//! is treated as stolen and revokes its session; "log out everywhere" ends the rest.
//!
//! Run: `cargo run -p rediskit --example sessions` (in-process `memory://` backend), or against a
//! Redis: `REDIS_URL=redis://localhost:6379/0 cargo run -p rediskit --example sessions`.

use rediskit::{Client, Config, ErrorKind, Sessions};

/// `REDIS_URL` (and the other variables of the README) when it is set, else `memory://`.
async fn connect() -> rediskit::Result<Client> {
    let config = match std::env::var("REDIS_URL") {
        Ok(_) => Config::from_env()?,
        Err(_) => Config::builder().url("memory://").build()?,
    };
    Client::connect(config).await
}

#[tokio::main]
async fn main() -> rediskit::Result<()> {
    let client = connect().await?;
    // The secret keys the tokens' MACs and hashes (at least 32 bytes; from your secret store).
    let secret = std::env::var("JWT_SECRET")
        .unwrap_or_else(|_| "example-secret-of-at-least-thirty-two-bytes".into());
    let sessions = Sessions::new(&client, secret)?;
    let user = "example-user-42";

    // Log in on two devices: each gets a session and its first refresh token.
    let laptop = sessions
        .create(user, "Firefox on Linux", None, None)
        .await?;
    let phone = sessions.create(user, "iPhone app", None, None).await?;
    println!(
        "created: laptop {} and phone {}",
        laptop.session.session_id, phone.session.session_id
    );

    // The laptop refreshes: it gets a new token and the old one stops working.
    let rotated = sessions.rotate(laptop.token.expose(), None).await?;
    println!(
        "rotated: laptop session {} is at generation {}",
        rotated.session.session_id, rotated.session.generation
    );

    // Someone replays the laptop's old token: reuse is detected and the session is revoked,
    // so the thief and the laptop are both logged out of it.
    match sessions.rotate(laptop.token.expose(), None).await {
        Err(err) if err.kind() == ErrorKind::Reused => println!("replayed: {err}"),
        other => println!("replayed: unexpected {other:?}"),
    }
    match sessions.rotate(rotated.token.expose(), None).await {
        Err(err) if err.kind() == ErrorKind::NotFound => {
            println!("laptop's newest token: refused too ({err})")
        }
        other => println!("laptop's newest token: unexpected {other:?}"),
    }

    // The phone is unaffected.
    let live = sessions.sessions(user).await?;
    let devices: Vec<_> = live.iter().map(|s| s.device.as_str()).collect();
    println!("live sessions: {devices:?}");
    println!(
        "phone token belongs to {}",
        sessions.lookup(phone.token.expose()).await?.device
    );

    // Log out everywhere: every session of the user ends atomically.
    println!(
        "revoke_all: {} session(s) ended",
        sessions.revoke_all(user).await?
    );
    println!("live sessions: {}", sessions.sessions(user).await?.len());
    println!("stats: {:?}", sessions.stats());
    client.close().await;
    Ok(())
}
