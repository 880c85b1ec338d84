//! Heartbeats and graceful shutdown.

use std::process::Stdio;

use serde_json::json;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_closed_after_the_heartbeat_timeout_and_a_responsive_one_stays() {
    let node = Node::ready(config(&[
        ("ROOMCAST__HEARTBEAT__INTERVAL", "100ms"),
        ("ROOMCAST__HEARTBEAT__TIMEOUT", "400ms"),
    ]))
    .await;
    // tungstenite answers pings only while the stream is polled: `silent` is not polled.
    let (mut silent, _) = Client::json(&node, &["r"]).await;
    let (mut alive, _) = Client::json(&node, &["r"]).await;
    let keepalive = tokio::spawn(async move {
        // Poll (and so answer pings) until the test is satisfied, then hand the client back.
        let mut pings = 0;
        while pings < 8 {
            use futures::StreamExt;
            match alive.ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => pings += 1,
                // The room's online count (state, not a message).
                Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t)))
                    if t.contains(r#""op":"presence""#) => {}
                Some(Ok(other)) => panic!("unexpected {other:?}"),
                _ => panic!("alive client lost its connection"),
            }
        }
        alive
    });
    eventually("the silent client to time out", || async {
        node.metric("roomcast_heartbeat_timeouts_total").await == 1.0
    })
    .await;
    assert_eq!(silent.closed().await, 4002);
    let mut alive = within("eight pings", keepalive)
        .await
        .expect("keepalive task");
    let (ack, _) = alive
        .request(send_frame("r", "comment", json!("still here")), 1)
        .await;
    assert_eq!(ack["op"], "ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_clients_with_1012_spread_over_the_drain_and_readyz_is_503_meanwhile() {
    let mut node = Node::ready(config(&[("ROOMCAST__SHUTDOWN__DRAIN", "1s")])).await;
    // Each client waits for its close frame and notes when it came.
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let mut c = Client::json(&node, &["r"]).await.0;
        waiting.push(tokio::spawn(async move {
            (c.closed().await, tokio::time::Instant::now())
        }));
    }
    node.begin_shutdown();
    node.wait_ready(503).await;
    let (status, body) = node.get("/readyz").await;
    assert_eq!(status, 503);
    assert!(body.contains(r#""draining":true"#), "{body}");
    // No new clients while draining.
    let err = tokio_tungstenite::connect_async(node.ws_url("room=r"))
        .await
        .expect_err("refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => {
            assert_eq!(resp.status().as_u16(), 503)
        }
        other => panic!("expected HTTP 503, got {other}"),
    }
    let mut closed_at = Vec::new();
    for w in waiting {
        let (code, at) = within("a close frame", w).await.expect("client task");
        assert_eq!(code, 1012);
        closed_at.push(at);
    }
    // Spread: 1 s over 4 clients puts the last close about 750 ms after the first.
    let first = *closed_at.iter().min().unwrap();
    let spread = *closed_at.iter().max().unwrap() - first;
    assert!(
        spread.as_millis() >= 500,
        "closes should be spread over the drain, got {spread:?}"
    );
    node.finished().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_clients_with_1012_and_exits_zero() {
    let (mut child, addr) = start_binary("300ms", "warn", Stdio::null).await;
    let mut c = Client::connect(&format!("ws://{addr}/ws?room=r")).await;
    assert_eq!(c.recv_json().await["op"], "welcome");

    child.signal("TERM");
    assert_eq!(c.closed().await, 1012);
    let exit = child.exited("the binary to exit").await;
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_still_stops_the_node_when_its_log_output_is_a_broken_pipe() {
    let (mut child, _addr) = start_binary("100ms", "info", Stdio::piped).await;
    // Whoever read the logs went away (a log shipper died, `roomcast | head`).
    drop(child.0.stdout.take());
    drop(child.0.stderr.take());
    child.signal("TERM");
    let exit = child.exited("the binary to exit after SIGTERM").await;
    assert_eq!(exit.code(), Some(0));
}

/// The real `roomcast` binary on a free port, listening; its stdout and stderr go to `output`.
async fn start_binary(
    drain: &str,
    log_level: &str,
    output: fn() -> Stdio,
) -> (KillOnDrop, std::net::SocketAddr) {
    crate::util::start_binary(
        &[
            ("ROOMCAST__SHUTDOWN__DRAIN", drain),
            ("ROOMCAST__LOG__LEVEL", log_level),
        ],
        output,
    )
    .await
}

/// The binary with its stdout read line by line (stderr discarded).
async fn start_logged(
    env: &[(&str, &str)],
) -> (
    KillOnDrop,
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (mut child, addr) = crate::util::start_binary(env, Stdio::piped).await;
    drop(child.0.stderr.take());
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    (child, addr, rx)
}

/// Wait for a log line containing `needle`; returns it.
async fn log_line(
    lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    needle: &str,
) -> String {
    within(&format!("a log line with {needle:?}"), async {
        loop {
            let line = lines.recv().await.expect("the binary's output ended");
            if line.contains(needle) {
                return line;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_names_the_bus_and_has_no_colour_codes_when_not_a_terminal() {
    let (_child, _addr, mut lines) = start_logged(&[("ROOMCAST__LOG__LEVEL", "info")]).await;
    let line = log_line(&mut lines, "bus: memory").await;
    assert!(line.contains("single node"), "{line}");
    let line = log_line(&mut lines, "roomcast listening").await;
    assert!(
        !line.contains('\x1b'),
        "ANSI escape in piped logs: {line:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_sigusr1_keep_the_node_serving_and_sigquit_drains_it() {
    let (mut child, addr, mut lines) = start_logged(&[
        ("ROOMCAST__LOG__LEVEL", "info"),
        ("ROOMCAST__SHUTDOWN__DRAIN", "100ms"),
    ])
    .await;
    log_line(&mut lines, "roomcast listening").await;
    let mut c = Client::connect(&format!("ws://{addr}/ws?room=r")).await;
    assert_eq!(c.recv_json().await["op"], "welcome");

    child.signal("HUP");
    log_line(&mut lines, "SIGHUP").await;
    child.signal("USR1");
    let status = log_line(&mut lines, "status").await;
    assert!(status.contains("connections=1"), "{status}");
    // Still alive, same client, still delivering.
    assert!(
        child.0.try_wait().expect("try_wait").is_none(),
        "the node died"
    );
    let (ack, _) = c
        .request(send_frame("r", "e", json!("after signals")), 1)
        .await;
    assert_eq!(ack["op"], "ack");

    child.signal("QUIT");
    assert_eq!(c.closed().await, 1012);
    assert_eq!(
        child
            .exited("the binary to exit after SIGQUIT")
            .await
            .code(),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_during_the_drain_exits_at_once() {
    // A drain of a minute, with a client to drain.
    let (mut child, addr, mut lines) = start_logged(&[
        ("ROOMCAST__LOG__LEVEL", "info"),
        ("ROOMCAST__SHUTDOWN__DRAIN", "60s"),
    ])
    .await;
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = Client::connect(&format!("ws://{addr}/ws?room=r")).await;
        assert_eq!(c.recv_json().await["op"], "welcome");
        clients.push(c);
    }
    child.signal("TERM");
    log_line(&mut lines, "shutting down").await;
    assert!(
        child.0.try_wait().expect("try_wait").is_none(),
        "still draining"
    );
    let started = std::time::Instant::now();
    child.signal("TERM");
    let exit = child
        .exited("the binary to exit after a second SIGTERM")
        .await;
    assert_eq!(exit.code(), Some(130));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
