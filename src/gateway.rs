//! The state one gateway node shares between its HTTP routes, connections
//! and background tasks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::bus::{Bus, BusError};
use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;

pub struct Gateway {
    pub config: Config,
    /// This node's id (resolved from config: never empty).
    pub node_id: String,
    pub hub: Arc<Hub>,
    pub bus: Arc<dyn Bus>,
    pub metrics: Arc<Metrics>,
    /// Set when shutdown begins: not ready, no new WebSocket connections.
    pub draining: AtomicBool,
    next_seq: AtomicU64,
}

impl Gateway {
    pub fn new(
        config: Config,
        node_id: String,
        hub: Arc<Hub>,
        bus: Arc<dyn Bus>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Gateway {
            config,
            node_id,
            hub,
            bus,
            metrics,
            draining: AtomicBool::new(false),
            next_seq: AtomicU64::new(1),
        }
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Ready for traffic: not draining, and the bus is up.
    pub fn ready(&self) -> bool {
        !self.draining.load(Ordering::Acquire) && self.bus.is_up()
    }

    /// Publish an envelope to a room, timed and counted.
    pub async fn publish(&self, room: &str, envelope: Bytes) -> Result<(), BusError> {
        let started = Instant::now();
        let result = self.bus.publish(room, envelope).await;
        if result.is_ok() {
            self.metrics.bus_published.inc();
            self.metrics
                .bus_publish_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        result
    }
}
