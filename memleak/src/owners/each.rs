//! The owner walk over every traced process: each one's leading stacks, read in its own
//! memory with its own interpreter and maps, one process after the other so memleak keeps
//! one process's cache at a time; a total bound on time and processes, and what it left out
//! said in the report.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::{Block, Blocks, Findings, native, pools, python as walk};
use crate::python::{Memory, PythonRuntime};

/// One traced process that is still running, as the tracer hands it to the walk.
pub struct Traced<'a> {
    pub pid: u32,
    /// Its CPython, once found.
    pub python: Option<&'a PythonRuntime>,
    /// Its leading stacks (the report's first of this process).
    pub stacks: HashSet<i64>,
    /// What those stacks hold: the processes holding most are walked first.
    pub bytes: u64,
}

/// What the tracer knows of the blocks: its maps and its stack table.
pub trait Tracked {
    /// Process `pid`'s blocks for which `asked(stack_id, size)` holds, at least `older_ms`
    /// old.
    fn blocks(&self, pid: u32, asked: &dyn Fn(i64, u64) -> bool, older_ms: u64) -> Vec<Block>;
    /// A stack in words, for "referenced from blocks allocated at ...".
    fn describe(&self, stack_id: i64) -> String;
}

/// The bound on all the walks together.
pub struct Budget {
    pub processes: usize,
    pub time: Duration,
}

impl Default for Budget {
    fn default() -> Budget {
        Budget {
            processes: 16,
            time: Duration::from_secs(60),
        }
    }
}

/// The owners of one process's leading stacks.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessFindings {
    pub pid: u32,
    #[serde(flatten)]
    pub found: Findings,
}

/// The owner walk of every process: one entry per process walked, and the processes left
/// out with why.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Owners {
    pub processes: Vec<ProcessFindings>,
    pub skipped: Vec<String>,
}

impl Owners {
    /// The owners of one stack, largest first (a stack id is of one process).
    pub fn of(&self, stack_id: i64) -> impl Iterator<Item = &super::Owner> {
        self.processes
            .iter()
            .flat_map(move |p| p.found.of(stack_id))
    }

    /// What `stack_id` has in its process's pymalloc arenas once they are split by pool,
    /// when that stack maps arenas or keeps objects in them.
    pub fn pool_share(&self, stack_id: i64) -> Option<&pools::PoolShare> {
        let mut pools = self.processes.iter().filter_map(|p| p.found.pools.as_ref());
        pools.find_map(|p| p.stacks.iter().find(|s| s.stack_id == stack_id))
    }

    /// Some process's arenas were split by pool.
    pub fn has_pools(&self) -> bool {
        self.processes.iter().any(|p| p.found.pools.is_some())
    }

    /// What `stack_id` holds with its process's arenas split by pool.
    pub fn attributed(&self, stack_id: i64, final_bytes: u64) -> u64 {
        self.pool_share(stack_id)
            .map_or(final_bytes, |s| s.attributed(final_bytes))
    }

    /// The findings when one process was walked and none left out: `owners` in memleak/1.
    pub fn single(&self) -> Option<&Findings> {
        match (&self.processes[..], self.skipped.is_empty()) {
            ([one], true) => Some(&one.found),
            _ => None,
        }
    }
}

/// Walks `processes`, those holding most first, within `budget`.
pub fn find(
    mut processes: Vec<Traced>,
    tracked: &dyn Tracked,
    older_ms: u64,
    budget: &Budget,
) -> Owners {
    processes.sort_by_key(|p| std::cmp::Reverse(p.bytes));
    let deadline = Instant::now() + budget.time;
    let mut owners = Owners::default();
    for (i, p) in processes.iter().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        let why = if i >= budget.processes {
            format!("more than {} processes to walk", budget.processes)
        } else if left < Duration::from_secs(1) {
            format!(
                "the walks' time bound ({} s) was spent",
                budget.time.as_secs()
            )
        } else {
            match find_one(p, tracked, older_ms, deadline) {
                Some(found) => {
                    owners.processes.push(ProcessFindings { pid: p.pid, found });
                    continue;
                }
                None => "its maps could not be read (it exited)".to_string(),
            }
        };
        owners
            .skipped
            .push(format!("pid {}: not walked: {why}", p.pid));
    }
    owners
}

/// The Python walk's figures for a process that runs no CPython memleak found: nothing
/// cut short, and said so rather than left as zeros.
fn no_python() -> Findings {
    let scan = super::Scan {
        complete: true,
        skipped: vec!["no CPython found in this process: no Python objects walked".into()],
        ..super::Scan::default()
    };
    Findings {
        scan,
        ..Findings::default()
    }
}

/// The owners of one process's leading stacks: Python objects and their holders when it
/// runs CPython, then who refers to the blocks no Python owner accounts for (native
/// blocks). `None` when its maps cannot be read.
fn find_one(
    p: &Traced,
    tracked: &dyn Tracked,
    older_ms: u64,
    deadline: Instant,
) -> Option<Findings> {
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut found = match p.python {
        Some(python) => {
            // Every pymalloc arena too: whichever stack mapped one, what is in it may be
            // another's.
            let arena = pools::arena_size(python.version.minor);
            let asked = |stack_id, size| p.stacks.contains(&stack_id) || size == arena;
            let blocks = Blocks::new(tracked.blocks(p.pid, &asked, older_ms));
            let limits = walk::Limits::default();
            let time = limits.time.min(left());
            walk::find(python, &blocks, &walk::Limits { time, ..limits })
        }
        None => no_python(),
    };
    let maps = crate::procmaps::read(p.pid).ok()?;
    let all = Blocks::new(tracked.blocks(p.pid, &|_, _| true, 0));
    let native_asked = |id: i64| p.stacks.contains(&id) && found.of(id).next().is_none();
    let describe = |id: i64| tracked.describe(id);
    let limits = native::Limits::default();
    let time = limits.time.min(left());
    let limits = native::Limits { time, ..limits };
    let memory = Memory::Process(p.pid);
    let (native, scan) = native::find(&memory, &maps, &all, &native_asked, &describe, &limits);
    found.owners.extend(native);
    found.owners.sort_by_key(|o| std::cmp::Reverse(o.bytes));
    found.native = Some(scan);
    Some(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No blocks: what is looked at here is which processes are walked.
    struct NoBlocks;

    impl Tracked for NoBlocks {
        fn blocks(&self, _: u32, _: &dyn Fn(i64, u64) -> bool, _: u64) -> Vec<Block> {
            Vec::new()
        }

        fn describe(&self, stack_id: i64) -> String {
            format!("stack {stack_id}")
        }
    }

    fn traced(pid: u32, bytes: u64) -> Traced<'static> {
        Traced {
            pid,
            python: None,
            stacks: HashSet::from([1]),
            bytes,
        }
    }

    #[test]
    fn processes_holding_most_go_first_and_bounds_are_said() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let me = std::process::id();
        let processes = vec![traced(me, 10), traced(gone, 20), traced(me, 5)];
        let budget = Budget {
            processes: 2,
            ..Budget::default()
        };
        let owners = find(processes, &NoBlocks, 0, &budget);
        assert_eq!(owners.processes.len(), 1);
        assert_eq!(owners.processes[0].pid, me);
        let found = &owners.processes[0].found;
        let native = found.native.as_ref().unwrap();
        assert!(native.regions > 0 && native.complete, "{native:?}");
        assert!(found.scan.complete && found.scan.skipped[0].starts_with("no CPython found"));
        assert_eq!(
            owners.skipped,
            [
                format!("pid {gone}: not walked: its maps could not be read (it exited)"),
                format!("pid {me}: not walked: more than 2 processes to walk"),
            ]
        );
        assert!(owners.single().is_none());
    }

    #[test]
    fn a_spent_time_bound_is_said() {
        let me = std::process::id();
        let budget = Budget {
            processes: 16,
            time: Duration::ZERO,
        };
        let owners = find(vec![traced(me, 1)], &NoBlocks, 0, &budget);
        assert!(owners.processes.is_empty());
        assert_eq!(
            owners.skipped,
            [format!(
                "pid {me}: not walked: the walks' time bound (0 s) was spent"
            )]
        );
    }
}
