//! One connected client as the rest of the node sees it: an id, a format,
//! and a way to hand it frames.
//!
//! The write path is the hot path of the gateway. [`Peer::send`] is called
//! by the room fan-out for every recipient of every message; it writes the
//! shared, pre-built frame straight to the socket with a non-blocking write
//! and returns. Only when the kernel's send buffer is full does it queue the
//! remainder (a cheap `Bytes` slice, never a copy) and wake the connection's
//! task, which drains the queue as the socket becomes writable. So a message
//! to 10,000 sockets costs 10,000 `write`s and no task wake-ups, and one slow
//! client only ever fills its own queue: past `limits.outbound_queue_bytes`
//! it is closed with [`close::SLOW_CONSUMER`], and nobody else notices.
//!
//! Invariant: the queue is non-empty only while the connection task has been
//! woken (or is waiting for writability) to drain it, so nothing is stranded.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use parking_lot::Mutex;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::protocol::Format;
use crate::ws::{self, close};

/// What happened to one frame handed to [`Peer::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// Written to the socket (or queued behind earlier bytes).
    Delivered,
    /// This frame overflowed the queue: the client is now being closed as a slow consumer.
    SlowConsumer,
    /// The connection is closing or gone; the frame was dropped.
    Closed,
}

/// Why and how a connection is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Closing {
    pub code: u16,
    /// Graceful closes send queued messages first; others discard them.
    pub graceful: bool,
}

pub struct Peer {
    /// Connection id, unique across the cluster (`<node>-<seq>`).
    pub id: Arc<str>,
    /// Node-local sequence number, the key of the hub's registry.
    pub seq: u64,
    pub format: Format,
    /// Shared between the connection task (reads, drains) and the fan-out (writes).
    pub socket: TcpStream,
    /// Wakes the connection task: bytes were queued, or a close was requested.
    pub wake: Notify,
    /// Milliseconds since the hub's epoch when the client last sent anything.
    last_seen: AtomicU64,
    /// `exp` (Unix seconds) of the client's token; 0: no token.
    token_expires: AtomicU64,
    queue_limit: usize,
    out: Mutex<Outbox>,
}

#[derive(Default)]
struct Outbox {
    /// Each queued frame, and whether it holds only messages the client may
    /// miss when it lags (its room and how many), see [`Peer::send_marked`].
    queue: VecDeque<(Bytes, Option<Mark>)>,
    queued: usize,
    closing: Option<Closing>,
    /// The socket failed; everything is dropped from now on.
    broken: bool,
    /// The front of the queue is the rest of a frame whose start is already
    /// on the wire: it must go out whole, or the stream is corrupt.
    front_started: bool,
}

/// A queued frame of droppable messages: `count` messages of `room`.
#[derive(Clone)]
pub struct Mark {
    pub room: Arc<str>,
    pub count: u32,
}

impl Outbox {
    fn push(&mut self, frame: Bytes) {
        self.push_marked(frame, None);
    }

    fn push_marked(&mut self, frame: Bytes, mark: Option<Mark>) {
        self.queued += frame.len();
        self.queue.push_back((frame, mark));
    }

    /// Over `limit`: drop droppable frames, oldest first (never one whose
    /// start is on the wire), until under it. Answers what was dropped, per room.
    fn shed(&mut self, limit: usize) -> Vec<(Arc<str>, u32)> {
        let mut dropped: Vec<(Arc<str>, u32)> = Vec::new();
        if !self.queue.iter().any(|(_, mark)| mark.is_some()) {
            return dropped;
        }
        let queue = std::mem::take(&mut self.queue);
        for (i, (frame, mark)) in queue.into_iter().enumerate() {
            let movable = i > 0 || !self.front_started;
            match mark {
                Some(m) if movable && self.queued > limit => {
                    self.queued -= frame.len();
                    match dropped.iter_mut().find(|(r, _)| *r == m.room) {
                        Some((_, n)) => *n += m.count,
                        None => dropped.push((m.room, m.count)),
                    }
                }
                mark => self.queue.push_back((frame, mark)),
            }
        }
        dropped
    }

    /// `written` bytes from the front of the queue went out. A frame cut by
    /// the write stays at the front, marked as started.
    fn consume(&mut self, written: usize) {
        self.queued -= written;
        let mut left = written;
        while left > 0 {
            let Some((front, _)) = self.queue.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                self.queue.pop_front();
                self.front_started = false;
            } else {
                front.advance(left);
                self.front_started = true;
                left = 0;
            }
        }
    }

    /// Drop every queued frame except a partly written one.
    fn discard(&mut self) {
        let keep = if self.front_started {
            self.queue.pop_front()
        } else {
            None
        };
        self.queue.clear();
        self.queued = 0;
        if let Some((front, _)) = keep {
            self.push(front);
        }
    }
}

impl Peer {
    pub fn new(
        id: Arc<str>,
        seq: u64,
        format: Format,
        socket: TcpStream,
        queue_limit: usize,
        now_ms: u64,
    ) -> Self {
        Peer {
            id,
            seq,
            format,
            socket,
            wake: Notify::new(),
            last_seen: AtomicU64::new(now_ms),
            token_expires: AtomicU64::new(0),
            queue_limit,
            out: Mutex::new(Outbox::default()),
        }
    }

    /// Hand one complete frame to this client. Never blocks.
    pub fn send(&self, frame: &Bytes) -> Sent {
        self.send_marked(frame, None).0
    }

    /// [`Peer::send`] a frame that, if it has to wait in the queue, the
    /// client may miss when it lags (`mark`: the droppable messages it
    /// holds). When the queue overflows, such frames are dropped oldest
    /// first and the client is told how many (`skipped` frames) before it
    /// would be closed as a slow consumer. Also answers how many messages
    /// were dropped.
    pub fn send_marked(&self, frame: &Bytes, mark: Option<Mark>) -> (Sent, u32) {
        let mut out = self.out.lock();
        if out.closing.is_some() || out.broken {
            return (Sent::Closed, 0);
        }
        self.write_or_queue(&mut out, frame, mark);
        if out.queued <= self.queue_limit {
            return (Sent::Delivered, 0);
        }
        let shed = out.shed(self.queue_limit);
        let skipped = shed.iter().map(|(_, n)| n).sum();
        if out.queued <= self.queue_limit {
            for (room, count) in shed {
                out.push(crate::protocol::skipped_frame(&room, count));
            }
            return (Sent::Delivered, skipped);
        }
        // More than the limit waits for this client: it is not keeping up.
        out.discard();
        out.closing = Some(Closing {
            code: close::SLOW_CONSUMER,
            graceful: false,
        });
        out.push(ws::close_frame(close::SLOW_CONSUMER, "slow consumer"));
        drop(out);
        self.wake.notify_one();
        (Sent::SlowConsumer, skipped)
    }

    /// Frames wait in this client's queue: it is behind.
    pub fn lagging(&self) -> bool {
        !self.out.lock().queue.is_empty()
    }

    /// Write directly when nothing is queued; queue what the socket did not take.
    fn write_or_queue(&self, out: &mut Outbox, frame: &Bytes, mark: Option<Mark>) {
        if !out.queue.is_empty() {
            out.push_marked(frame.clone(), mark);
            return;
        }
        match self.socket.try_write(frame) {
            Ok(n) if n == frame.len() => return,
            Ok(n) => {
                out.front_started = n > 0;
                out.push(frame.slice(n..));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                out.front_started = false;
                out.push_marked(frame.clone(), mark);
            }
            Err(_) => out.broken = true,
        }
        self.wake.notify_one();
    }

    /// Start closing: the close frame goes out (after queued messages when
    /// graceful), then the connection task ends the connection. Idempotent.
    pub fn close(&self, code: u16, reason: &str, graceful: bool) {
        let mut out = self.out.lock();
        if out.closing.is_some() || out.broken {
            return;
        }
        if !graceful {
            out.discard();
        }
        out.closing = Some(Closing { code, graceful });
        self.write_or_queue(&mut out, &ws::close_frame(code, reason), None);
        drop(out);
        self.wake.notify_one();
    }

    /// The close in progress, if any.
    pub fn closing(&self) -> Option<Closing> {
        self.out.lock().closing
    }

    /// Write queued bytes until the queue is empty (`Ok(true)`) or the socket
    /// would block (`Ok(false)`: wait for writability and call again).
    pub fn flush(&self) -> io::Result<bool> {
        let mut out = self.out.lock();
        if out.broken {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        while !out.queue.is_empty() {
            let written = {
                let slices: Vec<IoSlice<'_>> = out
                    .queue
                    .iter()
                    .take(64)
                    .map(|(b, _)| IoSlice::new(b))
                    .collect();
                match self.socket.try_write_vectored(&slices) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => {
                        out.broken = true;
                        return Err(e);
                    }
                }
            };
            out.consume(written);
        }
        Ok(true)
    }

    pub fn touch(&self, now_ms: u64) {
        self.last_seen.store(now_ms, Ordering::Relaxed);
    }

    /// The expiry of the client's current token (0: none).
    pub fn token_expires(&self) -> u64 {
        self.token_expires.load(Ordering::Acquire)
    }

    pub fn set_token_expires(&self, exp: u64) {
        self.token_expires.store(exp, Ordering::Release);
    }

    pub fn last_seen(&self) -> u64 {
        self.last_seen.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    const PAYLOAD: usize = 1000;

    /// A loopback socket pair with small kernel buffers, so that writes are
    /// partial as soon as the reading side lags: the real thing, not a mock.
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        socket2::SockRef::from(&server)
            .set_send_buffer_size(4096)
            .unwrap();
        socket2::SockRef::from(&client)
            .set_recv_buffer_size(4096)
            .unwrap();
        (server, client)
    }

    fn frame(i: usize) -> Bytes {
        ws::binary_frame(&[(i % 251) as u8; PAYLOAD])
    }

    /// Split what the client received into frames: (opcode, payload).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        while !bytes.is_empty() {
            let (opcode, payload) = ws::split_server_frame(bytes)
                .unwrap_or_else(|| panic!("corrupt stream after {} frames", out.len()));
            let header = if payload.len() < 126 { 2 } else { 4 };
            out.push((opcode, payload.to_vec()));
            bytes = &bytes[header + payload.len()..];
        }
        out
    }

    #[tokio::test]
    async fn a_close_after_a_partial_flush_keeps_the_started_frame_whole() {
        let (server, mut client) = pair().await;
        let peer = Peer::new(Arc::from("p"), 1, Format::Raw, server, 1 << 24, 0);
        // Fill the socket until frames wait in the queue.
        let mut sent = 0;
        while peer.out.lock().queue.len() < 200 {
            assert_eq!(peer.send(&frame(sent)), Sent::Delivered);
            sent += 1;
        }
        // Let the client read a little at a time until a flush cuts a frame.
        let mut received = Vec::new();
        let mut buf = vec![0u8; 700];
        for _ in 0..1000 {
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
                .await
                .expect("client read")
                .unwrap();
            received.extend_from_slice(&buf[..n]);
            peer.flush().unwrap();
            let out = peer.out.lock();
            if out
                .queue
                .front()
                .is_some_and(|(f, _)| f.len() != PAYLOAD + 4)
            {
                assert!(out.front_started, "a cut frame must be marked as started");
                break;
            }
        }
        // Now the client is closed as a slow consumer: queued frames are dropped,
        // but the one whose start is on the wire must be finished first.
        peer.close(close::SLOW_CONSUMER, "slow consumer", false);
        loop {
            let drained = peer.flush().unwrap();
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
                .await
                .expect("client read")
                .unwrap();
            received.extend_from_slice(&buf[..n]);
            if drained && n == 0 || received.ends_with(b"slow consumer") {
                break;
            }
        }
        let got = frames(&received);
        let (last, data) = got.split_last().unwrap();
        assert_eq!(last.0, ws::OPCODE_CLOSE);
        assert_eq!(&last.1[..2], &close::SLOW_CONSUMER.to_be_bytes());
        assert!(data.len() < sent, "queued frames were dropped");
        for (i, (opcode, payload)) in data.iter().enumerate() {
            assert_eq!(*opcode, ws::OPCODE_BINARY);
            assert_eq!(payload[..], [(i % 251) as u8; PAYLOAD], "frame {i}");
        }
    }
}
