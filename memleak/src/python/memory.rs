//! Reading the target's memory with process_vm_readv: one system call per read, no ptrace
//! stop, so the target keeps running while we look.

use anyhow::{Result, bail};

pub struct Memory {
    pid: u32,
}

impl Memory {
    pub fn new(pid: u32) -> Memory {
        Memory { pid }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Fills `buf` from `addr`; an error unless every byte could be read.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
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
        let n =
            unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            bail!(
                "reading {} bytes at {addr:#x} in process {}: {err}",
                buf.len(),
                self.pid
            );
        }
        if n as usize != buf.len() {
            bail!(
                "reading {} bytes at {addr:#x} in process {}: only {n} readable",
                buf.len(),
                self.pid
            );
        }
        Ok(())
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
