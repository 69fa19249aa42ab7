//! A capture run as a timeline: the tracer's snapshots and the kernel's view of the process at
//! the same instants, and what they add up to: which stacks grow, how fast, how sure we are,
//! and when the process runs out of memory at that pace. Every report format reads this.

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::{
    model::{Class, Frame, FrameKind, Snapshot},
    proc_stats::{self, ProcSample, ProcessContext},
    procmaps,
};

/// Fewer intervals than this and no trend is claimed.
pub const MIN_POINTS: usize = 3;
/// A stack grows only if its fitted line rises over the run by at least this many of its
/// own average blocks: one or two blocks in flight at a snapshot's instant are not growth ...
pub const MIN_GROWTH_BLOCKS: f64 = 4.0;
/// ... and by at least this many bytes (a page), whatever the block size.
pub const MIN_GROWTH_BYTES: f64 = 4096.0;
/// A stack grows only if a straight line explains at least this share of its variation.
/// A steady leak scores near 1 (0.999 for the 120 MiB/min fixture); noise around a flat
/// level near 0.
pub const MIN_GROWTH_R2: f64 = 0.6;
/// A stack still grows only if the last half of the run rises at least at this fraction of
/// the whole run's rate; below it, the growth has stopped (a cache that filled).
pub const MIN_RECENT_RATE_SHARE: f64 = 0.3;
/// A stack that does not grow holds a plateau if, over the last half of the run, it stays
/// near its peak (mean ≥ this share of the peak) ...
pub const PLATEAU_MIN_LEVEL: f64 = 0.5;
/// ... and moves within this share of its peak; otherwise its memory comes and goes (churn).
pub const PLATEAU_MAX_SPREAD: f64 = 0.25;
/// Stacks whose deciding source line is read while the process is still there.
const SOURCE_LINES_KEPT: usize = 20;
/// Intervals kept. Past it, every other interval of the older half is dropped, so a run of
/// days keeps its whole span, at a resolution that halves with age, in bounded memory.
pub const MAX_POINTS: usize = 512;

/// Everything recorded during one run.
pub struct Timeline {
    pub context: ProcessContext,
    /// One per interval, oldest first. All but the last are kept without their stacks'
    /// frames (a long run would hold every stack's frames once per interval): the frames
    /// are in `frames`.
    pub snapshots: Vec<Snapshot>,
    /// The state taken when the run stopped between intervals (Ctrl-C, the target exited).
    pub final_state: Option<Snapshot>,
    /// `/proc` at each snapshot, then at the final state; `None`: unreadable (process gone).
    samples: Vec<Option<ProcSample>>,
    /// Intervals recorded, including those thinned away.
    intervals: u64,
    /// Each stack's frames, as last seen.
    frames: HashMap<i64, Vec<Frame>>,
    classes: HashMap<i64, Class>,
    /// (file, line) → the line's text, read through the target's root while it runs.
    sources: HashMap<(String, u32), Option<String>>,
}

impl Timeline {
    pub fn new(context: ProcessContext) -> Self {
        Timeline {
            context,
            snapshots: Vec::new(),
            final_state: None,
            samples: Vec::new(),
            intervals: 0,
            frames: HashMap::new(),
            classes: HashMap::new(),
            sources: HashMap::new(),
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
        self.keep_frames(&snapshot);
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
        self.keep_frames(&snapshot);
        self.snapshots.push(snapshot);
        self.samples.push(sample);
        self.intervals += 1;
        if self.snapshots.len() > MAX_POINTS {
            self.thin();
        }
    }

    /// Intervals recorded since the start (more than `snapshots` holds once thinned).
    pub fn intervals(&self) -> u64 {
        self.intervals
    }

    /// Drops every other interval of the older half (the first one stays: the run's start),
    /// and the frames of stacks no kept interval holds.
    fn thin(&mut self) {
        let older = self.snapshots.len() / 2;
        let keep = |i: usize| i >= older || i.is_multiple_of(2);
        retain_indices(&mut self.snapshots, keep);
        retain_indices(&mut self.samples, keep);
        let held: HashSet<i64> = self
            .snapshots
            .iter()
            .flat_map(|s| s.stacks.iter().map(|u| u.stack_id))
            .collect();
        self.frames.retain(|id, _| held.contains(id));
        self.classes.retain(|id, _| held.contains(id));
    }

    /// Notes the new state's frames in the table (dropping them from the state before it),
    /// and reads the deciding source lines of its largest stacks now, while the target's
    /// files are still reachable through `/proc/PID/root`.
    fn keep_frames(&mut self, snapshot: &Snapshot) {
        if let Some(previous) = self.snapshots.last_mut() {
            for s in &mut previous.stacks {
                s.frames = Vec::new();
            }
        }
        for s in &snapshot.stacks {
            if self.frames.get(&s.stack_id) != Some(&s.frames) {
                self.frames.insert(s.stack_id, s.frames.clone());
            }
            if let Some(class) = s.class {
                self.classes.insert(s.stack_id, class);
            }
        }
        let pid = self.pid();
        for stack in snapshot.stacks.iter().take(SOURCE_LINES_KEPT) {
            let Some(frame) = deciding_frame(&stack.frames).map(|i| &stack.frames[i]) else {
                continue;
            };
            let (Some(file), Some(line)) = (&frame.file, frame.line) else {
                continue;
            };
            self.sources
                .entry((file.clone(), line))
                .or_insert_with(|| read_source_line(pid, file, line));
        }
    }

    /// Every state in time order: the intervals, then the final state if any.
    pub fn series(&self) -> impl Iterator<Item = (&Snapshot, Option<&ProcSample>)> {
        self.snapshots
            .iter()
            .chain(&self.final_state)
            .zip(self.samples.iter().map(Option::as_ref))
    }

    /// A stack's frames as last seen, innermost first.
    pub fn frames(&self, stack_id: i64) -> &[Frame] {
        self.frames.get(&stack_id).map_or(&[], Vec::as_slice)
    }

    /// The state at the end: the final state, else the last interval.
    pub fn last(&self) -> Option<&Snapshot> {
        self.final_state.as_ref().or(self.snapshots.last())
    }

    /// The text of `file:line` as read during the run; `None`: unreadable or never read.
    pub fn source_line(&self, file: &str, line: u32) -> Option<&str> {
        self.sources
            .get(&(file.to_string(), line))
            .and_then(|l| l.as_deref())
    }

    pub fn analyze(&self) -> Analysis<'_> {
        Analysis::new(self)
    }
}

fn retain_indices<T>(v: &mut Vec<T>, keep: impl Fn(usize) -> bool) {
    let mut i = 0;
    v.retain(|_| {
        i += 1;
        keep(i - 1)
    });
}

/// A least-squares line through a series, per minute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Fit {
    /// Bytes (or objects) per minute.
    pub slope_per_min: f64,
    /// Share of the variation the line explains (0..1); 0 for a flat series.
    pub r2: f64,
}

impl Fit {
    /// `x` in seconds; `None` with fewer than two distinct instants.
    pub fn of(x_s: &[f64], y: &[f64]) -> Option<Fit> {
        let n = x_s.len().min(y.len()) as f64;
        if n < 2.0 {
            return None;
        }
        let x: Vec<f64> = x_s.iter().map(|s| s / 60.0).collect();
        let mx = x.iter().sum::<f64>() / n;
        let my = y.iter().sum::<f64>() / n;
        let sxx: f64 = x.iter().map(|x| (x - mx).powi(2)).sum();
        let sxy: f64 = x.iter().zip(y).map(|(x, y)| (x - mx) * (y - my)).sum();
        let syy: f64 = y.iter().map(|y| (y - my).powi(2)).sum();
        if sxx <= 0.0 {
            return None;
        }
        let slope = sxy / sxx;
        let r2 = if syy > 0.0 {
            (sxy * sxy / (sxx * syy)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        Some(Fit {
            slope_per_min: slope,
            r2,
        })
    }
}

/// How a stack's outstanding memory behaves over the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trend {
    /// Rises steadily and still rises at the end: a leak.
    Growing,
    /// Holds a stable amount at the end without rising: a cache that filled, a buffer.
    Plateau,
    /// Comes and goes: allocated and freed, no lasting hold.
    Churn,
    /// Too few intervals to tell.
    Unknown,
}

impl Trend {
    pub fn name(self) -> &'static str {
        match self {
            Trend::Growing => "growing",
            Trend::Plateau => "plateau",
            Trend::Churn => "churn",
            Trend::Unknown => "unknown",
        }
    }

    /// Classifies a series of outstanding `bytes` in `counts` blocks sampled at `x_s`
    /// seconds; see the thresholds at the top.
    pub fn of(x_s: &[f64], bytes: &[f64], counts: &[f64]) -> (Trend, Fit) {
        let n = bytes.len();
        let fit = Fit::of(x_s, bytes).unwrap_or_default();
        if n < MIN_POINTS {
            return (Trend::Unknown, fit);
        }
        let span_min = (x_s[n - 1] - x_s[0]) / 60.0;
        let half = n / 2;
        // The last half, at least MIN_POINTS long when the run allows it.
        let recent_from = half.min(n - MIN_POINTS);
        let recent = &bytes[recent_from..];
        let recent_fit = Fit::of(&x_s[recent_from..], recent).unwrap_or_default();
        let blocks: f64 = counts.iter().sum();
        let block_size = if blocks > 0.0 {
            bytes.iter().sum::<f64>() / blocks
        } else {
            0.0
        };
        let grows = fit.slope_per_min > 0.0
            && fit.slope_per_min * span_min >= MIN_GROWTH_BYTES.max(MIN_GROWTH_BLOCKS * block_size)
            && fit.r2 >= MIN_GROWTH_R2
            && recent_fit.slope_per_min >= MIN_RECENT_RATE_SHARE * fit.slope_per_min;
        if grows {
            return (Trend::Growing, fit);
        }
        let peak = bytes.iter().cloned().fold(0.0, f64::max);
        let mean = recent.iter().sum::<f64>() / recent.len() as f64;
        let (lo, hi) = recent
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), &b| (lo.min(b), hi.max(b)));
        let holds =
            peak > 0.0 && mean >= PLATEAU_MIN_LEVEL * peak && hi - lo <= PLATEAU_MAX_SPREAD * peak;
        (if holds { Trend::Plateau } else { Trend::Churn }, fit)
    }
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
    pub fit: Fit,
    /// Frames as last seen, innermost first.
    pub frames: &'a [Frame],
    /// Index in `frames` of the line that decides: the innermost application frame with a
    /// file and line.
    pub deciding_frame: Option<usize>,
    /// That line's text, read from the target's own file; `None`: not readable.
    pub deciding_source: Option<&'a str>,
    pub class: Option<&'a Class>,
}

impl StackTrend<'_> {
    pub fn final_bytes(&self) -> u64 {
        self.bytes.last().copied().unwrap_or(0)
    }

    pub fn final_count(&self) -> u64 {
        self.counts.last().copied().unwrap_or(0)
    }

    pub fn deciding(&self) -> Option<&Frame> {
        self.deciding_frame.map(|i| &self.frames[i])
    }
}

/// One interval of the run.
#[derive(Clone, Debug, Serialize)]
pub struct Point {
    pub elapsed_s: f64,
    pub unix_time: f64,
    pub outstanding_bytes: u64,
    pub outstanding_count: u64,
    /// Outstanding growth since the previous interval, per minute.
    pub rate_bytes_per_min: Option<f64>,
    pub process: Option<ProcSample>,
}

/// What the process will run into first, and when at the measured pace.
#[derive(Clone, Debug, Serialize)]
pub struct Projection {
    /// "cgroup /path memory limit" or "MemAvailable".
    pub limit: String,
    pub headroom_bytes: u64,
    /// At the leak rate (the growing stacks' sum); `None`: nothing grows.
    pub seconds: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// At least one stack grows.
    pub leaking: bool,
    /// Enough intervals to judge (MIN_POINTS).
    pub conclusive: bool,
    /// Sum of the growing stacks' rates.
    pub leak_rate_bytes_per_min: f64,
    pub growing_stacks: usize,
    /// Least-squares rate of everything outstanding.
    pub total: Fit,
    /// Least-squares rate of the resident set (from /proc).
    pub rss: Option<Fit>,
    pub projection: Option<Projection>,
}

/// The run, digested: per-interval points, per-stack trends (growing first, fastest first;
/// then the largest), the verdict, bytes per class.
#[derive(Debug, Serialize)]
pub struct Analysis<'a> {
    pub points: Vec<Point>,
    pub stacks: Vec<StackTrend<'a>>,
    pub verdict: Verdict,
    /// Final outstanding bytes per class, largest first; empty when no class is set.
    pub classes: Vec<ClassBytes<'a>>,
}

#[derive(Debug, PartialEq, Serialize)]
pub struct ClassBytes<'a> {
    pub class: &'a Class,
    pub bytes: u64,
}

impl<'a> Analysis<'a> {
    fn new(t: &'a Timeline) -> Self {
        let series: Vec<(&Snapshot, Option<&ProcSample>)> = t.series().collect();
        let n = series.len();
        let x: Vec<f64> = series.iter().map(|(s, _)| s.elapsed_s).collect();

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
                        fit: Fit::default(),
                        frames: t.frames(s.stack_id),
                        deciding_frame: None,
                        deciding_source: None,
                        class: t.classes.get(&s.stack_id),
                    });
                    stacks.len() - 1
                });
                stacks[k].bytes[i] = s.bytes;
                stacks[k].counts[i] = s.count;
            }
        }
        for s in &mut stacks {
            let y: Vec<f64> = s.bytes.iter().map(|&b| b as f64).collect();
            let counts: Vec<f64> = s.counts.iter().map(|&c| c as f64).collect();
            (s.trend, s.fit) = Trend::of(&x, &y, &counts);
            s.peak_bytes = s.bytes.iter().copied().max().unwrap_or(0);
            s.deciding_frame = deciding_frame(s.frames);
            s.deciding_source = s
                .deciding()
                .and_then(|f| t.source_line(f.file.as_deref()?, f.line?));
        }
        stacks.sort_by(|a, b| {
            let growing = |s: &StackTrend| s.trend == Trend::Growing;
            growing(b)
                .cmp(&growing(a))
                .then(if growing(a) {
                    b.fit.slope_per_min.total_cmp(&a.fit.slope_per_min)
                } else {
                    std::cmp::Ordering::Equal
                })
                .then(b.final_bytes().cmp(&a.final_bytes()))
                .then(a.stack_id.cmp(&b.stack_id))
        });

        let points: Vec<Point> = series
            .iter()
            .enumerate()
            .map(|(i, (s, p))| Point {
                elapsed_s: s.elapsed_s,
                unix_time: s.unix_time,
                outstanding_bytes: s.total_bytes,
                outstanding_count: s.total_count,
                rate_bytes_per_min: (i > 0).then(|| {
                    let prev = series[i - 1].0;
                    let dt = (s.elapsed_s - prev.elapsed_s) / 60.0;
                    (s.total_bytes as f64 - prev.total_bytes as f64) / dt
                }),
                process: p.cloned(),
            })
            .collect();

        let mut classes: HashMap<&Class, u64> = HashMap::new();
        for s in &stacks {
            if let Some(c) = s.class {
                *classes.entry(c).or_default() += s.final_bytes();
            }
        }
        let mut classes: Vec<ClassBytes> = classes
            .into_iter()
            .map(|(class, bytes)| ClassBytes { class, bytes })
            .collect();
        classes.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.class.cmp(b.class)));

        let verdict = verdict(&t.context, &points, &stacks);
        Analysis {
            points,
            stacks,
            verdict,
            classes,
        }
    }

    pub fn growing(&self) -> impl Iterator<Item = &StackTrend<'a>> {
        self.stacks.iter().filter(|s| s.trend == Trend::Growing)
    }
}

fn verdict(ctx: &ProcessContext, points: &[Point], stacks: &[StackTrend]) -> Verdict {
    let x: Vec<f64> = points.iter().map(|p| p.elapsed_s).collect();
    let total_y: Vec<f64> = points.iter().map(|p| p.outstanding_bytes as f64).collect();
    let total = Fit::of(&x, &total_y).unwrap_or_default();
    let with_rss: Vec<(f64, f64)> = points
        .iter()
        .filter_map(|p| Some((p.elapsed_s, p.process.as_ref()?.rss_bytes as f64)))
        .collect();
    let (rx, ry): (Vec<f64>, Vec<f64>) = with_rss.into_iter().unzip();
    let growing: Vec<&StackTrend> = stacks
        .iter()
        .filter(|s| s.trend == Trend::Growing)
        .collect();
    let leak_rate = growing.iter().map(|s| s.fit.slope_per_min).sum();
    let last_sample = points.iter().rev().find_map(|p| p.process.as_ref());
    Verdict {
        leaking: !growing.is_empty(),
        conclusive: points.len() >= MIN_POINTS,
        leak_rate_bytes_per_min: leak_rate,
        growing_stacks: growing.len(),
        total,
        rss: Fit::of(&rx, &ry),
        // Growing stacks only: a plateau's past filling does not go on.
        projection: last_sample.and_then(|s| projection(ctx, s, leak_rate)),
    }
}

/// The smaller of the cgroup's headroom and the machine's MemAvailable, and the time to use it
/// up at `rate` bytes per minute.
fn projection(ctx: &ProcessContext, s: &ProcSample, rate: f64) -> Option<Projection> {
    let cgroup = ctx.cgroup.as_ref().map(|cg| {
        let used = s.cgroup_usage_bytes.unwrap_or(s.rss_bytes);
        (
            format!("cgroup {} memory limit", cg.path),
            cg.limit_bytes.saturating_sub(used),
        )
    });
    let available = s
        .mem_available_bytes
        .map(|a| ("MemAvailable".to_string(), a));
    let (limit, headroom) = [cgroup, available]
        .into_iter()
        .flatten()
        .min_by_key(|(_, h)| *h)?;
    Some(Projection {
        limit,
        headroom_bytes: headroom,
        seconds: (rate > 0.0).then(|| headroom as f64 / rate * 60.0),
    })
}

/// Libraries whose frames are the runtime, not the application: the allocator, libc, the C++
/// runtime, the interpreter.
const RUNTIME_MODULES: &[&str] = &[
    "libc.so",
    "libc-",
    "ld-linux",
    "libstdc++",
    "libgcc_s",
    "libpthread",
    "libm.so",
    "libdl",
    "libpython",
    "libjemalloc",
    "libtcmalloc",
    "libmimalloc",
];

/// Whether a frame is the application's own code (not the runtime, not Python's stdlib).
fn is_application(f: &Frame) -> bool {
    let Some(file) = f.file.as_deref() else {
        return false;
    };
    match f.kind {
        FrameKind::Python => {
            let stdlib = file.contains("/lib/python3.") && !file.contains("-packages/");
            !file.starts_with('<') && !stdlib
        }
        FrameKind::Native => {
            let module = f.module.as_deref().unwrap_or("");
            !RUNTIME_MODULES.iter().any(|m| module.starts_with(m))
                && !file.starts_with("/usr/include/")
        }
    }
}

/// The index of the frame whose line explains a stack: the innermost application frame with
/// a file and a line; failing that, the innermost frame with a file and a line at all.
pub fn deciding_frame(frames: &[Frame]) -> Option<usize> {
    let located = |f: &Frame| f.file.is_some() && f.line.is_some();
    frames
        .iter()
        .position(|f| located(f) && is_application(f))
        .or_else(|| frames.iter().position(located))
}

/// Line `line` (1-based) of the target's `file`, read through `/proc/PID/root`; `None` for a
/// relative path, a missing file or a line past its end (no guessing).
pub fn read_source_line(pid: u32, file: &str, line: u32) -> Option<String> {
    if !file.starts_with('/') || line == 0 {
        return None;
    }
    let text = std::fs::read(procmaps::host_path(pid, file)).ok()?;
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .nth(line as usize - 1)
        .map(|l| l.trim().to_string())
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::model::{Lost, Measure, StackUsage};

    pub const MIB: u64 = 1 << 20;

    pub fn frame(function: &str, file: &str, line: u32, module: &str) -> Frame {
        Frame {
            addr: 0x1000 + line as u64,
            module: Some(module.to_string()),
            function: Some(function.to_string()),
            file: Some(file.to_string()),
            line: Some(line),
            ..Default::default()
        }
    }

    /// A stack whose outstanding bytes follow `bytes_at(t)`.
    pub struct Synthetic {
        pub id: i64,
        pub frames: Vec<Frame>,
        pub bytes_at: Box<dyn Fn(f64) -> u64>,
    }

    /// A timeline sampled every `interval_s` for `n` intervals.
    pub fn timeline(stacks: &[Synthetic], interval_s: f64, n: usize) -> Timeline {
        let mut t = Timeline::new(ProcessContext {
            pid: u32::MAX,
            ..Default::default()
        });
        for i in 0..n {
            let at = i as f64 * interval_s;
            let mut usage: Vec<StackUsage> = stacks
                .iter()
                .map(|s| {
                    let bytes = (s.bytes_at)(at);
                    StackUsage {
                        stack_id: s.id,
                        bytes,
                        count: bytes.div_ceil(4096),
                        frames: s.frames.clone(),
                        allocations: vec![],
                        class: None,
                        class_frame: None,
                        truncated: false,
                    }
                })
                .filter(|s| s.bytes > 0)
                .collect();
            usage.sort_by_key(|s| std::cmp::Reverse(s.bytes));
            let total_bytes = usage.iter().map(|s| s.bytes).sum();
            let total_count = usage.iter().map(|s| s.count).sum();
            let snapshot = Snapshot {
                measure: Measure::Allocations,
                unix_time: 1_790_000_000.0 + at,
                elapsed_s: at,
                stacks: usage,
                total_bytes,
                total_count,
                mapped: None,
                lost: Lost::default(),
                recorded: 0,
                released: 0,
            };
            let sample = ProcSample {
                rss_bytes: 50 * MIB + total_bytes,
                mem_available_bytes: Some(20 << 30),
                ..Default::default()
            };
            t.push(snapshot, Some(sample));
        }
        t
    }

    /// 1 MiB every 0.5 s: 120 MiB/min.
    pub fn leak(id: i64) -> Synthetic {
        Synthetic {
            id,
            frames: vec![
                frame("malloc", "./malloc/malloc.c", 3300, "libc.so.6"),
                frame("leak_one", "/src/leaker.c", 12, "leaker"),
                frame("main", "/src/leaker.c", 30, "leaker"),
            ],
            bytes_at: Box::new(|t| (t / 0.5).floor() as u64 * MIB),
        }
    }

    /// Fills 40 MiB over the first 10 s, then holds it.
    pub fn cache(id: i64) -> Synthetic {
        Synthetic {
            id,
            frames: vec![frame("cache_put", "/src/cache.c", 7, "leaker")],
            bytes_at: Box::new(|t| (t.min(10.0) * 4.0) as u64 * MIB),
        }
    }

    /// Allocates and frees: 0 to 3 MiB outstanding, in no order.
    pub fn churn(id: i64) -> Synthetic {
        Synthetic {
            id,
            frames: vec![frame("work", "/src/work.c", 3, "leaker")],
            bytes_at: Box::new(|t| [0, 3, 1, 2, 0, 3, 2][(t as usize * 5) % 7] * MIB),
        }
    }

    fn trend_of(a: &Analysis, id: i64) -> Trend {
        a.stacks.iter().find(|s| s.stack_id == id).unwrap().trend
    }

    #[test]
    fn steady_leak_is_growing_at_its_rate() {
        let t = timeline(&[leak(1)], 5.0, 25);
        let a = t.analyze();
        let s = &a.stacks[0];
        assert_eq!(s.trend, Trend::Growing);
        let want = 120.0 * MIB as f64;
        assert!(
            (s.fit.slope_per_min - want).abs() / want < 0.01,
            "rate {} MiB/min",
            s.fit.slope_per_min / MIB as f64
        );
        assert!(s.fit.r2 > 0.99);
        assert!(a.verdict.leaking && a.verdict.conclusive);
        assert_eq!(a.verdict.growing_stacks, 1);
        let p = a.verdict.projection.as_ref().unwrap();
        assert_eq!(p.limit, "MemAvailable");
        // 20 GiB at 120 MiB/min: about 170 minutes.
        assert!((p.seconds.unwrap() / 60.0 - 170.7).abs() < 2.0);
        assert_eq!(s.deciding().unwrap().function.as_deref(), Some("leak_one"));
    }

    #[test]
    fn filled_cache_is_a_plateau() {
        let t = timeline(&[cache(2)], 2.0, 20);
        let a = t.analyze();
        assert_eq!(trend_of(&a, 2), Trend::Plateau);
        assert!(!a.verdict.leaking);
    }

    #[test]
    fn alloc_and_free_is_churn() {
        let t = timeline(&[churn(3)], 1.0, 30);
        let a = t.analyze();
        assert_eq!(trend_of(&a, 3), Trend::Churn, "{:?}", a.stacks[0].fit);
        assert!(!a.verdict.leaking);
    }

    #[test]
    fn mixed_process_finds_only_the_leak() {
        let t = timeline(&[churn(3), cache(2), leak(1)], 1.0, 30);
        let a = t.analyze();
        assert_eq!(trend_of(&a, 1), Trend::Growing);
        assert_eq!(trend_of(&a, 2), Trend::Plateau);
        assert_eq!(trend_of(&a, 3), Trend::Churn);
        assert_eq!(a.stacks[0].stack_id, 1, "growing stacks come first");
        assert_eq!(a.verdict.growing_stacks, 1);
    }

    #[test]
    fn constant_holding_is_no_leak() {
        let flat = Synthetic {
            id: 4,
            frames: vec![frame("init", "/src/init.c", 1, "app")],
            bytes_at: Box::new(|_| 8 * MIB),
        };
        let t = timeline(&[flat], 5.0, 12);
        let a = t.analyze();
        assert_eq!(a.stacks[0].trend, Trend::Plateau);
        assert!(!a.verdict.leaking && a.verdict.conclusive);
        assert_eq!(a.verdict.total.slope_per_min, 0.0);
        assert!(a.verdict.projection.as_ref().unwrap().seconds.is_none());
    }

    #[test]
    fn short_run_is_inconclusive() {
        let t = timeline(&[leak(1)], 1.0, 2);
        let a = t.analyze();
        assert!(!a.verdict.conclusive && !a.verdict.leaking);
        assert_eq!(a.stacks[0].trend, Trend::Unknown);
    }

    #[test]
    fn small_drift_is_not_a_leak() {
        let drift = Synthetic {
            id: 5,
            frames: vec![],
            bytes_at: Box::new(|t| 1_000_000 + (t * 100.0) as u64),
        };
        let t = timeline(&[drift], 1.0, 60);
        let a = t.analyze();
        assert_ne!(a.stacks[0].trend, Trend::Growing);
    }

    #[test]
    fn noisy_leak_is_growing_and_noise_alone_is_not() {
        // Jitter of up to 24 MiB (in-flight batches) on a 60 MiB/min leak, and the jitter alone.
        let jitter = |t: f64| ((t as u64 * 7919) % 13) * 2 * MIB;
        let noisy = Synthetic {
            id: 7,
            frames: vec![],
            bytes_at: Box::new(move |t| (t * MIB as f64) as u64 + jitter(t)),
        };
        let noise = Synthetic {
            id: 8,
            frames: vec![],
            bytes_at: Box::new(move |t| MIB + jitter(t)),
        };
        let t = timeline(&[noisy, noise], 2.0, 60);
        let a = t.analyze();
        let noisy = a.stacks.iter().find(|s| s.stack_id == 7).unwrap();
        assert_eq!(noisy.trend, Trend::Growing, "{:?}", noisy.fit);
        let rate = noisy.fit.slope_per_min / MIB as f64;
        assert!((rate - 60.0).abs() < 6.0, "{rate} MiB/min");
        assert_eq!(trend_of(&a, 8), Trend::Churn);
    }

    #[test]
    fn small_steady_leak_of_small_blocks_is_growing() {
        // 512 B every 0.2 s for 6 s: 15 KiB, 30 blocks, well above what is in flight.
        let headers = Synthetic {
            id: 6,
            frames: vec![],
            bytes_at: Box::new(|t| (t / 0.2) as u64 * 512),
        };
        let mut t = timeline(&[headers], 1.0, 7);
        for s in &mut t.snapshots {
            s.stacks.iter_mut().for_each(|u| u.count = u.bytes / 512);
        }
        assert_eq!(t.analyze().stacks[0].trend, Trend::Growing);
    }

    #[test]
    fn deciding_frame_skips_the_runtime() {
        let py = |f: &str, file: &str| Frame {
            kind: FrameKind::Python,
            ..frame(f, file, 5, "")
        };
        let frames = vec![
            frame("malloc", "./malloc/malloc.c", 1, "libc.so.6"),
            frame(
                "PyList_New",
                "Objects/listobject.c",
                2,
                "libpython3.11.so.1.0",
            ),
            py("dumps", "/usr/lib/python3.11/json/__init__.py"),
            py("handle", "/srv/app/server.py"),
        ];
        assert_eq!(deciding_frame(&frames), Some(3));
        assert_eq!(
            deciding_frame(&frames[..2]),
            Some(0),
            "no application frame: the innermost located one"
        );
        assert!(deciding_frame(&[]).is_none());
    }

    #[test]
    fn reads_source_through_the_targets_root() {
        let dir = std::env::temp_dir().join(format!("memleak-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("app.c");
        std::fs::write(&file, "int x;\n    p = malloc(4096);  \n").unwrap();
        let path = file.to_str().unwrap();
        let me = std::process::id();
        assert_eq!(
            read_source_line(me, path, 2).as_deref(),
            Some("p = malloc(4096);")
        );
        assert_eq!(read_source_line(me, path, 3), None);
        assert_eq!(read_source_line(me, "app.c", 1), None);
        assert_eq!(read_source_line(u32::MAX, path, 1), None, "no such process");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn frames_are_kept_once_per_stack() {
        let t = timeline(&[leak(1), cache(2)], 1.0, 5);
        assert!(
            t.snapshots[..4]
                .iter()
                .all(|s| s.stacks.iter().all(|u| u.frames.is_empty()))
        );
        let last = t.last().unwrap();
        assert!(
            last.stacks.iter().all(|u| !u.frames.is_empty()),
            "the last state keeps them"
        );
        assert_eq!(t.frames(1)[1].function.as_deref(), Some("leak_one"));
        let a = t.analyze();
        assert_eq!(
            a.stacks
                .iter()
                .find(|s| s.stack_id == 1)
                .unwrap()
                .frames
                .len(),
            3
        );
    }

    #[test]
    fn projection_takes_the_tighter_of_cgroup_and_machine() {
        let root = std::env::temp_dir().join(format!("memleak-proj-{}", std::process::id()));
        std::fs::create_dir_all(root.join("job")).unwrap();
        std::fs::write(root.join("job/memory.max"), format!("{}\n", 1u64 << 30)).unwrap();
        let mut t = timeline(&[leak(1)], 5.0, 13);
        t.context.cgroup = proc_stats::cgroup_limit(&root, "0::/job\n");
        std::fs::remove_dir_all(&root).unwrap();
        for s in t.samples.iter_mut().flatten() {
            s.cgroup_usage_bytes = Some(512 * MIB);
        }
        let a = t.analyze();
        let p = a.verdict.projection.unwrap();
        assert_eq!(p.limit, "cgroup /job memory limit");
        assert_eq!(p.headroom_bytes, 512 * MIB);
        // 512 MiB at 120 MiB/min.
        assert!((p.seconds.unwrap() - 256.0).abs() < 1.0, "{:?}", p.seconds);
    }

    #[test]
    fn final_state_ends_the_series() {
        let mut t = timeline(&[leak(1)], 1.0, 4);
        let mut at_exit = t.snapshots[3].clone();
        at_exit.elapsed_s = 3.5;
        at_exit.total_bytes += MIB;
        t.record_final(at_exit);
        assert_eq!(t.snapshots.len(), 4);
        assert_eq!(t.last().unwrap().elapsed_s, 3.5);
        let a = t.analyze();
        assert_eq!(a.points.len(), 5);
        assert_eq!(a.points[4].outstanding_bytes, 7 * MIB);
        assert!(
            a.points[4].process.is_none(),
            "no process u32::MAX to sample"
        );
    }

    #[test]
    fn a_long_run_is_thinned_to_bounded_points_over_its_whole_span() {
        let template = timeline(&[leak(1)], 1.0, 2).snapshots.pop().unwrap();
        let mut t = Timeline::new(ProcessContext {
            pid: u32::MAX,
            ..Default::default()
        });
        for i in 0..5000 {
            let mut s = template.clone();
            s.elapsed_s = i as f64;
            s.stacks[0].bytes = i * MIB;
            s.total_bytes = i * MIB;
            t.push(s, None);
        }
        assert_eq!(t.intervals(), 5000);
        assert!(t.snapshots.len() <= MAX_POINTS, "{}", t.snapshots.len());
        assert_eq!(t.snapshots.len(), t.samples.len());
        assert_eq!(t.snapshots[0].elapsed_s, 0.0, "the start stays");
        assert_eq!(t.last().unwrap().elapsed_s, 4999.0);
        let recent: Vec<f64> = t
            .snapshots
            .iter()
            .rev()
            .take(10)
            .map(|s| s.elapsed_s)
            .collect();
        assert_eq!(
            recent,
            (4990..5000).rev().map(f64::from).collect::<Vec<_>>()
        );
        let a = t.analyze();
        assert_eq!(a.stacks[0].trend, Trend::Growing);
        assert!((a.stacks[0].fit.slope_per_min - 60.0 * MIB as f64).abs() < 1.0);
        assert_eq!(t.frames(1).len(), 3, "a held stack keeps its frames");
    }

    impl Timeline {
        /// What the collector's classifier sets on a snapshot's stacks.
        pub fn set_class(&mut self, stack_id: i64, class: Class) {
            self.classes.insert(stack_id, class);
        }
    }

    #[test]
    fn bytes_add_up_per_class() {
        let mut t = timeline(&[leak(1), cache(2), churn(3)], 1.0, 12);
        t.set_class(1, Class::Application);
        t.set_class(2, Class::CpythonInternal);
        let a = t.analyze();
        assert_eq!(a.classes.len(), 2);
        let dict = Class::CpythonInternal;
        let bytearray = Class::Application;
        assert_eq!(
            a.classes[0],
            ClassBytes {
                class: &dict,
                bytes: 40 * MIB
            }
        );
        assert_eq!(
            a.classes[1],
            ClassBytes {
                class: &bytearray,
                bytes: 22 * MIB
            }
        );
    }
}
