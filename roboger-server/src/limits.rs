//! Address limits: at most `lim_c` messages and `lim_s` bytes per period
//! (`limits.period`), with `limits.reserve` percent of each kept for
//! WARNING and above, counted in windows aligned to the period.
//!
//! The counters live in the database (one atomic statement per push), or,
//! with `limits.redis`, in Redis (one Lua script per push, which checks
//! and counts at once); either way every server on them shares them, so
//! several nodes together accept exactly `lim_c`. When Redis cannot be
//! reached a push is counted in the database instead, with a warning,
//! never refused for it; counts made during an outage are not carried
//! over to Redis, so such a window may let up to twice the limit through.
//!
//! A push is counted before its event is stored. One that is then not
//! stored (answered 503) is taken back where it was counted
//! ([`Counters::refund`]), so a sender that sends it again is not counted
//! twice for one event.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::Limits;
use crate::level::Level;
use crate::outage::Outage;
use crate::routing::AddrRoutes;
use crate::store::{Store, StoreError};

/// Why a push is over its address's limit (the text of the 429).
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// Over the limit; `text` says which and why, in the original's
    /// words. `retry` is how long until the window ends, when a push like
    /// this one could then be taken (`None` when it never could: it is
    /// larger than the size limit, or its level is allowed nothing).
    #[error("{text}")]
    Over {
        text: String,
        retry: Option<Duration>,
    },
    /// The counters could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Checks and counts one message: increments count and size only when
/// both stay within the limits; returns {counted, count, size} as they
/// are after it. The key expires with its window.
const COUNT_SCRIPT: &str = r"
local c = tonumber(redis.call('HGET', KEYS[1], 'c') or '0')
local s = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
local size, max_c, max_s = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if c < max_c and s + size <= max_s then
  c = redis.call('HINCRBY', KEYS[1], 'c', 1)
  s = redis.call('HINCRBY', KEYS[1], 's', size)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return {1, c, s}
end
return {0, c, s}
";

/// Takes back one message counted by [`COUNT_SCRIPT`], when its key (its
/// window) is still there with it.
const UNCOUNT_SCRIPT: &str = r"
local c = tonumber(redis.call('HGET', KEYS[1], 'c') or '0')
local s = tonumber(redis.call('HGET', KEYS[1], 's') or '0')
local size = tonumber(ARGV[1])
if c >= 1 and s >= size then
  redis.call('HINCRBY', KEYS[1], 'c', -1)
  redis.call('HINCRBY', KEYS[1], 's', -size)
end
return 0
";

/// Refunds under way at once, at most; past that a push not stored stays
/// counted (a database or Redis that fails each of them would otherwise
/// gather a task per refused push).
const REFUNDS_AT_ONCE: usize = 64;

/// Prefix of every key this server writes to Redis.
const KEY_PREFIX: &str = "roboger:lim:";
/// How often a server tries to reach Redis again while it is down.
const RETRY: Duration = Duration::from_secs(1);

/// Where the counters are kept.
pub struct Counters {
    redis: Option<Arc<RedisCounters>>,
    refunds: Arc<Semaphore>,
    timeout: Duration,
}

impl std::fmt::Debug for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.redis.is_some() {
            "Counters(redis)"
        } else {
            "Counters(database)"
        })
    }
}

struct RedisCounters {
    client: redis::Client,
    script: redis::Script,
    uncount: redis::Script,
    timeout: Duration,
    state: tokio::sync::Mutex<Link>,
    /// What the log says of pushes counted in the database instead.
    outage: Mutex<Outage>,
}

#[derive(Default)]
struct Link {
    conn: Option<redis::aio::ConnectionManager>,
    /// When connecting last failed.
    failed: Option<Instant>,
}

/// The outcome of counting one message.
struct Counted {
    counted: bool,
    /// Counted in Redis (else in the database).
    in_redis: bool,
    /// The window's message count and bytes, after this message if counted.
    count: i64,
    size: i64,
}

impl Counters {
    /// Counters in Redis at `redis_url` when it is set (no connection is
    /// made before the first push), else in the database.
    pub fn new(redis_url: Option<&str>, timeout: Duration) -> Result<Counters, String> {
        let redis = match redis_url {
            None => None,
            Some(url) => Some(Arc::new(RedisCounters {
                client: redis::Client::open(url).map_err(|e| e.to_string())?,
                script: redis::Script::new(COUNT_SCRIPT),
                uncount: redis::Script::new(UNCOUNT_SCRIPT),
                timeout: timeout.min(Duration::from_secs(1)),
                state: tokio::sync::Mutex::default(),
                outage: Mutex::new(Outage::new(
                    "cannot count address limits in Redis; counting in the database until it is \
                     back",
                    "address limits are counted in Redis again",
                )),
            })),
        };
        Ok(Counters {
            redis,
            refunds: Arc::new(Semaphore::new(REFUNDS_AT_ONCE)),
            timeout,
        })
    }

    /// Takes back a push [`check`] counted whose event was then not
    /// stored, where it was counted, in a task of its own (bounded by
    /// `timeout`) so the push's answer does not wait for it. Best effort:
    /// a refund that fails (the database that refused the event may refuse
    /// it too) leaves the push counted, and says so at DEBUG.
    pub fn refund(&self, store: &Store, charge: Charge) {
        let Ok(permit) = self.refunds.clone().try_acquire_owned() else {
            tracing::debug!(
                addr_id = charge.addr_id,
                "too many refunds under way; a push not stored stays counted"
            );
            return;
        };
        let (store, redis, timeout) = (store.clone(), self.redis.clone(), self.timeout);
        tokio::spawn(async move {
            let _permit = permit;
            let done = match redis {
                Some(r) if charge.in_redis => r.uncount(&charge).await,
                _ => crate::store::within(
                    timeout,
                    store.uncount_message(charge.addr_id, charge.window, charge.size),
                )
                .await
                .map_err(|e| e.to_string()),
            };
            if let Err(e) = done {
                tracing::debug!(addr_id = charge.addr_id, error = %e, "a push not stored stays counted");
            }
        });
    }

    /// Forgets every address's counters (`reset-addr-limits`).
    pub async fn reset(&self, store: &Store) -> Result<(), StoreError> {
        store.reset_addr_limits().await?;
        if let Some(r) = &self.redis
            && let Err(e) = r.reset().await
        {
            tracing::warn!(error = %e, "cannot reset the limit counters in Redis");
        }
        Ok(())
    }

    async fn count(
        &self,
        store: &Store,
        addr_id: i64,
        window: (i64, Duration),
        size: i64,
        (max_c, max_s): (i64, i64),
    ) -> Result<Counted, StoreError> {
        if let Some(r) = &self.redis {
            let counted = r.count(addr_id, window, size, (max_c, max_s)).await;
            if let Ok(mut outage) = r.outage.lock() {
                match &counted {
                    Ok(_) => outage.succeeded(),
                    Err(e) => outage.failed(e),
                }
            }
            if let Ok(c) = counted {
                return Ok(c);
            }
        }
        let counted = store
            .count_message(addr_id, window.0, size, max_c, max_s)
            .await?;
        let (count, size) = match store.limit_counters(addr_id).await? {
            Some(c) if !counted && c.window_start == window.0 => (c.count, c.size),
            _ => (0, 0),
        };
        Ok(Counted {
            counted,
            in_redis: false,
            count,
            size,
        })
    }
}

impl RedisCounters {
    /// The connection, (re)connecting at most once per [`RETRY`].
    async fn conn(&self) -> Result<redis::aio::ConnectionManager, String> {
        let mut link = self.state.lock().await;
        if let Some(c) = &link.conn {
            return Ok(c.clone());
        }
        if link.failed.is_some_and(|t| t.elapsed() < RETRY) {
            return Err("Redis was unreachable a moment ago".into());
        }
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let made = tokio::time::timeout(
            self.timeout * 2,
            redis::aio::ConnectionManager::new_with_config(self.client.clone(), cfg),
        )
        .await;
        match made {
            Ok(Ok(c)) => {
                tracing::info!("connected to Redis for the limit counters");
                link.conn = Some(c.clone());
                link.failed = None;
                Ok(c)
            }
            Ok(Err(e)) => {
                link.failed = Some(Instant::now());
                Err(e.to_string())
            }
            Err(_) => {
                link.failed = Some(Instant::now());
                Err("connecting timed out".into())
            }
        }
    }

    async fn count(
        &self,
        addr_id: i64,
        (window, period): (i64, Duration),
        size: i64,
        (max_c, max_s): (i64, i64),
    ) -> Result<Counted, String> {
        let mut conn = self.conn().await?;
        let key = format!("{KEY_PREFIX}{addr_id}:{window}");
        // Kept a period past its window, for the 429 texts at its end.
        let ttl = period.as_secs().max(1) * 2;
        let mut call = self.script.key(key);
        call.arg(size).arg(max_c).arg(max_s).arg(ttl);
        let run = call.invoke_async::<(i64, i64, i64)>(&mut conn);
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok((counted, count, size))) => Ok(Counted {
                counted: counted == 1,
                in_redis: true,
                count,
                size,
            }),
            Ok(Err(e)) => Err(self.lost(e.to_string()).await),
            Err(_) => Err(self.lost("Redis did not answer in time".into()).await),
        }
    }

    /// Takes back `charge`, counted here.
    async fn uncount(&self, charge: &Charge) -> Result<(), String> {
        let mut conn = self.conn().await?;
        let key = format!("{KEY_PREFIX}{}:{}", charge.addr_id, charge.window);
        let mut call = self.uncount.key(key);
        call.arg(charge.size);
        let run = call.invoke_async::<i64>(&mut conn);
        match tokio::time::timeout(self.timeout, run).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.lost(e.to_string()).await),
            Err(_) => Err(self.lost("Redis did not answer in time".into()).await),
        }
    }

    /// Drops the connection after a failed call, so that for [`RETRY`]
    /// pushes go straight to the database instead of each waiting for a
    /// link that is down.
    async fn lost(&self, e: String) -> String {
        let mut link = self.state.lock().await;
        link.conn = None;
        link.failed = Some(Instant::now());
        e
    }

    async fn reset(&self) -> Result<(), String> {
        let mut conn = self.conn().await?;
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{KEY_PREFIX}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            if !keys.is_empty() {
                redis::cmd("DEL")
                    .arg(keys)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }
}

/// A push counted against its address's limits: what
/// [`Counters::refund`] takes back when its event is not stored.
#[derive(Debug)]
pub struct Charge {
    addr_id: i64,
    /// The start of the window it was counted in.
    window: i64,
    size: i64,
    in_redis: bool,
}

/// Counts a push of `size` bytes at `level` to the address `a`, or says
/// why it is over the limit, in the original's words.
pub async fn check(
    (store, counters): (&Store, &Counters),
    limits: &Limits,
    routes: &AddrRoutes,
    a: &str,
    level: Level,
    size: usize,
) -> Result<Charge, LimitError> {
    let period = limits.period.as_secs().max(1) as i64;
    let now = chrono::Utc::now().timestamp();
    let window = now - now.rem_euclid(period);
    let low = level < Level::Warning;
    let reserved = |lim: i64| -> i64 {
        if low {
            lim - lim * i64::from(limits.reserve) / 100
        } else {
            lim
        }
    };
    let size = i64::try_from(size).unwrap_or(i64::MAX);
    let (max_c, max_s) = (reserved(routes.lim_c), reserved(routes.lim_s));
    let c = counters
        .count(
            store,
            routes.id,
            (window, limits.period),
            size,
            (max_c, max_s),
        )
        .await?;
    if c.counted {
        return Ok(Charge {
            addr_id: routes.id,
            window,
            size,
            in_redis: c.in_redis,
        });
    }
    let retry = (max_c > 0 && size <= max_s)
        .then(|| Duration::from_secs(u64::try_from(window + period - now).unwrap_or(1).max(1)));
    let (count, used) = (c.count, c.size);
    let period_name = &limits.period_name;
    let reserve_note = format!(
        ", {}% are reserved for WARNING and higher levels",
        limits.reserve
    );
    let msg = if count >= routes.lim_c {
        format!(
            "Messages to {a} are limited by {} per {period_name}. Limit has been reached",
            routes.lim_c
        )
    } else if count >= max_c {
        format!(
            "Messages to {a} are limited by {} per {period_name}{reserve_note}",
            routes.lim_c
        )
    } else if used + size > routes.lim_s {
        format!(
            "Messages to {a} are limited by {} bytes per {period_name}. Limit has been reached",
            routes.lim_s
        )
    } else {
        format!(
            "Messages to {a} are limited by {} bytes per {period_name}{reserve_note}",
            routes.lim_s
        )
    };
    Err(LimitError::Over { text: msg, retry })
}
