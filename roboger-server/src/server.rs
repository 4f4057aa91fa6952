//! The accept loop: serves the API on its listeners until `shutdown`
//! resolves, then lets open requests finish (bounded by a grace period).
//!
//! Written as `run(listeners, app, shutdown)` so tests can start a server
//! on `127.0.0.1:0`; [`serve`] is the same loop for any service (the
//! end-to-end tests' fake HTTP servers and the benchmark's sink use it).
//! A listener is a TCP port or a Unix socket ([`crate::listener`]), and
//! one loop takes connections from all of them (several when systemd
//! passes several); a connection is served alike over either kind.
//! The peer address of each connection is handed to the routes as a
//! [`PeerAddr`] request extension (for `master.allow` and `ip-header`).
//! Open connections are bounded ([`MAX_CONNECTIONS`]); a client that
//! comes while all places are taken has idle ones give way
//! ([`crate::connections`]).
//!
//! HTTP manners live here, for every route at once: a request body the
//! route did not read (a 404, an early 401, a route that takes no body) is
//! read and dropped before the answer, up to [`DISCARD_LIMIT`], so the
//! connection can carry the client's next request; past that the answer
//! says `Connection: close`, and the socket lingers on close ([`Lingering`])
//! so the unread bytes do not turn the close into a reset. A client that
//! takes no bytes of an answer for [`SEND_STALL`] is disconnected, so an
//! answer nobody reads holds neither its memory nor a connection for long.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::App;
use crate::api::{self, PeerAddr};
use crate::connections::{Answering, Conn, Connections};
use crate::listener::{Accepted, Listeners};
use crate::outage::Outage;

/// The most connections served at once; a further client has idle ones
/// give way, or waits in the listen backlog for a place.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long open requests may take to finish after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The most bytes of an unread request body read and dropped to keep the
/// connection open; a longer body closes it.
pub const DISCARD_LIMIT: u64 = 1024 * 1024;
/// How long reading and dropping an unread body may take.
const DISCARD_TIME: Duration = Duration::from_secs(5);
/// How long a client may take no bytes of an answer before it is
/// disconnected.
pub const SEND_STALL: Duration = Duration::from_secs(30);
/// How long a closing socket keeps reading what the client still sends,
/// at most (nginx's `lingering_time`).
const LINGER_TIME: Duration = Duration::from_secs(30);
/// How long a closing socket waits for the client's next bytes before it
/// closes (nginx's `lingering_timeout`).
const LINGER_IDLE: Duration = Duration::from_secs(5);

/// Descriptors kept for what is not a client's connection: the database
/// pool, the plugins' pipes, listeners, files being served.
const OTHER_FILES: u64 = 256;

/// Raises this process's soft limit on open files to its hard limit, as
/// Go programs do as they start: where nothing set it (a shell, a
/// container) the soft limit is 1024, a quarter of the
/// [`MAX_CONNECTIONS`] this server takes at once, and clients past it
/// wait in the listen backlog. Plugins keep their own: each sandbox sets
/// its `open-files`. Warns when even the hard limit is short of the
/// connections and [`OTHER_FILES`].
pub fn raise_open_files_limit() {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let was = getrlimit(Resource::Nofile);
    // "Unlimited" is not a value the kernel takes for open files; Linux's
    // default ceiling (fs.nr_open) is.
    let hard = was.maximum.unwrap_or(1 << 20);
    let soft = match was.current {
        Some(soft) if soft < hard => {
            let raised = Rlimit {
                current: Some(hard),
                maximum: was.maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => {
                    tracing::debug!(from = soft, to = hard, "open files limit raised");
                    hard
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot raise the open files limit from {soft}");
                    soft
                }
            }
        }
        Some(soft) => soft,
        None => hard,
    };
    let wanted = MAX_CONNECTIONS as u64 + OTHER_FILES;
    if soft < wanted {
        tracing::warn!(
            open_files = soft,
            "the open files limit ({soft}) is below the {MAX_CONNECTIONS} connections this \
             server takes at once and the files it needs besides ({wanted} in all): clients past \
             it wait unaccepted; raise it (LimitNOFILE= under systemd, ulimit -Hn)"
        );
    }
}

/// Serves `app` on `listeners` until `shutdown` completes, with its
/// connections kept in `app.connections` (which `/metrics` reads).
pub async fn run(listeners: Listeners, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    let routes = api::routes(app.clone());
    let connections = app.connections.clone();
    let shutdown = async move {
        shutdown.await;
        // Open event streams end now rather than hold the shutdown.
        app.console.close();
    };
    let svc = api::HeadAsGet(warp::service(routes));
    serve(connections, listeners, svc, shutdown).await
}

/// Serves `svc` (e.g. `warp::service(filter)`) over HTTP/1.1 on
/// `listeners` until `shutdown` completes, then lets open requests
/// finish; its open connections are kept in `connections` (the tests'
/// fake servers and the bench's sink give it
/// `Connections::new(MAX_CONNECTIONS)`).
pub async fn serve<S, B>(
    connections: Arc<Connections>,
    listeners: impl Into<Listeners>,
    svc: S,
    shutdown: impl Future<Output = ()>,
) where
    S: Service<http::Request<Returning>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stopping = CancellationToken::new();
    // HTTP/1.1 only: every client (robogerctl, pyrpush, curl, other
    // Robogers) speaks it, and leaving out HTTP/2 keeps the h2 stack out
    // of the build, where feature unification would also put it into
    // every plugin binary.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    let mut listeners = listeners.into();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut outage = Outage::new("accept failed", "connections are accepted again");
    loop {
        let (stream, peer) = tokio::select! {
            r = listeners.accept() => match r {
                Ok(c) => {
                    outage.succeeded();
                    c
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    outage.failed(e);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        // A place for it, once a client has come: only then do idle
        // connections give way.
        let place = tokio::select! {
            p = connections.admit() => p,
            _ = &mut shutdown => break,
        };
        let svc = svc.clone();
        let conn_state = place.conn.clone();
        let unread = Arc::new(AtomicBool::new(false));
        let stream = Lingering::new(stream, unread.clone(), place.conn.clone());
        let hyper_svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
            let mut svc = svc.clone();
            let unread = unread.clone();
            let busy = conn_state.request();
            async move {
                let (back, mut left) = oneshot::channel();
                let mut req = req.map(|b| Returning::new(b, back));
                req.extensions_mut().insert(PeerAddr(peer));
                let mut answer = svc.call(req).await?;
                // The route is done with the request: whatever it left of
                // the body came back through `left`.
                if let Ok(rest) = left.try_recv() {
                    let closing = answer.headers().get(header::CONNECTION)
                        == Some(&HeaderValue::from_static("close"));
                    if closing || !discard(rest).await {
                        answer
                            .headers_mut()
                            .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        unread.store(true, Ordering::Relaxed);
                    }
                }
                Ok::<_, Infallible>(answer.map(|body| Answering::new(body, busy)))
            }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), hyper_svc);
        let stopping = stopping.clone();
        tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            // Asked to close (a stop, or a client waiting for a place):
            // hyper finishes the request under way, if any, then closes.
            // A request head still arriving after a grace is dropped with
            // the connection.
            let ended = tokio::select! {
                ended = conn.as_mut() => ended,
                () = async {
                    tokio::select! {
                        () = stopping.cancelled() => place.conn.mark_asked(),
                        () = place.conn.asked_to_give_way() => {}
                    }
                } => {
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        ended = conn.as_mut() => ended,
                        () = place.conn.only_a_head_after_grace() => Ok(()),
                    }
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(place);
        });
    }
    drop(listeners);
    stopping.cancel();
    tokio::select! {
        () = connections.all_closed() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("shutdown grace period over; closing open connections");
        }
    }
}

/// Reads and drops what a route left of a request body, up to
/// [`DISCARD_LIMIT`] and [`DISCARD_TIME`]; true when it reached the end.
async fn discard(mut body: Incoming) -> bool {
    if body.size_hint().lower() > DISCARD_LIMIT {
        return false;
    }
    let read = async {
        let mut seen = 0u64;
        loop {
            match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                None => return true,
                Some(Err(_)) => return false,
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        seen += data.len() as u64;
                        if seen > DISCARD_LIMIT {
                            return false;
                        }
                    }
                }
            }
        }
    };
    tokio::time::timeout(DISCARD_TIME, read)
        .await
        .unwrap_or(false)
}

/// A request body that, when the route drops it before its end, hands
/// the rest back to the connection (see [`serve`]) to be read and dropped
/// there.
pub struct Returning {
    /// `None` only once handed back, in `drop`.
    body: Option<Incoming>,
    back: Option<oneshot::Sender<Incoming>>,
}

impl Returning {
    fn new(body: Incoming, back: oneshot::Sender<Incoming>) -> Self {
        Returning {
            body: Some(body),
            back: Some(back),
        }
    }
}

impl Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.body.as_mut() {
            Some(body) => Pin::new(body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let (Some(back), Some(body)) = (self.back.take(), self.body.take())
            && !body.is_end_stream()
        {
            let _ = back.send(body);
        }
    }
}

/// A connection's socket. When hyper closes a connection whose last
/// request body was not read to its end, the socket first sends its FIN
/// and then reads and drops what the client still sends, until the client
/// closes, sends nothing for [`LINGER_IDLE`], or [`LINGER_TIME`] is over:
/// closing with unread bytes would make the kernel answer with a reset,
/// which destroys the answer on its way to a client that sends its whole
/// body before it reads (nginx calls this a lingering close). No byte
/// limit: the bytes are dropped as read, and a 413 must reach a client
/// that sends a body of any size at any speed the deadline allows.
/// It also ends a connection whose client has taken no bytes for
/// [`SEND_STALL`] while an answer waits to be sent.
struct Lingering {
    stream: Accepted,
    /// The connection, told whether an answer is on its way (bytes of it
    /// waiting to be written, or lingering).
    conn: Arc<Conn>,
    /// Set by the connection's service when it left body bytes unread.
    unread: Arc<AtomicBool>,
    /// While lingering: when it must end, and a timer for the sooner of
    /// that and the client's idle deadline.
    linger: Option<(tokio::time::Instant, Pin<Box<Sleep>>)>,
    /// Armed while a write waits for the client to take bytes.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl Lingering {
    fn new(stream: Accepted, unread: Arc<AtomicBool>, conn: Arc<Conn>) -> Self {
        Lingering {
            stream,
            conn,
            unread,
            linger: None,
            stalled: None,
        }
    }

    /// `write`'s outcome, or an error once writes have waited
    /// [`SEND_STALL`] without the client taking a byte.
    fn within_stall<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        self.conn.set_sending(write.is_pending());
        if write.is_ready() {
            self.stalled = None;
            return write;
        }
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(SEND_STALL)));
        if stalled.as_mut().poll(cx).is_ready() {
            self.stalled = None;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no bytes of the answer",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for Lingering {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Lingering {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let write = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.within_stall(cx, write)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let write = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.within_stall(cx, write)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            if !this.unread.load(Ordering::Relaxed) {
                return Poll::Ready(Ok(()));
            }
            let end = tokio::time::Instant::now() + LINGER_TIME;
            this.linger = Some((end, Box::pin(tokio::time::sleep(LINGER_IDLE))));
            this.conn.set_sending(true);
        }
        let Some((end, timer)) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 8192];
        loop {
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    let idle = tokio::time::Instant::now() + LINGER_IDLE;
                    timer.as_mut().reset(idle.min(*end));
                }
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
