//! The engine thread: takes commands, has the core plan each step straight into the step ring, waits for the
//! worker's result and hands the core's events to the server. It holds no policy of its own (that is
//! `core`), and it is the only code that touches the rings.
//!
//! It runs on its own OS thread, not on the async runtime: a step is a tight loop of shared-memory writes and
//! short spins, which must not wait behind socket work.

use crate::core::{Core, Event, FinishReason, NewRequest, ReqId};
use anyhow::{Context, Result, bail};
use proto::ring::{Liveness, Ring};
use proto::step::{ResultLayout, ResultRef, StepKind, StepLayout, StepMut};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// What the server asks of the engine.
pub enum Command {
    Submit(NewRequest),
    /// End a request early (abort, stop string). The server has already answered the client.
    Finish(ReqId),
    /// Stop the worker and the thread.
    Shutdown,
}

/// What the engine tells the server.
pub enum Output {
    /// The core's events of one step, in step order.
    Events(Vec<Event>),
    /// The engine stopped on its own: the worker died or failed. Live requests cannot finish.
    Failed(String),
}

/// How often an idle engine wakes to refresh its heartbeat and check that the worker lives.
const IDLE_TICK: Duration = Duration::from_millis(50);

pub struct Engine {
    pub core: Core,
    pub step_ring: Ring,
    pub result_ring: Ring,
    pub commands: Receiver<Command>,
    pub outputs: UnboundedSender<Output>,
}

impl Engine {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name("engine".into()).spawn(move || {
            let outputs = self.outputs.clone();
            if let Err(e) = self.run() {
                tracing::error!("engine stopped: {e:#}");
                let _ = outputs.send(Output::Failed(format!("{e:#}")));
            }
        })
    }

    fn run(mut self) -> Result<()> {
        let step_layout = StepLayout::new(self.step_ring.capacity());
        let result_layout = ResultLayout::new(self.result_ring.capacity().max_reqs);
        // The worker's pid is in both ring headers; a busy worker (a long prefill, a first CUDA-graph capture) is
        // not a dead one, so only its pid counts, not its heartbeat.
        let liveness = Liveness::pid_only();
        let mut events = Vec::new();
        let mut step_id = 0u64;
        loop {
            if !self.take_commands(&liveness)? {
                self.shut_worker_down(&step_layout, step_id);
                return Ok(());
            }
            let slot = self.step_ring.wait_claim(&liveness).context("waiting for a free step slot")?;
            let mut step = StepMut::new(&step_layout, slot);
            let planned = self.core.plan_step(step_id, &mut step, &mut events);
            let Some(planned) = planned else {
                // Nothing to run, but planning may have ended requests (one that can never get its pages).
                self.forward(&mut events)?;
                continue;
            };
            self.step_ring.publish();

            let result = self.result_ring.wait_read(0, &liveness).context("waiting for the worker's result")?;
            let result = ResultRef::new(&result_layout, result);
            let (answered, status, n) = (result.header.step_id, result.header.status, result.tokens.len());
            if answered != step_id || (status == 0 && n != planned.num_reqs()) {
                bail!("the worker answered step {answered} ({n} tokens) while step {step_id} was in flight");
            }
            if status != 0 {
                // The worker logged why; it exits after a failed step, and the liveness checks will notice.
                self.core.fail_step(planned, &mut events);
                self.result_ring.release(0);
                self.forward(&mut events)?;
                bail!("the worker failed step {step_id}");
            }
            self.core.complete_step(planned, result.tokens, &mut events);
            self.result_ring.release(0);
            step_id += 1;
            self.forward(&mut events)?;
        }
    }

    fn forward(&self, events: &mut Vec<Event>) -> Result<()> {
        if !events.is_empty() && self.outputs.send(Output::Events(std::mem::take(events))).is_err() {
            bail!("the server is gone");
        }
        Ok(())
    }

    /// Applies waiting commands; blocks while there is nothing to run. False once shutdown was asked for.
    fn take_commands(&mut self, liveness: &Liveness) -> Result<bool> {
        loop {
            let command = if self.core.is_idle() {
                match self.commands.recv_timeout(IDLE_TICK) {
                    Ok(c) => c,
                    Err(RecvTimeoutError::Timeout) => {
                        self.step_ring.heartbeat();
                        self.step_ring.check_readers(liveness).context("the worker is gone")?;
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return Ok(false),
                }
            } else {
                match self.commands.try_recv() {
                    Ok(c) => c,
                    Err(std::sync::mpsc::TryRecvError::Empty) => return Ok(true),
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return Ok(false),
                }
            };
            match command {
                Command::Submit(req) => {
                    let id = req.id;
                    if let Err(e) = self.core.submit(req) {
                        // The hub checks prompts against the same limits, so this is a bug, not bad input.
                        tracing::error!("request {id} refused by the core: {e}");
                        let event = Event::Finished { id, reason: FinishReason::Error };
                        self.forward(&mut vec![event])?;
                    }
                }
                Command::Finish(id) => {
                    self.core.finish(id);
                }
                Command::Shutdown => return Ok(false),
            }
        }
    }

    /// Best effort: a worker that is already gone needs no telling.
    fn shut_worker_down(&mut self, layout: &StepLayout, step_id: u64) {
        if let Ok(slot) = self.step_ring.wait_claim(&Liveness::timeout(Duration::from_secs(2))) {
            let step = StepMut::new(layout, slot);
            step.header.step_id = step_id;
            step.header.kind = StepKind::Shutdown as u32;
            self.step_ring.publish();
        }
    }
}
