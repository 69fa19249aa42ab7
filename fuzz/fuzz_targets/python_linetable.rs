//! CPython's line tables (3.8–3.9 lnotab, 3.10 PEP 626, 3.11+ PEP 657) → the line of an
//! instruction, as read out of a target's code object.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use memleak::python::linetable::{Format, line};

#[derive(Arbitrary, Debug)]
struct Input {
    format: u8,
    firstlineno: i32,
    byte_offsets: [u64; 4],
    table: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let format = match input.format % 3 {
        0 => Format::Lnotab,
        1 => Format::Pep626,
        _ => Format::Pep657,
    };
    for offset in input.byte_offsets {
        let _ = line(format, &input.table, input.firstlineno, offset);
    }
});
