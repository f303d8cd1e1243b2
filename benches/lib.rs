//! Helpers shared by the benchmarks.

/// Builds the workspace binaries a benchmark starts (`cargo bench` builds only the libraries
/// it links), so that the `ftvm-node` and `ftvm-witness` next to it are current. `bins` are
/// `(package, binary)` pairs.
pub fn build_bins(bins: &[(&str, &str)]) -> anyhow::Result<()> {
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml");
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.args(["build", "--release", "--manifest-path", manifest]);
    for (pkg, bin) in bins {
        cmd.args(["-p", pkg, "--bin", bin]);
    }
    if !cmd.status()?.success() {
        anyhow::bail!("building {bins:?} failed");
    }
    Ok(())
}
