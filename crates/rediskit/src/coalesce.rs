//! Coalescing of the scripts that do one operation per key (`each.lua`): concurrent session
//! creations (or rotations, revocations, or one rate limiter's decisions) leave as one
//! `EVALSHA` that does each caller's operation in turn.
//!
//! Under load these scripts are bound by redis-server, not by the client: each `EVALSHA` costs
//! it a fixed part (the call itself, setting up `KEYS` and `ARGV`, `TIME`, the reply), about
//! 39k instructions for a session script, on top of the operation's own work. With several
//! operations in one call that part is paid once (docs/benchmarks.md, sessions 8 and 13, has
//! the measurements).
//!
//! A call goes out at once while fewer than [`MIN_IN_FLIGHT`] calls of its kind are in flight,
//! and up to [`IN_FLIGHT`] while those are small (the server has room, and more calls overlap
//! their round trips) or the queue fills a whole call. Beyond that, callers queue, and the next
//! call to go (when one in flight returns) takes up to [`MAX_OPS`] of them. So a lone caller
//! pays nothing, few callers overlap their calls, and under load the batches grow with the
//! queue rather than with a timer: a busy server gets fewer, larger calls, each of whose fixed
//! part is shared by more operations.
//!
//! Each operation stays what it was alone:
//! - **Atomic on its own key.** The script runs one operation after the other; none sees another
//!   half done, and Redis runs the whole call without interleaving other clients' commands.
//! - **Its own answer.** The script answers an array with each operation's reply, an error
//!   reply of its own for one that failed (a `WRONGTYPE` key, say), and the others stand.
//!   A write Redis refuses for its own state (`OOM`, `READONLY`, `MISCONF`, `NOREPLICAS`) fails
//!   the whole call before anything is written (Redis refuses every write of the script alike),
//!   so each caller gets that error, as it would have alone; on Sentinel, `READONLY` still
//!   sends the client after the new primary. (Under `OOM`, Redis refuses only writes before a
//!   script's first: a rotation that follows a deleting one in the same call goes through where
//!   alone it would not. It rewrites its record in place; creations write theirs first, and are
//!   refused as alone. Decision 0007.)
//! - **Its own deadline.** Each operation carries its caller's deadline (an instant), as a
//!   queued command does in the auto-pipelining queue (decision 0009): the call that carries it
//!   waits with one timer, at the earliest deadline of its operations; when that passes, those
//!   callers get their timeout and the timer moves to the next. A queued caller has no timer of
//!   its own: one per operation was 1.6 % of the client's instructions per rotation and 3.3 %
//!   per creation (callgrind, docs/benchmarks.md, session 15). A caller that gives up (its
//!   future dropped) or whose deadline passed before its operation was taken is left out, as
//!   an abandoned command is by the auto-pipelining queue: its outcome was reported unknown,
//!   and not running it is one of the outcomes.
//!
//! Not coalesced: a Redis Cluster (the keys of one call must share a slot, and users' keys do
//! not), and a client with [`Config::auto_pipeline`](crate::Config::auto_pipeline) off.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use redis::Value;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::client::{BackendKind, Client};
use crate::error::{Error, ErrorKind, Result};
use crate::scripts::Script;

/// Calls of one kind in flight at most before callers queue for the next one. Measured at 64
/// tasks (docs/benchmarks.md, session 8, six alternating rounds): 1 halved the throughput (the
/// server idles while the client reads a call's replies), 8 left most calls alone (~1.1
/// operations each), 4 beat 2 by 25–33 % in medians. Again on a faster VM (session 13): a fixed
/// 2 gained 3–6 % at 64 tasks but lost 21–33 % at 8 tasks and 16–21 % at 256, which is what
/// [`MIN_IN_FLIGHT`] and [`SMALL_CALL`] are for.
pub(crate) const IN_FLIGHT: usize = 4;

/// Calls of one kind in flight that may always be: beyond them, more go only while the calls
/// in flight are small or the queue fills a whole call ([`State::may_send`]). At 64 tasks that
/// makes calls of ~22 operations instead of ~12: 3–5 % more session operations per second, and
/// 8–14 % less of redis-server's time per operation; at 8 tasks, where calls are small, it
/// changes nothing (docs/benchmarks.md, session 14).
pub(crate) const MIN_IN_FLIGHT: usize = 2;

/// Operations per call in flight, on average, below which the calls are small: the server has
/// room to spare, and another call overlaps its round trip with theirs. 4 lost 7–9 % at 16
/// tasks; 16 did as 8 at 8, 16 and 64 tasks (docs/benchmarks.md, session 14).
pub(crate) const SMALL_CALL: usize = 8;

/// Operations one call carries at most; redis-server runs them back to back (a few µs each),
/// and no other client's command runs meanwhile.
pub(crate) const MAX_OPS: usize = 32;

/// One script's queue, with what it has sent.
pub(crate) struct Coalescer {
    client: Client,
    script: &'static Script,
    /// The command's name in errors and logs, e.g. `EVALSHA session_rotate`.
    what: &'static str,
    state: Mutex<State>,
    /// Calls that carried more than one operation, and the operations they carried.
    batches: AtomicU64,
    operations: AtomicU64,
}

#[derive(Default)]
struct State {
    waiting: Vec<Op>,
    /// Calls in flight (sent alone or coalesced).
    in_flight: usize,
    /// The operations those calls carry.
    ops_in_flight: usize,
    /// A flush task is spawned that has not taken the queue yet.
    scheduled: bool,
}

impl State {
    /// Whether another call may go now: always while fewer than [`MIN_IN_FLIGHT`] are in
    /// flight; up to [`IN_FLIGHT`] while those carry fewer than [`SMALL_CALL`] operations on
    /// average (the server has room to spare) or the queue fills a whole call.
    fn may_send(&self) -> bool {
        self.in_flight < MIN_IN_FLIGHT
            || (self.in_flight < IN_FLIGHT
                && (self.waiting.len() >= MAX_OPS
                    || self.ops_in_flight < SMALL_CALL * self.in_flight))
    }
}

/// One caller's operation: the key, then the script's two arguments for it (`ARGV[2i - 1]` and
/// `ARGV[2i]`; for a session, its id and the packed rest).
struct Op {
    key: String,
    first: String,
    second: Vec<u8>,
    /// When its caller's deadline passes: the command timeout from when it queued.
    until: Instant,
    reply: oneshot::Sender<Result<Value>>,
}

/// A caller whose operation a call carries, until it is answered (`reply` taken).
struct Waiter {
    until: Instant,
    reply: Option<oneshot::Sender<Result<Value>>>,
}

impl std::fmt::Debug for Coalescer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coalescer")
            .field("what", &self.what)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Counters of a [`Coalescer`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Coalesced {
    pub(crate) batches: u64,
    pub(crate) operations: u64,
}

impl Coalescer {
    pub(crate) fn new(client: Client, script: &'static Script, what: &'static str) -> Arc<Self> {
        Arc::new(Self {
            client,
            script,
            what,
            state: Mutex::new(State::default()),
            batches: AtomicU64::new(0),
            operations: AtomicU64::new(0),
        })
    }

    /// The script its calls run.
    pub(crate) fn script(&self) -> &'static Script {
        self.script
    }

    /// The command's name in errors and logs, e.g. `EVALSHA session_rotate`.
    pub(crate) fn what(&self) -> &'static str {
        self.what
    }

    pub(crate) fn stats(&self) -> Coalesced {
        Coalesced {
            batches: self.batches.load(Ordering::Relaxed),
            operations: self.operations.load(Ordering::Relaxed),
        }
    }

    /// Runs the script for one operation on `key` with its two arguments, alone or with
    /// others', and returns its reply.
    pub(crate) async fn run(
        self: &Arc<Self>,
        key: String,
        first: &str,
        second: Vec<u8>,
    ) -> Result<Value> {
        if !self.coalesces() {
            return self.send_one(&key, first, &second).await;
        }
        let (reply, answer) = oneshot::channel();
        let (key, second, start) = {
            let mut state = self.lock();
            if state.waiting.is_empty() && state.may_send() {
                state.in_flight += 1;
                state.ops_in_flight += 1;
                (key, second, None)
            } else {
                state.waiting.push(Op {
                    key,
                    first: first.to_owned(),
                    second,
                    until: Instant::now() + self.client.config().command_timeout,
                    reply,
                });
                let start = state.may_send() && !std::mem::replace(&mut state.scheduled, true);
                (String::new(), Vec::new(), Some(start))
            }
        };
        let Some(start) = start else {
            // Sent at once: `Client::run` bounds the call by the command deadline.
            let _done = Done(self, 1);
            return self.send_one(&key, first, &second).await;
        };
        if start {
            tokio::spawn(self.clone().flush());
        }
        // No timer here: the call that takes this operation answers it by its deadline (see the
        // module's docs), and one is always coming (`finished`, `Scheduled`).
        answer.await.unwrap_or_else(|_| {
            let failed = Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the {} call for this operation was dropped before it answered (its \
                     runtime shut down); the outcome is unknown",
                    self.what
                ),
            );
            // The caller's own failure, counted as such: a call counts once for itself
            // whenever it ends, and not per operation.
            self.client.count_failure(&failed);
            Err(failed)
        })
    }

    fn coalesces(&self) -> bool {
        self.client.config().auto_pipeline && self.client.backend() != BackendKind::Cluster
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn send_one(&self, key: &str, first: &str, second: &[u8]) -> Result<Value> {
        let script = self.script;
        self.client
            .run(self.what, |mut c| async move {
                script
                    .key(key)
                    .arg(first)
                    .arg(second)
                    .invoke_async(&mut c)
                    .await
            })
            .await
    }

    /// Takes up to [`MAX_OPS`] waiting operations and sends them as one call. (Boxed: a flush
    /// may start the next one.)
    fn flush(self: Arc<Self>) -> futures_util::future::BoxFuture<'static, ()> {
        Box::pin(self.flush_now())
    }

    async fn flush_now(self: Arc<Self>) {
        let mut scheduled = Scheduled {
            coalescer: &self,
            taken: false,
        };
        // Callers that are ready to queue do so meanwhile.
        tokio::task::yield_now().await;
        let mut passed = Vec::new();
        let ops: Vec<Op> = {
            let mut state = self.lock();
            state.scheduled = false;
            scheduled.taken = true;
            // A caller that gave up, or whose deadline passed, is left out (see the module's
            // docs); the latter is answered below, out of the lock.
            state.waiting.retain(|op| !op.reply.is_closed());
            let now = Instant::now();
            passed.extend(state.waiting.extract_if(.., |op| op.until <= now));
            if state.waiting.is_empty() {
                drop(state);
                for op in passed {
                    self.time_out(op.reply);
                }
                return;
            }
            let n = state.waiting.len().min(MAX_OPS);
            state.in_flight += 1;
            state.ops_in_flight += n;
            let ops: Vec<Op> = state.waiting.drain(..n).collect();
            // More than this call carries, and another may go: it goes now.
            if !state.waiting.is_empty() && state.may_send() {
                state.scheduled = true;
                tokio::spawn(self.clone().flush());
            }
            ops
        };
        let _done = Done(&self, ops.len());
        for op in passed {
            self.time_out(op.reply);
        }
        let ops = match <[Op; 1]>::try_from(ops) {
            // Alone: the script's own reply, as for a call sent at once.
            Ok([op]) => {
                let mut waiter = [Waiter {
                    until: op.until,
                    reply: Some(op.reply),
                }];
                let call = self.send_one(&op.key, &op.first, &op.second);
                if let Some(result) = self.within_deadlines(call, &mut waiter).await
                    && let Some(reply) = waiter[0].reply.take()
                {
                    let _ = reply.send(result);
                }
                return;
            }
            Err(ops) => ops,
        };
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.operations
            .fetch_add(ops.len() as u64, Ordering::Relaxed);
        let mut call = self.script.keys(ops.iter().map(|op| op.key.as_str()));
        for op in &ops {
            call = call.arg(&op.first).arg(&op.second[..]);
        }
        let mut waiters: Vec<Waiter> = ops
            .into_iter()
            .map(|op| Waiter {
                until: op.until,
                reply: Some(op.reply),
            })
            .collect();
        let call = &call;
        let result = self.client.run(
            self.what,
            |mut c| async move { call.invoke_value(&mut c).await },
        );
        // Every caller's deadline passed: the reply, when it comes, is dropped.
        let Some(result) = self.within_deadlines(result, &mut waiters).await else {
            return;
        };
        match result {
            Ok(Value::Array(values)) if values.len() == waiters.len() => {
                // The passed callers' replies are skipped: each reply is its own operation's.
                for (waiter, value) in waiters.iter_mut().zip(values) {
                    let Some(reply) = waiter.reply.take() else {
                        continue;
                    };
                    let _ = reply.send(match value {
                        Value::ServerError(err) => Err(Error::from(redis::RedisError::from(err))),
                        value => Ok(value),
                    });
                }
            }
            Ok(_) => {
                for reply in waiters.iter_mut().filter_map(|w| w.reply.take()) {
                    let _ = reply.send(Err(Error::new(
                        ErrorKind::Backend,
                        format!("unexpected reply from a coalesced {}", self.what),
                    )));
                }
            }
            Err(err) => {
                for reply in waiters.iter_mut().filter_map(|w| w.reply.take()) {
                    let _ = reply.send(Err(err.duplicate()));
                }
            }
        }
    }

    /// Waits for `call` until the earliest deadline of the `waiters` not yet answered, answers
    /// those whose deadlines passed with their timeout, and waits again until the next; `None`
    /// once every one was answered. One timer at a time for the whole call.
    async fn within_deadlines<T>(
        &self,
        call: impl std::future::Future<Output = T>,
        waiters: &mut [Waiter],
    ) -> Option<T> {
        crate::batch::within_deadlines(
            call,
            waiters,
            |w| w.reply.is_some().then_some(w.until),
            |w| {
                if let Some(reply) = w.reply.take() {
                    self.time_out(reply);
                }
            },
        )
        .await
    }

    /// Answers a caller whose deadline passed with its timeout, counted as the call's own
    /// timeout would be: an operator sees every timeout a caller saw. A caller that already
    /// gave up is not counted.
    fn time_out(&self, reply: oneshot::Sender<Result<Value>>) {
        if reply.is_closed() {
            return;
        }
        let err = Error::timeout(self.what, self.client.config().command_timeout);
        self.client.count_failure(&err);
        let _ = reply.send(Err(err));
    }

    /// One call in flight fewer; starts a flush for the callers waiting, if none is coming.
    fn finished(self: &Arc<Self>, ops: usize) {
        let start = {
            let mut state = self.lock();
            state.in_flight -= 1;
            state.ops_in_flight -= ops;
            !state.waiting.is_empty() && !std::mem::replace(&mut state.scheduled, true)
        };
        if start {
            match tokio::runtime::Handle::try_current() {
                Ok(runtime) => drop(runtime.spawn(self.clone().flush())),
                // No runtime to run it (this ran as the runtime went).
                Err(_) => self.no_flush_coming(),
            }
        }
    }

    /// The flush that was to take the queue will not run (its runtime went). A call still in
    /// flight starts another when it ends; with none, nothing would, and the callers queued,
    /// who have no timers of their own, are told now: their operations are dropped unsent, and
    /// each caller gets its "dropped" error.
    fn no_flush_coming(&self) {
        let stranded = {
            let mut state = self.lock();
            state.scheduled = false;
            if state.in_flight > 0 {
                return;
            }
            std::mem::take(&mut state.waiting)
        };
        drop(stranded);
    }
}

/// A call in flight and the operations it carries, until it returns or is dropped.
struct Done<'a>(&'a Arc<Coalescer>, usize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.finished(self.1);
    }
}

/// A flush task until it takes the queue. Dropped before that (its runtime shutting down), it
/// tells the queue that no flush is coming ([`Coalescer::no_flush_coming`]): nothing waits for
/// a flush that will never run.
struct Scheduled<'a> {
    coalescer: &'a Arc<Coalescer>,
    taken: bool,
}

impl Drop for Scheduled<'_> {
    fn drop(&mut self) {
        if !self.taken {
            self.coalescer.no_flush_coming();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(in_flight: usize, ops_in_flight: usize, waiting: usize) -> State {
        let waiting = (0..waiting)
            .map(|i| Op {
                key: format!("k{i}"),
                first: String::new(),
                second: Vec::new(),
                until: Instant::now(),
                reply: oneshot::channel().0,
            })
            .collect();
        State {
            waiting,
            in_flight,
            ops_in_flight,
            scheduled: false,
        }
    }

    /// Up to two calls go whatever they carry; more only while those in flight are small or
    /// the queue fills a call; never more than four.
    #[test]
    fn another_call_goes_while_the_server_has_room() {
        // (calls in flight, operations they carry, operations waiting) -> may another go?
        let cases = [
            ((0, 0, 1), true),
            ((1, 32, 1), true),
            ((2, 2, 1), true),
            ((3, 3, 5), true),
            ((3, 23, 5), true),
            // Two or three calls of 8 operations or more on average: the next waits...
            ((2, 16, 1), false),
            ((2, 40, 31), false),
            ((3, 24, 10), false),
            // ...unless the queue fills a whole call.
            ((2, 40, MAX_OPS), true),
            ((3, 90, MAX_OPS + 5), true),
            // Never more than IN_FLIGHT.
            ((4, 4, MAX_OPS), false),
            ((4, 100, 100), false),
        ];
        for ((in_flight, ops, waiting), expected) in cases {
            assert_eq!(
                state(in_flight, ops, waiting).may_send(),
                expected,
                "{in_flight} calls in flight carrying {ops}, {waiting} waiting"
            );
        }
    }
}
