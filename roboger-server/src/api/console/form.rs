//! A submitted console form: URL-encoded fields, or `multipart/form-data`
//! with at most one file (the test event's media).

use bytes::Bytes;
use futures_util::stream;

use crate::api::error::{ApiError, bad};

/// A file sent with a form.
#[derive(Debug)]
pub struct Upload {
    /// Its name, as the browser gave it.
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
    /// Reads a form body by its content type.
    pub async fn parse(content_type: Option<&str>, body: Bytes) -> Result<Form, ApiError> {
        let Some(boundary) = content_type
            .filter(|c| c.starts_with("multipart/form-data"))
            .map(|c| {
                multer::parse_boundary(c)
                    .map_err(|e| bad(format!("a multipart form without its boundary: {e}")))
            })
            .transpose()?
        else {
            let fields = url::form_urlencoded::parse(&body)
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            return Ok(Form { fields, file: None });
        };
        let mut parts = multer::Multipart::new(
            stream::once(async move { Ok::<Bytes, std::io::Error>(body) }),
            boundary,
        );
        let mut form = Form::default();
        let broken = |e: multer::Error| bad(format!("a broken multipart form: {e}"));
        while let Some(field) = parts.next_field().await.map_err(broken)? {
            let name = field.name().unwrap_or("").to_string();
            let file_name = field.file_name().map(str::to_string);
            let data = field.bytes().await.map_err(broken)?;
            match file_name {
                Some(f) if name == "file" => {
                    if !data.is_empty() && form.file.is_none() {
                        form.file = Some(Upload {
                            name: Some(f).filter(|f| !f.is_empty()),
                            data,
                        });
                    }
                }
                _ => {
                    let text = String::from_utf8(data.to_vec())
                        .map_err(|_| bad(format!("form field {name:?} is not UTF-8 text")))?;
                    form.fields.push((name, text));
                }
            }
        }
        Ok(form)
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
        )
        .await
        .unwrap();
        assert_eq!(f.get("a"), Some("1"));
        assert_eq!(f.text("b"), "x y");
        assert!(f.optional("c").is_none());

        let body = "--XX\r\nContent-Disposition: form-data; name=\"msg\"\r\n\r\nhello\r\n\
                    --XX\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n\
                    Content-Type: text/plain\r\n\r\nfile body\r\n--XX--\r\n";
        let f = Form::parse(Some("multipart/form-data; boundary=XX"), Bytes::from(body))
            .await
            .unwrap();
        assert_eq!(f.get("msg"), Some("hello"));
        let file = f.file.unwrap();
        assert_eq!(file.name.as_deref(), Some("a.txt"));
        assert_eq!(&file.data[..], b"file body");

        assert!(
            Form::parse(
                Some("multipart/form-data; boundary=XX"),
                Bytes::from("--XX\r\nbroken")
            )
            .await
            .is_err()
        );
    }
}
