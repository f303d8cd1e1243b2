//! Replaying a recording from its start to its end (`ftvm-node replay`): checking that the
//! log fits the image, assembling the recorded machine with the log as its input source, and
//! running it; any divergence ends the replay with an error.

use std::path::Path;
use std::sync::Arc;

use crate::devices::disk::open_disk;
use crate::devices::virtio::net::DropFrames;
use crate::epoch::{ConsoleSink, InputError};
use crate::error::VmmError;
use crate::replay::codec::Header;
use crate::replay::replayer::Replayer;
use crate::setup::{assemble, VmSetup};
use crate::signals::StopSignal;
use crate::solo::RunSummary;
use crate::spec::{DeviceSpec, DiskOptions};

/// Checks that a log was recorded from this image and memory size, before anything runs.
pub fn check_header(h: &Header, image: &[u8], mem_size: u64) -> Result<(), String> {
    if h.image_hash != *blake3::hash(image).as_bytes() {
        return Err("the log was recorded with a different guest image".into());
    }
    if h.mem_size != mem_size {
        return Err(format!(
            "the log was recorded with {} bytes of guest memory, not {mem_size}",
            h.mem_size
        ));
    }
    if h.cpuid_hash != crate::kvm::cpuid::baseline_hash() {
        return Err("the log was recorded with a different CPUID table".into());
    }
    Ok(())
}

/// Replays `log` against `image`; `mem_size` defaults to the recorded size; `disk` is a copy
/// of the disk image as it was when the recording started (required if the VM had a disk).
/// Transmitted frames are dropped. Returns the summary when the replay ended exactly as the
/// recording did; a divergence is an error.
pub fn replay(
    image: &[u8],
    log: &[u8],
    mem_size: Option<u64>,
    disk: Option<&Path>,
    stop: Arc<StopSignal>,
    console: Box<dyn ConsoleSink>,
) -> Result<RunSummary, VmmError> {
    let refuse = |e: String| VmmError::Input(InputError::Log(format!("refused: {e}")));
    let replayer =
        Replayer::from_bytes(log).map_err(|e| VmmError::Input(InputError::Log(e.to_string())))?;
    let h = replayer.header().clone();
    let mem_size = mem_size.unwrap_or(h.mem_size);
    check_header(&h, image, mem_size).map_err(refuse)?;
    let devices = DeviceSpec::parse(&h.machine).map_err(refuse)?;
    let disk_file = match (devices.disk_sectors, disk) {
        (Some(_), None) => return Err(refuse("the recorded VM had a disk: give a copy of it as it was when the recording started (--disk)".into())),
        (Some(sectors), Some(p)) => {
            let (f, s) = open_disk(&DiskOptions {
                path: p.to_path_buf(),
                create_size: 0,
            })?;
            if s != sectors {
                return Err(refuse(format!("the recorded disk had {sectors} sectors, {} has {s}", p.display())));
            }
            Some(f)
        }
        (None, _) => None,
    };
    let setup = VmSetup {
        image,
        mem_size,
        args: h.args.clone(),
        devices,
    };
    let log_stats = replayer.stats();
    let t = std::time::Instant::now();
    let mut m = assemble(
        &setup,
        disk_file,
        Box::new(DropFrames),
        Box::new(replayer),
        console,
        stop,
        true,
    )?;
    let outcome = m.run()?;
    Ok(RunSummary {
        outcome,
        boundaries: m.boundaries(),
        log: log_stats,
        elapsed: t.elapsed(),
        end: m.end().cloned(),
    })
}
