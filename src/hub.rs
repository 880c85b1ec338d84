//! Local topics: which of this node's clients are in which room (and which
//! are which user's), and the fan-out of bus messages to them.
//!
//! Rooms and users are both [`Topic`]s here: a user's connections are the
//! members of the user's topic, so a message to a user fans out like a
//! message to a tiny room. Below, "room" means either.
//!
//! Invariants:
//! - A room is subscribed on the bus exactly while it has local members or
//!   pins. The first member/pin sends [`SubCmd::Subscribe`], the last one
//!   leaving sends [`SubCmd::Unsubscribe`]. Both are sent while the room map's
//!   write lock is held, so the bus sees them in the order the map changed:
//!   a join racing an unsubscribe always ends subscribed.
//! - The fan-out takes a snapshot of a room's members under a read lock and
//!   writes to sockets with no lock held (see `members.rs`), on
//!   `fanout.workers` cores (`fanout.rs`).
//! - A bus payload is parsed and framed once per node, then the same bytes
//!   go to every local recipient.
//! - Every leave of a room (not a user topic) marks the room changed, for
//!   presence (`presence/`), which takes the marks with
//!   [`Hub::take_changed`] after [`Hub::changes`] fires. A join is marked by
//!   presence once the client has its ack ([`Hub::mark_changed`]), so a
//!   join is announced to the room after its ack. Counts are member
//!   connections, JSON and raw alike.
//! - A join of a history room is *held* ([`Hub::hold`]) while its replay
//!   is read: the room is subscribed, and what the bus delivers meanwhile
//!   is kept for the held client instead of sent. [`Hub::release`] then
//!   sends, under the room's write lock, the ack, the replay, and what was
//!   kept that comes after the client's position, and makes it a member:
//!   nothing is lost or doubled at the seam. Messages up to its position
//!   that the node has not delivered yet (still on their way through the
//!   bus) are skipped for it (a *floor*) when they arrive.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::bus::{Deliver, SubCmd};
use crate::fanout::{Batch, Fanout, Run};
use crate::members::{Keyed, Members};
use crate::metrics::Metrics;
use crate::peer::{Peer, Sent};
use crate::protocol::{Format, Outgoing, Stamp};
use crate::topic::{Target, Topic};

/// What a namespace asks of the fan-out of its rooms.
#[derive(Debug, Clone, Default)]
pub struct RoomRule {
    pub prefix: String,
    /// Hold the room's messages this long, then write them together (0: off).
    pub coalesce: Duration,
    /// Events a lagging viewer may miss.
    pub droppable: Vec<String>,
}

#[derive(Default)]
struct Room {
    members: Members<Arc<Peer>>,
    /// Holds on the room's subscription while a client is being connected.
    pins: usize,
    /// History rooms: the seam between replay and live (see the module doc).
    recovery: Mutex<Recovery>,
    /// Rooms of a namespace with `coalesce`: messages waiting for the window
    /// to end (the coalescer flushes them).
    pending: Mutex<Vec<Outgoing>>,
}

impl Room {
    fn is_empty(&mut self) -> bool {
        self.members.is_empty() && self.pins == 0 && self.recovery.get_mut().waiting.is_empty()
    }
}

#[derive(Default)]
struct Recovery {
    /// Held joins, and what arrived for each meanwhile.
    waiting: Vec<Waiter>,
    /// Members (by peer seq) that skip messages up to a position.
    floors: Vec<(u64, Stamp)>,
    /// The stamp of the last history message delivered here.
    last: Option<Stamp>,
}

struct Waiter {
    peer: Arc<Peer>,
    held: Vec<Outgoing>,
}

/// Most messages kept for one held join; past it the client is closed as
/// a slow consumer (its replay cannot keep up with the room).
const MAX_HELD: usize = 10_000;

/// Whether a message stamped `stamp` comes after position `at`.
pub(crate) fn after(stamp: Option<Stamp>, at: Stamp) -> bool {
    match stamp {
        None => true,
        Some(s) => s.epoch != at.epoch || s.seq > at.seq,
    }
}

pub struct Hub {
    rooms: RwLock<HashMap<Topic, Room>>,
    peers: Mutex<HashMap<u64, Arc<Peer>>>,
    subs: mpsc::UnboundedSender<SubCmd>,
    metrics: Arc<Metrics>,
    epoch: Instant,
    /// Rooms whose members changed since presence last looked.
    changed: Mutex<HashSet<Topic>>,
    /// Fires when `changed` gained a room.
    changes: Notify,
    /// Writes batches to members, on `fanout.workers` cores.
    fanout: Fanout,
    /// What namespaces ask of their rooms' fan-out, longest prefix first.
    rules: Vec<RoomRule>,
    /// Rooms whose window began, for the coalescer task.
    due: mpsc::UnboundedSender<(Instant, Topic)>,
}

/// Keeps a room subscribed until dropped (see [`Hub::pin`]).
pub struct RoomPin {
    hub: Arc<Hub>,
    topic: Topic,
}

impl Drop for RoomPin {
    fn drop(&mut self) {
        self.hub.change(&self.topic, |room| room.pins -= 1);
    }
}

impl Hub {
    /// A hub and the receiving end of its subscription commands (for the bus).
    pub fn new(
        metrics: Arc<Metrics>,
        fanout_workers: usize,
        mut rules: Vec<RoomRule>,
    ) -> (Arc<Hub>, mpsc::UnboundedReceiver<SubCmd>) {
        let (subs, rx) = mpsc::unbounded_channel();
        let (due, due_rx) = mpsc::unbounded_channel();
        rules.retain(|r| !r.coalesce.is_zero() || !r.droppable.is_empty());
        rules.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let coalescing = rules.iter().any(|r| !r.coalesce.is_zero());
        let hub = Arc::new(Hub {
            fanout: Fanout::new(fanout_workers, metrics.clone()),
            rules,
            due,
            rooms: RwLock::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            subs,
            metrics,
            epoch: Instant::now(),
            changed: Mutex::new(HashSet::new()),
            changes: Notify::new(),
        });
        if coalescing {
            tokio::spawn(coalescer(Arc::downgrade(&hub), due_rx));
        }
        (hub, rx)
    }

    /// Milliseconds since this hub started: the clock of heartbeats.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Apply `f` to a room (creating it if needed), drop it when it ends up
    /// empty, and tell the bus when its subscription must change.
    fn change(&self, topic: &Topic, f: impl FnOnce(&mut Room)) {
        let mut rooms = self.rooms.write();
        let existed = rooms.contains_key(topic);
        let key = match rooms.get_key_value(topic) {
            Some((k, _)) => k.clone(),
            None => topic.clone(),
        };
        let room = rooms.entry(key.clone()).or_default();
        f(room);
        let empty = room.is_empty();
        if empty {
            rooms.remove(topic);
            if existed {
                let _ = self.subs.send(SubCmd::Unsubscribe(key));
            }
        } else if !existed {
            let _ = self.subs.send(SubCmd::Subscribe(key));
        }
        match (topic.target(), empty, existed) {
            (Target::Room(_), true, true) => self.metrics.rooms.dec(),
            (Target::Room(_), false, false) => self.metrics.rooms.inc(),
            (Target::User(_), true, true) => self.metrics.users.dec(),
            (Target::User(_), false, false) => self.metrics.users.inc(),
            _ => {}
        }
    }

    /// Keep `room` subscribed until the pin is dropped: lets a connection's
    /// rooms be subscribed before its handshake completes.
    pub fn pin(self: &Arc<Self>, topic: &Topic) -> RoomPin {
        self.change(topic, |r| r.pins += 1);
        RoomPin {
            hub: self.clone(),
            topic: topic.clone(),
        }
    }

    pub fn join(&self, topic: &Topic, peer: &Arc<Peer>) {
        self.change(topic, |r| {
            r.members.insert(peer.clone());
        });
    }

    /// Start a held join of `topic` (a history room): subscribed, but what
    /// arrives is kept for `peer` until [`Hub::release`] (or [`Hub::abandon`]).
    pub fn hold(&self, topic: &Topic, peer: &Arc<Peer>) {
        self.change(topic, |r| {
            r.recovery.get_mut().waiting.push(Waiter {
                peer: peer.clone(),
                held: Vec::new(),
            })
        });
    }

    /// Give up a held join: nothing is sent.
    pub fn abandon(&self, topic: &Topic, peer: &Peer) {
        self.change(topic, |r| {
            r.recovery
                .get_mut()
                .waiting
                .retain(|w| w.peer.seq != peer.seq)
        });
    }

    /// Finish a held join: send `head` (the ack), then `replay`, then what
    /// arrived meanwhile after position `at`, and make `peer` a member.
    /// What reaches the node later at or before `at` is skipped for it.
    pub fn release(
        &self,
        topic: &Topic,
        peer: &Arc<Peer>,
        head: &[Bytes],
        replay: &[Outgoing],
        at: Stamp,
    ) {
        let mut rooms = self.rooms.write();
        let Some(room) = rooms.get_mut(topic) else {
            return;
        };
        let recovery = room.recovery.get_mut();
        let Some(i) = recovery.waiting.iter().position(|w| w.peer.seq == peer.seq) else {
            return;
        };
        let waiter = recovery.waiting.swap_remove(i);
        let live: Vec<Outgoing> = waiter
            .held
            .into_iter()
            .filter(|o| after(o.stamp, at))
            .collect();
        for frame in head {
            peer.send(frame);
        }
        let sent = replay.iter().chain(&live).cloned().collect::<Vec<_>>();
        if let Some(out) = Outgoing::concat(&sent) {
            if peer.send(out.frame_for(peer.format)) == Sent::Delivered {
                self.metrics.deliveries.inc_by(sent.len() as u64);
            }
        }
        // Unless the node has delivered `at` itself, messages up to it may
        // still be on their way (also when the room's epoch just changed).
        let seen = live.last().and_then(|o| o.stamp).or(recovery.last);
        if !seen.is_some_and(|last| last.epoch == at.epoch && last.seq >= at.seq) {
            recovery.floors.push((peer.seq, at));
        }
        room.members.insert(peer.clone());
        let _ = self.subs.send(SubCmd::Position(topic.clone(), at));
    }

    pub fn leave(&self, topic: &Topic, peer: &Peer) {
        if !self.rooms.read().contains_key(topic) {
            return;
        }
        let mut left = false;
        self.change(topic, |r| left = r.members.remove(peer.seq));
        if left {
            self.mark_changed(topic);
        }
    }

    /// Have presence look at room `topic` again (a no-op for user topics).
    pub fn mark_changed(&self, topic: &Topic) {
        if let Target::Room(_) = topic.target() {
            if self.changed.lock().insert(topic.clone()) {
                self.changes.notify_one();
            }
        }
    }

    /// Fires (once per wait) after a room's members changed.
    pub fn changes(&self) -> &Notify {
        &self.changes
    }

    /// The rooms whose members changed since the last call.
    pub fn take_changed(&self) -> HashSet<Topic> {
        std::mem::take(&mut *self.changed.lock())
    }

    /// Every room (not user topic) with local members, and how many.
    pub fn room_counts(&self) -> Vec<(Topic, usize)> {
        self.rooms
            .read()
            .iter()
            .filter(|(topic, room)| {
                matches!(topic.target(), Target::Room(_)) && !room.members.is_empty()
            })
            .map(|(topic, room)| (topic.clone(), room.members.len()))
            .collect()
    }

    /// Local members of `topic`.
    pub fn count(&self, topic: &Topic) -> usize {
        self.rooms
            .read()
            .get(topic)
            .map_or(0, |room| room.members.len())
    }

    /// Send a state frame (not a message: not counted as a delivery) to the
    /// JSON members of `topic`. `frame` is given the local member count and
    /// returns what to send, if anything; count and recipients are taken
    /// under the same lock, so a member who joins later is not in the count
    /// it did not receive. Returns the count, `None` if no one is local.
    pub fn tell_room(
        &self,
        topic: &Topic,
        frame: impl FnOnce(usize) -> Option<Bytes>,
    ) -> Option<usize> {
        let (count, members, frame) = {
            let rooms = self.rooms.read();
            let room = rooms.get(topic).filter(|r| !r.members.is_empty())?;
            let count = room.members.len();
            (count, room.members.snapshot(), frame(count))
        };
        if let Some(frame) = frame {
            for peer in members.iter().filter(|p| p.format == Format::Json) {
                peer.send(&frame);
            }
        }
        Some(count)
    }

    /// Wait until every subscription change requested so far is in effect;
    /// `false` when the bus is down, so they are not (yet).
    pub async fn sync(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.subs.send(SubCmd::Sync(tx)).is_err() {
            return false;
        }
        // A dropped barrier means the bus failed while applying it.
        rx.await.unwrap_or(false)
    }

    fn deliver_room(&self, key: &str, payloads: &[&[u8]]) {
        if !self.rooms.read().contains_key(key) {
            return;
        }
        let Some(target) = Target::of_key(key) else {
            return;
        };
        let rule = self.rule(target);
        let droppable = |event: &str| rule.is_some_and(|r| r.droppable.iter().any(|d| d == event));
        let mut outgoing = Vec::with_capacity(payloads.len());
        for payload in payloads {
            match Outgoing::from_envelope_marked(target, payload, droppable) {
                Ok(out) => outgoing.push(out),
                Err(e) => {
                    self.metrics.bus_invalid.inc();
                    tracing::warn!(topic = key, error = %e, "dropping invalid bus payload");
                }
            }
        }
        self.metrics.bus_received.inc_by(outgoing.len() as u64);
        if let Some(window) = rule.map(|r| r.coalesce).filter(|w| !w.is_zero()) {
            // Held for the window: what arrives meanwhile goes out with it.
            let rooms = self.rooms.read();
            let Some((topic, room)) = rooms.get_key_value(key) else {
                return;
            };
            let mut pending = room.pending.lock();
            if pending.is_empty() {
                let _ = self.due.send((Instant::now() + window, topic.clone()));
            }
            pending.append(&mut outgoing);
            return;
        }
        self.fan_out(key, outgoing);
    }

    /// What a room's namespace asks of its fan-out, if anything.
    fn rule(&self, target: Target<'_>) -> Option<&RoomRule> {
        let Target::Room(room) = target else {
            return None;
        };
        self.rules
            .iter()
            .find(|r| room.starts_with(r.prefix.as_str()))
    }

    /// A coalescing room's window ended: write what it held.
    fn flush(&self, topic: &Topic) {
        let outgoing = match self.rooms.read().get(topic) {
            Some(room) => std::mem::take(&mut *room.pending.lock()),
            None => return,
        };
        self.metrics.coalesce_flushes.inc();
        self.metrics
            .coalesced_messages
            .inc_by(outgoing.len() as u64);
        self.fan_out(topic.key(), outgoing);
    }

    /// Write `outgoing` (one room's messages, in order) to the room's
    /// members, as one write each.
    fn fan_out(&self, key: &str, outgoing: Vec<Outgoing>) {
        let Some(out) = Outgoing::concat(&outgoing) else {
            return;
        };
        let (members, floors) = {
            let rooms = self.rooms.read();
            let Some(room) = rooms.get(key) else {
                return;
            };
            let mut recovery = room.recovery.lock();
            (
                room.members.snapshot(),
                recovery.passed(&outgoing, out.stamp),
            )
        };
        if members.is_empty() {
            return;
        }
        // Lagging viewers may miss droppable messages: the batch in runs
        // of droppable and other messages, each its own frame.
        let (runs, room) = match outgoing.iter().any(|o| o.droppable) {
            false => (Vec::new(), None),
            true => {
                let runs = outgoing
                    .chunk_by(|a, b| a.droppable == b.droppable)
                    .filter_map(|run| {
                        Some(Run {
                            out: Outgoing::concat(run)?,
                            count: run.len() as u32,
                        })
                    })
                    .collect();
                let room = match Target::of_key(key) {
                    Some(Target::Room(room)) => Some(Arc::from(room)),
                    _ => None,
                };
                (runs, room)
            }
        };
        // Slow consumers are counted when their connection ends (conn.rs).
        self.fanout.deliver(Batch {
            members,
            outgoing,
            out,
            floors,
            runs,
            room,
        });
    }

    pub fn register(&self, peer: Arc<Peer>) {
        let mut peers = self.peers.lock();
        peers.insert(peer.seq, peer);
        self.metrics.connections.set(peers.len() as i64);
    }

    pub fn unregister(&self, peer: &Peer) {
        let mut peers = self.peers.lock();
        peers.remove(&peer.seq);
        self.metrics.connections.set(peers.len() as i64);
    }

    /// Whether `topic` has a member on this node.
    pub fn has_members(&self, topic: &Topic) -> bool {
        self.rooms
            .read()
            .get(topic)
            .is_some_and(|r| !r.members.is_empty())
    }

    /// The connected client with this sequence number.
    pub fn peer(&self, seq: u64) -> Option<Arc<Peer>> {
        self.peers.lock().get(&seq).cloned()
    }

    /// Every connected client, for shutdown.
    pub fn peers(&self) -> Vec<Arc<Peer>> {
        self.peers_where(|_| true)
    }

    /// The connected clients that `pick` selects.
    pub fn peers_where(&self, pick: impl Fn(&Peer) -> bool) -> Vec<Arc<Peer>> {
        self.peers
            .lock()
            .values()
            .filter(|p| pick(p))
            .cloned()
            .collect()
    }
}

impl Deliver for Hub {
    /// Deliver bus payloads that arrived together, in arrival order.
    ///
    /// Messages for the same room are framed once and concatenated into one
    /// buffer, so each client gets a single write per room per batch instead
    /// of one per message: a hot room costs fewer syscalls the hotter it gets.
    /// Order within a room is kept; rooms are independent.
    fn deliver_batch(&self, batch: &[(&str, &[u8])]) {
        // Group by room, keeping arrival order inside each group.
        let mut groups: Vec<(&str, Vec<&[u8]>)> = Vec::new();
        for (room, payload) in batch {
            match groups.iter_mut().find(|(r, _)| r == room) {
                Some((_, payloads)) => payloads.push(payload),
                None => groups.push((room, vec![payload])),
            }
        }
        for (room, payloads) in groups {
            self.deliver_room(room, &payloads);
        }
    }
}

/// Flush each coalescing room when its window ends, until the hub is gone.
async fn coalescer(hub: Weak<Hub>, mut due: mpsc::UnboundedReceiver<(Instant, Topic)>) {
    let mut queue: BinaryHeap<Reverse<(Instant, Topic)>> = BinaryHeap::new();
    loop {
        let next = queue.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            added = due.recv() => match added {
                Some(entry) => queue.push(Reverse(entry)),
                None => return,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let Some(hub) = hub.upgrade() else { return };
                let now = Instant::now();
                while let Some(Reverse((at, _))) = queue.peek() {
                    if *at > now {
                        break;
                    }
                    let Some(Reverse((_, topic))) = queue.pop() else { break };
                    hub.flush(&topic);
                }
            }
        }
    }
}

impl Recovery {
    /// A batch (`outgoing`, the last stamp `last`) reached the room: keep it
    /// for held joins, and answer the floors that apply to it (dropping
    /// those it passes).
    fn passed(&mut self, outgoing: &[Outgoing], last: Option<Stamp>) -> Vec<(u64, Stamp)> {
        if last.is_some() {
            self.last = last;
        }
        for waiter in &mut self.waiting {
            if waiter.held.len() + outgoing.len() > MAX_HELD {
                waiter
                    .peer
                    .close(crate::ws::close::SLOW_CONSUMER, "slow consumer", false);
                waiter.held.clear();
                continue;
            }
            waiter.held.extend(outgoing.iter().cloned());
        }
        if self.floors.is_empty() {
            return Vec::new();
        }
        let floors = self.floors.clone();
        if let Some(s) = last {
            self.floors
                .retain(|(_, at)| at.epoch == s.epoch && at.seq > s.seq);
        }
        floors
    }
}

impl Keyed for Arc<Peer> {
    fn key(&self) -> u64 {
        self.seq
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::protocol::{self, epoch_key, Sender};

    /// A peer on a real loopback socket, and the client's end of it.
    async fn peer(seq: u64) -> (Arc<Peer>, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let peer = Peer::new(
            Arc::from(format!("p{seq}")),
            seq,
            Format::Json,
            server,
            1 << 20,
            0,
        );
        (Arc::new(peer), client)
    }

    /// The envelope of message `seq` in epoch "e1", as Redis stamps it.
    fn stamped(seq: u64) -> Bytes {
        let plain = protocol::json_envelope(
            "n",
            Sender::default(),
            &serde_json::value::to_raw_value(&seq).unwrap(),
        );
        protocol::stamp_envelope(&plain, seq, "e1")
    }

    /// What the client received until it has been quiet for a moment: each
    /// frame's `op` and `seq`.
    async fn received(client: &mut TcpStream) -> Vec<(String, Option<u64>)> {
        let mut bytes = Vec::new();
        let mut buf = [0u8; 65536];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
        }
        let mut out = Vec::new();
        let mut rest = &bytes[..];
        while let Some((_, payload)) = crate::ws::split_server_frame(rest) {
            let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
            out.push((v["op"].as_str().unwrap().to_owned(), v["seq"].as_u64()));
            let header = if payload.len() < 126 { 2 } else { 4 };
            rest = &rest[header + payload.len()..];
        }
        out
    }

    /// The seam of a held join: what arrives while the replay is read is
    /// kept and de-duplicated against it, and what the node delivers later
    /// up to the client's position (still in flight on the bus) is skipped
    /// for it — while a member that was there all along gets everything once.
    #[tokio::test]
    async fn a_held_join_gets_the_replay_then_live_without_gap_or_duplicate() {
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let (hub, mut subs) = Hub::new(metrics, 1, Vec::new());
        let topic = Topic::room("h:1");
        let (member, mut member_client) = peer(1).await;
        let (joiner, mut joiner_client) = peer(2).await;
        hub.join(&topic, &member);
        assert!(matches!(subs.try_recv(), Ok(SubCmd::Subscribe(_))));
        let deliver = |seqs: &[u64]| {
            let payloads: Vec<Bytes> = seqs.iter().map(|&s| stamped(s)).collect();
            let batch: Vec<(&str, &[u8])> =
                payloads.iter().map(|p| (topic.key(), &p[..])).collect();
            hub.deliver_batch(&batch);
        };
        deliver(&[4]);
        hub.hold(&topic, &joiner);
        // Arrives while the joiner's history read (since 2, top 7) is in flight.
        deliver(&[5, 6]);
        let replay: Vec<Outgoing> = (3..=7)
            .map(|s| Outgoing::from_envelope(topic.target(), &stamped(s)).unwrap())
            .collect();
        let at = Stamp {
            seq: 7,
            epoch: epoch_key("e1"),
        };
        hub.release(&topic, &joiner, &[protocol::ack_frame(1)], &replay, at);
        assert!(matches!(subs.try_recv(), Ok(SubCmd::Position(_, p)) if p == at));
        // 7 was still on its way through the bus; 8 is new.
        deliver(&[7]);
        deliver(&[8, 9]);
        let msg = |s: u64| ("msg".to_string(), Some(s));
        let mut want = vec![("ack".to_string(), None)];
        want.extend((3..=9).map(msg));
        assert_eq!(received(&mut joiner_client).await, want);
        assert_eq!(
            received(&mut member_client).await,
            (4..=9).map(msg).collect::<Vec<_>>()
        );
        // The floor is gone once the room passed it.
        assert!(hub.rooms.read()[&topic].recovery.lock().floors.is_empty());
    }

    #[tokio::test]
    async fn an_abandoned_hold_sends_nothing_and_unsubscribes_an_empty_room() {
        let metrics = Arc::new(Metrics::new(prometheus::Registry::new()).unwrap());
        let (hub, mut subs) = Hub::new(metrics, 1, Vec::new());
        let topic = Topic::room("h:2");
        let (joiner, mut client) = peer(1).await;
        hub.hold(&topic, &joiner);
        assert!(matches!(subs.try_recv(), Ok(SubCmd::Subscribe(_))));
        hub.deliver_batch(&[(topic.key(), &stamped(1)[..])]);
        hub.abandon(&topic, &joiner);
        assert!(matches!(subs.try_recv(), Ok(SubCmd::Unsubscribe(_))));
        assert_eq!(received(&mut client).await, []);
    }
}
