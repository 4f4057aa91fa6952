//! Adopting a database that Roboger 2.0.45 made, so that an operator who
//! replaces the original keeps every address senders push to, with its
//! endpoints, subscriptions and unexpired bucket objects.
//!
//! The original (SQLAlchemy) created `addr`, `endpoint`, `subscription`
//! and `bucket` with the names this server uses, but with types it does
//! not read: flags, limits and levels as `NUMERIC` (PostgreSQL's
//! `numeric`, MySQL's `DECIMAL`), the level rule as an enum (PostgreSQL's
//! type `levelmatch`, MySQL's `ENUM`), and a bucket object's lifetime as
//! an `interval` (PostgreSQL) or seconds, with no `expires_at`. This
//! migration, the first, converts those columns in place, row for row.
//! The original's tables are known by that last column: a `bucket`
//! without `expires_at`. Any other database is left as it is.

use sea_orm::{ConnectionTrait, DbBackend};
use sea_orm_migration::prelude::*;

/// The first migration: the original's tables, converted.
pub(super) struct Original;

impl MigrationName for Original {
    fn name(&self) -> &str {
        "m20261124_000000_original"
    }
}

/// The statements converting the original's tables on `backend`, in order.
fn conversion(backend: DbBackend) -> &'static [&'static str] {
    match backend {
        DbBackend::Postgres => &[
            // A column's default is dropped, and set again, around its new
            // type: the old one is of the old type.
            "ALTER TABLE addr ALTER COLUMN active DROP DEFAULT, \
             ALTER COLUMN lim_c DROP DEFAULT, ALTER COLUMN lim_s DROP DEFAULT",
            "ALTER TABLE addr ALTER COLUMN active TYPE smallint USING active::smallint, \
             ALTER COLUMN lim_c TYPE bigint USING lim_c::bigint, \
             ALTER COLUMN lim_s TYPE bigint USING lim_s::bigint, \
             ALTER COLUMN active SET DEFAULT 1, ALTER COLUMN lim_c SET DEFAULT 100, \
             ALTER COLUMN lim_s SET DEFAULT 10000000",
            "ALTER TABLE endpoint ALTER COLUMN active DROP DEFAULT",
            "ALTER TABLE endpoint ALTER COLUMN active TYPE smallint USING active::smallint, \
             ALTER COLUMN active SET DEFAULT 1",
            "ALTER TABLE subscription ALTER COLUMN active DROP DEFAULT, \
             ALTER COLUMN level DROP DEFAULT, ALTER COLUMN level_match DROP DEFAULT",
            "ALTER TABLE subscription ALTER COLUMN active TYPE smallint USING active::smallint, \
             ALTER COLUMN level TYPE smallint USING level::smallint, \
             ALTER COLUMN level_match TYPE varchar(2) USING level_match::text, \
             ALTER COLUMN active SET DEFAULT 1, ALTER COLUMN level SET DEFAULT 20, \
             ALTER COLUMN level_match SET DEFAULT 'ge'",
            "DROP TYPE IF EXISTS levelmatch",
            "ALTER TABLE bucket ADD COLUMN expires_at timestamptz",
            "UPDATE bucket SET expires_at = d + COALESCE(expires, interval '0')",
            "ALTER TABLE bucket \
             ALTER COLUMN expires TYPE bigint \
             USING COALESCE(extract(epoch FROM expires), 0)::bigint, \
             ALTER COLUMN expires SET NOT NULL, ALTER COLUMN expires_at SET NOT NULL",
            "CREATE INDEX IF NOT EXISTS bucket_expires_at ON bucket (expires_at)",
        ],
        DbBackend::MySql => &[
            "ALTER TABLE addr MODIFY active SMALLINT NOT NULL DEFAULT 1, \
             MODIFY lim_c BIGINT NOT NULL DEFAULT 100, \
             MODIFY lim_s BIGINT NOT NULL DEFAULT 10000000",
            "ALTER TABLE endpoint MODIFY active SMALLINT NOT NULL DEFAULT 1",
            "ALTER TABLE subscription MODIFY active SMALLINT NOT NULL DEFAULT 1, \
             MODIFY level SMALLINT NOT NULL DEFAULT 20, \
             MODIFY level_match VARCHAR(2) NOT NULL DEFAULT 'ge'",
            "ALTER TABLE bucket ADD COLUMN expires_at TIMESTAMP(6) NULL",
            // `d` is a DATETIME in the connection's time zone, UTC. A
            // TIMESTAMP ends in 2038: a lifetime past it ends there, as
            // one put by this server would be refused.
            "UPDATE bucket SET expires = COALESCE(expires, 0), \
             expires_at = LEAST(d + INTERVAL COALESCE(expires, 0) SECOND, \
             '2038-01-19 03:14:07')",
            // The default said, as every time column's is (see the
            // migrations' `mysql_time_attributes`).
            "ALTER TABLE bucket MODIFY expires BIGINT NOT NULL, \
             MODIFY expires_at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6), \
             ADD INDEX bucket_expires_at (expires_at)",
        ],
        // SQLite (the one backend left) reads the NUMERIC columns as the integers they hold, and
        // the enum is a CHECK on text; only the bucket changes. An index
        // `bucket_expires_at` that a build before this one made there is
        // on no column (SQLite took the name for a string) and is made
        // again. `expires_at` is written as this server writes it
        // (RFC 3339 in UTC), so that it compares as text; a `d` SQLite
        // cannot read makes the object expired.
        _ => &[
            "DROP INDEX IF EXISTS bucket_expires_at",
            "ALTER TABLE bucket ADD COLUMN expires_at TEXT NOT NULL \
             DEFAULT '1970-01-01T00:00:00+00:00'",
            "UPDATE bucket SET expires = COALESCE(expires, 0), \
             expires_at = COALESCE(strftime('%Y-%m-%dT%H:%M:%f+00:00', d, \
             '+' || COALESCE(expires, 0) || ' seconds'), '1970-01-01T00:00:00+00:00')",
            "CREATE INDEX IF NOT EXISTS bucket_expires_at ON bucket (expires_at)",
        ],
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Original {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if !m.has_table("bucket").await? || m.has_column("bucket", "expires_at").await? {
            return Ok(());
        }
        tracing::info!("adopting the tables of Roboger 2.x: converting their column types");
        let db = m.get_connection();
        for sql in conversion(m.get_database_backend()) {
            db.execute_unprepared(sql).await?;
        }
        Ok(())
    }

    /// The original's tables, once converted, are this server's: there is
    /// nothing to undo.
    async fn down(&self, _m: &SchemaManager) -> Result<(), DbErr> {
        Ok(())
    }
}
