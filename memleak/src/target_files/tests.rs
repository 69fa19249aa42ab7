//! The policy against real files, as `nobody` would open them: needs root (to take another
//! user's credentials); without it each test says it skips.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::*;

const NOBODY: u32 = 65534;

fn nobody() -> Credentials {
    Credentials {
        fsuid: NOBODY,
        fsgid: NOBODY,
        groups: vec![],
    }
}

/// Under CI, which runs as root, a test that needs root may not skip.
fn is_root(test: &str) -> bool {
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(!memleak_tests::in_ci(), "{test} needs root under CI");
        memleak_tests::skipped(test, "needs root");
    }
    root
}

/// A directory `root/` readable by all, removed at the end.
struct Tree(PathBuf);

impl Tree {
    fn new(test: &str) -> Tree {
        let dir = std::env::temp_dir().join(format!("target-files-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("root")).unwrap();
        for d in [&dir, &dir.join("root")] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Tree(dir)
    }

    /// `root/<name>` with `text`, mode `mode`.
    fn file(&self, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = self.0.join("root").join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn files(&self, creds: Credentials) -> TargetFiles {
        TargetFiles::fixed(&self.0.join("root"), creds).unwrap()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn read(files: &TargetFiles, path: &str) -> Result<String, Withheld> {
    files
        .read(Path::new(path), 1 << 20, b"")
        .map(|d| String::from_utf8(d).unwrap())
}

#[test]
fn credentials_are_the_filesystem_ids_and_groups() {
    let status =
        "Name:\tsrv\nUid:\t1000\t1001\t1002\t1003\nGid:\t20\t21\t22\t23\nGroups:\t4 24 27 \n";
    assert_eq!(
        Credentials::of_status(status),
        Some(Credentials {
            fsuid: 1003,
            fsgid: 23,
            groups: vec![4, 24, 27]
        })
    );
    let no_groups = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n";
    assert_eq!(
        Credentials::of_status(no_groups).unwrap().groups,
        Vec::<u32>::new()
    );
    assert_eq!(
        Credentials::of_status("Uid:\t0\t0\t0\n"),
        None,
        "a short Uid line"
    );
    assert_eq!(Credentials::of_status("Name:\tx\n"), None);
}

#[test]
fn the_targets_user_reads_what_it_may_and_nothing_else() {
    if !is_root("the_targets_user_reads_what_it_may_and_nothing_else") {
        return;
    }
    let tree = Tree::new("perm");
    tree.file("public.c", "int x;\n", 0o644);
    tree.file("secret", "root only\n", 0o600);
    symlink("secret", tree.0.join("root/link.c")).unwrap();
    let closed = tree.0.join("root/closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();
    tree.file("closed/open.c", "behind a closed door\n", 0o644);

    let as_nobody = tree.files(nobody());
    assert_eq!(read(&as_nobody, "/public.c").as_deref(), Ok("int x;\n"));
    assert_eq!(read(&as_nobody, "/secret"), Err(Withheld::NotReadable));
    assert_eq!(read(&as_nobody, "/link.c"), Err(Withheld::NotReadable));
    // The file alone would be readable; the directory on the way is not searchable.
    assert_eq!(
        read(&as_nobody, "/closed/open.c"),
        Err(Withheld::NotReadable)
    );
    assert!(as_nobody.open(Path::new("/secret")).is_err());

    let in_group = tree.files(Credentials {
        groups: vec![0],
        ..nobody()
    });
    assert_eq!(read(&in_group, "/secret"), Err(Withheld::NotReadable));
    let as_root = tree.files(Credentials {
        fsuid: 0,
        fsgid: 0,
        groups: vec![],
    });
    assert_eq!(read(&as_root, "/link.c").as_deref(), Ok("root only\n"));
}

#[test]
fn paths_stay_inside_the_targets_root() {
    if !is_root("paths_stay_inside_the_targets_root") {
        return;
    }
    let tree = Tree::new("root");
    let outside = tree.0.join("host-only.c");
    std::fs::write(&outside, "host file\n").unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o644)).unwrap();
    symlink(&outside, tree.0.join("root/absolute.c")).unwrap();
    symlink("../../../host-only.c", tree.0.join("root/dotdot.c")).unwrap();
    let files = tree.files(nobody());
    for path in ["/absolute.c", "/dotdot.c", "../host-only.c"] {
        assert_eq!(read(&files, path), Err(Withheld::Missing), "{path}");
    }
    // The root is the tree's: its own absolute path does not exist inside it.
    assert_eq!(
        read(&files, outside.to_str().unwrap()),
        Err(Withheld::Missing)
    );
    // A /proc magic link would lead anywhere: refused.
    let system = TargetFiles::fixed(Path::new("/"), nobody()).unwrap();
    assert!(matches!(
        read(&system, "/proc/self/root/etc/hostname"),
        Err(Withheld::Failed(_))
    ));
}

#[test]
fn only_regular_files_are_opened_and_never_wait() {
    if !is_root("only_regular_files_are_opened_and_never_wait") {
        return;
    }
    let tree = Tree::new("kinds");
    let fifo = std::ffi::CString::new(tree.0.join("root/fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o666) }, 0);
    std::fs::create_dir(tree.0.join("root/dir")).unwrap();
    symlink("/dev/zero", tree.0.join("root/zero")).unwrap();
    let system = TargetFiles::fixed(Path::new("/"), nobody()).unwrap();
    let files = tree.files(nobody());
    let started = Instant::now();
    assert_eq!(read(&files, "/fifo"), Err(Withheld::NotRegular));
    assert_eq!(read(&files, "/dir"), Err(Withheld::NotRegular));
    assert_eq!(read(&files, "/"), Err(Withheld::NotRegular));
    assert_eq!(read(&system, "/dev/zero"), Err(Withheld::NotRegular));
    assert!(files.open(Path::new("/fifo")).is_err());
    // A link to /dev/zero in the tree's root resolves in it: no /dev there.
    assert_eq!(read(&files, "/zero"), Err(Withheld::Missing));
    assert!(started.elapsed() < TIMEOUT, "took {:?}", started.elapsed());
}

#[test]
fn reads_are_capped() {
    if !is_root("reads_are_capped") {
        return;
    }
    let tree = Tree::new("caps");
    let sparse = std::fs::File::create(tree.0.join("root/sparse.c")).unwrap();
    sparse.set_len(2 << 30).unwrap();
    std::fs::set_permissions(
        tree.0.join("root/sparse.c"),
        PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    tree.file("elf", "\x7fELF and more", 0o644);
    let files = tree.files(nobody());
    let started = Instant::now();
    assert_eq!(read(&files, "/sparse.c"), Err(Withheld::TooLarge));
    assert!(started.elapsed() < TIMEOUT, "took {:?}", started.elapsed());
    // Files that claim size 0 and never end are cut at the cap too.
    let system = TargetFiles::fixed(Path::new("/"), nobody()).unwrap();
    assert_eq!(
        system.read(Path::new("/proc/self/maps"), 16, b""),
        Err(Withheld::TooLarge)
    );
    let elf = files.read(Path::new("/elf"), 100, b"\x7fELF");
    assert_eq!(elf.as_deref(), Ok(&b"\x7fELF and more"[..]));
    assert_eq!(
        files.read(Path::new("/sparse.c"), 4 << 30, b"\x7fELF"),
        Err(Withheld::NotExpected),
        "the prefix is checked before 2 GiB are read"
    );
}

#[test]
fn a_read_that_hangs_is_abandoned_and_the_next_ones_do_not_wait() {
    if !is_root("a_read_that_hangs_is_abandoned_and_the_next_ones_do_not_wait") {
        return;
    }
    static MINE: AtomicUsize = AtomicUsize::new(0);
    let tree = Tree::new("hang");
    tree.file("a.c", "a\n", 0o644);
    let files = TargetFiles {
        stuck: &MINE,
        ..tree.files(nobody())
    };
    let started = Instant::now();
    let hung = files.on_worker(|_| {
        std::thread::sleep(TIMEOUT * 3);
        Ok(())
    });
    assert_eq!(hung, Err(Withheld::TimedOut));
    let waited = started.elapsed();
    assert!(waited >= TIMEOUT && waited < TIMEOUT * 2, "{waited:?}");
    assert_eq!(read(&files, "/a.c"), Err(Withheld::TimedOut));
    assert!(
        started.elapsed() < waited + TIMEOUT / 2,
        "the second read waited"
    );
    // Once the stuck read ends, files are read again.
    std::thread::sleep(TIMEOUT * 3);
    assert_eq!(read(&files, "/a.c").as_deref(), Ok("a\n"));
}

#[test]
fn directories_are_listed_inside_the_root_as_the_target_could() {
    if !is_root("directories_are_listed_inside_the_root_as_the_target_could") {
        return;
    }
    let tree = Tree::new("list");
    let dir = tree.0.join("root/lib-dynload");
    std::fs::create_dir(&dir).unwrap();
    tree.file("lib-dynload/_json.so", "", 0o644);
    tree.file("lib-dynload/_ssl.so", "", 0o644);
    let host = tree.0.join("host-dir");
    std::fs::create_dir(&host).unwrap();
    std::fs::write(host.join("host-only.so"), "").unwrap();
    symlink(&host, tree.0.join("root/escape")).unwrap();
    tree.file("plain", "", 0o644);
    let closed = tree.0.join("root/closed");
    std::fs::create_dir(&closed).unwrap();
    std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o700)).unwrap();

    let files = tree.files(nobody());
    let list = |path: &str, max| {
        files.list(Path::new(path), max).map(|mut names| {
            names.sort();
            names
        })
    };
    assert_eq!(
        list("/lib-dynload", 100),
        Ok(vec!["_json.so".into(), "_ssl.so".into()])
    );
    assert_eq!(list("/lib-dynload", 1).map(|n| n.len()), Ok(1), "capped");
    // An absolute symlink to a host directory resolves inside the root, to nothing.
    assert_eq!(list("/escape", 100), Err(Withheld::Missing));
    assert_eq!(list("/plain", 100), Err(Withheld::Missing));
    assert_eq!(list("/closed", 100), Err(Withheld::NotReadable));
}
