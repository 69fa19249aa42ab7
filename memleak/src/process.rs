//! One traced process (user mode): the target, its exec generation, what it maps (read once
//! per maps tick and handed to every consumer) and the unwind tables the walker uses for it.

use anyhow::Result;
use aya::{
    Ebpf,
    maps::{Array, MapData},
};
use memleak_common::names::maps;

use crate::{bpf_map, procmaps::Mapping, target::Target, unwind::Unwinder};

pub struct Process {
    pub target: Target,
    pub unwinder: Unwinder,
    /// `EXECS`: how many times the process has exec'd since memleak attached.
    execs: Array<MapData, u32>,
    execs_seen: u32,
    /// A started command that has not exec'd yet: what its first exec drops is memleak's
    /// own fork's doing, not worth a word.
    launching: bool,
    /// The last `/proc/PID/maps` read that showed a live process.
    maps: Vec<Mapping>,
}

/// The process exec'd: allocations made under an earlier generation are the old program's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exec {
    pub generation: u32,
    /// The exec of a started command (memleak's fork becoming the command).
    pub launch: bool,
}

impl Process {
    pub fn new(ebpf: &mut Ebpf, target: Target, unwinder: Unwinder) -> Result<Process> {
        Ok(Process {
            launching: target.child.is_some(),
            target,
            unwinder,
            execs: Array::try_from(bpf_map::take(ebpf, maps::EXECS)?)?,
            execs_seen: 0,
            maps: Vec::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.target.pid
    }

    /// The exec the BPF program counted since the last call, if any.
    pub fn new_exec(&mut self) -> Result<Option<Exec>> {
        let generation = self.execs.get(&0, 0)?;
        if generation <= self.execs_seen {
            return Ok(None);
        }
        self.execs_seen = generation;
        let launch = std::mem::take(&mut self.launching);
        Ok(Some(Exec { generation, launch }))
    }

    /// Reads `/proc/PID/maps` once for every consumer; true when the mappings changed. A
    /// process that is gone, or exiting (its maps file reads empty, which a live process's
    /// never does), keeps its last mappings: they still name the stacks of its final table.
    pub fn read_maps(&mut self) -> bool {
        let Ok(maps) = crate::procmaps::read(self.pid()) else {
            return false;
        };
        if maps.is_empty() || maps == self.maps {
            return false;
        }
        self.maps = maps;
        true
    }

    /// Hands the mappings of the last read to the unwinder; true when it republished.
    pub fn update_unwinder(&mut self) -> Result<bool> {
        self.unwinder.update(&self.maps)
    }

    /// The mappings of the last read.
    pub fn maps(&self) -> &[Mapping] {
        &self.maps
    }
}
