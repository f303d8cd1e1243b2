//! The durable append-only log on the guest's virtio-blk disk.
//!
//! Layout: sector 0 is a header (magic, format version, sector size, log id, CRC-32); the
//! records follow from byte 512, back to back:
//!
//! ```text
//! record  = magic u32 LE ("KVR1") | len u32 LE | crc u32 LE | payload[len]
//! crc     = CRC-32 over (len LE ++ payload), started from the previous record's crc
//!           (the header's crc for the first record)
//! payload = kind u8 (1 = command) | now_ms u64 LE | argc u32 LE | argc × (len u32 LE | bytes)
//! ```
//!
//! Chaining each checksum to the previous one means stale records left further on the disk
//! (from before a truncation) can never be mistaken for part of the log. After the last
//! record the log always has at least four zero bytes (a zero magic): that is a clean end.
//!
//! Writing is group commit: [`LogWriter::append`] collects the records of one loop
//! iteration, [`LogWriter::seal`] turns them into one sector-aligned [`Batch`] (it rewrites
//! the partially filled last sector, whose committed bytes it repeats unchanged, so a torn
//! write of that sector cannot damage them); the caller writes the batch at its offset,
//! flushes, then calls [`LogWriter::mark_durable`] and only then releases the replies.
//!
//! Reading is [`Replayer`] (incremental, for a guest that reads its disk in chunks) or
//! [`replay`] (a whole image in memory): good records are applied to the [`Store`], and the
//! [`Recovery`] says where the log stops and why.

use alloc::vec::Vec;
use core::fmt;

use crate::crc;
use crate::store::Store;

/// Disk sector size: batches start and end on multiples of it.
pub const SECTOR_SIZE: usize = 512;
/// Size of the header at the start of the disk (one sector).
pub const HEADER_LEN: usize = SECTOR_SIZE;
/// Version of the on-disk format written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// Largest record payload accepted (longer length fields are treated as corruption).
pub const MAX_RECORD_PAYLOAD: usize = 64 << 20;
/// Bytes in a record's header (magic, length, checksum).
pub const RECORD_HEADER_LEN: usize = 12;

const HEADER_MAGIC: [u8; 8] = *b"FTVMKVLG";
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"KVR1");
const KIND_COMMAND: u8 = 1;

fn align_down(x: u64) -> u64 {
    x - x % SECTOR_SIZE as u64
}

fn align_up(x: u64) -> u64 {
    align_down(x + SECTOR_SIZE as u64 - 1)
}

fn le32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Builds the header sector for a new log.
fn header_bytes(log_id: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(&HEADER_MAGIC);
    h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    h.extend_from_slice(&log_id.to_le_bytes());
    let c = crc::crc32(&h);
    h.extend_from_slice(&c.to_le_bytes());
    h.resize(HEADER_LEN, 0);
    h
}

/// Why the disk does not start with a usable log header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The first sector is all zeros: a new disk. Start one with [`LogWriter::format`].
    Blank,
    /// The disk is shorter than one sector and not all zeros.
    TooShort,
    /// The first sector is not a kv log header (some other data is on this disk).
    BadMagic,
    /// A kv log of a format version this code does not read.
    UnsupportedVersion(u32),
    /// A kv log written with another sector size.
    BadSectorSize(u32),
    /// The header's checksum does not match (the header sector is damaged).
    BadChecksum,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Blank => f.write_str("blank disk (no log header)"),
            HeaderError::TooShort => f.write_str("disk shorter than one sector"),
            HeaderError::BadMagic => f.write_str("not a kv log (bad header magic)"),
            HeaderError::UnsupportedVersion(v) => write!(f, "unsupported log format version {v}"),
            HeaderError::BadSectorSize(s) => write!(f, "unsupported log sector size {s}"),
            HeaderError::BadChecksum => f.write_str("log header checksum mismatch"),
        }
    }
}

/// Parses the header sector; returns (log id, chain seed).
fn parse_header(h: &[u8]) -> Result<(u64, u32), HeaderError> {
    if h.iter().all(|&b| b == 0) {
        return Err(HeaderError::Blank);
    }
    if h.len() < HEADER_LEN {
        return Err(HeaderError::TooShort);
    }
    if h[..8] != HEADER_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let stored = le32(&h[24..]);
    if crc::crc32(&h[..24]) != stored {
        return Err(HeaderError::BadChecksum);
    }
    let version = le32(&h[8..]);
    if version != FORMAT_VERSION {
        return Err(HeaderError::UnsupportedVersion(version));
    }
    let sector = le32(&h[12..]);
    if sector as usize != SECTOR_SIZE {
        return Err(HeaderError::BadSectorSize(sector));
    }
    Ok((le64(&h[16..]), stored))
}

/// Where and why replay stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A zero magic: the log ends here as written. Nothing was lost.
    Clean,
    /// The log runs up to the very end of the disk.
    EndOfImage,
    /// The disk ends inside a record (a torn write, or an image cut short).
    Truncated,
    /// Bytes that are not a record header (corruption or a torn write).
    BadMagic(u32),
    /// A record header with an impossible length.
    BadLength(u32),
    /// A record whose checksum does not match (a torn or corrupted write, or stale data
    /// from before an earlier truncation).
    BadChecksum,
    /// A record with a good checksum but a payload this code cannot decode.
    BadPayload,
}

impl Stop {
    /// Whether the log ended as written (nothing to truncate, nothing lost).
    pub fn is_clean(&self) -> bool {
        matches!(self, Stop::Clean | Stop::EndOfImage)
    }
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Clean => f.write_str("clean end of log"),
            Stop::EndOfImage => f.write_str("log fills the disk"),
            Stop::Truncated => f.write_str("torn record: the disk ends inside it"),
            Stop::BadMagic(m) => write!(f, "corrupt record header (magic {m:#010x})"),
            Stop::BadLength(l) => write!(f, "corrupt record header (length {l})"),
            Stop::BadChecksum => f.write_str("record checksum mismatch (torn or corrupt)"),
            Stop::BadPayload => f.write_str("undecodable record payload"),
        }
    }
}

/// The outcome of replaying a log: what was recovered and where the log ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Recovery {
    /// Byte offset just past the last good record: the log is truncated here and new
    /// records are appended from here.
    pub end: u64,
    /// Number of records replayed into the store.
    pub records: u64,
    /// Why replay stopped at `end`.
    pub stop: Stop,
    /// The log's identity, chosen when it was formatted.
    pub log_id: u64,
    chain: u32,
    /// Disk bytes from `align_down(end)` to `end` (the good part of the last sector).
    tail: Vec<u8>,
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kv log: replayed {} records; log ends at byte {}: {}",
            self.records, self.end, self.stop
        )?;
        if !self.stop.is_clean() {
            f.write_str("; truncating the log there")?;
        }
        Ok(())
    }
}

/// Decodes a command payload into (now_ms, args).
fn decode_command(p: &[u8]) -> Option<(u64, Vec<Vec<u8>>)> {
    if p.len() < 13 || p[0] != KIND_COMMAND {
        return None;
    }
    let now = le64(&p[1..]);
    let argc = le32(&p[9..]) as usize;
    let mut pos = 13;
    let mut args = Vec::with_capacity(argc.min(p.len() / 4));
    for _ in 0..argc {
        let len = le32(p.get(pos..pos + 4)?) as usize;
        pos += 4;
        args.push(p.get(pos..pos.checked_add(len)?)?.to_vec());
        pos += len;
    }
    (pos == p.len() && !args.is_empty()).then_some((now, args))
}

/// Reads a log incrementally: feed it the disk from byte 0 in chunks of any size, and it
/// applies each good record to the store as soon as it is complete.
#[derive(Debug)]
pub struct Replayer {
    buf: Vec<u8>,
    /// Disk offset of `buf[0]`.
    base: u64,
    /// Disk offset of the next record.
    pos: u64,
    header: Option<Result<(u64, u32), HeaderError>>,
    chain: u32,
    records: u64,
    stop: Option<Stop>,
    scratch: Vec<u8>,
}

impl Default for Replayer {
    fn default() -> Self {
        Self::new()
    }
}

impl Replayer {
    /// A replayer positioned at byte 0 of the disk.
    pub fn new() -> Self {
        Replayer {
            buf: Vec::new(),
            base: 0,
            pos: HEADER_LEN as u64,
            header: None,
            chain: 0,
            records: 0,
            stop: None,
            scratch: Vec::new(),
        }
    }

    /// The disk offset the next chunk must start at.
    pub fn next_offset(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// Feeds the next `chunk` of the disk (starting at [`Replayer::next_offset`]) and
    /// replays every record it completes into `store`. Returns true once the end of the
    /// log has been found: read no more and call [`Replayer::finish`].
    pub fn feed(&mut self, chunk: &[u8], store: &mut Store) -> bool {
        if self.is_done() {
            return true;
        }
        self.buf.extend_from_slice(chunk);
        if self.header.is_none() {
            if self.buf.len() < HEADER_LEN {
                return false;
            }
            let h = parse_header(&self.buf[..HEADER_LEN]);
            if let Ok((_, seed)) = h {
                self.chain = seed;
            }
            self.header = Some(h);
            if self.header.as_ref().is_some_and(|h| h.is_err()) {
                return true;
            }
        }
        while self.stop.is_none() {
            let off = (self.pos - self.base) as usize;
            let avail = &self.buf[off..];
            if avail.len() < 4 {
                break;
            }
            let magic = le32(avail);
            if magic == 0 {
                self.stop = Some(Stop::Clean);
                break;
            }
            if magic != RECORD_MAGIC {
                self.stop = Some(Stop::BadMagic(magic));
                break;
            }
            if avail.len() < RECORD_HEADER_LEN {
                break;
            }
            let len = le32(&avail[4..]);
            if len as usize > MAX_RECORD_PAYLOAD || len < 13 {
                self.stop = Some(Stop::BadLength(len));
                break;
            }
            let total = RECORD_HEADER_LEN + len as usize;
            if avail.len() < total {
                break;
            }
            let payload = &avail[RECORD_HEADER_LEN..total];
            let c = crc::update(crc::update(self.chain, &avail[4..8]), payload);
            if c != le32(&avail[8..]) {
                self.stop = Some(Stop::BadChecksum);
                break;
            }
            let Some((now, args)) = decode_command(payload) else {
                self.stop = Some(Stop::BadPayload);
                break;
            };
            store.apply_logged(&args, now, &mut self.scratch);
            self.chain = c;
            self.records += 1;
            self.pos += total as u64;
        }
        // Keep only the bytes from the start of the sector holding `pos`.
        let keep_from = align_down(self.pos).max(self.base);
        let drop = (keep_from - self.base) as usize;
        if drop > 0 {
            self.buf.drain(..drop);
            self.base = keep_from;
        }
        self.is_done()
    }

    fn is_done(&self) -> bool {
        self.stop.is_some() || self.header.as_ref().is_some_and(|h| h.is_err())
    }

    /// Ends replay (at the end of the log, or at the end of the disk) and reports where
    /// the log stops and why.
    pub fn finish(self) -> Result<Recovery, HeaderError> {
        let (log_id, _) = match self.header {
            Some(h) => h?,
            None => {
                parse_header(&self.buf)?;
                return Err(HeaderError::TooShort);
            }
        };
        let off = (self.pos - self.base) as usize;
        let stop = match self.stop {
            Some(s) => s,
            None if self.buf.len() <= off => Stop::EndOfImage,
            None if self.buf[off..].len() < 4 && self.buf[off..].iter().all(|&b| b == 0) => {
                Stop::Clean
            }
            None => Stop::Truncated,
        };
        Ok(Recovery {
            end: self.pos,
            records: self.records,
            stop,
            log_id,
            chain: self.chain,
            tail: self.buf[..off.min(self.buf.len())].to_vec(),
        })
    }
}

/// Replays a whole disk image held in memory into `store` (see [`Replayer`]).
pub fn replay(image: &[u8], store: &mut Store) -> Result<Recovery, HeaderError> {
    let mut r = Replayer::new();
    r.feed(image, store);
    r.finish()
}

/// Why a record could not be appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogError {
    /// The disk has no room left for it.
    Full,
    /// The record is larger than [`MAX_RECORD_PAYLOAD`].
    TooLarge,
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::Full => f.write_str("the disk log is full"),
            LogError::TooLarge => f.write_str("the record is too large for the disk log"),
        }
    }
}

/// One group-commit write: `bytes` (a multiple of [`SECTOR_SIZE`]) go to disk byte
/// `offset` (sector aligned). After the write and a flush complete, call
/// [`LogWriter::mark_durable`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Disk byte offset to write at (a multiple of [`SECTOR_SIZE`]).
    pub offset: u64,
    /// The sectors to write.
    pub bytes: Vec<u8>,
    /// [`LogWriter::appended`] at the time of sealing: once this batch is durable, every
    /// reply tagged with a count up to this one may be released.
    pub upto: u64,
}

/// Builds group-commit batches of records. At most one batch is in flight at a time
/// (consecutive batches overlap in their shared sector, so they must reach the disk in
/// order).
#[derive(Clone, Debug)]
pub struct LogWriter {
    capacity: u64,
    /// Disk offset (sector aligned) of `pending[0]`.
    base: u64,
    /// Disk bytes from `base` to the end of the log, including records not yet sealed.
    pending: Vec<u8>,
    chain: u32,
    appended: u64,
    sealed: u64,
    durable: u64,
    in_flight: Option<u64>,
    /// The next batch must be written even without new records (a new header, or a
    /// damaged tail to overwrite).
    must_write: bool,
}

impl LogWriter {
    /// Starts a new, empty log on a disk of `capacity` bytes. The first batch (sealed even
    /// without records) writes the header. `log_id` should be fresh entropy.
    pub fn format(capacity: u64, log_id: u64) -> Result<Self, LogError> {
        if capacity < 2 * SECTOR_SIZE as u64 {
            return Err(LogError::Full);
        }
        let pending = header_bytes(log_id);
        let chain = le32(&pending[24..]);
        Ok(LogWriter {
            capacity,
            base: 0,
            pending,
            chain,
            appended: 0,
            sealed: 0,
            durable: 0,
            in_flight: None,
            must_write: true,
        })
    }

    /// Continues the log that [`replay`] recovered, on a disk of `capacity` bytes. If the
    /// log had a damaged tail, the first batch (sealed even without records) overwrites it,
    /// which is the truncation.
    pub fn resume(rec: &Recovery, capacity: u64) -> Self {
        LogWriter {
            capacity,
            base: align_down(rec.end),
            pending: rec.tail.clone(),
            chain: rec.chain,
            appended: 0,
            sealed: 0,
            durable: 0,
            in_flight: None,
            must_write: !rec.stop.is_clean(),
        }
    }

    /// Bytes a record of `args` takes on disk.
    pub fn record_len(args: &[Vec<u8>]) -> usize {
        RECORD_HEADER_LEN + 13 + args.iter().map(|a| 4 + a.len()).sum::<usize>()
    }

    /// Disk offset where the next record goes.
    pub fn end(&self) -> u64 {
        self.base + self.pending.len() as u64
    }

    /// Bytes of records that can still be appended before the disk is full.
    pub fn room(&self) -> u64 {
        // Keep room for the zero magic that marks the end.
        align_down(self.capacity).saturating_sub(self.end() + 4)
    }

    /// Appends a command record (`args` as given by `Outcome::log_args`, run at
    /// `now_ms`) to the batch being built.
    pub fn append(&mut self, now_ms: u64, args: &[Vec<u8>]) -> Result<(), LogError> {
        let len = Self::record_len(args);
        if len - RECORD_HEADER_LEN > MAX_RECORD_PAYLOAD {
            return Err(LogError::TooLarge);
        }
        if len as u64 > self.room() {
            return Err(LogError::Full);
        }
        let start = self.pending.len();
        self.pending.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        self.pending
            .extend_from_slice(&((len - RECORD_HEADER_LEN) as u32).to_le_bytes());
        self.pending.extend_from_slice(&[0; 4]);
        self.pending.push(KIND_COMMAND);
        self.pending.extend_from_slice(&now_ms.to_le_bytes());
        self.pending
            .extend_from_slice(&(args.len() as u32).to_le_bytes());
        for a in args {
            self.pending
                .extend_from_slice(&(a.len() as u32).to_le_bytes());
            self.pending.extend_from_slice(a);
        }
        let c = crc::update(
            crc::update(self.chain, &self.pending[start + 4..start + 8]),
            &self.pending[start + RECORD_HEADER_LEN..],
        );
        self.pending[start + 8..start + 12].copy_from_slice(&c.to_le_bytes());
        self.chain = c;
        self.appended += 1;
        Ok(())
    }

    /// Number of records appended since this writer was created.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Number of records known to be on disk (flushed).
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Whether a batch is being written (sealed, not yet marked durable).
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Whether there is something for [`LogWriter::seal`] to write.
    pub fn has_unsealed(&self) -> bool {
        self.must_write || self.appended > self.sealed
    }

    /// Closes the current batch: returns the sectors to write, or None if there is nothing
    /// to write or a batch is still in flight.
    pub fn seal(&mut self) -> Option<Batch> {
        if self.in_flight.is_some() || !self.has_unsealed() {
            return None;
        }
        let end = self.end();
        let total = (align_up(end + 4) - self.base) as usize;
        let mut bytes = Vec::with_capacity(total);
        bytes.extend_from_slice(&self.pending);
        bytes.resize(total, 0);
        let batch = Batch {
            offset: self.base,
            bytes,
            upto: self.appended,
        };
        let new_base = align_down(end);
        self.pending.drain(..(new_base - self.base) as usize);
        self.base = new_base;
        self.sealed = self.appended;
        self.in_flight = Some(self.appended);
        self.must_write = false;
        Some(batch)
    }

    /// Records that the batch returned by the last [`LogWriter::seal`] has been written and
    /// flushed: replies waiting for its records may now be released.
    pub fn mark_durable(&mut self) {
        if let Some(upto) = self.in_flight.take() {
            self.durable = upto;
        }
    }
}

#[cfg(test)]
mod tests;
