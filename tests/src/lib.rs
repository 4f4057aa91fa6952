//! Test harness for the end-to-end suite: starts the real `roboger-server`
//! binary on a free loopback port with its own database and config in a
//! temp dir, and talks HTTP to it.
//!
//! The database is SQLite unless `ROBOGER_TEST_PG` holds a PostgreSQL
//! server URL (e.g. `postgresql://postgres@127.0.0.1:55432`); then every
//! server gets a fresh database on it, created with `psql`. `tests/run`
//! runs the suite both ways.
//!
//! [`fuzz`] holds the bodies of the fuzz targets, shared by `cargo fuzz`
//! (`tests/fuzz`) and the corpus replay in the suite.

pub mod db_proxy;
pub mod fuzz;
pub mod live_log;
pub mod robogerctl;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

pub use live_log::LiveLog;
use std::time::{Duration, Instant};

pub use reqwest::{Method, StatusCode};
pub use serde_json::{Value, json};

/// The master key every test server is configured with.
pub const KEY: &str = "test-master-key";

/// Where the workspace's binaries are (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ROBOGER_BIN_DIR") {
        return PathBuf::from(d);
    }
    // Test executables live in target/<profile>/deps, the benchmark in
    // target/<profile>.
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe.parent().expect("an executable has a directory");
    if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of the server binary; panics with advice when it is not built.
pub fn server_bin() -> PathBuf {
    let p = bin_dir().join("roboger-server");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first (cargo build --workspace --locked), or run tests/run",
        p.display()
    );
    p
}

/// The SHA-256 of `bytes` as a plugin entry's `sha256` pins it (hex).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Path of the misbehaving test plugin (`tests/src/bin/roboger-test-plugin.rs`).
pub fn test_plugin_bin() -> PathBuf {
    let p = bin_dir().join("roboger-test-plugin");
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first",
        p.display()
    );
    p
}

static DB_SEQ: AtomicU32 = AtomicU32::new(0);

/// The condition, after `WHERE`, that selects the deliveries of endpoint
/// `{ep}` that wait years for their next try
/// ([`Server::endpoint_with_waiting_backlog`]).
pub fn waiting_years(ep: i64) -> String {
    format!("endpoint_id = {ep} AND state = 'pending' AND next_at > '2030-01-01'")
}

/// A database URL for a new server, in `dir` (SQLite), on the PostgreSQL
/// server named by `ROBOGER_TEST_PG`, or on the MySQL/MariaDB server named
/// by `ROBOGER_TEST_MYSQL` (e.g. `mysql://root@127.0.0.1:3307`).
pub fn fresh_database(dir: &Path) -> String {
    if let Ok(my) = std::env::var("ROBOGER_TEST_MYSQL")
        && !my.is_empty()
    {
        return create_mysql_database(&my);
    }
    match std::env::var("ROBOGER_TEST_PG") {
        Ok(pg) if !pg.is_empty() => create_pg_database(&pg),
        _ => format!("sqlite:///{}", dir.join("roboger.db").display()),
    }
}

/// Creates a fresh database on the MySQL or MariaDB server `my` (a URL
/// without a database, e.g. `mysql://root@127.0.0.1:3306`); its URL.
pub fn create_mysql_database(my: &str) -> String {
    let name = fresh_database_name();
    let my = my.trim_end_matches('/');
    let url = url::Url::parse(my).expect("a MySQL server's URL");
    let mut c = mariadb_client(&url);
    // In the server's default character set, as an operator's
    // `CREATE DATABASE roboger` makes it: `latin1` on the suite's
    // MariaDB, which runs with `--no-defaults`.
    c.args(["-e", &format!("CREATE DATABASE {name}")]);
    run_client(c, "CREATE DATABASE");
    format!("{my}/{name}")
}

/// Runs a database's command-line client (`psql`, `mariadb`) as set up in
/// `c`; panics, saying `what` failed and the client's error, when it
/// cannot run or fails.
fn run_client(mut c: Command, what: &str) {
    let out = c
        .output()
        .unwrap_or_else(|e| panic!("{what}: the client does not run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `mariadb` command-line client, connected to the server of `url`
/// as its user.
pub fn mariadb_client(url: &url::Url) -> Command {
    let mut c = Command::new("mariadb");
    // The suite's server has `autocommit` off (see tests/run): the test's
    // own statements commit as they go, as a client's do by default.
    c.arg("--init-command=SET autocommit = 1")
        .args(["-h", url.host_str().unwrap_or("127.0.0.1")])
        .args(["-P", &url.port().unwrap_or(3306).to_string()])
        .args(["-u", url.username()]);
    c
}

/// A test's own session on its server's database, to run SQL behind the
/// server's back: the database's command-line client (`psql`, `mariadb`)
/// or, for SQLite, Python's `sqlite3` module (with foreign keys on).
pub enum DbClient {
    Sqlite(PathBuf),
    Pg(String),
    My { url: url::Url, name: String },
}

impl DbClient {
    /// The client of a database URL [`fresh_database`] made.
    pub fn of(db_url: &str) -> DbClient {
        if db_url.starts_with("postgres") {
            DbClient::Pg(db_url.to_string())
        } else if db_url.starts_with("mysql") {
            let url = url::Url::parse(db_url).expect("a URL");
            let name = url.path().trim_start_matches('/').to_string();
            DbClient::My { url, name }
        } else {
            let path = db_url.trim_start_matches("sqlite://");
            DbClient::Sqlite(PathBuf::from(path.split('?').next().unwrap_or(path)))
        }
    }

    /// The command that runs SQL given after it (`-c` for psql, `-e` for
    /// mariadb, an argument for SQLite), or reads it from its stdin
    /// (psql and mariadb).
    pub fn command(&self) -> Command {
        match self {
            DbClient::Pg(url) => {
                let mut c = Command::new("psql");
                c.arg(url).args(["-v", "ON_ERROR_STOP=1", "-qtA"]);
                c
            }
            DbClient::My { url, name } => {
                let mut c = mariadb_client(url);
                c.args(["-N", "-B", name]);
                c
            }
            DbClient::Sqlite(path) => {
                let python = std::env::var_os("ROBOGER_TEST_PYTHON").unwrap_or("python3".into());
                let mut c = Command::new(python);
                c.args([
                    "-c",
                    "import sqlite3, sys\n\
                     c = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)\n\
                     c.execute('PRAGMA foreign_keys = ON')\n\
                     st = ''\n\
                     for part in sys.argv[2].split(';'):\n\
                     \x20   st += part + ';'\n\
                     \x20   if not sqlite3.complete_statement(st):\n\
                     \x20       continue\n\
                     \x20   for row in c.execute(st):\n\
                     \x20       print('\\t'.join(str(v) for v in row))\n\
                     \x20   st = ''\n\
                     if st.strip(' ;\\n'):\n\
                     \x20   c.execute(st)\n",
                ])
                .arg(path);
                c
            }
        }
    }

    /// Runs `sql` (statements separated by `;`) in a session of its own;
    /// its output, trimmed. Panics, with the client's error, on failure.
    pub fn query(&self, sql: &str) -> String {
        let mut c = self.command();
        match self {
            DbClient::Pg(_) => c.args(["-c", sql]),
            DbClient::My { .. } => c.args(["-e", sql]),
            DbClient::Sqlite(_) => c.arg(sql),
        };
        let out = c.output().expect("the database client runs");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Makes the database refuse, with an error, each update of a `table`
    /// row whose new values match `when` (an SQL condition on `NEW.column`
    /// that the three databases all read alike), until
    /// [`DbClient::allow_writes`]: one kind of write fails while the
    /// database stays up for every other.
    pub fn refuse_updates(&self, table: &str, when: &str) {
        self.refuse("UPDATE", table, when);
    }

    /// As [`DbClient::refuse_updates`], for each row inserted.
    pub fn refuse_inserts(&self, table: &str, when: &str) {
        self.refuse("INSERT", table, when);
    }

    /// As [`DbClient::refuse_updates`], for each row deleted (`when` on
    /// `OLD.column`).
    pub fn refuse_deletes(&self, table: &str, when: &str) {
        self.refuse("DELETE", table, when);
    }

    fn refuse(&self, op: &str, table: &str, when: &str) {
        let why = "'refused by the test'";
        let sql = match self {
            DbClient::Pg(_) => format!(
                "CREATE FUNCTION roboger_test_refuse() RETURNS trigger LANGUAGE plpgsql \
                 AS $$ BEGIN RAISE EXCEPTION {why}; END $$; \
                 CREATE TRIGGER roboger_test_refuse BEFORE {op} ON {table} FOR EACH ROW \
                 WHEN ({when}) EXECUTE FUNCTION roboger_test_refuse()"
            ),
            DbClient::My { .. } => format!(
                "DELIMITER //\nCREATE TRIGGER roboger_test_refuse BEFORE {op} ON {table} \
                 FOR EACH ROW BEGIN IF {when} THEN SIGNAL SQLSTATE '45000' \
                 SET MESSAGE_TEXT = {why}; END IF; END//\nDELIMITER ;\n"
            ),
            DbClient::Sqlite(_) => format!(
                "CREATE TRIGGER roboger_test_refuse BEFORE {op} ON {table} WHEN {when} \
                 BEGIN SELECT RAISE(ABORT, {why}); END"
            ),
        };
        if let DbClient::My { .. } = self {
            // `-e` cuts a statement at each `;`, the ones in a trigger's
            // body too; the client reads `DELIMITER` on its standard input.
            let mut child = self
                .command()
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("the database client runs");
            if let Some(mut stdin) = child.stdin.take() {
                std::io::Write::write_all(&mut stdin, sql.as_bytes()).expect("write SQL");
            }
            let out = child.wait_with_output().expect("the database client runs");
            assert!(
                out.status.success(),
                "{sql}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            self.query(&sql);
        }
    }

    /// Undoes [`DbClient::refuse_updates`] (or `refuse_inserts`,
    /// `refuse_deletes`) on `table`.
    pub fn allow_writes(&self, table: &str) {
        match self {
            DbClient::Pg(_) => self.query(&format!(
                "DROP TRIGGER roboger_test_refuse ON {table}; DROP FUNCTION roboger_test_refuse()"
            )),
            _ => self.query("DROP TRIGGER roboger_test_refuse"),
        };
    }

    /// Writes `n` copies of the database's one event and its delivery straight
    /// to it, with ids that sort before it; one copy in `pending_every` is
    /// pending, due ten years from now, so that nothing delivers it meanwhile
    /// (on MySQL, at the start of 2038 at the latest: its times end then).
    pub fn copy_history(&self, n: u64, pending_every: u64) {
        let (num, later) = if on_postgres() {
            ("lpad(i::text, 12, '0')", "next_at + interval '10 years'")
        } else if on_mysql() {
            (
                "LPAD(i, 12, '0')",
                "LEAST(next_at + INTERVAL 10 YEAR, TIMESTAMP '2038-01-01 00:00:00')",
            )
        } else {
            (
                "substr('00000000000' || i, -12)",
                "(CAST(substr(next_at, 1, 4) AS INTEGER) + 10) || substr(next_at, 5)",
            )
        };
        let (deeper, series) = series(n);
        let copy_id = if on_mysql() {
            format!("CONCAT('00000000-0000-7000-8000-', {num})")
        } else {
            format!("'00000000-0000-7000-8000-' || {num}")
        };
        self.query(&format!(
            "{deeper}INSERT INTO event (id, addr_id, addr, msg, subject, formatted_subject, level, \
             location, tag, sender, media, media_fname, created) {series} \
             SELECT {copy_id}, addr_id, addr, msg, subject, formatted_subject, level, location, \
             tag, sender, media, media_fname, created FROM s, event"
        ));
        self.query(&format!(
            "{deeper}INSERT INTO delivery (event_id, endpoint_id, state, attempts, next_at, created, \
             updated) {series} \
             SELECT {copy_id}, endpoint_id, \
             CASE WHEN i % {pending_every} = 0 THEN 'pending' ELSE state END, attempts, \
             CASE WHEN i % {pending_every} = 0 THEN {later} ELSE next_at END, created, updated \
             FROM s, delivery"
        ));
    }

    /// Writes `n` addresses straight to the database, each its own
    /// 64-character string (`x` and its number, padded with zeros).
    pub fn copy_addr(&self, n: u64) {
        let a = if on_postgres() {
            "lpad('x' || i::text, 64, '0')".to_string()
        } else if on_mysql() {
            "LPAD(CONCAT('x', i), 64, '0')".to_string()
        } else {
            format!("substr('{}' || 'x' || i, -64)", "0".repeat(64))
        };
        let (deeper, series) = series(n);
        self.query(&format!(
            "{deeper}INSERT INTO addr (a, active, lim_c, lim_s) {series} SELECT {a}, 1, 100, \
             10000000 FROM s"
        ));
    }

    /// Writes `n` copies of endpoint `ep` straight to the database, on its
    /// address, active or not, each with copies of its subscriptions. `ep`
    /// is to be its address's newest endpoint: every endpoint of the
    /// address with a higher id gets copies of its subscriptions.
    pub fn copy_endpoint(&self, ep: i64, n: u64, active: bool) {
        let (deeper, series) = series(n);
        self.query(&format!(
            "{deeper}INSERT INTO endpoint (addr_id, plugin_name, config, active, description) \
             {series} SELECT addr_id, plugin_name, config, {}, description FROM s, endpoint \
             WHERE id = {ep}",
            i32::from(active)
        ));
        self.query(&format!(
            "INSERT INTO subscription (endpoint_id, active, location, tag, sender, level, \
             level_match) SELECT e.id, s.active, s.location, s.tag, s.sender, s.level, \
             s.level_match FROM endpoint e, subscription s WHERE s.endpoint_id = {ep} \
             AND e.id > {ep} AND e.addr_id = (SELECT addr_id FROM endpoint WHERE id = {ep})"
        ));
    }
}

/// A series `s(i)` of 1 to `n` to put before an `INSERT`'s `SELECT`, and
/// what MariaDB needs said first (it stops a recursion at 1000 steps
/// unless told otherwise).
fn series(n: u64) -> (String, String) {
    let deeper = if on_mysql() {
        format!("SET SESSION max_recursive_iterations = {n}; ")
    } else {
        String::new()
    };
    (
        deeper,
        format!("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n})"),
    )
}

/// Creates a fresh database on the PostgreSQL server at `pg` (a URL
/// without a database, e.g. `postgresql://postgres@127.0.0.1:5432`) with
/// `psql`; returns its URL.
pub fn create_pg_database(pg: &str) -> String {
    let name = fresh_database_name();
    let pg = pg.trim_end_matches('/');
    let mut c = Command::new("psql");
    c.arg(format!("{pg}/postgres")).args([
        "-v",
        "ON_ERROR_STOP=1",
        "-qc",
        &format!("CREATE DATABASE {name}"),
    ]);
    run_client(c, "createdb");
    format!("{pg}/{name}")
}

/// A fresh database on the suite's PostgreSQL or MySQL server, reached
/// as a user of its own that the database server lets open at most
/// `limit` connections at once (a PostgreSQL role's `CONNECTION LIMIT`,
/// a MySQL account's `MAX_USER_CONNECTIONS`); its URL. `None` on SQLite.
pub fn database_with_connection_limit(limit: u32) -> Option<String> {
    let name = fresh_database_name();
    if on_mysql() {
        let my = std::env::var("ROBOGER_TEST_MYSQL").unwrap_or_default();
        let my = url::Url::parse(my.trim_end_matches('/')).expect("ROBOGER_TEST_MYSQL is a URL");
        let mut c = mariadb_client(&my);
        c.args([
            "-e",
            &format!(
                "CREATE DATABASE {name}; \
                 CREATE USER '{name}'@'127.0.0.1' WITH MAX_USER_CONNECTIONS {limit}; \
                 GRANT ALL ON {name}.* TO '{name}'@'127.0.0.1'"
            ),
        ]);
        run_client(c, "CREATE USER with a connection limit");
        let mut url = my.clone();
        url.set_username(&name).expect("a user name");
        url.set_path(&name);
        return Some(url.to_string());
    }
    if !on_postgres() {
        return None;
    }
    let pg = std::env::var("ROBOGER_TEST_PG").unwrap_or_default();
    let pg = pg.trim_end_matches('/');
    let mut c = Command::new("psql");
    c.arg(format!("{pg}/postgres"))
        .args(["-v", "ON_ERROR_STOP=1", "-q"])
        .args([
            "-c",
            &format!("CREATE ROLE {name} LOGIN CONNECTION LIMIT {limit}"),
        ])
        .args(["-c", &format!("CREATE DATABASE {name} OWNER {name}")]);
    run_client(c, "CREATE ROLE with a connection limit");
    let mut url = url::Url::parse(pg).expect("ROBOGER_TEST_PG is a URL");
    url.set_username(&name).expect("a user name");
    url.set_path(&name);
    Some(url.to_string())
}

/// A database name no other server has, in this run or an earlier one on
/// the same database server.
fn fresh_database_name() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    format!(
        "roboger_t{now}_{}_{}",
        std::process::id(),
        DB_SEQ.fetch_add(1, Ordering::SeqCst)
    )
}

/// Whether the suite runs against MySQL/MariaDB.
pub fn on_mysql() -> bool {
    std::env::var("ROBOGER_TEST_MYSQL").is_ok_and(|v| !v.is_empty())
}

/// Whether the suite runs against PostgreSQL.
pub fn on_postgres() -> bool {
    std::env::var("ROBOGER_TEST_PG").is_ok_and(|v| !v.is_empty())
}

/// More endpoints than one statement of the suite's database takes bound
/// parameters (SQLite takes 32,766; PostgreSQL and MySQL 65,535).
pub fn more_than_a_statement_takes() -> u64 {
    if on_postgres() || on_mysql() {
        66_000
    } else {
        33_000
    }
}

/// The environment that sets a server's wall clock off by the offset
/// written in `file` (e.g. `+30s`, read again every second) through
/// libfaketime, which `tests/run` installs (Debian's `libfaketime`); its
/// monotonic clock, which timers use, stays true.
pub fn clock_set(file: &Path) -> Vec<(String, String)> {
    let lib = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|d| d.path().join("faketime/libfaketime.so.1"))
        .find(|p| p.exists())
        .expect("libfaketime is installed (tests/run installs it)");
    vec![
        ("LD_PRELOAD".into(), lib.display().to_string()),
        ("FAKETIME_TIMESTAMP_FILE".into(), file.display().to_string()),
        ("FAKETIME_CACHE_DURATION".into(), "1".into()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
    ]
}

/// How to start a server: extra YAML under `roboger:` and extra environment.
#[derive(Default, Clone)]
pub struct ServerOptions {
    /// Lines of YAML appended under `roboger:` (indented by the harness).
    pub yaml: String,
    /// Lines of YAML appended under `roboger.master:` (after the key).
    pub master_yaml: String,
    /// Plugins to configure, by name; each runs the test plugin
    /// (`roboger-test-plugin`, which accepts any endpoint config).
    pub plugins: Vec<String>,
    /// Raw YAML of more plugin entries (`- name: …` lines), appended
    /// under `plugins:`.
    pub plugins_yaml: String,
    /// Environment variables for the server process.
    pub env: Vec<(String, String)>,
    /// A command the server runs under: the program and its arguments,
    /// followed by the server's command line (e.g. a wrapper that
    /// changes what the kernel lets it do).
    pub wrapper: Vec<String>,
    /// A database to share with other servers (see [`shared_database`]);
    /// by default each server gets a fresh one.
    pub db: Option<String>,
    /// Lines of YAML under `roboger:` in place of `listen: 127.0.0.1:0`
    /// (e.g. a `gunicorn:` section naming a Unix socket, which the
    /// server's [`Server::http`] then reaches).
    pub listen_yaml: Option<String>,
    /// Whether the configuration names files holding the database URL
    /// and the master key (`secrets/db` and `secrets/master.key` in the
    /// server's directory) rather than giving them inline.
    pub secrets_in_files: bool,
}

impl ServerOptions {
    /// A server running the built-in plugin `name` (its executable from
    /// this build), with `yaml` under `roboger:`.
    pub fn builtin(name: &str, yaml: &str) -> ServerOptions {
        ServerOptions {
            yaml: yaml.to_string(),
            plugins_yaml: format!(
                "- name: {name}\n  command: {}\n",
                plugin_bin(name).display()
            ),
            ..Default::default()
        }
    }

    /// A server running the misbehaving test plugin as plugin `t`, with
    /// `yaml` under `roboger:`.
    pub fn test_plugin(yaml: &str) -> ServerOptions {
        ServerOptions {
            plugins: vec!["t".into()],
            yaml: yaml.to_string(),
            ..Default::default()
        }
    }

    /// The test plugin as `t` (see [`ServerOptions::test_plugin`]),
    /// recording its calls in `record` (read them with [`plugin_calls`]).
    pub fn recording_test_plugin(record: &Path) -> ServerOptions {
        ServerOptions {
            env: vec![("TEST_PLUGIN_RECORD".into(), record.display().to_string())],
            ..ServerOptions::test_plugin("")
        }
    }
}

/// A database for several servers at once (a cluster): a fresh one on
/// PostgreSQL or MySQL, else a SQLite file in the returned directory.
pub fn shared_database() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = fresh_database(dir.path());
    (dir, url)
}

/// Another process (Python's `sqlite3`) holding SQLite's exclusive lock
/// on the database file `db` until dropped: no other connection can read
/// or write it meanwhile.
pub struct SqliteLock(Child);

impl SqliteLock {
    /// Returns once the lock is held.
    pub fn take(db: &Path) -> SqliteLock {
        let python = std::env::var_os("ROBOGER_TEST_PYTHON").unwrap_or("python3".into());
        let mut child = Command::new(python)
            .args([
                "-c",
                "import sqlite3, sys\n\
                 c = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)\n\
                 c.execute('BEGIN EXCLUSIVE')\n\
                 print('locked', flush=True)\n\
                 sys.stdin.read()\n",
            ])
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("run python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("read from python3");
        assert_eq!(line.trim(), "locked");
        SqliteLock(child)
    }
}

impl Drop for SqliteLock {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends `signal` (a name `kill` knows: `STOP`, `HUP`, ...) to `child`.
fn send_signal(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(child.id().to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{signal} {} failed", child.id());
}

/// A server whose process is started but not yet listening.
pub struct Starting {
    child: Child,
    addr: std::sync::mpsc::Receiver<String>,
    log: Arc<LiveLog>,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    config_path: PathBuf,
    db: String,
    dir: tempfile::TempDir,
}

impl Starting {
    /// Waits until its log contains `needle` (or panics after `timeout`).
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for_log(&self.log, needle, timeout).await;
    }

    /// Sends `signal` (a name `kill` knows) to it while it starts.
    pub fn signal(&self, signal: &str) {
        send_signal(&self.child, signal);
    }

    /// Kills it (a server that is not to listen) and waits for it to be
    /// gone.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until it listens (or panics with its log after 30 s).
    pub fn wait(self) -> Server {
        let (child, addr, log) = wait_listening(self.child, self.addr, self.log);
        let (base, http) = reach(&addr);
        Server {
            child,
            env: self.env,
            wrapper: self.wrapper,
            base,
            config_path: self.config_path,
            db: self.db,
            log,
            dir: self.dir,
            http,
        }
    }
}

/// A running `roboger-server` process; killed when dropped.
pub struct Server {
    child: Child,
    env: Vec<(String, String)>,
    wrapper: Vec<String>,
    /// `http://127.0.0.1:PORT` (`http://localhost` over a Unix socket)
    pub base: String,
    /// The config file it was started with.
    pub config_path: PathBuf,
    /// The URL of its database.
    pub db: String,
    /// Everything the server wrote to stderr so far.
    pub log: Arc<LiveLog>,
    /// Its temp dir (database, config, data dir).
    pub dir: tempfile::TempDir,
    /// An HTTP client that does not follow redirects.
    pub http: reqwest::Client,
}

impl Server {
    /// Starts a server with the default test configuration.
    pub async fn start() -> Server {
        Server::start_with(ServerOptions::default()).await
    }

    /// Starts a server with extra configuration.
    pub async fn start_with(opts: ServerOptions) -> Server {
        Server::spawn(opts).wait()
    }

    /// Starts several servers at the same moment, then waits for each.
    pub fn start_many(opts: Vec<ServerOptions>) -> Vec<Server> {
        let starting: Vec<Starting> = opts.into_iter().map(Server::spawn).collect();
        starting.into_iter().map(Starting::wait).collect()
    }

    /// Starts a server's process without waiting for it to listen.
    pub fn spawn(opts: ServerOptions) -> Starting {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = match &opts.db {
            Some(db) => db.clone(),
            None => fresh_database(dir.path()),
        };
        let (db_value, key_value) = if opts.secrets_in_files {
            let secrets = dir.path().join("secrets");
            std::fs::create_dir(&secrets).expect("mkdir secrets");
            let (db_file, key_file) = (secrets.join("db"), secrets.join("master.key"));
            std::fs::write(&db_file, &db).expect("write the database URL");
            std::fs::write(&key_file, KEY).expect("write the master key");
            (
                db_file.display().to_string(),
                key_file.display().to_string(),
            )
        } else {
            (db.clone(), KEY.to_string())
        };
        let mut yaml = format!("roboger:\n  db: {db_value}\n  master:\n    key: {key_value}\n");
        for line in opts.master_yaml.lines() {
            yaml.push_str("    ");
            yaml.push_str(line);
            yaml.push('\n');
        }
        let listen = opts.listen_yaml.as_deref().unwrap_or("listen: 127.0.0.1:0");
        for line in listen.lines() {
            yaml.push_str("  ");
            yaml.push_str(line);
            yaml.push('\n');
        }
        if !opts.yaml.lines().any(|l| l.starts_with("timeout:")) {
            yaml.push_str("  timeout: 2\n");
        }
        // Plugins may write where tests keep their files (records, outputs);
        // the sandbox tests set their own.
        if !opts.yaml.lines().any(|l| l.starts_with("sandbox:")) {
            yaml.push_str(&format!(
                "  sandbox:\n    writable: [{}]\n",
                std::env::temp_dir().display()
            ));
        }
        if !opts.plugins.is_empty() || !opts.plugins_yaml.is_empty() {
            yaml.push_str("  plugins:\n");
            for p in &opts.plugins {
                yaml.push_str(&format!(
                    "    - name: {p}\n      command: {}\n",
                    test_plugin_bin().display()
                ));
            }
            for line in opts.plugins_yaml.lines() {
                yaml.push_str("    ");
                yaml.push_str(line);
                yaml.push('\n');
            }
        }
        for line in opts.yaml.lines() {
            yaml.push_str("  ");
            yaml.push_str(line);
            yaml.push('\n');
        }
        let config_path = dir.path().join("roboger.yml");
        std::fs::write(&config_path, yaml).expect("write config");
        let (child, addr, log) = spawn_logged(server_command(
            &config_path,
            dir.path(),
            &opts.env,
            &opts.wrapper,
        ));
        Starting {
            child,
            addr,
            log,
            env: opts.env,
            wrapper: opts.wrapper,
            config_path,
            db,
            dir,
        }
    }

    /// Its log so far (stdout and stderr).
    pub fn log_text(&self) -> String {
        self.log.text()
    }

    /// The lines of its log so far that contain `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.log_text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Its `/metrics`, read with the master key as bearer token, parsed
    /// ([`parse_metrics`]); panics unless it is a 200 in Prometheus's text
    /// format.
    pub async fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        let bearer = format!("Bearer {KEY}");
        let r = self
            .request(
                Method::GET,
                "/metrics",
                None,
                &[("Authorization", &bearer)],
                None,
            )
            .await;
        assert_eq!(r.status.as_u16(), 200, "/metrics: {}", r.text);
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("text/plain; version=0.0.4")),
            "{:?}",
            r.header("content-type")
        );
        parse_metrics(&r.text)
    }

    /// A page of its web console, as an operator signed in with the
    /// master key sees it; panics unless sign-in and page answer as they
    /// should.
    pub async fn console_page(&self, path: &str) -> String {
        let signed = self
            .http
            .post(self.url("/ui/signin"))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(format!("key={KEY}"))
            .send()
            .await
            .expect("POST /ui/signin");
        assert_eq!(signed.status().as_u16(), 303, "sign-in");
        let cookie = signed
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .expect("a session cookie")
            .to_string();
        let r = self
            .http
            .get(self.url(path))
            .header("Cookie", cookie)
            .send()
            .await
            .expect("GET a console page");
        assert_eq!(r.status().as_u16(), 200, "{path}");
        r.text().await.expect("the page")
    }

    /// Scrapes `/metrics` until `series` has `value` (or panics after 20
    /// s); the last scrape.
    pub async fn metric_reaches(
        &self,
        series: &str,
        value: f64,
    ) -> std::collections::BTreeMap<String, f64> {
        poll_until(Duration::from_secs(20), async || {
            let m = self.metrics().await;
            if m.get(series) == Some(&value) {
                return Ok(m);
            }
            Err(format!("{series} never became {value}: {m:#?}"))
        })
        .await
    }

    /// A client of its database, to look at it or change it behind its back.
    pub fn db_client(&self) -> DbClient {
        DbClient::of(&self.db)
    }

    /// The full URL of `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A management API request (`path` below `/manage/v2`) with the key.
    pub async fn manage(&self, method: Method, path: &str, body: Option<Value>) -> Resp {
        self.request(
            method,
            &format!("/manage/v2{path}"),
            Some(KEY),
            &[("Accept", "*/*")],
            body,
        )
        .await
    }

    /// Any request, with an optional key, extra headers and JSON body.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Resp {
        let mut rb = self.http.request(method, self.url(path));
        if let Some(k) = key {
            rb = rb.header("X-Auth-Key", k);
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        Resp::from(rb.send().await.expect("HTTP request to the test server")).await
    }

    /// The event of address `id` whose message is `msg`, found among its
    /// newest `within` events, as one event's GET gives it (with each
    /// delivery).
    pub async fn event_by_msg(&self, id: i64, msg: &str, within: usize) -> Value {
        let events = self
            .manage(
                Method::GET,
                &format!("/addr/{id}/event?limit={within}"),
                None,
            )
            .await
            .json();
        let ev = events
            .as_array()
            .and_then(|l| l.iter().find(|e| e["msg"] == msg))
            .and_then(|e| e["id"].as_str())
            .unwrap_or_else(|| panic!("the event {msg:?} is not listed: {events}"))
            .to_string();
        self.manage(Method::GET, &format!("/addr/{id}/event/{ev}"), None)
            .await
            .json()
    }

    /// A new address whose endpoint of the test plugin `t` delivered one
    /// event, and `n` copies of that event and its delivery written
    /// straight to the database through `db` ([`DbClient::copy_history`]):
    /// the address's id and string, and the endpoint's id.
    pub async fn addr_with_history(&self, db: &DbClient, n: u64) -> (i64, String, i64) {
        let (id, a) = self.new_addr().await;
        let ep = self.endpoint(id, "t", json!({})).await;
        let r = self.push(json!({"addr": a, "msg": "m"})).await;
        assert_eq!(r.status.as_u16(), 202, "the push: {}", r.text);
        self.wait_settled(id).await;
        db.copy_history(n, n);
        (id, a, ep)
    }

    /// A new address whose endpoint of the test plugin `t` fails every
    /// try, and a backlog of it: its one event, tried once, and `n` copies
    /// of its delivery written straight to the database through `db`,
    /// each pending and due ten years from now ([`waiting_years`] selects
    /// them). The address's id and string, and the endpoint's id.
    pub async fn endpoint_with_waiting_backlog(&self, db: &DbClient, n: u64) -> (i64, String, i64) {
        let (id, a) = self.new_addr().await;
        let ep = self.endpoint(id, "t", json!({"fail": "down"})).await;
        let r = self.push(json!({"addr": a, "msg": "m"})).await;
        assert_eq!(r.status.as_u16(), 202, "the push: {}", r.text);
        poll_until(Duration::from_secs(20), async || {
            match db
                .query("SELECT count(*) FROM delivery WHERE attempts > 0")
                .as_str()
            {
                "0" => Err("not tried yet".to_string()),
                _ => Ok(()),
            }
        })
        .await;
        db.copy_history(n, 1);
        (id, a, ep)
    }

    /// Creates an address; returns its id and its 64-character string.
    pub async fn new_addr(&self) -> (i64, String) {
        let r = self.manage(Method::POST, "/addr", None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let a = r.json();
        match (a["id"].as_i64(), a["a"].as_str()) {
            (Some(id), Some(s)) => (id, s.to_string()),
            _ => panic!("not an addr: {a}"),
        }
    }

    /// Tries to create an endpoint of `plugin` with `config` on addr `id`.
    pub async fn try_endpoint(&self, id: i64, plugin: &str, config: Value) -> Resp {
        self.manage(
            Method::POST,
            &format!("/addr/{id}/endpoint"),
            Some(json!({"plugin_name": plugin, "config": config})),
        )
        .await
    }

    /// Creates an endpoint of `plugin` with `config` on addr `id`,
    /// subscribed to every event (level DEBUG and up); returns its id.
    pub async fn endpoint(&self, id: i64, plugin: &str, config: Value) -> i64 {
        let r = self.try_endpoint(id, plugin, config).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        let ep = r.json()["id"].as_i64().expect("endpoint id");
        let r = self
            .manage(
                Method::POST,
                &format!("/addr/{id}/endpoint/{ep}/subscription"),
                Some(json!({"level": 10})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
        ep
    }

    /// The subscriptions of endpoint `ep` of addr `id`, as the API lists
    /// them.
    pub async fn subscriptions(&self, id: i64, ep: i64) -> Value {
        let r = self
            .manage(
                Method::GET,
                &format!("/addr/{id}/endpoint/{ep}/subscription"),
                None,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
        r.json()
    }

    /// Waits until endpoint `ep` of addr `id` has nothing pending and
    /// `delivered` and `failed` deliveries, as its GET counts them (or
    /// panics after 30 s).
    pub async fn endpoint_settles(&self, id: i64, ep: i64, delivered: u64, failed: u64) {
        poll_until(Duration::from_secs(30), async || {
            let v = self
                .manage(Method::GET, &format!("/addr/{id}/endpoint/{ep}"), None)
                .await
                .json();
            let got = (
                v["delivered"].as_u64(),
                v["failed"].as_u64(),
                v["pending"].as_u64(),
            );
            if got == (Some(delivered), Some(failed), Some(0)) {
                return Ok(());
            }
            Err(format!(
                "endpoint {ep}: {v}, not {delivered} delivered and {failed} failed"
            ))
        })
        .await
    }

    /// Pushes `event` (a JSON object, `addr` included) to `/push`.
    pub async fn push(&self, event: Value) -> Resp {
        self.request(Method::POST, "/push", None, &[], Some(event))
            .await
    }

    /// Waits until the management API answers 404 for `path` (or panics
    /// after 30 s): what a deletion deleted is gone.
    pub async fn until_gone(&self, path: &str) {
        poll_until(Duration::from_secs(30), async || {
            match self.manage(Method::GET, path, None).await.status.as_u16() {
                404 => Ok(()),
                n => Err(format!("{path} is still there ({n})")),
            }
        })
        .await;
    }

    /// Waits until every delivery of addr `id`'s newest event has left the
    /// pending state (or panics after 20 s); returns that event.
    pub async fn wait_settled(&self, id: i64) -> Value {
        let end = Instant::now() + Duration::from_secs(20);
        let ev = poll_until(Duration::from_secs(20), async || {
            let events = self
                .manage(Method::GET, &format!("/addr/{id}/event"), None)
                .await
                .json();
            match events[0]["id"].as_str() {
                Some(ev) => Ok(ev.to_string()),
                None => Err(format!("no event on addr {id}")),
            }
        })
        .await;
        self.wait_event_settled(id, &ev, end).await
    }

    /// Waits until every delivery of event `ev` of addr `id` has left the
    /// pending state (or panics at `end`); returns that event.
    pub async fn wait_event_settled(&self, id: i64, ev: &str, end: Instant) -> Value {
        poll_until(end.saturating_duration_since(Instant::now()), async || {
            let e = self
                .manage(Method::GET, &format!("/addr/{id}/event/{ev}"), None)
                .await
                .json();
            let settled = e["deliveries"].as_array().is_some_and(|d| {
                !d.is_empty()
                    && d.iter()
                        .all(|d| d["state"] == "delivered" || d["state"] == "failed")
            });
            if settled {
                return Ok(e);
            }
            Err(format!("deliveries did not settle: {e}"))
        })
        .await
    }

    /// Waits until every delivery of addr `id`'s newest event has failed
    /// its first attempt and waits for its next; returns, in the order of
    /// `endpoints`, the seconds from that attempt to the next (its
    /// `updated` to its `next_at`) and its last error. Panics after 20 s.
    pub async fn first_retry_waits(&self, id: i64, endpoints: &[i64]) -> Vec<(f64, String)> {
        poll_until(Duration::from_secs(20), async || {
            let events = self
                .manage(Method::GET, &format!("/addr/{id}/event?limit=1"), None)
                .await
                .json();
            let e = match events[0]["id"].as_str() {
                Some(ev) => self
                    .manage(Method::GET, &format!("/addr/{id}/event/{ev}"), None)
                    .await
                    .json(),
                None => Value::Null,
            };
            let deliveries = e["deliveries"].as_array().cloned().unwrap_or_default();
            let waits: Vec<(f64, String)> = endpoints
                .iter()
                .filter_map(|ep| {
                    let d = deliveries.iter().find(|d| d["endpoint_id"] == *ep)?;
                    if d["attempts"] != 1 || d["state"] != "pending" {
                        return None;
                    }
                    let at = |k: &str| chrono::DateTime::parse_from_rfc3339(d[k].as_str()?).ok();
                    let wait = (at("next_at")? - at("updated")?).as_seconds_f64();
                    Some((wait, d["last_error"].as_str()?.to_string()))
                })
                .collect();
            if waits.len() == endpoints.len() {
                return Ok(waits);
            }
            Err(format!("first attempts not all made: {e}"))
        })
        .await
    }

    /// Addr `id`'s newest event, with its deliveries, as it is now.
    pub async fn newest_event(&self, id: i64) -> Value {
        let events = self
            .manage(Method::GET, &format!("/addr/{id}/event?limit=1"), None)
            .await
            .json();
        let Some(ev) = events[0]["id"].as_str() else {
            panic!("no event: {events}");
        };
        self.manage(Method::GET, &format!("/addr/{id}/event/{ev}"), None)
            .await
            .json()
    }

    /// Asks for endpoint `ep` of addr `id`'s failed deliveries to be
    /// tried again (its `retry` command); the answer.
    pub async fn retry_endpoint(&self, id: i64, ep: i64) -> Resp {
        let path = format!("/addr/{id}/endpoint/{ep}");
        self.manage(Method::POST, &path, Some(json!({"cmd": "retry"})))
            .await
    }

    /// Waits for addr `id`'s newest event to settle; returns its first
    /// delivery's state, attempts and last error.
    pub async fn settled_delivery(&self, id: i64) -> (String, i64, String) {
        let e = self.wait_settled(id).await;
        let d = &e["deliveries"][0];
        (
            d["state"].as_str().unwrap_or_default().to_string(),
            d["attempts"].as_i64().unwrap_or_default(),
            d["last_error"].as_str().unwrap_or_default().to_string(),
        )
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (a name `kill` knows: `STOP`, `CONT`, `KILL`, ...).
    pub fn signal(&self, signal: &str) {
        send_signal(&self.child, signal);
    }

    /// Kills the server with SIGKILL and waits for it to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills the server with SIGKILL (no chance to clean up) and starts
    /// it again on the same config and database; it gets a new port (or
    /// the same Unix socket).
    pub fn kill_and_restart(&mut self) {
        self.kill();
        let (child, addr, log) = spawn_and_wait_listening(server_command(
            &self.config_path,
            self.dir.path(),
            &self.env,
            &self.wrapper,
        ));
        self.child = child;
        (self.base, self.http) = reach(&addr);
        self.log = log;
    }

    /// Waits until the log contains `needle` (or panics after `timeout`).
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for_log(&self.log, needle, timeout).await;
    }

    /// Sends SIGTERM and waits for the process to exit; returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.wait_exit(Duration::from_secs(15))
    }

    /// Waits for the process to exit on its own (or panics after
    /// `timeout`); returns its status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return s;
            }
            assert!(
                Instant::now() < end,
                "server did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // The server's own words are what explains a failed test; the
            // harness shows this only for a test that failed.
            let log = self.log.text();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!("--- the server's log, last {} lines ---", tail.len());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }
}

fn server_command(
    config: &Path,
    dir: &Path,
    env: &[(String, String)],
    wrapper: &[String],
) -> Command {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(server_bin());
            c
        }
        None => Command::new(server_bin()),
    };
    cmd.arg("--config")
        .arg(config)
        .env("ROBOGER_DATA_DIR", dir.join("data"))
        .env_remove("ROBOGER_DB")
        .env_remove("ROBOGER_MASTERKEY")
        .env_remove("ROBOGER_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Waits until `log` contains `needle` (or panics after `timeout`).
async fn wait_for_log(log: &LiveLog, needle: &str, timeout: Duration) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if log.contains(needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("log never showed {needle:?}:\n{}", log.text());
}

/// Starts `cmd` with stderr captured and waits for the "listening on"
/// line; returns the child, its address and the live log.
pub fn spawn_and_wait_listening(cmd: Command) -> (Child, String, Arc<LiveLog>) {
    let (child, addr, log) = spawn_logged(cmd);
    wait_listening(child, addr, log)
}

/// Starts `cmd` with its output captured into a live log; the receiver
/// gets the address of its "listening on" line.
fn spawn_logged(mut cmd: Command) -> (Child, std::sync::mpsc::Receiver<String>, Arc<LiveLog>) {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(Stdio::null());
    let mut child = cmd.spawn().expect("spawn roboger-server");
    let pipes: Vec<std::os::fd::OwnedFd> = [
        child.stderr.take().map(std::os::fd::OwnedFd::from),
        child.stdout.take().map(std::os::fd::OwnedFd::from),
    ]
    .into_iter()
    .flatten()
    .collect();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    (child, rx, LiveLog::start(pipes, tx))
}

fn wait_listening(
    mut child: Child,
    rx: std::sync::mpsc::Receiver<String>,
    log: Arc<LiveLog>,
) -> (Child, String, Arc<LiveLog>) {
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(addr) => (child, addr, log),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            panic!("server did not start:\n{}", log.text());
        }
    }
}

/// Runs the server binary to completion (for `check-config`, `migrate`,
/// start-up failures); returns exit code, stdout and stderr.
pub fn run_server_cmd(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(server_bin());
    cmd.args(args)
        .env_remove("ROBOGER_DB")
        .env_remove("ROBOGER_MASTERKEY")
        .env_remove("ROBOGER_CONFIG")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run roboger-server");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An HTTP client for tests: no redirects, a short timeout.
pub fn client() -> reqwest::Client {
    client_of(None)
}

/// The base URL and a client of a server that says it listens on `addr`
/// (`host:port`, or `unix:PATH`: then every request goes to that socket,
/// whatever the URL).
pub fn reach(addr: &str) -> (String, reqwest::Client) {
    match addr.strip_prefix("unix:") {
        Some(path) => ("http://localhost".to_string(), client_of(Some(path))),
        None => (format!("http://{addr}"), client()),
    }
}

/// [`client`], sending every request to the Unix socket at `unix` if
/// given.
fn client_of(unix: Option<&str>) -> reqwest::Client {
    // reqwest is built without a TLS provider of its own (see Cargo.toml).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20));
    if let Some(path) = unix {
        b = b.unix_socket(path);
    }
    b.build().expect("reqwest client")
}

/// A response, read whole.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Resp {
    async fn from(r: reqwest::Response) -> Resp {
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        Resp {
            status,
            headers,
            text,
        }
    }

    /// The body as JSON (panics with the body when it is not).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.text))
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Asserts a response's status, printing its body when it differs.
#[macro_export]
macro_rules! assert_status {
    ($resp:expr, $status:expr) => {{
        let r = &$resp;
        assert_eq!(
            r.status.as_u16(),
            $status,
            "unexpected status; body: {:?}",
            r.text
        );
    }};
}

/// A request an [`HttpSink`] received.
#[derive(Debug, Clone)]
pub struct SinkRequest {
    pub method: String,
    pub path: String,
    pub headers: reqwest::header::HeaderMap,
    pub body: bytes::Bytes,
}

/// A small HTTP server on 127.0.0.1 that records every request and
/// answers with the next of `statuses` (200 once they run out), standing
/// in for webhook targets, Slack and the like. While held
/// ([`HttpSink::hold`]) it reads requests but answers none (a target that
/// hangs); a request is recorded when it is answered.
pub struct HttpSink {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    requests: Arc<Mutex<Vec<SinkRequest>>>,
    held: Arc<tokio::sync::watch::Sender<bool>>,
    _task: tokio::task::JoinHandle<()>,
}

impl HttpSink {
    /// Starts a sink answering `statuses` in turn, then 200.
    pub async fn start(statuses: Vec<u16>) -> HttpSink {
        HttpSink::answering(statuses, "ok").await
    }

    /// Starts a sink answering `statuses` in turn (then 200), each time
    /// with `body` (JSON ones are sent as such).
    pub async fn answering(statuses: Vec<u16>, body: &'static str) -> HttpSink {
        HttpSink::answering_with(statuses, body, None).await
    }

    /// [`HttpSink::start`], whose answers all carry `Retry-After: value`.
    pub async fn retry_after(statuses: Vec<u16>, value: &'static str) -> HttpSink {
        HttpSink::answering_with(statuses, "ok", Some(value)).await
    }

    /// Starts a sink answering each of `replies` (status and body) in
    /// turn, then 200 with `then`. A redirect's (3xx) "body" is where it
    /// leads: its `Location`, with an empty body.
    pub async fn replying(replies: Vec<(u16, &'static str)>, then: &'static str) -> HttpSink {
        HttpSink::answering_each(replies, then, None).await
    }

    async fn answering_with(
        statuses: Vec<u16>,
        body: &'static str,
        retry_after: Option<&'static str>,
    ) -> HttpSink {
        let replies = statuses.into_iter().map(|s| (s, body)).collect();
        HttpSink::answering_each(replies, body, retry_after).await
    }

    async fn answering_each(
        replies: Vec<(u16, &'static str)>,
        then: &'static str,
        retry_after: Option<&'static str>,
    ) -> HttpSink {
        use warp::{Filter, Reply};
        let requests: Arc<Mutex<Vec<SinkRequest>>> = Arc::default();
        let statuses = Arc::new(Mutex::new(std::collections::VecDeque::from(replies)));
        let rec = requests.clone();
        let held = Arc::new(tokio::sync::watch::channel(false).0);
        let hold = held.clone();
        let route = warp::method()
            .and(warp::path::full())
            .and(warp::header::headers_cloned())
            .and(warp::body::bytes())
            .then(
                move |m: http::Method,
                      p: warp::path::FullPath,
                      h: http::HeaderMap,
                      b: bytes::Bytes| {
                    let (rec, statuses) = (rec.clone(), statuses.clone());
                    let mut hold = hold.subscribe();
                    async move {
                        let _ = hold.wait_for(|h| !*h).await;
                        if let Ok(mut r) = rec.lock() {
                            r.push(SinkRequest {
                                method: m.to_string(),
                                path: p.as_str().to_string(),
                                headers: h,
                                body: b,
                            });
                        }
                        let (code, body) = statuses
                            .lock()
                            .ok()
                            .and_then(|mut s| s.pop_front())
                            .unwrap_or((200, then));
                        let location = (300..400).contains(&code).then_some(body);
                        let body = if location.is_some() { "" } else { body };
                        let content_type = if serde_json::from_str::<Value>(body).is_ok() {
                            "application/json"
                        } else {
                            "text/plain"
                        };
                        let mut r = warp::reply::with_header(
                            warp::reply::with_status(
                                body,
                                http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK),
                            ),
                            http::header::CONTENT_TYPE,
                            content_type,
                        )
                        .into_response();
                        if let Some(to) = location.and_then(|to| to.parse().ok()) {
                            r.headers_mut().insert(http::header::LOCATION, to);
                        }
                        if let Some(v) = retry_after {
                            r.headers_mut().insert(
                                http::header::RETRY_AFTER,
                                http::HeaderValue::from_static(v),
                            );
                        }
                        r
                    }
                },
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sink");
        let addr = listener.local_addr().expect("sink addr");
        let task = tokio::spawn(roboger_server::server::serve(
            roboger_server::connections::Connections::new(roboger_server::server::MAX_CONNECTIONS),
            listener,
            warp::service(route),
            std::future::pending(),
        ));
        HttpSink {
            base: format!("http://{addr}"),
            requests,
            held,
            _task: task,
        }
    }

    /// From now on, requests are read but not answered.
    pub fn hold(&self) {
        self.held.send_replace(true);
    }

    /// Answers the held requests and every one after.
    pub fn release(&self) {
        self.held.send_replace(false);
    }

    /// What has arrived so far.
    pub fn requests(&self) -> Vec<SinkRequest> {
        self.requests.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Waits until `n` requests arrived (or panics after 20 s).
    pub async fn wait(&self, n: usize) -> Vec<SinkRequest> {
        poll_until(Duration::from_secs(20), async || {
            let r = self.requests();
            if r.len() >= n {
                return Ok(r);
            }
            Err(format!("the sink got {} of {n} requests", r.len()))
        })
        .await
    }
}

/// Whether process `pid` runs: it exists and is not a zombie (one that
/// has ended, whose parent has not reaped it yet).
pub fn pid_alive(pid: u64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// What `requests` give, run `at_once` at a time, in the order they end.
pub async fn at_once<T, F: std::future::Future<Output = T>>(
    requests: impl IntoIterator<Item = F>,
    at_once: usize,
) -> Vec<T> {
    use futures_util::StreamExt;
    futures_util::stream::iter(requests)
        .buffer_unordered(at_once)
        .collect()
        .await
}

/// Runs `check` every 20 ms until it answers `Ok`, and gives that; once
/// `within` has passed, panics with what the last `Err` says was seen
/// instead.
pub async fn poll_until<T>(within: Duration, check: impl AsyncFnMut() -> Result<T, String>) -> T {
    poll_every(Duration::from_millis(20), within, check).await
}

/// [`poll_until`] for a check that costs much (a process started for
/// each look): it runs every `pace`.
pub async fn poll_every<T>(
    pace: Duration,
    within: Duration,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> T {
    let end = Instant::now() + within;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(seen) => assert!(Instant::now() < end, "{seen}"),
        }
        tokio::time::sleep(pace).await;
    }
}

/// Path of a built-in plugin's executable.
pub fn plugin_bin(name: &str) -> PathBuf {
    let p = bin_dir().join(format!("roboger-plugin-{name}"));
    assert!(
        p.is_file(),
        "{} is missing: build the workspace first",
        p.display()
    );
    p
}

/// The test virtualenv's Python (`ROBOGER_TEST_PYTHON`, set by
/// `tests/run`), which has pyrpush, aiosmtpd and requests (robogerctl
/// brings it). `None` (the test is skipped, saying so) when unset,
/// unless the whole suite is required.
pub fn venv_python(what: &str) -> Option<PathBuf> {
    installed("ROBOGER_TEST_PYTHON", what)
}

/// The Python of the virtualenv that `tests/run` installs Roboger 2.0.45
/// itself into, with the drivers its SQLAlchemy needs for PostgreSQL and
/// MySQL (`ROBOGER_TEST_ORIGINAL_PYTHON`); `None` as [`venv_python`].
pub fn original_python() -> Option<PathBuf> {
    installed("ROBOGER_TEST_ORIGINAL_PYTHON", "Roboger 2.0.45")
}

/// What `tests/run` installs (`what`, a Python, robogerctl), named by
/// environment variable `var`: `None` (the test is skipped, saying so)
/// when unset, unless the whole suite is required.
pub fn installed(var: &str, what: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("ROBOGER_TEST_REQUIRE_ALL").is_some() => {
            panic!("{var} is not set; tests/run installs {what}")
        }
        None => {
            eprintln!("SKIPPED: {what} is not installed; run tests/run for the whole suite");
            None
        }
    }
}

/// A certificate authority made for one test and a certificate it signed
/// for the loopback names (`localhost`, `127.0.0.1`), as PEM files in a
/// temporary directory: what an internal SMTP relay has.
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("temp dir");
        let ca_key = KeyPair::generate().expect("a CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "Roboger test CA");
        let ca_cert = ca.self_signed(&ca_key).expect("the CA certificate");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("a key");
        let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate params")
            .signed_by(&key, &issuer)
            .expect("the certificate");
        for (name, pem) in [
            ("ca.pem", ca_cert.pem()),
            ("cert.pem", cert.pem()),
            ("key.pem", key.serialize_pem()),
        ] {
            std::fs::write(dir.path().join(name), pem).expect("write a PEM file");
        }
        TestCa { dir }
    }

    /// The CA's certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The loopback certificate and its key.
    pub fn cert_and_key(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("cert.pem"),
            self.dir.path().join("key.pem"),
        )
    }
}

impl Default for TestCa {
    fn default() -> Self {
        TestCa::new()
    }
}

/// How an [`SmtpSink`] speaks TLS.
#[derive(Clone, Copy, PartialEq)]
pub enum SmtpTls {
    /// It requires STARTTLS.
    StartTls,
    /// TLS from the first byte.
    Implicit,
}

/// A real SMTP server on loopback (aiosmtpd, `tests/plugins/smtp_sink.py`)
/// that keeps every message it receives as JSON: envelope, headers, text
/// body and attachments.
pub struct SmtpSink {
    /// The port it listens on, at 127.0.0.1.
    pub port: u16,
    child: Child,
    dir: tempfile::TempDir,
}

impl SmtpSink {
    /// Starts the server; with `login`, it requires SMTP AUTH with it.
    pub fn start(python: &Path, login: Option<(&str, &str)>) -> SmtpSink {
        SmtpSink::start_with(python, login, None)
    }

    /// Starts the server speaking TLS with `ca`'s loopback certificate.
    pub fn start_tls(python: &Path, ca: &TestCa, tls: SmtpTls) -> SmtpSink {
        SmtpSink::start_with(python, None, Some((ca, tls)))
    }

    fn start_with(
        python: &Path,
        login: Option<(&str, &str)>,
        tls: Option<(&TestCa, SmtpTls)>,
    ) -> SmtpSink {
        let dir = tempfile::tempdir().expect("temp dir");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/smtp_sink.py");
        let mut cmd = Command::new(python);
        cmd.arg(script).arg(dir.path());
        if let Some((l, p)) = login {
            cmd.args(["--login", l, "--password", p]);
        }
        if let Some((ca, tls)) = tls {
            let (cert, key) = ca.cert_and_key();
            cmd.arg("--cert").arg(cert).arg("--key").arg(key);
            if tls == SmtpTls::Implicit {
                cmd.arg("--implicit-tls");
            }
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the SMTP sink");
        let mut line = String::new();
        if let Some(out) = child.stdout.take() {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let port = line
            .strip_prefix("listening ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("the SMTP sink did not start: {line:?}"));
        SmtpSink { port, child, dir }
    }

    /// Waits until `n` messages arrived (or panics after 20 s).
    pub async fn wait(&self, n: usize) -> Vec<Value> {
        poll_until(Duration::from_secs(20), async || {
            let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            names.retain(|p| p.extension().is_some_and(|e| e == "json"));
            if names.len() < n {
                return Err(format!("the SMTP sink got {} of {n} messages", names.len()));
            }
            names.sort();
            Ok(names
                .iter()
                .map(|p| {
                    let text = std::fs::read_to_string(p).expect("read a message");
                    serde_json::from_str(&text).expect("a message record")
                })
                .collect())
        })
        .await
    }
}

impl Drop for SmtpSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The records of calls to `method` in the record file of the test
/// plugin (`TEST_PLUGIN_RECORD`), in the order they were made.
pub fn plugin_calls(record: &Path, method: &str) -> Vec<serde_json::Value> {
    json_lines(record)
        .into_iter()
        .filter(|r| r["method"] == method)
        .collect()
}

/// Waits (20 s at most) until the test plugin has begun at least `n`
/// sends (the `send_started` records of endpoints configured with `gate`
/// or `slow`); returns those records.
pub async fn sends_begun(record: &Path, n: usize) -> Vec<serde_json::Value> {
    poll_until(Duration::from_secs(20), async || {
        match plugin_calls(record, "send_started") {
            begun if begun.len() >= n => Ok(begun),
            begun => Err(format!("{} of {n} sends begun: {begun:?}", begun.len())),
        }
    })
    .await
}

/// The JSON lines of a record file a plugin process is appending to. A
/// last line still being written (no newline yet) is left for the next
/// read, so polling never sees half a record.
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON record"))
        .collect()
}

/// A real `redis-server` on a free loopback port, with no persistence;
/// killed when dropped. The binary is `ROBOGER_TEST_REDIS_SERVER` (set by
/// `tests/run`, which installs it), else `redis-server` on the PATH.
pub struct RedisServer {
    /// The port it listens on, at 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    bin: PathBuf,
    /// Where it runs (empty: no persistence).
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts it and waits until it answers `PING`; `None` (the test is
    /// skipped, saying so) when there is no redis-server, unless the whole
    /// suite is required.
    pub fn start() -> Option<RedisServer> {
        let bin = std::env::var_os("ROBOGER_TEST_REDIS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("redis-server"));
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let child = match RedisServer::spawn(&bin, port, dir.path()) {
            Ok(c) => c,
            Err(e) if std::env::var_os("ROBOGER_TEST_REQUIRE_ALL").is_none() => {
                eprintln!(
                    "SKIPPED: cannot run {} ({e}); tests/run installs it",
                    bin.display()
                );
                return None;
            }
            Err(e) => panic!("cannot run {}: {e}", bin.display()),
        };
        let r = RedisServer {
            port,
            child: Some(child),
            bin,
            dir,
        };
        r.wait_ready();
        Some(r)
    }

    fn spawn(bin: &Path, port: u16, dir: &Path) -> std::io::Result<Child> {
        Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir)
            .stdout(Stdio::null())
            .stdin(Stdio::null())
            .spawn()
    }

    fn wait_ready(&self) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.command(&["PING"]).as_deref() != Some("+PONG") {
            assert!(Instant::now() < end, "redis-server did not answer PING");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts it again after [`RedisServer::stop`], on the same port,
    /// empty, and waits until it answers `PING`.
    pub fn restart(&mut self) {
        self.stop();
        let child = RedisServer::spawn(&self.bin, self.port, self.dir.path())
            .expect("redis-server starts again");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Sends one command (RESP) and returns the first line of the answer.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut reader = BufReader::new(s);
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        if let Some(len) = line.strip_prefix('$') {
            // A bulk string: its value is on the next line.
            if len.trim() == "-1" {
                return None;
            }
            line.clear();
            reader.read_line(&mut line).ok()?;
        }
        Some(line.trim_end().to_string())
    }

    /// Stops it for good (the test goes on without it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where a Debian package's program is: `env` (set by `tests/run`), else
/// `name` on the PATH; `None` (the caller skips, saying so) when neither
/// runs, unless the whole suite is required.
pub fn installed_program(env: &str, name: &str) -> Option<PathBuf> {
    let bin = std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(name));
    let runs = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if runs {
        return Some(bin);
    }
    assert!(
        std::env::var_os("ROBOGER_TEST_REQUIRE_ALL").is_none(),
        "cannot run {}; tests/run installs it",
        bin.display()
    );
    eprintln!(
        "SKIPPED: cannot run {}; tests/run installs it",
        bin.display()
    );
    None
}

/// A real Prometheus server (Debian's `prometheus`, or
/// `ROBOGER_TEST_PROMETHEUS`) on a free loopback port, scraping one
/// target's `/metrics` every second with a bearer token; killed when
/// dropped.
pub struct PrometheusServer {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl PrometheusServer {
    /// Starts it scraping `target` (`host:port`) and waits until it is
    /// ready; `None` when there is no Prometheus (see [`installed_program`]).
    pub async fn start(target: &str, bearer: &str) -> Option<PrometheusServer> {
        PrometheusServer::with_rules(target, bearer, None).await
    }

    /// [`PrometheusServer::start`], evaluating the alert rules `rules`
    /// (a rules file's text) every second.
    pub async fn with_rules(
        target: &str,
        bearer: &str,
        rules: Option<&str>,
    ) -> Option<PrometheusServer> {
        let bin = installed_program("ROBOGER_TEST_PROMETHEUS", "prometheus")?;
        let dir = tempfile::tempdir().expect("tempdir");
        let rule_files = match rules {
            Some(text) => {
                let path = dir.path().join("rules.yml");
                std::fs::write(&path, text).expect("write the rules");
                format!("rule_files: ['{}']\n", path.display())
            }
            None => String::new(),
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 {rule_files}scrape_configs:\n  - job_name: roboger\n    scrape_interval: 1s\n    \
                 scrape_timeout: 1s\n    authorization:\n      type: Bearer\n      \
                 credentials: {bearer}\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("write prometheus.yml");
        let child = Command::new(&bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let p = PrometheusServer {
            base: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        };
        let http = client();
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http.get(format!("{}/-/ready", p.base)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Some(p);
            }
            assert!(Instant::now() < end, "prometheus did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The JSON `path` of its HTTP API answers (`Null` when it does not).
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let Ok(url) = url::Url::parse_with_params(&format!("{}{path}", self.base), params) else {
            return Value::Null;
        };
        match client().get(url).send().await {
            Ok(r) => r.json().await.unwrap_or_default(),
            Err(_) => Value::Null,
        }
    }

    /// The value of an instant query that returns one sample, if it does.
    pub async fn query(&self, q: &str) -> Option<f64> {
        let v = self.api("/api/v1/query", &[("query", q)]).await;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }

    /// `/api/v1/alerts`: each alert's name, its labels but `alertname`,
    /// and its state (`pending` or `firing`).
    pub async fn alerts(&self) -> Vec<(String, Value, String)> {
        let v = self.api("/api/v1/alerts", &[]).await;
        let mut out = Vec::new();
        for alert in v["data"]["alerts"].as_array().into_iter().flatten() {
            let mut labels = alert["labels"].clone();
            let name = labels
                .as_object_mut()
                .and_then(|l| l.remove("alertname"))
                .and_then(|n| n.as_str().map(str::to_string))
                .unwrap_or_default();
            let state = alert["state"].as_str().unwrap_or_default().to_string();
            out.push((name, labels, state));
        }
        out
    }

    /// `/api/v1/rules`: each rule's name and health (`ok` once it has
    /// been evaluated without error), with its last error.
    pub async fn rules(&self) -> Vec<(String, String, String)> {
        let v = self.api("/api/v1/rules", &[]).await;
        let mut out = Vec::new();
        for g in v["data"]["groups"].as_array().into_iter().flatten() {
            for rule in g["rules"].as_array().into_iter().flatten() {
                let text = |k: &str| rule[k].as_str().unwrap_or_default().to_string();
                out.push((text("name"), text("health"), text("lastError")));
            }
        }
        out
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `/metrics` text as (series with labels → value), e.g.
/// `roboger_push_total{status="202"}` → 5.
pub fn parse_metrics(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_string(), value.parse().ok()?))
        })
        .collect()
}
