//! Command line, BCC memleak-compatible so a user's habits work.

use std::{
    net::{Ipv4Addr, SocketAddr, ToSocketAddrs},
    path::PathBuf,
    time::Duration,
};

use clap::{Parser, ValueEnum};

use crate::unwind::UnwindMode;
use memleak_common::{
    DEFAULT_MAX_ALLOCS, DEFAULT_MAX_COMBINED, DEFAULT_MAX_INFLIGHT, DEFAULT_MAX_MMAPS,
    DEFAULT_MAX_PROCESSES, DEFAULT_MAX_STACKS, DEFAULT_THREAD_SLOTS, MAX_PROCESSES,
};

#[derive(Parser, Debug)]
#[command(
    name = "memleak",
    version,
    about = "Trace outstanding native allocations of a live process and show the stacks that hold them",
    after_help = "EXAMPLES:\n  memleak -p $(pidof app)          every 5 s, the top 10 stacks holding memory\n  memleak -p PID 10 6 -T 5         6 tables, 10 s apart, top 5 stacks\n  memleak -c \"./app --flag\"         start the command traced from its first allocation\n  memleak -p PID -O libjemalloc --symbols-prefix je_"
)]
pub struct Args {
    /// Trace these processes (all their threads, present and future): `-p 12,34` or
    /// `-p 12 -p 34`; the reports group the stacks by process. Without -p or -c, memleak
    /// traces the kernel's allocators (kmalloc, kmem_cache, pages, percpu), as BCC does.
    #[arg(
        short,
        long,
        conflicts_with = "command",
        value_delimiter = ',',
        value_name = "PID[,PID...]"
    )]
    pub pid: Vec<u32>,

    /// Also trace every process a traced process forks from now on (recursively), each
    /// attached within one maps tick (250 ms) of its start; with -p or -c.
    #[arg(long)]
    pub children: bool,

    /// Trace every process in this cgroup v2 directory, now and later (a container's, a
    /// systemd unit's: /sys/fs/cgroup/system.slice/app.service); with or without -p.
    #[arg(long, value_name = "PATH")]
    pub cgroup: Option<PathBuf>,

    /// Trace the kernel's allocators (the default without -p/-c); with -p, only the kernel
    /// memory that the process's own threads allocate.
    #[arg(long, conflicts_with = "command")]
    pub kernel: bool,

    /// Run this command (split on whitespace) and trace it from its first allocation.
    #[arg(short, long)]
    pub command: Option<String>,

    /// Seconds between tables.
    #[arg(default_value_t = 5)]
    pub interval: u64,

    /// Number of tables before exiting (default: until Ctrl-C or the target exits).
    pub count: Option<u64>,

    /// Print every allocation and free as it happens.
    #[arg(short, long)]
    pub trace: bool,

    /// Also list the outstanding allocations (address and size) of each stack.
    #[arg(short = 'a', long)]
    pub show_allocs: bool,

    /// Ignore allocations younger than this many milliseconds.
    #[arg(short, long, default_value_t = 500, value_name = "MS")]
    pub older: u64,

    /// Only keep per-stack totals in the kernel (cheaper to read; no -a, no -o).
    #[arg(long)]
    pub combined_only: bool,

    /// Accepted for BCC compatibility; memleak always treats a new block at an address it
    /// still tracks as proof the old one was freed.
    #[arg(long)]
    pub wa_missing_free: bool,

    /// Record one allocation in N (on average).
    #[arg(short, long, default_value_t = 1, value_name = "N")]
    pub sample_rate: u64,

    /// Sample by bytes: keep a block smaller than N bytes with probability size/N, every
    /// larger one, and scale the figures back up (a kept small block stands for N bytes and
    /// N/size blocks), so big and small allocators are seen in proportion to the memory.
    #[arg(long, value_name = "N", conflicts_with = "combined_only")]
    pub sample_bytes: Option<u64>,

    /// Show only the N stacks holding the most.
    #[arg(short = 'T', long, default_value_t = 10, value_name = "N")]
    pub top: usize,

    /// Ignore allocations smaller than this many bytes.
    #[arg(short = 'z', long, value_name = "BYTES")]
    pub min_size: Option<u64>,

    /// Ignore allocations larger than this many bytes.
    #[arg(short = 'Z', long, value_name = "BYTES")]
    pub max_size: Option<u64>,

    /// Also hook the malloc family defined in this object (a path or a name such as
    /// `libjemalloc`), beside the functions the process binds (found with no flag).
    #[arg(short = 'O', long, value_name = "LIB")]
    pub obj: Option<String>,

    /// Also hook an allocator whose symbols carry this prefix (e.g. `je_`): in --obj, else
    /// at their first definition in the process.
    #[arg(long, value_name = "PREFIX", default_value = "")]
    pub symbols_prefix: String,

    /// Order stacks by outstanding bytes or by number of allocations.
    #[arg(long, value_enum, default_value_t = SortKey::Size)]
    pub sort: SortKey,

    /// Time between snapshots (`5s`, `500ms`); overrides the positional INTERVAL.
    #[arg(long = "interval", value_name = "TIME", value_parser = humantime::parse_duration)]
    pub interval_time: Option<Duration>,

    /// Capture for this long (`90s`, `2m`, `1h`), then print the report and exit. Shows a
    /// status line on a terminal instead of a table per interval.
    #[arg(long, value_name = "TIME", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Write every interval, the final state and the analysis as JSON (schema memleak/1,
    /// docs/memleak-json.schema.json) on exit.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Write what is outstanding at the end as folded stacks (flamegraph.pl, inferno), in bytes.
    #[arg(long, value_name = "FILE")]
    pub folded: Option<PathBuf>,

    /// Write a gzipped pprof heap profile (go tool pprof, Pyroscope).
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,

    /// Write one self-contained HTML page: outstanding bytes over time, a flamegraph, the report.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,

    /// Write the final report (printed at the end) to FILE too.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,

    /// How to walk native stacks: `dwarf` follows .eh_frame unwind tables (whole stacks
    /// through code built without frame pointers); `fp` follows frame pointers only.
    #[arg(long, value_enum, default_value_t = UnwindMode::Dwarf)]
    pub unwind: UnwindMode,

    /// Also hook CPython's own allocators (PyObject_*/PyMem_*) so every pymalloc block is
    /// counted, not only the arenas pymalloc maps. Costly on allocation-heavy Python code.
    #[arg(long)]
    pub python_allocators: bool,

    /// Bench only: the same probes, with programs that return at once, to measure the
    /// trap's own cost (the floor memleak's work adds to).
    #[arg(long, hide = true)]
    pub empty_probes: bool,

    /// Do not look for the owners of the largest stacks' memory at the end of the run (a
    /// Python target's objects and the module, class, closure or cache holding them, read
    /// from outside without stopping the target).
    #[arg(long)]
    pub no_owners: bool,

    /// What to measure. `alloc`: every block the allocator hands out and not back, by the
    /// stack that asked for it. `growth`: no function is hooked, only the kernel's memory
    /// system calls and page faults: which code made resident memory grow (first write to a
    /// page) and which mapped address space, still held; almost free for the target.
    #[arg(long, value_enum, default_value_t = Mode::Alloc)]
    pub mode: Mode,

    /// While tracing, serve /metrics (Prometheus, OpenMetrics), /debug/pprof/heap (go tool
    /// pprof, Parca, Alloy) and a live page at / on this address: `9100` or `:9100` (the
    /// loopback), `0.0.0.0:9100`, `HOST:PORT`. The pages replace the per-interval tables.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,

    /// Stacks with series of their own on /metrics; the rest add up to one "other" series.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub metrics_top: usize,

    /// Say what was attached where, and map usage.
    #[arg(short, long)]
    pub verbose: bool,

    /// Outstanding allocations to keep (user mode: a table of twice as many slots, rounded up
    /// to a power of two).
    #[arg(long, default_value_t = DEFAULT_MAX_ALLOCS, value_name = "N")]
    pub max_allocs: u32,

    /// Capacity of the anonymous-mapping map.
    #[arg(long, default_value_t = DEFAULT_MAX_MMAPS, value_name = "N")]
    pub max_mmaps: u32,

    /// Capacity of the stack map (distinct stacks).
    #[arg(long, default_value_t = DEFAULT_MAX_STACKS, value_name = "N")]
    pub max_stacks: u32,

    /// Capacity of the in-flight call map (calls of threads that share a thread slot).
    #[arg(long, default_value_t = DEFAULT_MAX_INFLIGHT, value_name = "N")]
    pub max_inflight: u32,

    /// Thread slots for calls in flight, a power of two: thread ids that differ by a multiple
    /// of it share a slot and fall back to the in-flight map (slower).
    #[arg(long, default_value_t = DEFAULT_THREAD_SLOTS, value_name = "N")]
    pub thread_slots: u32,

    /// Capacity of the per-stack totals map (--combined-only).
    #[arg(long, default_value_t = DEFAULT_MAX_COMBINED, value_name = "N")]
    pub max_combined: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Alloc,
    Growth,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SortKey {
    Size,
    Count,
}

impl Args {
    /// Time between snapshots.
    pub fn period(&self) -> Duration {
        self.interval_time
            .unwrap_or(Duration::from_secs(self.interval))
    }

    /// Snapshots to take before stopping: COUNT, or as many as fit in --duration.
    pub fn intervals(&self) -> Option<u64> {
        let in_duration = self.duration.map(|d| {
            (d.as_secs_f64() / self.period().as_secs_f64())
                .ceil()
                .max(1.0) as u64
        });
        match (self.count, in_duration) {
            (Some(c), Some(d)) => Some(c.min(d)),
            (c, d) => c.or(d),
        }
    }

    /// Checks what clap cannot express; returns a one-line message for the user.
    /// User-mode allocation tracking keeps heap blocks in the `HEAP` table; kernel and
    /// growth mode keep theirs in the `ALLOCS` hash map.
    /// Processes the per-process maps have room for: the PIDs named, or
    /// `DEFAULT_MAX_PROCESSES` when more may come (`--children`, `--cgroup`).
    pub fn max_processes(&self) -> u32 {
        let named = self.pid.len().max(1) as u32;
        match self.follows() {
            true => named.max(DEFAULT_MAX_PROCESSES),
            false => named,
        }
    }

    /// Processes are added while tracing (`--children`, `--cgroup`).
    pub fn follows(&self) -> bool {
        self.children || self.cgroup.is_some()
    }

    pub fn heap_table(&self) -> bool {
        !self.kernel && self.mode == Mode::Alloc
    }

    /// `--listen`'s address: a port alone (or `:PORT`) is on the loopback.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, String> {
        let Some(text) = &self.listen else {
            return Ok(None);
        };
        let bad = |why: &str| format!("--listen {text:?}: {why}");
        let port_only = text.strip_prefix(':').unwrap_or(text);
        if !port_only.is_empty() && port_only.bytes().all(|b| b.is_ascii_digit()) {
            let port: u16 = port_only
                .parse()
                .map_err(|_| bad("the port must be 0 to 65535"))?;
            return Ok(Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port))));
        }
        if !text.contains(':') {
            return Err(bad("expected PORT, :PORT or HOST:PORT"));
        }
        let mut addrs = text
            .to_socket_addrs()
            .map_err(|e| bad(&format!("not an address and port ({e})")))?;
        addrs
            .next()
            .map(Some)
            .ok_or_else(|| bad("the host has no address"))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.period() < Duration::from_millis(100) {
            return Err("the interval must be at least 100 ms".into());
        }
        if self.duration.is_some_and(|d| d < self.period()) {
            return Err("--duration must be at least one interval".into());
        }
        if self.count == Some(0) {
            return Err("the count must be at least 1".into());
        }
        if self.sample_rate == 0 {
            return Err("--sample-rate must be at least 1".into());
        }
        if self.sample_bytes == Some(0) || self.sample_bytes.is_some_and(|n| n > u32::MAX as u64) {
            return Err("--sample-bytes must be between 1 and 4294967295".into());
        }
        if let (Some(min), Some(max)) = (self.min_size, self.max_size)
            && min > max
        {
            return Err(format!("--min-size {min} is larger than --max-size {max}"));
        }
        if self.mode == Mode::Growth {
            if self.pid.is_empty() && self.command.is_none() {
                return Err("--mode growth traces a process: give -p PID or -c COMMAND".into());
            }
            let unsupported = [
                ("--kernel", self.kernel),
                ("--combined-only", self.combined_only),
                ("--trace", self.trace),
                ("--python-allocators", self.python_allocators),
                ("--obj", self.obj.is_some()),
                ("--sample-bytes", self.sample_bytes.is_some()),
            ];
            if let Some((flag, _)) = unsupported.iter().find(|(_, on)| *on) {
                return Err(format!(
                    "{flag} is for the allocation mode, not --mode growth"
                ));
            }
        }
        if self.follows() && self.kernel {
            return Err("--children and --cgroup are for user processes, not --kernel".into());
        }
        if self.children && self.pid.is_empty() && self.command.is_none() && self.cgroup.is_none() {
            return Err("--children follows the processes given with -p or -c".into());
        }
        if let Some(dir) = &self.cgroup
            && !dir.join("cgroup.procs").is_file()
        {
            return Err(format!(
                "{} is not a cgroup v2 directory (no cgroup.procs)",
                dir.display()
            ));
        }
        if self.kernel && self.pid.len() > 1 {
            return Err("--kernel filters on one process: give a single -p PID".into());
        }
        if self.pid.len() > MAX_PROCESSES as usize {
            return Err(format!(
                "memleak traces at most {MAX_PROCESSES} processes at once"
            ));
        }
        let mut pids = self.pid.clone();
        pids.sort_unstable();
        if let Some(w) = pids.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!("PID {} is given twice", w[0]));
        }
        if self.combined_only && self.show_allocs {
            return Err("--show-allocs needs the per-allocation map; drop --combined-only".into());
        }
        for (name, v) in [
            ("--max-allocs", self.max_allocs),
            ("--max-mmaps", self.max_mmaps),
            ("--max-stacks", self.max_stacks),
            ("--max-inflight", self.max_inflight),
            ("--max-combined", self.max_combined),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        self.listen_addr()?;
        if !self.thread_slots.is_power_of_two() {
            return Err("--thread-slots must be a power of two".into());
        }
        Ok(())
    }
}
