//! The engine thread: takes commands, has the core plan each step straight into the step ring, waits for the
//! worker's results and hands the core's events to the server. It holds no policy of its own (that is `core`),
//! and it is the only code that touches the rings.
//!
//! It runs on its own OS thread, not on the async runtime: a step is a tight loop of shared-memory writes and
//! short spins, which must not wait behind socket work.
//!
//! **Overlap.** The worker should never wait for the CPU, so the engine keeps up to [`MAX_IN_FLIGHT`] steps
//! published: after publishing step N it plans and publishes N+1 (when there is anything to plan) and only then
//! waits for N's result; it completes N, applies the commands that arrived, plans N+2, waits for N+1, and so on.
//! Planning N+1 needs nothing from N (decode inputs name the worker's last sampled token per slot, and the core
//! defers every free until the steps using it complete), so the worker finds N+1 ready the moment N is done.
//! Turning overlap off keeps one step in flight, for measurement.
//!
//! **Token masks.** A constrained request (structured output, `crate::grammar`) samples under a mask that a
//! [`MaskPool`] thread computes from the token before: the core plans its sample only once its mask is here, and
//! never while a sample of it is in flight, so with overlap it samples at most every other step. Before planning
//! a step while another runs, the engine waits for the masks it asked for (the step ahead is still running, so
//! the worker loses nothing), which lets a constrained request go into the very next step planned; with nothing
//! in flight it waits a little ([`IDLE_MASK_WAIT`]) so that a batch of constrained requests stays one step.
//! Steps without constrained requests pay nothing: no mask in the step, no wait.
//!
//! **Waiting.** Two rings are involved, in opposite directions, so a blocking wait on one could wait for ever on
//! a peer that is itself blocked on the other (a small ring full of results we are not reading while we wait for
//! a step slot). Every wait is therefore a poll (`try_claim`, `try_read`) under a [`Backoff`], checking on each
//! snooze that the worker is alive through both rings.

use crate::core::{Core, Event, FinishReason, NewRequest, Planned, PlannedReq, ReqId};
use crate::grammar::{MaskEvent, MaskPool};
use crate::metrics::Metrics;
use crate::step_stats::StepStats;
use anyhow::{Context, Result, bail};
use proto::api::TokenLogprobs;
use proto::ring::{Backoff, Liveness, Ring};
use proto::step::{ResultLayout, ResultRef, StepKind, StepLayout, StepMut};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What the server asks of the engine.
pub enum Command {
    Submit(NewRequest),
    /// A request whose samples follow a grammar (its params say `constrained`), with its matcher.
    SubmitConstrained {
        req: NewRequest,
        matcher: Box<llguidance::Matcher>,
    },
    /// A mask thread's answer.
    Mask(MaskEvent),
    /// End a request early (abort, stop string). The server has already answered the client.
    Finish(ReqId),
    /// Stop the worker and the thread.
    Shutdown,
}

/// What the engine tells the server.
pub enum Output {
    /// The core's events of one step, in step order, and the logprobs they refer to.
    Events { events: Vec<Event>, logprobs: StepLogprobs },
    /// The engine stopped on its own: the worker died or failed. Live requests cannot finish.
    Failed(String),
}

/// The logprobs one step's events refer to, copied out of its result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepLogprobs {
    /// One entry per [`Event::Token`] whose `logprobs` is set, in event order.
    pub tokens: Vec<TokenLogprobs>,
    /// `count` entries per [`Event::PromptLogprobs`], in event order.
    pub prompt: Vec<TokenLogprobs>,
}

/// Steps published and not yet answered, with overlap on: one running on the worker, one ready behind it. More
/// would only delay what a finished request or a new arrival changes, for no gain: the next plan is ready long
/// before the step ahead of it ends.
pub const MAX_IN_FLIGHT: usize = 2;

/// How often an idle engine wakes to refresh its heartbeat and check that the worker lives.
const IDLE_TICK: Duration = Duration::from_millis(50);
/// When an idle engine receives a request it waits `gap` for the next one before planning (again after each
/// arrival, for `max` in all), so that a client's burst is prefilled as one step. Without it the first
/// request's prefill is planned alone and the rest wait behind it: on the H200 every eager prefill costs about
/// 12 ms of host time whatever its size, and the seed workload (16 requests sent at once) paid twice.
#[derive(Clone, Copy, Debug)]
pub struct BurstWindow {
    pub gap: Duration,
    pub max: Duration,
}

impl Default for BurstWindow {
    fn default() -> Self {
        BurstWindow { gap: Duration::from_micros(200), max: Duration::from_millis(2) }
    }
}

/// How long an engine with nothing in flight waits for the masks it asked for before planning without the late
/// ones (a mask over a 150k vocabulary takes well under a millisecond optimised).
const IDLE_MASK_WAIT: Duration = Duration::from_millis(10);

/// How long stopping waits for the steps in flight to be answered and for a slot to tell the worker to exit. The
/// launcher gives the scheduler 5 s before it signals it.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(3);

pub struct Engine {
    pub core: Core,
    pub step_ring: Ring,
    pub result_ring: Ring,
    pub commands: Receiver<Command>,
    pub outputs: UnboundedSender<Output>,
    pub burst: BurstWindow,
    pub metrics: Arc<Metrics>,
    /// The mask threads of structured output; `None` refuses constrained requests.
    pub masks: Option<MaskPool>,
}

/// The engine's side of the constrained requests.
#[derive(Default)]
struct Grammars {
    /// Live constrained requests, with the mask of their next sample once it is here.
    live: HashMap<ReqId, Option<Box<[u32]>>>,
    /// Masks asked of the mask threads and not yet back.
    outstanding: HashSet<ReqId>,
}

impl Grammars {
    fn forget(&mut self, id: ReqId, pool: Option<&MaskPool>) {
        if self.live.remove(&id).is_some() {
            self.outstanding.remove(&id);
            if let Some(pool) = pool {
                pool.drop_sample(id);
            }
        }
    }

    /// After a step's events: a constrained request that goes on has its token committed and its next mask
    /// computed; one that ended is forgotten.
    fn after_events(&mut self, events: &[Event], pool: Option<&MaskPool>) {
        if self.live.is_empty() {
            return;
        }
        for event in events {
            let id = event.id();
            if !self.live.contains_key(&id) {
                continue;
            }
            match *event {
                Event::Token { token, finish: None, .. } => {
                    self.live.insert(id, None);
                    self.outstanding.insert(id);
                    if let Some(pool) = pool {
                        pool.commit(id, token);
                    }
                }
                Event::Token { .. } | Event::Finished { .. } => self.forget(id, pool),
                Event::Cached { .. } | Event::PromptLogprobs { .. } => {}
            }
        }
    }
}

/// The engine's state while it runs, beside what it was built with.
struct Pipeline {
    step_layout: StepLayout,
    result_layout: ResultLayout,
    /// Steps may be published and not yet answered: [`MAX_IN_FLIGHT`] with overlap, 1 without.
    depth: usize,
    /// Published steps with when they were published, oldest first: the order the worker answers them in.
    in_flight: VecDeque<(Planned, Instant)>,
    stats: StepStats,
    /// The id of the next step, equal to the step ring's sequence number of its slot.
    next_step: u64,
    events: Vec<Event>,
    logprobs: StepLogprobs,
    grammars: Grammars,
    /// The core has work but planned nothing with nothing in flight: it waits for masks.
    stalled: bool,
    /// Shutdown was asked for while commands were applied inside a turn.
    stopping: bool,
    /// Since when the engine, with nothing in flight, holds the next plan back for masks.
    idle_mask_wait: Option<Instant>,
}

impl Engine {
    /// Starts the engine thread; without `overlap` it keeps a single step in flight (for measurement).
    pub fn spawn_with(self, overlap: bool) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("engine".into()).spawn(move || self.run_to_end(overlap))
    }

    fn run_to_end(mut self, overlap: bool) {
        // Our pid in both headers is how the worker's waits tell a slow scheduler from a dead one.
        let pid = std::process::id();
        self.step_ring.attach_writer(pid);
        self.result_ring.attach_reader(0, pid);
        let mut pipe = Pipeline {
            step_layout: StepLayout::new(self.step_ring.capacity()),
            result_layout: ResultLayout::new(self.result_ring.capacity()),
            depth: if overlap { MAX_IN_FLIGHT } else { 1 },
            in_flight: VecDeque::with_capacity(MAX_IN_FLIGHT),
            next_step: self.step_ring.write_seq(),
            events: Vec::new(),
            logprobs: StepLogprobs::default(),
            stats: StepStats::default(),
            grammars: Grammars::default(),
            stalled: false,
            stopping: false,
            idle_mask_wait: None,
        };
        if let Err(e) = self.run(&mut pipe) {
            tracing::error!("engine stopped: {e:#}");
            let _ = self.outputs.send(Output::Failed(format!("{e:#}")));
        }
        // Whatever ended the loop, a live worker is told to exit; a dead one is noticed at once.
        self.shut_worker_down(&mut pipe);
        tracing::info!("steps run: {}", pipe.stats);
    }

    /// Runs until shutdown is asked for (`Ok`) or the worker, the rings or the server fail.
    fn run(&mut self, pipe: &mut Pipeline) -> Result<()> {
        // The worker's pid is in both ring headers; a busy worker (a long prefill, a first CUDA-graph capture) is
        // not a dead one, so only its pid counts, not its heartbeat.
        let liveness = Liveness::pid_only();
        loop {
            if !self.take_commands(pipe, &liveness)? {
                return Ok(());
            }
            self.report_load();
            self.turn(pipe, &liveness)?;
            if pipe.stopping {
                return Ok(());
            }
        }
    }

    /// One turn between commands: publishes steps while the pipeline has room and the core has something to plan,
    /// and completes the oldest step in flight. With overlap, step N+1 is published before N's result is awaited;
    /// a step slot that comes free only during the wait (a ring with fewer slots than steps in flight) is used as
    /// soon as it does.
    fn turn(&mut self, pipe: &mut Pipeline, liveness: &Liveness) -> Result<()> {
        // False once the core had nothing to plan: nothing changes that before a step completes.
        let mut may_plan = true;
        let mut backoff = Backoff::new();
        loop {
            if may_plan && pipe.in_flight.len() < pipe.depth && self.step_ring.try_claim().is_some() {
                if !self.wait_for_masks(pipe)? {
                    may_plan = self.publish_next(pipe)?;
                    backoff.reset();
                    continue;
                }
                if pipe.stopping {
                    return Ok(());
                }
            }
            if self.result_ring.try_read(0).is_some() {
                let planned = pipe.in_flight.pop_front().context("the worker answered a step never published")?;
                return self.complete(pipe, planned);
            }
            if pipe.in_flight.is_empty() && !may_plan {
                // The core plans nothing with nothing in flight only when it is idle or waits for masks;
                // take_commands then blocks until a command (a mask) comes.
                pipe.stalled = !self.core.is_idle();
                debug_assert!(
                    !pipe.stalled || !pipe.grammars.outstanding.is_empty(),
                    "nothing in flight and nothing to plan, yet the core has work"
                );
                return Ok(());
            }
            if backoff.snooze() {
                let waiting_for = if pipe.in_flight.is_empty() { "a free step slot" } else { "the worker's result" };
                self.check_worker(liveness).with_context(|| format!("waiting for {waiting_for}"))?;
            }
        }
    }

    /// Plans the next step into the claimed slot of the step ring and publishes it. False when there is nothing to
    /// plan now.
    fn publish_next(&mut self, pipe: &mut Pipeline) -> Result<bool> {
        let slot = self.step_ring.try_claim().expect("the caller claimed a slot; a claim holds until publish");
        let mut step = StepMut::new(&pipe.step_layout, slot);
        let live = &pipe.grammars.live;
        let mut masks = |id: ReqId, row: &mut [u32]| {
            if let Some(Some(words)) = live.get(&id) {
                let n = words.len().min(row.len());
                row[..n].copy_from_slice(&words[..n]);
            }
        };
        let planned = self.core.plan_step_with_masks(pipe.next_step, &mut step, &mut pipe.events, &mut masks);
        // Planning may end requests (one that can never get its pages) even when it plans nothing.
        pipe.grammars.after_events(&pipe.events, self.masks.as_ref());
        self.forward(&mut pipe.events)?;
        let Some(planned) = planned else { return Ok(false) };
        // The step trace (`--log-level info,scheduler::engine=trace`): which requests each step carries, with how
        // many new tokens. Off by default; its fields are not even formatted then.
        tracing::trace!(
            step = planned.step_id(),
            kind = ?planned.kind(),
            tokens = planned.num_tokens(),
            requests = %RequestIds(planned.reqs()),
            "step planned"
        );
        self.step_ring.publish();
        pipe.next_step += 1;
        pipe.in_flight.push_back((planned, Instant::now()));
        Ok(true)
    }

    /// Hands the result waiting in the result ring for `planned` to the core, and its events to the server.
    fn complete(&mut self, pipe: &mut Pipeline, (planned, published): (Planned, Instant)) -> Result<()> {
        let buf = self.result_ring.try_read(0).expect("turn saw it");
        let result = ResultRef::try_new(&pipe.result_layout, buf)
            .map_err(|e| anyhow::anyhow!("the worker wrote a broken result for step {}: {e}", planned.step_id()))?;
        let (answered, status, n) = (result.header.step_id, result.header.status, result.tokens.len());
        let step_id = planned.step_id();
        if answered != step_id || (status == 0 && n != planned.num_reqs()) {
            bail!("the worker answered step {answered} ({n} tokens) while step {step_id} was the oldest in flight");
        }
        if status != 0 {
            // The worker logged why; it exits after a failed step, so the steps behind this one fail with it.
            self.result_ring.release(0);
            self.core.fail_step(planned, &mut pipe.events);
            while let Some((behind, _)) = pipe.in_flight.pop_front() {
                self.core.fail_step(behind, &mut pipe.events);
            }
            pipe.grammars.after_events(&pipe.events, self.masks.as_ref());
            self.forward(&mut pipe.events)?;
            bail!("the worker failed step {step_id}");
        }
        let busy = pipe.stats.answered(planned.kind(), published, planned.num_reqs(), planned.num_tokens());
        self.metrics.step_answered(planned.kind(), busy);
        tracing::debug!(
            step = step_id,
            kind = ?planned.kind(),
            requests = planned.num_reqs(),
            tokens = planned.num_tokens(),
            in_flight_us = published.elapsed().as_micros() as u64,
            "step answered"
        );
        self.core.complete_step(planned, result.tokens, &mut pipe.events);
        pipe.grammars.after_events(&pipe.events, self.masks.as_ref());
        read_logprobs(&result, &pipe.events, &mut pipe.logprobs).with_context(|| format!("step {step_id}"))?;
        self.result_ring.release(0);
        self.report_load();
        self.forward_with_logprobs(&mut pipe.events, &mut pipe.logprobs)
    }

    fn report_load(&self) {
        let core = &self.core;
        self.metrics.set_load(core.waiting(), core.running(), core.free_pages(), core.limits().num_pages);
        self.metrics.set_cache(&core.cache_stats());
    }

    /// Fails when the worker is gone. Also refreshes our heartbeats on both rings, for diagnostics.
    fn check_worker(&self, liveness: &Liveness) -> Result<()> {
        self.step_ring.heartbeat();
        self.result_ring.reader_heartbeat(0);
        self.step_ring.check_readers(liveness).context("the worker is gone")?;
        self.result_ring.check_writer(liveness).context("the worker is gone")?;
        Ok(())
    }

    fn forward(&self, events: &mut Vec<Event>) -> Result<()> {
        self.forward_with_logprobs(events, &mut StepLogprobs::default())
    }

    fn forward_with_logprobs(&self, events: &mut Vec<Event>, logprobs: &mut StepLogprobs) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let output = Output::Events { events: std::mem::take(events), logprobs: std::mem::take(logprobs) };
        if self.outputs.send(output).is_err() {
            bail!("the server is gone");
        }
        Ok(())
    }

    /// Applies waiting commands; blocks while there is nothing to run. False once shutdown was asked for.
    fn take_commands(&mut self, pipe: &mut Pipeline, liveness: &Liveness) -> Result<bool> {
        // Set once an idle engine got its first command: (wait for the next one until, stop gathering at).
        let mut burst: Option<(Instant, Instant)> = None;
        loop {
            // Idle (or stalled on masks) means nothing in flight either, so blocking here never leaves a result
            // unread.
            let command = if self.core.is_idle() || pipe.stalled {
                match self.commands.recv_timeout(IDLE_TICK) {
                    Ok(c) => {
                        if !pipe.stalled {
                            let now = Instant::now();
                            burst = Some((now + self.burst.gap, now + self.burst.max));
                        }
                        pipe.stalled = false;
                        c
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        self.check_worker(liveness)?;
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return Ok(false),
                }
            } else if let Some((next, end)) = burst {
                let until = next.min(end);
                let now = Instant::now();
                match self.commands.recv_timeout(until.saturating_duration_since(now)) {
                    Ok(c) => {
                        burst = Some((Instant::now() + self.burst.gap, end));
                        c
                    }
                    Err(RecvTimeoutError::Timeout) => return Ok(true),
                    Err(RecvTimeoutError::Disconnected) => return Ok(false),
                }
            } else {
                match self.commands.try_recv() {
                    Ok(c) => c,
                    Err(TryRecvError::Empty) => return Ok(true),
                    Err(TryRecvError::Disconnected) => return Ok(false),
                }
            };
            if !self.apply(pipe, command)? {
                return Ok(false);
            }
        }
    }

    /// Applies one command; false for shutdown.
    fn apply(&mut self, pipe: &mut Pipeline, command: Command) -> Result<bool> {
        match command {
            Command::Submit(req) => {
                self.submit(req)?;
            }
            Command::SubmitConstrained { req, matcher } => {
                let id = req.id;
                if self.masks.is_some() {
                    if self.submit(req)? {
                        pipe.grammars.live.insert(id, None);
                        pipe.grammars.outstanding.insert(id);
                        self.masks.as_ref().expect("checked").start(id, *matcher);
                    }
                } else {
                    tracing::error!("request {id} is constrained, and this engine has no mask threads");
                    self.forward(&mut vec![Event::Finished { id, reason: FinishReason::Error }])?;
                }
            }
            Command::Mask(event) => self.on_mask(pipe, event)?,
            Command::Finish(id) => {
                self.core.finish(id);
                pipe.grammars.forget(id, self.masks.as_ref());
            }
            Command::Shutdown => return Ok(false),
        }
        Ok(true)
    }

    fn submit(&mut self, req: NewRequest) -> Result<bool> {
        let id = req.id;
        if let Err(e) = self.core.submit(req) {
            // The hub checks prompts against the same limits, so this is a bug, not bad input.
            tracing::error!("request {id} refused by the core: {e}");
            let event = Event::Finished { id, reason: FinishReason::Error };
            self.forward(&mut vec![event])?;
            return Ok(false);
        }
        Ok(true)
    }

    fn on_mask(&mut self, pipe: &mut Pipeline, event: MaskEvent) -> Result<()> {
        let g = &mut pipe.grammars;
        let (id, reason) = match event {
            MaskEvent::Ready { id, words } => {
                // A request that ended meanwhile has no entry any more: its mask is dropped.
                if let Some(slot) = g.live.get_mut(&id) {
                    *slot = Some(words);
                    g.outstanding.remove(&id);
                    self.core.mask_ready(id);
                }
                return Ok(());
            }
            MaskEvent::Stopped { id } => (id, FinishReason::Stop),
            MaskEvent::Failed { id, why } => {
                tracing::warn!("request {id}: the grammar failed: {why}");
                (id, FinishReason::Error)
            }
        };
        if g.live.remove(&id).is_some() {
            g.outstanding.remove(&id);
            // Nothing of it is in flight: it is planned only with its mask, which never came.
            if self.core.finish(id) {
                self.forward(&mut vec![Event::Finished { id, reason }])?;
            }
        }
        Ok(())
    }

    /// Whether to hold the next plan back for the masks asked for. While a step runs, until they are all here
    /// (the turn completes the step when its result comes): the worker has work meanwhile. With nothing in flight,
    /// for at most [`IDLE_MASK_WAIT`]: the worker idles, but planning the requests whose masks came first would
    /// split a batch of constrained requests over several steps. Applies the commands that came meanwhile (masks
    /// among them).
    fn wait_for_masks(&mut self, pipe: &mut Pipeline) -> Result<bool> {
        if pipe.grammars.outstanding.is_empty() {
            pipe.idle_mask_wait = None;
            return Ok(false);
        }
        loop {
            match self.commands.try_recv() {
                Ok(command) => {
                    if !self.apply(pipe, command)? {
                        pipe.stopping = true;
                        return Ok(true);
                    }
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    pipe.stopping = true;
                    return Ok(true);
                }
            }
        }
        if pipe.grammars.outstanding.is_empty() {
            pipe.idle_mask_wait = None;
            return Ok(false);
        }
        if !pipe.in_flight.is_empty() {
            return Ok(true);
        }
        let since = *pipe.idle_mask_wait.get_or_insert_with(Instant::now);
        if since.elapsed() < IDLE_MASK_WAIT {
            return Ok(true);
        }
        pipe.idle_mask_wait = None;
        Ok(false)
    }

    /// Best effort, bounded by [`SHUTDOWN_WAIT`]: reads (and drops) the results of the steps in flight, so that the
    /// worker never blocks on a full result ring, then publishes a shutdown step. A worker that is already gone
    /// needs no telling, and is noticed at the first check.
    fn shut_worker_down(&mut self, pipe: &mut Pipeline) {
        let liveness = Liveness::timeout(SHUTDOWN_WAIT);
        let mut backoff = Backoff::new();
        loop {
            let mut progress = false;
            if !pipe.in_flight.is_empty() && self.result_ring.try_read(0).is_some() {
                self.result_ring.release(0);
                pipe.in_flight.pop_front();
                progress = true;
            }
            if pipe.in_flight.is_empty()
                && let Some(slot) = self.step_ring.try_claim()
            {
                let step = StepMut::new(&pipe.step_layout, slot);
                step.header.step_id = pipe.next_step;
                step.header.kind = StepKind::Shutdown as u32;
                self.step_ring.publish();
                return;
            }
            if progress {
                backoff.reset();
            } else if backoff.snooze()
                && let Err(e) = self.check_worker(&liveness)
            {
                tracing::debug!("not telling the worker to stop: {e:#}");
                return;
            }
        }
    }
}

/// Copies the logprobs that `events` refer to out of `result` (the step's, still in the ring) into `out`, in
/// event order, each with as many top entries as its request asked for: those of the tokens whose requests asked
/// for them, and the prompt logprobs of [`Event::PromptLogprobs`]. Steps whose requests asked for none cost a scan
/// of their events. A result without the logprobs a request asked for breaks the protocol (the worker computes
/// them for every row of a step in which any request asked, and for every position the step gave a target).
pub fn read_logprobs(result: &ResultRef<'_>, events: &[Event], out: &mut StepLogprobs) -> Result<()> {
    for event in events {
        match *event {
            Event::Token { id, logprobs: Some(at), .. } => {
                let Some(entry) = result.logprobs_of(at.row as usize) else {
                    bail!("the worker's result has no logprobs for request {id}, which asked for them");
                };
                out.tokens.push(entry_of(entry, at.top, id)?);
            }
            Event::PromptLogprobs { id, first, count, top } => {
                for e in first..first + count {
                    let Some(entry) = result.prompt_logprobs_of(e as usize) else {
                        let p = result.prompt_logprob.len();
                        bail!("the worker's result has {p} prompt logprobs; request {id} needs entry {e}");
                    };
                    out.prompt.push(entry_of(entry, top, id)?);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// One logprob entry of a result, cut to the `k` top entries request `id` asked for.
fn entry_of((logprob, ids, values): (f32, &[i32], &[f32]), k: u32, id: ReqId) -> Result<TokenLogprobs> {
    let k = k as usize;
    if ids.len() < k {
        bail!("the worker's result has {} top logprobs; request {id} asked for {k}", ids.len());
    }
    // Ids are non-negative vocabulary ids; a negative one would be the worker's bug, read as an id no
    // tokenizer has rather than trusted.
    let top = ids[..k].iter().zip(&values[..k]).map(|(&t, &lp)| (u32::try_from(t).unwrap_or(u32::MAX), lp));
    Ok(TokenLogprobs { logprob, top: top.collect() })
}

/// A step's request ids, space-separated, formatted only when a log line is written.
struct RequestIds<'a>(&'a [PlannedReq]);

impl std::fmt::Display for RequestIds<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            write!(f, "{}{}", if i > 0 { " " } else { "" }, r.id)?;
        }
        Ok(())
    }
}
