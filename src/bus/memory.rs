//! The embedded bus: one node, messages go from `publish` through a bounded
//! queue to a single dispatcher task, which gives every room one total order
//! (as Redis does for the redis bus).
//!
//! Presence: there are no other nodes, so a snapshot is empty (the node's
//! own counts are live); watch time is kept here, forgotten `ttl` after a
//! room's last addition as in Redis.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Bus, BusError, Deliver, PublishResult, Published, Report, Snapshot, SubCmd};
use crate::metrics::Metrics;
use crate::topic::Topic;

struct MemoryBus {
    tx: mpsc::Sender<(Topic, Bytes)>,
    /// Room → (viewer-seconds, when it expires).
    watch: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Bus for MemoryBus {
    fn publish_batch<'a>(
        &'a self,
        items: &'a [(Topic, Bytes)],
    ) -> BoxFuture<'a, Vec<PublishResult>> {
        let results = items
            .iter()
            .map(|(topic, envelope)| {
                self.tx
                    .try_send((topic.clone(), envelope.clone()))
                    .map(|()| Published::default())
                    .map_err(|e| match e {
                        mpsc::error::TrySendError::Full(_) => {
                            BusError::Unavailable("memory bus queue is full".into())
                        }
                        mpsc::error::TrySendError::Closed(_) => {
                            BusError::Unavailable("memory bus stopped".into())
                        }
                    })
            })
            .collect();
        futures::future::ready(results).boxed()
    }

    fn is_up(&self) -> bool {
        !self.tx.is_closed()
    }

    fn presence<'a>(&'a self, report: Report<'a>) -> BoxFuture<'a, Result<Snapshot, BusError>> {
        let watch = match report {
            Report::Read { .. } => None,
            Report::Counts { watch, .. } | Report::Leaving { watch } => Some(watch),
        };
        if let Some(watch) = watch {
            let now = Instant::now();
            let mut rooms = self.watch.lock();
            rooms.retain(|_, (_, expires)| *expires > now);
            for (room, seconds) in watch.seconds {
                let entry = rooms.entry(room.to_string()).or_insert((0.0, now));
                *entry = (entry.0 + seconds, now + watch.ttl);
            }
        }
        futures::future::ready(Ok(Snapshot::default())).boxed()
    }

    fn watch_seconds<'a>(&'a self, room: &'a str) -> BoxFuture<'a, Result<f64, BusError>> {
        let now = Instant::now();
        let seconds = match self.watch.lock().get(room) {
            Some((seconds, expires)) if *expires > now => *seconds,
            _ => 0.0,
        };
        futures::future::ready(Ok(seconds)).boxed()
    }
}

pub fn start(
    capacity: usize,
    sink: Arc<dyn Deliver>,
    mut subs: mpsc::UnboundedReceiver<SubCmd>,
    metrics: Arc<Metrics>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> Arc<dyn Bus> {
    let (tx, mut rx) = mpsc::channel::<(Topic, Bytes)>(capacity);
    metrics.bus_up.set(1.0);
    tracker.spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some(first) = rx.recv() => {
                    // Take whatever else is already waiting, and deliver it as one batch.
                    let mut batch = vec![first];
                    while batch.len() < super::MAX_BATCH {
                        match rx.try_recv() {
                            Ok(next) => batch.push(next),
                            Err(_) => break,
                        }
                    }
                    let items: Vec<(&str, &[u8])> = batch.iter().map(|(t, e)| (t.key(), &e[..])).collect();
                    sink.deliver_batch(&items);
                }
                Some(cmd) = subs.recv() => {
                    // Every room is local: nothing to subscribe; barriers pass at once.
                    if let SubCmd::Sync(done) = cmd {
                        let _ = done.send(true);
                    }
                }
            }
        }
        metrics.bus_up.set(0.0);
    });
    Arc::new(MemoryBus {
        tx,
        watch: Mutex::new(HashMap::new()),
    })
}
