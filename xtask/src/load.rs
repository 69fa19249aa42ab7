//! `cargo xtask load`: the long version of the load test (tests/tests/load.rs): 8 threads churn
//! the allocator while leaking a known amount, traced with `-p`. It prints the same figures as
//! the test: ledger vs reported, lost counters, memleak's peak RSS, calls per second untraced
//! and traced.

use std::{path::Path, process::Command};

use anyhow::Result;
use clap::Args;

use crate::{run, workspace_root};

#[derive(Args)]
pub struct Options {
    /// Seconds of load.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    /// Allocating calls per second the fixture's threads aim for, all together.
    #[arg(long, default_value_t = 100_000)]
    rate: u64,
}

pub fn run_load(memleak: &Path, opts: &Options) -> Result<()> {
    run(Command::new("cargo")
        .current_dir(workspace_root())
        .env("MEMLEAK_BIN", memleak)
        .env("MEMLEAK_LOAD_SECONDS", opts.seconds.to_string())
        .env("MEMLEAK_LOAD_RATE", opts.rate.to_string())
        .args(["test", "--release", "--package", "memleak-tests"])
        .args(["--test", "load", "--", "--nocapture"]))
}
