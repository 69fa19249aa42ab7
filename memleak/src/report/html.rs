//! `--html`: one self-contained page (no network): a chart of outstanding bytes over time for
//! the whole process and its top stacks, a flamegraph of what is outstanding at the end
//! (inferno), and the text report.

use std::{fmt::Write, path::Path};

use anyhow::{Context, Result};

use crate::{
    capture::{Analysis, StackTrend, Timeline},
    report::{folded, summary},
};

/// Stacks drawn in the chart besides the total.
const CHART_STACKS: usize = 6;
const COLORS: [&str; CHART_STACKS] = [
    "#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];
const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 340.0;
const MARGIN_LEFT: f64 = 80.0;
const MARGIN_RIGHT: f64 = 20.0;
const MARGIN_TOP: f64 = 20.0;
const MARGIN_BOTTOM: f64 = 40.0;

pub fn render(timeline: &Timeline) -> Result<String> {
    let a = timeline.analyze();
    let text = summary::render(timeline);
    let title = format!("memleak: pid {}", timeline.pid());
    let mut page = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{title}</title>\n<style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n\
         <p class=\"verdict\">{}</p>\n<h2>Outstanding bytes over time</h2>\n{}\n",
        escape(text.lines().next().unwrap_or("")),
        chart(&a)
    );
    page += "<h2>Outstanding at the end, by call path</h2>\n";
    page += &flamegraph(timeline)?;
    let _ = write!(
        page,
        "\n<h2>Report</h2>\n<pre id=\"report\">{}</pre>\n</body></html>\n",
        escape(&text)
    );
    Ok(page)
}

pub fn write(timeline: &Timeline, path: &Path) -> Result<()> {
    std::fs::write(path, render(timeline)?).with_context(|| format!("writing {}", path.display()))
}

const STYLE: &str = "body{font-family:sans-serif;margin:1em 2em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}\
.verdict{font-family:monospace;font-size:1.05em;font-weight:bold}\
pre{background:#f6f6f6;padding:1em;overflow-x:auto}\
svg text{font-size:12px;font-family:sans-serif}\
.axis{stroke:#888}.grid{stroke:#e4e4e4}\
.series{fill:none;stroke-width:2}#series-total{stroke:#222;stroke-width:3}";

/// The chart as inline SVG: one polyline per series, labelled in a legend below.
fn chart(a: &Analysis) -> String {
    if a.points.is_empty() {
        return "<p>No interval was recorded.</p>".into();
    }
    let x_max = a.points.last().map_or(1.0, |p| p.elapsed_s).max(1.0);
    let y_max = a
        .points
        .iter()
        .map(|p| p.outstanding_bytes)
        .max()
        .unwrap_or(0)
        .max(1);
    let y_top = nice_ceiling(y_max as f64);
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let px = |t: f64| MARGIN_LEFT + t / x_max * plot_w;
    let py = |b: f64| MARGIN_TOP + plot_h - b / y_top * plot_h;

    let stacks: Vec<&StackTrend> = a.stacks.iter().take(CHART_STACKS).collect();
    let legend_h = 18.0 * (stacks.len() + 1) as f64;
    let mut svg = format!(
        "<svg id=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" \
         height=\"{}\" viewBox=\"0 0 {WIDTH} {}\" role=\"img\">\n",
        HEIGHT + legend_h,
        HEIGHT + legend_h
    );
    for k in 0..=4 {
        let b = y_top * k as f64 / 4.0;
        let y = py(b);
        let _ = writeln!(
            svg,
            "<line class=\"grid\" x1=\"{MARGIN_LEFT}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\"/>\
             <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            WIDTH - MARGIN_RIGHT,
            MARGIN_LEFT - 6.0,
            y + 4.0,
            summary::bytes(b as u64)
        );
        let t = x_max * k as f64 / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            px(t),
            HEIGHT - MARGIN_BOTTOM + 18.0,
            summary::duration(t)
        );
    }
    let _ = writeln!(
        svg,
        "<line class=\"axis\" x1=\"{MARGIN_LEFT}\" x2=\"{MARGIN_LEFT}\" y1=\"{MARGIN_TOP}\" \
         y2=\"{0}\"/><line class=\"axis\" x1=\"{MARGIN_LEFT}\" x2=\"{1}\" y1=\"{0}\" y2=\"{0}\"/>",
        HEIGHT - MARGIN_BOTTOM,
        WIDTH - MARGIN_RIGHT,
    );

    let mut series: Vec<(String, &str, String, Vec<u64>)> = vec![(
        "total".into(),
        "#222",
        format!(
            "all stacks ({}/min)",
            summary::signed_bytes(a.verdict.total.slope_per_min)
        ),
        a.points.iter().map(|p| p.outstanding_bytes).collect(),
    )];
    for (i, s) in stacks.iter().enumerate() {
        let name = s
            .deciding()
            .or(s.frames.first())
            .map_or(format!("stack {}", s.stack_id), summary::frame_label);
        series.push((
            i.to_string(),
            COLORS[i],
            format!(
                "{} [{}, {}/min]",
                name,
                s.trend.name(),
                summary::signed_bytes(s.fit.slope_per_min)
            ),
            s.bytes.clone(),
        ));
    }
    for (k, (id, color, label, values)) in series.iter().enumerate() {
        let points: Vec<String> = a
            .points
            .iter()
            .zip(values)
            .map(|(p, &b)| format!("{:.1},{:.1}", px(p.elapsed_s), py(b as f64)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline class=\"series\" id=\"series-{id}\" stroke=\"{color}\" points=\"{}\">\
             <title>{}</title></polyline>",
            points.join(" "),
            escape(label)
        );
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
    svg.push_str("</svg>");
    svg
}

/// 1, 2 or 5 times a power of two's worth of bytes above `v`, so the axis reads round.
fn nice_ceiling(v: f64) -> f64 {
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

/// inferno's flamegraph of the final snapshot, in an `<object>` so its own script (zoom,
/// search) runs in its own SVG document.
fn flamegraph(timeline: &Timeline) -> Result<String> {
    let lines = timeline.last().map(folded::lines).unwrap_or_default();
    if lines.is_empty() {
        return Ok("<p>Nothing outstanding at the end.</p>".into());
    }
    let mut opts = inferno::flamegraph::Options::default();
    opts.title = "Outstanding bytes".into();
    opts.count_name = "bytes".into();
    opts.colors =
        inferno::flamegraph::Palette::Basic(inferno::flamegraph::color::BasicPalette::Mem);
    let mut svg = Vec::new();
    inferno::flamegraph::from_lines(&mut opts, lines.iter().map(String::as_str), &mut svg)
        .context("drawing the flamegraph")?;
    let svg = String::from_utf8(svg).context("flamegraph SVG is not UTF-8")?;
    let height = svg
        .split_once("height=\"")
        .and_then(|(_, rest)| rest.split('"').next())
        .and_then(|h| h.parse::<u32>().ok())
        .unwrap_or(600);
    Ok(format!(
        "<object id=\"flamegraph\" type=\"image/svg+xml\" width=\"100%\" height=\"{height}\" \
         data=\"data:image/svg+xml;charset=utf-8,{}\">flamegraph</object>",
        percent_encode(&svg)
    ))
}

/// Keeps letters, digits and a few safe marks; everything else as %XX (UTF-8 bytes).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b" -_.!~*()/:=,;".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::capture::tests::{MIB, cache, churn, leak, timeline};

    #[test]
    fn page_has_chart_flamegraph_and_report() {
        let t = timeline(&[leak(1), cache(2), churn(3)], 2.0, 12);
        let page = render(&t).unwrap();
        assert!(page.contains("<svg id=\"chart\""));
        assert_eq!(page.matches("<polyline class=\"series\"").count(), 4);
        assert!(page.contains("data:image/svg+xml"));
        assert!(page.contains("LEAKING +120.0 MiB/min"));
        // Self-contained: nothing loaded from elsewhere (links in comments are fine).
        for external in ["src=\"http", "<link", "<script src", "url(http"] {
            assert!(!page.contains(external), "{external}");
        }
    }

    #[test]
    fn axis_tops_are_round() {
        assert_eq!(nice_ceiling(3.0 * MIB as f64), 4.0 * MIB as f64);
        assert_eq!(nice_ceiling(130.0 * MIB as f64), 256.0 * MIB as f64);
        assert_eq!(nice_ceiling(700.0), 768.0);
    }

    fn chromium() -> Option<&'static str> {
        ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|c| Command::new(c).arg("--version").output().is_ok())
    }

    /// Loads the page in headless Chromium: the chart is in the DOM and the console is quiet.
    #[test]
    fn page_loads_in_headless_chromium() {
        let Some(browser) = chromium() else {
            eprintln!(
                "SKIPPED page_loads_in_headless_chromium: no chromium \
                 (apt-get install -y chromium)"
            );
            return;
        };
        let dir = std::env::temp_dir().join(format!("memleak-html-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let page = dir.join("report.html");
        write(&timeline(&[leak(1), cache(2), churn(3)], 2.0, 12), &page).unwrap();
        let out = Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--enable-logging=stderr",
                "--v=0",
                "--virtual-time-budget=2000",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg("--dump-dom")
            .arg(format!("file://{}", page.display()))
            .output()
            .unwrap();
        let dom = String::from_utf8_lossy(&out.stdout);
        let log = String::from_utf8_lossy(&out.stderr);
        std::fs::remove_dir_all(&dir).ok();
        assert!(out.status.success(), "{log}");
        assert_eq!(dom.matches("class=\"series\"").count(), 4, "{dom}");
        assert!(dom.contains("id=\"flamegraph\""));
        let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
        assert!(console.is_empty(), "console messages: {console:#?}");
    }
}
