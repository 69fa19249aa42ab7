//! The one-line status of a run in progress, rewritten in place on a terminal. Written to
//! stderr only when stderr is a terminal: a pipe or a log file gets nothing.

use std::io::{IsTerminal, Write};

use crate::{capture::Timeline, report::summary};

pub struct LiveStatus {
    enabled: bool,
    shown: bool,
}

impl LiveStatus {
    pub fn new() -> Self {
        LiveStatus {
            enabled: std::io::stderr().is_terminal(),
            shown: false,
        }
    }

    /// Rewrites the status line after an interval; `duration_s`: the run's planned length.
    pub fn update(&mut self, timeline: &Timeline, duration_s: Option<f64>) {
        if !self.enabled {
            return;
        }
        let line = line(timeline, duration_s);
        let mut err = std::io::stderr().lock();
        // \r and "erase to end of line": the new line replaces the old one in place.
        let _ = write!(err, "\r\x1b[K{line}");
        let _ = err.flush();
        self.shown = true;
    }

    /// Erases the status line before the report is printed.
    pub fn clear(&mut self) {
        if self.shown {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
            self.shown = false;
        }
    }
}

impl Default for LiveStatus {
    fn default() -> Self {
        Self::new()
    }
}

/// `[1m05s / 2m00s] outstanding 64.0 MiB  +60.0 MiB/min  2 growing`.
pub fn line(timeline: &Timeline, duration_s: Option<f64>) -> String {
    let Some(last) = timeline.last() else {
        return "waiting for the first interval...".into();
    };
    let a = timeline.analyze();
    let elapsed = summary::duration(last.elapsed_s);
    let clock = match duration_s {
        Some(d) => format!("{elapsed} / {}", summary::duration(d)),
        None => elapsed,
    };
    let mut s = format!(
        "[{clock}] outstanding {}  {}/min",
        summary::bytes(last.total_bytes),
        summary::signed_bytes(a.verdict.total.slope_per_min)
    );
    if a.verdict.conclusive {
        s += &format!("  {} growing", a.verdict.growing_stacks);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::tests::{leak, timeline};

    #[test]
    fn status_line_shows_progress_and_rate() {
        let t = timeline(&[leak(1)], 5.0, 13);
        assert_eq!(
            line(&t, Some(120.0)),
            "[1m00s / 2m00s] outstanding 120.0 MiB  +120.0 MiB/min  1 growing"
        );
        let empty = Timeline::new(Default::default());
        assert_eq!(line(&empty, None), "waiting for the first interval...");
    }
}
