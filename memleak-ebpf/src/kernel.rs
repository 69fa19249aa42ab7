//! Kernel mode (no -p, as BCC): the kmem and percpu tracepoints, with kernel stacks. Field
//! offsets come from userspace (`KERNEL_LAYOUT`), read from the tracepoints' format files.
//! Kernel stacks are stored by content in `STACKS`, as user stacks are: the kernel's own
//! stack-id map loses a stack whenever two hash to one bucket.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_stack},
    macros::tracepoint,
    programs::TracePointContext,
};
use memleak_common::{
    AllocKind, KernelLayout, MAX_NATIVE_FRAMES, PAGE_KEY_TAG, named,
    names::{globals, programs},
};

use crate::{
    PAGE_SIZE, TARGET_TGID,
    bookkeeping::{Table, release, stack_id, store_as, wanted},
    global,
    maps::{ALLOCS, KSTACK},
    process, unwind,
};

#[unsafe(no_mangle)]
static KERNEL_LAYOUT: KernelLayout = KernelLayout {
    kmalloc_ptr: 0,
    kmalloc_bytes: 0,
    kfree_ptr: 0,
    cache_alloc_ptr: 0,
    cache_alloc_bytes: 0,
    cache_free_ptr: 0,
    page_alloc_pfn: 0,
    page_alloc_order: 0,
    page_free_pfn: 0,
    page_free_order: 0,
    percpu_alloc_ptr: 0,
    percpu_alloc_bytes: 0,
    percpu_free_ptr: 0,
    _pad: 0,
};

/// The kernel stack of the current tracepoint hit, stored by content; `Err`: −errno.
#[inline(always)]
fn kernel_stack(ctx: &TracePointContext) -> Result<i64, i32> {
    const BYTES: u32 = (MAX_NATIVE_FRAMES * 8) as u32;
    let rec = KSTACK.get_ptr_mut(0).ok_or(-1)?;
    unsafe {
        let got = bpf_get_stack(ctx.as_ptr(), (*rec).native.as_mut_ptr() as *mut _, BYTES, 0);
        if got < 0 {
            return Err(got as i32);
        }
        (*rec).native_len = (got / 8) as u32;
        (*rec).python_len = 0;
        (*rec).python_dropped = 0;
        // A full buffer may have cut the outermost frames off.
        (*rec).truncated = (got as u32 == BYTES) as u32;
    }
    unwind::store(rec)
}

#[inline(always)]
pub(crate) fn field<T>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    unsafe { ctx.read_at::<T>(offset as usize) }.ok()
}

#[inline(always)]
fn layout() -> KernelLayout {
    global(&KERNEL_LAYOUT)
}

#[inline(always)]
fn allocated(ctx: &TracePointContext, kind: AllocKind, key: Option<u64>, size: Option<u64>) -> u32 {
    let (Some(key), Some(size)) = (key, size) else {
        return 0;
    };
    let tgid = global(&TARGET_TGID);
    if key == 0 || (tgid != 0 && (bpf_get_current_pid_tgid() >> 32) as u32 != tgid) || !wanted(size)
    {
        return 0;
    }
    // Kernel mode has no slots: its counts go to row 0 (and, for frees, where the key's
    // high bits fall); userspace adds up every row.
    let p = process::current();
    let id = stack_id(p.slot, kernel_stack(ctx));
    store_as(p, Table::Map(&ALLOCS), key, size, kind, id, 0);
    0
}

fn freed(key: Option<u64>, kind: AllocKind) -> u32 {
    if let Some(key) = key.filter(|&k| k != 0) {
        release(Table::Map(&ALLOCS), key, kind);
    }
    0
}

#[tracepoint]
pub fn kmalloc(ctx: TracePointContext) -> u32 {
    let l = layout();
    let (ptr, bytes) = (field(&ctx, l.kmalloc_ptr), field(&ctx, l.kmalloc_bytes));
    allocated(&ctx, AllocKind::Kmalloc, ptr, bytes)
}

#[tracepoint]
pub fn kfree(ctx: TracePointContext) -> u32 {
    freed(field(&ctx, layout().kfree_ptr), AllocKind::Kfree)
}

#[tracepoint]
pub fn kmem_cache_alloc(ctx: TracePointContext) -> u32 {
    let l = layout();
    let (ptr, bytes) = (
        field(&ctx, l.cache_alloc_ptr),
        field(&ctx, l.cache_alloc_bytes),
    );
    allocated(&ctx, AllocKind::KmemCacheAlloc, ptr, bytes)
}

#[tracepoint]
pub fn kmem_cache_free(ctx: TracePointContext) -> u32 {
    freed(
        field(&ctx, layout().cache_free_ptr),
        AllocKind::KmemCacheFree,
    )
}

#[inline(always)]
fn page_key(pfn: Option<u64>) -> Option<u64> {
    pfn.map(|p| p | PAGE_KEY_TAG)
}

#[tracepoint]
pub fn mm_page_alloc(ctx: TracePointContext) -> u32 {
    let l = layout();
    let order: Option<u32> = field(&ctx, l.page_alloc_order);
    let size = order.filter(|&o| o < 32).map(|o| global(&PAGE_SIZE) << o);
    allocated(
        &ctx,
        AllocKind::PageAlloc,
        page_key(field(&ctx, l.page_alloc_pfn)),
        size,
    )
}

#[tracepoint]
pub fn mm_page_free(ctx: TracePointContext) -> u32 {
    freed(
        page_key(field(&ctx, layout().page_free_pfn)),
        AllocKind::PageFree,
    )
}

#[tracepoint]
pub fn percpu_alloc_percpu(ctx: TracePointContext) -> u32 {
    let l = layout();
    let (ptr, bytes) = (
        field(&ctx, l.percpu_alloc_ptr),
        field(&ctx, l.percpu_alloc_bytes),
    );
    allocated(&ctx, AllocKind::PercpuAlloc, ptr, bytes)
}

#[tracepoint]
pub fn percpu_free_percpu(ctx: TracePointContext) -> u32 {
    freed(field(&ctx, layout().percpu_free_ptr), AllocKind::PercpuFree)
}

named!(
    KERNEL_LAYOUT = globals::KERNEL_LAYOUT,
    kmalloc = programs::KMALLOC,
    kfree = programs::KFREE,
    kmem_cache_alloc = programs::KMEM_CACHE_ALLOC,
    kmem_cache_free = programs::KMEM_CACHE_FREE,
    mm_page_alloc = programs::MM_PAGE_ALLOC,
    mm_page_free = programs::MM_PAGE_FREE,
    percpu_alloc_percpu = programs::PERCPU_ALLOC_PERCPU,
    percpu_free_percpu = programs::PERCPU_FREE_PERCPU,
);
