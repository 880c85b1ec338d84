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
pub fn classify_json(text: &str) -> JsonFrame<'_> {
    let b = text.as_bytes();
    if b.starts_with(MSG_PREFIX) {
        return match find(b, DATA_KEY) {
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

    #[test]
    fn clock_is_monotonic() {
        let a = now_ns();
        let b = now_ns();
        assert!(b >= a);
    }
}
