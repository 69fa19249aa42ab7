//! Separate debug files: distributions strip binaries and ship their symbols and DWARF in
//! a second file, found by build-id or by the `.gnu_debuglink` the binary names (the same
//! places GDB looks).

use std::path::{Path, PathBuf};

use object::{Object, ObjectSection};

use crate::procmaps;

/// The bytes of the debug file that belongs to `obj`, verified by build-id (or by the
/// debuglink CRC when the binary has no build-id); `None` when there is none.
///
/// `target_path` is the binary's path as the target sees it; candidates are looked up in
/// the target's root first (containers), then in ours.
pub fn find(pid: u32, target_path: Option<&str>, obj: &object::File) -> Option<Vec<u8>> {
    let build_id = obj.build_id().ok().flatten();
    let debuglink = obj.gnu_debuglink().ok().flatten();
    candidates(target_path, build_id, debuglink.map(|(name, _)| name))
        .into_iter()
        .flat_map(|c| [procmaps::host_path(pid, &c.to_string_lossy()), c])
        .filter_map(|path| std::fs::read(path).ok())
        .find(|data| belongs(data, build_id, debuglink.map(|(_, crc)| crc)))
}

/// Where GDB looks, in its order: `/usr/lib/debug/.build-id/xx/rest.debug`, then the
/// debuglink name next to the binary, in `.debug/` beside it, and under `/usr/lib/debug`.
fn candidates(
    target_path: Option<&str>,
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
    let dir = target_path.and_then(|p| Path::new(p).parent());
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
