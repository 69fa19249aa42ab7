//! One tracing session: the BPF object and its probes, the traced process (or the kernel),
//! the collection and the timeline, from setup to the final reports. main.rs builds one with
//! [`Session::start`] and runs its loop: [`Session::on_interval`] per table,
//! [`Session::on_maps_tick`] every 250 ms, [`Session::finish`] at the end.

use std::{future::Future, pin::Pin};

use anyhow::{Context, Result};
use aya::Ebpf;

use crate::{
    analysis::{self, Analysis},
    cli::{Args, Mode},
    collect::{Collector, Names, Query},
    detach,
    kallsyms::Kallsyms,
    model::Measure,
    owners, probes,
    proc_stats::{self, ProcessContext},
    process::{Exec, Process},
    python::{self, PythonTracking},
    report::{self, live::LiveStatus},
    serve,
    symbolize::Symbolizer,
    target::Target,
    timeline::Timeline,
    trace, unwind,
};

/// Why tracing stopped.
pub enum Stop {
    Count,
    Signal(&'static str),
    TargetExited(String),
}

pub struct Session<'a> {
    args: &'a Args,
    ebpf: Ebpf,
    collector: Collector,
    /// The traced process; `None` in kernel mode.
    process: Option<Process>,
    /// Kernel mode's -p filter: only watched, to end when it exits.
    filter: Option<Target>,
    events: Option<trace::Events>,
    /// `--listen`: the pages published every interval.
    server: Option<serve::Server>,
    timeline: Timeline,
    query: Query,
    title: String,
    live: LiveStatus,
    huge_pages_said: bool,
}

impl<'a> Session<'a> {
    /// Finds or starts the target, loads and attaches the BPF object, and lets a started
    /// command run.
    pub fn start(args: &'a Args, server: Option<serve::Server>) -> Result<Session<'a>> {
        let target = match (&args.pid, &args.command) {
            (Some(pid), _) => Some(Target::existing(*pid)?),
            (None, Some(cmd)) => Some(Target::spawn(cmd)?),
            (None, None) => None,
        };
        let (mut ebpf, names, process, filter, unhooked) = match target {
            Some(t) if !args.kernel => {
                let (mut ebpf, process, unhooked) = attach_user(args, t)?;
                let python = Box::new(PythonTracking::new(&mut ebpf, process.pid())?);
                let names = Names::User(Symbolizer::new(process.pid()), python);
                (ebpf, names, Some(process), None, unhooked)
            }
            filter => {
                let layout = probes::kernel_layout()?;
                let mut ebpf = probes::load(args, args.pid, Some(&layout))?;
                probes::attach_kernel(&mut ebpf)?;
                let names = Names::Kernel(Kallsyms::load()?);
                (ebpf, names, None, filter, Vec::new())
            }
        };
        let pid = process.as_ref().map_or(0, Process::pid);
        let mut collector = Collector::new(&mut ebpf, pid, names, args.heap_table())?;
        collector.unhooked = unhooked;
        let events = match args.trace {
            true => Some(trace::Events::new(&mut ebpf)?),
            false => None,
        };
        let query = query(args);
        let mut session = Session {
            args,
            title: query.measure.title(args.top),
            query,
            ebpf,
            collector,
            process,
            filter,
            events,
            server,
            timeline: Timeline::new(ProcessContext::default(), args.period().as_secs_f64()),
            live: LiveStatus::new(),
            huge_pages_said: false,
        };
        session.run_target()?;
        let pid = session.target().map_or(0, |t| t.pid);
        session.timeline = Timeline::new(ProcessContext::read(pid), args.period().as_secs_f64());
        Ok(session)
    }

    fn target(&self) -> Option<&Target> {
        self.process
            .as_ref()
            .map(|p| &p.target)
            .or(self.filter.as_ref())
    }

    /// Lets a started command run, and says what is traced. A command held at its entry
    /// point gets its tables, symbols and Python state before it runs on: one that exits
    /// within milliseconds must still be named.
    fn run_target(&mut self) -> Result<()> {
        // Python: found now, or after the exec of a started command (whose maps are still
        // memleak's fork's).
        if self
            .process
            .as_ref()
            .is_none_or(|p| p.target.child.is_none())
        {
            self.on_maps_tick()?;
        }
        match self.process.as_mut() {
            Some(p) => {
                p.target.release()?;
                let held = p.target.wait_at_entry();
                let ticked = if held { self.on_maps_tick() } else { Ok(()) };
                let t = &mut self.process.as_mut().expect("matched").target;
                t.resume();
                ticked?;
                match &self.args.command {
                    Some(cmd) => {
                        println!("Attaching to \"{cmd}\" (pid {}), Ctrl+C to quit.", t.pid)
                    }
                    None => println!("Attaching to pid {}, Ctrl+C to quit.", t.pid),
                }
            }
            None => println!("Attaching to kernel allocators, Ctrl+C to quit."),
        }
        if let Some(t) = &self.filter {
            println!("Kernel allocations made by pid {} only.", t.pid);
        }
        Ok(())
    }

    /// Resolves when the target exits, with how ("exited with status 3"); never in kernel
    /// mode without -p.
    pub fn exit_watch(&mut self) -> Result<Pin<Box<dyn Future<Output = String>>>> {
        let target = match self.process.as_mut() {
            Some(p) => Some(&mut p.target),
            None => self.filter.as_mut(),
        };
        Ok(match target {
            Some(t) => {
                let rx = t.watch_exit()?;
                Box::pin(async move { rx.await.unwrap_or_else(|_| "exited".into()) })
            }
            None => Box::pin(std::future::pending()),
        })
    }

    /// The --trace events, when there are any to print.
    pub fn events(&mut self) -> Option<&mut trace::Events> {
        self.events.as_mut()
    }

    pub fn print_events(&mut self) {
        if let Some(e) = self.events.as_mut() {
            e.print(&mut self.collector);
        }
    }

    /// One interval: a snapshot into the timeline, a table unless --duration. True when the
    /// count of intervals asked for is reached.
    pub fn on_interval(&mut self) -> Result<bool> {
        self.check_exec()?;
        if self.query.measure == Measure::ResidentPages && !self.huge_pages_said {
            let pid = self.process.as_ref().map_or(0, Process::pid);
            self.huge_pages_said = say_huge_pages(pid);
        }
        let snap = self.collector.snapshot(&self.query)?;
        self.live.clear();
        // A --duration run shows a status line instead of a table per interval; --listen
        // shows pages.
        let table = &mut self.collector.table;
        if self.args.duration.is_none() && self.server.is_none() {
            print!(
                "{}",
                report::text::table(&snap, table, &self.title, self.args.top)
            );
        }
        if self.timeline.record(snap) {
            // Thinned: stacks no kept interval holds leave the table too.
            table.retain(&self.timeline.stack_ids());
        }
        if let Some(s) = &self.server {
            s.publish(&self.timeline, table);
        }
        let duration = self.args.duration.map(|d| d.as_secs_f64());
        self.live.update(&self.timeline, table, duration);
        let count = self.args.intervals();
        Ok(count.is_some_and(|c| self.timeline.intervals() >= c))
    }

    /// Every 250 ms: libraries appear right after exec and with every dlopen; the maps are
    /// read once and handed to the unwinder, the symbolizer and Python tracking, while the
    /// target lives, so its stacks still symbolize after it exits.
    pub fn on_maps_tick(&mut self) -> Result<()> {
        self.check_exec()?;
        if let Some(p) = self.process.as_mut()
            && p.read_maps()
        {
            self.collector.names.update_maps(p.maps());
            // A failed update (the target is exiting) leaves the old tables in place.
            if let Ok(true) = p.update_unwinder()
                && self.args.verbose
            {
                eprint!("memleak: new code mapped; {}", p.unwinder.summary());
            }
        }
        let maps = self.process.as_ref().map(|p| p.maps());
        if let Err(e) = self.collector.names.tick_python(maps) {
            eprintln!("memleak: {e:#}");
        }
        self.collector.learn_new_stacks();
        if let Some(p) = self.process.as_mut() {
            for child in p.target.new_children() {
                println!(
                    "memleak: pid {} started child process {child}; it is not traced (memleak follows one process)",
                    p.pid()
                );
            }
        }
        Ok(())
    }

    /// The exec of the traced process, if one happened since the last look.
    fn check_exec(&mut self) -> Result<()> {
        match self.process.as_mut().map(Process::new_exec).transpose()? {
            Some(Some(exec)) => self.on_exec(exec),
            _ => Ok(()),
        }
    }

    /// The process runs a new program: what the old one held, its symbols, its Python
    /// runtime and its stacks' frames are gone together. Says so, except for a started
    /// command's own first exec.
    fn on_exec(&mut self, exec: Exec) -> Result<()> {
        let dropped = self.collector.forget_before(exec.generation);
        self.collector.names.after_exec()?;
        if dropped > 0 && !exec.launch {
            println!(
                "memleak: the target exec'd a new program; dropped {dropped} allocations the old one held"
            );
        }
        Ok(())
    }

    /// The final table (when stopped by a signal or the target's exit), the owners of the
    /// largest stacks' memory, then the reports.
    pub fn finish(mut self, stop: Stop) -> Result<()> {
        self.live.clear();
        let query = match &stop {
            Stop::Count => None,
            Stop::Signal(why) => {
                println!("memleak: {why}; final state:");
                Some(self.query.clone())
            }
            Stop::TargetExited(how) => {
                println!("memleak: the target {how}; outstanding at exit:");
                // Everything still held when the process is gone was never freed: no age
                // filter.
                Some(Query {
                    older_ms: 0,
                    ..self.query.clone()
                })
            }
        };
        if let Some(q) = query {
            self.check_exec()?;
            let snap = self.collector.snapshot(&q)?;
            let table = &self.collector.table;
            print!(
                "{}",
                report::text::table(&snap, table, &self.title, self.args.top)
            );
            self.timeline.record_final(snap);
        }
        // The target still runs (not when it exited): read who holds the largest stacks'
        // memory.
        if !self.args.no_owners && !matches!(stop, Stop::TargetExited(_)) {
            let pid = self.target().map_or(0, |t| t.pid);
            self.timeline.owners = (pid != 0)
                .then(|| find_owners(&self.collector, &self.timeline, self.query.older_ms, pid))
                .flatten();
        }
        let Session {
            args,
            ebpf,
            mut collector,
            events,
            timeline,
            ..
        } = self;
        let table = std::mem::take(&mut collector.table);
        drop(collector);
        drop(events);
        let written = write_reports(args, &analysis::analyze(&timeline, &table));
        // After the reports, and without waiting for the kernel to remove the probes.
        detach::release(ebpf);
        written
    }
}

/// Stacks whose owners are looked for: those the report shows first (growing, then holding).
const OWNED_STACKS: usize = 8;

/// The owners of the memory of the report's first stacks, read from the running target:
/// Python objects and their holders when it runs CPython, then who refers to the blocks no
/// Python owner accounts for (native blocks).
fn find_owners(
    collector: &Collector,
    timeline: &Timeline,
    older_ms: u64,
    pid: u32,
) -> Option<owners::Findings> {
    let analysis = analysis::analyze(timeline, &collector.table);
    let stacks: std::collections::HashSet<i64> = analysis
        .stacks
        .iter()
        .filter(|s| s.final_bytes() > 0 && s.trend != analysis::Trend::Churn)
        .take(OWNED_STACKS)
        .map(|s| s.stack_id)
        .collect();
    let mut found = match collector.python() {
        Some(python) => {
            // Every pymalloc arena too: whichever stack mapped one, what is in it may be
            // another's.
            let arena = owners::pools::arena_size(python.version.minor);
            let asked = |stack_id, size| stacks.contains(&stack_id) || size == arena;
            let blocks = owners::Blocks::new(collector.blocks_of(asked, older_ms));
            owners::python::find(python, &blocks, &owners::python::Limits::default())
        }
        None => owners::Findings::default(),
    };
    let maps = crate::procmaps::read(pid).ok()?;
    let all = owners::Blocks::new(collector.blocks_of(|_, _| true, 0));
    let native_asked = |id: i64| stacks.contains(&id) && found.of(id).next().is_none();
    let describe = |id: i64| {
        let info = collector.table.get(id);
        info.deciding()
            .map_or(format!("stack {id}"), report::format::frame_label)
    };
    let memory = python::Memory::Process(pid);
    let limits = owners::native::Limits::default();
    let (native, scan) =
        owners::native::find(&memory, &maps, &all, &native_asked, &describe, &limits);
    found.owners.extend(native);
    found.owners.sort_by_key(|o| std::cmp::Reverse(o.bytes));
    found.native = Some(scan);
    Some(found)
}

fn query(args: &Args) -> Query {
    Query {
        older_ms: args.older,
        show_allocs: args.show_allocs,
        combined_only: args.combined_only,
        sort: args.sort,
        sample_bytes: args.sample_bytes,
        measure: match args.mode {
            Mode::Alloc => Measure::Allocations,
            Mode::Growth => Measure::ResidentPages,
        },
    }
}

/// Loads the BPF object for `target` and attaches it, with the allocator functions it may
/// call that are not hooked; a started command is killed on failure (it must not run on
/// untraced).
fn attach_user(args: &Args, mut target: Target) -> Result<(Ebpf, Process, Vec<String>)> {
    match setup(args, &mut target) {
        Ok((mut ebpf, unwinder, unhooked)) => {
            let process = Process::new(&mut ebpf, target, unwinder)?;
            Ok((ebpf, process, unhooked))
        }
        Err(e) => {
            target.kill();
            Err(e)
        }
    }
}

/// The BPF object with the target hooked, its unwinder, and the allocator functions it may
/// call that are not hooked.
fn setup(args: &Args, target: &mut Target) -> Result<(Ebpf, unwind::Unwinder, Vec<String>)> {
    // What to hook; growth mode hooks no function.
    let plan = match args.mode {
        Mode::Alloc => Some(hook_plan(args, target)?),
        Mode::Growth => None,
    };
    let mut ebpf = probes::load(args, Some(target.pid), None)?;
    let mut unwinder = unwind::Unwinder::new(&mut ebpf, target.pid, args.unwind)?;
    // Tables before the probes, so the first allocation already gets a whole stack. A
    // started command has not exec'd yet: build what it will map, and hold it at its entry
    // point, where they are placed.
    if target.child.is_none() {
        unwinder.update(&crate::procmaps::read(target.pid)?)?;
    } else {
        let mut preload: Vec<std::path::PathBuf> = match &plan {
            Some(plan) => plan.hooks.iter().map(|h| h.object.clone()).collect(),
            None => target.library("libc").ok().into_iter().collect(),
        };
        preload.retain(|p| *p != target.exe);
        preload.sort();
        preload.dedup();
        let preload: Vec<&std::path::Path> = preload.iter().map(|p| p.as_path()).collect();
        unwinder.prepare(&target.exe, &preload);
        target.hold_at_entry(&mut ebpf)?;
    }
    if args.verbose {
        eprint!("memleak: {}", unwinder.summary());
    }
    let Some(plan) = plan else {
        // A started command's break belongs to memleak's fork until the exec; its first brk
        // call after the exec tells the program's own.
        let brk = match target.child {
            Some(_) => 0,
            None => crate::procmaps::program_break(target.pid)?,
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
