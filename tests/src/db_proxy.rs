//! A TCP proxy between a server and its PostgreSQL or MySQL that can lose
//! the answer to one group commit: the commit reaches the database and
//! takes effect, and the server sees its connection end instead of the
//! answer, as when the network between them fails or a connection pooler
//! restarts at that moment.
//!
//! It reads the database's wire protocol only as far as it must to know
//! a group commit's last message, and holds back what the database
//! answers to it until that answer is complete (the commit is over by
//! then), when it closes both sides of the connection:
//!
//! - PostgreSQL: a connection that prepared the group commit (a Parse
//!   message with the commit's `INSERT INTO event`) is a commit
//!   connection; its next Bind, once armed, is the commit, and its
//!   answer ends with ReadyForQuery.
//! - MySQL: a transaction that ran a prepared `INSERT INTO `event``
//!   (statement ids read from the answers to their COM_STMT_PREPARE) is
//!   a group commit; its `COMMIT` query, once armed, is the commit, and
//!   its answer is one packet.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Text of PostgreSQL's group commit that names its connection.
const PG_COMMIT_MARK: &[u8] = b"INSERT INTO event (id";
/// Text of MySQL's insert of events.
const MY_COMMIT_MARK: &[u8] = b"INSERT INTO `event`";

/// A running proxy; it stops, with its connections, when dropped.
pub struct DbProxy {
    url: String,
    armed: Arc<AtomicBool>,
    lost: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

/// What a connection's two directions share.
#[derive(Clone)]
struct Shared {
    /// The next commit's answer is to be lost.
    armed: Arc<AtomicBool>,
    /// How many were.
    lost: Arc<AtomicUsize>,
    /// This connection's answer now is.
    doomed: Arc<AtomicBool>,
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
        let armed = Arc::new(AtomicBool::new(false));
        let lost = Arc::new(AtomicUsize::new(0));
        let (a, l) = (armed.clone(), lost.clone());
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else {
                    continue;
                };
                // Each message is written as it is read: no waiting for
                // the next to fill a segment.
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let shared = Shared {
                    armed: a.clone(),
                    lost: l.clone(),
                    doomed: Arc::new(AtomicBool::new(false)),
                };
                if mysql {
                    connections.spawn(relay_mysql(client, server, shared));
                } else {
                    connections.spawn(relay_pg(client, server, shared));
                }
                while connections.try_join_next().is_some() {}
            }
        });
        DbProxy {
            url: url.to_string(),
            armed,
            lost,
            task,
        }
    }

    /// The database's URL through the proxy.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The next group commit's answer is lost (see the module's docs).
    pub fn lose_next_commit_answer(&self) {
        self.armed.store(true, Ordering::SeqCst);
    }

    /// How many commits' answers were lost so far.
    pub fn answers_lost(&self) -> usize {
        self.lost.load(Ordering::SeqCst)
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
    let (cr, mut cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    let to_server = {
        let shared = shared.clone();
        async move {
            let mut cr = BufReader::new(cr);
            let mut commits = false;
            let mut typed = false;
            while let Some((kind, m)) = pg_message(&mut cr, typed).await {
                typed = true;
                commits |= kind == b'P' && holds(&m, PG_COMMIT_MARK);
                if kind == b'B' && commits && shared.armed.swap(false, Ordering::SeqCst) {
                    shared.doomed.store(true, Ordering::SeqCst);
                }
                if sw.write_all(&m).await.is_err() {
                    return;
                }
            }
        }
    };
    let to_client = async move {
        let mut sr = BufReader::new(sr);
        while let Some((kind, m)) = pg_message(&mut sr, true).await {
            if shared.doomed.load(Ordering::SeqCst) {
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
    // Whichever ends first, both sockets close with the halves dropped.
    tokio::select! {
        _ = to_server => {}
        _ = to_client => {}
    }
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

/// A prepared statement's id in a command's payload (after its byte).
fn statement_id(payload: &[u8]) -> Option<u32> {
    Some(u32::from_le_bytes(payload.get(1..5)?.try_into().ok()?))
}

/// Relays one MySQL connection until either side ends it, or its answer
/// is lost.
async fn relay_mysql(client: TcpStream, server: TcpStream, shared: Shared) {
    let (cr, mut cw) = client.into_split();
    let (sr, mut sw) = server.into_split();
    // The ids of the statements that insert events, and whether the
    // answer to a prepare of one is awaited.
    let inserts: Arc<Mutex<(HashSet<u32>, bool)>> = Arc::default();
    let to_server = {
        let (shared, inserts) = (shared.clone(), inserts.clone());
        async move {
            let mut cr = BufReader::new(cr);
            let mut in_commit = false;
            while let Some((seq, payload, m)) = my_packet(&mut cr).await {
                // A command is the first packet of its exchange; the
                // handshake's packets and a long packet's rest are not.
                if seq == 0 {
                    let text = payload.get(1..).unwrap_or_default();
                    match payload.first() {
                        // COM_STMT_PREPARE
                        Some(0x16) if holds(text, MY_COMMIT_MARK) => {
                            if let Ok(mut i) = inserts.lock() {
                                i.1 = true;
                            }
                        }
                        // COM_STMT_EXECUTE
                        Some(0x17) => {
                            let id = statement_id(&payload);
                            in_commit |= inserts
                                .lock()
                                .is_ok_and(|i| id.is_some_and(|id| i.0.contains(&id)));
                        }
                        // COM_QUERY
                        Some(0x03) if text.eq_ignore_ascii_case(b"COMMIT") => {
                            if in_commit && shared.armed.swap(false, Ordering::SeqCst) {
                                shared.doomed.store(true, Ordering::SeqCst);
                            }
                            in_commit = false;
                        }
                        Some(0x03) if text.eq_ignore_ascii_case(b"ROLLBACK") => in_commit = false,
                        _ => {}
                    }
                }
                if sw.write_all(&m).await.is_err() {
                    return;
                }
            }
        }
    };
    let to_client = async move {
        let mut sr = BufReader::new(sr);
        while let Some((seq, payload, m)) = my_packet(&mut sr).await {
            if shared.doomed.load(Ordering::SeqCst) {
                // The answer to COMMIT: one OK or error packet.
                shared.lost.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if let Ok(mut i) = inserts.lock()
                && i.1
                && seq == 1
            {
                // COM_STMT_PREPARE_OK, or an error.
                i.1 = false;
                if payload.first() == Some(&0)
                    && let Some(id) = statement_id(&payload)
                {
                    i.0.insert(id);
                }
            }
            if cw.write_all(&m).await.is_err() {
                return;
            }
        }
    };
    // Whichever ends first, both sockets close with the halves dropped.
    tokio::select! {
        _ = to_server => {}
        _ = to_client => {}
    }
}
