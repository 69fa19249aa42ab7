//! Python-aware tracing: find the CPython runtime in a target, walk its threads' frames the
//! way the BPF program does, and turn recorded frames (code object, instruction) into
//! file, function and line by reading the target's memory. Every pointer read there may be
//! garbage: a field's address is a wrapping add to it, and a read there fails like any
//! other read of a bad pointer.

mod btf;
mod classify;
mod codes;
pub(crate) mod layout;
mod learner;
pub mod linetable;
mod memory;
mod splice;
#[cfg(test)]
pub(crate) mod tests;
mod threads;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use memleak_common::python::{ENTRY_FRAME, PyConfig, UNKNOWN_INSTR};
use memleak_common::{AllocKind, PyFrame};
// The userspace twin of the BPF frame walk (`stack`), for the tests.
#[cfg(test)]
use memleak_common::{
    MAX_PYTHON_FRAMES, MAX_PYTHON_STEPS,
    python::{FRAME_BUF, FrameStep, NO_FIELD, decode_frame},
};
use object::{Object, ObjectSymbol};

use crate::objects::{self, ObjectFile};
use crate::procmaps::{self, Mapping};
use crate::target_files::TargetFiles;
pub use classify::classify;
pub use codes::Codes;
pub use layout::Version;
use layout::{Layout, UNICODE_LENGTH, UNICODE_STATE};
pub use memory::Memory;
pub use threads::{Learner, PythonTracking};

/// CPython's own allocator entry points, each with the libc function it behaves like, for
/// `--python-allocators`: hooked with that function's probes, every pymalloc block is
/// tracked. A block pymalloc forwards to malloc (and the arena mmaps it makes) is a call
/// nested in the in-flight outer one, which owns it: nothing is counted twice.
pub const ALLOCATOR_ENTRY_POINTS: [(&str, AllocKind); 8] = [
    ("PyObject_Malloc", AllocKind::Malloc),
    ("PyObject_Calloc", AllocKind::Calloc),
    ("PyObject_Realloc", AllocKind::Realloc),
    ("PyObject_Free", AllocKind::Free),
    ("PyMem_Malloc", AllocKind::Malloc),
    ("PyMem_Calloc", AllocKind::Calloc),
    ("PyMem_Realloc", AllocKind::Realloc),
    ("PyMem_Free", AllocKind::Free),
];

/// Where a Python frame was.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PyLocation {
    pub file: String,
    /// Qualified name (`Class.method`) on 3.11+, plain name on 3.10.
    pub function: String,
    /// `None`: the frame was between instructions that have a line (setting up, or code
    /// without a location).
    pub line: Option<u32>,
}

/// A thread of the target as CPython knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadState {
    /// The `PyThreadState` address.
    pub addr: u64,
    /// `pthread_self()` of the thread, equal to its fs_base on x86-64.
    pub thread_id: u64,
}

/// The CPython interpreter running in one process.
pub struct PythonRuntime {
    pub version: Version,
    /// The object file that holds the interpreter (libpython or the executable), as the
    /// target names it.
    pub interpreter_path: String,
    /// Files under this directory are the standard library (site-packages excepted).
    pub stdlib_dir: String,
    /// Basenames of the interpreter's native code: libpython, the executable, the standard
    /// library's extension modules.
    interpreter_modules: HashSet<String>,
    layout: Layout,
    memory: Memory,
    /// `_PyRuntime` and `PyCode_Type` in the target.
    runtime_addr: u64,
    codes: Codes,
}

/// Symbols that tell what kind of interpreter an object file holds (kept with the object:
/// `objects::ObjectFile::python`).
#[derive(Debug, Default)]
pub struct Symbols {
    runtime: Option<u64>,
    version: Option<u64>,
    code_type: Option<u64>,
    /// With no `Py_Version` (before 3.11), the newest of these tells the version: only
    /// 3.10+ has `PyAIter_Check`, only 3.9+ `PyModule_AddType`, only 3.8+ `Py_RunMain`.
    aiter_check: bool,
    module_add_type: bool,
    run_main: bool,
    /// Reference-count debugging: a debug build, whose structs have other layouts.
    ref_total: bool,
    /// Biased reference counting: a free-threaded (3.13t) build.
    free_threaded: bool,
}

impl PythonRuntime {
    /// Finds CPython in `pid`: `Ok(None)` when the process runs no Python, an error when it
    /// runs one we cannot read (too old, too new, debug or free-threaded build).
    pub fn detect(pid: u32) -> Result<Option<PythonRuntime>> {
        Self::detect_in(pid, &procmaps::read(pid)?)
    }

    /// `detect`, with the process's mappings already read.
    pub fn detect_in(pid: u32, maps: &[Mapping]) -> Result<Option<PythonRuntime>> {
        let exe = executable(pid)?;
        for (path, first) in interpreter_candidates(maps, &exe) {
            let object = Symbols::of_mapping(pid, path, first)?;
            let symbols = object.python.get().expect("just set");
            let Some(runtime) = symbols.runtime else {
                continue;
            };
            let bias = object.bias(first).with_context(|| {
                format!("{path}: no segment maps file offset {:#x}", first.offset)
            })?;
            let mut rt = Self::new(pid, path, bias, runtime, symbols)?;
            rt.interpreter_modules = interpreter_modules(pid, path, &exe, &rt.stdlib_dir);
            return Ok(Some(rt));
        }
        Ok(None)
    }

    fn new(pid: u32, path: &str, bias: u64, runtime: u64, symbols: &Symbols) -> Result<Self> {
        let memory = Memory::Process(pid);
        let version = match symbols.version {
            Some(addr) => {
                let hex = memory.u32(bias.wrapping_add(addr))?;
                Version {
                    major: (hex >> 24) as u8,
                    minor: (hex >> 16) as u8,
                    micro: Some((hex >> 8) as u8),
                }
            }
            None if symbols.aiter_check => Version {
                major: 3,
                minor: 10,
                micro: None,
            },
            None if symbols.module_add_type => Version {
                major: 3,
                minor: 9,
                micro: None,
            },
            None if symbols.run_main => Version {
                major: 3,
                minor: 8,
                micro: None,
            },
            None => bail!("{path}: Python older than 3.8 is not supported"),
        };
        if symbols.ref_total {
            bail!("{path}: Python {version} is a debug build (Py_REF_DEBUG), not supported");
        }
        if symbols.free_threaded {
            bail!("{path}: Python {version} is a free-threaded build, not supported");
        }
        let code_type = symbols
            .code_type
            .with_context(|| format!("{path}: no PyCode_Type symbol"))?;
        Self::in_memory(
            memory,
            path,
            version,
            bias.wrapping_add(runtime),
            bias.wrapping_add(code_type),
        )
    }

    /// The runtime of a CPython `version` whose `_PyRuntime` and `PyCode_Type` are at these
    /// addresses of `memory`. `detect` ends here; the fuzz targets start here, with a copy.
    pub fn in_memory(
        memory: Memory,
        path: &str,
        version: Version,
        runtime_addr: u64,
        code_type: u64,
    ) -> Result<Self> {
        let mut layout = Layout::for_version(version).with_context(|| {
            format!("{path}: Python {version} is not supported (3.8 to 3.13 are)")
        })?;
        if version.minor >= 13 {
            let raw = memory.read_vec(runtime_addr, layout::DEBUG_OFFSETS_LEN)?;
            layout = layout
                .published(version, &raw)
                .with_context(|| format!("{path}: Python {version}"))?;
        }
        Ok(PythonRuntime {
            version,
            interpreter_path: path.to_string(),
            stdlib_dir: stdlib_dir(path, version),
            interpreter_modules: HashSet::new(),
            layout,
            runtime_addr,
            codes: Codes::new(memory.clone(), layout, code_type),
            memory,
        })
    }

    /// The code objects read so far, shared with whoever reads new stacks' code objects.
    pub fn codes(&self) -> Codes {
        self.codes.clone()
    }

    /// The interpreter's object file, openable from here (through the target's root), to
    /// hook `ALLOCATOR_ENTRY_POINTS` in.
    pub fn object_path(&self) -> std::path::PathBuf {
        let pid = self.memory.pid();
        let mapping = procmaps::read(pid).ok().and_then(|maps| {
            maps.into_iter()
                .find(|m| m.path.as_deref() == Some(self.interpreter_path.as_str()))
        });
        match mapping {
            Some(m) => procmaps::mapped_file(pid, &m),
            None => procmaps::host_path(pid, &self.interpreter_path),
        }
    }

    /// What the BPF program needs to find threads and walk their frames.
    pub fn bpf_config(&self, task_fsbase: u64) -> PyConfig {
        let l = &self.layout;
        PyConfig {
            offsets: l.frames,
            task_fsbase,
            interpreters_head: self.runtime_addr.wrapping_add(l.runtime_interpreters_head),
            interp_threads_head: l.interp_threads_head as u32,
            tstate_next: l.tstate_next as u32,
            code_window: l.code_window(),
        }
    }

    /// Every thread state of every interpreter, read now.
    pub fn thread_states(&self) -> Result<Vec<ThreadState>> {
        /// Bound the walk when a list is being changed under us or is corrupt (a cycle).
        const MAX_THREADS: usize = 65536;
        const MAX_INTERPRETERS: usize = 4096;
        let l = &self.layout;
        let m = &self.memory;
        let mut threads = Vec::new();
        let mut interp = m.u64(self.runtime_addr.wrapping_add(l.runtime_interpreters_head))?;
        let mut interpreters = 0;
        while interp != 0 && threads.len() < MAX_THREADS && interpreters < MAX_INTERPRETERS {
            interpreters += 1;
            let mut tstate = m.u64(interp.wrapping_add(l.interp_threads_head))?;
            while tstate != 0 && threads.len() < MAX_THREADS {
                let thread_id = m.u64(tstate.wrapping_add(l.frames.tstate_thread_id as u64))?;
                threads.push(ThreadState {
                    addr: tstate,
                    thread_id,
                });
                tstate = m.u64(tstate.wrapping_add(l.tstate_next))?;
            }
            interp = m.u64(interp.wrapping_add(l.interp_next))?;
        }
        Ok(threads)
    }

    /// The Python frames of a thread, innermost first, read the way the BPF program reads
    /// them (same fields, same marks, same cap). The tests check the BPF walk's layout with it.
    #[cfg(test)]
    pub fn stack(&self, tstate: u64) -> Result<Vec<PyFrame>> {
        let o = &self.layout.frames;
        let m = &self.memory;
        let mut frame = m.u64(tstate + o.tstate_frame as u64)?;
        if o.cframe_current_frame != NO_FIELD && frame != 0 {
            frame = m.u64(frame + o.cframe_current_frame as u64)?;
        }
        let mut frames: Vec<PyFrame> = Vec::new();
        let mut buf = [0u8; FRAME_BUF];
        let size = (o.frame_size as usize).min(FRAME_BUF);
        // Shim frames (3.12+) take steps without giving frames.
        let mut steps = 0;
        while frame != 0 && frames.len() < MAX_PYTHON_FRAMES && steps < MAX_PYTHON_STEPS {
            steps += 1;
            m.read(frame, &mut buf[..size])?;
            let word = |at: u32| {
                let bytes = buf.get(at as usize..at as usize + 8)?;
                Some(u64::from_le_bytes(bytes.try_into().ok()?))
            };
            match decode_frame(o, word).context("frame offsets out of bounds")? {
                FrameStep::Python(f, previous) => {
                    frames.push(f);
                    frame = previous;
                }
                FrameStep::Shim(previous) => {
                    if let Some(last) = frames.last_mut() {
                        last.instr |= ENTRY_FRAME;
                    }
                    frame = previous;
                }
            }
        }
        Ok(frames)
    }

    /// File, function and line of a recorded frame; `None` when its code object cannot be
    /// read any more and was never seen before.
    pub fn resolve(&mut self, frame: PyFrame) -> Option<PyLocation> {
        let (format, unit) = (self.layout.line_table, self.layout.instr_unit);
        let code = self.codes.get(frame.code)?;
        let instr = frame.instr & !ENTRY_FRAME;
        let line = match instr {
            UNKNOWN_INSTR => None,
            _ => linetable::line(format, &code.linetable, code.firstlineno, instr * unit),
        };
        Some(PyLocation {
            file: code.file.clone(),
            function: code.function.clone(),
            line,
        })
    }

    /// What the owner walk reads through: the target's memory, its layout, `_PyRuntime`.
    pub(crate) fn parts(&self) -> (&Memory, &Layout, u64) {
        (&self.memory, &self.layout, self.runtime_addr)
    }
}

/// A compact `str` object's text, read with `read` (the target's memory, or a copy of it).
pub(crate) fn read_str(
    read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    layout: &Layout,
    addr: u64,
) -> Result<String> {
    let (mut length, mut state) = ([0u8; 8], [0u8; 4]);
    read(addr.wrapping_add(UNICODE_LENGTH), &mut length)?;
    read(addr.wrapping_add(UNICODE_STATE), &mut state)?;
    let (length, state) = (
        u64::from_le_bytes(length) as usize,
        u32::from_le_bytes(state),
    );
    let kind = (state >> 2) & 7;
    let compact = state & (1 << 5) != 0;
    let ascii = state & (1 << 6) != 0;
    if !compact || length > 1 << 16 {
        bail!("str at {addr:#x} is not a compact string");
    }
    let data = if ascii {
        layout.ascii_data
    } else {
        layout.compact_data
    };
    let width = if ascii { 1 } else { kind as usize };
    if !matches!(width, 1 | 2 | 4) {
        bail!("str at {addr:#x} has character width {width}");
    }
    let mut raw = vec![0; length * width];
    read(addr.wrapping_add(data), &mut raw)?;
    let text = raw
        .chunks_exact(width)
        .map(|c| {
            let mut b = [0u8; 4];
            b[..width].copy_from_slice(c);
            char::from_u32(u32::from_le_bytes(b)).unwrap_or(char::REPLACEMENT_CHARACTER)
        })
        .collect();
    Ok(text)
}

impl Symbols {
    /// The object behind mapping `first` (`path`) of `pid`, its symbols worked out: once
    /// per object for the run (every worker of a service maps the same interpreter).
    fn of_mapping(pid: u32, path: &str, first: &Mapping) -> Result<Arc<ObjectFile>> {
        let key = (first.dev.clone(), first.inode);
        if let Some(object) = objects::cached(&key).filter(|o| o.python.get().is_some()) {
            objects::count_shared();
            return Ok(object);
        }
        let loaded = objects::of_mapping(pid, first).with_context(|| format!("reading {path}"))?;
        let file =
            object::File::parse(&**loaded.bytes).with_context(|| format!("parsing {path}"))?;
        loaded.object.python.get_or_init(|| Symbols::of(&file));
        Ok(loaded.object)
    }

    fn of(file: &object::File) -> Symbols {
        let mut s = Symbols::default();
        for sym in file.symbols().chain(file.dynamic_symbols()) {
            if sym.is_undefined() {
                continue;
            }
            match sym.name().unwrap_or("") {
                "_PyRuntime" => s.runtime = Some(sym.address()),
                "Py_Version" => s.version = Some(sym.address()),
                "PyCode_Type" => s.code_type = Some(sym.address()),
                "PyAIter_Check" => s.aiter_check = true,
                "PyModule_AddType" => s.module_add_type = true,
                "Py_RunMain" => s.run_main = true,
                "_Py_RefTotal" | "_Py_GetRefTotal" => s.ref_total = true,
                "_Py_MergeZeroLocalRefcount" | "_Py_brc_queue_object" => s.free_threaded = true,
                _ => {}
            }
        }
        s
    }
}

/// The files `detect` looks in (the executable, every mapped libpython): while they stay
/// the same, so does its answer, and it need not read them again.
pub fn interpreter_files(pid: u32, maps: &[Mapping]) -> Result<Vec<String>> {
    let exe = executable(pid)?;
    let candidates = interpreter_candidates(maps, &exe);
    Ok(candidates
        .into_iter()
        .map(|(path, _)| path.to_string())
        .collect())
}

fn executable(pid: u32) -> Result<String> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
        .with_context(|| format!("reading /proc/{pid}/exe"))?;
    Ok(exe.to_string_lossy().into_owned())
}

/// The executable and every mapped libpython, each with its lowest-offset mapping.
fn interpreter_candidates<'a>(maps: &'a [Mapping], exe: &str) -> Vec<(&'a str, &'a Mapping)> {
    let mut found: Vec<(&str, &Mapping)> = Vec::new();
    for m in maps.iter().filter(|m| m.is_file()) {
        let path = m.path.as_deref().unwrap_or("");
        let wanted = path == exe || m.file_name().is_some_and(|n| n.starts_with("libpython"));
        if !wanted {
            continue;
        }
        match found.iter_mut().find(|(p, _)| *p == path) {
            Some(entry) if m.offset < entry.1.offset => entry.1 = m,
            Some(_) => {}
            None => found.push((path, m)),
        }
    }
    found
}

/// `PREFIX/lib/pythonX.Y/` for an interpreter installed as `PREFIX/lib/libpython…` or
/// `PREFIX/bin/python…`.
fn stdlib_dir(interpreter_path: &str, v: Version) -> String {
    let prefix = Path::new(interpreter_path)
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"));
    format!(
        "{}/lib/python{}.{}/",
        prefix.display().to_string().trim_end_matches('/'),
        v.major,
        v.minor
    )
}

/// Far more than a standard library holds (CPython 3.13's lib-dynload: about 70).
const MAX_DYNLOAD_MODULES: usize = 4096;

/// Basenames of the interpreter's object file, the executable, and the standard library's
/// extension modules (`lib-dynload`, listed as the target could: target_files).
fn interpreter_modules(
    pid: u32,
    interpreter: &str,
    exe: &str,
    stdlib_dir: &str,
) -> HashSet<String> {
    let base = |p: &str| p.rsplit('/').next().unwrap_or(p).to_string();
    let mut modules: HashSet<String> = [base(interpreter), base(exe)].into();
    let dynload = format!("{stdlib_dir}lib-dynload");
    let names = TargetFiles::new(pid).list(Path::new(&dynload), MAX_DYNLOAD_MODULES);
    modules.extend(
        names
            .unwrap_or_default()
            .into_iter()
            .map(|n| n.to_string_lossy().into_owned()),
    );
    modules
}
