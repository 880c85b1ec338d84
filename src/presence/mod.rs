//! Presence: how many are in each room across the cluster (online counts),
//! `presence` frames to the room's members, and watch time.
//!
//! One node-wide task (two loops, [`run`]):
//! - The *reporter* (`report.rs`) ticks every quarter of
//!   `presence.report_interval` (I). Every I it reports this node's count
//!   in each of its rooms through the bus (counted by readers for 1.5 I on
//!   the bus's clock; a room it left since goes) and the viewer-seconds
//!   since its last report; on every tick it reads what the other live
//!   nodes reported in this node's rooms. The answer replaces the node's
//!   [`Cluster`] view (a room whose shard did not answer keeps its counts
//!   until they run out). The bus keeps it all per room, in the room's
//!   keys, so that on a Redis Cluster it divides over the shards. A node
//!   shutting down gracefully reports that it is leaving, and its counts
//!   are removed at once. The first join of a room the view does not have
//!   reads the room first ([`Presence::first_read`]). `GET /api/rooms…`
//!   read the bus at each request.
//! - The *announcer* (`announce.rs`) sends
//!   `{"op":"presence","room":…,"online":N}` to the JSON members of a local
//!   room when the number they would be shown changed, at most once per
//!   `presence.throttle` per room (a change within the throttle is sent when
//!   it ends, with the count of that moment). It wakes on local joins and
//!   leaves ([`Hub::changes`]; a join counts once acknowledged, see
//!   [`Presence::joined`]) and on every new cluster view.
//!
//! The number a client is shown is the other nodes' counts from the last
//! read plus this node's live count, so a local join or leave shows at once.
//! A client also gets its room's number right after joining (after the join
//! ack; for rooms in the connect URL, after `welcome`), outside the throttle.
//!
//! The ghost bound: a node that dies without a word (SIGKILL) made its last
//! report at most when it died; readers count that report for 1.5 I, and
//! read every I/4, so the first read that leaves it out comes at most
//! 1.75 I after the death (plus that read's round trip, and the reader's
//! own tick jitter): within 2 I. With different intervals per node it is
//! 1.5 × the dead node's interval + 1/4 of the reader's. When the reader
//! cannot reach the bus (or a room's shard), it drops each count of its
//! last view at the end of its 1.5 I (checked on the same ticks), so the
//! bound holds then too. Frames follow the next view, within the throttle.
//!
//! Counted are connections in a room (JSON and raw), not distinct users;
//! presence frames go to JSON clients only (raw mode has no envelopes), and
//! they are state, not messages: never counted as deliveries.

mod announce;
mod report;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::bus::{Bus, BusError, Count, Report, Snapshot};
use crate::config::PresenceConfig;
use crate::gateway::Gateway;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::topic::{Target, Topic};

/// A room's online count across the cluster.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Total {
    /// Connections in the room, on every node.
    pub online: u64,
    /// Nodes with at least one of them.
    pub nodes: u32,
}

/// What the other live nodes reported in this node's rooms, as this node
/// last read it.
#[derive(Default)]
struct Cluster {
    /// Room → the other nodes' counts there, each with when it stops
    /// counting on this node's clock (early rather than late: measured from
    /// before the read was sent). A room read and found empty is here too.
    rooms: HashMap<String, Vec<(u64, Instant)>>,
    /// Room → the sum over `rooms`.
    totals: Arc<HashMap<String, Total>>,
    /// How many other nodes are live, as last reported.
    nodes: usize,
}

impl Cluster {
    fn new(rooms: HashMap<String, Vec<(u64, Instant)>>, nodes: usize) -> Cluster {
        let totals = rooms
            .iter()
            .filter_map(|(room, counts)| {
                let counts = counts.iter().filter(|(n, _)| *n > 0);
                let total = counts.fold(Total::default(), |t, (n, _)| Total {
                    online: t.online + n,
                    nodes: t.nodes + 1,
                });
                (total.online > 0).then(|| (room.clone(), total))
            })
            .collect();
        Cluster {
            rooms,
            totals: Arc::new(totals),
            nodes,
        }
    }

    /// The view a read of `asked` sent at `sent` answered: each room read
    /// takes the answer; a room whose shard did not answer keeps what this
    /// view had; rooms not asked about are no longer this node's concern.
    fn read(&self, asked: &[&str], snapshot: Snapshot, sent: Instant) -> Cluster {
        let rooms = asked
            .iter()
            .zip(snapshot.rooms)
            .filter_map(|(room, answer)| {
                let counts = match answer {
                    Ok(counts) => counts
                        .iter()
                        .map(|c| (c.online, sent + c.fresh_for))
                        .collect(),
                    Err(_) => self.rooms.get(*room)?.clone(),
                };
                Some((room.to_string(), counts))
            })
            .collect();
        Cluster::new(rooms, snapshot.nodes.unwrap_or(self.nodes))
    }

    /// This view with `room` as read at `sent` (a join's read of a room
    /// the view did not have).
    fn with(&self, room: &str, counts: &[Count], sent: Instant) -> Cluster {
        let mut rooms = self.rooms.clone();
        let counts = counts.iter().map(|c| (c.online, sent + c.fresh_for));
        rooms.insert(room.to_owned(), counts.collect());
        Cluster::new(rooms, self.nodes)
    }

    /// This view without the counts that ran out by `now`; `None` if none did.
    fn pruned(&self, now: Instant) -> Option<Cluster> {
        let live = |counts: &Vec<(u64, Instant)>| counts.iter().all(|(_, until)| *until > now);
        if self.rooms.values().all(live) {
            return None;
        }
        let rooms = self.rooms.iter().map(|(room, counts)| {
            let counts = counts.iter().filter(|(_, until)| *until > now);
            (room.clone(), counts.copied().collect())
        });
        Some(Cluster::new(rooms.collect(), self.nodes))
    }

    fn total(&self, room: &str) -> Total {
        self.totals.get(room).copied().unwrap_or_default()
    }
}

/// The node's presence state, shared by its task, its sessions and the API.
pub struct Presence {
    config: PresenceConfig,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    cluster: RwLock<Arc<Cluster>>,
    /// Fires when `cluster` was replaced by one with other sums.
    updated: Notify,
}

/// The name of a room topic (the hub only lists rooms to presence).
fn name(topic: &Topic) -> &str {
    match topic.target() {
        Target::Room(room) | Target::User(room) => room,
    }
}

impl Presence {
    pub fn new(config: PresenceConfig, hub: Arc<Hub>, metrics: Arc<Metrics>) -> Presence {
        metrics.presence_nodes.set(1);
        Presence {
            config,
            hub,
            metrics,
            cluster: RwLock::new(Arc::default()),
            updated: Notify::new(),
        }
    }

    fn cluster(&self) -> Arc<Cluster> {
        self.cluster.read().clone()
    }

    /// A new view; the announcer looks again only if a sum changed.
    fn replace(&self, cluster: Cluster) {
        self.metrics.presence_nodes.set(cluster.nodes as i64 + 1);
        let changed = {
            let mut current = self.cluster.write();
            let changed =
                !Arc::ptr_eq(&current.totals, &cluster.totals) && current.totals != cluster.totals;
            *current = Arc::new(cluster);
            changed
        };
        if changed {
            self.updated.notify_one();
        }
    }

    /// Drop the other nodes' reports that ran out (when no read came).
    fn prune(&self, now: Instant) {
        let pruned = self.cluster.read().pruned(now);
        if let Some(cluster) = pruned {
            self.replace(cluster);
        }
    }

    /// A client's join of room `topic` is in effect and acknowledged: tell
    /// the room (throttled), and answer the number the client is shown —
    /// `None` if this node has not read the room yet (its first join here):
    /// then [`Presence::first_read`] reads it, so that the number counts
    /// the other nodes from the start.
    pub fn joined(&self, topic: &Topic) -> Option<u64> {
        if !self.cluster().rooms.contains_key(name(topic)) {
            return None;
        }
        self.hub.mark_changed(topic);
        Some(self.online(topic))
    }

    /// [`Presence::joined`] for a room this node has not read: read it
    /// (unless the bus is down), then tell the room and answer the number.
    pub async fn first_read(&self, topic: &Topic, bus: &dyn Bus) -> u64 {
        let room = name(topic);
        if bus.is_up() {
            let sent = Instant::now();
            let snapshot = bus.presence(Report::Read { rooms: &[room] }).await;
            if let Some(Ok(counts)) = snapshot.rooms.first() {
                let cluster = self.cluster().with(room, counts, sent);
                self.replace(cluster);
            }
        }
        self.hub.mark_changed(topic);
        self.online(topic)
    }

    /// The number a member of room `topic` is shown: the other nodes' last
    /// read counts and this node's live one.
    fn online(&self, topic: &Topic) -> u64 {
        self.cluster().total(name(topic)).online + self.hub.count(topic) as u64
    }

    /// Room `room` across the cluster, read from the bus now, this node's
    /// live count included.
    pub async fn room(&self, room: &str, bus: &dyn Bus) -> Result<Total, BusError> {
        let snapshot = bus.presence(Report::Read { rooms: &[room] }).await;
        let counts = snapshot
            .rooms
            .into_iter()
            .next()
            .unwrap_or(Ok(Vec::new()))?;
        let mut total = Total::default();
        let local = self.hub.count(&Topic::room(room)) as u64;
        let counts = counts.iter().map(|c| c.online).chain([local]);
        for online in counts.filter(|n| *n > 0) {
            total.online += online;
            total.nodes += 1;
        }
        Ok(total)
    }

    /// At most `limit` rooms whose names start with `prefix`, most online
    /// first (then by name), across the cluster: what the other live nodes
    /// last reported, and this node's live counts.
    pub async fn busiest(
        &self,
        prefix: &str,
        limit: usize,
        bus: &dyn Bus,
    ) -> Result<Vec<(String, u64)>, BusError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut online = bus.reported_rooms().await?;
        online.retain(|room, _| room.starts_with(prefix));
        for (topic, count) in self.hub.room_counts() {
            let room = name(&topic);
            if room.starts_with(prefix) {
                *online.entry(room.to_owned()).or_default() += count as u64;
            }
        }
        let mut rooms: Vec<(String, u64)> = online.into_iter().collect();
        let order = |a: &(String, u64), b: &(String, u64)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
        if rooms.len() > limit {
            rooms.select_nth_unstable_by(limit - 1, order);
            rooms.truncate(limit);
        }
        rooms.sort_unstable_by(order);
        Ok(rooms)
    }
}

/// Run the node's presence until `stop`, then say goodbye through the bus
/// (the bus must still be running).
pub async fn run(gw: Arc<Gateway>, stop: CancellationToken) {
    tokio::join!(report::run(&gw, &stop), announce::run(&gw, &stop));
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn count(online: u64, secs: u64) -> Count {
        Count {
            online,
            fresh_for: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_view_sums_the_other_nodes_and_drops_each_count_when_it_runs_out() {
        let now = Instant::now();
        let asked = ["r", "s", "empty"];
        let snapshot = Snapshot {
            rooms: vec![
                Ok(vec![count(2, 1), count(5, 3)]),
                Ok(vec![count(1, 1)]),
                Ok(vec![]),
            ],
            nodes: Some(2),
        };
        let cluster = Cluster::default().read(&asked, snapshot, now);
        let total = |online, nodes| Total { online, nodes };
        assert_eq!(cluster.total("r"), total(7, 2));
        assert_eq!(cluster.total("empty"), Total::default());
        assert!(cluster.rooms.contains_key("empty"), "read, so known");
        assert!(cluster.pruned(now).is_none(), "nothing ran out yet");
        let later = cluster.pruned(now + Duration::from_secs(2)).unwrap();
        assert_eq!(later.total("r"), total(5, 1));
        assert_eq!(later.total("s"), Total::default());
        assert_eq!(later.nodes, 2);
    }

    #[test]
    fn a_room_whose_shard_did_not_answer_keeps_its_counts_and_rooms_not_asked_go() {
        let now = Instant::now();
        let first = Snapshot {
            rooms: vec![Ok(vec![count(3, 10)]), Ok(vec![count(4, 10)])],
            nodes: Some(1),
        };
        let held = Cluster::default().read(&["a", "b"], first, now);
        let down = BusError::Unavailable("shard down".into());
        let next = Snapshot {
            rooms: vec![Err(down), Ok(vec![count(6, 10)])],
            nodes: None,
        };
        let view = held.read(&["a", "b"], next, now);
        assert_eq!(view.total("a").online, 3, "kept");
        assert_eq!(view.total("b").online, 6, "new");
        assert_eq!(view.nodes, 1, "no answer: the last number");
        let left = view.read(
            &["b"],
            Snapshot {
                rooms: vec![Ok(vec![])],
                nodes: Some(0),
            },
            now,
        );
        assert!(!left.rooms.contains_key("a"));
        assert_eq!(left.total("b"), Total::default());
        assert_eq!(left.nodes, 0);
        let joined = left.with("c", &[count(2, 10)], now);
        assert_eq!(joined.total("c").online, 2);
    }
}
