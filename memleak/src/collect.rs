//! Reads the BPF maps into the data model: one `Snapshot` of what is outstanding, per stack,
//! symbolized. Knows the maps; knows nothing about output formats.

use std::{
    collections::HashMap as StdHashMap,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Result;
use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
};
use memleak_common::{AllocInfo, CombinedAlloc, Counter, StackRecord, names::maps};

use crate::{
    bpf_map,
    cli::SortKey,
    heap::HeapTable,
    kallsyms::Kallsyms,
    model::{Allocation, Frame, Lost, Measure, Snapshot, StackUsage},
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
#[allow(clippy::large_enum_variant, reason = "one per run")]
pub enum Names {
    /// A process's user stacks: native symbols, and Python frames when it runs CPython.
    User(Symbolizer, Box<PythonTracking>),
    /// Kernel stacks (kernel mode).
    Kernel(Kallsyms),
}

impl Names {
    /// The process's mappings changed (libraries loaded since); nothing in kernel mode.
    pub fn update_maps(&mut self, maps: &[Mapping]) {
        if let Names::User(symbols, _) = self {
            symbols.update(maps);
        }
    }

    /// Looks for CPython in the process's mappings until found, then re-reads its threads;
    /// nothing in kernel mode. Says so when it has just found CPython.
    pub fn tick_python(&mut self, maps: Option<&[Mapping]>) -> Result<()> {
        if let (Names::User(_, python), Some(maps)) = (self, maps)
            && let Some(version) = python.tick(maps)?
        {
            eprintln!("memleak: found CPython {version}: Python frames are on every stack");
        }
        Ok(())
    }

    /// The process exec'd: the old program's symbols and Python runtime are gone.
    pub fn after_exec(&mut self) -> Result<()> {
        if let Names::User(symbols, python) = self {
            symbols.forget();
            python.reset()?;
        }
        Ok(())
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
    counters: PerCpuArray<MapData, u64>,
    /// The exec generation of the program running now (`Process::new_exec`).
    generation: u32,
    /// The traced process (0 in kernel mode).
    pid: u32,
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
    pub fn new(ebpf: &mut Ebpf, pid: u32, names: Names, heap: bool) -> Result<Collector> {
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
            generation: 0,
            pid,
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
        let counters = self.counters()?;
        Ok(Snapshot {
            measure: q.measure,
            unix_time,
            elapsed_s,
            total_bytes: stacks.iter().map(|s| s.bytes).sum(),
            total_count: stacks.iter().map(|s| s.count).sum(),
            stacks,
            mapped,
            lost: Lost {
                allocs_map_full: counters[Counter::AllocsFull as usize],
                stack_walks_failed: counters[Counter::StackLost as usize],
                inflight_map_full: counters[Counter::InflightFull as usize],
                combined_map_full: counters[Counter::CombinedFull as usize],
                trace_events_lost: counters[Counter::EventsLost as usize],
                stale_inflight: counters[Counter::StaleInflight as usize],
                munmap_splits_lost: counters[Counter::MunmapSplitLost as usize],
                python_codes_dropped: counters[Counter::PythonCodesDropped as usize],
                unhooked: self.unhooked.clone(),
            },
            recorded: counters[Counter::Recorded as usize],
            released: counters[Counter::Released as usize],
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
            for (addr, info) in map.entries() {
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
        self.table.read_sources(self.pid, largest);
        stacks
    }

    /// After the target exec'd into exec generation `current`: forgets what the old program
    /// held (exec freed it all). Returns how many allocations were dropped.
    pub fn forget_before(&mut self, current: u32) -> usize {
        let mut dropped = 0;
        for map in [&mut self.allocs, &mut self.mmaps] {
            let stale: Vec<u64> = map
                .entries()
                .into_iter()
                .filter(|(_, info)| info.execs < current)
                .map(|(addr, _)| addr)
                .collect();
            for addr in stale {
                dropped += map.remove(addr) as usize;
            }
        }
        // Stacks seen again from now on are symbolized anew; the old program's keep their
        // frames for the snapshots that hold them.
        self.generation = current;
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
        let attributed = self
            .table
            .entry(stack_id)
            .filter(|s| s.generation == self.generation)
            .map(|s| s.class.is_some());
        let (frames, truncated, python_cut) = match attributed {
            Some(true) => return,
            Some(false) if self.python_runtime().is_none() => return,
            Some(false) => {
                let s = self.table.get(stack_id);
                (s.frames.clone(), s.truncated, s.python_cut)
            }
            None => match self.symbolize(stack_id) {
                Some(stack) => stack,
                None => return,
            },
        };
        let who = attribute(&frames, self.python_runtime());
        let mut info = StackInfo::new(frames, truncated, self.generation, who);
        info.python_cut = python_cut;
        self.table.insert(stack_id, info);
    }

    fn python_runtime(&mut self) -> Option<&crate::python::PythonRuntime> {
        match &mut self.names {
            Names::User(_, python) => python.runtime_mut().map(|rt| &*rt),
            Names::Kernel(_) => None,
        }
    }

    /// A stack's frames, innermost first, whether the walk stopped short and how many outer
    /// Python frames it did not keep; `None`: the stack is not in the map.
    fn symbolize(&mut self, stack_id: i64) -> Option<(Vec<Frame>, bool, Option<PythonCut>)> {
        let unwind::Stack {
            native: ips,
            python: python_frames,
            truncated,
            python_dropped,
        } = unwind::read_stack(&self.stacks, stack_id)?;
        let frames: Vec<Frame> = match &mut self.names {
            Names::User(symbols, python) => {
                // Stacks are taken at the allocator's return: every address is a return
                // address.
                let native = ips
                    .iter()
                    .flat_map(|&ip| symbols.symbolize(ip, true))
                    .collect();
                match python.runtime_mut() {
                    Some(rt) => rt.splice(native, &python_frames),
                    None => native,
                }
            }
            Names::Kernel(k) => ips.iter().map(|&ip| k.frame(ip)).collect(),
        };
        Some((frames, truncated, PythonCut::from_record(python_dropped)))
    }

    /// Symbolizes the stacks not seen yet while the target is alive to be read: Python code
    /// objects (names, lines) die with the process. Native frames can wait for the table, so
    /// a target without Python costs nothing here.
    pub fn learn_new_stacks(&mut self) {
        if self.python_runtime().is_none() {
            return;
        }
        let ids: Vec<u64> = self.stacks.keys().flatten().collect();
        for id in ids.into_iter().map(|id| id as i64) {
            self.learn(id);
        }
    }

    /// The outstanding blocks at least `older_ms` old (as the tables count them) that
    /// `asked(stack_id, size)` wants, for the owner walk.
    pub fn blocks_of(&self, asked: impl Fn(i64, u64) -> bool, older_ms: u64) -> Vec<Block> {
        let now = monotonic_ns();
        [&self.allocs, &self.mmaps]
            .iter()
            .flat_map(|map| map.entries())
            .filter(|(_, info)| asked(info.stack_id, info.size))
            .filter(|(_, info)| now.saturating_sub(info.timestamp_ns) / 1_000_000 >= older_ms)
            .map(|(addr, info)| Block {
                addr,
                size: info.size,
                stack_id: info.stack_id,
            })
            .collect()
    }

    /// The target's CPython, once found.
    pub fn python(&self) -> Option<&PythonRuntime> {
        match &self.names {
            Names::User(_, python) => python.runtime(),
            Names::Kernel(_) => None,
        }
    }

    /// Running totals of the per-CPU counters, indexed by `Counter`.
    fn counters(&self) -> Result<Vec<u64>> {
        (0..memleak_common::COUNTER_COUNT)
            .map(|i| Ok(self.counters.get(&i, 0)?.iter().sum()))
            .collect()
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
