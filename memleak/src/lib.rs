//! The parts of memleak that read what a target or the system hands it: `/proc/PID/maps`,
//! ELF symbols and DWARF, `.eh_frame`, CPython's code objects in target memory. A library, so
//! the fuzz targets in `fuzz/` drive the very code the `memleak` binary runs.

pub mod binding;
pub mod bpf_map;
pub mod mapped;
pub mod model;
pub mod objects;
pub mod owners;
pub mod procmaps;
pub mod python;
mod sections;
pub mod symbolize;
pub mod target_files;
pub mod unwind;
