//! Loading the embedded BPF object and hooking the allocator of one process.

use std::{num::NonZeroU32, path::Path};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::Array,
    programs::{
        TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeLink, UProbeScope},
    },
};
use memleak::binding::{self, Hook};
use memleak_common::{
    AllocKind, KernelLayout, heap,
    names::{globals, maps, programs},
    python::MAX_PY_THREADS,
    unwind::MAX_UNWIND_MAPPINGS,
};

use crate::{
    cli::Args,
    placement::{self, Placement},
};

static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memleak"));

/// Checks the things that would otherwise fail deep inside the loader with an errno.
pub fn preflight() -> Result<()> {
    if unsafe { libc::geteuid() } != 0 && !has_bpf_caps() {
        bail!(
            "memleak needs root (or CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE) to load BPF programs and read the target"
        );
    }
    if !Path::new("/sys/bus/event_source/devices/uprobe").exists() {
        bail!(
            "this kernel has no uprobe support (CONFIG_UPROBE_EVENTS); memleak cannot hook user allocators here"
        );
    }
    Ok(())
}

fn has_bpf_caps() -> bool {
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_BPF) != 0 && caps & (1 << CAP_PERFMON) != 0)
}

/// Loads the BPF object; `target_pid` is kernel mode's filter (`None`: every process); `kernel` carries the tracepoint layout in kernel mode. The
/// per-process maps get room for `args.max_processes()`.
pub fn load(args: &Args, target_pid: Option<u32>, kernel: Option<&KernelLayout>) -> Result<Ebpf> {
    let target_tgid = target_pid.unwrap_or(0);
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let min_size = args.min_size.unwrap_or(0);
    let max_size = args.max_size.unwrap_or(u64::MAX);
    let trace = args.trace as u8;
    let combined_only = args.combined_only as u8;
    let layout = kernel.copied().unwrap_or_default();
    let processes = args.max_processes();
    // Heap blocks go to HEAP in user mode and to ALLOCS otherwise; the other gets one entry.
    let (heap_bits, allocs) = if args.heap_table() {
        (heap::bits_for(args.max_allocs), 1)
    } else {
        (0, args.max_allocs)
    };
    EbpfLoader::new()
        .override_global(globals::KERNEL_LAYOUT, &layout, true)
        .override_global(globals::TARGET_TGID, &target_tgid, true)
        .override_global(globals::MIN_SIZE, &min_size, true)
        .override_global(globals::MAX_SIZE, &max_size, true)
        .override_global(globals::SAMPLE_RATE, &args.sample_rate, true)
        .override_global(globals::SAMPLE_BYTES, &args.sample_bytes.unwrap_or(0), true)
        .override_global(globals::TRACE, &trace, true)
        .override_global(globals::COMBINED_ONLY, &combined_only, true)
        .override_global(globals::PAGE_SIZE, &page_size, true)
        .override_global(globals::SLOT_MASK, &(args.thread_slots - 1), true)
        .override_global(globals::HEAP_BITS, &heap_bits, true)
        .override_global(globals::EMPTY_PROBES, &(args.empty_probes as u8), true)
        .map_max_entries(maps::HEAP, 1 << heap_bits)
        .map_max_entries(maps::ALLOCS, allocs)
        .map_max_entries(maps::MMAPS, args.max_mmaps)
        .map_max_entries(maps::STACKS, args.max_stacks)
        .map_max_entries(maps::INFLIGHT, args.max_inflight)
        .map_max_entries(maps::SLOTS, args.thread_slots)
        .map_max_entries(maps::COMBINED, args.max_combined)
        .map_max_entries(maps::TRACED, processes)
        .map_max_entries(maps::PY_CONFIG, processes)
        .map_max_entries(maps::BRK, processes)
        .map_max_entries(maps::UNWIND_CONTROL, processes)
        .map_max_entries(maps::UNWIND_MAPPINGS, 2 * MAX_UNWIND_MAPPINGS * processes)
        .map_max_entries(maps::PY_THREADS, MAX_PY_THREADS * processes)
        .load(BPF_OBJECT)
        .context("loading the BPF program (kernel too old, or locked memory limit too low?)")
}

/// Where each entry point was hooked (for `--verbose`), and its probes: owned, so that a
/// process that exits can have its probes detached while the others stay.
pub struct Attached {
    pub hook: Hook,
    pub placement: Placement,
    pub links: Vec<UProbeLink>,
}

/// Loads the allocator programs and attaches the exec and exit tracepoints, once for every
/// process `attach` hooks.
pub fn load_user(ebpf: &mut Ebpf) -> Result<()> {
    for name in AllocKind::USER
        .into_iter()
        .filter_map(entry_program)
        .chain([programs::ALLOC_RETURN])
    {
        let prog: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("BPF object lacks program {name}"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("verifier rejected {name}"))?;
    }
    attach_tracepoints(
        ebpf,
        &[
            ("sched", programs::SCHED_PROCESS_EXEC),
            ("sched", programs::SCHED_PROCESS_EXIT),
        ],
    )
}

/// Hooks every entry point of `hooks` (binding.rs chose them: the definitions the process
/// calls) for process `pid` alone (`load_user` first).
pub fn attach(ebpf: &mut Ebpf, pid: u32, hooks: &[Hook]) -> Result<Vec<Attached>> {
    let pid = NonZeroU32::new(pid).context("PID 0 is not a process")?;
    hooks.iter().map(|h| hook(ebpf, h, pid, hooks)).collect()
}

/// Hooks one function that behaves like its kind with that kind's programs, at its placement
/// (the code of the other `hooks` in its object read with it).
fn hook(ebpf: &mut Ebpf, h: &Hook, pid: NonZeroU32, hooks: &[Hook]) -> Result<Attached> {
    let program = entry_program(h.kind).context("not a user-space allocator entry point")?;
    let entry_only = matches!(h.kind, AllocKind::Free | AllocKind::Munmap);
    let along: Vec<&str> = hooks
        .iter()
        .filter(|o| o.object == h.object)
        .map(|o| o.symbol.as_str())
        .collect();
    let place = probe_offset(h, entry_only, &along);
    let at = h.file_offset + place.offset;
    let mut links = vec![attach_one(ebpf, program, h, at, pid)?];
    if !entry_only {
        // Same address as the entry probe: both share one breakpoint.
        links.push(attach_one(ebpf, programs::ALLOC_RETURN, h, at, pid)?);
    }
    Ok(Attached {
        hook: h.clone(),
        placement: place,
        links,
    })
}

/// `--python-allocators`: CPython's own allocator entry points in `object` (libpython or
/// the executable), each hooked like the libc function it behaves like. A block pymalloc
/// forwards to malloc is a call nested in the in-flight outer one: counted once.
pub fn attach_python_allocators(ebpf: &mut Ebpf, pid: u32, object: &Path) -> Result<Vec<Attached>> {
    let pid = NonZeroU32::new(pid).context("PID 0 is not a process")?;
    let hooks = binding::named_in_object(object, &crate::python::ALLOCATOR_ENTRY_POINTS)?;
    hooks.iter().map(|h| hook(ebpf, h, pid, &hooks)).collect()
}

/// Where in the hooked function to probe so the kernel emulates the probed instruction
/// (placement.rs): the first such instruction reached with the registers the kind's entry
/// program reads still intact. A function that also gets the return probe keeps its entry
/// stack pointer there. Any trouble reading the code means the plain entry.
fn probe_offset(h: &Hook, entry_only: bool, along: &[&str]) -> Placement {
    let args = entry_args(h.kind);
    let entry = |why: String| Placement {
        offset: 0,
        reason: format!("{why}; probing the entry"),
    };
    match memleak::objects::function_code(&h.object, &h.symbol, along) {
        // The name found another definition (a hidden symbol version): not this code.
        Ok(code) if code.vaddr != h.vaddr => entry(format!("{} has two definitions", h.symbol)),
        Ok(code) if entry_only => placement::choose(&code.bytes, code.vaddr, args),
        Ok(code) => placement::choose_for_return(&code.bytes, code.vaddr, args),
        Err(e) => entry(format!("{e:#}")),
    }
}

/// Attaches `program` at byte `offset` of the hooked object's file.
fn attach_one(
    ebpf: &mut Ebpf,
    program: &str,
    h: &Hook,
    offset: u64,
    pid: NonZeroU32,
) -> Result<UProbeLink> {
    let prog: &mut UProbe = ebpf
        .program_mut(program)
        .context(program.to_string())?
        .try_into()?;
    let location = UProbeAttachLocation::AbsoluteOffset(offset);
    let link = prog
        .attach(location, &h.object, UProbeScope::OneProcess(pid))
        .with_context(|| {
            format!(
                "attaching {program} to {} in {}",
                h.symbol,
                h.object.display()
            )
        })?;
    Ok(prog.take_link(link)?)
}

/// The argument registers the entry program of `kind` reads (as `main.rs` of memleak-ebpf
/// takes them): only those must survive to the probe. `PyObject_Malloc` copies its size to
/// %rsi first (`mov %rdi,%rsi`, which the kernel single-steps) and reaches an emulated `js`
/// with %rdi intact, so it is probed there.
fn entry_args(kind: AllocKind) -> &'static [placement::Reg] {
    use placement::Reg;
    match kind {
        AllocKind::Malloc | AllocKind::Valloc | AllocKind::Pvalloc | AllocKind::Free => &[Reg::RDI],
        AllocKind::AlignedAlloc | AllocKind::Memalign => &[Reg::RSI],
        AllocKind::Calloc | AllocKind::Realloc | AllocKind::Munmap => &[Reg::RDI, Reg::RSI],
        AllocKind::Reallocarray => &[Reg::RDI, Reg::RSI, Reg::RDX],
        AllocKind::PosixMemalign | AllocKind::Mremap => &[Reg::RDI, Reg::RDX],
        AllocKind::Mmap => &[Reg::RSI, Reg::RDX, Reg::RCX],
        _ => &placement::ARG_REGS,
    }
}

fn entry_program(kind: AllocKind) -> Option<&'static str> {
    Some(match kind {
        AllocKind::Malloc => programs::MALLOC_ENTER,
        AllocKind::Calloc => programs::CALLOC_ENTER,
        AllocKind::Realloc => programs::REALLOC_ENTER,
        AllocKind::Reallocarray => programs::REALLOCARRAY_ENTER,
        AllocKind::PosixMemalign => programs::POSIX_MEMALIGN_ENTER,
        AllocKind::AlignedAlloc => programs::ALIGNED_ALLOC_ENTER,
        AllocKind::Memalign => programs::MEMALIGN_ENTER,
        AllocKind::Valloc => programs::VALLOC_ENTER,
        AllocKind::Pvalloc => programs::PVALLOC_ENTER,
        AllocKind::Mmap => programs::MMAP_ENTER,
        AllocKind::Mremap => programs::MREMAP_ENTER,
        AllocKind::Free => programs::FREE_ENTER,
        AllocKind::Munmap => programs::MUNMAP_ENTER,
        _ => return None,
    })
}

/// The kernel-mode tracepoints (category, event); each program is named for its event.
const KERNEL_EVENTS: [(&str, &str); 8] = [
    ("kmem", programs::KMALLOC),
    ("kmem", programs::KFREE),
    ("kmem", programs::KMEM_CACHE_ALLOC),
    ("kmem", programs::KMEM_CACHE_FREE),
    ("kmem", programs::MM_PAGE_ALLOC),
    ("kmem", programs::MM_PAGE_FREE),
    ("percpu", programs::PERCPU_ALLOC_PERCPU),
    ("percpu", programs::PERCPU_FREE_PERCPU),
];

const TRACEFS: &str = "/sys/kernel/tracing";

/// Mounts tracefs if nobody has (a fresh machine often has not): tracepoints are found there.
fn ensure_tracefs() -> Result<()> {
    if Path::new(TRACEFS).join("events").is_dir() {
        return Ok(());
    }
    let r = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            c"/sys/kernel/tracing".as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        bail!(
            "tracefs is not mounted at {TRACEFS} and mounting it failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Reads where each field the kernel programs need sits in its tracepoint record.
pub fn kernel_layout() -> Result<KernelLayout> {
    ensure_tracefs()?;
    Ok(KernelLayout {
        kmalloc_ptr: field_offset("kmem", "kmalloc", "ptr")?,
        kmalloc_bytes: field_offset("kmem", "kmalloc", "bytes_alloc")?,
        kfree_ptr: field_offset("kmem", "kfree", "ptr")?,
        cache_alloc_ptr: field_offset("kmem", "kmem_cache_alloc", "ptr")?,
        cache_alloc_bytes: field_offset("kmem", "kmem_cache_alloc", "bytes_alloc")?,
        cache_free_ptr: field_offset("kmem", "kmem_cache_free", "ptr")?,
        page_alloc_pfn: field_offset("kmem", "mm_page_alloc", "pfn")?,
        page_alloc_order: field_offset("kmem", "mm_page_alloc", "order")?,
        page_free_pfn: field_offset("kmem", "mm_page_free", "pfn")?,
        page_free_order: field_offset("kmem", "mm_page_free", "order")?,
        percpu_alloc_ptr: field_offset("percpu", "percpu_alloc_percpu", "ptr")?,
        percpu_alloc_bytes: field_offset("percpu", "percpu_alloc_percpu", "bytes_alloc")?,
        percpu_free_ptr: field_offset("percpu", "percpu_free_percpu", "ptr")?,
        _pad: 0,
    })
}

/// Where `field` sits in the records of tracepoint `category:event`.
fn field_offset(category: &str, event: &str, field: &str) -> Result<u32> {
    let path = format!("{TRACEFS}/events/{category}/{event}/format");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("this kernel has no {category}:{event} tracepoint ({path})"))?;
    format_offset(&text, field).with_context(|| format!("{path} has no field {field}"))
}

/// Fields of a tracepoint record and their offsets.
type Fields = &'static [(&'static str, u32)];

/// `--mode growth`: the memory system calls and page faults, each program named for its event,
/// with the record fields it reads and where `memleak_common::growth` expects them.
const GROWTH_EVENTS: [(&str, &str, Fields); 9] = {
    use memleak_common::growth::{FAULT_ADDRESS, FAULT_ERROR_CODE, SYSCALL_ARGS as A, SYSCALL_RET};
    let fault: Fields = &[("address", FAULT_ADDRESS), ("error_code", FAULT_ERROR_CODE)];
    let ret: Fields = &[("ret", SYSCALL_RET)];
    [
        ("exceptions", programs::PAGE_FAULT_USER, fault),
        ("exceptions", programs::PAGE_FAULT_KERNEL, fault),
        (
            "syscalls",
            programs::SYS_ENTER_MMAP,
            &[
                ("addr", A),
                ("len", A + 8),
                ("prot", A + 16),
                ("flags", A + 24),
            ],
        ),
        ("syscalls", programs::SYS_EXIT_MMAP, ret),
        (
            "syscalls",
            programs::SYS_ENTER_MUNMAP,
            &[("addr", A), ("len", A + 8)],
        ),
        (
            "syscalls",
            programs::SYS_ENTER_MADVISE,
            &[("start", A), ("len_in", A + 8), ("behavior", A + 16)],
        ),
        (
            "syscalls",
            programs::SYS_ENTER_MREMAP,
            &[("addr", A), ("old_len", A + 8), ("new_len", A + 16)],
        ),
        ("syscalls", programs::SYS_EXIT_MREMAP, ret),
        ("syscalls", programs::SYS_EXIT_BRK, ret),
    ]
};

/// `--mode growth`: hooks no function of the targets, only tracepoints (each filtered in BPF
/// to the processes of `TRACED`); attached once, for every process traced.
pub fn attach_growth(ebpf: &mut Ebpf) -> Result<()> {
    ensure_tracefs()?;
    for (category, event, fields) in GROWTH_EVENTS {
        for &(field, expected) in fields {
            let at = field_offset(category, event, field)?;
            if at != expected {
                bail!(
                    "{category}:{event} has {field} at offset {at}, not {expected}: an unknown kernel layout"
                );
            }
        }
    }
    let events: Vec<(&str, &str)> = GROWTH_EVENTS.iter().map(|&(c, e, _)| (c, e)).collect();
    attach_tracepoints(ebpf, &events)?;
    attach_tracepoints(ebpf, &[("sched", programs::SCHED_PROCESS_EXEC)])
}

/// Growth mode: the program break of the process in `slot` (0: unknown until its next brk
/// call), set before the process enters `TRACED` (a reused slot holds its last one's).
pub fn seed_break(ebpf: &mut Ebpf, slot: u32, brk: u64) -> Result<()> {
    let brk_map = ebpf
        .map_mut(maps::BRK)
        .with_context(|| format!("BPF object lacks map {}", maps::BRK))?;
    let mut break_map: Array<_, u64> = Array::try_from(brk_map)?;
    Ok(break_map.set(slot, brk, 0)?)
}

/// `field:const void * ptr; offset:16; size:8;` (tab-separated) → 16 for `ptr`.
fn format_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?.split(';').next()?;
        let name = decl.rsplit([' ', '*']).next()?;
        if name != field {
            return None;
        }
        let off = line.split("offset:").nth(1)?.split(';').next()?;
        off.trim().parse().ok()
    })
}

/// Hooks the kernel allocators (no -p): every process, kernel stacks.
pub fn attach_kernel(ebpf: &mut Ebpf) -> Result<()> {
    attach_tracepoints(ebpf, &KERNEL_EVENTS)
}

/// Attaches each tracepoint to the program named for its event.
fn attach_tracepoints(ebpf: &mut Ebpf, events: &[(&str, &str)]) -> Result<()> {
    ensure_tracefs()?;
    for &(category, event) in events {
        let prog: &mut TracePoint = ebpf
            .program_mut(event)
            .with_context(|| format!("BPF object lacks program {event}"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("verifier rejected {event}"))?;
        prog.attach(category, event)
            .with_context(|| format!("attaching to tracepoint {category}:{event}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use memleak_common::names::{maps, programs};
    use object::{Object, ObjectSection, ObjectSymbol};

    use super::{BPF_OBJECT, format_offset};

    /// The names of the symbols in the BPF object's sections that `section` accepts.
    fn symbols_in(section: impl Fn(&str) -> bool) -> BTreeSet<String> {
        let file = object::File::parse(BPF_OBJECT).unwrap();
        file.symbols()
            .filter(|s| s.is_global())
            .filter(|s| {
                let sec = s
                    .section_index()
                    .and_then(|i| file.section_by_index(i).ok());
                sec.and_then(|sec| sec.name().ok().map(&section)) == Some(true)
            })
            .map(|s| s.name().unwrap().to_string())
            .collect()
    }

    #[test]
    fn every_map_and_program_of_the_object_is_named_in_the_contract() {
        let named = |all: &[&str]| all.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(symbols_in(|s| s == "maps"), named(maps::ALL));
        let probe = |s: &str| {
            ["uprobe", "uretprobe", "tracepoint"]
                .iter()
                .any(|p| s.starts_with(p))
        };
        assert_eq!(symbols_in(probe), named(programs::ALL));
    }

    #[test]
    fn reads_field_offsets_from_a_format_file() {
        let f = "name: kmalloc\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:const void * ptr;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:size_t bytes_alloc;\toffset:32;\tsize:8;\tsigned:0;\n";
        assert_eq!(format_offset(f, "ptr"), Some(16));
        assert_eq!(format_offset(f, "bytes_alloc"), Some(32));
        assert_eq!(format_offset(f, "bytes"), None);
    }
}
