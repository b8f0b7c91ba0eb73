//! Auto-pipelining: the commands of concurrent callers on one connection leave in one write.
//!
//! redis-rs's multiplexed connection already writes everything its task finds queued when it
//! runs. But tokio runs a task woken by the running one right after it (the worker's LIFO
//! slot), so each caller's command wakes the connection's task, which writes it nearly alone:
//! at 64 tasks redis-server read ~5 commands per `read` (`INFO stats`), against 16 under
//! `redis-benchmark -P 16`, and spent 3–4 µs of CPU per `GET` on those small reads and writes.
//!
//! Here, once a few calls are in flight on a connection ([`BATCH_FROM`]; below that a call goes
//! out at once), a caller puts its command in the connection's [`Batcher`] queue, and the caller
//! that finds the queue empty starts a flush task. The flush yields once first — every task that is
//! ready runs meanwhile, and those about to send queue their commands too — then sends the whole
//! queue as one pipeline and hands each caller its reply. The flush runs on its own, so a caller
//! that gives up (its future dropped) never loses the others' commands.
//!
//! **Deadlines.** Each command carries its call's deadline (an instant), and the flush keeps them:
//! one timer for the batch, set at its earliest deadline; when it fires, the callers whose
//! deadlines passed get [`deadline_passed`], and the timer moves to the next deadline while the
//! others wait for their replies. A caller that queued needs no timer of its own: one per call
//! was about 12 % of the client's CPU on `cache_get` and `cache_set` at 64 tasks (decision 0009).
//!
//! Commands of one caller still reach Redis in the order it awaits them. Commands of different
//! callers queued on different flushes may leave in either order, as on different connections;
//! [`crate::Client`]'s ordered scopes therefore bypass the queue (see [`Conn::Direct`]).
//!
//! [`Conn::Direct`]: crate::client::Conn::Direct

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, RedisError, RedisResult, Value};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// Commands one flush sends at most; the rest go in the next flush, started at once.
pub(crate) const MAX_BATCH: usize = 512;

/// A call queues for the next batch only when this many other calls are in flight on its
/// connection already; with fewer it goes out at once. Measured at 8 tasks over two connections
/// (docs/benchmarks.md, session 6): queueing whenever another call was in flight cost 10–25 % of
/// the throughput there, queueing only from 4 nothing; at 64 tasks the two are level.
pub(crate) const BATCH_FROM: usize = 4;

/// What the queues of one client sent, across its pools.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Batches sent.
    pub(crate) batches: AtomicU64,
    /// Commands sent in them.
    pub(crate) commands: AtomicU64,
}

/// The queue of one managed connection.
pub(crate) struct Batcher {
    connection: ConnectionManager,
    /// The deadline of a command sent with none (`Conn::Single` outside `Client::run`).
    deadline: Duration,
    counters: Arc<Counters>,
    queue: Mutex<Queue>,
    /// Calls in flight on the connection, this one included: the pool counts them.
    in_flight: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Queue {
    commands: Vec<Cmd>,
    waiters: Vec<Waiting>,
    /// A flush task is spawned that has not taken the queue yet.
    scheduled: bool,
}

/// A caller in the queue, and when it stops waiting.
struct Waiting {
    waiter: Waiter,
    until: Instant,
}

/// A caller waiting for the replies of its commands, which are consecutive in the batch.
enum Waiter {
    /// One command, one reply.
    One(oneshot::Sender<RedisResult<Value>>),
    /// A pipeline of `sent` commands, of whose replies the caller wants `count` after `skip`.
    Many {
        sent: usize,
        skip: usize,
        count: usize,
        reply: oneshot::Sender<RedisResult<Vec<Value>>>,
    },
    /// A caller whose deadline passed while its `n` commands were out (it was answered then).
    Passed(usize),
}

impl Waiter {
    fn commands(&self) -> usize {
        match self {
            Waiter::One(_) => 1,
            Waiter::Many { sent, .. } => *sent,
            Waiter::Passed(sent) => *sent,
        }
    }

    fn is_abandoned(&self) -> bool {
        match self {
            Waiter::One(reply) => reply.is_closed(),
            Waiter::Many { reply, .. } => reply.is_closed(),
            Waiter::Passed(_) => true,
        }
    }

    fn fail(self, err: RedisError) {
        match self {
            Waiter::One(reply) => drop(reply.send(Err(err))),
            Waiter::Many { reply, .. } => drop(reply.send(Err(err))),
            Waiter::Passed(_) => {}
        }
    }
}

impl Batcher {
    /// A queue in front of `connection`; `deadline` bounds a command sent with no deadline of
    /// its call's (see [`Batcher::until`]).
    pub(crate) fn new(
        connection: ConnectionManager,
        deadline: Duration,
        counters: Arc<Counters>,
        in_flight: Arc<AtomicUsize>,
    ) -> Self {
        Self {
            connection,
            deadline,
            counters,
            queue: Mutex::new(Queue::default()),
            in_flight,
        }
    }

    /// The connection itself, for commands that must not wait in the queue.
    pub(crate) fn connection(&self) -> &ConnectionManager {
        &self.connection
    }

    /// `until`, or the command deadline from now when the call has none.
    pub(crate) fn until(&self, until: Option<Instant>) -> Instant {
        until.unwrap_or_else(|| Instant::now() + self.deadline)
    }

    /// Sends `cmd` with the next batch and waits for its reply until `until` at the latest; at
    /// once while the connection has fewer than [`BATCH_FROM`] calls in flight.
    pub(crate) async fn send(self: &Arc<Self>, cmd: Cmd, until: Instant) -> RedisResult<Value> {
        // Fewer than BATCH_FROM others in flight: nothing worth waiting for company.
        if self.in_flight.load(Ordering::Relaxed) <= BATCH_FROM {
            let mut connection = self.connection.clone();
            return within(until, connection.req_packed_command(&cmd)).await;
        }
        let (reply, answer) = oneshot::channel();
        self.enqueue(std::iter::once(cmd), Waiter::One(reply), until);
        answer.await.unwrap_or_else(|_| Err(dropped()))
    }

    /// Sends `commands` with the next batch, back to back, and returns `count` of their replies
    /// after the first `skip`, waiting until `until` at the latest.
    pub(crate) async fn send_many(
        self: &Arc<Self>,
        commands: Vec<Cmd>,
        skip: usize,
        count: usize,
        until: Instant,
    ) -> RedisResult<Vec<Value>> {
        let sent = commands.len();
        if sent == 0 && skip == 0 && count == 0 {
            return Ok(Vec::new());
        }
        if skip + count > sent {
            return Err(RedisError::from((
                redis::ErrorKind::Client,
                "pipeline reply range out of bounds",
            )));
        }
        let (reply, answer) = oneshot::channel();
        self.enqueue(
            commands,
            Waiter::Many {
                sent,
                skip,
                count,
                reply,
            },
            until,
        );
        answer.await.unwrap_or_else(|_| Err(dropped()))
    }

    fn enqueue(
        self: &Arc<Self>,
        commands: impl IntoIterator<Item = Cmd>,
        waiter: Waiter,
        until: Instant,
    ) {
        let start = {
            let mut queue = self.lock();
            queue.commands.extend(commands);
            queue.waiters.push(Waiting { waiter, until });
            !std::mem::replace(&mut queue.scheduled, true)
        };
        if start {
            tokio::spawn(self.clone().flush());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the callers that are ready to queue their commands, then sends the queue.
    /// (Boxed: a flush may start the next one.)
    fn flush(self: Arc<Self>) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(Self::flush_now(Scheduled {
            batcher: self,
            taken: false,
        }))
    }

    async fn flush_now(mut scheduled: Scheduled) {
        tokio::task::yield_now().await;
        let (commands, waiters, more) = {
            let mut queue = scheduled.batcher.lock();
            let Queue {
                commands,
                waiters,
                scheduled: next,
            } = &mut *queue;
            // Whole callers, up to MAX_BATCH commands (at least one caller).
            let (mut callers, mut taken) = (0, 0);
            for waiting in waiters.iter() {
                let n = waiting.waiter.commands();
                if callers > 0 && taken + n > MAX_BATCH {
                    break;
                }
                callers += 1;
                taken += n;
            }
            let batch: Vec<Cmd> = commands.drain(..taken).collect();
            let callers: Vec<Waiting> = waiters.drain(..callers).collect();
            // The rest, if any, goes with the next flush, spawned below.
            *next = !waiters.is_empty();
            scheduled.taken = true;
            (batch, callers, *next)
        };
        let this = &scheduled.batcher;
        if more {
            tokio::spawn(this.clone().flush());
        }
        // A caller that gave up meanwhile (its future dropped) has its commands left out, as
        // redis-rs leaves out a command nobody waits for: its outcome was reported unknown, and
        // not sending it is one of the outcomes. So has one whose deadline passed in the queue
        // (the second command of a call that is out of time, say): it gets its timeout now.
        let now = Instant::now();
        let mut pipeline = redis::Pipeline::with_capacity(commands.len());
        let mut commands = commands.into_iter();
        let mut sending = Vec::with_capacity(waiters.len());
        for waiting in waiters {
            let own = commands.by_ref().take(waiting.waiter.commands());
            if waiting.waiter.is_abandoned() {
                own.for_each(drop);
            } else if waiting.until <= now {
                own.for_each(drop);
                waiting.waiter.fail(deadline_passed());
            } else {
                own.for_each(|command| {
                    pipeline.add_command(command);
                });
                sending.push(waiting);
            }
        }
        let mut waiters = sending;
        if waiters.is_empty() {
            return;
        }
        let sent = pipeline.len();
        this.counters.batches.fetch_add(1, Ordering::Relaxed);
        this.counters
            .commands
            .fetch_add(sent as u64, Ordering::Relaxed);
        let mut connection = this.connection.clone();
        let replies = connection.req_packed_commands(&pipeline, 0, sent);
        let Some(replies) = answer_within_deadlines(replies, &mut waiters).await else {
            // Every caller's deadline passed: the replies, when they come, are dropped.
            return;
        };
        let replies = match replies {
            Ok(replies) if replies.len() == sent => replies,
            Ok(replies) => {
                let err = RedisError::from((
                    redis::ErrorKind::Client,
                    "pipelined batch answered with the wrong number of replies",
                    format!("{} for {sent} commands", replies.len()),
                ));
                return waiters.into_iter().for_each(|w| w.waiter.fail(err.clone()));
            }
            Err(err) => return waiters.into_iter().for_each(|w| w.waiter.fail(err.clone())),
        };
        let mut replies = replies.into_iter();
        for Waiting { waiter, .. } in waiters {
            match waiter {
                Waiter::Passed(sent) => replies.by_ref().take(sent).for_each(drop),
                Waiter::One(reply) => {
                    let value = replies.next().unwrap_or(Value::Nil);
                    let _ = reply.send(Ok(value));
                }
                Waiter::Many {
                    sent,
                    skip,
                    count,
                    reply,
                } => {
                    let mut own: Vec<Value> = replies.by_ref().take(sent).collect();
                    own.truncate(skip + count);
                    own.drain(..skip);
                    let _ = reply.send(Ok(own));
                }
            }
        }
    }
}

/// Waits for `replies` until the earliest deadline of `waiters`, fails those whose deadlines
/// passed, and waits again until the next; `None` once every caller's deadline passed. One timer
/// at a time for the whole batch.
async fn answer_within_deadlines<F: std::future::Future>(
    replies: F,
    waiters: &mut [Waiting],
) -> Option<F::Output> {
    within_deadlines(
        replies,
        waiters,
        |w| (!matches!(w.waiter, Waiter::Passed(_))).then_some(w.until),
        |w| {
            // A caller whose deadline passed keeps its place, so that the replies still line up.
            let passed = Waiter::Passed(w.waiter.commands());
            std::mem::replace(&mut w.waiter, passed).fail(deadline_passed());
        },
    )
    .await
}

/// Waits for `reply` until the earliest deadline among `waiters` (`deadline` gives each one's,
/// `None` once it was answered), calls `pass` on each whose deadline passed (which answers it),
/// and waits again until the next; `None` once none is left waiting. One timer at a time for
/// all of them: the auto-pipelining queue's batches and the coalesced script calls
/// (`coalesce.rs`) keep their callers' deadlines with it.
pub(crate) async fn within_deadlines<F: std::future::Future, W>(
    reply: F,
    waiters: &mut [W],
    deadline: impl Fn(&W) -> Option<Instant>,
    mut pass: impl FnMut(&mut W),
) -> Option<F::Output> {
    let mut reply = std::pin::pin!(reply);
    loop {
        let until = waiters.iter().filter_map(&deadline).min()?;
        if let Ok(reply) = tokio::time::timeout_at(until, reply.as_mut()).await {
            return Some(reply);
        }
        let now = Instant::now();
        for waiter in waiters.iter_mut() {
            if deadline(waiter).is_some_and(|until| until <= now) {
                pass(waiter);
            }
        }
    }
}

/// A flush task until it takes the queue. Dropped before that (its runtime shutting down, even
/// before the task first ran), it tells the queue that no flush is coming, so that the next
/// caller spawns one, and fails the callers queued so far (their commands were not sent):
/// nothing is left waiting for a flush that will never run, not even a caller on another
/// runtime, which has no timer of its own to end its wait.
struct Scheduled {
    batcher: Arc<Batcher>,
    taken: bool,
}

impl Drop for Scheduled {
    fn drop(&mut self) {
        if !self.taken {
            let waiters = {
                let mut queue = self.batcher.lock();
                queue.scheduled = false;
                queue.commands.clear();
                std::mem::take(&mut queue.waiters)
            };
            for waiting in waiters {
                waiting.waiter.fail(dropped());
            }
        }
    }
}

/// `request`, ended at `until` with [`deadline_passed`]: the deadline of a command that goes out
/// without the queue (no batch to keep it).
pub(crate) async fn within<T>(
    until: Instant,
    request: impl std::future::Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    tokio::time::timeout_at(until, request)
        .await
        .unwrap_or_else(|_| Err(deadline_passed()))
}

/// What a queued caller whose deadline passed gets; [`Client::run`](crate::Client) reports it
/// as its call's timeout ([`is_deadline_passed`]).
pub(crate) fn deadline_passed() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        DeadlinePassed,
    ))
}

/// True for [`deadline_passed`]'s error, as opposed to a socket's own time-out.
pub(crate) fn is_deadline_passed(err: &RedisError) -> bool {
    // redis keeps the I/O error it was made from behind an `Arc`, its `source`.
    type Shared = Arc<dyn std::error::Error + Send + Sync>;
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<Shared>())
        .and_then(|shared| shared.downcast_ref::<std::io::Error>())
        .and_then(std::io::Error::get_ref)
        .is_some_and(|inner| inner.is::<DeadlinePassed>())
}

#[derive(Debug)]
struct DeadlinePassed;

impl std::fmt::Display for DeadlinePassed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the call's deadline passed before Redis answered")
    }
}

impl std::error::Error for DeadlinePassed {}

/// The flush was dropped before it answered (the runtime shutting down).
fn dropped() -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the connection's batch was dropped before it was answered",
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::future::Future;
    use std::pin::Pin;
    use std::task::Poll;

    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use redis::{RedisError, Value};
    use rediskit_testkit::RedisServer;
    use tokio::time::Instant;

    use super::{Batcher, Counters};
    use crate::{Client, Config, ErrorKind};

    async fn client(server: &RedisServer) -> Client {
        connect(server, true).await
    }

    /// A client of one connection.
    async fn connect(server: &RedisServer, auto_pipeline: bool) -> Client {
        let config = Config::builder()
            .url(server.url())
            .max_connections(1)
            .auto_pipeline(auto_pipeline)
            .build()
            .unwrap();
        Client::connect(config).await.unwrap()
    }

    /// 200 callers at once, each reading a missing key.
    async fn crowd(client: &Client) {
        let calls = (0..200).map(|i| {
            let client = client.clone();
            tokio::spawn(async move { client.get(&format!("k{i}")).await })
        });
        for call in futures_util::future::join_all(calls).await {
            assert_eq!(call.unwrap().unwrap(), None);
        }
    }

    /// redis-server's count of commands and of socket reads so far.
    fn commands_and_reads(server: &RedisServer) -> (u64, u64) {
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query(&mut server.admin())
            .unwrap();
        let field = |name: &str| -> u64 {
            info.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        (
            field("total_commands_processed"),
            field("total_reads_processed"),
        )
    }

    /// With auto-pipelining off, the same crowd of callers is never batched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn auto_pipelining_can_be_turned_off() {
        let server = RedisServer::start();
        let client = connect(&server, false).await;
        crowd(&client).await;
        let stats = client.stats();
        assert_eq!((stats.pipelined_batches, stats.pipelined_commands), (0, 0));
        assert!(stats.commands >= 200, "{stats:?}");
    }

    /// Tasks calling one after another on one worker thread: without the queue each command
    /// woke the connection's task, which wrote it alone (about one command per read in
    /// redis-server); with it, the ready callers' commands leave together.
    #[test]
    fn concurrent_callers_share_writes() {
        let server = RedisServer::start();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (commands, reads) = runtime.block_on(async {
            let client = client(&server).await;
            let before = commands_and_reads(&server);
            let tasks: Vec<_> = (0..32)
                .map(|task| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        for i in 0..100 {
                            let key = format!("k{task}:{i}");
                            assert_eq!(client.get(&key).await.unwrap(), None);
                        }
                    })
                })
                .collect();
            for task in tasks {
                task.await.unwrap();
            }
            let after = commands_and_reads(&server);
            (after.0 - before.0, after.1 - before.1)
        });
        assert!(commands >= 3_200, "{commands} commands");
        assert!(
            commands >= 4 * reads,
            "{commands} commands arrived in {reads} reads"
        );
    }

    /// The client counts the batches and their commands; a caller alone on its connection is
    /// not held back for company (no batch), a crowd is batched.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_are_counted_and_a_lone_caller_is_not_queued() {
        let server = RedisServer::start();
        let client = client(&server).await;
        for i in 0..50 {
            assert_eq!(client.get(&format!("k{i}")).await.unwrap(), None);
        }
        let stats = client.stats();
        assert_eq!(
            (stats.pipelined_batches, stats.pipelined_commands),
            (0, 0),
            "one caller at a time"
        );

        crowd(&client).await;
        let stats = client.stats();
        assert!(stats.pipelined_batches > 0, "{stats:?}");
        assert!(
            stats.pipelined_commands >= 2 * stats.pipelined_batches,
            "{stats:?}"
        );
        assert!(stats.pipelined_commands <= 200, "{stats:?}");
    }

    /// Calls polled once and left in flight, so that the next calls on the connection queue.
    async fn keep_busy(
        client: &Client,
    ) -> Vec<impl Future<Output = crate::Result<Option<Vec<u8>>>>> {
        let mut calls: Vec<_> = (0..super::BATCH_FROM)
            .map(|_| Box::pin(client.get("busy")))
            .collect();
        poll_once(&mut calls).await;
        calls
    }

    /// Polls each call once (they queue their commands), asserting none has finished yet.
    async fn poll_once<F: Future + Unpin>(calls: &mut [F]) {
        std::future::poll_fn(|cx| {
            for call in calls.iter_mut() {
                assert!(Pin::new(&mut *call).poll(cx).is_pending());
            }
            Poll::Ready(())
        })
        .await;
    }

    /// A caller that gives up after queueing its command (its future dropped, as a timeout
    /// drops it) takes nobody else's command with it.
    #[tokio::test]
    async fn a_caller_that_gives_up_loses_no_other_command() {
        let server = RedisServer::start();
        let client = client(&server).await;
        client
            .set("a", b"1", std::time::Duration::from_secs(60))
            .await
            .unwrap();
        let busy = keep_busy(&client).await;
        let mut calls: Vec<_> = (0..11).map(|_| Box::pin(client.get("a"))).collect();
        // Queue them all (the first starts the flush), then drop the first before it is sent.
        poll_once(&mut calls).await;
        let others = calls.split_off(1);
        drop(calls);
        for other in others {
            assert_eq!(other.await.unwrap(), Some(b"1".to_vec()));
        }
        for call in busy {
            assert_eq!(call.await.unwrap(), None);
        }
    }

    /// The command of a caller that gave up before its batch left is not sent at all.
    #[tokio::test]
    async fn a_command_nobody_waits_for_is_not_sent() {
        let server = RedisServer::start();
        let client = client(&server).await;
        let ttl = std::time::Duration::from_secs(60);
        let busy = keep_busy(&client).await;
        let keys: Vec<String> = (0..10).map(|i| format!("w{i}")).collect();
        let mut writes: Vec<_> = keys
            .iter()
            .map(|key| Box::pin(client.set(key, b"v", ttl)))
            .collect();
        poll_once(&mut writes).await;
        // The even ones give up while still queued (this runtime has one thread: the flush has
        // not run yet).
        let kept: Vec<_> = writes
            .into_iter()
            .enumerate()
            .filter_map(|(i, write)| (i % 2 == 1).then_some(write))
            .collect();
        for write in kept {
            write.await.unwrap();
        }
        futures_util::future::join_all(busy).await;
        let mut admin = server.admin();
        for (i, key) in keys.iter().enumerate() {
            let exists: bool = redis::cmd("EXISTS").arg(key).query(&mut admin).unwrap();
            assert_eq!(exists, i % 2 == 1, "{key}");
        }
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// A client kept beyond the runtime it was used on (one shared by several `#[tokio::test]`s,
    /// say): a flush that runtime dropped before it ran leaves no queue behind that nobody
    /// sends, and the next runtime's crowd is answered.
    #[test]
    fn a_flush_lost_with_its_runtime_does_not_stall_the_queue() {
        let server = RedisServer::start();
        let first = current_thread();
        let client = first.block_on(async {
            let client = client(&server).await;
            let busy = keep_busy(&client).await;
            let mut queued = vec![Box::pin(client.get("a"))];
            // Queued, and its flush spawned; this runtime has one thread, so it has not run.
            poll_once(&mut queued).await;
            drop((busy, queued));
            client
        });
        drop(first);
        let second = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        second.block_on(async {
            // The first runtime took the connection's task with it: wait for the reconnection.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while client.get("a").await.is_err() {
                assert!(std::time::Instant::now() < deadline, "never reconnected");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            crowd(&client).await;
        });
    }

    fn admin_cmd(server: &RedisServer, args: &[&str]) {
        let mut command = redis::cmd(args[0]);
        for arg in &args[1..] {
            command.arg(*arg);
        }
        command.query::<()>(&mut server.admin()).unwrap();
    }

    /// A queue in front of its own connection to `server`, with so many calls counted in flight
    /// that every command queues.
    async fn crowded_batcher(server: &RedisServer) -> (Arc<Batcher>, Arc<Counters>) {
        // As the client's: no response timeout of redis's own.
        let config = redis::aio::ConnectionManagerConfig::new().set_response_timeout(None);
        let connection = redis::Client::open(server.url())
            .unwrap()
            .get_connection_manager_with_config(config)
            .await
            .unwrap();
        let counters = Arc::new(Counters::default());
        let batcher = Batcher::new(
            connection,
            Duration::from_secs(60),
            counters.clone(),
            Arc::new(AtomicUsize::new(usize::MAX / 2)),
        );
        (Arc::new(batcher), counters)
    }

    fn get(key: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("GET");
        cmd.arg(key);
        cmd
    }

    fn text(value: &str) -> Value {
        Value::BulkString(value.as_bytes().to_vec())
    }

    /// Callers in one batch keep their own deadlines: the one whose deadline passes while Redis
    /// is paused gets its timeout then (not when Redis answers), the others wait on and get their
    /// own replies (not the passed caller's), in one batch with one timer.
    #[tokio::test]
    async fn each_caller_in_a_batch_ends_at_its_own_deadline() {
        let server = RedisServer::start();
        admin_cmd(&server, &["MSET", "a", "1", "b", "2", "c", "3", "d", "4"]);
        let (batcher, counters) = crowded_batcher(&server).await;
        admin_cmd(&server, &["CLIENT", "PAUSE", "1500", "ALL"]);
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        // Queued in one poll: one flush takes them all (this runtime has one thread).
        let (first, early, pipelined) = tokio::join!(
            batcher.send(get("a"), later),
            batcher.send(get("b"), now + Duration::from_millis(100)),
            batcher.send_many(vec![get("c"), get("d")], 1, 1, later),
        );
        let err = early.unwrap_err();
        assert!(super::is_deadline_passed(&err), "{err}");
        assert_eq!(first.unwrap(), text("1"));
        assert_eq!(pipelined.unwrap(), vec![text("4")]);
        assert_eq!(counters.batches.load(Ordering::Relaxed), 1);
    }

    /// Calls that queued and got no answer end at the command deadline with their call's
    /// timeout, named and counted as any call's.
    #[tokio::test]
    async fn queued_calls_time_out_as_calls() {
        let server = RedisServer::start();
        let deadline = Duration::from_millis(200);
        let config = Config::builder()
            .url(server.url())
            .max_connections(1)
            .command_timeout(deadline)
            // Never open here: a call failed fast would get another error.
            .breaker(1_000, Duration::from_secs(1))
            .build()
            .unwrap();
        let client = Client::connect(config).await.unwrap();
        let busy = keep_busy(&client).await;
        admin_cmd(&server, &["CLIENT", "PAUSE", "1000", "ALL"]);
        let keys: Vec<String> = (0..10).map(|i| format!("q{i}")).collect();
        let queued = futures_util::future::join_all(keys.iter().map(|key| client.get(key)));
        let (queued, busy) = tokio::join!(queued, futures_util::future::join_all(busy));
        for result in queued.into_iter().chain(busy) {
            let err = result.unwrap_err();
            assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
            assert!(
                err.to_string().contains("GET got no answer within 200 ms"),
                "{err}"
            );
        }
        let stats = client.stats();
        assert!(stats.pipelined_batches >= 1, "{stats:?}");
        assert_eq!((stats.timeouts, stats.errors), (14, 14), "{stats:?}");
    }

    /// A caller queued from one runtime behind a flush that another runtime dropped before it
    /// ran (a client shared by two runtimes, one shutting down) is told at once: it has no timer
    /// of its own, and without the flush nothing would end its wait.
    #[test]
    fn a_caller_behind_a_lost_flush_is_told() {
        let server = RedisServer::start();
        let first = current_thread();
        let (batcher, _) = first.block_on(crowded_batcher(&server));
        let mut queued = Box::pin(batcher.send(get("a"), Instant::now() + Duration::from_secs(60)));
        // Queued, and its flush spawned on the first runtime, which has not run it.
        first.block_on(async { poll_once(std::slice::from_mut(&mut queued)).await });
        drop(first);
        let second = current_thread();
        let err = second
            .block_on(async { tokio::time::timeout(Duration::from_secs(10), queued).await })
            .expect("the caller waited on for a flush that never came")
            .unwrap_err();
        assert!(err.is_connection_dropped() || err.is_io_error(), "{err}");
    }

    /// A caller whose deadline passed before its batch left gets its timeout, and its command
    /// is not sent; the others in the batch are.
    #[tokio::test]
    async fn a_command_whose_deadline_passed_in_the_queue_is_not_sent() {
        let server = RedisServer::start();
        let (batcher, _) = crowded_batcher(&server).await;
        let set = |key: &str| {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key).arg("v");
            cmd
        };
        let now = Instant::now();
        let (late, timely) = tokio::join!(
            batcher.send(set("late"), now),
            batcher.send(set("timely"), now + Duration::from_secs(60)),
        );
        let err = late.unwrap_err();
        assert!(super::is_deadline_passed(&err), "{err}");
        assert_eq!(timely.unwrap(), Value::Okay);
        let mut admin = server.admin();
        let mut exists =
            |key: &str| -> bool { redis::cmd("EXISTS").arg(key).query(&mut admin).unwrap() };
        assert!(!exists("late"));
        assert!(exists("timely"));
    }

    /// Only the queue's own deadline error reads as a call's timeout; a socket's time-out stays
    /// what it is.
    #[test]
    fn only_the_queue_deadline_is_a_passed_deadline() {
        assert!(super::is_deadline_passed(&super::deadline_passed()));
        let socket = RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(socket.is_timeout());
        assert!(!super::is_deadline_passed(&socket));
    }

    /// Each caller gets its own reply from a shared batch: an error reply goes to its command
    /// alone, a pipeline gets exactly its replies, and a burst larger than one flush
    /// ([`MAX_BATCH`]) keeps every reply with its caller.
    #[tokio::test]
    async fn every_caller_gets_its_own_reply() {
        let server = RedisServer::start();
        let client = client(&server).await;
        let _: () = redis::cmd("HSET")
            .arg("hash")
            .arg("f")
            .arg("v")
            .query(&mut server.admin())
            .unwrap();
        let ttl = std::time::Duration::from_secs(60);
        let pipeline = client.run("pipeline", |mut c| async move {
            redis::pipe()
                .cmd("SET")
                .arg("p")
                .arg("1")
                .cmd("GET")
                .arg("p")
                .query_async::<(String, String)>(&mut c)
                .await
        });
        let busy = keep_busy(&client).await;
        // Queued in one poll: one flush takes them all (this runtime has one thread).
        let (wrong, missing, set, pipelined) = tokio::join!(
            client.get("hash"),
            client.get("nothing"),
            client.set("x", b"y", ttl),
            pipeline,
        );
        let err = wrong.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Backend, "{err}");
        assert!(err.to_string().contains("WRONGTYPE"), "{err}");
        assert_eq!(missing.unwrap(), None);
        set.unwrap();
        assert_eq!(pipelined.unwrap(), ("OK".to_owned(), "1".to_owned()));
        futures_util::future::join_all(busy).await;

        let burst = 3 * super::MAX_BATCH + 7;
        let keys: Vec<String> = (0..burst).map(|i| format!("k{i}")).collect();
        let writes = keys.iter().map(|key| client.set(key, key.as_bytes(), ttl));
        for result in futures_util::future::join_all(writes).await {
            result.unwrap();
        }
        let reads = keys.iter().map(|key| client.get(key));
        let values = futures_util::future::join_all(reads).await;
        for (key, value) in keys.iter().zip(values) {
            assert_eq!(value.unwrap().as_deref(), Some(key.as_bytes()));
        }
    }
}
