//! What the target does to itself: an exec replaces its program, so everything the old
//! program held is gone. The time of the last exec lets userspace drop those entries.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::Array,
    programs::TracePointContext,
};

use crate::{TARGET_TGID, global, growth};

/// [0]: bpf_ktime_get_ns() of the target's last exec (0: none).
#[map]
static LAST_EXEC: Array<u64> = Array::with_max_entries(1, 0);

#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    if (bpf_get_current_pid_tgid() >> 32) as u32 != global(&TARGET_TGID) {
        return 0;
    }
    if let Some(t) = LAST_EXEC.get_ptr_mut(0) {
        unsafe { *t = bpf_ktime_get_ns() };
    }
    growth::forget_break();
    0
}
