//! What the servers sharing one database coordinate through it: the lock
//! that serializes migrations, node heartbeats and the rescue of a dead
//! node's leases, the log of routing changes every node follows, and
//! leases on periodic jobs so one node at a time runs each.
//!
//! Invariant: state shared between nodes lives here, in the database;
//! a node's memory only caches it.

use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DatabaseTransaction, DbErr, EntityTrait,
    PaginatorTrait, QueryFilter, QueryOrder, QuerySelect, Select,
};

use super::entity::{delivery, job_lease, node, routing_change, routing_version};
use super::{Result, Store, inserted};
use crate::config::DbBackend;

/// The advisory lock (PostgreSQL) or named lock (MySQL) held while
/// migrations run: "roboger" in ASCII.
const MIGRATION_LOCK: i64 = 0x0072_6f62_6f67_6572;
const MIGRATION_LOCK_NAME: &str = "roboger_migrate";

fn sqlx_err(what: &str, e: impl std::fmt::Display) -> DbErr {
    DbErr::Custom(format!("{what}: {e}"))
}

/// The longest round trip [`Store::clock_offset`] trusts.
const CLOCK_READ_MAX: Duration = Duration::from_millis(200);

impl Store {
    /// The migrations the database records that this build does not have:
    /// not empty once a newer build has migrated it. Cheap enough for
    /// every heartbeat.
    pub async fn schema_newer(&self) -> Result<Vec<String>> {
        Ok(super::migration::applied_beyond_this_build(&self.db).await?)
    }

    /// How far the database server's clock is ahead of this process's
    /// (behind when negative), measured against the middle of the round
    /// trip; `None` on SQLite, whose clock is this machine's, and when the
    /// round trip took longer than `CLOCK_READ_MAX` (0.2 s), which would leave
    /// the figure that uncertain. Leases and heartbeats written by one
    /// node are read by the others, so nodes whose offsets differ by a
    /// good part of `node-timeout` misjudge each other.
    pub async fn clock_offset(&self) -> Result<Option<chrono::Duration>> {
        let sql = match self.backend {
            DbBackend::Sqlite => return Ok(None),
            DbBackend::Postgres => "SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8 AS t",
            // DECIMAL times a float literal is a DOUBLE.
            DbBackend::MySql => "SELECT UNIX_TIMESTAMP(NOW(6)) * 1.0e0 AS t",
        };
        let before = chrono::Utc::now();
        let row = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                self.db.get_database_backend(),
                sql,
            ))
            .await?;
        let after = chrono::Utc::now();
        let Some(row) = row else { return Ok(None) };
        if (after - before).to_std().unwrap_or(Duration::MAX) > CLOCK_READ_MAX {
            return Ok(None);
        }
        let theirs: f64 = row.try_get("", "t")?;
        let ours = before + (after - before) / 2;
        let ours = ours.timestamp() as f64 + f64::from(ours.timestamp_subsec_nanos()) * 1e-9;
        Ok(chrono::Duration::try_milliseconds(
            ((theirs - ours) * 1000.0).round() as i64,
        ))
    }

    /// The most connections the database lets this server's user open at
    /// once, over every node and whatever else uses that user or database,
    /// with the setting that says so: the least of the database server's
    /// room (`max_connections`, less the connections it reserves for
    /// superusers unless the user is one), the role's and the database's
    /// `CONNECTION LIMIT` (PostgreSQL), the account's
    /// `max_user_connections` (MySQL). `None` on SQLite, and where nothing
    /// limits them.
    pub async fn connection_limit(&self) -> Result<Option<(i64, &'static str)>> {
        let sql = match self.backend {
            DbBackend::Sqlite => return Ok(None),
            DbBackend::Postgres => {
                "SELECT current_setting('max_connections')::int8 - CASE WHEN r.rolsuper THEN 0 \
                 ELSE current_setting('superuser_reserved_connections')::int8 \
                 + COALESCE(NULLIF(current_setting('reserved_connections', true), '')::int8, 0) \
                 END AS server, r.rolconnlimit::int8 AS role, d.datconnlimit::int8 AS db \
                 FROM pg_roles r, pg_database d \
                 WHERE r.rolname = current_user AND d.datname = current_database()"
            }
            // The session's max_user_connections is the account's own
            // limit when it has one, else the server's for every account.
            DbBackend::MySql => {
                "SELECT CAST(@@max_connections AS SIGNED) AS server, \
                 CAST(@@SESSION.max_user_connections AS SIGNED) AS role, -1 AS db"
            }
        };
        let Some(row) = self
            .db
            .query_one_raw(sea_orm::Statement::from_string(
                self.db.get_database_backend(),
                sql,
            ))
            .await?
        else {
            return Ok(None);
        };
        let (server, role, db): (i64, i64, i64) = (
            row.try_get("", "server")?,
            row.try_get("", "role")?,
            row.try_get("", "db")?,
        );
        let (role_is, db_is) = match self.backend {
            DbBackend::MySql => ("the account's max_user_connections", ""),
            _ => (
                "the role's CONNECTION LIMIT",
                "the database's CONNECTION LIMIT",
            ),
        };
        // PostgreSQL's "no limit" is -1, MySQL's 0.
        Ok([(server, "max_connections"), (role, role_is), (db, db_is)]
            .into_iter()
            .filter(|&(most, _)| most > 0 || (most == 0 && self.backend == DbBackend::Postgres))
            .min_by_key(|&(most, _)| most))
    }

    /// How many nodes have written a heartbeat within `timeout` (the
    /// `node-timeout`) and were not found dead.
    pub async fn nodes_alive(&self, timeout: Duration) -> Result<u64> {
        Ok(live_nodes(timeout).count(&self.db).await?)
    }

    /// Applies every pending migration while holding a database-wide lock,
    /// so any number of servers may start at once on an empty database:
    /// the first migrates, the others wait (up to `wait`) and then find
    /// nothing to do. On SQLite the lock is an OS file lock next to the
    /// database file, released by the kernel when its holder dies. A
    /// database a newer build has migrated is refused
    /// ([`StoreError::NewerSchema`](super::StoreError::NewerSchema)) and
    /// left as it is.
    pub async fn migrate(&self, wait: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + wait;
        let waiting = |what: &str| {
            DbErr::Custom(format!(
                "another server held the migration lock ({what}) for more than {wait:?}"
            ))
        };
        match self.backend {
            DbBackend::Postgres => {
                let pool = self.db.get_postgres_connection_pool();
                let mut conn = pool
                    .acquire()
                    .await
                    .map_err(|e| sqlx_err("cannot connect for the migration lock", e))?;
                // A session lock: the connection is closed, not pooled,
                // once done (or dropped), which releases it in any case.
                conn.close_on_drop();
                loop {
                    let got: bool = sea_orm::sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(MIGRATION_LOCK)
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(|e| sqlx_err("cannot take the migration lock", e))?;
                    if got {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(waiting("pg_advisory_lock").into());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let r = self.migrate_now().await;
                let _ = sea_orm::sqlx::query("SELECT pg_advisory_unlock($1)")
                    .bind(MIGRATION_LOCK)
                    .execute(&mut *conn)
                    .await;
                r
            }
            DbBackend::MySql => {
                let pool = self.db.get_mysql_connection_pool();
                let mut conn = pool
                    .acquire()
                    .await
                    .map_err(|e| sqlx_err("cannot connect for the migration lock", e))?;
                conn.close_on_drop();
                loop {
                    let got: Option<i64> = sea_orm::sqlx::query_scalar("SELECT GET_LOCK(?, 1)")
                        .bind(MIGRATION_LOCK_NAME)
                        .fetch_one(&mut *conn)
                        .await
                        .map_err(|e| sqlx_err("cannot take the migration lock", e))?;
                    if got == Some(1) {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(waiting("GET_LOCK").into());
                    }
                }
                let r = self.migrate_now().await;
                let _ = sea_orm::sqlx::query("SELECT RELEASE_LOCK(?)")
                    .bind(MIGRATION_LOCK_NAME)
                    .execute(&mut *conn)
                    .await;
                r
            }
            DbBackend::Sqlite => {
                let Some(db) = &self.sqlite_file else {
                    return self.migrate_now().await;
                };
                let mut path = db.clone().into_os_string();
                path.push("-migrate.lock");
                let lock = std::fs::OpenOptions::new()
                    .mode(super::sqlite_file::OWN_MODE)
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(|e| {
                        let what =
                            format!("cannot open the migration lock file {}", path.display());
                        sqlx_err(&what, e)
                    })?;
                loop {
                    match lock.try_lock() {
                        Ok(()) => break,
                        Err(std::fs::TryLockError::WouldBlock) => {}
                        Err(std::fs::TryLockError::Error(e)) => {
                            return Err(sqlx_err("cannot lock the migration lock file", e).into());
                        }
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(waiting("a file lock").into());
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                let r = self.migrate_now().await;
                let _ = lock.unlock();
                r
            }
        }
    }
}

/// The channel on which PostgreSQL announces routing changes.
pub const ROUTING_CHANNEL: &str = "roboger_routes";

/// A node as the management API lists it.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub node: node::Model,
    /// Pending deliveries it holds leases on.
    pub leased: i64,
}

impl NodeRow {
    /// Whether the node is alive at `now`: not rescued, and its last
    /// heartbeat younger than `timeout` (the `node-timeout`).
    pub fn alive(&self, now: chrono::DateTime<chrono::Utc>, timeout: Duration) -> bool {
        let silent = (now - self.node.heartbeat).to_std().unwrap_or_default();
        self.node.rescued.is_none() && silent < timeout
    }
}

impl Store {
    // ---- nodes -------------------------------------------------------------

    /// Writes `me`'s heartbeat, registering it on the first call. Returns
    /// false when another node had presumed it dead and freed its leases
    /// (it was paused or cut off for longer than the node timeout).
    pub async fn node_heartbeat(&self, me: &node::Model) -> Result<bool> {
        let now = chrono::Utc::now();
        let beat = |q: sea_orm::UpdateMany<node::Entity>| {
            q.col_expr(node::Column::Heartbeat, Expr::value(now))
                .col_expr(
                    node::Column::Rescued,
                    Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
                )
                .filter(node::Column::Instance.eq(me.instance.as_str()))
        };
        let r = beat(node::Entity::update_many())
            .filter(node::Column::Rescued.is_null())
            .exec(&self.db)
            .await?;
        if r.rows_affected == 1 {
            return Ok(true);
        }
        if beat(node::Entity::update_many())
            .exec(&self.db)
            .await?
            .rows_affected
            == 1
        {
            return Ok(false);
        }
        let mut row = me.clone();
        row.heartbeat = now;
        row.rescued = None;
        let first = node::Entity::insert(node::ActiveModel::from(row))
            .exec_without_returning(&self.db)
            .await;
        inserted(first)?;
        Ok(true)
    }

    /// Records that `instance` obeys every routing change up to
    /// `version` (never moving it back).
    pub async fn node_obeys(&self, instance: &str, version: i64) -> Result<()> {
        node::Entity::update_many()
            .col_expr(node::Column::RoutingVersion, Expr::value(version))
            .filter(node::Column::Instance.eq(instance))
            .filter(node::Column::RoutingVersion.lt(version))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// The live instances other than `me` (a heartbeat within `timeout`,
    /// the `node-timeout`, and not found dead) that do not yet obey the
    /// routing change `version`.
    pub async fn nodes_behind(
        &self,
        me: &str,
        version: i64,
        timeout: Duration,
    ) -> Result<Vec<String>> {
        Ok(live_nodes(timeout)
            .select_only()
            .column(node::Column::Instance)
            .filter(node::Column::Instance.ne(me))
            .filter(node::Column::RoutingVersion.lt(version))
            .into_tuple()
            .all(&self.db)
            .await?)
    }

    /// Instances other than `me` whose last heartbeat is older than
    /// `before` and whose leases nobody has freed yet.
    pub async fn nodes_dead(
        &self,
        me: &str,
        before: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<String>> {
        Ok(node::Entity::find()
            .select_only()
            .column(node::Column::Instance)
            .filter(node::Column::Heartbeat.lt(before))
            .filter(node::Column::Rescued.is_null())
            .filter(node::Column::Instance.ne(me))
            .into_tuple()
            .all(&self.db)
            .await?)
    }

    /// Frees the leases of a dead instance, if it is still dead and nobody
    /// else did it first; returns how many were freed (`None`: not done
    /// here). Marking the node rescued and freeing its leases commit
    /// together, so two nodes never both do it.
    pub async fn node_rescue(
        &self,
        instance: &str,
        before: chrono::DateTime<chrono::Utc>,
    ) -> Result<Option<u64>> {
        let txn = self.begin_write().await?;
        let marked = node::Entity::update_many()
            .col_expr(node::Column::Rescued, Expr::value(chrono::Utc::now()))
            .filter(node::Column::Instance.eq(instance))
            .filter(node::Column::Heartbeat.lt(before))
            .filter(node::Column::Rescued.is_null())
            .exec(&txn)
            .await?;
        if marked.rows_affected == 0 {
            txn.commit().await?;
            return Ok(None);
        }
        let freed = release_leases_of(&txn, instance).await?;
        txn.commit().await?;
        Ok(Some(freed))
    }

    /// Forgets nodes rescued before `before` (the list keeps the dead for a
    /// while, so an operator sees what happened).
    pub async fn nodes_forget(&self, before: chrono::DateTime<chrono::Utc>) -> Result<u64> {
        Ok(node::Entity::delete_many()
            .filter(node::Column::Rescued.lt(before))
            .exec(&self.db)
            .await?
            .rows_affected)
    }

    /// A node stopping cleanly: frees its leases and removes its row.
    pub async fn node_leave(&self, instance: &str) -> Result<u64> {
        let txn = self.begin_write().await?;
        let freed = release_leases_of(&txn, instance).await?;
        node::Entity::delete_by_id(instance.to_string())
            .exec(&txn)
            .await?;
        txn.commit().await?;
        Ok(freed)
    }

    /// Every node with the number of pending deliveries it holds, oldest
    /// start first.
    pub async fn node_list(&self) -> Result<Vec<NodeRow>> {
        let nodes = node::Entity::find()
            .order_by_asc(node::Column::Started)
            .all(&self.db)
            .await?;
        let leased: Vec<(Option<String>, i64)> = delivery::Entity::find()
            .select_only()
            .column(delivery::Column::LeasedBy)
            .column_as(delivery::Column::Id.count(), "n")
            .filter(super::delivery::pending())
            .filter(delivery::Column::LeasedBy.is_not_null())
            .group_by(delivery::Column::LeasedBy)
            .into_tuple()
            .all(&self.db)
            .await?;
        let leased: std::collections::HashMap<String, i64> = leased
            .into_iter()
            .filter_map(|(k, n)| Some((k?, n)))
            .collect();
        Ok(nodes
            .into_iter()
            .map(|node| NodeRow {
                leased: leased.get(&node.instance).copied().unwrap_or(0),
                node,
            })
            .collect())
    }

    /// Extends `instance`'s leases that expire before `expiring` to
    /// `until`: a call that outlasts half a lease keeps its delivery, so
    /// no other live node makes it a second time.
    pub async fn renew_leases(
        &self,
        instance: &str,
        expiring: chrono::DateTime<chrono::Utc>,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64> {
        Ok(delivery::Entity::update_many()
            .col_expr(delivery::Column::LeaseUntil, Expr::value(until))
            .filter(delivery::Column::LeasedBy.eq(instance))
            .filter(super::delivery::pending())
            .filter(delivery::Column::LeaseUntil.lt(expiring))
            .exec(&self.db)
            .await?
            .rows_affected)
    }

    // ---- periodic jobs -----------------------------------------------------

    /// Takes the lease on job `name` for `holder` until `until` if nobody
    /// holds it now; true when `holder` is to run the job.
    pub async fn job_take(
        &self,
        name: &str,
        holder: &str,
        until: chrono::DateTime<chrono::Utc>,
    ) -> Result<bool> {
        let now = chrono::Utc::now();
        let r = job_lease::Entity::update_many()
            .col_expr(job_lease::Column::Holder, Expr::value(holder))
            .col_expr(job_lease::Column::Until, Expr::value(until))
            .filter(job_lease::Column::Name.eq(name))
            .filter(job_lease::Column::Until.lte(now))
            .exec(&self.db)
            .await?;
        if r.rows_affected == 1 {
            return Ok(true);
        }
        let first = job_lease::Entity::insert(job_lease::ActiveModel {
            name: Set(name.to_string()),
            holder: Set(Some(holder.to_string())),
            until: Set(until),
        })
        .exec_without_returning(&self.db)
        .await;
        inserted(first)
    }

    // ---- routing changes ---------------------------------------------------

    /// A connection of its own, listening for `NOTIFY` on `channel`
    /// (PostgreSQL only); it reconnects by itself when the connection
    /// drops. Not one of the pool's: a listener given up on a connection
    /// fallen silent says `UNLISTEN` as it goes, which waits until TCP
    /// gives up on it, and would hold a place in the pool until then.
    pub async fn listen(
        &self,
        channel: &str,
        timeout: Duration,
    ) -> Result<sea_orm::sqlx::postgres::PgListener> {
        if self.backend != DbBackend::Postgres {
            return Err(DbErr::Custom("LISTEN needs PostgreSQL".into()).into());
        }
        let options = self.db.get_postgres_connection_pool().connect_options();
        let own = sea_orm::sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(timeout)
            .max_lifetime(None)
            .idle_timeout(None)
            .connect_lazy_with((*options).clone());
        let mut l = sea_orm::sqlx::postgres::PgListener::connect_with(&own)
            .await
            .map_err(|e| sqlx_err("cannot connect to listen", e))?;
        l.ignore_pool_close_event(true);
        l.listen(channel)
            .await
            .map_err(|e| sqlx_err("cannot LISTEN", e))?;
        Ok(l)
    }

    /// Sends `payload` to the listeners of `channel` (PostgreSQL only).
    pub async fn notify(&self, channel: &str, payload: &str) -> Result<()> {
        self.db
            .execute_raw(sea_orm::Statement::from_sql_and_values(
                sea_orm::DbBackend::Postgres,
                "SELECT pg_notify($1, $2)",
                [channel.into(), payload.into()],
            ))
            .await?;
        Ok(())
    }

    /// The version of the newest routing change.
    pub async fn routing_version(&self) -> Result<i64> {
        Ok(routing_version::Entity::find_by_id(1)
            .one(&self.db)
            .await?
            .map_or(0, |r| r.version))
    }

    /// Routing changes after `version`, oldest first, at most `limit`.
    pub async fn routing_changes_since(
        &self,
        version: i64,
        limit: u64,
    ) -> Result<Vec<routing_change::Model>> {
        Ok(routing_change::Entity::find()
            .filter(routing_change::Column::Version.gt(version))
            .order_by_asc(routing_change::Column::Version)
            .limit(limit)
            .all(&self.db)
            .await?)
    }

    /// Deletes routing changes recorded before `before`, except the newest.
    pub async fn routing_changes_prune(
        &self,
        before: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64> {
        let newest = self.routing_version().await?;
        Ok(routing_change::Entity::delete_many()
            .filter(routing_change::Column::Created.lt(before))
            .filter(routing_change::Column::Version.lt(newest))
            .exec(&self.db)
            .await?
            .rows_affected)
    }
}

/// Records, inside a management change's own transaction, that the routes
/// of `addr_id` (`None`: of every address) changed. The version row's lock
/// is held until the commit, so changes commit in version order and a node
/// that has applied version N has seen every change up to N. On
/// PostgreSQL the other nodes are told at once (`NOTIFY` is sent on commit).
pub(super) async fn announce_change(
    txn: &DatabaseTransaction,
    backend: DbBackend,
    addr_id: Option<i64>,
) -> Result<i64> {
    routing_version::Entity::update_many()
        .col_expr(
            routing_version::Column::Version,
            Expr::col(routing_version::Column::Version).add(1),
        )
        .filter(routing_version::Column::Id.eq(1))
        .exec(txn)
        .await?;
    let version = routing_version::Entity::find_by_id(1)
        .one(txn)
        .await?
        .map_or(1, |r| r.version);
    routing_change::Entity::insert(routing_change::ActiveModel {
        version: Set(version),
        addr_id: Set(addr_id),
        created: Set(chrono::Utc::now()),
    })
    .exec_without_returning(txn)
    .await?;
    if backend == DbBackend::Postgres {
        txn.execute_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            "SELECT pg_notify($1, $2)",
            [ROUTING_CHANNEL.into(), version.to_string().into()],
        ))
        .await?;
    }
    Ok(version)
}

/// Frees every pending lease `instance` holds.
async fn release_leases_of(txn: &DatabaseTransaction, instance: &str) -> Result<u64> {
    Ok(delivery::Entity::update_many()
        .col_expr(
            delivery::Column::LeaseUntil,
            Expr::value(Option::<chrono::DateTime<chrono::Utc>>::None),
        )
        .col_expr(
            delivery::Column::LeasedBy,
            Expr::value(Option::<String>::None),
        )
        .filter(delivery::Column::LeasedBy.eq(instance))
        .filter(super::delivery::pending())
        .exec(txn)
        .await?
        .rows_affected)
}

/// The nodes alive now: a heartbeat within `timeout` (the `node-timeout`)
/// and not found dead. Invariant: every question about which nodes are
/// alive narrows this one select, so they cannot disagree.
pub(super) fn live_nodes(timeout: Duration) -> Select<node::Entity> {
    let since = chrono::Utc::now() - chrono::Duration::from_std(timeout).unwrap_or_default();
    node::Entity::find()
        .filter(node::Column::Heartbeat.gt(since))
        .filter(node::Column::Rescued.is_null())
}
