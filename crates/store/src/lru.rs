//! A byte-bounded least-recently-used index, shared by the memory cache and the disk index.
//!
//! Entries are ordered by a logical clock: a `BTreeMap` from tick to key gives the oldest entry
//! in O(log n) and a `HashMap` from key to (tick, value) gives lookups. That is all the chunk
//! store needs; an intrusive list would save a little memory but not enough to matter at the
//! chunk counts of real layers (one entry per chunk, thousands to a few million).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

pub(crate) struct Lru<K, V> {
    entries: HashMap<K, (u64, u64, V)>,
    order: BTreeMap<u64, K>,
    tick: u64,
    bytes: u64,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    pub(crate) fn new() -> Self {
        Lru {
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
        }
    }

    /// Total of the sizes of all entries.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Looks `key` up and marks it most recently used.
    pub(crate) fn get(&mut self, key: &K) -> Option<V> {
        self.tick += 1;
        let tick = self.tick;
        let (old, _, v) = self.entries.get_mut(key)?;
        let prev = std::mem::replace(old, tick);
        let k = self.order.remove(&prev).expect("order and entries agree");
        self.order.insert(tick, k);
        Some(v.clone())
    }

    pub(crate) fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// The size `key` was inserted with, without touching the order.
    pub(crate) fn size_of(&self, key: &K) -> Option<u64> {
        self.entries.get(key).map(|e| e.1)
    }

    /// Inserts (or refreshes) an entry of `size` bytes as the most recently used.
    pub(crate) fn insert(&mut self, key: K, size: u64, value: V) {
        self.remove(&key);
        self.tick += 1;
        self.order.insert(self.tick, key.clone());
        self.entries.insert(key, (self.tick, size, value));
        self.bytes += size;
    }

    /// Inserts an entry as the *least* recently used of those inserted so far with this call
    /// (used when rebuilding the disk index oldest-first).
    pub(crate) fn insert_aged(&mut self, key: K, size: u64, value: V, age_rank: u64) {
        self.remove(&key);
        // Ranks are below every tick handed out later by `insert`/`get`.
        self.tick = self.tick.max(age_rank);
        self.order.insert(age_rank, key.clone());
        self.entries.insert(key, (age_rank, size, value));
        self.bytes += size;
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let (tick, size, v) = self.entries.remove(key)?;
        self.order.remove(&tick);
        self.bytes -= size;
        Some(v)
    }

    /// Removes every entry `keep` rejects, keeping the order of the others; returns the removed
    /// keys with their sizes.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) -> Vec<(K, u64)> {
        let mut removed = Vec::new();
        for (tick, k) in std::mem::take(&mut self.order) {
            if keep(&k) {
                self.order.insert(tick, k);
            } else {
                let (_, size, _) = self.entries.remove(&k).expect("order and entries agree");
                self.bytes -= size;
                removed.push((k, size));
            }
        }
        removed
    }

    /// Removes and returns the least recently used entry.
    pub(crate) fn pop_oldest(&mut self) -> Option<(K, V)> {
        let (_, key) = self.order.pop_first()?;
        let (_, size, v) = self.entries.remove(&key).expect("order and entries agree");
        self.bytes -= size;
        Some((key, v))
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn evicts_least_recently_used() {
        let mut l: Lru<&str, u32> = Lru::new();
        l.insert("a", 10, 1);
        l.insert("b", 20, 2);
        l.insert("c", 30, 3);
        assert_eq!(l.bytes(), 60);
        assert_eq!(l.get(&"a"), Some(1));
        assert_eq!(l.pop_oldest(), Some(("b", 2)));
        assert_eq!(l.pop_oldest(), Some(("c", 3)));
        assert_eq!(l.bytes(), 10);
        l.insert("a", 5, 9);
        assert_eq!(l.bytes(), 5);
        assert_eq!(l.len(), 1);
        assert_eq!(l.remove(&"a"), Some(9));
        assert_eq!(l.pop_oldest(), None);
        assert_eq!(l.bytes(), 0);
    }

    #[test]
    fn retain_keeps_order_and_accounts_bytes() {
        let mut l: Lru<u32, ()> = Lru::new();
        for k in 1..=4 {
            l.insert(k, k as u64, ());
        }
        assert_eq!(l.retain(|k| k % 2 == 0), vec![(1, 1), (3, 3)]);
        assert_eq!(l.bytes(), 6);
        assert_eq!(l.pop_oldest().map(|x| x.0), Some(2));
        assert_eq!(l.pop_oldest().map(|x| x.0), Some(4));
    }

    #[test]
    fn aged_entries_go_first() {
        let mut l: Lru<u32, ()> = Lru::new();
        l.insert_aged(1, 1, (), 2);
        l.insert_aged(2, 1, (), 1);
        l.insert(3, 1, ());
        assert_eq!(l.pop_oldest().map(|x| x.0), Some(2));
        assert_eq!(l.pop_oldest().map(|x| x.0), Some(1));
        assert_eq!(l.pop_oldest().map(|x| x.0), Some(3));
    }
}
