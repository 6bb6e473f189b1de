//! A free list over the integers `0..capacity`: KV pages and request slots are both handed out from one.
//!
//! A stack, so the most recently freed index is reused first (its page is likely still warm in the worker's
//! caches) and both operations are O(1). A bitmap catches double frees and frees of indices never handed out:
//! either would let two requests share a page and silently corrupt each other's KV cache, so it panics.

#[derive(Clone, Debug)]
pub(crate) struct IndexPool {
    free: Vec<u32>,
    in_use: Vec<bool>,
}

impl IndexPool {
    pub fn new(capacity: u32) -> Self {
        // Reversed so that a fresh pool hands out 0, 1, 2, ...: easier to read in tests and dumps.
        IndexPool { free: (0..capacity).rev().collect(), in_use: vec![false; capacity as usize] }
    }

    pub fn available(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn alloc(&mut self) -> Option<u32> {
        let i = self.free.pop()?;
        self.in_use[i as usize] = true;
        Some(i)
    }

    pub fn free(&mut self, i: u32) {
        let used = self.in_use.get_mut(i as usize).unwrap_or_else(|| panic!("index {i} is outside the pool"));
        assert!(*used, "index {i} freed twice");
        *used = false;
        self.free.push(i);
    }

    pub fn is_in_use(&self, i: u32) -> bool {
        self.in_use.get(i as usize).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn hands_out_in_order_then_reuses_the_last_freed() {
        let mut p = IndexPool::new(3);
        assert_eq!((p.alloc(), p.alloc()), (Some(0), Some(1)));
        p.free(0);
        assert_eq!(p.alloc(), Some(0));
        assert_eq!(p.alloc(), Some(2));
        assert_eq!(p.alloc(), None);
        assert_eq!(p.available(), 0);
    }

    #[test]
    #[should_panic(expected = "freed twice")]
    fn double_free_panics() {
        let mut p = IndexPool::new(2);
        let i = p.alloc().unwrap();
        p.free(i);
        p.free(i);
    }

    #[test]
    #[should_panic(expected = "outside the pool")]
    fn foreign_index_panics() {
        IndexPool::new(2).free(2);
    }

    proptest! {
        /// Against a model: what is handed out is never handed out again until freed, and nothing is lost.
        #[test]
        fn matches_a_set_model(cap in 1u32..40, ops in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 0..200)) {
            let mut pool = IndexPool::new(cap);
            let mut held = BTreeSet::new();
            for (alloc, pick) in ops {
                if alloc || held.is_empty() {
                    match pool.alloc() {
                        Some(i) => prop_assert!(i < cap && held.insert(i), "{i} handed out twice"),
                        None => prop_assert_eq!(held.len() as u32, cap),
                    }
                } else {
                    let i = *held.iter().nth(pick.index(held.len())).unwrap();
                    held.remove(&i);
                    pool.free(i);
                }
                prop_assert_eq!(pool.available() + held.len() as u32, cap);
                for i in 0..cap {
                    prop_assert_eq!(pool.is_in_use(i), held.contains(&i));
                }
            }
        }
    }
}
