//! Group commits that meet locks held by others.
//!
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
//!
//! A push whose wait runs out while its commit runs is answered when the
//! commit ends, not 503 at once: a 503 there could be followed by the
//! event stored and delivered, and a sender that sends again on 503 would
//! get it twice. The commit is held by outside sessions holding the
//! endpoints' rows, on PostgreSQL and MariaDB. A commit held for
//! longer than the server's timeout is answered 503, and its event is
//! then not stored when the lock is let go: PostgreSQL cancels it (the
//! commit's connection has a statement timeout), MariaDB rolls it back.

use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use roboger_tests::{
    DbClient, Method, Server, ServerOptions, assert_status, fresh_database, json, poll_until,
};

/// A session fed statement by statement through its stdin.
fn session(db: &DbClient) -> Child {
    db.command()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the database client starts")
}

/// How many sessions of this database wait for a lock now (on MariaDB,
/// how many group commits).
fn waiting(db: &DbClient) -> u32 {
    let sql = match db {
        DbClient::My { name, .. } => format!(
            // The commit's insert shows in the process list while it waits.
            "SELECT count(*) FROM information_schema.PROCESSLIST \
             WHERE DB = '{name}' AND COMMAND = 'Execute' AND INFO LIKE 'INSERT INTO `delivery`%'"
        ),
        _ => "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND datname = current_database()"
            .to_string(),
    };
    db.query(&sql).parse().unwrap_or(0)
}

/// Waits until `waits` says so (or panics after 10 s, naming `what`).
async fn wait_until(what: &str, waits: impl Fn() -> bool) {
    poll_until(Duration::from_secs(10), async || match waits() {
        true => Ok(()),
        false => Err(format!("{what} never waited for a lock")),
    })
    .await
}

fn feed(session: &mut Child, sql: &str) {
    let stdin = session.stdin.as_mut().expect("piped stdin");
    stdin.write_all(sql.as_bytes()).expect("feed the session");
    stdin.flush().expect("flush the session");
}

/// The named lock an outside session holding endpoint `ep`'s row takes
/// after it on MariaDB, to show that it does.
fn shown_lock(db: &DbClient, ep: i64) -> String {
    match db {
        DbClient::My { name, .. } => format!("{name}_{ep}"),
        _ => String::new(),
    }
}

/// Waits until the outside session holds endpoint `ep`'s row, the
/// `holders`th session to hold an endpoint row: on PostgreSQL the
/// sessions' locks on the table show, on MariaDB the named lock the
/// session takes after it ([`shown_lock`]). Kills `outside` and panics
/// after 10 s.
async fn wait_row_locked(db: &DbClient, outside: &mut Child, ep: i64, holders: u32) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let locked = match db {
            DbClient::My { .. } => {
                let lock = shown_lock(db, ep);
                db.query(&format!("SELECT IS_USED_LOCK('{lock}') IS NOT NULL"))
                    .parse::<u32>()
                    .unwrap_or(0)
                    >= 1
            }
            _ => {
                db.query(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                     WHERE c.relname = 'endpoint' AND l.mode = 'RowShareLock' AND l.granted",
                )
                .parse::<u32>()
                .unwrap_or(0)
                    >= holders
            }
        };
        if locked {
            return;
        }
        if Instant::now() > end {
            let _ = outside.kill();
            let mut err = String::new();
            if let Some(mut stderr) = outside.stderr.take() {
                let _ = stderr.read_to_string(&mut err);
            }
            panic!("the outside transaction never began: {err}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A fresh database for a test of row locks, its URL and a client of it;
/// `None` on SQLite, which has no row locks, after saying on stderr why
/// there is nothing to test (`why`). The directory holds a SQLite file
/// and must outlive the test.
fn lockable_database(why: &str) -> Option<(tempfile::TempDir, String, DbClient)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = fresh_database(dir.path());
    let db = DbClient::of(&url);
    if let DbClient::Sqlite(_) = db {
        eprintln!("{why}");
        return None;
    }
    Some((dir, url, db))
}

/// The statements that begin a transaction holding endpoint `ep`'s row.
fn endpoint_lock(ep: i64) -> String {
    format!("BEGIN;\nSELECT id FROM endpoint WHERE id = {ep} FOR UPDATE;\n")
}

/// An outside session holding endpoint `ep`'s row, the `holders`th
/// session to hold an endpoint row, once it holds it. On MariaDB it takes
/// a named lock too, which shows that it does.
async fn hold_endpoint(db: &DbClient, ep: i64, holders: u32) -> Child {
    let mut hold = session(db);
    match db {
        DbClient::My { .. } => feed(
            &mut hold,
            &format!(
                "{}SELECT GET_LOCK('{}', 0);\n",
                endpoint_lock(ep),
                shown_lock(db, ep)
            ),
        ),
        _ => feed(&mut hold, &endpoint_lock(ep)),
    }
    wait_row_locked(db, &mut hold, ep, holders).await;
    hold
}

/// Commits an outside session's transaction and waits for the session
/// to end, which it must without an error (`what` says what an error
/// would mean).
fn commit_and_end(mut outside: Child, what: &str) {
    feed(&mut outside, "COMMIT;\n");
    drop(outside.stdin.take());
    let out = outside
        .wait_with_output()
        .expect("the outside session ends");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn a_group_commit_that_loses_a_deadlock_runs_again() {
    let Some((_dir, url, db)) =
        lockable_database("SQLite has a single writer and no deadlocks: nothing to test")
    else {
        return;
    };
    if let DbClient::Pg(_) = &db {
        // The server's sessions give up on a deadlock before the outside
        // transaction's does (10 s, set below), so the commit is the victim.
        let name = url.rsplit('/').next().unwrap_or_default();
        db.query(&format!(
            "ALTER DATABASE {name} SET deadlock_timeout = '300ms'"
        ));
    }
    let (s, addr_id, a, ep) = server_with_endpoint(url, String::new()).await;

    let mut outside = session(&db);
    match &db {
        DbClient::My { .. } => feed(
            &mut outside,
            &format!(
                "CREATE TABLE ballast (n INT);\nBEGIN;\n\
                 INSERT INTO ballast SELECT seq FROM seq_1_to_1000;\n\
                 SELECT id FROM endpoint WHERE id = {ep} FOR UPDATE;\n\
                 SELECT GET_LOCK('{}', 0);\n",
                shown_lock(&db, ep)
            ),
        ),
        // PostgreSQL (SQLite returned above).
        _ => feed(
            &mut outside,
            &format!(
                "SET deadlock_timeout = '10s';\nBEGIN;\n\
                 SELECT id FROM endpoint WHERE id = {ep} FOR UPDATE;\n"
            ),
        ),
    }
    wait_row_locked(&db, &mut outside, ep, 1).await;

    let push = spawn_push(&s, &a, "through a deadlock");
    wait_until("the group commit", || waiting(&db) >= 1).await;
    feed(
        &mut outside,
        &format!("SELECT id FROM addr WHERE id = {addr_id} FOR UPDATE;\n"),
    );
    commit_and_end(
        outside,
        "the outside transaction was the victim, not the commit",
    );

    let status = push.await.expect("the push task");
    assert_eq!(status, 202, "the push that lost the deadlock");
    s.wait_log("group commit lost a lock race", Duration::from_secs(5))
        .await;
    let e = s.wait_settled(addr_id).await;
    assert_eq!(e["msg"], "through a deadlock", "{e}");
    assert_eq!(e["deliveries"][0]["state"], "delivered", "{e}");
    assert_status!(s.push(json!({"addr": a, "msg": "after"})).await, 202);
}

/// A server on database `url` (with `yaml` under `roboger:`), an address
/// and its endpoint of the test plugin: the server, the address's id and
/// string, the endpoint's id.
async fn server_with_endpoint(url: String, yaml: String) -> (Server, i64, String, i64) {
    let s = Server::start_with(ServerOptions {
        yaml,
        plugins: vec!["t".into()],
        db: Some(url),
        ..Default::default()
    })
    .await;
    let (addr_id, a) = s.new_addr().await;
    let ep = s.endpoint(addr_id, "t", json!({})).await;
    (s, addr_id, a, ep)
}

/// A push to addr `a` on its own task; its status.
fn spawn_push(s: &Server, a: &str, msg: &str) -> tokio::task::JoinHandle<u16> {
    let (base, body) = (s.base.clone(), json!({"addr": a, "msg": msg}));
    tokio::spawn(async move {
        roboger_tests::client()
            .post(format!("{base}/push"))
            .json(&body)
            .send()
            .await
            .map(|r| r.status().as_u16())
            .expect("an answer to the push")
    })
}

/// A push that waits in the writer's queue for half its timeout, and
/// whose commit then runs past that timeout (but within the commit's
/// own), is answered by the commit: 202, its event stored and delivered.
///
/// The second push goes to another address, whose endpoint's row a
/// second outside session holds from the start. (It went to the same
/// endpoint before, its hold queued for the row behind the first commit:
/// whether that hold or the second commit took the row once the first
/// commit ended was a race the commit could win, and then it never
/// waited.)
#[tokio::test]
async fn a_push_whose_commit_runs_past_its_timeout_is_answered_by_the_commit() {
    // The server's timeout, for a push's wait and for a commit.
    const TIMEOUT: Duration = Duration::from_secs(4);
    let Some((_dir, url, db)) =
        lockable_database("the commit is held through a row lock, which SQLite has not")
    else {
        return;
    };
    let (s, addr_id, a, ep) =
        server_with_endpoint(url, format!("timeout: {}\n", TIMEOUT.as_secs())).await;
    let (addr_b, b) = s.new_addr().await;
    let ep_b = s.endpoint(addr_b, "t", json!({})).await;

    // The first hold: the first push's commit waits for its endpoint's
    // row. The second hold has the second push's endpoint's row already.
    let first = hold_endpoint(&db, ep, 1).await;
    let second = hold_endpoint(&db, ep_b, 2).await;
    let push_a = spawn_push(&s, &a, "first");
    wait_until("the first commit", || waiting(&db) >= 1).await;
    // The second push waits in the writer's queue meanwhile.
    let sent = Instant::now();
    let push_b = spawn_push(&s, &b, "second");

    // The second push's commit begins half its timeout after the push...
    tokio::time::sleep_until((sent + TIMEOUT / 2).into()).await;
    commit_and_end(first, "the first hold");
    assert_eq!(push_a.await.expect("the first push"), 202, "the first push");
    poll_until(Duration::from_secs(10), async || {
        if waiting(&db) >= 1 {
            return Ok(());
        }
        Err(match push_b.is_finished() {
            true => "the second push was answered before its commit waited",
            false => "the second commit never waited for a lock",
        }
        .to_string())
    })
    .await;
    // ...and ends after the push's timeout has run out, but before the
    // commit's own has.
    tokio::time::sleep_until((sent + TIMEOUT * 5 / 4).into()).await;
    commit_and_end(second, "the second hold");
    let status = push_b.await.expect("the second push");

    // Both events were stored: the second push must not have been told
    // otherwise.
    let end = Instant::now() + Duration::from_secs(20);
    let mut msgs = Vec::new();
    for addr in [addr_id, addr_b] {
        let events = s
            .manage(Method::GET, &format!("/addr/{addr}/event"), None)
            .await
            .json();
        for e in events.as_array().expect("a list of events") {
            let id = e["id"].as_str().expect("an event id");
            let e = s.wait_event_settled(addr, id, end).await;
            assert_eq!(e["deliveries"][0]["state"], "delivered", "{e}");
            msgs.push(e["msg"].as_str().unwrap_or_default().to_string());
        }
    }
    assert_eq!(msgs, ["first", "second"], "the events stored");
    assert_eq!(
        status, 202,
        "the second push was refused, yet its event was stored and delivered"
    );
}

#[tokio::test]
async fn a_commit_that_outlives_the_timeout_is_not_stored_after_its_503() {
    let Some((_dir, url, db)) =
        lockable_database("the commit is held through a row lock, which SQLite has not")
    else {
        return;
    };
    let (s, addr_id, a, ep) = server_with_endpoint(url, "timeout: 2\n".into()).await;

    // The endpoint's row is held for longer than the server's timeout, so
    // the push's commit waits for it past the writer's own wait.
    let hold = hold_endpoint(&db, ep, 1).await;
    let push = spawn_push(&s, &a, "refused");
    wait_until("the held commit", || waiting(&db) >= 1).await;
    assert_eq!(push.await.expect("the push"), 503, "the held push");

    // The row is let go only after the 503: a commit still running in the
    // database would now take it and store the event.
    commit_and_end(hold, "the hold");
    assert_status!(s.push(json!({"addr": a, "msg": "later"})).await, 202);
    let events = s
        .manage(Method::GET, &format!("/addr/{addr_id}/event"), None)
        .await
        .json();
    let events = events.as_array().expect("a list of events");
    let msgs: Vec<&str> = events.iter().filter_map(|e| e["msg"].as_str()).collect();
    assert_eq!(
        msgs,
        ["later"],
        "the push answered 503 had its event stored after all"
    );
    let id = events[0]["id"].as_str().expect("an event id");
    let e = s
        .wait_event_settled(addr_id, id, Instant::now() + Duration::from_secs(20))
        .await;
    assert_eq!(e["deliveries"][0]["state"], "delivered", "{e}");
}
