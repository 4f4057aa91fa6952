//! Plugins' own SQL (`db_query`/`db_execute`, for plugins with `db: true`),
//! with `:name` parameters bound, never spliced.

use sea_orm::ConnectionTrait;
use serde_json::Value;

use super::named;
use super::{Result, Store, StoreError};

impl Store {
    // ---- plugin database access --------------------------------------------

    /// Runs a plugin's query with named `:params`; rows as JSON objects.
    pub async fn plugin_query(
        &self,
        sql: &str,
        params: &serde_json::Map<String, Value>,
    ) -> Result<Vec<Value>> {
        use sea_orm::FromQueryResult;
        let stmt = self.named_statement(sql, params)?;
        let rows = self.db.query_all_raw(stmt).await?;
        rows.iter()
            .map(|r| {
                let mut v = Value::from_query_result(r, "")?;
                // SQLite reports no type for computed columns; decode those
                // by trying the storage classes in turn.
                if let Value::Object(m) = &mut v {
                    for name in r.column_names() {
                        if !m.contains_key(&name) {
                            m.insert(name.clone(), named::untyped_column(r, &name));
                        }
                    }
                }
                Ok(v)
            })
            .collect()
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
