//! The bookkeeping's invariants, checked by the tests and by debug builds.

use super::*;

impl Core {
    /// Checks the bookkeeping: every page is free, cached, held by exactly one running request as its own, or
    /// waiting for a step in flight; each cached page is locked once per running request (or unlock in waiting)
    /// whose path goes through it, and each request's shared pages are exactly its path in the cache; slots and ids
    /// are consistent; page tables match KV lengths; and the tokens known plus the samples in flight match what was
    /// planned. For tests; linear in pages and requests.
    pub fn check_invariants(&self) -> Result<(), String> {
        let ps = self.limits.page_size;
        let mut owner: HashMap<u32, ReqId> = HashMap::new();
        let mut locks: HashMap<u32, u32> = HashMap::new();
        let mut path = Vec::new();
        let mut lock_path = |node: u32, path: &mut Vec<u32>| {
            path.clear();
            self.cache.path_pages(node, path);
            for &p in path.iter() {
                *locks.entry(p).or_default() += 1;
            }
        };
        let mut ids: HashMap<ReqId, &str> = HashMap::new();
        if !self.in_flight.iter().zip(self.in_flight.iter().skip(1)).all(|(a, b)| a < b)
            || self.in_flight.back().is_some_and(|&s| Some(s) != self.last_planned)
        {
            return Err(format!("steps in flight {:?}, last planned {:?}", self.in_flight, self.last_planned));
        }
        for req in self.waiting.iter() {
            if ids.insert(req.id, "waiting").is_some() {
                return Err(format!("request {} is waiting twice", req.id));
            }
            if req.pages.len() != 0
                || req.kv_len != 0
                || req.joined
                || req.prefill_len != req.len()
                || req.tree_node != ROOT
            {
                return Err(format!("waiting request {} holds state from a previous admission", req.id));
            }
            if req.pending != 0 || req.last_step.is_some_and(|s| self.is_in_flight(s)) {
                return Err(format!("waiting request {} is in a step in flight", req.id));
            }
        }
        let mut prefilling = None;
        for (slot, req) in self.running.iter() {
            if let Some(place) = ids.insert(req.id, "running") {
                return Err(format!("request {} is running and {place}", req.id));
            }
            let shared = req.pages.shared() as usize;
            lock_path(req.tree_node, &mut path);
            if path[..] != req.pages.pages()[..shared] {
                return Err(format!(
                    "request {} shares pages {:?}, its cache path is {path:?}",
                    req.id,
                    req.pages.pages()
                ));
            }
            if shared as u32 * ps > req.kv_len.min(req.len()) {
                return Err(format!("request {} shares {shared} pages for {} known tokens", req.id, req.kv_len));
            }
            for &p in &req.pages.pages()[shared..] {
                if let Some(other) = owner.insert(p, req.id) {
                    return Err(format!("page {p} is held by requests {other} and {}", req.id));
                }
                if !self.pages.is_in_use(p) || self.cache.contains(p) {
                    return Err(format!("page {p} of request {} is also free or cached", req.id));
                }
            }
            let want_pages = pages_for(req.kv_len.max(req.prefill_len), ps);
            if req.pages.len() != want_pages {
                return Err(format!("request {} holds {} pages for {} tokens", req.id, req.pages.len(), req.kv_len));
            }
            if req.pending > 0 && !req.last_step.is_some_and(|s| self.is_in_flight(s)) {
                return Err(format!(
                    "request {} waits for {} samples, but no step of it is in flight",
                    req.id, req.pending
                ));
            }
            if req.is_prefilling() {
                if prefilling.replace(slot).is_some() {
                    return Err("two requests are part-way through their prefill".into());
                }
                if req.pending != 0 {
                    return Err(format!("request {} samples before its prompt is planned", req.id));
                }
            } else if req.len() + req.pending != req.kv_len + 1 {
                return Err(format!(
                    "decoding request {} has {} tokens and {} in flight, {} cached",
                    req.id,
                    req.len(),
                    req.pending,
                    req.kv_len
                ));
            }
        }
        if prefilling != self.prefilling {
            return Err(format!("prefilling slot is {:?}, the requests say {prefilling:?}", self.prefilling));
        }
        for &(step, node) in self.cache.deferred() {
            if !self.is_in_flight(step) {
                return Err(format!("an unlock of cached page {node} waits for step {step}, which is not in flight"));
            }
            lock_path(node, &mut path);
        }
        self.cache.check(&locks)?;
        let deferred = self.pages.deferred();
        for &(step, p) in deferred {
            if let Some(id) = owner.get(&p) {
                return Err(format!("page {p} of request {id} is also waiting to be freed after step {step}"));
            }
            if self.cache.contains(p) {
                return Err(format!("cached page {p} is also waiting to be freed after step {step}"));
            }
            if !self.is_in_flight(step) {
                return Err(format!("page {p} waits for step {step}, which is not in flight"));
            }
        }
        for &(step, slot) in self.running.deferred_slots() {
            if self.running.get(slot).is_some() || !self.is_in_flight(step) {
                return Err(format!("slot {slot} waits for step {step}, but it runs or the step is not in flight"));
            }
        }
        let cached = self.cache.size() as usize;
        if self.pages.available() as usize + owner.len() + deferred.len() + cached != self.limits.num_pages as usize {
            return Err(format!(
                "{} free pages + {} held pages + {} waiting for a step + {cached} cached != {} pages",
                self.pages.available(),
                owner.len(),
                deferred.len(),
                self.limits.num_pages
            ));
        }
        Ok(())
    }
}
