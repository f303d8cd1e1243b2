//! The messages of the logging channel and their framing (documented in `docs/log-format.md`,
//! "The logging channel").
//!
//! Both directions of the channel's one bidirectional QUIC stream carry frames
//! `tag: u8, len: u32 LE, payload[len]`. Integers inside payloads are little-endian fixed
//! width, strings and byte strings are `len: u32 LE` + bytes. The decoder takes untrusted
//! bytes: it never panics, refuses unknown tags, oversized lengths and trailing bytes, and
//! says "need more" ([`MsgReader::next`] returning `Ok(None)`) for a frame not yet complete.

use thiserror::Error;

use crate::epoch::Boundary;

/// Largest frame payload accepted (a log batch is cut well below it).
pub const MAX_FRAME: usize = 32 << 20;
/// Largest string in a message.
pub const MAX_STRING: usize = 4096;
/// The channel protocol versions this build speaks (negotiated in the handshake).
pub const PROTOCOL_VERSIONS: (u16, u16) = (1, 3);
/// The first protocol version with joining a running primary ([`Msg::Join`] and the messages
/// of the copy).
pub const JOIN_PROTOCOL: u16 = 2;
/// The first protocol version in which a joiner clears its memory before the copy, so that
/// the first round leaves out the primary's all-zero pages.
pub const ZERO_PAGES_PROTOCOL: u16 = 3;
/// The VM-state format (`state::codec::VERSION`) a join carries under channel protocol
/// `protocol` (`None` before [`JOIN_PROTOCOL`]). A build that changes the format adds a
/// protocol version for it, so two builds that could not read each other's state never
/// negotiate a join: the primary refuses before the copy, not the joiner after the commit.
pub fn join_state_version(protocol: u16) -> Option<u16> {
    match protocol {
        2 | 3 => Some(1),
        _ => None,
    }
}

/// Most disk blocks one [`Msg::BlockHashes`] may list.
pub const MAX_BLOCK_HASHES: usize = (MAX_FRAME - 16) / 32;

/// What a node is doing, as it tells its peer (and `ftvm-node status` shows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Not yet running the VM: deciding whether to claim or join.
    Starting,
    /// Running the VM with a backup attached.
    Primary,
    /// Running the VM without a backup, by witness grant.
    Alone,
    /// Following a primary.
    Backup,
    /// Becoming a backup of a running primary.
    Joining,
    /// Waiting for the witness's answer to a claim.
    Claiming,
    /// Stopped for good (lost a claim, diverged, refused).
    Halted,
}

impl Role {
    fn code(self) -> u8 {
        match self {
            Role::Starting => 0,
            Role::Primary => 1,
            Role::Alone => 2,
            Role::Backup => 3,
            Role::Joining => 4,
            Role::Claiming => 5,
            Role::Halted => 6,
        }
    }
    fn from_code(c: u8) -> Option<Role> {
        Some(match c {
            0 => Role::Starting,
            1 => Role::Primary,
            2 => Role::Alone,
            3 => Role::Backup,
            4 => Role::Joining,
            5 => Role::Claiming,
            6 => Role::Halted,
            _ => return None,
        })
    }
    /// Whether a node in this role runs (or is about to run) the VM: DESIGN §5 counts only
    /// these when a starting node waits for silence before claiming.
    pub fn runs_vm(self) -> bool {
        matches!(
            self,
            Role::Primary | Role::Alone | Role::Backup | Role::Claiming
        )
    }
    /// The role's name as `status` prints it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Starting => "starting",
            Role::Primary => "primary",
            Role::Alone => "alone",
            Role::Backup => "backup",
            Role::Joining => "joining",
            Role::Claiming => "claiming",
            Role::Halted => "halted",
        }
    }
}

/// Everything two members must agree on to run one VM (DESIGN §5 "Handshake").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairConfig {
    /// The pair's name.
    pub pair: String,
    /// blake3 of the guest image.
    pub image_hash: [u8; 32],
    /// Hash of the CPUID baseline.
    pub cpuid_hash: [u8; 32],
    /// Guest memory size.
    pub mem_size: u64,
    /// Disk size in bytes (0: no disk).
    pub disk_size: u64,
    /// `failure_timeout` in nanoseconds.
    pub failure_timeout_ns: u64,
    /// The guest-visible devices (`DeviceSpec::describe`) and the guest's arguments.
    pub machine: String,
    /// Log format versions this node reads and writes.
    pub log_versions: (u16, u16),
    /// Channel protocol versions.
    pub protocol_versions: (u16, u16),
}

/// The first message of a connection, from the node that connected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The connecting node's name.
    pub node: String,
    /// Its role.
    pub role: Role,
    /// The generation it last persisted.
    pub generation: u64,
    /// Its configuration.
    pub config: PairConfig,
    /// Merkle root of its disk (all zero without a disk).
    pub disk_root: [u8; 32],
}

/// One message on the channel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Connector → listener: who I am and what I run.
    Hello(Hello),
    /// Primary → joiner: you are my backup from boundary `start_boundary`, in `generation`;
    /// the log follows in [`Msg::Log`] messages.
    Accept {
        /// The negotiated log format version.
        log_version: u16,
        /// The primary's generation (the joiner adopts it).
        generation: u64,
        /// The boundary the log starts at.
        start_boundary: Boundary,
    },
    /// A configuration mismatch: the pairing is refused (both sides exit 68).
    Refuse {
        /// The field that differs.
        field: String,
        /// The sender's value.
        ours: String,
        /// The value the sender received.
        theirs: String,
    },
    /// The listener does not take a backup now; it tells its role (a prober learns it).
    Busy {
        /// The listener's role.
        role: Role,
        /// The listener's generation.
        generation: u64,
        /// Why (for the log).
        reason: String,
    },
    /// Primary → backup: encoded log records.
    Log {
        /// The message's sequence number (the lease, DESIGN §5).
        seq: u64,
        /// Records in the log codec.
        bytes: Vec<u8>,
    },
    /// Primary → backup when there is nothing to log.
    Heartbeat {
        /// The message's sequence number.
        seq: u64,
    },
    /// Backup → primary: acknowledgement (also the backup's heartbeat).
    Ack {
        /// The latest primary sequence number received.
        echo: u64,
        /// Every record through this boundary is decoded and checked here.
        watermark: Boundary,
        /// The last boundary the backup has replayed.
        replayed: Boundary,
    },
    /// Backup → primary: the backup diverged and halts.
    Divergence {
        /// The first boundary that differs.
        boundary: Boundary,
        /// What differs.
        what: String,
    },
    /// Primary (running alone) → joiner: you may join me as backup while I run; send the
    /// hashes of your disk's blocks. Memory, disk blocks and the final state follow
    /// ([`Msg::Pages`], [`Msg::Blocks`], [`Msg::JoinState`]), then the log.
    Join {
        /// The negotiated log format version.
        log_version: u16,
        /// The primary's generation (the joiner adopts it after restoring the state).
        generation: u64,
        /// The disk block size of the hashes the primary wants.
        block_size: u32,
        /// How many blocks the disk has.
        blocks: u64,
    },
    /// Joiner → primary: blake3 of each of its disk's blocks, in order.
    BlockHashes {
        /// One hash per block.
        hashes: Vec<[u8; 32]>,
    },
    /// Primary → joiner: disk blocks to write (`join::blocks::BlockBatch` encoding).
    Blocks {
        /// The encoded batch.
        bytes: Vec<u8>,
    },
    /// Primary → joiner: guest pages (`state::pages::PageBatch` encoding).
    Pages {
        /// The encoded batch.
        bytes: Vec<u8>,
    },
    /// Primary → joiner: a pre-copy round is complete; answer with [`Msg::RoundApplied`]
    /// once everything sent so far is in place (the primary pauses only a joiner that keeps
    /// up, so the state is restored within the failure timeout of the commit point).
    RoundDone {
        /// The round.
        round: u32,
    },
    /// Joiner → primary: every page and block of rounds through `round` is applied.
    RoundApplied {
        /// The round.
        round: u32,
    },
    /// Primary → joiner: the final state at the pause (the commit point); the log of the
    /// boundaries after it follows.
    JoinState {
        /// The generation the joiner adopts.
        generation: u64,
        /// The primary's `digest_every` (the log header's).
        digest_every: u64,
        /// The Merkle root of the primary's disk at the pause.
        disk_root: [u8; 32],
        /// The encoded [`VmState`](crate::state::VmState).
        state: Vec<u8>,
    },
}

const T_HELLO: u8 = 1;
const T_ACCEPT: u8 = 2;
const T_REFUSE: u8 = 3;
const T_BUSY: u8 = 4;
const T_LOG: u8 = 5;
const T_HEARTBEAT: u8 = 6;
const T_ACK: u8 = 7;
const T_DIVERGENCE: u8 = 8;
const T_JOIN: u8 = 9;
const T_BLOCK_HASHES: u8 = 10;
const T_BLOCKS: u8 = 11;
const T_PAGES: u8 = 12;
const T_JOIN_STATE: u8 = 13;
const T_ROUND_DONE: u8 = 14;
const T_ROUND_APPLIED: u8 = 15;
const T_LAST: u8 = T_ROUND_APPLIED;

/// Why bytes are not a valid channel message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MsgError {
    /// An unknown frame tag.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// A frame longer than [`MAX_FRAME`].
    #[error("oversized message ({0} bytes, limit {MAX_FRAME})")]
    Oversized(usize),
    /// A payload that does not parse.
    #[error("malformed message (tag {tag}): {what}")]
    Malformed {
        /// The frame's tag.
        tag: u8,
        /// What is wrong.
        what: String,
    },
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

fn put_config(p: &mut Vec<u8>, c: &PairConfig) {
    put_str(p, c.pair.as_bytes());
    p.extend_from_slice(&c.image_hash);
    p.extend_from_slice(&c.cpuid_hash);
    p.extend_from_slice(&c.mem_size.to_le_bytes());
    p.extend_from_slice(&c.disk_size.to_le_bytes());
    p.extend_from_slice(&c.failure_timeout_ns.to_le_bytes());
    put_str(p, c.machine.as_bytes());
    for v in [
        c.log_versions.0,
        c.log_versions.1,
        c.protocol_versions.0,
        c.protocol_versions.1,
    ] {
        p.extend_from_slice(&v.to_le_bytes());
    }
}

/// Appends the framing of `m` to `out`.
pub fn encode(m: &Msg, out: &mut Vec<u8>) {
    let mut p = Vec::new();
    let tag = match m {
        Msg::Hello(h) => {
            put_str(&mut p, h.node.as_bytes());
            p.push(h.role.code());
            p.extend_from_slice(&h.generation.to_le_bytes());
            put_config(&mut p, &h.config);
            p.extend_from_slice(&h.disk_root);
            T_HELLO
        }
        Msg::Accept {
            log_version,
            generation,
            start_boundary,
        } => {
            p.extend_from_slice(&log_version.to_le_bytes());
            p.extend_from_slice(&generation.to_le_bytes());
            p.extend_from_slice(&start_boundary.to_le_bytes());
            T_ACCEPT
        }
        Msg::Refuse {
            field,
            ours,
            theirs,
        } => {
            put_str(&mut p, field.as_bytes());
            put_str(&mut p, ours.as_bytes());
            put_str(&mut p, theirs.as_bytes());
            T_REFUSE
        }
        Msg::Busy {
            role,
            generation,
            reason,
        } => {
            p.push(role.code());
            p.extend_from_slice(&generation.to_le_bytes());
            put_str(&mut p, reason.as_bytes());
            T_BUSY
        }
        Msg::Log { seq, bytes } => {
            p.extend_from_slice(&seq.to_le_bytes());
            p.extend_from_slice(bytes);
            T_LOG
        }
        Msg::Heartbeat { seq } => {
            p.extend_from_slice(&seq.to_le_bytes());
            T_HEARTBEAT
        }
        Msg::Ack {
            echo,
            watermark,
            replayed,
        } => {
            p.extend_from_slice(&echo.to_le_bytes());
            p.extend_from_slice(&watermark.to_le_bytes());
            p.extend_from_slice(&replayed.to_le_bytes());
            T_ACK
        }
        Msg::Divergence { boundary, what } => {
            p.extend_from_slice(&boundary.to_le_bytes());
            put_str(&mut p, what.as_bytes());
            T_DIVERGENCE
        }
        Msg::Join {
            log_version,
            generation,
            block_size,
            blocks,
        } => {
            p.extend_from_slice(&log_version.to_le_bytes());
            p.extend_from_slice(&generation.to_le_bytes());
            p.extend_from_slice(&block_size.to_le_bytes());
            p.extend_from_slice(&blocks.to_le_bytes());
            T_JOIN
        }
        Msg::BlockHashes { hashes } => {
            p.extend_from_slice(&(hashes.len() as u32).to_le_bytes());
            for h in hashes {
                p.extend_from_slice(h);
            }
            T_BLOCK_HASHES
        }
        Msg::Blocks { bytes } => {
            p.extend_from_slice(bytes);
            T_BLOCKS
        }
        Msg::Pages { bytes } => {
            p.extend_from_slice(bytes);
            T_PAGES
        }
        Msg::JoinState {
            generation,
            digest_every,
            disk_root,
            state,
        } => {
            p.extend_from_slice(&generation.to_le_bytes());
            p.extend_from_slice(&digest_every.to_le_bytes());
            p.extend_from_slice(disk_root);
            p.extend_from_slice(state);
            T_JOIN_STATE
        }
        Msg::RoundDone { round } => {
            p.extend_from_slice(&round.to_le_bytes());
            T_ROUND_DONE
        }
        Msg::RoundApplied { round } => {
            p.extend_from_slice(&round.to_le_bytes());
            T_ROUND_APPLIED
        }
    };
    out.push(tag);
    out.extend_from_slice(&(p.len() as u32).to_le_bytes());
    out.extend_from_slice(&p);
}

struct P<'a> {
    tag: u8,
    b: &'a [u8],
}

impl<'a> P<'a> {
    fn err(&self, what: impl Into<String>) -> MsgError {
        MsgError::Malformed {
            tag: self.tag,
            what: what.into(),
        }
    }
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], MsgError> {
        if self.b.len() < n {
            return Err(self.err(format!("truncated {what}")));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self, what: &str) -> Result<u8, MsgError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, MsgError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }
    fn u32(&mut self, what: &str) -> Result<u32, MsgError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.b).to_vec()
    }
    fn u64(&mut self, what: &str) -> Result<u64, MsgError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
    fn h32(&mut self, what: &str) -> Result<[u8; 32], MsgError> {
        Ok(self.take(32, what)?.try_into().expect("32"))
    }
    fn string(&mut self, what: &str) -> Result<String, MsgError> {
        let n = u32::from_le_bytes(self.take(4, what)?.try_into().expect("4")) as usize;
        if n > MAX_STRING {
            return Err(self.err(format!("{what} of {n} bytes (limit {MAX_STRING})")));
        }
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err(format!("{what} is not UTF-8")))
    }
    fn role(&mut self) -> Result<Role, MsgError> {
        let c = self.u8("role")?;
        Role::from_code(c).ok_or_else(|| self.err(format!("unknown role {c}")))
    }
    fn config(&mut self) -> Result<PairConfig, MsgError> {
        Ok(PairConfig {
            pair: self.string("pair")?,
            image_hash: self.h32("image hash")?,
            cpuid_hash: self.h32("cpuid hash")?,
            mem_size: self.u64("memory size")?,
            disk_size: self.u64("disk size")?,
            failure_timeout_ns: self.u64("failure timeout")?,
            machine: self.string("machine")?,
            log_versions: (self.u16("log version")?, self.u16("log version")?),
            protocol_versions: (self.u16("protocol version")?, self.u16("protocol version")?),
        })
    }
    fn done(self) -> Result<(), MsgError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(self.err(format!("{} trailing bytes", self.b.len())))
        }
    }
}

/// Decodes one payload of frame `tag`.
pub fn decode(tag: u8, payload: &[u8]) -> Result<Msg, MsgError> {
    let mut p = P { tag, b: payload };
    let m = match tag {
        T_HELLO => Msg::Hello(Hello {
            node: p.string("node")?,
            role: p.role()?,
            generation: p.u64("generation")?,
            config: p.config()?,
            disk_root: p.h32("disk root")?,
        }),
        T_ACCEPT => Msg::Accept {
            log_version: p.u16("log version")?,
            generation: p.u64("generation")?,
            start_boundary: p.u64("start boundary")?,
        },
        T_REFUSE => Msg::Refuse {
            field: p.string("field")?,
            ours: p.string("ours")?,
            theirs: p.string("theirs")?,
        },
        T_BUSY => Msg::Busy {
            role: p.role()?,
            generation: p.u64("generation")?,
            reason: p.string("reason")?,
        },
        T_LOG => {
            let seq = p.u64("seq")?;
            let bytes = std::mem::take(&mut p.b).to_vec();
            Msg::Log { seq, bytes }
        }
        T_HEARTBEAT => Msg::Heartbeat { seq: p.u64("seq")? },
        T_ACK => Msg::Ack {
            echo: p.u64("echo")?,
            watermark: p.u64("watermark")?,
            replayed: p.u64("replayed")?,
        },
        T_DIVERGENCE => Msg::Divergence {
            boundary: p.u64("boundary")?,
            what: p.string("what")?,
        },
        T_JOIN => Msg::Join {
            log_version: p.u16("log version")?,
            generation: p.u64("generation")?,
            block_size: p.u32("block size")?,
            blocks: p.u64("blocks")?,
        },
        T_BLOCK_HASHES => {
            let n = p.u32("hash count")? as usize;
            if n > MAX_BLOCK_HASHES || p.b.len() != n * 32 {
                return Err(p.err(format!("{n} block hashes in {} bytes", p.b.len())));
            }
            let mut hashes = Vec::with_capacity(n);
            for _ in 0..n {
                hashes.push(p.h32("block hash")?);
            }
            Msg::BlockHashes { hashes }
        }
        T_BLOCKS => Msg::Blocks { bytes: p.rest() },
        T_PAGES => Msg::Pages { bytes: p.rest() },
        T_JOIN_STATE => Msg::JoinState {
            generation: p.u64("generation")?,
            digest_every: p.u64("digest every")?,
            disk_root: p.h32("disk root")?,
            state: p.rest(),
        },
        T_ROUND_DONE => Msg::RoundDone {
            round: p.u32("round")?,
        },
        T_ROUND_APPLIED => Msg::RoundApplied {
            round: p.u32("round")?,
        },
        t => return Err(MsgError::UnknownTag(t)),
    };
    p.done()?;
    Ok(m)
}

/// Reassembles messages from bytes as they arrive.
#[derive(Default, Debug)]
pub struct MsgReader {
    buf: Vec<u8>,
    pos: usize,
}

impl MsgReader {
    /// An empty reader.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        crate::replay::codec::append_compacting(&mut self.buf, &mut self.pos, bytes);
    }

    /// The next whole message, `Ok(None)` if more bytes are needed. An error is final.
    pub fn next_msg(&mut self) -> Result<Option<Msg>, MsgError> {
        let avail = &self.buf[self.pos..];
        if avail.len() < 5 {
            return Ok(None);
        }
        let tag = avail[0];
        let len = u32::from_le_bytes(avail[1..5].try_into().expect("4")) as usize;
        if len > MAX_FRAME {
            return Err(MsgError::Oversized(len));
        }
        if !(T_HELLO..=T_LAST).contains(&tag) {
            return Err(MsgError::UnknownTag(tag));
        }
        if avail.len() < 5 + len {
            return Ok(None);
        }
        let m = decode(tag, &avail[5..5 + len])?;
        self.pos += 5 + len;
        Ok(Some(m))
    }
}

/// The highest version both ranges contain, if any.
pub fn negotiate(a: (u16, u16), b: (u16, u16)) -> Option<u16> {
    let lo = a.0.max(b.0);
    let hi = a.1.min(b.1);
    (lo <= hi).then_some(hi)
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .take(8)
        .map(|x| format!("{x:02x}"))
        .collect::<String>()
        + "…"
}

/// The first configuration field in which `ours` and `theirs` differ, with both values as
/// text: `(field, ours, theirs)`. Versions differ only when the ranges have nothing in
/// common.
pub fn mismatch(ours: &PairConfig, theirs: &PairConfig) -> Option<(String, String, String)> {
    let f = |name: &str, a: String, b: String| Some((name.to_string(), a, b));
    if ours.pair != theirs.pair {
        return f("pair", ours.pair.clone(), theirs.pair.clone());
    }
    if negotiate(ours.protocol_versions, theirs.protocol_versions).is_none() {
        return f(
            "protocol_versions",
            format!("{:?}", ours.protocol_versions),
            format!("{:?}", theirs.protocol_versions),
        );
    }
    if negotiate(ours.log_versions, theirs.log_versions).is_none() {
        return f(
            "log_versions",
            format!("{:?}", ours.log_versions),
            format!("{:?}", theirs.log_versions),
        );
    }
    if ours.image_hash != theirs.image_hash {
        return f("guest", hex(&ours.image_hash), hex(&theirs.image_hash));
    }
    if ours.cpuid_hash != theirs.cpuid_hash {
        return f("cpuid", hex(&ours.cpuid_hash), hex(&theirs.cpuid_hash));
    }
    if ours.mem_size != theirs.mem_size {
        return f(
            "mem",
            ours.mem_size.to_string(),
            theirs.mem_size.to_string(),
        );
    }
    if ours.disk_size != theirs.disk_size {
        return f(
            "disk_size",
            ours.disk_size.to_string(),
            theirs.disk_size.to_string(),
        );
    }
    if ours.failure_timeout_ns != theirs.failure_timeout_ns {
        let ms = |ns: u64| format!("{}ms", ns as f64 / 1e6);
        return f(
            "failure_timeout",
            ms(ours.failure_timeout_ns),
            ms(theirs.failure_timeout_ns),
        );
    }
    if ours.machine != theirs.machine {
        return f("machine", ours.machine.clone(), theirs.machine.clone());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn config() -> PairConfig {
        PairConfig {
            pair: "kv1".into(),
            image_hash: [1; 32],
            cpuid_hash: [2; 32],
            mem_size: 64 << 20,
            disk_size: 256 << 20,
            failure_timeout_ns: 150_000_000,
            machine: "net=52:54:00:12:34:56 disk=524288".into(),
            log_versions: (1, 1),
            protocol_versions: (1, 1),
        }
    }

    fn all() -> Vec<Msg> {
        vec![
            Msg::Hello(Hello {
                node: "b".into(),
                role: Role::Starting,
                generation: 7,
                config: config(),
                disk_root: [9; 32],
            }),
            Msg::Accept {
                log_version: 1,
                generation: 8,
                start_boundary: 0,
            },
            Msg::Refuse {
                field: "mem".into(),
                ours: "1".into(),
                theirs: "2".into(),
            },
            Msg::Busy {
                role: Role::Claiming,
                generation: 3,
                reason: "claiming".into(),
            },
            Msg::Log {
                seq: 5,
                bytes: vec![1, 2, 3],
            },
            Msg::Heartbeat { seq: 6 },
            Msg::Ack {
                echo: 6,
                watermark: 100,
                replayed: 99,
            },
            Msg::Divergence {
                boundary: 42,
                what: "registers".into(),
            },
            Msg::Join {
                log_version: 2,
                generation: 4,
                block_size: 65536,
                blocks: 1024,
            },
            Msg::BlockHashes {
                hashes: vec![[3; 32], [4; 32]],
            },
            Msg::Blocks {
                bytes: vec![0, 1, 2],
            },
            Msg::Pages { bytes: vec![9; 10] },
            Msg::JoinState {
                generation: 4,
                digest_every: 1000,
                disk_root: [5; 32],
                state: vec![7; 33],
            },
            Msg::RoundDone { round: 3 },
            Msg::RoundApplied { round: 3 },
        ]
    }

    #[test]
    fn round_trip_in_any_chunking() {
        let mut bytes = Vec::new();
        for m in all() {
            encode(&m, &mut bytes);
        }
        for step in [1, 3, 17, bytes.len()] {
            let mut r = MsgReader::new();
            let mut got = Vec::new();
            for c in bytes.chunks(step) {
                r.push(c);
                while let Some(m) = r.next_msg().unwrap() {
                    got.push(m);
                }
            }
            assert_eq!(got, all(), "step {step}");
        }
    }

    #[test]
    fn garbage_is_refused() {
        let mut r = MsgReader::new();
        r.push(&[99, 0, 0, 0, 0]);
        assert_eq!(r.next_msg(), Err(MsgError::UnknownTag(99)));
        let mut r = MsgReader::new();
        r.push(&[T_LOG, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(r.next_msg(), Err(MsgError::Oversized(_))));
        let mut r = MsgReader::new();
        r.push(&[T_ACK, 3, 0, 0, 0, 1, 2, 3]);
        assert!(matches!(r.next_msg(), Err(MsgError::Malformed { .. })));
        // Trailing bytes in a fixed-size message.
        let mut b = Vec::new();
        encode(&Msg::Heartbeat { seq: 1 }, &mut b);
        b[1] += 1;
        b.push(0);
        let mut r = MsgReader::new();
        r.push(&b);
        assert!(matches!(r.next_msg(), Err(MsgError::Malformed { .. })));
    }

    #[test]
    fn mismatches_name_the_field_and_both_values() {
        let a = config();
        assert_eq!(mismatch(&a, &a), None);
        let mut b = a.clone();
        b.mem_size = 128 << 20;
        assert_eq!(
            mismatch(&a, &b),
            Some(("mem".into(), "67108864".into(), "134217728".into()))
        );
        let mut b = a.clone();
        b.pair = "kv2".into();
        assert_eq!(mismatch(&a, &b).unwrap().0, "pair");
        let mut b = a.clone();
        b.failure_timeout_ns = 200_000_000;
        assert_eq!(
            mismatch(&a, &b),
            Some(("failure_timeout".into(), "150ms".into(), "200ms".into()))
        );
        let mut b = a.clone();
        b.log_versions = (2, 3);
        assert_eq!(mismatch(&a, &b).unwrap().0, "log_versions");
        // Overlapping ranges are not a mismatch: one node can be upgraded at a time.
        let mut b = a.clone();
        b.log_versions = (1, 2);
        assert_eq!(mismatch(&a, &b), None);
        assert_eq!(negotiate((1, 2), (1, 3)), Some(2));
        for (field, edit) in [
            (
                "guest",
                (|c: &mut PairConfig| c.image_hash[0] ^= 1) as fn(&mut PairConfig),
            ),
            ("cpuid", |c| c.cpuid_hash[0] ^= 1),
            ("disk_size", |c| c.disk_size += 512),
            ("machine", |c| c.machine.push('x')),
        ] {
            let mut b = a.clone();
            edit(&mut b);
            assert_eq!(mismatch(&a, &b).unwrap().0, field);
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut r = MsgReader::new();
            r.push(&b);
            while let Ok(Some(_)) = r.next_msg() {}
        }
    }

    #[test]
    fn the_newest_join_protocol_carries_this_builds_state_format() {
        // Changing `state::codec::VERSION` needs a new protocol version in the table.
        assert_eq!(
            join_state_version(PROTOCOL_VERSIONS.1),
            Some(crate::state::codec::VERSION)
        );
        assert_eq!(join_state_version(JOIN_PROTOCOL - 1), None);
    }
}
