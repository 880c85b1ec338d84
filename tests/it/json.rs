//! JSON mode end to end on one node (embedded bus).

use futures::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

#[tokio::test]
async fn clients_in_a_room_see_each_others_messages_including_their_own() {
    let node = Node::ready(config(&[])).await;
    let (mut a, a_id) = Client::json(&node, &["lobby"]).await;
    let (mut b, _) = Client::json(&node, &["lobby"]).await;

    let (reply, early) = a
        .request(
            send_frame(
                "lobby",
                "danmaku",
                json!({"text": "hello", "color": "#fff"}),
            ),
            9,
        )
        .await;
    assert_eq!(reply, json!({"op": "ack", "id": 9}));

    let mut got_a = early.into_iter().next();
    if got_a.is_none() {
        got_a = Some(a.recv_json().await);
    }
    for msg in [got_a.unwrap(), b.recv_json().await] {
        assert_eq!(msg["op"], "msg");
        assert_eq!(msg["room"], "lobby");
        assert_eq!(msg["event"], "danmaku");
        assert_eq!(msg["from"], a_id.as_str());
        assert_eq!(msg["data"], json!({"text": "hello", "color": "#fff"}));
        let ts = msg["ts"].as_u64().expect("ts is unix ms");
        assert!(
            ts > 1_600_000_000_000,
            "ts {ts} should be unix milliseconds"
        );
    }
}

#[tokio::test]
async fn welcome_names_the_connection_and_the_node() {
    let node = Node::ready(config(&[("ROOMCAST__NODE__ID", "edge-7")])).await;
    let mut c = Client::connect(&node.ws_url("room=r1")).await;
    let welcome = c.recv_json().await;
    assert_eq!(welcome["op"], "welcome");
    assert_eq!(welcome["node"], "edge-7");
    assert!(welcome["conn"].as_str().unwrap().starts_with("edge-7-"));
}

#[tokio::test]
async fn join_and_leave_decide_what_a_client_receives() {
    let node = Node::ready(config(&[])).await;
    let (mut a, _) = Client::json(&node, &[]).await;
    let (mut b, _) = Client::json(&node, &["r1", "r2"]).await;

    assert_eq!(
        a.request(json!({"op": "join", "room": "r1"}), 1).await.0,
        json!({"op":"ack","id":1})
    );
    b.request(send_frame("r1", "comment", json!("first")), 2)
        .await;
    assert_eq!(a.recv_json().await["data"], "first");

    assert_eq!(
        a.request(json!({"op": "leave", "room": "r1"}), 3).await.0,
        json!({"op":"ack","id":3})
    );
    assert_eq!(
        a.request(json!({"op": "join", "room": "r2"}), 4).await.0,
        json!({"op":"ack","id":4})
    );
    // Sent in this order; a must get only the r2 one.
    b.request(send_frame("r1", "comment", json!("not for a")), 5)
        .await;
    b.request(send_frame("r2", "comment", json!("for a")), 6)
        .await;
    let next = a.recv_json().await;
    assert_eq!(
        (next["room"].as_str(), next["data"].as_str()),
        (Some("r2"), Some("for a"))
    );
}

#[tokio::test]
async fn ping_op_answers_pong_with_the_id() {
    let node = Node::ready(config(&[])).await;
    let (mut c, _) = Client::json(&node, &[]).await;
    c.send_json(json!({"op": "ping", "id": 10})).await;
    assert_eq!(c.recv_json().await, json!({"op": "pong", "id": 10}));
}

#[tokio::test]
async fn bad_requests_get_error_frames_with_stable_codes_and_the_connection_stays_usable() {
    let node = Node::ready(config(&[(
        "ROOMCAST__LIMITS__MAX_ROOMS_PER_CONNECTION",
        "2",
    )]))
    .await;
    let (mut c, _) = Client::json(&node, &["r1"]).await;

    let error = |code: &str, id: Option<u64>| (code.to_string(), id);
    let check = |frame: serde_json::Value, expected: (String, Option<u64>)| {
        assert_eq!(frame["op"], "error", "{frame}");
        assert_eq!(frame["code"], expected.0.as_str(), "{frame}");
        assert_eq!(frame["id"].as_u64(), expected.1, "{frame}");
        assert!(
            frame["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{frame}"
        );
    };

    c.send(Message::text("this is not json")).await;
    check(c.recv_json().await, error("bad_frame", None));
    c.send(Message::text("[1,2,3]")).await;
    check(c.recv_json().await, error("bad_frame", None));
    c.send_json(json!({"room": "r1", "id": 1})).await;
    check(c.recv_json().await, error("bad_frame", Some(1)));
    c.send_json(json!({"op": "send", "room": "r1", "data": 1, "id": 2}))
        .await;
    check(c.recv_json().await, error("bad_frame", Some(2)));
    c.send(Message::binary(vec![1u8, 2, 3])).await;
    check(c.recv_json().await, error("bad_frame", None));
    c.send_json(json!({"op": "teleport", "id": 3})).await;
    check(c.recv_json().await, error("unknown_op", Some(3)));
    for bad in ["", "has space", "slash/", &"x".repeat(129)] {
        c.send_json(json!({"op": "join", "room": bad, "id": 4}))
            .await;
        check(c.recv_json().await, error("bad_room", Some(4)));
    }
    c.send_json(send_frame("elsewhere", "comment", json!(1)))
        .await;
    check(c.recv_json().await, error("not_joined", None));
    c.send_json(json!({"op": "leave", "room": "elsewhere", "id": 5}))
        .await;
    check(c.recv_json().await, error("not_joined", Some(5)));
    assert_eq!(
        c.request(json!({"op": "join", "room": "r2"}), 6).await.0["op"],
        "ack"
    );
    c.send_json(json!({"op": "join", "room": "r3", "id": 7}))
        .await;
    check(c.recv_json().await, error("too_many_rooms", Some(7)));

    // Still usable after all of that.
    let (ack, own) = c
        .request_own(send_frame("r1", "comment", json!("still here")), 8)
        .await;
    assert_eq!(ack, json!({"op": "ack", "id": 8}));
    assert_eq!(own["data"], "still here");

    let errors = node.get("/metrics").await.1;
    assert_eq!(
        metric_value(&errors, "roomcast_client_errors_total{code=\"bad_room\"}"),
        Some(4.0)
    );
}

#[tokio::test]
async fn oversize_message_closes_with_1009_and_the_room_carries_on() {
    let node = Node::ready(config(&[("ROOMCAST__LIMITS__MAX_MESSAGE_BYTES", "1024")])).await;
    let (mut big, _) = Client::json(&node, &["r"]).await;
    let (mut other, _) = Client::json(&node, &["r"]).await;
    big.send(Message::text("x".repeat(2000))).await;
    assert_eq!(big.closed().await, 1009);
    let (ack, own) = other
        .request_own(send_frame("r", "comment", json!("fine")), 1)
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(own["data"], "fine");
}

#[tokio::test]
async fn invalid_utf8_closes_with_1007() {
    let node = Node::ready(config(&[])).await;
    let (mut c, _) = Client::json(&node, &["r"]).await;
    let frame = Frame::message(vec![0xffu8, 0xfe, 0xfd], OpCode::Data(Data::Text), true);
    c.ws.send(Message::Frame(frame))
        .await
        .expect("send raw frame");
    assert_eq!(c.closed().await, 1007);
}

#[tokio::test]
async fn bad_handshakes_get_http_errors_with_json_bodies() {
    let node = Node::ready(config(&[(
        "ROOMCAST__LIMITS__MAX_ROOMS_PER_CONNECTION",
        "2",
    )]))
    .await;
    let cases = [
        ("/ws?room=a%20b", 400, "bad_room"),
        ("/ws?room=a&room=b&room=c", 400, "too_many_rooms"),
        ("/ws?room=a&room=b&format=raw", 400, "bad_request"),
        ("/ws?format=raw", 400, "bad_request"),
        ("/ws?room=a&format=xml", 400, "bad_request"),
    ];
    for (path, status, code) in cases {
        let url = format!("ws://{}{path}", node.addr);
        let err = tokio_tungstenite::connect_async(&url)
            .await
            .expect_err(path);
        match err {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                assert_eq!(resp.status().as_u16(), status, "{path}");
                let body: serde_json::Value =
                    serde_json::from_slice(resp.body().as_deref().unwrap_or_default())
                        .expect("JSON body");
                assert_eq!(body["error"]["code"], code, "{path}");
            }
            other => panic!("{path}: expected an HTTP error, got {other}"),
        }
    }
    // Plain HTTP on /ws: the refusal the handshake would get (the SDK asks
    // this way: a browser cannot read a failed handshake's status), else 426.
    let (status, body) = http_with(node.addr, "GET", "/ws?room=a", "", "").await;
    assert_eq!(status, 426);
    assert!(body.contains("not_websocket"));
    let (status, body) = http_with(node.addr, "GET", "/ws?room=a%20b", "", "").await;
    assert_eq!((status, body.contains("bad_room")), (400, true), "{body}");
    let (status, body) = http_with(node.addr, "GET", "/ws?token=x.y.z", "", "").await;
    assert_eq!(
        (status, body.contains("unauthorized")),
        (401, true),
        "{body}"
    );
    let (status, body) = node.get("/nope").await;
    assert_eq!((status, body.contains("not_found")), (404, true));
}

#[tokio::test]
async fn http_publish_reaches_the_room() {
    let node = Node::ready(config(&[])).await;
    let (mut c, _) = Client::json(&node, &["live:42"]).await;
    let (status, body) = node
        .request(
            "POST",
            "/api/publish",
            r#"{"room":"live:42","event":"notice","data":{"live":true}}"#,
        )
        .await;
    assert_eq!((status, body.as_str()), (200, r#"{"ok":true}"#));
    let msg = c.recv_json().await;
    assert_eq!(
        (msg["event"].clone(), msg["data"].clone()),
        (json!("notice"), json!({"live": true}))
    );

    let (status, body) = node
        .request("POST", "/api/publish", r#"{"room":"bad room","event":"x"}"#)
        .await;
    assert_eq!(status, 400);
    assert!(body.contains("bad_room"), "{body}");
    let (status, body) = node.request("POST", "/api/publish", "nope").await;
    assert_eq!(status, 400);
    assert!(body.contains("bad_frame"), "{body}");
}

#[tokio::test]
async fn a_flooding_client_is_rate_limited_and_others_are_not() {
    let node = Node::ready(config(&[
        ("ROOMCAST__LIMITS__MESSAGES_PER_SECOND", "1"),
        ("ROOMCAST__LIMITS__MESSAGES_BURST", "3"),
    ]))
    .await;
    let (mut flood, _) = Client::json(&node, &["r"]).await;
    let (mut calm, _) = Client::json(&node, &["r"]).await;
    let mut codes = Vec::new();
    for id in 1..=5 {
        let (reply, _) = flood.request(send_frame("r", "like", json!(id)), id).await;
        codes.push(reply["code"].as_str().unwrap_or("ack").to_string());
    }
    assert_eq!(codes, ["ack", "ack", "ack", "rate_limited", "rate_limited"]);
    // The limit is per connection.
    let (reply, _) = calm
        .request(send_frame("r", "like", json!("calm")), 1)
        .await;
    assert_eq!(reply["op"], "ack");
}

#[tokio::test]
async fn websocket_pings_fragments_and_the_close_handshake_follow_rfc_6455() {
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let node = Node::ready(config(&[])).await;
    let (mut c, _) = Client::json(&node, &["r"]).await;

    // A ping is answered with a pong carrying the same payload.
    c.ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .expect("ping");
    let pong = within("a pong", async {
        loop {
            if let Some(Ok(Message::Pong(p))) = futures::StreamExt::next(&mut c.ws).await {
                return p;
            }
        }
    })
    .await;
    assert_eq!(&pong[..], b"are you there");

    // A message split over three frames is reassembled.
    let text = send_frame("r", "comment", json!("in three parts")).to_string();
    let (a, rest) = text.split_at(10);
    let (b, z) = rest.split_at(10);
    for (part, opcode, fin) in [
        (a, Data::Text, false),
        (b, Data::Continue, false),
        (z, Data::Continue, true),
    ] {
        c.ws.send(Message::Frame(Frame::message(
            part.as_bytes().to_vec(),
            OpCode::Data(opcode),
            fin,
        )))
        .await
        .expect("send fragment");
    }
    assert_eq!(c.recv_json().await["data"], "in three parts");

    // The client's close code is echoed: an application code, so that
    // echoing and the 1000 fallback cannot look the same.
    c.ws.send(Message::Close(Some(CloseFrame {
        code: 4321.into(),
        reason: "bye".into(),
    })))
    .await
    .expect("close");
    assert_eq!(c.closed().await, 4321);
}

#[tokio::test]
async fn a_full_node_refuses_new_clients_with_503_and_accepts_again_when_one_leaves() {
    let node = Node::ready(config(&[("ROOMCAST__LIMITS__MAX_CONNECTIONS", "2")])).await;
    let (first, _) = Client::json(&node, &["r"]).await;
    let (_second, _) = Client::json(&node, &["r"]).await;
    match tokio_tungstenite::connect_async(node.ws_url("room=r")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string();
            assert!(body.contains("too_many_connections"), "{body}");
        }
        other => panic!("expected HTTP 503, got {:?}", other.map(|_| ())),
    }
    first.close().await;
    eventually("the slot to free up", || async {
        node.metric("roomcast_connections").await == 1.0
    })
    .await;
    let (_third, _) = Client::json(&node, &["r"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_handshakes_never_push_a_node_past_its_maximum() {
    const MAX: usize = 5;
    const TRIES: usize = 40;
    // On Redis, with a room each: every handshake waits for its SUBSCRIBE,
    // which is when a check-then-register limit would let others slip in.
    let redis = Redis::start().await;
    let limit = [("ROOMCAST__LIMITS__MAX_CONNECTIONS", "5")];
    let node = Node::ready(redis_config(&redis, "a", &limit)).await;
    let attempts: Vec<_> = (0..TRIES)
        .map(|i| {
            let url = node.ws_url(&format!("room=r{i}"));
            tokio::spawn(async move { tokio_tungstenite::connect_async(url).await })
        })
        .collect();
    let (mut open, mut refused) = (Vec::new(), 0);
    for attempt in attempts {
        match within("a handshake", attempt).await.expect("task") {
            Ok((ws, _)) => open.push(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 503);
                refused += 1;
            }
            Err(e) => panic!("unexpected handshake failure: {e}"),
        }
    }
    assert_eq!(open.len(), MAX, "exactly the maximum got in");
    assert_eq!(refused, TRIES - MAX);
    assert_eq!(node.metric("roomcast_connections").await, MAX as f64);
}
