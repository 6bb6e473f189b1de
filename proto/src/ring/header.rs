//! The 512-byte ring header of docs/protocol.md section 3: its offsets, and a plain snapshot of its contents that
//! can be encoded to and decoded from bytes (golden files, diagnostics) without a mapping.

use super::RingError;
use crate::step::{Capacity, ResultLayout, StepLayout};

pub const MAGIC: u64 = u64::from_le_bytes(*b"MSGLRING");
/// 2: the slot headers count logit-bias entries and logprobs, and the join arrays carry penalties, min_p, logprobs
/// and logit bias. 3: token masks (the header's `mask_words`, the step's `mask_row` and `mask_bits`). 4: prompt
/// logprobs (the step's `logprob_target`, the result's `prompt_*` arrays, which make its size depend on T).
pub const VERSION: u32 = 4;
pub const HEADER_BYTES: usize = 512;
pub const MAX_READERS: usize = 4;

pub(crate) const OFF_MAGIC: usize = 0;
pub(crate) const OFF_VERSION: usize = 8;
pub(crate) const OFF_KIND: usize = 12;
pub(crate) const OFF_HEADER_BYTES: usize = 16;
pub(crate) const OFF_SLOT_COUNT: usize = 20;
pub(crate) const OFF_SLOT_BYTES: usize = 24;
pub(crate) const OFF_NUM_READERS: usize = 28;
pub(crate) const OFF_WRITER_PID: usize = 32;
pub(crate) const OFF_WRITER_HEARTBEAT: usize = 40;
pub(crate) const OFF_MAX_REQS: usize = 48;
pub(crate) const OFF_MAX_TOKENS: usize = 52;
pub(crate) const OFF_MAX_KV_INDICES: usize = 56;
pub(crate) const OFF_PAGE_SIZE: usize = 60;
pub(crate) const OFF_WRITE_SEQ: usize = 64;
/// Fixed at creation like the capacities; the first 64 bytes had no room left.
pub(crate) const OFF_MASK_WORDS: usize = 72;

/// Each reader's words share one cache line, away from the writer's, so the two sides do not false-share.
pub(crate) const fn off_read_seq(reader: usize) -> usize {
    128 + 64 * reader
}
pub(crate) const fn off_reader_pid(reader: usize) -> usize {
    136 + 64 * reader
}
pub(crate) const fn off_reader_heartbeat(reader: usize) -> usize {
    144 + 64 * reader
}

const _: () = assert!(off_reader_heartbeat(MAX_READERS - 1) + 8 <= 384);

/// What a ring carries; the numbers are the header's `kind` field.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RingKind {
    Step = 1,
    Result = 2,
}

impl RingKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Step),
            2 => Some(Self::Result),
            _ => None,
        }
    }

    /// The smallest slot that holds this kind's layout for `cap` (always a multiple of 64).
    pub fn min_slot_bytes(self, cap: Capacity) -> usize {
        match self {
            Self::Step => StepLayout::new(cap).slot_bytes,
            Self::Result => ResultLayout::new(cap).slot_bytes,
        }
    }
}

/// One reader's words in the header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReaderState {
    pub read_seq: u64,
    pub pid: u32,
    pub heartbeat_ms: u64,
}

/// Every field of a ring header, as plain values. A snapshot of a live ring is not atomic as a whole; each word
/// is read atomically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingHeader {
    pub kind: RingKind,
    pub slot_count: u32,
    pub slot_bytes: u32,
    pub num_readers: u32,
    pub writer_pid: u32,
    pub writer_heartbeat_ms: u64,
    pub cap: Capacity,
    pub page_size: u32,
    pub write_seq: u64,
    pub readers: [ReaderState; MAX_READERS],
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

impl RingHeader {
    /// A header for a freshly created ring: no pids, no heartbeats, nothing published.
    pub fn new(
        kind: RingKind,
        slot_count: u32,
        slot_bytes: u32,
        cap: Capacity,
        page_size: u32,
        num_readers: u32,
    ) -> Self {
        RingHeader {
            kind,
            slot_count,
            slot_bytes,
            num_readers,
            writer_pid: 0,
            writer_heartbeat_ms: 0,
            cap,
            page_size,
            write_seq: 0,
            readers: [ReaderState::default(); MAX_READERS],
        }
    }

    /// Rejects a shape the protocol does not allow, so that a bad header is caught where it is made.
    pub fn validate(&self) -> Result<(), RingError> {
        let bad = |m: String| Err(RingError::BadHeader(m));
        if self.slot_count == 0 {
            return bad("slot count is 0".into());
        }
        if !(1..=MAX_READERS as u32).contains(&self.num_readers) {
            return bad(format!("{} readers; 1..={MAX_READERS} allowed", self.num_readers));
        }
        if !self.slot_bytes.is_multiple_of(64) {
            return bad(format!("slot bytes {} not a multiple of 64", self.slot_bytes));
        }
        let need = self.kind.min_slot_bytes(self.cap);
        if (self.slot_bytes as usize) < need {
            return bad(format!("slot bytes {} below the {need} that the capacities need", self.slot_bytes));
        }
        if self.page_size == 0 {
            return bad("page size is 0".into());
        }
        Ok(())
    }

    /// Bytes of the whole segment: header plus slots.
    pub fn segment_bytes(&self) -> usize {
        HEADER_BYTES + self.slot_count as usize * self.slot_bytes as usize
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        put_u64(&mut b, OFF_MAGIC, MAGIC);
        put_u32(&mut b, OFF_VERSION, VERSION);
        put_u32(&mut b, OFF_KIND, self.kind as u32);
        put_u32(&mut b, OFF_HEADER_BYTES, HEADER_BYTES as u32);
        put_u32(&mut b, OFF_SLOT_COUNT, self.slot_count);
        put_u32(&mut b, OFF_SLOT_BYTES, self.slot_bytes);
        put_u32(&mut b, OFF_NUM_READERS, self.num_readers);
        put_u32(&mut b, OFF_WRITER_PID, self.writer_pid);
        put_u64(&mut b, OFF_WRITER_HEARTBEAT, self.writer_heartbeat_ms);
        put_u32(&mut b, OFF_MAX_REQS, self.cap.max_reqs);
        put_u32(&mut b, OFF_MAX_TOKENS, self.cap.max_tokens);
        put_u32(&mut b, OFF_MAX_KV_INDICES, self.cap.max_kv_indices);
        put_u32(&mut b, OFF_PAGE_SIZE, self.page_size);
        put_u64(&mut b, OFF_WRITE_SEQ, self.write_seq);
        put_u32(&mut b, OFF_MASK_WORDS, self.cap.mask_words);
        for (i, r) in self.readers.iter().enumerate() {
            put_u64(&mut b, off_read_seq(i), r.read_seq);
            put_u32(&mut b, off_reader_pid(i), r.pid);
            put_u64(&mut b, off_reader_heartbeat(i), r.heartbeat_ms);
        }
        b
    }

    /// Checks magic, version, header size and kind, then reads every field.
    pub fn decode(b: &[u8]) -> Result<Self, RingError> {
        if b.len() < HEADER_BYTES {
            return Err(RingError::BadHeader(format!("{} bytes, a header is {HEADER_BYTES}", b.len())));
        }
        let magic = get_u64(b, OFF_MAGIC);
        if magic != MAGIC {
            return Err(RingError::BadMagic(magic));
        }
        let version = get_u32(b, OFF_VERSION);
        if version != VERSION {
            return Err(RingError::BadVersion(version));
        }
        let header_bytes = get_u32(b, OFF_HEADER_BYTES);
        if header_bytes as usize != HEADER_BYTES {
            return Err(RingError::BadHeader(format!("header bytes field is {header_bytes}")));
        }
        let kind_raw = get_u32(b, OFF_KIND);
        let kind = RingKind::from_u32(kind_raw).ok_or(RingError::BadHeader(format!("ring kind {kind_raw}")))?;
        let readers = std::array::from_fn(|i| ReaderState {
            read_seq: get_u64(b, off_read_seq(i)),
            pid: get_u32(b, off_reader_pid(i)),
            heartbeat_ms: get_u64(b, off_reader_heartbeat(i)),
        });
        let h = RingHeader {
            kind,
            slot_count: get_u32(b, OFF_SLOT_COUNT),
            slot_bytes: get_u32(b, OFF_SLOT_BYTES),
            num_readers: get_u32(b, OFF_NUM_READERS),
            writer_pid: get_u32(b, OFF_WRITER_PID),
            writer_heartbeat_ms: get_u64(b, OFF_WRITER_HEARTBEAT),
            cap: Capacity {
                max_reqs: get_u32(b, OFF_MAX_REQS),
                max_tokens: get_u32(b, OFF_MAX_TOKENS),
                max_kv_indices: get_u32(b, OFF_MAX_KV_INDICES),
                mask_words: get_u32(b, OFF_MASK_WORDS),
            },
            page_size: get_u32(b, OFF_PAGE_SIZE),
            write_seq: get_u64(b, OFF_WRITE_SEQ),
            readers,
        };
        h.validate()?;
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP: Capacity = Capacity { max_reqs: 4, max_tokens: 8, max_kv_indices: 6, mask_words: 3 };

    #[test]
    fn magic_is_the_ascii_tag() {
        assert_eq!(MAGIC, 0x474e49524c47534d);
    }

    #[test]
    fn encode_decode_round_trip() {
        let mut h = RingHeader::new(RingKind::Step, 4, RingKind::Step.min_slot_bytes(CAP) as u32, CAP, 16, 2);
        h.writer_pid = 7;
        h.write_seq = u64::MAX - 1;
        h.readers[1] = ReaderState { read_seq: 3, pid: 9, heartbeat_ms: 12 };
        assert_eq!(RingHeader::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn decode_rejects_foreign_bytes() {
        let h = RingHeader::new(RingKind::Result, 2, 128, CAP, 16, 1);
        let mut b = h.encode();
        b[OFF_VERSION] = 2;
        assert!(matches!(RingHeader::decode(&b), Err(RingError::BadVersion(2))));
        b[0] ^= 1;
        assert!(matches!(RingHeader::decode(&b), Err(RingError::BadMagic(_))));
        assert!(matches!(RingHeader::decode(&[0; 100]), Err(RingError::BadHeader(_))));
    }

    #[test]
    fn validate_catches_bad_shapes() {
        let ok = RingHeader::new(RingKind::Result, 2, RingKind::Result.min_slot_bytes(CAP) as u32, CAP, 16, 1);
        assert!(ok.validate().is_ok());
        for bad in [
            RingHeader { slot_count: 0, ..ok.clone() },
            RingHeader { num_readers: 0, ..ok.clone() },
            RingHeader { num_readers: 5, ..ok.clone() },
            RingHeader { slot_bytes: 100, ..ok.clone() },
            RingHeader { slot_bytes: 64, ..ok.clone() },
            RingHeader { page_size: 0, ..ok.clone() },
        ] {
            assert!(matches!(bad.validate(), Err(RingError::BadHeader(_))), "{bad:?}");
        }
    }
}
