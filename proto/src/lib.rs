//! The contract between minisgl's processes, and nothing else: see docs/protocol.md.

pub mod api;
pub mod ring;
pub mod step;
pub mod tool_call;
