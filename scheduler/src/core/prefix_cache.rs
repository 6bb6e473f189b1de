//! The prefix cache: a radix tree over token ids whose edges are whole KV pages, so a prompt that starts with
//! tokens some earlier sequence had reuses that sequence's pages instead of prefilling them again.
//!
//! Why pages: the KV of position `p` depends only on the tokens `0..=p`, so a full page is reusable by any
//! sequence with the same tokens up to its end, whatever physical pages held the tokens before it. Matching at
//! page granularity keeps the tree's nodes one-to-one with pages: a node *is* a page (its index is the page id),
//! its key is the page's `page_size` tokens, and its parent is the page before it. A partial last page is never
//! shared: its request is still writing into it.
//!
//! Pages in the tree are owned by the tree. Each node counts the running requests whose page table goes through
//! it (`lock`): a request locks the whole path it matched on admission and each page it adds, and unlocks them
//! when it ends. An unlocked node is *evictable*: when the page pool runs dry, the least recently used unlocked
//! leaf is evicted and its page handed to whoever needed one. Evicting leaves first keeps every path a prefix, and
//! since locks are held along whole paths, every unlocked node becomes a leaf once its unlocked descendants are
//! gone: all of them count as free memory.
//!
//! Steps in flight add two rules. A node written by the step being planned cannot be matched in that same step
//! (its KV is not there until the step runs; see [`Match::blocked`]); and an unlock waits for the last step in
//! flight that used the request ([`PrefixCache::unlock_after`]), so an unlocked node is never still read by a
//! step in flight and its page can be handed out at once.
//!
//! Nothing here allocates after construction: nodes live in an array indexed by page, children in one hash map
//! keyed by `(parent, hash of the page's tokens)` sized for every page, and the LRU order in a binary heap of
//! `(last use, node)` with lazy deletion, compacted in place when it fills.

use foldhash::fast::RandomState;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::BuildHasher;

/// The parent of a first page.
pub(crate) const ROOT: u32 = u32::MAX;

#[derive(Clone, Debug)]
struct Node {
    in_tree: bool,
    parent: u32,
    hash: u64,
    children: u32,
    /// Running requests whose page tables go through this node.
    lock: u32,
    /// When the node was last unlocked or inserted (a tick of the cache's clock): the LRU order.
    last_use: u64,
    /// The step that writes this page's KV.
    written_in: u64,
}

const EMPTY: Node = Node { in_tree: false, parent: ROOT, hash: 0, children: 0, lock: 0, last_use: 0, written_in: 0 };

/// The longest cached prefix of a prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Match {
    /// The deepest matched node, or [`ROOT`].
    pub node: u32,
    /// Pages matched: the prompt's first `pages * page_size` tokens are cached.
    pub pages: u32,
    /// Of those, pages no running request holds: locking them takes them out of the evictable pages.
    pub unlocked: u32,
    /// The match stopped at a page that the step being planned writes. Admitting the request one step later would
    /// reuse it; the admission policy waits for that rather than prefill the same tokens twice.
    pub blocked: bool,
}

/// What [`PrefixCache::insert`] did with a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Inserted {
    /// The page is a new node, locked once for the inserting request.
    New(u32),
    /// A node with the same tokens already follows the parent (another sequence got there first). It was locked
    /// once for the inserting request, which should use that page and free its own.
    Existing(u32),
    /// Not cached: the cache is off, or (with a chance of about 2^-64 per page) another page under the same parent
    /// has the same hash; lookups compare the tokens themselves, so that costs reuse, never correctness. The
    /// request keeps the page as its own.
    Refused,
}

#[derive(Clone, Debug)]
pub(crate) struct PrefixCache {
    enabled: bool,
    page_size: u32,
    nodes: Vec<Node>,
    /// Page `p`'s tokens at `p * page_size ..`, valid while `p` is in the tree.
    keys: Vec<u32>,
    /// Seeded per process, for the page hashes and the map alike: clients choose the tokens, and must not be able
    /// to choose colliding pages.
    hasher: RandomState,
    children: HashMap<(u32, u64), u32, RandomState>,
    /// `(last use, node)` of unlocked leaves, oldest on top; an entry is stale once the node changed since.
    lru: BinaryHeap<Reverse<(u64, u32)>>,
    tick: u64,
    size: u32,
    evictable: u32,
    /// `(step, node)`: unlock the path ending at `node` once `step` has completed.
    deferred: Vec<(u64, u32)>,
}

impl PrefixCache {
    /// A cache over `num_pages` pages; a disabled one matches and inserts nothing.
    pub fn new(num_pages: u32, page_size: u32, enabled: bool) -> Self {
        let n = if enabled { num_pages as usize } else { 0 };
        PrefixCache {
            enabled,
            page_size,
            nodes: vec![EMPTY; n],
            keys: vec![0; n * page_size as usize],
            // Twice the nodes, so that removals' tombstones never force a resize.
            hasher: RandomState::default(),
            children: HashMap::with_capacity_and_hasher(2 * n, RandomState::default()),
            lru: BinaryHeap::with_capacity(2 * n + 16),
            tick: 0,
            size: 0,
            evictable: 0,
            deferred: Vec::with_capacity(if enabled { 64 } else { 0 }),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Stops matching and inserting for good (a failed step leaves KV that cannot be trusted); what is cached is
    /// still unlocked and evicted as usual.
    pub fn disable(&mut self) {
        self.enabled = false;
    }

    /// Pages in the tree.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Pages in the tree that no running request holds: free memory, reclaimed on demand.
    pub fn evictable(&self) -> u32 {
        self.evictable
    }

    pub fn contains(&self, page: u32) -> bool {
        self.nodes.get(page as usize).is_some_and(|n| n.in_tree)
    }

    /// The longest cached prefix of `tokens`, at most `max_pages` pages, usable by a step later than
    /// `planning` - 1 (nodes written by step `planning` itself are not).
    pub fn match_prefix(&self, tokens: &[u32], max_pages: u32, planning: u64) -> Match {
        let mut m = Match { node: ROOT, pages: 0, unlocked: 0, blocked: false };
        if !self.enabled {
            return m;
        }
        let ps = self.page_size as usize;
        for key in tokens.chunks_exact(ps).take(max_pages as usize) {
            let Some(child) = self.child(m.node, key) else { break };
            let node = &self.nodes[child as usize];
            if node.written_in >= planning {
                m.blocked = true;
                break;
            }
            m.node = child;
            m.pages += 1;
            m.unlocked += u32::from(node.lock == 0);
        }
        m
    }

    /// Locks every node from `node` up to the root for one more request.
    pub fn lock(&mut self, mut node: u32) {
        while node != ROOT {
            self.lock_one(node);
            node = self.nodes[node as usize].parent;
        }
    }

    /// Appends the pages from the root down to `node` to `out`.
    pub fn path_pages(&self, node: u32, out: &mut Vec<u32>) {
        let start = out.len();
        let mut n = node;
        while n != ROOT {
            out.push(n);
            n = self.nodes[n as usize].parent;
        }
        out[start..].reverse();
    }

    /// Unlocks the path ending at `node` once step `after` has completed, or now.
    pub fn unlock_after(&mut self, node: u32, after: Option<u64>) {
        if node == ROOT {
            return;
        }
        match after {
            Some(step) => self.deferred.push((step, node)),
            None => self.unlock(node),
        }
    }

    /// Step `step` and every step before it have completed: the unlocks that waited for them happen.
    pub fn complete(&mut self, step: u64) {
        let mut i = 0;
        while i < self.deferred.len() {
            if self.deferred[i].0 <= step {
                let (_, node) = self.deferred.swap_remove(i);
                self.unlock(node);
            } else {
                i += 1;
            }
        }
    }

    /// `(step, node)` for every unlock waiting on a step.
    pub fn deferred(&self) -> &[(u64, u32)] {
        &self.deferred
    }

    /// Adds `page`, holding `key`'s tokens, after `parent` (a node the caller has locked, or [`ROOT`]), for a
    /// request that locks the result; `written_in` is the step that writes the page's KV.
    pub fn insert(&mut self, parent: u32, key: &[u32], page: u32, written_in: u64) -> Inserted {
        debug_assert_eq!(key.len(), self.page_size as usize);
        if !self.enabled {
            return Inserted::Refused;
        }
        let hash = self.hasher.hash_one(key);
        if let Some(&child) = self.children.get(&(parent, hash)) {
            if self.key(child) != key {
                return Inserted::Refused;
            }
            self.lock_one(child);
            return Inserted::Existing(child);
        }
        assert!(!self.nodes[page as usize].in_tree, "page {page} is already cached");
        self.tick += 1;
        self.nodes[page as usize] =
            Node { in_tree: true, parent, hash, children: 0, lock: 1, last_use: self.tick, written_in };
        let ps = self.page_size as usize;
        self.keys[page as usize * ps..][..ps].copy_from_slice(key);
        self.children.insert((parent, hash), page);
        if parent != ROOT {
            self.nodes[parent as usize].children += 1;
        }
        self.size += 1;
        Inserted::New(page)
    }

    /// Evicts the least recently used unlocked leaf and returns its page, now the caller's. `None` when every
    /// cached page is locked.
    pub fn evict(&mut self) -> Option<u32> {
        while let Some(Reverse((used, node))) = self.lru.pop() {
            if !self.is_lru_entry(used, node) {
                continue;
            }
            let n = self.nodes[node as usize].clone();
            self.children.remove(&(n.parent, n.hash));
            self.nodes[node as usize] = EMPTY;
            self.size -= 1;
            self.evictable -= 1;
            if n.parent != ROOT {
                let p = &mut self.nodes[n.parent as usize];
                p.children -= 1;
                if p.children == 0 && p.lock == 0 {
                    let used = p.last_use;
                    self.push_lru(used, n.parent);
                }
            }
            return Some(node);
        }
        debug_assert_eq!(self.evictable, 0, "unlocked nodes that are not reachable through the LRU heap");
        None
    }

    /// Checks the tree's own bookkeeping; `locks` gives the lock each node should have (from the running requests
    /// and the deferred unlocks). For tests and debug builds.
    pub fn check(&self, locks: &HashMap<u32, u32>) -> Result<(), String> {
        let mut children = HashMap::<u32, u32>::new();
        let in_lru: std::collections::HashSet<u32> =
            self.lru.iter().filter(|&&Reverse((u, x))| self.is_lru_entry(u, x)).map(|&Reverse((_, x))| x).collect();
        let (mut size, mut evictable) = (0, 0);
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.in_tree) {
            let i = i as u32;
            size += 1;
            evictable += u32::from(n.lock == 0);
            if self.children.get(&(n.parent, n.hash)) != Some(&i) {
                return Err(format!("cached page {i} is not its parent's child"));
            }
            if n.parent != ROOT {
                let p = &self.nodes[n.parent as usize];
                if !p.in_tree || p.lock < n.lock {
                    return Err(format!("cached page {i}'s parent {} is evicted or less locked", n.parent));
                }
                *children.entry(n.parent).or_default() += 1;
            }
            if n.lock != locks.get(&i).copied().unwrap_or(0) {
                return Err(format!("cached page {i} is locked {} times, by {:?} requests", n.lock, locks.get(&i)));
            }
            if n.lock == 0 && n.children == 0 && !in_lru.contains(&i) {
                return Err(format!("unlocked leaf {i} cannot be evicted"));
            }
        }
        for (i, n) in self.nodes.iter().enumerate().filter(|(_, n)| n.in_tree) {
            if n.children != children.get(&(i as u32)).copied().unwrap_or(0) {
                return Err(format!("cached page {i} counts {} children", n.children));
            }
        }
        if (size, evictable) != (self.size, self.evictable) || self.children.len() != size as usize {
            return Err(format!(
                "{size} cached and {evictable} evictable pages, the cache counts {} and {}",
                self.size, self.evictable
            ));
        }
        Ok(())
    }

    fn key(&self, node: u32) -> &[u32] {
        let ps = self.page_size as usize;
        &self.keys[node as usize * ps..][..ps]
    }

    fn child(&self, parent: u32, key: &[u32]) -> Option<u32> {
        let &child = self.children.get(&(parent, self.hasher.hash_one(key)))?;
        (self.key(child) == key).then_some(child)
    }

    fn lock_one(&mut self, node: u32) {
        let n = &mut self.nodes[node as usize];
        if n.lock == 0 {
            self.evictable -= 1;
        }
        n.lock += 1;
    }

    fn unlock(&mut self, mut node: u32) {
        self.tick += 1;
        while node != ROOT {
            let n = &mut self.nodes[node as usize];
            n.lock = n.lock.checked_sub(1).unwrap_or_else(|| panic!("cached page {node} unlocked more than locked"));
            n.last_use = self.tick;
            let (parent, leaf) = (n.parent, n.lock == 0 && n.children == 0);
            if n.lock == 0 {
                self.evictable += 1;
            }
            if leaf {
                self.push_lru(self.tick, node);
            }
            node = parent;
        }
    }

    fn is_lru_entry(&self, used: u64, node: u32) -> bool {
        let n = &self.nodes[node as usize];
        n.in_tree && n.lock == 0 && n.children == 0 && n.last_use == used
    }

    fn push_lru(&mut self, used: u64, node: u32) {
        if self.lru.len() == self.lru.capacity() {
            // Drop stale entries in place rather than grow: the live ones are at most one per node.
            let nodes = &self.nodes;
            self.lru.retain(|&Reverse((u, x))| {
                let n = &nodes[x as usize];
                n.in_tree && n.lock == 0 && n.children == 0 && n.last_use == u
            });
        }
        self.lru.push(Reverse((used, node)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::index_pool::IndexPool;
    use proptest::prelude::*;

    /// The tokens of the path ending at `node`.
    fn path_tokens(c: &PrefixCache, node: u32) -> Vec<u32> {
        let mut pages = vec![];
        c.path_pages(node, &mut pages);
        pages.iter().flat_map(|&p| c.key(p).to_vec()).collect()
    }

    /// Inserts `tokens`' full pages after the prefix `from` (locked by the caller), with fresh pages from `pool`;
    /// returns the last node, locked once more along the whole new part.
    fn insert_all(c: &mut PrefixCache, pool: &mut IndexPool, from: Match, tokens: &[u32], step: u64) -> u32 {
        let ps = c.page_size as usize;
        let mut node = from.node;
        for key in tokens.chunks_exact(ps).skip(from.pages as usize) {
            let page = pool.alloc().or_else(|| c.evict()).expect("a page");
            match c.insert(node, key, page, step) {
                Inserted::New(n) => node = n,
                Inserted::Existing(n) => {
                    pool.free(page);
                    node = n;
                }
                Inserted::Refused => unreachable!("no collisions among a few pages"),
            }
        }
        node
    }

    #[test]
    fn matches_whole_pages_and_shares_the_common_part() {
        let mut pool = IndexPool::new(8);
        let mut c = PrefixCache::new(8, 2, true);
        let none = c.match_prefix(&[1, 2, 3, 4, 5], 8, 1);
        assert_eq!(none, Match { node: ROOT, pages: 0, unlocked: 0, blocked: false });
        let a = insert_all(&mut c, &mut pool, none, &[1, 2, 3, 4, 5], 0);
        assert_eq!((c.size(), c.evictable()), (2, 0), "the partial page is not cached; the rest is locked");
        let m = c.match_prefix(&[1, 2, 3, 9, 9], 8, 1);
        assert_eq!((m.pages, m.unlocked), (1, 0));
        assert_eq!(path_tokens(&c, m.node), [1, 2]);
        c.lock(m.node);
        let b = insert_all(&mut c, &mut pool, m, &[1, 2, 3, 9, 9], 1);
        assert_eq!(c.size(), 3, "[1, 2] is shared, [3, 4] and [3, 9] are siblings");
        assert_eq!(c.match_prefix(&[1, 2, 3, 4, 5, 6], 1, 2).pages, 1, "at most max_pages");
        c.unlock_after(a, None);
        assert_eq!(c.evictable(), 1, "[3, 4] is free; [1, 2] is still b's");
        c.unlock_after(b, Some(7));
        assert_eq!(c.evictable(), 1, "b's unlock waits for step 7");
        c.complete(7);
        assert_eq!(c.evictable(), 3);
        let mut locks = HashMap::new();
        c.check(&locks).unwrap();
        // Least recently used first: [3, 4] was unlocked before [3, 9]; [1, 2] goes once it is a leaf.
        let order: Vec<u32> = std::iter::from_fn(|| c.evict()).collect();
        assert_eq!(order.len(), 3);
        assert_eq!(order[2], m.node, "the parent is evicted last");
        locks.clear();
        c.check(&locks).unwrap();
        assert_eq!((c.size(), c.evictable()), (0, 0));
    }

    #[test]
    fn pages_written_by_the_step_being_planned_do_not_match_in_it() {
        let mut pool = IndexPool::new(4);
        let mut c = PrefixCache::new(4, 2, true);
        let m = c.match_prefix(&[1, 2, 3, 4, 5], 4, 5);
        insert_all(&mut c, &mut pool, m, &[1, 2, 3, 4, 5], 5);
        let same_step = c.match_prefix(&[1, 2, 3, 4, 5], 4, 5);
        assert_eq!((same_step.pages, same_step.blocked), (0, true));
        let next = c.match_prefix(&[1, 2, 3, 4, 5], 4, 6);
        assert_eq!((next.pages, next.blocked), (2, false));
    }

    #[test]
    fn a_locked_path_is_never_evicted() {
        let mut pool = IndexPool::new(2);
        let mut c = PrefixCache::new(2, 1, true);
        let m = c.match_prefix(&[1, 2], 2, 0);
        let n = insert_all(&mut c, &mut pool, m, &[1, 2], 0);
        assert_eq!(c.evict(), None);
        c.unlock_after(n, None);
        c.lock(c.match_prefix(&[1, 9], 2, 1).node);
        assert_eq!(c.evict(), Some(n), "[1, 2]'s leaf goes; [1] is locked");
        assert_eq!(c.evict(), None);
    }

    #[test]
    fn a_disabled_cache_matches_and_keeps_nothing() {
        let mut c = PrefixCache::new(4, 1, false);
        assert_eq!(c.insert(ROOT, &[1], 0, 0), Inserted::Refused);
        assert_eq!(c.match_prefix(&[1, 2], 4, 1).pages, 0);
        assert_eq!((c.size(), c.evict()), (0, None));
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// A request with one of a few prompts (so that they share prefixes) arrives: it matches, locks, and
        /// caches its full pages.
        Admit {
            prompt: usize,
            len: usize,
        },
        /// A live request ends: its unlock waits for the current step, or not.
        Release {
            pick: prop::sample::Index,
            deferred: bool,
        },
        /// The current step completes.
        Complete,
        Evict,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..4, 1usize..24).prop_map(|(prompt, len)| Op::Admit { prompt, len }),
            2 => (any::<prop::sample::Index>(), any::<bool>()).prop_map(|(pick, deferred)| Op::Release { pick, deferred }),
            1 => Just(Op::Complete),
            1 => Just(Op::Evict),
        ]
    }

    proptest! {
        /// Against a model of who holds what: every match is a true prefix of the prompt, no page is cached and
        /// free at once or handed out twice, locks are exactly the live requests' (and pending unlocks') paths,
        /// only unlocked leaves are evicted, and nothing leaks.
        #[test]
        fn insert_match_lock_unlock_evict(
            num_pages in 1u32..24,
            page_size in 1u32..4,
            ops in prop::collection::vec(op(), 1..120),
        ) {
            let prompts: Vec<Vec<u32>> = (0..4u32)
                .map(|p| (0..24u32).map(|i| if i < 6 { 1 } else { 10 * p + i % 3 }).collect())
                .collect();
            let mut pool = IndexPool::new(num_pages);
            let mut c = PrefixCache::new(num_pages, page_size, true);
            let mut live: Vec<u32> = vec![]; // each live request's deepest node
            let mut pending: Vec<u32> = vec![]; // unlocks waiting for the current step
            let mut step = 0u64;
            for op in ops {
                match op {
                    Op::Admit { prompt, len } => {
                        let tokens = &prompts[prompt][..len];
                        let m = c.match_prefix(tokens, num_pages, step);
                        prop_assert_eq!(&path_tokens(&c, m.node)[..], &tokens[..(m.pages * page_size) as usize]);
                        let full = len as u32 / page_size;
                        if full - m.pages > pool.available() + c.evictable() - m.unlocked {
                            continue; // does not fit
                        }
                        c.lock(m.node);
                        live.push(insert_all(&mut c, &mut pool, m, tokens, step));
                    }
                    Op::Release { pick, deferred } => {
                        if !live.is_empty() {
                            let node = live.swap_remove(pick.index(live.len()));
                            c.unlock_after(node, deferred.then_some(step));
                            if deferred {
                                pending.push(node);
                            }
                        }
                    }
                    Op::Complete => {
                        c.complete(step);
                        pending.clear();
                        step += 1;
                    }
                    Op::Evict => {
                        let before = c.evictable();
                        match c.evict() {
                            Some(p) => {
                                prop_assert!(!c.contains(p) && pool.is_in_use(p), "evicted page {} is the caller's", p);
                                prop_assert_eq!(c.evictable(), before - 1);
                                pool.free(p);
                            }
                            None => prop_assert_eq!(before, 0),
                        }
                    }
                }
                let mut locks = HashMap::new();
                let mut path = vec![];
                for &node in live.iter().chain(&pending) {
                    path.clear();
                    c.path_pages(node, &mut path);
                    for &p in &path {
                        *locks.entry(p).or_default() += 1;
                    }
                }
                c.check(&locks).map_err(TestCaseError::fail)?;
                // Every page is free or cached, never both; cached pages are in use in the pool.
                for p in 0..num_pages {
                    prop_assert!(c.contains(p) == pool.is_in_use(p), "page {} is cached {} / in use {}", p, c.contains(p), pool.is_in_use(p));
                }
                prop_assert_eq!(pool.available() + c.size(), num_pages);
            }
        }
    }
}
