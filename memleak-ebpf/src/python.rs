//! Python frames of the allocating thread: (code object, instruction) pairs read from the
//! CPython frame chain, which userspace turns into file, function and line.
//!
//! The thread's `PyThreadState` comes from `PY_THREADS`, which userspace keeps keyed by each
//! thread's pthread_t; on x86-64 that is the thread's fs_base, which the kernel keeps in
//! `task_struct` (offset from the kernel BTF, in `PY_CONFIG`). A thread started since
//! userspace last scanned is searched for in the interpreter's thread list and added.

use core::{
    ffi::c_void,
    ptr::{null_mut, write_volatile},
};

use aya_ebpf::helpers::{
    bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user, bpf_probe_read_user_buf,
    generated::bpf_loop,
};
use memleak_common::{
    MAX_PYTHON_FRAMES, PyFrame, StackRecord,
    python::{
        ENTRY_FRAME, FRAME_BUF, FrameStep, MAX_THREAD_SCAN, NO_FIELD, PyConfig, PyOffsets,
        decode_frame,
    },
};

use crate::maps::{PY_CONFIG, PY_THREADS, PY_WALK};

/// The per-CPU state of one walk (the frames do not fit the 512-byte BPF stack).
#[repr(C)]
pub(crate) struct Walk {
    frames: [PyFrame; MAX_PYTHON_FRAMES],
    /// The bytes of the frame being decoded.
    buf: [u8; FRAME_BUF],
    offsets: PyOffsets,
    /// The next frame to read.
    frame: u64,
    len: u32,
    tstate_next: u32,
    /// Thread search: the fs_base sought, the next thread state, the one found.
    fsbase: u64,
    cursor: u64,
    found: u64,
}

#[inline(always)]
fn user<T>(addr: u64) -> Option<T> {
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// Fills `rec.python` with the current thread's Python frames, innermost first, each run of
/// one evaluator activation ending with an `ENTRY_FRAME` mark. Leaves `python_len` 0 when the
/// target runs no Python or the thread has no frames.
#[inline(always)]
pub fn read_frames(rec: *mut StackRecord) {
    let rec = unsafe { &mut *rec };
    rec.python_len = 0;
    let Some(config) = PY_CONFIG.get(0) else {
        return;
    };
    let o = config.offsets;
    if o.tstate_frame == 0 {
        return;
    }
    let Some(w) = PY_WALK.get_ptr_mut(0) else {
        return;
    };
    // A raw pointer, not `&mut`: the `bpf_loop` callbacks change `*w` behind the compiler's
    // back, which a unique reference would let it assume cannot happen.
    unsafe { (*w).offsets = o };
    let Some(tstate) = thread_state(w, config) else {
        return;
    };
    let Some(mut frame) = user::<u64>(tstate + o.tstate_frame as u64) else {
        return;
    };
    if o.cframe_current_frame != NO_FIELD && frame != 0 {
        let Some(f) = user::<u64>(frame + o.cframe_current_frame as u64) else {
            return;
        };
        frame = f;
    }
    unsafe {
        (*w).frame = frame;
        (*w).len = 0;
    }
    // Shim frames (3.12+) take steps without giving frames.
    unsafe {
        bpf_loop(
            2 * MAX_PYTHON_FRAMES as u32,
            step as *mut c_void,
            null_mut(),
            0,
        );
    }
    // Only the frames read: a whole-array copy (512 bytes) cost more than reading them.
    let len = unsafe { (*w).len } as usize;
    for i in 0..MAX_PYTHON_FRAMES {
        if i >= len {
            break;
        }
        if let (Some(dst), Some(src)) = (rec.python.get_mut(i), unsafe { (*w).frames.get(i) }) {
            // Volatile: LLVM would turn the loop back into a memcpy of the whole array.
            unsafe { write_volatile(dst, *src) };
        }
    }
    rec.python_len = len as u32;
}

/// `bpf_loop` callback: reads one frame and moves to its caller; 1 stops the loop.
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    match PY_WALK.get_ptr_mut(0) {
        Some(w) => unsafe { step_one(&mut *w) },
        None => 1,
    }
}

#[inline(always)]
fn step_one(w: &mut Walk) -> i64 {
    let frame = w.frame;
    let n = w.len as usize;
    if frame == 0 || n >= MAX_PYTHON_FRAMES {
        return 1;
    }
    let size = (w.offsets.frame_size as usize).min(FRAME_BUF);
    let Some(dst) = w.buf.get_mut(..size) else {
        return 1;
    };
    if unsafe { bpf_probe_read_user_buf(frame as *const u8, dst) }.is_err() {
        return 1;
    }
    match decode_frame(&w.buf, &w.offsets) {
        Some(FrameStep::Python(f, previous)) => {
            let Some(slot) = w.frames.get_mut(n) else {
                return 1;
            };
            *slot = f;
            w.len = n as u32 + 1;
            w.frame = previous;
            0
        }
        Some(FrameStep::Shim(previous)) => {
            if let Some(last) = n.checked_sub(1).and_then(|i| w.frames.get_mut(i)) {
                last.instr |= ENTRY_FRAME;
            }
            w.frame = previous;
            0
        }
        None => 1,
    }
}

/// The running thread's `PyThreadState`: from the map, checked against the thread id it
/// holds (a thread that exited leaves a stale entry until userspace's next scan), else
/// searched for in the interpreter's thread list and remembered.
#[inline(always)]
fn thread_state(w: *mut Walk, config: &PyConfig) -> Option<u64> {
    let fsbase_at = unsafe { bpf_get_current_task() } + config.task_fsbase;
    let fsbase: u64 = unsafe { bpf_probe_read_kernel(fsbase_at as *const u64) }.ok()?;
    if let Some(&tstate) = unsafe { PY_THREADS.get(fsbase) }
        && user::<u64>(tstate + config.offsets.tstate_thread_id as u64) == Some(fsbase)
    {
        return Some(tstate);
    }
    let interp = user::<u64>(config.interpreters_head)?;
    let head = user::<u64>(interp + config.interp_threads_head as u64)?;
    unsafe {
        (*w).cursor = head;
        (*w).tstate_next = config.tstate_next;
        (*w).fsbase = fsbase;
        (*w).found = 0;
    }
    unsafe {
        bpf_loop(MAX_THREAD_SCAN, scan_step as *mut c_void, null_mut(), 0);
    }
    let tstate = unsafe { (*w).found };
    if tstate == 0 {
        return None;
    }
    // Full map: the thread is searched for again next time; userspace's scan makes room.
    let _ = PY_THREADS.insert(fsbase, tstate, 0);
    Some(tstate)
}

/// `bpf_loop` callback: checks one thread state of the list; 1 stops the loop.
extern "C" fn scan_step(_index: u64, _ctx: *mut c_void) -> i64 {
    let Some(w) = PY_WALK.get_ptr_mut(0) else {
        return 1;
    };
    let w = unsafe { &mut *w };
    let tstate = w.cursor;
    if tstate == 0 {
        return 1;
    }
    if user::<u64>(tstate + w.offsets.tstate_thread_id as u64) == Some(w.fsbase) {
        w.found = tstate;
        return 1;
    }
    match user::<u64>(tstate + w.tstate_next as u64) {
        Some(next) => {
            w.cursor = next;
            0
        }
        None => 1,
    }
}
