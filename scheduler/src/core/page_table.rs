//! Paged KV cache bookkeeping: which pages hold one request's keys and values, in sequence order.
//!
//! Token `p` of a sequence lives at offset `p % page_size` of page `pages[p / page_size]`, which is FlashInfer's
//! paged layout: the worker never needs anything but the page list, the length and `out_loc`.
//!
//! The first `shared` pages belong to the prefix cache (the request holds a lock on them, taken and given back by
//! the core); the rest are the request's own, taken from the pool and returned to it.

use super::index_pool::IndexPool;
use super::prefix_cache::PrefixCache;

/// Pages needed to hold `tokens` tokens.
pub(crate) fn pages_for(tokens: u32, page_size: u32) -> u32 {
    tokens.div_ceil(page_size)
}

/// Tokens used in the last of the pages that hold `tokens` (> 0) tokens: 1 ..= page_size.
pub(crate) fn last_page_len(tokens: u32, page_size: u32) -> u32 {
    debug_assert!(tokens > 0);
    (tokens - 1) % page_size + 1
}

#[derive(Debug, Default)]
pub(crate) struct PageTable {
    pages: Vec<u32>,
    shared: u32,
}

/// Keeps the capacity, like `Request`'s clone, so that a clone does not reallocate where the original would not.
impl Clone for PageTable {
    fn clone(&self) -> Self {
        let mut pages = Vec::with_capacity(self.pages.capacity());
        pages.extend_from_slice(&self.pages);
        PageTable { pages, shared: self.shared }
    }
}

impl PageTable {
    pub fn with_capacity(pages: u32) -> Self {
        PageTable { pages: Vec::with_capacity(pages as usize), shared: 0 }
    }

    /// Leading pages owned by the prefix cache.
    pub fn shared(&self) -> u32 {
        self.shared
    }

    /// Starts an empty table with the cache's pages from the root down to `node` (which the caller has locked).
    pub fn share_path(&mut self, cache: &PrefixCache, node: u32) {
        debug_assert!(self.pages.is_empty());
        cache.path_pages(node, &mut self.pages);
        self.shared = self.len();
    }

    /// The first own page (its tokens are cached now) is the cache's from here on: `page` if the cache took it,
    /// or the cache's copy of the same tokens, in which case the own page is returned for the caller to free.
    pub fn share_next(&mut self, page: u32) -> Option<u32> {
        let slot = &mut self.pages[self.shared as usize];
        self.shared += 1;
        (*slot != page).then(|| std::mem::replace(slot, page))
    }

    pub fn pages(&self) -> &[u32] {
        &self.pages
    }

    pub fn len(&self) -> u32 {
        self.pages.len() as u32
    }

    /// Pages still missing to hold `tokens` tokens.
    pub fn missing_for(&self, tokens: u32, page_size: u32) -> u32 {
        pages_for(tokens, page_size).saturating_sub(self.len())
    }

    /// Takes pages from `pool`, or evicts them from `cache` when the pool is empty, until `tokens` tokens fit. All
    /// or nothing: on `false` the table, the pool and the cache are as they were, so a failed attempt never strands
    /// pages.
    pub fn grow_to(&mut self, tokens: u32, page_size: u32, pool: &mut IndexPool, cache: &mut PrefixCache) -> bool {
        let missing = self.missing_for(tokens, page_size);
        if missing > pool.available() + cache.evictable() {
            return false;
        }
        for _ in 0..missing {
            let page = pool.alloc().or_else(|| cache.evict()).expect("checked available");
            self.pages.push(page);
        }
        true
    }

    /// Returns the own pages to `pool`, once step `after` has completed if it is given (a step in flight may still
    /// read or write them), and forgets the shared ones (the caller unlocks them). The vector keeps its capacity
    /// for the request's next admission.
    pub fn release(&mut self, pool: &mut IndexPool, after: Option<u64>) {
        for p in self.pages.drain(self.shared as usize..) {
            pool.free_after(p, after);
        }
        self.pages.clear();
        self.shared = 0;
    }

    /// Where token `pos`'s K and V live, as `page * page_size + offset`.
    pub fn loc(&self, pos: u32, page_size: u32) -> u32 {
        self.pages[(pos / page_size) as usize] * page_size + pos % page_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_math() {
        assert_eq!([0, 1, 16, 17, 32].map(|t| pages_for(t, 16)), [0, 1, 1, 2, 2]);
        assert_eq!([1, 15, 16, 17, 32].map(|t| last_page_len(t, 16)), [1, 15, 16, 1, 16]);
    }

    #[test]
    fn grows_page_by_page_and_locates_tokens() {
        let mut pool = IndexPool::new(4);
        let mut cache = PrefixCache::new(4, 2, false);
        pool.alloc(); // page 0 is someone else's, so locations are not trivially equal to positions
        let mut t = PageTable::default();
        assert!(t.grow_to(3, 2, &mut pool, &mut cache));
        assert_eq!(t.pages(), &[1, 2]);
        assert!(t.grow_to(4, 2, &mut pool, &mut cache), "still fits in two pages");
        assert_eq!(t.len(), 2);
        assert_eq!([0, 1, 2, 3].map(|p| t.loc(p, 2)), [2, 3, 4, 5]);
        assert_eq!(t.missing_for(5, 2), 1);
    }

    #[test]
    fn failed_growth_takes_nothing() {
        let mut pool = IndexPool::new(3);
        let mut cache = PrefixCache::new(3, 1, false);
        let mut t = PageTable::default();
        assert!(t.grow_to(2, 1, &mut pool, &mut cache));
        assert!(!t.grow_to(4, 1, &mut pool, &mut cache), "needs two more, one is free");
        assert_eq!((t.len(), pool.available()), (2, 1));
        t.release(&mut pool, Some(9));
        assert_eq!((t.len(), pool.available()), (0, 1), "the pages wait for step 9");
        pool.complete(9);
        assert_eq!(pool.available(), 3);
    }
}
