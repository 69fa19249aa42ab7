//! One traced process (user mode): the target, its slot in the per-process maps, its exec
//! generation, what it maps (read once per maps tick and handed to every consumer) and the
//! unwind tables the walker uses for it.

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
    programs::uprobe::UProbeLink,
};
use memleak_common::{Traced, names::maps};

use crate::{
    bpf_map,
    procmaps::Mapping,
    target::Target,
    unwind::{Rows, Unwinder},
};

pub struct Process {
    pub target: Target,
    /// Its index in the per-process maps, and the high bits of its block keys.
    pub slot: u32,
    pub unwinder: Unwinder,
    /// `TRACED`: its entry there says the BPF programs trace it, and counts its execs.
    traced: HashMap<MapData, u32, Traced>,
    execs_seen: u32,
    /// A started command that has not exec'd yet: what its first exec drops is memleak's
    /// own fork's doing, not worth a word.
    launching: bool,
    /// The last `/proc/PID/maps` read that showed a live process.
    maps: Vec<Mapping>,
    /// The exec count `TRACED` showed just before that read: the maps are those of the
    /// program that generation runs.
    maps_generation: u32,
    /// How it ended, once it did (while others are still traced).
    pub exited: Option<String>,
    /// Its probes, detached when it exits.
    pub links: Vec<UProbeLink>,
    /// Found after memleak started (`--children`, `--cgroup`): how long after its start
    /// it was traced; what it did before is not seen.
    pub traced_after: Option<std::time::Duration>,
}

/// The process exec'd: allocations made under an earlier generation are the old program's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exec {
    pub generation: u32,
    /// The exec of a started command (memleak's fork becoming the command).
    pub launch: bool,
}

impl Process {
    /// Enters the process in `TRACED` under `slot` (before its probes are attached, so that
    /// its first allocation already has its slot) with an empty unwind table.
    pub fn new(ebpf: &Ebpf, rows: &mut Rows, target: Target, slot: u32) -> Result<Process> {
        let mut traced: HashMap<MapData, u32, Traced> =
            HashMap::try_from(bpf_map::open(ebpf, maps::TRACED)?)?;
        traced
            .insert(target.pid, Traced { slot, execs: 0 }, 0)
            .context("adding the process to the traced map")?;
        Ok(Process {
            launching: target.child.is_some(),
            unwinder: Unwinder::new(ebpf, rows, target.pid, slot)?,
            target,
            slot,
            traced,
            execs_seen: 0,
            maps: Vec::new(),
            maps_generation: 0,
            exited: None,
            links: Vec::new(),
            traced_after: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.target.pid
    }

    /// The exec the BPF program counted since the last call, if any.
    pub fn new_exec(&mut self) -> Option<Exec> {
        // Gone from the map: it exited and was forgotten.
        let generation = self.generation()?;
        if generation <= self.execs_seen {
            return None;
        }
        self.execs_seen = generation;
        let launch = std::mem::take(&mut self.launching);
        Some(Exec { generation, launch })
    }

    /// The process exited (`how`): the BPF programs forget it, its slot can be reused, and
    /// its probes are detached off the loop (each detach waits out an RCU grace period).
    pub fn forget(&mut self, how: String) {
        let _ = self.traced.remove(&self.pid());
        self.exited = Some(how);
        let links = std::mem::take(&mut self.links);
        if !links.is_empty() {
            std::thread::spawn(move || drop(links));
        }
    }

    /// Reads `/proc/PID/maps` once for every consumer; true when the mappings changed. A
    /// process that is gone, or exiting (its maps file reads empty, which a live process's
    /// never does), keeps its last mappings: they still name the stacks of its final table.
    pub fn read_maps(&mut self) -> bool {
        let generation = self.generation().unwrap_or(self.maps_generation);
        let Ok(maps) = crate::procmaps::read(self.pid()) else {
            return false;
        };
        if maps.is_empty() || maps == self.maps {
            return false;
        }
        self.maps = maps;
        self.maps_generation = generation;
        true
    }

    /// Makes the last read the mappings of the program `exec` started: kept if it came after
    /// that exec (a tick can read the new program's maps before it sees the exec count), else
    /// read now. An exec that ended too soon to be read leaves none.
    pub fn read_maps_after(&mut self, exec: Exec) {
        if self.maps_generation < exec.generation {
            self.maps.clear();
            self.read_maps();
        }
    }

    fn generation(&self) -> Option<u32> {
        self.traced.get(&self.pid(), 0).ok().map(|t| t.execs)
    }

    /// Hands the mappings of the last read to the unwinder; true when it republished.
    pub fn update_unwinder(&mut self, rows: &mut Rows) -> Result<bool> {
        self.unwinder.update(rows, &self.maps)
    }

    /// The mappings of the last read.
    pub fn maps(&self) -> &[Mapping] {
        &self.maps
    }
}
