//! Bucket objects: immutable blobs that plugins store, optionally public
//! (served at `/file/{id}`), each with an expiry.

use std::time::Duration;

use sea_orm::{
    ActiveModelTrait, ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QuerySelect,
};
use serde_json::Value;

use super::entity::bucket;
use super::{Result, Store, StoreError, gone_since_read};

/// A bucket object to store.
#[derive(Debug, Clone)]
pub struct NewObject {
    pub creator: String,
    pub addr_id: Option<i64>,
    pub mimetype: String,
    pub fname: Option<String>,
    pub public: bool,
    pub metadata: Value,
    pub expires: Duration,
    pub content: Vec<u8>,
}

/// The latest time MySQL keeps: its `TIMESTAMP` ends here, and MariaDB
/// takes a later one bound by the server (sqlx binds every time as a
/// `TIMESTAMP`) for NULL, even into a `DATETIME`. An object asked to live
/// past it is refused, saying why, not failed with "Column 'expires_at'
/// cannot be null"; times the server writes for now (heartbeats, events,
/// deliveries) reach it in 2038.
const MYSQL_LATEST: chrono::DateTime<chrono::Utc> =
    chrono::DateTime::from_timestamp_nanos(i32::MAX as i64 * 1_000_000_000);

impl Store {
    // ---- bucket ----------------------------------------------------------

    /// Stores a new, immutable object and returns its id.
    pub async fn bucket_put(&self, o: NewObject) -> Result<String> {
        let now = chrono::Utc::now();
        let id = crate::bucket::object_id(&o.content, &o.creator, o.addr_id, now);
        // Callers keep `expires` within MAX_EXPIRES; past any time a
        // backend can hold, it is refused rather than overflowing.
        let expires_at = chrono::Duration::from_std(o.expires)
            .ok()
            .and_then(|d| now.checked_add_signed(d))
            .ok_or_else(|| StoreError::TooLarge(format!("expires {:?}", o.expires)))?;
        if self.backend() == crate::config::DbBackend::MySql && expires_at > MYSQL_LATEST {
            return Err(StoreError::TooLarge(format!(
                "expires must be at most {} seconds now: this server's database \
                 (MySQL) keeps times until {} only",
                (MYSQL_LATEST - now).num_seconds().max(0),
                MYSQL_LATEST.format("%Y-%m-%d %H:%M:%S UTC")
            )));
        }
        let expires = i64::try_from(o.expires.as_secs()).unwrap_or(i64::MAX);
        let am = bucket::ActiveModel {
            id: Set(id.clone()),
            creator: Set(o.creator),
            addr_id: Set(o.addr_id),
            mimetype: Set(o.mimetype),
            fname: Set(o.fname),
            size: Set(o.content.len() as i64),
            public: Set(o.public),
            metadata: Set(Some(o.metadata)),
            d: Set(now),
            da: Set(None),
            expires: Set(expires),
            expires_at: Set(expires_at),
            content: Set(o.content),
        };
        am.insert(&self.db)
            .await
            .map_err(|e| gone_since_read(e, || "addr of the bucket object".into()))?;
        Ok(id)
    }

    /// The size of an unexpired public object, without reading it.
    pub async fn bucket_public_size(&self, id: &str) -> Result<i64> {
        live(id, Some(true))?
            .select_only()
            .column(bucket::Column::Size)
            .into_tuple::<i64>()
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("bucket object {id}")))
    }

    /// An unexpired object; with `public`, only one whose flag matches.
    pub async fn bucket_get(&self, id: &str, public: Option<bool>) -> Result<bucket::Model> {
        live(id, public)?
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("bucket object {id}")))
    }

    /// Sets an unexpired object's access time.
    pub async fn bucket_touch(&self, id: &str) -> Result<()> {
        let r = bucket::Entity::update_many()
            .col_expr(
                bucket::Column::Da,
                sea_orm::sea_query::Expr::value(chrono::Utc::now()),
            )
            .filter(bucket::Column::Id.eq(id))
            .filter(bucket::Column::ExpiresAt.gt(chrono::Utc::now()))
            .exec(&self.db)
            .await?;
        if r.rows_affected == 0 {
            return Err(StoreError::NotFound(format!("bucket object {id}")));
        }
        Ok(())
    }

    /// Deletes an object.
    pub async fn bucket_delete(&self, id: &str) -> Result<()> {
        let r = bucket::Entity::delete_by_id(id.to_string())
            .exec(&self.db)
            .await?;
        if r.rows_affected == 0 {
            return Err(StoreError::NotFound(format!("bucket object {id}")));
        }
        Ok(())
    }

    /// Deletes bucket objects past their expiry; returns how many.
    pub async fn bucket_cleanup(&self) -> Result<u64> {
        let now = chrono::Utc::now();
        let r = bucket::Entity::delete_many()
            .filter(bucket::Column::ExpiresAt.lte(now))
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected)
    }
}

/// The query for object `id` while unexpired; with `public`, only if its
/// flag matches. Not an id at all is `NotFound` with no query, and the
/// text does not echo it.
fn live(id: &str, public: Option<bool>) -> Result<sea_orm::Select<bucket::Entity>> {
    if !crate::bucket::is_object_id(id) {
        return Err(StoreError::NotFound("bucket object (no such id)".into()));
    }
    let q = bucket::Entity::find_by_id(id.to_string())
        .filter(bucket::Column::ExpiresAt.gt(chrono::Utc::now()));
    Ok(match public {
        Some(p) => q.filter(bucket::Column::Public.eq(p)),
        None => q,
    })
}
