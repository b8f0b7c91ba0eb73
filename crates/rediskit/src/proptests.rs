//! Property tests of everything that parses data from outside: the value codec (bytes from
//! Redis), refresh tokens and session records (text from clients, bytes from Redis), and key
//! checking and escaping (keys, user ids and patterns from callers).
//!
//! Each property states what must hold for *any* input: a clear error or a correct result,
//! never a panic and never another user's data. The inputs lean on the characters that mean
//! something to Redis (`*?[]\{}:%`), control characters, non-ASCII text and lengths around the
//! limits. Case counts are modest so that `cargo test` stays quick; failures are not persisted to
//! files (the shrunk input is in the failure message — add it to a unit test).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::codec::{Codec, DEFAULT_COMPRESSION_THRESHOLD, DEFAULT_MAX_VALUE_SIZE, DecodeError};
use crate::error::ErrorKind;
use crate::keys::{
    MAX_KEY_LEN, MAX_NAME_LEN, check_key, check_namespace, check_prefix, escape_component,
    glob_escape,
};
use crate::memory::glob_match;
use crate::tokens::{
    HASH_LEN, MAX_DEVICE_LEN, MAX_USER_ID_LEN, RAND_LEN, Record, SID_LEN, TokenKeys, TokenParts,
};

const MAGIC: u8 = 0xF5;
const VERSION: u8 = 1;
const PLAIN_JSON: u8 = 0x01;
const LZ4_JSON: u8 = 0x11;

/// `cases` cases (or `PROPTEST_CASES`, for a long run), no regression files written into the
/// source tree.
fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Input generators
// ---------------------------------------------------------------------------------------------

/// Characters that mean something to Redis, JSON, our escaping or terminals.
const NASTY: &[char] = &[
    '*', '?', '[', ']', '^', '-', '\\', '{', '}', ':', '%', '.', '"', '/', ' ', '\n', '\r', '\t',
    '\0', '\u{7f}', '\u{85}', '\u{202e}', '\u{fffd}', 'é', '🦀', 'a', 'Z', '0', '7', 'B', 'D',
];

/// Mostly the nasty characters, sometimes any `char` at all.
fn nasty_char() -> impl Strategy<Value = char> {
    prop_oneof![3 => select(NASTY), 1 => any::<char>()]
}

fn nasty_string(len: std::ops::Range<usize>) -> BoxedStrategy<String> {
    vec(nasty_char(), len)
        .prop_map(|chars| chars.into_iter().collect())
        .boxed()
}

/// A user id as `check_user` accepts it: 1..=128 bytes, no control characters, but otherwise
/// anything (`{}:*?[]%`, non-ASCII).
fn user_id() -> impl Strategy<Value = String> {
    // Mapped rather than filtered: a filter rejects too often for long runs. U+2028 (LINE
    // SEPARATOR) is not a control character but breaks lines in some viewers.
    let non_control = nasty_char().prop_map(|c| if c.is_control() { '\u{2028}' } else { c });
    vec(non_control, 1..=MAX_USER_ID_LEN).prop_map(|chars| {
        let mut user = String::new();
        for c in chars {
            if user.len() + c.len_utf8() > MAX_USER_ID_LEN {
                break;
            }
            user.push(c);
        }
        user
    })
}

/// JSON values with every kind of node. Floats are dyadic with few digits so that they
/// round-trip exactly through any JSON parser (serde_json parses best-effort by default).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (any::<i32>(), 0u32..5).prop_map(|(m, e)| Value::from(f64::from(m) / f64::from(1 << e))),
        nasty_string(0..24).prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 96, 8, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::btree_map(nasty_string(0..12), inner, 0..8)
                .prop_map(|map| Value::Object(map.into_iter().collect())),
        ]
    })
}

fn header(flags: u8) -> Vec<u8> {
    vec![MAGIC, VERSION, flags]
}

/// Bytes that get past the first checks of the decoder: our magic and version, then random or
/// plausible flags, lengths and payloads (valid JSON, lz4 of JSON with a wrong length, a
/// truncated or damaged block, random bytes).
fn crafted_value_bytes() -> impl Strategy<Value = Vec<u8>> {
    let flags = prop_oneof![Just(PLAIN_JSON), Just(LZ4_JSON), any::<u8>()];
    let payload = prop_oneof![
        vec(any::<u8>(), 0..128),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ];
    let plain = (flags, payload).prop_map(|(flags, payload)| [header(flags), payload].concat());

    // A real lz4 block of JSON, then possibly a wrong length, a cut or a flipped byte.
    let compressed = (
        json_value(),
        prop_oneof![3 => Just(0i64), 1 => -3i64..=3],
        any::<Option<(prop::sample::Index, u8)>>(),
        any::<Option<prop::sample::Index>>(),
    )
        .prop_map(|(value, delta, flip, cut)| {
            let json = serde_json::to_vec(&value).unwrap();
            let mut block = lz4_flex::block::compress(&json);
            if let Some((at, mask)) = flip
                && !block.is_empty()
            {
                let i = at.index(block.len());
                block[i] ^= mask.max(1);
            }
            if let Some(at) = cut {
                block.truncate(at.index(block.len() + 1));
            }
            let length = u32::try_from((json.len() as i64 + delta).max(0)).unwrap();
            [header(LZ4_JSON), length.to_le_bytes().to_vec(), block].concat()
        });

    // A compressed header with any length claim and a random block.
    let any_length = (any::<u32>(), vec(any::<u8>(), 0..64)).prop_map(|(length, block)| {
        [header(LZ4_JSON), length.to_le_bytes().to_vec(), block].concat()
    });

    // Too short to hold the header or the length.
    let short = vec(any::<u8>(), 0..7).prop_map(|tail| [vec![MAGIC], tail].concat());

    prop_oneof![plain, compressed, any_length, short]
}

// ---------------------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------------------

/// What decoding `bytes` must give, written from the format description in `codec.rs` rather
/// than from the code.
fn expected_decode(codec: &Codec, bytes: &[u8]) -> Result<Value, DecodeError> {
    let Some((&magic, rest)) = bytes.split_first() else {
        return Err(DecodeError::Foreign);
    };
    if magic != MAGIC {
        return Err(DecodeError::Foreign);
    }
    if bytes.len() < 3 {
        return Err(DecodeError::Corrupt("shorter than the header"));
    }
    if rest[0] != VERSION {
        return Err(DecodeError::Version(rest[0]));
    }
    let flags = rest[1];
    let payload = &rest[2..];
    let json = match flags {
        PLAIN_JSON => payload.to_vec(),
        LZ4_JSON => {
            if payload.len() < 4 {
                return Err(DecodeError::Corrupt("compressed value without its length"));
            }
            let length = u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize;
            if length > codec.max_value_size {
                return Err(DecodeError::TooLarge(length));
            }
            // lz4 expands at most ~255 times: a larger claim is refused before allocating.
            if length > (payload.len() - 4) * 255 + 16 {
                return Err(DecodeError::Corrupt(
                    "claimed length beyond lz4's expansion limit",
                ));
            }
            match lz4_flex::block::decompress(&payload[4..], length) {
                Ok(json) if json.len() == length => json,
                _ => return Err(DecodeError::Corrupt("lz4")),
            }
        }
        _ => return Err(DecodeError::Flags(flags)),
    };
    serde_json::from_slice(&json).map_err(|err| DecodeError::Type(err.to_string()))
}

/// Same outcome: equal values, or errors of the same kind (with the same number for the kinds
/// that carry one; messages may differ).
fn same_outcome(
    actual: &Result<Value, DecodeError>,
    expected: &Result<Value, DecodeError>,
) -> bool {
    use DecodeError::*;
    match (actual, expected) {
        (Ok(a), Ok(b)) => a == b,
        (Err(Version(a)), Err(Version(b))) => a == b,
        (Err(Flags(a)), Err(Flags(b))) => a == b,
        (Err(TooLarge(a)), Err(TooLarge(b))) => a == b,
        (Err(a), Err(b)) => std::mem::discriminant(a) == std::mem::discriminant(b),
        _ => false,
    }
}

/// Codecs with the default settings and with small limits, so both limits are reached.
fn codecs() -> [Codec; 2] {
    [
        Codec::default(),
        Codec {
            compression_threshold: 32,
            max_value_size: 2048,
        },
    ]
}

/// A value of one shape, to decode as every other shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Sample {
    id: u64,
    name: String,
}

#[derive(Debug, Clone)]
enum Shape {
    Text(String),
    Number(u64),
    Flag(bool),
    List(Vec<u32>),
    Record(Sample),
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        prop_oneof![nasty_string(0..40), nasty_string(1000..1400)].prop_map(Shape::Text),
        any::<u64>().prop_map(Shape::Number),
        any::<bool>().prop_map(Shape::Flag),
        prop_oneof![vec(any::<u32>(), 0..8), vec(0u32..4, 300..600)].prop_map(Shape::List),
        (any::<u64>(), nasty_string(0..40))
            .prop_map(|(id, name)| Shape::Record(Sample { id, name })),
    ]
}

impl Shape {
    fn encode(&self, codec: &Codec) -> Vec<u8> {
        match self {
            Shape::Text(v) => codec.encode(v),
            Shape::Number(v) => codec.encode(v),
            Shape::Flag(v) => codec.encode(v),
            Shape::List(v) => codec.encode(v),
            Shape::Record(v) => codec.encode(v),
        }
        .unwrap()
    }

    fn index(&self) -> usize {
        match self {
            Shape::Text(_) => 0,
            Shape::Number(_) => 1,
            Shape::Flag(_) => 2,
            Shape::List(_) => 3,
            Shape::Record(_) => 4,
        }
    }
}

/// Decodes `bytes` as shape number `index`; `Ok` carries nothing, the value is checked elsewhere.
fn decode_as(codec: &Codec, bytes: &[u8], index: usize) -> Result<(), DecodeError> {
    match index {
        0 => codec.decode::<String>(bytes).map(drop),
        1 => codec.decode::<u64>(bytes).map(drop),
        2 => codec.decode::<bool>(bytes).map(drop),
        3 => codec.decode::<Vec<u32>>(bytes).map(drop),
        _ => codec.decode::<Sample>(bytes).map(drop),
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// Decoding arbitrary or crafted bytes never panics and gives exactly what the format allows:
    /// a value only for our header followed by JSON (plain, or lz4 of the declared length).
    #[test]
    fn codec_decode_of_any_bytes_follows_the_format(
        bytes in prop_oneof![vec(any::<u8>(), 0..4096), crafted_value_bytes()],
    ) {
        for codec in codecs() {
            let actual = codec.decode::<Value>(&bytes);
            let expected = expected_decode(&codec, &bytes);
            prop_assert!(
                same_outcome(&actual, &expected),
                "decode gave {actual:?}, the format says {expected:?}"
            );
            // The payload alone agrees with the full decode about whether the header is ours.
            prop_assert_eq!(
                codec.payload(&bytes).is_ok(),
                actual.is_ok() || matches!(actual, Err(DecodeError::Type(_)))
            );
        }
    }

    /// Any JSON value round-trips, compressed or not, and is never stored bigger than its JSON
    /// plus the header (and the length, when compressed).
    #[test]
    fn codec_round_trips_json_values(value in json_value()) {
        let json_len = serde_json::to_vec(&value).unwrap().len();
        for codec in [Codec::default(), Codec { compression_threshold: 0, ..Codec::default() }] {
            let bytes = codec.encode(&value).unwrap();
            prop_assert_eq!(&bytes[..2], &[MAGIC, VERSION]);
            prop_assert!(matches!(bytes[2], PLAIN_JSON | LZ4_JSON));
            prop_assert!(bytes.len() <= 3 + json_len, "{} > 3 + {json_len}", bytes.len());
            prop_assert_eq!(codec.decode::<Value>(&bytes).unwrap(), value.clone());
        }
    }

    /// Any string round-trips, including ones well over the 1 KiB compression threshold;
    /// only values over the threshold are compressed, and repetitive ones always are.
    #[test]
    fn codec_round_trips_strings(
        (text, repetitive) in prop_oneof![
            nasty_string(0..3000).prop_map(|text| (text, false)),
            (nasty_string(1..16), 100usize..400).prop_map(|(unit, n)| (unit.repeat(n), true)),
        ],
    ) {
        let codec = Codec::default();
        let json_len = serde_json::to_vec(&text).unwrap().len();
        let bytes = codec.encode(&text).unwrap();
        prop_assert_eq!(codec.decode::<String>(&bytes).unwrap(), text.clone());
        if bytes[2] == LZ4_JSON {
            prop_assert!(json_len > DEFAULT_COMPRESSION_THRESHOLD);
            prop_assert!(bytes.len() < json_len);
        }
        if json_len > DEFAULT_COMPRESSION_THRESHOLD && repetitive {
            prop_assert_eq!(bytes[2], LZ4_JSON, "a {}-byte repetitive value was not compressed", json_len);
        }
    }

    /// A value of one type decodes as itself, and as any incompatible type only to a `Type`
    /// error — never to a value of the other type.
    #[test]
    fn codec_never_decodes_one_type_as_another(value in shape()) {
        let small_threshold = Codec { compression_threshold: 32, ..Codec::default() };
        for codec in [Codec::default(), small_threshold] {
            let bytes = value.encode(&codec);
            for other in 0..5 {
                let outcome = decode_as(&codec, &bytes, other);
                if other == value.index() {
                    prop_assert!(outcome.is_ok(), "{value:?} as itself: {outcome:?}");
                } else {
                    prop_assert!(
                        matches!(outcome, Err(DecodeError::Type(_))),
                        "{value:?} decoded as shape {other}: {outcome:?}"
                    );
                }
            }
        }
    }

    /// A compressed header claiming more than the size limit is refused as `TooLarge` with the
    /// claimed size, whatever follows, before anything is decompressed (so before that much
    /// memory could be allocated: the check precedes the only allocation sized by the header).
    #[test]
    fn codec_refuses_huge_length_claims(
        over in 1u64..=u64::from(u32::MAX),
        block in vec(any::<u8>(), 0..64),
    ) {
        for codec in codecs() {
            let claimed = (codec.max_value_size as u64 + over).min(u64::from(u32::MAX));
            prop_assume!(claimed > codec.max_value_size as u64);
            let length = u32::try_from(claimed).unwrap();
            let bytes = [header(LZ4_JSON), length.to_le_bytes().to_vec(), block.clone()].concat();
            prop_assert_eq!(
                codec.decode::<Value>(&bytes),
                Err(DecodeError::TooLarge(length as usize))
            );
        }
        prop_assert!(DEFAULT_MAX_VALUE_SIZE < u32::MAX as usize);
    }
}

// ---------------------------------------------------------------------------------------------
// Refresh tokens and session records
// ---------------------------------------------------------------------------------------------

/// The fields of a token. `TokenParts` and `TokenKeys` hold secrets and deliberately have no
/// `Debug`, which proptest needs of its inputs, so tests draw their fields and build them.
type Fields = (String, [u8; SID_LEN], u32, u32, [u8; RAND_LEN]);

fn token_fields() -> impl Strategy<Value = Fields> {
    (
        user_id(),
        any::<[u8; SID_LEN]>(),
        any::<u32>(),
        any::<u32>(),
        any::<[u8; RAND_LEN]>(),
    )
}

fn parts((user, sid, generation, expires, random): Fields) -> TokenParts {
    TokenParts {
        user,
        sid,
        generation,
        expires,
        random,
    }
}

fn secret() -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 32..64)
}

fn same_parts(a: &TokenParts, b: &TokenParts) -> bool {
    (&a.user, a.sid, a.generation, a.expires, a.random)
        == (&b.user, b.sid, b.generation, b.expires, b.random)
}

/// Text that looks more or less like a token: right alphabet, a dot, plausible lengths, a
/// version byte of 1 — but no valid MAC.
fn token_like_text() -> impl Strategy<Value = String> {
    let forged = (
        vec(any::<u8>(), 0..200),
        vec(any::<u8>(), 0..90),
        any::<bool>(),
    )
        .prop_map(|(user, mut bin, version_one)| {
            if version_one && !bin.is_empty() {
                bin[0] = 1;
            }
            format!("{}.{}", B64.encode(user), B64.encode(bin))
        });
    prop_oneof![forged, "[A-Za-z0-9_-]{0,200}\\.[A-Za-z0-9_.=+/-]{0,200}",]
}

/// One edit of one character of a string.
#[derive(Debug, Clone)]
enum Edit {
    Replace(prop::sample::Index, char),
    Insert(prop::sample::Index, char),
    Delete(prop::sample::Index),
}

fn edit() -> impl Strategy<Value = Edit> {
    let c = prop_oneof![
        3 => select(&b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.="[..])
            .prop_map(char::from),
        1 => any::<char>(),
    ];
    prop_oneof![
        (any::<prop::sample::Index>(), c.clone()).prop_map(|(i, c)| Edit::Replace(i, c)),
        (any::<prop::sample::Index>(), c).prop_map(|(i, c)| Edit::Insert(i, c)),
        any::<prop::sample::Index>().prop_map(Edit::Delete),
    ]
}

impl Edit {
    fn apply(&self, text: &str) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        match *self {
            Edit::Replace(at, c) => {
                let i = at.index(chars.len());
                chars[i] = c;
            }
            Edit::Insert(at, c) => chars.insert(at.index(chars.len() + 1), c),
            Edit::Delete(at) => {
                chars.remove(at.index(chars.len()));
            }
        }
        chars.into_iter().collect()
    }
}

fn device() -> impl Strategy<Value = String> {
    nasty_string(0..MAX_DEVICE_LEN).prop_map(|text| {
        let mut device = String::new();
        for c in text.chars() {
            if device.len() + c.len_utf8() > MAX_DEVICE_LEN {
                break;
            }
            device.push(c);
        }
        device
    })
}

fn record() -> impl Strategy<Value = Record> {
    (
        any::<u32>(),
        any::<[u8; HASH_LEN]>(),
        any::<[u32; 4]>(),
        device(),
        vec(any::<u8>(), 0..1100),
    )
        .prop_map(
            |(generation, hash, [created, last_used, expires, rotated], device, metadata)| Record {
                generation,
                hash,
                created,
                last_used,
                expires,
                rotated,
                device,
                metadata,
            },
        )
}

proptest! {
    #![proptest_config(config(256))]

    /// Parsing any text as a token — unicode or ASCII, up to 2000 characters, dots anywhere, or
    /// token-shaped with a forged MAC — never panics and is refused as `InvalidInput`
    /// (malformed) or `NotFound` (well-formed, not ours).
    #[test]
    fn token_decode_of_any_text_is_refused(
        secret in secret(),
        text in prop_oneof![
            "(?s).{0,2000}",
            "[ -~]{0,2000}",
            "[a-zA-Z0-9.]{0,600}",
            token_like_text(),
        ],
    ) {
        let keys = TokenKeys::derive(&secret);
        let outcome = keys.decode(&text);
        let err = outcome.err().expect("no random text carries a valid MAC");
        prop_assert!(
            matches!(err.kind(), ErrorKind::InvalidInput | ErrorKind::NotFound),
            "{:?}",
            err.kind()
        );
    }

    /// A token round-trips for any user id (128 bytes of `{}:*?[]%`, non-ASCII, ...), session,
    /// generation and expiry; its text is URL-safe and short enough to be parsed.
    #[test]
    fn token_round_trips(secret in secret(), fields in token_fields()) {
        let (keys, parts) = (TokenKeys::derive(&secret), parts(fields));
        let token = keys.encode(&parts);
        let text = token.expose();
        prop_assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)));
        prop_assert!(text.len() <= 512);
        let back = keys.decode(text).unwrap();
        prop_assert!(same_parts(&back, &parts));
    }

    /// Any single-character change to a valid token (replace, insert or delete, any character)
    /// makes it fail: it never decodes, so never to another user's or session's token.
    #[test]
    fn token_with_one_character_changed_is_refused(
        secret in secret(),
        fields in token_fields(),
        edit in edit(),
    ) {
        let (keys, parts) = (TokenKeys::derive(&secret), parts(fields));
        let text = keys.encode(&parts).into_string();
        let edited = edit.apply(&text);
        prop_assume!(edited != text);
        let err = keys.decode(&edited).err().expect("an edited token must not decode");
        prop_assert!(matches!(err.kind(), ErrorKind::InvalidInput | ErrorKind::NotFound));
    }

    /// A token has one text: every other base64url character in the last two places of the user
    /// part and of the binary part — where base64 has spare bits — makes it fail.
    #[test]
    fn token_text_is_its_only_encoding(secret in secret(), fields in token_fields()) {
        let (keys, parts) = (TokenKeys::derive(&secret), parts(fields));
        let text = keys.encode(&parts).into_string();
        let dot = text.find('.').unwrap();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for at in [dot - 2, dot - 1, text.len() - 2, text.len() - 1] {
            for &c in alphabet.iter().filter(|&&c| c != text.as_bytes()[at]) {
                let mut edited = text.clone().into_bytes();
                edited[at] = c;
                let edited = String::from_utf8(edited).unwrap();
                prop_assert!(keys.decode(&edited).is_err(), "{edited} decoded");
            }
        }
    }

    /// Any single-bit change to the decoded bytes of a valid token (user part or binary part),
    /// re-encoded as valid base64, makes it fail.
    #[test]
    fn token_with_one_bit_changed_is_refused(
        secret in secret(),
        fields in token_fields(),
        in_user in any::<bool>(),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let (keys, parts) = (TokenKeys::derive(&secret), parts(fields));
        let text = keys.encode(&parts).into_string();
        let (user, bin) = text.split_once('.').unwrap();
        let (mut user, mut bin) = (B64.decode(user).unwrap(), B64.decode(bin).unwrap());
        let target = if in_user { &mut user } else { &mut bin };
        let i = at.index(target.len());
        target[i] ^= 1 << bit;
        let forged = format!("{}.{}", B64.encode(&user), B64.encode(&bin));
        let err = keys.decode(&forged).err().expect("a changed token must not decode");
        prop_assert!(matches!(err.kind(), ErrorKind::InvalidInput | ErrorKind::NotFound));
    }

    /// User A's token with its user part replaced by user B's is refused as `NotFound`: a token
    /// can't be moved to another account.
    #[test]
    fn token_moved_to_another_user_is_refused(
        secret in secret(),
        fields in token_fields(),
        other in user_id(),
    ) {
        let (keys, parts) = (TokenKeys::derive(&secret), parts(fields));
        prop_assume!(other != parts.user);
        let text = keys.encode(&parts).into_string();
        let (_, bin) = text.split_once('.').unwrap();
        let moved = format!("{}.{bin}", B64.encode(other.as_bytes()));
        prop_assert_eq!(keys.decode(&moved).err().unwrap().kind(), ErrorKind::NotFound);
    }

    /// A token made with one secret is refused (`NotFound`) by keys derived from another.
    #[test]
    fn token_from_another_secret_is_refused(
        a in vec(any::<u8>(), 32..48),
        b in vec(any::<u8>(), 32..48),
        fields in token_fields(),
    ) {
        prop_assume!(a != b);
        let parts = parts(fields);
        let text = TokenKeys::derive(&a).encode(&parts).into_string();
        prop_assert_eq!(TokenKeys::derive(&b).decode(&text).err().unwrap().kind(), ErrorKind::NotFound);
    }

    /// Decoding any bytes as a session record never panics, and whatever decodes re-encodes to
    /// exactly the same bytes (one encoding per record, nothing ignored).
    #[test]
    fn record_decode_of_any_bytes_is_exact(
        bytes in prop_oneof![
            vec(any::<u8>(), 0..300),
            (record(), any::<prop::sample::Index>(), any::<prop::sample::Index>(), any::<u8>())
                .prop_map(|(record, cut, at, mask)| {
                    let mut bytes = record.encode();
                    let i = at.index(bytes.len());
                    bytes[i] ^= mask;
                    bytes.truncate(cut.index(bytes.len() + 1));
                    bytes
                }),
        ],
    ) {
        if let Some(record) = Record::decode(&bytes) {
            prop_assert_eq!(record.encode(), bytes);
        }
    }

    /// Any session record (device up to its 128-byte limit, any metadata bytes) round-trips.
    #[test]
    fn record_round_trips(record in record()) {
        prop_assert_eq!(Record::decode(&record.encode()), Some(record));
    }
}

// ---------------------------------------------------------------------------------------------
// Keys, escaping and the glob matcher
// ---------------------------------------------------------------------------------------------

/// Reverses `escape_component`: `%XX` sequences back to bytes.
fn unescape_component(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Text over a tiny alphabet full of glob metacharacters, so that distinct strings often look
/// alike to a matcher.
fn glob_text(len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    vec(
        select(&['*', '?', '[', ']', '^', '-', '\\', 'a', 'b', ':', 'é'][..]),
        len,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// Short text over the characters of `escape_component`'s own escapes (`%7B` is `{`, ...), so
/// that a collision, if there were one, would be found.
fn escape_lookalike() -> impl Strategy<Value = String> {
    vec(
        select(
            &[
                '%', '7', 'B', 'D', '{', '}', '2', '5', '3', 'A', ':', '\n', '0', 'a',
            ][..],
        ),
        0..6,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// A well-formed glob pattern as parts, so a simple reference matcher can be written for it.
#[derive(Debug, Clone)]
enum Glob {
    Byte(u8),
    Escaped(u8),
    AnyOne,
    AnyRun,
    Class { negate: bool, items: Vec<ClassItem> },
}

#[derive(Debug, Clone)]
enum ClassItem {
    Byte(u8),
    Escaped(u8),
    Range(u8, u8),
}

/// Bytes that are plain inside a class (not `]`, `\`, `^` or `-`).
fn class_byte() -> impl Strategy<Value = u8> {
    prop_oneof![select(&b"abcxyz09*?[:"[..]), any::<u8>()]
        .prop_filter("plain in a class", |b| !b"]\\^-".contains(b))
}

fn glob_parts() -> impl Strategy<Value = Vec<Glob>> {
    let plain = prop_oneof![select(&b"ab:-]^"[..]), any::<u8>()]
        .prop_filter("plain outside a class", |b| !b"*?[\\".contains(b));
    let item = prop_oneof![
        class_byte().prop_map(ClassItem::Byte),
        any::<u8>().prop_map(ClassItem::Escaped),
        (class_byte(), class_byte()).prop_map(|(a, b)| ClassItem::Range(a, b)),
    ];
    let part = prop_oneof![
        4 => plain.prop_map(Glob::Byte),
        1 => any::<u8>().prop_map(Glob::Escaped),
        1 => Just(Glob::AnyOne),
        2 => Just(Glob::AnyRun),
        2 => (any::<bool>(), vec(item, 0..4)).prop_map(|(negate, items)| Glob::Class { negate, items }),
    ];
    vec(part, 0..10)
}

fn render(parts: &[Glob]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        match part {
            Glob::Byte(b) => out.push(*b),
            Glob::Escaped(b) => out.extend([b'\\', *b]),
            Glob::AnyOne => out.push(b'?'),
            Glob::AnyRun => out.push(b'*'),
            Glob::Class { negate, items } => {
                out.push(b'[');
                if *negate {
                    out.push(b'^');
                }
                for item in items {
                    match item {
                        ClassItem::Byte(b) => out.push(*b),
                        ClassItem::Escaped(b) => out.extend([b'\\', *b]),
                        ClassItem::Range(a, b) => out.extend([*a, b'-', *b]),
                    }
                }
                out.push(b']');
            }
        }
    }
    out
}

/// A text that `parts` matches (when any does), choosing with the bytes of `seeds`.
fn witness(parts: &[Glob], seeds: &[u8]) -> Vec<u8> {
    let mut seeds = seeds.iter().copied().cycle();
    let mut next = move || seeds.next().unwrap_or(0);
    let mut text = Vec::new();
    for part in parts {
        match part {
            Glob::Byte(b) | Glob::Escaped(b) => text.push(*b),
            Glob::AnyOne => text.push(next()),
            Glob::AnyRun => {
                for _ in 0..next() % 4 {
                    text.push(next());
                }
            }
            Glob::Class {
                negate: false,
                items,
            } if !items.is_empty() => {
                let pick = usize::from(next()) % items.len();
                text.push(match items[pick] {
                    ClassItem::Byte(b) | ClassItem::Escaped(b) => b,
                    ClassItem::Range(a, b) => {
                        let (low, high) = (a.min(b), a.max(b));
                        low + (next() % (high - low).saturating_add(1).max(1))
                    }
                });
            }
            Glob::Class { .. } => text.push(next()),
        }
    }
    text
}

/// The obvious (exponential in the worst case, fine for short inputs) matcher.
fn reference_match(parts: &[Glob], text: &[u8]) -> bool {
    let Some((first, rest)) = parts.split_first() else {
        return text.is_empty();
    };
    let one = |ok: bool| ok && reference_match(rest, &text[1..]);
    match first {
        Glob::AnyRun => (0..=text.len()).any(|skip| reference_match(rest, &text[skip..])),
        _ if text.is_empty() => false,
        Glob::Byte(b) | Glob::Escaped(b) => one(text[0] == *b),
        Glob::AnyOne => one(true),
        Glob::Class { negate, items } => {
            let c = text[0];
            let hit = items.iter().any(|item| match *item {
                ClassItem::Byte(b) | ClassItem::Escaped(b) => b == c,
                // Redis compares a range's bytes as C `char`s, signed on x86-64 and most
                // targets: `[a-\xC3]` spans `\xC3`..=`a` through the bytes above 0x7F.
                ClassItem::Range(a, b) => {
                    let (a, b, c) = (a as i8, b as i8, c as i8);
                    (a.min(b)..=a.max(b)).contains(&c)
                }
            });
            one(hit != *negate)
        }
    }
}

/// A cache-key prefix as the cache builds it: `{key_prefix}cache:{namespace}:`.
fn namespace_prefix() -> impl Strategy<Value = String> {
    ("[A-Za-z0-9_.:-]{0,6}", "[A-Za-z0-9_.-]{1,6}")
        .prop_map(|(key_prefix, namespace)| format!("{key_prefix}cache:{namespace}:"))
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

proptest! {
    #![proptest_config(config(256))]

    /// `escape_component` is injective (it has an inverse, and distinct look-alike inputs stay
    /// distinct) and its output has no `{`, `}`, `:` or control character, and no `%` that does
    /// not start a `%XX` escape.
    #[test]
    fn escape_component_is_injective_and_clean(
        a in prop_oneof![nasty_string(0..64), "(?s).{0,64}"],
        pair in (escape_lookalike(), escape_lookalike()),
    ) {
        let (b, c) = pair;
        let escaped = escape_component(&a);
        prop_assert!(
            !escaped.chars().any(|c| matches!(c, '{' | '}' | ':') || c.is_control()),
            "{:?}",
            escaped
        );
        let bytes = escaped.as_bytes();
        for (i, _) in escaped.match_indices('%') {
            prop_assert!(
                bytes.get(i + 1..i + 3).is_some_and(|hex| hex.iter().all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h))),
                "{escaped:?}"
            );
        }
        prop_assert_eq!(unescape_component(&escaped), Some(a.clone()));
        prop_assert_eq!(escape_component(&b) == escape_component(&c), b == c);
        prop_assert_eq!(escape_component(&b) == escaped, a == b);
    }

    /// `glob_escape(text)` as a pattern matches `text` and nothing else: not `text` with one
    /// more character, not `text` with one character changed, not another string.
    #[test]
    fn glob_escape_matches_exactly_the_text(
        text in prop_oneof![glob_text(0..16), nasty_string(0..32)],
        other in glob_text(0..16),
        extra in nasty_char(),
        edit in edit(),
    ) {
        let pattern = glob_escape(&text);
        prop_assert!(glob_match(pattern.as_bytes(), text.as_bytes()));
        let longer = format!("{text}{extra}");
        prop_assert!(!glob_match(pattern.as_bytes(), longer.as_bytes()));
        let prefixed = format!("{extra}{text}");
        prop_assert!(!glob_match(pattern.as_bytes(), prefixed.as_bytes()));
        if !text.is_empty() {
            let edited = edit.apply(&text);
            prop_assert_eq!(glob_match(pattern.as_bytes(), edited.as_bytes()), edited == text);
        }
        prop_assert_eq!(glob_match(pattern.as_bytes(), other.as_bytes()), other == text);
    }

    /// The pattern `Cache::keys(prefix)` scans with — the namespace prefix and the caller's
    /// prefix escaped, then `*` — matches exactly the keys of that namespace starting with it.
    #[test]
    fn escaped_prefix_pattern_lists_exactly_its_keys(
        namespace in namespace_prefix(),
        prefix in glob_text(0..6),
        key in prop_oneof![glob_text(0..12), nasty_string(0..12)],
        other_namespace in namespace_prefix(),
    ) {
        let pattern = format!("{}{}*", glob_escape(&namespace), glob_escape(&prefix));
        for stored in [format!("{namespace}{key}"), format!("{namespace}{prefix}{key}"), format!("{other_namespace}{key}")] {
            let wanted = stored.starts_with(&format!("{namespace}{prefix}"));
            prop_assert_eq!(glob_match(pattern.as_bytes(), stored.as_bytes()), wanted, "{:?} ~ {:?}", pattern, stored);
        }
    }

    /// Whatever glob a caller gives `Cache::keys_matching`, it is appended to the escaped
    /// namespace prefix and so never matches a key of another namespace.
    #[test]
    fn caller_patterns_stay_in_their_namespace(
        namespace in namespace_prefix(),
        other_namespace in namespace_prefix(),
        pattern in prop_oneof![glob_text(0..12), nasty_string(0..12)],
        key in prop_oneof![glob_text(0..12), nasty_string(0..12)],
    ) {
        let full = format!("{}{pattern}", glob_escape(&namespace));
        let stored = format!("{other_namespace}{key}");
        if glob_match(full.as_bytes(), stored.as_bytes()) {
            prop_assert!(stored.starts_with(&namespace), "{full:?} matched {stored:?}");
        }
    }

    /// `check_key` accepts exactly the non-empty keys of at most 1024 bytes without control
    /// characters — so 10 KB keys and keys with NUL or newline are refused — and its error
    /// message stays under 1 KiB whatever the key.
    #[test]
    fn check_key_accepts_exactly_valid_keys(
        key in prop_oneof![
            nasty_string(0..64),
            "(?s).{0,1100}",
            (1000usize..1030, select(&["k", "é", "🦀", "{", "*"][..])).prop_map(|(n, s)| s.repeat(n / s.len())),
            nasty_string(10_240..10_300),
            (nasty_string(0..40), select(&['\0', '\n', '\r', '\u{1b}', '\u{85}'][..]), nasty_string(0..40))
                .prop_map(|(a, c, b)| format!("{a}{c}{b}")),
        ],
    ) {
        let valid = !key.is_empty() && key.len() <= MAX_KEY_LEN && !key.chars().any(char::is_control);
        let outcome = check_key(&key);
        prop_assert_eq!(outcome.is_ok(), valid, "{:?}", outcome);
        if let Err(message) = outcome {
            prop_assert!(message.len() <= 1024, "a {}-byte message", message.len());
        }
    }

    /// Namespaces are exactly 1 to 64 bytes of `A-Z a-z 0-9 _ - .`; prefixes exactly 0 to 64
    /// bytes of those and `:`.
    #[test]
    fn names_accept_exactly_their_alphabet(
        name in prop_oneof!["[A-Za-z0-9_.:-]{0,70}", nasty_string(0..70)],
    ) {
        let short = name.len() <= MAX_NAME_LEN;
        prop_assert_eq!(
            check_namespace(&name).is_ok(),
            !name.is_empty() && short && name.chars().all(is_name_char)
        );
        prop_assert_eq!(
            check_prefix(&name).is_ok(),
            short && name.chars().all(|c| is_name_char(c) || c == ':')
        );
    }

    /// The glob matcher never panics on arbitrary pattern and text bytes (unclosed classes,
    /// trailing backslashes, reversed ranges, invalid UTF-8).
    #[test]
    fn glob_match_never_panics(
        pattern in vec(prop_oneof![select(&b"*?[]^-\\ab"[..]), any::<u8>()], 0..48),
        text in vec(prop_oneof![select(&b"*?[]^-\\ab"[..]), any::<u8>()], 0..64),
    ) {
        let _ = glob_match(&pattern, &text);
    }

    /// On well-formed patterns the glob matcher agrees with the obvious recursive definition of
    /// Redis's `*`, `?`, `[...]`, `[^...]`, `[a-z]` and `\x`.
    #[test]
    fn glob_match_agrees_with_a_reference(
        parts in glob_parts(),
        random_text in vec(prop_oneof![select(&b"ab:-]^*?[\\09xz"[..]), any::<u8>()], 0..16),
        seeds in vec(any::<u8>(), 32),
        edit in any::<Option<(prop::sample::Index, u8)>>(),
        use_witness in any::<bool>(),
    ) {
        let pattern = render(&parts);
        // Random text rarely matches a pattern; half the cases use text built to match it,
        // sometimes with one byte changed, so both sides of every part are exercised.
        let text = if use_witness {
            let mut text = witness(&parts, &seeds);
            if let Some((at, mask)) = edit && !text.is_empty() {
                let i = at.index(text.len());
                text[i] ^= mask;
            }
            text
        } else {
            random_text
        };
        // Redis's matcher never starts on an empty text: only an empty pattern matches it (a
        // lone `*` lists the empty key through `SCAN`'s own shortcut). Keys are never empty.
        let expected = if text.is_empty() {
            pattern.is_empty()
        } else {
            reference_match(&parts, &text)
        };
        prop_assert_eq!(
            glob_match(&pattern, &text),
            expected,
            "{:?} ~ {:?}",
            String::from_utf8_lossy(&pattern),
            String::from_utf8_lossy(&text)
        );
    }
}
