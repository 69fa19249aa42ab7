//! Helpers for the integration tests: build fixtures, run memleak, read its JSON, and compare
//! what it reports with the ledger a fixture writes about its own leaks.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs::File,
    io::Write as _,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `MEMLEAK_BIN` (set by `cargo xtask test`), else the release build in this workspace.
pub fn memleak_bin() -> PathBuf {
    std::env::var_os("MEMLEAK_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/memleak"))
}

/// True when the test can run. Tracing needs root and a built memleak; without root the test
/// says loudly that it skips (a silent pass would hide that nothing was tested), and under CI
/// (`CI` set), where the run is root, it fails instead.
pub fn can_trace(test: &str) -> bool {
    if unsafe { libc::geteuid() } != 0 {
        assert!(
            !in_ci(),
            "{test} needs root: under CI a test that needs root may not skip"
        );
        skipped(test, "needs root");
        return false;
    }
    let bin = memleak_bin();
    assert!(
        bin.exists(),
        "{test}: no memleak binary at {} (build it or set MEMLEAK_BIN)",
        bin.display()
    );
    true
}

/// Whether this is a CI run (`CI` set to anything but "", "0" or "false").
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"))
}

/// True when `file` (installed by `cargo xtask test`) is there; otherwise says loudly that
/// `test` skips, and fails under CI, whose setup must have installed it.
pub fn installed(test: &str, file: &str) -> bool {
    if Path::new(file).exists() {
        return true;
    }
    assert!(!in_ci(), "{test}: {file} is missing under CI");
    skipped(test, &format!("{file} is missing"));
    false
}

/// Says loudly that `test` (or a part of it) does not run, and why.
pub fn skipped(test: &str, why: &str) {
    eprintln!("\n*** SKIPPED ({why}): {test} ***\n");
}

/// The interpreters to test: pyenv's 3.8 to 3.13 and Debian's static 3.11; `None` where one
/// is missing (reported loudly and skipped).
pub fn pythons() -> Vec<(String, Option<PathBuf>)> {
    let mut all: Vec<_> = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]
        .into_iter()
        .map(|v| (v.to_string(), pyenv_python(v)))
        .collect();
    let debian = PathBuf::from("/usr/bin/python3.11");
    all.push((
        "3.11 Debian, static libpython".to_string(),
        debian.exists().then_some(debian),
    ));
    all
}

/// Runs `check(label, interpreter)` under every interpreter `pythons` lists but those in
/// `skip`, a missing one skipped loudly; fails with every interpreter's failure.
pub fn under_each_python(skip: &[&str], check: impl Fn(&str, &str) -> Result<()>) -> Result<()> {
    let mut failures = Vec::new();
    for (label, python) in pythons()
        .into_iter()
        .filter(|(l, _)| !skip.contains(&l.as_str()))
    {
        let Some(python) = python else {
            skipped(&format!("Python {label}"), "not installed");
            continue;
        };
        if let Err(e) = check(&label, &python.to_string_lossy()) {
            failures.push(format!("{e:#}"));
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("\n\n"));
    }
    Ok(())
}

/// pyenv's CPython `minor` ("3.11"): `<pyenv root>/versions/3.11.*/bin/python3.11`, the newest
/// patch release if several are installed; `None` without pyenv or that version.
pub fn pyenv_python(minor: &str) -> Option<PathBuf> {
    let out = Command::new("pyenv").arg("root").output().ok()?;
    let root = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    let patch =
        |name: &str| -> Option<u32> { name.strip_prefix(minor)?.strip_prefix('.')?.parse().ok() };
    std::fs::read_dir(root.join("versions"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((patch(e.file_name().to_str()?)?, e.path())))
        .max()
        .map(|(_, dir)| dir.join(format!("bin/python{minor}")))
        .filter(|p| p.exists())
}

/// A directory for one test's fixtures and outputs, removed at the end of the test (kept if
/// the test panics). Failures carry what they need in their messages.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    pub fn new(test: &str) -> Result<Scratch> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "memleak-test-{test}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch { dir })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Compiles `tests/fixtures/<source>.c` with gcc into `<scratch>/<output>`:
    /// `-O0 -g -fno-omit-frame-pointer -pthread`, then `extra` (which may override them).
    pub fn compile(&self, source: &str, output: &str, extra: &[&str]) -> Result<PathBuf> {
        self.compile_with("gcc", source, output, extra)
    }

    /// As [`Scratch::compile`] with another compiler driver (`musl-gcc`).
    pub fn compile_with(
        &self,
        compiler: &str,
        source: &str,
        output: &str,
        extra: &[&str],
    ) -> Result<PathBuf> {
        let fixtures = workspace_root().join("tests/fixtures");
        let out = self.path(output);
        let result = Command::new(compiler)
            .args(["-O0", "-g", "-fno-omit-frame-pointer", "-pthread", "-o"])
            .arg(&out)
            .arg(fixtures.join(format!("{source}.c")))
            .args(extra)
            .output()
            .with_context(|| format!("running {compiler}"))?;
        if !result.status.success() {
            bail!(
                "{compiler} {source}.c failed:\n{}",
                String::from_utf8_lossy(&result.stderr)
            );
        }
        Ok(out)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// How a finished memleak (or fixture) run ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Both streams, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// A child process with its output going to files (no pipe to fill up), in a process group
/// of its own. Dropping it kills that whole group: a command memleak started (`-c`) runs on
/// after memleak ends, and a failing or finished test must leave nothing behind.
pub struct Running {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Running {
    /// Starts `program args` with output in `<scratch>/<label>.stdout|.stderr`; `stdin`, if
    /// given, is written to the child's stdin and closed.
    pub fn start(
        scratch: &Scratch,
        label: &str,
        program: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<Running> {
        Running::start_with_env(scratch, label, program, args, stdin, &[])
    }

    /// As [`Running::start`], with `env` (name, value) added to the environment.
    pub fn start_with_env(
        scratch: &Scratch,
        label: &str,
        program: &Path,
        args: &[&str],
        stdin: Option<&str>,
        env: &[(&str, &str)],
    ) -> Result<Running> {
        let stdout = scratch.path(&format!("{label}.stdout"));
        let stderr = scratch.path(&format!("{label}.stderr"));
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(File::create(&stdout)?)
            .stderr(File::create(&stderr)?)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        if let Some(text) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(text.as_bytes())?;
        }
        Ok(Running {
            child,
            stdout,
            stderr,
        })
    }

    /// `python script args…` (output in `python.stdout|.stderr`), once its libc is mapped:
    /// memleak can then hook it with `-p`.
    pub fn python(
        scratch: &Scratch,
        python: &str,
        script: &Path,
        args: &[&Path],
    ) -> Result<Running> {
        let mut argv = vec![script.to_str().context("script path")?];
        for a in args {
            argv.push(a.to_str().context("argument path")?);
        }
        let target = Running::start(scratch, "python", Path::new(python), &argv, None)?;
        target.wait_for_mapping("libc.so", Duration::from_secs(120))?;
        Ok(target)
    }

    /// memleak with `args`.
    pub fn memleak(scratch: &Scratch, args: &[&str], stdin: Option<&str>) -> Result<Running> {
        Running::start(scratch, "memleak", &memleak_bin(), args, stdin)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until the process maps an object whose path contains `name` (a `-p` target must
    /// have its libc mapped before memleak can find the allocator in it).
    pub fn wait_for_mapping(&self, name: &str, timeout: Duration) -> Result<()> {
        wait_for_mapping(self.pid(), name, timeout)
    }

    pub fn signal(&self, signal: i32) {
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    /// Waits for the process to exit by itself; after `timeout` it is killed and this fails
    /// with what it printed so far.
    pub fn wait(mut self, timeout: Duration) -> Result<Finished> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Finished {
                    status,
                    stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
                    stderr: std::fs::read_to_string(&self.stderr).unwrap_or_default(),
                });
            }
            if start.elapsed() > timeout {
                self.kill_group();
                bail!(
                    "still running after {timeout:?}, killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    std::fs::read_to_string(&self.stdout).unwrap_or_default(),
                    std::fs::read_to_string(&self.stderr).unwrap_or_default()
                );
            }
            sleep(Duration::from_millis(20));
        }
    }

    /// SIGINT, then wait as [`Running::wait`].
    pub fn interrupt(self, timeout: Duration) -> Result<Finished> {
        self.stop(libc::SIGINT, timeout)
    }

    /// `signal`, then wait as [`Running::wait`].
    pub fn stop(self, signal: i32, timeout: Duration) -> Result<Finished> {
        self.signal(signal);
        self.wait(timeout)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.kill_group();
    }
}

impl Running {
    /// SIGKILLs the process and everything left in its group (the group outlives its leader
    /// while a member runs, so its id is not reused), then reaps the process.
    fn kill_group(&mut self) {
        unsafe { libc::killpg(self.child.id() as libc::pid_t, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// Compiles fixture `name` and starts it as `name LEDGER MODE` (`attach`, `attach-exit`),
/// waiting until its libc is mapped so a `-p` memleak can hook it: the running fixture and
/// the paths of its ledger and of memleak's JSON report in `scratch`.
pub fn start_fixture(
    scratch: &Scratch,
    name: &str,
    mode: &str,
) -> Result<(Running, PathBuf, PathBuf)> {
    let fixture = scratch.compile(name, name, &[])?;
    let ledger = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let target = Running::start(
        scratch,
        name,
        &fixture,
        &[ledger.to_str().unwrap(), mode],
        None,
    )?;
    target.wait_for_mapping("libc.so", Duration::from_secs(10))?;
    Ok((target, ledger, out))
}

/// Runs memleak to completion.
pub fn run_memleak(
    scratch: &Scratch,
    args: &[&str],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<Finished> {
    Running::memleak(scratch, args, stdin)?.wait(timeout)
}

/// Waits until `path` exists (a fixture's ledger, written atomically).
pub fn wait_for_file(path: &Path, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while !path.exists() {
        if start.elapsed() > timeout {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits until the file at `path` (a process's captured output) contains `text`.
pub fn wait_for_text(path: &Path, text: &str, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(text)
    {
        if start.elapsed() > timeout {
            bail!("{} never said {text:?} within {timeout:?}", path.display());
        }
        sleep(Duration::from_millis(20));
    }
    Ok(())
}

pub fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Outstanding memory of one leak site: bytes, allocations, and the lines of the calls.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Site {
    pub bytes: u64,
    pub count: u64,
    pub lines: BTreeSet<u64>,
}

/// What a fixture says it leaked (see tests/fixtures/fixture.h).
pub struct Ledger {
    pub json: Value,
}

impl Ledger {
    pub fn read(path: &Path) -> Result<Ledger> {
        let json = read_json(path)?;
        let unprobed = json["unprobed"].as_str().unwrap_or("?");
        if !unprobed.is_empty() {
            bail!(
                "the fixture gave up waiting for probes on: {unprobed} (already probed by another \
                 tracer before memleak attached: {:?})",
                json["foreign"]
            );
        }
        Ok(Ledger { json })
    }

    pub fn pid(&self) -> u64 {
        self.json["pid"].as_u64().unwrap_or(0)
    }

    /// Expected outstanding memory per leak function, counting only allocations whose
    /// requested size passes `keep` (the `-z`/`-Z` filter).
    pub fn sites(&self, keep: impl Fn(u64) -> bool) -> BTreeMap<String, Site> {
        let mut sites = BTreeMap::<String, Site>::new();
        for leak in self.json["leaks"].as_array().into_iter().flatten() {
            let site = sites
                .entry(leak["function"].as_str().unwrap_or("?").to_string())
                .or_default();
            if keep(leak["requested"].as_u64().unwrap_or(0)) {
                site.bytes += leak["bytes"].as_u64().unwrap_or(0);
                site.count += leak["count"].as_u64().unwrap_or(0);
                site.lines.insert(leak["line"].as_u64().unwrap_or(0));
            }
        }
        sites
    }

    /// Functions that must not appear in any reported stack.
    pub fn absent(&self) -> Vec<String> {
        let names = self.json["absent"].as_array().into_iter().flatten();
        names
            .filter_map(|n| n.as_str().map(str::to_string))
            .collect()
    }
}

/// memleak's `--json` output.
pub struct Report {
    pub json: Value,
}

impl Report {
    pub fn read(path: &Path) -> Result<Report> {
        let json = read_json(path)?;
        if json["schema"] != "memleak/1" {
            bail!(
                "{}: schema is {}, not \"memleak/1\"",
                path.display(),
                json["schema"]
            );
        }
        if !json["final"].is_object() {
            bail!("{}: no \"final\" snapshot", path.display());
        }
        Ok(Report { json })
    }

    pub fn final_snapshot(&self) -> &Value {
        &self.json["final"]
    }
}

pub fn stacks(snapshot: &Value) -> &[Value] {
    snapshot["stacks"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

pub fn frames(stack: &Value) -> &[Value] {
    stack["frames"].as_array().map(Vec::as_slice).unwrap_or(&[])
}

pub fn function_of(frame: &Value) -> &str {
    frame["function"].as_str().unwrap_or("")
}

/// Stacks with a frame in `function`.
pub fn stacks_through<'a>(
    snapshot: &'a Value,
    function: &'a str,
) -> impl Iterator<Item = &'a Value> + 'a {
    stacks(snapshot)
        .iter()
        .filter(move |s| frames(s).iter().any(|f| function_of(f) == function))
}

/// Outstanding bytes and allocations over the stacks that pass through `function`, and the
/// lines reported for its frame.
pub fn usage_of(snapshot: &Value, function: &str) -> Site {
    let mut site = Site::default();
    for stack in stacks_through(snapshot, function) {
        site.bytes += stack["bytes"].as_u64().unwrap_or(0);
        site.count += stack["count"].as_u64().unwrap_or(0);
        if let Some(frame) = frames(stack).iter().find(|f| function_of(f) == function) {
            site.lines.insert(frame["line"].as_u64().unwrap_or(0));
        }
    }
    site
}

/// One stack, short, for failure messages: `fn (file:line) <- fn ...`.
pub fn describe_stack(stack: &Value) -> String {
    let mut out = format!("{} B in {}: ", stack["bytes"], stack["count"]);
    for (i, f) in frames(stack).iter().take(8).enumerate() {
        let name = f["function"].as_str().unwrap_or("??");
        let file = f["file"].as_str().map(basename).unwrap_or("?");
        let _ = write!(
            out,
            "{}{name} ({file}:{}) [{}]",
            if i > 0 { " <- " } else { "" },
            f["line"],
            f["module"].as_str().unwrap_or("?")
        );
    }
    out
}

pub fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Compares a snapshot with the ledger: per leak function, exact bytes and counts, the frame
/// of the leaking call innermost with the right file and line; and no stack through a function
/// the ledger lists as absent. Every mismatch is listed, not only the first.
pub fn check_against_ledger(
    snapshot: &Value,
    ledger: &Ledger,
    source: &str,
    keep: impl Fn(u64) -> bool,
) -> Result<()> {
    let mut problems = Vec::new();
    for (function, want) in ledger.sites(keep) {
        let got = usage_of(snapshot, &function);
        if (got.bytes, got.count) != (want.bytes, want.count) {
            problems.push(format!(
                "{function}: expected {} B in {} allocations, memleak reports {} B in {}",
                want.bytes, want.count, got.bytes, got.count
            ));
        }
        for stack in stacks_through(snapshot, &function) {
            let first = frames(stack).first();
            let innermost = first.map(function_of).unwrap_or("");
            let file = first.and_then(|f| f["file"].as_str()).map(basename);
            let line = first.and_then(|f| f["line"].as_u64()).unwrap_or(0);
            if innermost != function || file != Some(source) || !want.lines.contains(&line) {
                problems.push(format!(
                    "{function}: expected the first frame at {source}:{:?}, got {}",
                    want.lines,
                    describe_stack(stack)
                ));
            }
        }
    }
    for function in ledger.absent() {
        for stack in stacks_through(snapshot, &function) {
            problems.push(format!(
                "{function} must not appear: {}",
                describe_stack(stack)
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let mut all = String::new();
    for stack in stacks(snapshot) {
        let _ = writeln!(all, "  {}", describe_stack(stack));
    }
    bail!(
        "{}\nlost: {}\nall stacks in the snapshot:\n{all}",
        problems.join("\n"),
        snapshot["lost"]
    )
}

/// A fixture that neither overflows a map nor leaves a call unreturned loses nothing: every
/// `lost` counter must be 0 (a false count makes the tables claim they are partial).
pub fn expect_nothing_lost(snapshot: &Value) -> Result<()> {
    let lost = snapshot["lost"]
        .as_object()
        .context("no \"lost\" in the snapshot")?;
    let nonzero: Vec<_> = lost.iter().filter(|(_, v)| v.as_u64() != Some(0)).collect();
    if !nonzero.is_empty() {
        bail!("memleak counts losses on a fixture that loses nothing: {nonzero:?}");
    }
    Ok(())
}

/// Fails with the whole transcript when memleak did not exit 0.
pub fn expect_success(run: &Finished) -> Result<()> {
    if run.status.code() != Some(0) {
        bail!("memleak did not exit 0\n{}", run.transcript());
    }
    Ok(())
}

/// Waits until process `pid` maps an object whose path contains `name`.
pub fn wait_for_mapping(pid: u32, name: &str, timeout: Duration) -> Result<()> {
    let maps = format!("/proc/{pid}/maps");
    let start = Instant::now();
    while !std::fs::read_to_string(&maps)
        .unwrap_or_default()
        .contains(name)
    {
        if start.elapsed() > timeout {
            bail!("pid {pid} did not map {name} within {timeout:?}");
        }
        sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Whether `tool` is on PATH (a test that needs it says SKIPPED without it).
pub fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The PID of the descendant of `ancestor` whose executable path ends with `exe` (`unshare`
/// forks, then `chroot` or `setpriv` execs the fixture).
pub fn descendant_running(ancestor: u32, exe: &str, timeout: Duration) -> Result<u32> {
    let start = Instant::now();
    loop {
        let mut pending = vec![ancestor];
        while let Some(pid) = pending.pop() {
            let path = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            if path.ends_with(exe) {
                return Ok(pid);
            }
            pending.extend(children(pid));
        }
        if start.elapsed() > timeout {
            bail!("no process running {exe} under pid {ancestor} within {timeout:?}");
        }
        sleep(Duration::from_millis(5));
    }
}

fn children(pid: u32) -> Vec<u32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten();
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Builds the C extension `module` from `source` for `python` into `dir`, against the
/// interpreter's own headers.
pub fn build_extension(python: &str, dir: &Path, module: &str, source: &str) -> Result<()> {
    let query = Command::new(python)
        .args(["-c", "import sysconfig as s; print(s.get_paths()['include']); print(s.get_config_var('EXT_SUFFIX'))"])
        .output()
        .context("asking the interpreter for its headers")?;
    let answer = String::from_utf8(query.stdout)?;
    let mut lines = answer.lines();
    let (Some(include), Some(suffix)) = (lines.next(), lines.next()) else {
        bail!("{python} did not say where its headers are: {answer:?}");
    };
    anyhow::ensure!(
        Path::new(include).join("Python.h").exists(),
        "{python}: no Python.h in {include} (install the -dev package)"
    );
    let c = dir.join(format!("{module}.c"));
    std::fs::write(&c, source)?;
    let out = Command::new("gcc")
        .args(["-O1", "-g", "-shared", "-fPIC", "-I", include, "-o"])
        .arg(dir.join(format!("{module}{suffix}")))
        .arg(&c)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "gcc {module}.c for {python}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
