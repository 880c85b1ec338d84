//! JWT authentication, permissions, token refresh and expiry, and messages
//! to users — with real tokens, a real redis-server and two nodes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::util::*;

pub const SECRET: &str = "a-test-secret-of-at-least-32-bytes!!";

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An HS256 token for `sub`, valid for an hour, with `extra` claims.
pub fn token(sub: &str, extra: Value) -> String {
    let mut claims = json!({"sub": sub, "exp": unix_now() + 3600});
    if let (Some(c), Some(e)) = (claims.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

pub fn auth_env(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut env = vec![
        ("ROOMCAST__AUTH__ALGORITHM", "HS256"),
        ("ROOMCAST__AUTH__SECRET", SECRET),
        ("ROOMCAST__AUTH__LEEWAY", "0s"),
    ];
    env.extend_from_slice(extra);
    env
}

/// A JSON client presenting `token` in the URL; returns it and its welcome.
pub async fn connect(node: &Node, query: &str, token: &str) -> (Client, Value) {
    let mut c = Client::connect(&node.ws_url(&format!("{query}&token={token}"))).await;
    let welcome = c.recv_json().await;
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    (c, welcome)
}

/// The status and JSON body of a WebSocket upgrade with these extra header lines.
async fn upgrade(node: &Node, query: &str, headers: &str) -> (u16, Value) {
    let headers = format!(
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{headers}"
    );
    let (status, body) = http_with(node.addr, "GET", &format!("/ws?{query}"), &headers, "").await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn a_token_in_the_url_or_a_header_makes_the_sender_its_user_and_info_cannot_be_forged() {
    let redis = Redis::start().await;
    let a = Node::ready(redis_config(&redis, "a", &auth_env(&[]))).await;
    let b = Node::ready(redis_config(&redis, "b", &auth_env(&[]))).await;
    let ana = token("ana", json!({"info": {"name": "Ana", "level": 7}}));
    let (mut sender, welcome) = connect(&a, "room=r1", &ana).await;
    let conn = welcome["conn"].as_str().unwrap().to_string();
    assert_eq!(welcome["user"], "ana");
    // Bob connects with an Authorization header instead (non-browser clients).
    let mut request = b.ws_url("room=r1").into_client_request().unwrap();
    let bearer = format!("Bearer {}", token("bob", json!({})));
    request
        .headers_mut()
        .insert("authorization", bearer.parse().unwrap());
    let (ws, _) = within(
        "connect with a header",
        tokio_tungstenite::connect_async(request),
    )
    .await
    .expect("connect");
    let mut bob = Client::new(ws);
    assert_eq!(bob.recv_json().await["op"], "welcome");
    let forged = json!({"op": "send", "room": "r1", "event": "danmaku", "from": "bob",
        "conn": "x", "info": {"name": "Bob"}, "data": {"t": "hi"}});
    let (ack, _) = sender.request(forged, 1).await;
    assert_eq!(ack["op"], "ack");
    let got = bob.recv_json().await;
    assert_eq!(
        (got["from"].as_str(), got["conn"].as_str()),
        (Some("ana"), Some(conn.as_str()))
    );
    assert_eq!(got["info"], json!({"name": "Ana", "level": 7}));
    assert_eq!(got["data"]["t"], "hi");
    assert_eq!(b.metric("roomcast_users").await, 1.0);
}

#[tokio::test]
async fn bad_tokens_are_refused_at_the_upgrade_with_401_and_the_reason() {
    let node = Node::start(config(&auth_env(&[("ROOMCAST__AUTH__ANONYMOUS", "false")]))).await;
    let now = unix_now();
    let hs = |claims: Value, secret: &str| {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let b64 = |v: Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(json!({"sub": "eve", "exp": now + 3600}))
    );
    let cases = [
        ("no token", String::new(), "missing"),
        ("garbage", "not-a-jwt".to_string(), "malformed"),
        (
            "another secret",
            hs(
                json!({"sub": "eve", "exp": now + 3600}),
                "the-wrong-secret-of-32-bytes-or-more",
            ),
            "bad_signature",
        ),
        ("alg none", alg_none, "bad_algorithm"),
        (
            "expired",
            hs(json!({"sub": "ana", "exp": now - 10}), SECRET),
            "expired",
        ),
        (
            "not yet valid",
            hs(
                json!({"sub": "ana", "exp": now + 3600, "nbf": now + 600}),
                SECRET,
            ),
            "not_yet_valid",
        ),
        (
            "no sub",
            hs(json!({"exp": now + 3600}), SECRET),
            "bad_claims",
        ),
        (
            "info not an object",
            hs(
                json!({"sub": "ana", "exp": now + 3600, "info": [1]}),
                SECRET,
            ),
            "bad_claims",
        ),
    ];
    for (what, token, reason) in cases {
        let query = if token.is_empty() {
            "room=r".to_string()
        } else {
            format!("room=r&token={token}")
        };
        let (status, body) = upgrade(&node, &query, "").await;
        assert_eq!(status, 401, "{what}: {body}");
        assert_eq!(body["error"]["code"], "unauthorized", "{what}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.starts_with(reason), "{what}: {message}");
        let metric = format!("roomcast_auth_failures_total{{reason=\"{reason}\"}}");
        assert!(node.metric(&metric).await >= 1.0, "{what}: {metric}");
    }
    // A valid token whose rooms do not include the URL's room: 403.
    let limited = token("ana", json!({"rooms": ["live:*"]}));
    let (status, body) = upgrade(&node, &format!("room=dm:1&token={limited}"), "").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert_eq!(node.metric("roomcast_connections").await, 0.0);
    let (_c, welcome) = connect(&node, "room=live:1", &limited).await;
    assert_eq!(welcome["op"], "welcome");
}

#[tokio::test]
async fn forbidden_joins_and_sends_get_error_frames_and_anonymous_viewers_only_watch() {
    let node = Node::start(config(&auth_env(&[(
        "ROOMCAST__AUTH__ANONYMOUS_SEND",
        "false",
    )])))
    .await;
    let (mut limited, _) = connect(
        &node,
        "room=live:1",
        &token("ana", json!({"rooms": ["live:*"], "send": false})),
    )
    .await;
    let (err, _) = limited
        .request(json!({"op": "join", "room": "dm:1"}), 1)
        .await;
    assert_eq!(err["code"], "forbidden");
    let (err, _) = limited
        .request(send_frame("live:1", "danmaku", json!("x")), 2)
        .await;
    assert_eq!(err["code"], "forbidden");
    let (mut viewer, _) = Client::json(&node, &["live:1"]).await;
    let (err, _) = viewer
        .request(send_frame("live:1", "danmaku", json!("x")), 3)
        .await;
    assert_eq!(err["code"], "forbidden");
    let (err, _) = viewer
        .request(json!({"op": "send", "to": "ana", "event": "e"}), 4)
        .await;
    assert_eq!(err["code"], "forbidden");
    // A signed-in user posts; the anonymous viewer sees it, and nothing refused before it.
    let (mut poster, _) = connect(&node, "room=live:1", &token("bo", json!({}))).await;
    let (ack, _) = poster
        .request(send_frame("live:1", "danmaku", json!("ok")), 5)
        .await;
    assert_eq!(ack["op"], "ack");
    let got = viewer.recv_json().await;
    assert_eq!(
        (got["from"].as_str(), got["data"].as_str()),
        (Some("bo"), Some("ok"))
    );
    assert_eq!(limited.recv_json().await["data"], "ok");
}

#[tokio::test]
async fn a_user_gets_messages_on_every_connection_on_every_node_and_only_while_connected() {
    let redis = Redis::start().await;
    let a = Node::ready(redis_config(&redis, "a", &auth_env(&[]))).await;
    let b = Node::ready(redis_config(&redis, "b", &auth_env(&[]))).await;
    let bob = token("bob", json!({}));
    let (mut phone, _) = connect(&a, "", &bob).await;
    let (mut browser, _) = connect(&b, "", &bob).await;
    let (mut ana, _) = connect(&b, "", &token("ana", json!({}))).await;
    let offer = json!({"op": "send", "to": "bob", "event": "rtc.offer", "data": {"sdp": "v=0"}});
    let (ack, _) = ana.request(offer, 1).await;
    assert_eq!(ack["op"], "ack");
    for c in [&mut phone, &mut browser] {
        let got = c.recv_json().await;
        assert_eq!(got["op"], "msg");
        assert_eq!(
            (got["to"].as_str(), got["from"].as_str()),
            (Some("bob"), Some("ana"))
        );
        assert_eq!(got["event"], "rtc.offer");
        assert_eq!(got["data"]["sdp"], "v=0");
        assert!(got.get("room").is_none());
    }
    // The backend, by API and straight into Redis.
    let (status, body) = a
        .request(
            "POST",
            "/api/publish",
            r#"{"to":"bob","event":"live","data":1}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let receivers: i64 = redis
        .cmd(&[
            "PUBLISH",
            "roomcast:user:bob",
            r#"{"event":"live","data":2}"#,
        ])
        .await;
    assert_eq!(receivers, 2, "one subscription per node that holds bob");
    for c in [&mut phone, &mut browser] {
        assert_eq!(c.recv_json().await["data"], 1);
        assert_eq!(c.recv_json().await["data"], 2);
    }
    // A room named like a user channel is a room, never bob's channel.
    let (mut eve, _) = Client::json(&a, &["user:bob"]).await;
    let receivers: i64 = redis
        .cmd(&["PUBLISH", "roomcast:user:bob", r#"{"event":"x"}"#])
        .await;
    assert_eq!(receivers, 2);
    let (ack, own) = eve
        .request_own(send_frame("user:bob", "e", json!(null)), 2)
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(own["room"], "user:bob");
    assert_eq!(phone.recv_json().await["event"], "x");
    // Node a holds bob's subscription only while bob is connected to it.
    phone.close().await;
    eventually("node a to drop bob's subscription", || async {
        redis.channel_numsub("roomcast:user:bob").await == 1
    })
    .await;
    browser.close().await;
    eventually("node b to drop bob's subscription", || async {
        redis.channel_numsub("roomcast:user:bob").await == 0
    })
    .await;
}

#[tokio::test]
async fn refresh_replaces_the_token_and_an_expired_one_closes_the_connection_with_4003() {
    let node = Node::start(config(&auth_env(&[]))).await;
    let short = |sub: &str, secs: u64| {
        let claims = json!({"sub": sub, "exp": unix_now() + secs});
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    };
    // Two connections whose tokens expire in 2 s; one refreshes in time.
    let (mut lapses, _) = connect(&node, "room=r", &short("ana", 2)).await;
    let (mut renews, _) = connect(&node, "room=r", &short("bo", 2)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let (err, _) = renews
        .request(json!({"op": "refresh", "token": short("ana", 3600)}), 1)
        .await;
    assert_eq!(err["code"], "forbidden", "another user's token");
    let (err, _) = renews
        .request(json!({"op": "refresh", "token": "junk"}), 2)
        .await;
    assert_eq!(err["code"], "unauthorized");
    let (ack, _) = renews
        .request(json!({"op": "refresh", "token": short("bo", 3600)}), 3)
        .await;
    assert_eq!(ack["op"], "ack");
    assert_eq!(lapses.closed().await, 4003);
    assert!(
        tokio::time::Instant::now() >= deadline,
        "closed before its token expired"
    );
    assert_eq!(node.metric("roomcast_token_expiries_total").await, 1.0);
    // The refreshed one is still served after the old token's expiry.
    let (pong, _) = renews.request(json!({"op": "ping"}), 4).await;
    assert_eq!(pong["op"], "pong");
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_with_a_pem_public_key_and_hs256_confusion_fails() {
    let dir = std::env::temp_dir().join(format!(
        "roomcast-jwt-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.key",
        ],
    );
    openssl(
        &dir,
        &["pkey", "-in", "rsa.key", "-pubout", "-out", "rsa.pub"],
    );
    openssl(
        &dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ec.key",
        ],
    );
    openssl(
        &dir,
        &["pkey", "-in", "ec.key", "-pubout", "-out", "ec.pub"],
    );
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let claims = json!({"sub": "ana", "exp": unix_now() + 3600});
    for (alg, name, key) in [
        (
            Algorithm::RS256,
            "RS256",
            EncodingKey::from_rsa_pem(&read("rsa.key")).unwrap(),
        ),
        (
            Algorithm::ES256,
            "ES256",
            EncodingKey::from_ec_pem(&read("ec.key")).unwrap(),
        ),
    ] {
        let public = dir.join(if name == "RS256" { "rsa.pub" } else { "ec.pub" });
        let public = public.display().to_string();
        let node = Node::start(config(&[
            ("ROOMCAST__AUTH__ALGORITHM", name),
            ("ROOMCAST__AUTH__PUBLIC_KEY_FILE", &public),
        ]))
        .await;
        let good = encode(&Header::new(alg), &claims, &key).unwrap();
        let (mut c, _) = connect(&node, "room=r", &good).await;
        let (ack, own) = c.request_own(send_frame("r", "e", json!(1)), 1).await;
        assert_eq!(ack["op"], "ack");
        assert_eq!(own["from"], "ana");
        // The public key used as an HS256 secret (algorithm confusion) is refused.
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&read(if name == "RS256" { "rsa.pub" } else { "ec.pub" })),
        )
        .unwrap();
        let (status, body) = upgrade(&node, &format!("room=r&token={forged}"), "").await;
        assert_eq!(status, 401, "{name}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("bad_algorithm"),
            "{body}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn auth_settings_are_checked_and_errors_name_the_key() {
    let load = |pairs: &[(&str, &str)]| {
        let env = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        roomcast::Config::load(None, env)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    for (pairs, key) in [
        (
            vec![("ROOMCAST__AUTH__ALGORITHM", "HS512")],
            "auth.algorithm:",
        ),
        (
            vec![
                ("ROOMCAST__AUTH__ALGORITHM", "HS256"),
                ("ROOMCAST__AUTH__SECRET", "short"),
            ],
            "auth.secret:",
        ),
        (
            vec![("ROOMCAST__AUTH__ANONYMOUS", "false")],
            "auth.anonymous:",
        ),
        (
            vec![("ROOMCAST__AUTH__ALGORITHM", "RS256")],
            "auth.public_key_file:",
        ),
        (
            vec![
                ("ROOMCAST__AUTH__ALGORITHM", "ES256"),
                ("ROOMCAST__AUTH__PUBLIC_KEY_FILE", "/etc/hostname"),
            ],
            "auth.public_key_file:",
        ),
        (
            vec![
                ("ROOMCAST__AUTH__ALGORITHM", "ES256"),
                ("ROOMCAST__AUTH__PUBLIC_KEY_FILE", "/nonexistent.pem"),
            ],
            "auth.public_key_file:",
        ),
    ] {
        let err = load(&pairs).unwrap_err();
        assert!(err.starts_with(key), "{pairs:?}: {err}");
    }
}

#[tokio::test]
async fn on_one_node_with_the_memory_bus_users_get_their_messages_the_same_way() {
    let node = Node::start(config(&auth_env(&[]))).await;
    let bob = token("bob", json!({}));
    let (mut phone, _) = connect(&node, "", &bob).await;
    let (mut laptop, _) = connect(&node, "", &bob).await;
    let (mut ana, _) = connect(&node, "", &token("ana", json!({}))).await;
    let (ack, _) = ana
        .request(
            json!({"op": "send", "to": "bob", "event": "notice", "data": 1}),
            1,
        )
        .await;
    assert_eq!(ack["op"], "ack");
    let (status, body) = node
        .request(
            "POST",
            "/api/publish",
            r#"{"to":"bob","event":"live","data":2}"#,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for c in [&mut phone, &mut laptop] {
        let first = c.recv_json().await;
        assert_eq!(
            (
                first["to"].as_str(),
                first["from"].as_str(),
                first["data"].as_i64()
            ),
            (Some("bob"), Some("ana"), Some(1))
        );
        assert_eq!(c.recv_json().await["data"], 2);
    }
    assert_eq!(node.metric("roomcast_users").await, 2.0);
}
