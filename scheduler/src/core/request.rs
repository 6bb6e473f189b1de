//! A request as the engine hands it in, and the state the core keeps for it while it lives.

use super::page_table::{PageTable, pages_for};
use super::prefix_cache::ROOT;

/// Assigned by the engine; unique among live requests.
pub type ReqId = u64;

/// Sampling parameters, already validated by the engine (docs/protocol.md, `sampling`). Stop strings are text and
/// are handled outside the core; they end a request through [`super::Core::finish`].
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
}

#[derive(Clone, Debug, PartialEq)]
pub struct NewRequest {
    pub id: ReqId,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

/// Why a request ended. The engine maps it onto the wire's `finish_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// An EOS id (unless `ignore_eos`) or one of `stop_token_ids` was sampled.
    Stop,
    /// `max_tokens` were generated, the context length was reached, or the KV cache cannot hold the request even
    /// with every other request preempted.
    Length,
    /// The engine ended it (client abort); the core never produces this itself.
    Abort,
    /// The worker failed the step, or returned something that is not a token.
    Error,
}

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
        }
    }

    pub fn len(&self) -> u32 {
        self.tokens.len() as u32
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
}

/// A one-token greedy request, for the unit tests of the containers that hold requests.
#[cfg(test)]
pub(crate) fn test_request(id: ReqId) -> Request {
    let params = SamplingParams {
        max_tokens: 1,
        temperature: 0.0,
        top_p: 1.0,
        top_k: -1,
        seed: 0,
        stop_token_ids: vec![],
        ignore_eos: false,
    };
    Request::new(NewRequest { id, prompt: vec![1], params }, 1, 1, id, 0)
}
