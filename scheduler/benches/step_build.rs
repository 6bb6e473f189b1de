//! What the scheduler spends per decode step: 256 running requests with contexts of about 1,000 tokens (pages of
//! 16, so about 63 page indices each), planning into a slot buffer and completing with dummy tokens.
//!
//! Each decode step grows every context by one, so the core is restored from a snapshot every `RESET_EVERY` steps
//! (untimed): contexts stay between 1,000 and 1,064 tokens however many iterations criterion asks for.

use criterion::{Criterion, criterion_group, criterion_main};
use proto::step::{SlotBuf, StepKind, StepLayout, StepMut};
use scheduler::core::{Core, Event, Limits, NewRequest, Planned, SamplingParams};
use std::hint::black_box;
use std::time::{Duration, Instant};

const REQS: u32 = 256;
const CONTEXT: u32 = 1000;
const PAGE: u32 = 16;
const RESET_EVERY: u64 = 64;

struct Bench {
    base: Core,
    layout: StepLayout,
    buf: SlotBuf,
    tokens: Vec<i32>,
    events: Vec<Event>,
}

impl Bench {
    /// Admits every request and runs the prefill, so the next step and all after it are decode steps.
    fn new() -> Self {
        let limits = Limits {
            max_batch: REQS,
            max_step_tokens: 8192,
            num_pages: REQS * (CONTEXT + 2 * RESET_EVERY as u32).div_ceil(PAGE),
            page_size: PAGE,
            max_seq_len: 32768,
            eos_token_ids: vec![2],
        };
        let layout = StepLayout::new(limits.capacity());
        let mut core = Core::new(limits).unwrap();
        for id in 0..REQS as u64 {
            let params = SamplingParams {
                max_tokens: 4096,
                temperature: 0.8,
                top_p: 0.95,
                top_k: 40,
                seed: id,
                stop_token_ids: vec![7, 8],
                ignore_eos: false,
            };
            // One token short: the prefill's sample brings each context to CONTEXT.
            let prompt = (0..CONTEXT - 1).map(|i| 100 + (i + id as u32) % 30000).collect();
            core.submit(NewRequest { id, prompt, params }).unwrap();
        }
        // Prefill until every request has sampled its first token: from then on every step is a decode step.
        let (mut buf, mut events, tokens) = (SlotBuf::zeroed(layout.slot_bytes), vec![], vec![1234; REQS as usize]);
        let mut sampled = 0;
        let mut step_id = 0;
        while sampled < REQS as usize {
            let planned = core.plan_step(step_id, &mut StepMut::new(&layout, buf.bytes_mut()), &mut events).unwrap();
            assert_eq!(planned.kind(), StepKind::Extend);
            let n = planned.num_reqs();
            core.complete_step(planned, &tokens[..n], &mut events);
            sampled += events.drain(..).count();
            step_id += 1;
        }
        assert_eq!((core.running(), core.waiting()), (REQS as usize, 0));
        Bench { base: core, layout, buf, tokens, events }
    }

    fn plan(&mut self, core: &mut Core, step_id: u64) -> Planned {
        let mut step = StepMut::new(&self.layout, self.buf.bytes_mut());
        core.plan_step(step_id, &mut step, &mut self.events).expect("requests are running")
    }

    fn complete(&mut self, core: &mut Core, planned: Planned) {
        let n = planned.num_reqs();
        core.complete_step(planned, &self.tokens[..n], &mut self.events);
    }

    fn check_events(&mut self) {
        assert!(self.events.iter().all(|e| e.finish().is_none()), "nothing ends during the bench");
        self.events.clear();
    }

    /// Runs `iters` decode steps, restoring the snapshot every RESET_EVERY; times planning or completing.
    fn run(&mut self, iters: u64, time_plan: bool) -> Duration {
        let mut core = self.base.clone();
        let mut total = Duration::ZERO;
        for i in 0..iters {
            if i % RESET_EVERY == 0 && i > 0 {
                core = self.base.clone();
            }
            let t = Instant::now();
            let planned = self.plan(&mut core, i);
            debug_assert_eq!(planned.kind(), StepKind::Decode);
            if time_plan {
                total += t.elapsed();
            }
            let planned = black_box(planned);
            let t = Instant::now();
            self.complete(&mut core, planned);
            if !time_plan {
                total += t.elapsed();
            }
            self.check_events();
        }
        total
    }
}

fn step_build(c: &mut Criterion) {
    let mut bench = Bench::new();
    c.bench_function("plan_step decode 256 reqs x 1000 tokens", |b| b.iter_custom(|iters| bench.run(iters, true)));
    c.bench_function("complete_step decode 256 reqs", |b| b.iter_custom(|iters| bench.run(iters, false)));
}

criterion_group!(benches, step_build);
criterion_main!(benches);
