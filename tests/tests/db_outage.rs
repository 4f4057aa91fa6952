//! What users see while the database does not answer: `/ping`, the
//! management API and `/push` say 503 (within the configured timeout;
//! a push is never accepted without its commit), `/metrics` still
//! answers, and all recover by themselves when the database is back.
//!
//! And a delivery made while the database is out of reach (frozen, or
//! its connections broken) is written once it is back, not made again;
//! one whose outcome the database itself refused is given up on and made
//! again; and what the log says of it all: each failing task once, and
//! once again when it works.
//!
//! And a push whose commit took effect though its answer was lost on the
//! way back is answered 503 and never delivered; a claim whose answer was
//! lost holds nothing; and while the network flaps no push answered 202 is
//! lost, none answered 503 is delivered. A connection that falls silent
//! for good (a failover whose old primary vanished) holds no task.
//!
//! Those that freeze the whole PostgreSQL server (SIGSTOP) must not run
//! beside other tests nor each other: they are ignored by default and
//! `tests/run` runs them alone, one at a time, passing the server's data
//! directory in `ROBOGER_TEST_PGDATA`. The lost answer is a proxy's own
//! doing, on PostgreSQL and MySQL, and runs with the other suites.

use std::process::Command;
use std::time::{Duration, Instant};

use roboger_tests::db_proxy::{DbProxy, Lose};
use roboger_tests::{
    DbClient, Method, Server, ServerOptions, assert_status, poll_every, poll_until, waiting_years,
};

/// The test PostgreSQL server's data directory (these tests need it, and
/// the server named by `ROBOGER_TEST_PG`).
fn pg_data() -> String {
    assert!(roboger_tests::on_postgres(), "ROBOGER_TEST_PG must be set");
    std::env::var("ROBOGER_TEST_PGDATA").expect("ROBOGER_TEST_PGDATA (run through tests/run)")
}

/// The test PostgreSQL server, frozen (SIGSTOP): its postmaster first,
/// so that it starts no new process, then each process it had started.
/// A backend or autovacuum worker that ends between the listing and its
/// signal needs none (its `kill` failing had failed the test). Returns
/// the processes for [`thaw`].
fn freeze(data: &str) -> Vec<String> {
    let pidfile =
        std::fs::read_to_string(format!("{data}/postmaster.pid")).expect("postmaster.pid");
    let main = pidfile.lines().next().expect("pid line").trim().to_string();
    assert!(signal(&main, "-STOP"), "kill -STOP {main} (the postmaster)");
    let out = Command::new("pgrep")
        .args(["-P", &main])
        .output()
        .expect("pgrep");
    let mut pids = vec![main];
    for child in String::from_utf8_lossy(&out.stdout).lines() {
        if signal(child, "-STOP") {
            pids.push(child.to_string());
        } else {
            assert!(
                !std::path::Path::new(&format!("/proc/{child}")).exists(),
                "kill -STOP {child}"
            );
        }
    }
    pids
}

/// Lets the processes [`freeze`] stopped go on.
fn thaw(pids: &[String]) {
    for pid in pids {
        signal(pid, "-CONT");
    }
}

/// Whether `sig` reached process `pid`.
fn signal(pid: &str, sig: &str) -> bool {
    Command::new("kill")
        .args([sig, pid])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("kill")
        .success()
}

#[tokio::test]
#[ignore = "freezes the shared PostgreSQL server; tests/run runs it alone"]
async fn ping_and_api_answer_503_while_the_database_is_frozen() {
    let data = pg_data();
    let s = Server::start().await;
    assert_status!(s.request(Method::GET, "/ping", None, &[], None).await, 204);
    let a = s.manage(Method::POST, "/addr", None).await.json()["a"]
        .as_str()
        .unwrap()
        .to_string();
    assert_status!(
        s.request(
            Method::POST,
            "/push",
            None,
            &[],
            Some(serde_json::json!({"addr": a}))
        )
        .await,
        202
    );

    let pids = freeze(&data);
    let t = Instant::now();
    let ping = s.request(Method::GET, "/ping", None, &[], None).await;
    let api = s.manage(Method::GET, "/addr", None).await;
    // A push the database cannot commit is refused, never accepted.
    let push = s
        .request(
            Method::POST,
            "/push",
            None,
            &[],
            Some(serde_json::json!({"addr": a, "msg": "lost?"})),
        )
        .await;
    let answered = t.elapsed();
    // /metrics goes on with the master key: the wrong-key count it cannot
    // read is given up after a second, and the scrape ends well within
    // Prometheus's default scrape_timeout (10 s).
    let scraped = Instant::now();
    let metrics = s
        .request(
            Method::GET,
            "/metrics",
            None,
            &[("Authorization", &format!("Bearer {}", roboger_tests::KEY))],
            None,
        )
        .await;
    let scrape_took = scraped.elapsed();
    thaw(&pids);
    assert_status!(metrics, 200);
    assert!(
        scrape_took < Duration::from_secs(8),
        "the scrape took {scrape_took:?}"
    );
    assert_status!(ping, 503);
    assert_status!(api, 503);
    assert_status!(push, 503);
    assert!(!api.text.is_empty());
    // timeout is 2 s in the test config: ping 2 s, the API call at most 4 s.
    assert!(
        answered < Duration::from_secs(10),
        "answers came after {answered:?}"
    );

    // Back to normal without a restart.
    poll_until(Duration::from_secs(20), async || {
        match s
            .request(Method::GET, "/ping", None, &[], None)
            .await
            .status
        {
            st if st.as_u16() == 204 => Ok(()),
            st => Err(format!("ping did not recover: {st}")),
        }
    })
    .await;
    assert_status!(s.manage(Method::GET, "/addr", None).await, 200);
    assert_status!(
        s.request(
            Method::POST,
            "/push",
            None,
            &[],
            Some(serde_json::json!({"addr": a}))
        )
        .await,
        202
    );
}

/// How many sends of each event the test plugin began (endpoints
/// configured with `gate` or `slow` record it), by event id.
fn sends_started(record: &std::path::Path) -> std::collections::BTreeMap<String, usize> {
    let mut sends = std::collections::BTreeMap::new();
    for r in roboger_tests::plugin_calls(record, "send_started") {
        if let Some(id) = r["event_id"].as_str() {
            *sends.entry(id.to_string()).or_insert(0) += 1;
        }
    }
    sends
}

/// A delivery whose call answers while the database is frozen has its
/// outcome written once the database answers again, and is not made a
/// second time. The writer used to give an outcome up after five failed
/// commits (ten seconds of a frozen database with a 2 s timeout), and
/// the delivery was made again: a failover's every delivery in flight
/// reached its target twice.
#[tokio::test]
#[ignore = "freezes the shared PostgreSQL server; tests/run runs it alone"]
async fn a_delivery_whose_outcome_waited_for_a_frozen_database_is_not_made_again() {
    let data = pg_data();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (record, gate) = (dir.path().join("record"), dir.path().join("gate"));
    let s = Server::start_with(ServerOptions::recording_test_plugin(&record)).await;
    let (id, ep) = calls_waiting(&s, &record, &gate, 1).await;
    let pids = freeze(&data);
    // The call answers while the database is frozen, and the database
    // stays so for six of the writer's commits (each times out in 2 s).
    std::fs::write(&gate, b"open").expect("open the gate");
    tokio::time::sleep(Duration::from_secs(12)).await;
    thaw(&pids);
    made_once(&s, &record, (id, ep), 1).await;
}

/// A new address of `s` with an endpoint of the test plugin whose calls
/// wait until `gate` exists, and `n` pushes to it, each accepted, whose
/// calls have begun; returns the address's and the endpoint's ids.
async fn calls_waiting(
    s: &Server,
    record: &std::path::Path,
    gate: &std::path::Path,
    n: usize,
) -> (i64, i64) {
    let (id, a) = s.new_addr().await;
    let ep = s
        .endpoint(
            id,
            "t",
            serde_json::json!({"gate": gate.display().to_string()}),
        )
        .await;
    for i in 0..n {
        assert_status!(
            s.push(serde_json::json!({"addr": a, "msg": format!("m{i}")}))
                .await,
            202
        );
    }
    poll_until(Duration::from_secs(20), async || {
        match sends_started(record).len() {
            started if started == n => Ok(()),
            started => Err(format!("{started} of {n} sends started")),
        }
    })
    .await;
    (id, ep)
}

/// Holds that each of the `n` deliveries of endpoint `ep` (of address
/// `id`) is delivered, made once, and that no outcome was given up on;
/// and that the log says the outage ended, though nothing is pushed
/// (the writer said it only at its next commit once).
async fn made_once(s: &Server, record: &std::path::Path, (id, ep): (i64, i64), n: usize) {
    s.endpoint_settles(id, ep, n as u64, 0).await;
    let sends = sends_started(record);
    assert!(
        sends.len() == n && sends.values().all(|made| *made == 1),
        "made again: {sends:?}\n{}",
        s.log_text()
    );
    assert!(
        s.log_lines("delivery outcomes dropped").is_empty(),
        "{}",
        s.log_text()
    );
    s.wait_log("the database takes writes again", Duration::from_secs(10))
        .await;
}

/// What the operator reads in the log of an outage: each task that fails
/// says so once, with its error (a reminder comes a minute later, longer
/// than this freeze), not once per failure; and each says when it works
/// again (once it has worked for 3 s).
#[tokio::test]
#[ignore = "freezes the shared PostgreSQL server; tests/run runs it alone"]
async fn an_outage_is_logged_once_per_task_and_so_is_its_end() {
    let data = pg_data();
    let s = Server::start().await;
    let (_, a) = s.new_addr().await;
    let pids = freeze(&data);
    // Each push refused is a commit that failed (timeout: 2 s).
    let mut refused = Vec::new();
    for i in 0..3 {
        let r = s
            .push(serde_json::json!({"addr": a, "msg": format!("refused {i}")}))
            .await;
        refused.push(r.status.as_u16());
    }
    thaw(&pids);
    assert_eq!(refused, [503, 503, 503]);
    // Pushes, and routing changes for a listener that failed, until the
    // commits are said to work again.
    poll_every(
        Duration::from_millis(250),
        Duration::from_secs(30),
        async || {
            match s.push(serde_json::json!({"addr": a, "msg": "back"})).await {
                r if r.status.as_u16() == 202 => {}
                r => return Err(format!("push after the outage: {} {}", r.status, r.text)),
            }
            s.new_addr().await;
            match s
                .log_lines("the database takes writes again after")
                .is_empty()
            {
                true => Err(format!("never said it writes again: {}", s.log_text())),
                false => Ok(()),
            }
        },
    )
    .await;
    let failed = s.log_lines("cannot write to the database");
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert!(failed[0].contains("ERROR"), "{}", failed[0]);
    assert!(failed[0].contains("error="), "{}", failed[0]);
    // Whichever other tasks failed (a task whose query was sent as the
    // database froze waits for it instead), each said so once and says
    // it works again.
    let said = |level: &str| -> Vec<String> {
        s.log_text()
            .lines()
            .filter(|l| l.contains(level) && l.contains("roboger_server::outage:"))
            .map(|l| {
                let m = l.split("roboger_server::outage: ").nth(1).unwrap_or(l);
                let m = m.split(" error=").next().unwrap_or(m);
                m.split(", still:").next().unwrap_or(m).to_string()
            })
            .collect()
    };
    let failing = [said(" WARN "), said(" ERROR ")].concat();
    let mut distinct = failing.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        failing.len(),
        "said more than once: {failing:#?}"
    );
    poll_every(
        Duration::from_millis(250),
        Duration::from_secs(20),
        async || {
            s.new_addr().await;
            let again = said(" INFO ");
            match again.len() == failing.len() {
                true => Ok(()),
                false => Err(format!("failing: {failing:#?}\nworking again: {again:#?}")),
            }
        },
    )
    .await;
}

/// A server started with `opts`, on a fresh database that it reaches
/// through a proxy that can lose a commit's answer ([`DbProxy`],
/// which reads PostgreSQL's and MySQL's protocols), and the database's
/// own URL. `None` on SQLite, whose commits run in the server's own
/// process, with no connection to lose an answer on: such a test has
/// nothing to do there. The proxy's tasks need threads of their own
/// (`multi_thread`): the harness blocks its thread while a server starts.
async fn behind_proxy(opts: ServerOptions) -> Option<(DbProxy, Server, String)> {
    if !roboger_tests::on_postgres() && !roboger_tests::on_mysql() {
        eprintln!("nothing to do: SQLite has no connection to lose an answer on");
        return None;
    }
    // A database on a server: nothing in the directory.
    let (_dir, url) = roboger_tests::shared_database();
    let proxy = DbProxy::start(&url).await;
    let s = Server::start_with(ServerOptions {
        db: Some(proxy.url().to_string()),
        ..opts
    })
    .await;
    Some((proxy, s, url))
}

/// A push whose group commit took effect though the server never got the
/// answer (its connection to the database broke after the database had
/// the commit: a network fault, a connection pooler restarted) is
/// answered 503, which says "stored nowhere, send again". Its event was
/// there all the same, its deliveries leased to the server and never
/// tried, until the server's next start made them: a sender that sent
/// again got its event twice. Now the server looks for such events once
/// the commit can no longer be running (its timeout later) and deletes
/// them.
///
/// The answer is lost by a proxy ([`behind_proxy`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_answered_503_is_not_delivered_though_its_commit_took_effect() {
    let Some((proxy, s, url)) = behind_proxy(ServerOptions::test_plugin("")).await else {
        return;
    };
    let (id, a) = s.new_addr().await;
    let ep = s.endpoint(id, "t", serde_json::json!({})).await;
    let push = async |msg: &str| s.push(serde_json::json!({"addr": a, "msg": msg})).await;
    // The first commit prepares its statement on the commit connection.
    assert_status!(push("before").await, 202);
    // Its delivery's outcome written: on PostgreSQL the group commit of
    // outcomes alone is the same statement, and the proxy would lose its
    // answer instead of the next push's.
    s.endpoint_settles(id, ep, 1, 0).await;
    proxy.lose_next(Lose::GroupCommit);
    assert_status!(push("answer lost").await, 503);
    assert_eq!(proxy.answers_lost(), 1);
    // It took effect: the database has the event, untried.
    let db = DbClient::of(&url);
    let stored = "SELECT count(*) FROM event JOIN delivery ON delivery.event_id = event.id \
                  WHERE msg = 'answer lost' AND state = 'pending' AND attempts = 0";
    assert_eq!(db.query(stored), "1");
    // Its sender sends it again, and that one is delivered.
    assert_status!(push("answer lost").await, 202);
    let again = s.wait_settled(id).await;
    assert_eq!(again["deliveries"][0]["state"], "delivered", "{again}");
    // The event first stored is deleted, once its commit cannot be
    // running (the timeout is 2 s), and the log says so.
    poll_until(Duration::from_secs(15), async || {
        match db.query("SELECT count(*) FROM event WHERE msg = 'answer lost'") {
            n if n == "1" => Ok(()),
            n => Err(format!("{n} events 'answer lost': {}", s.log_text())),
        }
    })
    .await;
    let said = s.log_lines("were stored after all");
    assert_eq!(said.len(), 1, "{}", s.log_text());
    assert!(said[0].contains("events=1"), "{}", said[0]);
    // sqlx's pool warns of each broken connection it drops, a line per
    // connection while the network flaps; the server's own lines say it.
    assert!(
        s.log_lines("sqlx_core::pool").is_empty(),
        "{}",
        s.log_text()
    );
    // What the address's history shows: each push answered 202, once.
    let events = s
        .manage(Method::GET, &format!("/addr/{id}/event"), None)
        .await
        .json();
    let mut msgs: Vec<&str> = events
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|e| e["msg"].as_str())
        .collect();
    msgs.sort();
    assert_eq!(msgs, ["answer lost", "before"], "{events}");
    assert_eq!(db.query("SELECT count(*) FROM delivery"), "2");
}

/// A claim of due deliveries (here a retry) whose `COMMIT` took effect
/// though the server never got its answer left those deliveries leased
/// to the server, which renews its own leases and never claims them
/// again: the retry waited for the server's next start. Now the claim's
/// deliveries are freed (the freeing waits for the claim's row locks if
/// its `COMMIT` still runs) and claimed again, and the retry is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_claim_lost_its_answer_is_made() {
    let Some((proxy, s, (id, a), _)) = retried_behind_proxy("delivery:\n  retry-base: 1\n").await
    else {
        return;
    };
    // The claim's statement that leases what it found (a claim that
    // finds nothing due leases nothing, and is not the one).
    proxy.lose_next(Lose::CommitAfter(vec![sql(
        r#""leased_by" = $2 WHERE "delivery"."id" IN"#,
    )]));
    assert_status!(
        s.push(serde_json::json!({"addr": a, "msg": "retried"}))
            .await,
        202
    );
    poll_until(Duration::from_secs(20), async || {
        match proxy.answers_lost() {
            1 => Ok(()),
            n => Err(format!("{n} answers lost: {}", s.log_text())),
        }
    })
    .await;
    let e = s.wait_settled(id).await;
    let d = &e["deliveries"][0];
    assert_eq!(d["state"], "delivered", "{e}");
    assert_eq!(d["attempts"], 2, "{e}");
    assert_eq!(
        s.log_lines("cannot claim due deliveries").len(),
        1,
        "{}",
        s.log_text()
    );
    assert_eq!(
        s.log_lines("free to be made again").len(),
        1,
        "{}",
        s.log_text()
    );
}

/// While the network between the server and its database flaps (every
/// connection broken every 20 ms, wherever its exchange is), pushes are
/// answered 202 or 503, never 500; each push answered 202 reaches its
/// webhook, once; none answered 503 does, nor is stored once things
/// settle (some of their commits took effect, their answers lost); and
/// the log has no line per broken connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_network_loses_no_push_and_delivers_no_refused_one() {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let webhook = ServerOptions::builtin("webhook", "delivery:\n  retry-base: 1\n");
    let Some((proxy, s, url)) = behind_proxy(webhook).await else {
        return;
    };
    let sink = roboger_tests::HttpSink::start(vec![]).await;
    let (id, a) = s.new_addr().await;
    let template = r#"{"m": $msg}"#;
    s.endpoint(
        id,
        "webhook",
        serde_json::json!({"url": format!("{}/x", sink.base), "template": template}),
    )
    .await;
    let proxy = Arc::new(proxy);
    let stop = Arc::new(AtomicBool::new(false));
    let breaker = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                proxy.break_all();
            }
        })
    };
    // 400 pushes, 8 at a time.
    let s = Arc::new(s);
    let mut answers: BTreeMap<String, u16> = BTreeMap::new();
    let mut pushes = tokio::task::JoinSet::new();
    for i in 0..400 {
        let (s, a) = (s.clone(), a.clone());
        pushes.spawn(async move {
            let msg = format!("m{i:03}");
            let r = s.push(serde_json::json!({"addr": a, "msg": msg})).await;
            (msg, r.status.as_u16())
        });
        while pushes.len() >= 8
            && let Some(Ok((msg, status))) = pushes.join_next().await
        {
            answers.insert(msg, status);
        }
    }
    while let Some(Ok((msg, status))) = pushes.join_next().await {
        answers.insert(msg, status);
    }
    stop.store(true, Ordering::SeqCst);
    breaker.await.expect("the breaker");
    let answered = |code: u16| -> Vec<&String> {
        answers
            .iter()
            .filter(|(_, st)| **st == code)
            .map(|(m, _)| m)
            .collect()
    };
    let (accepted, refused) = (answered(202), answered(503));
    assert_eq!(
        accepted.len() + refused.len(),
        400,
        "answers other than 202 and 503: {answers:?}"
    );
    assert!(!refused.is_empty(), "the flapping refused no push");
    // Every accepted push is delivered, and the database keeps nothing
    // else.
    let db = DbClient::of(&url);
    poll_until(Duration::from_secs(60), async || {
        let pending = db.query("SELECT count(*) FROM delivery WHERE state <> 'delivered'");
        let stored = db.query("SELECT count(*) FROM event");
        match (pending.as_str(), stored == accepted.len().to_string()) {
            ("0", true) => Ok(()),
            _ => Err(format!("{pending} not delivered, {stored} events stored")),
        }
    })
    .await;
    let mut got: BTreeMap<String, usize> = BTreeMap::new();
    for r in sink.requests() {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.body)
            && let Some(m) = v["m"].as_str()
        {
            *got.entry(m.to_string()).or_insert(0) += 1;
        }
    }
    let missing: Vec<&&String> = accepted.iter().filter(|m| !got.contains_key(**m)).collect();
    assert!(missing.is_empty(), "accepted, never delivered: {missing:?}");
    let delivered: Vec<&&String> = refused.iter().filter(|m| got.contains_key(**m)).collect();
    assert!(delivered.is_empty(), "refused, delivered: {delivered:?}");
    // Nor is a delivery made twice: the outcomes of those made while the
    // database was out of reach wait for it, instead of being given up on.
    let twice: Vec<(&String, &usize)> = got.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "delivered more than once: {twice:?}");
    assert!(s.log_lines("sqlx_core::pool::connection").is_empty());
    assert!(s.log_lines("panicked").is_empty(), "{}", s.log_text());
}

/// A delivery made while the database is out of reach (every connection
/// broken, and each new one closed at once, as in a failover) has its
/// outcome written once the database answers again, and is not made a
/// second time. The writer used to give its outcomes up after five
/// failed commits, under a second here, and every delivery in flight
/// reached its target twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_made_while_the_database_is_out_of_reach_is_not_made_again() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (record, gate) = (dir.path().join("record"), dir.path().join("gate"));
    let Some((proxy, s, _)) = behind_proxy(ServerOptions::recording_test_plugin(&record)).await
    else {
        return;
    };
    let endpoint = calls_waiting(&s, &record, &gate, 5).await;
    proxy.go_down();
    // The target answers while the database is out of reach, for 3 s.
    std::fs::write(&gate, b"open").expect("open the gate");
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.come_up();
    made_once(&s, &record, endpoint, 5).await;
}

/// After a failover whose old primary vanished, the connections open to
/// it never answer again (no reset reaches the server, and with nothing
/// left to send TCP never gives up on a read), while new ones reach the
/// database: every part of the server leaves its silent connection behind
/// within its timeout and goes on. Before, a task whose statement was in
/// flight then waited for good: the sweeper's claim (no retry made again),
/// the heartbeat's look for dead nodes (the node's heartbeat stopped, so
/// the other nodes took its deliveries and `/ping` said 503), and the
/// routing catch-up (holding the routing index's lock, so every
/// management change answered 503, committed, and was never routed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_answer_again_are_left_behind() {
    let Some((proxy, s, (id, a), ep)) = retried_behind_proxy("").await else {
        return;
    };
    let push = async |msg: &str| pushed(&s, &a, msg).await;
    assert_eq!(push("before").await, 202);
    s.endpoint_settles(id, ep, 1, 0).await;
    // Statements of the three tasks fall silent as they are sent: the
    // claim, the look for dead nodes, the routing catch-up.
    proxy.silence_at(&[
        &sql("SKIP LOCKED"),
        &sql("\"node\".\"heartbeat\" <"),
        &sql("FROM \"routing_change\" WHERE"),
    ]);
    assert_eq!(push("claimed").await, 202);
    poll_until(Duration::from_secs(30), async || match proxy.silenced() {
        3 => Ok(()),
        n => Err(format!("{n} of the 3 statements sent")),
    })
    .await;
    // The retry is made.
    delivered(&s, (id, ep), 2).await;
    // The heartbeat goes on.
    let heartbeat = async || {
        let r = s.manage(Method::GET, "/node", None).await;
        assert_status!(r, 200);
        r.json()[0]["heartbeat"].clone()
    };
    let silenced_at = heartbeat().await;
    poll_until(Duration::from_secs(30), async || match heartbeat().await {
        h if h != silenced_at => Ok(()),
        h => Err(format!("no heartbeat since {h}")),
    })
    .await;
    // A change is answered, and routed.
    let added = s.endpoint(id, "t", serde_json::json!({})).await;
    assert_eq!(push("routed").await, 202);
    delivered(&s, (id, added), 1).await;
    // Then every connection open falls silent.
    proxy.silence_all();
    // Pushes are refused (503, stored nowhere) until the commit's
    // connection is left behind, then stored.
    let mut refused = 0;
    poll_every(
        Duration::from_millis(200),
        Duration::from_secs(30),
        async || match push("after").await {
            202 => Ok(()),
            503 => {
                refused += 1;
                Err(format!("{refused} pushes answered 503"))
            }
            other => panic!("a push answered {other}"),
        },
    )
    .await;
    delivered(&s, (id, ep), 4).await;
    assert!(s.log_lines("panicked").is_empty(), "{}", s.log_text());
}

/// The routing change listener's connection falls silent for good with
/// the rest (a NAT that dropped it while idle looks the same): it would
/// hear no change again, and leave the node to its one-second poll, which
/// each change through another node then waits for. The node's probe
/// goes unheard, and it listens anew on a new connection, which hears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routing_change_listener_fallen_silent_listens_anew() {
    if !roboger_tests::on_postgres() {
        eprintln!("nothing to do: only PostgreSQL's nodes listen for changes");
        return;
    }
    let Some((proxy, s, url)) = behind_proxy(ServerOptions::test_plugin("timeout: 1\n")).await
    else {
        return;
    };
    // Once it listens (a listener it could not start yet is tried again
    // later, on a connection not silenced).
    let db = DbClient::of(&url);
    poll_until(Duration::from_secs(30), async || {
        match db
            .query(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND query LIKE 'LISTEN%'",
            )
            .trim()
        {
            "1" => Ok(()),
            n => Err(format!("{n} sessions listening")),
        }
    })
    .await;
    proxy.silence_all();
    s.wait_log(
        "the routing change listener did not hear this node's probe; listening on a new \
         connection",
        Duration::from_secs(60),
    )
    .await;
    s.wait_log(
        "the routing change listener hears again",
        Duration::from_secs(30),
    )
    .await;
    assert!(s.log_lines("panicked").is_empty(), "{}", s.log_text());
}

/// What goes on past its caller (a cleanup, a walk a change starts) and
/// what a request reads before it answers (a push counted against its
/// address's limits) waits for each of its statements `timeout` at most:
/// one that falls silent fails it, and the next works. Before, the push
/// was never answered, and the cleanup never ended: each later cleanup
/// (the command's, the periodic one) waited for it. (A chunk of a walk,
/// as the cleanup's of old events, is tried again instead:
/// [`a_walk_goes_on_past_a_statement_left_unanswered`].)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_fails_a_cleanup_or_a_push_and_the_next_works() {
    let opts = ServerOptions::test_plugin("limits:\n  period: day\n");
    let Some((proxy, s, _)) = behind_proxy(opts).await else {
        return;
    };
    let (id, a) = s.new_addr().await;
    let ep = s.endpoint(id, "t", serde_json::json!({})).await;
    proxy.silence_at(&[
        // A push's count against its address's limits.
        &sql("UPDATE \"addr_limit\""),
        // The cleanup's deletion of expired bucket objects.
        &sql("DELETE FROM \"bucket\" WHERE"),
    ]);
    let push = async |msg: &str| pushed(&s, &a, msg).await;
    assert_eq!(push("silenced").await, 503);
    assert_eq!(push("counted").await, 202);
    let cleanup = async || {
        s.manage(
            Method::POST,
            "/core",
            Some(serde_json::json!({"cmd": "cleanup"})),
        )
        .await
        .status
        .as_u16()
    };
    let first = cleanup().await;
    assert!([202, 503].contains(&first), "{first}");
    s.wait_log("cleanup failed", Duration::from_secs(10)).await;
    assert_eq!(cleanup().await, 204);
    assert_eq!(proxy.silenced(), 2);
    s.endpoint_settles(id, ep, 1, 0).await;
}

/// The deletion of an address's history, answered 202, goes on past a
/// database that restarts under it (down for 3 s here): a walk waits for
/// the database to come back, for 30 s or three `timeout`s, whichever is
/// longer, as the server's start does. Before, its chunk was tried three
/// times within 300 ms, and the deletion failed after its 202 (`a
/// deletion answered 202 failed`): the address and its history stayed,
/// though the deletion had been accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_goes_on_past_a_database_restart() {
    let Some((proxy, s, url)) = behind_proxy(ServerOptions::test_plugin("")).await else {
        return;
    };
    let db = DbClient::of(&url);
    // Three chunks of 500 events.
    let (id, _, _) = s.addr_with_history(&db, 1200).await;
    // The first chunk's deletion is held (twice: its first try and the
    // next), so the deletion is answered 202 while its walk is under way;
    // then the database goes down.
    let first_chunk = sql("DELETE FROM \"delivery\" WHERE \"delivery\".\"event_id\" IN");
    proxy.silence_at(&[&first_chunk, &first_chunk]);
    let path = format!("/addr/{id}");
    let r = s.manage(Method::DELETE, &path, None).await;
    assert_status!(r, 202);
    proxy.go_down();
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.come_up();
    s.wait_log("a deletion answered 202 ", Duration::from_secs(60))
        .await;
    let ended = s.log_lines("a deletion answered 202 ");
    assert!(ended[0].contains("has ended"), "{ended:?}");
    assert_status!(s.manage(Method::GET, &path, None).await, 404);
    assert_eq!(db.query("SELECT count(*) FROM event"), "0");
}

/// A server behind the proxy ([`behind_proxy`]), with `yaml` for the
/// rest of its config, an address (id, address) and an endpoint of the
/// test plugin whose every event's first try fails: its retry needs a
/// claim.
async fn retried_behind_proxy(yaml: &str) -> Option<(DbProxy, Server, (i64, String), i64)> {
    let (proxy, s, _) = behind_proxy(ServerOptions::test_plugin(yaml)).await?;
    let (id, a) = s.new_addr().await;
    let ep = s
        .endpoint(id, "t", serde_json::json!({"fail_times": 1}))
        .await;
    Some((proxy, s, (id, a), ep))
}

/// A statement's text as the server sends it to the database under
/// test, from its PostgreSQL form: on MySQL names are quoted with
/// backticks and parameters are `?`.
fn sql(postgres: &str) -> String {
    if roboger_tests::on_postgres() {
        return postgres.to_string();
    }
    let mut out = String::with_capacity(postgres.len());
    let mut chars = postgres.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => out.push('`'),
            '$' => {
                out.push('?');
                while chars.next_if(char::is_ascii_digit).is_some() {}
            }
            c => out.push(c),
        }
    }
    out
}

/// The status of a push of `msg` to address `a`.
async fn pushed(s: &Server, a: &str, msg: &str) -> u16 {
    s.push(serde_json::json!({"addr": a, "msg": msg}))
        .await
        .status
        .as_u16()
}

/// Waits up to 30 s until endpoint `ep` of address `id` has `n`
/// deliveries delivered and none pending, the API answering 503 meanwhile
/// or not.
async fn delivered(s: &Server, (id, ep): (i64, i64), n: u64) {
    poll_every(
        Duration::from_millis(200),
        Duration::from_secs(30),
        async || {
            let r = s
                .manage(Method::GET, &format!("/addr/{id}/endpoint/{ep}"), None)
                .await;
            if r.status.as_u16() != 200 {
                return Err(format!("the endpoint: {} {}", r.status, r.text));
            }
            let v = r.json();
            match (v["delivered"].as_u64(), v["pending"].as_u64()) {
                (Some(d), Some(0)) if d == n => Ok(()),
                _ => Err(format!("not {n} delivered: {v}")),
            }
        },
    )
    .await;
}

/// Outcomes the database itself refuses (here a trigger refuses every
/// delivery marked delivered) are given up on after five writes, so that
/// the pushes that wait for the same commit are stored; their deliveries
/// are made again once the database takes them (at least once).
#[tokio::test]
async fn outcomes_the_database_refuses_are_given_up_and_made_again() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let record = dir.path().join("record");
    let s = Server::start_with(ServerOptions::recording_test_plugin(&record)).await;
    let (id, a) = s.new_addr().await;
    let ep = s.endpoint(id, "t", serde_json::json!({"slow": 1})).await;
    let db = s.db_client();
    db.refuse_updates("delivery", "NEW.state = 'delivered'");
    assert_status!(
        s.push(serde_json::json!({"addr": a, "msg": "refused"}))
            .await,
        202
    );
    s.wait_log("delivery outcomes dropped", Duration::from_secs(20))
        .await;
    // Pushes are stored meanwhile.
    assert_status!(
        s.push(serde_json::json!({"addr": a, "msg": "after"})).await,
        202
    );
    db.allow_writes("delivery");
    s.endpoint_settles(id, ep, 2, 0).await;
    let sends = sends_started(&record);
    assert_eq!(sends.len(), 2, "{sends:?}");
    assert!(sends.values().any(|n| *n >= 2), "not made again: {sends:?}");
    s.wait_log("free to be made again", Duration::from_secs(10))
        .await;
}

/// A claim cut off after it locked its deliveries' rows (its connection
/// silent, the database alive: a network path, a NAT or a load balancer
/// dropped it with no reset reaching either side) does not keep them
/// locked: the database ends the session, idle in its transaction, after
/// three `timeout`s, and the retry is made. Before, the database kept the
/// session until its own TCP keepalive gave up on it (two hours by
/// default), and every other claim skipped the locked rows meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_a_claim_locked_before_it_was_cut_off_are_freed() {
    let Some((proxy, s, (id, a), ep)) = retried_behind_proxy("").await else {
        return;
    };
    // The claim's lease, after its SELECT … FOR UPDATE locked the rows.
    let lease = "SET \"lease_until\" = $1, \"leased_by\" = $2 WHERE \"delivery\".\"id\" IN";
    proxy.silence_at(&[&sql(lease)]);
    assert_status!(
        s.push(serde_json::json!({"addr": a, "msg": "locked"}))
            .await,
        202
    );
    poll_until(Duration::from_secs(30), async || match proxy.silenced() {
        1 => Ok(()),
        _ => Err("no claim yet".to_string()),
    })
    .await;
    delivered(&s, (id, ep), 1).await;
}

/// A connection that falls silent under a statement is left behind, and
/// its place in the pool is freed: as many as the pool holds, cut off at
/// once, leave it whole. Before, sqlx's ping of each connection given
/// back waited on it for good: the pool ran out, and every request
/// answered 503 until the server was restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_whose_every_connection_fell_silent_is_whole_again() {
    let opts = ServerOptions::test_plugin("db-pool-size: 4\n");
    let Some((proxy, s, _)) = behind_proxy(opts).await else {
        return;
    };
    let (id, _) = s.new_addr().await;
    let read = sql("FROM \"addr\" WHERE \"addr\".\"id\" =");
    proxy.silence_at(&[read.as_str(); 4]);
    let path = format!("/addr/{id}");
    let reads = (0..4).map(|_| s.manage(Method::GET, &path, None));
    for r in futures_util::future::join_all(reads).await {
        assert_status!(r, 503);
    }
    assert!(proxy.silenced() >= 3, "{} silenced", proxy.silenced());
    poll_every(
        Duration::from_millis(200),
        Duration::from_secs(20),
        async || match s.manage(Method::GET, &path, None).await.status.as_u16() {
            200 => Ok(()),
            other => Err(format!("the address: {other}")),
        },
    )
    .await;
}

/// A walk over an endpoint's backlog (here its waiting deliveries made
/// due once its settings changed) goes on past a statement the database
/// leaves unanswered: the statement is tried again. Before, one chunk's
/// statement unanswered within `timeout` ended the walk, and the rest of
/// the backlog waited for its own next try, hours later with backoff,
/// though what it waited for had changed. (The cleanup and an endpoint's
/// retry walk the same way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_goes_on_past_a_statement_left_unanswered() {
    const N: u64 = 1200;
    let opts = ServerOptions::test_plugin("delivery:\n  max-attempts: 100\n");
    let Some((proxy, s, url)) = behind_proxy(opts).await else {
        return;
    };
    let db = DbClient::of(&url);
    let count = |sql: &str| -> u64 { db.query(sql).parse().expect("a count") };
    // Three chunks of 500.
    let (id, _, ep) = s.endpoint_with_waiting_backlog(&db, N).await;
    let waiting = format!("SELECT count(*) FROM delivery WHERE {}", waiting_years(ep));
    assert_eq!(count(&waiting), N);
    // The first chunk's update falls silent.
    proxy.silence_at(&[&sql(
        "UPDATE \"delivery\" SET \"next_at\" = $1, \"updated\" = $2 WHERE",
    )]);
    let r = s
        .manage(
            Method::PATCH,
            &format!("/addr/{id}/endpoint/{ep}"),
            Some(serde_json::json!({"config": {"hang": true}})),
        )
        .await;
    assert_status!(r, 200);
    // Its end, either way: "… are due now" or "… could not be made due
    // now".
    s.wait_log("due now", Duration::from_secs(60)).await;
    let ended = s.log_lines("due now");
    assert!(
        ended[0].contains("its waiting deliveries are due now"),
        "{ended:?}"
    );
    assert_eq!(proxy.silenced(), 1);
    assert_eq!(count(&waiting), 0);
}

/// The deletion of an address's history goes on past a statement the
/// database leaves unanswered, as the walks above do. Before, one chunk
/// unanswered within `timeout` ended it: the deletion failed (503, or a
/// `failed` line after its 202), and the history and address stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_goes_on_past_a_statement_left_unanswered() {
    let Some((proxy, s, url)) = behind_proxy(ServerOptions::test_plugin("")).await else {
        return;
    };
    let db = DbClient::of(&url);
    // Three chunks of 500 events.
    let (id, _, _) = s.addr_with_history(&db, 1200).await;
    // The first chunk's deletion falls silent.
    proxy.silence_at(&[&sql(
        "DELETE FROM \"delivery\" WHERE \"delivery\".\"event_id\" IN",
    )]);
    let r = s.manage(Method::DELETE, &format!("/addr/{id}"), None).await;
    match r.status.as_u16() {
        204 => {}
        202 => {
            s.wait_log("a deletion answered 202 ", Duration::from_secs(60))
                .await;
            let ended = s.log_lines("a deletion answered 202 ");
            assert!(ended[0].contains("has ended"), "{ended:?}");
        }
        other => panic!("the deletion: {other} {}", r.text),
    }
    assert_eq!(proxy.silenced(), 1);
    assert_status!(
        s.manage(Method::GET, &format!("/addr/{id}"), None).await,
        404
    );
    assert_eq!(db.query("SELECT count(*) FROM event"), "0");
}

/// A deletion whose record is written but whose commit's answer is lost
/// is answered 503 saying that it may have been recorded and is then
/// made, and it is: taken up by the node's next look. Before, the 503
/// said only "database error", and the address vanished a little later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_whose_begin_lost_its_answer_says_it_may_be_made() {
    let Some((proxy, s, _)) = behind_proxy(ServerOptions::test_plugin("")).await else {
        return;
    };
    let (id, _) = s.new_addr().await;
    proxy.lose_next(Lose::CommitAfter(vec![sql("INSERT INTO \"deletion\"")]));
    let path = format!("/addr/{id}");
    let r = s.manage(Method::DELETE, &path, None).await;
    assert_status!(r, 503);
    assert!(r.text.contains("may have been recorded"), "{}", r.text);
    assert_eq!(proxy.answers_lost(), 1);
    s.until_gone(&path).await;
    s.wait_log("a deletion left unmade has ended", Duration::from_secs(5))
        .await;
}

/// A change whose commit took effect though its answer was lost is
/// answered 503 saying that it may have been made, and to look before
/// asking again: it was (an address created). Before, the 503 said only
/// "database error; see the server log", and a client that asked again
/// made a second address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_answer_was_lost_says_it_may_be_made() {
    let Some((proxy, s, _)) = behind_proxy(ServerOptions::test_plugin("")).await else {
        return;
    };
    proxy.lose_next(Lose::CommitAfter(vec![sql("INSERT INTO \"addr\"")]));
    let r = s.manage(Method::POST, "/addr", None).await;
    assert_status!(r, 503);
    assert!(
        r.text
            .contains("The change may have been made all the same"),
        "{}",
        r.text
    );
    assert_eq!(proxy.answers_lost(), 1);
    let made = s.manage(Method::GET, "/addr", None).await.json();
    assert_eq!(made.as_array().map(Vec::len), Some(1), "{made}");
}

/// Two asks for one deletion at once record it once: the second, which
/// comes while the first's record is written but not yet committed,
/// waits for it and is answered as covered (202, "a deletion asked for
/// before"). Before, each looked for a covering deletion before writing
/// its own, found none, and both were made, each with a walk of its own.
/// The proxy holds back the answers to the first's record and to its
/// deletion at the end, so that it is neither committed when the second
/// comes nor ended when the second looks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_asks_for_one_deletion_at_once_record_it_once() {
    // Room in `timeout` for the answers held back.
    let opts = ServerOptions::test_plugin("timeout: 8\n");
    let Some((proxy, s, _)) = behind_proxy(opts).await else {
        return;
    };
    let (id, _) = s.new_addr().await;
    let hold = Duration::from_secs(2);
    proxy.delay_at(&[&sql("INSERT INTO \"deletion\"")], hold);
    proxy.delay_at(&[&sql("DELETE FROM \"deletion\"")], hold);
    let path = format!("/addr/{id}");
    let second = async {
        // The first's record is written, its answer held.
        poll_until(Duration::from_secs(10), async || {
            match proxy.delays_left() {
                1 => Ok(()),
                n => Err(format!("{n} marks left")),
            }
        })
        .await;
        s.manage(Method::DELETE, &path, None).await
    };
    let (first, second) = tokio::join!(s.manage(Method::DELETE, &path, None), second);
    assert_status!(first, 204);
    assert_status!(second, 202);
    assert!(
        second.text.contains("a deletion asked for before"),
        "{}",
        second.text
    );
    assert_status!(s.manage(Method::GET, &path, None).await, 404);
    let again = s.log_lines("a deletion asked for again is under way already");
    assert_eq!(again.len(), 1, "{}", s.log_text());
}

/// A change under an address, or an endpoint, whose deletion is begun
/// while the change's transaction is open is refused (409, "is being
/// deleted"), not made and then deleted with it. The proxy holds back
/// the answer to the change's write, so that the deletion's record is
/// written and committed meanwhile; the deletion's end then waits for
/// the change's transaction. Before, the change had looked for a
/// deletion before its transaction, found none, and was answered 200;
/// the deletion then deleted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_racing_the_begin_of_its_deletion_is_refused() {
    // Room in `timeout` for the answer held back.
    let opts = ServerOptions::test_plugin("timeout: 8\n");
    let Some((proxy, s, _)) = behind_proxy(opts).await else {
        return;
    };
    for what in ["addr", "endpoint"] {
        let (id, _) = s.new_addr().await;
        let ep = s.endpoint(id, "t", serde_json::json!({})).await;
        let (path, write, taken) = match what {
            "addr" => (format!("/addr/{id}"), "UPDATE \"addr\"", id),
            _ => (
                format!("/addr/{id}/endpoint/{ep}"),
                "UPDATE \"endpoint\"",
                ep,
            ),
        };
        proxy.delay_at(&[&sql(write)], Duration::from_secs(2));
        let off = serde_json::json!({"active": 0});
        let deletion = async {
            // The change's write is made, its answer held.
            poll_until(Duration::from_secs(10), async || {
                match proxy.delays_left() {
                    0 => Ok(()),
                    n => Err(format!("{n} marks left")),
                }
            })
            .await;
            s.manage(Method::DELETE, &path, None).await
        };
        let (change, deletion) = tokio::join!(s.manage(Method::PATCH, &path, Some(off)), deletion);
        let said = format!("{what}: {} {}", change.status, change.text);
        assert_eq!(change.status.as_u16(), 409, "{said}");
        let whose = format!("{what} {taken} is being deleted");
        assert!(change.text.contains(&whose), "{said}");
        assert_status!(deletion, 204);
        assert_status!(s.manage(Method::GET, &path, None).await, 404);
    }
}

/// A look for deletions left unmade (each node looks every
/// `node-timeout`) that comes while this node begins a deletion (its
/// record written and committed, the database's answer to the commit not
/// yet back) does not take it for one left unmade and make it a second
/// time. The answer is held back by the proxy for longer than
/// `node-timeout`, so a look comes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_being_begun_is_not_taken_up_as_left_unmade() {
    // Room in `timeout` for the answer held back.
    let opts = ServerOptions::test_plugin("timeout: 8\n");
    let Some((proxy, s, _)) = behind_proxy(opts).await else {
        return;
    };
    let (id, _) = s.new_addr().await;
    proxy.delay_commit_after(&[&sql("INSERT INTO \"deletion\"")], Duration::from_secs(4));
    let path = format!("/addr/{id}");
    assert_status!(s.manage(Method::DELETE, &path, None).await, 204);
    assert_status!(s.manage(Method::GET, &path, None).await, 404);
    let taken = s.log_lines("taking up a deletion left unmade");
    assert!(taken.is_empty(), "{}", s.log_text());
}

/// A change cut short by the request's own timeout (twice `timeout`):
/// each of its statements slow but within `timeout`, and its `COMMIT`
/// made by the database while the server waits for the answer. It is
/// answered 503 saying it may have been made, which it was: a client
/// that asked again unlooked would make a second address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_cut_short_by_the_request_timeout_says_it_may_be_made() {
    // The harness's `timeout: 2`: the request is cut short at 4 s.
    let Some((proxy, s, _)) = behind_proxy(ServerOptions::test_plugin("")).await else {
        return;
    };
    let slow = Duration::from_millis(1500);
    proxy.delay_at(
        &[
            &sql("INSERT INTO \"addr\""),
            &sql("UPDATE \"routing_version\""),
        ],
        slow,
    );
    proxy.delay_commit_after(&[&sql("INSERT INTO \"addr\"")], Duration::from_millis(1800));
    let r = s.manage(Method::POST, "/addr", None).await;
    assert_status!(r, 503);
    assert_eq!(
        r.text,
        "timed out; the database or a plugin did not answer. The change may have been made \
         all the same: look before asking again"
    );
    assert_eq!(proxy.delays_left(), 0);
    poll_until(Duration::from_secs(10), async || {
        let made = s.manage(Method::GET, "/addr", None).await.json();
        match made.as_array().map(Vec::len) {
            Some(1) => Ok(()),
            _ => Err(format!("not made: {made}")),
        }
    })
    .await;
}
