//! The attributes of a 3.11+ instance that has no `__dict__`: its values live in an array
//! the type's shared keys index, so the walk follows them without their names (the chain
//! then says "in list in Service `svc`", the instance named by what holds it).
//!
//! - 3.11: the values pointer is the word 4 before the object (the managed dict, 3 before,
//!   is NULL);
//! - 3.12: the word 3 before is the dict, or the values pointer less 1 (bit 0 set);
//! - in both, the bytes before the values are the insertion order: `[-1]` the prefix's size,
//!   `[-2]` how many were inserted, `[-3 - i]` the slot of the i-th;
//! - 3.13: the values follow the object itself (at `tp_basicsize`), after a header of
//!   capacity, size, embedded and valid bytes.

use anyhow::{Result, bail};

use super::pages::Pages;

/// The words before the object where 3.11 keeps its values pointer.
const VALUES_BEFORE_311: u64 = 32;
/// The most slots a shared-keys instance has (CPython's SHARED_KEYS_MAX_SIZE is 30).
const MAX_SLOTS: u64 = 255;

/// The attribute values of instance `obj`, whose managed-dict word (3 words before it) read
/// `dict_word`: empty when it has none.
pub(super) fn values(
    pages: &Pages,
    minor: u8,
    obj: u64,
    basicsize: u64,
    dict_word: u64,
) -> Result<Vec<u64>> {
    let mut values = match minor {
        11 => order_prefixed(pages, pages.u64(obj.wrapping_sub(VALUES_BEFORE_311))?)?,
        12 if dict_word == 0 => Vec::new(),
        12 => order_prefixed(pages, dict_word.wrapping_add(1))?,
        _ => embedded(pages, obj.wrapping_add(basicsize))?,
    };
    values.retain(|&v| v != 0);
    Ok(values)
}

/// 3.11-3.12: the values in insertion order, from the order bytes before them.
fn order_prefixed(pages: &Pages, values: u64) -> Result<Vec<u64>> {
    if values == 0 {
        return Ok(Vec::new());
    }
    let mut last = [0u8; 2];
    pages.read(values.wrapping_sub(2), &mut last)?;
    let (inserted, prefix) = (last[0] as u64, last[1] as u64);
    if prefix < 8 || !prefix.is_multiple_of(8) || inserted + 2 > prefix {
        bail!("values at {values:#x}: prefix {prefix}, {inserted} inserted");
    }
    let mut order = vec![0u8; prefix as usize];
    pages.read(values - prefix, &mut order)?;
    let slots: Vec<u64> = (0..inserted)
        .map(|i| order[(prefix - 3 - i) as usize] as u64)
        .collect();
    let words = read_words(pages, values, slots.iter().max().map_or(0, |m| m + 1))?;
    Ok(slots.iter().map(|&s| words[s as usize]).collect())
}

/// 3.13: the values embedded after the object; none when they are not valid (moved to a
/// dict).
fn embedded(pages: &Pages, values: u64) -> Result<Vec<u64>> {
    let mut head = [0u8; 4];
    pages.read(values, &mut head)?;
    let (capacity, valid) = (head[0] as u64, head[3]);
    if valid == 0 {
        return Ok(Vec::new());
    }
    read_words(pages, values + 8, capacity.min(MAX_SLOTS))
}

fn read_words(pages: &Pages, at: u64, n: u64) -> Result<Vec<u64>> {
    let mut bytes = vec![0u8; n as usize * 8];
    pages.read(at, &mut bytes)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .collect())
}
