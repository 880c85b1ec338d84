//! Closing connections whose token expires (`auth.close_on_expiry`): one
//! node-wide task and a queue of deadlines, not a timer per connection.
//!
//! The queue holds one entry per connection, whatever its refreshes: a
//! refresh only changes the peer's current expiry, and when the entry comes
//! due and the token has been extended, it is put back at the new expiry.
//! (A refresh to an *earlier* expiry takes effect at the old deadline.) So a
//! client refreshing as fast as its rate allows costs no memory. Deadlines
//! are Unix seconds (`exp`), and a connection is closed with 4003 at most
//! about a second after its token expires (plus `auth.leeway`, as when it
//! was checked).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::protocol::now_ms;
use crate::ws::close;

/// Token deadlines of this node's connections: `(exp, peer seq)`, earliest first.
#[derive(Default)]
pub struct Expiries {
    queue: Mutex<BinaryHeap<Reverse<(u64, u64)>>>,
    /// An earlier deadline than the task waits for was scheduled.
    sooner: Notify,
}

impl Expiries {
    /// Close connection `seq` once `deadline` (Unix seconds) has passed,
    /// unless its token has been extended by then.
    pub fn schedule(&self, deadline: u64, seq: u64) {
        let mut queue = self.queue.lock();
        let earliest = queue.peek().is_none_or(|Reverse((d, _))| deadline < *d);
        queue.push(Reverse((deadline, seq)));
        if earliest {
            self.sooner.notify_one();
        }
    }

    /// Take every entry due at `now` (Unix seconds); and the next deadline.
    fn due(&self, now: u64) -> (Vec<(u64, u64)>, Option<u64>) {
        let mut queue = self.queue.lock();
        let mut due = Vec::new();
        while let Some(Reverse((deadline, seq))) = queue.peek().copied() {
            if deadline > now {
                return (due, Some(deadline));
            }
            queue.pop();
            due.push((deadline, seq));
        }
        (due, None)
    }
}

/// The task: close each connection whose token expired, with 4003.
pub async fn run(gw: Arc<Gateway>, stop: CancellationToken) {
    let leeway = gw.config.auth.leeway.as_secs();
    loop {
        let now = now_ms() / 1000;
        let (due, next) = gw.expiries.due(now.saturating_sub(leeway));
        for (deadline, seq) in due {
            let Some(peer) = gw.hub.peer(seq) else {
                continue;
            };
            let current = peer.token_expires();
            if current > deadline {
                gw.expiries.schedule(current, seq);
            } else if peer.closing().is_none() {
                gw.metrics.token_expiries.inc();
                peer.close(close::TOKEN_EXPIRED, "token expired", true);
            }
        }
        // Wake a little after the next deadline (exp has second resolution).
        let wait = next.map_or(Duration::from_secs(3600), |d| {
            Duration::from_millis((d + leeway + 1).saturating_sub(now) * 1000)
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = gw.expiries.sooner.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_due_in_deadline_order() {
        let e = Expiries::default();
        e.schedule(30, 1);
        e.schedule(10, 2);
        e.schedule(20, 3);
        assert_eq!(e.due(5), (vec![], Some(10)));
        assert_eq!(e.due(20), (vec![(10, 2), (20, 3)], Some(30)));
        assert_eq!(e.due(100), (vec![(30, 1)], None));
    }
}
