//! Links the hypervisor image with the boot crate's linker script (load address 1 MiB,
//! Multiboot2 header first, PVH note) when building for the bare-metal target.

fn main() {
    let target_os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let boot_dir = std::path::Path::new(&manifest_dir).join("../boot");
    println!("cargo:rerun-if-changed={}", boot_dir.join("linker.ld").display());
    println!("cargo:rerun-if-changed={}", boot_dir.join("src/entry.S").display());
    if target_os == "none" {
        println!("cargo:rustc-link-arg-bins=-T{}", boot_dir.join("linker.ld").display());
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
    }
}
