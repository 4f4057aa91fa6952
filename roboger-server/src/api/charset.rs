//! The text of a push in the character set its sender wrote it in. A
//! `charset` the Content-Type (or a multipart part's) declares is
//! honoured; text that declares none is UTF-8 when it is, else read as
//! Windows-1252, the legacy encoding clients that do not say theirs
//! mostly send (Windows PowerShell 5.1's `Invoke-RestMethod` sends
//! ISO-8859-1 unless told), so `caf\xe9` is `café`, never `caf\u{fffd}`:
//! a push's text is taken whole or refused, never altered. A JSON body may
//! open with a byte order mark (RFC 8259 lets a reader ignore it; the
//! original's Python did).

use std::borrow::Cow;

use bytes::Bytes;
use encoding_rs::{Encoding, UTF_8, WINDOWS_1252};

use crate::api::error::{ApiError, bad};

/// The character set `content_type` declares with its `charset`
/// parameter, `None` when it declares none; a 400 naming it when this
/// server does not know it.
pub fn declared(content_type: Option<&str>) -> Result<Option<&'static Encoding>, ApiError> {
    let Some(label) = content_type.and_then(charset_param) else {
        return Ok(None);
    };
    Encoding::for_label(label.as_bytes())
        .map(Some)
        .ok_or_else(|| {
            bad(format!(
                "the Content-Type's charset {label:?} is not one this server knows"
            ))
        })
}

/// The value of a media type's `charset` parameter, unquoted.
fn charset_param(content_type: &str) -> Option<&str> {
    content_type.split(';').skip(1).find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("charset")
            .then(|| v.trim().trim_matches('"'))
    })
}

/// `bytes` as text: in the `declared` character set, else UTF-8 when
/// they are, else Windows-1252 (in which every byte is a character).
/// `what` (`field "msg"`, `the request body`) is what a 400 names when
/// they are not text in the charset declared; bytes declared UTF-8 that
/// are not are read as undeclared ones are.
pub fn text<'a>(
    bytes: &'a [u8],
    declared: Option<&'static Encoding>,
    what: impl FnOnce() -> String,
) -> Result<Cow<'a, str>, ApiError> {
    match declared {
        Some(enc) if enc != UTF_8 => enc
            .decode_without_bom_handling_and_without_replacement(bytes)
            .ok_or_else(|| {
                bad(format!(
                    "{} is not {} text, the charset declared for it",
                    what(),
                    enc.name()
                ))
            }),
        _ => Ok(match std::str::from_utf8(bytes) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => WINDOWS_1252.decode_without_bom_handling(bytes).0,
        }),
    }
}

/// A JSON body as UTF-8 for the parser: itself when it is UTF-8 and says
/// nothing else (no copy), else transcoded ([`text`]), from the character
/// set a byte order mark says over any declared.
pub fn json(body: Bytes, declared: Option<&'static Encoding>) -> Result<Bytes, ApiError> {
    let (declared, start) = match Encoding::for_bom(&body) {
        Some((enc, len)) => (Some(enc), len),
        None => (declared, 0),
    };
    Ok(
        match text(&body[start..], declared, || "the request body".into())? {
            Cow::Borrowed(_) => body.slice(start..),
            Cow::Owned(s) => Bytes::from(s),
        },
    )
}

/// Whether a body opens (after any UTF-8 byte order mark and white
/// space) as a JSON object does.
pub fn looks_json(body: &[u8]) -> bool {
    let body = body.strip_prefix(b"\xef\xbb\xbf").unwrap_or(body);
    body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

/// The fields of URL-encoded `pairs` (a query string or a form body),
/// each name and value percent-decoded and then read as [`text`] in
/// `declared`.
pub fn form_pairs(
    pairs: &[u8],
    declared: Option<&'static Encoding>,
) -> Result<Vec<(String, String)>, ApiError> {
    let field = |raw: &[u8], name: &str| -> Result<String, ApiError> {
        let spaced: Cow<[u8]> = match raw.contains(&b'+') {
            true => raw
                .iter()
                .map(|&b| if b == b'+' { b' ' } else { b })
                .collect(),
            false => Cow::Borrowed(raw),
        };
        let decoded: Cow<[u8]> = percent_encoding::percent_decode(&spaced).into();
        let what = || match name {
            "" => "a field's name".to_string(),
            name => format!("field {name:?}"),
        };
        Ok(text(&decoded, declared, what)?.into_owned())
    };
    pairs
        .split(|&b| b == b'&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = match p.iter().position(|&b| b == b'=') {
                Some(i) => (&p[..i], &p[i + 1..]),
                None => (p, &b""[..]),
            };
            let k = field(k, "")?;
            let v = field(v, &k)?;
            Ok((k, v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_charset_is_honoured_and_an_unknown_one_refused() {
        let d = |ct: &str| declared(Some(ct));
        assert_eq!(d("application/json").ok().flatten(), None);
        assert_eq!(d("text/plain; charset=UTF-8").ok().flatten(), Some(UTF_8));
        let latin1 = d("application/x-www-form-urlencoded; Charset=\"iso-8859-1\"");
        assert_eq!(latin1.ok().flatten(), Some(WINDOWS_1252));
        let e = d("application/json; charset=klingon")
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains("\"klingon\"")),
            "{e:?}"
        );
        // Declared Latin-1 is read so even where the bytes are UTF-8 too.
        let t = |b: &[u8], enc| text(b, Some(enc), || "it".into()).ok().map(Cow::into_owned);
        assert_eq!(t(b"\xc3\xa9", WINDOWS_1252).as_deref(), Some("Ã©"));
        assert_eq!(
            t(b"caf\xe9", encoding_rs::ISO_8859_2).as_deref(),
            Some("café")
        );
        // Not text in the charset declared: a 400, nothing replaced.
        let e = text(b"\x82\xa0\x82", Some(encoding_rs::SHIFT_JIS), || {
            "field \"msg\"".into()
        });
        let e = e.err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("field \"msg\" is not Shift_JIS text, the charset declared for it")
        );
    }

    #[test]
    fn undeclared_text_is_utf_8_when_it_is_else_windows_1252() {
        let t = |b, enc| text(b, enc, String::new).ok();
        assert!(matches!(
            t("café".as_bytes(), None),
            Some(Cow::Borrowed("café"))
        ));
        assert_eq!(t(b"caf\xe9 \x80", None).as_deref(), Some("café €"));
        assert_eq!(t(b"caf\xe9", Some(UTF_8)).as_deref(), Some("café"));
    }

    #[test]
    fn form_pairs_are_decoded_after_their_percent_escapes() {
        let pairs = |b, enc| -> Vec<(String, String)> {
            form_pairs(b, enc).unwrap_or_else(|e| panic!("{e}"))
        };
        let got = pairs(
            b"msg=caf%E9+au+lait&&subject=%C3%A9t%C3%A9&flag&a=b=c",
            None,
        );
        let want = [
            ("msg", "café au lait"),
            ("subject", "été"),
            ("flag", ""),
            ("a", "b=c"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(got, want);
        assert_eq!(pairs(b"m=%u00e9%", None), [("m".into(), "%u00e9%".into())]);
        let e = form_pairs(b"msg=%82%A0%82", Some(encoding_rs::SHIFT_JIS)).err();
        let e = e.map(|e| e.to_string());
        assert!(
            e.as_deref()
                .is_some_and(|e| e.starts_with("field \"msg\" is not Shift_JIS")),
            "{e:?}"
        );
    }

    #[test]
    fn a_json_body_is_transcoded_only_when_it_must_be() {
        let json = |b: Bytes, enc| json(b, enc).unwrap_or_else(|e| panic!("{e}"));
        let utf8 = Bytes::from_static(b"{\"m\": \"caf\xc3\xa9\"}");
        let same = json(utf8.clone(), None);
        assert_eq!(same.as_ptr(), utf8.as_ptr(), "copied");
        let bom = json(Bytes::from_static(b"\xef\xbb\xbf{\"m\": 1}"), None);
        assert_eq!(&bom[..], b"{\"m\": 1}");
        let latin1 = json(Bytes::from_static(b"{\"m\": \"caf\xe9\"}"), None);
        assert_eq!(&latin1[..], "{\"m\": \"café\"}".as_bytes());
        // A byte order mark says the charset over the declared one.
        let utf16: Vec<u8> = [0xff, 0xfe]
            .into_iter()
            .chain("{\"m\": \"é\"}".encode_utf16().flat_map(u16::to_le_bytes))
            .collect();
        let utf16 = json(Bytes::from(utf16), Some(WINDOWS_1252));
        assert_eq!(&utf16[..], "{\"m\": \"é\"}".as_bytes());
        assert!(looks_json(b"\xef\xbb\xbf \n{\"m\": 1}"));
        assert!(!looks_json(b"addr=x"));
    }
}
