//! A MySQL server whose `max_allowed_packet` is below what a push may
//! carry. The test lowers that global setting of the suite's MariaDB while
//! its server starts, so it is a test binary of its own (cargo runs the
//! binaries one at a time) and sets the old value back when it ends.

use roboger_tests::{DbClient, Method, Server, ServerOptions, assert_status, json, on_mysql};

/// The suite's MariaDB's `max_allowed_packet`, set to a value until this
/// is dropped.
struct Packet {
    client: DbClient,
    old: String,
}

impl Packet {
    fn set(bytes: usize) -> Packet {
        let my = std::env::var("ROBOGER_TEST_MYSQL").unwrap_or_default();
        // A global setting: any database of the server's will do.
        let client = DbClient::of(&format!("{}/mysql", my.trim_end_matches('/')));
        let old = client.query("SELECT @@global.max_allowed_packet");
        client.query(&format!("SET GLOBAL max_allowed_packet = {bytes}"));
        Packet { client, old }
    }
}

impl Drop for Packet {
    fn drop(&mut self) {
        let old = &self.old;
        self.client
            .query(&format!("SET GLOBAL max_allowed_packet = {old}"));
    }
}

/// With 2 MiB for a statement, a push of 3 MB of media is refused alone,
/// 413 saying why, and the pushes committed beside it are stored; one of
/// 1.5 MB is stored; the start warns of it. Before, the large push was a
/// 503 ("database error") and so was every push in its group commit. The
/// refused push is not counted against the address's limit, as one
/// larger than `push-max-media` is not.
#[tokio::test]
async fn an_event_larger_than_the_database_takes_is_refused_alone() {
    if !on_mysql() {
        return;
    }
    let packet = Packet::set(2 * 1024 * 1024);
    let s = Server::start_with(ServerOptions::test_plugin(
        "limits:\n  period: day\n  reserve: 0\n",
    ))
    .await;
    let (id, a) = s.new_addr().await;
    s.endpoint(id, "t", json!({})).await;
    // Room for the twenty small pushes and the one that fits, exactly.
    let r = s
        .manage(
            Method::PATCH,
            &format!("/addr/{id}"),
            Some(json!({"lim_c": 21})),
        )
        .await;
    assert_status!(r, 200);
    let most = 2 * 1024 * 1024 - 64 * 1024;

    let media = |n: usize| {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(vec![b'x'; n])
    };
    let big = s.push(json!({"addr": a, "msg": "big", "media": media(3_000_000)}));
    let small = futures_util::future::join_all(
        (0..20).map(|i| s.push(json!({"addr": a, "msg": format!("small {i}")}))),
    );
    let (big, small) = tokio::join!(big, small);
    assert_status!(big, 413);
    assert!(
        big.text.contains(&format!(
            "{most} bytes at most (MySQL's max_allowed_packet)"
        )),
        "{}",
        big.text
    );
    for r in &small {
        assert_status!(r, 202);
    }
    let r = s
        .push(json!({"addr": a, "msg": "fits", "media": media(1_500_000)}))
        .await;
    assert_status!(r, 202);
    let e = s.newest_event(id).await;
    assert_eq!(e["msg"], "fits");
    assert_eq!(e["media_size"], 1_500_000);
    let warned = s.log_lines("max_allowed_packet");
    assert!(
        warned.iter().any(|l| l.contains("WARN")
            && l.contains(&format!("room for events of {most} bytes"))
            && l.contains("push-max-media (10485760 bytes)")),
        "{warned:?}"
    );
    drop(packet);
}
