//! Wrong master keys by client address, as `api::guessing` counts them
//! to slow down guessing: one row per address, its failures in a row and
//! when the last was counted (the `console_signin` table, named for the
//! console's sign-in, which counted them first). Rows whose last failure
//! is older than [`WRONG_KEYS_KEPT`] go with the core cleanup
//! (`Store::sessions_cleanup`).
//!
//! Invariant: a failure is counted only against the count its caller
//! read (compare and set), so attempts counted at once are each weighed
//! against all counted before them, on every node.

use sea_orm::sea_query::Expr;
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};

use super::entity::console_signin;
use super::{Result, Store, inserted};

type Time = chrono::DateTime<chrono::Utc>;

/// How long an address's wrong keys are remembered after its last one.
pub const WRONG_KEYS_KEPT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

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

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn a_count_is_made_only_on_what_was_read_and_goes_a_day_on() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = crate::store::sqlite_for_tests(dir.path(), "w").await;
        let now = chrono::Utc::now();
        let old = now - chrono::Duration::days(2);
        let ip = "192.0.2.1";
        assert!(store.wrong_key_counted(ip, None, old).await.unwrap());
        // Counted by someone else since it read: not counted, read again.
        assert!(!store.wrong_key_counted(ip, None, old).await.unwrap());
        assert!(!store.wrong_key_counted(ip, Some(5), old).await.unwrap());
        assert!(store.wrong_key_counted(ip, Some(1), old).await.unwrap());
        assert_eq!(
            store.wrong_keys(ip).await.unwrap().map(|r| r.failures),
            Some(2)
        );
        assert!(
            store
                .wrong_key_counted("192.0.2.2", None, now)
                .await
                .unwrap()
        );
        // The core cleanup forgets the count a day old only.
        store.sessions_cleanup(now).await.unwrap();
        assert!(store.wrong_keys(ip).await.unwrap().is_none());
        assert!(store.wrong_keys("192.0.2.2").await.unwrap().is_some());
        store.wrong_keys_forget("192.0.2.2").await.unwrap();
        assert!(store.wrong_keys("192.0.2.2").await.unwrap().is_none());
    }
}
