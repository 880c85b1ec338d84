//! Raw mode: frames delivered byte for byte, and rooms mixing raw and JSON clients.

use base64::Engine as _;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

#[tokio::test]
async fn raw_frames_reach_everyone_in_the_room_byte_for_byte_with_their_type() {
    let node = Node::ready(config(&[])).await;
    let mut a = Client::raw(&node, "stage").await;
    let mut b = Client::raw(&node, "stage").await;
    let mut elsewhere = Client::raw(&node, "other").await;

    a.send(Message::text("弹幕 danmaku {not json}")).await;
    for c in [&mut a, &mut b] {
        assert_eq!(c.recv().await, Message::text("弹幕 danmaku {not json}"));
    }
    let binary = vec![0u8, 255, 1, 254, 10, 13];
    b.send(Message::binary(binary.clone())).await;
    for c in [&mut a, &mut b] {
        assert_eq!(c.recv().await, Message::binary(binary.clone()));
    }
    // Delivered after the two above: the other room sees only its own message.
    elsewhere.send(Message::text("sentinel")).await;
    assert_eq!(elsewhere.recv().await, Message::text("sentinel"));
}

#[tokio::test]
async fn json_and_raw_clients_share_a_room() {
    let node = Node::ready(config(&[])).await;
    let mut raw = Client::raw(&node, "mixed").await;
    let (mut js, js_id) = Client::json(&node, &["mixed"]).await;

    raw.send(Message::text("plain text")).await;
    let msg = js.recv_json().await;
    assert_eq!(msg["op"], "msg");
    assert_eq!(msg["event"], "message");
    assert_eq!(msg["data"], "plain text");
    assert!(msg.get("binary").is_none(), "{msg}");
    assert_eq!(raw.recv().await, Message::text("plain text"));

    raw.send(Message::binary(vec![0xde, 0xad, 0xbe, 0xef]))
        .await;
    let msg = js.recv_json().await;
    assert_eq!(msg["binary"], true);
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(msg["data"].as_str().expect("base64 string"))
        .expect("valid base64");
    assert_eq!(decoded, [0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(
        raw.recv().await,
        Message::binary(vec![0xde, 0xad, 0xbe, 0xef])
    );

    js.send_json(send_frame(
        "mixed",
        "gift",
        json!({"gift": "rocket", "n": 3}),
    ))
    .await;
    let as_raw = match raw.recv().await {
        Message::Text(t) => serde_json::from_str::<serde_json::Value>(&t)
            .expect("raw client gets the msg frame text"),
        other => panic!("expected text, got {other:?}"),
    };
    assert_eq!(as_raw["op"], "msg");
    assert_eq!(as_raw["event"], "gift");
    assert_eq!(as_raw["from"], js_id.as_str());
    assert_eq!(as_raw["data"], json!({"gift": "rocket", "n": 3}));
}

#[tokio::test]
async fn raw_oversize_frame_closes_with_1009() {
    let node = Node::ready(config(&[("ROOMCAST__LIMITS__MAX_MESSAGE_BYTES", "100")])).await;
    let mut c = Client::raw(&node, "r").await;
    c.send(Message::binary(vec![7u8; 101])).await;
    assert_eq!(c.closed().await, 1009);
}
