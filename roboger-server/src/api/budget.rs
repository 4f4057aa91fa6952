//! How request bodies are taken in: within the server-wide budget for
//! them (`body-budget`, how many bytes of bodies may be read and handled
//! at once) and at a pace the client has to keep.
//!
//! The budget is two pools. Every body's first [`FIRST_BYTES`] take room
//! in the smaller one (an eighth of the budget) as they arrive; that is
//! all a typical push ever needs. A body that goes past them takes room
//! for its whole announced size (its `Content-Length`, else its limit)
//! at once in the other pool, and gives its first room back. So a client
//! has to send bytes before the server sets room aside for more, large
//! bodies are served whole in turn rather than all a little, and large
//! bodies cannot crowd out small ones (one waiting for its whole room
//! holds at most [`FIRST_BYTES`] of the first pool meanwhile). A body
//! keeps its room until its request is answered, which for a push covers
//! the decoding and the commit. When there is no room within a short wait, the rest of the
//! body is read and thrown away (so the client's connection stays usable)
//! and the answer is 503 with `Retry-After`. A body that stops arriving,
//! or arrives slower than [`MIN_RATE`] once its grace is over, is
//! answered 408 and its connection closed. Each pool's room in use, its
//! size and its refusals are read for `/metrics` ([`BodyBudget::usage`]).
//!
//! Invariant: a body holds room for more than it has sent only once it
//! has sent [`FIRST_BYTES`], and only from the pool small bodies do not
//! use.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::error::ApiError;
use crate::metrics::BudgetPool;

/// Room for one body, released when dropped.
pub type Room = OwnedSemaphorePermit;

/// The pace a request body must keep once its grace is over: 8 KiB/s, a
/// slow mobile link's. Each byte received moves the deadline for the
/// next on by 1/`MIN_RATE` s.
pub const MIN_RATE: u64 = 8 * 1024;

/// What a body takes in the first pool, as it arrives, before it may
/// have room set aside for its whole size.
pub const FIRST_BYTES: usize = 64 * 1024;

/// One pool of the budget, in KiB permits.
#[derive(Debug)]
struct Pool {
    permits: Arc<Semaphore>,
    capacity: u32,
    /// Requests answered 503 for want of room here.
    refused: AtomicU64,
}

impl Pool {
    fn new(kib: u32) -> Pool {
        // u32 permits are far below the semaphore's own limit.
        let capacity = kib.max(1);
        Pool {
            permits: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
            refused: AtomicU64::new(0),
        }
    }

    fn usage(&self, name: &'static str) -> BudgetPool {
        let free = u64::try_from(self.permits.available_permits()).unwrap_or(u64::MAX);
        let capacity = u64::from(self.capacity);
        BudgetPool {
            pool: name,
            used_bytes: capacity.saturating_sub(free) * 1024,
            size_bytes: capacity * 1024,
            refused: self.refused.load(Ordering::Relaxed),
        }
    }
}

/// The budget.
#[derive(Debug)]
pub struct BodyBudget {
    /// Every body's first [`FIRST_BYTES`].
    first: Pool,
    /// Bodies past their first bytes, each its whole size.
    whole: Pool,
    wait: Duration,
    grace: Duration,
}

/// When a body's next bytes are due: `grace` after it began, plus
/// 1/[`MIN_RATE`] s per byte received. The server's own waits for room
/// are added to `grace`: the client is not to blame for them.
struct Pace {
    began: Instant,
    grace: Duration,
}

impl Pace {
    fn due(&self, received: usize) -> Instant {
        let earned = Duration::from_secs_f64(received as f64 / MIN_RATE as f64);
        self.began + self.grace + earned
    }
}

impl BodyBudget {
    /// A budget of `bytes`; a request waits at most `wait` for room, and a
    /// body gets `grace` before it must keep up with [`MIN_RATE`].
    pub fn new(bytes: usize, wait: Duration, grace: Duration) -> BodyBudget {
        let total = kib(bytes).max(2);
        let first = (total / 8).max(1);
        BodyBudget {
            first: Pool::new(first),
            whole: Pool::new(total - first),
            wait,
            grace,
        }
    }

    /// Reads a request body of at most `limit` bytes (413 over that,
    /// without reading it when its `Content-Length` says so), taking room
    /// as described above. The room comes back with it, to be held until
    /// the request is answered. A body larger than the whole second pool
    /// takes all of it.
    pub async fn read<S, B>(
        &self,
        body: S,
        length: Option<u64>,
        limit: usize,
    ) -> Result<(Bytes, Room), ApiError>
    where
        S: Stream<Item = Result<B, warp::Error>>,
        B: Buf,
    {
        if length.is_some_and(|l| l > limit as u64) {
            return Err(ApiError::PayloadTooLarge(limit));
        }
        let mut body = pin!(body);
        let mut pace = Pace {
            began: Instant::now(),
            grace: self.grace,
        };
        let mut room = match self.take(&self.first, 1).await {
            Ok((r, _)) => r,
            Err(e) => {
                drain(body, limit, &pace, 0).await;
                return Err(e);
            }
        };
        let mut whole = false;
        let mut out = BytesMut::new();
        loop {
            let chunk = match next_within(body.as_mut(), &pace, out.len()).await {
                Err(_) => return Err(self.too_slow()),
                Ok(None) => break,
                Ok(Some(c)) => c.map_err(|e| {
                    ApiError::BadRequest(format!("cannot read the request body: {e}"))
                })?,
            };
            let size = out.len() + chunk.remaining();
            if size > limit {
                return Err(ApiError::PayloadTooLarge(limit));
            }
            if !whole {
                let more = if size <= FIRST_BYTES {
                    let held = u32::try_from(room.num_permits()).unwrap_or(u32::MAX);
                    // All of a small pool at most: more would never come.
                    let want = kib(size).min(self.first.capacity);
                    if want > held {
                        self.take(&self.first, want - held).await.map(Some)
                    } else {
                        Ok(None)
                    }
                } else {
                    // Past its first bytes: room for all it announced
                    // (hyper reads no further), else for its limit.
                    let all = length.map_or(limit, |l| usize::try_from(l).unwrap_or(limit));
                    whole = true;
                    self.take(&self.whole, kib(all.max(size))).await.map(Some)
                };
                match more {
                    Ok(None) => {}
                    Ok(Some((r, waited))) => {
                        if whole {
                            room = r;
                        } else {
                            room.merge(r);
                        }
                        pace.grace += waited;
                    }
                    Err(e) => {
                        drop(room);
                        drain(body, limit, &pace, size).await;
                        return Err(e);
                    }
                }
            }
            let mut chunk = chunk;
            while chunk.has_remaining() {
                let n = {
                    let c = chunk.chunk();
                    out.extend_from_slice(c);
                    c.len()
                };
                chunk.advance(n);
            }
        }
        Ok((out.freeze(), room))
    }

    /// Room for an answer of `bytes` to a request whose body holds
    /// `held`: that same room when it is large enough, so an answer no
    /// larger than its request is never refused (a plugin route may have
    /// acted on the request already); else new room, taken after `held`
    /// is given back so the two are never held together.
    pub async fn room_for_answer(&self, held: Room, bytes: usize) -> Result<Room, ApiError> {
        if usize::try_from(kib(bytes)).unwrap_or(usize::MAX) <= held.num_permits() {
            return Ok(held);
        }
        drop(held);
        self.room_for(bytes).await
    }

    /// Each pool's room in use, size and refusals: `small` (every body's
    /// first bytes, and small files and answers) and `large` (larger
    /// bodies, files and answers, each whole).
    pub fn usage(&self) -> [BudgetPool; 2] {
        [self.first.usage("small"), self.whole.usage("large")]
    }

    /// Room for `bytes` held by something other than a request body
    /// (a file being sent): in the pool a body of that size would use,
    /// within the budget's wait.
    pub async fn room_for(&self, bytes: usize) -> Result<Room, ApiError> {
        let pool = if bytes <= FIRST_BYTES {
            &self.first
        } else {
            &self.whole
        };
        self.take(pool, kib(bytes)).await.map(|(room, _)| room)
    }

    /// `want` KiB of room in `pool` (all of it at most), within the
    /// budget's wait, and how long it was waited for.
    /// [`ApiError::Busy`] when there is none in time.
    async fn take(&self, pool: &Pool, want: u32) -> Result<(Room, Duration), ApiError> {
        let want = want.clamp(1, pool.capacity);
        // The usual case, with room, arms no timer and reads no clock:
        // every push and management request passes here.
        if let Ok(room) = pool.permits.clone().try_acquire_many_owned(want) {
            return Ok((room, Duration::ZERO));
        }
        let asked = Instant::now();
        match tokio::time::timeout(self.wait, pool.permits.clone().acquire_many_owned(want)).await {
            Ok(Ok(room)) => Ok((room, asked.elapsed())),
            _ => {
                pool.refused.fetch_add(1, Ordering::Relaxed);
                Err(ApiError::Busy(
                    "the server holds as many request bodies and answers being sent as its \
                     body-budget allows; try again"
                        .into(),
                ))
            }
        }
    }

    fn too_slow(&self) -> ApiError {
        ApiError::TooSlow(format!(
            "the request body did not arrive in time: after its first {} s it must \
             arrive at {} KiB/s or more",
            self.grace.as_secs(),
            MIN_RATE / 1024
        ))
    }
}

/// A body's next chunk, if it arrives by its due time (`received` bytes
/// in). A chunk already there, the usual case for a push, arms no timer.
async fn next_within<S, B>(
    mut body: std::pin::Pin<&mut S>,
    pace: &Pace,
    received: usize,
) -> Result<Option<Result<B, warp::Error>>, tokio::time::error::Elapsed>
where
    S: Stream<Item = Result<B, warp::Error>>,
{
    if let Some(ready) = body.next().now_or_never() {
        return Ok(ready);
    }
    tokio::time::timeout_at(pace.due(received), body.next()).await
}

/// Bytes in whole KiB, rounded up.
fn kib(bytes: usize) -> u32 {
    u32::try_from(bytes.div_ceil(1024)).unwrap_or(u32::MAX)
}

/// Reads a body on to its end (at most `limit` bytes in all, `seen`
/// already read), keeping nothing, so an answer sent without using it
/// leaves the connection usable. Stops at the body's pace, as reading it
/// would; what is left then closes the connection (see `server`).
async fn drain<S, B>(mut body: std::pin::Pin<&mut S>, limit: usize, pace: &Pace, seen: usize)
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let mut seen = seen;
    while let Ok(Some(Ok(chunk))) = next_within(body.as_mut(), pace, seen).await {
        seen = seen.saturating_add(chunk.remaining());
        if seen > limit {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body whose chunks come from a channel, as hyper's would.
    fn channel_body() -> (
        tokio::sync::mpsc::Sender<Bytes>,
        impl Stream<Item = Result<Bytes, warp::Error>>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok(b), rx))
        });
        (tx, body)
    }

    /// 1 MiB: 128 KiB for first bytes, 896 KiB for whole bodies.
    fn budget() -> Arc<BodyBudget> {
        Arc::new(BodyBudget::new(
            1024 * 1024,
            Duration::from_secs(1),
            Duration::from_secs(10),
        ))
    }

    fn free(b: &BodyBudget) -> (usize, usize) {
        (
            b.first.permits.available_permits(),
            b.whole.permits.available_permits(),
        )
    }

    async fn send(tx: &tokio::sync::mpsc::Sender<Bytes>, kib: usize) {
        for _ in 0..kib {
            tx.send(Bytes::from(vec![b'x'; 1024])).await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_holds_what_it_sent_until_its_grace_ends() {
        let b = budget();
        let (tx, body) = channel_body();
        let reader = {
            let b = b.clone();
            tokio::spawn(async move { b.read(body, Some(600 * 1024), 1 << 20).await })
        };
        send(&tx, 3).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        // It announced 600 KiB and sent 3: it holds 3 KiB of first room.
        assert_eq!(free(&b), (128 - 3, 896));
        tokio::time::sleep(Duration::from_secs(6)).await;
        let e = reader.await.unwrap().unwrap_err();
        assert!(matches!(e, ApiError::TooSlow(_)), "{e:?}");
        assert_eq!(e.status(), http::StatusCode::REQUEST_TIMEOUT);
        assert_eq!(free(&b), (128, 896));
    }

    #[tokio::test(start_paused = true)]
    async fn past_its_first_bytes_a_body_takes_room_for_all_it_announced() {
        let b = budget();
        let (tx, body) = channel_body();
        let reader = {
            let b = b.clone();
            tokio::spawn(async move { b.read(body, Some(300 * 1024), 1 << 20).await })
        };
        send(&tx, 100).await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(free(&b), (128, 896 - 300));
        send(&tx, 200).await;
        drop(tx);
        let (got, room) = reader.await.unwrap().unwrap();
        assert_eq!(got.len(), 300 * 1024);
        assert_eq!(room.num_permits(), 300);
    }

    #[tokio::test(start_paused = true)]
    async fn the_servers_own_wait_for_room_is_not_held_against_the_client() {
        let b = budget();
        let held = b.whole.permits.clone().try_acquire_many_owned(896).unwrap();
        let (tx, body) = channel_body();
        let reader = {
            let b = b.clone();
            tokio::spawn(async move { b.read(body, Some(200 * 1024), 1 << 20).await })
        };
        // 65 KiB at once: past its first bytes, it waits 0.9 s for room.
        send(&tx, 65).await;
        tokio::time::sleep(Duration::from_millis(900)).await;
        drop(held);
        // Due at 10 s + 65/8 s = 18.1 s, plus the 0.9 s it waited.
        tokio::time::sleep(Duration::from_millis(17_600)).await;
        send(&tx, 135).await;
        drop(tx);
        let (got, _room) = reader.await.unwrap().unwrap();
        assert_eq!(got.len(), 200 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn large_bodies_do_not_crowd_out_small_ones() {
        let b = budget();
        let _large = b.whole.permits.clone().try_acquire_many_owned(896).unwrap();
        let (tx, body) = channel_body();
        send(&tx, 2).await;
        drop(tx);
        let (got, room) = b.read(body, Some(2048), 1 << 20).await.unwrap();
        assert_eq!((got.len(), room.num_permits()), (2048, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_keeping_the_pace_is_read_whole() {
        let b = budget();
        let (tx, body) = channel_body();
        let sender = tokio::spawn(async move {
            // 40 KiB at 10 KiB/s, past the 10 s grace.
            tokio::time::sleep(Duration::from_secs(9)).await;
            for _ in 0..40 {
                send(&tx, 1).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let (got, room) = b.read(body, None, 1 << 20).await.unwrap();
        sender.await.unwrap();
        assert_eq!(got.len(), 40 * 1024);
        assert_eq!(room.num_permits(), 40);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_slower_than_the_pace_is_cut_off() {
        let b = budget();
        let (tx, body) = channel_body();
        let sender = tokio::spawn(async move {
            // 1 KiB every 2 s: 0.5 KiB/s, after its grace.
            for _ in 0..20 {
                if tx.send(Bytes::from(vec![b'z'; 1024])).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        let began = Instant::now();
        let e = b.read(body, None, 1 << 20).await.unwrap_err();
        assert!(matches!(e, ApiError::TooSlow(_)), "{e:?}");
        // Due at 10 s plus 1/8 s per KiB received.
        assert!(
            began.elapsed() < Duration::from_secs(12),
            "{:?}",
            began.elapsed()
        );
        sender.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn without_room_the_rest_is_drained_and_the_answer_is_busy() {
        let b = budget();
        let held = b.whole.permits.clone().try_acquire_many_owned(800).unwrap();
        let (tx, body) = channel_body();
        let sender = tokio::spawn(async move { send(&tx, 200).await });
        let e = b.read(body, Some(200 * 1024), 1 << 20).await.unwrap_err();
        assert!(matches!(e, ApiError::Busy(_)), "{e:?}");
        // Every chunk was taken off the connection, and no room is kept.
        sender.await.unwrap();
        assert_eq!(free(&b), (128, 96));
        // /metrics sees the large pool's room in use and the refusal.
        let pool = |pool, used_bytes, size_bytes, refused| BudgetPool {
            pool,
            used_bytes,
            size_bytes,
            refused,
        };
        assert_eq!(
            b.usage(),
            [
                pool("small", 0, 128 * 1024, 0),
                pool("large", 800 * 1024, 896 * 1024, 1)
            ]
        );
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_no_larger_than_its_request_keeps_the_requests_room() {
        let b = budget();
        // The request's body holds 4 KiB; everything else is taken.
        let (tx, body) = channel_body();
        let sender = tokio::spawn(async move { send(&tx, 4).await });
        let (_, held) = b.read(body, None, 1 << 20).await.unwrap();
        sender.await.unwrap();
        let others = (
            b.first.permits.clone().try_acquire_many_owned(124).unwrap(),
            b.whole.permits.clone().try_acquire_many_owned(896).unwrap(),
        );
        assert_eq!(free(&b), (0, 0));
        let room = b.room_for_answer(held, 4 * 1024).await.unwrap();
        assert_eq!(room.num_permits(), 4);
        // A larger answer gives the request's room back and, finding no
        // room of its own, is refused.
        let e = b.room_for_answer(room, 100 * 1024).await.unwrap_err();
        assert!(matches!(e, ApiError::Busy(_)), "{e:?}");
        assert_eq!(free(&b), (4, 0));
        drop(others);
    }

    #[tokio::test]
    async fn an_announced_body_over_the_limit_is_refused_unread() {
        let b = budget();
        let (_tx, body) = channel_body();
        let e = b.read(body, Some(2048), 1024).await.unwrap_err();
        assert!(matches!(e, ApiError::PayloadTooLarge(1024)), "{e:?}");
    }
}
