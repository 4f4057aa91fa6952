//! The connections the accept loop holds open, at most so many at once,
//! and which of them give way when a client comes while all are taken.
//!
//! A client may hold connections it sends nothing on: between requests
//! (keep-alive), or before its first (a connection opened and left).
//! When such connections took every place, each new client waited in the
//! listen backlog until one ended, up to the header read timeout (30 s),
//! and one client that kept opening them kept the server from everyone
//! else. So when a client comes and no place is free, the connections
//! with no request in the server (none being handled, no answer being
//! sent), longest idle first, are asked to close, until [`GIVE_WAY`]
//! places are free or being freed. hyper closes one that waits for a
//! request at once, and one whose request arrives meanwhile after its
//! answer. One still receiving a request head [`HEAD_GRACE`] later is
//! closed then: before, it kept its place until the header read timeout
//! (30 s), so slow heads kept the server from everyone as idle
//! connections had (a stop closes them so too, rather than wait its
//! grace for them). A client whose connection is closed opens a new
//! one, as after any keep-alive close. Those asked before and not closed
//! yet count: before they did, when clients came faster than the asked
//! ones closed, each asked for 64 more, and 106 clients coming to a full
//! server closed up to 3,200 of its 4,096 connections.
//!
//! Invariant: a connection is asked to give way only while a client
//! waits for its place and it has had no request in the server since it
//! was last idle; a request being handled, or its answer being sent, is
//! never cut short by it (a head still arriving is not a request in the
//! server). At most [`GIVE_WAY`] idle connections asked to give way are
//! open at once.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError};
use tokio::time::Instant;

/// How many idle connections are asked to close at once when a client
/// finds no place: enough that a burst of clients is not let in one by
/// one, few enough that keep-alive clients rarely lose theirs.
pub const GIVE_WAY: usize = 64;

/// The open connections, and the places left for more.
#[derive(Debug)]
pub struct Connections {
    places: Arc<Semaphore>,
    most: u32,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Connections asked to give way since the start.
    given_way: AtomicU64,
}

/// How long a connection asked to give way may go on receiving a request
/// head before it is closed: a head on its way then is one sent slowly,
/// which the header read timeout would otherwise allow 30 s.
pub const HEAD_GRACE: Duration = Duration::from_secs(1);

/// One open connection, as [`Connections`] weighs it.
#[derive(Debug)]
pub struct Conn {
    /// Its requests in the server now, from their routing to the end of
    /// their answer.
    busy: AtomicUsize,
    /// Its requests that have entered the server since it was accepted.
    requests: AtomicU64,
    /// When it last had none (at first, when it was accepted).
    idle_since: Mutex<Instant>,
    /// Whether it has been asked to give way.
    asked: AtomicBool,
    /// `requests` when it was asked to close (to give way, or for a stop).
    asked_at: AtomicU64,
    /// Whether an answer is still on its way to the client (see
    /// [`Conn::set_sending`]).
    sending: AtomicBool,
    give_way: Notify,
}

/// A connection's place, held as long as it is open.
#[derive(Debug)]
pub struct Place {
    of: Arc<Connections>,
    id: u64,
    /// The connection holding it.
    pub conn: Arc<Conn>,
    _permit: OwnedSemaphorePermit,
}

/// A request of a connection in the server: the connection is busy
/// until it is dropped (with the answer's body, once sent).
#[derive(Debug)]
pub struct Busy(Arc<Conn>);

impl Connections {
    /// Room for `most` connections.
    pub fn new(most: usize) -> Arc<Connections> {
        let most = u32::try_from(most).unwrap_or(u32::MAX);
        Arc::new(Connections {
            places: Arc::new(Semaphore::new(most as usize)),
            most,
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            given_way: AtomicU64::new(0),
        })
    }

    /// A place for a client that came: a free one, or else, once idle
    /// connections were asked to give way, the first to be freed.
    pub async fn admit(self: &Arc<Self>) -> Place {
        let permit = match self.places.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::NoPermits | TryAcquireError::Closed) => {
                self.ask_idle_to_give_way();
                match self.places.clone().acquire_owned().await {
                    Ok(permit) => permit,
                    // The semaphore is never closed.
                    Err(_) => return std::future::pending().await,
                }
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            busy: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since: Mutex::new(Instant::now()),
            asked: AtomicBool::new(false),
            asked_at: AtomicU64::new(0),
            sending: AtomicBool::new(false),
            give_way: Notify::new(),
        });
        self.open().insert(id, conn.clone());
        Place {
            of: self.clone(),
            id,
            conn,
            _permit: permit,
        }
    }

    /// Asks connections with no request in the server, longest idle
    /// first, to close, so that [`GIVE_WAY`] places are free or being
    /// freed: those asked before and not yet closed count, and so do the
    /// places of connections that closed since the caller found none
    /// free, so that clients coming faster than the asked ones close do
    /// not empty the server.
    fn ask_idle_to_give_way(&self) {
        let open = self.open();
        // A connection leaves `open` before its place is freed, and not
        // while this holds the lock: the places not in `open` are free
        // or about to be.
        let mut freeing = (self.most as usize).saturating_sub(open.len());
        let mut idle: Vec<(Instant, &Arc<Conn>)> = Vec::new();
        for c in open.values() {
            if c.busy.load(Ordering::Acquire) != 0 {
                continue;
            }
            if c.asked.load(Ordering::Relaxed) {
                freeing += 1;
            } else {
                idle.push((*c.idle_since(), c));
            }
        }
        idle.sort_unstable_by_key(|(since, _)| *since);
        for (_, c) in idle.into_iter().take(GIVE_WAY.saturating_sub(freeing)) {
            c.mark_asked();
            c.asked.store(true, Ordering::Relaxed);
            c.give_way.notify_one();
            self.given_way.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every connection has closed.
    pub async fn all_closed(&self) {
        let _ = self.places.acquire_many(self.most).await;
    }

    /// How many connections are open now, and how many were asked to
    /// give way since the start (for the metrics).
    pub fn counts(&self) -> (usize, u64) {
        (self.open().len(), self.given_way.load(Ordering::Relaxed))
    }

    fn open(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        match self.open.lock() {
            Ok(o) => o,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Conn {
    /// A request of this connection enters the server.
    pub fn request(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::AcqRel);
        self.requests.fetch_add(1, Ordering::AcqRel);
        Busy(self.clone())
    }

    /// Resolves once the connection is asked to give way.
    pub async fn asked_to_give_way(&self) {
        self.give_way.notified().await;
    }

    /// Notes that the connection is asked to close (to give way, or for a
    /// stop): [`Conn::only_a_head_after_grace`] looks for requests from
    /// here on.
    pub fn mark_asked(&self) {
        self.asked_at
            .store(self.requests.load(Ordering::Acquire), Ordering::Release);
    }

    /// Says whether an answer is still on its way to the client: bytes
    /// of it wait for the client to take them, or the socket lingers on
    /// close so that bytes the client still sends do not turn the close
    /// into a reset, which would destroy the answer unread.
    pub fn set_sending(&self, sending: bool) {
        self.sending.store(sending, Ordering::Relaxed);
    }

    /// For a connection asked to close: resolves once [`HEAD_GRACE`]
    /// has passed with no request of it entering the server since it was
    /// asked, and no answer on its way to the client. What it holds
    /// then is at most a request head still arriving, and closing it cuts
    /// nothing short; else it never resolves, and the connection closes
    /// after its answer.
    pub async fn only_a_head_after_grace(&self) {
        tokio::time::sleep(HEAD_GRACE).await;
        let requested =
            self.requests.load(Ordering::Acquire) != self.asked_at.load(Ordering::Acquire);
        if requested
            || self.busy.load(Ordering::Acquire) != 0
            || self.sending.load(Ordering::Relaxed)
        {
            std::future::pending::<()>().await;
        }
    }

    fn idle_since(&self) -> MutexGuard<'_, Instant> {
        match self.idle_since.lock() {
            Ok(t) => t,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        // The time is set before the count shows the connection idle.
        if self.0.busy.load(Ordering::Acquire) == 1 {
            *self.0.idle_since() = Instant::now();
        }
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.of.open().remove(&self.id);
    }
}

/// An answer's body that keeps its connection busy until it has been
/// sent (or dropped unsent).
pub struct Answering<B> {
    body: B,
    _busy: Busy,
}

impl<B> Answering<B> {
    pub fn new(body: B, busy: Busy) -> Self {
        Answering { body, _busy: busy }
    }
}

impl<B: Body + Unpin> Body for Answering<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At the limit, a client that comes asks the idle connections,
    /// longest idle first, to give way, and never a busy one; the first
    /// place freed is its.
    #[tokio::test(start_paused = true)]
    async fn idle_connections_give_way_longest_idle_first() {
        let conns = Connections::new(3);
        let busy = conns.admit().await;
        let old = conns.admit().await;
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        let young = conns.admit().await;
        let _request = busy.conn.request();
        let waiting = tokio::spawn({
            let conns = conns.clone();
            async move { conns.admit().await }
        });
        tokio::task::yield_now().await;
        assert_eq!(conns.counts().0, 3);
        // The longest idle was asked; the busy one was not.
        tokio::time::timeout(
            std::time::Duration::from_secs(1),
            old.conn.asked_to_give_way(),
        )
        .await
        .expect("the longest idle was asked");
        assert!(young.conn.asked.load(Ordering::Relaxed));
        assert!(!busy.conn.asked.load(Ordering::Relaxed));
        drop(old);
        let place = waiting.await.expect("the waiting client has a place");
        assert_eq!(conns.counts(), (3, 2));
        drop((place, young, busy));
        conns.all_closed().await;
    }
}
