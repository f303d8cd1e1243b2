//! RESP2: a streaming request parser (inline and multibulk, bounded) and reply writers.
//!
//! The parser looks at the unconsumed part of a connection's input buffer and returns one
//! request at a time, or says that more input is needed, or reports a protocol error after
//! which the connection must be answered with `-ERR Protocol error: ...` and closed.
//! It never panics and never allocates more than the configured limits allow.

use alloc::vec::Vec;
use core::fmt;

/// Bounds on what one client request may contain. A request that exceeds any of them is a
/// protocol error (the connection is closed), never an allocation of unbounded size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted bulk string (`$<len>`) in a multibulk request, in bytes.
    pub max_bulk_len: usize,
    /// Largest accepted number of arguments (`*<count>`) in one request.
    pub max_args: usize,
    /// Longest accepted inline request line (and multibulk/bulk header line), in bytes.
    pub max_inline_len: usize,
    /// Largest amount of buffered input that may belong to one incomplete request, in bytes.
    pub max_request_len: usize,
}

impl Default for Limits {
    /// 512 KiB bulks, 4096 arguments, 64 KiB inline lines, 2 MiB per request.
    fn default() -> Self {
        Limits {
            max_bulk_len: 512 * 1024,
            max_args: 4096,
            max_inline_len: 64 * 1024,
            max_request_len: 2 * 1024 * 1024,
        }
    }
}

/// Why a request was rejected. After any of these the connection is answered with
/// [`ProtocolError::write_reply`] and closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProtocolError {
    /// `*<count>` was not an integer, or exceeded [`Limits::max_args`].
    InvalidMultibulkLength,
    /// `$<len>` was not an integer, was negative, or exceeded [`Limits::max_bulk_len`].
    InvalidBulkLength,
    /// A multibulk argument did not start with `$`; carries the byte found instead.
    ExpectedDollar(u8),
    /// A bulk string's data was not followed by CRLF.
    ExpectedCrlf,
    /// An inline request line longer than [`Limits::max_inline_len`].
    TooBigInline,
    /// A `*<count>` header line longer than [`Limits::max_inline_len`].
    TooBigMbulkCount,
    /// A `$<len>` header line longer than [`Limits::max_inline_len`].
    TooBigBulkCount,
    /// An inline request with an unterminated quoted string.
    UnbalancedQuotes,
    /// A request larger than [`Limits::max_request_len`] bytes (declared or buffered).
    RequestTooLarge,
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::InvalidMultibulkLength => f.write_str("invalid multibulk length"),
            ProtocolError::InvalidBulkLength => f.write_str("invalid bulk length"),
            ProtocolError::ExpectedDollar(b) => {
                let c = if b.is_ascii_graphic() {
                    *b as char
                } else {
                    '?'
                };
                write!(f, "expected '$', got '{c}'")
            }
            ProtocolError::ExpectedCrlf => f.write_str("expected CRLF after bulk data"),
            ProtocolError::TooBigInline => f.write_str("too big inline request"),
            ProtocolError::TooBigMbulkCount => f.write_str("too big mbulk count string"),
            ProtocolError::TooBigBulkCount => f.write_str("too big bulk count string"),
            ProtocolError::UnbalancedQuotes => f.write_str("unbalanced quotes in request"),
            ProtocolError::RequestTooLarge => f.write_str("request too large"),
        }
    }
}

impl ProtocolError {
    /// Appends the Redis-style reply for this error: `-ERR Protocol error: <why>\r\n`.
    pub fn write_reply(&self, out: &mut Vec<u8>) {
        use core::fmt::Write;
        let mut s = alloc::string::String::new();
        let _ = write!(s, "ERR Protocol error: {self}");
        write_error(out, &s);
    }
}

/// The result of looking at the start of a connection's unconsumed input; a command's
/// arguments are in the vector given to [`parse`].
#[derive(Debug, PartialEq, Eq)]
pub enum Parse {
    /// One complete request: its arguments (the command name first, never empty) are in
    /// `args`; it used `consumed` input bytes.
    Command {
        /// Input bytes consumed by this request.
        consumed: usize,
    },
    /// Input that forms no command (a blank inline line, `*0`, `*-1`): skip `consumed`
    /// bytes and parse again.
    Empty {
        /// Input bytes to skip.
        consumed: usize,
    },
    /// The input holds only part of a request: wait for more bytes.
    Incomplete,
    /// The input is malformed or too large: reply with the error and close the connection.
    Error(ProtocolError),
}

/// Parses the first request in `buf` (the unconsumed input of one connection), putting a
/// command's arguments into `args` (replacing what it held; left alone otherwise) and reusing
/// the allocations of its vectors: a connection's stream of requests costs no allocation per
/// argument once its vectors have grown.
///
/// Requests starting with `*` are multibulk, anything else is an inline command split on
/// whitespace with `"..."` and `'...'` quoting as in Redis.
pub fn parse(buf: &[u8], limits: &Limits, args: &mut Vec<Vec<u8>>) -> Parse {
    let r = if buf.is_empty() {
        Parse::Incomplete
    } else if buf[0] == b'*' {
        parse_multibulk(buf, limits, args)
    } else {
        parse_inline(buf, limits, args)
    };
    match r {
        Parse::Incomplete if buf.len() > limits.max_request_len => {
            Parse::Error(ProtocolError::RequestTooLarge)
        }
        r => r,
    }
}

/// Finds a CRLF-terminated header line starting at `start`; returns the line's content
/// (without CRLF) and the offset just past it.
fn header_line<'b>(
    buf: &'b [u8],
    start: usize,
    limits: &Limits,
    too_big: ProtocolError,
) -> Result<Option<(&'b [u8], usize)>, ProtocolError> {
    let rest = &buf[start..];
    match rest.iter().position(|&b| b == b'\r') {
        None => {
            if rest.len() > limits.max_inline_len {
                Err(too_big)
            } else {
                Ok(None)
            }
        }
        Some(i) => {
            if i > limits.max_inline_len {
                return Err(too_big);
            }
            match rest.get(i + 1) {
                None => Ok(None),
                Some(b'\n') => Ok(Some((&rest[..i], start + i + 2))),
                Some(_) => Err(match too_big {
                    ProtocolError::TooBigBulkCount => ProtocolError::InvalidBulkLength,
                    _ => ProtocolError::InvalidMultibulkLength,
                }),
            }
        }
    }
}

/// Parses a signed decimal integer the way Redis' `string2ll` does (no spaces, no `+`,
/// no leading zeros except "0", fits in i64).
pub fn parse_i64(s: &[u8]) -> Option<i64> {
    let (neg, digits) = match s {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, s),
    };
    if digits.is_empty() || digits.len() > 19 || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    if neg && digits == b"0" {
        return None;
    }
    let mut v: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        let d = (d - b'0') as i64;
        v = v.checked_mul(10)?;
        v = if neg {
            v.checked_sub(d)?
        } else {
            v.checked_add(d)?
        };
    }
    Some(v)
}

fn parse_multibulk(buf: &[u8], limits: &Limits, args: &mut Vec<Vec<u8>>) -> Parse {
    let (line, mut pos) = match header_line(buf, 0, limits, ProtocolError::TooBigMbulkCount) {
        Err(e) => return Parse::Error(e),
        Ok(None) => return Parse::Incomplete,
        Ok(Some(x)) => x,
    };
    let count = match parse_i64(&line[1..]) {
        Some(n) => n,
        None => return Parse::Error(ProtocolError::InvalidMultibulkLength),
    };
    if count <= 0 {
        return Parse::Empty { consumed: pos };
    }
    if count as u64 > limits.max_args as u64 {
        return Parse::Error(ProtocolError::InvalidMultibulkLength);
    }
    let count = count as usize;
    // First pass: validate all headers and lengths without copying anything, so an
    // incomplete request costs no allocation.
    let first = pos;
    for _ in 0..count {
        match buf.get(pos) {
            None => return Parse::Incomplete,
            Some(b'$') => {}
            Some(&b) => return Parse::Error(ProtocolError::ExpectedDollar(b)),
        }
        let (line, next) = match header_line(buf, pos, limits, ProtocolError::TooBigBulkCount) {
            Err(e) => return Parse::Error(e),
            Ok(None) => return Parse::Incomplete,
            Ok(Some(x)) => x,
        };
        let len = match parse_i64(&line[1..]) {
            Some(n) if n >= 0 && n as u64 <= limits.max_bulk_len as u64 => n as usize,
            _ => return Parse::Error(ProtocolError::InvalidBulkLength),
        };
        let end = next + len;
        if end + 2 > limits.max_request_len {
            // Refuse as soon as the declared size is known, without buffering it.
            return Parse::Error(ProtocolError::RequestTooLarge);
        }
        if buf.len() < end + 2 {
            return Parse::Incomplete;
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Parse::Error(ProtocolError::ExpectedCrlf);
        }
        pos = end + 2;
    }
    // Second pass: copy the arguments out (headers are known to be valid now), into the
    // caller's vectors.
    args.truncate(count);
    let mut p = first;
    for i in 0..count {
        let nl = p + buf[p..].iter().position(|&b| b == b'\r').unwrap_or(0);
        let len = parse_i64(&buf[p + 1..nl]).unwrap_or(0) as usize;
        let start = nl + 2;
        let arg = &buf[start..start + len];
        match args.get_mut(i) {
            Some(a) => {
                a.clear();
                a.extend_from_slice(arg);
            }
            None => args.push(arg.to_vec()),
        }
        p = start + len + 2;
    }
    Parse::Command { consumed: pos }
}

fn parse_inline(buf: &[u8], limits: &Limits, args: &mut Vec<Vec<u8>>) -> Parse {
    let nl = match buf.iter().position(|&b| b == b'\n') {
        None => {
            return if buf.len() > limits.max_inline_len {
                Parse::Error(ProtocolError::TooBigInline)
            } else {
                Parse::Incomplete
            }
        }
        Some(i) => i,
    };
    if nl > limits.max_inline_len {
        return Parse::Error(ProtocolError::TooBigInline);
    }
    let mut line = &buf[..nl];
    if let [rest @ .., b'\r'] = line {
        line = rest;
    }
    match split_args(line, limits.max_args) {
        Err(e) => Parse::Error(e),
        Ok(a) if a.is_empty() => Parse::Empty { consumed: nl + 1 },
        Ok(a) => {
            *args = a;
            Parse::Command { consumed: nl + 1 }
        }
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Splits an inline request line like Redis' `sdssplitargs`: whitespace separated, with
/// `"..."` (C-style escapes: `\n \r \t \b \a \\ \" \xHH`) and `'...'` (only `\'`) quoting.
/// A closing quote must be followed by whitespace or the end of the line.
fn split_args(line: &[u8], max_args: usize) -> Result<Vec<Vec<u8>>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    let n = line.len();
    loop {
        while i < n && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i >= n {
            return Ok(args);
        }
        if args.len() >= max_args {
            return Err(ProtocolError::InvalidMultibulkLength);
        }
        let mut cur = Vec::new();
        let mut in_dq = false;
        let mut in_sq = false;
        loop {
            if in_dq {
                if i >= n {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
                let c = line[i];
                if c == b'\\' && i + 3 < n && line[i + 1] == b'x' {
                    if let (Some(h), Some(l)) = (hex_val(line[i + 2]), hex_val(line[i + 3])) {
                        cur.push(h * 16 + l);
                        i += 4;
                        continue;
                    }
                }
                if c == b'\\' && i + 1 < n {
                    cur.push(match line[i + 1] {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'b' => 8,
                        b'a' => 7,
                        other => other,
                    });
                    i += 2;
                } else if c == b'"' {
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                    i += 1;
                }
            } else if in_sq {
                if i >= n {
                    return Err(ProtocolError::UnbalancedQuotes);
                }
                let c = line[i];
                if c == b'\\' && i + 1 < n && line[i + 1] == b'\'' {
                    cur.push(b'\'');
                    i += 2;
                } else if c == b'\'' {
                    if i + 1 < n && !line[i + 1].is_ascii_whitespace() {
                        return Err(ProtocolError::UnbalancedQuotes);
                    }
                    i += 1;
                    break;
                } else {
                    cur.push(c);
                    i += 1;
                }
            } else {
                if i >= n || line[i].is_ascii_whitespace() {
                    break;
                }
                match line[i] {
                    b'"' => in_dq = true,
                    b'\'' => in_sq = true,
                    c => cur.push(c),
                }
                i += 1;
            }
        }
        args.push(cur);
    }
}

/// Appends a simple string reply: `+<s>\r\n`. `s` must not contain CR or LF.
pub fn write_simple(out: &mut Vec<u8>, s: &str) {
    out.push(b'+');
    out.extend_from_slice(s.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends an error reply: `-<msg>\r\n`. CR and LF in `msg` are replaced by spaces so the
/// reply stays one line; `msg` should start with an error code such as `ERR`.
pub fn write_error(out: &mut Vec<u8>, msg: &str) {
    out.push(b'-');
    out.extend(
        msg.bytes()
            .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

/// Appends the decimal form of `v` to `out`.
pub fn push_i64(out: &mut Vec<u8>, v: i64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    let mut u = v.unsigned_abs();
    loop {
        i -= 1;
        tmp[i] = b'0' + (u % 10) as u8;
        u /= 10;
        if u == 0 {
            break;
        }
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Appends an integer reply: `:<v>\r\n`.
pub fn write_int(out: &mut Vec<u8>, v: i64) {
    out.push(b':');
    push_i64(out, v);
    out.extend_from_slice(b"\r\n");
}

/// Appends a bulk string reply: `$<len>\r\n<data>\r\n`.
pub fn write_bulk(out: &mut Vec<u8>, data: &[u8]) {
    out.push(b'$');
    push_i64(out, data.len() as i64);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Appends the null bulk reply: `$-1\r\n`.
pub fn write_null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"$-1\r\n");
}

/// Appends the null array reply: `*-1\r\n`.
pub fn write_null_array(out: &mut Vec<u8>) {
    out.extend_from_slice(b"*-1\r\n");
}

/// Appends an array header: `*<n>\r\n`; the caller then writes `n` elements.
pub fn write_array_len(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    push_i64(out, n as i64);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn lim() -> Limits {
        Limits::default()
    }

    /// What [`parse`] found, with the arguments in it (for comparisons).
    #[derive(Debug, PartialEq, Eq)]
    enum Whole {
        Command { args: Vec<Vec<u8>>, consumed: usize },
        Empty { consumed: usize },
        Incomplete,
        Error(ProtocolError),
    }

    /// [`parse`] into a fresh vector.
    fn parse_whole(buf: &[u8], limits: &Limits) -> Whole {
        let mut args = Vec::new();
        match parse(buf, limits, &mut args) {
            Parse::Command { consumed } => Whole::Command { args, consumed },
            Parse::Empty { consumed } => Whole::Empty { consumed },
            Parse::Incomplete => Whole::Incomplete,
            Parse::Error(e) => Whole::Error(e),
        }
    }

    fn cmd(args: &[&[u8]], consumed: usize) -> Whole {
        Whole::Command {
            args: args.iter().map(|a| a.to_vec()).collect(),
            consumed,
        }
    }

    #[test]
    fn a_reused_vector_gets_what_a_fresh_one_gets() {
        // Commands of falling and rising argument counts, multibulk and inline, so stale
        // arguments of a longer command would show.
        let reqs: [&[u8]; 6] = [
            b"*5\r\n$4\r\nMSET\r\n$1\r\na\r\n$3\r\none\r\n$1\r\nb\r\n$3\r\ntwo\r\n",
            b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n",
            b"PING\r\n",
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$0\r\n\r\n",
            b"*1\r\n$4\r\nPING\r\n",
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
        ];
        let mut args = Vec::new();
        for r in reqs {
            let Whole::Command {
                args: want,
                consumed,
            } = parse_whole(r, &lim())
            else {
                panic!("{r:?}");
            };
            assert_eq!(parse(r, &lim(), &mut args), Parse::Command { consumed });
            assert_eq!(args, want, "{r:?}");
        }
        // Nothing found: the vector is left as it was.
        assert_eq!(
            parse(b"*2\r\n$3\r\nGE", &lim(), &mut args),
            Parse::Incomplete
        );
        assert_eq!(args.len(), 3);
    }

    #[test]
    fn multibulk() {
        let b = b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n";
        assert_eq!(parse_whole(b, &lim()), cmd(&[b"GET", b"k"], b.len()));
        for cut in 0..b.len() {
            assert_eq!(
                parse_whole(&b[..cut], &lim()),
                Whole::Incomplete,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn pipelined() {
        let b = b"*1\r\n$4\r\nPING\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\na\r\n$0\r\n\r\n";
        let mut pos = 0;
        let mut got = vec![];
        while let Whole::Command { args, consumed } = parse_whole(&b[pos..], &lim()) {
            got.push(args);
            pos += consumed;
        }
        assert_eq!(pos, b.len());
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], vec![b"SET".to_vec(), b"a".to_vec(), vec![]]);
    }

    #[test]
    fn inline() {
        assert_eq!(parse_whole(b"PING\r\n", &lim()), cmd(&[b"PING"], 6));
        assert_eq!(
            parse_whole(b"  set a  b\n", &lim()),
            cmd(&[b"set", b"a", b"b"], 11)
        );
        assert_eq!(
            parse_whole(b"set \"a b\\x41\\n\" 'c\\'d'\r\n", &lim()),
            cmd(&[b"set", b"a bA\n", b"c'd"], 24)
        );
        assert_eq!(parse_whole(b"\r\n", &lim()), Whole::Empty { consumed: 2 });
        assert_eq!(parse_whole(b"PIN", &lim()), Whole::Incomplete);
        assert_eq!(
            parse_whole(b"set \"a\r\n", &lim()),
            Whole::Error(ProtocolError::UnbalancedQuotes)
        );
        assert_eq!(
            parse_whole(b"set \"a\"b\r\n", &lim()),
            Whole::Error(ProtocolError::UnbalancedQuotes)
        );
    }

    #[test]
    fn empty_multibulk() {
        assert_eq!(parse_whole(b"*0\r\n", &lim()), Whole::Empty { consumed: 4 });
        assert_eq!(
            parse_whole(b"*-1\r\n", &lim()),
            Whole::Empty { consumed: 5 }
        );
    }

    #[test]
    fn errors() {
        let l = Limits {
            max_bulk_len: 10,
            max_args: 3,
            max_inline_len: 16,
            max_request_len: 40,
        };
        let e = |b: &[u8]| match parse_whole(b, &l) {
            Whole::Error(e) => e,
            other => panic!("{b:?}: {other:?}"),
        };
        assert_eq!(e(b"*x\r\n"), ProtocolError::InvalidMultibulkLength);
        assert_eq!(e(b"*4\r\n"), ProtocolError::InvalidMultibulkLength);
        assert_eq!(e(b"*1\r\n$11\r\n"), ProtocolError::InvalidBulkLength);
        assert_eq!(e(b"*1\r\n$-1\r\n"), ProtocolError::InvalidBulkLength);
        assert_eq!(e(b"*1\r\n:1\r\n"), ProtocolError::ExpectedDollar(b':'));
        assert_eq!(e(b"*1\r\n$1\r\nab\r\n"), ProtocolError::ExpectedCrlf);
        assert_eq!(e(&[b'a'; 17]), ProtocolError::TooBigInline);
        assert_eq!(e(b"*1111111111111111111"), ProtocolError::TooBigMbulkCount);
        assert_eq!(
            e(b"*1\r\n$1111111111111111111"),
            ProtocolError::TooBigBulkCount
        );
        assert_eq!(
            e(b"*3\r\n$10\r\n0123456789\r\n$10\r\n0123456789\r\n$10\r\n01234"),
            ProtocolError::RequestTooLarge
        );
        let mut out = vec![];
        ProtocolError::InvalidBulkLength.write_reply(&mut out);
        assert_eq!(out, b"-ERR Protocol error: invalid bulk length\r\n");
    }

    #[test]
    fn ints() {
        assert_eq!(parse_i64(b"0"), Some(0));
        assert_eq!(parse_i64(b"-12"), Some(-12));
        assert_eq!(parse_i64(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(parse_i64(b"-9223372036854775808"), Some(i64::MIN));
        assert_eq!(parse_i64(b"9223372036854775808"), None);
        assert_eq!(parse_i64(b"01"), None);
        assert_eq!(parse_i64(b"-0"), None);
        assert_eq!(parse_i64(b""), None);
        assert_eq!(parse_i64(b"+1"), None);
        assert_eq!(parse_i64(b" 1"), None);
        let mut out = vec![];
        push_i64(&mut out, i64::MIN);
        assert_eq!(out, b"-9223372036854775808");
    }

    /// Deterministic pseudo-random fuzzing: arbitrary bytes, mutated valid requests and
    /// every split point must never panic, and a parse must never consume past the input.
    #[test]
    fn fuzz_never_panics() {
        let mut s: u64 = 0x1234_5678_9abc_def0;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let seeds: [&[u8]; 4] = [
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
            b"set \"a\\x4\" 'b' c\r\n",
            b"*1\r\n$4\r\nPING\r\n*0\r\n\r\n",
            b"*2\r\n$-1\r\n$2\r\nab\r\n",
        ];
        let l = Limits {
            max_bulk_len: 64,
            max_args: 8,
            max_inline_len: 64,
            max_request_len: 256,
        };
        for round in 0..200_000u32 {
            let mut buf: Vec<u8> = if round % 2 == 0 {
                let len = (next() % 80) as usize;
                (0..len)
                    .map(|_| {
                        let r = next();
                        // Bias towards protocol bytes so deeper paths are reached.
                        match r % 8 {
                            0 => b'*',
                            1 => b'$',
                            2 => b'\r',
                            3 => b'\n',
                            4 => b'0' + (r >> 8) as u8 % 10,
                            5 => b'"',
                            _ => (r >> 16) as u8,
                        }
                    })
                    .collect()
            } else {
                let mut b = seeds[(next() % 4) as usize].to_vec();
                for _ in 0..(next() % 4) {
                    let i = (next() as usize) % b.len();
                    b[i] = next() as u8;
                }
                b
            };
            if round % 7 == 0 {
                buf.truncate((next() as usize) % (buf.len() + 1));
            }
            let mut pos = 0;
            loop {
                match parse_whole(&buf[pos..], &l) {
                    Whole::Command { consumed, args } => {
                        assert!(consumed > 0 && pos + consumed <= buf.len());
                        assert!(!args.is_empty() && args.len() <= l.max_args);
                        pos += consumed;
                    }
                    Whole::Empty { consumed } => {
                        assert!(consumed > 0 && pos + consumed <= buf.len());
                        pos += consumed;
                    }
                    Whole::Incomplete | Whole::Error(_) => break,
                }
            }
        }
    }
}
