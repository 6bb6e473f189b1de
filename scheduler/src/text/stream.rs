use std::sync::Arc;

use super::detok::IncrementalDecoder;
use super::error::Result;
use super::stop::{StopMatcher, StreamStep};
use super::tokenizer::Tokenizer;

/// A request's output text, fed one sampled id at a time.
///
/// The pieces it gives out never split a UTF-8 character, leave out special tokens, and never contain text a
/// stop string could still claim. Without a stop, the pieces and [`finish`](Self::finish) join to
/// `decode(all ids)`; with one, to that text cut before the first occurrence of any stop string.
pub struct TextStream {
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    text: String,
    finished: bool,
}

impl TextStream {
    /// A stream that stops at any of `stop_strings` (empty ones are ignored).
    pub fn new<S: Into<String>>(tokenizer: Arc<Tokenizer>, stop_strings: impl IntoIterator<Item = S>) -> Self {
        Self {
            decoder: IncrementalDecoder::new(tokenizer),
            stops: StopMatcher::new(stop_strings),
            text: String::new(),
            finished: false,
        }
    }

    /// Leaves special tokens out of the text (the default), or keeps them (`skip_special_tokens: false`).
    pub fn skipping_special_tokens(self, skip: bool) -> Self {
        Self { decoder: self.decoder.keeping_special_tokens(!skip), ..self }
    }

    /// Adds one id. Once `stopped` has been reported the request is over, and later ids give nothing.
    pub fn push(&mut self, id: u32) -> Result<StreamStep> {
        if self.stops.stopped() || self.finished {
            return Ok(StreamStep { text: String::new(), stopped: self.stops.stopped() });
        }
        let decoded = self.decoder.push(id)?;
        let step = self.stops.push(&decoded);
        self.text.push_str(&step.text);
        Ok(step)
    }

    /// Ends the stream, whatever ended the request: returns what was held back (an unfinished character, text
    /// a stop string could have claimed). A stop string can still complete in it, and then only the text before
    /// it comes out and [`stopped`](Self::stopped) turns true. After a stop, and on later calls, it returns "".
    pub fn finish(&mut self) -> Result<String> {
        if std::mem::replace(&mut self.finished, true) || self.stops.stopped() {
            return Ok(String::new());
        }
        let decoded = self.decoder.flush()?;
        let mut rest = self.stops.push(&decoded).text;
        rest.push_str(&self.stops.finish());
        self.text.push_str(&rest);
        Ok(rest)
    }

    /// A stop string was completed.
    pub fn stopped(&self) -> bool {
        self.stops.stopped()
    }

    /// All text given out so far: the request's text once finished.
    pub fn text(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::text::test_tokenizer::{ADDED, SPECIAL, byte_level_tokenizer};

    /// Feeds `ids` until a stop; returns the pieces (the last from `finish`), whether it stopped, and how many
    /// ids it took.
    fn stream(tokenizer: &Arc<Tokenizer>, ids: &[u32], stops: &[&str]) -> (Vec<String>, bool, usize) {
        let mut stream = TextStream::new(tokenizer.clone(), stops.iter().copied());
        let mut pieces = Vec::new();
        for (n, id) in ids.iter().enumerate() {
            let step = stream.push(*id).unwrap();
            pieces.push(step.text);
            if step.stopped {
                pieces.push(stream.finish().unwrap());
                assert_eq!(stream.text(), pieces.concat());
                return (pieces, true, n + 1);
            }
        }
        pieces.push(stream.finish().unwrap());
        assert_eq!(stream.text(), pieces.concat());
        (pieces, stream.stopped(), ids.len())
    }

    fn cut_at_first_stop(text: &str, stops: &[&str]) -> String {
        let at = stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s)).min();
        text[..at.unwrap_or(text.len())].to_string()
    }

    #[test]
    fn split_characters_are_never_given_out_in_halves() {
        let tokenizer = byte_level_tokenizer();
        let text = "Chinese 中文, emoji 🙂, a family 👨‍👩‍👧, a flag 🇫🇷, accents déjà vu.";
        let ids = tokenizer.encode(text).unwrap();
        assert!(ids.len() > text.chars().count(), "characters are split across tokens");
        let (pieces, stopped, _) = stream(&tokenizer, &ids, &[]);
        assert!(!stopped);
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), text);
        // Bytes of a 4-byte emoji come out together, on the token that completes it.
        let emoji = tokenizer.encode("🙂").unwrap();
        assert_eq!(stream(&tokenizer, &emoji, &[]).0, ["", "", "", "🙂", ""]);
    }

    #[test]
    fn special_tokens_are_skipped_even_inside_a_character() {
        let tokenizer = byte_level_tokenizer();
        let special = tokenizer.token_id(SPECIAL).unwrap();
        let mut ids = tokenizer.encode("a中").unwrap();
        ids.insert(2, special);
        ids.push(special);
        let (pieces, _, _) = stream(&tokenizer, &ids, &[]);
        assert_eq!(pieces.concat(), "a中");
        assert_eq!(pieces.concat(), tokenizer.decode(&ids).unwrap());
        let added = tokenizer.token_id(ADDED).unwrap();
        assert_eq!(stream(&tokenizer, &[added, b'x' as u32], &[]).0.concat(), "<tool>x");
        // Kept when asked: the text is decode's without skipping.
        let mut keeping = TextStream::new(tokenizer.clone(), Vec::<String>::new()).skipping_special_tokens(false);
        let mut text: String = ids.iter().map(|&id| keeping.push(id).unwrap().text).collect();
        text.push_str(&keeping.finish().unwrap());
        assert_eq!(text, tokenizer.decode_with(&ids, false).unwrap());
        assert_eq!(text.matches(SPECIAL).count(), 2, "{text}");
    }

    #[test]
    fn an_unfinished_character_at_the_end_comes_out_as_decode_writes_it() {
        let tokenizer = byte_level_tokenizer();
        let ids = [b'a' as u32, 0xE4, 0xB8];
        let (pieces, _, _) = stream(&tokenizer, &ids, &[]);
        assert_eq!(pieces, ["a", "", "", "\u{FFFD}"]);
        assert_eq!(pieces.concat(), tokenizer.decode(&ids).unwrap());
        // A stray continuation byte is final once a later byte shows it starts no character.
        let ids = [0x80, b'b' as u32, 0xE4, b'c' as u32];
        assert_eq!(stream(&tokenizer, &ids, &[]).0, ["", "\u{FFFD}b", "", "\u{FFFD}c", ""]);
    }

    #[test]
    fn stop_strings_cut_the_text_and_end_the_stream() {
        let tokenizer = byte_level_tokenizer();
        let ids = tokenizer.encode("Sure: 中文 world\nUser: hi").unwrap();
        let (pieces, stopped, consumed) = stream(&tokenizer, &ids, &["\nUser:"]);
        assert!(stopped);
        assert_eq!(pieces.concat(), "Sure: 中文 world");
        assert_eq!(tokenizer.decode(&ids[..consumed]).unwrap(), "Sure: 中文 world\nUser:");
        let (pieces, stopped, _) = stream(&tokenizer, &ids, &["文 w", "never"]);
        assert!(stopped);
        assert_eq!(pieces.concat(), "Sure: 中");
        // A stop string held back is released when the request ends for another reason.
        let (pieces, stopped, _) = stream(&tokenizer, &tokenizer.encode("ab\nUs").unwrap(), &["\nUser:"]);
        assert!(!stopped);
        assert_eq!(pieces, ["a", "b", "", "", "", "\nUs"]);
    }

    #[test]
    fn a_stop_string_can_complete_in_the_final_flush() {
        let tokenizer = byte_level_tokenizer();
        let mut stream = TextStream::new(tokenizer, ["x\u{FFFD}"]);
        assert_eq!(stream.push(b'x' as u32).unwrap().text, "");
        assert_eq!(stream.push(0xE4).unwrap(), StreamStep { text: String::new(), stopped: false });
        assert_eq!(stream.finish().unwrap(), "");
        assert!(stream.stopped());
        assert_eq!(stream.push(b'y' as u32).unwrap(), StreamStep { text: String::new(), stopped: true });
        assert_eq!(stream.finish().unwrap(), "");
    }

    proptest! {
        #[test]
        fn pieces_join_to_the_full_decode_cut_at_the_first_stop(
            // Mostly bytes of multi-byte characters, with merges, special and added tokens mixed in.
            ids in proptest::collection::vec(
                prop_oneof![0xE4u32..0xF1, 0x80u32..0xC0, 0x61u32..0x64, Just(0x20), 256u32..263], 0..40),
            stop_index in 0usize..4,
        ) {
            let tokenizer = byte_level_tokenizer();
            let stops: &[&str] = [&[][..], &["a"], &["b\u{FFFD}", "cc"], &["中", " "]][stop_index];
            let (pieces, stopped, consumed) = stream(&tokenizer, &ids, stops);
            let full = tokenizer.decode(&ids[..consumed]).unwrap();
            prop_assert_eq!(pieces.concat(), cut_at_first_stop(&full, stops));
            prop_assert_eq!(stopped, cut_at_first_stop(&full, stops) != full);
            // Before the flush, no piece ends in what could still be an unfinished character.
            let unfinished = pieces[..pieces.len() - 1].iter().any(|p| p.ends_with(char::REPLACEMENT_CHARACTER));
            prop_assert!(!stops.is_empty() || !unfinished, "{:?}", pieces);
        }
    }
}
