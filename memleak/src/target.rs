//! The traced process: an existing PID, or a command we start ourselves. A started command
//! is held twice: before its `exec` (a pipe) until the probes are attached, so its first
//! allocation is seen; then at its executable's entry point (the BPF `hold_at_entry` probe
//! stops it), where every library is mapped and none of its code has run, until memleak has
//! read what it maps.

use std::{
    ffi::CString,
    num::NonZeroU32,
    os::{fd::FromRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    programs::{
        UProbe,
        uprobe::{UProbeLink, UProbeScope},
    },
};
use memleak_common::names::programs;
use object::{Object, ObjectSegment};
use tokio::sync::oneshot;

use crate::procmaps;

/// A command we started; reaped by `wait`.
pub struct Child(libc::pid_t);

impl Child {
    /// Blocks until the command exits; describes how.
    pub fn wait(&self) -> String {
        let mut status = 0;
        loop {
            let r = unsafe { libc::waitpid(self.0, &mut status, 0) };
            if r == self.0 {
                break;
            }
            if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                return "command exited".into();
            }
        }
        if libc::WIFEXITED(status) {
            format!("command exited with status {}", libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            format!("command was killed by signal {}", libc::WTERMSIG(status))
        } else {
            "command exited".into()
        }
    }

    pub fn kill(&self) {
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

pub struct Target {
    pub pid: u32,
    /// The command we started (`-c`).
    pub child: Option<Child>,
    /// The write end of the pipe that holds a started command before its exec.
    gate: Option<std::fs::File>,
    /// The probe that stops a started command at its entry point; removed once it stopped
    /// there (a later exec of the same program must not stop again).
    hold: Option<UProbeLink>,
    /// The executable the target runs (as this process can open it).
    pub exe: PathBuf,
    /// Child processes already reported.
    children: std::collections::BTreeSet<u32>,
}

impl Target {
    pub fn existing(pid: u32) -> Result<Target> {
        if pid == 0 || !Path::new(&format!("/proc/{pid}")).exists() {
            bail!("no process with PID {pid}");
        }
        if is_kernel_thread(pid) {
            bail!("PID {pid} is a kernel thread; memleak traces user processes");
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"))
            .with_context(|| format!("cannot read /proc/{pid}/exe (not allowed?)"))?;
        Ok(Target {
            pid,
            child: None,
            gate: None,
            hold: None,
            children: Default::default(),
            exe: procmaps::host_path(pid, &exe.to_string_lossy()),
        })
    }

    /// Starts `command` (split into words as a shell would, quotes included; BCC splits on
    /// whitespace only), held before its exec until `release`. A plain fork+exec: std's
    /// `spawn` waits for the exec, which the gate blocks.
    pub fn spawn(command: &str) -> Result<Target> {
        let words = shell_words::split(command)
            .with_context(|| format!("cannot split the command into words: {command}"))?;
        let program = words.first().context("-c needs a command")?;
        let exe = which(program).with_context(|| format!("command not found: {program}"))?;
        let cstr = |s: &[u8]| CString::new(s).context("the command contains a NUL byte");
        let path = cstr(exe.as_os_str().as_bytes())?;
        let argv: Vec<CString> = words
            .iter()
            .map(|w| cstr(w.as_bytes()))
            .collect::<Result<_>>()?;
        let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
        argv_ptrs.push(std::ptr::null());
        let mut fds = [0; 2];
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            bail!("pipe: {}", std::io::Error::last_os_error());
        }
        let (read_fd, write_fd) = (fds[0], fds[1]);
        match unsafe { libc::fork() } {
            -1 => bail!("fork: {}", std::io::Error::last_os_error()),
            0 => unsafe {
                // Child: only async-signal-safe calls. Wait for one byte (go) or EOF (the
                // tracer died: go anyway), then become the command. Should memleak die
                // while the command is stopped at its entry point, the kernel sends it
                // SIGCONT: it runs on untraced instead of staying stopped for good.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGCONT);
                libc::close(write_fd);
                let mut b = 0u8;
                libc::read(read_fd, (&raw mut b).cast(), 1);
                libc::execv(path.as_ptr(), argv_ptrs.as_ptr());
                libc::_exit(127);
            },
            child => {
                unsafe { libc::close(read_fd) };
                Ok(Target {
                    pid: child as u32,
                    child: Some(Child(child)),
                    gate: Some(unsafe { std::fs::File::from_raw_fd(write_fd) }),
                    hold: None,
                    children: Default::default(),
                    exe,
                })
            }
        }
    }

    /// A started command: stops it at its executable's entry point once it has exec'd. A
    /// script has no entry point of its own (its interpreter's is not known yet): no hold.
    pub fn hold_at_entry(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        let Some(offset) = std::fs::read(&self.exe).ok().and_then(|d| entry_offset(&d)) else {
            return Ok(());
        };
        let name = programs::HOLD_AT_ENTRY;
        let prog: &mut UProbe = ebpf
            .program_mut(name)
            .with_context(|| format!("BPF object lacks program {name}"))?
            .try_into()?;
        prog.load()?;
        let pid = NonZeroU32::new(self.pid).context("PID 0")?;
        let link = prog
            .attach(offset, &self.exe, UProbeScope::OneProcess(pid))
            .with_context(|| format!("attaching to the entry of {}", self.exe.display()))?;
        self.hold = Some(prog.take_link(link)?);
        Ok(())
    }

    /// Lets a started command run (after the probes are attached).
    pub fn release(&mut self) -> Result<()> {
        if let Some(mut gate) = self.gate.take() {
            use std::io::Write;
            gate.write_all(b"g").context("releasing the command")?;
        }
        Ok(())
    }

    /// After `release`: waits (2 s at most) for a held command to stop at its entry point.
    /// False when nothing holds it (a command that failed to start is left to the exit
    /// watcher).
    pub fn wait_at_entry(&self) -> bool {
        if self.hold.is_none() {
            return false;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !stopped(self.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Removes the hold and lets a command stopped at its entry point run on.
    pub fn resume(&mut self) {
        if self.hold.take().is_some() {
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGCONT) };
        }
    }

    /// Kills and reaps a started command (one that must not run on untraced).
    pub fn kill(&self) {
        if let Some(child) = &self.child {
            child.kill();
            child.wait();
        }
    }

    /// Resolves when the target exits, with a description ("exited with status 3").
    pub fn watch_exit(&mut self) -> Result<oneshot::Receiver<String>> {
        let (tx, rx) = oneshot::channel();
        if let Some(child) = self.child.take() {
            std::thread::spawn(move || {
                let _ = tx.send(child.wait());
            });
            return Ok(rx);
        }
        let pid = self.pid;
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context(format!("watching PID {pid}"));
        }
        std::thread::spawn(move || {
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // Only a signal (EINTR) is retried at once: another error (ENOMEM) would spin.
            while unsafe { libc::poll(&mut p, 1, -1) } < 0 {
                if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
            let _ = tx.send(format!("(PID {pid}) exited"));
        });
        Ok(rx)
    }

    /// Child processes started since the last call. They are not traced: the probes follow
    /// the target's own memory, and a fork gets a memory of its own.
    pub fn new_children(&mut self) -> Vec<u32> {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.pid)) else {
            return Vec::new();
        };
        let mut new = Vec::new();
        for task in tasks.flatten() {
            let Ok(list) = std::fs::read_to_string(task.path().join("children")) else {
                continue;
            };
            for child in list.split_whitespace().filter_map(|c| c.parse().ok()) {
                if self.children.insert(child) {
                    new.push(child);
                }
            }
        }
        new
    }

    /// The object file that holds `name` (`libc`, `libjemalloc`, or a path) for this target,
    /// as a path this process can open.
    pub fn library(&self, name: &str) -> Result<PathBuf> {
        if name.contains('/') {
            let p = PathBuf::from(name);
            if !p.exists() {
                bail!("no such file: {name}");
            }
            return Ok(p);
        }
        if self.gate.is_some() {
            // Not exec'd yet: ask the dynamic loader what the program will load.
            return loader_lookup(&self.exe, name);
        }
        let maps = procmaps::read(self.pid)?;
        let m = procmaps::find_library(&maps, name).with_context(|| {
            format!(
                "PID {} maps no {name} (a static binary, or another allocator?): name the object that holds the allocator with -O",
                self.pid
            )
        })?;
        Ok(procmaps::mapped_file(self.pid, m))
    }
}

/// Whether the process is in a group stop (`T` in `/proc/PID/stat`).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

/// The file offset of an executable's entry point (what a uprobe attaches to).
fn entry_offset(data: &[u8]) -> Option<u64> {
    let file = object::File::parse(data).ok()?;
    let entry = file.entry();
    file.segments().find_map(|s| {
        let (offset, size) = s.file_range();
        (s.address() <= entry && entry - s.address() < size)
            .then(|| offset.checked_add(entry - s.address()))
            .flatten()
    })
}

fn is_kernel_thread(pid: u32) -> bool {
    // Kernel threads have an empty command line and no executable.
    std::fs::read_link(format!("/proc/{pid}/exe")).is_err()
        && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
}

fn which(program: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = PathBuf::from(program);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// Resolves a library the way the program's dynamic loader will (`ld.so --list`), so `-c`
/// can attach before the library is mapped.
fn loader_lookup(exe: &Path, name: &str) -> Result<PathBuf> {
    let data = std::fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
    let interp = interpreter(&data).with_context(|| {
        format!(
            "{} is statically linked: name the object that holds the allocator with -O (e.g. -O {})",
            exe.display(),
            exe.display()
        )
    })?;
    let out = Command::new(&interp)
        .arg("--list")
        .arg(exe)
        .output()
        .with_context(|| format!("running {interp} --list"))?;
    let listing = String::from_utf8_lossy(&out.stdout);
    listing
        .lines()
        .filter_map(|l| l.split_once(" => "))
        .map(|(soname, rest)| (soname.trim(), rest.split(" (").next().unwrap_or("").trim()))
        .find(|(soname, path)| {
            !path.is_empty()
                && (soname.starts_with(&format!("{name}.so"))
                    || soname.starts_with(&format!("{name}-")))
        })
        .map(|(_, path)| PathBuf::from(path))
        .with_context(|| {
            format!(
                "{} does not load {name}: name the allocator's object with -O",
                exe.display()
            )
        })
}

/// PT_INTERP of an ELF executable. Only the file and program headers are read, as the kernel
/// does: a file cut after its loaded segments (no section headers) still runs.
fn interpreter(data: &[u8]) -> Option<String> {
    use object::read::elf::{FileHeader, ProgramHeader};
    let header = object::elf::FileHeader64::<object::Endianness>::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let headers = header.program_headers(endian, data).ok()?;
    headers.iter().find_map(|ph| {
        let interp = ph.interpreter(endian, data).ok()??;
        Some(String::from_utf8_lossy(interp).into_owned())
    })
}
