//! The accept loop: serves the API on a listener until `shutdown`
//! resolves, then lets open requests finish (bounded by a grace period).
//!
//! Written as `run(listener, app, shutdown)` so tests can start a server
//! on `127.0.0.1:0`; [`serve`] is the same loop for any service (the
//! end-to-end tests' fake HTTP servers and the benchmark's sink use it).
//! The peer address of each connection is handed to the routes as a
//! [`PeerAddr`] request extension (for `master.allow` and `ip-header`). A
//! semaphore bounds open connections.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower_service::Service;

use crate::App;
use crate::api::{self, PeerAddr};

/// The most connections served at once; further clients wait in the
/// listen backlog.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long open requests may take to finish after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn run(listener: TcpListener, app: Arc<App>, shutdown: impl Future<Output = ()>) {
    serve(listener, warp::service(api::routes(app)), shutdown).await
}

/// Serves `svc` (e.g. `warp::service(filter)`) over HTTP/1.1 on
/// `listener` until `shutdown` completes, then lets open requests finish.
pub async fn serve<S, B>(listener: TcpListener, svc: S, shutdown: impl Future<Output = ()>)
where
    S: Service<http::Request<Incoming>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // HTTP/1.1 only: every client (robogerctl, pyrpush, curl, other
    // Robogers) speaks it, and leaving out HTTP/2 keeps the h2 stack out
    // of the build, where feature unification would also put it into
    // every plugin binary.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = svc.clone();
        let hyper_svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(PeerAddr(peer));
            let mut svc = svc.clone();
            async move { svc.call(req).await }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), hyper_svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %peer, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("shutdown grace period over; closing open connections");
        }
    }
}
