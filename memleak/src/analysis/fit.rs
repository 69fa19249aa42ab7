//! A least-squares line through a series: how fast something changes and how well a straight
//! line explains it.

use serde::Serialize;

/// A least-squares line through a series, per minute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Fit {
    /// Bytes (or objects) per minute.
    pub slope_per_min: f64,
    /// Share of the variation the line explains (0..1); 0 for a flat series.
    pub r2: f64,
}

impl Fit {
    /// `x` in seconds. `None` (not enough data) with fewer than two distinct instants or over
    /// less than `min_span_s` (one interval): a rate from two samples taken at nearly the
    /// same instant means nothing.
    pub fn of(x_s: &[f64], y: &[f64], min_span_s: f64) -> Option<Fit> {
        let n = x_s.len().min(y.len());
        let span = x_s[..n].iter().cloned().fold(f64::NAN, f64::max)
            - x_s[..n].iter().cloned().fold(f64::NAN, f64::min);
        if n < 2 || !(span > 0.0 && span >= min_span_s) {
            return None;
        }
        let n = n as f64;
        let x: Vec<f64> = x_s.iter().map(|s| s / 60.0).collect();
        let mx = x.iter().sum::<f64>() / n;
        let my = y.iter().sum::<f64>() / n;
        let sxx: f64 = x.iter().map(|x| (x - mx).powi(2)).sum();
        let sxy: f64 = x.iter().zip(y).map(|(x, y)| (x - mx) * (y - my)).sum();
        let syy: f64 = y.iter().map(|y| (y - my).powi(2)).sum();
        let r2 = if syy > 0.0 {
            (sxy * sxy / (sxx * syy)).clamp(0.0, 1.0)
        } else {
            0.0
        };
        Some(Fit {
            slope_per_min: sxy / sxx,
            r2,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_rate_without_two_instants_an_interval_apart() {
        let line = Fit::of(&[0.0, 60.0], &[0.0, 10.0], 1.0).unwrap();
        assert_eq!(line.slope_per_min, 10.0);
        assert_eq!(Fit::of(&[1.1, 1.1], &[0.0, 5e6], 0.0), None, "one instant");
        assert_eq!(
            Fit::of(&[1.0, 1.2], &[0.0, 5e6], 1.0),
            None,
            "less than an interval"
        );
        assert_eq!(Fit::of(&[1.0], &[5.0], 0.0), None);
        assert_eq!(Fit::of(&[], &[], 0.0), None);
    }
}
