//! Set commands: SADD, SREM, SPOP, SCARD, SMEMBERS, SISMEMBER.

use super::*;

pub(super) fn sadd(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    if let Some(e) = c.s.get(&a[1]) {
        if !matches!(e.value, Value::Set(_)) {
            return err(c, WRONGTYPE);
        }
    }
    let Value::Set(set) = c.s.get_or_insert(&a[1], || Value::Set(BTreeSet::new())) else {
        return Effect::None;
    };
    let n = a[2..].iter().filter(|m| set.insert((*m).clone())).count();
    removed(c, n)
}

pub(super) fn srem(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let n = match c.s.get_mut(&a[1]) {
        None => 0,
        Some(Value::Set(set)) => a[2..].iter().filter(|m| set.remove(*m)).count(),
        Some(_) => return err(c, WRONGTYPE),
    };
    c.s.remove_if_empty(&a[1]);
    removed(c, n)
}

pub(super) fn spop(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn scard(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_set(c.s, &a[1]) {
        Ok(s) => write_int(c.out, s.map_or(0, |s| s.len() as i64)),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

pub(super) fn smembers(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn sismember(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_set(c.s, &a[1]) {
        Ok(s) => write_int(c.out, s.is_some_and(|s| s.contains(&a[2])) as i64),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}
