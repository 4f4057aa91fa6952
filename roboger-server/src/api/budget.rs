//! The server-wide budget for request bodies: how many bytes of them may
//! be read and handled at once (`body-budget`). A request reserves its
//! body's size (its `Content-Length`, else its limit) before reading it
//! and keeps the room until it is answered, which for a push covers the
//! decoding and the commit. When there is no room within a short wait,
//! the body is read and thrown away (so the client's connection stays
//! usable) and the answer is 503 with `Retry-After`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;

/// Room for one body, released when dropped.
pub type Room = OwnedSemaphorePermit;

/// The budget, in KiB permits.
#[derive(Debug)]
pub struct BodyBudget {
    permits: Arc<Semaphore>,
    capacity: u32,
    wait: Duration,
}

impl BodyBudget {
    /// A budget of `bytes`; a request waits at most `wait` for room.
    pub fn new(bytes: usize, wait: Duration) -> BodyBudget {
        let capacity = u32::try_from(bytes.div_ceil(1024).clamp(1, Semaphore::MAX_PERMITS))
            .unwrap_or(u32::MAX);
        BodyBudget {
            permits: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            wait,
        }
    }

    /// Room for a body of `length` bytes (its `Content-Length`) or, when
    /// unknown, of `limit`. A body larger than the whole budget takes all
    /// of it. [`ApiError::Busy`] when there is no room in time.
    pub async fn room(&self, length: Option<u64>, limit: usize) -> Result<Room, ApiError> {
        let bytes = length
            .map(|l| usize::try_from(l).unwrap_or(usize::MAX).min(limit))
            .unwrap_or(limit);
        let want = u32::try_from(bytes.div_ceil(1024))
            .unwrap_or(u32::MAX)
            .clamp(1, self.capacity);
        // The usual case, with room, arms no timer: every push and
        // management request passes here.
        if let Ok(room) = self.permits.clone().try_acquire_many_owned(want) {
            return Ok(room);
        }
        match tokio::time::timeout(self.wait, self.permits.clone().acquire_many_owned(want)).await {
            Ok(Ok(room)) => Ok(room),
            _ => Err(ApiError::Busy(
                "the server is handling too many large requests; try again".into(),
            )),
        }
    }
}

/// Reads a body to its end (at most `limit` bytes), keeping nothing, so
/// an answer sent without using it leaves the connection usable.
pub async fn drain<S, B>(body: S, limit: usize)
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    let mut body = std::pin::pin!(body);
    let mut seen = 0usize;
    while let Some(Ok(chunk)) = body.next().await {
        seen = seen.saturating_add(chunk.remaining());
        if seen > limit {
            break;
        }
    }
}
