//! A target in a container: its own PID and mount namespaces and another root filesystem.
//! memleak, attached by the host PID, must find the target's libc and symbolize its frames
//! through `/proc/PID/root`, since none of the target's paths exist on the host.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use memleak_tests::{
    Ledger, Report, Running, Scratch, can_trace, check_against_ledger, descendant_running,
    expect_success, on_path, skipped, wait_for_file, wait_for_mapping,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Where the fixture lives inside the container's root; must not exist on the host.
const APP: &str = "app/leaker";

#[test]
fn attach_by_host_pid_to_a_chrooted_namespaced_target() -> Result<()> {
    let test = "attach_by_host_pid_to_a_chrooted_namespaced_target";
    if !can_trace(test) {
        return Ok(());
    }
    for tool in ["unshare", "chroot", "ldd"] {
        if !on_path(tool) {
            skipped(test, &format!("no `{tool}` on PATH"));
            return Ok(());
        }
    }
    ensure!(
        !Path::new("/").join(APP).exists(),
        "/{APP} exists on the host: the test could not tell whether memleak resolved the \
         target's files through /proc/PID/root"
    );
    let scratch = Scratch::new("container")?;
    let root = scratch.path("root");
    let fixture = scratch.compile("leaks", "leaks", &[])?;
    build_root(&root, &fixture)?;

    // pid namespace + mount namespace + chroot; --kill-child takes the fixture down with
    // unshare when the test drops it. Inside, the ledger is /ledger.json = <root>/ledger.json.
    let root_arg = root.to_str().context("scratch path is not UTF-8")?;
    let app = format!("/{APP}");
    let container = Running::start(
        &scratch,
        "container",
        Path::new("unshare"),
        &[
            "--pid",
            "--mount",
            "--fork",
            "--kill-child",
            "chroot",
            root_arg,
            &app,
            "/ledger.json",
            "attach",
        ],
        None,
    )?;
    let pid = descendant_running(container.pid(), APP, Duration::from_secs(10))?;
    wait_for_mapping(pid, "libc.so", Duration::from_secs(10))?;

    let out = scratch.path("report.json");
    let pid_arg = pid.to_string();
    let started = Instant::now();
    let tracer = Running::memleak(
        &scratch,
        &["-p", &pid_arg, "-o", "0", "--json", out.to_str().unwrap()],
        None,
    )?;
    let ledger_path = root.join("ledger.json");
    if let Err(e) = wait_for_file(&ledger_path, Duration::from_secs(45)) {
        let run = tracer.interrupt(TIMEOUT)?;
        bail!("{e}\nmemleak:\n{}", run.transcript());
    }
    let leaked_after = started.elapsed();
    let run = tracer.interrupt(TIMEOUT)?;
    expect_success(&run)?;
    eprintln!(
        "{test}: host pid {pid}, fixture leaked {leaked_after:?} after memleak started, \
         memleak done after {:?}",
        started.elapsed()
    );

    let ledger = Ledger::read(&ledger_path)?;
    ensure!(
        ledger.pid() != u64::from(pid),
        "the fixture sees its own PID {} as the host's {pid}: it is not in its own PID namespace",
        ledger.pid()
    );
    let report = Report::read(&out)?;
    ensure!(
        report.json["pid"].as_u64() == Some(u64::from(pid)),
        "report pid {} is not the fixture's host pid {pid}",
        report.json["pid"]
    );
    check_against_ledger(report.final_snapshot(), &ledger, "leaks.c", |_| true)
}

/// A root filesystem holding only the fixture at /APP and the libraries `ldd` says it loads,
/// each at its own absolute path (libc and the dynamic loader).
fn build_root(root: &Path, fixture: &Path) -> Result<()> {
    let ldd = Command::new("ldd").arg(fixture).output()?;
    ensure!(
        ldd.status.success(),
        "ldd {} failed: {}",
        fixture.display(),
        String::from_utf8_lossy(&ldd.stderr)
    );
    let mut files = vec![(fixture.to_path_buf(), root.join(APP))];
    for library in libraries(&String::from_utf8_lossy(&ldd.stdout)) {
        let inside = root.join(library.strip_prefix("/").unwrap_or(&library));
        files.push((library, inside));
    }
    for (from, to) in files {
        std::fs::create_dir_all(to.parent().unwrap())?;
        // A copy, not a link: the container's libc is another inode than the host's, so a
        // probe placed on the host's libc would never fire in the target.
        std::fs::copy(&from, &to)
            .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// The absolute paths in `ldd` output: `libc.so.6 => /lib/.../libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vdso has none.
fn libraries(ldd: &str) -> Vec<PathBuf> {
    ldd.lines()
        .filter_map(|line| {
            let path = line.split("=>").last()?.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}
