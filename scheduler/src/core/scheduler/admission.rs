//! Admission: the order of the waiting queue, whether its head fits (beside its cached prefix), and the prefill
//! part of a step (the rest of a chunked prompt, then new prompts, chunked where the step's token budget ends).

use super::*;

/// Above this many waiting requests, [`Order::Lpm`] falls back to arrival order: matching every prompt against
/// the cache each step would cost more than it saves (SGLang draws the line at the same place).
const LPM_MAX_QUEUE: usize = 128;

impl Core {
    /// Orders the waiting queue by the policy: with [`Order::Lpm`], requests that waited longer than the age bound
    /// first (in arrival order), then by cached prefix, longest first.
    pub(super) fn order_waiting(&mut self, step_id: u64) {
        let lpm = self.policy.order == Order::Lpm && self.cache.enabled();
        // Only when something may be admitted: matching the whole queue is the costly part.
        if !lpm || !(2..=LPM_MAX_QUEUE).contains(&self.waiting.len()) || !self.running.has_free_slot() {
            return;
        }
        let ps = self.limits.page_size;
        for req in self.waiting.iter_mut() {
            req.match_pages = self.cache.match_prefix(&req.tokens, req.cacheable_pages(ps), step_id).pages;
        }
        let bound = self.policy.max_wait_steps;
        self.waiting.sort_by_key(|r| {
            let aged = step_id.saturating_sub(r.arrived) > bound;
            (!aged, std::cmp::Reverse(if aged { 0 } else { r.match_pages }), r.seq)
        });
    }

    /// The head of the queue can be admitted now: a slot is free, and the pages its prompt needs beyond its cached
    /// prefix fit beside the next decode of every running request.
    pub(super) fn head_admissible(&self, step_id: u64) -> bool {
        let Some(head) = self.waiting.front() else { return false };
        head.mask_allows_sample()
            && self.running.has_free_slot()
            && self.fits(head, step_id, self.decode_reserve()).is_some()
    }

    /// Writes the prefill part of a step with `budget` tokens left after its decodes; returns the tokens written.
    pub(super) fn write_prefills(
        &mut self,
        step_id: u64,
        w: &mut StepWriter<'_, '_>,
        mut budget: u32,
        reqs: &mut Vec<PlannedReq>,
        events: &mut Vec<Event>,
        masks: &mut dyn FnMut(ReqId, &mut [u32]),
    ) -> u32 {
        let start = budget;
        if let Some(slot) = self.prefilling.take() {
            budget -= self.write_chunk(w, step_id, slot, budget, reqs, masks);
            if self.running.get(slot).is_some_and(|r| r.is_prefilling()) {
                self.prefilling = Some(slot);
                return start - budget;
            }
        }
        if self.waiting.is_empty() || !self.running.has_free_slot() {
            return start - budget;
        }
        let mut reserve = self.decode_reserve();
        while budget > 0 && self.running.has_free_slot() {
            let Some(head) = self.waiting.front() else { break };
            if !head.mask_allows_sample() {
                // Its first sample needs its mask; it comes within a step or two.
                break;
            }
            let Some(m) = self.fits(head, step_id, reserve) else { break };
            if m.blocked {
                // The step being planned writes the next page of this prompt: one step later it is cached.
                break;
            }
            let mut req = self.waiting.pop_front().expect("head exists");
            self.admit(&mut req, m, events);
            reserve += req.pages.missing_for(req.kv_len_after_next_decode(), self.limits.page_size);
            let slot = self.running.admit(req);
            budget -= self.write_chunk(w, step_id, slot, budget, reqs, masks);
            if self.running.get(slot).is_some_and(|r| r.is_prefilling()) {
                self.prefilling = Some(slot);
                break;
            }
        }
        start - budget
    }

    /// The cached prefix `req` would start from, if its remaining pages fit beside `reserve`.
    fn fits(&self, req: &Request, step_id: u64, reserve: u32) -> Option<Match> {
        let ps = self.limits.page_size;
        let m = self.cache.match_prefix(&req.tokens, req.cacheable_pages(ps), step_id);
        let needed = pages_for(req.len(), ps) - m.pages + reserve;
        (needed <= self.available_pages() - m.unlocked).then_some(m)
    }

    /// Gives `req` its cached prefix `m` (locked) and pages for the rest of its prompt.
    fn admit(&mut self, req: &mut Request, m: Match, events: &mut Vec<Event>) {
        let ps = self.limits.page_size;
        self.cache.lock(m.node);
        req.pages.share_path(&self.cache, m.node);
        req.tree_node = m.node;
        req.kv_len = m.pages * ps;
        assert!(req.pages.grow_to(req.len(), ps, &mut self.pages, &mut self.cache), "checked available pages");
        if req.admissions == 0 && req.kv_len > 0 {
            events.push(Event::Cached { id: req.id, tokens: req.kv_len });
        }
        req.admissions += 1;
        self.stats.prompt_tokens += u64::from(req.len());
        self.stats.cached_tokens += u64::from(req.kv_len);
    }

    /// Writes the next prefill chunk of the request in `slot` (at most `budget` tokens), its join if due, advances
    /// its KV length and caches the prompt pages the chunk completes. Returns the chunk's length.
    fn write_chunk(
        &mut self,
        w: &mut StepWriter<'_, '_>,
        step_id: u64,
        slot: u32,
        budget: u32,
        reqs: &mut Vec<PlannedReq>,
        masks: &mut dyn FnMut(ReqId, &mut [u32]),
    ) -> u32 {
        let req = self.running.get_mut(slot).expect("a prefilling request is running");
        let start = req.kv_len;
        let count = req.prefill_left().min(budget);
        w.push_request(slot, &req.pages, start, NewTokens::Ids(&req.tokens[start as usize..(start + count) as usize]));
        // The chunk's positions whose successors' logprobs are still to ask for (none before `start`: the cached
        // prefix stops at the first such position).
        let left = req.prompt_logprobs_left();
        debug_assert!(left.is_empty() || left.start >= start, "request {} skipped prompt positions", req.id);
        let asked = left.start.max(start)..left.end.min(start + count);
        let prompt_entries = match req.params.prompt_logprobs {
            Some(top) if !asked.is_empty() => {
                let targets = &req.tokens[asked.start as usize + 1..asked.end as usize + 1];
                w.push_targets(asked.start - start, targets, top);
                req.prompt_asked = asked.end;
                asked.len() as u32
            }
            _ => 0,
        };
        if !req.joined {
            // After a preemption the generated tokens come back as prompt ids; the penalties must know which.
            w.push_join(slot, &req.params, req.len() - req.generated);
            req.joined = true;
        }
        req.kv_len += count;
        req.last_step = Some(step_id);
        let samples = !req.is_prefilling();
        if samples {
            write_mask(w, req, &self.limits.eos_token_ids, masks);
        }
        req.pending += u32::from(samples);
        reqs.push(PlannedReq { id: req.id, slot, samples, prompt_entries });
        // This step writes the pages; a later one may read them. The own copy of a page some other request cached
        // first is written by this step too, so it is freed after it.
        cache_written_pages(&mut self.cache, &mut self.pages, req, self.limits.page_size, step_id, Some(step_id));
        count
    }
}
