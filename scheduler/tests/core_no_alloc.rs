//! Steady decode with a step in flight allocates nothing: planning, completing, and the deferred frees of requests
//! that end. Per-step allocation is what makes a scheduler's cost grow with load, so it is counted, not assumed.
//! One test in its own binary, counting only its own thread's allocations: the test harness's main thread may
//! still be allocating (it just spawned the test) when counting starts.

use proto::step::{SlotBuf, StepLayout, StepMut};
use scheduler::core::{Core, Event, Limits, NewRequest, Planned, SamplingParams};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

thread_local! {
    // Const-initialised and without a destructor: safe to read inside the allocator.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

fn counting() -> bool {
    COUNTING.try_with(Cell::get).unwrap_or(false)
}

// SAFETY: forwards to the system allocator; counting touches only an atomic and a const-initialised thread local.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if counting() {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const REQS: u64 = 64;

#[test]
fn overlapped_decode_allocates_nothing_per_step() {
    let limits = Limits {
        max_batch: REQS as u32,
        max_step_tokens: 4096,
        num_pages: 4096,
        page_size: 16,
        max_seq_len: 4096,
        eos_token_ids: vec![2],
        vocab_size: 0,
    };
    let layout = StepLayout::new(limits.capacity());
    let mut core = Core::new(limits).unwrap();
    for id in 0..REQS {
        // Staggered lengths, so that requests end (and free after a step in flight) during the counted steps.
        let params = SamplingParams {
            max_tokens: 40 + id as u32,
            temperature: 0.0,
            top_p: 1.0,
            top_k: -1,
            seed: id,
            stop_token_ids: vec![],
            ignore_eos: false,

            ..Default::default()
        };
        core.submit(NewRequest { id, prompt: vec![7; 100 + id as usize], params }).unwrap();
    }
    let mut bufs = [SlotBuf::zeroed(layout.slot_bytes), SlotBuf::zeroed(layout.slot_bytes)];
    let tokens = vec![1234; REQS as usize];
    let mut events: Vec<Event> = Vec::with_capacity(4 * REQS as usize);
    let mut in_flight: Option<Planned> = None;
    let mut ended = 0;
    for step_id in 0..200u64 {
        // Warm-up: the first steps admit everything and fill the spare lists; count from step 10 on.
        COUNTING.set(step_id >= 10);
        let buf = &mut bufs[step_id as usize % 2];
        let planned = core.plan_step(step_id, &mut StepMut::new(&layout, buf.bytes_mut()), &mut events);
        if let Some(done) = std::mem::replace(&mut in_flight, planned) {
            let n = done.num_reqs();
            core.complete_step(done, &tokens[..n], &mut events);
        }
        ended += events.iter().filter(|e| e.finish().is_some()).count();
        events.clear();
        if in_flight.is_none() {
            break;
        }
    }
    COUNTING.set(false);
    assert_eq!(ended, REQS as usize, "every request ran to its max_tokens");
    assert!(core.is_idle());
    assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), 0, "allocations during steady overlapped decode");
}
