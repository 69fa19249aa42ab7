//! Python frames of the allocating thread: (code object, instruction) pairs read from the
//! CPython frame chain, which userspace turns into file, function and line.
//!
//! The thread's `PyThreadState` comes from `PY_THREADS`, which userspace keeps keyed by each
//! thread's pthread_t; on x86-64 that is the thread's fs_base, which the kernel keeps in
//! `task_struct` (offset from the kernel BTF, in `PY_CONFIG`). A thread started since
//! userspace last scanned has no Python frames until the next scan.

use aya_ebpf::{
    helpers::{bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user},
    macros::map,
    maps::{Array, HashMap},
};
use memleak_common::{
    MAX_PYTHON_FRAMES, PyFrame, StackRecord,
    python::{
        ENTRY_FRAME, EntryMarker, FRAME_OWNED_BY_CSTACK, MAX_PY_THREADS, NO_FIELD, PyConfig,
        PyOffsets, instr_offset,
    },
};

/// Written by userspace once it finds CPython in the target; zero until then.
#[map]
static PY_CONFIG: Array<PyConfig> = Array::with_max_entries(1, 0);
/// fs_base (pthread_t) → `PyThreadState` address.
#[map]
static PY_THREADS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_PY_THREADS, 0);

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
    let Some(tstate) = thread_state(&o, config.task_fsbase) else {
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
    let mut n = 0usize;
    // Shim frames (3.12+) take steps without giving frames.
    for _ in 0..2 * MAX_PYTHON_FRAMES {
        if frame == 0 || n >= MAX_PYTHON_FRAMES {
            break;
        }
        let (Some(code), Some(previous)) = (
            user::<u64>(frame + o.frame_code as u64),
            user::<u64>(frame + o.frame_previous as u64),
        ) else {
            break;
        };
        let instr = if o.entry_marker == EntryMarker::EveryFrame as u32 {
            user::<u32>(frame + o.frame_instr as u64).unwrap_or(u32::MAX) as u64 | ENTRY_FRAME
        } else {
            let marker = user::<u8>(frame + o.frame_marker as u64).unwrap_or(0);
            if o.entry_marker == EntryMarker::CStackShim as u32 && marker == FRAME_OWNED_BY_CSTACK {
                if n > 0 {
                    if let Some(last) = rec.python.get_mut(n - 1) {
                        last.instr |= ENTRY_FRAME;
                    }
                }
                frame = previous;
                continue;
            }
            let ptr = user::<u64>(frame + o.frame_instr as u64).unwrap_or(0);
            let entry = o.entry_marker == EntryMarker::IsEntry as u32 && marker != 0;
            instr_offset(ptr, code, o.code_adaptive) | if entry { ENTRY_FRAME } else { 0 }
        };
        if let Some(slot) = rec.python.get_mut(n) {
            *slot = PyFrame { code, instr };
        }
        n += 1;
        frame = previous;
    }
    rec.python_len = n as u32;
}

/// The running thread's `PyThreadState`, checked against the thread id it holds (a thread
/// that exited leaves a stale entry until the next scan).
#[inline(always)]
fn thread_state(o: &PyOffsets, task_fsbase: u64) -> Option<u64> {
    let fsbase_at = unsafe { bpf_get_current_task() } + task_fsbase;
    let fsbase: u64 = unsafe { bpf_probe_read_kernel(fsbase_at as *const u64) }.ok()?;
    let tstate = *unsafe { PY_THREADS.get(&fsbase) }?;
    (user::<u64>(tstate + o.tstate_thread_id as u64)? == fsbase).then_some(tstate)
}
