//! Kernel mode: the kmem tracepoints, kernel stacks, and `--kernel -p PID` keeping only what
//! one process's threads make the kernel allocate (so the count can be exact on a busy host).

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use memleak_tests::{
    Report, Running, Scratch, can_trace, describe_stack, expect_success, frames, function_of,
    read_json, stacks, wait_for_file,
};

const MADE: u64 = 1000;
const CLOSED: u64 = 400;

#[test]
fn kernel_mode_counts_eventfd_contexts_exactly() -> Result<()> {
    if !can_trace("kernel_mode_counts_eventfd_contexts_exactly") {
        return Ok(());
    }
    let scratch = Scratch::new("kernel")?;
    let fixture = scratch.compile("eventfds", "eventfds", &[])?;
    let (go, ledger, out) = (
        scratch.path("go"),
        scratch.path("ledger.json"),
        scratch.path("report.json"),
    );
    let target = Running::start(
        &scratch,
        "eventfds",
        &fixture,
        &[
            go.to_str().unwrap(),
            ledger.to_str().unwrap(),
            &MADE.to_string(),
            &CLOSED.to_string(),
        ],
        None,
    )?;
    let pid = target.pid().to_string();
    let tracer = Running::memleak(
        &scratch,
        &[
            "--kernel",
            "-p",
            &pid,
            "-o",
            "0",
            "--json",
            out.to_str().unwrap(),
            "1",
        ],
        None,
    )?;
    // Attached once memleak says whose allocations it keeps.
    let started = Instant::now();
    while !std::fs::read_to_string(scratch.path("memleak.stdout"))?
        .contains("Kernel allocations made by pid")
    {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("memleak did not attach within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&go, "")?;
    wait_for_file(&ledger, Duration::from_secs(30))?;
    let expected = read_json(&ledger)?["outstanding"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert_eq!(expected, MADE - CLOSED);
    std::thread::sleep(Duration::from_millis(300));
    let run = tracer.interrupt(Duration::from_secs(60))?;
    expect_success(&run)?;
    let report = Report::read(&out)?;
    let snap = report.final_snapshot();
    assert_eq!(
        snap["lost"]["allocs_map_full"], 0,
        "the map filled: the count would be partial"
    );

    // The context itself: kmalloc'd directly by do_eventfd.
    let contexts: Vec<_> = stacks(snap)
        .iter()
        .filter(|s| {
            let f = frames(s);
            f.len() > 1
                && function_of(&f[0]).contains("kmalloc")
                && function_of(&f[1]) == "do_eventfd"
        })
        .collect();
    let held: u64 = contexts
        .iter()
        .map(|s| s["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        held,
        expected,
        "eventfd contexts held; stacks:\n{}",
        stacks(snap)
            .iter()
            .take(15)
            .map(describe_stack)
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Kernel frames are named, with the syscall entry on the way out.
    assert!(
        contexts.iter().all(|s| frames(s)
            .iter()
            .any(|f| function_of(f).contains("sys_eventfd"))),
        "no syscall frame: {}",
        contexts
            .iter()
            .map(|s| describe_stack(s))
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(target);
    Ok(())
}
