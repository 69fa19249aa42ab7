//! Python frames into native stacks: each run of Python frames goes just inside the
//! evaluator activation (`_PyEval_EvalFrameDefault`) that ran it, so a stack reads
//! `malloc ← PyBytes_FromSize ← app.py:41 leak ← _PyEval_EvalFrameDefault ← … ← main`.

use memleak_common::PyFrame;
use memleak_common::python::ENTRY_FRAME;

use super::PythonRuntime;
use crate::model::{Frame, FrameKind};

const EVALUATOR: &str = "_PyEval_EvalFrameDefault";

impl PythonRuntime {
    /// `native`: symbolized, innermost first; `python`: as the BPF program recorded them.
    /// Python frames left over when the native stack has no more evaluator frames (its walk
    /// stopped early) go at the end, where they still read in the right order.
    pub fn splice(&mut self, native: Vec<Frame>, python: &[PyFrame]) -> Vec<Frame> {
        let mut runs = python
            .split_inclusive(|f| f.instr & ENTRY_FRAME != 0)
            .map(|run| run.iter().map(|f| self.frame(*f)).collect::<Vec<_>>())
            .collect::<Vec<_>>()
            .into_iter()
            .peekable();
        let mut out = Vec::with_capacity(native.len() + python.len());
        for f in native {
            if let Some(run) = runs.next_if(|_| is_evaluator(&f)) {
                out.extend(run);
            }
            out.push(f);
        }
        out.extend(runs.flatten());
        out
    }

    fn frame(&mut self, f: PyFrame) -> Frame {
        let loc = self.resolve(f);
        Frame {
            addr: f.code,
            function: loc.as_ref().map(|l| l.function.clone()),
            line: loc.as_ref().and_then(|l| l.line),
            file: loc.map(|l| l.file),
            kind: FrameKind::Python,
            ..Default::default()
        }
    }
}

/// The evaluator itself or a compiler-split part of it (`.cold`).
fn is_evaluator(f: &Frame) -> bool {
    !f.inlined
        && f.function.as_deref().is_some_and(|name| {
            name.strip_prefix(EVALUATOR)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
}
