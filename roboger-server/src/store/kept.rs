//! The connection the group commit keeps from one commit to the next.
//!
//! Taking a connection from sqlx's pool and giving it back are not free:
//! sqlx pings a connection on the way back to the pool (and, but on
//! SQLite, on the way out), and on SQLite each ping is a round trip to
//! the connection's own thread, in the middle of the chain of commits
//! that every push waits on.
//! The pipeline writes its commits back to back, so it keeps one
//! connection while it has work, for at most `keep_for` at a time. Then
//! the connection goes back to the pool, whose queue is fair, so a
//! management write or a claim waiting for SQLite's single write
//! connection gets its turn. It also goes back at once when the writer
//! has nothing more to write ([`KeptConnection::release`]), and after a
//! failed use, so that a fallback through the pool can take it.
//!
//! A use abandoned mid-statement (its caller timed out) may have left a
//! transaction open: that connection is closed, not given back, which
//! ends the transaction.

use std::time::{Duration, Instant};

use sea_orm::sqlx::{self, Database, Pool, pool::PoolConnection};
use tokio::sync::{Mutex, MutexGuard};

/// A pool connection kept between uses by one writer.
pub(super) struct KeptConnection<DB: Database> {
    pool: Pool<DB>,
    keep_for: Duration,
    slot: Mutex<Option<Kept<DB>>>,
}

struct Kept<DB: Database> {
    conn: PoolConnection<DB>,
    since: Instant,
    /// Set while in use: still set when dropped, the use was abandoned.
    busy: bool,
}

impl<DB: Database> Drop for Kept<DB> {
    fn drop(&mut self) {
        if self.busy {
            self.conn.close_on_drop();
        }
    }
}

impl<DB: Database> std::fmt::Debug for KeptConnection<DB> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeptConnection")
            .field("keep_for", &self.keep_for)
            .finish_non_exhaustive()
    }
}

impl<DB: Database> KeptConnection<DB> {
    /// Keeps connections of `pool` for at most `keep_for` at a time (zero:
    /// each goes back after one use).
    pub(super) fn new(pool: Pool<DB>, keep_for: Duration) -> Self {
        KeptConnection {
            pool,
            keep_for,
            slot: Mutex::new(None),
        }
    }

    /// The connections of the pool it keeps from, in use (the kept one
    /// among them) and idle.
    pub(super) fn pool_connections(&self) -> (u64, u64) {
        let idle = self.pool.num_idle() as u64;
        (u64::from(self.pool.size()).saturating_sub(idle), idle)
    }

    /// The kept connection, taken from the pool first when none is kept
    /// (within the pool's acquire timeout). Say how its use ended with
    /// [`KeptGuard::done`] or [`KeptGuard::failed`]; a guard dropped
    /// without either was abandoned, and closes the connection.
    pub(super) async fn take(&self) -> Result<KeptGuard<'_, DB>, sqlx::Error> {
        let mut slot = self.slot.lock().await;
        let mut kept = match slot.take() {
            Some(kept) => kept,
            None => Kept {
                conn: self.pool.acquire().await?,
                since: Instant::now(),
                busy: false,
            },
        };
        kept.busy = true;
        Ok(KeptGuard {
            slot,
            kept,
            keep_for: self.keep_for,
        })
    }

    /// Gives the kept connection back to the pool, if one is kept and not
    /// in use.
    pub(super) fn release(&self) {
        if let Ok(mut slot) = self.slot.try_lock() {
            *slot = None;
        }
    }
}

/// The kept connection, in use.
pub(super) struct KeptGuard<'a, DB: Database> {
    slot: MutexGuard<'a, Option<Kept<DB>>>,
    kept: Kept<DB>,
    keep_for: Duration,
}

impl<DB: Database> KeptGuard<'_, DB> {
    /// The connection.
    pub(super) fn conn(&mut self) -> &mut DB::Connection {
        &mut self.kept.conn
    }

    /// The use ended well: the connection stays kept if its time is not up.
    pub(super) fn done(self) {
        let KeptGuard {
            mut slot,
            mut kept,
            keep_for,
        } = self;
        kept.busy = false;
        if kept.since.elapsed() < keep_for {
            *slot = Some(kept);
        }
    }

    /// The use failed, and left nothing open: the connection goes back to
    /// the pool (which tests it on the way).
    pub(super) fn failed(self) {
        let KeptGuard { mut kept, .. } = self;
        kept.busy = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::sqlx::sqlite::{SqlitePool, SqlitePoolOptions};

    /// A file database behind a pool of one connection, as the server's
    /// SQLite writes are.
    async fn one_connection(dir: &tempfile::TempDir) -> SqlitePool {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("k.db").display());
        SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_millis(300))
            .connect(&url)
            .await
            .expect("the test database")
    }

    #[tokio::test]
    async fn kept_until_released() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pool = one_connection(&dir).await;
        let kept = KeptConnection::new(pool.clone(), Duration::from_secs(60));
        let mut guard = kept.take().await.expect("a connection");
        sqlx::query("SELECT 1")
            .execute(&mut *guard.conn())
            .await
            .expect("a statement");
        guard.done();
        // Kept: the pool has nothing to give.
        assert!(matches!(
            pool.acquire().await,
            Err(sqlx::Error::PoolTimedOut)
        ));
        kept.release();
        assert!(pool.acquire().await.is_ok(), "released to the pool");
    }

    #[tokio::test]
    async fn given_back_when_its_time_is_up_or_it_failed() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pool = one_connection(&dir).await;
        let kept = KeptConnection::new(pool.clone(), Duration::ZERO);
        kept.take().await.expect("a connection").done();
        assert!(pool.acquire().await.is_ok(), "no time to keep it");
        let kept = KeptConnection::new(pool.clone(), Duration::from_secs(60));
        kept.take().await.expect("a connection").failed();
        assert!(pool.acquire().await.is_ok(), "a failed use gives it back");
    }

    #[tokio::test]
    async fn abandoned_use_does_not_leave_a_transaction_open() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let pool = one_connection(&dir).await;
        sqlx::query("CREATE TABLE t (x INTEGER)")
            .execute(&pool)
            .await
            .expect("a table");
        let kept = KeptConnection::new(pool.clone(), Duration::from_secs(60));
        let mut guard = kept.take().await.expect("a connection");
        sqlx::query("BEGIN IMMEDIATE; INSERT INTO t VALUES (1)")
            .execute(&mut *guard.conn())
            .await
            .expect("a transaction begun");
        // Dropped mid-transaction, as when a commit's caller times out.
        drop(guard);
        let mut guard = kept.take().await.expect("a connection again");
        sqlx::query("BEGIN IMMEDIATE; INSERT INTO t VALUES (2); COMMIT")
            .execute(&mut *guard.conn())
            .await
            .expect("a new transaction, not one within the abandoned one");
        guard.done();
        kept.release();
        let rows: Vec<i64> = sqlx::query_scalar("SELECT x FROM t")
            .fetch_all(&pool)
            .await
            .expect("the rows");
        assert_eq!(rows, vec![2], "the abandoned insert was rolled back");
    }
}
