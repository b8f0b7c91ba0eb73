//! One `redis-server` process of a multi-process topology (a cluster node, a sentinel): its own
//! temporary directory, a port chosen by the caller, and arguments that may depend on that port
//! (a cluster bus port, a generated config file), rebuilt when a retry needs another port.
//! Killed on drop.
//!
//! [`RedisServer`](crate::RedisServer) fixes its arguments up front and picks its own port; the
//! topologies need both the first port chosen before launch (sentinels name each other in their
//! configs) and arguments rebuilt per attempt, hence this separate, crate-private type. It also
//! checks that the server answering on the port is its own process (`INFO server`), which
//! `RedisServer` cannot do for a server started with `requirepass`.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::Path;
use std::process::Child;
use std::time::Duration;

/// Connect, read and write timeout of the harnesses' own queries, so a dead or stopped node
/// cannot hang a poll.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause between two polls of a topology's state.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Log lines of each process shown when a harness panics.
pub(crate) const LOG_LINES: usize = 30;

/// Polls `check` every [`POLL_INTERVAL`] until it gives a value; after `timeout` panics with
/// `what` did not happen, the last reason `check` gave, and `logs()`.
pub(crate) fn poll<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
    logs: impl FnOnce() -> String,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let why = match check() {
            Ok(value) => return value,
            Err(why) => why,
        };
        if std::time::Instant::now() > deadline {
            panic!("{what} within {timeout:?}: {why}\n{}", logs());
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// A `redis-server` process in its own temporary directory. Killed (and the directory removed)
/// on drop.
pub(crate) struct Node {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Node {
    /// Starts `redis-server` with `args(port, dir)` (which must include the port) and waits until
    /// it answers `PING` on `port`. The first attempt uses `port`; when that port (or another one
    /// the arguments name) turns out to be taken, `args` is called again with a fresh port.
    pub(crate) fn start(
        prefix: &str,
        port: u16,
        mut args: impl FnMut(u16, &Path) -> Vec<OsString>,
    ) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .expect("create a temporary directory for redis-server");
        let mut port = port;
        // Another test may grab a port between our probe and redis-server's bind: retry.
        for _ in 0..5 {
            let args = args(port, dir.path());
            if let Some(mut child) = crate::launch(dir.path(), &args, &[], || answers(port)) {
                // `launch` only saw *something* answer on `port`. Under parallel tests that can
                // be another test's server that took the port first, while ours is about to exit
                // with "Address already in use": make sure the answer came from our process
                // (which a node that requires a password, like a locked sentinel, cannot show).
                if serves_unless_locked(port, child.id()) {
                    return Self {
                        child: Some(child),
                        port,
                        dir,
                    };
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            port = crate::free_port();
        }
        panic!(
            "redis-server did not start on any of 5 free ports:\n{}",
            log_tail("redis-server", dir.path(), 30)
        );
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL (no shutdown, no save), then waits for the process to exit.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` distinct ports that were free a moment ago. The listeners are held until all are bound,
/// so the kernel cannot hand out the same port twice.
pub(crate) fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    listeners
        .iter()
        .map(|listener| listener.local_addr().expect("a bound address").port())
        .collect()
}

/// Whether something on `port` answers `PING` (any reply, even an error, counts).
fn answers(port: u16) -> bool {
    let Ok(mut connection) = try_connect(port, Duration::from_millis(200)) else {
        return false;
    };
    match redis::cmd("PING").query::<String>(&mut connection) {
        Ok(_) => true,
        Err(err) => err.code().is_some(),
    }
}

/// Whether the process answering on `port` is the one with process id `pid` (`INFO server`,
/// which sentinels answer too). A server that refuses `INFO` with `NOAUTH` (it requires a
/// password) cannot be told apart and counts as ours (the port was free a moment before).
pub(crate) fn serves_unless_locked(port: u16, pid: u32) -> bool {
    let info: redis::RedisResult<String> = try_connect(port, Duration::from_secs(2))
        .and_then(|mut connection| redis::cmd("INFO").arg("server").query(&mut connection));
    match info {
        Ok(info) => info_field(&info, "process_id") == Some(pid.to_string().as_str()),
        Err(err) => err.code() == Some("NOAUTH"),
    }
}

/// A connection to `127.0.0.1:port` (database 0, so no `SELECT`, which sentinels refuse) whose
/// connect, reads and writes each give up after `timeout`: polling loops must not hang on a
/// stopped or dead node.
pub(crate) fn try_connect(port: u16, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    try_connect_with(port, timeout, None)
}

/// [`try_connect`], authenticating with `password` when there is one.
pub(crate) fn try_connect_with(
    port: u16,
    timeout: Duration,
    password: Option<&str>,
) -> redis::RedisResult<redis::Connection> {
    let auth = password.map_or_else(String::new, |password| format!(":{password}@"));
    let connection = redis::Client::open(format!("redis://{auth}127.0.0.1:{port}"))?
        .get_connection_with_timeout(timeout)?;
    connection.set_read_timeout(Some(timeout))?;
    connection.set_write_timeout(Some(timeout))?;
    Ok(connection)
}

/// The `key:value` fields of an `INFO`-style reply (`CLUSTER INFO`, `INFO replication`).
pub(crate) fn info_field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|line| {
        line.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The last `lines` lines of the log `launch` writes in `dir`, headed by `title`, for panics.
pub(crate) fn log_tail(title: &str, dir: &Path, lines: usize) -> String {
    let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    let tail = all[all.len().saturating_sub(lines)..].join("\n");
    format!("--- {title} ({}) ---\n{tail}\n", dir.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node whose chosen port is taken starts on another one, with arguments rebuilt for it.
    #[test]
    fn a_taken_port_is_replaced() {
        let squatter = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let taken = squatter.local_addr().expect("a bound address").port();
        let mut attempts = Vec::new();

        let node = Node::start("rediskit-test-node-", taken, |port, _| {
            attempts.push(port);
            [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ]
            .into_iter()
            .map(OsString::from)
            .collect()
        });

        assert_ne!(node.port(), taken);
        assert_eq!(attempts, [taken, node.port()]);
        assert!(answers(node.port()));
    }

    /// A node whose chosen port another server already answers on (as under parallel tests)
    /// starts on another port instead of passing that server off as itself.
    #[test]
    fn a_port_served_by_another_server_is_replaced() {
        let other = crate::RedisServer::start();

        let node = Node::start("rediskit-test-node-", other.port(), |port, _| {
            [
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ]
            .into_iter()
            .map(OsString::from)
            .collect()
        });

        assert_ne!(node.port(), other.port());
        let pid = node.child.as_ref().map(Child::id).expect("a running node");
        assert!(serves_unless_locked(node.port(), pid));
    }
}
