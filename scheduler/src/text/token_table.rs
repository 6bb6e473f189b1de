//! Every token's bytes, looked up once: what logprobs report for a token (`token`, `bytes`), and what their
//! `text_offset` counts.

use super::tokenizer::Tokenizer;
use std::borrow::Cow;

/// The bytes of every id of a tokenizer's vocabulary, flat. Built once at startup (a few milliseconds for
/// Qwen's 151,665 tokens, about 1 MB), so that writing a response's logprobs is a lookup per token rather than
/// a call into the tokenizer.
pub struct TokenTable {
    bytes: Vec<u8>,
    /// Token `id`'s bytes are `bytes[ends[id - 1] .. ends[id]]` (from 0 for id 0).
    ends: Vec<u32>,
}

impl TokenTable {
    pub fn new(tokenizer: &Tokenizer) -> Self {
        let n = tokenizer.vocab_size();
        let mut bytes = Vec::with_capacity(n * 8);
        let mut ends = Vec::with_capacity(n);
        for id in 0..n as u32 {
            bytes.extend_from_slice(&tokenizer.token_bytes(id).unwrap_or_default());
            ends.push(bytes.len() as u32);
        }
        TokenTable { bytes, ends }
    }

    /// The bytes of `id`; empty for an id past the tokenizer's vocabulary (the model's logits may be wider).
    pub fn bytes(&self, id: u32) -> &[u8] {
        let Some(&end) = self.ends.get(id as usize) else { return &[] };
        let start = if id == 0 { 0 } else { self.ends[id as usize - 1] };
        &self.bytes[start as usize..end as usize]
    }

    /// The text of `id`: its bytes as UTF-8, with U+FFFD for a part of a character (as vLLM writes it).
    pub fn text(&self, id: u32) -> Cow<'_, str> {
        String::from_utf8_lossy(self.bytes(id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::test_tokenizer::{ADDED, SPECIAL, byte_level_tokenizer};

    #[test]
    fn byte_level_tokens_are_their_raw_bytes_and_added_tokens_their_content() {
        let tokenizer = byte_level_tokenizer();
        let table = TokenTable::new(&tokenizer);
        // Every byte, the unprintable ones (space, newline, 0xAD) included, is its own token.
        for byte in [b'a', b' ', b'\n', 0x00, 0xAD, 0xE4, 0xFF] {
            assert_eq!(table.bytes(u32::from(byte)), [byte]);
        }
        let ids = tokenizer.encode("hé 中").unwrap();
        let joined: Vec<u8> = ids.iter().flat_map(|&id| table.bytes(id).to_vec()).collect();
        assert_eq!(joined, "hé 中".as_bytes(), "the tokens' bytes concatenate to the text");
        assert_eq!(table.text(ids[0]), "h\u{FFFD}", "half of é is a replacement character");
        assert_eq!(table.text(tokenizer.token_id(SPECIAL).unwrap()), SPECIAL);
        assert_eq!(table.text(tokenizer.token_id(ADDED).unwrap()), ADDED);
        assert_eq!(table.bytes(1 << 20), b"", "past the vocabulary");
    }
}
