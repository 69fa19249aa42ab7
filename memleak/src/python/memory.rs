//! Reading the target's memory with process_vm_readv: one system call per read, no ptrace
//! stop, so the target keeps running while we look. Or reading a copy of it: the fuzz
//! targets hand their input in as the target's memory, to the same decoding code.

use anyhow::{Result, bail};

#[derive(Clone)]
pub enum Memory {
    /// A live process.
    Process(u32),
    /// Bytes that stand for the target's memory from address `base` on; a read outside
    /// them fails as a read of unmapped memory does.
    Copy { base: u64, bytes: Vec<u8> },
}

impl Memory {
    /// The process read; 0 (no process: its /proc files do not open) for a copy.
    pub fn pid(&self) -> u32 {
        match self {
            Memory::Process(pid) => *pid,
            Memory::Copy { .. } => 0,
        }
    }

    /// Fills `buf` from `addr`; an error unless every byte could be read.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Memory::Process(pid) => read_process(*pid, addr, buf),
            Memory::Copy { base, bytes } => {
                let source = addr
                    .checked_sub(*base)
                    .and_then(|start| usize::try_from(start).ok())
                    .and_then(|start| bytes.get(start..start.checked_add(buf.len())?));
                match source {
                    Some(source) => buf.copy_from_slice(source),
                    None => bail!("reading {} bytes at {addr:#x}: not in the copy", buf.len()),
                }
                Ok(())
            }
        }
    }

    pub fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.read(addr, &mut buf)?;
        Ok(buf)
    }

    pub fn u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn u32(&self, addr: u64) -> Result<u32> {
        let mut b = [0; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

fn read_process(pid: u32, addr: u64, buf: &mut [u8]) -> Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: `local` covers exactly `buf`, which we own mutably; `remote` is only read
    // by the kernel, in the other process.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    if n < 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "reading {} bytes at {addr:#x} in process {pid}: {err}",
            buf.len()
        );
    }
    if n as usize != buf.len() {
        bail!(
            "reading {} bytes at {addr:#x} in process {pid}: only {n} readable",
            buf.len()
        );
    }
    Ok(())
}
