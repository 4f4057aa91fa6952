//! Group commits, and walks over a backlog, that meet locks held by
//! others.
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
//! A walk's chunk that loses a deadlock is run again in the same way.
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

use roboger_tests::robogerctl::{Ctl, robogerctl_path};
use roboger_tests::{
    DbClient, Method, Server, ServerOptions, assert_status, fresh_database, json, poll_until,
    waiting_years,
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

/// The statement a group commit waits in, as MariaDB's process list
/// shows it.
const COMMIT: &str = "INSERT INTO `delivery`";

/// How many sessions of this database wait for a lock now (on MariaDB,
/// how many of the server's prepared statements beginning `statement`
/// run).
fn waiting(db: &DbClient, statement: &str) -> u32 {
    let sql = match db {
        DbClient::My { name, .. } => format!(
            // The statement shows in the process list while it waits.
            "SELECT count(*) FROM information_schema.PROCESSLIST \
             WHERE DB = '{name}' AND COMMAND = 'Execute' AND INFO LIKE '{statement}%'"
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

/// The named lock an outside session holding the row `id` of `table`
/// takes after it on MariaDB, to show that it does.
fn shown_lock(db: &DbClient, table: &str, id: i64) -> String {
    match db {
        DbClient::My { name, .. } => format!("{name}_{table}_{id}"),
        _ => String::new(),
    }
}

/// Waits until the outside session holds the row `id` of `table`, the
/// `holders`th session to hold a row of it: on PostgreSQL the sessions'
/// locks on the table show, on MariaDB the named lock the session takes
/// after it ([`shown_lock`]). Kills `outside` and panics after 10 s.
async fn wait_row_locked(
    db: &DbClient,
    outside: &mut Child,
    (table, id): (&str, i64),
    holders: u32,
) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let locked = match db {
            DbClient::My { .. } => {
                let lock = shown_lock(db, table, id);
                db.query(&format!("SELECT IS_USED_LOCK('{lock}') IS NOT NULL"))
                    .parse::<u32>()
                    .unwrap_or(0)
                    >= 1
            }
            _ => {
                db.query(&format!(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                     WHERE c.relname = '{table}' AND l.mode = 'RowShareLock' AND l.granted"
                ))
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

/// A server of the test plugin on a database whose rows an outside
/// session can hold (none on SQLite), with an address whose history
/// (1,200 copies of its one event, whose ids sort before it) makes three
/// chunks of a deletion, and an outside session holding a delivery of the
/// first: a deletion of the address or of its endpoint is answered 202
/// and goes on until the hold is let go ([`commit_and_end`]).
struct HeldHistory {
    dir: tempfile::TempDir,
    url: String,
    db: DbClient,
    s: Server,
    addr_id: i64,
    a: String,
    ep: i64,
    outside: Child,
}

async fn held_history() -> Option<HeldHistory> {
    held_history_with("").await
}

/// [`held_history`], its server configured with `yaml` too.
async fn held_history_with(yaml: &str) -> Option<HeldHistory> {
    let (dir, url, db) =
        lockable_database("the deletion is held through a row lock, which SQLite has not")?;
    let s = Server::start_with(ServerOptions {
        db: Some(url.clone()),
        ..ServerOptions::test_plugin(yaml)
    })
    .await;
    let (addr_id, a, ep) = s.addr_with_history(&db, 1200).await;
    let held: i64 = db
        .query("SELECT id FROM delivery WHERE event_id = '00000000-0000-7000-8000-000000000001'")
        .parse()
        .expect("a delivery id");
    let outside = hold_row(&db, ("delivery", held), 1, false).await;
    Some(HeldHistory {
        dir,
        url,
        db,
        s,
        addr_id,
        a,
        ep,
        outside,
    })
}

/// An outside session holding the row `id` of `table`, the `holders`th
/// session to hold a row of it, once it holds it. On MariaDB it takes a
/// named lock too, which shows that it does. One that `wins_deadlocks`
/// against the server ([`server_loses_deadlocks`]) looks for one later
/// on PostgreSQL ([`OUTSIDE_WAITS`]), and on MariaDB has written more
/// (ballast, in its transaction).
async fn hold_row(
    db: &DbClient,
    (table, id): (&str, i64),
    holders: u32,
    wins_deadlocks: bool,
) -> Child {
    let (before, within) = match (db, wins_deadlocks) {
        (DbClient::My { .. }, true) => (
            "CREATE TABLE ballast (n INT);\n",
            "INSERT INTO ballast SELECT seq FROM seq_1_to_1000;\n",
        ),
        (_, true) => (OUTSIDE_WAITS, ""),
        _ => ("", ""),
    };
    let mut sql =
        format!("{before}BEGIN;\n{within}SELECT id FROM {table} WHERE id = {id} FOR UPDATE;\n");
    if let DbClient::My { .. } = db {
        sql += &format!("SELECT GET_LOCK('{}', 0);\n", shown_lock(db, table, id));
    }
    let mut hold = session(db);
    feed(&mut hold, &sql);
    wait_row_locked(db, &mut hold, (table, id), holders).await;
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
    server_loses_deadlocks(&db, &url);
    let (s, addr_id, a, ep) = server_with_endpoint(url, String::new()).await;

    let mut outside = hold_row(&db, ("endpoint", ep), 1, true).await;

    let push = spawn_push(&s, &a, "through a deadlock");
    wait_until("the group commit", || waiting(&db, COMMIT) >= 1).await;
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

/// Makes the server's sessions give up on a deadlock before an outside
/// transaction's does ([`OUTSIDE_WAITS`]), so that a server's statement
/// is the victim of one. MariaDB picks as victim the transaction that
/// has written less: there the outside transaction writes ballast first.
fn server_loses_deadlocks(db: &DbClient, url: &str) {
    if let DbClient::Pg(_) = db {
        let name = url.rsplit('/').next().unwrap_or_default();
        db.query(&format!(
            "ALTER DATABASE {name} SET deadlock_timeout = '300ms'"
        ));
    }
}

/// What an outside session on PostgreSQL runs first, so that it waits
/// far longer than the server's sessions before it looks for a deadlock
/// ([`server_loses_deadlocks`]).
const OUTSIDE_WAITS: &str = "SET deadlock_timeout = '10s';\n";

/// A walk over an endpoint's backlog (here the one that makes its
/// waiting deliveries due once its settings change) whose chunk loses a
/// deadlock goes on: the database rolls the chunk's update back, and the
/// walk runs it again. Before, the walk ended there (`could not be made
/// due now`), and the rest of the backlog waited for its own next tries,
/// hours later with backoff, though what it waited for had changed. A
/// walk meets locks held by others where a claim, an outcome or another
/// node's walk takes the same deliveries in another order.
///
/// The deadlock is a real one: an outside transaction holds the last
/// delivery of the chunk, so the chunk's update, which takes the rows in
/// the order of their ids, waits for it holding the others; then the
/// outside transaction asks for the first.
#[tokio::test]
async fn a_walk_that_loses_a_deadlock_goes_on() {
    const N: u64 = 100;
    let Some((_dir, url, db)) =
        lockable_database("SQLite has a single writer and no deadlocks: nothing to test")
    else {
        return;
    };
    server_loses_deadlocks(&db, &url);
    let s = Server::start_with(ServerOptions {
        db: Some(url),
        ..ServerOptions::test_plugin("delivery:\n  max-attempts: 100\n")
    })
    .await;
    // One chunk.
    let (addr_id, _, ep) = s.endpoint_with_waiting_backlog(&db, N).await;
    let count = |sql: &str| -> i64 { db.query(sql).parse().expect("a number") };
    let waiting_rows = format!("FROM delivery WHERE {}", waiting_years(ep));
    assert_eq!(count(&format!("SELECT count(*) {waiting_rows}")), N as i64);
    let first = count(&format!("SELECT min(id) {waiting_rows}"));
    let last = count(&format!("SELECT max(id) {waiting_rows}"));

    let mut outside = hold_row(&db, ("delivery", last), 1, true).await;

    // The change's answer waits for the walk (within the server's
    // timeout), so the deadlock is made meanwhile.
    let path = format!("/addr/{addr_id}/endpoint/{ep}");
    let change = s.manage(
        Method::PATCH,
        &path,
        Some(json!({"config": {"fail": "down", "changed": true}})),
    );
    let deadlock = async {
        wait_until("the walk's update", || {
            waiting(&db, "UPDATE `delivery`") >= 1
        })
        .await;
        feed(
            &mut outside,
            &format!("SELECT id FROM delivery WHERE id = {first} FOR UPDATE;\n"),
        );
        commit_and_end(
            outside,
            "the outside transaction was the victim, not the walk",
        );
    };
    let (r, ()) = tokio::join!(change, deadlock);
    assert_status!(r, 200);

    // Its end, either way: "… are due now" or "… could not be made due
    // now".
    s.wait_log("due now", Duration::from_secs(30)).await;
    let ended = s.log_lines("due now");
    assert!(
        ended[0].contains("its waiting deliveries are due now"),
        "{ended:?}"
    );
    assert!(
        s.log_text().contains("a walk's statement lost a lock race"),
        "the walk met no deadlock"
    );
    assert_eq!(count(&format!("SELECT count(*) {waiting_rows}")), 0);
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
    let first = hold_row(&db, ("endpoint", ep), 1, false).await;
    let second = hold_row(&db, ("endpoint", ep_b), 2, false).await;
    let push_a = spawn_push(&s, &a, "first");
    wait_until("the first commit", || waiting(&db, COMMIT) >= 1).await;
    // The second push waits in the writer's queue meanwhile.
    let sent = Instant::now();
    let push_b = spawn_push(&s, &b, "second");

    // The second push's commit begins half its timeout after the push...
    tokio::time::sleep_until((sent + TIMEOUT / 2).into()).await;
    commit_and_end(first, "the first hold");
    assert_eq!(push_a.await.expect("the first push"), 202, "the first push");
    poll_until(Duration::from_secs(10), async || {
        if waiting(&db, COMMIT) >= 1 {
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
    let hold = hold_row(&db, ("endpoint", ep), 1, false).await;
    let push = spawn_push(&s, &a, "refused");
    wait_until("the held commit", || waiting(&db, COMMIT) >= 1).await;
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

/// A deletion answered 202 whose server is killed under it is made by
/// the server's next start: it was recorded before its walk began, and
/// the instance that held it is then dead. Before, it was lost: the
/// address stayed, with part of its history, and nothing said so.
///
/// An outside session holds a delivery of the deletion's first chunk, so
/// the walk waits while the deletion is answered 202 and the server is
/// killed.
#[tokio::test]
async fn a_deletion_cut_short_by_a_crash_is_made_by_the_next_start() {
    cut_short_by_a_crash(Cut::Addr).await;
}

/// [`a_deletion_cut_short_by_a_crash_is_made_by_the_next_start`], for an
/// endpoint's deletion: the endpoint and its history go, its address
/// stays.
#[tokio::test]
async fn an_endpoint_deletion_cut_short_by_a_crash_is_made_by_the_next_start() {
    cut_short_by_a_crash(Cut::Endpoint).await;
}

/// [`a_deletion_cut_short_by_a_crash_is_made_by_the_next_start`], for
/// `delete-everything`, which the next start ends as it would have.
#[tokio::test]
async fn a_delete_everything_cut_short_by_a_crash_is_made_by_the_next_start() {
    cut_short_by_a_crash(Cut::Everything).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Cut {
    Addr,
    Endpoint,
    Everything,
}

async fn cut_short_by_a_crash(what: Cut) {
    let Some(HeldHistory {
        dir: _dir,
        db,
        mut s,
        addr_id,
        ep,
        outside,
        ..
    }) = held_history().await
    else {
        return;
    };

    let addr_path = format!("/addr/{addr_id}");
    let ep_path = format!("/addr/{addr_id}/endpoint/{ep}");
    let r = match what {
        Cut::Addr => s.manage(Method::DELETE, &addr_path, None).await,
        Cut::Endpoint => s.manage(Method::DELETE, &ep_path, None).await,
        Cut::Everything => {
            let cmd = json!({"cmd": "delete-everything"});
            s.manage(Method::POST, "/core", Some(cmd)).await
        }
    };
    assert_status!(r, 202);
    s.kill_and_restart();
    commit_and_end(outside, "the hold");

    let gone = if what == Cut::Endpoint {
        &ep_path
    } else {
        &addr_path
    };
    s.until_gone(gone).await;
    s.wait_log("a deletion left unmade has ended", Duration::from_secs(5))
        .await;
    assert_eq!(db.query("SELECT count(*) FROM delivery"), "0");
    assert_eq!(db.query("SELECT count(*) FROM deletion"), "0");
    assert_eq!(db.query("SELECT count(*) FROM endpoint"), "0");
    // An endpoint's history is its deliveries; the events are its
    // address's.
    let (addrs, events) = match what {
        Cut::Addr | Cut::Everything => ("0", "0"),
        Cut::Endpoint => ("1", "1201"),
    };
    assert_eq!(db.query("SELECT count(*) FROM addr"), addrs);
    assert_eq!(db.query("SELECT count(*) FROM event"), events);
    if what == Cut::Everything {
        // Said once, by the node that made it.
        assert_eq!(s.log_lines("every address was deleted").len(), 1);
    }
}

/// A server on a database whose rows an outside session can hold (none
/// on SQLite), with `yaml` for the rest of its config, whose deletion of
/// an address (answered 202 while a hold keeps its walk waiting) the
/// database then refuses: its events' deletion fails until
/// `allow_writes("event")`. The server, the database and the address's
/// path.
async fn refused_deletion(yaml: &str) -> Option<(tempfile::TempDir, Server, DbClient, String)> {
    let (dir, url, db) =
        lockable_database("the deletion is held through a row lock, which SQLite has not")?;
    let (s, addr_id, a, _) = server_with_endpoint(url, yaml.to_string()).await;
    assert_status!(s.push(json!({"addr": a, "msg": "m"})).await, 202);
    s.wait_settled(addr_id).await;
    let held: i64 = db
        .query("SELECT id FROM delivery")
        .parse()
        .expect("a delivery id");
    let outside = hold_row(&db, ("delivery", held), 1, false).await;
    let path = format!("/addr/{addr_id}");
    assert_status!(s.manage(Method::DELETE, &path, None).await, 202);
    db.refuse_deletes("event", "OLD.msg = 'm'");
    commit_and_end(outside, "the hold");
    Some((dir, s, db, path))
}

/// A deletion answered 202 that then fails (here the database refuses to
/// delete its events) is taken up again by the next cleanup, and made
/// once the database lets it. Before, it was lost after its `failed`
/// line. (A `node-timeout` of a minute keeps the node's own looks out of
/// the way.)
#[tokio::test]
async fn a_deletion_that_fails_after_its_202_is_made_by_the_next_cleanup() {
    let Some((_dir, s, db, path)) = refused_deletion("node-timeout: 60\n").await else {
        return;
    };
    s.wait_log("a deletion answered 202 failed", Duration::from_secs(20))
        .await;

    db.allow_writes("event");
    let r = s
        .manage(Method::POST, "/core", Some(json!({"cmd": "cleanup"})))
        .await;
    assert_status!(r, 204);
    assert_status!(s.manage(Method::GET, &path, None).await, 404);
    assert_eq!(db.query("SELECT count(*) FROM event"), "0");
    assert_eq!(db.query("SELECT count(*) FROM deletion"), "0");
    s.wait_log("a deletion left unmade has ended", Duration::from_secs(5))
        .await;
}

/// A deletion answered 202 that keeps failing is tried again every
/// `node-timeout` or so, and made once the database lets it, with no
/// cleanup asked for. Before, after the look one `node-timeout` past the
/// start, it waited for the next cleanup: an hour by default.
#[tokio::test]
async fn a_deletion_that_keeps_failing_is_tried_again_until_made() {
    let Some((_dir, s, db, path)) = refused_deletion("").await else {
        return;
    };
    // It fails, is taken up again, and fails again.
    let failed = "a deletion failed;";
    poll_until(Duration::from_secs(30), async || {
        match s.log_lines(failed).len() {
            2.. => Ok(()),
            n => Err(format!("{n} failure(s) said:\n{}", s.log_text())),
        }
    })
    .await;
    assert_eq!(s.log_lines("taking up a deletion left unmade").len(), 1);
    // The metric behind RobogerDeletionNotEnding counts its age.
    let oldest = "roboger_deletion_oldest_seconds";
    poll_until(Duration::from_secs(20), async || {
        match s.metrics().await.get(oldest) {
            Some(age) if *age > 0.0 => Ok(()),
            age => Err(format!("{oldest}: {age:?}")),
        }
    })
    .await;

    db.allow_writes("event");
    s.until_gone(&path).await;
    s.wait_log("a deletion left unmade has ended", Duration::from_secs(5))
        .await;
    assert_eq!(db.query("SELECT count(*) FROM event"), "0");
    assert_eq!(db.query("SELECT count(*) FROM deletion"), "0");
    assert!(s.log_lines(" cleanup").is_empty(), "{}", s.log_text());
    s.metric_reaches(oldest, 0.0).await;
}

/// A deletion whose node dies under it is made by another node within
/// about two `node-timeout`s, whose log says so. Before, the other node
/// looked one `node-timeout` after its own start, and then only at its
/// next cleanup (an hour by default): the address stayed listed until
/// then.
#[tokio::test]
async fn a_deletion_whose_node_dies_under_it_is_made_by_another_node() {
    let Some(HeldHistory {
        dir: _dir,
        url,
        db,
        s: mut dying,
        addr_id,
        outside,
        ..
    }) = held_history().await
    else {
        return;
    };
    let other = Server::start_with(ServerOptions {
        db: Some(url),
        ..ServerOptions::test_plugin("")
    })
    .await;
    // The other node's first look, one node-timeout after its start, is
    // over before the deletion begins.
    poll_until(Duration::from_secs(30), async || {
        let r = other.manage(Method::GET, "/node", None).await;
        let me = r
            .json()
            .as_array()
            .and_then(|nodes| nodes.iter().find(|n| n["self"] == json!(true)).cloned());
        let at = |k: &str| {
            me.as_ref()
                .and_then(|n| n[k].as_str())
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
        };
        match (at("started"), at("heartbeat")) {
            (Some(started), Some(beat)) if beat - started > chrono::Duration::seconds(4) => Ok(()),
            _ => Err(format!("younger than its first look: {}", r.text)),
        }
    })
    .await;

    let path = format!("/addr/{addr_id}");
    assert_status!(dying.manage(Method::DELETE, &path, None).await, 202);
    dying.kill();
    commit_and_end(outside, "the hold");

    other.until_gone(&path).await;
    other
        .wait_log("a deletion left unmade has ended", Duration::from_secs(5))
        .await;
    assert_eq!(db.query("SELECT count(*) FROM event"), "0");
    assert_eq!(db.query("SELECT count(*) FROM deletion"), "0");
}

/// A node stopped (SIGTERM) under a deletion stops at once, and says that
/// the deletion is left; its next start makes it. Before, its log said
/// nothing of it.
#[tokio::test]
async fn a_node_stopped_under_a_deletion_says_it_is_left() {
    let Some(HeldHistory {
        dir: _dir,
        db,
        mut s,
        addr_id,
        outside,
        ..
    }) = held_history().await
    else {
        return;
    };
    let path = format!("/addr/{addr_id}");
    assert_status!(s.manage(Method::DELETE, &path, None).await, 202);
    assert!(s.terminate().success(), "{}", s.log_text());
    let said = s.log_lines("deletions under way are left to the other nodes");
    assert_eq!(said.len(), 1, "{}", s.log_text());
    assert!(said[0].contains("deletions=1"), "{}", said[0]);
    commit_and_end(outside, "the hold");

    s.kill_and_restart();
    s.until_gone(&path).await;
    s.wait_log("a deletion left unmade has ended", Duration::from_secs(5))
        .await;
    assert_eq!(db.query("SELECT count(*) FROM deletion"), "0");
}

/// A deletion asked for again while the first goes on (a client that
/// gave up on its answer and retries) is answered 202 at once and starts
/// no second walk over the same history, nor does one of an endpoint
/// whose address is being deleted. Before, each started a walk of its
/// own, holding locks on the first one's rows, and the log said each
/// had ended.
#[tokio::test]
async fn a_deletion_asked_for_again_starts_no_second_walk() {
    let Some(HeldHistory {
        dir: _dir,
        db,
        s,
        addr_id,
        ep,
        outside,
        ..
    }) = held_history().await
    else {
        return;
    };
    let path = format!("/addr/{addr_id}");
    assert_status!(s.manage(Method::DELETE, &path, None).await, 202);
    for again in [path.clone(), format!("{path}/endpoint/{ep}")] {
        let r = s.manage(Method::DELETE, &again, None).await;
        assert_status!(r, 202);
        assert!(r.text.contains("a deletion asked for before"), "{}", r.text);
    }
    assert_eq!(db.query("SELECT count(*) FROM deletion"), "1");
    assert_eq!(
        s.log_lines("a deletion asked for again is under way already")
            .len(),
        2
    );
    commit_and_end(outside, "the hold");

    s.until_gone(&path).await;
    s.wait_log("a deletion answered 202 has ended", Duration::from_secs(5))
        .await;
    assert_eq!(db.query("SELECT count(*) FROM deletion"), "0");
    assert_eq!(db.query("SELECT count(*) FROM event"), "0");
    assert_eq!(s.log_lines("has ended").len(), 1, "{}", s.log_text());
    // Asked for once it has ended: nothing left to delete.
    assert_status!(s.manage(Method::DELETE, &path, None).await, 404);
}

/// What a deletion under way takes is pushed to no more, through any
/// node, nor changed: a push to an address being deleted (or to every
/// address, by a `delete-everything`) is answered 404 and nothing is
/// stored, and an endpoint being deleted gets no delivery of a push to
/// its address, while the address's other endpoint does; a change under
/// either is answered 409 (a retry of failed deliveries too), one to
/// the other endpoint is made, and a retry of an event's failed
/// deliveries leaves out those to an endpoint being deleted. Before,
/// each push and change was accepted (202, 201, 200) and then deleted
/// with what the deletion took, delivered or not.
#[tokio::test]
async fn what_is_being_deleted_is_pushed_to_and_changed_no_more() {
    for what in ["endpoint", "addr", "everything"] {
        let Some(HeldHistory {
            dir: _dir,
            url,
            db,
            s,
            addr_id,
            a,
            ep,
            outside,
        }) = held_history().await
        else {
            return;
        };
        let other_ep = s.endpoint(addr_id, "t", json!({})).await;
        // An event of the last chunk the deletion's walk takes (the
        // first is held), its delivery failed.
        let failed = "00000000-0000-7000-8000-000000001200";
        db.query(&format!(
            "UPDATE delivery SET state = 'failed' WHERE event_id = '{failed}'; COMMIT"
        ));
        let other_node = Server::start_with(ServerOptions {
            db: Some(url),
            ..ServerOptions::test_plugin("")
        })
        .await;
        let r = match what {
            "endpoint" => {
                let path = format!("/addr/{addr_id}/endpoint/{ep}");
                s.manage(Method::DELETE, &path, None).await
            }
            "addr" => {
                s.manage(Method::DELETE, &format!("/addr/{addr_id}"), None)
                    .await
            }
            _ => {
                let cmd = json!({"cmd": "delete-everything"});
                s.manage(Method::POST, "/core", Some(cmd)).await
            }
        };
        assert_status!(r, 202);

        let during = json!({"addr": a, "msg": "during"});
        if what == "endpoint" {
            for node in [&s, &other_node] {
                assert_status!(node.push(during.clone()).await, 202);
            }
            poll_until(Duration::from_secs(20), async || {
                match db.query(
                    "SELECT count(*) FROM delivery d JOIN event e ON e.id = d.event_id \
                     WHERE e.msg = 'during' AND d.state = 'delivered'",
                ) {
                    n if n == "2" => Ok(()),
                    n => Err(format!("{n} delivered")),
                }
            })
            .await;
            let to = db.query(
                "SELECT DISTINCT d.endpoint_id FROM delivery d JOIN event e \
                 ON e.id = d.event_id WHERE e.msg = 'during'",
            );
            assert_eq!(to, other_ep.to_string(), "{what}");
        } else {
            for node in [&s, &other_node] {
                let r = node.push(during.clone()).await;
                assert_status!(r, 404);
                assert!(r.text.contains("it is being deleted"), "{what}: {}", r.text);
            }
            let stored = db.query("SELECT count(*) FROM event WHERE msg = 'during'");
            assert_eq!(stored, "0", "{what}");
        }

        let addr_path = format!("/addr/{addr_id}");
        let (ep_path, other_path) = (
            format!("{addr_path}/endpoint/{ep}"),
            format!("{addr_path}/endpoint/{other_ep}"),
        );
        let off = || Some(json!({"active": 0}));
        let changes = [
            (Method::PATCH, addr_path.clone(), off()),
            (
                Method::POST,
                format!("{addr_path}/endpoint"),
                Some(json!({"plugin_name": "t"})),
            ),
            (Method::PATCH, ep_path.clone(), off()),
            (
                Method::POST,
                format!("{ep_path}/subscription"),
                Some(json!({})),
            ),
            (Method::POST, ep_path.clone(), Some(json!({"cmd": "retry"}))),
            (Method::PATCH, other_path.clone(), off()),
            (
                Method::POST,
                format!("{addr_path}/event/{failed}"),
                Some(json!({"cmd": "retry"})),
            ),
        ];
        for (i, (m, path, body)) in changes.into_iter().enumerate() {
            let r = s.manage(m.clone(), &path, body).await;
            let refused = match what {
                "endpoint" => (2..5).contains(&i),
                _ => true,
            };
            let said = format!("{what}: {m} {path}: {} {}", r.status, r.text);
            if refused {
                assert_eq!(r.status.as_u16(), 409, "{said}");
                let whose = if what == "endpoint" {
                    format!("endpoint {ep} is being deleted")
                } else {
                    format!("addr {addr_id} is being deleted")
                };
                assert!(r.text.contains(&whose), "{said}");
            } else {
                assert!(r.status.is_success(), "{said}");
            }
        }
        // Only the endpoint created under the address whose endpoint is
        // being deleted is made, and the event's retry left its delivery
        // to that endpoint failed.
        let endpoints = db.query("SELECT count(*) FROM endpoint");
        let made = if what == "endpoint" { "3" } else { "2" };
        assert_eq!(endpoints, made, "{what}");
        let state = db.query(&format!(
            "SELECT state FROM delivery WHERE event_id = '{failed}'"
        ));
        assert_eq!(state, "failed", "{what}");
        commit_and_end(outside, "the hold");
        s.wait_log("a deletion answered 202 has ended", Duration::from_secs(30))
            .await;
    }
}

/// A `delete-everything` answered 202 deletes what there was when it was
/// asked for, not what is made while it goes on: `robogerctl deploy
/// --delete-everything` asks for it and then creates the deploy's
/// addresses, which must outlast it, and gives each the string its
/// deploy file pins, which one being deleted may still hold. Before, it
/// deleted every address there was when it ended, the new ones with their
/// endpoints and events; and the string was refused as taken (409),
/// which made robogerctl give up the deploy.
#[tokio::test]
async fn a_delete_everything_spares_what_is_made_while_it_goes_on() {
    let Some(HeldHistory {
        dir: _dir,
        db,
        s,
        addr_id: old,
        a,
        outside,
        ..
    }) = held_history().await
    else {
        return;
    };
    let cmd = json!({"cmd": "delete-everything"});
    assert_status!(s.manage(Method::POST, "/core", Some(cmd)).await, 202);

    // Made while it goes on: an address with the old one's string, its
    // endpoint, an event.
    let (new, _) = s.new_addr().await;
    let change = json!({"cmd": "change", "to": a});
    let r = s
        .manage(Method::POST, &format!("/addr/{new}"), Some(change))
        .await;
    // Moved, as the original answers a change.
    assert_status!(r, 301);
    s.wait_log(
        "an address string is taken from an address being deleted",
        Duration::from_secs(5),
    )
    .await;
    s.endpoint(new, "t", json!({})).await;
    assert_status!(s.push(json!({"addr": a, "msg": "after"})).await, 202);
    s.wait_settled(new).await;
    commit_and_end(outside, "the hold");

    s.until_gone(&format!("/addr/{old}")).await;
    s.wait_log("a deletion answered 202 has ended", Duration::from_secs(5))
        .await;
    let r = s.manage(Method::GET, &format!("/addr/{new}"), None).await;
    assert_status!(r, 200);
    assert_eq!(r.json()["a"], json!(a), "{}", r.text);
    let eps = s
        .manage(Method::GET, &format!("/addr/{new}/endpoint"), None)
        .await;
    assert_eq!(eps.json().as_array().map(Vec::len), Some(1), "{}", eps.text);
    assert_eq!(db.query("SELECT msg FROM event"), "after");
    assert_eq!(db.query("SELECT count(*) FROM delivery"), "1");
    assert_status!(s.push(json!({"addr": a, "msg": "later"})).await, 202);
}

/// `robogerctl deploy --delete-everything` itself (2.0.14, unmodified,
/// waiting its default 5 s for each answer) while the delete-everything
/// it asks for goes on (202), on a server with the default `timeout`,
/// 5 s: the deploy succeeds, its address takes the string its file pins
/// from the address being deleted, a push to that string reaches the
/// deploy's endpoint, and once the deletion ends only the deploy's
/// address is left. Before, the server waited all of `timeout` before
/// its 202, robogerctl gave up first ("Read timed out"), and the deploy
/// failed. (`a_delete_everything_spares_what_is_made_while_it_goes_on`
/// makes robogerctl's calls itself.)
#[tokio::test]
async fn robogerctl_deploys_while_its_delete_everything_goes_on() {
    let Some(bin) = robogerctl_path() else {
        return;
    };
    let Some(HeldHistory {
        dir,
        db,
        s,
        addr_id: old,
        a,
        outside,
        ..
    }) = held_history_with("timeout: 5\n").await
    else {
        return;
    };
    let ctl = Ctl::new(bin, &s, dir.path());
    let file = dir.path().join("deploy.yml");
    let deploy = format!(
        "version: 2
addrs:
  - a: {a}
    endpoints:
      - plugin_name: t
        subscriptions:
          - level: info
"
    );
    std::fs::write(&file, deploy).expect("the deploy file");
    let path = file.to_str().expect("a UTF-8 path");
    let out = ctl.json(&["deploy", "-f", path, "--delete-everything"]);
    let new = out["deployed"][0].as_i64().expect("the deployed address");
    assert_ne!(new, old);
    // Still going on: the deploy did not wait for it.
    assert_eq!(db.query("SELECT count(*) FROM deletion"), "1");

    assert_status!(s.push(json!({"addr": a, "msg": "deployed"})).await, 202);
    let e = s.wait_settled(new).await;
    assert_eq!(e["deliveries"][0]["state"], "delivered", "{e}");
    commit_and_end(outside, "the hold");

    s.until_gone(&format!("/addr/{old}")).await;
    s.wait_log("a deletion answered 202 has ended", Duration::from_secs(5))
        .await;
    let addrs = ctl.json(&["addr", "list"]);
    let strings: Vec<&str> = addrs
        .as_array()
        .map(|all| all.iter().filter_map(|x| x["a"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(strings, [a.as_str()], "{addrs}");
}

/// The console's page of an address says that a deletion answered 202
/// goes on, of the address or of one of its endpoints (in that
/// endpoint's block, and on its own page), offers no change to what it
/// takes (which the API refuses meanwhile), there or on the page of a
/// new endpoint of the address, and stops saying so once it has ended.
/// Before, the page showed the address as any other until it was gone,
/// and an operator who had not seen the notice after the redirect asked
/// again; the endpoint's own page and the new endpoint's page offered
/// their forms.
#[tokio::test]
async fn the_console_shows_what_is_being_deleted() {
    for of_endpoint in [true, false] {
        let Some(HeldHistory {
            dir: _dir,
            s,
            addr_id,
            ep,
            outside,
            ..
        }) = held_history().await
        else {
            return;
        };
        let other = s.endpoint(addr_id, "t", json!({})).await;
        let page = format!("/ui/addr/{addr_id}");
        let path = if of_endpoint {
            format!("/addr/{addr_id}/endpoint/{ep}")
        } else {
            format!("/addr/{addr_id}")
        };
        assert_status!(s.manage(Method::DELETE, &path, None).await, 202);

        let html = s.console_page(&page).await;
        let block = |id: i64| {
            let start = format!("id=\"endpoint-{id}\"");
            let from = html.find(&start).expect("the endpoint's block");
            let to = html[from..]
                .find("</article>")
                .map_or(html.len(), |n| from + n);
            html[from..to].to_string()
        };
        let (address_said, endpoint_said) = (
            "the address is gone when it ends",
            "the endpoint is gone when it ends",
        );
        assert_eq!(html.contains(address_said), !of_endpoint, "{html}");
        assert_eq!(block(ep).contains(endpoint_said), of_endpoint, "{html}");
        assert!(!block(other).contains(endpoint_said), "{html}");
        // What would be refused (409) is not offered.
        let offers = |html: &str, what: &str| html.contains(what);
        for what in ["Send test event", "Add endpoint", "Disable address"] {
            assert_eq!(offers(&html, what), of_endpoint, "{what}: {html}");
        }
        for (id, changeable) in [(ep, false), (other, of_endpoint)] {
            for what in [
                format!("Disable endpoint {id}"),
                format!("Subscribe endpoint {id}"),
            ] {
                assert_eq!(offers(&block(id), &what), changeable, "{what}: {html}");
            }
            // The endpoint's own page, and the page of a new endpoint.
            let own = s.console_page(&format!("{page}/endpoint/{id}")).await;
            assert_eq!(offers(&own, "Save endpoint"), changeable, "{own}");
            assert_eq!(
                offers(&own, "Being deleted"),
                id == ep && of_endpoint,
                "{own}"
            );
        }
        let new = s
            .console_page(&format!("{page}/endpoint/new?plugin=t"))
            .await;
        assert_eq!(offers(&new, "Create endpoint"), of_endpoint, "{new}");
        assert_eq!(
            offers(&new, "Its address is being deleted"),
            !of_endpoint,
            "{new}"
        );
        commit_and_end(outside, "the hold");

        s.wait_log("a deletion answered 202 has ended", Duration::from_secs(30))
            .await;
        if of_endpoint {
            let html = s.console_page(&page).await;
            assert!(!html.contains("Being deleted"), "{html}");
            assert!(!html.contains(&format!("id=\"endpoint-{ep}\"")), "{html}");
        }
    }
}
