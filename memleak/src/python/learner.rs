//! Reads each code object the BPF program hands over (`PY_NEW_CODES`) the moment it does, on
//! a thread of its own: the event loop may be busy (symbolizing a table, building the unwind
//! tables of a library just loaded) for longer than a short script lives, and code objects
//! die with their function, their module or the process.

use std::{
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use memleak_common::python::NewPythonCode;

use super::Codes;

/// The reader thread of one traced process; it reads into the code cache of the
/// interpreter last found in it (none before one is found, or after an exec).
pub struct Learner {
    codes: Arc<Mutex<Option<Codes>>>,
}

impl Learner {
    /// Starts the thread; it reads `pid`'s code objects for as long as memleak runs.
    pub fn spawn(mut ring: RingBuf<MapData>, pid: u32) -> Result<Learner> {
        let codes: Arc<Mutex<Option<Codes>>> = Arc::default();
        let into = codes.clone();
        std::thread::Builder::new()
            .name("python-names".into())
            .spawn(move || {
                run_first();
                while wait_readable(&ring) {
                    while let Some(item) = ring.next() {
                        let Some(new) = record(&item) else { continue };
                        let cache = into.lock().unwrap().clone();
                        if let (true, Some(cache)) = (new.tgid == pid, cache) {
                            cache.get(new.code);
                        }
                    }
                }
            })
            .context("starting the Python names thread")?;
        Ok(Learner { codes })
    }

    /// From now on reads into `codes` (`None`: the interpreter is gone).
    pub fn read_into(&self, codes: Option<Codes>) {
        *self.codes.lock().unwrap() = codes;
    }
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
