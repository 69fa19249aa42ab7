//! Instruction offset → source line, from the tables CPython keeps in every code object.
//! All walk address ranges in bytes of bytecode, starting at `co_firstlineno`. The tables
//! are read out of the target: a line that leaves the `i32` range is a corrupt table, and
//! has no line.

/// Which table a code object keeps, by version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// 3.8–3.9 `co_lnotab`.
    Lnotab,
    /// 3.10 `co_linetable`.
    Pep626,
    /// 3.11+ `co_linetable` (locations).
    Pep657,
}

pub fn line(format: Format, table: &[u8], firstlineno: i32, byte_offset: u64) -> Option<u32> {
    match format {
        Format::Lnotab => lnotab_line(table, firstlineno, byte_offset),
        Format::Pep626 => pep626_line(table, firstlineno, byte_offset),
        Format::Pep657 => pep657_line(table, firstlineno, byte_offset),
    }
}

/// 3.8–3.9: pairs of (bytecode length: u8, line delta: i8); the line of an offset is the
/// line reached before the first pair that goes past it.
pub fn lnotab_line(table: &[u8], firstlineno: i32, byte_offset: u64) -> Option<u32> {
    let mut line = firstlineno;
    let mut addr = 0u64;
    for pair in table.chunks_exact(2) {
        addr += pair[0] as u64;
        if addr > byte_offset {
            break;
        }
        line = line.checked_add(pair[1] as i8 as i32)?;
    }
    u32::try_from(line).ok()
}

/// 3.10, PEP 626 `co_linetable`: pairs of (bytecode length: u8, line delta: i8), a delta of
/// −128 meaning "no line".
pub fn pep626_line(table: &[u8], firstlineno: i32, byte_offset: u64) -> Option<u32> {
    let mut line = firstlineno;
    let mut end = 0u64;
    for pair in table.chunks_exact(2) {
        let start = end;
        end += pair[0] as u64;
        let delta = pair[1] as i8;
        let known = delta != -128;
        if known {
            line = line.checked_add(delta as i32)?;
        }
        if (start..end).contains(&byte_offset) {
            return known.then(|| u32::try_from(line).ok()).flatten();
        }
    }
    None
}

/// 3.11+, PEP 657 location table: entries start with a byte whose high bit is set; bits 3–6
/// are the entry's kind, bits 0–2 its length in code units minus one. Only line deltas
/// matter here: kinds 0–9 stay on the line, 10–12 move down 0–2 lines, 13 and 14 carry a
/// signed varint delta, 15 has no location.
pub fn pep657_line(table: &[u8], firstlineno: i32, byte_offset: u64) -> Option<u32> {
    let mut line = firstlineno;
    let mut end = 0u64;
    let mut pos = 0;
    while pos < table.len() {
        let head = table[pos];
        let kind = (head >> 3) & 15;
        let start = end;
        end += ((head & 7) as u64 + 1) * 2;
        let known = kind != 15;
        line = line.checked_add(match kind {
            10..=12 => (kind - 10) as i32,
            13 | 14 => signed_varint(&table[pos + 1..]),
            _ => 0,
        })?;
        if (start..end).contains(&byte_offset) {
            return known.then(|| u32::try_from(line).ok()).flatten();
        }
        pos += 1;
        while pos < table.len() && table[pos] & 0x80 == 0 {
            pos += 1;
        }
    }
    None
}

/// A varint of 6-bit chunks, least significant first, bit 6 meaning "more follows"; the
/// lowest bit of the value is the sign.
fn signed_varint(bytes: &[u8]) -> i32 {
    let mut value = 0u32;
    let mut shift = 0;
    for &b in bytes {
        value |= ((b & 63) as u32).checked_shl(shift).unwrap_or(0);
        shift += 6;
        if b & 64 == 0 {
            break;
        }
    }
    if value & 1 == 1 {
        -((value >> 1) as i32)
    } else {
        (value >> 1) as i32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the python_linetable fuzz target: lines past `i32::MAX` overflowed.
    #[test]
    fn line_past_i32_is_none() {
        assert_eq!(lnotab_line(&[2, 1, 2, 1], i32::MAX, 3), None);
        assert_eq!(pep626_line(&[2, 1], i32::MAX, 0), None);
        // Kind 13: a signed varint delta of +1.
        assert_eq!(pep657_line(&[0x80 | 13 << 3, 2], i32::MAX, 0), None);
        assert_eq!(pep657_line(&[0x80 | 13 << 3, 2], 7, 0), Some(8));
    }
}
