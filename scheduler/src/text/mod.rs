//! Text: tokenizer, chat template, streaming detokenizer with stop strings.
//!
//! Everything here matches transformers on the same model directory: ids from [`Tokenizer::encode`], prompts
//! from [`ChatTemplate::render`] (byte for byte), and the text of [`TextStream`] (equal to
//! `decode(ids, skip_special_tokens=True)`, cut at the first stop string).

mod chat;
mod chat_env;
mod detok;
mod error;
mod py_json;
mod py_repr;
mod stop;
mod stream;
mod strftime;
#[cfg(test)]
pub(crate) mod test_tokenizer;
mod token_table;
mod tokenizer;
pub mod tool_calls;
pub mod tool_grammar;

pub use chat::ChatTemplate;
pub use detok::IncrementalDecoder;
pub use error::{Result, TextError};
pub use stop::{StopMatcher, StreamStep};
pub use stream::TextStream;
pub use token_table::TokenTable;
pub use tokenizer::Tokenizer;
pub use tool_calls::{ParsedCall, Piece, ToolCallParser, ToolFormat};
