//! Load: 8 threads churning malloc/calloc/realloc/free at a paced ~100k calls a second while
//! each leaks a known handful of blocks. memleak attached with `-p` must report the leaks
//! exactly (or explain every difference with its own loss counters), show nothing outstanding
//! through the churn, and keep its own memory bounded.
//!
//! `MEMLEAK_LOAD_SECONDS` (default 30) and `MEMLEAK_LOAD_RATE` (calls/s, default 100000) size
//! the run; `cargo xtask load --seconds 600` is the long version.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memleak_tests::{
    Ledger, Report, Running, Scratch, can_trace, describe_stack, expect_success, stacks_through,
    usage_of, wait_for_file,
};
use serde_json::Value;

/// memleak's own peak resident memory must stay under this, however long the load runs.
const RSS_LIMIT_KIB: u64 = 512 * 1024;
/// The untraced baseline run: long enough to see the paced rate.
const BASELINE_SECONDS: f64 = 3.0;

fn env_number(name: &str, default: f64) -> Result<f64> {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .with_context(|| format!("{name}={text} is not a number")),
        Err(_) => Ok(default),
    }
}

/// Allocating calls and seconds from the fixture's "allocations N seconds S" line.
fn fixture_counts(stdout: &str) -> Result<(u64, f64)> {
    let words: Vec<&str> = stdout
        .lines()
        .find(|l| l.starts_with("allocations "))
        .with_context(|| format!("no counts in the fixture's output: {stdout:?}"))?
        .split_whitespace()
        .collect();
    match words[..] {
        ["allocations", calls, "seconds", secs] => Ok((calls.parse()?, secs.parse()?)),
        _ => bail!("unreadable counts line in {stdout:?}"),
    }
}

/// A field of /proc/PID/status in KiB (VmHWM: the peak resident set).
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

#[test]
fn load_leaks_exact_under_churn() -> Result<()> {
    if !can_trace("load_leaks_exact_under_churn") {
        return Ok(());
    }
    let seconds = env_number("MEMLEAK_LOAD_SECONDS", 30.0)?;
    let rate = env_number("MEMLEAK_LOAD_RATE", 100_000.0)?;
    let scratch = Scratch::new("load")?;
    let fixture = scratch.compile("load", "load", &[])?;

    let baseline_ledger = scratch.path("baseline-ledger.json");
    let baseline = Running::start(
        &scratch,
        "baseline",
        &fixture,
        &[
            baseline_ledger.to_str().unwrap(),
            &BASELINE_SECONDS.to_string(),
            &rate.to_string(),
            "untraced",
        ],
        None,
    )?
    .wait(Duration::from_secs(30))?;
    let (untraced_calls, untraced_secs) = fixture_counts(&baseline.stdout)?;

    let ledger_path = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let target = Running::start(
        &scratch,
        "load",
        &fixture,
        &[
            ledger_path.to_str().unwrap(),
            &seconds.to_string(),
            &rate.to_string(),
            "attach",
        ],
        None,
    )?;
    target.wait_for_mapping("libc.so", Duration::from_secs(10))?;
    let pid = target.pid().to_string();
    let attach_start = Instant::now();
    let tracer = Running::memleak(
        &scratch,
        &["-p", &pid, "-o", "0", "--json", out.to_str().unwrap()],
        None,
    )?;
    wait_for_file(&ledger_path, Duration::from_secs_f64(seconds + 60.0))?;
    let traced_wall = attach_start.elapsed();
    let peak_rss_kib = status_kib(tracer.pid(), "VmHWM")?;
    let stop_start = Instant::now();
    let run = tracer.interrupt(Duration::from_secs(120))?;
    let stop_time = stop_start.elapsed();
    expect_success(&run)?;
    let (traced_calls, traced_secs) =
        fixture_counts(&std::fs::read_to_string(scratch.path("load.stdout"))?)?;

    let ledger = Ledger::read(&ledger_path)?;
    let report = Report::read(&out)?;
    let snapshot = report.final_snapshot();
    let lost = snapshot["lost"]
        .as_object()
        .context("no \"lost\" in the final snapshot")?;
    let lost_total: u64 = lost.values().filter_map(Value::as_u64).sum();
    let want = &ledger.sites(|_| true)["load_leak"];
    let got = usage_of(snapshot, "load_leak");
    let largest_leak = ledger.json["leaks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| l["bytes"].as_u64())
        .max()
        .unwrap_or(0);

    println!(
        "load: {seconds} s at a paced {rate} calls/s from 8 threads\n\
         \x20 untraced: {untraced_calls} allocating calls in {untraced_secs:.2} s = {:.0}/s\n\
         \x20 traced:   {traced_calls} allocating calls in {traced_secs:.2} s = {:.0}/s \
         (attach to ledger {traced_wall:.1?})\n\
         \x20 load_leak: ledger {} B in {}, memleak {} B in {}\n\
         \x20 lost: {}\n\
         \x20 memleak: peak RSS (VmHWM) {:.1} MiB, {} recorded / {} released, \
         final report {stop_time:.1?} after SIGINT",
        untraced_calls as f64 / untraced_secs,
        traced_calls as f64 / traced_secs,
        want.bytes,
        want.count,
        got.bytes,
        got.count,
        snapshot["lost"],
        peak_rss_kib as f64 / 1024.0,
        snapshot["recorded"],
        snapshot["released"],
    );

    let mut problems = Vec::new();
    let count_diff = want.count.abs_diff(got.count);
    let bytes_diff = want.bytes.abs_diff(got.bytes);
    if lost_total == 0 && (got.bytes, got.count) != (want.bytes, want.count) {
        problems.push(format!(
            "load_leak: nothing lost, yet memleak reports {} B in {} for the ledger's {} B in {}",
            got.bytes, got.count, want.bytes, want.count
        ));
    }
    // Each lost event can hide (or leave behind) at most one allocation.
    if count_diff > lost_total || bytes_diff > lost_total * largest_leak {
        problems.push(format!(
            "load_leak: off by {count_diff} allocations / {bytes_diff} B, more than the \
             {lost_total} lost events explain"
        ));
    }
    if !got.lines.is_subset(&want.lines) {
        problems.push(format!(
            "load_leak reported at lines {:?}, the leak is at {:?}",
            got.lines, want.lines
        ));
    }
    // Churn can only stay outstanding through a lost event (e.g. a free the tracer missed).
    let absent = ledger.absent();
    let churn: Vec<&Value> = absent
        .iter()
        .flat_map(|function| stacks_through(snapshot, function))
        .collect();
    let churn_left: u64 = churn.iter().filter_map(|s| s["count"].as_u64()).sum();
    println!("  outstanding through the churn functions: {churn_left}");
    if churn_left > lost_total {
        for stack in churn {
            problems.push(format!("churn outstanding: {}", describe_stack(stack)));
        }
    }
    if peak_rss_kib > RSS_LIMIT_KIB {
        problems.push(format!(
            "memleak's peak RSS {peak_rss_kib} KiB exceeds {RSS_LIMIT_KIB} KiB"
        ));
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("\n"));
    }
    Ok(())
}
