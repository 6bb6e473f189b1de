//! The prefix cache, mixed steps and the admission policy, seen through the fake worker: reuse must show up in
//! what steps carry, and never in what requests generate.

mod core_support;

use core_support::{Harness, hash_model, limits, params, reference_output};
use proto::step::StepKind;
use scheduler::core::{FinishReason, Limits, Order, Policy, ReqId, SamplingParams};

fn seeded(max_tokens: u32, seed: u64) -> SamplingParams {
    SamplingParams { seed, ..params(max_tokens) }
}

fn words(len: u32, salt: u32) -> Vec<u32> {
    (0..len).map(|i| 1000 + salt * 100 + i).collect()
}

fn cache_off() -> Policy {
    Policy { prefix_cache: false, ..Policy::default() }
}

fn assert_alone(h: &Harness, id: ReqId, prompt: &[u32], p: &SamplingParams) {
    let (want, reason) = reference_output(prompt, p, h.core.limits(), hash_model);
    assert_eq!((&h.outputs[&id], h.finished[&id]), (&want, reason), "request {id}");
}

#[test]
fn a_second_turn_reuses_the_first_turns_pages_and_gives_the_same_tokens() {
    for policy in [Policy::default(), cache_off()] {
        let on = policy.prefix_cache;
        let mut h = Harness::with_policy(limits(4, 64, 32, 4, 128), hash_model, 2, policy);
        let turn1 = words(21, 1);
        h.submit(1, turn1.clone(), seeded(8, 1));
        h.run_to_idle(100);
        // The history: the first prompt, its answer, and a new question.
        let mut turn2 = turn1.clone();
        turn2.extend(&h.outputs[&1]);
        turn2.extend(words(5, 2));
        h.submit(2, turn2.clone(), seeded(8, 2));
        let first = h.step().unwrap();
        h.run_to_idle(100);
        assert_alone(&h, 1, &turn1, &seeded(8, 1));
        assert_alone(&h, 2, &turn2, &seeded(8, 2));
        // 21 + 8 tokens are known, the KV of 28 is written (the last sample's is not): 7 whole pages.
        let cached = if on { 28 } else { 0 };
        assert_eq!(h.cached.get(&2).copied().unwrap_or(0), cached, "cache on: {on}");
        assert_eq!(first.num_tokens, turn2.len() as u32 - cached, "only the uncached part is prefilled");
        let stats = h.core.cache_stats();
        assert_eq!((stats.prompt_tokens, stats.cached_tokens), (21 + 34, cached as u64));
        // The second turn's 34 + 8 - 1 written tokens fill 10 pages, the first turn's 7 among them.
        assert_eq!(stats.cached_pages, if on { 10 } else { 0 });
    }
}

#[test]
fn a_burst_sharing_a_system_prompt_prefills_it_once() {
    let mut h = Harness::with_depth(limits(8, 256, 64, 4, 128), hash_model, 2);
    let system = words(40, 9);
    let prompts: Vec<Vec<u32>> = (1..=6).map(|id| [system.clone(), words(3, id)].concat()).collect();
    for (i, p) in prompts.iter().enumerate() {
        h.submit(i as ReqId + 1, p.clone(), seeded(4, i as u64));
    }
    let first = h.plan().unwrap();
    assert_eq!(first.ids(), [1], "the others would reuse pages this step writes: they wait one step");
    let second = h.plan().unwrap();
    assert_eq!(second.ids(), [1, 2, 3, 4, 5, 6], "1 decodes (its prefill is in flight), the rest join");
    assert_eq!(second.num_tokens, 1 + 5 * 3, "each computes only its own question");
    h.run_to_idle(100);
    for (i, p) in prompts.iter().enumerate() {
        let id = i as ReqId + 1;
        assert_alone(&h, id, p, &seeded(4, i as u64));
        assert_eq!(h.cached.get(&id).copied(), (id > 1).then_some(40));
    }
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_beside_every_decode() {
    let mut h = Harness::with_depth(limits(4, 16, 64, 4, 256), hash_model, 2);
    h.submit(1, words(5, 1), SamplingParams { ignore_eos: true, ..seeded(40, 1) });
    h.step().unwrap();
    h.submit(2, words(100, 2), seeded(3, 2));
    let mut chunks = 0;
    while !h.finished.contains_key(&2) {
        let s = h.step().unwrap();
        assert!(s.num_tokens <= 16);
        assert!(s.ids().contains(&1), "step {} left the running request out: {:?}", s.step_id, s.ids());
        if s.kind == StepKind::Extend {
            chunks += 1;
            assert_eq!(s.reqs[0].id, 1, "decodes come first");
        }
    }
    assert_eq!(chunks, 100_usize.div_ceil(15), "15 prompt tokens beside the one decode per step");
    h.run_to_idle(100);
    assert_alone(&h, 1, &words(5, 1), &SamplingParams { ignore_eos: true, ..seeded(40, 1) });
    assert_alone(&h, 2, &words(100, 2), &seeded(3, 2));
}

#[test]
fn memory_pressure_preempts_and_readmission_finds_the_victim_cached() {
    // 12 pages of 4 tokens for 4 requests that each grow to 10 + 20 tokens: they cannot all run.
    let l = Limits { eos_token_ids: vec![], ..limits(4, 64, 12, 4, 128) };
    let mut h = Harness::with_depth(l, hash_model, 2);
    let p = SamplingParams { ignore_eos: true, ..seeded(20, 0) };
    for id in 1..=4 {
        h.submit(id, words(10, id as u32), SamplingParams { seed: id, ..p.clone() });
    }
    h.run_to_idle(1000);
    assert!(h.core.preemptions() > 0);
    for id in 1..=4 {
        assert_alone(&h, id, &words(10, id as u32), &SamplingParams { seed: id, ..p.clone() });
    }
    let stats = h.core.cache_stats();
    assert!(stats.cached_tokens > 0, "re-admissions reuse what the victims wrote: {stats:?}");
}

#[test]
fn lpm_admits_the_longest_cached_prefix_first_and_aged_requests_before_that() {
    for (max_wait_steps, want) in [(1000, [3, 2]), (0, [2, 3])] {
        let policy = Policy { order: Order::Lpm, max_wait_steps, ..Policy::default() };
        let mut h = Harness::with_policy(limits(2, 64, 64, 4, 128), hash_model, 1, policy);
        let shared = words(16, 7);
        h.submit(1, [shared.clone(), words(2, 1)].concat(), seeded(1, 1));
        h.run_to_idle(10);
        // Two long requests hold both slots while 2 (no cached prefix) and 3 (16 cached tokens) arrive and wait a
        // step; then one slot comes free.
        for id in [10, 11] {
            h.submit(id, words(3, id as u32), SamplingParams { ignore_eos: true, ..seeded(30, id) });
        }
        h.step().unwrap();
        h.submit(2, words(18, 2), seeded(2, 2));
        h.submit(3, [shared.clone(), words(2, 3)].concat(), seeded(2, 3));
        h.step().unwrap();
        h.finish(11);
        let admitted = h.step().unwrap();
        assert_eq!(admitted.ids()[1..], want[..1], "max_wait_steps {max_wait_steps}");
        h.finish(10);
        h.run_to_idle(100);
        let first = h.planned.iter().position(|s| s.ids().contains(&want[1])).unwrap();
        let before = h.planned.iter().position(|s| s.ids().contains(&want[0])).unwrap();
        assert!(before < first);
    }
}

#[test]
fn with_the_cache_off_nothing_is_shared_or_reported() {
    let mut h = Harness::with_policy(limits(4, 256, 64, 4, 128), hash_model, 2, cache_off());
    for id in 1..=4 {
        h.submit(id, words(30, 0), seeded(5, id));
    }
    let s = h.plan().unwrap();
    assert_eq!((s.ids().len(), s.num_tokens), (4, 120), "all four prefill the same prompt together");
    h.run_to_idle(100);
    assert!(h.cached.is_empty());
    let stats = h.core.cache_stats();
    assert_eq!((stats.prompt_tokens, stats.cached_tokens, stats.cached_pages), (120, 0, 0));
    for id in 1..=4 {
        assert_alone(&h, id, &words(30, 0), &seeded(5, id));
        assert_eq!(h.finished[&id], FinishReason::Length);
    }
}

/// (position, target) for every prompt position whose successor is a prompt token: what a request asking for
/// its prompt's logprobs must be answered with, each once.
fn every_successor(prompt: &[u32]) -> Vec<(u32, u32)> {
    (1..prompt.len()).map(|p| (p as u32 - 1, prompt[p])).collect()
}

#[test]
fn prompt_logprobs_compute_the_whole_prompt_over_its_chunks_and_leave_it_cached_for_others() {
    let mut h = Harness::with_depth(limits(4, 16, 64, 4, 128), hash_model, 2);
    let prompt = words(30, 3);
    h.submit(1, prompt.clone(), seeded(4, 1));
    h.run_to_idle(100);
    let asking = SamplingParams { prompt_logprobs: Some(5), ..seeded(4, 2) };
    h.submit(2, prompt.clone(), asking.clone());
    h.run_to_idle(100);
    assert!(!h.cached.contains_key(&2), "it needs every position's logits: nothing from the cache");
    let prefill: u32 =
        h.planned.iter().filter(|s| s.ids() == [2] && s.kind == StepKind::Extend).map(|s| s.num_tokens).sum();
    assert_eq!(prefill, 30, "the whole prompt, in chunks of the step's budget");
    assert_eq!(h.prompt_logprobs[&2], every_successor(&prompt));
    assert_alone(&h, 2, &prompt, &asking);
    // The next plain request takes the prompt from the cache again.
    h.submit(3, prompt.clone(), seeded(4, 3));
    h.run_to_idle(100);
    assert_eq!(h.cached[&3], 28);
    assert!(!h.prompt_logprobs.contains_key(&1) && !h.prompt_logprobs.contains_key(&3));
}

#[test]
fn preempted_requests_are_never_asked_for_a_prompt_position_twice() {
    // As above: 12 pages of 4 tokens for 4 requests growing to 10 + 20 tokens, prefilled in chunks of 8.
    let l = Limits { eos_token_ids: vec![], ..limits(4, 8, 12, 4, 128) };
    let mut h = Harness::with_depth(l, hash_model, 2);
    let p = SamplingParams { ignore_eos: true, prompt_logprobs: Some(0), ..seeded(20, 0) };
    for id in 1..=4 {
        h.submit(id, words(10, id as u32), SamplingParams { seed: id, ..p.clone() });
    }
    h.run_to_idle(1000);
    assert!(h.core.preemptions() > 0);
    for id in 1..=4 {
        let prompt = words(10, id as u32);
        assert_eq!(h.prompt_logprobs[&id], every_successor(&prompt), "request {id}");
        assert_alone(&h, id, &prompt, &SamplingParams { seed: id, ..p.clone() });
    }
    // Re-admitted after their prompts were answered, they take what they wrote from the cache.
    assert!(h.core.cache_stats().cached_tokens > 0);
}
