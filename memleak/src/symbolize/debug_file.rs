//! Separate debug files: distributions strip binaries and ship their symbols and DWARF in
//! a second file, found by build-id or by the `.gnu_debuglink` the binary names (the same
//! places GDB looks); `dwz` moves DWARF shared by several binaries into a supplementary
//! file named by `.gnu_debugaltlink`.

use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use crate::target_files::{MAX_OBJECT_FILE, TargetFiles};

/// Looks files up as the target sees them: in its root first (containers), then in ours;
/// in both, only what the target's user could read.
pub struct Finder {
    pub target: TargetFiles,
    host: TargetFiles,
}

impl Finder {
    pub fn new(pid: u32) -> Finder {
        Finder {
            target: TargetFiles::new(pid),
            host: TargetFiles::host_of(pid),
        }
    }

    /// The debug file that belongs to `obj` (verified by build-id, or by the debuglink CRC
    /// when the binary has no build-id), with its path; `target_path`: the binary's path.
    pub fn debug_file(
        &self,
        target_path: Option<&Path>,
        obj: &object::File,
    ) -> Option<(Vec<u8>, PathBuf)> {
        let build_id = obj.build_id().ok().flatten();
        let debuglink = obj.gnu_debuglink().ok().flatten();
        let crc = debuglink.map(|(_, crc)| crc);
        let candidates = candidates(target_path, build_id, debuglink.map(|(name, _)| name));
        self.read_first(candidates, |data| belongs(data, build_id, crc))
    }

    /// The dwz supplementary file named by `obj`'s `.gnu_debugaltlink`, verified by its
    /// build-id; a relative name is relative to `referrer`, the file holding the link.
    pub fn alt_file(&self, referrer: Option<&Path>, obj: &object::File) -> Option<Vec<u8>> {
        let (name, build_id) = obj.gnu_debugaltlink().ok().flatten()?;
        let name = Path::new(std::str::from_utf8(name).ok()?);
        let path = match referrer.and_then(Path::parent) {
            Some(dir) if name.is_relative() => dir.join(name),
            _ => name.to_path_buf(),
        };
        let same_build = |data: &[u8]| {
            object::File::parse(data).is_ok_and(|f| f.build_id().ok().flatten() == Some(build_id))
        };
        self.read_first(vec![path], same_build)
            .map(|(data, _)| data)
    }

    /// The first candidate, read in the target's root and then in ours, that passes `check`.
    fn read_first(
        &self,
        candidates: Vec<PathBuf>,
        check: impl Fn(&[u8]) -> bool,
    ) -> Option<(Vec<u8>, PathBuf)> {
        candidates.into_iter().find_map(|c| {
            [&self.target, &self.host]
                .into_iter()
                .filter_map(|files| files.read(&c, MAX_OBJECT_FILE, b"\x7fELF").ok())
                .find(|data| check(data))
                .map(|data| (data, c))
        })
    }
}

/// Where GDB looks, in its order: `/usr/lib/debug/.build-id/xx/rest.debug`, then the
/// debuglink name next to the binary, in `.debug/` beside it, and under `/usr/lib/debug`.
fn candidates(
    target_path: Option<&Path>,
    build_id: Option<&[u8]>,
    debuglink: Option<&[u8]>,
) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(id) = build_id.filter(|id| id.len() > 1) {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        out.push(PathBuf::from(format!(
            "/usr/lib/debug/.build-id/{}/{}.debug",
            &hex[..2],
            &hex[2..]
        )));
    }
    let link = debuglink.and_then(|l| std::str::from_utf8(l).ok());
    let dir = target_path.and_then(Path::parent);
    if let (Some(link), Some(dir)) = (link, dir) {
        out.push(dir.join(link));
        out.push(dir.join(".debug").join(link));
        out.push(
            Path::new("/usr/lib/debug")
                .join(dir.strip_prefix("/").unwrap_or(dir))
                .join(link),
        );
    }
    out
}

/// A debug file belongs to the binary when it carries the same build-id; without a build-id
/// the debuglink's CRC32 of the whole file decides. A debug file without any DWARF or
/// symbols is of no use either.
fn belongs(data: &[u8], build_id: Option<&[u8]>, crc: Option<u32>) -> bool {
    let Ok(debug) = object::File::parse(data) else {
        return false;
    };
    let useful = debug
        .section_by_name(".debug_info")
        .is_some_and(|s| s.size() > 0)
        || debug.symbols().next().is_some();
    let matches = match (build_id, crc) {
        (Some(id), _) => debug.build_id().ok().flatten() == Some(id),
        (None, Some(crc)) => crc32fast::hash(data) == crc,
        (None, None) => false,
    };
    useful && matches
}
