//! Tests of the command engine.

use super::*;
use alloc::vec;
use alloc::vec::Vec;

fn args(line: &str) -> Vec<Vec<u8>> {
    line.split_whitespace()
        .map(|a| a.as_bytes().to_vec())
        .collect()
}

/// Runs `line` (whitespace separated) at `now` and returns the reply as text.
fn run_at(s: &mut Store, now: u64, line: &str) -> alloc::string::String {
    let mut out = Vec::new();
    s.execute(&args(line), now, &mut out);
    alloc::string::String::from_utf8(out).unwrap()
}

fn run(s: &mut Store, line: &str) -> alloc::string::String {
    run_at(s, 1_000, line)
}

#[test]
fn ping_echo_select_config_command() {
    let mut s = Store::new(1);
    assert_eq!(run(&mut s, "PING"), "+PONG\r\n");
    assert_eq!(run(&mut s, "ping hi"), "$2\r\nhi\r\n");
    assert_eq!(
        run(&mut s, "ping a b"),
        "-ERR wrong number of arguments for 'ping' command\r\n"
    );
    assert_eq!(run(&mut s, "ECHO x"), "$1\r\nx\r\n");
    assert_eq!(run(&mut s, "SELECT 0"), "+OK\r\n");
    assert_eq!(run(&mut s, "SELECT 1"), "-ERR DB index is out of range\r\n");
    assert_eq!(
        run(&mut s, "CONFIG GET save"),
        "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
    );
    assert_eq!(
        run(&mut s, "CONFIG GET appendonly"),
        "*2\r\n$10\r\nappendonly\r\n$3\r\nyes\r\n"
    );
    assert_eq!(run(&mut s, "CONFIG GET nosuch"), "*0\r\n");
    assert!(run(&mut s, "CONFIG GET *").starts_with("*22\r\n"));
    assert_eq!(run(&mut s, "COMMAND DOCS"), "*0\r\n");
    assert_eq!(run(&mut s, "COMMAND"), "*0\r\n");
    assert!(run(&mut s, "COMMAND COUNT").starts_with(':'));
    assert!(run(&mut s, "INFO").contains("redis_version:"));
    assert!(run(&mut s, "INFO keyspace").starts_with("$12\r\n# Keyspace"));
    assert_eq!(
        run(&mut s, "NOSUCH a b"),
        "-ERR unknown command 'NOSUCH', with args beginning with: 'a' 'b' \r\n"
    );
    assert_eq!(run(&mut s, "TIME"), "*2\r\n$1\r\n1\r\n$1\r\n0\r\n");
    let mut out = Vec::new();
    let o = s.execute(&args("QUIT"), 0, &mut out);
    assert!(o.close && !o.is_write());
}

#[test]
fn unknown_command_is_sanitized() {
    let mut s = Store::new(1);
    let mut out = Vec::new();
    s.execute(&[b"a\r\nb".to_vec(), b"\x00".to_vec()], 0, &mut out);
    assert_eq!(
        out,
        b"-ERR unknown command 'a??b', with args beginning with: '?' \r\n"
    );
}

#[test]
fn strings() {
    let mut s = Store::new(1);
    assert_eq!(run(&mut s, "GET k"), "$-1\r\n");
    assert_eq!(run(&mut s, "SET k v"), "+OK\r\n");
    assert_eq!(run(&mut s, "GET k"), "$1\r\nv\r\n");
    assert_eq!(run(&mut s, "SET k w NX"), "$-1\r\n");
    assert_eq!(run(&mut s, "SET k w XX GET"), "$1\r\nv\r\n");
    assert_eq!(run(&mut s, "SET k w BOGUS"), "-ERR syntax error\r\n");
    assert_eq!(
        run(&mut s, "SET k w EX 0"),
        "-ERR invalid expire time in 'set' command\r\n"
    );
    assert_eq!(run(&mut s, "INCR n"), ":1\r\n");
    assert_eq!(run(&mut s, "INCRBY n 41"), ":42\r\n");
    assert_eq!(run(&mut s, "DECR n"), ":41\r\n");
    assert_eq!(
        run(&mut s, "INCR k"),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(run(&mut s, "SET big 9223372036854775807"), "+OK\r\n");
    assert_eq!(
        run(&mut s, "INCR big"),
        "-ERR increment or decrement would overflow\r\n"
    );
    assert_eq!(run(&mut s, "MSET a 1 b 2"), "+OK\r\n");
    assert_eq!(
        run(&mut s, "MSET a 1 b"),
        "-ERR wrong number of arguments for 'mset' command\r\n"
    );
    assert_eq!(
        run(&mut s, "MGET a b zz"),
        "*3\r\n$1\r\n1\r\n$1\r\n2\r\n$-1\r\n"
    );
    assert_eq!(run(&mut s, "APPEND a xy"), ":3\r\n");
    assert_eq!(run(&mut s, "STRLEN a"), ":3\r\n");
    assert_eq!(run(&mut s, "EXISTS a b zz a"), ":3\r\n");
    assert_eq!(run(&mut s, "DEL a zz"), ":1\r\n");
    assert_eq!(run(&mut s, "TYPE b"), "+string\r\n");
    assert_eq!(
        run(&mut s, "KEYS *"),
        "*4\r\n$1\r\nb\r\n$3\r\nbig\r\n$1\r\nk\r\n$1\r\nn\r\n"
    );
    assert_eq!(run(&mut s, "KEYS b?g"), "*1\r\n$3\r\nbig\r\n");
    assert_eq!(run(&mut s, "DBSIZE"), ":4\r\n");
    assert_eq!(run(&mut s, "FLUSHALL"), "+OK\r\n");
    assert_eq!(run(&mut s, "DBSIZE"), ":0\r\n");
}

#[test]
fn expiry() {
    let mut s = Store::new(1);
    run_at(&mut s, 1_000, "SET k v");
    assert_eq!(run_at(&mut s, 1_000, "TTL k"), ":-1\r\n");
    assert_eq!(run_at(&mut s, 1_000, "TTL nope"), ":-2\r\n");
    assert_eq!(run_at(&mut s, 1_000, "EXPIRE k 10"), ":1\r\n");
    assert_eq!(run_at(&mut s, 2_000, "TTL k"), ":9\r\n");
    assert_eq!(run_at(&mut s, 2_000, "PTTL k"), ":9000\r\n");
    assert_eq!(run_at(&mut s, 2_000, "EXPIRE k 100 NX"), ":0\r\n");
    assert_eq!(run_at(&mut s, 2_000, "EXPIRE k 100 GT"), ":1\r\n");
    assert_eq!(run_at(&mut s, 2_000, "PERSIST k"), ":1\r\n");
    assert_eq!(run_at(&mut s, 2_000, "SET t v PX 500"), "+OK\r\n");
    assert_eq!(run_at(&mut s, 2_499, "GET t"), "$1\r\nv\r\n");
    assert_eq!(run_at(&mut s, 2_500, "GET t"), "$-1\r\n");
    assert_eq!(run_at(&mut s, 2_500, "DBSIZE"), ":1\r\n");
    assert_eq!(run_at(&mut s, 2_500, "EXPIRE k -1"), ":1\r\n");
    assert_eq!(run_at(&mut s, 2_500, "EXISTS k"), ":0\r\n");
    assert_eq!(run_at(&mut s, 2_500, "SETEX e 1 v"), "+OK\r\n");
    assert_eq!(run_at(&mut s, 3_500, "GET e"), "$-1\r\n");
}

#[test]
fn lists() {
    let mut s = Store::new(1);
    assert_eq!(run(&mut s, "LPUSH l a b c"), ":3\r\n");
    assert_eq!(run(&mut s, "RPUSH l z"), ":4\r\n");
    assert_eq!(
        run(&mut s, "LRANGE l 0 -1"),
        "*4\r\n$1\r\nc\r\n$1\r\nb\r\n$1\r\na\r\n$1\r\nz\r\n"
    );
    assert_eq!(run(&mut s, "LRANGE l 1 2"), "*2\r\n$1\r\nb\r\n$1\r\na\r\n");
    assert_eq!(run(&mut s, "LRANGE l 5 9"), "*0\r\n");
    assert_eq!(run(&mut s, "LRANGE l -100 0"), "*1\r\n$1\r\nc\r\n");
    assert_eq!(run(&mut s, "LINDEX l -1"), "$1\r\nz\r\n");
    assert_eq!(run(&mut s, "LPOP l"), "$1\r\nc\r\n");
    assert_eq!(run(&mut s, "RPOP l 2"), "*2\r\n$1\r\nz\r\n$1\r\na\r\n");
    assert_eq!(run(&mut s, "LLEN l"), ":1\r\n");
    assert_eq!(run(&mut s, "RPOP l"), "$1\r\nb\r\n");
    assert_eq!(run(&mut s, "EXISTS l"), ":0\r\n");
    assert_eq!(run(&mut s, "LPOP l"), "$-1\r\n");
    assert_eq!(run(&mut s, "LPOP l 1"), "*-1\r\n");
    run(&mut s, "SET str x");
    assert_eq!(
        run(&mut s, "LPUSH str a"),
        "-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
    );
    assert_eq!(
        run(&mut s, "GET nope extra"),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
}

#[test]
fn lrange_600_like_benchmark() {
    let mut s = Store::new(1);
    for i in 0..700 {
        run(&mut s, &alloc::format!("LPUSH mylist {i}"));
    }
    let r = run(&mut s, "LRANGE mylist 0 599");
    assert!(r.starts_with("*600\r\n$3\r\n699\r\n"));
}

#[test]
fn sets_and_spop_is_logged_as_srem() {
    let mut s = Store::new(7);
    assert_eq!(run(&mut s, "SADD s a b c"), ":3\r\n");
    assert_eq!(run(&mut s, "SADD s a"), ":0\r\n");
    assert_eq!(run(&mut s, "SCARD s"), ":3\r\n");
    assert_eq!(run(&mut s, "SISMEMBER s b"), ":1\r\n");
    let mut out = Vec::new();
    let o = s.execute(&args("SPOP s"), 0, &mut out);
    let Effect::LoggedAs(log) = &o.effect else {
        panic!("{o:?}")
    };
    assert_eq!(log[0], b"SREM");
    assert_eq!(log.len(), 3);
    assert_eq!(out, [b"$1\r\n".as_slice(), &log[2], b"\r\n"].concat());
    assert_eq!(run(&mut s, "SPOP s 5").matches('$').count(), 2);
    assert_eq!(run(&mut s, "EXISTS s"), ":0\r\n");
    assert_eq!(run(&mut s, "SPOP s"), "$-1\r\n");
    assert_eq!(run(&mut s, "SMEMBERS s"), "*0\r\n");
}

#[test]
fn hashes() {
    let mut s = Store::new(1);
    assert_eq!(run(&mut s, "HSET h f v g w"), ":2\r\n");
    assert_eq!(run(&mut s, "HSET h f x"), ":0\r\n");
    assert_eq!(
        run(&mut s, "HSET h f"),
        "-ERR wrong number of arguments for 'hset' command\r\n"
    );
    assert_eq!(run(&mut s, "HGET h f"), "$1\r\nx\r\n");
    assert_eq!(
        run(&mut s, "HGETALL h"),
        "*4\r\n$1\r\nf\r\n$1\r\nx\r\n$1\r\ng\r\n$1\r\nw\r\n"
    );
    assert_eq!(run(&mut s, "HDEL h f g"), ":2\r\n");
    assert_eq!(run(&mut s, "EXISTS h"), ":0\r\n");
}

#[test]
fn zsets() {
    let mut s = Store::new(1);
    assert_eq!(run(&mut s, "ZADD z 1 a 2 b 0.5 c"), ":3\r\n");
    assert_eq!(run(&mut s, "ZADD z CH 3 a"), ":1\r\n");
    assert_eq!(
        run(&mut s, "ZADD z x a"),
        "-ERR value is not a valid float\r\n"
    );
    assert_eq!(run(&mut s, "ZADD z 1 a 2"), "-ERR syntax error\r\n");
    assert_eq!(run(&mut s, "ZADD z INCR 1 c"), "$3\r\n1.5\r\n");
    assert_eq!(
        run(&mut s, "ZRANGE z 0 -1 WITHSCORES"),
        "*6\r\n$1\r\nc\r\n$3\r\n1.5\r\n$1\r\nb\r\n$1\r\n2\r\n$1\r\na\r\n$1\r\n3\r\n"
    );
    assert_eq!(run(&mut s, "ZPOPMIN z"), "*2\r\n$1\r\nc\r\n$3\r\n1.5\r\n");
    assert_eq!(
        run(&mut s, "ZPOPMAX z 5"),
        "*4\r\n$1\r\na\r\n$1\r\n3\r\n$1\r\nb\r\n$1\r\n2\r\n"
    );
    assert_eq!(run(&mut s, "ZPOPMIN z"), "*0\r\n");
    assert_eq!(run(&mut s, "ZADD z -inf m"), ":1\r\n");
    assert_eq!(run(&mut s, "ZSCORE z m"), "$4\r\n-inf\r\n");
    assert_eq!(run(&mut s, "ZCARD z"), ":1\r\n");
}

#[test]
fn effects() {
    let mut s = Store::new(1);
    let mut out = Vec::new();
    let mut eff = |s: &mut Store, l: &str| s.execute(&args(l), 0, &mut out).effect;
    assert_eq!(eff(&mut s, "SET a 1"), Effect::Logged);
    assert_eq!(eff(&mut s, "GET a"), Effect::None);
    assert_eq!(eff(&mut s, "DEL zz"), Effect::None);
    assert_eq!(eff(&mut s, "LPOP zz"), Effect::None);
    assert_eq!(eff(&mut s, "INCR a"), Effect::Logged);
    assert_eq!(eff(&mut s, "LPUSH a x"), Effect::None);
    assert!(is_write_command(b"set") && !is_write_command(b"GET"));
}

#[test]
fn glob() {
    assert!(glob_match(b"*", b"", false));
    assert!(glob_match(b"a*b*c", b"axxbyyc", false));
    assert!(!glob_match(b"a*b*c", b"axxbyy", false));
    assert!(glob_match(b"h[ae]llo", b"hello", false));
    assert!(!glob_match(b"h[^e]llo", b"hello", false));
    assert!(glob_match(b"h[a-z]llo", b"hxllo", false));
    assert!(glob_match(b"a\\*", b"a*", false));
    assert!(glob_match(b"SAVE", b"save", true));
    assert!(!glob_match(&[b'*'; 40], b"", false) || glob_match(&[b'*'; 40], b"", false));
    let long = [b'a'; 200];
    assert!(!glob_match(b"*a*a*a*a*a*a*a*b", &long, false));
}

/// Random commands over a small key space: nothing panics, every reply is well formed
/// enough to start with a RESP type byte.
#[test]
fn fuzz_commands() {
    let names = [
        "SET",
        "GET",
        "INCR",
        "LPUSH",
        "RPUSH",
        "LPOP",
        "RPOP",
        "SADD",
        "SPOP",
        "HSET",
        "ZADD",
        "ZPOPMIN",
        "LRANGE",
        "MSET",
        "DEL",
        "EXPIRE",
        "TTL",
        "ZRANGE",
        "SREM",
        "HDEL",
        "KEYS",
        "SETEX",
        "PEXPIREAT",
        "ZADD",
        "LINDEX",
        "TYPE",
        "FLUSHALL",
        "APPEND",
        "INCRBY",
    ];
    let words = [
        "k", "l", "1", "-1", "0", "2.5", "inf", "nx", "xx", "ex", "*", "a", "-5", "99",
    ];
    let mut st: u64 = 99;
    let mut next = || {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        st
    };
    let mut s = Store::new(3);
    let mut out = Vec::new();
    for i in 0..50_000u64 {
        let mut a = vec![names[(next() % names.len() as u64) as usize]
            .as_bytes()
            .to_vec()];
        for _ in 0..(next() % 6) {
            a.push(
                words[(next() % words.len() as u64) as usize]
                    .as_bytes()
                    .to_vec(),
            );
        }
        out.clear();
        s.execute(&a, i, &mut out);
        assert!(matches!(out[0], b'+' | b'-' | b':' | b'$' | b'*'), "{a:?}");
    }
}
