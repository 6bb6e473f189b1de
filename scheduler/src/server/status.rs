//! Where the server is in its life, as the HTTP API reports it (`/health`) and acts on it: a request that comes
//! while the engine is not serving is answered at once with a 503 that says why, never left waiting.

use std::sync::RwLock;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not serving yet: what the start is waiting for ("waiting for the worker", "loading weights", ...).
    Starting(String),
    Serving,
    /// A shutdown signal came: live requests run to their end, new ones are refused.
    Draining,
    /// The serve loop has ended.
    Stopped,
}

impl Phase {
    /// The `status` word of `/health`.
    pub fn word(&self) -> &'static str {
        match self {
            Phase::Starting(_) => "starting",
            Phase::Serving => "ok",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        }
    }
}

/// The phase, shared between the code that moves it (the start-up in main, the serve loop) and the HTTP
/// handlers that read it on every request.
#[derive(Debug)]
pub struct Status(RwLock<Phase>);

impl Status {
    pub fn new(phase: Phase) -> Self {
        Status(RwLock::new(phase))
    }

    pub fn get(&self) -> Phase {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_serving(&self) -> bool {
        *self.0.read().unwrap_or_else(|e| e.into_inner()) == Phase::Serving
    }

    pub fn set(&self, phase: Phase) {
        let mut current = self.0.write().unwrap_or_else(|e| e.into_inner());
        if *current != phase {
            tracing::info!("server: {}", describe(&phase));
            *current = phase;
        }
    }
}

fn describe(phase: &Phase) -> String {
    match phase {
        Phase::Starting(what) => format!("starting ({what})"),
        Phase::Serving => "serving".into(),
        Phase::Draining => "draining".into(),
        Phase::Stopped => "stopped".into(),
    }
}
