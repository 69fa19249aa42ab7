//! The object files behind the target's mappings, keyed by (device, inode): whoever needs one
//! (the probes, their placement, the unwinder, Python detection, the process facts) asks here,
//! so a libc mapped by eight processes is read and parsed once, and its load bias is worked
//! out in one place. blazesym's file cache has this shape.
//!
//! What is small and asked for again (segments, build-id, function symbols, what it says
//! about binding) stays for the run; the bytes stay only while some caller holds them, so
//! memleak does not keep a copy of every library the target maps (a libtorch is gigabytes).
//! [`counts`] says how often a file was read and parsed, and how often the cache answered.

use std::{
    collections::HashMap,
    fs::File,
    io::Seek,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, LazyLock, Mutex, OnceLock, Weak,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
};

use anyhow::{Context, Result, anyhow, bail};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::{
    binding::Facts,
    procmaps::{self, Mapping},
    target_files::{MAX_OBJECT_FILE, TargetFiles},
};

/// `st_dev` as `/proc/PID/maps` prints it, and the inode.
pub type Key = (String, u64);

/// One object file.
pub struct ObjectFile {
    /// Where it was first read from (for messages).
    pub path: PathBuf,
    /// PT_LOAD segments: (p_offset, p_filesz, p_vaddr).
    segments: Vec<(u64, u64, u64)>,
    pub build_id: Option<Vec<u8>>,
    /// PT_INTERP: the dynamic loader an executable names (none: static, or a library).
    pub interpreter: Option<String>,
    /// The file offset of the entry point (what a uprobe at the entry attaches to).
    pub entry_offset: Option<u64>,
    /// What the object says about binding (`binding::Facts`), worked out once.
    pub binding: OnceLock<Arc<Facts>>,
    /// What its symbols say about CPython (`python::Symbols`), worked out once.
    pub python: OnceLock<crate::python::Symbols>,
    /// The machine code of the functions probes were placed in, by name (or why not).
    code: Mutex<HashMap<String, Result<Arc<FunctionCode>, String>>>,
    /// Defined function symbols (dynamic and static tables) → virtual address; built on
    /// first use.
    functions: OnceLock<HashMap<String, u64>>,
    /// Defined data symbols (globals), sorted: (virtual address, size, name).
    data: OnceLock<Vec<(u64, u64, String)>>,
    bytes: Mutex<Weak<Vec<u8>>>,
    /// The file, held open: an inode in use is never given to another file, so the
    /// (device, inode) key stays this file's for the run. Without it a file deleted and a
    /// new one made (a redeploy under `--listen`, a test's scratch files) could take the
    /// old one's key and be served the old one's symbols and hooks.
    _pinned: File,
}

/// A file read whole, and the file held open (`ObjectFile::_pinned`).
struct Read {
    path: PathBuf,
    bytes: Vec<u8>,
    file: File,
}

static OBJECTS: LazyLock<Mutex<HashMap<Key, Arc<ObjectFile>>>> = LazyLock::new(Default::default);

/// Files read, objects parsed, and requests answered from memory (see [`counts`]).
static READS: AtomicUsize = AtomicUsize::new(0);
static PARSES: AtomicUsize = AtomicUsize::new(0);
static HITS: AtomicUsize = AtomicUsize::new(0);

/// How the cache did so far: what `-v` prints at the end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counts {
    /// Whole files read.
    pub read: usize,
    /// Objects parsed (each (dev, inode) once).
    pub parsed: usize,
    /// Requests answered without reading the file.
    pub shared: usize,
}

pub fn counts() -> Counts {
    Counts {
        read: READS.load(Relaxed),
        parsed: PARSES.load(Relaxed),
        shared: HITS.load(Relaxed),
    }
}

/// A request answered from memory, by a caller that keeps its own facts here
/// (`ObjectFile::binding`).
pub fn count_shared() {
    HITS.fetch_add(1, Relaxed);
}

/// An object with its bytes in memory; they stay cached while this (or a clone) lives.
#[derive(Clone)]
pub struct Loaded {
    pub object: Arc<ObjectFile>,
    pub bytes: Arc<Vec<u8>>,
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "{} ({} bytes)",
            self.object.path.display(),
            self.bytes.len()
        )
    }
}

impl Loaded {
    /// Defined function symbols (dynamic and static tables) → virtual address.
    pub fn functions(&self) -> &HashMap<String, u64> {
        self.object.functions(&self.bytes)
    }
}

/// The object behind mapping `m` of `pid` with its data symbols worked out (the file read
/// only the first time, whichever process asks).
pub fn with_data_symbols(pid: u32, m: &Mapping) -> Result<Arc<ObjectFile>> {
    if let Some(object) = cached(&(m.dev.clone(), m.inode)).filter(|o| o.data.get().is_some()) {
        HITS.fetch_add(1, Relaxed);
        return Ok(object);
    }
    let loaded = of_mapping(pid, m)?;
    loaded.object.data_symbols(&loaded.bytes);
    Ok(loaded.object)
}

/// The object `key` if it was read before: its segments and build-id without a read.
pub fn cached(key: &Key) -> Option<Arc<ObjectFile>> {
    OBJECTS.lock().expect("not poisoned").get(key).cloned()
}

/// The object behind file mapping `m` of `pid` (read as [`read_mapping`] says).
pub fn of_mapping(pid: u32, m: &Mapping) -> Result<Loaded> {
    get((m.dev.clone(), m.inode), || {
        let (path, file) = open_mapping(pid, m, &TargetFiles::new(pid))?;
        read_open(file, &path)
    })
}

/// The one way to open the file behind mapping `m` of `pid`: through `map_files`, which
/// reaches the very inode mapped even when deleted or replaced on disk since; else by the
/// path the target names, as the target could (`files`, target_files's policy), only if it
/// is still the inode mapped. With the path it was opened by, for messages.
pub fn open_mapping(pid: u32, m: &Mapping, files: &TargetFiles) -> Result<(PathBuf, File)> {
    let by_map_files = procmaps::map_file_path(pid, m);
    if let Ok(file) = File::open(&by_map_files) {
        return Ok((by_map_files, file));
    }
    let path = Path::new(m.path.as_deref().unwrap_or_default());
    let file = files
        .open(path)
        .map_err(|why| anyhow!("reading {}: {why}", path.display()))?;
    if !file.metadata().is_ok_and(|md| md.ino() == m.inode) {
        bail!("{} is no longer the file mapped", path.display());
    }
    Ok((path.to_path_buf(), file))
}

/// The file behind mapping `m` of `pid` read whole ([`open_mapping`]); not an ELF file (a
/// locale archive): an error, before the whole file is read.
pub fn read_mapping(pid: u32, m: &Mapping) -> Result<(PathBuf, Vec<u8>)> {
    let (path, file) = open_mapping(pid, m, &TargetFiles::new(pid))?;
    read_open(file, &path).map(|r| (r.path, r.bytes))
}

/// The object behind mapping `m`, read (when not in memory) from `file`, which
/// [`open_mapping`] opened as `path`: the target may have exited since.
pub fn of_opened(m: &Mapping, path: &Path, file: &File) -> Result<Loaded> {
    get((m.dev.clone(), m.inode), || {
        let mut file = file.try_clone()?;
        file.rewind()?;
        read_open(file, path)
    })
}

/// The object at `path` (a path this process opens: the target's file through its root or
/// its `map_files`, or a file named on the command line).
pub fn of_path(path: &Path) -> Result<Loaded> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    get(key_of(&meta), || read_open(open_path(path)?, path))
}

/// The object at `path` without its bytes: what was worked out of it when it was read
/// (once for the run).
pub fn object_at(path: &Path) -> Result<Arc<ObjectFile>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let key = key_of(&meta);
    if let Some(object) = cached(&key) {
        HITS.fetch_add(1, Relaxed);
        return Ok(object);
    }
    Ok(get(key, || read_open(open_path(path)?, path))?.object)
}

/// The file at `path` read whole, outside the cache (see [`of_path`]).
pub fn read_path(path: &Path) -> Result<(PathBuf, Vec<u8>)> {
    read_open(open_path(path)?, path).map(|r| (r.path, r.bytes))
}

fn open_path(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("reading {}", path.display()))
}

/// Whether `path` starts like an ELF file (maps also holds locale archives and caches).
pub fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    File::open(path).is_ok_and(|mut f| f.read_exact(&mut magic).is_ok()) && magic == *b"\x7fELF"
}

/// The whole of `file` (named `path`), if it starts like an ELF file, up to the cap.
fn read_open(file: File, path: &Path) -> Result<Read> {
    use std::io::Read as _;
    let mut data = Vec::new();
    let mut capped = (&file).take(MAX_OBJECT_FILE);
    capped
        .by_ref()
        .take(4)
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    if data != b"\x7fELF" {
        bail!("{} is not an ELF file", path.display());
    }
    capped
        .read_to_end(&mut data)
        .with_context(|| format!("reading {}", path.display()))?;
    READS.fetch_add(1, Relaxed);
    Ok(Read {
        path: path.to_path_buf(),
        bytes: data,
        file,
    })
}

/// The cache key of a file, as its mappings would show it.
pub fn key_of(meta: &std::fs::Metadata) -> Key {
    let dev = meta.dev();
    let device = format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev));
    (device, meta.ino())
}

/// The cached object and its bytes, read from the first candidate that opens when they are
/// not in memory.
fn get(key: Key, read: impl Fn() -> Result<Read>) -> Result<Loaded> {
    if let Some(object) = cached(&key) {
        let mut held = object.bytes.lock().expect("not poisoned");
        let bytes = match held.upgrade() {
            Some(bytes) => {
                HITS.fetch_add(1, Relaxed);
                bytes
            }
            None => Arc::new(read()?.bytes),
        };
        *held = Arc::downgrade(&bytes);
        drop(held);
        return Ok(Loaded { object, bytes });
    }
    let Read { path, bytes, file } = read()?;
    let bytes = Arc::new(bytes);
    let object = Arc::new(ObjectFile::new(path, &bytes, file)?);
    *object.bytes.lock().expect("not poisoned") = Arc::downgrade(&bytes);
    OBJECTS
        .lock()
        .expect("not poisoned")
        .insert(key, object.clone());
    Ok(Loaded { object, bytes })
}

/// A function's machine code as the ELF file holds it.
#[derive(Debug)]
pub struct FunctionCode {
    /// The symbol's address (link-time virtual address).
    pub vaddr: u64,
    pub bytes: Vec<u8>,
}

/// The code of function `symbol` (from `.symtab`, else `.dynsym`) in the object at `path`,
/// kept with the object: when the file must be read, the code of the functions `along` is
/// taken too (a libc's dozen hooks read it once), and the next process that maps it reads
/// nothing.
pub fn function_code(path: &Path, symbol: &str, along: &[&str]) -> Result<Arc<FunctionCode>> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let key = key_of(&meta);
    let known =
        cached(&key).and_then(|o| o.code.lock().expect("not poisoned").get(symbol).cloned());
    let code = match known {
        Some(code) => {
            HITS.fetch_add(1, Relaxed);
            code
        }
        None => {
            let loaded = get(key, || read_open(open_path(path)?, path))?;
            let file = object::File::parse(&**loaded.bytes)
                .with_context(|| format!("{} is not an object file", path.display()))?;
            let mut kept = loaded.object.code.lock().expect("not poisoned");
            for name in along.iter().chain([&symbol]) {
                kept.entry(name.to_string()).or_insert_with(|| {
                    code_of(&file, name, path)
                        .map(Arc::new)
                        .map_err(|e| format!("{e:#}"))
                });
            }
            kept[symbol].clone()
        }
    };
    code.map_err(|e| anyhow!(e))
}

/// The code of function `symbol` in `file` (read from `path`).
fn code_of(file: &object::File, symbol: &str, path: &Path) -> Result<FunctionCode> {
    let sym = file
        .symbols()
        .chain(file.dynamic_symbols())
        .find(|s| s.kind() == SymbolKind::Text && s.is_definition() && s.name() == Ok(symbol))
        .with_context(|| format!("no function {symbol} in {}", path.display()))?;
    if sym.size() == 0 {
        bail!("{symbol} in {} has no size", path.display());
    }
    let section = sym
        .section_index()
        .and_then(|i| file.section_by_index(i).ok())
        .with_context(|| format!("{symbol} in {} is in no section", path.display()))?;
    let bytes = section
        .data_range(sym.address(), sym.size())
        .ok()
        .flatten()
        .with_context(|| format!("the code of {symbol} is not in {}", path.display()))?;
    Ok(FunctionCode {
        vaddr: sym.address(),
        bytes: bytes.to_vec(),
    })
}

/// PT_LOAD segments of `file`: (p_offset, p_filesz, p_vaddr).
pub fn segments(file: &object::File) -> Vec<(u64, u64, u64)> {
    file.segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (offset, size, s.address())
        })
        .collect()
}

/// The file offset of virtual address `vaddr`, through the PT_LOAD segment holding it.
fn offset_of(segments: &[(u64, u64, u64)], vaddr: u64) -> Option<u64> {
    segments.iter().find_map(|&(offset, size, start)| {
        (start <= vaddr && vaddr - start < size)
            .then(|| offset.checked_add(vaddr - start))
            .flatten()
    })
}

/// PT_INTERP of an ELF executable. Only the file and program headers are read, as the kernel
/// does: a file cut after its loaded segments (no section headers) still runs.
pub fn interpreter(data: &[u8]) -> Option<String> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let header = object::elf::FileHeader64::<object::Endianness>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let headers = header.program_headers(endian, data).ok()?;
    headers.iter().find_map(|ph| {
        let interp = ph.interpreter(endian, data).ok()??;
        Some(String::from_utf8_lossy(interp).into_owned())
    })
}

impl ObjectFile {
    fn new(path: PathBuf, data: &[u8], pinned: File) -> Result<ObjectFile> {
        let file = object::File::parse(data)
            .with_context(|| format!("{} is not an object file", path.display()))?;
        PARSES.fetch_add(1, Relaxed);
        let segments = segments(&file);
        Ok(ObjectFile {
            path,
            entry_offset: offset_of(&segments, file.entry()),
            segments,
            build_id: file.build_id().ok().flatten().map(<[u8]>::to_vec),
            interpreter: interpreter(data),
            binding: OnceLock::new(),
            python: OnceLock::new(),
            code: Mutex::default(),
            functions: OnceLock::new(),
            data: OnceLock::new(),
            bytes: Mutex::new(Weak::new()),
            _pinned: pinned,
        })
    }

    /// Runtime address − ELF virtual address for mapping `m` of this file: the PT_LOAD
    /// segment that holds the mapping's file offset says which address the mapping starts at.
    pub fn bias(&self, m: &Mapping) -> Option<u64> {
        let &(offset, _, vaddr) = self
            .segments
            .iter()
            .find(|(offset, size, _)| *offset <= m.offset && m.offset - offset < (*size).max(1))?;
        Some(m.start.wrapping_sub(vaddr.wrapping_add(m.offset - offset)))
    }

    /// The global variable whose bytes hold virtual address `vaddr` ([`with_data_symbols`]).
    pub fn data_symbol(&self, vaddr: u64) -> Option<&str> {
        let data = self.data.get()?;
        let i = data.partition_point(|d| d.0 <= vaddr).checked_sub(1)?;
        let (addr, size, name) = &data[i];
        (vaddr - addr < (*size).max(1)).then_some(name.as_str())
    }

    /// Defined data symbols, sorted by address (`data`: this object's bytes).
    fn data_symbols(&self, data: &[u8]) -> &[(u64, u64, String)] {
        self.data.get_or_init(|| {
            let Ok(file) = object::File::parse(data) else {
                return Vec::new();
            };
            let mut out: Vec<(u64, u64, String)> = file
                .symbols()
                .chain(file.dynamic_symbols())
                .filter(|s| s.kind() == SymbolKind::Data && !s.is_undefined() && s.address() != 0)
                .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
                .collect();
            out.sort();
            out.dedup_by_key(|d| d.0);
            out
        })
    }

    /// Defined function symbols → their virtual address (`data`: this object's bytes).
    fn functions(&self, data: &[u8]) -> &HashMap<String, u64> {
        self.functions.get_or_init(|| {
            let Ok(file) = object::File::parse(data) else {
                return HashMap::new();
            };
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
            out
        })
    }
}
