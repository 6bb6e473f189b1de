//! Paged KV cache bookkeeping: which pages hold one request's keys and values, in sequence order.
//!
//! Token `p` of a sequence lives at offset `p % page_size` of page `pages[p / page_size]`, which is FlashInfer's
//! paged layout: the worker never needs anything but the page list, the length and `out_loc`.

use super::index_pool::IndexPool;

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
}

/// Keeps the capacity, like `Request`'s clone, so that a clone does not reallocate where the original would not.
impl Clone for PageTable {
    fn clone(&self) -> Self {
        let mut pages = Vec::with_capacity(self.pages.capacity());
        pages.extend_from_slice(&self.pages);
        PageTable { pages }
    }
}

impl PageTable {
    pub fn with_capacity(pages: u32) -> Self {
        PageTable { pages: Vec::with_capacity(pages as usize) }
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

    /// Takes pages from `pool` until `tokens` tokens fit. All or nothing: on `false` the table and the pool are as
    /// they were, so a failed attempt never strands pages.
    pub fn grow_to(&mut self, tokens: u32, page_size: u32, pool: &mut IndexPool) -> bool {
        let missing = self.missing_for(tokens, page_size);
        if missing > pool.available() {
            return false;
        }
        for _ in 0..missing {
            self.pages.push(pool.alloc().expect("checked available"));
        }
        true
    }

    /// Returns every page to `pool`, once step `after` has completed if it is given (a step in flight may still
    /// read or write them). The vector keeps its capacity for the request's next admission.
    pub fn release(&mut self, pool: &mut IndexPool, after: Option<u64>) {
        for p in self.pages.drain(..) {
            pool.free_after(p, after);
        }
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
        pool.alloc(); // page 0 is someone else's, so locations are not trivially equal to positions
        let mut t = PageTable::default();
        assert!(t.grow_to(3, 2, &mut pool));
        assert_eq!(t.pages(), &[1, 2]);
        assert!(t.grow_to(4, 2, &mut pool), "still fits in two pages");
        assert_eq!(t.len(), 2);
        assert_eq!([0, 1, 2, 3].map(|p| t.loc(p, 2)), [2, 3, 4, 5]);
        assert_eq!(t.missing_for(5, 2), 1);
    }

    #[test]
    fn failed_growth_takes_nothing() {
        let mut pool = IndexPool::new(3);
        let mut t = PageTable::default();
        assert!(t.grow_to(2, 1, &mut pool));
        assert!(!t.grow_to(4, 1, &mut pool), "needs two more, one is free");
        assert_eq!((t.len(), pool.available()), (2, 1));
        t.release(&mut pool, Some(9));
        assert_eq!((t.len(), pool.available()), (0, 1), "the pages wait for step 9");
        pool.complete(9);
        assert_eq!(pool.available(), 3);
    }
}
