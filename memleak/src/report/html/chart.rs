//! The page's charts as inline SVG: outstanding bytes stacked by class with RSS over them
//! (heap against RSS, what users of memory tools ask first), and the top stacks over time.

use std::fmt::Write;

use crate::{
    analysis::{Analysis, StackTrend, Trend},
    report::format::{bytes, duration, escape, frame_label, rate},
};

/// Stacks drawn in the stacks chart besides the total.
const CHART_STACKS: usize = 6;
const COLORS: [&str; CHART_STACKS] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];
/// The classes stacked bottom up: what stays first, what comes and goes on top.
const LAYERS: [(Trend, &str); 5] = [
    (Trend::Held, "#9467bd"),
    (Trend::Plateau, "#1f77b4"),
    (Trend::Growing, "#d62728"),
    (Trend::Churn, "#bbbbbb"),
    (Trend::Unknown, "#dddddd"),
];
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 340.0;
const MARGIN_LEFT: f64 = 80.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 20.0;
const MARGIN_BOTTOM: f64 = 40.0;

/// A plot area: time on x, bytes on y, a legend below.
struct Plot {
    x_max: f64,
    y_top: f64,
}

impl Plot {
    fn new(x_max: f64, y_max: u64) -> Plot {
        Plot {
            x_max: x_max.max(1.0),
            y_top: nice_ceiling(y_max.max(1) as f64),
        }
    }

    fn px(&self, t: f64) -> f64 {
        MARGIN_LEFT + t / self.x_max * (WIDTH - MARGIN_LEFT - MARGIN_RIGHT)
    }

    fn py(&self, b: f64) -> f64 {
        let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
        MARGIN_TOP + plot_h - b / self.y_top * plot_h
    }

    /// The `<svg>` opening with the grid and both axes labelled, room for `legend` rows.
    fn open(&self, id: &str, legend: usize) -> String {
        let height = HEIGHT + 18.0 * legend as f64;
        let mut svg = format!(
            "<svg id=\"{id}\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" \
             height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" role=\"img\">\n"
        );
        for k in 0..=4 {
            let b = self.y_top * k as f64 / 4.0;
            let y = self.py(b);
            let t = self.x_max * k as f64 / 4.0;
            let _ = writeln!(
                svg,
                "<line class=\"grid\" x1=\"{MARGIN_LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
                 <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\
                 <text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                WIDTH - MARGIN_RIGHT,
                MARGIN_LEFT - 6.0,
                y + 4.0,
                bytes(b as u64),
                self.px(t),
                HEIGHT - MARGIN_BOTTOM + 18.0,
                duration(t)
            );
        }
        let _ = writeln!(
            svg,
            "<line class=\"axis\" x1=\"{MARGIN_LEFT}\" x2=\"{MARGIN_LEFT}\" y1=\"{MARGIN_TOP}\" \
             y2=\"{0}\"/><line class=\"axis\" x1=\"{MARGIN_LEFT}\" x2=\"{1}\" y1=\"{0}\" y2=\"{0}\"/>",
            HEIGHT - MARGIN_BOTTOM,
            WIDTH - MARGIN_RIGHT,
        );
        svg
    }

    /// Legend row `k`: a swatch and its label.
    fn legend(&self, svg: &mut String, k: usize, color: &str, label: &str) {
        let y = HEIGHT + 18.0 * k as f64 + 4.0;
        let _ = writeln!(
            svg,
            "<rect x=\"{MARGIN_LEFT}\" y=\"{y}\" width=\"12\" height=\"12\" fill=\"{color}\"/>\
             <text x=\"{}\" y=\"{}\">{}</text>",
            MARGIN_LEFT + 18.0,
            y + 10.0,
            escape(label)
        );
    }

    fn line(&self, times: &[f64], values: &[u64]) -> String {
        let points: Vec<String> = times
            .iter()
            .zip(values)
            .map(|(&t, &b)| format!("{:.1},{:.1}", self.px(t), self.py(b as f64)))
            .collect();
        points.join(" ")
    }
}

/// The points' instants, and a plot over the run tall enough for the outstanding bytes and
/// `also`.
fn plot(a: &Analysis, also: u64) -> (Vec<f64>, Plot) {
    let x: Vec<f64> = a.points.iter().map(|p| p.elapsed_s).collect();
    let top = a.points.iter().map(|p| p.outstanding_bytes).max();
    let plot = Plot::new(x.last().copied().unwrap_or(1.0), top.unwrap_or(0).max(also));
    (x, plot)
}

/// Outstanding bytes at each point, summed per class of stack, bottom layer first.
fn layers(a: &Analysis) -> Vec<(Trend, &'static str, Vec<u64>)> {
    LAYERS
        .iter()
        .map(|&(trend, color)| {
            let mut sums = vec![0u64; a.points.len()];
            for s in a.stacks.iter().filter(|s| s.trend == trend) {
                sums.iter_mut().zip(&s.bytes).for_each(|(sum, b)| *sum += b);
            }
            (trend, color, sums)
        })
        .filter(|(_, _, sums)| sums.iter().any(|&b| b > 0))
        .collect()
}

/// Traced outstanding bytes as areas stacked by class, and the RSS line over them.
pub fn heap_and_rss(a: &Analysis) -> String {
    if a.points.is_empty() {
        return "<p>No interval was recorded.</p>".into();
    }
    let rss: Vec<Option<u64>> = a
        .points
        .iter()
        .map(|p| p.process.as_ref().map(|s| s.rss_bytes))
        .collect();
    let (x, plot) = plot(a, rss.iter().flatten().copied().max().unwrap_or(0));
    let layers = layers(a);
    let mut svg = plot.open("heap-rss", layers.len() + 1);
    let mut below = vec![0u64; x.len()];
    for (k, (trend, color, sums)) in layers.iter().enumerate() {
        let above: Vec<u64> = below.iter().zip(sums).map(|(b, s)| b + s).collect();
        let mut outline = plot.line(&x, &above);
        let back: Vec<(f64, u64)> = x.iter().copied().zip(below.iter().copied()).rev().collect();
        let (bx, by): (Vec<f64>, Vec<u64>) = back.into_iter().unzip();
        let _ = write!(outline, " {}", plot.line(&bx, &by));
        let label = format!("traced outstanding, {}", trend.name());
        let _ = writeln!(
            svg,
            "<polygon class=\"area\" fill=\"{color}\" points=\"{outline}\"><title>{label}</title></polygon>"
        );
        plot.legend(&mut svg, k, color, &label);
        below = above;
    }
    let sampled: Vec<(f64, u64)> = x
        .iter()
        .zip(&rss)
        .filter_map(|(&t, r)| Some((t, (*r)?)))
        .collect();
    let (rx, ry): (Vec<f64>, Vec<u64>) = sampled.into_iter().unzip();
    let label = format!("RSS (the kernel's count): {}", rate(a.verdict.rss));
    let _ = writeln!(
        svg,
        "<polyline class=\"rss\" id=\"rss\" points=\"{}\"><title>{}</title></polyline>",
        plot.line(&rx, &ry),
        escape(&label)
    );
    plot.legend(&mut svg, layers.len(), "#111", &label);
    svg.push_str("</svg>");
    svg
}

/// The total and the top stacks, one polyline each.
pub fn stacks(a: &Analysis) -> String {
    if a.points.is_empty() {
        return String::new();
    }
    let (x, plot) = plot(a, 0);
    let shown: Vec<&StackTrend> = a.stacks.iter().take(CHART_STACKS).collect();
    let mut svg = plot.open("chart", shown.len() + 1);
    let mut series: Vec<(String, &str, String, Vec<u64>)> = vec![(
        "total".into(),
        "#222",
        format!(
            "all stacks (line through the total: {})",
            rate(a.verdict.total)
        ),
        a.points.iter().map(|p| p.outstanding_bytes).collect(),
    )];
    for (i, s) in shown.iter().enumerate() {
        let name = s
            .info
            .deciding()
            .or(s.info.frames.first())
            .map_or(format!("stack {}", s.stack_id), frame_label);
        // Only a growing stack's line is a rate; the others are told by their bytes.
        let figure = match s.trend {
            Trend::Growing => rate(s.fit),
            _ => bytes(s.final_bytes()),
        };
        let label = format!("{} [{}, {figure}]", name, s.trend.name());
        series.push((i.to_string(), COLORS[i], label, s.bytes.clone()));
    }
    for (k, (id, color, label, values)) in series.iter().enumerate() {
        let _ = writeln!(
            svg,
            "<polyline class=\"series\" id=\"series-{id}\" stroke=\"{color}\" points=\"{}\">\
             <title>{}</title></polyline>",
            plot.line(&x, values),
            escape(label)
        );
        plot.legend(&mut svg, k, color, label);
    }
    svg.push_str("</svg>");
    svg
}

/// 1, 2 or 5 times a power of two's worth of bytes above `v`, so the axis reads round.
pub fn nice_ceiling(v: f64) -> f64 {
    let unit = 1024f64.powf((v.log(1024.0)).floor().max(0.0));
    let scaled = v / unit;
    let step = [
        1.0, 2.0, 4.0, 5.0, 8.0, 10.0, 16.0, 20.0, 25.0, 40.0, 50.0, 64.0, 100.0,
    ]
    .into_iter()
    .chain((1..=10).map(|k| 128.0 * k as f64))
    .find(|&s| s >= scaled)
    .unwrap_or(1024.0);
    step * unit
}
