//! Fuzzing what a hostile or broken peer can hand the scheduler: client frames (msgpack from any process that
//! reaches the socket), the worker's control messages, ring headers, result slots, and a result ring whose
//! writer scribbles over the shared segment. The property is always the same: a clear error or a valid value,
//! never a panic, a hang or an allocation the input did not pay for.
//!
//! Driven by proptest rather than `cargo fuzz`, which needs a nightly toolchain that CI does not have. Each
//! target replays the committed corpus (`proto/fuzz/corpus/`, plus the golden messages) and mutations of it,
//! then random inputs. CI runs proptest's default 256 cases a target; a longer run is
//! `PROPTEST_CASES=200000 cargo nextest run --release -p minisgl-proto --test fuzz_peers` (docs/reliability.md).

use proptest::prelude::*;
use proto::api::{self, SchedulerMsg, WorkerMsg};
use proto::ring::{HEADER_BYTES, Liveness, MAGIC, Ring, RingHeader, RingKind, VERSION};
use proto::step::{Capacity, ResultLayout, ResultRef, SlotBuf, StepLayout, StepRef};
use std::path::{Path, PathBuf};
use std::time::Duration;

const CAP: Capacity = Capacity { max_reqs: 4, max_tokens: 8, max_kv_indices: 6, mask_words: 3 };

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata")
}

/// The seeds of one target: every file of `proto/fuzz/corpus/<dir>` and the golden files whose names start with
/// one of `golden_prefixes`.
fn corpus(dir: &str, golden_prefixes: &[&str]) -> Vec<Vec<u8>> {
    let mut seeds = Vec::new();
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(dir);
    for entry in std::fs::read_dir(&fuzz_dir).unwrap_or_else(|e| panic!("{}: {e}", fuzz_dir.display())) {
        seeds.push(std::fs::read(entry.unwrap().path()).unwrap());
    }
    for entry in std::fs::read_dir(testdata()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if golden_prefixes.iter().any(|p| name.starts_with(p)) && name.ends_with(".msgpack") {
            seeds.push(std::fs::read(&path).unwrap());
        }
    }
    assert!(!seeds.is_empty(), "no seeds for {dir}");
    seeds
}

/// A corpus entry with a few byte-level edits: flips, overwrites with boundary values, insertions, deletions,
/// truncation. Enough to reach the decoders' error paths from well-formed messages.
fn mutated(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let edit = (any::<u8>(), any::<prop::sample::Index>(), any::<u8>());
    (prop::sample::select(seeds), prop::collection::vec(edit, 0..6)).prop_map(|(mut bytes, edits)| {
        for (op, at, value) in edits {
            let i = if bytes.is_empty() { 0 } else { at.index(bytes.len()) };
            match op % 6 {
                0 if !bytes.is_empty() => bytes[i] ^= 1 << (value % 8),
                1 if !bytes.is_empty() => bytes[i] = [0x00, 0x7f, 0x80, 0xc0, 0xdd, 0xdf, 0xff][value as usize % 7],
                2 => bytes.insert(i, value),
                3 if !bytes.is_empty() => {
                    bytes.remove(i);
                }
                4 => bytes.truncate(i),
                _ => bytes.extend_from_within(i..),
            }
        }
        bytes
    })
}

/// What the hub does with a frame: decode, and validate what decoded. Either may refuse; neither may panic.
fn hub_reads(bytes: &[u8]) {
    if let Ok(api::ClientMsg::Generate(g)) = api::decode_client(bytes) {
        let _ = api::validate(&g);
        let _ = g.prompt();
    }
}

proptest! {
    #[test]
    fn client_frames_from_the_corpus_mutated(bytes in mutated(corpus("client", &["client_"]))) {
        hub_reads(&bytes);
    }

    #[test]
    fn client_frames_of_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        hub_reads(&bytes);
    }

    #[test]
    fn worker_control_messages_mutated(bytes in mutated(corpus("control", &["control_"]))) {
        let _ = api::decode::<WorkerMsg>(&bytes);
        let _ = api::decode::<SchedulerMsg>(&bytes);
    }
}

/// Every seed of the corpus, unmutated, gets its clear answer (the hostile seeds were each a question once).
#[test]
fn the_client_corpus_is_refused_or_read() {
    for seed in corpus("client", &[]) {
        match api::decode_client(&seed) {
            Ok(api::ClientMsg::Generate(g)) => {
                let _ = api::validate(&g);
            }
            Ok(_) => {}
            Err(r) => assert!(!r.message.is_empty()),
        }
    }
}

/// A frame that announces a huge container or string with nothing behind it: refused at once, without reserving
/// what the length prefix claims (a 4 GiB reservation would abort the process).
#[test]
fn length_prefixes_larger_than_the_frame_allocate_nothing() {
    let huge = u32::MAX.to_be_bytes();
    for marker in [0xdc_u8, 0xdd, 0xde, 0xdf, 0xdb, 0xc6] {
        let mut frame = vec![0x82, 0xa4, b't', b'y', b'p', b'e', 0xa8];
        frame.extend_from_slice(b"generate");
        frame.extend_from_slice(&[0xa9]);
        frame.extend_from_slice(b"input_ids");
        frame.push(marker);
        frame.extend_from_slice(if marker == 0xdc || marker == 0xde { &huge[2..] } else { &huge });
        let e = api::decode_client(&frame).expect_err("a truncated frame cannot decode");
        assert!(!e.message.is_empty());
    }
}

/// Nesting as deep as a frame of 200 kB allows: a clear error, not a stack overflow.
#[test]
fn deep_nesting_is_refused() {
    for open in [0x91_u8, 0x81] {
        let mut frame = vec![0x82, 0xa4, b't', b'y', b'p', b'e', 0xa4, b'i', b'n', b'f', b'o', 0xa1, b'x'];
        for _ in 0..200_000 {
            frame.push(open);
            if open == 0x81 {
                frame.extend_from_slice(&[0xa1, b'k']);
            }
        }
        frame.push(0xc0);
        assert!(api::decode_client(&frame).is_err());
    }
}

fn header_bytes() -> impl Strategy<Value = Vec<u8>> {
    // Mostly a valid magic and version, so that the fields behind them get exercised too.
    (prop::collection::vec(any::<u8>(), HEADER_BYTES), 0u8..8).prop_map(|(mut b, which)| {
        if which > 0 {
            b[..8].copy_from_slice(&MAGIC.to_le_bytes());
        }
        if which > 1 {
            b[8..12].copy_from_slice(&VERSION.to_le_bytes());
            b[16..20].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
        }
        if which > 3 {
            b[12..16].copy_from_slice(&(1 + u32::from(which % 2)).to_le_bytes());
        }
        b
    })
}

/// A result slot's 64-byte header with counts anywhere, the arrays behind it zeroed.
fn result_header() -> impl Strategy<Value = [u32; 4]> {
    let count = prop_oneof![0u32..8, any::<u32>(), Just(u32::MAX)];
    let top = prop_oneof![0u32..30, any::<u32>()];
    (count, 0u32..3, 0u32..3, top).prop_map(|(n, status, logprobs, top)| [n, status, logprobs, top])
}

proptest! {
    #[test]
    fn ring_headers_decode_or_are_refused(bytes in header_bytes()) {
        if let Ok(h) = RingHeader::decode(&bytes) {
            prop_assert!(h.validate().is_ok());
            prop_assert!(h.segment_bytes() >= HEADER_BYTES);
            prop_assert!(h.slot_bytes as usize >= h.kind.min_slot_bytes(h.cap));
        }
    }

    #[test]
    fn result_slots_with_any_counts_read_in_bounds(counts in result_header()) {
        let layout = ResultLayout::new(CAP);
        let mut buf = SlotBuf::zeroed(layout.slot_bytes);
        let [num_reqs, status, logprobs, num_top] = counts;
        let words = [&7u64.to_le_bytes()[..4], &[0; 4], &num_reqs.to_le_bytes(), &status.to_le_bytes(),
            &logprobs.to_le_bytes(), &num_top.to_le_bytes()].concat();
        buf.bytes_mut()[..words.len()].copy_from_slice(&words);
        match ResultRef::try_new(&layout, buf.bytes()) {
            Ok(r) => {
                prop_assert!(r.tokens.len() <= CAP.max_reqs as usize);
                for i in 0..r.tokens.len() {
                    if let Some((_, ids, values)) = r.logprobs_of(i) {
                        prop_assert_eq!(ids.len(), values.len());
                    }
                }
            }
            Err(e) => prop_assert!(!e.is_empty()),
        }
    }

    #[test]
    fn step_slots_with_any_counts_read_in_bounds(counts in prop::collection::vec(any::<u32>(), 6)) {
        let layout = StepLayout::new(CAP);
        let mut buf = SlotBuf::zeroed(layout.slot_bytes);
        let words: Vec<u8> = [0u32, 0, 1].iter().chain(&counts).flat_map(|w| w.to_le_bytes()).collect();
        buf.bytes_mut()[..words.len()].copy_from_slice(&words);
        if let Ok(s) = StepRef::try_new(&layout, buf.bytes()) {
            prop_assert!(s.req_slot.len() <= CAP.max_reqs as usize);
            prop_assert!(s.kv_indices.len() <= CAP.max_kv_indices as usize);
        }
    }
}

/// A scribble by the result ring's writer: bytes at some offset of the segment, or a new write sequence.
#[derive(Clone, Debug)]
enum Scribble {
    Bytes { at: usize, bytes: Vec<u8> },
    WriteSeq(u64),
    Read,
}

fn scribbles(segment: usize) -> impl Strategy<Value = Vec<Scribble>> {
    let one = prop_oneof![
        (0..segment, prop::collection::vec(any::<u8>(), 1..80)).prop_map(|(at, bytes)| Scribble::Bytes { at, bytes }),
        prop_oneof![0u64..6, any::<u64>()].prop_map(Scribble::WriteSeq),
        Just(Scribble::Read),
    ];
    prop::collection::vec(one, 1..24)
}

fn result_ring_segment() -> usize {
    HEADER_BYTES + 3 * RingKind::Result.min_slot_bytes(CAP)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The scheduler's side of a result ring whose writer writes anything anywhere, sequence numbers included:
    /// every read is either nothing yet or a slot read within bounds, and a release after a read never panics.
    #[test]
    fn a_result_ring_under_a_scribbling_writer(ops in scribbles(result_ring_segment())) {
        let name = format!("minisgl-fuzz-{}-{}", std::process::id(), rand_suffix());
        let slot_bytes = RingKind::Result.min_slot_bytes(CAP);
        let mut reader = Ring::create(&name, RingKind::Result, 3, slot_bytes, CAP, 16, 1).unwrap();
        let writer = shared_memory::ShmemConf::new().os_id(&name).open().unwrap();
        let layout = ResultLayout::new(CAP);
        // Short: an empty read waits this long, and long runs take every case at PROPTEST_CASES (it overrides the 64).
        let live = Liveness::timeout(Duration::from_millis(1));
        for op in ops {
            match op {
                Scribble::Bytes { at, bytes } => {
                    let n = bytes.len().min(writer.len() - at);
                    // SAFETY: within the mapping; the reader only ever reads these bytes through its own views,
                    // which is the situation under test (another process writing them at any time).
                    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), writer.as_ptr().add(at), n) };
                }
                Scribble::WriteSeq(seq) => unsafe {
                    std::ptr::write_volatile(writer.as_ptr().add(64) as *mut u64, seq);
                },
                Scribble::Read => {
                    if let Some(buf) = reader.try_read(0) {
                        prop_assert_eq!(buf.len(), slot_bytes);
                        let _ = ResultRef::try_new(&layout, buf);
                        reader.release(0);
                    } else {
                        let _ = reader.wait_read(0, &live);
                    }
                }
            }
        }
        drop(writer);
        drop(reader);
        prop_assert!(!Path::new("/dev/shm").join(&name).exists());
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
