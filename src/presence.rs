//! Presence: how many are in each room across the cluster (online counts),
//! `presence` frames to the room's members, and watch time.
//!
//! One node-wide task (two loops, [`run`]):
//! - The *reporter* ticks every quarter of `presence.report_interval` (I).
//!   Every I it reports this node's per-room member counts through the bus
//!   (replacing its previous report, counted by readers for 1.5 I on the
//!   bus's clock) and the viewer-seconds since its last report; on every
//!   tick it reads what the other live nodes reported. The answer replaces
//!   the node's [`Cluster`] view. A node shutting down gracefully reports
//!   that it is leaving, and its counts are removed at once.
//! - The *announcer* sends `{"op":"presence","room":…,"online":N}` to the
//!   JSON members of a local room when the number they would be shown
//!   changed, at most once per `presence.throttle` per room (a change within
//!   the throttle is sent when it ends, with the count of that moment). It
//!   wakes on local joins and leaves ([`Hub::changes`]) and on every new
//!   cluster view (a join counts once acknowledged, see [`Presence::joined`]).
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

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::sync::Notify;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::bus::{BusError, Report, Snapshot, Watch};
use crate::config::PresenceConfig;
use crate::gateway::Gateway;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::protocol;
use crate::topic::{Target, Topic};

/// Reads per report interval.
const READS_PER_REPORT: u32 = 4;

/// How long a report counts, in report intervals (see the module's bound).
const FRESH_REPORTS: f64 = 1.5;

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
    totals: HashMap<String, Total>,
}

/// One other node's report.
struct Other {
    /// When its report stops counting, on this node's clock (early rather
    /// than late: measured from before the read was sent).
    until: Instant,
    rooms: HashMap<String, u64>,
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
        Cluster { nodes, totals }
    }

    /// The view a read sent at `sent` answered.
    fn read(snapshot: Snapshot, sent: Instant) -> Cluster {
        Cluster::new(
            snapshot
                .nodes
                .into_iter()
                .map(|n| Other {
                    until: sent + n.fresh_for,
                    rooms: n.rooms,
                })
                .collect(),
        )
    }

    /// This view without the reports that ran out by `now`; `None` if none did.
    fn pruned(&self, now: Instant) -> Option<Cluster> {
        if self.nodes.iter().all(|n| n.until > now) {
            return None;
        }
        let live = self.nodes.iter().filter(|n| n.until > now);
        Some(Cluster::new(
            live.map(|n| Other {
                until: n.until,
                rooms: n.rooms.clone(),
            })
            .collect(),
        ))
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
    /// Fires when `cluster` was replaced.
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

    fn replace(&self, cluster: Cluster) {
        self.metrics
            .presence_nodes
            .set(cluster.nodes.len() as i64 + 1);
        *self.cluster.write() = Arc::new(cluster);
        self.updated.notify_one();
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
    tokio::join!(report(&gw, &stop), announce(&gw, &stop));
}

/// Viewer-seconds not yet in the bus.
struct Watched {
    /// When the counts were last sampled.
    since: Instant,
    /// Last time the bus took them (older ones would have expired there).
    stored: Instant,
    pending: HashMap<Topic, f64>,
}

impl Watched {
    /// Add `rooms`' counts × the time since the last sample.
    fn sample(&mut self, rooms: &[(Topic, usize)], now: Instant) {
        let elapsed = now.saturating_duration_since(self.since).as_secs_f64();
        self.since = now;
        for (topic, count) in rooms {
            *self.pending.entry(topic.clone()).or_default() += *count as f64 * elapsed;
        }
    }

    fn seconds(&self) -> Vec<(&str, f64)> {
        self.pending
            .iter()
            .filter(|(_, &s)| s > 0.0)
            .map(|(t, &s)| (name(t), s))
            .collect()
    }

    /// After a report: kept only if certainly not added (and not expired by
    /// now); an unconfirmed addition is not repeated, to never count twice.
    fn settle(&mut self, result: Result<(), &BusError>, now: Instant, ttl: Duration) {
        match result {
            Ok(()) | Err(BusError::Unconfirmed(_)) => {
                self.pending.clear();
                self.stored = now;
            }
            Err(BusError::Unavailable(_)) => {
                if now.saturating_duration_since(self.stored) > ttl {
                    self.pending.clear();
                }
            }
        }
    }
}

/// The reporter: report every interval, read every quarter (module docs).
async fn report(gw: &Gateway, stop: &CancellationToken) {
    let presence = &gw.presence;
    let cfg = &presence.config;
    let period = cfg.report_interval / READS_PER_REPORT;
    let fresh_for = cfg.report_interval.mul_f64(FRESH_REPORTS);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut watched = Watched {
        since: start,
        stored: start,
        pending: HashMap::new(),
    };
    let mut next_report = start;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        // Ticks are a quarter apart: within half a tick is on time.
        let due = now + period / 2 >= next_report;
        if due {
            next_report = now + cfg.report_interval;
        }
        let rooms = match due {
            true => gw.hub.room_counts(),
            false => Vec::new(),
        };
        if due {
            watched.sample(&rooms, now);
        }
        if !gw.bus.is_up() {
            // No report is attempted (roomcast_bus_up says why); the last
            // view still runs out on time.
            presence.prune(now);
            continue;
        }
        let counts: Vec<(&str, u64)> = rooms.iter().map(|(t, n)| (name(t), *n as u64)).collect();
        let seconds = watched.seconds();
        let result = match due {
            true => {
                let watch = Watch {
                    seconds: &seconds,
                    ttl: cfg.watch_ttl,
                };
                let report = Report::Counts {
                    rooms: &counts,
                    fresh_for,
                    watch,
                };
                gw.bus.presence(report).await
            }
            false => gw.bus.presence(Report::Read).await,
        };
        if due {
            match &result {
                Ok(_) => presence.metrics.presence_reports.inc(),
                Err(e) => {
                    presence.metrics.presence_report_failures.inc();
                    tracing::warn!(error = %e, "presence report failed");
                }
            }
            watched.settle(result.as_ref().map(|_| ()), now, cfg.watch_ttl);
        }
        match result {
            Ok(snapshot) => presence.replace(Cluster::read(snapshot, now)),
            Err(_) => presence.prune(Instant::now()),
        }
    }
    // Goodbye: the watch time since the last report, and the counts go.
    watched.sample(&gw.hub.room_counts(), Instant::now());
    let seconds = watched.seconds();
    let leaving = Report::Leaving {
        watch: Watch {
            seconds: &seconds,
            ttl: cfg.watch_ttl,
        },
    };
    match gw.bus.presence(leaving).await {
        Ok(_) => tracing::debug!("presence removed"),
        Err(e) => {
            tracing::warn!(error = %e, "presence goodbye failed; this node's counts expire on their own")
        }
    }
}

/// A local room's last presence frame.
struct Shown {
    online: u64,
    at: Instant,
}

/// A room to look at again when its throttle ends.
struct Due {
    at: Instant,
    topic: Topic,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.cmp(&other.at)
    }
}

/// What was shown to each local room, and which rooms wait for their throttle.
struct Announcer {
    throttle: Duration,
    shown: HashMap<Topic, Shown>,
    due: BinaryHeap<Reverse<Due>>,
    /// The rooms in `due`.
    waiting: HashSet<Topic>,
}

impl Announcer {
    fn new(throttle: Duration) -> Announcer {
        Announcer {
            throttle,
            shown: HashMap::new(),
            due: BinaryHeap::new(),
            waiting: HashSet::new(),
        }
    }

    /// When the next throttled room may be told.
    fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse(d)| d.at)
    }

    /// The throttled rooms whose throttle has ended by `now`.
    fn take_due(&mut self, now: Instant) -> Vec<Topic> {
        let mut topics = Vec::new();
        while self.due.peek().is_some_and(|Reverse(d)| d.at <= now) {
            if let Some(Reverse(d)) = self.due.pop() {
                self.waiting.remove(&d.topic);
                topics.push(d.topic);
            }
        }
        topics
    }

    /// Tell room `topic` its number if it changed and its throttle allows,
    /// else look again when the throttle ends. `tell` gets the number last
    /// shown and answers `None` when the room has no local member, else the
    /// number it sent (`None`: unchanged, nothing sent).
    fn consider(
        &mut self,
        topic: Topic,
        now: Instant,
        tell: impl FnOnce(&Topic, Option<u64>) -> Option<Option<u64>>,
    ) {
        let last = match self.shown.get(&topic) {
            Some(shown) if now < shown.at + self.throttle => {
                if self.waiting.insert(topic.clone()) {
                    let at = shown.at + self.throttle;
                    self.due.push(Reverse(Due { at, topic }));
                }
                return;
            }
            Some(shown) => Some(shown.online),
            None => None,
        };
        match tell(&topic, last) {
            None => {
                self.shown.remove(&topic);
            }
            Some(Some(online)) => {
                self.shown.insert(topic, Shown { online, at: now });
            }
            Some(None) => {}
        }
    }
}

/// The announcer: presence frames to local rooms (module docs).
async fn announce(gw: &Gateway, stop: &CancellationToken) {
    let presence = &gw.presence;
    let hub = &gw.hub;
    let mut rooms = Announcer::new(presence.config.throttle);
    let tell = |topic: &Topic, last: Option<u64>| -> Option<Option<u64>> {
        let others = presence.cluster().total(name(topic)).online;
        let mut sent = None;
        hub.tell_room(topic, |local| {
            let online = others + local as u64;
            (last != Some(online)).then(|| {
                sent = Some(online);
                protocol::presence_frame(name(topic), online)
            })
        })?;
        Some(sent)
    };
    loop {
        let next = rooms.next_due();
        let wake = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let topics: Vec<Topic> = tokio::select! {
            _ = stop.cancelled() => return,
            _ = hub.changes().notified() => hub.take_changed().into_iter().collect(),
            _ = presence.updated.notified() => hub.room_counts().into_iter().map(|(t, _)| t).collect(),
            _ = tokio::time::sleep_until(wake), if next.is_some() => rooms.take_due(Instant::now()),
        };
        let now = Instant::now();
        for topic in topics {
            rooms.consider(topic, now, tell);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn other(until: Instant, rooms: &[(&str, u64)]) -> Other {
        Other {
            until,
            rooms: rooms.iter().map(|(r, n)| (r.to_string(), *n)).collect(),
        }
    }

    #[test]
    fn a_view_sums_the_nodes_and_drops_each_report_when_it_runs_out() {
        let now = Instant::now();
        let cluster = Cluster::new(vec![
            other(now + Duration::from_secs(1), &[("r", 2), ("s", 1)]),
            other(now + Duration::from_secs(3), &[("r", 5), ("empty", 0)]),
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
    fn a_room_is_told_at_once_then_at_most_once_per_throttle_with_the_latest_number() {
        let throttle = Duration::from_secs(2);
        let mut a = Announcer::new(throttle);
        let room = Topic::room("r");
        let t0 = Instant::now();
        let told = std::cell::RefCell::new(Vec::new());
        let mut online = 1;
        let tell = |n: u64| {
            let told = &told;
            move |_: &Topic, last: Option<u64>| {
                if last != Some(n) {
                    told.borrow_mut().push(n);
                    return Some(Some(n));
                }
                Some(None)
            }
        };
        a.consider(room.clone(), t0, tell(online));
        // A burst within the throttle: nobody is told, one look is scheduled.
        for ms in [10, 20, 30] {
            online += 1;
            a.consider(room.clone(), t0 + Duration::from_millis(ms), tell(online));
        }
        assert_eq!(*told.borrow(), [1]);
        assert_eq!(a.next_due(), Some(t0 + throttle));
        assert!(a.take_due(t0 + Duration::from_secs(1)).is_empty());
        let due = a.take_due(t0 + throttle);
        assert_eq!(due, [room.clone()]);
        a.consider(room.clone(), t0 + throttle, tell(online));
        assert_eq!(*told.borrow(), [1, 4], "the burst's last number");
        // Unchanged: nothing sent; gone: forgotten, so the next one is told at once.
        a.consider(room.clone(), t0 + throttle * 2, tell(online));
        a.consider(room.clone(), t0 + throttle * 2, |_, _| None);
        a.consider(room.clone(), t0 + throttle * 2, tell(1));
        assert_eq!(*told.borrow(), [1, 4, 1]);
    }

    #[test]
    fn unconfirmed_watch_time_is_not_sent_twice_and_unavailable_is_kept() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        let mut w = Watched {
            since: t0,
            stored: t0,
            pending: HashMap::new(),
        };
        let rooms = vec![(Topic::room("r"), 3)];
        w.sample(&rooms, t0 + Duration::from_secs(2));
        assert_eq!(w.seconds(), [("r", 6.0)]);
        let down = BusError::Unavailable("down".into());
        w.settle(Err(&down), t0, ttl);
        w.sample(&rooms, t0 + Duration::from_secs(4));
        assert_eq!(w.seconds(), [("r", 12.0)]);
        w.settle(Err(&BusError::Unconfirmed("lost".into())), t0, ttl);
        assert!(w.seconds().is_empty());
    }
}
