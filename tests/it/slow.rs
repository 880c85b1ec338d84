//! A client that stops reading is cut off; nobody else loses a message.

use futures::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::util::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_stops_reading_is_closed_as_slow_consumer_and_others_get_every_message() {
    let node = Node::ready(config(&[(
        "ROOMCAST__LIMITS__OUTBOUND_QUEUE_BYTES",
        "65536",
    )]))
    .await;

    // The slow client: a small receive window, so the kernel does not hide its slowness for long.
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = socket.connect(node.addr).await.expect("connect");
    let (ws, _) = tokio_tungstenite::client_async(
        node.ws_url("room=feed&format=raw"),
        MaybeTlsStream::Plain(stream),
    )
    .await
    .expect("slow client handshake");
    let mut slow = Client::new(ws);

    const N: u32 = 200;
    let mut fast = Client::raw(&node, "feed").await;
    let fast_reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < N as usize {
            match fast.recv().await {
                Message::Binary(b) => seen.push(u32::from_be_bytes([b[0], b[1], b[2], b[3]])),
                other => panic!("unexpected {other:?}"),
            }
        }
        seen
    });
    // The publisher is in the room too, so it reads (and drops) its own echoes.
    let (mut publish, mut echoes) = Client::raw(&node, "feed").await.ws.split();
    let echo_reader = tokio::spawn(async move { while let Some(Ok(_)) = echoes.next().await {} });

    let publisher = tokio::spawn(async move {
        let mut payload = vec![b'x'; 16 * 1024];
        for i in 0..N {
            payload[..4].copy_from_slice(&i.to_be_bytes());
            within("publish", publish.send(Message::binary(payload.clone())))
                .await
                .expect("publish");
        }
    });

    eventually("the slow consumer to be cut off", || async {
        node.metric("roomcast_slow_consumer_disconnects_total")
            .await
            == 1.0
    })
    .await;
    // Once it reads again it finds the documented close code after what the kernel held.
    assert_eq!(slow.closed().await, 4001);

    within("publishing", publisher).await.expect("publisher");
    let seen = within("the fast client to get everything", fast_reader)
        .await
        .expect("reader");
    assert_eq!(
        seen,
        (0..N).collect::<Vec<_>>(),
        "the fast client got every message, in order"
    );
    echo_reader.abort();
}
