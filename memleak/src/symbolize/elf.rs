//! One object file as a symbol source: its load segments (to turn a file offset into an ELF
//! virtual address), its symbol tables and its DWARF, taken from the file itself or from its
//! separate debug file. Everything needed is copied out of the file's bytes when it is
//! parsed, so the source keeps working after the file or the target is gone.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use object::{Object, ObjectSection, ObjectSymbol, SectionFlags, SymbolKind};

use super::debug_file::Finder;

type Reader = gimli::EndianArcSlice<gimli::RunTimeEndian>;

/// A named place in the code, before it is tied to one address of the target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Place {
    pub function: Option<String>,
    /// ELF virtual address where the function starts (`None` for inlined frames, or when
    /// nothing tells where the function starts).
    pub start: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: bool,
}

pub struct ElfSource {
    /// PT_LOAD segments: (p_offset, p_filesz, p_vaddr).
    loads: Vec<(u64, u64, u64)>,
    symbols: Symbols,
    dwarf: Option<addr2line::Context<Reader>>,
    /// Resolved lookups by virtual address: a stack of 127 frames is resolved hundreds of
    /// times per interval.
    cache: HashMap<u64, Vec<Place>>,
}

impl ElfSource {
    /// Copies what is needed out of `obj`, and out of its separate debug file when the
    /// binary itself has no DWARF or no `.symtab`. `target_path`: the binary's path as the
    /// target sees it.
    pub fn new(obj: &object::File, target_path: Option<&Path>, finder: &Finder) -> ElfSource {
        let loads = crate::objects::segments(obj);
        let mut symbols = Symbols::collect(obj);
        let mut dwarf = load_dwarf(obj, target_path, finder);
        let has_symtab = obj.section_by_name(".symtab").is_some();
        if (dwarf.is_none() || !has_symtab)
            && let Some((debug_data, debug_path)) = finder.debug_file(target_path, obj)
            && let Ok(debug) = object::File::parse(&*debug_data)
        {
            if !has_symtab {
                symbols = Symbols::merge(symbols, Symbols::collect(&debug));
            }
            dwarf = dwarf.or_else(|| load_dwarf(&debug, Some(&debug_path), finder));
        }
        ElfSource {
            loads,
            symbols,
            dwarf,
            cache: HashMap::new(),
        }
    }

    /// The ELF virtual address of `file_offset`, through the PT_LOAD segment holding it.
    pub fn vaddr_of_offset(&self, file_offset: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|&&(offset, size, _)| {
                offset <= file_offset && file_offset < offset.saturating_add(size)
            })
            .map(|&(offset, _, vaddr)| (file_offset - offset).wrapping_add(vaddr))
    }

    /// The places at `vaddr`, innermost (inlined) first; empty when nothing names it.
    pub fn resolve(&mut self, vaddr: u64) -> &[Place] {
        let (symbols, dwarf) = (&self.symbols, &self.dwarf);
        self.cache.entry(vaddr).or_insert_with(|| {
            let symbol = symbols.find(vaddr);
            let mut places = dwarf
                .as_ref()
                .and_then(|ctx| dwarf_places(ctx, vaddr).ok())
                .unwrap_or_default();
            // The symbol table names the outer function the way every tool does (demangled
            // linkage name) and knows where it starts.
            if let Some((name, start)) = symbol {
                if places.is_empty() {
                    places.push(Place::default());
                }
                let outer = places.last_mut().expect("just ensured");
                outer.function = Some(demangle(name));
                outer.start = Some(start);
            }
            // A line without any function name would print as a wrong-looking frame.
            if places.last().is_some_and(|p| p.function.is_none()) {
                places.clear();
            }
            places
        })
    }
}

fn demangle(name: &str) -> String {
    addr2line::demangle_auto(name.into(), None).into_owned()
}

/// Frames from DWARF, innermost first: inlined functions carry their own location, the
/// last one is the function the code belongs to.
fn dwarf_places(ctx: &addr2line::Context<Reader>, vaddr: u64) -> Result<Vec<Place>> {
    let mut iter = ctx.find_frames(vaddr).skip_all_loads()?;
    let mut places = Vec::new();
    let mut outer_die = None;
    while let Some(frame) = iter.next()? {
        outer_die = frame.dw_die_offset;
        places.push(Place {
            function: frame
                .function
                .and_then(|f| f.demangle().ok().map(|n| n.into_owned())),
            start: None,
            file: frame
                .location
                .as_ref()
                .and_then(|l| l.file.map(str::to_string)),
            line: frame.location.as_ref().and_then(|l| l.line),
            inlined: true,
        });
    }
    if let Some(outer) = places.last_mut() {
        outer.inlined = false;
        outer.start = outer_die.and_then(|die| function_start(ctx, vaddr, die));
    }
    Ok(places)
}

/// DW_AT_low_pc of the function DIE, for an address the symbol tables do not cover.
fn function_start(
    ctx: &addr2line::Context<Reader>,
    vaddr: u64,
    die: gimli::UnitOffset<usize>,
) -> Option<u64> {
    let unit = ctx.find_dwarf_and_unit(vaddr).skip_all_loads()?;
    let low_pc = unit.entry(die).ok()?.attr_value(gimli::DW_AT_low_pc)?;
    unit.attr_address(low_pc).ok()?
}

/// DWARF sections copied out of the file at `path` (decompressed when needed), with the
/// dwz supplementary file it links to.
fn load_dwarf(
    obj: &object::File,
    path: Option<&Path>,
    finder: &Finder,
) -> Option<addr2line::Context<Reader>> {
    if obj
        .section_by_name(".debug_info")
        .is_none_or(|s| s.size() == 0)
    {
        return None;
    }
    let Ok(mut dwarf) = gimli::Dwarf::load(|id| dwarf_section(obj, id));
    if let Some(alt_data) = finder.alt_file(path, obj)
        && let Ok(alt) = object::File::parse(&*alt_data)
    {
        let Ok(()) = dwarf.load_sup(|id| dwarf_section(&alt, id));
    }
    addr2line::Context::from_dwarf(dwarf).ok()
}

/// One DWARF section, empty when the file has none.
fn dwarf_section(obj: &object::File, id: gimli::SectionId) -> Result<Reader, Infallible> {
    let endian = if obj.is_little_endian() {
        gimli::RunTimeEndian::Little
    } else {
        gimli::RunTimeEndian::Big
    };
    let data = obj
        .section_by_name(id.name())
        .and_then(|s| crate::sections::uncompressed(&s).ok())
        .unwrap_or_default();
    Ok(Reader::new(Arc::from(&*data), endian))
}

/// Function symbols from `.symtab` and `.dynsym`, sorted by address.
struct Symbols(Vec<Symbol>);

struct Symbol {
    start: u64,
    /// 0: an assembler label without a size; it covers up to the next symbol, within its
    /// section, and only where no sized symbol covers the address.
    size: u64,
    /// End of the symbol's section, bounding a size-0 symbol.
    section_end: u64,
    name: Box<str>,
}

impl Symbols {
    fn collect(obj: &object::File) -> Symbols {
        let section_end = |sym: &object::Symbol| {
            sym.section_index()
                .and_then(|i| obj.section_by_index(i).ok())
                // By flag, not kind: in a debug file the code sections are NOBITS.
                .filter(|s| {
                    matches!(s.flags(), SectionFlags::Elf { sh_flags }
                        if sh_flags & u64::from(object::elf::SHF_EXECINSTR) != 0)
                })
                .map(|s| s.address().saturating_add(s.size()))
        };
        let symbols = obj
            .symbols()
            .chain(obj.dynamic_symbols())
            .filter(|s| s.is_definition())
            .filter(|s| matches!(s.kind(), SymbolKind::Text | SymbolKind::Unknown))
            .filter_map(|s| {
                let name = s
                    .name()
                    .ok()
                    .filter(|n| !n.is_empty() && !n.starts_with('$'))?;
                Some(Symbol {
                    start: s.address(),
                    size: s.size(),
                    // Outside a code section: not a function (e.g. an absolute label).
                    section_end: section_end(&s)?,
                    name: name.into(),
                })
            })
            .collect();
        Symbols::sorted(symbols)
    }

    fn merge(a: Symbols, b: Symbols) -> Symbols {
        Symbols::sorted(a.0.into_iter().chain(b.0).collect())
    }

    /// By address, sized symbols before labels, then by rank; one entry per (address,
    /// name): `.symtab` and `.dynsym` repeat each other.
    fn sorted(mut symbols: Vec<Symbol>) -> Symbols {
        symbols.sort_by(|a, b| {
            (a.start, a.size == 0, a.rank()).cmp(&(b.start, b.size == 0, b.rank()))
        });
        symbols.dedup_by(|b, a| a.start == b.start && a.name == b.name);
        Symbols(symbols)
    }

    /// The function containing `vaddr`: a sized symbol whose range holds it (the nearest
    /// one), else a size-0 label right before it. An address past the end of the nearest
    /// sized symbol has no name: guessing would print a wrong function.
    fn find(&self, vaddr: u64) -> Option<(&str, u64)> {
        let below = &self.0[..self.0.partition_point(|s| s.start <= vaddr)];
        // Sized symbols can nest (a function and a local label inside it); a few steps back
        // is enough to get past labels.
        const NESTED: usize = 16;
        let sized = below
            .iter()
            .rev()
            .take(NESTED)
            .filter(|s| s.size > 0 && vaddr < s.start.saturating_add(s.size))
            .min_by_key(|s| (std::cmp::Reverse(s.start), s.rank()));
        let found = sized.or_else(|| {
            // The best symbol at the nearest address; sized ones sort first, so a sized one
            // here (which does not cover `vaddr`) rules the labels out.
            let nearest = below.last()?.start;
            let label = &below[below.partition_point(|s| s.start < nearest)];
            let next = self.0.get(below.len()).map_or(u64::MAX, |s| s.start);
            (label.size == 0 && vaddr < label.section_end && vaddr < next).then_some(label)
        })?;
        Some((&found.name, found.start))
    }
}

impl Symbol {
    /// Among aliases, the public name first: `malloc` before `__libc_malloc`.
    fn rank(&self) -> (usize, &str) {
        (
            self.name.len() - self.name.trim_start_matches('_').len(),
            &self.name,
        )
    }
}
