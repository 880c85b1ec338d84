//! Redis goes away, freezes and comes back: WebSocket clients never notice
//! but for `unavailable` / `unconfirmed` while it is gone, and every reply
//! keeps its promise (docs/protocol.md, "What an ack and an error mean").

use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

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
async fn while_redis_is_down_joins_are_refused_and_succeed_once_it_is_back() {
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
    // A handshake with rooms would promise messages it cannot deliver: 503.
    match tokio_tungstenite::connect_async(node.ws_url("room=early")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string();
            assert_eq!(resp.status(), 503, "{body}");
            assert!(body.contains(r#""code":"unavailable""#), "{body}");
        }
        other => panic!(
            "a handshake with rooms while the bus is down: {:?}",
            other.map(|_| ())
        ),
    }
    // Without rooms the client connects; a join is refused and not carried out.
    let (mut c, _) = Client::json(&node, &[]).await;
    let (reply, _) = c.request(json!({"op":"join","room":"early"}), 1).await;
    assert_eq!(
        (reply["op"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("unavailable"))
    );
    let (reply, _) = c.request(send_frame("early", "comment", json!(0)), 2).await;
    assert_eq!(
        reply["code"], "not_joined",
        "the refused join left no membership"
    );

    let redis = Redis::start_on(port).await;
    node.wait_ready(200).await;
    let (ack, _) = c.request(json!({"op":"join","room":"early"}), 3).await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(redis.numsub("early").await, 1);
    let (ack, before) = c.request(send_frame("early", "comment", json!(1)), 4).await;
    assert_eq!(ack["op"], "ack");
    // The echo may arrive before or after the ack.
    let echo = match before.into_iter().next() {
        Some(f) => f,
        None => c.recv_json().await,
    };
    assert_eq!(echo["data"], 1);
    let (mut late, _) = Client::json(&node, &["early"]).await;
    assert_eq!(
        node.request("POST", "/api/publish", r#"{"room":"early","event":"e"}"#)
            .await
            .0,
        200
    );
    assert_eq!(late.recv_json().await["event"], "e");
}

/// A client that sends `send` frames without waiting for their replies, and
/// the replies by id.
struct Pipelined {
    sent: u64,
    replies: std::sync::Arc<parking_lot::Mutex<std::collections::HashMap<u64, String>>>,
    sink: futures::stream::SplitSink<Ws, Message>,
    reader: tokio::task::JoinHandle<()>,
}

impl Pipelined {
    fn new(client: Client) -> Pipelined {
        use futures::StreamExt;
        let (sink, mut stream) = client.ws.split();
        let replies =
            std::sync::Arc::new(parking_lot::Mutex::new(std::collections::HashMap::new()));
        let r = replies.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                let Ok(text) = m.to_text() else { continue };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
                    continue;
                };
                let Some(id) = v["id"].as_u64() else { continue };
                let outcome = match v["op"].as_str() {
                    Some("ack") => "ack".to_string(),
                    _ => v["code"].as_str().unwrap_or("?").to_string(),
                };
                r.lock().insert(id, outcome);
            }
        });
        Pipelined {
            sent: 0,
            replies,
            sink,
            reader,
        }
    }

    async fn send(&mut self, room: &str) -> u64 {
        use futures::SinkExt;
        self.sent += 1;
        let mut frame = send_frame(room, "n", json!(self.sent));
        frame["id"] = self.sent.into();
        within("send", self.sink.send(Message::text(frame.to_string())))
            .await
            .expect("send");
        self.sent
    }

    fn outcome(&self, id: u64) -> Option<String> {
        self.replies.lock().get(&id).cloned()
    }

    async fn all_answered(&self) {
        eventually("every send to be answered", || async {
            self.replies.lock().len() as u64 == self.sent
        })
        .await;
    }
}

impl Drop for Pipelined {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Read `client` until the API marker arrives; the `data` numbers seen.
async fn received_until_marker(client: &mut Client) -> std::collections::HashSet<u64> {
    let mut got = std::collections::HashSet::new();
    loop {
        let f = client.recv_json().await;
        if f["event"] == "marker" {
            return got;
        }
        if let Some(n) = f["data"].as_u64() {
            got.insert(n);
        }
    }
}

/// The promise of an ack under a Redis freeze: every acked message reached
/// the other node's client, and no message answered `unavailable` did. The
/// receiving node notices the freeze first (shorter timeout) and drops its
/// subscription, so whatever Redis handles when it resumes reaches nobody:
/// the sender's replies for those come on a connection it has declared dead
/// and must not be acks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_freeze_every_acked_message_was_delivered_and_no_unavailable_one_was() {
    let redis = Redis::start().await;
    let common = [
        ("ROOMCAST__BUS__REDIS__PING_INTERVAL", "100ms"),
        ("ROOMCAST__LIMITS__MESSAGES_PER_SECOND", "0"),
    ];
    let with = |timeout: &'static str, backoff: &'static str| {
        let mut v = common.to_vec();
        v.push(("ROOMCAST__BUS__REDIS__TIMEOUT", timeout));
        v.push(("ROOMCAST__BUS__REDIS__BACKOFF_MIN", backoff));
        v.push(("ROOMCAST__BUS__REDIS__BACKOFF_MAX", backoff));
        v
    };
    // b gives up on the frozen Redis first and reconnects only seconds later,
    // so when Redis resumes nobody is subscribed to the room.
    let a = Node::ready(redis_config(&redis, "a", &with("1s", "50ms"))).await;
    let b = Node::ready(redis_config(&redis, "b", &with("300ms", "3s"))).await;
    let (sender, _) = Client::json(&a, &["r"]).await;
    let (mut receiver, _) = Client::json(&b, &["r"]).await;
    let mut sender = Pipelined::new(sender);

    for _ in 0..20 {
        sender.send("r").await;
    }
    sender.all_answered().await;
    redis.signal("STOP");
    // Keep sending while Redis is frozen, until node a declares it dead.
    let mut frozen_sends = 0;
    within("node a to notice the freeze", async {
        while a.get("/readyz").await.0 != 503 {
            sender.send("r").await;
            frozen_sends += 1;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    redis.signal("CONT");
    a.wait_ready(200).await;
    b.wait_ready(200).await;
    for _ in 0..20 {
        sender.send("r").await;
    }
    sender.all_answered().await;
    let marker = r#"{"room":"r","event":"marker"}"#;
    assert_eq!(a.request("POST", "/api/publish", marker).await.0, 200);
    let received = received_until_marker(&mut receiver).await;

    let mut counts = std::collections::BTreeMap::new();
    for id in 1..=sender.sent {
        let outcome = sender.outcome(id).expect("answered");
        match outcome.as_str() {
            "ack" => assert!(
                received.contains(&id),
                "message {id} was acked but never delivered"
            ),
            "unavailable" => assert!(
                !received.contains(&id),
                "message {id} was answered unavailable but delivered"
            ),
            "unconfirmed" => {}
            other => panic!("message {id}: unexpected reply {other}"),
        }
        *counts.entry(outcome).or_insert(0) += 1;
    }
    assert!(
        frozen_sends > 0 && counts.get("ack").copied().unwrap_or(0) >= 40,
        "{counts:?}"
    );
    assert!(
        counts.keys().any(|k| k != "ack"),
        "the freeze produced no failed send at all: {counts:?}"
    );
}

/// A publish whose reply is late (timeout after sending) has an unknown
/// outcome: `unconfirmed`, never `unavailable` — here the other node's
/// client does receive it once Redis resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_timed_out_after_sending_is_unconfirmed_not_unavailable() {
    let redis = Redis::start().await;
    let a = Node::ready(redis_config(
        &redis,
        "a",
        &[
            ("ROOMCAST__BUS__REDIS__TIMEOUT", "300ms"),
            ("ROOMCAST__BUS__REDIS__PING_INTERVAL", "1m"),
        ],
    ))
    .await;
    let b = Node::ready(redis_config(
        &redis,
        "b",
        &[("ROOMCAST__BUS__REDIS__PING_INTERVAL", "1m")],
    ))
    .await;
    let (mut sender, _) = Client::json(&a, &["r"]).await;
    let (mut receiver, _) = Client::json(&b, &["r"]).await;

    redis.signal("STOP");
    let (reply, _) = sender.request(send_frame("r", "n", json!(7)), 1).await;
    redis.signal("CONT");
    assert_eq!(
        (reply["op"].as_str(), reply["code"].as_str()),
        (Some("error"), Some("unconfirmed")),
        "{reply}"
    );
    let got = receiver.recv_json().await;
    assert_eq!(
        got["data"], 7,
        "the unconfirmed message was delivered after all"
    );
    // The HTTP API says the same with 504.
    redis.signal("STOP");
    let (status, body) = a
        .request("POST", "/api/publish", r#"{"room":"r","event":"e"}"#)
        .await;
    redis.signal("CONT");
    assert_eq!(status, 504, "{body}");
    assert!(body.contains(r#""code":"unconfirmed""#), "{body}");
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
    assert_eq!(
        reply["code"], "unavailable",
        "the bus was already declared down"
    );
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
