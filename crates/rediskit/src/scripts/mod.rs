//! Server-side Lua scripts. Each is sent once, then run by SHA (`EVALSHA`); after a Redis
//! restart forgets it (`NOSCRIPT`), the redis crate loads it again and retries, transparently.
//!
//! Every script's keys are passed as `KEYS`, never built inside the script, so the same script
//! runs unchanged on Redis Cluster when its keys share a hash tag.

use std::sync::LazyLock;

/// `del_if_equals.lua`: delete a key only if it still holds the given bytes.
pub(crate) static DEL_IF_EQUALS: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("del_if_equals.lua")));

/// `get_with_pttl.lua`: a value and its remaining time to live, in one round trip.
pub(crate) static GET_WITH_PTTL: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("get_with_pttl.lua")));

/// The session scripts, each with the shared prelude prepended.
macro_rules! session_script {
    ($name:ident, $file:literal) => {
        pub(crate) static $name: LazyLock<redis::Script> = LazyLock::new(|| {
            redis::Script::new(concat!(
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

/// `gcra.lua`: one rate-limit decision.
pub(crate) static GCRA: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("gcra.lua")));

/// Every script, for [`Client::load_scripts`](crate::Client::load_scripts).
pub(crate) fn all() -> [&'static redis::Script; 7] {
    [
        &DEL_IF_EQUALS,
        &GET_WITH_PTTL,
        &SESSION_CREATE,
        &SESSION_ROTATE,
        &SESSION_REVOKE,
        &SESSION_REVOKE_ALL,
        &GCRA,
    ]
}
