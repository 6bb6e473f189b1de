use std::path::PathBuf;

/// Everything the text layer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path} is not valid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },

    #[error("tokenizer: {0}")]
    Tokenizer(#[source] Box<dyn std::error::Error + Send + Sync>),

    #[error("{0} defines no chat template")]
    NoChatTemplate(PathBuf),

    #[error("chat template {0}")]
    BadTemplateConfig(String),

    #[error("chat messages: {0}")]
    InvalidMessages(String),

    /// The template called `raise_exception(message)`: the conversation is one it refuses.
    #[error("the chat template refused the conversation: {0}")]
    TemplateRaised(String),

    #[error("chat template: {0:#}")]
    Template(#[source] minijinja::Error),

    /// The decoder rewrote text it had already produced once more ids followed; only a decoder that changes
    /// earlier text depending on later tokens does that, and streaming cannot undo text already sent.
    #[error("streaming decode diverged at token {token_id}: expected a continuation of {expected:?}, got {actual:?}")]
    StreamDiverged { token_id: u32, expected: String, actual: String },
}

pub type Result<T, E = TextError> = std::result::Result<T, E>;
