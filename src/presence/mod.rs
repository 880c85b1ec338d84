//! Presence: how many are in each room across the cluster (online counts),
//! `presence` frames to the room's members, and watch time.
//!
//! One node-wide task (two loops, [`run`]):
//! - The *reporter* (`report.rs`) ticks every quarter of
//!   `presence.report_interval` (I). Every I it reports this node's
//!   per-room member counts through the bus (replacing its previous report,
//!   counted by readers for 1.5 I on the bus's clock) and the viewer-seconds
//!   since its last report; on every tick it reads what the other live nodes
//!   reported. The answer replaces the node's [`Cluster`] view. A node
//!   shutting down gracefully reports that it is leaving, and its counts are
//!   removed at once.
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
//! cannot reach the bus, it drops each node of its last view at the end of
//! that node's 1.5 I (checked on the same ticks), so the bound holds then
//! too. Frames follow the next view, within the throttle.
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

use crate::bus::Snapshot;
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

/// What the other live nodes reported, as this node last read it.
#[derive(Default)]
struct Cluster {
    nodes: Vec<Other>,
    /// Room → the sum over `nodes`.
    totals: Arc<HashMap<String, Total>>,
}

/// One other node's report.
#[derive(Clone)]
struct Other {
    node: String,
    /// Which of its reports (see `Known`): a read does not send it again.
    version: String,
    /// When its report stops counting, on this node's clock (early rather
    /// than late: measured from before the read was sent).
    until: Instant,
    rooms: Arc<HashMap<String, u64>>,
}

impl Cluster {
    fn new(nodes: Vec<Other>) -> Cluster {
        let mut totals: HashMap<String, Total> = HashMap::new();
        for node in &nodes {
            for (room, &count) in node.rooms.iter().filter(|(_, &n)| n > 0) {
                let total = totals.entry(room.clone()).or_default();
                total.online += count;
                total.nodes += 1;
            }
        }
        Cluster {
            nodes,
            totals: Arc::new(totals),
        }
    }

    /// The (node, version) of the reports this view holds.
    fn known(&self) -> Vec<(&str, &str)> {
        self.nodes
            .iter()
            .map(|n| (n.node.as_str(), n.version.as_str()))
            .collect()
    }

    /// The view a read sent at `sent` answered, given the view it was sent
    /// with (whose reports it did not send again).
    fn read(&self, snapshot: Snapshot, sent: Instant) -> Cluster {
        let same = snapshot.nodes.len() == self.nodes.len()
            && snapshot.nodes.iter().all(|n| n.rooms.is_none());
        let nodes: Vec<Other> = snapshot
            .nodes
            .into_iter()
            .map(|n| {
                let rooms = n.rooms.map(Arc::new).unwrap_or_else(|| {
                    // Known, so in this view (an empty one if not: the next
                    // read, not knowing it, gets it whole).
                    self.nodes
                        .iter()
                        .find(|o| o.node == n.node)
                        .map(|o| o.rooms.clone())
                        .unwrap_or_default()
                });
                Other {
                    node: n.node,
                    version: n.version,
                    until: sent + n.fresh_for,
                    rooms,
                }
            })
            .collect();
        match same {
            // No report changed: the same sums.
            true => Cluster {
                nodes,
                totals: self.totals.clone(),
            },
            false => Cluster::new(nodes),
        }
    }

    /// This view without the reports that ran out by `now`; `None` if none did.
    fn pruned(&self, now: Instant) -> Option<Cluster> {
        if self.nodes.iter().all(|n| n.until > now) {
            return None;
        }
        let live = self.nodes.iter().filter(|n| n.until > now);
        Some(Cluster::new(live.cloned().collect()))
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
        self.metrics
            .presence_nodes
            .set(cluster.nodes.len() as i64 + 1);
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
    /// the room (throttled), and answer the number the client is shown.
    pub fn joined(&self, topic: &Topic) -> u64 {
        self.hub.mark_changed(topic);
        self.online(topic)
    }

    /// The number a member of room `topic` is shown: the other nodes' last
    /// read counts and this node's live one.
    fn online(&self, topic: &Topic) -> u64 {
        self.cluster().total(name(topic)).online + self.hub.count(topic) as u64
    }

    /// Room `room` across the cluster, this node's live count included.
    pub fn room(&self, room: &str) -> Total {
        let mut total = self.cluster().total(room);
        let local = self.hub.count(&Topic::room(room)) as u64;
        if local > 0 {
            total.online += local;
            total.nodes += 1;
        }
        total
    }

    /// At most `limit` rooms whose names start with `prefix`, most online
    /// first (then by name), across the cluster.
    pub fn busiest(&self, prefix: &str, limit: usize) -> Vec<(String, u64)> {
        if limit == 0 {
            return Vec::new();
        }
        let cluster = self.cluster();
        let local = self.hub.room_counts();
        let mut online: HashMap<&str, u64> = cluster
            .totals
            .iter()
            .filter(|(room, _)| room.starts_with(prefix))
            .map(|(room, total)| (room.as_str(), total.online))
            .collect();
        for (topic, count) in &local {
            let room = name(topic);
            if room.starts_with(prefix) {
                *online.entry(room).or_default() += *count as u64;
            }
        }
        let mut rooms: Vec<(&str, u64)> = online.into_iter().collect();
        let order = |a: &(&str, u64), b: &(&str, u64)| b.1.cmp(&a.1).then(a.0.cmp(b.0));
        if rooms.len() > limit {
            rooms.select_nth_unstable_by(limit - 1, order);
            rooms.truncate(limit);
        }
        rooms.sort_unstable_by(order);
        rooms
            .into_iter()
            .map(|(room, n)| (room.to_owned(), n))
            .collect()
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

    fn other(node: &str, until: Instant, rooms: &[(&str, u64)]) -> Other {
        Other {
            node: node.to_owned(),
            version: "1".to_owned(),
            until,
            rooms: Arc::new(rooms.iter().map(|(r, n)| (r.to_string(), *n)).collect()),
        }
    }

    #[test]
    fn a_view_sums_the_nodes_and_drops_each_report_when_it_runs_out() {
        let now = Instant::now();
        let cluster = Cluster::new(vec![
            other("a", now + Duration::from_secs(1), &[("r", 2), ("s", 1)]),
            other("b", now + Duration::from_secs(3), &[("r", 5), ("empty", 0)]),
        ]);
        assert_eq!(
            cluster.total("r"),
            Total {
                online: 7,
                nodes: 2
            }
        );
        assert_eq!(cluster.total("empty"), Total::default());
        assert!(cluster.pruned(now).is_none(), "nothing ran out yet");
        let later = cluster.pruned(now + Duration::from_secs(2)).unwrap();
        assert_eq!(
            later.total("r"),
            Total {
                online: 5,
                nodes: 1
            }
        );
        assert_eq!(later.total("s"), Total::default());
        assert_eq!(later.nodes.len(), 1);
    }

    #[test]
    fn a_read_keeps_the_reports_it_did_not_send_again() {
        use crate::bus::NodeCounts;
        let now = Instant::now();
        let held = Cluster::new(vec![other("a", now, &[("r", 2)])]);
        assert_eq!(held.known(), [("a", "1")]);
        let counts = |node: &str, version: &str, rooms: Option<&[(&str, u64)]>| NodeCounts {
            node: node.to_owned(),
            version: version.to_owned(),
            fresh_for: Duration::from_secs(1),
            rooms: rooms.map(|r| r.iter().map(|(k, n)| (k.to_string(), *n)).collect()),
        };
        // Nothing new: the same sums (shared, not recomputed), later expiry.
        let same = held.read(
            Snapshot {
                nodes: vec![counts("a", "1", None)],
            },
            now,
        );
        assert!(Arc::ptr_eq(&same.totals, &held.totals));
        assert_eq!(same.nodes[0].until, now + Duration::from_secs(1));
        // A new report from a, and b for the first time.
        let next = same.read(
            Snapshot {
                nodes: vec![
                    counts("a", "2", Some(&[("r", 3)])),
                    counts("b", "1", Some(&[("r", 1)])),
                ],
            },
            now,
        );
        assert_eq!(
            next.total("r"),
            Total {
                online: 4,
                nodes: 2
            }
        );
        // a unchanged, b gone.
        let last = next.read(
            Snapshot {
                nodes: vec![counts("a", "2", None)],
            },
            now,
        );
        assert_eq!(
            last.total("r"),
            Total {
                online: 3,
                nodes: 1
            }
        );
    }
}
