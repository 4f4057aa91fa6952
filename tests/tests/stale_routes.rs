//! Pushes that a node routes by its cache just after their address or
//! endpoint was deleted, before any routing change says so. That is how
//! another node's deletion looks until its change arrives. Here the rows
//! are deleted straight in the database, so no change ever arrives and
//! the race is certain.
//!
//! The group commit meets the foreign key the database refuses. It
//! writes the batch again without what is gone, and answers as things
//! now are: 404 for a gone address, and 202 with no delivery for a gone
//! endpoint. Pushes in the same commit to what still exists are stored
//! and delivered, and nothing is answered 5xx.
//!
//! Every backend runs this: SQLite's one-hop commit, PostgreSQL's
//! one-statement commit and MySQL's statement per table each have to
//! recognise the refused key.

use roboger_tests::{
    Method, Server, ServerOptions, assert_status, json, more_than_a_statement_takes,
};

#[tokio::test]
async fn a_push_routed_to_what_was_just_deleted_is_answered_as_it_now_is() {
    let s = Server::start_with(ServerOptions::test_plugin("")).await;
    let db = s.db_client();
    let (kept_id, kept) = s.new_addr().await;
    s.endpoint(kept_id, "t", json!({})).await;
    let (no_ep_id, no_ep) = s.new_addr().await;
    let ep = s.endpoint(no_ep_id, "t", json!({})).await;
    let (gone_id, gone) = s.new_addr().await;
    s.endpoint(gone_id, "t", json!({})).await;
    // The node routes all three, and delivers.
    for (id, a) in [(kept_id, &kept), (no_ep_id, &no_ep), (gone_id, &gone)] {
        assert_status!(s.push(json!({"addr": a, "msg": "before"})).await, 202);
        let e = s.wait_settled(id).await;
        assert_eq!(e["deliveries"][0]["state"], "delivered", "{e}");
    }

    // Behind the node's back (foreign keys cascade to what hangs below).
    db.query(&format!("DELETE FROM endpoint WHERE id = {ep}"));
    db.query(&format!("DELETE FROM addr WHERE id = {gone_id}"));

    // At once, so that they can share one group commit.
    let (to_kept, to_no_ep, to_gone) = tokio::join!(
        s.push(json!({"addr": kept, "msg": "after"})),
        s.push(json!({"addr": no_ep, "msg": "after"})),
        s.push(json!({"addr": gone, "msg": "after"})),
    );
    assert_status!(to_kept, 202);
    assert_status!(to_no_ep, 202);
    assert_status!(to_gone, 404);

    let e = s.wait_settled(kept_id).await;
    assert_eq!(e["msg"], "after", "{e}");
    assert_eq!(e["deliveries"][0]["state"], "delivered", "{e}");
    // Stored (the 202 came after the commit), with no delivery to the
    // endpoint that is gone.
    let newest = s
        .manage(Method::GET, &format!("/addr/{no_ep_id}/event"), None)
        .await
        .json()[0]["id"]
        .as_str()
        .map(str::to_string)
        .expect("an event");
    let e = s
        .manage(
            Method::GET,
            &format!("/addr/{no_ep_id}/event/{newest}"),
            None,
        )
        .await
        .json();
    assert_eq!(e["msg"], "after", "{e}");
    assert_eq!(e["deliveries"], json!([]), "{e}");

    // The next commits are the usual ones again.
    assert_status!(s.push(json!({"addr": kept, "msg": "later"})).await, 202);
    let e = s.wait_settled(kept_id).await;
    assert_eq!(e["msg"], "later", "{e}");
    assert_eq!(e["deliveries"][0]["state"], "delivered", "{e}");
}

/// The same race, in a push to more endpoints than one statement takes
/// bound parameters (SQLite takes 32,766, PostgreSQL and MySQL 65,535).
/// Looking for what is gone named every endpoint of the commit in one
/// statement, which the database refused: the push was answered 503.
#[tokio::test]
async fn a_push_to_more_endpoints_than_a_statement_takes_meets_one_just_deleted() {
    let n = more_than_a_statement_takes();
    let s = Server::start_with(ServerOptions {
        plugins: vec!["t".into()],
        // Re-reading the address's routes takes about a second in a
        // debug build.
        yaml: "timeout: 10\n".into(),
        ..Default::default()
    })
    .await;
    let db = s.db_client();
    let (id, a) = s.new_addr().await;
    let ep = s.endpoint(id, "t", json!({})).await;
    db.copy_endpoint(ep, n, true);
    // A change to the address: the node re-reads its routes, copies and all.
    let r = s
        .manage(
            Method::PATCH,
            &format!("/addr/{id}/endpoint/{ep}"),
            Some(json!({"description": "the first"})),
        )
        .await;
    assert_status!(r, 200);
    let newest = db.query(&format!(
        "SELECT max(id) FROM endpoint WHERE addr_id = {id}"
    ));
    db.query(&format!("DELETE FROM endpoint WHERE id = {newest}"));

    assert_status!(s.push(json!({"addr": a, "msg": "to all"})).await, 202);
    let stored = db.query(&format!(
        "SELECT count(*) FROM delivery d, event e WHERE d.event_id = e.id AND e.addr_id = {id} \
         AND d.endpoint_id <> {newest}"
    ));
    assert_eq!(stored, n.to_string(), "a delivery to each endpoint left");
    let to_gone = db.query(&format!(
        "SELECT count(*) FROM delivery WHERE endpoint_id = {newest}"
    ));
    assert_eq!(to_gone, "0");
}
