//! Property tests of the scheduling core: any interleaving of submissions, steps and aborts, under any limits, any
//! policy (prefix cache on or off, FCFS or LPM) and with up to three steps in flight, keeps the page, cache and
//! slot books straight, writes consistent steps (the fake worker checks each one, and that none writes a page or
//! reuses a slot an earlier step in flight still uses), ends every request exactly once, frees everything at the
//! end, and produces exactly what each request produces alone. Prompts often share prefixes, so pages are shared,
//! matched while their writers are in flight, and evicted under memory pressure.

mod core_support;

use core_support::{Harness, reference_output, small_hash_model};
use proptest::prelude::*;
use scheduler::core::{FinishReason, Limits, NewRequest, Order, Policy, ReqId, SamplingParams, SubmitError};

#[derive(Clone, Debug)]
enum Op {
    Submit {
        len: u32,
        max_tokens: u32,
        ignore_eos: bool,
        stop: Option<u32>,
        /// Prompts of one family share their first tokens.
        family: Option<u32>,
        /// Asks for the prompt's logprobs.
        prompt_logprobs: bool,
    },
    /// What the engine does: fill the pipeline, complete the oldest step.
    Step,
    /// Plan one more step, if fewer than the depth are in flight.
    Plan,
    /// Complete the oldest step in flight.
    Complete,
    Finish(prop::sample::Index),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1u32..40, 1u32..24, any::<bool>(), prop::option::of(100u32..120), prop::option::of(0u32..3), prop::bool::weighted(0.3))
            .prop_map(|(len, max_tokens, ignore_eos, stop, family, prompt_logprobs)| Op::Submit { len, max_tokens, ignore_eos, stop, family, prompt_logprobs }),
        4 => Just(Op::Step),
        1 => Just(Op::Plan),
        1 => Just(Op::Complete),
        1 => any::<prop::sample::Index>().prop_map(Op::Finish),
    ]
}

fn params_of(id: ReqId, max_tokens: u32, ignore_eos: bool, stop: Option<u32>) -> SamplingParams {
    SamplingParams {
        max_tokens,
        temperature: 0.7,
        top_p: 0.9,
        top_k: 5,
        seed: id * 1_000_003,
        stop_token_ids: stop.into_iter().collect(),
        ignore_eos,

        ..Default::default()
    }
}

fn limits() -> impl Strategy<Value = Limits> {
    (1u32..6, 0u32..40, 1u32..24, 1u32..6, 2u32..80, prop::option::of(100u32..120)).prop_map(
        |(max_batch, extra, num_pages, page_size, max_seq_len, eos)| Limits {
            max_batch,
            max_step_tokens: max_batch + extra,
            num_pages,
            page_size,
            max_seq_len,
            eos_token_ids: eos.into_iter().collect(),
            vocab_size: 128,
        },
    )
}

fn policy() -> impl Strategy<Value = Policy> {
    (any::<bool>(), any::<bool>(), 0u64..6).prop_map(|(prefix_cache, lpm, max_wait_steps)| Policy {
        prefix_cache,
        order: if lpm { Order::Lpm } else { Order::Fcfs },
        max_wait_steps,
    })
}

/// A prompt of its own, or one whose first 24 tokens its family shares.
fn prompt_of(id: ReqId, len: u32, family: Option<u32>) -> Vec<u32> {
    (0..len)
        .map(|i| match family {
            Some(f) if i < 24 => 2000 + f * 50 + i,
            _ => 1000 + (id as u32 * 7 + i * 13) % 50,
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_keeps_the_books_and_the_outputs(
        l in limits(),
        policy in policy(),
        depth in 1usize..=3,
        ops in prop::collection::vec(op(), 1..100),
    ) {
        let mut h = Harness::with_policy(l.clone(), small_hash_model, depth, policy);
        let mut submitted: Vec<(ReqId, Vec<u32>, SamplingParams)> = vec![];
        for op in ops {
            match op {
                Op::Submit { len, max_tokens, ignore_eos, stop, family, prompt_logprobs } => {
                    let id = submitted.len() as ReqId + 1;
                    let params = SamplingParams {
                        prompt_logprobs: prompt_logprobs.then_some(id as u32 % 21),
                        ..params_of(id, max_tokens, ignore_eos, stop)
                    };
                    let prompt = prompt_of(id, len, family);
                    if len > l.max_prompt_len() {
                        let refused = h.core.submit(NewRequest { id, prompt, params });
                        prop_assert_eq!(refused, Err(SubmitError::PromptTooLong { len: len as usize, max: l.max_prompt_len() }));
                    } else {
                        h.submit(id, prompt.clone(), params.clone());
                        submitted.push((id, prompt, params));
                    }
                }
                Op::Step => {
                    h.step();
                }
                Op::Plan => {
                    if h.in_flight() < depth {
                        h.plan();
                    }
                }
                Op::Complete => {
                    h.complete();
                }
                Op::Finish(pick) => {
                    if !submitted.is_empty() {
                        let id = submitted[pick.index(submitted.len())].0;
                        let live = !h.finished.contains_key(&id);
                        prop_assert_eq!(h.finish(id), live);
                    }
                }
            }
            prop_assert!(h.core.running() <= l.max_batch as usize);
        }
        h.run_to_idle(20_000);

        let cache_tokens = (l.num_pages * l.page_size) as usize;
        for (id, prompt, params) in &submitted {
            let got = &h.outputs[id];
            let reason = *h.finished.get(id).expect("every request ends");
            let (want, want_reason) = reference_output(prompt, params, &l, small_hash_model);
            prop_assert!(want.starts_with(got), "request {}: {:?} is not a prefix of {:?}", id, got, want);
            match reason {
                FinishReason::Abort => {}
                // Cut short because it needed a page while holding them all.
                FinishReason::Memory => prop_assert_eq!(prompt.len() + got.len(), cache_tokens + 1),
                _ => prop_assert_eq!((got.len(), reason), (want.len(), want_reason)),
            }
            // Prompt logprobs: every prompt position but the last, each asked for once and in order, whatever the
            // chunking, the cache and the preemptions; none for a request that did not ask.
            let answered = h.prompt_logprobs.get(id).cloned().unwrap_or_default();
            if params.prompt_logprobs.is_none() {
                prop_assert!(answered.is_empty(), "request {} asked for no prompt logprobs", id);
                continue;
            }
            let all: Vec<(u32, u32)> = (1..prompt.len()).map(|p| (p as u32 - 1, prompt[p])).collect();
            prop_assert!(all.starts_with(&answered), "request {}: {:?} is not a prefix of {:?}", id, answered, all);
            if !got.is_empty() {
                prop_assert_eq!(&answered, &all, "request {} sampled before all its prompt logprobs", id);
            }
            prop_assert!(!h.cached.contains_key(id), "request {} took a cached prefix it needed the logits of", id);
        }
    }

    /// The same arrivals, one step in flight or two: every request ends with the same tokens for the same reason,
    /// preemptions, chunked prefills and cache-bound endings included.
    #[test]
    fn overlap_changes_no_output(
        l in limits(),
        policy in policy(),
        arrivals in prop::collection::vec(
            (0usize..6, 1u32..40, 1u32..24, any::<bool>(), prop::option::of(100u32..120), prop::option::of(0u32..3)),
            1..20,
        ),
    ) {
        let run = |depth| {
            let mut h = Harness::with_policy(l.clone(), small_hash_model, depth, policy.clone());
            for (i, &(steps_before, len, max_tokens, ignore_eos, stop, family)) in arrivals.iter().enumerate() {
                for _ in 0..steps_before {
                    h.step();
                }
                let id = i as ReqId + 1;
                if len <= l.max_prompt_len() {
                    h.submit(id, prompt_of(id, len, family), params_of(id, max_tokens, ignore_eos, stop));
                }
            }
            h.run_to_idle(20_000);
            let mut ended: Vec<_> = h.outputs.iter().map(|(id, out)| (*id, out.clone(), h.finished[id])).collect();
            ended.sort_by_key(|e| e.0);
            ended
        };
        prop_assert_eq!(run(1), run(2));
    }
}
