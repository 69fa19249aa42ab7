//! Native stacks without frame pointers: userspace half of the BPF stack walker.
//!
//! [`Rows`] builds unwind rows ([`table`]) once per executable object any traced process
//! maps and stores them in the row array the walker in `memleak-ebpf/src/unwind.rs` searches;
//! each process's [`Unwinder`] keeps its own mapping table (its slot's entries) current as
//! libraries come and go. [`read_stack`] turns a stack id the BPF
//! program recorded back into frame addresses.

pub mod table;

use std::{
    collections::HashMap,
    fmt,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::{
    bpf_map,
    mapped::MappedArray,
    objects::{self, ObjectFile},
    procmaps::Mapping,
};
use anyhow::{Result, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use memleak_common::{
    PyFrame, StackRecord,
    names::maps,
    unwind::{MAX_UNWIND_MAPPINGS, UnwindControl, UnwindMapping, UnwindRow, mode},
};

/// `--unwind`: how the BPF program walks native stacks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum UnwindMode {
    /// `.eh_frame` unwind tables (works for code built without frame pointers).
    #[default]
    Dwarf,
    /// Frame pointers only: no tables to build, but stacks stop at the first function
    /// built without them (glibc, libpython...).
    Fp,
}

/// One stack as the BPF program stored it. Every native frame is a return address (the first
/// is where the allocator call returns to), so symbolize `addr - 1`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    /// Innermost first.
    pub native: Vec<u64>,
    pub python: Vec<PyFrame>,
    /// The walk stopped before the outermost frame (unknown mapping, unreadable stack,
    /// unsupported rule, or the frame limit).
    pub truncated: bool,
    /// `StackRecord::python_dropped`.
    pub python_dropped: u32,
    /// The process whose stack it is (`StackRecord::tgid`; 0 for a kernel stack).
    pub tgid: u32,
}

/// Looks up `stack_id` (an `AllocInfo::stack_id`) in the `STACKS` map.
pub fn read_stack<T: std::borrow::Borrow<MapData>>(
    stacks: &aya::maps::HashMap<T, u64, StackRecord>,
    stack_id: i64,
) -> Option<Stack> {
    let id = u64::try_from(stack_id).ok()?;
    let rec = stacks.get(&id, 0).ok()?;
    let native = rec.native.get(..rec.native_len as usize)?.to_vec();
    let python = rec.python.get(..rec.python_len as usize)?.to_vec();
    Some(Stack {
        native,
        python,
        truncated: rec.truncated != 0,
        python_dropped: rec.python_dropped,
        tgid: rec.tgid,
    })
}

/// What building the tables cost, per object and in total (`--verbose`).
#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub objects: Vec<ObjectSummary>,
    /// Mappings currently published to the walker.
    pub mappings: usize,
    pub rows: u32,
    pub max_rows: u32,
    pub build_time: Duration,
}

#[derive(Clone, Debug)]
pub struct ObjectSummary {
    pub path: String,
    pub rows: usize,
    pub unsupported: usize,
    pub build_time: Duration,
    /// Why the object has no table (its frames fall back to frame pointers).
    pub error: Option<String>,
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "unwind tables: {} rows of {} ({} KiB) for {} objects, {} mappings, built in {} ms",
            self.rows,
            self.max_rows,
            self.rows as usize * size_of::<UnwindRow>() / 1024,
            self.objects.len(),
            self.mappings,
            self.build_time.as_millis()
        )?;
        for o in &self.objects {
            write!(
                f,
                "  {:>7} rows {:>5} unsupported {:>5} ms  {}",
                o.rows,
                o.unsupported,
                o.build_time.as_millis(),
                o.path
            )?;
            match &o.error {
                Some(e) => writeln!(f, "  (no table: {e})")?,
                None => writeln!(f)?,
            }
        }
        Ok(())
    }
}

/// An object file whose rows are already in the row array.
struct Loaded {
    first_row: u32,
    row_count: u32,
    /// Its segments, to place its mappings; `None` when it could not be read.
    object: Option<Arc<ObjectFile>>,
}

/// The rows of every object any traced process maps, in the one `UNWIND_ROWS` array: a libc
/// that eight workers map has its rows built and stored once.
pub struct Rows {
    mode: UnwindMode,
    area: RowArea,
    next_row: u32,
    /// Keyed by (device, inode): the same file mapped twice, or by two processes, shares its
    /// rows.
    objects: HashMap<objects::Key, Loaded>,
    /// The last `UnwindControl::generation` handed out: generations are unique across
    /// processes, since the walker's per-CPU row cache does not know whose table a row is of.
    generation: u32,
    summary: Summary,
}

impl Rows {
    /// Takes the row array out of `ebpf`.
    pub fn new(ebpf: &mut Ebpf, mode: UnwindMode) -> Result<Rows> {
        let area = RowArea(MappedArray::new(
            bpf_map::take(ebpf, maps::UNWIND_ROWS)?,
            "unwind row array",
        )?);
        Ok(Rows {
            mode,
            summary: Summary {
                max_rows: area.0.capacity() as u32,
                ..Default::default()
            },
            area,
            next_row: 0,
            objects: HashMap::new(),
            generation: 0,
        })
    }

    /// For a started command still held before its exec: builds the tables of the files it
    /// will map (its executable, libc), placed once it maps them (`Unwinder::update`).
    pub fn prepare(&mut self, exe: &Path, files: &[&Path]) {
        if self.mode == UnwindMode::Fp {
            return;
        }
        for path in std::iter::once(&exe).chain(files) {
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            let key = objects::key_of(&meta);
            if !self.objects.contains_key(&key) {
                let loaded = self.load(path.display().to_string(), objects::of_path(path));
                self.objects.insert(key, loaded);
            }
        }
    }

    /// The walker's view of mapping `m` of `pid`, its object's rows built first if new.
    fn place(&mut self, pid: u32, m: &Mapping) -> UnwindMapping {
        let key = (m.dev.clone(), m.inode);
        if !self.objects.contains_key(&key) {
            let object = objects::of_mapping(pid, m);
            let loaded = self.load(m.path.clone().unwrap_or_default(), object);
            self.objects.insert(key.clone(), loaded);
        }
        let loaded = &self.objects[&key];
        UnwindMapping {
            start: m.start,
            end: m.end,
            bias: loaded.object.as_ref().and_then(|o| o.bias(m)).unwrap_or(0),
            first_row: loaded.first_row,
            row_count: loaded.row_count,
        }
    }

    /// Builds and stores the rows of one object file. Never fails: an object without a
    /// table is walked with frame pointers, and the summary says why.
    fn load(&mut self, path: String, object: Result<objects::Loaded>) -> Loaded {
        let started = Instant::now();
        let result = object.and_then(|object| self.build_and_store(object));
        let build_time = started.elapsed();
        self.summary.build_time += build_time;
        self.summary.rows = self.next_row;
        let (loaded, unsupported, error) = match result {
            Ok((loaded, unsupported)) => (loaded, unsupported, None),
            Err(e) => {
                let loaded = Loaded {
                    first_row: 0,
                    row_count: 0,
                    object: None,
                };
                (loaded, 0, Some(format!("{e:#}")))
            }
        };
        self.summary.objects.push(ObjectSummary {
            path,
            rows: loaded.row_count as usize,
            unsupported,
            build_time,
            error,
        });
        loaded
    }

    fn build_and_store(&mut self, object: objects::Loaded) -> Result<(Loaded, usize)> {
        let table = table::build(&object.bytes)?;
        let row_count = u32::try_from(table.rows.len())?;
        let first_row = self.next_row;
        self.area.write(first_row, &table.rows)?;
        self.next_row += row_count;
        let loaded = Loaded {
            first_row,
            row_count,
            object: Some(object.object),
        };
        Ok((loaded, table.unsupported))
    }

    fn next_generation(&mut self) -> u32 {
        self.generation = self.generation.wrapping_add(1).max(1);
        self.generation
    }
}

/// One process's mapping table: its slot's two halves of `UNWIND_MAPPINGS` and its
/// `UNWIND_CONTROL` entry, kept in step with what it maps.
pub struct Unwinder {
    pid: u32,
    slot: u32,
    mode: UnwindMode,
    mappings: Array<MapData, UnwindMapping>,
    control: Array<MapData, UnwindControl>,
    /// What the walker currently sees, to notice when the target's mappings change.
    published: Vec<UnwindMapping>,
    /// Which half of the slot's range the walker reads (0 or 1).
    half: u32,
}

impl Unwinder {
    /// Opens the process's entries of the unwind maps and publishes an empty table;
    /// `update` fills it.
    pub fn new(ebpf: &Ebpf, rows: &mut Rows, pid: u32, slot: u32) -> Result<Unwinder> {
        let mut unwinder = Unwinder {
            pid,
            slot,
            mode: rows.mode,
            mappings: Array::try_from(bpf_map::open(ebpf, maps::UNWIND_MAPPINGS)?)?,
            control: Array::try_from(bpf_map::open(ebpf, maps::UNWIND_CONTROL)?)?,
            published: Vec::new(),
            half: 1,
        };
        unwinder.publish(rows, Vec::new())?;
        Ok(unwinder)
    }

    /// What the tables cost, with this process's mappings (`--verbose`).
    pub fn summary(&self, rows: &Rows) -> Summary {
        Summary {
            mappings: self.published.len(),
            ..rows.summary.clone()
        }
    }

    /// Takes the target's mappings (a maps tick's read): builds tables for new executable
    /// mappings (a dlopen) and republishes if anything changed. Returns whether it did.
    pub fn update(&mut self, rows: &mut Rows, maps: &[Mapping]) -> Result<bool> {
        if self.mode == UnwindMode::Fp {
            return Ok(false);
        }
        let mut table: Vec<UnwindMapping> = maps
            .iter()
            .filter(|m| m.executable && m.is_file())
            .map(|m| rows.place(self.pid, m))
            .collect();
        table.truncate(MAX_UNWIND_MAPPINGS as usize);
        if table == self.published {
            return Ok(false);
        }
        self.publish(rows, table)?;
        Ok(true)
    }

    /// Writes `table` into the half of the slot's range the walker is not reading, then
    /// points the walker at it: a walk in progress never sees a half-written table.
    fn publish(&mut self, rows: &mut Rows, table: Vec<UnwindMapping>) -> Result<()> {
        let half = 1 - self.half;
        let base = (2 * self.slot + half) * MAX_UNWIND_MAPPINGS;
        for (i, m) in table.iter().enumerate() {
            self.mappings.set(base + i as u32, m, 0)?;
        }
        let control = UnwindControl {
            base,
            count: table.len() as u32,
            mode: match self.mode {
                UnwindMode::Dwarf => mode::DWARF,
                UnwindMode::Fp => mode::FRAME_POINTER,
            },
            generation: rows.next_generation(),
        };
        self.control.set(self.slot, control, 0)?;
        self.half = half;
        self.published = table;
        Ok(())
    }
}

/// The row array, mapped into this process (the map is `BPF_F_MMAPABLE`): a million rows are
/// a memcpy instead of a million map updates.
struct RowArea(MappedArray<UnwindRow>);

impl RowArea {
    fn write(&mut self, first: u32, rows: &[UnwindRow]) -> Result<()> {
        let end = first as usize + rows.len();
        let Some(dst) = self
            .0
            .entry(first as usize)
            .filter(|_| end <= self.0.capacity())
        else {
            bail!("the unwind row array is full ({} rows)", self.0.capacity());
        };
        // In bounds (checked above) of the mapping.
        unsafe { std::ptr::copy_nonoverlapping(rows.as_ptr(), dst, rows.len()) };
        Ok(())
    }
}

#[cfg(test)]
mod tests;
