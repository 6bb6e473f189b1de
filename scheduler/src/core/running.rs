//! The running set: admitted requests, each holding one request slot of the worker.
//!
//! Requests are stored by slot, so a step's result maps back to its request without a search; a separate list
//! keeps admission order, which fixes the order of requests in a step and names the preemption victim (the most
//! recently admitted request, which has the least work to lose).
//!
//! A slot given up while a step in flight still names it is not handed out again until that step completes: the
//! worker may still sample into it, or store its last token, and a new request's join would race with that.

use super::index_pool::IndexPool;
use super::request::{ReqId, Request};

#[derive(Clone, Debug)]
pub(crate) struct RunningSet {
    by_slot: Vec<Option<Request>>,
    /// Slots, oldest admission first.
    order: Vec<u32>,
    slots: IndexPool,
}

impl RunningSet {
    pub fn new(max_batch: u32) -> Self {
        RunningSet {
            by_slot: (0..max_batch).map(|_| None).collect(),
            order: Vec::with_capacity(max_batch as usize),
            slots: IndexPool::new(max_batch),
        }
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn has_free_slot(&self) -> bool {
        self.slots.available() > 0
    }

    /// Gives `req` a slot. Panics when every slot is taken: check [`Self::has_free_slot`] first.
    pub fn admit(&mut self, req: Request) -> u32 {
        let slot = self.slots.alloc().expect("admit needs a free slot");
        self.by_slot[slot as usize] = Some(req);
        self.order.push(slot);
        slot
    }

    /// Takes the request out and frees its slot, once step `after` has completed if it is given. Its pages are the
    /// caller's to release.
    pub fn remove(&mut self, slot: u32, after: Option<u64>) -> Request {
        let req = self.by_slot[slot as usize].take().unwrap_or_else(|| panic!("slot {slot} is not running"));
        let i = self.order.iter().rposition(|&s| s == slot).expect("a running slot is in the order list");
        self.order.remove(i);
        self.slots.free_after(slot, after);
        req
    }

    /// Step `step` and all before it have completed: slots that waited for them can be handed out again.
    pub fn complete(&mut self, step: u64) {
        self.slots.complete(step);
    }

    /// Slots given up that wait for a step in flight, as `(step, slot)`.
    pub fn deferred_slots(&self) -> &[(u64, u32)] {
        self.slots.deferred()
    }

    pub fn get(&self, slot: u32) -> Option<&Request> {
        self.by_slot.get(slot as usize)?.as_ref()
    }

    pub fn get_mut(&mut self, slot: u32) -> Option<&mut Request> {
        self.by_slot.get_mut(slot as usize)?.as_mut()
    }

    /// Linear in the number of running requests; only aborts and stop strings look requests up by id.
    pub fn find(&self, id: ReqId) -> Option<u32> {
        self.order.iter().copied().find(|&s| self.by_slot[s as usize].as_ref().is_some_and(|r| r.id == id))
    }

    pub fn newest(&self) -> Option<u32> {
        self.order.last().copied()
    }

    /// Slots in admission order, with mutable access to the requests: what a step walks over.
    pub fn parts_mut(&mut self) -> (&[u32], &mut [Option<Request>]) {
        (&self.order, &mut self.by_slot)
    }

    /// `(slot, request)` in admission order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &Request)> {
        self.order.iter().map(|&s| (s, self.by_slot[s as usize].as_ref().expect("ordered slots are occupied")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::request::test_request as req;

    #[test]
    #[should_panic(expected = "free slot")]
    fn admitting_beyond_the_slots_panics() {
        let mut set = RunningSet::new(1);
        set.admit(req(1));
        set.admit(req(2));
    }

    #[test]
    fn slots_order_and_lookup() {
        let mut set = RunningSet::new(3);
        for id in [10, 11, 12] {
            set.admit(req(id));
        }
        assert!(!set.has_free_slot());
        assert_eq!(set.find(11), Some(1));
        assert_eq!(set.remove(1, None).id, 11);
        assert_eq!(set.find(11), None);
        // The freed slot goes to the next admission, which is now the newest.
        assert_eq!(set.admit(req(14)), 1);
        assert_eq!(set.newest(), Some(1));
        let order: Vec<_> = set.iter().map(|(s, r)| (s, r.id)).collect();
        assert_eq!(order, [(0, 10), (2, 12), (1, 14)]);
        assert!(set.get(1).is_some_and(|r| r.id == 14));
    }

    #[test]
    fn a_slot_a_step_in_flight_names_comes_back_after_that_step() {
        let mut set = RunningSet::new(2);
        set.admit(req(10));
        set.admit(req(11));
        set.remove(0, Some(3));
        assert!(!set.has_free_slot(), "step 3 may still sample into slot 0");
        assert_eq!(set.deferred_slots(), &[(3, 0)]);
        set.complete(2);
        assert!(!set.has_free_slot());
        set.complete(3);
        assert_eq!(set.admit(req(12)), 0);
    }
}
