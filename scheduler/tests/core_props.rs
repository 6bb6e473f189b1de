//! Property tests of the scheduling core: any interleaving of submissions, steps and aborts, under any limits,
//! keeps the page and slot books straight, writes consistent steps (the fake worker checks each one), ends every
//! request exactly once, frees everything at the end, and produces exactly what each request produces alone.

mod core_support;

use core_support::{Harness, reference_output, small_hash_model};
use proptest::prelude::*;
use scheduler::core::{FinishReason, Limits, NewRequest, ReqId, SamplingParams, SubmitError};

#[derive(Clone, Debug)]
enum Op {
    Submit { len: u32, max_tokens: u32, ignore_eos: bool, stop: Option<u32> },
    Step,
    Finish(prop::sample::Index),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1u32..40, 1u32..24, any::<bool>(), prop::option::of(100u32..120))
            .prop_map(|(len, max_tokens, ignore_eos, stop)| Op::Submit { len, max_tokens, ignore_eos, stop }),
        6 => Just(Op::Step),
        1 => any::<prop::sample::Index>().prop_map(Op::Finish),
    ]
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
        },
    )
}

fn prompt_of(id: ReqId, len: u32) -> Vec<u32> {
    (0..len).map(|i| 1000 + (id as u32 * 7 + i * 13) % 50).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn any_interleaving_keeps_the_books_and_the_outputs(l in limits(), ops in prop::collection::vec(op(), 1..100)) {
        let mut h = Harness::new(l.clone(), small_hash_model);
        let mut submitted: Vec<(ReqId, Vec<u32>, SamplingParams)> = vec![];
        for op in ops {
            match op {
                Op::Submit { len, max_tokens, ignore_eos, stop } => {
                    let id = submitted.len() as ReqId + 1;
                    let params = SamplingParams {
                        max_tokens,
                        temperature: 0.7,
                        top_p: 0.9,
                        top_k: 5,
                        seed: id * 1_000_003,
                        stop_token_ids: stop.into_iter().collect(),
                        ignore_eos,
                    };
                    if len > l.max_prompt_len() {
                        let refused = h.core.submit(NewRequest { id, prompt: prompt_of(id, len), params });
                        prop_assert_eq!(refused, Err(SubmitError::PromptTooLong { len: len as usize, max: l.max_prompt_len() }));
                    } else {
                        h.submit(id, prompt_of(id, len), params.clone());
                        submitted.push((id, prompt_of(id, len), params));
                    }
                }
                Op::Step => {
                    h.step();
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
                FinishReason::Length if got.len() < want.len() => prop_assert_eq!(prompt.len() + got.len(), cache_tokens + 1),
                _ => prop_assert_eq!((got.len(), reason), (want.len(), want_reason)),
            }
        }
    }
}
