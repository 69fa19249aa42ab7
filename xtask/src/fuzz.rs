//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` (libFuzzer, nightly), each for
//! a bounded time, after seeding their corpora from real files made here: `/proc/self/maps`,
//! small ELF files built by gcc with and without DWARF, CPython's own line tables.
//! `cargo xtask test` runs every target briefly; run them longer by hand to search deeper.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};
use clap::Args;

use crate::{run, workspace_root};

/// Every target in `fuzz/fuzz_targets/`, with the seeds its corpus starts from.
const TARGETS: [(&str, Seeds); 5] = [
    ("procmaps", Seeds::Maps),
    ("symbolize_elf", Seeds::Elf),
    ("unwind_table", Seeds::Elf),
    ("python_linetable", Seeds::LineTables),
    ("python_code", Seeds::CodeObjects),
];

#[derive(Clone, Copy)]
enum Seeds {
    Maps,
    Elf,
    LineTables,
    CodeObjects,
}

#[derive(Args)]
pub struct Options {
    /// Seconds per target.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Targets to run (default: all).
    pub targets: Vec<String>,
}

/// Builds the targets once, then runs each for `seconds`; fails if any crashed (a panic, an
/// overflow, a huge allocation, or one input taking over 10 s), naming the input that did.
pub fn run_fuzz(opts: &Options) -> Result<()> {
    let targets: Vec<(&str, Seeds)> = if opts.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        opts.targets
            .iter()
            .map(|name| {
                TARGETS
                    .iter()
                    .find(|(t, _)| t == name)
                    .copied()
                    .with_context(|| {
                        let known: Vec<&str> = TARGETS.iter().map(|(t, _)| *t).collect();
                        format!("no fuzz target {name} (there are: {})", known.join(", "))
                    })
            })
            .collect::<Result<_>>()?
    };
    ensure_cargo_fuzz()?;
    let fuzz_dir = workspace_root().join("fuzz");
    // The same dependency versions as the workspace; cargo adds libFuzzer's.
    std::fs::copy(
        workspace_root().join("Cargo.lock"),
        fuzz_dir.join("Cargo.lock"),
    )?;
    println!("fuzz: building {} targets", targets.len());
    run(&mut cargo_fuzz(&["build"]))?;
    let mut failed = Vec::new();
    for (target, seeds) in targets {
        let corpus = fuzz_dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        write_seeds(seeds, &corpus).with_context(|| format!("seeding {target}"))?;
        let log_path = fuzz_dir.join("artifacts").join(format!("{target}.log"));
        std::fs::create_dir_all(log_path.parent().expect("has a parent"))?;
        let log = std::fs::File::create(&log_path)?;
        let started = Instant::now();
        let status = cargo_fuzz(&["run", target])
            .arg("--")
            .arg(format!("-max_total_time={}", opts.seconds))
            .args(["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"])
            .stdout(log.try_clone()?)
            .stderr(log)
            .status()
            .with_context(|| format!("running fuzz target {target}"))?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let runs = text
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map_or("?".to_string(), |n| n.trim().to_string());
        let inputs = std::fs::read_dir(&corpus).map_or(0, |d| d.count());
        let took = started.elapsed().as_secs();
        if status.success() {
            println!(
                "fuzz: {target}: ran {took} s, {runs} inputs tried, corpus {inputs}, no crash"
            );
        } else {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
            eprintln!(
                "fuzz: {target}: CRASHED after {took} s (whole log: {})",
                log_path.display()
            );
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets crashed: {} (inputs in fuzz/artifacts/; replay one with `cargo +nightly fuzz run TARGET FILE`)",
            failed.join(", ")
        );
    }
    Ok(())
}

/// `cargo +nightly fuzz ARGS` in the workspace. The fuzz build needs the parsers, not the
/// BPF object: aya-build is told to skip it.
fn cargo_fuzz(args: &[&str]) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .args(["+nightly", "fuzz"])
        .args(args)
        .env("AYA_BUILD_SKIP", "1");
    cmd
}

/// Installs cargo-fuzz with the nightly toolchain when `cargo fuzz` does not run yet.
fn ensure_cargo_fuzz() -> Result<()> {
    let works = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if works {
        return Ok(());
    }
    eprintln!("setup: installing cargo-fuzz (about a minute)");
    run(Command::new("cargo").args(["+nightly", "install", "cargo-fuzz", "--locked"]))
}

fn write_seeds(seeds: Seeds, corpus: &Path) -> Result<()> {
    match seeds {
        Seeds::Maps => {
            let maps = std::fs::read("/proc/self/maps")?;
            std::fs::write(corpus.join("seed-self-maps"), maps)?;
        }
        Seeds::Elf => {
            for (name, elf) in elf_seeds()? {
                std::fs::copy(&elf, corpus.join(format!("seed-{name}")))?;
            }
        }
        Seeds::LineTables => python_seeds("linetable", LINE_TABLE, corpus)?,
        Seeds::CodeObjects => python_seeds("code", CODE_OBJECT, corpus)?,
    }
    Ok(())
}

/// gcc's builds of the demo program that cover what the parsers meet in the wild: DWARF 5
/// with inlining, DWARF 4 in a shared library, compressed DWARF, `.debug_frame` instead of
/// `.eh_frame`, and a stripped binary. Built once into target/fuzz-seeds.
fn elf_seeds() -> Result<Vec<(&'static str, PathBuf)>> {
    const BUILDS: [(&str, &[&str]); 5] = [
        ("dwarf5-O2", &["-g", "-O2"]),
        (
            "dwarf4-shared",
            &["-g", "-gdwarf-4", "-O1", "-shared", "-fPIC"],
        ),
        ("zdebug", &["-g", "-O0", "-gz=zlib"]),
        (
            "debug-frame",
            &[
                "-g",
                "-O1",
                "-fno-asynchronous-unwind-tables",
                "-fno-unwind-tables",
            ],
        ),
        ("stripped", &["-O2", "-s"]),
    ];
    let root = workspace_root();
    let out = root.join("target/fuzz-seeds");
    std::fs::create_dir_all(&out)?;
    let source = root.join("tests/fixtures/demo.c");
    BUILDS
        .iter()
        .map(|&(name, flags)| {
            let elf = out.join(name);
            if !elf.exists() {
                run(Command::new("cc")
                    .args(flags)
                    .arg("-o")
                    .arg(&elf)
                    .arg(&source))?;
            }
            Ok((name, elf))
        })
        .collect()
}

/// A real function's line table (3.8–3.9 lnotab, 3.10 PEP 626, 3.11+ PEP 657), laid out as the
/// python_linetable input: format, firstlineno, 4 offsets, table.
const LINE_TABLE: &str = r#"
import struct, sys
def f(items):
    total = 0
    for i in items:
        if i % 3:
            total += i
        else:
            total -= 1
    return [total,
            total * 2]
c = f.__code__
v = sys.version_info[:2]
fmt, table = (0, c.co_lnotab) if v < (3, 10) else (1, c.co_linetable) if v == (3, 10) else (2, c.co_linetable)
offsets = (0, 8, 20, len(c.co_code) - 2)
sys.stdout.buffer.write(struct.pack("<Bi4Q", fmt, c.co_firstlineno, *offsets) + table)
"#;

/// A real code object with its file name, function name and line table, copied out of the
/// interpreter's memory into one image (pointers between them moved along) and laid out as
/// the python_code input: minor, runtime address, PyCode_Type, 3 frames, the image.
const CODE_OBJECT: &str = r#"
import ctypes, struct, sys
def f(items):
    total = 0
    for i in items:
        total += i
    return total
code = f.__code__
v = sys.version_info
name = code.co_qualname if v >= (3, 11) else code.co_name
table = code.co_linetable if v >= (3, 10) else code.co_lnotab
image, at = bytearray(0x100), {}
for o in (code, code.co_filename, name, table):
    at[id(o)] = len(image)
    image += ctypes.string_at(id(o), sys.getsizeof(o)) + bytes(-sys.getsizeof(o) % 16)
start = at[id(code)]
for pos in range(start, start + sys.getsizeof(code) - 7, 8):
    word = struct.unpack_from("<Q", image, pos)[0]
    if word in at:
        struct.pack_into("<Q", image, pos, at[word])
frames = b"".join(struct.pack("<QQ", start, instr) for instr in (0, 4, 10))
sys.stdout.buffer.write(struct.pack("<BQQ", v.minor - 8, 0, id(type(code))) + frames + image)
"#;

/// One seed per CPython found (3.8 to 3.13, on PATH or installed by pyenv), made by running
/// `script` in it.
fn python_seeds(kind: &str, script: &str, corpus: &Path) -> Result<()> {
    let pyenv_versions = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")))
        .map(|root| root.join("versions"));
    let installed: Vec<PathBuf> = pyenv_versions
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let mut found = 0;
    for minor in 8..=13 {
        let python = format!("python3.{minor}");
        let by_pyenv = installed
            .iter()
            .filter(|dir| {
                dir.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("3.{minor}.")))
            })
            .map(|dir| dir.join("bin").join(&python));
        let seed = std::iter::once(PathBuf::from(&python))
            .chain(by_pyenv)
            .filter_map(|p| Command::new(p).args(["-c", script]).output().ok())
            .find(|out| out.status.success());
        if let Some(out) = seed {
            std::fs::write(corpus.join(format!("seed-{kind}-{python}")), out.stdout)?;
            found += 1;
        }
    }
    if found == 0 {
        eprintln!("fuzz: no python3.8..3.13 found; the {kind} target starts from an empty corpus");
    }
    Ok(())
}
