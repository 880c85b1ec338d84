//! `idle`: open many quiet connections and measure the server's memory per
//! connection.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Semaphore};

use crate::conn::{self, FailureLog, Protocol, Target};
use crate::engine::{read_event, Events, ReadEvent};
use crate::payload::{classify_json, JsonFrame};
use crate::procfs;

#[derive(Debug, Clone)]
pub struct IdleCfg {
    pub targets: Vec<Target>,
    pub protocol: Protocol,
    pub connections: usize,
    pub rooms: usize,
    pub room_prefix: String,
    pub sources: usize,
    pub connect_concurrency: usize,
    pub connect_timeout: Duration,
    pub server_pids: Vec<u32>,
    pub hold: Duration,
    pub settle: Duration,
    pub threads: usize,
}

#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub mode: &'static str,
    pub protocol: &'static str,
    pub urls: Vec<String>,
    pub connections: usize,
    pub rooms: usize,
    pub sources: usize,
    pub connected: usize,
    pub failures: u64,
    pub failure_kinds: BTreeMap<String, u64>,
    pub connect_s: f64,
    pub hold_s: f64,
    pub disconnects: u64,
    pub close_codes: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
    pub server_pids: Vec<u32>,
    pub server_rss_before_kb: Option<u64>,
    pub server_rss_after_kb: Option<u64>,
    pub server_rss_end_kb: Option<u64>,
    pub rss_per_connection_bytes: Option<f64>,
    pub server_cpu_percent_hold: Option<f64>,
    pub generator_rss_kb: Option<u64>,
    pub generator_threads: usize,
    pub open_file_limit: Option<u64>,
}

pub async fn run_idle(cfg: IdleCfg) -> i32 {
    let fd_limit = conn::open_file_limit();
    if let Some(limit) = fd_limit {
        if (cfg.connections as u64) + 64 > limit {
            eprintln!(
                "warning: open-file limit is {limit} but {} connections were asked for; raise it with ulimit -n (e.g. `ulimit -n {}`)",
                cfg.connections,
                cfg.connections + 1024
            );
        }
    }
    let v4_loopback = cfg
        .targets
        .iter()
        .all(|t| matches!(t.addr, Some(std::net::SocketAddr::V4(a)) if a.ip().is_loopback()));
    if !v4_loopback && cfg.sources > 1 {
        eprintln!("note: --sources only applies to IPv4 loopback targets; connecting without source binding");
    }
    let rss_before = procfs::total_rss_kb(&cfg.server_pids);

    let events = Arc::new(Events::default());
    let failures = Arc::new(FailureLog::default());
    let sem = Arc::new(Semaphore::new(cfg.connect_concurrency.max(1)));
    let (stop_tx, _) = watch::channel(false);
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<bool>();
    let mut tasks = Vec::with_capacity(cfg.connections);
    let started = Instant::now();
    eprintln!(
        "opening {} connections ({} sources)...",
        cfg.connections, cfg.sources
    );
    for i in 0..cfg.connections {
        let target = cfg.targets[i % cfg.targets.len()].clone();
        let room = format!("{}{}", cfg.room_prefix, i % cfg.rooms);
        let source = v4_loopback.then(|| conn::source_addr(i, cfg.sources));
        let (sem, failures, events, ready) = (
            sem.clone(),
            failures.clone(),
            events.clone(),
            ready_tx.clone(),
        );
        let mut stop = stop_tx.subscribe();
        let (protocol, timeout) = (cfg.protocol, cfg.connect_timeout);
        tasks.push(tokio::spawn(async move {
            let ws = {
                let Ok(_permit) = sem.acquire().await else {
                    let _ = ready.send(false);
                    return;
                };
                conn::connect(
                    &target,
                    protocol,
                    &room,
                    source,
                    timeout,
                    conn::IDLE_READ_BUFFER,
                )
                .await
            };
            let mut ws = match ws {
                Ok(ws) => ws,
                Err(e) => {
                    failures.add(&e);
                    let _ = ready.send(false);
                    return;
                }
            };
            let _ = ready.send(true);
            drop(ready);
            let mut close_code = None;
            loop {
                tokio::select! {
                    biased;
                    _ = stop.changed() => return,
                    item = ws.next() => match read_event(item, &mut close_code) {
                        ReadEvent::Text(t) => {
                            if protocol == Protocol::Json {
                                if let JsonFrame::Error(code) = classify_json(t.as_str()) {
                                    events.error_frame(code);
                                }
                            }
                        }
                        ReadEvent::Ignore => {}
                        ReadEvent::Gone(code) => {
                            events.disconnect(code);
                            // Stay until stop so the task count stays simple.
                            let _ = stop.changed().await;
                            return;
                        }
                    },
                }
            }
        }));
    }
    drop(ready_tx);

    let (mut done, mut ok) = (0usize, 0usize);
    let mut last_print = Instant::now();
    let mut emfile_warned = false;
    while done < cfg.connections {
        match tokio::time::timeout(Duration::from_secs(2), ready_rx.recv()).await {
            Ok(Some(good)) => {
                done += 1;
                ok += usize::from(good);
            }
            Ok(None) => break,
            Err(_) => {}
        }
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            eprintln!(
                "  {done}/{} attempted, {ok} connected ({:.1}s)",
                cfg.connections,
                started.elapsed().as_secs_f64()
            );
            let counts = failures.counts();
            if !emfile_warned && (counts.contains_key("emfile") || counts.contains_key("enfile")) {
                emfile_warned = true;
                eprintln!("error: hit the open-file limit (EMFILE): raise it with ulimit -n");
            }
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    eprintln!(
        "connected {ok}/{} in {connect_s:.2}s; settling {:.1}s",
        cfg.connections,
        cfg.settle.as_secs_f64()
    );
    tokio::time::sleep(cfg.settle).await;
    let rss_after = procfs::total_rss_kb(&cfg.server_pids);

    eprintln!("holding {:.1}s...", cfg.hold.as_secs_f64());
    let cpu0 = procfs::CpuSample::take(&cfg.server_pids);
    tokio::time::sleep(cfg.hold).await;
    let cpu1 = procfs::CpuSample::take(&cfg.server_pids);
    let rss_end = procfs::total_rss_kb(&cfg.server_pids);
    let generator_rss_kb = procfs::rss_kb("self");

    stop_tx.send_replace(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            abort.abort();
        }
    }

    let per_conn = match (rss_before, rss_after) {
        (Some(b), Some(a)) if ok > 0 => Some(((a as f64 - b as f64) * 1024.0 / ok as f64).round()),
        _ => None,
    };
    let report = IdleReport {
        mode: "idle",
        protocol: cfg.protocol.name(),
        urls: cfg.targets.iter().map(|t| t.url.clone()).collect(),
        connections: cfg.connections,
        rooms: cfg.rooms,
        sources: cfg.sources,
        connected: ok,
        failures: failures.total(),
        failure_kinds: failures.counts(),
        connect_s: (connect_s * 1000.0).round() / 1000.0,
        hold_s: cfg.hold.as_secs_f64(),
        disconnects: events.disconnects.load(Ordering::Relaxed),
        close_codes: events.close_codes(),
        errors: events.errors(),
        server_pids: cfg.server_pids.clone(),
        server_rss_before_kb: rss_before,
        server_rss_after_kb: rss_after,
        server_rss_end_kb: rss_end,
        rss_per_connection_bytes: per_conn,
        server_cpu_percent_hold: procfs::cpu_delta(&cpu0, &cpu1)
            .server_percent
            .map(|p| (p * 10.0).round() / 10.0),
        generator_rss_kb,
        generator_threads: cfg.threads,
        open_file_limit: fd_limit,
    };
    let kb = |v: Option<u64>| v.map_or_else(|| "n/a".to_string(), |v| v.to_string());
    eprintln!(
        "== idle: {} protocol, {} ==",
        report.protocol,
        report.urls.join(", ")
    );
    eprintln!(
        "  connections: {}/{} connected in {}s, {} failed, {} disconnected during hold {:?}, error frames {:?}",
        report.connected,
        report.connections,
        report.connect_s,
        report.failures,
        report.disconnects,
        report.close_codes,
        report.errors
    );
    for line in failures.describe() {
        eprintln!("  failures: {line}");
    }
    if report.server_pids.is_empty() {
        eprintln!("  server:      no --server-pid given");
    } else {
        eprintln!(
            "  server rss:  before {} kB, after connect {} kB, end of hold {} kB => {} bytes per connection; cpu while idle {}%",
            kb(rss_before),
            kb(rss_after),
            kb(rss_end),
            per_conn.map_or_else(|| "n/a".to_string(), |v| v.to_string()),
            report
                .server_cpu_percent_hold
                .map_or_else(|| "n/a".to_string(), |v| v.to_string())
        );
    }
    eprintln!("  generator:   rss {} kB", kb(generator_rss_kb));
    if !report.server_pids.is_empty() {
        eprintln!("  note: a server's RSS rarely shrinks after connections close; measure against a freshly started server");
    }
    crate::report::emit(&report);
    if ok == 0 && cfg.connections > 0 {
        1
    } else {
        0
    }
}
