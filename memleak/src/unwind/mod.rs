//! Native stacks without frame pointers: userspace half of the BPF stack walker.
//!
//! [`Unwinder`] builds unwind rows ([`table`]) for every executable file mapping of the
//! target, writes them into the BPF maps the walker in `memleak-ebpf/src/unwind.rs` searches,
//! and keeps them current as libraries come and go. [`read_stack`] turns a stack id the BPF
//! program recorded back into frame addresses.

pub mod table;

use std::{
    collections::HashMap,
    fmt,
    num::NonZeroU32,
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{
        UProbe,
        uprobe::{UProbeLink, UProbeScope},
    },
};
use memleak_common::{
    PyFrame, StackRecord,
    names::{maps, programs},
    unwind::{MAX_UNWIND_MAPPINGS, UnwindControl, UnwindMapping, UnwindRow, mode},
};
use object::{Object, ObjectSegment};

use crate::{
    bpf_map,
    mapped::MappedArray,
    procmaps::{self, Mapping},
    target_files::{MAX_OBJECT_FILE, TargetFiles},
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
    /// PT_LOAD segments as (file offset, file size, virtual address), to place mappings.
    segments: Vec<(u64, u64, u64)>,
}

/// Owns the unwind maps of a loaded BPF program and keeps them in step with the target.
pub struct Unwinder {
    pid: u32,
    mode: UnwindMode,
    rows: RowArea,
    next_row: u32,
    mappings: Array<MapData, UnwindMapping>,
    control: Array<MapData, UnwindControl>,
    /// Keyed by (device, inode): the same file mapped twice shares its rows.
    objects: HashMap<(String, u64), Loaded>,
    /// What the walker currently sees, to notice when the target's mappings change.
    published: Vec<UnwindMapping>,
    current_base: u32,
    /// `UnwindControl::generation` of the last publish.
    generation: u32,
    /// The probe that stops a started command at its entry point; `follow_exec` removes it
    /// (a later exec of the same program must not stop again) and continues the command.
    hold: Option<UProbeLink>,
    summary: Summary,
}

impl Unwinder {
    /// Takes the unwind maps out of `ebpf` and publishes an empty table; `refresh` fills it.
    pub fn new(ebpf: &mut Ebpf, pid: u32, mode: UnwindMode) -> Result<Unwinder> {
        let rows = RowArea(MappedArray::new(
            bpf_map::take(ebpf, maps::UNWIND_ROWS)?,
            "unwind row array",
        )?);
        let mappings = Array::try_from(bpf_map::take(ebpf, maps::UNWIND_MAPPINGS)?)?;
        let control = Array::try_from(bpf_map::take(ebpf, maps::UNWIND_CONTROL)?)?;
        let mut unwinder = Unwinder {
            pid,
            mode,
            summary: Summary {
                max_rows: rows.0.capacity() as u32,
                ..Default::default()
            },
            rows,
            next_row: 0,
            mappings,
            control,
            objects: HashMap::new(),
            published: Vec::new(),
            current_base: MAX_UNWIND_MAPPINGS,
            generation: 0,
            hold: None,
        };
        unwinder.publish(Vec::new())?;
        Ok(unwinder)
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// Re-reads the target's mappings; builds tables for new executable mappings (a dlopen)
    /// and republishes if anything changed. Returns whether it did.
    pub fn refresh(&mut self) -> Result<bool> {
        if self.mode == UnwindMode::Fp {
            return Ok(false);
        }
        let maps = procmaps::read(self.pid)?;
        self.update(&maps)
    }

    /// For a started command still held before its exec: builds the tables of the files it
    /// will map (its executable, libc), and stops it at its executable's entry point, where
    /// the dynamic loader has mapped every library and none of its code has run, until
    /// `follow_exec` has placed them.
    pub fn prepare(&mut self, ebpf: &mut Ebpf, exe: &Path, files: &[&Path]) -> Result<()> {
        if self.mode == UnwindMode::Fp {
            return Ok(());
        }
        for path in std::iter::once(&exe).chain(files) {
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            let key = (device(meta.dev()), meta.ino());
            if !self.objects.contains_key(&key) {
                let data =
                    std::fs::read(path).with_context(|| format!("reading {}", path.display()));
                let loaded = self.load(path.display().to_string(), data);
                self.objects.insert(key, loaded);
            }
        }
        // A script has no entry point of its own: its interpreter's tables come with the
        // maps refresh instead.
        let Some(offset) = std::fs::read(exe).ok().and_then(|d| entry_offset(&d)) else {
            return Ok(());
        };
        let prog: &mut UProbe = ebpf
            .program_mut(programs::HOLD_AT_ENTRY)
            .with_context(|| format!("BPF object lacks program {}", programs::HOLD_AT_ENTRY))?
            .try_into()?;
        prog.load()?;
        let pid = NonZeroU32::new(self.pid).context("PID 0")?;
        let link = prog
            .attach(offset, exe, UProbeScope::OneProcess(pid))
            .with_context(|| format!("attaching to the entry of {}", exe.display()))?;
        self.hold = Some(prog.take_link(link)?);
        Ok(())
    }

    /// Right after a held command is released: waits (2 s at most) for it to stop at its
    /// entry point, places the tables of everything mapped by then, runs `while_held` (the
    /// libraries are all mapped: a command that exits within milliseconds must still be
    /// symbolized) and lets it run on. A command that failed to start is left to the exit
    /// watcher.
    pub fn follow_exec(&mut self, while_held: impl FnOnce()) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while !stopped(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = self.refresh();
        while_held();
        drop(hold);
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGCONT) };
    }

    fn update(&mut self, maps: &[Mapping]) -> Result<bool> {
        let mut table = Vec::new();
        for m in maps.iter().filter(|m| m.executable && m.is_file()) {
            let key = (m.dev.clone(), m.inode);
            if !self.objects.contains_key(&key) {
                let data = read_mapped_file(self.pid, m);
                let loaded = self.load(m.path.clone().unwrap_or_default(), data);
                self.objects.insert(key.clone(), loaded);
            }
            let loaded = &self.objects[&key];
            table.push(UnwindMapping {
                start: m.start,
                end: m.end,
                bias: bias(m, &loaded.segments).unwrap_or(0),
                first_row: loaded.first_row,
                row_count: loaded.row_count,
            });
        }
        table.truncate(MAX_UNWIND_MAPPINGS as usize);
        if table == self.published {
            return Ok(false);
        }
        self.publish(table)?;
        Ok(true)
    }

    /// Builds and stores the rows of one object file. Never fails: an object without a
    /// table is walked with frame pointers, and the summary says why.
    fn load(&mut self, path: String, data: Result<Vec<u8>>) -> Loaded {
        let started = Instant::now();
        let result = data.and_then(|data| self.build_and_store(&data));
        let build_time = started.elapsed();
        self.summary.build_time += build_time;
        self.summary.rows = self.next_row;
        let (loaded, unsupported, error) = match result {
            Ok((loaded, unsupported)) => (loaded, unsupported, None),
            Err(e) => {
                let loaded = Loaded {
                    first_row: 0,
                    row_count: 0,
                    segments: Vec::new(),
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

    fn build_and_store(&mut self, data: &[u8]) -> Result<(Loaded, usize)> {
        let file = object::File::parse(data).context("not an object file")?;
        let segments = file
            .segments()
            .map(|s| {
                let (offset, size) = s.file_range();
                (offset, size, s.address())
            })
            .collect();
        let table = table::build(data)?;
        let row_count = u32::try_from(table.rows.len())?;
        let first_row = self.next_row;
        self.rows.write(first_row, &table.rows)?;
        self.next_row += row_count;
        let loaded = Loaded {
            first_row,
            row_count,
            segments,
        };
        Ok((loaded, table.unsupported))
    }

    /// Writes `table` into the half of `UNWIND_MAPPINGS` the walker is not reading, then
    /// points the walker at it: a walk in progress never sees a half-written table.
    fn publish(&mut self, table: Vec<UnwindMapping>) -> Result<()> {
        let base = MAX_UNWIND_MAPPINGS - self.current_base;
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
            generation: self.generation.wrapping_add(1).max(1),
        };
        self.control.set(0, control, 0)?;
        self.generation = control.generation;
        self.current_base = base;
        self.summary.mappings = table.len();
        self.published = table;
        Ok(())
    }
}

/// Whether the process is in a group stop (`T` in `/proc/PID/stat`).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

/// The file offset of an executable's entry point (what a uprobe attaches to).
fn entry_offset(data: &[u8]) -> Option<u64> {
    let file = object::File::parse(data).ok()?;
    let entry = file.entry();
    file.segments().find_map(|s| {
        let (offset, size) = s.file_range();
        (s.address() <= entry && entry - s.address() < size)
            .then(|| offset.checked_add(entry - s.address()))
            .flatten()
    })
}

/// `st_dev` as `/proc/PID/maps` prints it.
fn device(dev: u64) -> String {
    format!("{:02x}:{:02x}", libc::major(dev), libc::minor(dev))
}

/// The file behind a mapping: through `map_files` (the very file mapped, even if replaced
/// on disk since), else by its path as the target could read it.
fn read_mapped_file(pid: u32, m: &Mapping) -> Result<Vec<u8>> {
    let by_map_files = procmaps::map_file_path(pid, m);
    std::fs::read(&by_map_files).or_else(|e| {
        let path = m.path.as_deref().unwrap_or_default();
        TargetFiles::new(pid)
            .read(Path::new(path), MAX_OBJECT_FILE, b"")
            .map_err(|why| {
                anyhow::Error::new(e)
                    .context(format!("reading {}", by_map_files.display()))
                    .context(format!("{path}: {why}"))
            })
    })
}

/// Runtime address − object address for mapping `m`: the PT_LOAD segment that holds the
/// mapping's file offset says which object address the mapping starts at.
fn bias(m: &Mapping, segments: &[(u64, u64, u64)]) -> Option<u64> {
    let (offset, _, vaddr) = segments
        .iter()
        .find(|(offset, size, _)| *offset <= m.offset && m.offset - offset < *size)?;
    Some(m.start.wrapping_sub(vaddr.wrapping_add(m.offset - offset)))
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
