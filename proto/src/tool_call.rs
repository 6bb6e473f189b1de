//! Tool calls on the request socket (docs/protocol.md, "Tool calls"): what a `generate` offers the model
//! (`tools`, `tool_choice`, `parallel_tool_calls` in OpenAI's shapes) and the calls parsed from its output, which
//! `delta` and `final` carry.

use serde::{Deserialize, Serialize};

/// One call the model made, parsed from its output: `index` counts the sample's calls from 0, `id` is the
/// scheduler's (`call_` and 24 random letters and digits), `arguments` the JSON text of an object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub index: u32,
    pub id: String,
    pub name: String,
    pub arguments: String,
}
