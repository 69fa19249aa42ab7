//! User mode's `HEAP` table (layout in `memleak_common::heap`), read through mmap: a snapshot
//! is a scan of shared memory rather than one map lookup per slot.

use std::{
    ptr,
    sync::atomic::{AtomicU64, Ordering, fence},
};

use anyhow::Result;
use aya::maps::Map;
use memleak::mapped::MappedArray;
use memleak_common::{
    AllocInfo, HeapSlot,
    heap::{BUSY, FREED, PROBES, first_slot},
};

pub struct HeapTable {
    slots: MappedArray<HeapSlot>,
    bits: u32,
}

impl HeapTable {
    pub fn new(map: Map) -> Result<HeapTable> {
        let slots = MappedArray::new(map, "heap table")?;
        let bits = slots.capacity().trailing_zeros();
        Ok(HeapTable { slots, bits })
    }

    /// Slot `index`'s address word, which the BPF programs swap.
    fn addr(&self, index: usize) -> Option<&AtomicU64> {
        let slot = self.slots.entry(index)?;
        // An aligned u64 inside the mapping.
        Some(unsafe { AtomicU64::from_ptr(&raw mut (*slot).addr) })
    }

    /// The blocks stored now. A slot being written or freed while it is read is skipped: it
    /// shows in the next snapshot.
    pub fn blocks(&self) -> impl Iterator<Item = (u64, AllocInfo)> + '_ {
        (0..self.slots.capacity()).filter_map(|i| {
            let word = self.addr(i)?;
            let addr = word.load(Ordering::Acquire);
            if addr <= BUSY {
                return None;
            }
            let info = unsafe { ptr::read_volatile(&raw const (*self.slots.entry(i)?).info) };
            fence(Ordering::Acquire);
            (word.load(Ordering::Relaxed) == addr).then_some((addr, info))
        })
    }

    /// Takes the block at `addr` out, as its free would; false when it is not there.
    pub fn forget(&self, addr: u64) -> bool {
        let first = first_slot(addr, self.bits) as usize;
        let mask = self.slots.capacity() - 1;
        (0..PROBES as usize).any(|probe| {
            self.addr((first + probe) & mask).is_some_and(|word| {
                word.compare_exchange(addr, FREED, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            })
        })
    }
}
