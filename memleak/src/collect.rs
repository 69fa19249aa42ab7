//! Reads the BPF maps into the data model: one `Snapshot` of what is outstanding, per stack,
//! symbolized. Knows the maps; knows nothing about output formats.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use memleak_common::{
    AllocInfo, COUNTER_ROWS, CombinedAlloc, Counter, Counts, StackRecord, UNKNOWN_SLOT,
    names::maps, split_key,
};

use crate::{
    bpf_map,
    cli::SortKey,
    heap::HeapTable,
    kallsyms::Kallsyms,
    model::{Allocation, Frame, Lost, Measure, ProcessCounts, Snapshot, StackUsage},
    owners::Block,
    procmaps::Mapping,
    python::{PythonRuntime, PythonTracking},
    stacks::{PythonCut, StackInfo, StackTable, attribute},
    symbolize::Symbolizer,
    unwind,
};

/// Stacks whose deciding source line is read at each snapshot, largest first.
const SOURCE_LINES_READ: usize = 20;

/// What turns a stack's addresses into frames.
pub enum Names {
    /// User stacks, by the process they were taken in.
    User(BTreeMap<u32, ProcessNames>),
    /// Kernel stacks (kernel mode).
    Kernel(Kallsyms),
}

/// One process's names: native symbols, and Python frames when it runs CPython.
pub struct ProcessNames {
    pub symbols: Symbolizer,
    pub python: Box<PythonTracking>,
}

impl Names {
    /// Process `pid`'s names, if it is traced.
    fn of(&mut self, pid: u32) -> Option<&mut ProcessNames> {
        match self {
            Names::User(by_pid) => by_pid.get_mut(&pid),
            Names::Kernel(_) => None,
        }
    }

    /// A new traced process.
    pub fn add(&mut self, pid: u32, names: ProcessNames) {
        if let Names::User(by_pid) = self {
            by_pid.insert(pid, names);
        }
    }

    /// Process `pid`'s mappings changed (libraries loaded since).
    pub fn update_maps(&mut self, pid: u32, maps: &[Mapping]) {
        if let Some(n) = self.of(pid) {
            n.symbols.update(maps);
        }
    }

    /// Looks for CPython in process `pid`'s mappings until found, then re-reads its
    /// threads. Says so when it has just found CPython.
    pub fn tick_python(&mut self, pid: u32, maps: &[Mapping]) -> Result<()> {
        if let Some(n) = self.of(pid)
            && let Some(version) = n.python.tick(maps)?
        {
            eprintln!(
                "memleak: found CPython {version} in pid {pid}: Python frames are on every stack"
            );
        }
        Ok(())
    }

    /// Process `pid` exec'd: the old program's symbols and Python runtime are gone.
    pub fn after_exec(&mut self, pid: u32) -> Result<()> {
        if let Some(n) = self.of(pid) {
            n.symbols.forget();
            n.python.reset()?;
        }
        Ok(())
    }

    /// Whether any traced process runs CPython (found).
    fn any_python(&self) -> bool {
        match self {
            Names::User(by_pid) => by_pid.values().any(|n| n.python.runtime().is_some()),
            Names::Kernel(_) => false,
        }
    }
}

/// Outstanding blocks: user mode's heap table, or a hash map (mappings; kernel and growth
/// mode's allocations and pages).
enum Blocks {
    Heap(HeapTable),
    Map(HashMap<MapData, u64, AllocInfo>),
}

impl Blocks {
    /// Every block now. An entry freed while the map is listed is simply gone.
    fn entries(&self) -> Vec<(u64, AllocInfo)> {
        match self {
            Blocks::Heap(table) => table.blocks().collect(),
            Blocks::Map(map) => map.iter().filter_map(|item| item.ok()).collect(),
        }
    }

    fn remove(&mut self, addr: u64) -> bool {
        match self {
            Blocks::Heap(table) => table.forget(addr),
            Blocks::Map(map) => map.remove(&addr).is_ok(),
        }
    }
}

pub struct Collector {
    allocs: Blocks,
    mmaps: Blocks,
    combined: HashMap<MapData, i64, CombinedAlloc>,
    /// Every stack by content hash: user stacks from the unwinder, or kernel stacks.
    stacks: HashMap<MapData, u64, StackRecord>,
    counters: PerCpuArray<MapData, Counts>,
    /// The counts of processes whose slot went to another since, as they were then.
    retired: Vec<(u32, Counts)>,
    /// The exec generation of the program each process runs now (`Process::new_exec`).
    generations: StdHashMap<u32, u32>,
    /// Block key slot → the process it is of (user mode).
    slots: StdHashMap<u32, u32>,
    pub names: Names,
    /// Every stack seen, symbolized: what the snapshots' ids stand for.
    pub table: StackTable,
    started: Instant,
    /// Allocator functions the process may call that are not hooked (reported as lost).
    pub unhooked: Vec<String>,
}

/// What a snapshot should contain.
#[derive(Clone)]
pub struct Query {
    /// Skip allocations younger than this (BCC's -o).
    pub older_ms: u64,
    pub show_allocs: bool,
    pub combined_only: bool,
    pub sort: SortKey,
    /// --sample-bytes: kept blocks smaller than this stand for this many bytes.
    pub sample_bytes: Option<u64>,
    pub measure: Measure,
}

impl Collector {
    /// `heap`: heap blocks are in `HEAP` (user-mode allocation tracking), else in `ALLOCS`.
    pub fn new(ebpf: &mut Ebpf, names: Names, heap: bool) -> Result<Collector> {
        let mut take = |name| bpf_map::take(ebpf, name);
        let allocs = if heap {
            Blocks::Heap(HeapTable::new(take(maps::HEAP)?)?)
        } else {
            Blocks::Map(HashMap::try_from(take(maps::ALLOCS)?)?)
        };
        Ok(Collector {
            allocs,
            mmaps: Blocks::Map(HashMap::try_from(take(maps::MMAPS)?)?),
            combined: HashMap::try_from(take(maps::COMBINED)?)?,
            stacks: HashMap::try_from(take(maps::STACKS)?)?,
            counters: PerCpuArray::try_from(take(maps::COUNTERS)?)?,
            retired: Vec::new(),
            generations: StdHashMap::new(),
            slots: StdHashMap::new(),
            names,
            table: StackTable::default(),
            started: Instant::now(),
            unhooked: Vec::new(),
        })
    }

    pub fn snapshot(&mut self, q: &Query) -> Result<Snapshot> {
        // The instant the maps are read, not after symbolizing (slow for a first table).
        let unix_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let elapsed_s = self.started.elapsed().as_secs_f64();
        // Growth mode keeps resident pages in ALLOCS and mapped address space in MMAPS: two
        // measures, never summed.
        let (stacks, mapped) = match q.measure {
            Measure::Allocations if q.combined_only => (self.combined_usage()?, None),
            Measure::Allocations => (self.outstanding(&[&self.allocs, &self.mmaps], q), None),
            Measure::ResidentPages => (
                self.outstanding(&[&self.allocs], q),
                Some(self.outstanding(&[&self.mmaps], q)),
            ),
        };
        let stacks = self.ranked(stacks, q);
        let mapped = mapped.map(|m| self.ranked(m, q));
        let per_pid = self.process_counts()?;
        let mut total = Counts::default();
        per_pid.iter().for_each(|(_, c)| add_counts(&mut total, c));
        let total = process_counts(0, &total);
        Ok(Snapshot {
            measure: q.measure,
            unix_time,
            elapsed_s,
            total_bytes: stacks.iter().map(|s| s.bytes).sum(),
            total_count: stacks.iter().map(|s| s.count).sum(),
            stacks,
            mapped,
            lost: Lost {
                unhooked: self.unhooked.clone(),
                ..total.lost
            },
            recorded: total.recorded,
            released: total.released,
            // Kernel mode has no processes: its rows only add up.
            processes: match self.names {
                Names::User(_) => per_pid.iter().map(|(p, c)| process_counts(*p, c)).collect(),
                Names::Kernel(_) => Vec::new(),
            },
        })
    }

    /// `--combined-only`: the per-stack totals kept in BPF.
    fn combined_usage(&self) -> Result<StdHashMap<i64, StackUsage>> {
        let mut per_stack = StdHashMap::new();
        for item in self.combined.iter() {
            let (stack_id, c) = item?;
            if c.number_of_allocs == 0 {
                continue;
            }
            let s = usage(&mut per_stack, stack_id);
            s.bytes += c.total_size;
            s.count += c.number_of_allocs;
        }
        Ok(per_stack)
    }

    /// What the entries of `maps` old enough for the query add up to, per stack.
    fn outstanding(&self, maps: &[&Blocks], q: &Query) -> StdHashMap<i64, StackUsage> {
        let mut per_stack = StdHashMap::new();
        let now = monotonic_ns();
        for map in maps {
            for (key, info) in map.entries() {
                let addr = self.address(key);
                let age_ms = now.saturating_sub(info.timestamp_ns) / 1_000_000;
                if age_ms < q.older_ms {
                    continue;
                }
                let s = usage(&mut per_stack, info.stack_id);
                let (bytes, count) = scaled(info.size, q.sample_bytes);
                s.bytes += bytes;
                s.count += count;
                if q.show_allocs {
                    s.allocations.push(Allocation {
                        addr,
                        size: info.size,
                        age_ms,
                    });
                }
            }
        }
        per_stack
    }

    /// The stacks largest first (by the user's key), symbolized and classified.
    fn ranked(&mut self, per_stack: StdHashMap<i64, StackUsage>, q: &Query) -> Vec<StackUsage> {
        let mut stacks: Vec<StackUsage> = per_stack.into_values().collect();
        stacks.sort_by(|a, b| match q.sort {
            SortKey::Size => (b.bytes, b.count).cmp(&(a.bytes, a.count)),
            SortKey::Count => (b.count, b.bytes).cmp(&(a.count, a.bytes)),
        });
        for s in &mut stacks {
            self.learn(s.stack_id);
            s.allocations.sort_by_key(|a| a.addr);
        }
        let largest = stacks.iter().take(SOURCE_LINES_READ).map(|s| s.stack_id);
        self.table.read_sources(largest);
        stacks
    }

    /// The address of the block under `key`: user blocks are keyed with their process's
    /// slot (`Traced::key`), kernel ones by address.
    pub fn address(&self, key: u64) -> u64 {
        match self.names {
            Names::User(_) => split_key(key).1,
            Names::Kernel(_) => key,
        }
    }

    /// Slot `slot` goes to a new process: the counts of the process that held it are kept
    /// as they are, and its row starts again from zero. Called before the new process
    /// enters `TRACED`, so that none of its own counts is taken for its predecessor's.
    pub fn retire_slot(&mut self, slot: u32) -> Result<()> {
        if let Some(old) = self.slots.remove(&slot) {
            self.retired.push((old, self.row(slot)?));
            let cpus = nr_cpus().map_err(|(_, e)| e)?;
            let zero = PerCpuValues::try_from(vec![Counts::default(); cpus])?;
            self.counters.set(slot, zero, 0)?;
        }
        Ok(())
    }

    /// Process `pid` has the blocks and the counters of `slot`.
    pub fn add_process(&mut self, pid: u32, slot: u32) {
        self.slots.insert(slot, pid);
        self.generations.insert(pid, 0);
    }

    fn generation_of(&self, pid: u32) -> u32 {
        self.generations.get(&pid).copied().unwrap_or(0)
    }

    /// After process `pid` (blocks keyed with `slot`) exec'd into exec generation `current`:
    /// forgets what the old program held (exec freed it all); `u32::MAX` when it exited.
    /// Returns how many allocations were dropped.
    pub fn forget_before(&mut self, pid: u32, slot: u32, current: u32) -> usize {
        let mut dropped = 0;
        for map in [&mut self.allocs, &mut self.mmaps] {
            let stale: Vec<u64> = map
                .entries()
                .into_iter()
                .filter(|(key, info)| split_key(*key).0 == slot && info.execs < current)
                .map(|(key, _)| key)
                .collect();
            for addr in stale {
                dropped += map.remove(addr) as usize;
            }
        }
        // Stacks seen again from now on are symbolized anew; the old program's keep their
        // frames for the snapshots that hold them.
        self.generations.insert(pid, current);
        dropped
    }

    /// A stack from the table, symbolized now if it is new.
    pub fn stack(&mut self, stack_id: i64) -> &StackInfo {
        self.learn(stack_id);
        self.table.get(stack_id)
    }

    /// Puts the stack in the table if it is not there from this program yet (symbolized,
    /// attributed), and attributes it again once Python is found under it. A failed walk
    /// (negative id) has no entry.
    fn learn(&mut self, stack_id: i64) {
        if stack_id < 0 {
            return;
        }
        let known = self
            .table
            .entry(stack_id)
            .filter(|s| s.generation == self.generation_of(s.pid))
            .map(|s| (s.class.is_some(), s.pid));
        let (frames, truncated, python_cut, pid) = match known {
            Some((true, _)) => return,
            Some((false, pid)) if self.python_runtime(pid).is_none() => return,
            Some((false, pid)) => {
                let s = self.table.get(stack_id);
                (s.frames.clone(), s.truncated, s.python_cut, pid)
            }
            None => match self.symbolize(stack_id) {
                Some(stack) => stack,
                None => return,
            },
        };
        let who = attribute(&frames, self.python_runtime(pid));
        let mut info = StackInfo::new(frames, truncated, self.generation_of(pid), who);
        info.python_cut = python_cut;
        info.pid = pid;
        self.table.insert(stack_id, info);
    }

    fn python_runtime(&mut self, pid: u32) -> Option<&crate::python::PythonRuntime> {
        let names = self.names.of(pid)?;
        names.python.runtime_mut().map(|rt| &*rt)
    }

    /// A stack's frames, innermost first, whether the walk stopped short, how many outer
    /// Python frames it did not keep and whose it is; `None`: the stack is not in the map.
    fn symbolize(&mut self, stack_id: i64) -> Option<(Vec<Frame>, bool, Option<PythonCut>, u32)> {
        let unwind::Stack {
            native: ips,
            python: python_frames,
            truncated,
            python_dropped,
            tgid,
        } = unwind::read_stack(&self.stacks, stack_id)?;
        let frames: Vec<Frame> = match &mut self.names {
            Names::User(by_pid) => match by_pid.get_mut(&tgid) {
                // Stacks are taken at the allocator's return: every address is a return
                // address.
                Some(ProcessNames { symbols, python }) => {
                    let native = ips
                        .iter()
                        .flat_map(|&ip| symbols.symbolize(ip, true))
                        .collect();
                    match python.runtime_mut() {
                        Some(rt) => rt.splice(native, &python_frames),
                        None => native,
                    }
                }
                // A process memleak no longer knows: addresses only.
                None => ips
                    .iter()
                    .map(|&addr| Frame {
                        addr,
                        ..Default::default()
                    })
                    .collect(),
            },
            Names::Kernel(k) => ips.iter().map(|&ip| k.frame(ip)).collect(),
        };
        let cut = PythonCut::from_record(python_dropped);
        Some((frames, truncated, cut, tgid))
    }

    /// Symbolizes the stacks not seen yet while the target is alive to be read: Python code
    /// objects (names, lines) die with the process. Native frames can wait for the table, so
    /// a target without Python costs nothing here.
    pub fn learn_new_stacks(&mut self) {
        if !self.names.any_python() {
            return;
        }
        let ids: Vec<u64> = self.stacks.keys().flatten().collect();
        for id in ids.into_iter().map(|id| id as i64) {
            self.learn(id);
        }
    }

    /// Process `pid`'s outstanding blocks at least `older_ms` old (as the tables count
    /// them) that `asked(stack_id, size)` wants, for the owner walk.
    pub fn blocks_of(
        &self,
        pid: u32,
        asked: impl Fn(i64, u64) -> bool,
        older_ms: u64,
    ) -> Vec<Block> {
        let now = monotonic_ns();
        let of_pid = |key: u64| self.slots.get(&split_key(key).0) == Some(&pid);
        [&self.allocs, &self.mmaps]
            .iter()
            .flat_map(|map| map.entries())
            .filter(|(key, info)| of_pid(*key) && asked(info.stack_id, info.size))
            .filter(|(_, info)| now.saturating_sub(info.timestamp_ns) / 1_000_000 >= older_ms)
            .map(|(key, info)| Block {
                addr: self.address(key),
                size: info.size,
                stack_id: info.stack_id,
            })
            .collect()
    }

    /// Process `pid`'s CPython, once found.
    pub fn python(&self, pid: u32) -> Option<&PythonRuntime> {
        match &self.names {
            Names::User(by_pid) => by_pid.get(&pid)?.python.runtime(),
            Names::Kernel(_) => None,
        }
    }

    /// One `COUNTERS` row (a slot's), summed over the CPUs.
    fn row(&self, slot: u32) -> Result<Counts> {
        let mut sum = Counts::default();
        self.counters
            .get(&slot, 0)?
            .iter()
            .for_each(|cpu| add_counts(&mut sum, cpu));
        Ok(sum)
    }

    /// The counts of each traced process (and of no known process, pid 0, when any), in pid
    /// order. Kernel mode has no slots: every row is read, under pid 0.
    fn process_counts(&self) -> Result<Vec<(u32, Counts)>> {
        let rows: Vec<u32> = match self.names {
            Names::User(_) => self.slots.keys().copied().chain([UNKNOWN_SLOT]).collect(),
            Names::Kernel(_) => (0..COUNTER_ROWS).collect(),
        };
        let mut by_pid: BTreeMap<u32, Counts> = BTreeMap::new();
        for slot in rows {
            let pid = self.slots.get(&slot).copied().unwrap_or(0);
            add_counts(by_pid.entry(pid).or_default(), &self.row(slot)?);
        }
        for (pid, counts) in &self.retired {
            add_counts(by_pid.entry(*pid).or_default(), counts);
        }
        Ok(by_pid
            .into_iter()
            .filter(|&(pid, c)| pid != 0 || c != Counts::default())
            .collect())
    }
}

/// A process's counters as the model says them.
fn process_counts(pid: u32, c: &Counts) -> ProcessCounts {
    let n = |counter: Counter| c.n[counter as usize];
    ProcessCounts {
        pid,
        lost: Lost {
            allocs_map_full: n(Counter::AllocsFull),
            stack_walks_failed: n(Counter::StackLost),
            inflight_map_full: n(Counter::InflightFull),
            combined_map_full: n(Counter::CombinedFull),
            trace_events_lost: n(Counter::EventsLost),
            stale_inflight: n(Counter::StaleInflight),
            munmap_splits_lost: n(Counter::MunmapSplitLost),
            python_codes_dropped: n(Counter::PythonCodesDropped),
            unhooked: Vec::new(),
        },
        recorded: n(Counter::Recorded),
        released: n(Counter::Released),
    }
}

/// Adds `more` into `sum`, counter by counter.
fn add_counts(sum: &mut Counts, more: &Counts) {
    for (s, n) in sum.n.iter_mut().zip(more.n) {
        *s += n;
    }
}

/// What one recorded block stands for: itself, or under --sample-bytes N a block of `size`
/// < N kept with probability size/N stands for N bytes in N/size blocks.
fn scaled(size: u64, sample_bytes: Option<u64>) -> (u64, u64) {
    match sample_bytes {
        Some(n) if size > 0 && size < n => (n, (n + size / 2) / size),
        _ => (size, 1),
    }
}

fn usage(per_stack: &mut StdHashMap<i64, StackUsage>, stack_id: i64) -> &mut StackUsage {
    per_stack.entry(stack_id).or_insert_with(|| StackUsage {
        stack_id,
        bytes: 0,
        count: 0,
        allocations: Vec::new(),
    })
}

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
