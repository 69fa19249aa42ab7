//! Keeps the BPF program's map of the target's Python threads (fs_base → `PyThreadState`)
//! equal to what the interpreter's own thread list says, and gives the loader the globals
//! the BPF frame walk needs.

use std::collections::HashSet;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};
use memleak_common::python::{PY_THREADS_MAP, PyOffsets};

use super::{PythonRuntime, btf};

/// The values of the BPF globals `PY_OFFSETS` and `TASK_FSBASE`: all zero when the target
/// runs no Python (the BPF program then reads no frames).
pub fn globals(runtime: Option<&PythonRuntime>) -> Result<(PyOffsets, u64)> {
    match runtime {
        Some(rt) => Ok((rt.offsets(), btf::task_fsbase_offset()? as u64)),
        None => Ok((PyOffsets::default(), 0)),
    }
}

pub struct ThreadMap {
    map: HashMap<MapData, u64, u64>,
    /// Keys written by the last sync, to delete threads that have exited.
    written: HashSet<u64>,
}

impl ThreadMap {
    /// Takes the map out of the loaded program and fills it.
    pub fn new(ebpf: &mut Ebpf, runtime: &PythonRuntime) -> Result<ThreadMap> {
        let map = ebpf
            .take_map(PY_THREADS_MAP)
            .with_context(|| format!("BPF object lacks map {PY_THREADS_MAP}"))?;
        let mut threads = ThreadMap {
            map: HashMap::try_from(map)?,
            written: HashSet::new(),
        };
        threads.sync(runtime)?;
        Ok(threads)
    }

    /// Re-reads the interpreter's thread list: new threads are added, exited ones removed.
    /// Call it often (every few hundred ms): a thread is invisible to the BPF program until
    /// then, and a pthread_t reused by a new thread must not keep its dead thread's state.
    pub fn sync(&mut self, runtime: &PythonRuntime) -> Result<()> {
        let threads = runtime.thread_states()?;
        let now: HashSet<u64> = threads.iter().map(|t| t.thread_id).collect();
        for gone in self.written.difference(&now) {
            // Already absent is fine: the goal is that it is not there.
            let _ = self.map.remove(gone);
        }
        for t in &threads {
            self.map
                .insert(t.thread_id, t.addr, 0)
                .context("updating the Python thread map")?;
        }
        self.written = now;
        Ok(())
    }
}
