//! The object files behind the target's mappings, keyed by (device, inode): whoever needs one
//! (the probes, their placement, the unwinder, Python detection, the process facts) asks here,
//! so a libc mapped by eight processes is read and parsed once, and its load bias is worked
//! out in one place. blazesym's file cache has this shape.
//!
//! What is small and asked for again (segments, build-id, function symbols) stays for the
//! run; the bytes stay only while some caller holds them, so memleak does not keep a copy of
//! every library the target maps (a libtorch is gigabytes).

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock, Mutex, OnceLock, Weak},
};

use anyhow::{Context, Result, anyhow};
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::{
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
    /// Defined function symbols (dynamic and static tables) → virtual address; built on
    /// first use.
    functions: OnceLock<HashMap<String, u64>>,
    /// Defined data symbols (globals), sorted: (virtual address, size, name).
    data: OnceLock<Vec<(u64, u64, String)>>,
    bytes: Mutex<Weak<Vec<u8>>>,
}

static OBJECTS: LazyLock<Mutex<HashMap<Key, Arc<ObjectFile>>>> = LazyLock::new(Default::default);

/// An object with its bytes in memory; they stay cached while this (or a clone) lives.
#[derive(Clone)]
pub struct Loaded {
    pub object: Arc<ObjectFile>,
    pub bytes: Arc<Vec<u8>>,
}

impl Loaded {
    /// Defined function symbols (dynamic and static tables) → virtual address.
    pub fn functions(&self) -> &HashMap<String, u64> {
        self.object.functions(&self.bytes)
    }

    /// The global variable whose bytes hold virtual address `vaddr`.
    pub fn data_symbol(&self, vaddr: u64) -> Option<&str> {
        let data = self.object.data_symbols(&self.bytes);
        let i = data.partition_point(|d| d.0 <= vaddr).checked_sub(1)?;
        let (addr, size, name) = &data[i];
        (vaddr - addr < (*size).max(1)).then_some(name.as_str())
    }
}

/// The object `key` if it was read before: its segments and build-id without a read.
pub fn cached(key: &Key) -> Option<Arc<ObjectFile>> {
    OBJECTS.lock().expect("not poisoned").get(key).cloned()
}

/// The object behind file mapping `m` of `pid`: through `map_files` (the very inode mapped,
/// even if deleted or replaced on disk since), else by its path inside the target's root if
/// that is still the same inode.
pub fn of_mapping(pid: u32, m: &Mapping) -> Result<Loaded> {
    let key = (m.dev.clone(), m.inode);
    let by_map_files = procmaps::map_file_path(pid, m);
    get(key, || match std::fs::read(&by_map_files) {
        Ok(data) => Ok((by_map_files.clone(), data)),
        // The path the target names, as the target could read it (target_files).
        Err(_) => {
            let path = Path::new(m.path.as_deref().unwrap_or_default());
            TargetFiles::new(pid)
                .read(path, MAX_OBJECT_FILE, b"\x7fELF")
                .map(|data| (path.to_path_buf(), data))
                .map_err(|why| anyhow!("reading {}: {why}", path.display()))
        }
    })
}

/// The object at `path` (a path this process opens: the target's file through its root or
/// its `map_files`, or a file named on the command line).
pub fn of_path(path: &Path) -> Result<Loaded> {
    let meta = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let read = || {
        std::fs::read(path)
            .map(|data| (path.to_path_buf(), data))
            .with_context(|| format!("reading {}", path.display()))
    };
    get(key_of(&meta), read)
}

/// The cache key of a file, as its mappings would show it.
pub fn key_of(meta: &std::fs::Metadata) -> Key {
    let dev = meta.dev();
    let device = format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev));
    (device, meta.ino())
}

/// The cached object and its bytes, read from the first candidate that opens when they are
/// not in memory.
fn get(key: Key, read: impl Fn() -> Result<(PathBuf, Vec<u8>)>) -> Result<Loaded> {
    if let Some(object) = cached(&key) {
        let mut held = object.bytes.lock().expect("not poisoned");
        let bytes = match held.upgrade() {
            Some(bytes) => bytes,
            None => Arc::new(read()?.1),
        };
        *held = Arc::downgrade(&bytes);
        drop(held);
        return Ok(Loaded { object, bytes });
    }
    let (path, bytes) = read()?;
    let bytes = Arc::new(bytes);
    let object = Arc::new(ObjectFile::new(path, &bytes)?);
    *object.bytes.lock().expect("not poisoned") = Arc::downgrade(&bytes);
    OBJECTS
        .lock()
        .expect("not poisoned")
        .insert(key, object.clone());
    Ok(Loaded { object, bytes })
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

impl ObjectFile {
    fn new(path: PathBuf, data: &[u8]) -> Result<ObjectFile> {
        let file = object::File::parse(data)
            .with_context(|| format!("{} is not an object file", path.display()))?;
        Ok(ObjectFile {
            path,
            segments: segments(&file),
            build_id: file.build_id().ok().flatten().map(<[u8]>::to_vec),
            functions: OnceLock::new(),
            data: OnceLock::new(),
            bytes: Mutex::new(Weak::new()),
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
