//! Our HTTP front end over an engine that costs nothing: every admitted request is answered at once with
//! `max_tokens` one-token deltas. It measures what a benchmark client can drive (its ceiling) and what the
//! front end itself can stream, with no model in the way:
//!
//! `cargo run --release -p minisgl-scheduler --example instant_server -- 127.0.0.1:8100`
//! then `minisgl bench serve --base-url http://127.0.0.1:8100 ...`.

use proto::api::{Delta, Final, FinishReason, ServerMsg};
use scheduler::server::http::{self, Api, Call};
use std::sync::Arc;
use tokio::sync::mpsc::unbounded_channel;

fn main() -> anyhow::Result<()> {
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8100".into());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(threads).enable_all().build()?;
    runtime.block_on(async move {
        let (calls, mut call_rx) = unbounded_channel();
        let listener = http::bind(&addr).await?;
        http::spawn(listener, Arc::new(Api::new(calls, "instant".into(), 1 << 20)));
        eprintln!("instant_server on http://{addr}/v1");
        while let Some(call) = call_rx.recv().await {
            match call {
                Call::Generate { generate, accepted, replies, .. } => {
                    let _ = accepted.send(Ok(()));
                    let n = u32::try_from(generate.sampling.max_tokens).unwrap_or(16).clamp(1, 1 << 16);
                    let samples = u32::try_from(generate.n).unwrap_or(1).max(1);
                    let rid = generate.rid;
                    for index in 0..samples {
                        for _ in 0..n {
                            let text = " word".into();
                            let delta = Delta {
                                rid: rid.clone(),
                                index,
                                token_ids: vec![42],
                                text,
                                logprobs: None,
                                prompt_logprobs: None,
                                prompt_token_ids: None,
                                tool_calls: None,
                            };
                            let _ = replies.send(ServerMsg::Delta(delta));
                        }
                        let _ = replies.send(ServerMsg::Final(Final {
                            rid: rid.clone(),
                            index,
                            finish_reason: FinishReason::Length,
                            prompt_tokens: 1,
                            completion_tokens: n,
                            cached_tokens: 0,
                            token_ids: vec![42; n as usize],
                            text: " word".repeat(n as usize),
                            message: None,
                            logprobs: None,
                            prompt_logprobs: None,
                            prompt_token_ids: None,
                            tool_calls: None,
                        }));
                    }
                }
                Call::Health(reply) => {
                    let _ = reply.send(0);
                }
                Call::Gone(_) => {}
            }
        }
        Ok(())
    })
}
