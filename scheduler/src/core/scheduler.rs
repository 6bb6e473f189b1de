//! The state machine the engine thread drives: requests in, steps out, sampled tokens back in.
//!
//! The engine calls [`Core::plan_step`], publishes the slot, and may plan and publish the next step before the
//! worker answers the first (overlap); it hands each result to [`Core::complete_step`] in the order the steps were
//! planned, and forwards the events. It calls [`Core::submit`] and [`Core::finish`] between steps. The policy lives
//! here, and only here:
//!
//! - **One token budget per step.** Every step first carries one token for each running request that decodes,
//!   then what is left of `max_step_tokens` goes to prefill: the rest of a chunked prompt, then newly admitted
//!   prompts, in queue order. A step with no prefill is a decode step (the worker can replay a CUDA graph for it);
//!   any other is an extend step, decodes included. So a long prompt never stalls the running requests: each step
//!   it is part of is one chunk longer than a decode step, no more (vLLM V1 schedules the same way).
//! - **Admission.** The head of the waiting queue is admitted when a slot is free and the pages its prompt needs
//!   beyond its cached prefix fit beside what every running request needs for its next decode. Admitting eagerly
//!   fills the batch as soon as possible, which is what makes decode steps efficient. The queue is first come,
//!   first served, or ordered by longest cached prefix ([`super::Order::Lpm`]), with an age bound.
//! - **Prefix cache.** On admission the longest cached prefix of the prompt (whole pages, and at least one token
//!   left to compute, whose logits give the first sample) is taken from the [`PrefixCache`] instead of prefilled.
//!   Each prompt page becomes cached as soon as the step that writes its KV is planned, and everything else the
//!   request wrote when it ends (finish, abort or preemption). A request that would match a page written by the
//!   step being planned waits for the next step instead of computing it twice: that is what makes a burst of
//!   requests with one system prompt, or the `n` samples of one prompt, prefill it once.
//! - **Prompt logprobs.** A request that asks for them needs the logits of every prompt position, which only a
//!   computed position has: it takes from the cache no page holding a position whose successor's logprob is still
//!   to ask for (none at first; after a preemption, those it was answered for). Each chunk it prefills names, per
//!   position, the prompt token that follows (`logprob_target`), and the completed step reports which result
//!   entries are its ([`Event::PromptLogprobs`]); its pages are cached as anyone's.
//! - **Chunked prefill.** A prompt longer than the budget left in the step is cut; the rest continues first in the
//!   next step, before anything new is admitted, so at most one request is part-way through its prefill and a long
//!   prompt is never starved by later short ones. The worker samples after a non-final chunk anyway; that token is
//!   ignored, and the next chunk sends real ids, so it is never fed back. A chunk can be planned while the previous
//!   one is in flight: the worker runs steps in order, so the earlier chunk's KV is written before the later one
//!   reads it. The request's first real token comes from its last chunk.
//! - **Pages.** A request gets the pages for its whole prompt when admitted (so a chunked prefill can never stall
//!   half-way for memory), then one page each time decoding crosses a page boundary. Pages come from the free
//!   pool, then from evicting the least recently used unlocked cached pages. The admission check reserves the
//!   pages every running request needs for its next decode, so admitting does not force a preemption right away.
//! - **Preemption.** When the decodes of a step cannot get their pages, the most recently admitted request (the one
//!   with the least work to lose) is preempted: its pages go to the prefix cache (unlocked) and its slot is freed,
//!   and it goes back to the front of the waiting queue with everything it has so far as its prompt, keeping its
//!   generated count and its params. Its re-admission finds most of it cached, unless memory pressure evicted it.
//!   Preempting several puts them back in admission order. A request that needs a page while holding every page
//!   finishes with `Memory`: it could not proceed even alone.
//! - **Decode inputs by reference.** A decode token is written as `-(slot + 1)`: the worker substitutes the last
//!   token it sampled for that slot. Planning therefore never needs the previous step's tokens, which is what lets
//!   step N+1 be planned while step N runs. Sampled tokens are still appended on completion, for stop checks and
//!   for re-admission after a preemption.
//! - **Joins.** A request's sampling parameters go to the worker in the first step after each (re)admission: the
//!   slot may have served another request since.
//!
//! Overlap (steps in flight, completed in planning order) adds these rules:
//!
//! - **Plan as if every request continues.** Planning advances each request's KV length as if its samples in
//!   flight did not end it, because their tokens are not known yet. A request whose token at step N stops it (EOS,
//!   a stop id) or that is finished through [`Core::finish`] meanwhile is already in step N+1: that step's token
//!   for it is dropped, with no event. That costs at most one step per request, and nothing when the limit is
//!   known in advance: a request whose planned samples already reach `max_tokens` or the context length is not
//!   planned again (the last of them ends it whatever the token), so it needs no page and no slot beyond it.
//! - **Deferred frees.** A request's own pages, its slot and its locks on cached pages are given up only once the
//!   last step that includes it has completed: until then the worker may still write its KV into those pages,
//!   read them in attention, or sample into the slot, and handing them to a request admitted in the next step
//!   would let the two overlap (the same race mini-sglang has had with pages freed while still mapped). Steps
//!   complete in order, so each step's completion releases what waited for it. A request that ends at step N and
//!   is also in N+1 gives its slot to a request admitted in N+3 at the earliest; one that is not in N+1 (its limit
//!   was known), in N+2. An unlocked cached page is therefore never in use, and can be evicted at once.
//! - **Preemption waits for the pipeline.** When the next decode lacks pages while steps are in flight, nothing is
//!   planned until they complete; only then are victims chosen, exactly as without overlap. Preempting earlier
//!   would need the victim's samples in flight (its re-admission prompt is everything it has generated) and could
//!   not reuse its pages before its steps complete anyway; meanwhile the steps in flight may end requests and free
//!   their pages, which makes the preemption unnecessary. Memory pressure costs one pipeline bubble, nothing more.
//!   For the same reason a head that does not fit is declared impossible only with nothing in flight.

use super::index_pool::IndexPool;
use super::limits::{InvalidLimits, Limits};
use super::page_table::pages_for;
use super::planned::{CacheStats, Event, LogprobsAt, Planned, PlannedReq};
use super::policy::{Order, Policy};
use super::prefix_cache::{Inserted, PrefixCache, ROOT};
use super::queue::WaitingQueue;
use super::request::{FinishReason, NewRequest, ReqId, Request, SubmitError};
use super::running::RunningSet;
use super::step_writer::{NewTokens, StepWriter};
use super::stop::stop_reason;
use proto::step::{StepKind, StepMut};
use std::collections::{HashMap, VecDeque};

mod admission;
mod decode;
mod invariants;

use super::prefix_cache::Match;
use decode::Room;

#[derive(Clone, Debug)]
pub struct Core {
    limits: Limits,
    waiting: WaitingQueue,
    running: RunningSet,
    /// Free pages; pages held by requests or by the prefix cache are in use here.
    pages: IndexPool,
    cache: PrefixCache,
    /// The slot of the request part-way through a chunked prefill.
    prefilling: Option<u32>,
    /// Steps planned and not yet completed or failed, oldest first: the order the worker runs them in.
    in_flight: VecDeque<u64>,
    /// Step ids must increase, so that "every step up to s completed" is one number.
    last_planned: Option<u64>,
    /// Request lists of completed steps, reused so that planning allocates nothing in steady state.
    spare: Vec<Vec<PlannedReq>>,
    preemptions: u64,
    /// Requests submitted so far: the next one's arrival number.
    submitted: u64,
    stats: CacheStats,
    policy: Policy,
}

impl Core {
    /// A core with the default [`Policy`].
    pub fn new(limits: Limits) -> Result<Self, InvalidLimits> {
        Self::with_policy(limits, Policy::default())
    }

    pub fn with_policy(limits: Limits, policy: Policy) -> Result<Self, InvalidLimits> {
        limits.validate()?;
        Ok(Core {
            waiting: WaitingQueue::default(),
            running: RunningSet::new(limits.max_batch),
            pages: IndexPool::new(limits.num_pages),
            cache: PrefixCache::new(limits.num_pages, limits.page_size, policy.prefix_cache),
            prefilling: None,
            // The engine keeps two in flight; more only cost a reallocation.
            in_flight: VecDeque::with_capacity(4),
            last_planned: None,
            spare: Vec::new(),
            preemptions: 0,
            submitted: 0,
            stats: CacheStats::default(),
            limits,
            policy,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn cache_stats(&self) -> CacheStats {
        CacheStats { cached_pages: self.cache.size(), evictable_pages: self.cache.evictable(), ..self.stats }
    }

    /// Queues a request behind every waiting one. Refuses what could never run or would corrupt a step.
    pub fn submit(&mut self, req: NewRequest) -> Result<(), SubmitError> {
        let len = req.prompt.len();
        if len == 0 {
            return Err(SubmitError::EmptyPrompt);
        }
        let max = self.limits.max_prompt_len();
        if len > max as usize {
            return Err(SubmitError::PromptTooLong { len, max });
        }
        if req.params.max_tokens == 0 {
            return Err(SubmitError::ZeroMaxTokens);
        }
        if let Some(&t) = req.prompt.iter().find(|&&t| t > i32::MAX as u32) {
            return Err(SubmitError::TokenOutOfRange(t));
        }
        req.params.check_step_limits()?;
        debug_assert!(!self.contains(req.id), "request id {} submitted twice", req.id);
        let room = self.limits.max_seq_len - len as u32;
        let arrived = self.last_planned.map_or(0, |s| s + 1);
        self.waiting.push_back(Request::new(req, room, self.limits.page_size, self.submitted, arrived));
        self.submitted += 1;
        Ok(())
    }

    /// Ends a request wherever it is (abort, stop string) and frees its pages and slot (once the steps in flight
    /// that include it complete; their tokens for it are dropped). False if it is unknown, e.g. because it already
    /// finished.
    pub fn finish(&mut self, id: ReqId) -> bool {
        if self.waiting.remove(id).is_some() {
            return true;
        }
        match self.running.find(id) {
            Some(slot) => {
                self.release(slot);
                true
            }
            None => false,
        }
    }

    /// Writes the next step into `step` (every array it uses, and the header) and returns its plan, or `None` when
    /// there is nothing to run, or nothing until a step in flight completes. Steps may be planned while earlier
    /// ones are in flight; `step_id` must be greater than every id planned before. A request that can no longer
    /// proceed (it needs a page while holding them all) ends here with an [`Event::Finished`] in `events`: forward
    /// those even when this returns `None`.
    ///
    /// Panics if `step_id` does not increase, or if `step` is smaller than [`Limits::capacity`].
    pub fn plan_step(&mut self, step_id: u64, step: &mut StepMut<'_>, events: &mut Vec<Event>) -> Option<Planned> {
        self.plan_step_with_masks(step_id, step, events, &mut |_, row| row.fill(u32::MAX))
    }

    /// [`Core::plan_step`] for constrained requests: `masks(id, row)` writes the token mask of request `id`'s
    /// sample into `row` (W words, every bit clear), for each constrained request the step samples. The core adds
    /// its own masking (`min_tokens`) on top. `plan_step` allows every token.
    pub fn plan_step_with_masks(
        &mut self,
        step_id: u64,
        step: &mut StepMut<'_>,
        events: &mut Vec<Event>,
        masks: &mut dyn FnMut(ReqId, &mut [u32]),
    ) -> Option<Planned> {
        if let Some(last) = self.last_planned {
            assert!(step_id > last, "step {step_id} planned after step {last}: step ids must increase");
        }
        self.check_capacity(step);
        self.order_waiting(step_id);
        loop {
            let decodes = self.has_decodable();
            if decodes {
                match self.make_room_for_decode(events) {
                    Room::Ready => {}
                    Room::AfterInFlight => return None,
                    Room::Emptied => continue,
                }
            }
            if decodes || self.prefilling.is_some() || self.head_admissible(step_id) {
                return Some(self.plan(step_id, step, events, masks));
            }
            if !self.in_flight.is_empty() || self.waiting.front().is_some_and(|h| !h.mask_allows_sample()) {
                // A head waiting for its mask is not one that does not fit.
                // Whatever is in flight will end requests or free pages; the head may fit then.
                return None;
            }
            // Nothing runs, so every slot and page is free, and still the head does not fit: it never will.
            let head = self.waiting.pop_front()?;
            events.push(Event::Finished { id: head.id, reason: FinishReason::Memory });
        }
    }

    /// The mask of constrained request `id`'s next sample is ready: it may be planned again. False if the request
    /// is unknown (it ended).
    pub fn mask_ready(&mut self, id: ReqId) -> bool {
        let req = match self.running.find(id) {
            Some(slot) => self.running.get_mut(slot),
            None => self.waiting.iter_mut().find(|r| r.id == id),
        };
        req.map(|r| r.mask_ready = true).is_some()
    }

    /// Takes the worker's sampled tokens for `planned` (in its request order) and applies the stop conditions.
    /// Requests that ended are freed (once no later step in flight includes them); every ending shows up in
    /// `events`. A request finished since planning is skipped: its token is dropped.
    ///
    /// Panics if `planned` is not the oldest step in flight, or if `tokens` does not have one entry per planned
    /// request.
    pub fn complete_step(&mut self, planned: Planned, tokens: &[i32], events: &mut Vec<Event>) {
        assert_eq!(
            tokens.len(),
            planned.reqs.len(),
            "step {} answered with a different request count",
            planned.step_id
        );
        self.retire(planned.step_id);
        let mut entries = 0;
        for (row, (p, &token)) in planned.reqs.iter().zip(tokens).enumerate() {
            let first = entries;
            entries += p.prompt_entries;
            let Some(req) = self.running.get_mut(p.slot).filter(|r| r.id == p.id) else { continue };
            if let (Some(top), 1..) = (req.params.prompt_logprobs, p.prompt_entries) {
                events.push(Event::PromptLogprobs { id: p.id, first, count: p.prompt_entries, top });
            }
            if !p.samples {
                continue;
            }
            req.pending -= 1;
            // The next mask follows from this token: whatever was said ready before it is stale.
            req.mask_ready = false;
            let finish = match u32::try_from(token) {
                Ok(token) => {
                    req.tokens.push(token);
                    req.generated += 1;
                    let l = &self.limits;
                    let finish =
                        stop_reason(token, req.generated, req.len(), &req.params, &l.eos_token_ids, l.max_seq_len);
                    let logprobs = req.params.logprobs.map(|top| LogprobsAt { row: row as u32, top });
                    events.push(Event::Token { id: p.id, token, finish, logprobs });
                    finish
                }
                Err(_) => {
                    events.push(Event::Finished { id: p.id, reason: FinishReason::Error });
                    Some(FinishReason::Error)
                }
            };
            if finish.is_some() {
                self.release(p.slot);
            }
        }
        self.recycle(planned);
    }

    /// The worker failed the step: its requests end with `Error`, since their KV cache can no longer be trusted.
    /// Neither can the pages it wrote for the prefix cache, nor those written after them from them, so the cache
    /// stops matching for good (the engine stops after a failed step anyway).
    ///
    /// Panics if `planned` is not the oldest step in flight.
    pub fn fail_step(&mut self, planned: Planned, events: &mut Vec<Event>) {
        self.cache.disable();
        self.retire(planned.step_id);
        for p in &planned.reqs {
            if self.running.get(p.slot).is_some_and(|r| r.id == p.id) {
                self.release(p.slot);
                events.push(Event::Finished { id: p.id, reason: FinishReason::Error });
            }
        }
        self.recycle(planned);
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Requests holding a slot, including one part-way through its prefill.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Pages that can be handed out now, free or evictable from the prefix cache; not those freed after a step
    /// still in flight.
    pub fn free_pages(&self) -> u32 {
        self.pages.available() + self.cache.evictable()
    }

    /// Nothing waits, runs or is in flight: nothing happens until a submit.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty() && self.in_flight.is_empty()
    }

    /// Steps planned and not yet completed or failed.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Preemptions so far: each one costs a recomputation of the victim's whole sequence.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    pub fn contains(&self, id: ReqId) -> bool {
        self.running.find(id).is_some() || self.waiting.iter().any(|r| r.id == id)
    }

    fn check_capacity(&self, step: &StepMut<'_>) {
        let cap = self.limits.capacity();
        assert!(
            step.req_slot.len() >= cap.max_reqs as usize
                && step.input_ids.len() >= cap.max_tokens as usize
                && step.kv_indices.len() >= cap.max_kv_indices as usize,
            "the step slot is smaller than Limits::capacity() {cap:?}"
        );
    }

    /// Whether step `step` is still in flight. Ids increase and steps complete in order, so that is any id from
    /// the oldest in flight on.
    fn is_in_flight(&self, step: u64) -> bool {
        self.in_flight.front().is_some_and(|&oldest| step >= oldest)
    }

    fn record_planned(&mut self, step_id: u64) {
        self.in_flight.push_back(step_id);
        self.last_planned = Some(step_id);
    }

    /// Step `step_id` has been answered: it must be the oldest in flight. What waited for it is freed.
    fn retire(&mut self, step_id: u64) {
        let oldest = self.in_flight.pop_front();
        assert!(oldest == Some(step_id), "step {step_id} completed, but the oldest step in flight is {oldest:?}");
        self.pages.complete(step_id);
        self.cache.complete(step_id);
        self.running.complete(step_id);
    }

    /// Takes a running request out: what it wrote goes to the prefix cache, and its own pages, its locks and its
    /// slot are given up once the last step in flight that includes it has completed.
    fn release(&mut self, slot: u32) -> Request {
        let last = self.running.get(slot).and_then(|r| r.last_step);
        let after = last.filter(|&s| self.is_in_flight(s));
        let mut req = self.running.remove(slot, after);
        cache_written_pages(
            &mut self.cache,
            &mut self.pages,
            &mut req,
            self.limits.page_size,
            last.unwrap_or(0),
            after,
        );
        req.pages.release(&mut self.pages, after);
        self.cache.unlock_after(req.tree_node, after);
        req.tree_node = ROOT;
        if self.prefilling == Some(slot) {
            self.prefilling = None;
        }
        req
    }

    /// Pages that can be handed out: free, or cached and held by no running request.
    fn available_pages(&self) -> u32 {
        self.pages.available() + self.cache.evictable()
    }

    /// Writes a step: the running requests' decodes, then prefill in what is left of the token budget.
    fn plan(
        &mut self,
        step_id: u64,
        step: &mut StepMut<'_>,
        events: &mut Vec<Event>,
        masks: &mut dyn FnMut(ReqId, &mut [u32]),
    ) -> Planned {
        let mut reqs = self.take_spare();
        let mut w = StepWriter::new(step, self.limits.page_size, self.limits.mask_words());
        let decodes = self.write_decodes(step_id, &mut w, &mut reqs, masks);
        let budget = self.limits.max_step_tokens - decodes;
        let prefill = self.write_prefills(step_id, &mut w, budget, &mut reqs, events, masks);
        let num_tokens = w.num_tokens() as u32;
        debug_assert!(num_tokens > 0, "a step was planned with nothing in it");
        let kind = if prefill == 0 { StepKind::Decode } else { StepKind::Extend };
        w.finish(step_id, kind);
        self.record_planned(step_id);
        Planned { step_id, kind, num_tokens, reqs }
    }

    fn take_spare(&mut self) -> Vec<PlannedReq> {
        self.spare.pop().unwrap_or_else(|| Vec::with_capacity(self.limits.max_batch as usize))
    }

    fn recycle(&mut self, planned: Planned) {
        let mut reqs = planned.reqs;
        reqs.clear();
        // One per step in flight and one being planned suffice; more only accumulate if plans are dropped uncompleted.
        if self.spare.len() < 4 {
            self.spare.push(reqs);
        }
    }
}

/// Gives the sample being planned for `req` (the last request pushed to `w`) its token mask, if it needs one: the
/// grammar's for a constrained request, and with EOS and the stop ids cleared while `min_tokens` are not reached.
/// Call before counting the sample in `pending`.
fn write_mask(w: &mut StepWriter<'_, '_>, req: &mut Request, eos: &[u32], masks: &mut dyn FnMut(ReqId, &mut [u32])) {
    let p = &req.params;
    let short = req.generated + req.pending < p.min_tokens;
    if !p.constrained && !short {
        return;
    }
    let Some(row) = w.push_mask() else { return };
    if p.constrained {
        debug_assert!(req.mask_ready, "request {} planned without its mask", req.id);
        row.fill(0);
        masks(req.id, row);
        req.mask_ready = false;
    } else {
        row.fill(u32::MAX);
    }
    if short {
        let eos = if p.ignore_eos { &[][..] } else { eos };
        let mut cleared = false;
        for &id in eos.iter().chain(&p.stop_token_ids) {
            if let Some(word) = row.get_mut(id as usize / 32) {
                cleared |= *word & (1 << (id % 32)) != 0;
                *word &= !(1 << (id % 32));
            }
        }
        // A grammar that allows nothing but ending wins over min_tokens: a row with no token left would sample
        // garbage. (`masks` writes the same row when asked twice.)
        if cleared && p.constrained && row.iter().all(|&w| w == 0) {
            masks(req.id, row);
        }
    }
}

/// Hands `req`'s full pages whose tokens are known and whose KV is written (by step `written_in` or earlier) to the
/// prefix cache, after those it already shares. A page the cache already has under another id replaces the
/// request's own, which is freed after step `free_after` (a step in flight may still write it).
fn cache_written_pages(
    cache: &mut PrefixCache,
    pool: &mut IndexPool,
    req: &mut Request,
    page_size: u32,
    written_in: u64,
    free_after: Option<u64>,
) {
    if !cache.enabled() {
        return;
    }
    let full = req.kv_len.min(req.len()) / page_size;
    while req.pages.shared() < full {
        let i = req.pages.shared();
        let key = &req.tokens[(i * page_size) as usize..((i + 1) * page_size) as usize];
        let own = req.pages.pages()[i as usize];
        match cache.insert(req.tree_node, key, own, written_in) {
            Inserted::New(node) | Inserted::Existing(node) => {
                if let Some(own) = req.pages.share_next(node) {
                    pool.free_after(own, free_after);
                }
                req.tree_node = node;
            }
            Inserted::Refused => break,
        }
    }
}
