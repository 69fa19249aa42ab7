//! `/proc/PID/maps` text → mappings, and the questions asked of them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use memleak::procmaps;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let maps = procmaps::parse(&text);
    for m in &maps {
        let _ = (m.is_file(), m.file_name());
    }
    let _ = procmaps::find_library(&maps, "libc");
});
