//! Kernel side of memleak: uprobes on the allocator entry points of one process.
//!
//! Entry probes park the call's arguments in the thread's slot (`SLOTS`); one return probe,
//! shared by every allocating function, turns the result into a `HEAP` (`heap.rs`) or `MMAPS`
//! entry with the caller's stack. Frees and munmaps are entry-only. Everything lost is counted.
//! `growth` fills the same maps from tracepoints instead (`--mode growth`).
#![no_std]
#![no_main]
// The BPF target has no AtomicU64; the intrinsic lowers to the BPF atomic add.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod growth;
mod heap;
mod kernel;
mod process;
mod python;
mod unwind;

use core::{ffi::c_void, ptr::read_volatile};

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::{bpf_for_each_map_elem, bpf_loop},
    },
    macros::{map, uprobe, uretprobe},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use memleak_common::{
    AllocInfo, AllocKind, COUNTER_COUNT, CombinedAlloc, Counter, DEFAULT_MAX_ALLOCS,
    DEFAULT_MAX_COMBINED, DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_MMAPS, DEFAULT_THREAD_SLOTS, InFlight,
    MAP_ANONYMOUS, MAP_FAILED, TraceEvent,
};

// Globals set by userspace before load (names in `memleak_common::globals`).
#[unsafe(no_mangle)]
static MIN_SIZE: u64 = 0;
#[unsafe(no_mangle)]
static MAX_SIZE: u64 = u64::MAX;
#[unsafe(no_mangle)]
static SAMPLE_RATE: u64 = 1;
/// --sample-bytes: keep a block of `size` < N with probability size/N (0: off).
#[unsafe(no_mangle)]
static SAMPLE_BYTES: u64 = 0;
#[unsafe(no_mangle)]
static TRACE: u8 = 0;
#[unsafe(no_mangle)]
static COMBINED_ONLY: u8 = 0;
#[unsafe(no_mangle)]
pub(crate) static PAGE_SIZE: u64 = 4096;
/// The traced process (its tgid). Kernel mode: 0 for every process, or the -p filter.
#[unsafe(no_mangle)]
pub(crate) static TARGET_TGID: u32 = 0;
/// Bench only (`--empty-probes`): the allocator probes return at once, so the bench measures
/// what the traps alone cost.
#[unsafe(no_mangle)]
static EMPTY_PROBES: u8 = 0;
/// `SLOTS` entries − 1 (a power of two − 1).
#[unsafe(no_mangle)]
static SLOT_MASK: u32 = DEFAULT_THREAD_SLOTS - 1;

/// Kernel mode's allocations and growth mode's pages (user mode uses `HEAP`).
#[map]
pub(crate) static ALLOCS: HashMap<u64, AllocInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_ALLOCS, 0);
#[map]
pub(crate) static MMAPS: HashMap<u64, AllocInfo> = HashMap::with_max_entries(DEFAULT_MAX_MMAPS, 0);
#[map]
static COMBINED: HashMap<i64, CombinedAlloc> = HashMap::with_max_entries(DEFAULT_MAX_COMBINED, 0);
/// Each thread's call in flight, in the slot `tid & SLOT_MASK`: an array slot costs no hash
/// lookup on the hot path. A free slot (`tid` 0) goes to the first thread that calls in it,
/// which alone writes it (`sp` 0: no call in flight) until `sched_process_exit` frees it.
#[map]
static SLOTS: Array<InFlight> = Array::with_max_entries(DEFAULT_THREAD_SLOTS, 0);
/// Calls of threads whose slot another thread holds, by pid_tgid, deleted at return; LRU so
/// that calls whose return never came make room.
#[map]
static INFLIGHT: LruHashMap<u64, InFlight> = LruHashMap::with_max_entries(DEFAULT_MAX_INFLIGHT, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[inline(always)]
pub(crate) fn global<T: Copy>(g: &T) -> T {
    // Userspace rewrites .rodata before load; volatile keeps the compiler from folding the
    // defaults in.
    unsafe { read_volatile(g) }
}

#[inline(always)]
pub(crate) fn count(c: Counter) {
    if let Some(p) = COUNTERS.get_ptr_mut(c as u32) {
        unsafe { *p += 1 }
    }
}

#[inline(always)]
fn sp_of(regs: *const aya_ebpf::bindings::pt_regs) -> u64 {
    unsafe { (*regs).rsp }
}

// ---------------------------------------------------------------------------------------------
// Entry probes

/// Where a thread's call is parked.
#[derive(Clone, Copy)]
enum Park {
    /// The thread's slot: it holds it, or the slot is free and the thread has nothing parked
    /// in `INFLIGHT`.
    Slot(*mut InFlight),
    /// `INFLIGHT`: another thread holds the slot (or held it when this call came).
    Spilled(Option<*mut InFlight>),
}

impl Park {
    #[inline(always)]
    fn of(id: u64) -> Option<Park> {
        let tid = id as u32;
        let slot = SLOTS.get_ptr_mut(tid & global(&SLOT_MASK))?;
        let owner = unsafe { (*slot).tid };
        if owner == tid {
            return Some(Park::Slot(slot));
        }
        // Rare: the thread's first call, or two threads whose ids share a slot.
        let spilled = INFLIGHT.get_ptr_mut(id);
        Some(if owner == 0 && spilled.is_none() {
            Park::Slot(slot)
        } else {
            Park::Spilled(spilled)
        })
    }

    /// The call parked for thread `tid`, if any.
    #[inline(always)]
    fn call(self, tid: u32) -> Option<*mut InFlight> {
        let p = match self {
            Park::Slot(p) | Park::Spilled(Some(p)) => p,
            Park::Spilled(None) => return None,
        };
        unsafe { ((*p).tid == tid && (*p).sp != 0).then_some(p) }
    }
}

/// Frees the slot of an exiting thread of the target, for the next thread that maps to it.
#[inline(always)]
pub(crate) fn forget_thread(id: u64) {
    let tid = id as u32;
    if let Some(slot) = SLOTS.get_ptr_mut(tid & global(&SLOT_MASK))
        && unsafe { (*slot).tid } == tid
    {
        unsafe { *slot = InFlight::default() };
    }
}

/// Parks an allocating call until its return. Calls nested inside an in-flight call on the
/// same thread (a lower stack pointer) are ignored: the outer call owns the memory. So is a
/// tail call (the same stack pointer: glibc's reallocarray jumps to realloc); the kernel then
/// runs both return probes at the one return, and the first takes the call.
#[inline(always)]
fn enter(ctx: &ProbeContext, kind: AllocKind, size: Option<u64>, arg: u64) -> u32 {
    if global(&EMPTY_PROBES) != 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let tid = id as u32;
    let sp = sp_of(ctx.regs);
    let Some(park) = Park::of(id) else {
        return 0;
    };
    if let Some(cur) = park.call(tid) {
        if sp <= unsafe { (*cur).sp } {
            return 0;
        }
        // A call from a shallower frame cannot be nested: the old entry's return never came.
        count(Counter::StaleInflight);
    }
    // `None`: the size overflowed (calloc), so the call fails; keep owning nested calls.
    let wanted = size.is_some_and(wanted);
    let call = InFlight {
        size: size.unwrap_or(0),
        arg,
        sp,
        tid,
        kind: kind as u32,
        record: wanted as u32,
        _pad: 0,
    };
    match park {
        Park::Slot(p) | Park::Spilled(Some(p)) => unsafe { *p = call },
        // A failure is counted at the return, which cannot find the call.
        Park::Spilled(None) => {
            let _ = INFLIGHT.insert(id, call, 0);
        }
    }
    0
}

#[inline(always)]
fn arg(ctx: &ProbeContext, n: usize) -> u64 {
    ctx.arg::<u64>(n).unwrap_or(0)
}

/// nmemb × size, `None` on overflow (the call then fails). Done in 32-bit halves: LLVM turns
/// any plain overflow check into a 128-bit multiply, which BPF lacks.
#[inline(always)]
fn mul(a: u64, b: u64) -> Option<u64> {
    let (big, small) = if a >> 32 != 0 { (a, b) } else { (b, a) };
    if small >> 32 != 0 {
        return None;
    }
    let cross = (big >> 32) * small;
    if cross >> 32 != 0 {
        return None;
    }
    ((big & 0xffff_ffff) * small).checked_add(cross << 32)
}

#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Malloc, Some(arg(&ctx, 0)), 0)
}

#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    let size = mul(arg(&ctx, 0), arg(&ctx, 1));
    enter(&ctx, AllocKind::Calloc, size, 0)
}

#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Realloc, Some(arg(&ctx, 1)), arg(&ctx, 0))
}

#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    let size = mul(arg(&ctx, 1), arg(&ctx, 2));
    enter(&ctx, AllocKind::Reallocarray, size, arg(&ctx, 0))
}

#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    enter(
        &ctx,
        AllocKind::PosixMemalign,
        Some(arg(&ctx, 2)),
        arg(&ctx, 0),
    )
}

#[uprobe]
pub fn aligned_alloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::AlignedAlloc, Some(arg(&ctx, 1)), 0)
}

#[uprobe]
pub fn memalign_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Memalign, Some(arg(&ctx, 1)), 0)
}

#[uprobe]
pub fn valloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Valloc, Some(arg(&ctx, 0)), 0)
}

#[uprobe]
pub fn pvalloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Pvalloc, Some(arg(&ctx, 0)), 0)
}

/// Only anonymous, accessible mappings are heap. A file mapping is not a leak, and a
/// PROT_NONE one is an address-space reservation (glibc's per-thread arenas reserve 64 MiB
/// so; the blocks later carved out of it are counted by malloc). Those still enter
/// (unrecorded) so that they own whatever they call.
#[uprobe]
pub fn mmap_enter(ctx: ProbeContext) -> u32 {
    let heap = arg(&ctx, 3) & MAP_ANONYMOUS != 0 && arg(&ctx, 2) != 0;
    let size = if heap { Some(arg(&ctx, 1)) } else { None };
    enter(&ctx, AllocKind::Mmap, size, 0)
}

#[uprobe]
pub fn mremap_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, AllocKind::Mremap, Some(arg(&ctx, 2)), arg(&ctx, 0))
}

#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let addr = arg(&ctx, 0);
    if addr != 0 && global(&EMPTY_PROBES) == 0 {
        release(Table::Heap, addr, AllocKind::Free);
    }
    0
}

#[uprobe]
pub fn munmap_enter(ctx: ProbeContext) -> u32 {
    let addr = arg(&ctx, 0);
    let len = page_align(arg(&ctx, 1));
    if addr != 0 && len != 0 && global(&EMPTY_PROBES) == 0 {
        unmap(addr, len);
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Return probe, shared by every allocating function

#[uretprobe]
pub fn alloc_return(ctx: RetProbeContext) -> u32 {
    if global(&EMPTY_PROBES) != 0 {
        return 0;
    }
    let id = bpf_get_current_pid_tgid();
    let Some(park) = Park::of(id) else {
        return 0;
    };
    let Some(parked) = park.call(id as u32) else {
        // Every return follows an entry, which parked its call in the slot the thread holds
        // or in `INFLIGHT`: the entry was lost.
        if let Park::Spilled(None) = park {
            count(Counter::InflightFull);
        }
        return 0;
    };
    let call = unsafe { *parked };
    // A nested call returns with the stack pointer at or below the outer call's entry.
    if sp_of(ctx.regs) <= call.sp {
        return 0;
    }
    match park {
        Park::Slot(p) => unsafe { (*p).sp = 0 },
        Park::Spilled(_) => {
            let _ = INFLIGHT.remove(id);
        }
    }
    let ret: u64 = ctx.ret();
    let Some(kind) = AllocKind::from_u32(call.kind) else {
        return 0;
    };
    match kind {
        AllocKind::Realloc | AllocKind::Reallocarray => {
            if ret == 0 {
                // realloc(p, 0) frees p; any other NULL is a failure that keeps the old block.
                if call.size == 0 && call.arg != 0 {
                    release(Table::Heap, call.arg, kind);
                }
                return 0;
            }
            if call.arg != 0 {
                release(Table::Heap, call.arg, kind);
            }
            record(&ctx, Table::Heap, &call, kind, ret);
        }
        AllocKind::PosixMemalign => {
            if ret != 0 {
                return 0;
            }
            if let Ok(addr) = unsafe { bpf_probe_read_user(call.arg as *const u64) } {
                record(&ctx, Table::Heap, &call, kind, addr);
            }
        }
        AllocKind::Mmap => {
            if ret != MAP_FAILED {
                record(&ctx, Table::Map(&MMAPS), &call, kind, ret);
            }
        }
        AllocKind::Mremap => {
            // Only mappings we track move; an untracked one may be a file mapping.
            if ret != MAP_FAILED && unsafe { MMAPS.get(call.arg) }.is_some() {
                release(Table::Map(&MMAPS), call.arg, kind);
                record(&ctx, Table::Map(&MMAPS), &call, kind, ret);
            }
        }
        _ => {
            if ret != 0 {
                record(&ctx, Table::Heap, &call, kind, ret);
            }
        }
    }
    0
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping

fn record(ctx: &RetProbeContext, table: Table, call: &InFlight, kind: AllocKind, addr: u64) {
    if call.record == 0 {
        return;
    }
    // Native frames, then the thread's Python frames, then the record is stored by content.
    let walk = match unwind::walk(ctx.regs) {
        Some(rec) => {
            python::read_frames(rec);
            unwind::store(rec)
        }
        None => Err(-1),
    };
    store(table, addr, call.size, kind, stack_id(walk), call.arg);
}

/// The stack id to store, or −errno (counted) when the walk failed.
#[inline(always)]
pub(crate) fn stack_id(walk: Result<i64, i32>) -> i64 {
    walk.unwrap_or_else(|e| {
        count(Counter::StackLost);
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

/// Records an outstanding allocation (user or kernel) and its per-stack totals. Inlined:
/// BPF calls take at most five arguments.
#[inline(always)]
pub(crate) fn store(
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
        execs: process::execs(),
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
        count(Counter::AllocsFull);
        return;
    };
    count(Counter::Recorded);
    if combined {
        if let Some(old) = replaced {
            combined_sub(&old);
        }
        combined_add(stack_id, size);
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
                    count(Counter::Released);
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
    count(Counter::Released);
    if combined {
        combined_sub(&info);
    }
    trace(kind, addr, info.size, 0, info.stack_id);
}

fn combined_add(stack_id: i64, size: u64) {
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
        count(Counter::CombinedFull);
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
        count(Counter::EventsLost);
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
    count(Counter::Released);
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
            count(Counter::MunmapSplitLost);
        } else if global(&COMBINED_ONLY) != 0 {
            combined_add(info.stack_id, to - from);
        }
    };
    keep(start, lo.max(start).min(end));
    keep(hi.max(start).min(end), end);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
