//! The contract between the BPF program and userspace: map value layouts, counter indexes and
//! the names of the globals userspace sets before load. Both sides compile this file, so a
//! layout change is a compile-time change on both.
#![no_std]

pub mod names;
pub mod python;
pub mod unwind;

/// Entry points the probes hook; also the `kind` of an in-flight call and of a trace event.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocKind {
    Malloc = 0,
    Calloc = 1,
    Realloc = 2,
    Reallocarray = 3,
    PosixMemalign = 4,
    AlignedAlloc = 5,
    Memalign = 6,
    Valloc = 7,
    Pvalloc = 8,
    Mmap = 9,
    Mremap = 10,
    Free = 11,
    Munmap = 12,
    // Kernel mode (no -p): the kmem and percpu tracepoints.
    Kmalloc = 13,
    KmemCacheAlloc = 14,
    PageAlloc = 15,
    PercpuAlloc = 16,
    Kfree = 17,
    KmemCacheFree = 18,
    PageFree = 19,
    PercpuFree = 20,
    // Growth mode (--mode growth): the brk system call and first-write page faults.
    Brk = 21,
    PageFault = 22,
}

impl AllocKind {
    /// The user-space entry points, in the order they are hooked.
    pub const USER: [AllocKind; 13] = [
        AllocKind::Malloc,
        AllocKind::Calloc,
        AllocKind::Realloc,
        AllocKind::Reallocarray,
        AllocKind::PosixMemalign,
        AllocKind::AlignedAlloc,
        AllocKind::Memalign,
        AllocKind::Valloc,
        AllocKind::Pvalloc,
        AllocKind::Mmap,
        AllocKind::Mremap,
        AllocKind::Free,
        AllocKind::Munmap,
    ];

    /// The kind whose discriminant is `v`. A plain match: the compiler turns it into one
    /// range check, which the BPF verifier accepts (a table lookup it may not).
    pub fn from_u32(v: u32) -> Option<AllocKind> {
        use AllocKind::*;
        Some(match v {
            0 => Malloc,
            1 => Calloc,
            2 => Realloc,
            3 => Reallocarray,
            4 => PosixMemalign,
            5 => AlignedAlloc,
            6 => Memalign,
            7 => Valloc,
            8 => Pvalloc,
            9 => Mmap,
            10 => Mremap,
            11 => Free,
            12 => Munmap,
            13 => Kmalloc,
            14 => KmemCacheAlloc,
            15 => PageAlloc,
            16 => PercpuAlloc,
            17 => Kfree,
            18 => KmemCacheFree,
            19 => PageFree,
            20 => PercpuFree,
            21 => Brk,
            22 => PageFault,
            _ => return None,
        })
    }

    /// The C symbol, without any `--symbols-prefix`.
    pub fn symbol(self) -> &'static str {
        match self {
            AllocKind::Malloc => "malloc",
            AllocKind::Calloc => "calloc",
            AllocKind::Realloc => "realloc",
            AllocKind::Reallocarray => "reallocarray",
            AllocKind::PosixMemalign => "posix_memalign",
            AllocKind::AlignedAlloc => "aligned_alloc",
            AllocKind::Memalign => "memalign",
            AllocKind::Valloc => "valloc",
            AllocKind::Pvalloc => "pvalloc",
            AllocKind::Mmap => "mmap",
            AllocKind::Mremap => "mremap",
            AllocKind::Free => "free",
            AllocKind::Munmap => "munmap",
            AllocKind::Kmalloc => "kmalloc",
            AllocKind::KmemCacheAlloc => "kmem_cache_alloc",
            AllocKind::PageAlloc => "mm_page_alloc",
            AllocKind::PercpuAlloc => "percpu_alloc_percpu",
            AllocKind::Kfree => "kfree",
            AllocKind::KmemCacheFree => "kmem_cache_free",
            AllocKind::PageFree => "mm_page_free",
            AllocKind::PercpuFree => "percpu_free_percpu",
            AllocKind::Brk => "brk",
            AllocKind::PageFault => "page_fault",
        }
    }

    /// mmap-family calls are system calls, not allocator calls: no `--symbols-prefix`, and
    /// they are looked up in libc even when `-O` names another allocator.
    pub fn is_syscall_wrapper(self) -> bool {
        matches!(
            self,
            AllocKind::Mmap | AllocKind::Mremap | AllocKind::Munmap
        )
    }
}

/// One outstanding allocation, keyed by its address in `ALLOCS` (heap) or `MMAPS`
/// (anonymous mappings, kept apart so munmap can find the mapping that contains an address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AllocInfo {
    pub size: u64,
    pub timestamp_ns: u64,
    /// Id in the stack map; negative: the stack walk failed (−errno), counted in `STACK_LOST`.
    pub stack_id: i64,
    pub kind: u32,
    /// How many times the target had exec'd when this was made (`TRACED`): entries of an
    /// earlier program are gone.
    pub execs: u32,
}

/// One slot of `HEAP`, where user mode keeps its outstanding heap blocks (see [`heap`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct HeapSlot {
    /// The block's address, or [`heap::EMPTY`], [`heap::FREED`] or [`heap::BUSY`].
    pub addr: u64,
    pub info: AllocInfo,
}

/// `HEAP`: an open-addressing table in an array map (BPF_F_MMAPABLE). A block sits in one of
/// [`PROBES`](heap::PROBES) slots from [`first_slot`](heap::first_slot)`(addr)`: the first one
/// free when it was stored. A slot goes EMPTY → BUSY (taken by compare-and-swap) → address →
/// FREED → BUSY → …, never back to EMPTY, so a search stops at the first EMPTY slot.
pub mod heap {
    /// Never used: a search for an address ends here.
    pub const EMPTY: u64 = 0;
    /// Freed: reusable, but a search goes on past it.
    pub const FREED: u64 = 1;
    /// Being written by the CPU that took it.
    pub const BUSY: u64 = 2;
    /// Slots a block may sit in, from its first.
    pub const PROBES: u32 = 16;
    pub const DEFAULT_BITS: u32 = 19;

    /// The block's first slot in a table of 2^`bits` slots (Fibonacci hashing of the address
    /// without its low four bits, which malloc's alignment leaves 0).
    #[inline(always)]
    pub fn first_slot(addr: u64, bits: u32) -> u32 {
        ((addr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_shr(64 - bits) as u32
    }

    /// Table size (log2) for `max_allocs` blocks: twice as many slots, so probe runs stay short.
    pub fn bits_for(max_allocs: u32) -> u32 {
        (u64::from(max_allocs.max(1)) * 2)
            .next_power_of_two()
            .trailing_zeros()
            .min(31)
    }
}

/// Native frames kept per stack (the kernel's own limit, PERF_MAX_STACK_DEPTH).
pub const MAX_NATIVE_FRAMES: usize = 127;
/// Python frames kept per stack: deep enough for real recursion, and a record (3 KiB) still
/// fits the kernel's 4 KiB allocation class (`STACKS` allocates its entries as they come).
pub const MAX_PYTHON_FRAMES: usize = 128;
const _: () = assert!(
    MAX_PYTHON_FRAMES.is_power_of_two(),
    "the BPF walk masks indexes with it"
);
/// Frames of the Python chain the BPF walk follows at most: those past `MAX_PYTHON_FRAMES`
/// are only counted (`StackRecord::python_dropped`).
pub const MAX_PYTHON_STEPS: u32 = 2048;

/// A Python frame as the BPF program sees it: the code object and where in it the frame is.
/// Userspace turns it into file, function and line by reading the target's memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PyFrame {
    pub code: u64,
    /// 3.10: f_lasti; 3.11+: the byte offset of the instruction in co_code_adaptive.
    pub instr: u64,
}

/// One distinct stack, stored once under the hash of its content (the `stack_id` of every
/// allocation made from it). Frames are innermost first.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct StackRecord {
    pub native_len: u32,
    pub python_len: u32,
    /// Frames the unwinder could not walk past (0: it reached the outermost frame).
    pub truncated: u32,
    /// Outer Python frames past `MAX_PYTHON_FRAMES`, counted but not kept; with
    /// `PYTHON_DROPPED_MORE` set, the chain went on past `MAX_PYTHON_STEPS` too.
    pub python_dropped: u32,
    /// The process whose stack it is (user stacks; 0 for kernel stacks): the same addresses
    /// in two processes are two stacks, symbolized against each one's mappings.
    pub tgid: u32,
    pub _pad: u32,
    pub native: [u64; MAX_NATIVE_FRAMES],
    pub python: [PyFrame; MAX_PYTHON_FRAMES],
}

/// Set in `StackRecord::python_dropped` when the count is a lower bound.
pub const PYTHON_DROPPED_MORE: u32 = 1 << 31;

/// Per-stack running totals, kept in BPF for `--combined-only`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CombinedAlloc {
    pub total_size: u64,
    pub number_of_allocs: u64,
}

/// A call between its entry and return probe, parked in its thread's slot (or by pid_tgid when
/// another thread holds the slot); an idle slot keeps its thread (`tid`) until it exits. `sp` is the stack pointer at entry (0: none in flight): a
/// call made while another is in flight on the thread (glibc's malloc calling mmap, realloc
/// calling malloc) has a lower `sp` and is ignored, so the outer call owns the memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct InFlight {
    pub size: u64,
    /// realloc/mremap: the old address; posix_memalign: the out-pointer.
    pub arg: u64,
    pub sp: u64,
    /// The thread whose call this is.
    pub tid: u32,
    pub kind: u32,
    /// 0: sampled out or outside the size filter; the call still owns its nested calls.
    pub record: u32,
    pub _pad: u32,
}

/// Thread slots for calls in flight, at `tid % slots` (a power of two): with the default
/// pid_max (32768) no two threads share one.
pub const DEFAULT_THREAD_SLOTS: u32 = 1 << 15;

/// An event for `--trace`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceEvent {
    pub timestamp_ns: u64,
    pub addr: u64,
    pub size: u64,
    /// realloc/mremap: the old address.
    pub old_addr: u64,
    pub stack_id: i64,
    pub tid: u32,
    pub kind: u32,
}

/// Indexes into a process's [`Counts`] in `COUNTERS`. Everything lost is counted here, never
/// dropped silently; userspace prints the non-zero ones with every table.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// An allocation not recorded because `ALLOCS` or `MMAPS` was full.
    AllocsFull = 0,
    /// A stack walk that failed (stack map full or hash collision).
    StackLost = 1,
    /// An allocation not recorded because its entry was lost: `INFLIGHT` (calls of threads
    /// whose slot another thread holds) was full, or two threads took one free slot at once.
    InflightFull = 2,
    /// `--combined-only` totals not updated because `COMBINED` was full.
    CombinedFull = 3,
    /// A `--trace` event dropped because the ring buffer was full.
    EventsLost = 4,
    /// An entry probe whose return never came (the thread longjmp'd out or was killed).
    StaleInflight = 5,
    /// A munmap that cut a tracked mapping in two but the second half could not be stored.
    MunmapSplitLost = 6,
    /// Allocations recorded (for `--verbose` and the tests).
    Recorded = 7,
    /// Frees and munmaps that matched a tracked allocation.
    Released = 8,
    /// A new Python code object not handed to userspace at once (`PY_NEW_CODES` full): its
    /// name is read later, and lost if it dies first.
    PythonCodesDropped = 9,
}

pub const COUNTER_COUNT: u32 = 10;

/// One row of the per-CPU `COUNTERS` array: each [`Counter`] of one traced process (the row
/// is its slot), so what is lost is told per process. One lookup reads a process's counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub n: [u64; COUNTER_COUNT as usize],
}

/// The `COUNTERS` row of events no traced process is known for (a tgid not in `TRACED`, a
/// key whose slot bits are no slot); kernel mode spreads its counts over the rows.
pub const UNKNOWN_SLOT: u32 = MAX_PROCESSES;
/// Rows of `COUNTERS`: every slot and the unknown one.
pub const COUNTER_ROWS: u32 = MAX_PROCESSES + 1;

/// mmap(2) constants (x86-64 Linux).
pub const MAP_ANONYMOUS: u64 = 0x20;
pub const MAP_FAILED: u64 = u64::MAX;

/// Default map sizes: together under 64 MiB of locked memory.
/// User mode's `HEAP` has twice as many slots (`heap::DEFAULT_BITS`).
pub const DEFAULT_MAX_ALLOCS: u32 = 1 << 18;
pub const DEFAULT_MAX_MMAPS: u32 = 1 << 14;
pub const DEFAULT_MAX_STACKS: u32 = 1 << 14;
pub const DEFAULT_MAX_INFLIGHT: u32 = 1 << 13;
pub const DEFAULT_MAX_COMBINED: u32 = 1 << 14;

/// Processes traced at once by default with `--children` or `--cgroup` (`-p` alone sizes the
/// maps for the PIDs it names); each has a slot, the index of its per-process map entries.
pub const DEFAULT_MAX_PROCESSES: u32 = 64;
/// The most slots the block keys can tell apart (see [`Traced::key`]).
pub const MAX_PROCESSES: u32 = 127;
/// Bits of a user address below the slot in a block key: user space ends below 2^57 even
/// with 5-level page tables.
pub const SLOT_SHIFT: u32 = 57;

/// `TRACED`'s value, by tgid: a traced process's slot and how many times it exec'd since
/// memleak attached (every allocation carries the count, so those of an earlier program are
/// dropped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traced {
    pub slot: u32,
    pub execs: u32,
}

impl Traced {
    /// The key of a block at user address `addr` of this process in `HEAP` and `MMAPS`: forked
    /// workers hand out the same addresses, so the slot goes into the bits above the address.
    /// Slot 0 keys a block by its address alone, as a single process's always were.
    #[inline(always)]
    pub fn key(&self, addr: u64) -> u64 {
        addr | (self.slot as u64) << SLOT_SHIFT
    }
}

/// A user block key split back into (slot, address).
pub fn split_key(key: u64) -> (u32, u64) {
    ((key >> SLOT_SHIFT) as u32, key & ((1 << SLOT_SHIFT) - 1))
}

/// Byte offsets of the fields the kernel-mode programs read in each tracepoint record, taken
/// from the tracepoints' `format` files at run time (they moved between kernel versions).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelLayout {
    pub kmalloc_ptr: u32,
    pub kmalloc_bytes: u32,
    pub kfree_ptr: u32,
    pub cache_alloc_ptr: u32,
    pub cache_alloc_bytes: u32,
    pub cache_free_ptr: u32,
    pub page_alloc_pfn: u32,
    pub page_alloc_order: u32,
    pub page_free_pfn: u32,
    pub page_free_order: u32,
    pub percpu_alloc_ptr: u32,
    pub percpu_alloc_bytes: u32,
    pub percpu_free_ptr: u32,
    pub _pad: u32,
}

/// Kernel mode keys pages by pfn with this bit set: slab pointers have bit 63 set and per-CPU
/// pointers are small offsets, so the three key spaces never meet.
pub const PAGE_KEY_TAG: u64 = 1 << 62;

/// `--mode growth`: where the fields sit in the tracepoint records it reads. The syscall
/// tracepoints' layout is fixed by the ABI (`__syscall_nr`, then the arguments or `ret` as
/// longs); userspace checks all of them against the `format` files before attaching.
pub mod growth {
    /// The first argument of a `syscalls:sys_enter_*` record; argument n is 8·n further.
    pub const SYSCALL_ARGS: u32 = 16;
    /// `ret` of a `syscalls:sys_exit_*` record.
    pub const SYSCALL_RET: u32 = 16;
    /// `address` and `error_code` of an `exceptions:page_fault_{user,kernel}` record.
    pub const FAULT_ADDRESS: u32 = 8;
    pub const FAULT_ERROR_CODE: u32 = 24;
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for AllocInfo {}
    unsafe impl aya::Pod for HeapSlot {}
    unsafe impl aya::Pod for CombinedAlloc {}
    unsafe impl aya::Pod for InFlight {}
    unsafe impl aya::Pod for TraceEvent {}
    unsafe impl aya::Pod for PyFrame {}
    unsafe impl aya::Pod for KernelLayout {}
    unsafe impl aya::Pod for StackRecord {}
    unsafe impl aya::Pod for Traced {}
    unsafe impl aya::Pod for Counts {}
}

#[cfg(test)]
mod tests {
    use super::AllocKind;

    /// `kind` travels as a u32 through the maps: every kind must come back as itself.
    #[test]
    fn every_kind_round_trips() {
        let mut seen = 0;
        for v in 0..64 {
            if let Some(kind) = AllocKind::from_u32(v) {
                assert_eq!(kind as u32, v);
                seen += 1;
            }
        }
        assert_eq!(seen, AllocKind::PageFault as u32 + 1);
    }

    /// Twice the capacity, a power of two; a first slot always inside the table, and
    /// neighbouring malloc blocks spread over it.
    #[test]
    fn heap_table_geometry() {
        extern crate std;
        use super::heap::{bits_for, first_slot};
        assert_eq!(bits_for(0), 1);
        assert_eq!(bits_for(3), 3);
        assert_eq!(bits_for(1 << 18), 19);
        assert_eq!(bits_for(u32::MAX), 31);
        for bits in [1, 3, 19, 31] {
            for addr in [0x10u64, 0x5555_5555_92a0, 0x7fff_ffff_fff0, u64::MAX] {
                assert!(u64::from(first_slot(addr, bits)) < 1 << bits);
            }
        }
        let slots: std::collections::HashSet<u32> = (0..1024u64)
            .map(|i| first_slot(0x5555_5555_9000 + 16 * i, 12))
            .collect();
        assert!(slots.len() > 1000, "{} distinct first slots", slots.len());
    }
}
