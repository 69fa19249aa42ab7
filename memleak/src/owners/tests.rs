//! The owner walk against real interpreters: a script builds each pattern the report names
//! and prints where the memory of each is; the walk must find its type and its holder.

use super::{Block, Blocks, Root, python};
use crate::python::{
    PythonRuntime,
    tests::{Fixture, interpreters},
};

/// Five holders; the script prints `stack:addr:size` per block (stack 1: the module list's
/// buffers, 2: the class dict's tuples, 3: the closure's, 4: the lru_cache's, 5: an
/// instance's attribute: in its `__dict__` up to 3.10, in its inline values from 3.11).
const HOLDERS: &str = r#"import ctypes, functools, sys

def buffer(b):
    return ctypes.addressof((ctypes.c_char * len(b)).from_buffer(b))

_leak_store = []
for _ in range(5):
    _leak_store.append(bytearray(1 << 20))

class Cache:
    _entries = {}

for i in range(3000):
    Cache._entries[i] = (i, -i)

def make_handler():
    held = []
    def handle(n):
        held.append(bytearray(n))
    return handle

handler = make_handler()
for _ in range(4):
    handler(200_000)

@functools.lru_cache(maxsize=None)
def lookup(key):
    return bytearray(100_000)

for k in range(6):
    lookup(k)

class Service:
    def __init__(self):
        self.name = "svc"
        self.items = []

svc = Service()
for _ in range(3):
    svc.items.append(bytearray(300_000))

blocks = [f"1:{buffer(b)}:{len(b)}" for b in _leak_store]
blocks += [f"2:{id(t) - 16}:64" for t in Cache._entries.values()]
blocks += [f"3:{buffer(b)}:{len(b)}" for b in handler.__closure__[0].cell_contents]
blocks += [f"4:{buffer(lookup(k))}:100000" for k in range(6)]
blocks += [f"5:{buffer(b)}:{len(b)}" for b in svc.items]
print("ready", " ".join(blocks), flush=True)
sys.stdin.readline()
"#;

#[test]
fn names_the_holder_of_each_pattern() {
    for (label, python) in interpreters() {
        let fixture = Fixture::start(&python, HOLDERS, 1);
        let blocks: Vec<Block> = fixture.ready[0]
            .iter()
            .map(|w| {
                let f: Vec<&str> = w.split(':').collect();
                Block {
                    stack_id: f[0].parse().unwrap(),
                    addr: f[1].parse().unwrap(),
                    size: f[2].parse().unwrap(),
                }
            })
            .collect();
        let rt = PythonRuntime::detect(fixture.pid()).unwrap().unwrap();
        let found = python::find(&rt, &Blocks::new(blocks), &python::Limits::default());
        let of = |stack: i64| {
            let o = found.of(stack).next();
            o.unwrap_or_else(|| panic!("Python {label}: stack {stack} has no owner: {found:#?}"))
        };
        let module = of(1);
        assert_eq!(
            (module.count, module.bytes, module.type_name.as_str()),
            (5, 5 << 20, "bytearray"),
            "Python {label}: {module:?}"
        );
        assert_eq!(module.held_by, "in list `_leak_store` of module `__main__`");
        assert_eq!(module.root, Root::ModuleGlobal);
        assert!(
            module
                .advice
                .as_deref()
                .unwrap()
                .contains("bound it or evict")
        );
        let class = of(2);
        assert_eq!(
            (class.count, class.type_name.as_str()),
            (3000, "tuple"),
            "Python {label}"
        );
        assert_eq!(
            class.held_by,
            "in dict `Cache._entries` (a class attribute)"
        );
        let closure = of(3);
        assert_eq!(
            (closure.count, closure.bytes),
            (4, 800_000),
            "Python {label}"
        );
        assert_eq!(
            closure.held_by,
            "in list held by the closure of `make_handler.<locals>.handle`"
        );
        let cache = of(4);
        assert_eq!((cache.count, cache.bytes), (6, 600_000), "Python {label}");
        assert_eq!(cache.held_by, "in the functools.lru_cache of `lookup`");
        assert!(cache.advice.as_deref().unwrap().contains("maxsize=None"));
        let instance = of(5);
        assert_eq!(
            (instance.count, instance.bytes),
            (3, 900_000),
            "Python {label}"
        );
        assert_eq!(
            instance.held_by,
            "in list in Service `svc` of module `__main__`"
        );
        assert!(found.scan.complete, "Python {label}: {:?}", found.scan);
        assert!(
            found.scan.skipped.is_empty(),
            "Python {label}: {:?}",
            found.scan
        );
        eprintln!("Python {label}: {:?}", found.scan);
    }
}
