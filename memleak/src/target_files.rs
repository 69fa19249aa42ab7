//! The one way memleak opens a file that the traced process names: a source file quoted under
//! a frame, an object or debug file found by path, a Python source. memleak runs as root and
//! the target is often less trusted (another user's service, a container), so a path it names
//! must not make memleak show what the target's user could not read, or hang memleak.
//!
//! The policy, for every open:
//! - the path is resolved inside the target's root (`openat2` with `RESOLVE_IN_ROOT` from a
//!   handle on `/proc/PID/root`): `..` and absolute symlinks stay in the container's tree, and
//!   `/proc` magic links are refused (`RESOLVE_NO_MAGICLINKS`);
//! - the open runs on a thread of its own that has taken the target's filesystem credentials
//!   (fsuid, fsgid, supplementary groups from `/proc/PID/status`), so the kernel checks every
//!   directory searched and the file itself as it would for the target;
//! - only a regular file is opened for reading (an `O_PATH` handle is checked with `fstat`
//!   first, so a FIFO or a device is never really opened), non-blocking, and reads are capped;
//! - the caller waits at most [`TIMEOUT`]; a thread stuck on a hung filesystem is abandoned,
//!   and while one is, every other open fails at once instead of waiting again.
//!
//! Mapped objects reached through `/proc/PID/map_files` are the very inodes the target maps
//! and are opened directly, not through here.

use std::{
    ffi::OsString,
    fmt,
    fs::File,
    io::Read,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::OpenOptionsExt,
    path::Path,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

/// The cap for object and debug files: larger than any real one (libtorch is 2 GiB), while
/// `/proc/kcore` claims terabytes.
pub const MAX_OBJECT_FILE: u64 = 8 << 30;

/// How long a caller waits for one open and read before it gives up on it.
pub const TIMEOUT: Duration = Duration::from_millis(750);

/// Reads abandoned on a filesystem that did not answer and not finished since: one hung
/// filesystem costs one [`TIMEOUT`], not one per file.
static STUCK: AtomicUsize = AtomicUsize::new(0);

/// Why a file's content is not shown; `Display` says it in a few words, as in
/// `[source withheld: not readable by the target's user]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Withheld {
    /// No such file (or directory on the way) in the target's root.
    Missing,
    /// The target's user could not open it.
    NotReadable,
    /// A FIFO, a device, a directory, a socket.
    NotRegular,
    /// Larger than the reader's cap.
    TooLarge,
    /// Not the content the reader expects (an object file without the ELF magic).
    NotExpected,
    /// The filesystem did not answer within [`TIMEOUT`], now or for an earlier read.
    TimedOut,
    /// The process is gone and was never seen.
    TargetGone,
    /// Anything else, as the kernel said it (a magic link refused, an old kernel).
    Failed(String),
}

impl fmt::Display for Withheld {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let text = match self {
            Withheld::Missing => "no such file",
            Withheld::NotReadable => "not readable by the target's user",
            Withheld::NotRegular => "not a regular file",
            Withheld::TooLarge => "too large",
            Withheld::NotExpected => "not the expected kind of file",
            Withheld::TimedOut => "timed out",
            Withheld::TargetGone => "the target is gone",
            Withheld::Failed(why) => why,
        };
        f.write_str(text)
    }
}

impl Withheld {
    fn of_errno(errno: i32) -> Withheld {
        match errno {
            libc::ENOENT | libc::ENOTDIR => Withheld::Missing,
            libc::EACCES | libc::EPERM => Withheld::NotReadable,
            _ => Withheld::Failed(std::io::Error::from_raw_os_error(errno).to_string()),
        }
    }

    fn last_os_error() -> Withheld {
        Withheld::of_errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

/// Whose permissions decide: the filesystem ids the kernel checks accesses against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub fsuid: u32,
    pub fsgid: u32,
    pub groups: Vec<u32>,
}

impl Credentials {
    /// From the text of `/proc/PID/status`: the fourth (filesystem) id of `Uid:` and `Gid:`,
    /// and `Groups:`; `None` if a line is missing or malformed.
    pub fn of_status(status: &str) -> Option<Credentials> {
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(|rest| rest.split_whitespace().map(str::parse::<u32>))
        };
        let fs_id = |name| field(name)?.nth(3)?.ok();
        Some(Credentials {
            fsuid: fs_id("Uid")?,
            fsgid: fs_id("Gid")?,
            groups: field("Groups")?.collect::<Result<_, _>>().ok()?,
        })
    }
}

/// Where paths are resolved and who must be able to read them.
struct View {
    root: OwnedFd,
    creds: Credentials,
}

/// The files one process may read, opened its way. Cheap to make: nothing is opened until a
/// file is asked for.
pub struct TargetFiles {
    /// `None`: a fixed view ([`TargetFiles::fixed`]).
    pid: Option<u32>,
    /// Resolve in memleak's own root (with the target's credentials), not the target's.
    host_root: bool,
    /// The last view taken: the target's root and credentials are read again on each open
    /// (a service drops privileges after starting), and this one serves once it has exited.
    last: Mutex<Option<Arc<View>>>,
    /// The count of stuck reads this instance heeds ([`STUCK`]; tests have their own).
    stuck: &'static AtomicUsize,
}

impl TargetFiles {
    /// Files as process `pid` sees them.
    pub fn new(pid: u32) -> TargetFiles {
        TargetFiles {
            pid: Some(pid),
            host_root: false,
            last: Mutex::new(None),
            stuck: &STUCK,
        }
    }

    /// Files of memleak's own root (system-wide debug files), still read only if `pid`'s
    /// user could read them.
    pub fn host_of(pid: u32) -> TargetFiles {
        TargetFiles {
            host_root: true,
            ..TargetFiles::new(pid)
        }
    }

    /// Files under directory `root`, read with `creds`.
    pub fn fixed(root: &Path, creds: Credentials) -> Result<TargetFiles, Withheld> {
        let view = View {
            root: open_root(root)?,
            creds,
        };
        Ok(TargetFiles {
            pid: None,
            host_root: false,
            last: Mutex::new(Some(Arc::new(view))),
            stuck: &STUCK,
        })
    }

    /// Opens the regular file `path` (the target's path, absolute or relative to its root)
    /// for reading, as the target could.
    pub fn open(&self, path: &Path) -> Result<File, Withheld> {
        let path = path.to_owned();
        self.on_worker(move |root| open_regular(root, &path))
    }

    /// The whole content of `path`, at most `max` bytes (a larger file is withheld, not cut);
    /// it must start with `prefix` (checked before the rest is read).
    pub fn read(&self, path: &Path, max: u64, prefix: &'static [u8]) -> Result<Vec<u8>, Withheld> {
        let path = path.to_owned();
        self.on_worker(move |root| {
            let file = open_regular(root, &path)?;
            read_capped(file, max, prefix)
        })
    }

    /// The names in directory `path` (the target's path), at most `max` of them, listed as
    /// the target could.
    pub fn list(&self, path: &Path, max: usize) -> Result<Vec<OsString>, Withheld> {
        let path = path.to_owned();
        self.on_worker(move |root| {
            let dir = resolve(root, &path, libc::O_DIRECTORY)?;
            let entries = std::fs::read_dir(through(&dir))
                .map_err(|e| Withheld::of_errno(e.raw_os_error().unwrap_or(0)))?;
            Ok(entries.flatten().take(max).map(|e| e.file_name()).collect())
        })
    }

    /// The target's root and credentials now, else as last seen.
    fn view(&self) -> Result<Arc<View>, Withheld> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = self.pid
            && let Some(view) = self.view_now(pid)
        {
            *last = Some(Arc::new(view));
        }
        last.clone().ok_or(Withheld::TargetGone)
    }

    fn view_now(&self, pid: u32) -> Option<View> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let root = match self.host_root {
            true => "/".to_string(),
            false => format!("/proc/{pid}/root"),
        };
        Some(View {
            root: open_root(Path::new(&root)).ok()?,
            creds: Credentials::of_status(&status)?,
        })
    }

    /// Runs `job` on a new thread holding the target's credentials, waiting at most
    /// [`TIMEOUT`]. The thread is new each time: credentials taken by a thread stay with it.
    fn on_worker<T: Send + 'static>(
        &self,
        job: impl FnOnce(&OwnedFd) -> Result<T, Withheld> + Send + 'static,
    ) -> Result<T, Withheld> {
        let stuck = self.stuck;
        if stuck.load(Ordering::Relaxed) > 0 {
            return Err(Withheld::TimedOut);
        }
        let view = self.view()?;
        let slot = Arc::new((Mutex::new(Slot::Waiting), Condvar::new()));
        let theirs = Arc::clone(&slot);
        let spawned = std::thread::Builder::new()
            .name("target-files".into())
            .spawn(move || {
                let result = take_credentials(&view.creds).and_then(|()| job(&view.root));
                let (state, done) = &*theirs;
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                match *state {
                    Slot::Abandoned => {
                        stuck.fetch_sub(1, Ordering::Relaxed);
                    }
                    _ => *state = Slot::Done(result),
                }
                done.notify_one();
            });
        if let Err(e) = spawned {
            return Err(Withheld::Failed(e.to_string()));
        }
        let (state, done) = &*slot;
        let state = state.lock().unwrap_or_else(|e| e.into_inner());
        let (mut state, _) = done
            .wait_timeout_while(state, TIMEOUT, |s| matches!(s, Slot::Waiting))
            .unwrap_or_else(|e| e.into_inner());
        match std::mem::replace(&mut *state, Slot::Abandoned) {
            Slot::Done(result) => result,
            _ => {
                stuck.fetch_add(1, Ordering::Relaxed);
                Err(Withheld::TimedOut)
            }
        }
    }
}

/// A worker's result, or that its caller stopped waiting.
enum Slot<T> {
    Waiting,
    Done(Result<T, Withheld>),
    Abandoned,
}

fn open_root(dir: &Path) -> Result<OwnedFd, Withheld> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ENOENT | libc::ESRCH) => Withheld::TargetGone,
            Some(errno) => Withheld::of_errno(errno),
            None => Withheld::Failed(e.to_string()),
        })?;
    Ok(file.into())
}

/// Gives the calling thread `creds` for file accesses. Raw system calls: the libc wrappers
/// of `setgroups` change every thread of the process. A non-root fsuid drops the thread's
/// capabilities that override file permissions.
fn take_credentials(creds: &Credentials) -> Result<(), Withheld> {
    let set = |r: libc::c_long| match r {
        0.. => Ok(()),
        _ => Err(Withheld::last_os_error()),
    };
    unsafe {
        set(libc::syscall(
            libc::SYS_setgroups,
            creds.groups.len(),
            creds.groups.as_ptr(),
        ))?;
        libc::syscall(libc::SYS_setfsgid, creds.fsgid);
        libc::syscall(libc::SYS_setfsuid, creds.fsuid);
        // These calls return the previous id whatever happens; an invalid id reads it back.
        let now = |nr| libc::syscall(nr, u32::MAX) as u32;
        if now(libc::SYS_setfsuid) != creds.fsuid || now(libc::SYS_setfsgid) != creds.fsgid {
            return Err(Withheld::Failed(
                "cannot take the target's credentials".into(),
            ));
        }
    }
    Ok(())
}

/// `path` resolved in `root`, opened for reading only if it is a regular file. The first
/// open is `O_PATH`, which opens nothing (no FIFO wait, no device side effect); the file is
/// then reopened for reading through the handle, which checks read permission.
fn open_regular(root: &OwnedFd, path: &Path) -> Result<File, Withheld> {
    let handle = resolve(root, path, 0)?;
    if !is_regular(&handle)? {
        return Err(Withheld::NotRegular);
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(through(&handle))
        .map_err(|e| Withheld::of_errno(e.raw_os_error().unwrap_or(0)))?;
    Ok(file)
}

/// An `O_PATH` handle on `path` resolved in `root` (with `flags` added, e.g. `O_DIRECTORY`):
/// `..` and absolute symlinks stay inside, magic links are refused.
fn resolve(root: &OwnedFd, path: &Path, flags: i32) -> Result<OwnedFd, Withheld> {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Withheld::Failed("a NUL in the path".into()))?;
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC | flags) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            name.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(Withheld::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The path that reopens `handle` (on the worker thread, with its credentials checked).
fn through(handle: &OwnedFd) -> String {
    format!("/proc/thread-self/fd/{}", handle.as_raw_fd())
}

fn is_regular(fd: &OwnedFd) -> Result<bool, Withheld> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(Withheld::last_os_error());
    }
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFREG)
}

/// At most `max` bytes, starting with `prefix`; the size `fstat` gives is checked first, and
/// the read stops past `max` too, since `/proc` and the like report a size of 0.
fn read_capped(file: File, max: u64, prefix: &[u8]) -> Result<Vec<u8>, Withheld> {
    let size = file
        .metadata()
        .map_err(|e| Withheld::Failed(e.to_string()))?
        .len();
    if size > max {
        return Err(Withheld::TooLarge);
    }
    let read = |e: std::io::Error| Withheld::Failed(e.to_string());
    let mut data = Vec::new();
    let mut file = file.take(max + 1);
    (&mut file)
        .take(prefix.len() as u64)
        .read_to_end(&mut data)
        .map_err(read)?;
    if data != prefix {
        return Err(Withheld::NotExpected);
    }
    data.reserve(size as usize);
    file.read_to_end(&mut data).map_err(read)?;
    if data.len() as u64 > max {
        return Err(Withheld::TooLarge);
    }
    Ok(data)
}

#[cfg(test)]
mod tests;
