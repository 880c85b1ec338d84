//! Presence: cluster-wide online counts in `presence` frames and the rooms
//! API, no ghosts after a node dies, watch time.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::time::Instant;

use crate::util::*;

/// The report interval of every node here: short, so that the ghost bound
/// (2 intervals) is measured in a second.
const INTERVAL: Duration = Duration::from_millis(500);
const INTERVAL_SETTING: &str = "500ms";

/// Presence settings for a test node (a short throttle unless one is given).
fn presence(throttle: &'static str) -> [(&'static str, &'static str); 2] {
    [
        ("ROOMCAST__PRESENCE__REPORT_INTERVAL", INTERVAL_SETTING),
        ("ROOMCAST__PRESENCE__THROTTLE", throttle),
    ]
}

async fn redis_node(redis: &Redis, id: &str, throttle: &'static str) -> Node {
    Node::ready(redis_config(redis, id, &presence(throttle))).await
}

/// `GET /api/rooms/{room}` on `addr`, as JSON.
async fn room_at(addr: SocketAddr, room: &str) -> Value {
    let (status, body) = http(addr, "GET", &format!("/api/rooms/{room}"), "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

async fn online_at(addr: SocketAddr, room: &str) -> u64 {
    room_at(addr, room).await["online"]
        .as_u64()
        .expect("online")
}

/// Wait until `GET /api/rooms/{room}` on `addr` says `online`.
async fn until_online(addr: SocketAddr, room: &str, online: u64) {
    eventually(
        &format!("{room} to be online {online} on {addr}"),
        || async { online_at(addr, room).await == online },
    )
    .await;
}

/// `GET /api/rooms?{query}`: the rooms' (name, online), in order.
pub async fn busiest(node: &Node, query: &str) -> Vec<(String, u64)> {
    let (status, body) = node.get(&format!("/api/rooms?{query}")).await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    v["rooms"]
        .as_array()
        .expect("rooms")
        .iter()
        .map(|r| {
            (
                r["room"].as_str().unwrap().to_owned(),
                r["online"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Send a join and return the frame that follows its ack.
async fn join_then_next(client: &mut Client, room: &str, id: u64) -> Value {
    client
        .send_json(json!({"op": "join", "room": room, "id": id}))
        .await;
    loop {
        let frame = client.recv_any_json().await;
        if frame["op"] == "ack" && frame["id"] == id {
            return client.recv_any_json().await;
        }
        assert_eq!(frame["op"], "presence", "before the ack: {frame}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counts_add_up_across_nodes_in_presence_frames_and_the_api() {
    let began = Instant::now();
    let redis = Redis::start().await;
    let a = redis_node(&redis, "a", "100ms").await;
    let b = redis_node(&redis, "b", "100ms").await;

    // A room in the URL: `welcome`, then the room's count.
    let (mut on_a, _) = Client::json(&a, &["r1"]).await;
    assert_eq!(
        on_a.presence().await,
        json!({"op": "presence", "room": "r1", "online": 1})
    );
    // A join: the frame right after the ack is the count.
    let (mut on_b, _) = Client::json(&b, &[]).await;
    let after_ack = join_then_next(&mut on_b, "r1", 1).await;
    assert_eq!(after_ack["op"], "presence", "{after_ack}");
    assert_eq!(after_ack["room"], "r1");
    // Both see 2 once the nodes have read each other's reports.
    on_a.presence_until("r1", 2).await;
    on_b.presence_until("r1", 2).await;
    for node in [&a, &b] {
        until_online(node.addr, "r1", 2).await;
        let room = room_at(node.addr, "r1").await;
        assert_eq!(
            (room["room"].as_str(), room["nodes"].as_u64()),
            (Some("r1"), Some(2))
        );
    }
    assert_eq!(a.metric("roomcast_presence_nodes").await, 2.0);
    assert!(a.metric("roomcast_presence_reports_total").await >= 1.0);
    assert_eq!(
        a.metric("roomcast_presence_report_failures_total").await,
        0.0
    );

    // Watch time: two viewers, reported every interval, across nodes.
    eventually("watch time to be reported", || async {
        room_at(a.addr, "r1").await["watch_seconds"].as_f64() > Some(0.0)
    })
    .await;
    let watched = room_at(b.addr, "r1").await["watch_seconds"]
        .as_f64()
        .unwrap();
    // At most both viewers for the whole test (a report counts the
    // viewers it sees for the whole interval before it).
    let most = 2.0 * (began.elapsed() + INTERVAL).as_secs_f64();
    assert!(watched > 0.0 && watched < most, "{watched}");
    let ttl: i64 = redis.cmd(&["PTTL", "{roomcast:room:r1}:watch"]).await;
    assert!(ttl > 23 * 3600 * 1000 && ttl <= 24 * 3600 * 1000, "{ttl}");

    // A leave: 1 everywhere, in frames and the API.
    let (ack, _) = on_b.request(json!({"op": "leave", "room": "r1"}), 2).await;
    assert_eq!(ack["op"], "ack");
    on_a.presence_until("r1", 1).await;
    for node in [&a, &b] {
        until_online(node.addr, "r1", 1).await;
    }
    assert_eq!(room_at(b.addr, "r1").await["nodes"], 1);
    // A room no one is in is 0, not an error.
    assert_eq!(
        room_at(a.addr, "nobody").await,
        json!({"room": "nobody", "online": 0, "watch_seconds": 0.0, "nodes": 0})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_joins_makes_few_presence_frames_and_the_last_is_right() {
    const THROTTLE: Duration = Duration::from_secs(1);
    let redis = Redis::start().await;
    let a = redis_node(&redis, "a", "1s").await;
    let b = redis_node(&redis, "b", "1s").await;
    let (mut watcher, _) = Client::json(&a, &["burst"]).await;
    let (_other, _) = Client::json(&a, &["burst"]).await;
    // Settled at 2: after this, a frame is sent only for a change.
    watcher.presence_until("burst", 2).await;

    let start = Instant::now();
    let mut burst = Vec::new();
    for i in 0..20 {
        let node = if i % 2 == 0 { &a } else { &b };
        burst.push(Client::json(node, &["burst"]).await.0);
    }
    let frames = watcher.presence_until("burst", 22).await;
    let took = start.elapsed();
    // Frames are a throttle apart, and none came before the burst began.
    let most = 1 + (took.as_secs_f64() / THROTTLE.as_secs_f64()) as usize;
    assert!(
        frames.len() <= most,
        "{} frames in {took:?} with a {THROTTLE:?} throttle: {frames:?}",
        frames.len()
    );
    until_online(a.addr, "burst", 22).await;
    until_online(b.addr, "burst", 22).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_drops_out_of_every_count_within_two_report_intervals() {
    let redis = Redis::start().await;
    let a = redis_node(&redis, "a", "100ms").await;
    let url = redis.url();
    let (mut killed, k) = start_binary(
        &[
            ("ROOMCAST__BUS__KIND", "redis"),
            ("ROOMCAST__BUS__REDIS__URL", &url),
            ("ROOMCAST__NODE__ID", "k"),
            ("ROOMCAST__PRESENCE__REPORT_INTERVAL", INTERVAL_SETTING),
            ("ROOMCAST__PRESENCE__THROTTLE", "100ms"),
        ],
        Stdio::null,
    )
    .await;
    let mut on_k = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(&format!("ws://{k}/ws?room=r")).await;
        assert_eq!(c.recv_json().await["op"], "welcome");
        on_k.push(c);
    }
    let (mut viewer, _) = Client::json(&a, &["r"]).await;
    viewer.presence_until("r", 3).await;
    until_online(a.addr, "r", 3).await;

    let killed_at = Instant::now();
    killed.signal("KILL");
    killed.exited("the killed node to exit").await;
    // Polled as often as a request allows: the slack is that period only.
    let gone = within("the dead node's viewers to drop out", async {
        loop {
            if online_at(a.addr, "r").await == 1 {
                return killed_at.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let slack = Duration::from_millis(50);
    eprintln!(
        "killed node's viewers dropped out of the API after {gone:?} (bound {:?})",
        INTERVAL * 2
    );
    assert!(
        gone <= INTERVAL * 2 + slack,
        "the dead node counted for {gone:?}, more than two report intervals ({:?})",
        INTERVAL * 2
    );
    viewer.presence_until("r", 1).await;
    let framed = killed_at.elapsed();
    eprintln!("…and out of the viewer's presence frame after {framed:?}");
    assert!(
        framed <= INTERVAL * 2 + Duration::from_millis(100) + slack,
        "{framed:?}"
    );
    // The reader removed the dead node's keys too.
    let score: Option<String> = redis
        .cmd(&["ZSCORE", "{roomcast:presence}:nodes", "k"])
        .await;
    assert_eq!(score, None);
    let hash: i64 = redis.cmd(&["EXISTS", "{roomcast:presence}:node:k"]).await;
    assert_eq!(hash, 0);
    assert_eq!(a.metric("roomcast_presence_nodes").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_shutting_down_removes_its_counts_at_once() {
    let redis = Redis::start().await;
    let drain = [("ROOMCAST__SHUTDOWN__DRAIN", "0s")];
    let mut a = Node::ready(redis_config(
        &redis,
        "a",
        &[presence("100ms").as_slice(), &drain].concat(),
    ))
    .await;
    let b = redis_node(&redis, "b", "100ms").await;
    let mut on_a = Vec::new();
    for _ in 0..2 {
        on_a.push(Client::json(&a, &["r"]).await.0);
    }
    let (mut on_b, _) = Client::json(&b, &["r"]).await;
    on_b.presence_until("r", 3).await;

    a.begin_shutdown();
    a.finished().await;
    let finished = Instant::now();
    // Gone from Redis by the time the node has stopped, not when it goes stale.
    let score: Option<String> = redis
        .cmd(&["ZSCORE", "{roomcast:presence}:nodes", "a"])
        .await;
    assert_eq!(score, None, "a is still in the node set");
    let hash: i64 = redis.cmd(&["EXISTS", "{roomcast:presence}:node:a"]).await;
    assert_eq!(hash, 0);
    until_online(b.addr, "r", 1).await;
    // About one read of b's (a quarter interval), well within a's staleness
    // (1.5 intervals; the Redis checks above are what tell the two apart).
    let seen = finished.elapsed();
    assert!(seen < INTERVAL, "{seen:?}");
    on_b.presence_until("r", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_on_the_memory_bus_shows_the_same_frames_and_api() {
    let node = Node::ready(config(&presence("100ms"))).await;
    let (mut first, _) = Client::json(&node, &["solo"]).await;
    assert_eq!(
        first.presence().await,
        json!({"op": "presence", "room": "solo", "online": 1})
    );
    let (mut second, _) = Client::json(&node, &[]).await;
    assert_eq!(
        join_then_next(&mut second, "solo", 1).await,
        json!({"op": "presence", "room": "solo", "online": 2})
    );
    first.presence_until("solo", 2).await;
    let room = room_at(node.addr, "solo").await;
    assert_eq!(
        (room["online"].as_u64(), room["nodes"].as_u64()),
        (Some(2), Some(1))
    );
    eventually("watch time on the memory bus", || async {
        room_at(node.addr, "solo").await["watch_seconds"].as_f64() > Some(0.0)
    })
    .await;
    assert_eq!(busiest(&node, "").await, [("solo".to_owned(), 2)]);
    let (ack, _) = second
        .request(json!({"op": "leave", "room": "solo"}), 2)
        .await;
    assert_eq!(ack["op"], "ack");
    first.presence_until("solo", 1).await;
    assert_eq!(online_at(node.addr, "solo").await, 1);
    assert_eq!(node.metric("roomcast_presence_nodes").await, 1.0);
    // A raw client counts, but gets no presence frames (raw mode has no envelopes).
    let mut raw = Client::raw(&node, "solo").await;
    first.presence_until("solo", 2).await;
    raw.send(tokio_tungstenite::tungstenite::Message::text("hi"))
        .await;
    match raw.recv().await {
        tokio_tungstenite::tungstenite::Message::Text(t) => assert_eq!(t.as_str(), "hi"),
        other => panic!("expected the raw echo first, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rooms_api_lists_the_busiest_rooms_first_and_needs_a_key() {
    let redis = Redis::start().await;
    let a = redis_node(&redis, "a", "100ms").await;
    let b = redis_node(&redis, "b", "100ms").await;
    let mut clients = Vec::new();
    for (node, room) in [
        (&a, "live:a"),
        (&a, "live:a"),
        (&b, "live:a"),
        (&b, "live:b"),
        (&b, "live:c"),
        (&a, "live:c"),
        (&a, "other"),
        (&a, "other"),
        (&a, "other"),
        (&a, "other"),
    ] {
        clients.push(Client::json(node, &[room]).await.0);
    }
    until_online(b.addr, "other", 4).await;
    until_online(b.addr, "live:a", 3).await;
    let live = |rooms: &[(&str, u64)]| -> Vec<(String, u64)> {
        rooms.iter().map(|(r, n)| (r.to_string(), *n)).collect()
    };
    for node in [&a, &b] {
        eventually("every node to list the same rooms", || async {
            busiest(node, "prefix=live:").await
                == live(&[("live:a", 3), ("live:c", 2), ("live:b", 1)])
        })
        .await;
        assert_eq!(
            busiest(node, "prefix=live:&limit=2").await,
            live(&[("live:a", 3), ("live:c", 2)])
        );
        assert_eq!(busiest(node, "").await[0], ("other".to_owned(), 4));
        assert_eq!(busiest(node, "prefix=nothing").await, []);
    }
    assert_eq!(
        room_at(a.addr, "live%3Aa").await["nodes"],
        2,
        "percent-encoded"
    );

    for query in ["limit=1001", "limit=0", "limit=many", "prefix=bad%20prefix"] {
        let (status, body) = a.get(&format!("/api/rooms?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "bad_request", "{query}");
    }
    let (status, body) = a.get("/api/rooms/bad%20room").await;
    assert_eq!(status, 400);
    assert!(body.contains("bad_room"), "{body}");
    for (method, path) in [("POST", "/api/rooms"), ("DELETE", "/api/rooms/live:a")] {
        let (status, _) = a.request(method, path, "").await;
        assert_eq!(status, 405, "{method} {path}");
    }
    // Without the API key: 401, for the list and for one room.
    for path in ["/api/rooms", "/api/rooms/live:a"] {
        let (status, body) = http_with(a.addr, "GET", path, "", "").await;
        assert_eq!(status, 401, "{path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "unauthorized");
    }
}
