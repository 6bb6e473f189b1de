/// Finds stop strings in text that arrives in pieces, and holds back text that a stop string could still claim.
///
/// Invariant: the text given out so far, followed by the text held, is everything pushed; the held text is the
/// longest tail of it that is the start of some stop string, so a stop string that completes later cannot have
/// begun in text already given out.
#[derive(Debug, Clone)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

/// What one step of a text stream gives out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStep {
    /// Text that is now final; empty while everything new is held back.
    pub text: String,
    /// A stop string was completed: `text` ends right before it, and nothing more will come.
    pub stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings are ignored: they would stop before the first character.
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Self {
        let stops = stops.into_iter().map(Into::into).filter(|s: &String| !s.is_empty()).collect();
        Self { stops, held: String::new(), stopped: false }
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds text; gives out what no stop string can claim any more, or, when a stop string is now complete, the
    /// text before its earliest occurrence. After a stop, pushes give out nothing.
    pub fn push(&mut self, text: &str) -> StreamStep {
        if self.stopped {
            return StreamStep { text: String::new(), stopped: true };
        }
        if self.stops.is_empty() {
            return StreamStep { text: text.to_string(), stopped: false };
        }
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|stop| self.held.find(stop.as_str())).min() {
            self.held.truncate(at);
            self.stopped = true;
            return StreamStep { text: std::mem::take(&mut self.held), stopped: true };
        }
        let keep = self.longest_stop_start_at_end();
        let rest = self.held.split_off(self.held.len() - keep);
        StreamStep { text: std::mem::replace(&mut self.held, rest), stopped: false }
    }

    /// The stream ended: what was held is final (nothing is held after a stop).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Length of the longest tail of the held text that is a proper start of some stop string.
    fn longest_stop_start_at_end(&self) -> usize {
        let held = self.held.as_str();
        let mut best = 0;
        for stop in &self.stops {
            // A proper start: a whole stop string there would have been found above.
            let longest = (stop.len() - 1).min(held.len());
            for len in (best + 1..=longest).rev() {
                if stop.is_char_boundary(len) && held.ends_with(&stop[..len]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// What a request's text must be: everything, cut before the earliest occurrence of any stop string.
    fn cut_at_first_stop(text: &str, stops: &[String]) -> (String, bool) {
        match stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min() {
            Some(at) => (text[..at].to_string(), true),
            None => (text.to_string(), false),
        }
    }

    fn run(pieces: &[&str], stops: &[&str]) -> (Vec<String>, bool) {
        let mut matcher = StopMatcher::new(stops.iter().copied());
        let mut out = Vec::new();
        for piece in pieces {
            let step = matcher.push(piece);
            out.push(step.text);
            if step.stopped {
                return (out, true);
            }
        }
        out.push(matcher.finish());
        (out, false)
    }

    #[test]
    fn holds_a_possible_stop_and_releases_it_when_it_fails() {
        let (out, stopped) = run(&["Hello ", "wor", "ld", "!"], &["world!!"]);
        assert_eq!(out, ["Hello ", "", "", "", "world!"]);
        assert!(!stopped);
    }

    #[test]
    fn stops_before_a_stop_string_split_across_pieces() {
        let (out, stopped) = run(&["The answer", " is 4", "2.\n\nUs", "er: more"], &["\n\nUser:"]);
        assert_eq!(out.concat(), "The answer is 42.");
        assert_eq!(out, ["The answer", " is 4", "2.", ""]);
        assert!(stopped);
    }

    #[test]
    fn earliest_occurrence_wins_among_several_stops() {
        let (out, stopped) = run(&["xxabcd"], &["cd", "abc"]);
        assert_eq!(out.concat(), "xx");
        assert!(stopped);
        let (out, _) = run(&["a", "b", "c", "d"], &["abcd", "bc"]);
        assert_eq!(out.concat(), "a", "bc completes first; abcd would only complete a token later");
    }

    #[test]
    fn multibyte_stops_and_no_stops() {
        let (out, stopped) = run(&["你好", "，世", "界"], &["世界"]);
        assert_eq!(out, ["你好", "，", ""]);
        assert!(stopped);
        let (out, stopped) = run(&["a", "", "b"], &[]);
        assert_eq!(out, ["a", "", "b", ""]);
        assert!(!stopped);
        let (out, _) = run(&["ab"], &[""]);
        assert_eq!(out.concat(), "ab");
    }

    #[test]
    fn pushes_after_a_stop_give_nothing() {
        let mut matcher = StopMatcher::new(["x"]);
        assert!(matcher.push("ax").stopped);
        assert_eq!(matcher.push("more"), StreamStep { text: String::new(), stopped: true });
        assert_eq!(matcher.finish(), "");
        assert!(matcher.stopped());
    }

    fn text_from(alphabet: &'static [&'static str], max: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(proptest::sample::select(alphabet), 0..max).prop_map(|parts| parts.concat())
    }

    const ALPHABET: &[&str] = &["a", "b", "\n", "中", "🙂", "é"];

    proptest! {
        #[test]
        fn emitted_text_is_the_consumed_text_cut_at_the_first_stop(
            text in text_from(ALPHABET, 40),
            stops in proptest::collection::vec(text_from(ALPHABET, 4), 0..4),
            cuts in proptest::collection::vec(any::<proptest::sample::Index>(), 0..12),
        ) {
            let boundaries: Vec<usize> = (0..=text.len()).filter(|i| text.is_char_boundary(*i)).collect();
            let mut cuts: Vec<usize> = cuts.iter().map(|c| boundaries[c.index(boundaries.len())]).collect();
            cuts.extend([0, text.len()]);
            cuts.sort_unstable();
            let pieces: Vec<&str> = cuts.windows(2).map(|w| &text[w[0]..w[1]]).collect();

            let mut matcher = StopMatcher::new(stops.clone());
            let mut emitted = String::new();
            let mut consumed = String::new();
            let mut stopped = false;
            for piece in &pieces {
                let before = cut_at_first_stop(&consumed, &stops);
                prop_assert!(!before.1);
                consumed.push_str(piece);
                let step = matcher.push(piece);
                emitted.push_str(&step.text);
                // Never give out text that the rest of the stream could still take back.
                prop_assert!(cut_at_first_stop(&consumed, &stops).0.starts_with(&emitted));
                if step.stopped {
                    stopped = true;
                    break;
                }
            }
            if !stopped {
                emitted.push_str(&matcher.finish());
            }
            prop_assert_eq!((emitted, stopped), cut_at_first_stop(&consumed, &stops));
        }
    }
}
