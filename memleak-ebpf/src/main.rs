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

mod bookkeeping;
mod growth;
mod heap;
mod kernel;
mod maps;
mod process;
mod python;
mod unwind;

use core::ptr::read_volatile;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use memleak_common::{
    AllocKind, Counter, DEFAULT_THREAD_SLOTS, InFlight, MAP_ANONYMOUS, MAP_FAILED, Traced, named,
    names::{globals, programs},
};

use crate::{
    bookkeeping::{Table, count, page_align, release, stack_id, store_as, unmap, wanted},
    maps::{INFLIGHT, MMAPS, SLOTS},
};

// Globals set by userspace before load.
#[unsafe(no_mangle)]
pub(crate) static MIN_SIZE: u64 = 0;
#[unsafe(no_mangle)]
pub(crate) static MAX_SIZE: u64 = u64::MAX;
#[unsafe(no_mangle)]
pub(crate) static SAMPLE_RATE: u64 = 1;
/// --sample-bytes: keep a block of `size` < N with probability size/N (0: off).
#[unsafe(no_mangle)]
pub(crate) static SAMPLE_BYTES: u64 = 0;
#[unsafe(no_mangle)]
pub(crate) static TRACE: u8 = 0;
#[unsafe(no_mangle)]
pub(crate) static COMBINED_ONLY: u8 = 0;
#[unsafe(no_mangle)]
pub(crate) static PAGE_SIZE: u64 = 4096;
/// Kernel mode: 0 for every process, or the -p filter's tgid. User and growth mode trace the
/// processes of `TRACED` instead.
#[unsafe(no_mangle)]
pub(crate) static TARGET_TGID: u32 = 0;
/// Bench only (`--empty-probes`): the allocator probes return at once, so the bench measures
/// what the traps alone cost.
#[unsafe(no_mangle)]
static EMPTY_PROBES: u8 = 0;
/// `SLOTS` entries − 1 (a power of two − 1).
#[unsafe(no_mangle)]
pub(crate) static SLOT_MASK: u32 = DEFAULT_THREAD_SLOTS - 1;

named!(
    MIN_SIZE = globals::MIN_SIZE,
    MAX_SIZE = globals::MAX_SIZE,
    SAMPLE_RATE = globals::SAMPLE_RATE,
    SAMPLE_BYTES = globals::SAMPLE_BYTES,
    TRACE = globals::TRACE,
    COMBINED_ONLY = globals::COMBINED_ONLY,
    PAGE_SIZE = globals::PAGE_SIZE,
    TARGET_TGID = globals::TARGET_TGID,
    SLOT_MASK = globals::SLOT_MASK,
    EMPTY_PROBES = globals::EMPTY_PROBES,
);

#[inline(always)]
pub(crate) fn global<T: Copy>(g: &T) -> T {
    // Userspace rewrites .rodata before load; volatile keeps the compiler from folding the
    // defaults in.
    unsafe { read_volatile(g) }
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
        release(Table::Heap, process::current().key(addr), AllocKind::Free);
    }
    0
}

#[uprobe]
pub fn munmap_enter(ctx: ProbeContext) -> u32 {
    let addr = arg(&ctx, 0);
    let len = page_align(arg(&ctx, 1));
    if addr != 0 && len != 0 && global(&EMPTY_PROBES) == 0 {
        unmap(process::current().key(addr), len);
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
    let Some(call) = take_call(bpf_get_current_pid_tgid(), sp_of(ctx.regs)) else {
        return 0;
    };
    let ret: u64 = ctx.ret();
    let Some(kind) = AllocKind::from_u32(call.kind) else {
        return 0;
    };
    returned(&ctx, process::current(), &call, kind, ret);
    0
}

/// The call of thread `id` that returns with the stack pointer `sp`, taken out of where its
/// entry parked it; `None` for a nested call's return or a lost entry.
#[inline(always)]
fn take_call(id: u64, sp: u64) -> Option<InFlight> {
    let park = Park::of(id)?;
    let Some(parked) = park.call(id as u32) else {
        // Every return follows an entry, which parked its call in the slot the thread holds
        // or in `INFLIGHT`: the entry was lost.
        if let Park::Spilled(None) = park {
            count(Counter::InflightFull);
        }
        return None;
    };
    let call = unsafe { *parked };
    // A nested call returns with the stack pointer at or below the outer call's entry.
    if sp <= call.sp {
        return None;
    }
    match park {
        Park::Slot(p) => unsafe { (*p).sp = 0 },
        Park::Spilled(_) => {
            let _ = INFLIGHT.remove(id);
        }
    }
    Some(call)
}

/// Books the return of `call` in process `p`: the block it made and the one it released.
#[inline(always)]
fn returned(ctx: &RetProbeContext, p: Traced, call: &InFlight, kind: AllocKind, ret: u64) {
    let old = p.key(call.arg);
    match kind {
        AllocKind::Realloc | AllocKind::Reallocarray => {
            if ret == 0 {
                // realloc(p, 0) frees p; any other NULL is a failure that keeps the old block.
                if call.size == 0 && call.arg != 0 {
                    release(Table::Heap, old, kind);
                }
                return;
            }
            if call.arg != 0 {
                release(Table::Heap, old, kind);
            }
            record(ctx, p, Table::Heap, call, kind, ret);
        }
        AllocKind::PosixMemalign => {
            if ret != 0 {
                return;
            }
            if let Ok(addr) = unsafe { bpf_probe_read_user(call.arg as *const u64) } {
                record(ctx, p, Table::Heap, call, kind, addr);
            }
        }
        AllocKind::Mmap => {
            if ret != MAP_FAILED {
                record(ctx, p, Table::Map(&MMAPS), call, kind, ret);
            }
        }
        AllocKind::Mremap => {
            // Only mappings we track move; an untracked one may be a file mapping.
            if ret != MAP_FAILED && unsafe { MMAPS.get(old) }.is_some() {
                release(Table::Map(&MMAPS), old, kind);
                record(ctx, p, Table::Map(&MMAPS), call, kind, ret);
            }
        }
        _ => {
            if ret != 0 {
                record(ctx, p, Table::Heap, call, kind, ret);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bookkeeping

#[inline(always)]
fn record(
    ctx: &RetProbeContext,
    p: Traced,
    table: Table,
    call: &InFlight,
    kind: AllocKind,
    addr: u64,
) {
    if call.record == 0 {
        return;
    }
    // Native frames, then the thread's Python frames, then the record is stored by content.
    let walk = match unwind::walk(ctx.regs, p.slot) {
        Some(rec) => {
            python::read_frames(rec, p.slot);
            unwind::store(rec)
        }
        None => Err(-1),
    };
    let id = stack_id(p.slot, walk);
    store_as(p, table, p.key(addr), call.size, kind, id, call.arg);
}

named!(
    malloc_enter = programs::MALLOC_ENTER,
    calloc_enter = programs::CALLOC_ENTER,
    realloc_enter = programs::REALLOC_ENTER,
    reallocarray_enter = programs::REALLOCARRAY_ENTER,
    posix_memalign_enter = programs::POSIX_MEMALIGN_ENTER,
    aligned_alloc_enter = programs::ALIGNED_ALLOC_ENTER,
    memalign_enter = programs::MEMALIGN_ENTER,
    valloc_enter = programs::VALLOC_ENTER,
    pvalloc_enter = programs::PVALLOC_ENTER,
    mmap_enter = programs::MMAP_ENTER,
    mremap_enter = programs::MREMAP_ENTER,
    free_enter = programs::FREE_ENTER,
    munmap_enter = programs::MUNMAP_ENTER,
    alloc_return = programs::ALLOC_RETURN,
);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
