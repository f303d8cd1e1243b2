//! The advisory disk lock shared by `ftvm-resync` and `ftvm-node`.
//!
//! It is a `flock(2)` on the image file itself: whoever writes a disk (the node's VMM, a
//! `pull`) holds it exclusively; a `serve` (read-only) holds it shared. A process that finds
//! the lock taken is refused at once instead of waiting. The lock lives as long as the
//! [`DiskLock`] (it is released when its file is closed, also when the process dies).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// An open disk image holding an advisory `flock`.
#[derive(Debug)]
pub struct DiskLock {
    file: File,
    path: PathBuf,
    exclusive: bool,
}

impl DiskLock {
    /// Opens `path` read-write and locks it exclusively. Fails with [`Error::Locked`] if any
    /// other holder (shared or exclusive) has it.
    pub fn exclusive(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        match file.try_lock() {
            Ok(()) => Ok(Self {
                file,
                path: path.to_owned(),
                exclusive: true,
            }),
            Err(TryLockError::WouldBlock) => Err(Error::Locked(path.to_owned())),
            Err(TryLockError::Error(e)) => Err(Error::io("lock", path, e)),
        }
    }

    /// Opens `path` read-only and locks it shared. Fails with [`Error::Locked`] if a writer
    /// holds it exclusively.
    pub fn shared(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        match file.try_lock_shared() {
            Ok(()) => Ok(Self {
                file,
                path: path.to_owned(),
                exclusive: false,
            }),
            Err(TryLockError::WouldBlock) => Err(Error::Locked(path.to_owned())),
            Err(TryLockError::Error(e)) => Err(Error::io("lock", path, e)),
        }
    }

    /// The open image.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True for an exclusive (writer's) lock.
    pub fn is_exclusive(&self) -> bool {
        self.exclusive
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_excludes_everyone_readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, b"x").unwrap();
        {
            let _w = DiskLock::exclusive(&p).unwrap();
            assert!(matches!(DiskLock::exclusive(&p), Err(Error::Locked(_))));
            assert!(matches!(DiskLock::shared(&p), Err(Error::Locked(_))));
        }
        let r1 = DiskLock::shared(&p).unwrap();
        let _r2 = DiskLock::shared(&p).unwrap();
        assert!(matches!(DiskLock::exclusive(&p), Err(Error::Locked(_))));
        assert!(!r1.is_exclusive());
        drop(r1);
        drop(_r2);
        assert!(DiskLock::exclusive(&p).unwrap().is_exclusive());
    }
}
