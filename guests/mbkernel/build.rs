//! Links a Multiboot test kernel (nk-mb1-kernel, nk-mb2-kernel) with guests/mbkernel/kernel.ld
//! when building for the bare-metal target.

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = std::path::Path::new(&manifest_dir).join("../mbkernel");
    for file in ["kernel.ld", "kernel.S", "print_cmdline_v1.S", "print_cmdline_v2.S"] {
        println!("cargo:rerun-if-changed={}", dir.join(file).display());
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{}", dir.join("kernel.ld").display());
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
    }
}
