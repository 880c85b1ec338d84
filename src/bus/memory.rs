//! The embedded bus: one node, messages go from `publish` through a bounded
//! queue to a single dispatcher task, which gives every room one total order
//! (as Redis does for the redis bus).
//!
//! History: each history room's log (epoch, last seq, last `size`
//! stamped envelopes) is kept here; a message is stamped and queued under
//! the same lock, so seq order is delivery order, as in Redis.
//!
//! Presence: there are no other nodes, so a snapshot is empty (the node's
//! own counts are live); watch time is kept here, forgotten `ttl` after a
//! room's last addition as in Redis.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    Bus, BusError, Deliver, Message, Page, Pick, PublishResult, Published, Report, Snapshot, SubCmd,
};
use crate::metrics::Metrics;
use crate::namespace::History;
use crate::protocol;
use crate::topic::Topic;

struct MemoryBus {
    tx: mpsc::Sender<(Topic, Bytes)>,
    /// Room → (viewer-seconds, when it expires).
    watch: Mutex<HashMap<String, (f64, Instant)>>,
    /// History rooms' logs, and when expired ones were last swept.
    logs: Mutex<(HashMap<Topic, Log>, Instant)>,
}

/// One history room.
struct Log {
    epoch: String,
    seq: u64,
    /// (seq, stamped envelope), oldest first, at most the rule's size.
    entries: VecDeque<(u64, Bytes)>,
    /// `ttl` after the last message: then the room starts over.
    expires: Instant,
}

impl Log {
    fn new(now: Instant, ttl: Duration) -> Log {
        Log {
            epoch: new_epoch(),
            seq: 0,
            entries: VecDeque::new(),
            expires: now + ttl,
        }
    }
}

/// A new epoch: the time in microseconds, unique enough per room.
fn new_epoch() -> String {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    micros.to_string()
}

/// How often expired logs are swept.
const SWEEP: Duration = Duration::from_secs(10);

impl MemoryBus {
    /// The log of `topic`, started over if it expired.
    fn log<'a>(
        logs: &'a mut HashMap<Topic, Log>,
        topic: &Topic,
        rule: History,
        now: Instant,
    ) -> &'a mut Log {
        let log = logs
            .entry(topic.clone())
            .or_insert_with(|| Log::new(now, rule.ttl));
        if log.expires <= now {
            *log = Log::new(now, rule.ttl);
        }
        log
    }

    fn send(&self, topic: &Topic, envelope: Bytes) -> Result<(), BusError> {
        self.tx
            .try_send((topic.clone(), envelope))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    BusError::Unavailable("memory bus queue is full".into())
                }
                mpsc::error::TrySendError::Closed(_) => {
                    BusError::Unavailable("memory bus stopped".into())
                }
            })
    }
}

impl Bus for MemoryBus {
    fn publish_batch<'a>(&'a self, items: &'a [Message]) -> BoxFuture<'a, Vec<PublishResult>> {
        let now = Instant::now();
        let mut guard = self.logs.lock();
        let (logs, swept) = &mut *guard;
        if now.duration_since(*swept) > SWEEP {
            logs.retain(|_, log| log.expires > now);
            *swept = now;
        }
        let results = items
            .iter()
            .map(|m| {
                let Some(rule) = m.history else {
                    return self
                        .send(&m.topic, m.envelope.clone())
                        .map(|()| Published::default());
                };
                let log = Self::log(logs, &m.topic, rule, now);
                let seq = log.seq + 1;
                let stamped = protocol::stamp_envelope(&m.envelope, seq, &log.epoch);
                self.send(&m.topic, stamped.clone())?;
                log.seq = seq;
                log.entries.push_back((seq, stamped));
                while log.entries.len() > rule.size {
                    log.entries.pop_front();
                }
                log.expires = now + rule.ttl;
                Ok(Published { seq: Some(seq) })
            })
            .collect();
        futures::future::ready(results).boxed()
    }

    fn history<'a>(
        &'a self,
        topic: &'a Topic,
        rule: History,
        pick: Pick,
    ) -> BoxFuture<'a, Result<Page, BusError>> {
        let now = Instant::now();
        let mut guard = self.logs.lock();
        let log = Self::log(&mut guard.0, topic, rule, now);
        let kept = log.entries.iter();
        let entries = match pick {
            Pick::After(seq) => kept
                .filter(|(s, _)| *s > seq)
                .map(|(_, e)| e.clone())
                .collect(),
            Pick::Last(n) => kept
                .skip(log.entries.len().saturating_sub(n))
                .map(|(_, e)| e.clone())
                .collect(),
        };
        let page = Page {
            epoch: log.epoch.clone(),
            top: log.seq,
            oldest: log.entries.front().map_or(log.seq + 1, |(s, _)| *s),
            entries,
        };
        futures::future::ready(Ok(page)).boxed()
    }

    fn is_up(&self) -> bool {
        !self.tx.is_closed()
    }

    /// One node: nobody else reports; only the watch time is kept.
    fn presence<'a>(&'a self, report: Report<'a>) -> BoxFuture<'a, Snapshot> {
        let answer = report.rooms().iter().map(|_| Ok(Vec::new())).collect();
        let (rooms, ttl, nodes) = match report {
            Report::Read { .. } => (&[][..], Duration::ZERO, Some(0)),
            Report::Counts {
                rooms, watch_ttl, ..
            } => (rooms, watch_ttl, Some(0)),
            Report::Leaving { rooms, watch_ttl } => (rooms, watch_ttl, None),
        };
        let now = Instant::now();
        let mut watched = self.watch.lock();
        watched.retain(|_, (_, expires)| *expires > now);
        for r in rooms.iter().filter(|r| r.watch > 0.0) {
            let entry = watched.entry(r.room.to_string()).or_insert((0.0, now));
            *entry = (entry.0 + r.watch, now + ttl);
        }
        futures::future::ready(Snapshot {
            rooms: answer,
            nodes,
        })
        .boxed()
    }

    fn reported_rooms(&self) -> BoxFuture<'_, Result<HashMap<String, u64>, BusError>> {
        futures::future::ready(Ok(HashMap::new())).boxed()
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
        logs: Mutex::new((HashMap::new(), Instant::now())),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    struct Nowhere;
    impl Deliver for Nowhere {
        fn deliver_batch(&self, _: &[(&str, &[u8])]) {}
    }

    #[tokio::test]
    async fn history_rooms_number_keep_and_replay_their_messages() {
        let tracker = TaskTracker::new();
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let (_subs_tx, subs) = mpsc::unbounded_channel();
        let bus = start(
            64,
            Arc::new(Nowhere),
            subs,
            metrics,
            &tracker,
            CancellationToken::new(),
        );
        let rule = History {
            size: 3,
            ttl: Duration::from_secs(60),
        };
        let room = Topic::room("h:1");
        let msg = |n: u64, history| Message {
            topic: room.clone(),
            envelope: Bytes::from(format!(r#"{{"event":"e","data":{n}}}"#)),
            history,
        };
        let results = bus
            .publish_batch(&[
                msg(1, Some(rule)),
                msg(2, Some(rule)),
                msg(0, None),
                msg(3, Some(rule)),
                msg(4, Some(rule)),
            ])
            .await;
        let seqs: Vec<Option<u64>> = results.into_iter().map(|r| r.unwrap().seq).collect();
        assert_eq!(seqs, [Some(1), Some(2), None, Some(3), Some(4)]);
        let page = bus.history(&room, rule, Pick::After(1)).await.unwrap();
        // Only the last 3 are kept.
        assert_eq!((page.top, page.oldest), (4, 2));
        let kept: Vec<u64> = page
            .entries
            .iter()
            .map(|e| protocol::peek_stamp(e).unwrap().0)
            .collect();
        assert_eq!(kept, [2, 3, 4]);
        let last = bus.history(&room, rule, Pick::Last(1)).await.unwrap();
        assert_eq!(
            protocol::peek_stamp(&last.entries[0]),
            Some((4, page.epoch.as_str()))
        );
        // A room without messages still has an epoch to start from.
        let empty = bus
            .history(&Topic::room("h:2"), rule, Pick::Last(5))
            .await
            .unwrap();
        assert_eq!((empty.top, empty.oldest, empty.entries.len()), (0, 1, 0));
        assert_ne!(empty.epoch, "");
    }
}
