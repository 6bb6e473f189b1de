//! What the core hands the engine per step: the plan of a step in flight, and the events a step produced.

use super::request::{FinishReason, ReqId};
use proto::step::StepKind;

/// One request of a planned step, in the step's request order (which is also the order of the result's tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedReq {
    pub id: ReqId,
    pub slot: u32,
    /// Its last new token is the last of its sequence, so the token sampled for it is real. False for the non-final
    /// chunks of a chunked prefill, whose samples are discarded.
    pub samples: bool,
    /// Prompt-logprob entries this request has in the step's result (its positions with a `logprob_target`),
    /// after those of the requests before it.
    pub prompt_entries: u32,
}

/// A step written into a slot and not yet completed. It carries everything `complete_step` needs, so completing a
/// step never reads the slot again (which the ring may have reused) and several steps can be in flight at once.
#[derive(Debug)]
pub struct Planned {
    pub(crate) step_id: u64,
    pub(crate) kind: StepKind,
    pub(crate) num_tokens: u32,
    pub(crate) reqs: Vec<PlannedReq>,
}

impl Planned {
    pub fn step_id(&self) -> u64 {
        self.step_id
    }

    pub fn kind(&self) -> StepKind {
        self.kind
    }

    /// Requests in the step: the `n` the result must answer with.
    pub fn num_reqs(&self) -> usize {
        self.reqs.len()
    }

    /// New tokens in the step (prefill chunk tokens, or one per request when decoding).
    pub fn num_tokens(&self) -> u32 {
        self.num_tokens
    }

    pub fn reqs(&self) -> &[PlannedReq] {
        &self.reqs
    }
}

/// Where a token's logprobs are in the result of the step that sampled it, for a request that asked for them:
/// its row (the request's place in the step), and how many of the top entries it asked for. The engine reads
/// them while the result is still in the ring; the core itself never touches logprobs, so requests that ask for
/// none cost nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogprobsAt {
    pub row: u32,
    pub top: u32,
}

/// What a request did, for the engine to forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// A token was generated; with `finish`, it is the request's last and the request is gone from the core.
    /// `logprobs` is set when the request asked for them.
    Token { id: ReqId, token: u32, finish: Option<FinishReason>, logprobs: Option<LogprobsAt> },
    /// The request ended without a new token (the KV cache cannot hold it, or the worker failed it) and is gone.
    Finished { id: ReqId, reason: FinishReason },
    /// The request's first admission found its prompt's first `tokens` tokens in the prefix cache: they were not
    /// prefilled again. Sent once per request, before its first token, and only when `tokens > 0`.
    Cached { id: ReqId, tokens: u32 },
    /// The logprobs of the request's next `count` prompt tokens (in prompt order, the second token first) are the
    /// step result's prompt-logprob entries `first .. first + count`, with `top` of the top entries each asked
    /// for. Comes before the request's token of the same step; every prompt token after the first is covered
    /// once, whatever the chunking or preemptions.
    PromptLogprobs { id: ReqId, first: u32, count: u32, top: u32 },
}

impl Event {
    pub fn id(&self) -> ReqId {
        match *self {
            Event::Token { id, .. }
            | Event::Finished { id, .. }
            | Event::Cached { id, .. }
            | Event::PromptLogprobs { id, .. } => id,
        }
    }

    /// The reason the request ended, when this event ends it.
    pub fn finish(&self) -> Option<FinishReason> {
        match *self {
            Event::Token { finish, .. } => finish,
            Event::Finished { reason, .. } => Some(reason),
            Event::Cached { .. } | Event::PromptLogprobs { .. } => None,
        }
    }
}

/// What the prefix cache saved so far, and what it holds now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Prompt tokens of every admission (re-admissions after a preemption included).
    pub prompt_tokens: u64,
    /// Of those, the tokens found in the cache rather than prefilled.
    pub cached_tokens: u64,
    /// Pages in the radix tree, and those of them no running request uses (evicted first when pages run out).
    pub cached_pages: u32,
    pub evictable_pages: u32,
}
