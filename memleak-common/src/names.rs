//! Every name the two sides share: the BPF object's maps, programs and load-time globals.
//! Userspace looks each up by its constant here; the aya macros name a map or program after
//! its Rust identifier, so the BPF crate checks with [`crate::named!`] at compile time that each
//! identifier is the name its constant says.

/// Declares each constant as the name of the same spelling (`ALLOCS` → "ALLOCS"), or of the
/// identifier after `=` (`MALLOC_ENTER = malloc_enter`), and `ALL`, the list of them.
macro_rules! names {
    ($($(#[$doc:meta])* $constant:ident $(= $name:ident)?),* $(,)?) => {
        $($(#[$doc])* pub const $constant: &str = names!(@name $constant $($name)?);)*
        /// Every name above.
        pub const ALL: &[&str] = &[$($constant),*];
    };
    (@name $constant:ident) => { stringify!($constant) };
    (@name $constant:ident $name:ident) => { stringify!($name) };
}

/// Maps, as libbpf-tools' memleak names its own: what they hold, upper case.
pub mod maps {
    names!(
        ALLOCS,
        MMAPS,
        COMBINED,
        SLOTS,
        INFLIGHT,
        COUNTERS,
        EVENTS,
        HEAP,
        EXECS,
        SYSCALLS,
        BRK,
        USER_REGS,
        KSTACK,
        PY_CONFIG,
        PY_THREADS,
        PY_WALK,
        PY_NEW_CODES,
        PY_CODES_SEEN,
        UNWIND_ROWS,
        UNWIND_MAPPINGS,
        UNWIND_CONTROL,
        STACKS,
        WALK,
        ROW_CACHE,
    );
}

/// Programs. A tracepoint's program is named for its event.
pub mod programs {
    names!(
        MALLOC_ENTER = malloc_enter,
        CALLOC_ENTER = calloc_enter,
        REALLOC_ENTER = realloc_enter,
        REALLOCARRAY_ENTER = reallocarray_enter,
        POSIX_MEMALIGN_ENTER = posix_memalign_enter,
        ALIGNED_ALLOC_ENTER = aligned_alloc_enter,
        MEMALIGN_ENTER = memalign_enter,
        VALLOC_ENTER = valloc_enter,
        PVALLOC_ENTER = pvalloc_enter,
        MMAP_ENTER = mmap_enter,
        MREMAP_ENTER = mremap_enter,
        FREE_ENTER = free_enter,
        MUNMAP_ENTER = munmap_enter,
        /// The return probe of every allocating function.
        ALLOC_RETURN = alloc_return,
        /// Holds a command started with -c at its entry point until its symbols are read.
        HOLD_AT_ENTRY = hold_at_entry,
        SCHED_PROCESS_EXEC = sched_process_exec,
        SCHED_PROCESS_EXIT = sched_process_exit,
        PAGE_FAULT_USER = page_fault_user,
        PAGE_FAULT_KERNEL = page_fault_kernel,
        SYS_ENTER_MMAP = sys_enter_mmap,
        SYS_EXIT_MMAP = sys_exit_mmap,
        SYS_ENTER_MUNMAP = sys_enter_munmap,
        SYS_ENTER_MADVISE = sys_enter_madvise,
        SYS_ENTER_MREMAP = sys_enter_mremap,
        SYS_EXIT_MREMAP = sys_exit_mremap,
        SYS_EXIT_BRK = sys_exit_brk,
        KMALLOC = kmalloc,
        KFREE = kfree,
        KMEM_CACHE_ALLOC = kmem_cache_alloc,
        KMEM_CACHE_FREE = kmem_cache_free,
        MM_PAGE_ALLOC = mm_page_alloc,
        MM_PAGE_FREE = mm_page_free,
        PERCPU_ALLOC_PERCPU = percpu_alloc_percpu,
        PERCPU_FREE_PERCPU = percpu_free_percpu,
    );
}

/// Globals in the BPF object that userspace sets before load.
pub mod globals {
    names!(
        MIN_SIZE,
        MAX_SIZE,
        SAMPLE_RATE,
        SAMPLE_BYTES,
        TRACE,
        COMBINED_ONLY,
        PAGE_SIZE,
        KERNEL_LAYOUT,
        TARGET_TGID,
        SLOT_MASK,
        HEAP_BITS,
        EMPTY_PROBES,
    );
}

/// Whether two names are equal, in a const context.
pub const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// In the BPF crate: fails the build unless each item (a map, a program or a global in scope)
/// is named as its constant says: `named!(ALLOCS = maps::ALLOCS, kfree = programs::KFREE)`.
#[macro_export]
macro_rules! named {
    ($($item:ident = $name:expr),* $(,)?) => {
        $(const _: () = {
            let _ = &$item;
            assert!($crate::names::same(stringify!($item), $name));
        };)*
    };
}
