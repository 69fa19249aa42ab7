//! An object file's `.eh_frame` (or `.debug_frame`) → the unwind rows the BPF walker
//! searches.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memleak::unwind::table;

fuzz_target!(|data: &[u8]| {
    if let Ok(t) = table::build(data) {
        // The walker binary-searches the rows by pc: they must come sorted.
        assert!(
            t.rows.windows(2).all(|w| w[0].pc < w[1].pc),
            "rows not sorted"
        );
    }
});
