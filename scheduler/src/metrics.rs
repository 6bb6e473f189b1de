//! What an operator scrapes from `GET /metrics` (docs/operations.md lists every series): requests by outcome,
//! the queue and the running batch, KV pages, the prefix cache, tokens, step times, and the latencies clients
//! feel.
//!
//! Each number is recorded where it happens: the hub (on the serve loop) counts requests and tokens and times
//! them, the engine thread sets the queue and page gauges and times steps. The metrics are atomics and
//! short-locked histograms behind one `Arc`, so recording needs no channel and no await.

use crate::core::CacheStats;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use proto::step::StepKind;
use std::time::Duration;

/// How a request ended, as the `outcome` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Stop,
    Length,
    Abort,
    Error,
    /// Refused before it reached the engine (invalid, too long, duplicate, shutting down).
    Rejected,
    /// Refused because the waiting queue was full (`--max-waiting`): load shed, not a client's mistake.
    Overloaded,
    /// Ended because the KV cache could not hold it (finish reason `memory`).
    Memory,
}

impl Outcome {
    const ALL: [Outcome; 7] = [
        Outcome::Stop,
        Outcome::Length,
        Outcome::Abort,
        Outcome::Error,
        Outcome::Rejected,
        Outcome::Overloaded,
        Outcome::Memory,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Stop => "stop",
            Outcome::Length => "length",
            Outcome::Abort => "abort",
            Outcome::Error => "error",
            Outcome::Rejected => "rejected",
            Outcome::Overloaded => "overloaded",
            Outcome::Memory => "memory",
        }
    }
}

type Labels = [(&'static str, &'static str); 1];

pub struct Metrics {
    registry: Registry,
    requests: [Counter; Outcome::ALL.len()],
    pub waiting: Gauge,
    pub running: Gauge,
    pub kv_pages_used: Gauge,
    pub kv_pages_free: Gauge,
    cache_prompt_tokens: Counter,
    cache_cached_tokens: Counter,
    cache_pages: Gauge,
    cache_evictable_pages: Gauge,
    pub prompt_tokens: Counter,
    pub generated_tokens: Counter,
    extend_steps: Histogram,
    decode_steps: Histogram,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_latency: Histogram,
    resident_memory: Gauge,
}

// Bucket bounds in seconds, spanning what a 0.5B model on an H200 and a CPU in CI both produce.
const TTFT_BUCKETS: [f64; 18] =
    [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0];
const ITL_BUCKETS: [f64; 17] =
    [0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5];
const REQUEST_BUCKETS: [f64; 16] =
    [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0];
const STEP_BUCKETS: [f64; 14] =
    [0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 4.096];

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("minisgl");
        let requests = Family::<Labels, Counter>::default();
        registry.register("requests", "Requests that ended, by outcome", requests.clone());
        let steps = Family::<Labels, Histogram>::new_with_constructor(|| Histogram::new(STEP_BUCKETS));
        registry.register("step_duration_seconds", "Time the worker spent on a step, by kind", steps.clone());

        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let histogram = |registry: &mut Registry, name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::new(buckets.iter().copied());
            registry.register(name, help, h.clone());
            h
        };
        // `get_or_create` hands back a lock guard: each handle is cloned out of it in a statement of its own, so
        // that no guard is still held when the next one is asked for.
        let requests = Outcome::ALL.map(|o| requests.get_or_create(&[("outcome", o.label())]).clone());
        let extend_steps = steps.get_or_create(&[("kind", "extend")]).clone();
        let decode_steps = steps.get_or_create(&[("kind", "decode")]).clone();
        Metrics {
            requests,
            waiting: gauge(&mut registry, "requests_waiting", "Requests queued for their first step"),
            running: gauge(&mut registry, "requests_running", "Requests in the running batch"),
            kv_pages_used: gauge(&mut registry, "kv_pages_used", "KV-cache pages held by requests"),
            kv_pages_free: gauge(&mut registry, "kv_pages_free", "KV-cache pages free"),
            cache_prompt_tokens: counter(
                &mut registry,
                "prefix_cache_prompt_tokens",
                "Prompt tokens of every admission to the batch, re-admissions after a preemption included",
            ),
            cache_cached_tokens: counter(
                &mut registry,
                "prefix_cache_cached_tokens",
                "Of those prompt tokens, the ones found in the prefix cache instead of prefilled",
            ),
            cache_pages: gauge(&mut registry, "prefix_cache_pages", "KV pages held by the prefix cache"),
            cache_evictable_pages: gauge(
                &mut registry,
                "prefix_cache_evictable_pages",
                "Prefix-cache pages no running request uses: evicted first when pages run out",
            ),
            prompt_tokens: counter(&mut registry, "prompt_tokens", "Prompt tokens of admitted requests"),
            generated_tokens: counter(&mut registry, "generation_tokens", "Tokens generated"),
            extend_steps,
            decode_steps,
            time_to_first_token: histogram(
                &mut registry,
                "time_to_first_token_seconds",
                "From a request's admission to its first token",
                &TTFT_BUCKETS,
            ),
            inter_token_latency: histogram(
                &mut registry,
                "inter_token_latency_seconds",
                "Between consecutive tokens of a request",
                &ITL_BUCKETS,
            ),
            request_latency: histogram(
                &mut registry,
                "e2e_request_latency_seconds",
                "From a request's admission to its end",
                &REQUEST_BUCKETS,
            ),
            resident_memory: gauge(
                &mut registry,
                "process_resident_memory_bytes",
                "The scheduler's resident memory (VmRSS), read when scraped",
            ),
            registry,
        }
    }
}

impl Metrics {
    pub fn request_ended(&self, outcome: Outcome) {
        self.requests[outcome as usize].inc();
    }

    pub fn step_answered(&self, kind: StepKind, busy: Duration) {
        let histogram = if kind == StepKind::Decode { &self.decode_steps } else { &self.extend_steps };
        histogram.observe(busy.as_secs_f64());
    }

    /// The queue and the pages after a step or a command changed them.
    pub fn set_load(&self, waiting: usize, running: usize, pages_free: u32, pages_total: u32) {
        self.waiting.set(waiting as i64);
        self.running.set(running as i64);
        self.kv_pages_free.set(i64::from(pages_free));
        self.kv_pages_used.set(i64::from(pages_total.saturating_sub(pages_free)));
    }

    /// The prefix cache's totals and size, as the core reports them. Its counters are totals since the start,
    /// and the engine thread is their only writer: each report adds what grew since the last.
    pub fn set_cache(&self, stats: &CacheStats) {
        let grow = |counter: &Counter, total: u64| counter.inc_by(total.saturating_sub(counter.get()));
        grow(&self.cache_prompt_tokens, stats.prompt_tokens);
        grow(&self.cache_cached_tokens, stats.cached_tokens);
        self.cache_pages.set(i64::from(stats.cached_pages));
        self.cache_evictable_pages.set(i64::from(stats.evictable_pages));
    }

    /// KV pages that requests hold. The free ones include the prefix cache's evictable pages (the core hands
    /// them out when the pool runs dry), so the used ones are exactly those held: by a request alone, or by
    /// the cache and a request that shares them.
    pub fn held_pages(&self) -> i64 {
        self.kv_pages_used.get()
    }

    /// The exposition in Prometheus' text format (OpenMetrics 1.0).
    pub fn render(&self) -> String {
        // Read at the scrape, not kept up to date: nothing else needs it, and a soak test samples it here.
        if let Some(bytes) = resident_memory_bytes() {
            self.resident_memory.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// This process's resident memory, from `/proc/self/status`; None where there is no procfs (not Linux).
fn resident_memory_bytes() -> Option<u64> {
    vm_rss_bytes(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// The `VmRSS:` line of a `/proc/<pid>/status` text, in bytes (the kernel writes it in kB).
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// The content type of [`Metrics::render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("{series} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse().unwrap()
    }

    #[test]
    fn the_exposition_names_every_series_and_moves_with_what_is_recorded() {
        let m = Metrics::default();
        let before = m.render();
        assert_eq!(value(&before, "minisgl_requests_total{outcome=\"stop\"}"), 0.0);
        m.request_ended(Outcome::Stop);
        m.request_ended(Outcome::Rejected);
        m.set_load(3, 2, 90, 100);
        m.generated_tokens.inc_by(5);
        m.step_answered(StepKind::Decode, Duration::from_micros(1500));
        m.time_to_first_token.observe(0.03);
        let stats = CacheStats { prompt_tokens: 100, cached_tokens: 64, cached_pages: 7, evictable_pages: 3 };
        m.set_cache(&stats);
        m.set_cache(&CacheStats { prompt_tokens: 130, cached_tokens: 80, ..stats });
        m.request_ended(Outcome::Overloaded);
        let text = m.render();
        assert_eq!(value(&text, "minisgl_requests_total{outcome=\"stop\"}"), 1.0);
        assert_eq!(value(&text, "minisgl_requests_total{outcome=\"rejected\"}"), 1.0);
        assert_eq!(value(&text, "minisgl_requests_waiting "), 3.0);
        assert_eq!(value(&text, "minisgl_kv_pages_used "), 10.0);
        assert_eq!(value(&text, "minisgl_generation_tokens_total "), 5.0);
        assert_eq!(value(&text, "minisgl_step_duration_seconds_count{kind=\"decode\"}"), 1.0);
        assert_eq!(value(&text, "minisgl_step_duration_seconds_bucket{le=\"0.002\",kind=\"decode\"}"), 1.0);
        assert_eq!(value(&text, "minisgl_time_to_first_token_seconds_count "), 1.0);
        assert_eq!(value(&text, "minisgl_prefix_cache_prompt_tokens_total "), 130.0, "totals, not sums of them");
        assert_eq!(value(&text, "minisgl_prefix_cache_cached_tokens_total "), 80.0);
        assert_eq!(value(&text, "minisgl_prefix_cache_pages "), 7.0);
        assert_eq!(value(&text, "minisgl_prefix_cache_evictable_pages "), 3.0);
        assert_eq!(value(&text, "minisgl_requests_total{outcome=\"overloaded\"}"), 1.0);
        assert!(text.ends_with("# EOF\n"));
        // 90 free pages of 100, 3 of them the cache's evictable ones: requests hold the other 10, not 7.
        assert_eq!(m.held_pages(), 10);
    }

    #[test]
    fn resident_memory_is_read_from_procfs_and_grows_with_what_the_process_touches() {
        let status = "Name:\tminisgl-sched\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t8\n";
        assert_eq!(vm_rss_bytes(status), Some(1234 * 1024));
        assert_eq!(vm_rss_bytes("Name:\tx\n"), None, "a kernel thread has no VmRSS line");
        assert_eq!(vm_rss_bytes("VmRSS:\t12 MB\n"), None, "an unknown unit is not guessed");

        let m = Metrics::default();
        let before = value(&m.render(), "minisgl_process_resident_memory_bytes ");
        assert!(before > 1e6, "a running test binary holds more than a MB: {before}");
        // 64 MiB written page by page become resident; the gauge is re-read at the next scrape.
        let touched = vec![1u8; 64 << 20];
        let after = value(&m.render(), "minisgl_process_resident_memory_bytes ");
        assert!(after - before > 48.0 * 1024.0 * 1024.0, "{before} -> {after}");
        assert_eq!(touched.iter().map(|&b| u64::from(b)).sum::<u64>(), 64 << 20);
    }
}
