//! A push whose group commit loses a deadlock is still answered 202 and
//! delivered: the database rolls the commit back, and the server runs it
//! again instead of answering 503.
//!
//! The deadlock is a real one, made from outside the server with the
//! database's own client: a transaction locks the push's endpoint row, so
//! the commit's insert of the delivery waits on it (its foreign key check);
//! then it locks the address row, which the commit's insert of the event
//! holds. The database picks the commit as the victim (on PostgreSQL the
//! commit's session has the shorter `deadlock_timeout`; on MariaDB the
//! outside transaction has written more rows). SQLite has one writer at a
//! time and no deadlocks, so there the test says it has nothing to do.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use roboger_tests::{Server, ServerOptions, assert_status, fresh_database, json};

/// The test database and its command-line client.
enum Db {
    Pg(String),
    My { url: url::Url, name: String },
}

impl Db {
    /// A fresh database on the server the suite runs against, if any.
    fn fresh(dir: &std::path::Path) -> Option<(Db, String)> {
        let url = fresh_database(dir);
        if url.starts_with("postgres") {
            Some((Db::Pg(url.clone()), url))
        } else if url.starts_with("mysql") {
            let u = url::Url::parse(&url).expect("a URL");
            let name = u.path().trim_start_matches('/').to_string();
            Some((Db::My { url: u, name }, url))
        } else {
            None
        }
    }

    fn client(&self) -> Command {
        match self {
            Db::Pg(url) => {
                let mut c = Command::new("psql");
                c.arg(url).args(["-v", "ON_ERROR_STOP=1", "-qtA"]);
                c
            }
            Db::My { url, name } => {
                let mut c = roboger_tests::mariadb_client(url);
                c.args(["-N", "-B", name]);
                c
            }
        }
    }

    /// Runs `sql` in its own session; its output, trimmed.
    fn query(&self, sql: &str) -> String {
        let out = self
            .client()
            .args(match self {
                Db::Pg(_) => ["-c", sql],
                Db::My { .. } => ["-e", sql],
            })
            .output()
            .expect("the database client runs");
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A session fed statement by statement through its stdin.
    fn session(&self) -> Child {
        self.client()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the database client starts")
    }

    /// How many sessions of this database wait for a lock now.
    fn waiting(&self) -> u32 {
        let sql = match self {
            Db::Pg(_) => "SELECT count(*) FROM pg_stat_activity \
                 WHERE wait_event_type = 'Lock' AND datname = current_database()"
                .to_string(),
            // The commit's insert shows in the process list while it waits.
            Db::My { name, .. } => format!(
                "SELECT count(*) FROM information_schema.PROCESSLIST \
                 WHERE DB = '{name}' AND COMMAND = 'Execute' AND INFO LIKE 'INSERT INTO `delivery`%'"
            ),
        };
        self.query(&sql).parse().unwrap_or(0)
    }

    async fn wait_until_waiting(&self, n: u32, what: &str) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.waiting() < n {
            assert!(Instant::now() < end, "{what} never waited for a lock");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn feed(session: &mut Child, sql: &str) {
    let stdin = session.stdin.as_mut().expect("piped stdin");
    stdin.write_all(sql.as_bytes()).expect("feed the session");
    stdin.flush().expect("flush the session");
}

#[tokio::test]
async fn a_group_commit_that_loses_a_deadlock_runs_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((db, url)) = Db::fresh(dir.path()) else {
        eprintln!("SQLite has a single writer and no deadlocks: nothing to test");
        return;
    };
    if let Db::Pg(_) = &db {
        // The server's sessions give up on a deadlock before the outside
        // transaction's does (10 s, set below), so the commit is the victim.
        let name = url.rsplit('/').next().unwrap_or_default();
        db.query(&format!(
            "ALTER DATABASE {name} SET deadlock_timeout = '300ms'"
        ));
    }
    let s = Server::start_with(ServerOptions {
        plugins: vec!["t".into()],
        db: Some(url),
        ..Default::default()
    })
    .await;
    let (addr_id, a) = s.new_addr().await;
    let ep = s.endpoint(addr_id, "t", json!({})).await;

    let mut outside = db.session();
    match &db {
        Db::Pg(_) => feed(
            &mut outside,
            &format!(
                "SET deadlock_timeout = '10s';\nBEGIN;\n\
                 SELECT id FROM endpoint WHERE id = {ep} FOR UPDATE;\n"
            ),
        ),
        Db::My { name, .. } => feed(
            &mut outside,
            &format!(
                "CREATE TABLE ballast (n INT);\nBEGIN;\n\
                 INSERT INTO ballast SELECT seq FROM seq_1_to_1000;\n\
                 SELECT id FROM endpoint WHERE id = {ep} FOR UPDATE;\n\
                 SELECT GET_LOCK('{name}', 0);\n"
            ),
        ),
    }
    // The endpoint row is locked once the session's statements ran: on
    // PostgreSQL its row lock shows, on MariaDB the named lock it takes
    // after it.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let locked = match &db {
            Db::Pg(_) => db.query(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                 WHERE c.relname = 'endpoint' AND l.mode = 'RowShareLock' AND l.granted",
            ),
            Db::My { name, .. } => db.query(&format!("SELECT IS_USED_LOCK('{name}') IS NOT NULL")),
        };
        if locked.parse::<u32>().unwrap_or(0) >= 1 {
            break;
        }
        if Instant::now() > end {
            let _ = outside.kill();
            let out = outside.wait_with_output().expect("the outside session");
            panic!(
                "the outside transaction never began: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let push = {
        let (base, a) = (s.base.clone(), a.clone());
        tokio::spawn(async move {
            roboger_tests::client()
                .post(format!("{base}/push"))
                .json(&json!({"addr": a, "msg": "through a deadlock"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    db.wait_until_waiting(1, "the group commit").await;
    feed(
        &mut outside,
        &format!("SELECT id FROM addr WHERE id = {addr_id} FOR UPDATE;\nCOMMIT;\n"),
    );
    drop(outside.stdin.take());
    let out = outside
        .wait_with_output()
        .expect("the outside session ends");
    assert!(
        out.status.success(),
        "the outside transaction was the victim, not the commit: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let status = push.await.expect("the push task").expect("an answer");
    assert_eq!(status, 202, "the push that lost the deadlock");
    s.wait_log("group commit lost a lock race", Duration::from_secs(5))
        .await;
    let e = s.wait_settled(addr_id).await;
    assert_eq!(e["msg"], "through a deadlock", "{e}");
    assert_eq!(e["deliveries"][0]["state"], "delivered", "{e}");
    assert_status!(s.push(json!({"addr": a, "msg": "after"})).await, 202);
}
