//! Report shapes (one JSON line on stdout each) and human summaries (stderr).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::engine::{Session, WindowResult};
use crate::procfs;
use crate::stats::{round3, Latency, SeqCounts};

/// One measured window (`fanout`, or one `ramp` step).
#[derive(Debug, Serialize)]
pub struct RunReport {
    pub mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    pub protocol: &'static str,
    pub urls: Vec<String>,
    pub subscribers: usize,
    pub rooms: usize,
    pub room_prefix: String,
    pub publishers: usize,
    pub rate: f64,
    pub size: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub drain_s: f64,
    pub target_sent: u64,
    pub sent: u64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub loss_fraction: f64,
    pub duplicates: u64,
    pub reordered: u64,
    pub late: u64,
    /// Server seqs (rooms with history) of the window's messages: frames
    /// that carried one, seqs skipped, repeated, epoch changes, and frames
    /// without one where the connection had seen one. All 0 without history.
    pub seq_frames: u64,
    pub seq_gaps: u64,
    pub seq_duplicates: u64,
    pub epoch_changes: u64,
    pub seq_missing: u64,
    /// The same counters over the whole run so far (from connect, warm-up
    /// and drains included).
    pub seq_since_connect: SeqCounts,
    /// `--check-seq` was given: the rooms were expected to have history.
    pub check_seq: bool,
    pub deliveries_per_s: f64,
    pub latency_ms: Latency,
    pub connected_subscribers: usize,
    pub connected_publishers: usize,
    pub connect_failures: u64,
    pub connect_failure_kinds: BTreeMap<String, u64>,
    pub disconnects: u64,
    pub close_codes: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub bad_frames: u64,
    pub foreign_frames: u64,
    pub send_errors: u64,
    pub unreported_subscribers: u64,
    pub server_pids: Vec<u32>,
    pub server_cpu_us_per_delivery: Option<f64>,
    pub server_cpu_percent: Option<f64>,
    /// `--redis-pid`s and their CPU in the window: % of one core, and µs per
    /// message sent (Redis's work follows publishes, not deliveries).
    pub redis_pids: Vec<u32>,
    pub redis_cpu_percent_window: Option<f64>,
    pub redis_cpu_us_per_message: Option<f64>,
    pub generator_cpu_percent: Option<f64>,
    pub generator_threads: usize,
    pub server_rss_kb: Option<u64>,
    pub generator_rss_kb: Option<u64>,
    pub clk_tck: u64,
    pub clk_tck_assumed: bool,
}

/// Per-run values the engine does not know.
pub struct RunMeta {
    pub mode: &'static str,
    pub step: Option<usize>,
    pub warmup_s: f64,
    pub drain_s: f64,
    pub threads: usize,
}

impl RunReport {
    pub fn build(s: &Session, w: WindowResult, meta: &RunMeta) -> RunReport {
        let c = &s.cfg;
        let (clk_tck, clk_tck_assumed) = procfs::clk_tck();
        let received = w.acc.received;
        let per_delivery = match w.cpu.server_us {
            Some(us) if received > 0 => Some(round3(us / received as f64)),
            _ => None,
        };
        let redis_per_message = match w.redis_cpu.server_us {
            Some(us) if w.acc.sent > 0 => Some(round3(us / w.acc.sent as f64)),
            _ => None,
        };
        RunReport {
            mode: meta.mode,
            step: meta.step,
            protocol: c.protocol.name(),
            urls: c.targets.iter().map(|t| t.url.clone()).collect(),
            subscribers: c.subscribers,
            rooms: c.rooms,
            room_prefix: c.room_prefix.clone(),
            publishers: c.publishers,
            rate: round3(w.rate),
            size: c.size,
            warmup_s: meta.warmup_s,
            duration_s: w.duration_s,
            drain_s: meta.drain_s,
            target_sent: w.target_sent,
            sent: w.acc.sent,
            expected: w.acc.expected,
            received,
            lost: w.acc.lost,
            loss_fraction: w.acc.loss_fraction(),
            duplicates: w.acc.duplicates,
            reordered: w.acc.reordered,
            late: s.events.late.load(Ordering::Relaxed),
            seq_frames: w.acc.seq.frames,
            seq_gaps: w.acc.seq.gaps,
            seq_duplicates: w.acc.seq.duplicates,
            epoch_changes: w.acc.seq.epoch_changes,
            seq_missing: w.acc.seq.missing,
            seq_since_connect: w.acc.seq_since_connect,
            check_seq: c.check_seq,
            deliveries_per_s: if w.duration_s > 0.0 {
                round3(received as f64 / w.duration_s)
            } else {
                0.0
            },
            latency_ms: w.acc.latency(),
            connected_subscribers: s.connected_subscribers,
            connected_publishers: s.connected_publishers,
            connect_failures: s.failures.total(),
            connect_failure_kinds: s.failures.counts(),
            disconnects: s.events.disconnects.load(Ordering::Relaxed),
            close_codes: s.events.close_codes(),
            errors: s.events.errors(),
            bad_frames: s.events.bad_frames.load(Ordering::Relaxed),
            foreign_frames: s.events.foreign_frames.load(Ordering::Relaxed),
            send_errors: s.events.send_errors.load(Ordering::Relaxed),
            unreported_subscribers: w.acc.unreported_subscribers,
            server_pids: c.server_pids.clone(),
            server_cpu_us_per_delivery: per_delivery,
            server_cpu_percent: w.cpu.server_percent.map(round1),
            redis_pids: c.redis_pids.clone(),
            redis_cpu_percent_window: w.redis_cpu.server_percent.map(round1),
            redis_cpu_us_per_message: redis_per_message,
            generator_cpu_percent: w.cpu.generator_percent.map(round1),
            generator_threads: meta.threads,
            server_rss_kb: w.server_rss_kb,
            generator_rss_kb: procfs::rss_kb("self"),
            clk_tck,
            clk_tck_assumed,
        }
    }

    /// Why `--check-seq` fails this run (None: it passes, or was not given).
    pub fn seq_check_failure(&self) -> Option<String> {
        seq_check_failure(self.check_seq, &self.room_prefix, &self.seq_since_connect)
    }

    /// True if the generator used about all the CPU its threads can give.
    pub fn generator_saturated(&self) -> bool {
        self.generator_cpu_percent
            .is_some_and(|p| p >= 95.0 * self.generator_threads as f64)
    }

    pub fn print_human(&self) {
        let opt = |v: Option<f64>| v.map_or_else(|| "n/a".to_string(), |v| format!("{v}"));
        let title = match self.step {
            Some(s) => format!("{} step {s}", self.mode),
            None => self.mode.to_string(),
        };
        eprintln!(
            "== {title}: {} protocol, {} ==",
            self.protocol,
            self.urls.join(", ")
        );
        eprintln!(
            "  load:        {} subscribers ({} connected), {} rooms, {} publishers ({} connected) x {} msg/s, {} B payload, window {}s",
            self.subscribers,
            self.connected_subscribers,
            self.rooms,
            self.publishers,
            self.connected_publishers,
            self.rate,
            self.size,
            self.duration_s
        );
        eprintln!(
            "  messages:    sent {} (target {}), expected deliveries {}, received {}, lost {} ({:.4}%), duplicates {}, reordered {}, late {}",
            self.sent,
            self.target_sent,
            self.expected,
            self.received,
            self.lost,
            self.loss_fraction * 100.0,
            self.duplicates,
            self.reordered,
            self.late
        );
        let t = &self.seq_since_connect;
        if t.frames > 0 || t.missing > 0 || self.check_seq {
            eprintln!(
                "  history seq: window: {} msg frames with a seq, {} seqs skipped (gaps), {} duplicates, {} epoch changes, {} frames without a seq; since connect: {} frames, {} skipped, {} duplicates, {} epoch changes, {} without",
                self.seq_frames,
                self.seq_gaps,
                self.seq_duplicates,
                self.epoch_changes,
                self.seq_missing,
                t.frames,
                t.gaps,
                t.duplicates,
                t.epoch_changes,
                t.missing
            );
        }
        eprintln!("  throughput:  {} deliveries/s", self.deliveries_per_s);
        let l = &self.latency_ms;
        eprintln!(
            "  latency ms:  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            opt(l.p50),
            opt(l.p90),
            opt(l.p99),
            opt(l.p999),
            opt(l.max)
        );
        eprintln!(
            "  problems:    connect failures {} {:?}, disconnects {} {:?}, error frames {:?}, bad frames {}, foreign {}, send errors {}, unreported subscribers {}",
            self.connect_failures,
            self.connect_failure_kinds,
            self.disconnects,
            self.close_codes,
            self.errors,
            self.bad_frames,
            self.foreign_frames,
            self.send_errors,
            self.unreported_subscribers
        );
        let assumed = if self.clk_tck_assumed {
            " (CLK_TCK assumed 100)"
        } else {
            ""
        };
        if self.server_pids.is_empty() {
            eprintln!("  server:      no --server-pid given");
        } else {
            eprintln!(
                "  server:      pids {:?}: cpu {}% of one core, {} µs CPU per delivery, rss {} kB{assumed}",
                self.server_pids,
                opt(self.server_cpu_percent),
                opt(self.server_cpu_us_per_delivery),
                self.server_rss_kb.map_or_else(|| "n/a".into(), |v| v.to_string())
            );
        }
        if !self.redis_pids.is_empty() {
            eprintln!(
                "  redis:       pids {:?}: cpu {}% of one core in the window, {} µs CPU per message sent",
                self.redis_pids,
                opt(self.redis_cpu_percent_window),
                opt(self.redis_cpu_us_per_message)
            );
        }
        eprintln!(
            "  generator:   cpu {}% of one core ({} worker thread(s)), rss {} kB",
            opt(self.generator_cpu_percent),
            self.generator_threads,
            self.generator_rss_kb
                .map_or_else(|| "n/a".into(), |v| v.to_string())
        );
        if self.generator_saturated() {
            eprintln!("  WARNING: the generator used ~all of its {} thread(s): it, not the server, may be the bottleneck (try --threads)", self.generator_threads);
        }
        if self.sent < self.target_sent * 95 / 100 {
            eprintln!("  WARNING: publishers sent {} of {} scheduled messages (disconnects, generator saturation or socket back-pressure)", self.sent, self.target_sent);
        }
        if t.gaps > 0 {
            eprintln!(
                "  WARNING: SEQ GAPS: {} server seq(s) skipped since connect ({} in the window): subscribers of a history room never got those messages",
                t.gaps, self.seq_gaps
            );
        }
        if t.duplicates > 0 {
            eprintln!(
                "  WARNING: SEQ DUPLICATES: {} msg frame(s) since connect ({} in the window) had a seq not above the last one in the same epoch",
                t.duplicates, self.seq_duplicates
            );
        }
        if t.missing > 0 {
            eprintln!(
                "  WARNING: {} msg frame(s) without a seq on connections that had seen one ({} in the window)",
                t.missing, self.seq_missing
            );
        }
        if t.epoch_changes > 0 {
            eprintln!(
                "  note: the epoch changed {} time(s) since connect ({} in the window): the server lost a room's history and started its seqs over",
                t.epoch_changes, self.epoch_changes
            );
        }
        if let Some(why) = self.seq_check_failure() {
            eprintln!("  FAILED --check-seq: {why}");
        }
        if self.late > 0 {
            eprintln!(
                "  note: {} message(s) (cumulative) arrived after their window was collected; they count as lost -- raise --drain if latency is that high",
                self.late
            );
        }
        if self.connected_subscribers < self.subscribers {
            eprintln!("  note: expected/lost only cover subscribers that connected");
        }
        if !self.server_pids.is_empty() {
            eprintln!("  note: deliveries count subscribers only (publishers' own echoes are read but not counted)");
        }
    }
}

/// Why `--check-seq` fails a run with these counters since connect.
pub fn seq_check_failure(check_seq: bool, room_prefix: &str, t: &SeqCounts) -> Option<String> {
    if !check_seq {
        return None;
    }
    if t.frames == 0 {
        return Some(format!(
            "no msg frame carried a seq: rooms {room_prefix}0.. have no history (is --room-prefix a namespace with history on the server?)"
        ));
    }
    t.broken().then(|| {
        format!(
            "server seqs since connect: {} skipped, {} repeated, {} msg frames without a seq",
            t.gaps, t.duplicates, t.missing
        )
    })
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Prints one JSON line on stdout.
pub fn emit<T: Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot serialise report: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_check_verdicts() {
        let ok = SeqCounts {
            frames: 100,
            epoch_changes: 1,
            ..Default::default()
        };
        let none = SeqCounts::default();
        let gaps = SeqCounts { gaps: 3, ..ok };
        let dups = SeqCounts {
            duplicates: 1,
            ..ok
        };
        let missing = SeqCounts { missing: 2, ..ok };
        // Without --check-seq nothing fails (the counts are still reported).
        for t in [&ok, &none, &gaps, &dups, &missing] {
            assert_eq!(seq_check_failure(false, "h.", t), None);
        }
        // An epoch change alone passes.
        assert_eq!(seq_check_failure(true, "h.", &ok), None);
        let why = seq_check_failure(true, "bench-", &none).unwrap();
        assert!(
            why.contains("no msg frame carried a seq") && why.contains("bench-0"),
            "{why}"
        );
        assert!(seq_check_failure(true, "h.", &gaps)
            .unwrap()
            .contains("3 skipped"));
        assert!(seq_check_failure(true, "h.", &dups)
            .unwrap()
            .contains("1 repeated"));
        assert!(seq_check_failure(true, "h.", &missing)
            .unwrap()
            .contains("2 msg frames without a seq"));
    }

    #[test]
    fn rounding() {
        assert_eq!(round1(12.345), 12.3);
        assert_eq!(round3(1.23456), 1.235);
    }
}
