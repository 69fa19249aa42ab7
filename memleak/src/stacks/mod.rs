//! The one stack table of a run: each stack id's frames, whether its walk was cut short, who
//! holds its memory and the frame that explains it, and that frame's source line. Snapshots
//! carry ids only; every report looks stacks up here, so a stack reads the same everywhere.

mod attribution;

use std::collections::{HashMap, HashSet};

use serde::Serialize;

pub use attribution::{Attribution, attribute};

use crate::model::{Class, Frame};
use memleak::target_files::{TargetFiles, Withheld};

/// What the table knows of one stack. Its frames are as last symbolized.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StackInfo {
    /// Innermost first; empty only when the walk failed (a negative id) or the stack could
    /// not be read.
    pub frames: Vec<Frame>,
    /// The walk stopped before the outermost frame: frames beyond the last are missing.
    pub truncated: bool,
    /// Outer Python frames past the walk's cap: counted, not kept.
    pub python_cut: Option<PythonCut>,
    /// Who holds the memory, when the target runs Python.
    pub class: Option<Class>,
    /// Index in `frames` of the frame that explains the stack (see `attribute`).
    pub deciding_frame: Option<usize>,
    /// That frame's source line, read from the target's own file as the target could, or
    /// `[source withheld: why]`; `None`: no such file or line.
    pub deciding_source: Option<String>,
    /// The source line was looked for (found or not): it is read once.
    #[serde(skip)]
    pub source_read: bool,
    /// The exec generation the frames were symbolized in.
    #[serde(skip)]
    pub generation: u32,
    /// The process whose stack it is (0: a kernel stack).
    pub pid: u32,
}

impl StackInfo {
    pub fn new(frames: Vec<Frame>, truncated: bool, generation: u32, who: Attribution) -> Self {
        StackInfo {
            frames,
            truncated,
            python_cut: None,
            class: who.class,
            deciding_frame: who.frame,
            deciding_source: None,
            source_read: false,
            generation,
            pid: 0,
        }
    }

    pub fn deciding(&self) -> Option<&Frame> {
        self.deciding_frame.and_then(|i| self.frames.get(i))
    }
}

/// How many outermost Python frames a stack lacks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PythonCut {
    pub dropped: u32,
    /// The chain went on past the frames counted: `dropped` is a lower bound.
    pub at_least: bool,
}

impl PythonCut {
    /// From `StackRecord::python_dropped`; `None` for a whole chain.
    pub fn from_record(python_dropped: u32) -> Option<PythonCut> {
        use memleak_common::PYTHON_DROPPED_MORE;
        (python_dropped != 0).then_some(PythonCut {
            dropped: python_dropped & !PYTHON_DROPPED_MORE,
            at_least: python_dropped & PYTHON_DROPPED_MORE != 0,
        })
    }
}

/// Stack id → what is known of it. Ids are stable for the whole run.
#[derive(Debug, Default)]
pub struct StackTable {
    stacks: HashMap<i64, StackInfo>,
}

/// What a stack the table never saw reads as: no frames.
static UNKNOWN: StackInfo = StackInfo {
    frames: Vec::new(),
    truncated: false,
    python_cut: None,
    class: None,
    deciding_frame: None,
    deciding_source: None,
    source_read: false,
    generation: 0,
    pid: 0,
};

impl StackTable {
    /// The stack's entry; an unknown id (a failed walk) reads as a stack without frames.
    pub fn get(&self, id: i64) -> &StackInfo {
        self.stacks.get(&id).unwrap_or(&UNKNOWN)
    }

    pub fn entry(&self, id: i64) -> Option<&StackInfo> {
        self.stacks.get(&id)
    }

    #[cfg(test)]
    pub fn entry_mut(&mut self, id: i64) -> Option<&mut StackInfo> {
        self.stacks.get_mut(&id)
    }

    pub fn insert(&mut self, id: i64, info: StackInfo) {
        self.stacks.insert(id, info);
    }

    /// Forgets every stack but `ids` (a long run's thinned timeline no longer holds them).
    pub fn retain(&mut self, ids: &HashSet<i64>) {
        self.stacks.retain(|id, _| ids.contains(id));
    }

    /// Reads the deciding source line of each of `ids` not read yet, through its process's
    /// root while it runs (its files may be gone, or out of reach, once it exits).
    pub fn read_sources(&mut self, ids: impl Iterator<Item = i64>) {
        for id in ids {
            let Some(info) = self.stacks.get_mut(&id) else {
                continue;
            };
            if std::mem::replace(&mut info.source_read, true) {
                continue;
            }
            let Some(f) = info.deciding() else { continue };
            if let (Some(file), Some(line)) = (&f.file, f.line) {
                let files = TargetFiles::new(info.pid);
                info.deciding_source = read_source_line(&files, file, line);
            }
        }
    }
}

/// Larger than any source file (the SQLite amalgamation is 9 MB).
const MAX_SOURCE_FILE: u64 = 16 << 20;

/// Line `line` (1-based) of the target's `file`, read as the target could; `None` for a
/// relative path, a missing file or a line past its end (no guessing). A file the policy
/// withholds gives `[source withheld: why]` instead of its line.
pub fn read_source_line(files: &TargetFiles, file: &str, line: u32) -> Option<String> {
    if !file.starts_with('/') || line == 0 {
        return None;
    }
    let text = match files.read(std::path::Path::new(file), MAX_SOURCE_FILE, b"") {
        Ok(text) => text,
        Err(Withheld::Missing | Withheld::TargetGone) => return None,
        Err(why) => return Some(format!("[source withheld: {why}]")),
    };
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .nth(line as usize - 1)
        .map(|l| l.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_source_through_the_targets_root() {
        let dir = std::env::temp_dir().join(format!("memleak-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("app.c");
        std::fs::write(&file, "int x;\n    p = malloc(4096);  \n").unwrap();
        let path = file.to_str().unwrap();
        let me = TargetFiles::new(std::process::id());
        assert_eq!(
            read_source_line(&me, path, 2).as_deref(),
            Some("p = malloc(4096);")
        );
        assert_eq!(read_source_line(&me, path, 3), None);
        assert_eq!(read_source_line(&me, "app.c", 1), None);
        let gone = TargetFiles::new(u32::MAX);
        assert_eq!(read_source_line(&gone, path, 1), None, "no such process");
        assert_eq!(
            read_source_line(&me, dir.to_str().unwrap(), 1).as_deref(),
            Some("[source withheld: not a regular file]")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_ids_read_as_frameless() {
        let t = StackTable::default();
        assert!(t.get(-3).frames.is_empty() && t.entry(-3).is_none());
    }
}
