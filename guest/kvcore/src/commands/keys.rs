//! Keyspace commands: DEL, EXISTS, TYPE, KEYS, EXPIRE and friends, PERSIST, TTL.

use super::*;

pub(super) fn del(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let n = a[1..].iter().filter(|k| c.s.remove(k)).count();
    removed(c, n)
}

pub(super) fn exists(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let n = a[1..].iter().filter(|k| c.s.get(k).is_some()).count();
    write_int(c.out, n as i64);
    Effect::None
}

pub(super) fn type_cmd(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let t = c.s.get(&a[1]).map_or("none", |e| e.value.type_name());
    write_simple(c.out, t);
    Effect::None
}

pub(super) fn keys(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let hits: Vec<&[u8]> = c.s.keys().filter(|k| glob_match(&a[1], k, false)).collect();
    write_array_len(c.out, hits.len());
    for k in hits {
        write_bulk(c.out, k);
    }
    Effect::None
}

pub(super) fn expire(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn persist(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn ttl(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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
