//! Namespaces and the limits that protect a room and a node: per-event
//! rates, aggregated likes, who may send where, the connection rate,
//! per-address caps, allowed origins and the abuse close — with real
//! clients, a real redis-server and two nodes.

use std::time::Duration;

use serde_json::{json, Value};

use crate::util::*;

fn env_refs<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

const LIVE: &str = r#"
[limits]
events = { danmaku = { per_second = 1, burst = 2 } }

[aggregate]
window = "100ms"

[[namespaces]]
prefix = "live:"
anonymous_send = false
aggregate = ["like"]

[[namespaces]]
prefix = "news:"
client_send = false
"#;

/// The next frame that is not a presence frame.
async fn next_msg(c: &mut Client) -> Value {
    loop {
        let v = c.recv_json().await;
        if v["op"] != "presence" {
            return v;
        }
    }
}

#[tokio::test]
async fn a_like_storm_reaches_every_node_as_a_few_summed_messages() {
    let redis = Redis::start().await;
    let a = Node::ready(file_config(LIVE, &env_refs(&redis_env(&redis, "a")))).await;
    let b = Node::ready(file_config(LIVE, &env_refs(&redis_env(&redis, "b")))).await;
    // "like" is aggregated by default (aggregate.events), in any room.
    let (mut watcher, _) = Client::json(&b, &["fan:1"]).await;
    let mut tappers = Vec::new();
    for node in [&a, &b] {
        for _ in 0..5 {
            tappers.push(Client::json(node, &["fan:1"]).await.0);
        }
    }
    let published_before = a.metric("roomcast_bus_published_total").await
        + b.metric("roomcast_bus_published_total").await;
    // 10 viewers × 20 likes, acked at once.
    for (i, t) in tappers.iter_mut().enumerate() {
        for n in 0..20 {
            let (ack, _) = t
                .request(
                    send_frame("fan:1", "like", json!(null)),
                    (i * 100 + n) as u64,
                )
                .await;
            assert_eq!(ack["op"], "ack");
        }
    }
    let mut total = 0;
    let mut messages = 0;
    while total < 200 {
        let m = next_msg(&mut watcher).await;
        assert_eq!(
            (m["event"].as_str(), m["room"].as_str()),
            (Some("like"), Some("fan:1")),
            "{m}"
        );
        total += m["data"]["count"].as_u64().unwrap();
        messages += 1;
    }
    assert_eq!(total, 200, "exactly the likes sent, summed");
    let published = a.metric("roomcast_bus_published_total").await
        + b.metric("roomcast_bus_published_total").await
        - published_before;
    assert!(
        messages < 40 && published < 40.0,
        "{messages} messages, {published} publishes for 200 likes"
    );
    assert_eq!(
        a.metric("roomcast_aggregated_events_total{event=\"like\"}")
            .await
            + b.metric("roomcast_aggregated_events_total{event=\"like\"}")
                .await,
        200.0
    );
    // Gifts stay individual messages.
    let (ack, _) = tappers[0]
        .request(send_frame("fan:1", "gift", json!("rose")), 9999)
        .await;
    assert_eq!(ack["op"], "ack");
    let gift = next_msg(&mut watcher).await;
    assert_eq!(
        (gift["event"].as_str(), gift["data"].as_str()),
        (Some("gift"), Some("rose"))
    );
}

#[tokio::test]
async fn namespaces_decide_who_sends_and_per_event_rates_refuse_with_a_retry_hint() {
    let redis = Redis::start().await;
    let a = Node::ready(file_config(LIVE, &env_refs(&redis_env(&redis, "a")))).await;
    let b = Node::ready(file_config(LIVE, &env_refs(&redis_env(&redis, "b")))).await;
    let (mut viewer, _) = Client::json(&a, &["live:1", "news:1", "chat"]).await;
    let (mut other, _) = Client::json(&b, &["live:1", "chat"]).await;
    let (err, _) = viewer
        .request(send_frame("live:1", "danmaku", json!("hi")), 1)
        .await;
    assert_eq!(err["code"], "forbidden", "anonymous viewers watch in live:");
    let (err, _) = viewer
        .request(send_frame("news:1", "e", json!(null)), 2)
        .await;
    assert_eq!(
        err["code"], "forbidden",
        "only the platform publishes in news:"
    );
    // danmaku: 1/s, burst 2 (limits.events), in any room.
    for id in 3..5 {
        let (ack, _) = viewer
            .request(send_frame("chat", "danmaku", json!(id)), id)
            .await;
        assert_eq!(ack["op"], "ack");
    }
    let (err, _) = viewer
        .request(send_frame("chat", "danmaku", json!(5)), 5)
        .await;
    assert_eq!(err["code"], "rate_limited");
    let retry = err["retry_ms"].as_u64().expect("retry_ms");
    assert!((1..=1000).contains(&retry), "{retry}");
    // Other events are not held back by danmaku's rate.
    let (ack, _) = viewer
        .request(send_frame("chat", "comment", json!(6)), 6)
        .await;
    assert_eq!(ack["op"], "ack");
    // The other node saw exactly what was accepted.
    let got: Vec<Value> = [
        next_msg(&mut other).await,
        next_msg(&mut other).await,
        next_msg(&mut other).await,
    ]
    .iter()
    .map(|m| m["data"].clone())
    .collect();
    assert_eq!(got, [json!(3), json!(4), json!(6)]);
    assert_eq!(
        a.metric("roomcast_rate_limited_total{event=\"danmaku\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_client_that_keeps_being_refused_is_closed_with_4004() {
    let node = Node::start(config(&[
        ("ROOMCAST__LIMITS__MESSAGES_PER_SECOND", "1"),
        ("ROOMCAST__LIMITS__MESSAGES_BURST", "1"),
        ("ROOMCAST__LIMITS__ABUSE_THRESHOLD", "5"),
    ]))
    .await;
    let (mut abuser, _) = Client::json(&node, &["r"]).await;
    let (mut bystander, _) = Client::json(&node, &["r"]).await;
    for _ in 0..20 {
        abuser.send_json(send_frame("r", "spam", json!(null))).await;
    }
    assert_eq!(abuser.closed().await, 4004);
    assert_eq!(node.metric("roomcast_abuse_disconnects_total").await, 1.0);
    // The bystander got the one accepted message and is still served.
    assert_eq!(next_msg(&mut bystander).await["event"], "spam");
    let (pong, _) = bystander.request(json!({"op": "ping"}), 1).await;
    assert_eq!(pong["op"], "pong");
}

/// The status, headers and JSON body of a WebSocket upgrade with these extra header lines.
async fn upgrade(node: &Node, headers: &str) -> (u16, String, Value) {
    let headers = format!(
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}"
    );
    let raw = raw_http(
        node.addr,
        &format!("GET /ws?room=r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n"),
    )
    .await;
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    (
        status,
        head.to_string(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// Send `request` and read until the server closes.
async fn raw_http(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within("a raw HTTP exchange", async {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.expect("read");
        String::from_utf8_lossy(&out).into_owned()
    })
    .await
}

#[tokio::test]
async fn origins_addresses_and_the_connection_rate_are_enforced_at_the_upgrade() {
    let node = Node::start(config(&[
        (
            "ROOMCAST__SERVER__ALLOWED_ORIGINS",
            "https://live.example.com",
        ),
        ("ROOMCAST__LIMITS__MAX_CONNECTIONS_PER_IP", "2"),
        ("ROOMCAST__SERVER__TRUSTED_PROXIES", "127.0.0.1"),
    ]))
    .await;
    let (status, _, body) = upgrade(&node, "Origin: https://evil.example\r\n").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    // Two connections from one address (as the trusted proxy says); a third is refused.
    let connect_as = |ip: &'static str| {
        let url = node.ws_url("room=r");
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut req = url.into_client_request().unwrap();
            req.headers_mut()
                .insert("origin", "https://live.example.com".parse().unwrap());
            req.headers_mut()
                .insert("x-forwarded-for", ip.parse().unwrap());
            tokio_tungstenite::connect_async(req).await
        }
    };
    let first = connect_as("203.0.113.7").await.expect("first");
    let second = connect_as("203.0.113.7").await.expect("second");
    let (status, _, body) = upgrade(&node, "X-Forwarded-For: 203.0.113.7\r\n").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (429, Some("too_many_connections_from_ip")),
        "{body}"
    );
    let other = connect_as("203.0.113.8").await.expect("another address");
    drop((first, second, other));

    // The connection rate: a burst of 3, then 503 busy with Retry-After.
    let node = Node::start(config(&[
        ("ROOMCAST__LIMITS__CONNECTIONS_PER_SECOND", "1"),
        ("ROOMCAST__LIMITS__CONNECTIONS_BURST", "3"),
    ]))
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(Client::json(&node, &["r"]).await.0);
    }
    let (status, head, body) = upgrade(&node, "").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("busy")),
        "{body}"
    );
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert_eq!(
        node.metric("roomcast_rate_limited_total{event=\"connection\"}")
            .await,
        1.0
    );
    // A second later there is room again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    held.push(Client::json(&node, &["r"]).await.0);
}

#[test]
fn namespace_rules_are_checked_and_errors_name_the_key() {
    let path = std::env::temp_dir().join(format!(
        "roomcast-ns-{}-{}.toml",
        std::process::id(),
        free_port()
    ));
    for (toml, key) in [
        (
            "[[namespaces]]\nprefix = \"a:\"\n[[namespaces]]\nprefix = \"a:\"\n",
            "namespaces[1].prefix",
        ),
        (
            "[[namespaces]]\nprefix = \"bad prefix\"\n",
            "namespaces[0].prefix",
        ),
        (
            "[[namespaces]]\nprefix = \"a:\"\nanonymous_join = false\nanonymous_send = true\n",
            "namespaces[0].anonymous_send",
        ),
        (
            "[[namespaces]]\nprefix = \"a:\"\nnonsense = 1\n",
            "namespaces",
        ),
        (
            "[limits]\nevents = { danmaku = { per_second = 2, burst = 0 } }\n",
            "limits.events.danmaku.burst",
        ),
        (
            "[[namespaces]]\nprefix = \"h:\"\nhistory = { size = 0, ttl = \"5m\" }\n",
            "namespaces[0].history.size",
        ),
        (
            "[[namespaces]]\nprefix = \"h:\"\nhistory = { size = 100, ttl = \"forever\" }\n",
            "namespaces[0].history.ttl",
        ),
        (
            "[[namespaces]]\nprefix = \"h:\"\nhistory = { size = 100 }\n",
            "namespaces",
        ),
    ] {
        std::fs::write(&path, toml).unwrap();
        let err = roomcast::Config::load(Some(&path), Vec::new())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(key), "{toml}: {err}");
    }
    let _ = std::fs::remove_file(&path);
}

#[tokio::test]
async fn a_users_rate_holds_across_its_connections_on_a_node() {
    use crate::auth::{auth_env, connect, token};
    let env = auth_env(&[
        ("ROOMCAST__LIMITS__USER_MESSAGES_PER_SECOND", "1"),
        ("ROOMCAST__LIMITS__USER_MESSAGES_BURST", "2"),
    ]);
    let node = Node::start(config(&env)).await;
    let ana = token("ana", json!({}));
    let (mut phone, _) = connect(&node, "room=r", &ana).await;
    let (mut laptop, _) = connect(&node, "room=r", &ana).await;
    let (mut bob, _) = connect(&node, "room=r", &token("bob", json!({}))).await;
    let (ack, _) = phone.request(send_frame("r", "e", json!(1)), 1).await;
    assert_eq!(ack["op"], "ack");
    let (ack, _) = laptop.request(send_frame("r", "e", json!(2)), 2).await;
    assert_eq!(ack["op"], "ack");
    let (err, _) = phone.request(send_frame("r", "e", json!(3)), 3).await;
    assert_eq!(
        err["code"], "rate_limited",
        "the user's third message in its burst of 2"
    );
    assert!(err["retry_ms"].as_u64().is_some());
    // Another user is not affected.
    let (ack, _) = bob.request(send_frame("r", "e", json!(4)), 4).await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(
        node.metric("roomcast_rate_limited_total{event=\"user\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn rooms_that_want_them_get_join_and_leave_events_of_signed_in_users() {
    use crate::auth::{auth_env, connect, token};
    let redis = Redis::start().await;
    let toml = "[[namespaces]]\nprefix = \"stage:\"\njoin_leave_events = true\n";
    let env = |node: &'static str| {
        let mut env: Vec<(&'static str, String)> = auth_env(&[])
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        env.extend(redis_env(&redis, node));
        env
    };
    let a_env = env("a");
    let b_env = env("b");
    let a = Node::ready(file_config(toml, &env_refs(&a_env))).await;
    let b = Node::ready(file_config(toml, &env_refs(&b_env))).await;
    let (mut watcher, _) = Client::json(&b, &["stage:1", "chat"]).await;
    let ana = token("ana", json!({"info": {"name": "Ana"}}));
    let (mut c, _) = connect(&a, "room=chat", &ana).await;
    // An anonymous viewer's join is not announced; a room without the rule says nothing.
    let (mut anon, _) = Client::json(&a, &[]).await;
    let (ack, _) = anon
        .request(json!({"op": "join", "room": "stage:1"}), 1)
        .await;
    assert_eq!(ack["op"], "ack");
    let (ack, _) = c.request(json!({"op": "join", "room": "stage:1"}), 2).await;
    assert_eq!(ack["op"], "ack");
    let joined = next_msg(&mut watcher).await;
    assert_eq!(
        (
            joined["event"].as_str(),
            joined["room"].as_str(),
            joined["from"].as_str()
        ),
        (Some("join"), Some("stage:1"), Some("ana"))
    );
    assert_eq!(joined["info"]["name"], "Ana");
    let (ack, _) = c
        .request(json!({"op": "leave", "room": "stage:1"}), 3)
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(next_msg(&mut watcher).await["event"], "leave");
    let (ack, _) = c.request(json!({"op": "join", "room": "stage:1"}), 4).await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(next_msg(&mut watcher).await["event"], "join");
    // Disconnecting leaves every room: announced where wanted (stage:1, not chat).
    c.close().await;
    let left = next_msg(&mut watcher).await;
    assert_eq!(
        (left["event"].as_str(), left["room"].as_str()),
        (Some("leave"), Some("stage:1"))
    );
    let (mut poster, _) = Client::json(&b, &["chat"]).await;
    let (ack, _) = poster
        .request(send_frame("chat", "marker", json!(null)), 5)
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(
        next_msg(&mut watcher).await["event"],
        "marker",
        "nothing else came"
    );
}
