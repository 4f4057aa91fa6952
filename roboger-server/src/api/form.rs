//! A submitted form body: URL-encoded fields, or `multipart/form-data`
//! with at most one file, in the part its reader names. The console's
//! pages read their forms here (the test event's file is `file`), and so
//! does `POST /push`, which the original took as a form of either kind
//! (its file is the event's `media`, raw rather than base64). Text is
//! read in the character set it declares ([`charset`]).

use bytes::Bytes;
use futures_util::stream;

use crate::api::charset;
use crate::api::error::{ApiError, bad};

const URLENCODED: &str = "application/x-www-form-urlencoded";
const MULTIPART: &str = "multipart/form-data";

/// Whether `content_type`'s media type (before any parameters) is
/// `essence`, which media types compare without case.
fn is_media_type(content_type: &str, essence: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(essence))
}

/// A file sent with a form.
#[derive(Debug, Clone)]
pub struct Upload {
    /// Its name, as the client gave it.
    pub name: Option<String>,
    pub data: Bytes,
}

/// A submitted form's fields, in order.
#[derive(Debug, Default)]
pub struct Form {
    pub fields: Vec<(String, String)>,
    pub file: Option<Upload>,
}

impl Form {
    /// Reads a form body by its content type; a file is taken from the
    /// part named `file_part` only (a file in any other part is text, and
    /// an empty one is no file, as a browser sends when none was chosen).
    /// A second file there is a 400.
    pub async fn parse(
        content_type: Option<&str>,
        body: Bytes,
        file_part: &str,
    ) -> Result<Form, ApiError> {
        let Some(boundary) = content_type
            .filter(|c| is_media_type(c, MULTIPART))
            .map(|c| {
                multer::parse_boundary(c).map_err(|e| {
                    bad(format!(
                        "the request body is multipart/form-data without its boundary: {e}"
                    ))
                })
            })
            .transpose()?
        else {
            let fields = charset::form_pairs(&body, charset::declared(content_type)?)?;
            return Ok(Form { fields, file: None });
        };
        let mut parts = multer::Multipart::new(
            stream::once(async move { Ok::<Bytes, std::io::Error>(body) }),
            boundary,
        );
        let mut form = Form::default();
        let broken =
            |e: multer::Error| bad(format!("the request body is a broken multipart form: {e}"));
        while let Some(field) = parts.next_field().await.map_err(broken)? {
            let name = field.name().unwrap_or("").to_string();
            let file_name = field.file_name().map(str::to_string);
            let declared = charset::declared(field.content_type().map(|m| m.as_ref()))?;
            let data = field.bytes().await.map_err(broken)?;
            match file_name {
                Some(f) if name == file_part => {
                    if data.is_empty() {
                        continue;
                    }
                    if form.file.is_some() {
                        return Err(bad(format!("field {name:?} holds more than one file")));
                    }
                    form.file = Some(Upload {
                        name: Some(f).filter(|f| !f.is_empty()),
                        data,
                    });
                }
                _ => {
                    let what = || format!("field {name:?}");
                    let text = charset::text(&data, declared, what)?.into_owned();
                    form.fields.push((name, text));
                }
            }
        }
        Ok(form)
    }

    /// Whether `content_type` says a form of either kind.
    pub fn is_form(content_type: &str) -> bool {
        is_media_type(content_type, URLENCODED) || is_media_type(content_type, MULTIPART)
    }

    /// A field's value, if sent.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A field's value trimmed, empty when not sent.
    pub fn text(&self, name: &str) -> &str {
        self.get(name).map(str::trim).unwrap_or("")
    }

    /// A field as text or `None` when empty (a filter left open).
    pub fn optional(&self, name: &str) -> Option<String> {
        Some(self.text(name))
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_both_encodings() {
        let f = Form::parse(
            Some("application/x-www-form-urlencoded"),
            Bytes::from_static(b"a=1&b=x+y&a=2"),
            "file",
        )
        .await
        .unwrap();
        assert_eq!(f.get("a"), Some("1"));
        assert_eq!(f.text("b"), "x y");
        assert!(f.optional("c").is_none());

        let body = "--XX\r\nContent-Disposition: form-data; name=\"msg\"\r\n\r\nhello\r\n\
                    --XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\
                    Content-Type: text/plain\r\n\r\nfile body\r\n--XX--\r\n";
        let f = Form::parse(
            Some("multipart/form-data; boundary=XX"),
            Bytes::from(body),
            "file",
        )
        .await
        .unwrap();
        assert_eq!(f.get("msg"), Some("hello"));
        let file = f.file.unwrap();
        assert_eq!(file.name.as_deref(), Some("a.txt"));
        assert_eq!(&file.data[..], b"file body");

        assert!(
            Form::parse(
                Some("multipart/form-data; boundary=XX"),
                Bytes::from("--XX\r\nbroken"),
                "file"
            )
            .await
            .is_err()
        );
    }

    /// A multipart body of `parts` (name, file name, data) with boundary XX.
    fn multipart(parts: &[(&str, Option<&str>, &str)]) -> Bytes {
        let mut b = String::new();
        for (name, file, data) in parts {
            b.push_str("--XX\r\nContent-Disposition: form-data; name=\"");
            b.push_str(name);
            b.push('"');
            if let Some(f) = file {
                b.push_str("; filename=\"");
                b.push_str(f);
                b.push('"');
            }
            b.push_str("\r\n\r\n");
            b.push_str(data);
            b.push_str("\r\n");
        }
        b.push_str("--XX--\r\n");
        Bytes::from(b)
    }

    #[tokio::test]
    async fn takes_a_file_from_the_named_part_only() {
        let ct = Some("Multipart/Form-Data; boundary=XX");
        let body = multipart(&[
            ("media", Some("a.bin"), "raw"),
            ("file", Some("b.txt"), "text"),
            ("media", Some(""), ""),
        ]);
        let f = Form::parse(ct, body, "media").await.unwrap();
        let file = f.file.as_ref().unwrap();
        assert_eq!(
            (file.name.as_deref(), &file.data[..]),
            (Some("a.bin"), &b"raw"[..])
        );
        // A file in another part is that part's text.
        assert_eq!(f.get("file"), Some("text"));

        let two = multipart(&[("media", Some("a"), "1"), ("media", Some("b"), "2")]);
        let e = Form::parse(ct, two, "media").await.unwrap_err();
        assert!(e.to_string().contains("more than one file"), "{e}");

        // A part's text in the charset it declares, else UTF-8 or
        // Windows-1252 (api::charset).
        let legacy = Bytes::from_static(
            b"--XX\r\nContent-Disposition: form-data; name=\"msg\"\r\n\r\ncaf\xe9\r\n\
              --XX\r\nContent-Disposition: form-data; name=\"subject\"\r\n\
              Content-Type: text/plain; charset=iso-8859-5\r\n\r\n\xbf\xe0\xd8\xd2\xd5\xe2\r\n--XX--\r\n",
        );
        let f = Form::parse(ct, legacy, "media").await.unwrap();
        assert_eq!(
            (f.get("msg"), f.get("subject")),
            (Some("café"), Some("Привет"))
        );

        let e = Form::parse(Some("multipart/form-data"), multipart(&[]), "media")
            .await
            .unwrap_err();
        assert!(e.to_string().contains("without its boundary"), "{e}");
        assert!(Form::is_form(
            "application/x-www-form-urlencoded; charset=utf-8"
        ));
        assert!(!Form::is_form("application/json"));
    }
}
