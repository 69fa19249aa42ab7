//! A BPF array map created `BPF_F_MMAPABLE`, mapped into this process: a bulk read or write is
//! a memory access, not one map syscall per entry.

use std::{
    os::fd::{AsFd, AsRawFd},
    ptr,
};

use anyhow::{Context, Result, bail};
use aya::maps::{Map, MapData};

pub struct MappedArray<T> {
    ptr: *mut T,
    len: usize,
    /// Keeps the map (and so the mapping) alive.
    _map: MapData,
}

// The mapping is plain shared memory owned by `_map`.
unsafe impl<T> Send for MappedArray<T> {}

impl<T> MappedArray<T> {
    /// Maps `map` (`what` names it in errors), which must be an array of `T`.
    pub fn new(map: Map, what: &str) -> Result<MappedArray<T>> {
        let Map::Array(map) = map else {
            bail!("the {what} is not an array map");
        };
        let info = map.info()?;
        if info.value_size() as usize != size_of::<T>() {
            bail!("the {what}'s entries are not {} bytes", size_of::<T>());
        }
        let len = info.max_entries() as usize;
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len * size_of::<T>(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("mapping the {what}"));
        }
        Ok(MappedArray {
            ptr: p.cast(),
            len,
            _map: map,
        })
    }

    pub fn capacity(&self) -> usize {
        self.len
    }

    /// Entry `index`, or `None` past the end. The BPF programs write it concurrently.
    pub fn entry(&self, index: usize) -> Option<*mut T> {
        (index < self.len).then(|| unsafe { self.ptr.add(index) })
    }
}

impl<T> Drop for MappedArray<T> {
    fn drop(&mut self) {
        unsafe { libc::munmap(self.ptr.cast(), self.len * size_of::<T>()) };
    }
}
