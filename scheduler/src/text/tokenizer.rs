use std::path::Path;

use super::error::{Result, TextError};

/// A model's tokenizer, loaded from its `tokenizer.json`. Immutable once loaded; share it as `Arc<Tokenizer>`.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The decoder maps vocabulary strings to bytes through GPT-2's byte alphabet.
    byte_level: bool,
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
        // Serialized, a decoder names its type (and those of a sequence's parts) as `"type": "ByteLevel"`.
        let byte_level = inner
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|json| json.contains("\"ByteLevel\""));
        Ok(Self { inner, byte_level })
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
        self.decode_with(ids, true)
    }

    /// Text of `ids`; special tokens are left out only with `skip_special_tokens`.
    pub fn decode_with(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(TextError::Tokenizer)
    }

    /// Token ids of `text` with the tokenizer's post-processing (a BOS for Llama) when `add_special_tokens`.
    pub fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self.inner.encode_fast(text, add_special_tokens).map_err(TextError::Tokenizer)?;
        Ok(encoding.get_ids().to_vec())
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

    /// The bytes token `id` stands for, as OpenAI's logprobs report them: for a byte-level BPE (Qwen, Llama 3,
    /// SmolLM2) the raw bytes its vocabulary string encodes, which may be part of a UTF-8 character; for a
    /// SentencePiece vocabulary (Llama 2, Mistral) the byte of a `<0xNN>` token, or the string with `▁` as a
    /// space; for an added token its content. `None` for an id outside the tokenizer's vocabulary.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let added = self.inner.get_added_vocabulary();
        if let Some(content) = added.simple_id_to_token(id) {
            return Some(content.into_bytes());
        }
        let token = self.inner.id_to_token(id)?;
        if self.byte_level {
            let bytes: Option<Vec<u8>> = token.chars().map(byte_of_char).collect();
            // A vocabulary string outside the byte alphabet is not byte-encoded: take it as it is.
            return Some(bytes.unwrap_or_else(|| token.into_bytes()));
        }
        if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'))
            && let Ok(byte) = u8::from_str_radix(hex, 16)
            && hex.len() == 2
        {
            return Some(vec![byte]);
        }
        Some(token.replace('\u{2581}', " ").into_bytes())
    }

    /// Whether `id` is a special token, that is one `decode` leaves out.
    pub fn is_special(&self, id: u32) -> bool {
        let added = self.inner.get_added_vocabulary();
        added.simple_id_to_token(id).is_some_and(|token| added.is_special_token(&token))
    }
}

/// The byte a character of GPT-2's byte alphabet stands for: printable bytes stand for themselves, the others
/// (control characters, space, a few of Latin-1) for the code points from 256 on, in byte order.
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    let code = c as u32;
    if code < 256 {
        let b = code as u8;
        return printable(b).then_some(b);
    }
    let rank = (code - 256) as usize;
    (0..=255u8).filter(|&b| !printable(b)).nth(rank)
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer").field("vocab_size", &self.vocab_size()).finish()
    }
}
