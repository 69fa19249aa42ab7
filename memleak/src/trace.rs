//! `--trace`: every allocation and free as it happens, read from the BPF ring buffer.

use anyhow::Result;
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
};
use memleak_common::{AllocKind, TraceEvent, names::maps};
use tokio::io::unix::AsyncFd;

use crate::{bpf_map, collect::Collector, symbolize::format_frame};

pub struct Events {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl Events {
    pub fn new(ebpf: &mut Ebpf) -> Result<Events> {
        let map = bpf_map::take(ebpf, maps::EVENTS)?;
        // Safety: the ring buffer owns its fd and outlives the registration (both live in
        // `Events`).
        let ring = unsafe { AsyncFd::register(RingBuf::try_from(map)?) }
            .map_err(|e| anyhow::anyhow!("watching the trace ring buffer: {e}"))?;
        Ok(Events { ring })
    }

    /// Waits until events are ready.
    pub async fn readable(&mut self) -> Option<()> {
        let mut guard = self.ring.readable_mut().await.ok()?;
        guard.clear_ready();
        Some(())
    }

    /// Prints every pending event, with the innermost frame of allocations.
    pub fn print(&mut self, collector: &mut Collector) {
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<TraceEvent>() {
                continue;
            }
            let mut ev: TraceEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            ev.addr = collector.address(ev.addr);
            let kind = AllocKind::from_u32(ev.kind).map_or("?", AllocKind::symbol);
            let secs = ev.timestamp_ns as f64 / 1e9;
            match AllocKind::from_u32(ev.kind) {
                Some(AllocKind::Free | AllocKind::Munmap) => println!(
                    "{secs:.6} tid {} {kind}({:#x}) releases {} bytes",
                    ev.tid, ev.addr, ev.size
                ),
                _ => {
                    let site = collector
                        .stack(ev.stack_id)
                        .frames
                        .first()
                        .map(format_frame)
                        .unwrap_or_else(|| "[no stack]".into());
                    println!(
                        "{secs:.6} tid {} {kind}({}) = {:#x} from {site}",
                        ev.tid, ev.size, ev.addr
                    );
                }
            }
        }
    }
}
