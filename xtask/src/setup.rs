//! What the BPF build needs that a fresh machine lacks: the nightly toolchain's rust-src (for
//! `-Z build-std=core`) and bpf-linker built against the nightly's own LLVM. Each step checks
//! first, so a second run takes well under a second.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

use crate::run;

const BPF_LINKER_VERSION: &str = "0.13.0";

pub fn ensure() -> Result<()> {
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

fn nightly_sysroot() -> Result<PathBuf> {
    Ok(PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    ))
}

fn ensure_nightly_rust_src() -> Result<()> {
    let src = nightly_sysroot()?.join("lib/rustlib/src/rust/library/core");
    if src.is_dir() {
        return Ok(());
    }
    eprintln!("setup: installing rust-src for the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// The LLVM major version of the nightly rustc: bpf-linker must be built for the same one.
fn nightly_llvm_major() -> Result<String> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .map(str::to_string)
        .context("nightly rustc -vV shows no LLVM version")
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// bpf-linker is usable when it runs and its LLVM is the nightly's (a stamp file records
/// which LLVM it was built against, since `bpf-linker --version` does not say).
fn ensure_bpf_linker() -> Result<()> {
    let sysroot = nightly_sysroot()?;
    let major = nightly_llvm_major()?;
    let bin = cargo_bin_dir().join("bpf-linker");
    let stamp = cargo_bin_dir().join(".bpf-linker-llvm");
    let wanted = format!("{BPF_LINKER_VERSION} llvm-{major} {}", sysroot.display());
    let works = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if works && std::fs::read_to_string(&stamp).is_ok_and(|s| s.trim() == wanted) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {major} (about a minute)"
    );
    // The nightly ships lib/libLLVM.so.<ver>-rust-<ver> but no libLLVM.so, which
    // bpf-linker's build script links as -lLLVM from $LLVM_PREFIX/lib.
    let lib = std::fs::read_dir(sysroot.join("lib"))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .context("the nightly toolchain has no lib/libLLVM.so.*")?;
    let prefix = std::env::temp_dir().join(format!("memleak-llvm-prefix-{major}"));
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&lib, &link)?;
    // rpath: the installed binary finds the real library in the nightly sysroot later.
    run(Command::new("cargo")
        .args(["+nightly", "install", "--force", "--locked"])
        .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix)
        .env(
            "RUSTFLAGS",
            format!("-C link-arg=-Wl,-rpath,{}/lib", sysroot.display()),
        ))?;
    std::fs::write(&stamp, wanted)?;
    Ok(())
}

/// Installs the Debian packages that are missing (one `apt-get update` first, only when
/// something is missing, so a second run costs a few dpkg queries).
pub fn ensure_debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {} (apt-get)", missing.join(" "));
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .stdout(std::process::Stdio::null()))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(std::process::Stdio::null()))
}

/// PyPI packages some tests need: gunicorn, a real prefork server (the `--children` test).
const TEST_PYPI: [&str; 1] = ["gunicorn==27.0.1"];
/// Their import names, to check that they are there.
const TEST_PYPI_IMPORTS: &str = "import gunicorn";

/// `target/test-venv`, a venv of pyenv's CPython 3.11 with `TEST_PYPI`, made unless it is
/// there (a second run only checks the import). The tests look for it there.
pub fn ensure_test_venv(root: &Path) -> Result<()> {
    let dir = root.join("target/test-venv");
    let python = dir.join("bin/python");
    let ready = || {
        Command::new(&python)
            .args(["-c", TEST_PYPI_IMPORTS])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if ready() {
        return Ok(());
    }
    if !python.exists() {
        let base = python311().context("the base of the test venv")?;
        run(Command::new(base).args(["-m", "venv"]).arg(&dir))?;
    }
    eprintln!("setup: installing {} (pip)", TEST_PYPI.join(" "));
    run(Command::new(&python)
        .args(["-m", "pip", "install", "-q"])
        .args(TEST_PYPI))
    .context("pip install into the test venv")
}

/// pyenv's CPython 3.11 (the bench's workloads and the test venv run on it).
pub fn python311() -> Result<PathBuf> {
    let root = Command::new("pyenv")
        .arg("root")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or_else(|| PathBuf::from("/root/.pyenv"));
    let versions = std::fs::read_dir(root.join("versions"))
        .with_context(|| format!("no pyenv versions under {}", root.display()))?;
    versions
        .filter_map(|v| v.ok())
        .map(|v| v.path().join("bin/python3.11"))
        .find(|p| p.exists())
        .context("no python3.11 under pyenv")
}
