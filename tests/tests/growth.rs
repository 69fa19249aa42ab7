//! `--mode growth`: no uprobes, only the memory syscalls and page faults. The fixture maps,
//! writes, reads, unmaps, madvises, mremaps and moves its break, and knows exactly which
//! pages each of its functions still holds resident and which mappings are still there.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, anyhow, bail};
use memleak_tests::{
    Finished, Report, Running, Scratch, basename, can_trace, describe_stack, expect_nothing_lost,
    expect_success, frames, function_of, pyenv_python, read_json, skipped, stacks_through,
    usage_of, wait_for_file, wait_for_text,
};
use serde_json::{Value, json};

const FLAGS: [&str; 2] = ["-Wl,-z,now", "-O0"];

#[test]
fn growth_mode_with_a_started_command() -> Result<()> {
    if !can_trace("growth_mode_with_a_started_command") {
        return Ok(());
    }
    let scratch = Scratch::new("growth-c")?;
    let fixture = scratch.compile("growth", "growth", &FLAGS)?;
    let ledger = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let command = format!("{} {}", fixture.display(), ledger.display());
    let run = trace_command(&scratch, &command, &out)?;
    check(&run, &ledger, &out)
}

/// Pages written from Python code are that Python line's, through the interpreter's C code.
#[test]
fn growth_mode_names_python_lines() -> Result<()> {
    if !can_trace("growth_mode_names_python_lines") {
        return Ok(());
    }
    let Some(python) = pyenv_python("3.12") else {
        skipped("growth_mode_names_python_lines", "no pyenv CPython 3.12");
        return Ok(());
    };
    let python = python.display();
    let scratch = Scratch::new("growth-py")?;
    let script = memleak_tests::workspace_root().join("tests/fixtures/growth.py");
    let ledger = scratch.path("ledger.json");
    let go = scratch.path("go");
    let out = scratch.path("report.json");
    let command = format!(
        "{python} {} {} {}",
        script.display(),
        ledger.display(),
        go.display()
    );
    let json = out.to_str().context("a UTF-8 path")?;
    let args = [
        "--mode",
        "growth",
        "-c",
        &command,
        "-o",
        "0",
        "--interval",
        "1s",
        "--json",
        json,
    ];
    let tracer = Running::memleak(&scratch, &args, None)?;
    // Python frames are read from the living process: it exits only once memleak has taken
    // a snapshot (which learns every stack it holds) after the ledger, i.e. after every write.
    wait_for_file(&ledger, Duration::from_secs(60))?;
    let stdout = scratch.path("memleak.stdout");
    let before = std::fs::read_to_string(&stdout)?.len();
    wait_until_tables_after(&stdout, before, 2)?;
    std::fs::write(&go, "")?;
    let run = tracer.wait(Duration::from_secs(60))?;
    check(&run, &ledger, &out)?;
    let report = Report::read(&out)?;
    for stack in stacks_through(report.final_snapshot(), "touch") {
        if stack["class"] != "application" {
            bail!(
                "touch's pages are classed {}: {}",
                stack["class"],
                describe_stack(stack)
            );
        }
    }
    Ok(())
}

/// Attached to a running process: its program break comes from /proc.
#[test]
fn growth_mode_attached_by_pid() -> Result<()> {
    if !can_trace("growth_mode_attached_by_pid") {
        return Ok(());
    }
    let scratch = Scratch::new("growth-p")?;
    let fixture = scratch.compile("growth", "growth", &FLAGS)?;
    let ledger = scratch.path("ledger.json");
    let go = scratch.path("go");
    let out = scratch.path("report.json");
    let target = Running::start(
        &scratch,
        "growth",
        &fixture,
        &[ledger.to_str().unwrap(), go.to_str().unwrap()],
        None,
    )?;
    let pid = target.pid().to_string();
    let tracer = Running::memleak(
        &scratch,
        &[
            "--mode",
            "growth",
            "-p",
            &pid,
            "-o",
            "0",
            "--json",
            out.to_str().unwrap(),
        ],
        None,
    )?;
    // Tracepoints leave no mark in the target: memleak's own word says it is attached.
    wait_for_text(
        &scratch.path("memleak.stdout"),
        "Attaching to pid",
        Duration::from_secs(30),
    )?;
    std::fs::write(&go, "")?;
    let run = tracer.wait(Duration::from_secs(60))?;
    drop(target);
    check(&run, &ledger, &out)
}

/// Two processes of one program (the same addresses), each with its own ledger, traced
/// together: each one's pages and mappings exactly, under its own pid.
#[test]
fn growth_mode_traces_two_processes() -> Result<()> {
    if !can_trace("growth_mode_traces_two_processes") {
        return Ok(());
    }
    let scratch = Scratch::new("growth-two")?;
    let fixture = scratch.compile("growth", "growth", &FLAGS)?;
    let go = scratch.path("go");
    let out = scratch.path("report.json");
    let mut targets = Vec::new();
    for name in ["a", "b"] {
        let ledger = scratch.path(&format!("{name}.ledger.json"));
        let args = [ledger.to_str().unwrap(), go.to_str().unwrap(), "linger"];
        targets.push((
            Running::start(&scratch, name, &fixture, &args, None)?,
            ledger,
        ));
    }
    let pids = format!("{},{}", targets[0].0.pid(), targets[1].0.pid());
    let json = out.to_str().context("a UTF-8 path")?;
    let args = ["--mode", "growth", "-p", &pids, "-o", "0", "--json", json];
    let tracer = Running::memleak(&scratch, &args, None)?;
    let stdout = scratch.path("memleak.stdout");
    wait_for_text(&stdout, "Attaching to pids", Duration::from_secs(30))?;
    std::fs::write(&go, "")?;
    for (_, ledger) in &targets {
        wait_for_file(ledger, Duration::from_secs(60))?;
    }
    let run = tracer.interrupt(Duration::from_secs(60))?;
    expect_success(&run)?;
    let last = Report::read(&out)?.final_snapshot().clone();
    for (target, ledger) in &targets {
        let ledger = read_json(ledger)?;
        check_process(&own(&last, &ledger), &ledger)
            .with_context(|| format!("pid {}\n{}", target.pid(), run.stdout))?;
    }
    Ok(())
}

/// `--children`: a shell's child, already running when memleak starts, is traced in growth
/// mode too, its pages exactly as its ledger says and under its own pid.
#[test]
fn growth_mode_follows_children() -> Result<()> {
    if !can_trace("growth_mode_follows_children") {
        return Ok(());
    }
    let scratch = Scratch::new("growth-children")?;
    let fixture = scratch.compile("growth", "growth", &FLAGS)?;
    let (ledger, go, out) = (
        scratch.path("ledger.json"),
        scratch.path("go"),
        scratch.path("report.json"),
    );
    // `; :` keeps the shell from exec'ing the fixture in its own place: it forks it.
    let script = format!(
        "{} {} {} linger; :",
        fixture.display(),
        ledger.display(),
        go.display()
    );
    let sh = Running::start(&scratch, "sh", Path::new("/bin/sh"), &["-c", &script], None)?;
    let child = memleak_tests::descendant_running(sh.pid(), "growth", Duration::from_secs(10))?;
    let parent = sh.pid().to_string();
    let json = out.to_str().context("a UTF-8 path")?;
    let args = [
        "--mode",
        "growth",
        "-p",
        &parent,
        "--children",
        "-o",
        "0",
        "--json",
        json,
    ];
    let tracer = Running::memleak(&scratch, &args, None)?;
    let said = format!("tracing pid {child}, child of pid {parent}");
    wait_for_text(
        &scratch.path("memleak.stdout"),
        &said,
        Duration::from_secs(30),
    )?;
    std::fs::write(&go, "")?;
    wait_for_file(&ledger, Duration::from_secs(60))?;
    let run = tracer.interrupt(Duration::from_secs(60))?;
    expect_success(&run)?;
    let last = Report::read(&out)?.final_snapshot().clone();
    let ledger = read_json(&ledger)?;
    check_process(&own(&last, &ledger), &ledger).with_context(|| run.stdout.clone())?;
    // The shell only waited: none of the child's sites is under its pid.
    let shell = own(&last, &json!({ "pid": sh.pid() }));
    if let Some(stack) = stacks_through(&shell, "touch_kept").next() {
        bail!("the shell holds {}", describe_stack(stack));
    }
    Ok(())
}

/// Waits until memleak's `stdout` has `count` tables past its first `offset` bytes: the
/// second one's snapshot was taken after `offset` was written.
fn wait_until_tables_after(stdout: &Path, offset: usize, count: usize) -> Result<()> {
    let start = std::time::Instant::now();
    loop {
        let text = std::fs::read_to_string(stdout)?;
        if text
            .get(offset..)
            .unwrap_or("")
            .matches("grew resident memory")
            .count()
            >= count
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!("memleak printed no {count} tables in 60 s:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `memleak --mode growth -c COMMAND` to its end, JSON in `out`.
fn trace_command(scratch: &Scratch, command: &str, out: &Path) -> Result<Finished> {
    let json = out.to_str().context("a UTF-8 path")?;
    let args = ["--mode", "growth", "-c", command, "-o", "0", "--json", json];
    Running::memleak(scratch, &args, None)?.wait(Duration::from_secs(60))
}

fn check(run: &Finished, ledger: &Path, out: &Path) -> Result<()> {
    expect_success(run)?;
    if run.stdout.contains("exec'd a new program") {
        bail!(
            "a started command's own exec was announced\n{}",
            run.transcript()
        );
    }
    let report = Report::read(out)?;
    check_process(report.final_snapshot(), &read_json(ledger)?)
        .map_err(|e| anyhow!("{e:#}\n{}", run.stdout))
}

/// `snapshot` with only the stacks (resident and mapped) of the process of `ledger`.
fn own(snapshot: &Value, ledger: &Value) -> Value {
    let pid = &ledger["pid"];
    let mut own = snapshot.clone();
    for list in ["stacks", "mapped"] {
        if let Some(stacks) = own[list].as_array_mut() {
            stacks.retain(|s| s["pid"] == *pid);
        }
    }
    own
}

/// The snapshot `last` against the fixture's `ledger`: every site's pages and mappings
/// exactly, nothing lost.
fn check_process(last: &Value, ledger: &Value) -> Result<()> {
    if last["measure"] != "resident-pages" {
        bail!(
            "the snapshot measures {}, not resident-pages",
            last["measure"]
        );
    }
    expect_nothing_lost(last)?;
    let page = ledger["page"].as_u64().context("ledger without page")?;
    let mut problems = Vec::new();

    for site in ledger["resident"].as_array().into_iter().flatten() {
        let function = site["function"].as_str().unwrap_or("?");
        let pages = site["pages"].as_u64().unwrap_or(0);
        let got = usage_of(last, function);
        if (got.bytes, got.count) != (pages * page, pages) {
            problems.push(format!(
                "resident {function}: expected {pages} pages, memleak reports {} B in {}",
                got.bytes, got.count
            ));
        }
        // A page written by the site's own code: the site's frame is at the writing line
        // (the faulting instruction itself, not the one before it). C sites write it
        // themselves; a Python site writes through the interpreter's C code.
        let line = site["line"].as_u64().unwrap_or(0);
        let file = site["file"].as_str().unwrap_or("growth.c");
        for stack in stacks_through(last, function).filter(|_| line > 0) {
            let frame = frames(stack).iter().find(|f| function_of(f) == function);
            let at = frame.map(|f| (f["file"].as_str().map(basename), f["line"].as_u64()));
            if at != Some((Some(file), Some(line))) {
                problems.push(format!(
                    "resident {function}: expected the fault at {file}:{line}, got {}",
                    describe_stack(stack)
                ));
            }
        }
    }
    for function in ledger["absent"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        for stack in stacks_through(last, function) {
            problems.push(format!(
                "{function} wrote nothing: {}",
                describe_stack(stack)
            ));
        }
    }

    let mapped = json!({ "stacks": last["mapped"].clone() });
    for site in ledger["mapped"].as_array().into_iter().flatten() {
        let function = site["function"].as_str().unwrap_or("?");
        let pages = site["pages"].as_u64().unwrap_or(0);
        let mappings = site["mappings"].as_u64().unwrap_or(1);
        let got = usage_of(&mapped, function);
        if (got.bytes, got.count) != (pages * page, mappings) {
            problems.push(format!(
                "mapped {function}: expected {pages} pages in {mappings} mappings, memleak reports {} B in {}",
                got.bytes, got.count
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    bail!("{}", problems.join("\n"))
}
