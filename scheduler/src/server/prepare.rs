//! Turning a client's request into prompt token ids: validation, the chat template, the tokenizer, the prompt's
//! length against the context.
//!
//! It needs nothing of the hub's state, so the serve loop runs it on blocking threads, many requests at once,
//! and hands the hub requests ready to admit. Done inside the loop it was the bottleneck of a burst: a
//! 2,000-token chat prompt takes a few milliseconds to render and tokenize, and 64 of them in a row kept the
//! last one waiting a third of a second before the GPU saw it.

use super::hub::PromptLimits;
use super::messages;
use super::openai::tools;
use crate::grammar::{Compiled, ConstraintSpec, Constraints};
use crate::text::{ChatTemplate, Tokenizer, ToolFormat};
use proto::api::{self, ErrorCode, Generate, Prompt, Rejection};
use serde_json::Value;
use std::sync::Arc;

#[derive(Clone)]
pub struct Preparer {
    tokenizer: Arc<Tokenizer>,
    chat: Option<Arc<ChatTemplate>>,
    limits: PromptLimits,
    /// Structured output's compiler; `None` refuses constrained requests.
    constraints: Option<Arc<Constraints>>,
}

/// A request's prompt, and its compiled constraint when it has one.
pub struct PreparedPrompt {
    pub ids: Vec<u32>,
    pub constraint: Option<Arc<Compiled>>,
}

impl Preparer {
    pub fn new(tokenizer: Arc<Tokenizer>, chat: Option<ChatTemplate>, limits: PromptLimits) -> Self {
        Preparer { tokenizer, chat: chat.map(Arc::new), limits, constraints: None }
    }

    pub fn with_constraints(self, constraints: Option<Arc<Constraints>>) -> Self {
        Preparer { constraints, ..self }
    }

    /// Compiles a constraint against the served vocabulary: the entry point for whatever constrains output
    /// (`response_format`, `regex`, `grammar`, a forced tool call's Lark grammar). The error names the field.
    pub fn compile(&self, spec: &ConstraintSpec) -> Result<Compiled, (String, String)> {
        let param = spec.param().to_string();
        let Some(c) = &self.constraints else {
            return Err((param, "structured output is not available for this model".into()));
        };
        c.compile(spec).map_err(|e| (param, format!("{}: {e}", spec.key())))
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn limits(&self) -> &PromptLimits {
        &self.limits
    }

    /// How the model writes tool calls, as its chat template teaches it.
    pub fn tool_format(&self) -> ToolFormat {
        self.chat.as_ref().map_or(ToolFormat::Hermes, |c| c.tool_format())
    }

    /// The prompt's token ids and the compiled constraint, or why the request is refused.
    pub fn prepare(&self, g: &Generate) -> Result<PreparedPrompt, Rejection> {
        let rid = || Some(g.rid.clone());
        api::validate(g)?;
        let vocab = self.limits.vocab_size;
        if let Some(&(bad, _)) = g.sampling.logit_bias.iter().find(|&&(id, _)| id >= vocab) {
            let message = format!("logit_bias names token {bad}, outside the vocabulary (0..{vocab})");
            return Err(Rejection::invalid(rid(), "logit_bias", message));
        }
        let Some(prompt) = g.prompt() else {
            let message = "give exactly one of text, messages, input_ids";
            return Err(Rejection::new(rid(), ErrorCode::InvalidParams, message));
        };
        let plan = tools::plan_of(g)
            .map_err(|e| Rejection { param: e.param, ..Rejection::new(rid(), ErrorCode::InvalidParams, e.message) })?;
        let prompt = match (prompt, &plan) {
            (Prompt::Messages(messages), Some(plan)) => self
                .render_with_tools(messages, true, Some(&plan.template_tools))
                .and_then(|text| self.tokenizer.encode(&text).map_err(|e| (None, format!("tokenizing: {e}")))),
            _ => self.tokenize(prompt),
        };
        let prompt = prompt.map_err(|(param, message)| Rejection {
            param,
            ..Rejection::new(rid(), ErrorCode::InvalidParams, message)
        })?;
        if prompt.is_empty() {
            return Err(Rejection::new(rid(), ErrorCode::EmptyPrompt, "the prompt has no tokens"));
        }
        let l = &self.limits;
        if prompt.len() > l.max_prompt_len as usize {
            let message = format!(
                "the prompt has {} tokens; at most {} fit (context length {})",
                prompt.len(),
                l.max_prompt_len,
                l.max_seq_len
            );
            return Err(Rejection::new(rid(), ErrorCode::PromptTooLong, message));
        }
        // Last: compiling a schema is the costliest check.
        let s = &g.sampling;
        let forced_call = plan.as_ref().and_then(|plan| plan.forced_call(self.tool_format()));
        let spec = match (&s.json_schema, &s.regex, &s.grammar, forced_call) {
            (None, None, None, Some(lark)) => Some(ConstraintSpec::Lark(lark)),
            (_, _, _, Some(_)) => {
                let message = "a forced tool call (tool_choice \"required\" or a named function) is already a \
                               constraint: it cannot be combined with response_format, regex or grammar";
                return Err(Rejection::invalid(rid(), "tool_choice", message));
            }
            (Some(schema), _, _, None) => Some(ConstraintSpec::JsonSchema(schema.clone())),
            (_, Some(rx), _, None) => Some(ConstraintSpec::Regex(rx.clone())),
            (_, _, Some(lark), None) => Some(ConstraintSpec::Lark(lark.clone())),
            _ => None,
        };
        let constraint = match spec {
            Some(spec) => Some(Arc::new(
                self.compile(&spec).map_err(|(param, message)| Rejection::invalid(rid(), param, message))?,
            )),
            None => None,
        };
        Ok(PreparedPrompt { ids: prompt, constraint })
    }

    /// The prompt's token ids, as a request would be given them; a refusal names the field at fault when
    /// there is one.
    pub fn tokenize(&self, prompt: Prompt<'_>) -> Result<Vec<u32>, (Option<String>, String)> {
        match prompt {
            Prompt::Text(text) => self.tokenizer.encode(text).map_err(|e| (None, format!("tokenizing: {e}"))),
            Prompt::Messages(messages) => {
                let text = self.render(messages, true)?;
                self.tokenizer.encode(&text).map_err(|e| (None, format!("tokenizing: {e}")))
            }
            Prompt::InputIds(ids) => match ids.iter().find(|&&t| t >= self.limits.vocab_size) {
                Some(bad) => {
                    let message = format!("token id {bad} is outside the vocabulary (0..{})", self.limits.vocab_size);
                    // Only the HTTP API reads the field, and there the ids are its `prompt`.
                    Err((Some("prompt".into()), message))
                }
                None => Ok(ids.to_vec()),
            },
        }
    }

    /// The chat template's text for `messages`, checked and normalised first (`messages.rs`).
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String, (Option<String>, String)> {
        self.render_with_tools(messages, add_generation_prompt, None)
    }

    /// [`render`](Self::render) with the request's tools (checked: `openai::tools`) in the template's context.
    pub fn render_with_tools(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        tools: Option<&Value>,
    ) -> Result<String, (Option<String>, String)> {
        let messages = messages::normalize(messages).map_err(|e| (Some(e.param), e.message))?;
        let chat = self.chat.as_ref().ok_or((None, "this model has no chat template".to_string()))?;
        if tools.is_some() && !chat.renders_tools() {
            // Rendered without them, the request would run as if it had none.
            let message = "tools are not supported by this model: its chat template does not render tools";
            return Err((Some("tools".into()), message.into()));
        }
        chat.render(&messages, add_generation_prompt, tools)
            .map_err(|e| (Some("messages".into()), format!("chat template: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::TokenTable;
    use crate::text::test_tokenizer::{SPECIAL, byte_level_tokenizer};
    use proto::api::Sampling;

    fn preparer(structured: bool) -> Preparer {
        let tokenizer = byte_level_tokenizer();
        let vocab = tokenizer.vocab_size() as u32;
        let limits = PromptLimits { vocab_size: vocab, max_seq_len: 64, max_prompt_len: 63 };
        let constraints = structured.then(|| {
            let eos = tokenizer.token_id(SPECIAL).unwrap();
            Arc::new(Constraints::new(tokenizer.clone(), &TokenTable::new(&tokenizer), &[eos], vocab).unwrap())
        });
        Preparer::new(tokenizer, None, limits).with_constraints(constraints)
    }

    fn request(sampling: Sampling) -> Generate {
        let mut g = Generate::new("r");
        g.text = Some("hi".into());
        g.sampling = sampling;
        g
    }

    #[test]
    fn a_constraint_is_compiled_with_the_prompt_and_a_bad_one_is_refused_naming_its_field() {
        let p = preparer(true);
        assert!(p.prepare(&request(Sampling::default())).unwrap().constraint.is_none());
        let ok = Sampling { regex: Some("[0-9]+".into()), ..Sampling::default() };
        assert!(p.prepare(&request(ok)).unwrap().constraint.is_some());
        let schema = serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        assert!(p.prepare(&request(Sampling { json_schema: Some(schema), ..Sampling::default() })).is_ok());
        for (sampling, param, key) in [
            (Sampling { regex: Some("a(".into()), ..Sampling::default() }, "regex", "regex:"),
            (Sampling { grammar: Some("start: nowhere".into()), ..Sampling::default() }, "grammar", "grammar:"),
            (
                Sampling { json_schema: Some(serde_json::json!({"type": "nope"})), ..Sampling::default() },
                "response_format",
                "json_schema:",
            ),
        ] {
            let e = p.prepare(&request(sampling)).err().expect("refused");
            assert_eq!((e.code, e.param.as_deref()), (ErrorCode::InvalidParams, Some(param)));
            assert!(e.message.starts_with(key), "{}", e.message);
        }
        let two = Sampling { regex: Some("a".into()), grammar: Some("start: \"a\"".into()), ..Sampling::default() };
        assert_eq!(p.prepare(&request(two)).err().unwrap().param.as_deref(), Some("grammar"));
    }

    #[test]
    fn without_a_compiler_constraints_are_refused() {
        let e = preparer(false).prepare(&request(Sampling { regex: Some("a".into()), ..Sampling::default() }));
        let e = e.err().expect("refused");
        assert_eq!(e.param.as_deref(), Some("regex"));
        assert!(e.message.contains("not available"), "{}", e.message);
    }
}
