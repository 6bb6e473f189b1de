//! The edges clients touch: the request hub (validation, tokenization, detokenization; no I/O) and the
//! ZeroMQ request socket that drives it.

pub mod hub;
pub mod zmq;

pub use hub::{Hub, Peer, PromptLimits};
