//! `roboger-bench`: end-to-end throughput, latency, restart time and
//! memory of a Roboger server, measured the way a user meets it.
//!
//! It starts the release `roboger-server` (SQLite, the webhook plugin) with
//! an address, a webhook endpoint and a subscription pointing at an HTTP
//! sink the benchmark runs itself, then drives `/push` from its own load
//! generator. Every message carries its sequence number and send time, so
//! the sink measures push-to-delivery latency and finds lost events.
//! With `--target URL` the same load runs against another server (e.g.
//! the original Python Roboger) and both rows are printed with their
//! ratio. With `--nodes N` it runs N of our servers on one database
//! (`--pg` for PostgreSQL, `--mysql` for MySQL or MariaDB) instead: throughput through one node and
//! through all, how fast a management change reaches another node, how
//! long a killed node's deliveries take to be made by the others, and
//! (`--manage N`) what creating the Nth address costs. Run it with:
//!
//! ```sh
//! cargo build --release --locked --workspace && target/release/roboger-bench
//! ```

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use roboger_tests::{KEY, Method, Server, ServerOptions, json, plugin_bin};
use warp::Filter;

#[derive(Parser, Debug, Clone)]
#[command(about = "End-to-end benchmark of a Roboger server: throughput, latency, restart, memory")]
struct Args {
    /// Concurrent push connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds of measured load (after one second of warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Pushes per second offered in total; 0 runs closed-loop (each
    /// connection pushes again as soon as it is answered).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Bytes of message text per push.
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Bytes of media per push (0: none).
    #[arg(long, default_value_t = 0)]
    media: usize,
    /// Also run the load against another server at this base URL.
    #[arg(long)]
    target: Option<String>,
    /// Master key of `--target`: the benchmark creates its address,
    /// webhook endpoint (to the sink) and subscription there.
    #[arg(long)]
    target_key: Option<String>,
    /// An address on `--target` already wired to the sink (instead of
    /// `--target-key`); give `--sink-port` so its webhook can reach it.
    #[arg(long)]
    addr: Option<String>,
    /// Pid of the `--target` server process(es), comma-separated, for RSS.
    #[arg(long)]
    target_pids: Option<String>,
    /// Port of the sink (default: any free port).
    #[arg(long, default_value_t = 0)]
    sink_port: u16,
    /// Skip our own server (only with `--target`).
    #[arg(long)]
    only_target: bool,
    /// Skip the plugin SIGKILL measurement.
    #[arg(long)]
    no_kill: bool,
    /// Seconds to wait for every accepted event to be delivered.
    #[arg(long, default_value_t = 120.0)]
    drain: f64,
    /// The webhook plugin's `max-inflight` on our server (default: the
    /// server's): deliveries in flight, each holding one HTTP connection,
    /// which trades the plugin's peak memory against throughput.
    #[arg(long)]
    max_inflight: Option<usize>,
    /// Run the cluster benchmark: this many of our servers on one database.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// A PostgreSQL server URL without a database (e.g.
    /// `postgresql://postgres@127.0.0.1:5432`): our server (or, with
    /// `--nodes`, the nodes) runs on a fresh database made on it instead of
    /// SQLite.
    #[arg(long, conflicts_with = "mysql")]
    pg: Option<String>,
    /// A MySQL or MariaDB server URL without a database (e.g.
    /// `mysql://root@127.0.0.1:3306`): as `--pg`, on that server.
    #[arg(long)]
    mysql: Option<String>,
    /// With `--nodes`: addresses to create one by one through the
    /// management API, timing the first and the last thousand.
    #[arg(long, default_value_t = 0)]
    manage: usize,
    /// The sink hangs (reads every request, answers none) during the
    /// measured load and for `--hang` seconds after it, so the accepted
    /// events pile up as a backlog; then it answers again and the drain
    /// measures their delivery. The peaks are the backlog's.
    #[arg(long)]
    hang: Option<f64>,
    /// Stop the measured load after this many pushes (0: none).
    #[arg(long, default_value_t = 0)]
    pushes: u64,
    /// Measure the web console instead: with this many addresses, how
    /// long each kind of page takes to answer.
    #[arg(long, default_value_t = 0)]
    console: usize,
    /// Set from `--pushes` for one load: the sequence number to stop at.
    #[arg(skip)]
    limit: Option<u64>,
}

/// What the sink saw: per message, its sequence number and when it came.
#[derive(Default)]
struct SinkLog {
    arrivals: Vec<(u64, Duration)>,
    latencies: Vec<Duration>,
}

/// The webhook's destination: counts and times every delivery.
struct Sink {
    url: String,
    log: Arc<Mutex<SinkLog>>,
    /// While set, the sink is a target that hangs: a request that comes
    /// is held, then answered 503 and not counted once it is cleared.
    hold: Arc<std::sync::atomic::AtomicBool>,
}

impl Sink {
    async fn start(port: u16, clock: Instant) -> Sink {
        let log: Arc<Mutex<SinkLog>> = Arc::default();
        let hold: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (l, h) = (log.clone(), hold.clone());
        let route = warp::post()
            .and(warp::body::bytes())
            .then(move |body: bytes::Bytes| {
                let (l, h) = (l.clone(), h.clone());
                async move {
                    if h.load(Ordering::Relaxed) {
                        while h.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        return http::StatusCode::SERVICE_UNAVAILABLE;
                    }
                    let now = clock.elapsed();
                    if let Some((seq, sent)) = parse_stamp(&body)
                        && let Ok(mut g) = l.lock()
                    {
                        g.arrivals.push((seq, now));
                        g.latencies.push(now.saturating_sub(sent));
                    }
                    http::StatusCode::OK
                }
            });
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind the sink");
        let addr = listener.local_addr().expect("sink address");
        tokio::spawn(roboger_server::server::serve(
            roboger_server::connections::Connections::new(roboger_server::server::MAX_CONNECTIONS),
            listener,
            warp::service(route),
            std::future::pending(),
        ));
        Sink {
            url: format!("http://{addr}/hook"),
            log,
            hold,
        }
    }

    fn count(&self) -> usize {
        self.log.lock().map(|g| g.arrivals.len()).unwrap_or(0)
    }

    /// Forgets everything seen so far (between phases).
    fn take(&self) -> SinkLog {
        self.log
            .lock()
            .map(|mut g| std::mem::take(&mut *g))
            .unwrap_or_default()
    }
}

/// Messages are `"SEQ NANOS padding"`; the webhook sends `{"m": MSG}`.
fn parse_stamp(body: &[u8]) -> Option<(u64, Duration)> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find(|c: char| c.is_ascii_digit())?;
    let mut parts = text[start..].split(|c: char| !c.is_ascii_digit());
    let seq = parts.next()?.parse().ok()?;
    let nanos: u64 = parts.next()?.parse().ok()?;
    Some((seq, Duration::from_nanos(nanos)))
}

/// Where pushes go.
#[derive(Clone)]
struct Target {
    /// The servers taking pushes: connection `c` pushes to `bases[c % n]`.
    bases: Vec<String>,
    addr: String,
}

/// The load generator's results.
#[derive(Default)]
struct Load {
    /// Sequence numbers answered 202.
    accepted: Vec<u64>,
    latencies: Vec<Duration>,
    refused: u64,
    errors: u64,
    elapsed: Duration,
}

/// One keep-alive HTTP/1.1 connection of the load generator, on hyper's
/// connection API: no pool, redirects or middleware per request, so the
/// generator takes as little as it can of the CPU it shares with the
/// servers it measures. Reconnects after an error.
struct Pusher {
    authority: String,
    path: String,
    conn: Option<http1::SendRequest<Full<bytes::Bytes>>>,
}

impl Pusher {
    /// For `url`, an `http://host:port/path` URL; `None` for anything else.
    fn new(url: &str) -> Option<Pusher> {
        let uri: http::Uri = url.parse().ok()?;
        if uri.scheme() != Some(&http::uri::Scheme::HTTP) {
            return None;
        }
        Some(Pusher {
            authority: uri.authority()?.to_string(),
            path: uri.path().to_string(),
            conn: None,
        })
    }

    /// POSTs `body` as JSON; the answer's status, or `None` on a
    /// connection error or after 30 s (the connection is then dropped).
    async fn post(&mut self, body: Vec<u8>) -> Option<u16> {
        let status = tokio::time::timeout(Duration::from_secs(30), self.try_post(body))
            .await
            .ok()
            .flatten();
        if status.is_none() {
            self.conn = None;
        }
        status
    }

    async fn try_post(&mut self, body: Vec<u8>) -> Option<u16> {
        if self.conn.is_none() {
            let stream = tokio::net::TcpStream::connect(&self.authority).await.ok()?;
            stream.set_nodelay(true).ok()?;
            let (conn, driver) = http1::handshake(TokioIo::new(stream)).await.ok()?;
            tokio::spawn(driver);
            self.conn = Some(conn);
        }
        let conn = self.conn.as_mut()?;
        conn.ready().await.ok()?;
        let req = http::Request::post(&self.path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .ok()?;
        let resp = conn.send_request(req).await.ok()?;
        let status = resp.status().as_u16();
        // Read the whole answer so the connection can carry the next push.
        resp.into_body().collect().await.ok()?;
        Some(status)
    }
}

/// Where a server at `base` takes pushes.
fn push_url(base: &str) -> String {
    format!("{}/push", base.trim_end_matches('/'))
}

/// Runs `args.connections` pushers against `t` for `seconds`; sequence
/// numbers come from `seq`.
async fn load(
    t: &Target,
    args: &Args,
    seconds: f64,
    rate: u64,
    clock: Instant,
    seq: &Arc<AtomicU64>,
) -> Load {
    let padding = "x".repeat(args.payload.saturating_sub(24));
    let media = (args.media > 0).then(|| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(vec![0x5au8; args.media])
    });
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..args.connections {
        let url = push_url(&t.bases[c % t.bases.len()]);
        let limit = args.limit;
        let (mut pusher, addr, padding, media, seq) = (
            Pusher::new(&url).expect("push URLs are checked in main"),
            t.addr.clone(),
            padding.clone(),
            media.clone(),
            seq.clone(),
        );
        // Open loop: each connection has its share of the rate, and both
        // latencies count from when the push was due (no coordinated
        // omission).
        let interval =
            (rate > 0).then(|| Duration::from_secs_f64(args.connections as f64 / rate as f64));
        let conns = args.connections as f64;
        tasks.push(tokio::spawn(async move {
            let mut out = Load::default();
            // The connections' first pushes are spread over one interval.
            let mut due = start + interval.map(|i| i.mul_f64(c as f64 / conns)).unwrap_or_default();
            loop {
                let began = match interval {
                    Some(i) => {
                        tokio::time::sleep_until(due.into()).await;
                        due += i;
                        due - i
                    }
                    None => Instant::now(),
                };
                if Instant::now() >= end {
                    break;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                if limit.is_some_and(|l| n >= l) {
                    break;
                }
                let msg = format!("{n} {} {padding}", began.duration_since(clock).as_nanos());
                let mut body = json!({"addr": addr, "msg": msg, "subject": "bench", "level": "warning", "sender": "bench"});
                if let Some(m) = &media {
                    body["media"] = m.clone().into();
                }
                let body = serde_json::to_vec(&body).unwrap_or_default();
                match pusher.post(body).await {
                    Some(202) => {
                        out.latencies.push(began.elapsed());
                        out.accepted.push(n);
                    }
                    Some(_) => out.refused += 1,
                    None => out.errors += 1,
                }
            }
            out
        }));
    }
    let mut total = Load::default();
    for t in tasks {
        if let Ok(r) = t.await {
            total.accepted.extend(r.accepted);
            total.latencies.extend(r.latencies);
            total.refused += r.refused;
            total.errors += r.errors;
        }
    }
    total.elapsed = start.elapsed().min(Duration::from_secs_f64(seconds));
    total
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// `VmRSS` and `VmHWM` of a process, in MiB.
fn rss(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The child processes of `pid` (the server's plugins).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                out.push(child);
            }
        }
    }
    out
}

/// One server's figures.
#[derive(Default)]
struct Row {
    name: String,
    accepted_per_s: f64,
    delivered_per_s: f64,
    push_p50: Duration,
    push_p99: Duration,
    push_p999: Duration,
    deliver_p50: Duration,
    deliver_p99: Duration,
    lost: usize,
    refused: u64,
    errors: u64,
    rss_idle: Option<f64>,
    rss_peak: Option<f64>,
    plugin_idle: Option<f64>,
    plugin_peak: Option<f64>,
    restart: Option<Duration>,
    restart_lost: Option<usize>,
    /// Share of the machine's CPU time the hypervisor took during the
    /// measured load (`steal` in /proc/stat), in percent.
    steal: Option<f64>,
}

/// The machine's total and stolen CPU time so far (/proc/stat's `cpu`
/// line, in ticks).
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is
    // already counted in user).
    let total = fields.iter().take(8).sum();
    Some((total, *fields.get(7)?))
}

/// Waits until the sink has every accepted sequence number (or `limit`
/// passes); returns the log and how many are missing.
async fn drain(sink: &Sink, accepted: &[u64], limit: Duration) -> (SinkLog, usize) {
    let end = Instant::now() + limit;
    while sink.count() < accepted.len() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Duplicates (redelivered after a crash) do not count; check the set.
    let mut log = sink.take();
    let seen: HashSet<u64> = log.arrivals.iter().map(|(s, _)| *s).collect();
    let missing = accepted.iter().filter(|s| !seen.contains(s)).count();
    if missing > 0 && Instant::now() < end {
        tokio::time::sleep(
            end.saturating_duration_since(Instant::now())
                .min(Duration::from_secs(2)),
        )
        .await;
        let more = sink.take();
        log.arrivals.extend(more.arrivals);
        log.latencies.extend(more.latencies);
    }
    let seen: HashSet<u64> = log.arrivals.iter().map(|(s, _)| *s).collect();
    let missing = accepted.iter().filter(|s| !seen.contains(s)).count();
    (log, missing)
}

/// Warm-up, then the measured load; fills the throughput and latency
/// figures of `row`.
async fn measure(
    row: &mut Row,
    t: &Target,
    sink: &Sink,
    args: &Args,
    clock: Instant,
    seq: &Arc<AtomicU64>,
) {
    let warm = load(t, args, 1.0, args.rate, clock, seq).await;
    let _ = drain(sink, &warm.accepted, Duration::from_secs_f64(args.drain)).await;
    let started = clock.elapsed();
    let before = cpu_ticks();
    if args.hang.is_some() {
        sink.hold.store(true, Ordering::Relaxed);
    }
    let limit = (args.pushes > 0).then(|| seq.load(Ordering::Relaxed) + args.pushes);
    let mut l = load(
        t,
        &Args {
            limit,
            ..args.clone()
        },
        args.duration,
        args.rate,
        clock,
        seq,
    )
    .await;
    if let (Some((t0, s0)), Some((t1, s1))) = (before, cpu_ticks())
        && t1 > t0
    {
        row.steal = Some(100.0 * (s1 - s0) as f64 / (t1 - t0) as f64);
    }
    if let Some(hang) = args.hang {
        tokio::time::sleep(Duration::from_secs_f64(hang)).await;
        sink.hold.store(false, Ordering::Relaxed);
    }
    let (log, missing) = drain(sink, &l.accepted, Duration::from_secs_f64(args.drain)).await;
    let last = log
        .arrivals
        .iter()
        .map(|(_, at)| *at)
        .max()
        .unwrap_or(started)
        .saturating_sub(started)
        .max(l.elapsed);
    l.latencies.sort();
    let mut dl = log.latencies;
    dl.sort();
    row.accepted_per_s = l.accepted.len() as f64 / l.elapsed.as_secs_f64();
    row.delivered_per_s = (l.accepted.len() - missing) as f64 / last.as_secs_f64();
    row.push_p50 = percentile(&l.latencies, 0.5);
    row.push_p99 = percentile(&l.latencies, 0.99);
    row.push_p999 = percentile(&l.latencies, 0.999);
    row.deliver_p50 = percentile(&dl, 0.5);
    row.deliver_p99 = percentile(&dl, 0.99);
    row.lost = missing;
    row.refused = l.refused;
    row.errors = l.errors;
}

/// SIGKILLs the plugin under a steady 1,000 pushes/s and times how long
/// until the sink gets a delivery from its successor; then checks that
/// every accepted event arrived.
async fn restart_time(
    server_pid: u32,
    t: &Target,
    sink: &Sink,
    args: &Args,
    clock: Instant,
    seq: &Arc<AtomicU64>,
) -> Option<(Duration, usize)> {
    let plugin = *children(server_pid).first()?;
    let _ = sink.take();
    let steady = Args {
        connections: 4,
        ..args.clone()
    };
    let load_task = {
        let (t, seq) = (t.clone(), seq.clone());
        tokio::spawn(async move { load(&t, &steady, 3.0, 1000, clock, &seq).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = clock.elapsed();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(i32::try_from(plugin).ok()?)?,
        rustix::process::Signal::KILL,
    );
    // The first delivery after the kill made by a new plugin process.
    let mut back = None;
    let end = Instant::now() + Duration::from_secs(10);
    while back.is_none() && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let new_pid = children(server_pid).into_iter().find(|p| *p != plugin);
        if new_pid.is_some()
            && let Ok(g) = sink.log.lock()
        {
            back = g
                .arrivals
                .iter()
                .map(|(_, at)| *at)
                .filter(|at| *at > killed_at + Duration::from_millis(1))
                .min();
        }
    }
    let l = load_task.await.ok()?;
    let (_, missing) = drain(sink, &l.accepted, Duration::from_secs_f64(args.drain)).await;
    Some((back?.saturating_sub(killed_at), missing))
}

/// Our one server: on a fresh database with `--pg` or `--mysql`, else
/// SQLite.
fn single_server(args: &Args) -> ServerOptions {
    ServerOptions {
        db: database(args),
        ..our_server(args)
    }
}

/// A fresh database on the server `--pg` or `--mysql` names, if one does.
fn database(args: &Args) -> Option<String> {
    match (&args.pg, &args.mysql) {
        (Some(pg), _) => Some(roboger_tests::create_pg_database(pg)),
        (None, Some(my)) => Some(roboger_tests::create_mysql_database(my)),
        (None, None) => None,
    }
}

/// The database server of our servers, for the figures' titles; `None`
/// on SQLite.
fn database_name(args: &Args) -> Option<&'static str> {
    match (&args.pg, &args.mysql) {
        (Some(_), _) => Some("PostgreSQL"),
        (None, Some(_)) => Some("MySQL"),
        (None, None) => None,
    }
}

/// How our server runs in the benchmark: the release binary with the
/// webhook plugin (its `max-inflight` from `--max-inflight`), quiet logs.
fn our_server(args: &Args) -> ServerOptions {
    ServerOptions {
        yaml: "timeout: 5\n".into(),
        plugins_yaml: format!(
            "- name: webhook\n  command: {}\n{}",
            plugin_bin("webhook").display(),
            args.max_inflight
                .map(|n| format!("  max-inflight: {n}\n"))
                .unwrap_or_default()
        ),
        env: vec![("RUST_LOG".into(), "warn,roboger_server=info".into())],
        ..Default::default()
    }
}

async fn own_server(args: &Args, sink: &Sink, clock: Instant, seq: &Arc<AtomicU64>) -> Row {
    let s = Server::start_with(single_server(args)).await;
    // Wired the same way as another server, through the management API.
    let addr = wire_target(&s.base, KEY, &sink.url).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut row = Row {
        name: match database_name(args) {
            Some(db) => format!("roboger (Rust), {db}"),
            None => "roboger (Rust)".into(),
        },
        ..Default::default()
    };
    let pid = s.pid();
    let plugin = children(pid).first().copied();
    row.rss_idle = rss(pid).map(|r| r.0);
    row.plugin_idle = plugin.and_then(rss).map(|r| r.0);
    let t = Target {
        bases: vec![s.base.clone()],
        addr,
    };
    measure(&mut row, &t, sink, args, clock, seq).await;
    row.rss_peak = rss(pid).map(|r| r.1);
    row.plugin_peak = plugin.and_then(rss).map(|r| r.1);
    if !args.no_kill
        && let Some((d, lost)) = restart_time(pid, &t, sink, args, clock, seq).await
    {
        row.restart = Some(d);
        row.restart_lost = Some(lost);
    }
    row
}

async fn other_server(
    args: &Args,
    base: &str,
    sink: &Sink,
    clock: Instant,
    seq: &Arc<AtomicU64>,
) -> Row {
    let addr = match (&args.addr, &args.target_key) {
        (Some(a), _) => a.clone(),
        (None, Some(key)) => wire_target(base, key, &sink.url).await,
        (None, None) => {
            eprintln!("--target needs --target-key (to create an address) or --addr");
            std::process::exit(2);
        }
    };
    let pids: Vec<u32> = args
        .target_pids
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter_map(|p| p.trim().parse().ok())
        .collect();
    let total = |i: usize| -> Option<f64> {
        let all: Vec<f64> = pids
            .iter()
            .flat_map(|p| std::iter::once(*p).chain(children(*p)))
            .filter_map(|p| rss(p).map(|r| if i == 0 { r.0 } else { r.1 }))
            .collect();
        (!all.is_empty()).then(|| all.iter().sum())
    };
    let mut row = Row {
        name: format!("target {base}"),
        rss_idle: total(0),
        ..Default::default()
    };
    let t = Target {
        bases: vec![base.to_string()],
        addr,
    };
    measure(&mut row, &t, sink, args, clock, seq).await;
    row.rss_peak = total(1);
    row
}

/// Creates an address, a webhook endpoint to the sink and a subscription
/// on another server through its management API (the original's too).
async fn wire_target(base: &str, key: &str, sink: &str) -> String {
    let c = reqwest::Client::new();
    let api = |m: Method, path: &str| {
        c.request(m, format!("{}/manage/v2{path}", base.trim_end_matches('/')))
            .header("X-Auth-Key", key)
            .header("Accept", "*/*")
    };
    // A created resource, as JSON (the Accept header asks for it).
    let create = |path: String, body: serde_json::Value, what: &str| {
        let req = api(Method::POST, &path).json(&body);
        let what = format!("cannot create {what} on {base}");
        async move {
            let r: Option<serde_json::Value> =
                async { req.send().await.ok()?.json().await.ok() }.await;
            r.unwrap_or_else(|| panic!("{what}"))
        }
    };
    let a = create("/addr".into(), json!({}), "an address").await;
    let (id, addr) = (
        a["id"].as_i64().unwrap_or_default(),
        a["a"].as_str().unwrap_or_default().to_string(),
    );
    let config = json!({"url": sink, "template": r#"{"m": $msg}"#});
    let ep = create(
        format!("/addr/{id}/endpoint"),
        json!({"plugin_name": "webhook", "config": config}),
        "a webhook endpoint",
    )
    .await;
    let ep = ep["id"].as_i64().unwrap_or_default();
    let r = api(
        Method::POST,
        &format!("/addr/{id}/endpoint/{ep}/subscription"),
    )
    .json(&json!({"level": 10}))
    .send()
    .await;
    assert!(
        r.is_ok_and(|r| r.status().is_success()),
        "cannot subscribe on {base}"
    );
    addr
}

/// What the cluster benchmark measures besides the throughput rows.
#[derive(Default)]
struct ClusterFigures {
    /// A change through node 1, from its request until node 2 obeys it,
    /// per change; and how many node 2 did not obey yet at the first push
    /// after the change was answered.
    propagation: (Vec<Duration>, usize),
    /// SIGKILL of a node under load until the last event it accepted is
    /// delivered, and how many it accepted that were lost.
    failover: Option<(Duration, usize)>,
    /// Creating addresses one by one: mean and p99 of the first and of
    /// the last thousand.
    manage: Option<[(Duration, Duration); 2]>,
}

/// `--nodes N`: N of our servers on one database behind the same sink.
async fn cluster(
    args: &Args,
    sink: &Sink,
    clock: Instant,
    seq: &Arc<AtomicU64>,
) -> (Vec<Row>, ClusterFigures) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = database(args)
        .unwrap_or_else(|| format!("sqlite:///{}", dir.path().join("roboger.db").display()));
    let opts = ServerOptions {
        db: Some(db),
        ..our_server(args)
    };
    let mut nodes = Server::start_many(vec![opts; args.nodes]);
    let bases: Vec<String> = nodes.iter().map(|n| n.base.clone()).collect();
    let addr = wire_target(&bases[0], KEY, &sink.url).await;
    let mut rows = Vec::new();
    for (name, bases) in [
        ("1 node".to_string(), vec![bases[0].clone()]),
        (format!("{} nodes", bases.len()), bases.clone()),
    ] {
        let mut row = Row {
            name: format!("roboger (Rust), {name}"),
            ..Default::default()
        };
        let t = Target {
            bases,
            addr: addr.clone(),
        };
        measure(&mut row, &t, sink, args, clock, seq).await;
        rows.push(row);
    }
    let mut figures = ClusterFigures {
        propagation: propagation(&bases[0], &bases[1], 200).await,
        ..Default::default()
    };
    // Failover: node 1 takes a steady 1,000 pushes/s while the target
    // hangs, so its deliveries are in flight when it is killed after 1 s;
    // the target recovers at the kill, and the others must make them.
    let _ = sink.take();
    sink.hold.store(true, Ordering::Relaxed);
    let steady = Args {
        connections: 4,
        ..args.clone()
    };
    let t = Target {
        bases: vec![bases[0].clone()],
        addr: addr.clone(),
    };
    let load_task = {
        let (t, seq) = (t.clone(), seq.clone());
        tokio::spawn(async move { load(&t, &steady, 2.0, 1000, clock, &seq).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed_at = clock.elapsed();
    nodes[0].kill();
    sink.hold.store(false, Ordering::Relaxed);
    if let Ok(l) = load_task.await {
        let (log, missing) = drain(sink, &l.accepted, Duration::from_secs_f64(args.drain)).await;
        let accepted: HashSet<u64> = l.accepted.iter().copied().collect();
        let last = log
            .arrivals
            .iter()
            .filter(|(s, _)| accepted.contains(s))
            .map(|(_, at)| *at)
            .max()
            .unwrap_or(killed_at);
        figures.failover = Some((last.saturating_sub(killed_at), missing));
    }
    if args.manage > 0 {
        figures.manage = Some(manage_cost(&bases[1], args.manage).await);
    }
    (rows, figures)
}

/// Toggles an address's `active` through `a` `n` times; after each change
/// pushes to `b` until it answers accordingly (202 or 406). Each time runs
/// from the change's request (whose answer waits until every node obeys
/// it) and includes one push's round trip.
async fn propagation(a: &str, b: &str, n: usize) -> (Vec<Duration>, usize) {
    let c = reqwest::Client::new();
    let api = format!("{}/manage/v2", a.trim_end_matches('/'));
    let created: serde_json::Value = async {
        c.post(format!("{api}/addr"))
            .header("X-Auth-Key", KEY)
            .header("Accept", "*/*")
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()
    }
    .await
    .unwrap_or_default();
    let (id, addr) = (created["id"].clone(), created["a"].clone());
    let mut pusher = Pusher::new(&push_url(b)).expect("our own URL");
    let body = serde_json::to_vec(&json!({"addr": addr, "msg": "probe"})).unwrap_or_default();
    // Until the new address is known there.
    let end = Instant::now() + Duration::from_secs(10);
    while pusher.post(body.clone()).await != Some(202) && Instant::now() < end {}
    let mut times = Vec::with_capacity(n);
    let mut stale = 0;
    for i in 0..n {
        let active = i % 2;
        let want = if active == 1 { 202 } else { 406 };
        let changed = Instant::now();
        let r = c
            .patch(format!("{api}/addr/{id}"))
            .header("X-Auth-Key", KEY)
            .json(&json!({"active": active}))
            .send()
            .await;
        if !r.is_ok_and(|r| r.status().is_success()) {
            continue;
        }
        let mut first = true;
        while pusher.post(body.clone()).await != Some(want) {
            stale += usize::from(first);
            first = false;
            if changed.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        times.push(changed.elapsed());
    }
    times.sort();
    (times, stale)
}

/// Creates `n` addresses one by one through `base`; mean and p99 of the
/// first and of the last thousand (or tenth, when fewer).
async fn manage_cost(base: &str, n: usize) -> [(Duration, Duration); 2] {
    let c = reqwest::Client::new();
    let url = format!("{}/manage/v2/addr", base.trim_end_matches('/'));
    let mut took = Vec::with_capacity(n);
    for _ in 0..n {
        let began = Instant::now();
        let ok = c
            .post(&url)
            .header("X-Auth-Key", KEY)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            took.push(began.elapsed());
        }
    }
    let block = (took.len() / 10).clamp(1, 1000);
    let stats = |s: &[Duration]| {
        let mut s = s.to_vec();
        s.sort();
        let mean = s.iter().sum::<Duration>() / u32::try_from(s.len().max(1)).unwrap_or(1);
        (mean, percentile(&s, 0.99))
    };
    let first = stats(&took[..block.min(took.len())]);
    let last = stats(&took[took.len().saturating_sub(block)..]);
    [first, last]
}

/// The web console with `args.console` addresses (the first wired to the
/// sink, with 50 events): each kind of page fetched 50 times in a row
/// after 3 unmeasured fetches, on loopback, so the time is the server's.
async fn console_pages(args: &Args, sink: &Sink) -> std::process::ExitCode {
    let s = Server::start_with(single_server(args)).await;
    let addr = wire_target(&s.base, KEY, &sink.url).await;
    let c = roboger_tests::client();
    for i in 0..50 {
        let _ = c
            .post(s.url("/push"))
            .json(&json!({"addr": addr, "subject": format!("event {i}"), "msg": "x"}))
            .send()
            .await;
    }
    // The other addresses, 16 requests at a time.
    let made = Arc::new(AtomicU64::new(1));
    let goal = args.console as u64;
    let workers: Vec<_> = (0..16)
        .map(|_| {
            let (c, url, made) = (c.clone(), s.url("/manage/v2/addr"), made.clone());
            tokio::spawn(async move {
                while made.fetch_add(1, Ordering::Relaxed) < goal {
                    let _ = c.post(&url).header("X-Auth-Key", KEY).send().await;
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let signed = c
        .post(s.url("/ui/signin"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("key={KEY}"))
        .send()
        .await;
    let Some(cookie) = signed.ok().and_then(|r| {
        let v = r.headers().get("set-cookie")?.to_str().ok()?;
        Some(v.split(';').next()?.to_string())
    }) else {
        eprintln!("cannot sign in to the console");
        return std::process::ExitCode::FAILURE;
    };
    let n = args.console;
    let pages = [
        (
            "address list, first page (with the count)",
            "/ui/addr".to_string(),
        ),
        (
            "address list, last page",
            format!("/ui/addr?after={}", n.saturating_sub(50)),
        ),
        (
            "search with no match (reads every address)",
            "/ui/addr?q=~".into(),
        ),
        ("search by id", format!("/ui/addr?q={}", n / 2)),
        ("an address (endpoint, subscription)", "/ui/addr/1".into()),
        (
            "event history (20 of 50 events)",
            "/ui/addr/1/events".into(),
        ),
        ("plugins and nodes", "/ui/plugins".into()),
    ];
    println!("\nweb console with {n} addresses: server time per page (50 fetches)");
    println!(
        "{:<46} {:>9} {:>9} {:>9}",
        "page", "p50 ms", "p99 ms", "max ms"
    );
    for (name, path) in pages {
        let mut times = Vec::with_capacity(50);
        for i in 0..53 {
            let began = Instant::now();
            let r = c.get(s.url(&path)).header("Cookie", &cookie).send().await;
            let ok = match r {
                Ok(r) if r.status() == 200 => r.bytes().await.is_ok(),
                _ => false,
            };
            if !ok {
                eprintln!("{path} did not answer 200");
                return std::process::ExitCode::FAILURE;
            }
            if i >= 3 {
                times.push(began.elapsed());
            }
        }
        times.sort();
        println!(
            "{name:<46} {:>9} {:>9} {:>9}",
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99)),
            ms(times.last().copied().unwrap_or_default())
        );
    }
    std::process::ExitCode::SUCCESS
}

fn print_cluster(f: &ClusterFigures, args: &Args) {
    println!(
        "\ncluster: {} nodes on {}",
        args.nodes,
        database_name(args).unwrap_or("one SQLite file")
    );
    let (times, stale) = &f.propagation;
    if !times.is_empty() {
        println!(
            "propagation (change through node 1 until node 2 obeys, from the change's request, incl. one push): p50 {} ms, p99 {} ms, max {} ms over {} changes; {stale} not obeyed by node 2 when answered",
            ms(percentile(times, 0.5)),
            ms(percentile(times, 0.99)),
            ms(times.last().copied().unwrap_or_default()),
            times.len()
        );
    }
    if let Some((d, lost)) = f.failover {
        println!(
            "failover: node 1 SIGKILLed under 1,000 pushes/s to a hanging target, which then recovers; every event it accepted delivered by the others {} ms later; {lost} lost",
            ms(d)
        );
    }
    if let Some([(m0, p0), (m1, p1)]) = f.manage {
        println!(
            "management: creating addresses 1 by 1 up to {}: first block mean {} ms (p99 {}), last block mean {} ms (p99 {})",
            args.manage,
            ms(m0),
            ms(p0),
            ms(m1),
            ms(p1)
        );
    }
}

fn mib(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_else(|| "-".into())
}

fn print(rows: &[Row], args: &Args) {
    println!(
        "\nload: {} connections, {}, {} s, {} B message, {} B media",
        args.connections,
        if args.rate > 0 {
            format!("{} pushes/s offered", args.rate)
        } else {
            "closed loop".into()
        },
        args.duration,
        args.payload,
        args.media
    );
    println!(
        "{:<34} {:>10} {:>10} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>6}",
        "server",
        "accepted/s",
        "deliver/s",
        "push50",
        "push99",
        "push999",
        "e2e50",
        "e2e99",
        "lost",
        "rss-idle",
        "rss-peak",
        "plug-idle",
        "plug-peak",
        "restart",
        "steal%"
    );
    for r in rows {
        println!(
            "{:<34} {:>10.0} {:>10.0} {:>8} {:>8} {:>8} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9} {:>10} {:>6}",
            r.name,
            r.accepted_per_s,
            r.delivered_per_s,
            ms(r.push_p50),
            ms(r.push_p99),
            ms(r.push_p999),
            ms(r.deliver_p50),
            ms(r.deliver_p99),
            r.lost,
            mib(r.rss_idle),
            mib(r.rss_peak),
            mib(r.plugin_idle),
            mib(r.plugin_peak),
            r.restart
                .map(|d| format!("{} ms", ms(d)))
                .unwrap_or_else(|| "-".into()),
            r.steal
                .map(|p| format!("{p:.0}"))
                .unwrap_or_else(|| "-".into()),
        );
        if r.refused + r.errors > 0 {
            println!("  ({} pushes refused, {} failed)", r.refused, r.errors);
        }
        if let Some(lost) = r.restart_lost {
            println!(
                "  plugin SIGKILL: back in {}, {lost} accepted events lost",
                r.restart
                    .map(|d| format!("{} ms", ms(d)))
                    .unwrap_or_default()
            );
        }
    }
    if let [ours, theirs] = rows
        && args.nodes < 2
        && theirs.delivered_per_s > 0.0
    {
        println!(
            "ratio (ours / target): accepted {:.1}x, delivered {:.1}x",
            ours.accepted_per_s / theirs.accepted_per_s.max(f64::MIN_POSITIVE),
            ours.delivered_per_s / theirs.delivered_per_s
        );
    }
    println!(
        "latencies in ms; push = until the 202, e2e = push to the sink; RSS in MiB (peak = VmHWM);\nsteal% = CPU time the hypervisor took from this machine during the load (noisy runs)"
    );
}

/// Exits 1 when any server lost an accepted event (under load or across
/// the plugin kill): the figures mean nothing if events were lost.
#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(t) = &args.target
        && Pusher::new(&push_url(t)).is_none()
    {
        eprintln!("--target must be a plain http://host:port URL, not {t}");
        return std::process::ExitCode::from(2);
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let clock = Instant::now();
    let sink = Sink::start(args.sink_port, clock).await;
    let seq = Arc::new(AtomicU64::new(1));
    let mut rows = Vec::new();
    if args.console > 0 {
        return console_pages(&args, &sink).await;
    }
    if args.nodes > 1 {
        let (rows, figures) = cluster(&args, &sink, clock, &seq).await;
        print(&rows, &args);
        print_cluster(&figures, &args);
        let lost =
            rows.iter().any(|r| r.lost > 0) || figures.failover.is_some_and(|(_, lost)| lost > 0);
        if lost {
            eprintln!("accepted events were lost");
            return std::process::ExitCode::FAILURE;
        }
        return std::process::ExitCode::SUCCESS;
    }
    if !args.only_target {
        rows.push(own_server(&args, &sink, clock, &seq).await);
    }
    if let Some(base) = &args.target {
        let _ = sink.take();
        rows.push(other_server(&args, base, &sink, clock, &seq).await);
    }
    print(&rows, &args);
    if rows
        .iter()
        .any(|r| r.lost > 0 || r.restart_lost.is_some_and(|n| n > 0))
    {
        eprintln!("accepted events were lost");
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}
