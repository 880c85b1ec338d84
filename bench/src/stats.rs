//! Measurement bookkeeping: measured windows, per-subscriber sequence tracking
//! (duplicates / reordering), per-window counters and latency histograms, and
//! the end-of-window accounting (expected / lost).
//!
//! Everything here is owned by one task while the run goes on; the controller
//! merges per-task results when a window is collected. Nothing is shared per
//! message except the window bounds, which are read with plain atomic loads.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Most measured windows a run can have (fanout uses 1, ramp one per step).
pub const MAX_WINDOWS: usize = 64;

/// Measured windows on the process clock (`payload::now_ns`). A message
/// belongs to window `k` if its *send time* lies in `[start_k, end_k)`.
/// Windows are opened in time order and never overlap.
pub struct Windows {
    count: AtomicUsize,
    start: [AtomicU64; MAX_WINDOWS],
    end: [AtomicU64; MAX_WINDOWS],
}

impl Default for Windows {
    fn default() -> Self {
        Windows {
            count: AtomicUsize::new(0),
            start: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
            end: std::array::from_fn(|_| AtomicU64::new(u64::MAX)),
        }
    }
}

impl Windows {
    /// Opens window `k` (must be the next one) spanning `[start, end)`.
    /// Callers pick `start` a little in the future so every task sees the
    /// bounds before any message could fall inside them.
    pub fn open(&self, k: usize, start: u64, end: u64) {
        assert!(k < MAX_WINDOWS && k == self.count.load(Ordering::Acquire));
        self.start[k].store(start, Ordering::Relaxed);
        self.end[k].store(end, Ordering::Relaxed);
        self.count.store(k + 1, Ordering::Release);
    }

    /// The window that a message sent at `t` belongs to, if any.
    #[inline]
    pub fn classify(&self, t: u64) -> Option<usize> {
        let n = self.count.load(Ordering::Acquire);
        for k in (0..n).rev() {
            if t >= self.start[k].load(Ordering::Relaxed) {
                return (t < self.end[k].load(Ordering::Relaxed)).then_some(k);
            }
        }
        None
    }
}

/// What a received sequence number turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqObs {
    /// Higher than anything seen before from this publisher.
    New,
    /// Lower than the highest seen, not seen before: counted as received.
    Reordered,
    /// Seen before: not counted as received.
    Duplicate,
}

/// Tracks one publisher's sequence numbers as seen by one subscriber.
/// Remembers the last 128 sequence numbers exactly; anything older that shows
/// up is classified as reordered (it cannot be told apart from a duplicate).
#[derive(Debug, Clone, Copy, Default)]
pub struct SeqTrack {
    /// Highest seq seen + 1; 0 means nothing seen yet.
    next: u64,
    /// Bit `i` set = seq `next - 1 - i` was seen.
    mask: u128,
}

impl SeqTrack {
    #[inline]
    pub fn observe(&mut self, seq: u64) -> SeqObs {
        if self.next == 0 || seq >= self.next {
            let shift = if self.next == 0 {
                128
            } else {
                seq + 1 - self.next
            };
            self.mask = if shift >= 128 { 0 } else { self.mask << shift };
            self.mask |= 1;
            self.next = seq.saturating_add(1);
            return SeqObs::New;
        }
        let d = self.next - 1 - seq;
        if d >= 128 {
            return SeqObs::Reordered;
        }
        let bit = 1u128 << d;
        if self.mask & bit != 0 {
            SeqObs::Duplicate
        } else {
            self.mask |= bit;
            SeqObs::Reordered
        }
    }
}

/// What one `msg` frame's server `seq` (history rooms) was, compared with the
/// last one the same connection saw in the same room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStep {
    /// The first seq seen (any value: a subscriber joins mid-stream).
    First,
    /// Exactly the last seq + 1.
    Next,
    /// Higher than last + 1: this many sequence numbers never arrived.
    Gap(u64),
    /// Not higher than the last one, in the same epoch.
    Duplicate,
    /// Another epoch than the last frame's: the room's history was lost and
    /// its seqs started over. Not a gap nor a duplicate, whatever the seq.
    EpochChange,
    /// A `msg` frame without a seq on a connection that had seen one (never
    /// returned by [`RoomSeq::observe`]; the caller notices the absence).
    Missing,
}

/// The last server seq and epoch one connection saw in one room. The bench
/// joins one room per connection, so every subscriber has exactly one.
/// Touched only for frames that carry a `"seq"`; rooms without history cost
/// nothing here.
#[derive(Debug, Clone, Default)]
pub struct RoomSeq {
    /// Highest seq seen in the current epoch; None before the first.
    last: Option<u64>,
    /// The current epoch as the server wrote it (empty if frames have none).
    epoch: Vec<u8>,
}

impl RoomSeq {
    #[inline]
    pub fn observe(&mut self, seq: u64, epoch: &[u8]) -> SeqStep {
        let Some(last) = self.last else {
            self.last = Some(seq);
            self.epoch.clear();
            self.epoch.extend_from_slice(epoch);
            return SeqStep::First;
        };
        if epoch != self.epoch.as_slice() {
            // Rare: the only allocation, once per epoch change.
            self.epoch.clear();
            self.epoch.extend_from_slice(epoch);
            self.last = Some(seq);
            return SeqStep::EpochChange;
        }
        if seq <= last {
            return SeqStep::Duplicate;
        }
        self.last = Some(seq);
        match seq - last - 1 {
            0 => SeqStep::Next,
            missing => SeqStep::Gap(missing),
        }
    }

    /// True once any frame with a seq was seen.
    pub fn seen(&self) -> bool {
        self.last.is_some()
    }
}

/// Server-seq counters (history rooms): per window, or since connect.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SeqCounts {
    /// `msg` frames that carried a seq.
    pub frames: u64,
    /// Sequence numbers skipped (the sum of every jump's missing messages).
    pub gaps: u64,
    /// Frames whose seq was not above the last one in the same epoch.
    pub duplicates: u64,
    pub epoch_changes: u64,
    /// `msg` frames without a seq on a connection that had seen one.
    pub missing: u64,
}

impl SeqCounts {
    #[inline]
    pub fn add_step(&mut self, s: SeqStep) {
        match s {
            SeqStep::Missing => {
                self.missing += 1;
                return;
            }
            SeqStep::First | SeqStep::Next => {}
            SeqStep::Gap(n) => self.gaps += n,
            SeqStep::Duplicate => self.duplicates += 1,
            SeqStep::EpochChange => self.epoch_changes += 1,
        }
        self.frames += 1;
    }

    pub fn merge(&mut self, o: &SeqCounts) {
        self.frames += o.frames;
        self.gaps += o.gaps;
        self.duplicates += o.duplicates;
        self.epoch_changes += o.epoch_changes;
        self.missing += o.missing;
    }

    /// Gaps, duplicates or frames without a seq: messages went missing or
    /// came twice in a history room. (Epoch changes are not counted here.)
    pub fn broken(&self) -> bool {
        self.gaps > 0 || self.duplicates > 0 || self.missing > 0
    }
}

/// Counters for one subscriber in one measured window.
#[derive(Debug, Default)]
pub struct WinStats {
    /// Distinct messages received (new + reordered).
    pub received: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Server seqs of the window's messages (history rooms only).
    pub seq: SeqCounts,
    /// Latency in microseconds; created on first sample (auto-resizing).
    pub hist: Option<Histogram<u64>>,
}

impl WinStats {
    #[inline]
    pub fn record(&mut self, obs: SeqObs, latency_us: u64) {
        match obs {
            SeqObs::Duplicate => {
                self.duplicates += 1;
                return;
            }
            SeqObs::Reordered => self.reordered += 1,
            SeqObs::New => {}
        }
        self.received += 1;
        let h = self.hist.get_or_insert_with(new_histogram);
        // `record` auto-resizes; `saturating_record` would clamp to the
        // initial (tiny) range instead.
        if h.record(latency_us.max(1)).is_err() {
            h.saturating_record(latency_us.max(1));
        }
    }
}

/// Latency histogram in µs, 2 significant digits (1% resolution), auto-resizing
/// so an idle subscriber costs almost nothing.
pub fn new_histogram() -> Histogram<u64> {
    match Histogram::new(2) {
        Ok(h) => h,
        // 2 significant figures is always a valid configuration.
        Err(_) => unreachable!("hdrhistogram rejected sigfig 2"),
    }
}

/// Totals for one window across all subscribers, plus the merged histogram.
#[derive(Debug, Default)]
pub struct Accounting {
    pub sent: u64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub reordered: u64,
    /// Subscribers that did not report for this window (task gone/stuck).
    pub unreported_subscribers: u64,
    pub hist: Option<Histogram<u64>>,
    /// Server seqs of the window's messages, all subscribers.
    pub seq: SeqCounts,
    /// Server seqs since the subscribers connected (warm-up, every window
    /// so far, drains), all subscribers that reported.
    pub seq_since_connect: SeqCounts,
}

impl Accounting {
    /// `sent_per_room[r]` = messages sent to room `r` during the window.
    pub fn new(sent_per_room: &[u64]) -> Self {
        Accounting {
            sent: sent_per_room.iter().sum(),
            ..Default::default()
        }
    }

    /// Adds one subscriber's window stats; `expected` is what its room got.
    pub fn add_subscriber(&mut self, expected: u64, w: WinStats) {
        self.expected += expected;
        self.received += w.received.min(expected);
        self.lost += expected.saturating_sub(w.received);
        // More distinct messages than were sent can only be duplicates we
        // could not recognise (e.g. very old reorders): report them as such.
        self.duplicates += w.duplicates + w.received.saturating_sub(expected);
        self.reordered += w.reordered;
        self.seq.merge(&w.seq);
        if let Some(h) = w.hist {
            match &mut self.hist {
                None => self.hist = Some(h),
                Some(acc) => {
                    // Both auto-resize, so adding cannot fail on range.
                    let _ = acc.add(&h);
                }
            }
        }
    }

    pub fn loss_fraction(&self) -> f64 {
        if self.expected == 0 {
            0.0
        } else {
            self.lost as f64 / self.expected as f64
        }
    }

    pub fn latency(&self) -> Latency {
        Latency::from_hist(self.hist.as_ref())
    }
}

/// Latency percentiles in milliseconds (null when there were no samples).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50: Option<f64>,
    pub p90: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
}

impl Latency {
    pub fn from_hist(h: Option<&Histogram<u64>>) -> Self {
        let Some(h) = h.filter(|h| !h.is_empty()) else {
            return Latency::default();
        };
        let ms = |us: u64| Some(round3(us as f64 / 1000.0));
        Latency {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(r: &mut RoomSeq, c: &mut SeqCounts, seqs: &[(u64, &str)]) -> Vec<SeqStep> {
        seqs.iter()
            .map(|&(s, e)| {
                let st = r.observe(s, e.as_bytes());
                c.add_step(st);
                st
            })
            .collect()
    }

    #[test]
    fn room_seq_in_order() {
        let (mut r, mut c) = (RoomSeq::default(), SeqCounts::default());
        assert!(!r.seen());
        // A subscriber joins mid-stream: the first seq can be anything.
        let got = steps(&mut r, &mut c, &[(1042, "e1"), (1043, "e1"), (1044, "e1")]);
        assert_eq!(got, [SeqStep::First, SeqStep::Next, SeqStep::Next]);
        assert!(r.seen());
        assert_eq!(
            c,
            SeqCounts {
                frames: 3,
                ..Default::default()
            }
        );
        assert!(!c.broken());
    }

    #[test]
    fn room_seq_gaps_count_missing_messages() {
        let (mut r, mut c) = (RoomSeq::default(), SeqCounts::default());
        let got = steps(
            &mut r,
            &mut c,
            &[(1, "e"), (2, "e"), (5, "e"), (6, "e"), (7, "e"), (100, "e")],
        );
        assert_eq!(
            got,
            [
                SeqStep::First,
                SeqStep::Next,
                SeqStep::Gap(2),
                SeqStep::Next,
                SeqStep::Next,
                SeqStep::Gap(92)
            ]
        );
        assert_eq!(
            (c.frames, c.gaps, c.duplicates, c.epoch_changes),
            (6, 94, 0, 0)
        );
        assert!(c.broken());
    }

    #[test]
    fn room_seq_duplicates_and_going_back() {
        let (mut r, mut c) = (RoomSeq::default(), SeqCounts::default());
        let got = steps(
            &mut r,
            &mut c,
            &[(10, "e"), (11, "e"), (11, "e"), (9, "e"), (12, "e")],
        );
        assert_eq!(
            got,
            [
                SeqStep::First,
                SeqStep::Next,
                SeqStep::Duplicate,
                SeqStep::Duplicate,
                // A duplicate does not move `last`: 12 follows 11.
                SeqStep::Next
            ]
        );
        assert_eq!(
            (c.frames, c.gaps, c.duplicates, c.epoch_changes),
            (5, 0, 2, 0)
        );
        assert!(c.broken());
        // The very first seq can be 0, and 0 again is a duplicate.
        let mut r = RoomSeq::default();
        assert_eq!(r.observe(0, b""), SeqStep::First);
        assert_eq!(r.observe(0, b""), SeqStep::Duplicate);
        assert_eq!(r.observe(1, b""), SeqStep::Next);
    }

    #[test]
    fn room_seq_epoch_change_starts_over() {
        let (mut r, mut c) = (RoomSeq::default(), SeqCounts::default());
        let got = steps(
            &mut r,
            &mut c,
            &[
                (500, "1764770000123456"),
                (501, "1764770000123456"),
                // History lost: seqs restart in a new epoch, neither dup nor gap.
                (1, "1764770099000000"),
                (2, "1764770099000000"),
                // A jump in a new epoch is a gap like any other.
                (4, "1764770099000000"),
                // Back to an old epoch is a change too, even with a higher seq.
                (502, "1764770000123456"),
            ],
        );
        assert_eq!(
            got,
            [
                SeqStep::First,
                SeqStep::Next,
                SeqStep::EpochChange,
                SeqStep::Next,
                SeqStep::Gap(1),
                SeqStep::EpochChange
            ]
        );
        assert_eq!(
            (c.frames, c.gaps, c.duplicates, c.epoch_changes),
            (6, 1, 0, 2)
        );
        // An epoch change alone is not a broken stream.
        let mut only = SeqCounts::default();
        only.add_step(SeqStep::EpochChange);
        assert!(!only.broken());
    }

    #[test]
    fn seq_counts_merge_into_accounting() {
        let mut a = Accounting::new(&[10]);
        for jump in [SeqStep::Next, SeqStep::Gap(3)] {
            let mut w = WinStats::default();
            w.seq.add_step(SeqStep::Next);
            w.seq.add_step(jump);
            w.seq.add_step(SeqStep::Missing);
            a.add_subscriber(10, w);
        }
        assert_eq!(
            a.seq,
            SeqCounts {
                frames: 4,
                gaps: 3,
                missing: 2,
                ..Default::default()
            }
        );
        let mut total = SeqCounts::default();
        total.merge(&a.seq);
        total.merge(&a.seq);
        assert_eq!((total.frames, total.gaps), (8, 6));
    }

    #[test]
    fn seq_in_order_and_gaps() {
        let mut t = SeqTrack::default();
        assert_eq!(t.observe(5), SeqObs::New);
        assert_eq!(t.observe(6), SeqObs::New);
        assert_eq!(t.observe(10), SeqObs::New); // gap (loss) is fine
        assert_eq!(t.observe(1000), SeqObs::New); // big gap resets mask
        assert_eq!(t.observe(1000), SeqObs::Duplicate);
        assert_eq!(t.observe(10), SeqObs::Reordered); // too old to know
    }

    #[test]
    fn seq_dup_vs_reorder() {
        let mut t = SeqTrack::default();
        assert_eq!(t.observe(0), SeqObs::New);
        assert_eq!(t.observe(2), SeqObs::New);
        assert_eq!(t.observe(2), SeqObs::Duplicate);
        assert_eq!(t.observe(1), SeqObs::Reordered);
        assert_eq!(t.observe(1), SeqObs::Duplicate);
        assert_eq!(t.observe(0), SeqObs::Duplicate);
        assert_eq!(t.observe(3), SeqObs::New);
        // 127 back is still tracked exactly.
        let mut t = SeqTrack::default();
        for s in 0..=200u64 {
            assert_eq!(t.observe(s), SeqObs::New);
        }
        assert_eq!(t.observe(200 - 127), SeqObs::Duplicate);
        assert_eq!(t.observe(200 - 128), SeqObs::Reordered);
    }

    #[test]
    fn win_stats_counts() {
        let mut w = WinStats::default();
        w.record(SeqObs::New, 1500);
        w.record(SeqObs::Reordered, 2500);
        w.record(SeqObs::Duplicate, 9_999_999);
        assert_eq!(w.received, 2);
        assert_eq!(w.reordered, 1);
        assert_eq!(w.duplicates, 1);
        let h = w.hist.as_ref().unwrap();
        assert_eq!(h.len(), 2); // duplicates are not latency samples
    }

    #[test]
    fn accounting_loss_and_extra() {
        let mut a = Accounting::new(&[10, 20]);
        assert_eq!(a.sent, 30);
        // Subscriber in room 0 got everything.
        let mut w = WinStats::default();
        for _ in 0..10 {
            w.record(SeqObs::New, 1000);
        }
        a.add_subscriber(10, w);
        // Subscriber in room 1 lost 5.
        let w = WinStats {
            received: 15,
            ..Default::default()
        };
        a.add_subscriber(20, w);
        // Subscriber in room 0 somehow got 12 distinct: 2 extra -> duplicates.
        let w = WinStats {
            received: 12,
            duplicates: 1,
            ..Default::default()
        };
        a.add_subscriber(10, w);
        assert_eq!(a.expected, 40);
        assert_eq!(a.received, 35);
        assert_eq!(a.lost, 5);
        assert_eq!(a.duplicates, 3);
        assert!((a.loss_fraction() - 5.0 / 40.0).abs() < 1e-12);
        let l = a.latency();
        let near = |v: Option<f64>, want: f64| (v.unwrap() - want).abs() <= want * 0.01;
        assert!(near(l.p50, 1.0) && near(l.max, 1.0), "{l:?}");
    }

    #[test]
    fn latency_empty_is_null() {
        let a = Accounting::new(&[]);
        let l = a.latency();
        assert!(l.p50.is_none() && l.max.is_none());
        assert_eq!(a.loss_fraction(), 0.0);
    }

    #[test]
    fn histogram_merge_percentiles() {
        let mut a = Accounting::new(&[200]);
        let mut w1 = WinStats::default();
        for _ in 0..99 {
            w1.record(SeqObs::New, 1_000);
        }
        let mut w2 = WinStats::default();
        w2.record(SeqObs::New, 100_000);
        a.add_subscriber(100, w1);
        a.add_subscriber(100, w2);
        let l = a.latency();
        assert!((l.p50.unwrap() - 1.0).abs() <= 0.01, "{l:?}");
        assert!((l.p99.unwrap() - 1.0).abs() <= 0.01, "{l:?}");
        assert!(l.max.unwrap() >= 99.0 && l.max.unwrap() <= 101.0);
    }

    #[test]
    fn windows_classify() {
        let w = Windows::default();
        assert_eq!(w.classify(5), None);
        w.open(0, 100, 200);
        assert_eq!(w.classify(99), None);
        assert_eq!(w.classify(100), Some(0));
        assert_eq!(w.classify(199), Some(0));
        assert_eq!(w.classify(200), None);
        w.open(1, 300, 400);
        assert_eq!(w.classify(150), Some(0));
        assert_eq!(w.classify(250), None);
        assert_eq!(w.classify(300), Some(1));
        assert_eq!(w.classify(400), None);
    }
}
