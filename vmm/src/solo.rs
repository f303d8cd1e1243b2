//! Running one VM unreplicated (`ftvm-node run --solo`) with live inputs, optionally
//! recording them to a log.

use std::fs::File;
use std::sync::Arc;

use crate::devices::tap::{Tap, TapSink};
use crate::devices::virtio::net::{DropFrames, FrameSink};
use crate::epoch::{ConsoleSink, InputError};
use crate::error::VmmError;
use crate::kvm::boot::BootParams;
use crate::live::LiveInputs;
use crate::machine::Outcome;
use crate::replay::codec::End;
use crate::replay::recorder::Recorder;
use crate::replay::LogStats;
use crate::setup::{assemble, VmSetup};
use crate::signals::StopSignal;

/// Options for recording a run.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// The log file to write.
    pub path: std::path::PathBuf,
    /// A memory digest every this many boundaries (0: only at the end).
    pub digest_every: u64,
}

/// What a run did.
#[derive(Debug)]
pub struct RunSummary {
    /// How it ended.
    pub outcome: Outcome,
    /// Boundaries passed.
    pub boundaries: u64,
    /// The log's figures (zero when nothing was recorded).
    pub log: LogStats,
    /// Wall time of the run.
    pub elapsed: std::time::Duration,
    /// The final state.
    pub end: Option<End>,
}

/// Host resources of a live run.
#[derive(Default)]
pub struct HostResources {
    /// The TAP for the NIC.
    pub tap: Option<Arc<Tap>>,
    /// The disk image (from [`crate::devices::disk::open_disk`]; the machine checks its
    /// capacity against the setup's).
    pub disk: Option<File>,
}

/// Runs a VM alone with live inputs (recording them if `record` is given).
pub fn run_live(
    setup: &VmSetup<'_>,
    host: HostResources,
    stop: Arc<StopSignal>,
    record: Option<&RecordOptions>,
    console: Box<dyn ConsoleSink>,
) -> Result<RunSummary, VmmError> {
    let mut live = LiveInputs::new(stop.clone(), 0);
    let sink: Box<dyn FrameSink> = match &host.tap {
        Some(t) => {
            if let Some(net) = &setup.devices.net {
                // The guest's MAC may have been behind another port (a pair member before).
                crate::node::garp::announce(t, net);
            }
            live = live.with_tap(t.clone());
            Box::new(TapSink(t.clone()))
        }
        None => Box::new(DropFrames),
    };
    let t = std::time::Instant::now();
    let (mut m, stats) = match record {
        None => (
            assemble(setup, host.disk, sink, Box::new(live), console, stop, false)?,
            None,
        ),
        Some(opts) => {
            let file = File::create(&opts.path).map_err(|e| {
                VmmError::Input(InputError::Log(format!(
                    "cannot create {}: {e}",
                    opts.path.display()
                )))
            })?;
            let recorder = Recorder::new(
                live,
                std::io::BufWriter::with_capacity(1 << 20, file),
                setup.log_header(opts.digest_every),
            )?;
            let stats = recorder.stats_handle();
            (
                assemble(
                    setup,
                    host.disk,
                    sink,
                    Box::new(recorder),
                    console,
                    stop,
                    true,
                )?,
                Some(stats),
            )
        }
    };
    let outcome = m.run()?;
    tracing::info!(boundaries = m.boundaries(), "VM ended: {outcome:?}");
    let log = stats
        .map(|s| *s.lock().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_default();
    Ok(RunSummary {
        outcome,
        boundaries: m.boundaries(),
        log,
        elapsed: t.elapsed(),
        end: m.end().cloned(),
    })
}

/// Runs `image` alone with live inputs, recording every input (no devices).
pub fn run_recorded(
    image: &[u8],
    mem_size: u64,
    params: &BootParams,
    stop: Arc<StopSignal>,
    opts: &RecordOptions,
    console: Box<dyn ConsoleSink>,
) -> Result<RunSummary, VmmError> {
    let setup = VmSetup::plain(image, mem_size, &params.args);
    run_live(&setup, HostResources::default(), stop, Some(opts), console)
}
