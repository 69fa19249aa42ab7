//! CPython's structures as read out of a target's memory: the interpreter and thread lists,
//! and code objects (file name, function name, first line, line table) behind recorded
//! frames. The input's `memory` stands for the target's memory from address 0 on.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use memleak::python::{Memory, PythonRuntime, Version};
use memleak_common::PyFrame;

#[derive(Arbitrary, Debug)]
struct Input {
    /// 3.8 to 3.13 (and 3.14, unsupported, which must be refused).
    minor: u8,
    runtime_addr: u64,
    code_type: u64,
    frames: [(u64, u64); 3],
    memory: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let version = Version {
        major: 3,
        minor: 8 + input.minor % 7,
        micro: None,
    };
    let memory = Memory::Copy {
        base: 0,
        bytes: input.memory,
    };
    let Ok(mut runtime) = PythonRuntime::in_memory(
        memory,
        "/fuzz/lib/libpython3.so",
        version,
        input.runtime_addr,
        input.code_type,
    ) else {
        return;
    };
    let _ = runtime.thread_states();
    // Twice: the second lookup of a code object goes through the cache.
    for _ in 0..2 {
        for (code, instr) in input.frames {
            let _ = runtime.resolve(PyFrame { code, instr });
        }
    }
});
