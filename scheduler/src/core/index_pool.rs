//! A free list over the integers `0..capacity`: KV pages and request slots are both handed out from one.
//!
//! A stack, so the most recently freed index is reused first (its page is likely still warm in the worker's
//! caches) and both operations are O(1). A state per index catches double frees and frees of indices never handed
//! out: either would let two requests share a page and silently corrupt each other's KV cache, so it panics.
//!
//! With steps in flight, an index given up by the scheduler may still be read or written by a step the worker has
//! not finished: a page by attention or a KV write, a slot by sampling or by the last-token store. Such an index is
//! freed *after* a step ([`IndexPool::free_after`]): it stays unavailable until [`IndexPool::complete`] reports that
//! step done. Steps complete in order, so "done up to step s" is all the pool needs to know.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    InUse,
    /// Given up, but a step in flight still uses it.
    Deferred,
}

#[derive(Clone, Debug)]
pub(crate) struct IndexPool {
    free: Vec<u32>,
    state: Vec<State>,
    /// `(step, index)`: free `index` once `step` has completed. Unordered; it holds a few requests' worth at most.
    deferred: Vec<(u64, u32)>,
}

impl IndexPool {
    pub fn new(capacity: u32) -> Self {
        IndexPool {
            // Reversed so that a fresh pool hands out 0, 1, 2, ...: easier to read in tests and dumps.
            free: (0..capacity).rev().collect(),
            state: vec![State::Free; capacity as usize],
            // Every index could be deferred at once; reserving for that keeps frees allocation-free.
            deferred: Vec::with_capacity(capacity as usize),
        }
    }

    /// Indices that can be handed out now (deferred ones are not).
    pub fn available(&self) -> u32 {
        self.free.len() as u32
    }

    pub fn alloc(&mut self) -> Option<u32> {
        let i = self.free.pop()?;
        self.state[i as usize] = State::InUse;
        Some(i)
    }

    pub fn free(&mut self, i: u32) {
        *self.take(i) = State::Free;
        self.free.push(i);
    }

    /// Frees `i` once step `step` has completed, or now if `step` is `None`.
    pub fn free_after(&mut self, i: u32, step: Option<u64>) {
        match step {
            None => self.free(i),
            Some(step) => {
                *self.take(i) = State::Deferred;
                self.deferred.push((step, i));
            }
        }
    }

    /// Step `step` and every step before it have completed: what waited for them is free now.
    pub fn complete(&mut self, step: u64) {
        let (state, free) = (&mut self.state, &mut self.free);
        self.deferred.retain(|&(s, i)| {
            if s > step {
                return true;
            }
            state[i as usize] = State::Free;
            free.push(i);
            false
        });
    }

    /// Handed out and not freed, or freed after a step still in flight.
    pub fn is_in_use(&self, i: u32) -> bool {
        self.state.get(i as usize).is_some_and(|&s| s != State::Free)
    }

    /// `(step, index)` for every index waiting on a step.
    pub fn deferred(&self) -> &[(u64, u32)] {
        &self.deferred
    }

    fn take(&mut self, i: u32) -> &mut State {
        let state = self.state.get_mut(i as usize).unwrap_or_else(|| panic!("index {i} is outside the pool"));
        assert!(*state == State::InUse, "index {i} freed twice");
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

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
    #[should_panic(expected = "freed twice")]
    fn freeing_a_deferred_index_again_panics() {
        let mut p = IndexPool::new(2);
        let i = p.alloc().unwrap();
        p.free_after(i, Some(7));
        p.free(i);
    }

    #[test]
    #[should_panic(expected = "outside the pool")]
    fn foreign_index_panics() {
        IndexPool::new(2).free(2);
    }

    #[test]
    fn a_deferred_index_comes_back_when_its_step_completes() {
        let mut p = IndexPool::new(3);
        let (a, b, c) = (p.alloc().unwrap(), p.alloc().unwrap(), p.alloc().unwrap());
        p.free_after(a, Some(5));
        p.free_after(b, Some(4));
        p.free_after(c, None);
        assert_eq!(p.available(), 1);
        assert!(p.is_in_use(a) && p.is_in_use(b) && !p.is_in_use(c));
        p.complete(3);
        assert_eq!(p.available(), 1, "nothing waited for step 3");
        p.complete(4);
        assert_eq!((p.available(), p.is_in_use(b), p.deferred()), (2, false, &[(5, a)][..]));
        p.complete(5);
        assert_eq!((p.available(), p.deferred().len()), (3, 0));
    }

    proptest! {
        /// Against a model: what is handed out is never handed out again until freed (and, for a deferred free,
        /// until its step completed), and nothing is lost.
        #[test]
        fn matches_a_set_model(
            cap in 1u32..40,
            ops in prop::collection::vec((0u8..4, any::<prop::sample::Index>(), prop::option::of(0u64..3)), 0..200),
        ) {
            let mut pool = IndexPool::new(cap);
            let mut held = BTreeSet::new();
            let mut waiting: BTreeMap<u32, u64> = BTreeMap::new();
            let mut done = 0u64; // steps below `done` have completed
            for (op, pick, after) in ops {
                match op {
                    0 | 1 if !held.is_empty() => {
                        let i = *held.iter().nth(pick.index(held.len())).unwrap();
                        held.remove(&i);
                        // Only steps not yet completed can be waited on.
                        let after = after.map(|a| done + a);
                        pool.free_after(i, after);
                        if let Some(s) = after {
                            waiting.insert(i, s);
                        }
                    }
                    2 => {
                        pool.complete(done);
                        waiting.retain(|_, s| *s > done);
                        done += 1;
                    }
                    _ => match pool.alloc() {
                        Some(i) => prop_assert!(i < cap && held.insert(i) && !waiting.contains_key(&i), "{i} reused"),
                        None => prop_assert_eq!((held.len() + waiting.len()) as u32, cap),
                    },
                }
                prop_assert_eq!(pool.available() + (held.len() + waiting.len()) as u32, cap);
                for i in 0..cap {
                    prop_assert_eq!(pool.is_in_use(i), held.contains(&i) || waiting.contains_key(&i));
                }
            }
        }
    }
}
