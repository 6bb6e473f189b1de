//! What the scheduler spends per decode step: 256 running requests with contexts of about 1,000 tokens (pages of
//! 16, so about 63 page indices each), planning into a slot buffer and completing with dummy tokens.
//!
//! As the engine runs it with overlap: step N+1 is planned while step N is in flight, then N is completed. The
//! plan of a step with nothing in flight (overlap off) is measured too, for comparison.
//!
//! Each decode step grows every context by one, so the core is restored from a snapshot every `RESET_EVERY` steps
//! (untimed): contexts stay between 1,000 and 1,066 tokens however many iterations criterion asks for.

use criterion::{Criterion, criterion_group, criterion_main};
use proto::step::{SlotBuf, StepKind, StepLayout, StepMut};
use scheduler::core::{Core, Event, Limits, NewRequest, Planned, SamplingParams};
use std::hint::black_box;
use std::time::{Duration, Instant};

const REQS: u32 = 256;
const CONTEXT: u32 = 1000;
const PAGE: u32 = 16;
const RESET_EVERY: u64 = 64;

/// Which call a run times.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Timed {
    /// Planning step N+1 while step N is in flight.
    PlanOverlapped,
    /// Completing step N while step N+1 is in flight.
    CompleteOverlapped,
    /// Planning with nothing in flight (overlap off).
    PlanAlone,
}

struct Bench {
    base: Core,
    /// The id of the first step planned from `base`.
    first_step: u64,
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
            vocab_size: 0,
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

                ..Default::default()
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
        assert_eq!((core.running(), core.waiting(), core.in_flight()), (REQS as usize, 0, 0));
        Bench { base: core, first_step: step_id, layout, buf, tokens, events }
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

    /// Runs `iters` decode steps, restoring the snapshot every RESET_EVERY, and times what `timed` says.
    fn run(&mut self, iters: u64, timed: Timed) -> Duration {
        let overlap = timed != Timed::PlanAlone;
        let mut core = self.base.clone();
        let mut step_id = self.first_step;
        let mut in_flight = None;
        let mut total = Duration::ZERO;
        for i in 0..iters {
            if i % RESET_EVERY == 0 {
                // Drops the old core's step in flight with it.
                core = self.base.clone();
                step_id = self.first_step;
                in_flight = None;
            }
            if overlap && in_flight.is_none() {
                // The step the worker would be running while the timed one is planned.
                in_flight = Some(self.plan(&mut core, step_id));
                step_id += 1;
            }
            let t = Instant::now();
            let planned = self.plan(&mut core, step_id);
            if timed != Timed::CompleteOverlapped {
                total += t.elapsed();
            }
            step_id += 1;
            debug_assert_eq!(planned.kind(), StepKind::Decode);
            let planned = black_box(planned);
            let done = if overlap { in_flight.replace(planned).expect("a step in flight") } else { planned };
            let t = Instant::now();
            self.complete(&mut core, done);
            if timed == Timed::CompleteOverlapped {
                total += t.elapsed();
            }
            self.check_events();
        }
        total
    }
}

fn step_build(c: &mut Criterion) {
    let mut bench = Bench::new();
    c.bench_function("plan_step decode 256 reqs x 1000 tokens, one step in flight", |b| {
        b.iter_custom(|iters| bench.run(iters, Timed::PlanOverlapped))
    });
    c.bench_function("complete_step decode 256 reqs, one step in flight", |b| {
        b.iter_custom(|iters| bench.run(iters, Timed::CompleteOverlapped))
    });
    c.bench_function("plan_step decode 256 reqs x 1000 tokens, nothing in flight", |b| {
        b.iter_custom(|iters| bench.run(iters, Timed::PlanAlone))
    });
}

criterion_group!(benches, step_build);
criterion_main!(benches);
