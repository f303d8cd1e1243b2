//! The log codec: the one encoding of log records that the recorder, the replayer and (later)
//! the logging channel share. The format is specified in `docs/log-format.md`.
//!
//! Every record is framed as `kind: u8, len: varint, payload[len]`. The decoder takes
//! untrusted bytes: it never panics and rejects anything malformed with a precise
//! [`DecodeError`] (unknown version, kind or event, truncation, oversized lengths, boundaries
//! that go backwards, trailing bytes).

use thiserror::Error;

use crate::epoch::{Boundary, ClockValue, Fingerprint};

/// First bytes of every log.
pub const MAGIC: &[u8; 8] = b"FTVMLOG\0";
/// The format version this code writes (it reads [`MIN_VERSION`]..=`VERSION`). Version 2
/// adds the console digest to digest records.
pub const VERSION: u16 = 2;
/// The oldest format version this code reads.
pub const MIN_VERSION: u16 = 1;
/// Largest payload a record may carry.
pub const MAX_PAYLOAD: u64 = 16 << 20;
/// Most events one boundary may carry.
pub const MAX_EVENTS: u64 = 65_536;
/// Longest guest argument string in a header.
pub const MAX_ARGS: u64 = 4096;

const KIND_HEADER: u8 = 1;
const KIND_BOUNDARY: u8 = 2;
const KIND_DIGEST: u8 = 3;
const KIND_WATERMARK: u8 = 4;
const KIND_END: u8 = 5;

const EV_CLOCK: u8 = 1;
const EV_ENTROPY: u8 = 2;
const EV_WAIT_ENDED: u8 = 3;
const EV_NET_RX: u8 = 4;
const EV_RANDOM: u8 = 5;
const EV_DISK_DONE: u8 = 6;
/// Largest frame or random-byte event.
pub const MAX_EVENT_BYTES: u64 = 65_536;

/// What identifies the run a log belongs to; a replay must match it exactly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// blake3 of the guest ELF image.
    pub image_hash: [u8; 32],
    /// Guest memory size in bytes.
    pub mem_size: u64,
    /// Hash of the CPUID table the guest ran with.
    pub cpuid_hash: [u8; 32],
    /// The guest's argument string.
    pub args: String,
    /// The devices and their guest-visible configuration (network addresses, disk size).
    pub machine: String,
    /// A memory digest record every this many boundaries (0: none).
    pub digest_every: u64,
}

/// Something nondeterministic the guest saw at a boundary. Adding a kind of event is one
/// variant here and its arm in [`encode_event`] and [`decode_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A clock reading (CLOCK register or POLL).
    Clock(ClockValue),
    /// Eight bytes of entropy.
    Entropy(u64),
    /// A WAIT ended, at this clock.
    WaitEnded(ClockValue),
    /// A frame received from the network, delivered into the guest's RX queue.
    NetRx(Vec<u8>),
    /// Random bytes for a virtio-rng request.
    Random(Vec<u8>),
    /// A block request completed (with the truncated blake3 of the data read, 0 for others):
    /// both hosts perform it on their own disk; the backup checks that its result matches.
    DiskDone {
        /// virtio-blk status.
        status: u8,
        /// Truncated blake3 of the data read.
        hash: u64,
    },
}

/// How the recorded run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndKind {
    /// The guest exited with a status.
    Exited(u64),
    /// The guest crashed.
    Crashed,
    /// A signal stopped the node.
    Stopped(i32),
}

/// The final state of a run, compared by the replayer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct End {
    /// The last boundary the guest reached.
    pub boundary: Boundary,
    /// How it ended.
    pub kind: EndKind,
    /// The guest's final fingerprint.
    pub fingerprint: Fingerprint,
    /// blake3 digest of guest memory at the end (zero if digests are off).
    pub memory_digest: [u8; 32],
    /// blake3 of everything the guest printed.
    pub console_digest: [u8; 32],
}

/// One log record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// The first record of every log.
    Header(Header),
    /// The events of one boundary, with the guest's fingerprint when it reached it and a hash
    /// of the inputs applied there.
    Boundary {
        /// The boundary.
        boundary: Boundary,
        /// The guest at the exit, before anything was applied.
        fingerprint: Fingerprint,
        /// Truncated blake3 of the events as applied.
        inputs_hash: u64,
        /// The events, in the order they were applied.
        events: Vec<Event>,
    },
    /// A blake3 digest of guest memory when the guest reached `boundary`, and (version 2)
    /// the digest of everything it had printed by then.
    Digest {
        /// The boundary.
        boundary: Boundary,
        /// The memory digest.
        digest: [u8; 32],
        /// The console digest (absent in version-1 logs).
        console: Option<[u8; 32]>,
    },
    /// No more events will be logged for boundaries up to and including this one.
    Watermark(Boundary),
    /// The run ended.
    End(End),
}

/// Why bytes are not a valid log.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The input does not start with the log magic.
    #[error("not an ftvm log (bad magic)")]
    BadMagic,
    /// A version this code does not read.
    #[error("unsupported log version {0} (this build reads versions {MIN_VERSION} to {VERSION})")]
    Version(u16),
    /// The bytes end inside a record.
    #[error("truncated record at offset {offset}: {what}")]
    Truncated {
        /// Offset of the record.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// An unknown record kind.
    #[error("unknown record kind {kind} at offset {offset}")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
        /// Offset of the record.
        offset: u64,
    },
    /// An unknown event tag.
    #[error("unknown event tag {tag} in the record at offset {offset}")]
    UnknownEvent {
        /// The tag byte.
        tag: u8,
        /// Offset of the record.
        offset: u64,
    },
    /// A length beyond the limits.
    #[error("oversized {what} ({len}, limit {limit}) in the record at offset {offset}")]
    Oversized {
        /// What was too long.
        what: &'static str,
        /// The length given.
        len: u64,
        /// The limit.
        limit: u64,
        /// Offset of the record.
        offset: u64,
    },
    /// A boundary at or below the previous one.
    #[error("boundary goes backwards at offset {offset}: {boundary} after {previous}")]
    Backwards {
        /// The boundary read.
        boundary: Boundary,
        /// The previous boundary.
        previous: Boundary,
        /// Offset of the record.
        offset: u64,
    },
    /// A record whose payload is not fully consumed, or otherwise inconsistent.
    #[error("malformed record at offset {offset}: {what}")]
    Malformed {
        /// Offset of the record.
        offset: u64,
        /// What is wrong.
        what: String,
    },
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Encodes records, keeping the state that makes clock values delta-encoded.
#[derive(Default)]
pub struct Encoder {
    last_clock: ClockValue,
}

impl Encoder {
    /// A fresh encoder (the first record must be the header).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the encoding of `rec` to `out`.
    pub fn encode(&mut self, rec: &Record, out: &mut Vec<u8>) {
        let mut p = Vec::with_capacity(64);
        let kind = match rec {
            Record::Header(h) => {
                p.extend_from_slice(MAGIC);
                p.extend_from_slice(&VERSION.to_le_bytes());
                p.extend_from_slice(&h.image_hash);
                put_varint(&mut p, h.mem_size);
                p.extend_from_slice(&h.cpuid_hash);
                put_varint(&mut p, h.args.len() as u64);
                p.extend_from_slice(h.args.as_bytes());
                put_varint(&mut p, h.machine.len() as u64);
                p.extend_from_slice(h.machine.as_bytes());
                put_varint(&mut p, h.digest_every);
                KIND_HEADER
            }
            Record::Boundary {
                boundary,
                fingerprint,
                inputs_hash,
                events,
            } => {
                put_varint(&mut p, *boundary);
                p.extend_from_slice(&fingerprint.rip.to_le_bytes());
                p.extend_from_slice(&fingerprint.regs_hash.to_le_bytes());
                p.extend_from_slice(&inputs_hash.to_le_bytes());
                put_varint(&mut p, events.len() as u64);
                for e in events {
                    self.encode_event(e, &mut p);
                }
                KIND_BOUNDARY
            }
            Record::Digest {
                boundary,
                digest,
                console,
            } => {
                put_varint(&mut p, *boundary);
                p.extend_from_slice(digest);
                if let Some(c) = console {
                    p.extend_from_slice(c);
                }
                KIND_DIGEST
            }
            Record::Watermark(b) => {
                put_varint(&mut p, *b);
                KIND_WATERMARK
            }
            Record::End(e) => {
                put_varint(&mut p, e.boundary);
                match e.kind {
                    EndKind::Exited(s) => {
                        p.push(0);
                        put_varint(&mut p, s);
                    }
                    EndKind::Crashed => p.push(1),
                    EndKind::Stopped(sig) => {
                        p.push(2);
                        put_varint(&mut p, sig as u32 as u64);
                    }
                }
                p.extend_from_slice(&e.fingerprint.rip.to_le_bytes());
                p.extend_from_slice(&e.fingerprint.regs_hash.to_le_bytes());
                p.extend_from_slice(&e.memory_digest);
                p.extend_from_slice(&e.console_digest);
                KIND_END
            }
        };
        out.push(kind);
        put_varint(out, p.len() as u64);
        out.extend_from_slice(&p);
    }

    fn encode_clock(&mut self, c: &ClockValue, p: &mut Vec<u8>) {
        // Monotonic: unsigned delta; wall: the change in (wall - mono), zigzagged.
        put_varint(p, c.mono_ns.wrapping_sub(self.last_clock.mono_ns));
        let off = c.wall_ns.wrapping_sub(c.mono_ns) as i64;
        let last_off = self
            .last_clock
            .wall_ns
            .wrapping_sub(self.last_clock.mono_ns) as i64;
        put_varint(p, zigzag(off.wrapping_sub(last_off)));
        self.last_clock = *c;
    }

    fn encode_event(&mut self, e: &Event, p: &mut Vec<u8>) {
        match e {
            Event::Clock(c) => {
                p.push(EV_CLOCK);
                self.encode_clock(c, p);
            }
            Event::Entropy(v) => {
                p.push(EV_ENTROPY);
                p.extend_from_slice(&v.to_le_bytes());
            }
            Event::WaitEnded(c) => {
                p.push(EV_WAIT_ENDED);
                self.encode_clock(c, p);
            }
            Event::NetRx(b) | Event::Random(b) => {
                p.push(if matches!(e, Event::NetRx(_)) {
                    EV_NET_RX
                } else {
                    EV_RANDOM
                });
                put_varint(p, b.len() as u64);
                p.extend_from_slice(b);
            }
            Event::DiskDone { status, hash } => {
                p.push(EV_DISK_DONE);
                p.push(*status);
                p.extend_from_slice(&hash.to_le_bytes());
            }
        }
    }
}

/// Reads fields from one record's payload.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    offset: u64,
}

impl<'a> Reader<'a> {
    fn truncated(&self, what: &'static str) -> DecodeError {
        DecodeError::Truncated {
            offset: self.offset,
            what,
        }
    }
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or_else(|| self.truncated(what))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.bytes(1, what)?[0])
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(
            self.bytes(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn hash(&mut self, what: &'static str) -> Result<[u8; 32], DecodeError> {
        Ok(self.bytes(32, what)?.try_into().expect("32 bytes"))
    }
    fn varint(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8(what)?;
            if shift == 63 && b > 1 {
                return Err(DecodeError::Malformed {
                    offset: self.offset,
                    what: format!("varint overflow in {what}"),
                });
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                // The encoder writes the shortest form: a last byte of 0 after others is
                // padding, and one value with two encodings would let a log be altered
                // without changing what it decodes to.
                if b == 0 && shift > 0 {
                    return Err(DecodeError::Malformed {
                        offset: self.offset,
                        what: format!("non-minimal varint in {what}"),
                    });
                }
                return Ok(v);
            }
        }
        Err(DecodeError::Malformed {
            offset: self.offset,
            what: format!("varint too long in {what}"),
        })
    }
    fn string(&mut self, len: u64, what: &'static str) -> Result<String, DecodeError> {
        let offset = self.offset;
        std::str::from_utf8(self.bytes(len as usize, what)?)
            .map(str::to_string)
            .map_err(|_| DecodeError::Malformed {
                offset,
                what: format!("{what} are not UTF-8"),
            })
    }
    fn done(&self) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::Malformed {
                offset: self.offset,
                what: format!("{} trailing bytes", self.buf.len() - self.pos),
            })
        }
    }
}

/// Decodes a log from a byte slice, one record at a time, checking the order of records.
pub struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
    last_clock: ClockValue,
    last_boundary: Option<Boundary>,
    seen_header: bool,
    ended: bool,
}

impl<'a> Decoder<'a> {
    /// A decoder over a whole log.
    pub fn new(data: &'a [u8]) -> Self {
        Decoder {
            data,
            pos: 0,
            last_clock: ClockValue::default(),
            last_boundary: None,
            seen_header: false,
            ended: false,
        }
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// The next record, `None` at the end of the input.
    pub fn next_record(&mut self) -> Result<Option<Record>, DecodeError> {
        if self.pos == self.data.len() {
            return Ok(None);
        }
        let offset = self.pos as u64;
        if self.pos == 0 && !self.seen_header && self.data[0] != KIND_HEADER {
            return Err(DecodeError::BadMagic);
        }
        let mut frame = Reader {
            buf: &self.data[self.pos..],
            pos: 0,
            offset,
        };
        let kind = frame.u8("record kind")?;
        let len = frame.varint("record length")?;
        if len > MAX_PAYLOAD {
            return Err(DecodeError::Oversized {
                what: "record",
                len,
                limit: MAX_PAYLOAD,
                offset,
            });
        }
        let payload = frame.bytes(len as usize, "record payload")?;
        let mut r = Reader {
            buf: payload,
            pos: 0,
            offset,
        };
        if !self.seen_header && kind != KIND_HEADER {
            return Err(DecodeError::Malformed {
                offset,
                what: "the first record is not a header".into(),
            });
        }
        if self.ended {
            return Err(DecodeError::Malformed {
                offset,
                what: "records after the end record".into(),
            });
        }
        let rec = match kind {
            KIND_HEADER => {
                if self.seen_header {
                    return Err(DecodeError::Malformed {
                        offset,
                        what: "a second header".into(),
                    });
                }
                if r.bytes(8, "magic")? != MAGIC {
                    return Err(DecodeError::BadMagic);
                }
                let v = u16::from_le_bytes(r.bytes(2, "version")?.try_into().expect("2"));
                if !(MIN_VERSION..=VERSION).contains(&v) {
                    return Err(DecodeError::Version(v));
                }
                let image_hash = r.hash("image hash")?;
                let mem_size = r.varint("memory size")?;
                let cpuid_hash = r.hash("cpuid hash")?;
                let args_len = r.varint("args length")?;
                if args_len > MAX_ARGS {
                    return Err(DecodeError::Oversized {
                        what: "guest arguments",
                        len: args_len,
                        limit: MAX_ARGS,
                        offset,
                    });
                }
                let args = r.string(args_len, "guest arguments")?;
                let machine_len = r.varint("machine length")?;
                if machine_len > MAX_ARGS {
                    return Err(DecodeError::Oversized {
                        what: "machine description",
                        len: machine_len,
                        limit: MAX_ARGS,
                        offset,
                    });
                }
                let machine = r.string(machine_len, "machine description")?;
                let digest_every = r.varint("digest interval")?;
                self.seen_header = true;
                Record::Header(Header {
                    image_hash,
                    mem_size,
                    cpuid_hash,
                    args,
                    machine,
                    digest_every,
                })
            }
            KIND_BOUNDARY => {
                let boundary = self.boundary(&mut r, true)?;
                let fingerprint = Fingerprint {
                    rip: r.u64("rip")?,
                    regs_hash: r.u64("register hash")?,
                };
                let inputs_hash = r.u64("inputs hash")?;
                let n = r.varint("event count")?;
                if n > MAX_EVENTS {
                    return Err(DecodeError::Oversized {
                        what: "event count",
                        len: n,
                        limit: MAX_EVENTS,
                        offset,
                    });
                }
                let mut events = Vec::with_capacity(n.min(64) as usize);
                for _ in 0..n {
                    events.push(self.decode_event(&mut r)?);
                }
                Record::Boundary {
                    boundary,
                    fingerprint,
                    inputs_hash,
                    events,
                }
            }
            KIND_DIGEST => {
                let boundary = self.boundary(&mut r, false)?;
                let digest = r.hash("digest")?;
                // Version 2: the console digest follows (absent in version-1 logs).
                let console = if r.pos < r.buf.len() {
                    Some(r.hash("console digest")?)
                } else {
                    None
                };
                Record::Digest {
                    boundary,
                    digest,
                    console,
                }
            }
            KIND_WATERMARK => Record::Watermark(self.boundary(&mut r, false)?),
            KIND_END => {
                let boundary = self.boundary(&mut r, false)?;
                let kind = match r.u8("end kind")? {
                    0 => EndKind::Exited(r.varint("exit status")?),
                    1 => EndKind::Crashed,
                    2 => EndKind::Stopped(r.varint("signal")? as u32 as i32),
                    k => {
                        return Err(DecodeError::Malformed {
                            offset,
                            what: format!("unknown end kind {k}"),
                        })
                    }
                };
                let fingerprint = Fingerprint {
                    rip: r.u64("rip")?,
                    regs_hash: r.u64("register hash")?,
                };
                let memory_digest = r.hash("memory digest")?;
                let console_digest = r.hash("console digest")?;
                self.ended = true;
                Record::End(End {
                    boundary,
                    kind,
                    fingerprint,
                    memory_digest,
                    console_digest,
                })
            }
            kind => return Err(DecodeError::UnknownKind { kind, offset }),
        };
        r.done()?;
        self.pos += frame.pos;
        Ok(Some(rec))
    }

    /// Reads a boundary number; `strict` (event records) requires it to grow, others may
    /// repeat the last one.
    fn boundary(&mut self, r: &mut Reader<'_>, strict: bool) -> Result<Boundary, DecodeError> {
        let b = r.varint("boundary")?;
        if let Some(prev) = self.last_boundary {
            if b < prev || (strict && b == prev) {
                return Err(DecodeError::Backwards {
                    boundary: b,
                    previous: prev,
                    offset: r.offset,
                });
            }
        }
        if b == 0 {
            return Err(DecodeError::Malformed {
                offset: r.offset,
                what: "boundary 0 (boundaries start at 1)".into(),
            });
        }
        self.last_boundary = Some(b);
        Ok(b)
    }

    fn decode_clock(&mut self, r: &mut Reader<'_>) -> Result<ClockValue, DecodeError> {
        let mono = self.last_clock.mono_ns.wrapping_add(r.varint("clock")?);
        let last_off = self
            .last_clock
            .wall_ns
            .wrapping_sub(self.last_clock.mono_ns) as i64;
        let off = last_off.wrapping_add(unzigzag(r.varint("wall clock")?));
        let c = ClockValue {
            mono_ns: mono,
            wall_ns: mono.wrapping_add(off as u64),
        };
        self.last_clock = c;
        Ok(c)
    }

    fn decode_event(&mut self, r: &mut Reader<'_>) -> Result<Event, DecodeError> {
        match r.u8("event tag")? {
            EV_CLOCK => Ok(Event::Clock(self.decode_clock(r)?)),
            EV_ENTROPY => Ok(Event::Entropy(r.u64("entropy")?)),
            EV_WAIT_ENDED => Ok(Event::WaitEnded(self.decode_clock(r)?)),
            tag @ (EV_NET_RX | EV_RANDOM) => {
                let len = r.varint("event length")?;
                if len > MAX_EVENT_BYTES {
                    return Err(DecodeError::Oversized {
                        what: "event",
                        len,
                        limit: MAX_EVENT_BYTES,
                        offset: r.offset,
                    });
                }
                let b = r.bytes(len as usize, "event bytes")?.to_vec();
                Ok(if tag == EV_NET_RX {
                    Event::NetRx(b)
                } else {
                    Event::Random(b)
                })
            }
            EV_DISK_DONE => Ok(Event::DiskDone {
                status: r.u8("disk status")?,
                hash: r.u64("disk hash")?,
            }),
            tag => Err(DecodeError::UnknownEvent {
                tag,
                offset: r.offset,
            }),
        }
    }
}

/// Appends `bytes` to a receive buffer whose first `*pos` bytes are already consumed,
/// dropping those first once they are at least half the buffer. The log's [`StreamDecoder`]
/// and the channel's message reader both buffer received bytes this way.
pub fn append_compacting(buf: &mut Vec<u8>, pos: &mut usize, bytes: &[u8]) {
    if *pos > 0 && *pos >= buf.len() / 2 {
        buf.drain(..*pos);
        *pos = 0;
    }
    buf.extend_from_slice(bytes);
}

/// An incremental decoder for a log that arrives in pieces (the logging channel): bytes are
/// [`push`](Self::push)ed as they arrive and [`next_record`](Self::next_record) answers
/// `Ok(None)` ("need more") until a whole record is there. It applies exactly the checks of
/// [`Decoder`] (it runs one on each complete record), so a stream is valid exactly when the
/// same bytes would be a valid log file.
#[derive(Default)]
pub struct StreamDecoder {
    buf: Vec<u8>,
    pos: usize,
    last_clock: ClockValue,
    last_boundary: Option<Boundary>,
    seen_header: bool,
    ended: bool,
}

impl StreamDecoder {
    /// A decoder expecting a header first.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes that arrived.
    pub fn push(&mut self, bytes: &[u8]) {
        append_compacting(&mut self.buf, &mut self.pos, bytes);
    }

    /// Bytes received but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The next complete record; `Ok(None)` when more bytes are needed. An error is final:
    /// the stream cannot be used past it.
    pub fn next_record(&mut self) -> Result<Option<Record>, DecodeError> {
        let avail = &self.buf[self.pos..];
        if avail.is_empty() {
            return Ok(None);
        }
        // Is a whole frame (kind, varint length, payload) there?
        let mut len = 0u64;
        let mut i = 1;
        loop {
            let Some(&b) = avail.get(i) else {
                return Ok(None);
            };
            if i > 10 {
                break; // let the decoder report the malformed varint
            }
            len |= u64::from(b & 0x7f) << (7 * (i - 1));
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if len <= MAX_PAYLOAD && (avail.len() as u64) < i as u64 + len {
            return Ok(None);
        }
        let end = if len <= MAX_PAYLOAD {
            self.pos + i + len as usize
        } else {
            self.buf.len()
        };
        let mut d = Decoder {
            data: &self.buf[..end],
            pos: self.pos,
            last_clock: self.last_clock,
            last_boundary: self.last_boundary,
            seen_header: self.seen_header,
            ended: self.ended,
        };
        let rec = d.next_record()?;
        self.pos = d.pos;
        self.last_clock = d.last_clock;
        self.last_boundary = d.last_boundary;
        self.seen_header = d.seen_header;
        self.ended = d.ended;
        Ok(rec)
    }
}

/// Truncated blake3 of a boundary's events: what the VMM applied to the guest there.
pub fn inputs_hash(events: &[Event]) -> u64 {
    let mut h = blake3::Hasher::new();
    for e in events {
        match e {
            Event::Clock(c) | Event::WaitEnded(c) => {
                h.update(&[if matches!(e, Event::Clock(_)) { 1 } else { 3 }]);
                h.update(&c.mono_ns.to_le_bytes());
                h.update(&c.wall_ns.to_le_bytes());
            }
            Event::Entropy(v) => {
                h.update(&[2]);
                h.update(&v.to_le_bytes());
            }
            Event::NetRx(b) | Event::Random(b) => {
                h.update(&[if matches!(e, Event::NetRx(_)) { 4 } else { 5 }]);
                h.update(&(b.len() as u64).to_le_bytes());
                h.update(b);
            }
            Event::DiskDone { status, hash } => {
                h.update(&[6, *status]);
                h.update(&hash.to_le_bytes());
            }
        }
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Record> {
        let c = |m: u64, w: u64| ClockValue {
            mono_ns: m,
            wall_ns: w,
        };
        let fp = Fingerprint {
            rip: 0x20_1234,
            regs_hash: 42,
        };
        vec![
            Record::Header(Header {
                image_hash: [7; 32],
                mem_size: 64 << 20,
                cpuid_hash: [9; 32],
                args: "clock 10".into(),
                machine: "net=52:54:00:12:34:56".into(),
                digest_every: 100,
            }),
            Record::Boundary {
                boundary: 1,
                fingerprint: fp,
                inputs_hash: 5,
                events: vec![Event::Clock(c(1000, 1_700_000_000_000_001_000))],
            },
            Record::Boundary {
                boundary: 3,
                fingerprint: fp,
                inputs_hash: 6,
                events: vec![
                    Event::Entropy(u64::MAX),
                    Event::WaitEnded(c(999_999, 1_699_999_999_000_000_000)),
                    Event::NetRx(vec![1, 2, 3]),
                    Event::Random(vec![9; 40]),
                    Event::DiskDone {
                        status: 0,
                        hash: 77,
                    },
                ],
            },
            Record::Digest {
                boundary: 3,
                digest: [1; 32],
                console: Some([2; 32]),
            },
            Record::Watermark(7),
            Record::End(End {
                boundary: 9,
                kind: EndKind::Stopped(15),
                fingerprint: fp,
                memory_digest: [2; 32],
                console_digest: [3; 32],
            }),
        ]
    }

    fn encode_all(recs: &[Record]) -> Vec<u8> {
        let mut e = Encoder::new();
        let mut out = Vec::new();
        for r in recs {
            e.encode(r, &mut out);
        }
        out
    }

    fn decode_all(b: &[u8]) -> Result<Vec<Record>, DecodeError> {
        let mut d = Decoder::new(b);
        let mut v = Vec::new();
        while let Some(r) = d.next_record()? {
            v.push(r);
        }
        Ok(v)
    }

    #[test]
    fn round_trip() {
        let recs = sample();
        assert_eq!(decode_all(&encode_all(&recs)).unwrap(), recs);
    }

    #[test]
    fn every_truncation_is_an_error() {
        let bytes = encode_all(&sample());
        let mut boundaries = Vec::new();
        let mut d = Decoder::new(&bytes);
        while d.next_record().unwrap().is_some() {
            boundaries.push(d.position());
        }
        for cut in 1..bytes.len() {
            let r = decode_all(&bytes[..cut]);
            if boundaries.contains(&cut) {
                assert!(r.is_ok(), "cut at a record boundary {cut}");
            } else {
                assert!(
                    matches!(r, Err(DecodeError::Truncated { .. })),
                    "cut {cut}: {r:?}"
                );
            }
        }
    }

    #[test]
    fn precise_errors() {
        let good = encode_all(&sample());
        // Unknown version.
        let mut b = good.clone();
        b[2 + 8] = 9;
        assert_eq!(decode_all(&b), Err(DecodeError::Version(9)));
        // Not a log.
        assert_eq!(
            decode_all(b"definitely not a log"),
            Err(DecodeError::BadMagic)
        );
        // Unknown record kind after the header.
        let hdr_len = {
            let mut d = Decoder::new(&good);
            d.next_record().unwrap();
            d.position()
        };
        let mut b = good[..hdr_len].to_vec();
        b.extend_from_slice(&[0x77, 0]);
        assert!(matches!(
            decode_all(&b),
            Err(DecodeError::UnknownKind { kind: 0x77, .. })
        ));
        // Oversized length.
        let mut b = good[..hdr_len].to_vec();
        b.push(KIND_BOUNDARY);
        put_varint(&mut b, MAX_PAYLOAD + 1);
        assert!(matches!(
            decode_all(&b),
            Err(DecodeError::Oversized { what: "record", .. })
        ));
        // A record length in more bytes than it needs (0x85 0x00 is 5 in two bytes).
        let mut b = good[..hdr_len].to_vec();
        b.extend_from_slice(&[KIND_BOUNDARY, 0x85, 0x00]);
        match decode_all(&b) {
            Err(DecodeError::Malformed { what, .. }) => {
                assert!(what.contains("non-minimal varint"), "{what}")
            }
            other => panic!("a padded varint was accepted: {other:?}"),
        }
        // Zero itself has one encoding: 0x00, never 0x80 0x00.
        let mut b = good[..hdr_len].to_vec();
        b.extend_from_slice(&[KIND_BOUNDARY, 0x80, 0x00]);
        assert!(matches!(decode_all(&b), Err(DecodeError::Malformed { .. })));
        // Boundary going backwards.
        let mut recs = sample();
        recs.insert(
            3,
            Record::Boundary {
                boundary: 2,
                fingerprint: Fingerprint::default(),
                inputs_hash: 0,
                events: vec![],
            },
        );
        assert!(matches!(
            decode_all(&encode_all(&recs)),
            Err(DecodeError::Backwards {
                boundary: 2,
                previous: 3,
                ..
            })
        ));
        // Unknown event.
        let mut b = good[..hdr_len].to_vec();
        b.extend_from_slice(&[KIND_BOUNDARY, 27, 1]);
        b.extend_from_slice(&[0; 24]);
        b.extend_from_slice(&[1, 0x55]);
        assert!(matches!(
            decode_all(&b),
            Err(DecodeError::UnknownEvent { tag: 0x55, .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let good = encode_all(&sample());
        let mut x: u64 = 0x243f_6a88_85a3_08d3;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..100_000 {
            let mut b = if round % 2 == 0 {
                good.clone()
            } else {
                (0..(next() % 200)).map(|_| next() as u8).collect()
            };
            if !b.is_empty() {
                for _ in 0..(next() % 4 + 1) {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
            }
            let _ = decode_all(&b);
        }
    }

    fn stream_decode(bytes: &[u8], chunks: &[usize]) -> Result<Vec<Record>, DecodeError> {
        let mut d = StreamDecoder::new();
        let mut out = Vec::new();
        let mut at = 0;
        let mut k = 0;
        while at < bytes.len() {
            let n = chunks[k % chunks.len()].max(1).min(bytes.len() - at);
            k += 1;
            d.push(&bytes[at..at + n]);
            at += n;
            while let Some(r) = d.next_record()? {
                out.push(r);
            }
        }
        assert_eq!(d.buffered(), 0, "a complete log leaves nothing buffered");
        Ok(out)
    }

    #[test]
    fn stream_decoder_gives_the_same_records_in_any_chunking() {
        let recs = sample();
        let bytes = encode_all(&recs);
        for chunks in [&[1usize][..], &[2, 7], &[13, 1, 64], &[bytes.len()]] {
            assert_eq!(
                stream_decode(&bytes, chunks).unwrap(),
                recs,
                "chunks {chunks:?}"
            );
        }
    }

    #[test]
    fn stream_decoder_needs_more_instead_of_truncated() {
        let bytes = encode_all(&sample());
        for cut in 0..bytes.len() {
            let mut d = StreamDecoder::new();
            d.push(&bytes[..cut]);
            let mut n = 0;
            while let Some(_r) = d.next_record().expect("a prefix is never an error") {
                n += 1;
            }
            let whole = decode_all(&bytes[..cut]);
            // Every record wholly inside the prefix was decoded, nothing more.
            match whole {
                Ok(v) => assert_eq!(n, v.len()),
                Err(_) => assert!(n < sample().len()),
            }
        }
    }

    #[test]
    fn stream_decoder_reports_what_the_file_decoder_reports() {
        let good = encode_all(&sample());
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x41;
            let file = decode_all(&bad);
            let mut d = StreamDecoder::new();
            d.push(&bad);
            let mut stream = Vec::new();
            let res = loop {
                match d.next_record() {
                    Ok(Some(r)) => stream.push(r),
                    Ok(None) => break Ok(stream),
                    Err(e) => break Err(e),
                }
            };
            match (file, res) {
                (Ok(a), Ok(b)) => assert!(b.len() <= a.len() && a[..b.len()] == b[..]),
                (Err(a), Err(b)) => assert_eq!(a, b, "byte {i}"),
                // A corruption that makes a length longer: the stream waits for more bytes.
                (Err(DecodeError::Truncated { .. }), Ok(_)) => {}
                (a, b) => panic!("byte {i}: file decoder {a:?}, stream decoder {b:?}"),
            }
        }
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn decode_all(b: &[u8]) -> Result<usize, DecodeError> {
        let mut d = Decoder::new(b);
        let mut n = 0;
        while d.next_record()?.is_some() {
            n += 1;
        }
        Ok(n)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_are_rejected_or_accepted_without_panic(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_all(&b);
        }

        #[test]
        fn valid_header_then_arbitrary_records(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut b = Vec::new();
            Encoder::new().encode(&Record::Header(Header {
                image_hash: [0; 32], mem_size: 1 << 26, cpuid_hash: [0; 32],
                args: String::new(), machine: String::new(), digest_every: 10,
            }), &mut b);
            b.extend_from_slice(&tail);
            let _ = decode_all(&b);
        }
    }
}
