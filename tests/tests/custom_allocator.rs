//! `-O LIB --symbols-prefix my_`: a custom allocator in its own library is traced beside the
//! malloc family the process binds (libc's), never instead of it.

use std::time::Duration;

use anyhow::Result;
use memleak_tests::{
    Ledger, Report, Scratch, can_trace, check_against_ledger, expect_success, run_memleak,
};

#[test]
fn custom_allocator_with_prefix() -> Result<()> {
    if !can_trace("custom_allocator_with_prefix") {
        return Ok(());
    }
    let scratch = Scratch::new("custom")?;
    let lib = scratch.compile("myalloc", "libmyalloc.so", &["-shared", "-fPIC"])?;
    let dir = scratch.path("");
    let dir = dir.to_str().unwrap();
    let fixture = scratch.compile(
        "custom",
        "custom",
        &[
            &format!("-L{dir}"),
            "-lmyalloc",
            &format!("-Wl,-rpath,{dir}"),
        ],
    )?;
    let ledger = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let command = format!("{} {}", fixture.display(), ledger.display());
    let args = [
        "-c",
        &command,
        "-O",
        lib.to_str().unwrap(),
        "--symbols-prefix",
        "my_",
        "--json",
        out.to_str().unwrap(),
    ];
    let run = run_memleak(&scratch, &args, None, Duration::from_secs(60))?;
    expect_success(&run)?;
    check_against_ledger(
        Report::read(&out)?.final_snapshot(),
        &Ledger::read(&ledger)?,
        "custom.c",
        |_| true,
    )
}
