//! memleak: which code of a live process holds native memory and does not give it back.
//!
//! The flow (ARCHITECTURE.md): `session` finds or starts the `target`, `probes` loads the BPF
//! object and hooks it, `collect` turns the BPF maps into `model::Snapshot`s, `timeline` keeps
//! them, `analysis` works out what they add up to, and `report` prints it. This file parses the arguments and runs the
//! session's loop.

mod analysis;
mod cli;
mod collect;
mod detach;
mod heap;
mod kallsyms;
mod placement;
mod probes;
mod proc_stats;
mod process;
mod report;
mod serve;
mod session;
mod stacks;
mod target;
mod timeline;
mod trace;

// The parsers live in the library (fuzzed there); `crate::model` etc. keep naming them here.
use memleak::{bpf_map, model, objects, owners, procmaps, python, symbolize, unwind};

use std::{process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    cli::Args,
    session::{Session, Stop},
};

/// With RUST_BACKTRACE set (as many shells and CI runners have it), anyhow captures a
/// backtrace in every error it makes. Reading a live target makes and drops thousands of
/// them (a torn object, an unmapped page), and each capture costs tens of microseconds:
/// the owner walk took 2.4× the CPU. memleak's errors are one line, so library errors
/// capture none unless RUST_LIB_BACKTRACE asks; panics keep their backtraces.
fn keep_errors_cheap() {
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // SAFETY: the first thing main does, before any thread is started.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
}

fn main() -> ExitCode {
    keep_errors_cheap();
    let args = Args::parse();
    if let Err(msg) = args.validate() {
        eprintln!("memleak: {msg}");
        return ExitCode::from(2);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("memleak: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memleak: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    probes::preflight()?;
    check_outputs(&args)?;
    // A bad --listen address fails before anything is traced.
    let server = match args.listen_addr() {
        Ok(Some(addr)) => Some(serve::Server::bind(addr, args.metrics_top, args.period())?),
        _ => None,
    };
    // Before the probes go in: a Ctrl+C from then on ends the run with its final report.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut session = Session::start(&args, server)?;
    let mut exits = session.exit_watch()?;
    let period = args.period();
    let mut tables = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let mut maps_tick = tokio::time::interval(Duration::from_millis(250));
    let stop = loop {
        tokio::select! {
            _ = tables.tick() => if session.on_interval()? {
                break Stop::Count;
            },
            _ = maps_tick.tick() => session.on_maps_tick()?,
            _ = sigint.recv() => break Stop::Signal("interrupted"),
            _ = sigterm.recv() => break Stop::Signal("terminated"),
            Some(exit) = exits.recv() => if let Some(how) = session.on_exit(exit) {
                break Stop::TargetExited(how);
            },
            Some(()) = async { match session.events() { Some(e) => e.readable().await, None => std::future::pending().await } } => {
                session.print_events();
            }
        }
    };
    session.finish(stop)
}

/// Creates the output files now, so a bad path fails before a long capture, not after it.
fn check_outputs(args: &Args) -> Result<()> {
    let outputs = [
        &args.json,
        &args.folded,
        &args.pprof,
        &args.html,
        &args.report,
    ];
    for path in outputs.into_iter().flatten() {
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    }
    Ok(())
}
