//! The startup handshake with the worker (docs/protocol.md, section 2): learn what it allocated, create the
//! two rings to fit, and wait until it has mapped them. Nothing is accepted from clients before this ends.
//!
//! A worker split over tensor-parallel ranks is one REQ peer per rank, each saying hello with its `tp_rank` and
//! `tp_size`. The control socket is a ROUTER so that the hellos can be held until every rank has sent one: only
//! then are the rings created (the step ring with a reader per rank) and every rank welcomed.

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use proto::api::{self, Hello, SchedulerMsg, Welcome, WorkerMsg};
use proto::ring::{MAX_READERS, Ring, RingKind};
use proto::step::{Capacity, ResultLayout, StepLayout};
use serde::Deserialize;
use std::time::Duration;
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// What the scheduler settles on once it knows the worker's limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingPlan {
    pub capacity: Capacity,
    pub slot_count: u32,
}

/// A worker whose every rank has said hello and mapped the rings.
pub struct Worker {
    /// Rank 0's hello; every rank's agrees with it but for its pid and device.
    pub hello: Hello,
    /// Each rank's pid, by rank; rank r is reader r of the step ring, and rank 0 writes the result ring.
    pub pids: Vec<u32>,
    pub step_ring: Ring,
    pub result_ring: Ring,
}

/// The tensor-parallel fields of a rank's hello. A single worker leaves them out.
#[derive(Debug, Deserialize)]
struct RankFields {
    #[serde(default)]
    tp_rank: u32,
    #[serde(default = "one")]
    tp_size: u32,
}

fn one() -> u32 {
    1
}

/// A REQ peer's routing frames (its identity and the empty delimiter), for the reply.
type Peer = Vec<Bytes>;

/// Binds `control`, waits (at most `timeout` between messages) for every rank of the worker, and creates the
/// rings that `plan` asks for. `on_status` hears what a rank says it is doing before its hello (loading
/// weights, capturing CUDA graphs), for the readiness the HTTP API reports.
pub async fn handshake(
    control: &str,
    shm_prefix: &str,
    timeout: Duration,
    mut on_status: impl FnMut(&str),
    plan: impl FnOnce(&Hello) -> Result<RingPlan>,
) -> Result<Worker> {
    if let Some(path) = control.strip_prefix("ipc://") {
        let _ = std::fs::remove_file(path);
    }
    let mut socket = RouterSocket::new();
    socket.bind(control).await.with_context(|| format!("binding the control socket {control}"))?;
    tracing::info!("waiting for the worker on {control}");

    let ranks = match hellos(&mut socket, timeout, &mut on_status).await {
        Ok(ranks) => ranks,
        Err((peers, e)) => return Err(refuse(&mut socket, &peers, e).await),
    };
    let peers: Vec<Peer> = ranks.iter().map(|(peer, _)| peer.clone()).collect();
    let hello = ranks[0].1.clone();
    let pids: Vec<u32> = ranks.iter().map(|(_, h)| h.pid).collect();
    tracing::info!(
        "worker {} ready: {} on {} ({}), {} KV pages of {} tokens, batches up to {} requests / {} tokens",
        if pids.len() == 1 { format!("{}", pids[0]) } else { format!("of {} ranks (pids {pids:?})", pids.len()) },
        hello.model.architecture,
        hello.model.device,
        hello.model.dtype,
        hello.num_pages,
        hello.page_size,
        hello.max_batch,
        hello.max_tokens
    );
    let readers = ranks.len() as u32;
    let rings = plan(&hello).and_then(|p| create_rings(shm_prefix, p, hello.page_size, readers));
    let (step_ring, result_ring) = match rings {
        Ok(r) => r,
        Err(e) => return Err(refuse(&mut socket, &peers, e).await),
    };
    let welcome = SchedulerMsg::Welcome(Welcome {
        step_ring: step_ring.name().to_string(),
        result_ring: result_ring.name().to_string(),
        pid: std::process::id(),
    });
    for peer in &peers {
        reply(&mut socket, peer, &welcome).await?;
    }
    let mut ready = vec![false; peers.len()];
    while ready.contains(&false) {
        let (peer, msg, _) = recv(&mut socket, timeout).await?;
        let rank = peers.iter().position(|p| *p == peer);
        match (msg, rank) {
            (WorkerMsg::Ready, Some(r)) if !ready[r] => {
                ready[r] = true;
                reply(&mut socket, &peer, &SchedulerMsg::Ok).await?;
            }
            (other, _) => {
                let e = anyhow::anyhow!("a worker rank answered welcome with {other:?} instead of ready");
                let waiting: Vec<Peer> =
                    peers.iter().zip(&ready).filter(|(_, r)| !**r).map(|(p, _)| p.clone()).collect();
                return Err(refuse(&mut socket, &waiting, e).await);
            }
        }
    }
    // Dropping the socket removes its ipc file.
    drop(socket);
    Ok(Worker { hello, pids, step_ring, result_ring })
}

/// Collects one hello per rank, answering status reports meanwhile; the hellos by rank, with their peers. On
/// failure, the peers still waiting for an answer, and why.
async fn hellos(
    socket: &mut RouterSocket,
    timeout: Duration,
    on_status: &mut impl FnMut(&str),
) -> Result<Vec<(Peer, Hello)>, (Vec<Peer>, anyhow::Error)> {
    let mut ranks: Vec<Option<(Peer, Hello)>> = Vec::new();
    fn waiting(ranks: &[Option<(Peer, Hello)>]) -> Vec<Peer> {
        ranks.iter().flatten().map(|(p, _)| p.clone()).collect()
    }
    loop {
        let (peer, msg, payload) = match recv(socket, timeout).await {
            Ok(m) => m,
            Err(e) => return Err((waiting(&ranks), e)),
        };
        let hello = match msg {
            WorkerMsg::Status { phase } => {
                on_status(&phase);
                if let Err(e) = reply(socket, &peer, &SchedulerMsg::Ok).await {
                    return Err((waiting(&ranks), e));
                }
                continue;
            }
            WorkerMsg::Hello(hello) => hello,
            other => {
                let mut peers = waiting(&ranks);
                peers.push(peer);
                return Err((peers, anyhow::anyhow!("the worker opened with {other:?} instead of hello")));
            }
        };
        if let Err(e) = add_rank(&mut ranks, &payload, peer.clone(), hello) {
            let mut peers = waiting(&ranks);
            peers.push(peer);
            return Err((peers, e));
        }
        if ranks.iter().all(Option::is_some) {
            let ranks: Vec<(Peer, Hello)> = ranks.into_iter().flatten().collect();
            if let Err(e) = check_agree(&ranks) {
                return Err((ranks.into_iter().map(|(p, _)| p).collect(), e));
            }
            return Ok(ranks);
        }
    }
}

fn add_rank(ranks: &mut Vec<Option<(Peer, Hello)>>, payload: &[u8], peer: Peer, hello: Hello) -> Result<()> {
    let RankFields { tp_rank, tp_size } =
        api::decode(payload).context("a malformed tp_rank or tp_size in a worker's hello")?;
    if tp_size == 0 || tp_size as usize > MAX_READERS {
        bail!("a worker said hello as one of {tp_size} ranks: the step ring takes 1 to {MAX_READERS} readers");
    }
    if ranks.is_empty() {
        ranks.resize(tp_size as usize, None);
    }
    if tp_size as usize != ranks.len() {
        bail!("worker ranks disagree on their number: {} and {tp_size}", ranks.len());
    }
    let Some(slot) = ranks.get_mut(tp_rank as usize) else {
        bail!("a worker said hello as rank {tp_rank} of {tp_size}");
    };
    if let Some((_, first)) = slot {
        bail!("two workers said hello as rank {tp_rank} (pids {} and {})", first.pid, hello.pid);
    }
    if tp_size > 1 {
        tracing::info!("worker rank {tp_rank} of {tp_size} (pid {}) said hello", hello.pid);
    }
    *slot = Some((peer, hello));
    Ok(())
}

/// Every rank must describe the same model and the same allocation (only the pid and the device differ): the
/// scheduler plans one set of pages and one batch size for all of them.
fn check_agree(ranks: &[(Peer, Hello)]) -> Result<()> {
    let first = &ranks[0].1;
    for (rank, (_, h)) in ranks.iter().enumerate().skip(1) {
        let mut model = h.model.clone();
        model.device.clone_from(&first.model.device);
        let differs = [
            ("model", model != first.model),
            ("num_pages", h.num_pages != first.num_pages),
            ("page_size", h.page_size != first.page_size),
            ("max_batch", h.max_batch != first.max_batch),
            ("max_tokens", h.max_tokens != first.max_tokens),
        ];
        if let Some((field, _)) = differs.iter().find(|(_, d)| *d) {
            bail!("worker ranks 0 and {rank} disagree on {field}: {first:?} and {h:?}");
        }
    }
    Ok(())
}

/// Answers every peer still waiting with the error (so that no rank hangs on its request), and returns it.
async fn refuse(socket: &mut RouterSocket, peers: &[Peer], e: anyhow::Error) -> anyhow::Error {
    let msg = SchedulerMsg::Error { message: format!("{e:#}") };
    for peer in peers {
        if let Err(send) = reply(socket, peer, &msg).await {
            tracing::debug!("could not tell a worker rank why: {send:#}");
        }
    }
    e
}

fn create_rings(prefix: &str, plan: RingPlan, page_size: u32, readers: u32) -> Result<(Ring, Ring)> {
    let step_bytes = StepLayout::new(plan.capacity).slot_bytes;
    let result_bytes = ResultLayout::new(plan.capacity).slot_bytes;
    let step = Ring::create(
        &format!("{prefix}-step"),
        RingKind::Step,
        plan.slot_count,
        step_bytes,
        plan.capacity,
        page_size,
        readers,
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

/// The next message: its sender, the message and its payload as sent.
async fn recv(socket: &mut RouterSocket, timeout: Duration) -> Result<(Peer, WorkerMsg, Bytes)> {
    let msg = tokio::time::timeout(timeout, socket.recv())
        .await
        .with_context(|| format!("no word from the worker within {} s", timeout.as_secs()))??;
    let mut frames = msg.into_vec();
    let payload = frames.pop().unwrap_or_default();
    let msg = api::decode(&payload).context("a malformed control message from the worker")?;
    Ok((frames, msg, payload))
}

async fn reply(socket: &mut RouterSocket, peer: &Peer, msg: &SchedulerMsg) -> Result<()> {
    let mut frames = peer.iter().cloned();
    let identity = frames.next().context("a control message without a sender")?;
    let mut message = ZmqMessage::from(identity);
    for frame in frames.chain(std::iter::once(Bytes::from(api::encode(msg)))) {
        message.push_back(frame);
    }
    socket.send(message).await.context("answering the worker")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::api::ModelFacts;
    use zeromq::ReqSocket;

    fn hello(pid: u32, num_pages: u32, device: &str) -> Hello {
        Hello {
            pid,
            model: ModelFacts {
                architecture: "Qwen2ForCausalLM".into(),
                vocab_size: 64,
                num_layers: 2,
                hidden_size: 16,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 4,
                max_position_embeddings: 128,
                dtype: "float32".into(),
                device: device.into(),
            },
            num_pages,
            page_size: 4,
            max_batch: 2,
            max_tokens: 8,
        }
    }

    /// A rank's hello as the worker writes it: the message, and with several ranks its rank and their number.
    fn hello_bytes(h: &Hello, rank: Option<(u32, u32)>) -> Vec<u8> {
        let mut value = serde_json::to_value(WorkerMsg::Hello(h.clone())).unwrap();
        if let Some((tp_rank, tp_size)) = rank {
            value["tp_rank"] = tp_rank.into();
            value["tp_size"] = tp_size.into();
        }
        rmp_serde::to_vec_named(&value).unwrap()
    }

    async fn ask(socket: &mut ReqSocket, payload: Vec<u8>) -> SchedulerMsg {
        socket.send(ZmqMessage::from(Bytes::from(payload))).await.unwrap();
        api::decode(&socket.recv().await.unwrap().into_vec().pop().unwrap()).unwrap()
    }

    /// A rank that says hello and, if welcomed, maps nothing but answers ready; what it was told, in order.
    async fn rank(control: String, payload: Vec<u8>, status: bool) -> Vec<SchedulerMsg> {
        let mut socket = ReqSocket::new();
        socket.connect(&control).await.unwrap();
        let mut told = Vec::new();
        if status {
            let phase = WorkerMsg::Status { phase: "loading weights".into() };
            told.push(ask(&mut socket, api::encode(&phase)).await);
        }
        told.push(ask(&mut socket, payload).await);
        if matches!(told.last(), Some(SchedulerMsg::Welcome(_))) {
            told.push(ask(&mut socket, api::encode(&WorkerMsg::Ready)).await);
        }
        told
    }

    fn names(test: &str) -> (String, String) {
        let id = format!("minisgl-test-{}-{test}", std::process::id());
        (format!("ipc://{}", std::env::temp_dir().join(format!("{id}.sock")).display()), id)
    }

    fn plan(_: &Hello) -> Result<RingPlan> {
        Ok(RingPlan {
            capacity: Capacity { max_reqs: 2, max_tokens: 8, max_kv_indices: 16, mask_words: 0 },
            slot_count: 4,
        })
    }

    async fn run(test: &str, payloads: Vec<Vec<u8>>) -> (Result<Worker>, Vec<Vec<SchedulerMsg>>, Vec<String>) {
        let (control, prefix) = names(test);
        let mut phases = Vec::new();
        let ranks: Vec<_> =
            payloads.into_iter().enumerate().map(|(i, p)| tokio::spawn(rank(control.clone(), p, i == 0))).collect();
        let on_status = |phase: &str| phases.push(phase.to_string());
        let worker = handshake(&control, &prefix, Duration::from_secs(20), on_status, plan).await;
        let mut told = Vec::new();
        for r in ranks {
            told.push(r.await.unwrap());
        }
        (worker, told, phases)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_single_worker_needs_no_rank_fields() {
        let (worker, told, phases) = run("single", vec![hello_bytes(&hello(10, 32, "cpu"), None)]).await;
        let worker = worker.unwrap();
        assert_eq!((worker.pids, worker.step_ring.num_readers()), (vec![10], 1));
        assert!(matches!(told[0][..], [SchedulerMsg::Ok, SchedulerMsg::Welcome(_), SchedulerMsg::Ok]));
        assert_eq!(phases, ["loading weights"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_rank_is_welcomed_to_a_step_ring_with_a_reader_each() {
        // Rank 1 says hello first: the hellos are held until all are in, whatever their order.
        let payloads = vec![
            hello_bytes(&hello(21, 32, "cuda:1"), Some((1, 2))),
            hello_bytes(&hello(20, 32, "cuda:0"), Some((0, 2))),
        ];
        let (worker, told, _) = run("two", payloads).await;
        let worker = worker.unwrap();
        assert_eq!(worker.pids, [20, 21]);
        assert_eq!(worker.hello.model.device, "cuda:0", "rank 0's hello");
        assert_eq!((worker.step_ring.num_readers(), worker.result_ring.num_readers()), (2, 1));
        let welcomes: Vec<&Welcome> = told
            .iter()
            .map(|t| match &t[t.len() - 2] {
                SchedulerMsg::Welcome(w) => w,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(welcomes[0], welcomes[1]);
        assert_eq!(welcomes[0].step_ring, worker.step_ring.name());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ranks_that_disagree_are_all_refused() {
        let payloads =
            vec![hello_bytes(&hello(30, 32, "cpu"), Some((0, 2))), hello_bytes(&hello(31, 31, "cpu"), Some((1, 2)))];
        let (worker, told, _) = run("disagree", payloads).await;
        let e = format!("{:#}", worker.err().unwrap());
        assert!(e.contains("ranks 0 and 1 disagree on num_pages"), "{e}");
        for t in told {
            assert!(matches!(t.last(), Some(SchedulerMsg::Error { message }) if message.contains("num_pages")));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rank_said_twice_is_refused() {
        let payloads =
            vec![hello_bytes(&hello(40, 32, "cpu"), Some((0, 2))), hello_bytes(&hello(41, 32, "cpu"), Some((0, 2)))];
        let (worker, told, _) = run("twice", payloads).await;
        let e = format!("{:#}", worker.err().unwrap());
        assert!(e.contains("two workers said hello as rank 0"), "{e}");
        assert!(told.iter().all(|t| matches!(t.last(), Some(SchedulerMsg::Error { .. }))));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_ranks_than_the_ring_has_readers_are_refused() {
        let (worker, told, _) = run("five", vec![hello_bytes(&hello(50, 32, "cpu"), Some((0, 5)))]).await;
        let e = format!("{:#}", worker.err().unwrap());
        assert!(e.contains("1 to 4 readers"), "{e}");
        assert!(matches!(told[0].last(), Some(SchedulerMsg::Error { .. })));
    }
}
