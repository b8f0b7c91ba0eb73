//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`; not a public API and
//! not covered by semver).
//!
//! Each function runs one parser of outside data on the fuzzer's input and panics when an
//! invariant breaks, which the fuzzer reports as a crash. The same invariants are property tests
//! in `proptests.rs`; these let a coverage-guided fuzzer look for the inputs proptest would not
//! think of. See `docs/fuzzing.md`.

use serde_json::Value;

use crate::codec::{Codec, DecodeError};
use crate::error::ErrorKind;
use crate::tokens::{MAX_USER_ID_LEN, RAND_LEN, Record, SID_LEN, TokenKeys, TokenParts};

const MAGIC: u8 = 0xF5;

/// Decodes `bytes` as a stored value with the default codec and with small limits.
///
/// Panics if the decoder panics, if bytes without our header decode, if a size refusal names a
/// size within the limit, if the payload and a typed decode disagree about the header, or if a
/// decoded value does not survive re-encoding (it must decode as its own JSON does).
pub fn codec_decode(bytes: &[u8]) {
    let small = Codec {
        compression_threshold: 32,
        max_value_size: 1 << 16,
    };
    for codec in [Codec::default(), small] {
        match codec.decode::<Value>(bytes) {
            Ok(value) => {
                assert!(
                    matches!(bytes, [MAGIC, 1, 0x01 | 0x11, ..]),
                    "bytes without our header decoded"
                );
                round_trip(&codec, &value);
            }
            Err(DecodeError::TooLarge(size)) => assert!(size > codec.max_value_size),
            Err(DecodeError::Foreign) => assert_ne!(bytes.first(), Some(&MAGIC)),
            Err(_) => {}
        }
        let typed = codec.decode::<String>(bytes);
        assert_eq!(
            codec.payload(bytes).is_ok(),
            typed.is_ok() || matches!(typed, Err(DecodeError::Type(_))),
            "the payload and a typed decode disagree about the header"
        );
    }
}

/// Re-encodes a decoded value and checks it decodes to what its JSON parses to. (Not to `value`
/// itself: serde_json parses floats best-effort, so text → f64 → text → f64 may move one ulp.)
fn round_trip(codec: &Codec, value: &Value) {
    let json = serde_json::to_vec(value).unwrap_or_default();
    let Ok(again) = codec.encode(value) else {
        // Re-serializing may lengthen the JSON ("1E2" → "100.0") past the size limit.
        assert!(
            json.len() > codec.max_value_size,
            "a decoded value does not re-encode"
        );
        return;
    };
    let via_json = serde_json::from_slice::<Value>(&json).ok();
    assert_eq!(codec.decode::<Value>(&again).ok(), via_json);
}

/// Parses `text` as a refresh token, and uses it as a user id for a token of our own.
///
/// Panics if the parser panics, if it fails with any kind but `InvalidInput` or `NotFound`, if
/// a text that parses is not exactly the token its parts encode to, if a token made for a valid
/// user id does not round-trip, or if that token moved to another user id parses.
pub fn token_parse(text: &str) {
    let keys = TokenKeys::derive(b"rediskit fuzzing: a secret of at least 32 bytes");
    match keys.decode(text) {
        Ok(parts) => assert_eq!(keys.encode(&parts).expose(), text, "a forged token parsed"),
        Err(err) => assert!(
            matches!(err.kind(), ErrorKind::InvalidInput | ErrorKind::NotFound),
            "unexpected error kind {:?}",
            err.kind()
        ),
    }

    let valid_user =
        !text.is_empty() && text.len() <= MAX_USER_ID_LEN && !text.chars().any(char::is_control);
    if !valid_user {
        return;
    }
    let len = text.len() as u8;
    let parts = TokenParts {
        user: text.to_owned(),
        sid: [len; SID_LEN],
        generation: u32::from(len),
        expires: u32::MAX - u32::from(len),
        random: [len.wrapping_mul(7); RAND_LEN],
    };
    let token = keys.encode(&parts).into_string();
    let back = match keys.decode(&token) {
        Ok(back) => back,
        Err(err) => panic!("a token for {text:?} does not parse: {err}"),
    };
    assert!(
        back.user == parts.user
            && back.sid == parts.sid
            && back.generation == parts.generation
            && back.expires == parts.expires
            && back.random == parts.random,
        "a token for {text:?} does not round-trip"
    );
    if let Some((_, body)) = token.split_once('.') {
        use base64::Engine as _;
        let other = format!("{text}x");
        let moved = format!(
            "{}.{body}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(other.as_bytes())
        );
        assert!(
            keys.decode(&moved).is_err(),
            "a token moved to {other:?} parsed"
        );
    }
}

/// Decodes `bytes` as a stored session record.
///
/// Panics if the decoder panics or if a record that decodes does not re-encode to exactly
/// `bytes`.
pub fn record_decode(bytes: &[u8]) {
    if let Some(record) = Record::decode(bytes) {
        assert_eq!(
            record.encode(),
            bytes,
            "a record decoded from bytes it does not encode to"
        );
    }
}
