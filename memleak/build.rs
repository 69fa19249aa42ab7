//! Builds the BPF object (crate `memleak-ebpf`, nightly + bpf-linker) so `main.rs` can embed
//! it with `include_bytes_aligned!`. `cargo xtask setup` installs what this needs.
fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "memleak-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../memleak-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
