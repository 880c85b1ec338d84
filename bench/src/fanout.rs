//! `fanout` (one measured window) and `ramp` (rising rate until a threshold
//! breaks) on top of the engine.

use std::time::Duration;

use serde::Serialize;

use crate::engine::{LoadCfg, Session};
use crate::report::{emit, RunMeta, RunReport};
use crate::stats::SeqCounts;

/// Timing of a fanout run.
#[derive(Debug, Clone, Copy)]
pub struct FanoutPlan {
    pub rate: f64,
    pub warmup: Duration,
    pub duration: Duration,
    pub drain: Duration,
    pub threads: usize,
}

/// Returns the process exit code.
pub async fn run_fanout(cfg: LoadCfg, plan: FanoutPlan) -> i32 {
    let mut s = Session::connect(cfg).await;
    if s.connected_subscribers == 0 || s.connected_publishers == 0 {
        eprintln!("error: no subscriber or no publisher could connect; nothing to measure");
    }
    eprintln!(
        "warm-up {:.1}s, window {:.1}s, drain {:.1}s at {} msg/s per publisher",
        plan.warmup.as_secs_f64(),
        plan.duration.as_secs_f64(),
        plan.drain.as_secs_f64(),
        plan.rate
    );
    let ok = s.connected_subscribers > 0 && s.connected_publishers > 0;
    let w = s
        .measure(plan.rate, plan.warmup, plan.duration, plan.drain)
        .await;
    let meta = RunMeta {
        mode: "fanout",
        step: None,
        warmup_s: plan.warmup.as_secs_f64(),
        drain_s: plan.drain.as_secs_f64(),
        threads: plan.threads,
    };
    let r = RunReport::build(&s, w, &meta);
    s.shutdown().await;
    r.print_human();
    emit(&r);
    if ok && r.seq_check_failure().is_none() {
        0
    } else {
        1
    }
}

#[derive(Debug, Clone, Copy)]
pub struct RampPlan {
    pub start_rate: f64,
    pub step: f64,
    pub step_duration: Duration,
    pub warmup: Duration,
    pub step_settle: Duration,
    pub drain: Duration,
    pub max_p99_ms: f64,
    pub max_loss: f64,
    pub max_steps: usize,
    /// A step that breaks a threshold is measured again this many times
    /// before the ramp stops (one latency spike on a noisy machine is not saturation).
    pub retries: usize,
    pub threads: usize,
}

#[derive(Debug, Serialize)]
pub struct RampResult {
    pub mode: &'static str,
    pub protocol: &'static str,
    pub urls: Vec<String>,
    pub subscribers: usize,
    pub rooms: usize,
    pub publishers: usize,
    pub size: usize,
    pub steps_run: usize,
    pub max_p99_ms: f64,
    pub max_loss: f64,
    /// Best step within the thresholds (null if none was).
    pub max_sustained_deliveries_per_s: Option<f64>,
    pub max_sustained_rate: Option<f64>,
    pub max_sustained_step: Option<usize>,
    pub limited_by: &'static str,
    pub last_rate: Option<f64>,
    pub last_p99_ms: Option<f64>,
    pub last_loss_fraction: Option<f64>,
    pub generator_cpu_percent: Option<f64>,
    pub generator_threads: usize,
    pub generator_saturated: bool,
    /// Server seqs (history rooms) over the whole ramp, as of the last step.
    pub seq_since_connect: Option<SeqCounts>,
}

/// Why a step broke the thresholds, if it did.
pub fn step_verdict(
    p99_ms: Option<f64>,
    loss: f64,
    received: u64,
    max_p99_ms: f64,
    max_loss: f64,
) -> Option<&'static str> {
    if loss > max_loss {
        return Some("loss");
    }
    match p99_ms {
        Some(p) if p > max_p99_ms => Some("latency"),
        // Nothing received at all cannot count as sustained.
        None if received == 0 => Some("loss"),
        _ => None,
    }
}

pub async fn run_ramp(cfg: LoadCfg, plan: RampPlan) -> i32 {
    let mut s = Session::connect(cfg).await;
    if s.connected_subscribers == 0 || s.connected_publishers == 0 {
        eprintln!("error: no subscriber or no publisher could connect; nothing to measure");
        s.shutdown().await;
        return 1;
    }
    let mut best: Option<(usize, f64, f64)> = None; // (step, rate, deliveries/s)
    let mut limited_by = "steps";
    let mut last: Option<RunReport> = None;
    let mut rate = plan.start_rate;
    let mut steps_run = 0;
    let mut seq_failure = None;
    'steps: for step in 0..plan.max_steps {
        for attempt in 0..=plan.retries {
            let settle = if step == 0 && attempt == 0 {
                plan.warmup
            } else {
                plan.step_settle
            };
            eprintln!(
                "ramp step {step} (attempt {}): {rate:.3} msg/s per publisher",
                attempt + 1
            );
            let w = s
                .measure(rate, settle, plan.step_duration, plan.drain)
                .await;
            let meta = RunMeta {
                mode: "ramp",
                step: Some(step),
                warmup_s: settle.as_secs_f64(),
                drain_s: plan.drain.as_secs_f64(),
                threads: plan.threads,
            };
            let r = RunReport::build(&s, w, &meta);
            r.print_human();
            emit(&r);
            steps_run += 1;
            // Counters since connect only grow: the last failing step says it all.
            if let Some(why) = r.seq_check_failure() {
                seq_failure = Some(why);
            }
            let verdict = step_verdict(
                r.latency_ms.p99,
                r.loss_fraction,
                r.received,
                plan.max_p99_ms,
                plan.max_loss,
            );
            let passed = verdict.is_none();
            match verdict {
                Some(v) => limited_by = v,
                None => {
                    limited_by = "steps";
                    if best.is_none_or(|(_, _, d)| r.deliveries_per_s > d) {
                        best = Some((step, r.rate, r.deliveries_per_s));
                    }
                }
            }
            last = Some(r);
            if passed {
                rate = (rate * plan.step).min(crate::MAX_RATE);
                continue 'steps;
            }
        }
        break;
    }
    let c = &s.cfg;
    let result = RampResult {
        mode: "ramp-result",
        protocol: c.protocol.name(),
        urls: c.targets.iter().map(|t| t.url.clone()).collect(),
        subscribers: c.subscribers,
        rooms: c.rooms,
        publishers: c.publishers,
        size: c.size,
        steps_run,
        max_p99_ms: plan.max_p99_ms,
        max_loss: plan.max_loss,
        max_sustained_deliveries_per_s: best.map(|b| b.2),
        max_sustained_rate: best.map(|b| b.1),
        max_sustained_step: best.map(|b| b.0),
        limited_by,
        last_rate: last.as_ref().map(|r| r.rate),
        last_p99_ms: last.as_ref().and_then(|r| r.latency_ms.p99),
        last_loss_fraction: last.as_ref().map(|r| r.loss_fraction),
        generator_cpu_percent: last.as_ref().and_then(|r| r.generator_cpu_percent),
        generator_threads: plan.threads,
        generator_saturated: last.as_ref().is_some_and(|r| r.generator_saturated()),
        seq_since_connect: last.as_ref().map(|r| r.seq_since_connect),
    };
    s.shutdown().await;
    eprintln!("== ramp result ==");
    match best {
        Some((step, rate, d)) => eprintln!(
            "  max sustained: {d} deliveries/s at {rate} msg/s per publisher (step {step})"
        ),
        None => eprintln!(
            "  no step stayed within p99 <= {} ms and loss <= {}",
            plan.max_p99_ms, plan.max_loss
        ),
    }
    eprintln!("  limited by: {limited_by}");
    if result.generator_saturated {
        eprintln!(
            "  WARNING: at the last step the generator used {:.0}% CPU with {} thread(s): the generator, not the server, ran out first",
            result.generator_cpu_percent.unwrap_or(0.0),
            plan.threads
        );
    }
    emit(&result);
    if let Some(why) = seq_failure {
        eprintln!("  FAILED --check-seq: {why}");
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(step_verdict(Some(10.0), 0.0, 100, 50.0, 0.001), None);
        assert_eq!(
            step_verdict(Some(60.0), 0.0, 100, 50.0, 0.001),
            Some("latency")
        );
        assert_eq!(
            step_verdict(Some(10.0), 0.01, 100, 50.0, 0.001),
            Some("loss")
        );
        assert_eq!(
            step_verdict(Some(60.0), 0.01, 100, 50.0, 0.001),
            Some("loss")
        );
        assert_eq!(step_verdict(None, 0.0, 0, 50.0, 0.001), Some("loss"));
    }
}
