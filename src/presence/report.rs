//! The reporter: this node's per-room counts and watch time to the bus every
//! report interval, the other nodes' counts from it every quarter interval
//! (the timing and the bound it gives are in `presence/mod.rs`), and a
//! goodbye at shutdown.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::name;
use crate::bus::{BusError, Report, RoomReport, Snapshot};
use crate::gateway::Gateway;
use crate::topic::Topic;

/// Reads per report interval.
const READS_PER_REPORT: u32 = 4;

/// How long a report counts, in report intervals.
const FRESH_REPORTS: f64 = 1.5;

/// Report and read until `stop`, then say goodbye.
pub(super) async fn run(gw: &Gateway, stop: &CancellationToken) {
    let presence = &gw.presence;
    let interval = presence.config.report_interval;
    let period = interval / READS_PER_REPORT;
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut reporter = Reporter::new(gw, Instant::now());
    let mut next_report = Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = Instant::now();
        // Ticks are a quarter apart: within half a tick is on time.
        if now + period / 2 >= next_report {
            // One that did not get through is tried again on the next tick
            // (a node starting before its bus is up reports once it is).
            let stored = reporter.report(now).await;
            next_report = now + if stored { interval } else { period };
        } else {
            let local = gw.hub.room_counts();
            let rooms: Vec<&str> = local.iter().map(|(t, _)| name(t)).collect();
            if !rooms.is_empty() {
                let snapshot = gw.bus.presence(Report::Read { rooms: &rooms }).await;
                presence.replace(presence.cluster().read(&rooms, snapshot, now));
            }
        }
        // Counts whose shard did not answer run out on time.
        presence.prune(Instant::now());
    }
    reporter.leave().await;
}

struct Reporter<'a> {
    gw: &'a Gateway,
    fresh_for: Duration,
    watched: Watched,
    /// Rooms whose count this node may still have in the bus: a report
    /// that no longer has them removes it.
    reported: HashSet<String>,
}

impl<'a> Reporter<'a> {
    fn new(gw: &'a Gateway, now: Instant) -> Self {
        Reporter {
            gw,
            fresh_for: gw.presence.config.report_interval.mul_f64(FRESH_REPORTS),
            watched: Watched {
                since: now,
                stored: now,
                pending: HashMap::new(),
            },
            reported: HashSet::new(),
        }
    }

    /// This node's rooms and their counts now, the rooms it left since its
    /// last report (count 0) and those with watch time still to add.
    fn rooms(&mut self, now: Instant) -> Vec<(String, u64, f64)> {
        let local = self.gw.hub.room_counts();
        self.watched.sample(&local, now);
        let mut rooms: HashMap<&str, (u64, f64)> = local
            .iter()
            .map(|(t, n)| (name(t), (*n as u64, 0.0)))
            .collect();
        for room in &self.reported {
            rooms.entry(room).or_default();
        }
        for (room, seconds) in self.watched.seconds() {
            rooms.entry(room).or_default().1 = seconds;
        }
        rooms
            .into_iter()
            .map(|(room, (online, watch))| (room.to_owned(), online, watch))
            .collect()
    }

    /// Report the counts and watch time, and read the other nodes' counts
    /// in the same rooms; `false` if this node's record did not get in. Tried even while the bus is down: on a cluster,
    /// the shards that are up take their rooms' part (the others fail at
    /// once, not connected).
    async fn report(&mut self, now: Instant) -> bool {
        let (gw, metrics) = (self.gw, &self.gw.metrics);
        let rooms = self.rooms(now);
        let reports: Vec<RoomReport> = rooms
            .iter()
            .map(|(room, online, watch)| RoomReport {
                room,
                online: *online,
                watch: *watch,
            })
            .collect();
        let report = Report::Counts {
            rooms: &reports,
            fresh_for: self.fresh_for,
            watch_ttl: gw.presence.config.watch_ttl,
        };
        let snapshot = gw.bus.presence(report).await;
        let failed = snapshot.rooms.iter().find_map(|r| r.as_ref().err());
        match (failed, snapshot.nodes) {
            (None, Some(_)) => metrics.presence_reports.inc(),
            // Tried anyway, for the shards that are up; the bus being down
            // is `roomcast_bus_up`'s to say, not a failure of each report.
            _ if !gw.bus.is_up() => {}
            (failed, _) => {
                metrics.presence_report_failures.inc();
                match failed {
                    Some(e) => tracing::warn!(error = %e, "presence report failed"),
                    None => tracing::warn!("presence report failed: the node list did not answer"),
                }
            }
        }
        self.reported.clear();
        for ((room, online, _), result) in rooms.iter().zip(&snapshot.rooms) {
            self.watched.settle(room, result.as_ref().map(|_| ()), now);
            if *online > 0 || result.is_err() {
                self.reported.insert(room.clone());
            }
        }
        self.watched.expire(now, gw.presence.config.watch_ttl);
        let asked: Vec<&str> = rooms
            .iter()
            .filter(|(_, online, _)| *online > 0)
            .map(|(room, _, _)| room.as_str())
            .collect();
        let answers = rooms.iter().zip(snapshot.rooms);
        let snapshot = Snapshot {
            rooms: answers
                .filter(|((_, online, _), _)| *online > 0)
                .map(|(_, answer)| answer)
                .collect(),
            nodes: snapshot.nodes,
        };
        let stored = snapshot.nodes.is_some();
        let presence = &gw.presence;
        presence.replace(presence.cluster().read(&asked, snapshot, now));
        stored
    }

    /// The watch time since the last report goes in, and the counts go out.
    async fn leave(mut self) {
        let gw = self.gw;
        let rooms = self.rooms(Instant::now());
        let reports: Vec<RoomReport> = rooms
            .iter()
            .map(|(room, _, watch)| RoomReport {
                room,
                online: 0,
                watch: *watch,
            })
            .collect();
        let leaving = Report::Leaving {
            rooms: &reports,
            watch_ttl: gw.presence.config.watch_ttl,
        };
        let snapshot = gw.bus.presence(leaving).await;
        match snapshot.rooms.iter().find_map(|r| r.as_ref().err()) {
            None => tracing::debug!("presence removed"),
            Some(e) => tracing::warn!(
                error = %e,
                "presence goodbye failed; this node's counts expire on their own"
            ),
        }
    }
}

/// Viewer-seconds not yet in the bus: each report adds every room's count ×
/// the time since the previous one.
struct Watched {
    /// When the counts were last sampled.
    since: Instant,
    /// Last time the bus took them (older ones would have expired there).
    stored: Instant,
    pending: HashMap<String, f64>,
}

impl Watched {
    fn sample(&mut self, rooms: &[(Topic, usize)], now: Instant) {
        let elapsed = now.saturating_duration_since(self.since).as_secs_f64();
        self.since = now;
        for (topic, count) in rooms {
            let seconds = *count as f64 * elapsed;
            if seconds > 0.0 {
                *self.pending.entry(name(topic).to_owned()).or_default() += seconds;
            }
        }
    }

    fn seconds(&self) -> Vec<(&str, f64)> {
        self.pending
            .iter()
            .filter(|(_, &s)| s > 0.0)
            .map(|(room, &s)| (room.as_str(), s))
            .collect()
    }

    /// After a report of `room`: its seconds are kept only if certainly not
    /// added; an unconfirmed addition is not repeated, to never count twice.
    fn settle(&mut self, room: &str, result: Result<(), &BusError>, now: Instant) {
        match result {
            Ok(()) | Err(BusError::Unconfirmed(_)) => {
                self.pending.remove(room);
                self.stored = now;
            }
            Err(BusError::Unavailable(_)) => {}
        }
    }

    /// Drop what waited longer than the bus would have kept it.
    fn expire(&mut self, now: Instant, ttl: Duration) {
        if now.saturating_duration_since(self.stored) > ttl {
            self.pending.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        w.settle("r", Err(&down), t0);
        w.expire(t0 + Duration::from_secs(4), ttl);
        w.sample(&rooms, t0 + Duration::from_secs(4));
        assert_eq!(w.seconds(), [("r", 12.0)]);
        w.settle("r", Err(&BusError::Unconfirmed("lost".into())), t0);
        assert!(w.seconds().is_empty());
        // Kept longer than the bus would have kept it: gone.
        w.sample(&rooms, t0 + Duration::from_secs(6));
        w.settle("r", Err(&down), t0);
        w.expire(t0 + ttl + Duration::from_secs(1), ttl);
        assert!(w.seconds().is_empty());
    }
}
