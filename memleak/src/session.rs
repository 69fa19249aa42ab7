//! One tracing session: the BPF object and its probes, the traced processes (or the
//! kernel), the collection and the timeline, from setup to the final reports. main.rs builds
//! one with [`Session::start`] and runs its loop: [`Session::on_interval`] per table,
//! [`Session::on_maps_tick`] every 250 ms, [`Session::on_exit`] when a process exits,
//! [`Session::finish`] at the end.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use aya::{Ebpf, maps::RingBuf, programs::uprobe::UProbeLink};
use memleak_common::names::maps;
use tokio::sync::mpsc;

use crate::{
    analysis::{self, Analysis},
    bpf_map,
    cli::{Args, Mode},
    collect::{Collector, Names, ProcessNames, Query},
    detach,
    kallsyms::Kallsyms,
    model::Measure,
    owners, probes,
    proc_stats::{self, ProcessContext},
    process::{Exec, Process},
    python::{self, Learner, PythonTracking},
    report::{self, live::LiveStatus},
    serve,
    symbolize::Symbolizer,
    target::Target,
    timeline::Timeline,
    trace,
    unwind::Rows,
};

/// Why tracing stopped.
pub enum Stop {
    Count,
    Signal(&'static str),
    TargetExited(String),
}

/// A process that exited: its pid and how.
pub type Exit = (u32, String);

pub struct Session<'a> {
    args: &'a Args,
    ebpf: Ebpf,
    collector: Collector,
    /// The traced processes (user mode), those that exited included; none in kernel mode.
    processes: Vec<Process>,
    /// What the processes share: unwind rows and the Python stacks' reader (user mode).
    shared: Option<Shared>,
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
    /// Where the exit of each process is told (`exit_watch`).
    exits: mpsc::UnboundedSender<Exit>,
    exits_rx: Option<mpsc::UnboundedReceiver<Exit>>,
}

struct Shared {
    rows: Rows,
    learner: Learner,
}

impl<'a> Session<'a> {
    /// Finds or starts the targets, loads and attaches the BPF object, and lets a started
    /// command run.
    pub fn start(args: &'a Args, server: Option<serve::Server>) -> Result<Session<'a>> {
        let mut targets = match &args.command {
            Some(cmd) => vec![Target::spawn(cmd)?],
            None => args
                .pid
                .iter()
                .map(|&p| Target::existing(p))
                .collect::<Result<_>>()?,
        };
        let kernel = args.kernel || (targets.is_empty() && args.cgroup.is_none());
        let mut session = match kernel {
            true => Session::kernel(args, server, targets.pop())?,
            false => Session::user(args, server, targets)?,
        };
        session.discover();
        session.run_target()?;
        let pid = session.first_pid();
        session.timeline = Timeline::new(ProcessContext::read(pid), args.period().as_secs_f64());
        Ok(session)
    }

    /// Kernel mode: the kernel's allocators, of every process or of `filter`'s.
    fn kernel(
        args: &'a Args,
        server: Option<serve::Server>,
        filter: Option<Target>,
    ) -> Result<Self> {
        let layout = probes::kernel_layout()?;
        let mut ebpf = probes::load(args, filter.as_ref().map(|t| t.pid), Some(&layout))?;
        probes::attach_kernel(&mut ebpf)?;
        let names = Names::Kernel(Kallsyms::load()?);
        let mut session = Session::new(args, server, ebpf, names)?;
        session.filter = filter;
        Ok(session)
    }

    /// User mode: the BPF object loaded once, then each target attached on its own.
    fn user(args: &'a Args, server: Option<serve::Server>, targets: Vec<Target>) -> Result<Self> {
        let loaded = load_user(args, targets.first().map_or(0, |t| t.pid));
        let (ebpf, shared) = match loaded {
            Ok(loaded) => loaded,
            Err(e) => {
                // A started command must not run on untraced.
                targets.iter().for_each(Target::kill);
                return Err(e);
            }
        };
        let mut session = Session::new(args, server, ebpf, Names::User(BTreeMap::new()))?;
        session.shared = Some(shared);
        for target in targets {
            session.add_process(target)?;
        }
        Ok(session)
    }

    fn new(
        args: &'a Args,
        server: Option<serve::Server>,
        mut ebpf: Ebpf,
        names: Names,
    ) -> Result<Self> {
        let collector = Collector::new(&mut ebpf, names, args.heap_table())?;
        let events = match args.trace {
            true => Some(trace::Events::new(&mut ebpf)?),
            false => None,
        };
        let query = query(args);
        let (exits, exits_rx) = mpsc::unbounded_channel();
        Ok(Session {
            args,
            title: query.measure.title(args.top),
            query,
            ebpf,
            collector,
            processes: Vec::new(),
            shared: None,
            filter: None,
            events,
            server,
            timeline: Timeline::new(ProcessContext::default(), args.period().as_secs_f64()),
            live: LiveStatus::new(),
            huge_pages_said: false,
            exits,
            exits_rx: Some(exits_rx),
        })
    }

    /// The first target's pid (0 in kernel mode without -p): whose `/proc` facts the
    /// timeline samples.
    fn first_pid(&self) -> u32 {
        match (self.processes.first(), &self.filter) {
            (Some(p), _) => p.pid(),
            (None, Some(t)) => t.pid,
            (None, None) => 0,
        }
    }

    /// The processes traced so far, as the reports list them.
    fn traced(&self) -> Vec<crate::timeline::TracedProcess> {
        let listed = |p: &Process| crate::timeline::TracedProcess {
            pid: p.pid(),
            exited: p.exited.clone(),
            traced_after_ms: p.traced_after.map(|d| d.as_millis() as u64),
        };
        self.processes.iter().map(listed).collect()
    }

    /// Traces `target` from now on: its slot, its tables, its probes, its names. A started
    /// command is killed on failure (it must not run on untraced).
    fn add_process(&mut self, target: Target) -> Result<()> {
        let (pid, started) = (target.pid, target.child.is_some());
        let added = self.attach_process(target);
        if added.is_err() && started {
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        added.with_context(|| format!("tracing pid {pid}"))?;
        let p = self.processes.last_mut().expect("just added");
        watch_exit(&mut p.target, self.exits.clone())
    }

    /// `--children`, `--cgroup`: traces the processes started since the last look, each
    /// on its own (one that is gone already, or cannot be traced, is said and skipped).
    /// Called every maps tick: a process is attached within 250 ms of its start, plus the
    /// attach itself. What it did before is not seen: the window is said per process.
    fn discover(&mut self) {
        let mut new: Vec<(u32, Option<u32>)> = Vec::new();
        for p in self.processes.iter_mut().filter(|p| p.exited.is_none()) {
            let parent = p.pid();
            for child in p.target.new_children() {
                match self.args.children {
                    true => new.push((child, Some(parent))),
                    false => println!(
                        "memleak: pid {parent} started child process {child}; it is not traced (--children traces them)"
                    ),
                }
            }
        }
        if let Some(dir) = &self.args.cgroup {
            new.extend(
                crate::target::cgroup_procs(dir)
                    .into_iter()
                    .map(|pid| (pid, None)),
            );
        }
        for (pid, parent) in new {
            let traced = self
                .processes
                .iter()
                .any(|p| p.pid() == pid && p.exited.is_none());
            // Gone already: nothing to trace, nothing to say.
            if traced || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            if let Err(e) = self.follow(pid, parent) {
                eprintln!("memleak: not tracing new process {pid}: {e:#}");
            }
        }
    }

    /// Traces process `pid`, found while tracing (a child of `parent`, or in the cgroup).
    fn follow(&mut self, pid: u32, parent: Option<u32>) -> Result<()> {
        let age = crate::target::age(pid);
        self.add_process(Target::existing(pid)?)?;
        let p = self.processes.last_mut().expect("just added");
        // The attach done: how long the process ran untraced.
        p.traced_after = crate::target::age(pid).or(age);
        let after = p
            .traced_after
            .map_or("?".into(), |d| d.as_millis().to_string());
        let whose = parent.map_or(String::new(), |p| format!(", child of pid {p}"));
        println!("memleak: tracing pid {pid}{whose}, from {after} ms after its start");
        Ok(())
    }

    fn attach_process(&mut self, mut target: Target) -> Result<()> {
        let args = self.args;
        // What to hook; growth mode hooks no function.
        let plan = match args.mode {
            Mode::Alloc => Some(hook_plan(args, &target)?),
            Mode::Growth => None,
        };
        let slot = self.free_slot()?;
        let shared = self.shared.as_mut().expect("user mode");
        // Tables before the probes, so the first allocation already gets a whole stack. A
        // started command has not exec'd yet: build what it will map, and hold it at its
        // entry point, where they are placed.
        if target.child.is_some() {
            let files = preload(&target, plan.as_ref());
            let files: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
            shared.rows.prepare(&target.exe, &files);
            target.hold_at_entry(&mut self.ebpf)?;
        }
        let pid = target.pid;
        if plan.is_none() {
            seed_break(&mut self.ebpf, &target, slot)?;
        }
        self.collector.retire_slot(slot)?;
        let mut process = Process::new(&self.ebpf, &mut shared.rows, target, slot)?;
        if process.target.child.is_none() {
            process.read_maps();
            process.update_unwinder(&mut shared.rows)?;
        }
        if args.verbose {
            eprint!("memleak: {}", process.unwinder.summary(&shared.rows));
        }
        let python = PythonTracking::new(&self.ebpf, pid, slot, shared.learner.clone())?;
        self.collector.add_process(pid, slot);
        self.collector.names.add(
            pid,
            ProcessNames {
                symbols: Symbolizer::new(pid),
                python: Box::new(python),
            },
        );
        if process.target.child.is_none() {
            name_maps(&mut self.collector, &process, true);
        }
        match plan {
            Some(plan) => process.links = self.hook(&process, plan)?,
            // The tracepoints serve every process: attached with the first.
            None if self.processes.is_empty() => probes::attach_growth(&mut self.ebpf)?,
            None => {}
        }
        self.processes.push(process);
        Ok(())
    }

    /// The lowest slot no live process holds.
    fn free_slot(&self) -> Result<u32> {
        let held: Vec<u32> = self
            .processes
            .iter()
            .filter(|p| p.exited.is_none())
            .map(|p| p.slot)
            .collect();
        (0..self.args.max_processes())
            .find(|s| !held.contains(s))
            .context("no room for another process (all slots of the per-process maps are taken)")
    }

    /// Hooks the allocator of `process` as `plan` says.
    fn hook(&mut self, process: &Process, plan: memleak::binding::Plan) -> Result<Vec<UProbeLink>> {
        let (args, pid) = (self.args, process.pid());
        println!("{}", plan.summary());
        let mut attached = probes::attach(&mut self.ebpf, pid, &plan.hooks)?;
        if args.python_allocators {
            let runtime = python::PythonRuntime::detect(pid)?.context(
                "--python-allocators: no CPython in this process (with -c, attach with -p once it runs)",
            )?;
            let object = runtime.object_path();
            attached.extend(probes::attach_python_allocators(
                &mut self.ebpf,
                pid,
                &object,
            )?);
        }
        if args.verbose {
            say_hooks(&attached, &plan);
        }
        let unhooked = &mut self.collector.unhooked;
        for f in plan.unhooked {
            if !unhooked.contains(&f) {
                unhooked.push(f);
            }
        }
        Ok(attached.into_iter().flat_map(|a| a.links).collect())
    }

    fn target(&self) -> Option<&Target> {
        self.processes
            .first()
            .map(|p| &p.target)
            .or(self.filter.as_ref())
    }

    /// Lets a started command run, and says what is traced. A command held at its entry
    /// point gets its tables, symbols and Python state before it runs on: one that exits
    /// within milliseconds must still be named.
    fn run_target(&mut self) -> Result<()> {
        // Python: found now, or after the exec of a started command (whose maps are still
        // memleak's fork's).
        if self.target().is_none_or(|t| t.child.is_none()) {
            self.on_maps_tick()?;
        }
        if let Some(cmd) = &self.args.command {
            let p = self.processes.first_mut().context("no started command")?;
            p.target.release()?;
            let held = p.target.wait_at_entry();
            let ticked = if held { self.on_maps_tick() } else { Ok(()) };
            let t = &mut self.processes[0].target;
            t.resume();
            ticked?;
            println!("Attaching to \"{cmd}\" (pid {}), Ctrl+C to quit.", t.pid);
        } else if let Some(dir) = &self.args.cgroup {
            let n = self.processes.len();
            println!(
                "Attaching to cgroup {} ({n} processes now), Ctrl+C to quit.",
                dir.display()
            );
        } else if !self.processes.is_empty() {
            let pids: Vec<String> = self.processes.iter().map(|p| p.pid().to_string()).collect();
            let s = if pids.len() > 1 { "s" } else { "" };
            println!("Attaching to pid{s} {}, Ctrl+C to quit.", pids.join(", "));
        } else {
            println!("Attaching to kernel allocators, Ctrl+C to quit.");
        }
        if let Some(t) = &self.filter {
            println!("Kernel allocations made by pid {} only.", t.pid);
        }
        Ok(())
    }

    /// Where the exit of each traced process (or of kernel mode's filter) is told, as
    /// (pid, how: "exited with status 3"); never in kernel mode without -p.
    pub fn exit_watch(&mut self) -> Result<mpsc::UnboundedReceiver<Exit>> {
        if let Some(t) = self.filter.as_mut() {
            watch_exit(t, self.exits.clone())?;
        }
        self.exits_rx.take().context("the exits are watched once")
    }

    /// Process `pid` exited: `Some(how)` when it was the last one traced (tracing ends, its
    /// memory is what it held at exit) unless more may come (`--cgroup`); otherwise its
    /// memory is dropped and it is listed as exited.
    pub fn on_exit(&mut self, (pid, how): Exit) -> Option<String> {
        let live = self.processes.iter().filter(|p| p.exited.is_none()).count();
        let Some(p) = self.processes.iter_mut().find(|p| p.pid() == pid) else {
            // Kernel mode's filter.
            return Some(how);
        };
        if live <= 1 && self.args.cgroup.is_none() {
            return Some(how);
        }
        let dropped = self.collector.forget_before(pid, p.slot, u32::MAX);
        // "(PID 12) exited", "command exited with status 3": said with its pid already.
        let how = how.replace(&format!("(PID {pid}) "), "");
        println!("memleak: pid {pid} {how}; dropped the {dropped} allocations it held");
        p.forget(how);
        None
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
            self.huge_pages_said = say_huge_pages(self.first_pid());
        }
        let snap = self.collector.snapshot(&self.query)?;
        self.timeline.processes = self.traced();
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

    /// Every 250 ms: libraries appear right after exec and with every dlopen; each live
    /// process's maps are read once and handed to its unwinder, symbolizer and Python
    /// tracking, so its stacks still symbolize after it exits.
    pub fn on_maps_tick(&mut self) -> Result<()> {
        self.check_exec()?;
        for i in 0..self.processes.len() {
            let p = &mut self.processes[i];
            if p.exited.is_none() {
                let changed = p.read_maps();
                self.hand_maps_on(i, changed);
            }
        }
        self.discover();
        self.collector.learn_new_stacks();
        Ok(())
    }

    /// Hands process `i`'s last maps read to its unwinder (when `changed`), symbolizer and
    /// Python tracking.
    fn hand_maps_on(&mut self, i: usize, changed: bool) {
        let p = &mut self.processes[i];
        let pid = p.pid();
        if changed {
            let rows = &mut self.shared.as_mut().expect("user mode").rows;
            // A failed update (the process is exiting) leaves the old tables in place.
            if let Ok(true) = p.update_unwinder(rows)
                && self.args.verbose
            {
                eprint!(
                    "memleak: pid {pid} mapped new code; {}",
                    p.unwinder.summary(rows)
                );
            }
        }
        name_maps(&mut self.collector, p, changed);
    }

    /// The execs of the traced processes since the last look.
    fn check_exec(&mut self) -> Result<()> {
        let several = self.processes.len() > 1;
        for i in 0..self.processes.len() {
            let p = &mut self.processes[i];
            if p.exited.is_some() {
                continue;
            }
            if let Some(exec) = p.new_exec() {
                self.on_exec(i, exec, several)?;
            }
        }
        Ok(())
    }

    /// Process `i` runs a new program: what the old one held, its symbols, its Python
    /// runtime and its stacks' frames are gone together, and the new program's maps are
    /// handed on at once. Says so, except for a started command's own first exec.
    fn on_exec(&mut self, i: usize, exec: Exec, several: bool) -> Result<()> {
        let p = &mut self.processes[i];
        let (pid, slot) = (p.pid(), p.slot);
        let dropped = self.collector.forget_before(pid, slot, exec.generation);
        self.collector.names.after_exec(pid)?;
        p.read_maps_after(exec);
        self.hand_maps_on(i, true);
        if dropped > 0 && !exec.launch {
            let who = if several {
                format!("pid {pid}")
            } else {
                "the target".into()
            };
            println!(
                "memleak: {who} exec'd a new program; dropped {dropped} allocations the old one held"
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
        // The targets still run (not when the last exited): read who holds each one's
        // largest stacks' memory.
        if !self.args.no_owners && !matches!(stop, Stop::TargetExited(_)) {
            self.timeline.owners = Some(self.find_owners());
        }
        self.timeline.processes = self.traced();
        let Session {
            args,
            ebpf,
            mut collector,
            events,
            timeline,
            processes,
            ..
        } = self;
        let table = std::mem::take(&mut collector.table);
        drop(collector);
        drop(events);
        if args.verbose {
            let c = memleak::objects::counts();
            eprintln!(
                "memleak: objects: {} parsed, {} files read, {} answers from memory",
                c.parsed, c.read, c.shared
            );
        }
        let written = write_reports(args, &analysis::analyze(&timeline, &table));
        // After the reports, and without waiting for the kernel to remove the probes (the
        // object's, and those each process owns).
        detach::release((ebpf, processes));
        written
    }
}

/// Hands process `p`'s last maps to its symbolizer (when they `changed`) and its Python
/// tracking, which looks for CPython until found and keeps its threads current.
fn name_maps(collector: &mut Collector, p: &Process, changed: bool) {
    let pid = p.pid();
    if changed {
        collector.names.update_maps(pid, p.maps());
    }
    if let Err(e) = collector.names.tick_python(pid, p.maps()) {
        eprintln!("memleak: pid {pid}: {e:#}");
    }
}

/// Sends (pid, how) on `exits` once `target` exits.
fn watch_exit(target: &mut Target, exits: mpsc::UnboundedSender<Exit>) -> Result<()> {
    let (pid, rx) = (target.pid, target.watch_exit()?);
    tokio::spawn(async move {
        let how = rx.await.unwrap_or_else(|_| "exited".into());
        let _ = exits.send((pid, how));
    });
    Ok(())
}

/// The BPF object for user (or growth) mode, and what its processes share.
fn load_user(args: &Args, first_pid: u32) -> Result<(Ebpf, Shared)> {
    let mut ebpf = probes::load(args, Some(first_pid), None)?;
    if args.mode == Mode::Alloc {
        probes::load_user(&mut ebpf)?;
    }
    let rows = Rows::new(&mut ebpf, args.unwind)?;
    let ring = RingBuf::try_from(bpf_map::take(&mut ebpf, maps::PY_NEW_CODES)?)?;
    let learner = Learner::new(ring);
    Ok((ebpf, Shared { rows, learner }))
}

/// The files a started command will map whose tables are built before its exec: the
/// objects of its hooks (or libc in growth mode), not its executable.
fn preload(target: &Target, plan: Option<&memleak::binding::Plan>) -> Vec<std::path::PathBuf> {
    let mut preload: Vec<std::path::PathBuf> = match plan {
        Some(plan) => plan.hooks.iter().map(|h| h.object.clone()).collect(),
        None => target.library("libc").ok().into_iter().collect(),
    };
    preload.retain(|p| *p != target.exe);
    preload.sort();
    preload.dedup();
    preload
}

/// Growth mode: the program break of `target` in `slot`. A started command's break belongs
/// to memleak's fork until the exec; its first brk call after the exec tells the program's
/// own.
fn seed_break(ebpf: &mut Ebpf, target: &Target, slot: u32) -> Result<()> {
    let brk = match target.child {
        Some(_) => 0,
        None => crate::procmaps::program_break(target.pid)?,
    };
    probes::seed_break(ebpf, slot, brk)
}

/// Stacks whose owners are looked for in each process: the first the report shows (growing,
/// then holding), and as many of the largest. The walk reads every object whatever this is,
/// so asking about more stacks costs little.
const OWNED_STACKS: usize = 16;

/// The stacks of `pid` whose owners are looked for (`OWNED_STACKS`): a few small stacks
/// that happened to grow over a short run must not push a 5 MiB one out.
fn owned_stacks<'a>(
    analysis: &'a analysis::Analysis<'a>,
    pid: u32,
) -> Vec<&'a analysis::StackTrend<'a>> {
    let candidates: Vec<&analysis::StackTrend> = analysis
        .stacks
        .iter()
        .filter(|s| s.info.pid == pid && s.final_bytes() > 0)
        .filter(|s| s.trend != analysis::Trend::Churn)
        .collect();
    let mut largest = candidates.clone();
    largest.sort_by_key(|s| std::cmp::Reverse(s.final_bytes()));
    let mut chosen: Vec<&analysis::StackTrend> =
        candidates.into_iter().take(OWNED_STACKS).collect();
    for s in largest.into_iter().take(OWNED_STACKS) {
        if !chosen.iter().any(|c| c.stack_id == s.stack_id) {
            chosen.push(s);
        }
    }
    chosen
}

impl Session<'_> {
    /// The owners of the memory of each running process's first stacks, read from it.
    fn find_owners(&self) -> owners::each::Owners {
        let analysis = analysis::analyze(&self.timeline, &self.collector.table);
        let running = self.processes.iter().filter(|p| p.exited.is_none());
        let traced = running.map(|p| {
            let pid = p.pid();
            let leading = owned_stacks(&analysis, pid);
            owners::each::Traced {
                pid,
                python: self.collector.python(pid),
                stacks: leading.iter().map(|s| s.stack_id).collect(),
                bytes: leading.iter().map(|s| s.final_bytes()).sum(),
            }
        });
        let budget = owners::each::Budget::default();
        owners::each::find(
            traced.collect(),
            &self.collector,
            self.query.older_ms,
            &budget,
        )
    }
}

impl owners::each::Tracked for Collector {
    fn blocks(
        &self,
        pid: u32,
        asked: &dyn Fn(i64, u64) -> bool,
        older_ms: u64,
    ) -> Vec<owners::Block> {
        self.blocks_of(pid, asked, older_ms)
    }

    fn describe(&self, stack_id: i64) -> String {
        let info = self.table.get(stack_id);
        info.deciding()
            .map_or(format!("stack {stack_id}"), report::format::frame_label)
    }
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
