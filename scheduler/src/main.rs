//! `minisgl-sched`: the scheduler daemon. Wiring only: open the HTTP API (it reports the start), load the text
//! side of the model, shake hands with the worker, start the engine thread, serve the request socket and the
//! HTTP API until a signal's drain ends or the worker dies.

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use proto::api::InfoMsg;
use scheduler::core::{Core, Limits, Order, Policy};
use scheduler::engine::{BurstWindow, Command, Engine};
use scheduler::grammar::{Constraints, MASK_THREADS, MaskPool};
use scheduler::metrics::Metrics;
use scheduler::model_files::ModelFiles;
use scheduler::server::connections::DEFAULT_MAX_CONNECTIONS;
use scheduler::server::hub::{DEFAULT_MAX_CLIENT_REQUESTS, DEFAULT_MAX_WAITING};
use scheduler::server::serve::{self, Ended, Lifecycle};
use scheduler::server::status::{Phase, Status};
use scheduler::server::{Hub, PromptLimits, http};
use scheduler::text::{ChatTemplate, TokenTable, Tokenizer};
use scheduler::worker::{self, RingPlan};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

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
    /// Require `Authorization: Bearer KEY` on the HTTP API's /v1 routes (prefer the environment variable: a
    /// command line is visible to every user of the machine). The ZeroMQ socket has no authentication.
    #[arg(long, env = "MINISGL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// After SIGTERM or Ctrl-C, how long live requests may run before they are ended; new ones are refused
    /// meanwhile. A second signal stops at once.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    shutdown_timeout: f64,
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
    /// Prefill every prompt whole instead of reusing the KV pages of earlier prompts with the same start.
    #[arg(long)]
    no_prefix_cache: bool,
    /// Admission order of waiting requests: fcfs (arrival order), or lpm (longest cached prefix first).
    #[arg(long, value_enum, default_value_t = SchedulePolicy::Fcfs)]
    schedule_policy: SchedulePolicy,
    /// With lpm: steps after which a waiting request goes first in arrival order, so that none starves.
    #[arg(long, default_value_t = Policy::default().max_wait_steps, value_name = "STEPS")]
    lpm_max_wait_steps: u64,
    /// Most requests (each of n samples counting) accepted and still waiting for their first token; past it a
    /// request is refused at once: HTTP 503 with Retry-After, ZeroMQ error `overloaded`.
    #[arg(long, default_value_t = DEFAULT_MAX_WAITING, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_waiting: u32,
    /// Most live requests of one ZeroMQ client; past it a `generate` is refused (error `too_many_requests`).
    #[arg(long, default_value_t = DEFAULT_MAX_CLIENT_REQUESTS, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_client_requests: u32,
    /// Most HTTP connections open at once; past it a new connection gets a 503 (`too_many_connections`).
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,
    /// Slots per ring.
    #[arg(long, default_value_t = 4)]
    ring_slots: u32,
    /// How long to wait for the worker to load the model and say hello.
    #[arg(long, default_value_t = 900)]
    handshake_timeout_s: u64,
    /// Log filter: a level (error, warn, info, debug, trace) or tracing's EnvFilter syntax.
    #[arg(long, env = "MINISGL_LOG", default_value = "info")]
    log_level: String,
    /// Log lines as text, or as one JSON object each (fields such as request_id stay separate).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SchedulePolicy {
    Fcfs,
    Lpm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if !args.log_level.contains("zeromq") {
        // The zeromq crate warns on every stop that an ipc socket file it meant to delete is gone: we delete it
        // ourselves, since the crate's own removal runs in a task the runtime may not get to.
        filter = filter.add_directive("zeromq::transport::ipc=error".parse().expect("a valid directive"));
    }
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }
    if !args.shutdown_timeout.is_finite() || args.shutdown_timeout < 0.0 {
        tracing::error!("--shutdown-timeout must be a number of seconds, 0 or more");
        return ExitCode::FAILURE;
    }
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
    let mut signals = shutdown_signals();
    // Before the worker spends minutes loading weights: a taken port should fail the start at once.
    let http_listener = match args.http.as_str() {
        "off" => None,
        addr => Some(http::bind(addr).await?),
    };
    let files = ModelFiles::load(&args.model)?;
    let status = Arc::new(Status::new(Phase::Starting("waiting for the worker".into())));
    let metrics = Arc::new(Metrics::default());
    // The API answers from now on: /health says what the start waits for, requests get a 503 until it serves.
    let (calls, call_rx) = unbounded_channel();
    let mut http_server = None;
    let api = http_listener.map(|listener| {
        let model = args.served_model_name.clone().unwrap_or_else(|| files.name.clone());
        let max_seq_len = args.max_seq_len.unwrap_or(files.max_position_embeddings);
        let api = http::Api::new(calls, model, max_seq_len)
            .with_status(status.clone())
            .with_metrics(metrics.clone())
            .with_api_key(args.api_key.clone())
            .with_max_connections(args.max_connections);
        let api = Arc::new(api);
        http_server = Some(http::spawn(listener, api.clone()));
        api
    });
    let tokenizer = Arc::new(Tokenizer::from_model_dir(&files.dir).context("loading tokenizer.json")?);
    let chat = ChatTemplate::from_model_dir(&files.dir).ok();
    if chat.is_none() {
        tracing::warn!("{} has no chat template: chat messages will be refused", files.name);
    }

    let mut limits = None;
    let on_status = |phase: &str| status.set(Phase::Starting(format!("the worker is {phase}")));
    let handshake = worker::handshake(
        &args.control,
        &args.shm_prefix,
        Duration::from_secs(args.handshake_timeout_s),
        on_status,
        |hello| {
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
                vocab_size: hello.model.vocab_size,
            };
            l.validate()?;
            let plan = RingPlan { capacity: l.capacity(), slot_count: args.ring_slots };
            limits = Some(l);
            Ok(plan)
        },
    );
    let worker = tokio::select! {
        w = handshake => w?,
        _ = signals.recv() => return Ok(ExitCode::SUCCESS), // nothing to drain yet
    };
    let limits = limits.expect("the plan ran during the handshake");
    let facts = http::EngineFacts {
        model_dir: files.dir.display().to_string(),
        model_type: files.model_type.clone(),
        architectures: files.architectures.clone(),
        tp_size: worker.pids.len() as u32,
        max_batch: limits.max_batch,
        max_step_tokens: limits.max_step_tokens,
        page_size: limits.page_size,
        num_pages: limits.num_pages,
    };
    let policy = Policy {
        prefix_cache: !args.no_prefix_cache,
        order: match args.schedule_policy {
            SchedulePolicy::Fcfs => Order::Fcfs,
            SchedulePolicy::Lpm => Order::Lpm,
        },
        max_wait_steps: args.lpm_max_wait_steps,
    };
    tracing::info!(
        "serving {}: context {} tokens, up to {} requests and {} tokens per step, {} waiting; prefix cache {}, \
         {:?} order",
        files.name,
        limits.max_seq_len,
        limits.max_batch,
        limits.max_step_tokens,
        args.max_waiting,
        if policy.prefix_cache { "on" } else { "off" },
        args.schedule_policy
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
    let tokens = Arc::new(TokenTable::new(&tokenizer));
    let constraints = {
        let (tokenizer, tokens, eos, vocab) =
            (tokenizer.clone(), tokens.clone(), limits.eos_token_ids.clone(), limits.vocab_size);
        tokio::task::spawn_blocking(move || Constraints::new(tokenizer, &tokens, &eos, vocab)).await?
    };
    let (constraints, masks) = match constraints {
        Ok(c) => {
            let pool = MaskPool::spawn(MASK_THREADS, c.mask_words(), commands.clone())?;
            (Some(Arc::new(c)), Some(pool))
        }
        Err(e) => {
            tracing::warn!("structured output is off: {e:#}");
            (None, None)
        }
    };
    let hub = Hub::new(tokenizer.clone(), chat, hub_limits, info, commands.clone(), metrics.clone())
        .with_max_waiting(args.max_waiting)
        .with_max_client_requests(args.max_client_requests)
        .with_constraints(constraints);
    let engine = Engine {
        core: Core::with_policy(limits, policy)?,
        step_ring: worker.step_ring,
        result_ring: worker.result_ring,
        commands: command_rx,
        outputs: output_tx,
        burst: BurstWindow::default(),
        metrics,
        masks,
    };
    let engine_thread = engine.spawn_with(!args.no_overlap)?;
    if let Some(api) = &api {
        api.set_max_seq_len(hub_max_seq_len);
        api.set_text(http::TextSide { preparer: hub.preparer().clone(), tokens });
        api.set_facts(facts);
    }

    // With the API off, the loop finds the call channel closed at once and stops watching it.
    let life = Lifecycle { signals, drain_timeout: Duration::from_secs_f64(args.shutdown_timeout), status };
    let ended = serve::serve(&args.listen, hub, outputs, call_rx, life).await?;
    let _ = commands.send(Command::Shutdown);
    // The engine thread tells the worker to exit and unlinks the rings as it drops them.
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    if let Some(server) = http_server {
        server.finish(Duration::from_secs(5)).await;
    }
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

/// One message per Ctrl-C or SIGTERM, for as long as the receiver lives.
fn shutdown_signals() -> UnboundedReceiver<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = unbounded_channel();
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("a SIGINT handler");
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = interrupt.recv() => {}
            }
            if tx.send(()).is_err() {
                return;
            }
        }
    });
    rx
}
