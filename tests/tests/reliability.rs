//! Faults the tracer must survive without harming the target: being killed with SIGKILL,
//! being restarted on the same process, being stopped with SIGTERM (at once), and maps too
//! small for what it sees.

use std::{
    os::unix::fs::FileExt,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use memleak_tests::{
    Report, Running, Scratch, can_trace, expect_success, run_memleak, usage_of, wait_for_file,
    wait_for_text,
};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Removing two dozen probes takes the kernel 2-3 s here; this bounds a hang.
const PROBES_GONE: Duration = Duration::from_secs(30);

/// The first bytes of the target's malloc, as the target sees them.
fn code_at(pid: u32, addr: u64) -> Result<[u8; 16]> {
    let mem = std::fs::File::open(format!("/proc/{pid}/mem"))?;
    let mut buf = [0u8; 16];
    mem.read_exact_at(&mut buf, addr)
        .with_context(|| format!("reading PID {pid} at {addr:#x}"))?;
    Ok(buf)
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let start = Instant::now();
    while !done()? {
        if start.elapsed() > timeout {
            bail!("timed out waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// The steady fixture (tests/fixtures/steady.c), running until `stop` exists.
struct Steady {
    target: Running,
    stop: PathBuf,
    /// Where the target's malloc is, and its first bytes before any probe.
    malloc: u64,
    pristine: [u8; 16],
}

impl Steady {
    fn start(scratch: &Scratch) -> Result<Steady> {
        let fixture = scratch.compile("steady", "steady", &[])?;
        let stop = scratch.path("stop");
        let target = Running::start(scratch, "steady", &fixture, &[stop.to_str().unwrap()], None)?;
        let stdout = scratch.path("steady.stdout");
        wait_for_file(&stdout, TIMEOUT)?;
        wait_until("the target prints malloc's address", TIMEOUT, || {
            Ok(std::fs::read_to_string(&stdout)?.contains('\n'))
        })?;
        let text = std::fs::read_to_string(&stdout)?;
        let malloc = text
            .split_whitespace()
            .nth(1)
            .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
            .context("the fixture printed no malloc address")?;
        let pristine = code_at(target.pid(), malloc)?;
        Ok(Steady {
            target,
            stop,
            malloc,
            pristine,
        })
    }

    fn patched(&self) -> Result<bool> {
        Ok(code_at(self.target.pid(), self.malloc)? != self.pristine)
    }

    /// Ends the target: it ran on unharmed if every round verified its memory.
    fn finish(self) -> Result<()> {
        std::fs::write(&self.stop, "")?;
        let done = self.target.wait(TIMEOUT)?;
        ensure!(
            done.status.success()
                && done
                    .stdout
                    .lines()
                    .last()
                    .is_some_and(|l| l.starts_with("ok ")),
            "the target was harmed\n{}",
            done.transcript()
        );
        Ok(())
    }
}

#[test]
fn sigkill_leaves_nothing_attached_and_a_restart_works() -> Result<()> {
    if !can_trace("sigkill_leaves_nothing_attached_and_a_restart_works") {
        return Ok(());
    }
    let scratch = Scratch::new("sigkill")?;
    let steady = Steady::start(&scratch)?;
    let pid = steady.target.pid();

    // Attached: the kernel has put a breakpoint on malloc.
    let pid_arg = pid.to_string();
    let tracer = Running::memleak(&scratch, &["-p", &pid_arg, "1"], None)?;
    wait_until("memleak patches malloc", TIMEOUT, || steady.patched())?;
    std::thread::sleep(Duration::from_millis(500));

    // SIGKILL: no chance to clean up, yet the kernel removes every probe with its fds.
    tracer.signal(libc::SIGKILL);
    drop(tracer);
    wait_until("malloc is pristine again", PROBES_GONE, || {
        Ok(!steady.patched()?)
    })?;

    // A second memleak on the same target works and detaches cleanly.
    let out = scratch.path("again.json");
    let run = run_memleak(
        &scratch,
        &["-p", &pid_arg, "--json", out.to_str().unwrap(), "1", "2"],
        None,
        TIMEOUT,
    )?;
    expect_success(&run)?;
    let report = Report::read(&out)?;
    assert!(
        report.final_snapshot()["recorded"].as_u64().unwrap_or(0) > 0,
        "the restarted tracer saw no allocation"
    );
    wait_until(
        "the probes are gone after a clean exit",
        PROBES_GONE,
        || Ok(!steady.patched()?),
    )?;
    steady.finish()
}

/// Before the probes were released by a child (detach.rs), memleak took 2.2-2.7 s to exit
/// after SIGTERM here, its reports long written: two dozen probes removed one at a time,
/// each waiting out an RCU grace period. Now it exits in about 0.1 s; the bound is generous.
#[test]
fn sigterm_exits_at_once_and_the_probes_go_soon_after() -> Result<()> {
    if !can_trace("sigterm_exits_at_once_and_the_probes_go_soon_after") {
        return Ok(());
    }
    let scratch = Scratch::new("sigterm-exit")?;
    let steady = Steady::start(&scratch)?;
    let (pid, json) = (steady.target.pid().to_string(), scratch.path("r.json"));
    let args = [
        "-p",
        &pid,
        "--interval",
        "1s",
        "--json",
        json.to_str().unwrap(),
    ];
    let tracer = Running::memleak(&scratch, &args, None)?;
    wait_until("memleak patches malloc", TIMEOUT, || steady.patched())?;
    wait_for_text(&scratch.path("memleak.stdout"), "Top ", TIMEOUT)?;

    tracer.signal(libc::SIGTERM);
    let stopped = Instant::now();
    let run = tracer.wait(TIMEOUT)?;
    let exit = stopped.elapsed();
    expect_success(&run)?;
    eprintln!("memleak exited {exit:?} after SIGTERM");
    ensure!(
        exit < Duration::from_millis(1500),
        "memleak took {exit:?} to exit after SIGTERM"
    );
    Report::read(&json).context("the JSON report after SIGTERM")?;
    wait_until(
        "the probes are gone",
        PROBES_GONE,
        || Ok(!steady.patched()?),
    )?;
    steady.finish()
}

#[test]
fn full_maps_are_counted_and_reported_as_partial() -> Result<()> {
    if !can_trace("full_maps_are_counted_and_reported_as_partial") {
        return Ok(());
    }
    let scratch = Scratch::new("fullmaps")?;
    let fixture = scratch.compile("leaks", "leaks", &[])?;
    let ledger = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let cmd = format!("{} {} run", fixture.display(), ledger.display());
    let run = run_memleak(
        &scratch,
        &[
            "-c",
            &cmd,
            "--max-allocs",
            "3",
            "--max-stacks",
            "1",
            "--json",
            out.to_str().unwrap(),
        ],
        None,
        TIMEOUT,
    )?;
    expect_success(&run)?;
    let report = Report::read(&out)?;
    let snap = report.final_snapshot();
    let lost = &snap["lost"];
    assert!(
        lost["allocs_map_full"].as_u64().unwrap_or(0) > 0,
        "{}",
        run.transcript()
    );
    assert!(
        lost["stack_walks_failed"].as_u64().unwrap_or(0) > 0,
        "{}",
        run.transcript()
    );
    assert!(
        run.stdout.contains("results are partial"),
        "the table must say it is partial:\n{}",
        run.transcript()
    );
    // What was kept is within the map's capacity (plus the separate mmap map).
    let heap_entries: u64 = snap["stacks"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| s["count"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        heap_entries <= 3 + 16,
        "{heap_entries} entries in maps of 3 (+ mmaps)"
    );
    Ok(())
}

#[test]
fn exec_drops_the_old_program_and_forks_are_reported() -> Result<()> {
    if !can_trace("exec_drops_the_old_program_and_forks_are_reported") {
        return Ok(());
    }
    let scratch = Scratch::new("execs")?;
    let fixture = scratch.compile("execs", "execs", &[])?;
    let ledger = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let cmd = format!("{} {} first", fixture.display(), ledger.display());
    let run = run_memleak(
        &scratch,
        &["-c", &cmd, "--json", out.to_str().unwrap()],
        None,
        TIMEOUT,
    )?;
    expect_success(&run)?;
    assert!(
        run.stdout
            .contains("exec'd a new program; dropped 5 allocations"),
        "{}",
        run.transcript()
    );
    assert!(
        run.stdout.contains("started child process"),
        "{}",
        run.transcript()
    );
    let report = Report::read(&out)?;
    let snap = report.final_snapshot();
    let after = usage_of(snap, "after_exec");
    assert_eq!(
        (after.bytes, after.count),
        (3333, 3),
        "{}",
        run.transcript()
    );
    for gone in ["before_exec", "in_child"] {
        assert_eq!(
            usage_of(snap, gone).count,
            0,
            "{gone} must not be outstanding"
        );
    }
    Ok(())
}

/// memleak killed while its started command is stopped at the entry point (where the unwind
/// tables are placed): the command must not stay stopped. It runs on and exits.
#[test]
fn sigkill_while_a_started_command_is_held_lets_it_run_on() -> Result<()> {
    if !can_trace("sigkill_while_a_started_command_is_held_lets_it_run_on") {
        return Ok(());
    }
    let scratch = Scratch::new("kill-held")?;
    let tracer = Running::memleak(&scratch, &["-c", "sleep 1"], None)?;
    let children = format!("/proc/{0}/task/{0}/children", tracer.pid());
    let mut child = 0;
    wait_until("memleak started the command", TIMEOUT, || {
        child = std::fs::read_to_string(&children)?
            .split_whitespace()
            .next()
            .map_or(0, |c| c.parse().unwrap_or(0));
        Ok(child != 0)
    })?;
    let state = |pid: u32| -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?.1.trim_start().chars().next()
    };
    // Stopped (T) at its entry point, after the exec: memleak is placing the tables.
    wait_until("the command stops at its entry point", TIMEOUT, || {
        Ok(state(child) == Some('T'))
    })?;
    tracer.signal(libc::SIGKILL);
    // Its death signal comes only after the kernel has removed the killed memleak's probes,
    // one at a time under a lock other tests' memleaks take too: seconds on a busy machine.
    wait_until("the orphaned command ends", PROBES_GONE, || {
        Ok(!matches!(state(child), Some('T' | 'S' | 'R')))
    })
    .with_context(|| format!("the command stayed in state {:?}", state(child)))
}
