//! Scenarios for the scheduling core, driven through a fake worker that checks every step it runs.

mod core_support;

use core_support::{Harness, hash_model, limits, params, position_model, reference_output};
use proto::step::{StepKind, StepMut, StepRef};
use scheduler::core::{Core, Event, FinishReason, NewRequest, SamplingParams, SubmitError};

fn prompt(len: u32, salt: u32) -> Vec<u32> {
    (0..len).map(|i| 1000 + salt * 100 + i).collect()
}

fn seeded(max_tokens: u32, seed: u64) -> SamplingParams {
    SamplingParams { seed, ..params(max_tokens) }
}

fn joins_of_last_step(h: &Harness) -> u32 {
    StepRef::new(&h.worker.layout, h.worker.buf.bytes()).header.num_joins
}

#[test]
fn a_long_prompt_is_chunked_and_finished_before_anything_new_is_admitted() {
    let mut h = Harness::new(limits(4, 8, 32, 4, 128), hash_model);
    h.submit(1, prompt(20, 1), seeded(3, 1));
    let s = h.step().unwrap();
    assert_eq!((s.kind, s.num_tokens, s.ids()), (StepKind::Extend, 8, vec![1]));
    assert!(!s.reqs[0].samples, "a non-final chunk samples nothing useful");
    assert_eq!(joins_of_last_step(&h), 1);

    // Submitted while request 1 is part-way through: it waits for the rest of 1's prompt.
    h.submit(2, prompt(3, 2), seeded(3, 2));
    let s = h.step().unwrap();
    assert_eq!((s.num_tokens, s.ids()), (8, vec![1]));
    assert_eq!(joins_of_last_step(&h), 0, "params go with the first chunk only");
    assert!(h.outputs[&1].is_empty(), "the garbage sample of a non-final chunk is not a token");

    // The last 4 tokens of 1, then 2 fits in the remaining budget.
    let s = h.step().unwrap();
    assert_eq!((s.kind, s.num_tokens, s.ids()), (StepKind::Extend, 7, vec![1, 2]));
    assert!(s.reqs.iter().all(|r| r.samples));
    assert_eq!(h.outputs[&1].len(), 1);

    let s = h.step().unwrap();
    assert_eq!((s.kind, s.ids()), (StepKind::Decode, vec![1, 2]));
    h.run_to_idle(100);
    for (id, salt) in [(1, 1), (2, 2)] {
        let len = if id == 1 { 20 } else { 3 };
        let (want, reason) = reference_output(&prompt(len, salt), &seeded(3, id), h.core.limits(), hash_model);
        assert_eq!((&h.outputs[&id], h.finished[&id]), (&want, reason));
    }
}

#[test]
fn waiting_requests_are_admitted_in_the_running_ones_decode_step() {
    let mut h = Harness::new(limits(4, 64, 32, 4, 128), hash_model);
    h.submit(1, prompt(5, 1), seeded(10, 1));
    h.step().unwrap();
    assert_eq!(h.step().unwrap().kind, StepKind::Decode);
    h.submit(2, prompt(5, 2), seeded(10, 2));
    h.submit(3, prompt(5, 3), seeded(10, 3));
    let s = h.step().unwrap();
    assert_eq!((s.kind, s.ids()), (StepKind::Extend, vec![1, 2, 3]), "1 decodes, both new prompts join, FCFS");
    assert_eq!(s.num_tokens, 1 + 5 + 5);
    let s = h.step().unwrap();
    assert_eq!((s.kind, s.ids()), (StepKind::Decode, vec![1, 2, 3]), "then everyone decodes together");
    h.run_to_idle(100);
    for id in 1..=3 {
        let (want, reason) = reference_output(&prompt(5, id as u32), &seeded(10, id), h.core.limits(), hash_model);
        assert_eq!((&h.outputs[&id], h.finished[&id]), (&want, reason));
    }
}

#[test]
fn slots_bound_the_batch() {
    let mut h = Harness::new(limits(2, 64, 32, 4, 128), hash_model);
    for id in 1..=3 {
        h.submit(id, prompt(4, id as u32), seeded(2, id));
    }
    assert_eq!(h.step().unwrap().ids(), vec![1, 2]);
    assert_eq!((h.core.running(), h.core.waiting()), (2, 1));
    assert_eq!(h.step().unwrap().ids(), vec![1, 2], "decode; 3 waits for a slot");
    // 1 and 2 ended (max_tokens 2), freeing both slots.
    assert_eq!(h.step().unwrap().ids(), vec![3]);
    h.run_to_idle(10);
}

/// Two pages of two tokens each per request at first; the cache has 6 pages, so the third decode of three
/// requests runs out and the newest is preempted, then the next newest.
#[test]
fn preemption_takes_the_newest_and_resume_gives_back_its_place() {
    let mut h = Harness::new(limits(3, 16, 6, 2, 128), hash_model);
    for id in 1..=3 {
        h.submit(id, prompt(3, id as u32), seeded(if id == 1 { 6 } else { 8 }, id));
    }
    assert_eq!(h.step().unwrap().ids(), vec![1, 2, 3]); // prefill: 2 pages each, all 6 taken
    assert_eq!(h.step().unwrap().ids(), vec![1, 2, 3]); // position 3: still in the second page
    // Position 4 needs a third page each: 3 is preempted, which frees enough for 1 and 2.
    assert_eq!(h.step().unwrap().ids(), vec![1, 2]);
    assert_eq!((h.core.preemptions(), h.core.waiting()), (1, 1));
    // A newcomer queues behind the preempted request.
    h.submit(4, prompt(3, 4), seeded(2, 4));
    assert_eq!(h.step().unwrap().ids(), vec![1, 2]); // position 5: no new page
    // Position 6 needs pages again: 2 goes back too, in front of 3.
    assert_eq!(h.step().unwrap().ids(), vec![1]);
    assert_eq!((h.core.preemptions(), h.core.waiting()), (2, 3));
    // 1 runs alone until it ends (max_tokens 6), then 2 and 3 return in their admission order, then 4.
    let mut admissions = vec![];
    while let Some(s) = h.step() {
        if s.kind == StepKind::Extend {
            admissions.extend(s.ids());
            assert_eq!(joins_of_last_step(&h) as usize, s.reqs.len(), "params re-sent on re-admission");
        }
    }
    assert_eq!(admissions, vec![2, 3, 4]);
    // Recomputing after a preemption changes nothing in the output.
    for id in 1..=4 {
        let max = [6, 8, 8, 2][id as usize - 1];
        let (want, reason) = reference_output(&prompt(3, id as u32), &seeded(max, id), h.core.limits(), hash_model);
        assert_eq!((&h.outputs[&id], h.finished[&id]), (&want, reason), "request {id}");
    }
    assert_eq!(h.core.free_pages(), 6);
}

#[test]
fn admission_reserves_the_pages_running_requests_decode_into() {
    // Request 1's prompt of 4 fills a page exactly, so its first decode needs a second page.
    let mut h = Harness::new(limits(2, 16, 3, 4, 128), hash_model);
    h.submit(1, prompt(4, 1), seeded(8, 1));
    h.step().unwrap();
    // Two pages are free, and 2 needs two for its prompt: admitting it would preempt it at once.
    h.submit(2, prompt(5, 2), seeded(8, 2));
    let s = h.step().unwrap();
    assert_eq!((s.kind, s.ids()), (StepKind::Decode, vec![1]));
    assert_eq!(h.core.preemptions(), 0);
    h.run_to_idle(100);
}

#[test]
fn a_request_that_needs_the_whole_cache_ends_with_memory() {
    // Two pages of 4: 8 cached tokens at most. The prompt is 3; tokens sampled at positions 3..=8 fit, the
    // decode that would cache position 8 does not.
    let mut h = Harness::new(limits(2, 16, 2, 4, 128), position_model);
    h.submit(1, prompt(3, 1), params(100));
    h.run_to_idle(100);
    assert_eq!(h.outputs[&1], vec![3, 4, 5, 6, 7, 8]);
    assert_eq!(h.finished[&1], FinishReason::Memory);
}

#[test]
fn abort_mid_prefill_frees_everything_and_the_next_request_goes_on() {
    let mut h = Harness::new(limits(2, 4, 8, 2, 128), hash_model);
    h.submit(1, prompt(10, 1), seeded(3, 1));
    h.submit(2, prompt(3, 2), seeded(3, 2));
    assert!(!h.step().unwrap().reqs[0].samples);
    assert!(h.core.free_pages() < 8);
    assert!(h.finish(1));
    assert!(!h.core.finish(1), "already gone");
    assert_eq!((h.core.running(), h.core.free_pages()), (0, 8));
    assert_eq!(h.step().unwrap().ids(), vec![2], "nothing left of 1's prefill");
    h.run_to_idle(10);
    assert_eq!(h.outputs[&1], Vec::<u32>::new());
}

#[test]
fn abort_mid_decode_and_while_waiting_frees_everything() {
    let mut h = Harness::new(limits(1, 16, 8, 2, 128), hash_model);
    h.submit(1, prompt(3, 1), seeded(50, 1));
    h.submit(2, prompt(3, 2), seeded(50, 2));
    h.step().unwrap();
    h.step().unwrap();
    assert!(h.finish(2), "waiting");
    assert!(h.finish(1), "decoding");
    assert!(h.core.is_idle());
    assert_eq!(h.core.free_pages(), 8);
    assert!(h.step().is_none());
    assert_eq!(h.outputs[&1].len(), 2);
}

#[test]
fn a_request_finished_between_planning_and_completion_is_skipped() {
    let l = limits(2, 16, 8, 2, 128);
    let mut core = Core::new(l.clone()).unwrap();
    let mut worker = core_support::FakeWorker::new(&l, hash_model);
    core.submit(NewRequest { id: 1, prompt: prompt(3, 1), params: params(5) }).unwrap();
    core.submit(NewRequest { id: 2, prompt: prompt(3, 2), params: params(5) }).unwrap();
    let mut events = vec![];
    let planned = core.plan_step(0, &mut StepMut::new(&worker.layout, worker.buf.bytes_mut()), &mut events).unwrap();
    let tokens = worker.run();
    assert!(core.finish(1));
    core.complete_step(planned, &tokens, &mut events);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].id(), 2);
    core.check_invariants().unwrap();
}

#[test]
fn max_tokens_eos_stop_ids_and_ignore_eos() {
    let mut l = limits(4, 64, 32, 4, 128);
    l.eos_token_ids = vec![6, 99];
    let mut h = Harness::new(l, position_model);
    // The model samples the position the token takes: 3, 4, 5, ...
    h.submit(1, prompt(3, 1), params(10));
    h.submit(2, prompt(3, 2), SamplingParams { ignore_eos: true, ..params(5) });
    h.submit(3, prompt(3, 3), SamplingParams { ignore_eos: true, stop_token_ids: vec![5], ..params(10) });
    h.submit(4, prompt(3, 4), params(2));
    h.run_to_idle(50);
    assert_eq!((&h.outputs[&1], h.finished[&1]), (&vec![3, 4, 5, 6], FinishReason::Stop));
    assert_eq!((&h.outputs[&2], h.finished[&2]), (&vec![3, 4, 5, 6, 7], FinishReason::Length));
    assert_eq!((&h.outputs[&3], h.finished[&3]), (&vec![3, 4, 5], FinishReason::Stop));
    assert_eq!((&h.outputs[&4], h.finished[&4]), (&vec![3, 4], FinishReason::Length));
}

#[test]
fn the_context_length_ends_a_request() {
    let mut h = Harness::new(limits(2, 64, 32, 4, 8), position_model);
    h.submit(1, prompt(5, 1), params(100));
    h.submit(2, prompt(7, 2), params(100));
    h.run_to_idle(50);
    assert_eq!((&h.outputs[&1], h.finished[&1]), (&vec![5, 6, 7], FinishReason::Length));
    assert_eq!((&h.outputs[&2], h.finished[&2]), (&vec![7], FinishReason::Length));
}

#[test]
fn submit_refuses_what_cannot_run() {
    let mut core = Core::new(limits(2, 64, 4, 4, 100)).unwrap();
    let req = |prompt: Vec<u32>, max_tokens| NewRequest { id: 1, prompt, params: params(max_tokens) };
    assert_eq!(core.submit(req(vec![], 1)), Err(SubmitError::EmptyPrompt));
    assert_eq!(core.submit(req(vec![1; 17], 1)), Err(SubmitError::PromptTooLong { len: 17, max: 16 }));
    assert_eq!(core.submit(req(vec![1, 1 << 31], 1)), Err(SubmitError::TokenOutOfRange(1 << 31)));
    assert_eq!(core.submit(req(vec![1], 0)), Err(SubmitError::ZeroMaxTokens));
    assert_eq!(core.submit(req(vec![1; 16], 1)), Ok(()));
    let mut ctx = Core::new(limits(2, 64, 100, 4, 10)).unwrap();
    assert_eq!(ctx.submit(req(vec![1; 10], 1)), Err(SubmitError::PromptTooLong { len: 10, max: 9 }));
    assert!(core.waiting() == 1 && ctx.is_idle());
}

#[test]
fn a_failed_step_or_a_non_token_ends_its_requests_with_error() {
    let l = limits(2, 16, 8, 2, 128);
    let mut core = Core::new(l.clone()).unwrap();
    let mut worker = core_support::FakeWorker::new(&l, hash_model);
    for id in 1..=2 {
        core.submit(NewRequest { id, prompt: prompt(3, id as u32), params: params(5) }).unwrap();
    }
    let mut events = vec![];
    let mut plan = |core: &mut Core, step_id, events: &mut Vec<Event>| {
        core.plan_step(step_id, &mut StepMut::new(&worker.layout, worker.buf.bytes_mut()), events).unwrap()
    };
    let planned = plan(&mut core, 0, &mut events);
    core.complete_step(planned, &[7, -1], &mut events);
    assert_eq!(events[1], Event::Finished { id: 2, reason: FinishReason::Error });
    let planned = plan(&mut core, 1, &mut events);
    core.fail_step(planned, &mut events);
    assert_eq!(events[2], Event::Finished { id: 1, reason: FinishReason::Error });
    assert!(core.is_idle());
    assert_eq!(core.free_pages(), 8);
    core.check_invariants().unwrap();
}

#[test]
#[should_panic(expected = "step ids must increase")]
fn step_ids_must_increase() {
    let l = limits(2, 16, 8, 2, 128);
    let mut core = Core::new(l.clone()).unwrap();
    let mut worker = core_support::FakeWorker::new(&l, hash_model);
    core.submit(NewRequest { id: 1, prompt: prompt(3, 1), params: params(5) }).unwrap();
    let mut events = vec![];
    for step_id in [4, 4] {
        core.plan_step(step_id, &mut StepMut::new(&worker.layout, worker.buf.bytes_mut()), &mut events);
    }
}

#[test]
#[should_panic(expected = "oldest step in flight")]
fn steps_complete_in_the_order_they_were_planned() {
    let l = limits(2, 16, 8, 2, 128);
    let mut core = Core::new(l.clone()).unwrap();
    let mut worker = core_support::FakeWorker::new(&l, hash_model);
    core.submit(NewRequest { id: 1, prompt: prompt(3, 1), params: params(5) }).unwrap();
    let mut events = vec![];
    let mut plan = |core: &mut Core, step_id| {
        core.plan_step(step_id, &mut StepMut::new(&worker.layout, worker.buf.bytes_mut()), &mut events).unwrap()
    };
    let _first = plan(&mut core, 0);
    let second = plan(&mut core, 1);
    core.complete_step(second, &[5], &mut vec![]);
}

#[test]
fn sampling_options_reach_the_join_arrays_and_default_to_off() {
    let mut h = Harness::new(limits(4, 64, 32, 4, 128), hash_model);
    let options = SamplingParams {
        min_p: 0.1,
        presence_penalty: 0.5,
        frequency_penalty: -0.5,
        repetition_penalty: 1.2,
        logit_bias: vec![(7, -100.0), (8, 2.5)],
        logprobs: Some(20),
        ..seeded(3, 1)
    };
    h.submit(1, prompt(5, 1), options);
    h.submit(2, prompt(5, 2), seeded(3, 2));
    h.submit(3, prompt(5, 3), SamplingParams { logit_bias: vec![(9, 1.0)], logprobs: Some(0), ..seeded(3, 3) });
    h.step().unwrap();
    let s = StepRef::new(&h.worker.layout, h.worker.buf.bytes());
    assert_eq!((s.header.num_joins, s.header.num_bias), (3, 3));
    assert_eq!(s.join_min_p, &[0.1, 0.0, 0.0]);
    assert_eq!(s.join_presence_penalty, &[0.5, 0.0, 0.0]);
    assert_eq!(s.join_frequency_penalty, &[-0.5, 0.0, 0.0]);
    assert_eq!(s.join_repetition_penalty, &[1.2, 1.0, 1.0]);
    assert_eq!(s.join_logprobs, &[20, -1, 0]);
    assert_eq!(s.join_bias_indptr, &[0, 2, 2, 3]);
    assert_eq!((s.join_bias_ids, s.join_bias_values), (&[7, 8, 9][..], &[-100.0, 2.5, 1.0][..]));
    h.run_to_idle(100);
    assert_eq!(h.outputs.len(), 3);
}
