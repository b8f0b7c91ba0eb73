//! Key naming: the rules for names and keys, escaping for `SCAN` patterns and hash tags.
//!
//! Every key rediskit writes starts with the configured prefix (`rk:` by default), then the
//! owner's area (`cache:{namespace}:` for the cache), then the caller's text. Names chosen by
//! developers (prefixes, namespaces) are restricted to a safe alphabet; keys chosen at run time
//! by callers are free text, checked for length and control characters, and escaped wherever a
//! character has a meaning to Redis (`*?[]\` in `SCAN MATCH`, `{}` in cluster hash tags).

use std::fmt::Write as _;

/// Longest cache key accepted, in bytes (the caller's part, before the prefix).
pub const MAX_KEY_LEN: usize = 1024;
/// Longest namespace or prefix accepted, in bytes.
pub const MAX_NAME_LEN: usize = 64;

/// A prefix is empty or made of `A-Z a-z 0-9 _ - . :` and at most [`MAX_NAME_LEN`] bytes.
pub(crate) fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.len() > MAX_NAME_LEN {
        return Err(format!(
            "at most {MAX_NAME_LEN} bytes, got {}",
            prefix.len()
        ));
    }
    if let Some(bad) = prefix.chars().find(|&c| !is_name_char(c) && c != ':') {
        return Err(format!(
            "`{}` may only hold A-Z a-z 0-9 _ - . : (found {bad:?})",
            prefix.escape_debug()
        ));
    }
    Ok(())
}

/// A namespace is 1 to [`MAX_NAME_LEN`] bytes of `A-Z a-z 0-9 _ - .` (no `:`, so the caller's
/// key text can never forge another namespace).
pub(crate) fn check_namespace(namespace: &str) -> Result<(), String> {
    if namespace.is_empty() || namespace.len() > MAX_NAME_LEN {
        return Err(format!(
            "namespace must be 1 to {MAX_NAME_LEN} bytes, got {}",
            namespace.len()
        ));
    }
    if let Some(bad) = namespace.chars().find(|&c| !is_name_char(c)) {
        return Err(format!(
            "namespace `{}` may only hold A-Z a-z 0-9 _ - . (found {bad:?})",
            namespace.escape_debug()
        ));
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')
}

/// A caller's key: 1 to [`MAX_KEY_LEN`] bytes, no control characters (newline, NUL, ...).
/// Any other character, `*`, `{` and `:` included, is allowed and stored as is.
pub(crate) fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key must not be empty".to_owned());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "key must be at most {MAX_KEY_LEN} bytes, got {}",
            key.len()
        ));
    }
    // Printable ASCII, the usual key, is checked a byte at a time; anything else char by char
    // (`is_control` also covers the C1 controls, U+0080 to U+009F).
    if key.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Ok(());
    }
    if let Some(bad) = key.chars().find(|c| c.is_control()) {
        return Err(format!(
            "key `{}` contains the control character {bad:?}",
            truncate_for_message(key).escape_debug()
        ));
    }
    Ok(())
}

/// Escapes `text` so that a `SCAN MATCH` glob matches it literally.
pub(crate) fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The concatenation of `parts`, in one allocation of the exact size. Keys are built on every
/// call; `format!` cost the cache's `get` about 1,000 instructions (callgrind), an eighth of
/// the caller's side of the round trip.
pub(crate) fn join(parts: &[&str]) -> String {
    let mut out = String::with_capacity(parts.iter().map(|part| part.len()).sum());
    for part in parts {
        out.push_str(part);
    }
    out
}

/// Escapes `text` for use inside a cluster hash tag `{...}` and as one `:`-separated component:
/// `%`, `{`, `}`, `:` and control characters become `%XX`, so a component can neither end the
/// tag early nor pose as another component. Injective: distinct inputs give distinct outputs.
/// (The key builders append with [`escape_component_into`].)
#[cfg(test)]
pub(crate) fn escape_component(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    escape_component_into(&mut out, text);
    out
}

/// `head`, then `component` escaped (see [`escape_component`]), then `tail`: a key with a
/// caller-supplied part, built in one allocation.
pub(crate) fn with_component(head: &[&str], component: &str, tail: &str) -> String {
    let head_len: usize = head.iter().map(|part| part.len()).sum();
    let mut out = String::with_capacity(head_len + component.len() + tail.len() + 4);
    for part in head {
        out.push_str(part);
    }
    escape_component_into(&mut out, component);
    out.push_str(tail);
    out
}

/// [`escape_component`], appending to `out`.
fn escape_component_into(out: &mut String, text: &str) {
    for c in text.chars() {
        if matches!(c, '%' | '{' | '}' | ':') || c.is_control() {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{byte:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

fn truncate_for_message(text: &str) -> &str {
    const SHOWN: usize = 64;
    if text.len() <= SHOWN {
        return text;
    }
    let mut end = SHOWN;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names keep to their alphabet; a colon in a namespace would let keys cross namespaces.
    #[test]
    fn names() {
        assert!(check_prefix("").is_ok());
        assert!(check_prefix("rk:app-1.v2:").is_ok());
        assert!(check_prefix("a b").is_err());
        assert!(check_prefix("{x}").is_err());
        assert!(check_namespace("api_v1").is_ok());
        assert!(check_namespace("").is_err());
        assert!(check_namespace("a:b").is_err());
        assert!(check_namespace(&"x".repeat(65)).is_err());
    }

    /// Keys are free text without control characters, bounded in length.
    #[test]
    fn keys() {
        assert!(check_key("user:42:{profile}*?[x]").is_ok());
        assert!(check_key("émoji 🦀").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("a\nb").unwrap_err().contains("control"));
        assert!(check_key("a\0b").is_err());
        // Every control character, ASCII or not, whatever else the key holds.
        for bad in ["a\u{7f}", "\u{1f}b", "é\u{85}", "\u{9f}", "🦀\t"] {
            assert!(check_key(bad).unwrap_err().contains("control"), "{bad:?}");
        }
        assert!(check_key("\u{a0}~ \u{7e}").is_ok());
        assert!(check_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
        assert!(check_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
        // Long keys are cut in messages on a character boundary.
        let long = "é".repeat(600) + "\n";
        assert!(check_key(&long).is_err());
    }

    /// Glob metacharacters are escaped with a backslash.
    #[test]
    fn glob() {
        assert_eq!(glob_escape("a*b?c[d]e\\f"), "a\\*b\\?c\\[d\\]e\\\\f");
        assert_eq!(glob_escape("plain:key"), "plain:key");
    }

    /// Component escaping removes every character with a meaning to hash tags or separators.
    #[test]
    fn component() {
        assert_eq!(escape_component("user{1}:x%"), "user%7B1%7D%3Ax%25");
        assert_eq!(escape_component("a\nb"), "a%0Ab");
        assert_eq!(escape_component("plain"), "plain");
        // Injective on a few colliding-looking inputs.
        assert_ne!(escape_component("%7B"), escape_component("{"));
    }

    /// `join` concatenates in one exact allocation; `with_component` escapes the middle part.
    #[test]
    fn joining() {
        let key = join(&["rk:", "api:", "ünï"]);
        assert_eq!(key, "rk:api:ünï");
        assert_eq!(key.capacity(), key.len());
        assert_eq!(join(&[]), "");
        assert_eq!(with_component(&["rk:", "s:{"], "a}b", "}"), "rk:s:{a%7Db}");
        assert_eq!(with_component(&["rk:rl:"], "a:b", ""), "rk:rl:a%3Ab");
    }
}
