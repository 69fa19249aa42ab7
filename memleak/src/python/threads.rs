//! Feeds the BPF frame walk: finds CPython in the target (now, or after the exec of a
//! started command), hands the BPF program its offsets, and keeps the map of the target's
//! Python threads (fs_base → `PyThreadState`) equal to the interpreter's own thread list.

use std::collections::HashSet;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, RingBuf},
};
use memleak_common::{names::maps, python::PyConfig};

use super::{PythonRuntime, btf, interpreter_files, layout::Version, learner::Learner};
use crate::{bpf_map, procmaps::Mapping};

pub struct PythonTracking {
    pid: u32,
    config: Array<MapData, PyConfig>,
    threads: HashMap<MapData, u64, u64>,
    runtime: Option<PythonRuntime>,
    /// Reads the code objects of new stacks into the runtime's cache.
    learner: Learner,
    /// The files last searched for CPython (see `interpreter_files`).
    looked_at: Vec<String>,
    /// Detection failed for good (an unsupported interpreter): stop trying.
    gave_up: bool,
}

impl PythonTracking {
    /// Takes the Python maps out of the loaded program; nothing is read from the target yet.
    pub fn new(ebpf: &mut Ebpf, pid: u32) -> Result<PythonTracking> {
        let mut take = |name| bpf_map::take(ebpf, name);
        Ok(PythonTracking {
            pid,
            config: Array::try_from(take(maps::PY_CONFIG)?)?,
            threads: HashMap::try_from(take(maps::PY_THREADS)?)?,
            runtime: None,
            learner: Learner::spawn(RingBuf::try_from(take(maps::PY_NEW_CODES)?)?, pid)?,
            looked_at: Vec::new(),
            gave_up: false,
        })
    }

    /// The interpreter, once found.
    pub fn runtime(&self) -> Option<&PythonRuntime> {
        self.runtime.as_ref()
    }

    pub fn runtime_mut(&mut self) -> Option<&mut PythonRuntime> {
        self.runtime.as_mut()
    }

    /// The process exec'd: the old interpreter, its threads and its config are gone (the BPF
    /// program stops reading frames until the new program's CPython, if any, is found).
    pub fn reset(&mut self) -> Result<()> {
        self.runtime = None;
        self.learner.read_into(None);
        self.looked_at.clear();
        self.gave_up = false;
        self.config
            .set(0, PyConfig::default(), 0)
            .context("clearing the Python config map")?;
        let keys: Vec<u64> = self.threads.keys().flatten().collect();
        for key in keys {
            let _ = self.threads.remove(&key);
        }
        Ok(())
    }

    /// Call with the process's mappings right after loading and then every maps tick: looks
    /// for CPython until found,
    /// then re-reads its thread list (a new thread has no Python frames until then, and a
    /// pthread_t reused by a new thread must not keep its dead thread's state). An error
    /// about the interpreter (unsupported version or build) comes once; tracing goes on
    /// without Python frames. Returns the interpreter's version the tick it is found.
    pub fn tick(&mut self, maps: &[Mapping]) -> Result<Option<Version>> {
        let mut found = None;
        if self.runtime.is_none() {
            // A target that is exiting has no files left to look at: nothing to say.
            let Ok(files) = interpreter_files(self.pid, maps) else {
                return Ok(None);
            };
            if self.gave_up || files == self.looked_at {
                return Ok(None);
            }
            self.looked_at = files;
            match PythonRuntime::detect_in(self.pid, maps) {
                Ok(Some(rt)) => {
                    found = Some(rt.version);
                    self.start(rt)?
                }
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.gave_up = true;
                    return Err(e.context("no Python frames"));
                }
            }
        }
        // A failed read (the target exiting, or changing its thread list under us) keeps
        // the last map; the next tick tries again.
        let _ = self.sync();
        Ok(found)
    }

    fn start(&mut self, runtime: PythonRuntime) -> Result<()> {
        let config = runtime.bpf_config(btf::task_fsbase_offset()? as u64);
        self.learner.read_into(Some(runtime.codes()));
        self.runtime = Some(runtime);
        self.sync()?;
        // Threads first: once the config is there, the BPF program starts looking them up.
        self.config
            .set(0, config, 0)
            .context("writing the Python config map")
    }

    fn sync(&mut self) -> Result<()> {
        let Some(rt) = &self.runtime else {
            return Ok(());
        };
        let threads = rt.thread_states()?;
        let now: HashSet<u64> = threads.iter().map(|t| t.thread_id).collect();
        // Keys the BPF program added itself are checked too.
        let keys: Vec<u64> = self.threads.keys().flatten().collect();
        for gone in keys.iter().filter(|k| !now.contains(k)) {
            // Already absent is fine: the goal is that it is not there.
            let _ = self.threads.remove(gone);
        }
        for t in &threads {
            self.threads
                .insert(t.thread_id, t.addr, 0)
                .context("updating the Python thread map")?;
        }
        Ok(())
    }
}
