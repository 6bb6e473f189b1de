//! Turning a client's request into prompt token ids: validation, the chat template, the tokenizer, the prompt's
//! length against the context.
//!
//! It needs nothing of the hub's state, so the serve loop runs it on blocking threads, many requests at once,
//! and hands the hub requests ready to admit. Done inside the loop it was the bottleneck of a burst: a
//! 2,000-token chat prompt takes a few milliseconds to render and tokenize, and 64 of them in a row kept the
//! last one waiting a third of a second before the GPU saw it.

use super::hub::PromptLimits;
use crate::text::{ChatTemplate, Tokenizer};
use proto::api::{self, ErrorCode, Generate, Prompt, Rejection};
use std::sync::Arc;

#[derive(Clone)]
pub struct Preparer {
    tokenizer: Arc<Tokenizer>,
    chat: Option<Arc<ChatTemplate>>,
    limits: PromptLimits,
}

impl Preparer {
    pub fn new(tokenizer: Arc<Tokenizer>, chat: Option<ChatTemplate>, limits: PromptLimits) -> Self {
        Preparer { tokenizer, chat: chat.map(Arc::new), limits }
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn limits(&self) -> &PromptLimits {
        &self.limits
    }

    /// The prompt's token ids, or why the request is refused.
    pub fn prepare(&self, g: &Generate) -> Result<Vec<u32>, Rejection> {
        let reject = |code, message: String| Rejection { rid: Some(g.rid.clone()), code, message };
        api::validate(g)?;
        let Some(prompt) = g.prompt() else {
            return Err(reject(ErrorCode::InvalidParams, "give exactly one of text, messages, input_ids".into()));
        };
        let prompt = self.tokenize(prompt).map_err(|m| reject(ErrorCode::InvalidParams, m))?;
        if prompt.is_empty() {
            return Err(reject(ErrorCode::EmptyPrompt, "the prompt has no tokens".into()));
        }
        let l = &self.limits;
        if prompt.len() > l.max_prompt_len as usize {
            let message = format!(
                "the prompt has {} tokens; at most {} fit (context length {})",
                prompt.len(),
                l.max_prompt_len,
                l.max_seq_len
            );
            return Err(reject(ErrorCode::PromptTooLong, message));
        }
        Ok(prompt)
    }

    fn tokenize(&self, prompt: Prompt<'_>) -> Result<Vec<u32>, String> {
        match prompt {
            Prompt::Text(text) => self.tokenizer.encode(text).map_err(|e| format!("tokenizing: {e}")),
            Prompt::Messages(messages) => {
                let chat = self.chat.as_ref().ok_or("this model has no chat template")?;
                let text = chat.render(messages, true, None).map_err(|e| format!("chat template: {e}"))?;
                self.tokenizer.encode(&text).map_err(|e| format!("tokenizing: {e}"))
            }
            Prompt::InputIds(ids) => match ids.iter().find(|&&t| t >= self.limits.vocab_size) {
                Some(bad) => Err(format!("token id {bad} is outside the vocabulary (0..{})", self.limits.vocab_size)),
                None => Ok(ids.to_vec()),
            },
        }
    }
}
