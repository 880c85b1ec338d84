//! The shipped load-balancer config (deploy/nginx.conf) in front of two
//! nodes, with the real nginx: clients land on different nodes and still
//! share rooms; backends publish through it.

use serde_json::json;

use crate::nginx::{connect_via, upstream, Nginx};
use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_behind_the_shipped_nginx_config_share_rooms_across_nodes() {
    let redis = Redis::start().await;
    let a = Node::start_with(redis_config(&redis, "node-a", &[]), true).await;
    let b = Node::start_with(redis_config(&redis, "node-b", &[]), true).await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    let lb = Nginx::start(&[upstream(&a), upstream(&b)]).await;

    // least_conn: the second client goes to the other node.
    let (mut first, node1) = connect_via(&lb, "room=stage").await;
    let (mut second, node2) = connect_via(&lb, "room=stage").await;
    assert_ne!(node1, node2);

    let (ack, _) = first
        .request(send_frame("stage", "danmaku", json!("through nginx")), 1)
        .await;
    assert_eq!(ack["op"], "ack");
    let msg = second.recv_json().await;
    assert_eq!(msg["data"], json!("through nginx"));

    // A backend publishes through the internal server.
    let publish = r#"{"room":"stage","event":"notice","data":1}"#;
    let (status, body) = http(lb.internal(), "POST", "/api/publish", publish).await;
    assert_eq!((status, body.as_str()), (200, r#"{"ok":true}"#));
    for c in [&mut first, &mut second] {
        loop {
            let f = c.recv_json().await;
            if f["event"] == "notice" {
                break;
            }
        }
    }
    // The public server routes neither the API nor metrics (a web page a
    // viewer opens must not be able to publish), nor anything else but the
    // browser side: the demo page and the SDK.
    for path in ["/", "/sdk/roomcast.js"] {
        let (status, body) = http(lb.public(), "GET", path, "").await;
        assert_eq!(status, 200, "GET {path} through nginx");
        assert!(body.contains("Roomcast"), "GET {path}: {body:.80}");
    }
    for (method, path) in [
        ("POST", "/api/publish"),
        ("GET", "/metrics"),
        ("GET", "/sdk/../metrics"),
        ("GET", "/other"),
    ] {
        let (status, body) = http(lb.public(), method, path, publish).await;
        assert_eq!(status, 404, "{method} {path}: {body}");
        assert!(body.contains("not_found"), "{body}");
    }
    // Nor does the internal one serve WebSocket clients.
    assert_eq!(
        http(lb.internal(), "GET", "/ws?room=stage", "").await.0,
        404
    );
}

/// A rolling restart through the shipped config: the draining node's clients
/// all reconnect through nginx at once without a single refusal, and the
/// restarted node then gets its share of new clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_nodes_clients_reconnect_without_a_503_and_the_restarted_node_gets_new_clients() {
    const CLIENTS: usize = 20;
    let redis = Redis::start().await;
    let extra = [("ROOMCAST__SHUTDOWN__DRAIN", "500ms")];
    let mut a = Node::start_with(redis_config(&redis, "node-a", &extra), true).await;
    let b = Node::start_with(redis_config(&redis, "node-b", &extra), true).await;
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    let (a_addr, a_internal) = (a.addr, a.internal);
    let lb = Nginx::start(&[upstream(&a), upstream(&b)]).await;

    let mut on_a = Vec::new();
    let mut on_b = Vec::new();
    for _ in 0..CLIENTS {
        let (c, node) = connect_via(&lb, "room=r").await;
        match node.as_str() {
            "node-a" => on_a.push(c),
            _ => on_b.push(c),
        }
    }
    assert_eq!(on_a.len(), CLIENTS / 2, "least_conn spreads evenly");

    // Drain node a: each of its clients is closed with 1012 and reconnects
    // at once, as a real client does, while node a still answers 503.
    a.begin_shutdown();
    let mut moved = Vec::new();
    for mut c in on_a {
        assert_eq!(c.closed().await, 1012);
        let (c, node) = connect_via(&lb, "room=r").await;
        assert_eq!(node, "node-b", "a reconnect landed on the draining node");
        moved.push(c);
    }
    a.finished().await;
    // They still get the room's messages.
    let (status, _) = http(
        b.internal.expect("internal"),
        "POST",
        "/api/publish",
        r#"{"room":"r","event":"after-drain"}"#,
    )
    .await;
    assert_eq!(status, 200);
    for c in moved.iter_mut().chain(on_b.iter_mut()) {
        assert_eq!(c.recv_json().await["event"], "after-drain");
    }

    // Restart node a on the same addresses: new clients fill it first.
    let a = Node::start_at(redis_config(&redis, "node-a", &extra), a_addr, a_internal).await;
    a.wait_ready(200).await;
    let mut landed_on_a = 0;
    let mut fresh = Vec::new();
    for _ in 0..CLIENTS {
        let (c, node) = connect_via(&lb, "room=r").await;
        landed_on_a += usize::from(node == "node-a");
        fresh.push(c);
    }
    // b holds 20, a none: least_conn sends every new client to a.
    assert_eq!(
        landed_on_a, CLIENTS,
        "the restarted node got {landed_on_a} of {CLIENTS} new clients"
    );
}
