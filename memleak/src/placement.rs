//! Where in a hooked function to put its uprobe.
//!
//! A uprobe is an int3 over the probed instruction; after the handler the kernel must run that
//! instruction. A few kinds it emulates in the trap (Linux 6.x `arch/x86/kernel/uprobes.c`:
//! `branch_setup_xol_ops` takes jmp rel8/rel32, call rel32, jcc rel8/rel32 and `0x90` nops,
//! `push_setup_xol_ops` takes `push reg` alone or with REX 0x41); every other one is
//! single-stepped out of line, a second trap that costs ≈9 µs more per hit on this machine
//! (notes/probe-cost.md). glibc's `free` starts with `test %rdi,%rdi` (single-stepped) and goes
//! on with `je` (emulated), so probing `free+3` makes every free ≈8× cheaper.
//!
//! A later instruction is a valid entry point only if every call reaches it once, with the
//! argument registers untouched: we walk straight-line code from the entry, stop at the first
//! control transfer (or syscall), at a write to an argument register we read, or where another
//! branch of the function lands, and take the first emulated instruction on the way.
//!
//! A return probe hijacks the return address at `[rsp]` when its breakpoint hits, so it may sit
//! at a later instruction only while the stack pointer is still the entry one
//! ([`choose_for_return`]). Entry and return probes at one address share one breakpoint, so an
//! allocating function pays one trap per call when both use the same placement.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Formatter, GasFormatter, Instruction,
    InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};

/// A general-purpose register, as the decoder names it (`Reg::RDI`).
pub type Reg = Register;

/// The System V x86-64 integer argument registers, in argument order.
pub const ARG_REGS: [Reg; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// Where to probe a function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// Bytes from the function's start (the symbol's address).
    pub offset: u64,
    /// Why this offset, in one line (for `--verbose` and the logs).
    pub reason: String,
}

/// The placement for an entry-only probe (free, munmap): the first emulated instruction that
/// every call passes with `preserved_regs` still holding the arguments. The stack pointer may
/// have moved by a known amount: nothing an entry-only probe reads depends on it.
pub fn choose(code: &[u8], func_vaddr: u64, preserved_regs: &[Reg]) -> Placement {
    walk(code, func_vaddr, preserved_regs, Stack::MayMove)
}

/// Like [`choose`], but for an address that also carries the function's return probe: the
/// stack pointer must still be the entry one, so that `[rsp]` is the return address.
pub fn choose_for_return(code: &[u8], func_vaddr: u64, preserved_regs: &[Reg]) -> Placement {
    walk(code, func_vaddr, preserved_regs, Stack::Fixed)
}

#[derive(Clone, Copy, PartialEq)]
enum Stack {
    MayMove,
    Fixed,
}

fn walk(code: &[u8], func_vaddr: u64, preserved_regs: &[Reg], stack: Stack) -> Placement {
    let preserved: Vec<Reg> = preserved_regs.iter().map(|r| r.full_register()).collect();
    let landings = branch_targets(code, func_vaddr);
    let mut info = InstructionInfoFactory::new();
    let mut decoder = Decoder::with_ip(64, code, func_vaddr, DecoderOptions::NONE);
    let stop = loop {
        if !decoder.can_decode() {
            break "the function ends".to_string();
        }
        let instr = decoder.decode();
        let offset = instr.ip() - func_vaddr;
        if instr.is_invalid() {
            break format!("undecodable bytes at +{offset}");
        }
        if offset > 0 && landings.contains(&instr.ip()) {
            break format!("a branch of the function lands at +{offset}");
        }
        let bytes = &code[offset as usize..offset as usize + instr.len()];
        if emulated(bytes, &instr) {
            let reason = if offset == 0 {
                format!("the entry instruction `{}` is emulated", text(&instr))
            } else {
                format!(
                    "`{}` at +{offset} is the first emulated instruction every call reaches \
                     with the arguments in place",
                    text(&instr)
                )
            };
            return Placement { offset, reason };
        }
        // Past this point the instruction has run: it must fall through and keep the arguments.
        if instr.flow_control() != FlowControl::Next || instr.mnemonic() == Mnemonic::Syscall {
            break format!("`{}` at +{offset} leaves straight-line code", text(&instr));
        }
        let written: Vec<Register> = info
            .info(&instr)
            .used_registers()
            .iter()
            .filter(|u| {
                matches!(
                    u.access(),
                    OpAccess::Write
                        | OpAccess::CondWrite
                        | OpAccess::ReadWrite
                        | OpAccess::ReadCondWrite
                )
            })
            .map(|u| u.register().full_register())
            .collect();
        if let Some(r) = preserved.iter().find(|r| written.contains(r)) {
            break format!("`{}` at +{offset} overwrites {r:?}", text(&instr));
        }
        if written.contains(&Register::RSP) {
            let Some(moved) = sp_increment(&instr) else {
                break format!("`{}` at +{offset} moves rsp unpredictably", text(&instr));
            };
            if stack == Stack::Fixed && moved != 0 {
                break format!(
                    "`{}` at +{offset} moves rsp off the return address",
                    text(&instr)
                );
            }
        }
    };
    Placement {
        offset: 0,
        reason: format!("no emulated instruction before {stop}; probing the entry"),
    }
}

/// Whether the kernel emulates a breakpoint on this instruction (no single-step), mirroring
/// `branch_setup_xol_ops` and `push_setup_xol_ops`. Instructions with a segment or lock prefix
/// cannot be probed at all (`is_prefix_bad`); branches with an operand-size prefix neither.
fn emulated(bytes: &[u8], instr: &Instruction) -> bool {
    let legacy = bytes
        .iter()
        .take_while(|b| {
            matches!(
                b,
                0xf0 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 | 0x66 | 0x67
            )
        })
        .count();
    let (prefixes, rest) = bytes.split_at(legacy);
    if prefixes
        .iter()
        .any(|p| matches!(p, 0x26 | 0x2e | 0x36 | 0x3e | 0xf0))
    {
        return false;
    }
    let (rex, opcode) = match rest {
        [r @ 0x40..=0x4f, opcode @ ..] => (Some(*r), opcode),
        opcode => (None, opcode),
    };
    match opcode {
        [0xeb | 0xe9 | 0xe8 | 0x70..=0x7f, ..] | [0x0f, 0x80..=0x8f, ..] => {
            !prefixes.contains(&0x66)
        }
        // The kernel takes any `0x90` as a nop; with REX.B it is `xchg r8d, eax`, which it would
        // skip, so we never choose that.
        [0x90] => rex.is_none() && matches!(instr.mnemonic(), Mnemonic::Nop | Mnemonic::Pause),
        [0x50..=0x57] => bytes.len() == 1 || (bytes.len() == 2 && rex == Some(0x41)),
        _ => false,
    }
}

/// How far an instruction that writes rsp moves it, when that is known from the instruction.
fn sp_increment(instr: &Instruction) -> Option<i64> {
    let pushed_or_popped = instr.stack_pointer_increment();
    if pushed_or_popped != 0 {
        return Some(pushed_or_popped.into());
    }
    let immediate = instr.op_count() == 2
        && instr.op0_kind() == OpKind::Register
        && instr.op0_register() == Register::RSP
        && matches!(
            instr.op1_kind(),
            OpKind::Immediate8to64 | OpKind::Immediate32to64
        );
    match instr.mnemonic() {
        Mnemonic::Sub if immediate => Some(-(instr.immediate(1) as i64)),
        Mnemonic::Add if immediate => Some(instr.immediate(1) as i64),
        Mnemonic::Lea
            if instr.op0_register() == Register::RSP
                && instr.memory_base() == Register::RSP
                && instr.memory_index() == Register::None =>
        {
            Some(instr.memory_displacement64() as i64)
        }
        _ => None,
    }
}

/// Addresses that direct jumps inside the function land on: a probe there would also fire on
/// paths that did not come from the entry.
fn branch_targets(code: &[u8], func_vaddr: u64) -> Vec<u64> {
    Decoder::with_ip(64, code, func_vaddr, DecoderOptions::NONE)
        .into_iter()
        .filter(|i| {
            matches!(
                i.flow_control(),
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
            )
        })
        .map(|i| i.near_branch_target())
        .collect()
}

fn text(instr: &Instruction) -> String {
    let mut formatter = GasFormatter::new();
    formatter.options_mut().set_uppercase_hex(false);
    formatter.options_mut().set_branch_leading_zeros(false);
    let mut out = String::new();
    formatter.format(instr, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects;
    use std::path::Path;

    const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";
    const BASE: u64 = 0x1000;

    fn at(code: &[u8], regs: &[Reg]) -> u64 {
        choose(code, BASE, regs).offset
    }

    #[test]
    fn test_then_je_is_probed_at_the_je() {
        // test %rdi,%rdi; je +0x10; push %rbp; ...
        let code = [0x48, 0x85, 0xff, 0x0f, 0x84, 0x10, 0, 0, 0, 0x55, 0xc3];
        let p = choose(&code, BASE, &ARG_REGS[..1]);
        assert_eq!(p.offset, 3, "{}", p.reason);
        assert!(p.reason.contains("je"), "{}", p.reason);
    }

    #[test]
    fn an_emulated_entry_stays_at_zero() {
        // push %r12 ; push %rbp
        assert_eq!(at(&[0x41, 0x54, 0x55, 0xc3], &ARG_REGS), 0);
        // nop ; mov %rdi,%rax
        assert_eq!(at(&[0x90, 0x48, 0x89, 0xf8, 0xc3], &ARG_REGS), 0);
    }

    #[test]
    fn a_write_to_a_read_argument_stops_the_walk() {
        // mov %rsi,%rdi ; je
        let code = [0x48, 0x89, 0xf7, 0x74, 0x00, 0xc3];
        let p = choose(&code, BASE, &ARG_REGS[..1]);
        assert_eq!(p.offset, 0);
        assert!(p.reason.contains("RDI"), "{}", p.reason);
        // A partial write (mov $0, %edi) counts too.
        assert_eq!(at(&[0xbf, 0, 0, 0, 0, 0x74, 0x00, 0xc3], &ARG_REGS[..1]), 0);
        // ...but a register we do not read may change.
        assert_eq!(at(&code, &[Register::RSI]), 3);
    }

    #[test]
    fn implicit_writes_count() {
        // mul %rdx writes rdx:rax ; jo
        let code = [0x48, 0xf7, 0xe2, 0x70, 0x00, 0xc3];
        assert_eq!(at(&code, &ARG_REGS[..3]), 0);
        assert_eq!(at(&code, &ARG_REGS[..2]), 3);
    }

    #[test]
    fn the_walk_stops_at_a_syscall_or_branch() {
        // mov $0xb,%eax ; syscall ; jae
        let munmap = [0xb8, 0x0b, 0, 0, 0, 0x0f, 0x05, 0x73, 0x00, 0xc3];
        let p = choose(&munmap, BASE, &ARG_REGS[..2]);
        assert_eq!(p.offset, 0);
        assert!(p.reason.contains("syscall"), "{}", p.reason);
        // cmp ; jmp *%rax (indirect, not emulated) ; nop
        assert_eq!(at(&[0x48, 0x39, 0xf7, 0xff, 0xe0, 0x90], &ARG_REGS), 0);
    }

    #[test]
    fn single_stepped_nops_and_bad_prefixes_are_not_chosen() {
        // nopl 0(%rax) (0f 1f: single-stepped) ; ds je (refused by the kernel) ; push %rbx
        let code = [0x0f, 0x1f, 0x40, 0x00, 0x53, 0xc3];
        assert_eq!(at(&code, &ARG_REGS), 4);
        let code = [0x48, 0x85, 0xff, 0x3e, 0x74, 0x00, 0xc3];
        assert_eq!(at(&code, &ARG_REGS), 0);
        // xchg %eax,%r8d looks like a nop to the kernel: never chosen.
        assert_eq!(at(&[0x41, 0x90, 0xc3], &[]), 0);
        // push with REX.W is single-stepped; endbr64 too.
        assert_eq!(at(&[0x48, 0x53, 0x53], &[]), 2);
        assert_eq!(at(&[0xf3, 0x0f, 0x1e, 0xfa, 0x55], &ARG_REGS), 4);
    }

    #[test]
    fn stack_moves_are_reported_or_refused() {
        // sub $0x18,%rsp ; mov %rdi,(%rsp) ; call +0
        let code = [
            0x48, 0x83, 0xec, 0x18, 0x48, 0x89, 0x3c, 0x24, 0xe8, 0, 0, 0, 0, 0xc3,
        ];
        assert_eq!(at(&code, &ARG_REGS), 8);
        let p = choose_for_return(&code, BASE, &ARG_REGS);
        assert_eq!(p.offset, 0);
        assert!(p.reason.contains("rsp"), "{}", p.reason);
        // and $-16,%rsp cannot be followed.
        assert_eq!(at(&[0x48, 0x83, 0xe4, 0xf0, 0x55], &ARG_REGS), 0);
    }

    #[test]
    fn a_branch_landing_on_the_path_stops_the_walk() {
        // 0: test %rdi,%rdi ; 3: cmp %rsi,%rdi ; 6: je 3 (lands on +3, inside the path)
        let code = [0x48, 0x85, 0xff, 0x48, 0x39, 0xf7, 0x74, 0xfb, 0xc3];
        let p = choose(&code, BASE, &ARG_REGS);
        assert_eq!(p.offset, 0);
        assert!(p.reason.contains("lands at +3"), "{}", p.reason);
    }

    #[test]
    fn truncated_or_garbage_code_falls_back_to_the_entry() {
        assert_eq!(at(&[], &ARG_REGS), 0);
        assert_eq!(at(&[0x48, 0x85], &ARG_REGS), 0);
        assert_eq!(at(&[0x06, 0x74, 0x00], &ARG_REGS), 0);
    }

    /// Placements in this machine's glibc. The expectations hold for Debian glibc 2.36
    /// (`free` = test+je, `malloc`/`calloc`/`realloc` = push); other builds are only checked
    /// for soundness.
    #[test]
    fn glibc_allocator_functions() {
        let libc = Path::new(LIBC);
        if !libc.exists() {
            eprintln!("SKIP glibc_allocator_functions: no {LIBC}");
            return;
        }
        let is_236 = std::fs::read(libc)
            .unwrap()
            .windows(19)
            .any(|w| w == b"(Debian GLIBC 2.36-");
        let cases: [(&str, &[Reg], bool, u64); 13] = [
            ("malloc", &ARG_REGS[..1], true, 0),
            ("free", &ARG_REGS[..1], false, 3),
            ("calloc", &ARG_REGS[..2], true, 0),
            ("realloc", &ARG_REGS[..2], true, 0),
            ("reallocarray", &ARG_REGS[..3], true, 0),
            ("posix_memalign", &[Register::RDI, Register::RDX], true, 7),
            ("aligned_alloc", &[Register::RSI], true, 7),
            ("memalign", &[Register::RSI], true, 7),
            ("valloc", &ARG_REGS[..1], true, 7),
            ("pvalloc", &ARG_REGS[..1], true, 7),
            ("mmap", &[Register::RSI, Register::RCX], true, 10),
            ("mremap", &[Register::RDI, Register::RDX], true, 0),
            ("munmap", &ARG_REGS[..2], false, 0),
        ];
        for (name, regs, returns, expected) in cases {
            let f = objects::function_code(libc, name, &[]).unwrap();
            let p = if returns {
                choose_for_return(&f.bytes, f.vaddr, regs)
            } else {
                choose(&f.bytes, f.vaddr, regs)
            };
            eprintln!("{name}: +{} {}", p.offset, p.reason);
            assert!(p.offset < f.bytes.len() as u64);
            if is_236 {
                assert_eq!(p.offset, expected, "{name}: {}", p.reason);
            }
        }
    }

    #[test]
    fn missing_symbols_and_files_are_errors() {
        let err =
            objects::function_code(Path::new("/nonexistent/lib.so"), "free", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/lib.so"));
        if Path::new(LIBC).exists() {
            let err =
                objects::function_code(Path::new(LIBC), "no_such_function_here", &[]).unwrap_err();
            assert!(
                err.to_string()
                    .contains("no function no_such_function_here")
            );
        }
    }
}
