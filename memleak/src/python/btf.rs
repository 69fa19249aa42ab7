//! The kernel's own type information (BTF): where `task_struct` keeps a thread's fs_base,
//! which the BPF program reads to find the running thread's `PyThreadState` (its pthread_t).
//! Only as much of the format as a member lookup needs; aya keeps its BTF types private.

use anyhow::{Context, Result, bail};

const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_TYPE_TAG: u32 = 18;

/// One type of the table: what a member lookup needs.
struct Type {
    name: u32,
    kind: u32,
    /// The target type of a typedef or a qualifier.
    target: u32,
    /// Struct and union members: (name, type, bit offset).
    members: Vec<(u32, u32, u32)>,
}

struct Btf<'a> {
    /// Index = type id − 1.
    types: Vec<Type>,
    strings: &'a [u8],
}

/// Byte offset of `task_struct.thread.fsbase` in the running kernel.
pub fn task_fsbase_offset() -> Result<u32> {
    let path = "/sys/kernel/btf/vmlinux";
    let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
    let btf = Btf::parse(&data).with_context(|| format!("parsing {path}"))?;
    let task = btf.struct_named("task_struct")?;
    let (thread_type, thread) = btf.member(task, "thread")?;
    let (_, fsbase) = btf.member(btf.resolve(thread_type), "fsbase")?;
    Ok(thread + fsbase)
}

impl<'a> Btf<'a> {
    fn parse(data: &'a [u8]) -> Result<Btf<'a>> {
        let u32_at = |at: usize| -> Result<u32> {
            let bytes = data.get(at..at + 4).context("truncated")?;
            Ok(u32::from_le_bytes(bytes.try_into().unwrap()))
        };
        if data.get(..2) != Some(&[0x9f, 0xeb]) {
            bail!("not little-endian BTF");
        }
        let header_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let strings = data
            .get(header_len + str_off..header_len + str_off + str_len)
            .context("string section out of bounds")?;
        let mut types = Vec::new();
        let mut at = header_len + type_off;
        let end = at + type_len;
        while at < end {
            let (name, info, size_or_type) = (u32_at(at)?, u32_at(at + 4)?, u32_at(at + 8)?);
            at += 12;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let bitfields = info >> 31 != 0;
            let mut members = Vec::new();
            if kind == KIND_STRUCT || kind == KIND_UNION {
                for i in 0..vlen {
                    let m = at + 12 * i;
                    let offset = u32_at(m + 8)?;
                    let bit_offset = if bitfields {
                        offset & 0xff_ffff
                    } else {
                        offset
                    };
                    members.push((u32_at(m)?, u32_at(m + 4)?, bit_offset));
                }
            }
            at += match kind {
                1 | 14 | 17 => 4,             // int, var, decl_tag
                3 => 12,                      // array
                4 | 5 | 15 | 19 => 12 * vlen, // struct, union, datasec, enum64
                6 | 13 => 8 * vlen,           // enum, func_proto
                _ => 0,
            };
            types.push(Type {
                name,
                kind,
                target: size_or_type,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, offset: u32) -> &[u8] {
        let rest = self.strings.get(offset as usize..).unwrap_or(&[]);
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    }

    fn get(&self, id: u32) -> Option<&Type> {
        self.types.get((id as usize).checked_sub(1)?)
    }

    fn struct_named(&self, name: &str) -> Result<&Type> {
        self.types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name) == name.as_bytes())
            .with_context(|| format!("no struct {name}"))
    }

    /// Follows typedefs and qualifiers to the struct or union a member is.
    fn resolve(&self, mut id: u32) -> &Type {
        // A cycle cannot happen in valid BTF; the bound keeps bad input from hanging us.
        for _ in 0..32 {
            match self.get(id) {
                Some(t)
                    if matches!(
                        t.kind,
                        KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
                    ) =>
                {
                    id = t.target
                }
                Some(t) => return t,
                None => break,
            }
        }
        &EMPTY
    }

    /// A member's type id and byte offset.
    fn member(&self, of: &Type, name: &str) -> Result<(u32, u32)> {
        of.members
            .iter()
            .find(|(n, _, _)| self.name(*n) == name.as_bytes())
            .map(|&(_, ty, bits)| (ty, bits / 8))
            .with_context(|| {
                format!(
                    "no member {name} in struct {}",
                    String::from_utf8_lossy(self.name(of.name))
                )
            })
    }
}

static EMPTY: Type = Type {
    name: 0,
    kind: 0,
    target: 0,
    members: Vec::new(),
};

#[cfg(test)]
mod tests {
    /// Only the running kernel knows the true value; this checks that the lookup finds the
    /// member inside `thread` at the end of `task_struct`, where x86-64 keeps it.
    #[test]
    fn finds_fsbase_in_the_running_kernel() {
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            eprintln!("!!! SKIPPING: this kernel has no /sys/kernel/btf/vmlinux");
            return;
        }
        let offset = super::task_fsbase_offset().unwrap();
        eprintln!("task_struct.thread.fsbase at byte {offset}");
        assert!((1024..16384).contains(&offset), "fsbase at {offset}");
        assert_eq!(offset % 8, 0);
    }
}
