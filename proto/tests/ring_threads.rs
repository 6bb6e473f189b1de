//! The ring within one process: a writer and readers on separate threads, each with its own mapping, as the
//! scheduler and the worker would have.

use proto::ring::{Liveness, Ring, RingError, RingKind};
use proto::step::Capacity;
use std::path::Path;
use std::time::{Duration, Instant};

const CAP: Capacity = Capacity { max_reqs: 4, max_tokens: 8, max_kv_indices: 6, mask_words: 0 };

/// Unique per test and per process, since the test runner may run tests and binaries in parallel.
fn ring_name(test: &str) -> String {
    format!("minisgl-test-{}-{test}", std::process::id())
}

fn shm_path(name: &str) -> std::path::PathBuf {
    Path::new("/dev/shm").join(name)
}

fn result_ring(name: &str, slot_count: u32, num_readers: u32) -> Ring {
    let bytes = RingKind::Result.min_slot_bytes(CAP);
    Ring::create(name, RingKind::Result, slot_count, bytes, CAP, 16, num_readers).unwrap()
}

fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

const _: fn() = || {
    fn is_send<T: Send>() {}
    is_send::<Ring>();
};

#[test]
fn create_writes_the_header_open_reads_it_and_drop_unlinks() {
    let name = ring_name("header");
    let slot_bytes = RingKind::Step.min_slot_bytes(CAP) + 128;
    let ring = Ring::create(&name, RingKind::Step, 3, slot_bytes, CAP, 16, 2).unwrap();
    let meta = std::fs::metadata(shm_path(&name)).unwrap();
    assert_eq!(meta.len() as usize, 512 + 3 * slot_bytes);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let peer = Ring::open(&name).unwrap();
    assert!(ring.is_owner() && !peer.is_owner());
    assert_eq!(peer.header(), ring.header());
    assert_eq!(
        (peer.kind(), peer.slot_count(), peer.slot_bytes(), peer.num_readers(), peer.capacity(), peer.page_size()),
        (RingKind::Step, 3, slot_bytes, 2, CAP, 16)
    );
    assert_eq!((peer.write_seq(), peer.read_seq(0), peer.read_seq(1), peer.writer_pid()), (0, 0, 0, 0));

    peer.attach_reader(1, 4242);
    ring.attach_writer(std::process::id());
    assert_eq!((ring.reader_pid(1), ring.reader_pid(0)), (4242, 0));
    assert_eq!(peer.writer_pid(), std::process::id());
    let hb = peer.writer_heartbeat_ms();
    assert!(hb.abs_diff(proto::ring::unix_ms()) < 10_000, "heartbeat {hb} is not now");
    assert!(ring.reader_heartbeat_ms(1) > 0 && ring.reader_heartbeat_ms(0) == 0);

    drop(peer);
    assert!(shm_path(&name).exists(), "an opener never unlinks");
    drop(ring);
    assert!(!shm_path(&name).exists(), "the creator unlinks on drop");
}

#[test]
fn bad_arguments_and_foreign_segments_are_refused() {
    let name = ring_name("bad");
    let need = RingKind::Step.min_slot_bytes(CAP);
    for (count, bytes, readers) in [(0, need, 1), (2, need - 64, 1), (2, need + 1, 1), (2, need, 0), (2, need, 5)] {
        let r = Ring::create(&name, RingKind::Step, count, bytes, CAP, 16, readers);
        assert!(matches!(r, Err(RingError::BadHeader(_))), "{count} {bytes} {readers}: {r:?}");
    }
    assert!(matches!(Ring::create("a/b", RingKind::Step, 2, need, CAP, 16, 1), Err(RingError::BadName(_))));
    assert!(matches!(Ring::create("", RingKind::Step, 2, need, CAP, 16, 1), Err(RingError::BadName(_))));
    assert!(matches!(Ring::open(&ring_name("missing")), Err(RingError::Shm { .. })));

    std::fs::write(shm_path(&name), vec![7u8; 4096]).unwrap();
    let r = Ring::open(&name);
    std::fs::remove_file(shm_path(&name)).unwrap();
    assert!(matches!(r, Err(RingError::BadMagic(_))), "{r:?}");
}

#[test]
fn a_stale_segment_is_replaced() {
    let name = ring_name("stale");
    // What a killed scheduler leaves behind: a segment of the wrong size with garbage in it.
    std::fs::write(shm_path(&name), vec![0xAB; 100]).unwrap();
    let ring = result_ring(&name, 2, 1);
    let peer = Ring::open(&name).unwrap();
    assert_eq!(peer.header(), ring.header());
    assert_eq!(std::fs::metadata(shm_path(&name)).unwrap().len() as usize, 512 + 2 * ring.slot_bytes());
    drop((peer, ring));
    assert!(!shm_path(&name).exists());
}

#[test]
fn steps_arrive_in_order_intact_across_wraparound() {
    const N: u64 = 20_000;
    let name = ring_name("order");
    let mut writer = result_ring(&name, 4, 1);
    writer.attach_writer(std::process::id());
    let mut reader = Ring::open(&name).unwrap();
    reader.attach_reader(0, std::process::id());
    let live = Liveness::timeout(Duration::from_secs(60));
    let consumer = std::thread::spawn(move || {
        for seq in 0..N {
            let slot = reader.wait_read(0, &live).unwrap();
            let got = u64::from_le_bytes(slot[..8].try_into().unwrap());
            let tail = u64::from_le_bytes(slot[slot.len() - 8..].try_into().unwrap());
            assert_eq!((got, tail), (seq, !seq), "slot {seq}");
            reader.release(0);
        }
        reader
    });
    for seq in 0..N {
        let slot = writer.wait_claim(&live).unwrap();
        slot[..8].copy_from_slice(&seq.to_le_bytes());
        let len = slot.len();
        slot[len - 8..].copy_from_slice(&(!seq).to_le_bytes());
        writer.publish();
    }
    let reader = consumer.join().unwrap();
    assert_eq!((writer.write_seq(), reader.read_seq(0)), (N, N));
}

#[test]
fn a_full_ring_holds_the_writer_until_every_reader_releases() {
    let name = ring_name("full");
    let mut writer = result_ring(&name, 2, 2);
    let mut readers = Ring::open(&name).unwrap();
    for i in 0..2u8 {
        writer.try_claim().expect("room in an empty ring")[0] = i;
        writer.publish();
    }
    assert!(writer.try_claim().is_none());
    let t = Instant::now();
    let r = writer.wait_claim(&Liveness::timeout(Duration::from_millis(30)));
    assert!(matches!(r, Err(RingError::Timeout)), "{r:?}");
    assert!(t.elapsed() >= Duration::from_millis(30));

    // Reader 0 is done with slot 0, reader 1 is not: slot 0 is still in use.
    assert_eq!(readers.try_read(0).unwrap()[0], 0);
    readers.release(0);
    assert!(writer.try_claim().is_none());
    assert_eq!(readers.try_read(1).unwrap()[0], 0);
    readers.release(1);
    writer.try_claim().expect("slot 0 is free")[0] = 2;
    assert!(writer.try_claim().is_some(), "claiming twice gives the same slot");
    writer.publish();
    assert!(writer.try_claim().is_none());

    // Each reader sees every slot, in order.
    for reader in 0..2 {
        for expect in 1..=2u8 {
            assert_eq!(readers.try_read(reader).unwrap()[0], expect);
            readers.release(reader);
        }
        assert!(readers.try_read(reader).is_none());
    }
}

#[test]
fn a_waiting_writer_moves_on_as_soon_as_a_slot_is_released() {
    let name = ring_name("unblock");
    let mut writer = result_ring(&name, 1, 1);
    let mut reader = Ring::open(&name).unwrap();
    writer.try_claim().unwrap();
    writer.publish();
    let release_at = Instant::now() + Duration::from_millis(20);
    let t = std::thread::spawn(move || {
        std::thread::sleep(release_at - Instant::now());
        reader.try_read(0).unwrap();
        reader.release(0);
    });
    writer.wait_claim(&Liveness::timeout(Duration::from_secs(10))).unwrap();
    assert!(Instant::now() >= release_at);
    assert!(Instant::now() - release_at < Duration::from_millis(500));
    t.join().unwrap();
}

#[test]
fn a_dead_reader_or_writer_is_noticed() {
    let name = ring_name("dead");
    let mut writer = result_ring(&name, 1, 2);
    let mut reader = Ring::open(&name).unwrap();
    reader.attach_reader(0, std::process::id());
    reader.attach_reader(1, dead_pid());
    writer.try_claim().unwrap();
    writer.publish();
    let t = Instant::now();
    match writer.wait_claim(&Liveness::timeout(Duration::from_secs(10))) {
        Err(RingError::PeerDead { who, .. }) => assert!(who.starts_with("reader 1"), "{who}"),
        r => panic!("{r:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(1));

    reader.try_read(0).unwrap();
    reader.release(0);
    writer.attach_writer(dead_pid());
    assert!(matches!(reader.wait_read(0, &Liveness::pid_only()), Err(RingError::PeerDead { .. })));
    writer.attach_writer(std::process::id());
    assert!(matches!(reader.wait_read(0, &Liveness::timeout(Duration::from_millis(10))), Err(RingError::Timeout)));
}

#[test]
#[should_panic(expected = "publish without a claimed slot")]
fn publishing_without_a_claim_panics() {
    result_ring(&ring_name("publish-panic"), 2, 1).publish();
}

#[test]
#[should_panic(expected = "release without a slot read")]
fn releasing_past_the_writer_panics() {
    result_ring(&ring_name("release-panic"), 2, 1).release(0);
}
