//! Redis goes away and comes back; WebSocket clients never notice but for
//! `unavailable` while it is gone.

use serde_json::json;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_is_survived_without_any_client_reconnecting() {
    let mut redis = Redis::start().await;
    let port = redis.port;
    let a = Node::ready(redis_config(&redis, "a", &[])).await;
    let b = Node::ready(redis_config(&redis, "b", &[])).await;
    let (mut on_a, a_id) = Client::json(&a, &["show"]).await;
    let (mut on_b, b_id) = Client::json(&b, &["show"]).await;

    redis.kill();
    a.wait_ready(503).await;
    b.wait_ready(503).await;
    assert_eq!(a.metric("roomcast_bus_up").await, 0.0);
    let (reply, _) = on_a
        .request(send_frame("show", "comment", json!("into the void")), 1)
        .await;
    assert_eq!(reply["op"], "error");
    assert_eq!(reply["code"], "unavailable");
    assert_eq!(reply["id"], 1);
    // Health is about the process, not the bus.
    assert_eq!(a.get("/healthz").await.0, 200);

    let _redis = Redis::start_on(port).await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    assert_eq!(a.metric("roomcast_bus_up").await, 1.0);

    // Same connections, messages flow both ways again.
    let (ack, _) = on_a
        .request(send_frame("show", "comment", json!("back")), 2)
        .await;
    assert_eq!(ack["op"], "ack");
    let msg = on_b.recv_json().await;
    assert_eq!(
        (msg["data"].clone(), msg["from"].clone()),
        (json!("back"), json!(a_id))
    );
    let (ack, _) = on_b
        .request(send_frame("show", "comment", json!("and forth")), 3)
        .await;
    assert_eq!(ack["op"], "ack");
    loop {
        let f = on_a.recv_json().await;
        if f["data"] == "and forth" {
            assert_eq!(f["from"], b_id.as_str());
            break;
        }
    }
    assert_eq!(a.metric("roomcast_connections").await, 1.0);
    assert_eq!(
        a.metric("roomcast_connections_opened_total").await,
        1.0,
        "no client reconnected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_redis_becomes_ready_when_redis_arrives() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let node = Node::start(config(&[
        ("ROOMCAST__BUS__KIND", "redis"),
        ("ROOMCAST__BUS__REDIS__URL", &url),
        ("ROOMCAST__BUS__REDIS__BACKOFF_MIN", "50ms"),
        ("ROOMCAST__BUS__REDIS__BACKOFF_MAX", "200ms"),
    ]))
    .await;
    node.wait_ready(503).await;
    // Clients can connect and join while the bus is down; the rooms are subscribed later.
    let (mut c, _) = Client::json(&node, &["early"]).await;
    let redis = Redis::start_on(port).await;
    node.wait_ready(200).await;
    eventually("the room to be subscribed after connect", || async {
        redis.numsub("early").await == 1
    })
    .await;
    let (ack, _) = c.request(send_frame("early", "comment", json!(1)), 1).await;
    assert_eq!(ack["op"], "ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_detected_by_ping_and_the_bus_recovers_when_it_resumes() {
    let redis = Redis::start().await;
    let a = Node::ready(redis_config(&redis, "a", &[])).await;
    let b = Node::ready(redis_config(&redis, "b", &[])).await;
    let (mut on_a, _) = Client::json(&a, &["r"]).await;
    let (mut on_b, _) = Client::json(&b, &["r"]).await;

    // A frozen Redis keeps its TCP connections open: only the PINGs notice.
    redis.signal("STOP");
    a.wait_ready(503).await;
    let (reply, _) = on_a
        .request(send_frame("r", "comment", json!("frozen")), 1)
        .await;
    assert_eq!(reply["code"], "unavailable");
    redis.signal("CONT");
    a.wait_ready(200).await;
    b.wait_ready(200).await;

    let (ack, _) = on_a
        .request(send_frame("r", "comment", json!("thawed")), 2)
        .await;
    assert_eq!(ack["op"], "ack");
    loop {
        let f = on_b.recv_json().await;
        if f["data"] == "thawed" {
            break;
        }
    }
    assert!(
        a.metric("roomcast_bus_reconnects_total").await >= 2.0,
        "a reconnected after the hang"
    );
}
