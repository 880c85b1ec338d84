//! The reporter: this node's per-room counts and watch time to the bus every
//! report interval, the other nodes' counts from it every quarter interval
//! (the timing and the bound it gives are in `presence/mod.rs`), and a
//! goodbye at shutdown.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::name;
use crate::bus::{BusError, Known, Report, Snapshot, Watch};
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
        let held = presence.cluster();
        let known = held.known();
        let answer = if now + period / 2 >= next_report {
            next_report = now + interval;
            reporter.report(now, &known).await
        } else if gw.bus.is_up() {
            gw.bus.presence(Report::Read { known: &known }).await.ok()
        } else {
            None
        };
        match answer {
            Some(snapshot) => presence.replace(held.read(snapshot, now)),
            // No answer (or the bus is down): the last view runs out on time.
            None => presence.prune(Instant::now()),
        }
    }
    reporter.leave().await;
}

struct Reporter<'a> {
    gw: &'a Gateway,
    fresh_for: Duration,
    watched: Watched,
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
        }
    }

    /// Report the counts and watch time, and read the others'. Nothing is
    /// attempted while the bus is down (`roomcast_bus_up` says so).
    async fn report(&mut self, now: Instant, known: Known<'_>) -> Option<Snapshot> {
        let (gw, metrics) = (self.gw, &self.gw.metrics);
        let rooms = gw.hub.room_counts();
        self.watched.sample(&rooms, now);
        if !gw.bus.is_up() {
            return None;
        }
        let counts: Vec<(&str, u64)> = rooms.iter().map(|(t, n)| (name(t), *n as u64)).collect();
        let seconds = self.watched.seconds();
        let report = Report::Counts {
            rooms: &counts,
            fresh_for: self.fresh_for,
            watch: Watch {
                seconds: &seconds,
                ttl: gw.presence.config.watch_ttl,
            },
            known,
        };
        let result = gw.bus.presence(report).await;
        match &result {
            Ok(_) => metrics.presence_reports.inc(),
            Err(e) => {
                metrics.presence_report_failures.inc();
                tracing::warn!(error = %e, "presence report failed");
            }
        }
        let ttl = gw.presence.config.watch_ttl;
        self.watched.settle(result.as_ref().map(|_| ()), now, ttl);
        result.ok()
    }

    /// The watch time since the last report goes in, and the counts go out.
    async fn leave(mut self) {
        let gw = self.gw;
        self.watched.sample(&gw.hub.room_counts(), Instant::now());
        let seconds = self.watched.seconds();
        let leaving = Report::Leaving {
            watch: Watch {
                seconds: &seconds,
                ttl: gw.presence.config.watch_ttl,
            },
        };
        match gw.bus.presence(leaving).await {
            Ok(_) => tracing::debug!("presence removed"),
            Err(e) => tracing::warn!(
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
    pending: HashMap<Topic, f64>,
}

impl Watched {
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
        w.settle(Err(&down), t0, ttl);
        w.sample(&rooms, t0 + Duration::from_secs(4));
        assert_eq!(w.seconds(), [("r", 12.0)]);
        w.settle(Err(&BusError::Unconfirmed("lost".into())), t0, ttl);
        assert!(w.seconds().is_empty());
    }
}
