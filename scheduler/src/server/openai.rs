//! The OpenAI API's shapes and the pure mapping between them and the hub's messages: a request body becomes a
//! `Generate`; a `final` becomes a response body; deltas become stream chunks; refusals become error bodies.
//! No I/O here: `http.rs` does the serving. docs/http.md lists what is supported, and why the rest is refused.

use proto::api::{self, ErrorCode, Final, FinishReason, Generate, Rejection, Sampling, ServerMsg};
use serde::Serialize;
use serde_json::{Map, Value};

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

/// A request body, read.
#[derive(Debug)]
pub struct Parsed {
    pub generate: Generate,
    pub stream: bool,
    /// `stream_options.include_usage`: a last chunk carries the usage.
    pub include_usage: bool,
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

    fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.to_owned()), ..ApiError::new(400, "invalid_params", message) }
    }

    fn unsupported(param: &str, message: impl Into<String>) -> Self {
        ApiError { param: Some(param.to_owned()), ..ApiError::new(400, "unsupported_parameter", message) }
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

/// How the hub's refusals read over HTTP. Over-long prompts use OpenAI's own code for them. The protocol's
/// messages about one field start with its name, which becomes OpenAI's `param`.
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
    };
    let param = match r.code {
        ErrorCode::InvalidParams => r.message.split_whitespace().next().filter(|w| PARAM_FIELDS.contains(w)),
        _ => None,
    };
    ApiError { param: param.map(str::to_owned), ..ApiError::new(status, code, r.message.clone()) }
}

const PARAM_FIELDS: [&str; 6] = ["max_tokens", "temperature", "top_p", "top_k", "stop", "n"];

/// OpenAI's `finish_reason` for ours. `abort` only happens to an HTTP request whose client has gone (nobody
/// reads it), and `error` never reaches a choice: it is an error response, or an error event in a stream.
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::Abort => "stop",
        FinishReason::Length => "length",
        FinishReason::Error => "error",
    }
}

// --- requests -------------------------------------------------------------------------------------------------

/// Reads a `/v1/completions` body into a request named `rid`.
pub fn parse_completion(body: &[u8], rid: &str) -> Result<Parsed, ApiError> {
    let map = json_object(body)?;
    let f = Fields(&map);
    reject_common(&f)?;
    if f.bool("echo")?.unwrap_or(false) {
        return Err(ApiError::unsupported("echo", "echo is not supported"));
    }
    if f.get("logprobs").is_some() {
        return Err(ApiError::unsupported("logprobs", "logprobs are not supported"));
    }
    if f.i64("best_of")?.is_some_and(|b| b != 1) {
        return Err(ApiError::unsupported("best_of", "best_of other than 1 is not supported"));
    }
    if f.str("suffix")?.is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "suffix is not supported"));
    }
    let mut generate = Generate::new(rid);
    match prompt(f.get("prompt"))? {
        PromptForm::Text(text) => generate.text = Some(text),
        PromptForm::Ids(ids) => generate.input_ids = Some(ids),
    }
    finish(generate, &f, f.i64("max_tokens")?.unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS))
}

/// Reads a `/v1/chat/completions` body into a request named `rid`; `max_seq_len` is the context length, the
/// default for `max_tokens` (the core stops at the context's end).
pub fn parse_chat(body: &[u8], rid: &str, max_seq_len: u32) -> Result<Parsed, ApiError> {
    let map = json_object(body)?;
    let f = Fields(&map);
    reject_common(&f)?;
    if f.bool("logprobs")?.unwrap_or(false) || f.get("top_logprobs").is_some() {
        return Err(ApiError::unsupported("logprobs", "logprobs are not supported"));
    }
    if f.get("tools").is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty())) {
        return Err(ApiError::unsupported("tools", "tools are not supported over HTTP"));
    }
    if f.get("response_format").is_some_and(|rf| rf.get("type").and_then(Value::as_str) != Some("text")) {
        return Err(ApiError::unsupported("response_format", "only the text response format is supported"));
    }
    let mut generate = Generate::new(rid);
    generate.messages = Some(messages(f.get("messages"))?);
    // The newer name wins where a client sends both.
    let max_tokens = match f.i64("max_completion_tokens")? {
        Some(n) => Some(n),
        None => f.i64("max_tokens")?,
    };
    finish(generate, &f, max_tokens.unwrap_or(i64::from(max_seq_len)))
}

/// The sampling fields both endpoints share, then the protocol's own range checks.
fn finish(mut generate: Generate, f: &Fields<'_>, max_tokens: i64) -> Result<Parsed, ApiError> {
    let d = Sampling::default();
    generate.sampling = Sampling {
        max_tokens,
        temperature: f.f64("temperature")?.unwrap_or(d.temperature),
        top_p: f.f64("top_p")?.unwrap_or(d.top_p),
        top_k: f.i64("top_k")?.unwrap_or(d.top_k),
        seed: f.seed()?,
        stop: f.strings("stop")?,
        stop_token_ids: f.token_ids("stop_token_ids")?,
        ignore_eos: f.bool("ignore_eos")?.unwrap_or(d.ignore_eos),
    };
    // Its upper bound depends on the batch size: the hub checks it.
    generate.n = f.i64("n")?.unwrap_or(1);
    let stream = f.bool("stream")?.unwrap_or(false);
    generate.stream = stream;
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) => Fields(o).bool("include_usage")?.unwrap_or(false),
        Some(_) => return Err(ApiError::invalid("stream_options", "stream_options must be an object")),
    };
    api::validate(&generate).map_err(|r| rejection_error(&r))?;
    Ok(Parsed { generate, stream, include_usage })
}

/// What neither endpoint supports. Each is refused rather than ignored: a client that asks for it would
/// otherwise get something it did not ask for without knowing.
fn reject_common(f: &Fields<'_>) -> Result<(), ApiError> {
    for penalty in ["presence_penalty", "frequency_penalty", "repetition_penalty"] {
        if f.f64(penalty)?.is_some_and(|p| p != 0.0 && !(penalty == "repetition_penalty" && p == 1.0)) {
            return Err(ApiError::unsupported(penalty, format!("{penalty} is not supported")));
        }
    }
    if f.get("logit_bias").is_some_and(|b| b.as_object().is_none_or(|m| !m.is_empty())) {
        return Err(ApiError::unsupported("logit_bias", "logit_bias is not supported"));
    }
    Ok(())
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::new(400, "invalid_json", "the request body must be a JSON object")),
        Err(e) => Err(ApiError::new(400, "invalid_json", format!("the request body is not valid JSON: {e}"))),
    }
}

enum PromptForm {
    Text(String),
    Ids(Vec<u32>),
}

/// A string, or an array of token ids; a batch of one (`["text"]`, `[[ids]]`) is that one prompt.
fn prompt(value: Option<&Value>) -> Result<PromptForm, ApiError> {
    let bad = |m: &str| ApiError::invalid("prompt", m);
    match value {
        None => Err(bad("prompt is required")),
        Some(Value::String(s)) => Ok(PromptForm::Text(s.clone())),
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => items
            .iter()
            .map(token_id)
            .collect::<Option<Vec<_>>>()
            .map(PromptForm::Ids)
            .ok_or_else(|| bad("a prompt of token ids must hold integers in 0..2^32")),
        Some(Value::Array(items)) if items.len() == 1 => prompt(items.first()),
        Some(Value::Array(items)) => Err(ApiError::unsupported(
            "prompt",
            format!("batched prompts ({} of them) are not supported: send one request per prompt", items.len()),
        )),
        Some(_) => Err(bad("prompt must be a string or an array of token ids")),
    }
}

fn token_id(v: &Value) -> Option<u32> {
    v.as_u64().and_then(|t| u32::try_from(t).ok())
}

/// Chat messages for the template. Content given as parts is joined into one string, since the template reads
/// strings; parts other than text are refused.
fn messages(value: Option<&Value>) -> Result<Vec<Value>, ApiError> {
    let bad = |m: String| ApiError::invalid("messages", m);
    let Some(Value::Array(messages)) = value else {
        return Err(bad("messages must be an array of message objects".into()));
    };
    if messages.is_empty() {
        return Err(bad("messages must not be empty".into()));
    }
    let mut out = Vec::with_capacity(messages.len());
    for (i, message) in messages.iter().enumerate() {
        let Value::Object(m) = message else { return Err(bad(format!("messages[{i}] is not an object"))) };
        if !m.get("role").is_some_and(Value::is_string) {
            return Err(bad(format!("messages[{i}] has no role string")));
        }
        let mut m = m.clone();
        if let Some(Value::Array(parts)) = m.get("content") {
            let mut text = String::new();
            for part in parts {
                match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => return Err(bad(format!("messages[{i}]: only text content parts are supported"))),
                }
            }
            m.insert("content".into(), Value::String(text));
        }
        out.push(Value::Object(m));
    }
    Ok(out)
}

/// Typed reads of optional fields; JSON `null` counts as absent. Errors name the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }

    fn f64(&self, name: &str) -> Result<Option<f64>, ApiError> {
        self.get(name)
            .map(|v| v.as_f64().ok_or_else(|| ApiError::invalid(name, format!("{name} must be a number"))))
            .transpose()
    }

    fn i64(&self, name: &str) -> Result<Option<i64>, ApiError> {
        let read = |v: &Value| {
            // Integral floats (`16.0`) are integers to JavaScript clients, which cannot tell them apart.
            v.as_i64()
                .or_else(|| v.as_f64().filter(|x| x.fract() == 0.0 && x.abs() < 9e15).map(|x| x as i64))
                .or_else(|| v.as_u64().map(|_| i64::MAX))
                .ok_or_else(|| ApiError::invalid(name, format!("{name} must be an integer")))
        };
        self.get(name).map(read).transpose()
    }

    fn bool(&self, name: &str) -> Result<Option<bool>, ApiError> {
        self.get(name)
            .map(|v| v.as_bool().ok_or_else(|| ApiError::invalid(name, format!("{name} must be true or false"))))
            .transpose()
    }

    fn str(&self, name: &str) -> Result<Option<&str>, ApiError> {
        self.get(name)
            .map(|v| v.as_str().ok_or_else(|| ApiError::invalid(name, format!("{name} must be a string"))))
            .transpose()
    }

    fn seed(&self) -> Result<Option<u64>, ApiError> {
        let bad = || ApiError::invalid("seed", "seed must be an integer in 0..=2^64-1");
        self.get("seed").map(|v| v.as_u64().ok_or_else(bad)).transpose()
    }

    /// A string or an array of strings (`stop`).
    fn strings(&self, name: &str) -> Result<Vec<String>, ApiError> {
        let bad = || ApiError::invalid(name, format!("{name} must be a string or an array of strings"));
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(items)) => items.iter().map(|v| v.as_str().map(str::to_owned).ok_or_else(bad)).collect(),
            Some(_) => Err(bad()),
        }
    }

    fn token_ids(&self, name: &str) -> Result<Vec<u32>, ApiError> {
        let bad = || ApiError::invalid(name, format!("{name} must be an array of token ids"));
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(|v| token_id(v).ok_or_else(bad)).collect(),
            Some(_) => Err(bad()),
        }
    }
}

// --- responses ------------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Envelope<'a, C> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<C>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
    pub prompt_tokens_details: PromptTokensDetails,
}

#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptTokensDetails {
    /// Prompt tokens whose KV came from the prefix cache rather than a prefill.
    pub cached_tokens: u32,
}

impl Usage {
    /// A request's usage from its samples' finals: the prompt once (the samples share it), the completions of
    /// all, and as cached the least any sample found in the cache. That is the part of the prompt that was
    /// cached before the request came; the samples that reused what another one just prefilled do not make the
    /// prompt count as cached.
    pub fn of<'a>(finals: impl IntoIterator<Item = &'a Final>) -> Usage {
        finals.into_iter().fold(None, Usage::with).unwrap_or(Usage::EMPTY)
    }

    const EMPTY: Usage = Usage {
        prompt_tokens: 0,
        completion_tokens: 0,
        total_tokens: 0,
        prompt_tokens_details: PromptTokensDetails { cached_tokens: 0 },
    };

    /// `so_far` (the usage of the samples that ended before) with sample `f` added.
    fn with(so_far: Option<Usage>, f: &Final) -> Option<Usage> {
        let u = match so_far {
            None => Usage {
                prompt_tokens: f.prompt_tokens,
                completion_tokens: f.completion_tokens,
                prompt_tokens_details: PromptTokensDetails { cached_tokens: f.cached_tokens },
                ..Usage::EMPTY
            },
            Some(u) => Usage {
                completion_tokens: u.completion_tokens.saturating_add(f.completion_tokens),
                prompt_tokens_details: PromptTokensDetails {
                    cached_tokens: u.prompt_tokens_details.cached_tokens.min(f.cached_tokens),
                },
                ..u
            },
        };
        Some(Usage { total_tokens: u.prompt_tokens.saturating_add(u.completion_tokens), ..u })
    }
}

/// A failed sample's error response (or, in a stream, its error event).
fn failure(f: &Final) -> ApiError {
    ApiError::unavailable(f.message.clone().unwrap_or_else(|| "the engine failed".into()))
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: &'a str,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: ChunkDelta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChunkDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

/// What every response body and chunk of one request shares.
#[derive(Clone, Debug)]
pub struct Reply {
    pub endpoint: Endpoint,
    pub id: String,
    pub model: String,
    pub created: u64,
}

impl Reply {
    fn envelope<C>(&self, object: &'static str, choices: Vec<C>, usage: Option<Usage>) -> Envelope<'_, C> {
        Envelope { id: &self.id, object, created: self.created, model: &self.model, choices, usage }
    }

    /// The non-streaming response body for a request's finals (one per sample, in any order), or the error
    /// response that replaces it when a sample failed.
    pub fn body(&self, finals: &[Final]) -> Result<String, ApiError> {
        if let Some(failed) = finals.iter().find(|f| f.finish_reason == FinishReason::Error) {
            return Err(failure(failed));
        }
        let mut finals: Vec<&Final> = finals.iter().collect();
        finals.sort_by_key(|f| f.index);
        let usage = Some(Usage::of(finals.iter().copied()));
        let json = match self.endpoint {
            Endpoint::Completions => {
                let choices = finals
                    .iter()
                    .map(|f| TextChoice {
                        index: f.index,
                        text: &f.text,
                        logprobs: None,
                        finish_reason: Some(finish_reason(f.finish_reason)),
                    })
                    .collect();
                serde_json::to_string(&self.envelope("text_completion", choices, usage))
            }
            Endpoint::Chat => {
                let choices = finals
                    .iter()
                    .map(|f| ChatChoice {
                        index: f.index,
                        message: Message { role: "assistant", content: &f.text },
                        logprobs: None,
                        finish_reason: Some(finish_reason(f.finish_reason)),
                    })
                    .collect();
                serde_json::to_string(&self.envelope("chat.completion", choices, usage))
            }
        };
        Ok(json.expect("response bodies always serialize"))
    }

    /// One stream chunk of choice `index`: a piece of text, the role (chat's first chunk), and the finish
    /// reason (the last).
    fn chunk(&self, index: u32, text: Option<&str>, role: bool, finish: Option<&'static str>) -> String {
        let json = match self.endpoint {
            Endpoint::Completions => {
                let choice = TextChoice { index, text: text.unwrap_or(""), logprobs: None, finish_reason: finish };
                serde_json::to_string(&self.envelope("text_completion", vec![choice], None))
            }
            Endpoint::Chat => {
                let delta = ChunkDelta { role: role.then_some("assistant"), content: text };
                let choice = ChunkChoice { index, delta, logprobs: None, finish_reason: finish };
                serde_json::to_string(&self.envelope("chat.completion.chunk", vec![choice], None))
            }
        };
        json.expect("chunks always serialize")
    }

    fn usage_chunk(&self, usage: Usage) -> String {
        let object = match self.endpoint {
            Endpoint::Completions => "text_completion",
            Endpoint::Chat => "chat.completion.chunk",
        };
        let envelope = self.envelope::<TextChoice<'_>>(object, Vec::new(), Some(usage));
        serde_json::to_string(&envelope).expect("chunks always serialize")
    }
}

/// The SSE `data:` payloads of one streamed request, in order.
pub struct Chunks {
    reply: Reply,
    include_usage: bool,
    /// Samples (choices) in the request, and how many have ended.
    n: u32,
    ended: u32,
    usage: Option<Usage>,
}

pub const DONE: &str = "[DONE]";

impl Chunks {
    pub fn new(reply: Reply, include_usage: bool, n: u32) -> Self {
        Chunks { reply, include_usage, n: n.max(1), ended: 0, usage: None }
    }

    /// What the stream starts with, before any token: chat announces the assistant's role for each choice, as
    /// OpenAI does.
    pub fn opening(&self) -> Vec<String> {
        match self.reply.endpoint {
            Endpoint::Completions => Vec::new(),
            Endpoint::Chat => (0..self.n).map(|i| self.reply.chunk(i, Some(""), true, None)).collect(),
        }
    }

    /// Every sample has had its final: nothing of the request is left running.
    pub fn complete(&self) -> bool {
        self.ended == self.n
    }

    /// The payloads one hub reply becomes, and whether the stream ends with them: after the last sample's
    /// final, or at the first failure.
    pub fn on_reply(&mut self, msg: &ServerMsg) -> (Vec<String>, bool) {
        match msg {
            // A token whose text is still held back (half a character, a possible stop string) says nothing yet.
            ServerMsg::Delta(d) if d.text.is_empty() => (Vec::new(), false),
            ServerMsg::Delta(d) => (vec![self.reply.chunk(d.index, Some(&d.text), false, None)], false),
            ServerMsg::Final(f) if f.finish_reason == FinishReason::Error => {
                self.ended += 1;
                (self.error(&failure(f)), true)
            }
            ServerMsg::Final(f) => {
                self.ended += 1;
                self.usage = Usage::with(self.usage, f);
                let reason = Some(finish_reason(f.finish_reason));
                let last = match self.reply.endpoint {
                    Endpoint::Completions => self.reply.chunk(f.index, Some(""), false, reason),
                    Endpoint::Chat => self.reply.chunk(f.index, None, false, reason),
                };
                let mut out = vec![last];
                if !self.complete() {
                    return (out, false);
                }
                if self.include_usage {
                    out.push(self.reply.usage_chunk(self.usage.unwrap_or(Usage::EMPTY)));
                }
                out.push(DONE.into());
                (out, true)
            }
            ServerMsg::Error(e) => {
                let rejection = Rejection::new(e.rid.clone(), e.code, e.message.clone());
                (self.error(&rejection_error(&rejection)), true)
            }
            ServerMsg::Info(_) => (Vec::new(), false),
        }
    }

    /// The scheduler stopped before the request ended.
    pub fn on_lost(&self) -> Vec<String> {
        self.error(&ApiError::unavailable("the scheduler stopped before the request finished"))
    }

    /// Headers are sent by now, so a failure mid-stream is an error event, then the end.
    fn error(&self, e: &ApiError) -> Vec<String> {
        vec![e.body().to_string(), DONE.into()]
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
    use proto::api::Delta;
    use serde_json::json;

    fn completion(body: Value) -> Result<Parsed, ApiError> {
        parse_completion(body.to_string().as_bytes(), "cmpl-1")
    }

    fn chat(body: Value) -> Result<Parsed, ApiError> {
        parse_chat(body.to_string().as_bytes(), "chatcmpl-1", 4096)
    }

    fn status_code(r: Result<Parsed, ApiError>) -> (u16, &'static str) {
        let e = r.expect_err("expected a refusal");
        (e.status, e.code)
    }

    #[test]
    fn a_completion_request_becomes_a_generate_with_every_field() {
        let p = completion(json!({
            "model": "anything", "prompt": "def f():", "max_tokens": 7, "temperature": 0, "top_p": 0.5,
            "top_k": 3, "seed": 18446744073709551615u64, "stop": "\n\n", "stop_token_ids": [5, 6],
            "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}, "n": 1,
            "echo": false, "logprobs": null, "best_of": 1, "user": "ignored",
        }))
        .unwrap();
        let g = &p.generate;
        assert_eq!((g.rid.as_str(), g.text.as_deref(), g.stream), ("cmpl-1", Some("def f():"), true));
        let s = &g.sampling;
        assert_eq!((s.max_tokens, s.temperature, s.top_p, s.top_k), (7, 0.0, 0.5, 3));
        assert_eq!(
            (s.seed, s.stop.clone(), s.stop_token_ids.clone()),
            (Some(u64::MAX), vec!["\n\n".into()], vec![5, 6])
        );
        assert!(s.ignore_eos && p.stream && p.include_usage);
    }

    #[test]
    fn completion_defaults_follow_openai() {
        let p = completion(json!({"prompt": "x"})).unwrap();
        assert_eq!(p.generate.sampling.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS);
        assert_eq!(p.generate.sampling.temperature, 1.0);
        assert!(!p.stream && !p.generate.stream && !p.include_usage);
        assert_eq!(p.generate.sampling.seed, None);
    }

    #[test]
    fn prompts_are_text_or_token_ids_and_a_batch_of_one_is_one() {
        let ids = |b| completion(b).unwrap().generate.input_ids;
        assert_eq!(ids(json!({"prompt": [1, 2, 3]})), Some(vec![1, 2, 3]));
        assert_eq!(ids(json!({"prompt": [[4, 5]]})), Some(vec![4, 5]));
        assert_eq!(completion(json!({"prompt": ["hi"]})).unwrap().generate.text.as_deref(), Some("hi"));
        assert_eq!(status_code(completion(json!({"prompt": ["a", "b"]}))), (400, "unsupported_parameter"));
        assert_eq!(status_code(completion(json!({"prompt": [1, -2]}))), (400, "invalid_params"));
        assert_eq!(status_code(completion(json!({"prompt": [1, 1.5]}))), (400, "invalid_params"));
        assert_eq!(status_code(completion(json!({"prompt": 5}))), (400, "invalid_params"));
        let missing = completion(json!({"max_tokens": 5})).unwrap_err();
        assert_eq!((missing.param.as_deref(), missing.message.as_str()), (Some("prompt"), "prompt is required"));
    }

    #[test]
    fn unsupported_features_are_refused_with_a_400_naming_them() {
        for (body, param) in [
            (json!({"prompt": "x", "echo": true}), "echo"),
            (json!({"prompt": "x", "logprobs": 1}), "logprobs"),
            (json!({"prompt": "x", "best_of": 3}), "best_of"),
            (json!({"prompt": "x", "suffix": "end"}), "suffix"),
            (json!({"prompt": "x", "presence_penalty": 0.5}), "presence_penalty"),
            (json!({"prompt": "x", "logit_bias": {"5": 1}}), "logit_bias"),
        ] {
            let e = completion(body).unwrap_err();
            assert_eq!((e.status, e.code, e.param.as_deref()), (400, "unsupported_parameter", Some(param)));
            assert!(e.message.contains(param), "{}", e.message);
        }
        // Their neutral values are fine.
        completion(json!({"prompt": "x", "presence_penalty": 0, "repetition_penalty": 1.0, "logit_bias": {}})).unwrap();
        let chat_refusals = [
            json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true}),
            json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
            json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}),
        ];
        for body in chat_refusals {
            assert_eq!(status_code(chat(body)), (400, "unsupported_parameter"));
        }
    }

    #[test]
    fn out_of_range_values_get_the_protocols_messages() {
        let e = completion(json!({"prompt": "x", "temperature": -1})).unwrap_err();
        assert_eq!(
            (e.status, e.code, e.message.as_str()),
            (400, "invalid_params", "temperature must be finite and >= 0, got -1")
        );
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = completion(json!({"prompt": "x", "top_p": 1.5})).unwrap_err();
        assert_eq!((e.message.as_str(), e.param.as_deref()), ("top_p must be in (0, 1], got 1.5", Some("top_p")));
        assert_eq!(status_code(completion(json!({"prompt": "x", "max_tokens": 0}))), (400, "invalid_params"));
        assert_eq!(status_code(completion(json!({"prompt": "x", "stop": [""]}))), (400, "invalid_params"));
        let e = completion(json!({"prompt": "x", "temperature": "hot"})).unwrap_err();
        assert_eq!((e.param.as_deref(), e.message.as_str()), (Some("temperature"), "temperature must be a number"));
        assert_eq!(status_code(completion(json!({"prompt": "x", "seed": -1}))), (400, "invalid_params"));
        assert_eq!(status_code(completion(json!({"prompt": "x", "stop": 3}))), (400, "invalid_params"));
        assert_eq!(status_code(completion(json!({"prompt": "x", "max_tokens": 1.5}))), (400, "invalid_params"));
        assert_eq!(completion(json!({"prompt": "x", "max_tokens": 8.0})).unwrap().generate.sampling.max_tokens, 8);
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_400s() {
        for body in [&b"{\"prompt\": "[..], b"", b"[1, 2]", b"\xff"] {
            let e = parse_completion(body, "r").unwrap_err();
            assert_eq!((e.status, e.code), (400, "invalid_json"), "{body:?}");
        }
    }

    #[test]
    fn chat_messages_pass_through_and_text_parts_are_joined() {
        let p = chat(json!({
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
            ],
            "max_completion_tokens": 9, "max_tokens": 3,
        }))
        .unwrap();
        let messages = p.generate.messages.unwrap();
        assert_eq!(messages[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(messages[1], json!({"role": "user", "content": "Hi there"}));
        assert_eq!(p.generate.sampling.max_tokens, 9, "max_completion_tokens wins");
        assert_eq!(
            chat(json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 3}))
                .unwrap()
                .generate
                .sampling
                .max_tokens,
            3
        );
        let default = chat(json!({"messages": [{"role": "user", "content": "x"}]})).unwrap();
        assert_eq!(default.generate.sampling.max_tokens, 4096, "as many as the context allows");
        let image = json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]});
        for body in [
            image,
            json!({"messages": []}),
            json!({"messages": "hi"}),
            json!({"messages": [{"content": "x"}]}),
            json!({}),
        ] {
            assert_eq!(status_code(chat(body.clone())), (400, "invalid_params"), "{body}");
        }
    }

    #[test]
    fn refusals_map_to_statuses() {
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
    }

    fn reply(endpoint: Endpoint) -> Reply {
        Reply { endpoint, id: "x-1".into(), model: "m".into(), created: 42 }
    }

    fn final_msg(reason: FinishReason, text: &str) -> Final {
        Final {
            rid: "x-1".into(),
            index: 0,
            cached_tokens: 0,
            finish_reason: reason,
            prompt_tokens: 5,
            completion_tokens: 3,
            token_ids: vec![1, 2, 3],
            text: text.into(),
            message: None,
        }
    }

    fn parse(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn a_final_becomes_openais_response_body() {
        let cached = Final { cached_tokens: 4, ..final_msg(FinishReason::Length, "abc") };
        let body = parse(&reply(Endpoint::Completions).body(&[cached]).unwrap());
        assert_eq!(
            body,
            json!({"id": "x-1", "object": "text_completion", "created": 42, "model": "m",
                   "choices": [{"index": 0, "text": "abc", "logprobs": null, "finish_reason": "length"}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 4}}})
        );
        let body = parse(&reply(Endpoint::Chat).body(&[final_msg(FinishReason::Stop, "hi")]).unwrap());
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["choices"][0]["message"], json!({"role": "assistant", "content": "hi"}));
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert_eq!(body["usage"]["prompt_tokens_details"], json!({"cached_tokens": 0}));
        let failed = Final { message: Some("the worker died".into()), ..final_msg(FinishReason::Error, "") };
        let e = reply(Endpoint::Chat).body(&[failed]).unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (503, "the worker died"));
    }

    fn sample(index: u32, text: &str, completion_tokens: u32, cached_tokens: u32) -> Final {
        Final { index, completion_tokens, cached_tokens, ..final_msg(FinishReason::Length, text) }
    }

    #[test]
    fn n_finals_become_n_choices_in_index_order_and_usage_counts_the_prompt_once() {
        // As they may arrive: out of order, the first sample prefilling, the others reusing its pages.
        let finals = [sample(2, "c", 4, 16), sample(0, "a", 3, 0), sample(1, "b", 5, 16)];
        let body = parse(&reply(Endpoint::Chat).body(&finals).unwrap());
        let choices = body["choices"].as_array().unwrap();
        let got: Vec<(u64, &str)> =
            choices.iter().map(|c| (c["index"].as_u64().unwrap(), c["message"]["content"].as_str().unwrap())).collect();
        assert_eq!(got, [(0, "a"), (1, "b"), (2, "c")]);
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );
        let body = parse(&reply(Endpoint::Completions).body(&finals).unwrap());
        assert_eq!(body["choices"][2], json!({"index": 2, "text": "c", "logprobs": null, "finish_reason": "length"}));
        // One failed sample fails the request.
        let failed = Final { index: 1, message: Some("gone".into()), ..final_msg(FinishReason::Error, "") };
        let e = reply(Endpoint::Chat).body(&[finals[1].clone(), failed]).unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (503, "gone"));
    }

    #[test]
    fn n_is_read_and_checked_and_a_bound_the_hub_sets_names_it() {
        assert_eq!(completion(json!({"prompt": "x", "n": 3})).unwrap().generate.n, 3);
        assert_eq!(chat(json!({"messages": [{"role": "user", "content": "x"}], "n": 2})).unwrap().generate.n, 2);
        assert_eq!(completion(json!({"prompt": "x"})).unwrap().generate.n, 1);
        let e = completion(json!({"prompt": "x", "n": 0})).unwrap_err();
        assert_eq!((e.status, e.code, e.param.as_deref()), (400, "invalid_params", Some("n")));
        let e = completion(json!({"prompt": "x", "n": "two"})).unwrap_err();
        assert_eq!((e.status, e.param.as_deref()), (400, Some("n")));
        let hub_says = Rejection::new(None, ErrorCode::InvalidParams, "n must be at most 48 (...), got 100");
        let e = rejection_error(&hub_says);
        assert_eq!((e.status, e.code, e.param.as_deref()), (400, "invalid_params", Some("n")));
        let other = rejection_error(&Rejection::new(None, ErrorCode::InvalidParams, "no such thing"));
        assert_eq!(other.param, None);
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
    fn finish_reasons_map_to_openais() {
        assert_eq!(finish_reason(FinishReason::Stop), "stop");
        assert_eq!(finish_reason(FinishReason::Length), "length");
        assert_eq!(finish_reason(FinishReason::Abort), "stop");
    }

    fn delta(text: &str) -> ServerMsg {
        ServerMsg::Delta(Delta { rid: "x-1".into(), index: 0, token_ids: vec![1], text: text.into() })
    }

    /// Every payload of a stream of `msgs`, and whether the last message ended it.
    fn stream(chunks: &mut Chunks, msgs: &[ServerMsg]) -> (Vec<String>, bool) {
        let mut out = chunks.opening();
        let mut ended = false;
        for m in msgs {
            let (data, last) = chunks.on_reply(m);
            out.extend(data);
            ended = last;
        }
        (out, ended)
    }

    #[test]
    fn a_chat_stream_opens_with_the_role_and_ends_with_the_reason_usage_and_done() {
        let mut chunks = Chunks::new(reply(Endpoint::Chat), true, 1);
        let msgs = [delta("He"), delta(""), delta("llo"), ServerMsg::Final(final_msg(FinishReason::Stop, "Hello"))];
        let (out, ended) = stream(&mut chunks, &msgs);
        assert!(ended);
        assert_eq!(out.len(), 6, "{out:?}");
        assert_eq!(out.last().map(String::as_str), Some(DONE));
        let json: Vec<Value> = out[..5].iter().map(|s| parse(s)).collect();
        assert!(json.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == "x-1"));
        assert_eq!(json[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        let text: String = json.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
        assert_eq!(text, "Hello");
        assert_eq!(json[3]["choices"][0], json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}));
        assert_eq!(json[4]["choices"], json!([]));
        assert_eq!(
            json[4]["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );
        assert!(json[..4].iter().all(|c| c.get("usage").is_none()));
    }

    #[test]
    fn a_completion_stream_carries_text_chunks() {
        let mut chunks = Chunks::new(reply(Endpoint::Completions), false, 1);
        let msgs = [delta("a"), ServerMsg::Final(final_msg(FinishReason::Length, "a"))];
        let (out, _) = stream(&mut chunks, &msgs);
        assert_eq!(out.len(), 3, "no opening, no usage: {out:?}");
        assert_eq!(parse(&out[0])["choices"][0]["text"], "a");
        assert_eq!(parse(&out[1])["choices"][0]["finish_reason"], "length");
        assert_eq!(out[2], DONE);
    }

    #[test]
    fn a_stream_that_fails_ends_with_an_error_event() {
        let mut chunks = Chunks::new(reply(Endpoint::Chat), true, 2);
        let failed = Final { message: Some("the worker died".into()), ..final_msg(FinishReason::Error, "") };
        let (out, ended) = chunks.on_reply(&ServerMsg::Final(failed));
        assert!(ended && !chunks.complete(), "one sample's failure ends the stream; the other is still running");
        assert_eq!(parse(&out[0])["error"]["message"], "the worker died");
        assert_eq!(out[1], DONE);
        let lost = chunks.on_lost();
        assert_eq!((parse(&lost[0])["error"]["code"].as_str(), lost[1].as_str()), (Some("engine_unavailable"), DONE));
    }

    fn delta_of(index: u32, text: &str) -> ServerMsg {
        ServerMsg::Delta(Delta { rid: "x-1".into(), index, token_ids: vec![1], text: text.into() })
    }

    #[test]
    fn a_stream_of_n_choices_tags_each_chunk_and_ends_after_the_last_final() {
        let mut chunks = Chunks::new(reply(Endpoint::Chat), true, 2);
        let msgs = [
            delta_of(1, "B"),
            delta_of(0, "A"),
            ServerMsg::Final(sample(1, "B", 1, 16)),
            delta_of(0, "a"),
            ServerMsg::Final(sample(0, "Aa", 2, 0)),
        ];
        let mut out = chunks.opening();
        let mut ends = Vec::new();
        for m in &msgs {
            let (data, last) = chunks.on_reply(m);
            out.extend(data);
            ends.push(last);
        }
        assert_eq!(ends, [false, false, false, false, true], "the stream ends with the last sample's final");
        assert!(chunks.complete());
        assert_eq!(out.last().map(String::as_str), Some(DONE));
        let json: Vec<Value> = out[..out.len() - 1].iter().map(|s| parse(s)).collect();
        let roles: Vec<u64> = json[..2].iter().map(|c| c["choices"][0]["index"].as_u64().unwrap()).collect();
        assert_eq!(roles, [0, 1], "each choice opens with the role");
        let text_of = |i: u64| -> String {
            json.iter()
                .filter(|c| c["choices"].get(0).is_some_and(|ch| ch["index"] == i))
                .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                .collect()
        };
        assert_eq!((text_of(0), text_of(1)), ("Aa".to_string(), "B".to_string()));
        let reasons: Vec<(u64, &str)> = json
            .iter()
            .filter_map(|c| {
                let ch = c["choices"].get(0)?;
                Some((ch["index"].as_u64()?, ch["finish_reason"].as_str()?))
            })
            .collect();
        assert_eq!(reasons, [(1, "length"), (0, "length")]);
        let usage = &json.last().unwrap()["usage"];
        assert_eq!(
            *usage,
            json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );
    }
}
