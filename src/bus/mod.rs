//! The bus carries messages between gateway nodes.
//!
//! [`Bus`] is what the node needs to send: publish a message to a
//! [`Topic`] (a room or a user), and know whether the bus is up. What it
//! receives goes the other way: the node says which topics it wants with
//! [`SubCmd`]s, and each backend's task(s) hand what arrives to a
//! [`Deliver`] (the hub). Neither side knows the other's type.
//!
//! Backends: `memory` (one node, no Redis) and `redis` (pub/sub, one channel
//! per topic, named by [`Topic::channel`]; on a single Redis or, sharded, on
//! a Redis Cluster).
//!
//! History: a [`Message`] of a history room carries its namespace's
//! [`History`] rule; the backend stamps it with the room's next seq and
//! epoch, stores it and publishes it as one operation, and answers the seq
//! ([`Published`]). [`Bus::history`] reads a room's position and entries
//! for a join's replay. Receiving, the redis backend repairs gaps from
//! history before it delivers (`redis/repair.rs`).
//!
//! Presence goes through the bus too ([`Bus::presence`]): each node's
//! per-room counts and watch time, and what the other live nodes reported
//! in those rooms (`presence/` decides when and what; the backend only
//! stores and reads).

mod memory;
mod redis;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tokio::sync::oneshot;

use crate::config::BusConfig;
use crate::error::ErrorCode;
use crate::metrics::Metrics;
use crate::namespace::History;
use crate::protocol::Stamp;
use crate::topic::Topic;

/// Most messages handed to [`Deliver::deliver_batch`] as one batch.
const MAX_BATCH: usize = 256;

/// A change to the set of topics this node subscribes to, in the order it
/// must be applied; or a barrier.
#[derive(Debug)]
pub enum SubCmd {
    Subscribe(Topic),
    Unsubscribe(Topic),
    /// Answer `true` once every earlier command is in effect, `false` if the
    /// bus is down (it will apply them when it reconnects, but messages
    /// published meanwhile are not received).
    Sync(oneshot::Sender<bool>),
    /// A client joined history room `topic` at this position (what its join
    /// read): a room that has received nothing yet is repaired from there
    /// after an outage.
    Position(Topic, Stamp),
}

/// Where the bus hands what it receives.
pub trait Deliver: Send + Sync + 'static {
    /// Payloads that arrived together, in arrival order, each with its
    /// topic's key ([`Topic::key`]).
    fn deliver_batch(&self, batch: &[(&str, &[u8])]);
}

/// A message to publish: its topic, its envelope, and — in a history
/// room — the room's history rule. Aggregated counts and join/leave events
/// are published without one: they are state, not part of the history.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Topic,
    pub envelope: Bytes,
    pub history: Option<History>,
}

impl Message {
    /// A message outside any history.
    pub fn plain(topic: Topic, envelope: Bytes) -> Message {
        Message {
            topic,
            envelope,
            history: None,
        }
    }
}

/// What the bus did with a published message: in a history room, the
/// `seq` it was given.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Published {
    pub seq: Option<u64>,
}

/// What a read of a room's history returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// The room's epoch (made now if the room had no history).
    pub epoch: String,
    /// The room's last `seq` (0: no message yet in this epoch).
    pub top: u64,
    /// The oldest `seq` still kept (`top + 1` when none is).
    pub oldest: u64,
    /// The stamped envelopes asked for, oldest first.
    pub entries: Vec<Bytes>,
}

/// Which entries a history read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Every kept message with a `seq` above this one.
    After(u64),
    /// The last this many.
    Last(usize),
}

/// Why a publish was not confirmed. The two cases promise different things
/// to the client (docs/protocol.md, "What an ack and an error mean").
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// Certainly not delivered to anyone: the bus was down or full before the
    /// message was sent, or Redis reported no receiver for it. Safe to retry.
    #[error("bus unavailable: {0}")]
    Unavailable(String),
    /// Sent, but the outcome is unknown (no reply in time, the connection
    /// failed before the reply, or the reply came on a connection declared
    /// dead): it may have reached some or all receivers.
    #[error("outcome unknown: {0}")]
    Unconfirmed(String),
}

impl BusError {
    /// The client-facing code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            BusError::Unavailable(_) => ErrorCode::Unavailable,
            BusError::Unconfirmed(_) => ErrorCode::Unconfirmed,
        }
    }
}

pub type PublishResult = Result<Published, BusError>;

/// What a node tells the bus on one presence round trip (`presence/`).
/// Everything is kept per room, in the room's own keys (on a Redis Cluster,
/// in the room's slot), so presence divides over shards like rooms do.
#[derive(Debug)]
pub enum Report<'a> {
    /// Nothing to store: read what the other nodes reported in these rooms.
    Read { rooms: &'a [&'a str] },
    /// This node's count in each room (0: it left the room since its last
    /// report, so its count there goes), counted by readers for
    /// `fresh_for` on the bus's clock, and the viewer-seconds to add; then
    /// read the rooms. It also renews this node in the list of live nodes.
    Counts {
        rooms: &'a [RoomReport<'a>],
        fresh_for: Duration,
        watch_ttl: Duration,
    },
    /// This node is leaving: its counts in these rooms go at once (the
    /// counts in the reports are ignored), and the last viewer-seconds
    /// are added.
    Leaving {
        rooms: &'a [RoomReport<'a>],
        watch_ttl: Duration,
    },
}

impl Report<'_> {
    /// The rooms this report is about, in order.
    pub fn rooms(&self) -> Vec<&str> {
        match self {
            Report::Read { rooms } => rooms.to_vec(),
            Report::Counts { rooms, .. } | Report::Leaving { rooms, .. } => {
                rooms.iter().map(|r| r.room).collect()
            }
        }
    }
}

/// One room in a report.
#[derive(Debug, Clone, Copy)]
pub struct RoomReport<'a> {
    pub room: &'a str,
    /// Connections in the room on this node.
    pub online: u64,
    /// Viewer-seconds since the last report (added to the room's watch
    /// time, kept `watch_ttl` after its last addition).
    pub watch: f64,
}

/// What a presence round trip answered.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Per room of the report, in its order: the other live nodes' counts
    /// there, or why that room's keys could not be reached (then nothing of
    /// the room's report was stored either, unless `Unconfirmed`).
    pub rooms: Vec<Result<Vec<Count>, BusError>>,
    /// How many other nodes are live; `None` if the bus could not say (or
    /// did not store this node's own record of a `Counts`).
    pub nodes: Option<usize>,
}

/// One other node's count in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    pub online: u64,
    /// How much longer it counts, from when the bus read it.
    pub fresh_for: Duration,
}

pub trait Bus: Send + Sync + 'static {
    /// Publish `(topic, envelope)`s in this order, as one round trip where
    /// the backend can; one result per item, in the same order. Success
    /// means the bus accepted the message (docs/protocol.md says what each
    /// outcome promises).
    fn publish_batch<'a>(&'a self, items: &'a [Message]) -> BoxFuture<'a, Vec<PublishResult>>;

    /// Read room `topic`'s history (kept as `rule` says): its epoch, its
    /// last seq, and the entries `pick` asks for, in one round trip.
    fn history<'a>(
        &'a self,
        topic: &'a Topic,
        rule: History,
        pick: Pick,
    ) -> BoxFuture<'a, Result<Page, BusError>>;

    /// Whether the bus is connected and its subscriptions are in place.
    fn is_up(&self) -> bool;

    /// Store `report` (if any) and answer what the other live nodes
    /// reported in its rooms, in one round trip per shard. A count older
    /// than its `fresh_for` is not in the answer (and is removed).
    fn presence<'a>(&'a self, report: Report<'a>) -> BoxFuture<'a, Snapshot>;

    /// Every room the other live nodes reported, with the sum of their
    /// counts (for the busiest-rooms list; read on request, not on a timer).
    fn reported_rooms(&self) -> BoxFuture<'_, Result<HashMap<String, u64>, BusError>>;

    /// A room's watch time: viewer-seconds over every node, as reported.
    fn watch_seconds<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<f64, BusError>>;
}

/// Start the configured backend's tasks on `tracker`; they stop on `shutdown`.
pub fn start(
    config: &BusConfig,
    node_id: &str,
    sink: Arc<dyn Deliver>,
    subs: mpsc::UnboundedReceiver<SubCmd>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Arc<dyn Bus> {
    match config {
        BusConfig::Memory { capacity } => {
            memory::start(*capacity, sink, subs, metrics, tracker, shutdown)
        }
        BusConfig::Redis(redis) => redis::start(
            redis.clone(),
            node_id,
            sink,
            subs,
            metrics,
            tracker,
            shutdown,
        ),
    }
}
