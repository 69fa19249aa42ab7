//! The Python owner walk. The interpreter's GC generations list every container (list,
//! dict, tuple, set, module, class, cell, function, lru_cache wrapper); reading each one's
//! references gives who refers to whom. An object whose memory lies in one of the asked
//! blocks (the object itself, a bytearray's buffer, a list's item array, a dict's table) is
//! a target; `chain` then climbs its referrers to a root and says it in words.

use std::time::{Duration, Instant};

use foldhash::{HashMap, HashMapExt, HashSet, HashSetExt};

use anyhow::{Result, bail};

use super::{Block, Blocks, Findings, Scan, chain, inline, pages::Pages, pools};
use crate::python::{
    PythonRuntime,
    layout::{
        BYTEARRAY_BYTES, CELL_REF, DictTable, GC_GENERATION, GC_GENERATIONS, GC_HEAD, GC_PERMANENT,
        GcState, LRU_CACHE, Layout, MODULE_DICT, OB_SIZE, OB_TYPE, Objects, TYPE_BASICSIZE,
        TYPE_DICT, TYPE_ITEMSIZE,
    },
    read_str,
};

/// What one walk may spend.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_objects: u64,
    pub time: Duration,
    /// Target memory kept while walking.
    pub cache_bytes: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_objects: 5_000_000,
            time: Duration::from_secs(20),
            cache_bytes: 256 << 20,
        }
    }
}

/// More items than this in one container: not believed (a torn read).
const MAX_ITEMS: u64 = 1 << 24;
/// Referrers kept per object: enough to find a root past a frame's or a thread's own.
const MAX_PARENTS: usize = 4;
const TYPE_FLAGS_HAVE_GC: u64 = 1 << 14;
const TYPE_FLAGS_MANAGED_DICT: u64 = 1 << 4;
const TYPE_FLAGS_LIST: u64 = 1 << 25;
const TYPE_FLAGS_TUPLE: u64 = 1 << 26;
const TYPE_FLAGS_DICT: u64 = 1 << 29;
const TYPE_FLAGS_TYPE: u64 = 1 << 31;
/// `PyTypeObject.tp_dictoffset`, the last field read of a type.
const TYPE_DICTOFFSET: u64 = 288;
/// `PySetObject.mask` and `.table` (3.8-3.13).
const SET_MASK: u64 = 32;
const SET_TABLE: u64 = 40;
/// An object's refcount and type: no buffer pointer there.
const HEADER: usize = 16;
/// How much of an unknown type's fixed part is searched for buffer pointers.
const MAX_FOREIGN_FIXED: u64 = 256;
/// Where a managed `__dict__` pointer sits before the object (3.11+ pre-header).
const MANAGED_DICT_BEFORE: u64 = 24;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    List,
    Tuple,
    Dict,
    Set,
    Module,
    Type,
    Cell,
    Function,
    Lru,
    ByteArray,
    Int,
    Other,
}

pub(super) struct TypeInfo {
    pub name: String,
    pub kind: Kind,
    basicsize: u64,
    itemsize: u64,
    flags: u64,
    dictoffset: i64,
}

/// How an object is held by its referrer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Edge {
    Item,
    /// A dict's value under this key (a `str` object's address, or another key).
    Value(u64),
    Key,
    ModuleDict,
    ClassDict,
    Cell,
    Closure,
    Lru,
    InstanceDict,
    /// An instance's attribute kept in its inline values (3.11+), name not read.
    Attribute,
}

#[derive(Clone, Copy, Debug)]
pub(super) struct Parent {
    pub addr: u64,
    pub edge: Edge,
}

/// An object's referrers: most have one, kept without an allocation.
pub(super) struct Parents {
    first: Parent,
    more: Vec<Parent>,
}

impl Parents {
    pub fn iter(&self) -> impl Iterator<Item = &Parent> {
        std::iter::once(&self.first).chain(&self.more)
    }

    pub fn first(&self) -> &Parent {
        &self.first
    }
}

/// An object of a layout not known here, and the buffers it may own.
pub(super) struct Foreign {
    type_addr: u64,
    buffers: Vec<(u64, u64, Block)>,
}

/// An object whose memory lies in the asked blocks: per stack, how many bytes.
pub(super) struct Target {
    pub type_addr: u64,
    pub bytes: Vec<(i64, u64)>,
    /// The block the object lies in as one of many (a pymalloc arena), and its own bytes.
    pub home: Option<(Block, u64)>,
    /// A pointer field to read again before believing it (the buffer's owner field).
    check: Option<(u64, u64)>,
}

pub(super) struct Walk<'a> {
    pub pages: Pages<'a>,
    pub layout: &'a Layout,
    pub minor: u8,
    pub blocks: &'a Blocks,
    types: HashMap<u64, Option<TypeInfo>>,
    /// Containers to read: listed by the GC, or untracked ones (a dict or tuple of atomic
    /// values, which the GC stops tracking) found inside them.
    gc: HashSet<u64>,
    untracked: Vec<u64>,
    pub parents: HashMap<u64, Parents>,
    pub targets: HashMap<u64, Target>,
    /// Blocks already counted whole (a buffer has one owner).
    claimed: HashSet<u64>,
    /// Objects of layouts not known here that may own buffers (`foreign_candidates`),
    /// claimed after every known layout has claimed its own (`claim_foreign`).
    foreign: HashMap<u64, Foreign>,
    skipped: Skipped,
}

#[derive(Default)]
struct Skipped {
    bad_type: u64,
    unreadable: u64,
    too_large: u64,
    inline_attributes: u64,
    changed: u64,
    lists_cut: u64,
}

/// Finds what holds the memory of `blocks` in the interpreter `rt` runs.
pub fn find(rt: &PythonRuntime, blocks: &Blocks, limits: &Limits) -> Findings {
    let (started, cpu) = (Instant::now(), super::thread_cpu_ms());
    let (memory, layout, runtime) = rt.parts();
    let mut walk = Walk {
        pages: Pages::new(memory, limits.cache_bytes),
        layout,
        minor: rt.version.minor,
        blocks,
        types: HashMap::new(),
        gc: HashSet::new(),
        untracked: Vec::new(),
        parents: HashMap::new(),
        targets: HashMap::new(),
        claimed: HashSet::new(),
        foreign: HashMap::new(),
        skipped: Skipped::default(),
    };
    let listed = walk.gc_objects(runtime, limits.max_objects);
    let (read, unread) = walk.read_containers(listed.clone(), limits, started + limits.time);
    walk.claim_foreign();
    walk.confirm_targets();
    let pools = pools::split(&mut walk);
    let owners = chain::owners(&walk);
    let stats = walk.pages.stats();
    Findings {
        owners,
        pools,
        native: None,
        scan: Scan {
            gc_objects: listed.len() as u64,
            objects_read: read,
            blocks: blocks.len() as u64,
            blocks_owned: walk.blocks_owned().min(blocks.len() as u64),
            bytes_read: stats.bytes_read,
            read_calls: stats.reads,
            elapsed_ms: started.elapsed().as_millis() as u64,
            cpu_ms: super::thread_cpu_ms() - cpu,
            complete: unread == 0 && walk.skipped.lists_cut == 0,
            skipped: walk.skipped.said(unread),
        },
    }
}

impl Skipped {
    /// What the walk left out, in words ("12 objects whose type did not read as a type"),
    /// `unread` containers included.
    fn said(&self, unread: u64) -> Vec<String> {
        let lists_cut = "GC lists cut short (changed while read, or the object bound)";
        let inline = "instances whose inline attribute values (3.11+) did not read: not \
                      followed, so what only they hold is reported with no root";
        [
            (
                unread,
                "containers not read: the time or object bound ran out",
            ),
            (self.lists_cut, lists_cut),
            (self.bad_type, "objects whose type did not read as a type"),
            (
                self.unreadable,
                "containers whose contents could not be read",
            ),
            (self.too_large, "containers claiming more than 16 M items"),
            (self.inline_attributes, inline),
            (self.changed, "owners that changed when read again"),
        ]
        .into_iter()
        .filter(|&(n, _)| n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect()
    }
}

impl Walk<'_> {
    /// Reads the containers the GC `listed` and the untracked ones found in them, until the
    /// bounds: (containers read, containers left unread).
    fn read_containers(
        &mut self,
        mut queue: Vec<u64>,
        limits: &Limits,
        deadline: Instant,
    ) -> (u64, u64) {
        let mut read = 0u64;
        while let Some(obj) = queue.pop() {
            if read.is_multiple_of(4096) && Instant::now() > deadline || read >= limits.max_objects
            {
                break;
            }
            read += 1;
            self.visit(obj);
            queue.append(&mut self.untracked);
        }
        (read, queue.len() as u64)
    }

    /// Blocks found held by an object: buffers counted whole, and the blocks objects lie in.
    fn blocks_owned(&self) -> u64 {
        let in_objects = self.targets.values().filter(|t| !t.bytes.is_empty());
        self.claimed.len() as u64 + in_objects.count() as u64
    }

    /// Every object in every GC generation of every interpreter (bounded).
    fn gc_objects(&mut self, runtime: u64, max: u64) -> Vec<u64> {
        let mut states = Vec::new();
        match self.layout.objects.gc {
            GcState::InRuntime(at) => states.push(runtime.wrapping_add(at)),
            GcState::InInterpreter(at) => {
                let mut interp = self
                    .pages
                    .u64(runtime.wrapping_add(self.layout.runtime_interpreters_head))
                    .unwrap_or(0);
                while interp != 0 && states.len() < 64 {
                    states.push(interp.wrapping_add(at));
                    interp = self
                        .pages
                        .u64(interp.wrapping_add(self.layout.interp_next))
                        .unwrap_or(0);
                }
            }
        }
        let mut objects = Vec::new();
        for state in states {
            let heads = (0..3)
                .map(|g| state + GC_GENERATIONS + g * GC_GENERATION)
                .chain([state + GC_PERMANENT]);
            for head in heads {
                if !self.gc_list(head, max, &mut objects) {
                    self.skipped.lists_cut += 1;
                }
            }
        }
        self.gc = objects.iter().copied().collect();
        objects
    }

    /// Appends one generation's objects; false when the list did not lead back to its head.
    fn gc_list(&mut self, head: u64, max: u64, objects: &mut Vec<u64>) -> bool {
        let mut node = match self.pages.u64(head) {
            Ok(next) => next & !3,
            Err(_) => return false,
        };
        while node != head {
            if node == 0 || !node.is_multiple_of(8) || objects.len() as u64 >= max {
                return false;
            }
            objects.push(node + GC_HEAD);
            node = match self.pages.u64(node) {
                Ok(next) => next & !3,
                Err(_) => return false,
            };
        }
        true
    }

    /// Reads one container: notes who it refers to, and what of its memory is in the blocks.
    fn visit(&mut self, obj: u64) {
        let Some(type_addr) = self.type_of(obj) else {
            self.skipped.bad_type += 1;
            return;
        };
        match self.children(obj, type_addr) {
            Ok(children) => {
                for (child, edge) in children {
                    self.note_child(obj, child, edge);
                }
            }
            Err(_) => self.skipped.unreadable += 1,
        }
        self.note_target(obj, type_addr);
    }

    fn note_child(&mut self, parent: u64, child: u64, edge: Edge) {
        if child == 0 || !child.is_multiple_of(8) {
            return;
        }
        if !self.gc.contains(&child) {
            let Some(type_addr) = self.type_of(child) else {
                return;
            };
            let kind = self.types[&type_addr].as_ref().map(|t| t.kind);
            if matches!(
                kind,
                Some(Kind::Dict | Kind::Tuple | Kind::List | Kind::Set)
            ) {
                self.gc.insert(child);
                self.untracked.push(child);
            } else if !self.note_target(child, type_addr) {
                // A leaf (bytes, str, int, bytearray): kept only when its memory is asked about.
                return;
            }
        }
        let p = Parent { addr: parent, edge };
        match self.parents.get_mut(&child) {
            Some(ps) if ps.more.len() + 1 < MAX_PARENTS => ps.more.push(p),
            Some(_) => {}
            None => {
                self.parents.insert(
                    child,
                    Parents {
                        first: p,
                        more: Vec::new(),
                    },
                );
            }
        }
    }

    /// Records `obj` as a target if its memory lies in the blocks; true if it is one.
    fn note_target(&mut self, obj: u64, type_addr: u64) -> bool {
        if self.targets.contains_key(&obj) || self.foreign.contains_key(&obj) {
            return true;
        }
        let Some(ty) = self.types.get(&type_addr).and_then(Option::as_ref) else {
            return false;
        };
        let (kind, gc, basicsize) = (ty.kind, ty.flags & TYPE_FLAGS_HAVE_GC != 0, ty.basicsize);
        let mut bytes = Vec::new();
        let (mut check, mut home) = (None, None);
        if let Some(b) = self.blocks.containing(obj).copied() {
            // The object fills its own block (malloc'd), or is one of many in an arena.
            let size = self.object_size(obj, type_addr, gc);
            if size + 64 < b.size {
                bytes.push((b.stack_id, size));
                home = Some((b, size));
            } else if self.claimed.insert(b.addr) {
                bytes.push((b.stack_id, b.size));
            }
        }
        for field in buffer_fields(kind, &self.layout.objects) {
            let Ok(buffer) = self.pages.u64(obj + field) else {
                continue;
            };
            if let Some(b) = self.buffer_block(buffer) {
                bytes.push((b.stack_id, b.size));
                check = Some((obj + field, buffer));
            }
        }
        let candidates = match kind {
            Kind::Other => self.foreign_candidates(obj, basicsize),
            _ => Vec::new(),
        };
        let may_own = !candidates.is_empty();
        if may_own {
            let buffers = candidates;
            self.foreign.insert(obj, Foreign { type_addr, buffers });
        }
        if bytes.is_empty() {
            return may_own;
        }
        self.targets.insert(
            obj,
            Target {
                type_addr,
                bytes,
                home,
                check,
            },
        );
        true
    }

    /// The blocks `obj`'s own buffers (a list's items, a dict's table) lie in.
    pub(super) fn buffer_blocks(&self, obj: u64) -> Vec<Block> {
        let kind = self
            .pages
            .u64(obj + OB_TYPE)
            .ok()
            .and_then(|t| self.type_info(t));
        let Some(kind) = kind.map(|t| t.kind) else {
            return Vec::new();
        };
        let foreign = self.foreign.get(&obj).into_iter();
        let foreign = foreign.flat_map(|f| f.buffers.iter().map(|&(field, _, _)| field));
        buffer_fields(kind, &self.layout.objects)
            .chain(foreign)
            .filter_map(|field| self.pages.u64(obj + field).ok())
            .filter_map(|buffer| self.blocks.containing(buffer).copied())
            .collect()
    }

    /// The buffers an object whose layout no table here knows may own (a numpy array's
    /// data, an `array.array`'s items, a deque's blocks): the words of its fixed part that
    /// point at the start of an asked block, and not at a Python object (what an attribute
    /// refers to is an owner of its own). A view of another's buffer points inside it, or
    /// loses to the known owner in `claim_foreign`. (field offset, pointer, block)
    fn foreign_candidates(&mut self, obj: u64, basicsize: u64) -> Vec<(u64, u64, Block)> {
        let mut head = [0u8; MAX_FOREIGN_FIXED as usize];
        let len = basicsize.min(MAX_FOREIGN_FIXED) as usize & !7;
        if len <= HEADER || self.pages.read(obj, &mut head[..len]).is_err() {
            return Vec::new();
        }
        let mut found = Vec::new();
        for at in (HEADER..len).step_by(8) {
            let word = u64::from_le_bytes(head[at..at + 8].try_into().unwrap());
            let Some(b) = self.blocks.containing(word).copied() else {
                continue;
            };
            if b.addr == word && self.type_of(word).is_none() {
                found.push((at as u64, word, b));
            }
        }
        found
    }

    /// Gives the foreign candidates the blocks no known layout claimed, in address order.
    fn claim_foreign(&mut self) {
        let mut objects: Vec<u64> = self.foreign.keys().copied().collect();
        objects.sort_unstable();
        for obj in objects {
            let f = &self.foreign[&obj];
            let (type_addr, buffers) = (f.type_addr, f.buffers.clone());
            for (field, buffer, b) in buffers {
                if !self.claimed.insert(b.addr) {
                    continue;
                }
                let target = self.targets.entry(obj).or_insert(Target {
                    type_addr,
                    bytes: Vec::new(),
                    home: None,
                    check: None,
                });
                target.bytes.push((b.stack_id, b.size));
                target.check.get_or_insert((obj + field, buffer));
            }
        }
    }

    /// The block a buffer pointer is in, if no other owner counted it yet.
    fn buffer_block(&mut self, buffer: u64) -> Option<Block> {
        let b = *self.blocks.containing(buffer)?;
        self.claimed.insert(b.addr).then_some(b)
    }

    /// An object's size from its type: header, items, GC head; rounded as pymalloc does.
    fn object_size(&self, obj: u64, type_addr: u64, gc: bool) -> u64 {
        let Some(ty) = self.types.get(&type_addr).and_then(Option::as_ref) else {
            return 0;
        };
        let items = match (ty.kind, ty.itemsize) {
            // 3.12+ ints keep the digit count in `lv_tag` above 3 flag bits.
            (Kind::Int, _) if self.minor >= 12 => self.pages.u64(obj + OB_SIZE).unwrap_or(0) >> 3,
            (_, 0) => 0,
            _ => (self.pages.u64(obj + OB_SIZE).unwrap_or(0) as i64).unsigned_abs(),
        };
        let size = ty.basicsize + ty.itemsize.max(4) * items.min(MAX_ITEMS);
        (size + if gc { GC_HEAD } else { 0 }).next_multiple_of(16)
    }

    /// The objects `obj` refers to, as far as the walk follows references.
    fn children(&mut self, obj: u64, type_addr: u64) -> Result<Vec<(u64, Edge)>> {
        let ty = self.types[&type_addr].as_ref().expect("checked by type_of");
        let (kind, flags, dictoffset, basicsize) = (ty.kind, ty.flags, ty.dictoffset, ty.basicsize);
        let o = &self.layout.objects;
        let one = |at: u64, edge| -> Result<Vec<(u64, Edge)>> {
            Ok(vec![(self.pages.u64(obj + at)?, edge)])
        };
        match kind {
            Kind::List => {
                let n = self.count(self.pages.fresh_u64(obj + OB_SIZE)?)?;
                let items = self.pages.fresh_u64(obj + o.list_items)?;
                Ok(self
                    .current_words(items, n)?
                    .into_iter()
                    .map(|c| (c, Edge::Item))
                    .collect())
            }
            // Immutable: the cached pages are as good as new.
            Kind::Tuple => {
                let n = self.count(self.pages.u64(obj + OB_SIZE)?)?;
                Ok(self
                    .words(obj + o.tuple_items, n)?
                    .into_iter()
                    .map(|c| (c, Edge::Item))
                    .collect())
            }
            Kind::Dict => Ok(self
                .dict_entries(obj)?
                .into_iter()
                .flat_map(|(k, v)| [(v, Edge::Value(k)), (k, Edge::Key)])
                .collect()),
            Kind::Set => {
                let mask = self.pages.fresh_u64(obj + SET_MASK)?;
                let table = self.pages.fresh_u64(obj + SET_TABLE)?;
                let slots = self.current_words(table, mask.saturating_add(1).saturating_mul(2))?;
                Ok(slots.chunks(2).map(|e| (e[0], Edge::Item)).collect())
            }
            Kind::Module => one(MODULE_DICT, Edge::ModuleDict),
            Kind::Type => one(TYPE_DICT, Edge::ClassDict),
            Kind::Cell => one(CELL_REF, Edge::Cell),
            Kind::Function => one(o.func_closure, Edge::Closure),
            Kind::Lru => one(LRU_CACHE, Edge::Lru),
            Kind::ByteArray | Kind::Int => Ok(Vec::new()),
            Kind::Other if dictoffset > 0 => one(dictoffset as u64, Edge::InstanceDict),
            Kind::Other if flags & TYPE_FLAGS_MANAGED_DICT != 0 && self.minor >= 11 => {
                let dict = self.pages.u64(obj.wrapping_sub(MANAGED_DICT_BEFORE))?;
                if dict != 0 && dict & 1 == 0 {
                    return Ok(vec![(dict, Edge::InstanceDict)]);
                }
                let values = inline::values(&self.pages, self.minor, obj, basicsize, dict);
                let Ok(values) = values else {
                    self.skipped.inline_attributes += 1;
                    return Ok(Vec::new());
                };
                Ok(values.into_iter().map(|v| (v, Edge::Attribute)).collect())
            }
            Kind::Other => Ok(Vec::new()),
        }
    }

    /// A container's item count, refused when implausible.
    fn count(&mut self, n: u64) -> Result<u64> {
        if n > MAX_ITEMS {
            self.skipped.too_large += 1;
            bail!("{n} items");
        }
        Ok(n)
    }

    /// `n` pointer-sized words from `addr`, as the cached pages have them.
    pub(super) fn words(&self, addr: u64, n: u64) -> Result<Vec<u64>> {
        self.words_by(addr, n, &|at, buf| self.pages.read(at, buf))
    }

    /// `n` words as they are now: a mutable container's contents change while the walk
    /// runs (the leaking list grows and moves to a new array), and a cached page of them may
    /// be older than the header just read.
    pub(super) fn current_words(&self, addr: u64, n: u64) -> Result<Vec<u64>> {
        self.words_by(addr, n, &|at, buf| self.pages.fresh(at, buf))
    }

    /// `n` words from `addr`, read 1 MiB at a time with `read`.
    fn words_by(
        &self,
        addr: u64,
        n: u64,
        read: &dyn Fn(u64, &mut [u8]) -> Result<()>,
    ) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity(n as usize);
        let mut buf = vec![0u8; n.min(1 << 17) as usize * 8];
        let mut done = 0;
        while done < n {
            let take = (n - done).min(1 << 17);
            let bytes = &mut buf[..take as usize * 8];
            read(addr.wrapping_add(done * 8), bytes)?;
            out.extend(
                bytes
                    .chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().unwrap())),
            );
            done += take;
        }
        Ok(out)
    }

    /// A dict's (key, value) pairs, combined or split table.
    pub(super) fn dict_entries(&self, dict: u64) -> Result<Vec<(u64, u64)>> {
        let o = &self.layout.objects;
        // Fresh, as `words`: a growing dict moves to a new table.
        let keys = self.pages.fresh_u64(dict + o.dict_keys)?;
        let values = self.pages.fresh_u64(dict + o.dict_values)?;
        let (entries, n, width, key_at) = match o.dict_table {
            DictTable::Sized => {
                let size = self.pages.fresh_u64(keys + 8)?;
                let n = self.pages.fresh_u64(keys + 32)?;
                if !size.is_power_of_two() || size > MAX_ITEMS || n > size {
                    bail!("dict keys at {keys:#x}: size {size}, {n} entries");
                }
                let index = match size {
                    0..=0xff => 1,
                    0x100..=0xffff => 2,
                    _ => 4,
                };
                (keys + 40 + size * index, n, 3, 1)
            }
            DictTable::Log2 => {
                let mut head = [0u8; 3];
                self.pages.fresh(keys + 8, &mut head)?;
                let n = self.pages.fresh_u64(keys + 24)?;
                if head[0] > 24 || head[1] > 27 || n > 1 << head[0] {
                    bail!("dict keys at {keys:#x}: log2 size {}, {n} entries", head[0]);
                }
                let general = head[2] == 0;
                let entries = keys + 32 + (1u64 << head[1]);
                (
                    entries,
                    n,
                    if general { 3 } else { 2 },
                    if general { 1 } else { 0 },
                )
            }
        };
        let words = self.current_words(entries, n * width)?;
        let mut pairs: Vec<(u64, u64)> = words
            .chunks_exact(width as usize)
            .map(|e| (e[key_at], e[key_at + 1]))
            .collect();
        if values != 0 {
            let split = self.current_words(values + o.dict_values_header, n)?;
            for (pair, value) in pairs.iter_mut().zip(split) {
                pair.1 = value;
            }
        }
        pairs.retain(|&(k, v)| k != 0 && v != 0);
        Ok(pairs)
    }

    /// The type of `obj` if it reads as a type object (its metatype chain reaches `type`).
    pub(super) fn type_of(&mut self, obj: u64) -> Option<u64> {
        let type_addr = self.pages.u64(obj + OB_TYPE).ok()?;
        if !self.types.contains_key(&type_addr) {
            let info = self.read_type(type_addr);
            self.types.insert(type_addr, info);
        }
        self.types[&type_addr].as_ref().map(|_| type_addr)
    }

    pub(super) fn type_info(&self, type_addr: u64) -> Option<&TypeInfo> {
        self.types.get(&type_addr)?.as_ref()
    }

    fn read_type(&self, addr: u64) -> Option<TypeInfo> {
        if addr == 0 || !addr.is_multiple_of(8) {
            return None;
        }
        // `type`'s type is itself; a metaclass's type is `type`, or a metaclass of it.
        let mut meta = self.pages.u64(addr + OB_TYPE).ok()?;
        let rooted = (0..4).any(|_| match self.pages.u64(meta + OB_TYPE) {
            Ok(up) if up == meta => true,
            Ok(up) => {
                meta = up;
                false
            }
            Err(_) => false,
        });
        let mut head = [0u8; TYPE_DICTOFFSET as usize + 8];
        self.pages.read(addr, &mut head).ok()?;
        let word =
            |at: u64| u64::from_le_bytes(head[at as usize..at as usize + 8].try_into().unwrap());
        let name = self.c_string(word(self.layout.objects.type_name))?;
        let basicsize = word(TYPE_BASICSIZE);
        if !rooted || basicsize == 0 || basicsize > 1 << 20 {
            return None;
        }
        let flags = word(self.layout.objects.type_flags);
        Some(TypeInfo {
            kind: kind_of(&name, flags),
            name,
            basicsize,
            itemsize: word(TYPE_ITEMSIZE).min(1 << 10),
            flags,
            dictoffset: word(TYPE_DICTOFFSET) as i64,
        })
    }

    /// The `tp_name` of the type object at `addr`.
    pub(super) fn type_name_at(&self, addr: u64) -> Option<String> {
        self.c_string(self.pages.u64(addr + self.layout.objects.type_name).ok()?)
    }

    /// A NUL-terminated name (a type's `tp_name`): printable, at most 200 bytes.
    fn c_string(&self, addr: u64) -> Option<String> {
        let mut buf = [0u8; 200];
        let len = [200usize, 64, 16]
            .into_iter()
            .find(|&len| self.pages.read(addr, &mut buf[..len]).is_ok())?;
        let end = buf[..len].iter().position(|&b| b == 0)?;
        let name = std::str::from_utf8(&buf[..end]).ok()?;
        (!name.is_empty() && name.chars().all(|c| c.is_ascii_graphic() || c == ' '))
            .then(|| name.to_string())
    }

    /// A `str` object's text (dict keys, names).
    pub(super) fn str_at(&self, addr: u64) -> Option<String> {
        read_str(&|at, buf| self.pages.read(at, buf), self.layout, addr).ok()
    }

    /// Reads every target's type (and buffer field) again, straight from the target; one
    /// that changed is dropped.
    fn confirm_targets(&mut self) {
        let pages = &self.pages;
        let before = self.targets.len();
        self.targets.retain(|&obj, t| {
            let same_type = pages
                .fresh_u64(obj + OB_TYPE)
                .is_ok_and(|ty| ty == t.type_addr);
            let same_buffer = t
                .check
                .is_none_or(|(at, want)| pages.fresh_u64(at).is_ok_and(|got| got == want));
            same_type && same_buffer
        });
        self.skipped.changed += (before - self.targets.len()) as u64;
    }
}

/// The fields of a kind that point at a separately allocated buffer.
fn buffer_fields(kind: Kind, o: &Objects) -> impl Iterator<Item = u64> {
    let fields = match kind {
        Kind::ByteArray => [Some(BYTEARRAY_BYTES), None],
        Kind::List => [Some(o.list_items), None],
        Kind::Dict => [Some(o.dict_keys), Some(o.dict_values)],
        Kind::Set => [Some(SET_TABLE), None],
        _ => [None, None],
    };
    fields.into_iter().flatten()
}

fn kind_of(name: &str, flags: u64) -> Kind {
    if flags & TYPE_FLAGS_TYPE != 0 {
        return Kind::Type;
    }
    if flags & TYPE_FLAGS_LIST != 0 {
        return Kind::List;
    }
    if flags & TYPE_FLAGS_TUPLE != 0 {
        return Kind::Tuple;
    }
    if flags & TYPE_FLAGS_DICT != 0 {
        return Kind::Dict;
    }
    match name {
        "module" => Kind::Module,
        "cell" => Kind::Cell,
        "function" => Kind::Function,
        "functools._lru_cache_wrapper" => Kind::Lru,
        "bytearray" => Kind::ByteArray,
        "set" | "frozenset" => Kind::Set,
        "int" | "bool" => Kind::Int,
        _ => Kind::Other,
    }
}
