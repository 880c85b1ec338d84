//! Likes at scale: events configured as aggregated (`aggregate.events`, or
//! a namespace's `aggregate`) are not fanned out one by one. Each node sums
//! them per room and event over `aggregate.window` and publishes one
//! `{"event":"like","data":{"count":N}}` per room, event and window, so
//! 50,000 viewers tapping like cost the bus a few messages a second per
//! node, not 50,000. Clients add up the counts they receive.
//!
//! The sender's ack means "counted into this node's next window"; a window
//! the bus refuses is lost (logged and counted in
//! `roomcast_aggregated_lost_total`), as a like is state, not a message.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::bus::Message;
use crate::gateway::Gateway;
use crate::protocol::{self, Sender};
use crate::topic::Topic;

/// The counts of the current window, node-wide.
#[derive(Default)]
pub struct Aggregator {
    counts: Mutex<HashMap<(Topic, Arc<str>), u64>>,
}

impl Aggregator {
    /// Count one `event` in `topic`.
    pub fn add(&self, topic: &Topic, event: &str) {
        let mut counts = self.counts.lock();
        match counts.get_mut(&(topic.clone(), Arc::from(event))) {
            Some(n) => *n += 1,
            None => {
                counts.insert((topic.clone(), Arc::from(event)), 1);
            }
        }
    }

    /// The window's sums as envelopes, and a fresh window.
    fn take(&self) -> Vec<(Topic, Bytes, u64)> {
        let counts = std::mem::take(&mut *self.counts.lock());
        counts
            .into_iter()
            .map(|((topic, event), count)| {
                let data = serde_json::value::to_raw_value(&serde_json::json!({ "count": count }))
                    .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned());
                let envelope = protocol::json_envelope(&event, Sender::default(), &data);
                (topic, envelope, count)
            })
            .collect()
    }
}

/// Publish each window's sums until `stop`, and the last window then.
/// Sums are state, not events: they stay outside any room's history.
pub async fn run(gw: Arc<Gateway>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(gw.config.aggregate_window);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        let window = gw.aggregator.take();
        if !window.is_empty() {
            let (items, counts): (Vec<_>, Vec<_>) = window
                .into_iter()
                .map(|(t, e, n)| (Message::plain(t, e), n))
                .unzip();
            let results = gw.publish_batch(&items).await;
            for (result, count) in results.iter().zip(counts) {
                if let Err(e) = result {
                    gw.metrics.aggregated_lost.inc_by(count);
                    tracing::warn!(error = %e, count, "an aggregated window was not published");
                }
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_sums_per_room_and_event_and_starts_over() {
        let a = Aggregator::default();
        for _ in 0..3 {
            a.add(&Topic::room("r1"), "like");
        }
        a.add(&Topic::room("r2"), "like");
        let mut window: Vec<(String, u64)> = a
            .take()
            .into_iter()
            .map(|(t, e, n)| {
                let env: serde_json::Value = serde_json::from_slice(&e).unwrap();
                assert_eq!(env["data"]["count"], n);
                (t.key().to_owned(), n)
            })
            .collect();
        window.sort();
        assert_eq!(window, [("room:r1".into(), 3), ("room:r2".into(), 1)]);
        assert!(a.take().is_empty());
    }
}
