//! The edge of a node: accepting TCP connections and bounding what a
//! connection may cost before it is a WebSocket client.
//!
//! Invariants:
//! - Every HTTP connection (not yet upgraded, or plain HTTP keep-alive) is
//!   *pending*. At most `server.max_pending_connections` are pending at once;
//!   a new one beyond that evicts the oldest, so connections that trickle a
//!   handshake (or say nothing) can delay new clients but never lock them out.
//! - A pending connection must deliver a complete request head within
//!   `server.header_timeout` of being accepted, and again within that time of
//!   its previous response (so it is also the keep-alive idle timeout), and
//!   must have its first response within `server.handshake_timeout`.
//! - The node never plans to use more file descriptors than the process
//!   may open: [`FdBudget`] splits the open-file limit between WebSocket
//!   clients (`limits.max_connections`) and pending connections, keeping a
//!   reserve for Redis and the runtime. If `accept` still fails (EMFILE), the
//!   loop backs off and retries; connections already open keep being served.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::gateway::Gateway;
use crate::server::{self, Role};

/// File descriptors kept free for everything that is not a client: Redis
/// connections, the runtime's own descriptors, log files, a `/healthz` probe.
pub const FD_RESERVE: u64 = 64;

/// How the open-file limit is shared, decided once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// WebSocket clients at once (the effective `limits.max_connections`; never 0).
    pub max_connections: usize,
    /// Pending HTTP connections at once (the effective `server.max_pending_connections`).
    pub max_pending: usize,
}

impl FdBudget {
    /// Fit the configured limits (`max_connections` 0 = as many as possible)
    /// into `fd_limit` open files: pending connections get at most a quarter
    /// of what is left after [`FD_RESERVE`], clients the rest.
    pub fn new(fd_limit: u64, max_connections: usize, max_pending: usize) -> FdBudget {
        let usable = fd_limit.saturating_sub(FD_RESERVE).max(2) as usize;
        let max_pending = max_pending.min(usable / 4).max(1);
        let room = usable - max_pending;
        let max_connections = match max_connections {
            0 => room,
            n => n.min(room),
        };
        FdBudget {
            max_connections,
            max_pending,
        }
    }
}

/// Raise the soft open-file limit to the hard one (as Go and nginx do), and
/// return the limit the process now runs with (`None` where unknown).
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return None;
            }
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim = raised;
                }
            }
        }
        Some(lim.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The pending connections, oldest first, each with the token that evicts it.
#[derive(Default)]
pub struct Pending {
    inner: Mutex<PendingInner>,
}

#[derive(Default)]
struct PendingInner {
    next: u64,
    open: BTreeMap<u64, CancellationToken>,
}

/// A connection's place among the pending ones; dropping it frees the place.
pub struct PendingGuard {
    pending: Arc<Pending>,
    id: u64,
    /// Cancelled when a newer connection needs the place.
    pub evicted: CancellationToken,
}

impl Pending {
    /// Register a new connection; if `max` are already pending, the oldest is
    /// evicted (its token cancelled) to make room. Returns the new place and
    /// whether someone was evicted.
    pub fn enter(self: &Arc<Self>, max: usize) -> (PendingGuard, bool) {
        let mut inner = self.inner.lock();
        let mut evicted_someone = false;
        while inner.open.len() >= max.max(1) {
            if let Some((_, token)) = inner.open.pop_first() {
                token.cancel();
                evicted_someone = true;
            }
        }
        let id = inner.next;
        inner.next += 1;
        let evicted = CancellationToken::new();
        inner.open.insert(id, evicted.clone());
        (
            PendingGuard {
                pending: self.clone(),
                id,
                evicted,
            },
            evicted_someone,
        )
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().open.len()
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.pending.inner.lock().open.remove(&self.id);
    }
}

/// Everything one listener's connections share.
#[derive(Clone)]
pub struct Edge {
    pub gw: Arc<Gateway>,
    pub role: Role,
    pub connections: TaskTracker,
    pub pending: Arc<Pending>,
    pub stop: CancellationToken,
}

/// Accept connections until `stop`, each served on a task of its own.
pub async fn accept_loop(listener: TcpListener, edge: Edge) {
    let mut backoff = Duration::ZERO;
    loop {
        let stream = tokio::select! {
            _ = edge.stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE/ENFILE/ENOBUFS and the like: the connection stays
                    // in the kernel's backlog. Back off (doubling up to 1 s) so
                    // the loop does not spin; open connections are unaffected.
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                    edge.gw.metrics.accept_errors.inc();
                    tracing::warn!(error = %e, retry_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::select! {
                        _ = edge.stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    continue;
                }
            },
        };
        backoff = Duration::ZERO;
        let (stream, peer) = stream;
        let _ = stream.set_nodelay(true);
        let (guard, evicted) = edge
            .pending
            .enter(edge.gw.config.server.max_pending_connections);
        if evicted {
            edge.gw
                .metrics
                .handshakes_aborted
                .with_label_values(&["evicted"])
                .inc();
        }
        tokio::spawn(serve_http(stream, peer, edge.clone(), guard));
    }
}

/// One HTTP connection until it ends, upgrades to WebSocket, is evicted, or
/// misses a deadline.
async fn serve_http(stream: TcpStream, peer: SocketAddr, edge: Edge, guard: PendingGuard) {
    let metrics = edge.gw.metrics.clone();
    metrics.pending_connections.inc();
    let server = &edge.gw.config.server;
    let handshake_deadline = tokio::time::Instant::now() + server.handshake_timeout;
    let answered = Arc::new(AtomicBool::new(false));
    let service = {
        let edge = edge.clone();
        let answered = answered.clone();
        hyper::service::service_fn(move |req| {
            let edge = edge.clone();
            let answered = answered.clone();
            async move {
                let resp = server::route(&edge, peer, req).await;
                answered.store(true, Ordering::Release);
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let mut deadline_armed = true;
    let aborted = loop {
        tokio::select! {
            result = &mut conn => {
                break match result {
                    Err(e) if e.is_timeout() => Some("header_timeout"),
                    Err(e) => {
                        tracing::debug!(error = %e, "http connection ended with an error");
                        None
                    }
                    Ok(()) => None,
                };
            }
            _ = edge.stop.cancelled() => break None,
            _ = guard.evicted.cancelled() => break None, // counted by the evictor
            _ = tokio::time::sleep_until(handshake_deadline), if deadline_armed => {
                if !answered.load(Ordering::Acquire) {
                    break Some("handshake_timeout");
                }
                deadline_armed = false;
            }
        }
    };
    if let Some(reason) = aborted {
        metrics
            .handshakes_aborted
            .with_label_values(&[reason])
            .inc();
    }
    metrics.pending_connections.dec();
    drop(guard);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_fits_clients_and_pending_connections_into_the_open_file_limit() {
        // Plenty of descriptors: the configured limits stand.
        let b = FdBudget::new(20_000, 10_000, 1024);
        assert_eq!((b.max_connections, b.max_pending), (10_000, 1024));
        // No client limit: everything the reserve and pending leave.
        let b = FdBudget::new(20_000, 0, 1024);
        assert_eq!(b.max_connections, 20_000 - 64 - 1024);
        // A small limit: pending gets a quarter, clients the rest, and the
        // total stays below the limit minus the reserve.
        let b = FdBudget::new(256, 100_000, 1024);
        assert_eq!((b.max_connections, b.max_pending), (144, 48));
        assert!(b.max_connections + b.max_pending + FD_RESERVE as usize <= 256);
        // Absurdly small limits still allow one of each.
        let b = FdBudget::new(3, 0, 0);
        assert!(b.max_connections >= 1 && b.max_pending >= 1);
    }

    #[test]
    fn a_full_pending_set_evicts_its_oldest_member() {
        let pending = Arc::new(Pending::default());
        let (a, evicted) = pending.enter(2);
        assert!(!evicted);
        let (b, _) = pending.enter(2);
        let (c, evicted) = pending.enter(2);
        assert!(evicted);
        assert!(a.evicted.is_cancelled());
        assert!(!b.evicted.is_cancelled() && !c.evicted.is_cancelled());
        assert_eq!(pending.len(), 2);
        drop(a); // an evicted guard dropping late must not remove anyone else
        assert_eq!(pending.len(), 2);
        drop(b);
        drop(c);
        assert_eq!(pending.len(), 0);
    }
}
