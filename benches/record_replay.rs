//! Record and replay costs, from one run: for each test guest, an unrecorded run (the
//! baseline), a recorded run and its replay. Prints log bytes per boundary and per second of
//! guest time, recording overhead against the baseline, and replay speed relative to recording.
//!
//! `cargo bench -p ftvm-benches --bench record_replay`

use std::sync::{Arc, Mutex};
use std::time::Instant;

use vmm::epoch::ConsoleSink;
use vmm::kvm::boot::BootParams;
use vmm::live::LiveInputs;
use vmm::solo::RecordOptions;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);
impl ConsoleSink for Capture {
    fn write(&mut self, bytes: &[u8]) {
        self.0.lock().unwrap().extend_from_slice(bytes);
    }
}

fn main() -> anyhow::Result<()> {
    let stop = vmm::signals::install()?;
    let dir = tempfile::tempdir()?;
    println!(
        "{:<22} {:>9} {:>9} {:>10} {:>11} {:>9} {:>9} {:>9}",
        "guest", "bounds", "B/bound", "log KB/s", "plain s", "record s", "replay s", "rec/plain"
    );
    for (guest, args) in [
        ("clockwork", "2000"),
        ("clockwork", "40000"),
        ("exitbench", "clock 50000"),
        ("selftest", ""),
    ] {
        let image = vmm::guests::bundled(guest).expect("bundled guest");
        let params = BootParams {
            args: args.into(),
            ..Default::default()
        };
        let mem = 64 << 20;
        // Baseline: the same guest, unrecorded.
        let t = Instant::now();
        let mut m = vmm::setup::build_machine(
            image,
            mem,
            &params,
            Box::new(LiveInputs::new(stop.clone(), 0)),
            Box::new(Capture::default()),
            stop.clone(),
        )?;
        m.run()?;
        let plain = t.elapsed().as_secs_f64();

        let log = dir.path().join("bench.ftlog");
        let opts = RecordOptions {
            path: log.clone(),
            digest_every: 1000,
        };
        let rec_out = Capture::default();
        let rec = vmm::solo::run_recorded(
            image,
            mem,
            &params,
            stop.clone(),
            &opts,
            Box::new(rec_out.clone()),
        )?;
        let bytes = std::fs::read(&log)?;
        let rep_out = Capture::default();
        let rep = vmm::replay::run::replay(
            image,
            &bytes,
            None,
            None,
            stop.clone(),
            Box::new(rep_out.clone()),
        )?;
        anyhow::ensure!(
            *rec_out.0.lock().unwrap() == *rep_out.0.lock().unwrap(),
            "{guest}: replay console differs"
        );
        let rs = rec.elapsed.as_secs_f64();
        let ps = rep.elapsed.as_secs_f64();
        println!(
            "{:<22} {:>9} {:>9.1} {:>10.1} {:>11.3} {:>9.3} {:>9.3} {:>9.2}",
            format!("{guest} {args}"),
            rec.boundaries,
            rec.log.bytes as f64 / rec.boundaries.max(1) as f64,
            rec.log.bytes as f64 / 1024.0 / rs,
            plain,
            rs,
            ps,
            rs / plain
        );
        println!(
            "{:<22} replay speed {:.2}x recording; {} events, {} digests",
            "",
            rs / ps,
            rec.log.events,
            rec.log.digests
        );
    }
    Ok(())
}
