//! Instruction offset → source line, from the tables CPython keeps in every code object.
//! All walk address ranges in bytes of bytecode, starting at `co_firstlineno`.

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
        line += pair[1] as i8 as i32;
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
            line += delta as i32;
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
        line += match kind {
            10..=12 => (kind - 10) as i32,
            13 | 14 => signed_varint(&table[pos + 1..]),
            _ => 0,
        };
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
