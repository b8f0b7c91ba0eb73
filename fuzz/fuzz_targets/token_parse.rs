//! Fuzzes the refresh-token parser (`tokens.rs`) with arbitrary text, as if sent by a client,
//! and the session-record decoder with the same bytes, as if read from Redis.
//! Run: `cargo fuzz run token_parse` from the repository root (see docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        rediskit::fuzzing::token_parse(text);
    }
    rediskit::fuzzing::record_decode(data);
});
