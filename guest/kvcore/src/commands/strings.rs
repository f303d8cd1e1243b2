//! String commands: SET, GET, MSET, MGET, INCR and friends, APPEND, STRLEN.

use super::*;

/// The string at `key`: Ok(None) if missing, Err if another type (WRONGTYPE written).
fn get_string<'s>(s: &'s Store, key: &[u8]) -> Result<Option<&'s Vec<u8>>, ()> {
    match s.get(key).map(|e| &e.value) {
        None => Ok(None),
        Some(Value::Str(v)) => Ok(Some(v)),
        Some(_) => Err(()),
    }
}

pub(super) fn set(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn setnx(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    if c.s.get(&a[1]).is_some() {
        write_int(c.out, 0);
        return Effect::None;
    }
    c.s.insert(&a[1], Value::Str(a[2].clone()), false);
    write_int(c.out, 1);
    Effect::Logged
}

pub(super) fn setex(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn get(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_string(c.s, &a[1]) {
        Ok(Some(v)) => write_bulk(c.out, v),
        Ok(None) => write_null(c.out),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

pub(super) fn getdel(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn mset(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn mget(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    write_array_len(c.out, a.len() - 1);
    for k in &a[1..] {
        match get_string(c.s, k) {
            Ok(Some(v)) => write_bulk(c.out, v),
            _ => write_null(c.out),
        }
    }
    Effect::None
}

pub(super) fn incr(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn append(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn strlen(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_string(c.s, &a[1]) {
        Ok(v) => write_int(c.out, v.map_or(0, |v| v.len() as i64)),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}
