//! Named stacks that share their deciding frame read the same in a verdict; each gets the
//! first frame where its path differs from the others', so a reader can tell them apart.

use super::StackTrend;
use crate::model::{Frame, FrameKind};

/// A frame's place in the code: kind, module, function, file, line, offset in the module.
type Place<'a> = (
    FrameKind,
    Option<&'a str>,
    Option<&'a str>,
    Option<&'a str>,
    Option<u32>,
    u64,
);

/// What makes two frames the same place in the code: the same return address in the same
/// object, or for Python the same function and line.
fn place(f: &Frame) -> Place<'_> {
    let offset = match f.kind {
        FrameKind::Native => f.module_offset,
        FrameKind::Python => 0,
    };
    (
        f.kind,
        f.module.as_deref(),
        f.function.as_deref(),
        f.file.as_deref(),
        f.line,
        offset,
    )
}

fn deciding_place<'a>(s: &StackTrend<'a>) -> Option<Place<'a>> {
    s.info.deciding().map(place)
}

/// A stack's frames as seen from its deciding frame: outwards (its callers, nearest first),
/// then inwards (what it called, nearest first).
fn from_deciding(s: &StackTrend) -> Option<Vec<usize>> {
    let d = s.info.deciding_frame?;
    Some(((d + 1)..s.info.frames.len()).chain((0..d).rev()).collect())
}

/// How far along two paths run together before they part.
fn common_length(a: &StackTrend, pa: &[usize], b: &StackTrend, pb: &[usize]) -> usize {
    pa.iter()
        .zip(pb)
        .take_while(|&(&i, &j)| place(&a.info.frames[i]) == place(&b.info.frames[j]))
        .count()
}

/// Sets `differs_at` on each named stack whose deciding frame another named stack shares: the
/// frame where its path parts from the last of them to stay alongside.
pub fn tell_apart(stacks: &mut [StackTrend]) {
    let paths: Vec<Option<Vec<usize>>> = stacks
        .iter()
        .map(|s| from_deciding(s).filter(|_| s.named))
        .collect();
    for a in 0..stacks.len() {
        let Some(pa) = &paths[a] else { continue };
        let together = (0..stacks.len())
            .filter(|&b| b != a && deciding_place(&stacks[b]) == deciding_place(&stacks[a]))
            .filter_map(|b| {
                Some(common_length(
                    &stacks[a],
                    pa,
                    &stacks[b],
                    paths[b].as_ref()?,
                ))
            })
            .max();
        stacks[a].differs_at = together.and_then(|k| pa.get(k).copied());
    }
}
