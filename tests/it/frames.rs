//! Property tests of the client frame reader (`roomcast::ws::FrameReader`),
//! fast enough for every test run: the CI guard of what the `frame_reader`
//! fuzz target (fuzz/, docs/fuzzing.md) checks at length.
//!
//! - Valid masked client frame sequences (text and binary messages, whole or
//!   fragmented at any byte, even inside a UTF-8 character; pings and pongs
//!   between fragments; a close at the end) give exactly the messages that
//!   were sent, whether the bytes arrive at once (with the handshake) or
//!   split at random points into reads as a connection makes them.
//! - Random bytes, alone or after a valid prefix, never panic; what comes
//!   out is within the limits; after the first error nothing more comes
//!   out and the reader holds one read chunk at most.
//! - Always: the reader never holds more than the bytes that came with the
//!   handshake + one read chunk + `max_message` + a small constant.

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence};
use roomcast::ws::{self, valid_close_code, FrameError, FrameReader, Incoming};

/// Frame headers and bookkeeping beyond the read chunk and the message limit.
const SLACK: usize = 256;

/// One frame a client sends.
#[derive(Debug, Clone)]
struct ClientFrame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
    mask: [u8; 4],
}

impl ClientFrame {
    /// Encoded as a browser would: masked, shortest length encoding.
    fn encode(&self, out: &mut Vec<u8>) {
        out.push(if self.fin { 0x80 } else { 0 } | self.opcode);
        match self.payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= u16::MAX as usize => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&self.mask);
        out.extend(
            self.payload
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ self.mask[i % 4]),
        );
    }
}

/// What a client sends in one go, between the fragments of a message.
#[derive(Debug, Clone)]
enum Control {
    Ping(Vec<u8>),
    Pong(Vec<u8>),
}

/// A message: text or binary, cut at the given byte offsets into fragments,
/// with control frames after some of the fragments (never after the last).
#[derive(Debug, Clone)]
struct Message {
    text: bool,
    payload: Vec<u8>,
    cuts: Vec<usize>,
    controls: Vec<(usize, Control)>,
}

fn control() -> impl Strategy<Value = Control> {
    let payload = prop::collection::vec(any::<u8>(), 0..=125);
    prop_oneof![
        payload.clone().prop_map(Control::Ping),
        payload.prop_map(Control::Pong),
    ]
}

fn message() -> impl Strategy<Value = Message> {
    let text = ".{0,120}".prop_map(|s: String| (true, s.into_bytes()));
    let binary = prop::collection::vec(any::<u8>(), 0..400).prop_map(|b| (false, b));
    (
        prop_oneof![text, binary],
        prop::collection::vec(any::<prop::sample::Index>(), 0..4),
        prop::collection::vec((0usize..4, control()), 0..3),
    )
        .prop_map(|((text, payload), cuts, controls)| {
            // Cut anywhere, including inside a UTF-8 character: only the
            // whole message must be valid text.
            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(payload.len() + 1)).collect();
            cuts.sort_unstable();
            Message {
                text,
                payload,
                cuts,
                controls,
            }
        })
}

/// A valid conversation: messages, then maybe a close.
#[derive(Debug, Clone)]
struct Conversation {
    messages: Vec<Message>,
    close: Option<(u16, String)>,
    masks: Vec<[u8; 4]>,
}

fn conversation() -> impl Strategy<Value = Conversation> {
    let code = prop_oneof![Just(1000u16), Just(1001), 1007u16..=1014, 3000u16..=4999,];
    (
        prop::collection::vec(message(), 0..6),
        prop::option::of((code, "[a-z ]{0,20}")),
        prop::collection::vec(any::<[u8; 4]>(), 1..8),
    )
        .prop_map(|(messages, close, masks)| Conversation {
            messages,
            close,
            masks,
        })
}

impl Conversation {
    /// The bytes on the wire and the messages the server must see.
    fn wire(&self) -> (Vec<u8>, Vec<Incoming>, usize) {
        let mut masks = self.masks.iter().cycle();
        let mut frame = |fin, opcode, payload: &[u8], out: &mut Vec<u8>| {
            ClientFrame {
                fin,
                opcode,
                payload: payload.to_vec(),
                mask: *masks.next().unwrap_or(&[0; 4]),
            }
            .encode(out)
        };
        let (mut bytes, mut expected, mut largest) = (Vec::new(), Vec::new(), 0);
        for m in &self.messages {
            largest = largest.max(m.payload.len());
            let mut bounds = vec![0];
            bounds.extend(&m.cuts);
            bounds.push(m.payload.len());
            let pieces = bounds.len() - 1;
            for i in 0..pieces {
                let opcode = match (i, m.text) {
                    (0, true) => ws::OPCODE_TEXT,
                    (0, false) => ws::OPCODE_BINARY,
                    _ => ws::OPCODE_CONTINUATION,
                };
                let fin = i + 1 == pieces;
                frame(
                    fin,
                    opcode,
                    &m.payload[bounds[i]..bounds[i + 1]],
                    &mut bytes,
                );
                if fin {
                    break;
                }
                for (_, c) in m.controls.iter().filter(|(after, _)| *after == i) {
                    match c {
                        Control::Ping(p) => {
                            frame(true, ws::OPCODE_PING, p, &mut bytes);
                            expected.push(Incoming::Ping(Bytes::from(p.clone())));
                        }
                        Control::Pong(p) => {
                            frame(true, ws::OPCODE_PONG, p, &mut bytes);
                            expected.push(Incoming::Pong);
                        }
                    }
                }
            }
            let payload = Bytes::from(m.payload.clone());
            expected.push(if m.text {
                Incoming::Text(payload)
            } else {
                Incoming::Binary(payload)
            });
        }
        if let Some((code, reason)) = &self.close {
            let mut p = code.to_be_bytes().to_vec();
            p.extend_from_slice(reason.as_bytes());
            frame(true, ws::OPCODE_CLOSE, &p, &mut bytes);
            expected.push(Incoming::Close(Some(*code)));
        }
        (bytes, expected, largest)
    }
}

/// How a connection reads a stream: the first `leftover` bytes came with
/// the handshake, then reads of the given sizes (used in turn), each within
/// the spare room `read_buf()` offers, as `try_read_buf` reads.
#[derive(Debug, Clone)]
struct Reads {
    read_chunk: usize,
    /// Clamped to the stream's length.
    leftover: usize,
    sizes: Vec<usize>,
}

fn reads() -> impl Strategy<Value = Reads> {
    (
        1usize..=128,
        0usize..=64,
        prop::collection::vec(1usize..=300, 1..8),
    )
        .prop_map(|(read_chunk, leftover, sizes)| Reads {
            read_chunk,
            leftover,
            sizes,
        })
}

/// Everything the reader yields for `stream` read as `how` says, checking
/// the reader's promises after every read.
fn read_all(stream: &[u8], max_message: usize, how: &Reads) -> Vec<Result<Incoming, FrameError>> {
    let leftover = how.leftover.min(stream.len());
    let (first, mut rest) = stream.split_at(leftover);
    let mut r = FrameReader::new(max_message, how.read_chunk, Bytes::copy_from_slice(first));
    let bound = leftover + how.read_chunk + max_message + SLACK;
    let mut out = Vec::new();
    let drain = |r: &mut FrameReader, out: &mut Vec<_>| loop {
        if r.failed() {
            assert!(!r.has_input(), "a failed reader still has input");
            assert_eq!(r.next_message(), Ok(None), "a message after the error");
            return;
        }
        match r.next_message() {
            Ok(None) => return,
            Ok(Some(m)) => {
                check_message(&m, max_message);
                out.push(Ok(m));
            }
            Err(e) => out.push(Err(e)),
        }
    };
    let check_memory = |r: &FrameReader| {
        let held = r.allocated();
        assert!(held <= bound, "the reader holds {held} bytes > {bound}");
        if r.failed() {
            assert!(
                held <= how.read_chunk + SLACK,
                "a failed reader holds {held} bytes"
            );
        }
    };
    drain(&mut r, &mut out);
    check_memory(&r);
    for (i, size) in how.sizes.iter().cycle().enumerate() {
        if rest.is_empty() {
            break;
        }
        let buf = r.read_buf();
        let spare = buf.capacity() - buf.len();
        assert!(
            spare >= how.read_chunk,
            "read_buf() offers only {spare} bytes"
        );
        let n = (*size).min(spare).min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        drain(&mut r, &mut out);
        check_memory(&r);
        if i % 3 == 2 {
            // A connection gives its buffer back whenever a wake-up ends.
            r.release_if_idle();
            check_memory(&r);
        }
    }
    out
}

/// The whole stream arrives with the handshake.
fn at_once(read_chunk: usize) -> Reads {
    Reads {
        read_chunk,
        leftover: usize::MAX,
        sizes: vec![1],
    }
}

fn check_message(m: &Incoming, max_message: usize) {
    match m {
        Incoming::Text(t) => {
            assert!(t.len() <= max_message, "text of {} bytes", t.len());
            assert!(std::str::from_utf8(t).is_ok(), "text is not UTF-8");
        }
        Incoming::Binary(b) => assert!(b.len() <= max_message, "binary of {} bytes", b.len()),
        Incoming::Ping(p) => assert!(p.len() <= 125, "ping of {} bytes", p.len()),
        Incoming::Pong => {}
        Incoming::Close(code) => assert!(code.is_none_or(valid_close_code), "close {code:?}"),
    }
}

fn config() -> Config {
    Config {
        cases: 256,
        // A failure prints its minimal input; no files in the source tree.
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn valid_frames_give_the_same_messages_however_they_are_split(
        conv in conversation(),
        how in reads(),
        headroom in 0usize..64,
    ) {
        let (stream, expected, largest) = conv.wire();
        let max_message = largest.max(1) + headroom;
        // All of it with the handshake.
        let whole = read_all(&stream, max_message, &at_once(how.read_chunk));
        let expected: Vec<_> = expected.into_iter().map(Ok).collect();
        prop_assert_eq!(&whole, &expected);
        let split = read_all(&stream, max_message, &how);
        prop_assert_eq!(&split, &expected);
    }

    #[test]
    fn random_bytes_never_panic_and_memory_stays_bounded(
        conv in conversation(),
        prefix in any::<bool>(),
        garbage in prop::collection::vec(any::<u8>(), 0..2000),
        how in reads(),
        max_message in 1usize..600,
    ) {
        let mut stream = if prefix { conv.wire().0 } else { Vec::new() };
        stream.extend_from_slice(&garbage);
        let chunked = read_all(&stream, max_message, &how);
        // At most one error, and it is the last thing that comes out.
        let errors = chunked.iter().filter(|o| o.is_err()).count();
        prop_assert!(errors <= 1);
        if errors == 1 {
            prop_assert!(chunked.last().is_some_and(|o| o.is_err()));
        }
        // However the bytes were split, the outcome is the same.
        let whole = read_all(&stream, max_message, &at_once(how.read_chunk));
        prop_assert_eq!(chunked, whole);
    }
}
