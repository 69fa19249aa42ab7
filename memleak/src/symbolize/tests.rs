//! Real programs compiled by gcc and started as children: each prints the addresses of its
//! own functions and the source lines it knows (`__LINE__`), and the symbolizer must name
//! them exactly.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};

use super::*;

/// Code under test, built as part of an executable or as a shared library. The asm block
/// gives one function with an exact size followed by padding no symbol covers, and one
/// label-like function without a size.
const FIXTURE_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
volatile int sink;
static void *caller_ra, *inl_ra;
static int caller_line, inl_line, inl_call_line;

__attribute__((noinline, noclone)) void *get_ra(void) { return __builtin_return_address(0); }

enum { TARGET_LINE = __LINE__ }; __attribute__((noinline, noclone)) int target_fn(int x) { return x * 3 + sink; }

__attribute__((noinline, noclone)) void caller_fn(void) {
    caller_ra = get_ra(); caller_line = __LINE__;
    sink++;
}

static inline __attribute__((always_inline)) void inl_fn(void) {
    inl_ra = get_ra(); inl_line = __LINE__;
    sink += 2;
}

__attribute__((noinline, noclone)) void outer_fn(void) {
    sink++;
    inl_fn(); inl_call_line = __LINE__;
    sink++;
}

__asm__(".text\n"
        ".globl sized_fn\n.type sized_fn,@function\nsized_fn:\n ret\n.size sized_fn, 1\n"
        " nop\n nop\n nop\n nop\n"
        ".globl nosize_fn\n.type nosize_fn,@function\nnosize_fn:\n nop\n nop\n ret\n");
void sized_fn(void);
void nosize_fn(void);

extern char __ehdr_start;

void fixture_report(void) {
    caller_fn();
    outer_fn();
    printf("base %p\n", (void *)&__ehdr_start);
    printf("target_fn %p %d\n", (void *)target_fn, TARGET_LINE);
    printf("caller_ra %p %d\n", caller_ra, caller_line);
    printf("inl_ra %p %d %d\n", inl_ra, inl_line, inl_call_line);
    printf("sized_gap %p\n", (void *)((char *)sized_fn + 2));
    printf("nosize %p\n", (void *)((char *)nosize_fn + 1));
    printf("malloc %p\n", (void *)malloc);
    fflush(stdout);
}
"#;

/// Reports (also where it mapped anonymous code) and sleeps; with `dlopen LIB` it first waits for a line on stdin, then loads LIB
/// and reports from there (a library loaded after the symbolizer read the maps).
const MAIN_C: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
void fixture_report(void);
int main(int argc, char **argv) {
    /* Anonymous code, as a JIT makes. */
    printf("jit %p\n", mmap(0, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (argc == 3 && strcmp(argv[1], "dlopen") == 0) {
        char line[16];
        printf("loading\n");
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) return 1;
        void *lib = dlopen(argv[2], RTLD_NOW);
        if (!lib) return 2;
        ((void (*)(void))dlsym(lib, "fixture_report"))();
    } else {
        fixture_report();
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) pause();
}
"#;

/// A scratch directory with the sources, removed at the end.
struct Build(PathBuf);

impl Build {
    fn new(name: &str) -> Build {
        let dir = std::env::temp_dir().join(format!("memleak-sym-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("fixture.c"), FIXTURE_C).unwrap();
        std::fs::write(dir.join("main.c"), MAIN_C).unwrap();
        Build(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    /// Runs a tool (gcc, objcopy) in the directory; panics with its output on failure.
    fn run(&self, program: &str, args: &[&str]) {
        let out = Command::new(program)
            .args(args)
            .current_dir(&self.0)
            .output()
            .unwrap_or_else(|e| panic!("running {program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn gcc(&self, args: &[&str]) {
        let mut all = vec!["-O2", "-g", "-Wall"];
        all.extend_from_slice(args);
        self.run("gcc", &all);
    }
}

impl Drop for Build {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A started fixture program and what it printed: key → (address, numbers).
struct Target {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
    values: HashMap<String, (u64, Vec<u32>)>,
}

impl Target {
    fn start(program: &Path, args: &[&str]) -> Target {
        let mut child = Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut target = Target {
            child,
            stdin,
            lines,
            values: HashMap::new(),
        };
        target.read_until(if args.first() == Some(&"dlopen") {
            "loading"
        } else {
            "ready"
        });
        target
    }

    fn read_until(&mut self, last: &str) {
        loop {
            let line = self.lines.next().expect("fixture exited early").unwrap();
            if line == last {
                return;
            }
            let mut words = line.split_whitespace();
            let key = words.next().unwrap().to_string();
            let addr =
                u64::from_str_radix(words.next().unwrap().trim_start_matches("0x"), 16).unwrap();
            let numbers = words.map(|w| w.parse().unwrap()).collect();
            self.values.insert(key, (addr, numbers));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn addr(&self, key: &str) -> u64 {
        self.values[key].0
    }

    fn number(&self, key: &str, i: usize) -> u32 {
        self.values[key].1[i]
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.kill();
    }
}

fn base_name(file: &Option<String>) -> Option<&str> {
    file.as_deref().map(|f| f.rsplit('/').next().unwrap())
}

/// One frame's (function, function_offset, file basename, line, inlined).
fn summary(f: &Frame) -> (Option<&str>, u64, Option<&str>, Option<u32>, bool) {
    (
        f.function.as_deref(),
        f.function_offset,
        base_name(&f.file),
        f.line,
        f.inlined,
    )
}

/// Every address the fixture printed, named exactly. `bias`: the load bias, subtracted
/// from an address to get its ELF virtual address (0 for a non-PIE executable).
fn check_fixture(sym: &mut Symbolizer, t: &Target, module: &str, pie: bool) {
    let bias = if pie { t.addr("base") } else { 0 };
    let file = Some("fixture.c");

    let target_fn = t.addr("target_fn");
    let frames = sym.symbolize(target_fn, false);
    assert_eq!(frames.len(), 1, "{frames:?}");
    let f = &frames[0];
    assert_eq!(
        summary(f),
        (
            Some("target_fn"),
            0,
            file,
            Some(t.number("target_fn", 0)),
            false
        )
    );
    assert_eq!((f.addr, f.module.as_deref()), (target_fn, Some(module)));
    assert_eq!(f.module_offset, target_fn - bias);
    assert_eq!(f.kind, FrameKind::Native);

    let ra = t.addr("caller_ra");
    let frames = sym.symbolize(ra, true);
    assert_eq!(frames.len(), 1, "{frames:?}");
    let f = &frames[0];
    assert_eq!(f.function.as_deref(), Some("caller_fn"));
    assert_eq!(
        (base_name(&f.file), f.line),
        (file, Some(t.number("caller_ra", 0)))
    );
    assert_eq!((f.addr, f.module_offset), (ra, ra - bias));
    assert!(f.function_offset > 0, "{f:?}");

    let ra = t.addr("inl_ra");
    let frames = sym.symbolize(ra, true);
    let got: Vec<_> = frames.iter().map(summary).collect();
    assert_eq!(got.len(), 2, "{frames:?}");
    assert_eq!(
        got[0],
        (Some("inl_fn"), 0, file, Some(t.number("inl_ra", 0)), true)
    );
    assert_eq!(
        (got[1].0, got[1].2, got[1].3, got[1].4),
        (Some("outer_fn"), file, Some(t.number("inl_ra", 1)), false)
    );
    assert!(
        frames
            .iter()
            .all(|f| f.addr == ra && f.module_offset == ra - bias)
    );

    let gap = t.addr("sized_gap");
    let frames = sym.symbolize(gap, false);
    assert_eq!(frames.len(), 1, "{frames:?}");
    assert_eq!(
        frames[0].function, None,
        "past the end of sized_fn: {frames:?}"
    );
    assert_eq!(
        format_frame(&frames[0]),
        format!("[unknown] [{module}+{:#x}]", gap - bias)
    );

    let frames = sym.symbolize(t.addr("nosize"), false);
    assert_eq!(
        (frames[0].function.as_deref(), frames[0].function_offset),
        (Some("nosize_fn"), 1),
        "{frames:?}"
    );
}

#[test]
fn symbolize_pie_executable() {
    let b = Build::new("pie");
    b.gcc(&["-fPIE", "-pie", "main.c", "fixture.c", "-o", "prog"]);
    let t = Target::start(&b.path("prog"), &[]);
    check_fixture(&mut Symbolizer::new(t.pid()), &t, "prog", true);
}

/// C++ names are demangled, with their namespace and parameters, as BCC prints them.
#[test]
fn symbolize_cpp_demangled() {
    let b = Build::new("cpp");
    std::fs::write(
        b.path("shop.cc"),
        r#"
#include <cstdio>
#include <unistd.h>
namespace shop {
template <typename T> __attribute__((noinline)) T total(T x) { return x * 2 + 1; }
__attribute__((noinline)) int price(int x) { return x * 3; }
}
int main() {
    std::printf("total %p\n", (void *)&shop::total<long>);
    std::printf("price %p\n", (void *)&shop::price);
    std::printf("ready\n");
    std::fflush(stdout);
    for (;;) pause();
}
"#,
    )
    .unwrap();
    b.run("g++", &["-O2", "-g", "shop.cc", "-o", "shop"]);
    let t = Target::start(&b.path("shop"), &[]);
    let mut sym = Symbolizer::new(t.pid());
    let mut name = |key| sym.symbolize(t.addr(key), false)[0].function.clone();
    assert_eq!(
        name("total").as_deref(),
        Some("long shop::total<long>(long)")
    );
    assert_eq!(name("price").as_deref(), Some("shop::price(int)"));
}

/// Anonymous code has no names; knowing its mapping, the symbolizer does not re-read the
/// maps for it.
#[test]
fn symbolize_anonymous_code_without_rereading_maps() {
    let b = Build::new("jit");
    b.gcc(&["main.c", "fixture.c", "-o", "prog"]);
    let t = Target::start(&b.path("prog"), &[]);
    let mut sym = Symbolizer::new(t.pid());
    let frames = sym.symbolize(t.addr("jit") + 16, false);
    assert_eq!(frames.len(), 1);
    assert_eq!(
        (frames[0].module.as_deref(), frames[0].function.as_deref()),
        (None, None)
    );
    assert!(
        sym.missed.is_empty(),
        "re-read the maps for a known mapping"
    );
}

#[test]
fn symbolize_non_pie_executable() {
    let b = Build::new("nopie");
    b.gcc(&["-fno-pie", "-no-pie", "main.c", "fixture.c", "-o", "prog"]);
    let t = Target::start(&b.path("prog"), &[]);
    check_fixture(&mut Symbolizer::new(t.pid()), &t, "prog", false);
}

#[test]
fn symbolize_shared_library() {
    let b = Build::new("shlib");
    b.gcc(&["-fPIC", "-shared", "fixture.c", "-o", "libfixture.so"]);
    let rpath = format!("-Wl,-rpath,{}", b.0.display());
    b.gcc(&["main.c", "-L.", "-lfixture", &rpath, "-o", "prog"]);
    let t = Target::start(&b.path("prog"), &[]);
    check_fixture(&mut Symbolizer::new(t.pid()), &t, "libfixture.so", true);
}

/// The library is loaded after the symbolizer read the maps: an address outside every
/// known mapping re-reads them.
#[test]
fn symbolize_library_loaded_after_maps_were_read() {
    let b = Build::new("dlopen");
    b.gcc(&["-fPIC", "-shared", "fixture.c", "-o", "libfixture.so"]);
    b.gcc(&["main.c", "fixture.c", "-o", "prog", "-ldl"]);
    let lib = b.path("libfixture.so");
    let mut t = Target::start(&b.path("prog"), &["dlopen", lib.to_str().unwrap()]);
    let mut sym = Symbolizer::new(t.pid());
    sym.refresh();
    writeln!(t.stdin.as_mut().unwrap(), "go").unwrap();
    t.read_until("ready");
    check_fixture(&mut sym, &t, "libfixture.so", true);
}

/// Fully stripped binary, its symbols and DWARF only in `.debug/prog.debug`, found through
/// `.gnu_debuglink` (and checked by build-id).
#[test]
fn symbolize_stripped_binary_with_debuglink() {
    let b = Build::new("debuglink");
    b.gcc(&["main.c", "fixture.c", "-o", "prog"]);
    std::fs::create_dir(b.path(".debug")).unwrap();
    b.run(
        "objcopy",
        &["--only-keep-debug", "prog", ".debug/prog.debug"],
    );
    b.run("objcopy", &["--strip-all", "prog"]);
    b.run(
        "objcopy",
        &["--add-gnu-debuglink=.debug/prog.debug", "prog"],
    );
    let t = Target::start(&b.path("prog"), &[]);
    check_fixture(&mut Symbolizer::new(t.pid()), &t, "prog", true);
}

/// The debug link names a FIFO (a link could as well name `/dev/zero` or a `/proc` file):
/// the candidate is skipped, not opened and read forever, and the frame stays unnamed.
#[test]
fn symbolize_debuglink_to_a_fifo_is_skipped() {
    let b = Build::new("debuglink-fifo");
    b.gcc(&["main.c", "fixture.c", "-o", "prog"]);
    b.run("objcopy", &["--only-keep-debug", "prog", "prog.debug"]);
    b.run(
        "objcopy",
        &["--strip-all", "--add-gnu-debuglink=prog.debug", "prog"],
    );
    std::fs::remove_file(b.path("prog.debug")).unwrap();
    b.run("mkfifo", &["prog.debug"]);
    let t = Target::start(&b.path("prog"), &[]);
    let (pid, addr) = (t.pid(), t.addr("target_fn"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(Symbolizer::new(pid).symbolize(addr, false)));
    let frames = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("symbolizing hung on the FIFO");
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].function, None, "{frames:?}");
    assert_eq!(frames[0].module.as_deref(), Some("prog"));
}

/// dwz moved the DWARF both programs share (here the inlined function's DIE and most names)
/// into `common.debug`, named by a relative `.gnu_debugaltlink`.
#[test]
fn symbolize_dwz_supplementary_file() {
    let b = Build::new("dwz");
    if Command::new("dwz").arg("--version").output().is_err() {
        eprintln!("SKIPPED: dwz is not installed (apt-get install dwz)");
        return;
    }
    b.gcc(&["main.c", "fixture.c", "-o", "prog"]);
    b.gcc(&["-fno-pie", "-no-pie", "main.c", "fixture.c", "-o", "prog2"]);
    b.run("dwz", &["-m", "common.debug", "prog", "prog2"]);
    let t = Target::start(&b.path("prog"), &[]);
    check_fixture(&mut Symbolizer::new(t.pid()), &t, "prog", true);
}

/// Without symbols or debug info an address is `[unknown]` with its module offset, never
/// the name of some exported neighbour.
#[test]
fn symbolize_stripped_binary_without_debug_info_is_unknown() {
    let b = Build::new("stripped");
    b.gcc(&["main.c", "fixture.c", "-o", "prog", "-s"]);
    let t = Target::start(&b.path("prog"), &[]);
    let addr = t.addr("target_fn");
    let frames = Symbolizer::new(t.pid()).symbolize(addr, false);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].function, None, "{frames:?}");
    assert_eq!(frames[0].module_offset, addr - t.addr("base"));
}

/// libc is stripped; its symbols and DWARF come from the distribution's debug file under
/// `/usr/lib/debug/.build-id/` (package libc6-dbg), when installed.
#[test]
fn symbolize_libc_through_build_id_debug_file() {
    use object::Object as _;
    let b = Build::new("libc");
    b.gcc(&["main.c", "fixture.c", "-o", "prog"]);
    let t = Target::start(&b.path("prog"), &[]);
    let maps = procmaps::read(t.pid()).unwrap();
    let libc = procmaps::find_library(&maps, "libc").expect("libc mapped");
    let data = std::fs::read(procmaps::map_file_path(t.pid(), libc)).unwrap();
    let build_id = object::File::parse(&*data)
        .unwrap()
        .build_id()
        .unwrap()
        .unwrap();
    let hex: String = build_id.iter().map(|b| format!("{b:02x}")).collect();
    let debug_file = format!("/usr/lib/debug/.build-id/{}/{}.debug", &hex[..2], &hex[2..]);
    let has_debug_file = Path::new(&debug_file).exists();

    let frames = Symbolizer::new(t.pid()).symbolize(t.addr("malloc"), false);
    let outer = frames.last().unwrap();
    assert_eq!(
        (
            outer.function.as_deref(),
            outer.function_offset,
            outer.module.as_deref()
        ),
        (Some("malloc"), 0, Some("libc.so.6")),
        "{frames:?}"
    );
    if has_debug_file {
        assert_eq!(base_name(&outer.file), Some("malloc.c"), "{frames:?}");
        assert!(outer.line.is_some());
    } else {
        eprintln!("SKIPPED the DWARF part: no {debug_file} (install libc6-dbg)");
    }
}

/// The binary is deleted and another file takes its path after the target started.
#[test]
fn symbolize_binary_replaced_on_disk() {
    let b = Build::new("deleted");
    b.gcc(&["main.c", "fixture.c", "-o", "prog"]);
    let t = Target::start(&b.path("prog"), &[]);
    std::fs::remove_file(b.path("prog")).unwrap();
    std::fs::write(b.path("prog"), b"not the program").unwrap();
    check_fixture(&mut Symbolizer::new(t.pid()), &t, "prog", true);
}

/// memleak prints its last table after the target died: files opened by `refresh()` while
/// it lived are enough, even once the binary is gone from disk too. A refresh while the
/// target is a zombie (its maps file is empty) keeps them: a short `-c` command's tables
/// came out all `[unknown]` when the exit watcher's refresh hit that window.
#[test]
fn symbolize_after_target_exited() {
    let b = Build::new("exited");
    b.gcc(&["main.c", "fixture.c", "-o", "prog"]);
    let mut t = Target::start(&b.path("prog"), &[]);
    let mut sym = Symbolizer::new(t.pid());
    sym.refresh();
    unsafe { libc::kill(t.pid() as libc::pid_t, libc::SIGTERM) };
    let zombie = || {
        std::fs::read_to_string(format!("/proc/{}/stat", t.pid())).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z'))
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !zombie() {
        assert!(
            std::time::Instant::now() < deadline,
            "the fixture did not exit"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    sym.refresh();
    t.kill();
    std::fs::remove_file(b.path("prog")).unwrap();
    check_fixture(&mut sym, &t, "prog", true);
}

/// The cache per (object, address) makes a stack of 127 frames, hundreds of times per
/// interval, cheap.
#[test]
fn symbolize_repeated_stacks_from_cache() {
    let b = Build::new("cache");
    b.gcc(&["main.c", "fixture.c", "-o", "prog"]);
    let t = Target::start(&b.path("prog"), &[]);
    let mut sym = Symbolizer::new(t.pid());
    let stack: Vec<u64> = ["target_fn", "caller_ra", "inl_ra", "sized_gap", "nosize"]
        .iter()
        .map(|k| t.addr(k))
        .cycle()
        .take(127)
        .collect();
    let first = sym.symbolize(stack[2], true);
    let started = std::time::Instant::now();
    for _ in 0..300 {
        for &addr in &stack {
            std::hint::black_box(sym.symbolize(addr, true));
        }
    }
    let elapsed = started.elapsed();
    eprintln!("300 stacks of 127 frames: {elapsed:?}");
    assert_eq!(sym.symbolize(stack[2], true), first);
    assert!(elapsed.as_millis() < 1000, "{elapsed:?}");
}

/// The vDSO has no file: its image is read from the target's memory. Here the target is
/// this test process, and the expected address comes from the image's own `.dynsym`.
#[test]
fn symbolize_vdso() {
    use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};
    let maps = procmaps::read(std::process::id()).unwrap();
    let Some(vdso) = maps.iter().find(|m| m.path.as_deref() == Some("[vdso]")) else {
        eprintln!("SKIPPED: this process has no [vdso] mapping");
        return;
    };
    let mut image = vec![0; (vdso.end - vdso.start) as usize];
    let mem = File::open("/proc/self/mem").unwrap();
    mem.read_exact_at(&mut image, vdso.start).unwrap();
    let obj = object::File::parse(&*image).unwrap();
    let first_vaddr = obj.segments().next().unwrap().address();
    let sym = obj
        .dynamic_symbols()
        .find(|s| s.name() == Ok("__vdso_clock_gettime"))
        .expect("vDSO exports __vdso_clock_gettime");
    let addr = vdso.start + sym.address() - first_vaddr + 4;

    let frames = Symbolizer::new(std::process::id()).symbolize(addr, false);
    assert_eq!(frames.len(), 1);
    let f = &frames[0];
    assert_eq!(f.module.as_deref(), Some("[vdso]"));
    assert_eq!(f.function_offset, 4);
    // `clock_gettime` is the public alias of `__vdso_clock_gettime`.
    assert_eq!(f.function.as_deref(), Some("clock_gettime"), "{f:?}");
    assert_eq!(format_frame(f), "clock_gettime+0x4 [vdso]");
}

#[test]
fn symbolizer_can_move_to_another_thread() {
    fn is_send<T: Send>() {}
    is_send::<Symbolizer>();
}

#[test]
fn symbolize_address_outside_every_mapping() {
    let mut sym = Symbolizer::new(std::process::id());
    let frames = sym.symbolize(8, false);
    assert_eq!(frames.len(), 1);
    assert_eq!(
        (frames[0].module.as_deref(), frames[0].function.as_deref()),
        (None, None)
    );
    assert_eq!(format_frame(&frames[0]), "[unknown]");
}

#[test]
fn symbolize_format_frame_like_bcc() {
    let frame = Frame {
        addr: 0x5555_0000_1000,
        module: Some("leaker".into()),
        module_offset: 0x1139,
        function: Some("leak_one".into()),
        function_offset: 0xf,
        file: Some("/src/leaker.c".into()),
        line: Some(12),
        ..Default::default()
    };
    assert_eq!(format_frame(&frame), "leak_one+0xf [leaker] leaker.c:12");
    let inlined = Frame {
        function: Some("helper".into()),
        line: Some(7),
        inlined: true,
        ..frame.clone()
    };
    assert_eq!(
        format_frame(&inlined),
        "helper [leaker] leaker.c:7 (inlined)"
    );
    let unknown = Frame {
        module: Some("libfoo.so".into()),
        module_offset: 0x1234,
        ..Default::default()
    };
    assert_eq!(format_frame(&unknown), "[unknown] [libfoo.so+0x1234]");
    let no_line = Frame {
        file: None,
        line: None,
        ..frame
    };
    assert_eq!(format_frame(&no_line), "leak_one+0xf [leaker]");
}
