//! Redis glob patterns (KEYS, CONFIG GET).

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
