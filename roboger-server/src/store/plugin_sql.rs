//! Plugins' own SQL (`db_query`/`db_execute`, for plugins with `db: true`),
//! with `:name` parameters bound, never spliced.
//!
//! Each call runs on a connection of the plugins' own pool (`Store`'s
//! `plugins`): a session setting a plugin makes (PostgreSQL's `SET`,
//! MySQL's `SET SESSION`, SQLite's `PRAGMA`) stays with the plugins'
//! calls. On the server's pool, a plugin that made its session read-only
//! made the server's writes fail on that connection.
//!
//! Each call also runs in a transaction of the server's, committed before
//! it is answered. A plugin's `BEGIN` would otherwise leave a transaction
//! open on a pooled connection for the calls of others to run in: on
//! SQLite, holding the write lock, it stopped every push and management
//! change until the server restarted. A statement that begins or ends a transaction is
//! refused, saying why; one hidden further in a multi-statement text
//! fails inside the server's transaction, or ends it, which leaves the
//! connection counted in a transaction, and closed (`store::lendable`).

use futures_util::TryStreamExt;
use sea_orm::{ConnectionTrait, StreamTrait, TransactionTrait};
use serde_json::Value;

use super::named;
use super::{Result, Store, StoreError};
use crate::config::DbBackend;

/// Most bytes of JSON a plugin's query is answered with.
pub const PLUGIN_ANSWER_MAX: usize = 16 << 20;

/// Counts the bytes of JSON written to it, and keeps none.
struct JsonSize(usize);

impl std::io::Write for JsonSize {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Store {
    // ---- plugin database access --------------------------------------------

    /// Runs a plugin's query with named `:params`; rows as JSON objects.
    /// The rows are read as they come, and the query is refused once
    /// their JSON passes [`PLUGIN_ANSWER_MAX`], so a query of a whole
    /// table takes neither the server's memory nor the plugin's line.
    pub async fn plugin_query(
        &self,
        sql: &str,
        params: &serde_json::Map<String, Value>,
    ) -> Result<Vec<Value>> {
        use sea_orm::FromQueryResult;
        let stmt = self.named_statement(sql, params)?;
        let txn = self.plugins.begin().await?;
        let mut rows = txn.stream_raw(stmt).await?;
        let mut out = Vec::new();
        let mut size = JsonSize(2);
        while let Some(r) = rows.try_next().await? {
            let mut v = Value::from_query_result(&r, "")?;
            // SQLite reports no type for computed columns; decode those
            // by trying the storage classes in turn.
            if let Value::Object(m) = &mut v {
                for name in r.column_names() {
                    if !m.contains_key(&name) {
                        m.insert(name.clone(), named::untyped_column(&r, &name));
                    }
                }
            }
            size.0 += 1;
            let _ = serde_json::to_writer(&mut size, &v);
            if size.0 > PLUGIN_ANSWER_MAX {
                return Err(StoreError::TooLarge(format!(
                    "the query's answer is more than {} MiB of JSON (after {} rows); \
                     read it in pages (LIMIT and OFFSET, or a WHERE on a key)",
                    PLUGIN_ANSWER_MAX >> 20,
                    out.len()
                )));
            }
            out.push(v);
        }
        drop(rows);
        txn.commit().await?;
        Ok(out)
    }

    /// Runs a plugin's statement with named `:params`; rows affected.
    pub async fn plugin_execute(
        &self,
        sql: &str,
        params: &serde_json::Map<String, Value>,
    ) -> Result<u64> {
        Ok(self.plugin_insert(sql, params).await?.0)
    }

    /// [`Store::plugin_execute`], with the id of the row the statement
    /// inserted: MySQL's `LAST_INSERT_ID()` or SQLite's last rowid, read
    /// on the connection and in the transaction that ran it; `None` when
    /// it inserted nothing, and on PostgreSQL (which has `RETURNING`).
    pub async fn plugin_insert(
        &self,
        sql: &str,
        params: &serde_json::Map<String, Value>,
    ) -> Result<(u64, Option<i64>)> {
        let stmt = self.named_statement(sql, params)?;
        // On SQLite the write lock is taken up front, waiting for it
        // as an autocommit statement would; a deferred transaction that
        // read first could not take it once the writer had committed.
        let txn = self
            .plugins
            .begin_with_options(sea_orm::TransactionOptions {
                sqlite_transaction_mode: (self.backend == DbBackend::Sqlite)
                    .then_some(sea_orm::SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        let done = txn.execute_raw(stmt).await?;
        let affected = done.rows_affected();
        // sea-orm has no last insert id of PostgreSQL's to give.
        let id = match self.backend {
            DbBackend::Postgres => None,
            DbBackend::Sqlite | DbBackend::MySql => i64::try_from(done.last_insert_id()).ok(),
        }
        .filter(|&id| affected > 0 && id != 0);
        txn.commit().await?;
        Ok((affected, id))
    }

    /// A plugin's statement with its `:params` bound, refused when it
    /// would begin or end a transaction, or take a table lock (see the
    /// module's doc).
    fn named_statement(
        &self,
        sql: &str,
        params: &serde_json::Map<String, Value>,
    ) -> Result<sea_orm::Statement> {
        if let Some(word) = transaction_control(sql) {
            return Err(StoreError::Conflict(format!(
                "{word} is not taken: each db_query and db_execute call is a \
                 transaction of its own, committed when it is answered, so a \
                 transaction (or a table lock) cannot span calls"
            )));
        }
        let backend = self.db.get_database_backend();
        let (sql, names) =
            crate::store::named::positional(sql, backend == sea_orm::DbBackend::Postgres);
        let mut values = Vec::with_capacity(names.len());
        for n in names {
            let v = params
                .get(&n)
                .ok_or_else(|| StoreError::NotFound(format!("parameter :{n}")))?;
            values.push(named::to_value(v));
        }
        Ok(sea_orm::Statement::from_sql_and_values(
            backend, sql, values,
        ))
    }
}

/// The word a statement opens with when it begins or ends a transaction
/// (`BEGIN`, `START TRANSACTION`, `COMMIT`, `END`, `ROLLBACK`, `ABORT`,
/// `SAVEPOINT`, `RELEASE`) or takes table locks that outlive it (MySQL's
/// `LOCK TABLES`, held by the pooled connection until `UNLOCK TABLES`),
/// after any whitespace and comments.
fn transaction_control(sql: &str) -> Option<String> {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("--") {
            rest = r.split_once('\n').map_or("", |(_, after)| after);
        } else if let Some(r) = rest.strip_prefix("/*") {
            rest = r.split_once("*/").map_or("", |(_, after)| after);
        } else {
            break;
        }
    }
    let word: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    matches!(
        word.as_str(),
        "BEGIN"
            | "START"
            | "COMMIT"
            | "END"
            | "ROLLBACK"
            | "ABORT"
            | "SAVEPOINT"
            | "RELEASE"
            | "LOCK"
            | "UNLOCK"
    )
    .then_some(word)
}

#[cfg(test)]
mod tests {
    use super::transaction_control;
    use crate::store::AddrRef;

    /// On SQLite a text may hold several statements, so one that begins
    /// or ends a transaction can come after the first. It leaves no
    /// transaction open either way: the server's own transaction refuses
    /// a `BEGIN`, and a connection whose transaction a `COMMIT` ended is
    /// closed, not lent out again.
    #[tokio::test]
    async fn a_transaction_statement_further_in_the_text_leaves_nothing_open() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = crate::store::sqlite_for_tests(dir.path(), "p").await;
        let none = serde_json::Map::new();
        store
            .plugin_execute("CREATE TABLE t (x INTEGER)", &none)
            .await
            .expect("a table");
        let begun = store
            .plugin_execute("INSERT INTO t VALUES (1); BEGIN", &none)
            .await;
        assert!(begun.is_err(), "{begun:?}");
        // Committed by the text itself; the server's commit then finds
        // no transaction, and says so.
        let ended = store
            .plugin_execute("INSERT INTO t VALUES (2); COMMIT", &none)
            .await;
        assert!(ended.is_err(), "{ended:?}");
        for _ in 0..4 {
            let made = store.addr_create().await.expect("an address");
            let seen = store.addr_get(&AddrRef::Id(made.id)).await;
            assert!(
                seen.is_ok(),
                "an address answered as created is not committed"
            );
            store
                .plugin_execute("INSERT INTO t VALUES (3)", &none)
                .await
                .expect("an insert");
        }
        let rows = store
            .plugin_query("SELECT x FROM t ORDER BY x", &none)
            .await
            .expect("the rows");
        let xs: Vec<i64> = rows.iter().filter_map(|r| r["x"].as_i64()).collect();
        assert_eq!(
            xs,
            vec![2, 3, 3, 3, 3],
            "the first text was rolled back whole"
        );
    }

    #[test]
    fn statements_that_begin_or_end_a_transaction() {
        for sql in [
            "BEGIN",
            "begin immediate",
            "  -- a counter\n  BEGIN TRANSACTION;",
            "/* one */ commit",
            "END",
            "rollback to x",
            "SAVEPOINT s",
            "release s",
            "START TRANSACTION",
            "abort",
            "LOCK TABLES t WRITE",
            "unlock tables",
        ] {
            assert!(transaction_control(sql).is_some(), "{sql}");
        }
        for sql in [
            "INSERT INTO t VALUES (1)",
            "SELECT 'BEGIN'",
            "UPDATE t SET started = 1",
            "-- BEGIN\nSELECT 1",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "",
        ] {
            assert!(transaction_control(sql).is_none(), "{sql}");
        }
    }
}
