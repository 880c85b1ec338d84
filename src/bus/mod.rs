//! The bus carries messages between gateway nodes.
//!
//! [`Bus`] is what a connection needs: publish a message to a room, and know
//! whether the bus is up. Subscriptions are driven by the hub through
//! [`SubCmd`]s, and received messages go to [`Hub::deliver`]; each backend
//! runs its own task(s) that consume the one and call the other.
//!
//! Backends: `memory` (one node, no Redis) and `redis` (pub/sub, one channel
//! per room). Redis Cluster (sharded pub/sub) and history would be further
//! modules behind the same trait.

mod memory;
mod redis;

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::BusConfig;
use crate::hub::{Hub, SubCmd};
use crate::metrics::Metrics;
use crate::protocol::ErrorCode;

/// Most messages handed to the hub as one batch (see [`Hub::deliver_batch`]).
const MAX_BATCH: usize = 256;

/// Why a publish was not confirmed. The two cases promise different things
/// to the client (docs/protocol.md, "What an ack and an error mean").
#[derive(Debug, thiserror::Error)]
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

pub trait Bus: Send + Sync + 'static {
    /// Publish one envelope to a room. Success means the bus accepted it.
    fn publish<'a>(&'a self, room: &'a str, envelope: Bytes)
        -> BoxFuture<'a, Result<(), BusError>>;

    /// Publish several `(room, envelope)`s in this order, as one round trip
    /// where the backend can; one result per item, in the same order.
    fn publish_batch<'a>(
        &'a self,
        items: &'a [(String, Bytes)],
    ) -> BoxFuture<'a, Vec<Result<(), BusError>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(items.len());
            for (room, envelope) in items {
                results.push(self.publish(room, envelope.clone()).await);
            }
            results
        })
    }

    /// Whether the bus is connected and its subscriptions are in place.
    fn is_up(&self) -> bool;
}

/// Start the configured backend's tasks on `tracker`; they stop on `shutdown`.
pub fn start(
    config: &BusConfig,
    node_id: &str,
    hub: Arc<Hub>,
    subs: mpsc::UnboundedReceiver<SubCmd>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Arc<dyn Bus> {
    match config {
        BusConfig::Memory { capacity } => {
            memory::start(*capacity, hub, subs, metrics, tracker, shutdown)
        }
        BusConfig::Redis(redis) => redis::start(
            redis.clone(),
            node_id,
            hub,
            subs,
            metrics,
            tracker,
            shutdown,
        ),
    }
}
