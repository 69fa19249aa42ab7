//! The final report of a capture run, for a terminal: the answer first (leaking or not, how
//! fast, when it runs out), then the stacks that grow with the line that allocates, then the
//! run interval by interval. Fits in 100 columns and about one screen.

use std::fmt::Write;

use crate::{
    capture::{Analysis, StackTrend, Timeline, Trend},
    model::{Frame, FrameKind, Measure},
    owners::{Findings, Owner, Scan},
    proc_stats::ProcessContext,
};

/// Stacks shown with their frames; then up to MORE_STACKS more, one line each.
const TOP_STACKS: usize = 3;
const MORE_STACKS: usize = 5;
/// Owners shown per stack.
const OWNERS_SHOWN: usize = 3;
/// Frames shown per stack: a window starting just inside the deciding frame.
const MAX_FRAMES: usize = 6;
/// Timeline rows shown; longer runs are thinned evenly (the first and last rows stay).
const MAX_ROWS: usize = 12;
/// Columns kept of a frame or a source line.
const MAX_WIDTH: usize = 96;

pub fn render(timeline: &Timeline) -> String {
    let a = timeline.analyze();
    let mut out = String::new();
    // What the stacks hold: allocations not freed, or (growth mode) resident pages.
    let measure = timeline.last().map_or(Measure::Allocations, |s| s.measure);
    verdict(&mut out, timeline, &a, measure.held());
    stacks(&mut out, &a, measure.unit(), timeline.owners.as_ref());
    if let Some(found) = &timeline.owners {
        scan(&mut out, &found.scan);
    }
    table(&mut out, &a, measure.held());
    classes(&mut out, &a);
    out
}

fn verdict(out: &mut String, t: &Timeline, a: &Analysis, held: &str) {
    let v = &a.verdict;
    let last = a.points.last();
    let span = last.map_or(0.0, |p| p.elapsed_s);
    let outstanding = last.map_or(0, |p| p.outstanding_bytes);
    // pid 0: the kernel's allocators (memleak without -p or -c).
    let who = match t.pid() {
        0 => "kernel".to_string(),
        pid => format!("pid {pid}"),
    };
    if !v.conclusive {
        let _ = writeln!(
            out,
            "VERDICT: not enough intervals to judge ({} of at least {}); \
             {} {held}",
            a.points.len(),
            crate::capture::MIN_POINTS,
            bytes(outstanding)
        );
    } else if v.leaking {
        // The owner of the fastest growing stack's memory, when the walk found one.
        let owner = t
            .owners
            .as_ref()
            .and_then(|f| f.of(a.growing().next()?.stack_id).next());
        let _ = writeln!(
            out,
            "VERDICT: LEAKING {}/min in {} growing stack{} \
             ({} {held} after {}){}",
            signed_bytes(v.leak_rate_bytes_per_min),
            v.growing_stacks,
            plural(v.growing_stacks),
            bytes(outstanding),
            duration(span),
            owner.map_or(String::new(), |o| {
                let held = format!("held by {}", owner_label(o));
                format!(",\n         {}", clip(&held, MAX_WIDTH - 9))
            })
        );
    } else {
        let _ = writeln!(
            out,
            "VERDICT: no leak: no stack grows steadily over {} \
             ({} {held}, {}/min overall)",
            duration(span),
            bytes(outstanding),
            signed_bytes(v.total.slope_per_min)
        );
    }
    let mut rates = format!(
        "  {who}: {held} {}/min (R² {:.2})",
        signed_bytes(v.total.slope_per_min),
        v.total.r2
    );
    if let Some(rss) = v.rss {
        let _ = write!(
            rates,
            ", RSS {}/min (R² {:.2})",
            signed_bytes(rss.slope_per_min),
            rss.r2
        );
    }
    let _ = writeln!(out, "{rates}");
    if let Some(p) = &v.projection {
        match p.seconds {
            Some(s) if v.leaking => {
                let _ = writeln!(
                    out,
                    "  out of memory in about {} at that rate ({} left under {})",
                    duration(s),
                    bytes(p.headroom_bytes),
                    p.limit
                );
            }
            _ => {
                let _ = writeln!(out, "  {} left under {}", bytes(p.headroom_bytes), p.limit);
            }
        }
    }
    if let Some(line) = process_line(&t.context) {
        let _ = writeln!(out, "{}", clip(&line, MAX_WIDTH));
    }
    let count = |trend| a.stacks.iter().filter(|s| s.trend == trend).count();
    let _ = writeln!(
        out,
        "  stacks: {} growing, {} plateau, {} churn{}",
        count(Trend::Growing),
        count(Trend::Plateau),
        count(Trend::Churn),
        match count(Trend::Unknown) {
            0 => String::new(),
            n => format!(", {n} not judged"),
        }
    );
    if let Some(lost) = t.last().map(|s| &s.lost).filter(|l| !l.is_empty()) {
        // The field names say what was lost; the tables explain each (text.rs).
        let counts = serde_json::to_value(lost).unwrap_or_default();
        let named: Vec<String> = counts
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  warning: the tracer lost data, figures are lower bounds: {}",
            named.join(", ")
        );
    }
}

fn stacks(out: &mut String, a: &Analysis, unit: &str, owners: Option<&Findings>) {
    let growing: Vec<&StackTrend> = a.growing().collect();
    let (title, shown): (&str, Vec<&StackTrend>) = if growing.is_empty() {
        let mut largest: Vec<&StackTrend> =
            a.stacks.iter().filter(|s| s.final_bytes() > 0).collect();
        largest.sort_by_key(|s| std::cmp::Reverse(s.final_bytes()));
        ("Largest holders", largest)
    } else {
        ("Growing stacks", growing)
    };
    if shown.is_empty() {
        return;
    }
    let listed = shown.len().min(TOP_STACKS + MORE_STACKS);
    let _ = writeln!(out, "\n{title} ({listed} of {}):", shown.len());
    for (i, s) in shown.iter().take(listed).enumerate() {
        let _ = writeln!(
            out,
            "#{:<2} {:>12}/min  R² {:.2}  {} in {} {unit}  [{}]",
            i + 1,
            signed_bytes(s.fit.slope_per_min),
            s.fit.r2,
            bytes(s.final_bytes()),
            s.final_count(),
            s.trend.name()
        );
        if let Some(f) = s.deciding() {
            let _ = writeln!(out, "    at {}", clip(&frame_label(f), MAX_WIDTH - 7));
            if let (Some(line), Some(text)) = (f.line, s.deciding_source) {
                let _ = writeln!(out, "    {line:>6} | {}", clip(text, MAX_WIDTH - 13));
            }
        }
        for o in owners
            .into_iter()
            .flat_map(|f| f.of(s.stack_id))
            .take(OWNERS_SHOWN)
        {
            let _ = writeln!(out, "    held: {}", clip(&owner_label(o), MAX_WIDTH - 10));
            if let Some(advice) = &o.advice {
                let _ = writeln!(out, "    fix:  {}", clip(advice, MAX_WIDTH - 10));
            }
        }
        if i < TOP_STACKS {
            frames(out, s);
        }
    }
}

/// "59 × bytearray (1.0 MiB each) in list `_leak_store` of module `__main__`".
pub fn owner_label(o: &Owner) -> String {
    let each = bytes(o.bytes / o.count.max(1));
    format!("{} × {} ({each} each) {}", o.count, o.type_name, o.held_by)
}

/// How much the owner walk read of the live process, and what it left out.
fn scan(out: &mut String, s: &Scan) {
    let _ = writeln!(
        out,
        "  owners: read from the live process, {} objects ({} GC-tracked) in {} ms \
         ({} ms CPU)\n    {} of {} blocks found held by an object{}",
        s.objects_read,
        s.gc_objects,
        s.elapsed_ms,
        s.cpu_ms,
        s.blocks_owned,
        s.blocks,
        if s.complete { "" } else { "; incomplete" }
    );
    for skipped in &s.skipped {
        let _ = writeln!(out, "    skipped: {skipped}");
    }
}

/// A window of the stack's frames: from the one just inside the deciding frame outwards.
fn frames(out: &mut String, s: &StackTrend) {
    let first = s.deciding_frame.unwrap_or(0).saturating_sub(1);
    let last = (first + MAX_FRAMES).min(s.frames.len());
    if first > 0 {
        let _ = writeln!(out, "        ... {first} inner frames");
    }
    for (k, f) in s.frames.iter().enumerate().take(last).skip(first) {
        let mark = if Some(k) == s.deciding_frame {
            '>'
        } else {
            ' '
        };
        let _ = writeln!(out, "      {mark} {}", clip(&frame_label(f), MAX_WIDTH - 8));
    }
    if last < s.frames.len() {
        let _ = writeln!(out, "        ... {} outer frames", s.frames.len() - last);
    }
}

fn table(out: &mut String, a: &Analysis, held: &str) {
    if a.points.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\n{:>9}  {:>11}  {:>13}  {:>11}  {:>13}",
        "elapsed", held, "rate/min", "RSS", "RSS rate/min"
    );
    let n = a.points.len();
    let rows: Vec<usize> = if n <= MAX_ROWS {
        (0..n).collect()
    } else {
        let mut r: Vec<usize> = (0..MAX_ROWS - 1)
            .map(|k| k * (n - 1) / (MAX_ROWS - 1))
            .collect();
        r.push(n - 1);
        r
    };
    let mut prev: Option<usize> = None;
    for &i in &rows {
        let p = &a.points[i];
        // Rates between the rows shown, so a thinned table still adds up.
        let (rate, rss_rate) = match prev {
            Some(j) => {
                let q = &a.points[j];
                let dt = (p.elapsed_s - q.elapsed_s) / 60.0;
                let rss = |x: &crate::capture::Point| x.process.as_ref().map(|s| s.rss_bytes);
                (
                    signed_bytes((p.outstanding_bytes as f64 - q.outstanding_bytes as f64) / dt),
                    match (rss(p), rss(q)) {
                        (Some(a), Some(b)) => signed_bytes((a as f64 - b as f64) / dt),
                        _ => "-".into(),
                    },
                )
            }
            None => ("-".into(), "-".into()),
        };
        let rss = p
            .process
            .as_ref()
            .map_or("-".into(), |s| bytes(s.rss_bytes));
        let _ = writeln!(
            out,
            "{:>9}  {:>11}  {:>13}  {:>11}  {:>13}",
            duration(p.elapsed_s),
            bytes(p.outstanding_bytes),
            rate,
            rss,
            rss_rate
        );
        prev = Some(i);
    }
    if rows.len() < n {
        let _ = writeln!(out, "({} of {n} intervals shown)", rows.len());
    }
}

fn classes(out: &mut String, a: &Analysis) {
    if a.classes.is_empty() {
        return;
    }
    let _ = writeln!(out, "\nOutstanding by class:");
    for c in a.classes.iter().take(10) {
        let _ = writeln!(out, "  {:>11}  {}", bytes(c.bytes), c.class.name());
    }
}

/// `  process: ./app --flag; Python 3.11 with 4 C extensions; cgroup /svc limit 2.0 GiB`.
fn process_line(ctx: &ProcessContext) -> Option<String> {
    let mut parts = Vec::new();
    if !ctx.cmdline.is_empty() {
        parts.push(ctx.cmdline.join(" "));
    }
    let extensions = ctx.objects.iter().filter(|o| o.python_extension).count();
    match (&ctx.python_version, extensions) {
        (Some(v), 0) => parts.push(format!("Python {v}")),
        (Some(v), n) => parts.push(format!("Python {v} with {n} C extension{}", plural(n))),
        (None, 0) => {}
        (None, n) => parts.push(format!("{n} Python C extension{}", plural(n))),
    }
    if let Some(cg) = &ctx.cgroup {
        parts.push(format!(
            "cgroup {} limit {}",
            cg.path,
            bytes(cg.limit_bytes)
        ));
    }
    (!parts.is_empty()).then(|| format!("  process: {}", parts.join("; ")))
}

/// `function+0x1a (file:line) [module]`, with what is known.
pub fn frame_label(f: &Frame) -> String {
    let mut s = match (&f.function, f.kind) {
        (Some(name), FrameKind::Python) => name.clone(),
        (Some(name), FrameKind::Native) => format!("{name}+{:#x}", f.function_offset),
        (None, _) => match &f.module {
            Some(m) => format!("{m}+{:#x}", f.module_offset),
            None => format!("{:#x}", f.addr),
        },
    };
    if let (Some(file), Some(line)) = (&f.file, f.line) {
        let _ = write!(s, " ({file}:{line})");
    }
    if f.inlined {
        s.push_str(" (inlined)");
    }
    if let (Some(m), Some(_)) = (&f.module, &f.function) {
        let _ = write!(s, " [{m}]");
    }
    s
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        return s.to_string();
    }
    let mut t: String = s.chars().take(width.saturating_sub(3)).collect();
    t.push_str("...");
    t
}

/// 1.5 MiB, 512 B.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// +1.5 MiB, -512 B.
pub fn signed_bytes(b: f64) -> String {
    let sign = if b < 0.0 { '-' } else { '+' };
    format!("{sign}{}", bytes(b.abs().round() as u64))
}

/// 45s, 2m05s, 3h20m, 4d2h.
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{:.1}s", seconds.max(0.0)),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::capture::tests::{cache, churn, leak, timeline};
    use crate::owners::Root;

    /// What the owner walk finds for the user's service: the leak's bytearrays in a module list.
    pub fn owners_of(stack_id: i64) -> Findings {
        Findings {
            owners: vec![Owner {
                stack_id,
                type_name: "bytearray".into(),
                count: 59,
                bytes: 59 << 20,
                held_by: "in list `_leak_store` of module `__main__`".into(),
                root: Root::ModuleGlobal,
                advice: Some(
                    "unbounded module-level list `_leak_store`: bound it or evict old entries"
                        .into(),
                ),
            }],
            scan: Scan {
                gc_objects: 1000,
                objects_read: 1200,
                blocks: 59,
                blocks_owned: 59,
                complete: true,
                ..Default::default()
            },
        }
    }

    #[test]
    fn verdict_and_stack_name_the_owner_and_the_fix() {
        let mut t = timeline(&[churn(3), leak(1)], 5.0, 25);
        t.owners = Some(owners_of(1));
        let text = render(&t);
        let second = text.lines().nth(1).unwrap();
        assert_eq!(
            second.trim(),
            "held by 59 × bytearray (1.0 MiB each) in list `_leak_store` of module `__main__`",
            "{text}"
        );
        assert!(
            text.contains("    fix:  unbounded module-level list `_leak_store`: bound it"),
            "{text}"
        );
        assert!(
            text.contains("owners: read from the live process, 1200 objects"),
            "{text}"
        );
        assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
    }

    #[test]
    fn leak_report_leads_with_the_verdict_and_the_line() {
        let t = timeline(&[churn(3), cache(2), leak(1)], 5.0, 25);
        let text = render(&t);
        let first = text.lines().next().unwrap();
        assert!(
            first.contains("LEAKING +120.0 MiB/min in 1 growing stack"),
            "{text}"
        );
        assert!(text.contains("out of memory in about 2h"), "{text}");
        assert!(
            text.contains("at leak_one+0x0 (/src/leaker.c:12) [leaker]"),
            "{text}"
        );
        assert!(text.contains("1 growing, 1 plateau, 1 churn"), "{text}");
        assert!(text.lines().all(|l| l.chars().count() <= 100), "{text}");
        // 25 intervals thinned to 12 rows.
        assert!(text.contains("(12 of 25 intervals shown)"), "{text}");
        assert!(text.lines().count() < 50, "{text}");
    }

    #[test]
    fn quiet_process_says_no_leak() {
        let t = timeline(&[cache(2), churn(3)], 2.0, 20);
        let text = render(&t);
        assert!(text.starts_with("VERDICT: no leak"), "{text}");
        assert!(text.contains("Largest holders (2 of 2)"), "{text}");
        assert!(!text.contains("out of memory"), "{text}");
    }

    #[test]
    fn process_line_names_python_and_extensions() {
        let object = |path: &str| crate::proc_stats::SharedObject {
            path: path.into(),
            start: 0,
            end: 0,
            file_offset: 0,
            build_id: None,
            python_extension: crate::proc_stats::is_python_extension(path),
        };
        let ctx = ProcessContext {
            pid: 7,
            cmdline: vec!["python3.11".into(), "app.py".into()],
            objects: vec![
                object("/usr/lib/libpython3.11.so.1.0"),
                object("/x/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so"),
            ],
            python_version: Some("3.11".into()),
            cgroup: None,
        };
        assert_eq!(
            process_line(&ctx).unwrap(),
            "  process: python3.11 app.py; Python 3.11 with 1 C extension"
        );
        assert_eq!(process_line(&ProcessContext::default()), None);
    }

    #[test]
    fn deep_stack_shows_a_window_around_the_deciding_frame() {
        use crate::capture::tests::{Synthetic, frame};
        let mut frames: Vec<Frame> = (0..5)
            .map(|i| frame(&format!("runtime{i}"), "/libc/x.c", i + 1, "libc.so.6"))
            .collect();
        frames.extend((0..7).map(|i| frame(&format!("app{i}"), "/src/app.c", i + 10, "app")));
        let leak = Synthetic {
            id: 9,
            frames,
            bytes_at: Box::new(|t| (t as u64 + 1) << 20),
        };
        let text = render(&timeline(&[leak], 1.0, 10));
        let window: Vec<&str> = text
            .lines()
            .skip_while(|l| !l.contains("inner frames"))
            .take(8)
            .collect();
        assert_eq!(window[0].trim(), "... 4 inner frames", "{text}");
        assert!(window[1].contains("runtime4"), "{text}");
        assert!(
            window[2]
                .trim_start()
                .starts_with("> app0+0x0 (/src/app.c:10)"),
            "{text}"
        );
        assert!(window[6].contains("app4"), "{text}");
        assert_eq!(window[7].trim(), "... 2 outer frames", "{text}");
    }

    #[test]
    fn losses_are_named() {
        let mut t = timeline(&[leak(1)], 1.0, 4);
        t.snapshots[3].lost.stack_walks_failed = 7;
        let text = render(&t);
        assert!(
            text.contains("lower bounds: stack_walks_failed 7\n"),
            "{text}"
        );
    }

    #[test]
    fn formats_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(signed_bytes(-1536.0), "-1.5 KiB");
        assert_eq!(duration(125.0), "2m05s");
        assert_eq!(duration(4.0 * 3600.0 + 120.0), "4h02m");
    }
}
