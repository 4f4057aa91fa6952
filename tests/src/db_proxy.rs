//! A TCP proxy between a server and its PostgreSQL or MySQL that can lose
//! the answer to one commit: the commit reaches the database and takes
//! effect, and the server sees its connection end instead of the answer,
//! as when the network between them fails or a connection pooler
//! restarts at that moment.
//!
//! It reads the database's wire protocol only as far as it must to know
//! each statement's text and a commit's last message, and holds back what
//! the database answers to that message until the answer is complete (the
//! commit is over by then), when it closes both sides of the connection.
//! Two commits can be lost ([`Lose`]): a push's group commit, and the
//! `COMMIT` of a transaction that ran a statement holding a given text.
//! PostgreSQL's group commit is one statement in an implicit transaction,
//! whose Bind message is the commit; elsewhere the commit is a `COMMIT`
//! query. Statement texts are read from PostgreSQL's Parse messages (by
//! statement name) and MySQL's COM_STMT_PREPARE (by the id its answer
//! gives).
//!
//! It can also break every connection open at once, wherever its
//! exchange is ([`DbProxy::break_all`]), for a network that flaps; keep
//! the database out of reach for a while ([`DbProxy::go_down`]),
//! closing each new connection at once, as a database that is down or
//! failing over; and leave every connection open now without another
//! byte either way, for good, while new ones are served
//! ([`DbProxy::silence_all`]), as after a failover whose old primary
//! vanished with no reset reaching anyone. And it can hold back for a
//! while what the database answers to a statement, which has taken
//! effect meanwhile ([`DbProxy::delay_at`], [`DbProxy::delay_commit_after`]),
//! as a slow network does.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Text of PostgreSQL's group commit.
const PG_COMMIT_MARK: &[u8] = b"INSERT INTO event (id";
/// Text of MySQL's insert of events (in its group commit).
const MY_COMMIT_MARK: &[u8] = b"INSERT INTO `event`";

/// Which commit's answer the proxy loses next.
#[derive(Clone, Debug)]
pub enum Lose {
    /// A group commit of pushes (on PostgreSQL also one of outcomes
    /// alone, the same statement: let the deliveries settle first).
    GroupCommit,
    /// The `COMMIT` of a transaction that ran a statement holding one of
    /// these texts.
    CommitAfter(Vec<String>),
}

/// A running proxy; it stops, with its connections, when dropped.
pub struct DbProxy {
    url: String,
    armed: Arc<Mutex<Option<Lose>>>,
    lost: Arc<AtomicUsize>,
    breaks: tokio::sync::watch::Sender<u64>,
    silences: tokio::sync::watch::Sender<u64>,
    silence_at: Arc<Mutex<Vec<String>>>,
    silenced: Arc<AtomicUsize>,
    delay_at: Arc<Mutex<Vec<Delay>>>,
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// What the proxy's connections share.
#[derive(Clone)]
struct Shared {
    /// The commit whose answer is lost next, if any.
    armed: Arc<Mutex<Option<Lose>>>,
    /// How many answers were.
    lost: Arc<AtomicUsize>,
    /// Bumped to break every connection open.
    breaks: tokio::sync::watch::Sender<u64>,
    /// Bumped to silence every connection open.
    silences: tokio::sync::watch::Sender<u64>,
    /// Texts in statements whose connections are silenced as they send
    /// them, each once.
    silence_at: Arc<Mutex<Vec<String>>>,
    /// How many were.
    silenced: Arc<AtomicUsize>,
    /// Statements whose answers are held back for a while as they run,
    /// each once.
    delay_at: Arc<Mutex<Vec<Delay>>>,
}

/// Which statement's answers are held back, and for how long.
struct Delay {
    /// A text the statement holds, or (`commit`) one a statement of its
    /// transaction held.
    mark: String,
    /// The statement is the `COMMIT` of a transaction that ran `mark`.
    commit: bool,
    hold: std::time::Duration,
}

impl Shared {
    /// Whether a statement of text `text`, about to be sent, silences its
    /// connection; the mark it holds is then used up.
    fn silences(&self, text: &[u8]) -> bool {
        let Ok(mut marks) = self.silence_at.lock() else {
            return false;
        };
        let Some(i) = marks.iter().position(|m| holds(text, m.as_bytes())) else {
            return false;
        };
        marks.remove(i);
        self.silenced.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// How long the answers to a statement of text `text`, run now in a
    /// transaction that ran `ran` before it, are held back, if they are;
    /// the mark is then used up.
    fn delays(&self, text: &[u8], ran: &Transaction) -> Option<std::time::Duration> {
        let mut marks = self.delay_at.lock().ok()?;
        let i = marks.iter().position(|d| match d.commit {
            false => holds(text, d.mark.as_bytes()),
            true => is(text, "COMMIT") && ran.0.iter().any(|t| holds(t, d.mark.as_bytes())),
        })?;
        Some(marks.remove(i).hold)
    }

    /// Whether the message that ends a commit, in a transaction that ran
    /// statements `ran` (the group commit's: `group`), is the one to lose;
    /// disarms the proxy if so.
    fn takes(&self, group: bool, ran: &[Arc<[u8]>]) -> bool {
        let Ok(mut armed) = self.armed.lock() else {
            return false;
        };
        let hit = match armed.as_ref() {
            Some(Lose::GroupCommit) => group,
            Some(Lose::CommitAfter(marks)) => ran
                .iter()
                .any(|t| marks.iter().any(|m| holds(t, m.as_bytes()))),
            None => false,
        };
        if hit {
            *armed = None;
        }
        hit
    }
}

impl DbProxy {
    /// Listens on a loopback port for the PostgreSQL or MySQL database
    /// `upstream` (a URL) names.
    pub async fn start(upstream: &str) -> DbProxy {
        let mut url = url::Url::parse(upstream).expect("a database URL");
        let mysql = url.scheme().starts_with("mysql");
        let target = format!(
            "{}:{}",
            url.host_str().expect("a host"),
            url.port().unwrap_or(if mysql { 3306 } else { 5432 })
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("local address").port();
        url.set_port(Some(port)).expect("a port");
        // Its messages are read: no TLS.
        url.query_pairs_mut().append_pair(
            if mysql { "ssl-mode" } else { "sslmode" },
            if mysql { "DISABLED" } else { "disable" },
        );
        let shared = Shared {
            armed: Arc::default(),
            lost: Arc::default(),
            breaks: tokio::sync::watch::Sender::new(0),
            silences: tokio::sync::watch::Sender::new(0),
            silence_at: Arc::default(),
            silenced: Arc::default(),
            delay_at: Arc::default(),
        };
        let (armed, lost, breaks) = (
            shared.armed.clone(),
            shared.lost.clone(),
            shared.breaks.clone(),
        );
        let (silences, silence_at, silenced) = (
            shared.silences.clone(),
            shared.silence_at.clone(),
            shared.silenced.clone(),
        );
        let delay_at = shared.delay_at.clone();
        let down = Arc::new(AtomicBool::new(false));
        let refusing = down.clone();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                if refusing.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                // Each message is written as it is read: no waiting for
                // the next to fill a segment.
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                if mysql {
                    connections.spawn(relay_mysql(client, server, shared.clone()));
                } else {
                    connections.spawn(relay_pg(client, server, shared.clone()));
                }
                while connections.try_join_next().is_some() {}
            }
        });
        DbProxy {
            url: url.to_string(),
            armed,
            lost,
            breaks,
            silences,
            silence_at,
            silenced,
            delay_at,
            down,
            task,
        }
    }

    /// The database's URL through the proxy.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The next commit of kind `what` has its answer lost.
    pub fn lose_next(&self, what: Lose) {
        if let Ok(mut armed) = self.armed.lock() {
            *armed = Some(what);
        }
    }

    /// How many commits' answers were lost so far.
    pub fn answers_lost(&self) -> usize {
        self.lost.load(Ordering::SeqCst)
    }

    /// Breaks every connection open now, wherever its exchange is (a
    /// network fault for all of them at once).
    pub fn break_all(&self) {
        self.breaks.send_modify(|n| *n += 1);
    }

    /// Breaks every connection open and closes each new one at once,
    /// until [`DbProxy::come_up`]: the database is out of reach.
    pub fn go_down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.break_all();
    }

    /// Lets connections through again.
    pub fn come_up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }

    /// Every connection open now carries no more bytes, either way, and
    /// is never closed (until the proxy is dropped); new connections are
    /// served as before. What a server sees of a database host that
    /// vanished, or a network path cut, when no reset reaches it, but
    /// for good rather than until TCP gives up (about 15 minutes with
    /// Linux's defaults).
    pub fn silence_all(&self) {
        self.silences.send_modify(|n| *n += 1);
    }

    /// For each of `marks`, the next connection to send a statement
    /// holding it falls silent as [`DbProxy::silence_all`] leaves each,
    /// before that statement reaches the database: what the statements
    /// before it in its transaction did (rows they locked) stays so in
    /// the database until it ends the session itself.
    pub fn silence_at(&self, marks: &[&str]) {
        if let Ok(mut armed) = self.silence_at.lock() {
            armed.extend(marks.iter().map(|m| m.to_string()));
        }
    }

    /// For each of `marks`, what the database answers to the next
    /// statement run holding it (a simple query, or a prepared one
    /// executed) and to what its connection sends after it is held back
    /// for `hold`: the statement has taken effect (and in a transaction,
    /// holds its locks) while its client waits for the answer.
    pub fn delay_at(&self, marks: &[&str], hold: std::time::Duration) {
        self.delay(marks, false, hold);
    }

    /// As [`DbProxy::delay_at`], for the `COMMIT` of the next transaction
    /// that ran a statement holding each of `marks`: the transaction is
    /// committed while its client waits for the answer.
    pub fn delay_commit_after(&self, marks: &[&str], hold: std::time::Duration) {
        self.delay(marks, true, hold);
    }

    /// How many of the marks given [`DbProxy::delay_at`] and
    /// [`DbProxy::delay_commit_after`] no statement has used yet.
    pub fn delays_left(&self) -> usize {
        self.delay_at.lock().map_or(0, |armed| armed.len())
    }

    fn delay(&self, marks: &[&str], commit: bool, hold: std::time::Duration) {
        if let Ok(mut armed) = self.delay_at.lock() {
            armed.extend(marks.iter().map(|m| Delay {
                mark: m.to_string(),
                commit,
                hold,
            }));
        }
    }

    /// How many connections [`DbProxy::silence_at`] silenced so far.
    pub fn silenced(&self) -> usize {
        self.silenced.load(Ordering::SeqCst)
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `text` holds `mark`.
fn holds(text: &[u8], mark: &[u8]) -> bool {
    text.windows(mark.len()).any(|w| w == mark)
}

/// The NUL-terminated string at the start of `b`, and what follows it.
fn c_string(b: &[u8]) -> (&[u8], &[u8]) {
    match b.iter().position(|&c| c == 0) {
        Some(i) => (&b[..i], &b[i + 1..]),
        None => (b, &[]),
    }
}

/// Whether a query's text is `word` (`COMMIT`, `ROLLBACK`).
fn is(text: &[u8], word: &str) -> bool {
    let text = c_string(text).0;
    text.trim_ascii().eq_ignore_ascii_case(word.as_bytes())
}

/// The texts of the statements a connection's open transaction ran.
#[derive(Default)]
struct Transaction(Vec<Arc<[u8]>>);

impl Transaction {
    /// A simple query `text` was sent: whether it is the `COMMIT` whose
    /// answer is to be lost (it ends the transaction, as `ROLLBACK`
    /// does). A transaction that ran `group_mark` is a group commit.
    fn query(&mut self, text: &[u8], shared: &Shared, group_mark: &[u8]) -> bool {
        if is(text, "COMMIT") {
            let ran = std::mem::take(&mut self.0);
            let group = ran.iter().any(|t| holds(t, group_mark));
            return shared.takes(group, &ran);
        }
        if is(text, "ROLLBACK") {
            self.0.clear();
        }
        false
    }
}

/// Closes both sides once the answer to the message a connection's
/// client sent last is complete, when that message was the one to lose.
/// Both directions see it: the client's side sets it before sending.
type Doomed = Arc<std::sync::atomic::AtomicBool>;

/// Until when a connection's answers are held back, if they are: set by
/// its client's side as it sends the statement, waited out by the
/// database's side before it passes anything on.
type Held = Arc<Mutex<Option<tokio::time::Instant>>>;

/// Holds a connection's answers back for `hold`, if given.
fn hold_answers(held: &Held, hold: Option<std::time::Duration>) {
    if let (Some(hold), Ok(mut until)) = (hold, held.lock()) {
        *until = Some(tokio::time::Instant::now() + hold);
    }
}

/// Waits out the hold on a connection's answers, if there is one.
async fn wait_held(held: &Held) {
    let until = held.lock().ok().and_then(|mut h| h.take());
    if let Some(until) = until {
        tokio::time::sleep_until(until).await;
    }
}

/// Sends a client's message `m` on to the database, the connection
/// doomed first when the answer to it is to be lost; false once the
/// database's side is gone.
async fn pass_on(sw: &mut OwnedWriteHalf, m: &[u8], lose: bool, doomed: &Doomed) -> bool {
    if lose {
        doomed.store(true, Ordering::SeqCst);
    }
    sw.write_all(m).await.is_ok()
}

/// Runs a connection's two directions until either ends, or every
/// connection is broken: both sockets close with their halves dropped.
/// Once every connection is silenced, neither direction is run again
/// and the sockets are held open.
async fn both(
    to_server: impl Future<Output = ()>,
    to_client: impl Future<Output = ()>,
    shared: &Shared,
) {
    let mut breaks = shared.breaks.subscribe();
    let mut silences = shared.silences.subscribe();
    let (mut to_server, mut to_client) = (std::pin::pin!(to_server), std::pin::pin!(to_client));
    let silenced = tokio::select! {
        _ = &mut to_server => false,
        _ = &mut to_client => false,
        _ = breaks.changed() => false,
        _ = silences.changed() => true,
    };
    if silenced {
        // Both directions held, never polled again: their sockets stay
        // open and carry nothing.
        std::future::pending::<()>().await;
    }
}

/// One PostgreSQL message: its type byte (none for the startup message)
/// and the whole message as read.
async fn pg_message(r: &mut (impl AsyncRead + Unpin), typed: bool) -> Option<(u8, Vec<u8>)> {
    let kind = if typed { r.read_u8().await.ok()? } else { 0 };
    let len = r.read_u32().await.ok()?;
    let mut body = vec![0; usize::try_from(len).ok()?.checked_sub(4)?];
    r.read_exact(&mut body).await.ok()?;
    let mut whole = Vec::with_capacity(body.len() + 5);
    if typed {
        whole.push(kind);
    }
    whole.extend_from_slice(&len.to_be_bytes());
    whole.extend_from_slice(&body);
    Some((kind, whole))
}

/// Relays one PostgreSQL connection until either side ends it, or its
/// answer is lost.
async fn relay_pg(client: TcpStream, server: TcpStream, shared: Shared) {
    let links = shared.clone();
    let (cr, mut cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    let doomed = Doomed::default();
    let held = Held::default();
    let to_server = {
        let (shared, doomed, held) = (shared.clone(), doomed.clone(), held.clone());
        async move {
            let mut cr = BufReader::new(cr);
            // Statement texts by name, and those the open transaction ran.
            let mut statements: HashMap<Vec<u8>, Arc<[u8]>> = HashMap::new();
            let mut tx = Transaction::default();
            let mut typed = false;
            while let Some((kind, m)) = pg_message(&mut cr, typed).await {
                let body = m.get(5..).unwrap_or_default();
                let text = match (typed, kind) {
                    (true, b'P') => c_string(c_string(body).1).0,
                    (true, b'B') => statements
                        .get(c_string(c_string(body).1).0)
                        .map_or(&[][..], |t| t),
                    (true, b'Q') => body,
                    _ => &[],
                };
                if shared.silences(text) {
                    return std::future::pending().await;
                }
                // Run by a Bind or a simple query (a Parse only names it).
                if matches!((typed, kind), (true, b'B' | b'Q')) {
                    hold_answers(&held, shared.delays(text, &tx));
                }
                let lose = match (typed, kind) {
                    // Parse: statement name, text.
                    (true, b'P') => {
                        let (name, rest) = c_string(body);
                        statements.insert(name.to_vec(), c_string(rest).0.into());
                        false
                    }
                    // Bind: portal name, statement name.
                    (true, b'B') => {
                        let name = c_string(c_string(body).1).0;
                        match statements.get(name) {
                            Some(text) if holds(text, PG_COMMIT_MARK) => {
                                // Its own transaction, ended by its Sync.
                                shared.takes(true, &[])
                            }
                            Some(text) => {
                                tx.0.push(text.clone());
                                false
                            }
                            None => false,
                        }
                    }
                    // A simple query (the group commit, a Bind above, is
                    // never in such a transaction).
                    (true, b'Q') => tx.query(body, &shared, PG_COMMIT_MARK),
                    _ => false,
                };
                typed = true;
                if !pass_on(&mut sw, &m, lose, &doomed).await {
                    return;
                }
            }
        }
    };
    let to_client = async move {
        let mut sr = BufReader::new(sr);
        while let Some((kind, m)) = pg_message(&mut sr, true).await {
            wait_held(&held).await;
            if doomed.load(Ordering::SeqCst) {
                // The answer ends with ReadyForQuery.
                if kind == b'Z' {
                    shared.lost.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                continue;
            }
            if cw.write_all(&m).await.is_err() {
                return;
            }
        }
    };
    both(to_server, to_client, &links).await;
}

/// One MySQL packet: its sequence number, its payload, and the whole
/// packet as read.
async fn my_packet(r: &mut (impl AsyncRead + Unpin)) -> Option<(u8, Vec<u8>, Vec<u8>)> {
    let mut head = [0u8; 4];
    r.read_exact(&mut head).await.ok()?;
    let len = usize::from(head[0]) | usize::from(head[1]) << 8 | usize::from(head[2]) << 16;
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await.ok()?;
    let mut whole = head.to_vec();
    whole.extend_from_slice(&payload);
    Some((head[3], payload, whole))
}

/// A prepared statement's id in a payload (after its first byte).
fn statement_id(payload: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(payload.get(1..5)?.try_into().ok()?))
}

/// A MySQL connection's statements: texts by id, and the text of a
/// prepare whose answer (with its id) is awaited.
#[derive(Default)]
struct MyStatements {
    by_id: HashMap<u32, Arc<[u8]>>,
    preparing: Option<Arc<[u8]>>,
}

/// Relays one MySQL connection until either side ends it, or its answer
/// is lost.
async fn relay_mysql(client: TcpStream, server: TcpStream, shared: Shared) {
    let links = shared.clone();
    let (cr, mut cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    let doomed = Doomed::default();
    let held = Held::default();
    let statements: Arc<Mutex<MyStatements>> = Arc::default();
    let to_server = {
        let (shared, doomed, statements) = (shared.clone(), doomed.clone(), statements.clone());
        let held = held.clone();
        async move {
            let mut cr = BufReader::new(cr);
            let mut tx = Transaction::default();
            while let Some((seq, payload, m)) = my_packet(&mut cr).await {
                // A command is the first packet of its exchange; the
                // handshake's packets and a long packet's rest are not.
                let text = payload.get(1..).unwrap_or_default();
                let executed = match (seq, payload.first()) {
                    (0, Some(0x17)) => statements
                        .lock()
                        .ok()
                        .and_then(|st| st.by_id.get(&statement_id(&payload)?).cloned()),
                    _ => None,
                };
                let command = matches!((seq, payload.first()), (0, Some(0x16 | 0x03)));
                if (command && shared.silences(text))
                    || executed.as_ref().is_some_and(|t| shared.silences(t))
                {
                    return std::future::pending().await;
                }
                // Run by COM_STMT_EXECUTE or COM_QUERY.
                let run = match (seq, payload.first()) {
                    (0, Some(0x03)) => Some(text),
                    _ => executed.as_deref(),
                };
                if let Some(run) = run {
                    hold_answers(&held, shared.delays(run, &tx));
                }
                let lose = match (seq, payload.first()) {
                    // COM_STMT_PREPARE
                    (0, Some(0x16)) => {
                        if let Ok(mut st) = statements.lock() {
                            st.preparing = Some(text.into());
                        }
                        false
                    }
                    // COM_STMT_EXECUTE
                    (0, Some(0x17)) => {
                        let text = statements
                            .lock()
                            .ok()
                            .and_then(|st| st.by_id.get(&statement_id(&payload)?).cloned());
                        tx.0.extend(text);
                        false
                    }
                    // COM_QUERY
                    (0, Some(0x03)) => tx.query(text, &shared, MY_COMMIT_MARK),
                    _ => false,
                };
                if !pass_on(&mut sw, &m, lose, &doomed).await {
                    return;
                }
            }
        }
    };
    let to_client = async move {
        let mut sr = BufReader::new(sr);
        while let Some((seq, payload, m)) = my_packet(&mut sr).await {
            wait_held(&held).await;
            if doomed.load(Ordering::SeqCst) {
                // The answer to COMMIT: one OK or error packet.
                shared.lost.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if seq == 1
                && let Ok(mut st) = statements.lock()
                && let Some(text) = st.preparing.take()
                // COM_STMT_PREPARE_OK, or an error.
                && payload.first() == Some(&0)
                && let Some(id) = statement_id(&payload)
            {
                st.by_id.insert(id, text);
            }
            if cw.write_all(&m).await.is_err() {
                return;
            }
        }
    };
    both(to_server, to_client, &links).await;
}
