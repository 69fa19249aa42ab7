//! Loading the embedded BPF object and hooking the allocator of one process.

use std::{collections::HashMap, num::NonZeroU32, path::Path};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{UProbe, uprobe::UProbeScope},
};
use memleak_common::{AllocKind, globals};

use crate::cli::Args;

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

pub fn load(args: &Args) -> Result<Ebpf> {
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let min_size = args.min_size.unwrap_or(0);
    let max_size = args.max_size.unwrap_or(u64::MAX);
    let trace = args.trace as u8;
    let combined_only = args.combined_only as u8;
    EbpfLoader::new()
        .override_global(globals::MIN_SIZE, &min_size, true)
        .override_global(globals::MAX_SIZE, &max_size, true)
        .override_global(globals::SAMPLE_RATE, &args.sample_rate, true)
        .override_global(globals::TRACE, &trace, true)
        .override_global(globals::COMBINED_ONLY, &combined_only, true)
        .override_global(globals::PAGE_SIZE, &page_size, true)
        .map_max_entries("ALLOCS", args.max_allocs)
        .map_max_entries("MMAPS", args.max_mmaps)
        .map_max_entries("STACKS", args.max_stacks)
        .map_max_entries("INFLIGHT", args.max_inflight)
        .map_max_entries("COMBINED", args.max_combined)
        .load(BPF_OBJECT)
        .context("loading the BPF program (kernel too old, or locked memory limit too low?)")
}

/// Where each entry point was hooked, for `--verbose`.
pub struct Attached {
    pub function: String,
    pub object: String,
    pub vaddr: u64,
}

/// Hooks every entry point found in `alloc_lib` (malloc family, with `prefix`) and in `libc`
/// (mmap family). A symbol that is an alias of one already hooked (glibc's aligned_alloc is
/// memalign) is hooked once.
pub fn attach(
    ebpf: &mut Ebpf,
    pid: u32,
    alloc_lib: &Path,
    prefix: &str,
    libc: &Path,
) -> Result<Vec<Attached>> {
    let pid = NonZeroU32::new(pid).context("PID 0 is not a process")?;
    for name in entry_program_names().chain(["alloc_return"]) {
        let prog: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("BPF object lacks program {name}"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("verifier rejected {name}"))?;
    }
    let mut symbols: HashMap<&Path, HashMap<String, u64>> = HashMap::new();
    let mut hooked: HashMap<(&Path, u64), AllocKind> = HashMap::new();
    let mut attached = Vec::new();
    for kind in AllocKind::ALL {
        let (object, symbol) = if kind.is_syscall_wrapper() {
            (libc, kind.symbol().to_string())
        } else {
            (alloc_lib, format!("{prefix}{}", kind.symbol()))
        };
        if !symbols.contains_key(object) {
            symbols.insert(object, function_symbols(object)?);
        }
        let Some(&vaddr) = symbols[object].get(&symbol) else {
            if matches!(kind, AllocKind::Malloc | AllocKind::Free) {
                bail!(
                    "{} has no {symbol}: not an allocator (a static binary? name the object with -O, and its symbol prefix with --symbols-prefix)",
                    object.display()
                );
            }
            continue;
        };
        if hooked.insert((object, vaddr), kind).is_some() {
            continue;
        }
        attach_one(ebpf, entry_program(kind), &symbol, object, pid)?;
        if !matches!(kind, AllocKind::Free | AllocKind::Munmap) {
            attach_one(ebpf, "alloc_return", &symbol, object, pid)?;
        }
        attached.push(Attached {
            function: symbol,
            object: object.display().to_string(),
            vaddr,
        });
    }
    Ok(attached)
}

fn attach_one(
    ebpf: &mut Ebpf,
    program: &str,
    symbol: &str,
    object: &Path,
    pid: NonZeroU32,
) -> Result<()> {
    let prog: &mut UProbe = ebpf
        .program_mut(program)
        .context(program.to_string())?
        .try_into()?;
    prog.attach(symbol, object, UProbeScope::OneProcess(pid))
        .with_context(|| format!("attaching {program} to {symbol} in {}", object.display()))?;
    Ok(())
}

fn entry_program(kind: AllocKind) -> &'static str {
    match kind {
        AllocKind::Malloc => "malloc_enter",
        AllocKind::Calloc => "calloc_enter",
        AllocKind::Realloc => "realloc_enter",
        AllocKind::Reallocarray => "reallocarray_enter",
        AllocKind::PosixMemalign => "posix_memalign_enter",
        AllocKind::AlignedAlloc => "aligned_alloc_enter",
        AllocKind::Memalign => "memalign_enter",
        AllocKind::Valloc => "valloc_enter",
        AllocKind::Pvalloc => "pvalloc_enter",
        AllocKind::Mmap => "mmap_enter",
        AllocKind::Mremap => "mremap_enter",
        AllocKind::Free => "free_enter",
        AllocKind::Munmap => "munmap_enter",
    }
}

fn entry_program_names() -> impl Iterator<Item = &'static str> {
    AllocKind::ALL.into_iter().map(entry_program)
}

/// Defined function symbols (dynamic and static tables) → their virtual address.
fn function_symbols(path: &Path) -> Result<HashMap<String, u64>> {
    use object::{Object, ObjectSymbol, SymbolKind};
    let data = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*data)
        .with_context(|| format!("{} is not an ELF object", path.display()))?;
    let mut out = HashMap::new();
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        if sym.kind() != SymbolKind::Text || sym.is_undefined() || sym.address() == 0 {
            continue;
        }
        if let Ok(name) = sym.name() {
            // Versioned dynamic names come as plain names from `object`.
            out.entry(name.to_string()).or_insert(sym.address());
        }
    }
    Ok(out)
}
