//! Addresses of the target → frames, in three cached steps (the blazesym pipeline):
//! address → mapping of the target (a snapshot of `/proc/PID/maps`) → object file and ELF
//! virtual address (through the file's PT_LOAD headers) → function, file and line from the
//! object's symbol tables and DWARF ([`elf::ElfSource`]).
//!
//! Every executable file is opened when the maps are read, so the frames can still be named
//! after the file was deleted or replaced on disk, and after the target exited (memleak's
//! final table is printed then).

mod debug_file;
mod elf;

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use crate::model::{Frame, FrameKind};
use crate::objects;
use crate::procmaps::{self, Mapping};
use elf::ElfSource;

/// The sources some symbolizer holds, by build-id: a libc that eight traced processes map is
/// parsed (symbols, DWARF, its separate debug file) once; dropped with the last holder.
static PARSED: LazyLock<Mutex<HashMap<Vec<u8>, Weak<Shared>>>> = LazyLock::new(Default::default);

/// A parsed source, shared by the symbolizers of every process that maps its object.
type Shared = Mutex<ElfSource>;

pub struct Symbolizer {
    pid: u32,
    /// Executable mappings of the last successful read, sorted by start; `None`: not read yet.
    regions: Option<Vec<Region>>,
    /// Every file mapped since the start; `file_ids` finds one by (device, inode, path): a
    /// library rebuilt and loaded again is a new file even if its inode number was reused.
    files: Vec<MappedFile>,
    file_ids: HashMap<(String, u64, Option<String>), usize>,
    /// Parsed sources; shared by every file with the same build-id, in this symbolizer and
    /// in every other one that holds it (`PARSED`).
    sources: Vec<Arc<Shared>>,
    by_build_id: HashMap<Vec<u8>, usize>,
    /// Addresses outside every mapping even after re-reading the maps: not worth another read.
    missed: HashSet<u64>,
    /// Where the files named by the target's maps and objects are looked up.
    finder: debug_file::Finder,
}

/// One executable mapping, reduced to what turns an address into a file offset.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Region {
    start: u64,
    end: u64,
    /// File offset of `start`.
    offset: u64,
    /// Index in `Symbolizer::files`; `None`: anonymous code (a JIT's), which has no names
    /// but must not make every address in it re-read the maps.
    file: Option<usize>,
}

struct MappedFile {
    /// Basename, as frames show it.
    module: String,
    object: Object,
}

enum Object {
    /// Opened when the maps were read (`objects::open_mapping`), parsed on first use.
    Opened(Opened),
    /// The vDSO has no file: its image is copied out of the target's memory (or handed in
    /// whole: `of_image`).
    Image(Vec<u8>),
    Parsed(usize),
    /// Could not be opened or is not ELF: its addresses get a module but no name.
    Unusable,
}

/// A mapped file opened, not parsed yet.
struct Opened {
    /// The mapping it was opened for (its device and inode key the object cache).
    mapping: Mapping,
    /// The path it was opened by.
    path: PathBuf,
    file: File,
}

impl Symbolizer {
    pub fn new(pid: u32) -> Symbolizer {
        Symbolizer {
            pid,
            regions: None,
            files: Vec::new(),
            file_ids: HashMap::new(),
            sources: Vec::new(),
            by_build_id: HashMap::new(),
            missed: HashSet::new(),
            finder: debug_file::Finder::new(pid),
        }
    }

    /// The process runs a new program: every mapping and file known so far is the old one's.
    pub fn forget(&mut self) {
        *self = Symbolizer::new(self.pid);
    }

    /// Names the addresses of one object file image instead of a process's: an address is
    /// a file offset, as if the file were mapped whole at 0. The fuzz targets feed their
    /// input through it; separate debug files are still looked up on this system.
    pub fn of_image(module: &str, image: Vec<u8>) -> Symbolizer {
        let mut symbolizer = Symbolizer::new(0);
        symbolizer.finder = debug_file::Finder::new(std::process::id());
        symbolizer.files.push(MappedFile {
            module: module.to_string(),
            object: Object::Image(image),
        });
        symbolizer.regions = Some(vec![Region {
            start: 0,
            end: u64::MAX,
            offset: 0,
            file: Some(0),
        }]);
        symbolizer
    }

    /// One address → frames, innermost (inlined) first, then the outer function.
    ///
    /// `return_address`: the address is a return address (every frame of a stack taken at a
    /// uretprobe; all but the first at an entry probe): function and line are looked up at
    /// `addr - 1`, the call instruction, but `addr` is kept in `Frame.addr`.
    pub fn symbolize(&mut self, addr: u64, return_address: bool) -> Vec<Frame> {
        // Filled in step by step; whatever is known when a step fails is returned.
        let frame = Frame {
            addr,
            kind: FrameKind::Native,
            ..Default::default()
        };
        let Some((region, file)) = self.region_of(addr).and_then(|r| Some((r, r.file?))) else {
            return vec![frame];
        };
        let file_offset = addr - region.start + region.offset;
        let frame = Frame {
            module: Some(self.files[file].module.clone()),
            module_offset: file_offset,
            ..frame
        };
        let Some(source) = self.source(file) else {
            return vec![frame];
        };
        let mut source = self.sources[source].lock().expect("not poisoned");
        let Some(vaddr) = source.vaddr_of_offset(file_offset) else {
            return vec![frame];
        };
        let frame = Frame {
            module_offset: vaddr,
            ..frame
        };
        let probe = if return_address {
            vaddr.saturating_sub(1)
        } else {
            vaddr
        };
        let places = source.resolve(probe);
        if places.is_empty() {
            return vec![frame];
        }
        places
            .iter()
            .map(|p| Frame {
                function: p.function.clone(),
                function_offset: p.start.map_or(0, |start| vaddr.saturating_sub(start)),
                file: p.file.clone(),
                line: p.line,
                inlined: p.inlined,
                ..frame.clone()
            })
            .collect()
    }

    /// Re-reads the maps (an address outside every mapping known); see `update`.
    pub fn refresh(&mut self) {
        if let Ok(maps) = procmaps::read(self.pid) {
            self.update(&maps);
        }
    }

    /// Takes the process's mappings and opens the files of new executable ones. When the
    /// target is gone the last snapshot stays, with its files still open: that is what names
    /// the final table of a command that exited. An exiting process (and a zombie) still has
    /// a maps file, but an empty one, which a live process never has.
    pub fn update(&mut self, maps: &[Mapping]) {
        let mut maps: Vec<&Mapping> = maps.iter().filter(|m| m.executable).collect();
        if maps.is_empty() {
            return;
        }
        maps.sort_by_key(|m| m.start);
        let regions = maps
            .iter()
            .map(|m| Region {
                start: m.start,
                end: m.end,
                offset: m.offset,
                file: (m.is_file() || m.path.as_deref() == Some("[vdso]")).then(|| self.file_id(m)),
            })
            .collect();
        if self.regions.as_ref() != Some(&regions) {
            self.missed.clear();
        }
        self.regions = Some(regions);
    }

    /// The index of the file behind `m`, opening it the first time it is seen.
    fn file_id(&mut self, m: &Mapping) -> usize {
        let key = (m.dev.clone(), m.inode, m.path.clone());
        if let Some(&id) = self.file_ids.get(&key) {
            return id;
        }
        self.files.push(MappedFile {
            module: m.file_name().unwrap_or_default().to_string(),
            object: self.open(m),
        });
        self.file_ids.insert(key, self.files.len() - 1);
        self.files.len() - 1
    }

    /// The mapping holding `addr`; the maps are re-read once for an address outside all of
    /// them (a library loaded after the last read).
    fn region_of(&mut self, addr: u64) -> Option<Region> {
        if self.regions.is_none() {
            self.refresh();
        }
        let find = |regions: &Option<Vec<Region>>| {
            let regions = regions.as_deref()?;
            let i = regions
                .partition_point(|r| r.start <= addr)
                .checked_sub(1)?;
            Some(regions[i]).filter(|r| addr < r.end)
        };
        if let Some(r) = find(&self.regions) {
            return Some(r);
        }
        if !self.missed.insert(addr) {
            return None;
        }
        self.refresh();
        find(&self.regions)
    }

    /// Opens the file behind `m`, the one way objects.rs does (the vDSO is copied out of the
    /// target's memory).
    fn open(&self, m: &Mapping) -> Object {
        if m.path.as_deref() == Some("[vdso]") {
            return self.vdso_image(m).map_or(Object::Unusable, Object::Image);
        }
        match objects::open_mapping(self.pid, m, &self.finder.target) {
            Ok((path, file)) => Object::Opened(Opened {
                mapping: m.clone(),
                path,
                file,
            }),
            Err(_) => Object::Unusable,
        }
    }

    fn vdso_image(&self, m: &Mapping) -> Option<Vec<u8>> {
        let mem = File::open(format!("/proc/{}/mem", self.pid)).ok()?;
        let mut image = vec![0; (m.end - m.start) as usize];
        mem.read_exact_at(&mut image, m.start).ok()?;
        Some(image)
    }

    /// The parsed source of a mapped file, parsing it on first use.
    fn source(&mut self, file: usize) -> Option<usize> {
        let object = &mut self.files[file].object;
        let parsed = match std::mem::replace(object, Object::Unusable) {
            Object::Parsed(i) => Some(i),
            Object::Unusable => None,
            Object::Image(data) => self.parse(&data, None),
            Object::Opened(o) => self.adopt_cached(&o.mapping).or_else(|| {
                let loaded = objects::of_opened(&o.mapping, &o.path, &o.file).ok()?;
                self.parse(&loaded.bytes, o.mapping.path.as_deref())
            }),
        };
        self.files[file].object = parsed.map_or(Object::Unusable, Object::Parsed);
        parsed
    }

    /// The source of mapping `m`'s object when it is parsed already, here or by another
    /// symbolizer: found by the build-id the object cache knows, without reading the file.
    fn adopt_cached(&mut self, m: &Mapping) -> Option<usize> {
        let object = objects::cached(&(m.dev.clone(), m.inode))?;
        let id = object.build_id.as_ref()?;
        if let Some(&i) = self.by_build_id.get(id) {
            return Some(i);
        }
        let shared = PARSED.lock().expect("not poisoned").get(id)?.upgrade()?;
        objects::count_shared();
        self.sources.push(shared);
        self.by_build_id.insert(id.clone(), self.sources.len() - 1);
        Some(self.sources.len() - 1)
    }

    /// Parses an object file, or finds the source already parsed for its build-id.
    fn parse(&mut self, data: &[u8], target_path: Option<&str>) -> Option<usize> {
        use object::Object as _;
        let obj = object::File::parse(data).ok()?;
        let build_id = obj.build_id().ok().flatten().map(<[u8]>::to_vec);
        if let Some(&i) = build_id.as_ref().and_then(|id| self.by_build_id.get(id)) {
            return Some(i);
        }
        let mut parsed = PARSED.lock().expect("not poisoned");
        let shared = build_id.as_ref().and_then(|id| parsed.get(id)?.upgrade());
        let source = shared.unwrap_or_else(|| {
            let source = ElfSource::new(&obj, target_path.map(Path::new), &self.finder);
            let source = Arc::new(Mutex::new(source));
            if let Some(id) = &build_id {
                parsed.insert(id.clone(), Arc::downgrade(&source));
            }
            source
        });
        drop(parsed);
        self.sources.push(source);
        let i = self.sources.len() - 1;
        if let Some(id) = build_id {
            self.by_build_id.insert(id, i);
        }
        Some(i)
    }
}

/// BCC-like text of one frame, without its address: `leak_one+0xf [leaker] leaker.c:12`,
/// `[unknown] [libfoo.so+0x1234]`, `helper [leaker] leaker.c:7 (inlined)`.
pub fn format_frame(f: &Frame) -> String {
    // `[vdso]` is bracketed already.
    let module = match f.module.as_deref() {
        Some(m) if m.starts_with('[') => m.to_string(),
        Some(m) => format!("[{m}]"),
        None => "[unknown]".to_string(),
    };
    let Some(function) = &f.function else {
        return match &f.module {
            Some(m) => format!(
                "[unknown] [{}+{:#x}]",
                m.trim_matches(['[', ']']),
                f.module_offset
            ),
            None => "[unknown]".to_string(),
        };
    };
    let mut text = if f.kind == FrameKind::Python {
        format!("{function} [python]")
    } else if f.inlined {
        format!("{function} {module}")
    } else {
        format!("{function}+{:#x} {module}", f.function_offset)
    };
    if let Some(file) = &f.file {
        let base = file.rsplit('/').next().unwrap_or(file);
        text += &format!(" {base}");
        if let Some(line) = f.line {
            text += &format!(":{line}");
        }
    }
    if f.inlined {
        text += " (inlined)";
    }
    text
}

#[cfg(test)]
mod tests;
