//! The node's edge under attack and misuse: connections that trickle or
//! never finish a handshake, slow bodies, malformed handshakes, forged
//! cross-site publishes, the internal listener, and running out of file
//! descriptors.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::util::*;

/// Send `request` on a new connection and read one response (up to its
/// Content-Length, or until the server closes): (status, body). Status 0
/// means the connection closed without a response.
async fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    within("an HTTP exchange", async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write request");
        let mut resp = Vec::new();
        loop {
            let text = String::from_utf8_lossy(&resp).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                });
                if length.is_some_and(|n| body.len() >= n) {
                    break;
                }
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => resp.extend_from_slice(&chunk[..n]),
            }
        }
        let resp = String::from_utf8_lossy(&resp).to_string();
        let status = resp
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    })
    .await
}

/// Wait until the server ends `stream` (EOF or reset); returns how long it took.
async fn until_closed(stream: &mut TcpStream, what: &str) -> Duration {
    let start = Instant::now();
    within(what, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    start.elapsed()
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON error body ({e}): {body:?}"));
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn silent_and_trickling_handshakes_are_closed_by_the_header_timeout() {
    let node = Node::start(config(&[("ROOMCAST__SERVER__HEADER_TIMEOUT", "300ms")])).await;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(node.addr).await.expect("connect"));
    }
    // Trickle a handshake one byte every 20 ms, header line after header
    // line, never finishing it; each writer ends when the server has closed.
    let head = upgrade_request(node.addr, "room=a");
    let head = head.trim_end().to_string() + "\r\n";
    let mut trickling = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(node.addr).await.expect("connect");
        let head = head.clone();
        trickling.push(tokio::spawn(async move {
            let bytes = head.bytes().chain(b"X-Slow: y\r\n".iter().copied().cycle());
            for b in bytes {
                if s.write_all(&[b]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for s in &mut silent {
        let took = until_closed(s, "a silent connection to be closed").await;
        assert!(took < Duration::from_secs(3), "closed only after {took:?}");
    }
    for writer in trickling {
        // The writer stops once the server has closed the connection.
        within("a trickling connection to be closed", writer)
            .await
            .expect("writer task");
    }
    eventually(
        "handshakes_aborted{header_timeout} to count all 40",
        || async {
            node.metric("roomcast_handshakes_aborted_total{reason=\"header_timeout\"}")
                .await
                >= 40.0
        },
    )
    .await;
    // The node still serves new clients.
    let (c, _) = Client::json(&node, &["a"]).await;
    c.close().await;
}

#[tokio::test]
async fn beyond_the_pending_cap_the_oldest_handshake_makes_room_for_a_new_client() {
    let node = Node::start(config(&[
        ("ROOMCAST__SERVER__MAX_PENDING_CONNECTIONS", "8"),
        ("ROOMCAST__SERVER__HEADER_TIMEOUT", "60s"),
        ("ROOMCAST__SERVER__HANDSHAKE_TIMEOUT", "60s"),
    ]))
    .await;
    let mut silent = Vec::new();
    for _ in 0..8 {
        silent.push(TcpStream::connect(node.addr).await.expect("connect"));
    }
    eventually("8 pending connections", || async {
        node.metric("roomcast_pending_connections").await >= 8.0
    })
    .await;
    // Each /metrics request above was itself a pending connection and evicted
    // one; what matters: a new client is never locked out.
    let (mut c, _) = Client::json(&node, &["a"]).await;
    let (status, _) = node
        .request("POST", "/api/publish", r#"{"room":"a","event":"e"}"#)
        .await;
    assert_eq!(status, 200);
    assert_eq!(c.recv_json().await["event"], "e");
    let took = until_closed(&mut silent[0], "the oldest silent connection to be evicted").await;
    assert!(took < Duration::from_secs(5));
    assert!(
        node.metric("roomcast_handshakes_aborted_total{reason=\"evicted\"}")
            .await
            >= 1.0
    );
    assert!(node.metric("roomcast_pending_connections").await <= 8.0);
}

#[tokio::test]
async fn a_request_without_its_first_response_in_time_is_closed_and_a_slow_body_gets_408() {
    // The handshake deadline: head sent, body never finishes, body timeout far off.
    let node = Node::start(config(&[
        ("ROOMCAST__SERVER__HANDSHAKE_TIMEOUT", "300ms"),
        ("ROOMCAST__SERVER__BODY_TIMEOUT", "60s"),
    ]))
    .await;
    let mut s = TcpStream::connect(node.addr).await.expect("connect");
    s.write_all(
        format!("POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{").as_bytes(),
    )
    .await
    .expect("write");
    let took = until_closed(&mut s, "the handshake deadline to close the connection").await;
    assert!(took < Duration::from_secs(3), "closed after {took:?}");
    eventually("handshakes_aborted{handshake_timeout}", || async {
        node.metric("roomcast_handshakes_aborted_total{reason=\"handshake_timeout\"}")
            .await
            >= 1.0
    })
    .await;

    // The body deadline answers 408 with a JSON error.
    let node = Node::start(config(&[("ROOMCAST__SERVER__BODY_TIMEOUT", "300ms")])).await;
    let (status, body) = exchange(
        node.addr,
        format!("POST /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {TEST_API_KEY}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{").as_bytes(),
    )
    .await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (408, "timeout"),
        "{body}"
    );
}

#[tokio::test]
async fn api_publish_accepts_only_json_so_a_web_page_cannot_forge_events() {
    let node = Node::start(config(&[])).await;
    let (mut c, _) = Client::json(&node, &["a"]).await;
    let body = r#"{"room":"a","event":"gift","data":1}"#;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let header = content_type
            .map(|t| format!("Content-Type: {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {TEST_API_KEY}\r\n{header}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, resp) = exchange(node.addr, req.as_bytes()).await;
        assert_eq!(
            (status, error_code(&resp).as_str()),
            (415, "unsupported_media_type"),
            "{content_type:?}"
        );
    }
    // With a charset parameter it is still JSON.
    let req = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {TEST_API_KEY}\r\nContent-Type: Application/JSON; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(exchange(node.addr, req.as_bytes()).await.0, 200);
    // Only the accepted publish reached the room.
    let got = c.recv_json().await;
    assert_eq!(
        (got["event"].as_str(), got["data"].as_i64()),
        (Some("gift"), Some(1))
    );
    c.close().await;
}

#[tokio::test]
async fn a_handshake_with_a_malformed_key_or_http_1_0_gets_400() {
    let node = Node::start(config(&[])).await;
    let handshake = |version: &str, key: &str| {
        format!(
            "GET /ws?room=a HTTP/{version}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{key}Sec-WebSocket-Version: 13\r\n\r\n"
        )
    };
    for key in [
        "Sec-WebSocket-Key: \r\n",
        "Sec-WebSocket-Key: abc\r\n",
        "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAA\r\n", // 15 bytes
        "Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAAAAAA==\r\n", // 19 bytes
        "Sec-WebSocket-Key: not*base64*at*all*!!==\r\n",
    ] {
        let (status, body) = exchange(node.addr, handshake("1.1", key).as_bytes()).await;
        assert_eq!(
            (status, error_code(&body).as_str()),
            (400, "bad_request"),
            "{key:?}"
        );
    }
    let good = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let (status, body) = exchange(node.addr, handshake("1.0", good).as_bytes()).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (400, "bad_request"),
        "HTTP/1.0"
    );
    // The same key over HTTP/1.1 is accepted.
    let mut ok = RawWs::connect(node.addr, "room=a").await;
    let (op, _) = ok.frame().await;
    assert_eq!(op, 1, "welcome");
}

#[tokio::test]
async fn with_an_internal_listener_metrics_and_the_api_are_served_only_there() {
    let node = Node::start_with(config(&[]), true).await;
    let internal = node.internal.expect("internal listener");
    let (mut c, _) = Client::json(&node, &["a"]).await;
    let publish = r#"{"room":"a","event":"live","data":"x"}"#;
    // Public: no /metrics, no /api; /healthz and /readyz stay for load balancers.
    for (method, path) in [("GET", "/metrics"), ("POST", "/api/publish")] {
        let (status, body) = http(node.addr, method, path, publish).await;
        assert_eq!(
            (status, error_code(&body).as_str()),
            (404, "not_found"),
            "{path}"
        );
    }
    assert_eq!(http(node.addr, "GET", "/healthz", "").await.0, 200);
    // Internal: the API delivers to the public client; metrics are there; no /ws.
    assert_eq!(http(internal, "POST", "/api/publish", publish).await.0, 200);
    assert_eq!(c.recv_json().await["event"], "live");
    let (status, metrics) = http(internal, "GET", "/metrics", "").await;
    assert_eq!(status, 200);
    assert_eq!(metric_value(&metrics, "roomcast_connections"), Some(1.0));
    assert_eq!(http(internal, "GET", "/readyz", "").await.0, 200);
    assert_eq!(http(internal, "GET", "/ws?room=a", "").await.0, 404);
    c.close().await;
}

#[tokio::test]
async fn out_of_file_descriptors_the_node_refuses_cleanly_and_keeps_serving() {
    assert!(
        std::path::Path::new("/usr/bin/prlimit").exists(),
        "prlimit not found: install util-linux (`apt-get install -y util-linux`)"
    );
    // 256 files: the node keeps 64 in reserve, 48 for pending connections
    // and 144 for WebSocket clients (listener::FdBudget).
    let (child, addr) = start_binary_under(
        &["/usr/bin/prlimit", "--nofile=256:256", "--"],
        &[
            ("ROOMCAST__SERVER__HEADER_TIMEOUT", "60s"),
            ("ROOMCAST__SERVER__HANDSHAKE_TIMEOUT", "60s"),
        ],
        Stdio::null,
    )
    .await;
    let mut clients = Vec::new();
    for _ in 0..144 {
        clients.push(RawWs::connect(addr, "room=a").await);
    }
    // The 145th is refused with a 503 a load balancer can retry elsewhere.
    let (status, body) = exchange(addr, upgrade_request(addr, "room=a").as_bytes()).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (503, "too_many_connections"),
        "{body}"
    );
    // Far more silent sockets than the node has files left.
    let mut silent = Vec::new();
    for _ in 0..150 {
        silent.push(TcpStream::connect(addr).await.expect("connect"));
    }
    // Health checks and the API still answer, and every client still receives.
    for _ in 0..5 {
        assert_eq!(http(addr, "GET", "/healthz", "").await.0, 200);
    }
    assert_eq!(
        http(
            addr,
            "POST",
            "/api/publish",
            &json!({"room":"a","event":"still-here"}).to_string()
        )
        .await
        .0,
        200
    );
    for c in &mut clients {
        // Skip the welcome frame and the room's presence frames, then the broadcast.
        let (_, welcome) = c.frame().await;
        assert!(String::from_utf8_lossy(&welcome).contains("welcome"));
        let msg = loop {
            let (_, frame) = c.frame().await;
            if !String::from_utf8_lossy(&frame).contains(r#""op":"presence""#) {
                break frame;
            }
        };
        assert!(String::from_utf8_lossy(&msg).contains("still-here"));
    }
    drop(child);
}
