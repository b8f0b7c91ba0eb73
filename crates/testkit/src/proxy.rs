//! A fault-injecting TCP proxy: it sits between a client and `redis-server` and, switched at any
//! moment while the client runs, adds latency, cuts every connection, black-holes the traffic or
//! refuses new connections, or lets one request through and loses its reply with the connection.
//!
//! ```no_run
//! # async fn demo() {
//! use std::time::Duration;
//! use rediskit_testkit::RedisServer;
//! use rediskit_testkit::proxy::FaultProxy;
//!
//! let server = RedisServer::start();
//! let proxy = FaultProxy::for_server(&server);
//! // Point the client under test at `proxy.url()`, then:
//! proxy.latency(Duration::from_millis(200));
//! proxy.black_hole();
//! proxy.cut();
//! proxy.pass();
//! proxy.lose_reply_to(b"EVALSHA");
//! # }
//! ```
//!
//! # Behavior
//!
//! - Each accepted connection gets its own connection to the target; bytes are relayed in both
//!   directions, in order, one chunk (one `read`) at a time.
//! - A mode applies to new *and* existing connections from the moment it is set.
//! - Black-holed bytes are held, not dropped: when the mode changes they are delivered in order,
//!   as TCP delivers retransmitted segments once a partition heals. Dropping them from a
//!   connection that stays open would desynchronise the protocol (replies matched to the wrong
//!   requests), which no real network does. To model a partition that outlived the connections,
//!   call [`FaultProxy::cut`] before [`FaultProxy::pass`].
//! - Everything runs on the Tokio runtime that started the proxy; dropping the proxy stops it and
//!   closes every connection.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::RedisServer;

/// How long the proxy waits to reach its target for a new connection before giving up on it.
const UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Bytes relayed per read.
const CHUNK: usize = 16 * 1024;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Mode {
    /// Relays everything as it comes.
    Pass,
    /// Relays everything, delaying each chunk from the server to the client by this much.
    Latency(Duration),
    /// Accepts and reads, but forwards and answers nothing (the bytes are held; see the
    /// module's docs).
    BlackHole,
    /// Closes every new connection as soon as it is accepted, like a server that is down.
    Refuse,
    /// Relays everything, until a request chunk containing these bytes has passed: then the
    /// next chunk the server sends back on that connection is dropped, every connection is
    /// closed and the mode returns to [`Mode::Pass`]. The server ran the request; the client
    /// saw its connection drop with the reply in flight. See [`FaultProxy::lose_reply_to`].
    LoseReplyTo(&'static [u8]),
}

/// A TCP proxy on `127.0.0.1:<ephemeral port>` in front of one target address, with a
/// switchable [`Mode`]. Stops, closing every connection, when dropped.
///
/// Must be started within a Tokio runtime; the switches are plain (non-async) calls.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    shared: Arc<Shared>,
    accept: AbortHandle,
}

struct Shared {
    mode: watch::Sender<Mode>,
    /// The relay task of every open connection, to abort them all on a cut.
    connections: Mutex<HashMap<u64, AbortHandle>>,
    next_id: AtomicU64,
    accepted: AtomicU64,
}

impl Shared {
    // A std mutex: it is never held across an `.await`, only to insert, remove or drain.
    fn connections(&self) -> MutexGuard<'_, HashMap<u64, AbortHandle>> {
        self.connections
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn cut(&self) {
        for (_, task) in self.connections().drain() {
            task.abort();
        }
    }

    /// Leaves [`Mode::LoseReplyTo`] for [`Mode::Pass`]; false if the mode was something else
    /// (another connection lost its reply first, or a test changed the mode).
    fn take_lost_reply(&self) -> bool {
        self.mode.send_if_modified(|mode| {
            let armed = matches!(mode, Mode::LoseReplyTo(_));
            if armed {
                *mode = Mode::Pass;
            }
            armed
        })
    }
}

impl std::fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.addr)
            .field("target", &self.target)
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts a proxy in [`Mode::Pass`] in front of `target`.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, or if no local port can be bound.
    pub fn start(target: SocketAddr) -> Self {
        assert!(
            tokio::runtime::Handle::try_current().is_ok(),
            "FaultProxy::start must be called within a Tokio runtime (e.g. in a #[tokio::test])"
        );
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|listener| {
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)
            })
            .expect("bind the fault proxy to an ephemeral port");
        let addr = listener
            .local_addr()
            .expect("the fault proxy's local address");
        let shared = Arc::new(Shared {
            mode: watch::Sender::new(Mode::Pass),
            connections: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, target, shared.clone())).abort_handle();
        Self {
            addr,
            target,
            shared,
            accept,
        }
    }

    /// Starts a proxy in front of a test server.
    pub fn for_server(server: &RedisServer) -> Self {
        Self::start(SocketAddr::from((Ipv4Addr::LOCALHOST, server.port())))
    }

    /// Where the proxy listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `redis://127.0.0.1:{proxy port}/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port())
    }

    /// The mode now.
    pub fn mode(&self) -> Mode {
        *self.shared.mode.borrow()
    }

    /// Relays everything as it comes; held (black-holed) bytes are delivered now.
    pub fn pass(&self) {
        self.shared.mode.send_replace(Mode::Pass);
    }

    /// Delays each chunk from the server to the client by `delay`, from now on.
    pub fn latency(&self, delay: Duration) {
        self.shared.mode.send_replace(Mode::Latency(delay));
    }

    /// Forwards and answers nothing, on new and existing connections, until the mode changes.
    pub fn black_hole(&self) {
        self.shared.mode.send_replace(Mode::BlackHole);
    }

    /// Closes every current connection now (held bytes are dropped with them). The mode is
    /// unchanged: new connections are served as it says.
    pub fn cut(&self) {
        self.shared.cut();
    }

    /// Closes every current connection and every new one as soon as it is accepted, until the
    /// mode changes: Redis is down, seen from the client.
    pub fn refuse(&self) {
        self.shared.mode.send_replace(Mode::Refuse);
        self.shared.cut();
    }

    /// Lets requests through until one contains `needle` (looked for within each chunk read,
    /// which holds a whole command of a few kilobytes at most); drops the server's reply to it,
    /// closes every connection and returns to [`Mode::Pass`]. This is a connection lost after
    /// its request ran and before its reply arrived: what a client that sends the request
    /// again must survive. Wait for [`FaultProxy::mode`] to be `Pass` again to know it happened.
    pub fn lose_reply_to(&self, needle: &'static [u8]) {
        assert!(!needle.is_empty(), "lose_reply_to needs bytes to look for");
        self.shared.mode.send_replace(Mode::LoseReplyTo(needle));
    }

    /// Connections accepted since the proxy started (refused ones included).
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.shared.connections().len()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.cut();
    }
}

async fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            // Out of file descriptors and the like: try again shortly rather than spin.
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::Relaxed);
        if *shared.mode.borrow() == Mode::Refuse {
            drop(client);
            continue;
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Registered under the lock before the task can finish and unregister itself.
        let mut connections = shared.connections();
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                relay(client, target, &shared).await;
                shared.connections().remove(&id);
            }
        });
        connections.insert(id, task.abort_handle());
    }
}

/// Which way a pipe relays: requests go to the server, replies to the client.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToServer,
    ToClient,
}

/// Relays one connection until either side closes it (or the task is aborted by a cut).
async fn relay(client: TcpStream, target: SocketAddr, shared: &Arc<Shared>) {
    let upstream =
        match tokio::time::timeout(UPSTREAM_CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(upstream)) => upstream,
            // The target is down: the client sees its connection closed, as it would.
            _ => return,
        };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    // Set once a request that `Mode::LoseReplyTo` looks for has gone to the server.
    let armed = Arc::new(AtomicBool::new(false));
    let to_server = pipe(
        client_read,
        upstream_write,
        shared,
        &armed,
        Direction::ToServer,
    );
    let to_client = pipe(
        upstream_read,
        client_write,
        shared,
        &armed,
        Direction::ToClient,
    );
    // When one direction ends, the connection is over: dropping the other closes its sockets.
    tokio::select! {
        () = to_server => {}
        () = to_client => {}
    }
}

/// Relays one direction. The reader keeps reading (so a black hole still "accepts and reads");
/// the writer holds each chunk until it is due and the mode lets it through.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: &Shared,
    armed: &AtomicBool,
    direction: Direction,
) {
    let delayed = direction == Direction::ToClient;
    let (chunks, mut due) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let mut mode = shared.mode.subscribe();
    let mode_at_read = mode.clone();
    let read = async move {
        loop {
            let mut buffer = vec![0; CHUNK];
            match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buffer.truncate(n);
                    // Each chunk is delayed from when it was read, so latency does not add up
                    // across chunks in flight together.
                    let delay = match *mode_at_read.borrow() {
                        Mode::Latency(delay) if delayed => delay,
                        _ => Duration::ZERO,
                    };
                    if chunks.send((Instant::now() + delay, buffer)).is_err() {
                        return;
                    }
                }
            }
        }
        // `chunks` drops here: the writer delivers what is left, then finishes.
    };
    let write = async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if mode
                .wait_for(|mode| *mode != Mode::BlackHole)
                .await
                .is_err()
            {
                return;
            }
            // Copied out: `take_lost_reply` writes the mode, which a borrow held here would block.
            let now = *mode.borrow();
            match (direction, now) {
                // Armed before the request leaves, so that its reply cannot come back first.
                (Direction::ToServer, Mode::LoseReplyTo(needle))
                    if bytes.windows(needle.len()).any(|window| window == needle) =>
                {
                    armed.store(true, Ordering::SeqCst);
                }
                (Direction::ToClient, _)
                    if armed.load(Ordering::SeqCst) && shared.take_lost_reply() =>
                {
                    // The reply goes with every connection, this one included.
                    shared.cut();
                    return;
                }
                _ => {}
            }
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on an ephemeral port.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, bytes: &[u8]) -> Vec<u8> {
        stream.write_all(bytes).await.unwrap();
        let mut answer = vec![0; bytes.len()];
        stream.read_exact(&mut answer).await.unwrap();
        answer
    }

    /// Bytes pass through unchanged in both directions, with latency added only when asked.
    #[tokio::test]
    async fn bytes_pass_through_and_latency_delays_them() {
        let proxy = FaultProxy::start(echo_server().await);
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut stream, b"PING\r\n").await, b"PING\r\n");

        proxy.latency(Duration::from_millis(150));
        let started = std::time::Instant::now();
        assert_eq!(round_trip(&mut stream, b"hello").await, b"hello");
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(proxy.accepted(), 1);
    }

    /// A cut closes the open connection at once; a new one passes.
    #[tokio::test]
    async fn cut_closes_current_connections() {
        let proxy = FaultProxy::start(echo_server().await);
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut stream, b"x").await;

        proxy.cut();
        let mut buffer = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer))
            .await
            .expect("the cut connection is closed, not left hanging");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut fresh, b"y").await, b"y");
    }

    /// A black hole answers nothing; `pass` then delivers what it held, in order.
    #[tokio::test]
    async fn black_hole_holds_until_pass() {
        let proxy = FaultProxy::start(echo_server().await);
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        round_trip(&mut stream, b"x").await;

        proxy.black_hole();
        stream.write_all(b"held").await.unwrap();
        let mut answer = [0u8; 4];
        let silent =
            tokio::time::timeout(Duration::from_millis(200), stream.read_exact(&mut answer)).await;
        assert!(silent.is_err(), "a black hole answers nothing");

        proxy.pass();
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut answer))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&answer, b"held");
    }

    /// `lose_reply_to` relays requests until one holds the needle, drops the reply to it and
    /// closes the connection, then passes again: the request reached the server.
    #[tokio::test]
    async fn lose_reply_to_drops_that_reply_and_the_connection() {
        let proxy = FaultProxy::start(echo_server().await);
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.lose_reply_to(b"EVAL");
        assert_eq!(round_trip(&mut stream, b"GET a").await, b"GET a");
        assert_eq!(proxy.mode(), Mode::LoseReplyTo(b"EVAL"));

        stream.write_all(b"EVALSHA x").await.unwrap();
        let mut buffer = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer))
            .await
            .expect("the connection is closed, not left hanging");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "the reply was lost: {read:?}"
        );
        assert_eq!(proxy.mode(), Mode::Pass);

        let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut fresh, b"EVALSHA x").await, b"EVALSHA x");
    }

    /// Refusing closes new connections without relaying anything.
    #[tokio::test]
    async fn refuse_closes_new_connections() {
        let proxy = FaultProxy::start(echo_server().await);
        proxy.refuse();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let _ = stream.write_all(b"x").await;
        let mut buffer = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer))
            .await
            .unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        assert_eq!(proxy.open_connections(), 0);
    }
}
