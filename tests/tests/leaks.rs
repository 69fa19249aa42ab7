//! Leaks through every allocator entry point, compared exactly with the fixture's ledger.

use std::time::Duration;

use anyhow::{Result, ensure};
use memleak_tests::{
    Ledger, Report, Running, Scratch, can_trace, check_against_ledger, expect_nothing_lost,
    expect_success, run_memleak, stacks, stacks_through, start_fixture, usage_of, wait_for_file,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// `memleak -c "leaks LEDGER run" ARGS --json OUT`: the ledger and the report.
fn trace_command(scratch: &Scratch, args: &[&str]) -> Result<(Ledger, Report, String)> {
    trace_command_built(scratch, &[], args)
}

/// As [`trace_command`], with the fixture built with `gcc_flags` added.
fn trace_command_built(
    scratch: &Scratch,
    gcc_flags: &[&str],
    args: &[&str],
) -> Result<(Ledger, Report, String)> {
    let fixture = scratch.compile("leaks", "leaks", gcc_flags)?;
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
    expect_nothing_lost(report.final_snapshot())?;
    expect_sorted_by(report.final_snapshot(), "bytes")?;
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

/// `--unwind fp` with -c: the command is held at its entry point as in DWARF mode, where its
/// symbols are read; it exits at once, before memleak's first maps tick. Three runs: without
/// the hold, a run names the leak only when that tick wins the race.
#[test]
fn short_command_with_frame_pointer_unwinding_is_named() -> Result<()> {
    if !can_trace("short_command_with_frame_pointer_unwinding_is_named") {
        return Ok(());
    }
    let scratch = Scratch::new("command-fp")?;
    let fixture = scratch.compile("short_lived", "short_lived", &[])?;
    let out = scratch.path("report.json");
    let args = [
        "--unwind",
        "fp",
        "-c",
        fixture.to_str().unwrap(),
        "--json",
        out.to_str().unwrap(),
    ];
    for run in 1..=3 {
        expect_success(&run_memleak(&scratch, &args, None, TIMEOUT)?)?;
        let report = Report::read(&out)?;
        let named = stacks_through(report.final_snapshot(), "leak_and_go").count();
        ensure!(
            named == 1,
            "run {run}: {named} stacks through leak_and_go, expected 1"
        );
    }
    Ok(())
}

#[test]
fn optimized_build_matches_ledger() -> Result<()> {
    if !can_trace("optimized_build_matches_ledger") {
        return Ok(());
    }
    // -O2 (frame pointers kept): gcc drops the churn's unused malloc/free pairs, reorders and
    // shares code; the leaks and their lines must still come out exact.
    let scratch = Scratch::new("optimized")?;
    let (ledger, report, _) = trace_command_built(&scratch, &["-O2"], &[])?;
    check_against_ledger(report.final_snapshot(), &ledger, "leaks.c", |_| true)
}

/// The snapshot's stacks are in non-increasing order of `key`.
fn expect_sorted_by(snapshot: &serde_json::Value, key: &str) -> Result<()> {
    let values: Vec<u64> = stacks(snapshot)
        .iter()
        .map(|s| s[key].as_u64().unwrap_or(0))
        .collect();
    ensure!(
        values.windows(2).all(|w| w[0] >= w[1]),
        "stacks not sorted by {key}: {values:?}"
    );
    Ok(())
}

#[test]
fn sort_by_count_and_top_n() -> Result<()> {
    if !can_trace("sort_by_count_and_top_n") {
        return Ok(());
    }
    let scratch = Scratch::new("sort")?;
    let (ledger, report, stdout) = trace_command(&scratch, &["--sort", "count", "-T", "3"])?;
    let snapshot = report.final_snapshot();
    expect_sorted_by(snapshot, "count")?;
    // The JSON keeps every stack; the table shows the top 3.
    check_against_ledger(snapshot, &ledger, "leaks.c", |_| true)?;
    let shown = stdout.matches("allocations from stack").count();
    ensure!(shown == 3, "-T 3 showed {shown} stacks:\n{stdout}");
    Ok(())
}

#[test]
fn trace_mode_keeps_exact_accounting() -> Result<()> {
    if !can_trace("trace_mode_keeps_exact_accounting") {
        return Ok(());
    }
    let scratch = Scratch::new("trace")?;
    let (ledger, report, stdout) = trace_command(&scratch, &["-t"])?;
    let snapshot = report.final_snapshot();
    check_against_ledger(snapshot, &ledger, "leaks.c", |_| true)?;
    ensure!(
        snapshot["lost"]["trace_events_lost"] == 0,
        "trace events lost: {}",
        snapshot["lost"]
    );
    // Every leaking call shows up as an event naming its function and line.
    for (function, site) in ledger.sites(|_| true) {
        for line in &site.lines {
            let at = format!("leaks.c:{line}");
            ensure!(
                stdout
                    .lines()
                    .any(|l| l.contains(&function) && l.contains(&at)),
                "no -t event from {function} at {at}:\n{stdout}"
            );
        }
    }
    Ok(())
}

/// Starts `leaks LEDGER attach`, attaches `memleak -p PID ARGS --json OUT`, waits for the
/// ledger and `linger` more, then interrupts memleak: the ledger and the report.
fn trace_attached(scratch: &Scratch, args: &[&str], linger: Duration) -> Result<(Ledger, Report)> {
    let (target, ledger, out) = start_fixture(scratch, "leaks", "attach")?;
    let pid = target.pid().to_string();
    let mut all = vec!["-p", &pid, "--json", out.to_str().unwrap()];
    all.extend_from_slice(args);
    let tracer = Running::memleak(scratch, &all, None)?;
    wait_for_file(&ledger, Duration::from_secs(45))?;
    std::thread::sleep(linger);
    let run = tracer.interrupt(TIMEOUT)?;
    expect_success(&run)?;
    Ok((Ledger::read(&ledger)?, Report::read(&out)?))
}

#[test]
fn attach_to_running_process_matches_ledger() -> Result<()> {
    if !can_trace("attach_to_running_process_matches_ledger") {
        return Ok(());
    }
    let scratch = Scratch::new("attach")?;
    // -o 0: the final table after Ctrl-C otherwise hides the last 500 ms (BCC's default -o).
    let (ledger, report) = trace_attached(&scratch, &["-a", "-o", "0"], Duration::ZERO)?;
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
fn older_filter_hides_young_allocations_only() -> Result<()> {
    if !can_trace("older_filter_hides_young_allocations_only") {
        return Ok(());
    }
    // Everything the fixture leaked is under a minute old: -o 60000 shows none of it.
    let scratch = Scratch::new("older-young")?;
    let (ledger, report) = trace_attached(&scratch, &["-o", "60000"], Duration::ZERO)?;
    let snapshot = report.final_snapshot();
    for function in ledger.sites(|_| true).keys() {
        let got = usage_of(snapshot, function);
        ensure!(got.count == 0, "-o 60000 still shows {function}: {got:?}");
    }
    // And all of it is over 1.5 s old 2 s after the ledger: -o 1500 shows exactly the ledger.
    let scratch = Scratch::new("older-old")?;
    let (ledger, report) = trace_attached(&scratch, &["-o", "1500"], Duration::from_secs(2))?;
    check_against_ledger(report.final_snapshot(), &ledger, "leaks.c", |_| true)
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
