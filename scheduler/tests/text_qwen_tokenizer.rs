//! The text layer on Qwen2.5's real tokenizer.json. Expected ids are what transformers gives on the same file.

#[path = "text_support/mod.rs"]
mod support;

use std::sync::{Arc, OnceLock};

use scheduler::text::{TextStream, Tokenizer};

/// Loaded once for all the tests of this file: loading takes seconds in a debug build.
fn tokenizer() -> Option<Arc<Tokenizer>> {
    static TOKENIZER: OnceLock<Option<Arc<Tokenizer>>> = OnceLock::new();
    let loaded = TOKENIZER.get_or_init(|| {
        let dir = support::model_dir()?;
        Some(Arc::new(Tokenizer::from_model_dir(dir).expect("the model's tokenizer.json loads")))
    });
    if loaded.is_none() {
        support::model_dir(); // says why this test is skipped, or panics when the model is required
    }
    loaded.clone()
}

/// Feeds all ids; returns every piece, the `finish` one last.
fn stream(tokenizer: &Arc<Tokenizer>, ids: &[u32], stops: &[&str]) -> (Vec<String>, bool) {
    let mut stream = TextStream::new(tokenizer.clone(), stops.iter().copied());
    let mut pieces: Vec<String> = ids.iter().map(|id| stream.push(*id).unwrap().text).collect();
    pieces.push(stream.finish().unwrap());
    (pieces, stream.stopped())
}

#[test]
fn encodes_as_transformers_does() {
    let Some(tokenizer) = tokenizer() else { return };
    assert_eq!(tokenizer.encode("Hello world").unwrap(), [9707, 1879]);
    assert_eq!(tokenizer.encode("你好，世界").unwrap(), [108386, 3837, 99489]);
    assert_eq!(tokenizer.encode(" café").unwrap(), [51950]);
    assert_eq!(tokenizer.encode("").unwrap(), Vec::<u32>::new());
    // Control-token text typed by a user becomes the control token; no BOS is added.
    assert_eq!(tokenizer.encode("<|im_start|>user\nhi<|im_end|>").unwrap(), [151644, 872, 198, 6023, 151645]);
}

#[test]
fn vocabulary_and_special_tokens() {
    let Some(tokenizer) = tokenizer() else { return };
    assert_eq!(tokenizer.vocab_size(), 151665);
    assert_eq!(tokenizer.token_id("<|im_start|>"), Some(151644));
    assert_eq!(tokenizer.token_id("<|im_end|>"), Some(151645));
    assert_eq!(tokenizer.token_id("<|endoftext|>"), Some(151643));
    assert_eq!(tokenizer.token_id("no such token"), None);
    assert!(tokenizer.is_special(151645));
    // <tool_call> is an added token but not a special one: decoding keeps it, tool-call parsing needs it.
    assert!(!tokenizer.is_special(151657));
    assert_eq!(tokenizer.decode(&[151644, 9707, 151657, 151645, 151643]).unwrap(), "Hello<tool_call>");
}

#[test]
fn streaming_holds_split_characters_until_they_are_whole() {
    let Some(tokenizer) = tokenizer() else { return };
    // Each of these tokens alone decodes to U+FFFD: they are halves of 4-byte characters.
    let ids = tokenizer.encode("𝔘𝔫𝔦").unwrap();
    assert_eq!(ids, [124026, 246, 124026, 104, 149880]);
    assert_eq!(stream(&tokenizer, &ids, &[]).0, ["", "𝔘", "", "𝔫", "𝔦", ""]);
    let ids = tokenizer.encode("👨‍👩‍👧").unwrap();
    assert_eq!(stream(&tokenizer, &ids, &[]).0, ["👨", "", "\u{200d}", "👩", "", "\u{200d}", "👧", ""]);
}

#[test]
fn streamed_text_equals_the_full_decode() {
    let Some(tokenizer) = tokenizer() else { return };
    let text = "混合 mixed 텍스트 ❤️‍🔥 🇯🇵🇫🇷 Ångström naïve — “quotes” … 𝔘𝔫𝔦𝔠𝔬𝔡𝔢\n\tdef 函数(): return '😀'";
    let mut ids = tokenizer.encode(text).unwrap();
    ids.insert(5, 151645);
    ids.push(151643);
    let (pieces, stopped) = stream(&tokenizer, &ids, &[]);
    assert!(!stopped);
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
    assert_eq!(pieces.concat(), tokenizer.decode(&ids).unwrap());
    assert_eq!(pieces.concat(), text);
}

#[test]
fn stop_strings_on_real_tokens() {
    let Some(tokenizer) = tokenizer() else { return };
    let ids = tokenizer.encode("The answer is 42.\n\nUser: and then? 你好，世界").unwrap();
    let mut stream = TextStream::new(tokenizer.clone(), ["\n\nUser:", "世界"]);
    let mut consumed = 0;
    for id in &ids {
        consumed += 1;
        if stream.push(*id).unwrap().stopped {
            break;
        }
    }
    assert_eq!(stream.finish().unwrap(), "");
    assert!(stream.stopped());
    assert_eq!(stream.text(), "The answer is 42.");
    assert!(tokenizer.decode(&ids[..consumed]).unwrap().ends_with("User:"));
    assert!(!tokenizer.decode(&ids[..consumed - 1]).unwrap().contains("\n\nUser:"));
}

#[test]
fn one_tokenizer_serves_many_threads() {
    let Some(tokenizer) = tokenizer() else { return };
    let texts = ["你好，世界", "Hello world 🙂", "def f(): pass"];
    let handles: Vec<_> = texts
        .into_iter()
        .map(|text| {
            let tokenizer = tokenizer.clone();
            std::thread::spawn(move || {
                let ids = tokenizer.encode(text).unwrap();
                let (pieces, _) = stream(&tokenizer, &ids, &[]);
                pieces.concat()
            })
        })
        .collect();
    for (handle, text) in handles.into_iter().zip(texts) {
        assert_eq!(handle.join().unwrap(), text);
    }
}
