//! The advisory disk lock shared by `ftvm-resync` and `ftvm-node`.
//!
//! It is a `flock(2)` on the image file itself: whoever writes a disk (the node's VMM, a
//! `pull`) holds it exclusively; a `serve` (read-only) holds it shared. A process that finds
//! the lock taken is refused at once instead of waiting. The lock lives as long as the
//! [`DiskLock`] (it is released when its file is closed, also when the process dies).
//!
//! Tools that do not take the lock are caught too where possible: after locking, `/proc` is
//! searched for other processes that have the image open for writing ([`open_for_writing`]).

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::MetadataExt;
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
        Self::lock_exclusive(file, path)
    }

    /// Locks `file`, already opened read-write from `path` (by a caller that opens it its own
    /// way, e.g. creating it), exclusively, with the same checks as [`DiskLock::exclusive`].
    pub fn lock_exclusive(file: File, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        match file.try_lock() {
            Ok(()) => Self::no_other_writer(Self {
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
            Ok(()) => Self::no_other_writer(Self {
                file,
                path: path.to_owned(),
                exclusive: false,
            }),
            Err(TryLockError::WouldBlock) => Err(Error::Locked(path.to_owned())),
            Err(TryLockError::Error(e)) => Err(Error::io("lock", path, e)),
        }
    }

    fn no_other_writer(self) -> Result<Self> {
        let pids = open_for_writing(&self.path);
        if pids.is_empty() {
            Ok(self)
        } else {
            Err(Error::OpenForWriting {
                path: self.path.clone(),
                pids,
            })
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

    /// The open image, still locked: the lock belongs to the open file and lasts until the
    /// file (and every descriptor duplicated from it) is closed.
    pub fn into_file(self) -> File {
        self.file
    }
}

/// Other processes that have the file at `path` open for writing, found through
/// `/proc/PID/fd` and `/proc/PID/fdinfo` (processes whose entries cannot be read are skipped;
/// this process is never listed).
pub fn open_for_writing(path: &Path) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(meta) = std::fs::metadata(path) else {
        return out;
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            // metadata() follows the fd link to the open file itself.
            match std::fs::metadata(fd.path()) {
                Ok(m) if m.dev() == dev && m.ino() == ino => {}
                _ => continue,
            }
            let info = std::fs::read_to_string(p.path().join("fdinfo").join(fd.file_name()))
                .unwrap_or_default();
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
                .unwrap_or(0);
            if flags & 0o3 != 0 {
                // O_WRONLY or O_RDWR
                out.push(pid);
                break;
            }
        }
    }
    out
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

    #[test]
    fn a_file_opened_by_the_caller_keeps_its_lock() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        let open = || {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .unwrap()
        };
        let f = DiskLock::lock_exclusive(open(), &p).unwrap().into_file();
        assert!(matches!(
            DiskLock::lock_exclusive(open(), &p),
            Err(Error::Locked(_))
        ));
        assert!(matches!(DiskLock::shared(&p), Err(Error::Locked(_))));
        drop(f);
        assert!(DiskLock::shared(&p).is_ok());
    }

    #[test]
    fn writers_without_the_lock_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, b"x").unwrap();
        assert!(open_for_writing(&p).is_empty());
        // Another process writing the file without taking the lock.
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec 3>>'{}'; echo ready; read _", p.display()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
            &mut line,
        )
        .unwrap();
        assert_eq!(line.trim(), "ready");
        assert_eq!(open_for_writing(&p), vec![child.id()]);
        assert!(matches!(
            DiskLock::shared(&p),
            Err(Error::OpenForWriting { .. })
        ));
        assert!(matches!(
            DiskLock::exclusive(&p),
            Err(Error::OpenForWriting { .. })
        ));
        drop(child.stdin.take());
        child.wait().unwrap();
        assert!(open_for_writing(&p).is_empty());
        assert!(DiskLock::exclusive(&p).is_ok());
    }
}
