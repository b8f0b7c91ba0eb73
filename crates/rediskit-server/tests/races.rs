//! Races on the account store against a real redis-server.

#![allow(clippy::unwrap_used)]

use rediskit::{Client, Config};
use rediskit_server::Users;
use rediskit_server::users::UserError;
use rediskit_testkit::RedisServer;

/// 20 concurrent registrations of one name (in different letter cases): exactly one wins, the
/// others are told it is taken, and the winner's password is the one stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_races_register() {
    let server = RedisServer::start();
    let client = Client::connect(Config::builder().url(server.url()).build().unwrap())
        .await
        .unwrap();
    let users = Users::new(&client);
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let users = users.clone();
            let name = if i % 2 == 0 { "Alice" } else { "alice" };
            tokio::spawn(async move { (i, users.register(name, &format!("password-{i}")).await) })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (i, Ok(id)) => winners.push((i, id)),
            (_, Err(UserError::Taken)) => {}
            (_, Err(other)) => panic!("{other}"),
        }
    }
    assert_eq!(winners.len(), 1);
    let (i, id) = &winners[0];
    let user = users
        .verify("ALICE", &format!("password-{i}"))
        .await
        .unwrap();
    assert_eq!(&user.id, id);
}
