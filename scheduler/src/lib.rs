//! minisgl's scheduler: everything that is CPU work in serving a model.
//!
//! A request's path: `server::zmq` (the ZeroMQ socket) or `server::http` (the OpenAI API) -> `server::serve`
//! (the loop that owns the hub) -> `server::hub` (validate, tokenize) -> `engine` (its own thread) -> `core`
//! (queue, pages, batch: plans each step into the step ring) -> the worker -> the result ring -> `core` (stop
//! conditions) -> `server::hub` (detokenize, stop strings) -> back out of the door it came in by.

pub mod core;
pub mod engine;
pub mod grammar;
pub mod metrics;
pub mod model_files;
pub mod server;
pub mod step_stats;
pub mod text;
pub mod worker;
