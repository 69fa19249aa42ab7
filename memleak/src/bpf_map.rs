//! Taking a map out of the loaded BPF object: each map has one owner in userspace, which
//! takes it by its name in `memleak_common::names::maps`. A map with per-process entries is
//! opened by each traced process instead (a handle of its own on the same map).

use std::os::fd::AsFd;

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Map, MapData},
};

pub fn take(ebpf: &mut Ebpf, name: &str) -> Result<Map> {
    ebpf.take_map(name)
        .with_context(|| format!("BPF object lacks map {name}"))
}

/// Another handle on a map left in the object: each traced process owns its entries (its
/// slot's) of the per-process maps through one.
pub fn open(ebpf: &Ebpf, name: &str) -> Result<Map> {
    let data = match ebpf.map(name) {
        Some(Map::Array(d) | Map::HashMap(d) | Map::LruHashMap(d) | Map::PerCpuArray(d)) => d,
        Some(_) => bail!("map {name} is not an array or a hash map"),
        None => bail!("BPF object lacks map {name}"),
    };
    let fd = data
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .with_context(|| format!("duplicating map {name}"))?;
    Ok(Map::from_map_data(MapData::from_fd(fd)?)?)
}
