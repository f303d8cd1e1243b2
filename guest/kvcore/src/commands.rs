//! The command engine: [`Store::execute`] runs one request against the store and appends
//! its RESP2 reply, and says what (if anything) must go into the durable log.

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;

use crate::resp::{
    parse_i64, push_i64, write_array_len, write_bulk, write_error, write_int, write_null,
    write_null_array, write_simple,
};
use crate::store::{Store, Value, ZSet};

mod glob;
mod hashes;
mod keys;
mod lists;
mod server;
mod sets;
mod strings;
mod zsets;

pub use glob::glob_match;
use hashes::*;
use keys::*;
use lists::*;
use server::*;
use sets::*;
use strings::*;
use zsets::*;

/// What a command did to the store, i.e. what the durable log must receive for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing changed: nothing to log.
    None,
    /// The store changed: log the request's arguments as they are (replaying them with the
    /// same `now_ms` reproduces the change exactly).
    Logged,
    /// The store changed in a way that replaying the request would not reproduce (SPOP picks
    /// members at random): log these arguments instead.
    LoggedAs(Vec<Vec<u8>>),
}

/// The result of [`Store::execute`]. The reply itself has been appended to the output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// What the durable log must receive.
    pub effect: Effect,
    /// The client asked to close the connection (QUIT): send the reply, then close.
    pub close: bool,
}

impl Outcome {
    /// Whether the command changed the store (and so must be logged before its reply, and
    /// any later reply, is released).
    pub fn is_write(&self) -> bool {
        self.effect != Effect::None
    }

    /// The arguments to log for this command, given the request's arguments `args`.
    pub fn log_args<'a>(&'a self, args: &'a [Vec<u8>]) -> Option<&'a [Vec<u8>]> {
        match &self.effect {
            Effect::None => None,
            Effect::Logged => Some(args),
            Effect::LoggedAs(v) => Some(v),
        }
    }
}

type Handler = fn(&mut Ctx<'_>, &[Vec<u8>]) -> Effect;

struct Cmd {
    /// Lower-case name.
    name: &'static str,
    /// Redis arity: `n > 0` exactly n arguments (name included), `n < 0` at least `-n`.
    arity: i32,
    /// May change the store (used to refuse writes when the log is full).
    write: bool,
    run: Handler,
}

struct Ctx<'a> {
    s: &'a mut Store,
    now: u64,
    out: &'a mut Vec<u8>,
    close: bool,
}

const WRONGTYPE: &str = "WRONGTYPE Operation against a key holding the wrong kind of value";
const NOT_INT: &str = "ERR value is not an integer or out of range";
const NOT_FLOAT: &str = "ERR value is not a valid float";
const SYNTAX: &str = "ERR syntax error";

macro_rules! cmd {
    ($name:literal, $arity:expr, $write:expr, $f:path) => {
        Cmd {
            name: $name,
            arity: $arity,
            write: $write,
            run: $f,
        }
    };
}

static COMMANDS: &[Cmd] = &[
    cmd!("ping", -1, false, ping),
    cmd!("echo", 2, false, echo),
    cmd!("quit", -1, false, quit),
    cmd!("select", 2, false, select),
    cmd!("dbsize", 1, false, dbsize),
    cmd!("flushall", -1, true, flushall),
    cmd!("flushdb", -1, true, flushall),
    cmd!("info", -1, false, info),
    cmd!("config", -2, false, config),
    cmd!("command", -1, false, command),
    cmd!("client", -2, false, client),
    cmd!("time", 1, false, time),
    cmd!("set", -3, true, set),
    cmd!("setnx", 3, true, setnx),
    cmd!("setex", 4, true, setex),
    cmd!("psetex", 4, true, setex),
    cmd!("get", 2, false, get),
    cmd!("getdel", 2, true, getdel),
    cmd!("mset", -3, true, mset),
    cmd!("mget", -2, false, mget),
    cmd!("incr", 2, true, incr),
    cmd!("decr", 2, true, incr),
    cmd!("incrby", 3, true, incr),
    cmd!("decrby", 3, true, incr),
    cmd!("append", 3, true, append),
    cmd!("strlen", 2, false, strlen),
    cmd!("del", -2, true, del),
    cmd!("unlink", -2, true, del),
    cmd!("exists", -2, false, exists),
    cmd!("type", 2, false, type_cmd),
    cmd!("keys", 2, false, keys),
    cmd!("expire", -3, true, expire),
    cmd!("pexpire", -3, true, expire),
    cmd!("expireat", -3, true, expire),
    cmd!("pexpireat", -3, true, expire),
    cmd!("persist", 2, true, persist),
    cmd!("ttl", 2, false, ttl),
    cmd!("pttl", 2, false, ttl),
    cmd!("lpush", -3, true, push),
    cmd!("rpush", -3, true, push),
    cmd!("lpop", -2, true, pop),
    cmd!("rpop", -2, true, pop),
    cmd!("llen", 2, false, llen),
    cmd!("lindex", 3, false, lindex),
    cmd!("lrange", 4, false, lrange),
    cmd!("sadd", -3, true, sadd),
    cmd!("srem", -3, true, srem),
    cmd!("spop", -2, true, spop),
    cmd!("scard", 2, false, scard),
    cmd!("smembers", 2, false, smembers),
    cmd!("sismember", 3, false, sismember),
    cmd!("hset", -4, true, hset),
    cmd!("hmset", -4, true, hset),
    cmd!("hget", 3, false, hget),
    cmd!("hmget", -3, false, hmget),
    cmd!("hgetall", 2, false, hgetall),
    cmd!("hdel", -3, true, hdel),
    cmd!("hlen", 2, false, hlen),
    cmd!("hexists", 3, false, hexists),
    cmd!("zadd", -4, true, zadd),
    cmd!("zpopmin", -2, true, zpop),
    cmd!("zpopmax", -2, true, zpop),
    cmd!("zrem", -3, true, zrem),
    cmd!("zcard", 2, false, zcard),
    cmd!("zscore", 3, false, zscore),
    cmd!("zrange", -4, false, zrange),
];

fn lookup(name: &[u8]) -> Option<&'static Cmd> {
    COMMANDS
        .iter()
        .find(|c| c.name.as_bytes().eq_ignore_ascii_case(name))
}

/// Whether `name` is a command that may change the store (a caller can refuse it before
/// running it, e.g. when the log is full).
pub fn is_write_command(name: &[u8]) -> bool {
    lookup(name).is_some_and(|c| c.write)
}

/// Appends `s` to `msg`, replacing bytes that are not printable ASCII by `?` (error replies
/// must stay one line of text).
fn push_sanitized(msg: &mut String, s: &[u8], max: usize) {
    for &b in s.iter().take(max) {
        msg.push(if (0x20..0x7f).contains(&b) {
            b as char
        } else {
            '?'
        });
    }
}

impl Store {
    /// Runs one request (`args[0]` is the command name, any case) at time `now_ms` on the
    /// caller's clock, appends its RESP2 reply (or Redis-style error reply) to `out`, and
    /// returns what the durable log must receive.
    ///
    /// Deterministic: the same store, arguments and `now_ms` give the same reply and the
    /// same new store (SPOP's randomness comes from the seed given to [`Store::new`]).
    pub fn execute(&mut self, args: &[Vec<u8>], now_ms: u64, out: &mut Vec<u8>) -> Outcome {
        self.commands_processed += 1;
        self.expire_due(now_ms);
        let Some(name) = args.first() else {
            write_error(out, "ERR empty command");
            return Outcome {
                effect: Effect::None,
                close: false,
            };
        };
        let Some(cmd) = lookup(name) else {
            let mut msg = String::from("ERR unknown command '");
            push_sanitized(&mut msg, name, 128);
            msg.push_str("', with args beginning with: ");
            for a in &args[1..] {
                if msg.len() >= 256 {
                    break;
                }
                msg.push('\'');
                push_sanitized(&mut msg, a, 128);
                msg.push_str("' ");
            }
            write_error(out, &msg);
            return Outcome {
                effect: Effect::None,
                close: false,
            };
        };
        let n = args.len() as i32;
        if (cmd.arity > 0 && n != cmd.arity) || (cmd.arity < 0 && n < -cmd.arity) {
            arity_error(out, cmd.name);
            return Outcome {
                effect: Effect::None,
                close: false,
            };
        }
        let mut ctx = Ctx {
            s: self,
            now: now_ms,
            out,
            close: false,
        };
        let effect = (cmd.run)(&mut ctx, args);
        Outcome {
            effect,
            close: ctx.close,
        }
    }

    /// Replays one logged command (as produced by [`Outcome::log_args`]) at the time it was
    /// first run. The reply is discarded.
    pub fn apply_logged(&mut self, args: &[Vec<u8>], now_ms: u64, scratch: &mut Vec<u8>) {
        scratch.clear();
        let _ = self.execute(args, now_ms, scratch);
        self.commands_processed -= 1;
    }
}

fn arity_error(out: &mut Vec<u8>, name: &str) {
    let mut msg = String::new();
    let _ = write!(msg, "ERR wrong number of arguments for '{name}' command");
    write_error(out, &msg);
}

fn err(c: &mut Ctx<'_>, msg: &str) -> Effect {
    write_error(c.out, msg);
    Effect::None
}

fn name_is(a: &[u8], n: &str) -> bool {
    a.eq_ignore_ascii_case(n.as_bytes())
}

fn int_arg(a: &[u8]) -> Option<i64> {
    parse_i64(a)
}

fn float_arg(a: &[u8]) -> Option<f64> {
    let s = core::str::from_utf8(a).ok()?;
    let v: f64 = s.parse().ok()?;
    if v.is_nan() {
        None
    } else {
        Some(v)
    }
}

fn write_float(out: &mut Vec<u8>, v: f64) {
    let mut s = String::new();
    let _ = write!(s, "{v}");
    write_bulk(out, s.as_bytes());
}

/// Parses an optional positive COUNT argument at `a[i]`.
fn count_arg(c: &mut Ctx<'_>, a: &[Vec<u8>], i: usize) -> Result<Option<usize>, ()> {
    match a.get(i) {
        None => Ok(None),
        Some(x) => match int_arg(x) {
            Some(n) if n >= 0 => Ok(Some(n as usize)),
            _ => {
                write_error(c.out, "ERR value is out of range, must be positive");
                Err(())
            }
        },
    }
}

/// Resolves a Redis index (negative counts from the end) against `len`.
fn resolve_index(i: i64, len: usize) -> i64 {
    if i < 0 {
        i.saturating_add(len as i64)
    } else {
        i
    }
}

/// Clamps a Redis `start stop` range against `len`; None if empty.
fn clamp_range(start: i64, stop: i64, len: usize) -> Option<(usize, usize)> {
    let start = resolve_index(start, len).max(0);
    let stop = resolve_index(stop, len).min(len as i64 - 1);
    if start > stop || start >= len as i64 {
        None
    } else {
        Some((start as usize, stop as usize))
    }
}

#[cfg(test)]
mod tests;

/// Replies with how many elements a removing command removed; a removal is a write to log.
fn removed(c: &mut Ctx<'_>, n: usize) -> Effect {
    write_int(c.out, n as i64);
    if n > 0 {
        Effect::Logged
    } else {
        Effect::None
    }
}
