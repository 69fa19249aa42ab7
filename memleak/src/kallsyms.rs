//! Kernel addresses → `function+0xoff [module]`, from /proc/kallsyms (kernel mode).

use anyhow::{Context, Result, bail};

use crate::model::Frame;

pub struct Kallsyms {
    /// (address, name, module), sorted by address.
    symbols: Vec<(u64, String, Option<String>)>,
}

impl Kallsyms {
    pub fn load() -> Result<Kallsyms> {
        let text = std::fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
        let k = Kallsyms::parse(&text);
        if k.symbols.is_empty() {
            bail!(
                "/proc/kallsyms shows no addresses (kernel.kptr_restrict?): kernel stacks cannot be named"
            );
        }
        Ok(k)
    }

    pub fn parse(text: &str) -> Kallsyms {
        let mut symbols: Vec<(u64, String, Option<String>)> = text
            .lines()
            .filter_map(|line| {
                let mut f = line.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                let module = f
                    .next()
                    .map(|m| m.trim_matches(|c| c == '[' || c == ']').to_string());
                // Text symbols only; a zero address means the addresses are hidden.
                (addr != 0 && matches!(kind, "t" | "T" | "w" | "W"))
                    .then(|| (addr, name.to_string(), module))
            })
            .collect();
        symbols.sort_by_key(|s| s.0);
        Kallsyms { symbols }
    }

    /// The function containing `addr` (the nearest symbol at or below it).
    pub fn frame(&self, addr: u64) -> Frame {
        let i = self.symbols.partition_point(|s| s.0 <= addr);
        let Some((start, name, module)) = i.checked_sub(1).map(|i| &self.symbols[i]) else {
            return Frame {
                addr,
                module: Some("kernel".into()),
                ..Default::default()
            };
        };
        Frame {
            addr,
            module: Some(module.clone().unwrap_or_else(|| "kernel".into())),
            function: Some(name.clone()),
            function_offset: addr - start,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_symbol_below() {
        let k = Kallsyms::parse(
            "ffffffff81000000 T _text\nffffffff81001000 t do_thing\nffffffff81002000 D some_data\nffffffffc0001000 t mod_fn\t[mymod]\n",
        );
        let f = k.frame(0xffffffff81001010);
        assert_eq!(f.function.as_deref(), Some("do_thing"));
        assert_eq!(f.function_offset, 0x10);
        assert_eq!(f.module.as_deref(), Some("kernel"));
        assert_eq!(k.frame(0xffffffffc0001004).module.as_deref(), Some("mymod"));
        assert!(k.frame(0x1000).function.is_none());
    }
}
