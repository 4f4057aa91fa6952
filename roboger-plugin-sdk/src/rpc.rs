//! The [`Peer`]: JSON-RPC 2.0 both ways over one pair of byte streams
//! (a child's stdin/stdout), one JSON message per line.
//!
//! The read loop demultiplexes the read half: requests are spawned onto
//! our [`Methods`] (never awaited in the read loop, so nested callbacks
//! cannot deadlock), notifications go to a callback, and responses are
//! matched to the calls of our [`Client`]. One writer task owns the write
//! half behind a bounded channel. When the read half ends, or carries
//! invalid JSON or an over-long line, the peer closes: pending calls fail
//! at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use jsonrpsee::core::client::{BatchResponse, ClientT, Error};
use jsonrpsee::core::params::BatchRequestBuilder;
use jsonrpsee::core::traits::ToRpcParams;
use jsonrpsee::types::{ErrorObjectOwned, Id, Notification, Request};
use jsonrpsee::{Methods, RpcModule};
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};
use tracing::Instrument;

/// Limits and timeouts of a peer.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    /// Longest accepted line (one message), in bytes.
    pub max_line: usize,
    /// Timeout of each outgoing call.
    pub call_timeout: Duration,
    /// Most outgoing calls in flight at once.
    pub max_outgoing: usize,
    /// Most incoming requests served at once; beyond it the peer answers
    /// "busy" at once instead of queueing without bound.
    pub max_incoming: usize,
}

impl Default for PeerOptions {
    fn default() -> Self {
        PeerOptions {
            max_line: 64 * 1024 * 1024,
            call_timeout: Duration::from_secs(5),
            max_outgoing: 256,
            max_incoming: 256,
        }
    }
}

/// Why a peer closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Closed {
    /// Still open.
    Open,
    /// The other side closed its stream.
    Eof,
    /// A line was not valid JSON-RPC.
    Garbage(String),
    /// A line was longer than the limit.
    LineTooLong,
    /// Reading failed.
    Io(String),
    /// We closed it.
    Local,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Closed::Open => f.write_str("open"),
            Closed::Eof => f.write_str("the stream was closed"),
            Closed::Garbage(s) => write!(f, "invalid message: {s}"),
            Closed::LineTooLong => f.write_str("a message was longer than the line limit"),
            Closed::Io(e) => write!(f, "read error: {e}"),
            Closed::Local => f.write_str("closed locally"),
        }
    }
}

/// Handles incoming notifications: `(method, params)`.
pub type NotificationHandler = Arc<dyn Fn(&str, Value) + Send + Sync>;

/// One end of a JSON-RPC connection.
pub struct Peer {
    client: Arc<Client>,
    closed: watch::Receiver<Closed>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Peer {
    /// Starts a peer on `read`/`write`. `methods` builds what this side
    /// serves; it gets the client so handlers can call back.
    pub fn start<R, W, F>(
        read: R,
        write: W,
        opts: PeerOptions,
        methods: F,
        on_notification: NotificationHandler,
    ) -> Peer
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
        F: FnOnce(Arc<Client>) -> Methods,
    {
        let (write_tx, write_rx) = mpsc::channel::<String>(1024);
        let client = Arc::new(Client {
            writer: write_tx.clone(),
            pending: std::sync::Mutex::new(Some(HashMap::new())),
            next_id: AtomicU64::new(1),
            slots: Semaphore::new(opts.max_outgoing),
            timeout: opts.call_timeout,
        });
        let methods = methods(client.clone());
        let (closed_tx, closed_rx) = watch::channel(Closed::Open);
        // Buffered: the messages queued while one is written go out in one
        // write(2) at the flush, not one each.
        let write = tokio::io::BufWriter::with_capacity(64 * 1024, write);
        let writer = tokio::spawn(write_loop(write, write_rx));
        // The read loop's own warnings carry the caller's span (the server
        // names the plugin in it).
        let reader = tokio::spawn(
            read_loop(
                read,
                opts,
                methods,
                write_tx.clone(),
                client.clone(),
                on_notification,
                closed_tx,
            )
            .in_current_span(),
        );
        Peer {
            client,
            closed: closed_rx,
            tasks: vec![writer, reader],
        }
    }

    /// The client for calls to the other side.
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    /// Sends a notification (no answer expected). False if it could not
    /// be queued within the call timeout (the other side reads nothing)
    /// or the peer has closed.
    pub async fn notify(&self, method: &str, params: Value) -> bool {
        let client = &self.client;
        client.notify(method, params, client.timeout).await.is_ok()
    }

    /// Resolves when the peer has closed, with the reason.
    pub async fn closed(&self) -> Closed {
        let mut rx = self.closed.clone();
        loop {
            let now = rx.borrow().clone();
            if now != Closed::Open {
                return now;
            }
            if rx.changed().await.is_err() {
                return Closed::Local;
            }
        }
    }

    /// Whether the peer is still open.
    pub fn is_open(&self) -> bool {
        *self.closed.borrow() == Closed::Open
    }

    /// Why the peer closed, if it has.
    pub fn close_reason(&self) -> Option<Closed> {
        let c = self.closed.borrow().clone();
        (c != Closed::Open).then_some(c)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.client.close();
    }
}

/// The calling half of a peer: numbers each call, matches the answers to
/// the callers, and fails pending calls at once when the peer closes.
///
/// It implements jsonrpsee's [`ClientT`], so the generated `*Client`
/// traits of [`crate::protocol`] call through it. jsonrpsee's own async
/// client routes each call through a background task and arms a
/// `futures-timer` per call, a timer thread woken thousands of times a
/// second under load; this one writes the line itself and times calls out
/// on tokio's timer.
pub struct Client {
    writer: mpsc::Sender<String>,
    /// Calls awaiting an answer, by id; `None` once the peer has closed.
    pending: std::sync::Mutex<Option<HashMap<u64, oneshot::Sender<Answer>>>>,
    next_id: AtomicU64,
    /// Bounds the calls in flight (`PeerOptions::max_outgoing`).
    slots: Semaphore,
    timeout: Duration,
}

/// A response: its `result`, or its `error`.
type Answer = Result<Box<RawValue>, ErrorObjectOwned>;

fn closed_error() -> Error {
    Error::Transport(Box::new(TransportClosed))
}

impl Client {
    /// This client with another call timeout, for the calls that may take
    /// longer than the others (a plugin's start: its runtime, its imports,
    /// its `load`).
    pub fn within(&self, timeout: Duration) -> Within<'_> {
        Within {
            client: self,
            timeout,
        }
    }

    /// Calls `method` and waits, within `timeout`, for its answer.
    async fn call(
        &self,
        method: &str,
        params: Option<Box<RawValue>>,
        timeout: Duration,
    ) -> Result<Box<RawValue>, Error> {
        let call = async {
            let _slot = self.slots.acquire().await.map_err(|_| closed_error())?;
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            match self.pending.lock().as_deref_mut() {
                Ok(Some(pending)) => pending.insert(id, tx),
                _ => return Err(closed_error()),
            };
            // Removes the entry if the call is dropped or times out first.
            let _forget = Forget { client: self, id };
            let line = serde_json::to_string(&Request::borrowed(
                method,
                params.as_deref(),
                Id::Number(id),
            ))?;
            self.writer.send(line).await.map_err(|_| closed_error())?;
            match rx.await {
                Ok(answer) => answer.map_err(Error::Call),
                Err(_) => Err(closed_error()),
            }
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(Error::RequestTimeout))
    }

    /// Sends a notification, waiting at most `timeout` for room in the
    /// writer's queue: a notification has no answer to time out, but the
    /// wait for room is bounded all the same (a plugin that stopped
    /// reading).
    async fn notify<P: serde::Serialize>(
        &self,
        method: &str,
        params: P,
        timeout: Duration,
    ) -> Result<(), Error> {
        let line = serde_json::to_string(&Notification::new(method.into(), params))?;
        match tokio::time::timeout(timeout, self.writer.send(line)).await {
            Ok(sent) => sent.map_err(|_| closed_error()),
            Err(_) => Err(Error::RequestTimeout),
        }
    }

    /// Hands a response to the call it answers; unknown ids (a call that
    /// already timed out) are dropped.
    fn answer(&self, id: u64, answer: Answer) {
        let caller = match self.pending.lock().as_deref_mut() {
            Ok(Some(pending)) => pending.remove(&id),
            _ => None,
        };
        if let Some(caller) = caller {
            let _ = caller.send(answer);
        }
    }

    /// Fails every pending call and refuses new ones.
    fn close(&self) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.take();
        }
    }
}

struct Forget<'a> {
    client: &'a Client,
    id: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        if let Ok(Some(pending)) = self.client.pending.lock().as_deref_mut() {
            pending.remove(&self.id);
        }
    }
}

/// A [`Client`] whose calls have their own timeout ([`Client::within`]).
pub struct Within<'a> {
    client: &'a Client,
    timeout: Duration,
}

impl ClientT for Client {
    async fn notification<Params>(&self, method: &str, params: Params) -> Result<(), Error>
    where
        Params: ToRpcParams + Send,
    {
        self.within(self.timeout).notification(method, params).await
    }

    async fn request<R, Params>(&self, method: &str, params: Params) -> Result<R, Error>
    where
        R: DeserializeOwned,
        Params: ToRpcParams + Send,
    {
        self.within(self.timeout).request(method, params).await
    }

    /// Not part of the Roboger protocol.
    async fn batch_request<'a, R>(
        &self,
        batch: BatchRequestBuilder<'a>,
    ) -> Result<BatchResponse<'a, R>, Error>
    where
        R: DeserializeOwned + std::fmt::Debug + 'a,
    {
        self.within(self.timeout).batch_request(batch).await
    }
}

impl ClientT for Within<'_> {
    async fn notification<Params>(&self, method: &str, params: Params) -> Result<(), Error>
    where
        Params: ToRpcParams + Send,
    {
        let params = match params.to_rpc_params()? {
            Some(p) => p,
            None => RawValue::from_string("{}".into())?,
        };
        self.client.notify(method, params, self.timeout).await
    }

    async fn request<R, Params>(&self, method: &str, params: Params) -> Result<R, Error>
    where
        R: DeserializeOwned,
        Params: ToRpcParams + Send,
    {
        let result = self
            .client
            .call(method, params.to_rpc_params()?, self.timeout)
            .await?;
        Ok(serde_json::from_str(result.get())?)
    }

    /// Not part of the Roboger protocol.
    async fn batch_request<'a, R>(
        &self,
        _batch: BatchRequestBuilder<'a>,
    ) -> Result<BatchResponse<'a, R>, Error>
    where
        R: DeserializeOwned + std::fmt::Debug + 'a,
    {
        Err(Error::Custom("batch requests are not supported".into()))
    }
}

/// Builds a `Methods` set from a module; a shorthand for `start`'s closure.
pub fn methods_of<C: Send + Sync + 'static>(m: RpcModule<C>) -> Methods {
    m.into()
}

async fn write_loop<W: AsyncWrite + Unpin>(mut write: W, mut rx: mpsc::Receiver<String>) {
    while let Some(mut line) = rx.recv().await {
        line.push('\n');
        if write.write_all(line.as_bytes()).await.is_err() {
            break;
        }
        // Batch what is already queued before flushing.
        while let Ok(mut more) = rx.try_recv() {
            more.push('\n');
            if write.write_all(more.as_bytes()).await.is_err() {
                return;
            }
        }
        if write.flush().await.is_err() {
            break;
        }
    }
    let _ = write.shutdown().await;
}

#[derive(serde::Deserialize)]
struct Probe<'a> {
    #[serde(borrow, default)]
    method: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    id: Option<Value>,
    /// Parsed into a value only for notifications; a request's params are
    /// parsed once, by the method that serves it.
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    /// A response's result (`null` reads as absent).
    #[serde(borrow, default)]
    result: Option<&'a RawValue>,
    /// A response's error, read leniently (see [`error_of`]).
    #[serde(borrow, default)]
    error: Option<&'a RawValue>,
}

/// A response's `error` member as an error object; one without a code or
/// message still fails its call (as an internal error quoting it), rather
/// than closing the whole connection.
fn error_of(raw: &RawValue) -> ErrorObjectOwned {
    serde_json::from_str(raw.get()).unwrap_or_else(|_| {
        ErrorObjectOwned::owned(
            jsonrpsee::types::error::INTERNAL_ERROR_CODE,
            format!("malformed error: {}", preview(raw.get())),
            None::<()>,
        )
    })
}

/// What a panic said: its message when it was a text, as `panic!` makes.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

async fn read_loop<R: AsyncRead + Unpin>(
    read: R,
    opts: PeerOptions,
    methods: Methods,
    writer: mpsc::Sender<String>,
    client: Arc<Client>,
    on_notification: NotificationHandler,
    closed: watch::Sender<Closed>,
) {
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(opts.max_line));
    let incoming = Arc::new(Semaphore::new(opts.max_incoming));
    let notes = serve_notifications(methods.clone());
    let reason = loop {
        let line = match lines.next().await {
            None => break Closed::Eof,
            Some(Ok(l)) => l,
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => break Closed::LineTooLong,
            Some(Err(LinesCodecError::Io(e))) => break Closed::Io(e.to_string()),
        };
        if line.trim().is_empty() {
            continue;
        }
        let probe: Probe = match serde_json::from_str(&line) {
            Ok(p) => p,
            // The line ended inside a message: pretty-printed JSON.
            Err(e) if e.is_eof() => {
                break Closed::Garbage(format!(
                    "{e}: {}; a message must be one whole JSON object on one line, \
                     not spread over several",
                    preview(&line)
                ));
            }
            // Text, not a message: a plugin's print meant for its log.
            Err(e) if !line.trim_start().starts_with(['{', '[']) => {
                break Closed::Garbage(format!(
                    "{e}: {}; this stream carries only JSON-RPC messages (a plugin writes \
                     its log to stderr)",
                    preview(&line)
                ));
            }
            Err(e) => break Closed::Garbage(format!("{e}: {}", preview(&line))),
        };
        match (probe.method, probe.id) {
            (Some(_), Some(id)) => {
                let Ok(permit) = incoming.clone().try_acquire_owned() else {
                    let busy = serde_json::json!({"jsonrpc": "2.0", "id": id,
                        "error": {"code": crate::protocol::codes::BUSY, "message": "too many calls in flight"}});
                    let _ = writer.send(busy.to_string()).await;
                    continue;
                };
                serve(methods.clone(), line, id, writer.clone(), permit);
            }
            // A notification of one of our methods is carried out and not
            // answered, as JSON-RPC has it (a plugin that sends `log`
            // without an id is heard), in the order it came.
            (Some(method), None) if methods.method(&method).is_some() => {
                if line.len() > NOTIFICATION_MAX {
                    tracing::warn!(method = %method, bytes = line.len(), "notification dropped: longer than {NOTIFICATION_MAX} bytes (send it as a request)");
                    continue;
                }
                let Some(line) = with_id(&line, NOTIFICATION_ID) else {
                    continue;
                };
                // A burst waits for room, reading no more meanwhile (the
                // plugin's writes wait in its pipe), at most a call's
                // timeout: a notification that calls back into this very
                // peer cannot hold it longer.
                let queued = tokio::time::timeout(opts.call_timeout, notes.send(line)).await;
                if !matches!(queued, Ok(Ok(()))) {
                    tracing::warn!(method = %method, "notification dropped: {NOTIFICATIONS_QUEUED} still waiting after {:?}", opts.call_timeout);
                }
            }
            (Some(method), None) => {
                let params = probe
                    .params
                    .and_then(|p| serde_json::from_str(p.get()).ok())
                    .unwrap_or(Value::Null);
                on_notification(&method, params)
            }
            // A response (`result` may be null, so the id is what tells).
            (None, Some(id)) => {
                let answer = match (probe.error, probe.result) {
                    (Some(e), _) => Err(error_of(e)),
                    (None, Some(r)) => Ok(r.to_owned()),
                    (None, None) => Ok(RawValue::NULL.to_owned()),
                };
                match id.as_u64() {
                    Some(id) => client.answer(id, answer),
                    // No call of ours has such an id: the other side did
                    // not repeat it as it was sent (a number sent back
                    // as a text, say). Its caller waits out its timeout,
                    // so say why.
                    None => tracing::warn!(
                        "answer dropped: its id {id} is not one this side sent (those are \
                         numbers); an answer must repeat its request's id as it was sent"
                    ),
                }
            }
            (None, None) => {
                break Closed::Garbage(format!("neither request nor response: {}", preview(&line)));
            }
        }
    };
    let _ = closed.send(reason);
    client.close();
}

/// The id a notification served as a request is given; its answer is
/// dropped, so it never meets the other side's ids.
const NOTIFICATION_ID: &str = "notification";

/// The most notifications waiting to be carried out; past them, the read
/// loop waits for room (they cannot be answered busy). With
/// [`NOTIFICATION_MAX`] it bounds what they hold at 64 MiB.
const NOTIFICATIONS_QUEUED: usize = 64;

/// The longest notification carried out: a log line has room, and a
/// larger call is made as a request, bounded by the calls in flight.
const NOTIFICATION_MAX: usize = 1024 * 1024;

/// Starts the task that carries out the notifications of our methods one
/// at a time, in order (a plugin's log lines stay in its order), until
/// the returned sender is dropped with the read loop.
fn serve_notifications(methods: Methods) -> mpsc::Sender<String> {
    let (tx, mut rx) = mpsc::channel::<String>(NOTIFICATIONS_QUEUED);
    // Only what this task says itself is said in the caller's span (the
    // handlers name their plugin already).
    let span = tracing::Span::current();
    let serving = async move {
        while let Some(line) = rx.recv().await {
            let call = std::panic::AssertUnwindSafe(methods.raw_json_request(&line, 1));
            let failed = match call.catch_unwind().await {
                Ok(Ok((answer, _))) => refusal(answer.get()),
                Ok(Err(e)) => Some(format!("not a request: {e}")),
                Err(panic) => Some(format!("its handler panicked: {}", panic_message(&*panic))),
            };
            // It has no answer to carry the error: the log does, with
            // what was sent (a plugin's log line is not lost for a
            // mistake in its params).
            if let Some(why) = failed {
                span.in_scope(|| {
                    tracing::warn!(
                        "notification not carried out ({why}): {}",
                        shortened(&line, NOTIFICATION_SHOWN)
                    )
                });
            }
        }
    };
    tokio::spawn(serving);
    tx
}

/// How much of a notification not carried out the log shows, in
/// characters.
const NOTIFICATION_SHOWN: usize = 4096;

/// The error of a JSON-RPC `answer`, as "message: data", if it is one.
fn refusal(answer: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Answer {
        error: Option<ErrorObjectOwned>,
    }
    let e = serde_json::from_str::<Answer>(answer).ok()?.error?;
    let Some(data) = e.data() else {
        return Some(e.message().to_string());
    };
    let data = match serde_json::from_str::<Value>(data.get()) {
        Ok(Value::String(text)) => text,
        _ => data.get().to_string(),
    };
    // A position would point into the line as re-serialized.
    let data = data
        .rsplit_once(" at line ")
        .map_or(data.as_str(), |(d, _)| d);
    Some(format!("{}: {data}", e.message()))
}

/// `line`, a request without an id, with `id` added.
fn with_id(line: &str, id: &str) -> Option<String> {
    let mut msg: serde_json::Map<String, Value> = serde_json::from_str(line).ok()?;
    msg.insert("id".into(), id.into());
    serde_json::to_string(&msg).ok()
}

/// Serves the request on `line` on its own task, holding `permit` until
/// it is answered. A handler that panics is answered at once, so the
/// caller does not wait out its timeout for an answer that will never
/// come.
fn serve(
    methods: Methods,
    line: String,
    id: Value,
    writer: mpsc::Sender<String>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    tokio::spawn(async move {
        let call = std::panic::AssertUnwindSafe(methods.raw_json_request(&line, 1));
        let answer = match call.catch_unwind().await {
            Ok(Ok((resp, _))) => resp.get().to_string(),
            Ok(Err(e)) => serde_json::json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": -32600, "message": format!("invalid request: {e}")}})
            .to_string(),
            Err(panic) => serde_json::json!({"jsonrpc": "2.0", "id": id,
                "error": {"code": -32603, "message": format!("the call panicked: {}", panic_message(&*panic))}})
            .to_string(),
        };
        let _ = writer.send(answer).await;
        drop(permit);
    });
}

fn preview(s: &str) -> String {
    shortened(s, 120)
}

/// The first `n` characters of `s`, marked when cut.
fn shortened(s: &str, n: usize) -> String {
    let mut p: String = s.chars().take(n).collect();
    if p.len() < s.len() {
        p.push('…');
    }
    p
}

/// Why a call failed without an answer: the peer has closed.
#[derive(Debug, thiserror::Error)]
#[error("the connection is closed")]
pub struct TransportClosed;

#[cfg(test)]
mod tests {
    use super::*;
    use jsonrpsee::core::client::ClientT;
    use jsonrpsee::core::params::ObjectParams;

    fn pair() -> (Peer, Peer) {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let noop: NotificationHandler = Arc::new(|_, _| {});
        // Side A serves "add", "nested" (which calls B's "double") and
        // "panics".
        let a = Peer::start(
            ar,
            aw,
            PeerOptions::default(),
            |client| {
                let mut m = RpcModule::new(client);
                m.register_method("add", |p, _, _| {
                    let v: serde_json::Map<String, Value> = p.parse()?;
                    Ok::<_, jsonrpsee::types::ErrorObjectOwned>(
                        v["x"].as_i64().unwrap_or(0) + v["y"].as_i64().unwrap_or(0),
                    )
                })
                .unwrap();
                m.register_async_method("nested", |p, client, _| async move {
                    let v: serde_json::Map<String, Value> = p.parse()?;
                    let mut params = ObjectParams::new();
                    params.insert("x", v["x"].clone()).unwrap();
                    let r: i64 = client.request("double", params).await.map_err(|e| {
                        jsonrpsee::types::ErrorObjectOwned::owned(-1, e.to_string(), None::<()>)
                    })?;
                    Ok::<_, jsonrpsee::types::ErrorObjectOwned>(r)
                })
                .unwrap();
                m.register_async_method("panics", |_, _, _| async move {
                    if std::hint::black_box(true) {
                        panic!("a bug");
                    }
                    Ok::<_, jsonrpsee::types::ErrorObjectOwned>(0)
                })
                .unwrap();
                m.into()
            },
            noop.clone(),
        );
        let b = Peer::start(
            br,
            bw,
            PeerOptions::default(),
            |_| {
                let mut m = RpcModule::new(());
                m.register_method("double", |p, _, _| {
                    let v: serde_json::Map<String, Value> = p.parse()?;
                    Ok::<_, jsonrpsee::types::ErrorObjectOwned>(v["x"].as_i64().unwrap_or(0) * 2)
                })
                .unwrap();
                m.into()
            },
            noop,
        );
        (a, b)
    }

    #[tokio::test]
    async fn a_handler_that_panics_is_answered_at_once() {
        let (_a, b) = pair();
        let err = b
            .client()
            .request::<i64, _>("panics", ObjectParams::new())
            .await
            .expect_err("a panic is an error");
        assert!(
            err.to_string().contains("the call panicked: a bug"),
            "{err}"
        );
        let mut p = ObjectParams::new();
        p.insert("x", 2).unwrap();
        p.insert("y", 3).unwrap();
        let r: i64 = b.client().request("add", p).await.unwrap();
        assert_eq!(r, 5, "the peer goes on serving");
    }

    #[tokio::test]
    async fn calls_both_ways_with_nested_callbacks() {
        let (a, b) = pair();
        let mut futs = Vec::new();
        for i in 0..200i64 {
            let c = b.client().clone();
            futs.push(tokio::spawn(async move {
                let mut p = ObjectParams::new();
                p.insert("x", i).unwrap();
                let r: i64 = c.request("nested", p).await.unwrap();
                assert_eq!(r, i * 2);
            }));
        }
        for f in futs {
            f.await.unwrap();
        }
        let mut p = ObjectParams::new();
        p.insert("x", 2).unwrap();
        p.insert("y", 3).unwrap();
        p.insert("extra", "ignored").unwrap();
        let r: i64 = b.client().request("add", p).await.unwrap();
        assert_eq!(r, 5);
        drop(a);
    }

    #[tokio::test]
    async fn garbage_closes_and_fails_pending_calls() {
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, aw) = tokio::io::split(a);
        let (_br, mut bw) = tokio::io::split(b);
        let noop: NotificationHandler = Arc::new(|_, _| {});
        let peer = Peer::start(
            ar,
            aw,
            PeerOptions::default(),
            |_| RpcModule::new(()).into(),
            noop,
        );
        let c = peer.client().clone();
        let pending =
            tokio::spawn(async move { c.request::<Value, _>("x", ObjectParams::new()).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        bw.write_all(b"this is not json\n").await.unwrap();
        let closed = peer.closed().await;
        assert!(
            matches!(&closed, Closed::Garbage(why) if why.contains("this is not json")
                && why.contains("a plugin writes its log to stderr")),
            "{closed:?}"
        );
        assert!(pending.await.unwrap().is_err());
    }

    type Lines =
        tokio::io::Lines<tokio::io::BufReader<tokio::io::ReadHalf<tokio::io::DuplexStream>>>;

    /// The other side of a peer, driven by hand: reads the requests the
    /// peer writes and answers them.
    struct Hand {
        lines: Lines,
        answers: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    }

    impl Hand {
        /// Starts a peer with `timeout` on its calls, and its other side.
        fn start(timeout: Duration) -> (Peer, Hand) {
            use tokio::io::AsyncBufReadExt;
            let (a, b) = tokio::io::duplex(1 << 16);
            let (ar, aw) = tokio::io::split(a);
            let (br, bw) = tokio::io::split(b);
            let noop: NotificationHandler = Arc::new(|_, _| {});
            let opts = PeerOptions {
                call_timeout: timeout,
                ..PeerOptions::default()
            };
            let peer = Peer::start(ar, aw, opts, |_| RpcModule::new(()).into(), noop);
            let hand = Hand {
                lines: tokio::io::BufReader::new(br).lines(),
                answers: bw,
            };
            (peer, hand)
        }

        /// Reads the next request and answers it with `member`
        /// (`{"result": ...}` or `{"error": ...}`).
        async fn answer_next(&mut self, member: Value) {
            let line = self.lines.next_line().await.unwrap().unwrap();
            let request: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(request["jsonrpc"], "2.0");
            let mut reply = serde_json::json!({"jsonrpc": "2.0", "id": request["id"]});
            if let (Some(r), Value::Object(m)) = (reply.as_object_mut(), member) {
                r.extend(m);
            }
            let line = format!("{reply}\n");
            self.answers.write_all(line.as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn errors_and_null_results_reach_the_caller() {
        let (peer, mut hand) = Hand::start(Duration::from_secs(5));
        let c = peer.client().clone();
        let call = tokio::spawn(async move {
            let failed = c.request::<Value, _>("a", ObjectParams::new()).await;
            let null = c.request::<Value, _>("b", ObjectParams::new()).await;
            (failed, null)
        });
        let refused = serde_json::json!({"error": {"code": -32001, "message": "refused"}});
        hand.answer_next(refused).await;
        hand.answer_next(serde_json::json!({"result": null})).await;
        let (failed, null) = call.await.unwrap();
        match failed {
            Err(Error::Call(e)) => {
                assert_eq!(e.code(), -32001);
                assert_eq!(e.message(), "refused");
            }
            other => panic!("expected a call error, got {other:?}"),
        }
        assert_eq!(null.unwrap(), Value::Null);
    }

    #[tokio::test]
    async fn a_malformed_error_fails_the_call_not_the_peer() {
        let (peer, mut hand) = Hand::start(Duration::from_secs(5));
        let c = peer.client().clone();
        let call =
            tokio::spawn(async move { c.request::<Value, _>("a", ObjectParams::new()).await });
        let no_code = serde_json::json!({"error": {"message": "no code"}});
        hand.answer_next(no_code).await;
        match call.await.unwrap() {
            Err(Error::Call(e)) => assert!(e.message().contains("no code"), "{e:?}"),
            other => panic!("expected a call error, got {other:?}"),
        }
        assert!(peer.is_open());
    }

    #[tokio::test]
    async fn a_late_answer_after_a_timeout_is_dropped() {
        let (peer, mut hand) = Hand::start(Duration::from_millis(50));
        let c = peer.client().clone();
        let late = c.request::<Value, _>("slow", ObjectParams::new()).await;
        assert!(matches!(late, Err(Error::RequestTimeout)), "{late:?}");
        hand.answer_next(serde_json::json!({"result": 1})).await;
        // The peer stays open, and the next call gets its own answer.
        let next =
            tokio::spawn(async move { c.request::<i64, _>("fast", ObjectParams::new()).await });
        hand.answer_next(serde_json::json!({"result": 2})).await;
        assert_eq!(next.await.unwrap().unwrap(), 2);
        assert!(peer.is_open());
        let pending = peer.client().pending.lock().unwrap();
        assert!(pending.as_ref().is_some_and(HashMap::is_empty));
    }

    /// A notification naming one of our methods is carried out, in the
    /// order it came, and not answered (a burst past the queue waits for
    /// room; one over NOTIFICATION_MAX is dropped); one naming none goes
    /// to the notification handler.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_notification_of_a_method_is_served_without_an_answer() {
        use tokio::io::AsyncBufReadExt;
        let (a, b) = tokio::io::duplex(1 << 16);
        let (ar, aw) = tokio::io::split(a);
        let (br, mut bw) = tokio::io::split(b);
        let logged = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let heard = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let on_notification: NotificationHandler = {
            let heard = heard.clone();
            Arc::new(move |method, _| heard.lock().unwrap().push(method.to_string()))
        };
        let module_logged = logged.clone();
        let _peer = Peer::start(
            ar,
            aw,
            PeerOptions::default(),
            move |_| {
                let mut m = RpcModule::new(module_logged);
                m.register_method("log", |p, logged, _| {
                    let v: serde_json::Map<String, Value> = p.parse()?;
                    let message = v["message"].as_str().unwrap_or_default().to_string();
                    logged.lock().unwrap().push(message);
                    Ok::<_, jsonrpsee::types::ErrorObjectOwned>(())
                })
                .unwrap();
                m.into()
            },
            on_notification,
        );
        let mut lines = String::new();
        let sent: Vec<String> = (0..100).map(|i| format!("note {i}")).collect();
        let note = |message: &str| {
            let note = serde_json::json!({"jsonrpc": "2.0", "method": "log",
                "params": {"level": "info", "message": message}});
            format!("{note}\n")
        };
        for (i, message) in sent.iter().enumerate() {
            // One past NOTIFICATION_MAX, amid the others, is dropped.
            if i == 50 {
                lines.push_str(&note(&"x".repeat(NOTIFICATION_MAX)));
            }
            lines.push_str(&note(message));
        }
        lines.push_str(concat!(
            r#"{"jsonrpc":"2.0","method":"shutdown"}"#,
            "\n",
            r#"{"jsonrpc":"2.0","id":7,"method":"log","params":{"level":"info","message":"asked"}}"#,
            "\n",
        ));
        bw.write_all(lines.as_bytes()).await.unwrap();
        let mut answers = tokio::io::BufReader::new(br).lines();
        let first = answers.next_line().await.unwrap().unwrap();
        let first: Value = serde_json::from_str(&first).unwrap();
        assert_eq!(first["id"], 7, "only the request is answered: {first}");
        poll(|| logged.lock().unwrap().len() > sent.len()).await;
        let got = logged.lock().unwrap().clone();
        assert!(got.contains(&"asked".to_string()));
        let notes: Vec<&String> = got.iter().filter(|m| *m != "asked").collect();
        assert_eq!(
            notes,
            sent.iter().collect::<Vec<_>>(),
            "in the order sent, the long one dropped"
        );
        assert_eq!(*heard.lock().unwrap(), ["shutdown"]);
    }

    async fn poll(done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened");
    }

    /// A side that reads nothing fills the pipe, then the writer's queue;
    /// a notification then gives up at the call timeout instead of
    /// waiting for room for ever (a server's shutdown waits on it).
    #[tokio::test(start_paused = true)]
    async fn a_notification_to_a_side_that_reads_nothing_gives_up() {
        let (peer, _hand) = Hand::start(Duration::from_secs(2));
        let big = Value::String("x".repeat(16 * 1024));
        let filled = tokio::time::timeout(Duration::from_secs(600), async {
            let mut sent = 0usize;
            while peer.notify("fill", big.clone()).await {
                sent += 1;
            }
            sent
        })
        .await
        .expect("notify gave up within its timeout, not never");
        // The pipe (64 KiB), the writer's buffer and its queue of 1024 lines.
        assert!(filled >= 1024, "gave up after {filled} notifications");
        let started = tokio::time::Instant::now();
        let c = peer.client().clone();
        let r = c.notification("more", ObjectParams::new()).await;
        assert!(matches!(r, Err(Error::RequestTimeout)), "{r:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert!(peer.is_open());
    }

    #[tokio::test]
    async fn dropping_the_peer_fails_pending_calls_at_once() {
        let (peer, _hand) = Hand::start(Duration::from_secs(30));
        let c = peer.client().clone();
        let call =
            tokio::spawn(async move { c.request::<Value, _>("a", ObjectParams::new()).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(peer);
        let failed = tokio::time::timeout(Duration::from_secs(5), call)
            .await
            .expect("the call fails at once, not at its timeout")
            .unwrap();
        assert!(matches!(failed, Err(Error::Transport(_))), "{failed:?}");
    }
}
