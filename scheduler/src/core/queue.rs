//! The waiting queue: first come, first served, with preempted requests put back at the front, unless the policy
//! reorders it ([`WaitingQueue::sort_by_key`]).
//!
//! Only the head is ever considered for admission, so a large request at the head is not overtaken by smaller
//! ones behind it (no starvation, at the price of head-of-line blocking).

use super::request::{ReqId, Request};
use std::collections::VecDeque;

#[derive(Clone, Debug, Default)]
pub(crate) struct WaitingQueue {
    queue: VecDeque<Request>,
}

impl WaitingQueue {
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn push_back(&mut self, req: Request) {
        self.queue.push_back(req);
    }

    /// For a preempted request: it was admitted before everything still waiting, so it goes first again.
    pub fn push_front(&mut self, req: Request) {
        self.queue.push_front(req);
    }

    pub fn front(&self) -> Option<&Request> {
        self.queue.front()
    }

    pub fn pop_front(&mut self) -> Option<Request> {
        self.queue.pop_front()
    }

    /// Linear in the queue length; only aborts and stop strings remove from the middle.
    pub fn remove(&mut self, id: ReqId) -> Option<Request> {
        let i = self.queue.iter().position(|r| r.id == id)?;
        self.queue.remove(i)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Request> {
        self.queue.iter()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Request> {
        self.queue.iter_mut()
    }

    /// Reorders the queue, in place and without allocating (keys must be unique for a deterministic order).
    pub fn sort_by_key<K: Ord>(&mut self, key: impl FnMut(&Request) -> K) {
        self.queue.make_contiguous().sort_unstable_by_key(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::request::test_request as req;

    fn ids(q: &WaitingQueue) -> Vec<ReqId> {
        q.iter().map(|r| r.id).collect()
    }

    #[test]
    fn fifo_with_preempted_in_front_and_removal_anywhere() {
        let mut q = WaitingQueue::default();
        for id in 1..=3 {
            q.push_back(req(id));
        }
        q.push_front(req(9));
        assert_eq!(ids(&q), [9, 1, 2, 3]);
        assert_eq!(q.remove(2).map(|r| r.id), Some(2));
        assert!(q.remove(2).is_none());
        assert_eq!(q.pop_front().map(|r| r.id), Some(9));
        assert_eq!((q.front().map(|r| r.id), q.len()), (Some(1), 2));
    }
}
