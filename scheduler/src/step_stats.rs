//! What the worker spent on each kind of step, as the engine sees it: logged when the engine stops, so a
//! benchmark run says where its time went (prefill or decode, how many steps, how full).

use proto::step::StepKind;
use std::fmt;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct KindStats {
    pub steps: u64,
    pub requests: u64,
    pub tokens: u64,
    /// Time the worker spent on these steps: from when a step could start (published, and the step ahead of it
    /// answered) to when it was answered.
    pub busy: Duration,
}

#[derive(Default)]
pub struct StepStats {
    pub extend: KindStats,
    pub decode: KindStats,
    last_answer: Option<Instant>,
}

impl StepStats {
    /// Records a step answered now that was published at `published`; returns the time the worker spent on it.
    pub fn answered(&mut self, kind: StepKind, published: Instant, requests: usize, tokens: u32) -> Duration {
        let now = Instant::now();
        // With two steps in flight the second one starts on the worker when the first is answered.
        let started = self.last_answer.map_or(published, |last| last.max(published));
        self.last_answer = Some(now);
        let stats = if kind == StepKind::Decode { &mut self.decode } else { &mut self.extend };
        stats.steps += 1;
        stats.requests += requests as u64;
        stats.tokens += u64::from(tokens);
        stats.busy += now - started;
        now - started
    }
}

impl fmt::Display for KindStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let per_step = |x: u64| x as f64 / self.steps.max(1) as f64;
        write!(
            f,
            "{} steps, {:.1} requests and {:.1} tokens each, {:.3} ms each ({:.2} s in all)",
            self.steps,
            per_step(self.requests),
            per_step(self.tokens),
            self.busy.as_secs_f64() * 1e3 / self.steps.max(1) as f64,
            self.busy.as_secs_f64()
        )
    }
}

impl fmt::Display for StepStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "extend: {}; decode: {}", self.extend, self.decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipelined_step_counts_from_the_answer_ahead_of_it() {
        let mut stats = StepStats::default();
        let t0 = Instant::now();
        stats.answered(StepKind::Extend, t0, 2, 100);
        std::thread::sleep(Duration::from_millis(20));
        // Published long ago (it waited behind the first): only the time since the first answer counts.
        stats.answered(StepKind::Decode, t0, 2, 2);
        assert_eq!((stats.extend.steps, stats.decode.steps, stats.decode.tokens), (1, 1, 2));
        assert!(stats.decode.busy >= Duration::from_millis(20));
        assert!(stats.decode.busy < stats.extend.busy + Duration::from_millis(200));
        assert!(stats.to_string().starts_with("extend: 1 steps, 2.0 requests and 100.0 tokens each"));
    }
}
