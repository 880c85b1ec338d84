//! What this node has received of each subscribed history room, so that it
//! notices what it missed and repairs it from the room's history.
//!
//! Messages of a history room arrive stamped (`{"seq":N,"epoch":"E",…`,
//! [`protocol::peek_stamp`]). Per room the node keeps the last (epoch, seq)
//! it handed to its clients. The next message is either the next seq (pass),
//! an old one (a duplicate, after a repair: dropped), a jump (a gap on the
//! live stream: the missing seqs are read from history first), or of another
//! epoch (the room's history was lost in Redis and started over: what came
//! before it in the new epoch is a gap too).
//! After the subscriber connection is replaced, every tracked room is read
//! from its last seq before the new stream is: what was published while the
//! node was not subscribed comes from history, the rest arrives live.
//!
//! A room with nothing received yet is tracked from the position its first
//! held join read ([`Seen::position`]; the lowest, if several), so that an
//! outage before its first message is repaired too. A room is forgotten
//! when it is unsubscribed.

use std::collections::HashMap;

use crate::protocol::{self, Stamp};

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
    rooms: HashMap<String, Entry>,
}

struct Entry {
    /// [`protocol::epoch_key`] of the room's epoch.
    epoch: u64,
    /// The last seq delivered (or, `hinted`, the lowest position joined at).
    last: u64,
    /// Nothing received yet: `last` comes from joins.
    hinted: bool,
}

impl Seen {
    /// Decide the fate of a message of room `key` stamped `seq`/`epoch`,
    /// and count it as delivered unless it is a duplicate.
    pub fn classify(&mut self, key: &str, seq: u64, epoch: &str) -> Fate {
        let epoch = protocol::epoch_key(epoch);
        let Some(entry) = self.rooms.get_mut(key) else {
            self.rooms.insert(
                key.to_owned(),
                Entry {
                    epoch,
                    last: seq,
                    hinted: false,
                },
            );
            return Fate::Pass;
        };
        entry.hinted = false;
        if entry.epoch != epoch {
            // The room's history started over: all of the new epoch is news.
            (entry.epoch, entry.last) = (epoch, seq);
            return match seq {
                1 => Fate::Pass,
                _ => Fate::Gap { after: 0 },
            };
        }
        let after = entry.last;
        if seq <= after {
            return Fate::Duplicate;
        }
        entry.last = seq;
        match seq == after + 1 {
            true => Fate::Pass,
            false => Fate::Gap { after },
        }
    }

    /// A payload's stamp, if it is a history message.
    pub fn stamp(payload: &[u8]) -> Option<(u64, &str)> {
        protocol::peek_stamp(payload)
    }

    /// A client of this node joined room `key` at position `at` (what its
    /// join read). Tracks a room that has received nothing yet from there.
    pub fn position(&mut self, key: &str, at: Stamp) {
        match self.rooms.get_mut(key) {
            None => {
                self.rooms.insert(
                    key.to_owned(),
                    Entry {
                        epoch: at.epoch,
                        last: at.seq,
                        hinted: true,
                    },
                );
            }
            Some(e) if e.hinted && e.epoch == at.epoch => e.last = e.last.min(at.seq),
            Some(_) => {}
        }
    }

    /// The room is no longer subscribed.
    pub fn forget(&mut self, key: &str) {
        self.rooms.remove(key);
    }

    /// Every tracked room: (key, epoch key, last seq).
    pub fn rooms(&self) -> Vec<(String, u64, u64)> {
        self.rooms
            .iter()
            .map(|(k, e)| (k.clone(), e.epoch, e.last))
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
        // History lost in Redis: the new epoch starts over at 1…
        assert_eq!(seen.classify("room:a", 1, "e2"), Fate::Pass);
        assert_eq!(seen.classify("room:a", 2, "e2"), Fate::Pass);
        // …and what it had before its first message here is missing.
        assert_eq!(seen.classify("room:a", 4, "e3"), Fate::Gap { after: 0 });
        // Rooms are independent; a forgotten room starts from what arrives.
        assert_eq!(seen.classify("room:b", 40, "e1"), Fate::Pass);
        seen.forget("room:a");
        assert_eq!(seen.classify("room:a", 7, "e2"), Fate::Pass);
        assert_eq!(seen.rooms().len(), 2);
    }

    #[test]
    fn a_room_is_tracked_from_the_lowest_position_joined_until_it_receives() {
        let mut seen = Seen::default();
        let e = protocol::epoch_key("e1");
        seen.position("room:a", Stamp { seq: 10, epoch: e });
        seen.position("room:a", Stamp { seq: 8, epoch: e });
        assert_eq!(seen.rooms(), [("room:a".to_string(), e, 8)]);
        // 9 and 10 may still be needed by the client that joined at 8.
        assert_eq!(seen.classify("room:a", 9, "e1"), Fate::Pass);
        // Received: later joins no longer move it.
        seen.position("room:a", Stamp { seq: 3, epoch: e });
        assert_eq!(seen.classify("room:a", 10, "e1"), Fate::Pass);
        assert_eq!(seen.rooms(), [("room:a".to_string(), e, 10)]);
    }
}
