//! Reads each code object the BPF program hands over (`PY_NEW_CODES`) the moment it does, on
//! a thread of its own: the event loop may be busy (symbolizing a table, building the unwind
//! tables of a library just loaded) for longer than a short script lives, and code objects
//! die with their function, their module or the process.

use std::{
    collections::HashMap,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use memleak_common::python::NewPythonCode;

use super::Codes;

/// The one reader of `PY_NEW_CODES` for every traced process: each code object goes to the
/// cache of the interpreter last found in the process it names (none before one is found, or
/// after an exec). Clones share it.
#[derive(Clone)]
pub struct Learner {
    /// Until the first process with Python starts the thread.
    ring: Arc<Mutex<Option<RingBuf<MapData>>>>,
    codes: Arc<Mutex<HashMap<u32, Codes>>>,
}

impl Learner {
    pub fn new(ring: RingBuf<MapData>) -> Learner {
        Learner {
            ring: Arc::new(Mutex::new(Some(ring))),
            codes: Arc::default(),
        }
    }

    /// Process `pid` runs CPython: its code objects are read into `codes` from now on.
    pub fn add(&self, pid: u32, codes: Codes) -> Result<()> {
        self.codes.lock().expect("not poisoned").insert(pid, codes);
        match self.ring.lock().expect("not poisoned").take() {
            Some(ring) => spawn(ring, self.codes.clone()),
            None => Ok(()),
        }
    }

    /// Process `pid` exec'd or exited: its interpreter is gone.
    pub fn remove(&self, pid: u32) {
        self.codes.lock().expect("not poisoned").remove(&pid);
    }
}

/// Starts the thread; it reads into each process's codes for as long as memleak runs.
fn spawn(mut ring: RingBuf<MapData>, codes: Arc<Mutex<HashMap<u32, Codes>>>) -> Result<()> {
    std::thread::Builder::new()
        .name("python-names".into())
        .spawn(move || {
            run_first();
            while wait_readable(&ring) {
                while let Some(item) = ring.next() {
                    let Some(new) = record(&item) else { continue };
                    let cache = codes.lock().expect("not poisoned").get(&new.tgid).cloned();
                    if let Some(cache) = cache {
                        cache.get(new.code);
                    }
                }
            }
        })
        .context("starting the Python names thread")?;
    Ok(())
}

fn record(item: &[u8]) -> Option<NewPythonCode> {
    // Safety: a plain `repr(C)` record, written whole by the BPF program.
    (item.len() >= size_of::<NewPythonCode>())
        .then(|| unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) })
}

/// Asks that this thread run the moment it wakes, ahead of ordinary threads: on a busy
/// machine a script can exit before an ordinary thread is scheduled. It sleeps but for the
/// few reads of each new code object. Without the privilege it runs as it is.
fn run_first() {
    let param = libc::sched_param { sched_priority: 1 };
    unsafe { libc::pthread_setschedparam(libc::pthread_self(), libc::SCHED_FIFO, &param) };
}

/// Blocks until the ring buffer has records; false if it cannot wait on it.
fn wait_readable(ring: &RingBuf<MapData>) -> bool {
    let mut p = libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        if unsafe { libc::poll(&mut p, 1, -1) } >= 0 {
            return true;
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}
