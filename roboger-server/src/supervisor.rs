//! The plugin supervisor: runs every configured plugin as a child process,
//! speaks JSON-RPC to it over its stdin/stdout, and keeps it running.
//!
//! Each plugin has a slot and one task that owns its child: spawn,
//! handshake (`hello`, with a protocol version check), then
//! `validate_plugin_config` and `load`; then it waits for the child to
//! exit, the pipe to close or carry garbage, a health ping to go
//! unanswered, a restart request or shutdown. A restart request lets the
//! calls in flight end first (each within the call `timeout`). A crashed plugin is
//! restarted with exponential backoff; too many crashes in a window mark
//! it failed (retried slowly, or restarted by hand). An incompatible
//! protocol or a refused plugin config is permanent until restarted by
//! hand: no restart loop.
//!
//! Invariant: calls to a plugin go through [`Supervisor::call`] (or its
//! batch and alone forms), which bound the calls in flight (per plugin)
//! and never wait forever: a call in flight when the plugin dies fails at
//! once with an error the caller can retry, [`CallError::Ended`] when the
//! process ended by itself rather than by the server's hand.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jsonrpsee::core::client::{ClientT, Error as ClientError};
use jsonrpsee::core::traits::ToRpcParams;
use roboger_plugin_sdk::protocol::{self, Manifest, PluginApiClient, codes};
use roboger_plugin_sdk::rpc::{NotificationHandler, Peer, PeerOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::AsyncBufReadExt;
use tokio::process::{Child, Command};
use tokio::sync::{AcquireError, Semaphore, SemaphorePermit, mpsc, watch};
use tokio::time::Instant;

use crate::config::PluginConfig;
use crate::host::{HostContext, HostHandler, PluginCalls};
use crate::plugin_log::{self, PluginLog};

/// Named params already written as one JSON object (a delivery's event,
/// serialized once by the pipeline), handed to the plugin as they are.
#[derive(Debug)]
pub struct RawParams(pub Box<RawValue>);

impl ToRpcParams for RawParams {
    fn to_rpc_params(self) -> Result<Option<Box<RawValue>>, serde_json::Error> {
        Ok(Some(self.0))
    }
}

/// Why a call to a plugin did not succeed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// No plugin of that name is configured.
    #[error("no such plugin: {0}")]
    NotConfigured(String),
    /// The plugin refused the input; the message is the plugin's.
    #[error("{0}")]
    Rejected(String),
    /// The plugin failed doing the work; retry later.
    #[error("{0}")]
    Failed(String),
    /// The plugin failed doing the work, and its target asked for at
    /// least this long before the next try (`retry_after` in the error's
    /// data, from an HTTP `Retry-After`).
    #[error("{0}")]
    Later(String, Duration),
    /// The call was made but not answered: it timed out, the plugin was
    /// stopped during it, or its connection failed; the plugin may have
    /// done the work. Retry later.
    #[error("plugin {0} is not available: {1}")]
    Unavailable(String, String),
    /// The call was not made, for now: the plugin is starting or
    /// restarting, or has had no room for it (`max-inflight`, or its
    /// turn to send alone) within the call `timeout`, or the server is
    /// shutting down. Nothing reached the plugin; try again soon.
    #[error("plugin {0} is not available: {1}")]
    NotMade(String, String),
    /// The plugin's process ended by itself (it exited, or broke its
    /// pipe) while the call was in flight: how it ended. `cause`: the
    /// call was a send made alone ([`Supervisor::send_alone`]) to a
    /// plugin that had delivered other events since it started, so the
    /// event is taken as what ends it.
    #[error("plugin {plugin} ended during the call: {why}")]
    Ended {
        plugin: String,
        why: String,
        cause: bool,
    },
    /// The plugin is not running and will not be until it is restarted,
    /// by hand or by its slow retry (its state, `failed` or `refused`):
    /// the call was not made.
    #[error("plugin {0} is not available: it is {1}")]
    NotRunning(String, String),
}

/// How long a call waits for a plugin that is starting or restarting.
pub const START_WAIT: Duration = Duration::from_secs(1);

/// The least time a plugin's start (its handshake, config check and
/// `load`) is given, however short the call `timeout`: a runtime coming
/// up, a Python plugin's imports, or any start on a loaded machine can
/// outlast a call, and a start cut short is restarted only to be cut
/// short again.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Tunables of the supervisor (the defaults suit production).
#[derive(Debug, Clone)]
pub struct Options {
    /// Timeout of every call (the config's `timeout`).
    pub timeout: Duration,
    /// Longest message a plugin may write.
    pub max_line: usize,
    /// How often a running plugin is pinged.
    pub health_interval: Duration,
    /// How long a plugin may take to exit after `shutdown` and EOF.
    pub shutdown_grace: Duration,
    /// Restart backoff.
    pub backoff: BackoffPolicy,
    /// The `roboger-server` executable that confines each plugin before
    /// running it ([`crate::sandbox`]); `None` runs plugins unconfined.
    pub launcher: Option<PathBuf>,
    /// Told the name of each plugin that runs again after it was out of
    /// service (failed, or refused): its deliveries were put off while it
    /// was, and are due now. `None`: nobody is told.
    pub back_in_service: Option<mpsc::Sender<String>>,
}

impl Options {
    /// Production defaults with the given call timeout and line limit.
    pub fn new(timeout: Duration, max_line: usize) -> Options {
        Options {
            timeout,
            max_line,
            health_interval: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(3),
            backoff: BackoffPolicy::default(),
            launcher: None,
            back_in_service: None,
        }
    }

    /// Timeout of a plugin's start, each of its handshake, config check
    /// and `load`: the longer of `timeout` and [`START_TIMEOUT`].
    pub fn start_timeout(&self) -> Duration {
        self.timeout.max(START_TIMEOUT)
    }
}

/// Restart delays and the crash budget.
#[derive(Debug, Clone, Copy)]
pub struct BackoffPolicy {
    /// The first delay.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
    /// Running this long without trouble resets the delay.
    pub healthy_after: Duration,
    /// More crashes than this within `window` mark the plugin failed.
    pub max_crashes: usize,
    /// The crash-counting window.
    pub window: Duration,
    /// How often a failed plugin is retried.
    pub failed_retry: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
            max_crashes: 5,
            window: Duration::from_secs(60),
            failed_retry: Duration::from_secs(300),
        }
    }
}

/// Restart bookkeeping: exponential delays and crashes in a window.
#[derive(Debug)]
pub struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
    crashes: VecDeque<Instant>,
}

/// What to do after a crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCrash {
    /// Restart after this delay.
    Restart(Duration),
    /// Too many crashes: mark failed and retry after this delay.
    Failed(Duration),
}

impl Backoff {
    /// Fresh bookkeeping.
    pub fn new(policy: BackoffPolicy) -> Backoff {
        Backoff {
            policy,
            next: policy.initial,
            crashes: VecDeque::new(),
        }
    }

    /// Records a crash of a run that started at `started` and says what
    /// to do. A run that lasted `healthy_after` first resets the delay.
    /// The first crash in a window restarts at once (a plugin killed once
    /// is back within milliseconds); repeated ones back off.
    pub fn crashed(&mut self, started: Option<Instant>) -> AfterCrash {
        let now = Instant::now();
        if started.is_some_and(|s| now.duration_since(s) >= self.policy.healthy_after) {
            self.next = self.policy.initial;
            self.crashes.clear();
        }
        while self
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.policy.window)
        {
            self.crashes.pop_front();
        }
        self.crashes.push_back(now);
        if self.crashes.len() == 1 {
            return AfterCrash::Restart(Duration::ZERO);
        }
        if self.crashes.len() > self.policy.max_crashes {
            self.crashes.clear();
            self.next = self.policy.initial;
            return AfterCrash::Failed(self.policy.failed_retry);
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.policy.max);
        AfterCrash::Restart(delay)
    }

    /// Forgets past crashes (a restart by hand).
    pub fn reset(&mut self) {
        self.next = self.policy.initial;
        self.crashes.clear();
    }
}

/// Where a plugin is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Being spawned or handshaking.
    Starting,
    /// Serving calls.
    Running,
    /// Crashed; waiting to restart.
    Restarting,
    /// Crashed too often; retried slowly or by hand.
    Failed,
    /// Refused (incompatible protocol, rejected config, executable
    /// mismatch); restarted only by hand.
    Refused,
    /// Shut down with the server.
    Stopped,
}

/// A plugin's status as `GET /manage/v2/plugin` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub plugin_name: String,
    pub version: Option<String>,
    pub description: Option<String>,
    pub url: Option<String>,
    pub state: State,
    pub pid: Option<u32>,
    pub restarts: u64,
    pub last_error: Option<String>,
    /// Seconds since the current process started serving.
    pub uptime: Option<u64>,
    /// Calls in flight (for the metrics; not part of the API).
    #[serde(skip)]
    pub inflight: usize,
    /// Its log lines dropped past their budget since the server started
    /// (for the metrics; not part of the API).
    #[serde(skip)]
    pub log_dropped: u64,
}

impl Status {
    /// Its state as the API writes it (`running`, `failed`, ...).
    pub fn state_name(&self) -> String {
        match serde_json::to_value(self.state) {
            Ok(serde_json::Value::String(s)) => s,
            _ => format!("{:?}", self.state).to_lowercase(),
        }
    }
}

struct Conn {
    peer: Peer,
    manifest: Manifest,
    pid: Option<u32>,
    started: Instant,
    /// How its process ended, once it has: set by the supervising task
    /// before it stops the process itself, or as soon as it learns the
    /// process ended by itself, so a call in flight can tell which.
    ending: watch::Sender<Option<Ending>>,
    /// Whether it has answered a send (or one event of a batch) without
    /// an error since it started.
    delivered: AtomicBool,
}

/// How a plugin's process ended, as the calls in flight are told.
#[derive(Debug, Clone)]
enum Ending {
    /// The server stopped it: a restart, a reload, shutdown, missed
    /// pings. The calls in flight had no part in it.
    Stopped,
    /// It ended by itself; how (its exit status, when known).
    Exited(String),
}

impl Conn {
    /// How its process ended, waiting up to [`ENDING_WAIT`] for the
    /// supervising task to tell; `None` when it has not.
    async fn ending(&self) -> Option<Ending> {
        let mut told = self.ending.subscribe();
        let ending = tokio::time::timeout(ENDING_WAIT, told.wait_for(Option::is_some)).await;
        ending.ok()?.ok()?.clone()
    }

    /// `result` of a send (or batch) on this connection, remembered when
    /// it delivered.
    fn sent<T>(&self, result: &Result<T, CallError>) {
        if result.is_ok() {
            self.delivered.store(true, Ordering::Relaxed);
        }
    }
}

/// How long a call whose plugin's pipe closed waits to learn how the
/// process ended: longer than the supervising task waits for the exit
/// status ([`EXIT_WAIT`]).
const ENDING_WAIT: Duration = Duration::from_secs(1);

struct Slot {
    cfg: PluginConfig,
    conn: RwLock<Option<Arc<Conn>>>,
    status: Mutex<SlotStatus>,
    inflight: Semaphore,
    /// Taken by a send made alone ([`Supervisor::send_alone`]) while it
    /// waits for every other call to end and is made: one at a time, so
    /// the plugin's other calls go on between them.
    alone: tokio::sync::Mutex<()>,
    /// `max-inflight-bytes`, in KiB: room for the media of calls in flight.
    inflight_bytes: Arc<Semaphore>,
    restart: tokio::sync::Notify,
    /// Woken whenever a new process of the plugin starts serving.
    connected: tokio::sync::Notify,
    first_start: watch::Sender<FirstStart>,
    /// Set to stop this plugin for good (shutdown, or removed by a reload).
    stop: watch::Sender<bool>,
    /// Its supervising task, awaited when it is stopped.
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Its lines in the server's log, within their budget, across its
    /// processes.
    log: Arc<PluginLog>,
}

impl Slot {
    /// Every permit of `max-inflight`: waits until no call is in flight
    /// and keeps new calls out while held (they queue behind it). For a
    /// send made alone, and before the server stops a process that is
    /// not to be cut short (a restart by hand, a reload's retirement).
    /// Bounded by each caller, with the call `timeout`: a call outlives
    /// it only when it is past its own.
    async fn every_call(&self) -> Result<SemaphorePermit<'_>, AcquireError> {
        let all = u32::try_from(self.cfg.max_inflight).unwrap_or(u32::MAX);
        self.inflight.acquire_many(all).await
    }
}

struct SlotStatus {
    state: State,
    restarts: u64,
    last_error: Option<String>,
    manifest: Option<Manifest>,
    /// Its endpoint config schema, when that marks any field secret:
    /// shared, as each delivery's config is checked against it.
    secret_schema: Option<Arc<Value>>,
}

/// Every configured plugin, supervised.
pub struct Supervisor {
    /// By name; replaced as a whole by [`Supervisor::reconfigure`].
    slots: RwLock<BTreeMap<String, Arc<Slot>>>,
    opts: Options,
    host: Arc<HostContext>,
    /// Serializes reconfigurations and shutdown.
    changing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("plugins", &self.slots().keys().collect::<Vec<_>>())
            .finish()
    }
}

/// What a reconfiguration did, by plugin name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconfigured {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Restarted with a changed `config`, `command` or other setting.
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Changed, but their new entry failed its first start (why): their
    /// process before keeps running, under the entry before.
    pub kept: Vec<(String, String)>,
}

impl Supervisor {
    /// Starts supervising `plugins`; callbacks are served with `host`.
    /// Returns at once; see [`Supervisor::wait_started`].
    pub fn start(
        plugins: Vec<PluginConfig>,
        opts: Options,
        host: Arc<HostContext>,
    ) -> Arc<Supervisor> {
        let sup = Arc::new(Supervisor {
            slots: RwLock::new(BTreeMap::new()),
            opts,
            host,
            changing: tokio::sync::Mutex::new(()),
        });
        let weak: std::sync::Weak<dyn PluginCalls> = Arc::downgrade(&sup) as _;
        sup.host.set_plugins(weak);
        let slots = plugins
            .into_iter()
            .map(|cfg| (cfg.name.clone(), sup.launch(cfg)))
            .collect();
        sup.set_slots(slots);
        sup
    }

    /// A slot for `cfg` with its supervising task started.
    fn launch(&self, cfg: PluginConfig) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            inflight: Semaphore::new(cfg.max_inflight),
            alone: tokio::sync::Mutex::new(()),
            inflight_bytes: Arc::new(Semaphore::new(kib(cfg.max_inflight_bytes))),
            conn: RwLock::new(None),
            status: Mutex::new(SlotStatus {
                state: State::Starting,
                restarts: 0,
                last_error: None,
                manifest: None,
                secret_schema: None,
            }),
            restart: tokio::sync::Notify::new(),
            connected: tokio::sync::Notify::new(),
            first_start: watch::channel(FirstStart::Pending).0,
            stop: watch::channel(false).0,
            task: Mutex::new(None),
            log: Arc::new(PluginLog::new(&cfg.name)),
            cfg,
        });
        let task = tokio::spawn(supervise(
            slot.clone(),
            self.opts.clone(),
            self.host.clone(),
            slot.stop.subscribe(),
        ));
        if let Ok(mut t) = slot.task.lock() {
            *t = Some(task);
        }
        slot
    }

    /// Stops a slot's plugin (gracefully, as at shutdown) and waits for
    /// its task to end.
    async fn retire(slot: &Slot) {
        let _ = slot.stop.send(true);
        let task = slot.task.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// A snapshot of the slots (cheap: the map of `Arc`s is cloned).
    fn slots(&self) -> BTreeMap<String, Arc<Slot>> {
        self.slots.read().map(|m| m.clone()).unwrap_or_default()
    }

    fn slot(&self, name: &str) -> Option<Arc<Slot>> {
        self.slots.read().ok().and_then(|m| m.get(name).cloned())
    }

    fn set_slots(&self, slots: BTreeMap<String, Arc<Slot>>) {
        if let Ok(mut m) = self.slots.write() {
            *m = slots;
        }
    }

    /// Waits (at most a start's timeout, [`Options::start_timeout`])
    /// until every plugin's first start attempt has finished, so the first
    /// requests find them running.
    pub async fn wait_started(&self) {
        let slots: Vec<Arc<Slot>> = self.slots().into_values().collect();
        let limit = self.opts.start_timeout();
        let _ = tokio::time::timeout(limit, first_starts(&slots)).await;
    }

    /// Applies a new plugin list (a reload): plugins no longer listed are
    /// stopped, new ones started, and those whose configuration changed
    /// are started anew and take over once their first start is done
    /// (waited for to its end where the old process serves, else bounded
    /// by a start's timeout), then the old process is stopped; the others
    /// keep running untouched. Calls during the change find either the
    /// old or the new process; one that fails is retried like any failed
    /// delivery. A changed plugin whose new entry failed its first start
    /// (its command cannot run, its config is refused, it crashed) while
    /// its old process serves keeps that process, and the new one is
    /// stopped ([`Reconfigured::kept`]): a mistake in a reload does not
    /// take a working plugin out of service.
    pub async fn reconfigure(&self, plugins: Vec<PluginConfig>) -> Reconfigured {
        let _changing = self.changing.lock().await;
        let old = self.slots();
        let mut done = Reconfigured::default();
        let mut next = BTreeMap::new();
        let mut fresh = Vec::new();
        for cfg in plugins {
            let name = cfg.name.clone();
            match old.get(&name) {
                Some(slot) if slot.cfg == cfg => {
                    done.unchanged.push(name.clone());
                    next.insert(name, slot.clone());
                }
                existing => {
                    if existing.is_some() {
                        done.changed.push(name.clone());
                    } else {
                        done.added.push(name.clone());
                    }
                    let slot = self.launch(cfg);
                    fresh.push(slot.clone());
                    next.insert(name, slot);
                }
            }
        }
        // A changed plugin whose old process serves is waited for to the
        // end of its first start (each of its steps is bounded by a
        // start's timeout): it takes over only once that start is known
        // to have run. The rest are waited for as at the server's start.
        let (replacing, adding): (Vec<Arc<Slot>>, Vec<Arc<Slot>>) =
            fresh.into_iter().partition(|slot| {
                old.get(&slot.cfg.name)
                    .is_some_and(|was| was.status.lock().is_ok_and(|s| s.state == State::Running))
            });
        let limit = self.opts.start_timeout();
        let _ = tokio::join!(
            first_starts(&replacing),
            tokio::time::timeout(limit, first_starts(&adding))
        );
        let mut not_taken = Vec::new();
        for name in &done.changed {
            let (Some(new), Some(was)) = (next.get(name), old.get(name)) else {
                continue;
            };
            let failed = match &*new.first_start.borrow() {
                FirstStart::Failed(why) => Some(why.clone()),
                FirstStart::Pending | FirstStart::Ran => None,
            };
            let serving = was.status.lock().is_ok_and(|s| s.state == State::Running);
            if let Some(why) = failed
                && serving
            {
                done.kept.push((name.clone(), why));
                not_taken.extend(next.insert(name.clone(), was.clone()));
            }
        }
        done.changed
            .retain(|n| !done.kept.iter().any(|(kept, _)| kept == n));
        for slot in &not_taken {
            Supervisor::retire(slot).await;
        }
        self.set_slots(next.clone());
        let mut gone = Vec::new();
        for (name, slot) in &old {
            let kept = next.get(name).is_some_and(|n| Arc::ptr_eq(n, slot));
            if !kept {
                if !next.contains_key(name) {
                    done.removed.push(name.clone());
                }
                gone.push(slot);
            }
        }
        // No new call reaches them now; the calls in flight end first
        // (each within the call `timeout`), so a delivery they were
        // making is not cut short and made again.
        let drained = gone
            .iter()
            .map(|slot| tokio::time::timeout(self.opts.timeout, slot.every_call()));
        futures_util::future::join_all(drained).await;
        for slot in gone {
            Supervisor::retire(slot).await;
        }
        done
    }

    /// Waits for room for `bytes` in plugin `name`'s byte budget
    /// (`max-inflight-bytes`) and holds it until the permit is dropped. A
    /// call larger than the whole budget takes all of it. `None` when no
    /// such plugin is configured (its call will say so).
    pub async fn reserve_bytes(
        &self,
        name: &str,
        bytes: usize,
    ) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let slot = self.slot(name)?;
        let budget = kib(slot.cfg.max_inflight_bytes);
        let want = kib(bytes).min(budget);
        slot.inflight_bytes
            .clone()
            .acquire_many_owned(u32::try_from(want).unwrap_or(u32::MAX))
            .await
            .ok()
    }

    /// Whether a plugin of that name is configured.
    pub fn is_configured(&self, name: &str) -> bool {
        self.slot(name).is_some()
    }

    /// The status of every plugin, by name.
    pub fn list(&self) -> Vec<Status> {
        self.slots().values().map(|s| status_of(s)).collect()
    }

    /// The JSON Schema of a plugin's endpoint config, as its running
    /// process announced it in the handshake (`None` when the plugin is
    /// unknown, not started yet, or has no schema).
    pub fn config_schema(&self, name: &str) -> Option<serde_json::Value> {
        let slot = self.slot(name)?;
        let status = slot.status.lock().ok()?;
        status.manifest.as_ref()?.config_schema.clone()
    }

    /// Remembers the secrets of an endpoint `config` of plugin `name` (the
    /// fields its config schema marks `writeOnly`), so logs and reports
    /// leave them out.
    pub fn register_secrets(&self, name: &str, config: &Value) {
        let schema = self
            .slot(name)
            .and_then(|s| s.status.lock().ok()?.secret_schema.clone());
        if let Some(schema) = schema {
            crate::secrets::register(crate::secrets::of(&schema, config));
        }
    }

    /// Restarts a plugin (also one that failed or was refused): at once,
    /// but for the calls in flight, which end first (each within the call
    /// `timeout`).
    pub fn restart(&self, name: &str) -> Result<(), CallError> {
        let slot = self
            .slot(name)
            .ok_or_else(|| CallError::NotConfigured(name.to_string()))?;
        slot.restart.notify_one();
        Ok(())
    }

    /// Calls `method` of plugin `name` with named `params`. A method the
    /// plugin's manifest does not list is skipped (`Ok(Value::Null)`),
    /// except `send`, `hello` and `ping`.
    pub async fn call(
        &self,
        name: &str,
        method: &str,
        params: impl ToRpcParams + Send,
    ) -> Result<Value, CallError> {
        let slot = self
            .slot(name)
            .ok_or_else(|| CallError::NotConfigured(name.to_string()))?;
        let not_made = |why: &str| CallError::NotMade(name.to_string(), why.to_string());
        let permit = tokio::time::timeout(self.opts.timeout, slot.inflight.acquire())
            .await
            .map_err(|_| not_made("too many calls in flight"))?
            .map_err(|_| not_made("shutting down"))?;
        let conn = Supervisor::connection(name, &slot).await?;
        if protocol::OPTIONAL_METHODS.contains(&method) && !conn.manifest.offers(method) {
            return Ok(Value::Null);
        }
        let r = conn.peer.client().request::<Value, _>(method, params).await;
        drop(permit);
        let r = match r {
            Ok(v) => Ok(v),
            Err(e) => Err(call_error(name, method, &conn, e).await),
        };
        if method == "send" {
            conn.sent(&r);
        }
        r
    }

    /// Sends one event (`send`'s params) through plugin `name` with
    /// nothing else in flight on it: the send waits for every call in
    /// flight to end, and the calls that come meanwhile wait for it (at
    /// most one such send at a time, the plugin's other calls going on
    /// between them). Made for a delivery that was in flight when its
    /// plugin ended: when the plugin ends again now, having delivered
    /// other events since it started, the event is the cause
    /// ([`CallError::Ended`] with `cause`).
    ///
    /// Each wait is bounded by the call `timeout`: the turn, the calls in
    /// flight ending, and the send itself.
    pub async fn send_alone(&self, name: &str, params: RawParams) -> Result<Value, CallError> {
        let slot = self
            .slot(name)
            .ok_or_else(|| CallError::NotConfigured(name.to_string()))?;
        let not_made = |why: &str| CallError::NotMade(name.to_string(), why.to_string());
        let turn = tokio::time::timeout(self.opts.timeout, slot.alone.lock())
            .await
            .map_err(|_| not_made("other events wait to be sent to it alone"))?;
        let permits = tokio::time::timeout(self.opts.timeout, slot.every_call())
            .await
            .map_err(|_| not_made("its calls in flight did not end in time to send alone"))?
            .map_err(|_| not_made("shutting down"))?;
        let conn = Supervisor::connection(name, &slot).await?;
        let r = conn.peer.client().request::<Value, _>("send", params).await;
        drop(permits);
        drop(turn);
        let r = match r {
            Ok(v) => Ok(v),
            Err(e) => match call_error(name, "send", &conn, e).await {
                CallError::Ended { plugin, why, .. } => Err(CallError::Ended {
                    plugin,
                    why,
                    cause: conn.delivered.load(Ordering::Relaxed),
                }),
                e => Err(e),
            },
        };
        conn.sent(&r);
        r
    }

    /// The most events [`Supervisor::send_batch`] takes for plugin `name`
    /// at once: 0 when it is not running or does not offer `send_batch`,
    /// else its `max-inflight` (a batch holds one call in flight per
    /// event).
    pub fn batch_limit(&self, name: &str) -> usize {
        let Some(slot) = self.slot(name) else {
            return 0;
        };
        let offers = slot
            .conn
            .read()
            .ok()
            .and_then(|c| c.clone())
            .is_some_and(|c| c.manifest.offers("send_batch"));
        if offers { slot.cfg.max_inflight } else { 0 }
    }

    /// Delivers several events through plugin `name` in `send_batch`
    /// calls (see [`Supervisor::batch_limit`]); each event's result is its
    /// own, as [`Supervisor::call`] of `send` would give it.
    ///
    /// A batch holds one call in flight per event, taken as a single call
    /// takes its own: it waits for one, then takes as many more as are
    /// free at that moment, never waiting for many at once (a waiter for
    /// many would hold up every single call behind it, a plugin's own
    /// nested `call_plugin` included). Events beyond the room go in the
    /// next call. A plugin that stopped offering the method (a restart
    /// into another version) gets them as concurrent `send` calls.
    pub async fn send_batch(
        &self,
        name: &str,
        events: Vec<Box<RawValue>>,
    ) -> Vec<Result<Value, CallError>> {
        let mut results = Vec::with_capacity(events.len());
        let mut rest = events.into_iter().peekable();
        while rest.peek().is_some() {
            let Some(slot) = self.slot(name) else {
                let e = CallError::NotConfigured(name.to_string());
                results.extend(rest.map(|_| Err(e.clone())));
                break;
            };
            let not_made = |why: &str| CallError::NotMade(name.to_string(), why.to_string());
            let first = match tokio::time::timeout(self.opts.timeout, slot.inflight.acquire()).await
            {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => {
                    let e = not_made("shutting down");
                    results.extend(rest.map(|_| Err(e.clone())));
                    break;
                }
                Err(_) => {
                    let e = not_made("too many calls in flight");
                    results.extend(rest.map(|_| Err(e.clone())));
                    break;
                }
            };
            let mut held = vec![first];
            while held.len() < rest.len() {
                match slot.inflight.try_acquire() {
                    Ok(p) => held.push(p),
                    Err(_) => break,
                }
            }
            let chunk: Vec<_> = rest.by_ref().take(held.len()).collect();
            let conn = match Supervisor::connection(name, &slot).await {
                Ok(c) => c,
                Err(e) => {
                    results.extend(chunk.iter().map(|_| Err(e.clone())));
                    continue;
                }
            };
            if !conn.manifest.offers("send_batch") {
                // A plugin that knows only `send` (or whose successor no
                // longer offers `send_batch`): the chunk's sends at once,
                // as the batch would have been, each taking back its
                // permit.
                drop(held);
                let sends = chunk
                    .into_iter()
                    .map(|e| self.call(name, "send", RawParams(e)));
                results.extend(futures_util::future::join_all(sends).await);
                continue;
            }
            results.extend(Supervisor::batch_once(name, &conn, chunk).await);
        }
        results
    }

    /// One `send_batch` call of `events` on `conn`.
    async fn batch_once(
        name: &str,
        conn: &Conn,
        events: Vec<Box<RawValue>>,
    ) -> Vec<Result<Value, CallError>> {
        #[derive(Serialize)]
        struct Batch<'a> {
            events: &'a [Box<RawValue>],
        }
        let n = events.len();
        let all = |e: CallError| (0..n).map(|_| Err(e.clone())).collect();
        let params = match serde_json::value::to_raw_value(&Batch { events: &events }) {
            Ok(p) => RawParams(p),
            Err(e) => return all(CallError::Failed(format!("cannot encode the batch: {e}"))),
        };
        drop(events);
        match conn
            .peer
            .client()
            .request::<Value, _>("send_batch", params)
            .await
        {
            Ok(Value::Array(outcomes)) if outcomes.len() == n => {
                let outcomes: Vec<_> = outcomes
                    .into_iter()
                    .map(|o| batch_outcome(name, o))
                    .collect();
                if let Some(delivered) = outcomes.iter().find(|o| o.is_ok()) {
                    conn.sent(delivered);
                }
                outcomes
            }
            Ok(Value::Array(outcomes)) => all(CallError::Failed(format!(
                "send_batch answered {} outcomes for {n} events",
                outcomes.len()
            ))),
            Ok(other) => all(CallError::Failed(format!(
                "send_batch answered {}, not a list of one outcome per event",
                bounded(other.to_string())
            ))),
            Err(e) => all(call_error(name, "send_batch", conn, e).await),
        }
    }

    /// The plugin's connection, once it runs (waiting [`START_WAIT`] for
    /// one starting); else why not, as the call's error.
    async fn connection(name: &str, slot: &Slot) -> Result<Arc<Conn>, CallError> {
        Supervisor::running(slot).await.map_err(|state| {
            let said = match state {
                // Its process ended a moment ago, and the next has not
                // come in time.
                State::Running => "restarting".to_string(),
                s => format!("{s:?}").to_lowercase(),
            };
            match state {
                State::Failed | State::Refused => CallError::NotRunning(name.to_string(), said),
                _ => CallError::NotMade(name.to_string(), format!("it is {said}")),
            }
        })
    }

    /// The plugin's running process, never one whose connection has
    /// closed: a process that ended stays the slot's for a moment, until
    /// its task sees it end, and a call on it would fail at once (a send
    /// made alone would be blamed for an end that came before it). One
    /// that is starting or restarting, or has just ended, is waited for,
    /// up to [`START_WAIT`] (a restart takes milliseconds). Otherwise the
    /// error is the plugin's state.
    async fn running(slot: &Slot) -> Result<Arc<Conn>, State> {
        let current = || slot.conn.read().ok().and_then(|c| c.clone());
        // The common case, a running plugin, registers no waiter.
        if let Some(conn) = current().filter(|c| c.peer.is_open()) {
            return Ok(conn);
        }
        let deadline = Instant::now() + START_WAIT;
        loop {
            let connected = slot.connected.notified();
            let mut connected = std::pin::pin!(connected);
            connected.as_mut().enable();
            let conn = current();
            if let Some(conn) = conn.as_ref().filter(|c| c.peer.is_open()) {
                return Ok(conn.clone());
            }
            let state = slot.status.lock().map_or(State::Stopped, |s| s.state);
            let ended = conn.is_some();
            let starting = ended || matches!(state, State::Starting | State::Restarting);
            if !starting || tokio::time::timeout_at(deadline, connected).await.is_err() {
                return Err(slot.status.lock().map_or(state, |s| s.state));
            }
        }
    }

    /// Asks plugin `name` to check an endpoint config.
    ///
    /// The protocol's answers are `null` or error -32001; a plugin that
    /// answers `false` or a text (as validators in other languages do)
    /// refuses the config too, rather than having it taken.
    pub async fn validate_config(&self, name: &str, config: &Value) -> Result<(), CallError> {
        let mut p = serde_json::Map::new();
        p.insert("config".into(), config.clone());
        match self.call(name, "validate_config", p).await? {
            Value::Bool(false) => Err(rejected(format!(
                "plugin {name} answered false: it does not take this config"
            ))),
            Value::String(why) => Err(rejected(why)),
            _ => Ok(()),
        }
    }

    /// Runs every running plugin's `cleanup`, logging failures.
    pub async fn cleanup(&self) {
        for name in self.slots().keys() {
            if let Err(e) = self.call(name, "cleanup", serde_json::Map::new()).await {
                tracing::warn!(plugin = %name, error = %e, "plugin cleanup failed");
            }
        }
    }

    /// Stops every plugin: `shutdown` notification, stdin closed, a grace
    /// period, then SIGTERM, then SIGKILL. Returns when all have exited.
    pub async fn shutdown(&self) {
        let _changing = self.changing.lock().await;
        let slots = self.slots();
        for slot in slots.values() {
            let _ = slot.stop.send(true);
        }
        for slot in slots.values() {
            Supervisor::retire(slot).await;
        }
    }

    /// Kills every running plugin with all it started (SIGKILL to its
    /// process group), waiting for nothing: for a server that stops at
    /// once. What they were making is made again.
    pub fn kill_now(&self) {
        for pid in self.list().into_iter().filter_map(|s| s.pid) {
            let group = i32::try_from(pid)
                .ok()
                .and_then(rustix::process::Pid::from_raw);
            if let Some(group) = group {
                let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
            }
        }
    }
}

/// Bytes as semaphore permits of 1 KiB (at least one).
fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024).clamp(1, Semaphore::MAX_PERMITS)
}

/// A failed call to plugin `name` as a [`CallError`]. A call cut short
/// by the connection's end learns how the process ended: by itself is
/// [`CallError::Ended`].
async fn call_error(name: &str, method: &str, conn: &Conn, e: ClientError) -> CallError {
    let unavailable = |why: String| CallError::Unavailable(name.to_string(), why);
    match e {
        ClientError::Call(obj) if obj.code() == codes::REJECTED => {
            rejected(obj.message().to_string())
        }
        // The plugin had no room for the call: it did not do the work.
        ClientError::Call(obj) if obj.code() == codes::BUSY => {
            CallError::NotMade(name.to_string(), bounded(obj.message().to_string()))
        }
        ClientError::Call(obj) if obj.code() == jsonrpsee::types::error::METHOD_NOT_FOUND_CODE => {
            CallError::Rejected(format!("plugin {name} has no method {method}"))
        }
        ClientError::Call(obj) => {
            let data = obj.data().and_then(|d| serde_json::from_str(d.get()).ok());
            failed(obj.message().to_string(), data.as_ref())
        }
        ClientError::RequestTimeout => unavailable(format!("{method} timed out")),
        other => match conn.peer.close_reason() {
            Some(reason) => match conn.ending().await {
                Some(Ending::Exited(why)) => CallError::Ended {
                    plugin: name.to_string(),
                    why,
                    cause: false,
                },
                Some(Ending::Stopped) | None => {
                    unavailable(format!("connection closed during {method}: {reason}"))
                }
            },
            None => unavailable(other.to_string()),
        },
    }
}

/// One member of a `send_batch` answer as that event's result. `{}` is
/// delivered, and so are `null` and `true` (what a plugin in another
/// language writes for "no error"); `{"error": {code, message[, data]}}`
/// is the error `send` would have answered, and an error that is only a
/// text is a failure with that text. Anything else fails the event
/// quoting it, so the plugin's author sees what was wrong.
fn batch_outcome(name: &str, outcome: Value) -> Result<Value, CallError> {
    let error = match outcome {
        Value::Null | Value::Bool(true) => return Ok(Value::Null),
        Value::Object(mut o) => match o.remove("error") {
            None | Some(Value::Null) => return Ok(Value::Null),
            Some(e) => e,
        },
        other => {
            let text = bounded(other.to_string());
            return Err(CallError::Failed(format!(
                "send_batch answered {text} for this event, not {{}} or {{\"error\": ...}}"
            )));
        }
    };
    match protocol::OutcomeError::deserialize(&error) {
        Ok(e) if e.code == codes::REJECTED => Err(rejected(e.message)),
        Ok(e) if e.code == codes::BUSY => {
            Err(CallError::NotMade(name.to_string(), bounded(e.message)))
        }
        Ok(e) => Err(failed(e.message, e.data.as_ref())),
        Err(_) => Err(failed(
            error
                .as_str()
                .map_or_else(|| format!("malformed error: {error}"), str::to_string),
            None,
        )),
    }
}

/// A plugin's failure `message`, with the wait its error `data` asks for
/// when it asks for one.
fn failed(message: String, data: Option<&Value>) -> CallError {
    let message = bounded(message);
    match protocol::retry_after(data) {
        Some(wait) => CallError::Later(message, wait),
        None => CallError::Failed(message),
    }
}

/// A plugin's refusal, its words [`bounded`].
fn rejected(message: String) -> CallError {
    CallError::Rejected(bounded(message))
}

/// The most of a plugin's error message the server keeps, in bytes.
pub const ERROR_MAX: usize = 4096;

/// A plugin's error message as the server keeps and shows it (a
/// delivery's `last_error`, stored on every try; a 400's text): cut at
/// [`ERROR_MAX`] bytes, saying how much was left out. A plugin that put
/// a whole answer page or a list of thousands in its error made every
/// try store and every event listing send all of it.
fn bounded(mut message: String) -> String {
    if message.len() <= ERROR_MAX {
        return message;
    }
    let mut end = ERROR_MAX;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let more = message.len() - end;
    message.truncate(end);
    message.push_str(&format!("\u{2026} ({more} bytes more)"));
    message
}

/// Waits until each slot's first start attempt has finished.
async fn first_starts(slots: &[Arc<Slot>]) {
    for slot in slots {
        let mut rx = slot.first_start.subscribe();
        let _ = rx.wait_for(|f| *f != FirstStart::Pending).await;
    }
}

/// How a plugin's first start attempt went.
#[derive(Debug, Clone, PartialEq, Eq)]
enum FirstStart {
    /// Not ended yet.
    Pending,
    /// The plugin ran.
    Ran,
    /// It did not run, and why (it may run at a later attempt).
    Failed(String),
}

fn status_of(slot: &Slot) -> Status {
    let conn = slot.conn.read().ok().and_then(|c| c.clone());
    let st = slot.status.lock();
    let (state, restarts, last_error, manifest) = match &st {
        Ok(s) => (
            s.state,
            s.restarts,
            s.last_error.clone(),
            s.manifest.clone(),
        ),
        Err(_) => (State::Failed, 0, Some("status unavailable".into()), None),
    };
    let manifest = manifest.unwrap_or_default();
    Status {
        plugin_name: slot.cfg.name.clone(),
        version: manifest.version,
        description: manifest.description,
        url: manifest.url,
        state,
        pid: conn.as_ref().and_then(|c| c.pid),
        restarts,
        last_error,
        uptime: conn.map(|c| c.started.elapsed().as_secs()),
        inflight: slot
            .cfg
            .max_inflight
            .saturating_sub(slot.inflight.available_permits()),
        log_dropped: slot.log.dropped_total(),
    }
}

fn set_state(slot: &Slot, state: State, error: Option<String>) {
    if let Ok(mut s) = slot.status.lock() {
        s.state = state;
        if let Some(e) = error {
            s.last_error = Some(crate::secrets::scrub(&e).into_owned());
        }
    }
}

/// Why starting a plugin did not give a running plugin.
enum StartError {
    /// Permanent until restarted by hand.
    Refused(String),
    /// A crash: restart with backoff.
    Crashed(String),
}

/// Why a running plugin stopped running.
enum Ended {
    Crashed(String),
    RestartRequested,
    Shutdown,
}

async fn supervise(
    slot: Arc<Slot>,
    opts: Options,
    host: Arc<HostContext>,
    mut shutdown: watch::Receiver<bool>,
) {
    let name = slot.cfg.name.clone();
    let mut backoff = Backoff::new(opts.backoff);
    // Failed or refused since it last ran: its deliveries were put off.
    let mut out_of_service = false;
    loop {
        if *shutdown.borrow() {
            break;
        }
        set_state(&slot, State::Starting, None);
        let started = start_once(&slot, &opts, &host).await;
        let first = match &started {
            Ok(_) => FirstStart::Ran,
            Err(StartError::Refused(why) | StartError::Crashed(why)) => {
                FirstStart::Failed(why.clone())
            }
        };
        slot.first_start.send_if_modified(|f| {
            let pending = *f == FirstStart::Pending;
            if pending {
                *f = first;
            }
            pending
        });
        let after = match started {
            Ok((conn, child)) => {
                let run_started = conn.started;
                if let Ok(mut c) = slot.conn.write() {
                    *c = Some(conn.clone());
                }
                if let Ok(mut s) = slot.status.lock() {
                    s.state = State::Running;
                    s.manifest = Some(conn.manifest.clone());
                    s.secret_schema = conn
                        .manifest
                        .config_schema
                        .clone()
                        .filter(crate::secrets::has_secrets)
                        .map(Arc::new);
                }
                slot.connected.notify_waiters();
                match conn.pid {
                    Some(pid) => tracing::info!(plugin = %name, pid, "plugin running"),
                    None => tracing::info!(plugin = %name, "plugin running"),
                }
                if std::mem::take(&mut out_of_service) {
                    tell_back_in_service(&opts, &name);
                }
                let ended = run_until_end(&slot, &opts, conn, child, &mut shutdown).await;
                match ended {
                    Ended::Shutdown => break,
                    Ended::RestartRequested => {
                        tracing::info!(plugin = %name, "plugin restart requested");
                        backoff.reset();
                        continue;
                    }
                    Ended::Crashed(why) => {
                        tracing::warn!(plugin = %name, "plugin stopped: {why}");
                        crash_delay(&slot, &mut backoff, Some(run_started), why)
                    }
                }
            }
            Err(StartError::Refused(why)) => {
                tracing::error!(plugin = %name, "plugin refused and kept out: {why}");
                set_state(&slot, State::Refused, Some(why));
                out_of_service = true;
                tokio::select! {
                    _ = slot.restart.notified() => { backoff.reset(); continue; }
                    _ = shutdown.wait_for(|s| *s) => break,
                }
            }
            Err(StartError::Crashed(why)) => {
                tracing::warn!(plugin = %name, "plugin failed to start: {why}");
                crash_delay(&slot, &mut backoff, None, why)
            }
        };
        let delay = match after {
            AfterCrash::Restart(d) => d,
            AfterCrash::Failed(d) => {
                out_of_service = true;
                d
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = slot.restart.notified() => backoff.reset(),
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
    set_state(&slot, State::Stopped, None);
}

/// Tells whoever [`Options::back_in_service`] names that plugin `name`
/// runs again. Without room in its queue (what it was told before is
/// still being done), it is not told: the deliveries wait for their next
/// look, as they would have anyway.
fn tell_back_in_service(opts: &Options, name: &str) {
    if let Some(tell) = &opts.back_in_service
        && tell.try_send(name.to_string()).is_err()
    {
        tracing::debug!(plugin = %name, "too many plugins back in service at once to tell");
    }
}

/// Counts a crash of `slot`'s plugin and marks it restarting, or failed
/// when it crashes too often; what to do next.
fn crash_delay(
    slot: &Slot,
    backoff: &mut Backoff,
    started: Option<Instant>,
    why: String,
) -> AfterCrash {
    if let Ok(mut s) = slot.status.lock() {
        s.restarts += 1;
        s.last_error = Some(crate::secrets::scrub(&why).into_owned());
    }
    let after = backoff.crashed(started);
    match after {
        AfterCrash::Restart(_) => set_state(slot, State::Restarting, None),
        AfterCrash::Failed(d) => {
            tracing::error!(plugin = %slot.cfg.name, "plugin crashes too often; marked failed, retrying in {d:?}");
            set_state(slot, State::Failed, None);
        }
    }
    after
}

async fn run_until_end(
    slot: &Slot,
    opts: &Options,
    conn: Arc<Conn>,
    mut child: Child,
    shutdown: &mut watch::Receiver<bool>,
) -> Ended {
    let health = async {
        let mut told = false;
        loop {
            tokio::time::sleep(opts.health_interval).await;
            let ping = tokio::time::timeout(opts.timeout, conn.peer.client().ping()).await;
            match ping {
                Ok(Ok(())) => {}
                // Any answer shows it alive, an error too (a hand-written
                // plugin without `ping` answers "method not found"): said
                // once, not taken for a hang.
                Ok(Err(ClientError::Call(e))) => {
                    if !told {
                        told = true;
                        tracing::warn!(
                            plugin = %slot.cfg.name,
                            "the plugin answers ping with error {}: {}; taken as alive, as any \
                             answer is, but ping should answer null",
                            e.code(),
                            e.message()
                        );
                    }
                }
                Ok(Err(e)) => return format!("health ping failed: {e}"),
                Err(_) => return "health ping was not answered in time".to_string(),
            }
        }
    };
    let sandbox = &slot.cfg.sandbox;
    // The calls in flight are told how it ended (`ending`) before the
    // server stops it, or as soon as it ended by itself.
    let ended = tokio::select! {
        status = child.wait() => {
            let why = match status {
                Ok(s) => exit_reason(s, sandbox),
                Err(e) => format!("cannot wait for the process: {e}"),
            };
            conn.ending.send_replace(Some(Ending::Exited(why.clone())));
            Ended::Crashed(why)
        }
        reason = conn.peer.closed() => {
            // A process that died closes its pipes first: say how it died.
            let status = tokio::time::timeout(EXIT_WAIT, child.wait()).await;
            let (told, why) = match status {
                Ok(Ok(s)) => {
                    let how = exit_reason(s, sandbox);
                    (how.clone(), format!("connection closed: {reason}; {how}"))
                }
                _ => {
                    let why = format!("connection closed: {reason}");
                    (why.clone(), why)
                }
            };
            conn.ending.send_replace(Some(Ending::Exited(told)));
            Ended::Crashed(why)
        }
        why = health => Ended::Crashed(why),
        _ = slot.restart.notified() => Ended::RestartRequested,
        // (No `watch::Ref` in the select's output: a branch awaits.)
        _ = async { shutdown.wait_for(|s| *s).await.is_ok() } => Ended::Shutdown,
    };
    // A restart by hand lets the calls in flight end first (each within
    // the call `timeout`), so a delivery being made is not cut short and
    // made again; the calls that come meanwhile wait, and then find the
    // process gone and wait for the next. (A reload's retirement and a
    // stop have let them end already.)
    let quiet = match ended {
        Ended::RestartRequested => tokio::time::timeout(opts.timeout, slot.every_call())
            .await
            .ok()
            .and_then(Result::ok),
        _ => None,
    };
    // Ended another way, the process is stopped by the server (below).
    conn.ending.send_if_modified(|e| {
        let untold = e.is_none();
        if untold {
            *e = Some(Ending::Stopped);
        }
        untold
    });
    // Calls in flight fail now: drop the connection (closing the pipes).
    let next = match ended {
        Ended::Shutdown => State::Stopped,
        Ended::RestartRequested => State::Starting,
        Ended::Crashed(_) => State::Restarting,
    };
    set_state(slot, next, None);
    if let Ok(mut c) = slot.conn.write() {
        *c = None;
    }
    drop(quiet);
    if matches!(ended, Ended::Shutdown) {
        let _ = conn
            .peer
            .notify(protocol::SHUTDOWN_NOTIFICATION, Value::Null)
            .await;
    }
    drop(conn);
    stop_child(
        &mut child,
        opts.shutdown_grace,
        matches!(ended, Ended::Shutdown),
    )
    .await;
    ended
}

/// Ends a child: after a graceful request waits `grace` for it to exit,
/// then SIGTERM to its process group, then SIGKILL.
async fn stop_child(child: &mut Child, grace: Duration, graceful: bool) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let group = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32));
    if graceful {
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
        if let Some(pid) = group {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::TERM);
            if tokio::time::timeout(Duration::from_secs(2), child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
    }
    // A misbehaving plugin (or one that ignored SIGTERM) is killed with
    // everything it started.
    if let Some(pid) = group {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// The executable for a plugin: its `command`, else `roboger-plugin-NAME`
/// (`roboger-plugin-python` for a Python module) next to the server
/// binary or in `../lib/roboger` from it, else on PATH.
pub fn executable(cfg: &PluginConfig) -> PathBuf {
    if let Some(c) = &cfg.command {
        return c.clone();
    }
    let file = match cfg.python {
        Some(_) => "roboger-plugin-python".to_string(),
        None => format!("roboger-plugin-{}", cfg.name),
    };
    crate::config::installed_plugin(&file).unwrap_or_else(|| PathBuf::from(file))
}

/// What keeps plugin `cfg`'s executable from being run, as far as can
/// be told without running it (`check-config`): not found (on `PATH`,
/// for a bare name), not executable, or not the one its `sha256` pins.
pub fn executable_problem(cfg: &PluginConfig) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let exe = executable(cfg);
    let Some(path) = resolve_on_path(&exe) else {
        let bare = exe.components().count() == 1;
        return Some(match (&cfg.command, bare) {
            (Some(_), false) => format!("its command {} is not a file", exe.display()),
            (Some(_), true) => format!("its command {} is not on PATH", exe.display()),
            (None, _) => format!(
                "{} is installed neither beside the server, nor in ../lib/roboger from it, \
                 nor on PATH: give the plugin its command",
                exe.display()
            ),
        });
    };
    let runs = std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
    if !runs {
        return Some(format!("{} is not executable", path.display()));
    }
    let want = cfg.sha256.as_ref()?;
    match std::fs::read(&path) {
        Ok(bytes) => pin_broken(&path, &sha256_hex(&bytes), want),
        Err(e) => Some(format!("cannot read {}: {e}", path.display())),
    }
}

/// Why an executable whose content hashes to `got` is refused under a
/// pin of `want` (`None`: it is the pinned one).
fn pin_broken(path: &std::path::Path, got: &str, want: &str) -> Option<String> {
    (got != want).then(|| {
        format!(
            "executable {} has SHA-256 {got}, but the config pins {want}",
            path.display()
        )
    })
}

/// Taken out of a plugin's environment: secrets, and systemd's notify
/// variables (the server alone speaks for the unit).
const SECRET_ENV: [&str; 6] = [
    "ROBOGER_MASTERKEY",
    "ROBOGER_DB",
    "ROBOGER_CONFIG",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

async fn start_once(
    slot: &Arc<Slot>,
    opts: &Options,
    host: &Arc<HostContext>,
) -> Result<(Arc<Conn>, Child), StartError> {
    let cfg = &slot.cfg;
    let exe = executable(cfg);
    if let Some(want) = &cfg.sha256 {
        let path = resolve_on_path(&exe).ok_or_else(|| {
            StartError::Refused(format!("executable {} not found", exe.display()))
        })?;
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| StartError::Refused(format!("cannot read {}: {e}", path.display())))?;
        if let Some(why) = pin_broken(&path, &sha256_hex(&bytes), want) {
            return Err(StartError::Refused(why));
        }
    }
    let args: Vec<String> = cfg.args.iter().chain(&cfg.python).cloned().collect();
    let mut cmd = match &opts.launcher {
        Some(launcher) => {
            let mut c = Command::new(launcher);
            c.args(crate::sandbox::command_line(&cfg.sandbox, &exe, &args));
            c
        }
        None => {
            let mut c = Command::new(&exe);
            c.args(&args);
            c
        }
    };
    // Its own directory: where it runs and keeps temporary files (the only
    // place Landlock lets it write, with its `writable` paths).
    let dir = &cfg.sandbox.data_dir;
    if !dir.as_os_str().is_empty() {
        create_plugin_dir(dir)
            .map_err(|e| StartError::Crashed(format!("cannot create {}: {e}", dir.display())))?;
        cmd.current_dir(dir)
            .env("TMPDIR", dir)
            .env("ROBOGER_PLUGIN_DIR", dir);
    }
    for k in SECRET_ENV {
        cmd.env_remove(k);
    }
    cmd.envs(&cfg.env)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| StartError::Crashed(format!("cannot start {}: {e}", exe.display())))?;
    let pid = child.id();
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(StartError::Crashed("child has no pipes".into()));
    };
    // The last ERROR line it wrote: why it ended, when it ends at start.
    let said_error: Arc<Mutex<Option<String>>> = Arc::default();
    let said = said_error.clone();
    let log = slot.log.clone();
    let stderr_read = tokio::spawn(async move {
        read_stderr(stderr, |line| {
            let (level, text) = split_level(line);
            if level == tracing::Level::ERROR
                && let Ok(mut said) = said.lock()
            {
                *said = Some(text.to_string());
            }
            log.write(level, text);
        })
        .await;
        log.process_ended();
    });
    let name = cfg.name.clone();
    // A notification of a method the server does not have (`logg` for
    // `log`) is dropped: said at WARN the first time in a run, so its
    // author hears of it without a flood, then at debug.
    let told = AtomicBool::new(false);
    let on_notification: NotificationHandler = Arc::new(move |method, params| {
        if told.swap(true, Ordering::Relaxed) {
            tracing::debug!(plugin = %name, method, %params, "notification of an unknown method dropped");
        } else {
            tracing::warn!(
                plugin = %name,
                %params,
                "notification dropped: the server has no method {method} (the protocol's \
                 notifications are `log`); later ones like it are logged at debug"
            );
        }
    });
    let handler = HostHandler::new(cfg.name.clone(), cfg.db, slot.log.clone(), host.clone());
    // What the peer itself says of the plugin's messages names it.
    let span = tracing::error_span!("peer", plugin = %cfg.name);
    let peer = span.in_scope(|| {
        Peer::start(
            stdout,
            stdin,
            PeerOptions {
                max_line: opts.max_line,
                call_timeout: opts.timeout,
                max_outgoing: cfg.max_inflight + 2,
                max_incoming: cfg.max_inflight.max(16),
            },
            move |_client| {
                use roboger_plugin_sdk::protocol::HostApiServer;
                handler.into_rpc().into()
            },
            on_notification,
        )
    });
    // The start's calls have the start's timeout, which bounds each.
    let starting = peer.client().within(opts.start_timeout());
    let hello = starting
        .hello(
            env!("CARGO_PKG_VERSION").to_string(),
            protocol::PROTOCOL_VERSION.to_string(),
            Some(cfg.egress.clone()),
        )
        .await;
    // A manifest that does not parse will not parse after a restart
    // either: refused, like one of another protocol version.
    if let Err(ClientError::ParseError(e)) = &hello {
        return Err(StartError::Refused(format!(
            "its manifest (the answer to hello) is not valid: {}",
            without_position(e)
        )));
    }
    let hello = hello.map_err(|e| match (peer.close_reason(), e) {
        (Some(reason), _) => format!("connection closed: {reason}"),
        (None, ClientError::RequestTimeout) => {
            format!("no answer within {}s", opts.start_timeout().as_secs_f64())
        }
        (None, ClientError::Call(obj)) => {
            format!(
                "the plugin answered error {}: {}",
                obj.code(),
                obj.message()
            )
        }
        (None, e) => e.to_string(),
    });
    let manifest = match hello {
        Err(e) if e.contains("not compatible") => {
            return Err(StartError::Refused(format!("incompatible protocol: {e}")));
        }
        Err(e) if peer.close_reason().is_some() => {
            let what = format!("handshake failed: {e}");
            return Err(ended_at_start(what, &mut child, stderr_read, &said_error, cfg).await);
        }
        Err(e) => return Err(StartError::Crashed(format!("handshake failed: {e}"))),
        Ok(m) => m,
    };
    if !protocol::compatible(&manifest.protocol_version) {
        return Err(StartError::Refused(format!(
            "incompatible protocol: the plugin speaks {}, the server {}",
            manifest.protocol_version,
            protocol::PROTOCOL_VERSION
        )));
    }
    let plugin_config = Value::Object(cfg.config.clone());
    // Its secrets are known before its config travels (and is logged).
    if let Some(schema) = &manifest.plugin_config_schema {
        crate::secrets::register(crate::secrets::of(schema, &plugin_config));
    }
    let has = |m: &str| manifest.offers(m);
    for method in ["validate_plugin_config", "load"] {
        if !has(method) {
            continue;
        }
        let r = match method {
            "load" => starting.load(plugin_config.clone()).await,
            _ => starting.validate_plugin_config(plugin_config.clone()).await,
        };
        match r {
            Ok(()) => {}
            Err(ClientError::Call(obj)) => {
                return Err(StartError::Refused(format!(
                    "{method} refused the plugin config: {}",
                    obj.message()
                )));
            }
            Err(e) => match peer.close_reason() {
                Some(r) => {
                    let what = format!("{method} failed: connection closed: {r}");
                    let said = &said_error;
                    return Err(ended_at_start(what, &mut child, stderr_read, said, cfg).await);
                }
                None => return Err(StartError::Crashed(format!("{method} failed: {e}"))),
            },
        }
    }
    Ok((
        Arc::new(Conn {
            peer,
            manifest,
            pid,
            started: Instant::now(),
            ending: watch::channel(None).0,
            delivered: AtomicBool::new(false),
        }),
        child,
    ))
}

/// A JSON error's text without its `at line L column C`, which would
/// point into the plugin's answer as re-serialized, not into its line.
fn without_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rsplit_once(" at line ") {
        Some((head, _)) if e.line() > 0 => head.to_string(),
        _ => text,
    }
}

/// How long a plugin whose pipes closed is given to exit, so its exit
/// status can be told.
const EXIT_WAIT: Duration = Duration::from_millis(200);

/// Reads a plugin's stderr to its end, handing `each` line: bytes that
/// are not UTF-8 replaced, a line longer than [`plugin_log::LINE_MAX`] cut
/// (saying how much was dropped). The pipe is drained whatever the plugin
/// writes, so it never blocks on its stderr, in bounded memory.
async fn read_stderr(stderr: impl tokio::io::AsyncRead + Unpin, mut each: impl FnMut(&str)) {
    let mut r = tokio::io::BufReader::new(stderr);
    let mut line = Vec::new();
    let mut dropped = 0usize;
    let mut say = |line: &mut Vec<u8>, dropped: &mut usize| {
        let mut text = String::from_utf8_lossy(line).into_owned();
        if *dropped > 0 {
            text.push_str(&plugin_log::cut_note(*dropped));
        }
        each(&text);
        line.clear();
        *dropped = 0;
    };
    loop {
        let buf = match r.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(b) => b,
        };
        let end = buf.iter().position(|&b| b == b'\n');
        let part = &buf[..end.unwrap_or(buf.len())];
        let room = plugin_log::LINE_MAX.saturating_sub(line.len());
        line.extend_from_slice(&part[..part.len().min(room)]);
        dropped += part.len().saturating_sub(room);
        let used = end.map_or(buf.len(), |i| i + 1);
        r.consume(used);
        if end.is_some() {
            say(&mut line, &mut dropped);
        }
    }
    if !line.is_empty() || dropped > 0 {
        say(&mut line, &mut dropped);
    }
}

/// A plugin whose pipes closed during its start (`what` failed): `what`
/// with how it exited and the last ERROR line it wrote, once it has
/// exited and its stderr has been read to the end (each waited for at
/// most [`EXIT_WAIT`]). Only at start is that line surely its own
/// account of why it ended. One that `sandbox-exec` could not confine is
/// refused: another start would fail the same way.
async fn ended_at_start(
    what: String,
    child: &mut Child,
    stderr_read: tokio::task::JoinHandle<()>,
    said_error: &Mutex<Option<String>>,
    cfg: &PluginConfig,
) -> StartError {
    let status = tokio::time::timeout(EXIT_WAIT, child.wait())
        .await
        .ok()
        .and_then(Result::ok);
    let _ = tokio::time::timeout(EXIT_WAIT, stderr_read).await;
    let line = said_error.lock().ok().and_then(|s| s.clone());
    match (status.and_then(|s| s.code()), line) {
        (Some(126), Some(line)) if line.starts_with("sandbox: ") => StartError::Refused(line),
        (_, line) => {
            let exited = status
                .map(|s| format!("; {}", exit_reason(s, &cfg.sandbox)))
                .unwrap_or_default();
            let line = line.map(|l| format!(": {l}")).unwrap_or_default();
            StartError::Crashed(format!("{what}{exited}{line}"))
        }
    }
}

/// How a plugin process ended, in words, naming the sandbox limit a
/// signal points to.
fn exit_reason(status: std::process::ExitStatus, sandbox: &crate::config::Sandbox) -> String {
    use std::os::unix::process::ExitStatusExt;
    let mib = sandbox.address_space / (1024 * 1024);
    match status.signal() {
        Some(6) => format!(
            "killed by SIGABRT, as after a failed allocation (its address space limit is {mib} MiB)"
        ),
        Some(24) => format!(
            "killed by SIGXCPU: it used up its CPU time limit ({} s)",
            sandbox.cpu_seconds.unwrap_or_default()
        ),
        Some(9) => "killed by SIGKILL".to_string(),
        Some(sig) => format!("killed by signal {sig}"),
        None => format!("process exited ({status})"),
    }
}

/// Creates a plugin's directory (private to the server's user).
fn create_plugin_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// A plugin's stderr line, with the level it starts with taken off, as
/// the SDK and most loggers write it: `ERROR text`, `ERROR: text`,
/// `[ERROR] text`, or Python's `logging` by default, `ERROR:name:text`
/// (`name:text` is kept). Other lines are INFO.
fn split_level(line: &str) -> (tracing::Level, &str) {
    let trimmed = line.trim_start();
    let (word, rest) = match trimmed.strip_prefix('[').and_then(|t| t.split_once(']')) {
        Some(bracketed) => bracketed,
        None => {
            let end = trimmed
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(trimmed.len());
            let (word, rest) = trimmed.split_at(end);
            match rest.chars().next() {
                None => (word, rest),
                Some(':') => (word, &rest[1..]),
                Some(c) if c.is_whitespace() => (word, rest),
                Some(_) => return (tracing::Level::INFO, line),
            }
        }
    };
    let level = match word.to_ascii_uppercase().as_str() {
        "ERROR" | "CRITICAL" => tracing::Level::ERROR,
        "WARN" | "WARNING" => tracing::Level::WARN,
        "INFO" => tracing::Level::INFO,
        "DEBUG" => tracing::Level::DEBUG,
        "TRACE" => tracing::Level::TRACE,
        _ => return (tracing::Level::INFO, line),
    };
    (level, rest.trim_start())
}

fn resolve_on_path(exe: &std::path::Path) -> Option<PathBuf> {
    if exe.components().count() > 1 {
        return exe.is_file().then(|| exe.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(exe))
            .find(|p| p.is_file())
    })
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[async_trait::async_trait]
impl PluginCalls for Supervisor {
    async fn call_plugin(
        &self,
        name: &str,
        method: &str,
        params: serde_json::Map<String, Value>,
    ) -> jsonrpsee::core::RpcResult<Value> {
        let err =
            |code, msg: String| jsonrpsee::types::ErrorObjectOwned::owned(code, msg, None::<()>);
        self.call(name, method, params).await.map_err(|e| match e {
            CallError::NotConfigured(_) => err(codes::NOT_FOUND, e.to_string()),
            CallError::Rejected(m) => err(codes::REJECTED, m),
            CallError::Later(m, wait) => jsonrpsee::types::ErrorObjectOwned::owned(
                codes::FAILED,
                m,
                Some(protocol::retry_after_data(wait)),
            ),
            other => err(codes::FAILED, other.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_levels() {
        assert_eq!(
            split_level(" INFO loaded"),
            (tracing::Level::INFO, "loaded")
        );
        assert_eq!(split_level("WARNING: disk"), (tracing::Level::WARN, "disk"));
        assert_eq!(split_level("ERROR x y"), (tracing::Level::ERROR, "x y"));
        assert_eq!(
            split_level("Traceback (most recent call last):"),
            (tracing::Level::INFO, "Traceback (most recent call last):")
        );
        // Python's logging by default, and bracketed levels.
        assert_eq!(
            split_level("ERROR:root:no route"),
            (tracing::Level::ERROR, "root:no route")
        );
        assert_eq!(split_level("[warn] slow"), (tracing::Level::WARN, "slow"));
        assert_eq!(split_level("DEBUG:"), (tracing::Level::DEBUG, ""));
        for other in [
            "ValueError: x",
            "WARNINGS ahead",
            "[2026-12-05] ERROR x",
            "INFO2 x",
        ] {
            assert_eq!(split_level(other), (tracing::Level::INFO, other));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_caps_resets_and_fails() {
        let policy = BackoffPolicy::default();
        let mut b = Backoff::new(policy);
        let mut delays = Vec::new();
        for _ in 0..5 {
            match b.crashed(Some(Instant::now())) {
                AfterCrash::Restart(d) => {
                    delays.push(d.as_millis());
                    tokio::time::sleep(d).await;
                }
                AfterCrash::Failed(_) => panic!("too early"),
            }
        }
        assert_eq!(delays, [0, 100, 200, 400, 800]);
        // The sixth crash within the minute marks it failed.
        assert_eq!(b.crashed(None), AfterCrash::Failed(policy.failed_retry));

        // Spread out crashes never fail, and the delay is capped.
        let mut b = Backoff::new(policy);
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            if let AfterCrash::Restart(d) = b.crashed(None) {
                last = d;
            } else {
                panic!("crashes were spread over time");
            }
            tokio::time::sleep(Duration::from_secs(20)).await;
        }
        assert_eq!(last, policy.max);

        // A run that stayed healthy for a minute starts over: at once,
        // then at 100 ms.
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(
            b.crashed(Some(started)),
            AfterCrash::Restart(Duration::ZERO)
        );
        assert_eq!(b.crashed(None), AfterCrash::Restart(policy.initial));
    }
}
