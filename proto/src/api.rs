//! The msgpack messages of docs/protocol.md sections 1 (request socket) and 2 (control socket).
//!
//! Everything is encoded with [`encode`] (maps with named keys, which is what Python clients read). Messages from
//! clients are decoded with [`decode_client`], which tells a malformed frame from an unknown message type and
//! keeps the request id when one could be read, so that every refusal can be answered with an `error` message.
//! [`validate`] then checks the parameter ranges.

pub use crate::step::{MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS};
pub use crate::tool_call::ToolCall;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Encodes any message of this module as a msgpack map with named keys.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Only non-string map keys or a failing writer can make this fail; neither exists in these types.
    rmp_serde::to_vec_named(msg).expect("protocol messages always encode")
}

/// How deeply maps and arrays may nest in a message. The deepest legitimate ones (a JSON schema inside a tool
/// inside a message list) stay well within it; rmp-serde's own limit (1024) lets a 2 kB frame of nested arrays
/// overflow a thread's stack while decoding into a dynamic value, which aborts the whole daemon.
pub const MAX_DEPTH: usize = 64;

/// Decodes a message whose shape the caller trusts (control replies, server messages in tests and clients), with
/// the depth bounded all the same: the worker is another process.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de)
}

// --- request socket: client to scheduler ---------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[allow(
    clippy::large_enum_variant,
    reason = "one message is decoded at a time and moved on; boxing costs an allocation"
)]
pub enum ClientMsg {
    Generate(Generate),
    Abort {
        rid: String,
    },
    Info,
    /// "I am still here": a client with `keepalive` requests sends one every 0.5 s (docs/protocol.md).
    Keepalive,
}

/// A `generate` message with every default filled in. Exactly one of `text`, `messages`, `input_ids` should be
/// set; [`validate`] checks that, and [`Generate::prompt`] gives the one that is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Generate {
    pub rid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Chat messages: maps with `role`, `content` and whatever other keys the chat template reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_ids: Option<Vec<u32>>,
    pub sampling: Sampling,
    pub stream: bool,
    /// Samples of the prompt, each its own sequence with replies carrying its `index` (0..n). Wide like the
    /// sampling fields, so that 0 or -1 is an `invalid_params` refusal rather than a malformed frame; the upper
    /// bound is the scheduler's (it depends on the batch size). Left off the wire when 1, so that a plain
    /// request's bytes stay what they were before `n` existed.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub n: i64,
    /// OpenAI's tool fields (docs/protocol.md, "Tool calls"): the tools rendered into the chat template and
    /// whether the output is parsed for calls. Left off the wire when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    /// The client sends `keepalive` messages and reads `heartbeat`s: silent for 2 s, its requests are aborted.
    /// Left off the wire when false, so that older requests' bytes stay as they were.
    #[serde(default, skip_serializing_if = "is_false")]
    pub keepalive: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn one() -> i64 {
    1
}

fn is_one(n: &i64) -> bool {
    *n == 1
}

/// The prompt of a `generate`, in whichever form the client gave it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Prompt<'a> {
    Text(&'a str),
    Messages(&'a [Value]),
    InputIds(&'a [u32]),
}

impl Generate {
    /// A request with default sampling and streaming on; set exactly one prompt form on the result.
    pub fn new(rid: impl Into<String>) -> Self {
        Generate {
            rid: rid.into(),
            text: None,
            messages: None,
            input_ids: None,
            sampling: Sampling::default(),
            stream: true,
            n: 1,
            tools: None,
            tool_choice: None,
            parallel_tool_calls: None,
            keepalive: false,
        }
    }

    /// The prompt, when exactly one form is given.
    pub fn prompt(&self) -> Option<Prompt<'_>> {
        match (&self.text, &self.messages, &self.input_ids) {
            (Some(t), None, None) => Some(Prompt::Text(t)),
            (None, Some(m), None) => Some(Prompt::Messages(m)),
            (None, None, Some(ids)) => Some(Prompt::InputIds(ids)),
            _ => None,
        }
    }
}

/// Sampling parameters. Types are wide on purpose (`i64`, `f64`): an out-of-range value is an `invalid_params`
/// refusal from [`validate`], not a decoding failure, and Python floats arrive as f64.
///
/// The options after `ignore_eos` are left off the wire while they are off, so that a request that uses none
/// of them has the bytes it had before they existed (the golden files pin both).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    pub max_tokens: i64,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: i64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// `0 ..= 1`; 0 is off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_p: f64,
    /// OpenAI's, `-2 ..= 2`; 0 is off.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub presence_penalty: f64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub frequency_penalty: f64,
    /// Hugging Face's, `> 0`; 1 is off.
    #[serde(default = "one_f64", skip_serializing_if = "is_one_f64")]
    pub repetition_penalty: f64,
    /// `(token id, bias)` pairs, each id once, biases in `-100 ..= 100`, at most [`MAX_LOGIT_BIAS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logit_bias: Vec<(u32, f64)>,
    /// `None`: no logprobs; `Some(k)`: each token's logprob and the `k` (`0 ..= 20`) most likely tokens'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<i64>,
    /// vLLM's: `None`, or `Some(k)`: the logprob of every prompt token but the first (which has nothing before
    /// it) and the `k` (`0 ..= 20`) most likely tokens at each of those positions, computed by the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<i64>,
    /// Leave special tokens (`<|im_end|>`, ...) out of the text, as `decode` does by default.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub skip_special_tokens: bool,
    /// EOS and `stop_token_ids` cannot be sampled before this many tokens were generated (`0 ..= max_tokens`).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub min_tokens: i64,
    /// Structured output, at most one of the three: the text is JSON valid against this schema (a map)...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub json_schema: Option<Value>,
    /// ... or matches this regex as a whole ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
    /// ... or is derived by this Lark grammar (llguidance's dialect).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grammar: Option<String>,
}

fn is_zero_i64(x: &i64) -> bool {
    *x == 0
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

fn one_f64() -> f64 {
    1.0
}

fn is_one_f64(x: &f64) -> bool {
    *x == 1.0
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

pub const DEFAULT_MAX_TOKENS: i64 = 128;

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_tokens: DEFAULT_MAX_TOKENS,
            temperature: 1.0,
            top_p: 1.0,
            top_k: -1,
            seed: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            logprobs: None,
            prompt_logprobs: None,
            skip_special_tokens: true,
            min_tokens: 0,
            json_schema: None,
            regex: None,
            grammar: None,
        }
    }
}

/// The error codes of the protocol's table, serialised as their snake_case names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    Malformed,
    UnknownType,
    InvalidParams,
    EmptyPrompt,
    PromptTooLong,
    UnknownRequest,
    DuplicateRequest,
    ShuttingDown,
    /// The waiting queue is full (`--max-waiting`): the request was refused at once; retrying later may work.
    Overloaded,
    /// This client already has `--max-client-requests` live requests.
    TooManyRequests,
}

/// Why a client message was refused, with what the `error` reply needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub rid: Option<String>,
    pub code: ErrorCode,
    pub message: String,
    /// The request field at fault (`top_p`, `logit_bias`, `messages[2].content`), when one is: the HTTP API
    /// names it as OpenAI's `param`. Not on the ZeroMQ wire, whose messages start with the field's name.
    pub param: Option<String>,
}

impl Rejection {
    pub fn new(rid: Option<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        Rejection { rid, code, message: message.into(), param: None }
    }

    /// An `invalid_params` refusal of field `param`.
    pub fn invalid(rid: Option<String>, param: impl Into<String>, message: impl Into<String>) -> Self {
        Rejection { param: Some(param.into()), ..Rejection::new(rid, ErrorCode::InvalidParams, message) }
    }

    /// The `error` message that answers this refusal.
    pub fn to_msg(&self) -> ServerMsg {
        ServerMsg::Error(ErrorMsg { rid: self.rid.clone(), code: self.code, message: self.message.clone() })
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

impl std::error::Error for Rejection {}

/// What arrives on the wire: every key optional and nil meaning absent, so that defaults apply whether a client
/// leaves a key out or sends it as None.
#[derive(Deserialize)]
struct WireGenerate {
    rid: String,
    text: Option<String>,
    messages: Option<Vec<serde_json::Map<String, Value>>>,
    input_ids: Option<Vec<u32>>,
    sampling: Option<WireSampling>,
    stream: Option<bool>,
    n: Option<i64>,
    tools: Option<Vec<Value>>,
    tool_choice: Option<Value>,
    parallel_tool_calls: Option<bool>,
    keepalive: Option<bool>,
}

#[derive(Deserialize)]
struct WireSampling {
    max_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    stop_token_ids: Option<Vec<u32>>,
    ignore_eos: Option<bool>,
    min_p: Option<f64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    repetition_penalty: Option<f64>,
    logit_bias: Option<Vec<(u32, f64)>>,
    logprobs: Option<i64>,
    prompt_logprobs: Option<i64>,
    skip_special_tokens: Option<bool>,
    min_tokens: Option<i64>,
    json_schema: Option<Value>,
    regex: Option<String>,
    grammar: Option<String>,
}

impl From<WireSampling> for Sampling {
    fn from(w: WireSampling) -> Self {
        let d = Sampling::default();
        Sampling {
            max_tokens: w.max_tokens.unwrap_or(d.max_tokens),
            temperature: w.temperature.unwrap_or(d.temperature),
            top_p: w.top_p.unwrap_or(d.top_p),
            top_k: w.top_k.unwrap_or(d.top_k),
            seed: w.seed,
            stop: w.stop.unwrap_or_default(),
            stop_token_ids: w.stop_token_ids.unwrap_or_default(),
            ignore_eos: w.ignore_eos.unwrap_or(d.ignore_eos),
            min_p: w.min_p.unwrap_or(d.min_p),
            presence_penalty: w.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: w.frequency_penalty.unwrap_or(d.frequency_penalty),
            repetition_penalty: w.repetition_penalty.unwrap_or(d.repetition_penalty),
            logit_bias: w.logit_bias.unwrap_or_default(),
            logprobs: w.logprobs,
            prompt_logprobs: w.prompt_logprobs,
            skip_special_tokens: w.skip_special_tokens.unwrap_or(d.skip_special_tokens),
            min_tokens: w.min_tokens.unwrap_or(d.min_tokens),
            json_schema: w.json_schema.filter(|v| !v.is_null()),
            regex: w.regex,
            grammar: w.grammar,
        }
    }
}

#[derive(Deserialize)]
struct WireAbort {
    rid: String,
}

/// Decodes one client frame. Anything that is not a msgpack map of the right shape is `malformed`; a well-formed
/// map whose `type` is a string naming no message is `unknown_type`. The rejection carries the `rid` whenever the
/// map had a string one. Parameter ranges are not checked here: see [`validate`].
pub fn decode_client(bytes: &[u8]) -> Result<ClientMsg, Rejection> {
    let malformed = |rid: Option<String>, m: String| Rejection::new(rid, ErrorCode::Malformed, m);
    // A first pass through a dynamic value reads the rid and type even when the rest is wrong. It cannot be the
    // only pass: a dynamic value turns NaN and infinities into nil, which would then read as "use the default".
    let value: Value = decode(bytes).map_err(|e| malformed(None, format!("not a msgpack map: {e}")))?;
    let Value::Object(map) = &value else {
        return Err(malformed(None, "the message is not a map".into()));
    };
    let rid = map.get("rid").and_then(Value::as_str).map(str::to_owned);
    let ty = match map.get("type") {
        Some(Value::String(t)) => t.as_str(),
        Some(_) => return Err(malformed(rid, "`type` is not a string".into())),
        None => return Err(malformed(rid, "no `type` key".into())),
    };
    let shape = |e: rmp_serde::decode::Error| malformed(rid.clone(), format!("{ty}: {e}"));
    match ty {
        "generate" => {
            // The typed pass below would also take an array as a struct; only a map (or nil) is a sampling map.
            if !matches!(map.get("sampling"), None | Some(Value::Null | Value::Object(_))) {
                return Err(malformed(rid, "generate: `sampling` is not a map".into()));
            }
            let w: WireGenerate = decode(bytes).map_err(shape)?;
            Ok(ClientMsg::Generate(Generate {
                rid: w.rid,
                text: w.text,
                messages: w.messages.map(|ms| ms.into_iter().map(Value::Object).collect()),
                input_ids: w.input_ids,
                sampling: w.sampling.map(Sampling::from).unwrap_or_default(),
                stream: w.stream.unwrap_or(true),
                n: w.n.unwrap_or(1),
                tools: w.tools,
                tool_choice: w.tool_choice,
                parallel_tool_calls: w.parallel_tool_calls,
                keepalive: w.keepalive.unwrap_or(false),
            }))
        }
        "abort" => {
            let w: WireAbort = decode(bytes).map_err(shape)?;
            Ok(ClientMsg::Abort { rid: w.rid })
        }
        "info" => Ok(ClientMsg::Info),
        "keepalive" => Ok(ClientMsg::Keepalive),
        other => Err(Rejection::new(rid, ErrorCode::UnknownType, format!("unknown message type {other:?}"))),
    }
}

/// The most stop strings a request may give: each is searched for after every token.
pub const MAX_STOP_STRINGS: usize = 16;
/// The longest stop string, in characters: the detokenizer holds back up to this much text.
pub const MAX_STOP_CHARS: usize = 256;

/// Checks the ranges of a decoded `generate` (docs/protocol.md, `sampling`), and that exactly one prompt form is
/// given: the one place both doors' sampling parameters are checked. Token ids against the vocabulary and the
/// prompt against the context are the scheduler's to check. Each refusal names its field.
pub fn validate(g: &Generate) -> Result<(), Rejection> {
    let bad = |param: &str, m: String| Err(Rejection::invalid(Some(g.rid.clone()), param, m));
    let forms = [g.text.is_some(), g.messages.is_some(), g.input_ids.is_some()].iter().filter(|x| **x).count();
    if forms != 1 {
        let m = format!("give exactly one of text, messages, input_ids ({forms} given)");
        return Err(Rejection::new(Some(g.rid.clone()), ErrorCode::InvalidParams, m));
    }
    if g.n < 1 {
        return bad("n", format!("n must be >= 1, got {}", g.n));
    }
    let s = &g.sampling;
    if s.max_tokens <= 0 {
        return bad("max_tokens", format!("max_tokens must be > 0, got {}", s.max_tokens));
    }
    if !(s.temperature.is_finite() && s.temperature >= 0.0) {
        return bad("temperature", format!("temperature must be finite and >= 0, got {}", s.temperature));
    }
    // Written so that NaN fails too.
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return bad("top_p", format!("top_p must be in (0, 1], got {}", s.top_p));
    }
    if s.top_k < -1 {
        return bad("top_k", format!("top_k must be -1, 0 or > 0, got {}", s.top_k));
    }
    if s.stop.len() > MAX_STOP_STRINGS {
        return bad("stop", format!("stop may have at most {MAX_STOP_STRINGS} strings, got {}", s.stop.len()));
    }
    if s.stop.iter().any(String::is_empty) {
        return bad("stop", "stop strings must not be empty".into());
    }
    if let Some(long) = s.stop.iter().map(|t| t.chars().count()).find(|&n| n > MAX_STOP_CHARS) {
        return bad("stop", format!("stop strings may have at most {MAX_STOP_CHARS} characters, got one of {long}"));
    }
    if !(0.0..=1.0).contains(&s.min_p) {
        return bad("min_p", format!("min_p must be in [0, 1], got {}", s.min_p));
    }
    for (name, p) in [("presence_penalty", s.presence_penalty), ("frequency_penalty", s.frequency_penalty)] {
        if !(-2.0..=2.0).contains(&p) {
            return bad(name, format!("{name} must be in [-2, 2], got {p}"));
        }
    }
    if !(s.repetition_penalty.is_finite() && s.repetition_penalty > 0.0) {
        return bad(
            "repetition_penalty",
            format!("repetition_penalty must be finite and > 0, got {}", s.repetition_penalty),
        );
    }
    if s.logit_bias.len() > MAX_LOGIT_BIAS {
        let m = format!("logit_bias may have at most {MAX_LOGIT_BIAS} entries, got {}", s.logit_bias.len());
        return bad("logit_bias", m);
    }
    for (i, &(id, bias)) in s.logit_bias.iter().enumerate() {
        if !(-100.0..=100.0).contains(&bias) {
            return bad("logit_bias", format!("logit_bias values must be in [-100, 100], got {bias} for token {id}"));
        }
        if s.logit_bias[..i].iter().any(|&(other, _)| other == id) {
            return bad("logit_bias", format!("logit_bias names token {id} twice"));
        }
    }
    if let Some(k) = s.logprobs.filter(|&k| !(0..=MAX_TOP_LOGPROBS as i64).contains(&k)) {
        return bad("logprobs", format!("logprobs must be in [0, {MAX_TOP_LOGPROBS}] top tokens, got {k}"));
    }
    if let Some(k) = s.prompt_logprobs.filter(|&k| !(0..=MAX_TOP_LOGPROBS as i64).contains(&k)) {
        let message = format!("prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}] top tokens, got {k}");
        return bad("prompt_logprobs", message);
    }
    if !(0..=s.max_tokens).contains(&s.min_tokens) {
        return bad("min_tokens", format!("min_tokens must be in [0, max_tokens], got {}", s.min_tokens));
    }
    let constraints =
        [("json_schema", s.json_schema.is_some()), ("regex", s.regex.is_some()), ("grammar", s.grammar.is_some())];
    let given: Vec<&str> = constraints.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect();
    if given.len() > 1 {
        return bad(given[1], format!("give at most one of json_schema, regex, grammar ({} given)", given.join(", ")));
    }
    Ok(())
}

// --- request socket: scheduler to client ---------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    Delta(Delta),
    Final(Final),
    Error(ErrorMsg),
    Info(InfoMsg),
}

/// Scheduler to client, about no request: `heartbeat`, every 0.5 s to a client with live `keepalive` requests,
/// so that it learns within 2 s that the scheduler is gone. A separate type from [`ServerMsg`], which carries
/// the replies of requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Notice {
    Heartbeat,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    pub rid: String,
    /// Which of the request's `n` samples this is (0 when n is 1). A reply without it (an older scheduler) is
    /// sample 0.
    #[serde(default)]
    pub index: u32,
    pub token_ids: Vec<u32>,
    pub text: String,
    /// One entry per id of `token_ids`, when the request asked for logprobs; left off the wire otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// When the request asked for `prompt_logprobs`, the sample's first delta carries them: one entry per prompt
    /// token, nil for the first. Left off the wire otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    /// The prompt's ids, beside `prompt_logprobs` (and only with them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// The tool calls that ended with this delta's text (whole calls: a call is known once it closes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A sampled token's logprob, and the most likely tokens at its position with theirs (most likely first, as
/// many as the request asked for). Logprobs are the model's own: `log_softmax` of the raw logits, before bias,
/// penalties and temperature.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// Why a request ended (the scheduler's core decides it, and it goes out as it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS id (unless `ignore_eos`), one of `stop_token_ids` or a stop string.
    Stop,
    /// `max_tokens` were generated, or the context length was reached.
    Length,
    /// The engine ended it: the client aborted it or went away. The core never decides this itself.
    Abort,
    /// The worker failed the step, or returned something that is not a token.
    Error,
    /// The KV cache cannot hold the request even with every other request preempted (or, waiting, with every
    /// page free).
    Memory,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Final {
    pub rid: String,
    /// Which sample ended (see [`Delta::index`]); a request of `n` samples gets `n` finals.
    #[serde(default)]
    pub index: u32,
    pub finish_reason: FinishReason,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// Of `prompt_tokens`, those whose KV came from the prefix cache instead of a prefill. Older schedulers
    /// did not send it: absent reads as 0.
    #[serde(default)]
    pub cached_tokens: u32,
    pub token_ids: Vec<u32>,
    pub text: String,
    /// Why, when `finish_reason` is `error`; nil otherwise.
    pub message: Option<String>,
    /// One entry per id of `token_ids`, when the request asked for logprobs; left off the wire otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Vec<TokenLogprobs>>,
    /// One entry per prompt token, nil for the first, when the request asked for `prompt_logprobs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_logprobs: Option<Vec<Option<TokenLogprobs>>>,
    /// The prompt's ids, beside `prompt_logprobs` (and only with them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// The sample's tool calls, when its request offered tools and the model called some; `text` is then the
    /// content outside the calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub rid: Option<String>,
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoMsg {
    pub model: String,
    pub vocab_size: u32,
    pub max_seq_len: u32,
    pub max_batch: u32,
    pub page_size: u32,
    pub num_pages: u32,
    pub eos_token_ids: Vec<u32>,
    /// Requests admitted and not yet finished, from every client (ZeroMQ and HTTP): what a client checks to
    /// see that nothing it started is still running.
    pub live_requests: u32,
}

// --- control socket ------------------------------------------------------------------------------------------

/// Worker to scheduler.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum WorkerMsg {
    /// Before its hello, what the worker is busy with ("loading weights", "capturing CUDA graphs"); the
    /// scheduler answers `ok` and reports it as the reason it is not serving yet.
    Status {
        phase: String,
    },
    Hello(Hello),
    Ready,
}

/// Scheduler to worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SchedulerMsg {
    Welcome(Welcome),
    Ok,
    Error { message: String },
}

/// What the worker allocated: it accepts steps of at most `max_batch` requests and `max_tokens` tokens, and its
/// KV cache has `num_pages` pages of `page_size` tokens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub pid: u32,
    pub model: ModelFacts,
    pub num_pages: u32,
    pub page_size: u32,
    pub max_batch: u32,
    pub max_tokens: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFacts {
    pub architecture: String,
    pub vocab_size: u32,
    pub num_layers: u32,
    pub hidden_size: u32,
    pub num_heads: u32,
    pub num_kv_heads: u32,
    pub head_dim: u32,
    pub max_position_embeddings: u32,
    pub dtype: String,
    pub device: String,
}

/// The `/dev/shm` names of the two rings, and the scheduler's pid.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub step_ring: String,
    pub result_ring: String,
    pub pid: u32,
}
