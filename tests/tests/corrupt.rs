//! Corrupted and truncated binaries (issue 6): memleak must still count every byte exactly,
//! and name a frame only with the function really there, else leave it `[unknown]`; never
//! panic. Each fixture runs for real after the damage (the loader never reads what is
//! damaged), and its own ledger says what it leaked.
//!
//! memleak's names cannot be trusted to attribute the leaks here, so the test attributes them
//! itself: the innermost frame of each stack in the damaged object, looked up in the symbol
//! table of the object as it was built.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::{Context, Result, bail, ensure};
use memleak_tests::{
    Ledger, Report, Running, Scratch, can_trace, describe_stack, expect_success, frames,
    run_memleak, stacks, wait_for_file,
};
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SegmentFlags, SymbolKind};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Function symbols of an object as built, before it was damaged.
struct Pristine {
    /// (start, size, name).
    symbols: Vec<(u64, u64, String)>,
}

impl Pristine {
    fn of(data: &[u8]) -> Result<Pristine> {
        let file = object::File::parse(data)?;
        // memleak reports ELF addresses when it can parse the file and file offsets when it
        // cannot; gcc puts code at file offset = address, so both name the same byte.
        for seg in file.segments() {
            let SegmentFlags::Elf { p_flags } = seg.flags() else {
                continue;
            };
            if p_flags & object::elf::PF_X != 0 {
                ensure!(
                    seg.file_range().0 == seg.address(),
                    "code segment at offset {:#x} but address {:#x}",
                    seg.file_range().0,
                    seg.address()
                );
            }
        }
        let symbols = file
            .symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0)
            .filter_map(|s| Some((s.address(), s.size(), s.name().ok()?.to_string())))
            .collect();
        Ok(Pristine { symbols })
    }

    fn name_at(&self, addr: u64) -> Option<&str> {
        self.symbols
            .iter()
            .find(|(start, size, _)| *start <= addr && addr < start + size)
            .map(|(_, _, name)| name.as_str())
    }
}

/// A frame of `module`: its return address as an ELF address (see `Pristine::of`).
fn frame_in(frame: &Value, module: &str) -> Option<u64> {
    (frame["module"].as_str() == Some(module))
        .then(|| frame["module_offset"].as_u64())
        .flatten()
        .map(|offset| offset - 1)
}

/// Outstanding (bytes, allocations) per function, by the innermost frame in `module`.
fn usage_by_pristine_name(
    snapshot: &Value,
    module: &str,
    pristine: &Pristine,
) -> BTreeMap<String, (u64, u64)> {
    let mut usage = BTreeMap::<String, (u64, u64)>::new();
    for stack in stacks(snapshot) {
        let Some(addr) = frames(stack).iter().find_map(|f| frame_in(f, module)) else {
            continue;
        };
        let name = pristine.name_at(addr).unwrap_or("?").to_string();
        let entry = usage.entry(name).or_default();
        entry.0 += stack["bytes"].as_u64().unwrap_or(0);
        entry.1 += stack["count"].as_u64().unwrap_or(0);
    }
    usage
}

/// Everything the damage must not change: memleak exited 0 without a panic, every ledger
/// site has exactly its bytes and allocations, and every frame memleak named in `module`
/// carries the function really there. `named`: memleak must have named every leak site
/// itself (from a symbol table that survived), not only left it unknown.
fn check(
    run: &memleak_tests::Finished,
    report: &Report,
    ledger: &Ledger,
    module: &str,
    pristine: &Pristine,
    named: bool,
) -> Result<()> {
    expect_success(run)?;
    ensure!(
        !run.stderr.contains("panicked"),
        "memleak panicked:\n{}",
        run.transcript()
    );
    let snapshot = report.final_snapshot();
    let mut problems = Vec::new();
    let usage = usage_by_pristine_name(snapshot, module, pristine);
    let sites = ledger.sites(|_| true);
    for (function, want) in &sites {
        let got = usage.get(function).copied().unwrap_or_default();
        if got != (want.bytes, want.count) {
            problems.push(format!(
                "{function}: expected {} B in {} allocations, memleak reports {} B in {}",
                want.bytes, want.count, got.0, got.1
            ));
        }
    }
    for stack in stacks(snapshot) {
        for frame in frames(stack) {
            let (Some(addr), Some(name)) = (frame_in(frame, module), frame["function"].as_str())
            else {
                continue;
            };
            let really = pristine.name_at(addr);
            if really != Some(name) {
                problems.push(format!(
                    "frame at {module}+{addr:#x} named {name}, but it is in {really:?}: {}",
                    describe_stack(stack)
                ));
            }
        }
        let innermost = frames(stack).iter().find(|f| frame_in(f, module).is_some());
        if named
            && let Some(frame) = innermost
            && frame["function"].is_null()
        {
            problems.push(format!(
                "the symbol table survived, yet a frame is unnamed: {}",
                describe_stack(stack)
            ));
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let all: Vec<String> = stacks(snapshot).iter().map(describe_stack).collect();
    bail!(
        "{}\nlost: {}\nall stacks:\n  {}\n--- memleak stderr ---\n{}",
        problems.join("\n"),
        snapshot["lost"],
        all.join("\n  "),
        run.stderr
    )
}

/// Deterministic garbage (xorshift64).
fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Overwrites the named sections of `data` with garbage; fails if one is missing or has no
/// bytes in the file.
fn overwrite_sections(data: &mut [u8], names: &[&str]) -> Result<()> {
    let ranges: Vec<(u64, u64)> = {
        let file = object::File::parse(&*data)?;
        names
            .iter()
            .map(|name| {
                file.section_by_name(name)
                    .and_then(|s| s.file_range())
                    .with_context(|| format!("the fixture has no {name} in the file"))
            })
            .collect::<Result<_>>()?
    };
    for (i, (offset, size)) in ranges.into_iter().enumerate() {
        let (offset, size) = (offset as usize, size as usize);
        data[offset..offset + size].copy_from_slice(&garbage(size, 0x5eed + i as u64));
    }
    Ok(())
}

/// Builds `leaks` (gcc `flags`), damages the executable with `damage`, runs it under
/// `memleak -c`, and checks the result (see `check`).
fn trace_damaged_leaks(
    test: &str,
    flags: &[&str],
    damage: impl Fn(&mut Vec<u8>) -> Result<()>,
    named: bool,
) -> Result<()> {
    let scratch = Scratch::new(test)?;
    let fixture = scratch.compile("leaks", "leaks", flags)?;
    let mut data = std::fs::read(&fixture)?;
    let pristine = Pristine::of(&data)?;
    damage(&mut data)?;
    std::fs::write(&fixture, &data)?;
    let ledger = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let command = format!("{} {} run", fixture.display(), ledger.display());
    let run = run_memleak(
        &scratch,
        &["-c", &command, "--json", out.to_str().unwrap()],
        None,
        TIMEOUT,
    )?;
    expect_success(&run)?;
    let ledger = Ledger::read(&ledger)?;
    check(
        &run,
        &Report::read(&out)?,
        &ledger,
        "leaks",
        &pristine,
        named,
    )
}

/// (a) DWARF overwritten with garbage: functions come from `.symtab`, figures stay exact.
#[test]
fn garbage_dwarf_names_from_symtab() -> Result<()> {
    if !can_trace("garbage_dwarf_names_from_symtab") {
        return Ok(());
    }
    trace_damaged_leaks(
        "garbage-dwarf",
        &[],
        |data| overwrite_sections(data, &[".debug_info", ".debug_line", ".debug_abbrev"]),
        true,
    )
}

/// (b) Cut right after the last PT_LOAD segment: no section headers, no `.symtab`, nothing
/// memleak can parse. Frames of the executable are `[unknown]`, the figures still exact.
#[test]
fn truncated_executable_counts_exactly() -> Result<()> {
    if !can_trace("truncated_executable_counts_exactly") {
        return Ok(());
    }
    trace_damaged_leaks(
        "truncated",
        &[],
        |data| {
            let end = {
                let file = object::File::parse(&**data)?;
                file.segments()
                    .map(|s| s.file_range())
                    .map(|(offset, size)| offset + size)
                    .max()
                    .context("no segments")?
            };
            ensure!((end as usize) < data.len(), "nothing after the segments");
            data.truncate(end as usize);
            Ok(())
        },
        false,
    )
}

/// (c) `.eh_frame` overwritten with garbage (it is loaded, but a C program without
/// exceptions never reads it). The unwinder gets nonsense; built without frame pointers so
/// the walk depends on it. Stacks may end early, the innermost frame and figures may not
/// change.
#[test]
fn garbage_eh_frame_does_not_break_unwinding() -> Result<()> {
    if !can_trace("garbage_eh_frame_does_not_break_unwinding") {
        return Ok(());
    }
    trace_damaged_leaks(
        "garbage-eh-frame",
        &["-O2", "-fomit-frame-pointer"],
        |data| overwrite_sections(data, &[".eh_frame"]),
        true,
    )
}

/// (c, deeper) Only the FDEs' bodies garbage, every CIE and every entry length intact: the
/// table builder walks each FDE, skips the ones it cannot parse and keeps what garbage
/// happens to parse, which the BPF walker then follows.
#[test]
fn garbage_fdes_do_not_break_unwinding() -> Result<()> {
    if !can_trace("garbage_fdes_do_not_break_unwinding") {
        return Ok(());
    }
    trace_damaged_leaks(
        "garbage-fdes",
        &["-O2", "-fomit-frame-pointer"],
        garble_fde_bodies,
        true,
    )
}

/// Overwrites what follows the CIE pointer of every FDE in `.eh_frame` (initial location,
/// range, augmentation, instructions) with garbage.
fn garble_fde_bodies(data: &mut Vec<u8>) -> Result<()> {
    let (offset, size) = object::File::parse(&**data)?
        .section_by_name(".eh_frame")
        .and_then(|s| s.file_range())
        .context("no .eh_frame")?;
    let section = &mut data[offset as usize..(offset + size) as usize];
    let word = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().unwrap());
    let (mut pos, mut fdes) = (0, 0);
    while pos + 8 <= section.len() {
        let (length, cie_pointer) = (word(section, pos) as usize, word(section, pos + 4));
        // A zero terminator, or a 64-bit entry (gcc writes none).
        if length == 0 || length == 0xffff_ffff {
            break;
        }
        let end = (pos + 4 + length).min(section.len());
        if cie_pointer != 0 {
            section[pos + 8..end].copy_from_slice(&garbage(end - pos - 8, pos as u64));
            fdes += 1;
        }
        pos = end;
    }
    ensure!(fdes > 10, "only {fdes} FDEs garbled");
    Ok(())
}

/// (d) A shared library damaged on disk while the target has it mapped (only what lies
/// beyond its loaded segments: the section headers and the sections no segment loads), then
/// traced with `-p`: memleak reads the damaged file through the mapping.
#[test]
fn library_damaged_while_mapped() -> Result<()> {
    if !can_trace("library_damaged_while_mapped") {
        return Ok(());
    }
    let scratch = Scratch::new("damaged-lib")?;
    let lib = scratch.compile("shlib", "libshlib.so", &["-shared", "-fPIC"])?;
    let rpath = format!("-Wl,-rpath,{}", lib.parent().unwrap().display());
    let exe = scratch.compile("shlib_main", "shlib_main", &[lib.to_str().unwrap(), &rpath])?;
    let pristine_data = std::fs::read(&lib)?;
    let pristine = Pristine::of(&pristine_data)?;
    let ledger = scratch.path("ledger.json");
    let out = scratch.path("report.json");
    let target = Running::start(
        &scratch,
        "shlib_main",
        &exe,
        &[ledger.to_str().unwrap(), "attach"],
        None,
    )?;
    target.wait_for_mapping("libshlib.so", Duration::from_secs(10))?;
    damage_beyond_segments(&lib, &pristine_data)?;
    let pid = target.pid().to_string();
    let tracer = Running::memleak(
        &scratch,
        &["-p", &pid, "-o", "0", "--json", out.to_str().unwrap()],
        None,
    )?;
    wait_for_file(&ledger, Duration::from_secs(45))?;
    let run = tracer.interrupt(TIMEOUT)?;
    let ledger = Ledger::read(&ledger)?;
    check(
        &run,
        &Report::read(&out)?,
        &ledger,
        "libshlib.so",
        &pristine,
        false,
    )
}

/// Writes garbage, in place (same inode: the mapping sees the file change), over everything
/// of `lib` past the end of its last loaded segment: the section header table, and `.symtab`,
/// `.strtab` and the DWARF sections gcc puts there. No segment holds those bytes (the last
/// page may map some, which nothing reads): the target runs on unharmed.
fn damage_beyond_segments(lib: &Path, data: &[u8]) -> Result<()> {
    use object::read::elf::FileHeader;
    use std::os::unix::fs::FileExt;
    let file = object::File::parse(data)?;
    let loaded_end = file
        .segments()
        .map(|s| s.file_range())
        .map(|(offset, size)| offset + size)
        .max()
        .context("no segments")?;
    let start = loaded_end;
    let names = [".symtab", ".strtab", ".debug_info", ".debug_line"];
    for name in names {
        let (offset, _) = file
            .section_by_name(name)
            .and_then(|s| s.file_range())
            .with_context(|| format!("{name} not in the library file"))?;
        ensure!(
            offset >= start,
            "{name} at {offset:#x} is inside a loaded segment"
        );
    }
    let shoff = match &file {
        object::File::Elf64(elf) => elf.elf_header().e_shoff(elf.endian()),
        _ => bail!("not a 64-bit ELF"),
    };
    ensure!(shoff >= start, "section headers inside a loaded segment");
    let len = data.len() as u64 - start;
    let out = std::fs::OpenOptions::new().write(true).open(lib)?;
    out.write_all_at(&garbage(len as usize, 0xd00d), start)?;
    Ok(())
}
