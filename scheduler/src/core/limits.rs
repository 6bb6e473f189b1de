//! The fixed sizes the core schedules within, agreed with the worker at the handshake.

use proto::step::Capacity;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Request slots in the worker: the most requests running at once, and in one step.
    pub max_batch: u32,
    /// The most new tokens in one step (the worker's `max_tokens`).
    pub max_step_tokens: u32,
    pub num_pages: u32,
    /// Tokens per KV page.
    pub page_size: u32,
    /// The model's context length: prompt plus generated tokens never exceed it.
    pub max_seq_len: u32,
    pub eos_token_ids: Vec<u32>,
    /// The model's vocabulary, as wide as its logits: a token mask has a bit per id. 0 leaves no room for masks
    /// in the step (no structured output, no `min_tokens`).
    pub vocab_size: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidLimits {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("max_seq_len must leave room for a prompt token and a generated one, got {0}")]
    ContextTooShort(u32),
    #[error("a decode step of all {max_batch} requests must fit in a step, but max_step_tokens is {max_step_tokens}")]
    StepSmallerThanBatch { max_batch: u32, max_step_tokens: u32 },
    #[error("{0} does not fit the step slot's i32 fields")]
    TooLarge(&'static str),
}

impl Limits {
    pub fn validate(&self) -> Result<(), InvalidLimits> {
        let nonzero = [
            ("max_batch", self.max_batch),
            ("max_step_tokens", self.max_step_tokens),
            ("num_pages", self.num_pages),
            ("page_size", self.page_size),
        ];
        if let Some((name, _)) = nonzero.iter().find(|(_, v)| *v == 0) {
            return Err(InvalidLimits::Zero(name));
        }
        if self.max_seq_len < 2 {
            return Err(InvalidLimits::ContextTooShort(self.max_seq_len));
        }
        if self.max_step_tokens < self.max_batch {
            return Err(InvalidLimits::StepSmallerThanBatch {
                max_batch: self.max_batch,
                max_step_tokens: self.max_step_tokens,
            });
        }
        let max = i32::MAX as u64;
        // out_loc is page * page_size + offset; input_ids encodes slot s as -(s + 1).
        if self.num_pages as u64 * self.page_size as u64 > max {
            return Err(InvalidLimits::TooLarge("num_pages * page_size"));
        }
        if self.max_seq_len as u64 > max || self.max_step_tokens as u64 > max || self.max_batch as u64 >= max {
            return Err(InvalidLimits::TooLarge("max_seq_len, max_step_tokens or max_batch"));
        }
        Ok(())
    }

    /// The step-slot capacity the core's steps need: every running request in a step, a full token budget, and
    /// every request's whole page list. Pages shared through the prefix cache are listed once per request, so the
    /// bound is per request (its context or the whole cache), not the cache's size.
    pub fn capacity(&self) -> Capacity {
        let per_request = super::page_table::pages_for(self.max_seq_len, self.page_size).min(self.num_pages);
        let max_kv_indices = self.max_batch.saturating_mul(per_request).min(i32::MAX as u32);
        let mask_words = self.mask_words();
        Capacity { max_reqs: self.max_batch, max_tokens: self.max_step_tokens, max_kv_indices, mask_words }
    }

    /// W: the 32-bit words of one token mask.
    pub fn mask_words(&self) -> u32 {
        self.vocab_size.div_ceil(32)
    }

    /// The longest prompt that can ever run: one that leaves room for a generated token in the context, and whose
    /// KV fits the whole cache.
    pub fn max_prompt_len(&self) -> u32 {
        (self.max_seq_len - 1).min(self.num_pages.saturating_mul(self.page_size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Limits {
        Limits {
            max_batch: 4,
            max_step_tokens: 64,
            num_pages: 10,
            page_size: 4,
            max_seq_len: 128,
            eos_token_ids: vec![],
            vocab_size: 100,
        }
    }

    #[test]
    fn accepts_sane_limits() {
        assert_eq!(ok().validate(), Ok(()));
        // Each of 4 requests may list all 10 pages (128 tokens would take 32).
        assert_eq!(ok().capacity(), Capacity { max_reqs: 4, max_tokens: 64, max_kv_indices: 40, mask_words: 4 });
        assert_eq!(ok().max_prompt_len(), 40, "the cache, not the context, is the bound here");
        assert_eq!(Limits { num_pages: 100, ..ok() }.max_prompt_len(), 127);
    }

    #[test]
    fn rejects_what_cannot_be_scheduled_or_encoded() {
        assert_eq!(Limits { page_size: 0, ..ok() }.validate(), Err(InvalidLimits::Zero("page_size")));
        assert_eq!(Limits { max_seq_len: 1, ..ok() }.validate(), Err(InvalidLimits::ContextTooShort(1)));
        assert!(matches!(
            Limits { max_step_tokens: 3, ..ok() }.validate(),
            Err(InvalidLimits::StepSmallerThanBatch { .. })
        ));
        assert!(matches!(
            Limits { num_pages: 1 << 28, page_size: 16, ..ok() }.validate(),
            Err(InvalidLimits::TooLarge(_))
        ));
    }
}
