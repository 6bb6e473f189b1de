//! A request as the engine hands it in, and the state the core keeps for it while it lives.

use super::page_table::{PageTable, pages_for};
use super::prefix_cache::ROOT;
use proto::api;
use proto::step::{MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS};

/// Assigned by the engine; unique among live requests.
pub type ReqId = u64;

/// Sampling parameters, already validated by the engine (docs/protocol.md, `sampling`). Stop strings are text and
/// are handled outside the core; they end a request through [`super::Core::finish`].
///
/// Everything past `ignore_eos` is off by default (`..Default::default()` keeps a caller that predates a field
/// correct); the worker applies it in the order docs/protocol.md ("Sampling") gives.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// Tokens to generate at most, counted across preemptions.
    pub max_tokens: u32,
    /// `0` means greedy.
    pub temperature: f32,
    pub top_p: f32,
    /// `<= 0` means off.
    pub top_k: i32,
    pub seed: u64,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// `0` means off; tokens below `min_p` times the top token's probability are dropped.
    pub min_p: f32,
    /// OpenAI's: subtracted from the logit of every token generated at least once. `0` means off.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated. `0` means off.
    pub frequency_penalty: f32,
    /// Hugging Face's and vLLM's, over prompt and generated tokens: a positive logit is divided by it, a negative
    /// one multiplied. `1` means off; must be above 0.
    pub repetition_penalty: f32,
    /// `(token id, bias)` added to the logits before anything else: each id at most once, at most
    /// [`MAX_LOGIT_BIAS`] of them, ids inside the vocabulary.
    pub logit_bias: Vec<(u32, f32)>,
    /// `None`: no logprobs. `Some(k)`: with each sampled token, its logprob and those of the `k` (at most
    /// [`MAX_TOP_LOGPROBS`]) most likely tokens.
    pub logprobs: Option<u32>,
    /// `None`: no prompt logprobs. `Some(k)`: the logprob of each prompt token after the first, given the tokens
    /// before it, and the `k` (at most [`MAX_TOP_LOGPROBS`]) most likely tokens at each of those positions. Only
    /// positions whose logits are computed have them, so such a request takes no cached prefix beyond what it
    /// has already been answered for (see `Request::cacheable_pages`).
    pub prompt_logprobs: Option<u32>,
    /// EOS (unless `ignore_eos`) and `stop_token_ids` are masked out of the first `min_tokens` samples.
    pub min_tokens: u32,
    /// Each sample needs a token mask from outside the core (a grammar): the request is planned to sample only
    /// once [`super::Core::mask_ready`] said its mask is ready, and never while a sample of it is in flight.
    pub constrained: bool,
}

impl Default for SamplingParams {
    /// The wire's defaults ([`api::Sampling::default`], docs/protocol.md `sampling`), with the seed 0.
    fn default() -> Self {
        SamplingParams::from(&api::Sampling::default())
    }
}

impl From<&api::Sampling> for SamplingParams {
    /// The core's parameters for a validated request (seed 0: the engine gives each sample its own).
    fn from(s: &api::Sampling) -> Self {
        SamplingParams {
            // Validated > 0; a larger count than u32 holds means "as many as the context allows", as does any
            // count past the context, so saturating loses nothing.
            max_tokens: u32::try_from(s.max_tokens).unwrap_or(u32::MAX),
            temperature: s.temperature as f32,
            top_p: s.top_p as f32,
            top_k: s.top_k as i32,
            seed: 0,
            stop_token_ids: s.stop_token_ids.clone(),
            ignore_eos: s.ignore_eos,
            min_p: s.min_p as f32,
            presence_penalty: s.presence_penalty as f32,
            frequency_penalty: s.frequency_penalty as f32,
            repetition_penalty: s.repetition_penalty as f32,
            logit_bias: s.logit_bias.iter().map(|&(id, bias)| (id, bias as f32)).collect(),
            // Validated in 0..=20.
            logprobs: s.logprobs.map(|k| k as u32),
            prompt_logprobs: s.prompt_logprobs.map(|k| k as u32),
            // Validated in 0..=max_tokens.
            min_tokens: u32::try_from(s.min_tokens).unwrap_or(0),
            constrained: false,
        }
    }
}

impl SamplingParams {
    /// Whether the worker must count this request's tokens (any of the three penalties is on).
    pub fn has_penalties(&self) -> bool {
        self.presence_penalty != 0.0 || self.frequency_penalty != 0.0 || self.repetition_penalty != 1.0
    }

    /// The limits a step slot relies on: more bias entries or top logprobs than it has room for would not fit the
    /// join's arrays. The engine refuses such requests before they reach the core; this is the core's own check.
    pub fn check_step_limits(&self) -> Result<(), SubmitError> {
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            return Err(SubmitError::TooManyLogitBias(self.logit_bias.len()));
        }
        if let Some(k) = self.logprobs.filter(|&k| k as usize > MAX_TOP_LOGPROBS) {
            return Err(SubmitError::TooManyTopLogprobs(k));
        }
        if let Some(k) = self.prompt_logprobs.filter(|&k| k as usize > MAX_TOP_LOGPROBS) {
            return Err(SubmitError::TooManyTopLogprobs(k));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewRequest {
    pub id: ReqId,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

/// Why a request ended: the wire's `finish_reason` itself.
pub use proto::api::FinishReason;

/// A live request, waiting or running.
///
/// `tokens` is everything known about the sequence: the prompt, then every sampled token. After a preemption the
/// whole of it becomes the prompt of the re-admission, which is why sampled tokens are kept on the CPU at all.
#[derive(Debug)]
pub(crate) struct Request {
    pub id: ReqId,
    pub tokens: Vec<u32>,
    /// Tokens generated so far, across preemptions (what `max_tokens` counts).
    pub generated: u32,
    pub params: SamplingParams,
    /// Tokens whose K and V are in the cache, as of the last planned step. Planning advances it, so a step planned
    /// before the previous one completes (overlap) already sees the lengths it will find.
    pub kv_len: u32,
    /// Tokens to prefill since the last (re)admission; past them, every step feeds the last sampled token. Kept
    /// apart from `tokens.len()` because a sampled token lands in `tokens` only when its step completes.
    pub prefill_len: u32,
    pub pages: PageTable,
    /// Whether the sampling parameters were sent to the worker since the last (re)admission.
    pub joined: bool,
    /// Samples planned and not yet completed: with steps in flight, `tokens` lags `kv_len` by this much.
    pub pending: u32,
    /// The last step planned with this request in it. While that step is in flight, the request's pages and slot
    /// are still the worker's, so freeing them waits for it.
    pub last_step: Option<u64>,
    /// The prefix-cache node of the last shared page (`prefix_cache::ROOT` when none): the request holds a lock on
    /// the path from the root to it.
    pub tree_node: u32,
    /// Arrival order, and the step planned next when it arrived: the policy's tie-break and age.
    pub seq: u64,
    pub arrived: u64,
    /// Admissions so far (more than one after a preemption).
    pub admissions: u32,
    /// Pages of the prompt found in the prefix cache, as of the last ordering of the queue by match.
    pub match_pages: u32,
    /// For a constrained request: the mask of its next sample is ready (set by the engine, cleared when a step
    /// samples under it).
    pub mask_ready: bool,
    /// With `prompt_logprobs`: the first prompt position whose successor's logprob no step has asked for yet.
    /// Survives preemption, so that a recomputed prompt is not answered for twice.
    pub prompt_asked: u32,
}

impl Request {
    /// `room` is how many tokens the sequence may still grow by; reserving for it now keeps decode steps free of
    /// reallocation.
    pub fn new(req: NewRequest, room: u32, page_size: u32, seq: u64, arrived: u64) -> Self {
        let NewRequest { id, mut prompt, params } = req;
        let prefill_len = prompt.len() as u32;
        let growth = room.min(params.max_tokens);
        prompt.reserve_exact(growth as usize);
        let pages = PageTable::with_capacity(pages_for(prefill_len + growth, page_size));
        Request {
            id,
            tokens: prompt,
            generated: 0,
            params,
            kv_len: 0,
            prefill_len,
            pages,
            joined: false,
            pending: 0,
            last_step: None,
            tree_node: ROOT,
            seq,
            arrived,
            admissions: 0,
            match_pages: 0,
            mask_ready: false,
            prompt_asked: 0,
        }
    }

    pub fn len(&self) -> u32 {
        self.tokens.len() as u32
    }

    /// The prompt's length: what the client sent, without the tokens generated since (which come back as prompt
    /// ids after a preemption).
    pub fn prompt_len(&self) -> u32 {
        self.len() - self.generated
    }

    /// Prompt positions whose successors' logprobs are still to be asked for: positions `prompt_asked ..
    /// prompt_len - 1` (the last prompt token's successor is the first sample, whose logprob travels as every
    /// sample's does). Empty without `prompt_logprobs`.
    pub fn prompt_logprobs_left(&self) -> std::ops::Range<u32> {
        match self.params.prompt_logprobs {
            Some(_) => self.prompt_asked..self.prompt_len().saturating_sub(1).max(self.prompt_asked),
            None => 0..0,
        }
    }

    /// Pages of the sequence that may come from the prefix cache: at least its last token is computed (its logits
    /// give the first sample), and with prompt logprobs still to ask, no position whose logits are needed.
    pub fn cacheable_pages(&self, page_size: u32) -> u32 {
        let whole = (self.len() - 1) / page_size;
        let left = self.prompt_logprobs_left();
        if left.is_empty() { whole } else { whole.min(left.start / page_size) }
    }

    /// Still has prompt tokens whose K and V are not cached.
    pub fn is_prefilling(&self) -> bool {
        self.kv_len < self.prefill_len
    }

    /// Prompt tokens not yet planned into a step.
    pub fn prefill_left(&self) -> u32 {
        self.prefill_len - self.kv_len
    }

    /// Tokens the KV cache must hold once this request's next decode step has run: the one-token lookahead the
    /// admission policy reserves pages for.
    pub fn kv_len_after_next_decode(&self) -> u32 {
        self.kv_len.max(self.prefill_len) + 1
    }

    /// Every sample this request can still produce is already planned: the last of them reaches `max_tokens` or
    /// the context length, so it ends the request whatever the token is. Planning it again would only buy a step
    /// whose token is thrown away (and perhaps a page for it). Never true with nothing in flight: a request whose
    /// last completed sample reached a limit has already ended.
    pub fn fully_planned(&self, max_seq_len: u32) -> bool {
        // Once the prompt is planned, the sequence will hold kv_len + 1 tokens after the last planned sample.
        !self.is_prefilling()
            && (self.generated + self.pending >= self.params.max_tokens || self.kv_len + 1 >= max_seq_len)
    }

    /// Whether a sample of this request may be planned now as far as its mask goes: unconstrained, or its mask
    /// is ready and none of its samples is in flight (the next mask depends on the token in flight).
    pub fn mask_allows_sample(&self) -> bool {
        !self.params.constrained || (self.mask_ready && self.pending == 0)
    }

    /// A decode of this request can be planned now.
    pub fn can_decode(&self, max_seq_len: u32) -> bool {
        !self.is_prefilling() && !self.fully_planned(max_seq_len) && self.mask_allows_sample()
    }

    /// Back to a waiting request whose prompt is everything known so far; keeps `generated` and the params. Only
    /// for a request no step in flight refers to: its samples in flight would be missing from the new prompt.
    pub fn reset_for_readmission(&mut self) {
        debug_assert_eq!(self.pending, 0, "re-admitting request {} with samples in flight", self.id);
        self.kv_len = 0;
        self.prefill_len = self.len();
        self.joined = false;
    }
}

/// Keeps the reserved capacity (a derived clone would not), so a cloned core is as allocation-free in steady state
/// as the original.
impl Clone for Request {
    fn clone(&self) -> Self {
        let mut tokens = Vec::with_capacity(self.tokens.capacity());
        tokens.extend_from_slice(&self.tokens);
        Request { tokens, pages: self.pages.clone(), params: self.params.clone(), ..*self }
    }
}

/// Why [`super::Core::submit`] refused a request. The engine validates first; these are the checks only the core
/// can make (the KV cache's size) or that would corrupt a step if they slipped through.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the prompt has no tokens")]
    EmptyPrompt,
    #[error("the prompt has {len} tokens; at most {max} fit the context and the KV cache")]
    PromptTooLong { len: usize, max: u32 },
    /// Ids above `i32::MAX` would read as a reference to another slot's token in the step's `input_ids`.
    #[error("token id {0} is out of range")]
    TokenOutOfRange(u32),
    #[error("max_tokens must be at least 1")]
    ZeroMaxTokens,
    #[error("{0} logit_bias entries; at most {MAX_LOGIT_BIAS} are allowed")]
    TooManyLogitBias(usize),
    #[error("{0} top logprobs asked for; at most {MAX_TOP_LOGPROBS} are allowed")]
    TooManyTopLogprobs(u32),
}

/// A one-token greedy request, for the unit tests of the containers that hold requests.
#[cfg(test)]
pub(crate) fn test_request(id: ReqId) -> Request {
    let params = SamplingParams { max_tokens: 1, temperature: 0.0, ..Default::default() };
    Request::new(NewRequest { id, prompt: vec![1], params }, 1, 1, id, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_turn_every_option_off() {
        let p = SamplingParams::default();
        assert!(!p.has_penalties());
        assert_eq!((p.min_p, p.logprobs, p.logit_bias.len()), (0.0, None, 0));
        assert_eq!((p.temperature, p.top_p, p.top_k), (1.0, 1.0, -1));
        assert!(p.check_step_limits().is_ok());
    }

    #[test]
    fn any_penalty_counts() {
        for p in [
            SamplingParams { presence_penalty: 0.5, ..Default::default() },
            SamplingParams { frequency_penalty: -0.1, ..Default::default() },
            SamplingParams { repetition_penalty: 1.2, ..Default::default() },
        ] {
            assert!(p.has_penalties(), "{p:?}");
        }
        assert!(!SamplingParams { min_p: 0.1, logprobs: Some(3), ..Default::default() }.has_penalties());
    }

    #[test]
    fn step_limits_bound_bias_and_top_logprobs() {
        let bias = |n: u32| SamplingParams { logit_bias: (0..n).map(|i| (i, 1.0)).collect(), ..Default::default() };
        assert!(bias(300).check_step_limits().is_ok());
        assert_eq!(bias(301).check_step_limits(), Err(SubmitError::TooManyLogitBias(301)));
        let top = |k| SamplingParams { logprobs: Some(k), ..Default::default() };
        assert!(top(0).check_step_limits().is_ok() && top(20).check_step_limits().is_ok());
        assert_eq!(top(21).check_step_limits(), Err(SubmitError::TooManyTopLogprobs(21)));
        let prompt = |k| SamplingParams { prompt_logprobs: Some(k), ..Default::default() };
        assert!(prompt(20).check_step_limits().is_ok());
        assert_eq!(prompt(21).check_step_limits(), Err(SubmitError::TooManyTopLogprobs(21)));
    }

    #[test]
    fn prompt_logprobs_keep_the_positions_still_to_ask_out_of_the_cache() {
        let params = SamplingParams { prompt_logprobs: Some(2), ..Default::default() };
        let mut r = Request::new(NewRequest { id: 1, prompt: (0..40).collect(), params }, 8, 16, 0, 0);
        assert_eq!((r.prompt_logprobs_left(), r.cacheable_pages(16)), (0..39, 0));
        r.prompt_asked = 35;
        assert_eq!((r.prompt_logprobs_left(), r.cacheable_pages(16)), (35..39, 2));
        r.prompt_asked = 39;
        assert!(r.prompt_logprobs_left().is_empty());
        // Generated tokens, back as prompt ids after a preemption, are not the prompt.
        r.tokens.extend([7, 7]);
        r.generated = 2;
        assert_eq!((r.prompt_len(), r.prompt_logprobs_left(), r.cacheable_pages(16)), (40, 39..39, 2));
        let plain =
            Request::new(NewRequest { id: 2, prompt: (0..40).collect(), params: Default::default() }, 8, 16, 0, 0);
        assert_eq!((plain.prompt_logprobs_left(), plain.cacheable_pages(16)), (0..0, 2));
    }
}
