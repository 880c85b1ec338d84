//! Fuzz target: `roomcast::protocol::Outgoing::from_envelope`, the bus
//! envelope a node receives from Redis (anyone who can PUBLISH writes it).
//!
//! Input: byte 0 gives the room (a valid name of 1–128 bytes: the channel
//! the node subscribed to), the rest is the envelope. Checked:
//! - no panic;
//! - `Ok`: both frames are complete, well-formed unmasked server frames
//!   (FIN, no reserved bits, shortest length encoding, nothing after the
//!   payload); the JSON frame is text carrying a `msg` object for this room;
//!   the raw frame is text (valid UTF-8) or binary, and is the JSON frame
//!   itself for a JSON-mode envelope;
//! - the stamp read from the first bytes (`peek_stamp`, what a node's gap
//!   repair uses) is the one the parse finds (what the fan-out uses).

#![no_main]

use libfuzzer_sys::fuzz_target;
use roomcast::protocol::{epoch_key, peek_stamp, valid_room, Outgoing, Stamp};
use roomcast::topic::Target;
use roomcast::ws;
use serde::Deserialize;
use serde_json::value::RawValue;

/// (opcode, payload) of one strictly well-formed server frame that fills `frame` exactly.
fn strict_frame(frame: &[u8]) -> (u8, &[u8]) {
    let [b0, b1, rest @ ..] = frame else {
        panic!("frame of {} bytes", frame.len());
    };
    assert_eq!(b0 & 0xf0, 0x80, "FIN not set or reserved bits set: {b0:#x}");
    assert_eq!(b1 & 0x80, 0, "server frames are not masked");
    let (len, body) = match b1 & 0x7f {
        126 => {
            let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
            assert!(len >= 126, "16-bit length {len} should have been short");
            (len, &rest[2..])
        }
        127 => {
            let len = u64::from_be_bytes(rest[..8].try_into().unwrap());
            assert!(
                len > u16::MAX as u64,
                "64-bit length {len} should have been shorter"
            );
            (len as usize, &rest[8..])
        }
        n => (n as usize, rest),
    };
    assert_eq!(
        body.len(),
        len,
        "length field {len}, {} payload bytes",
        body.len()
    );
    (b0 & 0x0f, body)
}

#[derive(Deserialize)]
struct Msg<'a> {
    // Owned: an escaped string cannot be borrowed from the text.
    op: String,
    room: String,
    #[allow(dead_code)]
    event: String,
    #[allow(dead_code)]
    from: String,
    #[allow(dead_code)]
    ts: u64,
    #[serde(borrow)]
    #[allow(dead_code)]
    data: &'a RawValue,
    #[serde(default)]
    binary: bool,
}

const ROOM_CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:@";

fuzz_target!(|data: &[u8]| {
    let [r, payload @ ..] = data else {
        return;
    };
    let room: String = (0..1 + *r as usize % 128)
        .map(|i| ROOM_CHARS[(i * 7 + *r as usize) % ROOM_CHARS.len()] as char)
        .collect();
    assert!(valid_room(&room));
    let Ok(out) = Outgoing::from_envelope(Target::Room(&room), payload) else {
        return;
    };
    if let Some((seq, epoch)) = peek_stamp(payload) {
        let stamp = Stamp {
            seq,
            epoch: epoch_key(epoch),
        };
        assert_eq!(out.stamp, Some(stamp), "peeked {seq} {epoch:?}");
    }
    let (opcode, json) = strict_frame(&out.json);
    assert_eq!(opcode, ws::OPCODE_TEXT);
    let text = std::str::from_utf8(json).expect("the msg frame is UTF-8");
    let msg: Msg = serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("the msg frame is not a msg object ({e}): {text}"));
    assert_eq!(msg.op, "msg");
    assert_eq!(
        msg.room, room,
        "the room is the channel's, never the payload's"
    );

    let (raw_opcode, raw) = strict_frame(&out.raw);
    match raw_opcode {
        ws::OPCODE_TEXT => {
            assert!(!msg.binary);
            assert!(
                std::str::from_utf8(raw).is_ok(),
                "raw text frame is not UTF-8"
            );
        }
        ws::OPCODE_BINARY => assert!(msg.binary),
        other => panic!("raw frame opcode {other}"),
    }
    let env: serde_json::Value = match serde_json::from_slice(payload) {
        Ok(v) => v,
        Err(_) => return, // e.g. a number beyond f64 in a field Value cannot hold
    };
    if env.get("raw").is_none_or(|r| r.is_null()) {
        assert_eq!(
            out.raw, out.json,
            "a JSON-mode envelope's raw frame is its msg frame"
        );
    }
});
