use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::Serde;
use minijinja::{Environment, Value};
use serde_json::{Map, Value as Json};

use super::chat_env::{RaisedByTemplate, chat_environment};
use super::error::{Result, TextError};
use super::tool_calls::ToolFormat;

const DEFAULT: &str = "default";
const TOOL_USE: &str = "tool_use";

/// The named special tokens transformers passes to every template (`special_tokens_map`).
const SPECIAL_TOKEN_NAMES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// A model's chat template, compiled once, rendering what transformers' `apply_chat_template(tokenize=False)`
/// renders, byte for byte.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    has_tool_use: bool,
    special_tokens: BTreeMap<String, String>,
    /// How the templates teach the model to write tool calls.
    tool_format: ToolFormat,
    /// Whether any template reads `tools`: one that does not would leave a request's tools out silently.
    renders_tools: bool,
}

impl ChatTemplate {
    /// Reads the template where transformers looks for it: `chat_template.jinja` (with
    /// `additional_chat_templates/*.jinja`), else `chat_template` in `tokenizer_config.json` (a string, or a list of
    /// `{name, template}`); and the special tokens (`bos_token`, `eos_token`, ...) from `tokenizer_config.json`.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let config_path = dir.join("tokenizer_config.json");
        let config = match std::fs::read(&config_path) {
            Ok(bytes) => serde_json::from_slice::<Json>(&bytes)
                .map_err(|source| TextError::Json { path: config_path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Json::Object(Map::new()),
            Err(source) => return Err(TextError::Io { path: config_path, source }),
        };
        let mut templates = read_template_files(dir)?;
        if templates.is_empty() {
            templates = templates_from_config(&config)?;
        }
        if templates.is_empty() {
            return Err(TextError::NoChatTemplate(dir.to_owned()));
        }
        Self::new(templates, special_tokens_from_config(&config))
    }

    /// A template set by name (`"default"`, optionally `"tool_use"` and others), with the special tokens the
    /// templates see as variables.
    pub fn new(templates: BTreeMap<String, String>, special_tokens: BTreeMap<String, String>) -> Result<Self> {
        if !templates.contains_key(DEFAULT) {
            let names: Vec<&String> = templates.keys().collect();
            return Err(TextError::BadTemplateConfig(format!("set has no \"default\" template, only {names:?}")));
        }
        let mut env = chat_environment();
        let has_tool_use = templates.contains_key(TOOL_USE);
        let taught = templates.get(TOOL_USE).or(templates.get(DEFAULT)).map_or("", String::as_str);
        let tool_format = ToolFormat::detect(taught);
        let renders_tools = templates.values().any(|source| source.contains("tools"));
        for (name, source) in templates {
            if name == DEFAULT || name == TOOL_USE {
                env.add_template_owned(name, source).map_err(TextError::Template)?;
            }
        }
        Ok(Self { env, has_tool_use, special_tokens, tool_format, renders_tools })
    }

    /// A single template, no special tokens.
    pub fn from_source(source: &str) -> Result<Self> {
        Self::new(BTreeMap::from([(DEFAULT.to_string(), source.to_string())]), BTreeMap::new())
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.special_tokens.get("bos_token").map(String::as_str)
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.special_tokens.get("eos_token").map(String::as_str)
    }

    /// The tool-call format the template shows the model (its `tool_use` template's, when it has one).
    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    /// Whether the template renders tools at all (SmolLM2's, for one, does not).
    pub fn renders_tools(&self) -> bool {
        self.renders_tools
    }

    /// Renders a conversation. `messages` are JSON objects (`role`, `content`, `tool_calls`, ...); `tools` is the
    /// list of tool schemas, passed as given.
    pub fn render(&self, messages: &[Json], add_generation_prompt: bool, tools: Option<&Json>) -> Result<String> {
        self.render_with_kwargs(messages, add_generation_prompt, tools, &Map::new())
    }

    /// [`render`](Self::render) with extra template variables (`enable_thinking`, ...), which override the
    /// special tokens of the same name.
    pub fn render_with_kwargs(
        &self,
        messages: &[Json],
        add_generation_prompt: bool,
        tools: Option<&Json>,
        kwargs: &Map<String, Json>,
    ) -> Result<String> {
        if messages.is_empty() {
            return Err(TextError::InvalidMessages("the conversation is empty".into()));
        }
        let messages = messages.iter().map(normalize_message).collect::<Result<Vec<_>>>()?;
        let name = if tools.is_some_and(|t| !t.is_null()) && self.has_tool_use { TOOL_USE } else { DEFAULT };
        let template = self.env.get_template(name).map_err(TextError::Template)?;

        let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
        for (key, value) in &self.special_tokens {
            ctx.insert(key, Value::from(value.as_str()));
        }
        for (key, value) in kwargs {
            ctx.insert(key, Value::from(Serde(value)));
        }
        // transformers passes these always, None when absent: `tools is defined` holds in every template.
        ctx.insert("messages", Value::from(Serde(&messages)));
        ctx.insert("tools", tools.filter(|t| !t.is_null()).map_or(Value::from(()), |t| Value::from(Serde(t))));
        ctx.insert("documents", Value::from(()));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        template.render(ctx).map_err(template_error)
    }
}

fn template_error(err: minijinja::Error) -> TextError {
    let raised = std::error::Error::source(&err).is_some_and(|source| source.is::<RaisedByTemplate>());
    if raised {
        TextError::TemplateRaised(err.detail().unwrap_or_default().to_string())
    } else {
        TextError::Template(err)
    }
}

/// What transformers does to each message before rendering: keys whose value is None are dropped (templates
/// handle a missing key, not a null one), and reasoning given under any of its names is offered under all of
/// them (`thinking` first, `reasoning_content` last, unless already present).
fn normalize_message(message: &Json) -> Result<Map<String, Json>> {
    let Json::Object(message) = message else {
        return Err(TextError::InvalidMessages(format!("a message must be an object, got {message}")));
    };
    let mut message: Map<String, Json> = message.iter().filter(|(_, v)| !v.is_null()).map(clone_entry).collect();
    let reasoning = ["reasoning_content", "thinking", "reasoning"].iter().find_map(|key| message.get(*key)).cloned();
    if let Some(reasoning) = reasoning {
        let mut aliased = Map::new();
        aliased.insert("thinking".into(), reasoning.clone());
        aliased.extend(message);
        aliased.insert("reasoning_content".into(), reasoning);
        message = aliased;
    }
    Ok(message)
}

fn clone_entry((key, value): (&String, &Json)) -> (String, Json) {
    (key.clone(), value.clone())
}

fn read_template_files(dir: &Path) -> Result<BTreeMap<String, String>> {
    let mut templates = BTreeMap::new();
    let read =
        |path: &Path| std::fs::read_to_string(path).map_err(|source| TextError::Io { path: path.into(), source });
    let default = dir.join("chat_template.jinja");
    if default.is_file() {
        templates.insert(DEFAULT.to_string(), read(&default)?);
    }
    let extra_dir = dir.join("additional_chat_templates");
    if let Ok(entries) = std::fs::read_dir(&extra_dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "jinja")
                && let Some(name) = path.file_stem().and_then(|s| s.to_str())
            {
                templates.insert(name.to_string(), read(&path)?);
            }
        }
    }
    Ok(templates)
}

fn templates_from_config(config: &Json) -> Result<BTreeMap<String, String>> {
    let mut templates = BTreeMap::new();
    match config.get("chat_template") {
        None | Some(Json::Null) => {}
        Some(Json::String(source)) => {
            templates.insert(DEFAULT.to_string(), source.clone());
        }
        Some(Json::Array(entries)) => {
            for entry in entries {
                let name = entry.get("name").and_then(Json::as_str);
                let source = entry.get("template").and_then(Json::as_str);
                let (Some(name), Some(source)) = (name, source) else {
                    return Err(TextError::BadTemplateConfig(format!("list entry without name or template: {entry}")));
                };
                templates.insert(name.to_string(), source.to_string());
            }
        }
        Some(other) => {
            return Err(TextError::BadTemplateConfig(format!("chat_template is neither text nor a list: {other}")));
        }
    }
    Ok(templates)
}

/// A token is stored as its text or, in older configs, as an AddedToken object with `content`.
fn token_text(value: &Json) -> Option<String> {
    match value {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o.get("content").and_then(Json::as_str).map(str::to_string),
        _ => None,
    }
}

fn special_tokens_from_config(config: &Json) -> BTreeMap<String, String> {
    let mut tokens = BTreeMap::new();
    for name in SPECIAL_TOKEN_NAMES {
        if let Some(text) = config.get(name).and_then(token_text) {
            tokens.insert(name.to_string(), text);
        }
    }
    // transformers 5 exposes model-specific named tokens (`image_token`, ...) the same way.
    if let Some(Json::Object(extra)) = config.get("extra_special_tokens") {
        for (name, value) in extra {
            if let Some(text) = token_text(value) {
                tokens.insert(name.clone(), text);
            }
        }
    }
    tokens
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const TEMPLATE: &str = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if m.tool_calls is defined %}\
        {{ m.tool_calls | tojson }}{% endif %}</s>{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}\
        {% if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}";

    fn template() -> ChatTemplate {
        ChatTemplate::new(
            BTreeMap::from([(DEFAULT.into(), TEMPLATE.into())]),
            BTreeMap::from([("eos_token".into(), "</eos>".into())]),
        )
        .unwrap()
    }

    #[test]
    fn renders_messages_tools_and_the_generation_prompt() {
        let messages = [json!({"role": "user", "content": "hi <b>"}), json!({"role": "assistant", "content": "yo"})];
        let tools = json!([{"name": "f", "parameters": {"z": 1, "a": 2}}]);
        let text = template().render(&messages, true, Some(&tools)).unwrap();
        assert_eq!(
            text,
            r#"<user>hi <b></s><assistant>yo</s>[{"name": "f", "parameters": {"z": 1, "a": 2}}]<assistant></eos>"#
        );
        assert_eq!(template().render(&messages[..1], false, None).unwrap(), "<user>hi <b></s></eos>");
    }

    #[test]
    fn null_keys_are_dropped_as_transformers_does() {
        let messages = [json!({"role": "assistant", "content": "x", "tool_calls": null})];
        assert_eq!(template().render(&messages, false, None).unwrap(), "<assistant>x</s></eos>");
    }

    #[test]
    fn reasoning_is_offered_under_all_its_names() {
        let message = json!({"role": "assistant", "reasoning": "r", "content": "c"});
        let normalized = normalize_message(&message).unwrap();
        let keys: Vec<&str> = normalized.keys().map(String::as_str).collect();
        assert_eq!(keys, ["thinking", "role", "reasoning", "content", "reasoning_content"]);
        assert!(normalized.values().filter(|v| *v == "r").count() == 3);
    }

    #[test]
    fn bad_input_and_template_refusals_are_errors() {
        assert!(matches!(template().render(&[], true, None), Err(TextError::InvalidMessages(_))));
        assert!(matches!(template().render(&[json!("text")], true, None), Err(TextError::InvalidMessages(_))));
        let strict = ChatTemplate::from_source(
            "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}ok",
        )
        .unwrap();
        match strict.render(&[json!({"role": "system", "content": ""})], true, None) {
            Err(TextError::TemplateRaised(message)) => assert_eq!(message, "user first"),
            other => panic!("expected the template's refusal, got {other:?}"),
        }
        assert_eq!(strict.render(&[json!({"role": "user"})], true, None).unwrap(), "ok");
        assert!(matches!(ChatTemplate::from_source("{% if %}"), Err(TextError::Template(_))));
    }

    #[test]
    fn tool_use_template_is_chosen_when_tools_are_given() {
        let set = ChatTemplate::new(
            BTreeMap::from([(DEFAULT.into(), "plain".into()), (TOOL_USE.into(), "tools".into())]),
            BTreeMap::new(),
        )
        .unwrap();
        let messages = [json!({"role": "user", "content": "x"})];
        assert_eq!(set.render(&messages, true, None).unwrap(), "plain");
        assert_eq!(set.render(&messages, true, Some(&json!([]))).unwrap(), "tools");
    }

    #[test]
    fn config_forms_are_read() {
        let config = json!({
            "chat_template": [{"name": "default", "template": "d"}, {"name": "tool_use", "template": "t"}],
            "bos_token": null,
            "eos_token": {"content": "<|im_end|>", "lstrip": false},
            "pad_token": "<|endoftext|>",
            "extra_special_tokens": {"image_token": "<img>"}
        });
        let templates = templates_from_config(&config).unwrap();
        assert_eq!(templates.get("tool_use").map(String::as_str), Some("t"));
        let tokens = special_tokens_from_config(&config);
        assert_eq!(tokens.get("eos_token").map(String::as_str), Some("<|im_end|>"));
        assert_eq!(tokens.get("image_token").map(String::as_str), Some("<img>"));
        assert!(!tokens.contains_key("bos_token"));
        assert!(templates_from_config(&json!({"chat_template": 3})).is_err());
    }
}
