//! `POST /v1/chat/completions`: the request, as OpenAI defines it plus vLLM's sampling extensions.

use super::common::{self, Int, completion_request, parse_body, refuse_unless};
use super::{ApiError, Parsed, tools};
use crate::server::messages;
use proto::api::{Generate, MAX_TOP_LOGPROBS};
use serde_json::{Map, Value};

completion_request! {
    /// A chat completion request. Fields past `top_logprobs` are OpenAI's that the server does not do: each is
    /// refused unless absent or off, and those with no effect on the result are accepted and ignored.
    pub struct ChatRequest {
        pub messages: Vec<Value>,
        /// The newer name of `max_tokens`; wins when both are given.
        pub max_completion_tokens: Option<Int>,
        pub logprobs: Option<bool>,
        pub top_logprobs: Option<Int>,
        pub tools: Option<Vec<tools::Tool>>,
        pub tool_choice: Option<tools::ToolChoice>,
        pub parallel_tool_calls: Option<bool>,
        pub functions: Option<Vec<Value>>,
        pub function_call: Option<Value>,
        pub modalities: Option<Vec<String>>,
        pub audio: Option<Value>,
        pub prediction: Option<Value>,
        pub reasoning_effort: Option<String>,
        pub verbosity: Option<String>,
        pub web_search_options: Option<Value>,
        /// Accepted and ignored: they label, store or route a request on OpenAI's side, and change nothing in
        /// its result (the prefix cache needs no key).
        #[allow(dead_code, reason = "accepted, and has no effect")]
        pub metadata: Option<Map<String, Value>>,
        #[allow(dead_code, reason = "accepted, and has no effect")]
        pub store: Option<bool>,
        #[allow(dead_code, reason = "accepted, and has no effect")]
        pub service_tier: Option<String>,
        #[allow(dead_code, reason = "accepted, and has no effect")]
        pub safety_identifier: Option<String>,
        #[allow(dead_code, reason = "accepted, and has no effect")]
        pub prompt_cache_key: Option<String>,
        /// SGLang's, sent by sglang-router on every request with its default: refused unless false.
        pub continue_final_message: Option<bool>,
        /// SGLang's, sent by sglang-router (both true): accepted and ignored, as SGLang ignores them without a
        /// reasoning parser (we have none), so any reasoning stays in `content`.
        #[allow(dead_code, reason = "accepted, and has no effect")]
        pub separate_reasoning: Option<bool>,
        #[allow(dead_code, reason = "accepted, and has no effect")]
        pub stream_reasoning: Option<bool>,
    }
}

/// Reads a `/v1/chat/completions` body into a request named `rid`; `max_seq_len` is the context length, the
/// default for `max_tokens` (the core stops at the context's end).
pub fn parse_chat(body: &[u8], rid: &str, max_seq_len: u32) -> Result<Parsed, ApiError> {
    let r: ChatRequest = parse_body(body)?;
    refuse_unsupported(&r)?;
    let messages = messages::normalize(&r.messages).map_err(|e| ApiError::invalid(e.param, e.message))?;
    tools::plan(r.tools.as_deref(), r.tool_choice.as_ref(), r.parallel_tool_calls)?;
    let max_tokens = r.max_completion_tokens.or(r.shared().max_tokens).map_or(i64::from(max_seq_len), |Int(m)| m);
    let mut common = r.shared().read(max_tokens)?;
    let asked = r.logprobs.unwrap_or(false);
    let top = r.top_logprobs.map(|Int(k)| k);
    if let Some(k) = top {
        if !asked && k != 0 {
            return Err(ApiError::invalid("top_logprobs", "top_logprobs needs logprobs: true"));
        }
        if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) {
            return Err(ApiError::invalid("top_logprobs", format!("top_logprobs must be in [0, 20], got {k}")));
        }
    }
    common.sampling.logprobs = asked.then_some(top.unwrap_or(0));
    let mut generate = Generate::new(rid);
    generate.messages = Some(messages);
    generate.sampling = common.sampling;
    generate.n = common.n;
    generate.stream = common.stream;
    tools::apply(&mut generate, r.tools.as_deref(), r.tool_choice.as_ref(), r.parallel_tool_calls);
    let requests = vec![generate];
    common::check(&requests)?;
    Ok(Parsed {
        n: requests[0].n as u32,
        requests,
        stream: common.stream,
        include_usage: common.include_usage,
        echo: false,
        prompt_only: false,
        logprobs: asked,
        tokens_as_ids: common.tokens_as_ids,
    })
}

fn refuse_unsupported(r: &ChatRequest) -> Result<(), ApiError> {
    const FUNCTIONS: &str = "deprecated by OpenAI; use tools and tool_choice";
    refuse_unless(r.functions.as_ref().is_none_or(Vec::is_empty), "functions", FUNCTIONS)?;
    let no_call = r.function_call.as_ref().is_none_or(|c| c == "none" || c == "auto");
    refuse_unless(no_call, "function_call", FUNCTIONS)?;
    let text_only = r.modalities.as_ref().is_none_or(|m| m.iter().all(|x| x == "text"));
    refuse_unless(text_only, "modalities", "only text is generated")?;
    refuse_unless(r.audio.is_none(), "audio", "only text is generated")?;
    refuse_unless(r.prediction.is_none(), "prediction", "predicted outputs are not used")?;
    refuse_unless(r.reasoning_effort.is_none(), "reasoning_effort", "the served model has no reasoning effort")?;
    refuse_unless(r.verbosity.is_none(), "verbosity", "the served model has no verbosity setting")?;
    refuse_unless(r.web_search_options.is_none(), "web_search_options", "the server does not search the web")?;
    let why = "the last message always ends and the assistant's turn starts after it";
    refuse_unless(r.continue_final_message != Some(true), "continue_final_message", why)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Value) -> Result<Parsed, ApiError> {
        parse_chat(body.to_string().as_bytes(), "chatcmpl-1", 4096)
    }

    fn user(body: Value) -> Value {
        let mut body = body;
        body["messages"] = json!([{"role": "user", "content": "x"}]);
        body
    }

    fn refusal(body: Value) -> (u16, &'static str, String) {
        let e = chat(body).expect_err("refused");
        (e.status, e.code, e.param.unwrap_or_default())
    }

    #[test]
    fn every_supported_field_reaches_the_generate() {
        let p = chat(json!({
            "model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
            "max_completion_tokens": 9, "max_tokens": 3, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "min_p": 0.1,
            "presence_penalty": 0.5, "frequency_penalty": -0.5, "repetition_penalty": 1.1,
            "logit_bias": {"7": 2, "9": -100}, "seed": 3, "stop": ["a"], "stop_token_ids": [1], "ignore_eos": true,
            "min_tokens": 0, "skip_special_tokens": false, "n": 2, "stream": true,
            "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 5,
            "return_tokens_as_token_ids": true, "user": "u", "metadata": {"k": "v"}, "store": false,
            "service_tier": "auto", "safety_identifier": "s", "prompt_cache_key": "p", "tools": [], "tool_choice": "none",
            "parallel_tool_calls": true, "response_format": {"type": "text"}, "modalities": ["text"],
        }))
        .unwrap();
        let [g] = &p.requests[..] else { panic!() };
        let s = &g.sampling;
        assert_eq!(g.messages.as_ref().unwrap()[1], json!({"role": "user", "content": "Hi there"}));
        assert_eq!(s.max_tokens, 9, "max_completion_tokens wins");
        assert_eq!((s.temperature, s.top_p, s.top_k, s.min_p), (0.5, 0.9, 4, 0.1));
        assert_eq!((s.presence_penalty, s.frequency_penalty, s.repetition_penalty), (0.5, -0.5, 1.1));
        assert_eq!(s.logit_bias, vec![(7, 2.0), (9, -100.0)]);
        assert_eq!(
            (s.seed, s.stop.clone(), s.stop_token_ids.clone(), s.ignore_eos),
            (Some(3), vec!["a".into()], vec![1], true)
        );
        assert_eq!((s.logprobs, s.skip_special_tokens), (Some(5), false));
        assert_eq!((g.n, p.n, g.stream, p.stream, p.include_usage), (2, 2, true, true, true));
        assert!(p.logprobs && p.tokens_as_ids && !p.echo);
    }

    #[test]
    fn tools_reach_the_generate_checked() {
        let tool =
            json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object", "z": 1, "a": 2}}});
        let p = chat(user(json!({"tools": [tool], "tool_choice": "none", "parallel_tool_calls": false}))).unwrap();
        let g = &p.requests[0];
        assert_eq!(g.tools, Some(vec![tool]), "as given, key order kept");
        assert_eq!((g.tool_choice.clone(), g.parallel_tool_calls), (Some(json!("none")), Some(false)));
        let p = chat(user(json!({"tools": [], "tool_choice": "auto"}))).unwrap();
        assert_eq!(p.requests[0].tools, None, "no tools: nothing to render");
    }

    #[test]
    fn defaults_follow_openai() {
        let p = chat(user(json!({}))).unwrap();
        let s = &p.requests[0].sampling;
        assert_eq!(
            (s.max_tokens, s.temperature, s.logprobs),
            (4096, 1.0, None),
            "as many tokens as the context allows"
        );
        assert!(!p.stream && !p.include_usage && !p.logprobs);
        assert_eq!(chat(user(json!({"max_tokens": 3}))).unwrap().requests[0].sampling.max_tokens, 3);
        assert_eq!(chat(user(json!({"logprobs": true}))).unwrap().requests[0].sampling.logprobs, Some(0));
        assert_eq!(chat(user(json!({"logprobs": false}))).unwrap().requests[0].sampling.logprobs, None);
    }

    #[test]
    fn each_refusal_names_its_param() {
        for (body, code, param) in [
            (json!({"messages": [{"role": "wizard", "content": "x"}]}), "invalid_params", "messages[0].role"),
            (json!({"messages": [{"role": "user"}]}), "invalid_params", "messages[0].content"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
                "invalid_params",
                "messages[0].content[0].type",
            ),
            (json!({"messages": []}), "invalid_params", "messages"),
            (json!({"messages": "hi"}), "invalid_params", "messages"),
            (json!({}), "invalid_params", "messages"),
            (user(json!({"top_logprobs": 2})), "invalid_params", "top_logprobs"),
            (user(json!({"logprobs": true, "top_logprobs": 21})), "invalid_params", "top_logprobs"),
            (user(json!({"logprobs": 1})), "invalid_params", "logprobs"),
            (user(json!({"presence_penalty": 3})), "invalid_params", "presence_penalty"),
            (user(json!({"frequency_penalty": -2.5})), "invalid_params", "frequency_penalty"),
            (user(json!({"repetition_penalty": 0})), "invalid_params", "repetition_penalty"),
            (user(json!({"min_p": 2})), "invalid_params", "min_p"),
            (user(json!({"logit_bias": {"1": 101}})), "invalid_params", "logit_bias"),
            (user(json!({"logit_bias": {"x": 1}})), "invalid_params", "logit_bias"),
            (user(json!({"logit_bias": [1]})), "invalid_params", "logit_bias"),
            (user(json!({"temperature": -1})), "invalid_params", "temperature"),
            (user(json!({"n": 0})), "invalid_params", "n"),
            (user(json!({"stream_options": {"include_usage": true}})), "invalid_params", "stream_options"),
            (user(json!({"min_tokens": 5, "max_tokens": 3})), "invalid_params", "min_tokens"),
            (user(json!({"response_format": {"type": "xml"}})), "invalid_params", "response_format.type"),
            (user(json!({"response_format": {"type": "json_object"}, "regex": "a"})), "invalid_params", "regex"),
            (
                user(json!({"tools": [{"type": "function", "function": {"name": "f"}}, {"type": "function"}]})),
                "invalid_params",
                "tools[1].function",
            ),
            (
                user(json!({"tools": [{"type": "function", "function": {"name": "f", "x": 1}}]})),
                "unknown_parameter",
                "tools[0].function.x",
            ),
            (user(json!({"tool_choice": "required"})), "invalid_params", "tool_choice"),
            (user(json!({"tools": {"a": 1}})), "invalid_params", "tools"),
            (user(json!({"tool_choice": 3})), "invalid_params", "tool_choice"),
            (user(json!({"parallel_tool_calls": "yes"})), "invalid_params", "parallel_tool_calls"),
            (
                user(json!({"tools": [{"type": "function", "function": {"name": "f"}}],
                            "tool_choice": {"type": "function", "function": {"name": "g"}}})),
                "invalid_params",
                "tool_choice.function.name",
            ),
            (user(json!({"functions": [{"name": "f"}]})), "unsupported_parameter", "functions"),
            (user(json!({"modalities": ["text", "audio"]})), "unsupported_parameter", "modalities"),
            (user(json!({"audio": {"voice": "x"}})), "unsupported_parameter", "audio"),
            (user(json!({"prediction": {"type": "content"}})), "unsupported_parameter", "prediction"),
            (user(json!({"reasoning_effort": "low"})), "unsupported_parameter", "reasoning_effort"),
            (user(json!({"verbosity": "low"})), "unsupported_parameter", "verbosity"),
            (user(json!({"web_search_options": {}})), "unsupported_parameter", "web_search_options"),
            (
                user(json!({"stream": true, "stream_options": {"continuous_usage_stats": true}})),
                "unsupported_parameter",
                "stream_options.continuous_usage_stats",
            ),
            (user(json!({"echo": true})), "unknown_parameter", "echo"),
            (user(json!({"best_of": 1})), "unknown_parameter", "best_of"),
            (user(json!({"chat_template_kwargs": {}})), "unknown_parameter", "chat_template_kwargs"),
            (user(json!({"stream_options": {"x": 1}, "stream": true})), "unknown_parameter", "stream_options.x"),
        ] {
            assert_eq!(refusal(body.clone()), (400, code, param.to_string()), "{body}");
        }
    }

    #[test]
    fn refusals_say_why() {
        let e = chat(user(json!({"functions": [{"name": "f"}]}))).unwrap_err();
        assert_eq!(e.message, "functions is not supported: deprecated by OpenAI; use tools and tool_choice");
        let e = chat(json!({"messages": [{"role": "user"}]})).unwrap_err();
        assert_eq!(e.message, "messages[0].content is required (messages[0] is a user message)");
        let e = chat(user(json!({"temperature": "hot"}))).unwrap_err();
        assert_eq!(e.message, "temperature: invalid type: string \"hot\", expected a number");
        let e = chat(user(json!({"presence_penalty": 3}))).unwrap_err();
        assert_eq!(e.message, "presence_penalty must be in [-2, 2], got 3");
    }

    #[test]
    fn sglang_routers_fields_are_taken_at_their_defaults_and_refused_otherwise() {
        // The body sglang-router 0.3.2 forwards for {"model", "messages", "max_tokens": 3}.
        let routed = json!({"messages": [{"role": "user", "content": "hi"}], "model": "m", "logprobs": false,
            "max_completion_tokens": 3, "stream": false, "no_stop_trim": false, "ignore_eos": false,
            "continue_final_message": false, "skip_special_tokens": true, "separate_reasoning": true,
            "stream_reasoning": true, "return_hidden_states": false});
        assert_eq!(chat(routed.clone()).unwrap().requests[0].sampling.max_tokens, 3);
        for field in ["no_stop_trim", "continue_final_message", "return_hidden_states"] {
            let mut body = routed.clone();
            body[field] = json!(true);
            assert_eq!(refusal(body), (400, "unsupported_parameter", field.to_string()));
        }
        let mut body = routed;
        (body["separate_reasoning"], body["stream_reasoning"]) = (json!(false), json!(false));
        assert!(chat(body).is_ok());
    }
}
