//! The state one gateway node shares between its HTTP routes, connections
//! and background tasks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::aggregate::Aggregator;
use crate::auth::{AuthError, Identity, Verifier};
use crate::bus::{Bus, BusError, Message, PublishResult};
use crate::config::Config;
use crate::expiry::Expiries;
use crate::hub::Hub;
use crate::limit::{Rate, TokenBucket};
use crate::metrics::Metrics;
use crate::peer::Peer;
use crate::presence::Presence;
use crate::protocol::{self, Rejection, Sender};
use crate::topic::{Target, Topic};
use serde_json::value::RawValue;

/// Client messages waiting for the publisher task, node-wide.
const PUBLISH_QUEUE: usize = 8192;
/// Most client messages sent to the bus as one pipeline.
const PUBLISH_BATCH: usize = 512;

/// A message a client sent, on its way to the bus.
pub struct Publish {
    pub message: Message,
    pub peer: Arc<Peer>,
    pub reply: Reply,
}

/// What the client hears once the bus has taken (or refused) its message.
pub enum Reply {
    /// JSON `send`: an `ack` with this id (none without an id), or an error frame.
    Ack(Option<u64>),
    /// Raw mode, and messages the node makes (join/leave events): nothing;
    /// a refused message is counted as dropped.
    Raw,
}

pub struct Gateway {
    pub config: Config,
    /// Verifies client tokens (`None`: `auth.algorithm` is not set).
    pub verifier: Option<Verifier>,
    /// Token deadlines of this node's connections.
    pub expiries: Expiries,
    /// Aggregated events of the current window.
    pub aggregator: Aggregator,
    /// `limits.user_messages_*`: one bucket per user with a connection here.
    user_buckets: Mutex<HashMap<Arc<str>, TokenBucket>>,
    /// `limits.connections_*`: new connections on this node.
    connection_bucket: Mutex<TokenBucket>,
    /// Connections per client address (`limits.max_connections_per_ip`).
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Join/leave events per namespace id (`join_leave_per_second`).
    join_leave: Mutex<Vec<TokenBucket>>,
    /// This node's id (resolved from config: never empty).
    pub node_id: String,
    pub hub: Arc<Hub>,
    pub bus: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
    /// Cluster-wide online counts (`presence/`).
    pub presence: Presence,
    /// Set when shutdown begins: not ready, no new WebSocket connections.
    pub draining: AtomicBool,
    next_seq: AtomicU64,
    /// Connections admitted: from the handshake's check to the connection's end.
    admitted: AtomicUsize,
    publishes: mpsc::Sender<Publish>,
}

/// A connection's place under `limits.max_connections`, held from the
/// handshake until the connection ends; dropping it frees the place.
pub struct Admission(Arc<Gateway>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Join/leave events: `per_second`, in bursts of as many.
fn join_leave_rate(per_second: u32) -> Rate {
    Rate {
        per_second,
        burst: per_second,
    }
}

/// A connection's count under its client address, held until it ends.
/// Boxed: 8 bytes in every connection, and nothing when there is no cap.
pub struct IpGuard(Option<Box<(Arc<Gateway>, IpAddr)>>);

impl Drop for IpGuard {
    fn drop(&mut self) {
        if let Some(held) = self.0.take() {
            let (gw, ip) = *held;
            let mut per_ip = gw.per_ip.lock();
            if let Some(n) = per_ip.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

impl Gateway {
    pub fn new(
        config: Config,
        node_id: String,
        hub: Arc<Hub>,
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
    ) -> (Self, mpsc::Receiver<Publish>) {
        let (publishes, queue) = mpsc::channel(PUBLISH_QUEUE);
        // The configuration was checked with the same call when it was loaded.
        let verifier = Verifier::new(&config.auth).unwrap_or_else(|e| {
            tracing::error!(error = %e, "auth: cannot build the token verifier; tokens are refused");
            None
        });
        let presence = Presence::new(config.presence.clone(), hub.clone(), metrics.clone());
        // Every label the configuration can produce starts at 0.
        for label in ["message", "command", "user", "connection"]
            .into_iter()
            .chain(config.namespaces.limited_events())
        {
            metrics.rate_limited.with_label_values(&[label]);
        }
        for event in config.namespaces.aggregated_events() {
            metrics.aggregated_events.with_label_values(&[event]);
        }
        let gw = Gateway {
            verifier,
            expiries: Expiries::default(),
            aggregator: Aggregator::default(),
            user_buckets: Mutex::new(HashMap::new()),
            connection_bucket: Mutex::new(TokenBucket::new(config.limits.connections, 0)),
            per_ip: Mutex::new(HashMap::new()),
            join_leave: Mutex::new(
                config
                    .namespaces
                    .by_id()
                    .iter()
                    .map(|ns| TokenBucket::new(join_leave_rate(ns.join_leave_per_second), 0))
                    .collect(),
            ),
            config,
            node_id,
            hub,
            bus,
            metrics,
            presence,
            draining: AtomicBool::new(false),
            next_seq: AtomicU64::new(1),
            admitted: AtomicUsize::new(0),
            publishes,
        };
        (gw, queue)
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Take a place for a new connection, or `None` when the node already
    /// holds `limits.max_connections` (0: no limit). Places are reserved at
    /// the handshake, so concurrent handshakes cannot overshoot the limit.
    pub fn admit(self: &Arc<Self>) -> Option<Admission> {
        let max = self.config.limits.max_connections;
        let mut n = self.admitted.load(Ordering::Acquire);
        loop {
            if max > 0 && n >= max {
                return None;
            }
            match self
                .admitted
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(Admission(self.clone())),
                Err(current) => n = current,
            }
        }
    }

    /// Take a token for a message by `user` (`limits.user_messages_*`), or
    /// the milliseconds until one is there.
    pub fn user_send(&self, user: &Arc<str>, now_ms: u64) -> Result<(), u64> {
        let rate = self.config.limits.user_messages;
        if rate.per_second == 0 {
            return Ok(());
        }
        let mut buckets = self.user_buckets.lock();
        let bucket = buckets
            .entry(user.clone())
            .or_insert_with(|| TokenBucket::new(rate, now_ms));
        match bucket.allow(rate, now_ms) {
            true => Ok(()),
            false => Err(bucket.retry_ms(rate)),
        }
    }

    /// Announce `event` ("join" or "leave") of `sender` in room `topic`, if
    /// the room's namespace has join/leave events and its rate allows;
    /// beyond the rate, events are dropped (counted).
    pub async fn announce(
        &self,
        topic: &Topic,
        room: &str,
        event: &str,
        sender: Sender<'_>,
        peer: &Arc<Peer>,
    ) {
        let ns = self.config.namespaces.of(room);
        if ns.join_leave_per_second == 0 {
            return;
        }
        let rate = join_leave_rate(ns.join_leave_per_second);
        let allowed = self
            .join_leave
            .lock()
            .get_mut(ns.id)
            .is_some_and(|b| b.allow(rate, self.hub.now_ms()));
        if !allowed {
            self.metrics
                .messages_dropped
                .with_label_values(&["rate_limited"])
                .inc();
            return;
        }
        // Join and leave events are presence: outside the room's history.
        let envelope = protocol::json_envelope(event, sender, RawValue::NULL);
        self.enqueue(Publish {
            message: Message::plain(topic.clone(), envelope),
            peer: peer.clone(),
            reply: Reply::Raw,
        })
        .await;
    }

    /// The user has no connection left here: forget its bucket.
    pub fn forget_user(&self, user: &str) {
        self.user_buckets.lock().remove(user);
    }

    /// Take a token for a new connection (`limits.connections_*`), or the
    /// seconds until one is there (for Retry-After).
    pub fn admit_rate(&self) -> Result<(), u64> {
        let rate = self.config.limits.connections;
        if rate.per_second == 0 {
            return Ok(());
        }
        let mut bucket = self.connection_bucket.lock();
        match bucket.allow(rate, self.hub.now_ms()) {
            true => Ok(()),
            false => Err(bucket.retry_ms(rate).div_ceil(1000).max(1)),
        }
    }

    /// Count a connection from `ip` (`limits.max_connections_per_ip`), or
    /// `None` when it has that many already; dropping the guard uncounts it.
    pub fn admit_ip(self: &Arc<Self>, ip: IpAddr) -> Option<IpGuard> {
        let max = self.config.limits.max_connections_per_ip;
        if max == 0 {
            return Some(IpGuard(None));
        }
        let mut per_ip = self.per_ip.lock();
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpGuard(Some(Box::new((self.clone(), ip)))))
    }

    /// Verify a client's token, counting a refusal.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let result = match &self.verifier {
            Some(v) => v.verify(token),
            None => Err(AuthError::Disabled),
        };
        if let Err(e) = &result {
            self.metrics
                .auth_failures
                .with_label_values(&[e.reason()])
                .inc();
        }
        result
    }

    /// Ready for traffic: not draining, and the bus is up.
    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && self.bus.is_up()
    }

    /// Hand a client's message to the publisher task ([`run_publisher`]).
    /// Waits only while the node-wide queue is full; the client's next
    /// message is read without waiting for this one's round trip to the bus.
    pub async fn enqueue(&self, publish: Publish) {
        if let Err(mpsc::error::SendError(p)) = self.publishes.send(publish).await {
            // The publisher has stopped: the node is shutting down.
            let refused = Err(BusError::Unavailable("shutting down".into()));
            self.settle(&p.peer, p.reply, refused);
        }
    }

    /// Tell the client what became of its message, and count it.
    fn settle(&self, peer: &Peer, reply: Reply, result: PublishResult) {
        match (result, reply) {
            (Ok(published), reply) => {
                self.metrics.messages_in.inc();
                if let Reply::Ack(Some(id)) = reply {
                    peer.send(&protocol::send_ack_frame(id, published.seq));
                }
            }
            (Err(e), Reply::Ack(id)) => {
                let rejection = Rejection::new(id, e.code(), e.to_string());
                self.metrics
                    .client_errors
                    .with_label_values(&[rejection.code.as_str()])
                    .inc();
                peer.send(&protocol::error_frame(&rejection));
            }
            (Err(e), Reply::Raw) => {
                tracing::debug!(conn = %peer.id, error = %e, "raw message dropped");
                self.metrics
                    .messages_dropped
                    .with_label_values(&[e.code().as_str()])
                    .inc();
            }
        }
    }

    /// A message of `envelope` to `topic`, in the history of its room's
    /// namespace if it keeps one.
    pub fn message(&self, topic: Topic, envelope: Bytes) -> Message {
        let history = match topic.target() {
            Target::Room(room) => self.config.namespaces.of(room).history,
            Target::User(_) => None,
        };
        Message {
            topic,
            envelope,
            history,
        }
    }

    /// Publish one message, timed and counted.
    pub async fn publish(&self, message: Message) -> PublishResult {
        let mut results = self.publish_batch(&[message]).await;
        results
            .pop()
            .unwrap_or_else(|| Err(BusError::Unavailable("the bus gave no answer".into())))
    }

    /// Publish messages in order as one bus round trip, timed (when
    /// anything got through) and counted.
    pub async fn publish_batch(&self, items: &[Message]) -> Vec<PublishResult> {
        let started = Instant::now();
        let results = self.bus.publish_batch(items).await;
        let published = results.iter().filter(|r| r.is_ok()).count() as u64;
        if published > 0 {
            self.metrics.bus_published.inc_by(published);
            self.metrics
                .bus_publish_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        results
    }
}

/// The node's publisher: takes every client message queued so far and sends
/// them to the bus as one batch (one Redis pipeline), then answers each
/// client. Queue order is kept, so each client's messages reach the bus in
/// the order it sent them; one batch is in flight at a time.
pub async fn run_publisher(
    gw: Arc<Gateway>,
    mut queue: mpsc::Receiver<Publish>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    loop {
        let taken = tokio::select! {
            _ = stop.cancelled() => return,
            n = queue.recv_many(&mut batch, PUBLISH_BATCH) => n,
        };
        if taken == 0 {
            return;
        }
        let (items, waiting): (Vec<_>, Vec<_>) = batch
            .drain(..)
            .map(|p| (p.message, (p.peer, p.reply)))
            .unzip();
        let results = gw.publish_batch(&items).await;
        for ((peer, reply), result) in waiting.into_iter().zip(results) {
            gw.settle(&peer, reply, result);
        }
    }
}
