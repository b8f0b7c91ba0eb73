//! Accounts: user names and argon2id password hashes, stored in Redis.
//!
//! One key per account, `{prefix}user:{escaped lower-cased name}` → JSON `{id, username, hash}`,
//! written with `SET NX`: of two concurrent registrations of one name exactly one wins.

use std::sync::{Arc, LazyLock};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::RngCore;
use rediskit::Client;
use serde::{Deserialize, Serialize};

/// Longest user name.
pub const MAX_USERNAME_LEN: usize = 64;
/// Shortest password, in bytes.
pub const MIN_PASSWORD_LEN: usize = 8;
/// Longest password, in bytes (argon2 cost grows with it; 256 is plenty for passphrases).
pub const MAX_PASSWORD_LEN: usize = 256;

/// A stored account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    /// Stable id, 24 hex characters.
    pub id: String,
    /// The name as registered.
    pub username: String,
    /// The argon2id PHC string.
    hash: String,
}

/// Why a registration or login failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// A field is invalid; the message names it.
    #[error("{0}")]
    Invalid(String),
    /// The user name is taken.
    #[error("the username is already taken")]
    Taken,
    /// Wrong user name or password (one answer for both).
    #[error("wrong username or password")]
    WrongCredentials,
    /// Redis or the hashing pool failed.
    #[error(transparent)]
    Store(#[from] rediskit::Error),
    /// A stored account did not parse (not the caller's fault).
    #[error("stored account is corrupted: {0}")]
    Corrupted(String),
    /// Too many password hashes are waiting; try again shortly.
    #[error("too many logins at once; try again shortly")]
    Busy,
}

/// Password hashes computed at once; more wait in line.
pub const HASHER_QUEUE: usize = 256;

/// The account store. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Users {
    client: Client,
    hasher: Arc<Hasher>,
}

type Job = Box<dyn FnOnce(&Argon2<'static>) + Send>;

/// A fixed pool of threads for argon2id, one per core, fed through a bounded queue.
///
/// Why not `spawn_blocking`: each argon2id call allocates 19 MiB, and tokio's blocking pool
/// grows to hundreds of threads under a login burst; every thread's allocator arena keeps its
/// freed blocks, so the process grew by over a gigabyte in the soak run. A fixed pool bounds both
/// the memory (cores × 19 MiB) and the CPU that logins can take, and a full queue answers
/// "busy" (503) instead of queueing without end.
#[derive(Debug)]
struct Hasher {
    jobs: std::sync::mpsc::SyncSender<Job>,
}

impl Hasher {
    fn new() -> Self {
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let (jobs, queue) = std::sync::mpsc::sync_channel::<Job>(HASHER_QUEUE);
        let queue = Arc::new(std::sync::Mutex::new(queue));
        for i in 0..threads {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    let argon2 = Argon2::default();
                    loop {
                        // The lock is held only to take a job, not while hashing.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&argon2),
                            // Every sender is gone: the store was dropped.
                            Err(_) => return,
                        }
                    }
                });
            if let Err(err) = spawned {
                tracing::error!(error = %err, "cannot start a password-hashing thread");
            }
        }
        Self { jobs }
    }

    /// Runs `f` on a hashing thread; `Busy` when the queue is full.
    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Argon2<'static>) -> R + Send + 'static,
    ) -> Result<R, UserError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .try_send(Box::new(move |argon2| {
                let _ = tx.send(f(argon2));
            }))
            .map_err(|_| UserError::Busy)?;
        rx.await.map_err(|_| UserError::Busy)
    }
}

/// A hash of a random password, verified against when the user does not exist, so that unknown
/// names take as long as wrong passwords.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    let mut password = [0u8; 16];
    rand::rng().fill_bytes(&mut password);
    hash_password(&Argon2::default(), &password).unwrap_or_default()
});

fn hash_password(argon2: &Argon2<'_>, password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|err| err.to_string())?;
    argon2
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|err| err.to_string())
}

/// Checks a user name: 1–64 characters of `A-Z a-z 0-9 _ . @ -`.
pub fn check_username(username: &str) -> Result<(), UserError> {
    if username.is_empty() || username.chars().count() > MAX_USERNAME_LEN {
        return Err(UserError::Invalid(format!(
            "username: must be 1 to {MAX_USERNAME_LEN} characters"
        )));
    }
    if let Some(bad) = username
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '@' | '-')))
    {
        return Err(UserError::Invalid(format!(
            "username: may only contain A-Z a-z 0-9 _ . @ - (found {bad:?})"
        )));
    }
    Ok(())
}

/// Checks a password: 8–256 bytes.
pub fn check_password(password: &str) -> Result<(), UserError> {
    if !(MIN_PASSWORD_LEN..=MAX_PASSWORD_LEN).contains(&password.len()) {
        return Err(UserError::Invalid(format!(
            "password: must be {MIN_PASSWORD_LEN} to {MAX_PASSWORD_LEN} bytes, got {}",
            password.len()
        )));
    }
    Ok(())
}

impl Users {
    /// The store over `client`.
    pub fn new(client: &Client) -> Self {
        // Warm the dummy hash now rather than on the first unknown-user login.
        LazyLock::force(&DUMMY_HASH);
        Self {
            client: client.clone(),
            hasher: Arc::new(Hasher::new()),
        }
    }

    fn key(&self, username: &str) -> String {
        // Names are ASCII from a small alphabet (checked), so lower-casing is the whole escaping.
        format!(
            "{}user:{}",
            self.client.key_prefix(),
            username.to_ascii_lowercase()
        )
    }

    /// Registers `username` (case-insensitively unique) and returns the new user id.
    pub async fn register(&self, username: &str, password: &str) -> Result<String, UserError> {
        check_username(username)?;
        check_password(password)?;
        let password = password.to_owned();
        let hash = self
            .hasher
            .run(move |argon2| hash_password(argon2, password.as_bytes()))
            .await?
            .map_err(UserError::Corrupted)?;
        let mut id = [0u8; 12];
        rand::rng().fill_bytes(&mut id);
        let user = User {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            username: username.to_owned(),
            hash,
        };
        let bytes =
            serde_json::to_vec(&user).map_err(|err| UserError::Corrupted(err.to_string()))?;
        if self
            .client
            .set_bytes_if_absent(&self.key(username), &bytes)
            .await?
        {
            Ok(user.id)
        } else {
            Err(UserError::Taken)
        }
    }

    /// The account of `username`, if any.
    pub async fn find(&self, username: &str) -> Result<Option<User>, UserError> {
        check_username(username)?;
        match self.client.get_bytes(&self.key(username)).await? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|err| UserError::Corrupted(err.to_string())),
        }
    }

    /// The account, if `password` is right. An unknown name costs one argon2 verification, like a
    /// wrong password, and gives the same error.
    pub async fn verify(&self, username: &str, password: &str) -> Result<User, UserError> {
        let user = if check_username(username).is_ok() {
            self.find(username).await?
        } else {
            None
        };
        let hash = user
            .as_ref()
            .map(|u| u.hash.clone())
            .unwrap_or_else(|| DUMMY_HASH.clone());
        let password = password.to_owned();
        let matches = self
            .hasher
            .run(move |argon2| {
                PasswordHash::new(&hash)
                    .map(|parsed| argon2.verify_password(password.as_bytes(), &parsed).is_ok())
                    .unwrap_or(false)
            })
            .await?;
        match user {
            Some(user) if matches => Ok(user),
            _ => Err(UserError::WrongCredentials),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's name and password rules.
    #[test]
    fn rules() {
        assert!(check_username("alice.b@example-1_x").is_ok());
        assert!(check_username(&"a".repeat(64)).is_ok());
        for bad in ["", "a b", "a/b", "ünï", &"a".repeat(65), "a\n"] {
            assert!(check_username(bad).is_err(), "{bad:?}");
        }
        assert!(check_password("12345678").is_ok());
        assert!(check_password(&"p".repeat(256)).is_ok());
        assert!(check_password("1234567").is_err());
        assert!(check_password(&"p".repeat(257)).is_err());
    }

    /// Registration is case-insensitively unique, the password verifies, and unknown users and
    /// wrong passwords fail alike.
    #[tokio::test]
    async fn register_and_verify() {
        let client = Client::connect(
            rediskit::Config::builder()
                .url("memory://")
                .build()
                .unwrap(),
        )
        .await
        .unwrap();
        let users = Users::new(&client);
        let id = users.register("Alice", "correct horse").await.unwrap();
        assert!(matches!(
            users.register("alice", "another one").await,
            Err(UserError::Taken)
        ));
        let user = users.verify("ALICE", "correct horse").await.unwrap();
        assert_eq!(
            (user.id.as_str(), user.username.as_str()),
            (id.as_str(), "Alice")
        );
        assert!(matches!(
            users.verify("alice", "wrong pass").await,
            Err(UserError::WrongCredentials)
        ));
        assert!(matches!(
            users.verify("nobody", "whatever1").await,
            Err(UserError::WrongCredentials)
        ));
        assert!(matches!(
            users.verify("bad name!", "whatever1").await,
            Err(UserError::WrongCredentials)
        ));
    }
}
