//! Threads the target starts after memleak attached: each one's leaks are seen, exactly, and
//! the arenas glibc maps for new threads inside malloc are not counted on top. Also with one
//! thread slot for all of them, so every worker's calls take the shared in-flight map.

use std::time::Duration;

use anyhow::Result;
use memleak_tests::{
    Ledger, Report, Running, Scratch, can_trace, check_against_ledger, expect_nothing_lost,
    expect_success, start_fixture, wait_for_file,
};

#[test]
fn threads_started_after_attach() -> Result<()> {
    if !can_trace("threads_started_after_attach") {
        return Ok(());
    }
    trace_threads("threads", &[])
}

/// The main thread takes the only slot with its first call and keeps it; the four workers
/// allocate concurrently while it is held, as threads whose ids differ by a multiple of the
/// slot count do on a host with a large pid_max.
#[test]
fn threads_sharing_one_slot() -> Result<()> {
    if !can_trace("threads_sharing_one_slot") {
        return Ok(());
    }
    trace_threads("threads-one-slot", &["--thread-slots", "1"])
}

fn trace_threads(name: &str, extra: &[&str]) -> Result<()> {
    let scratch = Scratch::new(name)?;
    let (target, ledger, out) = start_fixture(&scratch, "threads", "attach")?;
    let pid = target.pid().to_string();
    let mut args = vec!["-p", &pid, "-o", "0", "--json", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let tracer = Running::memleak(&scratch, &args, None)?;
    wait_for_file(&ledger, Duration::from_secs(45))?;
    // SIGTERM ends memleak as cleanly as Ctrl-C (the other -p tests use SIGINT).
    let run = tracer.stop(libc::SIGTERM, Duration::from_secs(60))?;
    expect_success(&run)?;
    let report = Report::read(&out)?;
    check_against_ledger(
        report.final_snapshot(),
        &Ledger::read(&ledger)?,
        "threads.c",
        |_| true,
    )?;
    expect_nothing_lost(report.final_snapshot())
}
