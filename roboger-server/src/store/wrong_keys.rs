//! Wrong master keys by client address, as `api::guessing` counts them
//! to slow down guessing: one row per address, its failures in a row and
//! when the last was counted (the `console_signin` table, named for the
//! console's sign-in, which counted them first). Rows whose last failure
//! is older than [`WRONG_KEYS_KEPT`] go with the core cleanup
//! (`Store::sessions_cleanup`).
//!
//! A client that may name its own address (`ip-header` believed from
//! every client, or an IPv6 network wider than a /64) adds a row with
//! each wrong key it sends from a fresh one, so the table is trimmed to
//! the [`WRONG_KEYS_ADDRESSES`] that count most (the most failures, then
//! the latest) each time a node has counted [`TRIM_EVERY`] addresses
//! anew. A guesser held back, whose row has the most failures, stays
//! held back under such a flood; a client whose few wrong keys are
//! forgotten again gets its free ones back, as after a right key.
//!
//! Invariant: a failure is counted only against the count its caller
//! read (compare and set), so attempts counted at once are each weighed
//! against all counted before them, on every node.
//!
//! Invariant: the table holds at most [`WRONG_KEYS_ADDRESSES`] rows, and
//! [`TRIM_EVERY`] more for each node, besides those of the last day's
//! addresses counted while a trim was failing.

use std::sync::atomic::Ordering;

use sea_orm::sea_query::{Condition, Expr};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};

use super::entity::console_signin;
use super::{Result, Store, inserted};

type Time = chrono::DateTime<chrono::Utc>;

/// How long an address's wrong keys are remembered after its last one.
pub const WRONG_KEYS_KEPT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The most addresses whose wrong keys are remembered, once trimmed.
pub const WRONG_KEYS_ADDRESSES: u64 = 10_000;

/// How many addresses a node counts anew between two trims.
pub const TRIM_EVERY: u64 = 1_000;

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
    /// that its caller reads again. Every [`TRIM_EVERY`]th address this
    /// node counts anew then trims the table ([`Store::wrong_keys_trim`]).
    pub async fn wrong_key_counted(&self, ip: &str, seen: Option<i32>, now: Time) -> Result<bool> {
        let Some(seen) = seen else {
            let first = console_signin::Entity::insert(console_signin::ActiveModel {
                ip: Set(ip.to_string()),
                failures: Set(1),
                last_failure: Set(now),
            })
            .exec_without_returning(&self.db)
            .await;
            let first = inserted(first)?;
            if first
                && self.wrong_key_addresses.fetch_add(1, Ordering::Relaxed) % TRIM_EVERY
                    == TRIM_EVERY - 1
            {
                self.wrong_keys_trim(WRONG_KEYS_ADDRESSES).await?;
            }
            return Ok(first);
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

    /// Forgets the wrong keys of every address but the `keep` that count
    /// most: the most failures first, then the latest. Returns how many
    /// addresses were forgotten.
    pub async fn wrong_keys_trim(&self, keep: u64) -> Result<u64> {
        use console_signin::Column::{Failures, LastFailure};
        let Some(edge) = console_signin::Entity::find()
            .order_by_desc(Failures)
            .order_by_desc(LastFailure)
            .offset(keep)
            .one(&self.db)
            .await?
        else {
            return Ok(0);
        };
        // The first row past `keep`, and every row after it in that order
        // (rows tied with it go too).
        let r = console_signin::Entity::delete_many()
            .filter(
                Condition::any().add(Failures.lt(edge.failures)).add(
                    Condition::all()
                        .add(Failures.eq(edge.failures))
                        .add(LastFailure.lte(edge.last_failure)),
                ),
            )
            .exec(&self.db)
            .await?;
        Ok(r.rows_affected)
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

    #[tokio::test]
    async fn a_trim_keeps_the_most_failures_then_the_latest() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let store = crate::store::sqlite_for_tests(dir.path(), "w").await;
        let at = |s: i64| chrono::Utc::now() - chrono::Duration::seconds(1000 - s);
        let count = |ip: &'static str, failures: i32, t: i64| {
            let store = &store;
            async move {
                assert!(store.wrong_key_counted(ip, None, at(t)).await.unwrap());
                for seen in 1..failures {
                    assert!(
                        store
                            .wrong_key_counted(ip, Some(seen), at(t))
                            .await
                            .unwrap()
                    );
                }
            }
        };
        count("10.0.0.1", 5, 0).await;
        count("10.0.0.2", 1, 10).await;
        count("10.0.0.3", 1, 20).await;
        count("10.0.0.4", 2, 1).await;
        count("10.0.0.5", 1, 30).await;
        assert_eq!(store.wrong_keys_trim(3).await.unwrap(), 2);
        let kept = |ip: &'static str| async { store.wrong_keys(ip).await.unwrap().is_some() };
        assert!(kept("10.0.0.1").await && kept("10.0.0.4").await && kept("10.0.0.5").await);
        assert!(!kept("10.0.0.2").await && !kept("10.0.0.3").await);
        assert_eq!(store.wrong_keys_trim(3).await.unwrap(), 0);
    }
}
