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
    pub fn new<S: AsRef<str>>(tokenizer: Arc<Tokenizer>, stop_strings: &[S]) -> Self {
        Self {
            decoder: IncrementalDecoder::new(tokenizer),
            stops: StopMatcher::new(stop_strings),
            text: String::new(),
            finished: false,
        }
    }

    /// Adds one id. Once `stopped` has been reported, the request is over and later ids give nothing.
    pub fn push(&mut self, id: u32) -> Result<StreamStep> {
        if self.stops.is_stopped() || self.finished {
            return Ok(StreamStep { text: String::new(), stopped: self.stops.is_stopped() });
        }
        let decoded = self.decoder.push(id)?;
        Ok(self.give_out(self.stops.push(&decoded)))
    }

    /// Ends the stream (the request finished for another reason than a stop string, or did stop): gives out
    /// what was held back. A stop string can still complete here, in text held back for an unfinished
    /// character. Later calls give nothing.
    pub fn finish(&mut self) -> Result<StreamStep> {
        if self.finished || self.stops.is_stopped() {
            self.finished = true;
            return Ok(StreamStep { text: String::new(), stopped: self.stops.is_stopped() });
        }
        self.finished = true;
        let decoded = self.decoder.flush()?;
        let mut step = self.stops.push(&decoded);
        if !step.stopped {
            step.text.push_str(&self.stops.finish().text);
        }
        Ok(self.give_out(step))
    }

    pub fn is_stopped(&self) -> bool {
        self.stops.is_stopped()
    }

    /// All text given out so far: the request's text once finished.
    pub fn text(&self) -> &str {
        &self.text
    }

    fn give_out(&mut self, step: StreamStep) -> StreamStep {
        self.text.push_str(&step.text);
        step
    }
}
