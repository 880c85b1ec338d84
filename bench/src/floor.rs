//! `floor`: what one small `send` costs on this machine, with no WebSocket
//! server, no Redis and no async runtime in the way.
//!
//! N loopback TCP connections; a sender thread pinned to one core writes the
//! same small buffer to a group of G sockets per burst (a "room"), moving to
//! the next group each burst, the way a gateway fans a message out; a reader
//! thread pinned to another core drains the other ends with epoll, like a
//! load generator. The sender's own CPU time (`CLOCK_THREAD_CPUTIME_ID`, which
//! on loopback includes the receive-side processing the kernel does inside
//! `send`) divided by the sends is the floor any gateway pays per delivery at
//! that socket count. `--mode uring` / `uring-fixed` submit each burst as one
//! io_uring batch instead of one `send` per socket, to measure what batching
//! the system calls saves.

use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SendMode {
    /// One non-blocking send() per socket
    Send,
    /// One io_uring submission per burst (file descriptors looked up per send)
    Uring,
    /// One io_uring submission per burst, sockets registered as fixed files
    UringFixed,
}

#[derive(Debug, Clone)]
pub struct FloorCfg {
    pub connections: usize,
    pub group: usize,
    pub bursts: usize,
    pub interval: Duration,
    pub size: usize,
    pub mode: SendMode,
    pub sender_cpu: Option<usize>,
    pub reader_cpu: Option<usize>,
}

#[derive(Debug, Serialize)]
pub struct FloorReport {
    pub mode: &'static str,
    pub send_mode: SendMode,
    pub connections: usize,
    pub group: usize,
    pub bursts: usize,
    pub size: usize,
    pub sends: u64,
    pub short_sends: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub sender_cpu_us_per_send: f64,
    pub reader_cpu_us_per_send: f64,
    pub wall_s: f64,
}

pub fn run_floor(cfg: FloorCfg) -> i32 {
    match measure(&cfg) {
        Ok(r) => {
            eprintln!(
                "floor ({:?}): {} sends of {} B to {} of {} sockets per burst: sender {:.2} µs CPU per send, reader {:.2} µs; {} short sends; {} of {} bytes received",
                r.send_mode,
                r.sends,
                r.size,
                r.group,
                r.connections,
                r.sender_cpu_us_per_send,
                r.reader_cpu_us_per_send,
                r.short_sends,
                r.bytes_received,
                r.bytes_sent
            );
            match serde_json::to_string(&r) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("error: cannot encode the report: {e}"),
            }
            if r.bytes_received == r.bytes_sent {
                0
            } else {
                eprintln!("error: the reader did not receive every byte sent");
                1
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

fn measure(cfg: &FloorCfg) -> io::Result<FloorReport> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut readers = Vec::with_capacity(cfg.connections);
    let mut writers = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        let r = TcpStream::connect(addr)?;
        let (w, _) = listener.accept()?;
        w.set_nodelay(true)?;
        w.set_nonblocking(true)?;
        r.set_nonblocking(true)?;
        readers.push(r);
        writers.push(w);
    }
    drop(listener);

    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, received, cpu) = (stop.clone(), received.clone(), cfg.reader_cpu);
        std::thread::spawn(move || read_all(readers, cpu, &stop, &received))
    };

    if let Some(cpu) = cfg.sender_cpu {
        pin(cpu)?;
    }
    let frame = vec![b'x'; cfg.size];
    let fds: Vec<i32> = writers.iter().map(|w| w.as_raw_fd()).collect();
    let mut ring = match cfg.mode {
        SendMode::Send => None,
        SendMode::Uring | SendMode::UringFixed => {
            let ring = io_uring::IoUring::new(cfg.group.next_power_of_two().max(8) as u32)?;
            if cfg.mode == SendMode::UringFixed {
                ring.submitter().register_files(&fds)?;
            }
            Some(ring)
        }
    };
    let groups = (cfg.connections / cfg.group).max(1);
    let (mut sends, mut short, mut bytes) = (0u64, 0u64, 0u64);
    let mut cpu = Duration::ZERO;
    let started = Instant::now();
    for burst in 0..cfg.bursts {
        let first = (burst % groups) * cfg.group;
        let group = first..first + cfg.group;
        let t0 = thread_cpu_time();
        let written = match ring.as_mut() {
            None => send_each(&fds[group], &frame),
            Some(ring) => send_uring(ring, &fds, group, &frame, cfg.mode)?,
        };
        cpu += thread_cpu_time().saturating_sub(t0);
        for n in written {
            sends += 1;
            if n != frame.len() {
                short += 1;
            }
            bytes += n as u64;
        }
        std::thread::sleep(cfg.interval);
    }
    let wall = started.elapsed();

    // Wait (bounded) until the reader has everything, then stop it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < bytes && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let reader_cpu = reader
        .join()
        .map_err(|_| io::Error::other("reader thread panicked"))??;
    drop(writers);
    let per_send = |d: Duration| d.as_secs_f64() * 1e6 / sends.max(1) as f64;
    Ok(FloorReport {
        mode: "floor",
        send_mode: cfg.mode,
        connections: cfg.connections,
        group: cfg.group,
        bursts: cfg.bursts,
        size: cfg.size,
        sends,
        short_sends: short,
        bytes_sent: bytes,
        bytes_received: received.load(Ordering::Relaxed),
        sender_cpu_us_per_send: per_send(cpu),
        reader_cpu_us_per_send: per_send(reader_cpu),
        wall_s: wall.as_secs_f64(),
    })
}

/// One non-blocking `send` per socket; returns the bytes each one took.
fn send_each(fds: &[i32], frame: &[u8]) -> Vec<usize> {
    fds.iter()
        .map(|&fd| {
            // SAFETY: fd is an open socket owned by the caller; frame outlives the call.
            let n = unsafe {
                libc::send(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            n.max(0) as usize
        })
        .collect()
}

/// The same sends as one io_uring submission.
fn send_uring(
    ring: &mut io_uring::IoUring,
    fds: &[i32],
    group: std::ops::Range<usize>,
    frame: &[u8],
    mode: SendMode,
) -> io::Result<Vec<usize>> {
    use io_uring::{opcode, types};
    let n = group.len();
    {
        let mut sq = ring.submission();
        for (k, i) in group.enumerate() {
            let (ptr, len) = (frame.as_ptr(), frame.len() as u32);
            let entry = if mode == SendMode::UringFixed {
                opcode::Send::new(types::Fixed(i as u32), ptr, len)
            } else {
                opcode::Send::new(types::Fd(fds[i]), ptr, len)
            }
            // MSG_DONTWAIT: a full socket completes with EAGAIN at once
            // instead of being parked until it is writable.
            .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            .build()
            .user_data(k as u64);
            // SAFETY: frame and the sockets outlive the submission, which is
            // waited for below.
            unsafe { sq.push(&entry) }.map_err(|_| io::Error::other("submission queue full"))?;
        }
    }
    ring.submit_and_wait(n)?;
    let mut written = vec![0; n];
    for cqe in ring.completion() {
        if let Some(w) = written.get_mut(cqe.user_data() as usize) {
            *w = cqe.result().max(0) as usize;
        }
    }
    Ok(written)
}

/// Drains every socket with epoll until told to stop; returns its CPU time.
fn read_all(
    readers: Vec<TcpStream>,
    cpu: Option<usize>,
    stop: &AtomicBool,
    received: &AtomicU64,
) -> io::Result<Duration> {
    use mio::{net::TcpStream as MioStream, Events, Interest, Poll, Token};
    if let Some(cpu) = cpu {
        pin(cpu)?;
    }
    let t0 = thread_cpu_time();
    let mut poll = Poll::new()?;
    let mut streams: Vec<MioStream> = readers.into_iter().map(MioStream::from_std).collect();
    for (i, s) in streams.iter_mut().enumerate() {
        poll.registry().register(s, Token(i), Interest::READABLE)?;
    }
    let mut events = Events::with_capacity(1024);
    let mut buf = vec![0u8; 64 * 1024];
    while !stop.load(Ordering::Relaxed) {
        poll.poll(&mut events, Some(Duration::from_millis(50)))?;
        for ev in events.iter() {
            let Some(s) = streams.get_mut(ev.token().0) else {
                continue;
            };
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        received.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
        }
    }
    Ok(thread_cpu_time().saturating_sub(t0))
}

fn pin(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; sched_setaffinity reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::other(format!(
                "cannot pin to core {cpu}: {}",
                io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(mode: SendMode) -> FloorCfg {
        FloorCfg {
            connections: 40,
            group: 10,
            bursts: 20,
            interval: Duration::from_micros(100),
            size: 150,
            mode,
            sender_cpu: None,
            reader_cpu: None,
        }
    }

    #[test]
    fn every_mode_delivers_every_byte() {
        for mode in [SendMode::Send, SendMode::Uring, SendMode::UringFixed] {
            let r = match measure(&small(mode)) {
                Ok(r) => r,
                // io_uring can be forbidden (seccomp in containers): say so.
                Err(e) if mode != SendMode::Send => {
                    panic!("io_uring unavailable on this machine ({mode:?}): {e}")
                }
                Err(e) => panic!("{e}"),
            };
            assert_eq!(r.sends, 200, "{mode:?}");
            assert_eq!(r.short_sends, 0, "{mode:?}");
            assert_eq!(r.bytes_sent, 200 * 150, "{mode:?}");
            assert_eq!(r.bytes_received, r.bytes_sent, "{mode:?}");
            assert!(r.sender_cpu_us_per_send > 0.0, "{mode:?}");
        }
    }
}
