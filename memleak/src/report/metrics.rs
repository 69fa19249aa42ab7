//! `/metrics` of `--listen`: the run's analysis as Prometheus series, in the text exposition
//! format 0.0.4 or in OpenMetrics 1.0 (what Prometheus asks for first). Pure: the caller
//! measures memleak's own usage and hands it in.
//!
//! The number of series stays bounded: the top `top` stacks get their own, the rest add up
//! to one `stack="other"` series. A stack's `stack` label is a hash of its frames' names and
//! files, so it is the same after a restart of memleak or of the target (addresses are not).

use std::{collections::HashMap, fmt::Write};

use crate::{
    analysis::{Analysis, StackTrend, Trend},
    model::{Frame, Lost, Snapshot},
    timeline::Timeline,
};

/// Which text format the scraper asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Prometheus,
    OpenMetrics,
}

impl Format {
    /// The format an `Accept` header prefers: OpenMetrics when it is listed at all (Prometheus
    /// lists it first), else the 0.0.4 text format.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// memleak's own footprint, measured by the caller.
#[derive(Clone, Copy, Debug, Default)]
pub struct SelfUsage {
    pub cpu_seconds: f64,
    pub rss_bytes: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
}

/// One metric family: its samples as (labels, value).
struct Family {
    /// Without `_total` for a counter (OpenMetrics names the family so).
    name: &'static str,
    kind: Kind,
    help: &'static str,
    samples: Vec<(String, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: Kind, help: &'static str) -> Family {
        Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        }
    }

    fn with(mut self, labels: &[(&str, &str)], value: f64) -> Family {
        self.add(labels, value);
        self
    }

    fn add(&mut self, labels: &[(&str, &str)], value: f64) {
        let labels: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape_label(v)))
            .collect();
        self.samples.push((labels.join(","), value));
    }
}

/// Every series of the run so far, rendered in `format`.
pub fn render(analysis: &Analysis, top: usize, own: SelfUsage, format: Format) -> String {
    let timeline = analysis.timeline;
    let mut families = process_families(timeline, analysis);
    families.extend(stack_families(timeline.pid(), &analysis.stacks, top));
    if let Some(last) = timeline.last() {
        families.extend(lost_families(timeline.pid(), last));
    }
    families.extend(self_families(timeline, own));
    exposition(&families, format)
}

fn process_families(timeline: &Timeline, a: &Analysis) -> Vec<Family> {
    let Some(last) = timeline.last() else {
        return Vec::new();
    };
    let pid = timeline.pid().to_string();
    let pid = [("pid", pid.as_str())];
    let v = &a.verdict;
    let mut growth = Family::new(
        "memleak_process_growth_rate_bytes_per_second",
        Kind::Gauge,
        "Least-squares rate of all outstanding bytes (held and churn included) over the kept \
         timeline; not the leak rate.",
    );
    // No sample without enough data for a rate.
    if let Some(total) = v.total {
        growth.add(&pid, total.slope_per_min / 60.0);
    }
    let mut families = vec![
        Family::new(
            "memleak_process_outstanding_bytes",
            Kind::Gauge,
            "Bytes the traced process holds, as memleak counts them.",
        )
        .with(&pid, last.total_bytes as f64),
        Family::new(
            "memleak_process_outstanding_blocks",
            Kind::Gauge,
            "Blocks (allocations, or pages in growth mode) the traced process holds.",
        )
        .with(&pid, last.total_count as f64),
        growth,
        Family::new(
            "memleak_process_leak_rate_bytes_per_second",
            Kind::Gauge,
            "The leak rate, the process's one rate: the sum of the rates of the stacks judged growing.",
        )
        .with(&pid, v.leak_rate_bytes_per_min / 60.0),
        Family::new(
            "memleak_process_growing_stacks",
            Kind::Gauge,
            "Stacks judged growing (a leak).",
        )
        .with(&pid, v.growing_stacks as f64),
    ];
    let verdict = match (v.conclusive, v.leaking) {
        (false, _) => "inconclusive",
        (true, true) => "leaking",
        (true, false) => "not_leaking",
    };
    let mut states = Family::new(
        "memleak_process_verdict",
        Kind::Gauge,
        "1 for the current verdict (leaking, not_leaking, inconclusive), 0 for the others.",
    );
    for state in ["leaking", "not_leaking", "inconclusive"] {
        states.add(
            &[pid[0], ("verdict", state)],
            f64::from(u8::from(state == verdict)),
        );
    }
    families.push(states);
    if let Some(rss) = a.points.last().and_then(|p| p.process.as_ref()) {
        families.push(
            Family::new(
                "memleak_process_resident_bytes",
                Kind::Gauge,
                "Resident set size of the traced process (VmRSS).",
            )
            .with(&pid, rss.rss_bytes as f64),
        );
    }
    families
}

/// Stacks with the same stable id, summed (two tracer stacks can differ only in addresses).
#[derive(Default)]
struct Group {
    id: String,
    class: &'static str,
    frame: String,
    bytes: u64,
    blocks: u64,
    rate_per_min: f64,
    growing: bool,
}

impl Group {
    fn add(&mut self, s: &StackTrend) {
        self.bytes += s.final_bytes();
        self.blocks += s.final_count();
        self.rate_per_min += s.rate();
        self.growing |= s.trend == Trend::Growing;
    }
}

/// The stacks in the analysis's order (growing first, fastest first, then the largest),
/// grouped by stable id: the first `top` groups, then the rest summed as "other".
fn top_groups(stacks: &[StackTrend], top: usize) -> (Vec<Group>, Option<Group>) {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for s in stacks {
        let id = stable_id(&s.info.frames);
        let k = *index.entry(id.clone()).or_insert_with(|| {
            groups.push(Group {
                id,
                class: s.info.class.map_or("", |c| c.name()),
                frame: s.info.deciding().map(frame_label).unwrap_or_default(),
                ..Default::default()
            });
            groups.len() - 1
        });
        groups[k].add(s);
    }
    if groups.len() <= top {
        return (groups, None);
    }
    let rest = groups.split_off(top);
    let mut other = Group {
        id: "other".into(),
        ..Default::default()
    };
    for g in rest {
        other.bytes += g.bytes;
        other.blocks += g.blocks;
        other.rate_per_min += g.rate_per_min;
        other.growing |= g.growing;
    }
    (groups, Some(other))
}

fn stack_families(pid: u32, stacks: &[StackTrend], top: usize) -> Vec<Family> {
    let (groups, other) = top_groups(stacks, top);
    let mut families = [
        Family::new(
            "memleak_stack_outstanding_bytes",
            Kind::Gauge,
            "Bytes held by one call path (stack other: every stack beyond the top N, summed).",
        ),
        Family::new(
            "memleak_stack_outstanding_blocks",
            Kind::Gauge,
            "Blocks held by one call path.",
        ),
        Family::new(
            "memleak_stack_growth_rate_bytes_per_second",
            Kind::Gauge,
            "Least-squares rate of the call path's outstanding bytes over the kept timeline.",
        ),
        Family::new(
            "memleak_stack_growing",
            Kind::Gauge,
            "1 if memleak judges the call path growing (a leak).",
        ),
    ];
    let pid = pid.to_string();
    for g in groups.iter().chain(&other) {
        let labels = [
            ("pid", pid.as_str()),
            ("stack", g.id.as_str()),
            ("class", g.class),
            ("frame", g.frame.as_str()),
        ];
        let values = [
            g.bytes as f64,
            g.blocks as f64,
            g.rate_per_min / 60.0,
            f64::from(u8::from(g.growing)),
        ];
        for (f, v) in families.iter_mut().zip(values) {
            f.add(&labels, v);
        }
    }
    families.into()
}

/// Every count of `Lost`, by its field name (a count added there is exported too), in all
/// and per traced process, and the entry points left unhooked: what the text and JSON
/// reports say was lost.
fn lost_families(pid: u32, last: &Snapshot) -> [Family; 3] {
    let mut events = Family::new(
        "memleak_lost_events",
        Kind::Counter,
        "Events the tracer could not record, by reason (its figures undercount by these).",
    );
    add_lost(&mut events, &[], &last.lost);
    let mut per_process = Family::new(
        "memleak_process_lost_events",
        Kind::Counter,
        "memleak_lost_events per traced process (pid 0: no process known to the tracer).",
    );
    for p in &last.processes {
        add_lost(&mut per_process, &[("pid", &p.pid.to_string())], &p.lost);
    }
    let unhooked = Family::new(
        "memleak_unhooked_functions",
        Kind::Gauge,
        "Allocator entry points the process may call that memleak did not hook (the reports \
         name them): what they hand out is missing from every figure.",
    )
    .with(
        &[("pid", &pid.to_string())],
        last.lost.unhooked.len() as f64,
    );
    [events, per_process, unhooked]
}

/// One series per count of `lost`, labelled `labels` and its reason.
fn add_lost(family: &mut Family, labels: &[(&str, &str)], lost: &Lost) {
    let counts = serde_json::to_value(lost).unwrap_or_default();
    for (reason, n) in counts.as_object().into_iter().flatten() {
        if let Some(n) = n.as_u64() {
            let mut labels = labels.to_vec();
            labels.push(("reason", reason));
            family.add(&labels, n as f64);
        }
    }
}

fn self_families(timeline: &Timeline, own: SelfUsage) -> [Family; 4] {
    [
        Family::new(
            "memleak_intervals",
            Kind::Counter,
            "Intervals memleak has taken since it started.",
        )
        .with(&[], timeline.intervals() as f64),
        Family::new(
            "memleak_timeline_points",
            Kind::Gauge,
            "Intervals kept in memory (older ones are thinned).",
        )
        .with(&[], timeline.snapshots.len() as f64),
        Family::new(
            "memleak_self_cpu_seconds",
            Kind::Counter,
            "CPU time memleak itself used (user and system).",
        )
        .with(&[], own.cpu_seconds),
        Family::new(
            "memleak_self_resident_bytes",
            Kind::Gauge,
            "Resident set size of memleak itself.",
        )
        .with(&[], own.rss_bytes as f64),
    ]
}

/// `function file` of the deciding frame: no line or offset, so it does not change with the
/// stacks a stable id groups.
fn frame_label(f: &Frame) -> String {
    let name = f.function.as_deref().or(f.module.as_deref()).unwrap_or("?");
    match &f.file {
        Some(file) => format!("{name} {file}"),
        None => name.to_string(),
    }
}

/// 8 hex digits of a CRC-32 of each frame's function (else module) and file.
pub fn stable_id(frames: &[Frame]) -> String {
    let mut h = crc32fast::Hasher::new();
    for f in frames {
        let name = f.function.as_deref().or(f.module.as_deref()).unwrap_or("?");
        h.update(name.as_bytes());
        h.update(b"\0");
        h.update(f.file.as_deref().unwrap_or("").as_bytes());
        h.update(b"\n");
    }
    format!("{:08x}", h.finalize())
}

/// A label value with `\`, `"` and newlines escaped, as both formats require.
fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn exposition(families: &[Family], format: Format) -> String {
    let mut out = String::new();
    for f in families.iter().filter(|f| !f.samples.is_empty()) {
        let sample_name = match f.kind {
            Kind::Counter => format!("{}_total", f.name),
            Kind::Gauge => f.name.to_string(),
        };
        // 0.0.4 names a counter by its sample; OpenMetrics by its family.
        let (family, kind) = match (format, f.kind) {
            (Format::OpenMetrics, Kind::Counter) => (f.name, "counter"),
            (Format::Prometheus, Kind::Counter) => (sample_name.as_str(), "counter"),
            (_, Kind::Gauge) => (f.name, "gauge"),
        };
        let _ = writeln!(out, "# HELP {family} {}", f.help);
        let _ = writeln!(out, "# TYPE {family} {kind}");
        for (labels, value) in &f.samples {
            let _ = match labels.is_empty() {
                true => writeln!(out, "{sample_name} {value}"),
                false => writeln!(out, "{sample_name}{{{labels}}} {value}"),
            };
        }
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::tests::{MIB, cache, churn, frame, leak, timeline};

    fn lines_of<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
            .collect()
    }

    #[test]
    fn stacks_beyond_the_top_are_summed_into_other() {
        let t = timeline(&[leak(1), cache(2), churn(3)], 1.0, 30);
        let a = t.analyze();
        let text = render(&a, 1, SelfUsage::default(), Format::Prometheus);
        let bytes = lines_of(&text, "memleak_stack_outstanding_bytes");
        assert_eq!(bytes.len(), 2, "{text}");
        let leak_id = stable_id(&leak(1).frames);
        assert_eq!(
            bytes[0],
            format!(
                "memleak_stack_outstanding_bytes{{pid=\"{}\",stack=\"{leak_id}\",class=\"\",\
                 frame=\"leak_one /src/leaker.c\"}} {}",
                u32::MAX,
                58 * MIB
            )
        );
        let last = t.timeline.last().unwrap();
        let other = last.total_bytes - 58 * MIB;
        assert!(bytes[1].contains("stack=\"other\""), "{}", bytes[1]);
        assert!(bytes[1].ends_with(&format!(" {other}")), "{}", bytes[1]);
        let rate = lines_of(&text, "memleak_stack_growth_rate_bytes_per_second");
        let leak_rate: f64 = rate[0].rsplit(' ').next().unwrap().parse().unwrap();
        assert!(
            (leak_rate - 2.0 * MIB as f64).abs() < 0.01 * MIB as f64,
            "{leak_rate}"
        );
        assert!(lines_of(&text, "memleak_stack_growing")[0].ends_with(" 1"));
        assert!(text.contains("memleak_process_verdict{pid=\"4294967295\",verdict=\"leaking\"} 1"));
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn openmetrics_names_counter_families_and_ends_with_eof() {
        let t = timeline(&[leak(1)], 1.0, 3);
        let a = t.analyze();
        let own = SelfUsage {
            cpu_seconds: 1.5,
            rss_bytes: 4096,
        };
        let om = render(&a, 10, own, Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"));
        assert!(om.contains("# TYPE memleak_lost_events counter\n"));
        assert!(om.contains("memleak_lost_events_total{reason=\"allocs_map_full\"} 0\n"));
        assert!(om.contains(
            "# TYPE memleak_self_cpu_seconds counter\nmemleak_self_cpu_seconds_total 1.5\n"
        ));
        let prom = render(&a, 10, own, Format::Prometheus);
        assert!(prom.contains("# TYPE memleak_lost_events_total counter\n"));
        assert!(prom.contains("memleak_self_resident_bytes 4096\n"));
        assert!(prom.contains("memleak_intervals_total 3\n"));
        // OpenMetrics' HELP text may not hold a bare quote or backslash.
        let mut helps = om.lines().filter(|l| l.starts_with("# HELP"));
        assert!(helps.all(|l| !l.contains('"') && !l.contains('\\')));
        // Every sample follows its family's HELP and TYPE, once per family.
        for format in [&om, &prom] {
            let types = format.lines().filter(|l| l.starts_with("# TYPE")).count();
            let helps = format.lines().filter(|l| l.starts_with("# HELP")).count();
            assert_eq!(types, helps);
            let mut names: Vec<&str> = format
                .lines()
                .filter(|l| l.starts_with("# TYPE"))
                .map(|l| l.split(' ').nth(2).unwrap())
                .collect();
            let n = names.len();
            names.dedup();
            assert_eq!(names.len(), n);
        }
    }

    #[test]
    fn every_lost_count_and_the_unhooked_functions_are_exported() {
        let mut t = timeline(&[leak(1)], 1.0, 3);
        let last = t.timeline.snapshots.last_mut().unwrap();
        last.lost.munmap_splits_lost = 7;
        last.lost.unhooked = vec!["malloc in libx.so (an IFUNC)".into(), "valloc".into()];
        let text = render(&t.analyze(), 10, SelfUsage::default(), Format::Prometheus);
        let lost = lines_of(&text, "memleak_lost_events_total");
        let counts = serde_json::to_value(Lost::default()).unwrap();
        let reasons = counts.as_object().unwrap().keys();
        assert_eq!(lost.len(), reasons.len(), "{text}");
        for reason in reasons {
            assert!(
                text.contains(&format!("{{reason=\"{reason}\"}}")),
                "{reason}: {text}"
            );
        }
        assert!(text.contains("memleak_lost_events_total{reason=\"munmap_splits_lost\"} 7\n"));
        assert!(text.contains("# TYPE memleak_unhooked_functions gauge\n"));
        assert!(text.contains("memleak_unhooked_functions{pid=\"4294967295\"} 2\n"));
    }

    #[test]
    fn same_names_share_one_series_and_labels_are_escaped() {
        let odd = |id| {
            let mut s = leak(id);
            s.frames[1] = frame("quote\"back\\slash\nline", "/src/a.c", 3, "leaker");
            s
        };
        let t = timeline(&[odd(1), odd(2)], 1.0, 5);
        let a = t.analyze();
        let text = render(&a, 10, SelfUsage::default(), Format::Prometheus);
        let bytes = lines_of(&text, "memleak_stack_outstanding_bytes");
        assert_eq!(bytes.len(), 1, "{text}");
        assert!(
            bytes[0].contains(r#"frame="quote\"back\\slash\nline /src/a.c""#),
            "{}",
            bytes[0]
        );
        assert!(bytes[0].ends_with(&format!(" {}", 2 * 8 * MIB)));
    }

    #[test]
    fn stable_id_ignores_addresses() {
        let a = leak(1).frames;
        let mut b = a.clone();
        b.iter_mut().for_each(|f| f.addr += 0x7f00_0000_0000);
        assert_eq!(stable_id(&a), stable_id(&b));
        assert_ne!(stable_id(&a), stable_id(&a[1..]));
        assert_eq!(stable_id(&a).len(), 8);
    }

    #[test]
    fn accept_header_picks_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
        assert_eq!(Format::from_accept(None), Format::Prometheus);
    }
}
