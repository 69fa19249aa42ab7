//! What the kernel says about the target, read from /proc at the same instants as the tracer's
//! snapshots: the process's own memory figures (to compare with what the tracer accounts for)
//! and the limits it will run into (to project when it runs out).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::{objects, procmaps};
use memleak::target_files::TargetFiles;

/// The target's memory at one instant (`/proc/PID/status`, plus the headroom around it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProcSample {
    pub rss_bytes: u64,
    pub vsz_bytes: u64,
    /// VmData: the private data segments (heap and anonymous mappings).
    pub data_bytes: u64,
    pub peak_vsz_bytes: u64,
    pub threads: u64,
    /// MemAvailable of the whole machine (`/proc/meminfo`).
    pub mem_available_bytes: Option<u64>,
    /// What the target's memory cgroup is charged now (`memory.current`, v1: `usage_in_bytes`).
    pub cgroup_usage_bytes: Option<u64>,
}

/// Reads `/proc/PID/status` and the machine's and cgroup's headroom.
pub fn sample(pid: u32, cgroup: Option<&CgroupLimit>) -> Result<ProcSample> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut s = parse_status(&status);
    s.mem_available_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| kib_field(&m, "MemAvailable:"));
    s.cgroup_usage_bytes = cgroup.and_then(CgroupLimit::usage);
    Ok(s)
}

/// The `VmRSS`, `VmSize`, `VmData`, `VmPeak` and `Threads` lines of `/proc/PID/status`; a missing
/// line reads as 0 (kernel threads and zombies have no Vm* lines).
pub fn parse_status(text: &str) -> ProcSample {
    ProcSample {
        rss_bytes: kib_field(text, "VmRSS:").unwrap_or(0),
        vsz_bytes: kib_field(text, "VmSize:").unwrap_or(0),
        data_bytes: kib_field(text, "VmData:").unwrap_or(0),
        peak_vsz_bytes: kib_field(text, "VmPeak:").unwrap_or(0),
        threads: field(text, "Threads:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        ..Default::default()
    }
}

fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim())
}

/// A `Key:   1234 kB` line, in bytes.
fn kib_field(text: &str, key: &str) -> Option<u64> {
    let v = field(text, key)?;
    let kib: u64 = v.strip_suffix("kB").unwrap_or(v).trim().parse().ok()?;
    Some(kib * 1024)
}

/// What does not change while we watch: who the target is and what it has loaded.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessContext {
    pub pid: u32,
    pub cmdline: Vec<String>,
    /// Every file-backed object mapped executable, in load order.
    pub objects: Vec<SharedObject>,
    /// `3.11` when a shared libpython is mapped (from its soname).
    pub python_version: Option<String>,
    pub cgroup: Option<CgroupLimit>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SharedObject {
    /// The path as the target sees it.
    pub path: String,
    /// The executable mapping: where the code lives in the target (for pprof's mappings).
    pub start: u64,
    pub end: u64,
    pub file_offset: u64,
    /// The GNU build-id, hex; `None`: the file has none or could not be read.
    pub build_id: Option<String>,
    /// A CPython extension module (`*.cpython-*.so`, or under `lib-dynload`/`site-packages`).
    pub python_extension: bool,
}

/// The tightest memory limit of the target's cgroup and its ancestors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CgroupLimit {
    /// The cgroup (as in `/proc/PID/cgroup`) that holds the limit.
    pub path: String,
    pub limit_bytes: u64,
    /// The file to read the current charge from.
    #[serde(skip)]
    usage_file: PathBuf,
}

impl CgroupLimit {
    fn usage(&self) -> Option<u64> {
        std::fs::read_to_string(&self.usage_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl ProcessContext {
    /// Reads the target's command line, objects and cgroup limit, as far as they can be read
    /// (pid 0, the kernel, has none of them).
    pub fn read(pid: u32) -> Self {
        let mut ctx = ProcessContext {
            pid,
            cgroup: std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .ok()
                .and_then(|text| cgroup_limit(Path::new("/sys/fs/cgroup"), &text)),
            ..Default::default()
        };
        ctx.refresh();
        ctx
    }

    /// Rereads the command line (a started command may not have exec'd at the first read)
    /// and adds the objects mapped since the last call (dlopen, Python imports). A process
    /// that is gone leaves everything as it was.
    pub fn refresh(&mut self) {
        if let Ok(raw) = std::fs::read(format!("/proc/{}/cmdline", self.pid))
            && !raw.is_empty()
        {
            self.cmdline = raw
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
        }
        let Ok(maps) = procmaps::read(self.pid) else {
            return;
        };
        for m in maps.iter().filter(|m| m.is_file() && m.executable) {
            let path = m.path.clone().unwrap_or_default();
            if self.objects.iter().any(|o| o.path == path) {
                continue;
            }
            self.objects.push(SharedObject {
                build_id: self.build_id(m),
                python_extension: is_python_extension(&path),
                start: m.start,
                end: m.end,
                file_offset: m.offset,
                path,
            });
        }
        if self.python_version.is_none() {
            self.python_version = self.objects.iter().find_map(|o| python_version(&o.path));
        }
    }
}

impl ProcessContext {
    /// The object's build-id, hex: from the object cache when the unwinder or a probe has
    /// read the file, else from the head of the file (opened the one way objects.rs does).
    fn build_id(&self, m: &procmaps::Mapping) -> Option<String> {
        if let Some(object) = objects::cached(&(m.dev.clone(), m.inode)) {
            let id = object.build_id.as_ref()?;
            return Some(id.iter().map(|b| format!("{b:02x}")).collect());
        }
        let (_, file) = objects::open_mapping(self.pid, m, &TargetFiles::new(self.pid)).ok()?;
        build_id(file)
    }
}

/// The GNU build-id note, hex. Only the file's first 64 KiB are read: the note lives in the
/// first loaded segment, and a shared object can be a gigabyte (libtorch).
fn build_id(file: std::fs::File) -> Option<String> {
    use std::io::Read;

    use object::{
        Endianness,
        elf::{FileHeader64, NT_GNU_BUILD_ID, PT_NOTE},
        read::elf::{FileHeader, ProgramHeader},
    };
    let mut head = Vec::with_capacity(64 << 10);
    file.take(64 << 10).read_to_end(&mut head).ok()?;
    let header = FileHeader64::<Endianness>::parse(&*head).ok()?;
    let endian = header.endian().ok()?;
    for segment in header.program_headers(endian, &*head).ok()? {
        if segment.p_type(endian) != PT_NOTE {
            continue;
        }
        let Ok(Some(mut notes)) = segment.notes(endian, &*head) else {
            continue;
        };
        while let Ok(Some(note)) = notes.next() {
            if note.n_type(endian) == NT_GNU_BUILD_ID && note.name() == b"GNU" {
                return Some(note.desc().iter().map(|b| format!("{b:02x}")).collect());
            }
        }
    }
    None
}

/// Bytes of the process in transparent huge pages (`AnonHugePages`). Growth mode counts one
/// page per first-write fault, and a fault that brings in a huge page brings 2 MiB.
pub fn huge_page_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    kib_field(&text, "AnonHugePages:")
}

pub fn is_python_extension(path: &str) -> bool {
    let base = path.rsplit('/').next().unwrap_or(path);
    (base.contains(".cpython-") && base.ends_with(".so"))
        || path.contains("/lib-dynload/")
        || path.contains("/site-packages/")
}

/// `libpython3.11.so.1.0` → `3.11`.
pub fn python_version(path: &str) -> Option<String> {
    let base = path.rsplit('/').next().unwrap_or(path);
    let rest = base.strip_prefix("libpython")?;
    let version = rest.split(".so").next()?.trim_end_matches(['d', 'm', 't']);
    let mut parts = version.split('.');
    let (major, minor) = (parts.next()?, parts.next()?);
    (major.parse::<u32>().is_ok() && minor.parse::<u32>().is_ok())
        .then(|| format!("{major}.{minor}"))
}

/// The tightest memory limit on the path of `/proc/PID/cgroup` (`text`), walking from the
/// target's own cgroup up to the root under `root` (normally `/sys/fs/cgroup`). Handles the
/// unified hierarchy (`0::/path` → `memory.max`) and the v1 memory controller
/// (`N:memory:/path` → `memory/…/memory.limit_in_bytes`); "max" and v1's near-2^63 mean none.
pub fn cgroup_limit(root: &Path, text: &str) -> Option<CgroupLimit> {
    let mut tightest: Option<CgroupLimit> = None;
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let (base, limit_name, usage_name) = match controllers {
            "" => (root.to_path_buf(), "memory.max", "memory.current"),
            c if c.split(',').any(|c| c == "memory") => (
                root.join("memory"),
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
            ),
            _ => continue,
        };
        let mut dir = Some(Path::new(path));
        while let Some(d) = dir {
            let cg = base.join(d.to_str()?.trim_start_matches('/'));
            let limit = std::fs::read_to_string(cg.join(limit_name))
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&v| v < 1 << 62);
            if let Some(limit) = limit
                && tightest.as_ref().is_none_or(|t| limit < t.limit_bytes)
            {
                tightest = Some(CgroupLimit {
                    path: d.display().to_string(),
                    limit_bytes: limit,
                    // The charge that counts against a limit is the limited cgroup's own.
                    usage_file: cg.join(usage_name),
                });
            }
            dir = d.parent();
        }
    }
    tightest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        let s = parse_status(
            "Name:\tx\nVmPeak:\t  3904 kB\nVmSize:\t  3900 kB\nVmData:\t   436 kB\n\
             VmRSS:\t  2040 kB\nThreads:\t3\n",
        );
        assert_eq!(s.rss_bytes, 2040 * 1024);
        assert_eq!(s.vsz_bytes, 3900 * 1024);
        assert_eq!(s.data_bytes, 436 * 1024);
        assert_eq!(s.peak_vsz_bytes, 3904 * 1024);
        assert_eq!(s.threads, 3);
    }

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id(), None).unwrap();
        assert!(s.rss_bytes > 0 && s.vsz_bytes >= s.rss_bytes && s.threads >= 1);
        assert!(s.mem_available_bytes.unwrap() > 0);
        let ctx = ProcessContext::read(std::process::id());
        assert!(ctx.cmdline[0].contains("memleak"));
        let libc = ctx
            .objects
            .iter()
            .find(|o| o.path.contains("libc.so"))
            .unwrap();
        let full = std::fs::read(&libc.path).unwrap();
        let want = object::Object::build_id(&object::File::parse(&*full).unwrap()).unwrap();
        let want: String = want.unwrap().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(libc.build_id.as_deref(), Some(want.as_str()));
        assert!(sample(u32::MAX, None).is_err());
    }

    /// A real CPython with a shared libpython: its version and its C extensions are found.
    #[test]
    fn reads_a_python_process() {
        let Some(python) = memleak_tests::pyenv_python("3.11") else {
            memleak_tests::skipped("reads_a_python_process", "no pyenv CPython 3.11");
            return;
        };
        let python = python.to_str().unwrap();
        let mut child = std::process::Command::new(python)
            .args([
                "-c",
                "import json, sys, time; print(flush=True); time.sleep(30)",
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The blank line comes once the imports are done.
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        let ctx = ProcessContext::read(child.id());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(ctx.python_version.as_deref(), Some("3.11"));
        assert_eq!(ctx.cmdline[0], python);
        let json = ctx
            .objects
            .iter()
            .find(|o| o.path.contains("/_json.cpython-311"))
            .unwrap();
        assert!(json.python_extension && json.build_id.is_some());
        assert!(
            !ctx.objects
                .iter()
                .find(|o| o.path.contains("libc.so"))
                .unwrap()
                .python_extension
        );
    }

    #[test]
    fn recognises_python_objects() {
        assert!(is_python_extension(
            "/x/lib/python3.11/site-packages/numpy/core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so"
        ));
        assert!(is_python_extension(
            "/root/.pyenv/versions/3.11.7/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so"
        ));
        assert!(!is_python_extension("/usr/lib/x86_64-linux-gnu/libc.so.6"));
        assert_eq!(
            python_version("/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0").as_deref(),
            Some("3.11")
        );
        assert_eq!(
            python_version("libpython3.13t.so.1.0").as_deref(),
            Some("3.13")
        );
        assert_eq!(python_version("/usr/lib/libc.so.6"), None);
    }

    #[test]
    fn finds_tightest_cgroup_limit_up_the_hierarchy() {
        let root = std::env::temp_dir().join(format!("memleak-cg-{}", std::process::id()));
        let v2 = root.join("svc/app");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(root.join("svc/memory.max"), "1048576\n").unwrap();
        std::fs::write(root.join("svc/memory.current"), "4096\n").unwrap();
        std::fs::write(v2.join("memory.max"), "max\n").unwrap();
        let limit = cgroup_limit(&root, "0::/svc/app\n").unwrap();
        assert_eq!((limit.path.as_str(), limit.limit_bytes), ("/svc", 1 << 20));
        assert_eq!(limit.usage(), Some(4096));

        let v1 = root.join("memory/job");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(cgroup_limit(&root, "4:memory:/job\n1:cpu:/\n"), None);
        std::fs::write(v1.join("memory.limit_in_bytes"), "2097152\n").unwrap();
        let limit = cgroup_limit(&root, "4:memory:/job\n1:cpu:/\n").unwrap();
        assert_eq!(limit.limit_bytes, 2 << 20);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
