//! Against real interpreters: each test starts every CPython it finds with a script that
//! knows its own lines, and checks what we read out of the running process.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};

use memleak_common::python::ENTRY_FRAME;

use super::*;
use crate::model::{Class, Frame, FrameKind};

/// The interpreters to test with: pyenv's 3.8 to 3.13 and Debian's static 3.11; a missing one
/// is reported loudly and skipped.
pub(crate) fn interpreters() -> Vec<(&'static str, String)> {
    let debian = PathBuf::from("/usr/bin/python3.11");
    let all = ["3.8", "3.9", "3.10", "3.11", "3.12", "3.13"]
        .into_iter()
        .map(|v| (v, memleak_tests::pyenv_python(v)))
        .chain([("3.11-debian-static", debian.exists().then_some(debian))]);
    all.filter_map(|(label, path)| {
        if path.is_none() {
            memleak_tests::skipped(&format!("Python {label}"), "not installed");
        }
        Some((label, path?.to_string_lossy().into_owned()))
    })
    .collect()
}

/// A running interpreter that printed its `ready` lines and waits on stdin; killed on drop.
pub(crate) struct Fixture {
    child: Child,
    stdin: ChildStdin,
    /// Words after `ready` on each line the script printed before blocking.
    pub ready: Vec<Vec<String>>,
}

impl Fixture {
    pub fn start(python: &str, script: &str, ready_lines: usize) -> Fixture {
        let dir = std::env::temp_dir().join(format!("memleak-python-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // One file per fixture: tests run side by side in this process.
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("fixture_{n}.py"));
        std::fs::write(&path, script).unwrap();
        let mut child = Command::new(python)
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {python}: {e}"));
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut ready = Vec::new();
        for _ in 0..ready_lines {
            let mut line = String::new();
            out.read_line(&mut line).unwrap();
            let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
            assert_eq!(
                words.first().map(String::as_str),
                Some("ready"),
                "{python} printed {line:?}"
            );
            ready.push(words[1..].to_vec());
        }
        Fixture {
            child,
            stdin,
            ready,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.stdin.write_all(b"\n");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Python frames, one activation of the evaluator re-entered through C (`map`), two threads.
const CALL_CHAIN: &str = r#"import sys, threading

class Holder:
    def method(self, depth):
        return recurse(depth) + 1

def recurse(depth):
    if depth == 0:
        return block() + 1
    return recurse(depth - 1) + 1

def block():
    sys.stdout.write(f"ready {threading.get_ident()}\n")
    sys.stdout.flush()
    sys.stdin.readline()
    return 0

def worker(started, stop):
    started.set()
    stop.wait()

def main():
    started, stop = threading.Event(), threading.Event()
    t = threading.Thread(target=worker, args=(started, stop))
    t.start()
    started.wait()
    sys.stdout.write(f"ready {t.ident}\n")
    return list(map(Holder().method, [2]))

main()
"#;

fn locate(rt: &mut PythonRuntime, frames: &[PyFrame]) -> Located {
    frames
        .iter()
        .map(|f| {
            let loc = rt
                .resolve(*f)
                .unwrap_or_else(|| panic!("Python {}: cannot resolve {f:x?}", rt.version));
            (loc.function, loc.line, f.instr & ENTRY_FRAME != 0)
        })
        .collect()
}

type Located = Vec<(String, Option<u32>, bool)>;

/// A thread's frames once `done` says it reached its blocking call (tried for 2 s).
fn settled(
    rt: &mut PythonRuntime,
    tstate: u64,
    done: impl Fn(&Located) -> bool,
) -> (Vec<PyFrame>, Located) {
    for _ in 0..100 {
        let frames = rt.stack(tstate).unwrap();
        let got = locate(rt, &frames);
        if !got.is_empty() && done(&got) {
            return (frames, got);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let frames = rt.stack(tstate).unwrap();
    let got = locate(rt, &frames);
    (frames, got)
}

#[test]
fn walks_threads_and_frames_with_exact_lines() {
    for (label, python) in interpreters() {
        let fixture = Fixture::start(&python, CALL_CHAIN, 2);
        let worker_id: u64 = fixture.ready[0][0].parse().unwrap();
        let main_id: u64 = fixture.ready[1][0].parse().unwrap();
        let mut rt = PythonRuntime::detect(fixture.pid())
            .unwrap()
            .unwrap_or_else(|| panic!("{label}: no Python found in {python}"));
        assert_eq!(
            format!("{}.{}", rt.version.major, rt.version.minor),
            label.split('-').next().unwrap()
        );

        let threads = rt.thread_states().unwrap();
        let mut ids: Vec<u64> = threads.iter().map(|t| t.thread_id).collect();
        ids.sort();
        let mut expected = vec![main_id, worker_id];
        expected.sort();
        assert_eq!(ids, expected, "{label}: thread ids");

        let qualified = rt.version.minor >= 11;
        let method = if qualified { "Holder.method" } else { "method" };
        // 3.10 runs every Python frame in its own evaluator activation.
        let every = !qualified;
        let main_tstate = threads.iter().find(|t| t.thread_id == main_id).unwrap();
        // "ready" is printed just before the blocking read: wait until the thread is in it.
        let (_, got) = settled(&mut rt, main_tstate.addr, |got| got[0].1 == Some(15));
        let want: Vec<(String, Option<u32>, bool)> = [
            ("block", 15, every),
            ("recurse", 9, every),
            ("recurse", 10, every),
            ("recurse", 10, every),
            (method, 5, true),
            ("main", 28, every),
            ("<module>", 30, true),
        ]
        .into_iter()
        .map(|(f, l, e)| (f.to_string(), Some(l), e))
        .collect();
        assert_eq!(got, want, "{label}: main thread");

        let worker_tstate = threads.iter().find(|t| t.thread_id == worker_id).unwrap();
        // Event.wait → Condition.wait in threading.py, then our worker, then Thread.run.
        let (wait, run) = if qualified {
            ("Condition.wait", "Thread.run")
        } else {
            ("wait", "run")
        };
        let (frames, got) = settled(&mut rt, worker_tstate.addr, |got| got[0].0 == wait);
        let names: Vec<&str> = got.iter().map(|(f, _, _)| f.as_str()).collect();
        assert_eq!(names[0], wait, "{label}: worker thread {got:?}");
        let at = names
            .iter()
            .position(|n| *n == "worker")
            .expect("worker frame");
        assert_eq!(got[at].1, Some(20), "{label}: worker thread {got:?}");
        assert_eq!(names[at + 1], run, "{label}: worker thread {got:?}");
        let ours = rt.resolve(frames[at]).unwrap().file;
        assert!(ours.contains("/fixture_"), "{label}: {ours}");
        let stdlib = rt.resolve(frames[0]).unwrap().file;
        assert_eq!(stdlib, format!("{}threading.py", rt.stdlib_dir), "{label}");
        eprintln!(
            "Python {label} ({}): {} frames on the main thread, OK",
            rt.version,
            want.len()
        );
    }
}

/// Every code object of a few stdlib modules: CPython's own `co_lines()` against our
/// decoding of the raw table, at every instruction.
const DUMP_LINES: &str = r#"import sys, dis, threading, json.decoder, dataclasses, argparse
def codes(co):
    yield co
    for c in co.co_consts:
        if hasattr(c, "co_code"):
            yield from codes(c)
def ranges(co):
    if hasattr(co, "co_lines"):
        return list(co.co_lines())
    starts = list(dis.findlinestarts(co))
    ends = [s for s, _ in starts[1:]] + [len(co.co_code)]
    return [(s, e, l) for (s, l), e in zip(starts, ends)]
out = []
for mod in (json.decoder, dataclasses, argparse):
    src = open(mod.__file__).read()
    for co in codes(compile(src, mod.__file__, "exec")):
        table = getattr(co, "co_linetable", None) or co.co_lnotab
        out.append(f"{co.co_firstlineno} {table.hex()} " + ",".join(f"{s}:{e}:{-1 if l is None else l}" for s, e, l in ranges(co)))
sys.stdout.write(f"ready {len(out)}\n" + "\n".join(out) + "\n")
"#;

#[test]
fn line_tables_match_cpython() {
    for (label, python) in interpreters() {
        let output = Command::new(&python)
            .arg("-c")
            .arg(DUMP_LINES)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let text = String::from_utf8(output.stdout).unwrap();
        let format = match label {
            "3.8" | "3.9" => linetable::Format::Lnotab,
            "3.10" => linetable::Format::Pep626,
            _ => linetable::Format::Pep657,
        };
        let mut checked = 0;
        for line in text.lines().skip(1) {
            let mut parts = line.split(' ');
            let first: i32 = parts.next().unwrap().parse().unwrap();
            let hex = parts.next().unwrap();
            let table: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            for range in parts
                .next()
                .unwrap_or("")
                .split(',')
                .filter(|r| !r.is_empty())
            {
                let v: Vec<i64> = range.split(':').map(|x| x.parse().unwrap()).collect();
                let want = u32::try_from(v[2]).ok();
                for offset in (v[0]..v[1]).step_by(2) {
                    let got = linetable::line(format, &table, first, offset as u64);
                    assert_eq!(got, want, "{label}: offset {offset} in {line}");
                    checked += 1;
                }
            }
        }
        assert!(
            checked > 10_000,
            "{label}: only {checked} instructions checked"
        );
        eprintln!("Python {label}: {checked} instruction lines match CPython's own");
    }
}

#[test]
fn no_python_in_a_native_process() {
    let sleeper = Guard(Command::new("sleep").arg("30").spawn().unwrap());
    assert!(PythonRuntime::detect(sleeper.0.id()).unwrap().is_none());
}

/// Kills the child when the test ends, even by a failed assertion.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn native(function: &str, module: &str) -> Frame {
    Frame {
        function: Some(function.to_string()),
        module: Some(module.to_string()),
        ..Default::default()
    }
}

fn python(function: &str, file: &str) -> Frame {
    Frame {
        function: Some(function.to_string()),
        file: Some(file.to_string()),
        kind: FrameKind::Python,
        ..Default::default()
    }
}

/// Stacks as memleak records them on 3.11 (the allocator's caller first), classified with
/// the runtime found in a live interpreter (its stdlib directory, its extension modules).
#[test]
fn classifies_who_holds_the_memory() {
    let Some((_, path)) = interpreters().into_iter().find(|(l, _)| *l == "3.11") else {
        return;
    };
    let fixture = Fixture::start(&path, CALL_CHAIN, 2);
    let rt = PythonRuntime::detect(fixture.pid()).unwrap().unwrap();
    let lib = "libpython3.11.so.1.0";
    let threading = format!("{}threading.py", rt.stdlib_dir);
    let app = "/srv/app/workload.py";
    let cases: Vec<(&str, Vec<Frame>, (Class, usize))> = vec![
        (
            "bytearray kept by the application",
            vec![
                native("_PyObject_Malloc", lib),
                native("PyByteArray_Resize", lib),
                python("grow_bytearrays", app),
                python("Thread.run", &threading),
            ],
            (Class::Application, 2),
        ),
        (
            "C extension mallocs",
            vec![
                native("leak", "leaky.cpython-311-x86_64-linux-gnu.so"),
                native("cfunction_vectorcall_O", lib),
                python("use_extension", app),
            ],
            (Class::CExtension, 0),
        ),
        (
            "ctypes calls malloc for the application",
            vec![
                native("ffi_call_unix64", "libffi.so.8.1.2"),
                native(
                    "_call_function_pointer",
                    "_ctypes.cpython-311-x86_64-linux-gnu.so",
                ),
                native("_PyObject_MakeTpCall", lib),
                python("use_ctypes", app),
            ],
            (Class::Application, 3),
        ),
        (
            "only the standard library",
            vec![
                native("_PyObject_Malloc", lib),
                python("Condition.wait", &threading),
            ],
            (Class::CpythonInternal, 1),
        ),
        (
            "glibc arena of a Python thread",
            vec![
                native("alloc_new_heap", "libc.so.6"),
                native("cfree", "libc.so.6"),
                native("pythread_wrapper", lib),
            ],
            (Class::CpythonInternal, 2),
        ),
        (
            "native thread of a library",
            vec![
                native("worker", "libfoo.so.1"),
                native("start_thread", "libc.so.6"),
            ],
            (Class::NativeLibrary, 0),
        ),
    ];
    for (what, frames, want) in cases {
        assert_eq!(classify(&frames, &rt), want, "{what}");
    }
}

/// `--python-allocators` hooks these by name in the interpreter's object file: each must be
/// a defined function there, on every version (the static Debian build exports them too).
#[test]
fn allocator_entry_points_are_in_every_interpreter() {
    use object::{Object, ObjectSymbol, SymbolKind};
    for (label, python) in interpreters() {
        let fixture = Fixture::start(&python, CALL_CHAIN, 2);
        let rt = PythonRuntime::detect(fixture.pid()).unwrap().unwrap();
        let data = std::fs::read(rt.object_path()).unwrap();
        let file = object::File::parse(&*data).unwrap();
        let defined: HashSet<&str> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| !s.is_undefined() && s.kind() == SymbolKind::Text)
            .filter_map(|s| s.name().ok())
            .collect();
        for (symbol, _) in ALLOCATOR_ENTRY_POINTS {
            assert!(
                defined.contains(symbol),
                "{label}: no {symbol} in {}",
                rt.interpreter_path
            );
        }
    }
}

/// Found by the python_code fuzz target: a `_PyRuntime` address near the top of the address
/// space overflowed. And an interpreter list that loops on itself without threads must end.
#[test]
fn thread_states_of_corrupt_memory_end() {
    let version = Version {
        major: 3,
        minor: 11,
        micro: None,
    };
    let runtime = |bytes: Vec<u8>, runtime_addr: u64| {
        let memory = Memory::Copy { base: 0, bytes };
        PythonRuntime::in_memory(memory, "/x/lib/libpython3.11.so", version, runtime_addr, 0)
            .unwrap()
    };
    let wrapped = runtime(vec![0; 64], u64::MAX - 8).thread_states();
    assert!(wrapped.unwrap_or_default().is_empty());
    // 3.11: interpreters.head at _PyRuntime+40 → 0x100, whose `next` (+0) is itself and
    // whose thread list (+16) is empty.
    let mut memory = vec![0u8; 0x200];
    memory[40..48].copy_from_slice(&0x100u64.to_le_bytes());
    memory[0x100..0x108].copy_from_slice(&0x100u64.to_le_bytes());
    assert_eq!(runtime(memory, 0).thread_states().unwrap(), vec![]);
}

#[test]
fn published_offsets_agree_with_the_table() {
    for (label, python) in interpreters() {
        let fixture = Fixture::start(&python, CALL_CHAIN, 2);
        let rt = PythonRuntime::detect(fixture.pid()).unwrap().unwrap();
        if rt.version.minor < 13 {
            continue;
        }
        let (memory, layout, runtime) = rt.parts();
        let table = Layout::for_version(rt.version).unwrap();
        assert_eq!(
            *layout, table,
            "Python {label}: _Py_DebugOffsets vs the table"
        );
        let mut raw = memory.read_vec(runtime, layout::DEBUG_OFFSETS_LEN).unwrap();
        // An offset outside its struct (the interpreter state's `gc`) is refused.
        raw[10 * 8..11 * 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(table.published(rt.version, &raw).is_err());
        // So is a frame field the BPF walk's aligned words would split.
        let mut raw = memory.read_vec(runtime, layout::DEBUG_OFFSETS_LEN).unwrap();
        let code = layout.frames.frame_code as u64 + 4;
        raw[30 * 8..31 * 8].copy_from_slice(&code.to_le_bytes());
        assert!(table.published(rt.version, &raw).is_err());
        raw[..8].copy_from_slice(b"notdebug");
        assert!(table.published(rt.version, &raw).is_err());
        eprintln!("Python {label}: the published offsets are the table's");
    }
}

/// The table's layout of each minor version we read.
fn table_layouts() -> impl Iterator<Item = (u8, Layout)> {
    (8..=13).map(|minor| {
        let version = layout::Version {
            major: 3,
            minor,
            micro: None,
        };
        (minor, Layout::for_version(version).unwrap())
    })
}

/// The identity the BPF program keeps of a code object is its adjacent, immutable pointers
/// (file, names, line table), never a field CPython changes (`co_weakreflist`,
/// `co_zombieframe`).
#[test]
fn code_identity_window_is_the_adjacent_pointers() {
    for (minor, l) in table_layouts() {
        let w = l.code_window();
        let expected = if minor >= 11 { 32 } else { 24 };
        assert_eq!(w.len, expected, "3.{minor}");
        assert_eq!(w.start as u64, l.code_filename, "3.{minor}");
    }
}

#[test]
fn every_table_layout_reads_as_aligned_words() {
    for (minor, l) in table_layouts() {
        assert!(
            memleak_common::python::fields_aligned(&l.frames),
            "3.{minor}"
        );
    }
}
