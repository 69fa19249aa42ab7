//! The table builder against binutils' own reading of the same CFI, on a fixture compiled
//! here and on the system's libc and libpython.

use std::{path::Path, process::Command, time::Instant};

use memleak_common::unwind::{UnwindRow, cfa};

use super::table;

/// Functions whose CFA is found in every way gcc does it without frame pointers: rsp-based
/// with small and with > 64 KiB frames, rbp-based (a VLA forces a frame pointer).
const FIXTURE: &str = r#"
#include <stdlib.h>
#include <string.h>
__attribute__((noinline)) int leaf(int n) { return n * 3 + 1; }
__attribute__((noinline)) int big_frame(int n) {
    volatile char buf[100000];
    memset((char *)buf, n, sizeof buf);
    return buf[n] + leaf(n);
}
__attribute__((noinline)) int vla(int n) {
    volatile char buf[n + 16];
    buf[n] = (char)n;
    return buf[n] + leaf(n);
}
__attribute__((noinline)) int pushes(int a, int b, int c) {
    int s = 0;
    for (int i = 0; i < a; i++) s += leaf(i * b) ^ leaf(c + s);
    return s + big_frame(a) + vla(b);
}
int main(int argc, char **argv) { return pushes(argc, argc + 1, argc + 2) & 1; }
"#;

fn compile(dir: &Path, flags: &[&str]) -> std::path::PathBuf {
    let src = dir.join("fixture.c");
    let out = dir.join("fixture");
    std::fs::write(&src, FIXTURE).unwrap();
    let status = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status()
        .expect("gcc runs");
    assert!(status.success(), "gcc failed");
    out
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("memleak-unwind-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The row in force at `pc`, as the BPF walker finds it.
fn lookup(rows: &[UnwindRow], pc: u64) -> Option<&UnwindRow> {
    let i = rows.partition_point(|r| u64::from(r.pc) <= pc);
    i.checked_sub(1).map(|i| &rows[i])
}

/// (kind, cfa_offset, rbp_offset) as `readelf --debug-dump=frames-interp` states a row.
/// `None` for an expression, which `readelf` does not spell out.
fn readelf_rule(cfa_col: &str, rbp_col: Option<&str>, ra_col: &str) -> Option<(u8, u16, i8)> {
    if ra_col == "u" {
        return Some((cfa::OUTERMOST, 0, 0));
    }
    let (kind, offset) = if let Some(n) = cfa_col.strip_prefix("rsp+") {
        (cfa::RSP, n.parse::<u64>().unwrap())
    } else if let Some(n) = cfa_col.strip_prefix("rbp+") {
        (cfa::RBP, n.parse::<u64>().unwrap())
    } else if cfa_col == "exp" {
        return None;
    } else {
        return Some((cfa::UNSUPPORTED, 0, 0));
    };
    // Offsets that do not fit the row format must come out as UNSUPPORTED.
    let Ok(offset) = u16::try_from(offset / 8) else {
        return Some((cfa::UNSUPPORTED, 0, 0));
    };
    let rbp = match rbp_col {
        None | Some("u") | Some("s") => 0,
        Some(c) => match c.strip_prefix("c-") {
            Some(n) => -(n.parse::<i64>().unwrap() / 8) as i8,
            None => return Some((cfa::UNSUPPORTED, 0, 0)),
        },
    };
    Some((kind, offset, rbp))
}

/// Checks every row `readelf` prints for `path` against our table. Returns (rows checked,
/// expression rows skipped).
fn check_against_readelf(path: &Path, rows: &[UnwindRow]) -> (usize, usize) {
    let out = Command::new("readelf")
        .arg("--debug-dump=frames-interp")
        .arg(path)
        .output()
        .expect("readelf runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let (mut checked, mut skipped) = (0, 0);
    let mut columns: Vec<&str> = Vec::new();
    let mut in_cie = false;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(3) == Some(&"CIE") {
            in_cie = true;
        } else if fields.get(3) == Some(&"FDE") {
            in_cie = false;
        } else if fields.first() == Some(&"LOC") {
            columns = fields;
        } else if !in_cie
            && !fields.is_empty()
            && fields.len() == columns.len()
            && fields[0].len() == 16
        {
            let col = |name: &str| columns.iter().position(|c| *c == name).map(|i| fields[i]);
            let pc = u64::from_str_radix(fields[0], 16).unwrap();
            let Some(want) = readelf_rule(fields[1], col("rbp"), col("ra").unwrap()) else {
                skipped += 1;
                continue;
            };
            let got = lookup(rows, pc).map(|r| (r.kind, r.cfa_offset, r.rbp_offset));
            assert_eq!(
                got,
                Some(want),
                "{}: row at {pc:#x}: {line}",
                path.display()
            );
            checked += 1;
        }
    }
    (checked, skipped)
}

fn symbol_range(path: &Path, name: &str) -> (u64, u64) {
    use object::{Object, ObjectSymbol};
    let data = std::fs::read(path).unwrap();
    let file = object::File::parse(&*data).unwrap();
    let sym = file.symbols().find(|s| s.name() == Ok(name)).unwrap();
    (sym.address(), sym.address() + sym.size())
}

#[test]
fn fixture_rows_match_readelf() {
    let dir = temp_dir("table");
    let exe = compile(&dir, &["-O2", "-fomit-frame-pointer"]);
    let table = table::build(&std::fs::read(&exe).unwrap()).unwrap();
    assert_eq!(table.bad_fdes, 0);
    let (checked, _) = check_against_readelf(&exe, &table.rows);
    assert!(checked > 20, "only {checked} rows checked");

    // Each function's own shape, by what the compiler must have done.
    let kinds_in = |name: &str| {
        let (start, end) = symbol_range(&exe, name);
        table
            .rows
            .iter()
            .filter(|r| (start..end).contains(&u64::from(r.pc)))
            .map(|r| (r.kind, r.cfa_offset))
            .collect::<Vec<_>>()
    };
    assert!(
        kinds_in("big_frame")
            .iter()
            .any(|&(k, off)| k == cfa::RSP && u64::from(off) * 8 > 100_000),
        "big_frame: {:?}",
        kinds_in("big_frame")
    );
    assert!(
        kinds_in("vla")
            .iter()
            .any(|&(k, off)| k == cfa::RBP && off == 2),
        "vla: {:?}",
        kinds_in("vla")
    );
    // The PLT has the lazy-binding expression.
    assert!(
        table
            .rows
            .iter()
            .any(|r| r.kind == cfa::PLT && r.cfa_offset == 11)
    );
    // _start (from crt1) ends the stack.
    let (start, _) = symbol_range(&exe, "_start");
    assert_eq!(lookup(&table.rows, start).unwrap().kind, cfa::OUTERMOST);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn gaps_between_functions_fall_back_to_frame_pointers() {
    let dir = temp_dir("gaps");
    let exe = compile(&dir, &["-O2", "-fomit-frame-pointer"]);
    let table = table::build(&std::fs::read(&exe).unwrap()).unwrap();
    // Rows are sorted, distinct, and never repeat the rule before them.
    for pair in table.rows.windows(2) {
        assert!(pair[0].pc < pair[1].pc);
        assert_ne!(
            (pair[0].kind, pair[0].cfa_offset, pair[0].rbp_offset),
            (pair[1].kind, pair[1].cfa_offset, pair[1].rbp_offset)
        );
    }
    assert_eq!(table.rows.last().unwrap().kind, cfa::NO_INFO);
    // Below the first FDE nothing is known.
    assert!(lookup(&table.rows, 0).is_none());
    std::fs::remove_dir_all(dir).unwrap();
}

/// Row counts and build time for the libraries a Python process spends its time in.
#[test]
fn system_libraries() {
    // pyenv's python3.11 is bin/python3.11 beside lib/libpython3.11.so.1.0.
    let libpython = memleak_tests::pyenv_python("3.11")
        .and_then(|p| Some(p.parent()?.parent()?.join("lib/libpython3.11.so.1.0")));
    let libs = [
        Some("/lib/x86_64-linux-gnu/libc.so.6".into()),
        libpython,
        Some("/usr/bin/python3.11".into()),
    ];
    for lib in libs {
        let Some(path) = lib.filter(|p: &std::path::PathBuf| p.exists()) else {
            memleak_tests::skipped("system_libraries", "a library is not installed");
            continue;
        };
        let path = path.as_path();
        let lib = path.display();
        let data = std::fs::read(path).unwrap();
        let started = Instant::now();
        let table = table::build(&data).unwrap();
        let ms = started.elapsed().as_millis();
        eprintln!(
            "{lib}: {} FDEs, {} rows ({} unsupported, {} bad FDEs), {ms} ms",
            table.fdes,
            table.rows.len(),
            table.unsupported,
            table.bad_fdes
        );
        assert_eq!(table.bad_fdes, 0);
        assert!(table.rows.len() > 10_000 && table.rows.len() < 200_000);
        assert!(table.unsupported < 20);
        let (checked, skipped) = check_against_readelf(path, &table.rows);
        assert!(
            checked > 10_000 && skipped < 10,
            "{checked} checked, {skipped} skipped"
        );
    }
}

/// An FDE reaching past 4 GiB (beyond what a row can hold) is skipped alone: the object keeps
/// the rows of its other functions instead of losing its whole table.
#[test]
fn fde_past_4_gib_is_skipped_alone() {
    use object::{Object, ObjectSection};
    let dir = temp_dir("fde-past-4gib");
    let data = std::fs::read(compile(&dir, &["-O2"])).unwrap();
    let good = table::build(&data).unwrap();
    let (offset, size) = object::File::parse(&*data)
        .unwrap()
        .section_by_name(".eh_frame")
        .and_then(|s| s.file_range())
        .unwrap();
    // gcc's FDE: length, CIE pointer, pc_begin (pc-relative sdata4), pc_range (sdata4).
    // Move the first FDE 2 GiB past its own field and make it 2 GiB long: it ends past 4 GiB.
    let mut bad = data.clone();
    let section = &mut bad[offset as usize..(offset + size) as usize];
    let word = |s: &[u8], at: usize| i32::from_le_bytes(s[at..at + 4].try_into().unwrap());
    let mut pos = 0;
    while word(section, pos + 4) == 0 {
        pos += 4 + word(section, pos) as usize;
    }
    section[pos + 8..pos + 12].copy_from_slice(&0x7fff_ff00i32.to_le_bytes());
    section[pos + 12..pos + 16].copy_from_slice(&0x7fff_ff00i32.to_le_bytes());
    let t = table::build(&bad).unwrap();
    assert_eq!((t.fdes, t.bad_fdes), (good.fdes, good.bad_fdes + 1));
    assert!(t.rows.len() > 1, "{t:?}");
    let _ = std::fs::remove_dir_all(dir);
}
