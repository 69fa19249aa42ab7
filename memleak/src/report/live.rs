//! The one-line status of a run in progress, rewritten in place on a terminal. Written to
//! stderr only when stderr is a terminal: a pipe or a log file gets nothing.

use std::io::{IsTerminal, Write};

use crate::{
    analysis::analyze,
    report::format::{bytes, duration, signed_bytes},
    stacks::StackTable,
    timeline::Timeline,
};

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
    pub fn update(&mut self, timeline: &Timeline, table: &StackTable, duration_s: Option<f64>) {
        if !self.enabled {
            return;
        }
        let line = line(timeline, table, duration_s);
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

/// `[1m05s / 2m00s] outstanding 64.0 MiB  leak rate +60.0 MiB/min in 2 growing`.
pub fn line(timeline: &Timeline, table: &StackTable, duration_s: Option<f64>) -> String {
    let Some(last) = timeline.last() else {
        return "waiting for the first interval...".into();
    };
    let v = analyze(timeline, table).verdict;
    let elapsed = duration(last.elapsed_s);
    let clock = match duration_s {
        Some(d) => format!("{elapsed} / {}", duration(d)),
        None => elapsed,
    };
    let mut s = format!("[{clock}] outstanding {}", bytes(last.total_bytes));
    if !v.conclusive {
        s += "  rate: not enough data yet";
    } else if v.leaking {
        s += &format!(
            "  leak rate {}/min in {} growing",
            signed_bytes(v.leak_rate_bytes_per_min),
            v.growing_stacks
        );
    } else {
        s += "  no stack grows";
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::tests::{leak, timeline};

    #[test]
    fn status_line_shows_progress_and_rate() {
        let t = timeline(&[leak(1)], 5.0, 13);
        assert_eq!(
            line(&t.timeline, &t.table, Some(120.0)),
            "[1m00s / 2m00s] outstanding 120.0 MiB  leak rate +120.0 MiB/min in 1 growing"
        );
        let short = timeline(&[leak(1)], 5.0, 2);
        assert!(line(&short.timeline, &short.table, None).ends_with("not enough data yet"));
        let empty = Timeline::new(Default::default(), 1.0);
        assert_eq!(
            line(&empty, &t.table, None),
            "waiting for the first interval..."
        );
    }
}
