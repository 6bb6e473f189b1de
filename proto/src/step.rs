//! What one ring slot holds: the step the scheduler asks for, and the worker's result (docs/protocol.md,
//! "Step slot" and "Result slot"). Offsets follow from the ring's capacities alone, so both processes derive the
//! same layout from the ring header without negotiating anything else.

use bytemuck::{Pod, Zeroable};
use std::ops::Range;

#[cfg(not(target_endian = "little"))]
compile_error!("the ring layout is little-endian and is read in place");

/// Every array in a slot starts on a cache line, which also satisfies the alignment numpy and torch want.
pub const ALIGN: usize = 64;
pub const SLOT_HEADER_BYTES: usize = 64;

/// How many requests, tokens and KV page indices one slot can describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub max_reqs: u32,
    pub max_tokens: u32,
    pub max_kv_indices: u32,
}

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepKind {
    /// New tokens for at least one request: prefill, possibly after a cached prefix, possibly with decodes.
    Extend = 0,
    /// Every request adds exactly one token.
    Decode = 1,
    /// The worker exits; nothing else in the slot is read.
    Shutdown = 2,
}

impl StepKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Extend),
            1 => Some(Self::Decode),
            2 => Some(Self::Shutdown),
            _ => None,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct StepHeader {
    pub step_id: u64,
    pub kind: u32,
    pub num_reqs: u32,
    pub num_tokens: u32,
    pub num_kv_indices: u32,
    pub num_joins: u32,
    pub _reserved: [u32; 9],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ResultHeader {
    pub step_id: u64,
    pub num_reqs: u32,
    pub status: u32,
    pub _reserved: [u32; 12],
}

const _: () = assert!(std::mem::size_of::<StepHeader>() == SLOT_HEADER_BYTES);
const _: () = assert!(std::mem::size_of::<ResultHeader>() == SLOT_HEADER_BYTES);

/// Lays arrays out one after another, each on the next 64-byte boundary.
struct Cursor(usize);

impl Cursor {
    fn place(&mut self, len: usize, elem_bytes: usize) -> Range<usize> {
        let start = self.0.next_multiple_of(ALIGN);
        self.0 = start + len * elem_bytes;
        start..self.0
    }
    fn end(&self) -> usize {
        self.0.next_multiple_of(ALIGN)
    }
}

/// Byte ranges of a step slot's arrays, in protocol order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepLayout {
    pub cap: Capacity,
    pub req_slot: Range<usize>,
    pub seq_len: Range<usize>,
    pub qo_indptr: Range<usize>,
    pub kv_indptr: Range<usize>,
    pub kv_last_page_len: Range<usize>,
    pub input_ids: Range<usize>,
    pub positions: Range<usize>,
    pub out_loc: Range<usize>,
    pub kv_indices: Range<usize>,
    pub join_slot: Range<usize>,
    pub join_temperature: Range<usize>,
    pub join_top_p: Range<usize>,
    pub join_top_k: Range<usize>,
    pub join_seed: Range<usize>,
    pub slot_bytes: usize,
}

impl StepLayout {
    pub fn new(cap: Capacity) -> Self {
        let (r, t, k) = (cap.max_reqs as usize, cap.max_tokens as usize, cap.max_kv_indices as usize);
        let mut c = Cursor(SLOT_HEADER_BYTES);
        let mut layout = StepLayout {
            cap,
            req_slot: c.place(r, 4),
            seq_len: c.place(r, 4),
            qo_indptr: c.place(r + 1, 4),
            kv_indptr: c.place(r + 1, 4),
            kv_last_page_len: c.place(r, 4),
            input_ids: c.place(t, 4),
            positions: c.place(t, 4),
            out_loc: c.place(t, 4),
            kv_indices: c.place(k, 4),
            join_slot: c.place(r, 4),
            join_temperature: c.place(r, 4),
            join_top_p: c.place(r, 4),
            join_top_k: c.place(r, 4),
            join_seed: c.place(r, 8),
            slot_bytes: 0,
        };
        layout.slot_bytes = c.end();
        layout
    }
}

/// Byte ranges of a result slot's arrays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResultLayout {
    pub max_reqs: u32,
    pub tokens: Range<usize>,
    pub slot_bytes: usize,
}

impl ResultLayout {
    pub fn new(max_reqs: u32) -> Self {
        let mut c = Cursor(SLOT_HEADER_BYTES);
        let tokens = c.place(max_reqs as usize, 4);
        ResultLayout { max_reqs, tokens, slot_bytes: c.end() }
    }
}

/// Splits `buf` into consecutive disjoint pieces at the given (ascending, non-overlapping) ranges.
fn carve<'a, const N: usize>(mut buf: &'a mut [u8], ranges: [&Range<usize>; N]) -> [&'a mut [u8]; N] {
    let mut consumed = 0;
    ranges.map(|r| {
        let rest = std::mem::take(&mut buf);
        let (_, rest) = rest.split_at_mut(r.start - consumed);
        let (piece, rest) = rest.split_at_mut(r.len());
        consumed = r.end;
        buf = rest;
        piece
    })
}

/// A step slot opened for writing: every array at full capacity, as disjoint mutable slices.
pub struct StepMut<'a> {
    pub header: &'a mut StepHeader,
    pub req_slot: &'a mut [i32],
    pub seq_len: &'a mut [i32],
    pub qo_indptr: &'a mut [i32],
    pub kv_indptr: &'a mut [i32],
    pub kv_last_page_len: &'a mut [i32],
    pub input_ids: &'a mut [i32],
    pub positions: &'a mut [i32],
    pub out_loc: &'a mut [i32],
    pub kv_indices: &'a mut [i32],
    pub join_slot: &'a mut [i32],
    pub join_temperature: &'a mut [f32],
    pub join_top_p: &'a mut [f32],
    pub join_top_k: &'a mut [i32],
    pub join_seed: &'a mut [u64],
}

impl<'a> StepMut<'a> {
    /// `buf` must be at least `layout.slot_bytes` long and 64-byte aligned (ring slots and [`SlotBuf`] are).
    pub fn new(layout: &StepLayout, buf: &'a mut [u8]) -> Self {
        assert!(buf.len() >= layout.slot_bytes, "slot buffer smaller than its layout");
        let header = 0..SLOT_HEADER_BYTES;
        let l = layout;
        let [h, a, b, c, d, e, f, g, i, k, m, n, o, p, q] = carve(
            buf,
            [
                &header,
                &l.req_slot,
                &l.seq_len,
                &l.qo_indptr,
                &l.kv_indptr,
                &l.kv_last_page_len,
                &l.input_ids,
                &l.positions,
                &l.out_loc,
                &l.kv_indices,
                &l.join_slot,
                &l.join_temperature,
                &l.join_top_p,
                &l.join_top_k,
                &l.join_seed,
            ],
        );
        let cast = |s: &'a mut [u8]| bytemuck::cast_slice_mut::<u8, i32>(s);
        StepMut {
            header: bytemuck::from_bytes_mut(h),
            req_slot: cast(a),
            seq_len: cast(b),
            qo_indptr: cast(c),
            kv_indptr: cast(d),
            kv_last_page_len: cast(e),
            input_ids: cast(f),
            positions: cast(g),
            out_loc: cast(i),
            kv_indices: cast(k),
            join_slot: cast(m),
            join_temperature: bytemuck::cast_slice_mut(n),
            join_top_p: bytemuck::cast_slice_mut(o),
            join_top_k: cast(p),
            join_seed: bytemuck::cast_slice_mut(q),
        }
    }
}

/// A step slot opened for reading, each array cut to the length its header gives.
#[derive(Debug)]
pub struct StepRef<'a> {
    pub header: StepHeader,
    pub req_slot: &'a [i32],
    pub seq_len: &'a [i32],
    pub qo_indptr: &'a [i32],
    pub kv_indptr: &'a [i32],
    pub kv_last_page_len: &'a [i32],
    pub input_ids: &'a [i32],
    pub positions: &'a [i32],
    pub out_loc: &'a [i32],
    pub kv_indices: &'a [i32],
    pub join_slot: &'a [i32],
    pub join_temperature: &'a [f32],
    pub join_top_p: &'a [f32],
    pub join_top_k: &'a [i32],
    pub join_seed: &'a [u64],
}

impl<'a> StepRef<'a> {
    pub fn new(layout: &StepLayout, buf: &'a [u8]) -> Self {
        let header: StepHeader = *bytemuck::from_bytes(&buf[..SLOT_HEADER_BYTES]);
        let (n, t, k, j) = (
            header.num_reqs as usize,
            header.num_tokens as usize,
            header.num_kv_indices as usize,
            header.num_joins as usize,
        );
        let arr = |r: &Range<usize>, len: usize| -> &'a [i32] { &bytemuck::cast_slice(&buf[r.clone()])[..len] };
        StepRef {
            header,
            req_slot: arr(&layout.req_slot, n),
            seq_len: arr(&layout.seq_len, n),
            qo_indptr: arr(&layout.qo_indptr, n + 1),
            kv_indptr: arr(&layout.kv_indptr, n + 1),
            kv_last_page_len: arr(&layout.kv_last_page_len, n),
            input_ids: arr(&layout.input_ids, t),
            positions: arr(&layout.positions, t),
            out_loc: arr(&layout.out_loc, t),
            kv_indices: arr(&layout.kv_indices, k),
            join_slot: arr(&layout.join_slot, j),
            join_temperature: &bytemuck::cast_slice(&buf[layout.join_temperature.clone()])[..j],
            join_top_p: &bytemuck::cast_slice(&buf[layout.join_top_p.clone()])[..j],
            join_top_k: arr(&layout.join_top_k, j),
            join_seed: &bytemuck::cast_slice(&buf[layout.join_seed.clone()])[..j],
        }
    }
}

/// A result slot opened for writing.
pub struct ResultMut<'a> {
    pub header: &'a mut ResultHeader,
    pub tokens: &'a mut [i32],
}

impl<'a> ResultMut<'a> {
    pub fn new(layout: &ResultLayout, buf: &'a mut [u8]) -> Self {
        let header = 0..SLOT_HEADER_BYTES;
        let [h, t] = carve(buf, [&header, &layout.tokens]);
        ResultMut { header: bytemuck::from_bytes_mut(h), tokens: bytemuck::cast_slice_mut(t) }
    }
}

/// A result slot opened for reading, `tokens` cut to the header's request count.
#[derive(Debug)]
pub struct ResultRef<'a> {
    pub header: ResultHeader,
    pub tokens: &'a [i32],
}

impl<'a> ResultRef<'a> {
    pub fn new(layout: &ResultLayout, buf: &'a [u8]) -> Self {
        let header: ResultHeader = *bytemuck::from_bytes(&buf[..SLOT_HEADER_BYTES]);
        let n = header.num_reqs as usize;
        ResultRef { header, tokens: &bytemuck::cast_slice(&buf[layout.tokens.clone()])[..n] }
    }
}

/// An owned, 64-byte aligned slot-sized buffer: for tests, benches and golden files, outside any ring.
pub struct SlotBuf {
    lines: Vec<CacheLine>,
    len: usize,
}

#[repr(C, align(64))]
#[derive(Clone, Copy, Pod, Zeroable)]
struct CacheLine([u8; 64]);

impl SlotBuf {
    pub fn zeroed(len: usize) -> Self {
        SlotBuf { lines: vec![CacheLine([0; 64]); len.div_ceil(64)], len }
    }
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Capacity = Capacity { max_reqs: 3, max_tokens: 5, max_kv_indices: 7 };

    #[test]
    fn arrays_are_aligned_ordered_and_disjoint() {
        let l = StepLayout::new(CAP);
        let ranges = [
            &l.req_slot,
            &l.seq_len,
            &l.qo_indptr,
            &l.kv_indptr,
            &l.kv_last_page_len,
            &l.input_ids,
            &l.positions,
            &l.out_loc,
            &l.kv_indices,
            &l.join_slot,
            &l.join_temperature,
            &l.join_top_p,
            &l.join_top_k,
            &l.join_seed,
        ];
        let mut prev_end = SLOT_HEADER_BYTES;
        for r in ranges {
            assert_eq!(r.start % ALIGN, 0);
            assert!(r.start >= prev_end);
            assert!(r.start - prev_end < ALIGN, "no gap wider than the alignment");
            prev_end = r.end;
        }
        assert_eq!(l.qo_indptr.len(), 4 * 4);
        assert_eq!(l.join_seed.len(), 3 * 8);
        assert_eq!(l.slot_bytes, prev_end.next_multiple_of(ALIGN));
    }

    #[test]
    fn what_is_written_reads_back() {
        let l = StepLayout::new(CAP);
        let mut buf = SlotBuf::zeroed(l.slot_bytes);
        {
            let s = StepMut::new(&l, buf.bytes_mut());
            *s.header = StepHeader {
                step_id: 9,
                kind: 1,
                num_reqs: 2,
                num_tokens: 2,
                num_kv_indices: 3,
                num_joins: 1,
                ..Default::default()
            };
            s.req_slot[..2].copy_from_slice(&[4, 1]);
            s.kv_indices[..3].copy_from_slice(&[7, 8, 9]);
            s.join_seed[0] = u64::MAX;
            s.join_temperature[0] = 0.5;
        }
        let r = StepRef::new(&l, buf.bytes());
        assert_eq!(r.header.step_id, 9);
        assert_eq!(r.req_slot, &[4, 1]);
        assert_eq!(r.kv_indices, &[7, 8, 9]);
        assert_eq!(r.join_seed, &[u64::MAX]);
        assert_eq!(r.join_temperature, &[0.5]);
        assert_eq!(r.qo_indptr.len(), 3);
    }

    #[test]
    fn results_read_back() {
        let l = ResultLayout::new(4);
        let mut buf = SlotBuf::zeroed(l.slot_bytes);
        {
            let r = ResultMut::new(&l, buf.bytes_mut());
            r.header.step_id = 3;
            r.header.num_reqs = 2;
            r.tokens[..2].copy_from_slice(&[151645, -1]);
        }
        let r = ResultRef::new(&l, buf.bytes());
        assert_eq!((r.header.step_id, r.tokens), (3, &[151645, -1][..]));
    }
}
