//! How the two sides wait for each other without burning a core, and how they tell a slow peer from a dead one.

use super::RingError;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Spinning longer than a few tens of microseconds only pays when both sides spin on purpose (benchmarks).
pub const DEFAULT_SPIN: Duration = Duration::from_micros(50);
const YIELD_FOR: Duration = Duration::from_micros(200);
const FIRST_SLEEP: Duration = Duration::from_micros(20);
const MAX_SLEEP: Duration = Duration::from_millis(1);
/// A sleep is at most this fraction of the wait so far, so a wake-up adds at most ~6% to any wait: a 3 ms prefill
/// is noticed within ~0.2 ms of its end rather than up to 1 ms after it, while a long idle spell still ends in
/// 1 ms naps.
const SLEEP_FRACTION: u32 = 16;
/// A liveness check costs a syscall and a /proc read: a few per 10 ms is plenty to notice a death promptly.
const CHECK_EVERY: Duration = Duration::from_millis(2);
/// Linux lets a sleeping thread wake up to its timer slack late, 50 us unless asked otherwise, and that would be
/// added to every nap: a 20 us sleep took ~90 us on a development machine, ~40 with 1 us of slack. A thread that
/// sleeps in a ring wait asks for this much (the worker's waits do the same).
pub const TIMER_SLACK_NS: u64 = 1_000;

/// Escalating waits for one wait episode: spin, then yield, then sleep in steps that double up to 1 ms (and up to
/// a sixteenth of the wait so far).
#[derive(Debug)]
pub struct Backoff {
    spin: Duration,
    started: Option<Instant>,
    sleep: Duration,
    last_check: Option<Instant>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    pub fn new() -> Self {
        Self::with_spin(DEFAULT_SPIN)
    }

    /// Spins for `spin` before yielding; `Duration::MAX` spins for ever (latency measurements).
    pub fn with_spin(spin: Duration) -> Self {
        Backoff { spin, started: None, sleep: FIRST_SLEEP, last_check: None }
    }

    /// Starts a new wait episode (call after the awaited thing happened).
    pub fn reset(&mut self) {
        self.started = None;
        self.sleep = FIRST_SLEEP;
        self.last_check = None;
    }

    /// Waits a little, longer the longer this episode has lasted. Returns true when the caller should check its
    /// peers' liveness (and deadline) now: at the end of the spin phase, then every few milliseconds.
    pub fn snooze(&mut self) -> bool {
        let now = Instant::now();
        let started = *self.started.get_or_insert(now);
        let waited = now - started;
        if waited < self.spin {
            for _ in 0..32 {
                std::hint::spin_loop();
            }
            return false;
        }
        if waited < self.spin.saturating_add(YIELD_FOR) {
            std::thread::yield_now();
        } else {
            precise_sleeps();
            std::thread::sleep(self.sleep);
            let fraction = (waited / SLEEP_FRACTION).max(FIRST_SLEEP);
            self.sleep = (self.sleep * 2).min(MAX_SLEEP).min(fraction);
        }
        let due = self.last_check.is_none_or(|t| now - t >= CHECK_EVERY);
        if due {
            self.last_check = Some(now);
        }
        due
    }
}

/// Sets this thread's timer slack to [`TIMER_SLACK_NS`], once per thread.
fn precise_sleeps() {
    thread_local!(static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    DONE.with(|done| {
        if !done.replace(true) {
            set_timer_slack(TIMER_SLACK_NS);
        }
    });
}

#[cfg(target_os = "linux")]
fn set_timer_slack(ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer and changes only this thread's timer slack. A failure
    // leaves the slack as it was: the naps are then just less precise.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, ns as libc::c_ulong, 0, 0, 0) };
}

#[cfg(not(target_os = "linux"))]
fn set_timer_slack(_ns: u64) {}

/// When a waiting side gives up. The peers themselves are found in the ring header (their pids and heartbeats),
/// so this only says how patient to be.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Liveness {
    /// Give up with [`RingError::Timeout`] after this instant.
    pub deadline: Option<Instant>,
    /// Declare a peer dead when its heartbeat is older than this. `None` trusts the pid alone, which is the safer
    /// choice while the peer may be busy for long stretches (a first forward pass, a CUDA graph capture).
    pub heartbeat_timeout: Option<Duration>,
}

impl Liveness {
    /// Waits as long as the peer process exists.
    pub const fn pid_only() -> Self {
        Liveness { deadline: None, heartbeat_timeout: None }
    }

    /// Waits at most `timeout` from now (and only while the peer lives).
    pub fn timeout(timeout: Duration) -> Self {
        Liveness { deadline: Instant::now().checked_add(timeout), heartbeat_timeout: None }
    }

    pub fn with_heartbeat_timeout(self, heartbeat_timeout: Duration) -> Self {
        Liveness { heartbeat_timeout: Some(heartbeat_timeout), ..self }
    }

    pub(crate) fn check_deadline(&self) -> Result<(), RingError> {
        match self.deadline {
            Some(d) if Instant::now() >= d => Err(RingError::Timeout),
            _ => Ok(()),
        }
    }

    /// Checks one peer: `who` names it in the error. A pid of 0 means not attached yet, which is not a death.
    pub(crate) fn check_peer(&self, who: &str, pid: u32, heartbeat_ms: u64) -> Result<(), RingError> {
        if pid == 0 {
            return Ok(());
        }
        if !process_alive(pid) {
            return Err(RingError::PeerDead { who: who.to_string(), pid });
        }
        if let (Some(limit), true) = (self.heartbeat_timeout, heartbeat_ms != 0) {
            let age_ms = unix_ms().saturating_sub(heartbeat_ms);
            if u128::from(age_ms) > limit.as_millis() {
                return Err(RingError::HeartbeatStale { who: who.to_string(), pid, age_ms });
            }
        }
        Ok(())
    }
}

/// Unix time in milliseconds, the unit of the header's heartbeats.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Whether `pid` names a running process. A zombie counts as dead: a peer that is our own child stays a zombie
/// until reaped, and `kill(pid, 0)` alone would call it alive for ever.
pub fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    !is_zombie(pid)
}

fn is_zombie(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the command name, which is in parentheses and may itself contain ") ".
        Ok(stat) => stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with(['Z', 'X'])),
        // No /proc (not Linux): kill's answer stands. A vanished entry means it exited in between.
        Err(e) => e.kind() == std::io::ErrorKind::NotFound && std::path::Path::new("/proc/self").exists(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(process_alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!process_alive(pid));
        assert!(!process_alive(0));
        assert!(!process_alive(u32::MAX));
    }

    #[test]
    fn an_unreaped_child_counts_as_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let t = Instant::now();
        while process_alive(pid) {
            assert!(t.elapsed() < Duration::from_secs(10), "exited child still looks alive");
            std::thread::sleep(Duration::from_millis(5));
        }
        child.wait().unwrap();
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_thread_that_sleeps_in_a_wait_asks_for_precise_wakeups() {
        let slack = || unsafe { libc::prctl(libc::PR_GET_TIMERSLACK, 0, 0, 0, 0) } as u64;
        std::thread::spawn(move || {
            // A new thread inherits its creator's slack, which an earlier wait may have set.
            set_timer_slack(50_000);
            assert_eq!(slack(), 50_000);
            let mut b = Backoff::with_spin(Duration::ZERO);
            let t = Instant::now();
            while t.elapsed() < YIELD_FOR + Duration::from_millis(1) {
                b.snooze();
            }
            assert_eq!(slack(), TIMER_SLACK_NS);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn backoff_spins_then_sleeps_and_asks_for_checks() {
        let mut b = Backoff::with_spin(Duration::from_millis(2));
        let t = Instant::now();
        let mut checks = 0;
        while t.elapsed() < Duration::from_millis(30) {
            if b.snooze() {
                checks += 1;
            }
        }
        // One check when the spin ends, then one every 2 ms at most.
        assert!((1..=16).contains(&checks), "{checks} checks");
        assert_eq!(b.sleep, MAX_SLEEP);
        b.reset();
        assert!(!b.snooze(), "a new episode spins first");
    }

    #[test]
    fn a_sleep_stays_under_a_sixteenth_of_the_wait_so_far() {
        let mut b = Backoff::with_spin(Duration::ZERO);
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(3) {
            b.snooze();
        }
        // The doubling alone would be at 1 ms by now (20 us doubled six times, past the 200 us of yields).
        assert!(b.sleep <= t.elapsed() / SLEEP_FRACTION, "{:?} after {:?}", b.sleep, t.elapsed());
        assert!(b.sleep >= FIRST_SLEEP);
    }

    #[test]
    fn stale_heartbeat_is_a_death_only_when_asked() {
        let me = std::process::id();
        let old = unix_ms() - 5_000;
        assert!(Liveness::pid_only().check_peer("writer", me, old).is_ok());
        let strict = Liveness::pid_only().with_heartbeat_timeout(Duration::from_secs(1));
        assert!(matches!(strict.check_peer("writer", me, old), Err(RingError::HeartbeatStale { .. })));
        assert!(strict.check_peer("writer", me, unix_ms()).is_ok());
        assert!(strict.check_peer("writer", me, 0).is_ok(), "no heartbeat yet");
        assert!(strict.check_peer("writer", 0, old).is_ok(), "not attached yet");
    }

    #[test]
    fn deadline_expires() {
        assert!(Liveness::timeout(Duration::from_secs(60)).check_deadline().is_ok());
        assert!(matches!(Liveness::timeout(Duration::ZERO).check_deadline(), Err(RingError::Timeout)));
        assert!(Liveness::pid_only().check_deadline().is_ok());
    }
}
