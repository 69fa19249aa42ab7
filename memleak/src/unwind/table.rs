//! One object file's call frame information (`.eh_frame`, or `.debug_frame` when that is all
//! there is) → the compact sorted rows the BPF walker searches.
//!
//! Only what a stack walk needs survives: how to find the CFA, that the return address is at
//! CFA − 8, and where the caller's rbp was saved. Consecutive rows that agree on those are
//! merged, and the gaps between FDEs get a `NO_INFO` row so a lookup there falls back to
//! frame pointers instead of borrowing the previous function's rule.

use anyhow::{Context, Result, bail};
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, EndianSlice, LittleEndian, Reader,
    ReaderOffset, RegisterRule, UnwindContext, UnwindSection, UnwindTableRow, X86_64,
};
use memleak_common::unwind::{UnwindRow, cfa};
use object::{Object, ObjectSection};

/// A rule as the walker applies it: `UnwindRow` without its address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    kind: u8,
    cfa_offset: u16,
    rbp_offset: i8,
}

impl Rule {
    const NO_INFO: Rule = Rule::only(cfa::NO_INFO);
    const OUTERMOST: Rule = Rule::only(cfa::OUTERMOST);
    const UNSUPPORTED: Rule = Rule::only(cfa::UNSUPPORTED);

    const fn only(kind: u8) -> Rule {
        Rule {
            kind,
            cfa_offset: 0,
            rbp_offset: 0,
        }
    }
}

/// The rows of one object, sorted by `pc`, and how many of them the walker cannot follow.
#[derive(Debug, Default)]
pub struct ObjectTable {
    pub rows: Vec<UnwindRow>,
    pub fdes: usize,
    /// Rows marked `UNSUPPORTED` (signal frames, unknown expressions, odd offsets).
    pub unsupported: usize,
    /// FDEs skipped because gimli could not parse or evaluate them.
    pub bad_fdes: usize,
}

/// A rule over `[start, end)` in the object's own addresses.
struct Span {
    start: u64,
    end: u64,
    rule: Rule,
}

/// Builds the table of the ELF object in `data`.
pub fn build(data: &[u8]) -> Result<ObjectTable> {
    let file = object::File::parse(data).context("not an object file")?;
    if file.architecture() != object::Architecture::X86_64 {
        bail!("unwind tables are only built for x86-64 objects");
    }
    let address = |name: &str| file.section_by_name(name).map_or(0, |s| s.address());
    let mut table = ObjectTable::default();
    let mut spans = Vec::new();
    if let Some(section) = file.section_by_name(".eh_frame") {
        let bytes = section.data().context("reading .eh_frame")?;
        let bases = BaseAddresses::default()
            .set_eh_frame(section.address())
            .set_text(address(".text"))
            .set_got(address(".got"));
        let eh_frame = EhFrame::new(bytes, LittleEndian);
        collect(&eh_frame, &bases, &mut spans, &mut table)?;
    } else if let Some(section) = file.section_by_name(".debug_frame") {
        let bytes = crate::sections::uncompressed(&section).context("reading .debug_frame")?;
        let mut debug_frame = DebugFrame::new(&bytes, LittleEndian);
        debug_frame.set_address_size(8);
        collect(
            &debug_frame,
            &BaseAddresses::default(),
            &mut spans,
            &mut table,
        )?;
    }
    table.rows = to_rows(spans)?;
    table.unsupported = table
        .rows
        .iter()
        .filter(|r| r.kind == cfa::UNSUPPORTED)
        .count();
    Ok(table)
}

/// Appends every row of every FDE in `section` to `spans`. A bad FDE is counted and skipped:
/// one broken function must not cost the whole object its table.
fn collect<'a, S>(
    section: &S,
    bases: &BaseAddresses,
    spans: &mut Vec<Span>,
    table: &mut ObjectTable,
) -> Result<()>
where
    S: UnwindSection<EndianSlice<'a, LittleEndian>>,
{
    let mut ctx = UnwindContext::new();
    let mut entries = section.entries(bases);
    while let Some(entry) = entries.next().context("walking the CFI entries")? {
        let CieOrFde::Fde(partial) = entry else {
            continue;
        };
        table.fdes += 1;
        let Ok(fde) = partial.parse(S::cie_from_offset) else {
            table.bad_fdes += 1;
            continue;
        };
        // The rows hold 32-bit addresses: an FDE reaching past 4 GiB (garbage, in practice)
        // goes like any bad one instead of costing the object its whole table.
        let end = fde.initial_address().checked_add(fde.len());
        if end.is_none_or(|end| end > u64::from(u32::MAX)) {
            table.bad_fdes += 1;
            continue;
        }
        let signal = fde.cie().is_signal_trampoline();
        let Ok(mut rows) = fde.rows(section, bases, &mut ctx) else {
            table.bad_fdes += 1;
            continue;
        };
        let first = spans.len();
        loop {
            match rows.next_row() {
                Ok(Some(row)) => spans.push(Span {
                    start: row.start_address(),
                    end: row.end_address(),
                    rule: if signal {
                        Rule::UNSUPPORTED
                    } else {
                        rule(row, section)
                    },
                }),
                Ok(None) => break,
                Err(_) => {
                    spans.truncate(first);
                    table.bad_fdes += 1;
                    break;
                }
            }
        }
    }
    Ok(())
}

/// What the walker does at an address covered by `row`.
fn rule<R: Reader, S: UnwindSection<R>>(row: &UnwindTableRow<R::Offset>, section: &S) -> Rule {
    match row.register(X86_64::RA) {
        Some(RegisterRule::Offset(-8)) => {}
        Some(RegisterRule::Undefined) => return Rule::OUTERMOST,
        _ => return Rule::UNSUPPORTED,
    }
    let (kind, offset) = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RSP => {
            (cfa::RSP, *offset)
        }
        CfaRule::RegisterAndOffset { register, offset } if *register == X86_64::RBP => {
            (cfa::RBP, *offset)
        }
        CfaRule::Expression(e) => match e.get(section).ok().and_then(|e| plt_threshold(e.0)) {
            Some(threshold) => {
                return Rule {
                    kind: cfa::PLT,
                    cfa_offset: threshold,
                    rbp_offset: 0,
                };
            }
            None => return Rule::UNSUPPORTED,
        },
        CfaRule::RegisterAndOffset { .. } => return Rule::UNSUPPORTED,
    };
    let rbp_offset = match row.register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue | RegisterRule::Undefined) => Some(0),
        Some(RegisterRule::Offset(n)) if n != 0 && n % 8 == 0 => i8::try_from(n / 8).ok(),
        _ => None,
    };
    let cfa_offset = (offset > 0 && offset % 8 == 0)
        .then(|| u16::try_from(offset / 8).ok())
        .flatten();
    match (cfa_offset, rbp_offset) {
        (Some(cfa_offset), Some(rbp_offset)) => Rule {
            kind,
            cfa_offset,
            rbp_offset,
        },
        _ => Rule::UNSUPPORTED,
    }
}

/// The CFA expression GNU ld writes for lazy-binding PLT entries (16 bytes each, with a push
/// at byte 6 or later): `rsp + 8 + ((rip & 15) >= N ? 8 : 0)`. Returns N.
fn plt_threshold<R: Reader>(mut expr: R) -> Option<u16> {
    let mut bytes = [0u8; 11];
    if expr.len().into_u64() != bytes.len() as u64 {
        return None;
    }
    expr.read_slice(&mut bytes).ok()?;
    // DW_OP_breg7 8; DW_OP_breg16 0; DW_OP_lit15; DW_OP_and; DW_OP_litN; DW_OP_ge;
    // DW_OP_lit3; DW_OP_shl; DW_OP_plus
    match bytes {
        [
            0x77,
            0x08,
            0x80,
            0x00,
            0x3f,
            0x1a,
            lit @ 0x30..=0x3f,
            0x2a,
            0x33,
            0x24,
            0x22,
        ] => Some(u16::from(lit - 0x30)),
        _ => None,
    }
}

/// Sorted, merged rows with `NO_INFO` in the gaps between FDEs.
fn to_rows(mut spans: Vec<Span>) -> Result<Vec<UnwindRow>> {
    spans.retain(|s| s.start < s.end);
    spans.sort_by_key(|s| s.start);
    let mut rows: Vec<UnwindRow> = Vec::with_capacity(spans.len());
    let mut covered_to = 0;
    let mut push = |pc: u64, rule: Rule| -> Result<()> {
        let pc = u32::try_from(pc).context("code above 4 GiB in the object's addresses")?;
        if rows.last().is_some_and(|r| r.pc == pc) {
            rows.pop();
        }
        if rows.last().is_some_and(|r| {
            (r.kind, r.cfa_offset, r.rbp_offset) == (rule.kind, rule.cfa_offset, rule.rbp_offset)
        }) {
            return Ok(());
        }
        rows.push(UnwindRow {
            pc,
            cfa_offset: rule.cfa_offset,
            rbp_offset: rule.rbp_offset,
            kind: rule.kind,
        });
        Ok(())
    };
    for span in &spans {
        if span.start > covered_to && covered_to != 0 {
            push(covered_to, Rule::NO_INFO)?;
        }
        push(span.start, span.rule)?;
        covered_to = covered_to.max(span.end);
    }
    if covered_to != 0 {
        push(covered_to, Rule::NO_INFO)?;
    }
    Ok(rows)
}
