//! What the target does to itself: an exec replaces its program, so everything the old
//! program held is gone. Each allocation carries the exec count it was made under, which lets
//! userspace drop those of an earlier program. An exiting thread frees its in-flight slot.

use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::tracepoint, programs::TracePointContext,
};

use memleak_common::{named, names::programs};

use crate::{TARGET_TGID, forget_thread, global, growth, maps::EXECS};

#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    if (bpf_get_current_pid_tgid() >> 32) as u32 != global(&TARGET_TGID) {
        return 0;
    }
    if let Some(n) = EXECS.get_ptr_mut(0) {
        unsafe { *n += 1 };
    }
    // Whatever call the old program had in flight on this thread is gone with it.
    forget_thread(bpf_get_current_pid_tgid());
    growth::forget_break();
    0
}

#[tracepoint]
pub fn sched_process_exit(_ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    if (id >> 32) as u32 == global(&TARGET_TGID) {
        forget_thread(id);
    }
    0
}

/// The target's exec count, for a new allocation.
#[inline(always)]
pub(crate) fn execs() -> u32 {
    EXECS.get(0).copied().unwrap_or(0)
}

named!(
    sched_process_exec = programs::SCHED_PROCESS_EXEC,
    sched_process_exit = programs::SCHED_PROCESS_EXIT,
);
