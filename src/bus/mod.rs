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

/// Most messages handed to the hub as one batch (see [`Hub::deliver_batch`]).
const MAX_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus cannot take the message right now (down, overloaded, timed out).
    #[error("bus unavailable: {0}")]
    Unavailable(String),
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
        BusConfig::Redis(redis) => {
            redis::start(redis.clone(), hub, subs, metrics, tracker, shutdown)
        }
    }
}
