//! One WebSocket connection after the handshake, as a socket: the task that
//! pumps bytes both ways, reads frames, and runs the close handshake. What
//! the client's messages mean is its [`Session`]'s business.
//!
//! A connection is one task. It sleeps until the socket is readable, bytes
//! were queued for it (see `peer.rs`: normally the fan-out writes straight to
//! the socket and this task is not involved), or a close was requested. Its
//! read buffer exists only while it is reading, so an idle client costs the
//! task, its [`Peer`] and the kernel socket — no user-space buffers.

use std::future::poll_fn;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::auth::Identity;
use crate::gateway::{Admission, Gateway, IpGuard};
use crate::hub::RoomPin;
use crate::namespace::History;
use crate::peer::Peer;
use crate::protocol::{self, Format, Replay, Since};
use crate::session::{NodeLink, Session};
use crate::topic::{Target, Topic};
use crate::ws::{self, close, FrameReader, Incoming};

/// How long a closing connection may take to flush its close frame and get
/// the client's reply before the socket is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// After our close frame is out and our side is shut, how long we read (and
/// discard) for the client to end its side, so the kernel does not answer
/// its last bytes with a reset that could destroy our close frame unread.
const LINGER: Duration = Duration::from_secs(1);

/// Reads per wake-up before yielding to other connections.
const READS_PER_WAKE: usize = 16;

/// A connection that passed the HTTP upgrade.
pub struct Accepted {
    /// Its place under `limits.max_connections`, kept until the connection ends.
    pub admission: Admission,
    pub socket: TcpStream,
    /// Bytes the HTTP server read past the handshake (the start of the first frame).
    pub leftover: Bytes,
    pub format: Format,
    /// Rooms from the URL, already validated, deduplicated and pinned (subscribed).
    pub rooms: Vec<(Topic, RoomPin)>,
    /// `since=` points of the URL, by room (each also in `rooms`).
    pub since: Vec<(String, Since)>,
    /// Who the client is (from its token), and its user topic, pinned like the rooms.
    pub identity: Option<(Identity, RoomPin)>,
    /// Its place under `limits.max_connections_per_ip`.
    pub ip_guard: IpGuard,
}

/// Serve one connection until it closes.
///
/// A JSON client gets `welcome`, then a `presence` frame for each room of
/// its URL.
///
/// The set-up is synchronous, so the returned future — the state an idle
/// connection keeps for its whole life — holds only the [`Conn`] and its
/// read loop, not the set-up's locals.
pub fn serve(gw: Arc<Gateway>, accepted: Accepted) -> impl std::future::Future<Output = ()> {
    let (conn, held) = Conn::open(gw, accepted);
    conn.serve(held)
}

/// What the opening of a connection left to do before it serves, boxed: 8
/// bytes in the connection's state, which most connections never fill.
type Held = Option<Box<Opening>>;

#[derive(Default)]
struct Opening {
    /// URL rooms of a history namespace, held until their replay is read:
    /// (room, its rule, what to replay).
    history: Vec<(Topic, History, Replay)>,
    /// URL rooms this node had not read the presence of: their presence
    /// frame follows that read.
    unread: Vec<Topic>,
}

/// A JSON client's number for a room it just joined.
fn presence_frame(peer: &Peer, topic: &Topic, online: u64) {
    if let (Format::Json, Target::Room(room)) = (peer.format, topic.target()) {
        peer.send(&protocol::presence_frame(room, online));
    }
}

struct Conn {
    gw: Arc<Gateway>,
    peer: Arc<Peer>,
    session: Session,
    reader: FrameReader,
    /// The close handshake is complete (we replied to the client's close, or it answered ours).
    close_done: bool,
    started: Instant,
    _admission: Admission,
    _ip_guard: IpGuard,
}

/// Whether to keep serving after handling input.
enum Flow {
    Continue,
    Stop,
}

impl Conn {
    /// Register the client, greet it (JSON) and join the rooms it asked
    /// for; a JSON client's history rooms are held (joined in [`Conn::serve`]).
    fn open(gw: Arc<Gateway>, mut accepted: Accepted) -> (Conn, Held) {
        let seq = gw.next_seq();
        let id: Arc<str> = Arc::from(format!("{}-{seq:x}", gw.node_id));
        let peer = Arc::new(Peer::new(
            id,
            seq,
            accepted.format,
            accepted.socket,
            gw.config.limits.outbound_queue_bytes,
            gw.hub.now_ms(),
        ));
        gw.hub.register(peer.clone());
        gw.metrics.connections_opened.inc();
        // The welcome goes out before any room or user message can.
        if peer.format == Format::Json {
            let user = accepted.identity.as_ref().map(|(i, _)| &*i.user);
            peer.send(&protocol::welcome_frame(&peer.id, &gw.node_id, user));
        }
        let mut rooms = Vec::with_capacity(accepted.rooms.len());
        let mut held: Held = None;
        for (topic, pin) in accepted.rooms {
            let rule = match (peer.format, topic.target()) {
                (Format::Json, Target::Room(room)) => gw.config.namespaces.of(room).history,
                _ => None,
            };
            match rule {
                Some(rule) => {
                    let since = accepted
                        .since
                        .iter()
                        .position(|(r, _)| Target::Room(r) == topic.target());
                    let replay = since.map_or(Replay::None, |i| {
                        Replay::Since(accepted.since.swap_remove(i).1)
                    });
                    gw.hub.hold(&topic, &peer);
                    held.get_or_insert_with(Default::default)
                        .history
                        .push((topic, rule, replay));
                }
                None => {
                    gw.hub.join(&topic, &peer);
                    rooms.push(topic);
                }
            }
            drop(pin);
        }
        for topic in &rooms {
            match gw.presence.joined(topic) {
                Some(online) => presence_frame(&peer, topic, online),
                None => held
                    .get_or_insert_with(Default::default)
                    .unread
                    .push(topic.clone()),
            }
        }
        let reader = FrameReader::new(
            gw.config.limits.max_message_bytes,
            gw.config.limits.read_buffer_bytes,
            accepted.leftover,
        );
        let identity = accepted.identity.map(|(identity, pin)| {
            gw.hub.join(&Topic::user(&identity.user), &peer);
            drop(pin);
            if gw.config.auth.close_on_expiry {
                peer.set_token_expires(identity.expires);
                gw.expiries.schedule(identity.expires, peer.seq);
            }
            identity
        });
        let session = Session::new(&gw.config.limits, gw.hub.now_ms(), rooms, identity);
        let conn = Conn {
            gw,
            peer,
            session,
            reader,
            close_done: false,
            started: Instant::now(),
            _admission: accepted.admission,
            _ip_guard: accepted.ip_guard,
        };
        (conn, held)
    }

    /// Run until the connection ends, then leave everything it joined.
    ///
    /// An `async` block rather than an `async fn(self)`: the compiler keeps an
    /// `async fn`'s by-value argument twice in its future (rust-lang/rust#62958),
    /// which here would be 190 more bytes in every idle connection.
    #[allow(clippy::manual_async_fn)] // on purpose: see above
    fn serve(mut self, held: Held) -> impl std::future::Future<Output = ()> {
        async move {
            if let Some(held) = held {
                // Boxed, like the closing phase: rare, and large.
                Box::pin(self.finish_opening(*held)).await;
            }
            self.run().await;
            let (gw, peer) = (&self.gw, &self.peer);
            // End the TCP connection now, even if a fan-out still holds the peer for a moment.
            let _ = socket2::SockRef::from(&peer.socket).shutdown(std::net::Shutdown::Both);
            for topic in self.session.rooms() {
                gw.hub.leave(topic, peer);
            }
            // Boxed: rare next to waiting, and kept out of every idle connection's state.
            let link = NodeLink { gw, peer };
            Box::pin(self.session.ended(&link)).await;
            if let Some(user) = self.session.user() {
                let topic = Topic::user(user);
                gw.hub.leave(&topic, peer);
                if !gw.hub.has_members(&topic) {
                    gw.forget_user(user);
                }
            }
            gw.hub.unregister(peer);
            gw.metrics
                .connection_duration_seconds
                .observe(self.started.elapsed().as_secs_f64());
            tracing::debug!(conn = %peer.id, "connection closed");
        }
    }

    /// The presence frames of the URL's rooms that needed a read, then the
    /// URL's history rooms (held since the connection opened): each gets
    /// its ack, replay and presence frame as a `join` would.
    async fn finish_opening(&mut self, held: Opening) {
        for topic in &held.unread {
            let online = self.gw.presence.first_read(topic, &*self.gw.bus).await;
            presence_frame(&self.peer, topic, online);
        }
        let link = NodeLink {
            gw: &self.gw,
            peer: &self.peer,
        };
        for (topic, rule, replay) in held.history {
            self.session.join_held(&link, topic, rule, replay).await;
        }
    }

    /// Serve until the connection ends. The closing phase (bounded by
    /// [`CLOSE_GRACE`]) runs in a boxed future, so that the state an idle
    /// connection keeps between wake-ups stays small.
    async fn run(&mut self) {
        if self.serve_open().await {
            return;
        }
        // Counted here, once per connection, whatever overflowed its queue
        // (fan-out, pongs, acks, error frames, pings).
        if self
            .peer
            .closing()
            .is_some_and(|c| c.code == close::SLOW_CONSUMER)
        {
            self.gw.metrics.slow_consumer_disconnects.inc();
        }
        let _ = Box::pin(tokio::time::timeout(CLOSE_GRACE, self.finish_close())).await;
    }

    /// Move bytes both ways until a close begins (`false`) or the connection
    /// is gone (`true`).
    async fn serve_open(&mut self) -> bool {
        // Bytes that came in the same packet as the handshake are handled now,
        // not when the next packet wakes us.
        if self.reader.has_input() {
            if let Flow::Stop = self.process().await {
                return true;
            }
        }
        let mut want_write = false;
        loop {
            if self.peer.closing().is_some() {
                return false;
            }
            let mut readable = false;
            // poll_*_ready keep one waker slot each, which replaces the one
            // the HTTP server left there (and with it, its finished task).
            let socket = &self.peer.socket;
            tokio::select! {
                biased;
                _ = self.peer.wake.notified() => {}
                r = poll_fn(|cx| socket.poll_write_ready(cx)), if want_write => {
                    if r.is_err() {
                        return true;
                    }
                }
                r = poll_fn(|cx| socket.poll_read_ready(cx)) => {
                    if r.is_err() {
                        return true;
                    }
                    readable = true;
                }
            }
            if readable {
                if let Flow::Stop = self.read().await {
                    return true;
                }
            }
            match self.peer.flush() {
                Ok(drained) => want_write = !drained,
                Err(_) => return true,
            }
        }
    }

    /// The close handshake: write what must still go out, the close frame
    /// last, waiting for writability as long as it takes (a viewer that only
    /// reads gets every byte); then end the TCP connection ourselves — at once
    /// after a protocol error (RFC 6455 §7.1.7) or the client's own close, and
    /// after the client's close reply when the close was ours.
    async fn finish_close(&mut self) {
        loop {
            let drained = match self.peer.flush() {
                Ok(drained) => drained,
                Err(_) => return,
            };
            let failed = self.reader.failed();
            if drained && (self.close_done || failed) {
                break;
            }
            let socket = &self.peer.socket;
            let mut readable = false;
            tokio::select! {
                biased;
                r = poll_fn(|cx| socket.poll_write_ready(cx)), if !drained => {
                    if r.is_err() {
                        return;
                    }
                }
                // A failed connection's input is not read before our close is out:
                // the kernel's buffer, not ours, holds what it keeps sending.
                r = poll_fn(|cx| socket.poll_read_ready(cx)), if !failed => {
                    if r.is_err() {
                        return;
                    }
                    readable = true;
                }
            }
            if readable {
                if let Flow::Stop = self.read().await {
                    return;
                }
            }
        }
        let socket = &self.peer.socket;
        let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Write);
        let _ = tokio::time::timeout(LINGER, discard_until_eof(socket)).await;
    }

    /// Read what the socket has and handle every complete message.
    async fn read(&mut self) -> Flow {
        for _ in 0..READS_PER_WAKE {
            match self.peer.socket.try_read_buf(self.reader.read_buf()) {
                Ok(0) => return Flow::Stop,
                Ok(_) => {
                    self.peer.touch(self.gw.hub.now_ms());
                    if let Flow::Stop = self.process().await {
                        return Flow::Stop;
                    }
                    if self.reader.failed() {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return Flow::Stop,
            }
        }
        self.reader.release_if_idle();
        Flow::Continue
    }

    /// Handle every complete message in the read buffer. A protocol error
    /// starts failing the connection (counted once: the reader parses
    /// nothing after its first error).
    async fn process(&mut self) -> Flow {
        loop {
            match self.reader.next_message() {
                Ok(Some(msg)) => {
                    // Boxed: handling is rare next to waiting, and its
                    // state must not sit in every idle connection's task.
                    if let Flow::Stop = Box::pin(self.handle(msg)).await {
                        return Flow::Stop;
                    }
                }
                Ok(None) => return Flow::Continue,
                Err(e) => {
                    let code = match e.close_code() {
                        close::TOO_BIG => "message_too_big",
                        close::INVALID_PAYLOAD => "invalid_utf8",
                        _ => "protocol_error",
                    };
                    self.gw
                        .metrics
                        .client_errors
                        .with_label_values(&[code])
                        .inc();
                    tracing::debug!(conn = %self.peer.id, error = %e, "failing connection");
                    self.peer.close(e.close_code(), &e.to_string(), false);
                    return Flow::Continue;
                }
            }
        }
    }

    async fn handle(&mut self, msg: Incoming) -> Flow {
        if self.peer.closing().is_some() {
            // Closing: only the client's close frame matters now.
            if let Incoming::Close(_) = msg {
                self.close_done = true;
            }
            return Flow::Continue;
        }
        let link = NodeLink {
            gw: &self.gw,
            peer: &self.peer,
        };
        match msg {
            Incoming::Text(text) => match self.peer.format {
                Format::Json => self.session.json(&link, &text).await,
                Format::Raw => self.session.raw(&link, &text, false).await,
            },
            Incoming::Binary(data) => match self.peer.format {
                Format::Json => self.session.binary_in_json(&link),
                Format::Raw => self.session.raw(&link, &data, true).await,
            },
            Incoming::Ping(payload) => {
                self.peer.send(&ws::pong_frame(&payload));
            }
            Incoming::Pong => {}
            Incoming::Close(code) => {
                // Echo the client's code (the reader let only valid ones
                // through), as RFC 6455 asks; then we are done.
                self.peer.close(code.unwrap_or(close::NORMAL), "", true);
                self.close_done = true;
            }
        }
        Flow::Continue
    }
}

/// Read and drop everything until the client ends its side (or the socket fails).
async fn discard_until_eof(socket: &TcpStream) {
    let mut scratch = [0u8; 1024];
    loop {
        if poll_fn(|cx| socket.poll_read_ready(cx)).await.is_err() {
            return;
        }
        match socket.try_read(&mut scratch) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}
