//! Benchmark (being written).
fn main() {
    eprintln!("poll_exit: not written yet");
    std::process::exit(1);
}
