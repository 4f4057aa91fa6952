//! The systemd notify protocol (`Type=notify`): `READY=1` once the server
//! can answer, `STATUS=` with what it is doing, `WATCHDOG=1` while it
//! makes progress, `RELOADING=1` around a reload and `STOPPING=1` at
//! shutdown. Without `NOTIFY_SOCKET` (not under systemd) every call here
//! does nothing.
//!
//! The watchdog does not ping blindly from a timer: before each ping it
//! checks that the pipeline's writer and dispatcher have no work waiting
//! for longer than the ping interval ([`crate::pipeline::Pipeline::stalled`])
//! and that the accept loop answers an HTTP request on each of the
//! server's own listeners. A wedged server stops pinging, and systemd
//! restarts it after `WatchdogSec`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::App;
use crate::listener::Local;
use crate::supervisor::State;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The server answers requests: migrations applied, plugins started,
/// listener bound.
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// A reload begins (`RELOADING=1` with the monotonic time systemd asks for).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Shutdown has begun.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
/// As libsystemd's `sd_watchdog_enabled` reads it: `WATCHDOG_PID`, when
/// set, must be this process (the crate's own reader requires it).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Reports `STATUS=` every `every` (or at half of the watchdog interval,
/// pinging `WATCHDOG=1` when nothing is stalled) until dropped/aborted.
/// `local` are the listeners' addresses, which the accept-loop check calls.
pub fn spawn(app: Arc<App>, local: Vec<Local>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let watchdog = watchdog_interval();
        let every = watchdog.map(|w| w / 2).unwrap_or(Duration::from_secs(10));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut was_stalled = false;
        loop {
            tick.tick().await;
            let status = status(&app).await;
            if watchdog.is_none() {
                send(&[NotifyState::Status(&status)]);
                continue;
            }
            let stalled = match app.pipeline.stalled(every) {
                Some(part) => Some(format!("the {part} has made no progress for {every:?}")),
                None => accept_loop_answers(&local, every)
                    .await
                    .err()
                    .map(|e| format!("the accept loop does not answer: {e}")),
            };
            match &stalled {
                None => {
                    if was_stalled {
                        tracing::info!("watchdog: making progress again");
                    }
                    send(&[NotifyState::Watchdog, NotifyState::Status(&status)]);
                }
                Some(why) => {
                    // systemd restarts the server if this lasts WatchdogSec.
                    tracing::error!("watchdog ping withheld: {why}");
                    send(&[NotifyState::Status(&format!("stalled: {why}"))]);
                }
            }
            was_stalled = stalled.is_some();
        }
    })
}

/// `STATUS=`: plugins running and deliveries pending.
async fn status(app: &App) -> String {
    let plugins = app.plugins.list();
    let running = plugins.iter().filter(|p| p.state == State::Running).count();
    let pending: i64 = app.counted().await.pending.iter().map(|(_, n)| n).sum();
    format!(
        "{running} of {} plugins running, {pending} deliveries pending",
        plugins.len()
    )
}

/// One HTTP request to each of the server's own listeners (a route that
/// needs neither the database nor a plugin), all answered within `limit`.
async fn accept_loop_answers(local: &[Local], limit: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    for l in local {
        match tokio::time::timeout_at(deadline, answers(l)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("on {l}: {e}")),
            Err(_) => return Err(format!("on {l}: no answer within {limit:?}")),
        }
    }
    Ok(())
}

/// One HTTP request to the listener at `l`, answered.
async fn answers(l: &Local) -> Result<(), String> {
    match l {
        Local::Tcp(addr) => {
            let mut target = *addr;
            if target.ip().is_unspecified() {
                target.set_ip(match target {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            let s = tokio::net::TcpStream::connect(target).await;
            http_answer(s.map_err(|e| e.to_string())?).await
        }
        Local::Unix(path) => {
            let s = tokio::net::UnixStream::connect(path).await;
            http_answer(s.map_err(|e| e.to_string())?).await
        }
    }
}

/// Sends the watchdog's request over `s` and reads the start of the answer.
async fn http_answer(mut s: impl AsyncRead + AsyncWrite + Unpin) -> Result<(), String> {
    s.write_all(b"GET /watchdog HTTP/1.1\r\nHost: watchdog\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.map_err(|e| e.to_string())?;
    if head.starts_with(b"HTTP/1.1 ") {
        Ok(())
    } else {
        Err("not an HTTP answer".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every connection on `l` with the start of an HTTP answer.
    fn answering(l: tokio::net::TcpListener) {
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await;
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn the_probe_names_the_listener_that_does_not_answer() {
        let a = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = [
            Local::Tcp(a.local_addr().unwrap()),
            Local::Tcp(b.local_addr().unwrap()),
        ];
        answering(a);
        // `b` is bound and never accepts: its connections wait in the
        // backlog, as they would behind a wedged accept loop.
        let limit = Duration::from_secs(5);
        assert_eq!(
            accept_loop_answers(&local, limit).await,
            Err(format!("on {}: no answer within 5s", local[1]))
        );
        answering(b);
        assert_eq!(accept_loop_answers(&local, limit).await, Ok(()));

        // A socket file nobody listens on is named with its error.
        let dir = tempfile::tempdir().unwrap();
        let gone = Local::Unix(dir.path().join("gone.sock"));
        let e = accept_loop_answers(&[local[0].clone(), gone.clone()], limit)
            .await
            .unwrap_err();
        assert!(e.starts_with(&format!("on {gone}: ")), "{e}");
    }
}
