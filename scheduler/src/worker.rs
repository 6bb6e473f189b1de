//! The startup handshake with the worker (docs/protocol.md, section 2): learn what it allocated, create the
//! two rings to fit, and wait until it has mapped them. Nothing is accepted from clients before this ends.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use proto::api::{self, Hello, SchedulerMsg, Welcome, WorkerMsg};
use proto::ring::{Ring, RingKind};
use proto::step::{Capacity, ResultLayout, StepLayout};
use std::time::Duration;
use zeromq::{RepSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// What the scheduler settles on once it knows the worker's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingPlan {
    pub capacity: Capacity,
    pub slot_count: u32,
}

/// A worker that has said hello and mapped both rings.
pub struct Worker {
    pub hello: Hello,
    pub step_ring: Ring,
    pub result_ring: Ring,
}

/// Binds `control`, waits (at most `timeout` between messages) for the worker, and creates the rings that
/// `plan` asks for. `on_status` hears what the worker says it is doing before its hello (loading weights,
/// capturing CUDA graphs), for the readiness the HTTP API reports.
pub async fn handshake(
    control: &str,
    shm_prefix: &str,
    timeout: Duration,
    mut on_status: impl FnMut(&str),
    plan: impl FnOnce(&Hello) -> Result<RingPlan>,
) -> Result<Worker> {
    let path = control.strip_prefix("ipc://");
    if let Some(path) = path {
        let _ = std::fs::remove_file(path);
    }
    let mut socket = RepSocket::new();
    socket.bind(control).await.with_context(|| format!("binding the control socket {control}"))?;
    tracing::info!("waiting for the worker on {control}");

    let hello = loop {
        match recv(&mut socket, timeout).await? {
            WorkerMsg::Status { phase } => {
                on_status(&phase);
                reply(&mut socket, &SchedulerMsg::Ok).await?;
            }
            WorkerMsg::Hello(hello) => break hello,
            other => {
                reply(&mut socket, &SchedulerMsg::Error { message: "expected hello".into() }).await?;
                bail!("the worker opened with {other:?} instead of hello");
            }
        }
    };
    tracing::info!(
        "worker {} ready: {} on {} ({}), {} KV pages of {} tokens, batches up to {} requests / {} tokens",
        hello.pid,
        hello.model.architecture,
        hello.model.device,
        hello.model.dtype,
        hello.num_pages,
        hello.page_size,
        hello.max_batch,
        hello.max_tokens
    );
    let rings = plan(&hello).and_then(|p| create_rings(shm_prefix, p, hello.page_size));
    let (step_ring, result_ring) = match rings {
        Ok(r) => r,
        Err(e) => {
            reply(&mut socket, &SchedulerMsg::Error { message: format!("{e:#}") }).await?;
            return Err(e);
        }
    };
    let welcome = Welcome {
        step_ring: step_ring.name().to_string(),
        result_ring: result_ring.name().to_string(),
        pid: std::process::id(),
    };
    reply(&mut socket, &SchedulerMsg::Welcome(welcome)).await?;
    match recv(&mut socket, timeout).await? {
        WorkerMsg::Ready => reply(&mut socket, &SchedulerMsg::Ok).await?,
        other => bail!("the worker answered welcome with {other:?} instead of ready"),
    }
    // Dropping the socket removes its ipc file.
    drop(socket);
    Ok(Worker { hello, step_ring, result_ring })
}

fn create_rings(prefix: &str, plan: RingPlan, page_size: u32) -> Result<(Ring, Ring)> {
    let step_bytes = StepLayout::new(plan.capacity).slot_bytes;
    let result_bytes = ResultLayout::new(plan.capacity.max_reqs).slot_bytes;
    let step = Ring::create(
        &format!("{prefix}-step"),
        RingKind::Step,
        plan.slot_count,
        step_bytes,
        plan.capacity,
        page_size,
        1,
    )
    .context("creating the step ring")?;
    let result = Ring::create(
        &format!("{prefix}-result"),
        RingKind::Result,
        plan.slot_count,
        result_bytes,
        plan.capacity,
        page_size,
        1,
    )
    .context("creating the result ring")?;
    tracing::debug!("rings {} ({step_bytes} B slots) and {} ({result_bytes} B slots)", step.name(), result.name());
    Ok((step, result))
}

async fn recv(socket: &mut RepSocket, timeout: Duration) -> Result<WorkerMsg> {
    let msg = tokio::time::timeout(timeout, socket.recv())
        .await
        .with_context(|| format!("no word from the worker within {} s", timeout.as_secs()))??;
    let payload = msg.into_vec().pop().unwrap_or_default();
    api::decode(&payload).context("a malformed control message from the worker")
}

async fn reply(socket: &mut RepSocket, msg: &SchedulerMsg) -> Result<()> {
    socket.send(ZmqMessage::from(Bytes::from(api::encode(msg)))).await.context("answering the worker")
}
