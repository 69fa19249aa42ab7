//! A run digested: per-interval points, each stack's class and rate, and the verdict. Pure
//! functions of the timeline and the stack table, computed once per report and handed to
//! every renderer.

mod apart;
pub mod classes;
pub mod fit;
#[cfg(test)]
pub mod tests;
pub mod verdict;

use std::collections::HashMap;

use serde::Serialize;

pub use self::{
    classes::{MIN_POINTS, Trend},
    fit::Fit,
    verdict::Verdict,
};
use crate::{
    model::{Class, Snapshot},
    proc_stats::ProcSample,
    stacks::{StackInfo, StackTable},
    timeline::Timeline,
};

/// The run, digested: per-interval points, per-stack trends (growing first, fastest first;
/// then the largest), the verdict, bytes per class.
#[derive(Serialize)]
pub struct Analysis<'a> {
    #[serde(skip)]
    pub timeline: &'a Timeline,
    #[serde(skip)]
    pub table: &'a StackTable,
    pub points: Vec<Point>,
    pub stacks: Vec<StackTrend<'a>>,
    pub verdict: Verdict,
    /// Final outstanding bytes per class, largest first; empty when no class is set.
    pub classes: Vec<ClassBytes>,
    /// Each traced process's verdict (user mode), in the order they were attached.
    pub processes: Vec<verdict::ProcessVerdict>,
}

/// One stack over the whole run.
#[derive(Debug, Serialize)]
pub struct StackTrend<'a> {
    pub stack_id: i64,
    /// Outstanding at each interval (0 where the snapshot did not have the stack).
    pub bytes: Vec<u64>,
    pub counts: Vec<u64>,
    pub peak_bytes: u64,
    pub trend: Trend,
    /// `None`: not enough data for a rate.
    pub fit: Option<Fit>,
    /// What the stack keeps: its final bytes; for churn, the least it held since it first
    /// appeared (what never came back).
    pub kept_bytes: u64,
    /// What it holds once pymalloc's arenas are split by what is in them (the owner walk's
    /// `pools`); `None` when they were not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attributed_bytes: Option<u64>,
    /// Named in the verdict: it grows, or what it keeps matters.
    pub named: bool,
    /// Another named stack has the same deciding frame: the index in `frames` of the first
    /// frame where this one differs from them.
    pub differs_at: Option<usize>,
    /// Frames, class, deciding frame and its source line, from the stack table.
    #[serde(flatten)]
    pub info: &'a StackInfo,
}

impl StackTrend<'_> {
    pub fn final_bytes(&self) -> u64 {
        self.bytes.last().copied().unwrap_or(0)
    }

    pub fn final_count(&self) -> u64 {
        self.counts.last().copied().unwrap_or(0)
    }

    /// The fitted rate; 0 without enough data.
    pub fn rate(&self) -> f64 {
        self.fit.map_or(0.0, |f| f.slope_per_min)
    }
}

/// One interval of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub elapsed_s: f64,
    pub unix_time: f64,
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    /// Outstanding growth since the previous interval, per minute; `None` for the first
    /// and over less than one interval.
    pub rate_bytes_per_min: Option<f64>,
    pub process: Option<ProcSample>,
}

#[derive(Debug, PartialEq, Serialize)]
pub struct ClassBytes {
    pub class: Class,
    pub bytes: u64,
}

/// No rate is claimed over less than this many intervals: one, less a tenth for the
/// timer's jitter.
pub const MIN_RATE_SPAN_INTERVALS: f64 = 0.9;

/// The one analysis of a run; every report renders the same one.
pub fn analyze<'a>(timeline: &'a Timeline, table: &'a StackTable) -> Analysis<'a> {
    let series: Vec<(&Snapshot, Option<&ProcSample>)> = timeline.series().collect();
    let min_span = timeline.interval_s * MIN_RATE_SPAN_INTERVALS;
    let points = points(&series, min_span);
    let mut stacks = stack_trends(&series, table, min_span);
    if let Some(owners) = timeline.owners.as_ref().filter(|o| o.has_pools()) {
        for s in &mut stacks {
            s.attributed_bytes = Some(owners.attributed(s.stack_id, s.final_bytes()));
        }
    }
    verdict::name_stacks(&mut stacks, &points);
    apart::tell_apart(&mut stacks);
    sort(&mut stacks);
    let verdict = verdict::verdict(&timeline.context, &points, &stacks, min_span);
    let classes = classes(&stacks);
    let counts = timeline.last().map_or(&[][..], |s| &s.processes);
    let processes = verdict::per_process(&timeline.processes, &stacks, counts);
    Analysis {
        timeline,
        table,
        points,
        stacks,
        verdict,
        classes,
        processes,
    }
}

impl<'a> Analysis<'a> {
    /// The stacks the verdict names, in report order.
    pub fn named(&self) -> impl Iterator<Item = &StackTrend<'a>> {
        self.stacks.iter().filter(|s| s.named)
    }

    pub fn count(&self, trend: Trend) -> usize {
        self.stacks.iter().filter(|s| s.trend == trend).count()
    }

    /// Several processes traced: the reports group by process.
    pub fn several(&self) -> bool {
        self.processes.len() > 1
    }

    /// The shortest span a rate is given over.
    pub fn min_rate_span_s(&self) -> f64 {
        self.timeline.interval_s * MIN_RATE_SPAN_INTERVALS
    }
}

/// Each stack's series over the run, classed.
fn stack_trends<'a>(
    series: &[(&Snapshot, Option<&ProcSample>)],
    table: &'a StackTable,
    min_span_s: f64,
) -> Vec<StackTrend<'a>> {
    let n = series.len();
    let mut index: HashMap<i64, usize> = HashMap::new();
    let mut stacks: Vec<StackTrend<'a>> = Vec::new();
    for (i, (snap, _)) in series.iter().enumerate() {
        for s in &snap.stacks {
            let k = *index.entry(s.stack_id).or_insert_with(|| {
                stacks.push(StackTrend {
                    stack_id: s.stack_id,
                    bytes: vec![0; n],
                    counts: vec![0; n],
                    peak_bytes: 0,
                    trend: Trend::Unknown,
                    fit: None,
                    kept_bytes: 0,
                    attributed_bytes: None,
                    named: false,
                    differs_at: None,
                    info: table.get(s.stack_id),
                });
                stacks.len() - 1
            });
            stacks[k].bytes[i] = s.bytes;
            stacks[k].counts[i] = s.count;
        }
    }
    let x: Vec<f64> = series.iter().map(|(s, _)| s.elapsed_s).collect();
    for s in &mut stacks {
        let y: Vec<f64> = s.bytes.iter().map(|&b| b as f64).collect();
        let counts: Vec<f64> = s.counts.iter().map(|&c| c as f64).collect();
        (s.trend, s.fit) = Trend::of(&x, &y, &counts, min_span_s);
        s.peak_bytes = s.bytes.iter().copied().max().unwrap_or(0);
        s.kept_bytes = kept(s);
    }
    stacks
}

/// Final bytes; for churn the floor since the stack first appeared.
fn kept(s: &StackTrend) -> u64 {
    if s.trend != Trend::Churn {
        return s.final_bytes();
    }
    let first = s.bytes.iter().position(|&b| b > 0).unwrap_or(0);
    s.bytes[first..].iter().copied().min().unwrap_or(0)
}

/// Named first; among them growing first (fastest first); then the largest.
fn sort(stacks: &mut [StackTrend]) {
    stacks.sort_by(|a, b| {
        let growing = |s: &StackTrend| s.trend == Trend::Growing;
        b.named
            .cmp(&a.named)
            .then(growing(b).cmp(&growing(a)))
            .then(if growing(a) {
                b.rate().total_cmp(&a.rate())
            } else {
                std::cmp::Ordering::Equal
            })
            .then(b.final_bytes().cmp(&a.final_bytes()))
            .then(a.stack_id.cmp(&b.stack_id))
    });
}

fn points(series: &[(&Snapshot, Option<&ProcSample>)], min_span_s: f64) -> Vec<Point> {
    series
        .iter()
        .enumerate()
        .map(|(i, (s, p))| Point {
            elapsed_s: s.elapsed_s,
            unix_time: s.unix_time,
            outstanding_bytes: s.total_bytes,
            outstanding_count: s.total_count,
            rate_bytes_per_min: i.checked_sub(1).and_then(|j| {
                let prev = series[j].0;
                let (x, y) = (
                    [prev.elapsed_s, s.elapsed_s],
                    [prev.total_bytes as f64, s.total_bytes as f64],
                );
                Fit::of(&x, &y, min_span_s).map(|f| f.slope_per_min)
            }),
            process: p.cloned(),
        })
        .collect()
}

fn classes(stacks: &[StackTrend]) -> Vec<ClassBytes> {
    let mut per_class: HashMap<Class, u64> = HashMap::new();
    for s in stacks {
        if let Some(c) = s.info.class {
            *per_class.entry(c).or_default() += s.final_bytes();
        }
    }
    let mut classes: Vec<ClassBytes> = per_class
        .into_iter()
        .map(|(class, bytes)| ClassBytes { class, bytes })
        .collect();
    classes.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.class.cmp(&b.class)));
    classes
}
