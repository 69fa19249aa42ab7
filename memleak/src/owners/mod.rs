//! Who holds the memory of the largest stacks, read from the live process from outside: no
//! stop, no code injected, only process_vm_readv. For a Python target, the objects whose
//! memory a stack's blocks are, and the chain of references from a root (a module's
//! globals, a class attribute, a closure, an lru_cache) that keeps them alive; pymalloc's
//! arenas split by what is in them. For native blocks, what still points to them (a global,
//! a thread's stack, another block), or nothing: lost.

mod chain;
pub mod each;
mod inline;
mod live_stack;
pub mod native;
mod pages;
pub mod pools;
pub mod python;

use serde::Serialize;

/// A block the tracer saw allocated and not freed, with the stack that allocated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    pub addr: u64,
    pub size: u64,
    pub stack_id: i64,
}

/// The blocks of the stacks asked about, sorted by address, for "which block holds this
/// address".
pub struct Blocks(Vec<Block>);

impl Blocks {
    pub fn new(mut blocks: Vec<Block>) -> Blocks {
        blocks.sort_by_key(|b| b.addr);
        Blocks(blocks)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Block> {
        self.0.iter()
    }

    /// The blocks that overlap [start, end), in address order.
    pub fn overlapping(&self, start: u64, end: u64) -> &[Block] {
        let from = self.0.partition_point(|b| b.addr + b.size <= start);
        let to = self.0.partition_point(|b| b.addr < end).max(from);
        &self.0[from..to]
    }

    /// The block whose bytes include `addr`.
    pub fn containing(&self, addr: u64) -> Option<&Block> {
        let i = self.0.partition_point(|b| b.addr <= addr).checked_sub(1)?;
        let b = &self.0[i];
        (addr - b.addr < b.size).then_some(b)
    }
}

/// Some of a stack's memory and what holds it: "59 × bytearray in list `_leak_store` of
/// module `__main__`".
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Owner {
    pub stack_id: i64,
    /// The type of the objects whose memory the blocks are (`bytearray`, `tuple`).
    pub type_name: String,
    pub count: u64,
    /// Bytes of the stack's blocks these objects account for.
    pub bytes: u64,
    /// Where they are held, in words ("in list `_leak_store` of module `__main__`").
    pub held_by: String,
    /// What kind of root holds them.
    pub root: Root,
    /// One line on what to change, for the patterns that have one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Root {
    ModuleGlobal,
    ClassAttribute,
    Closure,
    LruCache,
    /// Held by containers that no root the walk reads refers to (a running frame's local
    /// variable, a C extension's reference).
    Unrooted,
    /// Native blocks: referenced from a global, a thread's stack, another tracked block,
    /// memory memleak did not see allocated; or from nowhere (lost).
    Global,
    ThreadStack,
    NativeBlock,
    Untracked,
    Lost,
}

/// How much the walk read and what it left out.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Scan {
    /// GC-tracked objects listed by the interpreter's generations, and how many were read.
    pub gc_objects: u64,
    pub objects_read: u64,
    /// Blocks of the stacks asked about, and how many were found to be held by an object.
    pub blocks: u64,
    pub blocks_owned: u64,
    pub bytes_read: u64,
    pub read_calls: u64,
    pub elapsed_ms: u64,
    /// CPU time the walk took (the wall time is longer on a loaded machine).
    pub cpu_ms: u64,
    /// False when a bound stopped the walk early.
    pub complete: bool,
    /// What was skipped and why ("12 objects whose type could not be read").
    pub skipped: Vec<String>,
}

/// What the owner walk found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Findings {
    /// Largest first.
    pub owners: Vec<Owner>,
    /// pymalloc's arenas among the blocks, split by what is in them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pools: Option<pools::Pools>,
    pub scan: Scan,
    /// The conservative scan for native blocks' referrers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub native: Option<native::NativeScan>,
}

/// CPU time of the calling thread, in ms.
pub fn thread_cpu_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

impl Findings {
    /// The owners of one stack, largest first.
    pub fn of(&self, stack_id: i64) -> impl Iterator<Item = &Owner> {
        self.owners.iter().filter(move |o| o.stack_id == stack_id)
    }
}

#[cfg(test)]
mod tests;
