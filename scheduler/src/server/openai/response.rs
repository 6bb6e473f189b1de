//! Response bodies and stream chunks, from the hub's finals and deltas, with their logprobs in OpenAI's two
//! shapes (chat's `logprobs.content`, completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`).
//!
//! The handler gives every reply its choice index (`prompt_i * n + sample`) before it comes here.

use super::{ApiError, Endpoint, finish_reason, rejection_error};
use crate::text::TokenTable;
use proto::api::{Final, FinishReason, Rejection, ServerMsg, TokenLogprobs, ToolCall};
use serde::Serialize;
use serde_json::{Map, Value, json};
use std::borrow::Cow;
use std::sync::Arc;

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

/// A choice's counts, as its final gives them.
#[derive(Clone, Copy, Debug)]
struct Counts {
    index: u32,
    prompt_tokens: u32,
    completion_tokens: u32,
    cached_tokens: u32,
}

impl From<&Final> for Counts {
    fn from(f: &Final) -> Self {
        Counts {
            index: f.index,
            prompt_tokens: f.prompt_tokens,
            completion_tokens: f.completion_tokens,
            cached_tokens: f.cached_tokens,
        }
    }
}

impl Usage {
    /// A request's usage from its choices' counts, `n` choices per prompt: each prompt once (its samples share
    /// it), the completions of all, and as cached, per prompt, the least any of its samples found in the cache.
    /// That is the part of the prompt that was cached before the request came; the samples that reused what
    /// another one just prefilled do not make the prompt count as cached.
    fn of(choices: &[Counts], n: u32) -> Usage {
        let mut prompts: Vec<(u32, u32, u32)> = Vec::new(); // (prompt index, prompt tokens, cached)
        let mut completion_tokens = 0u32;
        for c in choices {
            completion_tokens = completion_tokens.saturating_add(c.completion_tokens);
            let prompt = c.index / n.max(1);
            match prompts.iter_mut().find(|(p, _, _)| *p == prompt) {
                Some((_, _, cached)) => *cached = (*cached).min(c.cached_tokens),
                None => prompts.push((prompt, c.prompt_tokens, c.cached_tokens)),
            }
        }
        let prompt_tokens = prompts.iter().fold(0u32, |sum, p| sum.saturating_add(p.1));
        let cached_tokens = prompts.iter().fold(0u32, |sum, p| sum.saturating_add(p.2));
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
            prompt_tokens_details: PromptTokensDetails { cached_tokens },
        }
    }
}

/// A failed sample's error response (or, in a stream, its error event).
fn failure(f: &Final) -> ApiError {
    ApiError::unavailable(f.message.clone().unwrap_or_else(|| "the engine failed".into()))
}

#[derive(Serialize)]
struct TextChoice<'a> {
    index: u32,
    text: Cow<'a, str>,
    logprobs: Option<Value>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChatChoice<'a> {
    index: u32,
    message: Message<'a>,
    logprobs: Option<Value>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    /// Null when the model only called tools, as OpenAI has it.
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<Value>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: ChunkDelta<'a>,
    logprobs: Option<Value>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct ChunkDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Value>,
}

/// A call as a chat message lists it.
fn tool_call_json(c: &ToolCall) -> Value {
    json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}})
}

/// A choice's calls: none is no `tool_calls` key.
fn calls_of(f: &Final) -> Option<&[ToolCall]> {
    f.tool_calls.as_deref().filter(|c| !c.is_empty())
}

/// OpenAI's `finish_reason` for a chat choice: `"tool_calls"` when the model stopped after calling tools.
fn chat_finish_reason(f: &Final) -> &'static str {
    match f.finish_reason {
        FinishReason::Stop if calls_of(f).is_some() => "tool_calls",
        reason => finish_reason(reason),
    }
}

/// How a request's logprobs are written: each token's text and bytes from the tokenizer's table.
#[derive(Clone)]
pub struct LogprobText {
    pub table: Arc<TokenTable>,
    /// vLLM's `return_tokens_as_token_ids`: tokens written `token_id:<id>`, which no two tokens share.
    pub tokens_as_ids: bool,
}

impl LogprobText {
    fn token(&self, id: u32) -> Cow<'_, str> {
        if self.tokens_as_ids { Cow::Owned(format!("token_id:{id}")) } else { self.table.text(id) }
    }

    fn entry(&self, id: u32, logprob: f32) -> Value {
        json!({"token": self.token(id), "logprob": logprob, "bytes": self.table.bytes(id)})
    }

    /// Chat's `logprobs`: `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
    fn chat(&self, ids: &[u32], logprobs: &[TokenLogprobs]) -> Value {
        let content: Vec<Value> = ids
            .iter()
            .zip(logprobs)
            .map(|(&id, lp)| {
                let mut entry = self.entry(id, lp.logprob);
                entry["top_logprobs"] = lp.top.iter().map(|&(t, l)| self.entry(t, l)).collect();
                entry
            })
            .collect();
        json!({"content": content, "refusal": null})
    }

    /// Completions' `logprobs` of `entries` (each token's id and its logprobs: none for a prompt's first token,
    /// which has nothing before it), `offset` being the text offset of the first token (in characters); returns
    /// the offset after the last.
    fn completion<'a>(
        &self,
        entries: impl ExactSizeIterator<Item = (u32, Option<&'a TokenLogprobs>)>,
        mut offset: u32,
    ) -> (Value, u32) {
        let mut tokens = Vec::with_capacity(entries.len());
        let mut token_logprobs = Vec::with_capacity(entries.len());
        let mut top_logprobs = Vec::with_capacity(entries.len());
        let mut text_offset = Vec::with_capacity(entries.len());
        for (id, lp) in entries {
            let token = self.token(id);
            text_offset.push(offset);
            // vLLM's offsets: each token's own text, one after another.
            offset = offset.saturating_add(self.table.text(id).chars().count() as u32);
            tokens.push(token.into_owned());
            let Some(lp) = lp else {
                token_logprobs.push(Value::Null);
                top_logprobs.push(Value::Null);
                continue;
            };
            token_logprobs.push(json!(lp.logprob));
            let mut top = Map::new();
            for &(t, l) in &lp.top {
                // Two ids with one text (rare): the likelier one, listed first, keeps the key.
                top.entry(self.token(t).into_owned()).or_insert(json!(l));
            }
            top_logprobs.push(Value::Object(top));
        }
        let value = json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
                           "text_offset": text_offset});
        (value, offset)
    }
}

/// What every response body and chunk of one request shares.
#[derive(Clone)]
pub struct Reply {
    pub endpoint: Endpoint,
    pub id: String,
    pub model: String,
    pub created: u64,
    /// Samples per prompt: choice `i` is sample `i % n` of prompt `i / n`.
    pub n: u32,
    /// Completions' `echo`: per prompt, the text its choices start with. Empty without echo.
    pub echo: Vec<String>,
    /// Set when the request asked for logprobs (with `echo`, the prompt's tokens have theirs too).
    pub logprobs: Option<LogprobText>,
}

/// Pairs each token id with its logprobs, for [`LogprobText::completion`].
fn sampled<'a>(
    ids: &'a [u32],
    lps: &'a [TokenLogprobs],
) -> impl ExactSizeIterator<Item = (u32, Option<&'a TokenLogprobs>)> {
    ids.iter().copied().zip(lps.iter().map(Some))
}

/// The prompt's tokens with their logprobs, as a message carries them (`prompt_token_ids`, `prompt_logprobs`).
fn prompt_entries<'a>(
    ids: Option<&'a [u32]>,
    lps: Option<&'a [Option<TokenLogprobs>]>,
) -> impl ExactSizeIterator<Item = (u32, Option<&'a TokenLogprobs>)> {
    let (ids, lps) = (ids.unwrap_or_default(), lps.unwrap_or_default());
    ids.iter().copied().zip(lps.iter().map(Option::as_ref))
}

/// For a completion of `echo` and `max_tokens: 0`: what the engine generated (one token) left out of `msg`, which
/// then carries the prompt alone, cut where the client asked (`"length"`).
pub fn leave_out_completion(msg: &mut ServerMsg) {
    match msg {
        ServerMsg::Delta(d) => {
            d.token_ids.clear();
            d.text.clear();
            d.logprobs = None;
        }
        ServerMsg::Final(f) => {
            f.token_ids.clear();
            f.text.clear();
            f.completion_tokens = 0;
            if let Some(lps) = &mut f.logprobs {
                lps.clear();
            }
            if f.finish_reason == FinishReason::Stop {
                f.finish_reason = FinishReason::Length;
            }
        }
        ServerMsg::Error(_) | ServerMsg::Info(_) => {}
    }
}

impl Reply {
    fn envelope<C>(&self, object: &'static str, choices: Vec<C>, usage: Option<Usage>) -> Envelope<'_, C> {
        Envelope { id: &self.id, object, created: self.created, model: &self.model, choices, usage }
    }

    fn echo_of(&self, index: u32) -> &str {
        self.echo.get((index / self.n.max(1)) as usize).map_or("", String::as_str)
    }

    fn final_logprobs(&self, f: &Final) -> Option<Value> {
        let (text, lps) = (self.logprobs.as_ref()?, f.logprobs.as_deref().unwrap_or_default());
        Some(match self.endpoint {
            Endpoint::Chat => text.chat(&f.token_ids, lps),
            // With echo, the prompt's tokens come first, then the generated ones, offsets running on.
            Endpoint::Completions if self.echoes_prompt_logprobs() => {
                let prompt = prompt_entries(f.prompt_token_ids.as_deref(), f.prompt_logprobs.as_deref());
                let all: Vec<_> = prompt.chain(sampled(&f.token_ids, lps)).collect();
                text.completion(all.into_iter(), 0).0
            }
            Endpoint::Completions => text.completion(sampled(&f.token_ids, lps), 0).0,
        })
    }

    /// Completions with `echo` and `logprobs`: the echoed prompt comes with its tokens' logprobs.
    fn echoes_prompt_logprobs(&self) -> bool {
        self.endpoint == Endpoint::Completions && !self.echo.is_empty() && self.logprobs.is_some()
    }

    /// The stream chunk that echoes choice `index`'s prompt, with its tokens' logprobs when asked for; returns it
    /// with the text offset after the prompt.
    fn echo_chunk(&self, index: u32, ids: Option<&[u32]>, lps: Option<&[Option<TokenLogprobs>]>) -> (String, u32) {
        let (logprobs, end) = match &self.logprobs {
            Some(text) => {
                let (value, end) = text.completion(prompt_entries(ids, lps), 0);
                (Some(value), end)
            }
            None => (None, 0),
        };
        (self.chunk(index, Some(self.echo_of(index)), false, None, logprobs), end)
    }

    /// The non-streaming response body for a request's finals (one per choice, in any order), or the error
    /// response that replaces it when a choice failed.
    pub fn body(&self, finals: &[Final]) -> Result<String, ApiError> {
        if let Some(failed) = finals.iter().find(|f| f.finish_reason == FinishReason::Error) {
            return Err(failure(failed));
        }
        let mut finals: Vec<&Final> = finals.iter().collect();
        finals.sort_by_key(|f| f.index);
        let counts: Vec<Counts> = finals.iter().map(|f| Counts::from(*f)).collect();
        let usage = Some(Usage::of(&counts, self.n));
        let json = match self.endpoint {
            Endpoint::Completions => {
                let choices = finals
                    .iter()
                    .map(|f| TextChoice {
                        index: f.index,
                        text: match self.echo_of(f.index) {
                            "" => Cow::Borrowed(f.text.as_str()),
                            echo => Cow::Owned(format!("{echo}{}", f.text)),
                        },
                        logprobs: self.final_logprobs(f),
                        finish_reason: Some(finish_reason(f.finish_reason)),
                    })
                    .collect();
                serde_json::to_string(&self.envelope("text_completion", choices, usage))
            }
            Endpoint::Chat => {
                let choices = finals
                    .iter()
                    .map(|f| {
                        let calls = calls_of(f);
                        let content = (calls.is_none() || !f.text.is_empty()).then_some(f.text.as_str());
                        let tool_calls = calls.map(|c| c.iter().map(tool_call_json).collect());
                        ChatChoice {
                            index: f.index,
                            message: Message { role: "assistant", content, tool_calls },
                            logprobs: self.final_logprobs(f),
                            finish_reason: Some(chat_finish_reason(f)),
                        }
                    })
                    .collect();
                serde_json::to_string(&self.envelope("chat.completion", choices, usage))
            }
        };
        Ok(json.expect("response bodies always serialize"))
    }

    /// One stream chunk of choice `index`: a piece of text, the role (chat's first chunk), the finish reason
    /// (the last), and the logprobs of the piece's tokens.
    fn chunk(
        &self,
        index: u32,
        text: Option<&str>,
        role: bool,
        finish: Option<&'static str>,
        logprobs: Option<Value>,
    ) -> String {
        let json = match self.endpoint {
            Endpoint::Completions => {
                let text = Cow::Borrowed(text.unwrap_or(""));
                let choice = TextChoice { index, text, logprobs, finish_reason: finish };
                serde_json::to_string(&self.envelope("text_completion", vec![choice], None))
            }
            Endpoint::Chat => {
                let delta = ChunkDelta { role: role.then_some("assistant"), content: text, tool_calls: None };
                let choice = ChunkChoice { index, delta, logprobs, finish_reason: finish };
                serde_json::to_string(&self.envelope("chat.completion.chunk", vec![choice], None))
            }
        };
        json.expect("chunks always serialize")
    }

    /// The two chunks of a call in a chat stream, as OpenAI sends them: its id, type and name (with empty
    /// arguments) first, then its arguments.
    fn tool_call_chunks(&self, index: u32, c: &ToolCall) -> [String; 2] {
        let chunk = |calls: Value| {
            let delta = ChunkDelta { role: None, content: None, tool_calls: Some(json!([calls])) };
            let choice = ChunkChoice { index, delta, logprobs: None, finish_reason: None };
            serde_json::to_string(&self.envelope("chat.completion.chunk", vec![choice], None))
                .expect("chunks always serialize")
        };
        [
            chunk(json!({"index": c.index, "id": c.id, "type": "function",
                         "function": {"name": c.name, "arguments": ""}})),
            chunk(json!({"index": c.index, "function": {"arguments": c.arguments}})),
        ]
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
    /// Choices in the request (prompts times samples), and the counts of those that have ended.
    choices: u32,
    ended: Vec<Counts>,
    /// Completions' `text_offset` so far, per choice.
    offsets: Vec<u32>,
    /// Per choice: its prompt was echoed (with its logprobs, those of a request with echo and logprobs come with
    /// its first delta, or its final).
    echoed: Vec<bool>,
}

pub const DONE: &str = "[DONE]";

impl Chunks {
    pub fn new(reply: Reply, include_usage: bool, choices: u32) -> Self {
        let choices = choices.max(1);
        let (offsets, echoed) = (vec![0; choices as usize], vec![false; choices as usize]);
        Chunks { reply, include_usage, choices, ended: Vec::new(), offsets, echoed }
    }

    /// What the stream starts with, before any token: chat announces the assistant's role for each choice, as
    /// OpenAI does; completions with `echo` send each choice's prompt (with its logprobs, once they come).
    pub fn opening(&self) -> Vec<String> {
        match self.reply.endpoint {
            Endpoint::Completions if self.reply.echo.is_empty() || self.reply.echoes_prompt_logprobs() => Vec::new(),
            Endpoint::Completions => {
                (0..self.choices).map(|i| self.reply.chunk(i, Some(self.reply.echo_of(i)), false, None, None)).collect()
            }
            Endpoint::Chat => (0..self.choices).map(|i| self.reply.chunk(i, Some(""), true, None, None)).collect(),
        }
    }

    /// Every choice has had its final: nothing of the request is left running.
    pub fn complete(&self) -> bool {
        self.ended.len() as u32 == self.choices
    }

    /// The payloads one hub reply becomes, and whether the stream ends with them: after the last choice's
    /// final, or at the first failure.
    pub fn on_reply(&mut self, msg: &ServerMsg) -> (Vec<String>, bool) {
        match msg {
            ServerMsg::Delta(d) => {
                let mut out = Vec::new();
                if d.prompt_logprobs.is_some() {
                    out.extend(self.echo(d.index, d.prompt_token_ids.as_deref(), d.prompt_logprobs.as_deref()));
                }
                let logprobs = match (&self.reply.logprobs, &d.logprobs) {
                    (Some(text), Some(lps)) if !d.token_ids.is_empty() => Some(match self.reply.endpoint {
                        Endpoint::Chat => text.chat(&d.token_ids, lps),
                        Endpoint::Completions => {
                            let offset = self.offsets.get_mut(d.index as usize);
                            let start = offset.as_deref().copied().unwrap_or(0);
                            let (value, end) = text.completion(sampled(&d.token_ids, lps), start);
                            if let Some(offset) = offset {
                                *offset = end;
                            }
                            value
                        }
                    }),
                    _ => None,
                };
                // A token whose text is still held back (half a character, a possible stop string, a call
                // not closed yet) says nothing yet, unless it carries logprobs, which are sent with the token
                // that has them.
                if !d.text.is_empty() || logprobs.is_some() {
                    out.push(self.reply.chunk(d.index, Some(&d.text), false, None, logprobs));
                }
                if self.reply.endpoint == Endpoint::Chat {
                    for call in d.tool_calls.iter().flatten() {
                        out.extend(self.reply.tool_call_chunks(d.index, call));
                    }
                }
                (out, false)
            }
            ServerMsg::Final(f) if f.finish_reason == FinishReason::Error => {
                self.ended.push(Counts::from(f));
                (self.error(&failure(f)), true)
            }
            ServerMsg::Final(f) => {
                self.ended.push(Counts::from(f));
                // A choice that ended before its first delta (aborted, or cut by the KV cache) echoes here.
                let mut out: Vec<String> = self
                    .echo(f.index, f.prompt_token_ids.as_deref(), f.prompt_logprobs.as_deref())
                    .into_iter()
                    .collect();
                let last = match self.reply.endpoint {
                    Endpoint::Completions => {
                        self.reply.chunk(f.index, Some(""), false, Some(finish_reason(f.finish_reason)), None)
                    }
                    Endpoint::Chat => self.reply.chunk(f.index, None, false, Some(chat_finish_reason(f)), None),
                };
                out.push(last);
                if !self.complete() {
                    return (out, false);
                }
                if self.include_usage {
                    out.push(self.reply.usage_chunk(Usage::of(&self.ended, self.reply.n)));
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

    /// The chunk echoing choice `index`'s prompt with its logprobs, for a request with echo and logprobs whose
    /// choice has not had it yet (the opening sent the others' echoes); the choice's offsets continue after it.
    fn echo(&mut self, index: u32, ids: Option<&[u32]>, lps: Option<&[Option<TokenLogprobs>]>) -> Option<String> {
        let i = index as usize;
        if !self.reply.echoes_prompt_logprobs() || self.echoed.get(i).is_none_or(|&done| done) {
            return None;
        }
        self.echoed[i] = true;
        let (chunk, end) = self.reply.echo_chunk(index, ids, lps);
        self.offsets[i] = end;
        Some(chunk)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::test_tokenizer::byte_level_tokenizer;
    use proto::api::Delta;

    fn reply(endpoint: Endpoint) -> Reply {
        Reply { endpoint, id: "x-1".into(), model: "m".into(), created: 42, n: 1, echo: Vec::new(), logprobs: None }
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
            logprobs: None,
            prompt_logprobs: None,
            prompt_token_ids: None,
            tool_calls: None,
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
        let three = Reply { n: 3, ..reply(Endpoint::Chat) };
        let body = parse(&three.body(&finals).unwrap());
        let choices = body["choices"].as_array().unwrap();
        let got: Vec<(u64, &str)> =
            choices.iter().map(|c| (c["index"].as_u64().unwrap(), c["message"]["content"].as_str().unwrap())).collect();
        assert_eq!(got, [(0, "a"), (1, "b"), (2, "c")]);
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );
        let body = parse(&Reply { n: 3, ..reply(Endpoint::Completions) }.body(&finals).unwrap());
        assert_eq!(body["choices"][2], json!({"index": 2, "text": "c", "logprobs": null, "finish_reason": "length"}));
        // One failed sample fails the request.
        let failed = Final { index: 1, message: Some("gone".into()), ..final_msg(FinishReason::Error, "") };
        let e = three.body(&[finals[1].clone(), failed]).unwrap_err();
        assert_eq!((e.status, e.message.as_str()), (503, "gone"));
    }

    #[test]
    fn a_batch_of_prompts_counts_each_prompt_once_and_echoes_each() {
        // Two prompts of 5 and 7 tokens, two samples each: choices 0, 1 are of the first, 2, 3 of the second.
        let of = |index, prompt_tokens, cached_tokens, text: &str| Final {
            index,
            prompt_tokens,
            cached_tokens,
            completion_tokens: 1,
            ..final_msg(FinishReason::Length, text)
        };
        let finals = [of(3, 7, 16, "d"), of(0, 5, 0, "a"), of(2, 7, 0, "c"), of(1, 5, 16, "b")];
        let r = Reply { n: 2, echo: vec!["P:".into(), "Q:".into()], ..reply(Endpoint::Completions) };
        let body = parse(&r.body(&finals).unwrap());
        let texts: Vec<&str> =
            body["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
        assert_eq!(texts, ["P:a", "P:b", "Q:c", "Q:d"]);
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16,
                   "prompt_tokens_details": {"cached_tokens": 0}})
        );
        // Streamed: each choice opens with its prompt.
        let chunks = Chunks::new(r, false, 4);
        let opening: Vec<Value> = chunks.opening().iter().map(|s| parse(s)).collect();
        let echoed: Vec<(u64, &str)> = opening
            .iter()
            .map(|c| (c["choices"][0]["index"].as_u64().unwrap(), c["choices"][0]["text"].as_str().unwrap()))
            .collect();
        assert_eq!(echoed, [(0, "P:"), (1, "P:"), (2, "Q:"), (3, "Q:")]);
    }

    fn logprob_reply(endpoint: Endpoint, tokens_as_ids: bool) -> Reply {
        let table = Arc::new(TokenTable::new(&byte_level_tokenizer()));
        Reply { logprobs: Some(LogprobText { table, tokens_as_ids }), ..reply(endpoint) }
    }

    fn lps() -> Vec<TokenLogprobs> {
        vec![
            TokenLogprobs { logprob: -0.5, top: vec![(b'h' as u32, -0.5), (b'i' as u32, -1.5)] },
            TokenLogprobs { logprob: -0.25, top: vec![(0xE4, -0.25), (b'i' as u32, -2.0)] },
        ]
    }

    #[test]
    fn chat_logprobs_have_openais_shape() {
        let f =
            Final { token_ids: vec![b'h' as u32, 0xE4], logprobs: Some(lps()), ..final_msg(FinishReason::Length, "h") };
        let body = parse(&logprob_reply(Endpoint::Chat, false).body(std::slice::from_ref(&f)).unwrap());
        assert_eq!(
            body["choices"][0]["logprobs"],
            json!({"content": [
                {"token": "h", "logprob": -0.5, "bytes": [104], "top_logprobs": [
                    {"token": "h", "logprob": -0.5, "bytes": [104]}, {"token": "i", "logprob": -1.5, "bytes": [105]}]},
                {"token": "\u{FFFD}", "logprob": -0.25, "bytes": [228], "top_logprobs": [
                    {"token": "\u{FFFD}", "logprob": -0.25, "bytes": [228]}, {"token": "i", "logprob": -2.0, "bytes": [105]}]},
            ], "refusal": null})
        );
        let body = parse(&logprob_reply(Endpoint::Chat, true).body(&[f]).unwrap());
        let first = &body["choices"][0]["logprobs"]["content"][0];
        assert_eq!(
            (first["token"].as_str(), first["top_logprobs"][1]["token"].as_str()),
            (Some("token_id:104"), Some("token_id:105"))
        );
        assert_eq!(first["bytes"], json!([104]), "the bytes stay the token's");
    }

    #[test]
    fn completion_logprobs_have_openais_shape_and_offsets_run_on_in_a_stream() {
        let ids = vec![b'h' as u32, 0xE4];
        let f = Final { token_ids: ids.clone(), logprobs: Some(lps()), ..final_msg(FinishReason::Length, "h") };
        let body = parse(&logprob_reply(Endpoint::Completions, false).body(&[f]).unwrap());
        assert_eq!(
            body["choices"][0]["logprobs"],
            json!({"tokens": ["h", "\u{FFFD}"], "token_logprobs": [-0.5, -0.25],
                   "top_logprobs": [{"h": -0.5, "i": -1.5}, {"\u{FFFD}": -0.25, "i": -2.0}], "text_offset": [0, 1]})
        );
        let mut chunks = Chunks::new(logprob_reply(Endpoint::Completions, false), false, 1);
        let lps = lps();
        let delta = |i: usize, text: &str| {
            ServerMsg::Delta(Delta {
                rid: "x-1".into(),
                index: 0,
                token_ids: vec![ids[i]],
                text: text.into(),
                logprobs: Some(vec![lps[i].clone()]),
                prompt_logprobs: None,
                prompt_token_ids: None,
                tool_calls: None,
            })
        };
        let (first, _) = chunks.on_reply(&delta(0, "h"));
        let (second, _) = chunks.on_reply(&delta(1, ""));
        assert_eq!(parse(&first[0])["choices"][0]["logprobs"]["text_offset"], json!([0]));
        let second = parse(&second[0]);
        assert_eq!(second["choices"][0]["text"], "", "held-back text, but its token's logprobs go out");
        assert_eq!(second["choices"][0]["logprobs"]["text_offset"], json!([1]));
        assert_eq!(second["choices"][0]["logprobs"]["token_logprobs"], json!([-0.25]));
    }

    /// An echoed prompt "ab" of two tokens, the first without logprobs, then one generated token "h".
    fn echoed() -> (Reply, Final) {
        let reply = Reply { echo: vec!["ab".into()], ..logprob_reply(Endpoint::Completions, false) };
        let prompt = Some(vec![None, Some(TokenLogprobs { logprob: -3.0, top: vec![(b'c' as u32, -0.5)] })]);
        let f = Final {
            token_ids: vec![b'h' as u32],
            logprobs: Some(lps()[..1].to_vec()),
            prompt_logprobs: prompt,
            prompt_token_ids: Some(vec![b'a' as u32, b'b' as u32]),
            ..final_msg(FinishReason::Length, "h")
        };
        (reply, f)
    }

    #[test]
    fn echoed_prompt_tokens_come_first_the_first_with_null_logprobs() {
        let (reply, f) = echoed();
        let body = parse(&reply.body(std::slice::from_ref(&f)).unwrap());
        assert_eq!(body["choices"][0]["text"], "abh");
        assert_eq!(
            body["choices"][0]["logprobs"],
            json!({"tokens": ["a", "b", "h"], "token_logprobs": [null, -3.0, -0.5],
                   "top_logprobs": [null, {"c": -0.5}, {"h": -0.5, "i": -1.5}], "text_offset": [0, 1, 2]})
        );
        // Streamed: no echo up front; the first delta brings it, with the prompt's logprobs, then its token.
        let mut chunks = Chunks::new(reply, false, 1);
        assert!(chunks.opening().is_empty());
        let first = ServerMsg::Delta(Delta {
            rid: "x-1".into(),
            index: 0,
            token_ids: f.token_ids.clone(),
            text: "h".into(),
            logprobs: f.logprobs.clone(),
            prompt_logprobs: f.prompt_logprobs.clone(),
            prompt_token_ids: f.prompt_token_ids.clone(),
            tool_calls: None,
        });
        let (out, _) = chunks.on_reply(&first);
        let out: Vec<Value> = out.iter().map(|c| parse(c)).collect();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["choices"][0]["text"], "ab");
        assert_eq!(out[0]["choices"][0]["logprobs"]["token_logprobs"], json!([null, -3.0]));
        assert_eq!(out[1]["choices"][0]["logprobs"]["text_offset"], json!([2]), "offsets run on after the prompt");
        // The final echoes nothing again.
        let (out, done) = chunks.on_reply(&ServerMsg::Final(f));
        assert!(done && out.len() == 2 && !out[0].contains("\"ab\""), "{out:?}");
    }

    #[test]
    fn a_choice_that_ends_before_any_delta_echoes_with_its_final_and_prompt_only_drops_the_completion() {
        let (reply, f) = echoed();
        let mut msg = ServerMsg::Final(f);
        leave_out_completion(&mut msg);
        let ServerMsg::Final(f) = &msg else { unreachable!() };
        assert_eq!((f.token_ids.len(), f.completion_tokens, f.text.as_str()), (0, 0, ""));
        let body = parse(&reply.body(std::slice::from_ref(f)).unwrap());
        assert_eq!(body["choices"][0]["text"], "ab");
        assert_eq!(body["choices"][0]["logprobs"]["tokens"], json!(["a", "b"]));
        assert_eq!(body["usage"]["completion_tokens"], 0);
        let mut chunks = Chunks::new(reply, false, 1);
        let (out, done) = chunks.on_reply(&msg);
        assert!(done);
        assert_eq!(parse(&out[0])["choices"][0]["text"], "ab");
        assert_eq!(parse(&out[0])["choices"][0]["logprobs"]["top_logprobs"], json!([null, {"c": -0.5}]));
        assert_eq!(parse(&out[1])["choices"][0]["finish_reason"], "length");
    }

    fn delta_of(index: u32, text: &str) -> ServerMsg {
        ServerMsg::Delta(Delta {
            rid: "x-1".into(),
            index,
            token_ids: vec![1],
            text: text.into(),
            logprobs: None,
            prompt_logprobs: None,
            prompt_token_ids: None,
            tool_calls: None,
        })
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
        let msgs = [
            delta_of(0, "He"),
            delta_of(0, ""),
            delta_of(0, "llo"),
            ServerMsg::Final(final_msg(FinishReason::Stop, "Hello")),
        ];
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
    fn a_chat_stream_carries_each_tokens_logprobs_in_its_chunk() {
        let mut chunks = Chunks::new(logprob_reply(Endpoint::Chat, false), false, 1);
        let lp = lps().remove(0);
        let delta = ServerMsg::Delta(Delta {
            rid: "x-1".into(),
            index: 0,
            token_ids: vec![b'h' as u32],
            text: "h".into(),
            logprobs: Some(vec![lp]),
            prompt_logprobs: None,
            prompt_token_ids: None,
            tool_calls: None,
        });
        let (out, _) = chunks.on_reply(&delta);
        let chunk = parse(&out[0]);
        assert_eq!(chunk["choices"][0]["delta"]["content"], "h");
        assert_eq!(chunk["choices"][0]["logprobs"]["content"][0]["logprob"], -0.5);
        assert_eq!(chunk["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["token"], "i");
    }

    fn weather_call(index: u32) -> ToolCall {
        ToolCall {
            index,
            id: format!("call_{index}"),
            name: "get_weather".into(),
            arguments: r#"{"city":"Oslo"}"#.into(),
        }
    }

    #[test]
    fn tool_calls_become_the_messages_calls_and_finish_the_choice_with_tool_calls() {
        let only_calls =
            Final { tool_calls: Some(vec![weather_call(0), weather_call(1)]), ..final_msg(FinishReason::Stop, "") };
        let body = parse(&reply(Endpoint::Chat).body(&[only_calls]).unwrap());
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null, "no text: null content");
        assert_eq!(
            choice["message"]["tool_calls"][1],
            json!({"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}})
        );
        let with_text = Final { tool_calls: Some(vec![weather_call(0)]), ..final_msg(FinishReason::Stop, "Checking.") };
        let body = parse(&reply(Endpoint::Chat).body(&[with_text]).unwrap());
        assert_eq!(body["choices"][0]["message"]["content"], "Checking.");
        let cut = Final { tool_calls: Some(vec![weather_call(0)]), ..final_msg(FinishReason::Length, "") };
        let body = parse(&reply(Endpoint::Chat).body(&[cut]).unwrap());
        assert_eq!(body["choices"][0]["finish_reason"], "length", "cut short: the calls may be incomplete");
        let plain = parse(&reply(Endpoint::Chat).body(&[final_msg(FinishReason::Stop, "")]).unwrap());
        assert_eq!(plain["choices"][0]["message"], json!({"role": "assistant", "content": ""}), "no calls, no key");
    }

    #[test]
    fn a_streamed_call_is_its_name_then_its_arguments() {
        let mut chunks = Chunks::new(reply(Endpoint::Chat), false, 1);
        let delta = ServerMsg::Delta(Delta {
            rid: "x-1".into(),
            index: 0,
            token_ids: vec![1],
            text: "Checking.".into(),
            logprobs: None,
            prompt_logprobs: None,
            prompt_token_ids: None,
            tool_calls: Some(vec![weather_call(0)]),
        });
        let fin = Final { tool_calls: Some(vec![weather_call(0)]), ..final_msg(FinishReason::Stop, "Checking.") };
        let (out, _) = stream(&mut chunks, &[delta, ServerMsg::Final(fin)]);
        let json: Vec<Value> = out[..out.len() - 1].iter().map(|s| parse(s)).collect();
        let deltas: Vec<&Value> = json.iter().map(|c| &c["choices"][0]["delta"]).collect();
        assert_eq!(deltas[1], &json!({"content": "Checking."}));
        assert_eq!(
            deltas[2],
            &json!({"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                     "function": {"name": "get_weather", "arguments": ""}}]})
        );
        assert_eq!(deltas[3], &json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":\"Oslo\"}"}}]}));
        assert_eq!(json[4]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out.last().map(String::as_str), Some(DONE));
    }

    #[test]
    fn a_completion_stream_carries_text_chunks() {
        let mut chunks = Chunks::new(reply(Endpoint::Completions), false, 1);
        let msgs = [delta_of(0, "a"), ServerMsg::Final(final_msg(FinishReason::Length, "a"))];
        let (out, _) = stream(&mut chunks, &msgs);
        assert_eq!(out.len(), 3, "no opening, no usage: {out:?}");
        assert_eq!(parse(&out[0])["choices"][0]["text"], "a");
        assert_eq!(parse(&out[1])["choices"][0]["finish_reason"], "length");
        assert_eq!(out[2], DONE);
    }

    #[test]
    fn a_stream_that_fails_ends_with_an_error_event() {
        let mut chunks = Chunks::new(Reply { n: 2, ..reply(Endpoint::Chat) }, true, 2);
        let failed = Final { message: Some("the worker died".into()), ..final_msg(FinishReason::Error, "") };
        let (out, ended) = chunks.on_reply(&ServerMsg::Final(failed));
        assert!(ended && !chunks.complete(), "one sample's failure ends the stream; the other is still running");
        assert_eq!(parse(&out[0])["error"]["message"], "the worker died");
        assert_eq!(out[1], DONE);
        let lost = chunks.on_lost();
        assert_eq!((parse(&lost[0])["error"]["code"].as_str(), lost[1].as_str()), (Some("engine_unavailable"), DONE));
    }

    #[test]
    fn a_stream_of_n_choices_tags_each_chunk_and_ends_after_the_last_final() {
        let mut chunks = Chunks::new(Reply { n: 2, ..reply(Endpoint::Chat) }, true, 2);
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
