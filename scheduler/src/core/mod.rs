//! The scheduling core: plain synchronous Rust, no I/O.
//!
//! It decides what each step runs and writes it into a step slot; the engine thread around it only moves bytes.
//! Keeping every decision here, away from sockets and rings, is what lets the policy be tested exhaustively with
//! a fake worker (see `scheduler/tests/core_*.rs`). [`Core`] documents the policy; each module holds one idea:
//!
//! - `request`: what the engine submits, and the state of a live request;
//! - `queue`: the FCFS waiting queue; `running`: admitted requests by worker slot, in admission order;
//! - `index_pool`: the free list behind KV pages and request slots, whose frees can wait for a step in flight;
//!   `page_table`: one request's pages; `prefix_cache`: the radix tree of cached pages, locked by the requests
//!   that use them and evicted least recently used first;
//! - `policy`: the operator's choices (prefix cache on or off, admission order);
//! - `step_writer`: encoding a step into the slot's arrays; `stop`: stop conditions on token ids;
//! - `planned`: a step in flight and the events it produced; `limits`: the sizes agreed with the worker;
//! - `scheduler`: the state machine tying them together, split by concern into `scheduler/admission.rs` (queue
//!   order, what fits beside its cached prefix, the prefill part of a step), `scheduler/decode.rs` (pages for the
//!   next decode, preemption, the decode part of a step) and `scheduler/invariants.rs` (the bookkeeping's checks).

mod index_pool;
mod limits;
mod page_table;
mod planned;
mod policy;
mod prefix_cache;
mod queue;
mod request;
mod running;
mod scheduler;
mod step_writer;
mod stop;

pub use limits::{InvalidLimits, Limits};
pub use planned::{CacheStats, Event, LogprobsAt, Planned, PlannedReq};
pub use policy::{Order, Policy};
pub use request::{FinishReason, NewRequest, ReqId, SamplingParams, SubmitError};
pub use scheduler::Core;
