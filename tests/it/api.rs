//! The backend API: API keys, publishing to rooms and users, batches.

use serde_json::{json, Value};

use crate::util::*;

fn bearer(key: &str) -> String {
    format!("Authorization: Bearer {key}\r\n")
}

/// Publish a marker to `room` through `node` and check it is the next thing
/// `client` receives: nothing refused before it was delivered.
async fn next_is_marker(node: &Node, client: &mut Client, room: &str) {
    let body = json!({"room": room, "event": "marker"}).to_string();
    let (status, text) = node.request("POST", "/api/publish", &body).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(client.recv_json().await["event"], "marker");
}

#[tokio::test]
async fn the_api_needs_a_configured_key_and_is_closed_without_one() {
    let publish = r#"{"room":"r","event":"e"}"#;
    // No key configured: closed to everyone, whatever they present.
    let closed = Node::start(config(&[("ROOMCAST__API__KEYS", "")])).await;
    let (mut viewer, _) = Client::json(&closed, &["r"]).await;
    for headers in ["".to_string(), bearer(TEST_API_KEY)] {
        let (status, body) =
            http_with(closed.addr, "POST", "/api/publish", &headers, publish).await;
        assert_eq!(status, 401, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    // Two keys (rotation): both work; a wrong, missing or non-bearer one does not.
    let second = "second-key-abcdefghijklmnop";
    let keys = format!("{TEST_API_KEY},{second}");
    let node = Node::start(config(&[("ROOMCAST__API__KEYS", &keys)])).await;
    let (mut on_node, _) = Client::json(&node, &["r"]).await;
    for headers in [
        String::new(),
        bearer("test-api-key-012345678X"),
        bearer(&TEST_API_KEY[..10]),
        format!("Authorization: Basic {TEST_API_KEY}\r\n"),
    ] {
        let (status, body) = http_with(node.addr, "POST", "/api/publish", &headers, publish).await;
        assert_eq!(status, 401, "{headers:?}: {body}");
    }
    for (i, key) in [TEST_API_KEY, second].iter().enumerate() {
        let body = json!({"room": "r", "event": "e", "data": i}).to_string();
        let (status, _) = http_with(node.addr, "POST", "/api/publish", &bearer(key), &body).await;
        assert_eq!(status, 200);
        assert_eq!(on_node.recv_json().await["data"], i);
    }
    // Nothing refused was delivered.
    next_is_marker(&node, &mut on_node, "r").await;
    let count = |status: &str| {
        format!("roomcast_api_requests_total{{endpoint=\"publish\",status=\"{status}\"}}")
    };
    assert_eq!(node.metric(&count("401")).await, 4.0);
    assert_eq!(node.metric(&count("200")).await, 3.0);
    let (mut sender, _) = Client::json(&closed, &["r"]).await;
    let (ack, _) = sender
        .request(send_frame("r", "marker", json!(null)), 1)
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(viewer.recv_json().await["event"], "marker");
}

#[tokio::test]
async fn an_opened_api_needs_no_key_and_keys_are_checked_in_config() {
    let node = Node::start(config(&[
        ("ROOMCAST__API__KEYS", ""),
        ("ROOMCAST__API__OPEN", "true"),
    ]))
    .await;
    let (status, _) = http_with(
        node.addr,
        "POST",
        "/api/publish",
        "",
        r#"{"room":"r","event":"e"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let load = |pairs: &[(&str, &str)]| {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        roomcast::Config::load(None, env)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let err = load(&[("ROOMCAST__API__KEYS", "short")]).unwrap_err();
    assert!(err.starts_with("api.keys:"), "{err}");
    let err = load(&[
        ("ROOMCAST__API__KEYS", TEST_API_KEY),
        ("ROOMCAST__API__OPEN", "true"),
    ])
    .unwrap_err();
    assert!(err.starts_with("api.open:"), "{err}");
}

#[tokio::test]
async fn a_batch_is_answered_per_item_and_publishes_the_valid_ones_in_order() {
    let redis = Redis::start().await;
    let a = Node::ready(redis_config(&redis, "a", &[])).await;
    let b = Node::ready(redis_config(&redis, "b", &[])).await;
    let (mut on_b, _) = Client::json(&b, &["r1", "r2"]).await;
    let batch = json!([
        {"room": "r1", "event": "e", "data": 1},
        {"room": "bad room", "event": "e"},
        {"room": "r2", "event": "e", "data": 2},
        {"room": "r1", "to": "u1", "event": "e"},
        {"room": "r1"},
        {"room": "r1", "event": "e", "data": 3},
    ]);
    let (status, body) = a.request("POST", "/api/publish", &batch.to_string()).await;
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let codes: Vec<Value> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            if r["ok"] == true {
                json!("ok")
            } else {
                r["error"]["code"].clone()
            }
        })
        .collect();
    assert_eq!(
        codes,
        [
            json!("ok"),
            json!("bad_room"),
            json!("ok"),
            json!("bad_frame"),
            json!("bad_frame"),
            json!("ok")
        ]
    );
    // Order is kept within a room (rooms are independent).
    let mut got: Vec<Value> = [
        on_b.recv_json().await,
        on_b.recv_json().await,
        on_b.recv_json().await,
    ]
    .iter()
    .map(|m| json!([m["room"], m["data"]]))
    .collect();
    got.sort_by_key(|m| m[0].as_str().map(str::to_owned));
    assert_eq!(got, [json!(["r1", 1]), json!(["r1", 3]), json!(["r2", 2])]);
    next_is_marker(&a, &mut on_b, "r1").await;
    // Refusals of the whole request.
    for (body, status, code) in [
        ("[1,2]".to_string(), 200, None),
        ("{}".to_string(), 400, Some("bad_frame")),
        (
            json!(vec![json!({"room":"r1","event":"e"}); 1001]).to_string(),
            400,
            Some("bad_frame"),
        ),
    ] {
        let (got, text) = a.request("POST", "/api/publish", &body).await;
        assert_eq!(got, status, "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        if let Some(code) = code {
            assert_eq!(v["error"]["code"], code);
        } else {
            assert_eq!(v["results"][0]["error"]["code"], "bad_frame");
        }
    }
    next_is_marker(&a, &mut on_b, "r2").await;
}
