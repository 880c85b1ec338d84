//! History rooms: every message gets a per-room `seq` in an `epoch`, and a
//! client that reconnects — to any node — with `since` gets exactly what it
//! missed, then live messages, with no gap and no duplicate at the seam.
//! Real redis-server, several nodes.

use serde_json::{json, Value};

use crate::util::*;

/// `h:` rooms keep their last 100 messages, `s:` rooms their last 5, `t:`
/// rooms theirs for a second after the last one.
pub const HISTORY_TOML: &str = r#"
[[namespaces]]
prefix = "h:"
messages_per_second = 2000
messages_burst = 2000
history = { size = 100, ttl = "5m" }

[[namespaces]]
prefix = "s:"
history = { size = 5, ttl = "5m" }

[[namespaces]]
prefix = "t:"
history = { size = 100, ttl = "1s" }
"#;

/// A node on `redis` with the history namespaces.
pub fn history_config(redis: &Redis, node: &str) -> roomcast::Config {
    let env = redis_env(redis, node);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    file_config(HISTORY_TOML, &env)
}

/// The `msg` frames `c` receives (other frames are skipped) until one
/// with `seq` `last`; fails on a message past it.
pub async fn msgs_until(c: &mut Client, last: u64) -> Vec<Value> {
    let mut msgs = Vec::new();
    loop {
        let f = c.recv_json().await;
        if f["op"] != "msg" {
            continue;
        }
        let seq = f["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("a msg without seq: {f}"));
        assert!(seq <= last, "got seq {seq}, expected none past {last}: {f}");
        msgs.push(f);
        if seq == last {
            return msgs;
        }
    }
}

fn seqs(msgs: &[Value]) -> Vec<u64> {
    msgs.iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

/// Publish `data` to `room` through `node`'s API; the assigned seq.
async fn publish(node: &Node, room: &str, data: Value) -> u64 {
    let body = json!({"room": room, "event": "c", "data": data}).to_string();
    let (status, reply) = http(node.addr, "POST", "/api/publish", &body).await;
    assert_eq!(status, 200, "{reply}");
    let reply: Value = serde_json::from_str(&reply).expect("JSON reply");
    reply["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no seq in {reply}"))
}

/// The epoch a join's ack names.
async fn joined_epoch(c: &mut Client) -> String {
    join_ack(c).await["epoch"]
        .as_str()
        .expect("epoch")
        .to_owned()
}

/// The ack of a join (after the welcome, for a URL join), skipping presence.
async fn join_ack(c: &mut Client) -> Value {
    loop {
        let f = c.recv_json().await;
        if f["op"] == "ack" {
            return f;
        }
        assert_ne!(f["op"], "msg", "a message before the join's ack: {f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reconnects_elsewhere_with_since_gets_exactly_what_it_missed_then_live() {
    let redis = Redis::start().await;
    let a = Node::ready(history_config(&redis, "a")).await;
    let b = Node::ready(history_config(&redis, "b")).await;

    let (mut viewer, _) = Client::json(&a, &[]).await;
    let (ack, _) = viewer
        .request(json!({"op": "join", "room": "h:live"}), 1)
        .await;
    assert_eq!(
        (
            ack["op"].as_str(),
            ack["room"].as_str(),
            ack["seq"].as_u64()
        ),
        (Some("ack"), Some("h:live"), Some(0)),
        "{ack}"
    );
    let epoch = ack["epoch"].as_str().expect("epoch").to_owned();
    assert!(
        ack.get("recovered").is_none(),
        "no since, no recovered: {ack}"
    );

    // A sender on the other node: each send's ack carries its seq.
    let (mut sender, _) = Client::json(&b, &["h:live"]).await;
    assert_eq!(join_ack(&mut sender).await["epoch"], epoch.as_str());
    for i in 1..=3u64 {
        let (ack, _) = sender
            .request(send_frame("h:live", "danmaku", json!(i)), 100 + i)
            .await;
        assert_eq!(
            (ack["op"].as_str(), ack["seq"].as_u64()),
            (Some("ack"), Some(i)),
            "{ack}"
        );
    }
    let got = msgs_until(&mut viewer, 3).await;
    assert_eq!(seqs(&got), [1, 2, 3]);
    assert!(got.iter().all(|m| m["epoch"] == epoch.as_str()));
    viewer.close().await;

    // What it misses while away.
    for i in 4..=10u64 {
        assert_eq!(publish(&a, "h:live", json!(i)).await, i);
    }

    // Back, on the other node, with `since` in the connect URL.
    let mut back = Client::connect(&b.ws_url(&format!("since=h:live:3:{epoch}"))).await;
    assert_eq!(back.recv_json().await["op"], "welcome");
    let ack = join_ack(&mut back).await;
    assert_eq!(
        (
            ack["recovered"].as_bool(),
            ack["seq"].as_u64(),
            ack["epoch"].as_str()
        ),
        (Some(true), Some(10), Some(epoch.as_str())),
        "{ack}"
    );
    let replay = msgs_until(&mut back, 10).await;
    assert_eq!(seqs(&replay), (4..=10).collect::<Vec<_>>());
    let data: Vec<u64> = replay.iter().map(|m| m["data"].as_u64().unwrap()).collect();
    assert_eq!(data, (4..=10).collect::<Vec<_>>());
    // Then live, with nothing doubled at the seam.
    let (ack, _) = sender
        .request(send_frame("h:live", "danmaku", json!(11)), 200)
        .await;
    assert_eq!(ack["seq"], 11);
    assert_eq!(seqs(&msgs_until(&mut back, 11).await), [11]);

    // The same with the join op, on the first node.
    let (mut again, _) = Client::json(&a, &[]).await;
    let join = json!({"op": "join", "room": "h:live", "since": {"seq": 8, "epoch": epoch}});
    let (ack, _) = again.request(join, 5).await;
    assert_eq!(
        (ack["recovered"].as_bool(), ack["seq"].as_u64()),
        (Some(true), Some(11)),
        "{ack}"
    );
    assert_eq!(seqs(&msgs_until(&mut again, 11).await), [9, 10, 11]);

    // A viewer entering the room asks for the last messages.
    let (mut late, _) = Client::json(&b, &[]).await;
    let (ack, _) = late
        .request(json!({"op": "join", "room": "h:live", "history": 4}), 6)
        .await;
    assert_eq!(ack["seq"], 11);
    assert_eq!(seqs(&msgs_until(&mut late, 11).await), [8, 9, 10, 11]);
    assert_eq!(
        a.metric("roomcast_history_joins_total{outcome=\"recovered\"}")
            .await,
        1.0
    );
}

/// Joins with `since` on one node while another publishes as fast as it
/// can: each joiner gets every seq after its point exactly once, in order,
/// whether a message was in history, in flight on the bus, or live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_has_no_gap_and_no_duplicate_while_messages_are_published_during_the_replay() {
    const TOTAL: u64 = 400;
    let redis = Redis::start().await;
    let a = Node::ready(history_config(&redis, "a")).await;
    let b = Node::ready(history_config(&redis, "b")).await;
    let (mut publisher, _) = Client::json(&a, &["h:seam"]).await;
    let epoch = joined_epoch(&mut publisher).await;
    let published = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = published.clone();
    let sending = tokio::spawn(async move {
        // Pipelined: up to 8 sends in flight, acked in order.
        let mut acked = 0;
        for i in 1..=TOTAL {
            publisher
                .send_json(
                    json!({"op": "send", "room": "h:seam", "event": "n", "data": i, "id": i}),
                )
                .await;
            while acked + 8 < i {
                let f = publisher.recv_json().await;
                if f["op"] == "ack" {
                    acked += 1;
                    done.store(acked, std::sync::atomic::Ordering::Release);
                }
                assert_ne!(f["op"], "error", "{f}");
            }
        }
        while acked < TOTAL {
            let f = publisher.recv_json().await;
            if f["op"] == "ack" {
                acked += 1;
                done.store(acked, std::sync::atomic::Ordering::Release);
            }
        }
    });
    // Joiners on the other node, at points behind the stream, while it flows.
    let mut joiners = Vec::new();
    for k in 0..12u64 {
        let (mut c, _) = Client::json(&b, &[]).await;
        let now = published.load(std::sync::atomic::Ordering::Acquire);
        let since = now.saturating_sub(k * 3);
        let join = match k % 3 {
            2 => json!({"op": "join", "room": "h:seam"}),
            _ => json!({"op": "join", "room": "h:seam", "since": {"seq": since, "epoch": epoch}}),
        };
        c.send_json({
            let mut j = join;
            j["id"] = 1.into();
            j
        })
        .await;
        joiners.push((k, since, c));
    }
    sending.await.expect("publisher");
    for (k, since, mut c) in joiners {
        let ack = join_ack(&mut c).await;
        let from = match k % 3 {
            2 => ack["seq"].as_u64().expect("seq"),
            _ => {
                assert_eq!(ack["recovered"], true, "joiner {k}: {ack}");
                since
            }
        };
        let msgs = if from == TOTAL {
            Vec::new()
        } else {
            msgs_until(&mut c, TOTAL).await
        };
        // One publisher, pipelined: its messages got their seqs in the order sent.
        assert!(
            msgs.iter().all(|m| m["data"] == m["seq"]),
            "joiner {k}: out of order"
        );
        let got = seqs(&msgs);
        assert_eq!(
            got,
            (from + 1..=TOTAL).collect::<Vec<_>>(),
            "joiner {k} from {from}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_since_that_history_cannot_serve_is_answered_not_recovered_and_replays_nothing() {
    let redis = Redis::start().await;
    let node = Node::ready(history_config(&redis, "a")).await;
    // (since, recovered, what comes before the next live message): `s:`
    // rooms keep 5 messages, so after 10 the kept ones are 6..=10.
    let cases: [(Option<u64>, bool, Vec<u64>); 5] = [
        (Some(2), false, vec![]),
        (None, false, vec![]),
        (Some(50), false, vec![]),
        (Some(5), true, (6..=10).collect()),
        (Some(10), true, vec![]),
    ];
    for (n, (since, recovered, replay)) in cases.into_iter().enumerate() {
        let room = format!("s:case{n}");
        for i in 1..=10u64 {
            assert_eq!(publish(&node, &room, json!(i)).await, i);
        }
        let (mut probe, _) = Client::json(&node, &[]).await;
        let (ack, _) = probe.request(json!({"op": "join", "room": room}), 1).await;
        let epoch = ack["epoch"].as_str().expect("epoch").to_owned();
        probe.close().await;
        // `None`: the right seq, of another epoch.
        let since = match since {
            Some(seq) => json!({"seq": seq, "epoch": epoch}),
            None => json!({"seq": 10, "epoch": "another-epoch"}),
        };
        let (mut c, _) = Client::json(&node, &[]).await;
        let (ack, _) = c
            .request(json!({"op": "join", "room": room, "since": since}), 1)
            .await;
        assert_eq!(
            (ack["recovered"].as_bool(), ack["seq"].as_u64()),
            (Some(recovered), Some(10)),
            "case {n}: {ack}"
        );
        let live = publish(&node, &room, json!("live")).await;
        let mut want = replay;
        want.push(live);
        assert_eq!(seqs(&msgs_until(&mut c, live).await), want, "case {n}");
    }
    assert_eq!(
        node.metric("roomcast_history_joins_total{outcome=\"not_recovered\"}")
            .await,
        3.0
    );

    // `since` and `history` are for history rooms only: a clear refusal elsewhere.
    let since = json!({"seq": 1, "epoch": "e"});
    let (mut c, _) = Client::json(&node, &[]).await;
    let (err, _) = c
        .request(json!({"op": "join", "room": "plain", "since": since}), 2)
        .await;
    assert_eq!(
        (err["op"].as_str(), err["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{err}"
    );
    let both = json!({"op": "join", "room": "s:case0", "since": since, "history": 2});
    let (err, _) = c.request(both, 3).await;
    assert_eq!(err["code"], "bad_frame", "{err}");
    match tokio_tungstenite::connect_async(node.ws_url("since=plain:1:e")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 400);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
            assert!(body.contains("bad_request"), "{body}");
        }
        other => panic!("a since for a room without history must be refused: {other:?}"),
    }
}

/// A backend that publishes straight into Redis calls the shipped script
/// (the one the nodes run): the message gets the room's next seq, is
/// delivered, and is in history like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_publishes_into_a_history_room_with_the_shipped_script() {
    let redis = Redis::start().await;
    let node = Node::ready(history_config(&redis, "a")).await;
    let (mut viewer, _) = Client::json(&node, &["h:shop"]).await;
    let epoch = joined_epoch(&mut viewer).await;
    let script = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/redis/history-publish.lua"
    ))
    .expect("read the script");
    let sha: String = redis.cmd(&["SCRIPT", "LOAD", &script]).await;
    // The call a backend makes for room h:shop (size 100, ttl 5 min).
    let call = |envelope| {
        let keys = ["{roomcast:room:h:shop}:meta", "{roomcast:room:h:shop}:hist"];
        let args = ["roomcast:room:h:shop", envelope, "100", "300000"];
        let mut cmd = vec!["EVALSHA", sha.as_str(), "2"];
        cmd.extend(keys.into_iter().chain(args));
        cmd
    };
    let gift = r#"{"event":"gift","from":"shop","data":{"gift":"rocket"}}"#;
    let (seq, script_epoch, receivers): (u64, String, i64) = redis.cmd(&call(gift)).await;
    assert_eq!(
        (seq, script_epoch.as_str(), receivers),
        (1, epoch.as_str(), 1)
    );
    let got = msgs_until(&mut viewer, 1).await;
    assert_eq!(
        (
            got[0]["event"].as_str(),
            got[0]["from"].as_str(),
            got[0]["data"]["gift"].as_str()
        ),
        (Some("gift"), Some("shop"), Some("rocket"))
    );
    // The API takes the next seq; a recovering client gets both.
    assert_eq!(publish(&node, "h:shop", json!("api")).await, 2);
    let (mut back, _) = Client::json(&node, &[]).await;
    let join = json!({"op": "join", "room": "h:shop", "since": {"seq": 0, "epoch": epoch}});
    let (ack, _) = back.request(join, 1).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let replay = msgs_until(&mut back, 2).await;
    assert_eq!(
        (replay[0]["event"].as_str(), replay[1]["data"].as_str()),
        (Some("gift"), Some("api"))
    );
    // Anything but a JSON object is refused by the script itself.
    let err = redis
        .try_cmd::<redis::Value>(&call("not json"))
        .await
        .expect_err("a non-object envelope");
    assert!(err.to_string().contains("must be a JSON object"), "{err}");
}

/// The epoch names one unbroken history: when Redis loses it (a flush) or
/// it expires (`ttl` after the room's last message), the room starts over
/// with a new epoch and seq 1, and an old `since` is not recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_or_expired_history_starts_a_new_epoch() {
    let redis = Redis::start().await;
    let node = Node::ready(history_config(&redis, "a")).await;
    for (room, lose) in [("h:flushed", "flush"), ("t:expired", "expire")] {
        let (mut viewer, _) = Client::json(&node, &[room]).await;
        let first = joined_epoch(&mut viewer).await;
        assert_eq!(publish(&node, room, json!(1)).await, 1);
        assert_eq!(publish(&node, room, json!(2)).await, 2);
        assert_eq!(seqs(&msgs_until(&mut viewer, 2).await), [1, 2]);
        let meta = format!("{{roomcast:room:{room}}}:meta");
        match lose {
            "flush" => redis.cmd::<()>(&["FLUSHALL"]).await,
            _ => {
                eventually("the room's history to expire", || async {
                    redis.cmd::<i64>(&["EXISTS", &meta]).await == 0
                })
                .await
            }
        }
        // The same client, still connected, sees the room start over.
        assert_eq!(publish(&node, room, json!(3)).await, 1, "{lose}");
        let m = msgs_until(&mut viewer, 1).await;
        assert_ne!(m[0]["epoch"], first.as_str(), "{lose}: a new epoch");
        let (mut back, _) = Client::json(&node, &[]).await;
        let join = json!({"op": "join", "room": room, "since": {"seq": 2, "epoch": first}});
        let (ack, _) = back.request(join, 1).await;
        assert_eq!(
            (ack["recovered"].as_bool(), ack["seq"].as_u64()),
            (Some(false), Some(1)),
            "{lose}: {ack}"
        );
    }
}

/// The shipped starting point for live rooms loads, and its `live:` rooms
/// keep history (here on the memory bus: one node, no Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_live_config_keeps_history_in_live_rooms() {
    let path = std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/config/live.toml"));
    let env = [
        ("ROOMCAST__SERVER__LISTEN", "127.0.0.1:0"),
        ("ROOMCAST__API__KEYS", TEST_API_KEY),
    ];
    let config =
        roomcast::Config::load(Some(path), env.map(|(k, v)| (k.to_string(), v.to_string())))
            .unwrap_or_else(|e| panic!("config/live.toml: {e}"));
    let node = Node::ready(config).await;
    let (mut viewer, _) = Client::json(&node, &["live:42"]).await;
    let epoch = joined_epoch(&mut viewer).await;
    assert_eq!(publish(&node, "live:42", json!("gift")).await, 1);
    let got = msgs_until(&mut viewer, 1).await;
    assert_eq!(got[0]["epoch"], epoch.as_str());
    // Anonymous viewers watch: sending is for signed-in users.
    let (err, _) = viewer
        .request(send_frame("live:42", "danmaku", json!("hi")), 1)
        .await;
    assert_eq!(err["code"], "forbidden", "{err}");
}
