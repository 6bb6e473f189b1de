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
/// message with tool calls and no content given empty content. Other keys (`name`, `tool_calls`,
/// `tool_call_id`, and any a template reads) pass through unchanged.
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
        None | Some(Value::Null) => false,
        Some(Value::Array(calls)) if role == "assistant" => !calls.is_empty(),
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
    let content = match m.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => text_of_parts(i, parts)?,
        None | Some(Value::Null) if tool_calls => String::new(),
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
    Ok(Value::Object(out))
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
            {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "42", "tool_call_id": "call_1"},
        ]);
        let out = normalize(messages.as_array().unwrap()).unwrap();
        assert_eq!(out[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(out[1], json!({"role": "user", "content": "Hi there", "name": "ana"}));
        assert_eq!(out[2]["content"], "", "tool calls stand in for the content");
        assert_eq!(out[2]["tool_calls"], messages[2]["tool_calls"]);
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
            (json!([{"role": "tool"}]), "messages[0].content", "is required"),
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
