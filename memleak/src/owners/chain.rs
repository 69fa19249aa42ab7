//! From each target object up its referrers to a root (a module's globals, a class's dict, a
//! function's closure, an lru_cache's table), and that chain in words, grouped per stack.

use std::collections::VecDeque;

use foldhash::{HashMap, HashMapExt};

use super::{
    Owner, Root,
    python::{Edge, Kind, Walk},
};
use crate::python::layout::{LRU_FUNC, LRU_MAXSIZE, MODULE_DICT, OB_TYPE};

/// Referrers looked at per target before giving up on finding a root.
const MAX_VISITS: usize = 256;

/// How a target is held: `path[0]` is the target, each node held by the next through its
/// edge; the last edge leads to `root_node` (a module, class, function or lru wrapper).
struct Chain {
    path: Vec<(u64, Edge)>,
    root: Root,
    root_node: u64,
}

/// The owners of the walk's targets, grouped by stack, type and chain; largest first.
pub(super) fn owners(walk: &Walk) -> Vec<Owner> {
    let mut groups: HashMap<(i64, String, String), Owner> = HashMap::new();
    let mut described: HashMap<DescriptionKey, (String, Root, Option<String>)> = HashMap::new();
    for (&obj, target) in &walk.targets {
        let type_name = walk
            .type_info(target.type_addr)
            .map_or("?".to_string(), |t| t.name.clone());
        let chain = climb(walk, obj);
        let (held_by, root, advice) = described
            .entry(description_key(&chain))
            .or_insert_with(|| words(walk, &chain))
            .clone();
        for (stack_id, bytes) in per_stack(&target.bytes) {
            let group = groups
                .entry((stack_id, type_name.clone(), held_by.clone()))
                .or_insert_with(|| Owner {
                    stack_id,
                    type_name: type_name.clone(),
                    count: 0,
                    bytes: 0,
                    held_by: held_by.clone(),
                    root,
                    advice: advice.clone(),
                });
            group.count += 1;
            group.bytes += bytes;
        }
    }
    let mut owners: Vec<Owner> = groups.into_values().collect();
    owners.sort_by(|a, b| b.bytes.cmp(&a.bytes).then(a.held_by.cmp(&b.held_by)));
    owners
}

/// What a chain's words depend on: everything above the target, and the key the target
/// itself is held under when it is a root's own value (`held as `name` of module ...`).
/// Targets held the same way share one description (thousands of items of one list).
type DescriptionKey = (Vec<(u64, Edge)>, Option<Edge>, u64);

fn description_key(chain: &Chain) -> DescriptionKey {
    let above = chain.path.get(1..).unwrap_or_default().to_vec();
    let own = (chain.path.len() == 2).then(|| chain.path[0].1);
    (above, own, chain.root_node)
}

/// A target's bytes per stack, one entry each: an object and its buffer may both count to
/// one stack (the pool split gives an object's own bytes to the stack of what it holds),
/// and it is still one object.
fn per_stack(bytes: &[(i64, u64)]) -> Vec<(i64, u64)> {
    let mut out: Vec<(i64, u64)> = Vec::with_capacity(bytes.len());
    for &(stack_id, n) in bytes {
        match out.iter_mut().find(|(s, _)| *s == stack_id) {
            Some(entry) => entry.1 += n,
            None => out.push((stack_id, n)),
        }
    }
    out
}

/// The shortest chain of referrers from `target` to a root, breadth first.
fn climb(walk: &Walk, target: u64) -> Chain {
    let mut held_in: HashMap<u64, (u64, Edge)> = HashMap::new();
    let mut queue = VecDeque::from([target]);
    let mut visits = 0;
    while let Some(node) = queue.pop_front() {
        visits += 1;
        if visits > MAX_VISITS {
            break;
        }
        for p in walk.parents.get(&node).into_iter().flat_map(|ps| ps.iter()) {
            let root = match p.edge {
                Edge::ModuleDict => Some(Root::ModuleGlobal),
                Edge::ClassDict => Some(Root::ClassAttribute),
                Edge::Closure => Some(Root::Closure),
                Edge::Lru => Some(Root::LruCache),
                _ => None,
            };
            if let Some(root) = root {
                let mut path = vec![(node, p.edge)];
                let mut at = node;
                while let Some(&(child, edge)) = held_in.get(&at) {
                    path.push((child, edge));
                    at = child;
                }
                path.reverse();
                return Chain {
                    path,
                    root,
                    root_node: p.addr,
                };
            }
            if p.addr != target && !held_in.contains_key(&p.addr) {
                held_in.insert(p.addr, (node, p.edge));
                queue.push_back(p.addr);
            }
        }
    }
    let first = walk.parents.get(&target).map(|p| p.first());
    Chain {
        path: first.map_or(Vec::new(), |p| vec![(target, p.edge)]),
        root: Root::Unrooted,
        root_node: first.map_or(0, |p| p.addr),
    }
}

/// The chain in words ("in list `_leak_store` of module `__main__`"), its root, and advice.
fn words(walk: &Walk, chain: &Chain) -> (String, Root, Option<String>) {
    let path = &chain.path;
    let (text, advice) = match chain.root {
        Root::ModuleGlobal | Root::ClassAttribute if path.len() >= 2 => named_words(walk, chain),
        Root::Closure if path.len() >= 3 => closure_words(walk, chain),
        Root::LruCache => lru_cache_words(walk, chain),
        _ if path.is_empty() => (
            "referred to by no container the walk read (a running frame's local?)".into(),
            None,
        ),
        _ => (
            format!(
                "in {} that no module, class, closure or cache refers to",
                type_name(walk, chain.root_node)
            ),
            None,
        ),
    };
    let root = if path.is_empty() {
        Root::Unrooted
    } else {
        chain.root
    };
    (text, root, advice)
}

/// What directly holds the target ("in list "), when that is not the container at
/// `named` on the path itself.
fn holder(walk: &Walk, path: &[(u64, Edge)], named: usize) -> String {
    match named {
        0 | 1 => String::new(),
        _ => format!("in {} ", type_name(walk, path[1].0)),
    }
}

/// A module global or a class attribute: "in list `_leak_store` of module `__main__`", and
/// for a list, dict or set "bound it or evict".
fn named_words(walk: &Walk, chain: &Chain) -> (String, Option<String>) {
    let path = &chain.path;
    let named = path.len() - 2;
    let name = match path.get(named) {
        Some(&(_, Edge::Value(key))) => walk.str_at(key).unwrap_or_else(|| "?".into()),
        _ => "?".into(),
    };
    let (place, scope) = match chain.root {
        Root::ModuleGlobal => (
            format!(
                "`{name}` of module `{}`",
                module_name(walk, chain.root_node)
            ),
            "module-level",
        ),
        _ => (
            format!(
                "`{}.{name}` (a class attribute)",
                class_name(walk, chain.root_node)
            ),
            "class-level",
        ),
    };
    let named_type = type_name(walk, path[named].0);
    let text = match named {
        0 => format!("held as {place}"),
        _ => format!("{}in {named_type} {place}", holder(walk, path, named)),
    };
    let grows = matches!(
        kind_of(walk, path[named].0),
        Some(Kind::List | Kind::Dict | Kind::Set)
    );
    let advice = grows
        .then(|| format!("unbounded {scope} {named_type} `{name}`: bound it or evict old entries"));
    (text, advice)
}

/// "in list held by the closure of `make_handler.<locals>.handle`".
fn closure_words(walk: &Walk, chain: &Chain) -> (String, Option<String>) {
    let path = &chain.path;
    let function = function_name(walk, chain.root_node);
    let content = path.len() - 3;
    let text = match content {
        0 => format!("held by the closure of `{function}`"),
        _ => format!(
            "{}in {} held by the closure of `{function}`",
            holder(walk, path, content),
            type_name(walk, path[content].0)
        ),
    };
    let advice =
        format!("the closure of `{function}` keeps them alive: bound or clear what it holds");
    (text, Some(advice))
}

/// "in the functools.lru_cache of `lookup`", and "give it a maxsize" when it has none.
fn lru_cache_words(walk: &Walk, chain: &Chain) -> (String, Option<String>) {
    let (path, wrapper) = (&chain.path, chain.root_node);
    let function = walk
        .pages
        .u64(wrapper + LRU_FUNC)
        .map_or("?".into(), |f| function_name(walk, f));
    let text = match path.len() {
        0 | 1 => format!("the table of the functools.lru_cache of `{function}`"),
        2 => format!("in the functools.lru_cache of `{function}`"),
        _ => format!(
            "in {} in the functools.lru_cache of `{function}`",
            type_name(walk, path[1].0)
        ),
    };
    let unbounded = walk
        .pages
        .u64(wrapper + LRU_MAXSIZE)
        .is_ok_and(|m| m as i64 == -1);
    let advice =
        unbounded.then(|| format!("`{function}` is lru_cache(maxsize=None): give it a maxsize"));
    (text, advice)
}

fn type_name(walk: &Walk, node: u64) -> String {
    walk.pages
        .u64(node + OB_TYPE)
        .ok()
        .and_then(|t| walk.type_info(t))
        .map_or("object".into(), |t| t.name.clone())
}

fn kind_of(walk: &Walk, node: u64) -> Option<Kind> {
    let t = walk.pages.u64(node + OB_TYPE).ok()?;
    Some(walk.type_info(t)?.kind)
}

/// `__name__` from a module's dict.
fn module_name(walk: &Walk, module: u64) -> String {
    let name = walk
        .pages
        .u64(module + MODULE_DICT)
        .ok()
        .and_then(|dict| walk.dict_entries(dict).ok())
        .and_then(|entries| {
            entries
                .into_iter()
                .find(|&(k, _)| walk.str_at(k).as_deref() == Some("__name__"))
                .and_then(|(_, v)| walk.str_at(v))
        });
    name.unwrap_or_else(|| "?".into())
}

fn class_name(walk: &Walk, class: u64) -> String {
    walk.type_name_at(class).unwrap_or_else(|| "?".into())
}

/// A function's `__qualname__`.
fn function_name(walk: &Walk, function: u64) -> String {
    let qualname = walk.layout.objects.func_qualname;
    walk.pages
        .u64(function + qualname)
        .ok()
        .and_then(|s| walk.str_at(s))
        .unwrap_or_else(|| "?".into())
}
