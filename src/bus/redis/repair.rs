//! What this node has received of each subscribed history room, so that it
//! notices what it missed and repairs it from the room's history.
//!
//! Messages of a history room arrive stamped (`{"seq":N,"epoch":"E",…`,
//! [`protocol::peek_stamp`]). Per room the node keeps the last (epoch, seq)
//! it handed to its clients. The next message is either the next seq (pass),
//! an old one (a duplicate, after a repair: dropped), a jump (a gap on the
//! live stream: the missing seqs are read from history first), or of another
//! epoch (the room's history was lost in Redis: pass, nothing to repair).
//! After the subscriber connection is replaced, every tracked room is read
//! from its last seq before the new stream is: what was published while the
//! node was not subscribed comes from history, the rest arrives live.
//!
//! A room is forgotten when it is unsubscribed: the next subscription starts
//! from whatever arrives first (a client joining then asks history itself).

use std::collections::HashMap;

use crate::protocol;

/// What to do with one received message of a history room.
#[derive(Debug, PartialEq, Eq)]
pub enum Fate {
    /// Deliver it.
    Pass,
    /// Already delivered (or older than what was): drop it.
    Duplicate,
    /// Deliver the messages after `after` (up to this one) from history first.
    Gap { after: u64 },
}

#[derive(Default)]
pub struct Seen {
    /// Topic key → (epoch, last seq delivered).
    rooms: HashMap<String, (String, u64)>,
}

impl Seen {
    /// Decide the fate of a message of room `key` stamped `seq`/`epoch`,
    /// and count it as delivered unless it is a duplicate.
    pub fn classify(&mut self, key: &str, seq: u64, epoch: &str) -> Fate {
        let Some((known, last)) = self.rooms.get_mut(key) else {
            self.rooms.insert(key.to_owned(), (epoch.to_owned(), seq));
            return Fate::Pass;
        };
        if known != epoch {
            *known = epoch.to_owned();
            *last = seq;
            return Fate::Pass;
        }
        let after = *last;
        if seq <= after {
            return Fate::Duplicate;
        }
        *last = seq;
        match seq == after + 1 {
            true => Fate::Pass,
            false => Fate::Gap { after },
        }
    }

    /// A payload's stamp, if it is a history message.
    pub fn stamp(payload: &[u8]) -> Option<(u64, &str)> {
        protocol::peek_stamp(payload)
    }

    /// The room is no longer subscribed.
    pub fn forget(&mut self, key: &str) {
        self.rooms.remove(key);
    }

    /// Every tracked room: (key, epoch, last seq).
    pub fn rooms(&self) -> Vec<(String, String, u64)> {
        self.rooms
            .iter()
            .map(|(k, (e, s))| (k.clone(), e.clone(), *s))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_duplicate_gap_and_a_new_epoch() {
        let mut seen = Seen::default();
        assert_eq!(seen.classify("room:a", 5, "e1"), Fate::Pass);
        assert_eq!(seen.classify("room:a", 6, "e1"), Fate::Pass);
        assert_eq!(seen.classify("room:a", 6, "e1"), Fate::Duplicate);
        assert_eq!(seen.classify("room:a", 3, "e1"), Fate::Duplicate);
        assert_eq!(seen.classify("room:a", 9, "e1"), Fate::Gap { after: 6 });
        assert_eq!(seen.classify("room:a", 10, "e1"), Fate::Pass);
        // History lost in Redis: the new epoch starts over at 1.
        assert_eq!(seen.classify("room:a", 1, "e2"), Fate::Pass);
        assert_eq!(seen.classify("room:a", 2, "e2"), Fate::Pass);
        // Rooms are independent; a forgotten room starts from what arrives.
        assert_eq!(seen.classify("room:b", 40, "e1"), Fate::Pass);
        seen.forget("room:a");
        assert_eq!(seen.classify("room:a", 7, "e2"), Fate::Pass);
        assert_eq!(seen.rooms().len(), 2);
    }
}
