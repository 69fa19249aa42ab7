//! memleak: which code of a live process holds native memory and does not give it back.
//!
//! The flow: `target` finds the process and its allocator, `probes` loads the BPF object and
//! hooks it, `collect` turns the BPF maps into `model::Snapshot`s, and `report` prints them.

mod analysis;
mod cli;
mod collect;
mod heap;
mod kallsyms;
mod placement;
mod probes;
mod proc_stats;
mod report;
mod serve;
mod stacks;
mod target;
mod timeline;
mod trace;

// The parsers live in the library (fuzzed there); `crate::model` etc. keep naming them here.
use memleak::{bpf_map, model, owners, procmaps, python, symbolize, unwind};

use std::{process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::oneshot,
};

use crate::{
    analysis::Analysis,
    cli::{Args, Mode},
    collect::{Collector, Names, Query},
    kallsyms::Kallsyms,
    model::{Measure, Snapshot},
    proc_stats::ProcessContext,
    python::PythonTracking,
    report::live::LiveStatus,
    symbolize::Symbolizer,
    target::Target,
    timeline::Timeline,
};

fn main() -> ExitCode {
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

/// Why tracing stopped.
enum Stop {
    Count,
    Signal(&'static str),
    TargetExited(String),
}

async fn run(args: Args) -> Result<()> {
    probes::preflight()?;
    check_outputs(&args)?;
    let server = match args.listen_addr() {
        Ok(Some(addr)) => Some(serve::Server::bind(addr, args.metrics_top, args.period())?),
        _ => None,
    };
    let mut target = match (&args.pid, &args.command) {
        (Some(pid), _) => Some(Target::existing(*pid)?),
        (None, Some(cmd)) => Some(Target::spawn(cmd)?),
        (None, None) => None,
    };
    // In kernel mode a -p target only filters; its allocator is not hooked.
    let user_target = target.as_ref().filter(|_| !args.kernel);
    let mut unhooked = Vec::new();
    let (mut ebpf, names, mut unwinder) = match user_target {
        Some(t) => match setup(&args, t) {
            Ok((mut ebpf, unwinder, not_hooked)) => {
                unhooked = not_hooked;
                let python = Box::new(PythonTracking::new(&mut ebpf, t.pid)?);
                (
                    ebpf,
                    Names::User(Symbolizer::new(t.pid), python),
                    Some(unwinder),
                )
            }
            Err(e) => {
                // A started command must not run on untraced.
                if let Some(child) = &t.child {
                    child.kill();
                    child.wait();
                }
                return Err(e);
            }
        },
        None => {
            let layout = probes::kernel_layout()?;
            let mut ebpf = probes::load(&args, args.pid, Some(&layout))?;
            probes::attach_kernel(&mut ebpf)?;
            (ebpf, Names::Kernel(Kallsyms::load()?), None)
        }
    };
    let traced_pid = user_target.map_or(0, |t| t.pid);
    let launching = user_target.is_some_and(|t| t.child.is_some());
    let mut collector = Collector::new(&mut ebpf, traced_pid, names, launching, args.heap_table())?;
    collector.unhooked = unhooked;
    // Python: found now, or after the exec of a started command (on the maps tick).
    if let Err(e) = collector.names.refresh() {
        eprintln!("memleak: {e:#}");
    }
    let mut events = if args.trace {
        Some(trace::Events::new(&mut ebpf)?)
    } else {
        None
    };
    let mut exited: std::pin::Pin<Box<dyn std::future::Future<Output = String>>> = match &mut target
    {
        Some(t) => {
            let rx = watch_exit(t)?;
            Box::pin(async move { rx.await.unwrap_or_else(|_| "exited".into()) })
        }
        // The kernel never exits.
        None => Box::pin(std::future::pending()),
    };
    match target.as_mut().filter(|_| !args.kernel) {
        Some(t) => {
            t.release()?;
            if let Some(u) = unwinder.as_mut() {
                // The exec is done and every library mapped: learn them now, in case the
                // command is gone before the next tick.
                u.follow_exec(|| {
                    if let Err(e) =
                        note_exec(&mut collector).and_then(|()| collector.names.refresh())
                    {
                        eprintln!("memleak: {e:#}");
                    }
                });
            }
            match &args.command {
                Some(cmd) => println!("Attaching to \"{cmd}\" (pid {}), Ctrl+C to quit.", t.pid),
                None => println!("Attaching to pid {}, Ctrl+C to quit.", t.pid),
            }
        }
        None => println!("Attaching to kernel allocators, Ctrl+C to quit."),
    }
    if let (true, Some(t)) = (args.kernel, &target) {
        println!("Kernel allocations made by pid {} only.", t.pid);
    }
    let pid = target.as_ref().map_or(0, |t| t.pid);
    let mut timeline = Timeline::new(ProcessContext::read(pid), args.period().as_secs_f64());
    // A --duration run shows a status line instead of a table per interval.
    let tables_shown = args.duration.is_none() && server.is_none();
    let mut live = LiveStatus::new();
    let mut huge_pages_said = false;

    let query = Query {
        older_ms: args.older,
        show_allocs: args.show_allocs,
        combined_only: args.combined_only,
        sort: args.sort,
        sample_bytes: args.sample_bytes,
        measure: match args.mode {
            Mode::Alloc => Measure::Allocations,
            Mode::Growth => Measure::ResidentPages,
        },
    };
    let title = query.measure.title(args.top);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let period = args.period();
    let mut tables = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // Libraries appear right after exec and with every dlopen; note them while the target
    // lives, so its stacks still symbolize after it exits.
    let mut maps_tick = tokio::time::interval(Duration::from_millis(250));
    let stop = loop {
        tokio::select! {
            _ = tables.tick() => {
                note_exec(&mut collector)?;
                if query.measure == Measure::ResidentPages && !huge_pages_said {
                    huge_pages_said = say_huge_pages(pid);
                }
                let snap = collector.snapshot(&query)?;
                live.clear();
                if tables_shown {
                    print!("{}", report::text::table(&snap, &collector.table, &title, args.top));
                }
                if timeline.record(snap) {
                    // Thinned: stacks no kept interval holds leave the table too.
                    collector.table.retain(&timeline.stack_ids());
                }
                if let Some(s) = &server {
                    s.publish(&timeline, &collector.table);
                }
                live.update(&timeline, &collector.table, args.duration.map(|d| d.as_secs_f64()));
                if args.intervals().is_some_and(|c| timeline.intervals() >= c) {
                    break Stop::Count;
                }
            }
            _ = maps_tick.tick() => {
                note_exec(&mut collector)?;
                if let Err(e) = collector.names.refresh() {
                    eprintln!("memleak: {e:#}");
                }
                collector.learn_new_stacks();
                // A failed re-read (the target is exiting) leaves the old tables in place.
                if let Some(u) = unwinder.as_mut()
                    && let Ok(true) = u.refresh()
                    && args.verbose
                {
                    eprint!("memleak: new code mapped; {}", u.summary());
                }
                if let Some(t) = target.as_mut().filter(|_| !args.kernel) {
                    for child in t.new_children() {
                        println!("memleak: pid {} started child process {child}; it is not traced (memleak follows one process)", t.pid);
                    }
                }
            }
            _ = sigint.recv() => break Stop::Signal("interrupted"),
            _ = sigterm.recv() => break Stop::Signal("terminated"),
            how = &mut exited => break Stop::TargetExited(how),
            Some(()) = async { match events.as_mut() { Some(e) => e.readable().await, None => std::future::pending().await } } => {
                if let Some(e) = events.as_mut() {
                    e.print(&mut collector);
                }
            }
        }
    };

    live.clear();
    let final_state = match &stop {
        Stop::Count => None,
        Stop::Signal(why) => {
            println!("memleak: {why}; final state:");
            Some(final_table(&mut collector, &query, &args, &title)?)
        }
        Stop::TargetExited(how) => {
            println!("memleak: the target {how}; outstanding at exit:");
            // Everything still held when the process is gone was never freed: no age filter.
            let q = Query {
                older_ms: 0,
                ..query
            };
            Some(final_table(&mut collector, &q, &args, &title)?)
        }
    };
    if let Some(snap) = final_state {
        timeline.record_final(snap);
    }
    // The target still runs (not when it exited): read who holds the largest stacks' memory.
    if !args.no_owners && !matches!(stop, Stop::TargetExited(_)) {
        timeline.owners = find_owners(&collector, &timeline, query.older_ms);
    }
    let table = std::mem::take(&mut collector.table);
    // Reports before the probes go: each probe's detach waits out an RCU grace period
    // (about 100 ms here, one probe at a time in the kernel), seconds for two dozen, and a
    // signal must not wait for that to see the reports.
    drop(collector);
    drop(events);
    let written = write_reports(&args, &analysis::analyze(&timeline, &table));
    drop(ebpf);
    written
}

/// Stacks whose owners are looked for: those the report shows first (growing, then holding).
const OWNED_STACKS: usize = 8;

/// The owners of the memory of the report's first stacks, read from the running target;
/// `None` when it runs no Python.
fn find_owners(
    collector: &Collector,
    timeline: &Timeline,
    older_ms: u64,
) -> Option<owners::Findings> {
    let python = collector.python()?;
    let analysis = analysis::analyze(timeline, &collector.table);
    let stacks: std::collections::HashSet<i64> = analysis
        .stacks
        .iter()
        .filter(|s| s.final_bytes() > 0 && s.trend != analysis::Trend::Churn)
        .take(OWNED_STACKS)
        .map(|s| s.stack_id)
        .collect();
    let blocks = owners::Blocks::new(collector.blocks_of(&stacks, older_ms));
    Some(owners::python::find(
        python,
        &blocks,
        &owners::python::Limits::default(),
    ))
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

/// The report printed at the end, and the files asked for.
fn write_reports(args: &Args, analysis: &Analysis) -> Result<()> {
    let summary = report::summary::render(analysis);
    print!("\n{summary}");
    if let Some(path) = &args.report {
        std::fs::write(path, &summary).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        report::json::write(analysis, path)?;
    }
    if let Some(path) = &args.folded {
        report::folded::write(analysis, path)?;
    }
    if let Some(path) = &args.pprof {
        report::pprof::write(analysis, path)?;
    }
    if let Some(path) = &args.html {
        report::html::write(analysis, path)?;
    }
    Ok(())
}

/// The BPF object with the target hooked, its unwinder, and the allocator functions it may
/// call that are not hooked.
fn setup(args: &Args, target: &Target) -> Result<(aya::Ebpf, unwind::Unwinder, Vec<String>)> {
    // What to hook; growth mode hooks no function.
    let plan = match args.mode {
        Mode::Alloc => Some(hook_plan(args, target)?),
        Mode::Growth => None,
    };
    let mut ebpf = probes::load(args, Some(target.pid), None)?;
    let mut unwinder = unwind::Unwinder::new(&mut ebpf, target.pid, args.unwind)?;
    // Tables before the probes, so the first allocation already gets a whole stack. A
    // started command has not exec'd yet: build what it will map, place it after the exec.
    if target.child.is_none() {
        unwinder.refresh()?;
    } else {
        let mut preload: Vec<std::path::PathBuf> = match &plan {
            Some(plan) => plan.hooks.iter().map(|h| h.object.clone()).collect(),
            None => target.library("libc").ok().into_iter().collect(),
        };
        preload.retain(|p| *p != target.exe);
        preload.sort();
        preload.dedup();
        let preload: Vec<&std::path::Path> = preload.iter().map(|p| p.as_path()).collect();
        unwinder.prepare(&mut ebpf, &target.exe, &preload)?;
    }
    if args.verbose {
        eprint!("memleak: {}", unwinder.summary());
    }
    let Some(plan) = plan else {
        // A started command's break belongs to memleak's fork until the exec; its first brk
        // call after the exec tells the program's own.
        let brk = match target.child {
            Some(_) => 0,
            None => procmaps::program_break(target.pid)?,
        };
        probes::attach_growth(&mut ebpf, brk)?;
        return Ok((ebpf, unwinder, Vec::new()));
    };
    println!("{}", plan.summary());
    let mut attached = probes::attach(&mut ebpf, target.pid, &plan.hooks)?;
    if args.python_allocators {
        let runtime = python::PythonRuntime::detect(target.pid)?.context(
            "--python-allocators: no CPython in this process (with -c, attach with -p once it runs)",
        )?;
        attached.extend(probes::attach_python_allocators(
            &mut ebpf,
            target.pid,
            &runtime.object_path(),
        )?);
    }
    if args.verbose {
        say_hooks(&attached, &plan);
    }
    Ok((ebpf, unwinder, plan.unhooked))
}

/// `--verbose`: where each probe went, and what was not hooked.
fn say_hooks(attached: &[probes::Attached], plan: &memleak::binding::Plan) {
    for a in attached {
        let h = &a.hook;
        eprintln!(
            "memleak: hooked {}+{} at {:#x} in {} ({:?}; {})",
            h.symbol, a.placement.offset, h.vaddr, h.object_name, h.origin, a.placement.reason
        );
    }
    for f in &plan.absent {
        eprintln!("memleak: not hooked: {f} (no object in the process defines it)");
    }
    for f in &plan.unhooked {
        eprintln!("memleak: not hooked: {f}");
    }
}

/// What to hook: each entry point where the process binds it (binding.rs), plus the
/// allocator `-O`/`--symbols-prefix` name.
fn hook_plan(args: &Args, target: &Target) -> Result<memleak::binding::Plan> {
    use memleak::binding::{self, Scope};
    let scope = match target.child {
        Some(_) => Scope::of_command(&target.exe)?,
        None => Scope::of_process(target.pid)?,
    };
    let prefix = args.symbols_prefix.as_str();
    let mut plan = match &args.obj {
        Some(_) => scope.plan(&[]),
        None => scope.plan(&[prefix]),
    };
    let wanted = format!("{prefix}malloc");
    if let Some(obj) = &args.obj {
        let path = target.library(obj)?;
        let extra = binding::in_object(&path, prefix)?;
        if !extra.hooks.iter().any(|h| h.symbol == wanted) {
            anyhow::bail!("{} has no {wanted}: not an allocator", path.display());
        }
        plan.extend(extra);
    }
    if !plan.hooks.iter().any(|h| h.symbol == wanted) {
        anyhow::bail!(
            "no {wanted} in the process (a stripped static binary?): name the object that holds the allocator with -O, and its symbol prefix with --symbols-prefix"
        );
    }
    Ok(plan)
}

/// Growth mode: warns (and returns true) once the target holds transparent huge pages, whose
/// faults bring 2 MiB each but count as one page.
fn say_huge_pages(pid: u32) -> bool {
    let bytes = proc_stats::huge_page_bytes(pid).unwrap_or(0);
    if bytes > 0 {
        eprintln!(
            "memleak: pid {pid} holds {} MiB in transparent huge pages; growth mode counts one 4 KiB page per fault, so those regions are undercounted",
            bytes >> 20
        );
    }
    bytes > 0
}

/// Drops what an exec'd-away program held, and says so. (-c's own first exec drops nothing
/// and goes unmentioned.)
fn note_exec(collector: &mut Collector) -> Result<()> {
    if let Some(dropped) = collector.after_exec()?.filter(|&n| n > 0) {
        println!(
            "memleak: the target exec'd a new program; dropped {dropped} allocations the old one held"
        );
    }
    Ok(())
}

fn final_table(collector: &mut Collector, q: &Query, args: &Args, title: &str) -> Result<Snapshot> {
    note_exec(collector)?;
    let snap = collector.snapshot(q)?;
    print!(
        "{}",
        report::text::table(&snap, &collector.table, title, args.top)
    );
    Ok(snap)
}

/// Resolves when the target exits, with a description ("exited with status 3").
fn watch_exit(target: &mut Target) -> Result<oneshot::Receiver<String>> {
    let (tx, rx) = oneshot::channel();
    if let Some(child) = target.child.take() {
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        return Ok(rx);
    }
    let pid = target.pid;
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context(format!("watching PID {pid}"));
    }
    std::thread::spawn(move || {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // EINTR: again at once; anything else (ENOMEM) again after a pause, not in a spin.
        while unsafe { libc::poll(&mut p, 1, -1) } < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = tx.send(format!("(PID {pid}) exited"));
    });
    Ok(rx)
}
