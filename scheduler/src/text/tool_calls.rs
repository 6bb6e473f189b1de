//! Tool calls in a model's output, parsed back into calls: as a whole (a final) or piece by piece (a stream),
//! with the same result whatever pieces the text comes in.
//!
//! Models write calls in their family's format, which their chat template teaches them:
//!
//! - [`ToolFormat::Hermes`] (Qwen2.5, Qwen3, Hermes and most templates with a `<tool_call>` block): each call is
//!   `<tool_call>\n{"name": "f", "arguments": {...}}\n</tool_call>`, several in a row for parallel calls.
//! - [`ToolFormat::Llama3Json`] (Llama 3.1, 3.2): the answer is a JSON object `{"name": "f", "parameters": {...}}`,
//!   after `<|python_tag|>` when special tokens are kept; several are separated by `;`.
//!
//! In both formats a bare JSON object that names a tool (`{"name": ..., "arguments"|"parameters": {...}}`) where
//! a call may start (at the start of the output, or right after a call) is a call too: small models often leave
//! the tags out. Whatever is not a call is content. A block that does not parse as JSON, names no tool of the
//! request, or has keys a call does not have stays content, markup included: the client then sees what the
//! model wrote instead of losing it. Whitespace (and Llama's `;`) between calls, right before a call and right
//! after one is dropped; all other text is kept as written.
//!
//! Streaming holds back what may still become a call: a trailing run of whitespace, a partial `<tool_call>`, and
//! a whole call until it closes (its JSON must parse before it is known to be a call), so a call's arguments come
//! in one piece when it ends. Text before it has gone out already.

use serde_json::{Map, Value};

/// How a model writes its tool calls; chosen from its chat template ([`ToolFormat::detect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (Qwen2.5, Qwen3, Hermes).
    Hermes,
    /// A JSON object `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>` (Llama 3.1, 3.2).
    Llama3Json,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolFormat {
    /// The format a chat template teaches: the tags it shows the model win; Llama's `<|python_tag|>` or its
    /// `ipython` role mean Llama's JSON; anything else gets the Hermes format, the most common one (its bare
    /// JSON form is Llama's too).
    pub fn detect(template: &str) -> ToolFormat {
        if template.contains(OPEN) {
            ToolFormat::Hermes
        } else if template.contains(PYTHON_TAG) || template.contains("ipython") {
            ToolFormat::Llama3Json
        } else {
            ToolFormat::Hermes
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ToolFormat::Hermes => "hermes",
            ToolFormat::Llama3Json => "llama3_json",
        }
    }

    /// The text that opens a call anywhere in the output (not only where a bare JSON call may start).
    fn marker(self) -> &'static str {
        match self {
            ToolFormat::Hermes => OPEN,
            ToolFormat::Llama3Json => PYTHON_TAG,
        }
    }
}

/// A call as the model wrote it: a tool's name and its arguments as JSON text (an object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedCall {
    pub name: String,
    pub arguments: String,
}

/// What a piece of output comes to: content, or a whole call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Call(ParsedCall),
}

#[derive(Clone, Debug)]
enum Mode {
    /// Plain text; `at_call` while nothing but whitespace came since the start or the last call.
    Text,
    /// Inside `<tool_call>`: the buffer's first `lead` bytes are the whitespace before the tag and the tag.
    Tagged { lead: usize },
    /// A JSON object that began where a call may start, after `lead` bytes of whitespace (and separators).
    Json { lead: usize, scan: JsonScan },
}

/// Where the end of a JSON object is, found incrementally: the buffer only grows while it is scanned.
#[derive(Clone, Debug, Default)]
struct JsonScan {
    pos: usize,
    depth: u32,
    in_string: bool,
    escaped: bool,
}

impl JsonScan {
    /// The end (exclusive) of the object that starts at `text[0]`, once it is there.
    fn end(&mut self, text: &str) -> Option<usize> {
        let bytes = text.as_bytes();
        while self.pos < bytes.len() {
            let b = bytes[self.pos];
            self.pos += 1;
            if self.in_string {
                match b {
                    _ if self.escaped => self.escaped = false,
                    b'\\' => self.escaped = true,
                    b'"' => self.in_string = false,
                    _ => {}
                }
                continue;
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        return Some(self.pos);
                    }
                }
                _ => {}
            }
        }
        None
    }
}

/// Parses one sample's output as it comes: [`push`](Self::push) each piece of text, then
/// [`finish`](Self::finish). The pieces it returns, concatenated, are the same however the text was split.
#[derive(Clone, Debug)]
pub struct ToolCallParser {
    format: ToolFormat,
    names: Vec<String>,
    parallel: bool,
    /// Text received and not decided yet.
    buf: String,
    mode: Mode,
    at_call: bool,
    calls: usize,
}

impl ToolCallParser {
    /// A parser for calls of the tools `names`; with `parallel` false only the first call is returned and later
    /// ones are dropped (the request asked for at most one).
    pub fn new(format: ToolFormat, names: Vec<String>, parallel: bool) -> Self {
        ToolCallParser { format, names, parallel, buf: String::new(), mode: Mode::Text, at_call: true, calls: 0 }
    }

    /// What `text` decides, given what came before.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        self.drain(false, &mut out);
        out
    }

    /// The output has ended: everything still held back is decided.
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        self.drain(true, &mut out);
        out
    }

    /// A whole output: its content (the text outside calls) and its calls.
    pub fn parse(mut self, text: &str) -> (String, Vec<ParsedCall>) {
        let mut pieces = self.push(text);
        pieces.extend(self.finish());
        split_pieces(pieces)
    }

    fn emit_text(out: &mut Vec<Piece>, text: &str) {
        if text.is_empty() {
            return;
        }
        match out.last_mut() {
            Some(Piece::Text(t)) => t.push_str(text),
            _ => out.push(Piece::Text(text.to_owned())),
        }
    }

    /// Takes the first `n` bytes of the buffer.
    fn take(&mut self, n: usize) -> String {
        let rest = self.buf.split_off(n);
        std::mem::replace(&mut self.buf, rest)
    }

    /// A call ends the buffer's first `n` bytes: it is returned (unless a second call of a request that asked
    /// for one), and a call may start right after it.
    fn call(&mut self, n: usize, call: ParsedCall, out: &mut Vec<Piece>) {
        self.take(n);
        if self.parallel || self.calls == 0 {
            out.push(Piece::Call(call));
        }
        self.calls += 1;
        self.at_call = true;
        self.mode = Mode::Text;
    }

    /// The buffer's first `n` bytes were not a call after all: they are content.
    fn not_a_call(&mut self, n: usize, out: &mut Vec<Piece>) {
        let text = self.take(n);
        Self::emit_text(out, &text);
        self.at_call = false;
        self.mode = Mode::Text;
    }

    fn drain(&mut self, end: bool, out: &mut Vec<Piece>) {
        loop {
            let progressed = match self.mode.clone() {
                Mode::Text if self.at_call => self.at_call_position(end, out),
                Mode::Text => self.in_text(end, out),
                Mode::Tagged { lead } => self.in_tag(lead, end, out),
                Mode::Json { lead, scan } => self.in_json(lead, scan, end, out),
            };
            if !progressed {
                return;
            }
        }
    }

    /// Where a call may start: whitespace (and, after a call, Llama's `;`) is skipped; a JSON object, a
    /// `<tool_call>` or a `<|python_tag|>` may follow. Returns whether it decided anything.
    fn at_call_position(&mut self, end: bool, out: &mut Vec<Piece>) -> bool {
        let after_call = self.calls > 0;
        let mut lead =
            self.buf.len() - self.buf.trim_start_matches(|c: char| c.is_whitespace() || (after_call && c == ';')).len();
        if after_call {
            // Whatever follows, the space after a call is not content.
            self.take(lead);
            lead = 0;
        }
        let rest = &self.buf[lead..];
        if rest.is_empty() {
            if end {
                // An output of nothing but whitespace is content.
                let text = self.take(self.buf.len());
                Self::emit_text(out, &text);
            }
            return false;
        }
        let marker = self.format.marker();
        if rest.starts_with('{') {
            self.mode = Mode::Json { lead, scan: JsonScan::default() };
            return true;
        }
        if rest.starts_with(marker) {
            return self.marker_at(lead);
        }
        if marker.starts_with(rest) && !end {
            return false; // maybe a marker still
        }
        self.at_call = false;
        true
    }

    /// A marker begins `lead` bytes into the buffer, after whitespace: `<tool_call>` opens a block;
    /// `<|python_tag|>` (a special token, dropped from the content) says a JSON call follows.
    fn marker_at(&mut self, lead: usize) -> bool {
        match self.format {
            ToolFormat::Hermes => self.mode = Mode::Tagged { lead: lead + OPEN.len() },
            ToolFormat::Llama3Json => {
                self.take(lead + PYTHON_TAG.len());
                self.at_call = true;
                self.mode = Mode::Text;
            }
        }
        true
    }

    /// Plain text: everything up to a marker goes out, but for trailing whitespace and a partial marker, which
    /// may still be part of a call.
    fn in_text(&mut self, end: bool, out: &mut Vec<Piece>) -> bool {
        let marker = self.format.marker();
        if let Some(at) = self.buf.find(marker) {
            let lead = at - trailing_whitespace(&self.buf[..at]);
            let text = self.take(lead);
            Self::emit_text(out, &text);
            return self.marker_at(at - lead);
        }
        if end {
            let text = self.take(self.buf.len());
            Self::emit_text(out, &text);
            return false;
        }
        let partial = partial_suffix(&self.buf, marker);
        let keep = partial + trailing_whitespace(&self.buf[..self.buf.len() - partial]);
        let text = self.take(self.buf.len() - keep);
        Self::emit_text(out, &text);
        false
    }

    /// Inside `<tool_call>`: waits for `</tool_call>` (or another `<tool_call>`, or the end: a model may leave a
    /// block unclosed), then parses what is between.
    fn in_tag(&mut self, lead: usize, end: bool, out: &mut Vec<Piece>) -> bool {
        let body = &self.buf[lead..];
        let close = body.find(CLOSE);
        let reopen = body.find(OPEN);
        let (body_end, consumed) = match (close, reopen) {
            (Some(c), Some(o)) if o < c => (o, o),
            (Some(c), _) => (c, c + CLOSE.len()),
            (None, Some(o)) => (o, o),
            (None, None) if end => (body.len(), body.len()),
            (None, None) => return false,
        };
        match self.parse_call(body[..body_end].trim()) {
            Some(call) => self.call(lead + consumed, call, out),
            None => self.not_a_call(lead + consumed, out),
        }
        true
    }

    /// A JSON object where a call may start: waits for its end, then parses it.
    fn in_json(&mut self, lead: usize, mut scan: JsonScan, end: bool, out: &mut Vec<Piece>) -> bool {
        let Some(len) = scan.end(&self.buf[lead..]) else {
            if end {
                self.not_a_call(self.buf.len(), out);
                return false;
            }
            self.mode = Mode::Json { lead, scan };
            return false;
        };
        match self.parse_call(&self.buf[lead..lead + len]) {
            Some(call) => self.call(lead + len, call, out),
            None => self.not_a_call(lead + len, out),
        }
        true
    }

    /// A call, if `json` is an object naming one of the tools, with arguments that are an object (or a string
    /// holding one), and no key a call does not have.
    fn parse_call(&self, json: &str) -> Option<ParsedCall> {
        let Ok(Value::Object(call)) = serde_json::from_str::<Value>(json) else { return None };
        let name = call.get("name")?.as_str()?;
        if !self.names.iter().any(|n| n == name) {
            return None;
        }
        if call.keys().any(|k| !matches!(k.as_str(), "name" | "arguments" | "parameters" | "type")) {
            return None;
        }
        if call.get("type").is_some_and(|t| t != "function") {
            return None;
        }
        let arguments = match call.get("arguments").or_else(|| call.get("parameters")) {
            None => Map::new(),
            Some(Value::Object(args)) => args.clone(),
            Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
                Ok(Value::Object(args)) => args,
                _ => return None,
            },
            Some(_) => return None,
        };
        let arguments = serde_json::to_string(&arguments).expect("a JSON map always serializes");
        Some(ParsedCall { name: name.to_owned(), arguments })
    }
}

/// Pieces in output order, as (the text outside calls, the calls).
fn split_pieces(pieces: Vec<Piece>) -> (String, Vec<ParsedCall>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Text(t) => content.push_str(&t),
            Piece::Call(c) => calls.push(c),
        }
    }
    (content, calls)
}

fn trailing_whitespace(text: &str) -> usize {
    text.len() - text.trim_end().len()
}

/// The length of the longest end of `text` that is a proper beginning of `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names() -> Vec<String> {
        vec!["get_weather".into(), "search".into()]
    }

    fn parse(format: ToolFormat, text: &str) -> (String, Vec<ParsedCall>) {
        ToolCallParser::new(format, names(), true).parse(text)
    }

    fn call(name: &str, arguments: &str) -> ParsedCall {
        ParsedCall { name: name.into(), arguments: arguments.into() }
    }

    #[test]
    fn formats_are_told_by_the_template() {
        assert_eq!(ToolFormat::detect("{{- '<tool_call>\\n' }}"), ToolFormat::Hermes);
        assert_eq!(ToolFormat::detect("{%- if message.role == 'ipython' %}"), ToolFormat::Llama3Json);
        assert_eq!(ToolFormat::detect("<|python_tag|>"), ToolFormat::Llama3Json);
        assert_eq!(ToolFormat::detect("{{ messages }}"), ToolFormat::Hermes);
    }

    #[test]
    fn qwen_calls_are_parsed_and_the_text_around_them_is_content() {
        let out = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"c\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"search\", \"arguments\": {\"q\": \"中\"}}\n</tool_call>";
        let (content, calls) = parse(ToolFormat::Hermes, out);
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            [call("get_weather", r#"{"city":"Paris","unit":"c"}"#), call("search", r#"{"q":"中"}"#)],
            "arguments keep their order"
        );
    }

    #[test]
    fn llama_calls_with_parameters_and_the_python_tag() {
        let (content, calls) = parse(
            ToolFormat::Llama3Json,
            "<|python_tag|>{\"name\": \"get_weather\", \"parameters\": {\"city\": \"Oslo\"}}; {\"name\": \"search\", \"parameters\": {}}",
        );
        assert_eq!(content, "");
        assert_eq!(calls, [call("get_weather", r#"{"city":"Oslo"}"#), call("search", "{}")]);
        let (content, calls) =
            parse(ToolFormat::Llama3Json, " {\"name\": \"search\", \"arguments\": \"{\\\"q\\\": 1}\"}");
        assert_eq!((content.as_str(), calls), ("", vec![call("search", r#"{"q":1}"#)]), "arguments as a string");
    }

    #[test]
    fn a_bare_json_call_counts_where_a_call_may_start() {
        let (content, calls) = parse(ToolFormat::Hermes, "{\"name\": \"search\", \"arguments\": {\"q\": \"x\"}}");
        assert_eq!((content.as_str(), calls), ("", vec![call("search", r#"{"q":"x"}"#)]));
        let text = "Here: {\"name\": \"search\", \"arguments\": {}}";
        assert_eq!(parse(ToolFormat::Hermes, text), (text.to_string(), vec![]), "not after text");
    }

    #[test]
    fn what_is_not_a_call_stays_content() {
        for text in [
            "<tool_call>\n{\"name\": \"unknown\", \"arguments\": {}}\n</tool_call>",
            "<tool_call>\n{\"name\": \"search\", \"arguments\": {\n</tool_call>",
            "<tool_call>\n{\"name\": \"search\", \"arguments\": [1]}\n</tool_call>",
            "<tool_call>\n{\"name\": \"search\", \"arguments\": {}, \"extra\": 1}\n</tool_call>",
            "{\"name\": \"Ana\", \"age\": 3}",
            "{\"a\": 1",
            "Plain text with <tool_ca",
            "   ",
            "x <tool_call> never closed",
        ] {
            assert_eq!(parse(ToolFormat::Hermes, text), (text.to_string(), vec![]), "{text:?}");
        }
        let (content, calls) = parse(
            ToolFormat::Hermes,
            "A\n<tool_call>\n{\"name\": \"nope\"}\n</tool_call>\n<tool_call>{\"name\": \"search\"}</tool_call>",
        );
        assert_eq!(content, "A\n<tool_call>\n{\"name\": \"nope\"}\n</tool_call>", "only the good call's space goes");
        assert_eq!(calls, [call("search", "{}")]);
    }

    #[test]
    fn unclosed_and_run_on_blocks() {
        let (content, calls) = parse(ToolFormat::Hermes, "<tool_call>\n{\"name\": \"search\", \"arguments\": {}}\n");
        assert_eq!((content.as_str(), calls), ("", vec![call("search", "{}")]), "the end closes a block");
        let (content, calls) = parse(
            ToolFormat::Hermes,
            "<tool_call>{\"name\": \"search\", \"arguments\": {}}<tool_call>{\"name\": \"get_weather\"}</tool_call>",
        );
        assert_eq!(content, "");
        assert_eq!(calls, [call("search", "{}"), call("get_weather", "{}")]);
    }

    #[test]
    fn text_after_a_call_is_content_without_the_space_between() {
        let (content, calls) =
            parse(ToolFormat::Hermes, "<tool_call>\n{\"name\": \"search\"}\n</tool_call>\n\nDone.  ");
        assert_eq!((content.as_str(), calls.len()), ("Done.  ", 1));
    }

    #[test]
    fn without_parallel_calls_only_the_first_is_returned() {
        let text = "<tool_call>{\"name\": \"search\"}</tool_call>\n<tool_call>{\"name\": \"get_weather\"}</tool_call>";
        let (content, calls) = ToolCallParser::new(ToolFormat::Hermes, names(), false).parse(text);
        assert_eq!((content.as_str(), calls), ("", vec![call("search", "{}")]));
    }

    #[test]
    fn streaming_holds_back_only_what_may_become_a_call() {
        let mut p = ToolCallParser::new(ToolFormat::Hermes, names(), true);
        assert_eq!(p.push("Hello"), [Piece::Text("Hello".into())]);
        assert_eq!(p.push(" wor"), [Piece::Text(" wor".into())]);
        assert_eq!(p.push("ld\n<tool"), [Piece::Text("ld".into())], "the space and a partial tag wait");
        assert_eq!(p.push("_call>\n{\"name\": \"search\", "), []);
        assert_eq!(p.push("\"arguments\": {}}\n</tool_call>"), [Piece::Call(call("search", "{}"))]);
        assert_eq!(p.push(" <tool_cal"), []);
        assert_eq!(p.push("x"), [Piece::Text("<tool_calx".into())], "the space after a call is dropped");
        assert_eq!(p.finish(), []);
    }

    /// Texts built from pieces that exercise every state: calls in both forms, broken ones, markers, JSON.
    fn segment() -> impl Strategy<Value = String> {
        let args = prop_oneof![Just("{}"), Just("{\"city\": \"Paris\"}"), Just("{\"q\": \"a}\\\"{\", \"n\": [1, {}]}")];
        prop_oneof![
            "[a-z .,;\n{}<>\"/_]{0,12}",
            "[ \n]{1,3}",
            (prop_oneof![Just("search"), Just("get_weather"), Just("other")], args.clone())
                .prop_map(|(n, a)| format!("<tool_call>\n{{\"name\": \"{n}\", \"arguments\": {a}}}\n</tool_call>")),
            args.clone().prop_map(|a| format!("{{\"name\": \"search\", \"arguments\": {a}}}")),
            args.prop_map(|a| format!("<|python_tag|>{{\"name\": \"get_weather\", \"parameters\": {a}}}")),
            Just("<tool_call>".to_string()),
            Just("</tool_call>".to_string()),
            Just("<tool_".to_string()),
            Just("中文".to_string()),
        ]
    }

    fn chunked(text: &str, cuts: &[usize]) -> Vec<String> {
        let mut bounds: Vec<usize> = cuts.iter().map(|&c| c % (text.len() + 1)).collect();
        bounds.retain(|&b| text.is_char_boundary(b));
        bounds.sort_unstable();
        bounds.dedup();
        let mut pieces = Vec::new();
        let mut at = 0;
        for b in bounds.into_iter().chain([text.len()]) {
            pieces.push(text[at..b].to_string());
            at = b;
        }
        pieces
    }

    proptest! {
        #[test]
        fn any_split_gives_the_whole_texts_result(
            segments in proptest::collection::vec(segment(), 0..8),
            cuts in proptest::collection::vec(0usize..400, 0..12),
            llama in any::<bool>(),
            parallel in any::<bool>(),
        ) {
            let format = if llama { ToolFormat::Llama3Json } else { ToolFormat::Hermes };
            let text: String = segments.concat();
            let whole = ToolCallParser::new(format, names(), parallel).parse(&text);
            let mut p = ToolCallParser::new(format, names(), parallel);
            let mut pieces = Vec::new();
            for chunk in chunked(&text, &cuts) {
                pieces.extend(p.push(&chunk));
            }
            pieces.extend(p.finish());
            prop_assert_eq!(split_pieces(pieces), whole);
        }

        #[test]
        fn rendered_calls_parse_back(
            before in "[A-Za-z][a-z ,.]{0,20}",
            calls in proptest::collection::vec((prop_oneof![Just("search"), Just("get_weather")],
                proptest::collection::btree_map("[a-z]{1,5}", "[a-z \"\\\\{}<>中]{0,8}", 0..4)), 0..4),
        ) {
            let mut text = before.clone();
            let mut want = Vec::new();
            for (name, args) in &calls {
                let args: Map<String, Value> = args.iter().map(|(k, v)| (k.clone(), Value::from(v.clone()))).collect();
                let args = serde_json::to_string(&args).unwrap();
                text.push_str(&format!("\n<tool_call>\n{{\"name\": \"{name}\", \"arguments\": {args}}}\n</tool_call>"));
                want.push(call(name, &args));
            }
            let (content, got) = parse(ToolFormat::Hermes, &text);
            let expected_content = if calls.is_empty() { before.clone() } else { before.trim_end().to_string() };
            prop_assert_eq!(content, expected_content);
            prop_assert_eq!(got, want);
        }
    }
}
