//! The grammar that forces a model to call a tool (`tool_choice` `"required"`, or a named function): the model's
//! own call format ([`ToolFormat`]) around one JSON object per call, each the schema of a function's parameters,
//! written in llguidance's Lark dialect (`%json { schema }` inlines a JSON schema as a rule). The structured
//! output path compiles it like any Lark grammar; what comes out then always parses as calls
//! (`tool_calls.rs`).

use super::tool_calls::ToolFormat;
use serde_json::{Value, json};

/// A function the model may be forced to call: its name and the JSON schema of its parameters (`None`: any
/// object, as OpenAI treats a function without `parameters`).
#[derive(Clone, Copy, Debug)]
pub struct ForcedFunction<'a> {
    pub name: &'a str,
    pub parameters: Option<&'a Value>,
}

/// A Lark grammar (llguidance's dialect) whose every sentence is one call, or with `parallel` one or more, of
/// the `functions` (one function: a named `tool_choice`), in `format`. The JSON is written as the templates
/// show it to the model (`{"name": ..., "arguments": ...}`, Python's `", "` and `": "` separators) so that the
/// forced tokens are the ones the model is likeliest to pick anyway.
pub fn forced_call_grammar(format: ToolFormat, functions: &[ForcedFunction<'_>], parallel: bool) -> String {
    let (open, close, separator, arguments) = match format {
        ToolFormat::Hermes => ("<tool_call>\\n", "\\n</tool_call>", "\\n", "arguments"),
        ToolFormat::Llama3Json => ("", "", "; ", "parameters"),
    };
    let mut lark = String::new();
    lark.push_str(if parallel { "start: call (sep call)*\n" } else { "start: call\n" });
    lark.push_str(&format!("sep: \"{separator}\"\n"));
    let alternatives: Vec<String> = (0..functions.len()).map(|i| format!("fn_{i}")).collect();
    let body = if functions.is_empty() { "fn_none".to_string() } else { alternatives.join(" | ") };
    match (open, close) {
        ("", "") => lark.push_str(&format!("call: {body}\n")),
        _ => lark.push_str(&format!("call: \"{open}\" ({body}) \"{close}\"\n")),
    }
    for (i, f) in functions.iter().enumerate() {
        let any_object = json!({"type": "object"});
        // A function takes the arguments it names: unless its schema says otherwise, no others (JSON Schema's
        // default would let the model invent keyword arguments that the caller's function then rejects).
        let mut parameters = f.parameters.unwrap_or(&any_object).clone();
        if let Some(object) = parameters.as_object_mut()
            && object.contains_key("properties")
        {
            object.entry("additionalProperties").or_insert(json!(false));
        }
        let schema = json!({
            "x-guidance": {"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "},
            "type": "object",
            "properties": {"name": {"const": f.name}, arguments: parameters},
            "required": ["name", arguments],
            "additionalProperties": false,
        });
        lark.push_str(&format!("fn_{i}: %json {schema}\n"));
    }
    if functions.is_empty() {
        // No function, no call: a grammar with no sentence, which the caller should never ask for.
        lark.push_str("fn_none: %json {\"not\": {}}\n");
    }
    lark
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::tool_calls::ToolCallParser;

    fn weather() -> Value {
        json!({"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
               "required": ["city"]})
    }

    /// `schema` as the grammar holds it: no keys but its properties.
    fn closed(schema: &Value) -> Value {
        let mut s = schema.clone();
        s["additionalProperties"] = json!(false);
        s
    }

    /// The `%json` schemas of a grammar, by rule name.
    fn schemas(lark: &str) -> Vec<(String, Value)> {
        lark.lines()
            .filter_map(|line| {
                let (rule, schema) = line.split_once(": %json ")?;
                Some((rule.to_string(), serde_json::from_str(schema).expect("each %json is one JSON value")))
            })
            .collect()
    }

    #[test]
    fn hermes_calls_are_tagged_and_each_function_has_its_schema() {
        let w = weather();
        let functions = [
            ForcedFunction { name: "get_weather", parameters: Some(&w) },
            ForcedFunction { name: "now", parameters: None },
        ];
        let lark = forced_call_grammar(ToolFormat::Hermes, &functions, true);
        let lines: Vec<&str> = lark.lines().collect();
        assert_eq!(lines[0], "start: call (sep call)*");
        assert_eq!(lines[1], r#"sep: "\n""#);
        assert_eq!(lines[2], r#"call: "<tool_call>\n" (fn_0 | fn_1) "\n</tool_call>""#);
        let s = schemas(&lark);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0, "fn_0");
        assert_eq!(s[0].1["properties"]["name"], json!({"const": "get_weather"}));
        assert_eq!(s[0].1["properties"]["arguments"], closed(&w));
        assert_eq!(s[0].1["required"], json!(["name", "arguments"]));
        assert_eq!(s[0].1["additionalProperties"], false);
        let keys: Vec<&String> = s[0].1["properties"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["name", "arguments"], "the name comes first, as the templates show it");
        assert_eq!(s[1].1["properties"]["arguments"], json!({"type": "object"}), "no parameters: any object");
    }

    #[test]
    fn one_call_unless_parallel_and_llama_has_no_tags() {
        let w = weather();
        let named = [ForcedFunction { name: "get_weather", parameters: Some(&w) }];
        let lark = forced_call_grammar(ToolFormat::Llama3Json, &named, false);
        let lines: Vec<&str> = lark.lines().collect();
        assert_eq!(lines[0], "start: call");
        assert_eq!(lines[2], "call: fn_0");
        let s = schemas(&lark);
        assert_eq!(s[0].1["required"], json!(["name", "parameters"]));
        assert_eq!(s[0].1["properties"]["parameters"], closed(&w));
    }

    #[test]
    fn a_sentence_of_the_grammar_is_a_call_to_the_parser() {
        // Written as the grammar's literals and schema order say, the parser reads it back as the call.
        let w = weather();
        let lark = forced_call_grammar(
            ToolFormat::Hermes,
            &[ForcedFunction { name: "get_weather", parameters: Some(&w) }],
            true,
        );
        assert!(lark.contains(r#""<tool_call>\n""#) && lark.contains(r#""\n</tool_call>""#));
        let sentence = "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n\
                        <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Rome\", \"unit\": \"c\"}}\n</tool_call>";
        let (content, calls) =
            ToolCallParser::new(ToolFormat::Hermes, vec!["get_weather".into()], true).parse(sentence);
        assert_eq!(content, "");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].arguments, r#"{"city":"Rome","unit":"c"}"#);
    }

    #[test]
    fn names_and_schemas_with_quotes_stay_json() {
        let odd = json!({"type": "object", "properties": {"q\"uote": {"type": "string", "pattern": "^a\\n$"}}});
        let lark =
            forced_call_grammar(ToolFormat::Hermes, &[ForcedFunction { name: "f-1_x", parameters: Some(&odd) }], false);
        let s = schemas(&lark);
        assert_eq!(s[0].1["properties"]["arguments"], closed(&odd));
        let open = json!({"type": "object", "properties": {}, "additionalProperties": true});
        let lark =
            forced_call_grammar(ToolFormat::Hermes, &[ForcedFunction { name: "g", parameters: Some(&open) }], false);
        assert_eq!(schemas(&lark)[0].1["properties"]["arguments"], open, "a schema that says so keeps its extra keys");
        assert_eq!(lark.lines().filter(|l| l.contains("%json")).count(), 1, "each schema stays on its line");
    }
}
