use std::sync::Arc;

use super::error::{Result, TextError};
use super::tokenizer::Tokenizer;

/// Turns a request's output ids into text one id at a time, giving out only text that later ids cannot change.
///
/// A token can end inside a UTF-8 character (byte-level BPE splits Chinese characters and emoji across tokens),
/// and some decoders change a token's text by what precedes it (a leading space). So each step decodes a small
/// window: the ids of the last chunk given out (the context) followed by the ids not given out yet, and gives
/// out what the window's text adds to the context's text, once that text no longer ends in U+FFFD (an unfinished
/// character). The window restarts after each chunk, so a step costs a decode of a few tokens, not of the
/// whole output.
pub struct IncrementalDecoder {
    tokenizer: Arc<Tokenizer>,
    window: Vec<u32>,
    /// `window[..context_len]` are ids whose text was already given out...
    context_len: usize,
    /// ...and this is their text when decoded alone.
    context_text: String,
    skip_special_tokens: bool,
}

impl IncrementalDecoder {
    pub fn new(tokenizer: Arc<Tokenizer>) -> Self {
        Self { tokenizer, window: Vec::new(), context_len: 0, context_text: String::new(), skip_special_tokens: true }
    }

    /// Keeps special tokens in the text (`<|im_end|>`) instead of leaving them out.
    pub fn keeping_special_tokens(self, keep: bool) -> Self {
        Self { skip_special_tokens: !keep, ..self }
    }

    /// Adds one id; returns the text that is now final (often empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.window.push(id);
        self.advance(false)
    }

    /// Gives out whatever is still held back, an unfinished character included (as transformers' decode
    /// writes it, U+FFFD). Call once, after the last id.
    pub fn flush(&mut self) -> Result<String> {
        self.advance(true)
    }

    fn advance(&mut self, at_end: bool) -> Result<String> {
        if self.window.len() == self.context_len {
            return Ok(String::new());
        }
        let text = self.tokenizer.decode_with(&self.window, self.skip_special_tokens)?;
        if text.len() <= self.context_text.len() || (!at_end && text.ends_with('\u{FFFD}')) {
            // Nothing new (a skipped special token) or an unfinished character: wait for more ids.
            return Ok(String::new());
        }
        let Some(new_text) = text.strip_prefix(self.context_text.as_str()) else {
            return Err(TextError::StreamDiverged {
                token_id: *self.window.last().expect("the window is not empty"),
                expected: std::mem::take(&mut self.context_text),
                actual: text,
            });
        };
        let new_text = new_text.to_string();
        self.window.drain(..self.context_len);
        self.context_len = self.window.len();
        self.context_text = self.tokenizer.decode_with(&self.window, self.skip_special_tokens)?;
        Ok(new_text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::test_tokenizer::byte_level_tokenizer;

    #[test]
    fn each_step_decodes_a_few_tokens_not_the_whole_output() {
        let tokenizer = byte_level_tokenizer();
        let text = "long output with 中文 and 🙂 ".repeat(200);
        let ids = tokenizer.encode(&text).unwrap();
        let mut decoder = IncrementalDecoder::new(tokenizer);
        let mut out = String::new();
        let mut widest = 0;
        for id in ids {
            out.push_str(&decoder.push(id).unwrap());
            widest = widest.max(decoder.window.len());
        }
        out.push_str(&decoder.flush().unwrap());
        assert_eq!(out, text);
        // A 4-byte emoji held over 4 tokens plus the chunk before it as context.
        assert!(widest <= 8, "the window grew to {widest} tokens");
    }
}
