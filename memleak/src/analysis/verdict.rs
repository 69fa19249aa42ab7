//! The answer: is the process leaking, at what one rate, which stacks matter, and where the
//! process's memory will be at that rate.

use serde::Serialize;

use super::{Point, StackTrend, Trend, classes::MIN_POINTS, fit::Fit};
use crate::{
    model::{Lost, ProcessCounts},
    proc_stats::{ProcSample, ProcessContext},
    timeline::TracedProcess,
};

/// A stack is named in the verdict, whatever its class, if it keeps at least this share of
/// what is outstanding at the end ...
pub const NAMED_MIN_SHARE: f64 = 0.01;
/// ... or at least this many bytes.
pub const NAMED_MIN_BYTES: u64 = 1 << 20;
/// Hours ahead at which the expected RSS is given.
pub const PROJECTION_HOURS: [u32; 4] = [1, 4, 8, 24];

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// At least one stack grows.
    pub leaking: bool,
    /// Enough intervals to judge (MIN_POINTS), over at least one interval.
    pub conclusive: bool,
    /// THE rate of the process: the sum of the growing stacks' fitted rates. Held, plateau
    /// and churn memory never enters it.
    pub leak_rate_bytes_per_min: f64,
    pub growing_stacks: usize,
    /// Not the process's rate: the least-squares line through all outstanding bytes (held
    /// blocks and churn included); `None`: not enough data.
    pub total: Option<Fit>,
    /// The least-squares line through the resident set (from /proc); `None`: not enough data.
    pub rss: Option<Fit>,
    /// Bytes the held stacks keep at the end (reported, never extrapolated).
    pub held_bytes: u64,
    /// The stacks the verdict names (growing, or keeping bytes that matter), report order.
    pub named_stacks: Vec<i64>,
    pub projection: Option<Projection>,
}

/// What the process will run into first, and when at the measured pace.
#[derive(Clone, Debug, Serialize)]
pub struct Projection {
    /// "cgroup /path memory limit" or "MemAvailable".
    pub limit: String,
    pub headroom_bytes: u64,
    /// At the leak rate; `None`: nothing grows.
    pub seconds: Option<f64>,
    /// The resident set expected after each of PROJECTION_HOURS at the leak rate (the
    /// last RSS sampled plus the rate times the time); empty when nothing grows.
    pub rss_at: Vec<RssAt>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RssAt {
    pub hours: u32,
    pub rss_bytes: u64,
}

/// Marks the stacks the verdict names: every growing stack, and every stack whose kept
/// bytes reach NAMED_MIN_BYTES or NAMED_MIN_SHARE of the final outstanding bytes.
pub fn name_stacks(stacks: &mut [StackTrend], points: &[Point]) {
    let outstanding = points.last().map_or(0, |p| p.outstanding_bytes);
    let bar = NAMED_MIN_BYTES.min((outstanding as f64 * NAMED_MIN_SHARE).ceil() as u64);
    for s in stacks {
        s.named = s.trend == Trend::Growing || (s.kept_bytes > 0 && s.kept_bytes >= bar);
    }
}

pub fn verdict(
    ctx: &ProcessContext,
    points: &[Point],
    stacks: &[StackTrend],
    min_span_s: f64,
) -> Verdict {
    // Below MIN_POINTS no rate at all is claimed, not even the total's.
    let enough = points.len() >= MIN_POINTS;
    let x: Vec<f64> = points.iter().map(|p| p.elapsed_s).collect();
    let total_y: Vec<f64> = points.iter().map(|p| p.outstanding_bytes as f64).collect();
    let total = Fit::of(&x, &total_y, min_span_s).filter(|_| enough);
    let (rx, ry): (Vec<f64>, Vec<f64>) = points
        .iter()
        .filter_map(|p| Some((p.elapsed_s, p.process.as_ref()?.rss_bytes as f64)))
        .unzip();
    let growing: Vec<&StackTrend> = stacks
        .iter()
        .filter(|s| s.trend == Trend::Growing)
        .collect();
    // A fold from 0.0, not sum(): an empty sum of f64 is -0.0.
    let leak_rate = growing.iter().fold(0.0, |sum, s| sum + s.rate());
    let last_sample = points.iter().rev().find_map(|p| p.process.as_ref());
    let of = |trend| stacks.iter().filter(move |s| s.trend == trend);
    Verdict {
        leaking: !growing.is_empty(),
        conclusive: total.is_some(),
        leak_rate_bytes_per_min: leak_rate,
        growing_stacks: growing.len(),
        total,
        rss: Fit::of(&rx, &ry, min_span_s).filter(|_| enough),
        held_bytes: of(Trend::Held).map(|s| s.final_bytes()).sum(),
        named_stacks: stacks
            .iter()
            .filter(|s| s.named)
            .map(|s| s.stack_id)
            .collect(),
        // Growing stacks only: a plateau's past filling and a held block do not go on.
        projection: last_sample.and_then(|s| projection(ctx, s, leak_rate)),
    }
}

/// The smaller of the cgroup's headroom and the machine's MemAvailable, the time to use it
/// up at `rate` bytes per minute, and the RSS expected in PROJECTION_HOURS.
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
    let grows = rate > 0.0;
    let rss_at = PROJECTION_HOURS
        .iter()
        .filter(|_| grows)
        .map(|&hours| RssAt {
            hours,
            rss_bytes: s.rss_bytes + (rate * 60.0 * hours as f64) as u64,
        })
        .collect();
    Some(Projection {
        limit,
        headroom_bytes: headroom,
        seconds: grows.then(|| headroom as f64 / rate * 60.0),
        rss_at,
    })
}

/// One process's part of a run over several: whether it leaks, at what rate, and what its
/// stacks hold at the end.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessVerdict {
    pub pid: u32,
    /// How it ended while the others were traced; its memory was dropped then.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exited: Option<String>,
    /// Found while tracing: traced from this long after its start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traced_after_ms: Option<u64>,
    pub leaking: bool,
    pub leak_rate_bytes_per_min: f64,
    pub growing_stacks: usize,
    /// Outstanding at the end, over its stacks.
    pub final_bytes: u64,
    pub final_count: u64,
    /// What the tracer lost in it (running totals at the end): its figures undercount by these.
    pub lost: Lost,
}

/// Each traced process's verdict, in `processes` order, from the stacks taken in it and the
/// last snapshot's `counts`.
pub fn per_process(
    processes: &[TracedProcess],
    stacks: &[StackTrend],
    counts: &[ProcessCounts],
) -> Vec<ProcessVerdict> {
    processes
        .iter()
        .map(|p| {
            let own = || stacks.iter().filter(|s| s.info.pid == p.pid);
            let growing = || own().filter(|s| s.trend == Trend::Growing);
            ProcessVerdict {
                pid: p.pid,
                exited: p.exited.clone(),
                traced_after_ms: p.traced_after_ms,
                leaking: growing().next().is_some(),
                leak_rate_bytes_per_min: growing().fold(0.0, |sum, s| sum + s.rate()),
                growing_stacks: growing().count(),
                final_bytes: own().map(|s| s.final_bytes()).sum(),
                final_count: own().map(|s| s.counts.last().copied().unwrap_or(0)).sum(),
                lost: counts
                    .iter()
                    .find(|c| c.pid == p.pid)
                    .map(|c| c.lost.clone())
                    .unwrap_or_default(),
            }
        })
        .collect()
}
