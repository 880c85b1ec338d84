//! Silent loss: Redis answers PINGs but no longer delivers. Only the canary
//! (a message each node sends itself through the bus) notices.

use crate::util::*;

/// `CLIENT PAUSE … WRITE` stalls every PUBLISH (a write command) while PINGs
/// and the subscriber connection stay healthy: health checks stay green and
/// nothing is delivered — the failure peers have shipped with. The canary
/// marks the bus down, and it comes back up once delivery works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_that_answers_but_does_not_deliver_is_marked_down_by_the_canary() {
    let redis = Redis::start().await;
    let node = Node::ready(redis_config(
        &redis,
        "a",
        &[
            ("ROOMCAST__BUS__REDIS__CANARY_INTERVAL", "100ms"),
            ("ROOMCAST__BUS__REDIS__TIMEOUT", "400ms"),
            // PINGs far apart, so that what notices is the canary.
            ("ROOMCAST__BUS__REDIS__PING_INTERVAL", "1m"),
            ("ROOMCAST__BUS__REDIS__BACKOFF_MIN", "50ms"),
            ("ROOMCAST__BUS__REDIS__BACKOFF_MAX", "100ms"),
        ],
    ))
    .await;
    let (mut client, _) = Client::json(&node, &["r"]).await;
    assert_eq!(node.metric("roomcast_bus_canary_failures_total").await, 0.0);

    let _: String = redis.cmd(&["CLIENT", "PAUSE", "3000", "WRITE"]).await;
    // PING still answers during the pause: only the canary can notice.
    let pong: String = redis.cmd(&["PING"]).await;
    assert_eq!(pong, "PONG");
    node.wait_ready(503).await;
    assert_eq!(node.metric("roomcast_bus_up").await, 0.0);
    assert!(node.metric("roomcast_bus_canary_failures_total").await >= 1.0);

    // Once the pause is over the node reconnects, re-subscribes, and
    // delivers again to the same client.
    node.wait_ready(200).await;
    let (status, _) = node
        .request("POST", "/api/publish", r#"{"room":"r","event":"back"}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(client.recv_json().await["event"], "back");
}
