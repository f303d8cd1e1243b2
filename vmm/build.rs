//! Builds the guest workspace (`guest/`) and bundles its images into the VMM, so that
//! `ftvm-node --guest NAME` needs no path.
//!
//! The child cargo must not inherit the variables the outer cargo gives build scripts:
//! `CARGO_ENCODED_RUSTFLAGS` (even empty) makes it ignore `guest/.cargo/config.toml`'s
//! rustflags (DESIGN §2), and the outer target dir must not be reused.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The bundled guests: binaries of the guest workspace.
const GUESTS: &[&str] = &[
    "selftest",
    "crash",
    "hostile",
    "spin",
    "exitbench",
    "clockwork",
    "kv",
    "badvirtio",
    "diskwait",
    "timecheck",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let guest_dir = manifest.join("../guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    for entry in std::fs::read_dir(&guest_dir).expect("guest/ exists") {
        let p = entry.expect("readable guest/").path();
        if p.file_name().is_some_and(|n| n != "target") {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
    // <target>/<profile>/build/vmm-*/out -> <target>/guest
    let target_root = out
        .ancestors()
        .nth(4)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| out.join("guest-target"));
    let guest_target = target_root.join("guest");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release"])
        .arg("--target-dir")
        .arg(&guest_target);
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo for the guest workspace");
    assert!(
        status.success(),
        "building the guest workspace (guest/) failed"
    );
    let bin_dir = guest_target.join("x86_64-unknown-linux-gnu/release");
    let mut gen = String::from(
        "/// Bundled guest images: (name, ELF bytes).\npub static BUNDLED: &[(&str, &[u8])] = &[\n",
    );
    for g in GUESTS {
        let src = bin_dir.join(g);
        let dst = out.join(format!("{g}.elf"));
        std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
        gen.push_str(&format!(
            "    ({g:?}, include_bytes!({:?})),\n",
            dst.display().to_string()
        ));
    }
    gen.push_str("];\n");
    std::fs::write(out.join("guests.rs"), gen).expect("write guests.rs");
}
