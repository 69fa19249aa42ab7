//! Code objects read from the target's memory, cached by address. The cache is shared: the
//! table's resolver reads through it, and so does the thread that reads the code objects of
//! new stacks the moment the BPF program stores them, while they still live.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use anyhow::{Result, bail};

use super::{
    Memory,
    layout::{BYTES_DATA, BYTES_SIZE, Layout, OB_TYPE},
    read_str,
};

/// A code object as last read: the pointers identify it (a freed and reused address gets
/// other strings), the rest is what a location needs.
pub struct Code {
    identity: [u64; 4],
    pub file: String,
    pub function: String,
    pub firstlineno: i32,
    pub linetable: Vec<u8>,
}

/// A handle on the one cache of a target's code objects; clones share it.
#[derive(Clone)]
pub struct Codes(Arc<Reader>);

struct Reader {
    memory: Memory,
    layout: Layout,
    /// `PyCode_Type` in the target.
    code_type: u64,
    cache: Mutex<HashMap<u64, Arc<Code>>>,
}

impl Codes {
    pub fn new(memory: Memory, layout: Layout, code_type: u64) -> Codes {
        Codes(Arc::new(Reader {
            memory,
            layout,
            code_type,
            cache: Mutex::new(HashMap::new()),
        }))
    }

    /// The code object at `addr`, read or from the cache. A code object that died since we
    /// cached it keeps its cached name: the frame was recorded while it was alive.
    pub fn get(&self, addr: u64) -> Option<Arc<Code>> {
        let r = &*self.0;
        let l = r.layout;
        let header_len = [
            l.code_filename,
            l.code_function,
            l.code_linetable,
            l.code_firstlineno,
        ]
        .into_iter()
        .max()
        .unwrap_or(0)
            + 8;
        let header = r.memory.read_vec(addr, header_len as usize).ok();
        let field = |h: &[u8], at: u64| {
            u64::from_le_bytes(h[at as usize..at as usize + 8].try_into().unwrap())
        };
        let cached = || r.cache.lock().unwrap().get(&addr).cloned();
        let live = header.filter(|h| field(h, OB_TYPE) == r.code_type);
        let Some(h) = live else {
            return cached();
        };
        let firstlineno = field(&h, l.code_firstlineno) as u32 as i32;
        let identity = [
            field(&h, l.code_filename),
            field(&h, l.code_function),
            field(&h, l.code_linetable),
            firstlineno as u64,
        ];
        if let Some(code) = cached().filter(|c| c.identity == identity) {
            return Some(code);
        }
        let code = Arc::new(Code {
            identity,
            file: r.string(identity[0]).ok()?,
            function: r.string(identity[1]).ok()?,
            firstlineno,
            linetable: r.bytes(identity[2]).ok()?,
        });
        r.cache.lock().unwrap().insert(addr, Arc::clone(&code));
        Some(code)
    }
}

impl Reader {
    /// A compact `str` object's text (code objects hold only compact ones).
    fn string(&self, addr: u64) -> Result<String> {
        read_str(&|at, buf| self.memory.read(at, buf), &self.layout, addr)
    }

    /// A `bytes` object's content.
    fn bytes(&self, addr: u64) -> Result<Vec<u8>> {
        let size = self.memory.u64(addr.wrapping_add(BYTES_SIZE))?;
        if size > 1 << 24 {
            bail!("bytes at {addr:#x} claims {size} bytes");
        }
        self.memory
            .read_vec(addr.wrapping_add(BYTES_DATA), size as usize)
    }
}
