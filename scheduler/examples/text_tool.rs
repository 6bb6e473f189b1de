//! The text layer as a line-oriented tool, so other languages can compare it with theirs
//! (`tests/test_text_vs_hf.py` checks it against transformers).
//!
//! `text_tool --model DIR` reads one JSON request per line on stdin and writes one JSON line per request:
//! - `{"op":"encode","text":..}` -> `{"ids":[..]}`
//! - `{"op":"decode","ids":[..]}` -> `{"text":..}`
//! - `{"op":"chat","messages":[..],"add_generation_prompt":bool,"tools":..}` -> `{"text":..,"ids":[..]}`
//! - `{"op":"stream","ids":[..],"stop":[..]}` -> `{"pieces":[..],"text":..,"stopped":bool,"consumed":n}`: one piece
//!   per id fed until a stop string ended the stream (`consumed` of them), then the piece `finish` gave.
//! - anything that fails -> `{"error":"..."}`

use std::io::{BufRead, Write};
use std::sync::Arc;

use anyhow::{Context, bail};
use scheduler::text::{ChatTemplate, TextError, TextStream, Tokenizer};
use serde_json::{Value, json};

struct Text {
    tokenizer: Arc<Tokenizer>,
    chat: Option<ChatTemplate>,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = match args.as_slice() {
        [flag, dir] if flag == "--model" => dir.clone(),
        _ => bail!("usage: text_tool --model DIR < requests.jsonl"),
    };
    let tokenizer =
        Arc::new(Tokenizer::from_model_dir(&dir).with_context(|| format!("loading the tokenizer of {dir}"))?);
    let chat = match ChatTemplate::from_model_dir(&dir) {
        Ok(chat) => Some(chat),
        Err(TextError::NoChatTemplate(_)) => None,
        Err(e) => return Err(e).context("loading the chat template"),
    };
    let text = Text { tokenizer, chat };

    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = serde_json::from_str::<Value>(&line)
            .context("the request is not JSON")
            .and_then(|request| text.answer(&request))
            .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
        serde_json::to_writer(&mut out, &reply)?;
        out.write_all(b"\n")?;
        out.flush()?;
    }
    Ok(())
}

impl Text {
    fn answer(&self, request: &Value) -> anyhow::Result<Value> {
        match request["op"].as_str() {
            Some("encode") => Ok(json!({ "ids": self.tokenizer.encode(str_field(request, "text")?)? })),
            Some("decode") => Ok(json!({ "text": self.tokenizer.decode(&ids_field(request)?)? })),
            Some("chat") => self.chat(request),
            Some("stream") => self.stream(request),
            other => bail!("unknown op {other:?}"),
        }
    }

    fn chat(&self, request: &Value) -> anyhow::Result<Value> {
        let chat = self.chat.as_ref().context("the model has no chat template")?;
        let messages = request["messages"].as_array().context("messages must be a list")?;
        let add_generation_prompt = request["add_generation_prompt"].as_bool().unwrap_or(false);
        let tools = request.get("tools").filter(|t| !t.is_null());
        let text = chat.render(messages, add_generation_prompt, tools)?;
        let ids = self.tokenizer.encode(&text)?;
        Ok(json!({ "text": text, "ids": ids }))
    }

    fn stream(&self, request: &Value) -> anyhow::Result<Value> {
        let stops: Vec<String> = match request.get("stop") {
            None | Some(Value::Null) => Vec::new(),
            Some(stops) => serde_json::from_value(stops.clone()).context("stop must be a list of strings")?,
        };
        let mut stream = TextStream::new(self.tokenizer.clone(), stops);
        let mut pieces = Vec::new();
        let mut consumed = 0;
        for id in ids_field(request)? {
            let step = stream.push(id)?;
            pieces.push(step.text);
            consumed += 1;
            if step.stopped {
                break;
            }
        }
        pieces.push(stream.finish()?);
        Ok(json!({ "pieces": pieces, "text": stream.text(), "stopped": stream.stopped(), "consumed": consumed }))
    }
}

fn str_field<'a>(request: &'a Value, key: &str) -> anyhow::Result<&'a str> {
    request[key].as_str().with_context(|| format!("{key} must be a string"))
}

fn ids_field(request: &Value) -> anyhow::Result<Vec<u32>> {
    serde_json::from_value(request["ids"].clone()).context("ids must be a list of token ids")
}
