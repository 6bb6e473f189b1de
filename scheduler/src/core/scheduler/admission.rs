//! Admission: whether the head of the waiting queue fits, and the extend step of the prompts admitted (chunked
//! where the step's token budget ends).

use super::*;

impl Core {
    pub(super) fn head_admissible(&self) -> bool {
        let Some(head) = self.waiting.front() else { return false };
        self.running.has_free_slot()
            && pages_for(head.len(), self.limits.page_size) + self.decode_reserve() <= self.pages.available()
    }

    pub(super) fn plan_extend(&mut self, step_id: u64, step: &mut StepMut<'_>) -> Planned {
        let ps = self.limits.page_size;
        let mut reqs = self.take_spare();
        let mut w = StepWriter::new(step, ps);
        let mut budget = self.limits.max_step_tokens;

        if let Some(slot) = self.prefilling.take() {
            let req = self.running.get_mut(slot).expect("the prefilling slot is running");
            budget -= write_chunk(&mut w, step_id, slot, req, budget, &mut reqs);
            if req.is_prefilling() {
                self.prefilling = Some(slot);
            }
        }

        if self.prefilling.is_none() {
            let mut reserve = self.decode_reserve();
            while budget > 0 && self.running.has_free_slot() {
                let Some(head) = self.waiting.front() else { break };
                let prompt_pages = pages_for(head.len(), ps);
                if prompt_pages + reserve > self.pages.available() {
                    break;
                }
                let mut req = self.waiting.pop_front().expect("head exists");
                assert!(req.pages.grow_to(req.len(), ps, &mut self.pages), "checked available pages");
                reserve += req.pages.missing_for(req.kv_len_after_next_decode(), ps);
                let slot = self.running.admit(req);
                let req = self.running.get_mut(slot).expect("just admitted");
                budget -= write_chunk(&mut w, step_id, slot, req, budget, &mut reqs);
                if req.is_prefilling() {
                    self.prefilling = Some(slot);
                    break;
                }
            }
        }

        let num_tokens = w.num_tokens() as u32;
        debug_assert!(num_tokens > 0, "an extend step was planned with nothing to extend");
        w.finish(step_id, StepKind::Extend);
        self.record_planned(step_id);
        Planned { step_id, kind: StepKind::Extend, num_tokens, reqs }
    }
}

/// Writes the next prefill chunk of `req` (at most `budget` tokens), its join if due, and advances its KV length.
/// Returns the chunk's length.
fn write_chunk(
    w: &mut StepWriter<'_, '_>,
    step_id: u64,
    slot: u32,
    req: &mut Request,
    budget: u32,
    reqs: &mut Vec<PlannedReq>,
) -> u32 {
    let start = req.kv_len;
    let count = req.prefill_left().min(budget);
    w.push_request(slot, &req.pages, start, NewTokens::Ids(&req.tokens[start as usize..(start + count) as usize]));
    if !req.joined {
        w.push_join(slot, &req.params);
        req.joined = true;
    }
    req.kv_len += count;
    req.last_step = Some(step_id);
    let samples = !req.is_prefilling();
    req.pending += u32::from(samples);
    reqs.push(PlannedReq { id: req.id, slot, samples });
    count
}
