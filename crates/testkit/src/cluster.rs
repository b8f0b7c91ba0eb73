//! A Redis Cluster for tests: three primaries and three replicas, each a real `redis-server` on
//! ephemeral ports in its own temporary directory, joined by `redis-cli --cluster create`.
//!
//! ```no_run
//! use std::time::Duration;
//! use rediskit_testkit::cluster::RedisCluster;
//!
//! let mut cluster = RedisCluster::start();
//! // Point the client under test at `cluster.seeds()`, write "user:1", then:
//! let old = cluster.primary_for_key("user:1");
//! cluster.kill(old);
//! let new = cluster.wait_for_failover(old, Duration::from_secs(30));
//! assert_eq!(cluster.primary_for_key("user:1"), new);
//! ```
//!
//! # Behavior
//!
//! - Every node runs with persistence off, bound to `127.0.0.1`, with an explicit free
//!   `--cluster-port`: the default bus port (port + 10000) can exceed 65535 or be someone else's
//!   for ephemeral ports.
//! - `cluster-node-timeout` is short ([`DEFAULT_NODE_TIMEOUT_MS`]) so that a killed primary is
//!   detected, and its replica promoted, within a few seconds.
//! - [`RedisCluster::start`] returns once every node agrees on the topology: `cluster_state:ok`,
//!   all 16384 slots covered, three primaries each with a replica whose link is up. Only then can
//!   a failover be voted.
//! - Roles are read live: after a failover [`RedisCluster::primaries`] lists the promoted replica.
//! - Dropping the cluster kills every node and removes their directories.

use std::collections::HashMap;
use std::ffi::OsString;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::node::{self, LOG_LINES, Node, POLL_INTERVAL, QUERY_TIMEOUT};

/// The `cluster-node-timeout` of [`RedisCluster::start`], in milliseconds: how long a node may
/// stay silent before the others suspect it, and so roughly how soon a failover begins.
pub const DEFAULT_NODE_TIMEOUT_MS: u64 = 1000;

/// Nodes in the cluster: [`PRIMARIES`] primaries, each with one replica.
const NODES: usize = 6;
/// Primaries (shards) in the cluster.
const PRIMARIES: usize = 3;
/// Hash slots a cluster has.
const SLOTS: usize = 16384;
/// How long `redis-cli --cluster create` may take (it sleeps a second by design).
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the nodes get to agree on the topology once created.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// Three primaries and three replicas forming a Redis Cluster on ephemeral ports. Every node is
/// killed (and its directory removed) on drop. See the [module docs](self) for its behavior.
pub struct RedisCluster {
    nodes: Vec<Node>,
    /// The slot ranges each node killed by [`RedisCluster::kill`] served at that moment: what
    /// [`RedisCluster::wait_for_failover`] waits to see taken over.
    orphaned: HashMap<u16, Vec<(u16, u16)>>,
}

impl RedisCluster {
    /// Starts a cluster with `cluster-node-timeout` [`DEFAULT_NODE_TIMEOUT_MS`] and waits until
    /// it is formed (see the [module docs](self)). Panics, with the nodes' logs, if it does not
    /// form within 30 seconds.
    pub fn start() -> Self {
        Self::start_with(DEFAULT_NODE_TIMEOUT_MS)
    }

    /// Starts a cluster with `cluster-node-timeout` `node_timeout_ms` and waits until it is
    /// formed. A longer timeout spares a heavily loaded machine spurious failovers, at the cost
    /// of slower deliberate ones.
    pub fn start_with(node_timeout_ms: u64) -> Self {
        let nodes = (0..NODES).map(|_| start_node(node_timeout_ms)).collect();
        let cluster = Self {
            nodes,
            orphaned: HashMap::new(),
        };
        cluster.create();
        cluster.wait_until_formed();
        cluster
    }

    /// `"127.0.0.1:port"` of every node, killed ones included, as a client's configuration would
    /// list its seeds.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port()))
            .collect()
    }

    /// Ports of the running nodes that are primaries now (by their own `INFO replication`), in
    /// start order. After a failover this includes the promoted replica.
    pub fn primaries(&self) -> Vec<u16> {
        self.running_with_role("master")
    }

    /// Ports of the running nodes that are replicas now (by their own `INFO replication`), in
    /// start order.
    pub fn replicas(&self) -> Vec<u16> {
        self.running_with_role("slave")
    }

    fn running_with_role(&self, role: &str) -> Vec<u16> {
        self.running()
            .filter(|&port| {
                let info = info(port, "replication")
                    .unwrap_or_else(|err| panic!("cluster node {port} did not answer: {err}"));
                node::info_field(&info, "role") == Some(role)
            })
            .collect()
    }

    /// A fresh synchronous connection to the node on `port` (not cluster-aware: commands on keys
    /// of other nodes' slots get `MOVED`), for arranging and inspecting test state.
    pub fn admin(&self, port: u16) -> redis::Connection {
        // A port outside the cluster is a test bug; say so rather than connect to a stranger.
        self.node(port);
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
            .unwrap_or_else(|err| panic!("admin connection to cluster node {port}: {err}"))
    }

    /// The port of the primary that serves `key`'s slot, as the first running node sees the
    /// cluster (`CLUSTER KEYSLOT`, then the slot ranges in its `CLUSTER NODES`). Panics if no
    /// node serves that slot.
    pub fn primary_for_key(&self, key: &str) -> u16 {
        let port = self.running().next().expect("a running cluster node");
        let slot: u16 = node::try_connect(port, QUERY_TIMEOUT)
            .and_then(|mut connection| {
                redis::cmd("CLUSTER")
                    .arg("KEYSLOT")
                    .arg(key)
                    .query(&mut connection)
            })
            .unwrap_or_else(|err| panic!("CLUSTER KEYSLOT on node {port}: {err}"));
        let view =
            cluster_nodes(port).unwrap_or_else(|err| panic!("CLUSTER NODES on node {port}: {err}"));
        owner(&view, slot).unwrap_or_else(|| {
            panic!(
                "node {port} sees no primary serving slot {slot} (of key {key:?})\n{}",
                self.logs()
            )
        })
    }

    /// Kills the node on `port` with SIGKILL (no shutdown, no save), remembering which slots it
    /// served for [`RedisCluster::wait_for_failover`]. Killing a node twice does nothing.
    pub fn kill(&mut self, port: u16) {
        let index = self.node(port);
        if !self.nodes[index].is_running() {
            return;
        }
        let view = cluster_nodes(port)
            .unwrap_or_else(|err| panic!("CLUSTER NODES on node {port} before killing it: {err}"));
        let slots = view
            .into_iter()
            .find(|entry| entry.flags.iter().any(|flag| flag == "myself"))
            .map(|entry| entry.slots)
            .unwrap_or_default();
        self.orphaned.insert(port, slots);
        self.nodes[index].kill();
    }

    /// Waits until a replica has taken over all the slots the primary on `old_primary_port`
    /// served when [`RedisCluster::kill`] killed it: every surviving node maps those slots to the
    /// same new primary, reports `cluster_state:ok`, and the new primary says `role:master`.
    /// Returns the new primary's port. Panics, with the nodes' logs, after `timeout`, or if
    /// `old_primary_port` was not killed with [`RedisCluster::kill`] or served no slots.
    pub fn wait_for_failover(&self, old_primary_port: u16, timeout: Duration) -> u16 {
        let old = old_primary_port;
        let orphaned = self.orphaned.get(&old).unwrap_or_else(|| {
            panic!("node {old} was not killed with RedisCluster::kill: no failover to wait for")
        });
        assert!(
            !orphaned.is_empty(),
            "node {old} served no slots when it was killed (a replica?): no failover to wait for"
        );
        node::poll(
            timeout,
            &format!("no replica took over the slots of the killed primary {old}"),
            || self.successor(old, orphaned),
            || self.logs(),
        )
    }

    /// The port every survivor agrees now serves `orphaned`, or what is not settled yet.
    fn successor(&self, old: u16, orphaned: &[(u16, u16)]) -> Result<u16, String> {
        let mut agreed: Option<u16> = None;
        for port in self.running() {
            let state = cluster_info(port)?;
            let state = node::info_field(&state, "cluster_state");
            if state != Some("ok") {
                return Err(format!("node {port} reports cluster_state {state:?}"));
            }
            let view = cluster_nodes(port).map_err(|err| format!("node {port}: {err}"))?;
            for slot in orphaned.iter().flat_map(|&(start, end)| [start, end]) {
                let owner = owner(&view, slot);
                match owner {
                    Some(owner) if owner != old && agreed.is_none_or(|a| a == owner) => {
                        agreed = Some(owner);
                    }
                    _ => return Err(format!("node {port} maps slot {slot} to {owner:?}")),
                }
            }
        }
        let new = agreed.ok_or("no node is running")?;
        if !self.nodes.iter().any(|n| n.port() == new && n.is_running()) {
            return Err(format!(
                "the nodes map the slots to {new}, not a running node"
            ));
        }
        let info = info(new, "replication").map_err(|err| format!("node {new}: {err}"))?;
        match node::info_field(&info, "role") {
            Some("master") => Ok(new),
            role => Err(format!(
                "node {new} serves the slots but reports role {role:?}"
            )),
        }
    }

    /// `FLUSHALL` on every running primary (replicas follow asynchronously).
    pub fn flushall(&self) {
        for port in self.primaries() {
            let mut connection = self.admin(port);
            redis::cmd("FLUSHALL")
                .query::<()>(&mut connection)
                .unwrap_or_else(|err| panic!("FLUSHALL on node {port}: {err}"));
        }
    }

    /// Reshards: moves the slot of `key` (and every key in it) from the primary serving it to
    /// the primary on `to`, the way `redis-cli --cluster reshard` does (`SETSLOT IMPORTING` /
    /// `MIGRATING`, `MIGRATE` of the slot's keys, then `SETSLOT NODE` on every primary).
    /// Panics if a step fails or `to` already serves the slot.
    pub fn move_slot_of(&self, key: &str, to: u16) {
        let from = self.primary_for_key(key);
        assert_ne!(from, to, "node {to} already serves the slot of {key:?}");
        let ask = |port: u16, cmd: &mut redis::Cmd| -> redis::Value {
            cmd.query(&mut self.admin(port))
                .unwrap_or_else(|err| panic!("resharding, on node {port}: {err}"))
        };
        let id = |port: u16| -> String {
            redis::cmd("CLUSTER")
                .arg("MYID")
                .query(&mut self.admin(port))
                .unwrap_or_else(|err| panic!("CLUSTER MYID on node {port}: {err}"))
        };
        let (from_id, to_id) = (id(from), id(to));
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut self.admin(from))
            .unwrap_or_else(|err| panic!("CLUSTER KEYSLOT on node {from}: {err}"));
        let setslot = |state: &str, node: &str| {
            let mut cmd = redis::cmd("CLUSTER");
            cmd.arg("SETSLOT").arg(slot).arg(state).arg(node);
            cmd
        };
        ask(to, &mut setslot("IMPORTING", &from_id));
        ask(from, &mut setslot("MIGRATING", &to_id));
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query(&mut self.admin(from))
                .unwrap_or_else(|err| panic!("CLUSTER GETKEYSINSLOT on node {from}: {err}"));
            if keys.is_empty() {
                break;
            }
            ask(
                from,
                redis::cmd("MIGRATE")
                    .arg("127.0.0.1")
                    .arg(to)
                    .arg("")
                    .arg(0)
                    .arg(5000)
                    .arg("KEYS")
                    .arg(&keys),
            );
        }
        // The new owner first, then the old one, then the other primaries (as redis-cli does;
        // replicas refuse SETSLOT and learn it by gossip).
        let others: Vec<u16> = self
            .primaries()
            .into_iter()
            .filter(|&p| p != to && p != from)
            .collect();
        for port in [to, from].into_iter().chain(others) {
            ask(port, &mut setslot("NODE", &to_id));
        }
    }

    /// The number of keys across the running primaries (`DBSIZE` of each, summed).
    pub fn dbsize_total(&self) -> u64 {
        self.primaries()
            .into_iter()
            .map(|port| {
                redis::cmd("DBSIZE")
                    .query::<u64>(&mut self.admin(port))
                    .unwrap_or_else(|err| panic!("DBSIZE on node {port}: {err}"))
            })
            .sum()
    }

    /// Makes the node on `port` announce `announced` as its port (`cluster-announce-port`), a
    /// [`FaultProxy`](crate::proxy::FaultProxy) in front of it, say, and waits until every
    /// running node's view names it there: clients that learn the topology from then on reach
    /// the node through `announced`, and so does its replica, which reconnects there. What the
    /// cluster reports by slot ([`RedisCluster::primary_for_key`]) names `announced` too.
    /// Panics if the views do not agree within 30 seconds.
    pub fn announce_port(&self, port: u16, announced: u16) {
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("cluster-announce-port")
            .arg(announced)
            .exec(&mut self.admin(port))
            .unwrap_or_else(|err| panic!("CONFIG SET cluster-announce-port on {port}: {err}"));
        node::poll(
            FORM_TIMEOUT,
            "the cluster did not learn the announced port",
            || {
                for viewer in self.running() {
                    let view = cluster_nodes(viewer)?;
                    if !view.iter().any(|entry| entry.port == announced) {
                        return Err(format!("node {viewer} does not know port {announced} yet"));
                    }
                }
                Ok(())
            },
            || self.logs(),
        )
    }

    /// The index of the node on `port`; panics if there is none.
    fn node(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|node| node.port() == port)
            .unwrap_or_else(|| {
                panic!(
                    "port {port} is not a node of this cluster ({:?})",
                    self.seeds()
                )
            })
    }

    /// Ports of the nodes not killed, in start order.
    fn running(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes
            .iter()
            .filter(|node| node.is_running())
            .map(Node::port)
    }

    /// Runs `redis-cli --cluster create` over all nodes, one replica per primary.
    fn create(&self) {
        let log_path = self.nodes[0].dir().join("cluster-create.log");
        let log = std::fs::File::create(&log_path).expect("create the redis-cli log file");
        let child = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(self.seeds())
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the redis-cli log file"))
            .stderr(log)
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-cli is not installed (or not on PATH); the cluster test harness uses it. \
                 It comes with redis-server (`apt-get install redis-tools` on Debian/Ubuntu)."
            ),
            Err(err) => panic!("cannot run redis-cli: {err}"),
        };
        let deadline = Instant::now() + CREATE_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait for redis-cli") {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(POLL_INTERVAL);
        };
        if status.is_some_and(|status| status.success()) {
            return;
        }
        let output = std::fs::read_to_string(&log_path).unwrap_or_default();
        match status {
            Some(status) => panic!(
                "redis-cli --cluster create failed with {status}:\n{output}\n{}",
                self.logs()
            ),
            None => panic!(
                "redis-cli --cluster create did not finish within {CREATE_TIMEOUT:?}:\n\
                 {output}\n{}",
                self.logs()
            ),
        }
    }

    /// Waits until every node agrees the cluster is whole; panics after [`FORM_TIMEOUT`].
    fn wait_until_formed(&self) {
        node::poll(
            FORM_TIMEOUT,
            "the cluster did not form",
            || self.formation_gap().map_or(Ok(()), Err),
            || self.logs(),
        )
    }

    /// What keeps the cluster from being formed, as seen by some node, or `None` once every node
    /// reports it whole. Voting a failover needs every primary to know every replica as such,
    /// so `cluster_state:ok` on its own is not enough.
    fn formation_gap(&self) -> Option<String> {
        for port in self.running() {
            let check = || -> Result<(), String> {
                let state = cluster_info(port)?;
                for (field, expected) in [
                    ("cluster_state", "ok".to_owned()),
                    ("cluster_slots_ok", SLOTS.to_string()),
                    ("cluster_known_nodes", NODES.to_string()),
                ] {
                    let actual = node::info_field(&state, field);
                    if actual != Some(expected.as_str()) {
                        return Err(format!("{field} is {actual:?}"));
                    }
                }
                let view = cluster_nodes(port)?;
                let primaries = view.iter().filter(|entry| !entry.slots.is_empty()).count();
                let replicas = view.iter().filter(|entry| entry.is("slave")).count();
                if primaries != PRIMARIES || replicas != NODES - PRIMARIES {
                    return Err(format!(
                        "{primaries} primaries with slots and {replicas} replicas"
                    ));
                }
                if let Some(entry) = view.iter().find(|entry| !entry.healthy()) {
                    return Err(format!("node {} is {:?}", entry.port, entry.flags));
                }
                let replication = info(port, "replication").map_err(|err| err.to_string())?;
                if node::info_field(&replication, "role") == Some("slave") {
                    let link = node::info_field(&replication, "master_link_status");
                    if link != Some("up") {
                        return Err(format!("replica link is {link:?}"));
                    }
                }
                Ok(())
            };
            if let Err(why) = check() {
                return Some(format!("node {port}: {why}"));
            }
        }
        None
    }

    /// The tail of every node's log, for panics.
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|node| {
                let state = if node.is_running() { "" } else { ", killed" };
                node::log_tail(
                    &format!("cluster node {}{state}", node.port()),
                    node.dir(),
                    LOG_LINES,
                )
            })
            .collect()
    }
}

/// Starts one empty cluster-enabled node on free ports.
fn start_node(node_timeout_ms: u64) -> Node {
    let ports = node::free_ports(2);
    let mut bus_port = Some(ports[1]);
    Node::start("rediskit-test-cluster-", ports[0], |port, dir| {
        // A failed attempt may have written an identity for other ports; start blank.
        let _ = std::fs::remove_file(dir.join("nodes.conf"));
        let bus = bus_port
            .take()
            .filter(|&bus| bus != port)
            .unwrap_or_else(|| {
                let fresh = node::free_ports(2);
                fresh
                    .into_iter()
                    .find(|&p| p != port)
                    .expect("two distinct ports")
            });
        [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &node_timeout_ms.to_string(),
            "--cluster-port",
            &bus.to_string(),
            // A primary otherwise waits 5 s for more replicas before the first (diskless) sync.
            "--repl-diskless-sync-delay",
            "0",
        ]
        .into_iter()
        .map(OsString::from)
        .collect()
    })
}

/// One line of `CLUSTER NODES`: a node as another node (or itself) sees it.
struct Entry {
    port: u16,
    flags: Vec<String>,
    connected: bool,
    /// Served slot ranges, inclusive; migrating/importing markers left out.
    slots: Vec<(u16, u16)>,
}

impl Entry {
    fn is(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }

    fn healthy(&self) -> bool {
        self.connected
            && !["fail", "fail?", "handshake", "noaddr"]
                .iter()
                .any(|f| self.is(f))
    }
}

/// The primary that serves `slot` in `view`, if any.
fn owner(view: &[Entry], slot: u16) -> Option<u16> {
    view.iter()
        .find(|entry| {
            entry
                .slots
                .iter()
                .any(|&(start, end)| (start..=end).contains(&slot))
        })
        .map(|entry| entry.port)
}

/// `port`'s view of the cluster, parsed from `CLUSTER NODES`.
fn cluster_nodes(port: u16) -> Result<Vec<Entry>, String> {
    let text: String = node::try_connect(port, QUERY_TIMEOUT)
        .and_then(|mut connection| redis::cmd("CLUSTER").arg("NODES").query(&mut connection))
        .map_err(|err| format!("CLUSTER NODES: {err}"))?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            parse_entry(line).ok_or_else(|| format!("unexpected CLUSTER NODES line {line:?}"))
        })
        .collect()
}

/// `<id> <ip:port@cport[,hostname]> <flags> <master> <ping> <pong> <epoch> <link> <slot>...`
fn parse_entry(line: &str) -> Option<Entry> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let address = fields.get(1)?.split(['@', ',']).next()?;
    let port = address.rsplit(':').next()?.parse().ok()?;
    let slots = fields
        .get(8..)
        .unwrap_or_default()
        .iter()
        .filter(|range| !range.starts_with('['))
        .map(|range| {
            let (start, end) = range.split_once('-').unwrap_or((range, range));
            Some((start.parse().ok()?, end.parse().ok()?))
        })
        .collect::<Option<_>>()?;
    Some(Entry {
        port,
        flags: fields.get(2)?.split(',').map(str::to_owned).collect(),
        connected: *fields.get(7)? == "connected",
        slots,
    })
}

fn cluster_info(port: u16) -> Result<String, String> {
    node::try_connect(port, QUERY_TIMEOUT)
        .and_then(|mut connection| redis::cmd("CLUSTER").arg("INFO").query(&mut connection))
        .map_err(|err| format!("CLUSTER INFO on node {port}: {err}"))
}

fn info(port: u16, section: &str) -> redis::RedisResult<String> {
    let mut connection = node::try_connect(port, QUERY_TIMEOUT)?;
    redis::cmd("INFO").arg(section).query(&mut connection)
}
