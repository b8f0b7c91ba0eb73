//! Test support: real `redis-server` processes, each on its own ephemeral port and in its own
//! temporary directory, stopped when dropped.
//!
//! Tests never touch the machine's shared Redis on 6379. A missing `redis-server` binary is a
//! test failure with instructions, not a silent skip.
//!
//! # Layout
//!
//! - The crate root: [`RedisServer`], one standalone server, and [`free_port`].
//! - [`tls`]: a TLS-only server with a throwaway certificate authority.
//! - [`proxy`]: a fault-injecting TCP proxy to put between a client and a server.
//! - [`cluster`]: a Redis Cluster of three primaries and three replicas.
//! - [`sentinel`]: a primary, a replica and three sentinels watching them.
//! - `node` (private): one process of those topologies, restarted on another port if its own
//!   is taken.

pub mod cluster;
mod node;
pub mod proxy;
pub mod sentinel;

use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod tls;

/// How long a server gets to start answering `PING`.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `redis-server` child process. Killed (and its directory removed) on drop.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    args: Vec<String>,
    /// Environment variables set for the process (a locale, say), beside the inherited ones.
    env: Vec<(String, String)>,
}

impl RedisServer {
    /// Starts a server with persistence off on a free port.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments (e.g. `["--maxmemory", "1mb"]`).
    pub fn start_with(args: &[&str]) -> Self {
        Self::start_with_env(&[], args)
    }

    /// Starts a server with environment variables of its own (e.g. `LC_ALL`, which redis-server
    /// reads for its Lua scripts' string collation) and extra arguments.
    pub fn start_with_env(env: &[(&str, &str)], args: &[&str]) -> Self {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        let mut dir = tempfile::Builder::new()
            .prefix("rediskit-test-")
            .tempdir()
            .expect("create a temporary directory for redis-server");
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        // Another test may grab the port between our probe and redis-server's bind: retry.
        for _ in 0..5 {
            let port = free_port();
            let mut server = Self {
                child: None,
                port,
                dir,
                args,
                env: env.clone(),
            };
            if server.spawn() {
                return server;
            }
            args = std::mem::take(&mut server.args);
            dir = server.take_dir();
        }
        panic!("redis-server did not start on any of 5 free ports; see its log above");
    }

    fn take_dir(mut self) -> tempfile::TempDir {
        self.kill();
        std::mem::replace(
            &mut self.dir,
            tempfile::tempdir().expect("create a temporary directory"),
        )
    }

    /// Launches the process on `self.port` and waits until it answers; false if the port was
    /// taken.
    fn spawn(&mut self) -> bool {
        let mut args: Vec<std::ffi::OsString> = vec!["--port".into(), self.port.to_string().into()];
        args.extend(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"].map(Into::into));
        args.extend(self.args.iter().map(Into::into));
        match launch(self.dir.path(), &args, &self.env, || self.ping()) {
            // Under parallel tests the answer may have come from another test's server that took
            // the port first, while ours is about to exit with "Address already in use".
            Some(mut child) if !node::serves_unless_locked(self.port, child.id()) => {
                let _ = child.kill();
                let _ = child.wait();
                false
            }
            Some(child) => {
                self.child = Some(child);
                true
            }
            None => false,
        }
    }

    fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut connection) = client.get_connection_with_timeout(Duration::from_millis(200))
        else {
            return false;
        };
        // Any reply means the server is up; with `requirepass` it answers NOAUTH.
        match redis::cmd("PING").query::<String>(&mut connection) {
            Ok(_) => true,
            Err(err) => err.code().is_some(),
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:{port}/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A fresh synchronous connection for arranging and inspecting test state.
    pub fn admin(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
            .expect("admin connection to the test redis-server")
    }

    /// Kills the server with SIGKILL (no shutdown, no save) and waits for it to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port (empty, as persistence is off) and waits until it
    /// answers.
    pub fn restart(&mut self) {
        self.kill();
        assert!(
            self.spawn(),
            "redis-server could not bind its port {} again",
            self.port
        );
    }

    /// Sends a signal (e.g. `STOP`, `CONT`) to the server process.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().expect("the server is running");
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `redis-server` with `args` (plus `--dir` and `--logfile` in `dir`) and waits until
/// `ready()` says it answers. `None` when the port was taken (the caller retries on another);
/// any other failure panics with the server's output, as does a missing `redis-server`.
pub(crate) fn launch(
    dir: &Path,
    args: &[std::ffi::OsString],
    env: &[(String, String)],
    ready: impl Fn() -> bool,
) -> Option<Child> {
    let log = dir.join("redis.log");
    let child = Command::new("redis-server")
        .args(args)
        .envs(env.iter().map(|(name, value)| (name, value)))
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
            "redis-server is not installed (or not on PATH), and rediskit's tests need a \
             real one. Install it: `apt-get install redis-server` on Debian/Ubuntu, \
             `brew install redis` on macOS. `.ci/run` installs it automatically."
        ),
        Err(err) => panic!("cannot start redis-server: {err}"),
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                let _ = pipe.read_to_string(&mut stderr);
            }
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            if log.contains("Address already in use") {
                return None;
            }
            panic!("redis-server exited with {status}: {stderr}\n{log}");
        }
        if ready() {
            return Some(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "redis-server ({args:?}) did not answer within {READY_TIMEOUT:?}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind an ephemeral port")
}
