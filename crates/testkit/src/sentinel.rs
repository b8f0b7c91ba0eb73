//! Redis Sentinel for tests: a primary, its replica and three sentinels watching them, each a
//! real `redis-server` on an ephemeral port in its own temporary directory.
//!
//! ```no_run
//! use std::time::Duration;
//! use rediskit_testkit::sentinel::SentinelSetup;
//!
//! let mut setup = SentinelSetup::start();
//! // Point the client under test at `setup.sentinel_addrs()` and `setup.master_name()`, then:
//! setup.kill_primary();
//! let new = setup.wait_for_failover(Duration::from_secs(30));
//! assert_eq!(new, setup.replica_port());
//! ```
//!
//! # Behavior
//!
//! - The sentinels monitor the primary as [`MASTER_NAME`] with quorum 2,
//!   `down-after-milliseconds` 1000 and `failover-timeout` 5000, so a killed primary is replaced
//!   within a few seconds.
//! - Each sentinel's config file, which it rewrites as its state changes, lives in its own
//!   directory. The files name the replica and the other sentinels up front (with run ids the
//!   harness picks), which spares the two seconds sentinels otherwise need to find each other
//!   through hello messages.
//! - The sentinels ping every 100 ms rather than every second (`SENTINEL DEBUG ping-period`):
//!   a sentinel reconnects to an unreachable peer only once per ping period, and the first to
//!   start finds its peers not listening yet.
//! - [`SentinelSetup::start`] returns once the replica is in sync and every sentinel knows the
//!   master, the replica and both other sentinels, all reachable: a failover can be agreed.
//! - Dropping the setup kills every process and removes their directories.

use std::collections::HashMap;
use std::ffi::OsString;
use std::time::Duration;

use crate::node::{self, LOG_LINES, Node, QUERY_TIMEOUT};
use crate::tls::Certificates;

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "rediskit-test";

/// Sentinels in the setup.
const SENTINELS: usize = 3;
/// Sentinels that must agree the primary is down before a failover.
const QUORUM: usize = 2;
/// How often a sentinel pings (and reconnects to) the others and the servers; Redis's default
/// is 1000.
const PING_PERIOD_MS: u64 = 100;
/// How long the setup gets to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A primary, one replica and three sentinels on ephemeral ports. Everything is killed (and its
/// directory removed) on drop. See the [module docs](self) for its behavior.
pub struct SentinelSetup {
    sentinels: Vec<Node>,
    primary: Node,
    replica: Node,
    /// The sentinels' `requirepass`, if they have one.
    sentinel_password: Option<String>,
    /// With [`SentinelSetup::start_with_tls`]: the certificates, and each sentinel's TLS port.
    tls: Option<(Certificates, Vec<u16>)>,
}

impl SentinelSetup {
    /// Starts the primary, the replica and the sentinels and waits until a failover could be
    /// agreed (see the [module docs](self)). Panics, with the processes' logs, if that takes
    /// longer than 30 seconds.
    pub fn start() -> Self {
        Self::launch(None, false)
    }

    /// [`SentinelSetup::start`] with sentinels that require `password` (`requirepass`; they
    /// authenticate to each other with `sentinel sentinel-pass`). The primary and the replica
    /// require none.
    pub fn start_with_sentinel_password(password: &str) -> Self {
        Self::launch(Some(password.to_owned()), false)
    }

    /// [`SentinelSetup::start`] with sentinels that also listen for TLS clients, on the ports of
    /// [`SentinelSetup::tls_sentinel_addrs`], with a certificate signed by
    /// [`SentinelSetup::ca_file`] (clients need not present one). They still talk to each other,
    /// to the servers and to this harness in plaintext; the primary and the replica have no TLS.
    pub fn start_with_tls() -> Self {
        Self::launch(None, true)
    }

    fn launch(sentinel_password: Option<String>, tls: bool) -> Self {
        let primary = start_server();
        let replica = start_server();
        // `REPLICAOF` connects at once; `--replicaof` waits for the once-a-second replication
        // cron, which would cost up to a second.
        let replicaof: Result<(), String> = query(
            replica.port(),
            redis::cmd("REPLICAOF").arg("127.0.0.1").arg(primary.port()),
        );
        replicaof.unwrap_or_else(|err| panic!("REPLICAOF on the replica: {err}"));
        let mut setup = Self {
            sentinels: Vec::new(),
            primary,
            replica,
            sentinel_password,
            tls: tls.then(|| (Certificates::generate(), Vec::new())),
        };
        // Sentinels promote only a replica in sync, and read its state from both servers' INFO:
        // let them find it so from their first look.
        setup.wait_until("the replica to sync", || setup.replication_gap());
        let ports = node::free_ports(SENTINELS);
        let ids: Vec<String> = (0..SENTINELS).map(|_| run_id()).collect();
        for index in 0..SENTINELS {
            let (sentinel, tls_port) = setup.start_sentinel(index, &ports, &ids);
            setup.sentinels.push(sentinel);
            if let (Some((_, tls_ports)), Some(port)) = (&mut setup.tls, tls_port) {
                tls_ports.push(port);
            }
        }
        setup.wait_until("the sentinels to agree", || setup.sentinel_gap());
        setup
    }

    /// Starts sentinel `index` on `ports[index]` (another port if that one is taken), naming the
    /// other sentinels by `ports` and `ids`. Should a retry move a sentinel, the others still
    /// name its old port until its first hello message corrects them: slower, not wrong.
    /// Returns the sentinel and, with TLS, the port it takes TLS clients on.
    fn start_sentinel(&self, index: usize, ports: &[u16], ids: &[String]) -> (Node, Option<u16>) {
        let (primary, replica) = (self.primary.port(), self.replica.port());
        let mut tls_port = None;
        let sentinel = Node::start("rediskit-test-sentinel-", ports[index], |port, dir| {
            let mut config = format!(
                "bind 127.0.0.1\n\
                 sentinel myid {id}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {primary} {QUORUM}\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 5000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n\
                 sentinel known-replica {MASTER_NAME} 127.0.0.1 {replica}\n",
                id = ids[index],
            );
            if let Some(password) = &self.sentinel_password {
                config.push_str(&format!(
                    "requirepass {password}\nsentinel sentinel-pass {password}\n"
                ));
            }
            if let Some((certs, _)) = &self.tls {
                // A fresh port per attempt, like the plaintext one.
                let port = crate::free_port();
                tls_port = Some(port);
                config.push_str(&format!(
                    "tls-port {port}\ntls-cert-file {}\ntls-key-file {}\n\
                     tls-ca-cert-file {}\ntls-auth-clients no\n",
                    certs.server_cert_file().display(),
                    certs.server_key_file().display(),
                    certs.ca_file().display(),
                ));
            }
            for other in (0..SENTINELS).filter(|&other| other != index) {
                config.push_str(&format!(
                    "sentinel known-sentinel {MASTER_NAME} 127.0.0.1 {} {}\n",
                    ports[other], ids[other]
                ));
            }
            // Written afresh per attempt: a sentinel rewrites its file, and it must be writable.
            // `launch` adds `--dir` and `--logfile`, so the file needs neither.
            let path = dir.join("sentinel.conf");
            std::fs::write(&path, config).expect("write sentinel.conf");
            // redis-server takes a config file only as its first argument.
            vec![
                path.into(),
                "--sentinel".into(),
                "--port".into(),
                OsString::from(port.to_string()),
            ]
        });
        // A sentinel reconnects to an unreachable peer once per ping period, a second by default,
        // and whichever starts first finds its peers not listening yet.
        let port = sentinel.port();
        let debug: Result<(), String> = self.ask_sentinel(
            port,
            redis::cmd("SENTINEL")
                .arg("DEBUG")
                .arg("PING-PERIOD")
                .arg(PING_PERIOD_MS),
        );
        debug.unwrap_or_else(|err| panic!("SENTINEL DEBUG on sentinel {port}: {err}"));
        (sentinel, tls_port)
    }

    /// The name the sentinels monitor the primary under ([`MASTER_NAME`]).
    pub fn master_name(&self) -> &str {
        MASTER_NAME
    }

    /// `"127.0.0.1:port"` of each sentinel.
    pub fn sentinel_addrs(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|sentinel| format!("127.0.0.1:{}", sentinel.port()))
            .collect()
    }

    /// `"127.0.0.1:port"` of each sentinel's TLS listener ([`SentinelSetup::start_with_tls`];
    /// empty otherwise).
    pub fn tls_sentinel_addrs(&self) -> Vec<String> {
        self.tls
            .iter()
            .flat_map(|(_, ports)| ports)
            .map(|port| format!("127.0.0.1:{port}"))
            .collect()
    }

    /// The CA that signed the sentinels' TLS certificate ([`SentinelSetup::start_with_tls`]).
    /// Panics for a setup without TLS.
    pub fn ca_file(&self) -> std::path::PathBuf {
        let (certs, _) = self
            .tls
            .as_ref()
            .expect("a setup started with start_with_tls");
        certs.ca_file()
    }

    /// The port of the original primary (killed by [`SentinelSetup::kill_primary`]).
    pub fn primary_port(&self) -> u16 {
        self.primary.port()
    }

    /// The port of the original replica (the primary after a failover).
    pub fn replica_port(&self) -> u16 {
        self.replica.port()
    }

    /// The master's address as the first sentinel reports it (`SENTINEL
    /// get-master-addr-by-name`).
    pub fn current_master(&self) -> (String, u16) {
        let port = self.sentinels[0].port();
        self.master_addr(port)
            .unwrap_or_else(|err| panic!("sentinel {port}: {err}"))
    }

    /// Kills the original primary with SIGKILL (no shutdown, no save).
    pub fn kill_primary(&mut self) {
        self.primary.kill();
    }

    /// Asks the sentinels for a failover without anything failing (`SENTINEL FAILOVER`): the
    /// replica is promoted and the original primary turned into its replica, its clients'
    /// connections left open. Wait for it with [`SentinelSetup::wait_for_failover`].
    pub fn failover(&self) {
        let port = self.sentinels[0].port();
        let reply: Result<(), String> = self.ask_sentinel(
            port,
            redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER_NAME),
        );
        if let Err(err) = reply {
            panic!(
                "sentinel {port} refused the failover: {err}\n{}",
                self.logs()
            );
        }
    }

    /// Waits until every sentinel reports a master other than the original primary, the same
    /// one, and that server says `role:master`; returns its port. Panics, with the processes'
    /// logs, after `timeout`.
    pub fn wait_for_failover(&self, timeout: Duration) -> u16 {
        let old = self.primary.port();
        node::poll(
            timeout,
            &format!("the sentinels did not fail over from {old}"),
            || self.successor(old),
            || self.logs(),
        )
    }

    /// The master every sentinel agrees replaced `old`, or what is not settled yet.
    fn successor(&self, old: u16) -> Result<u16, String> {
        let mut agreed: Option<u16> = None;
        for sentinel in &self.sentinels {
            let (_, port) = self.master_addr(sentinel.port())?;
            if port == old || agreed.is_some_and(|a| a != port) {
                return Err(format!(
                    "sentinel {} reports master {port}",
                    sentinel.port()
                ));
            }
            agreed = Some(port);
        }
        let new = agreed.ok_or("no sentinels")?;
        let replication = info(new, "replication")?;
        match node::info_field(&replication, "role") {
            Some("master") => Ok(new),
            role => Err(format!("the sentinels' master {new} reports role {role:?}")),
        }
    }

    /// A fresh synchronous connection to `port`: the primary, the replica or a sentinel (with the
    /// sentinels' password, if they have one).
    pub fn admin(&self, port: u16) -> redis::Connection {
        self.try_admin(port)
            .unwrap_or_else(|err| panic!("admin connection to {port}: {err}"))
    }

    /// [`admin`](Self::admin), answering a failed connection as an error: a node resyncing
    /// after a failover (loading its new primary's data) may refuse one for a moment.
    pub fn try_admin(&self, port: u16) -> redis::RedisResult<redis::Connection> {
        let mut known = [self.primary.port(), self.replica.port()]
            .into_iter()
            .chain(self.sentinels.iter().map(Node::port));
        assert!(
            known.any(|p| p == port),
            "port {port} is not part of this sentinel setup"
        );
        let sentinel = self.sentinels.iter().any(|node| node.port() == port);
        let password = self.sentinel_password.as_deref().filter(|_| sentinel);
        let connection = node::try_connect_with(port, Duration::from_secs(2), password)?;
        // Admin commands may wait (a failover, a replica's sync): no read deadline.
        connection.set_read_timeout(None)?;
        Ok(connection)
    }

    /// Polls `gap` (what is missing, or `None` once ready) until it is `None`; panics with the
    /// last gap and the logs after [`READY_TIMEOUT`].
    fn wait_until(&self, what: &str, gap: impl Fn() -> Option<String>) {
        node::poll(
            READY_TIMEOUT,
            &format!("timed out waiting for {what}"),
            || gap().map_or(Ok(()), Err),
            || self.logs(),
        )
    }

    /// Why the replica is not in sync yet, as both sides see it.
    fn replication_gap(&self) -> Option<String> {
        let check = || -> Result<(), String> {
            let replica = info(self.replica.port(), "replication")?;
            let link = node::info_field(&replica, "master_link_status");
            if link != Some("up") {
                return Err(format!("replica link is {link:?}"));
            }
            let primary = info(self.primary.port(), "replication")?;
            let entry = node::info_field(&primary, "slave0").unwrap_or_default();
            if !entry.contains(&format!("port={},", self.replica.port()))
                || !entry.contains("state=online")
            {
                return Err(format!("primary lists replica as {entry:?}"));
            }
            Ok(())
        };
        check().err()
    }

    /// What some sentinel does not know yet, or `None` once all of them could agree a failover.
    fn sentinel_gap(&self) -> Option<String> {
        let (primary, replica) = (self.primary.port(), self.replica.port());
        for sentinel in &self.sentinels {
            let port = sentinel.port();
            let check = || -> Result<(), String> {
                let master = self.master_addr(port)?;
                if master != ("127.0.0.1".to_owned(), primary) {
                    return Err(format!("master is {master:?}"));
                }
                let state: HashMap<String, String> =
                    self.ask_sentinel(port, redis::cmd("SENTINEL").arg("MASTER").arg(MASTER_NAME))?;
                for (field, expected) in [
                    ("flags", "master".to_owned()),
                    ("num-slaves", "1".to_owned()),
                    ("num-other-sentinels", (SENTINELS - 1).to_string()),
                ] {
                    let actual = state.get(field);
                    if actual != Some(&expected) {
                        return Err(format!("{field} is {actual:?}"));
                    }
                }
                let replicas: Vec<HashMap<String, String>> = self.ask_sentinel(
                    port,
                    redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER_NAME),
                )?;
                let known = replicas.iter().any(|entry| {
                    entry.get("port") == Some(&replica.to_string())
                        && entry.get("flags").map(String::as_str) == Some("slave")
                        && entry.get("master-link-status").map(String::as_str) == Some("ok")
                });
                if !known {
                    return Err(format!("replicas are {replicas:?}"));
                }
                let peers: Vec<HashMap<String, String>> = self.ask_sentinel(
                    port,
                    redis::cmd("SENTINEL").arg("SENTINELS").arg(MASTER_NAME),
                )?;
                for other in self.sentinels.iter().filter(|other| other.port() != port) {
                    let reachable = peers.iter().any(|entry| {
                        entry.get("port") == Some(&other.port().to_string())
                            && entry.get("flags").map(String::as_str) == Some("sentinel")
                    });
                    if !reachable {
                        return Err(format!("sentinels are {peers:?}"));
                    }
                }
                Ok(())
            };
            if let Err(why) = check() {
                return Some(format!("sentinel {port}: {why}"));
            }
        }
        None
    }

    /// `SENTINEL get-master-addr-by-name` on the sentinel on `port`.
    fn master_addr(&self, port: u16) -> Result<(String, u16), String> {
        self.ask_sentinel(
            port,
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME),
        )
    }

    /// `command` on the sentinel on `port`, with the sentinels' password if they have one.
    fn ask_sentinel<T: redis::FromRedisValue>(
        &self,
        port: u16,
        command: &redis::Cmd,
    ) -> Result<T, String> {
        node::try_connect_with(port, QUERY_TIMEOUT, self.sentinel_password.as_deref())
            .and_then(|mut connection| command.query(&mut connection))
            .map_err(|err| format!("sentinel {port}: {err}"))
    }

    /// The tail of every process's log, for panics.
    fn logs(&self) -> String {
        let mut logs = node::log_tail(
            &format!("primary {}", self.primary.port()),
            self.primary.dir(),
            LOG_LINES,
        );
        logs += &node::log_tail(
            &format!("replica {}", self.replica.port()),
            self.replica.dir(),
            LOG_LINES,
        );
        for sentinel in &self.sentinels {
            logs += &node::log_tail(
                &format!("sentinel {}", sentinel.port()),
                sentinel.dir(),
                LOG_LINES,
            );
        }
        logs
    }
}

/// Starts a data node with persistence off.
fn start_server() -> Node {
    Node::start("rediskit-test-", crate::free_port(), |port, _| {
        [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            // A primary otherwise waits 5 s for more replicas before the first (diskless) sync;
            // the replica needs it as well, for it becomes the primary after a failover.
            "--repl-diskless-sync-delay",
            "0",
        ]
        .into_iter()
        .map(OsString::from)
        .collect()
    })
}

/// A fresh 40-hex-digit run id for a sentinel's `myid`.
fn run_id() -> String {
    use std::hash::{BuildHasher, RandomState};
    // Each `RandomState` has its own keys, so ids differ between sentinels and setups.
    let state = RandomState::new();
    let mut id: String = (0..3u8)
        .map(|part| format!("{:016x}", state.hash_one(part)))
        .collect();
    id.truncate(40);
    id
}

fn info(port: u16, section: &str) -> Result<String, String> {
    query(port, redis::cmd("INFO").arg(section))
}

fn query<T: redis::FromRedisValue>(port: u16, command: &redis::Cmd) -> Result<T, String> {
    node::try_connect(port, QUERY_TIMEOUT)
        .and_then(|mut connection| command.query(&mut connection))
        .map_err(|err| format!("port {port}: {err}"))
}
