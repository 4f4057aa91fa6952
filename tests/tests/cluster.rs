//! Several real `roboger-server` processes on one database, acting as one
//! service: start-up together, routing changes obeyed by every node once
//! answered (a frozen node holding up the answer only so long), a
//! killed node's deliveries made by the survivors, a paused node's late
//! outcomes fenced off, node names shared by live instances, a node that
//! stops when a newer build migrates the database, a node whose clock is
//! off, exact limits across nodes, and wrong master keys counted across
//! nodes. Runs on SQLite (one file shared by the processes) and, with
//! `ROBOGER_TEST_PG` or `ROBOGER_TEST_MYSQL`, on PostgreSQL or MariaDB.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use roboger_tests::robogerctl::{Ctl, robogerctl_path};
use roboger_tests::{
    Method, Server, ServerOptions, Value, assert_status, clock_set, database_with_connection_limit,
    json, on_mysql, on_postgres, plugin_calls, poll_every, run_server_cmd, shared_database,
    test_plugin_bin,
};

/// A node of the test cluster on database `db`, with the test plugin
/// configured as `test` and recording its calls to `record`.
fn node(db: &str, record: &Path) -> ServerOptions {
    ServerOptions {
        db: Some(db.to_string()),
        plugins: vec!["test".into()],
        env: vec![("TEST_PLUGIN_RECORD".into(), record.display().to_string())],
        ..Default::default()
    }
}

/// Polls `check` every few milliseconds until it holds; returns how long
/// that took, or panics after `limit`.
async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The status of a push to `addr` through `node`.
async fn push_status(node: &Server, addr: &str, msg: &str) -> u16 {
    node.push(json!({"addr": addr, "msg": msg}))
        .await
        .status
        .as_u16()
}

/// How many deliveries a push through `node` gets (the event is found by
/// its unique message through the management API).
async fn deliveries_of_a_push(node: &Server, id: i64, addr: &str, msg: &str) -> usize {
    assert_status!(node.push(json!({"addr": addr, "msg": msg})).await, 202);
    let e = node.event_by_msg(id, msg, 20).await;
    e["deliveries"].as_array().map_or(0, Vec::len)
}

/// This node's instance id, as the node list says.
async fn instance_of(node: &Server) -> String {
    let list = node.manage(Method::GET, "/node", None).await.json();
    list.as_array()
        .and_then(|l| l.iter().find(|n| n["self"] == true))
        .and_then(|n| n["instance"].as_str())
        .unwrap_or_else(|| panic!("no node is self: {list}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_started_at_once_on_an_empty_database_all_come_up() {
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let nodes = Server::start_many(vec![node(&db, &record); 3]);
    let mut instances = std::collections::BTreeSet::new();
    for n in &nodes {
        let r = n.manage(Method::GET, "/node", None).await;
        assert_status!(r, 200);
        let list = r.json();
        let list = list.as_array().expect("a list of nodes");
        assert_eq!(list.len(), 3, "three nodes listed: {list:?}");
        assert!(list.iter().all(|n| n["alive"] == true), "{list:?}");
        assert_eq!(
            list.iter().filter(|n| n["self"] == true).count(),
            1,
            "{list:?}"
        );
        for n in list {
            instances.insert(n["instance"].as_str().unwrap_or_default().to_string());
            assert_eq!(n["version"], env!("CARGO_PKG_VERSION"));
        }
    }
    assert_eq!(instances.len(), 3, "each start is its own instance");
    // Each node's start stays when its heartbeats move on (on MySQL, a
    // table's first time column was made to follow every update where
    // the server's `explicit_defaults_for_timestamp` was off).
    // Each instance's start and heartbeat.
    type Times = std::collections::BTreeMap<String, (Value, Value)>;
    let times = async |n: &Server| -> Times {
        let list = n.manage(Method::GET, "/node", None).await.json();
        let list = list.as_array().cloned().unwrap_or_default();
        list.iter()
            .map(|n| {
                let instance = n["instance"].as_str().unwrap_or_default().to_string();
                (instance, (n["started"].clone(), n["heartbeat"].clone()))
            })
            .collect()
    };
    let before = times(&nodes[0]).await;
    let after = poll_every(
        Duration::from_millis(100),
        Duration::from_secs(10),
        async || {
            let now = times(&nodes[0]).await;
            match before
                .iter()
                .all(|(i, b)| now.get(i).is_some_and(|n| n.1 != b.1))
            {
                true => Ok(now),
                false => Err(format!("not every heartbeat moved on: {now:?}")),
            }
        },
    )
    .await;
    for (i, (started, _)) in &before {
        assert_eq!(
            &after[i].0, started,
            "{i} started once: {before:?} then {after:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_through_one_node_are_obeyed_by_the_others_once_answered() {
    // A client that makes a change through one node and then pushes
    // through another (a load balancer's next pick) finds the change
    // obeyed: the change is answered once every live node has applied it.
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let nodes = Server::start_many(vec![node(&db, &record); 3]);
    let (a, others) = (&nodes[0], &nodes[1..]);
    let mut probe = 0;

    let (id, addr) = a.new_addr().await;
    for n in others {
        assert_eq!(push_status(n, &addr, "probe").await, 202, "create addr");
    }
    for (step, active, status) in [("disable addr", 0, 406), ("enable addr", 1, 202)] {
        let r = a
            .manage(
                Method::PATCH,
                &format!("/addr/{id}"),
                Some(json!({"active": active})),
            )
            .await;
        assert_status!(r, 200);
        for n in others {
            assert_eq!(push_status(n, &addr, "probe").await, status, "{step}");
        }
    }

    // Endpoint and subscription changes: a push through another node gets
    // the delivery, or not.
    let ep = a.endpoint(id, "test", json!({})).await;
    let sub_list = a.subscriptions(id, ep).await;
    let sub = sub_list[0]["id"].as_i64().expect("a subscription");
    let steps: Vec<(&str, Method, String, Option<Value>, usize)> = vec![
        (
            "create endpoint and subscription",
            Method::GET,
            String::new(),
            None,
            1,
        ),
        (
            "disable subscription",
            Method::PATCH,
            format!("/addr/{id}/endpoint/{ep}/subscription/{sub}"),
            Some(json!({"active": 0})),
            0,
        ),
        (
            "enable subscription",
            Method::PATCH,
            format!("/addr/{id}/endpoint/{ep}/subscription/{sub}"),
            Some(json!({"active": 1})),
            1,
        ),
        (
            "disable endpoint",
            Method::PATCH,
            format!("/addr/{id}/endpoint/{ep}"),
            Some(json!({"active": 0})),
            0,
        ),
        (
            "enable endpoint",
            Method::PATCH,
            format!("/addr/{id}/endpoint/{ep}"),
            Some(json!({"active": 1})),
            1,
        ),
        (
            "delete subscription",
            Method::DELETE,
            format!("/addr/{id}/endpoint/{ep}/subscription/{sub}"),
            None,
            0,
        ),
        (
            "create subscription",
            Method::POST,
            format!("/addr/{id}/endpoint/{ep}/subscription"),
            Some(json!({"level": 10})),
            1,
        ),
        (
            "delete endpoint",
            Method::DELETE,
            format!("/addr/{id}/endpoint/{ep}"),
            None,
            0,
        ),
    ];
    for (step, method, path, body, want) in steps {
        if method != Method::GET {
            let r = a.manage(method, &path, body).await;
            assert!(r.status.is_success(), "{step}: {} {}", r.status, r.text);
        }
        for n in others {
            probe += 1;
            let msg = format!("probe {probe}");
            assert_eq!(
                deliveries_of_a_push(n, id, &addr, &msg).await,
                want,
                "{step}: deliveries of a push through another node"
            );
        }
    }

    let r = a.manage(Method::DELETE, &format!("/addr/{id}"), None).await;
    assert_status!(r, 204);
    for n in others {
        assert_eq!(push_status(n, &addr, "probe").await, 404, "delete addr");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_change_waits_for_a_frozen_node_only_so_long() {
    // Node a's `timeout` (1 s) bounds the wait, well below `node-timeout`
    // (10 s), after which the frozen node would no longer count as alive.
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let patient = ServerOptions {
        yaml: "node-timeout: 10\n".into(),
        ..node(&db, &record)
    };
    let hasty = ServerOptions {
        yaml: "timeout: 1\nnode-timeout: 10\n".into(),
        ..patient.clone()
    };
    let nodes = Server::start_many(vec![hasty, patient]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let (id, addr) = a.new_addr().await;
    assert_eq!(push_status(b, &addr, "probe").await, 202);
    let frozen = instance_of(b).await;

    b.signal("STOP");
    let r = a
        .manage(
            Method::PATCH,
            &format!("/addr/{id}"),
            Some(json!({"active": 0})),
        )
        .await;
    assert_status!(r, 200);
    let warned = a.log_lines("not every node obeys it");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert!(warned[0].contains(&frozen), "{warned:?}");
    let unobeyed = "roboger_routing_changes_unobeyed_total";
    assert_eq!(a.metrics().await.get(unobeyed), Some(&1.0));
    // The node list says which node is behind.
    let list = a.manage(Method::GET, "/node", None).await.json();
    let version_of = |n: &str| {
        list.as_array()
            .and_then(|l| l.iter().find(|x| x["instance"] == n))
            .and_then(|x| x["routing_version"].as_i64())
            .unwrap_or_else(|| panic!("no routing_version of {n}: {list}"))
    };
    assert!(
        version_of(&frozen) < version_of(&instance_of(a).await),
        "{list}"
    );
    // So does the console's.
    let page = a.console_page("/ui/plugins").await;
    let row = page
        .lines()
        .find(|l| l.contains(&frozen))
        .unwrap_or_else(|| panic!("no row of {frozen}:\n{page}"));
    assert!(
        row.contains(&format!(
            "<td class=\"routing\">{}, behind</td>",
            version_of(&frozen)
        )),
        "{row}"
    );
    let own = page
        .lines()
        .find(|l| l.contains("(this node)"))
        .unwrap_or_else(|| panic!("no row of this node:\n{page}"));
    assert!(!own.contains("behind"), "{own}");
    // A command that changes no route does not wait for it.
    let r = a
        .manage(Method::POST, "/core", Some(json!({"cmd": "cleanup"})))
        .await;
    assert_status!(r, 204);
    let warned = a.log_lines("not every node obeys it");
    assert_eq!(warned.len(), 1, "{warned:?}");
    assert_eq!(a.metrics().await.get(unobeyed), Some(&1.0));

    // Thawed, it catches up.
    b.signal("CONT");
    until("the thawed node obeys", Duration::from_secs(5), || async {
        push_status(b, &addr, "probe").await == 406
    })
    .await;
}

/// robogerctl 2.0.14 (unmodified, waiting its default 5 s for each
/// answer) creates and disables an address while another node is frozen
/// (alive, not obeying), on nodes with the default `timeout` (5 s) and a
/// longer `node-timeout` (10 s): each change is answered in time, the
/// node that does not obey it named in a warning. Before, each waited
/// all of `timeout` for the frozen node before its answer, robogerctl
/// gave up on it ("Read timed out") though it was made, and a create
/// asked again made a second address.
#[tokio::test(flavor = "multi_thread")]
async fn robogerctl_is_answered_in_time_while_a_node_is_frozen() {
    let Some(bin) = robogerctl_path() else {
        return;
    };
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let opts = ServerOptions {
        yaml: "timeout: 5\nnode-timeout: 10\n".into(),
        ..node(&db, &record)
    };
    let nodes = Server::start_many(vec![opts; 2]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let (_, addr) = a.new_addr().await;
    assert_eq!(push_status(b, &addr, "probe").await, 202);
    let frozen = instance_of(b).await;

    b.signal("STOP");
    let ctl = Ctl::new(bin, a, dir.path());
    let made = ctl.json(&["addr", "create"]);
    let id = made["res"].as_i64().expect("the address made").to_string();
    ctl.ok(&["addr", "disable", &id]);
    let warned = a.log_lines("not every node obeys it");
    assert_eq!(warned.len(), 2, "{warned:?}");
    assert!(warned.iter().all(|w| w.contains(&frozen)), "{warned:?}");
    let list = a.manage(Method::GET, "/addr", None).await.json();
    assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
    b.signal("CONT");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_node_s_deliveries_are_made_by_the_survivors() {
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let gate = dir.path().join("target-is-up");
    let mut nodes = Server::start_many(vec![node(&db, &record); 2]);
    let (id, addr) = nodes[0].new_addr().await;
    nodes[0]
        .endpoint(id, "test", json!({"gate": gate.display().to_string()}))
        .await;
    let events = 20;
    for i in 0..events {
        assert_status!(
            nodes[0]
                .push(json!({"addr": addr, "msg": format!("event {i}")}))
                .await,
            202
        );
    }
    // Every call of the first node hangs on the target.
    roboger_tests::sends_begun(&record, events).await;
    let a = instance_of(&nodes[0]).await;
    let leased = nodes[1].manage(Method::GET, "/node", None).await.json();
    let held = leased
        .as_array()
        .and_then(|l| l.iter().find(|n| n["instance"] == a.as_str()))
        .map(|n| n["leased"].clone());
    assert_eq!(held, Some(json!(events)), "{leased}");

    nodes[0].kill();
    let killed = Instant::now();
    std::fs::write(&gate, "up").expect("bring the target up");
    let survivor = &nodes[1];
    let took = until(
        "every event delivered by the survivor",
        Duration::from_secs(10),
        || async {
            let delivered: std::collections::BTreeSet<String> = plugin_calls(&record, "send")
                .iter()
                .filter_map(|s| s["event_id"].as_str().map(str::to_string))
                .collect();
            delivered.len() >= events
        },
    )
    .await;
    println!(
        "SIGKILL to every event delivered by the survivor: {:?}",
        killed.elapsed()
    );
    assert!(took < Duration::from_secs(10));
    let list = survivor
        .manage(Method::GET, &format!("/addr/{id}/event"), None)
        .await
        .json();
    let list = list.as_array().expect("events");
    assert_eq!(list.len(), events);
    for e in list {
        let ev = e["id"].as_str().unwrap_or_default();
        // The last outcomes may still be in the survivor's group commit.
        until(
            "the delivery is recorded",
            Duration::from_secs(5),
            || async {
                let e = survivor
                    .manage(Method::GET, &format!("/addr/{id}/event/{ev}"), None)
                    .await
                    .json();
                e["deliveries"][0]["state"] == "delivered"
            },
        )
        .await;
    }
    let nodes_now = survivor.manage(Method::GET, "/node", None).await.json();
    let dead = nodes_now
        .as_array()
        .and_then(|l| l.iter().find(|n| n["instance"] == a.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(dead["alive"], false, "{nodes_now}");
    assert!(dead["rescued"].is_string(), "{nodes_now}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_node_s_late_outcomes_are_dropped() {
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    // The paused node's plugin fails every send: if its outcome were
    // written after the other node delivered, the delivery would go back
    // to pending with this error.
    let mut paused = node(&db, &record);
    paused.plugins.clear();
    paused.plugins_yaml = format!(
        "- name: test\n  command: {}\n  env: {{TEST_PLUGIN_SEND_FAIL: late failure from the paused node}}\n",
        test_plugin_bin().display()
    );
    let nodes = Server::start_many(vec![paused, node(&db, &record)]);
    let (a, b) = (&nodes[0], &nodes[1]);
    let (id, addr) = a.new_addr().await;
    a.endpoint(id, "test", json!({"slow": 1000})).await;
    assert_status!(a.push(json!({"addr": addr, "msg": "once"})).await, 202);
    roboger_tests::sends_begun(&record, 1).await;
    a.signal("STOP");
    let ev = b
        .manage(Method::GET, &format!("/addr/{id}/event"), None)
        .await
        .json()[0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let delivery = || async {
        b.manage(Method::GET, &format!("/addr/{id}/event/{ev}"), None)
            .await
            .json()["deliveries"][0]
            .clone()
    };
    let took = until(
        "the other node takes over",
        Duration::from_secs(15),
        || async { delivery().await["state"] == "delivered" },
    )
    .await;
    println!("SIGSTOP to delivered by the other node: {took:?}");
    a.signal("CONT");
    a.wait_log("late outcomes dropped", Duration::from_secs(15))
        .await;
    a.wait_log(
        "missed its heartbeats for longer than node-timeout",
        Duration::from_secs(10),
    )
    .await;
    let d = delivery().await;
    assert_eq!(d["state"], "delivered", "{d}");
    assert_eq!(d["attempts"], 1, "{d}");
    assert!(d["last_error"].is_null(), "{d}");
    assert!(d["leased_by"].is_null(), "{d}");
    // The paused node is alive again and listed so.
    until(
        "the paused node is alive again",
        Duration::from_secs(5),
        || async {
            let list = b.manage(Method::GET, "/node", None).await.json();
            list.as_array()
                .is_some_and(|l| l.len() == 2 && l.iter().all(|n| n["alive"] == true))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_restarted_under_a_live_node_s_name_leaves_its_leases_alone() {
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let gate = dir.path().join("target-is-up");
    let mut twin = node(&db, &record);
    // Not a failover test: a heartbeat delayed on a loaded machine must
    // not make the other node take over (and deliver twice).
    twin.yaml = "node: twin\nnode-timeout: 30\n".into();
    let mut nodes = Server::start_many(vec![twin.clone(), twin]);
    let (id, addr) = nodes[0].new_addr().await;
    nodes[0]
        .endpoint(id, "test", json!({"gate": gate.display().to_string()}))
        .await;
    assert_status!(
        nodes[0].push(json!({"addr": addr, "msg": "once"})).await,
        202
    );
    roboger_tests::sends_begun(&record, 1).await;
    let a = instance_of(&nodes[0]).await;
    nodes[1].kill_and_restart();
    let b = instance_of(&nodes[1]).await;
    assert_ne!(a, b);
    assert!(a.starts_with("twin#") && b.starts_with("twin#"), "{a} {b}");
    let ev = nodes[1]
        .manage(Method::GET, &format!("/addr/{id}/event"), None)
        .await
        .json()[0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let e = nodes[1]
        .manage(Method::GET, &format!("/addr/{id}/event/{ev}"), None)
        .await
        .json();
    assert_eq!(e["deliveries"][0]["leased_by"], a.as_str(), "{e}");
    assert_eq!(e["deliveries"][0]["state"], "pending", "{e}");

    std::fs::write(&gate, "up").expect("bring the target up");
    let (state, attempts, _) = nodes[0].settled_delivery(id).await;
    assert_eq!((state.as_str(), attempts), ("delivered", 1));
    assert_eq!(plugin_calls(&record, "send").len(), 1, "delivered once");
}

/// A migration no build of this checkout has, as a newer build records it.
const FUTURE_MIGRATION: &str = "m29991231_000001_from_a_newer_build";

#[tokio::test(flavor = "multi_thread")]
async fn a_node_stops_when_a_newer_build_migrates_its_database() {
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let gate = dir.path().join("target-is-up");
    let mut old = Server::start_with(node(&db, &record)).await;
    let (id, addr) = old.new_addr().await;
    old.endpoint(id, "test", json!({"gate": gate.display().to_string()}))
        .await;
    assert_status!(
        old.push(json!({"addr": addr, "msg": "accepted before the upgrade"}))
            .await,
        202
    );
    roboger_tests::sends_begun(&record, 1).await;

    // A newer build starts on the database and migrates it.
    let sql = old.db_client();
    sql.query(&format!(
        "INSERT INTO seaql_migrations (version, applied_at) VALUES ('{FUTURE_MIGRATION}', 0)"
    ));
    let status = old.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(3), "{}", old.log_text());
    let said = old.log_text();
    assert!(
        said.contains("the database was migrated by a newer roboger-server while this node ran"),
        "{said}"
    );
    assert!(said.contains(FUTURE_MIGRATION), "{said}");
    // A clean stop, as on SIGTERM: the held delivery is left to the other
    // nodes (or, when the plugin's shutdown ended its call first, set to
    // be retried by any node).
    assert_eq!(
        old.log_lines("INFO roboger_server: stopped").len(),
        1,
        "{said}"
    );

    // This build no longer starts on it, nor migrates it, and says why.
    let config = old.config_path.display().to_string();
    for command in ["serve", "migrate"] {
        let (code, _, err) = run_server_cmd(&["--config", &config, command], &[]);
        assert_eq!(code, 3, "{command}: {err}");
        assert!(
            err.contains("the database was migrated by a newer roboger-server")
                && err.contains(FUTURE_MIGRATION),
            "{command}: {err}"
        );
    }
    assert!(
        sql.query("SELECT version FROM seaql_migrations")
            .contains(FUTURE_MIGRATION),
        "the newer build's record is left as it is"
    );

    // The event accepted before is not lost: a node that may write to the
    // database (this build again, once the record is gone, standing in
    // for the newer build) delivers it.
    sql.query(&format!(
        "DELETE FROM seaql_migrations WHERE version = '{FUTURE_MIGRATION}'"
    ));
    std::fs::write(&gate, "up").expect("bring the target up");
    let newer = Server::start_with(node(&db, &record)).await;
    let (state, _, _) = newer.settled_delivery(id).await;
    assert_eq!(state, "delivered", "{}", newer.log_text());
    assert_eq!(plugin_calls(&record, "send").len(), 1, "delivered once");
}

/// `roboger_clock_offset_seconds` as `node` serves it, if it does.
async fn clock_offset(node: &Server) -> Option<f64> {
    node.metrics()
        .await
        .get("roboger_clock_offset_seconds")
        .copied()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_clock_is_off_says_so() {
    let (dir, db) = shared_database();
    let clock_file = dir.path().join("clock-offset");
    std::fs::write(&clock_file, "+30s").expect("the clock's offset");
    let on = |env| ServerOptions {
        db: Some(db.clone()),
        env,
        ..Default::default()
    };
    let mut nodes = Server::start_many(vec![on(Vec::new()), on(clock_set(&clock_file))]);
    let ahead = nodes.pop().expect("two nodes");
    let in_step = nodes.pop().expect("two nodes");
    if !on_postgres() && !on_mysql() {
        // SQLite has no server whose clock to compare with: every node of
        // a SQLite file runs on its machine.
        assert_eq!(clock_offset(&in_step).await, None);
        assert_eq!(clock_offset(&ahead).await, None);
        return;
    }
    // Measured at the first heartbeat, then every 10 s; a reading whose
    // round trip took over 0.2 s (a loaded machine) is dropped.
    ahead
        .wait_log(
            "s ahead of the database server's: nodes judge each other",
            Duration::from_secs(30),
        )
        .await;
    let said = ahead.log_lines("ahead of the database server's");
    assert_eq!(said.len(), 1, "warned once: {said:?}");
    let seconds: f64 = said[0]
        .split("this node's clock is ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {:?}", said[0]));
    assert!((29.0..31.0).contains(&seconds), "{}", said[0]);
    let served = clock_offset(&ahead).await.expect("the offset is served");
    assert!((-31.0..-29.0).contains(&served), "{served}");

    until("the offset served", Duration::from_secs(30), || async {
        clock_offset(&in_step).await.is_some()
    })
    .await;
    let offset = clock_offset(&in_step).await.unwrap_or(f64::NAN);
    assert!(offset.abs() < 0.5, "{offset}");
    assert!(
        in_step.log_lines("the database server's").is_empty(),
        "{}",
        in_step.log_text()
    );

    // NTP puts the clock right: said once, at the next reading (10 s).
    std::fs::write(&clock_file, "+0s").expect("the clock put right");
    ahead
        .wait_log(
            "this node's clock is in step with the database server's again",
            Duration::from_secs(30),
        )
        .await;
    let served = clock_offset(&ahead).await.unwrap_or(f64::NAN);
    assert!(served.abs() < 0.5, "{served}");
    assert_eq!(
        ahead.log_lines("ahead of the database server's").len(),
        1,
        "{}",
        ahead.log_text()
    );
}

/// A database that answers this node's reads but refuses its writes (a
/// read-only replica after a failover, a full disk): its heartbeat stops,
/// and `/ping`, which a load balancer asks, says so once the others would
/// take the node for dead, until the writes are taken again.
#[tokio::test(flavor = "multi_thread")]
async fn a_node_whose_writes_are_refused_says_so_at_ping() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let ping = async || s.request(Method::GET, "/ping", None, &[], None).await;
    assert_status!(ping().await, 204);
    let db = s.db_client();
    db.refuse_updates("node", "NEW.heartbeat IS NOT NULL");
    let refused = poll_every(
        Duration::from_millis(50),
        Duration::from_secs(20),
        async || {
            let r = ping().await;
            match r.status.as_u16() {
                503 => Ok(r),
                st => Err(format!("ping said {st} while the heartbeat was refused")),
            }
        },
    )
    .await;
    assert!(
        refused
            .text
            .contains("the database takes no writes from this node"),
        "{}",
        refused.text
    );
    assert!(
        !s.log_lines("cannot write this node's heartbeat").is_empty(),
        "{}",
        s.log_text()
    );
    db.allow_writes("node");
    poll_every(
        Duration::from_millis(50),
        Duration::from_secs(20),
        async || match ping().await.status.as_u16() {
            204 => Ok(()),
            st => Err(format!("ping said {st} once the heartbeat was taken again")),
        },
    )
    .await;
}

/// A wall clock stepped forward (NTP's first sync on a device without a
/// real-time clock, a VM resumed) makes this node's leases look expired:
/// the delivery in flight through the step is not claimed and sent a
/// second time by the node making it.
#[tokio::test(flavor = "multi_thread")]
async fn a_clock_stepped_forward_sends_no_delivery_twice() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record");
    let clock = dir.path().join("clock-offset");
    std::fs::write(&clock, "+0s").expect("the clock's offset");
    // The plugin's clock is left alone: libfaketime cannot run in its
    // sandbox. A failed send is tried again in four to five minutes; a
    // call may last 30 s, and its lease six minutes.
    let s = Server::start_with(ServerOptions {
        env: clock_set(&clock),
        plugins_yaml: format!(
            "- name: test\n  command: {}\n  env:\n    TEST_PLUGIN_RECORD: {}\n    \
             LD_PRELOAD: ''\n",
            test_plugin_bin().display(),
            record.display()
        ),
        yaml: "timeout: 30\ndelivery:\n  retry-base: 300\n".into(),
        ..Default::default()
    })
    .await;
    let sent_to = |what: &str| {
        plugin_calls(&record, "send")
            .into_iter()
            .filter(|r| r["config"].get(what).is_some())
            .count()
    };
    // A delivery that failed once, then one in flight (held at a gate),
    // each an event of its own, so that neither waits for the other.
    let (failing, to_failing) = s.new_addr().await;
    s.endpoint(failing, "test", json!({"fail_times": 1})).await;
    assert_status!(
        s.push(json!({"addr": to_failing, "msg": "fails"})).await,
        202
    );
    until(
        "the first try's outcome",
        Duration::from_secs(10),
        || async { s.newest_event(failing).await["deliveries"][0]["attempts"] == 1 },
    )
    .await;
    let (held, to_held) = s.new_addr().await;
    let gate = dir.path().join("target-is-up");
    s.endpoint(held, "test", json!({"gate": gate.display().to_string()}))
        .await;
    assert_status!(s.push(json!({"addr": to_held, "msg": "once"})).await, 202);
    until("the call in flight", Duration::from_secs(10), || async {
        plugin_calls(&record, "send_started").len() == 1
    })
    .await;

    // An hour on: the failed delivery is due again. The sweep that claims
    // it would claim the one in flight first (due earlier), and send both
    // in one `send_batch`, whose events the plugin starts in order.
    std::fs::write(&clock, "+3600s").expect("the clock's offset");
    until(
        "the failed delivery tried again",
        Duration::from_secs(20),
        || async { sent_to("fail_times") == 2 },
    )
    .await;
    assert_eq!(
        plugin_calls(&record, "send_started").len(),
        1,
        "started once"
    );

    std::fs::write(&gate, "up").expect("bring the target up");
    let (state, attempts, error) = s.settled_delivery(held).await;
    assert_eq!((state.as_str(), attempts), ("delivered", 1), "{error}");
    assert_eq!(sent_to("gate"), 1, "sent once");
    let log = s.log_text();
    assert!(!log.contains("late outcomes dropped"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_through_three_nodes_accept_exactly_lim_c() {
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let mut opts = node(&db, &record);
    opts.yaml = "limits:\n  period: day\n".into();
    let nodes = Server::start_many(vec![opts; 3]);
    let (id, addr) = nodes[0].new_addr().await;
    let r = nodes[0]
        .manage(
            Method::PATCH,
            &format!("/addr/{id}"),
            Some(json!({"lim_c": 10})),
        )
        .await;
    assert_status!(r, 200);
    // Changes apply in order: a node that knows a later address knows the
    // limit set before it.
    let (_, later) = nodes[0].new_addr().await;
    for n in &nodes[1..] {
        until(
            "the limit reaches every node",
            Duration::from_secs(5),
            || async { push_status(n, &later, "probe").await == 202 },
        )
        .await;
    }
    let pushes = (0..30).map(|i| {
        let n = &nodes[i % 3];
        let addr = addr.clone();
        async move { push_status(n, &addr, &format!("burst {i}")).await }
    });
    let statuses = futures_util::future::join_all(pushes).await;
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((accepted, limited), (10, 20), "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_in_redis_through_three_nodes_and_without_it() {
    let Some(mut redis) = roboger_tests::RedisServer::start() else {
        return;
    };
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let mut opts = node(&db, &record);
    opts.yaml = format!(
        "limits:\n  period: day\n  redis:\n    host: '127.0.0.1:{}'\n",
        redis.port
    );
    let nodes = Server::start_many(vec![opts; 3]);
    let limited = |lim_c: i64| {
        let n = &nodes[0];
        async move {
            let (id, addr) = n.new_addr().await;
            let r = n
                .manage(
                    Method::PATCH,
                    &format!("/addr/{id}"),
                    Some(json!({"lim_c": lim_c})),
                )
                .await;
            assert_status!(r, 200);
            let (_, later) = n.new_addr().await;
            (id, addr, later)
        }
    };
    let burst = |addr: String, n: usize| {
        let nodes = &nodes;
        async move {
            let pushes = (0..n).map(|i| {
                let node = &nodes[i % 3];
                let addr = addr.clone();
                async move { push_status(node, &addr, &format!("burst {i}")).await }
            });
            futures_util::future::join_all(pushes).await
        }
    };
    let (id, addr, later) = limited(10).await;
    for n in &nodes[1..] {
        until(
            "the limit reaches every node",
            Duration::from_secs(5),
            || async { push_status(n, &later, "probe").await == 202 },
        )
        .await;
    }
    let addr_again = addr.clone();
    let statuses = burst(addr, 30).await;
    let count = |s: &[u16], code| s.iter().filter(|x| **x == code).count();
    assert_eq!(
        (count(&statuses, 202), count(&statuses, 429)),
        (10, 20),
        "{statuses:?}"
    );
    // The counters are in Redis, one key per address and window.
    let day = today_window_start();
    let key = format!("roboger:lim:{id}:{day}");
    assert_eq!(
        redis.command(&["HGET", &key, "c"]).as_deref(),
        Some("10"),
        "{key}"
    );
    // reset-addr-limits clears them in Redis too.
    let r = nodes[1]
        .manage(
            Method::POST,
            "/core",
            Some(json!({"cmd": "reset-addr-limits"})),
        )
        .await;
    assert_status!(r, 204);
    assert_eq!(
        redis.command(&["HGET", &key, "c"]),
        None,
        "{key} after the reset"
    );
    assert_eq!(
        push_status(&nodes[2], &addr_again, "after the reset").await,
        202
    );

    // Redis goes away: pushes are counted in the database, still exactly.
    redis.stop();
    let (addr2_id, addr2, later2) = limited(5).await;
    for n in &nodes[1..] {
        until(
            "the limit reaches every node",
            Duration::from_secs(5),
            || async { push_status(n, &later2, "probe").await == 202 },
        )
        .await;
    }
    let statuses = burst(addr2.clone(), 15).await;
    assert_eq!(
        (count(&statuses, 202), count(&statuses, 429)),
        (5, 10),
        "{statuses:?}"
    );
    nodes[0]
        .wait_log(
            "counting in the database until it is back",
            Duration::from_secs(5),
        )
        .await;

    // Redis is back: the pushes are counted there again, and the log says
    // so once they have been for a while, after one line of its absence.
    redis.restart();
    poll_every(
        Duration::from_millis(250),
        Duration::from_secs(20),
        async || {
            push_status(&nodes[0], &addr2, "probe").await;
            match nodes[0]
                .log_lines("address limits are counted in Redis again")
                .is_empty()
            {
                true => Err(format!(
                    "never said Redis counts again: {}",
                    nodes[0].log_text()
                )),
                false => Ok(()),
            }
        },
    )
    .await;
    let key = format!("roboger:lim:{}:{}", addr2_id, today_window_start());
    assert!(
        redis.command(&["HGET", &key, "c"]).is_some(),
        "no count in Redis after its return"
    );
    let absent = nodes[0].log_lines("cannot count address limits in Redis");
    assert_eq!(absent.len(), 1, "{absent:#?}");
}

/// The start of today's window (`period: day`), in seconds since the epoch.
fn today_window_start() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    now - now % 86_400
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_keys_given_to_one_node_make_their_address_wait_at_another() {
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let nodes = Server::start_many(vec![node(&db, &record); 2]);
    for _ in 0..3 {
        let r = nodes[0]
            .request(Method::GET, "/manage/v2/addr", Some("guess"), &[], None)
            .await;
        assert_status!(r, 403);
    }
    let r = nodes[1].manage(Method::GET, "/addr", None).await;
    assert_status!(r, 429);
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_stored_through_one_node_is_served_by_another() {
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let nodes = Server::start_many(vec![node(&db, &record); 2]);
    let (id, addr) = nodes[0].new_addr().await;
    nodes[0]
        .endpoint(id, "test", json!({"callbacks": true}))
        .await;
    assert_status!(
        nodes[0]
            .push(json!({"addr": addr, "msg": "with a file"}))
            .await,
        202
    );
    until(
        "the plugin stored its file",
        Duration::from_secs(10),
        || async { !plugin_calls(&record, "send").is_empty() },
    )
    .await;
    let sent = plugin_calls(&record, "send");
    let file = sent[0]["callbacks"]["bucket_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no bucket id: {}", sent[0]))
        .to_string();
    let r = nodes[1]
        .request(Method::GET, &format!("/file/{file}"), None, &[], None)
        .await;
    assert_status!(r, 200);
    assert_eq!(r.text, "hello bucket");
    assert_eq!(r.header("roboger-file-name"), Some("hello.txt"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_s_delivery_stats_are_the_same_on_every_node() {
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let mut opts = node(&db, &record);
    opts.yaml = "delivery:\n  max-attempts: 1\n".into();
    let nodes = Server::start_many(vec![opts; 2]);
    let (id, addr) = nodes[0].new_addr().await;
    let ep = nodes[0]
        .endpoint(id, "test", json!({"fail": "the target says no"}))
        .await;
    let path = format!("/addr/{id}/endpoint/{ep}");
    let stats = async |n: &Server| n.manage(Method::GET, &path, None).await.json();
    for i in 0..2 {
        assert_status!(
            nodes[0]
                .push(json!({"addr": addr, "msg": format!("fails {i}")}))
                .await,
            202
        );
    }
    until("two failed deliveries", Duration::from_secs(10), || async {
        stats(&nodes[1]).await["failed"] == 2
    })
    .await;
    let r = nodes[0]
        .manage(
            Method::PATCH,
            &format!("/addr/{id}/endpoint/{ep}"),
            Some(json!({"config": {}})),
        )
        .await;
    assert_status!(r, 200);
    // Node 1 applied its own change before answering.
    for i in 0..3 {
        assert_status!(
            nodes[0]
                .push(json!({"addr": addr, "msg": format!("works {i}")}))
                .await,
            202
        );
    }
    until(
        "every delivery settled",
        Duration::from_secs(10),
        || async {
            let s = stats(&nodes[0]).await;
            s["pending"] == 0 && s["delivered"] == 3
        },
    )
    .await;
    for n in &nodes {
        let s = stats(n).await;
        assert_eq!(
            (
                s["delivered"].clone(),
                s["failed"].clone(),
                s["pending"].clone()
            ),
            (json!(3), json!(2), json!(0)),
            "{s}"
        );
        assert_eq!(s["last_error"], "the target says no", "{s}");
        assert!(s["last_error_at"].is_string(), "{s}");
        assert_eq!(s["plugin_name"], "test", "{s}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_changes_through_one_node_reaches_another_whole() {
    let (dir, db) = shared_database();
    let record = dir.path().join("record");
    let nodes = Server::start_many(vec![node(&db, &record); 2]);
    let created = futures_util::future::join_all((0..40).map(|_| nodes[0].new_addr())).await;
    // Disable every other one: the other node must see both kinds of change.
    for (id, _) in created.iter().step_by(2) {
        let r = nodes[0]
            .manage(
                Method::PATCH,
                &format!("/addr/{id}"),
                Some(json!({"active": 0})),
            )
            .await;
        assert_status!(r, 200);
    }
    for (i, (_, addr)) in created.iter().enumerate() {
        let want = if i % 2 == 0 { 406 } else { 202 };
        until(
            "every address and its state on the other node",
            Duration::from_secs(5),
            || async { push_status(&nodes[1], addr, "probe").await == want },
        )
        .await;
    }
}

/// A node whose start would take the nodes on a database past the
/// connections the database lets their user open says so, and still
/// starts. Past that limit, requests wait for a connection the database
/// refuses ("too many connections", which the pool keeps trying) and
/// fail with "Connection pool timed out", which cannot say why; a node
/// that could not open the few its start needs failed to apply the
/// migrations, saying the same. Here the servers' user may open 15: one node (up to 10 or 11,
/// with `db-pool-size` 10) fits, two do not.
#[tokio::test]
async fn a_node_past_the_databases_connection_limit_is_warned_of() {
    let Some(db) = database_with_connection_limit(15) else {
        return;
    };
    let opts = || ServerOptions {
        db: Some(db.clone()),
        yaml: "db-pool-size: 10\n".into(),
        ..Default::default()
    };
    let warned = "connections at once (";
    let first = Server::start_with(opts()).await;
    assert!(first.log_lines(warned).is_empty(), "{}", first.log_text());
    let second = Server::start_with(opts()).await;
    let said = second.log_lines(warned);
    assert_eq!(said.len(), 1, "{}", second.log_text());
    let setting = if on_mysql() {
        "the account's max_user_connections"
    } else {
        "the role's CONNECTION LIMIT"
    };
    let each = if on_postgres() { 12 } else { 10 };
    assert!(
        said[0].contains(&format!(
            "open 15 connections at once ({setting}), fewer than the {} that 2 node(s) on it \
             may open, {each} each",
            2 * each
        )),
        "{}",
        said[0]
    );
    assert_status!(second.manage(Method::GET, "/addr", None).await, 200);
}
