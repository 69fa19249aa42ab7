//! The traced process: an existing PID, or a command we start ourselves, held before its
//! `exec` until the probes are attached so its first allocation is seen.

use std::{
    ffi::CString,
    os::{fd::FromRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

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
                    children: Default::default(),
                    exe,
                })
            }
        }
    }

    /// Lets a started command run (after the probes are attached).
    pub fn release(&mut self) -> Result<()> {
        if let Some(mut gate) = self.gate.take() {
            use std::io::Write;
            gate.write_all(b"g").context("releasing the command")?;
        }
        Ok(())
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
