//! The allocator the process really uses, found with no flag: jemalloc or tcmalloc preloaded
//! into a dynamic fixture, musl's allocator inside a static one (with and without `free`).
//! Every leak must match the fixture's ledger exactly, mmaps included.

use std::{path::Path, time::Duration};

use anyhow::{Result, ensure};
use memleak_tests::{
    Finished, Ledger, Report, Running, Scratch, can_trace, check_against_ledger,
    expect_nothing_lost, expect_success, installed, wait_for_file,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
const TCMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4";

/// The ledger against the report, nothing lost, and the allocator line starting `allocator`.
fn expect_exact(scratch: &Scratch, run: &Finished, allocator: &str) -> Result<()> {
    expect_success(run)?;
    ensure!(
        run.stdout.lines().any(|l| l.starts_with(allocator)),
        "no line starting {allocator:?}\n{}",
        run.transcript()
    );
    let report = Report::read(&scratch.path("report.json"))?;
    let ledger = Ledger::read(&scratch.path("ledger.json"))?;
    check_against_ledger(report.final_snapshot(), &ledger, "allocators.c", |_| true)?;
    expect_nothing_lost(report.final_snapshot())
}

/// `memleak -c "FIXTURE LEDGER run"` with `env` added to memleak's (and so the command's)
/// environment.
fn trace_command(scratch: &Scratch, fixture: &Path, env: &[(&str, &str)]) -> Result<Finished> {
    let command = format!(
        "{} {} run",
        fixture.display(),
        scratch.path("ledger.json").display()
    );
    let out = scratch.path("report.json");
    let args = ["-c", &command, "--json", out.to_str().unwrap()];
    let memleak = memleak_tests::memleak_bin();
    Running::start_with_env(scratch, "memleak", &memleak, &args, None, env)?.wait(TIMEOUT)
}

#[test]
fn jemalloc_preloaded_into_a_running_process() -> Result<()> {
    let test = "jemalloc_preloaded_into_a_running_process";
    if !can_trace(test) || !installed(test, JEMALLOC) {
        return Ok(());
    }
    let scratch = Scratch::new("jemalloc")?;
    let fixture = scratch.compile("allocators", "allocators", &[])?;
    let ledger = scratch.path("ledger.json");
    let target = Running::start_with_env(
        &scratch,
        "allocators",
        &fixture,
        &[ledger.to_str().unwrap(), "attach"],
        None,
        &[("LD_PRELOAD", JEMALLOC)],
    )?;
    target.wait_for_mapping("libjemalloc", TIMEOUT)?;
    let pid = target.pid().to_string();
    let out = scratch.path("report.json");
    let tracer = Running::memleak(
        &scratch,
        &["-p", &pid, "-o", "0", "--json", out.to_str().unwrap()],
        None,
    )?;
    wait_for_file(&ledger, TIMEOUT)?;
    let run = tracer.interrupt(TIMEOUT)?;
    expect_exact(&scratch, &run, "allocator: jemalloc 5")?;
    ensure!(
        run.stdout.contains("(LD_PRELOAD), mmap family: libc"),
        "{}",
        run.stdout
    );
    Ok(())
}

#[test]
fn tcmalloc_preloaded_into_a_started_command() -> Result<()> {
    let test = "tcmalloc_preloaded_into_a_started_command";
    if !can_trace(test) || !installed(test, TCMALLOC) {
        return Ok(());
    }
    let scratch = Scratch::new("tcmalloc")?;
    let fixture = scratch.compile("allocators", "allocators", &[])?;
    let run = trace_command(&scratch, &fixture, &[("LD_PRELOAD", TCMALLOC)])?;
    // tcmalloc defines mmap, munmap and mremap, which interpose libc's: its are probed.
    expect_exact(&scratch, &run, "allocator: tcmalloc")?;
    ensure!(
        run.stdout.contains("mmap family: tcmalloc"),
        "{}",
        run.stdout
    );
    Ok(())
}

#[test]
fn static_musl_with_and_without_free() -> Result<()> {
    let test = "static_musl_with_and_without_free";
    if !can_trace(test) || !installed(test, "/usr/bin/musl-gcc") {
        return Ok(());
    }
    for (label, define) in [("with free", "-DSTATIC"), ("without free", "-DNO_FREE")] {
        let scratch = Scratch::new("musl")?;
        let fixture =
            scratch.compile_with("musl-gcc", "allocators", "allocators", &["-static", define])?;
        let run = trace_command(&scratch, &fixture, &[])?;
        let checked = expect_exact(&scratch, &run, "allocator: musl");
        let checked = checked.and_then(|()| {
            let no_free = run.stdout.contains("not in the process: ") && {
                let line = run.stdout.lines().find(|l| l.starts_with("allocator:"));
                line.is_some_and(|l| l.contains(" free"))
            };
            ensure!(
                no_free == (define == "-DNO_FREE"),
                "the allocator line names free as absent only without it:\n{}",
                run.stdout
            );
            Ok(())
        });
        checked.map_err(|e| e.context(format!("static musl {label}")))?;
    }
    Ok(())
}

/// Without a hook on an allocator the process may call, the table must not claim to be
/// complete: here a second, `je_`-prefixed allocator whose malloc is an IFUNC (its address is
/// a resolver's; what it returns cannot be known before it runs).
#[test]
fn tables_are_partial_when_a_definition_is_not_hooked() -> Result<()> {
    if !can_trace("tables_are_partial_when_a_definition_is_not_hooked") {
        return Ok(());
    }
    let scratch = Scratch::new("ifunc")?;
    let fixture = scratch.compile("allocators", "allocators", &["-DIFUNC_PREFIXED"])?;
    let run = trace_command(&scratch, &fixture, &[])?;
    expect_success(&run)?;
    ensure!(
        run.stdout.contains("calls to je_malloc in")
            && run.stdout.contains("(results are partial)"),
        "{}",
        run.transcript()
    );
    ensure!(
        !run.stdout.contains("the table is complete"),
        "{}",
        run.transcript()
    );
    Ok(())
}
