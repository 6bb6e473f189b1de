//! A tiny byte-level BPE tokenizer built in memory, so streaming can be tested without a model directory.
//! Its tokens are the 256 bytes, a few merges that end or start inside a UTF-8 character (as real byte-level
//! vocabularies have), a special token and a non-special added token.

use std::sync::Arc;

use serde_json::json;

use super::tokenizer::Tokenizer;

pub const SPECIAL: &str = "<|end|>";
pub const ADDED: &str = "<tool>";

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the others for code points from 256.
fn byte_char(byte: u8) -> char {
    let printable = |b: u8| (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
    if printable(byte) {
        return byte as char;
    }
    let rank = (0..byte).filter(|b| !printable(*b)).count() as u32;
    char::from_u32(256 + rank).expect("in range")
}

fn chars_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| byte_char(*b)).collect()
}

pub fn byte_level_tokenizer() -> Arc<Tokenizer> {
    let mut vocab = serde_json::Map::new();
    for byte in 0..=255u8 {
        vocab.insert(byte_char(byte).to_string(), json!(byte as u32));
    }
    // "h" + the first byte of "é"; the last two bytes of "中" (E4 B8 AD); " wor" + "ld".
    let merges = [
        (chars_of(b"h"), chars_of(&[0xC3])),
        (chars_of(&[0xB8]), chars_of(&[0xAD])),
        (chars_of(b" "), chars_of(b"w")),
        (chars_of(b" w"), chars_of(b"o")),
        (chars_of(b" wo"), chars_of(b"r")),
    ];
    for (a, b) in &merges {
        let id = vocab.len() as u32;
        vocab.insert(format!("{a}{b}"), json!(id));
    }
    let next = vocab.len() as u32;
    let added = |id: u32, content: &str, special: bool| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": special})
    };
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true});
    let config = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [added(next, SPECIAL, true), added(next + 1, ADDED, false)],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
        },
    });
    Arc::new(Tokenizer::from_json_bytes(config.to_string().as_bytes()).expect("the test tokenizer is valid"))
}

#[test]
fn the_test_tokenizer_splits_characters_across_tokens() {
    let tokenizer = byte_level_tokenizer();
    assert_eq!(tokenizer.vocab_size(), 256 + 5 + 2);
    let ids = tokenizer.encode("hé 中").unwrap();
    let h_c3 = tokenizer.token_id(&chars_of(&[b'h', 0xC3])).unwrap();
    let b8_ad = tokenizer.token_id(&chars_of(&[0xB8, 0xAD])).unwrap();
    assert_eq!(ids, [h_c3, 0xA9, b' ' as u32, 0xE4, b8_ad]);
    assert_eq!(tokenizer.decode(&ids).unwrap(), "hé 中");
    let special = tokenizer.token_id(SPECIAL).unwrap();
    assert!(tokenizer.is_special(special));
    assert!(!tokenizer.is_special(tokenizer.token_id(ADDED).unwrap()));
    assert_eq!(tokenizer.encode(&format!("a{SPECIAL}b")).unwrap(), [b'a' as u32, special, b'b' as u32]);
    assert_eq!(tokenizer.decode(&[0xE4, special, b8_ad]).unwrap(), "中");
}
