//! Native stack walker: follows the unwind rows userspace built from `.eh_frame` (see
//! `memleak_common::unwind`), so stacks through code without frame pointers are whole.
//!
//! The walk runs in a `bpf_loop` callback, one frame per iteration, on a per-CPU scratch
//! record (a `StackRecord` is 3 KiB; the BPF stack is 512 bytes). [`walk`] fills its native
//! part; whoever wants Python frames fills those next; [`store`] then hashes the record into
//! its stack id and stores it in `STACKS` once.

use core::{ffi::c_void, ptr::null_mut};

use aya_ebpf::{
    bindings::{BPF_NOEXIST, pt_regs},
    helpers::{
        self, bpf_get_current_pid_tgid, bpf_get_prandom_u32,
        generated::{bpf_loop, bpf_probe_read_user, bpf_send_signal},
    },
    macros::uprobe,
    programs::ProbeContext,
};
use memleak_common::{
    MAX_NATIVE_FRAMES, StackRecord, named,
    names::programs,
    unwind::{MAX_UNWIND_MAPPINGS, UnwindControl, UnwindMapping, UnwindRow, cfa, mode},
};

use crate::{
    maps::{ROW_CACHE, STACKS, UNWIND_CONTROL, UNWIND_MAPPINGS, UNWIND_ROWS, WALK},
    python,
};

/// The per-CPU state of one walk: the record being filled and the registers of the frame
/// being unwound.
#[repr(C)]
pub(crate) struct Walk {
    rec: StackRecord,
    ip: u64,
    sp: u64,
    bp: u64,
    /// The block of the first frame's `sp`: where `window` starts.
    first_block: u64,
    control: UnwindControl,
    /// The mapping of the previous frame: callers are mostly in the same object.
    mapping: UnwindMapping,
    /// The stack's aligned blocks from the first frame's up, each read whole when the walk
    /// first needs a word of it: a read costs about the same for a word or a block, and a
    /// walk needs two words per frame. Aligned blocks never straddle a page, so a read never
    /// runs off the stack's end.
    window: [[u64; BLOCK_WORDS]; WINDOW_BLOCKS],
    /// Per window block: `UNREAD`, `READ` or `UNMAPPED`.
    block_state: [u8; WINDOW_BLOCKS],
}

/// 2048 rows (32 KiB, the largest per-CPU value), 4 ways per set: direct-mapped, the few
/// hundred call sites of an interpreter's stacks collided in pairs that every walk then
/// missed on, alternately (JSON bench: 1.7 misses per walk; 0.002 with 4 ways).
const ROW_CACHE_SETS: usize = 512;
const ROW_CACHE_WAYS: usize = 4;
/// 16 KiB: an interpreter's stacks run deep.
const WINDOW_BLOCKS: usize = 8;
/// 2 KiB blocks: on the JSON bench's 32-frame stacks they beat 1 KiB (fewer reads), which beat
/// 512 B; whole pages copied more than a shallow stack needs.
const BLOCK_SHIFT: u64 = 11;
const BLOCK_WORDS: usize = 256;
const UNREAD: u8 = 0;
const READ: u8 = 1;
const UNMAPPED: u8 = 2;

/// `CachedRow::kind` of an address outside every mapping (walks that end in JIT code or
/// on a garbage return address end there again and again).
const NOT_MAPPED: u8 = u8::MAX;

/// The row in force at `pc`, as [`find_row`] found it in the tables of `generation`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct CachedRow {
    pc: u64,
    generation: u32,
    cfa_offset: u16,
    rbp_offset: i8,
    kind: u8,
}

impl CachedRow {
    /// The cache set of `pc` (Fibonacci hashing: call sites are spread evenly).
    #[inline(always)]
    fn set(pc: u64) -> usize {
        (pc.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 55) as usize % ROW_CACHE_SETS
    }
}

/// `ROW_CACHE`'s value: rows found by earlier walks on this CPU, by address.
pub(crate) type RowCache = [[CachedRow; ROW_CACHE_WAYS]; ROW_CACHE_SETS];

const EEXIST: i32 = 17;
const SIGSTOP: u32 = 19;

/// `-c`: stops the started command at its executable's entry point, where the dynamic loader
/// has mapped its libraries and none of its own code has run yet, so userspace can put their
/// tables in place before the first allocation; userspace sends SIGCONT.
#[uprobe]
pub fn hold_at_entry(_ctx: ProbeContext) -> u32 {
    unsafe { bpf_send_signal(SIGSTOP) };
    0
}

/// Walks the user stack from the registers of a (return) probe into this CPU's scratch record
/// and returns it: native frames innermost first, starting with `regs.rip`, through the
/// tables of process slot `slot`; `python_len` 0; `truncated` 1 unless the walk reached the
/// outermost frame.
#[inline(always)]
pub fn walk(regs: *const pt_regs, slot: u32) -> Option<*mut StackRecord> {
    let w = WALK.get_ptr_mut(0)?;
    let control = *UNWIND_CONTROL.get(slot)?;
    unsafe {
        (*w).rec.tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*w).ip = (*regs).rip;
        (*w).sp = (*regs).rsp;
        (*w).first_block = (*regs).rsp >> BLOCK_SHIFT;
        (*w).block_state = [UNREAD; WINDOW_BLOCKS];
        (*w).bp = (*regs).rbp;
        (*w).control = control;
        (*w).mapping = UnwindMapping::default();
        (*w).rec.native_len = 0;
        (*w).rec.python_len = 0;
        (*w).rec.python_dropped = 0;
        (*w).rec.truncated = 1;
        bpf_loop(MAX_NATIVE_FRAMES as u32, step as *mut c_void, null_mut(), 0);
        Some(&raw mut (*w).rec)
    }
}

/// This CPU's record being filled: [`walk`] returned it.
#[inline(always)]
pub fn record() -> Option<*mut StackRecord> {
    WALK.get_ptr_mut(0).map(|w| unsafe { &raw mut (*w).rec })
}

/// The stack word at `addr`: from the window when it covers `addr`, else read alone.
#[inline(always)]
fn stack_word(w: &mut Walk, addr: u64) -> Option<u64> {
    let block = ((addr >> BLOCK_SHIFT).wrapping_sub(w.first_block)) as usize;
    if addr.is_multiple_of(8)
        && let (Some(state), Some(words)) = (w.block_state.get_mut(block), w.window.get_mut(block))
    {
        if *state == UNREAD {
            let src = (addr & !((1 << BLOCK_SHIFT) - 1)) as *const c_void;
            let size = (BLOCK_WORDS * 8) as u32;
            let ok = unsafe { bpf_probe_read_user(words.as_mut_ptr().cast(), size, src) };
            *state = if ok == 0 { READ } else { UNMAPPED };
        }
        if *state == UNMAPPED {
            return None;
        }
        return words.get((addr as usize >> 3) % BLOCK_WORDS).copied();
    }
    unsafe { helpers::bpf_probe_read_user(addr as *const u64) }.ok()
}

/// Hashes `rec` (native and Python frames) into a stack id and stores it unless a record
/// with that id is already there. `Err`: the map is full (negative errno).
#[inline(always)]
pub fn store(rec: *mut StackRecord) -> Result<i64, i32> {
    let id = unsafe { hash(&*rec) };
    // Most stacks were seen before: a lookup is cheaper than an insert that finds the key.
    if unsafe { STACKS.get(id as u64) }.is_some() {
        return Ok(id);
    }
    // By reference: a 3 KiB record copied by value would not fit the 512-byte BPF stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    match STACKS.insert(id as u64, unsafe { &*rec }, BPF_NOEXIST as u64) {
        Ok(()) => {
            let python_len = unsafe { (*rec).python_len };
            if python_len != 0 {
                python::announce(python_len);
            }
            Ok(id)
        }
        Err(e) if e == -EEXIST => Ok(id),
        Err(e) => Err(e),
    }
}

/// A 63-bit hash (a non-negative `i64`: negative stack ids are errors).
#[inline(always)]
fn hash(rec: &StackRecord) -> i64 {
    const K: u64 = 0x517c_c1b7_2722_0a95;
    let mix = |h: u64, x: u64| (h.rotate_left(5) ^ x).wrapping_mul(K);
    let mut h = mix(u64::from(rec.native_len), u64::from(rec.python_len));
    h = mix(h, u64::from(rec.tgid));
    h = mix(h, u64::from(rec.python_dropped));
    for i in 0..MAX_NATIVE_FRAMES {
        if i >= rec.native_len as usize {
            break;
        }
        h = mix(h, rec.native[i]);
    }
    for i in 0..rec.python.len() {
        if i >= rec.python_len as usize {
            break;
        }
        h = mix(mix(h, rec.python[i].code), rec.python[i].instr);
    }
    (h >> 1) as i64
}

/// `bpf_loop` callback: unwinds one frame; 1 stops the loop.
extern "C" fn step(_index: u64, _ctx: *mut c_void) -> i64 {
    match WALK.get_ptr_mut(0) {
        Some(w) => unsafe { unwind_one(&mut *w) },
        None => 1,
    }
}

/// Where the caller's registers are: its stack pointer (the CFA) and where the caller's rbp
/// was saved (bytes from the CFA; 0: not saved, rbp is unchanged).
struct Frame {
    cfa: u64,
    rbp_at: i64,
}

/// Records the current frame and moves `w` to its caller. Returns 1 to stop.
#[inline(always)]
fn unwind_one(w: &mut Walk) -> i64 {
    let n = w.rec.native_len as usize;
    let Some(slot) = w.rec.native.get_mut(n) else {
        return 1;
    };
    *slot = w.ip;
    w.rec.native_len = n as u32 + 1;
    // Callers' addresses are return addresses: look up the call instruction, which may be
    // the last of its function. The first frame's registers are exact at `ip` itself.
    let pc = if n == 0 { w.ip } else { w.ip - 1 };
    let row = if w.control.mode == mode::FRAME_POINTER {
        NO_INFO
    } else {
        match find_row(w, pc) {
            Some(row) => row,
            // Not in any mapping we have a table for (a library loaded since the last
            // refresh, JIT code): stop, the record stays truncated.
            None => return 1,
        }
    };
    match caller_frame(w, row) {
        Some(frame) => move_to_caller(w, frame),
        None => 1,
    }
}

/// Where `row` puts the current frame's caller; `None` to stop (at the outermost frame,
/// `truncated` cleared).
#[inline(always)]
fn caller_frame(w: &mut Walk, row: UnwindRow) -> Option<Frame> {
    let offset = u64::from(row.cfa_offset) * 8;
    let rbp_at = i64::from(row.rbp_offset) * 8;
    match row.kind {
        cfa::RSP => Some(Frame {
            cfa: w.sp + offset,
            rbp_at,
        }),
        cfa::RBP => Some(Frame {
            cfa: w.bp + offset,
            rbp_at,
        }),
        cfa::PLT => {
            let pushed = if w.ip & 15 >= u64::from(row.cfa_offset) {
                16
            } else {
                8
            };
            Some(Frame {
                cfa: w.sp + pushed,
                rbp_at: 0,
            })
        }
        // The frame-pointer chain ends with rbp = 0 (the ABI's outermost frame).
        cfa::NO_INFO if w.bp != 0 => Some(Frame {
            cfa: w.bp + 16,
            rbp_at: -16,
        }),
        cfa::NO_INFO | cfa::OUTERMOST => {
            w.rec.truncated = 0;
            None
        }
        _ => None,
    }
}

/// Reads the caller's return address (and saved rbp) at `frame` and makes it the current
/// frame. Returns 1 to stop.
#[inline(always)]
fn move_to_caller(w: &mut Walk, frame: Frame) -> i64 {
    // The caller's frame is above this one: anything else is a corrupt stack or a bad rule.
    if frame.cfa <= w.sp {
        return 1;
    }
    let Some(ra) = stack_word(w, frame.cfa - 8) else {
        return 1;
    };
    if frame.rbp_at != 0 {
        match stack_word(w, frame.cfa.wrapping_add_signed(frame.rbp_at)) {
            Some(bp) => w.bp = bp,
            None => return 1,
        }
    }
    w.sp = frame.cfa;
    w.ip = ra;
    if ra == 0 {
        w.rec.truncated = 0;
        return 1;
    }
    0
}

const NO_INFO: UnwindRow = UnwindRow {
    pc: 0,
    cfa_offset: 0,
    rbp_offset: 0,
    kind: cfa::NO_INFO,
};

/// The row in force at `pc`; `NO_INFO` where the mapping has no row for it; `None` outside
/// every known mapping. Through this CPU's cache.
#[inline(always)]
fn find_row(w: &mut Walk, pc: u64) -> Option<UnwindRow> {
    let generation = w.control.generation;
    let cache = unsafe { &mut *ROW_CACHE.get_ptr_mut(0)? };
    let set = cache.get_mut(CachedRow::set(pc))?;
    for slot in set.iter() {
        if slot.pc == pc && slot.generation == generation {
            if slot.kind == NOT_MAPPED {
                return None;
            }
            return Some(UnwindRow {
                pc: 0,
                cfa_offset: slot.cfa_offset,
                rbp_offset: slot.rbp_offset,
                kind: slot.kind,
            });
        }
    }
    let row = search_row(w, pc);
    let r = row.unwrap_or(UnwindRow {
        kind: NOT_MAPPED,
        ..NO_INFO
    });
    // Random replacement: no state to keep, and no access pattern thrashes it.
    let way = unsafe { bpf_get_prandom_u32() } as usize % ROW_CACHE_WAYS;
    if let Some(slot) = set.get_mut(way) {
        *slot = CachedRow {
            pc,
            generation,
            cfa_offset: r.cfa_offset,
            rbp_offset: r.rbp_offset,
            kind: r.kind,
        };
    }
    row
}

/// [`find_row`] without the cache: two binary searches.
#[inline(always)]
fn search_row(w: &mut Walk, pc: u64) -> Option<UnwindRow> {
    if !(w.mapping.start <= pc && pc < w.mapping.end) {
        w.mapping = find_mapping(&w.control, pc)?;
    }
    let m = w.mapping;
    let rel = pc.wrapping_sub(m.bias);
    if m.row_count == 0 || rel > u64::from(u32::MAX) {
        return Some(NO_INFO);
    }
    // The last row with `pc <= rel`: 21 halvings cover MAX_UNWIND_ROWS.
    let mut s = Search {
        key: rel,
        lo: m.first_row,
        hi: m.first_row.saturating_add(m.row_count),
    };
    search(&mut s, 21, row_step);
    if s.lo == m.first_row {
        return Some(NO_INFO);
    }
    UNWIND_ROWS.get(s.lo.wrapping_sub(1)).copied()
}

/// The current table's mapping that contains `pc`.
#[inline(always)]
fn find_mapping(control: &UnwindControl, pc: u64) -> Option<UnwindMapping> {
    // 11 halvings cover MAX_UNWIND_MAPPINGS.
    let mut s = Search {
        key: pc,
        lo: control.base,
        hi: control.base + control.count.min(MAX_UNWIND_MAPPINGS),
    };
    search(&mut s, 11, mapping_step);
    if s.lo == control.base {
        return None;
    }
    let m = *UNWIND_MAPPINGS.get(s.lo.wrapping_sub(1))?;
    (pc < m.end).then_some(m)
}

/// A binary search over `[lo, hi)` of a map for the first index whose value is above `key`.
/// It runs one halving per `bpf_loop` callback: unrolled, every halving doubled the paths
/// the verifier walks.
#[repr(C)]
struct Search {
    key: u64,
    lo: u32,
    hi: u32,
}

#[inline(always)]
fn search(s: &mut Search, steps: u32, step: extern "C" fn(u64, *mut Search) -> i64) {
    unsafe { bpf_loop(steps, step as *mut c_void, (s as *mut Search).cast(), 0) };
}

extern "C" fn row_step(_index: u64, s: *mut Search) -> i64 {
    halve(unsafe { &mut *s }, |i| {
        UNWIND_ROWS.get(i).map(|r| u64::from(r.pc))
    })
}

extern "C" fn mapping_step(_index: u64, s: *mut Search) -> i64 {
    halve(unsafe { &mut *s }, |i| {
        UNWIND_MAPPINGS.get(i).map(|m| m.start)
    })
}

/// One halving; 1 stops the loop.
#[inline(always)]
fn halve(s: &mut Search, value_at: impl Fn(u32) -> Option<u64>) -> i64 {
    if s.lo >= s.hi {
        return 1;
    }
    let mid = s.lo + (s.hi - s.lo) / 2;
    match value_at(mid) {
        Some(v) if v <= s.key => s.lo = mid + 1,
        Some(_) => s.hi = mid,
        None => return 1,
    }
    0
}

named!(hold_at_entry = programs::HOLD_AT_ENTRY);
