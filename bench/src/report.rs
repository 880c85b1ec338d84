//! Report shapes (one JSON line on stdout each) and human summaries (stderr).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use serde::Serialize;

use crate::engine::{Session, WindowResult};
use crate::procfs;
use crate::stats::{round3, Latency};

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
        RunReport {
            mode: meta.mode,
            step: meta.step,
            protocol: c.protocol.name(),
            urls: c.targets.iter().map(|t| t.url.clone()).collect(),
            subscribers: c.subscribers,
            rooms: c.rooms,
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
            generator_cpu_percent: w.cpu.generator_percent.map(round1),
            generator_threads: meta.threads,
            server_rss_kb: w.server_rss_kb,
            generator_rss_kb: procfs::rss_kb("self"),
            clk_tck,
            clk_tck_assumed,
        }
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
    fn rounding() {
        assert_eq!(round1(12.345), 12.3);
        assert_eq!(round3(1.23456), 1.235);
    }
}
