//! A client's session: what the node knows about one connection (its
//! rooms, its flood-control buckets, and — with auth — who it is) and one
//! small function per operation it may ask for, each in its own file:
//! [`join`], [`leave`], [`send`] (to a room or a user), [`refresh`] (a new
//! token), [`ping`] (JSON requests) and [`raw`] (raw-mode frames).
//!
//! A session never touches a socket. It acts through a [`Link`]: the node
//! (hub, bus, metrics) and its own client's outbound queue. The connection
//! task (`conn.rs`) owns the socket and hands each complete message here;
//! unit tests drive a session through a recording `Link` instead.

mod join;
mod leave;
mod ping;
mod raw;
mod refresh;
mod send;

use std::sync::Arc;

use bytes::Bytes;

use crate::auth::{AuthError, Identity};
use crate::config::{AuthConfig, Limits};
use crate::error::{ErrorCode, Rejection};
use crate::gateway::{Gateway, Publish, Reply};
use crate::limit::TokenBucket;
use crate::peer::Peer;
use crate::protocol::{self, Request};
use crate::topic::{Target, Topic};

/// What a session needs from the rest of the node.
pub(crate) trait Link {
    fn limits(&self) -> &Limits;
    fn auth(&self) -> &AuthConfig;
    /// Verify a token (refusals are counted).
    fn verify(&self, token: &str) -> Result<Identity, AuthError>;
    /// The connection's token now expires at `exp` (Unix seconds).
    fn token_expires(&self, exp: u64);
    /// Milliseconds on the node's clock (rate limits).
    fn now_ms(&self) -> u64;
    /// This connection's id (`from` of what it sends).
    fn conn_id(&self) -> &str;
    /// A frame to this client.
    fn reply(&self, frame: &Bytes);
    /// Receive `topic`'s messages from now on (subscribing the node if needed).
    fn join(&self, topic: &Topic);
    fn leave(&self, topic: &Topic);
    /// `true` once every join so far is in effect on the bus; `false` if the bus is down.
    async fn synced(&self) -> bool;
    /// This client's join of room `topic` is acknowledged: tell the room;
    /// answers how many are in it now, across the cluster.
    fn joined(&self, topic: &Topic) -> u64;
    /// Hand a message to the bus; the client hears the outcome as `reply` says.
    async fn publish(&self, topic: Topic, envelope: Bytes, reply: Reply);
    /// Count a refusal (`roomcast_client_errors_total{code}`).
    fn refused(&self, code: ErrorCode);
    /// Count a raw message that was dropped (`roomcast_messages_dropped_total{reason}`).
    fn dropped(&self, reason: &'static str);
}

/// One connection's state, beyond its socket.
pub(crate) struct Session {
    /// The rooms it is in, in join order (raw mode: exactly one).
    rooms: Vec<Topic>,
    /// Who it is, from its token; `None`: anonymous. Boxed: most viewers
    /// of a big room are anonymous, and pay 8 bytes for it.
    identity: Option<Box<Identity>>,
    /// Flood control on what this client publishes (`limits.messages_*`)…
    messages: TokenBucket,
    /// …and on its other requests (`limits.commands_*`).
    commands: TokenBucket,
}

impl Session {
    /// A session already in `rooms` (joined by the caller), as `identity`.
    pub fn new(
        limits: &Limits,
        now_ms: u64,
        rooms: Vec<Topic>,
        identity: Option<Identity>,
    ) -> Session {
        Session {
            rooms,
            identity: identity.map(Box::new),
            messages: TokenBucket::new(limits.messages, now_ms),
            commands: TokenBucket::new(limits.commands, now_ms),
        }
    }

    /// The rooms to leave when the connection ends.
    pub fn rooms(&self) -> &[Topic] {
        &self.rooms
    }

    /// The authenticated user, if any.
    pub fn user(&self) -> Option<&str> {
        self.identity.as_deref().map(|i| &*i.user)
    }

    /// Who its messages are from: its user (with the user's `info`) when
    /// authenticated, else its connection.
    fn sender<'a>(&'a self, conn: &'a str) -> protocol::Sender<'a> {
        match self.identity.as_deref() {
            Some(identity) => protocol::Sender {
                from: &identity.user,
                conn,
                info: identity.info.as_deref(),
            },
            None => protocol::Sender {
                from: conn,
                conn,
                info: None,
            },
        }
    }

    /// May it publish (to rooms and users)? `forbidden` if not.
    fn may_send(&self, link: &impl Link, id: Option<u64>) -> Result<(), Rejection> {
        let (allowed, why) = match self.identity.as_deref() {
            Some(identity) => (identity.can_send, "your token does not allow sending"),
            None => (
                link.auth().anonymous_send,
                "anonymous connections may only watch here: connect with a token to send",
            ),
        };
        match allowed {
            true => Ok(()),
            false => Err(Rejection::new(id, ErrorCode::Forbidden, why)),
        }
    }

    /// Where the joined room named `room` is in [`Session::rooms`].
    fn position(&self, room: &str) -> Option<usize> {
        self.rooms
            .iter()
            .position(|t| t.target() == Target::Room(room))
    }

    /// The joined room named `room`, if any.
    fn room(&self, room: &str) -> Option<&Topic> {
        self.position(room).map(|i| &self.rooms[i])
    }

    /// A JSON text frame from the client: parse it, apply the rate limits,
    /// and carry it out.
    pub async fn json(&mut self, link: &impl Link, text: &[u8]) {
        // The frame reader has validated UTF-8 already.
        let Ok(text) = std::str::from_utf8(text) else {
            return reject(
                link,
                Rejection::new(None, ErrorCode::BadFrame, "text is not UTF-8"),
            );
        };
        let (id, request) = match protocol::parse_request(text) {
            Ok(parsed) => parsed,
            Err(rejection) => return reject(link, rejection),
        };
        if let Err(rejection) = self.allow(link, &request) {
            return reject(link, rejection.with_id(id));
        }
        match request {
            Request::Join { room } => join::run(self, link, id, &room).await,
            Request::Leave { room } => leave::run(self, link, id, &room),
            Request::Send { room, event, data } => {
                send::run(self, link, id, &room, &event, data).await
            }
            Request::SendToUser { user, event, data } => {
                send::to_user(self, link, id, &user, &event, data).await
            }
            Request::Refresh { token } => refresh::run(self, link, id, &token),
            Request::Ping => ping::run(link, id),
        }
    }

    /// A raw-mode frame: published to the connection's room.
    pub async fn raw(&mut self, link: &impl Link, payload: &[u8], binary: bool) {
        raw::run(self, link, payload, binary).await
    }

    /// A binary frame on a JSON connection.
    pub fn binary_in_json(&self, link: &impl Link) {
        reject(
            link,
            Rejection::new(
                None,
                ErrorCode::BadFrame,
                "binary frames are not accepted in JSON mode",
            ),
        )
    }

    /// Take a token for `request` from its bucket, or say why not.
    fn allow(&mut self, link: &impl Link, request: &Request) -> Result<(), Rejection> {
        let limits = link.limits();
        let now = link.now_ms();
        let (allowed, what, rate) = match request {
            Request::Send { .. } | Request::SendToUser { .. } => (
                self.messages.allow(limits.messages, now),
                "messages",
                limits.messages.per_second,
            ),
            _ => (
                self.commands.allow(limits.commands, now),
                "requests",
                limits.commands.per_second,
            ),
        };
        match allowed {
            true => Ok(()),
            false => Err(Rejection::new(
                None,
                ErrorCode::RateLimited,
                format!("more than {rate} {what} per second; slow down"),
            )),
        }
    }
}

/// Send the client an error frame, and count it.
fn reject(link: &impl Link, rejection: Rejection) {
    link.refused(rejection.code);
    link.reply(&protocol::error_frame(&rejection));
}

/// Acknowledge a request that had an id.
fn ack(link: &impl Link, id: Option<u64>) {
    if let Some(id) = id {
        link.reply(&protocol::ack_frame(id));
    }
}

/// The [`Link`] of a real connection: its node and its [`Peer`].
pub(crate) struct NodeLink<'a> {
    pub gw: &'a Arc<Gateway>,
    pub peer: &'a Arc<Peer>,
}

impl Link for NodeLink<'_> {
    fn limits(&self) -> &Limits {
        &self.gw.config.limits
    }

    fn auth(&self) -> &AuthConfig {
        &self.gw.config.auth
    }

    fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.gw.verify(token)
    }

    fn token_expires(&self, exp: u64) {
        if self.gw.config.auth.close_on_expiry {
            self.peer.set_token_expires(exp);
            self.gw.expiries.schedule(exp, self.peer.seq);
        }
    }

    fn now_ms(&self) -> u64 {
        self.gw.hub.now_ms()
    }

    fn conn_id(&self) -> &str {
        &self.peer.id
    }

    fn reply(&self, frame: &Bytes) {
        self.peer.send(frame);
    }

    fn join(&self, topic: &Topic) {
        self.gw.hub.join(topic, self.peer);
    }

    fn leave(&self, topic: &Topic) {
        self.gw.hub.leave(topic, self.peer);
    }

    async fn synced(&self) -> bool {
        self.gw.hub.sync().await
    }

    fn joined(&self, topic: &Topic) -> u64 {
        self.gw.presence.joined(topic)
    }

    async fn publish(&self, topic: Topic, envelope: Bytes, reply: Reply) {
        self.gw
            .enqueue(Publish {
                topic,
                envelope,
                peer: self.peer.clone(),
                reply,
            })
            .await
    }

    fn refused(&self, code: ErrorCode) {
        self.gw
            .metrics
            .client_errors
            .with_label_values(&[code.as_str()])
            .inc();
    }

    fn dropped(&self, reason: &'static str) {
        self.gw
            .metrics
            .messages_dropped
            .with_label_values(&[reason])
            .inc();
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! A [`Link`] that records what a session did, for unit tests.

    use std::cell::RefCell;

    use super::*;
    use crate::limit::Rate;

    pub struct Recorder {
        pub limits: Limits,
        pub auth: AuthConfig,
        /// What `verify` answers.
        pub tokens: RefCell<Vec<(&'static str, Result<Identity, AuthError>)>>,
        pub expires: std::cell::Cell<u64>,
        pub now: std::cell::Cell<u64>,
        /// What `synced` answers: the bus is up.
        pub bus_up: bool,
        pub replies: RefCell<Vec<serde_json::Value>>,
        pub joined: RefCell<Vec<Topic>>,
        pub published: RefCell<Vec<(Topic, serde_json::Value)>>,
        pub refused: RefCell<Vec<ErrorCode>>,
        pub dropped: RefCell<Vec<&'static str>>,
    }

    impl Recorder {
        pub fn new() -> Recorder {
            let unlimited = Rate {
                per_second: 0,
                burst: 0,
            };
            Recorder {
                limits: Limits {
                    max_connections: 0,
                    max_message_bytes: 65536,
                    max_rooms_per_connection: 2,
                    outbound_queue_bytes: 1 << 20,
                    read_buffer_bytes: 4096,
                    messages: unlimited,
                    commands: unlimited,
                },
                auth: AuthConfig {
                    algorithm: None,
                    key: Vec::new(),
                    leeway: std::time::Duration::ZERO,
                    anonymous: true,
                    anonymous_send: true,
                    close_on_expiry: true,
                    max_info_bytes: 512,
                },
                tokens: RefCell::default(),
                expires: 0.into(),
                now: 0.into(),
                bus_up: true,
                replies: RefCell::default(),
                joined: RefCell::default(),
                published: RefCell::default(),
                refused: RefCell::default(),
                dropped: RefCell::default(),
            }
        }

        pub fn session(&self) -> Session {
            Session::new(&self.limits, self.now.get(), Vec::new(), None)
        }

        /// A session authenticated as `identity`.
        pub fn session_as(&self, identity: Identity) -> Session {
            Session::new(&self.limits, self.now.get(), Vec::new(), Some(identity))
        }

        /// The replies so far, taken.
        pub fn take_replies(&self) -> Vec<serde_json::Value> {
            std::mem::take(&mut self.replies.borrow_mut())
        }
    }

    fn json_of_frame(frame: &[u8]) -> serde_json::Value {
        let (_, payload) = crate::ws::split_server_frame(frame).expect("one server frame");
        serde_json::from_slice(payload).expect("JSON")
    }

    /// An identity for tests.
    pub fn identity(user: &str) -> Identity {
        Identity {
            user: user.into(),
            rooms: None,
            can_send: true,
            info: None,
            expires: 1000,
        }
    }

    impl Link for Recorder {
        fn limits(&self) -> &Limits {
            &self.limits
        }
        fn auth(&self) -> &AuthConfig {
            &self.auth
        }
        fn verify(&self, token: &str) -> Result<Identity, AuthError> {
            let tokens = self.tokens.borrow();
            let found = tokens.iter().find(|(t, _)| *t == token);
            found.map_or(Err(AuthError::Malformed), |(_, r)| r.clone())
        }
        fn token_expires(&self, exp: u64) {
            self.expires.set(exp);
        }
        fn now_ms(&self) -> u64 {
            self.now.get()
        }
        fn conn_id(&self) -> &str {
            "n1-1"
        }
        fn reply(&self, frame: &Bytes) {
            self.replies.borrow_mut().push(json_of_frame(frame));
        }
        fn join(&self, topic: &Topic) {
            self.joined.borrow_mut().push(topic.clone());
        }
        fn leave(&self, topic: &Topic) {
            self.joined.borrow_mut().retain(|t| t != topic);
        }
        async fn synced(&self) -> bool {
            self.bus_up
        }
        fn joined(&self, topic: &Topic) -> u64 {
            self.joined.borrow().iter().filter(|t| *t == topic).count() as u64
        }
        async fn publish(&self, topic: Topic, envelope: Bytes, reply: Reply) {
            let envelope: serde_json::Value = serde_json::from_slice(&envelope).expect("JSON");
            self.published.borrow_mut().push((topic, envelope));
            // The bus takes everything: acknowledge as the publisher would.
            if let Reply::Ack(id) = reply {
                ack(self, id);
            }
        }
        fn refused(&self, code: ErrorCode) {
            self.refused.borrow_mut().push(code);
        }
        fn dropped(&self, reason: &'static str) {
            self.dropped.borrow_mut().push(reason);
        }
    }

    /// Run a future that never waits (the recorder answers at once).
    pub fn now<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }
}
