//! The node's heartbeat: one task pings every client and closes the silent ones.

use std::sync::Arc;

use tokio::time::Instant;

use crate::gateway::Gateway;
use crate::ws::{self, close};

/// Ping every client each `heartbeat.interval`; close those silent for
/// longer than `heartbeat.timeout`. One task per node, not a timer per socket.
///
/// The work is spread over the interval in [`HEARTBEAT_SLICES`] slices (a
/// client is in slice `seq % HEARTBEAT_SLICES`), yielding every few hundred
/// clients, so pinging 100,000 sockets never stalls message fan-out.
pub async fn run(gw: Arc<Gateway>, stop: tokio_util::sync::CancellationToken) {
    let hb = gw.config.heartbeat.clone();
    let period = hb.interval / HEARTBEAT_SLICES as u32;
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ping = ws::ping_frame();
    let timeout_ms = hb.timeout.as_millis() as u64;
    for slice in (0..HEARTBEAT_SLICES).cycle() {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = gw.hub.now_ms();
        for (i, peer) in gw
            .hub
            .peers_where(|p| p.seq % HEARTBEAT_SLICES == slice)
            .into_iter()
            .enumerate()
        {
            if i % 256 == 255 {
                tokio::task::yield_now().await;
            }
            if now.saturating_sub(peer.last_seen()) > timeout_ms {
                if peer.closing().is_none() {
                    gw.metrics.heartbeat_timeouts.inc();
                    peer.close(close::HEARTBEAT_TIMEOUT, "heartbeat timeout", false);
                }
            } else {
                peer.send(&ping);
            }
        }
    }
}

/// Heartbeat work is split in this many slices per interval.
const HEARTBEAT_SLICES: u64 = 16;
