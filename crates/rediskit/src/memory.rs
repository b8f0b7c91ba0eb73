//! The embedded backend behind `memory://`: the same operations as Redis, in this process.
//!
//! It exists for development and single-process use (tests of an application, a demo without
//! Redis). Nothing is shared between processes and nothing survives a restart. Expiry is honoured
//! on every read; expired entries are also swept out periodically so memory stays bounded by the
//! live data.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Writes between two sweeps of expired entries.
const SWEEP_EVERY: u64 = 1024;

#[derive(Debug)]
struct Entry {
    value: Value,
    expires_at: Option<Instant>,
}

/// The Redis types the embedded store needs: strings and hashes.
#[derive(Debug)]
enum Value {
    Bytes(Vec<u8>),
    Hash(HashMap<String, Vec<u8>>),
}

impl Value {
    fn bytes(&self) -> Option<&Vec<u8>> {
        match self {
            Value::Bytes(bytes) => Some(bytes),
            Value::Hash(_) => None,
        }
    }
}

impl Entry {
    fn live(&self, now: Instant) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

/// The store. A std mutex, not a tokio one: no critical section awaits, and each is a few
/// hash-map operations, so an async mutex would only add overhead.
#[derive(Debug, Default)]
pub(crate) struct MemoryStore {
    map: Mutex<HashMap<String, Entry>>,
    writes: AtomicU64,
}

impl MemoryStore {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock cannot leave a half-written entry (every mutation is a
        // single map operation), so a poisoned lock is still consistent.
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn get(&self, key: &str) -> Option<Vec<u8>> {
        let now = Instant::now();
        let map = self.lock();
        map.get(key)
            .filter(|entry| entry.live(now))
            .and_then(|entry| entry.value.bytes().cloned())
    }

    pub(crate) fn ttl(&self, key: &str) -> Option<Duration> {
        let now = Instant::now();
        let map = self.lock();
        map.get(key)
            .filter(|entry| entry.live(now))
            .and_then(|entry| entry.expires_at)
            .map(|at| at.saturating_duration_since(now))
    }

    /// The string at `key` and its remaining lifetime (`None`: no expiry), read under one lock
    /// as Redis's `get_with_pttl.lua` reads them in one script.
    pub(crate) fn get_with_ttl(&self, key: &str) -> Option<(Vec<u8>, Option<Duration>)> {
        let now = Instant::now();
        let map = self.lock();
        let entry = map.get(key).filter(|entry| entry.live(now))?;
        let left = entry.expires_at.map(|at| at.saturating_duration_since(now));
        entry.value.bytes().map(|bytes| (bytes.clone(), left))
    }

    pub(crate) fn set(&self, key: &str, value: Vec<u8>, ttl: Duration) {
        let now = Instant::now();
        let mut map = self.lock();
        map.insert(
            key.to_owned(),
            Entry {
                value: Value::Bytes(value),
                expires_at: Some(now + ttl),
            },
        );
        self.after_write(&mut map, now);
    }

    /// `SET NX [PX ttl]`: true if the key was absent (or expired) and is now written.
    pub(crate) fn set_if_absent(&self, key: &str, value: Vec<u8>, ttl: Option<Duration>) -> bool {
        let now = Instant::now();
        let mut map = self.lock();
        if let Some(entry) = map.get(key).filter(|entry| entry.live(now)) {
            // As the Redis backend answers: the same bytes are this caller's own write.
            return matches!(&entry.value, Value::Bytes(held) if *held == value);
        }
        map.insert(
            key.to_owned(),
            Entry {
                value: Value::Bytes(value),
                expires_at: ttl.map(|ttl| now + ttl),
            },
        );
        self.after_write(&mut map, now);
        true
    }

    pub(crate) fn set_many(&self, items: &[(String, Vec<u8>)], ttl: Duration) {
        let now = Instant::now();
        let mut map = self.lock();
        for (key, value) in items {
            map.insert(
                key.clone(),
                Entry {
                    value: Value::Bytes(value.clone()),
                    expires_at: Some(now + ttl),
                },
            );
        }
        self.after_write(&mut map, now);
    }

    pub(crate) fn del(&self, keys: &[String]) -> u64 {
        let now = Instant::now();
        let mut map = self.lock();
        keys.iter()
            .filter(|key| {
                map.remove(key.as_str())
                    .is_some_and(|entry| entry.live(now))
            })
            .count() as u64
    }

    pub(crate) fn del_if_equals(&self, key: &str, expected: &[u8]) -> bool {
        let now = Instant::now();
        let mut map = self.lock();
        let matches = map.get(key).is_some_and(|entry| {
            entry.live(now) && entry.value.bytes().is_some_and(|v| v == expected)
        });
        if matches {
            map.remove(key);
        }
        matches
    }

    pub(crate) fn keys_matching(&self, pattern: &str) -> Vec<String> {
        let now = Instant::now();
        let map = self.lock();
        map.iter()
            .filter(|(key, entry)| {
                entry.live(now) && glob_match(pattern.as_bytes(), key.as_bytes())
            })
            .map(|(key, _)| key.clone())
            .collect()
    }

    /// Runs `f` on the string at `key` (`None` when missing or expired) under the lock; `f`
    /// returns its result and what to store: `Some((bytes, ttl))`, or `None` to leave it as is.
    pub(crate) fn update_bytes<R>(
        &self,
        key: &str,
        f: impl FnOnce(Option<&[u8]>) -> (R, Option<(Vec<u8>, Duration)>),
    ) -> R {
        let now = Instant::now();
        let mut map = self.lock();
        let current = map
            .get(key)
            .filter(|entry| entry.live(now))
            .and_then(|entry| entry.value.bytes().map(Vec::as_slice));
        let (result, write) = f(current);
        if let Some((bytes, ttl)) = write {
            map.insert(
                key.to_owned(),
                Entry {
                    value: Value::Bytes(bytes),
                    expires_at: Some(now + ttl),
                },
            );
            self.after_write(&mut map, now);
        }
        result
    }

    /// Runs `f` on the hash at `key` (empty when missing or expired) under the lock; `f` returns
    /// its result and how long the key lives from now (`None`: no expiry). An empty hash is
    /// removed, as Redis does.
    pub(crate) fn update_hash<R>(
        &self,
        key: &str,
        f: impl FnOnce(&mut HashMap<String, Vec<u8>>) -> (R, Option<Duration>),
    ) -> R {
        let now = Instant::now();
        let mut map = self.lock();
        let mut hash = match map.remove(key) {
            Some(Entry {
                value: Value::Hash(hash),
                expires_at,
            }) if expires_at.is_none_or(|at| at > now) => hash,
            _ => HashMap::new(),
        };
        let (result, ttl) = f(&mut hash);
        if !hash.is_empty() {
            map.insert(
                key.to_owned(),
                Entry {
                    value: Value::Hash(hash),
                    expires_at: ttl.map(|ttl| now + ttl),
                },
            );
        }
        self.after_write(&mut map, now);
        result
    }

    /// A copy of the hash at `key` (empty when missing or expired).
    pub(crate) fn hash(&self, key: &str) -> HashMap<String, Vec<u8>> {
        let now = Instant::now();
        let map = self.lock();
        match map.get(key) {
            Some(Entry {
                value: Value::Hash(hash),
                expires_at,
            }) if expires_at.is_none_or(|at| at > now) => hash.clone(),
            _ => HashMap::new(),
        }
    }

    /// One field of the hash at `key`.
    pub(crate) fn hash_field(&self, key: &str, field: &str) -> Option<Vec<u8>> {
        let now = Instant::now();
        let map = self.lock();
        match map.get(key) {
            Some(Entry {
                value: Value::Hash(hash),
                expires_at,
            }) if expires_at.is_none_or(|at| at > now) => hash.get(field).cloned(),
            _ => None,
        }
    }

    fn after_write(&self, map: &mut HashMap<String, Entry>, now: Instant) {
        if self.writes.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            map.retain(|_, entry| entry.live(now));
        }
    }

    #[cfg(test)]
    fn raw_len(&self) -> usize {
        self.lock().len()
    }
}

/// Redis's glob: `*`, `?`, `[abc]`, `[^a]`, `[a-z]`, and `\x` for a literal `x`.
///
/// Redis's own matcher (`stringmatchlen` in its util.c, 7.0) step for step, so that `memory://`
/// lists what `SCAN MATCH` would, malformed patterns included: a class that never closes runs
/// to the end of the pattern, a `]` right after `-` is a range's end, a range's bounds compare
/// as C's signed `char`s, and past 1,000 nested stars nothing matches.
pub(crate) fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let mut skip_longer = false;
    glob_from(pattern, 0, text, 0, &mut skip_longer, 0)
}

/// [`glob_match`] of `pattern[p..]` against `text[t..]`. `skip_longer` is set once a star failed
/// against all of the text: a longer match for an earlier star can only fail too.
fn glob_from(
    pattern: &[u8],
    mut p: usize,
    text: &[u8],
    mut t: usize,
    skip_longer: &mut bool,
    nesting: usize,
) -> bool {
    if nesting > 1000 {
        return false;
    }
    // Redis's pattern is a C string: reading past its end finds a NUL.
    let at = |i: usize| pattern.get(i).copied().unwrap_or(0);
    while p < pattern.len() && t < text.len() {
        match pattern[p] {
            b'*' => {
                while at(p + 1) == b'*' {
                    p += 1;
                }
                if p + 1 == pattern.len() {
                    return true;
                }
                while t < text.len() {
                    if glob_from(pattern, p + 1, text, t, skip_longer, nesting + 1) {
                        return true;
                    }
                    if *skip_longer {
                        return false;
                    }
                    t += 1;
                }
                *skip_longer = true;
                return false;
            }
            b'?' => t += 1,
            b'[' => {
                p += 1;
                let negate = at(p) == b'^';
                if negate {
                    p += 1;
                }
                let mut matched = false;
                loop {
                    let left = pattern.len() - p;
                    if at(p) == b'\\' && left >= 2 {
                        p += 1;
                        matched |= pattern[p] == text[t];
                    } else if at(p) == b']' {
                        break;
                    } else if left == 0 {
                        // Unclosed: the class ends with the pattern (the step below undoes this).
                        p -= 1;
                        break;
                    } else if left >= 3 && pattern[p + 1] == b'-' {
                        let (low, high) = (pattern[p] as i8, pattern[p + 2] as i8);
                        let (low, high) = if low > high { (high, low) } else { (low, high) };
                        matched |= (low..=high).contains(&(text[t] as i8));
                        p += 2;
                    } else {
                        matched |= pattern[p] == text[t];
                    }
                    p += 1;
                }
                if matched == negate {
                    return false;
                }
                t += 1;
            }
            b'\\' => {
                if pattern.len() - p >= 2 {
                    p += 1;
                }
                if pattern[p] != text[t] {
                    return false;
                }
                t += 1;
            }
            literal => {
                if literal != text[t] {
                    return false;
                }
                t += 1;
            }
        }
        p += 1;
        if t == text.len() {
            while at(p) == b'*' {
                p += 1;
            }
            break;
        }
    }
    p >= pattern.len() && t == text.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The glob matcher agrees with Redis on the cases rediskit produces and a few it doesn't.
    #[test]
    fn glob() {
        let yes = [
            ("*", "anything"),
            ("rk:cache:ns:*", "rk:cache:ns:user:1"),
            ("a?c", "abc"),
            ("a\\*c", "a*c"),
            ("a\\?c*", "a?cde"),
            ("[abc]x", "bx"),
            ("[^abc]x", "dx"),
            ("[a-c]x", "bx"),
            ("a\\[b\\]", "a[b]"),
            ("*b*", "abc"),
            ("a**", "a"),
            // Malformed, as Redis reads them: an unclosed class runs to the pattern's end, `-`
            // before `]` makes a range from `]` (0x5D) to `a`, a lone `\` is itself.
            ("[abc", "b"),
            ("a[b", "ab"),
            ("[a-]", "`"),
            ("[\\", "\\"),
            ("a\\", "a\\"),
        ];
        for (pattern, text) in yes {
            assert!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                "{pattern} ~ {text}"
            );
        }
        let no = [
            ("a\\*c", "abc"),
            ("a?c", "ac"),
            ("[abc]x", "dx"),
            ("[^abc]x", "ax"),
            ("rk:cache:ns:*", "rk:cache:other:1"),
            ("abc", "abcd"),
            ("[a-]", "-"),
        ];
        for (pattern, text) in no {
            assert!(
                !glob_match(pattern.as_bytes(), text.as_bytes()),
                "{pattern} !~ {text}"
            );
        }
    }

    /// Expired entries are invisible at once and swept out of memory over time.
    #[test]
    fn expiry() {
        let store = MemoryStore::new();
        store.set("gone", b"v".to_vec(), Duration::from_millis(1));
        store.set("kept", b"v".to_vec(), Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(store.get("gone"), None);
        assert_eq!(store.ttl("gone"), None);
        assert_eq!(store.get("kept"), Some(b"v".to_vec()));
        assert_eq!(store.get_with_ttl("gone"), None);
        let (bytes, left) = store.get_with_ttl("kept").unwrap();
        assert_eq!(bytes, b"v".to_vec());
        assert!(left.is_some_and(|left| left <= Duration::from_secs(60)));
        for i in 0..SWEEP_EVERY {
            store.set(&format!("k{i}"), Vec::new(), Duration::from_secs(60));
        }
        assert_eq!(
            store.raw_len(),
            1 + SWEEP_EVERY as usize,
            "the expired entry was swept"
        );
    }
}
