//! The OpenAI API's shapes and the pure mapping between them and the hub's messages, one module per endpoint
//! (as SGLang's Rust router has them): a request body is read into the endpoint's typed request
//! (`chat.rs`, `completions.rs`, `tokenize.rs`, with what both completion endpoints share in `common.rs`), checked
//! in one place and turned into the hub's `Generate`s; finals and deltas become response bodies and stream chunks
//! (`response.rs`); refusals become error bodies naming the offending `param`. No I/O here: `http.rs` serves.
//!
//! Every field of a request is honoured, or refused with a 400 that says why (`unsupported_parameter`), or
//! accepted and documented as having no effect (`user`, `metadata`); a field the API does not know is refused
//! as OpenAI refuses it (`unknown_parameter`). docs/http.md lists them all.

mod chat;
mod common;
mod completions;
mod response;
mod tokenize;
pub mod tools;

pub use chat::parse_chat;
pub use completions::parse_completion;
pub use response::{Chunks, DONE, LogprobText, Reply, Usage, leave_out_completion};
pub use tokenize::{DetokenizeRequest, ToTokenize, TokenizeRequest, parse_detokenize, parse_tokenize};

use proto::api::{ErrorCode, FinishReason, Generate, Rejection};
use serde_json::Value;

/// OpenAI's documented default for `/v1/completions`. Chat completions default to whatever the context leaves.
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: i64 = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    /// The prefix of response ids, as OpenAI spells them.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Endpoint::Completions => "cmpl",
            Endpoint::Chat => "chatcmpl",
        }
    }
}

/// A completion request, read and checked: what the handler sends the hub and how it answers.
#[derive(Debug)]
pub struct Parsed {
    /// One hub request per prompt (a chat request, or a completion of one prompt: one), each of `n` samples.
    /// Choice `i` of the response is sample `i % n` of prompt `i / n`.
    pub requests: Vec<Generate>,
    pub n: u32,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk carries the usage.
    pub include_usage: bool,
    /// Completions' `echo`: each choice's text starts with its prompt.
    pub echo: bool,
    /// Completions' `echo` with `max_tokens: 0`: each choice is its prompt alone; what the engine generated
    /// (one token) is left out.
    pub prompt_only: bool,
    /// The request asked for logprobs (their count is in each request's sampling).
    pub logprobs: bool,
    /// `return_tokens_as_token_ids` (vLLM's extension): logprob tokens written `token_id:<id>`.
    pub tokens_as_ids: bool,
}

/// An error as the API returns it: an HTTP status and OpenAI's `{"error": {...}}` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub param: Option<String>,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, param: None, message: message.into() }
    }

    /// A field with a wrong type or value.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.into()), ..ApiError::new(400, "invalid_params", message) }
    }

    /// A known field asking for something the server does not do.
    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.into()), ..ApiError::new(400, "unsupported_parameter", message) }
    }

    /// A field the API does not know, worded as OpenAI words it.
    pub fn unknown(param: impl Into<String>) -> Self {
        let param = param.into();
        let message = format!("Unrecognized request argument supplied: {param}");
        ApiError { param: Some(param), ..ApiError::new(400, "unknown_parameter", message) }
    }

    /// The engine is gone, or the scheduler is stopping.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError::new(503, "engine_unavailable", message)
    }

    /// OpenAI's `type`: the client's mistake, or ours; or neither: too much load, which a retry may get past
    /// (Anthropic's name for it, which OpenAI's own clients treat as a retryable server error).
    pub fn kind(&self) -> &'static str {
        match self.status {
            _ if self.code == "overloaded" => "overloaded_error",
            ..500 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// Seconds a client should wait before trying again (`Retry-After`), for refusals that a retry may get
    /// past. One second: the queue moves every step, and a client that retries sooner only adds load.
    pub fn retry_after(&self) -> Option<u32> {
        (self.code == "overloaded").then_some(1)
    }

    /// `{"error": {"message", "type", "param", "code"}}`, as a JSON value.
    pub fn body(&self) -> Value {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind(), "param": self.param, "code": self.code }
        })
    }
}

/// How the hub's refusals read over HTTP. Over-long prompts use OpenAI's own code for them; a refusal of one
/// field names it as `param`.
pub fn rejection_error(r: &Rejection) -> ApiError {
    let (status, code) = match r.code {
        ErrorCode::Malformed => (400, "malformed"),
        ErrorCode::UnknownType => (400, "unknown_type"),
        ErrorCode::InvalidParams => (400, "invalid_params"),
        ErrorCode::EmptyPrompt => (400, "empty_prompt"),
        ErrorCode::PromptTooLong => (400, "context_length_exceeded"),
        // The HTTP side picks its own request ids, one peer per request: these would be our bug.
        ErrorCode::UnknownRequest => (500, "unknown_request"),
        ErrorCode::DuplicateRequest => (500, "duplicate_request"),
        ErrorCode::ShuttingDown => (503, "engine_unavailable"),
        ErrorCode::Overloaded => (503, "overloaded"),
        ErrorCode::TooManyRequests => (429, "too_many_requests"),
    };
    ApiError { param: r.param.clone(), ..ApiError::new(status, code, r.message.clone()) }
}

/// OpenAI's `finish_reason` for ours. `abort` only happens to an HTTP request whose client has gone (nobody
/// reads it), and `error` never reaches a choice: it is an error response, or an error event in a stream.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Abort => "stop",
        // OpenAI has no word for memory: the completion was cut short, which is what "length" tells a client.
        FinishReason::Length | FinishReason::Memory => "length",
        FinishReason::Error => "error",
    }
}

/// The `/v1/models` body: the one model served.
pub fn models_body(model: &str, created: u64, max_model_len: u32) -> Value {
    serde_json::json!({
        "object": "list",
        "data": [{
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "minisgl",
            "max_model_len": max_model_len,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn refusals_map_to_statuses_and_keep_their_param() {
        let status = |code| rejection_error(&Rejection::new(None, code, "m")).status;
        assert_eq!(status(ErrorCode::InvalidParams), 400);
        assert_eq!(status(ErrorCode::EmptyPrompt), 400);
        assert_eq!(status(ErrorCode::ShuttingDown), 503);
        assert_eq!(status(ErrorCode::DuplicateRequest), 500);
        let long = rejection_error(&Rejection::new(None, ErrorCode::PromptTooLong, "the prompt has 9 tokens"));
        assert_eq!((long.status, long.code), (400, "context_length_exceeded"));
        assert_eq!(
            long.body(),
            json!({"error": {"message": "the prompt has 9 tokens", "type": "invalid_request_error", "param": null, "code": "context_length_exceeded"}})
        );
        assert_eq!(ApiError::unavailable("gone").body()["error"]["type"], "server_error");
        let hub_says = Rejection::invalid(None, "n", "n must be at most 48 (...), got 100");
        let e = rejection_error(&hub_says);
        assert_eq!((e.status, e.code, e.param.as_deref()), (400, "invalid_params", Some("n")));
        let e = rejection_error(&Rejection::invalid(None, "messages[1].content", "messages[1].content is required"));
        assert_eq!(e.param.as_deref(), Some("messages[1].content"));
    }

    #[test]
    fn an_overloaded_refusal_is_a_503_to_retry() {
        let e = rejection_error(&Rejection::new(None, ErrorCode::Overloaded, "the queue is full"));
        assert_eq!((e.status, e.code, e.retry_after()), (503, "overloaded", Some(1)));
        assert_eq!(
            e.body(),
            json!({"error": {"message": "the queue is full", "type": "overloaded_error", "param": null, "code": "overloaded"}})
        );
        assert_eq!(ApiError::unavailable("gone").retry_after(), None);
    }

    #[test]
    fn an_unknown_field_is_worded_as_openai_words_it() {
        let e = ApiError::unknown("foo");
        assert_eq!(
            e.body(),
            json!({"error": {"message": "Unrecognized request argument supplied: foo", "type": "invalid_request_error",
                             "param": "foo", "code": "unknown_parameter"}})
        );
    }

    #[test]
    fn finish_reasons_map_to_openais() {
        assert_eq!(finish_reason(FinishReason::Stop), "stop");
        assert_eq!(finish_reason(FinishReason::Length), "length");
        assert_eq!(finish_reason(FinishReason::Abort), "stop");
    }
}
