//! Server-side Lua scripts. Each is sent once, then run by SHA (`EVALSHA`); after a Redis
//! restart forgets it (`NOSCRIPT`), the redis crate loads it again and retries, transparently.
//!
//! Every script's keys are passed as `KEYS`, never built inside the script, so the same script
//! runs unchanged on Redis Cluster when its keys share a hash tag.

use std::sync::LazyLock;

/// `del_if_equals.lua`: delete a key only if it still holds the given bytes.
pub(crate) static DEL_IF_EQUALS: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("del_if_equals.lua")));
