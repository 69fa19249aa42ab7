//! Reads the code objects of each new Python stack the moment the BPF program stores it
//! (`PY_NEW_STACKS`), on a thread of its own: the event loop may be busy (symbolizing a
//! table, building the unwind tables of a library just loaded) for longer than a short script
//! lives, and code objects die with their function, their module or the process.

use std::{
    collections::HashMap,
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use memleak_common::python::NewPythonStack;

use super::Codes;

/// The one reader of `PY_NEW_STACKS` for every traced process: each record goes to the code
/// cache of the process it names. Clones share it.
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

    /// Process `pid` runs CPython: its new stacks' code objects are read into `codes`.
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
                    if item.len() < size_of::<NewPythonStack>() {
                        continue;
                    }
                    // Safety: a plain `repr(C)` record, written whole by the BPF program.
                    let new: NewPythonStack =
                        unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                    let Some(codes) = codes.lock().expect("not poisoned").get(&new.tgid).cloned()
                    else {
                        continue;
                    };
                    for &code in new.codes.iter().take(new.len as usize) {
                        codes.get(code);
                    }
                }
            }
        })
        .context("starting the Python names thread")?;
    Ok(())
}

/// Asks that this thread run the moment it wakes, ahead of ordinary threads: on a busy
/// machine a script can exit before an ordinary thread is scheduled. It sleeps but for the
/// few reads of each new stack. Without the privilege it runs as it is.
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
