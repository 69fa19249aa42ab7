//! Python targets: every CPython here runs one script that leaks in four ways (1 MiB
//! bytearrays from a thread, a dict cache of small tuples that only pymalloc arenas hold, a C
//! extension compiled against the interpreter's headers, ctypes calling libc malloc) and
//! churns without leaking; memleak must name the Python function and line of each.

use std::{path::Path, time::Duration};

use anyhow::{Result, bail, ensure};
use memleak_tests::{
    Report, Running, Scratch, basename, build_extension, can_trace, describe_stack, expect_success,
    frames, installed, pyenv_python, pythons, skipped, stacks, wait_for_file, wait_for_text,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);

/// The workload. Line numbers matter: the test asserts them (see `LEAKS`).
const SCRIPT: &str = r#"import ctypes, os, sys, threading, time
import leaky

KEPT, CACHE, POINTERS = [], {}, []

def grow_bytearrays():
    for _ in range(16):
        KEPT.append(bytearray(1 << 20))

def fill_cache():
    for i in range(200_000):
        CACHE[i] = (i, i + 1)

def use_extension():
    for _ in range(64):
        leaky.leak(65536)

def use_ctypes():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    for _ in range(32):
        POINTERS.append(libc.malloc(100_000))

def churn():
    for _ in range(200):
        scratch = bytearray(300_000)
        del scratch

while not os.path.exists(sys.argv[1]):  # memleak is attached
    time.sleep(0.05)
t = threading.Thread(target=grow_bytearrays)
t.start()
t.join()
fill_cache()
use_extension()
use_ctypes()
churn()
open(sys.argv[2], "w").close()
time.sleep(600)
"#;

/// (function, lines of its allocating statements, at least this many bytes held there, the
/// class of every stack through it). fill_cache's arenas fill with the ints of its `for`
/// line and the tuples of the next; ctypes is the interpreter's bridge, so its malloc is the
/// Python line's.
const LEAKS: [(&str, &[u64], u64, &str); 4] = [
    ("grow_bytearrays", &[8], 16 << 20, "application"),
    ("fill_cache", &[11, 12], 8 << 20, "application"),
    ("use_extension", &[16], 64 * 65536, "c-extension"),
    ("use_ctypes", &[23], 32 * 100_000, "application"),
];

/// A C extension that keeps every block it allocates (reachable from a global, so the
/// compiler cannot drop the malloc).
const EXTENSION: &str = r#"#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdlib.h>

void *leaky_blocks[4096];
int leaky_count;

static PyObject *leak(PyObject *self, PyObject *arg) {
    size_t n = PyLong_AsSize_t(arg);
    void *p = malloc(n);
    memset(p, 1, n);
    leaky_blocks[leaky_count++ % 4096] = p;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {{"leak", leak, METH_O, NULL}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "leaky", NULL, -1, methods};
PyMODINIT_FUNC PyInit_leaky(void) { return PyModule_Create(&module); }
"#;

/// Python frames of a stack as (function, file basename, line).
fn python_frames(stack: &Value) -> Vec<(&str, &str, u64)> {
    frames(stack)
        .iter()
        .filter(|f| f["kind"] == "python")
        .map(|f| {
            (
                f["function"].as_str().unwrap_or("?"),
                basename(f["file"].as_str().unwrap_or("?")),
                f["line"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Traces the workload under one interpreter, started with `env` added, and checks every
/// leak and the churn.
fn check(label: &str, python: &str, env: &[(&str, &str)]) -> Result<()> {
    let scratch = Scratch::new("python")?;
    let dir = scratch.path("");
    build_extension(python, &dir, "leaky", EXTENSION)?;
    let script = scratch.path("workload.py");
    std::fs::write(&script, SCRIPT)?;
    let (go, done) = (scratch.path("go"), scratch.path("done"));
    // Attached to a running interpreter: it reads the code objects of every stack while the
    // target lives. The extension is found next to the script (sys.path[0]).
    let target = Running::start_with_env(
        &scratch,
        "python",
        Path::new(python),
        &[
            script.to_str().unwrap(),
            go.to_str().unwrap(),
            done.to_str().unwrap(),
        ],
        None,
        env,
    )?;
    let report = trace_work(&scratch, &target, &go, &done)?;
    let snapshot = report.final_snapshot();
    let all = stacks(snapshot);
    let mut problems = Vec::new();
    for (function, lines, at_least, class) in LEAKS {
        let through: Vec<&Value> = all
            .iter()
            .filter(|s| {
                python_frames(s).iter().any(|&(f, file, l)| {
                    f == function && file == "workload.py" && lines.contains(&l)
                })
            })
            .collect();
        let bytes: u64 = through
            .iter()
            .map(|s| s["bytes"].as_u64().unwrap_or(0))
            .sum();
        if bytes < at_least {
            problems.push(format!(
                "{function} (workload.py:{lines:?}): {bytes} bytes held, expected at least {at_least}"
            ));
        }
        for s in through.iter().filter(|s| s["class"] != class) {
            problems.push(format!(
                "{function}: class {}, expected {class}: {}",
                s["class"],
                describe_stack(s)
            ));
        }
    }
    // The extension's own frame sits between the allocator and the Python line.
    let extension = all.iter().any(|s| {
        let fs = frames(s);
        let native = fs.iter().position(|f| {
            f["function"] == "leak" && f["module"].as_str().is_some_and(|m| m.starts_with("leaky"))
        });
        let py = fs.iter().position(|f| f["function"] == "use_extension");
        matches!((native, py), (Some(n), Some(p)) if n < p)
    });
    if !extension {
        problems.push("no stack runs leak [leaky…so] ← use_extension".to_string());
    }
    if let Some(s) = all
        .iter()
        .find(|s| python_frames(s).iter().any(|&(f, _, _)| f == "churn"))
    {
        problems.push(format!(
            "churn frees all it allocates, yet: {}",
            describe_stack(s)
        ));
    }
    if !problems.is_empty() {
        let top: Vec<String> = all.iter().take(12).map(describe_stack).collect();
        bail!(
            "Python {label}:\n  {}\nlargest stacks:\n  {}",
            problems.join("\n  "),
            top.join("\n  ")
        );
    }
    eprintln!("Python {label}: every leak at its Python line, churn absent");
    Ok(())
}

/// `memleak -p` on `target` from before its work (it waits for the `go` file) to a second
/// after it (it writes the `done` file): the report.
fn trace_work(scratch: &Scratch, target: &Running, go: &Path, done: &Path) -> Result<Report> {
    let out = scratch.path("report.json");
    // memleak hooks the libc the process has mapped: not before the loader has mapped it.
    target.wait_for_mapping("libc.so", TIMEOUT)?;
    let pid = target.pid().to_string();
    let tracer = Running::memleak(
        scratch,
        &["-p", &pid, "--json", out.to_str().unwrap()],
        None,
    )?;
    wait_for_text(&scratch.path("memleak.stdout"), "Attaching to pid", TIMEOUT)?;
    std::fs::write(go, "")?;
    wait_for_file(done, TIMEOUT)?;
    // A few of memleak's 250 ms ticks, to read the newest stacks' code objects.
    std::thread::sleep(Duration::from_secs(1));
    let run = tracer.interrupt(TIMEOUT)?;
    expect_success(&run)?;
    Report::read(&out)
}

#[test]
fn python_leaks_at_their_lines() -> Result<()> {
    if !can_trace("python_leaks_at_their_lines") {
        return Ok(());
    }
    let mut failures = Vec::new();
    for (label, python) in pythons() {
        let Some(python) = python else {
            skipped(&format!("Python {label}"), "not installed");
            continue;
        };
        if let Err(e) = check(&label, &python.to_string_lossy(), &[]) {
            failures.push(format!("{e:#}"));
        }
    }
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

/// A Python process that execs a fresh interpreter (as multiprocessing's spawn does): Python
/// tracking starts again in the new program, whose lines are named.
#[test]
fn python_after_exec_is_tracked_afresh() -> Result<()> {
    let test = "python_after_exec_is_tracked_afresh";
    if !can_trace(test) {
        return Ok(());
    }
    let Some(python) = pyenv_python("3.11") else {
        skipped(test, "no pyenv CPython 3.11");
        return Ok(());
    };
    let scratch = Scratch::new("python-exec")?;
    let (first, second) = (scratch.path("first.py"), scratch.path("second.py"));
    let (go, done) = (scratch.path("go"), scratch.path("done"));
    std::fs::write(
        &first,
        "import os, sys, time\n\
         while not os.path.exists(sys.argv[1]):\n    time.sleep(0.05)\n\
         os.execv(sys.executable, [sys.executable] + sys.argv[2:])\n",
    )?;
    // A second of maps ticks to find the new interpreter, then 16 MiB held at line 3.
    std::fs::write(
        &second,
        "import sys, time\ntime.sleep(1.5)\nKEPT = [bytearray(1 << 20) for _ in range(16)]\n\
         open(sys.argv[1], 'w').close()\ntime.sleep(600)\n",
    )?;
    let args = [&first, &go, &second, &done].map(|p| p.to_str().unwrap().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let target = Running::start(&scratch, "python", &python, &args, None)?;
    let report = trace_work(&scratch, &target, &go, &done)?;
    let all = stacks(report.final_snapshot());
    let held: u64 = all
        .iter()
        .filter(|s| {
            python_frames(s)
                .iter()
                .any(|&(_, file, l)| file == "second.py" && l == 3)
        })
        .map(|s| s["bytes"].as_u64().unwrap_or(0))
        .sum();
    let top: Vec<String> = all.iter().take(8).map(describe_stack).collect();
    ensure!(
        held >= 16 << 20,
        "second.py:3 holds {held} bytes after the exec, expected 16 MiB\n  {}",
        top.join("\n  ")
    );
    Ok(())
}

/// A common fix for fragmentation: CPython run on jemalloc. Its malloc family is hooked in
/// jemalloc with no flag, and every leak is still named at its Python line.
#[test]
fn python_on_preloaded_jemalloc() -> Result<()> {
    const JEMALLOC: &str = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2";
    let test = "python_on_preloaded_jemalloc";
    if !can_trace(test) || !installed(test, JEMALLOC) {
        return Ok(());
    }
    let Some(python) = pyenv_python("3.12") else {
        skipped(test, "no pyenv Python 3.12");
        return Ok(());
    };
    check(
        "3.12 on jemalloc",
        &python.to_string_lossy(),
        &[("LD_PRELOAD", JEMALLOC)],
    )
}
