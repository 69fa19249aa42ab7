//! The bookkeeping every program shares: storing an allocation, releasing it (whole, or the
//! pieces of a mapping a munmap cuts), the per-stack totals of --combined-only, the --trace
//! events and the counters of what was recorded and lost.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns,
        generated::{bpf_for_each_map_elem, bpf_loop},
    },
    maps::HashMap,
};
use memleak_common::{
    AllocInfo, AllocKind, CombinedAlloc, Counter, MAX_PROCESSES, TraceEvent, Traced, UNKNOWN_SLOT,
    split_key,
};

use crate::{
    COMBINED_ONLY, MAX_SIZE, MIN_SIZE, PAGE_SIZE, SAMPLE_BYTES, SAMPLE_RATE, TRACE, global, heap,
    maps::{COMBINED, COUNTERS, EVENTS, MMAPS},
    process,
};

/// Counts `c` in the row of the process in `slot` (no slot: the row of no known process).
#[inline(always)]
pub(crate) fn count_in(slot: u32, c: Counter) {
    let row = if slot < MAX_PROCESSES {
        slot
    } else {
        UNKNOWN_SLOT
    };
    if let Some(p) = COUNTERS.get_ptr_mut(row) {
        unsafe { (*p).n[c as usize] += 1 }
    }
}

/// Counts `c` for the calling process: one `TRACED` lookup, so for the rare paths only.
#[inline(always)]
pub(crate) fn count(c: Counter) {
    count_in(process::slot(), c)
}

/// Counts `c` for the process whose block key (`Traced::key`) is `key`.
#[inline(always)]
fn count_key(key: u64, c: Counter) {
    count_in(split_key(key).0, c)
}

/// The stack id to store, or −errno (counted for the process in `slot`) when the walk failed.
#[inline(always)]
pub(crate) fn stack_id(slot: u32, walk: Result<i64, i32>) -> i64 {
    walk.unwrap_or_else(|e| {
        count_in(slot, Counter::StackLost);
        e as i64
    })
}

/// Where outstanding allocations are kept.
#[derive(Clone, Copy)]
pub(crate) enum Table {
    /// User mode's heap blocks.
    Heap,
    Map(&'static HashMap<u64, AllocInfo>),
}

/// Records an outstanding allocation of process `p` (`addr`: its key, `Traced::key`) and
/// its per-stack totals. Inlined: BPF calls take at most five arguments.
#[inline(always)]
pub(crate) fn store_as(
    p: Traced,
    table: Table,
    addr: u64,
    size: u64,
    kind: AllocKind,
    stack_id: i64,
    old_addr: u64,
) {
    let info = AllocInfo {
        size,
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        stack_id,
        kind: kind as u32,
        execs: p.execs,
    };
    let combined = global(&COMBINED_ONLY) != 0;
    // `Some`: a block at the same address whose free we never saw, now gone.
    let stored = match table {
        Table::Heap => heap::put(addr, info),
        Table::Map(map) => {
            let old = if combined {
                unsafe { map.get(addr) }.copied()
            } else {
                None
            };
            map.insert(addr, info, 0).map(|()| old).map_err(|_| ())
        }
    };
    let Ok(replaced) = stored else {
        count_in(p.slot, Counter::AllocsFull);
        return;
    };
    count_in(p.slot, Counter::Recorded);
    if combined {
        if let Some(old) = replaced {
            combined_sub(&old);
        }
        combined_add(p.slot, stack_id, size);
    }
    trace(kind, addr, size, old_addr, stack_id);
}

/// Whether an allocation of `size` bytes is sampled in and inside the size filter. One in
/// `SAMPLE_RATE` on average, as BCC's -s, but drawn at random: BCC's `ktime % N` depends on
/// the clock's granularity (on some hosts it is never 0 mod 10).
#[inline(always)]
pub(crate) fn wanted(size: u64) -> bool {
    let rate = global(&SAMPLE_RATE);
    let sampled = rate <= 1 || (unsafe { bpf_get_prandom_u32() } as u64).is_multiple_of(rate);
    let every = global(&SAMPLE_BYTES);
    let sampled = sampled
        && (every == 0
            || size >= every
            || (unsafe { bpf_get_prandom_u32() } as u64) % every < size);
    sampled && size >= global(&MIN_SIZE) && size <= global(&MAX_SIZE)
}

/// Forgets the allocation at `addr`, if it is tracked. Without --trace and --combined-only
/// nothing needs a map's record, so the delete alone does (one map operation, not two).
#[inline(always)]
pub(crate) fn release(table: Table, addr: u64, kind: AllocKind) {
    let combined = global(&COMBINED_ONLY) != 0;
    let info = match table {
        Table::Heap => heap::take(addr),
        Table::Map(map) => {
            if !combined && global(&TRACE) == 0 {
                if map.remove(addr).is_ok() {
                    count_key(addr, Counter::Released);
                }
                return;
            }
            // `remove` fails when another CPU freed it first (a double free in the target).
            unsafe { map.get(addr) }
                .copied()
                .filter(|_| map.remove(addr).is_ok())
        }
    };
    let Some(info) = info else {
        return;
    };
    count_key(addr, Counter::Released);
    if combined {
        combined_sub(&info);
    }
    trace(kind, addr, info.size, 0, info.stack_id);
}

fn combined_add(slot: u32, stack_id: i64, size: u64) {
    if let Some(c) = COMBINED.get_ptr_mut(stack_id) {
        unsafe {
            atomic_add(&raw mut (*c).total_size, size);
            atomic_add(&raw mut (*c).number_of_allocs, 1);
        }
        return;
    }
    let c = CombinedAlloc {
        total_size: size,
        number_of_allocs: 1,
    };
    if COMBINED.insert(stack_id, c, 0).is_err() {
        count_in(slot, Counter::CombinedFull);
    }
}

fn combined_sub(info: &AllocInfo) {
    if let Some(c) = COMBINED.get_ptr_mut(info.stack_id) {
        unsafe {
            atomic_add(&raw mut (*c).total_size, info.size.wrapping_neg());
            atomic_add(&raw mut (*c).number_of_allocs, u64::MAX);
        }
    }
}

#[inline(always)]
unsafe fn atomic_add(p: *mut u64, v: u64) {
    use core::intrinsics::{AtomicOrdering, atomic_xadd};
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(p, v) };
}

/// A `--trace` event; `addr` is the block's key, which tells whose event a lost one was.
fn trace(kind: AllocKind, addr: u64, size: u64, old_addr: u64, stack_id: i64) {
    if global(&TRACE) == 0 {
        return;
    }
    let ev = TraceEvent {
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        addr,
        size,
        old_addr,
        stack_id,
        tid: bpf_get_current_pid_tgid() as u32,
        kind: kind as u32,
    };
    if EVENTS.output::<TraceEvent>(&ev, 0).is_err() {
        count_key(addr, Counter::EventsLost);
    }
}

#[inline(always)]
pub(crate) fn page_align(len: u64) -> u64 {
    let page = global(&PAGE_SIZE);
    (len + page - 1) & !(page - 1)
}

// ---------------------------------------------------------------------------------------------
// munmap: a range may cover a whole tracked mapping, its head, its tail or its middle.

/// What the scan over `MMAPS` found: the tracked mapping that overlaps [lo, hi).
#[repr(C)]
struct Overlap {
    lo: u64,
    hi: u64,
    start: u64,
    found: u64,
}

/// Takes [addr, addr + len) out of every tracked mapping it overlaps. One munmap may cover
/// several mmaps (a brk shrink, a munmap of neighbours): one `bpf_loop` step per piece.
pub(crate) fn unmap(addr: u64, len: u64) {
    let mut range = [addr, addr + len];
    unsafe {
        bpf_loop(
            MAX_UNMAP_PIECES,
            unmap_piece as *mut c_void,
            &raw mut range as *mut c_void,
            0,
        );
    }
}

/// `bpf_loop` callback: cuts [lo, hi) out of one tracked mapping; 1 stops the loop.
extern "C" fn unmap_piece(_index: u64, range: *mut [u64; 2]) -> i64 {
    let [addr, hi] = unsafe { *range };
    // Fast path: the range starts where a tracked mapping starts (the common whole munmap).
    let start = if unsafe { MMAPS.get(addr) }.is_some() {
        addr
    } else {
        match overlap(addr, hi) {
            Some(start) => start,
            None => return 1,
        }
    };
    let Some(info) = unsafe { MMAPS.get(start) }.copied() else {
        return 1;
    };
    trim(start, info, addr, hi);
    // Mappings do not overlap: one that covers the whole range was the only one.
    (start <= addr && start + info.size >= hi) as i64
}

/// A munmap cuts at most this many tracked mappings (bounded for the verifier).
const MAX_UNMAP_PIECES: u32 = 16;

/// The start of some tracked mapping that overlaps [lo, hi).
fn overlap(lo: u64, hi: u64) -> Option<u64> {
    let mut o = Overlap {
        lo,
        hi,
        start: 0,
        found: 0,
    };
    unsafe {
        bpf_for_each_map_elem(
            &raw const MMAPS as *mut c_void,
            find_overlap as *mut c_void,
            &raw mut o as *mut c_void,
            0,
        );
    }
    (o.found != 0).then_some(o.start)
}

extern "C" fn find_overlap(
    _map: *mut c_void,
    key: *const u64,
    val: *const AllocInfo,
    ctx: *mut Overlap,
) -> u64 {
    unsafe {
        let start = *key;
        let end = start + (*val).size;
        if start < (*ctx).hi && (*ctx).lo < end {
            (*ctx).start = start;
            (*ctx).found = 1;
            return 1;
        }
    }
    0
}

/// Removes [lo, hi) from the tracked mapping [start, start + size).
fn trim(start: u64, info: AllocInfo, lo: u64, hi: u64) {
    let end = start + info.size;
    let _ = MMAPS.remove(start);
    count_key(start, Counter::Released);
    trace(AllocKind::Munmap, lo, hi - lo, 0, info.stack_id);
    if global(&COMBINED_ONLY) != 0 {
        combined_sub(&info);
    }
    let keep = |from: u64, to: u64| {
        if from >= to {
            return;
        }
        let part = AllocInfo {
            size: to - from,
            ..info
        };
        if MMAPS.insert(from, part, 0).is_err() {
            count_key(start, Counter::MunmapSplitLost);
        } else if global(&COMBINED_ONLY) != 0 {
            combined_add(split_key(start).0, info.stack_id, to - from);
        }
    };
    keep(start, lo.max(start).min(end));
    keep(hi.max(start).min(end), end);
}
