//! `minisgl-sched`: the scheduler daemon. Wiring only: load the text side of the model, shake hands with the
//! worker, start the engine thread, serve the request socket and the HTTP API until a signal or the worker's
//! death.

use anyhow::{Context, Result};
use clap::Parser;
use proto::api::InfoMsg;
use scheduler::core::{Core, Limits};
use scheduler::engine::{BurstWindow, Command, Engine};
use scheduler::model_files::ModelFiles;
use scheduler::server::serve::{self, Ended};
use scheduler::server::{Hub, PromptLimits, http};
use scheduler::text::{ChatTemplate, Tokenizer};
use scheduler::worker::{self, RingPlan};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "minisgl-sched", version, about = "minisgl's scheduler daemon")]
struct Args {
    /// HF checkpoint directory: tokenizer.json, tokenizer_config.json, config.json, generation_config.json.
    #[arg(long, default_value = "models/Qwen2.5-Coder-0.5B-Instruct")]
    model: PathBuf,
    /// The request socket clients connect to (ZeroMQ endpoint). Loopback unless you say otherwise.
    #[arg(long, default_value = "tcp://127.0.0.1:5557")]
    listen: String,
    /// The OpenAI-compatible HTTP API's address (host:port), or `off`. Loopback unless you say otherwise.
    #[arg(long, default_value = "127.0.0.1:8000")]
    http: String,
    /// The model name the HTTP API reports and answers with (default: the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// The worker's handshake socket (a ZeroMQ ipc:// endpoint).
    #[arg(long)]
    control: String,
    /// Prefix of the shared-memory segments' names under /dev/shm.
    #[arg(long, default_value_t = format!("minisgl-{}", std::process::id()))]
    shm_prefix: String,
    /// Context length: prompt plus generated tokens (default: the model's).
    #[arg(long)]
    max_seq_len: Option<u32>,
    /// Most requests running at once (default and ceiling: the worker's).
    #[arg(long)]
    max_batch: Option<u32>,
    /// Most new tokens in one step; longer prompts are prefilled in chunks (default and ceiling: the worker's).
    #[arg(long)]
    max_step_tokens: Option<u32>,
    /// Keep one step in flight instead of planning the next while the worker runs one (for measurement).
    #[arg(long)]
    no_overlap: bool,
    /// Slots per ring.
    #[arg(long, default_value_t = 4)]
    ring_slots: u32,
    /// How long to wait for the worker to load the model and say hello.
    #[arg(long, default_value_t = 900)]
    handshake_timeout_s: u64,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing's EnvFilter syntax.
    #[arg(long, env = "MINISGL_LOG", default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    match runtime.map_err(anyhow::Error::from).and_then(|rt| rt.block_on(run(args))) {
        Ok(code) => code,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<ExitCode> {
    // Before the worker spends minutes loading weights: a taken port should fail the start at once.
    let http_listener = match args.http.as_str() {
        "off" => None,
        addr => Some(http::bind(addr).await?),
    };
    let files = ModelFiles::load(&args.model)?;
    let tokenizer = Arc::new(Tokenizer::from_model_dir(&files.dir).context("loading tokenizer.json")?);
    let chat = ChatTemplate::from_model_dir(&files.dir).ok();
    if chat.is_none() {
        tracing::warn!("{} has no chat template: chat messages will be refused", files.name);
    }

    let mut limits = None;
    let handshake =
        worker::handshake(&args.control, &args.shm_prefix, Duration::from_secs(args.handshake_timeout_s), |hello| {
            let l = Limits {
                max_batch: args.max_batch.map_or(hello.max_batch, |b| b.min(hello.max_batch)),
                max_step_tokens: args.max_step_tokens.map_or(hello.max_tokens, |t| t.min(hello.max_tokens)),
                num_pages: hello.num_pages,
                page_size: hello.page_size,
                max_seq_len: args
                    .max_seq_len
                    .unwrap_or(files.max_position_embeddings)
                    .min(hello.model.max_position_embeddings),
                eos_token_ids: files.eos_token_ids.clone(),
            };
            l.validate()?;
            let plan = RingPlan { capacity: l.capacity(), slot_count: args.ring_slots };
            limits = Some(l);
            Ok(plan)
        });
    let worker = tokio::select! {
        w = handshake => w?,
        () = shutdown_signal() => return Ok(ExitCode::SUCCESS),
    };
    let limits = limits.expect("the plan ran during the handshake");
    tracing::info!(
        "serving {}: context {} tokens, up to {} requests and {} tokens per step",
        files.name,
        limits.max_seq_len,
        limits.max_batch,
        limits.max_step_tokens
    );

    let (commands, command_rx) = std::sync::mpsc::channel();
    let (output_tx, outputs) = tokio::sync::mpsc::unbounded_channel();
    let info = InfoMsg {
        model: files.name.clone(),
        vocab_size: files.vocab_size,
        max_seq_len: limits.max_seq_len,
        max_batch: limits.max_batch,
        page_size: limits.page_size,
        num_pages: limits.num_pages,
        eos_token_ids: limits.eos_token_ids.clone(),
        live_requests: 0,
    };
    let hub_limits = PromptLimits {
        vocab_size: files.vocab_size,
        max_seq_len: limits.max_seq_len,
        max_prompt_len: limits.max_prompt_len(),
    };
    let hub_max_seq_len = hub_limits.max_seq_len;
    let hub = Hub::new(tokenizer, chat, hub_limits, info, commands.clone());
    let engine = Engine {
        core: Core::new(limits)?,
        step_ring: worker.step_ring,
        result_ring: worker.result_ring,
        commands: command_rx,
        outputs: output_tx,
        burst: BurstWindow::default(),
    };
    let engine_thread = engine.spawn_with(!args.no_overlap)?;

    // With the API off, the loop finds the channel closed at once and stops watching it.
    let (calls, call_rx) = tokio::sync::mpsc::unbounded_channel();
    if let Some(listener) = http_listener {
        let model = args.served_model_name.clone().unwrap_or_else(|| files.name.clone());
        http::spawn(listener, http::Api::new(calls, model, hub_max_seq_len));
    } else {
        drop(calls);
    }

    let ended = serve::serve(&args.listen, hub, outputs, call_rx, shutdown_signal()).await?;
    let _ = commands.send(Command::Shutdown);
    // The engine thread tells the worker to exit and unlinks the rings as it drops them.
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    match ended {
        Ended::Shutdown => {
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Ended::EngineFailed(why) => {
            tracing::error!("stopping: {why}");
            Ok(ExitCode::from(3))
        }
    }
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
