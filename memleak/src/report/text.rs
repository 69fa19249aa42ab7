//! BCC memleak's per-interval table, so a user's eyes and scripts find what they expect: a
//! `[HH:MM:SS] Top N stacks with outstanding allocations:` header, then per stack a tab-indented
//! `BYTES bytes in N allocations from stack` line and one doubly indented line per frame
//! (`0x000055a20767e1a8<TAB>leak_one+0xf [leaker] leaker.c:12`).

use std::{collections::BTreeMap, fmt::Write};

use memleak_common::MAX_PYTHON_FRAMES;

use crate::{
    model::{Class, Lost, ProcessCounts, Snapshot, StackUsage},
    stacks::StackTable,
    symbolize::format_frame,
};

/// Renders one table. `title` follows the time stamp (e.g. "Top 10 stacks with outstanding
/// allocations:"); `top` caps the stacks shown. The snapshot's ids are looked up in `table`.
pub fn table(snap: &Snapshot, table: &StackTable, title: &str, top: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "[{}] {title}", clock(snap.unix_time));
    let _ = writeln!(out, "\t{}", lost_line(&snap.lost));
    let unit = snap.measure.unit();
    by_process(&mut out, &snap.stacks, table, unit, top, &snap.processes);
    if let Some(line) = class_line(snap, table) {
        let _ = writeln!(out, "\t{line}");
    }
    if let Some(mapped) = &snap.mapped {
        let _ = writeln!(
            out,
            "[{}] Top {top} stacks that mapped address space (mmap/mremap/brk, still mapped):",
            clock(snap.unix_time)
        );
        by_process(&mut out, mapped, table, "mappings", top, &[]);
    }
    out
}

/// The top stacks; stacks of several processes as one group per process, largest first,
/// each with what was lost in it (`counts`: a process that lost data holding nothing gets its
/// group too), then the service's total.
fn by_process(
    out: &mut String,
    all: &[StackUsage],
    table: &StackTable,
    unit: &str,
    top: usize,
    counts: &[ProcessCounts],
) {
    let mut groups = process_groups(all, table);
    for c in counts.iter().filter(|c| !c.lost.is_empty()) {
        if !groups.iter().any(|(pid, _)| *pid == c.pid) {
            groups.push((c.pid, Vec::new()));
        }
    }
    if groups.len() <= 1 {
        let all: Vec<&StackUsage> = all.iter().collect();
        return stacks(out, &all, table, unit, top);
    }
    for (pid, group) in &groups {
        let (bytes, count) = totals(group);
        let who = match pid {
            0 => "no known process (failed walks)".to_string(),
            pid => format!("pid {pid}"),
        };
        let lost = counts
            .iter()
            .find(|c| c.pid == *pid)
            .map_or(String::new(), |c| match c.lost.is_empty() {
                true => "; lost: nothing".to_string(),
                false => format!("; {}", lost_line(&c.lost)),
            });
        let _ = writeln!(out, "\t{who}: {bytes} bytes in {count} {unit}{lost}");
        stacks(out, group, table, unit, top);
    }
    let (bytes, count) = totals(&all.iter().collect::<Vec<_>>());
    let n = groups.len();
    let _ = writeln!(
        out,
        "\tservice total: {bytes} bytes in {count} {unit} over {n} processes"
    );
}

/// The stacks of each process, the processes by bytes held, largest first (stable for ties).
pub fn process_groups<'s>(
    all: &'s [StackUsage],
    table: &StackTable,
) -> Vec<(u32, Vec<&'s StackUsage>)> {
    let mut groups: BTreeMap<u32, Vec<&StackUsage>> = BTreeMap::new();
    for s in all {
        groups.entry(table.get(s.stack_id).pid).or_default().push(s);
    }
    let mut groups: Vec<_> = groups.into_iter().collect();
    groups.sort_by_key(|(_, g)| std::cmp::Reverse(totals(g).0));
    groups
}

fn totals(stacks: &[&StackUsage]) -> (u64, u64) {
    stacks
        .iter()
        .fold((0, 0), |(b, c), s| (b + s.bytes, c + s.count))
}

/// The top stacks, each as BCC prints it; `unit` names what `count` counts.
fn stacks(out: &mut String, stacks: &[&StackUsage], table: &StackTable, unit: &str, top: usize) {
    for s in stacks.iter().take(top) {
        let info = table.get(s.stack_id);
        let _ = writeln!(out, "\t{} bytes in {} {unit} from stack", s.bytes, s.count);
        if s.stack_id < 0 {
            let _ = writeln!(out, "\t\t[stack walk failed: {}]", s.stack_id);
        }
        if let (Some(class), Some(frame)) = (info.class, info.deciding()) {
            let _ = writeln!(
                out,
                "\t\tclass: {} (decided by {})",
                class.name(),
                format_frame(frame)
            );
        }
        for f in &info.frames {
            let _ = writeln!(out, "\t\t{:#018x}\t{}", f.addr, format_frame(f));
        }
        if let Some(cut) = info.python_cut {
            let _ = writeln!(
                out,
                "\t\t[{}{} outer Python frames not recorded: the walk keeps {MAX_PYTHON_FRAMES}]",
                if cut.at_least { "at least " } else { "" },
                cut.dropped
            );
        }
        if info.truncated {
            let _ = writeln!(
                out,
                "\t\t[the walk stopped here: outer frames could not be unwound]"
            );
        }
        for a in &s.allocations {
            let _ = writeln!(
                out,
                "\t\taddr = {:#x} size = {} age = {} ms",
                a.addr, a.size, a.age_ms
            );
        }
    }
    if stacks.len() > top {
        let rest = &stacks[top..];
        let (bytes, count) = totals(rest);
        let _ = writeln!(
            out,
            "\t... {} more stacks hold {bytes} bytes in {count} {unit}",
            rest.len(),
        );
    }
}

/// Outstanding bytes per class over every stack (not only the top N), largest first;
/// `None` when the target runs no Python.
fn class_line(snap: &Snapshot, table: &StackTable) -> Option<String> {
    let mut per_class: BTreeMap<Class, u64> = BTreeMap::new();
    for s in &snap.stacks {
        if let Some(c) = table.get(s.stack_id).class {
            *per_class.entry(c).or_default() += s.bytes;
        }
    }
    if per_class.is_empty() {
        return None;
    }
    let mut classes: Vec<(Class, u64)> = per_class.into_iter().collect();
    classes.sort_by_key(|&(_, bytes)| std::cmp::Reverse(bytes));
    let parts: Vec<String> = classes
        .iter()
        .map(|(c, bytes)| format!("{} {bytes} bytes", c.name()))
        .collect();
    Some(format!("by class: {}", parts.join(", ")))
}

/// Lost data, always printed so the reader knows whether the table is complete.
fn lost_line(l: &Lost) -> String {
    if l.is_empty() {
        return "lost: nothing (the table is complete)".to_string();
    }
    let parts: Vec<String> = [
        (
            l.allocs_map_full,
            "allocations not recorded (map full: raise --max-allocs/--max-mmaps)",
        ),
        (
            l.stack_walks_failed,
            "stack walks failed (raise --max-stacks)",
        ),
        (
            l.inflight_map_full,
            "calls missed (in-flight map full: raise --max-inflight)",
        ),
        (
            l.combined_map_full,
            "per-stack totals not kept (raise --max-combined)",
        ),
        (l.trace_events_lost, "trace events dropped"),
        (l.stale_inflight, "calls that never returned"),
        (l.munmap_splits_lost, "munmap splits not tracked"),
        (
            l.python_codes_dropped,
            "Python code objects handed over late (their frames may lack names)",
        ),
    ]
    .iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .chain(
        (!l.unhooked.is_empty()).then(|| format!("calls to {} not hooked", l.unhooked.join(", "))),
    )
    .collect();
    format!("lost: {} (results are partial)", parts.join(", "))
}

/// HH:MM:SS in local time.
fn clock(unix_time: f64) -> String {
    let t = unix_time as libc::time_t;
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&t, &mut tm) };
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}
