//! Folded stacks (`outer;inner value`), the input of flamegraph.pl, inferno and speedscope:
//! what is outstanding at the end of the run, per call path, in bytes.

use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};

use crate::{
    analysis::Analysis,
    model::{Frame, FrameKind, Snapshot},
    stacks::StackTable,
};

/// One line per distinct call path of `snapshot` (stacks that fold to the same names are
/// added up), outermost frame first; stacks holding nothing are left out. Stacks of several
/// processes get their process (`pid 123`) as the root frame.
pub fn lines(snapshot: &Snapshot, table: &StackTable) -> Vec<String> {
    let held = || snapshot.stacks.iter().filter(|s| s.bytes > 0);
    let pids: std::collections::BTreeSet<u32> = held().map(|s| table.get(s.stack_id).pid).collect();
    let mut paths: BTreeMap<String, u64> = BTreeMap::new();
    for s in held() {
        let info = table.get(s.stack_id);
        let mut names: Vec<String> = match pids.len() > 1 {
            true => vec![format!("pid {}", info.pid)],
            false => Vec::new(),
        };
        match info.frames.is_empty() {
            true => names.push("[unknown]".to_string()),
            false => names.extend(info.frames.iter().rev().map(name)),
        }
        *paths.entry(names.join(";")).or_default() += s.bytes;
    }
    paths
        .into_iter()
        .map(|(path, bytes)| format!("{path} {bytes}"))
        .collect()
}

/// A frame's name in a flamegraph: the function (Python: with its file and line, as py-spy
/// shows them), else `module+offset`; `;` and line breaks would break the format.
fn name(f: &Frame) -> String {
    let n = match (&f.function, f.kind) {
        (Some(func), FrameKind::Python) => {
            let file = f.file.as_deref().unwrap_or("?");
            let base = file.rsplit('/').next().unwrap_or(file);
            match f.line {
                Some(line) => format!("{func} ({base}:{line})"),
                None => format!("{func} ({base})"),
            }
        }
        (Some(func), FrameKind::Native) => func.clone(),
        (None, _) => match &f.module {
            Some(m) => format!("{m}+{:#x}", f.module_offset),
            None => format!("{:#x}", f.addr),
        },
    };
    n.replace(';', ":").replace(['\n', '\r'], " ")
}

/// Writes the final snapshot's folded stacks to `path`.
pub fn write(a: &Analysis, path: &Path) -> Result<()> {
    let last = a.timeline.last();
    let mut text = last.map_or(vec![], |s| lines(s, a.table)).join("\n");
    text.push('\n');
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::tests::{cache, churn, leak, timeline};

    #[test]
    fn folded_values_add_up_to_the_snapshot_total() {
        let t = timeline(&[leak(1), cache(2), churn(3)], 1.0, 9);
        let last = t.timeline.last().unwrap();
        let lines = lines(last, &t.table);
        let sum: u64 = lines
            .iter()
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
            .sum();
        assert_eq!(sum, last.total_bytes);
        assert!(
            lines.contains(&format!("main;leak_one;malloc {}", 16u64 << 20)),
            "{lines:?}"
        );
    }

    #[test]
    fn names_are_safe_for_the_format() {
        let f = Frame {
            function: Some("operator new; weird".into()),
            ..Default::default()
        };
        assert_eq!(name(&f), "operator new: weird");
        let py = Frame {
            function: Some("handle".into()),
            file: Some("/srv/app/server.py".into()),
            line: Some(42),
            kind: FrameKind::Python,
            ..Default::default()
        };
        assert_eq!(name(&py), "handle (server.py:42)");
    }
}
