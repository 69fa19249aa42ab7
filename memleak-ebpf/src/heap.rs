//! User mode's outstanding heap blocks, in `HEAP`: an open-addressing table in an array map
//! (layout and slot states in `memleak_common::heap`). An array lookup is inlined by the
//! verifier, while a hash map's update and delete are helper calls, which cost ≈200 and
//! ≈70 ns per call on this machine kind (every kernel return pays the SRSO return thunk):
//! the table saves ≈300 ns of a malloc/free pair. Userspace reads it through mmap.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::{read_volatile, write_volatile},
};

use memleak_common::{
    AllocInfo, HeapSlot,
    heap::{BUSY, DEFAULT_BITS, EMPTY, FREED, PROBES, first_slot},
    named,
    names::globals,
};

use crate::{global, maps::HEAP};

/// log2 of `HEAP`'s entries.
#[unsafe(no_mangle)]
static HEAP_BITS: u32 = DEFAULT_BITS;

named!(HEAP_BITS = globals::HEAP_BITS);

/// The `probe`th slot of `addr`'s run.
#[inline(always)]
fn slot(addr: u64, probe: u32) -> Option<*mut HeapSlot> {
    let bits = global(&HEAP_BITS);
    let mask = ((1u64 << bits) - 1) as u32;
    HEAP.get_ptr_mut(first_slot(addr, bits).wrapping_add(probe) & mask)
}

/// Compare-and-swap of a slot's address; false when another CPU changed it first. SeqCst and
/// the volatile accesses around it keep the compiler from moving the slot's `info` across it
/// (the instruction is the same for every ordering).
#[inline(always)]
fn swap(s: *mut HeapSlot, old: u64, new: u64) -> bool {
    let (_, done) = unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*s).addr,
            old,
            new,
        )
    };
    done
}

/// Stores the block at `addr`. `Ok(Some(old))`: a block already there (its free was never
/// seen) was replaced; `Err`: no free slot in its run.
#[inline(always)]
pub(crate) fn put(addr: u64, info: AllocInfo) -> Result<Option<AllocInfo>, ()> {
    // Twice: another CPU may take the free slot between the search and the swap.
    for _ in 0..2 {
        let mut free = None;
        for probe in 0..PROBES {
            let Some(s) = slot(addr, probe) else {
                break;
            };
            let seen = unsafe { read_volatile(&raw const (*s).addr) };
            if seen == addr {
                let old = unsafe { read_volatile(&raw const (*s).info) };
                unsafe { write_volatile(&raw mut (*s).info, info) };
                return Ok(Some(old));
            }
            if (seen == EMPTY || seen == FREED) && free.is_none() {
                free = Some((probe, seen));
            }
            if seen == EMPTY {
                break;
            }
        }
        let Some((probe, seen)) = free else {
            return Err(());
        };
        let Some(s) = slot(addr, probe) else {
            return Err(());
        };
        if swap(s, seen, BUSY) {
            // The address last: readers take a slot whose address they know as complete.
            unsafe {
                write_volatile(&raw mut (*s).info, info);
                write_volatile(&raw mut (*s).addr, addr);
            }
            return Ok(None);
        }
    }
    Err(())
}

/// Takes the block at `addr` out; `None` when it is not tracked (or another CPU took it: a
/// double free).
#[inline(always)]
pub(crate) fn take(addr: u64) -> Option<AllocInfo> {
    for probe in 0..PROBES {
        let s = slot(addr, probe)?;
        let seen = unsafe { read_volatile(&raw const (*s).addr) };
        if seen == addr {
            let info = unsafe { read_volatile(&raw const (*s).info) };
            return swap(s, addr, FREED).then_some(info);
        }
        if seen == EMPTY {
            return None;
        }
    }
    None
}
