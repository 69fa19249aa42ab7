//! An object file (ELF, its symbol tables, its DWARF) → frames, through the symbolizer the
//! binary uses: addresses across the whole file are named, as call sites and as plain
//! addresses, and every frame is printed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memleak::symbolize::{Symbolizer, format_frame};

/// At most this many addresses per input, spread over the file (every 16 bytes of a small
/// one), so a large input stays fast.
const ADDRESSES: usize = 256;

fuzz_target!(|data: &[u8]| {
    let len = data.len() as u64;
    let step = (len / ADDRESSES as u64).max(16);
    let mut symbolizer = Symbolizer::of_image("fuzzed", data.to_vec());
    for addr in (0..len).step_by(step as usize).chain([len, u64::MAX - 1]) {
        for return_address in [true, false] {
            for frame in symbolizer.symbolize(addr, return_address) {
                let _ = format_frame(&frame);
            }
        }
    }
});
