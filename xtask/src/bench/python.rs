//! The Python side of the bench: a venv with the in-process peer (memray) and the service's
//! packages (FastAPI, uvicorn), made from PyPI by the bench itself, and the workload that
//! allocates at a chosen Python stack depth.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::run;

/// What the venv holds, pinned to what was measured.
const PACKAGES: [&str; 3] = ["memray==1.20.0", "fastapi==0.142.2", "uvicorn==0.54.0"];

/// `out/venv` with `PACKAGES`, made from `python` unless it is there; its interpreter.
pub fn venv(python: &Path, out: &Path) -> Result<PathBuf> {
    let dir = out.join("venv");
    let venv_python = dir.join("bin/python");
    if !venv_python.exists() {
        run(Command::new(python).args(["-m", "venv"]).arg(&dir))?;
    }
    let installed = Command::new(&venv_python)
        .args(["-c", "import memray, fastapi, uvicorn"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        run(Command::new(&venv_python)
            .args(["-m", "pip", "install", "-q"])
            .args(PACKAGES))
        .context("pip install into the bench venv")?;
    }
    Ok(venv_python)
}

/// `python -m memray run` around `script args`: memray traces in-process, so it starts the
/// workload instead of attaching to it.
pub fn under_memray(venv_python: &Path, out: &Path, native: bool) -> Command {
    let mut c = Command::new(venv_python);
    c.args(["-m", "memray", "run", "-q", "-f", "-o"])
        .arg(out.join("memray.bin"));
    if native {
        c.arg("--native");
    }
    c
}

/// Allocates (and frees) 4 KiB blocks from a Python frame `argv[1]` frames deep: the cost of a
/// traced allocation against the depth of its Python stack.
pub const DEPTH_CHURN: &str = r#"
import os, sys, time
def recurse(n, rounds):
    if n > 1:
        return recurse(n - 1, rounds)
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(20000):
            bytearray(4096)
        print("seconds %.4f" % (time.perf_counter() - start), flush=True)
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
recurse(int(sys.argv[1]) - 1, int(sys.argv[2]))  # <module> is a frame too
print("live unknown", flush=True)
sys.stdin.readline()
"#;

/// Blocks `DEPTH_CHURN` allocates per round.
pub const DEPTH_CHURN_ALLOCS: f64 = 20000.0;
