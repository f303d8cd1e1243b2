//! Benchmark (being written).
fn main() {
    eprintln!("resync_vs_rsync: not written yet");
    std::process::exit(1);
}
