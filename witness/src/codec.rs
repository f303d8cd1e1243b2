//! The witness wire format: one request and one response per QUIC bidirectional stream.
//!
//! Every message starts with a 4-byte header `b'F' b'W' VERSION TYPE`, followed by the body
//! of that type. Integers are big-endian `u64`; a name is one length byte (1..=63) followed
//! by that many bytes of `[A-Za-z0-9._-]`; an optional name is a presence byte (0 or 1)
//! followed by a name when present; a text is a big-endian `u16` length and UTF-8 bytes.
//! Nothing may follow the body. A request is at most [`MAX_REQUEST`] bytes and a response
//! at most [`MAX_RESPONSE`] bytes.
//!
//! | request       | type | body            |
//! |---------------|------|-----------------|
//! | `Claim`       | 1    | pair, seen u64, claim id (16 bytes) |
//! | `Status`      | 2    | pair            |
//! | `Ping`        | 3    | (empty)         |
//!
//! | response      | type | body                           |
//! |---------------|------|--------------------------------|
//! | `Granted`     | 1    | generation u64, holder name    |
//! | `Denied`      | 2    | generation u64, holder opt     |
//! | `Status`      | 3    | generation u64, holder opt     |
//! | `Pong`        | 4    | (empty)                        |
//! | `Error`       | 5    | code u8, text                  |
//!
//! The claimant's node name is not on the wire: it is the identity in its verified client
//! certificate. Decoding never panics, whatever the input (checked by a fuzzing proptest).
//!
//! **Versions.** This build speaks version 2, which added the claim id to `Claim`. A witness
//! refuses a version 1 request with an `UnsupportedVersion` error encoded in version 1 (the
//! responses of both versions have the same layout), so an old client reports a clear
//! refusal; a client reads the responses of both versions, so it reports an old witness's
//! refusal of version 2 just as clearly.

use crate::state::ClaimId;

/// First two bytes of every message.
pub const MAGIC: [u8; 2] = *b"FW";
/// The protocol version this build speaks.
pub const VERSION: u8 = 2;
/// The previous protocol version (claims without claim id): refused by this witness, and its
/// responses (same layout) understood by this client.
pub const VERSION_V1: u8 = 1;
/// Largest accepted request, in bytes.
pub const MAX_REQUEST: usize = 256;
/// Largest accepted response, in bytes.
pub const MAX_RESPONSE: usize = 1024;
/// Longest pair or node name.
pub const MAX_NAME: usize = 63;

/// A request from a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `claim(pair, <certificate identity>, seen, claim_id)`.
    Claim {
        /// The pair claimed for.
        pair: String,
        /// The generation the claimant last saw.
        seen: u64,
        /// The claimant's id of this claim (fresh per claim, reused by its retries).
        claim_id: ClaimId,
    },
    /// The current state of a pair.
    Status {
        /// The pair asked about.
        pair: String,
    },
    /// Liveness check; touches no state.
    Ping,
}

/// Error codes carried by [`Response::Error`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ErrorCode {
    /// The request could not be decoded (see the text).
    Malformed = 1,
    /// The request used a protocol version this witness does not speak.
    UnsupportedVersion = 2,
    /// The request type is unknown.
    UnknownType = 3,
    /// The request was larger than [`MAX_REQUEST`].
    TooLarge = 4,
    /// The pair is not configured on this witness.
    UnknownPair = 5,
    /// The certificate identity is not a node of the pair.
    NotAuthorized = 6,
    /// The witness could not make the decision durable; nothing was decided.
    Unavailable = 7,
    /// The request was not received completely in time.
    Timeout = 8,
}

impl ErrorCode {
    /// The code for a byte, if known.
    pub fn from_u8(b: u8) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match b {
            1 => Malformed,
            2 => UnsupportedVersion,
            3 => UnknownType,
            4 => TooLarge,
            5 => UnknownPair,
            6 => NotAuthorized,
            7 => Unavailable,
            8 => Timeout,
            _ => return None,
        })
    }

    /// A short stable label (used in logs and metrics).
    pub fn label(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Malformed => "malformed",
            UnsupportedVersion => "unsupported_version",
            UnknownType => "unknown_type",
            TooLarge => "too_large",
            UnknownPair => "unknown_pair",
            NotAuthorized => "not_authorized",
            Unavailable => "unavailable",
            Timeout => "timeout",
        }
    }
}

/// A response from the witness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// The claim is granted (or was already granted to this node: same answer).
    Granted {
        /// The new generation, now held by the claimant.
        generation: u64,
        /// The claimant.
        holder: String,
    },
    /// The claim is denied; the pair's current state.
    Denied {
        /// Current generation.
        generation: u64,
        /// Current holder.
        holder: Option<String>,
    },
    /// Answer to `Status`.
    Status {
        /// Current generation.
        generation: u64,
        /// Current holder.
        holder: Option<String>,
    },
    /// Answer to `Ping`.
    Pong,
    /// The request was refused.
    Error {
        /// Why.
        code: ErrorCode,
        /// Human-readable detail.
        text: String,
    },
}

/// Why a message could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Fewer than the 4 header bytes.
    #[error("message truncated in header: {0} bytes, need 4")]
    ShortHeader(usize),
    /// The first two bytes are not `FW`.
    #[error("bad magic {0:02x}{1:02x}, not an ftvm-witness message")]
    BadMagic(u8, u8),
    /// A version this build does not speak.
    #[error("unsupported protocol version {0} (this build speaks {VERSION}; version 1, without claim ids, is no longer served: upgrade the older side)")]
    UnsupportedVersion(u8),
    /// A message type this build does not know.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// The body ended early.
    #[error("message truncated: field {field} needs {needed} bytes at offset {offset}, {available} left")]
    Truncated {
        /// The field being read.
        field: &'static str,
        /// Byte offset of the field.
        offset: usize,
        /// Bytes it needs.
        needed: usize,
        /// Bytes left.
        available: usize,
    },
    /// Bytes after the end of the body.
    #[error("{0} unexpected bytes after the message")]
    TrailingBytes(usize),
    /// More than the maximum size.
    #[error("message of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    /// A name of the wrong length or with characters outside `[A-Za-z0-9._-]`.
    #[error("invalid {0}: names are 1..=63 bytes of [A-Za-z0-9._-]")]
    BadName(&'static str),
    /// A presence byte other than 0 or 1.
    #[error("invalid presence flag {0} for {1}")]
    BadFlag(u8, &'static str),
    /// A text that is not UTF-8.
    #[error("text is not valid UTF-8")]
    BadText,
    /// An unknown error code in a response.
    #[error("unknown error code {0}")]
    UnknownErrorCode(u8),
}

impl DecodeError {
    /// The error code a witness answers with for this decoding failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
            DecodeError::TooLarge(..) => ErrorCode::TooLarge,
            _ => ErrorCode::Malformed,
        }
    }
}

/// Whether `s` is a valid pair or node name on the wire.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        let available = self.buf.len() - self.pos;
        if available < n {
            return Err(DecodeError::Truncated {
                field,
                offset: self.pos,
                needed: n,
                available,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn name(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let n = self.u8(field)? as usize;
        if n == 0 || n > MAX_NAME {
            return Err(DecodeError::BadName(field));
        }
        let b = self.take(n, field)?;
        let s = std::str::from_utf8(b).map_err(|_| DecodeError::BadName(field))?;
        if !valid_name(s) {
            return Err(DecodeError::BadName(field));
        }
        Ok(s.to_string())
    }
    fn opt_name(&mut self, field: &'static str) -> Result<Option<String>, DecodeError> {
        match self.u8(field)? {
            0 => Ok(None),
            1 => Ok(Some(self.name(field)?)),
            f => Err(DecodeError::BadFlag(f, field)),
        }
    }
    fn text(&mut self, field: &'static str) -> Result<String, DecodeError> {
        let b = self.take(2, field)?;
        let n = u16::from_be_bytes([b[0], b[1]]) as usize;
        let b = self.take(n, field)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::BadText)
    }
    fn finish(&self) -> Result<(), DecodeError> {
        let rest = self.buf.len() - self.pos;
        if rest == 0 {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes(rest))
        }
    }
}

fn header<'a>(buf: &'a [u8], max: usize, versions: &[u8]) -> Result<(u8, Reader<'a>), DecodeError> {
    if buf.len() > max {
        return Err(DecodeError::TooLarge(buf.len(), max));
    }
    if buf.len() < 4 {
        return Err(DecodeError::ShortHeader(buf.len()));
    }
    if buf[0..2] != MAGIC {
        return Err(DecodeError::BadMagic(buf[0], buf[1]));
    }
    if !versions.contains(&buf[2]) {
        return Err(DecodeError::UnsupportedVersion(buf[2]));
    }
    Ok((buf[3], Reader { buf, pos: 4 }))
}

fn put_header(out: &mut Vec<u8>, version: u8, ty: u8) {
    out.extend_from_slice(&MAGIC);
    out.push(version);
    out.push(ty);
}

/// The protocol version of a message, if it has a valid header (for answering a request in
/// the version it was sent in).
pub fn message_version(buf: &[u8]) -> Option<u8> {
    (buf.len() >= 4 && buf[0..2] == MAGIC).then(|| buf[2])
}

fn put_name(out: &mut Vec<u8>, s: &str) {
    // Names are validated before encoding by every constructor in this crate; truncate
    // defensively so the length byte is always right.
    let b = &s.as_bytes()[..s.len().min(MAX_NAME)];
    out.push(b.len() as u8);
    out.extend_from_slice(b);
}

fn put_opt_name(out: &mut Vec<u8>, s: &Option<String>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(1);
            put_name(out, s);
        }
    }
}

impl Request {
    /// Encodes the request.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        match self {
            Request::Claim {
                pair,
                seen,
                claim_id,
            } => {
                put_header(&mut out, VERSION, 1);
                put_name(&mut out, pair);
                out.extend_from_slice(&seen.to_be_bytes());
                out.extend_from_slice(&claim_id.0);
            }
            Request::Status { pair } => {
                put_header(&mut out, VERSION, 2);
                put_name(&mut out, pair);
            }
            Request::Ping => put_header(&mut out, VERSION, 3),
        }
        out
    }

    /// Decodes a complete request.
    pub fn decode(buf: &[u8]) -> Result<Request, DecodeError> {
        let (ty, mut r) = header(buf, MAX_REQUEST, &[VERSION])?;
        let req = match ty {
            1 => Request::Claim {
                pair: r.name("pair")?,
                seen: r.u64("seen generation")?,
                claim_id: {
                    let mut c = [0u8; ClaimId::LEN];
                    c.copy_from_slice(r.take(ClaimId::LEN, "claim id")?);
                    ClaimId(c)
                },
            },
            2 => Request::Status {
                pair: r.name("pair")?,
            },
            3 => Request::Ping,
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(req)
    }
}

impl Response {
    /// Encodes the response (an over-long error text is cut to fit [`MAX_RESPONSE`]).
    pub fn encode(&self) -> Vec<u8> {
        self.encode_version(VERSION)
    }

    /// Encodes the response with the header of protocol `version` (responses have the same
    /// layout in versions 1 and 2: used to refuse a version 1 request in words its sender
    /// understands).
    pub fn encode_version(&self, version: u8) -> Vec<u8> {
        let mut out = Vec::with_capacity(32);
        match self {
            Response::Granted { generation, holder } => {
                put_header(&mut out, version, 1);
                out.extend_from_slice(&generation.to_be_bytes());
                put_name(&mut out, holder);
            }
            Response::Denied { generation, holder } => {
                put_header(&mut out, version, 2);
                out.extend_from_slice(&generation.to_be_bytes());
                put_opt_name(&mut out, holder);
            }
            Response::Status { generation, holder } => {
                put_header(&mut out, version, 3);
                out.extend_from_slice(&generation.to_be_bytes());
                put_opt_name(&mut out, holder);
            }
            Response::Pong => put_header(&mut out, version, 4),
            Response::Error { code, text } => {
                put_header(&mut out, version, 5);
                out.push(*code as u8);
                let mut end = text.len().min(MAX_RESPONSE - 7);
                while !text.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&(end as u16).to_be_bytes());
                out.extend_from_slice(&text.as_bytes()[..end]);
            }
        }
        out
    }

    /// Decodes a complete response.
    pub fn decode(buf: &[u8]) -> Result<Response, DecodeError> {
        let (ty, mut r) = header(buf, MAX_RESPONSE, &[VERSION, VERSION_V1])?;
        let resp = match ty {
            1 => Response::Granted {
                generation: r.u64("generation")?,
                holder: r.name("holder")?,
            },
            2 => Response::Denied {
                generation: r.u64("generation")?,
                holder: r.opt_name("holder")?,
            },
            3 => Response::Status {
                generation: r.u64("generation")?,
                holder: r.opt_name("holder")?,
            },
            4 => Response::Pong,
            5 => {
                let c = r.u8("error code")?;
                let code = ErrorCode::from_u8(c).ok_or(DecodeError::UnknownErrorCode(c))?;
                Response::Error {
                    code,
                    text: r.text("error text")?,
                }
            }
            t => return Err(DecodeError::UnknownType(t)),
        };
        r.finish()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trips() {
        let reqs = [
            Request::Claim {
                pair: "pair-1".into(),
                seen: 42,
                claim_id: ClaimId([0xab; 16]),
            },
            Request::Status { pair: "p".into() },
            Request::Ping,
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }
        let resps = [
            Response::Granted {
                generation: 7,
                holder: "node-a".into(),
            },
            Response::Denied {
                generation: 7,
                holder: None,
            },
            Response::Status {
                generation: u64::MAX,
                holder: Some("b".into()),
            },
            Response::Pong,
            Response::Error {
                code: ErrorCode::NotAuthorized,
                text: "nope ✓".into(),
            },
        ];
        for r in resps {
            assert_eq!(Response::decode(&r.encode()).unwrap(), r);
            // The layout of version 1 responses is the same: a client understands both.
            let v1 = r.encode_version(VERSION_V1);
            assert_eq!(v1[2], VERSION_V1);
            assert_eq!(Response::decode(&v1).unwrap(), r);
        }
    }

    #[test]
    fn version_1_requests_are_refused_clearly() {
        // A claim as a version 1 client sends it: no claim id.
        let mut v1 = vec![b'F', b'W', VERSION_V1, 1, 3];
        v1.extend_from_slice(b"vm1");
        v1.extend_from_slice(&5u64.to_be_bytes());
        assert_eq!(message_version(&v1), Some(VERSION_V1));
        let e = Request::decode(&v1).unwrap_err();
        assert_eq!(e, DecodeError::UnsupportedVersion(VERSION_V1));
        assert_eq!(e.code(), ErrorCode::UnsupportedVersion);
        assert!(e.to_string().contains("without claim ids"), "{e}");
        for t in [2u8, 3] {
            assert_eq!(
                Request::decode(&[b'F', b'W', VERSION_V1, t]),
                Err(DecodeError::UnsupportedVersion(VERSION_V1))
            );
        }
        assert_eq!(message_version(b"FW"), None);
        assert_eq!(message_version(b"GET /"), None);
    }

    #[test]
    fn claim_is_compact() {
        let b = Request::Claim {
            pair: "p".into(),
            seen: 1,
            claim_id: ClaimId([1; 16]),
        }
        .encode();
        assert_eq!(b.len(), 4 + 2 + 8 + 16);
    }

    #[test]
    fn precise_errors() {
        let claim = Request::Claim {
            pair: "pair".into(),
            seen: 3,
            claim_id: ClaimId([7; 16]),
        }
        .encode();
        assert_eq!(Request::decode(&[]), Err(DecodeError::ShortHeader(0)));
        assert_eq!(Request::decode(b"FW"), Err(DecodeError::ShortHeader(2)));
        assert_eq!(
            Request::decode(b"GET / HTTP/1.0"),
            Err(DecodeError::BadMagic(b'G', b'E'))
        );
        assert_eq!(
            Request::decode(&[b'F', b'W', 9, 1]),
            Err(DecodeError::UnsupportedVersion(9))
        );
        assert_eq!(
            Request::decode(&[b'F', b'W', VERSION, 77]),
            Err(DecodeError::UnknownType(77))
        );
        assert_eq!(
            Request::decode(&claim[..claim.len() - 19]),
            Err(DecodeError::Truncated {
                field: "seen generation",
                offset: 9,
                needed: 8,
                available: 5
            })
        );
        assert_eq!(
            Request::decode(&claim[..claim.len() - 1]),
            Err(DecodeError::Truncated {
                field: "claim id",
                offset: 17,
                needed: 16,
                available: 15
            })
        );
        let mut long = claim.clone();
        long.push(0);
        assert_eq!(Request::decode(&long), Err(DecodeError::TrailingBytes(1)));
        let big = vec![0u8; MAX_REQUEST + 1];
        assert_eq!(
            Request::decode(&big),
            Err(DecodeError::TooLarge(MAX_REQUEST + 1, MAX_REQUEST))
        );
        let mut bad = claim.clone();
        bad[6] = b'/';
        assert_eq!(Request::decode(&bad), Err(DecodeError::BadName("pair")));
        let zero = [b'F', b'W', VERSION, 2, 0];
        assert_eq!(Request::decode(&zero), Err(DecodeError::BadName("pair")));
        assert_eq!(DecodeError::UnknownType(9).code(), ErrorCode::UnknownType);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Request::decode(&bytes);
            let _ = Response::decode(&bytes);
        }

        /// Valid headers followed by random bodies: still no panic, and anything accepted
        /// re-encodes to exactly the input.
        #[test]
        fn structured_fuzz(ty in 0u8..8, body in proptest::collection::vec(any::<u8>(), 0..80)) {
            let mut b = vec![b'F', b'W', VERSION, ty];
            b.extend_from_slice(&body);
            if let Ok(r) = Request::decode(&b) {
                prop_assert_eq!(r.encode(), b.clone());
            }
            if let Ok(r) = Response::decode(&b) {
                prop_assert_eq!(r.encode(), b);
            }
        }

        /// Every strict prefix of a valid request is refused.
        #[test]
        fn truncation_is_always_detected(pair in "[a-z0-9-]{1,63}", seen in any::<u64>(), id in any::<[u8; 16]>()) {
            let b = Request::Claim { pair, seen, claim_id: ClaimId(id) }.encode();
            for n in 0..b.len() {
                prop_assert!(Request::decode(&b[..n]).is_err());
            }
        }
    }
}
