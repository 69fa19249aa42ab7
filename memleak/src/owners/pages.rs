//! The target's memory as read during one owner walk: 64 KiB chunks, each read once with
//! process_vm_readv and kept, so walking a million small objects costs a few thousand
//! system calls rather than millions. The target keeps running: what is read may be stale
//! or torn, so every caller checks what it gets (types, bounds), and `fresh` reads again.

use std::cell::RefCell;

use foldhash::{HashMap, HashMapExt};

use anyhow::{Result, bail};

use crate::python::Memory;

const CHUNK: u64 = 64 << 10;
const PAGE: usize = 4096;

/// 16 pages of the target and which of them could be read.
struct Chunk {
    bytes: Box<[u8]>,
    readable: u16,
}

pub struct Pages<'a> {
    memory: &'a Memory,
    /// Chunk address → its bytes.
    chunks: RefCell<HashMap<u64, Chunk>>,
    /// The most bytes kept; past it the cache starts over (counted in `resets`).
    budget: u64,
    stats: RefCell<Stats>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub bytes_read: u64,
    pub reads: u64,
    pub resets: u64,
}

impl<'a> Pages<'a> {
    pub fn new(memory: &'a Memory, budget: u64) -> Pages<'a> {
        Pages {
            memory,
            chunks: RefCell::new(HashMap::new()),
            budget,
            stats: RefCell::new(Stats::default()),
        }
    }

    pub fn stats(&self) -> Stats {
        *self.stats.borrow()
    }

    /// Fills `buf` from `addr`, through the kept chunks.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let end = addr
            .checked_add(buf.len() as u64)
            .filter(|_| buf.len() as u64 <= 16 * CHUNK);
        let Some(end) = end else {
            bail!("reading {} bytes at {addr:#x}: out of range", buf.len());
        };
        let mut at = addr;
        while at < end {
            let chunk = at - at % CHUNK;
            let upto = end.min(chunk + CHUNK);
            let out = &mut buf[(at - addr) as usize..(upto - addr) as usize];
            if !self.copy_chunk(chunk, at, out) {
                bail!("reading {} bytes at {addr:#x}: not mapped", buf.len());
            }
            at = upto;
        }
        Ok(())
    }

    /// Reads straight from the target, bypassing what was kept: to confirm a finding.
    pub fn fresh(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        let mut stats = self.stats.borrow_mut();
        stats.reads += 1;
        stats.bytes_read += buf.len() as u64;
        drop(stats);
        self.memory.read(addr, buf)
    }

    pub fn u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn fresh_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0; 8];
        self.fresh(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Copies `out` from the chunk at `chunk` (reading it first); false: some of `out` is
    /// in a page that could not be read.
    fn copy_chunk(&self, chunk: u64, at: u64, out: &mut [u8]) -> bool {
        let mut chunks = self.chunks.borrow_mut();
        if !chunks.contains_key(&chunk) {
            if chunks.len() as u64 * CHUNK >= self.budget {
                chunks.clear();
                self.stats.borrow_mut().resets += 1;
            }
            chunks.insert(chunk, self.read_chunk(chunk));
        }
        let Some(c) = chunks.get(&chunk) else {
            return false;
        };
        let from = (at - chunk) as usize;
        let pages = from / PAGE..(from + out.len()).div_ceil(PAGE);
        if !pages.clone().all(|p| c.readable & (1 << p) != 0) {
            return false;
        }
        out.copy_from_slice(&c.bytes[from..from + out.len()]);
        true
    }

    /// A chunk in one read; if part of it is not mapped (arenas are 4 KiB aligned, not
    /// 64 KiB), page by page.
    fn read_chunk(&self, chunk: u64) -> Chunk {
        let mut bytes = vec![0u8; CHUNK as usize].into_boxed_slice();
        if self.fresh(chunk, &mut bytes).is_ok() {
            return Chunk {
                bytes,
                readable: u16::MAX,
            };
        }
        let mut readable = 0;
        for (p, page) in bytes.chunks_mut(PAGE).enumerate() {
            if self.fresh(chunk + (p * PAGE) as u64, page).is_ok() {
                readable |= 1 << p;
            }
        }
        Chunk { bytes, readable }
    }
}
