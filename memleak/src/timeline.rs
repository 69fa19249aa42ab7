//! A capture run as recorded: the tracer's snapshots (stack ids and bytes) and the kernel's
//! view of the process at the same instants. Recording only; `analysis` digests it.

use std::collections::HashSet;

use crate::{
    model::Snapshot,
    owners::each::Owners,
    proc_stats::{self, ProcSample, ProcessContext},
};

/// Intervals kept. Past it, every other interval of the older half is dropped, so a run of
/// days keeps its whole span, at a resolution that halves with age, in bounded memory.
pub const MAX_POINTS: usize = 512;

/// Everything recorded during one run.
pub struct Timeline {
    pub context: ProcessContext,
    /// The interval between snapshots, in seconds: no rate is claimed over less.
    pub interval_s: f64,
    /// One per interval, oldest first.
    pub snapshots: Vec<Snapshot>,
    /// The state taken when the run stopped between intervals (Ctrl-C, the target exited).
    pub final_state: Option<Snapshot>,
    /// `/proc` at each snapshot, then at the final state; `None`: unreadable (process gone).
    pub(crate) samples: Vec<Option<ProcSample>>,
    /// Intervals recorded, including those thinned away.
    intervals: u64,
    /// What holds each process's first stacks' memory, read from the processes at the end
    /// of the run.
    pub owners: Option<Owners>,
    /// The processes traced, in the order they were attached (empty in kernel mode).
    pub processes: Vec<TracedProcess>,
}

/// A process of the run, as the reports list it.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TracedProcess {
    pub pid: u32,
    /// How it ended while the others were still traced (its memory was dropped then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exited: Option<String>,
    /// Found while tracing: traced from this long after its start (what it did before is
    /// not seen).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traced_after_ms: Option<u64>,
}

impl Timeline {
    pub fn new(context: ProcessContext, interval_s: f64) -> Self {
        Timeline {
            context,
            interval_s,
            snapshots: Vec::new(),
            final_state: None,
            samples: Vec::new(),
            intervals: 0,
            owners: None,
            processes: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.context.pid
    }

    /// Samples `/proc` now and appends the interval's snapshot just taken: the collector's
    /// one call per interval. True when older intervals were thinned away.
    pub fn record(&mut self, snapshot: Snapshot) -> bool {
        let sample = self.sample_now();
        self.push(snapshot, sample)
    }

    /// Like `record`, for the state taken when the run stops between intervals.
    pub fn record_final(&mut self, snapshot: Snapshot) {
        let sample = self.sample_now();
        self.samples.push(sample);
        self.final_state = Some(snapshot);
    }

    fn sample_now(&mut self) -> Option<ProcSample> {
        self.context.refresh();
        proc_stats::sample(self.pid(), self.context.cgroup.as_ref()).ok()
    }

    /// Appends one interval with the `/proc` sample taken at the same instant; true when
    /// older intervals were thinned away.
    pub fn push(&mut self, snapshot: Snapshot, sample: Option<ProcSample>) -> bool {
        assert!(
            self.final_state.is_none(),
            "no interval after the final state"
        );
        self.snapshots.push(snapshot);
        self.samples.push(sample);
        self.intervals += 1;
        let thin = self.snapshots.len() > MAX_POINTS;
        if thin {
            self.thin();
        }
        thin
    }

    /// Intervals recorded since the start (more than `snapshots` holds once thinned).
    pub fn intervals(&self) -> u64 {
        self.intervals
    }

    /// Drops every other interval of the older half (the first one stays: the run's start).
    fn thin(&mut self) {
        let older = self.snapshots.len() / 2;
        let keep = |i: usize| i >= older || i.is_multiple_of(2);
        retain_indices(&mut self.snapshots, keep);
        retain_indices(&mut self.samples, keep);
    }

    /// The stacks some kept state holds: what the stack table must keep.
    pub fn stack_ids(&self) -> HashSet<i64> {
        self.series()
            .flat_map(|(s, _)| s.stacks.iter().chain(s.mapped.iter().flatten()))
            .map(|u| u.stack_id)
            .collect()
    }

    /// Every state in time order: the intervals, then the final state if any.
    pub fn series(&self) -> impl Iterator<Item = (&Snapshot, Option<&ProcSample>)> {
        self.snapshots
            .iter()
            .chain(&self.final_state)
            .zip(self.samples.iter().map(Option::as_ref))
    }

    /// The state at the end: the final state, else the last interval.
    pub fn last(&self) -> Option<&Snapshot> {
        self.final_state.as_ref().or(self.snapshots.last())
    }
}

fn retain_indices<T>(v: &mut Vec<T>, keep: impl Fn(usize) -> bool) {
    let mut i = 0;
    v.retain(|_| {
        i += 1;
        keep(i - 1)
    });
}
