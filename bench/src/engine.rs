//! The load engine shared by `fanout` and `ramp`: connects subscribers and
//! publishers, runs measured windows, and collects per-task results.
//!
//! Hot-path rules: a subscriber owns all its counters and histograms; nothing
//! is shared per message except atomic loads of the window bounds. Publishers
//! bump one uncontended atomic per message sent inside a window. Rare events
//! (disconnects, error frames) go to shared maps behind a mutex.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{self, FailureLog, Protocol, Target, Ws};
use crate::payload::{
    self, classify_json, history_fields, instant_at, now_ns, parse_header, FrameBuilder, Header,
    HistoryFields, JsonFrame, Wire,
};
use crate::procfs::{self, CpuDelta, CpuSample};
use crate::stats::{
    Accounting, RoomSeq, SeqCounts, SeqStep, SeqTrack, WinStats, Windows, MAX_WINDOWS,
};

/// Everything needed to set up the load (from the CLI).
#[derive(Debug, Clone)]
pub struct LoadCfg {
    pub targets: Vec<Target>,
    pub protocol: Protocol,
    pub subscribers: usize,
    pub rooms: usize,
    pub publishers: usize,
    pub size: usize,
    pub room_prefix: String,
    pub connect_concurrency: usize,
    pub connect_timeout: Duration,
    pub server_pids: Vec<u32>,
    /// `--redis-pid`: the bus's processes, for their CPU in each window.
    pub redis_pids: Vec<u32>,
    pub sources: usize,
    /// `--check-seq`: the rooms are expected to have history (every `msg`
    /// frame carries a server `seq`); the run fails if none does, or if any
    /// seq is missing, skipped or repeated. Seqs are counted either way.
    pub check_seq: bool,
}

impl LoadCfg {
    pub fn room_name(&self, r: usize) -> String {
        format!("{}{r}", self.room_prefix)
    }

    fn wire(&self) -> Wire {
        match self.protocol {
            Protocol::Json => Wire::Json,
            Protocol::Raw | Protocol::Plain => Wire::Raw,
        }
    }

    /// Source address for connection number `i`, when spreading over sources.
    fn source(&self, i: usize, target: &Target) -> Option<std::net::IpAddr> {
        let v4_loopback =
            matches!(target.addr, Some(std::net::SocketAddr::V4(a)) if a.ip().is_loopback());
        (self.sources > 1 && v4_loopback).then(|| conn::source_addr(i, self.sources))
    }
}

/// Rare events, shared by all tasks.
#[derive(Default)]
pub struct Events {
    pub disconnects: AtomicU64,
    close_codes: Mutex<BTreeMap<String, u64>>,
    errors: Mutex<BTreeMap<String, u64>>,
    /// Text frames whose payload did not parse.
    pub bad_frames: AtomicU64,
    /// Bench messages from a publisher not in the subscriber's room.
    pub foreign_frames: AtomicU64,
    /// Messages of a window that arrived after the window was collected.
    pub late: AtomicU64,
    pub send_errors: AtomicU64,
}

impl Events {
    pub fn disconnect(&self, code: Option<u16>) {
        self.disconnects.fetch_add(1, Ordering::Relaxed);
        let key = code.map_or_else(|| "no_close_frame".to_string(), |c| c.to_string());
        if let Ok(mut m) = self.close_codes.lock() {
            *m.entry(key).or_default() += 1;
        }
    }

    pub fn error_frame(&self, code: String) {
        if let Ok(mut m) = self.errors.lock() {
            *m.entry(code).or_default() += 1;
        }
    }

    pub fn close_codes(&self) -> BTreeMap<String, u64> {
        self.close_codes
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    pub fn errors(&self) -> BTreeMap<String, u64> {
        self.errors.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// Sent-in-window counters of one publisher.
struct PubCounters {
    sent: [AtomicU64; MAX_WINDOWS],
}

#[derive(Debug, Clone, Copy, Default)]
struct SubCmd {
    /// Report every window below this index.
    collect_upto: usize,
    stop: bool,
}

#[derive(Debug, Clone, Copy, Default)]
struct PubCmd {
    /// Messages per second; 0 = paused.
    rate: f64,
    stop: bool,
}

struct SubReport {
    room: usize,
    window: usize,
    stats: WinStats,
    /// The subscriber's server-seq counters since it connected.
    seq_since_connect: SeqCounts,
}

/// The outcome of one measured window.
pub struct WindowResult {
    pub rate: f64,
    pub duration_s: f64,
    pub acc: Accounting,
    pub cpu: CpuDelta,
    /// Redis's CPU in the window (`server_*` fields: the `--redis-pid`s).
    pub redis_cpu: CpuDelta,
    pub server_rss_kb: Option<u64>,
    pub target_sent: u64,
}

/// Waits for the next change of a watch channel, handing the receiver back.
/// Kept pinned across loop iterations so a busy connection does not register
/// a new waiter per message.
async fn next_change<T: Copy + Send + Sync>(
    mut rx: watch::Receiver<T>,
) -> (watch::Receiver<T>, Option<T>) {
    let v = match rx.changed().await {
        Ok(()) => Some(*rx.borrow_and_update()),
        Err(_) => None,
    };
    (rx, v)
}

pub struct Session {
    pub cfg: LoadCfg,
    windows: Arc<Windows>,
    pub events: Arc<Events>,
    pub failures: Arc<FailureLog>,
    sub_cmd: watch::Sender<SubCmd>,
    pub_cmd: watch::Sender<PubCmd>,
    reports: mpsc::UnboundedReceiver<SubReport>,
    pub_counters: Vec<Arc<PubCounters>>,
    pub connected_subscribers: usize,
    pub connected_publishers: usize,
    tasks: Vec<JoinHandle<()>>,
    next_window: usize,
}

impl Session {
    /// Connects all subscribers and publishers (bounded concurrency) and
    /// returns once every attempt finished or failed.
    pub async fn connect(cfg: LoadCfg) -> Session {
        let windows = Arc::new(Windows::default());
        let events = Arc::new(Events::default());
        let failures = Arc::new(FailureLog::default());
        let (sub_cmd, _) = watch::channel(SubCmd::default());
        let (pub_cmd, _) = watch::channel(PubCmd::default());
        let (report_tx, reports) = mpsc::unbounded_channel();
        let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<(bool, bool)>();
        let sem = Arc::new(Semaphore::new(cfg.connect_concurrency.max(1)));
        let cfg_arc = Arc::new(cfg.clone());
        let mut tasks = Vec::with_capacity(cfg.subscribers + cfg.publishers);

        let started = Instant::now();
        for i in 0..cfg.subscribers {
            let sub = Subscriber {
                cfg: cfg_arc.clone(),
                room: i % cfg.rooms,
                windows: windows.clone(),
                events: events.clone(),
                tracks: vec![
                    SeqTrack::default();
                    pubs_in_room(i % cfg.rooms, cfg.rooms, cfg.publishers)
                ],
                wins: Vec::new(),
                reported: 0,
                room_seq: RoomSeq::default(),
                seq_total: SeqCounts::default(),
                unsequenced: 0,
            };
            let target = cfg.targets[node_for(i, cfg.rooms, cfg.targets.len())].clone();
            let source = cfg.source(i, &target);
            let (sem, failures, ready) = (sem.clone(), failures.clone(), ready_tx.clone());
            let (cmd, tx) = (sub_cmd.subscribe(), report_tx.clone());
            tasks.push(tokio::spawn(async move {
                let room = sub.cfg.room_name(sub.room);
                let ws = connect_one(
                    &sem,
                    &target,
                    sub.cfg.protocol,
                    &room,
                    source,
                    sub.cfg.connect_timeout,
                    &failures,
                )
                .await;
                let _ = ready.send((true, ws.is_some()));
                if let Some(ws) = ws {
                    sub.run(ws, cmd, tx).await;
                }
            }));
        }
        let mut pub_counters = Vec::with_capacity(cfg.publishers);
        for p in 0..cfg.publishers {
            let counters = Arc::new(PubCounters {
                sent: std::array::from_fn(|_| AtomicU64::new(0)),
            });
            pub_counters.push(counters.clone());
            let room = cfg.room_name(p % cfg.rooms);
            let target = cfg.targets[node_for(p, cfg.rooms, cfg.targets.len())].clone();
            let source = cfg.source(cfg.subscribers + p, &target);
            let publisher = Publisher {
                idx: p,
                builder: FrameBuilder::new(cfg.wire(), &room, cfg.size),
                cfg: cfg_arc.clone(),
                windows: windows.clone(),
                events: events.clone(),
                counters,
            };
            let (sem, failures, ready) = (sem.clone(), failures.clone(), ready_tx.clone());
            let cmd = pub_cmd.subscribe();
            tasks.push(tokio::spawn(async move {
                let c = &publisher.cfg;
                let ws = connect_one(
                    &sem,
                    &target,
                    c.protocol,
                    &room,
                    source,
                    c.connect_timeout,
                    &failures,
                )
                .await;
                let _ = ready.send((false, ws.is_some()));
                if let Some(ws) = ws {
                    publisher.run(ws, cmd).await;
                }
            }));
        }
        drop(ready_tx);

        let total = cfg.subscribers + cfg.publishers;
        let (mut done, mut subs_ok, mut pubs_ok) = (0usize, 0usize, 0usize);
        let mut last_print = Instant::now();
        while done < total {
            match tokio::time::timeout(Duration::from_secs(2), ready_rx.recv()).await {
                Ok(Some((is_sub, ok))) => {
                    done += 1;
                    match (is_sub, ok) {
                        (true, true) => subs_ok += 1,
                        (false, true) => pubs_ok += 1,
                        _ => {}
                    }
                }
                Ok(None) => break, // every task reported or died
                Err(_) => {}
            }
            if last_print.elapsed() >= Duration::from_secs(2) {
                last_print = Instant::now();
                eprintln!(
                    "  connecting: {done}/{total} done, {} failed ({:.1}s)",
                    done - subs_ok - pubs_ok,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        eprintln!(
            "connected {subs_ok}/{} subscribers, {pubs_ok}/{} publishers in {:.2}s",
            cfg.subscribers,
            cfg.publishers,
            started.elapsed().as_secs_f64()
        );
        for line in failures.describe() {
            eprintln!("  connect failures: {line}");
        }
        Session {
            cfg,
            windows,
            events,
            failures,
            sub_cmd,
            pub_cmd,
            reports,
            pub_counters,
            connected_subscribers: subs_ok,
            connected_publishers: pubs_ok,
            tasks,
            next_window: 0,
        }
    }

    /// Sets the per-publisher rate (0 pauses).
    fn set_rate(&self, rate: f64) {
        self.pub_cmd.send_replace(PubCmd { rate, stop: false });
    }

    /// Publishes at `rate` for `settle`, then measures a `duration` window,
    /// pauses publishers for `drain`, and collects the window.
    pub async fn measure(
        &mut self,
        rate: f64,
        settle: Duration,
        duration: Duration,
        drain: Duration,
    ) -> WindowResult {
        let k = self.next_window;
        assert!(k < MAX_WINDOWS, "too many windows");
        self.next_window += 1;

        self.set_rate(rate);
        tokio::time::sleep(settle).await;

        // Open the window slightly in the future so every task sees its
        // bounds before any message can fall into it.
        let start = now_ns() + 20_000_000;
        let dur_ns = u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX);
        let end = start.saturating_add(dur_ns);
        self.windows.open(k, start, end);
        tokio::time::sleep_until(instant_at(start).into()).await;
        let cpu0 = CpuSample::take(&self.cfg.server_pids);
        let redis0 = CpuSample::take(&self.cfg.redis_pids);
        tokio::time::sleep_until(instant_at(end).into()).await;
        let cpu1 = CpuSample::take(&self.cfg.server_pids);
        let redis1 = CpuSample::take(&self.cfg.redis_pids);
        let server_rss_kb = procfs::total_rss_kb(&self.cfg.server_pids);

        self.set_rate(0.0);
        tokio::time::sleep(drain).await;

        // Sent per room in this window.
        let mut sent_per_room = vec![0u64; self.cfg.rooms];
        for (p, c) in self.pub_counters.iter().enumerate() {
            sent_per_room[p % self.cfg.rooms] += c.sent[k].load(Ordering::Relaxed);
        }

        // Ask every subscriber for window k and merge the answers.
        self.sub_cmd.send_replace(SubCmd {
            collect_upto: k + 1,
            stop: false,
        });
        let mut acc = Accounting::new(&sent_per_room);
        let mut got = 0usize;
        let deadline = tokio::time::Instant::now()
            + Duration::from_secs(10 + self.connected_subscribers as u64 / 1000);
        while got < self.connected_subscribers {
            match tokio::time::timeout_at(deadline, self.reports.recv()).await {
                Ok(Some(r)) if r.window == k => {
                    got += 1;
                    acc.add_subscriber(sent_per_room[r.room], r.stats);
                    acc.seq_since_connect.merge(&r.seq_since_connect);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        acc.unreported_subscribers = (self.connected_subscribers - got) as u64;

        WindowResult {
            rate,
            duration_s: duration.as_secs_f64(),
            acc,
            cpu: procfs::cpu_delta(&cpu0, &cpu1),
            redis_cpu: procfs::cpu_delta(&redis0, &redis1),
            server_rss_kb,
            target_sent: (rate * duration.as_secs_f64() * self.connected_publishers as f64).round()
                as u64,
        }
    }

    /// Stops every task (closing connections politely) and waits a bounded time.
    pub async fn shutdown(self) {
        self.pub_cmd.send_replace(PubCmd {
            rate: 0.0,
            stop: true,
        });
        self.sub_cmd.send_replace(SubCmd {
            collect_upto: self.next_window,
            stop: true,
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for t in self.tasks {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// Which gateway URL connection `i` (in room `i % rooms`) goes to. Plain
/// `i % nodes` would put a whole room on one node whenever `rooms` is a
/// multiple of `nodes`, so nothing would cross between nodes; shifting by
/// `i / rooms` (the connection's place within its room) spreads every room's
/// subscribers, and the publishers, evenly over all nodes.
fn node_for(i: usize, rooms: usize, nodes: usize) -> usize {
    (i / rooms + i % rooms) % nodes
}

fn pubs_in_room(room: usize, rooms: usize, publishers: usize) -> usize {
    if room >= publishers {
        0
    } else {
        (publishers - room).div_ceil(rooms)
    }
}

async fn connect_one(
    sem: &Semaphore,
    target: &Target,
    protocol: Protocol,
    room: &str,
    source: Option<std::net::IpAddr>,
    timeout: Duration,
    failures: &FailureLog,
) -> Option<Ws> {
    let _permit = sem.acquire().await.ok()?;
    match conn::connect(
        target,
        protocol,
        room,
        source,
        timeout,
        conn::BUSY_READ_BUFFER,
    )
    .await
    {
        Ok(ws) => Some(ws),
        Err(e) => {
            failures.add(&e);
            None
        }
    }
}

/// Closes a connection politely without waiting long.
pub async fn close_quietly(ws: &mut Ws) {
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
}

/// What a connection's read loop saw.
pub enum ReadEvent {
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    Ignore,
    /// The connection is gone (close code if the server sent one).
    Gone(Option<u16>),
}

/// Turns one stream item into a `ReadEvent`, keeping track of a close code
/// announced before the stream ends.
pub fn read_event(
    item: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    close_code: &mut Option<u16>,
) -> ReadEvent {
    match item {
        Some(Ok(Message::Text(t))) => ReadEvent::Text(t),
        Some(Ok(Message::Close(f))) => {
            *close_code = Some(f.map_or(1005, |f| u16::from(f.code)));
            ReadEvent::Ignore // tungstenite replies; the stream ends next
        }
        Some(Ok(_)) => ReadEvent::Ignore,
        Some(Err(_)) | None => ReadEvent::Gone(*close_code),
    }
}

struct Subscriber {
    cfg: Arc<LoadCfg>,
    room: usize,
    windows: Arc<Windows>,
    events: Arc<Events>,
    /// Indexed by publisher / rooms (publishers of this room only).
    tracks: Vec<SeqTrack>,
    /// Indexed by window.
    wins: Vec<WinStats>,
    /// Windows below this index were already reported.
    reported: usize,
    /// The server seq of the one room this connection is in (history rooms).
    room_seq: RoomSeq,
    /// Server-seq counters since connect, windows or not.
    seq_total: SeqCounts,
    /// `msg` frames without a seq before the first with one.
    unsequenced: u32,
}

/// Without `--check-seq`, a connection whose first this many `msg` frames
/// carry no seq is in a room without history (a room has history or not for
/// the server's life), and stops looking: rooms without history then pay
/// nothing for the check.
const NO_HISTORY_AFTER: u32 = 16;

impl Subscriber {
    async fn run(
        mut self,
        mut ws: Ws,
        cmd: watch::Receiver<SubCmd>,
        tx: mpsc::UnboundedSender<SubReport>,
    ) {
        let mut cmd_fut = Box::pin(next_change(cmd));
        let mut alive = true;
        let mut close_code = None;
        loop {
            let c = if alive {
                tokio::select! {
                    biased;
                    item = ws.next() => {
                        match read_event(item, &mut close_code) {
                            ReadEvent::Text(t) => self.on_text(t.as_str()),
                            ReadEvent::Ignore => {}
                            ReadEvent::Gone(code) => {
                                alive = false;
                                self.events.disconnect(code);
                            }
                        }
                        continue;
                    }
                    c = &mut cmd_fut => c,
                }
            } else {
                (&mut cmd_fut).await
            };
            let (rx, v) = c;
            let cmd = v.unwrap_or(SubCmd {
                collect_upto: self.wins.len(),
                stop: true,
            });
            self.report_upto(cmd.collect_upto, &tx);
            if cmd.stop {
                if alive {
                    close_quietly(&mut ws).await;
                }
                return;
            }
            cmd_fut = Box::pin(next_change(rx));
        }
    }

    fn report_upto(&mut self, upto: usize, tx: &mpsc::UnboundedSender<SubReport>) {
        while self.reported < upto {
            let k = self.reported;
            let stats = self.wins.get_mut(k).map(std::mem::take).unwrap_or_default();
            let _ = tx.send(SubReport {
                room: self.room,
                window: k,
                stats,
                seq_since_connect: self.seq_total,
            });
            self.reported += 1;
        }
    }

    /// The server seq of a JSON `msg` frame (history rooms), checked against
    /// the last one; counted since connect here, per window by the caller.
    /// `data` is the frame from the payload's first byte on: the payload is
    /// exactly `size` bytes we wrote, so the key search skips it.
    #[inline]
    fn check_seq(&mut self, text: &str, data: &[u8]) -> Option<SeqStep> {
        if self.unsequenced >= NO_HISTORY_AFTER && !self.cfg.check_seq {
            return None;
        }
        let start = text.len() - data.len();
        let end = start + self.cfg.size;
        let skip = if text.as_bytes().get(end) == Some(&b'"') {
            start..end
        } else {
            start..start // not our payload as we sent it: search it all
        };
        match history_fields(text, skip) {
            HistoryFields::Seq { seq, epoch } => {
                let step = self.room_seq.observe(seq, epoch);
                self.seq_total.add_step(step);
                Some(step)
            }
            HistoryFields::None if self.room_seq.seen() => {
                self.seq_total.add_step(SeqStep::Missing);
                Some(SeqStep::Missing)
            }
            HistoryFields::None => {
                self.unsequenced += 1;
                None
            }
            HistoryFields::Bad => {
                self.events.bad_frames.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    #[inline]
    fn on_text(&mut self, text: &str) {
        let now = now_ns();
        let (data, seq) = match self.cfg.protocol {
            Protocol::Json => match classify_json(text) {
                JsonFrame::Msg(d) => (d, self.check_seq(text, d)),
                JsonFrame::Welcome | JsonFrame::Other => return,
                JsonFrame::Error(code) => return self.events.error_frame(code),
            },
            Protocol::Raw | Protocol::Plain => (text.as_bytes(), None),
        };
        let Some(h) = parse_header(data) else {
            self.events.bad_frames.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let p = h.publisher as usize;
        if p >= self.cfg.publishers || p % self.cfg.rooms != self.room {
            self.events.foreign_frames.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let obs = self.tracks[p / self.cfg.rooms].observe(h.seq);
        if let Some(k) = self.windows.classify(h.send_ns) {
            if k < self.reported {
                self.events.late.fetch_add(1, Ordering::Relaxed);
                return;
            }
            if self.wins.len() <= k {
                self.wins.resize_with(k + 1, WinStats::default);
            }
            let w = &mut self.wins[k];
            w.record(obs, now.saturating_sub(h.send_ns) / 1000);
            if let Some(step) = seq {
                w.seq.add_step(step);
            }
        }
    }
}

struct Publisher {
    idx: usize,
    builder: FrameBuilder,
    cfg: Arc<LoadCfg>,
    windows: Arc<Windows>,
    events: Arc<Events>,
    counters: Arc<PubCounters>,
}

/// Far enough in the future to mean "not scheduled".
fn never() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(86_400)
}

impl Publisher {
    async fn run(self, mut ws: Ws, cmd: watch::Receiver<PubCmd>) {
        let mut cmd_fut = Box::pin(next_change(cmd));
        let tick = tokio::time::sleep_until(never());
        tokio::pin!(tick);
        let mut period: Option<Duration> = None;
        let mut next = tokio::time::Instant::now();
        let mut seq: u64 = 0;
        let mut alive = true;
        let mut close_code = None;
        // Only matters for logging: how far the sender fell behind its schedule.
        let max_lag = Duration::from_millis(100);
        loop {
            if !alive {
                let (rx, v) = (&mut cmd_fut).await;
                if v.is_none_or(|c| c.stop) {
                    return;
                }
                cmd_fut = Box::pin(next_change(rx));
                continue;
            }
            tokio::select! {
                biased;
                () = &mut tick, if period.is_some() => {
                    let Some(per) = period else { continue };
                    let send_ns = now_ns();
                    let text = self.builder.build(Header {
                        publisher: self.idx as u32,
                        seq,
                        send_ns,
                    });
                    seq += 1;
                    match ws.send(Message::Text(text.into())).await {
                        Ok(()) => {
                            if let Some(k) = self.windows.classify(send_ns) {
                                self.counters.sent[k].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            self.events.send_errors.fetch_add(1, Ordering::Relaxed);
                            self.events.disconnect(close_code);
                            alive = false;
                            continue;
                        }
                    }
                    next += per;
                    let now = tokio::time::Instant::now();
                    if next + max_lag < now {
                        // Fell behind (generator or socket saturated): drop
                        // the backlog rather than bursting.
                        next = now;
                    }
                    tick.as_mut().reset(next);
                }
                item = ws.next() => {
                    match read_event(item, &mut close_code) {
                        ReadEvent::Text(t) => {
                            if self.cfg.protocol == Protocol::Json && !payload::is_json_msg(t.as_str()) {
                                if let JsonFrame::Error(code) = classify_json(t.as_str()) {
                                    self.events.error_frame(code);
                                }
                            }
                        }
                        ReadEvent::Ignore => {}
                        ReadEvent::Gone(code) => {
                            alive = false;
                            self.events.disconnect(code);
                        }
                    }
                }
                (rx, v) = &mut cmd_fut => {
                    let Some(c) = v.filter(|c| !c.stop) else {
                        close_quietly(&mut ws).await;
                        return;
                    };
                    if c.rate > 0.0 {
                        let per = Duration::from_secs_f64(1.0 / c.rate);
                        // Stagger publishers across one period.
                        let phase = per.mul_f64(self.idx as f64 / self.cfg.publishers.max(1) as f64);
                        next = tokio::time::Instant::now() + phase;
                        period = Some(per);
                        tick.as_mut().reset(next);
                    } else {
                        period = None;
                        tick.as_mut().reset(never());
                    }
                    cmd_fut = Box::pin(next_change(rx));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_room_spans_every_node() {
        for (rooms, nodes) in [(20usize, 2usize), (4, 2), (1, 2), (5, 2), (6, 3), (20, 4)] {
            let subs = rooms * nodes * 3;
            for room in 0..rooms {
                let mut per_node = vec![0; nodes];
                for i in (room..subs).step_by(rooms) {
                    per_node[node_for(i, rooms, nodes)] += 1;
                }
                assert!(
                    per_node.iter().all(|&n| n == 3),
                    "rooms={rooms} nodes={nodes} room={room}: {per_node:?}"
                );
            }
            // Publishers (one per room here) are spread over the nodes too.
            let mut pubs = vec![0; nodes];
            for p in 0..rooms.max(nodes) {
                pubs[node_for(p, rooms, nodes)] += 1;
            }
            assert!(
                pubs.iter().all(|&n| n > 0),
                "rooms={rooms} nodes={nodes}: {pubs:?}"
            );
        }
    }

    #[test]
    fn publishers_per_room() {
        // 20 publishers over 20 rooms: one each.
        assert!((0..20).all(|r| pubs_in_room(r, 20, 20) == 1));
        // 5 publishers over 2 rooms: room 0 gets 0,2,4; room 1 gets 1,3.
        assert_eq!(pubs_in_room(0, 2, 5), 3);
        assert_eq!(pubs_in_room(1, 2, 5), 2);
        // More rooms than publishers.
        assert_eq!(pubs_in_room(3, 8, 4), 1);
        assert_eq!(pubs_in_room(4, 8, 4), 0);
        // The local index p / rooms stays inside the room's track vector.
        for (rooms, pubs) in [(2usize, 5usize), (3, 10), (7, 7), (8, 4)] {
            for p in 0..pubs {
                assert!(p / rooms < pubs_in_room(p % rooms, rooms, pubs));
            }
        }
    }

    fn test_subscriber(size: usize, check_seq: bool) -> Subscriber {
        let cfg = LoadCfg {
            targets: Vec::new(),
            protocol: Protocol::Json,
            subscribers: 1,
            rooms: 1,
            publishers: 1,
            size,
            room_prefix: "h.".into(),
            connect_concurrency: 1,
            connect_timeout: Duration::from_secs(1),
            server_pids: Vec::new(),
            redis_pids: Vec::new(),
            sources: 1,
            check_seq,
        };
        let windows = Arc::new(Windows::default());
        // Window 0: messages sent at [1000, 2000) ns on the process clock.
        windows.open(0, 1000, 2000);
        Subscriber {
            cfg: Arc::new(cfg),
            room: 0,
            windows,
            events: Arc::new(Events::default()),
            tracks: vec![SeqTrack::default(); 1],
            wins: Vec::new(),
            reported: 0,
            room_seq: RoomSeq::default(),
            seq_total: SeqCounts::default(),
            unsequenced: 0,
        }
    }

    /// The `msg` frame roomcast sends for publisher 0's message number `n`
    /// (sent at `send_ns`), with `extra` fields (history: seq, epoch) after data.
    fn server_msg(size: usize, n: u64, send_ns: u64, extra: &str) -> String {
        let send = FrameBuilder::new(Wire::Json, "h.0", size).build(Header {
            publisher: 0,
            seq: n,
            send_ns,
        });
        let v: serde_json::Value = serde_json::from_str(&send).unwrap();
        let data = v["data"].as_str().unwrap();
        format!(
            r#"{{"op":"msg","room":"h.0","event":"bench","from":"n1-2","ts":1764770000000,"data":"{data}"{extra}}}"#
        )
    }

    fn bench_data(msg: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(msg).unwrap();
        v["data"].as_str().unwrap().to_string()
    }

    #[test]
    fn subscriber_counts_server_seqs() {
        for check_seq in [true, false] {
            subscriber_counts_server_seqs_with(check_seq);
        }
    }

    fn subscriber_counts_server_seqs_with(check_seq: bool) {
        let size = 100;
        let mut sub = test_subscriber(size, check_seq);
        // (bench message number, send time, the server's history fields)
        let frames: &[(u64, u64, &str)] = &[
            (0, 500, r#","seq":41,"epoch":"E1""#), // warm-up: since connect only
            (1, 1000, r#","seq":42,"epoch":"E1""#),
            (2, 1001, r#","seq":43,"epoch":"E1""#),
            (3, 1002, r#","seq":46,"epoch":"E1""#), // 44 and 45 never came
            (4, 1003, r#","seq":46,"epoch":"E1""#), // 46 again
            (5, 1004, r#","seq":1,"epoch":"E2""#),  // history lost: starts over
            (6, 1005, ""),                          // no seq in a history room
            (7, 1006, r#","seq":2,"epoch":"E2""#),
            (8, 5000, r#","seq":4,"epoch":"E2""#), // drain: since connect only
        ];
        for &(n, t, extra) in frames {
            sub.on_text(&server_msg(size, n, t, extra));
        }
        // Key order does not matter.
        sub.on_text(&format!(
            r#"{{"seq":5,"epoch":"E2","op":"msg","room":"h.0","from":"x","data":"{}"}}"#,
            bench_data(&server_msg(size, 9, 1007, ""))
        ));
        let w = &sub.wins[0].seq;
        assert_eq!(
            *w,
            SeqCounts {
                frames: 7,
                gaps: 2,
                duplicates: 1,
                epoch_changes: 1,
                missing: 1,
            },
            "window"
        );
        assert_eq!(
            sub.seq_total,
            SeqCounts {
                frames: 9,
                gaps: 3,
                duplicates: 1,
                epoch_changes: 1,
                missing: 1,
            },
            "since connect"
        );
        // The bench's own accounting is unaffected: 8 distinct messages in the window.
        assert_eq!(sub.wins[0].received, 8);
        assert_eq!(sub.events.bad_frames.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn subscriber_without_history_counts_nothing() {
        let size = 40;
        let mut sub = test_subscriber(size, true);
        for n in 0..5 {
            sub.on_text(&server_msg(size, n, 1000 + n, ""));
        }
        assert_eq!(sub.seq_total, SeqCounts::default());
        assert_eq!(sub.wins[0].seq, SeqCounts::default());
        assert_eq!(sub.wins[0].received, 5);
        // A seq that is not a number is a bad frame, not a seq.
        sub.on_text(&server_msg(size, 5, 1005, r#","seq":"x""#));
        assert_eq!(sub.events.bad_frames.load(Ordering::Relaxed), 1);
        assert_eq!(sub.seq_total, SeqCounts::default());
        assert_eq!(sub.wins[0].received, 6);
    }

    #[test]
    fn without_check_seq_a_room_without_history_stops_looking() {
        let size = 40;
        for check_seq in [false, true] {
            let mut sub = test_subscriber(size, check_seq);
            for n in 0..u64::from(NO_HISTORY_AFTER) {
                sub.on_text(&server_msg(size, n, 1000 + n, ""));
            }
            // A seq after that many frames without one: only --check-seq still looks.
            sub.on_text(&server_msg(size, 99, 1099, r#","seq":1,"epoch":"E""#));
            assert_eq!(
                sub.seq_total.frames,
                u64::from(check_seq),
                "check_seq {check_seq}"
            );
        }
        // One seq early on keeps the connection looking (and missing seqs count).
        let mut sub = test_subscriber(size, false);
        sub.on_text(&server_msg(size, 0, 1000, r#","seq":1,"epoch":"E""#));
        for n in 1..=u64::from(NO_HISTORY_AFTER) {
            sub.on_text(&server_msg(size, n, 1000 + n, ""));
        }
        sub.on_text(&server_msg(size, 50, 1050, r#","seq":30,"epoch":"E""#));
        assert_eq!(
            sub.seq_total,
            SeqCounts {
                frames: 2,
                gaps: 28,
                missing: u64::from(NO_HISTORY_AFTER),
                ..Default::default()
            }
        );
    }

    /// What the seq check costs on the receive path, per frame. Not a
    /// correctness test; run it in release:
    /// `cargo test --release -p roomcast-bench -- --ignored --nocapture seq_check_cost`
    /// Every case is timed once per round, rounds interleaved, best of 9
    /// (a shared machine's noise only ever adds time).
    #[test]
    #[ignore]
    fn seq_check_cost() {
        use std::hint::black_box;
        let size = 100;
        let n = 1_000_000usize;
        let frames = |hist: bool| -> Vec<(String, std::ops::Range<usize>)> {
            (0..1000u64)
                .map(|i| {
                    let extra = if hist {
                        format!(r#","seq":{},"epoch":"1764770000123456""#, 1000 + i)
                    } else {
                        String::new()
                    };
                    let f = server_msg(size, i, 1500, &extra);
                    let at = f.find("\"data\":\"").unwrap() + 8;
                    (f, at..at + size)
                })
                .collect()
        };
        let (plain, hist) = (frames(false), frames(true));
        let time = |f: &mut dyn FnMut(usize)| {
            let t = Instant::now();
            for i in 0..n {
                f(i % 1000);
            }
            t.elapsed().as_nanos() as f64 / n as f64
        };
        // Subscribers for the whole receive path (classify, header, publisher
        // seq track, window, latency histogram, server-seq check).
        let mut latched = test_subscriber(size, false); // stops looking after 16 frames
        let mut looking = test_subscriber(size, true); // searches every frame
        let mut hist_sub = test_subscriber(size, true);
        let names = [
            "history_fields, frame without a seq",
            "history_fields, frame with a seq",
            "classify_json + parse_header (for scale)",
            "the same with payload::find, the first-byte scan classify_json used before",
            "on_text, no history, stopped looking (= no check)",
            "on_text, no history, --check-seq (searches every frame)",
            "on_text, history frame, --check-seq",
        ];
        let mut best = [f64::MAX; 7];
        for _ in 0..9 {
            let t = [
                time(&mut |i| {
                    let (f, skip) = &plain[i];
                    black_box(history_fields(black_box(f), skip.clone()));
                }),
                time(&mut |i| {
                    let (f, skip) = &hist[i];
                    black_box(history_fields(black_box(f), skip.clone()));
                }),
                time(&mut |i| {
                    if let JsonFrame::Msg(d) = classify_json(black_box(&plain[i].0)) {
                        black_box(parse_header(d));
                    }
                }),
                time(&mut |i| {
                    let b = black_box(&plain[i].0).as_bytes();
                    if b.starts_with(b"{\"op\":\"msg\"") {
                        if let Some(at) = payload::find(b, b"\"data\":\"") {
                            black_box(parse_header(&b[at + 8..]));
                        }
                    }
                }),
                time(&mut |i| latched.on_text(black_box(&plain[i].0))),
                time(&mut |i| looking.on_text(black_box(&plain[i].0))),
                time(&mut |i| hist_sub.on_text(black_box(&hist[i].0))),
            ];
            for (b, t) in best.iter_mut().zip(t) {
                *b = b.min(t);
            }
        }
        assert!(latched.unsequenced >= NO_HISTORY_AFTER && hist_sub.seq_total.frames > 0);
        for (name, ns) in names.iter().zip(best) {
            eprintln!("{ns:7.1} ns/frame  {name}");
        }
    }

    /// A stand-in for roomcast with history on, on loopback: a welcome, then
    /// every `send` comes back to every connection as a `msg` with the next
    /// seq, except that seq `skip` is never used (0: none skipped).
    async fn fake_history_server(skip: u64) -> std::net::SocketAddr {
        use std::sync::atomic::AtomicU64;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, _) = tokio::sync::broadcast::channel::<String>(4096);
        let seq = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (tx, seq) = (tx.clone(), seq.clone());
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    let welcome = r#"{"op":"welcome","conn":"c1","node":"n1"}"#;
                    if ws.send(Message::Text(welcome.into())).await.is_err() {
                        return;
                    }
                    let mut rx = tx.subscribe();
                    loop {
                        tokio::select! {
                            m = rx.recv() => match m {
                                Ok(t) => if ws.send(Message::Text(t.into())).await.is_err() { return },
                                Err(_) => return,
                            },
                            item = ws.next() => match item {
                                Some(Ok(Message::Text(t))) => {
                                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
                                    let mut n = seq.fetch_add(1, Ordering::SeqCst) + 1;
                                    if n == skip {
                                        n = seq.fetch_add(1, Ordering::SeqCst) + 1;
                                    }
                                    let _ = tx.send(format!(
                                        r#"{{"op":"msg","room":{},"event":"bench","from":"c1","ts":1,"data":{},"seq":{n},"epoch":"E1"}}"#,
                                        v["room"], v["data"]
                                    ));
                                }
                                Some(Ok(_)) => {}
                                _ => return,
                            },
                        }
                    }
                });
            }
        });
        addr
    }

    /// The whole path, subscriber to report, against [`fake_history_server`]:
    /// 3 subscribers and 1 publisher at 50 msg/s for under a second.
    async fn run_against_fake(skip: u64) -> crate::report::RunReport {
        let addr = fake_history_server(skip).await;
        let cfg = LoadCfg {
            targets: vec![Target::parse(&format!("ws://{addr}")).unwrap()],
            protocol: Protocol::Json,
            subscribers: 3,
            rooms: 1,
            publishers: 1,
            size: 64,
            room_prefix: "h.".into(),
            connect_concurrency: 4,
            connect_timeout: Duration::from_secs(5),
            server_pids: Vec::new(),
            redis_pids: Vec::new(),
            sources: 1,
            check_seq: true,
        };
        let mut s = Session::connect(cfg).await;
        assert_eq!((s.connected_subscribers, s.connected_publishers), (3, 1));
        let ms = Duration::from_millis;
        let w = s.measure(50.0, ms(300), ms(500), ms(300)).await;
        let meta = crate::report::RunMeta {
            mode: "fanout",
            step: None,
            warmup_s: 0.3,
            drain_s: 0.3,
            threads: 2,
        };
        let r = crate::report::RunReport::build(&s, w, &meta);
        s.shutdown().await;
        r
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn seqs_reach_the_report() {
        let r = run_against_fake(0).await;
        assert!(r.received > 0 && r.lost == 0, "{r:?}");
        // Every message of the window carried a seq, in order.
        assert_eq!(r.seq_frames, r.received, "{r:?}");
        assert_eq!(
            (r.seq_gaps, r.seq_duplicates, r.epoch_changes, r.seq_missing),
            (0, 0, 0, 0)
        );
        assert!(r.seq_since_connect.frames > r.seq_frames);
        assert!(!r.seq_since_connect.broken());
        assert_eq!(r.seq_check_failure(), None);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["seq_gaps"], 0);
        assert_eq!(
            json["seq_since_connect"]["frames"],
            r.seq_since_connect.frames
        );

        // Seq 5 is skipped (in the warm-up): each of the 3 subscribers misses it.
        let r = run_against_fake(5).await;
        assert_eq!(r.seq_since_connect.gaps, 3, "{r:?}");
        assert_eq!(r.seq_gaps, 0, "the gap was before the window: {r:?}");
        assert_eq!(r.lost, 0, "a skipped seq is not a lost bench message");
        let why = r.seq_check_failure().unwrap();
        assert!(why.contains("3 skipped"), "{why}");
    }

    #[test]
    fn events_maps() {
        let e = Events::default();
        e.disconnect(Some(1008));
        e.disconnect(None);
        e.disconnect(Some(1008));
        e.error_frame("rate_limited".into());
        assert_eq!(e.disconnects.load(Ordering::Relaxed), 3);
        assert_eq!(e.close_codes().get("1008"), Some(&2));
        assert_eq!(e.close_codes().get("no_close_frame"), Some(&1));
        assert_eq!(e.errors().get("rate_limited"), Some(&1));
    }
}
