//! Fan-out on several workers (`fanout.workers` > 1): every client gets
//! every message of its rooms exactly once, and the messages of a room in
//! the same order as every other member of the room, whichever worker
//! writes to it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_four_workers_every_viewer_gets_each_message_once_in_the_rooms_order() {
    // A flood: not beside a Redis-fault test, whose timing it would stretch.
    let _alone = REDIS_FAULTS.lock().await;
    let node = Node::ready(config(&[
        ("ROOMCAST__FANOUT__WORKERS", "4"),
        ("ROOMCAST__LIMITS__MESSAGES_PER_SECOND", "0"),
    ]))
    .await;
    assert_eq!(node.metric("roomcast_fanout_workers").await, 4.0);
    const ROOMS: usize = 3;
    const PUBLISHERS: usize = 2;
    const MESSAGES: u64 = 40;
    const VIEWERS: usize = 30;
    let rooms: Vec<String> = (0..ROOMS).map(|r| format!("fan{r}")).collect();
    // Viewer v is in rooms v % ROOMS and (v + 1) % ROOMS; viewers never send.
    let mut viewers = Vec::new();
    for v in 0..VIEWERS {
        let mine = [&rooms[v % ROOMS], &rooms[(v + 1) % ROOMS]];
        let (c, _) = Client::json(&node, &[mine[0].as_str(), mine[1].as_str()]).await;
        viewers.push((c, mine.map(|r| r.clone())));
    }
    let mut publishers = Vec::new();
    for room in &rooms {
        for _ in 0..PUBLISHERS {
            publishers.push((Client::json(&node, &[room.as_str()]).await.0, room.clone()));
        }
    }
    // All publishers at once, interleaved: n = 1..=MESSAGES each.
    let sends = publishers
        .iter_mut()
        .enumerate()
        .map(|(p, (client, room))| async move {
            for n in 1..=MESSAGES {
                let frame = send_frame(room, "danmaku", json!({"p": p, "n": n}));
                client.send_json(frame).await;
            }
        });
    futures::future::join_all(sends).await;
    // What each viewer got, per room: (publisher, n) in arrival order.
    let expected = PUBLISHERS as u64 * MESSAGES;
    let mut orders: BTreeMap<String, Vec<Vec<(u64, u64)>>> = BTreeMap::new();
    for (viewer, mine) in viewers.iter_mut() {
        let mut got: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        while got.values().map(|v| v.len() as u64).sum::<u64>() < 2 * expected {
            let f = viewer.recv_json().await;
            if f["op"] != "msg" {
                continue;
            }
            let room = f["room"].as_str().expect("room").to_owned();
            assert!(
                mine.contains(&room),
                "a message of {room}, not a room of this viewer"
            );
            let key = (
                f["data"]["p"].as_u64().unwrap(),
                f["data"]["n"].as_u64().unwrap(),
            );
            got.entry(room).or_default().push(key);
        }
        for (room, seen) in got {
            // Each publisher's messages once each, in its order.
            let mut by_publisher: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
            for (p, n) in &seen {
                by_publisher.entry(*p).or_default().push(*n);
            }
            for (p, ns) in &by_publisher {
                assert_eq!(
                    ns,
                    &(1..=MESSAGES).collect::<Vec<_>>(),
                    "publisher {p} in {room}: each message once, in order"
                );
            }
            orders.entry(room).or_default().push(seen);
        }
    }
    // Every viewer of a room saw its messages in one and the same order.
    for (room, seen) in &orders {
        assert!(seen.len() >= 2, "{room} has several viewers");
        for other in &seen[1..] {
            assert_eq!(other, &seen[0], "{room}: the same order for every viewer");
        }
    }
    assert!(
        node.metric("roomcast_deliveries_total").await >= (VIEWERS as u64 * 2 * expected) as f64
    );
}

/// Two namespaces that coalesce: a plain one and one with history.
const COALESCE_TOML: &str = r#"
[[namespaces]]
prefix = "hot:"
coalesce = "30ms"

[[namespaces]]
prefix = "hoth:"
coalesce = "30ms"
history = { size = 100, ttl = "5m" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coalescing_room_delivers_everything_in_order_in_fewer_writes() {
    // A flood: not beside a Redis-fault test, whose timing it would stretch.
    let _alone = REDIS_FAULTS.lock().await;
    let node = Node::ready(file_config(
        COALESCE_TOML,
        &[("ROOMCAST__LIMITS__MESSAGES_PER_SECOND", "0")],
    ))
    .await;
    const MESSAGES: u64 = 30;
    for room in ["hot:a", "hoth:a"] {
        let (mut viewer, _) = Client::json(&node, &[room]).await;
        let (mut publisher, _) = Client::json(&node, &[room]).await;
        let before = node.metric("roomcast_coalesced_messages_total").await;
        let flushes = node.metric("roomcast_coalesce_flushes_total").await;
        // Sent back to back, without waiting for acks.
        for n in 1..=MESSAGES {
            publisher
                .send_json(send_frame(room, "danmaku", json!({ "n": n })))
                .await;
        }
        let mut got = Vec::new();
        let mut seqs = Vec::new();
        while got.len() < MESSAGES as usize {
            let f = viewer.recv_json().await;
            if f["op"] == "msg" {
                got.push(f["data"]["n"].as_u64().unwrap());
                seqs.extend(f["seq"].as_u64());
            }
        }
        assert_eq!(
            got,
            (1..=MESSAGES).collect::<Vec<_>>(),
            "{room}: each once, in order"
        );
        if room.starts_with("hoth:") {
            assert!(
                seqs.windows(2).all(|w| w[1] == w[0] + 1) && seqs.len() == MESSAGES as usize,
                "{room}: seqs without a gap: {seqs:?}"
            );
        }
        let held = node.metric("roomcast_coalesced_messages_total").await - before;
        let windows = node.metric("roomcast_coalesce_flushes_total").await - flushes;
        assert_eq!(
            held, MESSAGES as f64,
            "{room}: every message went through a window"
        );
        assert!(
            windows >= 1.0 && windows < MESSAGES as f64 / 2.0,
            "{room}: {MESSAGES} messages in {windows} windows"
        );
    }
    // A room of another namespace is not held.
    let (mut viewer, _) = Client::json(&node, &["cold"]).await;
    let (mut publisher, _) = Client::json(&node, &["cold"]).await;
    let windows = node.metric("roomcast_coalesce_flushes_total").await;
    publisher
        .send_json(send_frame("cold", "danmaku", json!({"n": 1})))
        .await;
    loop {
        if viewer.recv_json().await["op"] == "msg" {
            break;
        }
    }
    assert_eq!(
        node.metric("roomcast_coalesce_flushes_total").await,
        windows
    );
}

/// A namespace whose danmaku a lagging viewer may miss; gifts it may not.
const DROP_TOML: &str = r#"
[[namespaces]]
prefix = "big:"
droppable = ["danmaku"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_viewer_misses_danmaku_is_told_how_many_and_gets_every_gift() {
    // A flood: not beside a Redis-fault test, whose timing it would stretch.
    let _alone = REDIS_FAULTS.lock().await;
    use futures::{SinkExt, StreamExt};
    let node = Node::ready(file_config(
        DROP_TOML,
        &[
            ("ROOMCAST__LIMITS__MESSAGES_PER_SECOND", "0"),
            ("ROOMCAST__LIMITS__OUTBOUND_QUEUE_BYTES", "262144"),
        ],
    ))
    .await;
    // A viewer with a tiny receive window that reads nothing for now.
    let mut viewer =
        RawWs::connect_with(crate::abuse::small_window(), node.addr, "room=big:1", &[]).await;
    let (publisher, _) = Client::json(&node, &["big:1"]).await;
    let (mut sink, mut frames) = publisher.ws.split();
    // The publisher's replies by id: an ack, or an error (the node's queue
    // to the bus may be full under this flood: such a send is not published).
    let acked = Arc::new(Mutex::new(BTreeMap::<u64, bool>::new()));
    let replies = acked.clone();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = frames.next().await {
            let Message::Text(t) = frame else { continue };
            let f: serde_json::Value = serde_json::from_str(&t).unwrap_or_default();
            if let (Some(id), Some(op)) = (f["id"].as_u64(), f["op"].as_str()) {
                replies.lock().unwrap().insert(id, op == "ack");
            }
        }
    });
    // About 12 MB of danmaku, more than the kernel's buffers, with a gift
    // after every 100th (gift g has id GIFT + g).
    const DANMAKU: u64 = 1500;
    const GIFT: u64 = 100_000;
    let pad = "x".repeat(8000);
    let mut sent = 0;
    for i in 1..=DANMAKU {
        let mut frame = send_frame("big:1", "danmaku", json!({"i": i, "pad": pad}));
        frame["id"] = i.into();
        sink.send(Message::text(frame.to_string()))
            .await
            .expect("send");
        sent += 1;
        if i % 100 == 0 {
            let mut gift = send_frame("big:1", "gift", json!({ "g": i }));
            gift["id"] = (GIFT + i).into();
            sink.send(Message::text(gift.to_string()))
                .await
                .expect("send");
            sent += 1;
        }
    }
    eventually("a reply to every send", || async {
        acked.lock().unwrap().len() == sent
    })
    .await;
    // Then an end marker (a gift too), sent until it is taken.
    for attempt in 0.. {
        let id = 2 * GIFT + attempt;
        let mut end = send_frame("big:1", "gift", json!({"g": "end"}));
        end["id"] = id.into();
        sink.send(Message::text(end.to_string()))
            .await
            .expect("send");
        let reply = within("the end marker's reply", async {
            loop {
                if let Some(ok) = acked.lock().unwrap().get(&id).copied() {
                    return ok;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
        if reply {
            break;
        }
    }
    let acked = acked.lock().unwrap().clone();
    let taken = |id: u64| acked.get(&id) == Some(&true);
    let refused = acked.values().filter(|ok| !**ok).count();
    // Now it reads: never closed, every gift in order, the danmaku it got
    // in order, and the skipped ones counted exactly.
    let (mut gifts, mut danmaku, mut skipped) = (Vec::new(), Vec::new(), 0u64);
    loop {
        let (opcode, payload) = viewer.frame().await;
        assert_ne!(
            opcode,
            0x8,
            "closed: {:?}",
            String::from_utf8_lossy(&payload)
        );
        let f: serde_json::Value = serde_json::from_slice(&payload).expect("JSON");
        match (f["op"].as_str(), f["event"].as_str()) {
            (Some("skipped"), _) => {
                assert_eq!(f["room"], "big:1");
                skipped += f["count"].as_u64().expect("count");
            }
            (Some("msg"), Some("danmaku")) => danmaku.push(f["data"]["i"].as_u64().unwrap()),
            (Some("msg"), Some("gift")) => {
                if f["data"]["g"] == "end" {
                    break;
                }
                gifts.push(f["data"]["g"].as_u64().unwrap());
            }
            _ => {}
        }
    }
    let published_gifts: Vec<u64> = (1..=DANMAKU / 100)
        .map(|g| g * 100)
        .filter(|g| taken(GIFT + g))
        .collect();
    assert_eq!(gifts, published_gifts, "every gift, in order");
    assert!(danmaku.windows(2).all(|w| w[0] < w[1]), "danmaku in order");
    assert!(
        danmaku.iter().all(|i| taken(*i)),
        "only danmaku that were published"
    );
    let published = (1..=DANMAKU).filter(|i| taken(*i)).count() as u64;
    assert_eq!(
        danmaku.len() as u64 + skipped,
        published,
        "each published danmaku received or counted as skipped ({refused} sends refused)"
    );
    assert_eq!(
        node.metric("roomcast_messages_skipped_total").await,
        skipped as f64
    );
}
