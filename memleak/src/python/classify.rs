//! Who holds the memory of a stack: the application's Python code, CPython itself, a C
//! extension module, or a native library with no Python above it.

use super::PythonRuntime;
use crate::model::{Class, Frame, FrameKind};

/// The class of a spliced stack (innermost first: the allocator's caller comes first) and
/// the index of the frame that decided it: the user's innermost Python frame, the
/// extension's outermost native frame, or the first frame outside libc.
pub fn classify(frames: &[Frame], runtime: &PythonRuntime) -> (Class, usize) {
    // libc's own frames (strdup, fopen, its arenas) say nothing about who called it.
    let start = frames.iter().position(|f| !in_libc(f)).unwrap_or(0);
    let Some(first_python) = frames.iter().position(|f| f.kind == FrameKind::Python) else {
        return match (start..frames.len()).find(|&i| runtime.is_interpreter(&frames[i])) {
            Some(i) => (Class::CpythonInternal, i),
            None => (Class::NativeLibrary, start),
        };
    };
    let extension = (0..first_python).rev().find(|&i| {
        let f = &frames[i];
        f.module.is_some() && !in_libc(f) && !runtime.is_interpreter(f)
    });
    if let Some(i) = extension {
        return (Class::CExtension, i);
    }
    let user = (first_python..frames.len()).find(|&i| {
        let f = &frames[i];
        f.kind == FrameKind::Python && f.file.as_deref().is_some_and(|p| runtime.is_user_file(p))
    });
    match user {
        Some(i) => (Class::Application, i),
        None => (Class::CpythonInternal, first_python),
    }
}

fn in_libc(f: &Frame) -> bool {
    f.kind == FrameKind::Native
        && f.module
            .as_deref()
            .is_some_and(|m| m.starts_with("libc.so") || m.starts_with("ld-linux"))
}

impl PythonRuntime {
    /// A native frame of the interpreter: libpython or the executable, an extension module
    /// of the standard library, or libffi (how ctypes calls C: the Python line above it made
    /// the call).
    fn is_interpreter(&self, f: &Frame) -> bool {
        let Some(module) = f.module.as_deref() else {
            return false;
        };
        f.kind == FrameKind::Native
            && (self.interpreter_modules.contains(module) || module.starts_with("libffi.so"))
    }

    /// Python source outside the standard library (installed packages count as the user's).
    fn is_user_file(&self, path: &str) -> bool {
        let stdlib = path.starts_with(&self.stdlib_dir) || path.starts_with("<frozen ");
        !stdlib || path.contains("/site-packages/") || path.contains("/dist-packages/")
    }
}
