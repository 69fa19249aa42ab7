//! Python stacks whole (issue 19): an allocation 40 Python frames deep shows every frame down
//! to `<module>`, one deeper than the walk keeps says how many outer frames it lacks, and a
//! script that exits right after its loop still has its lines named in the table at exit.

use std::{path::Path, time::Duration};

use anyhow::{Result, bail, ensure};
use memleak_tests::{
    Report, Running, Scratch, basename, can_trace, describe_stack, expect_success, frames,
    run_memleak, stacks, wait_for_file, wait_for_text,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);

const PYTHONS: [(&str, &str); 3] = [
    ("3.10", "/root/.pyenv/versions/3.10.13/bin/python3.10"),
    ("3.11", "/root/.pyenv/versions/3.11.7/bin/python3.11"),
    ("3.12", "/root/.pyenv/versions/3.12.1/bin/python3.12"),
];

/// Line numbers matter: `expected_chain` spells them out.
const DEEP: &str = r#"import os, sys, time
KEPT = []
def recurse(n):
    if n == 0:
        KEPT.append(bytearray(200_000))
        return
    recurse(n - 1)
def main():
    while not os.path.exists(sys.argv[1]):  # memleak is attached
        time.sleep(0.05)
    for depth in (39, 149):
        recurse(depth)
    open(sys.argv[2], "w").close()
    time.sleep(600)
main()
"#;

/// The walk keeps this many Python frames (`memleak_common::MAX_PYTHON_FRAMES`).
const KEPT_FRAMES: usize = 128;

/// The Python frames of an allocation `recurse` frames deep, innermost first, cut at the cap.
fn expected_chain(recurse: usize) -> Vec<(String, String, u64)> {
    let frame = |f: &str, line| (f.to_string(), "deep.py".to_string(), line);
    let mut chain = vec![frame("recurse", 5)];
    chain.extend((1..recurse).map(|_| frame("recurse", 7)));
    chain.push(frame("main", 12));
    chain.push(frame("<module>", 15));
    chain.truncate(KEPT_FRAMES);
    chain
}

/// Python frames of a stack as (function, file basename, line).
fn python_frames(stack: &Value) -> Vec<(String, String, u64)> {
    frames(stack)
        .iter()
        .filter(|f| f["kind"] == "python")
        .map(|f| {
            (
                f["function"].as_str().unwrap_or("?").to_string(),
                basename(f["file"].as_str().unwrap_or("?")).to_string(),
                f["line"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// The one stack whose innermost Python frame is `deep.py:5` and that holds `frames` of them.
fn deep_stack(all: &[Value], depth: usize) -> Result<&Value> {
    let want = expected_chain(depth);
    let found: Vec<&Value> = all
        .iter()
        .filter(|s| {
            python_frames(s).first() == want.first() && python_frames(s).len() == want.len()
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one),
        _ => bail!(
            "{} stacks {depth} recurse frames deep (expected one); stacks through recurse:\n  {}",
            found.len(),
            all.iter()
                .filter(|s| python_frames(s).iter().any(|f| f.0 == "recurse"))
                .map(describe_stack)
                .collect::<Vec<_>>()
                .join("\n  ")
        ),
    }
}

fn check_deep(label: &str, python: &str) -> Result<()> {
    let scratch = Scratch::new("python_deep")?;
    let script = scratch.path("deep.py");
    std::fs::write(&script, DEEP)?;
    let out = scratch.path("report.json");
    let (go, done) = (scratch.path("go"), scratch.path("done"));
    let args = [
        script.to_str().unwrap(),
        go.to_str().unwrap(),
        done.to_str().unwrap(),
    ];
    let target = Running::start(&scratch, "python", Path::new(python), &args, None)?;
    target.wait_for_mapping("libc.so", TIMEOUT)?;
    let pid = target.pid().to_string();
    let tracer = Running::memleak(
        &scratch,
        &["-p", &pid, "--json", out.to_str().unwrap()],
        None,
    )?;
    wait_for_text(&scratch.path("memleak.stdout"), "Attaching to pid", TIMEOUT)?;
    std::fs::write(&go, "")?;
    wait_for_file(&done, TIMEOUT)?;
    std::thread::sleep(Duration::from_millis(500));
    let run = tracer.interrupt(TIMEOUT)?;
    expect_success(&run)?;
    let report = Report::read(&out)?;
    let all = stacks(report.final_snapshot());

    let whole = deep_stack(all, 40)?;
    ensure!(
        python_frames(whole) == expected_chain(40),
        "Python {label}: the 40-deep stack's Python frames differ from 40 recurse + main + <module>: {}",
        describe_stack(whole)
    );
    ensure!(
        whole.get("python_cut").is_none(),
        "Python {label}: a whole chain marked cut: {whole}"
    );
    // 150 recurse + main + <module>: the walk keeps 128, the 24 outer ones are counted.
    let cut = deep_stack(all, 150)?;
    ensure!(
        python_frames(cut) == expected_chain(150),
        "Python {label}: the 150-deep stack's kept frames: {}",
        describe_stack(cut)
    );
    let dropped = &cut["python_cut"];
    ensure!(
        dropped["dropped"] == 150 + 2 - KEPT_FRAMES as u64 && dropped["at_least"] == false,
        "Python {label}: the 150-deep stack's cut is {dropped}, expected 24 frames exactly"
    );
    ensure!(
        run.stdout.contains("[24 outer Python frames not recorded"),
        "Python {label}: the table does not say the stack is cut:\n{}",
        run.stdout
    );
    eprintln!("Python {label}: 40 frames whole, 150 frames cut at {KEPT_FRAMES} with 24 counted");
    Ok(())
}

#[test]
fn python_stacks_are_whole_or_marked_cut() -> Result<()> {
    if !can_trace("python_stacks_are_whole_or_marked_cut") {
        return Ok(());
    }
    let mut failures = Vec::new();
    for (label, python) in PYTHONS {
        if !Path::new(python).exists() {
            eprintln!("\n*** SKIPPED Python {label}: {python} is missing ***\n");
            continue;
        }
        if let Err(e) = check_deep(label, python) {
            failures.push(format!("{e:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

/// Exits right after its loop, without freeing what it keeps: its code objects go with the
/// process within milliseconds of the last allocation, long before a table is printed.
const JOB: &str = r#"import os
KEPT = []
def work():
    for _ in range(100):
        KEPT.append(bytearray(100_000))
work()
os._exit(0)
"#;

const RUNS: usize = 4;

/// `memleak -c "python job.py"`, several times: the table at exit names the loop's line
/// every time.
#[test]
fn python_names_survive_the_exit() -> Result<()> {
    if !can_trace("python_names_survive_the_exit") {
        return Ok(());
    }
    let (label, python) = PYTHONS[1];
    if !Path::new(python).exists() {
        eprintln!("\n*** SKIPPED Python {label}: {python} is missing ***\n");
        return Ok(());
    }
    let scratch = Scratch::new("python_exit")?;
    let script = scratch.path("job.py");
    std::fs::write(&script, JOB)?;
    let mut failures = Vec::new();
    for run in 0..RUNS {
        let out = scratch.path(&format!("report{run}.json"));
        let command = format!("{python} {}", script.display());
        let args = ["-c", &command, "--json", out.to_str().unwrap()];
        let finished = run_memleak(&scratch, &args, None, TIMEOUT)?;
        expect_success(&finished)?;
        let report = Report::read(&out)?;
        let all = stacks(report.final_snapshot());
        let bytes: u64 = all
            .iter()
            .filter(|s| {
                let py = python_frames(s);
                py.first() == Some(&("work".into(), "job.py".into(), 5))
                    && py.get(1) == Some(&("<module>".into(), "job.py".into(), 6))
            })
            .map(|s| s["bytes"].as_u64().unwrap_or(0))
            .sum();
        if bytes < 100 * 100_000 {
            failures.push(format!(
                "run {run}: {bytes} bytes at work (job.py:5) ← <module> (job.py:6); stacks:\n  {}",
                all.iter()
                    .take(6)
                    .map(describe_stack)
                    .collect::<Vec<_>>()
                    .join("\n  ")
            ));
        }
    }
    ensure!(
        failures.is_empty(),
        "Python {label}, names lost at exit in {} of {RUNS} runs:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}
