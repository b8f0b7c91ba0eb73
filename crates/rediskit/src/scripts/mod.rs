//! Server-side Lua scripts. Each is sent once, then run by SHA (`EVALSHA`); after a Redis
//! restart forgets it (`NOSCRIPT`), the call loads it again and retries, transparently, in one
//! more round trip.
//!
//! Every script's keys are passed as `KEYS`, never built inside the script, so the same script
//! runs unchanged on Redis Cluster when its keys share a hash tag.

use std::sync::LazyLock;

/// A script, run by SHA. Unlike `redis::Script::key(..).arg(..)`, which keeps every argument
/// in a `Vec` of its own and copies them all into the command, a call writes its arguments
/// straight into one pre-sized `EVALSHA` command: on a session rotation that was ~1,800
/// instructions and ~20 allocations (callgrind) of the caller's side.
pub(crate) struct Script {
    script: redis::Script,
    /// The source, for the `SCRIPT LOAD` after `NOSCRIPT`.
    code: &'static str,
}

impl Script {
    fn new(code: &'static str) -> Self {
        Self {
            script: redis::Script::new(code),
            code,
        }
    }

    /// The `redis` crate's script, for `SCRIPT LOAD`.
    pub(crate) fn redis(&self) -> &redis::Script {
        &self.script
    }

    /// A call with one key (every rediskit script but `set_many.lua` has exactly one).
    pub(crate) fn key(&'static self, key: &str) -> Call {
        let mut cmd = redis::Cmd::with_capacity(12, 96 + key.len());
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(1)
            .arg(key);
        Call { script: self, cmd }
    }

    /// A call with `keys` (on a cluster they must share a slot).
    pub(crate) fn keys<'a>(&'static self, keys: impl ExactSizeIterator<Item = &'a str>) -> Call {
        let mut cmd = redis::Cmd::with_capacity(4 + 2 * keys.len(), 96);
        cmd.arg("EVALSHA")
            .arg(self.script.get_hash())
            .arg(keys.len());
        for key in keys {
            cmd.arg(key);
        }
        Call { script: self, cmd }
    }
}

/// One `EVALSHA`, built argument by argument.
pub(crate) struct Call {
    script: &'static Script,
    cmd: redis::Cmd,
}

impl Call {
    pub(crate) fn arg<T: redis::ToRedisArgs>(mut self, arg: T) -> Self {
        self.cmd.arg(arg);
        self
    }

    /// Runs it; after `NOSCRIPT` (Redis restarted, or `SCRIPT FLUSH`) loads the script and
    /// runs it once more, both in one round trip: `SCRIPT LOAD` and the `EVALSHA` go as one
    /// pipeline (on a Cluster, to the node of the call's key, where the load is needed). Two
    /// round trips in all, where loading first and then running took three: under one command
    /// deadline, on a slow link, that decided whether the first call after a restart succeeded.
    pub(crate) async fn invoke_async<T: redis::FromRedisValue>(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<T> {
        Ok(redis::from_redis_value(
            self.invoke_value(conn).await?.extract_error()?,
        )?)
    }

    /// Runs it as [`invoke_async`](Call::invoke_async) does, and returns the reply as it came:
    /// an error reply is an error, but errors nested in an array stay in place (each operation
    /// of a coalesced call answers for itself).
    pub(crate) async fn invoke_value(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
    ) -> redis::RedisResult<redis::Value> {
        match conn
            .req_packed_command(&self.cmd)
            .await
            .and_then(error_reply)
        {
            Err(err)
                if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
            {
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(self.script.code);
                let mut pipeline = redis::pipe();
                pipeline.add_command(load).add_command(self.cmd.clone());
                let mut replies = conn.req_packed_commands(&pipeline, 0, 2).await?.into_iter();
                // A refused load (an ACL without `script|load`) is what went wrong, not the
                // EVALSHA's NOSCRIPT that follows from it.
                if let Some(redis::Value::ServerError(err)) = replies.next() {
                    return Err(err.into());
                }
                replies
                    .next()
                    .ok_or_else(|| {
                        redis::RedisError::from((
                            redis::ErrorKind::Client,
                            "no reply to EVALSHA after SCRIPT LOAD",
                        ))
                    })
                    .and_then(error_reply)
            }
            result => result,
        }
    }

    /// Runs it, then `WAIT replicas timeout_ms`, in one pipeline: one write on one connection.
    /// `WAIT` counts the replicas that have every write made *on its own connection*, so the
    /// script's writes must be made on that one (a pool deals consecutive calls to different
    /// connections, and there `WAIT` would vouch for another connection's older writes). Returns
    /// the script's reply and how many replicas acknowledged.
    ///
    /// The pipeline starts with `SCRIPT LOAD`, so it never meets `NOSCRIPT`: retrying after one
    /// would run a second `WAIT`, and the first, with nothing of its own to wait for, could
    /// still wait out its whole timeout for the connection's older writes. The load costs a few
    /// KiB and a SHA-1 per call, on a path (a logout that waits for replicas) that waits for a
    /// replica's round trip anyway.
    pub(crate) async fn invoke_then_wait<T: redis::FromRedisValue>(
        &self,
        conn: &mut impl redis::aio::ConnectionLike,
        replicas: u32,
        timeout_ms: u64,
    ) -> redis::RedisResult<(T, u32)> {
        let mut load = redis::cmd("SCRIPT");
        load.arg("LOAD").arg(self.script.code);
        let mut wait = redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout_ms);
        let mut pipeline = redis::pipe();
        pipeline
            .add_command(load)
            .add_command(self.cmd.clone())
            .add_command(wait);
        let mut replies = conn.req_packed_commands(&pipeline, 0, 3).await?.into_iter();
        let (Some(loaded), Some(reply), Some(acknowledged)) =
            (replies.next(), replies.next(), replies.next())
        else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "no reply to SCRIPT LOAD, EVALSHA and WAIT",
            )));
        };
        // A refused load (an ACL without `script|load`) is what went wrong, not what follows.
        error_reply(loaded)?;
        let reply = redis::from_redis_value(error_reply(reply)?)?;
        let acknowledged = redis::from_redis_value(error_reply(acknowledged)?)?;
        Ok((reply, acknowledged))
    }
}

/// A reply that is an error reply, as an error.
fn error_reply(value: redis::Value) -> redis::RedisResult<redis::Value> {
    match value {
        redis::Value::ServerError(err) => Err(err.into()),
        value => Ok(value),
    }
}

/// `del_if_equals.lua`: delete a key only if it still holds the given bytes.
pub(crate) static DEL_IF_EQUALS: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("del_if_equals.lua")));

/// `get_with_pttl.lua`: a value and its remaining time to live, in one round trip.
pub(crate) static GET_WITH_PTTL: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("get_with_pttl.lua")));

/// The session scripts, each with `each.lua` (one operation per key, several per call) and the
/// shared prelude prepended.
macro_rules! session_script {
    ($name:ident, $file:literal) => {
        pub(crate) static $name: LazyLock<Script> = LazyLock::new(|| {
            Script::new(concat!(
                include_str!("each.lua"),
                "\n",
                include_str!("session_prelude.lua"),
                "\n",
                include_str!($file)
            ))
        });
    };
}

session_script!(SESSION_CREATE, "session_create.lua");
session_script!(SESSION_ROTATE, "session_rotate.lua");
session_script!(SESSION_REVOKE, "session_revoke.lua");
session_script!(SESSION_REVOKE_ALL, "session_revoke_all.lua");

/// `set_many.lua`: several keys written with one TTL, atomically.
pub(crate) static SET_MANY: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("set_many.lua")));

/// `gcra.lua`: rate-limit decisions, one per key (with `each.lua` prepended).
pub(crate) static GCRA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(concat!(
        include_str!("each.lua"),
        "\n",
        include_str!("gcra.lua")
    ))
});

/// Every script, for [`Client::load_scripts`](crate::Client::load_scripts).
pub(crate) fn all() -> [&'static Script; 8] {
    [
        &DEL_IF_EQUALS,
        &GET_WITH_PTTL,
        &SET_MANY,
        &SESSION_CREATE,
        &SESSION_ROTATE,
        &SESSION_REVOKE,
        &SESSION_REVOKE_ALL,
        &GCRA,
    ]
}
