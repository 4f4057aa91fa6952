//! Bucket objects: the rules of the seed for ids and content types.
//!
//! An object's id is the SHA-256 of the first 1024 bytes of its content,
//! the creation time, its creator and its address id; objects are
//! immutable and expire a fixed time after creation. Storage is in
//! [`crate::store::Store`]; this module only holds the rules.

use std::time::Duration;

use sha2::{Digest, Sha256};

/// The longest an object is kept: ten years. A plugin asking for more
/// (`expires` as "forever", say) is refused, as is a configuration's
/// `bucket.default-expires` past it: every backend stores the time it
/// expires, and the arithmetic on it cannot overflow.
pub const MAX_EXPIRES: Duration = Duration::from_secs(10 * 365 * 86_400);

/// The object id for `content` created by `creator` for `addr_id` at `now`.
pub fn object_id(
    content: &[u8],
    creator: &str,
    addr_id: Option<i64>,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    let mut h = Sha256::new();
    h.update(&content[..content.len().min(1024)]);
    h.update(
        now.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true)
            .as_bytes(),
    );
    // Two objects with equal content in the same nanosecond still differ.
    h.update(crate::random::alphanumeric(16).as_bytes());
    h.update(creator.as_bytes());
    h.update(
        addr_id
            .map(|a| a.to_string())
            .unwrap_or_default()
            .as_bytes(),
    );
    let digest = h.finalize();
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `s` can be an object id: 64 lowercase hex digits, what
/// [`object_id`] makes (and what the original made).
pub fn is_object_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The content type of `content`, detected from its bytes: a known
/// binary format, else `text/plain` for UTF-8 text, else octet-stream.
pub fn detect_mimetype(content: &[u8]) -> String {
    if let Some(t) = infer::get(content) {
        return t.mime_type().to_string();
    }
    if std::str::from_utf8(content).is_ok() {
        "text/plain".to_string()
    } else {
        "application/octet-stream".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_sha256_and_unique() {
        let now = chrono::Utc::now();
        let a = object_id(b"x", "plugin.t", Some(1), now);
        let b = object_id(b"x", "plugin.t", Some(1), now);
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn mimetypes() {
        assert_eq!(
            detect_mimetype(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR"),
            "image/png"
        );
        assert_eq!(detect_mimetype(b"hello"), "text/plain");
        assert_eq!(
            detect_mimetype(&[0xff, 0xfe, 0x00, 0x01, 0x80]),
            "application/octet-stream"
        );
    }
}
