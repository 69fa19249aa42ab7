//! The target's memory as read during one owner walk: 64 KiB chunks, each read once with
//! process_vm_readv and kept, so walking a million small objects costs a few thousand
//! system calls rather than millions. The target keeps running: what is read may be stale
//! or torn, so every caller checks what it gets (types, bounds), and `fresh` reads again.

use std::{cell::RefCell, collections::HashMap};

use anyhow::{Result, bail};

use crate::python::Memory;

const CHUNK: u64 = 64 << 10;

pub struct Pages<'a> {
    memory: &'a Memory,
    /// Chunk address → its bytes; `None`: not readable whole (read such bytes directly).
    chunks: RefCell<HashMap<u64, Option<Box<[u8]>>>>,
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
                self.fresh(at, out)?;
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

    /// Copies `out` from the chunk at `chunk` (reading it first); false: not readable whole.
    fn copy_chunk(&self, chunk: u64, at: u64, out: &mut [u8]) -> bool {
        let mut chunks = self.chunks.borrow_mut();
        if !chunks.contains_key(&chunk) {
            if chunks.len() as u64 * CHUNK >= self.budget {
                chunks.clear();
                self.stats.borrow_mut().resets += 1;
            }
            let mut bytes = vec![0u8; CHUNK as usize].into_boxed_slice();
            let whole = self.fresh(chunk, &mut bytes).is_ok();
            chunks.insert(chunk, whole.then_some(bytes));
        }
        match chunks.get(&chunk) {
            Some(Some(bytes)) => {
                let from = (at - chunk) as usize;
                out.copy_from_slice(&bytes[from..from + out.len()]);
                true
            }
            _ => false,
        }
    }
}
