//! Addresses of the target → frames. (Skeleton: being written.)

use crate::model::Frame;

pub struct Symbolizer {
    pid: u32,
}

impl Symbolizer {
    pub fn new(pid: u32) -> Self {
        Symbolizer { pid }
    }

    /// One address → its frames, innermost (inlined) first.
    pub fn symbolize(&mut self, addr: u64, _return_address: bool) -> Vec<Frame> {
        let _ = self.pid;
        vec![Frame {
            addr,
            ..Default::default()
        }]
    }

    pub fn refresh(&mut self) {}
}

/// `leak_one+0xf [leaker] leaker.c:12`, BCC's layout plus the source line.
pub fn format_frame(f: &Frame) -> String {
    let module = f.module.as_deref().unwrap_or("unknown");
    match &f.function {
        Some(func) => format!("{func}+{:#x} [{module}]", f.function_offset),
        None => format!("[unknown] [{module}+{:#x}]", f.module_offset),
    }
}
