//! `tools`, `tool_choice` and `parallel_tool_calls`: OpenAI's function tools, read into typed structs and
//! checked here for both doors (the chat endpoint's body, and a ZeroMQ `generate`'s fields in `prepare.rs`),
//! each refusal naming its field (`tools[1].function.name`).
//!
//! What is decided here (docs/http.md, "Tool calls"): the tools are rendered into the chat template whenever
//! given, `tool_choice: "none"` included (as vLLM does by default: the prompt stays the one the model was
//! trained on, and only the parsing is off); `"auto"` parses the output for calls; `"required"` and a named
//! function force a call: `prepare.rs` compiles [`ToolPlan::forced_grammar`] (`text::tool_grammar`) as the
//! request's constraint, so every token is one a call in the model's format allows, and the output always parses.

use super::ApiError;
use super::common::parse_body;
use crate::text::ToolFormat;
use crate::text::tool_grammar::{ForcedFunction, forced_call_grammar};
use proto::api::Generate;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// OpenAI's limit on the tools of one request.
pub const MAX_TOOLS: usize = 128;
/// OpenAI's limit on a function name's length.
pub const MAX_NAME_LEN: usize = 64;

/// A function tool: `{type: "function", function: {name, description?, parameters?, strict?}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: Function,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Function {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON schema of the arguments (an object schema); absent: any object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Map<String, Value>>,
    /// OpenAI's: the arguments must follow the schema exactly. Accepted; only constrained decoding could make
    /// it so, and `auto` calls are not constrained (docs/http.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: `"none"`, `"auto"`, `"required"`, or `{type: "function", function: {name}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "\"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}"
)]
pub enum ToolChoice {
    Mode(String),
    Named(NamedChoice),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedChoice {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: NamedFunction,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamedFunction {
    pub name: String,
}

/// A request's tools, checked: what the chat template is given, and how the output is read.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolPlan {
    /// The tools as the template sees them (OpenAI's objects, unset fields left out).
    pub template_tools: Value,
    /// The functions' names: a call must name one of them to count.
    pub names: Vec<String>,
    /// Whether the output is parsed for calls (`tool_choice` other than `"none"`).
    pub parse: bool,
    /// `parallel_tool_calls` (default true): false keeps the first call only.
    pub parallel: bool,
    /// Whether `tool_choice` forces a call, and of which function.
    pub forced: Forced,
}

/// What `tool_choice` forces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forced {
    /// `"auto"` or `"none"`: the model decides.
    No,
    /// `"required"`: a call (or, with `parallel_tool_calls`, several) of any of the tools.
    AnyTool,
    /// A named function: one call of it.
    Function(String),
}

impl ToolPlan {
    /// The grammar that forces a call in `format` (`text::tool_grammar`): of any of the tools
    /// (`tool_choice: "required"`), or of the one named; `None` when nothing is forced.
    pub fn forced_call(&self, format: ToolFormat) -> Option<String> {
        match &self.forced {
            Forced::No => None,
            Forced::AnyTool => Some(self.forced_grammar(format, None)),
            Forced::Function(name) => Some(self.forced_grammar(format, Some(name))),
        }
    }

    fn forced_grammar(&self, format: ToolFormat, named: Option<&str>) -> String {
        let functions: Vec<ForcedFunction<'_>> = self
            .template_tools
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|tool| {
                let name = tool["function"]["name"].as_str()?;
                let parameters = tool["function"].get("parameters");
                named.is_none_or(|n| n == name).then_some(ForcedFunction { name, parameters })
            })
            .collect();
        forced_call_grammar(format, &functions, self.parallel && named.is_none())
    }
}

/// Checks a request's tool fields; `None` when it offers no tools (then there is nothing to render or parse).
pub fn plan(
    tools: Option<&[Tool]>,
    choice: Option<&ToolChoice>,
    parallel: Option<bool>,
) -> Result<Option<ToolPlan>, ApiError> {
    let tools = tools.unwrap_or_default();
    if tools.len() > MAX_TOOLS {
        return Err(ApiError::invalid(
            "tools",
            format!("tools may list at most {MAX_TOOLS} functions, got {}", tools.len()),
        ));
    }
    let mut names: Vec<String> = Vec::with_capacity(tools.len());
    for (i, tool) in tools.iter().enumerate() {
        if tool.kind != "function" {
            let param = format!("tools[{i}].type");
            return Err(ApiError::invalid(param.clone(), format!("{param} must be \"function\", got {:?}", tool.kind)));
        }
        let name = &tool.function.name;
        let param = format!("tools[{i}].function.name");
        check_name(name).map_err(|why| ApiError::invalid(param.clone(), format!("{param} {why}")))?;
        if names.contains(name) {
            return Err(ApiError::invalid(param.clone(), format!("{param}: {name:?} names two tools")));
        }
        if let Some(kind) = tool.function.parameters.as_ref().and_then(|p| p.get("type"))
            && kind != "object"
        {
            let param = format!("tools[{i}].function.parameters.type");
            return Err(ApiError::invalid(
                param.clone(),
                format!("{param} must be \"object\": arguments are an object"),
            ));
        }
        names.push(name.clone());
    }
    let forced = match choice {
        None => Forced::No,
        Some(ToolChoice::Mode(mode)) => match mode.as_str() {
            "none" | "auto" => Forced::No,
            "required" => Forced::AnyTool,
            other => {
                let message =
                    format!("tool_choice must be \"none\", \"auto\", \"required\" or a named function, got {other:?}");
                return Err(ApiError::invalid("tool_choice", message));
            }
        },
        Some(ToolChoice::Named(named)) => {
            if named.kind != "function" {
                let message = format!("tool_choice.type must be \"function\", got {:?}", named.kind);
                return Err(ApiError::invalid("tool_choice.type", message));
            }
            if !names.contains(&named.function.name) {
                let message =
                    format!("tool_choice.function.name {:?} is not among the request's tools", named.function.name);
                return Err(ApiError::invalid("tool_choice.function.name", message));
            }
            Forced::Function(named.function.name.clone())
        }
    };
    if forced != Forced::No && names.is_empty() {
        return Err(ApiError::invalid("tool_choice", "tool_choice forces a call but the request has no tools"));
    }
    if names.is_empty() {
        return Ok(None);
    }
    let parse = !matches!(choice, Some(ToolChoice::Mode(m)) if m == "none");
    let template_tools = serde_json::to_value(tools).expect("tools always serialize");
    Ok(Some(ToolPlan { template_tools, names, parse, parallel: parallel.unwrap_or(true), forced }))
}

/// OpenAI's rule for function names (letters, digits, `_` and `-`, at most 64), with `.` allowed too, as
/// namespaced tools (`weather.get`) are common and every template renders them.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.chars().count() > MAX_NAME_LEN {
        return Err(format!("must be at most {MAX_NAME_LEN} characters"));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
        return Err(format!("may only have letters, digits, '_', '-' and '.', got {bad:?} in {name:?}"));
    }
    Ok(())
}

/// Puts a checked request's tool fields on its `generate`, as a ZeroMQ client would send them.
pub fn apply(g: &mut Generate, tools: Option<&[Tool]>, choice: Option<&ToolChoice>, parallel: Option<bool>) {
    g.tools = tools.filter(|t| !t.is_empty()).map(|t| t.iter().map(|t| json!(t)).collect());
    g.tool_choice = choice.map(|c| json!(c));
    g.parallel_tool_calls = parallel;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolFields {
    tools: Option<Vec<Tool>>,
    tool_choice: Option<ToolChoice>,
    parallel_tool_calls: Option<bool>,
}

/// A `generate`'s tool fields, read and checked as the chat endpoint reads them (both doors come here before
/// the template runs). Tools need a chat prompt: only a template renders them.
pub fn plan_of(g: &Generate) -> Result<Option<ToolPlan>, ApiError> {
    if g.tools.is_none() && g.tool_choice.is_none() {
        return Ok(None);
    }
    let fields = json!({"tools": g.tools, "tool_choice": g.tool_choice, "parallel_tool_calls": g.parallel_tool_calls});
    let fields: ToolFields = parse_body(fields.to_string().as_bytes())?;
    let plan = plan(fields.tools.as_deref(), fields.tool_choice.as_ref(), fields.parallel_tool_calls)?;
    if plan.is_some() && g.messages.is_none() {
        return Err(ApiError::invalid("tools", "tools need a chat prompt (messages): the chat template renders them"));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    fn generate(fields: Value) -> Generate {
        let mut g = Generate::new("r");
        g.messages = Some(vec![json!({"role": "user", "content": "x"})]);
        g.tools = fields.get("tools").and_then(|t| t.as_array().cloned());
        g.tool_choice = fields.get("tool_choice").cloned();
        g.parallel_tool_calls = fields.get("parallel_tool_calls").and_then(Value::as_bool);
        g
    }

    fn refusal(fields: Value) -> (&'static str, String, String) {
        let e = plan_of(&generate(fields)).expect_err("refused");
        (e.code, e.param.unwrap_or_default(), e.message)
    }

    #[test]
    fn tools_are_read_and_given_to_the_template_as_openai_writes_them() {
        let plan = plan_of(&generate(json!({"tools": [weather(), {"type": "function", "function": {"name": "now"}}]})))
            .unwrap()
            .unwrap();
        assert_eq!(plan.names, ["get_weather", "now"]);
        assert!(plan.parse && plan.parallel);
        assert_eq!(plan.template_tools[0], weather(), "key order and content kept");
        assert_eq!(plan.template_tools[1], json!({"type": "function", "function": {"name": "now"}}));
        let none =
            plan_of(&generate(json!({"tools": [weather()], "tool_choice": "none", "parallel_tool_calls": false})))
                .unwrap()
                .unwrap();
        assert!(!none.parse && !none.parallel, "rendered, not parsed");
        assert_eq!(plan_of(&generate(json!({"tools": [], "tool_choice": "auto"}))).unwrap(), None);
        assert_eq!(plan_of(&generate(json!({}))).unwrap(), None);
    }

    #[test]
    fn each_refusal_names_its_field() {
        let two = |second: Value| json!({"tools": [weather(), second]});
        for (fields, code, param, says) in [
            (
                two(json!({"type": "function", "function": {"name": "get_weather"}})),
                "invalid_params",
                "tools[1].function.name",
                "names two tools",
            ),
            (
                two(json!({"type": "function", "function": {"name": "a b"}})),
                "invalid_params",
                "tools[1].function.name",
                "' '",
            ),
            (
                two(json!({"type": "function", "function": {"name": ""}})),
                "invalid_params",
                "tools[1].function.name",
                "empty",
            ),
            (
                two(json!({"type": "function", "function": {"name": "x".repeat(65)}})),
                "invalid_params",
                "tools[1].function.name",
                "at most 64",
            ),
            (
                two(json!({"type": "function", "function": {}})),
                "invalid_params",
                "tools[1].function.name",
                "is required",
            ),
            (
                two(json!({"type": "retrieval", "function": {"name": "f"}})),
                "invalid_params",
                "tools[1].type",
                "\"function\"",
            ),
            (two(json!({"function": {"name": "f"}})), "invalid_params", "tools[1].type", "is required"),
            (two(json!({"type": "function"})), "invalid_params", "tools[1].function", "is required"),
            (
                two(json!({"type": "function", "function": {"name": "f", "parameters": "x"}})),
                "invalid_params",
                "tools[1].function.parameters",
                "a map",
            ),
            (
                two(json!({"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}})),
                "invalid_params",
                "tools[1].function.parameters.type",
                "\"object\"",
            ),
            (
                two(json!({"type": "function", "function": {"name": "f", "parametres": {}}})),
                "unknown_parameter",
                "tools[1].function.parametres",
                "Unrecognized",
            ),
            (two(json!("get_weather")), "invalid_params", "tools[1]", ""),
            (
                json!({"tools": [weather()], "tool_choice": "sometimes"}),
                "invalid_params",
                "tool_choice",
                "\"sometimes\"",
            ),
            (json!({"tools": [weather()], "tool_choice": 3}), "invalid_params", "tool_choice", "\"required\""),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "function", "function": {"name": "nope"}}}),
                "invalid_params",
                "tool_choice.function.name",
                "not among",
            ),
            (
                json!({"tools": [weather()], "tool_choice": {"type": "custom", "function": {"name": "get_weather"}}}),
                "invalid_params",
                "tool_choice.type",
                "\"function\"",
            ),
            (json!({"tool_choice": "required"}), "invalid_params", "tool_choice", "no tools"),
        ] {
            let (got_code, got_param, message) = refusal(fields.clone());
            assert_eq!((got_code, got_param.as_str()), (code, param), "{fields}: {message}");
            assert!(message.contains(says), "{fields}: {message}");
        }
        let too_many: Vec<Value> =
            (0..=MAX_TOOLS).map(|i| json!({"type": "function", "function": {"name": format!("f{i}")}})).collect();
        assert_eq!(refusal(json!({"tools": too_many})).1, "tools");
    }

    #[test]
    fn the_forced_grammar_names_every_tool_or_the_one_chosen() {
        let tools = json!([weather(), {"type": "function", "function": {"name": "now"}}]);
        let auto = plan_of(&generate(json!({"tools": tools}))).unwrap().unwrap();
        assert_eq!((auto.forced.clone(), auto.forced_call(ToolFormat::Hermes)), (Forced::No, None));
        let plan = plan_of(&generate(json!({"tools": tools, "tool_choice": "required"}))).unwrap().unwrap();
        assert_eq!(plan.forced, Forced::AnyTool);
        let any = plan.forced_call(ToolFormat::Hermes).unwrap();
        assert!(any.starts_with("start: call (sep call)*\n"), "{any}");
        assert!(any.contains("fn_0 | fn_1") && any.contains(r#"{"const":"get_weather"}"#), "{any}");
        assert!(any.contains(r#""city":{"type":"string"}"#), "the schema of the parameters: {any}");
        let named = json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "now"}}});
        let plan = plan_of(&generate(named)).unwrap().unwrap();
        assert_eq!(plan.forced, Forced::Function("now".into()));
        let one = plan.forced_call(ToolFormat::Llama3Json).unwrap();
        assert!(one.starts_with("start: call\n") && one.contains("call: fn_0\n"), "{one}");
        assert!(one.contains(r#"{"const":"now"}"#) && !one.contains("get_weather"), "{one}");
    }

    #[test]
    fn tools_need_messages_on_the_zmq_door() {
        let mut g = generate(json!({"tools": [weather()]}));
        g.messages = None;
        g.text = Some("x".into());
        let e = plan_of(&g).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools"));
    }

    #[test]
    fn apply_writes_what_plan_of_reads() {
        let tools: Vec<Tool> = serde_json::from_value(json!([weather()])).unwrap();
        let choice = ToolChoice::Mode("auto".into());
        let mut g = generate(json!({}));
        apply(&mut g, Some(&tools), Some(&choice), Some(false));
        assert_eq!(g.tool_choice, Some(json!("auto")));
        let plan = plan_of(&g).unwrap().unwrap();
        assert_eq!((plan.names, plan.parse, plan.parallel), (vec!["get_weather".to_string()], true, false));
    }
}
