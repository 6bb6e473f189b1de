//! `POST /v1/completions`: the request, as OpenAI defines it plus vLLM's sampling extensions. A batch of
//! prompts becomes one hub request per prompt, each of `n` samples; choice `prompt_i * n + sample` of the
//! response is sample `sample` of prompt `prompt_i`.

use super::common::{self, Int, completion_request, parse_body, refuse_unless};
use super::{ApiError, COMPLETIONS_DEFAULT_MAX_TOKENS, Parsed};
use proto::api::Generate;
use serde::Deserialize;

/// The most prompts one request may batch: each is a request of its own in the queue.
pub const MAX_PROMPTS: usize = 1024;

/// `prompt` in any of its four forms.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(
    untagged,
    expecting = "a string, an array of strings, an array of token ids or an array of arrays of token ids"
)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

completion_request! {
    /// A completion request.
    pub struct CompletionRequest {
        pub prompt: PromptInput,
        pub suffix: Option<String>,
        pub echo: Option<bool>,
        /// Top logprobs per token: OpenAI allows 0..=5, the server up to 20.
        pub logprobs: Option<Int>,
        pub best_of: Option<Int>,
    }
}

/// One prompt of a batch, in whichever form it came.
enum One {
    Text(String),
    Ids(Vec<u32>),
}

/// Reads a `/v1/completions` body into requests named `rid` (one prompt), or `rid-0`, `rid-1`, ... (a batch).
pub fn parse_completion(body: &[u8], rid: &str) -> Result<Parsed, ApiError> {
    let r: CompletionRequest = parse_body(body)?;
    refuse_unless(r.suffix.as_deref().is_none_or(str::is_empty), "suffix", "insertion needs a model trained for it")?;
    let max_tokens = r.shared().max_tokens.map_or(COMPLETIONS_DEFAULT_MAX_TOKENS, |Int(m)| m);
    let echo = r.echo.unwrap_or(false);
    // OpenAI's `max_tokens: 0` with `echo`: the prompt alone (with its logprobs, when asked), nothing generated.
    // The engine samples one token anyway (the prompt's last logits are computed regardless), which the reply
    // leaves out.
    let prompt_only = echo && max_tokens == 0;
    let mut common = r.shared().read(if prompt_only { 1 } else { max_tokens })?;
    let logprobs = r.logprobs.map(|Int(k)| k);
    common.sampling.logprobs = logprobs;
    if echo {
        // The echoed prompt's tokens get theirs too, computed by the model (vLLM's `prompt_logprobs`).
        common.sampling.prompt_logprobs = logprobs;
    }
    if let Some(Int(best_of)) = r.best_of
        && best_of != common.n
        && best_of != 1
    {
        let message = "best_of is not supported: every sample is returned, so best_of must equal n (or be 1)";
        return Err(ApiError::unsupported("best_of", message));
    }
    let prompts: Vec<One> = match r.prompt {
        PromptInput::Text(text) => vec![One::Text(text)],
        PromptInput::Ids(ids) => vec![One::Ids(ids)],
        // An empty array is an empty prompt, not a batch of none.
        PromptInput::Texts(texts) if texts.is_empty() => vec![One::Ids(Vec::new())],
        PromptInput::Texts(texts) => texts.into_iter().map(One::Text).collect(),
        PromptInput::IdLists(lists) => lists.into_iter().map(One::Ids).collect(),
    };
    if prompts.len() > MAX_PROMPTS {
        return Err(ApiError::invalid("prompt", format!("at most {MAX_PROMPTS} prompts, got {}", prompts.len())));
    }
    let batched = prompts.len() > 1;
    let requests: Vec<Generate> = prompts
        .into_iter()
        .enumerate()
        .map(|(i, prompt)| {
            let mut g = Generate::new(if batched { format!("{rid}-{i}") } else { rid.to_owned() });
            match prompt {
                One::Text(text) => g.text = Some(text),
                One::Ids(ids) => g.input_ids = Some(ids),
            }
            g.sampling = common.sampling.clone();
            g.n = common.n;
            g.stream = common.stream;
            g
        })
        .collect();
    common::check(&requests)?;
    Ok(Parsed {
        n: common.n as u32,
        requests,
        stream: common.stream,
        include_usage: common.include_usage,
        echo,
        prompt_only,
        logprobs: logprobs.is_some(),
        tokens_as_ids: common.tokens_as_ids,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn completion(body: Value) -> Result<Parsed, ApiError> {
        parse_completion(body.to_string().as_bytes(), "cmpl-1")
    }

    fn refusal(body: Value) -> (u16, &'static str, String) {
        let e = completion(body).expect_err("refused");
        (e.status, e.code, e.param.unwrap_or_default())
    }

    #[test]
    fn a_completion_request_becomes_a_generate_with_every_field() {
        let p = completion(json!({
            "model": "anything", "prompt": "def f():", "max_tokens": 7, "temperature": 0, "top_p": 0.5,
            "top_k": 3, "seed": 18446744073709551615u64, "stop": "\n\n", "stop_token_ids": [5, 6],
            "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}, "n": 1,
            "echo": false, "logprobs": 3, "best_of": 1, "user": "ignored", "suffix": "", "min_p": 0.2,
            "presence_penalty": 1, "frequency_penalty": 0.5, "repetition_penalty": 1.2, "logit_bias": {"5": 10},
            "min_tokens": 0, "skip_special_tokens": true, "return_tokens_as_token_ids": false,
        }))
        .unwrap();
        let [g] = &p.requests[..] else { panic!() };
        assert_eq!((g.rid.as_str(), g.text.as_deref(), g.stream), ("cmpl-1", Some("def f():"), true));
        let s = &g.sampling;
        assert_eq!((s.max_tokens, s.temperature, s.top_p, s.top_k), (7, 0.0, 0.5, 3));
        assert_eq!(
            (s.seed, s.stop.clone(), s.stop_token_ids.clone()),
            (Some(u64::MAX), vec!["\n\n".into()], vec![5, 6])
        );
        assert_eq!((s.min_p, s.presence_penalty, s.frequency_penalty, s.repetition_penalty), (0.2, 1.0, 0.5, 1.2));
        assert_eq!((s.logit_bias.clone(), s.logprobs), (vec![(5, 10.0)], Some(3)));
        assert!(s.ignore_eos && p.stream && p.include_usage && p.logprobs && !p.echo && !p.tokens_as_ids);
    }

    #[test]
    fn completion_defaults_follow_openai() {
        let p = completion(json!({"prompt": "x"})).unwrap();
        let s = &p.requests[0].sampling;
        assert_eq!(
            (s.max_tokens, s.temperature, s.seed, s.logprobs),
            (COMPLETIONS_DEFAULT_MAX_TOKENS, 1.0, None, None)
        );
        assert!(!p.stream && !p.requests[0].stream && !p.include_usage && !p.logprobs);
        assert_eq!(completion(json!({"prompt": "x", "max_tokens": 8.0})).unwrap().requests[0].sampling.max_tokens, 8);
        assert_eq!(completion(json!({"prompt": "x", "logprobs": 0})).unwrap().requests[0].sampling.logprobs, Some(0));
    }

    #[test]
    fn prompts_are_text_or_token_ids_single_or_batched() {
        let forms =
            |b| completion(b).unwrap().requests.into_iter().map(|g| (g.rid, g.text, g.input_ids)).collect::<Vec<_>>();
        assert_eq!(forms(json!({"prompt": [1, 2, 3]})), [("cmpl-1".into(), None, Some(vec![1, 2, 3]))]);
        assert_eq!(forms(json!({"prompt": [[4, 5]]})), [("cmpl-1".into(), None, Some(vec![4, 5]))]);
        assert_eq!(forms(json!({"prompt": ["hi"]})), [("cmpl-1".into(), Some("hi".into()), None)]);
        assert_eq!(
            forms(json!({"prompt": ["a", "b"]})),
            [("cmpl-1-0".into(), Some("a".into()), None), ("cmpl-1-1".into(), Some("b".into()), None)]
        );
        assert_eq!(
            forms(json!({"prompt": [[1], [2, 3]]})),
            [("cmpl-1-0".into(), None, Some(vec![1])), ("cmpl-1-1".into(), None, Some(vec![2, 3]))]
        );
        assert_eq!(forms(json!({"prompt": []})), [("cmpl-1".into(), None, Some(vec![]))], "an empty prompt");
        let p = completion(json!({"prompt": ["a", "b", "c"], "n": 2, "seed": 4})).unwrap();
        assert_eq!(p.n, 2);
        assert!(p.requests.iter().all(|g| g.n == 2 && g.sampling.seed == Some(4)));
    }

    #[test]
    fn each_refusal_names_its_param() {
        let many: Vec<String> = (0..=MAX_PROMPTS).map(|i| i.to_string()).collect();
        for (body, code, param) in [
            (json!({"max_tokens": 5}), "invalid_params", "prompt"),
            (json!({"prompt": [1, -2]}), "invalid_params", "prompt"),
            (json!({"prompt": [1, 1.5]}), "invalid_params", "prompt"),
            (json!({"prompt": ["a", 1]}), "invalid_params", "prompt"),
            (json!({"prompt": 5}), "invalid_params", "prompt"),
            (json!({"prompt": many}), "invalid_params", "prompt"),
            (json!({"prompt": "x", "max_tokens": 0}), "invalid_params", "max_tokens"),
            (json!({"prompt": "x", "max_tokens": 1.5}), "invalid_params", "max_tokens"),
            (json!({"prompt": "x", "temperature": -1}), "invalid_params", "temperature"),
            (json!({"prompt": "x", "top_p": 1.5}), "invalid_params", "top_p"),
            (json!({"prompt": "x", "stop": [""]}), "invalid_params", "stop"),
            (json!({"prompt": "x", "stop": 3}), "invalid_params", "stop"),
            (json!({"prompt": "x", "seed": -1}), "invalid_params", "seed"),
            (json!({"prompt": "x", "n": "two"}), "invalid_params", "n"),
            (json!({"prompt": "x", "logprobs": 21}), "invalid_params", "logprobs"),
            (json!({"prompt": "x", "logprobs": true}), "invalid_params", "logprobs"),
            (json!({"prompt": "x", "logit_bias": {"3": -101}}), "invalid_params", "logit_bias"),
            (json!({"prompt": "x", "echo": false, "max_tokens": 0}), "invalid_params", "max_tokens"),
            (json!({"prompt": "x", "best_of": 3}), "unsupported_parameter", "best_of"),
            (json!({"prompt": "x", "suffix": "end"}), "unsupported_parameter", "suffix"),
            (json!({"prompt": "x", "min_tokens": -1}), "invalid_params", "min_tokens"),
            (json!({"prompt": "x", "regex": "a", "grammar": "start: \"a\""}), "invalid_params", "grammar"),
            (json!({"prompt": "x", "messages": []}), "unknown_parameter", "messages"),
            (json!({"prompt": "x", "top_logprobs": 2}), "unknown_parameter", "top_logprobs"),
            (json!({"prompt": "x", "frobnicate": 1}), "unknown_parameter", "frobnicate"),
        ] {
            assert_eq!(refusal(body.clone()), (400, code, param.to_string()), "{body}");
        }
        assert!(completion(json!({"prompt": "x", "best_of": 2, "n": 2})).is_ok(), "best_of = n returns every sample");
        assert!(completion(json!({"prompt": "x", "echo": true})).unwrap().echo);
    }

    #[test]
    fn echo_with_logprobs_asks_for_the_prompts_and_max_tokens_0_for_the_prompt_alone() {
        let p = completion(json!({"prompt": "x", "echo": true, "logprobs": 3, "max_tokens": 2})).unwrap();
        let s = &p.requests[0].sampling;
        assert_eq!((s.logprobs, s.prompt_logprobs, s.max_tokens, p.prompt_only), (Some(3), Some(3), 2, false));
        let p = completion(json!({"prompt": "x", "echo": true, "logprobs": 0, "max_tokens": 0})).unwrap();
        let s = &p.requests[0].sampling;
        assert_eq!((s.prompt_logprobs, s.max_tokens, p.prompt_only), (Some(0), 1, true));
        let p = completion(json!({"prompt": "x", "echo": true, "max_tokens": 0})).unwrap();
        assert_eq!((p.requests[0].sampling.prompt_logprobs, p.prompt_only, p.echo), (None, true, true));
        let p = completion(json!({"prompt": "x", "logprobs": 2})).unwrap();
        assert_eq!(p.requests[0].sampling.prompt_logprobs, None, "without echo the prompt is not returned");
    }

    #[test]
    fn sglang_routers_fields_are_taken_at_their_defaults_and_refused_otherwise() {
        let routed = json!({"model": "m", "prompt": "hi", "max_tokens": 3, "stream": false, "echo": false,
            "no_stop_trim": false, "ignore_eos": false, "skip_special_tokens": true, "return_hidden_states": false});
        assert!(completion(routed.clone()).is_ok());
        for field in ["no_stop_trim", "return_hidden_states"] {
            let mut body = routed.clone();
            body[field] = json!(true);
            assert_eq!(refusal(body), (400, "unsupported_parameter", field.to_string()));
        }
    }
}
