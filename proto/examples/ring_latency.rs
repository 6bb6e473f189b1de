//! The Rust half of scripts/bench_ring.py: round-trip latency Rust -> Python -> Rust through the two rings.
//!
//! Usage: `ring_latency <name-prefix> <iterations> <warmup>`. Creates `<prefix>-step` and `<prefix>-result`,
//! prints one JSON line with their names, then for each iteration publishes a one-request decode step and spins
//! until the peer's result for it arrives. Prints a JSON line with percentiles (microseconds) at the end.

use proto::ring::{Liveness, Ring, RingKind};
use proto::step::{Capacity, ResultLayout, ResultRef, StepHeader, StepKind, StepLayout, StepMut};
use std::io::Write;
use std::time::{Duration, Instant};

const CAP: Capacity = Capacity { max_reqs: 256, max_tokens: 8192, max_kv_indices: 65536, mask_words: 0 };

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [prefix, iterations, warmup] = args.as_slice() else {
        return Err("usage: ring_latency <name-prefix> <iterations> <warmup>".into());
    };
    let (iterations, warmup): (usize, usize) = (iterations.parse()?, warmup.parse()?);
    let (step_name, result_name) = (format!("{prefix}-step"), format!("{prefix}-result"));
    let mut steps = Ring::create(&step_name, RingKind::Step, 4, RingKind::Step.min_slot_bytes(CAP), CAP, 16, 1)?;
    let mut results =
        Ring::create(&result_name, RingKind::Result, 4, RingKind::Result.min_slot_bytes(CAP), CAP, 16, 1)?;
    steps.attach_writer(std::process::id());
    results.attach_reader(0, std::process::id());
    println!(r#"{{"step_ring": "{step_name}", "result_ring": "{result_name}"}}"#);
    std::io::stdout().flush()?;

    let (step_layout, result_layout) = (StepLayout::new(CAP), ResultLayout::new(CAP));
    let live = Liveness::timeout(Duration::from_secs(60));
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..warmup + iterations {
        let step_id = steps.write_seq();
        let t0 = Instant::now();
        let s = StepMut::new(&step_layout, steps.wait_claim(&live)?);
        *s.header =
            StepHeader { step_id, kind: StepKind::Decode as u32, num_reqs: 1, num_tokens: 1, ..Default::default() };
        s.input_ids[0] = -1;
        steps.publish();
        let mut spins = 0u32;
        let token = loop {
            if let Some(buf) = results.try_read(0) {
                let r = ResultRef::new(&result_layout, buf);
                assert_eq!(r.header.step_id, step_id, "results out of order");
                break r.tokens[0];
            }
            std::hint::spin_loop();
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1 << 20) {
                results.check_writer(&live)?;
            }
        };
        let elapsed = t0.elapsed();
        results.release(0);
        assert_eq!(token as u64, step_id % (1 << 31), "wrong answer");
        if i >= warmup {
            samples.push(elapsed);
        }
    }
    let step_id = steps.write_seq();
    *StepMut::new(&step_layout, steps.wait_claim(&live)?).header =
        StepHeader { step_id, kind: StepKind::Shutdown as u32, ..Default::default() };
    steps.publish();
    while steps.read_seq(0) < steps.write_seq() {
        steps.check_readers(&live)?;
        std::thread::yield_now();
    }

    samples.sort_unstable();
    let us = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64 * 1e6;
    println!(
        r#"{{"iterations": {}, "p50_us": {:.2}, "p99_us": {:.2}, "p999_us": {:.2}, "max_us": {:.2}, "mean_us": {mean:.2}}}"#,
        samples.len(),
        us(0.5),
        us(0.99),
        us(0.999),
        us(1.0)
    );
    Ok(())
}
