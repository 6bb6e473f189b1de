//! Scenarios for the scheduling core with steps in flight: a step planned before the previous one completes, the
//! one extra step a request pays when its end was not known in advance, frees deferred until the last step using
//! a page or slot completes, and preemption waiting for the pipeline.

mod core_support;

use core_support::{Harness, hash_model, limits, params, position_model, reference_output};
use proto::step::{StepKind, StepMut, StepRef};
use scheduler::core::{Core, Event, FinishReason, NewRequest, SamplingParams};

fn prompt(len: u32, salt: u32) -> Vec<u32> {
    (0..len).map(|i| 1000 + salt * 100 + i).collect()
}

fn seeded(max_tokens: u32, seed: u64) -> SamplingParams {
    SamplingParams { seed, ..params(max_tokens) }
}

fn slot_of(h: &Harness, step: u64, id: u64) -> u32 {
    let s = &h.planned[step as usize];
    s.reqs.iter().find(|r| r.id == id).unwrap_or_else(|| panic!("request {id} is not in step {step}")).slot
}

#[test]
fn the_next_step_is_planned_before_the_previous_one_completes() {
    let mut h = Harness::with_depth(limits(4, 64, 32, 4, 128), hash_model, 2);
    h.submit(1, prompt(5, 1), seeded(4, 1));
    let first = h.plan().unwrap();
    let second = h.plan().unwrap();
    assert_eq!((first.kind, second.kind), (StepKind::Extend, StepKind::Decode));
    assert_eq!((h.in_flight(), h.core.in_flight()), (2, 2));
    assert!(h.outputs[&1].is_empty(), "nothing sampled yet, and the decode is planned all the same");
    // The decode names the token the prefill will sample, by the slot it will be in.
    let step = StepRef::new(&h.worker.layout, h.worker.buf.bytes());
    assert_eq!((step.input_ids, step.positions), (&[-(second.reqs[0].slot as i32) - 1][..], &[5][..]));
    h.run_to_idle(20);
    let (want, reason) = reference_output(&prompt(5, 1), &seeded(4, 1), h.core.limits(), hash_model);
    assert_eq!((&h.outputs[&1], h.finished[&1]), (&want, reason));
}

#[test]
fn a_stop_token_costs_one_extra_step_whose_token_is_dropped() {
    let mut l = limits(2, 16, 8, 4, 128);
    l.eos_token_ids = vec![5];
    // The model samples the position the token takes: 3, 4, then 5, the EOS.
    let mut h = Harness::with_depth(l, position_model, 2);
    h.submit(1, prompt(3, 1), params(10));
    h.plan().unwrap(); // 0: the prompt
    h.plan().unwrap(); // 1: position 3
    h.complete().unwrap();
    h.plan().unwrap(); // 2: position 4, samples the EOS
    h.complete().unwrap();
    // Nobody knows yet that step 2 ends the request: step 3 includes it, and needs a second page for position 5.
    let extra = h.plan().unwrap();
    assert_eq!((extra.step_id, extra.ids()), (3, vec![1]));
    h.complete().unwrap();
    assert_eq!((&h.outputs[&1], h.finished[&1]), (&vec![3, 4, 5], FinishReason::Stop));
    assert_eq!(h.core.running(), 0);
    assert_eq!(h.core.free_pages(), 6, "its two pages wait for step 3, which still writes into the second");
    assert!(h.plan().is_none());
    h.complete().unwrap(); // step 3: its token (6) is dropped, with no event (the harness would panic)
    assert_eq!(h.outputs[&1], vec![3, 4, 5]);
    assert_eq!(h.core.free_pages(), 8);
    assert!(h.core.is_idle());
}

#[test]
fn a_length_limit_known_in_advance_costs_no_extra_step() {
    // max_tokens 3; and a context of 8 with a prompt of 5, which also leaves room for 3 tokens.
    for (max_tokens, max_seq_len, len) in [(3, 128, 3), (100, 8, 5)] {
        let mut h = Harness::with_depth(limits(2, 16, 8, 4, max_seq_len), position_model, 2);
        h.submit(1, prompt(len, 1), params(max_tokens));
        let steps = h.run_to_idle(20);
        assert_eq!((h.outputs[&1].len(), h.finished[&1]), (3, FinishReason::Length));
        assert_eq!((steps, h.planned.len()), (3, 3), "one prefill and two decodes, nothing more");
    }
}

#[test]
fn abort_with_two_steps_in_flight_frees_only_after_both_complete() {
    let mut h = Harness::with_depth(limits(2, 16, 8, 2, 128), hash_model, 2);
    h.submit(1, prompt(3, 1), seeded(50, 1));
    h.submit(2, prompt(3, 2), seeded(50, 2));
    h.step().unwrap(); // 0 (prefill) completed, 1 (decode) in flight
    h.plan().unwrap(); // 2 (decode)
    assert_eq!(h.in_flight(), 2);
    let pages_before = h.core.free_pages();
    let slot_of_1 = slot_of(&h, 2, 1);
    assert!(h.finish(1));
    // Request 3 arrives behind the abort; both slots are still in use by the steps in flight.
    h.submit(3, prompt(3, 3), seeded(4, 3));
    assert_eq!((h.core.running(), h.core.free_pages()), (1, pages_before), "pages wait for steps 1 and 2");

    h.complete().unwrap(); // step 1: request 1's token is dropped
    assert_eq!(h.outputs[&1].len(), 1, "only the prefill's token");
    assert_eq!(h.plan().unwrap().ids(), vec![2], "3: slot 1 still waits for step 2, so 3 cannot be admitted");
    h.complete().unwrap(); // step 2
    assert!(h.core.free_pages() > pages_before, "request 1's pages are back");
    let admitted = h.plan().unwrap();
    assert_eq!((admitted.step_id, admitted.kind, admitted.ids()), (4, StepKind::Extend, vec![2, 3]), "2 decodes");
    assert_eq!(admitted.reqs[1].slot, slot_of_1);
    h.finish(2);
    h.run_to_idle(50);
    let (want, reason) = reference_output(&prompt(3, 3), &seeded(4, 3), h.core.limits(), hash_model);
    assert_eq!((&h.outputs[&3], h.finished[&3]), (&want, reason));
    assert_eq!(h.finished[&1], FinishReason::Abort);
}

/// Request 1 runs alongside request 2 and ends at step N; request 3 waits for a slot. The slot comes back when
/// the last step including 1 completes: N itself when its end was known (max_tokens), N+1 when it was not (EOS).
#[test]
fn a_slot_freed_at_step_n_is_reused_in_n_plus_2_or_n_plus_3() {
    for (eos, earliest) in [(None, 2), (Some(5), 3)] {
        let mut l = limits(2, 16, 16, 4, 128);
        l.eos_token_ids = eos.into_iter().collect();
        let mut h = Harness::with_depth(l, position_model, 2);
        // Position model: the prompt of 3 samples 3, 4, 5; with EOS 5 the third token is a stop nobody could
        // predict, else it reaches max_tokens.
        h.submit(1, prompt(3, 1), params(if eos.is_some() { 10 } else { 3 }));
        h.submit(2, prompt(20, 2), SamplingParams { ignore_eos: true, ..params(20) });
        h.submit(3, prompt(3, 3), params(2));
        let mut admitted_at = None;
        while let Some(s) = h.step() {
            if h.finished.contains_key(&1) && admitted_at.is_none() {
                // Request 1's last token came from step `s`: what has been planned since shows where 3 went.
                let n = s.step_id;
                h.run_to_idle(50);
                let at = h.planned.iter().find(|p| p.ids().contains(&3)).unwrap();
                admitted_at = Some(at.step_id - n);
                assert_eq!(at.reqs.iter().find(|r| r.id == 3).unwrap().slot, slot_of(&h, n, 1), "1's slot");
                break;
            }
        }
        assert_eq!(admitted_at, Some(earliest), "eos {eos:?}");
        assert_eq!(h.outputs[&1], vec![3, 4, 5]);
    }
}

#[test]
fn a_chunk_is_planned_while_the_previous_one_is_in_flight() {
    let mut h = Harness::with_depth(limits(4, 8, 32, 4, 128), hash_model, 2);
    h.submit(1, prompt(20, 1), seeded(3, 1));
    h.plan().unwrap();
    h.plan().unwrap();
    // Steps 0 and 1 were both planned before 0 completed: chunks of 8 and 8.
    let shape: Vec<_> = h.planned.iter().map(|p| (p.kind, p.num_tokens, p.reqs[0].samples)).collect();
    assert_eq!(shape, [(StepKind::Extend, 8, false), (StepKind::Extend, 8, false)]);
    h.complete().unwrap();
    let last_chunk = h.plan().unwrap();
    assert_eq!((last_chunk.kind, last_chunk.num_tokens, last_chunk.reqs[0].samples), (StepKind::Extend, 4, true));
    h.complete().unwrap();
    // The first decode is planned while the last chunk is in flight.
    assert_eq!(h.plan().unwrap().kind, StepKind::Decode);
    assert!(h.outputs[&1].is_empty(), "nothing real sampled before the last chunk completes");
    h.complete().unwrap();
    assert_eq!(h.outputs[&1].len(), 1, "the first token comes from the last chunk");
    h.run_to_idle(20);
    let (want, reason) = reference_output(&prompt(20, 1), &seeded(3, 1), h.core.limits(), hash_model);
    assert_eq!((&h.outputs[&1], h.finished[&1]), (&want, reason));
}

/// The preemption scenario of core_scenarios.rs with overlap: when the decode of step 2 needs pages, step 1 is in
/// flight, so nothing is planned until it completes; then the newest request is preempted as without overlap.
#[test]
fn preemption_waits_for_the_steps_in_flight() {
    let mut h = Harness::with_depth(limits(3, 16, 6, 2, 128), hash_model, 2);
    for id in 1..=3 {
        h.submit(id, prompt(3, id as u32), seeded(if id == 1 { 6 } else { 8 }, id));
    }
    h.step().unwrap(); // 0: prefill, all 6 pages taken; 1: position 3, no new page
    assert_eq!(h.planned.len(), 2);
    assert_eq!(h.step().unwrap().step_id, 1, "position 4 needs pages while 1 is in flight: nothing planned");
    assert_eq!((h.planned.len(), h.core.preemptions()), (2, 0));
    h.step().unwrap();
    assert_eq!(h.core.preemptions(), 1, "with nothing in flight, 3 is preempted");
    assert_eq!(h.planned[2].ids(), vec![1, 2]);
    h.run_to_idle(100);
    for id in 1..=3 {
        let max = if id == 1 { 6 } else { 8 };
        let (want, reason) = reference_output(&prompt(3, id as u32), &seeded(max, id), h.core.limits(), hash_model);
        assert_eq!((&h.outputs[&id], h.finished[&id]), (&want, reason), "request {id}");
    }
}

#[test]
fn a_request_needing_the_whole_cache_ends_where_it_would_without_overlap() {
    let mut h = Harness::with_depth(limits(2, 16, 2, 4, 128), position_model, 2);
    h.submit(1, prompt(3, 1), params(100));
    h.run_to_idle(100);
    assert_eq!((&h.outputs[&1], h.finished[&1]), (&vec![3, 4, 5, 6, 7, 8], FinishReason::Memory));
}

#[test]
fn a_head_that_does_not_fit_is_refused_only_with_nothing_in_flight() {
    // Request 1 holds 2 of 3 pages; 2 needs all 3 for its prompt. It must wait for 1, not end with Memory.
    let mut h = Harness::with_depth(limits(2, 16, 3, 4, 128), position_model, 2);
    h.submit(1, prompt(3, 1), params(2));
    h.submit(2, prompt(12, 2), params(1));
    h.run_to_idle(50);
    assert_eq!((&h.outputs[&1], h.finished[&1]), (&vec![3, 4], FinishReason::Length));
    assert_eq!((&h.outputs[&2], h.finished[&2]), (&vec![12], FinishReason::Length));
}

#[test]
fn failing_both_steps_in_flight_ends_their_requests_once() {
    let l = limits(2, 16, 8, 2, 128);
    let mut core = Core::new(l.clone()).unwrap();
    let mut worker = core_support::FakeWorker::new(&l, hash_model);
    core.submit(NewRequest { id: 1, prompt: prompt(3, 1), params: params(5) }).unwrap();
    let mut events = vec![];
    let mut plan = |core: &mut Core, step_id, events: &mut Vec<Event>| {
        core.plan_step(step_id, &mut StepMut::new(&worker.layout, worker.buf.bytes_mut()), events).unwrap()
    };
    let first = plan(&mut core, 0, &mut events);
    let second = plan(&mut core, 1, &mut events);
    core.fail_step(first, &mut events);
    assert_eq!(events, [Event::Finished { id: 1, reason: FinishReason::Error }]);
    assert_eq!(core.free_pages(), 6, "step 1 still uses its pages");
    core.check_invariants().unwrap();
    core.fail_step(second, &mut events);
    assert_eq!(events.len(), 1, "ended once");
    assert!(core.is_idle());
    assert_eq!(core.free_pages(), 8);
    core.check_invariants().unwrap();
}
