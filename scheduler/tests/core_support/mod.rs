//! A fake worker and a driver for testing the scheduling core end to end, without processes or rings.
//!
//! The fake worker does what the real one does with a step, minus the maths: it checks that the arrays are
//! consistent, writes each new token's id and position into a simulated paged KV cache at `out_loc`, and then
//! "samples" from the sequence it reads back through `kv_indices`. A toy model turns that sequence and the slot's
//! joined seed into a token. So if pages were shared, mislisted or reused too early, or a join went missing, the
//! tokens would differ from what the same request produces alone: comparing against [`reference_output`] checks
//! all of it at once.
//!
//! Like the real worker with overlap, it holds the steps published to it and runs them one at a time, in order.
//! When a step is published it checks it against every step published earlier and not yet run: no page it writes
//! may be used there by another slot, and no slot may be joined (handed to a new request) while an earlier step
//! still uses it. That is the rule deferred frees exist for: on a GPU the earlier step could still be reading the
//! page or sampling into the slot. Pages shared through the prefix cache are only read, by any number of
//! requests; a page written in a step must be listed by the writing request alone.
#![allow(dead_code)] // each test file uses a different part
use proto::step::{SlotBuf, StepKind, StepLayout, StepMut, StepRef};
use scheduler::core::{
    Core, Event, FinishReason, Limits, NewRequest, Planned, PlannedReq, Policy, ReqId, SamplingParams,
};
use std::collections::{HashMap, HashSet, VecDeque};

/// Next token from the whole sequence so far and the request's seed.
pub type Model = fn(&[u32], u64) -> u32;

/// A hash of the sequence: any change anywhere in it changes the next token.
pub fn hash_model(seq: &[u32], seed: u64) -> u32 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &t in seq {
        h = (h ^ t as u64).wrapping_mul(0x100_0000_01b3);
    }
    (h >> 33) as u32 % 1000 + 100
}

/// The same over 20 ids, so that stop and EOS ids come up often.
pub fn small_hash_model(seq: &[u32], seed: u64) -> u32 {
    hash_model(seq, seed) % 20 + 100
}

/// The sampled token is the position it will take: predictable, for scenario tests.
pub fn position_model(seq: &[u32], _seed: u64) -> u32 {
    seq.len() as u32
}

pub fn params(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        top_k: -1,
        seed: 0,
        stop_token_ids: vec![],
        ignore_eos: false,

        ..Default::default()
    }
}

pub fn limits(max_batch: u32, max_step_tokens: u32, num_pages: u32, page_size: u32, max_seq_len: u32) -> Limits {
    Limits { max_batch, max_step_tokens, num_pages, page_size, max_seq_len, eos_token_ids: vec![], vocab_size: 0 }
}

/// What a request generates when it runs alone with unlimited memory, and why it stops.
pub fn reference_output(prompt: &[u32], p: &SamplingParams, l: &Limits, model: Model) -> (Vec<u32>, FinishReason) {
    let mut seq = prompt.to_vec();
    let mut out = vec![];
    loop {
        let t = model(&seq, p.seed);
        seq.push(t);
        out.push(t);
        if (!p.ignore_eos && l.eos_token_ids.contains(&t)) || p.stop_token_ids.contains(&t) {
            return (out, FinishReason::Stop);
        }
        if out.len() as u32 >= p.max_tokens || seq.len() as u32 >= l.max_seq_len {
            return (out, FinishReason::Length);
        }
    }
}

pub struct FakeWorker {
    pub layout: StepLayout,
    /// Where the core writes the next step, as into a claimed ring slot.
    pub buf: SlotBuf,
    page_size: u32,
    /// (token id, position) per KV cell.
    kv: Vec<Option<(u32, u32)>>,
    last_token: Vec<Option<u32>>,
    seed: Vec<Option<u64>>,
    model: Model,
    /// Published steps not yet run, oldest first.
    queue: VecDeque<Published>,
    /// The prompt logprobs the last step run asked for, in step order: (position, target) for each position with
    /// a `logprob_target`; the real worker would return that target's logprob there.
    pub prompt_answers: Vec<(u32, u32)>,
}

/// A copy of a published step, and what it uses.
struct Published {
    buf: SlotBuf,
    step_id: u64,
    /// The slots each listed page is read or written for.
    page_slots: HashMap<i32, HashSet<i32>>,
    slots: HashSet<i32>,
}

impl FakeWorker {
    pub fn new(l: &Limits, model: Model) -> Self {
        let layout = StepLayout::new(l.capacity());
        let buf = SlotBuf::zeroed(layout.slot_bytes);
        FakeWorker {
            layout,
            buf,
            page_size: l.page_size,
            kv: vec![None; (l.num_pages * l.page_size) as usize],
            last_token: vec![None; l.max_batch as usize],
            seed: vec![None; l.max_batch as usize],
            model,
            queue: VecDeque::new(),
            prompt_answers: Vec::new(),
        }
    }

    /// Steps published and not yet run.
    pub fn in_flight(&self) -> usize {
        self.queue.len()
    }

    /// Takes the step in `self.buf`, to be run after every step published before it. Panics if it reuses a page or
    /// a slot that one of those still uses.
    pub fn publish(&mut self) {
        let mut buf = SlotBuf::zeroed(self.layout.slot_bytes);
        buf.bytes_mut().copy_from_slice(self.buf.bytes());
        let s = StepRef::new(&self.layout, buf.bytes());
        let step_id = s.header.step_id;
        let mut page_slots: HashMap<i32, HashSet<i32>> = HashMap::new();
        let mut written = HashMap::new();
        for r in 0..s.header.num_reqs as usize {
            for &p in &s.kv_indices[s.kv_indptr[r] as usize..s.kv_indptr[r + 1] as usize] {
                page_slots.entry(p).or_default().insert(s.req_slot[r]);
            }
            for &loc in &s.out_loc[s.qo_indptr[r] as usize..s.qo_indptr[r + 1] as usize] {
                written.insert(loc / self.page_size as i32, s.req_slot[r]);
            }
        }
        for earlier in &self.queue {
            for (p, slot) in &written {
                if let Some(other) = earlier.page_slots.get(p).and_then(|o| o.iter().find(|&o| o != slot)) {
                    panic!(
                        "step {step_id} writes page {p} for slot {slot}; step {} in flight uses it for slot {other}",
                        earlier.step_id
                    );
                }
            }
            for slot in s.join_slot {
                assert!(
                    !earlier.slots.contains(slot),
                    "step {step_id} gives slot {slot} to a new request while step {} in flight still uses it",
                    earlier.step_id
                );
            }
        }
        let slots = s.req_slot.iter().copied().collect();
        self.queue.push_back(Published { buf, step_id, page_slots, slots });
    }

    /// Publishes the step in `self.buf` and runs it: for tests that keep one step in flight.
    pub fn run(&mut self) -> Vec<i32> {
        assert!(self.queue.is_empty(), "run() with steps in flight: use publish() and run_next()");
        self.publish();
        self.run_next()
    }

    /// Checks the oldest published step, runs it and returns one token per request. Panics on any inconsistency.
    pub fn run_next(&mut self) -> Vec<i32> {
        let published = self.queue.pop_front().expect("a published step");
        let s = StepRef::new(&self.layout, published.buf.bytes());
        let ps = self.page_size as i32;
        let h = s.header;
        let (n, t, k) = (h.num_reqs as usize, h.num_tokens as usize, h.num_kv_indices as usize);
        let kind = StepKind::from_u32(h.kind).expect("valid kind");
        assert!(n > 0, "an empty step");
        assert_eq!((s.qo_indptr[0], s.kv_indptr[0]), (0, 0));
        assert_eq!((s.qo_indptr[n] as usize, s.kv_indptr[n] as usize), (t, k));

        // Joins first: the step's sampling uses them. Their logit biases are one CSR over every join.
        let (j, b) = (h.num_joins as usize, h.num_bias as usize);
        assert_eq!((s.join_bias_indptr[0], s.join_bias_indptr[j] as usize), (0, b));
        assert!(s.join_bias_indptr.windows(2).all(|w| w[0] <= w[1] && w[1] - w[0] <= 300), "bias counts");
        let mut joined = HashSet::new();
        for (i, &slot) in s.join_slot.iter().enumerate() {
            assert!(s.req_slot.contains(&slot), "join for slot {slot}, which is not in the step");
            assert!(joined.insert(slot), "slot {slot} joined twice");
            self.seed[slot as usize] = Some(s.join_seed[i]);
            // A new request in the slot: reading the previous one's last token would be a bug.
            self.last_token[slot as usize] = None;
        }

        let mut slots = HashSet::new();
        // Pages written in this step, and every request that lists each page.
        let mut written = HashMap::new();
        let mut listed: HashMap<i32, Vec<i32>> = HashMap::new();
        for r in 0..n {
            for &loc in &s.out_loc[s.qo_indptr[r] as usize..s.qo_indptr[r + 1] as usize] {
                written.insert(loc / ps, s.req_slot[r]);
            }
            for &p in &s.kv_indices[s.kv_indptr[r] as usize..s.kv_indptr[r + 1] as usize] {
                listed.entry(p).or_default().push(s.req_slot[r]);
            }
        }
        for (p, writer) in &written {
            assert_eq!(listed[p], [*writer], "page {p}, written for slot {writer}, is listed for other requests too");
        }
        self.prompt_answers.clear();
        if h.prompt_logprobs != 0 {
            assert_eq!(s.logprob_target.len(), t, "a target per new token");
            assert!(h.prompt_top <= 20);
            assert_ne!(kind, StepKind::Decode, "decode steps never ask for prompt logprobs");
        }
        for r in 0..n {
            let (q0, q1) = (s.qo_indptr[r] as usize, s.qo_indptr[r + 1] as usize);
            for i in q0..q1 {
                let Some(&target) = s.logprob_target.get(i).filter(|&&t| t >= 0) else { continue };
                // The successor of a position inside the chunk is the chunk's next id.
                if i + 1 < q1 {
                    assert_eq!(
                        target,
                        s.input_ids[i + 1],
                        "the target at position {} is not its successor",
                        s.positions[i]
                    );
                }
                self.prompt_answers.push((s.positions[i] as u32, target as u32));
            }
        }
        let mut out = Vec::with_capacity(n);
        for r in 0..n {
            let slot = s.req_slot[r];
            assert!(slots.insert(slot), "slot {slot} twice in a step");
            let (q0, q1) = (s.qo_indptr[r] as usize, s.qo_indptr[r + 1] as usize);
            let (k0, k1) = (s.kv_indptr[r] as usize, s.kv_indptr[r + 1] as usize);
            assert!(q1 > q0, "request without new tokens");
            assert!(k1 >= k0);
            if kind == StepKind::Decode {
                assert_eq!(q1 - q0, 1, "a decode step adds one token per request");
            }
            let seq_len = s.seq_len[r];
            let my_pages = &s.kv_indices[k0..k1];
            assert_eq!(my_pages.len() as i32, (seq_len + ps - 1) / ps, "pages listed for seq_len {seq_len}");
            assert_eq!(my_pages.iter().collect::<HashSet<_>>().len(), my_pages.len(), "a page listed twice");
            let last = s.kv_last_page_len[r];
            assert!((1..=ps).contains(&last));
            assert_eq!(seq_len, my_pages.len() as i32 * ps - (ps - last));
            let start = seq_len - (q1 - q0) as i32;
            if start == 0 {
                assert!(joined.contains(&slot), "a (re)admitted request in slot {slot} came without its params");
            }
            for i in q0..q1 {
                let pos = s.positions[i];
                assert_eq!(pos, start + (i - q0) as i32, "positions are contiguous and end at seq_len");
                let page = my_pages[(pos / ps) as usize];
                assert_eq!(s.out_loc[i], page * ps + pos % ps, "out_loc inside the request's own page");
                let id = s.input_ids[i];
                let token = if id >= 0 {
                    id as u32
                } else {
                    assert_eq!(id, -(slot + 1), "a decode input names its own slot");
                    self.last_token[slot as usize].expect("the slot has sampled before")
                };
                self.kv[s.out_loc[i] as usize] = Some((token, pos as u32));
            }
            // Attention: read the whole sequence back through the page list.
            let seq: Vec<u32> = (0..seq_len)
                .map(|pos| {
                    let loc = my_pages[(pos / ps) as usize] * ps + pos % ps;
                    let (token, at) = self.kv[loc as usize].expect("every cached position was written");
                    assert_eq!(at, pos as u32, "cell {loc} was overwritten by another sequence");
                    token
                })
                .collect();
            let seed = self.seed[slot as usize].expect("the slot has sampling params");
            let token = (self.model)(&seq, seed);
            self.last_token[slot as usize] = Some(token);
            out.push(token as i32);
        }
        out
    }
}

pub struct StepInfo {
    pub step_id: u64,
    pub kind: StepKind,
    pub num_tokens: u32,
    pub reqs: Vec<PlannedReq>,
}

impl StepInfo {
    fn of(planned: &Planned) -> Self {
        StepInfo {
            step_id: planned.step_id(),
            kind: planned.kind(),
            num_tokens: planned.num_tokens(),
            reqs: planned.reqs().to_vec(),
        }
    }

    pub fn ids(&self) -> Vec<ReqId> {
        self.reqs.iter().map(|r| r.id).collect()
    }
}

/// A core, a fake worker, and a record of every event, with the bookkeeping checked after each call. It keeps up
/// to `depth` steps in flight, the way the engine does.
pub struct Harness {
    pub core: Core,
    pub worker: FakeWorker,
    depth: usize,
    next_step: u64,
    in_flight: VecDeque<Planned>,
    pub outputs: HashMap<ReqId, Vec<u32>>,
    pub finished: HashMap<ReqId, FinishReason>,
    /// Prompt tokens each request found in the prefix cache on its first admission (`Event::Cached`).
    pub cached: HashMap<ReqId, u32>,
    /// Every step planned so far, in order.
    pub planned: Vec<StepInfo>,
    /// The prompt logprobs each request was answered with (`Event::PromptLogprobs`), as the fake worker's
    /// (position, target) pairs, in arrival order.
    pub prompt_logprobs: HashMap<ReqId, Vec<(u32, u32)>>,
    events: Vec<Event>,
}

impl Harness {
    /// One step in flight at a time: plan, run, complete.
    pub fn new(l: Limits, model: Model) -> Self {
        Self::with_depth(l, model, 1)
    }

    /// Up to `depth` steps in flight (2 is the engine's overlap).
    pub fn with_depth(l: Limits, model: Model, depth: usize) -> Self {
        Self::with_policy(l, model, depth, Policy::default())
    }

    pub fn with_policy(l: Limits, model: Model, depth: usize, policy: Policy) -> Self {
        assert!(depth >= 1);
        Harness {
            worker: FakeWorker::new(&l, model),
            core: Core::with_policy(l, policy).expect("valid limits"),
            depth,
            next_step: 0,
            in_flight: VecDeque::new(),
            outputs: HashMap::new(),
            finished: HashMap::new(),
            cached: HashMap::new(),
            planned: vec![],
            prompt_logprobs: HashMap::new(),
            events: vec![],
        }
    }

    pub fn submit(&mut self, id: ReqId, prompt: Vec<u32>, params: SamplingParams) {
        self.core.submit(NewRequest { id, prompt, params }).expect("accepted");
        self.outputs.insert(id, vec![]);
    }

    pub fn finish(&mut self, id: ReqId) -> bool {
        let known = self.core.finish(id);
        if known {
            assert!(self.finished.insert(id, FinishReason::Abort).is_none());
        }
        self.core.check_invariants().unwrap();
        known
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Plans one step and publishes it to the worker, whatever is in flight; `None` when nothing was planned.
    pub fn plan(&mut self) -> Option<StepInfo> {
        self.plan_with_masks(&mut |_, row| row.fill(u32::MAX))
    }

    /// [`Harness::plan`] with the masks of constrained requests written by `masks` (`Core::plan_step_with_masks`).
    pub fn plan_with_masks(&mut self, masks: &mut dyn FnMut(ReqId, &mut [u32])) -> Option<StepInfo> {
        let planned = {
            let mut slot = StepMut::new(&self.worker.layout, self.worker.buf.bytes_mut());
            self.core.plan_step_with_masks(self.next_step, &mut slot, &mut self.events, masks)
        };
        self.record_events();
        self.core.check_invariants().unwrap();
        let planned = planned?;
        assert_eq!(planned.step_id(), self.next_step);
        assert_eq!(self.core.in_flight(), self.in_flight.len() + 1);
        self.next_step += 1;
        self.worker.publish();
        let info = StepInfo::of(&planned);
        self.planned.push(StepInfo::of(&planned));
        self.in_flight.push_back(planned);
        Some(info)
    }

    /// Runs and completes the oldest step in flight; `None` when there is none.
    pub fn complete(&mut self) -> Option<StepInfo> {
        let planned = self.in_flight.pop_front()?;
        let info = StepInfo::of(&planned);
        let tokens = self.worker.run_next();
        self.core.complete_step(planned, &tokens, &mut self.events);
        for e in &self.events {
            if let Event::PromptLogprobs { id, first, count, .. } = *e {
                let answers = &self.worker.prompt_answers;
                let entries = answers.get(first as usize..(first + count) as usize).expect("entries of the result");
                self.prompt_logprobs.entry(id).or_default().extend_from_slice(entries);
            }
        }
        self.record_events();
        self.core.check_invariants().unwrap();
        assert_eq!(self.core.in_flight(), self.in_flight.len());
        Some(info)
    }

    /// What the engine does in one turn: plans while fewer than `depth` steps are in flight, then completes the
    /// oldest. Returns the completed step; `None` when there was nothing to run.
    pub fn step(&mut self) -> Option<StepInfo> {
        while self.in_flight.len() < self.depth && self.plan().is_some() {}
        self.complete()
    }

    /// Steps until idle; returns the number of steps completed.
    pub fn run_to_idle(&mut self, max_steps: usize) -> usize {
        for n in 0..max_steps {
            if self.step().is_none() {
                assert!(self.core.is_idle());
                assert_eq!(self.core.free_pages(), self.core.limits().num_pages, "all pages back when idle");
                return n;
            }
        }
        panic!("not idle after {max_steps} steps");
    }

    fn record_events(&mut self) {
        for e in self.events.drain(..) {
            let id = e.id();
            assert!(!self.finished.contains_key(&id), "event {e:?} for a finished request");
            match e {
                Event::Token { token, .. } => self.outputs.get_mut(&id).expect("a submitted request").push(token),
                Event::Cached { tokens, .. } => {
                    assert!(self.outputs[&id].is_empty(), "{e:?} after the request's first token");
                    assert!(tokens > 0 && self.cached.insert(id, tokens).is_none(), "{e:?} twice or empty");
                }
                Event::Finished { .. } => {}
                Event::PromptLogprobs { .. } => {
                    assert!(self.outputs[&id].is_empty(), "{e:?} after the request's first token");
                }
            }
            if let Some(reason) = e.finish() {
                self.finished.insert(id, reason);
            }
        }
    }
}
