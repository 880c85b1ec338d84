//! What one client can cost a node: protocol errors, streams after them,
//! floods, readers that never send. Each test is a probe that once found a
//! defect; it fails on the code that had it.

use std::process::Stdio;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::util::*;

const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const PING: u8 = 0x9;

/// A socket whose receive window is small, so the kernel hides little of a
/// client's slowness.
pub fn small_window() -> TcpSocket {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    socket
}

/// Write garbage again and again until the server ends the connection
/// (`true`) or `time` passed (`false`).
async fn stream_garbage(stream: &mut TcpStream, time: Duration) -> bool {
    let chunk = vec![0x5a_u8; 64 * 1024];
    let deadline = Instant::now() + time;
    loop {
        match tokio::time::timeout_at(deadline, stream.write_all(&chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_streaming_after_a_protocol_error_cost_the_node_no_memory() {
    let (node, addr) = start_binary(&[("ROOMCAST__LOG__LEVEL", "warn")], Stdio::null).await;
    let pid = node.0.id();
    // Warm up: one ordinary connection, so first-use allocations are not counted.
    let mut warm = RawWs::connect(addr, "room=r").await;
    assert_eq!(warm.frame().await.0, TEXT, "welcome");
    let before = rss_bytes(pid);

    // One client breaks the framing (reserved bits: 1002), one announces a
    // message over the limit (1009); both then keep streaming.
    let mut too_big = client_frame(true, BINARY, &[]);
    too_big[1] = 0x80 | 127;
    too_big.splice(2..2, (1u64 << 30).to_be_bytes());
    let openers = [vec![0xc1, 0x80, 1, 2, 3, 4], too_big];
    let mut tasks = Vec::new();
    for opener in openers {
        let mut ws = RawWs::connect(addr, "room=r").await;
        tasks.push(tokio::spawn(async move {
            ws.stream
                .write_all(&opener)
                .await
                .expect("write the bad frame");
            stream_garbage(&mut ws.stream, Duration::from_secs(4)).await
        }));
    }
    for task in tasks {
        let ended = within("the garbage streams", task).await.expect("task");
        assert!(
            ended,
            "the node did not end a failed connection that kept streaming"
        );
    }
    let grown = rss_bytes(pid).saturating_sub(before);
    assert!(
        grown < 8 << 20,
        "RSS grew by {} MiB while two failed clients streamed",
        grown >> 20
    );
    // And the node still serves.
    assert_eq!(http(addr, "GET", "/healthz", "").await.0, 200);
}

#[tokio::test]
async fn a_protocol_error_ends_the_connection_at_once_and_is_counted_once() {
    let node = Node::ready(config(&[])).await;
    for (bad_frame, code, label) in [
        (vec![0xc1, 0x80, 1, 2, 3, 4], 1002, "protocol_error"),
        (
            client_frame(true, BINARY, &vec![0; 70_000]),
            1009,
            "message_too_big",
        ),
    ] {
        let mut c = RawWs::connect(node.addr, "room=r&format=raw").await;
        // The bad frame, then more of the same that the server must ignore.
        let mut bytes = bad_frame.clone();
        for _ in 0..20 {
            bytes.extend_from_slice(&bad_frame);
        }
        let _ = c.stream.write_all(&bytes).await;
        let started = Instant::now();
        let (_, got) = c.until_close().await;
        assert_eq!(got, code);
        c.ended().await;
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "the server should end a failed connection itself, at once (took {:?})",
            started.elapsed()
        );
        let errors = node
            .metric(&format!("roomcast_client_errors_total{{code=\"{label}\"}}"))
            .await;
        assert_eq!(errors, 1.0, "{label} counted once per failed connection");
    }
}

#[tokio::test]
async fn bytes_sent_with_the_handshake_are_handled_at_once() {
    let node = Node::ready(config(&[])).await;
    let ping = client_frame(true, TEXT, br#"{"op":"ping","id":7}"#);
    let mut c = RawWs::connect_with(TcpSocket::new_v4().unwrap(), node.addr, "", &ping).await;
    let welcome: serde_json::Value = serde_json::from_slice(&c.frame().await.1).unwrap();
    assert_eq!(welcome["op"], "welcome");
    let pong: serde_json::Value = serde_json::from_slice(&c.frame().await.1).unwrap();
    assert_eq!(pong, json!({"op": "pong", "id": 7}));
}

/// A raw-mode publisher in `room` whose own echoes are read and dropped.
async fn publisher(node: &Node, room: &str) -> futures::stream::SplitSink<Ws, Message> {
    let (sink, mut echoes) = Client::raw(node, room).await.ws.split();
    tokio::spawn(async move { while let Some(Ok(_)) = echoes.next().await {} });
    sink
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_that_only_reads_gets_its_whole_backlog_then_1012_on_shutdown() {
    let mut node = Node::ready(config(&[
        ("ROOMCAST__LIMITS__MESSAGES_PER_SECOND", "0"),
        ("ROOMCAST__LIMITS__OUTBOUND_QUEUE_BYTES", "33554432"),
        ("ROOMCAST__SHUTDOWN__DRAIN", "0s"),
    ]))
    .await;
    let mut viewer =
        RawWs::connect_with(small_window(), node.addr, "room=show&format=raw", &[]).await;
    let mut publish = publisher(&node, "show").await;
    // About 10 MB: more than the kernel's buffers (up to 4 MiB each way), so
    // most of it waits in the node's queue for the viewer, below its limit.
    const N: u32 = 1200;
    let mut payload = vec![b'v'; 8 * 1024];
    for i in 0..N {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        publish
            .send(Message::binary(payload.clone()))
            .await
            .expect("publish");
    }
    // Everything is with the viewer's connection (socket or queue) before the node stops.
    eventually("all deliveries", || async {
        node.metric("roomcast_deliveries_total").await >= (2 * N) as f64
    })
    .await;
    node.begin_shutdown();
    let (frames, code) = viewer.until_close().await;
    let got: Vec<u32> = frames
        .iter()
        .map(|(_, p)| u32::from_be_bytes([p[0], p[1], p[2], p[3]]))
        .collect();
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "the whole backlog, in order"
    );
    assert_eq!(code, 1012);
    viewer.ended().await;
    node.finished().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_that_resumes_reading_gets_whole_frames_then_4001() {
    let node = Node::ready(config(&[
        ("ROOMCAST__LIMITS__MESSAGES_PER_SECOND", "0"),
        ("ROOMCAST__LIMITS__OUTBOUND_QUEUE_BYTES", "65536"),
    ]))
    .await;
    let mut viewer =
        RawWs::connect_with(small_window(), node.addr, "room=feed&format=raw", &[]).await;
    let mut publish = publisher(&node, "feed").await;
    let mut payload = vec![b's'; 16 * 1024];
    // More than the kernel's send buffer (up to 4 MiB) and the queue can hold.
    const N: usize = 600;
    for i in 0..N as u32 {
        payload[..4].copy_from_slice(&i.to_be_bytes());
        publish
            .send(Message::binary(payload.clone()))
            .await
            .expect("publish");
    }
    eventually("the viewer to be cut off", || async {
        node.metric("roomcast_slow_consumer_disconnects_total")
            .await
            == 1.0
    })
    .await;
    // It reads again: whole frames (a prefix of what was sent, in order), then 4001.
    let (frames, code) = viewer.until_close().await;
    for (i, (opcode, p)) in frames.iter().enumerate() {
        assert_eq!((*opcode, p.len()), (BINARY, 16 * 1024));
        assert_eq!(u32::from_be_bytes([p[0], p[1], p[2], p[3]]), i as u32);
    }
    assert!(frames.len() < N, "queued messages were dropped");
    assert_eq!(code, 4001);
    viewer.ended().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_pings_without_reading_is_cut_off_and_counted() {
    let node = Node::ready(config(&[(
        "ROOMCAST__LIMITS__OUTBOUND_QUEUE_BYTES",
        "16384",
    )]))
    .await;
    let mut c = RawWs::connect_with(small_window(), node.addr, "room=r", &[]).await;
    let ping = client_frame(true, PING, &[b'p'; 125]);
    let flood: Vec<u8> = ping
        .iter()
        .copied()
        .cycle()
        .take(ping.len() * 60_000)
        .collect();
    let _ = tokio::time::timeout(WAIT, c.stream.write_all(&flood)).await;
    eventually("the ping flooder to be cut off and counted", || async {
        node.metric("roomcast_slow_consumer_disconnects_total")
            .await
            == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_frames_beyond_the_rate_limit_are_dropped_and_counted() {
    let node = Node::ready(config(&[
        ("ROOMCAST__LIMITS__MESSAGES_PER_SECOND", "10"),
        ("ROOMCAST__LIMITS__MESSAGES_BURST", "20"),
        // Every frame is dropped and counted here; the abuse close is tested below.
        ("ROOMCAST__LIMITS__ABUSE_THRESHOLD", "0"),
    ]))
    .await;
    let mut publish = publisher(&node, "r").await;
    let started = Instant::now();
    for i in 0..500u32 {
        publish
            .send(Message::binary(i.to_be_bytes().to_vec()))
            .await
            .expect("send");
    }
    let dropped = "roomcast_messages_dropped_total{reason=\"rate_limited\"}";
    eventually("every frame to be published or dropped", || async {
        node.metric("roomcast_messages_in_total").await + node.metric(dropped).await == 500.0
    })
    .await;
    let allowed = 20.0 + 10.0 * started.elapsed().as_secs_f64().ceil();
    let published = node.metric("roomcast_messages_in_total").await;
    assert!(
        published <= allowed,
        "{published} raw frames got past a limit of 10/s, burst 20"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_leave_storms_are_rate_limited_and_cannot_flood_redis() {
    let redis = Redis::start().await;
    // Every refusal is answered here (the abuse close has its own tests).
    let node = Node::ready(redis_config(
        &redis,
        "a",
        &[("ROOMCAST__LIMITS__ABUSE_THRESHOLD", "0")],
    ))
    .await;
    let (mut c, _) = Client::json(&node, &[]).await;
    const PAIRS: u64 = 500;
    for i in 0..PAIRS {
        c.send_json(json!({"op": "join", "room": "churn", "id": 2 * i}))
            .await;
        c.send_json(json!({"op": "leave", "room": "churn", "id": 2 * i + 1}))
            .await;
    }
    let mut limited = 0;
    for _ in 0..2 * PAIRS {
        let reply = c.recv_json().await;
        if reply["op"] == "error" && reply["code"] == "rate_limited" {
            limited += 1;
        }
    }
    assert!(
        limited >= 2 * PAIRS - 200,
        "only {limited} of {} requests were limited",
        2 * PAIRS
    );
    let stats: String = redis.cmd(&["INFO", "commandstats"]).await;
    let calls = |cmd: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    };
    let churn = calls("subscribe") + calls("unsubscribe");
    assert!(churn <= 200, "{churn} SUBSCRIBE/UNSUBSCRIBE reached Redis");
}

#[tokio::test]
async fn deeply_nested_data_is_refused_and_error_frames_do_not_echo_large_input() {
    let node = Node::ready(config(&[])).await;
    let (mut c, _) = Client::json(&node, &["r"]).await;
    let nested =
        |depth: usize| -> String { format!("{}1{}", "[".repeat(depth), "]".repeat(depth)) };
    let frame = |depth: usize, id: u64| {
        format!(
            r#"{{"op":"send","room":"r","event":"e","data":{},"id":{id}}}"#,
            nested(depth)
        )
    };
    // The reply to request `id`, skipping the room's messages.
    async fn reply(c: &mut Client, id: u64) -> serde_json::Value {
        loop {
            let f = c.recv_json().await;
            if f["id"] == id {
                return f;
            }
        }
    }
    c.send(Message::text(frame(32, 1))).await;
    assert_eq!(
        reply(&mut c, 1).await,
        json!({"op": "ack", "id": 1}),
        "32 levels are fine"
    );
    c.send(Message::text(frame(10_000, 2))).await;
    let refused = reply(&mut c, 2).await;
    assert_eq!(refused["code"], "bad_frame", "{refused}");

    // A 60 KB string where a number belongs: the error says so, briefly.
    let id = "x".repeat(60_000);
    c.send(Message::text(format!(
        r#"{{"op":"send","room":"r","id":"{id}"}}"#
    )))
    .await;
    // (The echo of the first send may still be on its way: skip messages.)
    let mut next = c.recv().await;
    while matches!(&next, Message::Text(t) if t.contains(r#""op":"msg""#)) {
        next = c.recv().await;
    }
    match next {
        Message::Text(t) => {
            assert!(
                t.len() < 512,
                "a {}-byte error frame echoes the input",
                t.len()
            );
            assert!(t.contains("bad_frame"), "{t}");
        }
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[tokio::test]
async fn a_raw_client_flooding_past_its_rate_is_closed_with_4004() {
    let node = Node::ready(config(&[
        ("ROOMCAST__LIMITS__MESSAGES_PER_SECOND", "10"),
        ("ROOMCAST__LIMITS__MESSAGES_BURST", "20"),
        ("ROOMCAST__LIMITS__ABUSE_THRESHOLD", "50"),
    ]))
    .await;
    let mut flood = Client::raw(&node, "r").await;
    for i in 0..200u32 {
        // The server may close while we are still sending: stop then.
        if flood
            .ws
            .send(Message::binary(i.to_be_bytes().to_vec()))
            .await
            .is_err()
        {
            break;
        }
    }
    assert_eq!(flood.closed().await, 4004);
    assert_eq!(node.metric("roomcast_abuse_disconnects_total").await, 1.0);
}
