//! Fuzz target: the incremental client frame reader (`roomcast::ws::FrameReader`).
//!
//! The input is a small header followed by the byte stream a client sends:
//!
//! | byte      | meaning                                                        |
//! |-----------|----------------------------------------------------------------|
//! | 0         | `max_message` = 1 + 2·b (1..=511): small, so limits are hit     |
//! | 1         | `read_chunk` = 1 + b % 128 (the read buffer reserved per read)  |
//! | 2         | leftover: the first b % 64 stream bytes came with the handshake |
//! | 3         | k = 1 + b % 8 chunk-size bytes follow                           |
//! | 4..4+k    | read sizes, used in turn: 1 + (s & 0x7f) bytes per read; with   |
//! |           | the top bit set, `release_if_idle()` runs after that read       |
//! | rest      | the stream                                                      |
//!
//! The stream is parsed twice: once whole (all of it handed over as leftover)
//! as the reference, then as a connection reads it: each read takes at most
//! the spare capacity `read_buf()` offers, as `try_read_buf` does. Checked:
//! - the chunked reading yields exactly the reference's messages and error;
//! - no panic; messages within `max_message` (pings within 125 bytes), text
//!   is valid UTF-8, close codes are valid;
//! - after the error: `failed()`, no more messages, `has_input()` false, and
//!   everything fed afterwards is discarded (one read chunk held at most);
//! - memory after every read: `allocated()` ≤ leftover + read chunk +
//!   max message + a small constant, and the heap bytes actually live (a
//!   counting global allocator) within twice that, so neither a view of
//!   shared buffers nor allocator growth can hide an unbounded buffer.

#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use roomcast::ws::{valid_close_code, FrameError, FrameReader, Incoming};

/// Counts the heap bytes live in this process (Rust allocations only; the
/// fuzzer's own C++ allocations do not pass through here).
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Headers, the `Shared` blocks of split buffers, the progress box.
const SLACK: usize = 256;

type Outcome = Result<Incoming, FrameError>;

fn check_message(m: &Incoming, max_message: usize) {
    match m {
        Incoming::Text(t) => {
            assert!(
                t.len() <= max_message,
                "text of {} > {max_message}",
                t.len()
            );
            assert!(std::str::from_utf8(t).is_ok(), "text is not UTF-8");
        }
        Incoming::Binary(b) => {
            assert!(
                b.len() <= max_message,
                "binary of {} > {max_message}",
                b.len()
            )
        }
        Incoming::Ping(p) => assert!(p.len() <= 125, "ping of {}", p.len()),
        Incoming::Pong => {}
        Incoming::Close(code) => {
            assert!(code.is_none_or(valid_close_code), "close code {code:?}")
        }
    }
}

/// Every outcome of the stream handed over at once.
fn reference(max_message: usize, read_chunk: usize, stream: &[u8]) -> Vec<Outcome> {
    let mut r = FrameReader::new(max_message, read_chunk, Bytes::copy_from_slice(stream));
    let mut out = Vec::new();
    loop {
        match r.next_message() {
            Ok(Some(m)) => out.push(Ok(m)),
            Ok(None) => break,
            Err(e) => {
                out.push(Err(e));
                assert!(r.failed());
                assert!(!r.has_input());
                assert_eq!(r.next_message(), Ok(None));
                break;
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [m, c, l, k, rest @ ..] = data else {
        return;
    };
    let max_message = 1 + 2 * *m as usize;
    let read_chunk = 1 + (*c as usize % 128);
    let k = 1 + (*k as usize % 8);
    if rest.len() < k {
        return;
    }
    let (sizes, stream) = rest.split_at(k);
    let leftover_len = (*l as usize % 64).min(stream.len());
    let (leftover, mut input) = stream.split_at(leftover_len);

    let expected = reference(max_message, read_chunk, stream);
    for outcome in &expected {
        if let Ok(m) = outcome {
            check_message(m, max_message);
        }
    }

    let base = LIVE.load(Ordering::Relaxed);
    let mut r = FrameReader::new(max_message, read_chunk, Bytes::copy_from_slice(leftover));
    let bound = leftover_len + read_chunk + max_message + SLACK;
    let mut seen = 0usize;
    let mut drain = |r: &mut FrameReader| loop {
        if r.failed() {
            assert!(!r.has_input(), "a failed reader still has input");
            assert_eq!(r.next_message(), Ok(None), "a message after the error");
            return;
        }
        let outcome = match r.next_message() {
            Ok(None) => return,
            Ok(Some(m)) => Ok(m),
            Err(e) => Err(e),
        };
        assert!(
            seen < expected.len(),
            "chunked reading yields more than the whole stream: {outcome:?}"
        );
        assert_eq!(outcome, expected[seen], "outcome {seen} differs");
        seen += 1;
    };
    let check_memory = |r: &FrameReader, what: &str| {
        let held = r.allocated();
        assert!(held <= bound, "{what}: allocated() = {held} > {bound}");
        if r.failed() {
            assert!(
                held <= read_chunk + SLACK,
                "{what}: a failed reader holds {held}"
            );
        }
        let live = LIVE.load(Ordering::Relaxed).saturating_sub(base);
        assert!(
            live <= 2 * bound,
            "{what}: {live} heap bytes live > {}",
            2 * bound
        );
    };

    if r.has_input() {
        drain(&mut r);
    }
    check_memory(&r, "after the leftover");
    let mut i = 0;
    while !input.is_empty() {
        let s = sizes[i % k];
        i += 1;
        let buf = r.read_buf();
        let spare = buf.capacity() - buf.len();
        assert!(
            spare >= read_chunk,
            "read_buf() offers {spare} < {read_chunk}"
        );
        let n = (1 + (s & 0x7f) as usize).min(spare).min(input.len());
        buf.extend_from_slice(&input[..n]);
        input = &input[n..];
        drain(&mut r);
        check_memory(&r, "after a read");
        if s & 0x80 != 0 {
            r.release_if_idle();
            check_memory(&r, "after release_if_idle");
        }
    }
    assert_eq!(
        seen,
        expected.len(),
        "chunked reading yields fewer outcomes"
    );
    r.release_if_idle();
    if r.failed() {
        assert_eq!(r.allocated(), 0, "a failed reader keeps its buffer");
    }
});
