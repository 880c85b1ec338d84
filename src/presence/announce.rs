//! The announcer: `presence` frames to the JSON members of local rooms when
//! the number they are shown changed, at most once per `presence.throttle`
//! per room (`presence/mod.rs`). It wakes on local joins and leaves, on
//! every new cluster view, and when a throttled room's throttle ends.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::name;
use crate::gateway::Gateway;
use crate::protocol;
use crate::topic::Topic;

/// Send presence frames to local rooms until `stop`.
pub(super) async fn run(gw: &Gateway, stop: &CancellationToken) {
    let (presence, hub) = (&gw.presence, &gw.hub);
    let mut rooms = Announcer::new(presence.config.throttle);
    loop {
        let next = rooms.next_due();
        let wake = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        let topics: Vec<Topic> = tokio::select! {
            _ = stop.cancelled() => return,
            _ = hub.changes().notified() => hub.take_changed().into_iter().collect(),
            _ = presence.updated.notified() => hub.room_counts().into_iter().map(|(t, _)| t).collect(),
            _ = tokio::time::sleep_until(wake), if next.is_some() => rooms.take_due(Instant::now()),
        };
        let (now, cluster) = (Instant::now(), presence.cluster());
        for topic in topics {
            rooms.consider(topic, now, |topic, last| {
                let others = cluster.total(name(topic)).online;
                let mut sent = None;
                hub.tell_room(topic, |local| {
                    let online = others + local as u64;
                    (last != Some(online)).then(|| {
                        sent = Some(online);
                        protocol::presence_frame(name(topic), online)
                    })
                })?;
                Some(sent)
            });
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(due, std::slice::from_ref(&room));
        a.consider(room.clone(), t0 + throttle, tell(online));
        assert_eq!(*told.borrow(), [1, 4], "the burst's last number");
        // Unchanged: nothing sent; gone: forgotten, so the next one is told at once.
        a.consider(room.clone(), t0 + throttle * 2, tell(online));
        a.consider(room.clone(), t0 + throttle * 2, |_, _| None);
        a.consider(room.clone(), t0 + throttle * 2, tell(1));
        assert_eq!(*told.borrow(), [1, 4, 1]);
    }
}
