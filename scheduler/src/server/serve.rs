//! The one loop that owns the hub. It feeds it from both front doors (ZeroMQ frames, HTTP calls) and from the
//! engine's outputs, and routes every reply through the door its peer came in by: one request table and one
//! engine for every client.
//!
//! A new request is prepared (validated, rendered, tokenized: `prepare.rs`) on tokio's blocking threads, many
//! at once, and comes back to the loop to be admitted; the loop itself never tokenizes. Requests from one client
//! may therefore be admitted in another order than they were sent, which no client can observe but through
//! timing.
//!
//! It also runs the server's end of life. The first shutdown signal starts a drain: new requests are refused
//! (HTTP 503, ZeroMQ `shutting_down`), live ones run to their end for up to the drain timeout, and then any
//! still live end with an error that says so. A second signal stops at once, failing what is live the same
//! way: no client is left without an answer. Before the loop returns it gives the socket's writers a moment to
//! send those last replies (`LINGER`).
//!
//! ZeroMQ clients that asked for keepalive get a heartbeat every 0.5 s and lose their requests after 2 s of
//! silence (`liveness.rs`); a client whose connection closes, or that stops reading its replies, loses them at
//! once (`zmq.rs`). Either way its requests stop costing the engine anything.

use super::http::Call;
use super::hub::{Hub, Peer};
use super::liveness::{self, Liveness};
use super::prepare::Preparer;
use super::status::{Phase, Status};
use super::zmq;
use crate::engine::Output;
use anyhow::Result;
use bytes::Bytes;
use proto::api::{Generate, Notice, Rejection, ServerMsg};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How long the loop waits, once it is done, for the socket's writer tasks to send the last replies: without it
/// a process that exits right away can take the final messages of live requests with it.
const LINGER: Duration = Duration::from_millis(100);

/// Why the serve loop ended.
pub enum Ended {
    /// A signal: the drain ended, or a second signal cut it short.
    Shutdown,
    /// The engine stopped on its own; live requests were failed with this reason.
    EngineFailed(String),
}

/// A request the hub accepted, to be prepared.
struct Job {
    peer: Peer,
    generate: Box<Generate>,
    /// An HTTP request's verdict channel.
    accepted: Option<oneshot::Sender<Result<(), Rejection>>>,
}

/// A job back from its preparation.
struct Prepared {
    job: Job,
    prompt: Result<super::prepare::PreparedPrompt, Rejection>,
}

/// Prepares `job` on a blocking thread and sends it back to the loop through `done`.
fn spawn_prepare(preparer: &Preparer, done: &UnboundedSender<Prepared>, job: Job) {
    let (preparer, done) = (preparer.clone(), done.clone());
    tokio::task::spawn_blocking(move || {
        let prompt = preparer.prepare(&job.generate);
        // A failed send means the loop has ended; an HTTP handler then sees its verdict channel dropped.
        let _ = done.send(Prepared { job, prompt });
    });
}

/// A live HTTP request: its rid in the hub, and where its replies go.
struct HttpPeer {
    rid: String,
    replies: UnboundedSender<ServerMsg>,
    /// Finals still to come: one per sample.
    finals_left: u32,
}

/// How the serve loop learns it should end, and where it says how far it got.
pub struct Lifecycle {
    /// One message per shutdown signal (SIGTERM, SIGINT); the channel closing counts as one.
    pub signals: UnboundedReceiver<()>,
    /// How long live requests may run after the first signal.
    pub drain_timeout: Duration,
    pub status: Arc<Status>,
}

/// Binds the request socket at `listen`, and serves it and the HTTP calls arriving on `http` until a shutdown
/// signal's drain ends or the engine stops. `http` may be a channel whose senders are all gone (no HTTP API).
pub async fn serve(
    listen: &str,
    mut hub: Hub,
    mut outputs: UnboundedReceiver<Output>,
    mut http: UnboundedReceiver<Call>,
    mut life: Lifecycle,
) -> Result<Ended> {
    let zmq::Bound { mut send, mut recv, mut disconnected } = zmq::bind(listen).await?;
    life.status.set(Phase::Serving);
    let mut liveness: Liveness<Vec<Bytes>> = Liveness::new(liveness::INTERVAL, liveness::TIMEOUT);
    let mut ticks = tokio::time::interval(liveness::TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let heartbeat = Bytes::from(proto::api::encode(&Notice::Heartbeat));
    let mut beats: Vec<(Vec<Bytes>, Bytes)> = Vec::new();
    // Identities of ZeroMQ clients found gone while sending (disconnected, or not reading): their requests are
    // aborted and nothing more is sent to them until they speak again.
    let mut gone: HashSet<Bytes> = HashSet::new();
    let mut disconnects_open = true;
    let mut http_open = true;
    let mut http_peers: HashMap<u64, HttpPeer> = HashMap::new();
    let mut replies: Vec<(Peer, ServerMsg)> = Vec::new();
    let mut to_zmq: Vec<(Vec<Bytes>, ServerMsg)> = Vec::new();
    let mut draining = false;
    let (prepared_tx, mut prepared_rx) = unbounded_channel::<Prepared>();
    let mut jobs: Vec<Job> = Vec::new();
    // Armed by the first signal.
    let drain_end = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(drain_end);
    let ended = loop {
        let mut stop = None;
        tokio::select! {
            msg = zmq::recv(&mut recv) => {
                if let Some((frames, payload)) = msg {
                    let now = std::time::Instant::now();
                    liveness.heard(&frames, now);
                    if !gone.is_empty() {
                        gone.remove(&frames[0]);
                    }
                    let peer = Peer::Zmq(frames);
                    if let Some(generate) = hub.on_message(&peer, &payload, &mut replies) {
                        if let (true, Peer::Zmq(frames)) = (generate.keepalive, &peer) {
                            liveness.watch(frames.clone(), now);
                        }
                        jobs.push(Job { peer, generate: Box::new(generate), accepted: None });
                    }
                }
            }
            identity = disconnected.recv(), if disconnects_open => match identity {
                Some(identity) => {
                    gone.remove(&identity);
                    liveness.forget_where(|frames| frames.first() == Some(&identity));
                    let aborted = hub.cancel_client(&identity, &mut replies);
                    if aborted > 0 {
                        tracing::info!("a ZeroMQ client disconnected: its {aborted} live requests are aborted");
                    }
                }
                None => disconnects_open = false,
            },
            _ = ticks.tick() => {
                let due = liveness.tick(std::time::Instant::now());
                for frames in due.gone {
                    let aborted = hub.cancel_client(&frames[0], &mut replies);
                    tracing::info!(
                        "a ZeroMQ client sent nothing for {:?}: its {aborted} live requests are aborted",
                        liveness::TIMEOUT
                    );
                }
                for frames in due.beat {
                    // Watched while it has live requests: a client that is done need not keep talking.
                    if hub.client_requests(&Peer::Zmq(frames.clone())) == 0 {
                        liveness.forget(&frames);
                    } else {
                        beats.push((frames, heartbeat.clone()));
                    }
                }
            }
            call = http.recv(), if http_open => match call {
                Some(call) => on_call(&mut hub, &mut http_peers, call, &mut jobs, &mut replies),
                None => http_open = false,
            },
            Some(done) = prepared_rx.recv() => on_prepared(&mut hub, &mut http_peers, done, &mut replies),
            output = outputs.recv() => match output {
                Some(Output::Events { events, logprobs }) => hub.on_step(events, logprobs, &mut replies),
                Some(Output::Failed(why)) => {
                    hub.fail_all(&format!("the engine stopped: {why}"), &mut replies);
                    stop = Some(Ended::EngineFailed(why));
                }
                None => {
                    hub.fail_all("the engine stopped", &mut replies);
                    stop = Some(Ended::EngineFailed("the engine thread ended".into()));
                }
            },
            signal = life.signals.recv() => {
                if draining || signal.is_none() {
                    hub.fail_all("the server stopped before the request finished", &mut replies);
                    stop = Some(Ended::Shutdown);
                } else {
                    draining = true;
                    hub.drain();
                    life.status.set(Phase::Draining);
                    drain_end.as_mut().reset(Instant::now() + life.drain_timeout);
                    tracing::info!(
                        "draining: {} live requests get up to {:?} to finish; a second signal stops at once",
                        hub.live_requests(),
                        life.drain_timeout
                    );
                }
            }
            () = &mut drain_end, if draining => {
                let why = format!("the server shut down before the request finished (drain timeout {:?})",
                    life.drain_timeout);
                hub.fail_all(&why, &mut replies);
                stop = Some(Ended::Shutdown);
            }
        }
        for job in jobs.drain(..) {
            spawn_prepare(hub.preparer(), &prepared_tx, job);
        }
        route(&mut replies, &mut http_peers, &mut to_zmq);
        let encoded = to_zmq.drain(..).map(|(frames, msg)| (frames, Bytes::from(proto::api::encode(&msg))));
        for identity in zmq::flush(&mut send, encoded.chain(beats.drain(..)), &mut gone).await {
            liveness.forget_where(|frames| frames.first() == Some(&identity));
            // Their abort finals are dropped by the next flush.
            let aborted = hub.cancel_client(&identity, &mut replies);
            tracing::info!("a ZeroMQ client cannot be written to: its {aborted} live requests are aborted");
        }
        if draining && hub.live_requests() == 0 {
            stop.get_or_insert(Ended::Shutdown);
        }
        if let Some(ended) = stop {
            break ended;
        }
    };
    life.status.set(Phase::Stopped);
    tokio::time::sleep(LINGER).await;
    zmq::remove_socket_file(listen);
    Ok(ended)
}

fn on_call(
    hub: &mut Hub,
    http_peers: &mut HashMap<u64, HttpPeer>,
    call: Call,
    jobs: &mut Vec<Job>,
    out: &mut Vec<(Peer, ServerMsg)>,
) {
    match call {
        Call::Generate { id, generate, accepted, replies } => {
            let peer = Peer::Http(id);
            match hub.accept(&peer, &generate) {
                Ok(()) => {
                    // Known from now on, so that a `Gone` during the preparation finds it.
                    let finals_left = u32::try_from(generate.n).unwrap_or(1);
                    let rid = generate.rid.clone();
                    http_peers.insert(id, HttpPeer { rid, replies, finals_left });
                    jobs.push(Job { peer, generate, accepted: Some(accepted) });
                }
                Err(refused) => {
                    let _ = accepted.send(Err(refused));
                }
            }
        }
        Call::Gone(id) => {
            if let Some(peer) = http_peers.remove(&id) {
                hub.cancel(&Peer::Http(id), &peer.rid, out);
            }
        }
        Call::Health(reply) => {
            let _ = reply.send(hub.live_requests());
        }
    }
}

/// Admits a prepared request, or answers its refusal through its door.
fn on_prepared(
    hub: &mut Hub,
    http_peers: &mut HashMap<u64, HttpPeer>,
    done: Prepared,
    out: &mut Vec<(Peer, ServerMsg)>,
) {
    let Prepared { job: Job { peer, generate, accepted }, prompt } = done;
    let verdict = hub.submit_prepared(&peer, *generate, prompt, out);
    match (accepted, verdict) {
        (Some(accepted), verdict) => {
            if verdict.is_err()
                && let Peer::Http(id) = peer
            {
                http_peers.remove(&id);
            }
            // A handler that is gone already sent its `Gone`, which cancelled the request.
            let _ = accepted.send(verdict);
        }
        (None, Err(refused)) => out.push((peer, refused.to_msg())),
        (None, Ok(())) => {}
    }
}

/// Sorts replies by door: ZeroMQ ones into `to_zmq` (in order), HTTP ones straight into their channels. An
/// HTTP request's last final (one per sample) or an error is its last reply, and forgets its peer.
fn route(
    replies: &mut Vec<(Peer, ServerMsg)>,
    http_peers: &mut HashMap<u64, HttpPeer>,
    to_zmq: &mut Vec<(Vec<Bytes>, ServerMsg)>,
) {
    for (peer, msg) in replies.drain(..) {
        match peer {
            Peer::Zmq(frames) => to_zmq.push((frames, msg)),
            Peer::Http(id) => {
                let Some(peer) = http_peers.get_mut(&id) else { continue }; // it has gone: see `Call::Gone`
                let last = match msg {
                    ServerMsg::Final(_) => {
                        peer.finals_left = peer.finals_left.saturating_sub(1);
                        peer.finals_left == 0
                    }
                    ServerMsg::Error(_) => true,
                    _ => false,
                };
                // A failed send means the handler was dropped; its `Gone` is on the way and aborts the request.
                let _ = peer.replies.send(msg);
                if last {
                    http_peers.remove(&id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Event;
    use crate::engine::Command;
    use proto::api::{ErrorCode, FinishReason, Generate, Rejection};
    use std::sync::mpsc::Receiver;
    use tokio::sync::mpsc::unbounded_channel;
    use tokio::sync::oneshot;

    fn hub() -> (Hub, Receiver<Command>) {
        crate::server::hub::test_hub(8)
    }

    struct Loop {
        hub: Hub,
        engine: Receiver<Command>,
        peers: HashMap<u64, HttpPeer>,
        to_zmq: Vec<(Vec<Bytes>, ServerMsg)>,
    }

    impl Loop {
        fn new() -> Self {
            let (hub, engine) = hub();
            Loop { hub, engine, peers: HashMap::new(), to_zmq: Vec::new() }
        }

        /// What the loop does with a call, the preparation done on the spot.
        fn call(&mut self, call: Call) {
            let (mut out, mut jobs) = (Vec::new(), Vec::new());
            on_call(&mut self.hub, &mut self.peers, call, &mut jobs, &mut out);
            for job in jobs {
                let prompt = self.hub.preparer().prepare(&job.generate);
                on_prepared(&mut self.hub, &mut self.peers, Prepared { job, prompt }, &mut out);
            }
            route(&mut out, &mut self.peers, &mut self.to_zmq);
        }

        fn events(&mut self, events: Vec<Event>) {
            let mut out = Vec::new();
            self.hub.on_events(events, &mut out);
            route(&mut out, &mut self.peers, &mut self.to_zmq);
        }

        /// Submits `text` as HTTP request `id`: the verdict, and the receiver of its replies.
        fn generate(
            &mut self,
            id: u64,
            text: &str,
        ) -> (Result<(), Rejection>, tokio::sync::mpsc::UnboundedReceiver<ServerMsg>) {
            self.generate_n(id, text, 1)
        }

        /// The same with `n` samples.
        fn generate_n(
            &mut self,
            id: u64,
            text: &str,
            n: i64,
        ) -> (Result<(), Rejection>, tokio::sync::mpsc::UnboundedReceiver<ServerMsg>) {
            let (replies, rx) = unbounded_channel();
            let (accepted, mut verdict) = oneshot::channel();
            let generate = Generate { text: Some(text.into()), n, ..Generate::new(format!("cmpl-{id}")) };
            let generate = Box::new(generate);
            self.call(Call::Generate { id, generate, accepted, replies });
            (verdict.try_recv().expect("the loop answers at once"), rx)
        }

        fn submitted(&self) -> crate::core::ReqId {
            match self.engine.try_recv() {
                Ok(Command::Submit(r)) => r.id,
                _ => panic!("expected a submit"),
            }
        }
    }

    #[test]
    fn an_http_request_gets_its_replies_and_is_forgotten_after_its_final() {
        let mut l = Loop::new();
        let (verdict, mut rx) = l.generate(3, "hi");
        assert!(verdict.is_ok());
        let id = l.submitted();
        l.events(vec![Event::Token { id, token: b'o' as u32, finish: None, logprobs: None }]);
        l.events(vec![Event::Token {
            id,
            token: b'k' as u32,
            finish: Some(crate::core::FinishReason::Length),
            logprobs: None,
        }]);
        let mut got = Vec::new();
        while let Ok(msg) = rx.try_recv() {
            got.push(msg);
        }
        match &got[..] {
            [ServerMsg::Delta(a), ServerMsg::Delta(b), ServerMsg::Final(f)] => {
                assert_eq!((a.text.as_str(), b.text.as_str()), ("o", "k"));
                assert_eq!((f.rid.as_str(), f.text.as_str()), ("cmpl-3", "ok"));
            }
            other => panic!("expected two deltas and the final, got {other:?}"),
        }
        assert!(l.peers.is_empty() && l.to_zmq.is_empty());
    }

    #[test]
    fn an_http_request_of_n_samples_is_kept_until_its_last_final() {
        let mut l = Loop::new();
        let (verdict, mut rx) = l.generate_n(4, "hi", 2);
        assert!(verdict.is_ok());
        let (a, b) = (l.submitted(), l.submitted());
        let length = Some(crate::core::FinishReason::Length);
        l.events(vec![Event::Token { id: b, token: b'k' as u32, finish: length, logprobs: None }]);
        assert!(l.peers.contains_key(&4), "one sample is still running");
        l.events(vec![Event::Token { id: a, token: b'o' as u32, finish: length, logprobs: None }]);
        assert!(l.peers.is_empty());
        let finals: Vec<(u32, String)> = std::iter::from_fn(|| rx.try_recv().ok())
            .filter_map(|m| if let ServerMsg::Final(f) = m { Some((f.index, f.text)) } else { None })
            .collect();
        assert_eq!(finals, [(1, "k".to_string()), (0, "o".to_string())]);
    }

    #[test]
    fn a_gone_handler_aborts_every_sample_of_its_request() {
        let mut l = Loop::new();
        let (_, rx) = l.generate_n(6, "hi", 3);
        let ids = [l.submitted(), l.submitted(), l.submitted()];
        drop(rx);
        l.call(Call::Gone(6));
        let finished: Vec<_> =
            l.engine.try_iter().filter_map(|c| if let Command::Finish(id) = c { Some(id) } else { None }).collect();
        assert_eq!(finished, ids);
        assert_eq!((l.hub.live_requests(), l.hub.waiting()), (0, 0));
        assert!(l.peers.is_empty());
    }

    #[test]
    fn a_refused_http_request_gets_the_reason_and_is_not_kept() {
        let mut l = Loop::new();
        let (verdict, _rx) = l.generate(1, "far too long a prompt");
        assert_eq!(verdict.unwrap_err().code, ErrorCode::PromptTooLong);
        assert!(l.peers.is_empty());
        assert!(l.engine.try_recv().is_err());
    }

    #[test]
    fn a_gone_handler_aborts_its_request_and_later_tokens_are_dropped() {
        let mut l = Loop::new();
        let (_, rx) = l.generate(5, "hi");
        let id = l.submitted();
        drop(rx);
        l.call(Call::Gone(5));
        assert!(matches!(l.engine.try_recv(), Ok(Command::Finish(finished)) if finished == id));
        assert_eq!(l.hub.live_requests(), 0);
        assert!(l.peers.is_empty());
        l.events(vec![Event::Token { id, token: b'x' as u32, finish: None, logprobs: None }]);
        l.call(Call::Gone(5)); // a second goodbye, or one for a request that ended: nothing to do
        assert!(l.engine.try_recv().is_err());
        let (tx, mut live) = oneshot::channel();
        l.call(Call::Health(tx));
        assert_eq!(live.try_recv(), Ok(0));
    }

    #[test]
    fn zmq_replies_keep_their_order_and_frames() {
        let mut l = Loop::new();
        let peer = Peer::Zmq(vec![Bytes::from_static(b"id"), Bytes::new()]);
        let mut out = vec![
            (peer.clone(), l.hub.info()),
            (Peer::Http(9), l.hub.info()), // no such HTTP request: dropped
            (peer, ServerMsg::Final(final_for("z"))),
        ];
        route(&mut out, &mut l.peers, &mut l.to_zmq);
        assert_eq!(l.to_zmq.len(), 2);
        assert!(l.to_zmq.iter().all(|(frames, _)| frames.len() == 2 && frames[0] == "id"));
        assert!(matches!(l.to_zmq[0].1, ServerMsg::Info(_)) && matches!(l.to_zmq[1].1, ServerMsg::Final(_)));
    }

    fn final_for(rid: &str) -> proto::api::Final {
        proto::api::Final {
            rid: rid.into(),
            index: 0,
            cached_tokens: 0,
            finish_reason: FinishReason::Stop,
            prompt_tokens: 1,
            completion_tokens: 1,
            token_ids: vec![1],
            text: String::new(),
            message: None,
            logprobs: None,
            prompt_logprobs: None,
            prompt_token_ids: None,
            tool_calls: None,
        }
    }
}
