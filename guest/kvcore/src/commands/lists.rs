//! List commands: LPUSH, RPUSH, LPOP, RPOP, LLEN, LINDEX, LRANGE.

use super::*;

pub(super) fn push(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn pop(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn llen(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
    match get_list(c.s, &a[1]) {
        Ok(l) => write_int(c.out, l.map_or(0, |l| l.len() as i64)),
        Err(()) => return err(c, WRONGTYPE),
    }
    Effect::None
}

pub(super) fn lindex(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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

pub(super) fn lrange(c: &mut Ctx<'_>, a: &[Vec<u8>]) -> Effect {
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
