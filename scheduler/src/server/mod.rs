//! The edges clients touch: the request hub (admission, detokenization; no I/O), the preparation of prompts
//! (validation, chat template, tokenization; run off the serve loop's thread), the two front
//! doors that feed it (the ZeroMQ request socket and the OpenAI-compatible HTTP API), and the serve loop that
//! owns the hub and joins them.

pub mod connections;
pub mod http;
pub mod hub;
pub mod liveness;
pub mod messages;
pub mod openai;
pub mod prepare;
pub mod serve;
pub mod status;
pub mod tool_stream;
pub mod zmq;

pub use hub::{Hub, Peer, PromptLimits};
