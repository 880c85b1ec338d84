//! Bench payloads: building the text a publisher sends and cheaply parsing
//! what a subscriber receives.
//!
//! The payload is exactly `size` bytes: `"<publisher idx>:<seq>:<send ns>:"`
//! followed by `x` padding. It contains only ASCII digits, `:` and `x`, so it
//! needs no JSON escaping and can be embedded verbatim in a JSON string.

use std::fmt::Write as _;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Smallest `--size` accepted: room for the longest header we can produce
/// within the caps (6-digit publisher idx, 11-digit seq, 14-digit ns, 3 colons).
pub const MIN_SIZE: usize = 40;
/// Largest `--size` accepted.
pub const MAX_SIZE: usize = 1 << 20;

static START: OnceLock<Instant> = OnceLock::new();

/// Process-wide monotonic epoch. Call once early in `main`.
pub fn init_clock() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Nanoseconds since the process-wide epoch (monotonic).
#[inline]
pub fn now_ns() -> u64 {
    let start = init_clock();
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The `Instant` corresponding to `ns` on the process clock.
pub fn instant_at(ns: u64) -> Instant {
    init_clock() + Duration::from_nanos(ns)
}

/// A parsed bench payload header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub publisher: u32,
    pub seq: u64,
    pub send_ns: u64,
}

/// How frames are wrapped on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    /// roomcast JSON mode: `{"op":"send",...,"data":"<payload>"}`.
    Json,
    /// Raw text frames (roomcast raw mode and the plain peer).
    Raw,
}

/// Builds outgoing frames for one publisher. Holds a padding string so a frame
/// costs exactly one allocation (the `String` tungstenite takes ownership of).
pub struct FrameBuilder {
    wire: Wire,
    size: usize,
    prefix: String,
    pad: String,
}

const JSON_SUFFIX: &str = "\"}";

impl FrameBuilder {
    pub fn new(wire: Wire, room: &str, size: usize) -> Self {
        let prefix = match wire {
            Wire::Json => {
                format!("{{\"op\":\"send\",\"room\":\"{room}\",\"event\":\"bench\",\"data\":\"")
            }
            Wire::Raw => String::new(),
        };
        FrameBuilder {
            wire,
            size,
            prefix,
            pad: "x".repeat(size),
        }
    }

    /// Length in bytes of every frame this builder produces.
    pub fn frame_len(&self) -> usize {
        match self.wire {
            Wire::Json => self.prefix.len() + self.size + JSON_SUFFIX.len(),
            Wire::Raw => self.size,
        }
    }

    /// Builds the frame text for one message.
    pub fn build(&self, h: Header) -> String {
        let mut s = String::with_capacity(self.frame_len());
        s.push_str(&self.prefix);
        let start = s.len();
        // Writing integers into a String cannot fail.
        let _ = write!(s, "{}:{}:{}:", h.publisher, h.seq, h.send_ns);
        let used = s.len() - start;
        if used < self.size {
            s.push_str(&self.pad[..self.size - used]);
        }
        if self.wire == Wire::Json {
            s.push_str(JSON_SUFFIX);
        }
        s
    }
}

/// Parses `"<u32>:<u64>:<u64>:"` at the start of `b`.
pub fn parse_header(b: &[u8]) -> Option<Header> {
    let mut i = 0usize;
    let mut field = |b: &[u8]| -> Option<u64> {
        let mut v: u64 = 0;
        let begin = i;
        while i < b.len() {
            let c = b[i];
            if c == b':' {
                if i == begin {
                    return None;
                }
                i += 1;
                return Some(v);
            }
            if !c.is_ascii_digit() {
                return None;
            }
            v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            i += 1;
        }
        None
    };
    let publisher = u32::try_from(field(b)?).ok()?;
    let seq = field(b)?;
    let send_ns = field(b)?;
    Some(Header {
        publisher,
        seq,
        send_ns,
    })
}

/// Finds `needle` in `hay` (short needle, short haystack: a simple scan on the
/// first byte is as fast as anything fancier here).
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut i = 0usize;
    while i + needle.len() <= hay.len() {
        match hay[i..hay.len() - rest.len()]
            .iter()
            .position(|&c| c == first)
        {
            None => return None,
            Some(p) => {
                let at = i + p;
                if &hay[at + 1..at + needle.len()] == rest {
                    return Some(at);
                }
                i = at + 1;
            }
        }
    }
    None
}

/// The history fields of a `msg` frame (rooms of a namespace with history on
/// carry `"seq":<u64>` and `"epoch":"<string>"`; other rooms neither).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryFields<'a> {
    /// No `"seq"` key: a room without history.
    None,
    /// `epoch` is the epoch string's raw bytes, empty if the frame has none.
    Seq { seq: u64, epoch: &'a [u8] },
    /// A `"seq"` key whose value is not a u64.
    Bad,
}

const SEQ_KEY: &[u8] = b"\"seq\":";
const EPOCH_KEY: &[u8] = b"\"epoch\":\"";
/// Where `epoch` is when it follows `seq` directly.
const NEXT_EPOCH: &[u8] = b",\"epoch\":\"";

/// Finds `seq` and `epoch` in a JSON `msg` frame without parsing it.
///
/// `skip` is the byte range of the bench payload (the `data` string's
/// contents: only digits, `:` and `x`, so no key can be in it), which is left
/// out of the search; pass an empty range to search everything. Key order is
/// not assumed. The search looks for the key's rarest byte (`q` of `"seq":`,
/// which no other part of a bench frame has) eight bytes at a time, after the
/// payload first (the short tail where a server that appends the history
/// fields puts them), then before it; so a frame without a seq costs one
/// word-at-a-time scan of its ~80 bytes outside the payload. The epoch is
/// looked for right after the seq's value first, then anywhere.
#[inline]
pub fn history_fields(frame: &str, skip: std::ops::Range<usize>) -> HistoryFields<'_> {
    let b = frame.as_bytes();
    let Some(at) = find_outside(b, SEQ_KEY, 3, &skip) else {
        return HistoryFields::None;
    };
    let mut i = at + SEQ_KEY.len();
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    let begin = i;
    let mut seq: u64 = 0;
    while let Some(&c) = b.get(i).filter(|c| c.is_ascii_digit()) {
        let Some(v) = seq
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(c - b'0')))
        else {
            return HistoryFields::Bad;
        };
        seq = v;
        i += 1;
    }
    if i == begin {
        return HistoryFields::Bad;
    }
    let value_at = if b[i..].starts_with(NEXT_EPOCH) {
        Some(i + NEXT_EPOCH.len())
    } else {
        find_outside(b, EPOCH_KEY, 3, &skip).map(|e| e + EPOCH_KEY.len())
    };
    let epoch = match value_at {
        Some(v) => match find_byte(&b[v..], b'"') {
            Some(n) => &b[v..v + n],
            None => return HistoryFields::Bad,
        },
        None => &[],
    };
    HistoryFields::Seq { seq, epoch }
}

/// [`find_anchored`] in `hay` outside `skip` (a range no match can overlap),
/// the part after `skip` first. An empty or out-of-bounds `skip` searches all.
#[inline]
fn find_outside(
    hay: &[u8],
    needle: &[u8],
    anchor: usize,
    skip: &std::ops::Range<usize>,
) -> Option<usize> {
    if skip.start >= skip.end || skip.end > hay.len() {
        return find_anchored(hay, needle, anchor);
    }
    find_anchored(&hay[skip.end..], needle, anchor)
        .map(|p| p + skip.end)
        .or_else(|| find_anchored(&hay[..skip.start], needle, anchor))
}

/// Finds `needle` in `hay` by looking for its byte at `anchor` (pick one that
/// is rare in the haystack) with [`find_byte`], then comparing the whole
/// needle there.
#[inline]
fn find_anchored(hay: &[u8], needle: &[u8], anchor: usize) -> Option<usize> {
    let a = needle[anchor];
    let mut from = 0usize;
    while let Some(p) = find_byte(&hay[from..], a) {
        let p = from + p;
        if p >= anchor && hay.get(p - anchor..p - anchor + needle.len()) == Some(needle) {
            return Some(p - anchor);
        }
        from = p + 1;
    }
    None
}

/// The first `b` in `hay`, eight bytes at a time (SWAR: a byte of
/// `word ^ b*0x01..01` is zero exactly where `b` is; the lowest flagged byte
/// of the classic zero-byte test is always a true zero).
#[inline]
fn find_byte(hay: &[u8], b: u8) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let pat = LO * u64::from(b);
    let mut chunks = hay.chunks_exact(8);
    let mut base = 0usize;
    for c in &mut chunks {
        let Ok(word) = <[u8; 8]>::try_from(c) else {
            unreachable!("chunks_exact(8) yields 8 bytes")
        };
        let x = u64::from_le_bytes(word) ^ pat;
        let m = x.wrapping_sub(LO) & !x & HI;
        if m != 0 {
            return Some(base + (m.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&c| c == b)
        .map(|p| base + p)
}

/// What a server frame in JSON mode turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum JsonFrame<'a> {
    /// A `msg` frame; the slice starts at the data string's first byte.
    Msg(&'a [u8]),
    Welcome,
    /// An `error` frame with its code.
    Error(String),
    /// Anything else (other ops, unparsable text).
    Other,
}

const MSG_PREFIX: &[u8] = b"{\"op\":\"msg\"";
const DATA_KEY: &[u8] = b"\"data\":\"";

/// Classifies a JSON-mode server frame. The common case (`{"op":"msg",...`)
/// never touches a JSON parser; anything else is parsed properly (rare).
/// `"data":"` is found by its `d` (which nothing before it in a bench frame
/// has), eight bytes at a time: a plain first-byte scan stops at every `"`.
pub fn classify_json(text: &str) -> JsonFrame<'_> {
    let b = text.as_bytes();
    if b.starts_with(MSG_PREFIX) {
        return match find_anchored(b, DATA_KEY, 1) {
            Some(at) => JsonFrame::Msg(&b[at + DATA_KEY.len()..]),
            None => JsonFrame::Other,
        };
    }
    classify_json_slow(text)
}

/// Only classifies the op (no payload location); used by publishers that
/// discard messages.
pub fn is_json_msg(text: &str) -> bool {
    text.as_bytes().starts_with(MSG_PREFIX)
}

fn classify_json_slow(text: &str) -> JsonFrame<'_> {
    let v: serde_json::Value = match serde_json::from_str(text) {
        Ok(v) => v,
        Err(_) => return JsonFrame::Other,
    };
    match v.get("op").and_then(|o| o.as_str()) {
        Some("welcome") => JsonFrame::Welcome,
        Some("error") => {
            let code = v
                .get("code")
                .and_then(|c| c.as_str())
                .unwrap_or("unknown")
                .chars()
                .take(64)
                .collect();
            JsonFrame::Error(code)
        }
        Some("msg") => {
            // Key order differed from what we expect; locate data by search.
            let b = text.as_bytes();
            match find(b, DATA_KEY) {
                Some(at) => JsonFrame::Msg(&b[at + DATA_KEY.len()..]),
                None => JsonFrame::Other,
            }
        }
        _ => JsonFrame::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_payload_is_exact_size_and_parses() {
        for size in [MIN_SIZE, 100, 1000] {
            let b = FrameBuilder::new(Wire::Raw, "bench-0", size);
            let h = Header {
                publisher: 123_456,
                seq: 99_999_999_999,
                send_ns: 36_000_000_000_000,
            };
            let s = b.build(h);
            assert_eq!(s.len(), size);
            assert_eq!(b.frame_len(), size);
            assert!(s.ends_with('x') || s.ends_with(':'));
            assert_eq!(parse_header(s.as_bytes()), Some(h));
        }
    }

    #[test]
    fn json_frame_roundtrip() {
        let b = FrameBuilder::new(Wire::Json, "bench-3", 100);
        let h = Header {
            publisher: 7,
            seq: 42,
            send_ns: 123_456_789,
        };
        let s = b.build(h);
        assert_eq!(s.len(), b.frame_len());
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["op"], "send");
        assert_eq!(v["room"], "bench-3");
        assert_eq!(v["event"], "bench");
        assert!(v.get("id").is_none());
        let data = v["data"].as_str().unwrap();
        assert_eq!(data.len(), 100);
        assert!(data.starts_with("7:42:123456789:xxx"));

        // What the server would send back.
        let out = format!(
            "{{\"op\":\"msg\",\"room\":\"bench-3\",\"event\":\"bench\",\"from\":\"c1\",\"ts\":1,\"data\":\"{data}\"}}"
        );
        match classify_json(&out) {
            JsonFrame::Msg(p) => assert_eq!(parse_header(p), Some(h)),
            other => panic!("unexpected {other:?}"),
        }
        assert!(is_json_msg(&out));
    }

    #[test]
    fn json_classification() {
        assert_eq!(
            classify_json(r#"{"op":"welcome","conn":"a","node":"n"}"#),
            JsonFrame::Welcome
        );
        assert_eq!(
            classify_json(r#"{"op":"error","code":"rate_limited","message":"slow down"}"#),
            JsonFrame::Error("rate_limited".into())
        );
        assert_eq!(classify_json("not json"), JsonFrame::Other);
        assert_eq!(classify_json(r#"{"op":"pong"}"#), JsonFrame::Other);
        // Different key order still works (slow path).
        match classify_json(r#"{"room":"r","op":"msg","data":"1:2:3:xx"}"#) {
            JsonFrame::Msg(p) => assert_eq!(
                parse_header(p),
                Some(Header {
                    publisher: 1,
                    seq: 2,
                    send_ns: 3
                })
            ),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn header_parse_rejects_garbage() {
        assert_eq!(parse_header(b""), None);
        assert_eq!(parse_header(b"1:2:3"), None);
        assert_eq!(parse_header(b"1::3:"), None);
        assert_eq!(parse_header(b"a:2:3:"), None);
        assert_eq!(parse_header(b"99999999999:2:3:"), None); // > u32
        assert_eq!(parse_header(b"1:99999999999999999999999:3:"), None); // overflow
        assert_eq!(
            parse_header(b"0:0:0:xxxx"),
            Some(Header {
                publisher: 0,
                seq: 0,
                send_ns: 0
            })
        );
    }

    #[test]
    fn find_works() {
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
        assert_eq!(find(b"ab", b"abc"), None);
        assert_eq!(find(b"xxxx\"data\":\"1", DATA_KEY), Some(4));
        assert_eq!(find(b"", b"a"), None);
        assert_eq!(find(b"aaa", b""), None);
        assert_eq!(find(b"a", b"a"), Some(0));
    }

    /// A history room's `msg` frame as the server sends it, and the byte
    /// range of its payload.
    fn hist_frame(order: &str, data: &str) -> (String, std::ops::Range<usize>) {
        let f = match order {
            "after" => format!(
                r#"{{"op":"msg","room":"h.3","event":"bench","from":"n1-2","ts":1764770000000,"data":"{data}","seq":1042,"epoch":"1764770000123456"}}"#
            ),
            "before" => format!(
                r#"{{"op":"msg","seq":1042,"epoch":"1764770000123456","room":"h.3","event":"bench","from":"n1-2","ts":1,"data":"{data}"}}"#
            ),
            "apart" => format!(
                r#"{{"epoch":"1764770000123456","op":"msg","room":"h.3","data":"{data}","from":"n1-2","seq": 1042}}"#
            ),
            _ => unreachable!(),
        };
        let start = f.find(data).unwrap();
        (f.clone(), start..start + data.len())
    }

    #[test]
    fn history_fields_in_any_order() {
        let data = "7:42:123456789:xxxxxxxxxxxxxxxxxxxx";
        for order in ["after", "before", "apart"] {
            let (f, skip) = hist_frame(order, data);
            let want = HistoryFields::Seq {
                seq: 1042,
                epoch: b"1764770000123456",
            };
            assert_eq!(history_fields(&f, skip), want, "{order}: {f}");
            // Without knowing where the payload is: the same.
            assert_eq!(history_fields(&f, 0..0), want, "{order}: {f}");
            // The payload is still found as before.
            match classify_json(&f) {
                JsonFrame::Msg(p) => assert_eq!(parse_header(p).unwrap().seq, 42),
                other => panic!("{order}: {other:?}"),
            }
        }
    }

    #[test]
    fn history_fields_absent_or_bad() {
        // Today's frames (no history): nothing.
        let plain =
            r#"{"op":"msg","room":"bench-3","event":"bench","from":"c1","ts":1,"data":"1:2:3:xx"}"#;
        assert_eq!(history_fields(plain, 0..0), HistoryFields::None);
        assert_eq!(history_fields("", 0..0), HistoryFields::None);
        // Look-alikes of the key are not the key.
        for f in [
            r#"{"op":"msg","event":"seq","data":"1:2:3:x"}"#,
            r#"{"op":"msg","xseq":5,"q":"q","data":"1:2:3:x"}"#,
            r#"{"op":"msg","seq_no":5,"data":"1:2:3:x"}"#,
        ] {
            assert_eq!(history_fields(f, 0..0), HistoryFields::None, "{f}");
        }
        // A seq without an epoch: an empty epoch.
        assert_eq!(
            history_fields(r#"{"op":"msg","data":"1:2:3:x","seq":7}"#, 0..0),
            HistoryFields::Seq { seq: 7, epoch: b"" }
        );
        for f in [
            r#"{"op":"msg","seq":"7","data":"1:2:3:x"}"#,
            r#"{"op":"msg","seq":-1,"data":"1:2:3:x"}"#,
            r#"{"op":"msg","seq":99999999999999999999999,"data":"1:2:3:x"}"#,
            r#"{"op":"msg","seq":"#,
            r#"{"op":"msg","seq":1,"epoch":"unterminated"#,
        ] {
            assert_eq!(history_fields(f, 0..0), HistoryFields::Bad, "{f}");
        }
        // A skip range that is out of bounds or inverted searches everything.
        let (f, _) = hist_frame("after", "1:2:3:x");
        let want = HistoryFields::Seq {
            seq: 1042,
            epoch: b"1764770000123456",
        };
        assert_eq!(history_fields(&f, 5..1000), want);
        #[allow(clippy::reversed_empty_ranges)]
        let inverted = 20..10;
        assert_eq!(history_fields(&f, inverted), want);
    }

    #[test]
    fn find_anchored_works() {
        assert_eq!(find_anchored(b"xx\"seq\":1", SEQ_KEY, 3), Some(2));
        assert_eq!(find_anchored(b"q\"seq\":1", SEQ_KEY, 3), Some(1));
        assert_eq!(find_anchored(b"\"seq\"", SEQ_KEY, 3), None);
        assert_eq!(find_anchored("é\"seq\":".as_bytes(), SEQ_KEY, 3), Some(2));
        assert_eq!(find_anchored(b"", SEQ_KEY, 3), None);
        let hay = b"ab\"seq\":cd\"seq\":";
        assert_eq!(find_outside(hay, SEQ_KEY, 3, &(2..8)), Some(10));
        // The part after the skipped range is searched first.
        assert_eq!(find_outside(hay, SEQ_KEY, 3, &(8..9)), Some(10));
        assert_eq!(find_outside(b"ab\"seq\":cd", SEQ_KEY, 3, &(2..8)), None);
        assert_eq!(find_outside(hay, SEQ_KEY, 3, &(0..0)), Some(2));
        assert_eq!(find_outside(hay, SEQ_KEY, 3, &(5..100)), Some(2));
    }

    #[test]
    fn find_byte_matches_a_plain_scan() {
        // Every length around the 8-byte words, every position, and bytes
        // whose neighbours trip the zero-byte test's borrow (0x00, 0x01, 0x80, 0xff).
        for len in 0..40usize {
            for at in 0..=len {
                for (fill, b) in [(b'x', b'q'), (0u8, 1u8), (0x80, 0x81), (0xff, 0x00), (1, 0)] {
                    let mut hay = vec![fill; len];
                    if at < len {
                        hay[at] = b;
                        // A second one later must not win.
                        if at + 3 < len {
                            hay[at + 3] = b;
                        }
                    }
                    let want = hay.iter().position(|&c| c == b);
                    assert_eq!(
                        find_byte(&hay, b),
                        want,
                        "len {len} at {at} fill {fill} b {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn clock_is_monotonic() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
    }
}
