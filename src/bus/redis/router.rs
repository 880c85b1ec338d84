//! The router: which shard's session subscribes to which room, and what
//! to do when the cluster's topology changes.
//!
//! It takes the node's subscription commands ([`SubCmd`]) in order and
//! hands each to the session of the shard whose primary serves the room's
//! slot. On a single Redis there is one shard and nothing else happens.
//!
//! On a Redis Cluster it reads the topology (`CLUSTER SLOTS`, from the
//! seeds and the known primaries, whichever answers first) at start, every
//! [`PERIODIC`], and soon after anything suggests a change: a session lost
//! its connection (a primary failing over), Redis moved a room's channel
//! away (`sunsubscribe` pushed on a slot migration, or MOVED to SSUBSCRIBE),
//! or a publish was answered MOVED/ASK. When the map changed it starts
//! sessions for new primaries, stops those of primaries that are gone, and
//! moves each room whose slot changed hands: released on the old shard,
//! adopted by the new one, which subscribes and repairs the room from its
//! history (what was published between the two subscriptions).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::{join_all, select_ok, FutureExt};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::repair::Seen;
use super::session::Session;
use super::topology::{self, Topology};
use super::{RedisBus, Routes, Shard};
use crate::bus::{Deliver, SubCmd};
use crate::metrics::Metrics;
use crate::topic::Topic;

/// How often the topology is read when nothing suggests a change (a shard
/// added with no slots yet, replicas changing).
const PERIODIC: Duration = Duration::from_secs(5);

/// The least time between two reads of the topology.
const MIN_GAP: Duration = Duration::from_millis(200);

/// What the router tells a shard's session.
#[derive(Debug)]
pub enum ShardCmd {
    Sub(SubCmd),
    /// Rooms that moved here: subscribe, and repair them from history.
    Adopt(Vec<Topic>),
    /// Rooms that moved away: unsubscribe (their history position is kept).
    Release(Vec<Topic>),
}

/// What a session tells the router.
#[derive(Debug)]
pub enum Note {
    /// Redis says these rooms are not on my shard.
    Lost(Vec<Topic>),
    /// My connection failed (or could not be made).
    Down,
}

struct Handle {
    shard: Arc<Shard>,
    cmds: mpsc::UnboundedSender<ShardCmd>,
    stop: CancellationToken,
}

pub struct Router {
    bus: Arc<RedisBus>,
    /// Clients for the configured URL(s): the server, or the cluster's seeds.
    seeds: Vec<redis::Client>,
    sink: Arc<dyn Deliver>,
    subs: mpsc::UnboundedReceiver<SubCmd>,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    seen: Arc<Mutex<Seen>>,
    sessions: HashMap<String, Handle>,
    /// Each subscribed room and the primary whose session has it.
    assigned: HashMap<Topic, String>,
    /// Subscribed rooms no session has: no known primary serves their slot.
    homeless: HashSet<Topic>,
}

impl Router {
    pub fn new(
        bus: Arc<RedisBus>,
        seeds: Vec<redis::Client>,
        sink: Arc<dyn Deliver>,
        subs: mpsc::UnboundedReceiver<SubCmd>,
        metrics: Arc<Metrics>,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Router {
        Router {
            bus,
            seeds,
            sink,
            subs,
            metrics,
            tracker,
            shutdown,
            seen: Arc::default(),
            sessions: HashMap::new(),
            assigned: HashMap::new(),
            homeless: HashSet::new(),
        }
    }

    pub async fn run(mut self) {
        let (notes_tx, mut notes) = mpsc::unbounded_channel();
        if !self.bus.config.cluster {
            let name = crate::config::redact_url(&self.bus.config.url);
            self.apply(Topology::single(name), &notes_tx);
            // One shard, never moving: only commands to pass on.
            loop {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    cmd = self.subs.recv() => match cmd {
                        Some(cmd) => self.command(cmd),
                        None => return,
                    },
                    _ = notes.recv() => {}
                }
            }
        }
        let (found_tx, mut found) = mpsc::unbounded_channel();
        let mut reading = false;
        let mut wanted = true;
        let mut last = Instant::now() - PERIODIC;
        loop {
            let next = match wanted {
                true => last + MIN_GAP,
                false => last + PERIODIC,
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                cmd = self.subs.recv() => match cmd {
                    Some(cmd) => self.command(cmd),
                    None => return,
                },
                note = notes.recv() => {
                    if let Some(Note::Lost(topics)) = note {
                        self.metrics.bus_rooms_moved.inc_by(topics.len() as u64);
                        for topic in topics {
                            if self.assigned.remove(&topic).is_some() {
                                self.homeless.insert(topic);
                            }
                        }
                    }
                    wanted = true;
                }
                _ = self.bus.refresh.notified() => wanted = true,
                _ = tokio::time::sleep_until(next), if !reading => {
                    reading = true;
                    wanted = false;
                    last = Instant::now();
                    let candidates = self.candidates();
                    let limit = self.bus.config.timeout;
                    let found_tx = found_tx.clone();
                    tokio::spawn(async move {
                        let reads = candidates.iter().map(|c| topology::discover(c, limit).boxed());
                        let result = select_ok(reads).await.map(|(t, _)| t);
                        let _ = found_tx.send(result);
                    });
                }
                result = found.recv() => {
                    reading = false;
                    match result {
                        Some(Ok(topology)) => {
                            if !topology.complete() {
                                wanted = true;
                            }
                            self.apply(topology, &notes_tx);
                        }
                        Some(Err(e)) => {
                            wanted = true;
                            tracing::warn!(error = %e, "reading the cluster topology failed");
                        }
                        None => return,
                    }
                    if !self.homeless.is_empty() {
                        wanted = true;
                    }
                }
            }
        }
    }

    /// Where to read the topology: the seeds and every known primary.
    fn candidates(&self) -> Vec<redis::Client> {
        let mut out = self.seeds.clone();
        for handle in self.sessions.values() {
            if let Ok(c) = topology::client_for(&self.seeds[0], &handle.shard.name) {
                out.push(c);
            }
        }
        out
    }

    fn owner_of(&self, topic: &Topic) -> Option<String> {
        let routes = self.bus.routes();
        let index = routes.topology.owner(self.bus.channel(topic).as_bytes())?;
        Some(routes.topology.primaries[index].clone())
    }

    fn command(&mut self, cmd: SubCmd) {
        match cmd {
            SubCmd::Subscribe(topic) => match self.owner_of(&topic) {
                Some(owner) => {
                    self.send(&owner, ShardCmd::Sub(SubCmd::Subscribe(topic.clone())));
                    self.assigned.insert(topic, owner);
                }
                None => {
                    self.homeless.insert(topic);
                }
            },
            SubCmd::Unsubscribe(topic) => {
                self.seen.lock().forget(topic.key());
                self.homeless.remove(&topic);
                if let Some(owner) = self.assigned.remove(&topic) {
                    self.send(&owner, ShardCmd::Sub(SubCmd::Unsubscribe(topic)));
                }
            }
            SubCmd::Position(topic, at) => self.seen.lock().position(topic.key(), at),
            SubCmd::Sync(done) => {
                // In effect once every shard has applied what it was given
                // before, and every room has a shard.
                let complete = self.homeless.is_empty() && !self.sessions.is_empty();
                let answers: Vec<oneshot::Receiver<bool>> = self
                    .sessions
                    .values()
                    .map(|h| {
                        let (tx, rx) = oneshot::channel();
                        let _ = h.cmds.send(ShardCmd::Sub(SubCmd::Sync(tx)));
                        rx
                    })
                    .collect();
                tokio::spawn(async move {
                    let all = join_all(answers).await;
                    let _ = done.send(complete && all.into_iter().all(|a| a == Ok(true)));
                });
            }
        }
    }

    fn send(&self, owner: &str, cmd: ShardCmd) {
        if let Some(handle) = self.sessions.get(owner) {
            let _ = handle.cmds.send(cmd);
        }
    }

    /// Take `topology` as the cluster's map: sessions for its primaries,
    /// and every room on the session of its slot's primary.
    fn apply(&mut self, topology: Topology, notes: &mpsc::UnboundedSender<Note>) {
        if *self.bus.routes().topology == topology && self.homeless.is_empty() {
            return;
        }
        if !self.sessions.is_empty() {
            self.metrics.bus_topology_changes.inc();
            tracing::info!(primaries = ?topology.primaries, "cluster topology changed");
        }
        let mut shards = Vec::with_capacity(topology.primaries.len());
        let mut new = Vec::new();
        for name in &topology.primaries {
            if !self.sessions.contains_key(name) {
                match self.session(name, notes) {
                    Ok((handle, session)) => {
                        self.sessions.insert(name.clone(), handle);
                        new.push(session);
                    }
                    Err(e) => {
                        tracing::warn!(shard = %name, error = %e, "cannot reach this primary");
                        continue;
                    }
                }
            }
            shards.push(self.sessions[name].shard.clone());
        }
        self.bus.set_routes(Routes {
            topology: Arc::new(topology),
            shards,
        });
        // Started once the routes say which slots are theirs.
        for session in new {
            self.tracker.spawn(session.run());
        }
        // Rooms whose slot changed hands, and rooms without a shard so far.
        let mut moves: Vec<(Topic, Option<String>, String)> = Vec::new();
        for (topic, owner) in &self.assigned {
            match self.owner_of(topic) {
                Some(now) if now == *owner => {}
                Some(now) => moves.push((topic.clone(), Some(owner.clone()), now)),
                None => moves.push((topic.clone(), Some(owner.clone()), String::new())),
            }
        }
        for topic in std::mem::take(&mut self.homeless) {
            match self.owner_of(&topic) {
                Some(now) => moves.push((topic, None, now)),
                None => {
                    self.homeless.insert(topic);
                }
            }
        }
        let mut release: HashMap<String, Vec<Topic>> = HashMap::new();
        let mut adopt: HashMap<String, Vec<Topic>> = HashMap::new();
        for (topic, from, to) in moves {
            if let Some(from) = from {
                release.entry(from).or_default().push(topic.clone());
            }
            if to.is_empty() {
                self.assigned.remove(&topic);
                self.homeless.insert(topic);
            } else {
                self.assigned.insert(topic.clone(), to.clone());
                adopt.entry(to).or_default().push(topic);
            }
        }
        for (owner, topics) in release {
            self.send(&owner, ShardCmd::Release(topics));
        }
        for (owner, topics) in adopt {
            self.send(&owner, ShardCmd::Adopt(topics));
        }
        // Primaries that are gone: their rooms were moved above.
        let routes = self.bus.routes();
        let current: HashSet<&String> = routes.topology.primaries.iter().collect();
        self.sessions.retain(|name, handle| {
            let keep = current.contains(name);
            if !keep {
                handle.stop.cancel();
            }
            keep
        });
        self.bus.update_up();
    }

    /// A session for primary `name`, to be started.
    fn session(
        &self,
        name: &str,
        notes: &mpsc::UnboundedSender<Note>,
    ) -> Result<(Handle, Session), String> {
        let client = match self.bus.config.cluster {
            true => topology::client_for(&self.seeds[0], name)?,
            false => self.seeds[0].clone(),
        };
        let shard = Arc::new(Shard::new(name.to_owned()));
        let (cmds, rx) = mpsc::unbounded_channel();
        let stop = self.shutdown.child_token();
        let session = Session {
            bus: self.bus.clone(),
            shard: shard.clone(),
            client,
            sink: self.sink.clone(),
            cmds: rx,
            notes: notes.clone(),
            metrics: self.metrics.clone(),
            shutdown: stop.clone(),
            desired: HashSet::new(),
            seen: self.seen.clone(),
            canary_channel: String::new(),
            canary_seq: 0,
        };
        Ok((Handle { shard, cmds, stop }, session))
    }
}
