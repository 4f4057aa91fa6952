//! Wrong master keys by client address, as `api::guessing` counts them
//! to slow down guessing: one row per address, its failures in a row and
//! when the last was counted (the `console_signin` table, named for the
//! console's sign-in, which counted them first). Rows whose last failure
//! is old go with the core cleanup (`Store::sessions_cleanup`).
//!
//! Invariant: a failure is counted only against the count its caller
//! read (compare and set), so attempts counted at once are each weighed
//! against all counted before them, on every node.

use sea_orm::sea_query::Expr;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};

use super::entity::console_signin;
use super::{Result, Store, inserted};

type Time = chrono::DateTime<chrono::Utc>;

impl Store {
    /// Wrong keys from `ip` since its last right one.
    pub async fn wrong_keys(&self, ip: &str) -> Result<Option<console_signin::Model>> {
        Ok(console_signin::Entity::find_by_id(ip.to_string())
            .one(&self.db)
            .await?)
    }

    /// Counts one more attempt from `ip` at `now` as wrong (before its
    /// key is checked, or after it was found wrong; a right key forgets it
    /// again), if `ip` still has the `seen` failures its caller read:
    /// `false` when another attempt from `ip` was counted in between, so
    /// that its caller reads again.
    pub async fn wrong_key_counted(&self, ip: &str, seen: Option<i32>, now: Time) -> Result<bool> {
        let Some(seen) = seen else {
            let first = console_signin::Entity::insert(console_signin::ActiveModel {
                ip: Set(ip.to_string()),
                failures: Set(1),
                last_failure: Set(now),
            })
            .exec_without_returning(&self.db)
            .await;
            return inserted(first);
        };
        let r = console_signin::Entity::update_many()
            .col_expr(
                console_signin::Column::Failures,
                Expr::value(seen.saturating_add(1)),
            )
            .col_expr(console_signin::Column::LastFailure, Expr::value(now))
            .filter(console_signin::Column::Ip.eq(ip))
            .filter(console_signin::Column::Failures.eq(seen))
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected == 1)
    }

    /// Forgets `ip`'s wrong keys (it gave the right one).
    pub async fn wrong_keys_forget(&self, ip: &str) -> Result<()> {
        console_signin::Entity::delete_by_id(ip.to_string())
            .exec(&self.db)
            .await?;
        Ok(())
    }
}
