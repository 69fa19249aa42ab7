//! pymalloc's arenas split by what is in them. An arena is mapped by whichever allocation
//! found no free pool, so a line that churns small objects maps arenas that another line's
//! kept objects then fill: blaming the whole arena on the first line is wrong. Each arena's
//! pool headers say how many bytes are in use; each object the walk found in an arena goes
//! to the stack that allocated its container's storage (a list's item array, a dict's
//! table), the rest in use stays with the arena's stack, and free pools go to no one.

use foldhash::{HashMap, HashMapExt};
use serde::Serialize;

use super::{Block, pages::Pages, python::Walk};

/// `struct pool_header` (3.8-3.13): `ref.count` at 0, `arenaindex` at 32, `szidx` at 36.
const POOL_HEADER: u64 = 48;
/// Size classes are multiples of 16 bytes up to 512.
const ALIGNMENT: u64 = 16;
const SIZE_CLASSES: u32 = 32;
/// Containers climbed from an object to one whose storage is a tracked block.
const MAX_HOLDER_STEPS: usize = 8;

/// The size of the blocks pymalloc maps for its arenas under 3.`minor`.
pub fn arena_size(minor: u8) -> u64 {
    geometry(minor).0
}

/// (arena, pool) sizes of 64-bit builds: 3.10 grew them (with the radix tree) from 256 KiB
/// and 4 KiB to 1 MiB and 16 KiB.
fn geometry(minor: u8) -> (u64, u64) {
    if minor >= 10 {
        (1 << 20, 16 << 10)
    } else {
        (256 << 10, 4 << 10)
    }
}

/// The arenas among the blocks, and who keeps their bytes.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Pools {
    pub arenas: u64,
    pub arena_bytes: u64,
    /// Bytes in blocks pymalloc handed out, by the pools' own counts.
    pub used_bytes: u64,
    /// Of those, bytes of objects the walk found and gave to a stack.
    pub found_bytes: u64,
    /// Free pools and free blocks in used pools: pymalloc keeps them mapped, no line holds
    /// them.
    pub free_bytes: u64,
    /// Blocks of an arena's size whose pool headers did not read as pymalloc's.
    pub not_arenas: u64,
    /// Per stack that maps arenas or has objects in them.
    pub stacks: Vec<PoolShare>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PoolShare {
    pub stack_id: i64,
    /// Bytes of the arenas this stack's allocations mapped.
    pub arena_bytes: u64,
    /// pymalloc bytes this stack keeps: objects in any arena held by its containers, plus
    /// bytes in use in its own arenas that no found object accounts for.
    pub kept_bytes: u64,
}

impl PoolShare {
    /// What the stack holds with the arenas split: its `final_bytes` less the arenas it
    /// mapped, plus what it keeps in arenas.
    pub fn attributed(&self, final_bytes: u64) -> u64 {
        final_bytes.saturating_sub(self.arena_bytes) + self.kept_bytes
    }
}

/// Splits the arenas among the walk's blocks; gives each found object in one to its
/// holder's stack (rewriting the target's bytes, so the owners say the same). `None`: no
/// arena among the blocks.
pub(super) fn split(walk: &mut Walk) -> Option<Pools> {
    let (arena_size, pool_size) = geometry(walk.minor);
    let mut pools = Pools::default();
    let mut used: HashMap<u64, (Block, u64)> = HashMap::new();
    for b in walk.blocks.iter().filter(|b| b.size == arena_size) {
        match used_bytes(&walk.pages, b, pool_size) {
            Some(n) => {
                used.insert(b.addr, (*b, n));
            }
            None => pools.not_arenas += 1,
        }
    }
    if used.is_empty() {
        return None;
    }
    let mut kept: HashMap<i64, (u64, u64)> = HashMap::new();
    let mut found: HashMap<u64, u64> = HashMap::new();
    for (obj, to, size, arena) in holders(walk, &used) {
        kept.entry(to).or_default().1 += size;
        *found.entry(arena).or_default() += size;
        if let Some(t) = walk.targets.get_mut(&obj) {
            t.bytes[0].0 = to;
        }
    }
    for (addr, (b, in_use)) in &used {
        let found = found.get(addr).copied().unwrap_or(0);
        let share = kept.entry(b.stack_id).or_default();
        share.0 += b.size;
        share.1 += in_use.saturating_sub(found);
        pools.arenas += 1;
        pools.arena_bytes += b.size;
        pools.used_bytes += in_use.max(&found);
        pools.found_bytes += found;
    }
    pools.free_bytes = pools.arena_bytes - pools.used_bytes.min(pools.arena_bytes);
    pools.stacks = kept
        .into_iter()
        .map(|(stack_id, (arena_bytes, kept_bytes))| PoolShare {
            stack_id,
            arena_bytes,
            kept_bytes,
        })
        .collect();
    pools
        .stacks
        .sort_by_key(|s| (std::cmp::Reverse(s.kept_bytes), s.stack_id));
    Some(pools)
}

/// Every found object that lies in an arena: (object, the stack it goes to, its bytes, the
/// arena's address).
fn holders(walk: &Walk, arenas: &HashMap<u64, (Block, u64)>) -> Vec<(u64, i64, u64, u64)> {
    walk.targets
        .iter()
        .filter_map(|(&obj, t)| {
            let (home, size) = t.home?;
            arenas.contains_key(&home.addr).then(|| {
                let to = holder_stack(walk, obj, arenas).unwrap_or(home.stack_id);
                (obj, to, size, home.addr)
            })
        })
        .collect()
}

/// The stack that allocated the storage of the nearest container holding `obj` (itself
/// first): a list's item array, a dict's table, when that is a tracked block outside the
/// arenas.
fn holder_stack(walk: &Walk, obj: u64, arenas: &HashMap<u64, (Block, u64)>) -> Option<i64> {
    let mut node = obj;
    for _ in 0..MAX_HOLDER_STEPS {
        let storage = walk
            .buffer_blocks(node)
            .into_iter()
            .find(|b| !arenas.contains_key(&b.addr));
        if let Some(b) = storage {
            return Some(b.stack_id);
        }
        node = walk.parents.get(&node)?.first().addr;
    }
    None
}

/// Bytes in use in the arena `b` by its pool headers; `None` when a header in use does not
/// read as pymalloc's (not an arena, or torn).
fn used_bytes(pages: &Pages, b: &Block, pool_size: u64) -> Option<u64> {
    let mut used = 0;
    let mut index = None;
    let end = b.addr.checked_add(b.size)?;
    let mut at = b.addr.next_multiple_of(pool_size);
    while at + pool_size <= end {
        let mut h = [0u8; POOL_HEADER as usize];
        pages.read(at, &mut h).ok()?;
        let word = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let (count, arena_index, class) = (word(0), word(32), word(36));
        if count > 0 {
            let block = (class as u64 + 1) * ALIGNMENT;
            if class >= SIZE_CLASSES || count as u64 * block > pool_size - POOL_HEADER {
                return None;
            }
            if *index.get_or_insert(arena_index) != arena_index {
                return None;
            }
            used += count as u64 * block;
        }
        at += pool_size;
    }
    Some(used)
}
