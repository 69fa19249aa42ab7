//! Several processes traced at once (`-p A,B`): each one's figures exactly as its own ledger
//! says, every stack carrying its process, and the reports grouped by process.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use memleak_tests::{
    Ledger, Report, Running, Scratch, can_trace, check_against_ledger, expect_success,
    wait_for_file,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// `snapshot` with only the stacks of process `pid`.
fn of_process(snapshot: &Value, pid: u64) -> Value {
    let mut own = snapshot.clone();
    if let Some(stacks) = own["stacks"].as_array_mut() {
        stacks.retain(|s| s["pid"].as_u64() == Some(pid));
    }
    own
}

/// One fixture started in `attach` mode, its ledger path beside it.
fn start(scratch: &Scratch, name: &str) -> Result<(Running, std::path::PathBuf)> {
    let fixture = scratch.compile(name, name, &[])?;
    let ledger = scratch.path(&format!("{name}.ledger.json"));
    let target = Running::start(
        scratch,
        name,
        &fixture,
        &[ledger.to_str().unwrap(), "attach"],
        None,
    )?;
    target.wait_for_mapping("libc.so", Duration::from_secs(10))?;
    Ok((target, ledger))
}

#[test]
fn two_programs_each_match_their_ledger() -> Result<()> {
    if !can_trace("two_programs_each_match_their_ledger") {
        return Ok(());
    }
    let scratch = Scratch::new("services-two")?;
    let (leaks, leaks_ledger) = start(&scratch, "leaks")?;
    let (threads, threads_ledger) = start(&scratch, "threads")?;
    let out = scratch.path("report.json");
    let folded = scratch.path("report.folded");
    let pids = format!("{},{}", leaks.pid(), threads.pid());
    let args = [
        "-p",
        &pids,
        "-o",
        "0",
        "--json",
        out.to_str().unwrap(),
        "--folded",
        folded.to_str().unwrap(),
    ];
    let tracer = Running::memleak(&scratch, &args, None)?;
    wait_for_file(&leaks_ledger, Duration::from_secs(45))?;
    wait_for_file(&threads_ledger, Duration::from_secs(45))?;
    let run = tracer.interrupt(TIMEOUT)?;
    expect_success(&run)?;
    let report = Report::read(&out)?;
    let snapshot = report.final_snapshot();
    for (ledger, source) in [(&leaks_ledger, "leaks.c"), (&threads_ledger, "threads.c")] {
        let ledger = Ledger::read(ledger)?;
        let own = of_process(snapshot, ledger.pid());
        check_against_ledger(&own, &ledger, source, |_| true)
            .with_context(|| format!("pid {} ({source})", ledger.pid()))?;
    }
    let listed: Vec<u64> = report.json["processes"]
        .as_array()
        .context("no process list")?
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    ensure!(
        listed == [u64::from(leaks.pid()), u64::from(threads.pid())],
        "process list {listed:?}"
    );
    // Text: a group per process and the service's total; folded: the process at the root.
    for pid in [leaks.pid(), threads.pid()] {
        let group = format!("pid {pid}: ");
        ensure!(
            run.stdout.contains(&group),
            "no group for pid {pid}:\n{}",
            run.stdout
        );
        let text = std::fs::read_to_string(&folded)?;
        let root = format!("pid {pid};");
        ensure!(
            text.lines().any(|l| l.starts_with(&root)),
            "no {root} root in:\n{text}"
        );
    }
    ensure!(
        run.stdout.contains("service total: "),
        "no service total:\n{}",
        run.stdout
    );
    ensure!(
        run.stdout.contains("SERVICE: "),
        "no service verdict:\n{}",
        run.stdout
    );
    Ok(())
}
