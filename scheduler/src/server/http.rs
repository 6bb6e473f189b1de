//! The OpenAI-compatible HTTP API (docs/http.md). Handlers turn requests into hub calls sent to the serve loop
//! (`serve.rs`), the one owner of the hub, and turn what comes back into responses or SSE streams; the JSON
//! mapping is `openai.rs`.
//!
//! Each HTTP request is a hub peer of its own (`Peer::Http(n)`), so its id cannot collide with a ZeroMQ
//! client's. A request whose handler is dropped (the client disconnected, mid-stream or while waiting) is
//! aborted: the `Ticket` it holds tells the loop when it goes.

use super::openai::{self, ApiError, Chunks, Endpoint, Reply};
use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_core::Stream;
use proto::api::{Generate, Rejection, ServerMsg};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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
    max_seq_len: u32,
    started: u64,
    next_id: AtomicU64,
}

impl Api {
    /// `model` is the name the API serves under; `max_seq_len` the context length.
    pub fn new(calls: UnboundedSender<Call>, model: String, max_seq_len: u32) -> Self {
        Api { calls, model, max_seq_len, started: unix_seconds(), next_id: AtomicU64::new(0) }
    }
}

/// Binds the API's address early, so that a taken port fails the start, not the first request.
pub async fn bind(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| format!("binding the HTTP API on {addr} (--http)"))
}

/// Serves the API on `listener` until the runtime stops.
pub fn spawn(listener: TcpListener, api: Api) -> tokio::task::JoinHandle<()> {
    match listener.local_addr() {
        Ok(addr) => tracing::info!("OpenAI-compatible HTTP API on http://{addr}/v1"),
        Err(e) => tracing::warn!("the HTTP API's address: {e}"),
    }
    let app = router(Arc::new(api));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("the HTTP API stopped: {e}");
        }
    })
}

pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(api)
}

async fn completions(State(api): State<Arc<Api>>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(&api, Endpoint::Completions, body).await
}

async fn chat_completions(State(api): State<Arc<Api>>, body: Result<Bytes, BytesRejection>) -> Response {
    generate(&api, Endpoint::Chat, body).await
}

async fn models(State(api): State<Arc<Api>>) -> Response {
    json_response(StatusCode::OK, openai::models_body(&api.model, api.started, api.max_seq_len).to_string())
}

async fn health(State(api): State<Arc<Api>>) -> Response {
    let (tx, rx) = oneshot::channel();
    let live = match api.calls.send(Call::Health(tx)) {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    match live {
        Some(live) => {
            let body = serde_json::json!({ "status": "ok", "live_requests": live });
            json_response(StatusCode::OK, body.to_string())
        }
        None => error_response(&engine_gone()),
    }
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

async fn generate(api: &Api, endpoint: Endpoint, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) => {
            let status = rejection.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "request_too_large" } else { "invalid_body" };
            return error_response(&ApiError::new(status.as_u16(), code, rejection.body_text()));
        }
    };
    let id = api.next_id.fetch_add(1, Ordering::Relaxed);
    let rid = format!("{}-{id}", endpoint.id_prefix());
    let parsed = match endpoint {
        Endpoint::Completions => openai::parse_completion(&body, &rid),
        Endpoint::Chat => openai::parse_chat(&body, &rid, api.max_seq_len),
    };
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => return error_response(&e),
    };
    let (replies, mut rx) = unbounded_channel();
    let (accepted, verdict) = oneshot::channel();
    if api.calls.send(Call::Generate { id, generate: Box::new(parsed.generate), accepted, replies }).is_err() {
        return error_response(&engine_gone());
    }
    // From here on, dropping this future (the client went away) aborts the request.
    let mut ticket = Ticket { id, calls: api.calls.clone(), open: true };
    match verdict.await {
        Ok(Ok(())) => {}
        Ok(Err(rejection)) => {
            ticket.close();
            return error_response(&openai::rejection_error(&rejection));
        }
        Err(_) => {
            ticket.close();
            return error_response(&engine_gone());
        }
    }
    let reply = Reply { endpoint, id: rid, model: api.model.clone(), created: unix_seconds() };
    if parsed.stream {
        let chunks = Chunks::new(reply, parsed.include_usage);
        let queued = chunks.opening().into();
        let stream = ChunkStream { replies: rx, ticket, chunks, queued, done: false };
        return Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    }
    loop {
        match rx.recv().await {
            Some(ServerMsg::Final(f)) => {
                ticket.close();
                return match reply.body(&f) {
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

/// A live HTTP request's claim on the hub: dropped while open, it tells the loop to abort the request.
struct Ticket {
    id: u64,
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
            // The loop may be gone too; then there is nothing left to abort.
            let _ = self.calls.send(Call::Gone(self.id));
        }
    }
}

/// The SSE events of one streamed request. It owns the ticket, so the server dropping the stream (the client
/// disconnected) aborts the request.
struct ChunkStream {
    replies: UnboundedReceiver<ServerMsg>,
    ticket: Ticket,
    chunks: Chunks,
    queued: VecDeque<String>,
    done: bool,
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
                Some(msg) => this.chunks.on_reply(&msg),
                None => (this.chunks.on_lost(), true),
            };
            this.queued.extend(data);
            if last {
                this.done = true;
                this.ticket.close();
            }
        }
    }
}

fn json_response(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(status, e.body().to_string())
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
