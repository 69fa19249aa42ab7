//! The one answer to "which frame explains this stack": the frame a report shows with its
//! source line, and, for a Python target, who holds the memory. The per-interval table, the
//! final report and every file read it from the stack table, so they never disagree.

use serde::Serialize;

use crate::{
    model::{Class, Frame, FrameKind},
    python::{self, PythonRuntime},
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Attribution {
    /// `None` when the target runs no Python.
    pub class: Option<Class>,
    /// Index of the explaining frame; `None` for a stack with no frame to show.
    pub frame: Option<usize>,
}

/// Python stacks are explained by the Python runtime's rules (the user's innermost Python
/// line, the extension called from Python, the interpreter); a stack with no Python above it,
/// and every stack of a target without Python, by its innermost application line.
pub fn attribute(frames: &[Frame], python: Option<&PythonRuntime>) -> Attribution {
    let native = native_frame(frames);
    let Some(rt) = python else {
        return Attribution {
            class: None,
            frame: native,
        };
    };
    let (class, i) = python::classify(frames, rt);
    let frame = match class {
        Class::NativeLibrary => native.or(Some(i)),
        _ => Some(i),
    };
    Attribution {
        class: Some(class),
        frame: frame.filter(|&i| i < frames.len()),
    }
}

/// Libraries whose frames are the runtime, not the application: the allocator, libc, the C++
/// runtime, the interpreter.
const RUNTIME_MODULES: &[&str] = &[
    "libc.so",
    "libc-",
    "ld-linux",
    "libstdc++",
    "libgcc_s",
    "libpthread",
    "libm.so",
    "libdl",
    "libpython",
    "libjemalloc",
    "libtcmalloc",
    "libmimalloc",
];

/// Whether a frame is the application's own code (not the runtime, not Python's stdlib).
fn is_application(f: &Frame) -> bool {
    let Some(file) = f.file.as_deref() else {
        return false;
    };
    match f.kind {
        FrameKind::Python => {
            let stdlib = file.contains("/lib/python3.") && !file.contains("-packages/");
            !file.starts_with('<') && !stdlib
        }
        FrameKind::Native => {
            let module = f.module.as_deref().unwrap_or("");
            !RUNTIME_MODULES.iter().any(|m| module.starts_with(m))
                && !file.starts_with("/usr/include/")
        }
    }
}

/// The innermost application frame with a file and a line; failing that, the innermost frame
/// with a file and a line at all.
fn native_frame(frames: &[Frame]) -> Option<usize> {
    let located = |f: &Frame| f.file.is_some() && f.line.is_some();
    frames
        .iter()
        .position(|f| located(f) && is_application(f))
        .or_else(|| frames.iter().position(located))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::tests::frame;

    #[test]
    fn explaining_frame_skips_the_runtime() {
        let py = |f: &str, file: &str| Frame {
            kind: FrameKind::Python,
            ..frame(f, file, 5, "")
        };
        let frames = vec![
            frame("malloc", "./malloc/malloc.c", 1, "libc.so.6"),
            frame(
                "PyList_New",
                "Objects/listobject.c",
                2,
                "libpython3.11.so.1.0",
            ),
            py("dumps", "/usr/lib/python3.11/json/__init__.py"),
            py("handle", "/srv/app/server.py"),
        ];
        let at = |frames: &[Frame]| attribute(frames, None).frame;
        assert_eq!(at(&frames), Some(3));
        assert_eq!(
            at(&frames[..2]),
            Some(0),
            "no application frame: the innermost located one"
        );
        assert_eq!(attribute(&[], None), Attribution::default());
    }
}
