//! What memleak's BPF programs cost per call, from the kernel's own accounting
//! (`BPF_ENABLE_STATS`, as `kernel.bpf_stats_enabled` turns on): run time and run count per
//! program, read from the programs the tracer holds, so that another tracer's programs loaded
//! at the same time (a test, a second bench) do not mix in. Steadier than wall clock on a
//! shared machine: it counts only the time the programs ran.

use std::{collections::BTreeMap, os::fd::OwnedFd};

use anyhow::{Context, Result};
use memleak_common::names::programs;

/// Keeps the kernel's run-time accounting on while held (off again when dropped).
pub fn enable() -> Result<OwnedFd> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS")
}

/// Per program of process `pid` that ran: (ns run, times run), by name (the kernel keeps 15
/// bytes of it).
pub fn of_process(pid: u32) -> BTreeMap<String, (u64, u64)> {
    let names: BTreeMap<u32, String> = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter_map(|p| Some((p.id(), p.name_as_str()?.to_string())))
        .collect();
    let mut stats = BTreeMap::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return stats;
    };
    for fd in fds.filter_map(Result::ok) {
        let Ok(text) = std::fs::read_to_string(fd.path()) else {
            continue;
        };
        if let Some((id, ns, count)) = parse_fdinfo(&text)
            && count > 0
            && let Some(name) = names.get(&id)
        {
            // A program held by several fds is the same program: the last read stands.
            stats.insert(name.clone(), (ns, count));
        }
    }
    stats
}

/// A BPF program fd's `prog_id`, `run_time_ns` and `run_cnt` (other fds: `None`).
fn parse_fdinfo(text: &str) -> Option<(u32, u64, u64)> {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((
        u32::try_from(field("prog_id")?).ok()?,
        field("run_time_ns")?,
        field("run_cnt")?,
    ))
}

/// The return probe's ns per call, where it ran.
pub fn return_probe_ns(stats: &BTreeMap<String, (u64, u64)>) -> Option<f64> {
    let name = &programs::ALLOC_RETURN[..programs::ALLOC_RETURN.len().min(15)];
    let (ns, count) = stats.get(name)?;
    Some(*ns as f64 / *count as f64)
}

/// `alloc_return 2345 ns × 1200000, free_enter 310 ns × …`, the costliest first.
pub fn summary(stats: &BTreeMap<String, (u64, u64)>) -> String {
    let mut v: Vec<_> = stats.iter().collect();
    v.sort_by_key(|(_, (ns, _))| std::cmp::Reverse(*ns));
    let parts: Vec<String> = v
        .iter()
        .map(|(name, (ns, n))| format!("{name} {:.0} ns × {n}", *ns as f64 / *n as f64))
        .collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_program_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t1057\nprog_type:\t2\n\
                    prog_jited:\t1\nprog_tag:\t2f4e1a6c1a4e0b1d\nmemlock:\t4096\nprog_id:\t381\n\
                    run_time_ns:\t123456\nrun_cnt:\t42\nrecursion_misses:\t0\n";
        assert_eq!(parse_fdinfo(text), Some((381, 123456, 42)));
        assert_eq!(parse_fdinfo("pos:\t0\nflags:\t02\n"), None);
    }
}
