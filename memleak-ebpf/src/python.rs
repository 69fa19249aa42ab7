//! Python frames of the allocating thread: (code object, instruction) pairs read from the
//! CPython frame chain, which userspace turns into file, function and line.
//!
//! Each process has its own `PY_CONFIG` entry (by slot): two processes may run two
//! interpreters. The thread's `PyThreadState` comes from `PY_THREADS`, which userspace keeps
//! keyed by each thread's pthread_t with its process slot; on x86-64 that is the thread's fs_base, which the kernel keeps in
//! `task_struct` (offset from the kernel BTF, in `PY_CONFIG`). A thread started since
//! userspace last scanned is searched for in the interpreter's thread list and added.

use core::{ffi::c_void, ptr::null_mut};

use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_get_current_task, bpf_probe_read_kernel, bpf_probe_read_user,
    bpf_probe_read_user_buf,
    generated::{self, bpf_loop},
};

use memleak_common::{
    Counter, MAX_PYTHON_FRAMES, MAX_PYTHON_STEPS, PYTHON_DROPPED_MORE, StackRecord, Traced,
    python::{
        CodeWindow, ENTRY_FRAME, FRAME_BUF, FrameStep, MAX_THREAD_SCAN, NO_FIELD, NewPythonCode,
        PyConfig, PyOffsets, SeenCode, code_identity, decode_frame,
    },
};

use crate::{
    bookkeeping::count,
    maps::{PY_CODES_SEEN, PY_CONFIG, PY_NEW_CODES, PY_THREADS, PY_WALK},
    unwind,
};

/// The per-CPU state of one walk; the frames go straight into the walk's record.
#[repr(C)]
pub(crate) struct Walk {
    /// The bytes `announce` reads of a code object.
    buf: [u8; FRAME_BUF],
    /// Aligned blocks of the target's memory read during this walk, each whole: a read costs
    /// about the same for a word or a block, and 3.11+ frames sit together in the thread's
    /// data stack, so one read serves several frames. A block never straddles a page, so
    /// whatever holds a readable field is readable whole.
    blocks: [[u64; BLOCK_WORDS]; BLOCKS],
    /// Per block: its address >> `BLOCK_SHIFT`, plus 1 (0: empty).
    tags: [u64; BLOCKS],
    /// The block the next miss replaces (round robin).
    victim: u32,
    offsets: PyOffsets,
    /// The next frame to read.
    frame: u64,
    len: u32,
    /// Frames past `MAX_PYTHON_FRAMES`, only counted.
    dropped: u32,
    tstate_next: u32,
    /// Thread search: the fs_base sought, the next thread state, the one found.
    fsbase: u64,
    cursor: u64,
    found: u64,
    /// Where the code objects' identities lie, for `announce`.
    code_window: CodeWindow,
}

/// 2 KiB blocks, four of them per walk: 40 frames deep in 3.11's data stack they took ≈9% off
/// the return probe's time against 1 KiB (fewer reads; a read costs much the same either way).
const BLOCK_SHIFT: u64 = 11;
const BLOCK_WORDS: usize = 256;
const BLOCKS: usize = 4;

/// The aligned word of the target's memory that holds `addr`, shifted so that the byte at
/// `addr` is the lowest: through this walk's blocks, reading the block on a miss.
#[inline(always)]
fn word(w: &mut Walk, addr: u64) -> Option<u64> {
    let slot = block_of(w, addr)?;
    let words = w.blocks.get(slot)?;
    let v = *words.get((addr >> 3) as usize % BLOCK_WORDS)?;
    Some(v >> ((addr & 7) * 8))
}

/// The index in `w.blocks` of the block that holds `addr`, read on a miss.
#[inline(always)]
fn block_of(w: &mut Walk, addr: u64) -> Option<usize> {
    let tag = (addr >> BLOCK_SHIFT) + 1;
    let mut slot = BLOCKS;
    for (i, t) in w.tags.iter().enumerate() {
        if *t == tag {
            slot = i;
        }
    }
    if slot == BLOCKS {
        slot = w.victim as usize % BLOCKS;
        w.victim = w.victim.wrapping_add(1);
        let block = w.blocks.get_mut(slot)?;
        let src = (addr & !((1 << BLOCK_SHIFT) - 1)) as *const c_void;
        let size = (BLOCK_WORDS * 8) as u32;
        let ok = unsafe { generated::bpf_probe_read_user(block.as_mut_ptr().cast(), size, src) };
        let tag = if ok == 0 { tag } else { 0 };
        *w.tags.get_mut(slot)? = tag;
        if tag == 0 {
            return None;
        }
    }
    Some(slot % BLOCKS)
}

/// Decodes the frame at `frame` (8-aligned). A frame inside one block (most: its fields lie
/// in its first `frame_size` bytes) takes them straight from that block, looked up once, not
/// once per field (≈5% of the return probe's time 40 frames deep).
#[inline(always)]
fn decode(w: &mut Walk, frame: u64) -> Option<FrameStep> {
    let offsets = w.offsets;
    let last = frame.wrapping_add(u64::from(offsets.frame_size.max(1)) - 1);
    if frame >> BLOCK_SHIFT != last >> BLOCK_SHIFT {
        return decode_frame(&offsets, |at| word(w, frame + u64::from(at)));
    }
    let slot = block_of(w, frame)?;
    let words = w.blocks.get(slot)?;
    decode_frame(&offsets, |at| {
        let addr = frame + u64::from(at);
        let v = *words.get((addr >> 3) as usize % BLOCK_WORDS)?;
        Some(v >> ((addr & 7) * 8))
    })
}

/// Hands userspace the code objects of the walk's record, a stack with `python_len` Python
/// frames just stored, that it was not handed before with the identity they have now.
#[inline(always)]
pub fn announce(python_len: u32) {
    // Rare (a new stack with Python frames): the process's slot is looked up again.
    let slot = crate::process::current().slot;
    let (Some(config), Some(w)) = (PY_CONFIG.get(slot), PY_WALK.get_ptr_mut(0)) else {
        return;
    };
    unsafe {
        (*w).code_window = config.code_window;
        let frames = python_len.min(MAX_PYTHON_FRAMES as u32);
        bpf_loop(frames, announce_step as *mut c_void, null_mut(), 0);
    }
}

/// `bpf_loop` callback: announces the `index`th frame's code object if it is new.
extern "C" fn announce_step(index: u64, _ctx: *mut c_void) -> i64 {
    match (PY_WALK.get_ptr_mut(0), unwind::record()) {
        (Some(w), Some(rec)) => unsafe { announce_one(&mut *w, &*rec, index as usize) },
        _ => 1,
    }
}

#[inline(always)]
fn announce_one(w: &mut Walk, rec: &StackRecord, index: usize) -> i64 {
    let Some(frame) = rec.python.get(index) else {
        return 1;
    };
    let window = w.code_window;
    let Some(dst) = w.buf.get_mut(..(window.len as usize).min(FRAME_BUF)) else {
        return 1;
    };
    let at = frame.code.wrapping_add(window.start as u64);
    if unsafe { bpf_probe_read_user_buf(at as *const u8, dst) }.is_err() {
        return 0;
    }
    let identity = code_identity(&w.buf, window.len);
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let key = SeenCode {
        tgid,
        _pad: 0,
        code: frame.code,
    };
    if unsafe { PY_CODES_SEEN.get(key) } == Some(&identity) {
        return 0;
    }
    let Some(mut entry) = PY_NEW_CODES.reserve::<NewPythonCode>(0) else {
        // Not remembered as seen: the next new stack with it tries again.
        count(Counter::PythonCodesDropped);
        return 0;
    };
    entry.write(NewPythonCode {
        tgid,
        _pad: 0,
        code: frame.code,
    });
    entry.submit(0);
    let _ = PY_CODES_SEEN.insert(key, identity, 0);
    0
}

/// The pointer-sized field at `addr` (aligned, or it is not one), through the walk's blocks.
#[inline(always)]
fn pointer(w: *mut Walk, addr: u64) -> Option<u64> {
    if !addr.is_multiple_of(8) {
        return None;
    }
    word(unsafe { &mut *w }, addr)
}

#[inline(always)]
fn user<T>(addr: u64) -> Option<T> {
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// Fills `rec.python` with the current thread's Python frames, innermost first, each run of
/// one evaluator activation ending with an `ENTRY_FRAME` mark, and counts the outer frames
/// past the cap in `rec.python_dropped`. Leaves `python_len` 0 when the target runs no Python
/// or the thread has no frames. `rec` is the walk's record (`unwind::record`).
#[inline(always)]
pub fn read_frames(rec: *mut StackRecord, slot: u32) {
    unsafe {
        (*rec).python_len = 0;
        (*rec).python_dropped = 0;
    }
    let Some(config) = PY_CONFIG.get(slot) else {
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
    unsafe {
        (*w).offsets = o;
        (*w).tags = [0; BLOCKS];
    }
    let Some(tstate) = thread_state(w, config, Traced { slot, execs: 0 }) else {
        return;
    };
    let Some(mut frame) = pointer(w, tstate + o.tstate_frame as u64) else {
        return;
    };
    if o.cframe_current_frame != NO_FIELD && frame != 0 {
        let Some(f) = pointer(w, frame + o.cframe_current_frame as u64) else {
            return;
        };
        frame = f;
    }
    unsafe {
        (*w).frame = frame;
        (*w).len = 0;
        (*w).dropped = 0;
        bpf_loop(MAX_PYTHON_STEPS, step as *mut c_void, null_mut(), 0);
        // Frames left: the chain goes on past the steps taken.
        let more = if (*w).frame != 0 {
            PYTHON_DROPPED_MORE
        } else {
            0
        };
        (*rec).python_len = (*w).len;
        (*rec).python_dropped = (*w).dropped | more;
    }
}

/// `bpf_loop` callback: reads one frame and moves to its caller; 1 stops the loop.
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    match (PY_WALK.get_ptr_mut(0), unwind::record()) {
        (Some(w), Some(rec)) => unsafe { step_one(&mut *w, &mut *rec) },
        _ => 1,
    }
}

#[inline(always)]
fn step_one(w: &mut Walk, rec: &mut StackRecord) -> i64 {
    let frame = w.frame;
    // Frames are 8-byte aligned: anything else is not a frame.
    if frame == 0 || !frame.is_multiple_of(8) {
        return 1;
    }
    let n = w.len as usize;
    match decode(w, frame) {
        Some(FrameStep::Python(f, previous)) => {
            match rec.python.get_mut(n) {
                Some(slot) => {
                    *slot = f;
                    w.len = n as u32 + 1;
                }
                None => w.dropped += 1,
            }
            w.frame = previous;
            0
        }
        Some(FrameStep::Shim(previous)) => {
            // Past the cap the mark has no frame to go on. The mask is for the verifier (LLVM
            // folds a `checked_sub` bound into an offset it cannot follow).
            if w.dropped == 0
                && n > 0
                && let Some(last) = rec.python.get_mut((n - 1) % MAX_PYTHON_FRAMES)
            {
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
fn thread_state(w: *mut Walk, config: &PyConfig, p: Traced) -> Option<u64> {
    let fsbase_at = unsafe { bpf_get_current_task() } + config.task_fsbase;
    let fsbase: u64 = unsafe { bpf_probe_read_kernel(fsbase_at as *const u64) }.ok()?;
    if let Some(&tstate) = unsafe { PY_THREADS.get(p.key(fsbase)) }
        && pointer(w, tstate + config.offsets.tstate_thread_id as u64) == Some(fsbase)
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
    let _ = PY_THREADS.insert(p.key(fsbase), tstate, 0);
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
