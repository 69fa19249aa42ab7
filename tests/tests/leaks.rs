//! Leaks through every allocator entry point, compared exactly with the fixture's ledger.

use std::time::Duration;

use anyhow::{Result, ensure};
use memleak_tests::{
    Ledger, Report, Running, Scratch, can_trace, check_against_ledger, expect_success, run_memleak,
    stacks, usage_of, wait_for_file,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// `memleak -c "leaks LEDGER run" ARGS --json OUT`: the ledger and the report.
fn trace_command(scratch: &Scratch, args: &[&str]) -> Result<(Ledger, Report, String)> {
    let fixture = scratch.compile("leaks", &[])?;
    let ledger = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let command = format!("{} {} run", fixture.display(), ledger.display());
    let mut all = vec!["-c", &command, "--json", out.to_str().unwrap()];
    all.extend_from_slice(args);
    let run = run_memleak(scratch, &all, None, TIMEOUT)?;
    expect_success(&run)?;
    let ledger = Ledger::read(&ledger)?;
    let report = Report::read(&out)?;
    ensure!(
        report.json["pid"].as_u64() == Some(ledger.pid()),
        "report pid {} is not the fixture's {}",
        report.json["pid"],
        ledger.pid()
    );
    Ok((ledger, report, run.stdout))
}

#[test]
fn command_leaks_match_ledger() -> Result<()> {
    if !can_trace("command_leaks_match_ledger") {
        return Ok(());
    }
    let scratch = Scratch::new("command")?;
    let (ledger, report, stdout) = trace_command(&scratch, &["-T", "1000"])?;
    check_against_ledger(report.final_snapshot(), &ledger, "leaks.c", |_| true)?;
    // The text table names every leak site with its file and line.
    for (function, site) in ledger.sites(|_| true) {
        ensure!(
            stdout.contains(&function),
            "{function} missing from the text output:\n{stdout}"
        );
        for line in &site.lines {
            let at = format!("leaks.c:{line}");
            ensure!(
                stdout.contains(&at),
                "{at} ({function}) missing from the text output:\n{stdout}"
            );
        }
    }
    Ok(())
}

#[test]
fn attach_to_running_process_matches_ledger() -> Result<()> {
    if !can_trace("attach_to_running_process_matches_ledger") {
        return Ok(());
    }
    let scratch = Scratch::new("attach")?;
    let fixture = scratch.compile("leaks", &[])?;
    let ledger_path = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let target = Running::start(
        &scratch,
        "leaks",
        &fixture,
        &[ledger_path.to_str().unwrap(), "attach"],
        None,
    )?;
    let pid = target.pid().to_string();
    let tracer = Running::memleak(
        &scratch,
        &["-p", &pid, "-a", "--json", out.to_str().unwrap()],
        None,
    )?;
    wait_for_file(&ledger_path, Duration::from_secs(45))?;
    let run = tracer.interrupt(TIMEOUT)?;
    expect_success(&run)?;
    let ledger = Ledger::read(&ledger_path)?;
    let report = Report::read(&out)?;
    let snapshot = report.final_snapshot();
    check_against_ledger(snapshot, &ledger, "leaks.c", |_| true)?;
    // -a: every stack lists its outstanding allocations, which add up to its totals.
    for stack in stacks(snapshot) {
        let allocations = stack["allocations"].as_array().cloned().unwrap_or_default();
        let bytes: u64 = allocations
            .iter()
            .map(|a| a["size"].as_u64().unwrap_or(0))
            .sum();
        ensure!(
            allocations.len() as u64 == stack["count"].as_u64().unwrap_or(0)
                && bytes == stack["bytes"].as_u64().unwrap_or(0),
            "-a allocations do not add up to the stack's totals: {stack}"
        );
    }
    Ok(())
}

#[test]
fn size_filter_keeps_only_sizes_in_range() -> Result<()> {
    if !can_trace("size_filter_keeps_only_sizes_in_range") {
        return Ok(());
    }
    let scratch = Scratch::new("sizefilter")?;
    // No allocation in the fixture is exactly 200 or 5000 bytes: the bounds' inclusiveness
    // does not matter here.
    let (ledger, report, _) = trace_command(&scratch, &["-a", "-z", "200", "-Z", "5000"])?;
    let snapshot = report.final_snapshot();
    check_against_ledger(snapshot, &ledger, "leaks.c", |size| {
        (200..=5000).contains(&size)
    })?;
    for stack in stacks(snapshot) {
        for a in stack["allocations"].as_array().into_iter().flatten() {
            let size = a["size"].as_u64().unwrap_or(0);
            ensure!(
                (200..=5000).contains(&size),
                "allocation of {size} B outside -z 200 -Z 5000"
            );
        }
    }
    Ok(())
}

#[test]
fn combined_only_totals_equal_exact_mode() -> Result<()> {
    if !can_trace("combined_only_totals_equal_exact_mode") {
        return Ok(());
    }
    let scratch = Scratch::new("combined")?;
    let exact_dir = Scratch::new("combined-exact")?;
    let (ledger, combined, _) = trace_command(&scratch, &["--combined-only"])?;
    let (_, exact, _) = trace_command(&exact_dir, &[])?;
    let (c, e) = (combined.final_snapshot(), exact.final_snapshot());
    check_against_ledger(c, &ledger, "leaks.c", |_| true)?;
    for (function, _) in ledger.sites(|_| true) {
        ensure!(
            usage_of(c, &function) == usage_of(e, &function),
            "{function}: --combined-only {:?} vs exact {:?}",
            usage_of(c, &function),
            usage_of(e, &function)
        );
    }
    ensure!(
        (c["total_bytes"].as_u64(), c["total_count"].as_u64())
            == (e["total_bytes"].as_u64(), e["total_count"].as_u64()),
        "totals differ: --combined-only {} B in {}, exact {} B in {}",
        c["total_bytes"],
        c["total_count"],
        e["total_bytes"],
        e["total_count"]
    );
    Ok(())
}
