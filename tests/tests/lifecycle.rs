//! How memleak starts and ends: a target that exits mid-trace, `-c` passing stdio through and
//! reporting the exit status, and bad input failing with one clear line.

use std::time::Duration;

use anyhow::{Result, ensure};
use memleak_tests::{
    Ledger, Report, Running, Scratch, can_trace, check_against_ledger, expect_success, run_memleak,
    start_fixture,
};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn target_exit_mid_trace_ends_with_final_report() -> Result<()> {
    if !can_trace("target_exit_mid_trace_ends_with_final_report") {
        return Ok(());
    }
    let scratch = Scratch::new("targetexit")?;
    let (target, ledger, out) = start_fixture(&scratch, "leaks", "attach-exit")?;
    let pid = target.pid().to_string();
    // 1-second tables, far more of them than the target lives for.
    let tracer = Running::memleak(
        &scratch,
        &["-p", &pid, "--json", out.to_str().unwrap(), "1", "1000"],
        None,
    )?;
    let fixture_run = target.wait(TIMEOUT)?;
    ensure!(
        fixture_run.status.success(),
        "fixture failed\n{}",
        fixture_run.transcript()
    );
    let run = tracer.wait(Duration::from_secs(15))?;
    expect_success(&run)?;
    let said = format!("{}{}", run.stdout, run.stderr).to_lowercase();
    ensure!(
        said.contains("exited"),
        "memleak did not say the target exited\n{}",
        run.transcript()
    );
    let report = Report::read(&out)?;
    check_against_ledger(
        report.final_snapshot(),
        &Ledger::read(&ledger)?,
        "leaks.c",
        |_| true,
    )
}

/// memleak itself exits 0 when the command ends (it did its job); it says how the command
/// ended.
#[test]
fn command_stdio_passes_through_and_status_is_reported() -> Result<()> {
    if !can_trace("command_stdio_passes_through_and_status_is_reported") {
        return Ok(());
    }
    let scratch = Scratch::new("passthrough")?;
    let fixture = scratch.compile("echo_exit", "echo_exit", &[])?;
    for status in [0, 7] {
        let command = format!("{} {status}", fixture.display());
        let run = run_memleak(
            &scratch,
            &["-c", &command],
            Some("hello memleak\n"),
            TIMEOUT,
        )?;
        expect_success(&run)?;
        let said = format!("status {status}");
        ensure!(
            run.stdout.contains(&said),
            "memleak did not report \"{said}\"\n{}",
            run.transcript()
        );
        ensure!(
            run.stdout.contains("echo: hello memleak"),
            "the command's stdio did not pass through\n{}",
            run.transcript()
        );
    }
    Ok(())
}

/// One line on stderr, a non-zero status, no panic.
fn expect_clean_error(run: &memleak_tests::Finished, what: &str) -> Result<()> {
    let err = run.stderr.trim();
    ensure!(
        !run.status.success(),
        "{what}: memleak exited 0\n{}",
        run.transcript()
    );
    ensure!(
        run.status.code().is_some(),
        "{what}: memleak died of a signal\n{}",
        run.transcript()
    );
    ensure!(
        !err.is_empty() && err.lines().count() == 1,
        "{what}: expected a one-line error\n{}",
        run.transcript()
    );
    ensure!(
        !err.contains("panicked") && !err.contains("RUST_BACKTRACE"),
        "{what}: memleak panicked\n{}",
        run.transcript()
    );
    Ok(())
}

#[test]
fn count_intervals_then_exit() -> Result<()> {
    if !can_trace("count_intervals_then_exit") {
        return Ok(());
    }
    let scratch = Scratch::new("count")?;
    let (target, _ledger, out) = start_fixture(&scratch, "leaks", "attach")?;
    let pid = target.pid().to_string();
    let run = run_memleak(
        &scratch,
        &["-p", &pid, "--json", out.to_str().unwrap(), "1", "2"],
        None,
        Duration::from_secs(30),
    )?;
    expect_success(&run)?;
    let tables = run
        .stdout
        .matches("stacks with outstanding allocations")
        .count();
    ensure!(
        tables == 2,
        "INTERVAL 1 COUNT 2 printed {tables} tables\n{}",
        run.transcript()
    );
    let report = Report::read(&out)?;
    let snapshots = report.json["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(
        snapshots.len() == 2,
        "{} snapshots in the JSON, expected 2",
        snapshots.len()
    );
    let elapsed: Vec<f64> = snapshots
        .iter()
        .map(|s| s["elapsed_s"].as_f64().unwrap_or(-1.0))
        .collect();
    // Table k comes k intervals after the start (when a table is stamped after its
    // symbolization, two stamps can be closer than one interval).
    ensure!(
        elapsed[0] >= 0.9 && elapsed[1] >= 1.9 && elapsed[1] > elapsed[0],
        "tables not at 1 s and 2 s: elapsed_s {elapsed:?}"
    );
    ensure!(
        report.final_snapshot()["total_bytes"] == snapshots[1]["total_bytes"],
        "after COUNT tables, final is not the last table"
    );
    Ok(())
}

#[test]
fn bad_pid_is_a_one_line_error() -> Result<()> {
    if !can_trace("bad_pid_is_a_one_line_error") {
        return Ok(());
    }
    let scratch = Scratch::new("badpid")?;
    // Above the largest pid_max Linux allows (2^22): never a process.
    let run = run_memleak(&scratch, &["-p", "99999999"], None, TIMEOUT)?;
    expect_clean_error(&run, "-p 99999999")?;
    // A process that has just exited.
    let mut gone = std::process::Command::new("true").spawn()?;
    gone.wait()?;
    let run = run_memleak(&scratch, &["-p", &gone.id().to_string()], None, TIMEOUT)?;
    expect_clean_error(&run, "-p <exited pid>")
}

#[test]
fn bad_input_is_a_one_line_error() -> Result<()> {
    if !can_trace("bad_input_is_a_one_line_error") {
        return Ok(());
    }
    let scratch = Scratch::new("badinput")?;
    let cases: [&[&str]; 7] = [
        &["-c", "/nonexistent/memleak-test-command --flag"],
        &["-c", ""],
        &["-p", "0"],
        &["-c", "true", "-O", "/nonexistent/libnothing.so"],
        &["-c", "true", "-s", "0"],
        &["-c", "true", "-z", "100", "-Z", "10"],
        &["-c", "true", "0"],
    ];
    for args in cases {
        let run = run_memleak(&scratch, args, None, TIMEOUT)?;
        expect_clean_error(&run, &format!("memleak {args:?}"))?;
    }
    Ok(())
}

/// `-c` splits its command as a shell would: a quoted argument stays one word.
#[test]
fn command_words_are_split_like_a_shell() -> Result<()> {
    if !can_trace("command_words_are_split_like_a_shell") {
        return Ok(());
    }
    let scratch = Scratch::new("shellwords")?;
    let run = run_memleak(&scratch, &["-c", "/bin/sh -c 'exit 5'"], None, TIMEOUT)?;
    expect_success(&run)?;
    assert!(
        run.stdout.contains("command exited with status 5"),
        "{}",
        run.transcript()
    );
    let bad = run_memleak(&scratch, &["-c", "/bin/sh -c 'exit 5"], None, TIMEOUT)?;
    assert!(
        !bad.status.success() && bad.stderr.contains("missing closing quote"),
        "{}",
        bad.transcript()
    );
    Ok(())
}
