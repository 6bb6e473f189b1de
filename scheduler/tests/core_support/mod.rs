//! A fake worker and a driver for testing the scheduling core end to end, without processes or rings.
//!
//! The fake worker does what the real one does with a step, minus the maths: it checks that the arrays are
//! consistent, writes each new token's id and position into a simulated paged KV cache at `out_loc`, and then
//! "samples" from the sequence it reads back through `kv_indices`. A toy model turns that sequence and the slot's
//! joined seed into a token. So if pages were shared, mislisted or reused too early, or a join went missing, the
//! tokens would differ from what the same request produces alone: comparing against [`reference_output`] checks
//! all of it at once.
#![allow(dead_code)] // each test file uses a different part

use proto::step::{SlotBuf, StepKind, StepLayout, StepMut, StepRef};
use scheduler::core::{Core, Event, FinishReason, Limits, NewRequest, PlannedReq, ReqId, SamplingParams};
use std::collections::{HashMap, HashSet};

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
    }
}

pub fn limits(max_batch: u32, max_step_tokens: u32, num_pages: u32, page_size: u32, max_seq_len: u32) -> Limits {
    Limits { max_batch, max_step_tokens, num_pages, page_size, max_seq_len, eos_token_ids: vec![] }
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
    pub buf: SlotBuf,
    page_size: u32,
    /// (token id, position) per KV cell.
    kv: Vec<Option<(u32, u32)>>,
    last_token: Vec<Option<u32>>,
    seed: Vec<Option<u64>>,
    model: Model,
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
        }
    }

    /// Checks the step in `self.buf`, runs it and returns one token per request. Panics on any inconsistency.
    pub fn run(&mut self) -> Vec<i32> {
        let s = StepRef::new(&self.layout, self.buf.bytes());
        let ps = self.page_size as i32;
        let h = s.header;
        let (n, t, k) = (h.num_reqs as usize, h.num_tokens as usize, h.num_kv_indices as usize);
        let kind = StepKind::from_u32(h.kind).expect("valid kind");
        assert!(n > 0, "an empty step");
        assert_eq!((s.qo_indptr[0], s.kv_indptr[0]), (0, 0));
        assert_eq!((s.qo_indptr[n] as usize, s.kv_indptr[n] as usize), (t, k));

        // Joins first: the step's sampling uses them.
        let mut joined = HashSet::new();
        for (i, &slot) in s.join_slot.iter().enumerate() {
            assert!(s.req_slot.contains(&slot), "join for slot {slot}, which is not in the step");
            assert!(joined.insert(slot), "slot {slot} joined twice");
            self.seed[slot as usize] = Some(s.join_seed[i]);
        }

        let mut slots = HashSet::new();
        let mut pages = HashSet::new();
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
            let last = s.kv_last_page_len[r];
            assert!((1..=ps).contains(&last));
            assert_eq!(seq_len, my_pages.len() as i32 * ps - (ps - last));
            for &p in my_pages {
                assert!(pages.insert(p), "page {p} listed for two requests of one step");
            }
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
    pub kind: StepKind,
    pub num_tokens: u32,
    pub reqs: Vec<PlannedReq>,
}

impl StepInfo {
    pub fn ids(&self) -> Vec<ReqId> {
        self.reqs.iter().map(|r| r.id).collect()
    }
}

/// A core, a fake worker, and a record of every event, with the bookkeeping checked after each call.
pub struct Harness {
    pub core: Core,
    pub worker: FakeWorker,
    next_step: u64,
    pub outputs: HashMap<ReqId, Vec<u32>>,
    pub finished: HashMap<ReqId, FinishReason>,
    events: Vec<Event>,
}

impl Harness {
    pub fn new(l: Limits, model: Model) -> Self {
        Harness {
            worker: FakeWorker::new(&l, model),
            core: Core::new(l).expect("valid limits"),
            next_step: 0,
            outputs: HashMap::new(),
            finished: HashMap::new(),
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

    /// Plans, runs and completes one step; `None` when the core is idle.
    pub fn step(&mut self) -> Option<StepInfo> {
        let planned = {
            let mut slot = StepMut::new(&self.worker.layout, self.worker.buf.bytes_mut());
            self.core.plan_step(self.next_step, &mut slot, &mut self.events)
        };
        self.record_events();
        let planned = planned?;
        self.core.check_invariants().unwrap();
        assert_eq!(planned.step_id(), self.next_step);
        self.next_step += 1;
        let info = StepInfo { kind: planned.kind(), num_tokens: planned.num_tokens(), reqs: planned.reqs().to_vec() };
        let tokens = self.worker.run();
        self.core.complete_step(planned, &tokens, &mut self.events);
        self.record_events();
        self.core.check_invariants().unwrap();
        Some(info)
    }

    /// Steps until idle; returns the number of steps.
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
            if let Event::Token { token, .. } = e {
                self.outputs.get_mut(&id).expect("a submitted request").push(token);
            }
            if let Some(reason) = e.finish() {
                self.finished.insert(id, reason);
            }
        }
    }
}
