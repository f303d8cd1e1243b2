//! The disk image on the host: opened read-write under the lock `ftvm-resync` honours, and
//! created at a given size when it does not exist.

use std::fs::{File, OpenOptions};

use crate::devices::virtio::blk::SECTOR;
use crate::error::VmmError;
use crate::spec::DiskOptions;

/// Opens the disk image read-write under an exclusive advisory lock (the one `ftvm-resync`
/// honours), creating it with `opts.create_size` bytes if it does not exist. Returns the file
/// and its capacity in sectors.
pub fn open_disk(opts: &DiskOptions) -> Result<(File, u64), VmmError> {
    let err = |why: String| VmmError::Disk {
        path: opts.path.display().to_string(),
        why,
    };
    let created = !opts.path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&opts.path)
        .map_err(
            |e| match opts.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                Some(dir) if e.kind() == std::io::ErrorKind::NotFound && !dir.is_dir() => {
                    err(format!("the directory {} does not exist", dir.display()))
                }
                _ => err(e.to_string()),
            },
        )?;
    let file = disksync::lock::DiskLock::lock_exclusive(file, &opts.path)
        .map_err(|e| match e {
            disksync::Error::Locked(_) => {
                err("in use by another process (ftvm-node or ftvm-resync)".into())
            }
            disksync::Error::OpenForWriting { pids, .. } => err(format!(
                "in use by another process: open for writing by process(es) {pids:?}"
            )),
            e => err(e.to_string()),
        })?
        .into_file();
    if created {
        if opts.create_size == 0 || !opts.create_size.is_multiple_of(SECTOR) {
            return Err(err(format!(
                "size {} is not a positive multiple of 512",
                opts.create_size
            )));
        }
        file.set_len(opts.create_size)
            .map_err(|e| err(e.to_string()))?;
        tracing::info!(
            "created disk image {} of {} bytes",
            opts.path.display(),
            opts.create_size
        );
    }
    let len = file.metadata().map_err(|e| err(e.to_string()))?.len();
    if len < SECTOR {
        return Err(err(format!("{len} bytes is smaller than one sector")));
    }
    Ok((file, len / SECTOR))
}
