//! `POST /tokenize` and `POST /detokenize`, in the shapes vLLM and SGLang give them: a prompt (or chat messages)
//! to the token ids the server would feed the model, and ids back to text.

use super::ApiError;
use super::common::parse_body;
use super::tools::{self, Tool};
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeRequest {
    /// Accepted and ignored: one model is served.
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub messages: Option<Vec<Value>>,
    /// Add what the tokenizer's post-processor adds (Llama's BOS). Default false: the ids are then what
    /// `/v1/completions` feeds the model for the same prompt, which adds none.
    pub add_special_tokens: Option<bool>,
    /// Messages only: end with the assistant's turn opening, as chat completions do (the default).
    pub add_generation_prompt: Option<bool>,
    /// vLLM's: also return each token's text.
    pub return_token_strs: Option<bool>,
    /// Messages only: the tools a chat request would offer, rendered into the template as it renders them.
    pub tools: Option<Vec<Tool>>,
}

/// What to tokenize: a prompt, or messages with the tools for the template (checked as chat's are).
pub enum ToTokenize {
    Prompt(String),
    Messages(Vec<Value>, Option<Value>),
}

pub fn parse_tokenize(body: &[u8]) -> Result<(TokenizeRequest, ToTokenize), ApiError> {
    let mut r: TokenizeRequest = parse_body(body)?;
    let what = match (r.prompt.take(), r.messages.take()) {
        (Some(prompt), None) => ToTokenize::Prompt(prompt),
        (None, Some(messages)) => {
            if r.add_special_tokens == Some(true) {
                let message = "add_special_tokens is for prompts: the chat template writes the special tokens";
                return Err(ApiError::invalid("add_special_tokens", message));
            }
            let plan = tools::plan(r.tools.as_deref(), None, None)?;
            ToTokenize::Messages(messages, plan.map(|p| p.template_tools))
        }
        (Some(_), Some(_)) => return Err(ApiError::invalid("messages", "give prompt or messages, not both")),
        (None, None) => return Err(ApiError::invalid("prompt", "prompt (or messages) is required")),
    };
    if matches!(what, ToTokenize::Prompt(_)) && r.add_generation_prompt.is_some() {
        return Err(ApiError::invalid("add_generation_prompt", "add_generation_prompt is for messages"));
    }
    if matches!(what, ToTokenize::Prompt(_)) && r.tools.is_some() {
        return Err(ApiError::invalid("tools", "tools are for messages: the chat template renders them"));
    }
    Ok((r, what))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetokenizeRequest {
    pub model: Option<String>,
    pub tokens: Vec<u32>,
}

pub fn parse_detokenize(body: &[u8]) -> Result<DetokenizeRequest, ApiError> {
    parse_body(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_or_messages_and_nothing_else() {
        let (r, what) = parse_tokenize(br#"{"model": "m", "prompt": "hi", "add_special_tokens": true}"#).unwrap();
        assert!(matches!(what, ToTokenize::Prompt(p) if p == "hi"));
        assert_eq!(r.add_special_tokens, Some(true));
        let (_, what) = parse_tokenize(br#"{"messages": [{"role": "user", "content": "x"}]}"#).unwrap();
        assert!(matches!(what, ToTokenize::Messages(m, None) if m.len() == 1));
        let body = br#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}"#;
        let (_, what) = parse_tokenize(body).unwrap();
        assert!(matches!(what, ToTokenize::Messages(_, Some(t)) if t[0]["function"]["name"] == "f"));
        for (body, code, param) in [
            (&br#"{}"#[..], "invalid_params", "prompt"),
            (br#"{"prompt": "a", "messages": []}"#, "invalid_params", "messages"),
            (br#"{"prompt": 5}"#, "invalid_params", "prompt"),
            (br#"{"prompt": "a", "add_generation_prompt": true}"#, "invalid_params", "add_generation_prompt"),
            (br#"{"messages": [], "add_special_tokens": true}"#, "invalid_params", "add_special_tokens"),
            (br#"{"prompt": "a", "extra": 1}"#, "unknown_parameter", "extra"),
            (br#"{"prompt": "a", "tools": []}"#, "invalid_params", "tools"),
            (
                br#"{"messages": [], "tools": [{"type": "function", "function": {"name": "a b"}}]}"#,
                "invalid_params",
                "tools[0].function.name",
            ),
        ] {
            let e = parse_tokenize(body).err().expect("refused");
            assert_eq!((e.code, e.param.as_deref()), (code, Some(param)), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn detokenize_takes_token_ids() {
        assert_eq!(parse_detokenize(br#"{"tokens": [1, 2]}"#).unwrap().tokens, [1, 2]);
        for body in [&br#"{}"#[..], br#"{"tokens": [-1]}"#, br#"{"tokens": "x"}"#] {
            let e = parse_detokenize(body).unwrap_err();
            assert_eq!(e.code, "invalid_params");
            assert!(e.param.as_deref().is_some_and(|p| p.starts_with("tokens")), "{e:?}");
        }
    }
}
