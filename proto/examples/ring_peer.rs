//! The Rust half of tests/test_ring_cross_process.py: plays the scheduler against a Python peer.
//!
//! Usage: `ring_peer <name-prefix> <steps> [seed]`. Creates `<prefix>-step` and `<prefix>-result` (4 slots each,
//! so the writer really waits), prints one JSON line with their names, then publishes `steps` pseudo-random
//! steps followed by a shutdown step. The peer answers each step with a checksum per request plus three global
//! checksums (see `expected`); every answer is checked, in order. Exits 0 when all matched, 1 on a mismatch,
//! 2 when the peer died or stalled.

use proto::ring::{Backoff, Liveness, Ring, RingError, RingKind};
use proto::step::{
    Capacity, MAX_LOGIT_BIAS, ResultLayout, ResultRef, StepHeader, StepKind, StepLayout, StepMut, StepRef,
};
use std::collections::VecDeque;
use std::io::Write;
use std::time::{Duration, Instant};

const CAP: Capacity = Capacity { max_reqs: 8, max_tokens: 32, max_kv_indices: 24, mask_words: 0 };
/// The result ring holds R + 3 tokens: one checksum per request, then the three global ones.
const EXTRA: u32 = 3;
const SLOTS: u32 = 4;
const MOD: i64 = 1 << 31;

/// splitmix64: tiny, seeded, good enough to vary every field.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % u64::from(n)) as u32
    }
    /// A count in 0..=max, with both ends much more likely than uniform.
    fn count(&mut self, max: u32) -> u32 {
        match self.below(8) {
            0 => 0,
            1 => max,
            _ => self.below(max + 1),
        }
    }
    /// An indptr of n + 1 entries from 0 to total: random cut points, sorted (empty ranges allowed).
    fn indptr(&mut self, out: &mut [i32], n: usize, total: u32) {
        out[0] = 0;
        if n == 0 {
            return;
        }
        let mut cuts: Vec<i32> = (0..n - 1).map(|_| self.below(total + 1) as i32).collect();
        cuts.sort_unstable();
        out[1..n].copy_from_slice(&cuts);
        out[n] = total as i32;
    }
}

/// Fills the claimed slot with a random step: every array of the table gets random bits (NaNs included: the peer
/// checks bits, not values), then the indptrs are made consistent with the counts.
fn fill_step(rng: &mut Rng, s: &mut StepMut<'_>, step_id: u64) {
    let n = rng.count(CAP.max_reqs);
    let (t, k) = if n == 0 { (0, 0) } else { (rng.count(CAP.max_tokens), rng.count(CAP.max_kv_indices)) };
    let j = rng.count(CAP.max_reqs);
    let b = if j == 0 { 0 } else { rng.count(j * MAX_LOGIT_BIAS as u32) };
    let kind = if rng.below(2) == 0 { StepKind::Extend } else { StepKind::Decode };
    *s.header = StepHeader {
        step_id,
        kind: kind as u32,
        num_reqs: n,
        num_tokens: t,
        num_kv_indices: k,
        num_joins: j,
        num_bias: b,
        ..Default::default()
    };
    s.for_each_bytes_mut(|_, bytes| bytes.iter_mut().for_each(|x| *x = rng.next() as u8));
    rng.indptr(s.qo_indptr, n as usize, t);
    rng.indptr(s.kv_indptr, n as usize, k);
    rng.indptr(s.join_bias_indptr, j as usize, b);
}

/// What the peer must answer for the step just written: the same sums as `answer` in the Python test. One per
/// request over its tokens and pages (through the indptrs), then one over the used part of every array of the
/// table (so an array added on one side only, or read at another offset or length, fails), one over the header.
fn expected(s: &StepRef<'_>, seen_before: u64) -> Vec<i32> {
    let h = s.header;
    let n = h.num_reqs as usize;
    let w = |i: usize| i as i64 + 1;
    let mut out = Vec::with_capacity(n + EXTRA as usize);
    for r in 0..n {
        let (q0, q1) = (s.qo_indptr[r] as usize, s.qo_indptr[r + 1] as usize);
        let (k0, k1) = (s.kv_indptr[r] as usize, s.kv_indptr[r + 1] as usize);
        let mut sum: i64 = (q0..q1)
            .map(|i| {
                (i64::from(s.input_ids[i]) * 3 + i64::from(s.positions[i]) * 5 + i64::from(s.out_loc[i]) * 7) * w(i)
            })
            .sum();
        sum += (k0..k1).map(|i| i64::from(s.kv_indices[i]) * 11 * w(i)).sum::<i64>();
        sum += i64::from(s.req_slot[r]) * 13 + i64::from(s.seq_len[r]) * 17 + i64::from(s.kv_last_page_len[r]) * 19;
        out.push(sum.rem_euclid(MOD) as i32);
    }
    let arrays: i64 = s
        .bytes()
        .enumerate()
        .map(|(a, (_, bytes))| {
            let weight = 2 * a as i64 + 3;
            bytes
                .chunks_exact(4)
                .enumerate()
                .map(|(i, word)| i64::from(u32::from_le_bytes(word.try_into().unwrap())) % MOD * w(i) * weight)
                .sum::<i64>()
        })
        .sum();
    let header = i64::from(h.kind) * 3
        + i64::from(h.num_reqs) * 5
        + i64::from(h.num_tokens) * 7
        + i64::from(h.num_kv_indices) * 11
        + i64::from(h.num_joins) * 13
        + i64::from(h.num_bias) * 19
        + (h.step_id % MOD as u64) as i64 * 17;
    out.push(arrays.rem_euclid(MOD) as i32);
    out.push(header.rem_euclid(MOD) as i32);
    out.push(seen_before as i32);
    out
}

/// Why the run failed: the exit code (1 a wrong answer, 2 a dead or stalled peer or bad usage) and a message.
struct Failure(i32, String);

fn usage(e: impl std::fmt::Display) -> Failure {
    Failure(2, format!("usage: ring_peer <name-prefix> <steps> [seed]: {e}"))
}

fn main() {
    // Failures return rather than exit, so that the rings are dropped, and their segments unlinked, first.
    match run(std::env::args().skip(1).collect()) {
        Ok(summary) => println!("{summary}"),
        Err(Failure(code, msg)) => {
            eprintln!("ring_peer: {msg}");
            std::process::exit(code);
        }
    }
}

fn run(args: Vec<String>) -> Result<String, Failure> {
    let prefix = args.first().ok_or_else(|| usage("no prefix"))?;
    let steps: u64 = args.get(1).ok_or_else(|| usage("no step count"))?.parse().map_err(usage)?;
    let seed: u64 = args.get(2).map_or(Ok(1), |s| s.parse()).map_err(usage)?;
    let (step_name, result_name) = (format!("{prefix}-step"), format!("{prefix}-result"));
    let step_layout = StepLayout::new(CAP);
    let result_cap = Capacity { max_reqs: CAP.max_reqs + EXTRA, ..CAP };
    let result_layout = ResultLayout::new(result_cap);
    let ring_err = |e: RingError| Failure(2, e.to_string());
    let create =
        |name: &str, kind: RingKind, cap| Ring::create(name, kind, SLOTS, kind.min_slot_bytes(cap), cap, 16, 1);
    let mut step_ring = create(&step_name, RingKind::Step, CAP).map_err(ring_err)?;
    let mut result_ring = create(&result_name, RingKind::Result, result_cap).map_err(ring_err)?;
    step_ring.attach_writer(std::process::id());
    result_ring.attach_reader(0, std::process::id());
    println!(r#"{{"step_ring": "{step_name}", "result_ring": "{result_name}"}}"#);
    std::io::stdout().flush().map_err(|e| Failure(2, e.to_string()))?;

    // The peer may take a while to start (interpreter, imports): patience, but not for ever.
    let live = Liveness::timeout(Duration::from_secs(120));
    let mut rng = Rng(seed);
    let mut in_flight: VecDeque<(u64, Vec<i32>)> = VecDeque::new();
    let (mut sent, mut received, mut ring_full) = (0u64, 0u64, 0u64);
    let mut backoff = Backoff::new();
    let started = Instant::now();
    while received < steps {
        let mut progress = false;
        if sent < steps {
            match step_ring.try_claim() {
                Some(buf) => {
                    fill_step(&mut rng, &mut StepMut::new(&step_layout, buf), sent);
                    in_flight.push_back((sent, expected(&StepRef::new(&step_layout, buf), sent)));
                    step_ring.publish();
                    sent += 1;
                    progress = true;
                }
                None => ring_full += 1,
            }
        }
        if let Some(buf) = result_ring.try_read(0) {
            let r = ResultRef::new(&result_layout, buf);
            let (want_id, want) = in_flight.pop_front().ok_or(Failure(1, "a result for no step".into()))?;
            if r.header.step_id != want_id || r.header.status != 0 || r.tokens != want.as_slice() {
                let (id, status) = (r.header.step_id, r.header.status);
                let got = format!("got id {id} status {status} tokens {:?}, want {want:?}", r.tokens);
                return Err(Failure(1, format!("step {want_id}: {got}")));
            }
            result_ring.release(0);
            received += 1;
            progress = true;
        }
        if progress {
            backoff.reset();
        } else if backoff.snooze() {
            let alive = step_ring.check_readers(&live).and_then(|()| result_ring.check_writer(&live));
            // A peer may publish its last results between our read and its exit: take those before calling it gone.
            let unread = result_ring.read_seq(0) < result_ring.write_seq();
            if !unread {
                alive.map_err(|e| Failure(2, format!("after {received} of {steps} results: {e}")))?;
            }
        }
    }
    let buf = step_ring.wait_claim(&live).map_err(ring_err)?;
    *StepMut::new(&step_layout, buf).header =
        StepHeader { step_id: sent, kind: StepKind::Shutdown as u32, ..Default::default() };
    step_ring.publish();
    // Wait until the peer has taken the shutdown: a peer that is slow to start must still find the segments.
    let mut backoff = Backoff::new();
    while step_ring.read_seq(0) < step_ring.write_seq() {
        if backoff.snooze() {
            step_ring.check_readers(&live).map_err(ring_err)?;
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(format!(r#"{{"ok": true, "steps": {received}, "ring_full": {ring_full}, "seconds": {secs:.3}}}"#))
}
