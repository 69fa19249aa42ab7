//! Reads the code objects of each new Python stack the moment the BPF program stores it
//! (`PY_NEW_STACKS`), on a thread of its own: the event loop may be busy (symbolizing a
//! table, building the unwind tables of a library just loaded) for longer than a short script
//! lives, and code objects die with their function, their module or the process.

use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use memleak_common::python::NewPythonStack;

use super::Codes;

/// Starts the thread; it reads into `codes` for as long as memleak runs.
pub fn spawn(mut ring: RingBuf<MapData>, codes: Codes) -> Result<()> {
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
