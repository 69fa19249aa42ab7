//! memleak (root) reads the files a traced process names only as that process could: as its
//! user, inside its root, regular files of a sane size, never waiting on them. The fixture
//! runs as `nobody`; its leak sites live in source files the test replaces once it is built.

use std::{
    os::unix::fs::{PermissionsExt, symlink},
    path::{Path, PathBuf},
    process::Command,
    thread::sleep,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use memleak_tests::{
    Running, Scratch, can_trace, descendant_running, expect_success, on_path, read_json, skipped,
    wait_for_mapping, wait_for_text,
};
use serde_json::Value;

const SITES: [&str; 5] = ["site_a", "site_b", "site_c", "site_d", "site_e"];
/// The line of the site files with the malloc call, quoted under the deciding frame.
const SITE_LINE: &str = "keep(malloc(4096));";
/// The fixture's user: memleak must read no more than it could.
const AS_NOBODY: [&str; 3] = ["--reuid=65534", "--regid=65534", "--clear-groups"];
const TIMEOUT: Duration = Duration::from_secs(60);

/// `<dir>/site_X.c` for every site: `void site_X(void)` leaking on its line 2.
fn write_sites(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for site in SITES {
        let text = format!("void {site}(void) {{\n    {SITE_LINE}\n}}\n");
        std::fs::write(dir.join(format!("{site}.c")), text)?;
    }
    Ok(())
}

/// The fixture built from the sites in `<scratch>/src`, with `extra` gcc arguments.
fn build(scratch: &Scratch, extra: &[&str]) -> Result<(PathBuf, PathBuf)> {
    let src = scratch.path("src");
    write_sites(&src)?;
    let include = format!("-I{}", src.display());
    let mut args = vec![include.as_str()];
    args.extend(extra);
    std::fs::create_dir_all(scratch.path("bin"))?;
    let bin = scratch.compile("withheld", "bin/withheld", &args)?;
    Ok((src, bin))
}

/// A file only root may read, every line of it `marker`.
fn root_only(path: &Path, marker: &str, mode: u32) -> Result<()> {
    std::fs::write(path, format!("{marker}\n").repeat(10))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

fn mkfifo(path: &Path) -> Result<()> {
    let name = std::ffi::CString::new(path.to_str().context("path")?)?;
    ensure!(
        unsafe { libc::mkfifo(name.as_ptr(), 0o666) } == 0,
        "mkfifo {path:?}"
    );
    Ok(())
}

fn replace(path: &Path) -> Result<()> {
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

/// The fixture as `nobody`, once its libc is mapped.
fn start_as_nobody(scratch: &Scratch, bin: &Path) -> Result<Running> {
    let mut args = AS_NOBODY.to_vec();
    args.push(bin.to_str().context("path")?);
    let target = Running::start(scratch, "withheld", Path::new("setpriv"), &args, None)?;
    target.wait_for_mapping("libc.so", Duration::from_secs(10))?;
    Ok(target)
}

/// The analysis' stack whose deciding frame is `site`, from `--json`.
fn stack_of<'a>(report: &'a Value, site: &str) -> Option<&'a Value> {
    report["stacks"].as_array()?.iter().find(|s| {
        let Some(i) = s["deciding_frame"].as_u64() else {
            return false;
        };
        s["frames"][i as usize]["function"] == site
    })
}

/// What each site's deciding line shows in the JSON report.
fn deciding_sources(report: &Value) -> Vec<(&'static str, Value)> {
    SITES
        .iter()
        .map(|&site| {
            let shown =
                stack_of(report, site).map_or(Value::Null, |s| s["deciding_source"].clone());
            (site, shown)
        })
        .collect()
}

/// Peak resident memory of a process, from `/proc/PID/status`.
fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmHWM")
}

/// Without the policy, memleak (root) quoted the root-only file behind a symlink, and its
/// first read of the FIFO blocked in open() for good: SIGTERM could not end it.
#[test]
fn sources_the_target_may_not_read_are_withheld_and_never_waited_on() -> Result<()> {
    let test = "sources_the_target_may_not_read_are_withheld_and_never_waited_on";
    if !can_trace(test) {
        return Ok(());
    }
    let scratch = Scratch::new("withheld-sources")?;
    let (src, bin) = build(&scratch, &[])?;
    let secret = "ROOT_ONLY_SECRET_3f9c";
    root_only(&scratch.path("secret.txt"), secret, 0o600)?;
    let site = |s: &str| src.join(format!("{s}.c"));
    for s in SITES {
        replace(&site(s))?;
    }
    symlink(scratch.path("secret.txt"), site("site_a"))?;
    mkfifo(&site("site_b"))?;
    symlink("/dev/zero", site("site_c"))?;
    std::fs::create_dir(site("site_d"))?;
    let sparse = std::fs::File::create(site("site_e"))?;
    sparse.set_len(2 << 30)?;
    sparse.set_permissions(std::fs::Permissions::from_mode(0o644))?;

    let target = start_as_nobody(&scratch, &bin)?;
    let out = |name: &str| scratch.path(name).to_str().unwrap().to_string();
    let (json, html, folded, text) = (out("r.json"), out("r.html"), out("r.folded"), out("r.txt"));
    let pid = target.pid().to_string();
    let args = [
        "-p",
        &pid,
        "--interval",
        "1s",
        "--json",
        &json,
        "--html",
        &html,
        "--folded",
        &folded,
        "--report",
        &text,
    ];
    let tracer = Running::memleak(&scratch, &args, None)?;
    wait_for_text(&scratch.path("memleak.stdout"), "Attaching", TIMEOUT)?;
    // Three intervals: every deciding line has been read (or refused) by now.
    sleep(Duration::from_millis(3500));
    let peak_kib = peak_rss_kib(tracer.pid())?;
    // Reports written and memleak gone within 2 s (the probes are removed after it).
    tracer.signal(libc::SIGTERM);
    let stopped = Instant::now();
    wait_for_text(Path::new(&html), "</html>", Duration::from_secs(2))
        .context("the last report was not written within 2 s of SIGTERM")?;
    let written = stopped.elapsed();
    let run = tracer.wait(TIMEOUT)?;
    let exit = stopped.elapsed();
    expect_success(&run)?;
    eprintln!(
        "{test}: reports written {written:?} and exit {exit:?} after SIGTERM, peak RSS {} MiB",
        peak_kib >> 10
    );
    ensure!(
        exit < Duration::from_secs(2),
        "memleak exited {exit:?} after SIGTERM"
    );
    ensure!(
        peak_kib < 512 << 10,
        "memleak's peak RSS is {peak_kib} KiB: did it read the 2 GiB file?"
    );

    let mut everything = run.stdout.clone() + &run.stderr;
    for path in [&json, &html, &folded, &text] {
        everything += &std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    }
    ensure!(
        !everything.contains(secret),
        "the root-only file's content was shown:\n{}",
        run.transcript()
    );
    let report = read_json(Path::new(&json))?;
    let expected = [
        (
            "site_a",
            "[source withheld: not readable by the target's user]",
        ),
        ("site_b", "[source withheld: not a regular file]"),
        ("site_c", "[source withheld: not a regular file]"),
        ("site_d", "[source withheld: not a regular file]"),
        ("site_e", "[source withheld: too large]"),
    ];
    let shown = deciding_sources(&report);
    ensure!(
        shown
            .iter()
            .zip(expected)
            .all(|((_, got), (_, want))| got == want),
        "deciding lines {shown:?}, expected {expected:?}"
    );
    let summary = std::fs::read_to_string(&text)?;
    ensure!(
        summary.contains("2 | [source withheld: not readable by the target's user]"),
        "{summary}"
    );
    Ok(())
}

/// Without the policy, `/proc/PID/root/src/site_a.c`, an absolute symlink in the target's
/// mount namespace, resolved against memleak's root: the host's file was quoted.
#[test]
fn an_absolute_symlink_in_the_targets_namespace_stays_in_its_root() -> Result<()> {
    let test = "an_absolute_symlink_in_the_targets_namespace_stays_in_its_root";
    if !can_trace(test) {
        return Ok(());
    }
    for tool in ["unshare", "setpriv", "mount"] {
        if !on_path(tool) {
            skipped(test, &format!("no `{tool}` on PATH"));
            return Ok(());
        }
    }
    let scratch = Scratch::new("withheld-namespace")?;
    let (src, bin) = build(&scratch, &[])?;
    // World-readable: only the root it is resolved in keeps it out.
    let hidden = scratch.path("host-only");
    std::fs::create_dir(&hidden)?;
    let secret = "HOST_ONLY_FILE_8e21";
    root_only(&hidden.join("secret.c"), secret, 0o644)?;
    let stage = scratch.path("stage");
    write_sites(&stage)?;
    // In the target's mount namespace, src/ holds site_b.c and a site_a.c linking to
    // host-only/secret.c, which is an empty directory there.
    let script = format!(
        "mount -t tmpfs src {src} && cp {stage}/site_b.c {src}/ && \
         ln -s {hidden}/secret.c {src}/site_a.c && mount -t tmpfs hidden {hidden} && \
         exec setpriv {nobody} {bin}",
        src = src.display(),
        stage = stage.display(),
        hidden = hidden.display(),
        nobody = AS_NOBODY.join(" "),
        bin = bin.display(),
    );
    let args = ["--mount", "--fork", "--kill-child", "sh", "-c", &script];
    let container = Running::start(&scratch, "container", Path::new("unshare"), &args, None)?;
    let pid = descendant_running(container.pid(), "bin/withheld", Duration::from_secs(10))?;
    wait_for_mapping(pid, "libc.so", Duration::from_secs(10))?;

    let json = scratch.path("r.json");
    let pid = pid.to_string();
    let args = [
        "-p",
        &pid,
        "--duration",
        "4s",
        "--interval",
        "1s",
        "--json",
        json.to_str().unwrap(),
    ];
    let run = Running::memleak(&scratch, &args, None)?.wait(TIMEOUT)?;
    expect_success(&run)?;
    let written = std::fs::read_to_string(&json)?;
    ensure!(
        !written.contains(secret) && !run.stdout.contains(secret),
        "the host's file was quoted:\n{}",
        run.transcript()
    );
    let report = read_json(&json)?;
    let shown = deciding_sources(&report);
    ensure!(
        shown[0].1.is_null() && shown[1].1 == SITE_LINE,
        "site_a must show nothing (no such file in the target's root), site_b its own line \
         from the namespace: {shown:?}"
    );
    Ok(())
}

/// A stripped fixture whose `.gnu_debuglink` names a FIFO next to it, then a debug file only
/// root may read in `.debug/`: neither may stall memleak or name the frames. Without the
/// policy the root-only debug file was read (a FIFO or device was refused by a `stat` before
/// the open already, with a race). The same run with the debug file readable names them.
#[test]
fn a_debuglink_to_a_fifo_or_a_file_the_target_may_not_read_is_not_followed() -> Result<()> {
    let test = "a_debuglink_to_a_fifo_or_a_file_the_target_may_not_read_is_not_followed";
    if !can_trace(test) {
        return Ok(());
    }
    if !on_path("objcopy") {
        skipped(test, "no `objcopy` on PATH");
        return Ok(());
    }
    let scratch = Scratch::new("withheld-debuglink")?;
    let (_, bin) = build(&scratch, &["-Wl,--build-id=none"])?;
    let dir = bin.parent().unwrap();
    let debug_dir = dir.join(".debug");
    std::fs::create_dir(&debug_dir)?;
    let debug = debug_dir.join("withheld.debug");
    objcopy(dir, &["--only-keep-debug", path(&bin)?, path(&debug)?])?;
    // objcopy reads the debug file for its CRC by the name it is given, from its cwd.
    std::fs::copy(&debug, dir.join("withheld.debug"))?;
    objcopy(
        dir,
        &[
            "--strip-all",
            "--add-gnu-debuglink=withheld.debug",
            path(&bin)?,
        ],
    )?;
    replace(&dir.join("withheld.debug"))?;
    mkfifo(&dir.join("withheld.debug"))?;

    for (mode, named) in [(0o600, false), (0o644, true)] {
        std::fs::set_permissions(&debug, std::fs::Permissions::from_mode(mode))?;
        let target = start_as_nobody(&scratch, &bin)?;
        let json = scratch.path("r.json");
        let pid = target.pid().to_string();
        let args = [
            "-p",
            &pid,
            "--duration",
            "3s",
            "--interval",
            "1s",
            "--json",
            path(&json)?,
        ];
        let run = Running::memleak(&scratch, &args, None)?.wait(TIMEOUT)?;
        expect_success(&run)?;
        let written = std::fs::read_to_string(&json)?;
        ensure!(
            written.contains("\"site_a\"") == named,
            "debug file mode {mode:o}: frames named from it: {}, expected {named}\n{}",
            !named,
            run.transcript()
        );
    }
    Ok(())
}

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("path is not UTF-8")
}

fn objcopy(cwd: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("objcopy")
        .args(args)
        .current_dir(cwd)
        .output()?;
    if !out.status.success() {
        bail!("objcopy {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}
