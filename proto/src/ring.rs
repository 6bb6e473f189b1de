//! The shared-memory ring of docs/protocol.md section 3: one segment under /dev/shm holding a 512-byte header and
//! `slot_count` fixed-size slots, one writer and up to four readers, coordinated by sequence numbers alone.
//!
//! This is the only module that knows about the `shared_memory` crate.

mod header;
mod wait;

pub use header::{HEADER_BYTES, MAGIC, MAX_READERS, ReaderState, RingHeader, RingKind, VERSION};
pub use wait::{Backoff, DEFAULT_SPIN, Liveness, process_alive, unix_ms};

use crate::step::Capacity;
use header::*;
use shared_memory::{Shmem, ShmemConf, ShmemError};
use std::cell::Cell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("shared memory segment {name:?}: {message}")]
    Shm { name: String, message: String },
    #[error("not a minisgl ring: magic {0:#018x}")]
    BadMagic(u64),
    #[error("ring layout version {0}, this build speaks version {VERSION}")]
    BadVersion(u32),
    #[error("bad ring header: {0}")]
    BadHeader(String),
    #[error("invalid ring name {0:?}: it must be non-empty and contain no '/' after an optional leading one")]
    BadName(String),
    #[error("{who} (pid {pid}) is gone")]
    PeerDead { who: String, pid: u32 },
    #[error("{who} (pid {pid}) has not sent a heartbeat for {age_ms} ms")]
    HeartbeatStale { who: String, pid: u32, age_ms: u64 },
    #[error("timed out waiting on the ring")]
    Timeout,
}

/// The mapping, made `Send`. `Shmem` holds a raw pointer to the mapping and a file descriptor; neither is tied to
/// the thread that created it (mmap'd memory is process-wide, and munmap, close and shm_unlink may run on any
/// thread), so moving the owner to another thread is sound. It is not `Sync`: all mutation of the slots goes
/// through `&mut Ring`, and sharing a `Ring` between threads is not something the engine needs.
struct Mapping {
    shm: Shmem,
    base: NonNull<u8>,
}

// SAFETY: see the type's comment; nothing in `Shmem` is thread-local.
unsafe impl Send for Mapping {}

/// One side's handle on a ring. The creator owns the segment and unlinks it when dropped; an opener only maps it.
/// A handle may act as the writer, as one or more readers (tests), or both; the roles are a matter of which
/// methods are called and which pid was attached.
pub struct Ring {
    map: Mapping,
    name: String,
    kind: RingKind,
    slot_count: u32,
    slot_bytes: usize,
    num_readers: u32,
    cap: Capacity,
    page_size: u32,
    /// True between a successful claim and its publish, so that a publish can never expose a slot still in use.
    claimed: bool,
    /// Per reader: true between a `try_read` that returned a slot and its `release`. Kept here, not read from the
    /// shared header, so that a peer that rewrites the sequence numbers cannot turn our own check into a panic.
    held: Cell<[bool; MAX_READERS]>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("slot_count", &self.slot_count)
            .field("slot_bytes", &self.slot_bytes)
            .field("num_readers", &self.num_readers)
            .field("owner", &self.map.shm.is_owner())
            .finish()
    }
}

fn check_name(name: &str) -> Result<(), RingError> {
    let bare = name.strip_prefix('/').unwrap_or(name);
    if bare.is_empty() || bare.contains('/') || bare.contains('\0') || bare.len() > 200 {
        return Err(RingError::BadName(name.to_string()));
    }
    Ok(())
}

fn shm_err(name: &str, e: ShmemError) -> RingError {
    RingError::Shm { name: name.to_string(), message: e.to_string() }
}

impl Ring {
    /// Creates the segment `/dev/shm/<name>`, zero-filled, with a header for these shapes. `slot_bytes` must be a
    /// multiple of 64 and at least [`RingKind::min_slot_bytes`]. A segment left behind under the same name by a
    /// killed run is removed first. The segment is unlinked when this handle is dropped.
    pub fn create(
        name: &str,
        kind: RingKind,
        slot_count: u32,
        slot_bytes: usize,
        cap: Capacity,
        page_size: u32,
        num_readers: u32,
    ) -> Result<Ring, RingError> {
        check_name(name)?;
        let slot_bytes32 =
            u32::try_from(slot_bytes).map_err(|_| RingError::BadHeader(format!("slot bytes {slot_bytes}")))?;
        let header = RingHeader::new(kind, slot_count, slot_bytes32, cap, page_size, num_readers);
        header.validate()?;
        let size = header.segment_bytes();
        let shm = match ShmemConf::new().os_id(name).size(size).create() {
            Err(ShmemError::MappingIdExists) => {
                // A stale segment from a killed run: take ownership so that dropping it unlinks it, then retry.
                let mut stale = ShmemConf::new().os_id(name).open().map_err(|e| shm_err(name, e))?;
                stale.set_owner(true);
                drop(stale);
                ShmemConf::new().os_id(name).size(size).create()
            }
            other => other,
        }
        .map_err(|e| shm_err(name, e))?;
        let base = NonNull::new(shm.as_ptr()).expect("mmap returned null");
        // SAFETY: the mapping is `size` bytes long and nobody else has seen it yet, so writing it is exclusive.
        // Zero-filling also faults every page in now rather than during the first steps.
        unsafe {
            std::ptr::write_bytes(base.as_ptr(), 0, size);
            let bytes = header.encode();
            std::ptr::copy_nonoverlapping(bytes.as_ptr().add(8), base.as_ptr().add(8), HEADER_BYTES - 8);
        }
        let ring = Ring::from_parts(Mapping { shm, base }, name, &header);
        // The magic goes in last, with release ordering: whoever sees it sees a complete header.
        ring.u64_at(OFF_MAGIC).store(MAGIC, Ordering::Release);
        Ok(ring)
    }

    /// Maps an existing ring (without owning it) and checks its header.
    pub fn open(name: &str) -> Result<Ring, RingError> {
        check_name(name)?;
        let shm = ShmemConf::new().os_id(name).open().map_err(|e| shm_err(name, e))?;
        let base = NonNull::new(shm.as_ptr()).expect("mmap returned null");
        if shm.len() < HEADER_BYTES {
            return Err(RingError::BadHeader(format!("segment is {} bytes", shm.len())));
        }
        let map = Mapping { shm, base };
        let magic = unsafe { &*(map.base.as_ptr() as *const AtomicU64) }.load(Ordering::Acquire);
        if magic != MAGIC {
            return Err(RingError::BadMagic(magic));
        }
        // SAFETY: the mapping is at least HEADER_BYTES long; the fields read here are written once, before the magic.
        let bytes = unsafe { std::slice::from_raw_parts(map.base.as_ptr(), HEADER_BYTES) };
        let header = RingHeader::decode(bytes)?;
        if map.shm.len() < header.segment_bytes() {
            return Err(RingError::BadHeader(format!(
                "segment is {} bytes, its header describes {}",
                map.shm.len(),
                header.segment_bytes()
            )));
        }
        Ok(Ring::from_parts(map, name, &header))
    }

    fn from_parts(map: Mapping, name: &str, h: &RingHeader) -> Ring {
        Ring {
            map,
            name: name.to_string(),
            kind: h.kind,
            slot_count: h.slot_count,
            slot_bytes: h.slot_bytes as usize,
            num_readers: h.num_readers,
            cap: h.cap,
            page_size: h.page_size,
            claimed: false,
            held: Cell::new([false; MAX_READERS]),
        }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        debug_assert!(off.is_multiple_of(8) && off + 8 <= HEADER_BYTES);
        // SAFETY: the mapping is page-aligned and at least HEADER_BYTES long, `off` is 8-aligned, and every access
        // to header words from this crate goes through atomics.
        unsafe { &*(self.map.base.as_ptr().add(off) as *const AtomicU64) }
    }

    fn u32_at(&self, off: usize) -> &AtomicU32 {
        debug_assert!(off.is_multiple_of(4) && off + 4 <= HEADER_BYTES);
        // SAFETY: as for `u64_at`.
        unsafe { &*(self.map.base.as_ptr().add(off) as *const AtomicU32) }
    }

    fn slot_ptr(&self, seq: u64) -> *mut u8 {
        let index = (seq % u64::from(self.slot_count)) as usize;
        // SAFETY: index < slot_count, and the mapping holds HEADER_BYTES + slot_count * slot_bytes bytes.
        unsafe { self.map.base.as_ptr().add(HEADER_BYTES + index * self.slot_bytes) }
    }

    fn check_reader(&self, reader: usize) {
        assert!(reader < self.num_readers as usize, "reader {reader} of a ring with {} readers", self.num_readers);
    }

    // --- header --------------------------------------------------------------------------------------------

    /// The name given to create/open (what goes into the welcome message).
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn is_owner(&self) -> bool {
        self.map.shm.is_owner()
    }
    pub fn kind(&self) -> RingKind {
        self.kind
    }
    pub fn slot_count(&self) -> u32 {
        self.slot_count
    }
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }
    pub fn num_readers(&self) -> u32 {
        self.num_readers
    }
    pub fn capacity(&self) -> Capacity {
        self.cap
    }
    pub fn page_size(&self) -> u32 {
        self.page_size
    }
    pub fn writer_pid(&self) -> u32 {
        self.u32_at(OFF_WRITER_PID).load(Ordering::Relaxed)
    }
    pub fn writer_heartbeat_ms(&self) -> u64 {
        self.u64_at(OFF_WRITER_HEARTBEAT).load(Ordering::Relaxed)
    }
    pub fn reader_pid(&self, reader: usize) -> u32 {
        self.check_reader(reader);
        self.u32_at(off_reader_pid(reader)).load(Ordering::Relaxed)
    }
    pub fn reader_heartbeat_ms(&self, reader: usize) -> u64 {
        self.check_reader(reader);
        self.u64_at(off_reader_heartbeat(reader)).load(Ordering::Relaxed)
    }
    /// Slots published so far; the next claim fills the slot of this sequence number (the next step id).
    pub fn write_seq(&self) -> u64 {
        self.u64_at(OFF_WRITE_SEQ).load(Ordering::Acquire)
    }
    /// Slots reader `reader` has released; the next slot it reads has this sequence number.
    pub fn read_seq(&self, reader: usize) -> u64 {
        self.check_reader(reader);
        self.u64_at(off_read_seq(reader)).load(Ordering::Acquire)
    }

    /// Every header word, each read atomically (the whole is not one atomic snapshot).
    pub fn header(&self) -> RingHeader {
        let mut h = RingHeader::new(
            self.kind,
            self.slot_count,
            self.slot_bytes as u32,
            self.cap,
            self.page_size,
            self.num_readers,
        );
        h.writer_pid = self.writer_pid();
        h.writer_heartbeat_ms = self.writer_heartbeat_ms();
        h.write_seq = self.write_seq();
        for (i, r) in h.readers.iter_mut().enumerate() {
            *r = ReaderState {
                read_seq: self.u64_at(off_read_seq(i)).load(Ordering::Acquire),
                pid: self.u32_at(off_reader_pid(i)).load(Ordering::Relaxed),
                heartbeat_ms: self.u64_at(off_reader_heartbeat(i)).load(Ordering::Relaxed),
            };
        }
        h
    }

    /// Records the writer's pid (and a first heartbeat), so that readers can tell when it dies.
    pub fn attach_writer(&self, pid: u32) {
        self.heartbeat();
        self.u32_at(OFF_WRITER_PID).store(pid, Ordering::Release);
    }

    /// Records reader `reader`'s pid (and a first heartbeat), so that the writer can tell when it dies.
    pub fn attach_reader(&self, reader: usize, pid: u32) {
        self.check_reader(reader);
        self.reader_heartbeat(reader);
        self.u32_at(off_reader_pid(reader)).store(pid, Ordering::Release);
    }

    /// Refreshes the writer's heartbeat. `publish` and the waits do it too; call it when idle for long.
    pub fn heartbeat(&self) {
        self.u64_at(OFF_WRITER_HEARTBEAT).store(unix_ms(), Ordering::Relaxed);
    }

    /// Refreshes reader `reader`'s heartbeat. `release` and the waits do it too.
    pub fn reader_heartbeat(&self, reader: usize) {
        self.check_reader(reader);
        self.u64_at(off_reader_heartbeat(reader)).store(unix_ms(), Ordering::Relaxed);
    }

    // --- writer --------------------------------------------------------------------------------------------

    fn claimable(&self) -> bool {
        // Only the writer stores write_seq, so its own value needs no ordering; the readers' sequences need
        // acquire so that their last reads of a slot happen before we overwrite it.
        let w = self.u64_at(OFF_WRITE_SEQ).load(Ordering::Relaxed);
        let min_read =
            (0..self.num_readers as usize).map(|i| self.u64_at(off_read_seq(i)).load(Ordering::Acquire)).min();
        // A read sequence ahead of the write sequence is a broken peer; wrapping makes it look full, not free.
        w.wrapping_sub(min_read.unwrap_or(w)) < u64::from(self.slot_count)
    }

    fn claimed_slot(&mut self) -> &mut [u8] {
        self.claimed = true;
        let seq = self.u64_at(OFF_WRITE_SEQ).load(Ordering::Relaxed);
        // SAFETY: every reader has released this slot (claimable), and no reader touches it again until publish.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(seq), self.slot_bytes) }
    }

    /// The slot of sequence number `write_seq()`, when every reader is done with its previous use. Calling it
    /// again before `publish` returns the same slot.
    pub fn try_claim(&mut self) -> Option<&mut [u8]> {
        if self.claimed || self.claimable() { Some(self.claimed_slot()) } else { None }
    }

    /// Makes the claimed slot visible to the readers (a release store of write_seq + 1).
    ///
    /// Panics if no slot is claimed: publishing an unclaimed slot could expose memory a reader still uses.
    pub fn publish(&mut self) {
        assert!(self.claimed, "publish without a claimed slot");
        self.claimed = false;
        let w = self.u64_at(OFF_WRITE_SEQ).load(Ordering::Relaxed);
        self.u64_at(OFF_WRITE_SEQ).store(w + 1, Ordering::Release);
        self.heartbeat();
    }

    /// `try_claim`, waiting as long as `live` allows while the readers catch up. Fails when a reader dies (or its
    /// heartbeat goes stale, if `live` asks for that) or the deadline passes.
    pub fn wait_claim(&mut self, live: &Liveness) -> Result<&mut [u8], RingError> {
        let mut backoff = Backoff::new();
        while !(self.claimed || self.claimable()) {
            if backoff.snooze() {
                self.heartbeat();
                self.check_readers(live)?;
            }
        }
        Ok(self.claimed_slot())
    }

    /// Fails if the deadline of `live` has passed or an attached reader is dead.
    pub fn check_readers(&self, live: &Liveness) -> Result<(), RingError> {
        live.check_deadline()?;
        for i in 0..self.num_readers as usize {
            let pid = self.u32_at(off_reader_pid(i)).load(Ordering::Acquire);
            let hb = self.u64_at(off_reader_heartbeat(i)).load(Ordering::Relaxed);
            live.check_peer(&format!("reader {i} of ring {}", self.name), pid, hb)?;
        }
        Ok(())
    }

    // --- readers -------------------------------------------------------------------------------------------

    /// The next slot for reader `reader`, if the writer has published it. The bytes stay valid until `release`.
    pub fn try_read(&self, reader: usize) -> Option<&[u8]> {
        self.check_reader(reader);
        let next = self.u64_at(off_read_seq(reader)).load(Ordering::Relaxed);
        // Acquire pairs with publish's release store: the slot's contents are complete once we see the sequence.
        let published = self.u64_at(OFF_WRITE_SEQ).load(Ordering::Acquire);
        if published <= next {
            return None;
        }
        let mut held = self.held.get();
        held[reader] = true;
        self.held.set(held);
        // SAFETY: the writer does not touch this slot until we release it.
        Some(unsafe { std::slice::from_raw_parts(self.slot_ptr(next), self.slot_bytes) })
    }

    /// Hands reader `reader`'s current slot back to the writer (a release store of read_seq + 1).
    ///
    /// Panics if `try_read` gave this reader no slot since its last release: advancing past the writer would let
    /// it overwrite slots nobody has read.
    pub fn release(&mut self, reader: usize) {
        self.check_reader(reader);
        let mut held = self.held.get();
        assert!(held[reader], "release without a slot read");
        held[reader] = false;
        self.held.set(held);
        let seq = self.u64_at(off_read_seq(reader));
        seq.store(seq.load(Ordering::Relaxed) + 1, Ordering::Release);
        self.reader_heartbeat(reader);
    }

    /// `try_read`, waiting as long as `live` allows. Fails when the writer dies (or its heartbeat goes stale, if
    /// `live` asks for that) or the deadline passes.
    pub fn wait_read(&self, reader: usize, live: &Liveness) -> Result<&[u8], RingError> {
        let mut backoff = Backoff::new();
        loop {
            if let Some(slot) = self.try_read(reader) {
                return Ok(slot);
            }
            if backoff.snooze() {
                self.reader_heartbeat(reader);
                self.check_writer(live)?;
            }
        }
    }

    /// Fails if the deadline of `live` has passed or the attached writer is dead.
    pub fn check_writer(&self, live: &Liveness) -> Result<(), RingError> {
        live.check_deadline()?;
        let pid = self.u32_at(OFF_WRITER_PID).load(Ordering::Acquire);
        live.check_peer(&format!("writer of ring {}", self.name), pid, self.writer_heartbeat_ms())
    }
}
