//! Where CPython keeps what we read, per minor version (x86-64, release builds with the GIL).
//! Every number was checked with `offsetof` against the headers of the interpreter it
//! describes (see /work/shared/notes/python-internals.md).

use anyhow::{Result, bail};
use memleak_common::python::{
    CodeWindow, EntryMarker, FRAME_BUF, NO_FIELD, PyOffsets, fields_aligned,
};

use super::linetable::Format;

/// A CPython minor version we can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Version {
    pub major: u8,
    pub minor: u8,
    /// Unknown before 3.11, which has no `Py_Version`.
    pub micro: Option<u8>,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        match self.micro {
            Some(micro) => write!(f, ".{micro}"),
            None => Ok(()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// What the BPF program needs to walk frames; the userspace walker uses the same.
    pub frames: PyOffsets,
    /// `_PyRuntime` → `interpreters.head`.
    pub runtime_interpreters_head: u64,
    /// `PyInterpreterState` → next interpreter / first thread state.
    pub interp_next: u64,
    pub interp_threads_head: u64,
    pub tstate_next: u64,
    pub code_filename: u64,
    /// `co_qualname` (3.11+) or `co_name`.
    pub code_function: u64,
    pub code_firstlineno: u64,
    pub code_linetable: u64,
    pub line_table: Format,
    /// Bytes per unit of `PyFrame::instr` (3.10's f_lasti counts 2-byte code units).
    pub instr_unit: u64,
    /// `sizeof(PyASCIIObject)`: where the characters of a compact ASCII string start.
    pub ascii_data: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where those of other compact strings start.
    pub compact_data: u64,
    /// What the owner walk reads: the GC's lists and the containers.
    pub objects: Objects,
}

/// Where the collector's state and the containers' fields are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Objects {
    /// The `struct _gc_runtime_state`: in `_PyRuntime` (3.8) or in `PyInterpreterState`.
    pub gc: GcState,
    /// `PyInterpreterState` → `sys.modules` (`modules`, 3.12+ `imports.modules`).
    pub interp_modules: u64,
    pub type_name: u64,
    pub type_flags: u64,
    pub list_items: u64,
    pub tuple_items: u64,
    pub dict_keys: u64,
    pub dict_values: u64,
    pub dict_table: DictTable,
    /// Bytes before `values[0]` in a split dict's values (3.13's `PyDictValues` header).
    pub dict_values_header: u64,
    pub func_closure: u64,
    pub func_qualname: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GcState {
    InRuntime(u64),
    InInterpreter(u64),
}

/// How `PyDictKeysObject` says its size and where its entries start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DictTable {
    /// 3.8-3.10: `dk_size` slots, 1-8 byte indices by size, then (hash, key, value) entries.
    Sized,
    /// 3.11+: `dk_log2_size`, `dk_log2_index_bytes`, `dk_kind`; unicode-keyed tables keep
    /// (key, value) entries.
    Log2,
}

/// Fields that did not move between the versions we support: `PyObject.ob_type`,
pub const OB_TYPE: u64 = 8;
/// `PyBytesObject.ob_size` and `ob_sval`.
pub const BYTES_SIZE: u64 = 16;
pub const BYTES_DATA: u64 = 32;
/// `PyASCIIObject.length` and `state`.
pub const UNICODE_LENGTH: u64 = 16;
pub const UNICODE_STATE: u64 = 32;
/// `PyVarObject.ob_size`, `PyTypeObject.tp_basicsize`, `tp_itemsize`, `tp_base`, `tp_dict`.
pub const OB_SIZE: u64 = 16;
pub const TYPE_BASICSIZE: u64 = 32;
pub const TYPE_ITEMSIZE: u64 = 40;
pub const TYPE_DICT: u64 = 264;
/// `PyByteArrayObject.ob_bytes`, `PyModuleObject.md_dict`, `PyCellObject.ob_ref`.
pub const BYTEARRAY_BYTES: u64 = 32;
pub const MODULE_DICT: u64 = 16;
pub const CELL_REF: u64 = 16;
/// `lru_cache_object.cache`, `.func` and `.maxsize` (-1 for None; Modules/_functoolsmodule.c,
/// 3.8-3.13).
pub const LRU_CACHE: u64 = 72;
pub const LRU_FUNC: u64 = 88;
pub const LRU_MAXSIZE: u64 = 96;
/// `sizeof(PyGC_Head)`, which sits before every GC-tracked object; `struct gc_generation`,
/// and where the three generations and the permanent one are in the GC state.
pub const GC_HEAD: u64 = 16;
pub const GC_GENERATION: u64 = 24;
pub const GC_GENERATIONS: u64 = 24;
pub const GC_PERMANENT: u64 = 104;

impl Layout {
    /// The code object's pointers to its file, name and line table, and whatever lies between
    /// them (3.11+: `co_name` beside `co_qualname`): set when it is made, never changed, so
    /// the BPF program tells by them a code object from a later one at the same address.
    pub fn code_window(&self) -> CodeWindow {
        let fields = [self.code_filename, self.code_function, self.code_linetable];
        let start = fields.into_iter().min().unwrap_or(0);
        let end = fields.into_iter().max().unwrap_or(0) + 8;
        CodeWindow {
            start: start as u32,
            len: (end - start).min(FRAME_BUF as u64) as u32,
        }
    }

    /// The table of a minor version: 3.8's, then each later version's changes in turn.
    pub fn for_version(v: Version) -> Option<Layout> {
        if v.major != 3 || !(8..=13).contains(&v.minor) {
            return None;
        }
        let deltas: [fn(Layout) -> Layout; 5] = [v3_9, v3_10, v3_11, v3_12, v3_13];
        Some(
            deltas[..(v.minor - 8) as usize]
                .iter()
                .fold(v3_8(), |l, delta| delta(l)),
        )
    }
}

/// `_Py_DebugOffsets` (3.13): 73 u64 words at the start of `_PyRuntime`, each struct's
/// size before its fields' offsets. Stable within a minor version only (gh-106597).
pub const DEBUG_OFFSETS_LEN: usize = 73 * 8;
const DEBUG_COOKIE: &[u8; 8] = b"xdebugpy";

impl Layout {
    /// This table with the offsets the interpreter publishes about itself put in: what the
    /// target's own build says wins over what headers said. Refused unless the cookie, the
    /// version and the build (GIL, not free-threaded) match and every offset lies inside
    /// the struct it belongs to.
    pub fn published(self, v: Version, raw: &[u8]) -> Result<Layout> {
        let words = debug_offsets(v, raw)?;
        let w = |i: usize| words[i];
        let frame_end = [w(29) + 8, w(30) + 8, w(31) + 8, w(33) + 1]
            .into_iter()
            .max()
            .unwrap_or(0);
        if frame_end.next_multiple_of(8) > FRAME_BUF as u64 {
            bail!("_Py_DebugOffsets: frame fields end at {frame_end}, past what is read per frame");
        }
        let layout = Layout {
            frames: PyOffsets {
                tstate_frame: w(23) as u32,
                tstate_thread_id: w(24) as u32,
                frame_previous: w(29) as u32,
                frame_code: w(30) as u32,
                frame_instr: w(31) as u32,
                frame_marker: w(33) as u32,
                code_adaptive: w(43) as u32,
                frame_size: frame_end.next_multiple_of(8) as u32,
                ..self.frames
            },
            runtime_interpreters_head: w(5),
            interp_next: w(8),
            interp_threads_head: w(9),
            tstate_next: w(21),
            code_filename: w(35),
            code_function: w(37),
            code_linetable: w(38),
            code_firstlineno: w(39),
            ascii_data: w(70),
            objects: Objects {
                gc: GcState::InInterpreter(w(10)),
                interp_modules: w(11),
                type_name: w(47),
                type_flags: w(49),
                tuple_items: w(51),
                list_items: w(54),
                dict_keys: w(57),
                dict_values: w(58),
                ..self.objects
            },
            ..self
        };
        if !fields_aligned(&layout.frames) {
            bail!("_Py_DebugOffsets: a frame field straddles an aligned word");
        }
        Ok(layout)
    }
}

/// The words of a `_Py_DebugOffsets` (3.13+), refused unless the cookie, the version and the
/// build (GIL, not free-threaded) match and every offset read lies inside its struct.
fn debug_offsets(v: Version, raw: &[u8]) -> Result<Vec<u64>> {
    if raw.len() < DEBUG_OFFSETS_LEN || &raw[..8] != DEBUG_COOKIE {
        bail!("no _Py_DebugOffsets (cookie \"xdebugpy\") at the start of _PyRuntime");
    }
    let words: Vec<u64> = raw[..DEBUG_OFFSETS_LEN]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let w = |i: usize| words[i];
    if w(1) >> 16 != (v.major as u64) << 8 | v.minor as u64 || w(2) != 0 {
        bail!(
            "_Py_DebugOffsets is for version {:#x}, free-threaded {}",
            w(1),
            w(2)
        );
    }
    // (index of the struct's size, indices of the fields read) per struct.
    let structs: [(usize, &[usize]); 7] = [
        (3, &[5]),
        (6, &[8, 9, 10, 11]),
        (19, &[21, 23, 24]),
        (28, &[29, 30, 31, 33]),
        (34, &[35, 37, 38, 39, 43]),
        (46, &[47, 49]),
        (67, &[70]),
    ];
    for (size, fields) in structs {
        if let Some(&bad) = fields
            .iter()
            .find(|&&f| w(f) >= w(size) || w(size) > 1 << 20)
        {
            bail!(
                "_Py_DebugOffsets word {bad}: {} outside its struct of {} bytes",
                w(bad),
                w(size)
            );
        }
    }
    for (size, items) in [(50, 51), (53, 54), (56, 57), (56, 58)] {
        if w(items) >= w(size) {
            bail!(
                "_Py_DebugOffsets word {items}: {} outside its struct",
                w(items)
            );
        }
    }
    Ok(words)
}

fn v3_8() -> Layout {
    Layout {
        frames: PyOffsets {
            tstate_frame: 24,
            cframe_current_frame: NO_FIELD,
            tstate_thread_id: 176,
            frame_previous: 24,
            frame_code: 32,
            frame_instr: 104,
            frame_marker: NO_FIELD,
            entry_marker: EntryMarker::EveryFrame as u32,
            code_adaptive: 0,
            frame_size: 112,
        },
        runtime_interpreters_head: 32,
        interp_next: 0,
        interp_threads_head: 8,
        tstate_next: 8,
        code_filename: 104,
        code_function: 112,
        code_firstlineno: 40,
        code_linetable: 120,
        line_table: Format::Lnotab,
        instr_unit: 1,
        ascii_data: 48,
        compact_data: 72,
        objects: Objects {
            gc: GcState::InRuntime(344),
            interp_modules: 56,
            type_name: 24,
            type_flags: 168,
            list_items: 24,
            tuple_items: 24,
            dict_keys: 32,
            dict_values: 40,
            dict_table: DictTable::Sized,
            dict_values_header: 0,
            func_closure: 48,
            func_qualname: 104,
        },
    }
}

/// bpo-36854: the GC state moved from `_PyRuntime` into each interpreter, which grew.
fn v3_9(l: Layout) -> Layout {
    let objects = Objects {
        gc: GcState::InInterpreter(616),
        interp_modules: 856,
        ..l.objects
    };
    Layout { objects, ..l }
}

/// bpo-27129: `f_lasti` counts 2-byte code units and moved up with the frame's fields;
/// PEP 626: `co_linetable` replaces `co_lnotab`; bpo-42990: functions start with the
/// fields they share with frames (`func_builtins` among them).
fn v3_10(l: Layout) -> Layout {
    Layout {
        frames: PyOffsets {
            frame_instr: 96,
            frame_size: 104,
            ..l.frames
        },
        line_table: Format::Pep626,
        instr_unit: 2,
        objects: Objects {
            func_closure: 72,
            func_qualname: 40,
            ..l.objects
        },
        ..l
    }
}

/// bpo-44590: frames become `_PyInterpreterFrame`s reached through `_PyCFrame`; bpo-44530:
/// `co_qualname`; PEP 657: the location table; bpo-46845: dict keys sized by log2, with
/// compact unicode entries; the runtime's and interpreter's structs grew.
fn v3_11(l: Layout) -> Layout {
    Layout {
        frames: PyOffsets {
            tstate_frame: 56,
            cframe_current_frame: 8,
            tstate_thread_id: 152,
            frame_previous: 48,
            frame_code: 32,
            frame_instr: 56,
            frame_marker: 68,
            entry_marker: EntryMarker::IsEntry as u32,
            code_adaptive: 184,
            frame_size: 72,
        },
        runtime_interpreters_head: 40,
        interp_threads_head: 16,
        code_filename: 112,
        code_function: 128,
        code_firstlineno: 72,
        code_linetable: 136,
        line_table: Format::Pep657,
        instr_unit: 1,
        objects: Objects {
            gc: GcState::InInterpreter(648),
            interp_modules: 888,
            dict_table: DictTable::Log2,
            ..l.objects
        },
        ..l
    }
}

/// gh-101758: the interpreter's import state became one struct (`imports.modules`), and the
/// GC state moved near the top; gh-96421: a shim frame (`owner` = C stack) opens each
/// evaluator activation; PEP 623: `str` objects lost `wstr`, so their characters start 8
/// bytes earlier.
fn v3_12(l: Layout) -> Layout {
    Layout {
        frames: PyOffsets {
            cframe_current_frame: 0,
            tstate_thread_id: 136,
            frame_previous: 8,
            frame_code: 0,
            frame_marker: 70,
            entry_marker: EntryMarker::CStackShim as u32,
            code_adaptive: 192,
            ..l.frames
        },
        interp_threads_head: 72,
        code_firstlineno: 68,
        ascii_data: 40,
        compact_data: 56,
        objects: Objects {
            gc: GcState::InInterpreter(112),
            interp_modules: 944,
            ..l.objects
        },
        ..l
    }
}

/// gh-108035: `_PyCFrame` is gone, the thread state points at the frame again; gh-106597:
/// `_Py_DebugOffsets` opens `_PyRuntime`, pushing everything after it; gh-115776: split
/// dict values carry a header (capacity, size, embedded, valid) before the values.
fn v3_13(l: Layout) -> Layout {
    Layout {
        frames: PyOffsets {
            tstate_frame: 72,
            cframe_current_frame: NO_FIELD,
            tstate_thread_id: 152,
            code_adaptive: 200,
            ..l.frames
        },
        runtime_interpreters_head: 632,
        interp_next: 7264,
        interp_threads_head: 7344,
        objects: Objects {
            gc: GcState::InInterpreter(7400),
            interp_modules: 7656,
            dict_values_header: 8,
            ..l.objects
        },
        ..l
    }
}
