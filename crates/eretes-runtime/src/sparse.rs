//! Giving back what a burst left in collections that never shrink by
//! themselves.
//!
//! A hash map keeps the largest capacity it ever had: a node that once ran
//! 20,000 tasks would keep tables for 20,000 in its running set, its cache
//! and its command subscriptions for as long as it lives, and the
//! allocator could not return the pages around them either. Handlers that
//! keep a table per running task (`eretes-exec`'s) use it too. Each such
//! table is checked where entries leave it, and rebuilt only once it lost
//! three quarters of them: O(1) amortized per entry.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// Tables smaller than this are left alone: shrinking them saves nothing.
const SMALLEST: usize = 64;

/// A collection with spare capacity to give back.
pub trait Sparse {
    /// Shrink to twice the entries held (so that the next few inserts do
    /// not grow it again at once) when under a quarter of it is used.
    fn shrink_if_sparse(&mut self);
}

impl<K: Eq + Hash, V> Sparse for HashMap<K, V> {
    fn shrink_if_sparse(&mut self) {
        if self.capacity() > SMALLEST && self.len() * 4 < self.capacity() {
            self.shrink_to(self.len() * 2);
        }
    }
}

impl<T: Eq + Hash> Sparse for HashSet<T> {
    fn shrink_if_sparse(&mut self) {
        if self.capacity() > SMALLEST && self.len() * 4 < self.capacity() {
            self.shrink_to(self.len() * 2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mostly_empty_table_shrinks_and_a_full_or_small_one_does_not() {
        let mut map: HashMap<u32, u32> = (0..10_000).map(|n| (n, n)).collect();
        let full = map.capacity();
        map.shrink_if_sparse();
        assert_eq!(map.capacity(), full, "a full table keeps its room");
        map.retain(|n, _| *n < 100);
        map.shrink_if_sparse();
        assert!(map.capacity() < 400, "{} after shrinking", map.capacity());
        assert!(map.capacity() >= 200);
        assert_eq!(map.len(), 100);
        let mut small: HashSet<u32> = (0..50).collect();
        small.clear();
        let before = small.capacity();
        small.shrink_if_sparse();
        assert_eq!(small.capacity(), before);
    }
}
