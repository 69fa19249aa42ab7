//! Synthetic runs (a timeline and its stack table) for the analysis and the renderers' tests.

use super::*;
use crate::{
    model::{Frame, Lost, Measure, StackUsage},
    proc_stats::{self, ProcessContext},
    stacks::{StackInfo, attribute},
};

pub const MIB: u64 = 1 << 20;

pub fn frame(function: &str, file: &str, line: u32, module: &str) -> Frame {
    Frame {
        addr: 0x1000 + line as u64,
        module: Some(module.to_string()),
        module_offset: 0x1000 + line as u64,
        function: Some(function.to_string()),
        file: Some(file.to_string()),
        line: Some(line),
        ..Default::default()
    }
}

/// A stack whose outstanding bytes follow `bytes_at(t)`.
pub struct Synthetic {
    pub id: i64,
    pub frames: Vec<Frame>,
    pub bytes_at: Box<dyn Fn(f64) -> u64>,
    /// The size of its blocks (the count is the bytes over it, rounded up).
    pub block: u64,
}

/// A recorded run and its stack table: what a renderer is handed, analysed.
pub struct Run {
    pub timeline: Timeline,
    pub table: StackTable,
}

impl Run {
    pub fn analyze(&self) -> Analysis<'_> {
        analyze(&self.timeline, &self.table)
    }

    /// What the collector's classifier sets on a stack.
    pub fn set_class(&mut self, stack_id: i64, class: Class) {
        if let Some(s) = self.table.entry_mut(stack_id) {
            s.class = Some(class);
        }
    }
}

fn snapshot(stacks: &[Synthetic], at: f64) -> Snapshot {
    let mut usage: Vec<StackUsage> = stacks
        .iter()
        .map(|s| {
            let bytes = (s.bytes_at)(at);
            StackUsage {
                stack_id: s.id,
                bytes,
                count: bytes.div_ceil(s.block),
                allocations: vec![],
            }
        })
        .filter(|s| s.bytes > 0)
        .collect();
    usage.sort_by_key(|s| std::cmp::Reverse(s.bytes));
    Snapshot {
        measure: Measure::Allocations,
        unix_time: 1_790_000_000.0 + at,
        elapsed_s: at,
        total_bytes: usage.iter().map(|s| s.bytes).sum(),
        total_count: usage.iter().map(|s| s.count).sum(),
        stacks: usage,
        mapped: None,
        lost: Lost::default(),
        recorded: 0,
        released: 0,
        processes: Vec::new(),
    }
}

/// A run sampled every `interval_s` for `n` intervals.
pub fn timeline(stacks: &[Synthetic], interval_s: f64, n: usize) -> Run {
    let context = ProcessContext {
        pid: u32::MAX,
        ..Default::default()
    };
    let mut t = Timeline::new(context, interval_s);
    for i in 0..n {
        let snapshot = snapshot(stacks, i as f64 * interval_s);
        let sample = ProcSample {
            rss_bytes: 50 * MIB + snapshot.total_bytes,
            mem_available_bytes: Some(20 << 30),
            ..Default::default()
        };
        t.push(snapshot, Some(sample));
    }
    let mut table = StackTable::default();
    for s in stacks {
        let who = attribute(&s.frames, None);
        table.insert(s.id, StackInfo::new(s.frames.clone(), false, 0, who));
    }
    Run { timeline: t, table }
}

/// 1 MiB every 0.5 s: 120 MiB/min.
pub fn leak(id: i64) -> Synthetic {
    Synthetic {
        id,
        frames: vec![
            frame("malloc", "./malloc/malloc.c", 3300, "libc.so.6"),
            frame("leak_one", "/src/leaker.c", 12, "leaker"),
            frame("main", "/src/leaker.c", 30, "leaker"),
        ],
        bytes_at: Box::new(|t| (t / 0.5).floor() as u64 * MIB),
        block: 4096,
    }
}

/// Fills 40 MiB over the first 10 s, then holds it.
pub fn cache(id: i64) -> Synthetic {
    Synthetic {
        id,
        frames: vec![frame("cache_put", "/src/cache.c", 7, "leaker")],
        bytes_at: Box::new(|t| (t.min(10.0) * 4.0) as u64 * MIB),
        block: 4096,
    }
}

/// Allocates and frees: 0 to 3 MiB outstanding, in no order.
pub fn churn(id: i64) -> Synthetic {
    Synthetic {
        id,
        frames: vec![frame("work", "/src/work.c", 3, "leaker")],
        bytes_at: Box::new(|t| [0, 3, 1, 2, 0, 3, 2][(t as usize * 5) % 7] * MIB),
        block: 4096,
    }
}

/// One 5 MiB block taken at `at` seconds and never freed.
pub fn held(id: i64, at: f64) -> Synthetic {
    Synthetic {
        id,
        frames: vec![frame("load_table", "/src/load.c", 9, "leaker")],
        bytes_at: Box::new(move |t| if t >= at { 5 * MIB } else { 0 }),
        block: 5 * MIB,
    }
}

fn trend_of(a: &Analysis, id: i64) -> Trend {
    stack(a, id).trend
}

fn stack<'a>(a: &'a Analysis, id: i64) -> &'a StackTrend<'a> {
    a.stacks.iter().find(|s| s.stack_id == id).unwrap()
}

#[test]
fn steady_leak_is_growing_at_its_rate() {
    let t = timeline(&[leak(1)], 5.0, 25);
    let a = t.analyze();
    let s = &a.stacks[0];
    assert_eq!(s.trend, Trend::Growing);
    let want = 120.0 * MIB as f64;
    assert!(
        (s.rate() - want).abs() / want < 0.01,
        "rate {} MiB/min",
        s.rate() / MIB as f64
    );
    assert!(s.fit.unwrap().r2 > 0.99);
    assert!(a.verdict.leaking && a.verdict.conclusive);
    assert_eq!(a.verdict.growing_stacks, 1);
    let p = a.verdict.projection.as_ref().unwrap();
    assert_eq!(p.limit, "MemAvailable");
    // 20 GiB at 120 MiB/min: about 170 minutes.
    assert!((p.seconds.unwrap() / 60.0 - 170.7).abs() < 2.0);
    assert_eq!(
        s.info.deciding().unwrap().function.as_deref(),
        Some("leak_one")
    );
}

#[test]
fn filled_cache_is_a_plateau() {
    let t = timeline(&[cache(2)], 2.0, 20);
    let a = t.analyze();
    assert_eq!(trend_of(&a, 2), Trend::Plateau);
    assert!(!a.verdict.leaking);
}

#[test]
fn alloc_and_free_is_churn() {
    let t = timeline(&[churn(3)], 1.0, 30);
    let a = t.analyze();
    assert_eq!(trend_of(&a, 3), Trend::Churn, "{:?}", a.stacks[0].fit);
    assert!(!a.verdict.leaking);
}

#[test]
fn mixed_process_finds_only_the_leak() {
    let t = timeline(&[churn(3), cache(2), leak(1)], 1.0, 30);
    let a = t.analyze();
    assert_eq!(trend_of(&a, 1), Trend::Growing);
    assert_eq!(trend_of(&a, 2), Trend::Plateau);
    assert_eq!(trend_of(&a, 3), Trend::Churn);
    assert_eq!(a.stacks[0].stack_id, 1, "growing stacks come first");
    assert_eq!(a.verdict.growing_stacks, 1);
}

#[test]
fn constant_holding_is_no_leak() {
    let flat = Synthetic {
        id: 4,
        frames: vec![frame("init", "/src/init.c", 1, "app")],
        bytes_at: Box::new(|_| 8 * MIB),
        block: 4096,
    };
    let t = timeline(&[flat], 5.0, 12);
    let a = t.analyze();
    assert_eq!(a.stacks[0].trend, Trend::Plateau);
    assert!(!a.verdict.leaking && a.verdict.conclusive);
    assert_eq!(a.verdict.total.unwrap().slope_per_min, 0.0);
    assert!(a.verdict.projection.as_ref().unwrap().seconds.is_none());
}

#[test]
fn short_run_is_inconclusive() {
    let t = timeline(&[leak(1)], 1.0, 2);
    let a = t.analyze();
    assert!(!a.verdict.conclusive && !a.verdict.leaking);
    assert_eq!(a.stacks[0].trend, Trend::Unknown);
}

#[test]
fn small_drift_is_not_a_leak() {
    let drift = Synthetic {
        id: 5,
        frames: vec![],
        bytes_at: Box::new(|t| 1_000_000 + (t * 100.0) as u64),
        block: 4096,
    };
    let t = timeline(&[drift], 1.0, 60);
    let a = t.analyze();
    assert_ne!(a.stacks[0].trend, Trend::Growing);
}

#[test]
fn noisy_leak_is_growing_and_noise_alone_is_not() {
    // Jitter of up to 24 MiB (in-flight batches) on a 60 MiB/min leak, and the jitter alone.
    let jitter = |t: f64| ((t as u64 * 7919) % 13) * 2 * MIB;
    let noisy = Synthetic {
        id: 7,
        frames: vec![],
        bytes_at: Box::new(move |t| (t * MIB as f64) as u64 + jitter(t)),
        block: 4096,
    };
    let noise = Synthetic {
        id: 8,
        frames: vec![],
        bytes_at: Box::new(move |t| MIB + jitter(t)),
        block: 4096,
    };
    let t = timeline(&[noisy, noise], 2.0, 60);
    let a = t.analyze();
    let noisy = stack(&a, 7);
    assert_eq!(noisy.trend, Trend::Growing, "{:?}", noisy.fit);
    let rate = noisy.rate() / MIB as f64;
    assert!((rate - 60.0).abs() < 6.0, "{rate} MiB/min");
    assert_eq!(trend_of(&a, 8), Trend::Churn);
}

#[test]
fn small_steady_leak_of_small_blocks_is_growing() {
    // 512 B every 0.2 s for 6 s: 15 KiB, 30 blocks, well above what is in flight.
    let headers = Synthetic {
        id: 6,
        frames: vec![],
        bytes_at: Box::new(|t| (t / 0.2) as u64 * 512),
        block: 4096,
    };
    let mut t = timeline(&[headers], 1.0, 7);
    for s in &mut t.timeline.snapshots {
        s.stacks.iter_mut().for_each(|u| u.count = u.bytes / 512);
    }
    assert_eq!(t.analyze().stacks[0].trend, Trend::Growing);
}

#[test]
fn projection_takes_the_tighter_of_cgroup_and_machine() {
    let root = std::env::temp_dir().join(format!("memleak-proj-{}", std::process::id()));
    std::fs::create_dir_all(root.join("job")).unwrap();
    std::fs::write(root.join("job/memory.max"), format!("{}\n", 1u64 << 30)).unwrap();
    let mut t = timeline(&[leak(1)], 5.0, 13);
    t.timeline.context.cgroup = proc_stats::cgroup_limit(&root, "0::/job\n");
    std::fs::remove_dir_all(&root).unwrap();
    for s in t.timeline.samples.iter_mut().flatten() {
        s.cgroup_usage_bytes = Some(512 * MIB);
    }
    let a = t.analyze();
    let p = a.verdict.projection.unwrap();
    assert_eq!(p.limit, "cgroup /job memory limit");
    assert_eq!(p.headroom_bytes, 512 * MIB);
    // 512 MiB at 120 MiB/min.
    assert!((p.seconds.unwrap() - 256.0).abs() < 1.0, "{:?}", p.seconds);
}

#[test]
fn final_state_ends_the_series() {
    let mut t = timeline(&[leak(1)], 1.0, 4);
    let mut at_exit = t.timeline.snapshots[3].clone();
    at_exit.elapsed_s = 3.5;
    at_exit.total_bytes += MIB;
    t.timeline.record_final(at_exit);
    assert_eq!(t.timeline.snapshots.len(), 4);
    assert_eq!(t.timeline.last().unwrap().elapsed_s, 3.5);
    let a = t.analyze();
    assert_eq!(a.points.len(), 5);
    assert_eq!(a.points[4].outstanding_bytes, 7 * MIB);
    assert!(
        a.points[4].process.is_none(),
        "no process u32::MAX to sample"
    );
    assert_eq!(
        a.points[4].rate_bytes_per_min, None,
        "no rate over half an interval"
    );
}

#[test]
fn bytes_add_up_per_class() {
    let mut t = timeline(&[leak(1), cache(2), churn(3)], 1.0, 12);
    t.set_class(1, Class::Application);
    t.set_class(2, Class::CpythonInternal);
    let a = t.analyze();
    assert_eq!(a.classes.len(), 2);
    assert_eq!(
        a.classes[0],
        ClassBytes {
            class: Class::CpythonInternal,
            bytes: 40 * MIB
        }
    );
    assert_eq!(
        a.classes[1],
        ClassBytes {
            class: Class::Application,
            bytes: 22 * MIB
        }
    );
}

#[test]
fn held_block_is_named_but_not_in_the_rate() {
    let t = timeline(&[leak(1), held(2, 1.0), churn(3)], 1.0, 12);
    let a = t.analyze();
    let h = stack(&a, 2);
    assert_eq!(h.trend, Trend::Held);
    assert!(h.named && !stack(&a, 3).named, "churn floor 0 is not named");
    assert_eq!(a.verdict.held_bytes, 5 * MIB);
    assert_eq!(a.verdict.leak_rate_bytes_per_min, stack(&a, 1).rate());
    assert_eq!(a.verdict.named_stacks, vec![1, 2]);
    let rss = &a.verdict.projection.as_ref().unwrap().rss_at;
    let hours: Vec<u32> = rss.iter().map(|r| r.hours).collect();
    assert_eq!(hours, vec![1, 4, 8, 24]);
    let last_rss = a.points.last().unwrap().process.as_ref().unwrap().rss_bytes;
    let want = last_rss as f64 + stack(&a, 1).rate() * 60.0;
    assert!((rss[0].rss_bytes as f64 - want).abs() < 2.0);
}

#[test]
fn stacks_sharing_a_deciding_frame_are_told_apart() {
    let leaf = frame("leak_malloc", "/src/c_ledger.c", 17, "ledger");
    let chain = |callers: &[(&str, u32)]| {
        let mut frames = vec![
            frame("malloc", "./malloc/malloc.c", 1, "libc.so.6"),
            leaf.clone(),
        ];
        frames.extend(
            callers
                .iter()
                .map(|(f, l)| frame(f, "/src/c_ledger.c", *l, "ledger")),
        );
        frames
    };
    let direct = Synthetic {
        frames: chain(&[("main", 40)]),
        ..leak(1)
    };
    let deep = Synthetic {
        frames: chain(&[("c", 30), ("b", 31), ("a", 32), ("main", 41)]),
        ..leak(2)
    };
    let t = timeline(&[direct, deep, leak(3)], 1.0, 10);
    let a = t.analyze();
    let at = |id| {
        let s = stack(&a, id);
        s.differs_at
            .map(|i| s.info.frames[i].function.clone().unwrap())
    };
    assert_eq!(at(1).as_deref(), Some("main"));
    assert_eq!(at(2).as_deref(), Some("c"));
    assert_eq!(at(3), None, "its deciding frame is its own");
}

#[test]
fn a_long_run_is_thinned_to_bounded_points_over_its_whole_span() {
    use crate::timeline::MAX_POINTS;
    let run = timeline(&[leak(1)], 1.0, 2);
    let template = run.timeline.snapshots[1].clone();
    let context = ProcessContext {
        pid: u32::MAX,
        ..Default::default()
    };
    let mut t = Timeline::new(context, 1.0);
    for i in 0..5000 {
        let mut s = template.clone();
        s.elapsed_s = i as f64;
        s.stacks[0].bytes = i * MIB;
        s.total_bytes = i * MIB;
        t.push(s, None);
    }
    assert_eq!(t.intervals(), 5000);
    assert!(t.snapshots.len() <= MAX_POINTS, "{}", t.snapshots.len());
    assert_eq!(t.snapshots.len(), t.samples.len());
    assert_eq!(t.snapshots[0].elapsed_s, 0.0, "the start stays");
    assert_eq!(t.last().unwrap().elapsed_s, 4999.0);
    let recent: Vec<f64> = t
        .snapshots
        .iter()
        .rev()
        .take(10)
        .map(|s| s.elapsed_s)
        .collect();
    assert_eq!(
        recent,
        (4990..5000).rev().map(f64::from).collect::<Vec<_>>()
    );
    let a = analyze(&t, &run.table);
    assert_eq!(a.stacks[0].trend, Trend::Growing);
    assert!((a.stacks[0].rate() - 60.0 * MIB as f64).abs() < 1.0);
    assert_eq!(
        a.stacks[0].info.frames.len(),
        3,
        "a held stack keeps its frames"
    );
    let mut table = StackTable::default();
    table.insert(1, StackInfo::default());
    table.insert(9, StackInfo::default());
    table.retain(&t.stack_ids());
    assert!(table.entry(1).is_some() && table.entry(9).is_none());
}

#[test]
fn each_process_gets_its_own_verdict() {
    let mut run = timeline(&[leak(1), cache(2), churn(3)], 2.0, 12);
    for (id, pid) in [(1, 100), (2, 200), (3, 200)] {
        run.table.entry_mut(id).unwrap().pid = pid;
    }
    run.timeline.processes = [100, 200, 300]
        .map(|pid| crate::timeline::TracedProcess {
            pid,
            exited: (pid == 300).then(|| "exited".into()),
            traced_after_ms: None,
        })
        .to_vec();
    let a = run.analyze();
    let by_pid = |pid| a.processes.iter().find(|p| p.pid == pid).unwrap();
    assert!(a.several());
    assert!(by_pid(100).leaking && by_pid(100).growing_stacks == 1);
    assert!(!by_pid(200).leaking && by_pid(200).final_bytes > 0);
    assert_eq!(by_pid(300).final_bytes, 0);
    assert_eq!(by_pid(300).exited.as_deref(), Some("exited"));
    let text = crate::report::summary::render(&a);
    assert!(text.contains("SERVICE: 1 of 3 processes leaking"), "{text}");
    assert!(
        text.contains("pid 300: exited; its memory was dropped then"),
        "{text}"
    );
    let folded = crate::report::folded::lines(a.timeline.last().unwrap(), &run.table);
    assert!(
        folded
            .iter()
            .all(|l| l.starts_with("pid 100;") || l.starts_with("pid 200;")),
        "{folded:?}"
    );
}
