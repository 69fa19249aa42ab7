//! `cargo xtask bench`: what tracing costs the traced program, on real workloads run untraced,
//! under memleak and (with `--with-bcc`) under BCC's `memleak-bpfcc`:
//! - `tests/fixtures/churn.c`: free/malloc pairs, reported in ns per pair, plus the outstanding
//!   total each tracer reports against the exact live set the program holds;
//! - a CPython 3.11 JSON encode/decode loop, in seconds.
//!
//! memleak runs three times: in the allocation mode, in `--mode growth` (no uprobes; on churn
//! over 100× as many pairs, as its cost is below a short round's noise), and as the trap
//! floor (`--empty-probes`: the same probes, programs that return at once), against which
//! memleak's own work per call is told apart from the trap's. Python also gets memray (from
//! PyPI, in a venv the bench makes), allocations at two Python stack depths, and a FastAPI
//! service under wrk (`service`).
//!
//! Each workload prints `ready PID`, waits for a start line, prints its result and then holds its
//! memory until a second line. The bench sends the start line only once the tracer's breakpoints
//! are in the target's libc (it compares the target's `malloc`/`free` bytes with the file's), so
//! no measured call runs untraced; the offsets that changed show where the probes sit.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Lines, Read, Seek, SeekFrom, Write},
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use object::{Object, ObjectSection, ObjectSymbol};

use crate::{run, workspace_root};

mod bpf_stats;
mod python;
mod service;
mod workers;

pub struct Options {
    pub with_bcc: bool,
    pub pairs: u64,
    /// Rounds per workload run; the best one is reported (the machine is shared).
    pub rounds: u32,
    /// Other memleak binaries to measure beside this build (e.g. main's, to see a change).
    pub compare: Vec<PathBuf>,
    /// Only the churn and workers sections (the Python ones take minutes).
    pub only_churn: bool,
}

/// The JSON workload: many small dicts and strings, as a web service would churn.
const JSON_ROUNDTRIP: &str = r#"
import json, os, sys, time
doc = {"items": [{"id": i, "name": "item%d" % i, "tags": ["a", "b", str(i)], "score": i * 0.5,
                  "text": "x" * (i % 700)} for i in range(300)]}
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    for _ in range(150):
        json.loads(json.dumps(doc))
    print("seconds %.4f" % (time.perf_counter() - start), flush=True)
print("live unknown", flush=True)
sys.stdin.readline()
"#;

/// Runs Debian bookworm's `memleak-bpfcc` (BCC 0.26) with its ctypes binding fixed: it declares
/// `bpf_attach_uprobe` without the `ref_ctr_offset` argument that libbcc takes, so the kernel
/// gets stack garbage there and refuses every uprobe with EINVAL (BCC pull request 5269).
const BCC_WRAPPER: &str = r#"
import ctypes, runpy, sys
from bcc import libbcc
attach = libbcc.lib.bpf_attach_uprobe
attach.argtypes = list(attach.argtypes) + [ctypes.c_uint32]
libbcc.lib.bpf_attach_uprobe = lambda *args: attach(*args, 0)
sys.argv[0] = "/usr/sbin/memleak-bpfcc"
runpy.run_path(sys.argv[0], run_name="__main__")
"#;

/// The tracer that is memleak's probes with nothing in them.
const FLOOR: &str = "memleak floor";
const BCC: &str = "memleak-bpfcc";

/// How long a tracer may take to put its probes in (BCC compiles C first).
const ATTACH_TIMEOUT: Duration = Duration::from_secs(180);
const REPORT_INTERVAL_S: u32 = 1;

pub fn run_bench(memleak: &Path, opts: &Options) -> Result<()> {
    let out = workspace_root().join("target/bench");
    std::fs::create_dir_all(&out)?;
    let churn = out.join("churn");
    run(Command::new("cc")
        .args(["-O2", "-g", "-fno-omit-frame-pointer", "-o"])
        .arg(&churn)
        .arg(workspace_root().join("tests/fixtures/churn.c")))?;
    let tracers = tracers(memleak, opts, &out)?;
    // Held to the end: the BPF time per call the rows show.
    let _stats = bpf_stats::enable()
        .inspect_err(|e| println!("BPF run times: not available: {e:#}"))
        .ok();
    println!(
        "load average: {}",
        std::fs::read_to_string("/proc/loadavg")?.trim()
    );
    let churn_cmd = |pairs: u64| {
        let mut c = Command::new(&churn);
        c.args([pairs.to_string(), opts.rounds.to_string()]);
        c
    };
    churn_bench(&tracers, &out, opts, &churn_cmd)?;
    workers_bench(&tracers, &out, opts, &churn_cmd)?;
    if opts.only_churn {
        return Ok(());
    }
    match crate::setup::python311() {
        Ok(python) => python_benches(&python, &tracers, &out, opts.rounds),
        Err(e) => {
            println!("\nSKIP the Python workload: {e:#}");
            Ok(())
        }
    }
}

/// This build's memleak (floor, allocation mode, growth), the `--compare` builds, and BCC
/// when asked for and installable.
fn tracers(memleak: &Path, opts: &Options, out: &Path) -> Result<Vec<Tracer>> {
    let mut tracers = vec![
        Tracer::floor(memleak),
        Tracer::memleak("memleak".into(), memleak),
        Tracer::growth(memleak),
    ];
    for (i, other) in opts.compare.iter().enumerate() {
        println!("memleak#{}: {}", i + 2, other.display());
        tracers.push(Tracer::memleak(format!("memleak#{}", i + 2), other));
    }
    if opts.with_bcc {
        match ensure_bcc() {
            Ok(()) => {
                let wrapper = out.join("memleak_bpfcc.py");
                std::fs::write(&wrapper, BCC_WRAPPER)?;
                tracers.push(Tracer::bcc(&wrapper));
            }
            Err(e) => println!("memleak-bpfcc: not available: {e:#}"),
        }
    }
    Ok(tracers)
}

/// Free/malloc pairs under every tracer but growth mode, then under growth mode alone.
fn churn_bench(
    tracers: &[Tracer],
    out: &Path,
    opts: &Options,
    churn_cmd: &dyn Fn(u64) -> Command,
) -> Result<()> {
    // `--mode growth` puts no probe on this path, so its cost is below the noise of a round of
    // 1 ms: it gets rounds 100× longer, against an untraced run of the same length.
    for (pairs, growth) in [(opts.pairs, false), (opts.pairs * 100, true)] {
        println!(
            "\n== churn: {pairs} free/malloc pairs of 16..1040 bytes, ns per pair (best of {}){}",
            opts.rounds,
            if growth { ", --mode growth" } else { "" }
        );
        let base = measure(churn_cmd(pairs), None, "ns_per_pair", out)?;
        print_row("untraced", &base, None);
        let rows = measure_tracers(
            tracers,
            |t| t.growth == growth,
            &base,
            out,
            || churn_cmd(pairs),
            "ns_per_pair",
        );
        print_floor_ratio(&base, &rows);
    }
    Ok(())
}

/// The JSON loop (under every tracer and memray), the two stack depths and the service.
fn python_benches(python: &Path, tracers: &[Tracer], out: &Path, rounds: u32) -> Result<()> {
    let script = out.join("json_roundtrip.py");
    std::fs::write(&script, JSON_ROUNDTRIP)?;
    println!(
        "\n== {} JSON round-trip, seconds (best of {rounds})",
        python.display()
    );
    let py_cmd = || {
        let mut c = Command::new(python);
        c.arg(&script).arg(rounds.to_string());
        c
    };
    let base = measure(py_cmd(), None, "seconds", out)?;
    print_row("untraced", &base, None);
    let rows = measure_tracers(tracers, |_| true, &base, out, py_cmd, "seconds");
    print_floor_ratio(&base, &rows);
    let venv = python::venv(python, out);
    match &venv {
        Ok(venv) => {
            for native in [false, true] {
                let mut c = python::under_memray(venv, out, native);
                c.arg(&script).arg(rounds.to_string());
                let name = if native { "memray --native" } else { "memray" };
                match measure(c, None, "seconds", out) {
                    Ok(m) => print_row(name, &m, Some(&base)),
                    Err(e) => println!("{name:<14} failed: {e:#}"),
                }
            }
        }
        Err(e) => println!("memray: not available: {e:#}"),
    }
    depth_bench(python, tracers, out, rounds)?;
    let wrk = crate::setup::ensure_debian_packages(&["wrk"]);
    match (&venv, wrk) {
        (Ok(venv), Ok(())) => service_bench(venv, tracers, out, rounds),
        (Err(e), _) => println!("\nSKIP the service: no venv: {e:#}"),
        (_, Err(e)) => println!("\nSKIP the service: no wrk: {e:#}"),
    }
    Ok(())
}

/// `workers::WORKERS` churn processes under one memleak each (memleak's own tracers, not
/// BCC's or growth mode's), against one untraced worker.
fn workers_bench(
    tracers: &[Tracer],
    out: &Path,
    opts: &Options,
    churn: &dyn Fn(u64) -> Command,
) -> Result<()> {
    println!(
        "\n== {} churn workers traced by one memleak, ns per pair (median worker, best of {} rounds each)",
        workers::WORKERS,
        opts.rounds
    );
    let base = measure(churn(opts.pairs), None, "ns_per_pair", out)?;
    print_row("untraced", &base, None);
    let ours = tracers
        .iter()
        .filter(|t| !t.growth && t.program.ends_with("memleak"));
    for t in ours {
        match workers::measure(
            t,
            || churn(opts.pairs),
            opts.pairs * u64::from(opts.rounds),
            out,
        ) {
            Ok(cost) => workers::print(&t.name, &cost, &base),
            Err(e) => println!("{:<14} failed: {e:#}", t.name),
        }
    }
    Ok(())
}

/// Runs the workload under each tracer that `wanted` picks and prints its row.
fn measure_tracers<'t>(
    tracers: &'t [Tracer],
    wanted: impl Fn(&Tracer) -> bool,
    base: &Measurement,
    out: &Path,
    cmd: impl Fn() -> Command,
    key: &str,
) -> Vec<(&'t Tracer, Measurement)> {
    let mut rows = Vec::new();
    for t in tracers.iter().filter(|t| wanted(t)) {
        match measure(cmd(), Some(t), key, out) {
            Ok(m) => {
                print_row(&t.name, &m, Some(base));
                rows.push((t, m));
            }
            Err(e) => println!("{:<14} failed: {e:#}", t.name),
        }
    }
    rows
}

/// memleak's added cost as a multiple of the trap floor's (the target: at most 1.15×).
fn print_floor_ratio(base: &Measurement, rows: &[(&Tracer, Measurement)]) {
    let added = |name: &str| {
        rows.iter()
            .find(|(t, _)| t.name == name)
            .map(|(_, m)| m.value - base.value)
    };
    if let (Some(floor), Some(memleak)) = (added(FLOOR), added("memleak")) {
        println!(
            "memleak's added cost / the floor's: {:.2}× ({memleak:.3} over untraced against {floor:.3})",
            memleak / floor
        );
    }
}

/// The same allocations from 2 and from 40 Python frames deep: what a deep stack adds per
/// traced allocation (the target: no more than a shallow one, ±10%).
fn depth_bench(python: &Path, tracers: &[Tracer], out: &Path, rounds: u32) -> Result<()> {
    let script = out.join("depth_churn.py");
    std::fs::write(&script, python::DEPTH_CHURN)?;
    println!(
        "\n== allocations at a Python stack depth, ns added per 4 KiB bytearray (best of {rounds})"
    );
    // Per memleak build (and the floor): ns added at each depth.
    let mut added: Vec<(&str, Vec<f64>)> = Vec::new();
    for depth in [2, 40] {
        let cmd = || {
            let mut c = Command::new(python);
            c.arg(&script).args([depth.to_string(), rounds.to_string()]);
            c
        };
        let base = measure(cmd(), None, "seconds", out)?;
        let mut row = format!(
            "depth {depth:<3} untraced {:>7.0} ns",
            per_alloc(base.value)
        );
        for t in tracers.iter().filter(|t| t.is_memleak_allocation_mode()) {
            let m = measure(cmd(), Some(t), "seconds", out)?;
            let ns = per_alloc(m.value - base.value);
            row += &format!("  {} +{ns:.0}", t.name);
            if let Some(probe) = bpf_stats::return_probe_ns(&m.bpf) {
                row += &format!(" (return probe {probe:.0})");
            }
            match added.iter_mut().find(|(n, _)| *n == t.name) {
                Some((_, v)) => v.push(ns),
                None => added.push((&t.name, vec![ns])),
            }
        }
        println!("{row}");
    }
    for (name, ns) in &added {
        if let [shallow, deep] = ns[..] {
            println!(
                "{name}: 40 frames deep / 2 frames deep: {:.2}×",
                deep / shallow
            );
        }
    }
    Ok(())
}

fn per_alloc(seconds: f64) -> f64 {
    seconds / python::DEPTH_CHURN_ALLOCS * 1e9
}

/// The FastAPI service untraced, under every tracer and under memray, `rounds` times in turn:
/// the machine's speed drifts, so each share is taken against the untraced run of its own
/// round, and the median of each row is printed with its spread.
fn service_bench(venv: &Path, tracers: &[Tracer], out: &Path, rounds: u32) {
    println!(
        "\n== FastAPI + uvicorn on the loopback, wrk 16 connections × 10 s, {rounds} rounds in \
         turn: medians (min–max of the share)"
    );
    let mut rows: Vec<(String, Vec<Shared>)> = Vec::new();
    let mut add = |name: &str, l: service::Load, base: f64| {
        let shared = Shared {
            share: l.requests_per_s / base,
            load: l,
        };
        match rows.iter_mut().find(|(n, _)| n == name) {
            Some((_, runs)) => runs.push(shared),
            None => rows.push((name.to_string(), vec![shared])),
        }
    };
    for _ in 0..rounds {
        let base = match service::measure(venv, out, service::Server::Plain, None) {
            Ok(b) => b,
            Err(e) => {
                println!("service untraced failed: {e:#}");
                continue;
            }
        };
        let base_rate = base.requests_per_s;
        add("untraced", base, base_rate);
        for t in tracers {
            match service::measure(venv, out, service::Server::Plain, Some(t)) {
                Ok(l) => add(&t.name, l, base_rate),
                Err(e) => println!("{:<16} failed: {e:#}", t.name),
            }
        }
        for native in [false, true] {
            let name = if native { "memray --native" } else { "memray" };
            let memray = service::Server::Memray { native, out };
            match service::measure(venv, out, memray, None) {
                Ok(l) => add(name, l, base_rate),
                Err(e) => println!("{name:<16} failed: {e:#}"),
            }
        }
    }
    for (name, runs) in &rows {
        print_load(name, runs);
    }
}

/// One service run and its requests/s as a share of its round's untraced run.
struct Shared {
    load: service::Load,
    share: f64,
}

fn print_load(name: &str, runs: &[Shared]) {
    let median = |f: &dyn Fn(&Shared) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    };
    let (share, low, high) = median(&|r| r.share);
    let mut row = format!(
        "{name:<16} {:>8.0} req/s ({share:.2} of untraced, {low:.2}–{high:.2})  p50 {:>6.2} ms  \
         p99 {:>6.2} ms",
        median(&|r| r.load.requests_per_s).0,
        median(&|r| r.load.p50_ms).0,
        median(&|r| r.load.p99_ms).0,
    );
    if runs.iter().all(|r| r.load.return_probe_ns.is_some()) {
        let (ns, low, high) = median(&|r| r.load.return_probe_ns.unwrap_or(0.0));
        row += &format!("  return probe {ns:.0} ns/call ({low:.0}–{high:.0})");
    }
    println!("{row}");
}

/// A tracer command line, with the target's pid appended by [`Tracer::spawn`].
struct Tracer {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    /// `--mode growth`: no breakpoints to wait for and no allocation table to check; the
    /// tracer's own "Attaching" line says it is in place.
    growth: bool,
}

impl Tracer {
    fn memleak(name: String, path: &Path) -> Self {
        Tracer {
            name,
            program: path.to_path_buf(),
            args: vec![],
            growth: false,
        }
    }

    fn floor(path: &Path) -> Self {
        Tracer {
            name: FLOOR.into(),
            program: path.to_path_buf(),
            args: vec!["--empty-probes".into()],
            growth: false,
        }
    }

    fn growth(path: &Path) -> Self {
        Tracer {
            name: "memleak growth".into(),
            program: path.to_path_buf(),
            args: vec!["--mode".into(), "growth".into()],
            growth: true,
        }
    }

    fn bcc(wrapper: &Path) -> Self {
        Tracer {
            name: BCC.into(),
            program: PathBuf::from("/usr/bin/python3"),
            args: vec![wrapper.display().to_string()],
            growth: false,
        }
    }

    /// memleak's allocation mode (this build, the `--compare` ones) or its trap floor.
    fn is_memleak_allocation_mode(&self) -> bool {
        self.name == FLOOR || self.name.starts_with("memleak") && !self.growth && self.name != BCC
    }

    fn spawn(&self, pid: u32, log: &Path) -> Result<Running> {
        self.spawn_for(&[pid], log)
    }

    /// The tracer over every process of `pids` (`-p A,B,...`).
    fn spawn_for(&self, pids: &[u32], log: &Path) -> Result<Running> {
        let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .args(["-p", &pids.join(","), &REPORT_INTERVAL_S.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped");
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Ok(Running {
            child,
            lines,
            log: log.to_path_buf(),
        })
    }
}

/// A tracer at work; its stdout lines are collected with their arrival time.
struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    log: PathBuf,
}

impl Running {
    fn exited(&mut self) -> Result<Option<String>> {
        Ok(self.child.try_wait()?.map(|status| {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            format!(
                "exited ({status}): {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            )
        }))
    }

    /// The outstanding total of the first full report that starts `settle` after `since`
    /// (BCC hides allocations younger than 500 ms): (bytes, allocations).
    fn outstanding_after(&mut self, since: Instant, settle: Duration) -> Result<(u64, u64)> {
        let deadline = Instant::now() + settle + Duration::from_secs(15);
        loop {
            {
                let lines = self.lines.lock().unwrap();
                let headers: Vec<usize> = lines
                    .iter()
                    .enumerate()
                    .filter(|(_, (t, l))| *t >= since + settle && is_report_header(l))
                    .map(|(i, _)| i)
                    .collect();
                if let [first, next, ..] = headers[..] {
                    return Ok(lines[first + 1..next]
                        .iter()
                        .filter_map(|(_, l)| outstanding_entry(l))
                        .fold((0, 0), |(b, n), (eb, en)| (b + eb, n + en)));
                }
            }
            if let Some(why) = self.exited()? {
                bail!("the tracer {why}");
            }
            if Instant::now() > deadline {
                bail!("no complete report within {settle:?} + 15 s");
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    fn stop(mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    self.child.kill()?;
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        self.child.wait()?;
        Ok(())
    }
}

/// `[12:00:01] Top 10 stacks with outstanding allocations:` (BCC and memleak alike).
fn is_report_header(line: &str) -> bool {
    line.contains("stacks with outstanding allocations")
}

/// `\t31814 bytes in 64 allocations from stack` → (31814, 64).
fn outstanding_entry(line: &str) -> Option<(u64, u64)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words[..] {
        [
            bytes,
            "bytes",
            "in",
            allocs,
            "allocations",
            "from",
            "stack",
            ..,
        ] => Some((bytes.parse().ok()?, allocs.parse().ok()?)),
        _ => None,
    }
}

/// One workload run: its result, and under a tracer where the probes sat and what it reported.
struct Measurement {
    value: f64,
    /// What the workload still holds at the end: (blocks, bytes), when it says.
    live: Option<(u64, u64)>,
    probes: Option<String>,
    outstanding: Option<Result<(u64, u64)>>,
    /// memleak's BPF programs that ran: (ns, calls) by name.
    bpf: BTreeMap<String, (u64, u64)>,
}

fn measure(
    mut cmd: Command,
    tracer: Option<&Tracer>,
    key: &str,
    out: &Path,
) -> Result<Measurement> {
    let mut target = Workload::spawn(&mut cmd)?;
    let mut running = match tracer {
        Some(t) => {
            let log = out.join(format!("{}.stderr.log", t.name));
            let mut r = t.spawn(target.pid, &log)?;
            let ready = if t.growth {
                wait_for_attach(&mut r).map(|()| "no probes (tracepoints)".to_string())
            } else {
                wait_for_probes(target.pid, &mut r)
            };
            match ready {
                Ok(probes) => Some((r, probes)),
                Err(e) => {
                    r.stop()?;
                    target.finish()?;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    target.start()?;
    let (value, live) = target.results(key)?;
    let done = Instant::now();
    let bpf = running
        .as_ref()
        .map(|(r, _)| bpf_stats::of_process(r.child.id()))
        .unwrap_or_default();
    let (outstanding, probes) = match running.take() {
        Some((r, probes)) if tracer.is_some_and(|t| t.growth) => {
            r.stop()?;
            (None, Some(probes))
        }
        Some((mut r, probes)) => {
            let total = r.outstanding_after(done, Duration::from_millis(1500));
            r.stop()?;
            (Some(total), Some(probes))
        }
        None => (None, None),
    };
    target.finish()?;
    Ok(Measurement {
        value,
        live,
        probes,
        outstanding,
        bpf,
    })
}

fn print_row(name: &str, m: &Measurement, base: Option<&Measurement>) {
    let mut row = format!("{name:<14} {:>10.3}", m.value);
    if let Some(b) = base {
        row += &format!("  ({:>7.2}×)", m.value / b.value);
    }
    if let Some(p) = &m.probes {
        row += &format!("  breakpoints at {p}");
    }
    match (&m.outstanding, m.live) {
        (Some(Ok((bytes, n))), Some((live_n, live_bytes))) => {
            let verdict = if (*bytes, *n) == (live_bytes, live_n) {
                "exact"
            } else {
                "WRONG"
            };
            row += &format!(
                "  outstanding {bytes} B in {n} (holds {live_bytes} B in {live_n}: {verdict})"
            );
        }
        (Some(Ok((bytes, n))), None) => row += &format!("  outstanding {bytes} B in {n}"),
        (Some(Err(e)), _) => row += &format!("  outstanding: {e:#}"),
        (None, _) => {}
    }
    if !m.bpf.is_empty() {
        row += &format!("  BPF per call: {}", bpf_stats::summary(&m.bpf));
    }
    println!("{row}");
}

fn word_after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()
}

/// A workload process speaking the ready/start/finish protocol on its stdin and stdout.
struct Workload {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    pid: u32,
}

impl Workload {
    fn spawn(cmd: &mut Command) -> Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut w = Workload {
            child,
            stdin,
            stdout,
            pid: 0,
        };
        w.pid = w.value("ready")?.parse()?;
        Ok(w)
    }

    /// The word after `key` on the next line that has it, e.g. `ready 1234` → `1234`.
    fn value(&mut self, key: &str) -> Result<String> {
        for line in self.stdout.by_ref() {
            let line = line?;
            if let Some(v) = word_after(&line, key) {
                return Ok(v.to_string());
            }
        }
        bail!("the workload ended before printing {key}")
    }

    /// The best (lowest) `key` value of all rounds, and what the workload says it still holds
    /// (`live BLOCKS bytes BYTES`, or `live unknown`), which ends its output.
    fn results(&mut self, key: &str) -> Result<(f64, Option<(u64, u64)>)> {
        let mut best = f64::INFINITY;
        for line in self.stdout.by_ref() {
            let line = line?;
            if let Some(v) = word_after(&line, key) {
                best = best.min(v.parse()?);
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words[..] {
                ["live", n, "bytes", b] => return Ok((best, Some((n.parse()?, b.parse()?)))),
                ["live", ..] => return Ok((best, None)),
                _ => {}
            }
        }
        bail!("the workload ended before printing what it holds")
    }

    fn start(&mut self) -> Result<()> {
        writeln!(self.stdin, "go")?;
        Ok(())
    }

    fn finish(mut self) -> Result<()> {
        let _ = writeln!(self.stdin, "done");
        drop(self.stdin);
        let status = self.child.wait()?;
        if !status.success() {
            bail!("the workload failed: {status}");
        }
        Ok(())
    }
}

/// Waits until memleak says it is attached (growth mode leaves no mark in the target).
fn wait_for_attach(tracer: &mut Running) -> Result<()> {
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    loop {
        let said = |(_, l): &(Instant, String)| l.starts_with("Attaching to pid");
        if tracer.lines.lock().unwrap().iter().any(said) {
            return Ok(());
        }
        if let Some(why) = tracer.exited()? {
            bail!("the tracer {why}");
        }
        if Instant::now() > deadline {
            bail!("not attached after {ATTACH_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until a uprobe breakpoint shows in both `malloc` and `free` of the target's libc and
/// returns where, e.g. `malloc+0 free+3`.
fn wait_for_probes(pid: u32, tracer: &mut Running) -> Result<String> {
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    loop {
        let changed = changed_offsets(pid, &["malloc", "free"])?;
        if changed.values().all(|offsets| !offsets.is_empty()) {
            return Ok(changed
                .iter()
                .map(|(f, offs)| {
                    let offs: Vec<String> = offs.iter().map(|o| format!("{f}+{o}")).collect();
                    offs.join(" ")
                })
                .collect::<Vec<_>>()
                .join(" "));
        }
        if let Some(why) = tracer.exited()? {
            bail!("the tracer {why}");
        }
        if Instant::now() > deadline {
            bail!("no breakpoints in malloc and free after {ATTACH_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// For each function, the offsets within its first bytes where the target's memory differs
/// from its libc file: the int3 bytes a uprobe writes.
fn changed_offsets(
    pid: u32,
    functions: &[&'static str],
) -> Result<BTreeMap<&'static str, Vec<usize>>> {
    const SPAN: usize = 32;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let libc_path = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libc.so.6"))
        .context("the target has no libc.so.6 mapped")?;
    let host_path = format!("/proc/{pid}/root{libc_path}");
    let mut lib = File::open(&host_path).with_context(|| format!("opening {host_path}"))?;
    let mut data = Vec::new();
    lib.read_to_end(&mut data)?;
    let elf = object::File::parse(&*data)?;
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let mut changed = BTreeMap::new();
    for &name in functions {
        let file_offset = symbol_file_offset(&elf, name)?;
        let address = maps
            .lines()
            .filter(|l| l.ends_with(libc_path))
            .find_map(|l| map_address(l, file_offset))
            .with_context(|| format!("{name} is not mapped in pid {pid}"))?;
        let mut on_disk = [0u8; SPAN];
        lib.seek(SeekFrom::Start(file_offset))?;
        lib.read_exact(&mut on_disk)?;
        let mut in_memory = [0u8; SPAN];
        mem.read_exact_at(&mut in_memory, address)?;
        let offsets = (0..SPAN).filter(|&i| on_disk[i] != in_memory[i]).collect();
        changed.insert(name, offsets);
    }
    Ok(changed)
}

fn symbol_file_offset(elf: &object::File, name: &str) -> Result<u64> {
    let sym = elf
        .dynamic_symbols()
        .find(|s| s.name() == Ok(name) && s.is_definition())
        .with_context(|| format!("no {name} in libc"))?;
    let section = elf.section_by_index(sym.section_index().context("no section")?)?;
    let (start, _) = section.file_range().context("section without file data")?;
    Ok(start + sym.address() - section.address())
}

/// The address of `file_offset` if this maps line (`start-end perms offset dev inode path`)
/// covers it.
fn map_address(line: &str, file_offset: u64) -> Option<u64> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let offset = u64::from_str_radix(fields.nth(1)?, 16).ok()?;
    (offset..offset + (end - start))
        .contains(&file_offset)
        .then(|| start + file_offset - offset)
}

/// Installs BCC's tools and the kernel headers its compiler needs, and points
/// /lib/modules/$(uname -r)/{build,source} at them. Says what it did.
fn ensure_bcc() -> Result<()> {
    crate::setup::ensure_debian_packages(&["bpfcc-tools", "linux-headers-6.12-amd64"])?;
    let release = String::from_utf8(Command::new("uname").arg("-r").output()?.stdout)?;
    let modules = PathBuf::from("/lib/modules").join(release.trim());
    let (build, source) = headers_dirs()?;
    std::fs::create_dir_all(&modules)?;
    for (link, target) in [("build", &build), ("source", &source)] {
        let link = modules.join(link);
        if !link.exists() {
            println!("memleak-bpfcc: {} -> {}", link.display(), target.display());
            std::os::unix::fs::symlink(target, &link)?;
        }
    }
    Ok(())
}

/// The newest Debian 6.12 headers: (…-amd64, …-common).
fn headers_dirs() -> Result<(PathBuf, PathBuf)> {
    let mut amd64: Vec<PathBuf> = std::fs::read_dir("/usr/src")?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-headers-6.12") && n.ends_with("-amd64"))
        })
        .collect();
    amd64.sort();
    let build = amd64
        .pop()
        .context("no /usr/src/linux-headers-6.12*-amd64")?;
    let common = PathBuf::from(
        build
            .to_string_lossy()
            .trim_end_matches("-amd64")
            .to_string()
            + "-common",
    );
    if !common.is_dir() {
        bail!("no {}", common.display());
    }
    Ok((build, common))
}
