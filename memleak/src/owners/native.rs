//! Native owners: is a stack's block still referenced anywhere in the process? A
//! conservative scan, as LeakSanitizer makes at exit, made live: every readable, writable
//! mapping outside the tracked blocks (globals, thread stacks, memory allocated before
//! memleak attached) is a root; a block a root points into is reachable, and so is every
//! block a reachable block points into. A block no root reaches is lost. Registers are not
//! read (a pointer only a register holds reads as lost) and the target runs on meanwhile.

use std::sync::Arc;
use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt};
use serde::Serialize;

use super::{Block, Blocks, Owner, Root, live_stack};
use crate::{objects, procmaps::Mapping, python::Memory};

/// What one scan may spend.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_bytes: u64,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_bytes: 4 << 30,
            time: Duration::from_secs(20),
        }
    }
}

/// How much the scan read and whether it finished.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NativeScan {
    pub regions: u64,
    pub bytes_scanned: u64,
    /// Bytes of mappings that could not be read (their blocks count as not referenced
    /// from there).
    pub unreadable_bytes: u64,
    /// Bytes of thread stacks below their blocked threads' stack pointers, not read: dead
    /// frames, whose stale pointers would keep dropped blocks looking referenced.
    pub dead_stack_bytes: u64,
    /// Tracked blocks (all stacks), and how many a root reaches.
    pub blocks: u64,
    pub reachable: u64,
    pub elapsed_ms: u64,
    pub cpu_ms: u64,
    /// False when a bound stopped the scan: then "lost" may be wrong, and is not said.
    pub complete: bool,
}

/// What first referred to a block.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum From {
    Global(String),
    Stack,
    Untracked,
    Block(i64),
}

/// How well a referrer names the owner: lower is better.
fn rank(from: &From) -> u8 {
    match from {
        From::Global(name) if name.starts_with("global") => 0,
        From::Stack => 1,
        From::Block(_) => 2,
        From::Global(_) => 3,
        From::Untracked => 4,
    }
}

/// The best rank a word from `source` can give.
fn rank_of(source: &Source) -> u8 {
    match source {
        Source::Root(Region::Data(_)) => 0,
        Source::Root(Region::Stack) => 1,
        Source::Block(_) => 2,
        Source::Root(Region::Untracked) => 4,
    }
}

/// The kind of a root mapping.
#[derive(Clone, Debug)]
enum Region {
    /// A file's writable data (or the bss after it): the mapping that gives its bias.
    Data(Mapping),
    Stack,
    Untracked,
}

struct Scanner<'a> {
    memory: &'a Memory,
    all: &'a Blocks,
    /// The lowest block address and the end of the highest: a quick test before a search.
    range: (u64, u64),
    reached: HashMap<u64, From>,
    queue: Vec<Block>,
    /// The object behind each data mapping, by its start, for global names.
    objects: HashMap<u64, Option<Arc<objects::ObjectFile>>>,
    scan: NativeScan,
    deadline: Instant,
    max_bytes: u64,
}

/// Who refers to the `asked` stacks' blocks, among `all` the tracked blocks, in the process
/// `memory` reads (mappings `maps`); `describe` names a stack ("app.c:12 cache_put").
pub fn find(
    memory: &Memory,
    maps: &[Mapping],
    all: &Blocks,
    asked: &dyn Fn(i64) -> bool,
    describe: &dyn Fn(i64) -> String,
    limits: &Limits,
) -> (Vec<Owner>, NativeScan) {
    let (started, cpu) = (Instant::now(), super::thread_cpu_ms());
    let first = all.iter().next().map_or(0, |b| b.addr);
    let last = all.iter().map(|b| b.addr + b.size).max().unwrap_or(0);
    let mut s = Scanner {
        memory,
        all,
        range: (first, last),
        reached: HashMap::new(),
        queue: Vec::new(),
        objects: HashMap::new(),
        scan: NativeScan {
            blocks: all.len() as u64,
            complete: true,
            ..NativeScan::default()
        },
        deadline: started + limits.time,
        max_bytes: limits.max_bytes,
    };
    s.scan_roots(&roots(maps));
    while let Some(b) = s.queue.pop() {
        s.scan_words(b.addr, b.addr + b.size, &Source::Block(b));
    }
    s.scan.reachable = s.reached.len() as u64;
    s.scan.elapsed_ms = started.elapsed().as_millis() as u64;
    s.scan.cpu_ms = super::thread_cpu_ms() - cpu;
    let owners = owners(&s, asked, describe);
    (owners, s.scan)
}

/// The mappings whose words are roots, with what they are.
fn roots(maps: &[Mapping]) -> Vec<(Mapping, Region)> {
    let mut out = Vec::new();
    for (i, m) in maps.iter().enumerate() {
        let special = m
            .path
            .as_deref()
            .is_some_and(|p| p.starts_with('[') && p != "[heap]");
        if !m.readable || !m.writable || (special && m.path.as_deref() != Some("[stack]")) {
            continue;
        }
        let before = i
            .checked_sub(1)
            .map(|j| &maps[j])
            .filter(|p| p.end == m.start);
        let region = match m.path.as_deref() {
            Some("[stack]") => Region::Stack,
            _ if m.is_file() => Region::Data(m.clone()),
            // The bss right after a file's data.
            None if before.is_some_and(|p| p.is_file() && p.writable) => {
                Region::Data(before.expect("checked").clone())
            }
            // A thread's stack: glibc puts a guard page below it.
            None if before.is_some_and(|p| !p.readable && !p.writable) => Region::Stack,
            _ => Region::Untracked,
        };
        out.push((m.clone(), region));
    }
    out
}

/// Where the words being scanned are.
enum Source<'r> {
    Root(&'r Region),
    Block(Block),
}

impl Scanner<'_> {
    /// Scans every root, thread stacks from their threads' stack pointers up; then the
    /// dead part of a stack whose thread has since gone deeper (or runs), which the target
    /// may have written meanwhile.
    fn scan_roots(&mut self, roots: &[(Mapping, Region)]) {
        let sps = live_stack::stack_pointers(self.memory.pid());
        let mut cut = Vec::new();
        for (m, region) in roots {
            self.scan.regions += 1;
            let from = match region {
                Region::Stack => live_stack::live_from(m.start, m.end, &sps),
                _ => m.start,
            };
            if from > m.start {
                cut.push((m, region, from));
            }
            self.scan_root(from, m.end, region);
        }
        let sps = live_stack::stack_pointers(self.memory.pid());
        for (m, region, from) in cut {
            let again = live_stack::live_from(m.start, m.end, &sps).min(from);
            self.scan_root(again, from, region);
            self.scan.dead_stack_bytes += again - m.start;
        }
    }

    /// Scans the parts of [start, end) of a root mapping that are not tracked blocks.
    fn scan_root(&mut self, start: u64, end: u64, region: &Region) {
        let mut at = start;
        let gaps: Vec<(u64, u64)> = self
            .all
            .overlapping(start, end)
            .iter()
            .map(|b| (b.addr, b.addr + b.size))
            .chain([(end, end)])
            .collect();
        for (gap_end, next) in gaps {
            if gap_end > at {
                self.scan_words(at, gap_end.min(end), &Source::Root(region));
            }
            at = at.max(next);
        }
    }

    /// Reads [start, end) a chunk at a time; every word that points into a tracked block
    /// reaches it.
    fn scan_words(&mut self, start: u64, end: u64, source: &Source) {
        const CHUNK: u64 = 1 << 20;
        let mut buf = vec![0u8; CHUNK.min(end.saturating_sub(start) + 8) as usize];
        let mut at = start.next_multiple_of(8);
        while at + 8 <= end {
            if self.scan.bytes_scanned >= self.max_bytes || Instant::now() > self.deadline {
                self.scan.complete = false;
                return;
            }
            let n = (end - at).min(CHUNK) & !7;
            let bytes = &mut buf[..n as usize];
            if self.memory.read(at, bytes).is_err() {
                self.scan.unreadable_bytes += n;
            } else {
                self.scan.bytes_scanned += n;
                for (i, w) in bytes.chunks_exact(8).enumerate() {
                    let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
                    self.reach(v, at + i as u64 * 8, source);
                }
            }
            at += n;
        }
    }

    /// `value`, read at `addr`, reaches the block it points into; a block reached before
    /// keeps the better named referrer (a global's name over memory memleak did not see).
    fn reach(&mut self, value: u64, addr: u64, source: &Source) {
        if value < self.range.0 || value >= self.range.1 {
            return;
        }
        let Some(b) = self.all.containing(value).copied() else {
            return;
        };
        // glibc's pointers to the next chunk's header (its `top`, free chunks' links) land
        // in the last 16 bytes of a block: not a reference to it.
        if value != b.addr && value - b.addr + 16 >= b.size {
            return;
        }
        let before = self.reached.get(&b.addr).map(rank);
        if before.is_some_and(|r| r <= rank_of(source)) {
            return;
        }
        let from = match source {
            Source::Block(own) if own.addr == b.addr => return,
            Source::Block(own) => From::Block(own.stack_id),
            Source::Root(Region::Stack) => From::Stack,
            Source::Root(Region::Untracked) => From::Untracked,
            Source::Root(Region::Data(file)) => From::Global(self.global_name(file, addr)),
        };
        if before.is_some_and(|r| r <= rank(&from)) {
            return;
        }
        if self.reached.insert(b.addr, from).is_none() {
            self.queue.push(b);
        }
    }

    /// "global `cache_table` (app)" for the word at `addr` of `file`'s data, or "the data of
    /// app" when no symbol covers it.
    fn global_name(&mut self, file: &Mapping, addr: u64) -> String {
        let pid = self.memory.pid();
        let loaded = self
            .objects
            .entry(file.start)
            .or_insert_with(|| objects::with_data_symbols(pid, file).ok());
        let symbol = loaded.as_ref().and_then(|o| {
            let bias = o.bias(file)?;
            o.data_symbol(addr.wrapping_sub(bias)).map(str::to_string)
        });
        let name = file.file_name().unwrap_or("?");
        match symbol {
            Some(symbol) => format!("global `{symbol}` ({name})"),
            None => format!("the data of {name}"),
        }
    }
}

/// The asked stacks' blocks grouped by what refers to them, largest first.
fn owners(
    s: &Scanner,
    asked: &dyn Fn(i64) -> bool,
    describe: &dyn Fn(i64) -> String,
) -> Vec<Owner> {
    let mut groups: HashMap<(i64, Option<From>), (u64, u64)> = HashMap::new();
    for b in s.all.iter().filter(|b| asked(b.stack_id)) {
        let from = s.reached.get(&b.addr).cloned();
        if from.is_none() && !s.scan.complete {
            continue;
        }
        let g = groups.entry((b.stack_id, from)).or_default();
        g.0 += 1;
        g.1 += b.size;
    }
    let mut owners: Vec<Owner> = groups
        .into_iter()
        .map(|((stack_id, from), (count, bytes))| {
            let (held_by, root, advice) = words(from.as_ref(), stack_id, describe);
            Owner {
                stack_id,
                type_name: "native block".into(),
                count,
                bytes,
                held_by,
                root,
                advice,
            }
        })
        .collect();
    owners.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.held_by.cmp(&b.held_by)));
    owners
}

/// The referrer in words, its root kind, and advice.
fn words(
    from: Option<&From>,
    stack_id: i64,
    describe: &dyn Fn(i64) -> String,
) -> (String, Root, Option<String>) {
    match from {
        None => (
            "unreferenced: lost".into(),
            Root::Lost,
            Some("no pointer to them is left: a free is missing on this path".into()),
        ),
        Some(From::Global(name)) => (format!("referenced from {name}"), Root::Global, None),
        Some(From::Stack) => (
            "referenced from a thread's stack".into(),
            Root::ThreadStack,
            None,
        ),
        Some(From::Untracked) => (
            "referenced from memory memleak did not see allocated (before it attached?)".into(),
            Root::Untracked,
            None,
        ),
        Some(From::Block(s)) if *s == stack_id => (
            "referenced from other blocks of this stack".into(),
            Root::NativeBlock,
            None,
        ),
        Some(From::Block(s)) => (
            format!("referenced from blocks allocated at {}", describe(*s)),
            Root::NativeBlock,
            None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::procmaps::parse;

    /// Data, its bss, a thread stack under its guard page, the heap and the main stack are
    /// roots; read-only, inaccessible and special mappings are not.
    #[test]
    fn roots_are_the_writable_mappings_named_for_what_they_are() {
        let maps = parse(
            "555555554000-555555555000 r--p 00000000 08:01 42 /usr/bin/app\n\
             555555557000-555555558000 rw-p 00003000 08:01 42 /usr/bin/app\n\
             555555558000-555555559000 rw-p 00000000 00:00 0 \n\
             555555559000-55555557a000 rw-p 00000000 00:00 0 [heap]\n\
             7ffff7000000-7ffff7001000 ---p 00000000 00:00 0 \n\
             7ffff7001000-7ffff7801000 rw-p 00000000 00:00 0 \n\
             7ffff7ff9000-7ffff7ffd000 r--p 00000000 00:00 0 [vvar]\n\
             7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0 [stack]\n",
        );
        let kinds: Vec<(u64, &str)> = roots(&maps)
            .iter()
            .map(|(m, r)| {
                let kind = match r {
                    Region::Data(file) if file.start == 0x555555557000 => "data",
                    Region::Data(_) => "other data",
                    Region::Stack => "stack",
                    Region::Untracked => "untracked",
                };
                (m.start, kind)
            })
            .collect();
        assert_eq!(
            kinds,
            [
                (0x555555557000, "data"),
                (0x555555558000, "data"),
                (0x555555559000, "untracked"),
                (0x7ffff7001000, "stack"),
                (0x7ffffffde000, "stack"),
            ]
        );
    }

    #[test]
    fn blocks_overlapping_a_range() {
        let b = |addr, size| Block {
            addr,
            size,
            stack_id: 1,
        };
        let blocks = Blocks::new(vec![b(300, 50), b(100, 50), b(200, 50)]);
        let addrs = |s, e| {
            blocks
                .overlapping(s, e)
                .iter()
                .map(|b| b.addr)
                .collect::<Vec<_>>()
        };
        assert_eq!(addrs(0, 100), Vec::<u64>::new());
        assert_eq!(addrs(120, 210), [100, 200]);
        assert_eq!(addrs(150, 200), Vec::<u64>::new());
        assert_eq!(addrs(0, 1000), [100, 200, 300]);
    }
}
