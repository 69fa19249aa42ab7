//! Whole native stacks through code built without frame pointers (issue 3): the `.eh_frame`
//! walker must reach `main` (or the interpreter's entry) through an executable, a shared
//! library, a library loaded after attach, and both kinds of CPython 3.11 build.
//!
//! Frames are symbolized here, from the fixture's own mappings and symbol tables, so these
//! tests check the unwinder and nothing else.

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use memleak_tests::{can_trace, memleak_bin, pyenv_python, skipped};
use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Six links in a shared library, the last one allocating. Every link does work after its
/// call so none is a tail call; `lib_f3` has a frame over 64 KiB (rsp-based CFA offsets that
/// need the wide row format).
const LIB: &str = r#"
#include <stdlib.h>
#include <string.h>
#define KEEP(p) __asm__ volatile("" : : "r"(p) : "memory")
__attribute__((noinline)) void *lib_f6(size_t n) { void *p = malloc(n); KEEP(p); return p; }
__attribute__((noinline)) void *lib_f5(size_t n) { void *p = lib_f6(n + 1); KEEP(p); return p; }
__attribute__((noinline)) void *lib_f4(size_t n) { void *p = lib_f5(n + 1); KEEP(p); return p; }
__attribute__((noinline)) void *lib_f3(size_t n) {
    volatile char big[70000];
    big[n % sizeof big] = 1;
    void *p = lib_f4(n + 1 + big[n % sizeof big]);
    KEEP(p);
    return p;
}
__attribute__((noinline)) void *lib_f2(size_t n) { void *p = lib_f3(n + 1); KEEP(p); return p; }
__attribute__((noinline)) void *lib_f1(size_t n) { void *p = lib_f2(n + 1); KEEP(p); return p; }
"#;

/// Six links in the executable calling into the library; `exe_f3` has a variable-length
/// array, so gcc gives it an rbp-based CFA even with -fomit-frame-pointer. Waits for a line
/// on stdin before allocating, says "done" after, and then waits for stdin to close.
const EXE: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#define KEEP(p) __asm__ volatile("" : : "r"(p) : "memory")
void *lib_f1(size_t n);
__attribute__((noinline)) void *exe_f6(size_t n) { void *p = lib_f1(n + 1); KEEP(p); return p; }
__attribute__((noinline)) void *exe_f5(size_t n) { void *p = exe_f6(n + 1); KEEP(p); return p; }
__attribute__((noinline)) void *exe_f4(size_t n) { void *p = exe_f5(n + 1); KEEP(p); return p; }
__attribute__((noinline)) void *exe_f3(size_t n) {
    volatile char vla[n % 64 + 8];
    vla[0] = 0;
    void *p = exe_f4(n + 1 + vla[0]);
    KEEP(p);
    return p;
}
__attribute__((noinline)) void *exe_f2(size_t n) { void *p = exe_f3(n + 1); KEEP(p); return p; }
__attribute__((noinline)) void *exe_f1(size_t n) { void *p = exe_f2(n + 1); KEEP(p); return p; }
void *kept[10];
/* With an argument: allocate at once, write our mappings there, and exit (for -c). */
int main(int argc, char **argv) {
    char line[256];
    if (argc < 2 && !fgets(line, sizeof line, stdin)) return 1;
    for (int i = 0; i < 10; i++) kept[i] = exe_f1(100000);
    if (argc > 1) {
        FILE *in = fopen("/proc/self/maps", "r"), *out = fopen(argv[1], "w");
        while (fgets(line, sizeof line, in)) fputs(line, out);
        return fclose(out) != 0;
    }
    printf("done\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {}
    return 0;
}
"#;

/// Loads the library only after the go line (so after memleak attached), then allocates
/// through it for 3 s: long enough for memleak to notice the new mapping.
const DLOPEN_EXE: &str = r#"
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#define KEEP(p) __asm__ volatile("" : : "r"(p) : "memory")
void *kept[30];
__attribute__((noinline)) void *call_loaded(void *(*f)(size_t), size_t n) { void *p = f(n); KEEP(p); return p; }
int main(int argc, char **argv) {
    char line[64];
    if (!fgets(line, sizeof line, stdin)) return 1;
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    void *(*f)(size_t) = (void *(*)(size_t))dlsym(lib, "lib_f1");
    for (int i = 0; i < 30; i++) { kept[i] = call_loaded(f, 100000); usleep(100000); }
    printf("done\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {}
    return 0;
}
"#;

/// Keeps eight 1 MiB bytearrays made in `leak`.
const KEEP_PY: &str = r#"
import sys
sys.stdin.readline()
kept = []
def leak():
    for _ in range(8):
        kept.append(bytearray(1 << 20))
leak()
print("done", flush=True)
sys.stdin.read()
"#;

const LIB_CHAIN: [&str; 6] = ["lib_f6", "lib_f5", "lib_f4", "lib_f3", "lib_f2", "lib_f1"];
const EXE_CHAIN: [&str; 6] = ["exe_f6", "exe_f5", "exe_f4", "exe_f3", "exe_f2", "exe_f1"];

/// A fresh directory for one test's fixtures, removed unless the test fails.
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Result<Scratch> {
        let dir =
            std::env::temp_dir().join(format!("memleak-unwind-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// gcc `flags` -o `output` `source` `libs`.
    fn gcc(
        &self,
        source: &str,
        text: &str,
        output: &str,
        flags: &[&str],
        libs: &[&str],
    ) -> Result<PathBuf> {
        let src = self.path(source);
        std::fs::write(&src, text)?;
        let out = self.path(output);
        let result = Command::new("gcc")
            .args(flags)
            .arg("-o")
            .arg(&out)
            .arg(&src)
            .args(libs)
            .output()
            .context("running gcc")?;
        ensure!(
            result.status.success(),
            "gcc {source} failed:\n{}",
            String::from_utf8_lossy(&result.stderr)
        );
        Ok(out)
    }

    /// The library and an executable linked to it, both built with `flags`.
    fn chain(&self, flags: &[&str]) -> Result<PathBuf> {
        let mut lib_flags = flags.to_vec();
        lib_flags.extend(["-shared", "-fPIC"]);
        self.gcc("libchain.c", LIB, "libchain.so", &lib_flags, &[])?;
        let dir = self.0.to_str().context("scratch path")?;
        let rpath = format!("-Wl,-rpath,{dir}");
        let mut exe_flags = flags.to_vec();
        exe_flags.extend(["-L", dir, &rpath]);
        self.gcc("chain.c", EXE, "chain", &exe_flags, &["-lchain"])
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A fixture process that waits for a go line, allocates, and says "done".
struct Fixture {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Fixture {
    fn start(mut cmd: Command) -> Result<Fixture> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the fixture")?;
        let stdout = BufReader::new(child.stdout.take().context("fixture stdout")?);
        Ok(Fixture { child, stdout })
    }

    fn go_and_wait_done(&mut self) -> Result<()> {
        let stdin = self.child.stdin.as_mut().context("fixture stdin")?;
        stdin.write_all(b"go\n")?;
        stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        ensure!(
            line.trim() == "done",
            "fixture said {line:?} instead of done"
        );
        Ok(())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What memleak recorded, as (bytes, frame addresses) per stack, and the fixture's mappings
/// to symbolize them with.
struct Traced {
    stacks: Vec<(u64, Vec<u64>)>,
    symbols: Symbols,
    stdout: String,
}

/// Attaches `memleak -p PID --json ... extra` to the fixture, lets the fixture allocate once
/// memleak is attached, then interrupts memleak and reads its final table.
fn trace(scratch: &Scratch, mut fixture: Fixture, extra: &[&str]) -> Result<Traced> {
    let pid = fixture.child.id();
    // memleak -p hooks the libc the process maps: let the dynamic loader map it first.
    for _ in 0..1000 {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if maps.contains("/libc.so") {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let json = scratch.path("report.json");
    let mut memleak = Command::new(memleak_bin())
        .arg("-p")
        .arg(pid.to_string())
        .args(["-o", "0", "--json"])
        .arg(&json)
        .args(extra)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting memleak")?;
    let out = BufReader::new(memleak.stdout.take().context("memleak stdout")?);
    let (attached_tx, attached_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in out.lines().map_while(Result::ok) {
            if line.starts_with("Attaching") {
                let _ = attached_tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    if attached_rx.recv_timeout(TIMEOUT).is_err() {
        let _ = memleak.kill();
        bail!(
            "memleak did not attach: {}",
            reader.join().unwrap_or_default()
        );
    }
    fixture.go_and_wait_done()?;
    // The tables made after a library appears need one maps refresh (every 250 ms).
    std::thread::sleep(Duration::from_millis(500));
    unsafe { libc::kill(memleak.id() as libc::pid_t, libc::SIGINT) };
    let status = memleak.wait()?;
    let stdout = reader.join().unwrap_or_default();
    ensure!(status.success(), "memleak failed ({status}):\n{stdout}");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    drop(fixture);
    read_report(&json, &maps, stdout)
}

/// The stacks of the report's final state, to symbolize with `maps`.
fn read_report(json: &Path, maps: &str, stdout: String) -> Result<Traced> {
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    let snapshot = doc
        .get("final")
        .filter(|s| !s.is_null())
        .context("no final state in the report")?;
    let stacks = snapshot["stacks"]
        .as_array()
        .context("no stacks")?
        .iter()
        .map(|s| {
            let bytes = s["bytes"].as_u64().unwrap_or(0);
            let frames = s["frames"]
                .as_array()
                .map(|f| f.iter().filter_map(|f| f["addr"].as_u64()).collect())
                .unwrap_or_default();
            (bytes, frames)
        })
        .collect();
    Ok(Traced {
        stacks,
        symbols: Symbols::new(maps),
        stdout,
    })
}

/// Return addresses → function names, from the ELF symbol tables of the mapped files.
struct Symbols {
    /// (start, end, file offset, path) of each file mapping.
    maps: Vec<(u64, u64, u64, String)>,
    files: HashMap<String, Option<ElfSymbols>>,
}

struct ElfSymbols {
    /// (file offset, size, vaddr) of each segment.
    segments: Vec<(u64, u64, u64)>,
    /// (address, size, name), sorted.
    functions: Vec<(u64, u64, String)>,
}

impl Symbols {
    fn new(maps: &str) -> Symbols {
        let maps = maps
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (start, end) = f.first()?.split_once('-')?;
                let path = f.get(5).filter(|p| p.starts_with('/'))?;
                Some((
                    u64::from_str_radix(start, 16).ok()?,
                    u64::from_str_radix(end, 16).ok()?,
                    u64::from_str_radix(f.get(2)?, 16).ok()?,
                    path.to_string(),
                ))
            })
            .collect();
        Symbols {
            maps,
            files: HashMap::new(),
        }
    }

    /// The file and the function holding the call that returns to `ret`.
    fn resolve(&mut self, ret: u64) -> (String, Option<String>) {
        let addr = ret - 1;
        let Some((start, _, offset, path)) = self
            .maps
            .iter()
            .find(|(s, e, _, _)| *s <= addr && addr < *e)
            .cloned()
        else {
            return ("?".into(), None);
        };
        let file = self
            .files
            .entry(path.clone())
            .or_insert_with(|| ElfSymbols::read(Path::new(&path)));
        let name = file.as_ref().and_then(|f| {
            let (seg_off, _, vaddr) = f
                .segments
                .iter()
                .find(|(o, size, _)| *o <= offset && offset < o + size)?;
            let v = vaddr + (offset - seg_off) + (addr - start);
            let i = f.functions.partition_point(|(a, _, _)| *a <= v);
            let (a, size, name) = f.functions.get(i.checked_sub(1)?)?;
            (v < a + size.max(&1)).then(|| name.clone())
        });
        let base = path.rsplit('/').next().unwrap_or(&path).to_string();
        (base, name)
    }

    fn names(&mut self, frames: &[u64]) -> Vec<String> {
        frames
            .iter()
            .map(|&a| self.resolve(a).1.unwrap_or_else(|| format!("{a:#x}")))
            .collect()
    }
}

impl ElfSymbols {
    fn read(path: &Path) -> Option<ElfSymbols> {
        let data = std::fs::read(path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        let segments = file
            .segments()
            .map(|s| {
                let (o, size) = s.file_range();
                (o, size, s.address())
            })
            .collect();
        let mut functions: Vec<(u64, u64, String)> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| s.kind() == SymbolKind::Text && s.address() != 0)
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
            .collect();
        functions.sort();
        functions.dedup_by_key(|f| f.0);
        Some(ElfSymbols {
            segments,
            functions,
        })
    }
}

/// The stack holding at least `bytes` whose frames start with `prefix`; its names.
fn find_stack(traced: &mut Traced, bytes: u64, prefix: &[&str]) -> Result<Vec<String>> {
    let mut seen = Vec::new();
    for (b, frames) in traced.stacks.clone() {
        let names = traced.symbols.names(&frames);
        if b >= bytes && names.len() >= prefix.len() && names[..prefix.len()] == *prefix {
            return Ok(names);
        }
        seen.push(format!("{b} bytes: {}", names.join(" < ")));
    }
    bail!(
        "no stack of {bytes}+ bytes starting with {}; memleak saw:\n{}\n{}",
        prefix.join(" < "),
        seen.join("\n"),
        traced.stdout
    )
}

/// After `main` (the `main_at`th frame) come libc's start code and the executable's
/// `_start`: the walk reached the outermost frame.
fn ends_at_start(names: &[String], main_at: usize) -> Result<()> {
    ensure!(
        names.last().map(String::as_str) == Some("_start") && names.len() >= main_at + 3,
        "no libc start code and _start after main: {}",
        names.join(" < ")
    );
    Ok(())
}

fn chain_expectation() -> Vec<&'static str> {
    LIB_CHAIN
        .iter()
        .chain(EXE_CHAIN.iter())
        .copied()
        .chain(["main"])
        .collect()
}

#[test]
fn chain_without_frame_pointers_reaches_main() -> Result<()> {
    if !can_trace("chain_without_frame_pointers_reaches_main") {
        return Ok(());
    }
    let scratch = Scratch::new("chain")?;
    let exe = scratch.chain(&["-O2", "-fomit-frame-pointer"])?;
    let fixture = Fixture::start(Command::new(&exe))?;
    let mut traced = trace(&scratch, fixture, &[])?;
    let want = chain_expectation();
    let names = find_stack(&mut traced, 10 * 100_005, &want)?;
    ends_at_start(&names, want.len() - 1)
}

/// `memleak -c`: the command allocates as soon as `main` runs, and still every frame is
/// there (the command is held at its entry point until its tables are in place).
#[test]
fn started_command_has_whole_stacks_from_its_first_allocation() -> Result<()> {
    if !can_trace("started_command_has_whole_stacks_from_its_first_allocation") {
        return Ok(());
    }
    let scratch = Scratch::new("command")?;
    let exe = scratch.chain(&["-O2", "-fomit-frame-pointer"])?;
    let maps = scratch.path("maps.txt");
    let json = scratch.path("report.json");
    let command = format!("{} {}", exe.display(), maps.display());
    let out = Command::new(memleak_bin())
        .args(["-c", &command, "--json"])
        .arg(&json)
        .stdin(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "memleak -c failed:\n{stdout}");
    let mut traced = read_report(&json, &std::fs::read_to_string(&maps)?, stdout)?;
    let want = chain_expectation();
    let names = find_stack(&mut traced, 10 * 100_005, &want)?;
    ends_at_start(&names, want.len() - 1)
}

#[test]
fn frame_pointer_build_same_frames_with_dwarf_and_fp() -> Result<()> {
    if !can_trace("frame_pointer_build_same_frames_with_dwarf_and_fp") {
        return Ok(());
    }
    let scratch = Scratch::new("fp")?;
    let exe = scratch.chain(&["-O2", "-fno-omit-frame-pointer"])?;
    let want = chain_expectation();
    let mut by_mode = Vec::new();
    for mode in ["dwarf", "fp"] {
        let fixture = Fixture::start(Command::new(&exe))?;
        let mut traced = trace(&scratch, fixture, &["--unwind", mode])?;
        let names = find_stack(&mut traced, 10 * 100_005, &want)?;
        if mode == "dwarf" {
            ends_at_start(&names, want.len() - 1)?;
        }
        by_mode.push(names);
    }
    // Up to main both agree; past it glibc has no frame pointers, so only DWARF goes on.
    ensure!(by_mode[0][..want.len()] == by_mode[1][..want.len()]);
    Ok(())
}

#[test]
fn library_loaded_after_attach_gets_tables() -> Result<()> {
    if !can_trace("library_loaded_after_attach_gets_tables") {
        return Ok(());
    }
    let scratch = Scratch::new("dlopen")?;
    scratch.gcc(
        "libchain.c",
        LIB,
        "libloaded.so",
        &["-O2", "-fomit-frame-pointer", "-shared", "-fPIC"],
        &[],
    )?;
    let exe = scratch.gcc(
        "dl.c",
        DLOPEN_EXE,
        "dl",
        &["-O2", "-fomit-frame-pointer"],
        &["-ldl"],
    )?;
    let mut cmd = Command::new(&exe);
    cmd.arg(scratch.path("libloaded.so"));
    let fixture = Fixture::start(cmd)?;
    let mut traced = trace(&scratch, fixture, &[])?;
    let mut want: Vec<&str> = LIB_CHAIN.to_vec();
    want.extend(["call_loaded", "main"]);
    // The allocations made before memleak re-read the maps stop at the unknown library;
    // the later ones (most of the 30, 100 ms apart) are whole.
    let names = find_stack(&mut traced, 10 * 100_005, &want)?;
    ends_at_start(&names, want.len() - 1)
}

/// `python keep.py` traced: the bytearrays' stack runs through the interpreter loop up to
/// `Py_BytesMain` (python's `main` tail-calls it, so `main` itself is not on the stack), and
/// on to the executable's entry.
fn python_stack(test: &str, python: Option<PathBuf>) -> Result<()> {
    if !can_trace(test) {
        return Ok(());
    }
    let Some(python) = python else {
        skipped(test, "interpreter not installed");
        return Ok(());
    };
    let scratch = Scratch::new(test)?;
    let script = scratch.path("keep.py");
    std::fs::write(&script, KEEP_PY)?;
    let mut cmd = Command::new(&python);
    cmd.arg(&script);
    let fixture = Fixture::start(cmd)?;
    let mut traced = trace(&scratch, fixture, &[])?;
    let (bytes, frames) = traced
        .stacks
        .iter()
        .max_by_key(|(b, _)| *b)
        .cloned()
        .context("no stacks")?;
    ensure!(bytes >= 8 << 20, "largest stack holds only {bytes} bytes");
    let names = traced.symbols.names(&frames);
    let at = |name: &str| names.iter().position(|n| n == name);
    let shown = names.join(" < ");
    let eval = at("_PyEval_EvalFrameDefault").with_context(|| format!("no eval loop: {shown}"))?;
    let entry = at("Py_BytesMain").with_context(|| format!("no Py_BytesMain: {shown}"))?;
    ensure!(eval < entry, "eval loop outside Py_BytesMain: {shown}");
    // Past Py_BytesMain: libc's start code, then the executable's _start, last.
    let files: Vec<String> = frames
        .iter()
        .map(|&a| traced.symbols.resolve(a).0)
        .collect();
    ensure!(
        files[entry + 1..].iter().any(|f| f.starts_with("libc.so")),
        "no libc start code after Py_BytesMain: {shown}"
    );
    let exe_name = python
        .canonicalize()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned());
    ensure!(
        files.last() == exe_name.as_ref(),
        "the walk stopped before the executable's entry: {shown} ({files:?})"
    );
    Ok(())
}

#[test]
fn pyenv_python311_shared_libpython() -> Result<()> {
    python_stack("pyenv_python311_shared_libpython", pyenv_python("3.11"))
}

#[test]
fn debian_python311_static() -> Result<()> {
    let debian = PathBuf::from("/usr/bin/python3.11");
    python_stack("debian_python311_static", debian.exists().then_some(debian))
}
