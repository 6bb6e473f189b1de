//! A sample's output read for tool calls on its way to the client (both doors): the hub passes each piece of
//! text through, and sends on the content and the calls that closed (`text::tool_calls` does the parsing).
//! Every call gets its id here, once, so a stream's deltas and the final name it alike.

use super::openai::tools::ToolPlan;
use crate::text::{Piece, ToolCallParser, ToolFormat};
use proto::api::ToolCall;

pub struct ToolStream {
    parser: ToolCallParser,
    calls: Vec<ToolCall>,
    /// The state of the call ids' generator.
    ids: u64,
}

/// What a piece of output came to: its content, and the calls that closed in it.
pub type Filtered = (String, Vec<ToolCall>);

impl ToolStream {
    /// A stream for a request whose tools are parsed (`tool_choice` other than `"none"`); `seed` makes the
    /// call ids.
    pub fn new(plan: &ToolPlan, format: ToolFormat, seed: u64) -> Option<Self> {
        plan.parse.then(|| ToolStream {
            parser: ToolCallParser::new(format, plan.names.clone(), plan.parallel),
            calls: Vec::new(),
            ids: seed,
        })
    }

    pub fn push(&mut self, text: &str) -> Filtered {
        let pieces = self.parser.push(text);
        self.take(pieces)
    }

    /// The output ended: what was held back.
    pub fn finish(&mut self) -> Filtered {
        let pieces = self.parser.finish();
        self.take(pieces)
    }

    /// Every call so far, in order.
    pub fn into_calls(self) -> Vec<ToolCall> {
        self.calls
    }

    fn take(&mut self, pieces: Vec<Piece>) -> Filtered {
        let mut text = String::new();
        let mut new = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => text.push_str(&t),
                Piece::Call(c) => {
                    let call = ToolCall {
                        index: self.calls.len() as u32,
                        id: self.next_id(),
                        name: c.name,
                        arguments: c.arguments,
                    };
                    self.calls.push(call.clone());
                    new.push(call);
                }
            }
        }
        (text, new)
    }

    /// `call_` and 24 letters and digits, as OpenAI's ids look: unique within a request, and unpredictable
    /// enough that a client cannot mistake one request's call for another's.
    fn next_id(&mut self) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
        let mut id = String::with_capacity(29);
        id.push_str("call_");
        for _ in 0..24 {
            self.ids = self.ids.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.ids;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            id.push(ALPHABET[(z % ALPHABET.len() as u64) as usize] as char);
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::openai::tools::Forced;
    use serde_json::json;

    fn plan(parse: bool) -> ToolPlan {
        ToolPlan { template_tools: json!([]), names: vec!["f".into()], parse, parallel: true, forced: Forced::No }
    }

    #[test]
    fn calls_get_indices_and_distinct_ids_and_content_flows_through() {
        assert!(ToolStream::new(&plan(false), ToolFormat::Hermes, 1).is_none(), "tool_choice none: no parsing");
        let mut s = ToolStream::new(&plan(true), ToolFormat::Hermes, 1).unwrap();
        let (text, calls) = s.push("Hi\n<tool_call>{\"name\": \"f\", \"arguments\": {\"x\": 1}}</tool_call>");
        assert_eq!((text.as_str(), calls.len()), ("Hi", 1));
        let (text, calls) = s.push("<tool_call>{\"name\": \"f\"}</tool_call> ok");
        assert_eq!((text.as_str(), calls[0].index, calls[0].arguments.as_str()), ("ok", 1, "{}"));
        assert_eq!(s.finish(), (String::new(), vec![]));
        let all = s.into_calls();
        assert_eq!(all.len(), 2);
        assert!(all.iter().all(|c| c.id.len() == 29 && c.id.starts_with("call_")));
        assert_ne!(all[0].id, all[1].id);
        let other = ToolStream::new(&plan(true), ToolFormat::Hermes, 2).unwrap().next_id();
        assert_ne!(other, all[0].id, "another seed, other ids");
    }
}
