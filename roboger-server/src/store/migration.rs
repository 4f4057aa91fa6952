//! Schema migrations (sea-orm-migration), applied at start and by
//! `roboger-server migrate`. A database that Roboger 2.0.45 made is
//! adopted: the first migration ([`original`]) converts its tables'
//! types, and the tables are then created `IF NOT EXISTS` beside them.

mod original;

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

/// Every migration, oldest first.
pub struct Migrator;

/// The migrations `db` records as applied that this build does not have,
/// in the order applied: a newer build migrated it. Creates the record
/// table on an empty database (as applying migrations would).
pub async fn unknown_to_this_build<C: ConnectionTrait>(db: &C) -> Result<Vec<String>, DbErr> {
    let known: Vec<String> = Migrator::migrations()
        .iter()
        .map(|m| m.name().to_string())
        .collect();
    Ok(Migrator::get_migration_models(db)
        .await?
        .into_iter()
        .map(|m| m.version)
        .filter(|v| !known.contains(v))
        .collect())
}

/// [`unknown_to_this_build`] for asking often (at every heartbeat): it
/// counts the applied migrations first and names them only when there are
/// more than this build has.
pub async fn applied_beyond_this_build<C: ConnectionTrait>(db: &C) -> Result<Vec<String>, DbErr> {
    use sea_orm::{EntityTrait, PaginatorTrait};
    let applied = sea_orm_migration::seaql_migrations::Entity::find()
        .count(db)
        .await?;
    if applied <= Migrator::migrations().len() as u64 {
        return Ok(Vec::new());
    }
    unknown_to_this_build(db).await
}

impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(original::Original),
            Box::new(Base),
            Box::new(Events),
            Box::new(DropDeliveryEvent),
            Box::new(Cluster),
            Box::new(MysqlTypes),
            Box::new(MysqlLongText),
            Box::new(Console),
            Box::new(PendingDue),
            Box::new(DropDeliveryEventKey),
            Box::new(EventHops),
            Box::new(DeliveryEndpointId),
            Box::new(MysqlUtf8mb4),
            Box::new(MysqlInstants),
            Box::new(NodeRoutingVersion),
            Box::new(Deletions),
            Box::new(DeletionUpTo),
        ]
    }
}

#[derive(DeriveIden)]
enum Addr {
    Table,
    Id,
    A,
    Active,
    LimC,
    LimS,
}

#[derive(DeriveIden)]
enum Endpoint {
    Table,
    Id,
    AddrId,
    PluginName,
    Config,
    Active,
    Description,
}

#[derive(DeriveIden)]
enum Subscription {
    Table,
    Id,
    EndpointId,
    Active,
    Location,
    Tag,
    Sender,
    Level,
    LevelMatch,
}

#[derive(DeriveIden)]
enum Bucket {
    Table,
    Id,
    Creator,
    AddrId,
    Mimetype,
    Fname,
    Size,
    Public,
    Metadata,
    D,
    Da,
    Expires,
    ExpiresAt,
    Content,
}

#[derive(DeriveIden)]
enum AddrLimit {
    Table,
    AddrId,
    WindowStart,
    Count,
    Size,
}

/// addr, endpoint, subscription, bucket and the limit counters.
struct Base;

impl MigrationName for Base {
    fn name(&self) -> &str {
        "m20261124_000001_base"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Base {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Addr::Table)
                .if_not_exists()
                .col(big_pk_auto(Addr::Id))
                .col(char_len_uniq(Addr::A, 64))
                .col(small_integer(Addr::Active).default(1))
                .col(big_integer(Addr::LimC).default(100))
                .col(big_integer(Addr::LimS).default(10_000_000))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(Endpoint::Table)
                .if_not_exists()
                .col(big_pk_auto(Endpoint::Id))
                .col(big_integer(Endpoint::AddrId))
                .col(string_len(Endpoint::PluginName, 40))
                .col(json(Endpoint::Config))
                .col(small_integer(Endpoint::Active).default(1))
                .col(string_len_null(Endpoint::Description, 255))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_endpoint_addr")
                        .from(Endpoint::Table, Endpoint::AddrId)
                        .to(Addr::Table, Addr::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        create_index_once(m, "endpoint", "endpoint_addr_id", Endpoint::AddrId).await?;
        m.create_table(
            Table::create()
                .table(Subscription::Table)
                .if_not_exists()
                .col(big_pk_auto(Subscription::Id))
                .col(big_integer(Subscription::EndpointId))
                .col(small_integer(Subscription::Active).default(1))
                .col(string_len_null(Subscription::Location, 255))
                .col(string_len_null(Subscription::Tag, 255))
                .col(string_len_null(Subscription::Sender, 255))
                .col(small_integer(Subscription::Level).default(20))
                .col(string_len(Subscription::LevelMatch, 2).default("ge"))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_subscription_endpoint")
                        .from(Subscription::Table, Subscription::EndpointId)
                        .to(Endpoint::Table, Endpoint::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        create_index_once(
            m,
            "subscription",
            "subscription_endpoint_id",
            Subscription::EndpointId,
        )
        .await?;
        m.create_table(
            Table::create()
                .table(Bucket::Table)
                .if_not_exists()
                .col(char_len(Bucket::Id, 64).primary_key())
                .col(string_len(Bucket::Creator, 64))
                .col(big_integer_null(Bucket::AddrId))
                .col(string_len(Bucket::Mimetype, 256))
                .col(string_len_null(Bucket::Fname, 256))
                .col(big_integer(Bucket::Size))
                .col(boolean(Bucket::Public).default(false))
                .col(json_null(Bucket::Metadata))
                .col(instant(m, Bucket::D, false))
                .col(instant(m, Bucket::Da, true))
                .col(big_integer(Bucket::Expires))
                .col(instant(m, Bucket::ExpiresAt, false))
                .col(blob(Bucket::Content))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_bucket_addr")
                        .from(Bucket::Table, Bucket::AddrId)
                        .to(Addr::Table, Addr::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        create_index_once(m, "bucket", "bucket_expires_at", Bucket::ExpiresAt).await?;
        m.create_table(
            Table::create()
                .table(AddrLimit::Table)
                .if_not_exists()
                .col(big_integer(AddrLimit::AddrId).primary_key())
                .col(big_integer(AddrLimit::WindowStart))
                .col(big_integer(AddrLimit::Count).default(0))
                .col(big_integer(AddrLimit::Size).default(0))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_addr_limit_addr")
                        .from(AddrLimit::Table, AddrLimit::AddrId)
                        .to(Addr::Table, Addr::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            AddrLimit::Table.into_iden(),
            Bucket::Table.into_iden(),
            Subscription::Table.into_iden(),
            Endpoint::Table.into_iden(),
            Addr::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(t).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Event {
    Table,
    Id,
    AddrId,
    Addr,
    Msg,
    Subject,
    FormattedSubject,
    Level,
    Location,
    Tag,
    Sender,
    Media,
    MediaFname,
    Created,
    Hops,
}

#[derive(DeriveIden)]
enum Delivery {
    Table,
    Id,
    EventId,
    EndpointId,
    State,
    Attempts,
    NextAt,
    LeaseUntil,
    LeasedBy,
    LastError,
    Created,
    Updated,
}

/// Creates index `name` on `table`'s `column` unless the table already
/// has an index by that name. MySQL has no `CREATE INDEX IF NOT EXISTS`,
/// and the original's tables come with `endpoint_addr_id` and
/// `subscription_endpoint_id`.
async fn create_index_once(
    m: &SchemaManager<'_>,
    table: &str,
    name: &str,
    column: impl IntoIden,
) -> Result<(), DbErr> {
    if m.has_index(table, name).await? {
        return Ok(());
    }
    m.create_index(
        Index::create()
            .name(name)
            .table(Alias::new(table))
            .col(column)
            .to_owned(),
    )
    .await
}

/// Accepted events and their deliveries (durable, at-least-once).
struct Events;

impl MigrationName for Events {
    fn name(&self) -> &str {
        "m20261124_000002_events"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Events {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Event::Table)
                .if_not_exists()
                .col(char_len(Event::Id, 36).primary_key())
                .col(big_integer(Event::AddrId))
                .col(string_len(Event::Addr, 64))
                .col(text(Event::Msg))
                .col(text(Event::Subject))
                .col(text(Event::FormattedSubject))
                .col(small_integer(Event::Level))
                .col(text_null(Event::Location))
                .col(text_null(Event::Tag))
                .col(text_null(Event::Sender))
                .col(blob_null(Event::Media))
                .col(text_null(Event::MediaFname))
                .col(instant(m, Event::Created, false))
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_event_addr")
                        .from(Event::Table, Event::AddrId)
                        .to(Addr::Table, Addr::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("event_addr_created")
                .table(Event::Table)
                .col(Event::AddrId)
                .col(Event::Created)
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(Delivery::Table)
                .if_not_exists()
                .col(big_pk_auto(Delivery::Id))
                .col(char_len(Delivery::EventId, 36))
                .col(big_integer(Delivery::EndpointId))
                .col(string_len(Delivery::State, 10))
                .col(integer(Delivery::Attempts).default(0))
                .col(instant(m, Delivery::NextAt, false))
                .col(instant(m, Delivery::LeaseUntil, true))
                .col(string_len_null(Delivery::LeasedBy, 128))
                .col(text_null(Delivery::LastError))
                .col(instant(m, Delivery::Created, false))
                .col(instant(m, Delivery::Updated, false))
                .foreign_key(
                    ForeignKey::create()
                        .name(FK_DELIVERY_EVENT)
                        .from(Delivery::Table, Delivery::EventId)
                        .to(Event::Table, Event::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .foreign_key(
                    ForeignKey::create()
                        .name("fk_delivery_endpoint")
                        .from(Delivery::Table, Delivery::EndpointId)
                        .to(Endpoint::Table, Endpoint::Id)
                        .on_delete(ForeignKeyAction::Cascade),
                )
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("delivery_once")
                .unique()
                .table(Delivery::Table)
                .col(Delivery::EventId)
                .col(Delivery::EndpointId)
                .to_owned(),
        )
        .await?;
        for (name, cols) in [
            ("delivery_due", vec![Delivery::State, Delivery::NextAt]),
            ("delivery_endpoint", vec![Delivery::EndpointId]),
        ] {
            let mut idx = Index::create();
            idx.if_not_exists().name(name).table(Delivery::Table);
            for c in cols {
                idx.col(c);
            }
            m.create_index(idx.to_owned()).await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(Delivery::Table).if_exists().to_owned())
            .await?;
        m.drop_table(Table::drop().table(Event::Table).if_exists().to_owned())
            .await?;
        Ok(())
    }
}

/// Drops `delivery_event` where an earlier version of `Events` created it:
/// the unique `delivery_once` (event_id, endpoint_id) already serves every
/// lookup by event, and each index is one more b-tree written per delivery
/// on the push path. (`Events` no longer creates it, so a new database
/// never builds it only to drop it.)
struct DropDeliveryEvent;

impl MigrationName for DropDeliveryEvent {
    fn name(&self) -> &str {
        "m20261128_000003_drop_delivery_event"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for DropDeliveryEvent {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.has_index("delivery", "delivery_event").await? {
            m.drop_index(
                Index::drop()
                    .name("delivery_event")
                    .table(Delivery::Table)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("delivery_event")
                .table(Delivery::Table)
                .col(Delivery::EventId)
                .to_owned(),
        )
        .await
    }
}

/// Two MySQL column types that were too small, changed on MySQL only
/// (the other backends have neither limit):
/// - `BLOB` holds at most 64 KiB, and an event's media or a bucket object
///   may be up to `push-max-media` (10 MiB by default): both become
///   `LONGBLOB` (4 GiB).
/// - `TIMESTAMP` keeps whole seconds (MariaDB truncates), so an object
///   put to expire in 1 s could expire at once: a bucket object's
///   `expires_at` becomes `TIMESTAMP(6)`.
struct MysqlTypes;

impl MigrationName for MysqlTypes {
    fn name(&self) -> &str {
        "m20261130_000005_mysql_types"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for MysqlTypes {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        MysqlTypes::retype(m, "LONGBLOB", "TIMESTAMP(6)").await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        MysqlTypes::retype(m, "BLOB", "TIMESTAMP").await
    }
}

impl MysqlTypes {
    async fn retype(m: &SchemaManager<'_>, blob: &str, time: &str) -> Result<(), DbErr> {
        if m.get_database_backend() != sea_orm::DbBackend::MySql {
            return Ok(());
        }
        m.alter_table(
            Table::alter()
                .table(Event::Table)
                .modify_column(ColumnDef::new(Event::Media).custom(Alias::new(blob)).null())
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Bucket::Table)
                .modify_column(
                    ColumnDef::new(Bucket::Content)
                        .custom(Alias::new(blob))
                        .not_null(),
                )
                .modify_column(
                    ColumnDef::new(Bucket::ExpiresAt)
                        .custom(Alias::new(time))
                        .extra(mysql_time_attributes(false)),
                )
                .to_owned(),
        )
        .await
    }
}

/// MySQL's `TEXT` holds at most 64 KiB, and a push may carry a message
/// (or subject, location, ...) up to its body limit: the event's text
/// columns, and a delivery's `last_error`, become `LONGTEXT` on MySQL only
/// (the other backends' text has no such limit). Before this a long
/// message was refused by the database, failing its whole group commit.
struct MysqlLongText;

impl MigrationName for MysqlLongText {
    fn name(&self) -> &str {
        "m20261130_000006_mysql_long_text"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for MysqlLongText {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        MysqlLongText::retype(m, "LONGTEXT").await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        MysqlLongText::retype(m, "TEXT").await
    }
}

impl MysqlLongText {
    async fn retype(m: &SchemaManager<'_>, text: &str) -> Result<(), DbErr> {
        if m.get_database_backend() != sea_orm::DbBackend::MySql {
            return Ok(());
        }
        let column = |c: Event, null: bool| {
            let mut def = ColumnDef::new(c);
            def.custom(Alias::new(text));
            if null {
                def.null()
            } else {
                def.not_null()
            };
            def
        };
        m.alter_table(
            Table::alter()
                .table(Event::Table)
                .modify_column(column(Event::Msg, false))
                .modify_column(column(Event::Subject, false))
                .modify_column(column(Event::FormattedSubject, false))
                .modify_column(column(Event::Location, true))
                .modify_column(column(Event::Tag, true))
                .modify_column(column(Event::Sender, true))
                .modify_column(column(Event::MediaFname, true))
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Delivery::Table)
                .modify_column(
                    ColumnDef::new(Delivery::LastError)
                        .custom(Alias::new(text))
                        .null(),
                )
                .to_owned(),
        )
        .await
    }
}

/// The web console's sessions (by the digest of their cookie, with the
/// CSRF token of their forms) and failed sign-ins by client address, in
/// the database so every node honours them.
struct Console;

impl MigrationName for Console {
    fn name(&self) -> &str {
        "m20261130_000007_console"
    }
}

#[derive(DeriveIden)]
enum ConsoleSession {
    Table,
    Id,
    Csrf,
    Created,
    Expires,
}

#[derive(DeriveIden)]
enum ConsoleSignin {
    Table,
    Ip,
    Failures,
    LastFailure,
}

#[async_trait::async_trait]
impl MigrationTrait for Console {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(ConsoleSession::Table)
                .if_not_exists()
                .col(string_len(ConsoleSession::Id, 64).primary_key())
                .col(string_len(ConsoleSession::Csrf, 64))
                .col(instant(m, ConsoleSession::Created, false))
                .col(instant(m, ConsoleSession::Expires, false))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(ConsoleSignin::Table)
                .if_not_exists()
                .col(string_len(ConsoleSignin::Ip, 64).primary_key())
                .col(integer(ConsoleSignin::Failures))
                .col(instant(m, ConsoleSignin::LastFailure, false))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            ConsoleSession::Table.into_iden(),
            ConsoleSignin::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(t).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Node {
    Table,
    Instance,
    Name,
    Version,
    Started,
    Heartbeat,
    Rescued,
    RoutingVersion,
}

#[derive(DeriveIden)]
enum RoutingVersion {
    Table,
    Id,
    Version,
}

#[derive(DeriveIden)]
enum RoutingChange {
    Table,
    Version,
    AddrId,
    Created,
}

#[derive(DeriveIden)]
enum JobLease {
    Table,
    Name,
    Holder,
    Until,
}

/// Every time column: to the microsecond (MySQL's plain `TIMESTAMP`
/// keeps whole seconds only), and on MySQL with its attributes said, as
/// [`MysqlInstants`] says why. Where `explicit_defaults_for_timestamp` is
/// off and `sql_mode` has `NO_ZERO_DATE` (MySQL 5.7's defaults), a
/// `TIMESTAMP NOT NULL` without a default is given `'0000-00-00'`, which
/// that mode refuses: the table could not be made at all. Migrations made
/// before 13 use it too, so a new database is made right from the start.
fn instant<T: IntoIden>(m: &SchemaManager, col: T, nullable: bool) -> ColumnDef {
    match (
        m.get_database_backend() == sea_orm::DbBackend::MySql,
        nullable,
    ) {
        (true, n) => {
            let mut c = ColumnDef::new(col);
            c.custom(Alias::new("TIMESTAMP(6)"))
                .extra(mysql_time_attributes(n));
            c
        }
        (false, false) => timestamp_with_time_zone(col),
        (false, true) => timestamp_with_time_zone_null(col),
    }
}

/// Several servers on one database: their heartbeats (`node`), the log of
/// routing changes they follow (`routing_version`, one row whose counter
/// serializes changes, and `routing_change`), and leases on periodic jobs.
struct Cluster;

impl MigrationName for Cluster {
    fn name(&self) -> &str {
        "m20261129_000004_cluster"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for Cluster {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Node::Table)
                .if_not_exists()
                .col(string_len(Node::Instance, 160).primary_key())
                .col(string_len(Node::Name, 128))
                .col(string_len(Node::Version, 40))
                .col(instant(m, Node::Started, false))
                .col(instant(m, Node::Heartbeat, false))
                .col(instant(m, Node::Rescued, true))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(RoutingVersion::Table)
                .if_not_exists()
                .col(integer(RoutingVersion::Id).primary_key())
                .col(big_integer(RoutingVersion::Version))
                .to_owned(),
        )
        .await?;
        // Migrations run under a lock, so a look first is enough (MySQL has
        // no portable "insert unless present" that reports what it did).
        let present = m
            .get_connection()
            .query_one(
                &Query::select()
                    .column(RoutingVersion::Id)
                    .from(RoutingVersion::Table)
                    .and_where(Expr::col(RoutingVersion::Id).eq(1))
                    .to_owned(),
            )
            .await?
            .is_some();
        if !present {
            m.exec_stmt(
                Query::insert()
                    .into_table(RoutingVersion::Table)
                    .columns([RoutingVersion::Id, RoutingVersion::Version])
                    .values_panic([1.into(), 0.into()])
                    .to_owned(),
            )
            .await?;
        }
        m.create_table(
            Table::create()
                .table(RoutingChange::Table)
                .if_not_exists()
                .col(big_integer(RoutingChange::Version).primary_key())
                .col(big_integer_null(RoutingChange::AddrId))
                .col(instant(m, RoutingChange::Created, false))
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(JobLease::Table)
                .if_not_exists()
                .col(string_len(JobLease::Name, 40).primary_key())
                .col(string_len_null(JobLease::Holder, 160))
                .col(instant(m, JobLease::Until, false))
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            Node::Table.into_iden(),
            RoutingVersion::Table.into_iden(),
            RoutingChange::Table.into_iden(),
            JobLease::Table.into_iden(),
        ] {
            m.drop_table(Table::drop().table(t).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

/// Pending deliveries are indexed by `next_at` alone, in
/// `delivery_pending`, instead of every delivery by state and `next_at`
/// in `delivery_due` (on SQLite and PostgreSQL; MySQL has no partial
/// indexes). Every query that read `delivery_due` asks for pending
/// deliveries only, and most deliveries are pending for a moment: with
/// the state in the key, each delivery written as delivered moved its
/// entry from the pending range to the delivered one, an index insert and
/// delete in every group commit, and the index kept an entry per delivery
/// ever made. Now the outcome only deletes it.
///
/// The new index has a new name, created before the old one is dropped:
/// on SQLite each statement may run on another pooled connection, whose
/// copy of the schema may not have seen the previous statement yet, and a
/// name dropped and created again there is refused as still existing.
struct PendingDue;

impl MigrationName for PendingDue {
    fn name(&self) -> &str {
        "m20261130_000008_delivery_pending"
    }
}

impl PendingDue {
    /// Creates `index` and drops `old`.
    async fn replace(
        m: &SchemaManager<'_>,
        index: IndexCreateStatement,
        old: &str,
    ) -> Result<(), DbErr> {
        if m.get_database_backend() == sea_orm::DbBackend::MySql {
            return Ok(());
        }
        m.create_index(index).await?;
        m.drop_index(Index::drop().name(old).table(Delivery::Table).to_owned())
            .await
    }
}

#[async_trait::async_trait]
impl MigrationTrait for PendingDue {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        PendingDue::replace(
            m,
            Index::create()
                .if_not_exists()
                .name("delivery_pending")
                .table(Delivery::Table)
                .col(Delivery::NextAt)
                .and_where(Expr::col(Delivery::State).eq(crate::store::STATE_PENDING))
                .to_owned(),
            "delivery_due",
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        PendingDue::replace(
            m,
            Index::create()
                .if_not_exists()
                .name("delivery_due")
                .table(Delivery::Table)
                .col(Delivery::State)
                .col(Delivery::NextAt)
                .to_owned(),
            "delivery_pending",
        )
        .await
    }
}

/// Drops the foreign key from `delivery.event_id` to `event` on
/// PostgreSQL and MySQL. Every delivery is inserted in the statement that
/// inserts its event, and every deletion of events deletes their
/// deliveries first (`delete_addr_children`, `events_cleanup`), so the key
/// never refused anything; but it was checked for each delivery of each
/// group commit, a query and a row lock per row, run one by one on the
/// one connection that commits. By itself it was about a tenth of
/// PostgreSQL's time in a commit (BENCHMARKS.md). The keys from `event`
/// to `addr` and from `delivery` to `endpoint` stay: they are how a
/// commit finds an address or endpoint another node just deleted, and
/// they cascade that deletion.
///
/// SQLite keeps its copy: dropping a key there means rebuilding the
/// table, and its check is an index lookup in the same process.
struct DropDeliveryEventKey;

const FK_DELIVERY_EVENT: &str = "fk_delivery_event";

impl MigrationName for DropDeliveryEventKey {
    fn name(&self) -> &str {
        "m20261201_000009_drop_fk_delivery_event"
    }
}

impl DropDeliveryEventKey {
    /// Whether `delivery` has the foreign key `name`.
    async fn has_key(m: &SchemaManager<'_>, name: &str) -> Result<bool, DbErr> {
        let schema = match m.get_database_backend() {
            sea_orm::DbBackend::MySql => "DATABASE()",
            _ => "current_schema()",
        };
        let q = Query::select()
            .expr(Expr::val(1))
            .from((
                Alias::new("information_schema"),
                Alias::new("table_constraints"),
            ))
            .and_where(Expr::col(Alias::new("table_schema")).eq(Expr::cust(schema)))
            .and_where(Expr::col(Alias::new("table_name")).eq("delivery"))
            .and_where(Expr::col(Alias::new("constraint_name")).eq(name))
            .and_where(Expr::col(Alias::new("constraint_type")).eq("FOREIGN KEY"))
            .to_owned();
        Ok(m.get_connection().query_one(&q).await?.is_some())
    }
}

#[async_trait::async_trait]
impl MigrationTrait for DropDeliveryEventKey {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() == sea_orm::DbBackend::Sqlite {
            return Ok(());
        }
        if Self::has_key(m, FK_DELIVERY_EVENT).await? {
            m.drop_foreign_key(
                ForeignKey::drop()
                    .name(FK_DELIVERY_EVENT)
                    .table(Delivery::Table)
                    .to_owned(),
            )
            .await?;
        }
        // MySQL made an index of that name for the key when `delivery` was
        // created, unless it dropped it for `delivery_once`, which serves
        // every lookup by event.
        if m.has_index("delivery", FK_DELIVERY_EVENT).await? {
            m.drop_index(
                Index::drop()
                    .name(FK_DELIVERY_EVENT)
                    .table(Delivery::Table)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() == sea_orm::DbBackend::Sqlite
            || Self::has_key(m, FK_DELIVERY_EVENT).await?
        {
            return Ok(());
        }
        m.create_foreign_key(
            ForeignKey::create()
                .name(FK_DELIVERY_EVENT)
                .from(Delivery::Table, Delivery::EventId)
                .to(Event::Table, Event::Id)
                .on_delete(ForeignKeyAction::Cascade)
                .to_owned(),
        )
        .await
    }
}

/// `event.hops`: how many Roboger servers forwarded an event before this
/// one took it, so a delivery of it through the chain plugin can say so
/// to the next (and a loop of chain endpoints ends). Events stored before
/// it read as pushed directly (0). Adding a column with a constant
/// default rewrites no rows on any of the three backends.
struct EventHops;

impl MigrationName for EventHops {
    fn name(&self) -> &str {
        "m20261202_000010_event_hops"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for EventHops {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Event::Table)
                .add_column(small_integer(Event::Hops).default(0))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Event::Table)
                .drop_column(Event::Hops)
                .to_owned(),
        )
        .await
    }
}

/// On PostgreSQL, `delivery_endpoint` indexes `(endpoint_id, id)`
/// instead of `endpoint_id` alone, as `delivery_endpoint_id`. An
/// endpoint's walks over its deliveries (its retry, making its waiting
/// deliveries due after a change of settings) read a chunk at a time after
/// the last id. A plan through the old index read every delivery of the
/// endpoint and sorted them for each chunk, and PostgreSQL chose it when
/// its statistics predated the backlog: 61 s for 150,000 deliveries in
/// the suite. Through the new one each chunk reads what it returns.
///
/// SQLite and MySQL (InnoDB) keep theirs: a secondary index there holds
/// the row's id after its key already, in order.
struct DeliveryEndpointId;

impl MigrationName for DeliveryEndpointId {
    fn name(&self) -> &str {
        "m20261204_000011_delivery_endpoint_id"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for DeliveryEndpointId {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() != sea_orm::DbBackend::Postgres {
            return Ok(());
        }
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("delivery_endpoint_id")
                .table(Delivery::Table)
                .col(Delivery::EndpointId)
                .col(Delivery::Id)
                .to_owned(),
        )
        .await?;
        m.drop_index(
            Index::drop()
                .if_exists()
                .name("delivery_endpoint")
                .table(Delivery::Table)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() != sea_orm::DbBackend::Postgres {
            return Ok(());
        }
        m.create_index(
            Index::create()
                .if_not_exists()
                .name("delivery_endpoint")
                .table(Delivery::Table)
                .col(Delivery::EndpointId)
                .to_owned(),
        )
        .await?;
        m.drop_index(
            Index::drop()
                .if_exists()
                .name("delivery_endpoint_id")
                .table(Delivery::Table)
                .to_owned(),
        )
        .await
    }
}

/// Every table of this server's on MySQL in `utf8mb4`, with binary
/// comparison, and the database's default for tables made later (a
/// plugin's own, with `db: true`). Tables were made in the server's
/// default character set, which is `latin1` on MariaDB built as it
/// ships and on MySQL before 8: a push or an endpoint holding text outside
/// Latin-1 (Cyrillic, CJK, emoji) was refused by the database, a 503.
/// `utf8mb4_bin` compares as SQLite and PostgreSQL do: exactly, so an
/// address differing in case is another address.
struct MysqlUtf8mb4;

impl MigrationName for MysqlUtf8mb4 {
    fn name(&self) -> &str {
        "m20261204_000012_mysql_utf8mb4"
    }
}

/// The tables the migrations before this one make, and sea-orm's record
/// of them: those it converts. Tables made later take the database's new
/// default; other tables in the database (a plugin's own) are left as
/// they are.
const TABLES: &[&str] = &[
    "seaql_migrations",
    "addr",
    "endpoint",
    "subscription",
    "bucket",
    "addr_limit",
    "event",
    "delivery",
    "console_session",
    "console_signin",
    "node",
    "routing_version",
    "routing_change",
    "job_lease",
];

#[async_trait::async_trait]
impl MigrationTrait for MysqlUtf8mb4 {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        if m.get_database_backend() != sea_orm::DbBackend::MySql {
            return Ok(());
        }
        let db = m.get_connection();
        db.execute_unprepared("ALTER DATABASE CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
            .await?;
        let tables = db
            .query_all_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::MySql,
                "SELECT table_name AS t FROM information_schema.tables \
                 WHERE table_schema = DATABASE() AND table_type = 'BASE TABLE' \
                 AND table_collation <> 'utf8mb4_bin'",
            ))
            .await?;
        for row in tables {
            let t: String = row.try_get("", "t")?;
            if TABLES.contains(&t.as_str()) {
                db.execute_unprepared(&format!(
                    "ALTER TABLE `{t}` CONVERT TO CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
                ))
                .await?;
            }
        }
        Ok(())
    }

    /// Text outside Latin-1 cannot go back: the tables stay `utf8mb4`.
    async fn down(&self, _m: &SchemaManager) -> Result<(), DbErr> {
        Ok(())
    }
}

/// Every time column of the server's on MySQL, to the microsecond as the
/// other backends keep them, and with its attributes said explicitly.
/// - Some were plain `TIMESTAMP`, which MariaDB truncates to the second:
///   a retry due in 1.8 s was due in 1 s (one due in 0.5 s, at once), a
///   lease ended up to a second early, and the management API showed a
///   delivery waiting a second less than it would.
/// - Where `explicit_defaults_for_timestamp` is off (the default before
///   MariaDB 10.10 and MySQL 8.0.2), a table's first `TIMESTAMP NOT NULL`
///   column was made `ON UPDATE CURRENT_TIMESTAMP`: a node's `started`
///   moved with each heartbeat, a delivery's `next_at` with each claim.
///   An explicit `DEFAULT` (never used: every insert gives the time)
///   keeps the server from adding one.
struct MysqlInstants;

impl MigrationName for MysqlInstants {
    fn name(&self) -> &str {
        "m20261205_000013_mysql_instants"
    }
}

/// A time column of the server's on MySQL.
struct MysqlTime {
    table: &'static str,
    column: &'static str,
    nullable: bool,
    /// A plain `TIMESTAMP` (whole seconds) before [`MysqlInstants`].
    was_plain: bool,
}

const fn mysql_time(
    table: &'static str,
    column: &'static str,
    nullable: bool,
    was_plain: bool,
) -> MysqlTime {
    MysqlTime {
        table,
        column,
        nullable,
        was_plain,
    }
}

/// Every time column of the server's tables, a table's together.
const MYSQL_TIMES: &[MysqlTime] = &[
    mysql_time("delivery", "next_at", false, true),
    mysql_time("delivery", "lease_until", true, true),
    mysql_time("delivery", "created", false, true),
    mysql_time("delivery", "updated", false, true),
    mysql_time("event", "created", false, true),
    mysql_time("routing_change", "created", false, true),
    mysql_time("bucket", "d", false, true),
    mysql_time("bucket", "da", true, true),
    mysql_time("bucket", "expires_at", false, false),
    mysql_time("node", "started", false, false),
    mysql_time("node", "heartbeat", false, false),
    mysql_time("node", "rescued", true, false),
    mysql_time("job_lease", "until", false, false),
    mysql_time("console_session", "created", false, false),
    mysql_time("console_session", "expires", false, false),
    mysql_time("console_signin", "last_failure", false, false),
];

/// `TIMESTAMP(6)`'s attributes, said so that no server adds its own.
fn mysql_time_attributes(nullable: bool) -> &'static str {
    if nullable {
        "NULL DEFAULT NULL"
    } else {
        "NOT NULL DEFAULT CURRENT_TIMESTAMP(6)"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for MysqlInstants {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        MysqlInstants::retype(m, |_| "TIMESTAMP(6)").await
    }

    /// Back to whole seconds where they were; the attributes stay said.
    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        MysqlInstants::retype(m, |plain| if plain { "TIMESTAMP" } else { "TIMESTAMP(6)" }).await
    }
}

impl MysqlInstants {
    /// One `ALTER TABLE` per table, each column typed by `time(was_plain)`.
    async fn retype(m: &SchemaManager<'_>, time: fn(bool) -> &'static str) -> Result<(), DbErr> {
        if m.get_database_backend() != sea_orm::DbBackend::MySql {
            return Ok(());
        }
        for group in MYSQL_TIMES.chunk_by(|a, b| a.table == b.table) {
            let modify: Vec<String> = group
                .iter()
                .map(|c| {
                    let attributes = mysql_time_attributes(c.nullable);
                    format!("MODIFY `{}` {} {attributes}", c.column, time(c.was_plain))
                })
                .collect();
            m.get_connection()
                .execute_unprepared(&format!(
                    "ALTER TABLE `{}` {}",
                    group[0].table,
                    modify.join(", ")
                ))
                .await?;
        }
        Ok(())
    }
}

/// `node.routing_version`: the newest routing change each node obeys,
/// which a node that makes a change waits for on every live node before
/// it answers (`cluster::wait_obeyed`). Nodes of an older build stop at
/// their next heartbeat, and their rows with them.
struct NodeRoutingVersion;

impl MigrationName for NodeRoutingVersion {
    fn name(&self) -> &str {
        "m20261206_000014_node_routing_version"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for NodeRoutingVersion {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Node::Table)
                .add_column(big_integer(Node::RoutingVersion).default(0))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Node::Table)
                .drop_column(Node::RoutingVersion)
                .to_owned(),
        )
        .await
    }
}

/// The deletions of history answered before they ended (an address's,
/// an endpoint's, everything): each is recorded until it ends, so that a
/// node stopping or failing under one does not leave it half made.
struct Deletions;

impl MigrationName for Deletions {
    fn name(&self) -> &str {
        "m20261207_000015_deletion"
    }
}

#[derive(DeriveIden)]
enum Deletion {
    Table,
    Id,
    AddrId,
    EndpointId,
    Node,
    Created,
    UpTo,
}

#[async_trait::async_trait]
impl MigrationTrait for Deletions {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(Deletion::Table)
                .if_not_exists()
                .col(big_pk_auto(Deletion::Id))
                .col(big_integer_null(Deletion::AddrId))
                .col(big_integer_null(Deletion::EndpointId))
                .col(string_len_null(Deletion::Node, 160))
                .col(instant(m, Deletion::Created, false))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(Deletion::Table).if_exists().to_owned())
            .await
    }
}

/// `deletion.up_to`: the highest address id when a `delete-everything`
/// was asked for. It deletes those addresses only, so that the ones made
/// while it goes on (`robogerctl deploy --delete-everything` creates the
/// deploy's right after asking) are kept. A record without it (written
/// by the build before) deletes every address, as that build did.
struct DeletionUpTo;

impl MigrationName for DeletionUpTo {
    fn name(&self) -> &str {
        "m20261207_000016_deletion_up_to"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for DeletionUpTo {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Deletion::Table)
                .add_column(big_integer_null(Deletion::UpTo))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Deletion::Table)
                .drop_column(Deletion::UpTo)
                .to_owned(),
        )
        .await
    }
}

/// An in-memory SQLite database with no migration run yet, for tests of
/// the schema and of the queries made on it.
#[cfg(test)]
pub(super) async fn memory_database() -> sea_orm::DatabaseConnection {
    // One connection: each in-memory connection is its own database.
    let mut opts = sea_orm::ConnectOptions::new("sqlite::memory:");
    opts.max_connections(1).min_connections(1);
    sea_orm::Database::connect(opts)
        .await
        .expect("in-memory SQLite")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database from before migration 3 has `delivery_event`; after it,
    /// only `delivery_once` indexes the event id. A new database never has it.
    #[tokio::test]
    async fn migration_3_drops_delivery_event_where_it_exists() {
        let db = memory_database().await;
        let m = SchemaManager::new(&db);
        Migrator::up(&db, Some(3)).await.expect("migrations 0-2");
        assert!(!m.has_index("delivery", "delivery_event").await.unwrap());
        DropDeliveryEvent.down(&m).await.expect("the old index");
        assert!(m.has_index("delivery", "delivery_event").await.unwrap());
        Migrator::up(&db, None).await.expect("migration 3");
        assert!(!m.has_index("delivery", "delivery_event").await.unwrap());
        assert!(m.has_index("delivery", "delivery_once").await.unwrap());
    }

    /// After migration 8, `delivery_pending` holds pending deliveries
    /// only, `delivery_due` is gone, and the claim's query finds due
    /// deliveries through the new index.
    #[tokio::test]
    async fn migration_8_indexes_pending_deliveries_only() {
        let db = memory_database().await;
        Migrator::up(&db, None).await.expect("all migrations");
        let sql = |q: &str| sea_orm::Statement::from_string(sea_orm::DbBackend::Sqlite, q);
        let index = db
            .query_one_raw(sql(
                "SELECT sql AS s FROM sqlite_master WHERE name = 'delivery_pending'",
            ))
            .await
            .expect("the index")
            .expect("a row")
            .try_get::<String>("", "s")
            .expect("its SQL");
        assert!(
            index.ends_with(r#"("next_at") WHERE "state" = 'pending'"#),
            "{index}"
        );
        let plan = db
            .query_all_raw(sql(
                "EXPLAIN QUERY PLAN SELECT id FROM delivery WHERE state = 'pending' \
                 AND next_at <= '2030' ORDER BY next_at LIMIT 10",
            ))
            .await
            .expect("the plan");
        let detail: Vec<String> = plan
            .iter()
            .filter_map(|r| r.try_get::<String>("", "detail").ok())
            .collect();
        assert!(
            detail.iter().any(|d| d.contains("INDEX delivery_pending")),
            "{detail:?}"
        );
        let m = SchemaManager::new(&db);
        assert!(!m.has_index("delivery", "delivery_due").await.unwrap());
    }

    /// The original's SQLite tables (its DDL, trimmed to what the
    /// conversion touches), first half-adopted by a build before the
    /// conversion existed (`Base` alone, whose `bucket_expires_at` SQLite
    /// made on a string), then migrated: the bucket gains `expires_at`,
    /// written as this server writes times, and the index is on it.
    #[tokio::test]
    async fn the_originals_sqlite_tables_are_converted_even_half_adopted() {
        let db = memory_database().await;
        for sql in [
            "CREATE TABLE addr (id INTEGER NOT NULL, a CHAR(64) NOT NULL, \
             active NUMERIC(1, 0) DEFAULT '1' NOT NULL, lim_c NUMERIC(8, 0) DEFAULT '100' NOT NULL, \
             lim_s NUMERIC(12, 0) DEFAULT '10000000' NOT NULL, PRIMARY KEY (id), UNIQUE (a))",
            "CREATE TABLE bucket (id CHAR(64) NOT NULL, creator VARCHAR(64) NOT NULL, \
             addr_id INTEGER, mimetype VARCHAR(256) NOT NULL, fname VARCHAR(256), \
             size INTEGER NOT NULL, public BOOLEAN DEFAULT '0' NOT NULL, metadata JSON, \
             d DATETIME NOT NULL, da DATETIME, expires INTEGER, content BLOB NOT NULL, \
             PRIMARY KEY (id), FOREIGN KEY(addr_id) REFERENCES addr (id) ON DELETE CASCADE)",
            "INSERT INTO bucket (id, creator, mimetype, size, d, expires, content) VALUES \
             ('kept', 'c', 'text/plain', 1, '2026-12-01 00:00:00.250000', 3600, x'00'), \
             ('null', 'c', 'text/plain', 1, '2026-12-01 00:00:00.000000', NULL, x'00')",
        ] {
            db.execute_unprepared(sql).await.expect(sql);
        }
        let m = SchemaManager::new(&db);
        Base.up(&m).await.expect("a build before the conversion");
        assert!(!m.has_column("bucket", "expires_at").await.unwrap());
        Migrator::up(&db, None).await.expect("all migrations");
        let sql = |q: &str| sea_orm::Statement::from_string(sea_orm::DbBackend::Sqlite, q);
        let rows = db
            .query_all_raw(sql(
                "SELECT id || ' ' || expires || ' ' || expires_at AS r FROM bucket ORDER BY id",
            ))
            .await
            .expect("the objects");
        let rows: Vec<String> = rows
            .iter()
            .map(|r| r.try_get::<String>("", "r").expect("a row"))
            .collect();
        assert_eq!(
            rows,
            [
                "kept 3600 2026-12-01T01:00:00.250+00:00",
                "null 0 2026-12-01T00:00:00.000+00:00"
            ]
        );
        let plan = db
            .query_all_raw(sql(
                "EXPLAIN QUERY PLAN SELECT id FROM bucket WHERE expires_at <= '2030'",
            ))
            .await
            .expect("the plan");
        assert!(
            plan.iter()
                .filter_map(|r| r.try_get::<String>("", "detail").ok())
                .any(|d| d.contains("INDEX bucket_expires_at (expires_at<?)")),
            "the index is not on the column"
        );
    }

    /// An event stored before migration 10 reads as pushed directly.
    #[tokio::test]
    async fn migration_10_gives_events_already_stored_no_hops() {
        use sea_orm::EntityTrait;
        let db = memory_database().await;
        Migrator::up(&db, Some(10)).await.expect("migrations 0-9");
        // The event alone: its address does not matter here.
        db.execute_unprepared("PRAGMA foreign_keys = OFF")
            .await
            .expect("no key checks");
        db.execute_unprepared(
            "INSERT INTO event (id, addr_id, addr, msg, subject, formatted_subject, level, \
             created) VALUES ('e', 1, 'a', 'm', '', 'INFO', 20, '2026-12-01T00:00:00Z')",
        )
        .await
        .expect("an event of migration 9's shape");
        Migrator::up(&db, None).await.expect("migration 10");
        let e = super::super::entity::event::Entity::find_by_id("e")
            .one(&db)
            .await
            .expect("a read")
            .expect("the event");
        assert_eq!((e.msg.as_str(), e.hops), ("m", 0));
    }
}
