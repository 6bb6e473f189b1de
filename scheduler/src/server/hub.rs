//! Every live request between the request socket and the engine.
//!
//! Inbound, it decodes, validates and tokenizes what clients send and hands the engine ready requests.
//! Outbound, it turns the engine's token events into the protocol's deltas and finals: streaming
//! detokenization and stop strings live here, on the socket's side, so the engine thread never spends a step
//! on text. Plain synchronous code with no I/O: the serve loop feeds it from both front doors (the ZeroMQ
//! socket and the HTTP API) and routes what it returns to the peer each reply names.

use crate::core::{Event, FinishReason, NewRequest, ReqId, SamplingParams};
use crate::engine::Command;
use crate::metrics::{Metrics, Outcome};
use crate::text::{ChatTemplate, TextStream, Tokenizer};
use bytes::Bytes;
use proto::api::{self, ClientMsg, Delta, ErrorCode, Final, Generate, InfoMsg, Prompt, Rejection, ServerMsg};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

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
    tokenizer: Arc<Tokenizer>,
    chat: Option<ChatTemplate>,
    limits: PromptLimits,
    info: InfoMsg,
    engine: Sender<Command>,
    live: HashMap<ReqId, Live>,
    by_rid: HashMap<(Peer, String), ReqId>,
    next_id: ReqId,
    seeds: SeedSource,
    metrics: Arc<Metrics>,
    /// Set once a shutdown began: live requests finish, new ones are refused.
    draining: bool,
}

struct Live {
    peer: Peer,
    rid: String,
    stream: bool,
    prompt_tokens: u32,
    token_ids: Vec<u32>,
    text: String,
    detok: TextStream,
    admitted: Instant,
    /// When its first token came (the time to first token), and its latest (the gap to the next).
    first_token: Option<Instant>,
    last_token: Option<Instant>,
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
            tokenizer,
            chat,
            limits,
            info,
            engine,
            live: HashMap::new(),
            by_rid: HashMap::new(),
            next_id: 0,
            seeds: SeedSource::new(),
            metrics,
            draining: false,
        }
    }

    /// Refuses new requests from now on (`shutting_down`); live ones run to their end.
    pub fn drain(&mut self) {
        self.draining = true;
    }

    pub fn live_requests(&self) -> usize {
        self.live.len()
    }

    /// The `info` reply: the served model, and how many requests are live right now.
    pub fn info(&self) -> ServerMsg {
        let live_requests = u32::try_from(self.live.len()).unwrap_or(u32::MAX);
        ServerMsg::Info(InfoMsg { live_requests, ..self.info.clone() })
    }

    /// Handles one message from `peer`; replies go to `out`.
    pub fn on_message(&mut self, peer: &Peer, bytes: &[u8], out: &mut Vec<(Peer, ServerMsg)>) {
        let reply = match api::decode_client(bytes) {
            Err(rejection) => Some(rejection.to_msg()),
            Ok(ClientMsg::Info) => Some(self.info()),
            Ok(ClientMsg::Abort { rid }) => {
                if self.cancel(peer, &rid, out) {
                    None
                } else {
                    let message = format!("no live request with rid {rid:?} from this client");
                    Some(Rejection::new(Some(rid), ErrorCode::UnknownRequest, message).to_msg())
                }
            }
            Ok(ClientMsg::Generate(g)) => self.submit(peer, g).err().map(|r| r.to_msg()),
        };
        if let Some(msg) = reply {
            out.push((peer.clone(), msg));
        }
    }

    /// Ends `peer`'s live request `rid` with `finish_reason: "abort"` (its final goes to `out`). False when no
    /// such request is live: it ended already, or never existed.
    pub fn cancel(&mut self, peer: &Peer, rid: &str, out: &mut Vec<(Peer, ServerMsg)>) -> bool {
        let Some(&id) = self.by_rid.get(&(peer.clone(), rid.to_owned())) else { return false };
        let _ = self.engine.send(Command::Finish(id));
        self.finalize(id, FinishReason::Abort, None, String::new(), out);
        true
    }

    /// Admits a decoded `generate` from `peer`, or says why not. Nothing is sent on a refusal: the caller
    /// answers it in its own door's terms.
    pub fn submit(&mut self, peer: &Peer, g: Generate) -> Result<(), Rejection> {
        let rid = g.rid.clone();
        let verdict = self.admit(peer, g);
        if let Err(refused) = &verdict {
            self.metrics.request_ended(Outcome::Rejected);
            tracing::info!(request_id = %rid, code = ?refused.code, "request refused: {}", refused.message);
        }
        verdict
    }

    fn admit(&mut self, peer: &Peer, g: Generate) -> Result<(), Rejection> {
        let reject = |code, message: String| Rejection { rid: Some(g.rid.clone()), code, message };
        if self.draining {
            return Err(reject(ErrorCode::ShuttingDown, "the server is shutting down".into()));
        }
        api::validate(&g)?;
        let key = (peer.clone(), g.rid.clone());
        if self.by_rid.contains_key(&key) {
            return Err(reject(ErrorCode::DuplicateRequest, format!("request {:?} is still running", g.rid)));
        }
        let Some(prompt) = g.prompt() else {
            return Err(reject(ErrorCode::InvalidParams, "give exactly one of text, messages, input_ids".into()));
        };
        let prompt = self.tokenize(prompt).map_err(|(code, m)| reject(code, m))?;
        if prompt.is_empty() {
            return Err(reject(ErrorCode::EmptyPrompt, "the prompt has no tokens".into()));
        }
        if prompt.len() > self.limits.max_prompt_len as usize {
            let message = format!(
                "the prompt has {} tokens; at most {} fit (context length {})",
                prompt.len(),
                self.limits.max_prompt_len,
                self.limits.max_seq_len
            );
            return Err(reject(ErrorCode::PromptTooLong, message));
        }
        let s = &g.sampling;
        let params = SamplingParams {
            // Validated > 0; a larger count than u32 holds means "as many as the context allows", as does any
            // count past the context, so saturating loses nothing.
            max_tokens: u32::try_from(s.max_tokens).unwrap_or(u32::MAX),
            temperature: s.temperature as f32,
            top_p: s.top_p as f32,
            top_k: s.top_k as i32,
            seed: s.seed.unwrap_or_else(|| self.seeds.next()),
            stop_token_ids: s.stop_token_ids.clone(),
            ignore_eos: s.ignore_eos,
        };
        let id = self.next_id;
        self.next_id += 1;
        let prompt_tokens = prompt.len() as u32;
        let detok = TextStream::new(self.tokenizer.clone(), s.stop.clone());
        if self.engine.send(Command::Submit(NewRequest { id, prompt, params })).is_err() {
            return Err(reject(ErrorCode::ShuttingDown, "the engine has stopped".into()));
        }
        self.by_rid.insert(key, id);
        self.metrics.prompt_tokens.inc_by(u64::from(prompt_tokens));
        tracing::debug!(request_id = %g.rid, prompt_tokens, "request admitted");
        let live = Live {
            peer: peer.clone(),
            rid: g.rid,
            stream: g.stream,
            prompt_tokens,
            token_ids: Vec::new(),
            text: String::new(),
            detok,
            admitted: Instant::now(),
            first_token: None,
            last_token: None,
        };
        self.live.insert(id, live);
        Ok(())
    }

    fn tokenize(&self, prompt: Prompt<'_>) -> Result<Vec<u32>, (ErrorCode, String)> {
        let invalid = |m: String| (ErrorCode::InvalidParams, m);
        match prompt {
            Prompt::Text(text) => self.tokenizer.encode(text).map_err(|e| invalid(format!("tokenizing: {e}"))),
            Prompt::Messages(messages) => {
                let chat = self.chat.as_ref().ok_or_else(|| invalid("this model has no chat template".into()))?;
                let text = chat.render(messages, true, None).map_err(|e| invalid(format!("chat template: {e}")))?;
                self.tokenizer.encode(&text).map_err(|e| invalid(format!("tokenizing: {e}")))
            }
            Prompt::InputIds(ids) => match ids.iter().find(|&&t| t >= self.limits.vocab_size) {
                Some(bad) => {
                    Err(invalid(format!("token id {bad} is outside the vocabulary (0..{})", self.limits.vocab_size)))
                }
                None => Ok(ids.to_vec()),
            },
        }
    }

    /// Turns one step's events into replies.
    pub fn on_events(&mut self, events: Vec<Event>, out: &mut Vec<(Peer, ServerMsg)>) {
        let now = Instant::now();
        for event in events {
            let (id, token, finish) = match event {
                Event::Token { id, token, finish } => (id, token, finish),
                Event::Finished { id, reason } => {
                    self.finalize(id, reason, None, String::new(), out);
                    continue;
                }
                Event::Cached { .. } => continue,
            };
            let Some(live) = self.live.get_mut(&id) else { continue }; // ended here already (abort, stop string)
            live.token_ids.push(token);
            self.metrics.generated_tokens.inc();
            match live.last_token {
                None => {
                    live.first_token = Some(now);
                    self.metrics.time_to_first_token.observe((now - live.admitted).as_secs_f64());
                }
                Some(last) => self.metrics.inter_token_latency.observe((now - last).as_secs_f64()),
            }
            live.last_token = Some(now);
            // A token that stopped the request by id (EOS, a stop token) is returned as an id, not as text.
            let (piece, stopped) = if finish == Some(FinishReason::Stop) {
                (String::new(), false)
            } else {
                match live.detok.push(token) {
                    Ok(step) => (step.text, step.stopped),
                    Err(e) => {
                        // Not the client's fault and not fatal: the id is still returned, its text is lost.
                        tracing::warn!("detokenizing token {token} of request {id}: {e}");
                        (String::new(), false)
                    }
                }
            };
            live.text.push_str(&piece);
            if stopped {
                let _ = self.engine.send(Command::Finish(id));
                self.finalize(id, FinishReason::Stop, Some(token), piece, out);
            } else if let Some(reason) = finish {
                self.finalize(id, reason, Some(token), piece, out);
            } else if live.stream {
                let msg = ServerMsg::Delta(Delta { rid: live.rid.clone(), index: 0, token_ids: vec![token], text: piece });
                out.push((live.peer.clone(), msg));
            }
        }
    }

    /// Ends request `id` here. A streaming client gets a last delta first: the last token (if this step
    /// produced one), its text, and whatever the detokenizer still held back that no stop string claimed.
    fn finalize(
        &mut self,
        id: ReqId,
        reason: FinishReason,
        last_token: Option<u32>,
        mut piece: String,
        out: &mut Vec<(Peer, ServerMsg)>,
    ) {
        let Some(mut live) = self.live.remove(&id) else { return };
        self.by_rid.remove(&(live.peer.clone(), live.rid.clone()));
        if !live.detok.stopped() {
            let rest = live.detok.finish().unwrap_or_else(|e| {
                tracing::warn!("flushing the text of request {id}: {e}");
                String::new()
            });
            live.text.push_str(&rest);
            piece.push_str(&rest);
        }
        if live.stream && (last_token.is_some() || !piece.is_empty()) {
            let token_ids = last_token.into_iter().collect();
            let msg = ServerMsg::Delta(Delta { rid: live.rid.clone(), index: 0, token_ids, text: piece });
            out.push((live.peer.clone(), msg));
        }
        self.ended(&live, reason);
        out.push((live.peer.clone(), final_msg(live, reason, None)));
    }

    /// Every live request ends with an error saying why: the engine is gone, or the drain ran out of time.
    pub fn fail_all(&mut self, why: &str, out: &mut Vec<(Peer, ServerMsg)>) {
        for (id, live) in std::mem::take(&mut self.live) {
            let _ = self.engine.send(Command::Finish(id));
            self.ended(&live, FinishReason::Error);
            out.push((live.peer.clone(), final_msg(live, FinishReason::Error, Some(why.to_string()))));
        }
        self.by_rid.clear();
    }

    /// Records a request's end: its outcome and latency in the metrics, and one line in the log.
    fn ended(&self, live: &Live, reason: FinishReason) {
        let outcome = match reason {
            FinishReason::Stop => Outcome::Stop,
            FinishReason::Length => Outcome::Length,
            FinishReason::Abort => Outcome::Abort,
            FinishReason::Error => Outcome::Error,
        };
        let total = live.admitted.elapsed();
        self.metrics.request_ended(outcome);
        self.metrics.request_latency.observe(total.as_secs_f64());
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        tracing::info!(
            request_id = %live.rid,
            prompt_tokens = live.prompt_tokens,
            completion_tokens = live.token_ids.len(),
            ttft_ms = live.first_token.map(|t| ms(t - live.admitted)),
            total_ms = ms(total),
            finish_reason = outcome.label(),
            "request finished"
        );
    }
}

fn final_msg(live: Live, reason: FinishReason, message: Option<String>) -> ServerMsg {
    ServerMsg::Final(Final {
        rid: live.rid,
        index: 0,
        cached_tokens: 0,
        finish_reason: match reason {
            FinishReason::Stop => api::FinishReason::Stop,
            FinishReason::Length => api::FinishReason::Length,
            FinishReason::Abort => api::FinishReason::Abort,
            FinishReason::Error => api::FinishReason::Error,
        },
        prompt_tokens: live.prompt_tokens,
        completion_tokens: live.token_ids.len() as u32,
        token_ids: live.token_ids,
        text: live.text,
        message,
    })
}

/// Seeds for requests that name none: distinct per request and per process start, so two unseeded requests
/// never share their randomness.
struct SeedSource(u64);

impl SeedSource {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        SeedSource(nanos as u64 ^ (u64::from(std::process::id()) << 32))
    }
    /// splitmix64: consecutive states give well-mixed outputs.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
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

    fn send(hub: &mut Hub, msg: &ClientMsg) -> Vec<(Peer, ServerMsg)> {
        let mut out = Vec::new();
        hub.on_message(&peer(), &api::encode(msg), &mut out);
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
        Event::Token { id, token, finish }
    }

    #[test]
    fn a_request_is_tokenized_submitted_streamed_and_finished() {
        let (mut hub, rx) = test_hub(32);
        assert!(send(&mut hub, &generate("a", "hé", true, Sampling::default())).is_empty());
        let req = submitted(&rx);
        assert_eq!(req.prompt, hub.tokenizer.encode("hé").unwrap());
        let ids = hub.tokenizer.encode("中!").unwrap(); // three tokens; the first two split one character
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
}
