//! Several processes traced at once: `-p A,B` (each one's figures exactly as its own ledger
//! says, every stack carrying its process, the reports grouped by process) and the workers a
//! process forks from now on (`--children`: multiprocessing's pools, under fork and spawn).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

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
fn start(scratch: &Scratch, name: &str) -> Result<(Running, PathBuf)> {
    let fixture = scratch.compile(name, name, &[])?;
    start_as(scratch, &fixture, name)
}

/// Compiled `fixture` started in `attach` mode as `label` (its ledger's name).
fn start_as(scratch: &Scratch, fixture: &Path, label: &str) -> Result<(Running, PathBuf)> {
    let ledger = scratch.path(&format!("{label}.ledger.json"));
    let args = [ledger.to_str().unwrap(), "attach"];
    let target = Running::start(scratch, label, fixture, &args, None)?;
    target.wait_for_mapping("libc.so", Duration::from_secs(10))?;
    Ok((target, ledger))
}

/// The pids of the report's process list, in its order.
fn listed_pids(report: &Report) -> Result<Vec<u64>> {
    let list = report.json["processes"]
        .as_array()
        .context("no process list")?;
    Ok(list.iter().filter_map(|p| p["pid"].as_u64()).collect())
}

/// Once every fixture wrote its ledger, stops `tracer`: each fixture's stacks in the final
/// snapshot of the report at `out` match its own ledger exactly.
fn check_ledgers(
    tracer: Running,
    out: &Path,
    ledgers: &[(&Path, &str)],
) -> Result<(memleak_tests::Finished, Report)> {
    for &(ledger, _) in ledgers {
        wait_for_file(ledger, Duration::from_secs(45))?;
    }
    let run = tracer.interrupt(TIMEOUT)?;
    expect_success(&run)?;
    let report = Report::read(out)?;
    for &(ledger, source) in ledgers {
        let ledger = Ledger::read(ledger)?;
        let own = of_process(report.final_snapshot(), ledger.pid());
        check_against_ledger(&own, &ledger, source, |_| true)
            .with_context(|| format!("pid {} ({source})", ledger.pid()))?;
    }
    Ok((run, report))
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
    let ledgers = [
        (leaks_ledger.as_path(), "leaks.c"),
        (&threads_ledger, "threads.c"),
    ];
    let (run, report) = check_ledgers(tracer, &out, &ledgers)?;
    let listed = listed_pids(&report)?;
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

/// Blocks the flood fixture keeps: many times what `--max-allocs 1024` (2048 slots) holds.
const FLOOD: u64 = 20_000;

/// Process `pid`'s entry in a list of per-process entries (`processes`).
fn entry_of(list: &Value, pid: u64) -> Result<&Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .find(|p| p["pid"].as_u64() == Some(pid))
        .with_context(|| format!("no entry for pid {pid} in {list}"))
}

/// `lost`'s counts other than `allocs_map_full` that are not zero.
fn other_losses(lost: &Value) -> Vec<(String, Value)> {
    let counts = lost.as_object().into_iter().flatten();
    counts
        .filter(|(k, v)| *k != "allocs_map_full" && v.as_u64() != Some(0))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Two processes, one of which overflows the shared heap table once the other is done: the
/// loss is counted under the flooding process, exactly (what was kept plus what was lost is
/// every block it made), and nothing under the other, which still matches its ledger. The
/// text groups, the capture report and the JSON say the same per process.
#[test]
fn what_is_lost_is_counted_per_process() -> Result<()> {
    if !can_trace("what_is_lost_is_counted_per_process") {
        return Ok(());
    }
    let scratch = Scratch::new("services-lost")?;
    let (leaks, leaks_ledger) = start(&scratch, "leaks")?;
    let flood_bin = scratch.compile("flood", "flood", &[])?;
    let (go, done) = (scratch.path("go"), scratch.path("done"));
    let n = FLOOD.to_string();
    let flood_args = [n.as_str(), go.to_str().unwrap(), done.to_str().unwrap()];
    let flood = Running::start(&scratch, "flood", &flood_bin, &flood_args, None)?;
    flood.wait_for_mapping("libc.so", Duration::from_secs(10))?;
    let out = scratch.path("report.json");
    let pids = format!("{},{}", leaks.pid(), flood.pid());
    let args = ["-p", &pids, "-o", "0", "--max-allocs", "1024"];
    let args = [&args[..], &["--json", out.to_str().unwrap()]].concat();
    let tracer = Running::memleak(&scratch, &args, None)?;
    // The leaks fixture is done before the flood starts: the table had room for all of it.
    wait_for_file(&leaks_ledger, Duration::from_secs(45))?;
    std::fs::write(&go, "")?;
    let ledgers = [
        (done.as_path(), "flood"),
        (leaks_ledger.as_path(), "leaks.c"),
    ];
    for (file, _) in &ledgers {
        wait_for_file(file, Duration::from_secs(45))?;
    }
    let run = tracer.interrupt(TIMEOUT)?;
    expect_success(&run)?;
    let report = Report::read(&out)?;
    let last = report.final_snapshot();
    let ledger = Ledger::read(&leaks_ledger)?;
    check_against_ledger(&of_process(last, ledger.pid()), &ledger, "leaks.c", |_| {
        true
    })
    .context("the process that lost nothing")?;
    let (quiet, loud) = (u64::from(leaks.pid()), u64::from(flood.pid()));
    let counts = |pid| entry_of(&last["processes"], pid);
    let quiet_lost = &counts(quiet)?["lost"];
    let loud_lost = &counts(loud)?["lost"];
    let full = loud_lost["allocs_map_full"].as_u64().unwrap_or(0);
    let kept: u64 = stacks(&of_process(last, loud))
        .iter()
        .map(|s| s["count"].as_u64().unwrap_or(0))
        .sum();
    let context = || {
        format!(
            "quiet {quiet_lost}, flood {loud_lost}\n{}",
            run.transcript()
        )
    };
    ensure!(
        full > 0 && full + kept == FLOOD,
        "flood: {full} lost + {kept} kept, not {FLOOD}; {}",
        context()
    );
    ensure!(
        quiet_lost["allocs_map_full"] == 0 && other_losses(quiet_lost).is_empty(),
        "losses under the process that lost nothing: {}",
        context()
    );
    ensure!(other_losses(loud_lost).is_empty(), "{}", context());
    ensure!(
        last["lost"]["allocs_map_full"] == full,
        "the total is not the sum: {}",
        context()
    );
    // The JSON process list, the capture report's lines and the table's groups.
    let verdicts = &report.json["processes"];
    ensure!(entry_of(verdicts, loud)?["lost"]["allocs_map_full"] == full);
    ensure!(entry_of(verdicts, quiet)?["lost"]["allocs_map_full"] == 0);
    let said = format!("pid {loud}: ");
    let reported = run
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(&said));
    let summary_line = format!("; lost: allocs_map_full {full}");
    ensure!(
        reported.clone().any(|l| l.ends_with(&summary_line)),
        "no \"{summary_line}\" for pid {loud}: {}",
        context()
    );
    let table_line = format!("; lost: {full} allocations not recorded");
    ensure!(
        reported.clone().any(|l| l.contains(&table_line)),
        "no \"{table_line}\" in pid {loud}'s group: {}",
        context()
    );
    let quiet_group = format!("pid {quiet}: ");
    ensure!(
        run.stdout
            .lines()
            .any(|l| l.contains(&quiet_group) && l.ends_with("; lost: nothing")),
        "pid {quiet}'s group does not say it lost nothing: {}",
        context()
    );
    Ok(())
}

/// A pool of two workers, started after memleak attached, whose task keeps 100 kB a call at
/// line 5; the parent only hands out tasks. Writes the workers' pids to `done` + ".workers"
/// once they run, then waits for `done` + ".go" (memleak traces them) before the tasks.
const POOL: &str = r#"import multiprocessing as mp, os, sys, time
KEPT = []

def task(i):
    KEPT.append(bytearray(100_000))
    time.sleep(0.02)
    return os.getpid()

def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)

if __name__ == "__main__":
    method, go, done = sys.argv[1:4]
    while not os.path.exists(go):
        time.sleep(0.05)
    mp.set_start_method(method)
    with mp.Pool(2) as pool:
        write(done + ".workers", " ".join(str(p.pid) for p in pool._pool))
        while not os.path.exists(done + ".go"):
            time.sleep(0.05)
        workers = set()
        for _ in range(20):
            workers.update(pool.map(task, range(4), chunksize=1))
        write(done, " ".join(map(str, sorted(workers))))
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
    let stdout = scratch.path("memleak.stdout");
    wait_for_text(&stdout, "Attaching to pid", TIMEOUT)?;
    std::fs::write(&go, "")?;
    // The tasks run once memleak traces both workers.
    let pool = done.with_extension("workers");
    wait_for_file(&pool, TIMEOUT)?;
    for worker in std::fs::read_to_string(&pool)?.split_whitespace() {
        wait_for_text(&stdout, &format!("tracing pid {worker},"), TIMEOUT)?;
    }
    std::fs::write(done.with_extension("go"), "")?;
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
    let listed: BTreeSet<u64> = listed_pids(&report)?.into_iter().collect();
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
    // 80 tasks keep 8 MB, all in traced workers.
    ensure!(
        in_workers >= 80 * 100_000 && in_parent == 0,
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

/// The WSGI app: `/leak` keeps 200 kB at line 6 in the worker that serves it; every answer
/// is that worker's pid.
const APP: &str = r#"import os
KEPT = []

def app(environ, start_response):
    if environ["PATH_INFO"] == "/leak":
        KEPT.append(bytearray(200_000))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [str(os.getpid()).encode()]
"#;

/// `GET path` on the loopback; the body (a worker's pid).
fn get(port: u16, path: &str) -> Result<u64> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    body.trim()
        .parse()
        .with_context(|| format!("answer: {answer}"))
}

/// Waits until `port` answers.
fn wait_for_server(port: u16) -> Result<()> {
    let start = std::time::Instant::now();
    while get(port, "/").is_err() {
        ensure!(
            start.elapsed() < TIMEOUT,
            "gunicorn does not answer on port {port}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The pids memleak says it traces as children of `parent` so far.
fn traced_children(stdout: &Path, parent: u32) -> Vec<u64> {
    let text = std::fs::read_to_string(stdout).unwrap_or_default();
    let whose = format!(", child of pid {parent},");
    text.lines()
        .filter(|l| l.contains(&whose))
        .filter_map(|l| {
            l.strip_prefix("memleak: tracing pid ")?
                .split(',')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Waits until memleak traces `n` children of `parent`; their pids.
fn wait_for_children(stdout: &Path, parent: u32, n: usize) -> Result<Vec<u64>> {
    let start = std::time::Instant::now();
    loop {
        let children = traced_children(stdout, parent);
        if children.len() >= n {
            return Ok(children);
        }
        ensure!(
            start.elapsed() < TIMEOUT,
            "memleak traces {children:?}, not {n} children"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn gunicorn_workers_are_traced_and_replaced() -> Result<()> {
    let test = "gunicorn_workers_are_traced_and_replaced";
    let venv = memleak_tests::workspace_root().join("target/test-venv/bin/python");
    if !can_trace(test) || !memleak_tests::installed(test, venv.to_str().unwrap()) {
        return Ok(());
    }
    let scratch = Scratch::new("services-gunicorn")?;
    std::fs::write(scratch.path("app.py"), APP)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bind = format!("127.0.0.1:{port}");
    let dir = scratch.path("");
    let args = [
        "-m",
        "gunicorn",
        "--workers",
        "4",
        "--bind",
        &bind,
        "--chdir",
        dir.to_str().unwrap(),
        "app:app",
    ];
    let master = Running::start(&scratch, "gunicorn", &venv, &args, None)?;
    wait_for_server(port)?;
    let out = scratch.path("out.json");
    let pid = master.pid().to_string();
    let tracer_args = [
        "-p",
        &pid,
        "--children",
        "--duration",
        "20s",
        "--json",
        out.to_str().unwrap(),
    ];
    let tracer = Running::memleak(&scratch, &tracer_args, None)?;
    let stdout = scratch.path("memleak.stdout");
    let workers = wait_for_children(&stdout, master.pid(), 4)?;
    // A worker killed: memleak drops it, gunicorn forks its replacement, memleak traces it.
    let killed = workers[0];
    unsafe { libc::kill(killed as i32, libc::SIGKILL) };
    let replacement = *wait_for_children(&stdout, master.pid(), 5)?.last().unwrap();
    let mut served = std::collections::BTreeMap::<u64, u64>::new();
    for _ in 0..40 {
        *served.entry(get(port, "/leak")?).or_default() += 1;
        get(port, "/")?;
    }
    let run = tracer.wait(TIMEOUT)?;
    expect_success(&run)?;
    let report = Report::read(&out)?;
    let snapshot = report.final_snapshot();
    let processes = report.json["processes"]
        .as_array()
        .context("no process list")?;
    let entry = |pid: u64| processes.iter().find(|p| p["pid"].as_u64() == Some(pid));
    ensure!(
        entry(killed).is_some_and(|p| p["exited"].is_string()),
        "killed worker {killed} not listed as exited: {processes:?}"
    );
    ensure!(
        entry(replacement).is_some(),
        "replacement {replacement} not listed: {processes:?}"
    );
    let top: Vec<String> = stacks(snapshot)
        .iter()
        .take(8)
        .map(describe_stack)
        .collect();
    for (&worker, &n) in &served {
        let held = held_at(snapshot, worker, "app", "app.py", 6);
        ensure!(
            held >= n * 200_000,
            "worker {worker} served /leak {n} times, app.py:6 holds {held} B there\n  {}",
            top.join("\n  ")
        );
    }
    let master_held = held_at(snapshot, u64::from(master.pid()), "app", "app.py", 6);
    ensure!(
        master_held == 0,
        "the master is blamed for {master_held} B at app.py:6"
    );
    // Each worker's own owner walk names the list, with as many bytearrays as it served.
    for (&worker, &n) in &served {
        let kept = kept_in(&report.json, worker);
        ensure!(
            kept == n,
            "worker {worker} served /leak {n} times, its walk finds {kept} in `KEPT`: {:#}",
            report.json["owners_by_process"]
        );
    }
    let in_master = kept_in(&report.json, u64::from(master.pid()));
    ensure!(
        in_master == 0,
        "the master's walk finds {in_master} in `KEPT`"
    );
    Ok(())
}

/// The bytearrays process `pid`'s owner walk finds in the app's module list `KEPT`.
fn kept_in(report: &Value, pid: u64) -> u64 {
    let walks = report["owners_by_process"]["processes"].as_array();
    let walk = walks.into_iter().flatten().find(|p| p["pid"] == pid);
    let owners = walk
        .and_then(|p| p["owners"].as_array())
        .into_iter()
        .flatten();
    owners
        .filter(|o| o["type_name"] == "bytearray")
        .filter(|o| o["held_by"] == "in list `KEPT` of module `app`")
        .filter_map(|o| o["count"].as_u64())
        .sum()
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// beside v1 hierarchies).
fn cgroup2_mount() -> Option<std::path::PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let fields: Vec<&str> = l.split_whitespace().collect();
        (fields.get(2) == Some(&"cgroup2")).then(|| fields[1].into())
    })
}

/// A cgroup v2 directory made for a test, removed at the end (its processes killed first).
struct Cgroup(std::path::PathBuf);

impl Drop for Cgroup {
    fn drop(&mut self) {
        for pid in std::fs::read_to_string(self.0.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
        {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        // Killed processes leave the cgroup once reaped: a few tries.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn cgroup_processes_moved_in_later_are_traced() -> Result<()> {
    let test = "cgroup_processes_moved_in_later_are_traced";
    if !can_trace(test) {
        return Ok(());
    }
    let Some(root) = cgroup2_mount() else {
        assert!(
            !memleak_tests::in_ci(),
            "{test}: no cgroup v2 hierarchy under CI"
        );
        skipped(test, "no cgroup v2 hierarchy mounted");
        return Ok(());
    };
    let scratch = Scratch::new("services-cgroup")?;
    let cgroup = Cgroup(root.join(format!("memleak-test-{}", std::process::id())));
    std::fs::create_dir(&cgroup.0)?;
    let out = scratch.path("out.json");
    let dir = cgroup.0.to_str().unwrap();
    let tracer = Running::memleak(
        &scratch,
        &["--cgroup", dir, "-o", "0", "--json", out.to_str().unwrap()],
        None,
    )?;
    wait_for_text(
        &scratch.path("memleak.stdout"),
        "Attaching to cgroup",
        TIMEOUT,
    )?;
    let (leaks, leaks_ledger) = start(&scratch, "leaks")?;
    let (threads, threads_ledger) = start(&scratch, "threads")?;
    // Each waits for its probes (up to 30 s), then leaks and writes its ledger.
    for target in [&leaks, &threads] {
        std::fs::write(cgroup.0.join("cgroup.procs"), target.pid().to_string())?;
    }
    let ledgers = [
        (leaks_ledger.as_path(), "leaks.c"),
        (&threads_ledger, "threads.c"),
    ];
    check_ledgers(tracer, &out, &ledgers).map(drop)
}

/// The distinct ELF files process `pid` maps, by (device, inode): what a tracer of it must
/// read and parse.
fn mapped_elf_files(pid: u32) -> Result<BTreeSet<(String, u64)>> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mut files = BTreeSet::new();
    for line in maps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(range), Some(dev), Some(inode)) = (fields.first(), fields.get(3), fields.get(4))
        else {
            continue;
        };
        let inode: u64 = inode.parse()?;
        let mut magic = [0u8; 4];
        let file = format!("/proc/{pid}/map_files/{range}");
        let elf = std::fs::File::open(&file)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok_and(|_| magic == *b"\x7fELF");
        if inode != 0 && elf {
            files.insert((dev.to_string(), inode));
        }
    }
    Ok(files)
}

/// `-v`'s "objects: P parsed, R files read, S answers from memory".
fn object_counts(stderr: &str) -> Result<(usize, usize, usize)> {
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("memleak: objects: "))
        .with_context(|| format!("no objects line in:\n{stderr}"))?;
    let n: Vec<usize> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    ensure!(n.len() == 3, "objects line {line:?}");
    Ok((n[0], n[1], n[2]))
}

/// The files the report's frames are in (`leaks`, `libc.so.6`; not `[vdso]`).
fn modules_named(json: &Value, out: &mut BTreeSet<String>) {
    match json {
        Value::Object(o) => {
            if let Some(m) = o.get("module").and_then(Value::as_str)
                && !m.starts_with('[')
            {
                out.insert(m.to_string());
            }
            o.values().for_each(|v| modules_named(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| modules_named(v, out)),
        _ => {}
    }
}

/// Four processes of one program: each object they map (the program, libc, ld.so) is read
/// and parsed once, the three later processes served from memory; each process's figures
/// still match its own ledger. The symbolizer reads each object that frames are named in
/// once more, after the setup has let go of the bytes (once for all processes); the owner
/// walk (left out here) would read some again for the names of their globals.
#[test]
fn four_processes_of_one_program_read_each_object_once() -> Result<()> {
    if !can_trace("four_processes_of_one_program_read_each_object_once") {
        return Ok(());
    }
    let scratch = Scratch::new("services-four")?;
    let fixture = scratch.compile("leaks", "leaks", &[])?;
    let running: Vec<(Running, PathBuf)> = (0..4)
        .map(|i| start_as(&scratch, &fixture, &format!("leaks{i}")))
        .collect::<Result<_>>()?;
    let files = mapped_elf_files(running[0].0.pid())?;
    ensure!(files.len() >= 3, "the fixture maps {files:?}");
    let pids: Vec<String> = running.iter().map(|(t, _)| t.pid().to_string()).collect();
    let out = scratch.path("report.json");
    let (pids, json) = (pids.join(","), out.to_str().unwrap());
    let args = ["-v", "-p", &pids, "-o", "0", "--no-owners", "--json", json];
    let tracer = Running::memleak(&scratch, &args, None)?;
    let ledgers: Vec<(&Path, &str)> = running
        .iter()
        .map(|(_, l)| (l.as_path(), "leaks.c"))
        .collect();
    let (run, report) = check_ledgers(tracer, &out, &ledgers)?;
    let (parsed, read, shared) = object_counts(&run.stderr)?;
    let n = files.len();
    let mut named = BTreeSet::new();
    modules_named(&report.json, &mut named);
    ensure!(
        parsed == n && read == n + named.len(),
        "{n} objects mapped ({files:?}), frames in {named:?}: {parsed} parsed, {read} files read"
    );
    // At least: each later process's binding of each object.
    ensure!(
        shared >= 3 * n,
        "{shared} answers from memory for {n} objects"
    );
    Ok(())
}
