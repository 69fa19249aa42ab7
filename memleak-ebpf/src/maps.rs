//! Every map of the program, declared together as libbpf-tools' memleak.bpf.c does; each is
//! named in `memleak_common::names::maps`, which userspace uses to find it.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, pt_regs},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use memleak_common::{
    AllocInfo, COUNTER_ROWS, CombinedAlloc, Counts, DEFAULT_MAX_ALLOCS, DEFAULT_MAX_COMBINED,
    DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_MMAPS, DEFAULT_MAX_PROCESSES, DEFAULT_MAX_STACKS,
    DEFAULT_THREAD_SLOTS, HeapSlot, InFlight, StackRecord, Traced, heap, named,
    names::maps,
    python::{MAX_PY_CODES_SEEN, MAX_PY_THREADS, PY_NEW_CODES_BYTES, PyConfig, SeenCode},
    unwind::{MAX_UNWIND_MAPPINGS, MAX_UNWIND_ROWS, UnwindControl, UnwindMapping, UnwindRow},
};

use crate::{growth::Syscall, python, unwind};

// Outstanding allocations.

/// User mode's heap blocks: an open-addressing table (`heap.rs`), read through mmap.
#[map]
pub(crate) static HEAP: Array<HeapSlot> =
    Array::with_max_entries(1 << heap::DEFAULT_BITS, BPF_F_MMAPABLE);
/// Kernel mode's allocations and growth mode's pages (user mode uses `HEAP`).
#[map]
pub(crate) static ALLOCS: HashMap<u64, AllocInfo> =
    HashMap::with_max_entries(DEFAULT_MAX_ALLOCS, 0);
#[map]
pub(crate) static MMAPS: HashMap<u64, AllocInfo> = HashMap::with_max_entries(DEFAULT_MAX_MMAPS, 0);
/// --combined-only: outstanding bytes and blocks per stack id.
#[map]
pub(crate) static COMBINED: HashMap<i64, CombinedAlloc> =
    HashMap::with_max_entries(DEFAULT_MAX_COMBINED, 0);

// Calls between their entry and their return.

/// Each thread's call in flight, in the slot `tid & SLOT_MASK`: an array slot costs no hash
/// lookup on the hot path. A free slot (`tid` 0) goes to the first thread that calls in it,
/// which alone writes it (`sp` 0: no call in flight) until `sched_process_exit` frees it.
#[map]
pub(crate) static SLOTS: Array<InFlight> = Array::with_max_entries(DEFAULT_THREAD_SLOTS, 0);
/// Calls of threads whose slot another thread holds, by pid_tgid, deleted at return; LRU so
/// that calls whose return never came make room.
#[map]
pub(crate) static INFLIGHT: LruHashMap<u64, InFlight> =
    LruHashMap::with_max_entries(DEFAULT_MAX_INFLIGHT, 0);
/// Growth mode: a memory system call between its enter and exit tracepoints, by pid_tgid.
#[map]
pub(crate) static SYSCALLS: HashMap<u64, Syscall> =
    HashMap::with_max_entries(DEFAULT_MAX_INFLIGHT, 0);

// Stacks.

/// Distinct stacks, keyed by the hash of their frames (the `stack_id` of allocations).
/// Entries are allocated as stacks come: a 3 KiB record each, most of it Python room that
/// most stacks leave empty.
#[map]
pub(crate) static STACKS: HashMap<u64, StackRecord> =
    HashMap::with_max_entries(DEFAULT_MAX_STACKS, BPF_F_NO_PREALLOC);
/// Every object's rows, each object's sorted by `pc`. Userspace writes it through mmap.
#[map]
pub(crate) static UNWIND_ROWS: Array<UnwindRow> =
    Array::with_max_entries(MAX_UNWIND_ROWS, BPF_F_MMAPABLE);
/// Per process slot, two generations of its sorted mapping table (slot `s` owns the
/// `2 * MAX_UNWIND_MAPPINGS` entries from `2 * s * MAX_UNWIND_MAPPINGS`); userspace sizes it
/// for the processes it traces.
#[map]
pub(crate) static UNWIND_MAPPINGS: Array<UnwindMapping> =
    Array::with_max_entries(2 * MAX_UNWIND_MAPPINGS * DEFAULT_MAX_PROCESSES, 0);
/// Per process slot: which half of its `UNWIND_MAPPINGS` range is current.
#[map]
pub(crate) static UNWIND_CONTROL: Array<UnwindControl> =
    Array::with_max_entries(DEFAULT_MAX_PROCESSES, 0);
/// This CPU's native walk (the record does not fit the 512-byte BPF stack).
#[map]
pub(crate) static WALK: PerCpuArray<unwind::Walk> = PerCpuArray::with_max_entries(1, 0);
/// Rows found by earlier walks on this CPU, by address: allocations come from a few call
/// sites, and a hit saves the two binary searches (most of a walk's cost).
#[map]
pub(crate) static ROW_CACHE: PerCpuArray<unwind::RowCache> = PerCpuArray::with_max_entries(1, 0);
/// This CPU's kernel stack being taken (a record is 3 KiB; the BPF stack is 512 bytes).
#[map]
pub(crate) static KSTACK: PerCpuArray<StackRecord> = PerCpuArray::with_max_entries(1, 0);
/// Growth mode: the user registers of the current thread, copied where the unwinder can read
/// them.
#[map]
pub(crate) static USER_REGS: PerCpuArray<pt_regs> = PerCpuArray::with_max_entries(1, 0);

// Python.

/// Per process slot: written by userspace once it finds CPython in the process; zero until
/// then (two processes may run two interpreters).
#[map]
pub(crate) static PY_CONFIG: Array<PyConfig> = Array::with_max_entries(DEFAULT_MAX_PROCESSES, 0);
/// fs_base (pthread_t) keyed with the process slot (`Traced::key`) → `PyThreadState` address.
#[map]
pub(crate) static PY_THREADS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_PY_THREADS, 0);
/// This CPU's Python walk.
#[map]
pub(crate) static PY_WALK: PerCpuArray<python::Walk> = PerCpuArray::with_max_entries(1, 0);
/// The code objects of new stacks that userspace has not been handed yet (`NewPythonCode`),
/// for it to read while they live.
#[map]
pub(crate) static PY_NEW_CODES: RingBuf = RingBuf::with_byte_size(PY_NEW_CODES_BYTES, 0);
/// The code objects handed to userspace, with the identity they had (`code_identity`).
#[map]
pub(crate) static PY_CODES_SEEN: LruHashMap<SeenCode, u64> =
    LruHashMap::with_max_entries(MAX_PY_CODES_SEEN, 0);

// The traced processes.

/// Every traced process (user and growth mode) by tgid: its slot and exec count. Userspace
/// adds a process before attaching its probes and removes it once it exited.
#[map]
pub(crate) static TRACED: HashMap<u32, Traced> =
    HashMap::with_max_entries(DEFAULT_MAX_PROCESSES, 0);
/// Growth mode, per process slot: its program break; userspace seeds it from /proc, an exec
/// clears it (the new program's first brk call tells it again).
#[map]
pub(crate) static BRK: Array<u64> = Array::with_max_entries(DEFAULT_MAX_PROCESSES, 0);

// What userspace reads besides the tables.

/// Per-CPU counts of each `Counter` (what was recorded, and what was lost and why), a row per
/// process slot and one for no known process (`UNKNOWN_SLOT`).
#[map]
pub(crate) static COUNTERS: PerCpuArray<Counts> = PerCpuArray::with_max_entries(COUNTER_ROWS, 0);
/// --trace: one `TraceEvent` per allocation and release.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

named!(
    HEAP = maps::HEAP,
    ALLOCS = maps::ALLOCS,
    MMAPS = maps::MMAPS,
    COMBINED = maps::COMBINED,
    SLOTS = maps::SLOTS,
    INFLIGHT = maps::INFLIGHT,
    SYSCALLS = maps::SYSCALLS,
    STACKS = maps::STACKS,
    UNWIND_ROWS = maps::UNWIND_ROWS,
    UNWIND_MAPPINGS = maps::UNWIND_MAPPINGS,
    UNWIND_CONTROL = maps::UNWIND_CONTROL,
    WALK = maps::WALK,
    ROW_CACHE = maps::ROW_CACHE,
    KSTACK = maps::KSTACK,
    USER_REGS = maps::USER_REGS,
    PY_CONFIG = maps::PY_CONFIG,
    PY_THREADS = maps::PY_THREADS,
    PY_WALK = maps::PY_WALK,
    PY_NEW_CODES = maps::PY_NEW_CODES,
    PY_CODES_SEEN = maps::PY_CODES_SEEN,
    TRACED = maps::TRACED,
    BRK = maps::BRK,
    COUNTERS = maps::COUNTERS,
    EVENTS = maps::EVENTS,
);
