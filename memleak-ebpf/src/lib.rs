#![no_std]
// The BPF program is the `memleak` binary of this crate (src/main.rs); this empty library lets
// the userspace crate depend on it so cargo rebuilds the object when it changes.
