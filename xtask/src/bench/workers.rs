//! A service's worth of processes: `WORKERS` churn workers traced by one memleak
//! (`-p A,B,...`). Each worker's rounds run while the others wait (the machine has 2 cores:
//! run together, each would time the others' share too), so its ns per pair is what a
//! malloc/free pair costs with 8 processes traced; memleak's own CPU over the whole run and
//! its peak RSS are read from /proc.

use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use super::{Tracer, Workload, print_row, wait_for_probes};

pub const WORKERS: usize = 8;

/// What the workers measured and what memleak cost.
pub struct Cost {
    /// Each worker's best round, ns per pair.
    pub ns_per_pair: Vec<f64>,
    /// memleak's user + system CPU from its start to the end of the last worker.
    pub cpu: Duration,
    pub pairs: u64,
    /// memleak's peak resident set (VmHWM).
    pub peak_rss_kib: u64,
    pub wall: Duration,
}

/// Runs the workers under `tracer` (one memleak over all of them).
pub fn measure(
    tracer: &Tracer,
    mut churn: impl FnMut() -> Command,
    pairs_per_run: u64,
    out: &Path,
) -> Result<Cost> {
    let mut workers: Vec<Workload> = (0..WORKERS)
        .map(|_| Workload::spawn(&mut churn()))
        .collect::<Result<_>>()?;
    let pids: Vec<u32> = workers.iter().map(|w| w.pid).collect();
    let log = out.join(format!("{}-workers.stderr.log", tracer.name));
    let started = Instant::now();
    let mut running = tracer.spawn_for(&pids, &log)?;
    for &pid in &pids {
        wait_for_probes(pid, &mut running)?;
    }
    let mut ns_per_pair = Vec::new();
    for w in &mut workers {
        w.start()?;
        ns_per_pair.push(w.results("ns_per_pair")?.0);
    }
    let memleak = running.child.id();
    let cpu = cpu_time(memleak).context("reading memleak's CPU time")?;
    let peak_rss_kib = status_kib(memleak, "VmHWM:").context("reading memleak's VmHWM")?;
    let wall = started.elapsed();
    running.stop()?;
    for w in workers {
        w.finish()?;
    }
    Ok(Cost {
        ns_per_pair,
        cpu,
        pairs: pairs_per_run * WORKERS as u64,
        peak_rss_kib,
        wall,
    })
}

/// Prints one tracer's line: the workers' median ns per pair (against the untraced run
/// `base`), memleak's CPU per pair and its peak RSS.
pub fn print(name: &str, cost: &Cost, base: &super::Measurement) {
    let mut sorted = cost.ns_per_pair.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let row = super::Measurement {
        value: median,
        live: None,
        probes: None,
        outstanding: None,
        bpf: Default::default(),
    };
    print_row(name, &row, Some(base));
    println!(
        "{:<14} worst worker {:.1} ns/pair; memleak: {:.2} s CPU over {:.1} s ({:.0} ns of its CPU per pair), peak RSS {} MiB",
        "",
        sorted[sorted.len() - 1],
        cost.cpu.as_secs_f64(),
        cost.wall.as_secs_f64(),
        cost.cpu.as_nanos() as f64 / cost.pairs.max(1) as f64,
        cost.peak_rss_kib / 1024
    );
}

/// User + system CPU of `pid` (clock ticks in /proc/PID/stat).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line; `state` (field 3) is rest[0].
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(Duration::from_secs_f64(ticks as f64 / hz))
}

/// A `kB` line of /proc/PID/status (`VmHWM:`).
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
