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

// ---- connection / server commands ----

fn ping(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match a.len() {
        1 => write_simple(c.out, "PONG"),
        2 => write_bulk(c.out, &a[1]),
        _ => arity_error(c.out, "ping"),
    }
    Effect::None
}

fn echo(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    write_bulk(c.out, &a[1]);
    Effect::None
}

fn quit(c: &mut Ctx<'_>, _a: &[Vec<u8>]) -> Effect {
    write_simple(c.out, "OK");
    c.close = true;
    Effect::None
}

fn select(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match int_arg(&a[1]) {
        Some(0) => write_simple(c.out, "OK"),
        Some(_) => write_error(c.out, "ERR DB index is out of range"),
        None => write_error(c.out, NOT_INT),
    }
    Effect::None
}

fn dbsize(c: &mut Ctx<'_>, _a: &[Vec<u8>]) -> Effect {
    write_int(c.out, c.s.len() as i64);
    Effect::None
}

fn flushall(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    if a.len() > 2 || (a.len() == 2 && !name_is(&a[1], "async") && !name_is(&a[1], "sync")) {
        return err(c, SYNTAX);
    }
    let had = !c.s.is_empty();
    c.s.clear();
    write_simple(c.out, "OK");
    if had {
        Effect::Logged
    } else {
        Effect::None
    }
}

fn info(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let want = |sec: &str| {
        a.len() < 2
            || a[1..].iter().any(|x| {
                name_is(x, sec)
                    || name_is(x, "all")
                    || name_is(x, "everything")
                    || name_is(x, "default")
            })
    };
    let mut s = String::new();
    let uptime = c.now.saturating_sub(c.s.started_ms) / 1000;
    if want("server") {
        let _ = write!(
            s,
            "# Server\r\nredis_version:7.0.15\r\nredis_mode:standalone\r\n\
             server_name:ftvm-kv\r\nos:ftvm guest\r\narch_bits:64\r\ntcp_port:6379\r\n\
             uptime_in_seconds:{uptime}\r\nuptime_in_days:{}\r\n\r\n",
            uptime / 86400
        );
    }
    if want("clients") {
        let _ = write!(
            s,
            "# Clients\r\nconnected_clients:{}\r\nblocked_clients:0\r\n\r\n",
            c.s.connected_clients
        );
    }
    if want("persistence") {
        s.push_str(
            "# Persistence\r\nloading:0\r\nrdb_changes_since_last_save:0\r\n\
             aof_enabled:1\r\naof_rewrite_in_progress:0\r\n\r\n",
        );
    }
    if want("stats") {
        let _ = write!(
            s,
            "# Stats\r\ntotal_commands_processed:{}\r\n\r\n",
            c.s.commands_processed
        );
    }
    if want("replication") {
        s.push_str("# Replication\r\nrole:master\r\nconnected_slaves:0\r\n\r\n");
    }
    if want("keyspace") {
        s.push_str("# Keyspace\r\n");
        if !c.s.is_empty() {
            let _ = write!(
                s,
                "db0:keys={},expires={},avg_ttl=0\r\n",
                c.s.len(),
                c.s.expiring()
            );
        }
    }
    write_bulk(c.out, s.as_bytes());
    Effect::None
}

/// Configuration parameters CONFIG GET reports (what redis-benchmark and redis-cli ask).
const CONFIG: &[(&str, &str)] = &[
    ("appendfsync", "always"),
    ("appendonly", "yes"),
    ("bind", "*"),
    ("databases", "1"),
    ("maxclients", "10000"),
    ("maxmemory", "0"),
    ("maxmemory-policy", "noeviction"),
    ("port", "6379"),
    ("protected-mode", "no"),
    ("save", ""),
    ("timeout", "0"),
];

fn config(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let sub = &a[1];
    if name_is(sub, "get") {
        if a.len() < 3 {
            arity_error(c.out, "config|get");
            return Effect::None;
        }
        let hits: Vec<&(&str, &str)> = CONFIG
            .iter()
            .filter(|(k, _)| a[2..].iter().any(|p| glob_match(p, k.as_bytes(), true)))
            .collect();
        write_array_len(c.out, hits.len() * 2);
        for (k, v) in hits {
            write_bulk(c.out, k.as_bytes());
            write_bulk(c.out, v.as_bytes());
        }
    } else if name_is(sub, "set") {
        let mut msg = String::from("ERR Unknown option or number of arguments for CONFIG SET - '");
        push_sanitized(&mut msg, a.get(2).map_or(&[][..], |v| v), 64);
        msg.push('\'');
        write_error(c.out, &msg);
    } else if name_is(sub, "resetstat") {
        c.s.commands_processed = 0;
        write_simple(c.out, "OK");
    } else {
        unknown_subcommand(c.out, sub, "CONFIG");
    }
    Effect::None
}

fn unknown_subcommand(out: &mut Vec<u8>, sub: &[u8], cmd: &str) {
    let mut msg = String::from("ERR unknown subcommand '");
    push_sanitized(&mut msg, sub, 128);
    let _ = write!(msg, "'. Try {cmd} HELP.");
    write_error(out, &msg);
}

fn command(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    if a.len() == 1 || name_is(&a[1], "docs") {
        // redis-cli asks COMMAND DOCS for its hints; an empty reply makes it go without.
        write_array_len(c.out, 0);
    } else if name_is(&a[1], "count") {
        write_int(c.out, COMMANDS.len() as i64);
    } else if name_is(&a[1], "list") {
        write_array_len(c.out, COMMANDS.len());
        for cmd in COMMANDS {
            write_bulk(c.out, cmd.name.as_bytes());
        }
    } else if name_is(&a[1], "info") {
        write_array_len(c.out, a.len() - 2);
        for _ in 2..a.len() {
            write_null_array(c.out);
        }
    } else {
        unknown_subcommand(c.out, &a[1], "COMMAND");
    }
    Effect::None
}

fn client(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let sub = &a[1];
    if name_is(sub, "setname") || name_is(sub, "setinfo") {
        write_simple(c.out, "OK");
    } else if name_is(sub, "getname") {
        write_null(c.out);
    } else if name_is(sub, "id") {
        write_int(c.out, 1);
    } else {
        unknown_subcommand(c.out, sub, "CLIENT");
    }
    Effect::None
}

fn time(c: &mut Ctx<'_>, _a: &[Vec<u8>]) -> Effect {
    write_array_len(c.out, 2);
    let mut b = Vec::new();
    push_i64(&mut b, (c.now / 1000) as i64);
    write_bulk(c.out, &b);
    b.clear();
    push_i64(&mut b, ((c.now % 1000) * 1000) as i64);
    write_bulk(c.out, &b);
    Effect::None
}

// ---- strings ----

/// The string at `key`: Ok(None) if missing, Err if another type (WRONGTYPE written).
fn get_string<'s>(s: &'s Store, key: &[u8]) -> Result<Option<&'s Vec<u8>>, ()> {
    match s.get(key).map(|e| &e.value) {
        None => Ok(None),
        Some(Value::Str(v)) => Ok(Some(v)),
        Some(_) => Err(()),
    }
}

fn set(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let (key, val) = (&a[1], &a[2]);
    let (mut nx, mut xx, mut keep_ttl, mut get) = (false, false, false, false);
    let mut expire: Option<u64> = None;
    let mut i = 3;
    while i < a.len() {
        let o = &a[i];
        if name_is(o, "nx") && !xx {
            nx = true;
        } else if name_is(o, "xx") && !nx {
            xx = true;
        } else if name_is(o, "get") {
            get = true;
        } else if name_is(o, "keepttl") && expire.is_none() {
            keep_ttl = true;
        } else if (name_is(o, "ex") || name_is(o, "px") || name_is(o, "exat") || name_is(o, "pxat"))
            && !keep_ttl
            && expire.is_none()
            && i + 1 < a.len()
        {
            let Some(n) = int_arg(&a[i + 1]) else {
                return err(c, NOT_INT);
            };
            let at = if n <= 0 {
                None
            } else if name_is(o, "ex") {
                (n as u64)
                    .checked_mul(1000)
                    .and_then(|v| v.checked_add(c.now))
            } else if name_is(o, "px") {
                (n as u64).checked_add(c.now)
            } else if name_is(o, "exat") {
                (n as u64).checked_mul(1000)
            } else {
                Some(n as u64)
            };
            let Some(at) = at else {
                return err(c, "ERR invalid expire time in 'set' command");
            };
            expire = Some(at);
            i += 1;
        } else {
            return err(c, SYNTAX);
        }
        i += 1;
    }
    let old = match get_string(c.s, key) {
        Ok(v) => v.cloned(),
        Err(()) if get => return err(c, WRONGTYPE),
        Err(()) => None,
    };
    let exists = c.s.get(key).is_some();
    if (nx && exists) || (xx && !exists) {
        if get {
            match old {
                Some(v) => write_bulk(c.out, &v),
                None => write_null(c.out),
            }
        } else {
            write_null(c.out);
        }
        return Effect::None;
    }
    c.s.insert(key, Value::Str(val.clone()), keep_ttl);
    if let Some(at) = expire {
        c.s.set_expiry(key, Some(at));
        c.s.expire_due(c.now);
    }
    if get {
        match old {
            Some(v) => write_bulk(c.out, &v),
            None => write_null(c.out),
        }
    } else {
        write_simple(c.out, "OK");
    }
    Effect::Logged
}

fn setnx(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    if c.s.get(&a[1]).is_some() {
        write_int(c.out, 0);
        return Effect::None;
    }
    c.s.insert(&a[1], Value::Str(a[2].clone()), false);
    write_int(c.out, 1);
    Effect::Logged
}

fn setex(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let ms = name_is(&a[0], "psetex");
    let at = match int_arg(&a[2]) {
        None => return err(c, NOT_INT),
        Some(n) if n <= 0 => None,
        Some(n) if ms => (n as u64).checked_add(c.now),
        Some(n) => (n as u64)
            .checked_mul(1000)
            .and_then(|v| v.checked_add(c.now)),
    };
    let Some(at) = at else {
        let name = if ms { "psetex" } else { "setex" };
        let mut msg = String::new();
        let _ = write!(msg, "ERR invalid expire time in '{name}' command");
        return err(c, &msg);
    };
    c.s.insert(&a[1], Value::Str(a[3].clone()), false);
    c.s.set_expiry(&a[1], Some(at));
    write_simple(c.out, "OK");
    Effect::Logged
}

fn get(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_string(c.s, &a[1]) {
        Ok(Some(v)) => write_bulk(c.out, v),
        Ok(None) => write_null(c.out),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

fn getdel(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_string(c.s, &a[1]) {
        Ok(Some(v)) => {
            write_bulk(c.out, v);
            c.s.remove(&a[1]);
            Effect::Logged
        }
        Ok(None) => {
            write_null(c.out);
            Effect::None
        }
        Err(()) => err(c, WRONGTYPE),
    }
}

fn mset(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    if a.len().is_multiple_of(2) {
        arity_error(c.out, "mset");
        return Effect::None;
    }
    for kv in a[1..].chunks(2) {
        c.s.insert(&kv[0], Value::Str(kv[1].clone()), false);
    }
    write_simple(c.out, "OK");
    Effect::Logged
}

fn mget(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    write_array_len(c.out, a.len() - 1);
    for k in &a[1..] {
        match get_string(c.s, k) {
            Ok(Some(v)) => write_bulk(c.out, v),
            _ => write_null(c.out),
        }
    }
    Effect::None
}

fn incr(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let by = if a.len() == 3 {
        match int_arg(&a[2]) {
            Some(v) => v,
            None => return err(c, NOT_INT),
        }
    } else {
        1
    };
    let decr = name_is(&a[0], "decr") || name_is(&a[0], "decrby");
    let cur = match get_string(c.s, &a[1]) {
        Err(()) => return err(c, WRONGTYPE),
        Ok(None) => 0,
        Ok(Some(v)) => match int_arg(v) {
            Some(n) => n,
            None => return err(c, NOT_INT),
        },
    };
    let new = if decr {
        by.checked_neg().and_then(|b| cur.checked_add(b))
    } else {
        cur.checked_add(by)
    };
    let Some(new) = new else {
        return err(c, "ERR increment or decrement would overflow");
    };
    let mut v = Vec::new();
    push_i64(&mut v, new);
    c.s.insert(&a[1], Value::Str(v), true);
    write_int(c.out, new);
    Effect::Logged
}

fn append(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match c.s.get_mut(&a[1]) {
        Some(Value::Str(v)) => {
            v.extend_from_slice(&a[2]);
            let n = v.len() as i64;
            write_int(c.out, n);
        }
        Some(_) => return err(c, WRONGTYPE),
        None => {
            c.s.insert(&a[1], Value::Str(a[2].clone()), false);
            write_int(c.out, a[2].len() as i64);
        }
    }
    Effect::Logged
}

fn strlen(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_string(c.s, &a[1]) {
        Ok(v) => write_int(c.out, v.map_or(0, |v| v.len() as i64)),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

// ---- keys ----

fn del(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let n = a[1..].iter().filter(|k| c.s.remove(k)).count();
    write_int(c.out, n as i64);
    if n > 0 {
        Effect::Logged
    } else {
        Effect::None
    }
}

fn exists(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let n = a[1..].iter().filter(|k| c.s.get(k).is_some()).count();
    write_int(c.out, n as i64);
    Effect::None
}

fn type_cmd(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let t = c.s.get(&a[1]).map_or("none", |e| e.value.type_name());
    write_simple(c.out, t);
    Effect::None
}

fn keys(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let hits: Vec<&[u8]> = c.s.keys().filter(|k| glob_match(&a[1], k, false)).collect();
    write_array_len(c.out, hits.len());
    for k in hits {
        write_bulk(c.out, k);
    }
    Effect::None
}

fn expire(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let name = &a[0];
    let lname = if name_is(name, "expire") {
        "expire"
    } else if name_is(name, "pexpire") {
        "pexpire"
    } else if name_is(name, "expireat") {
        "expireat"
    } else {
        "pexpireat"
    };
    let Some(n) = int_arg(&a[2]) else {
        return err(c, NOT_INT);
    };
    let (mut nx, mut xx, mut gt, mut lt) = (false, false, false, false);
    for o in &a[3..] {
        if name_is(o, "nx") {
            nx = true;
        } else if name_is(o, "xx") {
            xx = true;
        } else if name_is(o, "gt") {
            gt = true;
        } else if name_is(o, "lt") {
            lt = true;
        } else {
            let mut msg = String::from("ERR Unsupported option ");
            push_sanitized(&mut msg, o, 64);
            return err(c, &msg);
        }
    }
    if nx && (xx || gt || lt) {
        return err(
            c,
            "ERR NX and XX, GT or LT options at the same time are not compatible",
        );
    }
    if gt && lt {
        return err(
            c,
            "ERR GT and LT options at the same time are not compatible",
        );
    }
    let ms: Option<i64> = match lname {
        "expire" => n
            .checked_mul(1000)
            .and_then(|v| v.checked_add(c.now as i64)),
        "pexpire" => n.checked_add(c.now as i64),
        "expireat" => n.checked_mul(1000),
        _ => Some(n),
    };
    let Some(at) = ms else {
        let mut msg = String::new();
        let _ = write!(msg, "ERR invalid expire time in '{lname}' command");
        return err(c, &msg);
    };
    let Some(e) = c.s.get(&a[1]) else {
        write_int(c.out, 0);
        return Effect::None;
    };
    let at = at.max(0) as u64;
    let cur = e.expires_at;
    let ok = match cur {
        // No expiry counts as an infinite TTL for GT and LT.
        None => !xx && !gt,
        Some(t) => !nx && (!gt || at > t) && (!lt || at < t),
    };
    if !ok {
        write_int(c.out, 0);
        return Effect::None;
    }
    if at <= c.now {
        c.s.remove(&a[1]);
    } else {
        c.s.set_expiry(&a[1], Some(at));
    }
    write_int(c.out, 1);
    Effect::Logged
}

fn persist(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match c.s.get(&a[1]).map(|e| e.expires_at) {
        Some(Some(_)) => {
            c.s.set_expiry(&a[1], None);
            write_int(c.out, 1);
            Effect::Logged
        }
        _ => {
            write_int(c.out, 0);
            Effect::None
        }
    }
}

fn ttl(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let ms = name_is(&a[0], "pttl");
    let v = match c.s.get(&a[1]) {
        None => -2,
        Some(e) => match e.expires_at {
            None => -1,
            Some(t) => {
                let left = t.saturating_sub(c.now) as i64;
                if ms {
                    left
                } else {
                    (left + 500) / 1000
                }
            }
        },
    };
    write_int(c.out, v);
    Effect::None
}

// ---- lists ----

fn push(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let left = name_is(&a[0], "lpush");
    let v = c.s.get_or_insert(&a[1], || Value::List(VecDeque::new()));
    let Value::List(l) = v else {
        return err(c, WRONGTYPE);
    };
    for x in &a[2..] {
        if left {
            l.push_front(x.clone());
        } else {
            l.push_back(x.clone());
        }
    }
    let n = l.len() as i64;
    write_int(c.out, n);
    Effect::Logged
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

fn pop(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    if a.len() > 3 {
        arity_error(
            c.out,
            if name_is(&a[0], "lpop") {
                "lpop"
            } else {
                "rpop"
            },
        );
        return Effect::None;
    }
    let left = name_is(&a[0], "lpop");
    let Ok(count) = count_arg(c, a, 2) else {
        return Effect::None;
    };
    let l = match c.s.get_mut(&a[1]) {
        None => {
            if count.is_some() {
                write_null_array(c.out);
            } else {
                write_null(c.out);
            }
            return Effect::None;
        }
        Some(Value::List(l)) => l,
        Some(_) => return err(c, WRONGTYPE),
    };
    let take = |l: &mut VecDeque<Vec<u8>>| if left { l.pop_front() } else { l.pop_back() };
    let changed = match count {
        None => {
            // A list key is never empty (empty lists are deleted).
            let v = take(l).unwrap_or_default();
            write_bulk(c.out, &v);
            true
        }
        Some(n) => {
            let n = n.min(l.len());
            write_array_len(c.out, n);
            for _ in 0..n {
                let v = take(l).unwrap_or_default();
                write_bulk(c.out, &v);
            }
            n > 0
        }
    };
    c.s.remove_if_empty(&a[1]);
    if changed {
        Effect::Logged
    } else {
        Effect::None
    }
}

fn get_list<'s>(s: &'s Store, key: &[u8]) -> Result<Option<&'s VecDeque<Vec<u8>>>, ()> {
    match s.get(key).map(|e| &e.value) {
        None => Ok(None),
        Some(Value::List(l)) => Ok(Some(l)),
        Some(_) => Err(()),
    }
}

fn llen(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_list(c.s, &a[1]) {
        Ok(l) => write_int(c.out, l.map_or(0, |l| l.len() as i64)),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

/// Resolves a Redis index (negative counts from the end) against `len`.
fn resolve_index(i: i64, len: usize) -> i64 {
    if i < 0 {
        i.saturating_add(len as i64)
    } else {
        i
    }
}

fn lindex(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let Some(i) = int_arg(&a[2]) else {
        return err(c, NOT_INT);
    };
    let Ctx { s, out, .. } = c;
    match s.get(&a[1]).map(|e| &e.value) {
        None => write_null(out),
        Some(Value::List(l)) => {
            let i = resolve_index(i, l.len());
            match usize::try_from(i).ok().and_then(|i| l.get(i)) {
                Some(v) => write_bulk(out, v),
                None => write_null(out),
            }
        }
        Some(_) => write_error(out, WRONGTYPE),
    }
    Effect::None
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

fn lrange(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let (Some(start), Some(stop)) = (int_arg(&a[2]), int_arg(&a[3])) else {
        return err(c, NOT_INT);
    };
    let Ctx { s, out, .. } = c;
    match s.get(&a[1]).map(|e| &e.value) {
        None => write_array_len(out, 0),
        Some(Value::List(l)) => match clamp_range(start, stop, l.len()) {
            None => write_array_len(out, 0),
            Some((b, e)) => {
                write_array_len(out, e - b + 1);
                for v in l.range(b..=e) {
                    write_bulk(out, v);
                }
            }
        },
        Some(_) => write_error(out, WRONGTYPE),
    }
    Effect::None
}

// ---- sets ----

fn sadd(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    if let Some(e) = c.s.get(&a[1]) {
        if !matches!(e.value, Value::Set(_)) {
            return err(c, WRONGTYPE);
        }
    }
    let Value::Set(set) = c.s.get_or_insert(&a[1], || Value::Set(BTreeSet::new())) else {
        return Effect::None;
    };
    let n = a[2..].iter().filter(|m| set.insert((*m).clone())).count();
    write_int(c.out, n as i64);
    if n > 0 {
        Effect::Logged
    } else {
        Effect::None
    }
}

fn srem(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let n = match c.s.get_mut(&a[1]) {
        None => 0,
        Some(Value::Set(set)) => a[2..].iter().filter(|m| set.remove(*m)).count(),
        Some(_) => return err(c, WRONGTYPE),
    };
    c.s.remove_if_empty(&a[1]);
    write_int(c.out, n as i64);
    if n > 0 {
        Effect::Logged
    } else {
        Effect::None
    }
}

fn spop(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    if a.len() > 3 {
        arity_error(c.out, "spop");
        return Effect::None;
    }
    let Ok(count) = count_arg(c, a, 2) else {
        return Effect::None;
    };
    let len = match c.s.get(&a[1]).map(|e| &e.value) {
        None => {
            if count.is_some() {
                write_array_len(c.out, 0);
            } else {
                write_null(c.out);
            }
            return Effect::None;
        }
        Some(Value::Set(s)) => s.len(),
        Some(_) => return err(c, WRONGTYPE),
    };
    let n = count.unwrap_or(1).min(len);
    let mut picks = Vec::with_capacity(n);
    for i in 0..n {
        let r = (c.s.next_random() % (len - i) as u64) as usize;
        if let Some(Value::Set(set)) = c.s.get_mut(&a[1]) {
            if let Some(m) = set.iter().nth(r).cloned() {
                set.remove(&m);
                picks.push(m);
            }
        }
    }
    c.s.remove_if_empty(&a[1]);
    if count.is_some() {
        write_array_len(c.out, picks.len());
        for m in &picks {
            write_bulk(c.out, m);
        }
    } else if let Some(m) = picks.first() {
        write_bulk(c.out, m);
    } else {
        write_null(c.out);
    }
    if picks.is_empty() {
        return Effect::None;
    }
    let mut log = Vec::with_capacity(picks.len() + 2);
    log.push(b"SREM".to_vec());
    log.push(a[1].clone());
    log.extend(picks);
    Effect::LoggedAs(log)
}

fn get_set<'s>(s: &'s Store, key: &[u8]) -> Result<Option<&'s BTreeSet<Vec<u8>>>, ()> {
    match s.get(key).map(|e| &e.value) {
        None => Ok(None),
        Some(Value::Set(x)) => Ok(Some(x)),
        Some(_) => Err(()),
    }
}

fn scard(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_set(c.s, &a[1]) {
        Ok(s) => write_int(c.out, s.map_or(0, |s| s.len() as i64)),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

fn smembers(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_set(c.s, &a[1]) {
        Ok(None) => write_array_len(c.out, 0),
        Ok(Some(s)) => {
            write_array_len(c.out, s.len());
            for m in s {
                write_bulk(c.out, m);
            }
        }
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

fn sismember(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_set(c.s, &a[1]) {
        Ok(s) => write_int(c.out, s.is_some_and(|s| s.contains(&a[2])) as i64),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

// ---- hashes ----

fn hset(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let hmset = name_is(&a[0], "hmset");
    if !a.len().is_multiple_of(2) {
        arity_error(c.out, if hmset { "hmset" } else { "hset" });
        return Effect::None;
    }
    if let Some(e) = c.s.get(&a[1]) {
        if !matches!(e.value, Value::Hash(_)) {
            return err(c, WRONGTYPE);
        }
    }
    let Value::Hash(h) = c.s.get_or_insert(&a[1], || Value::Hash(BTreeMap::new())) else {
        return Effect::None;
    };
    let mut added = 0;
    for fv in a[2..].chunks(2) {
        if h.insert(fv[0].clone(), fv[1].clone()).is_none() {
            added += 1;
        }
    }
    if hmset {
        write_simple(c.out, "OK");
    } else {
        write_int(c.out, added);
    }
    Effect::Logged
}

type Hash = BTreeMap<Vec<u8>, Vec<u8>>;

fn get_hash<'s>(s: &'s Store, key: &[u8]) -> Result<Option<&'s Hash>, ()> {
    match s.get(key).map(|e| &e.value) {
        None => Ok(None),
        Some(Value::Hash(x)) => Ok(Some(x)),
        Some(_) => Err(()),
    }
}

fn hget(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_hash(c.s, &a[1]) {
        Ok(h) => match h.and_then(|h| h.get(&a[2])) {
            Some(v) => write_bulk(c.out, v),
            None => write_null(c.out),
        },
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

fn hmget(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_hash(c.s, &a[1]) {
        Ok(h) => {
            write_array_len(c.out, a.len() - 2);
            for f in &a[2..] {
                match h.and_then(|h| h.get(f)) {
                    Some(v) => write_bulk(c.out, v),
                    None => write_null(c.out),
                }
            }
        }
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

fn hgetall(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_hash(c.s, &a[1]) {
        Ok(None) => write_array_len(c.out, 0),
        Ok(Some(h)) => {
            write_array_len(c.out, h.len() * 2);
            for (f, v) in h {
                write_bulk(c.out, f);
                write_bulk(c.out, v);
            }
        }
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

fn hdel(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let n = match c.s.get_mut(&a[1]) {
        None => 0,
        Some(Value::Hash(h)) => a[2..].iter().filter(|f| h.remove(*f).is_some()).count(),
        Some(_) => return err(c, WRONGTYPE),
    };
    c.s.remove_if_empty(&a[1]);
    write_int(c.out, n as i64);
    if n > 0 {
        Effect::Logged
    } else {
        Effect::None
    }
}

fn hlen(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_hash(c.s, &a[1]) {
        Ok(h) => write_int(c.out, h.map_or(0, |h| h.len() as i64)),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

fn hexists(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_hash(c.s, &a[1]) {
        Ok(h) => write_int(c.out, h.is_some_and(|h| h.contains_key(&a[2])) as i64),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

// ---- sorted sets ----

fn zadd(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let (mut nx, mut xx, mut gt, mut lt, mut ch, mut incr) =
        (false, false, false, false, false, false);
    let mut i = 2;
    while i < a.len() {
        let o = &a[i];
        if name_is(o, "nx") {
            nx = true;
        } else if name_is(o, "xx") {
            xx = true;
        } else if name_is(o, "gt") {
            gt = true;
        } else if name_is(o, "lt") {
            lt = true;
        } else if name_is(o, "ch") {
            ch = true;
        } else if name_is(o, "incr") {
            incr = true;
        } else {
            break;
        }
        i += 1;
    }
    let pairs = &a[i..];
    if pairs.is_empty() || !pairs.len().is_multiple_of(2) {
        return err(c, SYNTAX);
    }
    if nx && xx {
        return err(
            c,
            "ERR XX and NX options at the same time are not compatible",
        );
    }
    if (nx && (gt || lt)) || (gt && lt) {
        return err(
            c,
            "ERR GT, LT, and/or NX options at the same time are not compatible",
        );
    }
    if incr && pairs.len() > 2 {
        return err(
            c,
            "ERR INCR option supports a single increment-element pair",
        );
    }
    let mut scores = Vec::with_capacity(pairs.len() / 2);
    for p in pairs.chunks(2) {
        match float_arg(&p[0]) {
            Some(s) => scores.push(s),
            None => return err(c, NOT_FLOAT),
        }
    }
    if let Some(e) = c.s.get(&a[1]) {
        if !matches!(e.value, Value::ZSet(_)) {
            return err(c, WRONGTYPE);
        }
    } else if xx {
        if incr {
            write_null(c.out);
        } else {
            write_int(c.out, 0);
        }
        return Effect::None;
    }
    let Value::ZSet(z) = c.s.get_or_insert(&a[1], || Value::ZSet(ZSet::default())) else {
        return Effect::None;
    };
    let (mut added, mut updated) = (0i64, 0i64);
    let mut incr_result = None;
    let mut nan = false;
    for (p, &score) in pairs.chunks(2).zip(&scores) {
        let m = &p[1];
        match z.score(m) {
            Some(old) => {
                if nx {
                    continue;
                }
                let new = if incr { old + score } else { score };
                if new.is_nan() {
                    nan = true;
                    break;
                }
                if (gt && new <= old) || (lt && new >= old) {
                    continue;
                }
                incr_result = Some(new);
                if new != old {
                    z.insert(m, new);
                    updated += 1;
                }
            }
            None => {
                if xx {
                    continue;
                }
                z.insert(m, score);
                incr_result = Some(score);
                added += 1;
            }
        }
    }
    c.s.remove_if_empty(&a[1]);
    if nan {
        return err(c, "ERR resulting score is not a number (NaN)");
    }
    if incr {
        match incr_result {
            Some(v) => write_float(c.out, v),
            None => write_null(c.out),
        }
    } else {
        write_int(c.out, if ch { added + updated } else { added });
    }
    if added + updated > 0 {
        Effect::Logged
    } else {
        Effect::None
    }
}

fn zpop(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let max = name_is(&a[0], "zpopmax");
    if a.len() > 3 {
        return err(c, SYNTAX);
    }
    let Ok(count) = count_arg(c, a, 2) else {
        return Effect::None;
    };
    let z = match c.s.get_mut(&a[1]) {
        None => {
            write_array_len(c.out, 0);
            return Effect::None;
        }
        Some(Value::ZSet(z)) => z,
        Some(_) => return err(c, WRONGTYPE),
    };
    let n = count.unwrap_or(1).min(z.len());
    write_array_len(c.out, n * 2);
    for _ in 0..n {
        if let Some((m, s)) = z.pop(max) {
            write_bulk(c.out, &m);
            write_float(c.out, s);
        }
    }
    c.s.remove_if_empty(&a[1]);
    if n > 0 {
        Effect::Logged
    } else {
        Effect::None
    }
}

fn get_zset<'s>(s: &'s Store, key: &[u8]) -> Result<Option<&'s ZSet>, ()> {
    match s.get(key).map(|e| &e.value) {
        None => Ok(None),
        Some(Value::ZSet(x)) => Ok(Some(x)),
        Some(_) => Err(()),
    }
}

fn zrem(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let n = match c.s.get_mut(&a[1]) {
        None => 0,
        Some(Value::ZSet(z)) => a[2..].iter().filter(|m| z.remove(m)).count(),
        Some(_) => return err(c, WRONGTYPE),
    };
    c.s.remove_if_empty(&a[1]);
    write_int(c.out, n as i64);
    if n > 0 {
        Effect::Logged
    } else {
        Effect::None
    }
}

fn zcard(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_zset(c.s, &a[1]) {
        Ok(z) => write_int(c.out, z.map_or(0, |z| z.len() as i64)),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

fn zscore(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_zset(c.s, &a[1]) {
        Ok(z) => match z.and_then(|z| z.score(&a[2])) {
            Some(s) => write_float(c.out, s),
            None => write_null(c.out),
        },
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

fn zrange(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let with_scores = match a.len() {
        4 => false,
        5 if name_is(&a[4], "withscores") => true,
        _ => return err(c, SYNTAX),
    };
    let (Some(start), Some(stop)) = (int_arg(&a[2]), int_arg(&a[3])) else {
        return err(c, NOT_INT);
    };
    let z = match get_zset(c.s, &a[1]) {
        Err(()) => return err(c, WRONGTYPE),
        Ok(None) => {
            write_array_len(c.out, 0);
            return Effect::None;
        }
        Ok(Some(z)) => z,
    };
    match clamp_range(start, stop, z.len()) {
        None => write_array_len(c.out, 0),
        Some((b, e)) => {
            let n = e - b + 1;
            write_array_len(c.out, if with_scores { n * 2 } else { n });
            for (m, s) in z.iter().skip(b).take(n) {
                write_bulk(c.out, m);
                if with_scores {
                    write_float(c.out, s);
                }
            }
        }
    }
    Effect::None
}

// ---- glob patterns (KEYS, CONFIG GET) ----

/// Matches `s` against a Redis glob pattern (`*`, `?`, `[abc]`, `[^a-z]`, `\x`).
/// Linear backtracking over the last `*`, so hostile patterns cannot blow up.
pub fn glob_match(p: &[u8], s: &[u8], nocase: bool) -> bool {
    let eq = |a: u8, b: u8| {
        if nocase {
            a.eq_ignore_ascii_case(&b)
        } else {
            a == b
        }
    };
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() {
            let step = match p[pi] {
                b'*' => {
                    while pi < p.len() && p[pi] == b'*' {
                        pi += 1;
                    }
                    if pi == p.len() {
                        return true;
                    }
                    star = Some((pi, si));
                    continue;
                }
                b'?' => Some(pi + 1),
                b'[' => {
                    let (matched, next) = class_match(p, pi, s[si], nocase);
                    matched.then_some(next)
                }
                b'\\' if pi + 1 < p.len() => eq(p[pi + 1], s[si]).then_some(pi + 2),
                ch => eq(ch, s[si]).then_some(pi + 1),
            };
            if let Some(next) = step {
                pi = next;
                si += 1;
                continue;
            }
        }
        match star {
            Some((sp, ss)) => {
                pi = sp;
                si = ss + 1;
                star = Some((sp, ss + 1));
            }
            None => return false,
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

/// Matches `c` against the class starting at `p[start] == '['`; returns whether it matched
/// and the pattern index after the class.
fn class_match(p: &[u8], start: usize, c: u8, nocase: bool) -> (bool, usize) {
    let norm = |x: u8| if nocase { x.to_ascii_lowercase() } else { x };
    let c = norm(c);
    let mut i = start + 1;
    let neg = p.get(i) == Some(&b'^');
    if neg {
        i += 1;
    }
    let mut hit = false;
    while i < p.len() && p[i] != b']' {
        if p[i] == b'\\' && i + 1 < p.len() {
            hit |= norm(p[i + 1]) == c;
            i += 2;
        } else if i + 2 < p.len() && p[i + 1] == b'-' && p[i + 2] != b']' {
            let (mut lo, mut hi) = (norm(p[i]), norm(p[i + 2]));
            if lo > hi {
                core::mem::swap(&mut lo, &mut hi);
            }
            hit |= lo <= c && c <= hi;
            i += 3;
        } else {
            hit |= norm(p[i]) == c;
            i += 1;
        }
    }
    (hit != neg, (i + 1).min(p.len()))
}

#[cfg(test)]
mod tests;
