//! The pipeline's group commit: accepted events with a delivery per
//! endpoint, and the outcomes of delivery attempts, in one transaction,
//! in the form that costs each backend least (one constant statement on
//! PostgreSQL, one multi-statement hop on SQLite, a statement per table
//! on MySQL), with the fallback for what another node just deleted.

use sea_orm::sea_query::Expr;
use sea_orm::sqlx;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryTrait, Statement,
};
use sea_query_sqlx::SqlxValues;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use sea_orm::QuerySelect;
use sea_orm::sea_query::LockType;

use super::delivery::{STATE_DELIVERED, STATE_PENDING, no_lease};
use super::entity::{addr, delivery, endpoint, event};
use super::kept::KeptConnection;
use super::{CommitConnection, Result, Store, StoreError, sqlx_err};
use crate::config::DbBackend;

/// Bound parameters per insert statement at most (rows × columns).
const INSERT_CHUNK: usize = 16_000;

/// How many times a group commit is run when the database rolls it back
/// for a lock race (a deadlock, a serialization failure) before its
/// pushes are answered 503.
const TRANSIENT_TRIES: u64 = 4;

/// Bytes of events' text and media per insert statement, past which the
/// next event goes into another statement.
const EVENT_BYTES_PER_STATEMENT: usize = 4 * 1024 * 1024;

/// The bytes of `e`'s text and media a statement carries.
pub fn event_bytes(e: &event::Model) -> usize {
    let text = [&e.id, &e.addr, &e.msg, &e.subject, &e.formatted_subject]
        .iter()
        .map(|t| t.len())
        .sum::<usize>();
    let optional = [&e.location, &e.tag, &e.sender, &e.media_fname]
        .iter()
        .map(|t| t.as_ref().map_or(0, String::len))
        .sum::<usize>();
    text + optional + e.media.as_ref().map_or(0, Vec::len)
}

/// The outcome of one delivery attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub event_id: String,
    pub endpoint_id: i64,
    /// Attempts made so far, this one included.
    pub attempts: i32,
    pub state: &'static str,
    pub error: Option<String>,
    /// When a pending delivery is due again.
    pub next_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What one group commit writes: accepted events, each with the
/// endpoints it goes to, and the outcomes of delivery attempts. The new
/// deliveries are leased to `node` until `lease_until`, since this server
/// dispatches them at once, and outcomes are written only to deliveries
/// `node` still holds.
pub struct GroupCommit<'a> {
    pub batch: &'a [(&'a event::Model, Vec<i64>)],
    pub outcomes: &'a [Attempt],
    pub node: &'a str,
    pub lease_until: chrono::DateTime<chrono::Utc>,
}

impl GroupCommit<'_> {
    /// The outcomes not written when `recorded` were: those whose
    /// delivery was no longer leased to this node (fencing): another node
    /// had taken it over, or its lease was freed after a failed write.
    fn dropped(&self, recorded: u64) -> u64 {
        (self.outcomes.len() as u64).saturating_sub(recorded)
    }
}

/// What a group commit left out, besides what it committed.
#[derive(Debug, Default)]
pub struct Written {
    /// Addresses deleted before the commit: their events were not stored.
    pub gone_addrs: HashSet<i64>,
    /// Endpoints deleted before the commit: no delivery to them was made.
    pub gone_endpoints: HashSet<i64>,
    /// Outcomes dropped because their delivery was no longer leased to
    /// this node.
    pub dropped_outcomes: u64,
}

impl Store {
    /// One write transaction of the pipeline ([`GroupCommit`]): accepted
    /// events with a delivery per endpoint, and the outcomes of delivery
    /// attempts. One transaction for both halves the
    /// commits (and fsyncs) the pipeline makes.
    ///
    /// Routes are cached by each node, so an event may name an address or
    /// endpoints that another node deleted a moment ago: such an event is
    /// not stored, and such a delivery not made ([`Written`] says which),
    /// instead of failing the whole commit on a foreign key. That race is
    /// rare, so the batch is first written as it is, and only when the
    /// database refuses a foreign key is it written again, leaving out
    /// what is gone: the usual commit has no extra reads.
    ///
    /// Fencing: an outcome is written only to a delivery that is still
    /// pending and leased by `node`.
    pub async fn write_batch(&self, c: &GroupCommit<'_>) -> Result<Written> {
        let mut check = false;
        let mut tries = 0u64;
        loop {
            tries += 1;
            let once = match &self.commits {
                CommitConnection::Sqlite(kept) if !check => {
                    self.write_sqlite_at_once(kept, c).await
                }
                CommitConnection::Postgres(kept) if !check => write_pg_at_once(kept, c).await,
                _ => {
                    // Its transaction comes from the pool, where the kept
                    // connection must be for it to find one on SQLite.
                    self.writer_waits();
                    self.write_once(c, check).await
                }
            };
            match once {
                Err(StoreError::Db(e))
                    if !check
                        && matches!(
                            e.sql_err(),
                            Some(sea_orm::SqlErr::ForeignKeyConstraintViolation(_))
                        ) =>
                {
                    check = true;
                }
                // A deadlock with a claim or another node's commit: the
                // database rolled this one back, and it goes again at once
                // rather than answering its pushes 503.
                Err(e) if e.lost_a_race() && tries < TRANSIENT_TRIES => {
                    tracing::info!(error = %e, tries, "group commit lost a lock race; running it again");
                    tokio::time::sleep(Duration::from_millis(5 * tries)).await;
                }
                r => return r,
            }
        }
    }

    /// The pipeline's writer is about to wait (for work, or for room to
    /// hand over deliveries): the connection its commits keep goes back to
    /// the pool meanwhile, so that no other writer (a management change,
    /// a claim) waits on a writer that is not writing. Room can take
    /// seconds to come while deliveries back up behind a slow target.
    pub fn writer_waits(&self) {
        match &self.commits {
            CommitConnection::Sqlite(kept) => kept.release(),
            CommitConnection::Postgres(kept) => kept.release(),
            CommitConnection::Pooled => {}
        }
    }

    /// One try of [`Store::write_batch`]; with `check`, what was deleted
    /// is looked for first and left out.
    async fn write_once(&self, c: &GroupCommit<'_>, check: bool) -> Result<Written> {
        let txn = self.begin_write().await?;
        let mut written = Written::default();
        if check && !c.batch.is_empty() {
            let lock = match self.backend {
                DbBackend::Sqlite => None,
                DbBackend::Postgres => Some(LockType::KeyShare),
                DbBackend::MySql => Some(LockType::Share),
            };
            (written.gone_addrs, written.gone_endpoints) = gone(&txn, c.batch, lock).await?;
        }
        let (inserts, _, updates) = self.commit_statements(c, &written);
        run_each(&txn, inserts).await?;
        let recorded = run_each(&txn, updates).await?;
        written.dropped_outcomes = c.dropped(recorded);
        txn.commit().await?;
        Ok(written)
    }

    /// A group commit's statements: the inserts (with the rows they
    /// insert) and the outcome updates, for [`insert_statements`] and
    /// [`attempt_statements`].
    fn commit_statements(
        &self,
        c: &GroupCommit<'_>,
        left_out: &Written,
    ) -> (Vec<Statement>, u64, Vec<Statement>) {
        let backend = self.db.get_database_backend();
        // See insert_statements.
        let room = self.largest_event().map_or(EVENT_BYTES_PER_STATEMENT, |l| {
            l.min(EVENT_BYTES_PER_STATEMENT)
        });
        let (inserts, inserted) = insert_statements(backend, c, left_out, room);
        (
            inserts,
            inserted,
            attempt_statements(backend, c.outcomes, c.node),
        )
    }

    /// [`Store::write_batch`]'s usual try on SQLite: the whole transaction
    /// (`BEGIN IMMEDIATE`, the inserts, the outcomes, `COMMIT`) as one
    /// multi-statement query on the kept connection, so one hop to sqlx's
    /// SQLite thread instead of one per statement and two more for the
    /// pool (each hop waits for both threads to be scheduled, and they
    /// were most of a group commit's time). Without media its text never
    /// changes ([`SQLITE_GROUP_COMMIT`]), so it is prepared once: the rows
    /// go in as JSON. With media it is built for the batch. The rows it
    /// changed, less the rows inserted, are the outcomes written. When a
    /// statement fails the transaction is rolled back here.
    async fn write_sqlite_at_once(
        &self,
        kept: &KeptConnection<sqlx::Sqlite>,
        c: &GroupCommit<'_>,
    ) -> Result<Written> {
        let (query, inserted) = match sqlite_commit_json(c) {
            Some((events, outcomes)) => {
                let deliveries: usize = c.batch.iter().map(|(_, eps)| eps.len()).sum();
                let query = sqlx::query_scalar::<_, i64>(SQLITE_GROUP_COMMIT)
                    .bind(events)
                    .bind(outcomes)
                    .bind(STATE_PENDING)
                    .bind(chrono::Utc::now())
                    .bind(c.lease_until)
                    .bind(c.node);
                (query, (c.batch.len() + deliveries) as u64)
            }
            None => {
                let (inserts, inserted, updates) = self.commit_statements(c, &Written::default());
                // SQLite's count of changed rows, read before and after:
                // an execute's own count would repeat the last statement's
                // for BEGIN and COMMIT.
                let mut sql = String::from("BEGIN IMMEDIATE;\nSELECT total_changes();\n");
                let mut values = Vec::new();
                for st in inserts.into_iter().chain(updates) {
                    sql.push_str(&st.sql);
                    sql.push_str(";\n");
                    if let Some(v) = st.values {
                        values.extend(v.0);
                    }
                }
                sql.push_str("SELECT total_changes();\nCOMMIT");
                let args = sqlx::IntoArguments::<sqlx::Sqlite>::into_arguments(SqlxValues(
                    sea_orm::sea_query::Values(values),
                ));
                // Made for this batch: not kept in the statement cache,
                // where it would push out SQLITE_GROUP_COMMIT.
                let query =
                    sqlx::query_scalar_with(sqlx::AssertSqlSafe(sql), args).persistent(false);
                (query, inserted)
            }
        };
        let mut kept = kept.take().await.map_err(sqlx_err)?;
        let counts = query.fetch_all(&mut *kept.conn()).await;
        match counts {
            Ok(counts) => {
                kept.done();
                let changed = match counts.as_slice() {
                    [before, after] => u64::try_from(after - before).unwrap_or(0),
                    _ => 0,
                };
                Ok(Written {
                    dropped_outcomes: c.dropped(changed.saturating_sub(inserted)),
                    ..Written::default()
                })
            }
            Err(e) => {
                // Ends what the failed statement left open. When that
                // fails too (BEGIN itself failed, or worse), the guard is
                // dropped unsettled, which closes the connection rather
                // than give it back with a transaction that may be open.
                if sqlx::query("ROLLBACK")
                    .execute(&mut *kept.conn())
                    .await
                    .is_ok()
                {
                    kept.failed();
                }
                Err(sqlx_err(e).into())
            }
        }
    }
}

/// [`Store::write_batch`]'s usual try on PostgreSQL: the whole group
/// commit as one statement ([`PG_GROUP_COMMIT`]), so one round trip
/// and one implicit transaction instead of a `BEGIN`, a statement per
/// table and per outcome group, and a `COMMIT`, each waiting for the
/// server. Its text never changes, so it is prepared once per
/// connection whatever the batch: the rows go in as arrays.
async fn write_pg_at_once(
    kept: &KeptConnection<sqlx::Postgres>,
    c: &GroupCommit<'_>,
) -> Result<Written> {
    let now = chrono::Utc::now();
    let mut ev = PgEventColumns::default();
    let (mut d_event, mut d_endpoint) = (Vec::new(), Vec::new());
    for (e, eps) in c.batch {
        ev.push(e);
        for ep in eps {
            d_event.push(e.id.as_str());
            d_endpoint.push(*ep);
        }
    }
    let mut o = PgOutcomeColumns::default();
    for a in c.outcomes {
        o.push(a);
    }
    let query = sqlx::query_scalar::<_, i64>(PG_GROUP_COMMIT)
        .bind(ev.id)
        .bind(ev.addr_id)
        .bind(ev.addr)
        .bind(ev.msg)
        .bind(ev.subject)
        .bind(ev.formatted_subject)
        .bind(ev.level)
        .bind(ev.location)
        .bind(ev.tag)
        .bind(ev.sender)
        .bind(ev.media)
        .bind(ev.media_fname)
        .bind(ev.created)
        .bind(ev.hops)
        .bind(d_event)
        .bind(d_endpoint)
        .bind(now)
        .bind(c.lease_until)
        .bind(c.node)
        .bind(o.event_id)
        .bind(o.endpoint_id)
        .bind(o.attempts)
        .bind(o.state)
        .bind(o.error)
        .bind(o.next_at)
        .bind(STATE_PENDING);
    let mut kept = kept.take().await.map_err(sqlx_err)?;
    // One statement, so an implicit transaction: a failure leaves
    // nothing open.
    let recorded = match query.fetch_one(&mut *kept.conn()).await {
        Ok(n) => {
            kept.done();
            n
        }
        Err(e) => {
            kept.failed();
            return Err(sqlx_err(e).into());
        }
    };
    Ok(Written {
        dropped_outcomes: c.dropped(u64::try_from(recorded).unwrap_or(0)),
        ..Written::default()
    })
}

/// The addresses and endpoints named by `batch` that no longer exist. The
/// others are locked against deletion (`lock`) until the commit, so the
/// inserts that follow cannot break a foreign key.
async fn gone(
    txn: &sea_orm::DatabaseTransaction,
    batch: &[(&event::Model, Vec<i64>)],
    lock: Option<LockType>,
) -> Result<(HashSet<i64>, HashSet<i64>)> {
    let addrs: BTreeSet<i64> = batch.iter().map(|(e, _)| e.addr_id).collect();
    let eps: BTreeSet<i64> = batch
        .iter()
        .flat_map(|(_, eps)| eps.iter().copied())
        .collect();
    let mut q = addr::Entity::find()
        .select_only()
        .column(addr::Column::Id)
        .filter(addr::Column::Id.is_in(addrs.iter().copied()));
    if let Some(l) = lock {
        q = q.lock(l);
    }
    let live: HashSet<i64> = q.into_tuple::<i64>().all(txn).await?.into_iter().collect();
    let gone_addrs = addrs
        .difference(&live.iter().copied().collect())
        .copied()
        .collect();
    let eps: Vec<i64> = eps.into_iter().collect();
    let mut live = HashSet::new();
    // A chunk at a time: a commit may name more endpoints than a statement
    // takes parameters (one push to an address with that many).
    for chunk in eps.chunks(super::ENDPOINTS_PER_STATEMENT) {
        let mut q = endpoint::Entity::find()
            .select_only()
            .column(endpoint::Column::Id)
            .filter(endpoint::Column::Id.is_in(chunk.iter().copied()));
        if let Some(l) = lock {
            q = q.lock(l);
        }
        live.extend(q.into_tuple::<i64>().all(txn).await?);
    }
    let gone_eps = eps.into_iter().filter(|e| !live.contains(e)).collect();
    Ok((gone_addrs, gone_eps))
}

/// The statements that insert accepted events and their deliveries (see
/// [`Store::write_batch`]), except what `left_out` names, each event
/// insert with at most `room` bytes of text and media but for a single
/// event; and how many rows they insert.
fn insert_statements(
    backend: sea_orm::DbBackend,
    c: &GroupCommit<'_>,
    left_out: &Written,
    room: usize,
) -> (Vec<Statement>, u64) {
    let now = chrono::Utc::now();
    let (node, lease_until) = (c.node, c.lease_until);
    let stored: Vec<&(&event::Model, Vec<i64>)> = c
        .batch
        .iter()
        .filter(|(e, _)| !left_out.gone_addrs.contains(&e.addr_id))
        .collect();
    let mut statements = Vec::new();
    let mut rows = 0;
    // Chunks keep each statement under every backend's limit on bound
    // parameters (SQLite's is 32766) and under MySQL's
    // `max_allowed_packet`: a statement takes events until their text and
    // media would pass `room`: EVENT_BYTES_PER_STATEMENT or, less, the packet
    // (an event alone always fits: the pipeline refuses one that would not).
    let mut rest = &stored[..];
    while !rest.is_empty() {
        let mut n = 0;
        let mut bytes = 0;
        while n < rest.len() && n < INSERT_CHUNK / 16 {
            let more = event_bytes(rest[n].0);
            if n > 0 && bytes + more > room {
                break;
            }
            bytes += more;
            n += 1;
        }
        let (chunk, next) = rest.split_at(n);
        rest = next;
        rows += chunk.len() as u64;
        statements.push(
            event::Entity::insert_many(
                chunk
                    .iter()
                    .map(|(e, _)| event::ActiveModel::from((*e).clone())),
            )
            .build(backend),
        );
    }
    let deliveries: Vec<delivery::ActiveModel> = stored
        .iter()
        .flat_map(|(e, eps)| {
            eps.iter()
                .filter(|ep| !left_out.gone_endpoints.contains(ep))
                .map(move |ep| delivery::ActiveModel {
                    event_id: Set(e.id.clone()),
                    endpoint_id: Set(*ep),
                    state: Set(STATE_PENDING.into()),
                    attempts: Set(0),
                    next_at: Set(now),
                    lease_until: Set(Some(lease_until)),
                    leased_by: Set(Some(node.to_string())),
                    last_error: Set(None),
                    created: Set(now),
                    updated: Set(now),
                    ..Default::default()
                })
        })
        .collect();
    for chunk in deliveries.chunks(INSERT_CHUNK / 16) {
        rows += chunk.len() as u64;
        statements.push(delivery::Entity::insert_many(chunk.to_vec()).build(backend));
    }
    (statements, rows)
}

/// The statements that record the outcome of delivery attempts made
/// under `node`'s lease. Successes (the bulk) share their values, so they
/// are written one statement per endpoint and attempt count; the rest row
/// by row. Each changes only a delivery still pending and leased by
/// `node` (fencing): the rows they change are the outcomes written.
fn attempt_statements(
    backend: sea_orm::DbBackend,
    outcomes: &[Attempt],
    node: &str,
) -> Vec<Statement> {
    let now = chrono::Utc::now();
    let mut delivered: std::collections::BTreeMap<(i64, i32), Vec<&str>> = Default::default();
    let mut others = Vec::new();
    for o in outcomes {
        if o.state == STATE_DELIVERED && o.error.is_none() && o.next_at.is_none() {
            delivered
                .entry((o.endpoint_id, o.attempts))
                .or_default()
                .push(o.event_id.as_str());
        } else {
            others.push(o);
        }
    }
    let mut statements = Vec::new();
    for ((endpoint_id, attempts), events) in delivered {
        for chunk in events.chunks(INSERT_CHUNK) {
            statements.push(
                delivery::Entity::update_many()
                    .col_expr(delivery::Column::Attempts, Expr::value(attempts))
                    .col_expr(delivery::Column::State, Expr::value(STATE_DELIVERED))
                    .col_expr(
                        delivery::Column::LastError,
                        Expr::value(Option::<String>::None),
                    )
                    .col_expr(delivery::Column::Updated, Expr::value(now))
                    .col_expr(delivery::Column::LeaseUntil, no_lease().0)
                    .col_expr(delivery::Column::LeasedBy, no_lease().1)
                    .filter(delivery::Column::EndpointId.eq(endpoint_id))
                    .filter(delivery::Column::EventId.is_in(chunk.iter().copied()))
                    .filter(delivery::Column::LeasedBy.eq(node))
                    .filter(delivery::Column::State.eq(STATE_PENDING))
                    .build(backend),
            );
        }
    }
    for o in others {
        let mut q = delivery::Entity::update_many()
            .col_expr(delivery::Column::Attempts, Expr::value(o.attempts))
            .col_expr(delivery::Column::State, Expr::value(o.state))
            .col_expr(delivery::Column::LastError, Expr::value(o.error.clone()))
            .col_expr(delivery::Column::Updated, Expr::value(now))
            .col_expr(delivery::Column::LeaseUntil, no_lease().0)
            .col_expr(delivery::Column::LeasedBy, no_lease().1);
        if let Some(next) = o.next_at {
            q = q.col_expr(delivery::Column::NextAt, Expr::value(next));
        }
        statements.push(
            q.filter(delivery::Column::EventId.eq(o.event_id.as_str()))
                .filter(delivery::Column::EndpointId.eq(o.endpoint_id))
                .filter(delivery::Column::LeasedBy.eq(node))
                .filter(delivery::Column::State.eq(STATE_PENDING))
                .build(backend),
        );
    }
    statements
}

/// PostgreSQL's group commit in one statement (see
/// [`write_pg_at_once`]): the events of `$1`..`$14`, a delivery
/// per (`$15`, `$16`) pair, leased to `$19` until `$18`, and the outcomes
/// of `$20`..`$25`, written only where the delivery is still pending
/// (`$26`, [`STATE_PENDING`]) and leased by `$19` (fencing). It answers
/// how many outcomes were written.
/// All parts see one snapshot, so the outcomes cannot touch the
/// deliveries inserted here; they never need to, since a delivery is
/// attempted only after its commit. PostgreSQL runs the parts in the
/// reverse of their order here and checks foreign keys in the order the
/// rows went in: the events' addresses, then the deliveries' endpoints,
/// as the other commits and the deletions lock them, so a commit and a
/// deletion wait on each other no more than before.
///
/// Its plan is made once per connection (the connection's
/// `plan_cache_mode`), so it must be right at any size of the delivery
/// table, whatever the statistics say: a plan made for a new database's
/// few deliveries, or for statistics autovacuum has not yet brought up
/// to date, joined each outcome against every pending delivery, seconds
/// per commit once a burst had made thousands. So each outcome finds its
/// delivery itself: a subquery by (event_id, endpoint_id), through
/// `delivery_once` (the ids are cast to the column's `char(36)` for it),
/// gives its row's `ctid`, and the update fetches that row by `ctid`.
/// `+ 0` keeps the endpoint's own index out of that subquery: on a
/// nearly empty table it looks as good as `delivery_once`, and it walks
/// the endpoint's whole history for each outcome (a real plan, in
/// `roboger-bench`, at about 1,000 events/s instead of 8,000 to 10,000).
/// The connection has sequential scans, hash joins and merge joins off
/// (see `Store::connect`), which leaves a fetch by `ctid` per outcome as
/// the only way to join them. The state is bound, not written, so that no
/// plan walks the pending deliveries through the partial index
/// `delivery_pending` instead. A row another transaction changed since
/// this one's snapshot is fetched at its latest version, whose state and
/// lease are checked again.
const PG_GROUP_COMMIT: &str = "\
WITH dl AS (
  INSERT INTO delivery (event_id, endpoint_id, state, attempts, next_at,
                        lease_until, leased_by, last_error, created, updated)
  SELECT e, ep, $26, 0, $17, $18, $19, NULL, $17, $17
  FROM unnest($15::char(36)[], $16::int8[]) AS t(e, ep)
), ev AS (
  INSERT INTO event (id, addr_id, addr, msg, subject, formatted_subject, level,
                     location, tag, sender, media, media_fname, created, hops)
  SELECT * FROM unnest($1::char(36)[], $2::int8[], $3::text[], $4::text[],
                       $5::text[], $6::text[], $7::int2[], $8::text[], $9::text[],
                       $10::text[], $11::bytea[], $12::text[], $13::timestamptz[],
                       $14::int2[])
), up AS (
  UPDATE delivery AS d
  SET attempts = o.attempts, state = o.state, last_error = o.error,
      next_at = COALESCE(o.next_at, d.next_at), updated = $17,
      lease_until = NULL, leased_by = NULL
  FROM (SELECT o.*,
               (SELECT x.ctid FROM delivery AS x
                WHERE x.event_id = o.event_id AND x.endpoint_id + 0 = o.endpoint_id)
                 AS row_at
        FROM unnest($20::char(36)[], $21::int8[], $22::int4[], $23::text[],
                    $24::text[], $25::timestamptz[])
             AS o(event_id, endpoint_id, attempts, state, error, next_at)) AS o
  WHERE d.ctid = o.row_at AND d.leased_by = $19 AND d.state = $26
  RETURNING 1
)
SELECT count(*) FROM up";

/// SQLite's group commit as constant text (see
/// [`Store::write_sqlite_at_once`]): the events of the JSON array `?1`,
/// each `[id, addr_id, addr, msg, subject, formatted_subject, level,
/// location, tag, sender, media_fname, created, [endpoint ids], hops]` and
/// without media; a delivery per endpoint id, `?3` ([`STATE_PENDING`]),
/// leased to `?6` until `?5`; and the outcomes of the JSON array `?2`,
/// each `[event_id, endpoint_id, attempts, state, error, next_at]`,
/// written only where the delivery is still pending and leased by `?6`
/// (fencing). `?4` is the time of the commit. It answers SQLite's count
/// of changed rows before and after.
///
/// The arrays are walked with `jsonb_each`, whose rows are SQLite's
/// binary JSON: `json_each` gives each row as text, which every `->>`
/// then parsed again (a tenth of the writer's time, by `perf`).
///
/// The outcomes name their deliveries through `delivery_once`: left to
/// itself, the planner would walk every pending delivery (`state = ?3`)
/// through `delivery_pending` instead.
const SQLITE_GROUP_COMMIT: &str = "\
BEGIN IMMEDIATE;
SELECT total_changes();
INSERT INTO event (id, addr_id, addr, msg, subject, formatted_subject, level,
                   location, tag, sender, media, media_fname, created, hops)
  SELECT e.value->>0, e.value->>1, e.value->>2, e.value->>3, e.value->>4,
         e.value->>5, e.value->>6, e.value->>7, e.value->>8, e.value->>9,
         NULL, e.value->>10, e.value->>11, e.value->>13
  FROM jsonb_each(?1) AS e;
INSERT INTO delivery (event_id, endpoint_id, state, attempts, next_at,
                      lease_until, leased_by, last_error, created, updated)
  SELECT e.value->>0, d.value, ?3, 0, ?4, ?5, ?6, NULL, ?4, ?4
  FROM jsonb_each(?1) AS e, jsonb_each(jsonb_extract(e.value, '$[12]')) AS d;
UPDATE delivery INDEXED BY delivery_once
  SET attempts = o.value->>2, state = o.value->>3, last_error = o.value->>4,
      next_at = coalesce(o.value->>5, delivery.next_at), updated = ?4,
      lease_until = NULL, leased_by = NULL
  FROM jsonb_each(?2) AS o
  WHERE delivery.event_id = o.value->>0 AND delivery.endpoint_id = o.value->>1
    AND delivery.leased_by = ?6 AND delivery.state = ?3;
SELECT total_changes();
COMMIT";

/// An event of [`SQLITE_GROUP_COMMIT`]'s `?1`.
#[derive(serde::Serialize)]
struct SqliteEventRow<'a>(
    &'a str,
    i64,
    &'a str,
    &'a str,
    &'a str,
    &'a str,
    i16,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    String,
    &'a [i64],
    i16,
);

/// An outcome of [`SQLITE_GROUP_COMMIT`]'s `?2`.
#[derive(serde::Serialize)]
struct SqliteOutcomeRow<'a>(&'a str, i64, i32, &'a str, Option<&'a str>, Option<String>);

/// A time as sqlx writes a `DateTime<Utc>` to SQLite, where times are
/// text compared as text: what [`SQLITE_GROUP_COMMIT`] writes must read
/// and sort as what every other query writes.
fn sqlite_time(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
}

/// Text bytes of a batch's events at most for [`SQLITE_GROUP_COMMIT`]:
/// its JSON is one value, which SQLite takes up to 1 GB, and escaping
/// may make text six times longer. Past this (a batch of pushes near the
/// body limit), each value is bound on its own.
const TEXT_PER_JSON: usize = 16 * 1024 * 1024;

/// [`SQLITE_GROUP_COMMIT`]'s two JSON arrays for `c`; `None` when an
/// event has media, which JSON would carry only re-encoded, or the
/// events' text passes [`TEXT_PER_JSON`].
fn sqlite_commit_json(c: &GroupCommit<'_>) -> Option<(String, String)> {
    let mut text = 0;
    for (e, _) in c.batch {
        if e.media.is_some() {
            return None;
        }
        text += e.msg.len() + e.subject.len() + e.formatted_subject.len();
        text += [&e.location, &e.tag, &e.sender, &e.media_fname]
            .iter()
            .map(|f| f.as_ref().map_or(0, String::len))
            .sum::<usize>();
    }
    if text > TEXT_PER_JSON {
        return None;
    }
    let events: Vec<SqliteEventRow<'_>> = c
        .batch
        .iter()
        .map(|(e, eps)| {
            SqliteEventRow(
                &e.id,
                e.addr_id,
                &e.addr,
                &e.msg,
                &e.subject,
                &e.formatted_subject,
                e.level,
                e.location.as_deref(),
                e.tag.as_deref(),
                e.sender.as_deref(),
                e.media_fname.as_deref(),
                sqlite_time(&e.created),
                eps,
                e.hops,
            )
        })
        .collect();
    let outcomes: Vec<SqliteOutcomeRow<'_>> = c
        .outcomes
        .iter()
        .map(|a| {
            SqliteOutcomeRow(
                &a.event_id,
                a.endpoint_id,
                a.attempts,
                a.state,
                a.error.as_deref(),
                a.next_at.as_ref().map(sqlite_time),
            )
        })
        .collect();
    Some((
        serde_json::to_string(&events).ok()?,
        serde_json::to_string(&outcomes).ok()?,
    ))
}

/// The events of a PostgreSQL group commit, column by column (the
/// arrays [`PG_GROUP_COMMIT`] takes).
#[derive(Default)]
struct PgEventColumns<'a> {
    id: Vec<&'a str>,
    addr_id: Vec<i64>,
    addr: Vec<&'a str>,
    msg: Vec<&'a str>,
    subject: Vec<&'a str>,
    formatted_subject: Vec<&'a str>,
    level: Vec<i16>,
    location: Vec<Option<&'a str>>,
    tag: Vec<Option<&'a str>>,
    sender: Vec<Option<&'a str>>,
    media: Vec<Option<&'a [u8]>>,
    media_fname: Vec<Option<&'a str>>,
    created: Vec<chrono::DateTime<chrono::Utc>>,
    hops: Vec<i16>,
}

impl<'a> PgEventColumns<'a> {
    fn push(&mut self, e: &'a event::Model) {
        self.id.push(&e.id);
        self.addr_id.push(e.addr_id);
        self.addr.push(&e.addr);
        self.msg.push(&e.msg);
        self.subject.push(&e.subject);
        self.formatted_subject.push(&e.formatted_subject);
        self.level.push(e.level);
        self.location.push(e.location.as_deref());
        self.tag.push(e.tag.as_deref());
        self.sender.push(e.sender.as_deref());
        self.media.push(e.media.as_deref());
        self.media_fname.push(e.media_fname.as_deref());
        self.created.push(e.created);
        self.hops.push(e.hops);
    }
}

/// The outcomes of a PostgreSQL group commit, column by column.
#[derive(Default)]
struct PgOutcomeColumns<'a> {
    event_id: Vec<&'a str>,
    endpoint_id: Vec<i64>,
    attempts: Vec<i32>,
    state: Vec<&'a str>,
    error: Vec<Option<&'a str>>,
    next_at: Vec<Option<chrono::DateTime<chrono::Utc>>>,
}

impl<'a> PgOutcomeColumns<'a> {
    fn push(&mut self, a: &'a Attempt) {
        self.event_id.push(&a.event_id);
        self.endpoint_id.push(a.endpoint_id);
        self.attempts.push(a.attempts);
        self.state.push(a.state);
        self.error.push(a.error.as_deref());
        self.next_at.push(a.next_at);
    }
}

/// Runs `statements` in `txn`, one round trip each; the rows they changed.
async fn run_each(txn: &sea_orm::DatabaseTransaction, statements: Vec<Statement>) -> Result<u64> {
    let mut changed = 0;
    for st in statements {
        changed += txn.execute_raw(st).await?.rows_affected();
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    /// The times SQLITE_GROUP_COMMIT writes from JSON are the very text
    /// sqlx writes for a bound time, which the other queries compare
    /// them with as text.
    #[tokio::test]
    async fn sqlite_times_in_json_are_written_as_sqlx_binds_them() {
        let pool = sqlx::sqlite::SqlitePool::connect("sqlite::memory:")
            .await
            .expect("an in-memory database");
        let base = chrono::Utc
            .with_ymd_and_hms(2026, 11, 30, 17, 6, 45)
            .single()
            .expect("a time");
        for nanos in [0, 286_000_000, 286_110_000, 286_110_259] {
            let t = base + chrono::Duration::nanoseconds(nanos);
            let json = serde_json::to_string(&[sqlite_time(&t)]).expect("JSON");
            let (bound, from_json): (String, String) =
                sqlx::query_as("SELECT ?1, json_extract(?2, '$[0]')")
                    .bind(t)
                    .bind(json)
                    .fetch_one(&pool)
                    .await
                    .expect("the two texts");
            assert_eq!(from_json, bound);
        }
    }

    /// A batch goes in as JSON unless it has media or too much text.
    #[test]
    fn sqlite_json_only_for_batches_without_media_and_within_the_text_bound() {
        let event = |msg: String, media: Option<Vec<u8>>| event::Model {
            msg,
            media,
            ..event::Model::sample("01a22d6c-59a6-7331-9433-e46506e80878")
        };
        let json = |events: &[event::Model]| {
            let batch: Vec<(&event::Model, Vec<i64>)> =
                events.iter().map(|e| (e, vec![1])).collect();
            sqlite_commit_json(&GroupCommit {
                batch: &batch,
                outcomes: &[],
                node: "n",
                lease_until: chrono::Utc::now(),
            })
        };
        let small = event("m".into(), None);
        let (events, outcomes) = json(std::slice::from_ref(&small)).expect("JSON");
        let rows: serde_json::Value = serde_json::from_str(&events).expect("an array");
        assert_eq!(rows[0][3], "m");
        assert_eq!(rows[0][12], serde_json::json!([1]));
        assert_eq!(outcomes, "[]");
        assert!(json(&[small.clone(), event("m".into(), Some(vec![1]))]).is_none());
        let half = "x".repeat(TEXT_PER_JSON / 2);
        assert!(json(&[event(half.clone(), None)]).is_some());
        assert!(json(&[event(half.clone(), None), event(half, None), small]).is_none());
    }
}
