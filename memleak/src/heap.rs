//! User mode's `HEAP` table (layout in `memleak_common::heap`), read through mmap: a snapshot
//! is a scan of shared memory rather than one map lookup per slot.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr,
    sync::atomic::{AtomicU64, Ordering, fence},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Map, MapData};
use memleak_common::{
    AllocInfo, HeapSlot,
    heap::{BUSY, FREED, PROBES, first_slot},
};

pub struct HeapTable {
    slots: *mut HeapSlot,
    len: usize,
    bits: u32,
    /// Keeps the map (and so the mapping) alive.
    _map: MapData,
}

// The mapping is plain shared memory owned by `_map`.
unsafe impl Send for HeapTable {}

impl HeapTable {
    pub fn new(map: Map) -> Result<HeapTable> {
        let Map::Array(map) = map else {
            bail!("the heap table is not an array map");
        };
        let info = map.info()?;
        if info.value_size() as usize != size_of::<HeapSlot>() {
            bail!(
                "the heap table's slots are not {} bytes",
                size_of::<HeapSlot>()
            );
        }
        let len = info.max_entries() as usize;
        let bytes = len * size_of::<HeapSlot>();
        let slots = unsafe {
            libc::mmap(
                ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if slots == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the heap table");
        }
        Ok(HeapTable {
            slots: slots.cast(),
            len,
            bits: len.trailing_zeros(),
            _map: map,
        })
    }

    /// The slot's address word, shared with the BPF programs.
    fn addr(&self, index: usize) -> &AtomicU64 {
        // In bounds of a mapping this struct owns; `addr` is an aligned u64.
        unsafe { AtomicU64::from_ptr(&raw mut (*self.slots.add(index)).addr) }
    }

    /// The blocks stored now. A slot being written or freed while it is read is skipped: it
    /// shows in the next snapshot.
    pub fn blocks(&self) -> impl Iterator<Item = (u64, AllocInfo)> + '_ {
        (0..self.len).filter_map(|i| {
            let addr = self.addr(i).load(Ordering::Acquire);
            if addr <= BUSY {
                return None;
            }
            let info = unsafe { ptr::read_volatile(&raw const (*self.slots.add(i)).info) };
            fence(Ordering::Acquire);
            (self.addr(i).load(Ordering::Relaxed) == addr).then_some((addr, info))
        })
    }

    /// Takes the block at `addr` out, as its free would; false when it is not there.
    pub fn forget(&self, addr: u64) -> bool {
        let first = first_slot(addr, self.bits) as usize;
        (0..PROBES as usize).any(|probe| {
            let slot = self.addr((first + probe) & (self.len - 1));
            slot.compare_exchange(addr, FREED, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        })
    }
}

impl Drop for HeapTable {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.slots.cast(), self.len * size_of::<HeapSlot>()) };
    }
}
