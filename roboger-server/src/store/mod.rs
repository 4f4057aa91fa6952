//! Persistent state, on SQLite (default), PostgreSQL or MySQL through
//! sea-orm: the connection, migrations and errors here, and one module per
//! kind of object, each adding its queries to [`Store`].
//!
//! Everything the server needs from the database is a method of [`Store`];
//! no SQL is built from user input anywhere (queries go through sea-orm's
//! builder with bound values).

mod bucket;
mod cluster;
mod console;
mod deletion;
mod delivery;
pub mod entity;
mod group_commit;
mod kept;
mod limits;
mod management;
pub mod migration;
pub mod named;
mod plugin_sql;
mod sqlite_file;
mod wrong_keys;

pub use bucket::NewObject;
pub use cluster::{NodeRow, ROUTING_CHANNEL};
pub use console::{AddrPage, EndpointPage, SubscriptionPage, SubscriptionsShown};
pub use deletion::{Begun, Deleting, Recorded};
pub use delivery::{
    ClaimError, Due, EndpointStats, EventHead, STATE_DELIVERED, STATE_FAILED, STATE_PENDING,
};
pub use group_commit::{Attempt, GroupCommit, Written, event_bytes};
pub use management::{
    AddrPatch, EndpointPatch, RoutingSnapshot, SubscriptionPatch, SubscriptionRow,
};

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use sea_orm::{
    ConnectOptions, ConnectionTrait, DatabaseConnection, DbErr, SqlErr, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;

use crate::config::{DbBackend, DbUrl};

/// Errors of the storage layer; the API maps them to HTTP statuses.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object (or its parent) does not exist.
    #[error("{0} not found")]
    NotFound(String),
    /// A unique value is already taken.
    #[error("{0}")]
    Conflict(String),
    /// An answer would pass a bound it must keep (a plugin's query).
    #[error("{0}")]
    TooLarge(String),
    /// The database failed or refused the operation. Said in the store's
    /// words ([`said`]), which hold all the driver's: not its `source`,
    /// so an error's chain does not say it twice.
    #[error("database error: {}", said(.0))]
    Db(DbErr),
    /// The database cannot be reached or opened: why, in the store's words
    /// (its own directory cannot be made, or it did not answer in time).
    #[error("{0}")]
    Connect(String),
    /// The database did not answer within the bound the caller set (its
    /// connection silent: a host that vanished, a path cut with no reset
    /// reaching the server). Like a broken connection, it says nothing of
    /// what was written.
    #[error("the database did not answer within {}s", .0.as_secs_f64())]
    Unanswered(std::time::Duration),
    /// A newer build migrated the database: the migrations it records
    /// that this build does not have. This build must not write to it.
    #[error(
        "the database was migrated by a newer roboger-server: it records migration {}, \
         which this build ({}) does not have; run that build or a newer one, or restore \
         a backup taken before the upgrade",
        .0.join(", "),
        env!("CARGO_PKG_VERSION")
    )]
    NewerSchema(Vec<String>),
}

impl From<DbErr> for StoreError {
    fn from(e: DbErr) -> StoreError {
        StoreError::Db(e)
    }
}

impl StoreError {
    /// Whether the write that failed certainly took no effect: the
    /// database answered it with an error of its own (which ends its
    /// transaction uncommitted), or it found no connection to run on.
    /// Any other failure (a connection broken while the database had the
    /// write) leaves it in doubt.
    pub fn took_no_effect(&self) -> bool {
        match self {
            StoreError::Db(e) => pool_timed_out(e) || database_error(e).is_some(),
            StoreError::Connect(_) => true,
            _ => false,
        }
    }

    /// Whether the failure says nothing of what was written: no
    /// connection was found, or the one used failed under it (closed,
    /// reset, its TLS or wire protocol broken, SQLite's worker gone)
    /// before the database answered. The same write may well succeed once
    /// it answers again. Any other failure (the database's own error, one
    /// of the store's) may be the write's doing.
    pub fn out_of_reach(&self) -> bool {
        use sea_orm::sqlx::Error;
        match self {
            StoreError::Db(e) => {
                pool_timed_out(e)
                    || sqlx_error(e).is_some_and(|e| {
                        matches!(
                            e,
                            Error::Io(_)
                                | Error::Tls(_)
                                | Error::Protocol(_)
                                | Error::PoolClosed
                                | Error::WorkerCrashed
                        )
                    })
            }
            StoreError::Connect(_) | StoreError::Unanswered(_) => true,
            _ => false,
        }
    }

    /// Whether the database gave up on the statement only because of
    /// another transaction at the same moment ([`transient`]: a deadlock,
    /// a serialization failure, a lock wait that ran out, a busy SQLite).
    /// The database undid what it did; run again, it may well succeed.
    pub fn lost_a_race(&self) -> bool {
        matches!(self, StoreError::Db(e) if transient(e))
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// Whether a connection given back to the pool answers a ping within
/// `bound`: else it is closed rather than kept. sqlx pings each one it
/// is given back, to flush what a statement cut short left (its answer,
/// a rollback), with no bound: a connection that had fallen silent (its
/// database host gone, with no reset reaching this one) held that ping,
/// and its place in the pool, for good; after a failover with a
/// statement in flight on every connection, the pool had none left, and
/// the server answered 503 until it was restarted.
async fn answers_within<C: sea_orm::sqlx::Connection>(
    conn: &mut C,
    bound: Duration,
) -> std::result::Result<bool, sea_orm::sqlx::Error> {
    Ok(matches!(
        tokio::time::timeout(bound, conn.ping()).await,
        Ok(Ok(()))
    ))
}

/// `op`, if the database answers it within `bound`; else
/// [`StoreError::Unanswered`], `op` dropped unfinished (a transaction it
/// left open took no effect). For the tasks that run again and again: a
/// database host that vanished with no reset reaching this one (a
/// failover, a path cut) leaves a read on its connection waiting for
/// good, as nothing is left to send that TCP could give up on, and the
/// task with it.
pub async fn within<T>(bound: Duration, op: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(bound, op)
        .await
        .unwrap_or(Err(StoreError::Unanswered(bound)))
}

/// How an address is named in a path: its numeric id or its 64-char string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddrRef {
    /// `addr.id`
    Id(i64),
    /// `addr.a`
    A(String),
}

impl AddrRef {
    /// Digits alone (shorter than an address) name an id; anything else is
    /// an address string.
    pub fn parse(s: &str) -> AddrRef {
        if !s.is_empty()
            && s.len() < entity::ADDR_LEN
            && s.bytes().all(|b| b.is_ascii_digit())
            && let Ok(id) = s.parse()
        {
            return AddrRef::Id(id);
        }
        AddrRef::A(s.to_string())
    }
}

impl std::fmt::Display for AddrRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AddrRef::Id(i) => write!(f, "{i}"),
            AddrRef::A(a) => f.write_str(a),
        }
    }
}

/// The database, with every query the server makes.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    /// Where [`Store::begin_write`] opens its transactions: on SQLite, a
    /// pool of one connection (its own on a file), which queues them;
    /// elsewhere `db`.
    writes: DatabaseConnection,
    backend: DbBackend,
    /// The database file, on SQLite.
    sqlite_file: Option<std::path::PathBuf>,
    /// Where the pipeline's group commits run.
    commits: CommitConnection,
    /// On MySQL, the largest statement the database takes
    /// (`max_allowed_packet`, read as the store connects).
    mysql_packet: Option<usize>,
    /// Where plugins' own SQL runs (`plugin_sql`): connections of its own,
    /// opened when a plugin first needs one, so that what a plugin leaves
    /// on its session (`SET`, a `PRAGMA`) never meets the server's own
    /// statements.
    plugins: DatabaseConnection,
    /// How long each step of a walk that goes on past its caller (a
    /// chunk of a bulk deletion, a retry or make-due walk) may wait for
    /// the database: the `timeout` it was connected with.
    step: Duration,
    /// Addresses this node has counted a first wrong key for
    /// (`wrong_keys`), which trims their table every so many.
    wrong_key_addresses: Arc<AtomicU64>,
}

/// Connections at most for plugins' own SQL, per server.
const PLUGIN_CONNECTIONS: u32 = 2;

/// Bytes of a MySQL statement kept for its SQL and its values other than
/// an event's text and media.
const STATEMENT_ROOM: usize = 64 * 1024;

/// MySQL's `max_allowed_packet`: no statement may be larger. (1 MiB on
/// a server configured low, 4 MiB by MySQL 5.7's default, 16 MiB by
/// MariaDB's.)
async fn max_allowed_packet(db: &DatabaseConnection) -> Result<usize> {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            sea_orm::DbBackend::MySql,
            "SELECT @@max_allowed_packet AS p",
        ))
        .await?
        .ok_or_else(|| StoreError::NotFound("max_allowed_packet".into()))?;
    let p: u64 = row.try_get("", "p")?;
    Ok(usize::try_from(p).unwrap_or(usize::MAX))
}

/// PostgreSQL's isolation on every connection of the server's, whatever
/// the database's `default_transaction_isolation`: its statements are
/// written for READ COMMITTED (PostgreSQL's own default), locking what
/// they must. Where an operator made SERIALIZABLE the default, concurrent
/// management changes and claims failed with serialization errors (503).
const PG_ISOLATION: (&str, &str) = ("default_transaction_isolation", "read committed");

/// How long a session of the server's may sit idle inside a transaction
/// before the database ends it, rolling the transaction back: three
/// `timeout`s (the server's transactions run statement after statement,
/// each within `timeout`, nothing waited for between them). A connection
/// cut off in mid-transaction with no reset reaching the database (a
/// network path, a NAT or a load balancer dropping it) otherwise kept
/// the rows it had locked until the database's own TCP keepalive gave up
/// on it, two hours by default: a claim's deliveries were skipped by
/// every other claim meanwhile. PostgreSQL's
/// `idle_in_transaction_session_timeout` and MariaDB's
/// `idle_transaction_timeout` (MySQL has none).
fn idle_in_transaction(timeout: Duration) -> Duration {
    timeout * 3
}

/// [`PG_ISOLATION`] and [`idle_in_transaction`], as session options.
fn pg_session(timeout: Duration) -> [(&'static str, String); 2] {
    [
        (PG_ISOLATION.0, PG_ISOLATION.1.to_string()),
        (
            "idle_in_transaction_session_timeout",
            format!("{}ms", idle_in_transaction(timeout).as_millis().max(1)),
        ),
    ]
}

/// Where the pipeline's group commits run: on the backends whose commit is
/// one sqlx call, a connection kept from one commit to the next
/// ([`kept`]); on MySQL, transactions taken from the pool.
#[derive(Clone, Debug)]
enum CommitConnection {
    Sqlite(Arc<kept::KeptConnection<sea_orm::sqlx::Sqlite>>),
    Postgres(Arc<kept::KeptConnection<sea_orm::sqlx::Postgres>>),
    Pooled,
}

/// Most endpoint ids one statement names, each a bound parameter: well
/// under every backend's limit (SQLite's is 32,766; PostgreSQL's and
/// MySQL's 65,535), since an address may have more endpoints than that.
const ENDPOINTS_PER_STATEMENT: usize = 1000;

/// How long the pipeline's writer keeps its connection at most, before
/// giving other writers a turn at it.
const KEEP_COMMIT_CONNECTION: Duration = Duration::from_millis(20);

impl Store {
    /// Connects (creating a SQLite file when needed), with `timeout` on
    /// each attempt and on taking a connection from the pool. A database
    /// that cannot answer yet is tried again for [`CONNECT_PATIENCE`] or
    /// three `timeout`s, whichever is longer.
    pub async fn connect(url: &DbUrl, pool: u32, timeout: Duration) -> Result<Store> {
        let deadline = tokio::time::Instant::now() + CONNECT_PATIENCE.max(timeout * 3);
        if url.backend == DbBackend::Sqlite
            && let Some(dir) = sqlite_parent_dir(url)
        {
            sqlite_file::make_dir(&dir).map_err(|e| {
                StoreError::Connect(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        if let Some(file) = url.sqlite_file()
            && url.url.contains("mode=rwc")
        {
            sqlite_file::prepare(&file);
        }
        let mut opts = ConnectOptions::new(url.url.clone());
        opts.max_connections(pool)
            .min_connections(1)
            .connect_timeout(timeout)
            .acquire_timeout(timeout)
            .sqlx_logging(false);
        if url.backend == DbBackend::Sqlite {
            // On every pooled connection: WAL lets readers proceed during
            // writes; FULL makes each commit durable before the 202.
            opts.map_sqlx_sqlite_opts(|o| {
                use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .foreign_keys(true)
            });
            // A SQLite connection is a file opened in this process: the
            // ping sqlx makes before lending one out (a round trip to its
            // thread) can find nothing wrong with it.
            opts.test_before_acquire(false);
            opts.map_sqlx_sqlite_before_acquire(|conn, _| {
                let lend = lendable(conn);
                Box::pin(async move { Ok(lend) })
            });
        }
        if url.backend == DbBackend::Postgres {
            opts.map_sqlx_postgres_opts(move |o| o.options(pg_session(timeout)));
            opts.map_sqlx_postgres_pool_opts(move |p| {
                p.after_release(move |conn, _| Box::pin(answers_within(conn, timeout)))
            });
        }
        if url.backend == DbBackend::MySql {
            // Every statement outside the server's transactions commits
            // on its own, whatever the server's `autocommit` (off in some
            // operators' my.cnf): else what it wrote waited, uncommitted,
            // on the pooled connection, and the start failed.
            opts.map_sqlx_mysql_pool_opts(move |p| {
                p.after_connect(move |conn, _| {
                    Box::pin(async move {
                        use sea_orm::sqlx::Executor;
                        conn.execute("SET autocommit = 1").await?;
                        // MariaDB's; MySQL has no such variable, and
                        // refuses it, which leaves the session as it was.
                        let idle = idle_in_transaction(timeout).as_secs().max(1);
                        let _ = sea_orm::sqlx::query("SET SESSION idle_transaction_timeout = ?")
                            .bind(i64::try_from(idle).unwrap_or(i64::MAX))
                            .execute(&mut *conn)
                            .await;
                        Ok(())
                    })
                })
                .after_release(move |conn, _| Box::pin(answers_within(conn, timeout)))
            });
        }
        let memory = url.url == "sqlite::memory:";
        if memory {
            // Each in-memory connection would be a separate database.
            opts.max_connections(1);
        }
        let db = connect_waiting(opts.clone(), timeout, deadline).await?;
        let plugins = if memory {
            // Another connection would be another database.
            db.clone()
        } else {
            let mut o = opts.clone();
            o.max_connections(PLUGIN_CONNECTIONS)
                .min_connections(0)
                .connect_lazy(true);
            sea_orm::Database::connect(o).await?
        };
        let writes = if url.backend == DbBackend::Sqlite && !memory {
            opts.max_connections(1);
            connect_waiting(opts.clone(), timeout, deadline).await?
        } else {
            db.clone()
        };
        // An in-memory database has one connection, for reads too: it is
        // not kept between commits. The accessors match the backend that
        // sea-orm connected, so they cannot panic.
        let keep_for = if memory {
            Duration::ZERO
        } else {
            KEEP_COMMIT_CONNECTION
        };
        let commits = match writes.get_database_backend() {
            sea_orm::DbBackend::Sqlite => CommitConnection::Sqlite(Arc::new(
                kept::KeptConnection::new(writes.get_sqlite_connection_pool().clone(), keep_for),
            )),
            sea_orm::DbBackend::Postgres => {
                // The commit is one implicit transaction, which PostgreSQL
                // would finish (and commit) after the writer stopped
                // waiting for it and answered its pushes 503: it notices
                // a closed connection only when it next talks to it. So
                // the commit's own connection has a statement timeout
                // shorter than the writer's wait, and such a commit is
                // cancelled by PostgreSQL itself. Its own pool: the
                // others' statements (migrations among them) may take
                // longer.
                //
                // Its statement is planned once, when the connection
                // first runs it, and the plan must be right however the
                // delivery table grows after that: on this connection
                // sequential scans, hash joins and merge joins are off
                // (PostgreSQL takes them only where nothing else would
                // do), which leaves the planner the statement's lookups
                // by index and by `ctid` (see `PG_GROUP_COMMIT`).
                let cancel_after = timeout * 9 / 10;
                // (Mapping the options again replaces the pool's map, so
                // the session's options are said again.)
                opts.max_connections(1).map_sqlx_postgres_opts(move |o| {
                    o.options(pg_session(timeout)).options([
                        (
                            "statement_timeout",
                            format!("{}ms", cancel_after.as_millis().max(1)),
                        ),
                        ("plan_cache_mode", "force_generic_plan".to_string()),
                        ("enable_seqscan", "off".to_string()),
                        ("enable_hashjoin", "off".to_string()),
                        ("enable_mergejoin", "off".to_string()),
                    ])
                });
                let commit_pool = connect_waiting(opts, timeout, deadline).await?;
                CommitConnection::Postgres(Arc::new(kept::KeptConnection::new(
                    commit_pool.get_postgres_connection_pool().clone(),
                    keep_for,
                )))
            }
            _ => CommitConnection::Pooled,
        };
        let mysql_packet = match url.backend {
            DbBackend::MySql => Some(max_allowed_packet(&db).await?),
            _ => None,
        };
        Ok(Store {
            db,
            writes,
            backend: url.backend,
            sqlite_file: url.sqlite_file(),
            commits,
            plugins,
            mysql_packet,
            step: timeout,
            wrong_key_addresses: Arc::default(),
        })
    }

    /// The most bytes of text and media one event may hold to be stored:
    /// on MySQL, its statement must fit `max_allowed_packet` (with
    /// [`STATEMENT_ROOM`] for the rest of it); elsewhere no bound but the
    /// push's own.
    pub fn largest_event(&self) -> Option<usize> {
        self.mysql_packet.map(|p| p.saturating_sub(STATEMENT_ROOM))
    }

    /// Begins a write transaction. SQLite has one writer at a time, and a
    /// second one waits in SQLite's busy handler, which sleeps in steps of
    /// milliseconds (or fails at once when a read lock must be upgraded).
    /// On SQLite `writes` has a single connection, so its pool queues the
    /// writers instead (fairly, within the acquire timeout), keeping group
    /// commits back to back on one warm connection and sqlx thread.
    ///
    /// On SQLite they are `BEGIN IMMEDIATE`: the write lock is taken up
    /// front. A deferred transaction that reads first cannot become a
    /// writer once another process (another node on the same file) has
    /// written since its read began; it fails at once instead of waiting.
    ///
    /// On MySQL they are `READ COMMITTED`, as on PostgreSQL: under MySQL's
    /// default `REPEATABLE READ` a claim's range scan locks the gaps
    /// between index entries, where a group commit inserts its deliveries,
    /// and the two deadlock far more often. (One more round trip per
    /// write transaction, on MySQL only.)
    async fn begin_write(&self) -> Result<sea_orm::DatabaseTransaction> {
        let options = match self.backend {
            DbBackend::Sqlite => sea_orm::TransactionOptions {
                sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
                ..Default::default()
            },
            DbBackend::MySql => sea_orm::TransactionOptions {
                isolation_level: Some(sea_orm::IsolationLevel::ReadCommitted),
                ..Default::default()
            },
            DbBackend::Postgres => return Ok(self.writes.begin().await?),
        };
        Ok(self.writes.begin_with_options(options).await?)
    }

    /// Applies every pending migration (see [`Store::migrate`] for the
    /// lock that serializes this between servers).
    async fn migrate_now(&self) -> Result<()> {
        let unknown = migration::unknown_to_this_build(&self.db).await?;
        if !unknown.is_empty() {
            return Err(StoreError::NewerSchema(unknown));
        }
        migration::Migrator::up(&self.db, None).await?;
        Ok(())
    }

    /// Which backend this is.
    pub fn backend(&self) -> DbBackend {
        self.backend
    }

    /// The most connections this store opens to a database server, and
    /// what they are: its pool (`db-pool-size`), the group commits' own
    /// and the routing change listener's own on PostgreSQL, and the
    /// plugins' own when `plugins_sql` (a plugin has `db: true`).
    /// `None` on SQLite.
    pub fn connections_at_most(&self, plugins_sql: bool) -> Option<(u64, String)> {
        let pool = match self.backend {
            DbBackend::Sqlite => return None,
            DbBackend::Postgres => self
                .db
                .get_postgres_connection_pool()
                .options()
                .get_max_connections(),
            DbBackend::MySql => self
                .db
                .get_mysql_connection_pool()
                .options()
                .get_max_connections(),
        };
        let mut most = u64::from(pool);
        let mut what = format!("db-pool-size {pool}");
        if let CommitConnection::Postgres(_) = self.commits {
            most += 2;
            what.push_str(", 1 for the group commits, 1 listening for routing changes");
        }
        if plugins_sql {
            most += u64::from(PLUGIN_CONNECTIONS);
            what.push_str(&format!(", {PLUGIN_CONNECTIONS} for plugins' SQL"));
        }
        Some((most, what))
    }

    /// Connections of the pool(s) in use and idle (on SQLite, the
    /// readers' pool and the single writer's together; on PostgreSQL, the
    /// pool and the group commits' own).
    pub fn pool_connections(&self) -> (u64, u64) {
        let one = |c: &DatabaseConnection| {
            let (size, idle) = match self.backend {
                DbBackend::Sqlite => {
                    let p = c.get_sqlite_connection_pool();
                    (p.size(), p.num_idle())
                }
                DbBackend::Postgres => {
                    let p = c.get_postgres_connection_pool();
                    (p.size(), p.num_idle())
                }
                DbBackend::MySql => {
                    let p = c.get_mysql_connection_pool();
                    (p.size(), p.num_idle())
                }
            };
            let idle = idle as u64;
            (u64::from(size).saturating_sub(idle), idle)
        };
        let (used, idle) = one(&self.db);
        if self.backend == DbBackend::Sqlite && self.sqlite_file.is_some() {
            let (u, i) = one(&self.writes);
            return (used + u, idle + i);
        }
        if let CommitConnection::Postgres(kept) = &self.commits {
            let (u, i) = kept.pool_connections();
            return (used + u, idle + i);
        }
        (used, idle)
    }

    /// A round trip to the database.
    pub async fn ping(&self) -> Result<()> {
        self.db.execute_unprepared("SELECT 1").await?;
        Ok(())
    }
}

/// Whether an insert made its row (`false`: the row was already there,
/// made by another server a moment before). The portable form of "insert
/// unless present": MySQL's `ON DUPLICATE KEY` counts a found row as
/// affected, so the violation itself is the answer.
fn inserted(r: std::result::Result<u64, DbErr>) -> Result<bool> {
    match r {
        Ok(n) => Ok(n == 1),
        Err(e) if is_unique_violation(&e) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn is_unique_violation(e: &DbErr) -> bool {
    matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_)))
}

/// The error of a write whose row, or the row it hangs off, was deleted
/// (by another request or node) after the caller read it: `what` is not
/// found, as if the delete had come first. An update finds no row, and
/// an insert breaks its foreign key; any other error is the database's.
fn gone_since_read(e: DbErr, what: impl FnOnce() -> String) -> StoreError {
    if matches!(e, DbErr::RecordNotUpdated)
        || matches!(e.sql_err(), Some(SqlErr::ForeignKeyConstraintViolation(_)))
    {
        StoreError::NotFound(what())
    } else {
        e.into()
    }
}

/// How long a start keeps trying to reach its database at least (at
/// most three `timeout`s more): a database started at the same moment
/// (systemd, containers) or a disk stalled on a flush must not make the
/// server exit.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// Connects, each attempt bounded by the pool's `timeout`, trying again
/// until `deadline` while the database cannot answer yet (see
/// [`not_ready`]), with a warning each time. A busy SQLite file is tried
/// again quietly and soon during the first `timeout`: a new file is
/// switched to WAL under an exclusive lock, and a second server opening
/// it at that moment gets `SQLITE_BUSY` at once, without the busy
/// handler; a file still busy after that is held by another process,
/// and is waited for like any database that cannot answer yet. Anything
/// else (a refused login, an unknown database, a file that cannot be
/// opened) fails at once.
async fn connect_waiting(
    opts: ConnectOptions,
    timeout: Duration,
    deadline: tokio::time::Instant,
) -> Result<DatabaseConnection> {
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(100);
    loop {
        let e = match sea_orm::Database::connect(opts.clone()).await {
            Ok(db) => return Ok(db),
            Err(e) => e,
        };
        let now = tokio::time::Instant::now();
        let busy = sqlite_busy(&e);
        let why = if busy {
            Some("the SQLite file is locked by another process".to_string())
        } else {
            match not_ready(&e, timeout) {
                Some(why) if pool_timed_out(&e) => {
                    Some(match why_no_connection(opts.get_url(), timeout).await {
                        Some(cause) => format!("{why}: {cause}"),
                        None => why,
                    })
                }
                why => why,
            }
        };
        let Some(mut why) = why else {
            return Err(e.into());
        };
        if let Some(socket) = postgres_socket(opts.get_url()) {
            why = format!("{why} (the Unix socket {socket})");
        }
        let quiet = busy && now - started < timeout;
        let wait = if quiet {
            Duration::from_millis(20)
        } else {
            pause
        };
        if now + wait >= deadline {
            return Err(StoreError::Connect(format!(
                "{why}; gave up after trying for {}s",
                (now - started).as_secs()
            )));
        }
        if quiet {
            tracing::debug!("the SQLite file is busy; connecting again");
        } else {
            tracing::warn!(error = %why, "the database does not answer yet; trying again");
            pause = (pause * 2).min(Duration::from_secs(2));
        }
        tokio::time::sleep(wait).await;
    }
}

/// Whether an idle SQLite connection may be lent out: not when sqlx still
/// counts a transaction open on it after its use ended.
///
/// On some errors (a full disk, an I/O error) SQLite rolls the whole
/// transaction back by itself. sqlx does not see it: its `COMMIT`, then
/// the `ROLLBACK` of the dropped transaction, fail with "no transaction is
/// active", and it goes on counting one. Every later transaction on that
/// connection would then be a savepoint: one whose rollback (a conflict,
/// answered 409) leaves a transaction open in SQLite, so that the writes
/// after it, answered as done, are committed by nothing and lost with the
/// next rollback. Such a connection is closed instead, and a new one
/// opened. (sqlx has pinged the connection on its way back to the pool,
/// after the dropped transaction's `ROLLBACK`, so the count read here is
/// the one that `ROLLBACK` left.)
fn lendable(conn: &sea_orm::sqlx::SqliteConnection) -> bool {
    use sea_orm::sqlx::Connection;
    let open = conn.is_in_transaction();
    if open {
        tracing::warn!(
            "a database connection still counted a transaction open after an error \
             (SQLite rolled it back by itself); it is closed and a new one opened"
        );
    }
    !open
}

/// The Unix socket a PostgreSQL URL connects through (its `host`
/// parameter names a directory), for saying where nothing answered.
fn postgres_socket(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    if url.scheme() != "postgres" {
        return None;
    }
    let dir = url
        .query_pairs()
        .find(|(k, v)| k == "host" && v.starts_with('/'))?
        .1;
    let port = url
        .query_pairs()
        .find(|(k, _)| k == "port")
        .map(|(_, v)| v.into_owned())
        .or_else(|| url.port().map(|p| p.to_string()))
        .unwrap_or_else(|| "5432".into());
    Some(format!("{}/.s.PGSQL.{port}", dir.trim_end_matches('/')))
}

/// Why connecting failed, when the database may answer a moment later:
/// no connection within `timeout`, a network error (refused, reset,
/// unreachable, not resolved yet), PostgreSQL starting up (57P03) or out
/// of connections (53300), MySQL out of connections (1040).
fn not_ready(e: &DbErr, timeout: Duration) -> Option<String> {
    use sea_orm::{RuntimeErr, sqlx::Error};
    if pool_timed_out(e) {
        return Some(format!(
            "no connection within {}s (`timeout`)",
            timeout.as_secs_f64()
        ));
    }
    match e {
        DbErr::Conn(RuntimeErr::SqlxError(sqlx)) => match sqlx.as_ref() {
            Error::Io(io) => Some(io.to_string()),
            Error::Database(_) => db_code(e)
                .filter(|c| matches!(c.as_str(), "57P03" | "53300" | "1040"))
                .map(|_| sqlx.to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// A database error as the log says it. The pool's "timed out" hides why
/// no connection could be had: it says what may be behind it.
fn said(e: &DbErr) -> String {
    // (Not a pool closed under its caller, as at a stop.)
    let closed = matches!(
        e,
        DbErr::ConnectionAcquire(sea_orm::ConnAcquireErr::ConnectionClosed)
    );
    if pool_timed_out(e) && !closed {
        format!(
            "{e} (every connection of the pool was busy, and no new one opened in time: the \
             database down, unreachable or at its connection limit, or db-pool-size too small \
             for the load)"
        )
    } else {
        postgres_said(e, e.to_string())
    }
}

/// A PostgreSQL error as PostgreSQL's own client says it. sqlx appends
/// ` at line N` to the message, N being the line of PostgreSQL's C source
/// that raised it, which reads as a line of the statement (a plugin's
/// author looked for line 1180 of a one-line query): left out. And it
/// leaves out the error's detail and hint (the key a unique index already
/// holds, the column meant): added, as `psql` shows them.
fn postgres_said(e: &DbErr, mut text: String) -> String {
    let Some(pg) = database_error(e)
        .and_then(|d| d.try_downcast_ref::<sea_orm::sqlx::postgres::PgDatabaseError>())
    else {
        return text;
    };
    if let Some(line) = pg.line()
        && let Some(kept) = text.strip_suffix(&format!(" at line {line}"))
    {
        text.truncate(kept.len());
    }
    for (label, more) in [("DETAIL", pg.detail()), ("HINT", pg.hint())] {
        if let Some(more) = more {
            text.push_str(&format!(" ({label}: {more})"));
        }
    }
    text
}

/// Whether the pool gave up waiting for a connection (sea-orm's or sqlx's
/// word for it), which hides why each attempt failed.
fn pool_timed_out(e: &DbErr) -> bool {
    use sea_orm::{RuntimeErr, sqlx::Error};
    match e {
        DbErr::ConnectionAcquire(_) => true,
        DbErr::Conn(RuntimeErr::SqlxError(s)) => matches!(s.as_ref(), Error::PoolTimedOut),
        _ => false,
    }
}

/// Why a connection to the PostgreSQL or MySQL server at `url` cannot be
/// made, found by one attempt of its own outside the pool (bounded by
/// `timeout`, at most 2 s): e.g. the connection refused on a wrong port,
/// where the pool only says it timed out. `None` when that attempt
/// succeeds, takes too long, or the database is SQLite.
async fn why_no_connection(url: &str, timeout: Duration) -> Option<String> {
    use sea_orm::sqlx::Connection;
    let attempt = async {
        if url.starts_with("postgres") {
            sea_orm::sqlx::PgConnection::connect(url).await.err()
        } else if url.starts_with("mysql") {
            sea_orm::sqlx::MySqlConnection::connect(url).await.err()
        } else {
            None
        }
    };
    let e = tokio::time::timeout(timeout.min(Duration::from_secs(2)), attempt)
        .await
        .ok()??;
    Some(crate::secrets::scrub(&e.to_string()).into_owned())
}

/// The code the database gave an error with: SQLite's result code,
/// PostgreSQL's SQLSTATE, MySQL's error number (as text).
fn db_code(e: &DbErr) -> Option<String> {
    let d = database_error(e)?;
    // MySQL's `code()` is the SQLSTATE, shared by many errors; its number
    // tells a deadlock apart.
    if let Some(my) = d.try_downcast_ref::<sea_orm::sqlx::mysql::MySqlDatabaseError>() {
        return Some(my.number().to_string());
    }
    d.code().map(|c| c.into_owned())
}

/// The error the database itself answered with, if `e` is one.
fn database_error(e: &DbErr) -> Option<&dyn sea_orm::sqlx::error::DatabaseError> {
    sqlx_error(e)?.as_database_error()
}

/// The sqlx error in any of sea-orm's three wrappers of one.
fn sqlx_error(e: &DbErr) -> Option<&sea_orm::sqlx::Error> {
    use sea_orm::RuntimeErr;
    let (DbErr::Conn(RuntimeErr::SqlxError(e))
    | DbErr::Exec(RuntimeErr::SqlxError(e))
    | DbErr::Query(RuntimeErr::SqlxError(e))) = e
    else {
        return None;
    };
    Some(e)
}

/// Whether SQLite answered `SQLITE_BUSY` (5) or `SQLITE_LOCKED` (6).
fn sqlite_busy(e: &DbErr) -> bool {
    db_code(e).is_some_and(|c| c == "5" || c == "6")
}

/// Whether the database gave up on a transaction only because of another
/// one at the same moment, so the same transaction run again would
/// succeed: a deadlock or serialization failure (PostgreSQL 40P01, 40001;
/// MySQL 1213), a lock wait that timed out (MySQL 1205, PostgreSQL
/// 55P03), a busy SQLite.
fn transient(e: &DbErr) -> bool {
    db_code(e).is_some_and(|c| {
        matches!(
            c.as_str(),
            "40P01" | "40001" | "55P03" | "1213" | "1205" | "5" | "6"
        )
    })
}

/// An error of a statement run through sqlx directly (the group commit,
/// [`kept`]) as sea-orm reports its own, so that [`transient`] and
/// sea-orm's `sql_err` read both alike.
fn sqlx_err(e: sea_orm::sqlx::Error) -> DbErr {
    use sea_orm::{ConnAcquireErr, RuntimeErr, sqlx::Error};
    match e {
        Error::PoolTimedOut => DbErr::ConnectionAcquire(ConnAcquireErr::Timeout),
        Error::PoolClosed => DbErr::ConnectionAcquire(ConnAcquireErr::ConnectionClosed),
        e => DbErr::Exec(RuntimeErr::SqlxError(Arc::new(e))),
    }
}

fn sqlite_parent_dir(url: &DbUrl) -> Option<std::path::PathBuf> {
    url.sqlite_file()?
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(std::path::Path::to_path_buf)
}

/// A migrated store on a new SQLite file `NAME.db` in `dir`, connected
/// as the server connects (for tests).
#[cfg(test)]
pub(crate) async fn sqlite_for_tests(dir: &std::path::Path, name: &str) -> Store {
    // SQLAlchemy's form: sqlite:/// and then the absolute path.
    let file = dir.join(format!("{name}.db"));
    let url = crate::config::translate_db_url(&format!("sqlite:///{}", file.display()))
        .expect("a database URL");
    let store = Store::connect(&url, 2, Duration::from_secs(5))
        .await
        .expect("the database");
    assert!(
        file.exists(),
        "{} is not where {} is",
        url.url,
        file.display()
    );
    store
        .migrate(Duration::from_secs(5))
        .await
        .expect("migrated");
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_refs() {
        assert_eq!(AddrRef::parse("12"), AddrRef::Id(12));
        assert_eq!(AddrRef::parse("abc"), AddrRef::A("abc".into()));
        let digits = "1".repeat(64);
        assert_eq!(AddrRef::parse(&digits), AddrRef::A(digits.clone()));
    }

    /// Only a failure the database answered itself, or one that found no
    /// connection, certainly took no effect; a broken connection leaves
    /// a write in doubt (`pipeline::unsettled` looks for it then). Both
    /// are out of reach, where the writer keeps what it writes for the
    /// next try; what the database refused itself is not.
    #[tokio::test]
    async fn a_write_in_doubt_or_out_of_reach_is_told_from_one_refused() {
        use sea_orm::{ConnAcquireErr, RuntimeErr, sqlx};
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = sqlite_for_tests(dir.path(), "doubt").await;
        let refused = store
            .db
            .execute_unprepared("INSERT INTO no_such_table VALUES (1)")
            .await
            .expect_err("no such table");
        let refused = StoreError::Db(refused);
        assert!(refused.took_no_effect() && !refused.out_of_reach());
        let no_connection = StoreError::Db(DbErr::ConnectionAcquire(ConnAcquireErr::Timeout));
        assert!(no_connection.took_no_effect() && no_connection.out_of_reach());
        assert!(
            no_connection
                .to_string()
                .ends_with("at its connection limit, or db-pool-size too small for the load)"),
            "{no_connection}"
        );
        let broken = sqlx::Error::Io(std::io::ErrorKind::UnexpectedEof.into());
        let broken = StoreError::Db(DbErr::Exec(RuntimeErr::SqlxError(Arc::new(broken))));
        assert!(!broken.took_no_effect() && broken.out_of_reach());
        let not_found = StoreError::NotFound("addr".into());
        assert!(!not_found.took_no_effect() && !not_found.out_of_reach());
        // A value sqlx could not encode: the write's own doing.
        let unencoded = sqlx::Error::Encode("a value it cannot take".into());
        let unencoded = StoreError::Db(DbErr::Exec(RuntimeErr::SqlxError(Arc::new(unencoded))));
        assert!(!unencoded.out_of_reach());
    }

    /// SQLite rolls a whole transaction back by itself on some errors (a
    /// full disk at `COMMIT`, an I/O error), and sqlx does not see it.
    /// Here a trigger of the write connection's own does the same as a
    /// full disk, at once and every time. Before such a connection was
    /// closed, a conflict's rollback after it left a transaction open, and
    /// the address created next was answered but never committed.
    #[tokio::test]
    async fn a_transaction_sqlite_rolled_back_by_itself_leaves_nothing_open() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = sqlite_for_tests(dir.path(), "full").await;
        let taken = store.addr_create().await.expect("an address");
        let renamed = store.addr_create().await.expect("another");
        store
            .writes
            .execute_unprepared(
                "CREATE TEMP TRIGGER full BEFORE INSERT ON main.addr \
                 BEGIN SELECT RAISE(ROLLBACK, 'database or disk is full'); END",
            )
            .await
            .expect("the trigger, on the single write connection");
        let full = store.addr_create().await;
        assert!(
            full.as_ref()
                .is_err_and(|e| e.to_string().contains("disk is full")),
            "{full:?}"
        );
        // Room again: on that connection, if it is still lent out.
        store
            .writes
            .execute_unprepared("DROP TRIGGER IF EXISTS temp.full")
            .await
            .expect("no trigger");
        let conflict = store
            .addr_change(&AddrRef::Id(renamed.id), Some(taken.a.clone()))
            .await;
        assert!(
            matches!(conflict, Err(StoreError::Conflict(_))),
            "{conflict:?}"
        );
        let made = store.addr_create().await.expect("an address with room");
        let seen = store.addr_get(&AddrRef::Id(made.id)).await;
        assert!(
            seen.is_ok_and(|a| a.a == made.a),
            "an address answered as created is not committed"
        );
    }
}
