//! The one place where failures become HTTP statuses.
//!
//! Handlers return [`ApiError`]; module errors convert into it with `From`.
//! Bodies are short plain text saying what was wrong. A database error
//! is logged here, within [`log_budget::DATABASE`], which counts it.

use std::time::Duration;

use http::StatusCode;

use crate::log_budget;
use crate::store::StoreError;
use crate::supervisor::CallError;

/// A failed API request, with the status it is answered with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed or a value is unacceptable.
    #[error("{0}")]
    BadRequest(String),
    /// 401: no master key given.
    #[error("authentication required: send the master key in the X-Auth-Key header")]
    Unauthorized,
    /// 403: wrong key or client address not allowed.
    #[error("{0}")]
    Forbidden(&'static str),
    /// 404
    #[error("{0}")]
    NotFound(String),
    /// 405: a protected field, an unknown command or a wrong method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409
    #[error("{0}")]
    Conflict(String),
    /// 406: the push's address is disabled (the original's status).
    #[error("{0}")]
    Disabled(String),
    /// 429: the push's address is over its limit; the text is the
    /// original's, and `retry` (sent as `Retry-After`) how long until its
    /// window ends, when a window could take the push at all.
    #[error("{text}")]
    OverLimit {
        text: String,
        retry: Option<Duration>,
    },
    /// 408: the request body stopped arriving, or came too slowly.
    #[error("{0}")]
    TooSlow(String),
    /// 413: the body was not read to its end.
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 415: a push's body is compressed (`Content-Encoding`), which
    /// this server does not read.
    #[error("the request body is {0}-encoded (Content-Encoding); send it uncompressed")]
    UnsupportedEncoding(String),
    /// 413: a push's media, read whole, is over `push-max-media`.
    #[error("media is larger than {0} bytes (push-max-media)")]
    MediaTooLarge(usize),
    /// 413: an event's text and media are more than the database takes
    /// in one statement, this many bytes (MySQL's `max_allowed_packet`).
    #[error(
        "the event's text and media are larger than this server's database takes: \
         {0} bytes at most (MySQL's max_allowed_packet)"
    )]
    EventTooLarge(usize),
    /// 429: this address gave too many wrong master keys, and must wait
    /// this long (whole seconds, at least one; sent as `Retry-After`).
    #[error("too many wrong master keys from your address; try again in {} s", retry_secs(.0))]
    TooManyWrongKeys(Duration),
    /// 503: the database failed or timed out.
    #[error("{0}")]
    Unavailable(String),
    /// 503: the database failed in a way that leaves a write in doubt
    /// (its answer lost on a broken connection, or not come within
    /// `timeout`): a change asked for may have been made all the same
    /// (`api::manage` says so).
    #[error("{0}")]
    InDoubt(String),
    /// 503: no room in the body budget now (answered with `Retry-After`).
    #[error("{0}")]
    Busy(String),
}

impl ApiError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooSlow(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::PayloadTooLarge(_)
            | ApiError::MediaTooLarge(_)
            | ApiError::EventTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Disabled(_) => StatusCode::NOT_ACCEPTABLE,
            ApiError::UnsupportedEncoding(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyWrongKeys(_) | ApiError::OverLimit { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::Unavailable(_) | ApiError::InDoubt(_) | ApiError::Busy(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }
}

/// A wait as the whole seconds a client is told to wait: rounded up, at
/// least one.
pub fn retry_secs(wait: &Duration) -> u64 {
    wait.as_secs()
        .saturating_add(u64::from(wait.subsec_nanos() > 0))
        .max(1)
}

/// Shorthand for a 400 with a message.
pub fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(what) => ApiError::NotFound(format!("{what} not found")),
            StoreError::Conflict(msg) => ApiError::Conflict(msg),
            StoreError::TooLarge(msg) => ApiError::BadRequest(msg),
            e @ (StoreError::Db(_)
            | StoreError::Connect(_)
            | StoreError::Unanswered(_)
            | StoreError::NewerSchema(_)) => {
                if log_budget::DATABASE.logged() {
                    tracing::error!(error = %e, "database error");
                }
                let said = "database error; see the server log".to_string();
                match e {
                    StoreError::Db(_) | StoreError::Unanswered(_) if !e.took_no_effect() => {
                        ApiError::InDoubt(said)
                    }
                    _ => ApiError::Unavailable(said),
                }
            }
        }
    }
}

impl From<CallError> for ApiError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::NotConfigured(_) => ApiError::NotFound(e.to_string()),
            CallError::Rejected(msg) | CallError::Failed(msg) | CallError::Later(msg, _) => {
                ApiError::BadRequest(format!("invalid config: {}", crate::secrets::scrub(&msg)))
            }
            CallError::Unavailable(..)
            | CallError::NotMade(..)
            | CallError::NotRunning(..)
            | CallError::Ended { .. } => ApiError::Unavailable(e.to_string()),
        }
    }
}
