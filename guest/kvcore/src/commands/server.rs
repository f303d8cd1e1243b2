//! Connection and server commands: PING, ECHO, QUIT, SELECT, DBSIZE, FLUSHALL, INFO,
//! CONFIG, COMMAND, CLIENT, TIME.

use super::*;

pub(super) fn ping(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match a.len() {
        1 => write_simple(c.out, "PONG"),
        2 => write_bulk(c.out, &a[1]),
        _ => arity_error(c.out, "ping"),
    }
    Effect::None
}

pub(super) fn echo(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    write_bulk(c.out, &a[1]);
    Effect::None
}

pub(super) fn quit(c: &mut Ctx<'_>, _a: &[Vec<u8>]) -> Effect {
    write_simple(c.out, "OK");
    c.close = true;
    Effect::None
}

pub(super) fn select(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match int_arg(&a[1]) {
        Some(0) => write_simple(c.out, "OK"),
        Some(_) => write_error(c.out, "ERR DB index is out of range"),
        None => write_error(c.out, NOT_INT),
    }
    Effect::None
}

pub(super) fn dbsize(c: &mut Ctx<'_>, _a: &[Vec<u8>]) -> Effect {
    write_int(c.out, c.s.len() as i64);
    Effect::None
}

pub(super) fn flushall(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn info(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn config(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn command(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn client(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn time(c: &mut Ctx<'_>, _a: &[Vec<u8>]) -> Effect {
    write_array_len(c.out, 2);
    let mut b = Vec::new();
    push_i64(&mut b, (c.now / 1000) as i64);
    write_bulk(c.out, &b);
    b.clear();
    push_i64(&mut b, ((c.now % 1000) * 1000) as i64);
    write_bulk(c.out, &b);
    Effect::None
}
