//! Chat messages, checked and normalised before a chat template sees them, for both doors and `/tokenize`.
//!
//! A template renders whatever it is given: a message without content made Qwen's fail with an internal error
//! ("tried to use + operator on unsupported types string and undefined"), and a role it has no branch for was
//! silently left out of the prompt. Here each message gets a role the templates know and string content, or
//! the request is refused with the offending field named (`messages[2].role`).

use serde_json::{Map, Value};

/// The roles OpenAI's chat API defines and chat templates render.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Why a message is refused: the field (OpenAI's `param`) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadMessage {
    pub param: String,
    pub message: String,
}

fn bad(param: String, message: String) -> BadMessage {
    BadMessage { param, message }
}

/// The messages as templates read them: content given as text parts joined into one string, an assistant
/// message with tool calls and no content given empty content, each tool call's `arguments` (a JSON string in
/// OpenAI's format) parsed into the object templates render. Other keys (`name`, `tool_call_id`, and any a
/// template reads) pass through unchanged.
pub fn normalize(messages: &[Value]) -> Result<Vec<Value>, BadMessage> {
    if messages.is_empty() {
        return Err(bad("messages".into(), "messages must not be empty".into()));
    }
    messages.iter().enumerate().map(|(i, m)| normalize_one(i, m)).collect()
}

fn normalize_one(i: usize, message: &Value) -> Result<Value, BadMessage> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let Value::Object(m) = message else {
        return Err(bad(format!("messages[{i}]"), format!("messages[{i}] must be an object")));
    };
    let role = match m.get("role") {
        Some(Value::String(role)) if ROLES.contains(&role.as_str()) => role.as_str(),
        Some(Value::String(role)) => {
            let message = format!("{} must be one of {}, got {role:?}", at("role"), ROLES.join(", "));
            return Err(bad(at("role"), message));
        }
        None | Some(Value::Null) => return Err(bad(at("role"), format!("{} is required", at("role")))),
        Some(_) => return Err(bad(at("role"), format!("{} must be a string", at("role")))),
    };
    let tool_calls = match m.get("tool_calls") {
        None | Some(Value::Null) => None,
        Some(Value::Array(calls)) if role == "assistant" => Some(tool_calls_of(i, calls)?),
        Some(Value::Array(_)) => {
            return Err(bad(at("tool_calls"), format!("{} is only for assistant messages", at("tool_calls"))));
        }
        Some(_) => return Err(bad(at("tool_calls"), format!("{} must be an array", at("tool_calls")))),
    };
    for key in ["name", "tool_call_id"] {
        if m.get(key).is_some_and(|v| !v.is_string() && !v.is_null()) {
            return Err(bad(at(key), format!("{} must be a string", at(key))));
        }
    }
    // A tool's result answers one call: without the id, a client's several results cannot be told apart.
    if role == "tool" && m.get("tool_call_id").is_none_or(Value::is_null) {
        let message = format!("{} is required (messages[{i}] is a tool message)", at("tool_call_id"));
        return Err(bad(at("tool_call_id"), message));
    }
    let content = match m.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => text_of_parts(i, parts)?,
        None | Some(Value::Null) if tool_calls.as_ref().is_some_and(|c| !c.is_empty()) => String::new(),
        None | Some(Value::Null) => {
            let message = format!("{} is required (messages[{i}] is a {role} message)", at("content"));
            return Err(bad(at("content"), message));
        }
        Some(_) => {
            let message = format!("{} must be a string or an array of text parts", at("content"));
            return Err(bad(at("content"), message));
        }
    };
    let mut out: Map<String, Value> = m.clone();
    out.insert("content".into(), Value::String(content));
    if let Some(calls) = tool_calls {
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    Ok(Value::Object(out))
}

/// An assistant message's tool calls, in OpenAI's shape (`{id?, type?: "function", function: {name,
/// arguments}}`), with each call's `arguments` as an object: OpenAI sends the JSON as a string, and templates
/// render it with `tojson`, which would quote it again.
fn tool_calls_of(i: usize, calls: &[Value]) -> Result<Vec<Value>, BadMessage> {
    let mut out = Vec::with_capacity(calls.len());
    for (j, call) in calls.iter().enumerate() {
        let at = |field: &str| format!("messages[{i}].tool_calls[{j}]{field}");
        let Value::Object(call) = call else {
            return Err(bad(at(""), format!("{} must be an object", at(""))));
        };
        if call.get("type").is_some_and(|t| t != "function" && !t.is_null()) {
            return Err(bad(at(".type"), format!("{} must be \"function\"", at(".type"))));
        }
        if call.get("id").is_some_and(|v| !v.is_string() && !v.is_null()) {
            return Err(bad(at(".id"), format!("{} must be a string", at(".id"))));
        }
        let Some(Value::Object(function)) = call.get("function") else {
            return Err(bad(at(".function"), format!("{} must be an object with name and arguments", at(".function"))));
        };
        if !function.get("name").is_some_and(Value::is_string) {
            return Err(bad(at(".function.name"), format!("{} must be a string", at(".function.name"))));
        }
        let arguments = match function.get("arguments") {
            Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
                Ok(args @ Value::Object(_)) => args,
                _ => {
                    let param = at(".function.arguments");
                    return Err(bad(
                        param.clone(),
                        format!("{param} must be the JSON text of an object, got {text:?}"),
                    ));
                }
            },
            Some(args @ Value::Object(_)) => args.clone(),
            None | Some(Value::Null) => Value::Object(Map::new()),
            Some(_) => {
                let param = at(".function.arguments");
                return Err(bad(param.clone(), format!("{param} must be a string (JSON) or an object")));
            }
        };
        let mut call = call.clone();
        let mut function = function.clone();
        function.insert("arguments".into(), arguments);
        call.insert("function".into(), Value::Object(function));
        out.push(Value::Object(call));
    }
    Ok(out)
}

/// Text parts (`{type: "text", text}`), joined; templates read content as one string.
fn text_of_parts(i: usize, parts: &[Value]) -> Result<String, BadMessage> {
    let mut text = String::new();
    for (j, part) in parts.iter().enumerate() {
        let at = format!("messages[{i}].content[{j}]");
        match (part.get("type").and_then(Value::as_str), part.get("text")) {
            (Some("text"), Some(Value::String(t))) => text.push_str(t),
            (Some("text"), _) => return Err(bad(format!("{at}.text"), format!("{at}.text must be a string"))),
            (Some(other), _) => {
                let message = format!("{at}: only text content parts are supported, got {other:?}");
                return Err(bad(format!("{at}.type"), message));
            }
            (None, _) => return Err(bad(format!("{at}.type"), format!("{at} must be an object with a type"))),
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn refusal(messages: Value) -> (String, String) {
        let e = normalize(messages.as_array().unwrap()).expect_err("refused");
        (e.param, e.message)
    }

    #[test]
    fn text_parts_are_joined_and_other_keys_pass_through() {
        let messages = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}], "name": "ana"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"b\": 1, \"a\": [2]}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ]);
        let out = normalize(messages.as_array().unwrap()).unwrap();
        assert_eq!(out[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(out[1], json!({"role": "user", "content": "Hi there", "name": "ana"}));
        assert_eq!(out[2]["content"], "", "tool calls stand in for the content");
        assert_eq!(
            out[2]["tool_calls"],
            json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {"b": 1, "a": [2]}}}]),
            "arguments parsed for the template, key order kept"
        );
        let keys: Vec<&String> = out[2]["tool_calls"][0]["function"]["arguments"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["b", "a"]);
        assert_eq!(out[3], json!({"role": "tool", "content": "42", "tool_call_id": "call_1"}));
        assert_eq!(normalize(&out).unwrap(), out, "normalising twice changes nothing");
    }

    #[test]
    fn each_refusal_names_the_field() {
        for (messages, param, says) in [
            (json!([]), "messages", "must not be empty"),
            (json!(["hi"]), "messages[0]", "must be an object"),
            (json!([{"content": "x"}]), "messages[0].role", "is required"),
            (
                json!([{"role": "user", "content": "x"}, {"role": "wizard", "content": "x"}]),
                "messages[1].role",
                "\"wizard\"",
            ),
            (json!([{"role": 5, "content": "x"}]), "messages[0].role", "must be a string"),
            (json!([{"role": "user"}]), "messages[0].content", "is required (messages[0] is a user message)"),
            (json!([{"role": "assistant", "content": null}]), "messages[0].content", "is required"),
            (json!([{"role": "tool", "tool_call_id": "c"}]), "messages[0].content", "is required"),
            (json!([{"role": "tool", "content": "42"}]), "messages[0].tool_call_id", "is required"),
            (
                json!([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}]),
                "messages[0].tool_calls[0].function.arguments",
                "JSON text of an object",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]),
                "messages[0].tool_calls[0].function.arguments",
                "JSON text of an object",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]),
                "messages[0].tool_calls[0].function.name",
                "must be a string",
            ),
            (json!([{"role": "assistant", "tool_calls": ["f"]}]), "messages[0].tool_calls[0]", "must be an object"),
            (
                json!([{"role": "assistant", "tool_calls": [{"type": "code", "function": {"name": "f"}}]}]),
                "messages[0].tool_calls[0].type",
                "\"function\"",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [{"id": 1, "function": {"name": "f"}}]}]),
                "messages[0].tool_calls[0].id",
                "must be a string",
            ),
            (
                json!([{"role": "assistant", "tool_calls": [{"type": "function"}]}]),
                "messages[0].tool_calls[0].function",
                "must be an object",
            ),
            (json!([{"role": "assistant", "content": null, "tool_calls": []}]), "messages[0].content", "is required"),
            (json!([{"role": "user", "content": 3}]), "messages[0].content", "a string or an array of text parts"),
            (
                json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                "messages[0].content[0].type",
                "only text content parts",
            ),
            (
                json!([{"role": "user", "content": [{"type": "text"}]}]),
                "messages[0].content[0].text",
                "must be a string",
            ),
            (json!([{"role": "user", "content": ["x"]}]), "messages[0].content[0].type", "with a type"),
            (
                json!([{"role": "user", "content": "x", "tool_calls": []}]),
                "messages[0].tool_calls",
                "only for assistant",
            ),
            (json!([{"role": "user", "content": "x", "name": 1}]), "messages[0].name", "must be a string"),
        ] {
            let (got, message) = refusal(messages.clone());
            assert_eq!(got, param, "{messages}");
            assert!(message.contains(says), "{message}");
        }
    }
}
