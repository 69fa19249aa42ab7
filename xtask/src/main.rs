//! Project tasks: `setup` installs what the build needs (idempotent, fast when done), `demo`
//! traces the bundled leaking program, `test` runs every test, `bench` measures overhead,
//! `soak` measures memleak's own footprint over a long `--listen` run.

mod bench;
mod fuzz;
mod load;
mod setup;
mod soak;

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the nightly rust-src component and bpf-linker (skips what is already there).
    Setup,
    /// Set up, then build memleak (release).
    Build,
    /// Set up, build, start the bundled leaking demo and trace it for ~10 s.
    Demo,
    /// Set up, build, and run every test (unit and integration; needs root), then every fuzz
    /// target for 15 s.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Build, then measure what tracing costs: a C malloc/free churn and a Python JSON loop,
    /// untraced, under memleak and (with --with-bcc) under BCC's memleak-bpfcc.
    Bench {
        /// Install BCC's memleak-bpfcc and kernel headers if missing, and compare with it.
        #[arg(long)]
        with_bcc: bool,
        /// free/malloc pairs per churn run.
        #[arg(long, default_value_t = 100_000)]
        pairs: u64,
        /// Rounds per workload run; the best is reported.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Also measure this memleak binary (repeatable), e.g. a copy built from main.
        #[arg(long)]
        compare: Vec<PathBuf>,
    },
    /// Build, then run the load test (tests/tests/load.rs) for longer, 10 minutes by default.
    Load(load::Options),
    /// Build, then run memleak --listen on the load fixture for an hour (by default), scraped
    /// every interval, and print memleak's own RSS and CPU along the way.
    Soak(soak::Options),
    /// Run the cargo-fuzz targets (fuzz/) for N seconds each; installs cargo-fuzz if missing.
    Fuzz(fuzz::Options),
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::ensure(),
        Task::Build => build().map(drop),
        Task::Demo => demo(),
        Task::Test { args } => test(&args),
        Task::Bench {
            with_bcc,
            pairs,
            rounds,
            compare,
        } => bench::run_bench(
            &build()?,
            &bench::Options {
                with_bcc,
                pairs,
                rounds,
                compare,
            },
        ),
        Task::Load(opts) => load::run_load(&build()?, &opts),
        Task::Soak(opts) => soak::run_soak(&build()?, &opts),
        Task::Fuzz(opts) => fuzz::run_fuzz(&opts),
    }
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds the release binary and returns its path.
fn build() -> Result<PathBuf> {
    setup::ensure()?;
    let root = workspace_root();
    run(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--package",
        "memleak",
    ]))?;
    Ok(root.join("target/release/memleak"))
}

fn demo() -> Result<()> {
    let memleak = build()?;
    let root = workspace_root();
    let out = root.join("target/demo");
    std::fs::create_dir_all(&out)?;
    let demo_bin = out.join("leaky-demo");
    run(Command::new("cc")
        .args(["-g", "-O0", "-fno-omit-frame-pointer", "-o"])
        .arg(&demo_bin)
        .arg(root.join("tests/fixtures/demo.c")))?;
    println!("== memleak -c {} 2 5  (tracing ~10 s)", demo_bin.display());
    run(Command::new(&memleak)
        .arg("-c")
        .arg(format!("{} 12", demo_bin.display()))
        .args(["2", "5"]))
}

/// Debian packages some tests need: dwz (the symbolizer's dwz test), libc6-dbg (debug files
/// found by build-id), chromium (the HTML report is loaded in it), prometheus and golang-go
/// (they scrape `--listen`'s pages), jemalloc, tcmalloc and musl (the allocator tests).
/// Without them those tests skip, loudly (the allocator tests fail under CI).
const TEST_PACKAGES: [&str; 9] = [
    "dwz",
    "libc6-dbg",
    "chromium",
    "prometheus",
    "golang-go",
    "libjemalloc2",
    "libtcmalloc-minimal4",
    "musl-tools",
    "valgrind",
];

fn test(extra: &[String]) -> Result<()> {
    if let Err(e) = setup::ensure_debian_packages(&TEST_PACKAGES) {
        eprintln!("setup: {e:#}; the tests that need these packages will say they skip");
    }
    let memleak = build()?;
    let root = workspace_root();
    run(Command::new("cargo")
        .current_dir(&root)
        .env("MEMLEAK_BIN", &memleak)
        .args([
            "test",
            "--release",
            "--workspace",
            "--exclude",
            "memleak-ebpf",
        ])
        .args(extra))?;
    // A filtered run is someone after a few tests, not the whole suite.
    if !extra.is_empty() {
        println!("fuzz: skipped (test arguments given); `cargo xtask fuzz` runs the targets");
        return Ok(());
    }
    fuzz::run_fuzz(&fuzz::Options {
        seconds: FUZZ_SECONDS_IN_TEST,
        targets: Vec::new(),
    })
}

/// Per fuzz target in `cargo xtask test`: 5 targets stay well under 3 minutes.
const FUZZ_SECONDS_IN_TEST: u64 = 15;
