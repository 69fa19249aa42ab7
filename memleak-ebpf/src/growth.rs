//! `--mode growth` (programs named for their tracepoints): which code makes the process's memory grow, with no uprobes, so nothing
//! is added to the target's allocation path; only tracepoints the kernel passes anyway.
//!
//! - Resident memory: the first *write* fault on a page records the page in `ALLOCS` (keyed
//!   by its address) with the stack that touched it, whether the write came from user code or
//!   from the kernel on the process's behalf (a read(2) into a fresh buffer). A read of a
//!   fresh anonymous page maps the shared zero page and costs no memory, so reads are skipped.
//! - Address space: anonymous mmap, mremap and brk growth go to `MMAPS` with the stack of the
//!   system call, as the allocation mode records libc's mmap.
//! - munmap, a brk shrink, mremap and MADV_DONTNEED/FREE/REMOVE take both back; mremap moves
//!   the pages it keeps.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel,
        generated::{bpf_for_each_map_elem, bpf_get_current_task_btf, bpf_loop, bpf_task_pt_regs},
    },
    macros::tracepoint,
    programs::TracePointContext,
};
use memleak_common::{
    AllocInfo, AllocKind, Counter, MAP_ANONYMOUS, Traced,
    growth::{FAULT_ADDRESS, FAULT_ERROR_CODE, SYSCALL_ARGS, SYSCALL_RET},
    named,
    names::programs,
};

use crate::{
    PAGE_SIZE,
    bookkeeping::{Table, count, page_align, release, stack_id, store_as, unmap, wanted},
    global,
    kernel::field,
    maps::{ALLOCS, BRK, MMAPS, SYSCALLS, TRACED, USER_REGS},
    python, unwind,
};

/// A memory system call between its enter and exit tracepoints, keyed by pid_tgid.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct Syscall {
    a: u64,
    b: u64,
    c: u64,
}

/// The process in `slot` exec'd: its old break means nothing in the new program.
#[inline(always)]
pub fn forget_break(slot: u32) {
    if let Some(cur) = BRK.get_ptr_mut(slot) {
        unsafe { *cur = 0 };
    }
}

const MAP_FIXED: u64 = 0x10;
const PROT_NONE: u64 = 0;
/// x86 page-fault error code: the access was a write.
const PF_WRITE: u64 = 1 << 1;
/// madvise advice that gives pages back: DONTNEED, FREE, REMOVE, DONTNEED_LOCKED.
const MADV_RELEASES: [u64; 4] = [4, 8, 9, 24];
/// Ranges up to this many pages are walked page by page; larger ones scan `ALLOCS` instead.
const MAX_PAGE_LOOP: u64 = 1 << 16;

/// The calling process's entry in `TRACED`, if it is traced. Its pages and mappings are
/// keyed with its slot (`Traced::key`): forked processes map the same addresses.
#[inline(always)]
fn traced() -> Option<Traced> {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    unsafe { TRACED.get(tgid) }.copied()
}

#[inline(always)]
fn arg(ctx: &TracePointContext, n: u32) -> u64 {
    field(ctx, SYSCALL_ARGS + 8 * n).unwrap_or(0)
}

/// The value a memory syscall returned, `None` for an error (−4095..−1).
#[inline(always)]
fn returned(ctx: &TracePointContext) -> Option<u64> {
    let ret: u64 = field(ctx, SYSCALL_RET)?;
    (ret < (-4095i64) as u64).then_some(ret)
}

/// Parks the arguments of a traced thread's syscall until its exit tracepoint.
#[inline(always)]
fn park(call: Syscall) {
    if SYSCALLS
        .insert(bpf_get_current_pid_tgid(), call, 0)
        .is_err()
    {
        count(Counter::InflightFull);
    }
}

#[inline(always)]
fn unpark() -> Option<Syscall> {
    let id = bpf_get_current_pid_tgid();
    let call = unsafe { SYSCALLS.get(id) }.copied()?;
    let _ = SYSCALLS.remove(id);
    Some(call)
}

/// The id of the current thread's user stack (native and Python frames), taken from the
/// registers the kernel saved when the thread entered it. A fault's instruction pointer is
/// the faulting instruction itself; it is stored one byte further, as a return address, since
/// the symbolizer looks up every address one byte back.
// Not inlined: with the walk's locals in its frame, sys_exit_mremap's would pass the
// 512-byte BPF stack.
#[inline(never)]
fn user_stack(slot: u32, faulting_ip: bool) -> i64 {
    stack_id(slot, walk_user(slot, faulting_ip))
}

#[inline(always)]
fn walk_user(slot: u32, faulting_ip: bool) -> Result<i64, i32> {
    let regs = USER_REGS.get_ptr_mut(0).ok_or(-1)?;
    unsafe {
        let saved = bpf_task_pt_regs(bpf_get_current_task_btf()) as *const pt_regs;
        *regs = bpf_probe_read_kernel(saved)?;
    }
    let rec = unwind::walk(regs, slot).ok_or(-1)?;
    if faulting_ip {
        unsafe { (*rec).native[0] += 1 };
    }
    python::read_frames(rec, slot);
    unwind::store(rec)
}

// ---------------------------------------------------------------------------------------------
// Resident pages

#[tracepoint]
pub fn page_fault_user(ctx: TracePointContext) -> u32 {
    fault(&ctx);
    0
}

/// The kernel writing to a user address on the process's behalf (copy_to_user, clear_user).
#[tracepoint]
pub fn page_fault_kernel(ctx: TracePointContext) -> u32 {
    fault(&ctx);
    0
}

#[inline(always)]
fn fault(ctx: &TracePointContext) {
    let Some(p) = traced() else {
        return;
    };
    let (Some(addr), Some(code)) = (
        field::<u64>(ctx, FAULT_ADDRESS),
        field::<u64>(ctx, FAULT_ERROR_CODE),
    ) else {
        return;
    };
    // User addresses are the lower canonical half; kernel faults on kernel memory are not ours.
    if code & PF_WRITE == 0 || addr >> 63 != 0 {
        return;
    }
    let size = global(&PAGE_SIZE);
    let page = p.key(addr & !(size - 1));
    // Counted already: a second write fault on the page (copy-on-write after a fork).
    if unsafe { ALLOCS.get(page) }.is_some() || !wanted(size) {
        return;
    }
    store_as(
        p,
        Table::Map(&ALLOCS),
        page,
        size,
        AllocKind::PageFault,
        user_stack(p.slot, true),
        0,
    );
}

/// Pages in [lo, hi) leave `ALLOCS`; when `to` differs from `lo` (an mremap that moved), the
/// ones below `keep` move to `to + (page − lo)` instead.
#[repr(C)]
struct Pages {
    lo: u64,
    hi: u64,
    keep: u64,
    to: u64,
    page: u64,
}

fn move_pages(r: &mut Pages) {
    // checked: a division the compiler cannot prove safe becomes a panic the verifier rejects.
    let n = (r.hi.saturating_sub(r.lo)).checked_div(r.page).unwrap_or(0);
    if n == 0 {
        return;
    }
    let ctx = r as *mut Pages as *mut c_void;
    unsafe {
        if n <= MAX_PAGE_LOOP {
            bpf_loop(n as u32, page_step as *mut c_void, ctx, 0);
        } else {
            // Cheaper than the pages one by one. A page moved during the scan may be visited
            // again at its new address, which lies outside [lo, hi) and is left alone.
            bpf_for_each_map_elem(
                &raw const ALLOCS as *mut c_void,
                page_elem as *mut c_void,
                ctx,
                0,
            );
        }
    }
}

extern "C" fn page_step(index: u64, r: *mut Pages) -> i64 {
    let r = unsafe { &*r };
    move_page(r, r.lo + index * r.page);
    0
}

extern "C" fn page_elem(
    _map: *mut c_void,
    key: *const u64,
    _val: *const AllocInfo,
    r: *mut Pages,
) -> u64 {
    unsafe { move_page(&*r, *key) };
    0
}

#[inline(always)]
fn move_page(r: &Pages, page: u64) {
    if page < r.lo || page >= r.hi {
        return;
    }
    let Some(info) = (unsafe { ALLOCS.get(page) }).copied() else {
        return;
    };
    let _ = ALLOCS.remove(page);
    if r.to != r.lo && page < r.keep {
        if ALLOCS.insert(r.to + (page - r.lo), info, 0).is_err() {
            count(Counter::AllocsFull);
        }
    } else {
        count(Counter::Released);
    }
}

/// [lo, hi) (block keys) is gone from the address space: its mappings and its pages (only whole pages
/// leave: a brk shrink to mid-page keeps that page).
fn forget(lo: u64, hi: u64) {
    if hi <= lo {
        return;
    }
    unmap(lo, hi - lo);
    let mut r = Pages {
        lo: page_align(lo),
        hi: page_align(hi),
        keep: 0,
        to: 0,
        page: global(&PAGE_SIZE),
    };
    r.to = r.lo;
    move_pages(&mut r);
}

// ---------------------------------------------------------------------------------------------
// Address space

#[tracepoint]
pub fn sys_enter_mmap(ctx: TracePointContext) -> u32 {
    if traced().is_some() {
        park(Syscall {
            a: page_align(arg(&ctx, 1)),
            b: arg(&ctx, 3),
            c: arg(&ctx, 2),
        });
    }
    0
}

#[tracepoint]
pub fn sys_exit_mmap(ctx: TracePointContext) -> u32 {
    let Some(p) = traced() else {
        return 0;
    };
    let (
        Some(Syscall {
            a: len,
            b: flags,
            c: prot,
        }),
        Some(addr),
    ) = (unpark(), returned(&ctx))
    else {
        return 0;
    };
    let addr = p.key(addr);
    // MAP_FIXED replaced whatever was mapped there.
    if flags & MAP_FIXED != 0 {
        forget(addr, addr + len);
    }
    // Anonymous memory only; a PROT_NONE reservation is not memory yet.
    if flags & MAP_ANONYMOUS != 0 && prot != PROT_NONE && wanted(len) {
        store_as(
            p,
            Table::Map(&MMAPS),
            addr,
            len,
            AllocKind::Mmap,
            user_stack(p.slot, false),
            0,
        );
    }
    0
}

#[tracepoint]
pub fn sys_enter_munmap(ctx: TracePointContext) -> u32 {
    if let Some(p) = traced() {
        let addr = p.key(arg(&ctx, 0));
        forget(addr, addr + page_align(arg(&ctx, 1)));
    }
    0
}

#[tracepoint]
pub fn sys_enter_madvise(ctx: TracePointContext) -> u32 {
    if let Some(p) = traced()
        && MADV_RELEASES.contains(&arg(&ctx, 2))
    {
        let start = p.key(arg(&ctx, 0));
        let mut r = Pages {
            lo: start,
            hi: start + page_align(arg(&ctx, 1)),
            keep: 0,
            to: start,
            page: global(&PAGE_SIZE),
        };
        move_pages(&mut r);
    }
    0
}

#[tracepoint]
pub fn sys_enter_mremap(ctx: TracePointContext) -> u32 {
    if traced().is_some() {
        park(Syscall {
            a: arg(&ctx, 0),
            b: page_align(arg(&ctx, 1)),
            c: page_align(arg(&ctx, 2)),
        });
    }
    0
}

#[tracepoint]
pub fn sys_exit_mremap(ctx: TracePointContext) -> u32 {
    let Some(p) = traced() else {
        return 0;
    };
    let (
        Some(Syscall {
            a: old,
            b: old_len,
            c: new_len,
        }),
        Some(new),
    ) = (unpark(), returned(&ctx))
    else {
        return 0;
    };
    let (old, new) = (p.key(old), p.key(new));
    // Resident pages stay resident: those the new size keeps move with the mapping.
    let mut r = Pages {
        lo: old,
        hi: old + old_len,
        keep: old + new_len.min(old_len),
        to: new,
        page: global(&PAGE_SIZE),
    };
    if new == old {
        r.lo = r.keep;
        r.to = r.keep;
    }
    move_pages(&mut r);
    // A tracked mapping is now the mremap caller's, at its new size.
    if unsafe { MMAPS.get(old) }.is_some() {
        release(Table::Map(&MMAPS), old, AllocKind::Mremap);
        store_as(
            p,
            Table::Map(&MMAPS),
            new,
            new_len,
            AllocKind::Mremap,
            user_stack(p.slot, false),
            old,
        );
    }
    0
}

/// brk returns the new break (the old one when it fails), so the exit alone says it all.
#[tracepoint]
pub fn sys_exit_brk(ctx: TracePointContext) -> u32 {
    let Some(p) = traced() else {
        return 0;
    };
    let (Some(new), Some(cur)) = (field::<u64>(&ctx, SYSCALL_RET), BRK.get_ptr_mut(p.slot)) else {
        return 0;
    };
    let old = unsafe { core::ptr::replace(cur, new) };
    if old == 0 || new == old {
        return 0;
    }
    if new < old {
        forget(p.key(new), p.key(old));
    } else if wanted(new - old) {
        store_as(
            p,
            Table::Map(&MMAPS),
            p.key(old),
            new - old,
            AllocKind::Brk,
            user_stack(p.slot, false),
            0,
        );
    }
    0
}

named!(
    page_fault_user = programs::PAGE_FAULT_USER,
    page_fault_kernel = programs::PAGE_FAULT_KERNEL,
    sys_enter_mmap = programs::SYS_ENTER_MMAP,
    sys_exit_mmap = programs::SYS_EXIT_MMAP,
    sys_enter_munmap = programs::SYS_ENTER_MUNMAP,
    sys_enter_madvise = programs::SYS_ENTER_MADVISE,
    sys_enter_mremap = programs::SYS_ENTER_MREMAP,
    sys_exit_mremap = programs::SYS_EXIT_MREMAP,
    sys_exit_brk = programs::SYS_EXIT_BRK,
);
