//! Threads the target starts after memleak attached: each one's leaks are seen, exactly, and
//! the arenas glibc maps for new threads inside malloc are not counted on top.

use std::time::Duration;

use anyhow::Result;
use memleak_tests::{
    Ledger, Report, Running, Scratch, can_trace, check_against_ledger, expect_success,
    start_fixture, wait_for_file,
};

#[test]
fn threads_started_after_attach() -> Result<()> {
    if !can_trace("threads_started_after_attach") {
        return Ok(());
    }
    let scratch = Scratch::new("threads")?;
    let (target, ledger, out) = start_fixture(&scratch, "threads", "attach")?;
    let pid = target.pid().to_string();
    let tracer = Running::memleak(
        &scratch,
        &["-p", &pid, "-o", "0", "--json", out.to_str().unwrap()],
        None,
    )?;
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
    )
}
