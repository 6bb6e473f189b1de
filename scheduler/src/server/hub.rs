//! Every live request between the request socket and the engine.
//!
//! Inbound, it decodes what clients send, makes the checks that need its state (the drain, duplicates, the load
//! bound), and hands the engine requests whose prompts the serve loop has prepared meanwhile, on other threads
//! (`prepare.rs`: validation, chat template, tokenizer).
//! Outbound, it turns the engine's token events into the protocol's deltas and finals: streaming
//! detokenization and stop strings live here, on the socket's side, so the engine thread never spends a step
//! on text. Plain synchronous code with no I/O: the serve loop feeds it from both front doors (the ZeroMQ
//! socket and the HTTP API) and routes what it returns to the peer each reply names.
//!
//! A client request of `n` samples is `n` core requests with the same prompt, each with its own id, seed,
//! detokenizer and final; the replies of sample `i` carry `index: i`. The core's prefix cache, not the hub,
//! makes them share the prompt's pages.
//!
//! Load is bounded here, where a refusal costs nothing: past `max_waiting` samples accepted and still without
//! their first token, a new request is refused at once (`overloaded`) instead of queueing behind work that may
//! take minutes.

use super::openai::tools;
use super::prepare::{PreparedPrompt, Preparer};
use super::tool_stream::ToolStream;
use crate::core::{Event, FinishReason, NewRequest, ReqId, SamplingParams};
use crate::engine::{Command, StepLogprobs};
use crate::metrics::{Metrics, Outcome};
use crate::text::{ChatTemplate, TextStream, Tokenizer};
use bytes::Bytes;
use proto::api::{self, ClientMsg, Delta, ErrorCode, Final, Generate, InfoMsg, Rejection, ServerMsg, TokenLogprobs};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

/// `--max-waiting`'s default: on the H200 a few thousand queued requests drain within a minute or two, about
/// what a client waits before giving up; more would only be work done for clients that have left.
pub const DEFAULT_MAX_WAITING: u32 = 4096;

/// The most samples one request may ask for (also at most the batch size, so that they can run together and
/// share their prompt's pages).
pub const MAX_N: u32 = 128;

/// `--max-client-requests`' default: one ZeroMQ client may have this many requests live at once. A client that
/// means to load the server hard still can; one that leaks requests (never reads, never aborts) is stopped
/// before it holds the whole waiting queue.
pub const DEFAULT_MAX_CLIENT_REQUESTS: u32 = 1024;

/// Where a client's replies go. Request ids are unique per peer, not globally, so the two front doors cannot
/// collide: an HTTP request is a peer of its own, and no ZeroMQ client's rid can name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// A ZeroMQ client's routing frames (the identity, and the empty delimiter when the client used a
    /// REQ-style envelope), sent back in front of each reply.
    Zmq(Vec<Bytes>),
    /// One HTTP request, by the number the HTTP server gave it; the serve loop holds its reply channel.
    Http(u64),
}

/// Limits a request must fit, known after the handshake.
#[derive(Clone, Debug)]
pub struct PromptLimits {
    pub vocab_size: u32,
    pub max_seq_len: u32,
    /// The most tokens a prompt may have: it must leave room for one new token, and fit the KV cache.
    pub max_prompt_len: u32,
}

pub struct Hub {
    preparer: Preparer,
    info: InfoMsg,
    engine: Sender<Command>,
    /// Live client requests, keyed by their sample 0's id (sample `i` is that id plus `i`).
    requests: HashMap<ReqId, Request>,
    /// Live samples by core id: every id the engine may still send events for.
    samples: HashMap<ReqId, Sample>,
    by_rid: HashMap<(Peer, String), ReqId>,
    /// Requests accepted and still being prepared, with their sample count and whether they were cancelled
    /// meanwhile.
    preparing: HashMap<(Peer, String), (u32, bool)>,
    next_id: ReqId,
    seeds: SeedSource,
    metrics: Arc<Metrics>,
    /// Samples accepted (being prepared, or admitted) that have neither a first token nor an end: what
    /// `max_waiting` bounds.
    waiting: u32,
    max_waiting: u32,
    /// Set once a shutdown began: live requests finish, new ones are refused.
    draining: bool,
    /// Live requests (being prepared or admitted) of each ZeroMQ client.
    per_client: HashMap<Peer, u32>,
    max_client_requests: u32,
}

/// What the samples of one client request share.
struct Request {
    peer: Peer,
    rid: String,
    stream: bool,
    n: u32,
    prompt_tokens: u32,
    admitted: Instant,
    /// Samples not ended yet; the request is forgotten when the last one ends.
    open: u32,
    /// Set when the request asked for its prompt's logprobs.
    prompt: Option<PromptLogprobs>,
}

/// A request's prompt logprobs. Sample 0 alone asks the engine for them; the other samples are held back until it
/// has them all (its first token), so that they are computed once, every sample's messages carry the same ones,
/// and the others then find the whole prompt in the prefix cache.
struct PromptLogprobs {
    ids: Vec<u32>,
    /// One entry per prompt token so far: `None` for the first, which nothing comes before.
    entries: Vec<Option<TokenLogprobs>>,
    /// The submits of samples 1 .. n-1, sent once sample 0 has its first token or has ended.
    held: Vec<Command>,
}

impl PromptLogprobs {
    /// What a message carrying them gets: `prompt_logprobs` and `prompt_token_ids`.
    fn message(&self) -> (Option<Vec<Option<TokenLogprobs>>>, Option<Vec<u32>>) {
        (Some(self.entries.clone()), Some(self.ids.clone()))
    }
}

struct Sample {
    /// Its request's key in `Hub::requests`.
    request: ReqId,
    index: u32,
    token_ids: Vec<u32>,
    text: String,
    detok: TextStream,
    /// Prompt tokens the core found in the prefix cache at its first admission.
    cached_tokens: u32,
    /// One entry per id of `token_ids`, when the request asked for logprobs.
    logprobs: Option<Vec<TokenLogprobs>>,
    /// When its first token came (the time to first token), and its latest (the gap to the next).
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    /// The output read for tool calls, when the request offered tools to call; `text` is then the content.
    tools: Option<ToolStream>,
    /// A delta of it carried the request's prompt logprobs (its first does, when the request asked).
    prompt_sent: bool,
}

impl Hub {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        chat: Option<ChatTemplate>,
        limits: PromptLimits,
        info: InfoMsg,
        engine: Sender<Command>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Hub {
            preparer: Preparer::new(tokenizer, chat, limits),
            info,
            engine,
            requests: HashMap::new(),
            samples: HashMap::new(),
            by_rid: HashMap::new(),
            preparing: HashMap::new(),
            next_id: 0,
            seeds: SeedSource::new(),
            metrics,
            waiting: 0,
            max_waiting: DEFAULT_MAX_WAITING,
            draining: false,
            per_client: HashMap::new(),
            max_client_requests: DEFAULT_MAX_CLIENT_REQUESTS,
        }
    }

    /// Bounds the samples that may wait for their first token (`--max-waiting`, at least 1).
    pub fn with_max_waiting(self, max_waiting: u32) -> Self {
        Hub { max_waiting: max_waiting.max(1), ..self }
    }

    /// Bounds the live requests of one ZeroMQ client (`--max-client-requests`, at least 1).
    pub fn with_max_client_requests(self, max_client_requests: u32) -> Self {
        Hub { max_client_requests: max_client_requests.max(1), ..self }
    }

    /// Live requests of `peer` (being prepared or admitted).
    pub fn client_requests(&self, peer: &Peer) -> u32 {
        self.per_client.get(peer).copied().unwrap_or(0)
    }

    /// Aborts every live request of the ZeroMQ client whose identity frame is `identity` (it disconnected, or
    /// went silent): their finals go to `out`, for a client that may still read them. Returns how many.
    pub fn cancel_client(&mut self, identity: &[u8], out: &mut Vec<(Peer, ServerMsg)>) -> usize {
        let of_client =
            |peer: &Peer| matches!(peer, Peer::Zmq(frames) if frames.first().is_some_and(|f| f[..] == *identity));
        let rids: Vec<(Peer, String)> =
            self.by_rid.keys().chain(self.preparing.keys()).filter(|(p, _)| of_client(p)).cloned().collect();
        for (peer, rid) in &rids {
            self.cancel(peer, rid, out);
        }
        rids.len()
    }

    fn client_started(&mut self, peer: &Peer) {
        if let Peer::Zmq(_) = peer {
            *self.per_client.entry(peer.clone()).or_default() += 1;
        }
    }

    fn client_ended(&mut self, peer: &Peer) {
        if let Some(live) = self.per_client.get_mut(peer) {
            *live -= 1;
            if *live == 0 {
                self.per_client.remove(peer);
            }
        }
    }

    /// Refuses new requests from now on (`shutting_down`); live ones run to their end.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    /// What prepares requests' prompts, for the serve loop to run off its thread.
    pub fn preparer(&self) -> &Preparer {
        &self.preparer
    }

    /// Structured output's compiler (none: constrained requests are refused).
    pub fn with_constraints(self, constraints: Option<Arc<crate::grammar::Constraints>>) -> Self {
        Hub { preparer: self.preparer.with_constraints(constraints), ..self }
    }

    /// Client requests accepted and not ended, being prepared or admitted (a request of `n` samples counts
    /// once).
    pub fn live_requests(&self) -> usize {
        self.requests.len() + self.preparing.len()
    }

    /// Samples admitted that have had no token yet and have not ended.
    pub fn waiting(&self) -> u32 {
        self.waiting
    }

    /// The most samples a request may ask for: [`MAX_N`], the batch size and the waiting bound, whichever is
    /// least (a request of more than `max_waiting` samples could never be admitted).
    pub fn max_n(&self) -> u32 {
        MAX_N.min(self.info.max_batch).min(self.max_waiting).max(1)
    }

    /// The `info` reply: the served model, and how many requests are live right now.
    pub fn info(&self) -> ServerMsg {
        let live_requests = u32::try_from(self.requests.len()).unwrap_or(u32::MAX);
        ServerMsg::Info(InfoMsg { live_requests, ..self.info.clone() })
    }

    /// Handles one message from `peer`; replies go to `out`. A generate request that passes [`Hub::accept`] is
    /// returned, for the caller to prepare and hand back through [`Hub::submit_prepared`].
    pub fn on_message(&mut self, peer: &Peer, bytes: &[u8], out: &mut Vec<(Peer, ServerMsg)>) -> Option<Generate> {
        let reply = match api::decode_client(bytes) {
            Err(rejection) => Some(rejection.to_msg()),
            Ok(ClientMsg::Info) => Some(self.info()),
            // Liveness is the serve loop's (`liveness.rs`): it has seen the message already.
            Ok(ClientMsg::Keepalive) => None,
            Ok(ClientMsg::Abort { rid }) => {
                if self.cancel(peer, &rid, out) {
                    None
                } else {
                    let message = format!("no live request with rid {rid:?} from this client");
                    Some(Rejection::new(Some(rid), ErrorCode::UnknownRequest, message).to_msg())
                }
            }
            Ok(ClientMsg::Generate(g)) => match self.accept(peer, &g) {
                Ok(()) => return Some(g),
                Err(refused) => Some(refused.to_msg()),
            },
        };
        if let Some(msg) = reply {
            out.push((peer.clone(), msg));
        }
        None
    }

    /// Ends every live sample of `peer`'s request `rid` with `finish_reason: "abort"` (their finals go to
    /// `out`). False when no such request is live: it ended already, or never existed.
    pub fn cancel(&mut self, peer: &Peer, rid: &str, out: &mut Vec<(Peer, ServerMsg)>) -> bool {
        let key = (peer.clone(), rid.to_owned());
        if let Some((_, cancelled)) = self.preparing.get_mut(&key) {
            // It ends (with its abort finals) as soon as it is admitted.
            *cancelled = true;
            return true;
        }
        let Some(&key) = self.by_rid.get(&key) else { return false };
        // Samples held back behind sample 0 never reached the engine; they end here with the others.
        if let Some(prompt) = self.requests.get_mut(&key).and_then(|r| r.prompt.as_mut()) {
            prompt.held.clear();
        }
        let n = self.requests.get(&key).map_or(0, |r| r.n);
        for id in key..key + ReqId::from(n) {
            if self.samples.contains_key(&id) {
                let _ = self.engine.send(Command::Finish(id));
                self.finalize(id, FinishReason::Abort, None, (String::new(), Vec::new()), out);
            }
        }
        true
    }

    /// Prepares and admits a decoded `generate` from `peer` on the spot, or says why not. Nothing is sent on a
    /// refusal: the caller answers it in its own door's terms.
    pub fn submit(&mut self, peer: &Peer, g: Generate) -> Result<(), Rejection> {
        self.accept(peer, &g)?;
        let prompt = self.preparer.prepare(&g);
        self.submit_prepared(peer, g, prompt, &mut Vec::new())
    }

    /// The checks a request passes before it is prepared, cheap and needing the hub's state: the drain, `n`,
    /// a duplicate rid, the load bound. Once accepted it counts as live and waiting, until
    /// [`Hub::submit_prepared`] admits or refuses it.
    pub fn accept(&mut self, peer: &Peer, g: &Generate) -> Result<(), Rejection> {
        let verdict = self.check(peer, g);
        match &verdict {
            Ok(n) => {
                self.preparing.insert((peer.clone(), g.rid.clone()), (*n, false));
                self.waiting += n;
                self.client_started(peer);
            }
            Err(refused) => self.refused(refused),
        }
        verdict.map(|_| ())
    }

    /// Admits request `g`, accepted earlier, with its prepared prompt or the reason preparing it failed. A
    /// request cancelled while it was prepared is admitted and ended at once: its finals (abort) go to `out`.
    pub fn submit_prepared(
        &mut self,
        peer: &Peer,
        g: Generate,
        prompt: Result<PreparedPrompt, Rejection>,
        out: &mut Vec<(Peer, ServerMsg)>,
    ) -> Result<(), Rejection> {
        let key = (peer.clone(), g.rid.clone());
        let (n, cancelled) = self.preparing.remove(&key).expect("submit_prepared after accept");
        self.waiting -= n;
        let verdict = prompt.and_then(|prompt| self.admit(peer, g, n, prompt));
        match &verdict {
            Ok(()) if cancelled => {
                self.cancel(peer, &key.1, out);
            }
            Ok(()) => {}
            Err(refused) => {
                self.client_ended(peer);
                self.refused(refused);
            }
        }
        verdict
    }

    fn refused(&self, refused: &Rejection) {
        let outcome = if refused.code == ErrorCode::Overloaded { Outcome::Overloaded } else { Outcome::Rejected };
        self.metrics.request_ended(outcome);
        let rid = refused.rid.as_deref().unwrap_or("");
        tracing::info!(request_id = %rid, code = ?refused.code, "request refused: {}", refused.message);
    }

    /// `n` if `g` may be prepared.
    fn check(&self, peer: &Peer, g: &Generate) -> Result<u32, Rejection> {
        let reject = |code, message: String| Rejection::new(Some(g.rid.clone()), code, message);
        if self.draining {
            return Err(reject(ErrorCode::ShuttingDown, "the server is shutting down".into()));
        }
        let max_n = self.max_n();
        let n = match u32::try_from(g.n) {
            Ok(n) if n <= max_n => n,
            _ => {
                let message = format!("n must be at most {max_n} (samples run in one batch), got {}", g.n);
                return Err(Rejection::invalid(Some(g.rid.clone()), "n", message));
            }
        };
        let key = (peer.clone(), g.rid.clone());
        if self.by_rid.contains_key(&key) || self.preparing.contains_key(&key) {
            return Err(reject(ErrorCode::DuplicateRequest, format!("request {:?} is still running", g.rid)));
        }
        let live = self.client_requests(peer);
        if live >= self.max_client_requests {
            let message = format!(
                "request {:?} refused: this client already has {live} live requests, at most {} may be \
                 (--max-client-requests); wait for one to end",
                g.rid, self.max_client_requests
            );
            return Err(reject(ErrorCode::TooManyRequests, message));
        }
        // Before tokenizing: shedding load should cost as little as possible.
        if self.waiting + n > self.max_waiting {
            let message = format!(
                "the server is overloaded: {} requests wait for their first token, at most {} may \
                 (--max-waiting); retry later",
                self.waiting, self.max_waiting
            );
            return Err(reject(ErrorCode::Overloaded, message));
        }
        Ok(n)
    }

    fn admit(&mut self, peer: &Peer, g: Generate, n: u32, prepared: PreparedPrompt) -> Result<(), Rejection> {
        let PreparedPrompt { ids: prompt, constraint } = prepared;
        let reject = |code, message: String| Rejection::new(Some(g.rid.clone()), code, message);
        if self.draining {
            return Err(reject(ErrorCode::ShuttingDown, "the server is shutting down".into()));
        }
        let s = &g.sampling;
        let params = SamplingParams::from(s);
        let base = self.next_id;
        let prompt_tokens = prompt.len() as u32;
        // Checked in `prepare` already.
        let tool_plan = tools::plan_of(&g).ok().flatten();
        let mut prompt_lp = params.prompt_logprobs.map(|_| PromptLogprobs {
            ids: prompt.clone(),
            entries: vec![None],
            held: Vec::new(),
        });
        for index in 0..n {
            let seed = match s.seed {
                Some(seed) => sample_seed(seed, index),
                None => self.seeds.next(),
            };
            let constrained = constraint.is_some();
            // Computed once, by sample 0.
            let prompt_logprobs = params.prompt_logprobs.filter(|_| index == 0);
            let req = NewRequest {
                id: base + ReqId::from(index),
                prompt: prompt.clone(),
                params: SamplingParams { seed, constrained, prompt_logprobs, ..params.clone() },
            };
            let command = match &constraint {
                Some(c) => Command::SubmitConstrained { req, matcher: Box::new(c.matcher()) },
                None => Command::Submit(req),
            };
            if let Some(lp) = prompt_lp.as_mut().filter(|_| index > 0) {
                lp.held.push(command);
            } else if self.engine.send(command).is_err() {
                return Err(reject(ErrorCode::ShuttingDown, "the engine has stopped".into()));
            }
        }
        self.next_id += ReqId::from(n);
        let now = Instant::now();
        for index in 0..n {
            let sample = Sample {
                request: base,
                index,
                token_ids: Vec::new(),
                text: String::new(),
                detok: TextStream::new(self.preparer.tokenizer().clone(), s.stop.clone())
                    .skipping_special_tokens(s.skip_special_tokens),
                cached_tokens: 0,
                logprobs: s.logprobs.map(|_| Vec::new()),
                first_token: None,
                last_token: None,
                tools: tool_plan
                    .as_ref()
                    .and_then(|plan| ToolStream::new(plan, self.preparer.tool_format(), self.seeds.next())),
                prompt_sent: false,
            };
            self.samples.insert(base + ReqId::from(index), sample);
        }
        self.waiting += n;
        self.by_rid.insert((peer.clone(), g.rid.clone()), base);
        self.metrics.prompt_tokens.inc_by(u64::from(prompt_tokens));
        tracing::debug!(request_id = %g.rid, prompt_tokens, n, "request admitted");
        let request = Request {
            peer: peer.clone(),
            rid: g.rid,
            stream: g.stream,
            n,
            prompt_tokens,
            admitted: now,
            open: n,
            prompt: prompt_lp,
        };
        self.requests.insert(base, request);
        Ok(())
    }

    /// Turns one step's events into replies.
    pub fn on_events(&mut self, events: Vec<Event>, out: &mut Vec<(Peer, ServerMsg)>) {
        self.on_step(events, StepLogprobs::default(), out);
    }

    /// Turns one step's events into replies, with the logprobs they refer to (what the engine read from the result
    /// ring).
    pub fn on_step(&mut self, events: Vec<Event>, logprobs: StepLogprobs, out: &mut Vec<(Peer, ServerMsg)>) {
        let now = Instant::now();
        let StepLogprobs { tokens: logprobs, prompt } = logprobs;
        let (mut logprobs, mut prompt) = (logprobs.into_iter(), prompt.into_iter());
        for event in events {
            let (id, token, finish, asked) = match event {
                Event::PromptLogprobs { id, count, .. } => {
                    // Taken whether or not the request is still here, so the entries stay in step with their
                    // events.
                    let entries = prompt.by_ref().take(count as usize).map(Some);
                    let request = self.samples.get(&id).and_then(|s| self.requests.get_mut(&s.request));
                    if let Some(lp) = request.and_then(|r| r.prompt.as_mut()) {
                        lp.entries.extend(entries);
                    } else {
                        entries.for_each(drop);
                    }
                    continue;
                }
                Event::Token { id, token, finish, logprobs } => (id, token, finish, logprobs.is_some()),
                Event::Finished { id, reason } => {
                    self.finalize(id, reason, None, (String::new(), Vec::new()), out);
                    continue;
                }
                Event::Cached { id, tokens } => {
                    if let Some(sample) = self.samples.get_mut(&id) {
                        sample.cached_tokens = tokens;
                    }
                    continue;
                }
            };
            // Taken whether or not the sample is still here, so the entries stay in step with their events.
            let token_logprobs = if asked { logprobs.next() } else { None };
            let Some(sample) = self.samples.get_mut(&id) else { continue }; // ended here already (abort, stop string)
            if sample.index == 0 && sample.last_token.is_none() {
                // Sample 0's first token: the prompt logprobs are complete, the held samples may go.
                release_held(&self.engine, self.requests.get_mut(&sample.request));
            }
            let Some(request) = self.requests.get(&sample.request) else { continue };
            sample.token_ids.push(token);
            if let (Some(all), Some(lp)) = (&mut sample.logprobs, &token_logprobs) {
                all.push(lp.clone());
            }
            self.metrics.generated_tokens.inc();
            match sample.last_token {
                None => {
                    sample.first_token = Some(now);
                    self.waiting -= 1;
                    self.metrics.time_to_first_token.observe((now - request.admitted).as_secs_f64());
                }
                Some(last) => self.metrics.inter_token_latency.observe((now - last).as_secs_f64()),
            }
            sample.last_token = Some(now);
            // A token that stopped the request by id (EOS, a stop token) is returned as an id, not as text.
            let (piece, stopped) = if finish == Some(FinishReason::Stop) {
                (String::new(), false)
            } else {
                match sample.detok.push(token) {
                    Ok(step) => (step.text, step.stopped),
                    Err(e) => {
                        // Not the client's fault and not fatal: the id is still returned, its text is lost.
                        tracing::warn!("detokenizing token {token} of request {id}: {e}");
                        (String::new(), false)
                    }
                }
            };
            let (piece, calls) = match &mut sample.tools {
                Some(tools) => tools.push(&piece),
                None => (piece, Vec::new()),
            };
            sample.text.push_str(&piece);
            let last = Some((token, token_logprobs));
            if stopped {
                let _ = self.engine.send(Command::Finish(id));
                self.finalize(id, FinishReason::Stop, last, (piece, calls), out);
            } else if let Some(reason) = finish {
                self.finalize(id, reason, last, (piece, calls), out);
            } else if request.stream {
                let logprobs = last.and_then(|(_, lp)| lp).map(|lp| vec![lp]);
                out.push(delta(request, sample, vec![token], logprobs, piece, calls));
            }
        }
    }

    /// Ends sample `id` here. A streaming client gets a last delta first: the last token (if this step
    /// produced one), its text and tool calls, and whatever the detokenizer (and the tool-call parser) still
    /// held back that no stop string claimed. The request is forgotten with its last sample.
    fn finalize(
        &mut self,
        id: ReqId,
        reason: FinishReason,
        last_token: Option<(u32, Option<TokenLogprobs>)>,
        (mut piece, mut calls): (String, Vec<api::ToolCall>),
        out: &mut Vec<(Peer, ServerMsg)>,
    ) {
        let Some(mut sample) = self.samples.remove(&id) else { return };
        if sample.first_token.is_none() {
            self.waiting -= 1;
        }
        let key = sample.request;
        if sample.index == 0 {
            // Sample 0 ended before its first token (the KV cache could not hold it): the others run without it.
            release_held(&self.engine, self.requests.get_mut(&key));
        }
        let Some(request) = self.requests.get_mut(&key) else { return };
        request.open -= 1;
        if !sample.detok.stopped() {
            let rest = sample.detok.finish().unwrap_or_else(|e| {
                tracing::warn!("flushing the text of request {id}: {e}");
                String::new()
            });
            let rest = match &mut sample.tools {
                Some(tools) => {
                    let (mut text, new) = tools.push(&rest);
                    calls.extend(new);
                    let (held, new) = tools.finish();
                    text.push_str(&held);
                    calls.extend(new);
                    text
                }
                None => rest,
            };
            sample.text.push_str(&rest);
            piece.push_str(&rest);
        } else if let Some(tools) = &mut sample.tools {
            let (held, new) = tools.finish();
            sample.text.push_str(&held);
            piece.push_str(&held);
            calls.extend(new);
        }
        if request.stream && (last_token.is_some() || !piece.is_empty() || !calls.is_empty()) {
            let (token_ids, logprobs) = match last_token {
                Some((token, lp)) => (vec![token], lp.map(|lp| vec![lp])),
                None => (Vec::new(), sample.logprobs.as_ref().map(|_| Vec::new())),
            };
            out.push(delta(request, &mut sample, token_ids, logprobs, piece, calls));
        }
        ended(&self.metrics, request, &sample, reason);
        out.push((request.peer.clone(), final_msg(request, sample, reason, None)));
        if request.open == 0
            && let Some(request) = self.requests.remove(&key)
        {
            self.client_ended(&request.peer);
            self.by_rid.remove(&(request.peer, request.rid));
        }
    }

    /// Every live request ends with an error saying why: the engine is gone, or the drain ran out of time.
    pub fn fail_all(&mut self, why: &str, out: &mut Vec<(Peer, ServerMsg)>) {
        let mut samples: Vec<_> = std::mem::take(&mut self.samples).into_iter().collect();
        // Each client reads its samples' finals in index order.
        samples.sort_unstable_by_key(|(id, _)| *id);
        for (id, sample) in samples {
            let _ = self.engine.send(Command::Finish(id));
            let Some(request) = self.requests.get(&sample.request) else { continue };
            ended(&self.metrics, request, &sample, FinishReason::Error);
            out.push((request.peer.clone(), final_msg(request, sample, FinishReason::Error, Some(why.to_string()))));
        }
        self.requests.clear();
        self.by_rid.clear();
        self.per_client.clear();
        // Requests still being prepared are answered now: the loop that would admit them is ending. (An HTTP
        // handler learns it from its dropped verdict channel.)
        for ((peer, rid), _) in self.preparing.drain() {
            if let Peer::Zmq(_) = peer {
                out.push((peer, Rejection::new(Some(rid), ErrorCode::ShuttingDown, why.to_string()).to_msg()));
            }
        }
        self.waiting = 0;
    }
}

/// Records a sample's end: its outcome and latency in the metrics, and one line in the log.
fn ended(metrics: &Metrics, request: &Request, sample: &Sample, reason: FinishReason) {
    let outcome = match reason {
        FinishReason::Stop => Outcome::Stop,
        FinishReason::Length => Outcome::Length,
        FinishReason::Abort => Outcome::Abort,
        FinishReason::Error => Outcome::Error,
        FinishReason::Memory => Outcome::Memory,
    };
    let total = request.admitted.elapsed();
    metrics.request_ended(outcome);
    metrics.request_latency.observe(total.as_secs_f64());
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    tracing::info!(
        request_id = %request.rid,
        sample = (request.n > 1).then_some(sample.index),
        prompt_tokens = request.prompt_tokens,
        cached_tokens = sample.cached_tokens,
        completion_tokens = sample.token_ids.len(),
        ttft_ms = sample.first_token.map(|t| ms(t - request.admitted)),
        total_ms = ms(total),
        finish_reason = outcome.label(),
        "request finished"
    );
}

/// Sends the samples held back behind sample 0 of `request` (see [`PromptLogprobs`]), if any.
fn release_held(engine: &Sender<Command>, request: Option<&mut Request>) {
    if let Some(prompt) = request.and_then(|r| r.prompt.as_mut()) {
        for command in prompt.held.drain(..) {
            // A stopped engine fails every request on its own; nothing more to do here.
            let _ = engine.send(command);
        }
    }
}

/// The prompt logprobs a delta of `sample` carries: the request's, on the sample's first delta only.
/// A streaming delta of `sample`: its new tokens with their logprobs, text and tool calls, and with the first
/// one the prompt's logprobs and ids.
fn delta(
    request: &Request,
    sample: &mut Sample,
    token_ids: Vec<u32>,
    logprobs: Option<Vec<TokenLogprobs>>,
    text: String,
    calls: Vec<api::ToolCall>,
) -> (Peer, ServerMsg) {
    let (prompt_logprobs, prompt_token_ids) = first_delta_prompt(request, sample);
    let delta = Delta {
        rid: request.rid.clone(),
        index: sample.index,
        token_ids,
        text,
        logprobs,
        prompt_logprobs,
        prompt_token_ids,
        tool_calls: (!calls.is_empty()).then_some(calls),
    };
    (request.peer.clone(), ServerMsg::Delta(delta))
}

fn first_delta_prompt(
    request: &Request,
    sample: &mut Sample,
) -> (Option<Vec<Option<TokenLogprobs>>>, Option<Vec<u32>>) {
    match &request.prompt {
        Some(prompt) if !sample.prompt_sent => {
            sample.prompt_sent = true;
            prompt.message()
        }
        _ => (None, None),
    }
}

fn final_msg(request: &Request, sample: Sample, reason: FinishReason, message: Option<String>) -> ServerMsg {
    let (prompt_logprobs, prompt_token_ids) = request.prompt.as_ref().map_or((None, None), PromptLogprobs::message);
    ServerMsg::Final(Final {
        rid: request.rid.clone(),
        index: sample.index,
        finish_reason: reason,
        prompt_tokens: request.prompt_tokens,
        completion_tokens: sample.token_ids.len() as u32,
        cached_tokens: sample.cached_tokens,
        token_ids: sample.token_ids,
        text: sample.text,
        message,
        logprobs: sample.logprobs,
        prompt_logprobs,
        prompt_token_ids,
        tool_calls: sample.tools.map(ToolStream::into_calls).filter(|calls| !calls.is_empty()),
    })
}

/// The seed of sample `index` of a request seeded with `seed`: the seed itself for sample 0, so that `n: 1`
/// and the first of `n` samples agree; for sample i >= 1 the i-th output of splitmix64 started from `seed`
/// (docs/protocol.md spells it out), so that the samples differ and each is reproducible from the request.
pub fn sample_seed(seed: u64, index: u32) -> u64 {
    if index == 0 { seed } else { splitmix64(seed.wrapping_add(u64::from(index).wrapping_mul(GOLDEN_GAMMA))) }
}

const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's output function: consecutive states give well-mixed outputs.
fn splitmix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Seeds for requests that name none: distinct per request and per process start, so two unseeded requests
/// never share their randomness.
struct SeedSource(u64);

impl SeedSource {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        SeedSource(nanos as u64 ^ (u64::from(std::process::id()) << 32))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        splitmix64(self.0)
    }
}

/// A hub over the byte-level test tokenizer (context 64, no chat template) and the receiving end of its
/// engine channel, for the server's unit tests.
#[cfg(test)]
pub(crate) fn test_hub(max_prompt_len: u32) -> (Hub, std::sync::mpsc::Receiver<Command>) {
    let tokenizer = crate::text::test_tokenizer::byte_level_tokenizer();
    let limits = PromptLimits { vocab_size: tokenizer.vocab_size() as u32, max_seq_len: 64, max_prompt_len };
    let info = InfoMsg {
        model: "test".into(),
        vocab_size: limits.vocab_size,
        max_seq_len: 64,
        max_batch: 4,
        page_size: 16,
        num_pages: 8,
        eos_token_ids: vec![0],
        live_requests: 0,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    (Hub::new(tokenizer, None, limits, info, tx, Arc::default()), rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::api::{FinishReason as Wire, Sampling};
    use std::sync::mpsc::Receiver;

    const ALICE: &[u8] = b"alice";

    fn peer() -> Peer {
        Peer::Zmq(vec![Bytes::from_static(ALICE)])
    }

    /// What the serve loop does with a message, the preparation done on the spot.
    fn send(hub: &mut Hub, msg: &ClientMsg) -> Vec<(Peer, ServerMsg)> {
        let mut out = Vec::new();
        if let Some(g) = hub.on_message(&peer(), &api::encode(msg), &mut out) {
            let prompt = hub.preparer().prepare(&g);
            if let Err(refused) = hub.submit_prepared(&peer(), g, prompt, &mut out) {
                out.push((peer(), refused.to_msg()));
            }
        }
        out
    }

    fn generate(rid: &str, text: &str, stream: bool, sampling: Sampling) -> ClientMsg {
        ClientMsg::Generate(Generate { text: Some(text.into()), stream, sampling, ..Generate::new(rid) })
    }

    fn submitted(rx: &Receiver<Command>) -> NewRequest {
        match rx.try_recv() {
            Ok(Command::Submit(req)) => req,
            _ => panic!("expected a submit"),
        }
    }

    fn error_code(out: &[(Peer, ServerMsg)]) -> ErrorCode {
        match out {
            [(_, ServerMsg::Error(e))] => e.code,
            other => panic!("expected one error, got {other:?}"),
        }
    }

    fn token(id: ReqId, token: u32, finish: Option<FinishReason>) -> Event {
        Event::Token { id, token, finish, logprobs: None }
    }

    /// A hub whose chat template shows the tools and teaches Qwen's `<tool_call>` format.
    fn tool_hub() -> (Hub, Receiver<Command>) {
        let (hub, rx) = test_hub(1000);
        let template = "{% if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools> answer with \
            <tool_call>{% endif %}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}[assistant]";
        let chat = ChatTemplate::from_source(template).unwrap();
        let preparer = Preparer::new(hub.preparer.tokenizer().clone(), Some(chat), hub.preparer.limits().clone());
        (Hub { preparer, ..hub }, rx)
    }

    fn tool_request(rid: &str, choice: &str) -> ClientMsg {
        ClientMsg::Generate(Generate {
            messages: Some(vec![serde_json::json!({"role": "user", "content": "weather?"})]),
            tools: Some(vec![serde_json::json!({"type": "function", "function": {"name": "get_weather"}})]),
            tool_choice: Some(choice.into()),
            ..Generate::new(rid)
        })
    }

    #[test]
    fn tool_calls_are_parsed_from_the_output_streamed_and_in_the_final() {
        let (mut hub, rx) = tool_hub();
        assert!(send(&mut hub, &tool_request("t", "auto")).is_empty());
        let req = submitted(&rx);
        let prompt = hub.preparer.tokenizer().decode(&req.prompt).unwrap();
        assert_eq!(
            prompt,
            "<tools>{\"type\": \"function\", \"function\": {\"name\": \"get_weather\"}}</tools> answer with \
             <tool_call>[user]weather?[assistant]",
            "the tools reach the template"
        );
        let output =
            "Sure.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        let ids = hub.preparer.tokenizer().encode(output).unwrap();
        let mut out = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            let last = (i + 1 == ids.len()).then_some(FinishReason::Stop);
            // The stop token's text is not output: stop on an extra EOS after the last byte.
            hub.on_events(vec![token(req.id, id, None)], &mut out);
            if last.is_some() {
                hub.on_events(vec![token(req.id, 0, last)], &mut out);
            }
        }
        let mut text = String::new();
        let mut streamed = Vec::new();
        let mut fin = None;
        for (_, m) in &out {
            match m {
                ServerMsg::Delta(d) => {
                    text.push_str(&d.text);
                    streamed.extend(d.tool_calls.clone().unwrap_or_default());
                }
                ServerMsg::Final(f) => fin = Some(f.clone()),
                other => panic!("{other:?}"),
            }
        }
        let fin = fin.expect("a final");
        assert_eq!((text.as_str(), fin.text.as_str()), ("Sure.", "Sure."), "no markup in the content");
        let calls = fin.tool_calls.expect("the final carries the calls");
        assert_eq!(calls.len(), 1);
        assert_eq!(
            (calls[0].index, calls[0].name.as_str(), calls[0].arguments.as_str()),
            (0, "get_weather", r#"{"city":"Oslo"}"#)
        );
        assert_eq!(streamed, calls, "the deltas carry the same calls, ids included");
        assert_eq!(fin.token_ids.len(), ids.len() + 1);
    }

    #[test]
    fn with_tool_choice_none_the_tools_are_rendered_and_the_output_left_as_it_is() {
        let (mut hub, rx) = tool_hub();
        assert!(send(&mut hub, &tool_request("t", "none")).is_empty());
        let req = submitted(&rx);
        let prompt = hub.preparer.tokenizer().decode(&req.prompt).unwrap();
        assert!(prompt.starts_with("<tools>"), "{prompt}");
        let output = "<tool_call>{\"name\": \"get_weather\"}</tool_call>";
        let ids = hub.preparer.tokenizer().encode(output).unwrap();
        let mut out = Vec::new();
        let events: Vec<Event> = ids.iter().map(|&id| token(req.id, id, None)).collect();
        hub.on_events(events, &mut out);
        hub.on_events(vec![token(req.id, 0, Some(FinishReason::Stop))], &mut out);
        let Some((_, ServerMsg::Final(f))) = out.last() else { panic!("{out:?}") };
        assert_eq!((f.text.as_str(), f.tool_calls.as_ref()), (output, None));
    }

    #[test]
    fn tools_are_refused_for_a_template_that_would_not_render_them() {
        let (hub, _) = test_hub(1000);
        let chat = ChatTemplate::from_source("{% for m in messages %}{{ m.content }}{% endfor %}").unwrap();
        let preparer = Preparer::new(hub.preparer.tokenizer().clone(), Some(chat), hub.preparer.limits().clone());
        let mut hub = Hub { preparer, ..hub };
        let out = send(&mut hub, &tool_request("t", "auto"));
        let [(_, ServerMsg::Error(e))] = &out[..] else { panic!("{out:?}") };
        assert_eq!(e.code, ErrorCode::InvalidParams);
        assert!(e.message.contains("does not render tools"), "{}", e.message);
    }

    #[test]
    fn a_bad_tool_is_refused_naming_it_on_the_zmq_door() {
        let (mut hub, _rx) = tool_hub();
        let ClientMsg::Generate(mut g) = tool_request("t", "auto") else { unreachable!() };
        g.tools = Some(vec![serde_json::json!({"type": "function", "function": {"name": "a b"}})]);
        let out = send(&mut hub, &ClientMsg::Generate(g));
        let [(_, ServerMsg::Error(e))] = &out[..] else { panic!("{out:?}") };
        assert_eq!(e.code, ErrorCode::InvalidParams);
        assert!(e.message.starts_with("tools[0].function.name"), "{}", e.message);
        assert_eq!(hub.live_requests(), 0);
    }

    #[test]
    fn a_request_is_tokenized_submitted_streamed_and_finished() {
        let (mut hub, rx) = test_hub(32);
        assert!(send(&mut hub, &generate("a", "hé", true, Sampling::default())).is_empty());
        let req = submitted(&rx);
        assert_eq!(req.prompt, hub.preparer.tokenizer().encode("hé").unwrap());
        let ids = hub.preparer.tokenizer().encode("中!").unwrap(); // three tokens; the first two split one character
        let mut out = Vec::new();
        hub.on_events(vec![token(req.id, ids[0], None)], &mut out);
        hub.on_events(vec![token(req.id, ids[1], None), token(req.id, ids[2], Some(FinishReason::Length))], &mut out);
        let texts: Vec<_> = out
            .iter()
            .filter_map(|(_, m)| match m {
                ServerMsg::Delta(d) => Some(d.text.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(texts, ["", "中", "!"], "a character split over tokens comes out whole");
        match &out.last().unwrap().1 {
            ServerMsg::Final(f) => {
                assert_eq!((f.rid.as_str(), f.finish_reason, f.text.as_str()), ("a", Wire::Length, "中!"));
                assert_eq!((f.token_ids.clone(), f.prompt_tokens, f.completion_tokens), (ids, 2, 3));
            }
            other => panic!("expected the final, got {other:?}"),
        }
        assert_eq!(hub.live_requests(), 0);
    }

    #[test]
    fn sampling_options_reach_the_core_as_given() {
        let (mut hub, rx) = test_hub(32);
        let sampling = Sampling {
            min_p: 0.25,
            presence_penalty: 0.5,
            frequency_penalty: -1.0,
            repetition_penalty: 1.25,
            logit_bias: vec![(b'a' as u32, 5.0), (b'b' as u32, -100.0)],
            logprobs: Some(3),
            ..Sampling::default()
        };
        send(&mut hub, &generate("a", "x", true, sampling));
        let p = submitted(&rx).params;
        assert_eq!((p.min_p, p.presence_penalty, p.frequency_penalty, p.repetition_penalty), (0.25, 0.5, -1.0, 1.25));
        assert_eq!((p.logit_bias, p.logprobs), (vec![(b'a' as u32, 5.0), (b'b' as u32, -100.0)], Some(3)));
        send(&mut hub, &generate("b", "x", true, Sampling::default()));
        let p = submitted(&rx).params;
        assert_eq!(p, SamplingParams { seed: p.seed, max_tokens: 128, ..SamplingParams::default() }, "all off");
    }

    #[test]
    fn a_logit_bias_outside_the_vocabulary_is_refused_naming_it() {
        let (mut hub, rx) = test_hub(32);
        let vocab = hub.preparer().limits().vocab_size;
        let g = Generate {
            text: Some("x".into()),
            sampling: Sampling { logit_bias: vec![(1, 1.0), (vocab, 1.0)], ..Sampling::default() },
            ..Generate::new("a")
        };
        let e = hub.submit(&Peer::Http(1), g).unwrap_err();
        assert_eq!((e.code, e.param.as_deref()), (ErrorCode::InvalidParams, Some("logit_bias")));
        assert!(e.message.contains("outside the vocabulary"), "{}", e.message);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn messages_are_checked_before_any_template_and_the_refusal_names_the_field() {
        let (mut hub, _rx) = test_hub(32);
        for (messages, param) in [
            (serde_json::json!([{"role": "user"}]), "messages[0].content"),
            (
                serde_json::json!([{"role": "user", "content": "x"}, {"role": "wizard", "content": "y"}]),
                "messages[1].role",
            ),
        ] {
            let g = Generate { messages: Some(messages.as_array().unwrap().clone()), ..Generate::new("m") };
            let e = hub.submit(&peer(), g).unwrap_err();
            assert_eq!((e.code, e.param.as_deref()), (ErrorCode::InvalidParams, Some(param)));
        }
    }

    fn logprobs_of(token: u32) -> TokenLogprobs {
        TokenLogprobs { logprob: -(token as f32), top: vec![(token, -(token as f32))] }
    }

    fn token_with_logprobs(id: ReqId, token: u32, finish: Option<FinishReason>) -> Event {
        Event::Token { id, token, finish, logprobs: Some(crate::core::LogprobsAt { row: 0, top: 1 }) }
    }

    #[test]
    fn logprobs_go_out_with_their_tokens_in_deltas_and_the_final() {
        let (mut hub, rx) = test_hub(32);
        let sampling = Sampling { logprobs: Some(1), ..Sampling::default() };
        send(&mut hub, &generate("a", "x", true, sampling));
        send(&mut hub, &generate("b", "x", true, Sampling::default()));
        let (a, b) = (submitted(&rx).id, submitted(&rx).id);
        let mut out = Vec::new();
        // One step: a's token with its entry, b's without; then a's last token, which ends it.
        let events = vec![token_with_logprobs(a, b'o' as u32, None), token(b, b'p' as u32, None)];
        hub.on_step(events, StepLogprobs { tokens: vec![logprobs_of(b'o' as u32)], prompt: vec![] }, &mut out);
        let events = vec![token_with_logprobs(a, b'k' as u32, Some(FinishReason::Length))];
        hub.on_step(events, StepLogprobs { tokens: vec![logprobs_of(b'k' as u32)], prompt: vec![] }, &mut out);
        let deltas: Vec<(&str, Option<Vec<TokenLogprobs>>)> = out
            .iter()
            .filter_map(
                |(_, m)| if let ServerMsg::Delta(d) = m { Some((d.rid.as_str(), d.logprobs.clone())) } else { None },
            )
            .collect();
        assert_eq!(
            deltas,
            [("a", Some(vec![logprobs_of(b'o' as u32)])), ("b", None), ("a", Some(vec![logprobs_of(b'k' as u32)])),]
        );
        let f = final_of(&out, 0);
        assert_eq!((f.rid.as_str(), f.text.as_str()), ("a", "ok"));
        assert_eq!(f.logprobs, Some(vec![logprobs_of(b'o' as u32), logprobs_of(b'k' as u32)]), "one per token id");
    }

    #[test]
    fn special_tokens_stay_in_the_text_when_asked() {
        let (mut hub, rx) = test_hub(32);
        let special = hub.preparer().tokenizer().token_id(crate::text::test_tokenizer::SPECIAL).unwrap();
        for (rid, skip, want) in [("a", true, "ok"), ("b", false, "o<|end|>k")] {
            let sampling = Sampling { skip_special_tokens: skip, ..Sampling::default() };
            send(&mut hub, &generate(rid, "x", false, sampling));
            let id = submitted(&rx).id;
            let mut out = Vec::new();
            let events = vec![
                token(id, b'o' as u32, None),
                token(id, special, None),
                token(id, b'k' as u32, Some(FinishReason::Length)),
            ];
            hub.on_events(events, &mut out);
            assert_eq!(final_of(&out, 0).text, want);
        }
    }

    #[test]
    fn without_stream_only_the_final_is_sent() {
        let (mut hub, rx) = test_hub(32);
        send(&mut hub, &generate("a", "x", false, Sampling::default()));
        let id = submitted(&rx).id;
        let mut out = Vec::new();
        hub.on_events(vec![token(id, b'o' as u32, None)], &mut out);
        assert!(out.is_empty());
        hub.on_events(vec![token(id, b'k' as u32, Some(FinishReason::Length))], &mut out);
        assert!(matches!(&out[..], [(_, ServerMsg::Final(f))] if f.text == "ok"));
    }

    #[test]
    fn a_stop_token_counts_as_an_id_but_not_as_text() {
        let (mut hub, rx) = test_hub(32);
        send(&mut hub, &generate("a", "x", false, Sampling::default()));
        let id = submitted(&rx).id;
        let mut out = Vec::new();
        // "!" is an ordinary token here: named in stop_token_ids, it ends the request and its text is not shown.
        hub.on_events(vec![token(id, b'k' as u32, None), token(id, b'!' as u32, Some(FinishReason::Stop))], &mut out);
        match &out[..] {
            [(_, ServerMsg::Final(f))] => assert_eq!((f.text.as_str(), f.token_ids.len()), ("k", 2)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_stop_string_ends_the_request_and_cuts_the_text() {
        let (mut hub, rx) = test_hub(32);
        let sampling = Sampling { stop: vec!["ab".into()], ..Sampling::default() };
        send(&mut hub, &generate("a", "x", true, sampling));
        let id = submitted(&rx).id;
        let mut out = Vec::new();
        let events = "xyzabq".bytes().map(|b| token(id, b as u32, None)).collect();
        hub.on_events(events, &mut out);
        assert!(matches!(rx.try_recv(), Ok(Command::Finish(finished)) if finished == id));
        let deltas: String = out
            .iter()
            .filter_map(|(_, m)| if let ServerMsg::Delta(d) = m { Some(d.text.clone()) } else { None })
            .collect();
        match &out.last().unwrap().1 {
            ServerMsg::Final(f) => {
                assert_eq!((f.finish_reason, f.text.as_str(), deltas.as_str()), (Wire::Stop, "xyz", "xyz"));
                assert_eq!(f.token_ids.len(), 5, "tokens up to the one that completed the stop string");
            }
            other => panic!("{other:?}"),
        }
        let mut late = Vec::new();
        hub.on_events(vec![token(id, b'q' as u32, None)], &mut late);
        assert!(late.is_empty(), "tokens of an ended request are dropped");
    }

    #[test]
    fn abort_finishes_a_live_request_and_refuses_an_unknown_one() {
        let (mut hub, rx) = test_hub(32);
        send(&mut hub, &generate("a", "x", true, Sampling::default()));
        let id = submitted(&rx).id;
        assert_eq!(error_code(&send(&mut hub, &ClientMsg::Abort { rid: "nope".into() })), ErrorCode::UnknownRequest);
        let out = send(&mut hub, &ClientMsg::Abort { rid: "a".into() });
        assert!(matches!(&out[..], [(_, ServerMsg::Final(f))] if f.finish_reason == Wire::Abort));
        assert!(matches!(rx.try_recv(), Ok(Command::Finish(finished)) if finished == id));
        // The rid is free again once its request ended.
        assert!(send(&mut hub, &generate("a", "x", true, Sampling::default())).is_empty());
    }

    #[test]
    fn a_request_being_prepared_is_live_refuses_its_duplicate_and_can_be_aborted() {
        let (mut hub, rx) = test_hub(32);
        let mut out = Vec::new();
        let msg = api::encode(&generate("a", "xy", true, Sampling::default()));
        let pending = hub.on_message(&peer(), &msg, &mut out).expect("accepted, to be prepared");
        assert_eq!((hub.live_requests(), hub.waiting(), out.len()), (1, 1, 0));
        assert!(hub.on_message(&peer(), &msg, &mut out).is_none());
        assert_eq!(error_code(&out), ErrorCode::DuplicateRequest);
        out.clear();
        assert!(hub.on_message(&peer(), &api::encode(&ClientMsg::Abort { rid: "a".into() }), &mut out).is_none());
        assert!(out.is_empty(), "the abort is taken: its final comes once the request is admitted");
        let prompt = hub.preparer().prepare(&pending);
        hub.submit_prepared(&peer(), pending, prompt, &mut out).unwrap();
        assert!(matches!(&out[..], [(_, ServerMsg::Final(f))] if f.finish_reason == Wire::Abort));
        let id = submitted(&rx).id;
        assert!(matches!(rx.try_recv(), Ok(Command::Finish(finished)) if finished == id));
        assert_eq!((hub.live_requests(), hub.waiting()), (0, 0));
    }

    #[test]
    fn a_request_whose_preparation_fails_is_refused_and_forgotten() {
        let (mut hub, rx) = test_hub(4);
        let mut out = Vec::new();
        let msg = api::encode(&generate("a", "far too long", false, Sampling::default()));
        let pending = hub.on_message(&peer(), &msg, &mut out).expect("accepted, to be prepared");
        let prompt = hub.preparer().prepare(&pending);
        let refused = hub.submit_prepared(&peer(), pending, prompt, &mut out).unwrap_err();
        assert_eq!(refused.code, ErrorCode::PromptTooLong);
        assert!(rx.try_recv().is_err(), "nothing reached the engine");
        assert_eq!((hub.live_requests(), hub.waiting()), (0, 0));
        assert!(send(&mut hub, &generate("a", "ok", false, Sampling::default())).is_empty(), "the rid is free");
    }

    #[test]
    fn requests_being_prepared_get_an_error_when_the_engine_fails() {
        let (mut hub, _rx) = test_hub(32);
        let mut out = Vec::new();
        let msg = api::encode(&generate("a", "x", true, Sampling::default()));
        assert!(hub.on_message(&peer(), &msg, &mut out).is_some());
        hub.fail_all("the engine stopped", &mut out);
        assert_eq!(error_code(&out), ErrorCode::ShuttingDown);
        assert_eq!((hub.live_requests(), hub.waiting()), (0, 0));
    }

    #[test]
    fn bad_requests_get_the_right_error_codes() {
        let (mut hub, rx) = test_hub(4);
        let mut out = Vec::new();
        hub.on_message(&peer(), b"\xc1", &mut out);
        assert_eq!(error_code(&out), ErrorCode::Malformed);
        assert_eq!(error_code(&send(&mut hub, &generate("a", "", true, Sampling::default()))), ErrorCode::EmptyPrompt);
        let long = generate("a", "hello world", true, Sampling::default());
        assert_eq!(error_code(&send(&mut hub, &long)), ErrorCode::PromptTooLong);
        let hot = Sampling { temperature: f64::NAN, ..Sampling::default() };
        assert_eq!(error_code(&send(&mut hub, &generate("a", "x", true, hot))), ErrorCode::InvalidParams);
        let ids = ClientMsg::Generate(Generate { input_ids: Some(vec![1, 1 << 20]), ..Generate::new("a") });
        assert_eq!(error_code(&send(&mut hub, &ids)), ErrorCode::InvalidParams);
        send(&mut hub, &generate("dup", "x", true, Sampling::default()));
        assert_eq!(
            error_code(&send(&mut hub, &generate("dup", "y", true, Sampling::default()))),
            ErrorCode::DuplicateRequest
        );
        assert!(matches!(rx.try_recv(), Ok(Command::Submit(_))));
        assert!(rx.try_recv().is_err(), "nothing refused reached the engine");
    }

    #[test]
    fn unseeded_requests_get_distinct_seeds_and_seeded_ones_keep_theirs() {
        let (mut hub, rx) = test_hub(32);
        send(&mut hub, &generate("a", "x", true, Sampling::default()));
        send(&mut hub, &generate("b", "x", true, Sampling::default()));
        send(&mut hub, &generate("c", "x", true, Sampling { seed: Some(7), ..Sampling::default() }));
        let seeds: Vec<u64> = (0..3).map(|_| submitted(&rx).params.seed).collect();
        assert_ne!(seeds[0], seeds[1]);
        assert_eq!(seeds[2], 7);
    }

    #[test]
    fn when_the_engine_fails_every_live_request_ends_with_an_error() {
        let (mut hub, _rx) = test_hub(32);
        send(&mut hub, &generate("a", "x", true, Sampling::default()));
        send(&mut hub, &generate("b", "x", false, Sampling::default()));
        let mut out = Vec::new();
        hub.fail_all("the worker died", &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|(_, m)| matches!(m, ServerMsg::Final(f)
            if f.finish_reason == Wire::Error && f.message.as_deref() == Some("the worker died"))));
        assert_eq!(hub.live_requests(), 0);
    }

    fn live_in_info(hub: &mut Hub) -> u32 {
        match &send(hub, &ClientMsg::Info)[..] {
            [(_, ServerMsg::Info(info))] => info.live_requests,
            other => panic!("expected the info reply, got {other:?}"),
        }
    }

    #[test]
    fn info_counts_the_live_requests() {
        let (mut hub, rx) = test_hub(32);
        assert_eq!(live_in_info(&mut hub), 0);
        send(&mut hub, &generate("a", "x", true, Sampling::default()));
        send(&mut hub, &generate("b", "x", true, Sampling::default()));
        assert_eq!(live_in_info(&mut hub), 2);
        let id = submitted(&rx).id;
        hub.on_events(vec![token(id, b'k' as u32, Some(FinishReason::Length))], &mut Vec::new());
        assert_eq!(live_in_info(&mut hub), 1);
    }

    #[test]
    fn an_http_request_and_a_zmq_rid_of_the_same_name_do_not_collide() {
        let (mut hub, rx) = test_hub(32);
        let http = Peer::Http(7);
        let g = Generate { text: Some("x".into()), stream: false, ..Generate::new("same") };
        hub.submit(&http, g.clone()).unwrap();
        assert!(send(&mut hub, &ClientMsg::Generate(g.clone())).is_empty(), "the ZeroMQ client's rid is its own");
        assert_eq!(hub.submit(&http, g).unwrap_err().code, ErrorCode::DuplicateRequest);
        let (http_id, zmq_id) = (submitted(&rx).id, submitted(&rx).id);
        // A ZeroMQ client cannot abort the HTTP request by naming its rid: it aborts its own.
        let out = send(&mut hub, &ClientMsg::Abort { rid: "same".into() });
        assert!(matches!(&out[..], [(p, ServerMsg::Final(f))] if *p == peer() && f.finish_reason == Wire::Abort));
        assert!(matches!(rx.try_recv(), Ok(Command::Finish(id)) if id == zmq_id));
        let mut out = Vec::new();
        hub.on_events(vec![token(http_id, b'k' as u32, Some(FinishReason::Length))], &mut out);
        assert!(matches!(&out[..], [(Peer::Http(7), ServerMsg::Final(f))] if f.text == "k"));
        assert_eq!(hub.live_requests(), 0);
    }

    #[test]
    fn cancel_ends_a_live_request_once() {
        let (mut hub, rx) = test_hub(32);
        let http = Peer::Http(1);
        hub.submit(&http, Generate { text: Some("x".into()), ..Generate::new("r") }).unwrap();
        let id = submitted(&rx).id;
        let mut out = Vec::new();
        assert!(!hub.cancel(&Peer::Http(2), "r", &mut out), "another peer's rid");
        assert!(hub.cancel(&http, "r", &mut out));
        assert!(matches!(&out[..], [(p, ServerMsg::Final(f))] if *p == http && f.finish_reason == Wire::Abort));
        assert!(matches!(rx.try_recv(), Ok(Command::Finish(finished)) if finished == id));
        assert!(!hub.cancel(&http, "r", &mut out), "it has ended");
        assert_eq!((out.len(), hub.live_requests()), (1, 0));
    }

    #[test]
    fn a_refused_submit_sends_nothing_and_says_why() {
        let (mut hub, rx) = test_hub(4);
        let long = Generate { text: Some("hello world".into()), ..Generate::new("r") };
        let rejection = hub.submit(&Peer::Http(1), long).unwrap_err();
        assert_eq!((rejection.code, rejection.rid.as_deref()), (ErrorCode::PromptTooLong, Some("r")));
        assert!(rejection.message.contains("at most 4"), "{}", rejection.message);
        assert!(rx.try_recv().is_err());
        assert_eq!(hub.live_requests(), 0);
    }

    #[test]
    fn metrics_count_requests_tokens_and_latencies_as_they_happen() {
        let (mut hub, rx) = test_hub(4);
        send(&mut hub, &generate("a", "x", true, Sampling::default()));
        let id = submitted(&rx).id;
        send(&mut hub, &generate("b", "hello world", true, Sampling::default())); // too long: refused
        hub.drain();
        assert_eq!(
            error_code(&send(&mut hub, &generate("c", "x", true, Sampling::default()))),
            ErrorCode::ShuttingDown
        );
        hub.on_events(vec![token(id, b'o' as u32, None)], &mut Vec::new());
        hub.on_events(vec![token(id, b'k' as u32, Some(FinishReason::Length))], &mut Vec::new());
        let text = hub.metrics.render();
        let value = |series: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series}: {text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert_eq!(value("minisgl_requests_total{outcome=\"length\"} "), 1.0);
        assert_eq!(value("minisgl_requests_total{outcome=\"rejected\"} "), 2.0, "too long, and shutting down");
        assert_eq!(value("minisgl_prompt_tokens_total "), 1.0);
        assert_eq!(value("minisgl_generation_tokens_total "), 2.0);
        assert_eq!(value("minisgl_time_to_first_token_seconds_count "), 1.0);
        assert_eq!(value("minisgl_inter_token_latency_seconds_count "), 1.0);
        assert_eq!(value("minisgl_e2e_request_latency_seconds_count "), 1.0);
    }

    #[test]
    fn a_max_tokens_beyond_u32_saturates_instead_of_wrapping() {
        let (mut hub, rx) = test_hub(32);
        let huge = Sampling { max_tokens: (1 << 32) + 5, ..Sampling::default() };
        send(&mut hub, &generate("a", "x", true, huge));
        assert_eq!(submitted(&rx).params.max_tokens, u32::MAX);
    }

    fn final_of(out: &[(Peer, ServerMsg)], index: u32) -> &Final {
        let mut finals = out.iter().filter_map(|(_, m)| match m {
            ServerMsg::Final(f) if f.index == index => Some(f),
            _ => None,
        });
        let f = finals.next().unwrap_or_else(|| panic!("no final of sample {index} in {out:?}"));
        assert!(finals.next().is_none(), "one final per sample");
        f
    }

    #[test]
    fn past_max_waiting_a_request_is_refused_at_once_and_taken_again_once_the_queue_moves() {
        let (hub, rx) = test_hub(32);
        let mut hub = hub.with_max_waiting(2);
        send(&mut hub, &generate("a", "x", true, Sampling::default()));
        send(&mut hub, &generate("b", "x", true, Sampling::default()));
        let (a, b) = (submitted(&rx).id, submitted(&rx).id);
        assert_eq!(hub.waiting(), 2);
        let out = send(&mut hub, &generate("c", "x", true, Sampling::default()));
        let [(_, ServerMsg::Error(e))] = &out[..] else { panic!("{out:?}") };
        assert_eq!((e.code, e.rid.as_deref()), (ErrorCode::Overloaded, Some("c")));
        assert!(e.message.contains("at most 2") && e.message.contains("--max-waiting"), "{}", e.message);
        assert!(rx.try_recv().is_err(), "a refused request never reaches the engine");
        // A first token takes a request out of the queue: there is room again.
        hub.on_events(vec![token(a, b'o' as u32, None)], &mut Vec::new());
        assert_eq!(hub.waiting(), 1);
        assert!(send(&mut hub, &generate("c", "x", true, Sampling::default())).is_empty());
        submitted(&rx);
        assert_eq!(error_code(&send(&mut hub, &generate("d", "x", true, Sampling::default()))), ErrorCode::Overloaded);
        // So does an end before any token (an abort here).
        send(&mut hub, &ClientMsg::Abort { rid: "b".into() });
        assert!(matches!(rx.try_recv(), Ok(Command::Finish(id)) if id == b));
        assert_eq!(hub.waiting(), 1);
        // Two samples need two places: with one free, refused.
        let two = ClientMsg::Generate(Generate { n: 2, ..generate_of("e") });
        assert_eq!(error_code(&send(&mut hub, &two)), ErrorCode::Overloaded);
        assert!(send(&mut hub, &generate("d", "x", true, Sampling::default())).is_empty());
        // The first token of `a` came before its end; `a` ending does not count twice.
        hub.on_events(vec![token(a, b'k' as u32, Some(FinishReason::Length))], &mut Vec::new());
        assert_eq!((hub.waiting(), hub.live_requests()), (2, 2));
        let text = hub.metrics.render();
        assert!(text.contains("minisgl_requests_total{outcome=\"overloaded\"} 3"), "{text}");
        assert!(text.contains("minisgl_requests_total{outcome=\"rejected\"} 0"), "{text}");
    }

    fn generate_of(rid: &str) -> Generate {
        Generate { text: Some("x".into()), ..Generate::new(rid) }
    }

    #[test]
    fn the_prefix_caches_tokens_reach_the_final_of_their_sample() {
        let (mut hub, rx) = test_hub(32);
        send(&mut hub, &generate("a", "hello", false, Sampling::default()));
        let id = submitted(&rx).id;
        let mut out = Vec::new();
        hub.on_events(vec![Event::Cached { id, tokens: 4 }, Event::Cached { id: id + 99, tokens: 1 }], &mut out);
        assert!(out.is_empty());
        assert_eq!(hub.waiting(), 1, "cached tokens are not a first token");
        hub.on_events(vec![token(id, b'k' as u32, Some(FinishReason::Length))], &mut out);
        let f = final_of(&out, 0);
        assert_eq!((f.prompt_tokens, f.cached_tokens, f.completion_tokens), (5, 4, 1));
        // Without a Cached event (nothing was cached), 0.
        send(&mut hub, &generate("b", "hello", false, Sampling::default()));
        let id = submitted(&rx).id;
        let mut out = Vec::new();
        hub.on_events(vec![token(id, b'k' as u32, Some(FinishReason::Length))], &mut out);
        assert_eq!(final_of(&out, 0).cached_tokens, 0);
    }

    #[test]
    fn n_samples_fan_out_to_the_engine_and_fan_in_as_n_finals() {
        let (mut hub, rx) = test_hub(32);
        let sampling = Sampling { seed: Some(7), temperature: 0.8, ..Sampling::default() };
        let g = Generate { n: 3, ..Generate::new("a") };
        let g = Generate { text: Some("hi".into()), sampling, ..g };
        assert!(send(&mut hub, &ClientMsg::Generate(g.clone())).is_empty());
        let reqs: Vec<NewRequest> = (0..3).map(|_| submitted(&rx)).collect();
        assert!(reqs.iter().all(|r| r.prompt == reqs[0].prompt && r.params.temperature == 0.8));
        let ids: Vec<ReqId> = reqs.iter().map(|r| r.id).collect();
        assert_eq!(ids, [ids[0], ids[0] + 1, ids[0] + 2], "each sample its own id");
        let seeds: Vec<u64> = reqs.iter().map(|r| r.params.seed).collect();
        assert_eq!(seeds[0], 7, "sample 0 keeps the request's seed");
        assert!(seeds[1] != seeds[0] && seeds[2] != seeds[1] && seeds[2] != seeds[0]);
        // Splitmix64 from the seed: what docs/protocol.md tells a client to compute.
        let mut source = SeedSource(7);
        assert_eq!(seeds[1..], [source.next(), source.next()]);
        assert_eq!((hub.waiting(), hub.live_requests()), (3, 1));
        // A second request with the same seed gets the same seeds: reproducible.
        let again = Generate { rid: "b".into(), ..g };
        send(&mut hub, &ClientMsg::Generate(again));
        assert_eq!((0..3).map(|_| submitted(&rx).params.seed).collect::<Vec<_>>(), seeds);
        send(&mut hub, &ClientMsg::Abort { rid: "b".into() });
        while rx.try_recv().is_ok() {}

        let mut out = Vec::new();
        hub.on_events(
            vec![
                token(ids[2], b'z' as u32, None),
                token(ids[0], b'x' as u32, None),
                Event::Cached { id: ids[1], tokens: 0 },
            ],
            &mut out,
        );
        let deltas: Vec<(u32, String)> = out
            .iter()
            .filter_map(|(_, m)| if let ServerMsg::Delta(d) = m { Some((d.index, d.text.clone())) } else { None })
            .collect();
        assert_eq!(deltas, [(2, "z".to_string()), (0, "x".to_string())], "deltas say which sample they are of");
        hub.on_events(vec![token(ids[2], b'!' as u32, Some(FinishReason::Length))], &mut out);
        assert_eq!(final_of(&out, 2).text, "z!");
        assert_eq!(hub.live_requests(), 1, "live until its last sample ends");
        assert_eq!(
            error_code(&send(&mut hub, &generate("a", "x", true, Sampling::default()))),
            ErrorCode::DuplicateRequest
        );
        hub.on_events(vec![token(ids[1], b'y' as u32, Some(FinishReason::Length))], &mut out);
        hub.on_events(vec![token(ids[0], b'w' as u32, Some(FinishReason::Stop))], &mut out);
        let (f0, f1) = (final_of(&out, 0), final_of(&out, 1));
        assert_eq!((f0.text.as_str(), f0.finish_reason, f0.completion_tokens), ("x", Wire::Stop, 2));
        assert_eq!((f1.text.as_str(), f1.finish_reason, f1.prompt_tokens), ("y", Wire::Length, 2));
        assert!(out.iter().all(|(p, m)| *p == peer() && matches!(m, ServerMsg::Delta(_) | ServerMsg::Final(_))));
        assert_eq!((hub.waiting(), hub.live_requests()), (0, 0));
        assert!(send(&mut hub, &generate("a", "x", true, Sampling::default())).is_empty(), "the rid is free again");
        let text = hub.metrics.render();
        // "hi" twice (a, b) and "x": each request's prompt counts once, whatever its n.
        assert!(text.contains("minisgl_prompt_tokens_total 5"), "{text}");
    }

    #[test]
    fn unseeded_samples_draw_distinct_seeds() {
        let (mut hub, rx) = test_hub(32);
        send(&mut hub, &ClientMsg::Generate(Generate { n: 2, ..generate_of("a") }));
        let (s0, s1) = (submitted(&rx).params.seed, submitted(&rx).params.seed);
        assert_ne!(s0, s1);
    }

    #[test]
    fn n_is_bounded_by_the_batch_and_the_waiting_queue() {
        let (hub, rx) = test_hub(32);
        assert_eq!(hub.max_n(), 4, "the test hub's batch");
        let out = send_generate_n(&mut hub.with_max_waiting(3), 4);
        let [(_, ServerMsg::Error(e))] = &out[..] else { panic!("{out:?}") };
        assert_eq!(e.code, ErrorCode::InvalidParams);
        assert!(e.message.starts_with("n must be at most 3"), "{}", e.message);
        assert!(rx.try_recv().is_err());
        let (mut hub, rx) = test_hub(32);
        for n in [0, -1, 5, 1 << 40] {
            assert_eq!(error_code(&send_generate_n(&mut hub, n)), ErrorCode::InvalidParams, "n = {n}");
        }
        assert!(rx.try_recv().is_err());
        assert!(send_generate_n(&mut hub, 4).is_empty());
    }

    fn prompt_lp(logprob: f32) -> TokenLogprobs {
        TokenLogprobs { logprob, top: vec![(7, -0.5)] }
    }

    /// Sample 0 of a request with prompt logprobs asks for them; the other samples wait until it has them all
    /// (its first token), then every sample's first delta and final carry the same entries.
    #[test]
    fn prompt_logprobs_are_computed_by_sample_0_and_carried_by_every_sample() {
        let (mut hub, rx) = test_hub(32);
        let sampling = Sampling { prompt_logprobs: Some(1), ..Sampling::default() };
        send(&mut hub, &ClientMsg::Generate(Generate { n: 2, sampling, text: Some("abc".into()), ..generate_of("p") }));
        let first = submitted(&rx);
        assert_eq!(first.params.prompt_logprobs, Some(1));
        assert!(rx.try_recv().is_err(), "sample 1 is held back");
        let mut out = Vec::new();
        // Two chunks: the first prompt logprob, then the second with sample 0's first token.
        let id = first.id;
        let step = |entries: Vec<TokenLogprobs>| StepLogprobs { tokens: vec![], prompt: entries };
        hub.on_step(
            vec![Event::PromptLogprobs { id, first: 0, count: 1, top: 1 }],
            step(vec![prompt_lp(-1.0)]),
            &mut out,
        );
        assert!(out.is_empty() && rx.try_recv().is_err(), "nothing to say before the first token");
        let events = vec![Event::PromptLogprobs { id, first: 3, count: 1, top: 1 }, token(id, b'o' as u32, None)];
        hub.on_step(events, step(vec![prompt_lp(-2.0)]), &mut out);
        let second = submitted(&rx);
        assert_eq!((second.id, second.params.prompt_logprobs), (id + 1, None), "released, computing none");
        let want = Some(vec![None, Some(prompt_lp(-1.0)), Some(prompt_lp(-2.0))]);
        let prompt_of = |m: &ServerMsg| match m {
            ServerMsg::Delta(d) => (d.index, d.prompt_logprobs.clone(), d.prompt_token_ids.clone()),
            ServerMsg::Final(f) => (f.index, f.prompt_logprobs.clone(), f.prompt_token_ids.clone()),
            other => panic!("{other:?}"),
        };
        let ids = Some(b"abc".iter().map(|&b| b as u32).collect::<Vec<_>>());
        assert_eq!(prompt_of(&out[0].1), (0, want.clone(), ids.clone()), "sample 0's first delta");
        out.clear();
        hub.on_events(
            vec![token(id + 1, b'k' as u32, None), token(id, b'k' as u32, Some(FinishReason::Length))],
            &mut out,
        );
        let carried: Vec<_> = out.iter().map(|(_, m)| prompt_of(m)).collect();
        assert_eq!(
            carried,
            [(1, want.clone(), ids.clone()), (0, None, None), (0, want.clone(), ids.clone())],
            "sample 1's first delta, sample 0's later delta, sample 0's final"
        );
        out.clear();
        hub.on_events(vec![token(id + 1, b'!' as u32, Some(FinishReason::Length))], &mut out);
        let last = final_of(&out, 1);
        assert_eq!((last.prompt_logprobs.clone(), last.prompt_token_ids.clone()), (want, ids));
    }

    #[test]
    fn an_abort_ends_the_samples_held_back_without_starting_them() {
        let (mut hub, rx) = test_hub(32);
        let sampling = Sampling { prompt_logprobs: Some(0), ..Sampling::default() };
        send(&mut hub, &ClientMsg::Generate(Generate { n: 3, sampling, ..generate_of("h") }));
        let id = submitted(&rx).id;
        let out = send(&mut hub, &ClientMsg::Abort { rid: "h".into() });
        let aborted: Vec<u32> =
            out.iter().filter_map(|(_, m)| if let ServerMsg::Final(f) = m { Some(f.index) } else { None }).collect();
        assert_eq!(aborted, [0, 1, 2]);
        let submits = rx.try_iter().filter(|c| matches!(c, Command::Submit(_))).count();
        assert_eq!(submits, 0, "the held samples never reach the engine");
        assert_eq!((hub.waiting(), hub.live_requests()), (0, 0));
        // Sample 0's late events change nothing.
        let mut late = Vec::new();
        hub.on_events(vec![token(id, b'x' as u32, None)], &mut late);
        assert!(late.is_empty() && rx.try_recv().is_err());
    }

    fn send_generate_n(hub: &mut Hub, n: i64) -> Vec<(Peer, ServerMsg)> {
        send(hub, &ClientMsg::Generate(Generate { n, ..generate_of("n") }))
    }

    #[test]
    fn an_abort_ends_every_live_sample_of_the_request() {
        let (mut hub, rx) = test_hub(32);
        send(&mut hub, &ClientMsg::Generate(Generate { n: 3, ..generate_of("a") }));
        let ids: Vec<ReqId> = (0..3).map(|_| submitted(&rx).id).collect();
        let mut out = Vec::new();
        hub.on_events(
            vec![token(ids[0], b'o' as u32, None), token(ids[1], b'k' as u32, Some(FinishReason::Length))],
            &mut out,
        );
        let out = send(&mut hub, &ClientMsg::Abort { rid: "a".into() });
        let aborted: Vec<(u32, Wire)> = out
            .iter()
            .filter_map(|(_, m)| if let ServerMsg::Final(f) = m { Some((f.index, f.finish_reason)) } else { None })
            .collect();
        assert_eq!(aborted, [(0, Wire::Abort), (2, Wire::Abort)], "the live ones, once each");
        let finished: Vec<ReqId> =
            rx.try_iter().filter_map(|c| if let Command::Finish(id) = c { Some(id) } else { None }).collect();
        assert_eq!(finished, [ids[0], ids[2]]);
        assert_eq!((hub.waiting(), hub.live_requests()), (0, 0));
        assert_eq!(error_code(&send(&mut hub, &ClientMsg::Abort { rid: "a".into() })), ErrorCode::UnknownRequest);
        // Late tokens of the aborted samples are dropped.
        let mut late = Vec::new();
        hub.on_events(vec![token(ids[2], b'x' as u32, None)], &mut late);
        assert!(late.is_empty());
    }

    #[test]
    fn when_the_engine_fails_every_sample_gets_its_error_final() {
        let (mut hub, rx) = test_hub(32);
        send(&mut hub, &ClientMsg::Generate(Generate { n: 2, ..generate_of("a") }));
        let id = submitted(&rx).id;
        hub.on_events(vec![token(id, b'o' as u32, None)], &mut Vec::new());
        let mut out = Vec::new();
        hub.fail_all("gone", &mut out);
        let indices: Vec<u32> = out
            .iter()
            .filter_map(|(_, m)| match m {
                ServerMsg::Final(f) if f.finish_reason == Wire::Error => Some(f.index),
                _ => None,
            })
            .collect();
        assert_eq!(indices, [0, 1]);
        assert_eq!((hub.waiting(), hub.live_requests()), (0, 0));
    }

    #[test]
    fn a_request_stopped_by_memory_says_so_on_the_wire_and_in_the_metrics() {
        let (mut hub, rx) = test_hub(32);
        send(&mut hub, &generate("a", "x", true, Sampling::default()));
        let id = submitted(&rx).id;
        let mut out = Vec::new();
        hub.on_events(
            vec![token(id, b'o' as u32, None), Event::Finished { id, reason: FinishReason::Memory }],
            &mut out,
        );
        let f = final_of(&out, 0);
        assert_eq!((f.finish_reason, f.text.as_str(), f.completion_tokens), (Wire::Memory, "o", 1));
        assert!(hub.metrics.render().contains("minisgl_requests_total{outcome=\"memory\"} 1"));
    }

    #[test]
    fn past_max_client_requests_a_client_is_refused_with_the_rid_and_others_are_not() {
        let (hub, rx) = test_hub(32);
        let mut hub = hub.with_max_client_requests(2);
        send(&mut hub, &generate("a", "x", true, Sampling::default()));
        send(&mut hub, &ClientMsg::Generate(Generate { n: 2, ..generate_of("b") }));
        let out = send(&mut hub, &generate("c", "x", true, Sampling::default()));
        let [(_, ServerMsg::Error(e))] = &out[..] else { panic!("{out:?}") };
        assert_eq!((e.code, e.rid.as_deref()), (ErrorCode::TooManyRequests, Some("c")));
        assert!(e.message.contains("\"c\"") && e.message.contains("--max-client-requests"), "{}", e.message);
        assert!(e.message.contains("already has 2 live requests, at most 2"), "{}", e.message);
        // Another client (an HTTP request too) is not held to this one's count.
        let other = Peer::Zmq(vec![Bytes::from_static(b"bob")]);
        let mut out = Vec::new();
        let g = Generate { text: Some("x".into()), ..Generate::new("c") };
        assert!(hub.on_message(&other, &api::encode(&ClientMsg::Generate(g)), &mut out).is_some());
        assert!(out.is_empty());
        // An ended request frees its place.
        let a = submitted(&rx).id;
        hub.on_events(vec![token(a, b'k' as u32, Some(FinishReason::Length))], &mut Vec::new());
        assert_eq!(hub.client_requests(&peer()), 1);
        assert!(send(&mut hub, &generate("c", "x", true, Sampling::default())).is_empty());
        assert_eq!(hub.client_requests(&peer()), 2);
    }

    #[test]
    fn cancel_client_aborts_every_request_of_that_identity_and_no_other() {
        let (mut hub, rx) = test_hub(32);
        send(&mut hub, &generate("a", "x", true, Sampling::default()));
        send(&mut hub, &ClientMsg::Generate(Generate { n: 2, ..generate_of("b") }));
        // The same identity behind a REQ-style envelope is the same client.
        let enveloped = Peer::Zmq(vec![Bytes::from_static(ALICE), Bytes::new()]);
        let g = Generate { text: Some("x".into()), ..Generate::new("e") };
        let prepared = hub.on_message(&enveloped, &api::encode(&ClientMsg::Generate(g)), &mut Vec::new()).unwrap();
        let bob = Peer::Zmq(vec![Bytes::from_static(b"bob")]);
        hub.submit(&bob, generate_of("a")).unwrap();
        let ids: Vec<ReqId> = (0..4).map(|_| submitted(&rx).id).collect();
        let mut out = Vec::new();
        assert_eq!(hub.cancel_client(ALICE, &mut out), 3, "a, b, and e (still being prepared)");
        let aborted: Vec<(String, u32)> = out
            .iter()
            .filter_map(|(_, m)| match m {
                ServerMsg::Final(f) if f.finish_reason == Wire::Abort => Some((f.rid.clone(), f.index)),
                _ => None,
            })
            .collect();
        assert_eq!(aborted.len(), 3, "{aborted:?}");
        let finished: Vec<ReqId> =
            rx.try_iter().filter_map(|c| if let Command::Finish(id) = c { Some(id) } else { None }).collect();
        assert_eq!(finished.len(), 3);
        assert!(!finished.contains(&ids[3]), "bob's request runs on");
        // The one being prepared ends with its abort final as soon as it is admitted.
        let mut out = Vec::new();
        let prompt = hub.preparer().prepare(&prepared);
        hub.submit_prepared(&enveloped, prepared, prompt, &mut out).unwrap();
        assert!(matches!(&out[..], [(p, ServerMsg::Final(f))] if *p == enveloped && f.finish_reason == Wire::Abort));
        assert_eq!((hub.live_requests(), hub.client_requests(&peer()), hub.client_requests(&enveloped)), (1, 0, 0));
        assert_eq!(hub.cancel_client(b"nobody", &mut out), 0);
    }
}
