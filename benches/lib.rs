//! Helpers shared by the benchmarks.

/// Builds the workspace binaries a benchmark starts (`cargo bench` builds only the libraries
/// it links), so that the `ftvm-node` and `ftvm-witness` next to it are current. `bins` are
/// `(package, binary)` pairs.
pub fn build_bins(bins: &[(&str, &str)]) -> anyhow::Result<()> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.args(["build", "--release", "--manifest-path", manifest]);
    // `cargo bench` runs us with the bench package's CARGO_PKG_*, CARGO_MANIFEST_* and
    // OUT_DIR; build scripts that ask to rerun when those change (ring's does) would then
    // rebuild, and with them everything above ring, on every run: here and again at the next
    // `cargo bench`. The nested build gets the environment a shell would give it.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("CARGO_CRATE_")
            || k.starts_with("CARGO_BIN_")
            || k == "CARGO_PRIMARY_PACKAGE"
            || k == "CARGO_TARGET_TMPDIR"
            || k == "OUT_DIR"
        {
            cmd.env_remove(k.as_ref());
        }
    }
    for (pkg, bin) in bins {
        cmd.args(["-p", pkg, "--bin", bin]);
    }
    if !cmd.status()?.success() {
        anyhow::bail!("building {bins:?} failed");
    }
    Ok(())
}
