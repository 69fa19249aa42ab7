//! `--html`: one self-contained page (no network): traced outstanding bytes stacked by class
//! with RSS over them, the top stacks over time, a sortable table of the stacks beside
//! inferno's flamegraph of what is outstanding at the end, and the text report.

mod chart;
mod table;

use std::{fmt::Write, path::Path};

use anyhow::{Context, Result};

use crate::{
    analysis::Analysis,
    model::Measure,
    report::{folded, format::escape, summary},
};

pub fn render(a: &Analysis) -> Result<String> {
    let text = summary::render(a);
    let pids: Vec<String> = a.processes.iter().map(|p| p.pid.to_string()).collect();
    let title = match a.several() {
        true => format!("memleak: pids {}", pids.join(", ")),
        false => format!("memleak: pid {}", a.timeline.pid()),
    };
    let mut page = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>{title}</title>\n<style>{STYLE}</style></head><body>\n<h1>{title}</h1>\n\
         <p class=\"verdict\">{}</p>\n\
         <h2>Traced outstanding bytes by class, and RSS</h2>\n{}\n\
         <h2>Outstanding bytes over time, top stacks</h2>\n{}\n",
        escape(text.lines().next().unwrap_or("")),
        chart::heap_and_rss(a),
        chart::stacks(a)
    );
    if a.several() {
        let held = a
            .timeline
            .last()
            .map_or(Measure::Allocations, |s| s.measure)
            .held();
        let items: Vec<String> = summary::process_lines(a, held)
            .iter()
            .map(|l| format!("<li>{}</li>", escape(l)))
            .collect();
        let _ = writeln!(page, "<ul class=\"processes\">{}</ul>", items.concat());
    }
    page += "<h2>Stacks, and what is outstanding at the end by call path</h2>\n";
    let _ = write!(
        page,
        "<div class=\"side\"><div class=\"table\">{}</div><div class=\"flame\">{}</div></div>",
        table::stacks(a),
        flamegraph(a)?
    );
    let _ = write!(
        page,
        "\n<h2>Report</h2>\n<pre id=\"report\">{}</pre>\n<script>{}</script>\n</body></html>\n",
        escape(&text),
        table::SCRIPT
    );
    Ok(page)
}

pub fn write(a: &Analysis, path: &Path) -> Result<()> {
    std::fs::write(path, render(a)?).with_context(|| format!("writing {}", path.display()))
}

const STYLE: &str = "body{font-family:sans-serif;margin:1em 2em;color:#222}\
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}\
.verdict{font-family:monospace;font-size:1.05em;font-weight:bold}\
pre{background:#f6f6f6;padding:1em;overflow-x:auto}\
svg text{font-size:12px;font-family:sans-serif}\
.axis{stroke:#888}.grid{stroke:#e4e4e4}\
.series{fill:none;stroke-width:2}#series-total{stroke:#222;stroke-width:3}\
.area{stroke:none;opacity:.85}.rss{fill:none;stroke:#111;stroke-width:2.5;stroke-dasharray:6 3}\
.side{display:flex;gap:1em;align-items:flex-start}\
.table{flex:0 0 42%;max-height:640px;overflow:auto}.flame{flex:1 1 auto;min-width:0}\
table{border-collapse:collapse;font-size:12px;width:100%}\
th{cursor:pointer;background:#eee;text-align:left;position:sticky;top:0}\
th,td{padding:2px 6px;border-bottom:1px solid #e4e4e4}\
td:nth-child(2),td:nth-child(3){text-align:right;white-space:nowrap}\
tr.named td:first-child{font-weight:bold}";

/// inferno's flamegraph of the final snapshot, in an `<object>` so its own script (zoom,
/// search) runs in its own SVG document.
fn flamegraph(a: &Analysis) -> Result<String> {
    let last = a.timeline.last();
    let lines = last.map_or(vec![], |s| folded::lines(s, a.table));
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

#[cfg(test)]
mod tests {
    use std::process::{Command, Output};

    use super::*;
    use crate::analysis::tests::{MIB, cache, churn, held, leak, timeline};

    #[test]
    fn page_has_chart_flamegraph_and_report() {
        let t = timeline(&[leak(1), cache(2), churn(3)], 2.0, 12);
        let page = render(&t.analyze()).unwrap();
        assert!(page.contains("<svg id=\"chart\""));
        assert!(page.contains("<svg id=\"heap-rss\""));
        assert_eq!(
            page.matches("<polygon class=\"area\"").count(),
            3,
            "three classes"
        );
        assert!(page.contains("<polyline class=\"rss\""));
        assert_eq!(page.matches("<tr").count(), 4, "a header and three stacks");
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
        use chart::nice_ceiling;
        assert_eq!(nice_ceiling(3.0 * MIB as f64), 4.0 * MIB as f64);
        assert_eq!(nice_ceiling(130.0 * MIB as f64), 256.0 * MIB as f64);
        assert_eq!(nice_ceiling(700.0), 768.0);
    }

    fn chromium() -> Option<&'static str> {
        ["chromium", "chromium-browser", "google-chrome"]
            .into_iter()
            .find(|c| Command::new(c).arg("--version").output().is_ok())
    }

    /// Headless Chromium on `url` with `args` besides the quiet defaults.
    fn chromium_run(browser: &str, profile: &Path, url: &Path, args: &[&str]) -> Output {
        Command::new(browser)
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
            .arg(format!("--user-data-dir={}", profile.display()))
            .args(args)
            .arg(format!("file://{}", url.display()))
            .output()
            .unwrap()
    }

    /// Loads the page in headless Chromium: the charts and the table are in the DOM, the
    /// console is quiet, a click sorts the table, and a screenshot is kept to look at.
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
        let (page, profile) = (dir.join("report.html"), dir.join("profile"));
        let t = timeline(&[leak(1), held(4, 5.0), cache(2), churn(3)], 2.0, 12);
        write(&t.analyze(), &page).unwrap();
        let out = chromium_run(browser, &profile, &page, &["--dump-dom"]);
        let dom = String::from_utf8_lossy(&out.stdout);
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        assert_eq!(dom.matches("class=\"series\"").count(), 5, "{dom}");
        assert_eq!(dom.matches("class=\"area\"").count(), 4, "{dom}");
        assert!(dom.contains("id=\"flamegraph\"") && dom.contains("id=\"rss\""));
        let console: Vec<&str> = log.lines().filter(|l| l.contains("CONSOLE")).collect();
        assert!(console.is_empty(), "console messages: {console:#?}");

        // Two clicks on "bytes": smallest first.
        let html = std::fs::read_to_string(&page).unwrap();
        let click = "<script>var b=document.querySelectorAll('#stacks th')[1];b.click();b.click();</script>";
        let clicked = dir.join("clicked.html");
        std::fs::write(
            &clicked,
            html.replace("</body>", &format!("{click}</body>")),
        )
        .unwrap();
        let out = chromium_run(browser, &profile, &clicked, &["--dump-dom"]);
        let dom = String::from_utf8_lossy(&out.stdout);
        let body = dom.split_once("<tbody>").unwrap().1;
        let first: u64 = body
            .split("data-v=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(first, 3 * MIB, "the churn stack's 3 MiB first:\n{body}");

        let shot = std::env::temp_dir().join("memleak-html-report.png");
        let arg = format!("--screenshot={}", shot.display());
        let out = chromium_run(
            browser,
            &profile,
            &page,
            &[&arg, "--window-size=1400,1900", "--hide-scrollbars"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let size = std::fs::metadata(&shot).unwrap().len();
        assert!(size > 20_000, "a {size}-byte screenshot is blank");
        eprintln!("screenshot of the report: {}", shot.display());
        std::fs::remove_dir_all(&dir).ok();
    }
}
