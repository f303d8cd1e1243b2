//! The resync wire protocol: length-prefixed messages on one bidirectional QUIC stream.
//!
//! Every message is `tag: u8, len: u32 LE, payload[len]`. The client (pull/verify) speaks
//! first with [`Msg::Hello`]; the server answers [`Msg::Info`]; then the client asks for tree
//! nodes ([`Msg::GetNodes`] → [`Msg::Nodes`]) level by level, then for blocks
//! ([`Msg::GetBlocks`] → a [`Msg::Block`] or [`Msg::Zero`] per block, in order), and ends with
//! [`Msg::Verify`] → [`Msg::Verified`]. Either side may send [`Msg::Error`] and close.
//! Anything malformed — unknown tag, oversized or inconsistent length, a stream that ends
//! inside a message, trailing bytes, a flag other than 0/1, an error text that is not UTF-8
//! or longer than [`MAX_ERROR`] — is a [`Error::Protocol`] that ends the session. Integers
//! are little-endian; the last field of a payload (a bitmap, block data, a list of
//! fixed-size entries, the error text) runs to its end (`docs/wire.md`).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::hash::{Hash, MAX_BLOCK_SIZE};
use crate::{Error, Result};

/// Protocol version spoken here.
pub const VERSION: u16 = 1;
/// First bytes of a Hello.
pub const MAGIC: &[u8; 8] = b"FTVMRSYN";
/// Largest message accepted (a block of the largest size plus its header).
pub const MAX_MSG: usize = MAX_BLOCK_SIZE as usize + 64;
/// Most node indices in one GetNodes.
pub const MAX_NODES: usize = 1 << 16;
/// Most runs in one GetBlocks.
pub const MAX_RUNS: usize = 1 << 16;
/// Longest error text, in bytes (longer texts are cut at a character boundary when sent).
pub const MAX_ERROR: usize = 4096;

/// Fast-path offer of the client: its record's generation and bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastOffer {
    pub generation: u64,
    pub bitmap: Vec<u8>,
}

/// A protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Msg {
    Hello {
        version: u16,
        block_size: u32,
        fast: Option<FastOffer>,
    },
    /// The source's geometry; `fast` is the source's record bitmap if the fast path was
    /// accepted.
    Info {
        disk_size: u64,
        block_size: u32,
        fast: Option<Vec<u8>>,
    },
    GetNodes {
        level: u8,
        indices: Vec<u64>,
    },
    Nodes {
        hashes: Vec<Hash>,
    },
    /// Runs of blocks `(first, count)`.
    GetBlocks {
        runs: Vec<(u64, u32)>,
    },
    Block {
        index: u64,
        data: Vec<u8>,
    },
    /// An all-zero block.
    Zero {
        index: u64,
    },
    /// The client's root after writing.
    Verify {
        root: Hash,
    },
    /// The server's root, and whether it equals the client's.
    Verified {
        root: Hash,
        equal: bool,
    },
    Error {
        message: String,
    },
}

impl Msg {
    fn tag(&self) -> u8 {
        match self {
            Msg::Hello { .. } => 1,
            Msg::Info { .. } => 2,
            Msg::GetNodes { .. } => 3,
            Msg::Nodes { .. } => 4,
            Msg::GetBlocks { .. } => 5,
            Msg::Block { .. } => 6,
            Msg::Zero { .. } => 7,
            Msg::Verify { .. } => 8,
            Msg::Verified { .. } => 9,
            Msg::Error { .. } => 10,
        }
    }

    /// Short name for error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Msg::Hello { .. } => "Hello",
            Msg::Info { .. } => "Info",
            Msg::GetNodes { .. } => "GetNodes",
            Msg::Nodes { .. } => "Nodes",
            Msg::GetBlocks { .. } => "GetBlocks",
            Msg::Block { .. } => "Block",
            Msg::Zero { .. } => "Zero",
            Msg::Verify { .. } => "Verify",
            Msg::Verified { .. } => "Verified",
            Msg::Error { .. } => "Error",
        }
    }

    /// Encodes the message with its header.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        match self {
            Msg::Hello {
                version,
                block_size,
                fast,
            } => {
                p.extend_from_slice(MAGIC);
                p.extend_from_slice(&version.to_le_bytes());
                p.extend_from_slice(&block_size.to_le_bytes());
                match fast {
                    None => p.push(0),
                    Some(f) => {
                        p.push(1);
                        p.extend_from_slice(&f.generation.to_le_bytes());
                        p.extend_from_slice(&f.bitmap);
                    }
                }
            }
            Msg::Info {
                disk_size,
                block_size,
                fast,
            } => {
                p.extend_from_slice(&disk_size.to_le_bytes());
                p.extend_from_slice(&block_size.to_le_bytes());
                match fast {
                    None => p.push(0),
                    Some(b) => {
                        p.push(1);
                        p.extend_from_slice(b);
                    }
                }
            }
            Msg::GetNodes { level, indices } => {
                p.push(*level);
                for i in indices {
                    p.extend_from_slice(&i.to_le_bytes());
                }
            }
            Msg::Nodes { hashes } => {
                for h in hashes {
                    p.extend_from_slice(h);
                }
            }
            Msg::GetBlocks { runs } => {
                for (s, n) in runs {
                    p.extend_from_slice(&s.to_le_bytes());
                    p.extend_from_slice(&n.to_le_bytes());
                }
            }
            Msg::Block { index, data } => {
                p.reserve(8 + data.len());
                p.extend_from_slice(&index.to_le_bytes());
                p.extend_from_slice(data);
            }
            Msg::Zero { index } => p.extend_from_slice(&index.to_le_bytes()),
            Msg::Verify { root } => p.extend_from_slice(root),
            Msg::Verified { root, equal } => {
                p.extend_from_slice(root);
                p.push(*equal as u8);
            }
            Msg::Error { message } => {
                let mut end = message.len().min(MAX_ERROR);
                while !message.is_char_boundary(end) {
                    end -= 1;
                }
                p.extend_from_slice(&message.as_bytes()[..end]);
            }
        }
        let mut out = Vec::with_capacity(5 + p.len());
        out.push(self.tag());
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
        out.extend_from_slice(&p);
        out
    }

    /// Decodes a payload of message type `tag`.
    pub fn decode(tag: u8, p: &[u8]) -> Result<Msg> {
        let bad = |what: &str| Error::Protocol(format!("malformed message (type {tag}): {what}"));
        let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(p[o..o + 4].try_into().unwrap());
        Ok(match tag {
            1 => {
                if p.len() < 15 || &p[..8] != MAGIC {
                    return Err(bad("not a resync Hello (bad magic)"));
                }
                let version = u16::from_le_bytes([p[8], p[9]]);
                let block_size = u32_at(10);
                let fast = match p[14] {
                    0 if p.len() == 15 => None,
                    1 if p.len() >= 23 => Some(FastOffer {
                        generation: u64_at(15),
                        bitmap: p[23..].to_vec(),
                    }),
                    _ => return Err(bad("bad fast-path flag")),
                };
                Msg::Hello {
                    version,
                    block_size,
                    fast,
                }
            }
            2 => {
                if p.len() < 13 {
                    return Err(bad("short Info"));
                }
                let fast = match p[12] {
                    0 if p.len() == 13 => None,
                    1 => Some(p[13..].to_vec()),
                    _ => return Err(bad("bad fast-path flag")),
                };
                Msg::Info {
                    disk_size: u64_at(0),
                    block_size: u32_at(8),
                    fast,
                }
            }
            3 => {
                if p.is_empty() || !(p.len() - 1).is_multiple_of(8) || (p.len() - 1) / 8 > MAX_NODES
                {
                    return Err(bad("bad GetNodes length"));
                }
                Msg::GetNodes {
                    level: p[0],
                    indices: (0..(p.len() - 1) / 8).map(|k| u64_at(1 + 8 * k)).collect(),
                }
            }
            4 => {
                if !p.len().is_multiple_of(32) {
                    return Err(bad("Nodes length not a multiple of 32"));
                }
                Msg::Nodes {
                    hashes: p.chunks(32).map(|c| c.try_into().unwrap()).collect(),
                }
            }
            5 => {
                if !p.len().is_multiple_of(12) || p.len() / 12 > MAX_RUNS {
                    return Err(bad("bad GetBlocks length"));
                }
                Msg::GetBlocks {
                    runs: (0..p.len() / 12)
                        .map(|k| (u64_at(12 * k), u32_at(12 * k + 8)))
                        .collect(),
                }
            }
            6 => {
                if p.len() < 8 {
                    return Err(bad("short Block"));
                }
                Msg::Block {
                    index: u64_at(0),
                    data: p[8..].to_vec(),
                }
            }
            7 => {
                if p.len() != 8 {
                    return Err(bad("bad Zero length"));
                }
                Msg::Zero { index: u64_at(0) }
            }
            8 => {
                if p.len() != 32 {
                    return Err(bad("bad Verify length"));
                }
                Msg::Verify {
                    root: p.try_into().unwrap(),
                }
            }
            9 => {
                if p.len() != 33 || p[32] > 1 {
                    return Err(bad("bad Verified"));
                }
                Msg::Verified {
                    root: p[..32].try_into().unwrap(),
                    equal: p[32] == 1,
                }
            }
            10 => {
                if p.len() > MAX_ERROR {
                    return Err(bad("error text longer than 4096 bytes"));
                }
                Msg::Error {
                    message: String::from_utf8(p.to_vec())
                        .map_err(|_| bad("error text is not UTF-8"))?,
                }
            }
            t => {
                return Err(Error::Protocol(format!(
                    "unknown message type {t:#04x} (garbage on the stream or a different protocol)"
                )))
            }
        })
    }
}

fn conn_err(e: std::io::Error) -> Error {
    Error::Connection(e.to_string())
}

/// Writes one message.
pub async fn write_msg<W: AsyncWrite + Unpin>(w: &mut W, m: &Msg) -> Result<()> {
    w.write_all(&m.encode()).await.map_err(conn_err)
}

/// Reads one message; `Ok(None)` on a clean end of stream between messages.
pub async fn read_msg<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Msg>> {
    let mut hdr = [0u8; 5];
    let mut got = 0;
    while got < 5 {
        let n = r.read(&mut hdr[got..]).await.map_err(conn_err)?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(Error::Protocol(format!(
                "truncated message: stream ended after {got} of 5 header bytes"
            )));
        }
        got += n;
    }
    let tag = hdr[0];
    let len = u32::from_le_bytes(hdr[1..5].try_into().unwrap()) as usize;
    if !(1..=10).contains(&tag) {
        return Err(Error::Protocol(format!(
            "unknown message type {tag:#04x} (garbage on the stream or a different protocol)"
        )));
    }
    if len > MAX_MSG {
        return Err(Error::Protocol(format!(
            "message type {tag} announces {len} bytes, more than the limit of {MAX_MSG}"
        )));
    }
    let mut p = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = r.read(&mut p[got..]).await.map_err(conn_err)?;
        if n == 0 {
            return Err(Error::Protocol(format!(
                "truncated message: stream ended after {got} of {len} payload bytes of a type {tag} message"
            )));
        }
        got += n;
    }
    Msg::decode(tag, &p).map(Some)
}

/// Reads one message, treating end of stream as an error.
pub async fn expect_msg<R: AsyncRead + Unpin>(r: &mut R, waiting_for: &str) -> Result<Msg> {
    match read_msg(r).await? {
        Some(Msg::Error { message }) => Err(Error::Remote(message)),
        Some(m) => Ok(m),
        None => Err(Error::Protocol(format!(
            "stream ended while waiting for {waiting_for}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Msg> {
        vec![
            Msg::Hello {
                version: 1,
                block_size: 65536,
                fast: None,
            },
            Msg::Hello {
                version: 1,
                block_size: 4096,
                fast: Some(FastOffer {
                    generation: 9,
                    bitmap: vec![1, 2, 3],
                }),
            },
            Msg::Info {
                disk_size: 123,
                block_size: 4096,
                fast: Some(vec![]),
            },
            Msg::Info {
                disk_size: 0,
                block_size: 4096,
                fast: None,
            },
            Msg::GetNodes {
                level: 3,
                indices: vec![1, 2, u64::MAX],
            },
            Msg::Nodes {
                hashes: vec![[1; 32], [2; 32]],
            },
            Msg::GetBlocks {
                runs: vec![(5, 3), (100, 1)],
            },
            Msg::Block {
                index: 7,
                data: vec![9; 100],
            },
            Msg::Zero { index: 8 },
            Msg::Verify { root: [3; 32] },
            Msg::Verified {
                root: [4; 32],
                equal: true,
            },
            Msg::Error {
                message: "boom".into(),
            },
        ]
    }

    #[tokio::test]
    async fn roundtrip() {
        let mut buf = Vec::new();
        for m in samples() {
            write_msg(&mut buf, &m).await.unwrap();
        }
        let mut r = &buf[..];
        for m in samples() {
            assert_eq!(read_msg(&mut r).await.unwrap(), Some(m));
        }
        assert_eq!(read_msg(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn truncation_is_an_error_at_every_cut() {
        for m in samples() {
            let e = m.encode();
            for cut in 1..e.len() {
                let mut r = &e[..cut];
                let err = read_msg(&mut r).await.unwrap_err();
                assert!(
                    err.to_string().contains("truncated"),
                    "{m:?} cut {cut}: {err}"
                );
            }
        }
    }

    #[test]
    fn error_texts_are_strict_and_cut_to_fit() {
        let long = "é".repeat(MAX_ERROR); // 2 bytes each: cut at a character boundary
        let e = Msg::Error { message: long }.encode();
        let text = std::str::from_utf8(&e[5..]).unwrap();
        assert_eq!(text.len(), MAX_ERROR);
        assert!(matches!(Msg::decode(10, &e[5..]), Ok(Msg::Error { .. })));
        let err = Msg::decode(10, &[b'x'; MAX_ERROR + 1]).unwrap_err();
        assert!(err.to_string().contains("longer than 4096"), "{err}");
        let err = Msg::decode(10, &[b'o', b'k', 0xff]).unwrap_err();
        assert!(err.to_string().contains("not UTF-8"), "{err}");
    }

    #[tokio::test]
    async fn garbage_is_an_error() {
        let mut r: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        let err = read_msg(&mut r).await.unwrap_err();
        assert!(err.to_string().contains("unknown message type"), "{err}");
        let mut huge = vec![6u8];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = read_msg(&mut &huge[..]).await.unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
        // every single-byte corruption of the header or payload of a Verified is refused
        // or decodes to something else (never panics)
        let e = Msg::Verified {
            root: [4; 32],
            equal: true,
        }
        .encode();
        for i in 0..e.len() {
            for v in [0u8, 0xff, 2] {
                let mut c = e.clone();
                c[i] = v;
                let _ = read_msg(&mut &c[..]).await;
            }
        }
    }
}
