//! Benchmark (being written).
fn main() {
    eprintln!("witness_claims: not written yet");
    std::process::exit(1);
}
