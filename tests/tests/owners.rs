//! Who holds the leaked memory, read from the live process at the end of the run: a service
//! in the user's style (a thread appends 1 MiB bytearrays to a module-level list), a dict
//! cache in a class attribute, a list held by a closure and an unbounded lru_cache, under
//! every interpreter here. The target checks its own data afterwards: the walk only reads.

use std::time::Duration;

use anyhow::{Result, ensure};
use memleak_tests::{
    Running, Scratch, can_trace, expect_success, read_json, under_each_python, wait_for_text,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);

/// Every holder keeps blocks of its own size, each a malloc of its own (over pymalloc's 512
/// bytes), so each lands on a stack of its own. When `stop` appears the script checks that
/// everything it holds is as it made it, says so and exits.
const SCRIPT: &str = r#"import functools, os, sys, threading, time

_leak_store = []

def _leak_loop():
    while not os.path.exists(sys.argv[2]):  # it grows until the test is done
        _leak_store.append(bytearray(1 << 20))
        time.sleep(0.1)

class Cache:
    _entries = {}

def fill_cache():
    for i in range(300):
        Cache._entries[i] = bytes(3000)

def make_handler():
    held = []
    def handle(n):
        held.append(bytearray(n))
    return handle

handler = make_handler()

@functools.lru_cache(maxsize=None)
def lookup(key):
    return bytearray(70_000)

print("ready", flush=True)
while not os.path.exists(sys.argv[1]):  # memleak is attached
    time.sleep(0.05)
t = threading.Thread(target=_leak_loop)
t.start()
fill_cache()
for i in range(40):
    handler(150_000)
    lookup(i)
t.join()
held = handler.__closure__[0].cell_contents
intact = (
    all(len(b) == 1 << 20 and not any(b) for b in _leak_store)
    and all(v == bytes(3000) for v in Cache._entries.values())
    and all(len(b) == 150_000 and not any(b) for b in held)
    and all(len(lookup(i)) == 70_000 for i in range(40))
)
print("intact" if intact else "CHANGED", len(_leak_store), len(Cache._entries), len(held))
"#;

/// (type, where it is held, at least this many objects, advice containing). Of the 40
/// calls of `handler` and `lookup`, the first may run before CPython 3.11+ specializes its
/// call site: its native stack differs, a stack of one block too small to matter, whose
/// owner the report need not name.
const HOLDERS: [(&str, &str, u64, Option<&str>); 4] = [
    (
        "bytearray",
        "in list `_leak_store` of module `__main__`",
        15,
        Some("bound it or evict"),
    ),
    (
        "bytes",
        "in dict `Cache._entries` (a class attribute)",
        300,
        Some("bound it or evict"),
    ),
    (
        "bytearray",
        "in list held by the closure of `make_handler.<locals>.handle`",
        39,
        None,
    ),
    (
        "bytearray",
        "in the functools.lru_cache of `lookup`",
        39,
        Some("maxsize=None"),
    ),
];

fn check(label: &str, python: &str) -> Result<()> {
    let scratch = Scratch::new("owners")?;
    let script = scratch.path("service.py");
    std::fs::write(&script, SCRIPT)?;
    let (go, stop) = (scratch.path("go"), scratch.path("stop"));
    let out = scratch.path("report.json");
    let target = Running::python(&scratch, python, &script, &[&go, &stop])?;
    wait_for_text(&scratch.path("python.stdout"), "ready", TIMEOUT)?;
    let pid = target.pid().to_string();
    let tracer = Running::memleak(
        &scratch,
        &[
            "-p",
            &pid,
            "--interval",
            "1s",
            "--duration",
            "3s",
            "--json",
            out.to_str().unwrap(),
        ],
        None,
    )?;
    wait_for_text(&scratch.path("memleak.stdout"), "Attaching to pid", TIMEOUT)?;
    std::fs::write(&go, "")?;
    let run = tracer.wait(TIMEOUT)?;
    expect_success(&run)?;
    std::fs::write(&stop, "")?;
    let done = target.wait(TIMEOUT)?;
    let said = done.stdout.lines().last().unwrap_or("");
    ensure!(
        said.starts_with("intact ") && said.ends_with(" 300 40"),
        "Python {label}: the target says {said:?} after the walk"
    );
    let report = read_json(&out)?;
    let owners = report["owners"]["owners"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut problems = Vec::new();
    for (type_name, held_by, at_least, advice) in HOLDERS {
        let found: Vec<&Value> = owners
            .iter()
            .filter(|o| o["type_name"] == type_name && o["held_by"] == held_by)
            .collect();
        let count: u64 = found.iter().filter_map(|o| o["count"].as_u64()).sum();
        if count < at_least {
            problems.push(format!(
                "{count} × {type_name} {held_by}, expected {at_least}"
            ));
        }
        let advised = found
            .iter()
            .any(|o| advice.is_none_or(|a| o["advice"].as_str().is_some_and(|t| t.contains(a))));
        if !advised {
            problems.push(format!(
                "{type_name} {held_by}: no advice saying {advice:?}"
            ));
        }
    }
    let verdict: Vec<&str> = run
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("VERDICT"))
        .take(2)
        .collect();
    if !verdict.join(" ").contains("held by")
        || !verdict.join(" ").contains("`_leak_store` of module")
    {
        problems.push("the verdict does not name `_leak_store`".into());
    }
    ensure!(
        problems.is_empty(),
        "Python {label}:\n  {}\nowners: {:#}\nreport:\n{}",
        problems.join("\n  "),
        report["owners"],
        run.stdout
    );
    eprintln!("Python {label}: owners named; {}", report["owners"]["scan"]);
    Ok(())
}

#[test]
fn python_owners_are_named() -> Result<()> {
    if !can_trace("python_owners_are_named") {
        return Ok(());
    }
    // 3.8 reads as well (the unit tests walk it); the issue asks for 3.9 on.
    under_each_python(&["3.8"], check)
}
