//! Which definition of each allocator function a process really calls, found the way the
//! dynamic linker binds a symbol rather than by a library's name.
//!
//! ld.so looks a symbol up in the global scope: the executable, then the preloaded objects
//! (`LD_PRELOAD`, then `/etc/ld.so.preload`), then the `DT_NEEDED` libraries breadth first.
//! The first object whose `.dynsym` defines it (global or weak, default version) wins, so a
//! preloaded jemalloc takes `malloc` from libc, and tcmalloc takes `mmap` as well. A static
//! executable binds nothing at run time: its own symbol table holds the allocator.
//! `/proc/PID/maps` lists objects by address, not in that order, so the order is rebuilt from
//! each object's `DT_NEEDED` entries, matched against the files actually mapped.

use std::{
    collections::HashSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::Arc,
};

use anyhow::{Context, Result};
use memleak_common::AllocKind;
use object::{
    elf,
    read::elf::{ElfFile64, ProgramHeader, Sym},
};

use crate::{
    objects::{self, Key},
    procmaps::{self, Mapping},
    target_files::TargetFiles,
};

/// Far larger than any real `/etc/ld.so.preload` (a few paths).
const MAX_PRELOAD_FILE: u64 = 64 << 10;

/// How an object came into the global scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Executable,
    Preload,
    Needed,
    /// Mapped, but reached by no `DT_NEEDED` entry (dlopen): looked at after the others.
    Loaded,
}

/// One object of the scope, with what lookups need from its ELF file.
#[derive(Debug)]
pub struct ScopeObject {
    /// A path this process can open and the kernel can probe.
    pub path: PathBuf,
    /// The path as the target names it, for messages.
    pub name: String,
    pub origin: Origin,
    facts: Arc<Facts>,
}

/// The objects a process looks symbols up in, in lookup order.
#[derive(Debug)]
pub struct Scope {
    pub objects: Vec<ScopeObject>,
    /// Mapped ELF files that could not be read: what they define is unknown.
    pub unreadable: Vec<String>,
    /// The objects read to find the scope ([`Plan::held`]).
    held: Vec<objects::Loaded>,
}

/// What one ELF file says about binding: worked out once per object for the run, kept
/// with it in `objects` (a libc mapped by eight processes is read and parsed once).
#[derive(Debug, Default)]
pub struct Facts {
    soname: Option<String>,
    needed: Vec<String>,
    /// No interpreter and no `DT_NEEDED`: nothing is bound at run time.
    is_static: bool,
    defs: Vec<Def>,
    /// Why the sections could not be read (a file cut after its loaded segments still
    /// runs): what the object defines is unknown.
    unknown: Option<String>,
    /// The allocator the file says it is, with its version (an object defining `malloc`
    /// or `mmap` only): "glibc 2.39", "jemalloc 5.3".
    allocator: Option<String>,
    /// PT_INTERP: the dynamic loader an executable names.
    interpreter: Option<String>,
}

/// A defined function whose name ends like an allocator entry point.
#[derive(Debug, Clone)]
struct Def {
    name: String,
    vaddr: u64,
    file_offset: u64,
    /// An indirect function: the address is its resolver's, not the code's.
    ifunc: bool,
    /// In `.dynsym`, global or weak, at its default version: other objects bind to it.
    exported: bool,
}

/// When an entry point is hooked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Named when no object defines it.
    Required,
    /// Hooked where defined, silent when absent (`mmap64`, an alias in glibc).
    Optional,
    /// Hooked only when the object that supplies `malloc` defines it: the allocator's own
    /// extra entry points (jemalloc's `mallocx`, C++ `operator new` in jemalloc or tcmalloc).
    /// libstdc++'s `operator new` calls `malloc`, so hooking it would only add cost.
    WithMalloc,
}

/// The standard entry points, each hooked with the program of the C function it behaves
/// like (its first argument is the size, or the pointer for releases).
const ENTRY_POINTS: [(&str, AllocKind, Role); 37] = {
    use AllocKind::*;
    use Role::*;
    [
        ("malloc", Malloc, Required),
        ("calloc", Calloc, Required),
        ("realloc", Realloc, Required),
        ("reallocarray", Reallocarray, Required),
        ("posix_memalign", PosixMemalign, Required),
        ("aligned_alloc", AlignedAlloc, Required),
        ("memalign", Memalign, Required),
        ("valloc", Valloc, Required),
        ("pvalloc", Pvalloc, Required),
        ("mmap", Mmap, Required),
        ("mmap64", Mmap, Optional),
        ("mremap", Mremap, Required),
        ("free", Free, Required),
        ("munmap", Munmap, Required),
        // jemalloc's non-standard API: mallocx(size, flags), rallocx(ptr, size, flags),
        // dallocx(ptr, flags), sdallocx(ptr, size, flags).
        ("mallocx", Malloc, WithMalloc),
        ("rallocx", Realloc, WithMalloc),
        ("dallocx", Free, WithMalloc),
        ("sdallocx", Free, WithMalloc),
        // C++ operator new/new[] (size[, align][, nothrow]) and delete (ptr[, size][, align]).
        ("_Znwm", Malloc, WithMalloc),
        ("_Znam", Malloc, WithMalloc),
        ("_ZnwmRKSt9nothrow_t", Malloc, WithMalloc),
        ("_ZnamRKSt9nothrow_t", Malloc, WithMalloc),
        ("_ZnwmSt11align_val_t", Malloc, WithMalloc),
        ("_ZnamSt11align_val_t", Malloc, WithMalloc),
        ("_ZnwmSt11align_val_tRKSt9nothrow_t", Malloc, WithMalloc),
        ("_ZnamSt11align_val_tRKSt9nothrow_t", Malloc, WithMalloc),
        ("_ZdlPv", Free, WithMalloc),
        ("_ZdaPv", Free, WithMalloc),
        ("_ZdlPvm", Free, WithMalloc),
        ("_ZdaPvm", Free, WithMalloc),
        ("_ZdlPvRKSt9nothrow_t", Free, WithMalloc),
        ("_ZdaPvRKSt9nothrow_t", Free, WithMalloc),
        ("_ZdlPvSt11align_val_t", Free, WithMalloc),
        ("_ZdaPvSt11align_val_t", Free, WithMalloc),
        ("_ZdlPvmSt11align_val_t", Free, WithMalloc),
        ("_ZdaPvmSt11align_val_t", Free, WithMalloc),
        ("_ZdlPvSt11align_val_tRKSt9nothrow_t", Free, WithMalloc),
    ]
};

/// Prefixes of allocators linked into an executable beside the system one: Rust's
/// tikv-jemallocator (`_rjem_malloc`), jemalloc built with `--with-jemalloc-prefix=je_`
/// (Redis), mimalloc's own API.
pub const KNOWN_PREFIXES: [&str; 3] = ["_rjem_", "je_", "mi_"];

/// One function to probe: where, and as which kind of call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hook {
    pub symbol: String,
    pub kind: AllocKind,
    pub object: PathBuf,
    pub object_name: String,
    pub origin: Origin,
    pub vaddr: u64,
    /// Where the function's code sits in the file (what a uprobe is attached at).
    pub file_offset: u64,
    /// The allocator the object says it is ([`Facts::allocator`]).
    pub allocator: Option<String>,
}

/// What to hook in a process, and what cannot be.
#[derive(Debug, Default)]
pub struct Plan {
    pub hooks: Vec<Hook>,
    /// Entry points no object defines: the process cannot call them.
    pub absent: Vec<String>,
    /// Definitions the process may call that are not hooked: the tables cannot be complete.
    pub unhooked: Vec<String>,
    /// The bytes of the objects read to make the plan, kept while it lives: the process's
    /// unwind tables and the probes' placement are built from them without reading the
    /// files again.
    pub held: Vec<objects::Loaded>,
}

impl Scope {
    /// The scope of a running process, rebuilt from its mappings, its environment and
    /// `/etc/ld.so.preload` in its root.
    pub fn of_process(pid: u32) -> Result<Scope> {
        let maps = procmaps::read(pid)?;
        let exe_inode = std::fs::metadata(format!("/proc/{pid}/exe"))
            .with_context(|| format!("cannot read /proc/{pid}/exe"))?
            .ino();
        let mut seen = HashSet::new();
        let (mut mapped, mut unreadable, mut held) = (Vec::new(), Vec::new(), Vec::new());
        for m in maps.iter().filter(|m| m.is_file()) {
            if !seen.insert((m.dev.clone(), m.inode)) {
                continue;
            }
            let path = procmaps::mapped_file(pid, m);
            let name = m.path.clone().unwrap_or_default();
            let key = (m.dev.clone(), m.inode);
            if objects::cached(&key).is_none() && !objects::is_elf(&path) {
                continue;
            }
            match Facts::of_mapping(pid, m) {
                Ok((facts, loaded)) => {
                    held.extend(loaded);
                    mapped.push(Mapped {
                        inode: m.inode,
                        name,
                        path,
                        facts,
                    })
                }
                Err(e) => unreadable.push(format!("{e:#}")),
            }
        }
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        // Both read as the target would (target_files): in its root, regular files only.
        let files = TargetFiles::new(pid);
        let preload_file = files
            .read(Path::new("/etc/ld.so.preload"), MAX_PRELOAD_FILE, b"")
            .unwrap_or_default();
        let preload_file = String::from_utf8_lossy(&preload_file);
        let preloads = preload_entries(env_value(&environ, "LD_PRELOAD"), &preload_file);
        let inode_of = |entry: &str| {
            let file = files.open(Path::new(entry)).ok()?;
            Some(file.metadata().ok()?.ino())
        };
        let mut scope = order_scope(mapped, exe_inode, &preloads, inode_of)?;
        scope.unreadable = unreadable;
        scope.held = held;
        Ok(scope)
    }

    /// The scope a command we start will have, before it runs: the executable and what its
    /// dynamic loader lists (`ld.so --list`, in load order, with this process's environment,
    /// which the command inherits). A static executable is its own scope.
    pub fn of_command(exe: &Path) -> Result<Scope> {
        let (facts, loaded) = Facts::of_path(exe)?;
        let interp = facts.interpreter.clone();
        let mut scope = Scope {
            objects: vec![ScopeObject {
                path: exe.to_path_buf(),
                name: exe.display().to_string(),
                origin: Origin::Executable,
                facts,
            }],
            unreadable: Vec::new(),
            held: loaded.into_iter().collect(),
        };
        let Some(interp) = interp else {
            return Ok(scope);
        };
        let out = std::process::Command::new(&interp)
            .arg("--list")
            .arg(exe)
            .output()
            .with_context(|| format!("running {interp} --list"))?;
        let preload_file = std::fs::read_to_string("/etc/ld.so.preload").unwrap_or_default();
        let env = std::env::var("LD_PRELOAD").unwrap_or_default();
        let preloads = preload_entries(&env, &preload_file);
        for (soname, path) in loader_listing(&String::from_utf8_lossy(&out.stdout)) {
            let Ok((facts, loaded)) = Facts::of_path(Path::new(&path)) else {
                continue;
            };
            scope.held.extend(loaded);
            let preloaded = preloads
                .iter()
                .any(|p| *p == path || *p == soname || facts.soname.as_deref() == Some(p));
            scope.objects.push(ScopeObject {
                path: PathBuf::from(&path),
                name: path,
                origin: if preloaded {
                    Origin::Preload
                } else {
                    Origin::Needed
                },
                facts,
            });
        }
        Ok(scope)
    }

    /// The executable, first in the scope.
    fn executable(&self) -> Option<&ScopeObject> {
        self.objects
            .first()
            .filter(|o| o.origin == Origin::Executable)
    }
}

/// A mapped ELF file not yet placed in the scope.
#[derive(Debug)]
struct Mapped {
    inode: u64,
    /// The path as the target names it.
    name: String,
    path: PathBuf,
    facts: Arc<Facts>,
}

/// Puts the mapped objects in ld.so's lookup order: the executable, the preloads, then
/// breadth first through `DT_NEEDED`; objects no entry reaches come last, as `Loaded`.
/// `inode_of` resolves an entry given as a path (a preload, or a `DT_NEEDED` with a slash).
fn order_scope(
    mapped: Vec<Mapped>,
    exe_inode: u64,
    preloads: &[String],
    inode_of: impl Fn(&str) -> Option<u64>,
) -> Result<Scope> {
    let mut pool: Vec<Option<Mapped>> = mapped.into_iter().map(Some).collect();
    let mut objects = Vec::new();
    let exe = pool
        .iter()
        .position(|o| o.as_ref().is_some_and(|o| o.inode == exe_inode))
        .context("the executable is not among the process's mappings")?;
    place(&mut pool, &mut objects, exe, Origin::Executable);
    for entry in preloads {
        let inode = entry.contains('/').then(|| inode_of(entry)).flatten();
        if let Some(i) = find_object(&pool, entry, inode) {
            place(&mut pool, &mut objects, i, Origin::Preload);
        }
    }
    let mut next = 0;
    while next < objects.len() {
        for soname in objects[next].facts.needed.clone() {
            let inode = soname.contains('/').then(|| inode_of(&soname)).flatten();
            if let Some(i) = find_object(&pool, &soname, inode) {
                place(&mut pool, &mut objects, i, Origin::Needed);
            }
        }
        next += 1;
    }
    for i in 0..pool.len() {
        place(&mut pool, &mut objects, i, Origin::Loaded);
    }
    Ok(Scope {
        objects,
        unreadable: Vec::new(),
        held: Vec::new(),
    })
}

/// Moves mapped object `i` to the end of the scope.
fn place(pool: &mut [Option<Mapped>], objects: &mut Vec<ScopeObject>, i: usize, origin: Origin) {
    if let Some(m) = pool[i].take() {
        objects.push(ScopeObject {
            path: m.path,
            name: m.name,
            origin,
            facts: m.facts,
        });
    }
}

/// The still unplaced object a `DT_NEEDED` or preload entry names: by inode for a path,
/// else by `DT_SONAME`, else by file name (maps shows `libtcmalloc_minimal.so.4.5.10` for
/// the soname `libtcmalloc_minimal.so.4`, and a library without a soname by its file name).
fn find_object(pool: &[Option<Mapped>], entry: &str, inode: Option<u64>) -> Option<usize> {
    let unplaced = || {
        pool.iter()
            .enumerate()
            .filter_map(|(i, m)| Some((i, m.as_ref()?)))
    };
    if let Some(inode) = inode {
        return unplaced().find(|(_, m)| m.inode == inode).map(|(i, _)| i);
    }
    let file_name = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    unplaced()
        .find(|(_, m)| m.facts.soname.as_deref() == Some(entry))
        .or_else(|| unplaced().find(|(_, m)| file_name(&m.name) == entry))
        .map(|(i, _)| i)
}

/// The value of `name` in a `/proc/PID/environ` image (NUL-separated `NAME=value`).
fn env_value<'a>(environ: &'a [u8], name: &str) -> &'a str {
    environ
        .split(|&b| b == 0)
        .filter_map(|kv| std::str::from_utf8(kv).ok())
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or("")
}

/// The preload list ld.so builds: `LD_PRELOAD` (split on spaces and colons), then the
/// whitespace- or colon-separated entries of `/etc/ld.so.preload` (`#` starts a comment).
fn preload_entries(env: &str, preload_file: &str) -> Vec<String> {
    let words = |s: &str| -> Vec<String> {
        s.split([' ', ':', '\t'])
            .filter(|e| !e.is_empty())
            .map(str::to_string)
            .collect()
    };
    let mut out = words(env);
    for line in preload_file.lines() {
        out.extend(words(line.split('#').next().unwrap_or_default()));
    }
    out
}

/// `ld.so --list` lines → (name, path), in load order; the vdso and missing libraries left
/// out. Preloads print as `name => path` like the others; ld.so itself as a bare path.
fn loader_listing(listing: &str) -> Vec<(String, String)> {
    listing
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let (name, rest) = line.split_once(" => ").unwrap_or(("", line));
            let path = rest.split(" (").next()?.trim();
            path.starts_with('/')
                .then(|| (name.trim().to_string(), path.to_string()))
        })
        .collect()
}

impl Facts {
    /// What the object behind mapping `m` of `pid` says, from the cache when another
    /// process (or an earlier look) mapped it too; with the object when it was read now.
    fn of_mapping(pid: u32, m: &Mapping) -> Result<(Arc<Facts>, Option<objects::Loaded>)> {
        let key = (m.dev.clone(), m.inode);
        Facts::kept(
            &key,
            || objects::of_mapping(pid, m),
            || objects::read_mapping(pid, m),
        )
    }

    /// What the object at `path` (a path this process opens) says; see [`Facts::of_mapping`].
    fn of_path(path: &Path) -> Result<(Arc<Facts>, Option<objects::Loaded>)> {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let read = || objects::read_path(path);
        Facts::kept(&objects::key_of(&meta), || objects::of_path(path), read)
    }

    /// The facts kept with object `key`, else worked out from its bytes (`load`) and kept.
    /// An object that does not parse (a file cut after its loaded segments) is read again
    /// (`read`) to tell whether it is static: what it defines is unknown.
    fn kept(
        key: &Key,
        load: impl FnOnce() -> Result<objects::Loaded>,
        read: impl FnOnce() -> Result<(PathBuf, Vec<u8>)>,
    ) -> Result<(Arc<Facts>, Option<objects::Loaded>)> {
        if let Some(facts) = objects::cached(key).and_then(|o| o.binding.get().cloned()) {
            objects::count_shared();
            return Ok((facts, None));
        }
        let keep = |name: &str| ENTRY_POINTS.iter().any(|(base, ..)| name.ends_with(base));
        match load() {
            Ok(loaded) => {
                let of = || Arc::new(Facts::of(&loaded.bytes, &loaded.object.path, &keep));
                let facts = loaded.object.binding.get_or_init(of).clone();
                Ok((facts, Some(loaded)))
            }
            Err(e) => {
                let (path, data) = read().map_err(|_| e)?;
                Ok((Arc::new(Facts::of(&data, &path, &keep)), None))
            }
        }
    }

    /// What ELF image `data` (read from `path`) defines among the names `keep` passes.
    fn of(data: &[u8], path: &Path, keep: &dyn Fn(&str) -> bool) -> Facts {
        let interpreter = objects::interpreter(data);
        let mut facts = match Facts::parse(data, keep) {
            Ok(facts) => facts,
            Err(e) => Facts {
                is_static: interpreter.is_none(),
                unknown: Some(format!("what {} defines ({e:#})", path.display())),
                ..Facts::default()
            },
        };
        if facts
            .defs
            .iter()
            .any(|d| d.name == "malloc" || d.name == "mmap")
        {
            facts.allocator = allocator(data);
        }
        facts.interpreter = interpreter;
        facts
    }

    fn parse(data: &[u8], keep: &dyn Fn(&str) -> bool) -> Result<Facts> {
        let file = ElfFile64::<object::Endianness>::parse(data)?;
        let endian = file.endian();
        let sections = file.elf_section_table();
        let mut facts = Facts::default();
        let dynamic = sections.dynamic_table(endian, data)?;
        for d in &dynamic {
            let text = || -> Result<String> {
                Ok(String::from_utf8_lossy(dynamic.string(d)?).into_owned())
            };
            match d.tag {
                elf::DT_NEEDED => facts.needed.push(text()?),
                elf::DT_SONAME => facts.soname = Some(text()?),
                _ => {}
            }
        }
        let segments = file.elf_program_headers();
        let has_interp = segments.iter().any(|p| p.p_type(endian) == elf::PT_INTERP);
        facts.is_static = !has_interp && facts.needed.is_empty();
        let versions = sections.versions(endian, data)?;
        let tables = [
            (file.elf_dynamic_symbol_table(), true),
            (file.elf_symbol_table(), false),
        ];
        for (table, dynamic) in tables {
            for (index, sym) in table.enumerate() {
                let hidden_version = dynamic
                    && versions.as_ref().is_some_and(|v| {
                        let i = v.version_index(endian, index);
                        i.is_local() || i.is_hidden()
                    });
                let Some(mut def) = definition(&file, table.symbol_name(endian, sym), sym, keep)
                else {
                    continue;
                };
                def.exported = dynamic && !hidden_version;
                facts.defs.push(def);
            }
        }
        Ok(facts)
    }

    /// The definition of `name` in this object: one that other objects bind to, or with
    /// `own` any global one (a static executable's, or an executable's own prefixed ones).
    fn find(&self, name: &str, own: bool) -> Option<&Def> {
        let mut named = self.defs.iter().filter(|d| d.name == name);
        let first = named.clone().next()?;
        named.find(|d| d.exported).or(own.then_some(first))
    }
}

/// A defined global or weak function whose name passes `keep` (only a few are kept: a big
/// executable has hundreds of thousands of symbols).
fn definition<'d>(
    file: &ElfFile64<'d, object::Endianness>,
    name: object::read::Result<&'d [u8]>,
    sym: &elf::Sym64<object::Endianness>,
    keep: &dyn Fn(&str) -> bool,
) -> Option<Def> {
    let endian = file.endian();
    let name = std::str::from_utf8(name.ok()?).ok()?;
    let kind = sym.st_type();
    let global = matches!(sym.st_bind(), elf::STB_GLOBAL | elf::STB_WEAK);
    if !global
        || !matches!(kind, elf::STT_FUNC | elf::STT_GNU_IFUNC)
        || sym.st_shndx(endian) == elf::SHN_UNDEF
        || sym.st_value(endian) == 0
        || !keep(name)
    {
        return None;
    }
    let vaddr = sym.st_value(endian);
    let file_offset = file.elf_program_headers().iter().find_map(|ph| {
        let start = ph.p_vaddr(endian);
        let in_segment = ph.p_type(endian) == elf::PT_LOAD
            && vaddr >= start
            && vaddr - start < ph.p_filesz(endian);
        in_segment.then(|| (vaddr - start).checked_add(ph.p_offset(endian)))?
    })?;
    Some(Def {
        name: name.to_string(),
        vaddr,
        file_offset,
        ifunc: kind == elf::STT_GNU_IFUNC,
        exported: false,
    })
}

impl Scope {
    /// What to hook: each standard entry point at its first definition in the scope, and
    /// for each of `prefixes` (plus the known ones the executable defines) that allocator's
    /// malloc family, also at its first definition.
    pub fn plan(&self, prefixes: &[&str]) -> Plan {
        let unknown = self.objects.iter().filter_map(|o| o.facts.unknown.clone());
        let mut plan = Plan {
            unhooked: self.unreadable.iter().cloned().chain(unknown).collect(),
            held: self.held.clone(),
            ..Plan::default()
        };
        let malloc_owner = self.first("malloc", false).map(|(i, _)| i);
        for (base, kind, role) in ENTRY_POINTS {
            match self.first(base, false) {
                None if role == Role::Required => plan.absent.push(base.to_string()),
                None => {}
                Some((i, _)) if role == Role::WithMalloc && Some(i) != malloc_owner => {}
                Some((i, def)) => plan.add(&self.objects[i], def, kind),
            }
        }
        let exe = self.executable();
        let found = KNOWN_PREFIXES
            .iter()
            .copied()
            .filter(|p| exe.is_some_and(|e| e.facts.find(&format!("{p}malloc"), true).is_some()));
        let mut all: Vec<&str> = prefixes.to_vec();
        all.extend(found.filter(|p| !prefixes.contains(p)));
        for prefix in all.into_iter().filter(|p| !p.is_empty()) {
            for (base, kind, _) in prefixed_entry_points() {
                if let Some((i, def)) = self.first(&format!("{prefix}{base}"), true) {
                    plan.add(&self.objects[i], def, kind);
                }
            }
        }
        plan
    }

    /// The first object defining `name` as the process binds it, and that definition. The
    /// executable's own (not exported) symbols count when it is static, or with `prefixed`
    /// (a prefixed allocator linked in is called directly).
    fn first(&self, name: &str, prefixed: bool) -> Option<(usize, &Def)> {
        self.objects.iter().enumerate().find_map(|(i, o)| {
            let own = o.origin == Origin::Executable && (prefixed || o.facts.is_static);
            Some((i, o.facts.find(name, own)?))
        })
    }
}

/// The malloc family (not the system calls) and jemalloc's extra API, for a prefix.
fn prefixed_entry_points() -> impl Iterator<Item = (&'static str, AllocKind, Role)> {
    ENTRY_POINTS
        .into_iter()
        .filter(|(base, kind, _)| !kind.is_syscall_wrapper() && !base.starts_with("_Z"))
}

/// The definitions of the malloc family with `prefix` in one object (`-O`): its own symbols
/// count, exported or not.
pub fn in_object(path: &Path, prefix: &str) -> Result<Plan> {
    let object = ScopeObject {
        path: path.to_path_buf(),
        name: path.display().to_string(),
        origin: Origin::Loaded,
        facts: Facts::of_path(path)?.0,
    };
    let mut plan = Plan::default();
    for (base, kind, role) in prefixed_entry_points() {
        let symbol = format!("{prefix}{base}");
        match object.facts.find(&symbol, true) {
            Some(def) => plan.add(&object, def, kind),
            None if role == Role::Required => plan.absent.push(symbol),
            None => {}
        }
    }
    Ok(plan)
}

/// CPython's allocator entry points in `path` (libpython or the executable), each with the
/// kind of C function it behaves like; every one must be there.
pub fn named_in_object(path: &Path, entry_points: &[(&str, AllocKind)]) -> Result<Vec<Hook>> {
    let object = ScopeObject {
        path: path.to_path_buf(),
        name: path.display().to_string(),
        origin: Origin::Loaded,
        facts: Arc::new(Facts::of(&objects::of_path(path)?.bytes, path, &|name| {
            entry_points.iter().any(|(n, _)| *n == name)
        })),
    };
    let mut plan = Plan::default();
    for &(symbol, kind) in entry_points {
        let def = object
            .facts
            .find(symbol, true)
            .with_context(|| format!("{} has no {symbol}", path.display()))?;
        plan.add(&object, def, kind);
    }
    Ok(plan.hooks)
}

impl Plan {
    /// Adds `def` of `object` as a `kind` hook, once per address (glibc's `aligned_alloc`
    /// is `memalign`); an IFUNC cannot be probed and leaves the plan incomplete.
    fn add(&mut self, object: &ScopeObject, def: &Def, kind: AllocKind) {
        if def.ifunc {
            self.unhooked.push(format!(
                "{} in {} (an IFUNC: its code is chosen at load time)",
                def.name, object.name
            ));
            return;
        }
        let known = self
            .hooks
            .iter()
            .any(|h| h.object == object.path && h.vaddr == def.vaddr);
        if !known {
            self.hooks.push(Hook {
                symbol: def.name.clone(),
                kind,
                object: object.path.clone(),
                object_name: object.name.clone(),
                origin: object.origin,
                vaddr: def.vaddr,
                file_offset: def.file_offset,
                allocator: object.facts.allocator.clone(),
            });
        }
    }

    /// Adds another plan's hooks (`-O`), keeping one per address.
    pub fn extend(&mut self, other: Plan) {
        for h in other.hooks {
            if !self
                .hooks
                .iter()
                .any(|k| k.object == h.object && k.vaddr == h.vaddr)
            {
                self.hooks.push(h);
            }
        }
        self.unhooked.extend(other.unhooked);
        self.held.extend(other.held);
    }

    /// One line: "allocator: jemalloc 5.3 (LD_PRELOAD), mmap family: libc", then any other
    /// allocator hooked and the entry points no object defines.
    pub fn summary(&self) -> String {
        let named = |symbol: &str| self.hooks.iter().find(|h| h.symbol == symbol);
        let malloc = named("malloc").map_or("none found".to_string(), |h| {
            format!("{} ({})", label(h), where_from(h))
        });
        let mmap = named("mmap").map_or("none found".to_string(), |h| match label(h) {
            l if l.starts_with("glibc") => "libc".to_string(),
            _ if h.origin == Origin::Executable => "the executable".to_string(),
            l => l.split(' ').next().unwrap_or_default().to_string(),
        });
        let mut line = format!("allocator: {malloc}, mmap family: {mmap}");
        let others = self.hooks.iter().filter(|h| {
            h.kind == AllocKind::Malloc && h.symbol != "malloc" && h.symbol.ends_with("_malloc")
        });
        for h in others {
            line += &format!("; also {} ({})", h.symbol, where_from(h));
        }
        if !self.absent.is_empty() {
            line += &format!("; not in the process: {}", self.absent.join(", "));
        }
        line
    }
}

/// How the object came to hold the hook, for the summary.
fn where_from(h: &Hook) -> String {
    let file = h.object_name.rsplit('/').next().unwrap_or(&h.object_name);
    match h.origin {
        Origin::Executable => format!("in the executable {file}"),
        Origin::Preload => "LD_PRELOAD".to_string(),
        Origin::Needed => file.to_string(),
        Origin::Loaded => format!("{file}, loaded later"),
    }
}

/// The allocator a hook's object holds, with its version when the file says it; else its
/// prefix, or the file's name.
fn label(h: &Hook) -> String {
    if let Some(allocator) = &h.allocator {
        return allocator.clone();
    }
    if h.symbol.starts_with("_rjem_") || h.symbol.starts_with("je_") {
        return format!("jemalloc (as {})", h.symbol);
    }
    let file = h.object_name.rsplit('/').next().unwrap_or(&h.object_name);
    file.to_string()
}

/// What an object file says it is: jemalloc's version string, gperftools', glibc's banner,
/// mimalloc's or musl's names.
fn allocator(data: &[u8]) -> Option<String> {
    let after = |needle: &[u8]| -> Option<String> {
        let at = data.windows(needle.len()).position(|w| w == needle)? + needle.len();
        let version: Vec<u8> = data[at..]
            .iter()
            .copied()
            .take_while(|b| b.is_ascii_digit() || *b == b'.')
            .collect();
        let version = String::from_utf8(version).ok()?;
        Some(version.trim_end_matches('.').to_string())
    };
    if let Some(v) = after(b"stable release version ") {
        return Some(format!("glibc {v}"));
    }
    if let Some(v) = after(b"gperftools ") {
        return Some(format!("tcmalloc (gperftools {v})"));
    }
    if let Some(v) = jemalloc_version(data) {
        return Some(format!("jemalloc {v}"));
    }
    if data.windows(8).any(|w| w == b"mimalloc") {
        return Some("mimalloc".to_string());
    }
    // musl's startup code, linked into every static musl executable.
    data.windows(22)
        .any(|w| w == b"libc_start_main_stage2")
        .then(|| "musl".to_string())
}

/// jemalloc embeds `5.3.0-0-g<40 hex digits>`: the major and minor version.
fn jemalloc_version(data: &[u8]) -> Option<String> {
    let marker = data
        .windows(42)
        .position(|w| w.starts_with(b"-g") && w[2..].iter().all(|b| b.is_ascii_hexdigit()))?;
    let start = data[..marker]
        .iter()
        .rposition(|b| !(b.is_ascii_digit() || *b == b'.' || *b == b'-'))
        .map_or(0, |i| i + 1);
    let text = std::str::from_utf8(&data[start..marker]).ok()?;
    let mut parts = text.split(['.', '-']);
    Some(format!("{}.{}", parts.next()?, parts.next()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{process::Command, time::Duration};

    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
    const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
    const TCMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4";
    /// What `musl-gcc` passes to gcc.
    const MUSL_SPECS: &str = "/usr/lib/x86_64-linux-musl/musl-gcc.specs";

    /// The files a test needs (`cargo xtask test` installs them); a missing one skips loudly.
    fn have(test: &str, files: &[&str]) -> bool {
        let missing: Vec<&&str> = files.iter().filter(|f| !Path::new(f).exists()).collect();
        if !missing.is_empty() {
            eprintln!("\n*** SKIPPED {test}: missing {missing:?} ***\n");
        }
        missing.is_empty()
    }

    fn hook<'p>(plan: &'p Plan, symbol: &str) -> &'p Hook {
        plan.hooks
            .iter()
            .find(|h| h.symbol == symbol)
            .unwrap_or_else(|| panic!("{symbol} not hooked: {plan:?}"))
    }

    #[test]
    fn the_default_symbol_version_binds() {
        if !have("the_default_symbol_version_binds", &[LIBC]) {
            return;
        }
        let data = std::fs::read(LIBC).unwrap();
        let facts = Facts::of(&data, Path::new(LIBC), &|n| {
            n == "realpath" || n == "memcpy"
        });
        // realpath@@GLIBC_2.3 and realpath@GLIBC_2.2.5 (for old binaries) are both defined.
        let all: Vec<&Def> = facts.defs.iter().filter(|d| d.name == "realpath").collect();
        assert!(all.len() >= 2, "{all:?}");
        let bound = facts.find("realpath", false).unwrap();
        assert!(bound.exported);
        assert_eq!(all.iter().filter(|d| d.exported).count(), 1, "{all:?}");
        // memcpy@@GLIBC_2.14 is an IFUNC: noted as such, never hooked.
        let memcpy = facts.find("memcpy", false).unwrap();
        assert!(memcpy.ifunc, "{memcpy:?}");
        assert_eq!(facts.soname.as_deref(), Some("libc.so.6"));
        assert!(facts.needed.iter().any(|n| n.starts_with("ld-linux")));
    }

    #[test]
    fn file_offsets_follow_the_load_segments() {
        if !have("file_offsets_follow_the_load_segments", &[JEMALLOC]) {
            return;
        }
        let (facts, _) = Facts::of_path(Path::new(JEMALLOC)).unwrap();
        let malloc = facts.find("malloc", false).unwrap();
        // The bytes at the file offset are the function's code (the first byte of the
        // section data at the symbol's address).
        let data = std::fs::read(JEMALLOC).unwrap();
        let file = object::File::parse(&*data).unwrap();
        use object::{Object, ObjectSection, ObjectSymbol};
        let sym = file
            .dynamic_symbols()
            .find(|s| s.name() == Ok("malloc"))
            .unwrap();
        let section = file.section_by_index(sym.section_index().unwrap()).unwrap();
        let code = section.data_range(sym.address(), 16).unwrap().unwrap();
        let at = malloc.file_offset as usize;
        assert_eq!(&data[at..at + 16], code);
        assert_eq!(malloc.vaddr, sym.address());
    }

    /// Starts `sleep` with `preload`, waits until libc is mapped: (child, scope).
    fn sleeping_with(preload: &str) -> (std::process::Child, Scope) {
        let child = Command::new("sleep")
            .arg("10")
            .env("LD_PRELOAD", preload)
            .spawn()
            .unwrap();
        let maps = format!("/proc/{}/maps", child.id());
        for _ in 0..500 {
            let text = std::fs::read_to_string(&maps).unwrap_or_default();
            if text.contains("libc.so") && text.contains("/sleep") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let scope = Scope::of_process(child.id()).unwrap();
        (child, scope)
    }

    #[test]
    fn a_preloaded_jemalloc_takes_the_malloc_family_and_libc_keeps_the_rest() {
        if !have(
            "a_preloaded_jemalloc_takes_the_malloc_family",
            &[JEMALLOC, LIBC],
        ) {
            return;
        }
        let (mut child, scope) = sleeping_with(JEMALLOC);
        let plan = scope.plan(&[]);
        // The labels come from the files, read through the live process.
        let summary = plan.summary();
        let _ = child.kill();
        let _ = child.wait();
        for f in [
            "malloc", "free", "calloc", "realloc", "memalign", "sdallocx", "_Znwm",
        ] {
            let h = hook(&plan, f);
            assert!(h.object_name.ends_with("libjemalloc.so.2"), "{h:?}");
            assert_eq!(h.origin, Origin::Preload);
        }
        // jemalloc has no pvalloc or reallocarray: libc's are the ones bound.
        for f in ["pvalloc", "reallocarray", "mmap", "munmap", "mremap"] {
            let h = hook(&plan, f);
            assert!(h.object_name.ends_with("libc.so.6"), "{h:?}");
            assert_eq!(h.origin, Origin::Needed);
        }
        assert!(
            plan.absent.is_empty() && plan.unhooked.is_empty(),
            "{plan:?}"
        );
        assert!(
            summary.starts_with("allocator: jemalloc 5.") && summary.contains("(LD_PRELOAD)"),
            "{summary}"
        );
        assert!(summary.ends_with("mmap family: libc"), "{summary}");
    }

    #[test]
    fn tcmalloc_takes_the_mmap_family_too() {
        if !have("tcmalloc_takes_the_mmap_family_too", &[TCMALLOC, LIBC]) {
            return;
        }
        let (mut child, scope) = sleeping_with(TCMALLOC);
        let plan = scope.plan(&[]);
        let summary = plan.summary();
        let _ = child.kill();
        let _ = child.wait();
        for f in ["malloc", "free", "mmap", "mmap64", "munmap", "mremap"] {
            let h = hook(&plan, f);
            assert!(h.object_name.contains("libtcmalloc_minimal"), "{h:?}");
        }
        // free and operator delete are one function there: hooked once.
        let at_free = plan
            .hooks
            .iter()
            .filter(|h| h.vaddr == hook(&plan, "free").vaddr)
            .count();
        assert_eq!(at_free, 1);
        assert!(summary.contains("mmap family: tcmalloc"), "{summary}");
    }

    #[test]
    fn the_scope_order_is_the_loaders() {
        if !have("the_scope_order_is_the_loaders", &[JEMALLOC, LIBC]) {
            return;
        }
        let (mut child, scope) = sleeping_with(JEMALLOC);
        let _ = child.kill();
        let _ = child.wait();
        // The oracle: the dynamic loader's own listing of the same program and preload.
        let out = Command::new("/lib64/ld-linux-x86-64.so.2")
            .args(["--list", "/usr/bin/sleep"])
            .env("LD_PRELOAD", JEMALLOC)
            .output()
            .unwrap();
        let canonical = |p: &str| std::fs::canonicalize(p).unwrap();
        let want: Vec<PathBuf> = loader_listing(&String::from_utf8_lossy(&out.stdout))
            .iter()
            .map(|(_, p)| canonical(p))
            .collect();
        let got: Vec<PathBuf> = scope.objects[1..]
            .iter()
            .filter(|o| o.origin != Origin::Loaded)
            .map(|o| canonical(&o.name))
            .collect();
        assert_eq!(got, want);
        assert_eq!(scope.objects[0].origin, Origin::Executable);
    }

    #[test]
    fn a_static_executable_is_its_own_allocator() {
        if !have("a_static_executable_is_its_own_allocator", &[MUSL_SPECS]) {
            return;
        }
        let source = "#include <stdlib.h>\nint main(){return malloc(9)==0;}\n";
        let (dir, exe) = compiled(source, &["-static", "-specs", MUSL_SPECS]);
        let plan = Scope::of_command(&exe).unwrap().plan(&[]);
        let summary = plan.summary();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(hook(&plan, "malloc").origin, Origin::Executable);
        // Never called, so never linked in: skipped and named, not a refusal.
        assert!(plan.absent.contains(&"free".to_string()), "{plan:?}");
        assert!(summary.starts_with("allocator: musl"), "{summary}");
    }

    /// An executable with tikv-jemallocator's names, a custom `my_` allocator and a `je_`
    /// allocator whose malloc is an IFUNC, all calling libc.
    const PREFIXED: &str = r#"#include <stdlib.h>
void *_rjem_malloc(size_t n) { return malloc(n); }
void *_rjem_mallocx(size_t n, int flags) { return malloc(n); }
void _rjem_sdallocx(void *p, size_t n, int flags) { free(p); }
void _rjem_free(void *p) { free(p); }
void *my_malloc(size_t n) { return malloc(n); }
void my_free(void *p) { free(p); }
static void *je_real(size_t n) { return malloc(n); }
static void *(*je_pick(void))(size_t) { return je_real; }
void *je_malloc(size_t n) __attribute__((ifunc("je_pick")));
int main(void) { return 0; }
"#;

    /// Compiles `source` with gcc `flags` in a fresh directory: (directory, executable).
    fn compiled(source: &str, flags: &[&str]) -> (PathBuf, PathBuf) {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("memleak-binding-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (src, exe) = (dir.join("p.c"), dir.join("p"));
        std::fs::write(&src, source).unwrap();
        let built = Command::new("gcc")
            .args(flags)
            .arg("-o")
            .args([&exe, &src])
            .status()
            .unwrap();
        assert!(built.success());
        (dir, exe)
    }

    #[test]
    fn prefixed_allocators_in_the_executable() {
        let (dir, exe) = compiled(PREFIXED, &[]);
        let scope = Scope::of_command(&exe).unwrap();
        let plain = scope.plan(&[]);
        let with_my = scope.plan(&["my_"]);
        std::fs::remove_dir_all(&dir).unwrap();
        // Found by their known prefix, not exported, with jemalloc's own entry points.
        assert_eq!(hook(&plain, "_rjem_malloc").origin, Origin::Executable);
        assert_eq!(hook(&plain, "_rjem_mallocx").kind, AllocKind::Malloc);
        assert_eq!(hook(&plain, "_rjem_sdallocx").kind, AllocKind::Free);
        assert!(hook(&plain, "malloc").object_name.ends_with("libc.so.6"));
        assert!(
            plain.summary().contains("also _rjem_malloc"),
            "{}",
            plain.summary()
        );
        // An unknown prefix only when asked for.
        assert!(!plain.hooks.iter().any(|h| h.symbol == "my_malloc"));
        assert_eq!(hook(&with_my, "my_free").kind, AllocKind::Free);
        // An IFUNC cannot be probed: named as not hooked, which makes the tables partial.
        assert!(
            plain.unhooked.iter().any(|u| u.starts_with("je_malloc in")),
            "{:?}",
            plain.unhooked
        );
    }

    #[test]
    fn environment_and_preload_file_entries() {
        let environ = b"A=1\0LD_PRELOAD=/x/liba.so libb.so:libc.so\0LD_PRELOADX=no\0";
        let env = env_value(environ, "LD_PRELOAD");
        assert_eq!(env, "/x/liba.so libb.so:libc.so");
        assert_eq!(env_value(environ, "B"), "");
        assert_eq!(
            preload_entries(env, "# none\n/etc/libd.so\n"),
            ["/x/liba.so", "libb.so", "libc.so", "/etc/libd.so"]
        );
    }

    #[test]
    fn loader_listing_keeps_paths_in_order() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                       \tlibjemalloc.so.2 => /lib/libjemalloc.so.2 (0x7f01)\n\
                       \tlibgone.so => not found\n\
                       \t/lib64/ld-linux-x86-64.so.2 (0x7f02)\n";
        assert_eq!(
            loader_listing(listing),
            [
                (
                    "libjemalloc.so.2".to_string(),
                    "/lib/libjemalloc.so.2".to_string()
                ),
                (String::new(), "/lib64/ld-linux-x86-64.so.2".to_string()),
            ]
        );
    }

    #[test]
    fn versions_from_banners() {
        let data = b"xx\x005.3.0-0-g54eaed1d8b56b1aa528be3bdd1877e59c56fa90c\0";
        assert_eq!(jemalloc_version(data).as_deref(), Some("5.3"));
        assert_eq!(jemalloc_version(b"no version here"), None);
    }
}
