//! The final report of a capture run, for a terminal: the answer first (leaking or not, the
//! one rate, when it runs out), then every stack that matters with the line that allocates,
//! then the run interval by interval. Fits in 100 columns and about one screen.

use std::fmt::Write;

use crate::{
    analysis::{Analysis, MIN_POINTS, Point, StackTrend, Trend, verdict},
    model::{Lost, Measure},
    owners::{Findings, Owner, Root, Scan, each::Owners, native::NativeScan, pools::Pools},
    proc_stats::ProcessContext,
    report::format::{bytes, clip, duration, frame_label, plural, rate, signed_bytes},
};

/// Stacks shown with their frames; then up to MORE_STACKS more, a few lines each.
const TOP_STACKS: usize = 3;
const MORE_STACKS: usize = 12;
/// Owners shown per stack.
const OWNERS_SHOWN: usize = 3;
/// Frames shown per stack: a window starting just inside the deciding frame.
const MAX_FRAMES: usize = 6;
/// Timeline rows shown; longer runs are thinned evenly (the first and last rows stay).
const MAX_ROWS: usize = 12;
/// Columns kept of a frame or a source line.
const MAX_WIDTH: usize = 96;

pub fn render(a: &Analysis) -> String {
    let mut out = String::new();
    // What the stacks hold: allocations not freed, or (growth mode) resident pages.
    let measure = a
        .timeline
        .last()
        .map_or(Measure::Allocations, |s| s.measure);
    headline(&mut out, a, measure.held());
    service(&mut out, a, measure.held());
    rates(&mut out, a, measure.held());
    projection(&mut out, a);
    if let Some(line) = process_line(&a.timeline.context) {
        let _ = writeln!(out, "{}", clip(&line, MAX_WIDTH));
    }
    counts(&mut out, a);
    lost(&mut out, a);
    stacks(&mut out, a, measure.unit());
    if let Some(owners) = &a.timeline.owners {
        walks(&mut out, owners, a.several());
    }
    table(&mut out, a, measure.held());
    classes(&mut out, a);
    out
}

fn headline(out: &mut String, a: &Analysis, held: &str) {
    let v = &a.verdict;
    let last = a.points.last();
    // Since tracing started, as the table's elapsed column; the span the data covers (from
    // the first interval) is what "not enough data" is about.
    let elapsed = last.map_or(0.0, |p| p.elapsed_s);
    let span = last.map_or(0.0, |p| p.elapsed_s - a.points[0].elapsed_s);
    let outstanding = last.map_or(0, |p| p.outstanding_bytes);
    let _ = if !v.conclusive {
        writeln!(
            out,
            "VERDICT: not enough data to judge ({} interval{} over {}; at least {MIN_POINTS} \
             over one interval or more); {} {held}",
            a.points.len(),
            plural(a.points.len()),
            duration(span),
            bytes(outstanding)
        )
    } else if v.leaking {
        // The owner of the fastest growing stack's memory, when the walk found one.
        let growing = a.stacks.iter().find(|s| s.trend == Trend::Growing);
        let owner = a.timeline.owners.as_ref().zip(growing);
        let owner = owner.and_then(|(f, s)| f.of(s.stack_id).next());
        writeln!(
            out,
            "VERDICT: LEAKING {}/min in {} growing stack{} ({} {held} after {}){}",
            signed_bytes(v.leak_rate_bytes_per_min),
            v.growing_stacks,
            plural(v.growing_stacks),
            bytes(outstanding),
            duration(elapsed),
            owner.map_or(String::new(), |o| {
                let held = match o.root {
                    Root::Lost => owner_label(o),
                    _ => format!("held by {}", owner_label(o)),
                };
                format!(",\n         {}", clip(&held, MAX_WIDTH - 9))
            })
        )
    } else {
        writeln!(
            out,
            "VERDICT: no leak: no stack grows steadily over {} ({} {held})",
            duration(elapsed),
            bytes(outstanding)
        )
    };
}

/// Several processes: how many leak, then one line per process.
fn service(out: &mut String, a: &Analysis, held: &str) {
    if !a.several() {
        return;
    }
    let n = a.processes.len();
    let leaking = a.processes.iter().filter(|p| p.leaking).count();
    let _ = writeln!(out, "SERVICE: {leaking} of {n} processes leaking");
    for line in process_lines(a, held) {
        let _ = writeln!(out, "  {line}");
    }
}

/// One line per traced process: `pid 12: LEAKING +1.0 KiB/min in 1 growing stack (…)`.
pub fn process_lines(a: &Analysis, held: &str) -> Vec<String> {
    let line = |p: &verdict::ProcessVerdict| {
        let state = match (&p.exited, p.leaking && a.verdict.conclusive) {
            (Some(how), _) => format!("{how}; its memory was dropped then"),
            (None, true) => format!(
                "LEAKING {}/min in {} growing stack{}",
                signed_bytes(p.leak_rate_bytes_per_min),
                p.growing_stacks,
                plural(p.growing_stacks)
            ),
            (None, false) => "no leak".to_string(),
        };
        let (b, n) = (bytes(p.final_bytes), p.final_count);
        let lost = match p.lost.is_empty() {
            true => String::new(),
            false => format!("; lost: {}", lost_counts(&p.lost).join(", ")),
        };
        format!("pid {}: {state} ({b} {held} in {n} blocks){lost}", p.pid)
    };
    a.processes.iter().map(line).collect()
}

/// The one rate, said once, then every other figure labelled for what it is.
fn rates(out: &mut String, a: &Analysis, held: &str) {
    let v = &a.verdict;
    if v.leaking {
        let _ = writeln!(
            out,
            "  leak rate {}/min: the sum of the growing stacks' rates (the process's rate)",
            signed_bytes(v.leak_rate_bytes_per_min)
        );
    }
    // pid 0: the kernel's allocators (memleak without -p or -c).
    let who = match a.timeline.pid() {
        _ if a.several() => "service".to_string(),
        0 => "kernel".to_string(),
        pid => format!("pid {pid}"),
    };
    let mut line = format!("  {who}: all {held} bytes: {}", rate(v.total));
    if v.total.is_some() {
        line += ", held and churn included";
    }
    let _ = writeln!(out, "{line}");
    if a.points.iter().any(|p| p.process.is_some()) {
        let _ = writeln!(out, "  RSS (the kernel's count): {}", rate(v.rss));
    }
    if v.held_bytes > 0 {
        let _ = writeln!(
            out,
            "  held: {} taken once and never released (not in any rate)",
            bytes(v.held_bytes)
        );
    }
}

/// Time to the limit and the RSS expected in 1 h to 24 h at the leak rate.
fn projection(out: &mut String, a: &Analysis) {
    let v = &a.verdict;
    let Some(p) = &v.projection else { return };
    let _ = match p.seconds {
        Some(s) if v.leaking => writeln!(
            out,
            "  out of memory in about {} at the leak rate ({} left under {})",
            duration(s),
            bytes(p.headroom_bytes),
            p.limit
        ),
        _ => writeln!(out, "  {} left under {}", bytes(p.headroom_bytes), p.limit),
    };
    if v.leaking && !p.rss_at.is_empty() {
        let at: Vec<String> = p
            .rss_at
            .iter()
            .map(|r| format!("{}h {}", r.hours, bytes(r.rss_bytes)))
            .collect();
        let _ = writeln!(out, "  RSS expected at the leak rate in {}", at.join(", "));
    }
}

fn counts(out: &mut String, a: &Analysis) {
    let _ = writeln!(
        out,
        "  stacks: {} growing, {} plateau, {} churn, {} held{}",
        a.count(Trend::Growing),
        a.count(Trend::Plateau),
        a.count(Trend::Churn),
        a.count(Trend::Held),
        match a.count(Trend::Unknown) {
            0 => String::new(),
            n => format!(", {n} not judged"),
        }
    );
}

fn lost(out: &mut String, a: &Analysis) {
    let Some(lost) = a.timeline.last().map(|s| &s.lost).filter(|l| !l.is_empty()) else {
        return;
    };
    let named: Vec<String> = lost_counts(lost)
        .into_iter()
        .chain(lost.unhooked.iter().map(|f| format!("not hooked: {f}")))
        .collect();
    let _ = writeln!(
        out,
        "  warning: the tracer lost data, figures are lower bounds: {}",
        named.join(", ")
    );
}

/// The non-zero counts of `lost`, as `name N`: the field names say what was lost; the
/// tables explain each (text.rs).
fn lost_counts(lost: &Lost) -> Vec<String> {
    let counts = serde_json::to_value(lost).unwrap_or_default();
    counts
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
        .map(|(name, n)| format!("{name} {n}"))
        .collect()
}

/// Every stack the verdict names; when none is, the largest holders.
fn stacks(out: &mut String, a: &Analysis, unit: &str) {
    let named: Vec<&StackTrend> = a.named().collect();
    let (title, shown) = if named.is_empty() {
        let mut largest: Vec<&StackTrend> =
            a.stacks.iter().filter(|s| s.final_bytes() > 0).collect();
        largest.sort_by_key(|s| std::cmp::Reverse(s.final_bytes()));
        ("Largest holders".to_string(), largest)
    } else {
        let bar = format!(
            ">= {} or {:.0}% of all",
            bytes(verdict::NAMED_MIN_BYTES),
            verdict::NAMED_MIN_SHARE * 100.0
        );
        (
            format!("Stacks that matter: growing, or keeping {bar}"),
            named,
        )
    };
    if shown.is_empty() {
        return;
    }
    let listed = shown.len().min(TOP_STACKS + MORE_STACKS);
    let _ = writeln!(out, "\n{title} ({listed} of {}):", shown.len());
    for (i, s) in shown.iter().take(listed).enumerate() {
        stack(out, i, s, unit, a.several());
        pool_share(out, a.timeline.owners.as_ref(), s);
        owners(out, a.timeline.owners.as_ref(), s.stack_id);
    }
    if listed < shown.len() {
        let rest = &shown[listed..];
        let kept: u64 = rest.iter().map(|s| s.kept_bytes).sum();
        let _ = writeln!(
            out,
            "... {} more keep {} (every one in --json)",
            rest.len(),
            bytes(kept)
        );
    }
}

/// `#1  +1.0 MiB/min  R² 0.99  16.0 MiB in 16 allocations  [growing]`, the deciding line,
/// where it parts from a stack with the same one, and (for the first few) a frame window.
fn stack(out: &mut String, i: usize, s: &StackTrend, unit: &str, several: bool) {
    let mut held = format!("{} in {} {unit}", bytes(s.final_bytes()), s.final_count());
    if several {
        held += &format!(" in pid {}", s.info.pid);
    }
    let _ = match (s.trend, s.fit) {
        (Trend::Growing, Some(f)) => writeln!(
            out,
            "#{:<2} {:>12}/min  R² {:.2}  {held}  [growing]",
            i + 1,
            signed_bytes(f.slope_per_min),
            f.r2
        ),
        (Trend::Churn, _) => writeln!(
            out,
            "#{:<2} keeps {} (its floor), up to {}; now {held}  [churn]",
            i + 1,
            bytes(s.kept_bytes),
            bytes(s.peak_bytes)
        ),
        (trend, _) => writeln!(out, "#{:<2} {held}  [{}]", i + 1, trend.name()),
    };
    if let Some(f) = s.info.deciding() {
        let _ = writeln!(out, "    at {}", clip(&frame_label(f), MAX_WIDTH - 7));
        if let (Some(line), Some(text)) = (f.line, &s.info.deciding_source) {
            let _ = writeln!(out, "    {line:>6} | {}", clip(text, MAX_WIDTH - 13));
        }
    }
    if let Some(f) = s.differs_at.map(|k| &s.info.frames[k]) {
        let _ = writeln!(out, "    via {}", clip(&frame_label(f), MAX_WIDTH - 8));
    }
    if i < TOP_STACKS {
        frames(out, s);
    }
}

/// What holds a stack's memory, and the fix, when the owner walk found it.
fn owners(out: &mut String, owners: Option<&Owners>, stack_id: i64) {
    for o in owners
        .into_iter()
        .flat_map(|f| f.of(stack_id))
        .take(OWNERS_SHOWN)
    {
        let _ = writeln!(out, "    held: {}", clip(&owner_label(o), MAX_WIDTH - 10));
        if let Some(advice) = &o.advice {
            let _ = writeln!(out, "    fix:  {}", clip(advice, MAX_WIDTH - 10));
        }
    }
}

/// What the stack holds once pymalloc's arenas are split by what is in them, when it maps
/// arenas or keeps objects in them.
fn pool_share(out: &mut String, owners: Option<&Owners>, s: &StackTrend) {
    let Some(share) = owners.and_then(|o| o.pool_share(s.stack_id)) else {
        return;
    };
    let _ = writeln!(
        out,
        "    by pool: holds {}: maps {} of pymalloc arenas, keeps {} of pymalloc objects",
        bytes(s.attributed_bytes.unwrap_or(s.final_bytes())),
        bytes(share.arena_bytes),
        bytes(share.kept_bytes)
    );
}

/// "59 × bytearray (1.0 MiB each) in list `_leak_store` of module `__main__`".
pub fn owner_label(o: &Owner) -> String {
    let each = bytes(o.bytes / o.count.max(1));
    format!("{} × {} ({each} each) {}", o.count, o.type_name, o.held_by)
}

/// How much each process's walks read (`pid N:` first when several are traced), and the
/// processes a bound left out.
fn walks(out: &mut String, owners: &Owners, several: bool) {
    for p in &owners.processes {
        if several {
            let _ = writeln!(out, "  pid {}:", p.pid);
        }
        let found: &Findings = &p.found;
        if found.scan.gc_objects > 0 {
            scan(out, &found.scan, found.pools.as_ref());
        } else {
            // No Python walk, or none that listed anything: why.
            for skipped in &found.scan.skipped {
                let _ = writeln!(out, "  owners: {}", clip(skipped, MAX_WIDTH - 10));
            }
        }
        if let Some(native) = &found.native {
            native_scan(out, native);
        }
    }
    for skipped in &owners.skipped {
        let _ = writeln!(out, "  owners: {}", clip(skipped, MAX_WIDTH - 10));
    }
}

/// How much of the live process the native scan read.
fn native_scan(out: &mut String, s: &NativeScan) {
    let _ = writeln!(
        out,
        "  native owners: {} of {} tracked blocks referenced, {} scanned in {} mappings in {} ms \
         ({} ms CPU){}\n    not read: registers, {} of dead stack (below blocked threads' tops)",
        s.reachable,
        s.blocks,
        bytes(s.bytes_scanned),
        s.regions,
        s.elapsed_ms,
        s.cpu_ms,
        if s.complete {
            ""
        } else {
            "; cut short by its bound: lost blocks not said"
        },
        bytes(s.dead_stack_bytes)
    );
}

/// How much the owner walk read of the live process, and what it left out.
fn scan(out: &mut String, s: &Scan, pools: Option<&Pools>) {
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
    if let Some(p) = pools {
        let _ = writeln!(
            out,
            "    pymalloc: {} arenas ({}): {} in use ({} in objects found), {} free{}",
            p.arenas,
            bytes(p.arena_bytes),
            bytes(p.used_bytes),
            bytes(p.found_bytes),
            bytes(p.free_bytes),
            match p.not_arenas {
                0 => String::new(),
                n => format!("; {n} blocks of an arena's size did not read as arenas"),
            }
        );
    }
    for skipped in &s.skipped {
        let _ = writeln!(out, "    skipped: {skipped}");
    }
}

/// A window of the stack's frames: from the one just inside the deciding frame outwards.
fn frames(out: &mut String, s: &StackTrend) {
    let frames = &s.info.frames;
    let first = s.info.deciding_frame.unwrap_or(0).saturating_sub(1);
    let last = (first + MAX_FRAMES).min(frames.len());
    if first > 0 {
        let _ = writeln!(out, "        ... {first} inner frames");
    }
    for (k, f) in frames.iter().enumerate().take(last).skip(first) {
        let mark = if Some(k) == s.info.deciding_frame {
            '>'
        } else {
            ' '
        };
        let _ = writeln!(out, "      {mark} {}", clip(&frame_label(f), MAX_WIDTH - 8));
    }
    if last < frames.len() {
        let _ = writeln!(out, "        ... {} outer frames", frames.len() - last);
    }
}

/// The rows shown of `n`: all, or MAX_ROWS spread evenly with the first and the last.
fn rows_shown(n: usize) -> Vec<usize> {
    if n <= MAX_ROWS {
        return (0..n).collect();
    }
    let mut r: Vec<usize> = (0..MAX_ROWS - 1)
        .map(|k| k * (n - 1) / (MAX_ROWS - 1))
        .collect();
    r.push(n - 1);
    r
}

/// `+1.0 MiB` per minute from `q` to `p`; `-` over less than an interval.
fn change(p: &Point, q: &Point, value: impl Fn(&Point) -> Option<u64>, min_span_s: f64) -> String {
    let (Some(a), Some(b)) = (value(p), value(q)) else {
        return "-".into();
    };
    let x = [q.elapsed_s, p.elapsed_s];
    crate::analysis::Fit::of(&x, &[b as f64, a as f64], min_span_s)
        .map_or("-".into(), |f| signed_bytes(f.slope_per_min))
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
    let rows = rows_shown(a.points.len());
    let rss = |x: &Point| x.process.as_ref().map(|s| s.rss_bytes);
    let min_span = a.min_rate_span_s();
    let mut prev: Option<&Point> = None;
    for &i in &rows {
        let p = &a.points[i];
        // Rates between the rows shown, so a thinned table still adds up.
        let (rate, rss_rate) = match prev.filter(|_| a.verdict.conclusive) {
            Some(q) => (
                change(p, q, |x| Some(x.outstanding_bytes), min_span),
                change(p, q, rss, min_span),
            ),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:>9}  {:>11}  {:>13}  {:>11}  {:>13}",
            duration(p.elapsed_s),
            bytes(p.outstanding_bytes),
            rate,
            rss(p).map_or("-".into(), bytes),
            rss_rate
        );
        prev = Some(p);
    }
    if rows.len() < a.points.len() {
        let _ = writeln!(
            out,
            "({} of {} intervals shown)",
            rows.len(),
            a.points.len()
        );
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

#[cfg(test)]
pub mod tests {
    use super::*;
    use crate::analysis::tests::{cache, churn, held, leak, timeline};
    use crate::owners::Root;

    /// What the owner walk finds for the user's service (one process): the leak's
    /// bytearrays in a module list.
    pub fn owners_of(stack_id: i64) -> Owners {
        let found = Findings {
            pools: None,
            native: None,
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
        };
        Owners {
            processes: vec![crate::owners::each::ProcessFindings { pid: 1, found }],
            skipped: Vec::new(),
        }
    }

    #[test]
    fn verdict_and_stack_name_the_owner_and_the_fix() {
        let mut t = timeline(&[churn(3), leak(1)], 5.0, 25);
        t.timeline.owners = Some(owners_of(1));
        let text = render(&t.analyze());
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
        let text = render(&t.analyze());
        let first = text.lines().next().unwrap();
        assert!(
            first.contains("LEAKING +120.0 MiB/min in 1 growing stack"),
            "{text}"
        );
        assert!(text.contains("out of memory in about 2h"), "{text}");
        assert!(
            text.contains("leak rate +120.0 MiB/min: the sum of the growing stacks' rates"),
            "{text}"
        );
        assert!(text.contains("all outstanding bytes: +"), "{text}");
        assert!(
            text.contains("RSS expected at the leak rate in 1h "),
            "{text}"
        );
        assert!(text.contains(", 24h "), "{text}");
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
    fn two_samples_give_no_rate() {
        let text = render(&timeline(&[leak(1)], 1.0, 2).analyze());
        assert!(text.starts_with("VERDICT: not enough data"), "{text}");
        assert!(!text.contains("B/min"), "{text}");
        assert!(
            text.contains("all outstanding bytes: no rate (not enough data)"),
            "{text}"
        );
    }

    #[test]
    fn held_block_is_named_and_stacks_told_apart() {
        let t = timeline(&[leak(1), held(2, 1.0)], 1.0, 10);
        let text = render(&t.analyze());
        assert!(text.contains("  held: 5.0 MiB taken once"), "{text}");
        assert!(text.contains("5.0 MiB in 1 allocations  [held]"), "{text}");
        assert!(
            text.contains("1 growing, 0 plateau, 0 churn, 1 held"),
            "{text}"
        );
    }

    #[test]
    fn quiet_process_says_no_leak() {
        let t = timeline(&[cache(2), churn(3)], 2.0, 20);
        let text = render(&t.analyze());
        assert!(text.starts_with("VERDICT: no leak"), "{text}");
        // The churn stack's memory came and went: only the cache is named.
        assert!(text.contains("Stacks that matter"), "{text}");
        assert!(text.contains("(1 of 1):\n#1  40.0 MiB in"), "{text}");
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
        use crate::{
            analysis::tests::{Synthetic, frame},
            model::Frame,
        };
        let mut frames: Vec<Frame> = (0..5)
            .map(|i| frame(&format!("runtime{i}"), "/libc/x.c", i + 1, "libc.so.6"))
            .collect();
        frames.extend((0..7).map(|i| frame(&format!("app{i}"), "/src/app.c", i + 10, "app")));
        let leak = Synthetic {
            id: 9,
            frames,
            bytes_at: Box::new(|t| (t as u64 + 1) << 20),
            block: 4096,
        };
        let text = render(&timeline(&[leak], 1.0, 10).analyze());
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
        t.timeline.snapshots[3].lost.stack_walks_failed = 7;
        let text = render(&t.analyze());
        assert!(
            text.contains("lower bounds: stack_walks_failed 7\n"),
            "{text}"
        );
    }
}
