//! Accounts: user names and argon2id password hashes, stored in Redis.
//!
//! One key per account, `{prefix}user:{escaped lower-cased name}` → JSON `{id, username, hash}`,
//! written with `SET NX`: of two concurrent registrations of one name exactly one wins.

use std::sync::{Arc, LazyLock};

use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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

type Job = Box<dyn FnOnce(&mut Worker) + Send>;

/// A fixed pool of threads for argon2id, one per core, fed through a bounded queue.
///
/// Why: each argon2id call needs 19 MiB of working memory. Allocated per call on tokio's
/// blocking pool (which grows to hundreds of threads under a login burst), the allocator kept the
/// freed blocks and the process grew by over a gigabyte in the soak run. Here each thread owns
/// one working buffer, reused by every hash and verification, so memory is bounded by
/// cores × 19 MiB, the CPU logins can take is bounded by the cores, and a full queue answers
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
                    let mut worker = Worker::default();
                    loop {
                        // The lock is held only to take a job, not while hashing.
                        let job = match queue.lock() {
                            Ok(queue) => queue.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&mut worker),
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
        f: impl FnOnce(&mut Worker) -> R + Send + 'static,
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
    Worker::default().hash(&password).unwrap_or_default()
});

/// Largest argon2 memory cost accepted from a stored hash (KiB): a damaged record can't make a
/// verification allocate without bound.
const MAX_M_COST: u32 = 256 * 1024;

/// One hashing thread's state: the argon2 working memory, kept between calls.
#[derive(Default)]
struct Worker {
    blocks: Vec<Block>,
}

impl Worker {
    fn blocks(&mut self, params: &Params) -> &mut [Block] {
        let count = params.block_count();
        if self.blocks.len() != count {
            self.blocks = vec![Block::default(); count];
        }
        &mut self.blocks
    }

    /// An argon2id PHC string (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`) of `password`.
    fn hash(&mut self, password: &[u8]) -> Result<String, String> {
        let params = Params::default();
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
        let mut salt = [0u8; 16];
        rand::rng().fill_bytes(&mut salt);
        let salt_string = SaltString::encode_b64(&salt).map_err(|err| err.to_string())?;
        let blocks = self.blocks(&params);
        let output = Output::init_with(Params::DEFAULT_OUTPUT_LEN, |out| {
            Ok(argon2.hash_password_into_with_memory(password, &salt, out, &mut *blocks)?)
        })
        .map_err(|err| err.to_string())?;
        let phc = PasswordHash {
            algorithm: Algorithm::Argon2id.ident(),
            version: Some(Version::V0x13.into()),
            params: ParamsString::try_from(&params).map_err(|err| err.to_string())?,
            salt: Some(salt_string.as_salt()),
            hash: Some(output),
        };
        Ok(phc.to_string())
    }

    /// Whether `password` matches the PHC string `stored` (compared in constant time).
    fn verify(&mut self, stored: &str, password: &[u8]) -> bool {
        let Ok(parsed) = PasswordHash::new(stored) else {
            return false;
        };
        let (Ok(params), Ok(algorithm), Some(expected)) = (
            Params::try_from(&parsed),
            Algorithm::try_from(parsed.algorithm),
            parsed.hash,
        ) else {
            return false;
        };
        let version = match parsed.version.map(Version::try_from) {
            None => Version::default(),
            Some(Ok(version)) => version,
            Some(Err(_)) => return false,
        };
        let mut salt = [0u8; 64];
        let Some(salt) = parsed.salt.and_then(|s| s.decode_b64(&mut salt).ok()) else {
            return false;
        };
        if params.m_cost() > MAX_M_COST {
            return false;
        }
        let argon2 = Argon2::new(algorithm, version, params.clone());
        let blocks = self.blocks(&params);
        Output::init_with(expected.len(), |out| {
            Ok(argon2.hash_password_into_with_memory(password, salt, out, &mut *blocks)?)
        })
        // `Output`'s equality is constant-time.
        .is_ok_and(|computed| computed == expected)
    }
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
            .run(move |worker| worker.hash(password.as_bytes()))
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
            .run(move |worker| worker.verify(&hash, password.as_bytes()))
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

    /// The reusable-buffer hasher writes standard argon2id PHC strings: the argon2 crate's own
    /// verifier accepts ours, ours accepts its, and wrong passwords fail both ways.
    #[test]
    fn hashes_are_standard_phc() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let mut worker = Worker::default();
        let ours = worker.hash(b"correct horse").unwrap();
        assert!(
            ours.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{ours}"
        );
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"wrong horse", &parsed)
                .is_err()
        );
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs = Argon2::default()
            .hash_password(b"battery", &salt)
            .unwrap()
            .to_string();
        assert!(worker.verify(&theirs, b"battery"));
        assert!(!worker.verify(&theirs, b"staple"));
        assert!(!worker.verify("not a phc string", b"battery"));
        // A stored hash asking for absurd memory is refused, not allocated.
        let greedy = theirs.replace("m=19456", "m=4000000");
        assert!(!worker.verify(&greedy, b"battery"));
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
