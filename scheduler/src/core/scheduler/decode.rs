//! Decode: the pages the running requests need next, the room made for them by preemption, and the decode part
//! of a step.

use super::*;

impl Core {
    /// Pages the running requests will need for their next decode step, beyond what they hold.
    pub(super) fn decode_reserve(&self) -> u32 {
        let (ps, max_seq_len) = (self.limits.page_size, self.limits.max_seq_len);
        self.running
            .iter()
            .filter(|(_, r)| !r.fully_planned(max_seq_len))
            .map(|(_, r)| r.pages.missing_for(r.kv_len_after_next_decode(), ps))
            .sum()
    }

    /// A running request has a decode left to plan.
    pub(super) fn has_decodable(&self) -> bool {
        self.running.iter().any(|(_, r)| r.can_decode(self.limits.max_seq_len))
    }

    /// Preempts until the next decode step's new pages are free, if nothing is in flight (see the module docs).
    pub(super) fn make_room_for_decode(&mut self, events: &mut Vec<Event>) -> Room {
        let (ps, max_seq_len) = (self.limits.page_size, self.limits.max_seq_len);
        loop {
            let needed: u32 = self
                .running
                .iter()
                .filter(|(_, r)| r.can_decode(max_seq_len))
                .map(|(_, r)| r.pages.missing_for(r.kv_len + 1, ps))
                .sum();
            if needed <= self.available_pages() {
                return Room::Ready;
            }
            if !self.in_flight.is_empty() {
                return Room::AfterInFlight;
            }
            let victim = self.running.newest().expect("pages are needed, so something runs");
            if self.running.len() == 1 {
                let id = self.release(victim).id;
                events.push(Event::Finished { id, reason: FinishReason::Memory });
                return Room::Emptied;
            }
            self.preempt(victim);
        }
    }

    /// Writes one token for every running request with a decode left to plan; returns how many.
    pub(super) fn write_decodes(
        &mut self,
        step_id: u64,
        w: &mut StepWriter<'_, '_>,
        reqs: &mut Vec<PlannedReq>,
        masks: &mut dyn FnMut(ReqId, &mut [u32]),
    ) -> u32 {
        let (ps, max_seq_len) = (self.limits.page_size, self.limits.max_seq_len);
        let eos = &self.limits.eos_token_ids;
        let (order, by_slot) = self.running.parts_mut();
        let mut count = 0;
        for &slot in order {
            let req = by_slot[slot as usize].as_mut().expect("ordered slots are occupied");
            if !req.can_decode(max_seq_len) {
                continue;
            }
            debug_assert!(req.joined);
            let grown = req.pages.grow_to(req.kv_len + 1, ps, &mut self.pages, &mut self.cache);
            assert!(grown, "make_room_for_decode freed enough");
            w.push_request(slot, &req.pages, req.kv_len, NewTokens::LastSampled);
            write_mask(w, req, eos, masks);
            req.kv_len += 1;
            req.pending += 1;
            req.last_step = Some(step_id);
            reqs.push(PlannedReq { id: req.id, slot, samples: true, prompt_entries: 0 });
            count += 1;
        }
        count
    }

    pub(super) fn preempt(&mut self, slot: u32) {
        debug_assert!(self.in_flight.is_empty(), "preempting with steps in flight");
        let mut req = self.release(slot);
        req.reset_for_readmission();
        self.waiting.push_front(req);
        self.preemptions += 1;
    }
}

/// What [`Core::make_room_for_decode`] achieved.
pub(super) enum Room {
    /// The next decode step's pages are free.
    Ready,
    /// Pages are short and steps are in flight: plan again once one completes.
    AfterInFlight,
    /// The only running request could not get a page even alone, and ended.
    Emptied,
}
