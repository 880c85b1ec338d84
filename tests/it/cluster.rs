//! Several gateway nodes on one real Redis.

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_sent_on_one_node_reaches_every_client_in_the_room_on_all_nodes_exactly_once() {
    let redis = Redis::start().await;
    let a = Node::ready(redis_config(&redis, "a", &[])).await;
    let b = Node::ready(redis_config(&redis, "b", &[])).await;
    let c = Node::ready(redis_config(&redis, "c", &[])).await;

    let (mut on_a, a_id) = Client::json(&a, &["r1"]).await;
    let (mut on_b, _) = Client::json(&b, &["r1"]).await;
    let (mut on_c, _) = Client::json(&c, &["r1"]).await;
    let (mut on_c2, _) = Client::json(&c, &["r1"]).await;
    let (mut other_room, _) = Client::json(&b, &["r2"]).await;

    let mut early = Vec::new();
    for n in 1..=2 {
        let (ack, other) = on_a
            .request(send_frame("r1", "danmaku", json!({"n": n})), n)
            .await;
        assert_eq!(ack["op"], "ack");
        early.extend(other);
    }
    // Each client gets n=1 then n=2: exactly once, in order.
    for client in [&mut on_b, &mut on_c, &mut on_c2] {
        for n in 1..=2 {
            let msg = client.recv_json().await;
            assert_eq!(msg["data"], json!({"n": n}), "{msg}");
            assert_eq!(msg["from"], a_id.as_str());
            assert_eq!(msg["room"], "r1");
        }
    }
    // The sender got its own two, and nothing more before the sentinel below.
    let mut own: Vec<_> = early.iter().map(|f| f["data"]["n"].as_u64()).collect();
    while own.len() < 2 {
        let f = on_a.recv_json().await;
        if f["op"] == "msg" {
            own.push(f["data"]["n"].as_u64());
        }
    }
    assert_eq!(own, [Some(1), Some(2)]);

    // r2 saw none of it: the first thing it receives is its own sentinel.
    other_room
        .send_json(send_frame("r2", "comment", json!("sentinel")))
        .await;
    assert_eq!(other_room.recv_json().await["data"], "sentinel");
    on_b.send_json(send_frame("r1", "comment", json!("last")))
        .await;
    for client in [&mut on_a, &mut on_b, &mut on_c, &mut on_c2] {
        assert_eq!(
            client.recv_json().await["data"],
            "last",
            "no duplicates before the last message"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_subscribe_only_to_rooms_with_local_clients() {
    let redis = Redis::start().await;
    let a = Node::ready(redis_config(&redis, "a", &[])).await;
    let b = Node::ready(redis_config(&redis, "b", &[])).await;

    let (on_a, _) = Client::json(&a, &["hot"]).await;
    let (mut on_b, _) = Client::json(&b, &["hot", "quiet"]).await;
    // Subscribed before the welcome arrived.
    assert_eq!(redis.numsub("hot").await, 2);
    assert_eq!(redis.numsub("quiet").await, 1);
    assert_eq!(redis.numsub("nobody").await, 0);
    let mut channels: Vec<String> = redis.cmd(&["PUBSUB", "CHANNELS", "roomcast:*"]).await;
    channels.sort();
    // Rooms with local clients, and each node's own canary channel.
    assert_eq!(
        channels,
        [
            "roomcast:canary:a",
            "roomcast:canary:b",
            "roomcast:room:hot",
            "roomcast:room:quiet"
        ]
    );
    assert_eq!(a.metric("roomcast_rooms").await, 1.0);
    assert_eq!(b.metric("roomcast_rooms").await, 2.0);

    // Last local leave unsubscribes; a join (ack) subscribes.
    let (ack, _) = on_b
        .request(json!({"op": "leave", "room": "quiet"}), 1)
        .await;
    assert_eq!(ack["op"], "ack");
    eventually("b to unsubscribe from quiet", || async {
        redis.numsub("quiet").await == 0
    })
    .await;
    let (ack, _) = on_b
        .request(json!({"op": "join", "room": "later"}), 2)
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(
        redis.numsub("later").await,
        1,
        "subscribed by the time of the ack"
    );

    // A disconnect is a leave.
    on_a.close().await;
    eventually("a to unsubscribe from hot", || async {
        redis.numsub("hot").await == 1
    })
    .await;
    assert_eq!(a.metric("roomcast_rooms").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_racing_the_last_leave_ends_subscribed() {
    let redis = Redis::start().await;
    // The storm is the point here, so the per-connection request limit is off.
    let unlimited = [("ROOMCAST__LIMITS__COMMANDS_PER_SECOND", "0")];
    let node = Node::ready(redis_config(&redis, "a", &unlimited)).await;
    let (mut c, _) = Client::json(&node, &[]).await;
    for i in 0..50u64 {
        c.send_json(json!({"op": "join", "room": "flip", "id": i * 2}))
            .await;
        c.send_json(json!({"op": "leave", "room": "flip", "id": i * 2 + 1}))
            .await;
    }
    let (ack, _) = c.request(json!({"op": "join", "room": "flip"}), 1000).await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(redis.numsub("flip").await, 1);
    // And it really receives.
    let (mut sender, _) = Client::json(&node, &["flip"]).await;
    sender
        .send_json(send_frame("flip", "comment", json!("after the storm")))
        .await;
    loop {
        let f = c.recv_json().await;
        if f["op"] == "msg" {
            assert_eq!(f["data"], "after the storm");
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_can_publish_straight_into_redis() {
    let redis = Redis::start().await;
    let node = Node::ready(redis_config(&redis, "a", &[])).await;
    let (mut json_client, _) = Client::json(&node, &["live:7"]).await;
    let mut raw_client = Client::raw(&node, "live:7").await;
    let envelope = r#"{"event":"notice","from":"backend","ts":1700000000000,"data":{"live":true}}"#;
    let receivers: i64 = redis
        .cmd(&["PUBLISH", "roomcast:room:live:7", envelope])
        .await;
    assert_eq!(receivers, 1, "one node subscribed");
    let msg = json_client.recv_json().await;
    assert_eq!(
        msg,
        json!({"op":"msg","room":"live:7","event":"notice","from":"backend","ts":1700000000000u64,"data":{"live":true}})
    );
    match raw_client.recv().await {
        Message::Text(t) => assert_eq!(serde_json::from_str::<serde_json::Value>(&t).unwrap(), msg),
        other => panic!("expected text, got {other:?}"),
    }
    // A malformed payload is dropped and counted; the room carries on.
    let _: i64 = redis
        .cmd(&["PUBLISH", "roomcast:room:live:7", "garbage"])
        .await;
    let _: i64 = redis
        .cmd(&[
            "PUBLISH",
            "roomcast:room:live:7",
            r#"{"event":"after","data":1}"#,
        ])
        .await;
    assert_eq!(json_client.recv_json().await["event"], "after");
    assert_eq!(node.metric("roomcast_bus_invalid_total").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_storm_over_many_rooms_ends_with_every_room_subscribed() {
    let redis = Redis::start().await;
    let node = Node::ready(redis_config(&redis, "a", &[])).await;
    // 20 clients join 30 rooms each, all at once, without waiting for acks.
    let mut clients = Vec::new();
    for c in 0..20u64 {
        let (mut client, _) = Client::json(&node, &[]).await;
        for r in 0..30u64 {
            client
                .send_json(
                    json!({"op": "join", "room": format!("storm-{}", (c * 7 + r) % 45), "id": r}),
                )
                .await;
        }
        clients.push(client);
    }
    for client in &mut clients {
        let mut acked = 0;
        while acked < 30 {
            if client.recv_json().await["op"] == "ack" {
                acked += 1;
            }
        }
    }
    for room in 0..45 {
        assert_eq!(
            redis.numsub(&format!("storm-{room}")).await,
            1,
            "storm-{room}"
        );
    }
    assert_eq!(node.metric("roomcast_rooms").await, 45.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_sends_is_acked_and_delivered_in_order_across_nodes() {
    // Sends are pipelined to Redis (a client's next message is read before
    // the previous one's PUBLISH returns): order must survive that.
    const N: u64 = 300;
    let redis = Redis::start().await;
    let unlimited = [("ROOMCAST__LIMITS__MESSAGES_PER_SECOND", "0")];
    let a = Node::ready(redis_config(&redis, "a", &unlimited)).await;
    let b = Node::ready(redis_config(&redis, "b", &unlimited)).await;
    let (mut sender, _) = Client::json(&a, &["burst"]).await;
    let mut raw_sender = Client::raw(&a, "burst").await;
    let (mut on_b, _) = Client::json(&b, &["burst"]).await;

    // Interleave JSON and raw publishers on the same node, without waiting.
    for n in 1..=N {
        let mut frame = send_frame("burst", "seq", json!({"n": n}));
        frame["id"] = n.into();
        sender.send_json(frame).await;
        raw_sender.send(Message::text(format!("raw-{n}"))).await;
    }

    let (mut acks, mut own) = (Vec::new(), Vec::new());
    while acks.len() < N as usize || own.len() < N as usize {
        let f = sender.recv_json().await;
        match f["op"].as_str() {
            Some("ack") => acks.push(f["id"].as_u64()),
            Some("msg") if f["event"] == "seq" => own.push(f["data"]["n"].as_u64()),
            Some("msg") => {} // the raw sender's messages
            _ => panic!("unexpected frame: {f}"),
        }
    }
    let expected: Vec<_> = (1..=N).map(Some).collect();
    assert_eq!(acks, expected, "acks in the order the messages were sent");
    assert_eq!(own, expected, "the sender's own echoes in order");

    let (mut json_seen, mut raw_seen) = (Vec::new(), Vec::new());
    while json_seen.len() < N as usize || raw_seen.len() < N as usize {
        let f = on_b.recv_json().await;
        if f["event"] == "seq" {
            json_seen.push(f["data"]["n"].as_u64());
        } else {
            raw_seen.push(f["data"].as_str().map(str::to_owned));
        }
    }
    assert_eq!(
        json_seen, expected,
        "the other node's client sees them in order"
    );
    let raw_expected: Vec<_> = (1..=N).map(|n| Some(format!("raw-{n}"))).collect();
    assert_eq!(raw_seen, raw_expected, "raw messages in order too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_published_into_redis_without_data_arrives_with_data_null() {
    let redis = Redis::start().await;
    let node = Node::ready(redis_config(&redis, "a", &[])).await;
    let (mut c, _) = Client::json(&node, &["r"]).await;
    let receivers: i64 = redis
        .cmd(&["PUBLISH", "roomcast:room:r", r#"{"event":"live"}"#])
        .await;
    assert_eq!(receivers, 1);
    let got = c.recv_json().await;
    assert_eq!(
        (got["event"].as_str(), got.get("data")),
        (Some("live"), Some(&json!(null))),
        "{got}"
    );
    assert_eq!(node.metric("roomcast_bus_invalid_total").await, 0.0);
}
