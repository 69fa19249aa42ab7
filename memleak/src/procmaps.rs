//! `/proc/PID/maps`: which object file backs which address range of the target. Every part
//! that turns an address into something (symbolizing, unwinding, finding libraries) starts
//! here.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::target_files::TargetFiles;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    /// File offset of `start`.
    pub offset: u64,
    pub dev: String,
    pub inode: u64,
    /// The path as the target sees it (inside its mount namespace); `None` for anonymous
    /// mappings. `[heap]`, `[stack]`, `[vdso]`... are kept as they are; the ` (deleted)` of a
    /// file deleted or replaced since it was mapped is cut off (map_files still opens it).
    pub path: Option<String>,
}

impl Mapping {
    /// A mapping backed by a file on disk (not `[vdso]`, not anonymous).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }

    /// Basename of the backing file.
    pub fn file_name(&self) -> Option<&str> {
        let p = self.path.as_deref()?;
        Some(p.rsplit('/').next().unwrap_or(p))
    }
}

/// Parses one line of `/proc/PID/maps`; `None` for a malformed line.
pub fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?.as_bytes();
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode = fields.next()?;
    let rest = fields.next().unwrap_or("").trim_start();
    let (start, end) = range.split_once('-')?;
    if perms.len() < 4 {
        return None;
    }
    let path = match rest {
        "" => None,
        p => Some(p.strip_suffix(" (deleted)").unwrap_or(p).to_string()),
    };
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        readable: perms[0] == b'r',
        writable: perms[1] == b'w',
        executable: perms[2] == b'x',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: dev.to_string(),
        inode: inode.parse().ok()?,
        path,
    })
}

pub fn parse(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_line).collect()
}

/// Reads the target's current mappings.
pub fn read(pid: u32) -> Result<Vec<Mapping>> {
    let path = format!("/proc/{pid}/maps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(parse(&text))
}

/// The target's program break: the end of its `[heap]`, or where the heap will start when
/// the process has not grown it yet (`start_brk` in /proc/PID/stat).
pub fn program_break(pid: u32) -> Result<u64> {
    if let Some(heap) = read(pid)?
        .iter()
        .find(|m| m.path.as_deref() == Some("[heap]"))
    {
        return Ok(heap.end);
    }
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    start_brk(&stat).with_context(|| format!("{path} has no start_brk field"))
}

/// Field 47 of /proc/PID/stat; the command name (field 2) may hold spaces and parentheses.
fn start_brk(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    after_comm.split_whitespace().nth(47 - 3)?.parse().ok()
}

/// The path under which this process can open the target's file: through `/proc/PID/root`
/// so a target in another mount namespace (a container) resolves inside its own root.
pub fn host_path(pid: u32, target_path: &str) -> PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(target_path.trim_start_matches('/'))
}

/// `/proc/PID/map_files/START-END`: opens the very file that is mapped, even when it was
/// deleted or replaced on disk since.
pub fn map_file_path(pid: u32, m: &Mapping) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end))
}

/// A path to the very file behind a file mapping, for this process to read and for the
/// kernel to hook. `map_files` names the mapped inode itself: nothing to resolve, nothing the
/// target can point elsewhere (following it takes CAP_SYS_ADMIN or CAP_CHECKPOINT_RESTORE).
/// Without it (memleak run with only the BPF capabilities, or a mapping just gone), the
/// target's own path through its root, if both ways to resolve it reach the mapped inode:
/// target_files's policy (inside the target's root, as its user) and the plain path walk
/// that reading here and the kernel's attach do. Should the target swap a link after the
/// check, a uprobe is scoped to the target's pid: a file it does not map gets no breakpoint,
/// in it or in any other process.
pub fn mapped_file(pid: u32, m: &Mapping) -> PathBuf {
    use std::os::unix::fs::MetadataExt;
    let mapped = map_file_path(pid, m);
    if std::fs::metadata(&mapped).is_ok() {
        return mapped;
    }
    let path = Path::new(m.path.as_deref().unwrap_or_default());
    let inside = host_path(pid, &path.to_string_lossy());
    let by_policy = TargetFiles::new(pid)
        .open(path)
        .is_ok_and(|f| f.metadata().is_ok_and(|md| md.ino() == m.inode));
    if by_policy && std::fs::metadata(&inside).is_ok_and(|md| md.ino() == m.inode) {
        inside
    } else {
        mapped
    }
}

/// The first file mapping whose basename matches `name` exactly or as a versioned soname
/// (`libc` matches `libc.so.6` and `libc-2.31.so`).
pub fn find_library<'a>(maps: &'a [Mapping], name: &str) -> Option<&'a Mapping> {
    maps.iter().filter(|m| m.is_file()).find(|m| {
        let base = m.file_name().unwrap_or("");
        base == name
            || base
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(".so") || rest.starts_with('-'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_brk_is_field_47_even_after_an_odd_command_name() {
        // This process's own stat, with its name replaced by one holding ") (" and spaces.
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        let rest = own.rsplit_once(')').unwrap().1;
        let stat = format!("123 (a) (b c){rest}");
        let field_47 = rest
            .split_whitespace()
            .nth(44)
            .unwrap()
            .parse::<u64>()
            .unwrap();
        assert_eq!(start_brk(&stat), Some(field_47));
        assert_ne!(field_47, 0, "start_brk of a running process");
        assert_eq!(start_brk("123 (a) S 1 2"), None);
    }

    #[test]
    fn parses_file_anonymous_and_deleted() {
        let text = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234 /usr/bin/leaker
7f1000000000-7f1000021000 rw-p 00000000 00:00 0 
7f2000000000-7f2000001000 r-xp 00001000 fd:01 99 /tmp/gone (deleted)
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0                          [vdso]
";
        let maps = parse(text);
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[0].path.as_deref(), Some("/usr/bin/leaker"));
        assert!(maps[0].is_file() && !maps[0].executable);
        assert_eq!(maps[1].path, None);
        assert_eq!(maps[2].path.as_deref(), Some("/tmp/gone"));
        assert!(maps[2].executable && maps[2].offset == 0x1000);
        assert!(!maps[3].is_file());
    }

    #[test]
    fn finds_versioned_library() {
        let maps = parse(
            "7f0-7f1 r-xp 0 fd:01 5 /lib/x86_64-linux-gnu/libc.so.6\n\
             7f2-7f3 r-xp 0 fd:01 6 /usr/lib/libcrypt.so.1\n",
        );
        assert_eq!(find_library(&maps, "libc").unwrap().inode, 5);
        assert_eq!(find_library(&maps, "libcrypt").unwrap().inode, 6);
        assert!(find_library(&maps, "libjemalloc").is_none());
    }
}
