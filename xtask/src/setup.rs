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
