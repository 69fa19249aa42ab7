//! The Python part of the contract: where the BPF program finds a thread's Python frames (the
//! offsets differ per CPython version; userspace picks them) and how it marks them.

/// Set in `PyFrame::instr` on the outermost Python frame of one `_PyEval_EvalFrameDefault`
/// activation, so userspace can splice each run of Python frames into the native stack at
/// the right evaluator frame (3.10: every Python frame has its own activation).
pub const ENTRY_FRAME: u64 = 1 << 63;
/// `PyFrame::instr` when the instruction pointer lies outside the code (a frame being set up).
pub const UNKNOWN_INSTR: u64 = u32::MAX as u64;

/// `_PyInterpreterFrame.owner` of the shim frame each evaluator activation pushes (3.12+):
/// not a Python frame, it only marks where the activation starts.
pub const FRAME_OWNED_BY_CSTACK: u8 = 3;

/// How a frame tells that it is the first one of its evaluator activation.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMarker {
    /// 3.10: one activation per frame.
    EveryFrame = 0,
    /// 3.11: `is_entry` (bool) on the frame itself.
    IsEntry = 1,
    /// 3.12+: the previous frame is a shim whose `owner` is `FRAME_OWNED_BY_CSTACK`.
    CStackShim = 2,
}

/// Byte offsets of the fields the frame walk reads, for the target's CPython version. The
/// userspace walker reads the same fields through the same struct, so what the tests check
/// is what the BPF program does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyOffsets {
    /// `PyThreadState` → top frame (3.10 `frame`, 3.13 `current_frame`) or, when
    /// `cframe_current_frame` is set, → `_PyCFrame` (3.11, 3.12).
    pub tstate_frame: u32,
    /// `_PyCFrame.current_frame`; `NO_FIELD` when the thread state points at the frame.
    pub cframe_current_frame: u32,
    /// `PyThreadState.thread_id` (pthread_t, equal to fs_base on x86-64).
    pub tstate_thread_id: u32,
    /// Frame → caller frame (`f_back` / `previous`).
    pub frame_previous: u32,
    /// Frame → code object (`f_code` / `f_executable`).
    pub frame_code: u32,
    /// 3.10: `f_lasti` (int, an instruction index); 3.11+: pointer to the instruction.
    pub frame_instr: u32,
    /// `is_entry` (3.11) or `owner` (3.12+), per `entry_marker`.
    pub frame_marker: u32,
    /// An `EntryMarker` value.
    pub entry_marker: u32,
    /// `PyCodeObject.co_code_adaptive`: where instructions start (0 for 3.10).
    pub code_adaptive: u32,
    /// Bytes read at each frame's address: all the fields above lie within them, so one
    /// read per frame does (at most `FRAME_BUF`).
    pub frame_size: u32,
}

/// The most bytes read per frame.
pub const FRAME_BUF: usize = 128;

/// One frame, decoded.
pub enum FrameStep {
    /// A Python frame, and the address of its caller's frame.
    Python(crate::PyFrame, u64),
    /// A shim frame (3.12+) that starts an evaluator activation: the frame before it (the
    /// inner one) is that activation's entry frame. Its caller's frame.
    Shim(u64),
}

/// Decodes one frame as both walkers (BPF and userspace) do. `word(offset)` gives the frame's
/// bytes from `offset` on, little-endian, at least up to the next multiple of 8 (the BPF walk
/// reads frames as aligned words); no field crosses one, as frames are 8-byte aligned and
/// `layout` checks the offsets. `None`: a word could not be read.
pub fn decode_frame(o: &PyOffsets, mut word: impl FnMut(u32) -> Option<u64>) -> Option<FrameStep> {
    let code = word(o.frame_code)?;
    let previous = word(o.frame_previous)?;
    let instr = if o.entry_marker == EntryMarker::EveryFrame as u32 {
        word(o.frame_instr)? as u32 as u64 | ENTRY_FRAME
    } else {
        let marker = word(o.frame_marker)? as u8;
        if o.entry_marker == EntryMarker::CStackShim as u32 && marker == FRAME_OWNED_BY_CSTACK {
            return Some(FrameStep::Shim(previous));
        }
        let ptr = word(o.frame_instr)?;
        let entry = o.entry_marker == EntryMarker::IsEntry as u32 && marker != 0;
        instr_offset(ptr, code, o.code_adaptive) | if entry { ENTRY_FRAME } else { 0 }
    };
    Some(FrameStep::Python(crate::PyFrame { code, instr }, previous))
}

/// Whether a frame layout's fields each lie inside one aligned word of an aligned frame (as
/// [`decode_frame`] needs): pointers at multiples of 8, the 3.10 `int` and the marker byte
/// not across one.
pub fn fields_aligned(o: &PyOffsets) -> bool {
    let within = |offset: u32, size: u32| offset % 8 + size <= 8;
    let every_frame = o.entry_marker == EntryMarker::EveryFrame as u32;
    within(o.frame_code, 8)
        && within(o.frame_previous, 8)
        && within(o.frame_instr, if every_frame { 4 } else { 8 })
        && (every_frame || within(o.frame_marker, 1))
}

pub const NO_FIELD: u32 = u32::MAX;

/// `PyFrame::instr` for 3.11+: the instruction's byte offset in `co_code_adaptive`, or
/// `UNKNOWN_INSTR` when the pointer is not inside the first 4 GiB after it.
pub fn instr_offset(instr_ptr: u64, code: u64, code_adaptive: u32) -> u64 {
    let offset = instr_ptr.wrapping_sub(code.wrapping_add(code_adaptive as u64));
    if offset >= UNKNOWN_INSTR {
        UNKNOWN_INSTR
    } else {
        offset
    }
}

/// What the BPF program needs to read a Python target, in the one-slot array map
/// `PY_CONFIG_MAP`. Userspace writes it once it has found CPython in the target (after exec
/// for a started command); all zero means "no Python": no frames are read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PyConfig {
    pub offsets: PyOffsets,
    /// Offset of `thread.fsbase` in the kernel's `task_struct` (from the kernel BTF).
    pub task_fsbase: u64,
    /// `&_PyRuntime.interpreters.head` in the target. A thread missing from the thread map
    /// (started since userspace last looked) is searched for from there, and added.
    pub interpreters_head: u64,
    /// `PyInterpreterState` → first thread state; `PyThreadState.next`.
    pub interp_threads_head: u32,
    pub tstate_next: u32,
    /// Where a code object's identity lies (see `PY_CODES_SEEN`).
    pub code_window: CodeWindow,
}

/// Thread states the BPF program looks through for a thread missing from the map.
pub const MAX_THREAD_SCAN: u32 = 256;

/// `PY_NEW_CODES` (a ring buffer of `NewPythonCode`s): room for about 8,000 code objects
/// between two reads.
pub const PY_NEW_CODES_BYTES: u32 = 1 << 17;

/// Code objects `PY_CODES_SEEN` remembers as already handed to userspace.
pub const MAX_PY_CODES_SEEN: u32 = 1 << 14;

/// One record of `PY_NEW_CODES`: a code object on a stack just stored that userspace has
/// not been handed yet (or that changed since: a freed address reused), so that it reads the
/// object while it lives (code objects die with their function, their module or the
/// process). Each code object comes once, not once per stack: Python's start-up stores
/// thousands of stacks over a few hundred code objects, and a reader that went through
/// every stack fell behind a script that exits at once.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct NewPythonCode {
    pub tgid: u32,
    pub _pad: u32,
    pub code: u64,
}

/// `PY_CODES_SEEN`'s key: a code object of one process.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SeenCode {
    pub tgid: u32,
    pub _pad: u32,
    pub code: u64,
}

/// The bytes of a code object that tell it from another one later at its address: its
/// `co_filename` .. `co_linetable` pointers (names, file, lines: set at creation, never
/// changed), `len` bytes from `start`, at most `FRAME_BUF`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CodeWindow {
    pub start: u32,
    pub len: u32,
}

/// What `PY_CODES_SEEN` keeps of a code object: its window's 8-byte words folded together.
pub fn code_identity(window: &[u8; FRAME_BUF], len: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..FRAME_BUF / 8 {
        if i * 8 >= len as usize {
            break;
        }
        let Some(word) = window.get(i * 8..i * 8 + 8) else {
            break;
        };
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(word);
        h = (h ^ u64::from_le_bytes(bytes)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Threads `PY_THREADS` holds (a thread's fs_base, its pthread_t → its `PyThreadState`).
pub const MAX_PY_THREADS: u32 = 4096;

#[cfg(feature = "user")]
unsafe impl aya::Pod for PyConfig {}
