//! Taking a map out of the loaded BPF object: each map has one owner in userspace, which
//! takes it by its name in `memleak_common::names::maps`.

use anyhow::{Context, Result};
use aya::{Ebpf, maps::Map};

pub fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("BPF object lacks map {name}"))
}
