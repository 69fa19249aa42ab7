//! The live part of each thread's stack: from its stack pointer (less the red zone) up. Below
//! it lie dead frames, whose stale copies of dropped pointers would keep lost blocks looking
//! referenced. The stack pointer is known without stopping the target for a thread blocked
//! in the kernel (`/proc/PID/task/TID/syscall`); a running thread's stack, or one whose file
//! cannot be read, is read whole.

/// The x86-64 ABI lets a leaf function use 128 bytes below its stack pointer unmoved.
const RED_ZONE: u64 = 128;

/// The stack pointer in a thread's `syscall` file: `NR ARG×6 SP PC` blocked in a system
/// call, `-1 SP PC` blocked elsewhere in the kernel, `running` (or anything else): `None`.
pub fn parse_sp(text: &str) -> Option<u64> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let sp = match words.len() {
        9 => words[7],
        3 => words[1],
        _ => return None,
    };
    u64::from_str_radix(sp.strip_prefix("0x")?, 16).ok()
}

/// The stack pointers of process `pid`'s threads that are blocked in the kernel now (none
/// for pid 0, not a live process).
pub fn stack_pointers(pid: u32) -> Vec<u64> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let syscall = |task: std::fs::DirEntry| std::fs::read_to_string(task.path().join("syscall"));
    let texts = tasks.flatten().filter_map(|t| syscall(t).ok());
    texts.filter_map(|t| parse_sp(&t)).collect()
}

/// Where the live part of the stack mapping [start, end) begins: the lowest known stack
/// pointer in it less the red zone, or `start` (all of it) when none is in it. One mapping per
/// thread stack (glibc guards each): a running thread's is never one holding a known pointer.
pub fn live_from(start: u64, end: u64, sps: &[u64]) -> u64 {
    sps.iter()
        .filter(|&&sp| sp >= start && sp < end)
        .min()
        .map_or(start, |sp| sp.saturating_sub(RED_ZONE).max(start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stack_pointer_of_a_blocked_thread_only() {
        let blocked = "230 0x0 0x0 0x7ffe1b32b920 0x7ffe1b32b960 0x0 0x0 0x7ffe1b32b908 \
                       0x7f7c4a063503\n";
        assert_eq!(parse_sp(blocked), Some(0x7ffe1b32b908));
        assert_eq!(
            parse_sp("-1 0x7ffe00001000 0x401000\n"),
            Some(0x7ffe00001000)
        );
        assert_eq!(parse_sp("running\n"), None);
        assert_eq!(parse_sp(""), None);
        assert_eq!(parse_sp("1 2 3"), None);
    }

    #[test]
    fn the_live_part_starts_below_the_lowest_pointer_in_the_mapping() {
        let sps = [0x1800, 0x9000, 0x1400];
        assert_eq!(live_from(0x1000, 0x2000, &sps), 0x1400 - 128);
        assert_eq!(live_from(0x3000, 0x4000, &sps), 0x3000);
        assert_eq!(live_from(0x1000, 0x2000, &[0x1010]), 0x1000);
    }

    /// A thread of this process blocked in the kernel: its stack pointer is found, just
    /// below a local of its own.
    #[test]
    fn a_blocked_thread_has_its_stack_pointer_read() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let local = 0u64;
            addr_tx.send(std::ptr::addr_of!(local) as u64).unwrap();
            let _ = rx.recv();
        });
        let local = addr_rx.recv().unwrap();
        let found = |sps: Vec<u64>| sps.iter().any(|&sp| sp <= local && local - sp < 1 << 20);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !found(stack_pointers(std::process::id())) {
            assert!(
                std::time::Instant::now() < deadline,
                "no blocked thread's sp"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(tx);
        thread.join().unwrap();
        assert!(stack_pointers(0).is_empty());
    }
}
