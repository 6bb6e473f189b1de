//! Encodes one step into a step slot (docs/protocol.md, "Step slot"), request by request.
//!
//! The writer only appends; it knows nothing of policy. Every array is written through its running length, so
//! nothing is cleared and nothing is allocated: a decode step of n requests costs O(n + pages listed).

use super::page_table::{PageTable, last_page_len, pages_for};
use super::request::SamplingParams;
use proto::step::{MAX_LOGIT_BIAS, StepHeader, StepKind, StepMut};

/// The new tokens of one request in a step.
pub(crate) enum NewTokens<'t> {
    /// Known ids, e.g. a prompt chunk.
    Ids(&'t [u32]),
    /// One token: whatever the worker last sampled for the request's slot.
    LastSampled,
}

pub(crate) struct StepWriter<'s, 'a> {
    step: &'s mut StepMut<'a>,
    page_size: u32,
    n: usize,
    t: usize,
    k: usize,
    j: usize,
    /// Logit-bias entries written so far, over all joins.
    b: usize,
    /// W, and the token masks written so far.
    mask_words: usize,
    g: usize,
    /// Whether some request asks for prompt logprobs: from then on every token has a `logprob_target` entry (the
    /// tokens before it got theirs then), so steps that ask for none never touch the array.
    targets: bool,
    /// The most top entries a request asks for at its prompt positions.
    prompt_top: u32,
    /// Where the last request's tokens start in `input_ids`.
    last_start: usize,
}

impl<'s, 'a> StepWriter<'s, 'a> {
    pub fn new(step: &'s mut StepMut<'a>, page_size: u32, mask_words: u32) -> Self {
        step.qo_indptr[0] = 0;
        step.kv_indptr[0] = 0;
        step.join_bias_indptr[0] = 0;
        StepWriter {
            step,
            page_size,
            n: 0,
            t: 0,
            k: 0,
            j: 0,
            b: 0,
            mask_words: mask_words as usize,
            g: 0,
            targets: false,
            prompt_top: 0,
            last_start: 0,
        }
    }

    /// Asks for the logprobs of `targets` at the last request's new tokens from its `offset`-th on: the logits at
    /// each of those positions give back the logprob of its target and the `top` most likely tokens.
    pub fn push_targets(&mut self, offset: u32, targets: &[u32], top: u32) {
        let at = self.last_start + offset as usize;
        assert!(at + targets.len() <= self.t, "targets past the last request's tokens");
        if !self.targets {
            self.step.logprob_target[..self.t].fill(-1);
            self.targets = true;
        }
        for (dst, &id) in self.step.logprob_target[at..at + targets.len()].iter_mut().zip(targets) {
            *dst = id as i32;
        }
        self.prompt_top = self.prompt_top.max(top);
    }

    /// A token mask for the last request pushed, every word to be written by the caller; `None` when the ring has
    /// no room for masks (W = 0).
    pub fn push_mask(&mut self) -> Option<&mut [u32]> {
        let (w, g) = (self.mask_words, self.g);
        if w == 0 || self.n == 0 {
            return None;
        }
        self.step.mask_row[self.n - 1] = g as i32;
        self.g += 1;
        Some(&mut self.step.mask_bits[g * w..(g + 1) * w])
    }

    pub fn num_tokens(&self) -> usize {
        self.t
    }

    /// Appends a request whose first `start` tokens are cached and that adds `new` after them. `pages` must already
    /// hold the result; only the pages covering it are listed, so a table grown ahead of a chunked prefill still
    /// gives the worker a consistent `(pages, last_page_len)` pair.
    pub fn push_request(&mut self, slot: u32, pages: &PageTable, start: u32, new: NewTokens<'_>) {
        let ps = self.page_size;
        let s = &mut *self.step;
        let count = match new {
            NewTokens::Ids(ids) => ids.len() as u32,
            NewTokens::LastSampled => 1,
        };
        let seq_len = start + count;
        let listed = pages_for(seq_len, ps) as usize;
        let (n, t, k) = (self.n, self.t, self.k);

        s.req_slot[n] = slot as i32;
        s.mask_row[n] = -1;
        s.seq_len[n] = seq_len as i32;
        s.kv_last_page_len[n] = last_page_len(seq_len, ps) as i32;
        s.qo_indptr[n + 1] = (t + count as usize) as i32;
        s.kv_indptr[n + 1] = (k + listed) as i32;
        for (dst, &page) in s.kv_indices[k..k + listed].iter_mut().zip(&pages.pages()[..listed]) {
            *dst = page as i32;
        }
        match new {
            NewTokens::Ids(ids) => {
                for (dst, &id) in s.input_ids[t..t + ids.len()].iter_mut().zip(ids) {
                    *dst = id as i32;
                }
            }
            NewTokens::LastSampled => s.input_ids[t] = -(slot as i32 + 1),
        }
        for (i, pos) in (start..seq_len).enumerate() {
            s.positions[t + i] = pos as i32;
            s.out_loc[t + i] = pages.loc(pos, ps) as i32;
        }
        if self.targets {
            s.logprob_target[t..t + count as usize].fill(-1);
        }
        self.last_start = t;
        self.n += 1;
        self.t += count as usize;
        self.k += listed;
    }

    /// (Re)sets the sampling parameters of `slot` in the worker, for a request whose first `prompt_len` tokens
    /// are its prompt (after a preemption, the rest of what it sends again was generated: the penalties count it
    /// as such).
    pub fn push_join(&mut self, slot: u32, params: &SamplingParams, prompt_len: u32) {
        self.join(slot, params, i32::try_from(prompt_len).unwrap_or(i32::MAX));
    }

    fn join(&mut self, slot: u32, params: &SamplingParams, prompt_len: i32) {
        let (s, j, b) = (&mut *self.step, self.j, self.b);
        s.join_slot[j] = slot as i32;
        s.join_temperature[j] = params.temperature;
        s.join_top_p[j] = params.top_p;
        s.join_top_k[j] = params.top_k;
        s.join_seed[j] = params.seed;
        s.join_min_p[j] = params.min_p;
        s.join_presence_penalty[j] = params.presence_penalty;
        s.join_frequency_penalty[j] = params.frequency_penalty;
        s.join_repetition_penalty[j] = params.repetition_penalty;
        s.join_prompt_len[j] = prompt_len;
        s.join_logprobs[j] = params.logprobs.map_or(-1, |k| k as i32);
        // The slot has room for MAX_LOGIT_BIAS entries per join; `check_step_limits` refuses more before a request
        // gets here, and cutting the list keeps a slip from overrunning another join's room.
        let bias = &params.logit_bias[..params.logit_bias.len().min(MAX_LOGIT_BIAS)];
        for ((id, value), &(token, bias)) in
            s.join_bias_ids[b..b + bias.len()].iter_mut().zip(&mut s.join_bias_values[b..b + bias.len()]).zip(bias)
        {
            *id = token as i32;
            *value = bias;
        }
        self.b += bias.len();
        s.join_bias_indptr[j + 1] = self.b as i32;
        self.j += 1;
    }

    /// Writes the header last, once the counts are known.
    pub fn finish(self, step_id: u64, kind: StepKind) {
        *self.step.header = StepHeader {
            step_id,
            kind: kind as u32,
            num_reqs: self.n as u32,
            num_tokens: self.t as u32,
            num_kv_indices: self.k as u32,
            num_joins: self.j as u32,
            num_bias: self.b as u32,
            num_masks: self.g as u32,
            prompt_logprobs: u32::from(self.targets),
            prompt_top: self.prompt_top,
            ..Default::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::index_pool::IndexPool;
    use crate::core::prefix_cache::PrefixCache;
    use proto::step::{Capacity, SlotBuf, StepLayout, StepRef};

    #[test]
    fn writes_an_extend_and_a_decode_entry() {
        let layout = StepLayout::new(Capacity { max_reqs: 4, max_tokens: 8, max_kv_indices: 8, mask_words: 0 });
        let mut buf = SlotBuf::zeroed(layout.slot_bytes);
        let mut pool = IndexPool::new(8);
        let mut cache = PrefixCache::new(8, 4, false);
        pool.alloc(); // keep page 0 out so pages and positions differ
        let (mut a, mut b) = (PageTable::default(), PageTable::default());
        assert!(a.grow_to(5, 4, &mut pool, &mut cache)); // pages 1, 2: a chunk of 3 after 2 cached tokens
        assert!(b.grow_to(9, 4, &mut pool, &mut cache)); // pages 3, 4, 5: a decode at position 8
        let params = SamplingParams {
            max_tokens: 4,
            temperature: 0.5,
            top_p: 0.9,
            top_k: 7,
            seed: u64::MAX,
            ..Default::default()
        };
        {
            let mut step = StepMut::new(&layout, buf.bytes_mut());
            let mut w = StepWriter::new(&mut step, 4, 0);
            w.push_request(2, &a, 2, NewTokens::Ids(&[10, 11, 12]));
            w.push_join(2, &params, 5);
            w.push_request(0, &b, 8, NewTokens::LastSampled);
            assert_eq!(w.num_tokens(), 4);
            w.finish(42, StepKind::Extend);
        }
        let r = StepRef::new(&layout, buf.bytes());
        assert_eq!((r.header.step_id, r.header.kind), (42, StepKind::Extend as u32));
        assert_eq!(r.req_slot, &[2, 0]);
        assert_eq!(r.seq_len, &[5, 9]);
        assert_eq!(r.qo_indptr, &[0, 3, 4]);
        assert_eq!(r.kv_indptr, &[0, 2, 5]);
        assert_eq!(r.kv_indices, &[1, 2, 3, 4, 5]);
        assert_eq!(r.kv_last_page_len, &[1, 1]);
        assert_eq!(r.input_ids, &[10, 11, 12, -1]);
        assert_eq!(r.positions, &[2, 3, 4, 8]);
        assert_eq!(r.out_loc, &[6, 7, 8, 20]);
        assert_eq!((r.join_slot, r.join_top_k, r.join_seed), (&[2][..], &[7][..], &[u64::MAX][..]));
        assert_eq!((r.join_temperature, r.join_top_p), (&[0.5f32][..], &[0.9f32][..]));
        // Every option off: what the worker reads as "nothing to do".
        assert_eq!(
            (r.join_min_p, r.join_presence_penalty, r.join_frequency_penalty),
            (&[0.0][..], &[0.0][..], &[0.0][..])
        );
        assert_eq!((r.join_repetition_penalty, r.join_logprobs), (&[1.0][..], &[-1][..]));
        assert_eq!((r.join_prompt_len, r.join_bias_indptr, r.header.num_bias), (&[5][..], &[0, 0][..], 0));
    }

    /// A step slot with room for 3 requests, and a writer over it that has written nothing yet.
    fn with_writer(page_size: u32, f: impl FnOnce(&mut StepWriter<'_, '_>)) -> SlotBuf {
        let layout = StepLayout::new(Capacity { max_reqs: 3, max_tokens: 8, max_kv_indices: 8, mask_words: 0 });
        let mut buf = SlotBuf::zeroed(layout.slot_bytes);
        let mut step = StepMut::new(&layout, buf.bytes_mut());
        let mut w = StepWriter::new(&mut step, page_size, 0);
        f(&mut w);
        w.finish(1, StepKind::Extend);
        buf
    }

    #[test]
    fn joins_carry_every_option_and_their_biases_one_after_another() {
        let penalties = SamplingParams {
            min_p: 0.05,
            presence_penalty: 0.5,
            frequency_penalty: -0.25,
            repetition_penalty: 1.3,
            logit_bias: vec![(151645, -100.0), (11, 2.5)],
            logprobs: Some(20),
            ..Default::default()
        };
        let only_logprob = SamplingParams { logprobs: Some(0), ..Default::default() };
        let one_bias = SamplingParams { logit_bias: vec![(7, 0.75)], ..Default::default() };
        let buf = with_writer(4, |w| {
            w.push_join(1, &penalties, 40);
            w.push_join(0, &only_logprob, 5);
            w.push_join(2, &one_bias, 6);
        });
        let layout = StepLayout::new(Capacity { max_reqs: 3, max_tokens: 8, max_kv_indices: 8, mask_words: 0 });
        let r = StepRef::new(&layout, buf.bytes());
        assert_eq!((r.header.num_joins, r.header.num_bias), (3, 3));
        assert_eq!(r.join_slot, &[1, 0, 2]);
        assert_eq!(r.join_min_p, &[0.05, 0.0, 0.0]);
        assert_eq!(r.join_presence_penalty, &[0.5, 0.0, 0.0]);
        assert_eq!(r.join_frequency_penalty, &[-0.25, 0.0, 0.0]);
        assert_eq!(r.join_repetition_penalty, &[1.3, 1.0, 1.0]);
        assert_eq!(r.join_prompt_len, &[40, 5, 6]);
        assert_eq!(r.join_logprobs, &[20, 0, -1]);
        assert_eq!(r.join_bias_indptr, &[0, 2, 2, 3]);
        assert_eq!(r.join_bias_ids, &[151645, 11, 7]);
        assert_eq!(r.join_bias_values, &[-100.0, 2.5, 0.75]);
    }

    #[test]
    fn a_full_step_of_joins_fits_300_biases_each_and_no_more() {
        let too_many = SamplingParams { logit_bias: (0..301).map(|i| (i, 1.0)).collect(), ..Default::default() };
        let buf = with_writer(4, |w| {
            for slot in 0..3 {
                w.push_join(slot, &too_many, 1);
            }
        });
        let layout = StepLayout::new(Capacity { max_reqs: 3, max_tokens: 8, max_kv_indices: 8, mask_words: 0 });
        let r = StepRef::new(&layout, buf.bytes());
        assert_eq!(r.join_bias_indptr, &[0, 300, 600, 900]);
        assert_eq!((r.join_bias_ids[299], r.join_bias_ids[300]), (299, 0));
    }

    #[test]
    fn targets_cover_every_token_once_a_request_asks_and_none_before() {
        let cap = Capacity { max_reqs: 3, max_tokens: 8, max_kv_indices: 8, mask_words: 0 };
        let layout = StepLayout::new(cap);
        let mut pool = IndexPool::new(8);
        let mut t = PageTable::default();
        assert!(t.grow_to(8, 4, &mut pool, &mut PrefixCache::new(8, 4, false)));
        let write = |ask: bool| {
            let mut buf = SlotBuf::zeroed(layout.slot_bytes);
            // Garbage where nothing should be read: the writer must overwrite what it uses.
            StepMut::new(&layout, buf.bytes_mut()).logprob_target.fill(77);
            {
                let mut step = StepMut::new(&layout, buf.bytes_mut());
                let mut w = StepWriter::new(&mut step, 4, 0);
                w.push_request(0, &t, 0, NewTokens::Ids(&[1, 2]));
                w.push_request(1, &t, 0, NewTokens::Ids(&[3, 4, 5]));
                if ask {
                    w.push_targets(1, &[40, 50], 4);
                }
                w.push_request(2, &t, 5, NewTokens::LastSampled);
                w.finish(3, StepKind::Extend);
            }
            buf
        };
        let buf = write(false);
        let r = StepRef::try_new(&layout, buf.bytes()).unwrap();
        assert_eq!((r.header.prompt_logprobs, r.header.prompt_top, r.logprob_target.len()), (0, 0, 0));
        let buf = write(true);
        let r = StepRef::try_new(&layout, buf.bytes()).unwrap();
        assert_eq!((r.header.prompt_logprobs, r.header.prompt_top), (1, 4));
        assert_eq!(r.logprob_target, &[-1, -1, -1, 40, 50, -1]);
    }

    #[test]
    fn a_table_grown_ahead_lists_only_the_pages_in_use() {
        let layout = StepLayout::new(Capacity { max_reqs: 1, max_tokens: 4, max_kv_indices: 4, mask_words: 0 });
        let mut buf = SlotBuf::zeroed(layout.slot_bytes);
        let mut pool = IndexPool::new(4);
        let mut t = PageTable::default();
        assert!(t.grow_to(16, 4, &mut pool, &mut PrefixCache::new(4, 4, false)));
        {
            let mut step = StepMut::new(&layout, buf.bytes_mut());
            let mut w = StepWriter::new(&mut step, 4, 0);
            w.push_request(0, &t, 0, NewTokens::Ids(&[1, 2, 3, 4]));
            w.finish(0, StepKind::Extend);
        }
        let r = StepRef::new(&layout, buf.bytes());
        assert_eq!((r.kv_indices, r.kv_last_page_len), (&[0][..], &[4][..]));
    }
}
