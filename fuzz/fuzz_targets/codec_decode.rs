//! Fuzzes the stored-value decoder (`codec.rs`) with arbitrary bytes, as if read from Redis.
//! Run: `cargo fuzz run codec_decode` from the repository root (see docs/fuzzing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    rediskit::fuzzing::codec_decode(data);
});
