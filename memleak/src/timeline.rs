//! A capture run as recorded: the tracer's snapshots (stack ids and bytes) and the kernel's
//! view of the process at the same instants. Recording only; `analysis` digests it.

use crate::{
    model::Snapshot,
    proc_stats::{self, ProcSample, ProcessContext},
};

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
}

impl Timeline {
    pub fn new(context: ProcessContext, interval_s: f64) -> Self {
        Timeline {
            context,
            interval_s,
            snapshots: Vec::new(),
            final_state: None,
            samples: Vec::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.context.pid
    }

    /// Samples `/proc` now and appends the interval's snapshot just taken: the collector's
    /// one call per interval.
    pub fn record(&mut self, snapshot: Snapshot) {
        let sample = self.sample_now();
        self.push(snapshot, sample);
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

    /// Appends one interval with the `/proc` sample taken at the same instant.
    pub fn push(&mut self, snapshot: Snapshot, sample: Option<ProcSample>) {
        assert!(
            self.final_state.is_none(),
            "no interval after the final state"
        );
        self.snapshots.push(snapshot);
        self.samples.push(sample);
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
