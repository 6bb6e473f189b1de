//! The scheduling choices an operator makes (command-line flags), as opposed to the sizes agreed with the worker
//! ([`super::Limits`]).

/// The order in which waiting requests are admitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// First come, first served: only the head of the queue is considered, so nothing is overtaken.
    #[default]
    Fcfs,
    /// Longest prefix match first (SGLang's `lpm`): requests whose prompts share the most cached pages go first,
    /// which keeps those pages from being evicted before they are reused. A request that has waited longer than
    /// [`Policy::max_wait_steps`] goes first regardless, so none starves.
    Lpm,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Keep the KV pages of finished and running sequences in a radix tree, and reuse them for any later prompt
    /// that starts with the same tokens.
    pub prefix_cache: bool,
    pub order: Order,
    /// With [`Order::Lpm`]: steps planned since a request arrived after which it is admitted in arrival order.
    pub max_wait_steps: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { prefix_cache: true, order: Order::Fcfs, max_wait_steps: 1024 }
    }
}
