//! The engine over real shared-memory rings, against a fake worker thread that behaves like the overlapped Python
//! worker: it takes every step published so far (so with overlap it holds step N+1 while it runs N), runs them in
//! order through `core_support`'s fake worker (which checks each step and the page and slot reuse rules), and
//! answers each in the result ring.

mod core_support;

use core_support::{FakeWorker, hash_model, limits, reference_output};
use proto::api::TokenLogprobs;
use proto::ring::{Ring, RingKind};
use proto::step::{ResultLayout, ResultMut, StepKind, StepRef};
use scheduler::core::{Core, Event, FinishReason, Limits, NewRequest, ReqId, SamplingParams};
use scheduler::engine::{BurstWindow, Command, Engine, MAX_IN_FLIGHT, Output};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;

const PATIENCE: Duration = Duration::from_secs(60);

fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("minisgl-test-engine-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

struct WorkerReport {
    /// The most steps the fake worker held published and unanswered at once.
    max_in_flight: usize,
    answered: u64,
    got_shutdown: bool,
    /// How many requests the first step carried.
    first_step_reqs: Option<u32>,
}

/// How the fake worker thread behaves.
#[derive(Clone, Copy)]
struct Behaviour {
    /// With one step in hand, how long to look for the next before running it: long enough to see the engine's
    /// next step if it publishes one without waiting for this one's result.
    grace: Duration,
    /// Answer this step with a failure, then stop, as the Python worker does.
    fail_at: Option<u64>,
    /// Answer every step with logprobs, as the worker does when a request of the step asked: token t's logprob
    /// is `-t`, and its top two are `t` and `t + 1`.
    logprobs: bool,
}

fn fake_worker(prefix: &str, l: &Limits, b: Behaviour) -> WorkerReport {
    let mut step_ring = Ring::open(&format!("{prefix}-step")).unwrap();
    let mut result_ring = Ring::open(&format!("{prefix}-result")).unwrap();
    let pid = std::process::id();
    step_ring.attach_reader(0, pid);
    result_ring.attach_writer(pid);
    let result_layout = ResultLayout::new(result_ring.capacity());
    let mut fake = FakeWorker::new(l, hash_model);
    // Step ids in hand, with the top entries each asks for at prompt positions.
    let mut ids = VecDeque::new();
    let mut report = WorkerReport { max_in_flight: 0, answered: 0, got_shutdown: false, first_step_reqs: None };
    let started = Instant::now();
    // Since when the oldest step in hand has waited for company.
    let mut holding_since = None;
    loop {
        assert!(started.elapsed() < PATIENCE, "the fake worker saw no end");
        while let Some(buf) = step_ring.try_read(0) {
            let header = StepRef::new(&fake.layout, buf).header;
            report.first_step_reqs.get_or_insert(header.num_reqs);
            if header.kind == StepKind::Shutdown as u32 {
                assert_eq!(fake.in_flight(), 0, "shutdown while steps are unanswered");
                step_ring.release(0);
                report.got_shutdown = true;
                return report;
            }
            let len = fake.buf.bytes().len();
            fake.buf.bytes_mut().copy_from_slice(&buf[..len]);
            step_ring.release(0);
            fake.publish();
            ids.push_back((header.step_id, header.prompt_top));
            holding_since.get_or_insert_with(Instant::now);
            report.max_in_flight = report.max_in_flight.max(fake.in_flight());
        }
        let lonely = holding_since.is_some_and(|t: Instant| t.elapsed() < b.grace);
        if fake.in_flight() == 0 || (fake.in_flight() == 1 && lonely) {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        holding_since = (fake.in_flight() > 1).then(Instant::now);
        let (step_id, prompt_top) = ids.pop_front().unwrap();
        let failed = b.fail_at == Some(step_id);
        let tokens = fake.run_next();
        let buf = loop {
            match result_ring.try_claim() {
                Some(buf) => break buf,
                None => std::thread::sleep(Duration::from_micros(50)),
            }
        };
        let r = ResultMut::new(&result_layout, buf);
        r.header.step_id = step_id;
        r.header.status = u32::from(failed);
        r.header.num_reqs = if failed { 0 } else { tokens.len() as u32 };
        r.tokens[..tokens.len()].copy_from_slice(&tokens);
        if b.logprobs && !failed {
            r.header.logprobs = 1;
            r.header.num_top = 2;
            for (i, &t) in tokens.iter().enumerate() {
                r.logprob[i] = -(t as f32);
                r.top_ids[2 * i..2 * i + 2].copy_from_slice(&[t, t + 1]);
                r.top_logprobs[2 * i..2 * i + 2].copy_from_slice(&[-(t as f32), -(t as f32) - 1.0]);
            }
        }
        // Prompt logprobs, for the positions the step gave a target: the target t at position p has logprob -t,
        // and its top two are t and p.
        if !failed && !fake.prompt_answers.is_empty() {
            let q = prompt_top as usize;
            r.header.num_prompt = fake.prompt_answers.len() as u32;
            r.header.prompt_top = prompt_top;
            for (e, &(pos, target)) in fake.prompt_answers.iter().enumerate() {
                let (t, p) = (target as i32, pos as i32);
                r.prompt_logprob[e] = -(t as f32);
                r.prompt_top_ids[q * e..q * (e + 1)].copy_from_slice(&[t, p][..q]);
                r.prompt_top_logprobs[q * e..q * (e + 1)].copy_from_slice(&[-(t as f32), -(p as f32)][..q]);
            }
        }
        result_ring.publish();
        report.answered += 1;
        if failed {
            return report;
        }
    }
}

struct Running {
    commands: Sender<Command>,
    outputs: UnboundedReceiver<Output>,
    engine: JoinHandle<()>,
    worker: Option<JoinHandle<WorkerReport>>,
}

fn rings(prefix: &str, l: &Limits, slots: u32) -> (Ring, Ring) {
    let cap = l.capacity();
    let create = |kind: RingKind| {
        Ring::create(
            &format!("{prefix}-{}", if kind == RingKind::Step { "step" } else { "result" }),
            kind,
            slots,
            kind.min_slot_bytes(cap),
            cap,
            l.page_size,
            1,
        )
        .unwrap()
    };
    (create(RingKind::Step), create(RingKind::Result))
}

fn start(l: &Limits, slots: u32, overlap: bool, b: Behaviour) -> Running {
    start_with(l, slots, overlap, b, BurstWindow::default())
}

fn start_with(l: &Limits, slots: u32, overlap: bool, b: Behaviour, burst: BurstWindow) -> Running {
    let prefix = unique_prefix();
    let (step_ring, result_ring) = rings(&prefix, l, slots);
    let worker = {
        let (prefix, l) = (prefix.clone(), l.clone());
        std::thread::spawn(move || fake_worker(&prefix, &l, b))
    };
    let (commands, command_rx) = std::sync::mpsc::channel();
    let (output_tx, outputs) = tokio::sync::mpsc::unbounded_channel();
    let engine = Engine {
        core: Core::new(l.clone()).unwrap(),
        step_ring,
        result_ring,
        commands: command_rx,
        outputs: output_tx,
        burst,
        metrics: Default::default(),
        masks: None,
    };
    let engine = engine.spawn_with(overlap).unwrap();
    Running { commands, outputs, engine, worker: Some(worker) }
}

fn next_output(outputs: &mut UnboundedReceiver<Output>) -> Output {
    let started = Instant::now();
    loop {
        if let Ok(out) = outputs.try_recv() {
            return out;
        }
        assert!(started.elapsed() < PATIENCE, "no word from the engine");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn requests() -> Vec<(ReqId, Vec<u32>, SamplingParams)> {
    (1..=6u64)
        .map(|id| {
            let prompt = (0..3 + 5 * id as u32).map(|i| 1000 + id as u32 * 100 + i).collect();
            let params = SamplingParams {
                max_tokens: 4 + 3 * id as u32,
                temperature: 0.0,
                top_p: 1.0,
                top_k: -1,
                seed: id,
                stop_token_ids: vec![],
                ignore_eos: false,

                ..Default::default()
            };
            (id, prompt, params)
        })
        .collect()
}

/// Serves `requests()` to the end and stops; returns what each produced, and the worker's report.
fn serve(l: &Limits, slots: u32, overlap: bool) -> (HashMap<ReqId, (Vec<u32>, FinishReason)>, WorkerReport) {
    serve_spaced(l, slots, overlap, BurstWindow::default(), |_| Duration::ZERO)
}

/// `serve` through an engine with this burst window, with `gap(i)` between request i and the next.
fn serve_spaced(
    l: &Limits,
    slots: u32,
    overlap: bool,
    burst: BurstWindow,
    gap: impl Fn(usize) -> Duration,
) -> (HashMap<ReqId, (Vec<u32>, FinishReason)>, WorkerReport) {
    let b = Behaviour { grace: Duration::from_millis(5), fail_at: None, logprobs: false };
    let mut r = start_with(l, slots, overlap, b, burst);
    for (i, (id, prompt, params)) in requests().into_iter().enumerate() {
        r.commands.send(Command::Submit(NewRequest { id, prompt, params })).unwrap();
        std::thread::sleep(gap(i));
    }
    let mut ended = HashMap::new();
    let mut tokens: HashMap<ReqId, Vec<u32>> = HashMap::new();
    while ended.len() < requests().len() {
        let Output::Events { events, .. } = next_output(&mut r.outputs) else { panic!("the engine failed") };
        for e in events {
            assert!(!ended.contains_key(&e.id()), "{e:?} after the request ended");
            if let Event::Token { id, token, .. } = e {
                tokens.entry(id).or_default().push(token);
            }
            if let Some(reason) = e.finish() {
                ended.insert(e.id(), (tokens.remove(&e.id()).unwrap_or_default(), reason));
            }
        }
    }
    r.commands.send(Command::Shutdown).unwrap();
    r.engine.join().unwrap();
    let report = r.worker.take().unwrap().join().unwrap();
    (ended, report)
}

fn check_outputs(l: &Limits, ended: &HashMap<ReqId, (Vec<u32>, FinishReason)>) {
    for (id, prompt, params) in requests() {
        let want = reference_output(&prompt, &params, l, hash_model);
        assert_eq!(ended[&id], want, "request {id}");
    }
}

#[test]
fn with_overlap_the_worker_holds_the_next_step_while_it_runs_one() {
    let l = limits(4, 32, 64, 4, 256);
    let (ended, report) = serve(&l, 4, true);
    check_outputs(&l, &ended);
    assert_eq!(report.max_in_flight, MAX_IN_FLIGHT);
    assert!(report.got_shutdown, "the worker was told to stop");
}

#[test]
fn without_overlap_one_step_is_in_flight_and_the_outputs_are_the_same() {
    let l = limits(4, 32, 64, 4, 256);
    let (ended, report) = serve(&l, 4, false);
    check_outputs(&l, &ended);
    assert_eq!(report.max_in_flight, 1);
    assert!(report.got_shutdown);
    let (overlapped, _) = serve(&l, 4, true);
    assert_eq!(ended, overlapped);
}

/// Requests that reach an idle engine closer together than the burst gap start together: the first step
/// prefills all six. (Windows far wider than the default's 200 us, so that a loaded machine cannot stretch the
/// sender's sleeps past them.)
#[test]
fn a_burst_of_requests_is_prefilled_in_one_step() {
    let l = limits(8, 256, 128, 4, 256);
    let burst = BurstWindow { gap: Duration::from_millis(200), max: Duration::from_secs(2) };
    let (ended, report) = serve_spaced(&l, 4, true, burst, |_| Duration::from_millis(2));
    check_outputs(&l, &ended);
    assert_eq!(report.first_step_reqs, Some(requests().len() as u32));
}

/// A request that arrives after the burst gap does not hold the one before it back.
#[test]
fn a_lone_request_is_not_held_for_company() {
    let l = limits(8, 256, 128, 4, 256);
    let burst = BurstWindow { gap: Duration::from_millis(5), max: Duration::from_millis(10) };
    let (ended, report) = serve_spaced(&l, 4, true, burst, |i| Duration::from_millis(if i == 0 { 200 } else { 0 }));
    check_outputs(&l, &ended);
    assert_eq!(report.first_step_reqs, Some(1));
}

/// One slot per ring: the engine cannot publish N+1 until the worker hands N's slot back, nor read a second
/// result before releasing the first. Polling both rings is what keeps this from deadlocking.
#[test]
fn rings_of_one_slot_still_overlap_without_deadlock() {
    let l = limits(4, 32, 64, 4, 256);
    let (ended, report) = serve(&l, 1, true);
    check_outputs(&l, &ended);
    assert_eq!(report.max_in_flight, MAX_IN_FLIGHT, "the worker copies a step out and releases its slot at once");
    assert!(report.got_shutdown);
}

#[test]
fn a_failed_step_ends_the_requests_of_both_steps_in_flight_once() {
    let l = limits(4, 32, 64, 4, 256);
    let mut r = start(&l, 4, true, Behaviour { grace: Duration::from_millis(5), fail_at: Some(3), logprobs: false });
    for (id, prompt, params) in requests() {
        r.commands.send(Command::Submit(NewRequest { id, prompt, params })).unwrap();
    }
    let mut ended = HashMap::new();
    let why = loop {
        match next_output(&mut r.outputs) {
            Output::Events { events, .. } => {
                for e in events {
                    if let Some(reason) = e.finish() {
                        assert!(ended.insert(e.id(), reason).is_none(), "{e:?}: ended twice");
                    }
                }
            }
            Output::Failed(why) => break why,
        }
    };
    assert!(why.contains("failed step 3"), "{why}");
    assert!(ended.values().any(|&reason| reason == FinishReason::Error));
    r.engine.join().unwrap();
    let report = r.worker.take().unwrap().join().unwrap();
    assert_eq!(report.answered, 4);
}

/// The logprobs of the requests that asked reach the server with their tokens, cut to the top entries each asked
/// for; requests that did not ask get none, in the same steps.
#[test]
fn logprobs_come_with_the_tokens_of_the_requests_that_asked() {
    let l = limits(4, 32, 64, 4, 256);
    let mut r = start(&l, 4, true, Behaviour { grace: Duration::from_millis(5), fail_at: None, logprobs: true });
    // Even ids ask: 2 for one top entry, 4 for none, 6 for both; odd ids do not ask.
    let asked = |id: ReqId| match id {
        2 => Some(1),
        4 => Some(0),
        6 => Some(2),
        _ => None,
    };
    for (id, prompt, params) in requests() {
        let params = SamplingParams { logprobs: asked(id), ..params };
        r.commands.send(Command::Submit(NewRequest { id, prompt, params })).unwrap();
    }
    let (mut ended, mut with_logprobs) = (0, HashMap::<ReqId, usize>::new());
    while ended < requests().len() {
        let Output::Events { events, logprobs } = next_output(&mut r.outputs) else { panic!("the engine failed") };
        let mut entries = logprobs.tokens.into_iter();
        for e in events {
            if let Event::Token { id, token, logprobs: at, .. } = e {
                assert_eq!(at.map(|a| a.top), asked(id), "request {id}");
                if at.is_some() {
                    let lp = entries.next().expect("an entry for each token that asked");
                    assert_eq!(lp.logprob, -(token as f32));
                    let want = [(token, -(token as f32)), (token + 1, -(token as f32) - 1.0)];
                    assert_eq!(lp.top, want[..asked(id).unwrap() as usize]);
                    *with_logprobs.entry(id).or_default() += 1;
                }
            }
            ended += usize::from(e.finish().is_some());
        }
        assert!(entries.next().is_none(), "one entry per token that asked, no more");
    }
    let mut ids: Vec<ReqId> = with_logprobs.keys().copied().collect();
    ids.sort_unstable();
    assert_eq!(ids, [2, 4, 6]);
    r.commands.send(Command::Shutdown).unwrap();
    r.engine.join().unwrap();
}

/// The prompt logprobs of the requests that asked reach the server in prompt order, each position once over the
/// prompt's chunks, cut to the top entries each asked for; requests that did not ask get none.
#[test]
fn prompt_logprobs_reach_the_server_in_prompt_order_over_the_chunks() {
    // Steps of 16 tokens: the longer prompts (up to 33 tokens) are prefilled in chunks.
    let l = limits(4, 16, 64, 4, 256);
    let mut r = start(&l, 4, true, Behaviour { grace: Duration::from_millis(5), fail_at: None, logprobs: false });
    let asked = |id: ReqId| match id {
        2 => Some(1),
        5 => Some(0),
        6 => Some(2),
        _ => None,
    };
    let prompts: HashMap<ReqId, Vec<u32>> = requests().into_iter().map(|(id, prompt, _)| (id, prompt)).collect();
    for (id, prompt, params) in requests() {
        let params = SamplingParams { prompt_logprobs: asked(id), ..params };
        r.commands.send(Command::Submit(NewRequest { id, prompt, params })).unwrap();
    }
    let (mut ended, mut got) = (0, HashMap::<ReqId, Vec<TokenLogprobs>>::new());
    while ended < requests().len() {
        let Output::Events { events, logprobs } = next_output(&mut r.outputs) else { panic!("the engine failed") };
        let mut entries = logprobs.prompt.into_iter();
        for e in events {
            if let Event::PromptLogprobs { id, count, top, .. } = e {
                assert_eq!(Some(top), asked(id), "request {id}");
                got.entry(id).or_default().extend(entries.by_ref().take(count as usize));
            }
            ended += usize::from(e.finish().is_some());
        }
        assert!(entries.next().is_none(), "one entry per position asked, no more");
    }
    let mut ids: Vec<ReqId> = got.keys().copied().collect();
    ids.sort_unstable();
    assert_eq!(ids, [2, 5, 6]);
    for (id, entries) in got {
        let prompt = &prompts[&id];
        let k = asked(id).unwrap() as usize;
        let want: Vec<TokenLogprobs> = (1..prompt.len())
            .map(|p| {
                let t = prompt[p];
                let top = [(t, -(t as f32)), (p as u32 - 1, -(p as f32 - 1.0))];
                TokenLogprobs { logprob: -(t as f32), top: top[..k].to_vec() }
            })
            .collect();
        assert_eq!(entries, want, "request {id}");
    }
    r.commands.send(Command::Shutdown).unwrap();
    r.engine.join().unwrap();
}

/// The engine notices a dead worker while it has nothing to do. The "worker" is a child process whose pid is in
/// the ring headers; killing it is the death.
#[test]
fn a_dead_worker_is_noticed_while_idle() {
    let l = limits(4, 32, 64, 4, 256);
    let prefix = unique_prefix();
    let (step_ring, result_ring) = rings(&prefix, &l, 4);
    let mut child = std::process::Command::new("sleep").arg("60").spawn().unwrap();
    step_ring.attach_reader(0, child.id());
    result_ring.attach_writer(child.id());
    let (_commands, command_rx) = std::sync::mpsc::channel();
    let (output_tx, mut outputs) = tokio::sync::mpsc::unbounded_channel();
    let engine = Engine {
        core: Core::new(l.clone()).unwrap(),
        step_ring,
        result_ring,
        commands: command_rx,
        outputs: output_tx,
        burst: BurstWindow::default(),
        metrics: Default::default(),
        masks: None,
    };
    let engine = engine.spawn_with(true).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    assert!(outputs.try_recv().is_err(), "an idle engine with a live worker says nothing");
    child.kill().unwrap();
    child.wait().unwrap();
    let started = Instant::now();
    let Output::Failed(why) = next_output(&mut outputs) else { panic!("events from an idle engine") };
    assert!(why.contains("gone"), "{why}");
    assert!(started.elapsed() < Duration::from_secs(2), "noticed within a few idle ticks");
    engine.join().unwrap();
}
