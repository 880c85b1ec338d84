//! The fan-out: writing a room's batch of messages to each of its local
//! members, on every core.
//!
//! With one worker (`fanout.workers = 1`) the bus's receiving task writes
//! to every member itself, as before. With N > 1, N threads (`fanout-0` …)
//! each take the members whose connection number is theirs (`seq % N`):
//! one hot room's viewers are written by every core, while each client
//! stays on one worker, whose queue is first in, first out, so a client's
//! messages keep the bus's order, across rooms too. The bus task only
//! parses, frames and hands over, so subscription changes and join barriers
//! never wait behind a hot room's writes.
//!
//! Each worker's queue is bounded ([`QUEUE`] batches): when the workers
//! fall behind, the bus task waits for them, which pushes back on Redis as
//! the single task did (never unbounded memory). A batch is shared, not
//! copied: every worker gets the same `Arc`.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;

use crate::metrics::Metrics;
use crate::peer::{Mark, Peer, Sent};
use crate::protocol::{Format, Outgoing, Stamp};

/// Batches waiting per worker before the bus task waits.
const QUEUE: usize = 1024;

/// Most workers (`fanout.workers`).
pub const MAX_WORKERS: usize = 256;

/// One room's batch, as the bus delivered it, for its members of that moment.
pub struct Batch {
    pub members: Arc<Vec<Arc<Peer>>>,
    /// The messages, in order.
    pub outgoing: Vec<Outgoing>,
    /// `outgoing` framed into one write.
    pub out: Outgoing,
    /// Members that joined at a position this batch may not have reached
    /// (held joins just released): (connection seq, position).
    pub floors: Vec<(u64, Stamp)>,
    /// When the batch holds droppable messages: the batch again, in runs of
    /// droppable and other messages, for viewers that lag; and the room.
    pub runs: Vec<Run>,
    pub room: Option<Arc<str>>,
}

/// Consecutive messages of a batch that are all droppable or all not.
pub struct Run {
    pub out: Outgoing,
    pub count: u32,
}

pub struct Fanout {
    workers: Vec<SyncSender<Arc<Batch>>>,
    metrics: Arc<Metrics>,
}

impl Fanout {
    /// `workers` fan-out workers (1: in the caller; more: threads).
    pub fn new(workers: usize, metrics: Arc<Metrics>) -> Fanout {
        let workers = workers.clamp(1, MAX_WORKERS);
        let senders = match workers {
            1 => Vec::new(),
            n => (0..n)
                .map(|i| {
                    let (tx, rx) = sync_channel::<Arc<Batch>>(QUEUE);
                    let metrics = metrics.clone();
                    std::thread::Builder::new()
                        .name(format!("fanout-{i}"))
                        .spawn(move || {
                            // Ends when the hub (the senders) is gone.
                            for batch in rx {
                                write(&batch, &metrics, Part { index: i, of: n });
                            }
                        })
                        .expect("start a fan-out thread");
                    tx
                })
                .collect(),
        };
        metrics.fanout_workers.set(workers as i64);
        Fanout {
            workers: senders,
            metrics,
        }
    }

    /// Write `batch` to its members: here, or by every worker for its part.
    pub fn deliver(&self, batch: Batch) {
        if self.workers.is_empty() {
            return write(&batch, &self.metrics, Part { index: 0, of: 1 });
        }
        let batch = Arc::new(batch);
        for worker in &self.workers {
            // A worker that is gone (only at shutdown) has nobody to write to.
            let _ = worker.send(batch.clone());
        }
    }
}

/// Which members a worker writes: those with `seq % of == index`.
#[derive(Clone, Copy)]
struct Part {
    index: usize,
    of: usize,
}

/// Write `batch` to the members of `part`; count the deliveries.
fn write(batch: &Batch, metrics: &Metrics, part: Part) {
    let mine = |peer: &Peer| part.of == 1 || peer.seq as usize % part.of == part.index;
    let (mut delivered, mut skipped) = (0u64, 0u64);
    for peer in batch.members.iter().filter(|p| mine(p)) {
        let floor = batch.floors.iter().find(|(p, _)| *p == peer.seq);
        let Some(&(_, at)) = floor else {
            let lagging = || peer.format == Format::Json && peer.lagging();
            if let (false, Some(room), true) = (batch.runs.is_empty(), &batch.room, lagging()) {
                // Behind: droppable runs are queued as such, so that an
                // overflow drops them (and says so) before it closes.
                for run in &batch.runs {
                    let mark = run.out.droppable.then(|| Mark {
                        room: room.clone(),
                        count: run.count,
                    });
                    let (sent, shed) = peer.send_marked(&run.out.json, mark);
                    skipped += u64::from(shed);
                    if sent != Sent::Delivered {
                        break;
                    }
                    delivered += u64::from(run.count);
                }
                continue;
            }
            if peer.send(batch.out.frame_for(peer.format)) == Sent::Delivered {
                delivered += batch.outgoing.len() as u64;
            }
            continue;
        };
        // Joined at a position this batch may not have reached yet.
        let rest: Vec<Outgoing> = batch
            .outgoing
            .iter()
            .filter(|o| crate::hub::after(o.stamp, at))
            .cloned()
            .collect();
        if let Some(o) = Outgoing::concat(&rest) {
            if peer.send(o.frame_for(peer.format)) == Sent::Delivered {
                delivered += rest.len() as u64;
            }
        }
    }
    metrics.deliveries.inc_by(delivered);
    metrics.messages_skipped.inc_by(skipped);
}
