//! Which ZeroMQ clients are still there. A ROUTER socket says nothing about a peer that stopped reading or whose
//! process froze, and the zeromq crate sees a TCP close only when the kernel does: a client that wants its
//! requests to outlive neither itself nor the scheduler opts in with `keepalive: true` on its `generate`. From
//! then on, while it has live requests, the scheduler sends it a `heartbeat` every [`INTERVAL`] (so the client
//! learns within [`TIMEOUT`] that the scheduler is gone), and expects any message from it, a `keepalive` at
//! least, within every [`TIMEOUT`]; a client silent for longer has its requests aborted.
//!
//! Plain logic over a clock the caller passes in, so that the unit tests run on a fake one; the serve loop
//! (`serve.rs`) does the I/O.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// How often a watched client gets a heartbeat, and how often it should send a keepalive.
pub const INTERVAL: Duration = Duration::from_millis(500);
/// A watched client silent for this long is gone: its requests are aborted.
pub const TIMEOUT: Duration = Duration::from_secs(2);
/// How often the serve loop looks: silence is noticed at most this late.
pub const TICK: Duration = Duration::from_millis(100);

/// The clients that asked for keepalive, keyed by whatever routes to them (their ZeroMQ routing frames).
pub struct Liveness<K> {
    interval: Duration,
    timeout: Duration,
    /// When each watched client was last heard from.
    heard: HashMap<K, Instant>,
    /// When the next heartbeats are due.
    next_beat: Option<Instant>,
}

/// What is due now.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Due<K> {
    /// Clients to send a heartbeat (those still watched and not gone).
    pub beat: Vec<K>,
    /// Clients silent for longer than the timeout, forgotten here: their requests are to be aborted.
    pub gone: Vec<K>,
}

impl<K: Hash + Eq + Clone> Liveness<K> {
    pub fn new(interval: Duration, timeout: Duration) -> Self {
        Liveness { interval, timeout, heard: HashMap::new(), next_beat: None }
    }

    /// `client` sent a `keepalive` request: watched from now on (a request is a sign of life too).
    pub fn watch(&mut self, client: K, now: Instant) {
        self.heard.insert(client, now);
        self.next_beat.get_or_insert(now + self.interval);
    }

    /// Any message from `client`; nothing happens unless it is watched.
    pub fn heard(&mut self, client: &K, now: Instant) {
        if let Some(at) = self.heard.get_mut(client) {
            *at = now;
        }
    }

    /// No longer watched: its requests all ended, or its connection closed.
    pub fn forget(&mut self, client: &K) {
        self.heard.remove(client);
    }

    /// Forgets every client `gone` says is gone.
    pub fn forget_where(&mut self, mut gone: impl FnMut(&K) -> bool) {
        self.heard.retain(|k, _| !gone(k));
    }

    pub fn watched(&self) -> usize {
        self.heard.len()
    }

    /// What is due at `now`: the clients silent past the timeout (forgotten here), and, when the interval has
    /// passed, every other watched client for a heartbeat.
    pub fn tick(&mut self, now: Instant) -> Due<K> {
        let mut due = Due { beat: Vec::new(), gone: Vec::new() };
        let timeout = self.timeout;
        self.heard.retain(|k, at| {
            let silent = now.saturating_duration_since(*at) > timeout;
            if silent {
                due.gone.push(k.clone());
            }
            !silent
        });
        match self.next_beat {
            _ if self.heard.is_empty() => self.next_beat = None,
            Some(at) if now >= at => {
                due.beat.extend(self.heard.keys().cloned());
                // Not `at + interval`: after a stall the beats resume at their pace instead of bunching up.
                self.next_beat = Some(now + self.interval);
            }
            Some(_) => {}
            None => self.next_beat = Some(now + self.interval),
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn sorted(mut v: Vec<&'static str>) -> Vec<&'static str> {
        v.sort_unstable();
        v
    }

    #[test]
    fn a_watched_client_gets_a_heartbeat_each_interval_and_nothing_before() {
        let t0 = Instant::now();
        let mut l = Liveness::new(INTERVAL, TIMEOUT);
        assert_eq!(l.tick(t0), Due::default(), "nobody watched");
        l.watch("a", t0);
        assert_eq!(l.tick(t0 + ms(100)), Due::default());
        assert_eq!(l.tick(t0 + ms(500)).beat, ["a"]);
        assert_eq!(l.tick(t0 + ms(900)), Due::default());
        l.heard(&"a", t0 + ms(900));
        assert_eq!(l.tick(t0 + ms(1000)).beat, ["a"]);
    }

    #[test]
    fn a_client_silent_past_the_timeout_is_gone_once_and_others_are_not() {
        let t0 = Instant::now();
        let mut l = Liveness::new(INTERVAL, TIMEOUT);
        l.watch("quiet", t0);
        l.watch("talker", t0);
        let mut now = t0;
        while now < t0 + ms(2000) {
            now += ms(100);
            l.heard(&"talker", now);
            assert!(l.tick(now).gone.is_empty(), "at {:?} nobody has been silent for 2 s", now - t0);
        }
        assert_eq!(l.tick(t0 + ms(2001)).gone, ["quiet"]);
        assert_eq!(l.tick(t0 + ms(2500)).beat, ["talker"], "the other is still watched");
        assert!(l.tick(t0 + ms(9000)).gone == ["talker"], "the quiet one was reported once");
        assert_eq!(l.watched(), 0);
    }

    #[test]
    fn messages_from_unwatched_clients_do_not_watch_them() {
        let t0 = Instant::now();
        let mut l = Liveness::new(INTERVAL, TIMEOUT);
        l.heard(&"stranger", t0);
        assert_eq!(l.watched(), 0);
        assert_eq!(l.tick(t0 + ms(5000)), Due::default());
    }

    #[test]
    fn a_forgotten_client_is_neither_beaten_nor_reported() {
        let t0 = Instant::now();
        let mut l = Liveness::new(INTERVAL, TIMEOUT);
        for k in ["a", "b", "c"] {
            l.watch(k, t0);
        }
        l.forget(&"a");
        l.forget_where(|k| k.starts_with('b'));
        assert_eq!(sorted(l.tick(t0 + ms(600)).beat), ["c"]);
        assert_eq!(l.tick(t0 + ms(2700)).gone, ["c"]);
    }

    #[test]
    fn beats_resume_at_their_pace_after_a_stall() {
        let t0 = Instant::now();
        let mut l = Liveness::new(INTERVAL, TIMEOUT);
        l.watch("a", t0);
        l.heard(&"a", t0 + ms(1900));
        assert_eq!(l.tick(t0 + ms(1900)).beat, ["a"], "late, once");
        assert!(l.tick(t0 + ms(2000)).beat.is_empty());
        assert_eq!(l.tick(t0 + ms(2400)).beat, ["a"]);
    }
}
