//! Unwind tables for walking native stacks without frame pointers: userspace turns each
//! object's `.eh_frame` into sorted [`UnwindRow`]s, the BPF walker looks them up by address.
//!
//! Addresses in rows are the object's own virtual addresses (ELF `p_vaddr` space); a
//! [`UnwindMapping`] says which runtime range of the target maps to which rows, and by how
//! much to shift (`bias`).

/// Rows in the shared row array (8 bytes each: 8 MiB). glibc has ≈24k rows, libpython3.11
/// ≈60k; a process with a few hundred libraries stays well below this.
pub const MAX_UNWIND_ROWS: u32 = 1 << 20;
/// Executable mappings per table generation. Userspace writes a whole new sorted table into
/// the half that BPF is not reading and then flips [`UnwindControl::base`].
pub const MAX_UNWIND_MAPPINGS: u32 = 1024;

/// How the CFA (the caller's stack pointer) is found; `UnwindRow::kind`.
pub mod cfa {
    /// CFA = rsp + offset.
    pub const RSP: u8 = 0;
    /// CFA = rbp + offset.
    pub const RBP: u8 = 1;
    /// A PLT entry: CFA = rsp + 8, or rsp + 16 once `pc & 15 >= offset` (after its push).
    pub const PLT: u8 = 2;
    /// No FDE covers this address: assume a frame-pointer frame.
    pub const NO_INFO: u8 = 3;
    /// The return address is undefined: the outermost frame (`_start`, thread start).
    pub const OUTERMOST: u8 = 4;
    /// A rule the walker cannot follow (signal frames, other DWARF expressions): stop here.
    pub const UNSUPPORTED: u8 = 5;
}

/// How the BPF walker unwinds; `UnwindControl::mode`.
pub mod mode {
    /// `.eh_frame` rows, frame pointers only where no row covers an address.
    pub const DWARF: u32 = 0;
    /// Frame pointers only (binaries built with `-fno-omit-frame-pointer`).
    pub const FRAME_POINTER: u32 = 1;
}

/// The unwind rule from `pc` up to the next row's `pc`. The return address is always at
/// CFA − 8 on x86-64 (rows where it is not are `UNSUPPORTED`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindRow {
    pub pc: u32,
    /// In 8-byte units (x86-64 CFA offsets are multiples of 8; frames reach 64 KiB), or the
    /// PLT threshold for `cfa::PLT`.
    pub cfa_offset: u16,
    /// Where the caller's rbp is saved, from the CFA in 8-byte units; 0: rbp is unchanged
    /// (CFA + 0 is the caller's own stack, so it never holds a saved register).
    pub rbp_offset: i8,
    /// One of [`cfa`].
    pub kind: u8,
}

/// One executable mapping of the target and its rows `[first_row, first_row + row_count)`.
/// `row_count == 0`: the object has no usable CFI, walk it with frame pointers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    /// Runtime address − bias = the object's own address, the space of `UnwindRow::pc`.
    pub bias: u64,
    pub first_row: u32,
    pub row_count: u32,
}

/// The single entry of `UNWIND_CONTROL`: which half of `UNWIND_MAPPINGS` is current.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindControl {
    /// 0 or `MAX_UNWIND_MAPPINGS`: index of the current table's first mapping.
    pub base: u32,
    /// Mappings in the current table, sorted by `start`.
    pub count: u32,
    /// One of [`mode`].
    pub mode: u32,
    /// Bumped by every publish (from 1): the walker's per-CPU row cache holds rows of one
    /// generation only, so a changed table never serves a stale row.
    pub generation: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    unsafe impl aya::Pod for UnwindRow {}
    unsafe impl aya::Pod for UnwindMapping {}
    unsafe impl aya::Pod for UnwindControl {}
}
