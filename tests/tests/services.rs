//! Several processes traced at once: `-p A,B` (each one's figures exactly as its own ledger
//! says, every stack carrying its process, the reports grouped by process) and the workers a
//! process forks from now on (`--children`: multiprocessing's pools, under fork and spawn).

use std::{collections::BTreeSet, path::Path, time::Duration};

use anyhow::{Context, Result, ensure};
use memleak_tests::{
    Ledger, Report, Running, Scratch, basename, can_trace, check_against_ledger, describe_stack,
    expect_success, frames, pyenv_python, skipped, stacks, wait_for_file, wait_for_text,
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

/// A pool of two workers, forked after memleak attached, whose task keeps 100 kB a call at
/// line 5; the parent only hands out tasks. Writes the workers' pids to `done`.
const POOL: &str = r#"import multiprocessing as mp, os, sys, time
KEPT = []

def task(i):
    KEPT.append(bytearray(100_000))
    time.sleep(0.02)
    return os.getpid()

if __name__ == "__main__":
    method, go, done = sys.argv[1:4]
    while not os.path.exists(go):
        time.sleep(0.05)
    mp.set_start_method(method)
    with mp.Pool(2) as pool:
        workers = set()
        deadline = time.time() + 5
        while time.time() < deadline:
            workers.update(pool.map(task, range(4), chunksize=1))
        with open(done + ".tmp", "w") as f:
            f.write(" ".join(map(str, sorted(workers))))
        os.rename(done + ".tmp", done)
        time.sleep(600)
"#;

/// Bytes held by the stacks of `pid` that pass through `file`:`line` in Python function
/// `function`.
fn held_at(snapshot: &Value, pid: u64, function: &str, file: &str, line: u64) -> u64 {
    let at = |f: &Value| {
        f["kind"] == "python"
            && f["function"] == function
            && basename(f["file"].as_str().unwrap_or("")) == file
            && f["line"].as_u64() == Some(line)
    };
    stacks(snapshot)
        .iter()
        .filter(|s| s["pid"].as_u64() == Some(pid) && frames(s).iter().any(at))
        .map(|s| s["bytes"].as_u64().unwrap_or(0))
        .sum()
}

/// `memleak -p PARENT --children` over the pool under `method`: the task's line is named in
/// the workers, never in the parent.
fn pool_leaks_in_workers(method: &str) -> Result<()> {
    let test = format!("pool_leaks_in_workers ({method})");
    let Some(python) = pyenv_python("3.11") else {
        skipped(&test, "no pyenv CPython 3.11");
        return Ok(());
    };
    let scratch = Scratch::new(&format!("services-pool-{method}"))?;
    let script = scratch.path("pool.py");
    std::fs::write(&script, POOL)?;
    let (go, done, out) = (
        scratch.path("go"),
        scratch.path("done"),
        scratch.path("out.json"),
    );
    let args = [&script, Path::new(method), &go, &done].map(|p| p.to_str().unwrap().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let parent = Running::start(&scratch, "python", &python, &args, None)?;
    parent.wait_for_mapping("libc.so", TIMEOUT)?;
    let pid = parent.pid().to_string();
    let tracer_args = ["-p", &pid, "--children", "--json", out.to_str().unwrap()];
    let tracer = Running::memleak(&scratch, &tracer_args, None)?;
    wait_for_text(&scratch.path("memleak.stdout"), "Attaching to pid", TIMEOUT)?;
    std::fs::write(&go, "")?;
    wait_for_file(&done, TIMEOUT)?;
    // A few maps ticks, to read the newest stacks' code objects.
    std::thread::sleep(Duration::from_secs(1));
    let run = tracer.interrupt(TIMEOUT)?;
    expect_success(&run)?;
    let report = Report::read(&out)?;
    let snapshot = report.final_snapshot();
    let workers: BTreeSet<u64> = std::fs::read_to_string(&done)?
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let listed: BTreeSet<u64> = report.json["processes"]
        .as_array()
        .context("no process list")?
        .iter()
        .filter_map(|p| p["pid"].as_u64())
        .collect();
    ensure!(
        workers.is_subset(&listed),
        "workers {workers:?} not all traced: {listed:?}\n{}",
        run.stdout
    );
    let in_workers: u64 = workers
        .iter()
        .map(|&w| held_at(snapshot, w, "task", "pool.py", 5))
        .sum();
    let in_parent = held_at(snapshot, u64::from(parent.pid()), "task", "pool.py", 5);
    let top: Vec<String> = stacks(snapshot)
        .iter()
        .take(8)
        .map(describe_stack)
        .collect();
    // 5 s of tasks keep about 10 MB; the first of them may run before the worker is traced.
    ensure!(
        in_workers >= 2_000_000 && in_parent == 0,
        "pool.py:5 holds {in_workers} B in the workers, {in_parent} B in the parent\n  {}",
        top.join("\n  ")
    );
    Ok(())
}

#[test]
fn pool_workers_forked_are_traced() -> Result<()> {
    if !can_trace("pool_workers_forked_are_traced") {
        return Ok(());
    }
    pool_leaks_in_workers("fork")
}

#[test]
fn pool_workers_spawned_are_traced() -> Result<()> {
    if !can_trace("pool_workers_spawned_are_traced") {
        return Ok(());
    }
    pool_leaks_in_workers("spawn")
}
