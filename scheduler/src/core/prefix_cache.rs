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

use std::cmp::Reverse;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{Hash, Hasher};

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
    /// Not cached: the cache is off, or (astronomically rarely) another page under the same parent has the same
    /// hash. The request keeps the page as its own.
    Refused,
}

#[derive(Clone, Debug)]
pub(crate) struct PrefixCache {
    enabled: bool,
    page_size: u32,
    nodes: Vec<Node>,
    /// Page `p`'s tokens at `p * page_size ..`, valid while `p` is in the tree.
    keys: Vec<u32>,
    children: HashMap<(u32, u64), u32>,
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
            children: HashMap::with_capacity(2 * n),
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
        let hash = hash_key(key);
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
        let &child = self.children.get(&(parent, hash_key(key)))?;
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

fn hash_key(key: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}
