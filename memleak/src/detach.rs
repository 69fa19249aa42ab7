//! Removing the probes without making memleak's exit wait for it.
//!
//! When the last copy of a probe's BPF link closes, the kernel detaches the program, then
//! unregisters the probe under its trace event mutex, one probe at a time, each waiting out
//! an RCU grace period (about 100 ms here): seconds for the two dozen probes of a process,
//! after the reports are written, for a user who pressed Ctrl+C or a script that sent SIGTERM.
//! So a child forked at the end keeps a copy of the links and nothing else; once memleak
//! has closed its own copies (at once: they are not the last), it says so through a pipe and
//! the child releases the links as it exits. Until the child is done the target runs on with
//! its probes, whose program (held by each link, with its maps) still runs: only their cost
//! lingers. A killed child releases the links the same way.

use std::ffi::c_uint;

use aya::Ebpf;

/// Drops `ebpf`, its probes' links released by a child when it can be forked, by this
/// process otherwise.
pub fn release(ebpf: Ebpf) {
    let links = link_fds();
    let mut pipe = [0; 2];
    if links.is_empty() || unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
        return drop(ebpf);
    }
    let [closed, told] = pipe;
    let mut keep = links;
    keep.push(closed as c_uint);
    keep.sort_unstable();
    if unsafe { libc::fork() } == 0 {
        release_and_exit(&keep, closed);
    }
    // Whichever process closes a link last pays for its removal: this one first, then the
    // child, told by the end of the pipe.
    drop(ebpf);
    unsafe {
        libc::close(told);
        libc::close(closed);
    }
}

/// This process's file descriptors that hold a probe: BPF links, and perf events (a probe
/// attached without a link on an older kernel).
fn link_fds() -> Vec<c_uint> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|target| {
                let target = target.to_string_lossy();
                target == "anon_inode:bpf_link" || target == "anon_inode:[perf_event]"
            })
        })
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// In the forked child: closes every descriptor but `keep` (sorted; the caller must not
/// wait for any of them, not even for its stdout pipe to close), waits until the parent has
/// closed its copies (the end of `closed`), and exits, which releases the links. Only
/// async-signal-safe calls: the parent had other threads.
fn release_and_exit(keep: &[c_uint], closed: i32) -> ! {
    unsafe {
        libc::prctl(libc::PR_SET_NAME, c"memleak-detach".as_ptr());
        // memleak's handlers would swallow them: a signal ends this process at once.
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::signal(libc::SIGTERM, libc::SIG_DFL);
        let mut first = 0;
        for &fd in keep {
            if fd > first {
                libc::close_range(first, fd - 1, 0);
            }
            first = fd + 1;
        }
        libc::close_range(first, c_uint::MAX, 0);
        let mut byte = 0u8;
        while libc::read(closed, (&raw mut byte).cast(), 1) < 0
            && *libc::__errno_location() == libc::EINTR
        {}
        libc::_exit(0)
    }
}
