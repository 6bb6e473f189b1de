//! What one ring slot holds: the step the scheduler asks for, and the worker's result (docs/protocol.md,
//! "Step slot" and "Result slot"). Offsets follow from the ring's capacities alone, so both processes derive the
//! same layout from the ring header without negotiating anything else.
//!
//! Each slot's arrays are listed once, in [`slot_arrays!`] tables below: name, element type and [`Basis`]. The
//! layout (byte ranges), the writer's view (`*Mut`, every array at full capacity) and the reader's view (`*Ref`,
//! every array cut to its used length) are generated from that table, and so is [`ArraySpec`], the description
//! that the golden test writes out for the Python mirror (worker_py/minisgl/proto/step.py) to check against its own
//! table. Adding an array is one line here and one there.

use bytemuck::{Pod, Zeroable};
use std::ops::Range;

#[cfg(not(target_endian = "little"))]
compile_error!("the ring layout is little-endian and is read in place");

/// Every array in a slot starts on a cache line, which also satisfies the alignment numpy and torch want.
pub const ALIGN: usize = 64;
pub const SLOT_HEADER_BYTES: usize = 64;
/// Logit-bias entries one request may send, as OpenAI's API allows. A step has room for this many per request, so
/// joins never have to wait for room in the bias arrays.
pub const MAX_LOGIT_BIAS: usize = 300;
/// Top logprobs one request may ask for per sampled token, as OpenAI's API allows.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// How many requests, tokens and KV page indices one slot can describe, and the words of one token mask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub max_reqs: u32,
    pub max_tokens: u32,
    pub max_kv_indices: u32,
    /// W: 32-bit words of one token mask, `ceil(vocab / 32)` for the model's logits; 0 leaves no room for masks.
    pub mask_words: u32,
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
    /// Logit-bias entries of all the joins together.
    pub num_bias: u32,
    /// Token masks in `mask_bits` (at most one per request), each `mask_words` long.
    pub num_masks: u32,
    /// 1 when some request of the step asks for its prompt's logprobs: `logprob_target` then has `num_tokens`
    /// entries, else none.
    pub prompt_logprobs: u32,
    /// The most top logprobs any request asks for at its prompt positions (0 ..= 20).
    pub prompt_top: u32,
    pub _reserved: [u32; 5],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ResultHeader {
    pub step_id: u64,
    pub num_reqs: u32,
    pub status: u32,
    /// 1 when `logprob` holds the sampled token's logprob for every request of the step, else 0.
    pub logprobs: u32,
    /// Top logprobs per request in `top_ids` and `top_logprobs` (0 ..= 20), rows packed one after another.
    pub num_top: u32,
    /// Prompt-logprob entries `p`: one per position of the step whose `logprob_target` is a token, in step order.
    pub num_prompt: u32,
    /// Top entries per prompt-logprob entry (0 ..= 20), rows packed one after another.
    pub prompt_top: u32,
    pub _reserved: [u32; 8],
}

const _: () = assert!(std::mem::size_of::<StepHeader>() == SLOT_HEADER_BYTES);
const _: () = assert!(std::mem::size_of::<ResultHeader>() == SLOT_HEADER_BYTES);

/// What an array's length follows: its capacity from the ring's capacities (R, T, K), its used length from the
/// slot header's counts. The names are the protocol's ("length used" in docs/protocol.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Basis {
    /// R entries, `n` used: one per request.
    Reqs,
    /// R + 1 entries, `n + 1` used: an indptr over requests.
    ReqsPlus1,
    /// T entries, `t` used: one per new token.
    Tokens,
    /// K entries, `k` used.
    KvIndices,
    /// R entries, `j` used: one per join.
    Joins,
    /// R + 1 entries, `j + 1` used: an indptr over joins.
    JoinsPlus1,
    /// R * MAX_LOGIT_BIAS entries, `b` used.
    Bias,
    /// R entries; `n` used when the result header's `logprobs` is 1, else none.
    Logprobs,
    /// R * MAX_TOP_LOGPROBS entries; `n * m` used when logprobs are there, with `m` the header's `num_top`.
    TopLogprobs,
    /// R * W entries, `g * W` used: the step's token masks, W words each.
    Masks,
    /// T entries; `t` used when the step header's `prompt_logprobs` is 1, else none.
    Targets,
    /// T entries, `p` used: one per prompt-logprob entry of a result.
    PromptLogprobs,
    /// T * MAX_TOP_LOGPROBS entries, `p * q` used, with `q` the result header's `prompt_top`.
    PromptTop,
}

impl Basis {
    /// The protocol's name for the used length.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Reqs => "n",
            Self::ReqsPlus1 => "n+1",
            Self::Tokens => "t",
            Self::KvIndices => "k",
            Self::Joins => "j",
            Self::JoinsPlus1 => "j+1",
            Self::Bias => "b",
            Self::Logprobs => "l",
            Self::TopLogprobs => "l*m",
            Self::Masks => "g*W",
            Self::Targets => "u",
            Self::PromptLogprobs => "p",
            Self::PromptTop => "p*q",
        }
    }

    /// The protocol's name for the capacity.
    pub const fn capacity_name(self) -> &'static str {
        match self {
            Self::Reqs | Self::Joins | Self::Logprobs => "R",
            Self::ReqsPlus1 | Self::JoinsPlus1 => "R+1",
            Self::Tokens => "T",
            Self::KvIndices => "K",
            Self::Bias => "R*300",
            Self::TopLogprobs => "R*20",
            Self::Masks => "R*W",
            Self::Targets | Self::PromptLogprobs => "T",
            Self::PromptTop => "T*20",
        }
    }

    pub fn capacity(self, cap: &Capacity) -> usize {
        let (r, t, k) = (cap.max_reqs as usize, cap.max_tokens as usize, cap.max_kv_indices as usize);
        match self {
            Self::Reqs | Self::Joins | Self::Logprobs => r,
            Self::ReqsPlus1 | Self::JoinsPlus1 => r + 1,
            Self::Tokens => t,
            Self::KvIndices => k,
            Self::Bias => r * MAX_LOGIT_BIAS,
            Self::TopLogprobs => r * MAX_TOP_LOGPROBS,
            Self::Masks => r * cap.mask_words as usize,
            Self::Targets | Self::PromptLogprobs => t,
            Self::PromptTop => t * MAX_TOP_LOGPROBS,
        }
    }
}

const _: () = assert!(MAX_LOGIT_BIAS == 300 && MAX_TOP_LOGPROBS == 20, "Basis::capacity_name spells them out");

/// A slot header: the counts that cut each array to its used length.
pub trait SlotHeader: Pod {
    /// Computed in `usize`, so that counts a broken peer wrote cannot overflow before they are checked.
    fn used(&self, basis: Basis) -> usize;
    /// What the header must satisfy beyond each array's used length fitting its capacity.
    fn check(&self) -> Result<(), String> {
        Ok(())
    }
}

impl SlotHeader for StepHeader {
    fn used(&self, basis: Basis) -> usize {
        let n = |count: u32| count as usize;
        match basis {
            Basis::Reqs => n(self.num_reqs),
            Basis::ReqsPlus1 => n(self.num_reqs) + 1,
            Basis::Tokens => n(self.num_tokens),
            Basis::KvIndices => n(self.num_kv_indices),
            Basis::Joins => n(self.num_joins),
            Basis::JoinsPlus1 => n(self.num_joins) + 1,
            Basis::Bias => n(self.num_bias),
            // Read only through the layout, which knows W: see `StepRef::new`.
            Basis::Masks => n(self.num_masks),
            Basis::Targets => {
                if self.prompt_logprobs != 0 {
                    n(self.num_tokens)
                } else {
                    0
                }
            }
            Basis::Logprobs | Basis::TopLogprobs | Basis::PromptLogprobs | Basis::PromptTop => {
                unreachable!("a step slot has no {basis:?} array")
            }
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.prompt_logprobs > 1 {
            return Err(format!("prompt_logprobs flag {}, not 0 or 1", self.prompt_logprobs));
        }
        if self.prompt_top as usize > MAX_TOP_LOGPROBS {
            return Err(format!("{} top prompt logprobs a position; at most {MAX_TOP_LOGPROBS}", self.prompt_top));
        }
        Ok(())
    }
}

impl SlotHeader for ResultHeader {
    fn used(&self, basis: Basis) -> usize {
        let l = if self.logprobs != 0 { self.num_reqs as usize } else { 0 };
        match basis {
            Basis::Reqs => self.num_reqs as usize,
            Basis::Logprobs => l,
            Basis::TopLogprobs => l * self.num_top as usize,
            Basis::PromptLogprobs => self.num_prompt as usize,
            Basis::PromptTop => self.num_prompt as usize * self.prompt_top as usize,
            _ => unreachable!("a result slot has no {basis:?} array"),
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.logprobs > 1 {
            return Err(format!("logprobs flag {}, not 0 or 1", self.logprobs));
        }
        if self.num_top as usize > MAX_TOP_LOGPROBS {
            return Err(format!("{} top logprobs a request; at most {MAX_TOP_LOGPROBS}", self.num_top));
        }
        if self.prompt_top as usize > MAX_TOP_LOGPROBS {
            return Err(format!("{} top prompt logprobs an entry; at most {MAX_TOP_LOGPROBS}", self.prompt_top));
        }
        Ok(())
    }
}

/// The element types arrays may have, with the protocol's names for them.
pub trait Elem: Pod {
    const NAME: &'static str;
}

impl Elem for i32 {
    const NAME: &'static str = "i32";
}
impl Elem for f32 {
    const NAME: &'static str = "f32";
}
impl Elem for u32 {
    const NAME: &'static str = "u32";
}
impl Elem for u64 {
    const NAME: &'static str = "u64";
}

/// One row of a slot's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArraySpec {
    pub name: &'static str,
    pub elem: &'static str,
    pub elem_bytes: usize,
    pub basis: Basis,
}

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

/// Cuts the next array, at `range`, off the front of `rest` (which starts at byte `at` of the slot).
fn take_mut<'a>(rest: &mut &'a mut [u8], at: &mut usize, range: &Range<usize>) -> &'a mut [u8] {
    let buf = std::mem::take(rest);
    let (_, buf) = buf.split_at_mut(range.start - *at);
    let (piece, tail) = buf.split_at_mut(range.len());
    *rest = tail;
    *at = range.end;
    piece
}

/// Generates, from one table of `name: type = Basis`, a slot's layout, its mutable view and its read view.
macro_rules! slot_arrays {
    (
        $(#[$layout_doc:meta])* $Layout:ident,
        $(#[$mut_doc:meta])* $Mut:ident,
        $(#[$ref_doc:meta])* $Ref:ident,
        $Header:ty {
            $( $(#[$doc:meta])* $name:ident : $ty:ty = $basis:ident, )+
        }
    ) => {
        $(#[$layout_doc])*
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub struct $Layout {
            pub cap: Capacity,
            $( $(#[$doc])* pub $name: Range<usize>, )+
            pub slot_bytes: usize,
        }

        impl $Layout {
            /// The table, in protocol order.
            pub const ARRAYS: &'static [ArraySpec] = &[
                $( ArraySpec {
                    name: stringify!($name),
                    elem: <$ty as Elem>::NAME,
                    elem_bytes: std::mem::size_of::<$ty>(),
                    basis: Basis::$basis,
                }, )+
            ];

            fn with_capacity(cap: Capacity) -> Self {
                let mut c = Cursor(SLOT_HEADER_BYTES);
                $( let $name = c.place(Basis::$basis.capacity(&cap), std::mem::size_of::<$ty>()); )+
                Self { cap, $( $name, )+ slot_bytes: c.end() }
            }

            /// Elements per counted entry: W for the masks (the header counts masks), 1 for everything else.
            fn per_entry(&self, basis: Basis) -> usize {
                if basis == Basis::Masks { self.cap.mask_words as usize } else { 1 }
            }

            /// Each array's description and byte range, in protocol order.
            pub fn ranges(&self) -> impl Iterator<Item = (&'static ArraySpec, &Range<usize>)> {
                Self::ARRAYS.iter().zip([$( &self.$name, )+])
            }
        }

        $(#[$mut_doc])*
        pub struct $Mut<'a> {
            pub header: &'a mut $Header,
            $( pub $name: &'a mut [$ty], )+
        }

        impl<'a> $Mut<'a> {
            /// `buf` must be at least `layout.slot_bytes` long and 64-byte aligned (ring slots and [`SlotBuf`] are).
            pub fn new(layout: &$Layout, buf: &'a mut [u8]) -> Self {
                assert!(buf.len() >= layout.slot_bytes, "slot buffer smaller than its layout");
                let (header, mut rest) = buf.split_at_mut(SLOT_HEADER_BYTES);
                let mut at = SLOT_HEADER_BYTES;
                $( let $name = bytemuck::cast_slice_mut(take_mut(&mut rest, &mut at, &layout.$name)); )+
                Self { header: bytemuck::from_bytes_mut(header), $( $name, )+ }
            }

            /// Every array's bytes at full capacity, in protocol order (tests fill them without naming each).
            pub fn for_each_bytes_mut(&mut self, mut f: impl FnMut(&'static ArraySpec, &mut [u8])) {
                let mut specs = $Layout::ARRAYS.iter();
                $( f(specs.next().expect("one spec per array"), bytemuck::cast_slice_mut(&mut *self.$name)); )+
            }
        }

        $(#[$ref_doc])*
        #[derive(Debug)]
        pub struct $Ref<'a> {
            pub header: $Header,
            $( pub $name: &'a [$ty], )+
        }

        impl<'a> $Ref<'a> {
            pub fn new(layout: &$Layout, buf: &'a [u8]) -> Self {
                let header: $Header = *bytemuck::from_bytes(&buf[..SLOT_HEADER_BYTES]);
                $(
                    let used = header.used(Basis::$basis) * layout.per_entry(Basis::$basis);
                    let $name = &bytemuck::cast_slice::<u8, $ty>(&buf[layout.$name.clone()])[..used];
                )+
                Self { header, $( $name, )+ }
            }

            /// `new`, for bytes another process wrote: a header whose counts do not fit the layout is an error, not a
            /// panic.
            pub fn try_new(layout: &$Layout, buf: &'a [u8]) -> Result<Self, String> {
                if buf.len() < layout.slot_bytes {
                    return Err(format!("slot of {} bytes, its layout needs {}", buf.len(), layout.slot_bytes));
                }
                let header: $Header = *bytemuck::from_bytes(&buf[..SLOT_HEADER_BYTES]);
                header.check()?;
                $(
                    let used = header.used(Basis::$basis).saturating_mul(layout.per_entry(Basis::$basis));
                    let cap = Basis::$basis.capacity(&layout.cap);
                    if used > cap {
                        return Err(format!("{} of {used} entries, room for {cap}", stringify!($name)));
                    }
                )+
                Ok(Self::new(layout, buf))
            }

            /// Every array's used bytes, in protocol order.
            pub fn bytes(&self) -> impl Iterator<Item = (&'static ArraySpec, &'a [u8])> {
                $Layout::ARRAYS.iter().zip([$( bytemuck::cast_slice::<$ty, u8>(self.$name), )+])
            }
        }
    };
}

slot_arrays! {
    /// Byte ranges of a step slot's arrays, in protocol order.
    StepLayout,
    /// A step slot opened for writing: every array at full capacity, as disjoint mutable slices.
    StepMut,
    /// A step slot opened for reading, each array cut to the length its header gives.
    StepRef,
    StepHeader {
        req_slot: i32 = Reqs,
        seq_len: i32 = Reqs,
        qo_indptr: i32 = ReqsPlus1,
        kv_indptr: i32 = ReqsPlus1,
        kv_last_page_len: i32 = Reqs,
        input_ids: i32 = Tokens,
        positions: i32 = Tokens,
        out_loc: i32 = Tokens,
        kv_indices: i32 = KvIndices,
        join_slot: i32 = Joins,
        join_temperature: f32 = Joins,
        join_top_p: f32 = Joins,
        join_top_k: i32 = Joins,
        join_seed: u64 = Joins,
        join_min_p: f32 = Joins,
        join_presence_penalty: f32 = Joins,
        join_frequency_penalty: f32 = Joins,
        join_repetition_penalty: f32 = Joins,
        join_prompt_len: i32 = Joins,
        join_logprobs: i32 = Joins,
        join_bias_indptr: i32 = JoinsPlus1,
        join_bias_ids: i32 = Bias,
        join_bias_values: f32 = Bias,
        /// Per request: its row in `mask_bits`, or -1 for no mask.
        mask_row: i32 = Reqs,
        /// `num_masks` rows of W words; bit `i % 32` of word `i / 32` set means token `i` may be sampled.
        mask_bits: u32 = Masks,
        /// Per new token: the token whose logprob the worker returns for this position's logits, or -1 for none.
        logprob_target: i32 = Targets,
    }
}

impl StepLayout {
    pub fn new(cap: Capacity) -> Self {
        Self::with_capacity(cap)
    }
}

slot_arrays! {
    /// Byte ranges of a result slot's arrays.
    ResultLayout,
    /// A result slot opened for writing.
    ResultMut,
    /// A result slot opened for reading: `tokens` cut to the header's request count, the logprob arrays to what
    /// the header says the step carries (empty when it carries none).
    ResultRef,
    ResultHeader {
        tokens: i32 = Reqs,
        logprob: f32 = Logprobs,
        top_ids: i32 = TopLogprobs,
        top_logprobs: f32 = TopLogprobs,
        /// Per position of the step with a `logprob_target`, in step order: that target's logprob.
        prompt_logprob: f32 = PromptLogprobs,
        /// Entry e's `prompt_top` most likely tokens are entries `e*q .. (e+1)*q`.
        prompt_top_ids: i32 = PromptTop,
        prompt_top_logprobs: f32 = PromptTop,
    }
}

impl ResultLayout {
    /// R and T matter to a result slot (K and W do not).
    pub fn new(cap: Capacity) -> Self {
        Self::with_capacity(Capacity { max_kv_indices: 0, mask_words: 0, ..cap })
    }
}

impl ResultRef<'_> {
    /// The logprobs of the `r`-th request's sampled token, when the step carries them: its own logprob, then the
    /// ids and logprobs of the `num_top` most likely tokens, most likely first.
    pub fn logprobs_of(&self, r: usize) -> Option<(f32, &[i32], &[f32])> {
        let &lp = self.logprob.get(r)?;
        let m = self.header.num_top as usize;
        Some((lp, &self.top_ids[r * m..(r + 1) * m], &self.top_logprobs[r * m..(r + 1) * m]))
    }

    /// Prompt-logprob entry `e`: its target's logprob, then the ids and logprobs of the `prompt_top` most likely
    /// tokens at its position.
    pub fn prompt_logprobs_of(&self, e: usize) -> Option<(f32, &[i32], &[f32])> {
        let &lp = self.prompt_logprob.get(e)?;
        let q = self.header.prompt_top as usize;
        Some((lp, &self.prompt_top_ids[e * q..(e + 1) * q], &self.prompt_top_logprobs[e * q..(e + 1) * q]))
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

    const CAP: Capacity = Capacity { max_reqs: 3, max_tokens: 5, max_kv_indices: 7, mask_words: 2 };

    fn check_ranges<'a>(ranges: impl Iterator<Item = (&'static ArraySpec, &'a Range<usize>)>, cap: &Capacity) {
        let mut prev_end = SLOT_HEADER_BYTES;
        for (spec, r) in ranges {
            assert_eq!(r.start % ALIGN, 0, "{}", spec.name);
            assert!(r.start >= prev_end, "{}", spec.name);
            assert!(r.start - prev_end < ALIGN, "no gap wider than the alignment");
            assert_eq!(r.len(), spec.basis.capacity(cap) * spec.elem_bytes, "{}", spec.name);
            prev_end = r.end;
        }
    }

    #[test]
    fn arrays_are_aligned_ordered_and_disjoint() {
        let l = StepLayout::new(CAP);
        check_ranges(l.ranges(), &CAP);
        assert_eq!(l.qo_indptr.len(), 4 * 4);
        assert_eq!(l.join_seed.len(), 3 * 8);
        assert_eq!(l.join_bias_ids.len(), 3 * 300 * 4);
        assert_eq!(l.mask_bits.len(), 3 * 2 * 4);
        assert_eq!(l.logprob_target.len(), 5 * 4);
        assert_eq!(l.slot_bytes, l.logprob_target.end.next_multiple_of(ALIGN));
        let r = ResultLayout::new(Capacity { max_reqs: 3, ..CAP });
        check_ranges(r.ranges(), &r.cap);
        assert_eq!(r.top_ids.len(), 3 * 20 * 4);
        assert_eq!(r.prompt_top_ids.len(), 5 * 20 * 4);
        assert_eq!(r.slot_bytes, r.prompt_top_logprobs.end.next_multiple_of(ALIGN));
    }

    #[test]
    fn every_array_is_named_once() {
        for arrays in [StepLayout::ARRAYS, ResultLayout::ARRAYS] {
            let mut names: Vec<_> = arrays.iter().map(|a| a.name).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(names.len(), arrays.len());
        }
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
                num_bias: 2,
                num_masks: 1,
                ..Default::default()
            };
            s.req_slot[..2].copy_from_slice(&[4, 1]);
            s.mask_row[..2].copy_from_slice(&[-1, 0]);
            s.mask_bits[..2].copy_from_slice(&[0x8000_0001, 7]);
            s.kv_indices[..3].copy_from_slice(&[7, 8, 9]);
            s.join_seed[0] = u64::MAX;
            s.join_temperature[0] = 0.5;
            s.join_bias_indptr[..2].copy_from_slice(&[0, 2]);
            s.join_bias_ids[..2].copy_from_slice(&[11, 12]);
            s.join_bias_values[..2].copy_from_slice(&[-100.0, 2.5]);
        }
        let r = StepRef::new(&l, buf.bytes());
        assert_eq!(r.header.step_id, 9);
        assert_eq!(r.req_slot, &[4, 1]);
        assert_eq!(r.kv_indices, &[7, 8, 9]);
        assert_eq!(r.join_seed, &[u64::MAX]);
        assert_eq!(r.join_temperature, &[0.5]);
        assert_eq!(r.qo_indptr.len(), 3);
        assert_eq!(r.join_bias_indptr, &[0, 2]);
        assert_eq!((r.join_bias_ids, r.join_bias_values), (&[11, 12][..], &[-100.0, 2.5][..]));
        let used: Vec<_> = r.bytes().map(|(a, b)| (a.name, b.len())).collect();
        assert_eq!(&used[..3], &[("req_slot", 8), ("seq_len", 8), ("qo_indptr", 12)]);
        assert_eq!((r.mask_row, r.mask_bits), (&[-1, 0][..], &[0x8000_0001, 7][..]));
        // A step that asks for no prompt logprobs has no targets.
        assert_eq!(&used[used.len() - 2..], &[("mask_bits", 8), ("logprob_target", 0)]);
    }

    #[test]
    fn the_mutable_view_visits_every_array_in_order() {
        let l = StepLayout::new(CAP);
        let mut buf = SlotBuf::zeroed(l.slot_bytes);
        let mut seen = vec![];
        StepMut::new(&l, buf.bytes_mut()).for_each_bytes_mut(|spec, bytes| {
            bytes.fill(0xab);
            seen.push((spec.name, bytes.len()));
        });
        let expected: Vec<_> = l.ranges().map(|(a, r)| (a.name, r.len())).collect();
        assert_eq!(seen, expected);
        // Everything but the header and the alignment gaps was filled.
        let filled = buf.bytes().iter().filter(|&&b| b == 0xab).count();
        assert_eq!(filled, l.ranges().map(|(_, r)| r.len()).sum::<usize>());
    }

    #[test]
    fn results_read_back() {
        let l = ResultLayout::new(Capacity { max_reqs: 4, ..CAP });
        let mut buf = SlotBuf::zeroed(l.slot_bytes);
        {
            let r = ResultMut::new(&l, buf.bytes_mut());
            r.header.step_id = 3;
            r.header.num_reqs = 2;
            r.tokens[..2].copy_from_slice(&[151645, -1]);
        }
        let r = ResultRef::new(&l, buf.bytes());
        assert_eq!((r.header.step_id, r.tokens), (3, &[151645, -1][..]));
        assert!(r.logprob.is_empty() && r.top_ids.is_empty() && r.logprobs_of(0).is_none());
    }

    #[test]
    fn logprobs_read_back_per_request() {
        let l = ResultLayout::new(Capacity { max_reqs: 4, ..CAP });
        let mut buf = SlotBuf::zeroed(l.slot_bytes);
        {
            let r = ResultMut::new(&l, buf.bytes_mut());
            *r.header = ResultHeader { step_id: 5, num_reqs: 2, logprobs: 1, num_top: 2, ..Default::default() };
            r.tokens[..2].copy_from_slice(&[7, 9]);
            r.logprob[..2].copy_from_slice(&[-0.5, -1.25]);
            r.top_ids[..4].copy_from_slice(&[7, 3, 9, 7]);
            r.top_logprobs[..4].copy_from_slice(&[-0.5, -2.0, -1.25, -1.5]);
        }
        let r = ResultRef::new(&l, buf.bytes());
        assert_eq!(r.logprobs_of(0), Some((-0.5, &[7, 3][..], &[-0.5, -2.0][..])));
        assert_eq!(r.logprobs_of(1), Some((-1.25, &[9, 7][..], &[-1.25, -1.5][..])));
        assert_eq!(r.logprobs_of(2), None);
    }

    #[test]
    fn targets_are_read_only_when_the_step_asks_for_prompt_logprobs() {
        let l = StepLayout::new(CAP);
        let mut buf = SlotBuf::zeroed(l.slot_bytes);
        let write = |buf: &mut SlotBuf, flag: u32, top: u32| {
            let s = StepMut::new(&l, buf.bytes_mut());
            *s.header =
                StepHeader { num_reqs: 1, num_tokens: 3, prompt_logprobs: flag, prompt_top: top, ..Default::default() };
            s.logprob_target[..3].copy_from_slice(&[5, -1, 9]);
        };
        write(&mut buf, 0, 0);
        assert!(StepRef::try_new(&l, buf.bytes()).unwrap().logprob_target.is_empty());
        write(&mut buf, 1, 20);
        assert_eq!(StepRef::try_new(&l, buf.bytes()).unwrap().logprob_target, &[5, -1, 9]);
        write(&mut buf, 1, 21);
        assert!(StepRef::try_new(&l, buf.bytes()).unwrap_err().contains("21 top prompt logprobs"));
        write(&mut buf, 2, 0);
        assert!(StepRef::try_new(&l, buf.bytes()).unwrap_err().contains("prompt_logprobs flag 2"));
    }

    #[test]
    fn prompt_logprobs_read_back_per_entry() {
        let l = ResultLayout::new(CAP);
        let mut buf = SlotBuf::zeroed(l.slot_bytes);
        {
            let r = ResultMut::new(&l, buf.bytes_mut());
            *r.header = ResultHeader { num_reqs: 1, num_prompt: 2, prompt_top: 2, ..Default::default() };
            r.prompt_logprob[..2].copy_from_slice(&[-0.5, -3.0]);
            r.prompt_top_ids[..4].copy_from_slice(&[4, 8, 1, 2]);
            r.prompt_top_logprobs[..4].copy_from_slice(&[-0.5, -1.0, -0.25, -0.75]);
        }
        let r = ResultRef::try_new(&l, buf.bytes()).unwrap();
        assert_eq!(r.prompt_logprobs_of(1), Some((-3.0, &[1, 2][..], &[-0.25, -0.75][..])));
        assert_eq!(r.prompt_logprobs_of(2), None);
        assert!(r.logprobs_of(0).is_none(), "sampled-token logprobs are separate");
        // More entries than the step had tokens cannot be right.
        ResultMut::new(&l, buf.bytes_mut()).header.num_prompt = CAP.max_tokens + 1;
        assert!(ResultRef::try_new(&l, buf.bytes()).unwrap_err().contains("prompt_logprob of 6 entries"));
    }
}
