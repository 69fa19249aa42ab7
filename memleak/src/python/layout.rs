//! Where CPython keeps what we read, per minor version (x86-64, release builds with the GIL).
//! Every number was checked with `offsetof` against the headers of the interpreter it
//! describes (see /work/shared/notes/python-internals.md).

use memleak_common::python::{EntryMarker, NO_FIELD, PyOffsets};

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

#[derive(Clone, Copy, Debug)]
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
}

/// Fields that did not move between the versions we support: `PyObject.ob_type`,
pub const OB_TYPE: u64 = 8;
/// `PyBytesObject.ob_size` and `ob_sval`.
pub const BYTES_SIZE: u64 = 16;
pub const BYTES_DATA: u64 = 32;
/// `PyASCIIObject.length` and `state`.
pub const UNICODE_LENGTH: u64 = 16;
pub const UNICODE_STATE: u64 = 32;

impl Layout {
    pub fn for_version(v: Version) -> Option<Layout> {
        if v.major != 3 {
            return None;
        }
        let layout = match v.minor {
            // As 3.10 but f_lasti (a byte offset) is 8 bytes further and lines are in
            // co_lnotab. 3.8's thread states, frames and code objects lie the same way.
            8 | 9 => {
                let base = Layout::for_version(Version { minor: 10, ..v })?;
                Layout {
                    frames: PyOffsets {
                        frame_instr: 104,
                        frame_size: 112,
                        ..base.frames
                    },
                    line_table: Format::Lnotab,
                    instr_unit: 1,
                    ..base
                }
            }
            10 => Layout {
                frames: PyOffsets {
                    tstate_frame: 24,
                    cframe_current_frame: NO_FIELD,
                    tstate_thread_id: 176,
                    frame_previous: 24,
                    frame_code: 32,
                    frame_instr: 96,
                    frame_marker: NO_FIELD,
                    entry_marker: EntryMarker::EveryFrame as u32,
                    code_adaptive: 0,
                    frame_size: 104,
                },
                runtime_interpreters_head: 32,
                interp_next: 0,
                interp_threads_head: 8,
                tstate_next: 8,
                code_filename: 104,
                code_function: 112,
                code_firstlineno: 40,
                code_linetable: 120,
                line_table: Format::Pep626,
                instr_unit: 2,
                ascii_data: 48,
                compact_data: 72,
            },
            11 => Layout {
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
                interp_next: 0,
                interp_threads_head: 16,
                tstate_next: 8,
                code_filename: 112,
                code_function: 128,
                code_firstlineno: 72,
                code_linetable: 136,
                line_table: Format::Pep657,
                instr_unit: 1,
                ascii_data: 48,
                compact_data: 72,
            },
            12 => Layout {
                frames: PyOffsets {
                    tstate_frame: 56,
                    cframe_current_frame: 0,
                    tstate_thread_id: 136,
                    frame_previous: 8,
                    frame_code: 0,
                    frame_instr: 56,
                    frame_marker: 70,
                    entry_marker: EntryMarker::CStackShim as u32,
                    code_adaptive: 192,
                    frame_size: 72,
                },
                runtime_interpreters_head: 40,
                interp_next: 0,
                interp_threads_head: 72,
                tstate_next: 8,
                code_filename: 112,
                code_function: 128,
                code_firstlineno: 68,
                code_linetable: 136,
                line_table: Format::Pep657,
                instr_unit: 1,
                ascii_data: 40,
                compact_data: 56,
            },
            13 => Layout {
                frames: PyOffsets {
                    tstate_frame: 72,
                    cframe_current_frame: NO_FIELD,
                    tstate_thread_id: 152,
                    frame_previous: 8,
                    frame_code: 0,
                    frame_instr: 56,
                    frame_marker: 70,
                    entry_marker: EntryMarker::CStackShim as u32,
                    code_adaptive: 200,
                    frame_size: 72,
                },
                runtime_interpreters_head: 632,
                interp_next: 7264,
                interp_threads_head: 7344,
                tstate_next: 8,
                code_filename: 112,
                code_function: 128,
                code_firstlineno: 68,
                code_linetable: 136,
                line_table: Format::Pep657,
                instr_unit: 1,
                ascii_data: 40,
                compact_data: 56,
            },
            _ => return None,
        };
        Some(layout)
    }
}
