//! The durable append-only log on the guest's virtio-blk disk.
//!
//! # Layout
//!
//! ```text
//! sector 0, sector 1   two header slots; the valid one with the highest generation rules
//! byte 1024 …          region 0 | region 1   (the disk's remaining space, halved)
//!
//! header  = magic "FTVMKVLG" | version u32 | sector size u32 | log id u64 | generation u64
//!           | region start u64 | region length u64 | crc32 of the above      (all LE)
//! record  = magic u32 "KVR1" | len u32 | crc u32 | payload[len]
//! crc     = CRC-32 over (len LE ++ payload), started from the previous record's crc
//!           (from the header's crc for the first record of a region)
//! payload = kind u8 (1 = command) | now_ms u64 | argc u32 | argc × (len u32 | bytes)
//! ```
//!
//! The records of the current generation run back to back from the start of the header's
//! region; after the last one there are at least four zero bytes (a zero magic): a clean end.
//! Chaining each checksum to the previous one (and the first to the header) means stale
//! records further on, left by an earlier truncation or an earlier generation, can never be
//! taken for part of the log.
//!
//! # Writing: group commit
//!
//! [`LogWriter::append`] collects the records of one loop iteration; [`LogWriter::seal`]
//! turns them into one sector-aligned [`Batch`]. It rewrites the partly filled last sector,
//! repeating its committed bytes unchanged, so a torn write of that sector cannot damage
//! them. The caller writes the batch at its offset, flushes, calls
//! [`LogWriter::mark_durable`], and only then releases the replies (see `Connection`).
//!
//! # Compaction
//!
//! When the active region is half full ([`LogWriter::should_compact`]),
//! [`LogWriter::compact`] writes a snapshot of the store (records that rebuild it) into the
//! other region, then a new header (next generation) pointing there, each through the normal
//! seal/write/flush/mark_durable cycle. A crash before the header write leaves the old
//! generation in force, untouched; after it, the new one.
//!
//! # Reading
//!
//! [`Replayer`] (incremental, for a guest reading its disk in chunks) or [`replay`] (a whole
//! image in memory): good records are applied to the [`Store`], and the [`Recovery`] says
//! where the log stops and why.

use alloc::vec::Vec;
use core::fmt;

use crate::crc;
use crate::store::{Store, Value};

/// Disk sector size: batches start and end on multiples of it.
pub const SECTOR_SIZE: usize = 512;
/// Bytes at the start of the disk taken by the two header slots.
pub const HEADER_AREA: usize = 2 * SECTOR_SIZE;
/// Version of the on-disk format written by this code.
pub const FORMAT_VERSION: u32 = 1;
/// Largest record payload accepted (longer length fields are treated as corruption).
pub const MAX_RECORD_PAYLOAD: usize = 64 << 20;
/// Bytes in a record's header (magic, length, checksum).
pub const RECORD_HEADER_LEN: usize = 12;
/// Smallest disk a log can be formatted on.
pub const MIN_CAPACITY: u64 = HEADER_AREA as u64 + 4 * SECTOR_SIZE as u64;

const HEADER_MAGIC: [u8; 8] = *b"FTVMKVLG";
const HEADER_CRC_AT: usize = 48;
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"KVR1");
const KIND_COMMAND: u8 = 1;
/// Snapshot records carry at most this many elements of a container each.
const SNAPSHOT_CHUNK: usize = 256;
/// … and about this many bytes of them (so a record stays far below the payload limit).
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

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

/// Length of each of the two regions on a disk of `capacity` bytes.
fn region_len(capacity: u64) -> u64 {
    align_down(capacity.saturating_sub(HEADER_AREA as u64) / 2)
}

/// A decoded header slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    log_id: u64,
    generation: u64,
    start: u64,
    len: u64,
    /// The header's checksum: the chain seed of its region's first record.
    crc: u32,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut h = Vec::with_capacity(SECTOR_SIZE);
        h.extend_from_slice(&HEADER_MAGIC);
        h.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        h.extend_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        h.extend_from_slice(&self.log_id.to_le_bytes());
        h.extend_from_slice(&self.generation.to_le_bytes());
        h.extend_from_slice(&self.start.to_le_bytes());
        h.extend_from_slice(&self.len.to_le_bytes());
        let c = crc::crc32(&h);
        h.extend_from_slice(&c.to_le_bytes());
        h.resize(SECTOR_SIZE, 0);
        h
    }

    /// A header for generation `generation` in region `generation % 2` (slot likewise),
    /// regions being `len` bytes long.
    fn new(log_id: u64, generation: u64, len: u64) -> Header {
        let start = HEADER_AREA as u64 + (generation % 2) * len;
        let mut h = Header {
            log_id,
            generation,
            start,
            len,
            crc: 0,
        };
        h.crc = le32(&h.encode()[HEADER_CRC_AT..]);
        h
    }

    /// Disk offset of this generation's header slot.
    fn slot_offset(&self) -> u64 {
        (self.generation % 2) * SECTOR_SIZE as u64
    }

    fn decode(h: &[u8]) -> Result<Header, HeaderError> {
        if h.iter().all(|&b| b == 0) {
            return Err(HeaderError::Blank);
        }
        if h[..8] != HEADER_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let stored = le32(&h[HEADER_CRC_AT..]);
        if crc::crc32(&h[..HEADER_CRC_AT]) != stored {
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
        let hdr = Header {
            log_id: le64(&h[16..]),
            generation: le64(&h[24..]),
            start: le64(&h[32..]),
            len: le64(&h[40..]),
            crc: stored,
        };
        let sane = hdr.start >= HEADER_AREA as u64
            && hdr.start.is_multiple_of(SECTOR_SIZE as u64)
            && hdr.len >= 2 * SECTOR_SIZE as u64
            && hdr.start.checked_add(hdr.len).is_some();
        if !sane {
            return Err(HeaderError::BadChecksum);
        }
        Ok(hdr)
    }
}

/// Picks the header in force from the two slots (the valid one with the higher generation).
fn parse_headers(area: &[u8]) -> Result<Header, HeaderError> {
    if area.iter().all(|&b| b == 0) {
        return Err(HeaderError::Blank);
    }
    if area.len() < HEADER_AREA {
        return Err(HeaderError::TooShort);
    }
    let a = Header::decode(&area[..SECTOR_SIZE]);
    let b = Header::decode(&area[SECTOR_SIZE..HEADER_AREA]);
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if a.generation >= b.generation { a } else { b }),
        (Ok(h), Err(_)) | (Err(_), Ok(h)) => Ok(h),
        // Report the more telling error (a zero slot says only "blank").
        (Err(HeaderError::Blank), Err(e)) | (Err(e), _) => Err(e),
    }
}

/// Why the disk does not start with a usable log header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The header sectors are all zeros: a new disk. Start one with [`LogWriter::format`].
    Blank,
    /// The disk is shorter than the header area and not all zeros.
    TooShort,
    /// Not a kv log (some other data is on this disk).
    BadMagic,
    /// A kv log of a format version this code does not read.
    UnsupportedVersion(u32),
    /// A kv log written with another sector size.
    BadSectorSize(u32),
    /// Both header slots are damaged.
    BadChecksum,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderError::Blank => f.write_str("blank disk (no log header)"),
            HeaderError::TooShort => f.write_str("disk shorter than the log header"),
            HeaderError::BadMagic => f.write_str("not a kv log (bad header magic)"),
            HeaderError::UnsupportedVersion(v) => write!(f, "unsupported log format version {v}"),
            HeaderError::BadSectorSize(s) => write!(f, "unsupported log sector size {s}"),
            HeaderError::BadChecksum => f.write_str("log header damaged (checksum mismatch)"),
        }
    }
}

/// Where and why replay stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A zero magic: the log ends here as written. Nothing was lost.
    Clean,
    /// The log runs up to the end of its region (or the disk image ends exactly at a record
    /// boundary).
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
            Stop::EndOfImage => f.write_str("log fills its space"),
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
    /// The generation in force (it grows by one at each compaction).
    pub generation: u64,
    header: Header,
    chain: u32,
    /// Disk bytes from `align_down(end)` to `end` (the good part of the last sector).
    tail: Vec<u8>,
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kv log: generation {}: replayed {} records; log ends at byte {}: {}",
            self.generation, self.records, self.end, self.stop
        )?;
        if !self.stop.is_clean() {
            f.write_str("; truncating the log there")?;
        }
        Ok(())
    }
}

/// Encodes a command payload.
fn encode_command<A: AsRef<[u8]>>(out: &mut Vec<u8>, now_ms: u64, args: &[A]) {
    out.push(KIND_COMMAND);
    out.extend_from_slice(&now_ms.to_le_bytes());
    out.extend_from_slice(&(args.len() as u32).to_le_bytes());
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(&(a.len() as u32).to_le_bytes());
        out.extend_from_slice(a);
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

/// Reads a log incrementally: give it the disk in chunks, each starting at
/// [`Replayer::next_offset`] (it skips the region not in force), and it applies each good
/// record to the store as soon as it is complete.
#[derive(Debug)]
pub struct Replayer {
    buf: Vec<u8>,
    /// Disk offset of `buf[0]`.
    base: u64,
    /// Disk offset of the next record.
    pos: u64,
    header: Option<Result<Header, HeaderError>>,
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
    /// A replayer that wants the disk from byte 0.
    pub fn new() -> Self {
        Replayer {
            buf: Vec::new(),
            base: 0,
            pos: 0,
            header: None,
            chain: 0,
            records: 0,
            stop: None,
            scratch: Vec::new(),
        }
    }

    /// The disk offset the next chunk must start at (sector aligned as long as every chunk
    /// fed is a multiple of [`SECTOR_SIZE`]).
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
            if self.buf.len() < HEADER_AREA {
                return false;
            }
            let h = parse_headers(&self.buf[..HEADER_AREA]);
            self.header = Some(h);
            match h {
                Err(_) => return true,
                Ok(h) => {
                    self.chain = h.crc;
                    self.pos = h.start;
                    // Skip to the region in force.
                    let skip = (h.start - self.base).min(self.buf.len() as u64) as usize;
                    self.buf.drain(..skip);
                    self.base += skip as u64;
                    if self.base < h.start {
                        self.buf.clear();
                        self.base = h.start;
                    }
                }
            }
        }
        let region_end = match self.header {
            Some(Ok(h)) => h.start + h.len,
            _ => return true,
        };
        while self.stop.is_none() {
            let off = (self.pos - self.base) as usize;
            let room = region_end - self.pos;
            if room < 4 {
                self.stop = Some(Stop::EndOfImage);
                break;
            }
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
            let total = RECORD_HEADER_LEN as u64 + len as u64;
            if len as usize > MAX_RECORD_PAYLOAD || len < 13 || total > room {
                self.stop = Some(Stop::BadLength(len));
                break;
            }
            let total = total as usize;
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
        let header = match self.header {
            Some(h) => h?,
            None => {
                parse_headers(&self.buf)?;
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
            log_id: header.log_id,
            generation: header.generation,
            header,
            chain: self.chain,
            tail: self.buf[..off.min(self.buf.len())].to_vec(),
        })
    }
}

/// Replays a whole disk image held in memory into `store` (see [`Replayer`]).
pub fn replay(image: &[u8], store: &mut Store) -> Result<Recovery, HeaderError> {
    let mut r = Replayer::new();
    loop {
        let at = r.next_offset().min(image.len() as u64) as usize;
        if r.feed(&image[at..], store) || r.next_offset() >= image.len() as u64 {
            break;
        }
    }
    r.finish()
}

/// Why a record could not be appended, or a log not be started or compacted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogError {
    /// The disk has no room left for it.
    Full,
    /// The record is larger than [`MAX_RECORD_PAYLOAD`].
    TooLarge,
    /// Compaction needs a quiet log: nothing unsealed and no batch in flight.
    Busy,
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::Full => f.write_str("the disk log is full"),
            LogError::TooLarge => f.write_str("the record is too large for the disk log"),
            LogError::Busy => f.write_str("the disk log is busy"),
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
    /// [`LogWriter::durable`] once this batch is on disk (replies tagged up to this count
    /// may then be released).
    pub upto: u64,
}

/// Where a writer is in a compaction.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Appending to the region in force.
    Normal,
    /// A snapshot is being written into the other region; its header is not yet written.
    Snapshot(Header),
    /// The snapshot is on disk: the next batch is the new header, making `upto` durable.
    Switch(Header, u64),
    /// The header batch is in flight.
    Switching(Header, u64),
}

/// Builds group-commit batches of records. At most one batch is in flight at a time
/// (consecutive batches overlap in their shared sector, so they must reach the disk in
/// order).
#[derive(Clone, Debug)]
pub struct LogWriter {
    capacity: u64,
    header: Header,
    /// Disk offset (sector aligned) of `pending[0]`.
    base: u64,
    /// Disk bytes from `base` to the end of the log, including records not yet sealed.
    pending: Vec<u8>,
    chain: u32,
    appended: u64,
    sealed: u64,
    durable: u64,
    in_flight: Option<u64>,
    /// The next batch must be written even without new records (a new log, or a damaged
    /// tail to overwrite).
    must_write: bool,
    phase: Phase,
    /// Log end after the last compaction, or where one last failed for lack of room: the
    /// next waits until the log has grown an eighth of its region past it (a store bigger
    /// than half the region would otherwise be compacted again at once, over and over).
    compacted_at: Option<u64>,
}

impl LogWriter {
    /// Starts a new, empty log on a disk of `capacity` bytes. The first batch (sealed even
    /// without records) writes the header. `log_id` should be fresh entropy.
    pub fn format(capacity: u64, log_id: u64) -> Result<Self, LogError> {
        if capacity < MIN_CAPACITY {
            return Err(LogError::Full);
        }
        let header = Header::new(log_id, 0, region_len(capacity));
        // Slot 0 = generation 0, slot 1 zeroed; region 0 follows directly.
        let mut pending = header.encode();
        pending.resize(HEADER_AREA, 0);
        Ok(LogWriter {
            capacity,
            header,
            base: 0,
            pending,
            chain: header.crc,
            appended: 0,
            sealed: 0,
            durable: 0,
            in_flight: None,
            must_write: true,
            phase: Phase::Normal,
            compacted_at: None,
        })
    }

    /// Continues the log that [`replay`] recovered, on a disk of `capacity` bytes (the
    /// same disk). If the log had a damaged tail, the first batch (sealed even without
    /// records) overwrites it, which is the truncation.
    pub fn resume(rec: &Recovery, capacity: u64) -> Self {
        LogWriter {
            capacity,
            header: rec.header,
            base: align_down(rec.end),
            pending: rec.tail.clone(),
            chain: rec.chain,
            appended: 0,
            sealed: 0,
            durable: 0,
            in_flight: None,
            must_write: !rec.stop.is_clean(),
            phase: Phase::Normal,
            compacted_at: None,
        }
    }

    /// Bytes a record of `args` takes on disk.
    pub fn record_len(args: &[Vec<u8>]) -> usize {
        record_len_of(args.iter().map(|a| a.len()))
    }

    /// Disk offset where the next record goes.
    pub fn end(&self) -> u64 {
        self.base + self.pending.len() as u64
    }

    /// The region records are being appended to: (start, length).
    fn target(&self) -> (u64, u64) {
        match &self.phase {
            Phase::Normal => (self.header.start, self.header.len),
            Phase::Snapshot(h) | Phase::Switch(h, _) | Phase::Switching(h, _) => (h.start, h.len),
        }
    }

    /// Bytes of records that can still be appended before the log's space is full.
    pub fn room(&self) -> u64 {
        let (start, len) = self.target();
        // Keep room for the zero magic that marks the end.
        (start + len).saturating_sub(self.end() + 4)
    }

    fn push_record<A: AsRef<[u8]>>(&mut self, now_ms: u64, args: &[A]) {
        let start = self.pending.len();
        self.pending
            .reserve(record_len_of(args.iter().map(|a| a.as_ref().len())));
        self.pending.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
        self.pending.extend_from_slice(&[0; 8]);
        encode_command(&mut self.pending, now_ms, args);
        let len = (self.pending.len() - start - RECORD_HEADER_LEN) as u32;
        self.pending[start + 4..start + 8].copy_from_slice(&len.to_le_bytes());
        let c = crc::update(
            crc::update(self.chain, &len.to_le_bytes()),
            &self.pending[start + RECORD_HEADER_LEN..],
        );
        self.pending[start + 8..start + 12].copy_from_slice(&c.to_le_bytes());
        self.chain = c;
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
        self.push_record(now_ms, args);
        self.appended += 1;
        Ok(())
    }

    /// Number of records appended since this writer was created.
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// Number of appended records known to be on disk (flushed and in force).
    pub fn durable(&self) -> u64 {
        self.durable
    }

    /// Whether a batch is being written (sealed, not yet marked durable).
    pub fn in_flight(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Whether there is something for [`LogWriter::seal`] to write.
    pub fn has_unsealed(&self) -> bool {
        self.must_write || self.appended > self.sealed || matches!(self.phase, Phase::Switch(..))
    }

    /// Closes the current batch: returns the sectors to write, or None if there is nothing
    /// to write or a batch is still in flight.
    pub fn seal(&mut self) -> Option<Batch> {
        if self.in_flight.is_some() || !self.has_unsealed() {
            return None;
        }
        if let Phase::Switch(h, upto) = self.phase {
            self.phase = Phase::Switching(h, upto);
            self.in_flight = Some(upto);
            return Some(Batch {
                offset: h.slot_offset(),
                bytes: h.encode(),
                upto,
            });
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
        let Some(upto) = self.in_flight.take() else {
            return;
        };
        match self.phase {
            Phase::Normal => self.durable = upto,
            // The snapshot region is not in force before its header is written.
            Phase::Snapshot(h) => self.phase = Phase::Switch(h, upto),
            Phase::Switch(..) => {}
            Phase::Switching(h, upto) => {
                self.header = h;
                self.durable = upto;
                self.phase = Phase::Normal;
            }
        }
    }

    /// Whether the log's region is more than half full, so that [`LogWriter::compact`]
    /// should run at the next quiet moment.
    /// Always false while a compaction is under way.
    pub fn should_compact(&self) -> bool {
        if self.phase != Phase::Normal {
            return false;
        }
        let used = self.end().saturating_sub(self.header.start);
        let grown = self
            .compacted_at
            .is_none_or(|at| self.end() >= at + self.header.len / 8);
        used > self.header.len / 2 && grown
    }

    /// Starts a compaction: the next batches write a snapshot of `store` (taken at
    /// `now_ms`) into the other region and then switch the header to it. Records appended
    /// from now on follow the snapshot. Needs a quiet log (call it right after
    /// [`LogWriter::mark_durable`], with nothing unsealed); fails with
    /// [`LogError::Full`] if the snapshot would not leave an eighth of the region free.
    pub fn compact(&mut self, store: &Store, now_ms: u64) -> Result<(), LogError> {
        if self.in_flight.is_some() || self.has_unsealed() || self.phase != Phase::Normal {
            return Err(LogError::Busy);
        }
        // The region length stays the one the log was formatted with (a disk grown later
        // keeps its layout), so the two regions never overlap.
        let cur = self.header;
        let next = Header::new(cur.log_id, cur.generation + 1, cur.len);
        let overlap = next.start < cur.start + cur.len && cur.start < next.start + next.len;
        if overlap || next.start + next.len > self.capacity {
            return Err(LogError::Full);
        }
        let saved = (core::mem::take(&mut self.pending), self.base, self.chain);
        self.base = next.start;
        self.chain = next.crc;
        self.phase = Phase::Snapshot(next);
        // An eighth of the region must stay free after the snapshot.
        let fits = self.build_snapshot(store, now_ms, next.start + next.len - next.len / 8);
        if !fits || self.end() + next.len / 8 > next.start + next.len {
            (self.pending, self.base, self.chain) = saved;
            self.phase = Phase::Normal;
            self.compacted_at = Some(self.end());
            return Err(LogError::Full);
        }
        self.compacted_at = Some(self.end());
        self.must_write = true;
        Ok(())
    }
}

impl LogWriter {
    /// Appends the snapshot of `store` to `pending`, stopping as soon as the next record
    /// would end past disk offset `limit` or the heap cannot hold it; false if it stopped.
    /// The snapshot is built in memory before it is written, so a store too big for its
    /// disk costs a failed compaction, never the guest (whose failed allocation ends it).
    fn build_snapshot(&mut self, store: &Store, now_ms: u64, limit: u64) -> bool {
        let mut over = false;
        write_snapshot(store, &mut |args: &[&[u8]]| {
            let len = record_len_of(args.iter().map(|a| a.len()));
            if over || self.end() + len as u64 > limit || self.pending.try_reserve(len).is_err() {
                over = true;
                return;
            }
            self.push_record(now_ms, args)
        });
        !over
    }
}

/// The encoded length of a record whose arguments have the lengths `args`.
fn record_len_of(args: impl Iterator<Item = usize>) -> usize {
    RECORD_HEADER_LEN + 13 + args.map(|a| 4 + a).sum::<usize>()
}

/// Calls `emit` with commands that rebuild `store` from empty (run at the snapshot's time).
fn write_snapshot(store: &Store, emit: &mut dyn FnMut(&[&[u8]])) {
    let mut num = Vec::new();
    for (key, e) in store.entries() {
        let mut chunked = |cmd: &[u8], items: &mut dyn Iterator<Item = Vec<&[u8]>>| {
            let mut args: Vec<&[u8]> = alloc::vec![cmd, key];
            let (mut n, mut bytes) = (0, 0);
            for it in items {
                bytes += it.iter().map(|x| x.len()).sum::<usize>();
                args.extend(it);
                n += 1;
                if n == SNAPSHOT_CHUNK || bytes >= SNAPSHOT_CHUNK_BYTES {
                    emit(&args);
                    args.truncate(2);
                    (n, bytes) = (0, 0);
                }
            }
            if n > 0 {
                emit(&args);
            }
        };
        match &e.value {
            Value::Str(v) => emit(&[b"SET", key, v]),
            Value::List(l) => chunked(b"RPUSH", &mut l.iter().map(|x| alloc::vec![&x[..]])),
            Value::Set(s) => chunked(b"SADD", &mut s.iter().map(|x| alloc::vec![&x[..]])),
            Value::Hash(h) => chunked(
                b"HSET",
                &mut h.iter().map(|(f, v)| alloc::vec![&f[..], &v[..]]),
            ),
            Value::ZSet(z) => {
                let scores: Vec<Vec<u8>> = z
                    .iter()
                    .map(|(_, s)| {
                        let mut b = alloc::string::String::new();
                        let _ = fmt::write(&mut b, format_args!("{s}"));
                        b.into_bytes()
                    })
                    .collect();
                chunked(
                    b"ZADD",
                    &mut z
                        .iter()
                        .zip(&scores)
                        .map(|((m, _), s)| alloc::vec![&s[..], m]),
                )
            }
        }
        if let Some(t) = e.expires_at {
            num.clear();
            crate::resp::push_i64(&mut num, t as i64);
            emit(&[b"PEXPIREAT", key, &num]);
        }
    }
}

#[cfg(test)]
mod tests;
