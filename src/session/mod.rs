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
use crate::bus::{BusError, Page, Pick};
use crate::config::{AuthConfig, Limits};
use crate::error::{ErrorCode, Rejection};
use crate::gateway::{Gateway, Publish, Reply};
use crate::limit::{Rate, TokenBucket};
use crate::namespace::History;
use crate::namespace::{Namespace, Namespaces};
use crate::peer::Peer;
use crate::protocol::{self, Request};
use crate::protocol::{Outgoing, Replay, Stamp};
use crate::topic::{Target, Topic};
use crate::ws::close;

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
    /// Join history room `topic` held: subscribed, but what arrives waits
    /// for [`Link::release`] (see `hub.rs`).
    fn hold(&self, topic: &Topic);
    /// Give up a held join.
    fn abandon(&self, topic: &Topic);
    /// Finish a held join: `head`, then `replay`, then what arrived after
    /// position `at`; a member from now on.
    fn release(&self, topic: &Topic, head: &[Bytes], replay: &[Outgoing], at: Stamp);
    /// Read a history room's position and the entries `pick` asks for.
    async fn history(&self, topic: &Topic, rule: History, pick: Pick) -> Result<Page, BusError>;
    /// Count a join of a history room (`roomcast_history_joins_total{outcome}`).
    fn history_join(&self, outcome: &'static str);
    /// `true` once every join so far is in effect on the bus; `false` if the bus is down.
    async fn synced(&self) -> bool;
    /// This client's join of room `topic` is acknowledged: tell the room;
    /// answers how many are in it now, across the cluster.
    async fn joined(&self, topic: &Topic) -> u64;
    /// Hand a message to the bus; the client hears the outcome as `reply` says.
    async fn publish(&self, topic: Topic, envelope: Bytes, reply: Reply);
    /// Count a refusal (`roomcast_client_errors_total{code}`).
    fn refused(&self, code: ErrorCode);
    /// Count a raw message that was dropped (`roomcast_messages_dropped_total{reason}`).
    fn dropped(&self, reason: &'static str);
    fn namespaces(&self) -> &Namespaces;
    /// Count one aggregated `event` in `topic` (published with the window).
    fn aggregate(&self, topic: &Topic, event: &str);
    /// Take a token from the user's node-wide bucket, or the ms until one is there.
    fn user_send(&self, user: &Arc<str>) -> Result<(), u64>;
    /// Count a rate-limit refusal (`roomcast_rate_limited_total{event}`).
    fn rate_limited(&self, label: &str);
    /// Close the connection for abuse (4004).
    fn abused(&self);
    /// Tell room `topic` that `sender` joined or left (`event`), if its
    /// namespace wants join/leave events.
    async fn announce(&self, topic: &Topic, room: &str, event: &str, sender: protocol::Sender<'_>);
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
    /// Buckets of per-event and per-namespace rates, made on first use:
    /// (rule id, bucket). Boxed: 8 bytes, not a Vec's 24, in every
    /// connection, most of which never need one (measured: idle memory).
    #[allow(clippy::box_collection)]
    buckets: Option<Box<Vec<(usize, TokenBucket)>>>,
    /// Refusals (rate_limited, forbidden) since the last accepted request.
    refusals: u32,
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
            buckets: None,
            refusals: 0,
        }
    }

    /// The rooms to leave when the connection ends.
    pub fn rooms(&self) -> &[Topic] {
        &self.rooms
    }

    /// The connection ends: announce that its user left its rooms (where
    /// namespaces want join/leave events).
    pub async fn ended(&self, link: &impl Link) {
        for topic in &self.rooms {
            self.announce(link, topic, "leave").await;
        }
    }

    /// A join or leave of a signed-in user, for rooms that want them.
    async fn announce(&self, link: &impl Link, topic: &Topic, event: &str) {
        if self.identity.is_none() {
            return;
        }
        if let Target::Room(room) = topic.target() {
            link.announce(topic, room, event, self.sender(link.conn_id()))
                .await;
        }
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

    /// May it join `room`? Its token's `rooms`, and the namespace for
    /// anonymous connections; `forbidden` if not.
    fn may_join(&self, link: &impl Link, room: &str) -> Result<(), Rejection> {
        let allowed = match self.identity.as_deref() {
            Some(identity) => identity.may_join(room),
            None => link.namespaces().of(room).anonymous_join,
        };
        match allowed {
            true => Ok(()),
            false => Err(Rejection::new(
                None,
                ErrorCode::Forbidden,
                match self.identity {
                    Some(_) => format!("your token does not allow room {room:?}"),
                    None => format!("room {room:?} is for signed-in users: connect with a token"),
                },
            )),
        }
    }

    /// May it publish at all (its token's `send`; `auth.anonymous_send`)?
    fn may_send(&self, link: &impl Link) -> Result<(), Rejection> {
        self.may_send_as(link.auth().anonymous_send)
    }

    fn may_send_as(&self, anonymous_send: bool) -> Result<(), Rejection> {
        let (allowed, why) = match self.identity.as_deref() {
            Some(identity) => (identity.can_send, "your token does not allow sending"),
            None => (
                anonymous_send,
                "anonymous connections may only watch here: connect with a token to send",
            ),
        };
        match allowed {
            true => Ok(()),
            false => Err(Rejection::new(None, ErrorCode::Forbidden, why)),
        }
    }

    /// May it send `event` with `size` bytes of data to `room` now? The
    /// room's namespace decides (who sends, size, rates); the user's
    /// node-wide rate applies too. `Ok(true)`: the event is aggregated there.
    fn may_send_to(
        &mut self,
        link: &impl Link,
        room: &str,
        event: &str,
        size: usize,
    ) -> Result<bool, Rejection> {
        let namespaces = link.namespaces();
        let ns = namespaces.of(room);
        if !ns.client_send {
            return Err(Rejection::new(
                None,
                ErrorCode::Forbidden,
                format!("only the platform publishes in room {room:?}"),
            ));
        }
        self.may_send_as(ns.anonymous_send)?;
        if size > ns.max_message_bytes {
            return Err(Rejection::new(
                None,
                ErrorCode::BadFrame,
                format!(
                    "`data` is larger than {} bytes in room {room:?}",
                    ns.max_message_bytes
                ),
            ));
        }
        self.take_message(link, Some(ns), event)?;
        Ok(ns.aggregates(event))
    }

    /// Take a token for a message of `event` (in `ns`, else under the
    /// defaults): the event's own rate if it has one, else the namespace's,
    /// else `limits.messages_*`; then the user's. `rate_limited` with a
    /// retry hint if not.
    fn take_message(
        &mut self,
        link: &impl Link,
        ns: Option<&Namespace>,
        event: &str,
    ) -> Result<(), Rejection> {
        let limits = link.limits();
        let namespaces = link.namespaces();
        let ns = ns.unwrap_or_else(|| namespaces.of(""));
        let now = link.now_ms();
        let (label, rate, bucket) = match ns.event_rate(event) {
            Some((rate, rule)) => (event, rate, self.bucket(rule, rate, now)),
            None if ns.messages != limits.messages => {
                let rule = namespaces.event_rules + ns.id;
                ("message", ns.messages, self.bucket(rule, ns.messages, now))
            }
            None => ("message", limits.messages, &mut self.messages),
        };
        if !bucket.allow(rate, now) {
            link.rate_limited(label);
            return Err(Rejection::new(
                None,
                ErrorCode::RateLimited,
                format!(
                    "more than {} {label}s per second; slow down",
                    rate.per_second
                ),
            )
            .with_retry_ms(bucket.retry_ms(rate)));
        }
        if let Some(identity) = self.identity.as_deref() {
            if let Err(retry_ms) = link.user_send(&identity.user) {
                link.rate_limited("user");
                return Err(Rejection::new(
                    None,
                    ErrorCode::RateLimited,
                    format!(
                        "more than {} messages per second from your connections; slow down",
                        limits.user_messages.per_second
                    ),
                )
                .with_retry_ms(retry_ms));
            }
        }
        Ok(())
    }

    /// The bucket of `rule`, made full on first use.
    fn bucket(&mut self, rule: usize, rate: Rate, now: u64) -> &mut TokenBucket {
        let buckets = self.buckets.get_or_insert_with(Default::default);
        let i = match buckets.iter().position(|(r, _)| *r == rule) {
            Some(i) => i,
            None => {
                buckets.push((rule, TokenBucket::new(rate, now)));
                buckets.len() - 1
            }
        };
        &mut buckets[i].1
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
        let done = match self.allow(link, &request) {
            Err(rejection) => Err(rejection),
            Ok(()) => match request {
                Request::Join { room, replay } => join::run(self, link, id, &room, replay).await,
                Request::Leave { room } => leave::run(self, link, id, &room).await,
                Request::Send { room, event, data } => {
                    send::run(self, link, id, &room, &event, data).await
                }
                Request::SendToUser { user, event, data } => {
                    send::to_user(self, link, id, &user, &event, data).await
                }
                Request::Refresh { token } => refresh::run(self, link, id, &token),
                Request::Ping => ping::run(link, id),
            },
        };
        self.settle(link, done.map_err(|r| r.with_id(id)));
    }

    /// Answer a refused request, and close a connection that keeps being
    /// refused (`limits.abuse_threshold` rate-limited or forbidden requests
    /// with none accepted between) with 4004.
    fn settle(&mut self, link: &impl Link, done: Result<(), Rejection>) {
        let Err(rejection) = done else {
            self.refusals = 0;
            return;
        };
        if !self.abusive(link, rejection.code) {
            reject(link, rejection);
        }
    }

    /// Count a refusal with `code` towards the abuse close; `true` when
    /// this one crossed `limits.abuse_threshold` and the connection is
    /// being closed (4004).
    fn abusive(&mut self, link: &impl Link, code: ErrorCode) -> bool {
        if !matches!(code, ErrorCode::RateLimited | ErrorCode::Forbidden) {
            return false;
        }
        self.refusals = self.refusals.saturating_add(1);
        let threshold = link.limits().abuse_threshold;
        if threshold > 0 && self.refusals > threshold {
            link.abused();
            return true;
        }
        false
    }

    /// Finish the join of a history room from the connect URL (held by the
    /// connection when it opened), replaying `replay`; a failure is
    /// answered with an error frame without an id.
    pub async fn join_held(
        &mut self,
        link: &impl Link,
        topic: Topic,
        rule: History,
        replay: Replay,
    ) {
        let done = join::held(self, link, None, topic, rule, replay).await;
        self.settle(link, done);
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

    /// Take a token for a request other than a send (sends are limited by
    /// their room's rules, in `send.rs`), or say why not.
    fn allow(&mut self, link: &impl Link, request: &Request) -> Result<(), Rejection> {
        if matches!(request, Request::Send { .. } | Request::SendToUser { .. }) {
            return Ok(());
        }
        let rate = link.limits().commands;
        if self.commands.allow(rate, link.now_ms()) {
            return Ok(());
        }
        link.rate_limited("command");
        Err(Rejection::new(
            None,
            ErrorCode::RateLimited,
            format!(
                "more than {} requests per second; slow down",
                rate.per_second
            ),
        )
        .with_retry_ms(self.commands.retry_ms(rate)))
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

    fn namespaces(&self) -> &Namespaces {
        &self.gw.config.namespaces
    }

    fn aggregate(&self, topic: &Topic, event: &str) {
        self.gw.aggregator.add(topic, event);
        self.gw
            .metrics
            .aggregated_events
            .with_label_values(&[event])
            .inc();
    }

    fn user_send(&self, user: &Arc<str>) -> Result<(), u64> {
        self.gw.user_send(user, self.gw.hub.now_ms())
    }

    fn rate_limited(&self, label: &str) {
        // Only configured event names are labels (clients choose event names).
        let limited = self.gw.config.namespaces.limited_events();
        let label = match limited.contains(&label) {
            true => label,
            false if ["message", "command", "user"].contains(&label) => label,
            false => "message",
        };
        self.gw
            .metrics
            .rate_limited
            .with_label_values(&[label])
            .inc();
    }

    async fn announce(&self, topic: &Topic, room: &str, event: &str, sender: protocol::Sender<'_>) {
        self.gw
            .announce(topic, room, event, sender, self.peer)
            .await
    }

    fn abused(&self) {
        self.gw.metrics.abuse_disconnects.inc();
        self.peer
            .close(close::ABUSE, "too many refused requests", true);
    }

    fn auth(&self) -> &AuthConfig {
        &self.gw.config.auth
    }

    fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.gw.verify(token)
    }

    fn token_expires(&self, exp: u64) {
        // The connection's entry in the expiry queue follows it (expiry.rs).
        self.peer.set_token_expires(exp);
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

    fn hold(&self, topic: &Topic) {
        self.gw.hub.hold(topic, self.peer);
    }

    fn abandon(&self, topic: &Topic) {
        self.gw.hub.abandon(topic, self.peer);
    }

    fn release(&self, topic: &Topic, head: &[Bytes], replay: &[Outgoing], at: Stamp) {
        self.gw.hub.release(topic, self.peer, head, replay, at);
    }

    async fn history(&self, topic: &Topic, rule: History, pick: Pick) -> Result<Page, BusError> {
        self.gw.bus.history(topic, rule, pick).await
    }

    fn history_join(&self, outcome: &'static str) {
        self.gw
            .metrics
            .history_joins
            .with_label_values(&[outcome])
            .inc();
    }

    async fn synced(&self) -> bool {
        self.gw.hub.sync().await
    }

    async fn joined(&self, topic: &Topic) -> u64 {
        let presence = &self.gw.presence;
        match presence.joined(topic) {
            Some(online) => online,
            None => presence.first_read(topic, &*self.gw.bus).await,
        }
    }

    async fn publish(&self, topic: Topic, envelope: Bytes, reply: Reply) {
        self.gw
            .enqueue(Publish {
                message: self.gw.message(topic, envelope),
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
        pub namespaces: Namespaces,
        pub aggregated: RefCell<Vec<(Topic, String)>>,
        pub rate_limited: RefCell<Vec<String>>,
        pub abused: std::cell::Cell<bool>,
        pub announced: RefCell<Vec<(Topic, String, String)>>,
        pub auth: AuthConfig,
        /// What `verify` answers.
        pub tokens: RefCell<Vec<(&'static str, Result<Identity, AuthError>)>>,
        pub expires: std::cell::Cell<u64>,
        pub now: std::cell::Cell<u64>,
        /// What `synced` answers: the bus is up.
        pub bus_up: bool,
        pub replies: RefCell<Vec<serde_json::Value>>,
        pub joined: RefCell<Vec<Topic>>,
        /// Held joins (history rooms).
        pub held: RefCell<Vec<Topic>>,
        /// What `history` answers (`None`: the bus is down).
        pub page: RefCell<Option<Page>>,
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
                    user_messages: unlimited,
                    connections: unlimited,
                    max_connections_per_ip: 0,
                    abuse_threshold: 0,
                },
                namespaces: Namespaces::new(
                    crate::namespace::Defaults {
                        anonymous_join: true,
                        anonymous_send: true,
                        max_message_bytes: 65536,
                        messages: unlimited,
                        aggregate: &[],
                        events: &Default::default(),
                    },
                    &[],
                )
                .expect("default namespaces"),
                aggregated: RefCell::default(),
                rate_limited: RefCell::default(),
                abused: false.into(),
                announced: RefCell::default(),
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
                held: RefCell::default(),
                page: RefCell::default(),
                published: RefCell::default(),
                refused: RefCell::default(),
                dropped: RefCell::default(),
            }
        }

        /// Make the namespace defaults follow `limits` and `auth` again,
        /// after a test changed them (config.rs does this when loading).
        pub fn rebuild(&mut self) {
            self.namespaces = Namespaces::new(
                crate::namespace::Defaults {
                    anonymous_join: self.auth.anonymous,
                    anonymous_send: self.auth.anonymous_send,
                    max_message_bytes: self.limits.max_message_bytes,
                    messages: self.limits.messages,
                    aggregate: &[],
                    events: &Default::default(),
                },
                &[],
            )
            .expect("default namespaces");
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
        fn hold(&self, topic: &Topic) {
            self.held.borrow_mut().push(topic.clone());
        }
        fn abandon(&self, topic: &Topic) {
            self.held.borrow_mut().retain(|t| t != topic);
        }
        fn release(&self, topic: &Topic, head: &[Bytes], replay: &[Outgoing], _at: Stamp) {
            self.abandon(topic);
            self.joined.borrow_mut().push(topic.clone());
            for frame in head {
                self.reply(frame);
            }
            for out in replay {
                self.reply(&out.json);
            }
        }
        async fn history(
            &self,
            _topic: &Topic,
            _rule: History,
            pick: Pick,
        ) -> Result<Page, BusError> {
            let page = self.page.borrow().clone();
            let mut page = page.ok_or_else(|| BusError::Unavailable("down".into()))?;
            page.entries = match pick {
                Pick::After(seq) => page
                    .entries
                    .into_iter()
                    .filter(|e| protocol::peek_stamp(e).is_some_and(|(s, _)| s > seq))
                    .collect(),
                Pick::Last(n) => {
                    let skip = page.entries.len().saturating_sub(n);
                    page.entries.into_iter().skip(skip).collect()
                }
            };
            Ok(page)
        }
        fn history_join(&self, _outcome: &'static str) {}
        async fn joined(&self, topic: &Topic) -> u64 {
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
        fn namespaces(&self) -> &Namespaces {
            &self.namespaces
        }
        fn aggregate(&self, topic: &Topic, event: &str) {
            self.aggregated
                .borrow_mut()
                .push((topic.clone(), event.to_owned()));
        }
        fn user_send(&self, _user: &Arc<str>) -> Result<(), u64> {
            Ok(())
        }
        fn rate_limited(&self, label: &str) {
            self.rate_limited.borrow_mut().push(label.to_owned());
        }
        fn abused(&self) {
            self.abused.set(true);
        }
        async fn announce(
            &self,
            topic: &Topic,
            _room: &str,
            event: &str,
            sender: protocol::Sender<'_>,
        ) {
            self.announced.borrow_mut().push((
                topic.clone(),
                event.to_owned(),
                sender.from.to_owned(),
            ));
        }
    }

    /// Run a future that never waits (the recorder answers at once).
    pub fn now<F: std::future::Future>(f: F) -> F::Output {
        futures::executor::block_on(f)
    }
}
