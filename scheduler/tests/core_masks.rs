//! Token masks in the core: a constrained request samples only once its mask is ready and never while a sample of
//! it is in flight (so with overlap it samples at most every other step), a step carries a mask row for exactly
//! the requests that need one, `min_tokens` clears EOS and the stop ids from the first samples, and unconstrained
//! requests beside constrained ones run as they would alone.

mod core_support;

use core_support::{Harness, hash_model, limits, params, position_model, reference_output};
use proto::step::StepRef;
use scheduler::core::{FinishReason, Limits, ReqId, SamplingParams};

/// 64 ids: masks of W = 2 words.
fn with_vocab(mut l: Limits) -> Limits {
    l.vocab_size = 64;
    l
}

fn prompt(len: u32, salt: u32) -> Vec<u32> {
    (0..len).map(|i| 1000 + salt * 100 + i).collect()
}

fn constrained(max_tokens: u32) -> SamplingParams {
    SamplingParams { constrained: true, ..params(max_tokens) }
}

/// The mask rows of the step just planned: per request of the step, its mask's words, or None.
fn mask_rows(h: &Harness) -> Vec<Option<Vec<u32>>> {
    let step = StepRef::new(&h.worker.layout, h.worker.buf.bytes());
    let w = h.core.limits().mask_words() as usize;
    assert_eq!(step.mask_bits.len(), step.header.num_masks as usize * w);
    step.mask_row
        .iter()
        .map(|&row| (row >= 0).then(|| step.mask_bits[row as usize * w..(row as usize + 1) * w].to_vec()))
        .collect()
}

/// A mask source that gives request `id` a mask allowing only token `id` (and counts its calls).
fn grammar(calls: &mut Vec<ReqId>) -> impl FnMut(ReqId, &mut [u32]) + '_ {
    move |id, row| {
        calls.push(id);
        row[id as usize / 32] |= 1 << (id % 32);
    }
}

#[test]
fn a_constrained_request_waits_for_its_first_mask_and_is_not_dropped_meanwhile() {
    let mut h = Harness::with_depth(with_vocab(limits(4, 64, 32, 4, 128)), hash_model, 2);
    h.submit(3, prompt(5, 1), constrained(4));
    let mut calls = vec![];
    assert!(h.plan_with_masks(&mut grammar(&mut calls)).is_none(), "its mask is not ready");
    assert!(h.finished.is_empty() && !h.core.is_idle(), "waiting for a mask is not 'never fits'");
    assert!(h.core.mask_ready(3));
    assert!(!h.core.mask_ready(99), "an unknown request");
    let step = h.plan_with_masks(&mut grammar(&mut calls)).unwrap();
    assert_eq!((step.ids(), calls), (vec![3], vec![3]));
    assert_eq!(mask_rows(&h), vec![Some(vec![1 << 3, 0])]);
}

#[test]
fn with_overlap_a_constrained_request_samples_at_most_every_other_step_and_others_pay_nothing() {
    let l = with_vocab(limits(4, 64, 32, 4, 128));
    let mut h = Harness::with_depth(l, hash_model, 2);
    h.submit(1, prompt(5, 1), params(6));
    h.submit(2, prompt(4, 2), constrained(3));
    assert!(h.core.mask_ready(2));
    let mut calls = vec![];
    let s0 = h.plan_with_masks(&mut grammar(&mut calls)).unwrap();
    assert_eq!(s0.ids(), vec![1, 2]);
    assert_eq!(mask_rows(&h), vec![None, Some(vec![1 << 2, 0])], "only the constrained request has a mask");
    // Its sample of step 0 is in flight: a mask said ready now (the engine never does) is not used, and the
    // sample's completion spends it.
    assert!(h.core.mask_ready(2));
    let s1 = h.plan_with_masks(&mut grammar(&mut calls)).unwrap();
    assert_eq!(s1.ids(), vec![1]);
    let step = StepRef::new(&h.worker.layout, h.worker.buf.bytes());
    assert_eq!((step.header.num_masks, step.mask_row), (0, &[-1][..]), "a step of unconstrained requests has no mask");
    h.complete().unwrap(); // step 0: request 2's first token; the mask said ready above is spent
    let s2 = h.plan_with_masks(&mut grammar(&mut calls)).unwrap();
    assert_eq!(s2.ids(), vec![1], "request 2 waits for the mask of its next token");
    h.complete().unwrap(); // step 1
    assert!(h.core.mask_ready(2));
    let s3 = h.plan_with_masks(&mut grammar(&mut calls)).unwrap();
    assert_eq!(s3.ids(), vec![1, 2]);
    assert_eq!(calls, vec![2, 2]);
    // Run everything out, saying each mask is ready as soon as the last sample completed.
    for _ in 0..30 {
        if h.core.is_idle() {
            break;
        }
        if h.core.contains(2) && h.in_flight() == 0 {
            h.core.mask_ready(2);
        }
        if h.in_flight() < 2 && h.plan_with_masks(&mut grammar(&mut calls)).is_some() {
            continue;
        }
        h.complete();
    }
    assert!(h.core.is_idle());
    let (want, reason) = reference_output(&prompt(5, 1), &params(6), h.core.limits(), hash_model);
    assert_eq!((&h.outputs[&1], h.finished[&1]), (&want, reason), "the unconstrained request runs as alone");
    assert_eq!((h.outputs[&2].len(), h.finished[&2]), (3, FinishReason::Length));
    // Never two samples of request 2 in one pair of consecutive steps.
    let with_2: Vec<u64> =
        h.planned.iter().filter(|s| s.reqs.iter().any(|r| r.id == 2 && r.samples)).map(|s| s.step_id).collect();
    assert!(with_2.windows(2).all(|w| w[1] >= w[0] + 2), "{with_2:?}");
}

#[test]
fn without_overlap_a_ready_mask_lets_it_decode_every_step() {
    let mut h = Harness::with_depth(with_vocab(limits(2, 16, 16, 4, 64)), hash_model, 1);
    h.submit(1, prompt(3, 1), constrained(4));
    let mut steps = 0;
    while !h.core.is_idle() {
        assert!(h.core.mask_ready(1));
        let mut calls = vec![];
        h.plan_with_masks(&mut grammar(&mut calls)).unwrap();
        assert_eq!(calls, vec![1]);
        h.complete().unwrap();
        steps += 1;
    }
    assert_eq!((steps, h.outputs[&1].len()), (4, 4));
}

#[test]
fn min_tokens_masks_eos_and_stop_ids_out_of_the_first_samples_with_overlap() {
    let mut l = with_vocab(limits(2, 16, 16, 4, 64));
    l.eos_token_ids = vec![5];
    let mut h = Harness::with_depth(l, position_model, 2);
    let p = SamplingParams { min_tokens: 3, stop_token_ids: vec![40], ..params(10) };
    // The fake worker applies no mask: a prompt whose positions never sample 5 or 40.
    h.submit(1, prompt(8, 1), p);
    let mut masked = vec![];
    for _ in 0..6 {
        if h.in_flight() == 2 {
            h.complete();
        }
        h.plan().unwrap();
        masked.push(mask_rows(&h)[0].clone());
    }
    let all_but_stops = vec![!(1u32 << 5), !(1u32 << (40 - 32))];
    let expected: Vec<Option<Vec<u32>>> = (0..6).map(|i| (i < 3).then(|| all_but_stops.clone())).collect();
    assert_eq!(masked, expected, "samples 1..=3 cannot stop; the planned ones past them are free");
}

#[test]
fn min_tokens_never_leaves_a_constrained_row_with_nothing_allowed() {
    let mut l = with_vocab(limits(2, 16, 16, 4, 64));
    l.eos_token_ids = vec![5];
    let mut h = Harness::with_depth(l, hash_model, 1);
    h.submit(1, prompt(3, 1), SamplingParams { min_tokens: 2, ..constrained(4) });
    h.core.mask_ready(1);
    // A grammar that is complete: it allows EOS alone.
    h.plan_with_masks(&mut |_, row: &mut [u32]| row[0] |= 1 << 5).unwrap();
    assert_eq!(mask_rows(&h), vec![Some(vec![1 << 5, 0])], "the grammar's end wins over min_tokens");
    h.complete().unwrap();
    // A grammar that allows more: EOS goes while min_tokens is not reached.
    h.core.mask_ready(1);
    h.plan_with_masks(&mut |_, row: &mut [u32]| row[0] |= (1 << 5) | (1 << 9)).unwrap();
    assert_eq!(mask_rows(&h), vec![Some(vec![1 << 9, 0])]);
}

#[test]
fn a_finished_constrained_request_frees_everything_and_unconstrained_ones_run_on() {
    let mut h = Harness::with_depth(with_vocab(limits(4, 64, 32, 4, 128)), hash_model, 2);
    h.submit(1, prompt(6, 1), params(5));
    h.submit(2, prompt(6, 2), constrained(50));
    h.core.mask_ready(2);
    let mut calls = vec![];
    h.plan_with_masks(&mut grammar(&mut calls)).unwrap();
    h.complete().unwrap();
    // The grammar ended (the engine's `Stopped`): the request is finished without another sample.
    assert!(h.finish(2));
    h.run_to_idle(20);
    let (want, reason) = reference_output(&prompt(6, 1), &params(5), h.core.limits(), hash_model);
    assert_eq!((&h.outputs[&1], h.finished[&1]), (&want, reason));
    assert!(h.core.is_idle());
    assert_eq!(h.outputs[&2].len(), 1);
}
