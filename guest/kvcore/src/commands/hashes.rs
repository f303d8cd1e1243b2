//! Hash commands: HSET, HMSET, HGET, HMGET, HGETALL, HDEL, HLEN, HEXISTS.

use super::*;

pub(super) fn hset(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn hget(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_hash(c.s, &a[1]) {
        Ok(h) => match h.and_then(|h| h.get(&a[2])) {
            Some(v) => write_bulk(c.out, v),
            None => write_null(c.out),
        },
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

pub(super) fn hmget(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn hgetall(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn hdel(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let n = match c.s.get_mut(&a[1]) {
        None => 0,
        Some(Value::Hash(h)) => a[2..].iter().filter(|f| h.remove(*f).is_some()).count(),
        Some(_) => return err(c, WRONGTYPE),
    };
    c.s.remove_if_empty(&a[1]);
    removed(c, n)
}

pub(super) fn hlen(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_hash(c.s, &a[1]) {
        Ok(h) => write_int(c.out, h.map_or(0, |h| h.len() as i64)),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

pub(super) fn hexists(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_hash(c.s, &a[1]) {
        Ok(h) => write_int(c.out, h.is_some_and(|h| h.contains_key(&a[2])) as i64),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}
