//! The record of each deletion of history answered before it ended (an
//! address's, an endpoint's, everything): written before the deletion's
//! walk begins, with the node instance running it, and deleted in the
//! transaction that ends it. A deletion whose node stopped or died under
//! it, or gave up on it, is left recorded for another node, or this one,
//! to take and make ([`crate::deletion`]); one answered with its error
//! is forgotten, its record deleted.

use std::time::Duration;

use sea_orm::sea_query::{Expr, ExprTrait, Query, SelectStatement};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter,
};
use sea_orm::{QueryOrder, QuerySelect};

use super::cluster::live_nodes;
use super::entity::{deletion, node};
use super::{Result, Store, StoreError};

/// What a deletion deletes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleting {
    /// An address, with its endpoints and history.
    Addr(i64),
    /// An endpoint of an address (`addr_id`, `endpoint_id`), with its
    /// history.
    Endpoint(i64, i64),
    /// Every address with an id up to this one: those there were when
    /// it was asked for ([`Store::addr_highest_id`]). Addresses made
    /// while it goes on are kept.
    Everything(i64),
}

impl Deleting {
    /// Whether it deletes address `a`.
    pub fn takes_addr(self, a: i64) -> bool {
        match self {
            Deleting::Addr(x) => x == a,
            Deleting::Endpoint(..) => false,
            Deleting::Everything(up_to) => a <= up_to,
        }
    }

    /// What a record holds.
    fn of(d: &deletion::Model) -> Deleting {
        match (d.addr_id, d.endpoint_id) {
            (Some(a), Some(ep)) => Deleting::Endpoint(a, ep),
            (Some(a), None) => Deleting::Addr(a),
            // Recorded by the build before, which deleted every address.
            (None, _) => Deleting::Everything(d.up_to.unwrap_or(i64::MAX)),
        }
    }
}

/// What asking for a deletion did ([`Store::deletion_begin`]).
#[derive(Debug)]
pub enum Begun {
    /// It is recorded, to be made.
    Recorded(Recorded),
    /// A deletion recorded before deletes what it would, or more: it is
    /// not recorded again.
    Covered(Deleting),
}

/// A recorded deletion.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// The record's id.
    pub id: i64,
    pub what: Deleting,
    /// The node instance running it, if any.
    node: Option<String>,
}

impl Recorded {
    /// Whether instance `me` had taken it.
    pub fn taken_by(&self, me: &str) -> bool {
        self.node.as_deref() == Some(me)
    }
}

impl Store {
    /// Records a deletion that instance `me` is about to make, taken by
    /// it, unless a recorded one covers it ([`Store::deletion_covering`]),
    /// which is then answered instead. What it deletes is no longer routed
    /// to from then on (a routing change, in the same transaction):
    /// nothing is accepted to be deleted with it.
    ///
    /// The routing change comes first: the version row's lock, held to
    /// the commit, makes begins one at a time, so two asks for one
    /// deletion at once record it once.
    pub async fn deletion_begin(&self, what: Deleting, me: &str) -> Result<Begun> {
        let (addr_id, endpoint_id, up_to) = match what {
            Deleting::Addr(a) => (Some(a), None, None),
            Deleting::Endpoint(a, ep) => (Some(a), Some(ep), None),
            Deleting::Everything(up_to) => (None, None, Some(up_to)),
        };
        let txn = self.begin_write().await?;
        self.announce(&txn, addr_id).await?;
        if let Some(before) = covering(&txn, what).await? {
            // Rolled back, the routing change with it.
            return Ok(Begun::Covered(before));
        }
        let r = deletion::Entity::insert(deletion::ActiveModel {
            addr_id: Set(addr_id),
            endpoint_id: Set(endpoint_id),
            up_to: Set(up_to),
            node: Set(Some(me.to_string())),
            created: Set(chrono::Utc::now()),
            ..Default::default()
        })
        .exec(&txn)
        .await?;
        txn.commit().await?;
        Ok(Begun::Recorded(Recorded {
            id: r.last_insert_id,
            what,
            node: Some(me.to_string()),
        }))
    }

    /// Every deletion recorded and not yet ended.
    pub(super) async fn deletions_recorded(&self) -> Result<Vec<Deleting>> {
        Ok(deletion::Entity::find()
            .all(&self.db)
            .await?
            .iter()
            .map(Deleting::of)
            .collect())
    }

    /// The recorded deletions no live node other than `me` runs, oldest
    /// first: taken by nobody, by `me`, or by an instance with no
    /// heartbeat within `node_timeout` (stopped, dead, or found dead).
    pub async fn deletions_left(&self, me: &str, node_timeout: Duration) -> Result<Vec<Recorded>> {
        let live: Vec<String> = live_nodes(node_timeout)
            .select_only()
            .column(node::Column::Instance)
            .filter(node::Column::Instance.ne(me))
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(deletion::Entity::find()
            .order_by_asc(deletion::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .filter(|d| d.node.as_ref().is_none_or(|n| !live.contains(n)))
            .map(|d| Recorded {
                id: d.id,
                what: Deleting::of(&d),
                node: d.node,
            })
            .collect())
    }

    /// The oldest recorded deletion that deletes what `what` deletes, or
    /// more: `what` itself, its address's (for an endpoint), or a
    /// `delete-everything` that takes its address (every address
    /// `what` takes).
    pub async fn deletion_covering(&self, what: Deleting) -> Result<Option<Deleting>> {
        covering(&self.db, what).await
    }

    /// The recorded deletions that take address `a` or some of it: its
    /// own, its endpoints', and the delete-everythings that take it.
    pub async fn deletions_of_addr(&self, a: i64) -> Result<Vec<Deleting>> {
        let of_it = Condition::any()
            .add(deletion::Column::AddrId.eq(a))
            .add(everything_taking(a));
        Ok(deletion::Entity::find()
            .filter(of_it)
            .order_by_asc(deletion::Column::Id)
            .all(&self.db)
            .await?
            .iter()
            .map(Deleting::of)
            .collect())
    }

    /// When the oldest recorded deletion (asked for and not yet ended)
    /// was asked for.
    pub async fn deletion_oldest(&self) -> Result<Option<chrono::DateTime<chrono::Utc>>> {
        Ok(deletion::Entity::find()
            .select_only()
            .column_as(deletion::Column::Created.min(), "oldest")
            .into_tuple::<Option<chrono::DateTime<chrono::Utc>>>()
            .one(&self.db)
            .await?
            .flatten())
    }

    /// Takes the recorded deletion `d` for instance `me`, if no other
    /// node took it since it was read: true when it is `me`'s to make.
    pub async fn deletion_take(&self, d: &Recorded, me: &str) -> Result<bool> {
        let mut q = deletion::Entity::update_many()
            .col_expr(deletion::Column::Node, Expr::value(me))
            .filter(deletion::Column::Id.eq(d.id));
        q = match &d.node {
            Some(n) => q.filter(deletion::Column::Node.eq(n.as_str())),
            None => q.filter(deletion::Column::Node.is_null()),
        };
        Ok(q.exec(&self.db).await?.rows_affected == 1)
    }

    /// Makes the recorded deletion `d`, deleting its record as it ends.
    /// What it deletes may be gone already (another node ended it).
    pub async fn deletion_make(&self, d: &Recorded) -> Result<()> {
        match d.what {
            Deleting::Addr(a) => self.addr_delete(a, d.id).await,
            Deleting::Endpoint(a, ep) => self.endpoint_delete(a, ep, d.id).await,
            Deleting::Everything(up_to) => self.delete_everything(up_to, d.id).await,
        }
    }

    /// Deletes the record of deletion `id`: it is not to be made, and
    /// what it would have deleted is routed to again.
    pub async fn deletion_forget(&self, id: i64) -> Result<()> {
        let txn = self.begin_write().await?;
        let Some(d) = deletion::Entity::find_by_id(id).one(&txn).await? else {
            return Ok(());
        };
        deletion::Entity::delete_by_id(id).exec(&txn).await?;
        self.announce(&txn, d.addr_id).await?;
        txn.commit().await?;
        Ok(())
    }

    /// Leaves the recorded deletion `id`, which instance `me` gave up on,
    /// to whichever node takes it next.
    pub async fn deletion_let_go(&self, id: i64, me: &str) -> Result<()> {
        deletion::Entity::update_many()
            .col_expr(deletion::Column::Node, Expr::value(Option::<String>::None))
            .filter(deletion::Column::Id.eq(id))
            .filter(deletion::Column::Node.eq(me))
            .exec(&self.db)
            .await?;
        Ok(())
    }
}

/// [`Store::deletion_covering`], read through `c`.
async fn covering<C: ConnectionTrait>(c: &C, what: Deleting) -> Result<Option<Deleting>> {
    let covering = match what {
        Deleting::Everything(up_to) => Condition::all().add(everything_taking(up_to)),
        Deleting::Addr(a) | Deleting::Endpoint(a, _) => {
            let everything = everything_taking(a);
            let the_addr = deletion::Column::AddrId
                .eq(a)
                .and(deletion::Column::EndpointId.is_null());
            let mut any = Condition::any().add(everything).add(the_addr);
            if let Deleting::Endpoint(_, ep) = what {
                any = any.add(
                    deletion::Column::AddrId
                        .eq(a)
                        .and(deletion::Column::EndpointId.eq(ep)),
                );
            }
            any
        }
    };
    Ok(deletion::Entity::find()
        .filter(covering)
        .order_by_asc(deletion::Column::Id)
        .one(c)
        .await?
        .map(|d| Deleting::of(&d)))
}

/// Refuses (409) a change under address `a` (under its endpoint `ep`, if
/// some) that a recorded deletion takes: made, it would be deleted with
/// it. Read through `c`; in a routing change's transaction, after its
/// routing change took the version row's lock, which a deletion's begin
/// holds until its record is committed ([`Store::deletion_begin`]): a
/// change racing the begin is either committed before the record is
/// written, and deleted with the rest, or refused.
pub(super) async fn refuse_taken<C: ConnectionTrait>(c: &C, a: i64, ep: Option<i64>) -> Result<()> {
    let under = match ep {
        Some(ep) => Deleting::Endpoint(a, ep),
        None => Deleting::Addr(a),
    };
    let taken = match (covering(c, under).await?, ep) {
        (None, _) => return Ok(()),
        (Some(Deleting::Endpoint(..)), Some(ep)) => format!("endpoint {ep}"),
        (Some(_), _) => format!("addr {a}"),
    };
    Err(StoreError::Conflict(format!(
        "{taken} is being deleted: a change to it would be deleted with it"
    )))
}

/// The endpoints whose deletion is recorded, as a subquery: what a change
/// of many deliveries leaves out ([`Store::event_retry`]).
pub(super) fn endpoints_taken() -> SelectStatement {
    Query::select()
        .column(deletion::Column::EndpointId)
        .from(deletion::Entity)
        .and_where(deletion::Column::EndpointId.is_not_null())
        .to_owned()
}

/// Deletes the record `id` in the transaction that ends its deletion:
/// false when it was gone already (another node ended the deletion
/// first), and the transaction is then to change nothing more.
pub(super) async fn deletion_end<C: ConnectionTrait>(c: &C, id: i64) -> Result<bool> {
    Ok(deletion::Entity::delete_by_id(id)
        .exec(c)
        .await?
        .rows_affected
        == 1)
}

/// The records of the delete-everythings that take address `id`: those of
/// addresses up to it at least, or (written by the build before) of
/// every address.
fn everything_taking(id: i64) -> sea_orm::sea_query::Expr {
    deletion::Column::AddrId.is_null().and(
        deletion::Column::UpTo
            .is_null()
            .or(deletion::Column::UpTo.gte(id)),
    )
}
