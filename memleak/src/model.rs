//! The data model that collecting produces and every report format consumes. Nothing here
//! knows about BPF maps or about output formats.

use serde::Serialize;

/// One frame of a symbolized stack, innermost first. An inlined function is its own frame
/// (`inlined: true`) placed before the frame of the function it was inlined into.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Frame {
    /// The address in the target's address space (for a return address: as recorded).
    pub addr: u64,
    /// Basename of the object file (`libc.so.6`, `leaker`); `None`: no mapping covers `addr`.
    pub module: Option<String>,
    /// `addr` relative to the object file's load bias (the ELF virtual address).
    pub module_offset: u64,
    /// Demangled function name; `None`: the address could not be named.
    pub function: Option<String>,
    /// `addr` minus the function's start.
    pub function_offset: u64,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: bool,
    pub kind: FrameKind,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    #[default]
    Native,
    Python,
}

/// Outstanding memory attributed to one stack at one instant. The stack itself (frames, class,
/// explaining frame) is in the run's stack table, under `stack_id`.
#[derive(Clone, Debug, Serialize)]
pub struct StackUsage {
    /// The stack's id in the tracer (stable for the whole run); negative: the walk failed.
    pub stack_id: i64,
    pub bytes: u64,
    pub count: u64,
    /// Outstanding allocations of this stack, filled with `--show-allocs` only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub allocations: Vec<Allocation>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Allocation {
    pub addr: u64,
    pub size: u64,
    /// Age at the snapshot, in milliseconds.
    pub age_ms: u64,
}

/// What the tracer lost up to this snapshot. Every field is a running total.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Lost {
    pub allocs_map_full: u64,
    pub stack_walks_failed: u64,
    pub inflight_map_full: u64,
    pub combined_map_full: u64,
    pub trace_events_lost: u64,
    pub stale_inflight: u64,
    pub munmap_splits_lost: u64,
    /// New Python code objects not handed over at once: their frames may lack names.
    pub python_codes_dropped: u64,
    /// Definitions the process may call that memleak did not hook (binding.rs): what they
    /// hand out is missing from every table.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unhooked: Vec<String>,
}

impl Lost {
    pub fn is_empty(&self) -> bool {
        *self == Lost::default()
    }
}

/// What the tracer recorded and lost in one traced process, up to a snapshot (running
/// totals). Pid 0: events of no process known to the tracer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcessCounts {
    pub pid: u32,
    pub lost: Lost,
    pub recorded: u64,
    pub released: u64,
}

/// What a snapshot's `stacks` measure.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Measure {
    /// Blocks the allocator handed out and did not get back (the allocation mode).
    Allocations,
    /// Pages the process wrote to first and has not unmapped since (`--mode growth`): where
    /// resident memory grew. Each counts one page.
    ResidentPages,
}

impl Measure {
    /// What one counted item is, for tables ("N bytes in M allocations").
    pub fn unit(self) -> &'static str {
        match self {
            Measure::Allocations => "allocations",
            Measure::ResidentPages => "pages",
        }
    }

    /// What the stacks' bytes are, in a sentence ("12 MiB outstanding").
    pub fn held(self) -> &'static str {
        match self {
            Measure::Allocations => "outstanding",
            Measure::ResidentPages => "resident",
        }
    }

    /// The heading of a table of the top `top` stacks.
    pub fn title(self, top: usize) -> String {
        match self {
            Measure::Allocations => format!("Top {top} stacks with outstanding allocations:"),
            Measure::ResidentPages => format!(
                "Top {top} stacks that grew resident memory (pages written first, not unmapped since):"
            ),
        }
    }
}

/// The state of the target at one instant: what is outstanding, per stack.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub measure: Measure,
    /// Seconds since the Unix epoch.
    pub unix_time: f64,
    /// Seconds since tracing started.
    pub elapsed_s: f64,
    /// Sorted by the user's `--sort` key, largest first; all stacks, not only the top N.
    pub stacks: Vec<StackUsage>,
    pub total_bytes: u64,
    pub total_count: u64,
    /// `--mode growth`: anonymous address space mapped by mmap, mremap and brk and still
    /// mapped, per stack of the system call (largest first; `count` is mappings).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mapped: Option<Vec<StackUsage>>,
    pub lost: Lost,
    /// Allocations recorded and releases matched since the start (running totals).
    pub recorded: u64,
    pub released: u64,
    /// The same per traced process, in pid order (user mode; those that exited included);
    /// `lost`, `recorded` and `released` are their sums.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub processes: Vec<ProcessCounts>,
}

/// Who holds a stack's memory, for a target that runs Python.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// A Python frame in the user's code (outside the standard library) made the call.
    Application,
    /// Only the interpreter and its standard library are on the stack.
    CpythonInternal,
    /// Native code outside the interpreter, called from Python, made the call.
    CExtension,
    /// No Python frame at all: a native library on a thread of its own, or before Python.
    NativeLibrary,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Application => "application",
            Class::CpythonInternal => "cpython-internal",
            Class::CExtension => "c-extension",
            Class::NativeLibrary => "native-library",
        }
    }
}
