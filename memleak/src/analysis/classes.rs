//! How a stack's outstanding memory behaves over a run: growing, plateau, held or churn
//! (docs/capture.md says exactly what each means). Pure: a series in, a class out.

use serde::Serialize;

use super::fit::Fit;

/// Fewer intervals than this and no class is claimed.
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
/// A stack that took memory during the run, never gave any back and holds at most this
/// many blocks (a one-time load, a few leaked mappings) is held.
pub const MAX_HELD_BLOCKS: u64 = 8;
/// A stack that does not grow holds a plateau if, over the last half of the run, it stays
/// near its peak (mean ≥ this share of the peak) ...
pub const PLATEAU_MIN_LEVEL: f64 = 0.5;
/// ... and moves within this share of its peak; otherwise its memory comes and goes (churn).
pub const PLATEAU_MAX_SPREAD: f64 = 0.25;

/// How a stack's outstanding memory behaves over the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Trend {
    /// Rises steadily and still rises at the end: a leak, in the process's rate.
    Growing,
    /// Filled, then steady: a cache that filled, a buffer held from the start.
    Plateau,
    /// Taken during the run in a few steps and never released, not rising: a one-time load,
    /// a few leaked blocks. Reported with its bytes, never extrapolated into a rate.
    Held,
    /// Allocated and released: its outstanding bytes come and go.
    Churn,
    /// Too few intervals to tell.
    Unknown,
}

impl Trend {
    pub fn name(self) -> &'static str {
        match self {
            Trend::Growing => "growing",
            Trend::Plateau => "plateau",
            Trend::Held => "held",
            Trend::Churn => "churn",
            Trend::Unknown => "unknown",
        }
    }

    /// Classifies a series of outstanding `bytes` in `counts` blocks sampled at `x_s`
    /// seconds; no rate over less than `min_span_s`. See the thresholds at the top.
    pub fn of(x_s: &[f64], bytes: &[f64], counts: &[f64], min_span_s: f64) -> (Trend, Option<Fit>) {
        let fit = Fit::of(x_s, bytes, min_span_s);
        let Some(line) = fit.filter(|_| bytes.len() >= MIN_POINTS) else {
            return (Trend::Unknown, fit);
        };
        let trend = if grows(x_s, bytes, counts, line, min_span_s) {
            Trend::Growing
        } else if is_held(bytes, counts) {
            Trend::Held
        } else if holds_level(bytes) {
            Trend::Plateau
        } else {
            Trend::Churn
        };
        (trend, fit)
    }
}

/// The last half of a series, at least MIN_POINTS long when the run allows it.
fn recent_from(n: usize) -> usize {
    (n / 2).min(n.saturating_sub(MIN_POINTS))
}

/// Rises by more than what is in flight, along a line, and still rises in the last half.
fn grows(x_s: &[f64], bytes: &[f64], counts: &[f64], fit: Fit, min_span_s: f64) -> bool {
    let n = bytes.len();
    let span_min = (x_s[n - 1] - x_s[0]) / 60.0;
    let from = recent_from(n);
    let recent = Fit::of(&x_s[from..], &bytes[from..], min_span_s).unwrap_or_default();
    let blocks: f64 = counts.iter().sum();
    let block_size = if blocks > 0.0 {
        bytes.iter().sum::<f64>() / blocks
    } else {
        0.0
    };
    fit.slope_per_min > 0.0
        && fit.slope_per_min * span_min >= MIN_GROWTH_BYTES.max(MIN_GROWTH_BLOCKS * block_size)
        && fit.r2 >= MIN_GROWTH_R2
        && recent.slope_per_min >= MIN_RECENT_RATE_SHARE * fit.slope_per_min
}

/// Absent at the first instant, then at most MAX_HELD_BLOCKS blocks taken and never a byte
/// given back.
fn is_held(bytes: &[f64], counts: &[f64]) -> bool {
    let released = bytes.windows(2).any(|w| w[1] < w[0]);
    let blocks = counts.last().copied().unwrap_or(0.0);
    bytes[bytes.len() - 1] > bytes[0] && !released && blocks <= MAX_HELD_BLOCKS as f64
}

/// Over the last half, stays near its peak and moves little.
fn holds_level(bytes: &[f64]) -> bool {
    let recent = &bytes[recent_from(bytes.len())..];
    let peak = bytes.iter().cloned().fold(0.0, f64::max);
    let mean = recent.iter().sum::<f64>() / recent.len() as f64;
    let (lo, hi) = recent
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), &b| (lo.min(b), hi.max(b)));
    peak > 0.0 && mean >= PLATEAU_MIN_LEVEL * peak && hi - lo <= PLATEAU_MAX_SPREAD * peak
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(bytes: &[u64]) -> Trend {
        let x: Vec<f64> = (0..bytes.len()).map(|i| i as f64).collect();
        let y: Vec<f64> = bytes.iter().map(|&b| (b << 20) as f64).collect();
        let counts: Vec<f64> = bytes.iter().map(|&b| b as f64).collect();
        Trend::of(&x, &y, &counts, 1.0).0
    }

    #[test]
    fn classes_by_shape() {
        assert_eq!(
            class(&[0, 5, 5, 5, 5, 5, 5, 5]),
            Trend::Held,
            "one block at t = 1 s"
        );
        assert_eq!(
            class(&[0, 1, 2, 3, 4, 5, 5, 5, 5, 5, 5, 5]),
            Trend::Held,
            "five mmaps"
        );
        assert_eq!(class(&[0, 1, 1]), Trend::Held, "one block mid-run");
        assert_eq!(class(&[0, 0, 1]), Trend::Held, "one block at the end");
        assert_eq!(
            class(&[4, 4, 4, 4, 4, 4]),
            Trend::Plateau,
            "held from the start"
        );
        let fill: Vec<u64> = (1..=20).map(|t: u64| t.min(10)).collect();
        assert_eq!(class(&fill), Trend::Plateau, "a cache of 10 blocks");
        assert_eq!(class(&[0, 3, 0, 2, 5, 0, 4, 1, 0, 3]), Trend::Churn);
        assert_eq!(
            class(&[0, 5, 5, 4, 5, 5, 5]),
            Trend::Plateau,
            "gave some back"
        );
        assert_eq!(class(&[0, 5]), Trend::Unknown);
    }
}
