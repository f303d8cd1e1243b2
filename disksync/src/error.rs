//! Errors of the disksync library.

use std::path::PathBuf;

/// Result alias of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in a resync.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file. The message includes the OS error, so it is not also
    /// given as the error's source (a `{:#}` chain would print it twice).
    #[error("{what} {path}: {cause}")]
    Io {
        what: &'static str,
        path: PathBuf,
        cause: std::io::Error,
    },
    /// Another process holds the disk (an advisory lock conflicts).
    #[error("disk {0} is in use by another process (advisory lock held); stop it or let ftvm-node coordinate the resync")]
    Locked(PathBuf),
    /// Another process has the disk open for writing (without taking the lock).
    #[error("disk {path} is in use: open for writing by process(es) {pids:?}")]
    OpenForWriting { path: PathBuf, pids: Vec<u32> },
    /// Source and target differ in size and resizing was not allowed.
    #[error("size mismatch: source is {source_size} bytes, target is {target_size} bytes (pass --resize to change the target)")]
    SizeMismatch { source_size: u64, target_size: u64 },
    /// A malformed, truncated or unexpected protocol message.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer reported an error and ended the session.
    #[error("peer reported an error: {0}")]
    Remote(String),
    /// QUIC connection or TLS failure.
    #[error("connection: {0}")]
    Connection(String),
    /// A block's data does not match the hash the source announced for it.
    #[error("block {index}: data received does not match the source's hash (source changed during the resync, or corruption)")]
    BlockMismatch { index: u64 },
    /// The final root hashes differ.
    #[error("root hash mismatch after resync: local {local}, source {remote}")]
    RootMismatch { local: String, remote: String },
    /// A sidecar file (record, cache, state) is malformed or does not fit the disk.
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
    /// Invalid parameters.
    #[error("{0}")]
    Invalid(String),
    /// A fault injected by the test hooks fired (the serving side ends on it).
    #[error("fault injection: {0}")]
    Injected(crate::session::Fault),
    /// The operation was cancelled.
    #[error("interrupted; what was written is kept, rerun to resume")]
    Cancelled,
}

impl Error {
    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            what,
            path: path.into(),
            cause: source,
        }
    }

    pub(crate) fn bad_file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::BadFile {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
