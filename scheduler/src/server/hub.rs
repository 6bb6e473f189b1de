//! Every live request between the request socket and the engine.
//!
//! Inbound, it decodes, validates and tokenizes what clients send and hands the engine ready requests.
//! Outbound, it turns the engine's token events into the protocol's deltas and finals: streaming
//! detokenization and stop strings live here, on the socket's side, so the engine thread never spends a step
//! on text. Plain synchronous code with no I/O: the socket loop feeds it and sends what it returns.

use crate::core::{Event, FinishReason, NewRequest, ReqId, SamplingParams};
use crate::engine::Command;
use crate::text::{ChatTemplate, TextStream, Tokenizer};
use proto::api::{self, ClientMsg, Delta, ErrorCode, Final, Generate, Prompt, Rejection, ServerMsg};
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::Sender;

/// Where a client's replies go: its ZeroMQ routing frames (the identity, and the empty delimiter when the
/// client used a REQ-style envelope), sent back in front of each reply.
pub type Peer = Vec<Bytes>;

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
    info: ServerMsg,
    engine: Sender<Command>,
    live: HashMap<ReqId, Live>,
    by_rid: HashMap<(Peer, String), ReqId>,
    next_id: ReqId,
    seeds: SeedSource,
}

struct Live {
    peer: Peer,
    rid: String,
    stream: bool,
    prompt_tokens: u32,
    token_ids: Vec<u32>,
    text: String,
    detok: TextStream,
}

impl Hub {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        chat: Option<ChatTemplate>,
        limits: PromptLimits,
        info: ServerMsg,
        engine: Sender<Command>,
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
        }
    }

    pub fn live_requests(&self) -> usize {
        self.live.len()
    }

    /// Handles one message from `peer`; replies go to `out`.
    pub fn on_message(&mut self, peer: &Peer, bytes: &[u8], out: &mut Vec<(Peer, ServerMsg)>) {
        let reply = match api::decode_client(bytes) {
            Err(rejection) => Some(rejection.to_msg()),
            Ok(ClientMsg::Info) => Some(self.info.clone()),
            Ok(ClientMsg::Abort { rid }) => self.abort(peer, rid, out),
            Ok(ClientMsg::Generate(g)) => self.generate(peer, g).err().map(|r| r.to_msg()),
        };
        if let Some(msg) = reply {
            out.push((peer.clone(), msg));
        }
    }

    fn abort(&mut self, peer: &Peer, rid: String, out: &mut Vec<(Peer, ServerMsg)>) -> Option<ServerMsg> {
        let Some(&id) = self.by_rid.get(&(peer.clone(), rid.clone())) else {
            let message = format!("no live request with rid {rid:?} from this client");
            return Some(Rejection::new(Some(rid), ErrorCode::UnknownRequest, message).to_msg());
        };
        let _ = self.engine.send(Command::Finish(id, FinishReason::Abort));
        self.finalize(id, FinishReason::Abort, None, String::new(), out);
        None
    }

    fn generate(&mut self, peer: &Peer, g: Generate) -> Result<(), Rejection> {
        api::validate(&g)?;
        let key = (peer.clone(), g.rid.clone());
        let reject = |code, message: String| Rejection { rid: Some(g.rid.clone()), code, message };
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
            max_tokens: s.max_tokens as u32,
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
        let live = Live {
            peer: peer.clone(),
            rid: g.rid,
            stream: g.stream,
            prompt_tokens,
            token_ids: Vec::new(),
            text: String::new(),
            detok,
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
            Prompt::InputIds(ids) => {
                match ids.iter().find(|&&t| t >= self.limits.vocab_size) {
                    Some(bad) => Err(invalid(format!("token id {bad} is outside the vocabulary (0..{})", self.limits.vocab_size))),
                    None => Ok(ids.to_vec()),
                }
            }
        }
    }

    /// Turns one step's events into replies.
    pub fn on_events(&mut self, events: Vec<Event>, out: &mut Vec<(Peer, ServerMsg)>) {
        for event in events {
            let Event::Token { id, token, finish } = event;
            let Some(live) = self.live.get_mut(&id) else { continue }; // ended here already (abort, stop string)
            live.token_ids.push(token);
            // A token that stopped the request by id (EOS, a stop token) is returned as an id, not as text.
            let (piece, stopped) = if finish == Some(FinishReason::Stop) {
                (String::new(), false)
            } else {
                let pushed = live.detok.push(token);
                (pushed.text, pushed.stopped)
            };
            live.text.push_str(&piece);
            if stopped {
                let _ = self.engine.send(Command::Finish(id, FinishReason::Stop));
                self.finalize(id, FinishReason::Stop, Some(token), piece, out);
            } else if let Some(reason) = finish {
                self.finalize(id, reason, Some(token), piece, out);
            } else if live.stream {
                let msg = ServerMsg::Delta(Delta { rid: live.rid.clone(), token_ids: vec![token], text: piece });
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
            let rest = live.detok.finish();
            live.text.push_str(&rest);
            piece.push_str(&rest);
        }
        if live.stream && (last_token.is_some() || !piece.is_empty()) {
            let token_ids = last_token.into_iter().collect();
            let msg = ServerMsg::Delta(Delta { rid: live.rid.clone(), token_ids, text: piece });
            out.push((live.peer.clone(), msg));
        }
        out.push((live.peer.clone(), final_msg(live, reason, None)));
    }

    /// The engine is gone: every live request ends with an error saying why.
    pub fn fail_all(&mut self, why: &str, out: &mut Vec<(Peer, ServerMsg)>) {
        for (_, live) in self.live.drain() {
            out.push((live.peer.clone(), final_msg(live, FinishReason::Error, Some(why.to_string()))));
        }
        self.by_rid.clear();
    }
}

fn final_msg(live: Live, reason: FinishReason, message: Option<String>) -> ServerMsg {
    ServerMsg::Final(Final {
        rid: live.rid,
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
