//! WebSocket framing (RFC 6455) for the server side of a connection.
//!
//! Why not `tokio_tungstenite::WebSocketStream` on the server: a broadcast
//! gateway writes the *same* frame to thousands of sockets. Server frames are
//! unmasked, so header + payload are identical for every recipient; we build
//! them once ([`text_frame`]) and write the shared bytes straight to each
//! socket (see `peer.rs`), which tungstenite's per-connection write buffer
//! cannot do. Header parsing and formatting stay tungstenite's
//! ([`FrameHeader`]); this module adds the rules a server must enforce on
//! client frames (masking, control-frame limits, fragmentation, UTF-8, size)
//! and a read buffer that is only allocated while a connection is reading.

use std::io::Cursor;

use bytes::{Buf, Bytes, BytesMut};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

pub const OPCODE_TEXT: u8 = 0x1;
pub const OPCODE_BINARY: u8 = 0x2;
pub const OPCODE_CLOSE: u8 = 0x8;
pub const OPCODE_PING: u8 = 0x9;
pub const OPCODE_PONG: u8 = 0xA;

/// Close codes used by roomcast (documented in docs/protocol.md).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const TOO_BIG: u16 = 1009;
    pub const SERVICE_RESTART: u16 = 1012;
    /// The client did not read fast enough; its outbound queue overflowed.
    pub const SLOW_CONSUMER: u16 = 4001;
    /// The client sent nothing, not even a pong, for `heartbeat.timeout`.
    pub const HEARTBEAT_TIMEOUT: u16 = 4002;
}

/// A complete, unmasked server frame: FIN + opcode, length, payload.
pub fn server_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + 10);
    out.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => out.push(n as u8),
        n if n <= u16::MAX as usize => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
    Bytes::from(out)
}

pub fn text_frame(payload: &[u8]) -> Bytes {
    server_frame(OPCODE_TEXT, payload)
}

pub fn binary_frame(payload: &[u8]) -> Bytes {
    server_frame(OPCODE_BINARY, payload)
}

pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    // Control frames carry at most 125 bytes.
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    server_frame(OPCODE_CLOSE, &payload)
}

pub fn ping_frame() -> Bytes {
    Bytes::from_static(&[0x80 | OPCODE_PING, 0])
}

pub fn pong_frame(payload: &[u8]) -> Bytes {
    server_frame(OPCODE_PONG, payload)
}

/// Split a frame built by [`server_frame`] into (opcode, payload). For tests and tools.
pub fn split_server_frame(frame: &[u8]) -> Option<(u8, &[u8])> {
    let mut cursor = Cursor::new(frame);
    let (header, len) = FrameHeader::parse(&mut cursor).ok()??;
    let start = cursor.position() as usize;
    let body = frame.get(start..start + len as usize)?;
    Some((u8::from(header.opcode), body))
}

/// A complete message (or control frame) received from a client.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The client's close code, if it sent one.
    Close(Option<u16>),
}

/// A client broke the protocol; each variant knows its close code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("message larger than {0} bytes")]
    TooBig(usize),
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
}

impl FrameError {
    pub fn close_code(&self) -> u16 {
        match self {
            FrameError::Protocol(_) => close::PROTOCOL_ERROR,
            FrameError::TooBig(_) => close::TOO_BIG,
            FrameError::InvalidUtf8 => close::INVALID_PAYLOAD,
        }
    }
}

/// Reassembles client messages from bytes read off the socket.
pub struct FrameReader {
    buf: BytesMut,
    /// A fragmented message in progress: (is_text, bytes so far).
    partial: Option<(bool, BytesMut)>,
    max_message: usize,
    read_chunk: usize,
}

impl FrameReader {
    pub fn new(max_message: usize, read_chunk: usize, leftover: Bytes) -> Self {
        FrameReader {
            buf: BytesMut::from(&leftover[..]),
            partial: None,
            max_message,
            read_chunk,
        }
    }

    /// The buffer to read into, with room for at least one read chunk.
    pub fn read_buf(&mut self) -> &mut BytesMut {
        self.buf.reserve(self.read_chunk);
        &mut self.buf
    }

    /// Give the read buffer back to the allocator when nothing is pending,
    /// so an idle connection holds no buffer at all.
    pub fn release_if_idle(&mut self) {
        if self.buf.is_empty() && self.partial.is_none() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Incoming>, FrameError> {
        loop {
            let mut cursor = Cursor::new(&self.buf[..]);
            let Some((header, len)) = FrameHeader::parse(&mut cursor)
                .map_err(|_| FrameError::Protocol("malformed frame header"))?
            else {
                return Ok(None);
            };
            let header_len = cursor.position() as usize;
            if header.rsv1 || header.rsv2 || header.rsv3 {
                return Err(FrameError::Protocol("reserved bits set"));
            }
            let Some(mask) = header.mask else {
                return Err(FrameError::Protocol("client frames must be masked"));
            };
            let is_control = matches!(header.opcode, OpCode::Control(_));
            if is_control && (len > 125 || !header.is_final) {
                return Err(FrameError::Protocol("invalid control frame"));
            }
            let so_far = self.partial.as_ref().map_or(0, |(_, p)| p.len());
            if !is_control && len.saturating_add(so_far as u64) > self.max_message as u64 {
                return Err(FrameError::TooBig(self.max_message));
            }
            let len = len as usize;
            if self.buf.len() < header_len + len {
                self.buf.reserve(header_len + len - self.buf.len());
                return Ok(None);
            }
            self.buf.advance(header_len);
            let mut payload = self.buf.split_to(len);
            unmask(&mut payload, mask);
            match header.opcode {
                OpCode::Control(Control::Ping) => {
                    return Ok(Some(Incoming::Ping(payload.freeze())))
                }
                OpCode::Control(Control::Pong) => return Ok(Some(Incoming::Pong)),
                OpCode::Control(Control::Close) => return close_payload(&payload).map(Some),
                OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                    return Err(FrameError::Protocol("reserved opcode"))
                }
                OpCode::Data(Data::Continue) => {
                    let Some((is_text, mut acc)) = self.partial.take() else {
                        return Err(FrameError::Protocol("continuation without a message"));
                    };
                    acc.extend_from_slice(&payload);
                    if header.is_final {
                        return complete(is_text, acc).map(Some);
                    }
                    self.partial = Some((is_text, acc));
                }
                OpCode::Data(kind) => {
                    if self.partial.is_some() {
                        return Err(FrameError::Protocol("new message inside a fragmented one"));
                    }
                    let is_text = kind == Data::Text;
                    if header.is_final {
                        return complete(is_text, payload).map(Some);
                    }
                    self.partial = Some((is_text, payload));
                }
            }
        }
    }
}

fn complete(is_text: bool, payload: BytesMut) -> Result<Incoming, FrameError> {
    let payload = payload.freeze();
    if is_text {
        std::str::from_utf8(&payload).map_err(|_| FrameError::InvalidUtf8)?;
        Ok(Incoming::Text(payload))
    } else {
        Ok(Incoming::Binary(payload))
    }
}

fn close_payload(payload: &[u8]) -> Result<Incoming, FrameError> {
    match payload {
        [] => Ok(Incoming::Close(None)),
        [_] => Err(FrameError::Protocol("close payload of one byte")),
        [a, b, reason @ ..] => {
            std::str::from_utf8(reason).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(Incoming::Close(Some(u16::from_be_bytes([*a, *b]))))
        }
    }
}

/// XOR the client's mask over the payload, eight bytes at a time.
fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask) as u64;
    let wide = m | (m << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let x = u64::from_ne_bytes(word) ^ wide;
        chunk.copy_from_slice(&x.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame, as a browser would send it.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 65535 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    fn reader(bytes: &[u8]) -> FrameReader {
        FrameReader::new(1024, 64, Bytes::copy_from_slice(bytes))
    }

    #[test]
    fn reads_masked_text_split_across_reads() {
        let frame = client_frame(true, OPCODE_TEXT, b"hello, room with a longer text");
        let mut r = reader(&frame[..5]);
        assert_eq!(r.next_message(), Ok(None));
        r.read_buf().extend_from_slice(&frame[5..]);
        assert_eq!(
            r.next_message(),
            Ok(Some(Incoming::Text(Bytes::from_static(
                b"hello, room with a longer text"
            ))))
        );
        assert_eq!(r.next_message(), Ok(None));
        r.release_if_idle();
        assert_eq!(r.buf.capacity(), 0);
    }

    #[test]
    fn reassembles_fragments_around_a_ping() {
        let mut bytes = client_frame(false, OPCODE_TEXT, b"hel");
        bytes.extend(client_frame(true, OPCODE_PING, b"p"));
        bytes.extend(client_frame(true, 0x0, b"lo"));
        let mut r = reader(&bytes);
        assert_eq!(
            r.next_message(),
            Ok(Some(Incoming::Ping(Bytes::from_static(b"p"))))
        );
        assert_eq!(
            r.next_message(),
            Ok(Some(Incoming::Text(Bytes::from_static(b"hello"))))
        );
    }

    #[test]
    fn enforces_the_rules_with_close_codes() {
        let too_big = client_frame(true, OPCODE_BINARY, &[0; 2000]);
        assert_eq!(
            reader(&too_big[..8])
                .next_message()
                .unwrap_err()
                .close_code(),
            close::TOO_BIG
        );
        let bad_utf8 = client_frame(true, OPCODE_TEXT, &[0xff, 0xfe]);
        assert_eq!(
            reader(&bad_utf8).next_message().unwrap_err().close_code(),
            close::INVALID_PAYLOAD
        );
        let unmasked = [0x81, 0x01, b'a'];
        assert_eq!(
            reader(&unmasked).next_message().unwrap_err().close_code(),
            close::PROTOCOL_ERROR
        );
        let orphan = client_frame(true, 0x0, b"x");
        assert_eq!(
            reader(&orphan).next_message().unwrap_err().close_code(),
            close::PROTOCOL_ERROR
        );
        let reserved = client_frame(true, 0x3, b"x");
        assert_eq!(
            reader(&reserved).next_message().unwrap_err().close_code(),
            close::PROTOCOL_ERROR
        );
    }

    #[test]
    fn close_frames_carry_the_code() {
        let frame = client_frame(true, OPCODE_CLOSE, &[0x03, 0xe8, b'b', b'y', b'e']);
        assert_eq!(
            reader(&frame).next_message(),
            Ok(Some(Incoming::Close(Some(1000))))
        );
    }

    #[test]
    fn server_frames_use_the_shortest_length_encoding() {
        for n in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; n];
            let frame = text_frame(&payload);
            let (opcode, body) = split_server_frame(&frame).unwrap();
            assert_eq!((opcode, body.len()), (OPCODE_TEXT, n));
        }
        assert_eq!(close_frame(1012, "restart")[..4], [0x88, 9, 0x03, 0xf4]);
    }
}
