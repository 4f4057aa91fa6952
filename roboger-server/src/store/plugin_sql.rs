//! Plugins' own SQL (`db_query`/`db_execute`, for plugins with `db: true`),
//! with `:name` parameters bound, never spliced.

use futures_util::TryStreamExt;
use sea_orm::{ConnectionTrait, StreamTrait};
use serde_json::Value;

use super::named;
use super::{Result, Store, StoreError};

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
        let mut rows = self.db.stream_raw(stmt).await?;
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
        Ok(out)
    }

    /// Runs a plugin's statement with named `:params`; rows affected.
    pub async fn plugin_execute(
        &self,
        sql: &str,
        params: &serde_json::Map<String, Value>,
    ) -> Result<u64> {
        let stmt = self.named_statement(sql, params)?;
        Ok(self.db.execute_raw(stmt).await?.rows_affected())
    }

    fn named_statement(
        &self,
        sql: &str,
        params: &serde_json::Map<String, Value>,
    ) -> Result<sea_orm::Statement> {
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
