//! The `roboger-server` binary: command line, logging, start and shutdown.

#![deny(unsafe_code)]

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use roboger_server::config::{Config, Overrides};
use roboger_server::listener::{Listener, Listeners, Local};
use roboger_server::store::{Store, StoreError};
use roboger_server::{App, server, systemd};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The exit code when a newer build has migrated the database, at start
/// or while serving; any other failure exits with 2.
const EXIT_NEWER_SCHEMA: u8 = 3;

/// Roboger: a messenger for robots.
#[derive(Parser, Debug, Clone)]
#[command(name = "roboger-server", version, about)]
struct Cli {
    /// Configuration file (the original's roboger.yml works unchanged).
    /// Without one, the embedded default is used: SQLite in the data
    /// directory and a generated master key.
    #[arg(long, short = 'c', env = "ROBOGER_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Listen address (`host:port`, or `unix:PATH` for a Unix socket),
    /// overriding the configuration.
    #[arg(long, global = true)]
    listen: Option<String>,
    /// Log format; the level comes from RUST_LOG (default: info). JSON
    /// puts each line's fields (event_id, endpoint_id, plugin, ...) at the
    /// top level of its object.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "ROBOGER_LOG_FORMAT", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Run the server (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Load and check the configuration, print a summary and exit.
    CheckConfig,
    /// (Used by the server itself.) Confine this process as a plugin's
    /// `sandbox` says, then run the plugin in its place.
    #[command(hide = true)]
    SandboxExec {
        #[command(flatten)]
        spec: roboger_server::sandbox::Spec,
        /// The plugin's executable and arguments.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
}

/// Confines this process and execs the plugin; returns only on failure.
/// Runs before any runtime or thread exists. Its lines go to the plugin's
/// log (stderr).
fn sandbox_exec(
    spec: &roboger_server::sandbox::Spec,
    command: &[std::ffi::OsString],
) -> std::process::ExitCode {
    use std::os::unix::process::CommandExt;
    match roboger_server::sandbox::enter(spec) {
        Ok(said) => eprintln!("INFO {said}"),
        Err(e) => {
            eprintln!("ERROR sandbox: {e}; the plugin was not started");
            return std::process::ExitCode::from(126);
        }
    }
    let Some((exe, args)) = command.split_first() else {
        return std::process::ExitCode::from(2);
    };
    let e = std::process::Command::new(exe).args(args).exec();
    eprintln!("ERROR cannot run {}: {e}", exe.to_string_lossy());
    std::process::ExitCode::from(127)
}

/// The log's filter unless `RUST_LOG` says otherwise: `info`, but for
/// sqlx's pool, which warns of each broken connection it drops: while the
/// network to the database flaps that is a line per connection, dozens a
/// second, and the server's own lines already say that the database
/// fails, once (`outage`); and for PostgreSQL's notices below its
/// warnings, which sqlx logs at INFO: the migrations' `IF NOT EXISTS`
/// made three lines at every start on a migrated database ("relation
/// \"seaql_migrations\" already exists, skipping").
const LOG_FILTER: &str = "info,sqlx_core::pool::connection=error,sqlx::postgres::notice=warn";

fn init_logging(format: LogFormat) {
    // A `RUST_LOG` the filter cannot use is said once the log is set up,
    // as the default is used in its place: before, it was dropped
    // silently, and the operator asking for debug lines got none
    // without a word. An empty one is as none.
    let asked = std::env::var("RUST_LOG").map_err(|e| match e {
        std::env::VarError::NotPresent => None,
        std::env::VarError::NotUnicode(_) => Some("it is not UTF-8".to_string()),
    });
    let (filter, refused) = match asked {
        Ok(asked) if !asked.trim().is_empty() => {
            match tracing_subscriber::EnvFilter::try_new(&asked) {
                Ok(filter) => (filter, None),
                Err(e) => (
                    tracing_subscriber::EnvFilter::new(LOG_FILTER),
                    Some(format!("{asked:?}: {e}")),
                ),
            }
        }
        Ok(_) | Err(None) => (tracing_subscriber::EnvFilter::new(LOG_FILTER), None),
        Err(Some(why)) => (tracing_subscriber::EnvFilter::new(LOG_FILTER), Some(why)),
    };
    // A line that cannot be written (stderr a terminal hung up, a pipe
    // whose reader is gone) is lost, not reported on that same stderr:
    // that report's eprintln! panics, and the server went down with it.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(roboger_server::log_writer::LogWriter)
        .log_internal_errors(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    if let Some(why) = refused {
        tracing::warn!(
            "RUST_LOG is not a filter the log can use ({why}); logging with the default, \
             {LOG_FILTER}"
        );
    }
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    loaded(
        cli,
        Config::load(cli.config.as_deref(), &Overrides::from_env())?,
    )
}

/// The configuration as a command that serves nothing loads it
/// ([`Config::load_to_check`]: no master key is generated).
fn load_to_check(cli: &Cli) -> anyhow::Result<Config> {
    loaded(
        cli,
        Config::load_to_check(cli.config.as_deref(), &Overrides::from_env())?,
    )
}

/// A loaded configuration with the command line's overrides applied and
/// what it says logged (and a key it generated printed).
fn loaded(cli: &Cli, mut config: Config) -> anyhow::Result<Config> {
    if let Some(l) = &cli.listen {
        config.listen = roboger_server::config::normalize_listen("--listen", l)?;
    }
    match &config.source {
        Some(p) => tracing::info!(path = %p.display(), "configuration loaded"),
        None => {
            tracing::info!(data_dir = %config.data_dir.display(), "no configuration file: using the embedded default")
        }
    }
    for n in &config.notices {
        tracing::info!("{n}");
    }
    warn_unhidden_secrets(&config);
    if let Some(path) = &config.generated_key {
        // Printed once, on the start that generated it; it is in the file
        // too, so an output nobody reads does not stop the start.
        use std::io::Write;
        let _ = writeln!(
            std::io::stdout(),
            "Generated a new master key (stored in {}):\n\n    {}\n",
            path.display(),
            config.master_key
        );
    }
    Ok(config)
}

async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = Store::connect(&config.db, config.db_pool_size, config.timeout)
        .await
        .context("cannot connect to the database")?;
    roboger_server::cluster::warn_connection_room(
        &store,
        config.plugins.iter().any(|p| p.db),
        config.delivery.node_timeout,
        config.timeout,
    )
    .await;
    // Other nodes may be migrating the same database: wait for them.
    store
        .migrate(config.timeout.max(std::time::Duration::from_secs(10)) * 12)
        .await
        .context("cannot apply database migrations")?;
    if let Some(most) = store.largest_event()
        && most < config.push_max_media
    {
        tracing::warn!(
            "MySQL's max_allowed_packet leaves room for events of {most} bytes of text and \
             media, less than push-max-media ({} bytes): larger pushes are refused (413); \
             raise max_allowed_packet above push-max-media and the longest text expected",
            config.push_max_media
        );
    }
    Ok(store)
}

/// SIGINT and SIGTERM: the first begins the graceful stop, a second (an
/// operator's second Ctrl-C) stops the server at once. The same
/// listeners wait for both, so a second signal sent right after the
/// first is not missed.
struct StopSignals {
    int: Option<Signal>,
    term: Option<Signal>,
}

impl StopSignals {
    fn listen() -> StopSignals {
        let listen = |kind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for {name}");
                None
            }
        };
        StopSignals {
            int: listen(SignalKind::interrupt(), "SIGINT"),
            term: listen(SignalKind::terminate(), "SIGTERM"),
        }
    }

    /// Waits for the next SIGINT or SIGTERM; returns the exit status of a
    /// process it ends (128 and its number).
    async fn next(&mut self) -> u8 {
        async fn recv(s: &mut Option<Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.int) => 130,
            _ = recv(&mut self.term) => 143,
        }
    }
}

/// Once a graceful stop has begun, on a signal (`signalled`) or not: the
/// next SIGINT or SIGTERM stops the server at once, as SIGKILL would but
/// with its plugins killed too, instead of after the deliveries being
/// made (up to three times `timeout`). They are made again by whoever
/// takes them over; nothing accepted is lost.
async fn stop_at_once_on_a_second_signal(app: Arc<App>, mut signals: StopSignals, signalled: bool) {
    if !signalled {
        signals.next().await;
        tracing::info!("a stop signal: the stop goes on (a second one stops at once)");
    }
    let status = signals.next().await;
    tracing::warn!(
        "a second stop signal: stopping at once; the deliveries being made are cut short and \
         made again"
    );
    app.plugins.kill_now();
    std::process::exit(i32::from(status));
}

/// Warns of each secret of `config` that plugins can read though
/// Landlock confines them (at start, and at each reload).
fn warn_unhidden_secrets(config: &Config) {
    for line in roboger_server::sandbox::unhidden_secrets(config) {
        tracing::warn!("{line}");
    }
}

/// Re-reads the configuration on each SIGHUP `hup` takes (from the start
/// of `serve`) and applies it ([`App::reload`]); one that does not load
/// is refused with a log line, and the running one stays.
async fn reload_on_sighup(cli: Cli, app: Arc<App>, hup: std::io::Result<Signal>) {
    let mut hup = match hup {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload is unavailable");
            return;
        }
    };
    while hup.recv().await.is_some() {
        systemd::reloading();
        tracing::info!("SIGHUP: reloading the configuration");
        match load_config(&cli) {
            Err(e) => tracing::error!(
                "configuration refused, the running one is kept: {}",
                said(&e)
            ),
            Ok(config) => {
                let r = app.reload(config).await;
                for (name, why) in &r.plugins.kept {
                    tracing::warn!(
                        plugin = %name,
                        "the plugin's changed entry did not start ({why}): its process before \
                         keeps running, under the entry before; put the entry right and reload \
                         again"
                    );
                }
                let kept: Vec<&str> = r.plugins.kept.iter().map(|(n, _)| n.as_str()).collect();
                tracing::info!(
                    added = ?r.plugins.added,
                    removed = ?r.plugins.removed,
                    restarted = ?r.plugins.changed,
                    kept = ?kept,
                    unchanged = ?r.plugins.unchanged,
                    "configuration reloaded"
                );
                if !r.needs_restart.is_empty() {
                    tracing::warn!(
                        settings = ?r.needs_restart,
                        "these changed settings take effect at the next restart"
                    );
                }
            }
        }
        systemd::ready();
    }
}

async fn serve(cli: &Cli, activated: Vec<OwnedFd>) -> anyhow::Result<()> {
    // Taken first: a SIGHUP while the server starts (the plugins' first
    // start, a database not reachable yet) is a reload once it has
    // started, where its default action would end the server.
    let hup = signal(SignalKind::hangup());
    server::raise_open_files_limit();
    let config = load_config(cli)?;
    let store = open_store(&config).await?;
    let listeners = if activated.is_empty() {
        Listener::bind(&config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?
            .into()
    } else {
        let n = activated.len();
        let l = Listeners::from_systemd(activated)?;
        tracing::info!(
            "serving the {} systemd passed; listen ({}) is not used",
            match n {
                1 => "socket".to_string(),
                n => format!("{n} sockets"),
            },
            config.listen
        );
        l
    };
    let local = listeners.local().context("listener has no address")?;
    let shown = local
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(h) = &config.ip_header
        && config.ip_header_from.is_empty()
        && local
            .iter()
            .any(|l| matches!(l, Local::Tcp(a) if !a.ip().is_loopback()))
    {
        tracing::warn!(
            "{h} is believed from every client, and clients off this host can reach the \
             server: set ip-header-from to the proxy's address so that they cannot choose \
             the address master.allow checks and wrong keys are counted against"
        );
    }
    let app = Arc::new(App::start(config, store).await.context("cannot start")?);
    tracing::info!(
        plugins = app.plugins.list().len(),
        "roboger-server {} listening on {shown}",
        env!("CARGO_PKG_VERSION")
    );
    let cleanup = app
        .cleanup
        .spawn_periodic(app.node.clone(), app.config.cleanup_interval);
    let deletions_left = app.deletions.spawn_periodic();
    // After a burst of large pushes, back to the usual size.
    let release = roboger_plugin_sdk::allocator::spawn_periodic_release();
    // Bound, migrated, plugins started: connections wait in the backlog
    // for the accept loop, which starts below.
    systemd::ready();
    let notifier = systemd::spawn(app.clone(), local);
    let reloader = tokio::spawn(reload_on_sighup(cli.clone(), app.clone(), hup));
    let mut signals = StopSignals::listen();
    let stopping = app.clone();
    let shutdown = async move {
        let signalled = tokio::select! {
            _ = signals.next() => true,
            // A newer build migrated the database: the same clean stop,
            // so this node's deliveries go to the newer build's nodes.
            _ = stopping.superseded() => false,
        };
        if signalled {
            tracing::info!("shutting down (a second SIGINT or SIGTERM stops at once)");
        }
        systemd::stopping();
        tokio::spawn(stop_at_once_on_a_second_signal(
            stopping, signals, signalled,
        ));
    };
    server::run(listeners, app.clone(), shutdown).await;
    notifier.abort();
    release.abort();
    reloader.abort();
    cleanup.abort();
    deletions_left.abort();
    app.cleanup.stop();
    let cut_short = app.deletions.running();
    if cut_short > 0 {
        // Their walks end with this process; their records stay.
        tracing::info!(
            deletions = cut_short,
            "deletions under way are left to the other nodes, or to this one's next start: \
             each node looks for them every node-timeout"
        );
    }
    // The calls in flight end and their outcomes are written before the
    // plugins stop: a delivery made is not made again by whoever takes
    // this node's deliveries over. A call may wait `timeout` for room in
    // its plugin and then take `timeout`; the last commit `timeout`.
    let limit = app.config.timeout * 3;
    if !app.pipeline.stop(limit).await {
        tracing::warn!(
            "deliveries still in flight after {limit:?} of the stop are cut short; \
             they are made again"
        );
    }
    app.plugins.shutdown().await;
    app.stop().await;
    tracing::info!("stopped");
    match app.superseded_by() {
        Some(unknown) => Err(StoreError::NewerSchema(unknown).into()),
        None => Ok(()),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(Command::SandboxExec { spec, command }) = &cli.command {
        return sandbox_exec(spec, command);
    }
    // Before any thread starts: taking the sockets unsets LISTEN_FDS and
    // LISTEN_PID, so that plugins do not see them.
    let activated = systemd_sockets();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(rt) => rt.block_on(run(cli, activated)),
        Err(e) => {
            eprintln!("roboger-server: cannot start the async runtime: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

/// The listening sockets systemd passed (socket activation), if any.
#[allow(unsafe_code)]
fn systemd_sockets() -> anyhow::Result<Vec<OwnedFd>> {
    use std::os::fd::FromRawFd;
    let fds = sd_notify::listen_fds().context("cannot read the sockets systemd passed")?;
    // SAFETY: systemd passed these descriptors to this very process
    // (LISTEN_PID) for it to own, and each is taken once, here.
    Ok(fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }).collect())
}

/// `check-config`: names the plugins whose executable cannot run (an
/// error, as they would start refused; said here, before a start or a
/// reload meets them), else prints a summary.
fn check_config(c: &Config) -> anyhow::Result<()> {
    let problems: Vec<String> = c
        .plugins
        .iter()
        .filter_map(|p| {
            roboger_server::supervisor::executable_problem(p)
                .map(|why| format!("plugin {}: {why}", p.name))
        })
        .collect();
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
    println!("configuration OK");
    println!("  listen: {}", c.listen);
    println!("  database: {:?}", c.db.backend);
    if let Some(path) = &c.key_to_generate {
        // A check writes nothing: the key is the first start's.
        println!(
            "  master key: none yet; the first start generates one in {}",
            path.display()
        );
    }
    let names: Vec<&str> = c.plugins.iter().map(|p| p.name.as_str()).collect();
    println!("  plugins: {}", names.join(", "));
    Ok(())
}

async fn run(cli: Cli, activated: anyhow::Result<Vec<OwnedFd>>) -> std::process::ExitCode {
    init_logging(cli.log_format);
    let result = match cli.command.as_ref().unwrap_or(&Command::Serve) {
        Command::Serve => match activated {
            Ok(activated) => serve(&cli, activated).await,
            Err(e) => Err(e),
        },
        Command::Migrate => {
            async {
                // The database alone is written: no master key is made.
                let config = load_to_check(&cli)?;
                open_store(&config).await?;
                tracing::info!("migrations applied");
                Ok(())
            }
            .await
        }
        Command::CheckConfig => load_to_check(&cli).and_then(|c| check_config(&c)),
        Command::SandboxExec { .. } => Ok(()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let newer = e
                .chain()
                .any(|c| matches!(c.downcast_ref(), Some(StoreError::NewerSchema(_))));
            let e = said(&e);
            // Said once: in JSON logs as a JSON line, so that the stream
            // stays JSON; else as a command's error line, which is also
            // what is seen when RUST_LOG turns the log off.
            if cli.log_format == LogFormat::Json && tracing::enabled!(tracing::Level::ERROR) {
                tracing::error!("{e}");
            } else {
                eprintln!("roboger-server: {}", roboger_server::secrets::scrub(&e));
            }
            // Its own code, so systemd does not restart this build on a
            // database it must not touch (`RestartPreventExitStatus=3`).
            std::process::ExitCode::from(if newer { EXIT_NEWER_SCHEMA } else { 2 })
        }
    }
}

/// `e` and its causes, each said once: a cause whose text ends the
/// message so far is left out (the store's and sea-orm's errors repeat
/// their causes' text, which `{:#}` would print three times).
fn said(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
