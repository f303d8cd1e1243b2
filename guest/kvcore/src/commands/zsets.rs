//! Sorted-set commands: ZADD, ZPOPMIN, ZPOPMAX, ZREM, ZCARD, ZSCORE, ZRANGE.

use super::*;

pub(super) fn zadd(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn zpop(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn zrem(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    let n = match c.s.get_mut(&a[1]) {
        None => 0,
        Some(Value::ZSet(z)) => a[2..].iter().filter(|m| z.remove(m)).count(),
        Some(_) => return err(c, WRONGTYPE),
    };
    c.s.remove_if_empty(&a[1]);
    removed(c, n)
}

pub(super) fn zcard(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_zset(c.s, &a[1]) {
        Ok(z) => write_int(c.out, z.map_or(0, |z| z.len() as i64)),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

pub(super) fn zscore(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_zset(c.s, &a[1]) {
        Ok(z) => match z.and_then(|z| z.score(&a[2])) {
            Some(s) => write_float(c.out, s),
            None => write_null(c.out),
        },
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

pub(super) fn zrange(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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
