//! The value format: a small header, then JSON, compressed when large.
//!
//! ```text
//! byte 0      MAGIC (0xF5: never the first byte of UTF-8 text, so never of plain JSON)
//! byte 1      format version (1)
//! byte 2      flags: low 4 bits = encoding (1 = JSON), high 4 bits = compression (0 = none, 1 = lz4)
//! bytes 3..7  when compressed: the uncompressed length, u32 little-endian
//! rest        the payload
//! ```
//!
//! Anything else — bytes another program wrote, a truncated value, a future format version — is
//! a [`DecodeError`]: the cache treats it as a miss, logs and counts it, and deletes the value.
//! Decoding never panics and never allocates more than the configured maximum, whatever the input.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

const MAGIC: u8 = 0xF5;
const VERSION: u8 = 1;
const ENCODING_JSON: u8 = 1;
const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_LZ4: u8 = 1;
const HEADER: usize = 3;
const LENGTH: usize = 4;

/// Values whose JSON is larger than this are compressed.
pub const DEFAULT_COMPRESSION_THRESHOLD: usize = 1024;
/// Largest value the codec will decode (after decompression) or encode: 64 MiB.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 64 << 20;

/// Why stored bytes were not a value of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes do not start with our header: another program wrote them.
    #[error("not a rediskit value (no header)")]
    Foreign,
    /// Our header, but a format version this build does not know.
    #[error("unknown format version {0}")]
    Version(u8),
    /// Our header with an encoding or compression this build does not know.
    #[error("unknown encoding/compression flags {0:#04x}")]
    Flags(u8),
    /// The payload is damaged: truncated, bad compression, or lengths that disagree.
    #[error("corrupted value: {0}")]
    Corrupt(&'static str),
    /// The declared size is larger than the configured maximum.
    #[error("value of {0} bytes is over the size limit")]
    TooLarge(usize),
    /// The payload is well-formed but is not JSON of the requested type.
    #[error("value does not deserialize: {0}")]
    Type(String),
}

/// Encodes and decodes values; cheap to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Codec {
    pub(crate) compression_threshold: usize,
    pub(crate) max_value_size: usize,
}

impl Default for Codec {
    fn default() -> Self {
        Self {
            compression_threshold: DEFAULT_COMPRESSION_THRESHOLD,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
        }
    }
}

impl Codec {
    /// Serializes `value` with its header, compressing it when it is over the threshold.
    pub(crate) fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&[MAGIC, VERSION, ENCODING_JSON | (COMPRESSION_NONE << 4)]);
        serde_json::to_writer(&mut out, value).map_err(|err| {
            Error::invalid(format!("value does not serialize to JSON: {err}")).with_source(err)
        })?;
        let json_len = out.len() - HEADER;
        if json_len > self.max_value_size {
            return Err(Error::invalid(format!(
                "value is {json_len} bytes of JSON, over the limit of {} bytes",
                self.max_value_size
            )));
        }
        if json_len <= self.compression_threshold {
            return Ok(out);
        }
        let compressed = lz4_flex::block::compress(&out[HEADER..]);
        // Incompressible data stays as it is: compression must never make a value bigger.
        if compressed.len() + LENGTH >= json_len {
            return Ok(out);
        }
        let mut packed = Vec::with_capacity(HEADER + LENGTH + compressed.len());
        packed.extend_from_slice(&[MAGIC, VERSION, ENCODING_JSON | (COMPRESSION_LZ4 << 4)]);
        // json_len <= max_value_size, which fits in u32 for any sane limit; saturate otherwise.
        packed.extend_from_slice(&u32::try_from(json_len).unwrap_or(u32::MAX).to_le_bytes());
        packed.extend_from_slice(&compressed);
        Ok(packed)
    }

    /// Returns the JSON payload of stored bytes.
    pub(crate) fn payload<'a>(
        &self,
        bytes: &'a [u8],
    ) -> std::result::Result<std::borrow::Cow<'a, [u8]>, DecodeError> {
        use std::borrow::Cow;
        let [magic, version, flags, rest @ ..] = bytes else {
            return Err(if bytes.first() == Some(&MAGIC) {
                DecodeError::Corrupt("shorter than the header")
            } else {
                DecodeError::Foreign
            });
        };
        if *magic != MAGIC {
            return Err(DecodeError::Foreign);
        }
        if *version != VERSION {
            return Err(DecodeError::Version(*version));
        }
        if flags & 0x0F != ENCODING_JSON {
            return Err(DecodeError::Flags(*flags));
        }
        match flags >> 4 {
            // The limit holds for reads too, as documented: a plain value over it (written by a
            // program with a larger limit, or another one) is not parsed.
            COMPRESSION_NONE if rest.len() > self.max_value_size => {
                Err(DecodeError::TooLarge(rest.len()))
            }
            COMPRESSION_NONE => Ok(Cow::Borrowed(rest)),
            COMPRESSION_LZ4 => {
                let Some((length, compressed)) = rest.split_first_chunk::<LENGTH>() else {
                    return Err(DecodeError::Corrupt("compressed value without its length"));
                };
                let length = u32::from_le_bytes(*length) as usize;
                if length > self.max_value_size {
                    return Err(DecodeError::TooLarge(length));
                }
                // lz4 cannot expand data more than ~255 times; a claim beyond that is damage (or an
                // attack), refused before allocating the claimed size.
                if length > compressed.len().saturating_mul(255).saturating_add(16) {
                    return Err(DecodeError::Corrupt(
                        "claimed length beyond lz4's expansion limit",
                    ));
                }
                let json = lz4_flex::block::decompress(compressed, length)
                    .map_err(|_| DecodeError::Corrupt("lz4 data does not decompress"))?;
                if json.len() != length {
                    return Err(DecodeError::Corrupt(
                        "decompressed length differs from header",
                    ));
                }
                Ok(Cow::Owned(json))
            }
            _ => Err(DecodeError::Flags(*flags)),
        }
    }

    /// Decodes stored bytes into a `T`.
    pub(crate) fn decode<T: DeserializeOwned>(
        &self,
        bytes: &[u8],
    ) -> std::result::Result<T, DecodeError> {
        let json = self.payload(bytes)?;
        serde_json::from_slice(&json).map_err(|err| DecodeError::Type(err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        id: u64,
        name: String,
        tags: Vec<String>,
    }

    fn sample(tags: usize) -> Sample {
        Sample {
            id: 7,
            name: "ünïcode ✓".into(),
            tags: (0..tags).map(|i| format!("tag-{i}")).collect(),
        }
    }

    /// Small values round-trip uncompressed with a three-byte header.
    #[test]
    fn small_round_trip() {
        let codec = Codec::default();
        let bytes = codec.encode(&sample(2)).unwrap();
        assert_eq!(&bytes[..3], &[MAGIC, VERSION, ENCODING_JSON]);
        assert_eq!(codec.decode::<Sample>(&bytes).unwrap(), sample(2));
    }

    /// Values over the threshold are compressed, smaller, and round-trip.
    #[test]
    fn large_values_are_compressed() {
        let codec = Codec::default();
        let value = sample(500);
        let json_len = serde_json::to_vec(&value).unwrap().len();
        let bytes = codec.encode(&value).unwrap();
        assert_eq!(bytes[2] >> 4, COMPRESSION_LZ4);
        assert!(bytes.len() < json_len / 2, "{} vs {json_len}", bytes.len());
        assert_eq!(codec.decode::<Sample>(&bytes).unwrap(), value);
    }

    /// Incompressible data over the threshold is stored plain rather than grown.
    #[test]
    fn incompressible_stays_plain() {
        let codec = Codec::default();
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let noise: String = (0..4000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'A' + (state >> 58) as u8 % 26)
            })
            .collect();
        let bytes = codec.encode(&noise).unwrap();
        assert_eq!(bytes[2] >> 4, COMPRESSION_NONE);
        assert_eq!(codec.decode::<String>(&bytes).unwrap(), noise);
    }

    /// Foreign, damaged and future bytes are errors of the right kind, never panics.
    #[test]
    fn bad_bytes() {
        let codec = Codec::default();
        assert_eq!(
            codec.decode::<Sample>(b"{\"id\":1}"),
            Err(DecodeError::Foreign)
        );
        assert_eq!(codec.decode::<Sample>(b""), Err(DecodeError::Foreign));
        assert!(matches!(
            codec.decode::<Sample>(&[MAGIC]),
            Err(DecodeError::Corrupt(_))
        ));
        assert_eq!(
            codec.decode::<Sample>(&[MAGIC, 9, 1]),
            Err(DecodeError::Version(9))
        );
        assert!(matches!(
            codec.decode::<Sample>(&[MAGIC, 1, 0x07]),
            Err(DecodeError::Flags(_))
        ));
        assert!(matches!(
            codec.decode::<Sample>(&[MAGIC, 1, 0x31]),
            Err(DecodeError::Flags(_))
        ));

        let mut compressed = codec.encode(&sample(500)).unwrap();
        compressed.truncate(compressed.len() / 2);
        assert!(matches!(
            codec.decode::<Sample>(&compressed),
            Err(DecodeError::Corrupt(_))
        ));

        // A header claiming 4 GiB is refused before any allocation.
        let bomb = [MAGIC, 1, 0x11, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0];
        assert!(matches!(
            codec.decode::<Sample>(&bomb),
            Err(DecodeError::TooLarge(_))
        ));

        // Well-formed, wrong type.
        let other = codec.encode(&"a string").unwrap();
        assert!(matches!(
            codec.decode::<Sample>(&other),
            Err(DecodeError::Type(_))
        ));
    }

    /// Values over the size limit are refused when written, and when read, compressed or not.
    #[test]
    fn oversized_values_are_refused() {
        let codec = Codec {
            max_value_size: 100,
            ..Codec::default()
        };
        let err = codec.encode(&"x".repeat(200)).unwrap_err();
        assert!(err.is_invalid_input());
        let larger = Codec {
            max_value_size: 1 << 20,
            ..Codec::default()
        };
        for len in [200, 5_000] {
            let stored = larger.encode(&"x".repeat(len)).unwrap();
            assert!(matches!(
                codec.decode::<String>(&stored),
                Err(DecodeError::TooLarge(_))
            ));
        }
        let fits = larger.encode(&"x".repeat(90)).unwrap();
        assert_eq!(codec.decode::<String>(&fits).unwrap(), "x".repeat(90));
    }
}
