//! Per-address limit counters in aligned windows, shared by every server
//! on the database: each step is one atomic statement.

use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{ActiveValue::Set, ColumnTrait, EntityTrait, QueryFilter};

use super::entity::addr_limit;
use super::{Result, Store, inserted};

impl Store {
    /// Counts one message of `size` bytes against an address's limits in
    /// the window starting at `window_start`, if it fits under `max_c`
    /// messages and `max_s` bytes; returns false (and counts nothing)
    /// when it does not. Each step is one atomic statement, so servers
    /// sharing the database share the counters.
    pub async fn count_message(
        &self,
        addr_id: i64,
        window_start: i64,
        size: i64,
        max_c: i64,
        max_s: i64,
    ) -> Result<bool> {
        if max_c < 1 || size > max_s {
            return Ok(false);
        }
        // A second round only when another server started the window (or
        // inserted the row) between our statements: then it exists.
        for _ in 0..2 {
            // The usual case: this window's row exists and has room.
            let r = addr_limit::Entity::update_many()
                .col_expr(
                    addr_limit::Column::Count,
                    Expr::col(addr_limit::Column::Count).add(1),
                )
                .col_expr(
                    addr_limit::Column::Size,
                    Expr::col(addr_limit::Column::Size).add(size),
                )
                .filter(addr_limit::Column::AddrId.eq(addr_id))
                .filter(addr_limit::Column::WindowStart.eq(window_start))
                .filter(addr_limit::Column::Count.lt(max_c))
                .filter(Expr::col(addr_limit::Column::Size).add(size).lte(max_s))
                .exec(&self.db)
                .await?;
            if r.rows_affected == 1 {
                return Ok(true);
            }
            // A new window: start it with this message.
            let r = addr_limit::Entity::update_many()
                .col_expr(addr_limit::Column::WindowStart, Expr::value(window_start))
                .col_expr(addr_limit::Column::Count, Expr::value(1))
                .col_expr(addr_limit::Column::Size, Expr::value(size))
                .filter(addr_limit::Column::AddrId.eq(addr_id))
                .filter(addr_limit::Column::WindowStart.lt(window_start))
                .exec(&self.db)
                .await?;
            if r.rows_affected == 1 {
                return Ok(true);
            }
            // The address's first message (or counters were reset).
            let first = addr_limit::Entity::insert(addr_limit::ActiveModel {
                addr_id: Set(addr_id),
                window_start: Set(window_start),
                count: Set(1),
                size: Set(size),
            })
            .exec_without_returning(&self.db)
            .await;
            if inserted(first)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Takes back one message of `size` bytes that [`Store::count_message`]
    /// counted in the window starting at `window_start` (its push was then
    /// not stored). Nothing when that window has ended or the counters
    /// were reset meanwhile.
    pub async fn uncount_message(&self, addr_id: i64, window_start: i64, size: i64) -> Result<()> {
        addr_limit::Entity::update_many()
            .col_expr(
                addr_limit::Column::Count,
                Expr::col(addr_limit::Column::Count).sub(1),
            )
            .col_expr(
                addr_limit::Column::Size,
                Expr::col(addr_limit::Column::Size).sub(size),
            )
            .filter(addr_limit::Column::AddrId.eq(addr_id))
            .filter(addr_limit::Column::WindowStart.eq(window_start))
            .filter(addr_limit::Column::Count.gte(1))
            .filter(addr_limit::Column::Size.gte(size))
            .exec(&self.db)
            .await?;
        Ok(())
    }

    /// The counters of an address's current window (for 429 messages).
    pub async fn limit_counters(&self, addr_id: i64) -> Result<Option<addr_limit::Model>> {
        Ok(addr_limit::Entity::find_by_id(addr_id)
            .one(&self.db)
            .await?)
    }

    /// Forgets every address's limit counters.
    pub async fn reset_addr_limits(&self) -> Result<()> {
        addr_limit::Entity::delete_many().exec(&self.db).await?;
        Ok(())
    }
}
