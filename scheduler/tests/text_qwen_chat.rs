//! Qwen2.5's chat template from tokenizer_config.json. Expected texts are what transformers'
//! `apply_chat_template(tokenize=False)` renders (tests/test_text_vs_hf.py compares many more cases live).

#[path = "text_support/mod.rs"]
mod support;

use scheduler::text::{ChatTemplate, TextError};
use serde_json::json;

#[test]
fn renders_a_conversation_as_transformers_does() {
    let Some(dir) = support::model_dir() else { return };
    let chat = ChatTemplate::from_model_dir(&dir).unwrap();
    assert_eq!(chat.eos_token(), Some("<|im_end|>"));
    assert_eq!(chat.bos_token(), None);
    let messages = [json!({"role": "system", "content": "Be brief."}), json!({"role": "user", "content": "2+2?"})];
    assert_eq!(
        chat.render(&messages, true, None).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        chat.render(&messages[1..], false, None).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
         <|im_start|>user\n2+2?<|im_end|>\n"
    );
}

#[test]
fn tool_schemas_and_calls_keep_key_order_and_python_separators() {
    let Some(dir) = support::model_dir() else { return };
    let chat = ChatTemplate::from_model_dir(&dir).unwrap();
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"z": 1, "a": "<&>"}}}]);
    let messages = [
        json!({"role": "user", "content": "hi"}),
        json!({"role": "assistant", "content": null,
               "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"b": 1.5, "a": "中"}}}]}),
        json!({"role": "tool", "content": "ok"}),
    ];
    let text = chat.render(&messages, true, Some(&tools)).unwrap();
    assert!(text.contains("<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"f\", \"parameters\": {\"z\": 1, \"a\": \"<&>\"}}}\n</tools>"), "{text}");
    assert!(text.ends_with(
        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"f\", \"arguments\": {\"b\": 1.5, \"a\": \"中\"}}\n</tool_call><|im_end|>\n\
         <|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    ), "{text}");
}

#[test]
fn a_directory_without_a_template_says_so() {
    let dir = std::env::temp_dir().join(format!("minisgl-no-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).unwrap();
    let err = ChatTemplate::from_model_dir(&dir).unwrap_err();
    assert!(matches!(err, TextError::NoChatTemplate(_)), "{err}");
    // chat_template.jinja takes precedence over the config, as in transformers.
    std::fs::write(dir.join("tokenizer_config.json"), r#"{"eos_token": "</s>", "chat_template": "config"}"#).unwrap();
    std::fs::write(dir.join("chat_template.jinja"), "{{ messages[0].content }}{{ eos_token }}\n").unwrap();
    let chat = ChatTemplate::from_model_dir(&dir).unwrap();
    assert_eq!(chat.render(&[json!({"role": "user", "content": "x"})], false, None).unwrap(), "x</s>");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn its_tool_calls_are_read_in_the_format_it_teaches() {
    use scheduler::text::{ToolCallParser, ToolFormat};
    let Some(dir) = support::model_dir() else { return };
    let chat = ChatTemplate::from_model_dir(&dir).unwrap();
    assert_eq!(chat.tool_format(), ToolFormat::Hermes);
    // What the template shows the model as a call, and what it renders for an assistant's call, read back.
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let messages = [
        json!({"role": "user", "content": "x"}),
        json!({"role": "assistant", "content": "",
               "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"b": 1.5, "a": "中"}}}]}),
    ];
    let text = chat.render(&messages, false, Some(&tools)).unwrap();
    let turn = text.rsplit("<|im_start|>assistant").next().unwrap().trim_end_matches("<|im_end|>\n");
    let (content, calls) = ToolCallParser::new(chat.tool_format(), vec!["f".into()], true).parse(turn);
    assert_eq!(content, "");
    assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("f", r#"{"b":1.5,"a":"中"}"#));
}
