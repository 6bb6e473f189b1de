//! The OpenAI-compatible HTTP API (docs/http.md). Handlers turn requests into hub calls sent to the serve loop
//! (`serve.rs`), the one owner of the hub, and turn what comes back into responses or SSE streams; the JSON
//! mapping is `openai/`. `/tokenize` and `/detokenize` need no hub: they run on blocking threads here.
//!
//! Each HTTP request is a hub peer of its own (`Peer::Http(n)`), so its id cannot collide with a ZeroMQ
//! client's. A request whose handler is dropped (the client disconnected, mid-stream or while waiting) is
//! aborted: the `Ticket` it holds tells the loop when it goes.
//!
//! The API answers from the moment the process starts: until the engine serves, `/health` says what it is
//! waiting for and requests get a 503 at once (`status.rs`). With an API key, every `/v1` route requires it;
//! `/health` and `/metrics` stay open for probes and scrapers.

use super::openai::{self, ApiError, Chunks, Endpoint, LogprobText, Reply};
use super::prepare::Preparer;
use super::status::{Phase, Status};
use crate::metrics::{self, Metrics};
use crate::text::TokenTable;
use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use futures_core::Stream;
use proto::api::{Generate, Prompt, Rejection, ServerMsg};
use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context as TaskContext, Poll, ready};
use tokio::net::TcpListener;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;

/// What HTTP handlers ask of the serve loop.
pub enum Call {
    /// Admit request `generate` as peer `Http(id)`. The verdict goes to `accepted`; then, if admitted, the
    /// request's replies (deltas, then its final) go to `replies`.
    Generate {
        id: u64,
        generate: Box<Generate>,
        accepted: oneshot::Sender<Result<(), Rejection>>,
        replies: UnboundedSender<ServerMsg>,
    },
    /// Request `Http(id)`'s handler is gone before its final: abort it.
    Gone(u64),
    /// Liveness: the loop answers with the number of live requests.
    Health(oneshot::Sender<usize>),
}

/// What the handlers share.
pub struct Api {
    calls: UnboundedSender<Call>,
    model: String,
    /// The context length: the model's until the worker's limits are known, then the served one.
    max_seq_len: AtomicU32,
    started: u64,
    next_id: AtomicU64,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
    api_key: Option<String>,
    /// The tokenizer's side, once the engine serves: `/tokenize`, echoed token prompts, logprob tokens.
    text: OnceLock<TextSide>,
    /// Connections held open at most (`--max-connections`, `connections.rs`).
    max_connections: u32,
    /// What the engine runs, once the worker said hello: `/server_info` and `/model_info`.
    facts: OnceLock<EngineFacts>,
}

/// What a router asks an engine about itself (sglang-router reads `/server_info` and `/model_info` when it
/// registers a worker, SGLang's names and shapes; docs/http.md).
#[derive(Clone, Debug, Default)]
pub struct EngineFacts {
    /// The checkpoint directory on the engine's host.
    pub model_dir: String,
    /// config.json's `model_type` and `architectures`.
    pub model_type: Option<String>,
    pub architectures: Vec<String>,
    pub tp_size: u32,
    pub max_batch: u32,
    pub max_step_tokens: u32,
    pub page_size: u32,
    pub num_pages: u32,
}

/// The largest request body taken (axum's default, made explicit so that the 413 can say it).
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// What the handlers need of the tokenizer.
#[derive(Clone)]
pub struct TextSide {
    /// Renders and tokenizes prompts as the hub's requests are (`/tokenize`).
    pub preparer: Preparer,
    /// Every token's bytes: the `token` and `bytes` of logprobs.
    pub tokens: Arc<TokenTable>,
}

impl Api {
    /// `model` is the name the API serves under; `max_seq_len` the context length. It serves at once, with
    /// metrics of its own and no key, unless told otherwise.
    pub fn new(calls: UnboundedSender<Call>, model: String, max_seq_len: u32) -> Self {
        Api {
            calls,
            model,
            max_seq_len: AtomicU32::new(max_seq_len),
            started: unix_seconds(),
            next_id: AtomicU64::new(0),
            status: Arc::new(Status::new(Phase::Serving)),
            metrics: Arc::default(),
            api_key: None,
            text: OnceLock::new(),
            max_connections: super::connections::DEFAULT_MAX_CONNECTIONS,
            facts: OnceLock::new(),
        }
    }

    /// Hands the handlers the tokenizer's side, when the engine is about to serve (the first one set stays).
    pub fn set_text(&self, text: TextSide) {
        let _ = self.text.set(text);
    }

    /// Hands `/server_info` and `/model_info` what the engine runs (the first one set stays).
    pub fn set_facts(&self, facts: EngineFacts) {
        let _ = self.facts.set(facts);
    }

    /// Follows `status` instead of always serving.
    pub fn with_status(self, status: Arc<Status>) -> Self {
        Api { status, ..self }
    }

    pub fn with_metrics(self, metrics: Arc<Metrics>) -> Self {
        Api { metrics, ..self }
    }

    pub fn with_max_connections(self, max_connections: u32) -> Self {
        Api { max_connections, ..self }
    }

    /// Requires `Authorization: Bearer <key>` on every `/v1` route.
    pub fn with_api_key(self, api_key: Option<String>) -> Self {
        Api { api_key, ..self }
    }

    pub fn set_max_seq_len(&self, max_seq_len: u32) {
        self.max_seq_len.store(max_seq_len, Ordering::Relaxed);
    }

    fn max_seq_len(&self) -> u32 {
        self.max_seq_len.load(Ordering::Relaxed)
    }
}

/// Binds the API's address early, so that a taken port fails the start, not the first request.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the HTTP API on {addr} (--http)"))
}

/// The API being served. Dropping it leaves the API serving until the runtime stops.
pub struct Serving {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Serving {
    /// Stops taking connections and waits, up to `within`, until the responses under way are written. The
    /// last request of a drain ends just before the process exits, and its response went down with the
    /// runtime when the exit came first (seen with two engines sharing two busy cores).
    pub async fn finish(self, within: std::time::Duration) {
        let _ = self.stop.send(());
        if tokio::time::timeout(within, self.task).await.is_err() {
            tracing::warn!("HTTP responses still under way {within:?} after the end: dropping them");
        }
    }
}

/// Serves the API on `listener` until the runtime stops, or [`Serving::finish`].
pub fn spawn(listener: TcpListener, api: Arc<Api>) -> Serving {
    match listener.local_addr() {
        Ok(addr) => tracing::info!("OpenAI-compatible HTTP API on http://{addr}/v1"),
        Err(e) => tracing::warn!("the HTTP API's address: {e}"),
    }
    // Without TCP_NODELAY the first small write of a response (an SSE chunk) waits for the client's delayed
    // ACK: Nagle's algorithm cost every stream's first token about 40 ms on the H200.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    });
    let listener = super::connections::Limited::new(listener, api.max_connections);
    let app = router(api);
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        if stopped.await.is_err() {
            std::future::pending::<()>().await; // dropped, not finished: serve on
        }
    };
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!("the HTTP API stopped: {e}");
        }
    });
    Serving { stop, task }
}

pub fn router(api: Arc<Api>) -> Router {
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        // SGLang's names for them, with and without its older `get_`: sglang-router asks for both.
        .route("/server_info", get(server_info))
        .route("/get_server_info", get(server_info))
        .route("/model_info", get(model_info))
        .route("/get_model_info", get(model_info))
        .route_layer(middleware::from_fn_with_state(api.clone(), require_key));
    Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/get_load", get(load))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api)
}

async fn require_key(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let Some(key) = &api.api_key else { return next.run(request).await };
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match given.and_then(|v| v.strip_prefix("Bearer ")) {
        Some(token) if same_secret(token.trim().as_bytes(), key.as_bytes()) => next.run(request).await,
        Some(_) => error_response(&ApiError::new(401, "invalid_api_key", "the API key is not valid")),
        None => error_response(&ApiError::new(
            401,
            "invalid_api_key",
            "an API key is required: send it as `Authorization: Bearer <key>`",
        )),
    }
}

/// Compares in time that depends only on the lengths, so a wrong key's answer does not tell how much of it
/// was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn completions(State(api): State<Arc<Api>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    generate(&api, Endpoint::Completions, &headers, body).await
}

async fn chat_completions(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    generate(&api, Endpoint::Chat, &headers, body).await
}

/// The tokenizer's side, or the 503 that says why the engine is not serving yet.
fn text_side(api: &Api) -> Result<TextSide, ApiError> {
    if let Some(refusal) = not_serving(api.status.get()) {
        return Err(refusal);
    }
    api.text.get().cloned().ok_or_else(|| ApiError::new(503, "engine_starting", "the tokenizer is not loaded yet"))
}

fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        let status = rejection.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            let message =
                format!("the request body is larger than {} MiB, the most this server takes", MAX_BODY_BYTES >> 20);
            return ApiError::new(413, "request_too_large", message);
        }
        ApiError::new(status.as_u16(), "invalid_body", rejection.body_text())
    })
}

/// `{prompt | messages, add_special_tokens?, add_generation_prompt?}` -> `{tokens, count, max_model_len}`: the
/// ids a completion request of the same prompt is given (vLLM's and SGLang's shape).
async fn tokenize(State(api): State<Arc<Api>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let side = text_side(&api)?;
        let (request, what) = openai::parse_tokenize(&body_or_error(body)?)?;
        let max_model_len = api.max_seq_len();
        let work = move || -> Result<serde_json::Value, ApiError> {
            let refused = |(param, message): (Option<String>, String)| ApiError {
                param,
                ..ApiError::new(400, "invalid_params", message)
            };
            let preparer = &side.preparer;
            let tokens = match what {
                openai::ToTokenize::Prompt(text) => {
                    let add = request.add_special_tokens.unwrap_or(false);
                    let encoded = preparer.tokenizer().encode_with(&text, add);
                    encoded.map_err(|e| ApiError::invalid("prompt", format!("tokenizing: {e}")))?
                }
                openai::ToTokenize::Messages(messages, tools) => {
                    let add_generation_prompt = request.add_generation_prompt.unwrap_or(true);
                    let text = preparer
                        .render_with_tools(&messages, add_generation_prompt, tools.as_ref())
                        .map_err(refused)?;
                    preparer.tokenize(Prompt::Text(&text)).map_err(refused)?
                }
            };
            let mut body = serde_json::json!({"tokens": tokens, "count": tokens.len(), "max_model_len": max_model_len});
            if request.return_token_strs == Some(true) {
                let strs: Vec<_> = tokens.iter().map(|&t| side.tokens.text(t).into_owned()).collect();
                body["token_strs"] = strs.into();
            }
            Ok(body)
        };
        tokio::task::spawn_blocking(work)
            .await
            .map_err(|_| ApiError::new(500, "internal_error", "tokenizing failed"))?
    };
    match run.await {
        Ok(body) => json_response(StatusCode::OK, body.to_string()),
        Err(e) => error_response(&e),
    }
}

/// `{tokens}` -> `{prompt}`: the text of token ids, special tokens included (what `/tokenize` gives back).
async fn detokenize(State(api): State<Arc<Api>>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let side = text_side(&api)?;
        let request = openai::parse_detokenize(&body_or_error(body)?)?;
        let vocab = side.preparer.limits().vocab_size;
        if let Some(bad) = request.tokens.iter().position(|&t| t >= vocab) {
            let message = format!("token id {} is outside the vocabulary (0..{vocab})", request.tokens[bad]);
            return Err(ApiError::invalid(format!("tokens[{bad}]"), message));
        }
        let work = move || side.preparer.tokenizer().decode_with(&request.tokens, false);
        match tokio::task::spawn_blocking(work).await {
            Ok(Ok(prompt)) => Ok(serde_json::json!({"prompt": prompt})),
            Ok(Err(e)) => Err(ApiError::invalid("tokens", format!("detokenizing: {e}"))),
            Err(_) => Err(ApiError::new(500, "internal_error", "detokenizing failed")),
        }
    };
    match run.await {
        Ok(body) => json_response(StatusCode::OK, body.to_string()),
        Err(e) => error_response(&e),
    }
}

async fn models(State(api): State<Arc<Api>>) -> Response {
    json_response(StatusCode::OK, openai::models_body(&api.model, api.started, api.max_seq_len()).to_string())
}

fn facts(api: &Api) -> Result<&EngineFacts, ApiError> {
    api.facts.get().ok_or_else(|| ApiError::new(503, "engine_starting", "the worker has not said hello yet"))
}

/// SGLang's `/server_info`, the fields a router reads: one replica (`dp_size` 1) of `tp_size` ranks, and its
/// limits.
async fn server_info(State(api): State<Arc<Api>>) -> Response {
    let body = facts(&api).map(|f| {
        serde_json::json!({
            "model_path": f.model_dir,
            "tokenizer_path": f.model_dir,
            "served_model_name": api.model,
            "tp_size": f.tp_size,
            "dp_size": 1,
            "context_length": api.max_seq_len(),
            "max_running_requests": f.max_batch,
            "max_prefill_tokens": f.max_step_tokens,
            "max_total_num_tokens": u64::from(f.num_pages) * u64::from(f.page_size),
            "page_size": f.page_size,
            "version": env!("CARGO_PKG_VERSION"),
        })
    });
    match body {
        Ok(body) => json_response(StatusCode::OK, body.to_string()),
        Err(e) => error_response(&e),
    }
}

/// SGLang's `/model_info`.
async fn model_info(State(api): State<Arc<Api>>) -> Response {
    let body = facts(&api).map(|f| {
        serde_json::json!({
            "model_path": f.model_dir,
            "tokenizer_path": f.model_dir,
            "served_model_name": api.model,
            "is_generation": true,
            "model_type": f.model_type,
            "architectures": f.architectures,
        })
    });
    match body {
        Ok(body) => json_response(StatusCode::OK, body.to_string()),
        Err(e) => error_response(&e),
    }
}

/// SGLang's `/get_load`: one entry per data-parallel rank (we are one), requests and the KV tokens they hold.
/// Open like `/metrics`, whose gauges it reads: it tells how busy the engine is, nothing of what it serves.
async fn load(State(api): State<Arc<Api>>) -> Response {
    let m = &api.metrics;
    let (waiting, running) = (m.waiting.get(), m.running.get());
    let page_size = api.facts.get().map_or(0, |f| i64::from(f.page_size));
    let body = serde_json::json!([{
        "dp_rank": 0,
        "num_reqs": waiting + running,
        "num_waiting_reqs": waiting,
        "num_tokens": m.held_pages() * page_size,
    }]);
    json_response(StatusCode::OK, body.to_string())
}

/// 200 while serving; 503 while starting (with what it waits for), draining or stopped.
async fn health(State(api): State<Arc<Api>>) -> Response {
    let phase = api.status.get();
    let mut body = serde_json::json!({ "status": phase.word() });
    if let Phase::Starting(reason) = &phase {
        body["reason"] = reason.as_str().into();
    }
    if matches!(phase, Phase::Serving | Phase::Draining) {
        let (tx, rx) = oneshot::channel();
        let live = match api.calls.send(Call::Health(tx)) {
            Ok(()) => rx.await.ok(),
            Err(_) => None,
        };
        match live {
            Some(live) => body["live_requests"] = live.into(),
            None => return error_response(&engine_gone()),
        }
    }
    let status = if phase == Phase::Serving { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    json_response(status, body.to_string())
}

async fn metrics_text(State(api): State<Arc<Api>>) -> Response {
    (StatusCode::OK, [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], api.metrics.render()).into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error_response(&ApiError::new(404, "not_found", format!("no such endpoint: {method} {}", uri.path())))
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let message = format!("{} does not accept {method}", uri.path());
    error_response(&ApiError::new(405, "method_not_allowed", message))
}

fn engine_gone() -> ApiError {
    ApiError::unavailable("the engine is not running")
}

/// Why a request cannot be taken now, when the engine is not serving.
fn not_serving(phase: Phase) -> Option<ApiError> {
    match phase {
        Phase::Serving => None,
        Phase::Starting(reason) => {
            Some(ApiError::new(503, "engine_starting", format!("the engine is starting ({reason}): try again soon")))
        }
        Phase::Draining => Some(ApiError::new(503, "shutting_down", "the server is shutting down")),
        Phase::Stopped => Some(engine_gone()),
    }
}

/// A client's `X-Request-Id`, when it is one we can log and echo as it is.
fn client_request_id(headers: &HeaderMap) -> Option<&str> {
    let id = headers.get("x-request-id")?.to_str().ok()?;
    let fits = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic());
    fits.then_some(id)
}

/// Every response to a generate request carries its id, `X-Request-Id`: the id its log lines name.
async fn generate(api: &Api, endpoint: Endpoint, headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let id = api.next_id.fetch_add(1, Ordering::Relaxed);
    let rid = match client_request_id(headers) {
        Some(theirs) => format!("{}-{theirs}", endpoint.id_prefix()),
        None => format!("{}-{id}", endpoint.id_prefix()),
    };
    let mut response = match not_serving(api.status.get()) {
        Some(refusal) => error_response(&refusal),
        None => run_request(api, endpoint, id, &rid, body).await,
    };
    if let Ok(value) = HeaderValue::from_str(&rid) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

async fn run_request(
    api: &Api,
    endpoint: Endpoint,
    id: u64,
    rid: &str,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body_or_error(body) {
        Ok(body) => body,
        Err(e) => return error_response(&e),
    };
    let parsed = match endpoint {
        Endpoint::Completions => openai::parse_completion(&body, rid),
        Endpoint::Chat => openai::parse_chat(&body, rid, api.max_seq_len()),
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    let side = api.text.get();
    let logprobs = match (parsed.logprobs, side) {
        (false, _) => None,
        (true, Some(side)) => Some(LogprobText { table: side.tokens.clone(), tokens_as_ids: parsed.tokens_as_ids }),
        (true, None) => {
            return error_response(&ApiError::new(503, "engine_starting", "the tokenizer is not loaded yet"));
        }
    };
    let echo = if parsed.echo { echo_texts(&parsed.requests, side) } else { Vec::new() };
    // The hub checks n's range before admitting a request; here it is how many finals to wait for.
    let n = parsed.n.max(1);
    let choices = n.saturating_mul(parsed.requests.len() as u32);
    let (replies, mut rx) = unbounded_channel();
    // Each prompt of a batch is a hub request of its own, a peer of its own; their replies share one channel and
    // are told apart by rid, which gives the prompt's place: its choices start at `place * n`.
    let mut places = HashMap::with_capacity(parsed.requests.len());
    let mut verdicts = Vec::with_capacity(parsed.requests.len());
    let mut ticket = Ticket { ids: Vec::with_capacity(parsed.requests.len()), calls: api.calls.clone(), open: true };
    for (place, generate) in parsed.requests.into_iter().enumerate() {
        let peer = if place == 0 { id } else { api.next_id.fetch_add(1, Ordering::Relaxed) };
        places.insert(generate.rid.clone(), place as u32 * n);
        let (accepted, verdict) = oneshot::channel();
        let call = Call::Generate { id: peer, generate: Box::new(generate), accepted, replies: replies.clone() };
        if api.calls.send(call).is_err() {
            return error_response(&engine_gone());
        }
        // From here on, dropping this future (the client went away) aborts the request.
        ticket.ids.push(peer);
        verdicts.push(verdict);
    }
    drop(replies);
    for verdict in verdicts {
        // A refused prompt refuses the batch: the ticket, dropped open, aborts the prompts already admitted.
        match verdict.await {
            Ok(Ok(())) => {}
            Ok(Err(rejection)) => return error_response(&openai::rejection_error(&rejection)),
            Err(_) => return error_response(&engine_gone()),
        }
    }
    let reply =
        Reply { endpoint, id: rid.to_owned(), model: api.model.clone(), created: unix_seconds(), n, echo, logprobs };
    if parsed.stream {
        let chunks = Chunks::new(reply, parsed.include_usage, choices);
        let queued = chunks.opening().into();
        let prompt_only = parsed.prompt_only;
        let stream = ChunkStream { replies: rx, places, ticket, chunks, queued, done: false, prompt_only };
        return Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    }
    let mut finals = Vec::with_capacity(choices as usize);
    loop {
        match rx.recv().await {
            Some(mut msg @ ServerMsg::Final(_)) => {
                if parsed.prompt_only {
                    openai::leave_out_completion(&mut msg);
                }
                let ServerMsg::Final(mut f) = msg else { unreachable!("matched a final") };
                f.index += places.get(&f.rid).copied().unwrap_or(0);
                let failed = f.finish_reason == proto::api::FinishReason::Error;
                finals.push(f);
                if finals.len() < choices as usize && !failed {
                    continue;
                }
                // A failure answers at once; the samples still running are aborted when the ticket drops.
                if finals.len() == choices as usize {
                    ticket.close();
                }
                return match reply.body(&finals) {
                    Ok(body) => json_response(StatusCode::OK, body),
                    Err(e) => error_response(&e),
                };
            }
            Some(_) => continue, // deltas are not asked for; nothing else comes
            None => {
                ticket.close();
                return error_response(&ApiError::unavailable("the scheduler stopped before the request finished"));
            }
        }
    }
}

/// Each prompt's text, for `echo`: a text prompt as it was sent, token ids decoded as its completion's text is.
fn echo_texts(requests: &[Generate], side: Option<&TextSide>) -> Vec<String> {
    requests
        .iter()
        .map(|g| match (g.prompt(), side) {
            (Some(Prompt::Text(text)), _) => text.to_owned(),
            (Some(Prompt::InputIds(ids)), Some(side)) => {
                let tokenizer = side.preparer.tokenizer();
                tokenizer.decode_with(ids, g.sampling.skip_special_tokens).unwrap_or_default()
            }
            _ => String::new(),
        })
        .collect()
}

/// Gives a reply the index of its choice in the whole request: `place` (its prompt's first choice) plus its
/// sample's index.
fn relabel(msg: &mut ServerMsg, places: &HashMap<String, u32>) {
    match msg {
        ServerMsg::Delta(d) => d.index += places.get(&d.rid).copied().unwrap_or(0),
        ServerMsg::Final(f) => f.index += places.get(&f.rid).copied().unwrap_or(0),
        ServerMsg::Error(_) | ServerMsg::Info(_) => {}
    }
}

/// A live HTTP request's claim on the hub: dropped while open, it tells the loop to abort the request (every
/// prompt of it: one hub peer each).
struct Ticket {
    ids: Vec<u64>,
    calls: UnboundedSender<Call>,
    open: bool,
}

impl Ticket {
    /// The request ended (or never started): nothing to abort.
    fn close(&mut self) {
        self.open = false;
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.open {
            // The loop may be gone too; then there is nothing left to abort. A peer already ended (or refused)
            // is unknown to the loop by then, and the call does nothing.
            for &id in &self.ids {
                let _ = self.calls.send(Call::Gone(id));
            }
        }
    }
}

/// The SSE events of one streamed request. It owns the ticket, so the server dropping the stream (the client
/// disconnected) aborts the request.
struct ChunkStream {
    replies: UnboundedReceiver<ServerMsg>,
    /// Each prompt's first choice, by its rid.
    places: HashMap<String, u32>,
    ticket: Ticket,
    chunks: Chunks,
    queued: VecDeque<String>,
    done: bool,
    /// Completions' `echo` with `max_tokens: 0`: what the engine generated is left out of every reply.
    prompt_only: bool,
}

impl Stream for ChunkStream {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(data) = this.queued.pop_front() {
                return Poll::Ready(Some(Ok(Event::default().data(data))));
            }
            if this.done {
                return Poll::Ready(None);
            }
            let (data, last) = match ready!(this.replies.poll_recv(cx)) {
                Some(mut msg) => {
                    relabel(&mut msg, &this.places);
                    if this.prompt_only {
                        openai::leave_out_completion(&mut msg);
                    }
                    this.chunks.on_reply(&msg)
                }
                None => (this.chunks.on_lost(), true),
            };
            this.queued.extend(data);
            if last {
                this.done = true;
                // A stream ended by one sample's failure leaves the others running: the ticket, dropped open
                // with the stream, aborts them.
                if this.chunks.complete() {
                    this.ticket.close();
                }
            }
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, e.body().to_string());
    if let Some(seconds) = e.retry_after() {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::api::{Delta, ErrorCode, Final, FinishReason};
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    async fn start(calls: UnboundedSender<Call>) -> SocketAddr {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = Api::new(calls, "m".into(), 64);
        api.set_text(test_text_side());
        spawn(listener, Arc::new(api));
        addr
    }

    /// The byte-level test tokenizer's side: ids are bytes.
    fn test_text_side() -> TextSide {
        let tokenizer = crate::text::test_tokenizer::byte_level_tokenizer();
        let vocab_size = tokenizer.vocab_size() as u32;
        let limits = super::super::PromptLimits { vocab_size, max_seq_len: 64, max_prompt_len: 63 };
        let tokens = Arc::new(TokenTable::new(&tokenizer));
        TextSide { preparer: Preparer::new(tokenizer, None, limits), tokens }
    }

    fn raw_request(method: &str, path: &str, body: &str) -> String {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }

    /// One request over a fresh connection: the status and the raw body (still chunked for streams).
    async fn send(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
        let (status, _, body) = send_with_head(addr, method, path, body).await;
        (status, body)
    }

    /// The same, with the response's head (status line and headers) too.
    async fn send_with_head(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String, String) {
        let request = raw_request(method, path, body);
        tokio::task::spawn_blocking(move || {
            let mut conn = TcpStream::connect(addr).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            conn.write_all(request.as_bytes()).unwrap();
            let mut response = String::new();
            conn.read_to_string(&mut response).unwrap();
            let status = response[9..12].parse().unwrap();
            let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
            (status, head.to_ascii_lowercase(), body.to_owned())
        })
        .await
        .unwrap()
    }

    fn json(body: &str) -> serde_json::Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
    }

    fn final_msg(rid: &str, text: &str) -> ServerMsg {
        ServerMsg::Final(Final {
            rid: rid.into(),
            index: 0,
            cached_tokens: 0,
            finish_reason: FinishReason::Length,
            prompt_tokens: 2,
            completion_tokens: 1,
            token_ids: vec![7],
            text: text.into(),
            message: None,
            logprobs: None,
            prompt_logprobs: None,
            prompt_token_ids: None,
            tool_calls: None,
        })
    }

    /// A stand-in for the serve loop: admits every request and answers it with `answer(rid)`.
    fn fake_loop(calls: UnboundedReceiver<Call>, answer: fn(&str) -> Vec<ServerMsg>) {
        fake_loop_of(calls, move |g| answer(&g.rid));
    }

    /// The same, answering from the whole request.
    fn fake_loop_of(mut calls: UnboundedReceiver<Call>, answer: impl Fn(&Generate) -> Vec<ServerMsg> + Send + 'static) {
        tokio::spawn(async move {
            while let Some(call) = calls.recv().await {
                match call {
                    Call::Generate { generate, accepted, replies, .. } => {
                        let _ = accepted.send(Ok(()));
                        for msg in answer(&generate) {
                            let _ = replies.send(msg);
                        }
                    }
                    Call::Health(reply) => {
                        let _ = reply.send(0);
                    }
                    Call::Gone(_) => {}
                }
            }
        });
    }

    #[tokio::test]
    async fn a_completion_goes_through_the_loop_and_comes_back_as_openais_body() {
        let (tx, rx) = unbounded_channel();
        fake_loop(rx, |rid| vec![final_msg(rid, "ok")]);
        let addr = start(tx).await;
        let (status, body) = send(addr, "POST", "/v1/completions", r#"{"prompt": "hi"}"#).await;
        let body = json(&body);
        assert_eq!(status, 200, "{body}");
        assert_eq!((body["id"].as_str(), body["choices"][0]["text"].as_str()), (Some("cmpl-0"), Some("ok")));
        assert_eq!(body["usage"]["total_tokens"], 3);
        let (status, body) = send(addr, "GET", "/health", "").await;
        assert_eq!((status, json(&body)["live_requests"].as_u64()), (200, Some(0)));
    }

    #[tokio::test]
    async fn a_stream_is_server_sent_events_ending_with_done() {
        let (tx, rx) = unbounded_channel();
        fake_loop(rx, |rid| {
            let delta = |text: &str| {
                ServerMsg::Delta(Delta {
                    rid: rid.into(),
                    index: 0,
                    token_ids: vec![7],
                    text: text.into(),
                    logprobs: None,
                    prompt_logprobs: None,
                    prompt_token_ids: None,
                    tool_calls: None,
                })
            };
            vec![delta("he"), delta("llo"), final_msg(rid, "hello")]
        });
        let addr = start(tx).await;
        let (status, body) = send(
            addr,
            "POST",
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "x"}], "stream": true}"#,
        )
        .await;
        assert_eq!(status, 200);
        let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.len(), 5, "role, two pieces, finish, done: {body}");
        assert_eq!(json(data[1])["choices"][0]["delta"]["content"], "he");
        assert_eq!(json(data[3])["choices"][0]["finish_reason"], "length");
        assert_eq!(data[4], "[DONE]");
    }

    #[tokio::test]
    async fn a_refusal_is_an_openai_error_with_its_status() {
        let (tx, mut rx) = unbounded_channel();
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                if let Call::Generate { generate, accepted, .. } = call {
                    let refusal = Rejection::new(Some(generate.rid), ErrorCode::PromptTooLong, "too long");
                    let _ = accepted.send(Err(refusal));
                }
            }
        });
        let addr = start(tx).await;
        let (status, body) = send(addr, "POST", "/v1/completions", r#"{"prompt": "hi"}"#).await;
        assert_eq!((status, json(&body)["error"]["code"].as_str()), (400, Some("context_length_exceeded")));
        let (status, body) = send(addr, "POST", "/v1/completions", "{").await;
        assert_eq!((status, json(&body)["error"]["code"].as_str()), (400, Some("invalid_json")));
        let (status, body) = send(addr, "GET", "/v2/anything", "").await;
        assert_eq!((status, json(&body)["error"]["code"].as_str()), (404, Some("not_found")));
    }

    #[tokio::test]
    async fn without_a_running_loop_requests_are_503_but_models_still_answer() {
        let (tx, rx) = unbounded_channel();
        drop(rx);
        let addr = start(tx).await;
        let (status, body) = send(addr, "POST", "/v1/completions", r#"{"prompt": "hi"}"#).await;
        assert_eq!((status, json(&body)["error"]["code"].as_str()), (503, Some("engine_unavailable")));
        assert_eq!(send(addr, "GET", "/health", "").await.0, 503);
        let (status, body) = send(addr, "GET", "/v1/models", "").await;
        assert_eq!((status, json(&body)["data"][0]["id"].as_str()), (200, Some("m")));
    }

    #[tokio::test]
    async fn a_client_that_goes_away_while_waiting_aborts_its_request() {
        let (tx, mut rx) = unbounded_channel();
        let addr = start(tx).await;
        let request = raw_request("POST", "/v1/completions", r#"{"prompt": "hi"}"#);
        let conn = tokio::task::spawn_blocking(move || {
            let mut conn = TcpStream::connect(addr).unwrap();
            conn.write_all(request.as_bytes()).unwrap();
            conn
        });
        let conn = conn.await.unwrap();
        // Admitted, and then never answered: only the client's leaving ends it.
        let (id, _replies) = match rx.recv().await {
            Some(Call::Generate { id, accepted, replies, .. }) => {
                accepted.send(Ok(())).unwrap();
                (id, replies)
            }
            _ => panic!("expected the request"),
        };
        drop(conn);
        let gone = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("the loop is told");
        assert!(matches!(gone, Some(Call::Gone(g)) if g == id));
    }

    #[tokio::test]
    async fn an_overloaded_refusal_is_a_503_with_retry_after() {
        let (tx, mut rx) = unbounded_channel();
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                if let Call::Generate { generate, accepted, .. } = call {
                    let refusal = Rejection::new(Some(generate.rid), ErrorCode::Overloaded, "the queue is full");
                    let _ = accepted.send(Err(refusal));
                }
            }
        });
        let addr = start(tx).await;
        let (status, head, body) = send_with_head(addr, "POST", "/v1/completions", r#"{"prompt": "hi"}"#).await;
        assert_eq!(status, 503, "{body}");
        assert!(head.contains("\r\nretry-after: 1\r\n"), "{head}");
        let error = &json(&body)["error"];
        assert_eq!((error["type"].as_str(), error["code"].as_str()), (Some("overloaded_error"), Some("overloaded")));
        // Other 503s say nothing about retrying (this loop never answers a health call: the engine is gone).
        let (status, head, _) = send_with_head(addr, "GET", "/health", "").await;
        assert_eq!(status, 503);
        assert!(!head.contains("retry-after"), "{head}");
    }

    /// Sample `i` of `g` answers "s{i}" in one token; the sample with the highest index ends first.
    fn answer_samples(g: &Generate) -> Vec<ServerMsg> {
        let n = g.n as u32;
        let mut out = Vec::new();
        for index in (0..n).rev() {
            let text = format!("s{index}");
            let delta = Delta {
                rid: g.rid.clone(),
                index,
                token_ids: vec![7],
                text: text.clone(),
                logprobs: None,
                prompt_logprobs: None,
                prompt_token_ids: None,
                tool_calls: None,
            };
            out.push(ServerMsg::Delta(delta));
            out.push(ServerMsg::Final(Final {
                rid: g.rid.clone(),
                index,
                finish_reason: FinishReason::Length,
                prompt_tokens: 2,
                completion_tokens: 1,
                cached_tokens: if index == 0 { 0 } else { 16 },
                token_ids: vec![7],
                text,
                message: None,
                logprobs: None,
                prompt_logprobs: None,
                prompt_token_ids: None,
                tool_calls: None,
            }));
        }
        out
    }

    #[tokio::test]
    async fn n_choices_come_back_in_one_body_or_one_stream() {
        let (tx, rx) = unbounded_channel();
        fake_loop_of(rx, answer_samples);
        let addr = start(tx).await;
        let (status, body) = send(addr, "POST", "/v1/completions", r#"{"prompt": "hi", "n": 3}"#).await;
        let body = json(&body);
        assert_eq!(status, 200, "{body}");
        let texts: Vec<&str> =
            body["choices"].as_array().unwrap().iter().map(|c| c["text"].as_str().unwrap()).collect();
        assert_eq!(texts, ["s0", "s1", "s2"]);
        assert_eq!(body["usage"]["total_tokens"], 5, "the prompt once, three completions");
        let request = r#"{"messages": [{"role": "user", "content": "x"}], "n": 2, "stream": true,
                          "stream_options": {"include_usage": true}}"#;
        let (status, body) = send(addr, "POST", "/v1/chat/completions", request).await;
        assert_eq!(status, 200);
        let data: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(data.len(), 2 + 2 * 2 + 2, "two roles, a piece and a finish per choice, usage, done: {body}");
        assert_eq!(*data.last().unwrap(), "[DONE]");
        let usage = json(data[data.len() - 2]);
        assert_eq!(usage["usage"]["completion_tokens"], 2);
        assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    }

    #[tokio::test]
    async fn a_batch_of_prompts_is_one_request_per_prompt_and_one_body_with_every_choice() {
        let (tx, rx) = unbounded_channel();
        fake_loop_of(rx, answer_samples);
        let addr = start(tx).await;
        let body = r#"{"prompt": ["a", "b", "c"], "n": 2, "echo": true}"#;
        let (status, body) = send(addr, "POST", "/v1/completions", body).await;
        let body = json(&body);
        assert_eq!(status, 200, "{body}");
        let choices: Vec<(u64, &str)> = body["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["index"].as_u64().unwrap(), c["text"].as_str().unwrap()))
            .collect();
        assert_eq!(choices, [(0, "as0"), (1, "as1"), (2, "bs0"), (3, "bs1"), (4, "cs0"), (5, "cs1")]);
        assert_eq!(body["usage"]["prompt_tokens"], 6, "each prompt once: 2 tokens each");
        assert_eq!(body["usage"]["completion_tokens"], 6);
        assert_eq!(body["id"], "cmpl-0", "one response id");
        // Streamed, every chunk carries its choice's index in the whole request.
        let (status, body) =
            send(addr, "POST", "/v1/completions", r#"{"prompt": [[104], [105]], "stream": true}"#).await;
        assert_eq!(status, 200);
        let data: Vec<serde_json::Value> =
            body.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|d| *d != "[DONE]").map(json).collect();
        let mut texts = [String::new(), String::new()];
        for chunk in &data {
            let choice = &chunk["choices"][0];
            texts[choice["index"].as_u64().unwrap() as usize] += choice["text"].as_str().unwrap();
        }
        assert_eq!(texts, ["s0", "s0"]);
    }

    #[tokio::test]
    async fn a_refused_prompt_of_a_batch_refuses_it_and_aborts_the_others() {
        let (tx, mut rx) = unbounded_channel();
        let addr = start(tx).await;
        let request =
            tokio::spawn(async move { send(addr, "POST", "/v1/completions", r#"{"prompt": ["a", "b"]}"#).await });
        let mut ids = Vec::new();
        for verdict in [Ok(()), Err(Rejection::new(None, ErrorCode::Overloaded, "full"))] {
            match rx.recv().await {
                Some(Call::Generate { id, accepted, .. }) => {
                    ids.push(id);
                    accepted.send(verdict).unwrap();
                }
                _ => panic!("expected a prompt"),
            }
        }
        let (status, body) = request.await.unwrap();
        assert_eq!((status, json(&body)["error"]["code"].as_str()), (503, Some("overloaded")));
        let mut gone = Vec::new();
        while let Ok(Some(Call::Gone(id))) = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            gone.push(id);
            if gone.len() == ids.len() {
                break;
            }
        }
        assert_eq!(gone, ids, "the admitted prompt is aborted (the refused one is unknown to the loop)");
    }

    #[tokio::test]
    async fn tokenize_and_detokenize_round_trip() {
        let (tx, rx) = unbounded_channel();
        fake_loop(rx, |_| Vec::new());
        let addr = start(tx).await;
        let (status, body) = send(addr, "POST", "/tokenize", r#"{"prompt": "hi", "return_token_strs": true}"#).await;
        let body = json(&body);
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            serde_json::json!({"tokens": [104, 105], "count": 2, "max_model_len": 64, "token_strs": ["h", "i"]})
        );
        let (status, body) = send(addr, "POST", "/detokenize", r#"{"tokens": [104, 105]}"#).await;
        assert_eq!((status, json(&body)["prompt"].as_str()), (200, Some("hi")));
        let (status, body) = send(addr, "POST", "/detokenize", r#"{"tokens": [104, 100000]}"#).await;
        let error = &json(&body)["error"];
        assert_eq!((status, error["param"].as_str()), (400, Some("tokens[1]")));
        // Messages are checked as chat requests are; this model has no template to render them with.
        let (status, body) = send(addr, "POST", "/tokenize", r#"{"messages": [{"role": "user"}]}"#).await;
        assert_eq!((status, json(&body)["error"]["param"].as_str()), (400, Some("messages[0].content")));
        let (status, body) =
            send(addr, "POST", "/tokenize", r#"{"messages": [{"role": "user", "content": "x"}]}"#).await;
        assert_eq!((status, json(&body)["error"]["message"].as_str()), (400, Some("this model has no chat template")));
    }

    #[tokio::test]
    async fn the_tokenizer_endpoints_wait_for_the_engine() {
        let (tx, _rx) = unbounded_channel();
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        spawn(listener, Arc::new(Api::new(tx, "m".into(), 64)));
        let (status, body) = send(addr, "POST", "/tokenize", r#"{"prompt": "hi"}"#).await;
        assert_eq!((status, json(&body)["error"]["code"].as_str()), (503, Some("engine_starting")));
    }

    #[tokio::test]
    async fn a_routers_endpoints_say_what_the_engine_runs_behind_the_key_and_its_load_openly() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let api = Arc::new(Api::new(unbounded_channel().0, "m".into(), 64).with_api_key(Some("k".into())));
        spawn(listener, api.clone());
        let get = |path: &'static str, key: bool| async move {
            let auth = if key { "Authorization: Bearer k\r\n" } else { "" };
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n");
            tokio::task::spawn_blocking(move || {
                let mut conn = TcpStream::connect(addr).unwrap();
                conn.write_all(request.as_bytes()).unwrap();
                let mut response = String::new();
                conn.read_to_string(&mut response).unwrap();
                let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
                (response[9..12].parse::<u16>().unwrap(), body)
            })
            .await
            .unwrap()
        };
        for path in ["/server_info", "/get_server_info", "/model_info", "/get_model_info"] {
            assert_eq!(get(path, false).await.0, 401, "{path}");
            assert_eq!(get(path, true).await.0, 503, "{path} before the worker's hello");
        }
        let (status, body) = get("/get_load", false).await;
        assert_eq!((status, json(&body)[0]["num_reqs"].as_i64()), (200, Some(0)));

        api.set_facts(EngineFacts {
            model_dir: "/models/q".into(),
            model_type: Some("qwen2".into()),
            architectures: vec!["Qwen2ForCausalLM".into()],
            tp_size: 2,
            max_batch: 8,
            max_step_tokens: 256,
            page_size: 16,
            num_pages: 10,
        });
        api.metrics.set_load(3, 2, 6, 10);
        for path in ["/server_info", "/get_server_info"] {
            let (status, body) = get(path, true).await;
            let info = json(&body);
            assert_eq!(status, 200);
            assert_eq!(
                (info["model_path"].as_str(), info["served_model_name"].as_str()),
                (Some("/models/q"), Some("m"))
            );
            assert_eq!((info["tp_size"].as_u64(), info["dp_size"].as_u64()), (Some(2), Some(1)));
            assert_eq!(
                (info["max_running_requests"].as_u64(), info["max_total_num_tokens"].as_u64()),
                (Some(8), Some(160))
            );
        }
        let info = json(&get("/model_info", true).await.1);
        assert_eq!(
            (info["model_type"].as_str(), info["architectures"][0].as_str()),
            (Some("qwen2"), Some("Qwen2ForCausalLM"))
        );
        let load = json(&get("/get_load", false).await.1);
        assert_eq!(load, serde_json::json!([{"dp_rank": 0, "num_reqs": 5, "num_waiting_reqs": 3, "num_tokens": 64}]));
    }
}
