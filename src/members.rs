//! The members of one room: O(1) join and leave, and a snapshot the fan-out
//! can iterate with no lock held.
//!
//! The list is an `Arc<Vec<T>>`. The fan-out clones the `Arc` (one atomic
//! increment) and walks the vector after the room lock is released. Joins
//! and leaves change the vector in place (`Arc::make_mut`); only when a
//! fan-out is walking it at that moment do they copy it once. Leaves are
//! `swap_remove` through an index map, so a room of 100,000 viewers that
//! empties at once costs 100,000 small steps, not 100,000 copies of the list.

use std::collections::HashMap;
use std::sync::Arc;

/// Something with a node-unique key.
pub trait Keyed {
    fn key(&self) -> u64;
}

pub struct Members<T> {
    list: Arc<Vec<T>>,
    /// key → position in `list`.
    index: HashMap<u64, usize>,
}

impl<T> Default for Members<T> {
    fn default() -> Self {
        Members {
            list: Arc::new(Vec::new()),
            index: HashMap::new(),
        }
    }
}

impl<T: Keyed + Clone> Members<T> {
    /// Add a member; `false` if it was already there.
    pub fn insert(&mut self, member: T) -> bool {
        let key = member.key();
        if self.index.contains_key(&key) {
            return false;
        }
        let list = Arc::make_mut(&mut self.list);
        self.index.insert(key, list.len());
        list.push(member);
        true
    }

    /// Remove the member with `key`; `false` if it was not there.
    pub fn remove(&mut self, key: u64) -> bool {
        let Some(pos) = self.index.remove(&key) else {
            return false;
        };
        let list = Arc::make_mut(&mut self.list);
        list.swap_remove(pos);
        if let Some(moved) = list.get(pos) {
            self.index.insert(moved.key(), pos);
        }
        true
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// The current members, to iterate without holding the room lock.
    pub fn snapshot(&self) -> Arc<Vec<T>> {
        self.list.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Keyed for u64 {
        fn key(&self) -> u64 {
            *self
        }
    }

    fn sorted(m: &Members<u64>) -> Vec<u64> {
        let mut v = m.snapshot().to_vec();
        v.sort();
        v
    }

    #[test]
    fn insert_and_remove_keep_the_index_consistent() {
        let mut m = Members::default();
        for k in 0..10u64 {
            assert!(m.insert(k));
        }
        assert!(!m.insert(3));
        for k in [0u64, 9, 4, 4, 7] {
            m.remove(k);
        }
        assert_eq!(sorted(&m), [1, 2, 3, 5, 6, 8]);
        for k in [1u64, 2, 3, 5, 6, 8] {
            assert!(m.remove(k), "{k} should be found through the index");
        }
        assert!(m.is_empty());
    }

    #[test]
    fn a_snapshot_taken_before_a_change_is_not_affected_by_it() {
        let mut m = Members::default();
        m.insert(1u64);
        m.insert(2);
        let before = m.snapshot();
        m.remove(1);
        m.insert(3);
        assert_eq!(*before, vec![1, 2]);
        assert_eq!(sorted(&m), [2, 3]);
    }
}
