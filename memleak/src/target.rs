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
        let entry = memleak::objects::object_at(&self.exe).map(|o| o.entry_offset);
        let Some(offset) = entry.ok().flatten() else {
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

/// `/proc/PID/stat` after the command name (which may hold spaces and parentheses).
fn stat_fields(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ").map(|(_, rest)| rest.to_string())
}

/// Whether the process is in a group stop (`T` in `/proc/PID/stat`).
fn stopped(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|rest| rest.starts_with('T'))
}

/// How long ago the process started (`starttime` in `/proc/PID/stat`, in clock ticks since
/// boot: a 10 ms resolution).
pub fn age(pid: u32) -> Option<Duration> {
    // `state` is the first field after the name; `starttime` is field 22 of the whole line.
    let ticks: u64 = stat_fields(pid)?.split(' ').nth(19)?.parse().ok()?;
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut now) };
    let now = now.tv_sec as f64 + now.tv_nsec as f64 / 1e9;
    Some(Duration::from_secs_f64((now - ticks as f64 / hz).max(0.0)))
}

/// The processes of a cgroup v2 directory now (empty if it cannot be read: removed).
pub fn cgroup_procs(dir: &Path) -> Vec<u32> {
    let text = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
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
    let object = memleak::objects::object_at(exe)?;
    let interp = object.interpreter.clone().with_context(|| {
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
