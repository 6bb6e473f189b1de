use std::path::Path;

use super::error::{Result, TextError};

/// A model's tokenizer, loaded from its `tokenizer.json`. Immutable once loaded; share it as `Arc<Tokenizer>`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `<dir>/tokenizer.json`.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("tokenizer.json"))
    }

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TextError::Io { path: path.to_owned(), source })?;
        Self::from_json_bytes(&bytes)
    }

    /// Builds a tokenizer from the contents of a `tokenizer.json`.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(TextError::Tokenizer)?;
        // transformers ignores the truncation and padding stored in tokenizer.json unless a call asks for them;
        // left on, they would silently cut or pad prompts.
        inner.with_truncation(None).map_err(TextError::Tokenizer)?;
        inner.with_padding(None);
        Ok(Self { inner })
    }

    /// Token ids of `text`, with no special tokens added around it. Control-token text inside it (for Qwen
    /// `<|im_start|>`) becomes the control token, as in transformers.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, false).map_err(TextError::Tokenizer)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`, leaving out special tokens (`skip_special_tokens=True`). Ids outside the vocabulary are
    /// left out too.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(TextError::Tokenizer)
    }

    /// Number of distinct tokens, added tokens included (transformers' `len(tokenizer)`). The model's embedding
    /// table may be larger.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token given as its vocabulary string (`"<|im_end|>"`), if there is one.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary string of an id, if there is one.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Whether `id` is a special token, that is one `decode` leaves out.
    pub fn is_special(&self, id: u32) -> bool {
        let added = self.inner.get_added_vocabulary();
        added.simple_id_to_token(id).is_some_and(|token| added.is_special_token(&token))
    }
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}
