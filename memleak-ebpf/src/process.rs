//! What a traced process does to itself: an exec replaces its program, so everything the old
//! program held is gone. Each allocation carries the exec count it was made under, which lets
//! userspace drop those of an earlier program. An exiting thread frees its in-flight slot.
//! Every traced process has its entry in `TRACED`, by tgid.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use memleak_common::{Traced, UNKNOWN_SLOT, named, names::programs};

use crate::{forget_thread, growth, maps::TRACED};

#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    let Some(traced) = TRACED.get_ptr_mut((id >> 32) as u32) else {
        return 0;
    };
    unsafe { (*traced).execs += 1 };
    // Whatever call the old program had in flight on this thread is gone with it.
    forget_thread(id);
    growth::forget_break(unsafe { (*traced).slot });
    0
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if unsafe { TRACED.get((id >> 32) as u32) }.is_some() {
        forget_thread(id);
    }
    0
}

/// The calling process's slot and exec count (slot 0, no exec when it is not in `TRACED`:
/// kernel mode).
#[inline(always)]
pub(crate) fn current() -> Traced {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    unsafe { TRACED.get(tgid) }.copied().unwrap_or_default()
}

/// The calling process's slot, `UNKNOWN_SLOT` when it is not in `TRACED` (kernel mode, or a
/// process whose entry is gone): the `COUNTERS` row its losses go to.
#[inline(always)]
pub(crate) fn slot() -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    unsafe { TRACED.get(tgid) }.map_or(UNKNOWN_SLOT, |t| t.slot)
}

named!(
    sched_process_exec = programs::SCHED_PROCESS_EXEC,
    sched_process_exit = programs::SCHED_PROCESS_EXIT,
);
